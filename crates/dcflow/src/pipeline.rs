//! decode → select → copy → record, shared by every source (replay now; Kafka and SSE next).
//!
//! A permit is taken before an event's copy starts, so a full pool of `maxdownloads` pauses
//! the source instead of growing a queue. One copy per pnfsid: the door `request` and pool
//! `transfer` of one upload, and replays, are merged. One copy at a time per destination.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use dcflow_core::workflow::EventKind;
use dcflow_core::{
    BillingMessage, Config, DecodeError, Glance, Mapped, PathMapper, PnfsId, Record, RecordFile,
    Selector, Sorted, Step, Template, Workflow,
};
use dcflow_kafka::TopicProducer;
use dcflow_transfer::engine::{human_bytes, mbps};
use dcflow_transfer::{Credentials, Engine, EngineSettings, Job};
use time::OffsetDateTime;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn, Instrument};

use crate::catalog::Catalog;
pub use crate::metrics::Stats;
use crate::metrics::{Active, Activity, Ended, StepLabel};
use crate::state::StateStore;
use crate::steps::{self, retrying, Context as StepContext, StepError, Webhooks};

/// What became of one selected file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOutcome {
    Copied,
    AlreadyPresent,
    /// Every matching workflow ended, none of them with a copy that moved bytes.
    Done,
    Failed,
}

impl FileOutcome {
    /// The outcome of several workflows of one event: a failure wins, then a copy.
    fn and(self, other: Self) -> Self {
        use FileOutcome::*;
        match (self, other) {
            (Failed, _) | (_, Failed) => Failed,
            (Copied, _) | (_, Copied) => Copied,
            (AlreadyPresent, _) | (_, AlreadyPresent) => AlreadyPresent,
            _ => Done,
        }
    }
}

#[derive(Debug, Clone)]
enum Seen {
    /// Being copied; the receiver completes when that copy ends.
    InFlight(watch::Receiver<bool>),
    Done,
    Failed,
}

/// How many finished uploads are remembered for merging duplicates; older ones are
/// forgotten first (a forgotten duplicate costs a HEAD and a local checksum instead).
const REMEMBER_FINISHED: usize = 1_000_000;

/// Uploads in flight (always kept) and the most recently finished ones (bounded), so that a
/// daemon running for months does not grow with every file it ever copied.
/// Events are merged per kind and pnfsid: a remove of a file is not its upload. A message that
/// names a path the file appears at only after its commit (dCache #5285) is apart from one
/// that names the committed file: when the first one's 404 retries run out, the later SRM
/// `putDone` or door message, the one that can work, still gets its own run.
type SeenKey = (EventKind, PnfsId, bool);

struct SeenMap {
    map: HashMap<SeenKey, Seen>,
    finished: std::collections::VecDeque<SeenKey>,
    limit: usize,
}

impl SeenMap {
    fn new(limit: usize) -> Self {
        Self {
            map: HashMap::new(),
            finished: Default::default(),
            limit,
        }
    }

    fn get(&self, key: &SeenKey) -> Option<&Seen> {
        self.map.get(key)
    }

    fn start(&mut self, key: &SeenKey, running: watch::Receiver<bool>) {
        self.map.insert(key.clone(), Seen::InFlight(running));
    }

    fn finish(&mut self, key: &SeenKey, state: Seen) {
        self.map.insert(key.clone(), state);
        self.finished.push_back(key.clone());
        while self.finished.len() > self.limit {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            if !matches!(self.map.get(&old), Some(Seen::InFlight(_))) {
                self.map.remove(&old);
            }
        }
    }
}

/// What to do with one message.
pub enum Admission {
    /// Copy it.
    Run(Box<Task>),
    /// Its failure could not be recorded: it must not be acknowledged (the pipeline halts).
    Unrecorded,
    /// The same upload (same pnfsid) is being copied: acknowledge this message only once that
    /// copy ended (`Merged::wait`), never before, or a crash could lose the file.
    Merged(Merged),
    /// Nothing to do (skipped, or recorded as a failure).
    Skip,
}

/// A message merged into the copy of the same upload.
pub struct Merged(watch::Receiver<bool>);

impl Merged {
    /// Returns when the copy it was merged into has ended: true when its outcome is recorded
    /// (copied, or failed and recorded), false when the record could not be written (the
    /// message must then not be acknowledged).
    pub async fn wait(mut self) -> bool {
        // The sender is dropped when the copy ends: changed() then returns an error.
        while self.0.changed().await.is_ok() {}
        let recorded = *self.0.borrow();
        recorded
    }
}

/// The outcome of an event could not be recorded (a full disk): it must not be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrecorded;

/// Event fields rules and steps use, besides the upload's own.
#[derive(Debug, Clone, Default)]
struct Facts {
    storage_info: Option<String>,
    owner: Option<String>,
    uid: Option<i64>,
}

pub struct Pipeline {
    mapper: PathMapper,
    workflows: Vec<Workflow>,
    /// `[[workflow]]` rules are configured (not the implicit copy): steps are logged and
    /// failures name their workflow and step.
    explicit_workflows: bool,
    webhooks: Webhooks,
    retry: dcflow_core::RetryPolicy,
    /// Event kinds besides uploads that some workflow takes.
    other_kinds: std::collections::BTreeSet<EventKind>,
    /// Finished steps per event (only with `[[workflow]]` rules).
    state: Option<StateStore>,
    catalogs: HashMap<PathBuf, Catalog>,
    producers: HashMap<String, TopicProducer>,
    selector: Selector,
    /// Reads dismissed by [`Pipeline::dismisses`] and not yet counted.
    dismissed_reads: AtomicU32,
    engine: Engine,
    success: RecordFile,
    failed: RecordFile,
    permits: Arc<Semaphore>,
    max_downloads: usize,
    seen: Mutex<SeenMap>,
    destinations: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    dead_letters: Option<TopicProducer>,
    /// Cancelled when an outcome cannot be recorded: the sources stop taking events.
    halt: tokio_util::sync::CancellationToken,
    halt_reason: Mutex<Option<String>>,
    pub stats: Stats,
    /// Copies in flight and recent results, for the status page.
    pub activity: Activity,
}

/// The dead-letter message: the original event (as JSON where it parses, else as text),
/// the error, the attempts, and where it came from. `dcflow retry --dead-letters` re-runs it.
pub fn dead_letter(record: &Record, raw: &[u8], origin: &str) -> Vec<u8> {
    let event = serde_json::from_slice::<serde_json::Value>(raw)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(raw).into_owned()));
    let letter = serde_json::json!({
        "time": record.time.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        "pnfsid": record.pnfsid,
        "billingPath": record.billing_path,
        "destination": record.destination,
        "error": record.error,
        "attempts": record.attempts,
        "origin": origin,
        "event": event,
    });
    serde_json::to_vec(&letter).expect("JSON")
}

/// An upload that passed selection, with the permit that lets it run.
/// The file an event is about: an upload, or a remove, restore or store.
#[derive(Debug, Clone)]
struct Subject {
    kind: EventKind,
    /// Which message said so (`pool`, `door`, `srm`...), for logs.
    signal: &'static str,
    /// The file may not be visible at its billing path yet (dCache #5285).
    awaits_commit: bool,
    /// Written before the commit (not the SRM `putDone` that follows it): kept apart from
    /// the messages of the same file that follow the commit, see [`SeenKey`].
    precedes_commit: bool,
    pnfsid: PnfsId,
    billing_path: String,
    size: Option<u64>,
}

pub struct Task {
    upload: Subject,
    mapped: dcflow_core::Mapped,
    /// The matching workflows (indices into the pipeline's list).
    workflows: Vec<usize>,
    facts: Facts,
    /// The billing message, for the dead-letter topic.
    raw: Vec<u8>,
    origin: String,
    /// Set to "recorded" and dropped when the copy ends: wakes the messages merged into it.
    ended: watch::Sender<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Pipeline {
    /// Loads credentials, builds the HTTPS client and opens the record files.
    pub fn try_new(config: &Config) -> Result<Self> {
        let creds = Arc::new(Credentials::load(&config.local.auth).context("loading credentials")?);
        let webhooks = Webhooks::try_new(&creds).context("building the webhook client")?;
        let engine = Engine::try_new(EngineSettings::from_config(config), creds)?;
        let dead_letters = match config
            .kafka
            .as_ref()
            .and_then(|k| Some((k, k.dead_letter_topic.as_deref()?)))
        {
            Some((kafka, topic)) => Some(
                TopicProducer::try_new(kafka, topic)
                    .context("creating the dead-letter producer")?,
            ),
            None => None,
        };
        let mapper = PathMapper::new(&config.dcache, config.local.download_folder.clone());
        let workflows = config.workflows();
        let other_kinds: std::collections::BTreeSet<EventKind> = workflows
            .iter()
            .flat_map(|w| w.matcher.kinds.iter().copied())
            .filter(|k| *k != EventKind::Upload)
            .collect();
        let msg_types: Vec<&'static str> = other_kinds.iter().map(|k| k.as_str()).collect();
        let state = if config.workflow_rules.is_empty() {
            None
        } else {
            Some(StateStore::open(&config.local.state_file)?)
        };
        let mut catalogs = HashMap::new();
        let mut producers = HashMap::new();
        for step in workflows.iter().flat_map(|w| &w.steps) {
            match step {
                Step::Catalog { database } if !catalogs.contains_key(database) => {
                    catalogs.insert(database.clone(), Catalog::open(database)?);
                }
                Step::Produce { topic, .. } if !producers.contains_key(topic) => {
                    let kafka = config.kafka.as_ref().context("produce needs [kafka]")?;
                    producers.insert(
                        topic.clone(),
                        TopicProducer::try_new(kafka, topic)
                            .with_context(|| format!("creating the producer for {topic}"))?,
                    );
                }
                _ => {}
            }
        }
        Ok(Self {
            selector: Selector::new(mapper.prefix()).also(&msg_types),
            dismissed_reads: AtomicU32::new(0),
            other_kinds,
            state,
            catalogs,
            producers,
            mapper,
            workflows,
            explicit_workflows: !config.workflow_rules.is_empty(),
            webhooks,
            retry: config.dcache.retry,
            engine,
            success: RecordFile::open(&config.local.success_file)?,
            failed: RecordFile::open(&config.local.failed_file)?,
            permits: Arc::new(Semaphore::new(config.dcache.max_downloads.get())),
            max_downloads: config.dcache.max_downloads.get(),
            seen: Mutex::new(SeenMap::new(REMEMBER_FINISHED)),
            destinations: Mutex::default(),
            dead_letters,
            halt: Default::default(),
            halt_reason: Mutex::default(),
            stats: Stats::default(),
            activity: Activity::default(),
        })
    }

    /// The HTTPS engine (for the SSE source's requests to dCache).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Billing path → source URL and destination.
    pub fn mapper(&self) -> &PathMapper {
        &self.mapper
    }

    /// `maxdownloads`: transfer slots in all.
    pub fn max_downloads(&self) -> usize {
        self.max_downloads
    }

    /// Transfer slots free now.
    pub fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }

    /// Returns once a transfer slot is free, without taking it (the single admitting loop
    /// takes it in [`Pipeline::admit`]).
    pub async fn wait_for_slot(&self) {
        drop(
            self.permits
                .acquire()
                .await
                .expect("semaphore never closed"),
        );
    }

    /// A child of `shutdown` that is also cancelled when the pipeline halts: a source loop
    /// selects on it, so that a record that cannot be written stops consuming as a stop
    /// signal does.
    pub fn stop_token(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> tokio_util::sync::CancellationToken {
        let stop = shutdown.child_token();
        let (halted, child) = (self.halt.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = halted.cancelled() => child.cancel(),
                _ = child.cancelled() => {}
            }
        });
        stop
    }

    /// Why the pipeline halted, if it did.
    pub fn halted(&self) -> Option<String> {
        self.halt_reason.lock().expect("halt lock").clone()
    }

    fn halt_for(&self, why: String) {
        error!(
            "RECORD_FAILED {why}: no further events are taken, and none is acknowledged past \
             this one (it is delivered again after a restart)"
        );
        self.halt_reason
            .lock()
            .expect("halt lock")
            .get_or_insert(why);
        self.activity.set_ready(false);
        self.halt.cancel();
    }

    /// Makes every record written so far durable; sources call it before they acknowledge
    /// events (a Kafka commit, the SSE state file). An error halts the pipeline.
    pub fn sync_records(&self) -> Result<(), String> {
        self.success
            .sync()
            .and_then(|()| self.failed.sync())
            .map_err(|e| {
                let why = e.to_string();
                self.halt_for(why.clone());
                why
            })
    }

    pub fn success_file(&self) -> &Path {
        self.success.path()
    }
    pub fn failed_file(&self) -> &Path {
        self.failed.path()
    }

    /// The cheap first look ([`Selector::first_look`]): true for a message that cannot
    /// concern the handled folder, or that reads a file in it; the others go to
    /// [`Pipeline::admit`]. Count the dismissed ones with [`Pipeline::dismissed`].
    pub fn dismisses(&self, raw: &[u8]) -> bool {
        match self.selector.first_look(raw) {
            Some(Glance::NotUpload) => {
                self.dismissed_reads.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// `count` messages were dismissed by [`Pipeline::dismisses`]: counted as reads (not
    /// uploads) or as outside the folder.
    pub fn dismissed(&self, count: u32) {
        let reads = self.dismissed_reads.swap(0, Ordering::Relaxed).min(count);
        self.stats.events.inc_by(count.into());
        self.stats.not_upload.inc_by(reads.into());
        self.stats.outside_folder.inc_by((count - reads).into());
    }

    /// Decodes and selects one raw message. Returns a task to run, or `None` when the message
    /// was skipped or recorded. Waits for a free transfer slot before returning a task.
    ///
    /// `origin` (where the message came from, for logs and records) is formatted only when
    /// it is needed: most messages are dismissed without it.
    pub async fn admit(&self, raw: &[u8], origin: &(impl std::fmt::Display + ?Sized)) -> Admission {
        Stats::inc(&self.stats.events);
        // Most billing traffic is dismissed on its type and path alone.
        let msg = match self.selector.sort(raw) {
            Ok(Sorted::Candidate(msg)) => msg,
            Ok(Sorted::Skip(Glance::Outside)) => {
                Stats::inc(&self.stats.outside_folder);
                return Admission::Skip;
            }
            Ok(Sorted::Skip(_)) => {
                Stats::inc(&self.stats.not_upload);
                return Admission::Skip;
            }
            Err(e) => return self.reject_malformed(raw, &origin.to_string(), e).await,
        };
        let upload = match msg.upload() {
            Ok(u) => Subject {
                kind: EventKind::Upload,
                signal: u.signal.as_str(),
                awaits_commit: u.awaits_commit(),
                precedes_commit: u.precedes_commit(),
                pnfsid: u.pnfsid,
                billing_path: u.billing_path,
                size: u.size,
            },
            Err(why) => match self.other_event(&msg) {
                Some(subject) => subject,
                None => {
                    Stats::inc(&self.stats.not_upload);
                    debug!(
                        %origin,
                        msg_type = msg.msg_type.as_str(),
                        reason = why.reason(),
                        "not an upload: skipped"
                    );
                    return Admission::Skip;
                }
            },
        };
        let mapped = match self.mapper.map(&upload.billing_path) {
            Ok(Some(m)) => m,
            Ok(None) => {
                Stats::inc(&self.stats.outside_folder);
                debug!(%origin, path = %upload.billing_path, "outside {}: skipped", self.mapper.prefix());
                return Admission::Skip;
            }
            Err(escape) => {
                Stats::inc(&self.stats.selected);
                Stats::inc(&self.stats.failed);
                error!(pnfsid = %upload.pnfsid, %origin, "refused: {escape}");
                let record = Record {
                    pnfsid: upload.pnfsid.to_string(),
                    billing_path: upload.billing_path.clone(),
                    size: upload.size,
                    error: escape.to_string(),
                    ..Default::default()
                };
                return match self.fail(record, raw, &origin.to_string()).await {
                    Ok(()) => Admission::Skip,
                    Err(Unrecorded) => Admission::Unrecorded,
                };
            }
        };
        let facts = Facts {
            storage_info: msg.storage_info.clone(),
            owner: msg.owner.clone(),
            uid: msg.mapped_uid,
        };
        let rel = mapped.rel.join("/");
        let rule_facts = dcflow_core::workflow::Facts {
            kind: upload.kind,
            billing_path: &upload.billing_path,
            rel: Some(&rel),
            size: upload.size,
            storage_info: facts.storage_info.as_deref(),
            owner: facts.owner.as_deref(),
            uid: facts.uid,
        };
        let workflows: Vec<usize> = (0..self.workflows.len())
            .filter(|&i| self.workflows[i].matcher.matches(&rule_facts))
            .collect();
        if workflows.is_empty() {
            Stats::inc(&self.stats.unmatched);
            debug!(%origin, path = %upload.billing_path, "no workflow matches: skipped");
            return Admission::Skip;
        }
        let ended = {
            let mut seen = self.seen.lock().expect("seen lock");
            let key = (upload.kind, upload.pnfsid.clone(), upload.precedes_commit);
            match seen.get(&key).cloned() {
                Some(Seen::InFlight(copy_running)) => {
                    Stats::inc(&self.stats.duplicates);
                    debug!(pnfsid = %upload.pnfsid, signal = upload.signal, "same event being handled: merged");
                    return Admission::Merged(Merged(copy_running));
                }
                // The door's and the pool's message of one upload: whichever comes second
                // finds the first one's outcome. A failure is recorded once per delivery; it is
                // re-run by `dcflow retry`, not by its twin message.
                Some(Seen::Done) | Some(Seen::Failed) => {
                    Stats::inc(&self.stats.duplicates);
                    debug!(pnfsid = %upload.pnfsid, signal = upload.signal, "same event already handled");
                    return Admission::Skip;
                }
                _ => {
                    let (ended, copy_running) = watch::channel(false);
                    seen.start(&key, copy_running);
                    ended
                }
            }
        };
        Stats::inc(&self.stats.selected);
        let tag = match upload.kind {
            EventKind::Upload => "UPLOAD",
            EventKind::Remove => "REMOVE",
            EventKind::Restore => "RESTORE",
            EventKind::Store => "STORE",
        };
        info!(
            pnfsid = %upload.pnfsid,
            %origin,
            signal = upload.signal,
            size = upload.size,
            "{tag} {} ({})",
            upload.billing_path,
            upload.size.map(human_bytes).unwrap_or_else(|| "size unknown".into())
        );
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        Admission::Run(Box::new(Task {
            upload,
            mapped,
            workflows,
            facts,
            raw: raw.to_vec(),
            origin: origin.to_string(),
            ended,
            _permit: permit,
        }))
    }

    /// Copies one admitted file and records the outcome. `Err` when the outcome could not be
    /// recorded: the event must then not be acknowledged.
    pub async fn run(self: &Arc<Self>, task: Box<Task>) -> Result<FileOutcome, Unrecorded> {
        let span = tracing::info_span!("file", pnfsid = %task.upload.pnfsid);
        self.run_inner(task).instrument(span).await
    }

    async fn run_inner(&self, task: Box<Task>) -> Result<FileOutcome, Unrecorded> {
        let Task {
            upload,
            mapped,
            workflows,
            facts,
            raw,
            origin,
            ended,
            _permit,
        } = *task;
        let mut outcome: Result<Option<FileOutcome>, Unrecorded> = Ok(None);
        for i in workflows {
            let wf = &self.workflows[i];
            let span = tracing::info_span!("workflow", workflow = %wf.name);
            let o = self
                .run_workflow(wf, &upload, &mapped, &facts, &raw, &origin)
                .instrument(span)
                .await;
            outcome = match (outcome, o) {
                (Ok(prev), Ok(o)) => Ok(Some(prev.map_or(o, |p| p.and(o)))),
                _ => Err(Unrecorded),
            };
        }
        let outcome = outcome.map(|o| o.unwrap_or(FileOutcome::Done));
        let state = match outcome {
            Ok(FileOutcome::Failed) | Err(Unrecorded) => Seen::Failed,
            Ok(_) => Seen::Done,
        };
        self.mark(
            &(upload.kind, upload.pnfsid.clone(), upload.precedes_commit),
            state,
        );
        ended.send_replace(outcome.is_ok());
        outcome
    }

    /// Runs one workflow's steps in order for one upload. The first step that fails (after
    /// its attempts) ends the workflow for this event and is recorded, naming the step.
    async fn run_workflow(
        &self,
        wf: &Workflow,
        upload: &Subject,
        mapped: &Mapped,
        facts: &Facts,
        raw: &[u8],
        origin: &str,
    ) -> Result<FileOutcome, Unrecorded> {
        let mut ctx = StepContext::default();
        ctx.set("path", &upload.billing_path);
        ctx.set("rel", mapped.rel.join("/"));
        ctx.set("name", mapped.rel.last().cloned().unwrap_or_default());
        ctx.set("pnfsid", upload.pnfsid.as_str());
        if let Some(size) = upload.size {
            ctx.set("size", size.to_string());
        }
        ctx.set("kind", upload.kind.as_str());
        ctx.set("workflow", &wf.name);
        ctx.set("source_url", mapped.source_url.as_str());
        if let Some(v) = &facts.storage_info {
            ctx.set("storageclass", v.split('@').next().unwrap_or(v));
        }
        if let Some(v) = &facts.owner {
            ctx.set("owner", v);
        }
        if let Some(v) = facts.uid {
            ctx.set("uid", v.to_string());
        }
        let mut record = Record {
            pnfsid: upload.pnfsid.to_string(),
            billing_path: upload.billing_path.clone(),
            source_url: mapped.source_url.to_string(),
            size: upload.size,
            ..Default::default()
        };
        let started = Instant::now();
        let deletes_source = wf.steps.iter().any(|s| matches!(s, Step::DeleteSource));
        let mut outcome = FileOutcome::Done;
        let mut verified_copy = false;
        // Steps already finished for this event (an earlier delivery, `dcflow retry`).
        let state_key = match upload.kind {
            EventKind::Upload => upload.pnfsid.to_string(),
            other => format!("{}:{}", other.as_str(), upload.pnfsid.as_str()),
        };
        let mut resume_at = 0;
        if let Some(state) = &self.state {
            match state.progress(&state_key, &wf.name).await {
                Ok(p) if p.done >= wf.steps.len() => {
                    info!(
                        "WORKFLOW_DONE {} already, for {}: nothing to do",
                        wf.name, upload.billing_path
                    );
                    return Ok(FileOutcome::AlreadyPresent);
                }
                Ok(p) if p.done > 0 => {
                    info!(
                        resume_at = p.done + 1,
                        "WORKFLOW {} resumes at step {} for {}",
                        wf.name,
                        p.done + 1,
                        upload.billing_path
                    );
                    resume_at = p.done;
                    ctx.restore(&p.context);
                    verified_copy = wf.steps[..p.done]
                        .iter()
                        .any(|s| matches!(s, Step::Copy { .. }));
                    if let Some(local) = ctx.values.get("local_path") {
                        record.destination = local.clone();
                    }
                    if let Some(sum) = ctx.values.get("checksum") {
                        record.checksum = sum.clone();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Without its state a workflow still runs, from the start: at least once.
                    warn!(error = %e, "cannot read the workflow state; running every step");
                }
            }
        }
        for (j, step) in wf.steps.iter().enumerate().skip(resume_at) {
            let label = format!("{} step {} ({})", wf.name, j + 1, step.kind());
            let result: Result<(), (String, u32)> = match step {
                Step::Copy { destination } => {
                    match self
                        .copy_step(upload, mapped, destination.as_ref(), deletes_source, &mut ctx, &mut record)
                        .await
                    {
                        Ok(o) => {
                            outcome = o;
                            verified_copy = true;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Step::DeleteSource if !verified_copy => Err((
                    "no verified copy in this workflow: the source is kept".into(),
                    0,
                )),
                Step::DeleteSource => retrying(&label, wf.attempts, &self.retry, || async {
                    // The copy is checked again now, not trusted from a record: a workflow
                    // resumed at this step, or a local file changed since, keeps its source.
                    let local = ctx.values.get("local_path").map(PathBuf::from).ok_or_else(|| {
                        StepError::fatal("no local copy in this workflow: the source is kept")
                    })?;
                    match self.engine.check_local(&mapped.source_url, &local).await {
                        Ok(dcflow_transfer::LocalCopy::Matches(_)) => {}
                        Ok(dcflow_transfer::LocalCopy::SourceGone) => {
                            info!(source = %mapped.source_url, "DELETE_SOURCE {} already gone", mapped.source_url);
                            return Ok(());
                        }
                        Ok(dcflow_transfer::LocalCopy::Differs(why)) => {
                            return Err(StepError::fatal(format!(
                                "the local copy {} does not match dCache's file ({why}): the source is kept",
                                local.display()
                            )))
                        }
                        Err(e) => {
                            return Err(StepError {
                                message: format!("checking the local copy before deleting: {e}"),
                                retryable: e.is_retryable(),
                            })
                        }
                    }
                    match self.engine.delete(&mapped.source_url).await {
                        Ok(true) => {
                            info!(source = %mapped.source_url, "DELETE_SOURCE {} deleted from dCache", mapped.source_url);
                            Ok(())
                        }
                        Ok(false) => {
                            info!(source = %mapped.source_url, "DELETE_SOURCE {} already gone", mapped.source_url);
                            Ok(())
                        }
                        Err(e) => Err(StepError {
                            message: e.to_string(),
                            retryable: e.is_retryable(),
                        }),
                    }
                })
                .await
                .map(drop)
                .map_err(|(e, n)| (e.message, n)),
                Step::Unpack {
                    destination,
                    format,
                    limits,
                } => self
                    .unpack_step(&mut ctx, destination.as_ref(), *format, *limits)
                    .await
                    .map_err(|e| (e, 1)),
                Step::Produce { topic, key } => {
                    let event: serde_json::Value =
                        serde_json::from_slice(raw).unwrap_or(serde_json::Value::Null);
                    retrying(&label, wf.attempts, &self.retry, || {
                        self.produce_step(&ctx, topic, key, &event)
                    })
                    .await
                    .map(drop)
                    .map_err(|(e, n)| (e.message, n))
                }
                Step::Catalog { database } => {
                    let status = match upload.kind {
                        EventKind::Upload if verified_copy => "present",
                        EventKind::Upload => "announced",
                        EventKind::Remove => "removed",
                        EventKind::Restore => "restored",
                        EventKind::Store => "stored",
                    };
                    let entry = crate::catalog::Entry {
                        workflow: wf.name.clone(),
                        path: upload.billing_path.clone(),
                        local_path: ctx.values.get("local_path").cloned(),
                        size: ctx.values.get("size").and_then(|s| s.parse().ok()),
                        checksum: ctx.values.get("checksum").cloned().filter(|c| !c.is_empty()),
                        pnfsid: upload.pnfsid.to_string(),
                        status: status.into(),
                        first_seen: String::new(),
                        updated: String::new(),
                    };
                    let catalog = self.catalogs.get(database).expect("opened at start");
                    retrying(&label, wf.attempts, &self.retry, || async {
                        catalog
                            .upsert(entry.clone())
                            .await
                            .map_err(|e| StepError::retry(format!("catalog {}: {e:#}", database.display())))
                    })
                    .await
                    .map(drop)
                    .map_err(|(e, n)| (e.message, n))
                }
                Step::Exec {
                    argv,
                    env,
                    timeout,
                    codes,
                } => retrying(&label, wf.attempts, &self.retry, || {
                    steps::exec(&ctx, argv, env, *timeout, codes)
                })
                .await
                .map(drop)
                .map_err(|(e, n)| (e.message, n)),
                Step::Webhook {
                    url,
                    format,
                    headers,
                    token_file,
                    timeout,
                } => {
                    let key = format!("{}-{}-{}", upload.pnfsid.as_str(), wf.name, j + 1);
                    let event: serde_json::Value =
                        serde_json::from_slice(raw).unwrap_or(serde_json::Value::Null);
                    retrying(&label, wf.attempts, &self.retry, || {
                        self.webhooks.post(
                            &ctx,
                            url,
                            *format,
                            headers,
                            token_file.as_deref(),
                            *timeout,
                            &key,
                            &event,
                        )
                    })
                    .await
                    .map(drop)
                    .map_err(|(e, n)| (e.message, n))
                }
            };
            self.stats
                .steps
                .get_or_create(&StepLabel {
                    workflow: wf.name.clone(),
                    step: step.kind().into(),
                    result: if result.is_ok() { "done" } else { "failed" }.into(),
                })
                .inc();
            match result {
                Ok(()) => {
                    if self.explicit_workflows {
                        info!(step = j + 1, kind = step.kind(), "STEP_DONE {label}");
                    }
                    if let Some(state) = &self.state {
                        if let Err(e) = state
                            .finished(&state_key, &wf.name, j + 1, step.kind(), &ctx.values)
                            .await
                        {
                            warn!(error = %e, "cannot record the finished step: a redelivery runs it again");
                        }
                    }
                }
                Err((error, attempts)) => {
                    Stats::inc(&self.stats.failed);
                    record.time = Some(OffsetDateTime::now_utc());
                    record.seconds = started.elapsed().as_secs_f64();
                    if !matches!(step, Step::Copy { .. }) {
                        record.attempts = attempts;
                    }
                    record.error = if self.explicit_workflows {
                        error!(
                            step = j + 1,
                            kind = step.kind(),
                            attempts,
                            "STEP_FAILED {label} after {attempts} attempt(s): {error}"
                        );
                        format!(
                            "workflow {} step {} ({}): {error}",
                            wf.name,
                            j + 1,
                            step.kind()
                        )
                    } else {
                        error
                    };
                    self.activity.ended(Ended {
                        time: OffsetDateTime::now_utc(),
                        workflow: wf.name.clone(),
                        path: upload.billing_path.clone(),
                        ok: false,
                        bytes: 0,
                        seconds: record.seconds,
                        error: record.error.clone(),
                    });
                    self.fail(record, raw, origin).await?;
                    return Ok(FileOutcome::Failed);
                }
            }
        }
        record.time = Some(OffsetDateTime::now_utc());
        if let Err(e) = self.success.append(&record) {
            self.halt_for(format!("cannot write the success record: {e}"));
            return Err(Unrecorded);
        }
        if self.explicit_workflows {
            info!("WORKFLOW_DONE {} for {}", wf.name, upload.billing_path);
        }
        self.activity.ended(Ended {
            time: OffsetDateTime::now_utc(),
            workflow: wf.name.clone(),
            path: upload.billing_path.clone(),
            ok: true,
            bytes: if outcome == FileOutcome::Copied {
                record.size.unwrap_or(0)
            } else {
                0
            },
            seconds: started.elapsed().as_secs_f64(),
            error: String::new(),
        });
        Ok(outcome)
    }

    /// Unpacks the copied archive into its destination (by default the archive's path plus
    /// `.d`), published by one rename; sets `{unpacked}`.
    async fn unpack_step(
        &self,
        ctx: &mut StepContext,
        template: Option<&Template>,
        format: dcflow_core::workflow::ArchiveFormat,
        limits: dcflow_core::workflow::UnpackLimits,
    ) -> Result<(), String> {
        let archive = PathBuf::from(
            ctx.values
                .get("local_path")
                .cloned()
                .ok_or("no copied file to unpack")?,
        );
        let root = self.engine.settings().download_folder.clone();
        let destination = match template {
            Some(t) => {
                let rendered = ctx.render(t).map_err(|e| e.message)?;
                let rel = relative_destination(&rendered).map_err(|why| {
                    format!("destination {rendered:?} escapes the download folder: {why}")
                })?;
                let mut d = root.clone();
                d.extend(&rel);
                d
            }
            None => {
                let mut d = archive.clone().into_os_string();
                d.push(".d");
                PathBuf::from(d)
            }
        };
        let modes = self.engine.settings().permissions;
        let (a, d) = (archive.clone(), destination.clone());
        let result = tokio::task::spawn_blocking(move || {
            crate::unpack::unpack(&a, format, &d, modes.dir_mode, modes.file_mode, limits)
        })
        .await
        .map_err(|e| format!("unpacking: {e}"))?;
        match result {
            Ok(u) if u.already => {
                info!(destination = %destination.display(), "UNPACK already published by an earlier delivery")
            }
            Ok(u) => info!(
                destination = %destination.display(),
                files = u.files,
                bytes = u.bytes,
                "UNPACK {} files ({}) into {}",
                u.files,
                human_bytes(u.bytes),
                destination.display()
            ),
            Err(e) => return Err(format!("unpacking {}: {e}", archive.display())),
        }
        ctx.set("unpacked", destination.display().to_string());
        Ok(())
    }

    /// Publishes the event and context to a Kafka topic and waits for the broker.
    async fn produce_step(
        &self,
        ctx: &StepContext,
        topic: &str,
        key: &Template,
        event: &serde_json::Value,
    ) -> Result<(), StepError> {
        let producer = self
            .producers
            .get(topic)
            .ok_or_else(|| StepError::fatal(format!("no producer for topic {topic}")))?;
        let key = ctx.render(key)?;
        let message = serde_json::json!({
            "workflow": ctx.values.get("workflow"),
            "event": event,
            "context": ctx.as_json(),
        });
        producer
            .send(Some(&key), message.to_string().as_bytes())
            .await
            .map(|(partition, offset)| {
                info!(
                    topic,
                    partition,
                    offset,
                    "PRODUCE to {topic} (partition {partition}, offset {offset})"
                );
            })
            .map_err(|e| StepError::retry(format!("producing to {topic}: {e}")))
    }

    /// The verified copy, its logs and counters; fills `record` and the context's
    /// `local_path` and `checksum`. `Err` holds the error and the attempts made.
    async fn copy_step(
        &self,
        upload: &Subject,
        mapped: &Mapped,
        template: Option<&Template>,
        deletes_source: bool,
        ctx: &mut StepContext,
        record: &mut Record,
    ) -> Result<FileOutcome, (String, u32)> {
        let rel = match template {
            None => mapped.rel.clone(),
            Some(t) => {
                let rendered = ctx.render(t).map_err(|e| (e.message, 0))?;
                relative_destination(&rendered).map_err(|why| {
                    (
                        format!("destination {rendered:?} escapes the download folder: {why}"),
                        0,
                    )
                })?
            }
        };
        let mut destination = self.engine.settings().download_folder.clone();
        destination.extend(&rel);
        record.destination = destination.display().to_string();
        ctx.set("local_path", destination.display().to_string());
        let lock = self.destination_lock(&destination);
        let guard = lock.lock().await;
        // Two dCache files mapped to one destination (a template such as "{name}"): the
        // second would silently replace the first one's copy, and with delete-source both
        // sources would go while one copy survives.
        if let Some(state) = &self.state {
            match state
                .claim(&destination, &upload.billing_path, upload.pnfsid.as_str())
                .await
            {
                Ok(None) => {}
                Ok(Some(other)) => {
                    drop(guard);
                    self.release_destination(&destination, lock);
                    return Err((
                        format!(
                            "destination {} already holds the copy of {other}: {} is not copied over it (does the destination template map two files to one path?)",
                            destination.display(),
                            upload.billing_path
                        ),
                        0,
                    ));
                }
                Err(e) => {
                    drop(guard);
                    self.release_destination(&destination, lock);
                    return Err((
                        format!("cannot claim the destination in the state file: {e:#}"),
                        0,
                    ));
                }
            }
        }
        // A workflow that deletes its sources, delivered again: the file is at its final path
        // (only verified files are ever renamed there) and dCache no longer has it.
        if deletes_source && !upload.awaits_commit {
            let present = std::fs::symlink_metadata(&destination)
                .is_ok_and(|m| m.is_file() && upload.size.is_none_or(|s| s == m.len()));
            if present && matches!(self.engine.exists(&mapped.source_url).await, Ok(false)) {
                drop(guard);
                self.release_destination(&destination, lock);
                Stats::inc(&self.stats.already_present);
                info!(destination = %destination.display(), "COPY_OVER already at its final path, and its source already deleted by this workflow");
                ctx.set("checksum", "");
                return Ok(FileOutcome::AlreadyPresent);
            }
        }
        info!(
            source = %mapped.source_url,
            destination = %destination.display(),
            awaits_commit = upload.awaits_commit,
            "COPY_INIT {} -> {}",
            mapped.source_url,
            destination.display()
        );
        let progress = Arc::new(AtomicU64::new(0));
        let job = Job {
            source: &mapped.source_url,
            rel: &rel,
            destination: &destination,
            expected_size: upload.size,
            progress: Some(&progress),
        };
        let started = Instant::now();
        Stats::inc(&self.stats.transfers_started);
        self.stats.in_flight.inc();
        let id = self.activity.start(Active {
            workflow: ctx.values.get("workflow").cloned().unwrap_or_default(),
            path: upload.billing_path.clone(),
            destination: destination.display().to_string(),
            size: upload.size,
            bytes: progress.clone(),
            started,
        });
        let result = self.engine.copy(&job).await;
        self.activity.stop(id);
        self.stats.in_flight.dec();
        drop(guard);
        self.release_destination(&destination, lock);
        let attempts = match &result {
            Ok(c) => c.attempts,
            Err(f) => f.attempts,
        };
        self.stats
            .retries
            .inc_by(u64::from(attempts.saturating_sub(1)));
        match result {
            Ok(copied) => {
                record.size = Some(copied.size);
                record.checksum = copied
                    .verified
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ");
                record.attempts = copied.attempts;
                record.seconds = copied.elapsed.as_secs_f64();
                ctx.set("checksum", record.checksum.clone());
                ctx.set("size", copied.size.to_string());
                if copied.already_present {
                    Stats::inc(&self.stats.already_present);
                    info!("COPY_REPORT already present, nothing copied");
                    Ok(FileOutcome::AlreadyPresent)
                } else {
                    Stats::inc(&self.stats.copied);
                    self.stats.duration.observe(copied.elapsed.as_secs_f64());
                    self.stats
                        .last_success
                        .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
                    self.stats.bytes.inc_by(copied.size);
                    info!(
                        bytes = copied.size,
                        attempts = copied.attempts,
                        "COPY_REPORT {} copied in {} ms, {:.2} Mbps",
                        human_bytes(copied.size),
                        started.elapsed().as_millis(),
                        mbps(copied.size, started.elapsed())
                    );
                    Ok(FileOutcome::Copied)
                }
            }
            Err(failed) => {
                record.attempts = failed.attempts;
                error!(
                    attempts = failed.attempts,
                    kind = failed.error.kind(),
                    "COPY_REPORT failed after {} attempt(s): {}",
                    failed.attempts,
                    failed.error
                );
                Err((failed.error.to_string(), failed.attempts))
            }
        }
    }

    /// A storage event (SSE) that cannot be used: counted, logged and recorded as a failure,
    /// like a malformed billing message.
    pub async fn reject_malformed_event(
        &self,
        raw: &[u8],
        origin: &str,
        reason: &str,
    ) -> Result<(), Unrecorded> {
        Stats::inc(&self.stats.malformed);
        warn!(
            origin,
            reason, "malformed storage event skipped ({origin}): {reason}"
        );
        let record = Record::malformed_input("storage event", origin, &reason, raw);
        self.fail(record, raw, origin).await
    }

    async fn reject_malformed(&self, raw: &[u8], origin: &str, e: DecodeError) -> Admission {
        Stats::inc(&self.stats.malformed);
        warn!(origin, error = %e, "malformed billing message skipped ({origin}): {e}");
        match self
            .fail(Record::malformed(origin, &e, raw), raw, origin)
            .await
        {
            Ok(()) => Admission::Skip,
            Err(Unrecorded) => Admission::Unrecorded,
        }
    }

    fn mark(&self, key: &SeenKey, state: Seen) {
        self.seen.lock().expect("seen lock").finish(key, state);
    }

    /// A remove, restore or store under the folder that some workflow takes.
    fn other_event(&self, msg: &BillingMessage) -> Option<Subject> {
        use dcflow_core::event::MessageType;
        let kind = match msg.msg_type {
            MessageType::Remove => EventKind::Remove,
            MessageType::Restore => EventKind::Restore,
            MessageType::Store => EventKind::Store,
            _ => return None,
        };
        if !self.other_kinds.contains(&kind) || msg.status.code != 0 {
            return None;
        }
        Some(Subject {
            kind,
            signal: if msg.cell_type.as_deref() == Some("door") {
                "door"
            } else {
                "pool"
            },
            awaits_commit: false,
            precedes_commit: false,
            pnfsid: msg.pnfsid()?.clone(),
            billing_path: msg.billing_path.clone().filter(|p| p.starts_with('/'))?,
            size: msg.file_size.or(msg.hit_file_size),
        })
    }

    /// Records a failure: a row of the failure CSV and, where configured, a message on the
    /// dead-letter topic (awaited, so that the event is acknowledged only once it is there).
    /// `Err` when the failure row could not be written (the pipeline then halts): the event
    /// must not be acknowledged.
    async fn fail(&self, mut record: Record, raw: &[u8], origin: &str) -> Result<(), Unrecorded> {
        record.time.get_or_insert_with(OffsetDateTime::now_utc);
        if let Err(e) = self.failed.append(&record) {
            self.halt_for(format!("cannot write the failure record: {e}"));
            return Err(Unrecorded);
        }
        let Some(dead_letters) = &self.dead_letters else {
            return Ok(());
        };
        let letter = dead_letter(&record, raw, origin);
        let key = (!record.pnfsid.is_empty()).then_some(record.pnfsid.as_str());
        if let Err(e) = dead_letters.send(key, &letter).await {
            error!(error = %e, topic = dead_letters.topic(), "cannot publish the dead letter (the failure CSV has it)");
        }
        Ok(())
    }

    fn destination_lock(&self, dest: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.destinations
            .lock()
            .expect("destinations lock")
            .entry(dest.to_owned())
            .or_default()
            .clone()
    }

    fn release_destination(&self, dest: &Path, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.destinations.lock().expect("destinations lock");
        drop(lock);
        if map.get(dest).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(dest);
        }
    }
}

/// A templated destination, relative to the download folder, checked component by component
/// as billing paths are (no `..`, `.`, empty components, NUL, absolute paths).
fn relative_destination(rendered: &str) -> Result<Vec<String>, &'static str> {
    if rendered.starts_with('/') {
        return Err("an absolute path");
    }
    let mut rel = Vec::new();
    for part in rendered.split('/') {
        match part {
            "" => return Err("an empty component (// or a trailing /)"),
            "." | ".." => return Err("a . or .. component"),
            p if p.contains('\0') => return Err("a NUL byte"),
            p => rel.push(p.to_owned()),
        }
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_uploads_are_remembered_up_to_a_bound() {
        let id = |n: u32| {
            (
                EventKind::Upload,
                PnfsId::parse(&format!("{n:036X}")).unwrap(),
                false,
            )
        };
        let mut seen = SeenMap::new(3);
        let (_running, rx) = watch::channel(false);
        seen.start(&id(0), rx);
        for n in 1..=5 {
            seen.finish(&id(n), Seen::Done);
        }
        assert!(
            matches!(seen.get(&id(0)), Some(Seen::InFlight(_))),
            "in flight is never forgotten"
        );
        assert!(
            seen.get(&id(1)).is_none() && seen.get(&id(2)).is_none(),
            "oldest forgotten"
        );
        assert!((3..=5).all(|n| seen.get(&id(n)).is_some()));
        assert_eq!(seen.map.len(), 4);
    }
}
