//! dcflow's SSE source: dCache's storage events from its frontend, without Kafka.
//!
//! ```text
//! channel (POST /api/v1/events/channels, or the one in the state file)
//!   ─► inotify subscription per watched directory, and per subdirectory (watches are not
//!      recursive: IN_CREATE+IN_ISDIR subscribes the new directory and lists it)
//!   ─► GET <channel> as text/event-stream, with Last-Event-ID
//!        IN_CLOSE_WRITE / IN_MOVED_TO of a file  ─► HEAD ─► the pipeline (as an upload)
//!        EVENT_LOSS, IN_Q_OVERFLOW, a 404 channel ─► resynchronise: PROPFIND the watched tree
//!   ─► the last event id whose predecessors all finished ─► the state file (atomic rename)
//! ```
//! Reconnects back off from 1 s to 60 s. SSE events carry no pnfsid; dCache's door gives it in
//! each file's `ETag` (`"<pnfsid>_<mtime hash>"`, HEAD and PROPFIND alike), so an event and a
//! resynchronisation that report one file agree (and are merged), and a re-upload of a path
//! (a new file, a new pnfsid) is copied again even with the same size. A door without such an
//! ETag gets a stand-in: a hash of the path, size and ETag or modification time.
//!
//! A resynchronisation that did not finish (a PROPFIND or a subscription failed) is retried
//! with back-off; until one has finished, the saved event id does not move and the state file
//! says one is due, so that a restart resynchronises too. At most `maxdownloads` completed
//! files are looked at (HEAD) at once: a burst of events waits in the stream, not in memory.
//! Every request has a timeout (`stalltimeout`; a PROPFIND, `timeout`); a stream silent for 5
//! minutes is reopened.
//!
//! # Layout
//! ```text
//! lib      run_sse: the loop (channel, subscriptions, stream, resync, commits) and Source
//! client   the frontend's API: channels, inotify subscriptions, the event stream
//! listing  the door's WebDAV listing (PROPFIND) and the upload message of a listed file
//! state    the state file: channel, last event id, a resynchronisation due
//! ```
//! The source feeds the pipeline as the Kafka source does: `Pipeline::admit`, then
//! `Pipeline::run`, with contiguous watermarks deciding what may be saved.

mod client;
mod listing;
mod state;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dcflow_core::config::SseConfig;
use dcflow_core::{Ticket, Upstream, Watermarks};
use reqwest::Method;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use dcflow_workflow::{Admission, Pipeline, Summary};

use dcflow_transfer::listing::Entry;
use listing::upload_message;
use state::{load, save, Saved};

const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// dCache's frontend sends nothing on a quiet channel (no keep-alive comments): after this
/// long without a byte the stream is reopened with `Last-Event-ID`, which costs nothing, so
/// that a frontend that hangs with the connection open is noticed.
const STREAM_IDLE: Duration = Duration::from_secs(300);

/// The source's state shared with the tasks that handle events.
struct Source {
    pipeline: Arc<Pipeline>,
    cfg: SseConfig,
    /// Namespace root served by the door (`[dcache] pool`) and the door URL.
    pool: String,
    door: Url,
    watermarks: Mutex<Watermarks>,
    /// One per completed file being looked at (HEAD, then admission): `maxdownloads`.
    slots: Arc<tokio::sync::Semaphore>,
    /// A resynchronisation is due or under way: the saved event id does not move.
    resync_pending: std::sync::atomic::AtomicBool,
}

/// What [`Source::admit`] made of an event.
enum Admitted {
    Work(std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>),
    Nothing,
    /// Its failure could not be recorded: not to be acknowledged.
    Unrecorded,
}

/// Why the stream ended.
enum Ended {
    Stop,
    /// The channel is gone (404): create a new one, subscribe, resynchronise.
    ChannelGone,
    /// A network error or the server closed the stream: reconnect with Last-Event-ID.
    Reconnect(String),
    /// A resynchronisation or a subscription failed: subscribe the whole tree again (existing
    /// subscriptions are kept by dCache) and resynchronise, after a back-off.
    Resubscribe(String),
}

// Long on purpose: the source's state machine (channel, subscribe, resynchronise, stream, back
// off) in one loop, so that every transition is visible in one place.
///
/// With `resync_first` (`dcflow sync --then-follow`), the tree is listed once the channel is
/// subscribed, before its events are followed: a file uploaded during the listing is handled
/// once (the listing and its event are merged by pnfsid), not missed.
pub async fn run_sse(
    pipeline: Arc<Pipeline>,
    cfg: &SseConfig,
    door: Url,
    pool: String,
    shutdown: CancellationToken,
    drain: Duration,
    resync_first: bool,
) -> Result<Summary> {
    // [sse] paths are under pool + folder: the configuration checks it (sse.paths[i]).
    let source = Arc::new(Source {
        pipeline: pipeline.clone(),
        cfg: cfg.clone(),
        pool,
        door,
        watermarks: Mutex::default(),
        slots: Arc::new(tokio::sync::Semaphore::new(pipeline.max_downloads())),
        resync_pending: Default::default(),
    });
    // A record that cannot be written stops the source, as a stop signal does.
    let shutdown = pipeline.stop_token(&shutdown);
    *pipeline.activity.source.lock().expect("activity lock") = format!(
        "dCache storage events at {} ({} watched)",
        cfg.url,
        cfg.paths.join(", ")
    );
    let mut saved = load(&cfg.state_file);
    if let Some(c) = saved.channel.clone() {
        // The state file could name any host: only a channel of the configured frontend.
        if Url::parse(&c).map_or(true, |u| u.origin() != cfg.url.origin()) {
            warn!(channel = %c, frontend = %cfg.url, "the saved channel is not on the configured frontend: creating a new one");
            saved.channel = None;
            saved.resync_pending = true;
        }
    }
    source.watermarks.lock().expect("lock").assign(0);
    let mut tasks: JoinSet<()> = JoinSet::new();
    // Subscription URL → watched directory (namespace path).
    let mut subscriptions: BTreeMap<String, String> = BTreeMap::new();
    let mut backoff = Duration::from_secs(1);
    // A resynchronisation that a previous run did not finish.
    let mut needs_resync = saved.resync_pending || resync_first;
    // The highest event id received on this channel: a reconnect asks for what follows it
    // (events received but still being handled are not asked for again). The saved id, for a
    // restart, is the highest id whose predecessors all finished.
    let mut received: Option<u64> = saved.last_event_id;
    'outer: while !shutdown.is_cancelled() {
        // A channel: the saved one if it still exists, else a new one.
        let channel = match &saved.channel {
            Some(c) if subscriptions.is_empty() => {
                match source
                    .subscribe_tree(c, &cfg.paths, &mut subscriptions)
                    .await
                {
                    Ok(()) => c.clone(),
                    Err(e) if e.to_string().contains("404") => {
                        info!(channel = %c, "the saved channel is gone: creating a new one");
                        saved = Saved::default();
                        continue;
                    }
                    Err(e) => {
                        source.unreachable("cannot subscribe", &e, backoff);
                        sleep_or_stop(&shutdown, &mut backoff).await;
                        continue;
                    }
                }
            }
            Some(c) => c.clone(),
            None => match source.create_channel().await {
                Ok(c) => {
                    subscriptions.clear();
                    if let Err(e) = source
                        .subscribe_tree(&c, &cfg.paths, &mut subscriptions)
                        .await
                    {
                        source.unreachable("cannot subscribe", &e, backoff);
                        sleep_or_stop(&shutdown, &mut backoff).await;
                        continue;
                    }
                    // A new channel starts at id 0: earlier ids mean nothing any more.
                    let mut w = source.watermarks.lock().expect("lock");
                    w.revoke(0);
                    w.assign(0);
                    drop(w);
                    saved = Saved {
                        channel: Some(c.clone()),
                        last_event_id: None,
                        resync_pending: true,
                    };
                    received = None;
                    save(&cfg.state_file, &saved)?;
                    needs_resync = true;
                    c
                }
                Err(e) => {
                    source.unreachable("cannot create an event channel", &e, backoff);
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    continue;
                }
            },
        };
        if needs_resync {
            // Files that arrived while nothing was listening (or whose events were lost).
            source.mark_resync_pending(&mut saved);
            match source.resync(&cfg.paths, &shutdown).await {
                Ok(()) => {
                    source.resync_done(&mut saved);
                    needs_resync = false;
                }
                Err(e) => {
                    warn!(error = %e, "resynchronisation did not finish; retrying in {} s (the saved event id waits for it)", backoff.as_secs());
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    continue;
                }
            }
        }
        let ended = source
            .stream(
                &channel,
                &mut received,
                &mut subscriptions,
                &mut tasks,
                &mut saved,
                &mut needs_resync,
                &shutdown,
            )
            .await;
        match ended {
            Ended::Stop => break 'outer,
            Ended::ChannelGone => {
                dcflow_workflow::Stats::inc(&pipeline.stats.sse_reconnects);
                warn!(%channel, "the event channel is gone (404): creating a new one, then resynchronising");
                saved = Saved::default();
                subscriptions.clear();
                backoff = Duration::from_secs(1);
            }
            Ended::Reconnect(why) => {
                dcflow_workflow::Stats::inc(&pipeline.stats.sse_reconnects);
                // An outage is told once, by Health; a stream that just ended is told here.
                if pipeline.health.is_down(Upstream::Frontend) {
                    debug!(why, last_event_id = ?received, "event stream ended; reconnecting in {} s", backoff.as_secs());
                } else {
                    warn!(why, last_event_id = ?received, "event stream ended; reconnecting in {} s", backoff.as_secs());
                }
                // Without an id to resume from, dCache replays nothing: list instead.
                needs_resync |= received.is_none() || source.is_resync_pending();
                sleep_or_stop(&shutdown, &mut backoff).await;
            }
            Ended::Resubscribe(why) => {
                warn!(
                    why,
                    "resubscribing the watched tree and resynchronising in {} s",
                    backoff.as_secs()
                );
                subscriptions.clear();
                needs_resync = true;
                sleep_or_stop(&shutdown, &mut backoff).await;
            }
        }
    }
    info!(
        in_flight = tasks.len(),
        "stopping: no new events; letting transfers finish"
    );
    let drained =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!("drain deadline reached: unfinished events are delivered again at the next start");
        tasks.shutdown().await;
    }
    source.commit(&mut saved)?;
    info!(last_event_id = ?saved.last_event_id, "final state saved");
    if let Some(why) = pipeline.halted() {
        bail!(
            "stopped because an outcome could not be recorded ({why}); the saved event id did \
             not pass it: free the space (or fix the record folder) and start again"
        );
    }
    Ok(Summary::of(&pipeline.stats))
}

async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = shutdown.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(60));
}

impl Source {
    /// A request to the frontend failed: an outage of the frontend when no answer came (told
    /// once, by Health), else a warning.
    fn unreachable(&self, what: &str, e: &anyhow::Error, backoff: Duration) {
        let answered = e.chain().any(|c| {
            c.downcast_ref::<reqwest::Error>()
                .is_some_and(|r| r.is_status())
        }) || !e.chain().any(|c| c.is::<reqwest::Error>());
        if answered {
            warn!(error = %format!("{e:#}"), "{what}; retrying in {} s", backoff.as_secs());
        } else {
            let why = e
                .chain()
                .find_map(|c| c.downcast_ref::<reqwest::Error>())
                .map(|r| format!("{what}: {}", dcflow_core::text::causes(r)))
                .unwrap_or_else(|| format!("{what}: {e:#}"));
            self.pipeline.health.down(Upstream::Frontend, &why);
        }
    }

    /// A request to the frontend or the door (channel, subscription, HEAD), bounded by
    /// `[dcache] stalltimeout`.
    fn api(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let limit = self.pipeline.engine().settings().stall_timeout;
        self.pipeline.engine().api(method, url).timeout(limit)
    }

    fn is_resync_pending(&self) -> bool {
        self.resync_pending
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Events were lost: until a resynchronisation finishes, the saved event id stays, and the
    /// state file says that one is due (a restart then resynchronises as well).
    fn mark_resync_pending(&self, saved: &mut Saved) {
        self.resync_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !saved.resync_pending {
            saved.resync_pending = true;
            if let Err(e) = save(&self.cfg.state_file, saved) {
                warn!(error = %e, "cannot save the SSE state");
            }
        }
    }

    fn resync_done(&self, saved: &mut Saved) {
        self.resync_pending
            .store(false, std::sync::atomic::Ordering::SeqCst);
        saved.resync_pending = false;
        // The cleared flag goes to the state file now, with whatever id has advanced.
        if let Err(e) = self
            .commit(saved)
            .and_then(|()| save(&self.cfg.state_file, saved))
        {
            warn!(error = %e, "cannot save the SSE state");
        }
    }

    /// Lists the trees below `roots` and sends every file through the pipeline, which copies
    /// what the destination lacks or holds with another size or checksum (a file whose
    /// workflow is done for its pnfsid costs a look at the state file; one that is present
    /// costs a HEAD and a checksum of the local copy); waits for them. `Err` when a listing
    /// failed, or an outcome could not be recorded: the caller retries the whole
    /// resynchronisation (what it already did is found done).
    async fn resync(&self, roots: &[String], shutdown: &CancellationToken) -> Result<()> {
        let started = Instant::now();
        dcflow_workflow::Stats::inc(&self.pipeline.stats.sse_resyncs);
        let mut tasks: JoinSet<bool> = JoinSet::new();
        let mut listed = 0u64;
        let mut failed = None;
        'roots: for root in roots {
            let url = self.door_url(root)?;
            // The walk of `dcflow sync`: streamed, level by level, beside the copies.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Entry>(1024);
            let engine = self.pipeline.engine_arc();
            let walker =
                tokio::spawn(
                    async move { dcflow_transfer::listing::walk(&engine, &url, tx).await },
                );
            while let Some(entry) = rx.recv().await {
                if shutdown.is_cancelled() {
                    failed.get_or_insert_with(|| "stopped before it finished".to_owned());
                    walker.abort();
                    break 'roots;
                }
                let Some(ns) = self.ns_path(&entry).filter(|_| !entry.is_dir) else {
                    continue;
                };
                if entry.being_written() {
                    // The subscription is in place before the listing: its close event comes
                    // when the upload ends. Copied now it would fail (dCache answers 500),
                    // and that failure would make the event a duplicate, skipped.
                    info!(path = %ns, "listed without a size: still being uploaded, left for its storage event");
                    continue;
                }
                listed += 1;
                let raw = upload_message(&ns, &entry);
                match self.admit(&raw, &format!("resync of {root}")).await {
                    Admitted::Work(task) => {
                        tasks.spawn(task);
                    }
                    Admitted::Nothing => {}
                    Admitted::Unrecorded => {
                        failed = Some("an outcome could not be recorded".into());
                        walker.abort();
                        break 'roots;
                    }
                }
            }
            match walker.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(root, error = %e, "cannot list for resynchronisation");
                    failed = Some(format!("listing {root}: {e}"));
                    break;
                }
                Err(e) => {
                    failed = Some(format!("listing {root}: {e}"));
                    break;
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            if !done.unwrap_or(false) {
                failed.get_or_insert_with(|| "an outcome could not be recorded".into());
            }
        }
        info!(
            listed,
            seconds = started.elapsed().as_secs(),
            finished = failed.is_none(),
            "resynchronised: {listed} listed files went through the workflows"
        );
        match failed {
            None => Ok(()),
            Some(why) => bail!(
                "resynchronisation of {} incomplete: {why}",
                roots.join(", ")
            ),
        }
    }

    /// Admits one synthesised upload message: the work to run (true once its outcome is
    /// recorded), if any.
    async fn admit(&self, raw: &[u8], origin: &str) -> Admitted {
        match self.pipeline.admit(raw, origin).await {
            Admission::Run(task) => {
                let p = self.pipeline.clone();
                Admitted::Work(Box::pin(async move { p.run(task).await.is_ok() }))
            }
            Admission::Merged(m) => Admitted::Work(Box::pin(m.wait())),
            Admission::Skip => Admitted::Nothing,
            Admission::Unrecorded => Admitted::Unrecorded,
        }
    }

    /// A file is complete: HEAD for its size and identity, then the pipeline. True once its
    /// outcome is recorded. The slot is given back once the file is admitted.
    async fn file_complete(
        &self,
        id: u64,
        path: &str,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> bool {
        let mut entry = Entry::default();
        if let Ok(url) = self.door_url(path) {
            match self.api(Method::HEAD, url).send().await {
                // The header, not content_length(): a HEAD response has no body to size.
                Ok(r) if r.status().is_success() => {
                    let header = |name| {
                        r.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    entry.size =
                        header(reqwest::header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
                    entry.etag = header(reqwest::header::ETAG);
                    entry.modified = header(reqwest::header::LAST_MODIFIED);
                }
                Ok(r) => debug!(path, status = %r.status(), "HEAD before copying"),
                Err(e) => debug!(path, error = %e, "HEAD before copying"),
            }
        }
        let raw = upload_message(path, &entry);
        let work = self.admit(&raw, &format!("storage event {id}")).await;
        drop(slot);
        match work {
            Admitted::Work(work) => work.await,
            Admitted::Nothing => true,
            Admitted::Unrecorded => false,
        }
    }

    fn finish(&self, ticket: &Ticket) {
        self.watermarks.lock().expect("lock").finish(ticket);
    }

    /// Saves the id up to which every event has finished, once their records are durable;
    /// not while a resynchronisation is due.
    fn commit(&self, saved: &mut Saved) -> Result<()> {
        if self.is_resync_pending() {
            return Ok(());
        }
        let commits = self.watermarks.lock().expect("lock").pending_commits();
        if let Some(&(_, next)) = commits.first() {
            if next > 0 {
                self.pipeline
                    .sync_records()
                    .map_err(|e| anyhow::anyhow!("not saved, the records are not durable: {e}"))?;
                saved.last_event_id = Some(next as u64 - 1);
                save(&self.cfg.state_file, saved)?;
                self.watermarks.lock().expect("lock").confirm(0, next);
            }
        }
        Ok(())
    }
}
