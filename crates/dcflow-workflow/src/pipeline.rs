//! The pipeline of one dcflow process: built once from the configuration, shared by every
//! source (a replay file, Kafka, SSE, `retry`). It holds the engine, the workflows, the
//! records and dead letters, the permits (`maxdownloads`) and the halt switch; what it does
//! with a message is in `admission` (decode, select, merge, permit) and `executor` (the
//! steps in order, then one record).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use dcflow_core::workflow::EventKind;
use dcflow_core::{
    Config, Connect, Health, PathMapper, Publish, Record, RecordFile, Selector, Step, Workflow,
};
use dcflow_transfer::{Credentials, Engine};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tracing::error;

use crate::catalog::Catalog;
use crate::seen::{SeenMap, REMEMBER_FINISHED};
use crate::state::StateStore;
use crate::stats::{Activity, Stats};
use crate::steps::webhook::Webhooks;

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
    pub(crate) fn and(self, other: Self) -> Self {
        use FileOutcome::*;
        match (self, other) {
            (Failed, _) | (_, Failed) => Failed,
            (Copied, _) | (_, Copied) => Copied,
            (AlreadyPresent, _) | (_, AlreadyPresent) => AlreadyPresent,
            _ => Done,
        }
    }
}

/// The outcome of an event could not be recorded (a full disk): it must not be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrecorded;

pub struct Pipeline {
    pub(crate) mapper: PathMapper,
    pub(crate) workflows: Vec<Workflow>,
    /// `[[workflow]]` rules are configured (not the implicit copy): steps are logged and
    /// failures name their workflow and step.
    pub(crate) explicit_workflows: bool,
    pub(crate) webhooks: Webhooks,
    /// `[rucio]`'s client, when a workflow has a rucio step.
    pub(crate) rucio: Option<crate::steps::rucio::Rucio>,
    /// The Slurm client, when a workflow has a slurm step.
    pub(crate) slurm: Option<crate::steps::slurm::Slurm>,
    pub(crate) retry: dcflow_core::RetryPolicy,
    /// Event kinds besides uploads that some workflow takes.
    pub(crate) other_kinds: std::collections::BTreeSet<EventKind>,
    /// Finished steps per event (only with `[[workflow]]` rules).
    pub(crate) state: Option<StateStore>,
    pub(crate) catalogs: HashMap<PathBuf, Catalog>,
    pub(crate) producers: HashMap<String, Arc<dyn Publish>>,
    pub(crate) selector: Selector,
    /// Reads dismissed by [`Pipeline::dismisses`] and not yet counted.
    pub(crate) dismissed_reads: AtomicU32,
    pub(crate) engine: Arc<Engine>,
    pub(crate) success: RecordFile,
    pub(crate) failed: RecordFile,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) max_downloads: usize,
    pub(crate) seen: Mutex<SeenMap>,
    pub(crate) destinations: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) dead_letters: Option<Arc<dyn Publish>>,
    /// Cancelled when an outcome cannot be recorded: the sources stop taking events.
    pub(crate) halt: tokio_util::sync::CancellationToken,
    pub(crate) halt_reason: Mutex<Option<String>>,
    pub stats: Stats,
    /// Copies in flight and recent results, for the status page.
    pub activity: Activity,
    /// Whether the brokers, the frontend and the door answer (the sources and the engine
    /// report to it).
    pub health: Arc<Health>,
    /// With `[tape]`: stages files that live on tape before they are read.
    pub stager: Option<crate::tape::Stager>,
    /// What a listing said of a file (`dcflow sync`), by billing path, until its task uses
    /// it: its locality and dCache's checksums, so that no request of its own asks again.
    pub(crate) listed: Mutex<HashMap<String, Listed>>,
}

/// What a listing said of a file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Listed {
    pub(crate) locality: Option<dcflow_transfer::listing::Locality>,
    pub(crate) checksums: Vec<dcflow_transfer::Checksum>,
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

impl Pipeline {
    /// Loads credentials, builds the HTTPS client and opens the record files. `connect`
    /// opens a publisher for a topic (the `produce` steps and `dead_letter_topic`); without
    /// one, a configuration that needs it is refused here.
    pub fn try_new(config: &Config, connect: Option<Connect<'_>>) -> Result<Self> {
        let creds = Arc::new(Credentials::load(&config.local.auth).context("loading credentials")?);
        let webhooks = Webhooks::try_new(&creds).context("building the webhook client")?;
        let rucio = match &config.rucio {
            Some(r) => Some(
                crate::steps::rucio::Rucio::start(r.clone(), &creds)
                    .context("building the Rucio client")?,
            ),
            None => None,
        };
        let health = Arc::new(Health::new(config.outage_grace));
        let engine = Arc::new(
            Engine::try_new(crate::engine_settings(config), creds)?.with_health(health.clone()),
        );
        let open = |topic: &str, what: &str| -> Result<Arc<dyn Publish>> {
            let connect = connect.with_context(|| format!("{what} needs [kafka]"))?;
            connect(topic)
                .map_err(|e| anyhow::anyhow!("creating the {what} producer for {topic}: {e}"))
        };
        let dead_letters = match config
            .kafka
            .as_ref()
            .and_then(|k| k.dead_letter_topic.as_deref())
        {
            Some(topic) => Some(open(topic, "dead-letter")?),
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
                    config.kafka.as_ref().context("produce needs [kafka]")?;
                    producers.insert(topic.clone(), open(topic, "produce")?);
                }
                _ => {}
            }
        }
        let slurm = workflows
            .iter()
            .flat_map(|w| &w.steps)
            .any(|s| matches!(s, Step::Slurm(_)))
            .then(crate::steps::slurm::Slurm::start);
        let stager = config
            .tape
            .clone()
            .map(|t| crate::tape::Stager::start(engine.clone(), t));
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
            rucio,
            slurm,
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
            stager,
            listed: Mutex::default(),
            health,
        })
    }

    /// The HTTPS engine (for the SSE source's requests to dCache).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Keeps what a listing said of the file at `billing_path` until its task uses it.
    /// Bounded: notes that no task takes (a file not selected) do not pile up.
    pub fn note_listed(&self, billing_path: &str, entry: &dcflow_transfer::listing::Entry) {
        let mut listed = self.listed.lock().expect("listed lock");
        if listed.len() >= 100_000 {
            listed.clear();
        }
        listed.insert(
            billing_path.to_owned(),
            Listed {
                locality: entry.locality.clone(),
                checksums: entry.checksums.clone(),
            },
        );
    }

    /// What a listing said of the file, taken (the note is gone after).
    pub(crate) fn take_listed(&self, billing_path: &str) -> Option<Listed> {
        self.listed
            .lock()
            .expect("listed lock")
            .remove(billing_path)
    }

    /// The engine, shared (a walk of the door's listing runs beside the pipeline).
    pub fn engine_arc(&self) -> Arc<Engine> {
        self.engine.clone()
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

    /// `/metrics`: the run's counters and the upstreams' states.
    pub fn encode_metrics(&self) -> String {
        self.stats.set_upstreams(&self.health.states());
        self.stats
            .set_credential_expiries(&self.engine.credentials().expiries());
        self.stats.refresh_process();
        self.stats.set_tape_waiting(
            self.stager
                .as_ref()
                .map_or(0, |s| s.waiting.load(std::sync::atomic::Ordering::Relaxed)),
        );
        if let Some(slurm) = &self.slurm {
            self.stats.set_slurm(&slurm.counts());
        }
        self.stats.encode()
    }

    /// What the status page and `dcflow status` show.
    pub fn status(&self) -> serde_json::Value {
        let mut status = self.activity.snapshot(&self.stats);
        status["upstreams"] = crate::stats::upstreams_json(&self.health.states());
        if let Some(stager) = &self.stager {
            status["counters"]["tape_waiting"] = stager
                .waiting
                .load(std::sync::atomic::Ordering::Relaxed)
                .into();
        }
        if let Some(slurm) = &self.slurm {
            let c = slurm.counts();
            status["slurm"] = serde_json::json!({
                "waiting_for_slot": c.waiting_for_slot,
                "active": c.active,
                "ended": c.ended,
            });
        }
        status
    }

    /// Why the pipeline halted, if it did.
    pub fn halted(&self) -> Option<String> {
        self.halt_reason.lock().expect("halt lock").clone()
    }

    pub(crate) fn halt_for(&self, why: String) {
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

    /// Records a failure: a row of the failure CSV and, where configured, a message on the
    /// dead-letter topic (awaited, so that the event is acknowledged only once it is there).
    /// `Err` when the failure row could not be written (the pipeline then halts): the event
    /// must not be acknowledged.
    pub(crate) async fn fail(
        &self,
        mut record: Record,
        raw: &[u8],
        origin: &str,
    ) -> Result<(), Unrecorded> {
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
        if let Err(e) = dead_letters.publish(key, &letter).await {
            error!(error = %e, topic = dead_letters.topic(), "cannot publish the dead letter (the failure CSV has it)");
        }
        Ok(())
    }
}
