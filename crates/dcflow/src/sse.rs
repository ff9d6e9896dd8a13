//! `dcflow run` with `[sse]`: dCache's storage events from its frontend, without Kafka.
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

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use dcflow_core::config::SseConfig;
use dcflow_core::{Ticket, Watermarks};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use md5::{Digest, Md5};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use dcflow_workflow::{Admission, Pipeline, Summary};

const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// dCache's frontend sends nothing on a quiet channel (no keep-alive comments): after this
/// long without a byte the stream is reopened with `Last-Event-ID`, which costs nothing, so
/// that a frontend that hangs with the connection open is noticed.
const STREAM_IDLE: Duration = Duration::from_secs(300);

/// What survives a restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Saved {
    channel: Option<String>,
    last_event_id: Option<u64>,
    /// Events were lost and the resynchronisation has not finished yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    resync_pending: bool,
}

fn load(path: &Path) -> Saved {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(path: &Path, saved: &Saved) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(saved)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the folder is.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

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

#[derive(Deserialize)]
struct Envelope {
    event: InotifyEvent,
    subscription: String,
}

#[derive(Deserialize)]
struct InotifyEvent {
    name: Option<String>,
    #[serde(default)]
    mask: Vec<String>,
}

#[derive(Deserialize)]
struct System {
    #[serde(rename = "type")]
    kind: String,
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

pub async fn run_sse(
    pipeline: Arc<Pipeline>,
    cfg: &SseConfig,
    door: Url,
    pool: String,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<Summary> {
    let prefix = pipeline.mapper().prefix().to_owned();
    for p in &cfg.paths {
        if p != &prefix && !p.starts_with(&format!("{prefix}/")) {
            bail!("[sse] paths: {p} is not under pool + folder ({prefix}): its files could not be fetched");
        }
    }
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
    let mut needs_resync = saved.resync_pending;
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
                        warn!(error = %format!("{e:#}"), "cannot subscribe; retrying in {} s", backoff.as_secs());
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
                        warn!(error = %format!("{e:#}"), "cannot subscribe; retrying in {} s", backoff.as_secs());
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
                    warn!(error = %format!("{e:#}"), "cannot create an event channel; retrying in {} s", backoff.as_secs());
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
                warn!(why, last_event_id = ?received, "event stream ended; reconnecting in {} s", backoff.as_secs());
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

    async fn create_channel(&self) -> Result<String> {
        let url = self.cfg.url.join("/api/v1/events/channels")?;
        let resp = self
            .api(Method::POST, url.clone())
            .header("Content-Type", "application/json")
            .body(serde_json::json!({"client-id": self.cfg.client_id}).to_string())
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if resp.status() != StatusCode::CREATED {
            bail!("POST {url}: {}", resp.status());
        }
        let channel = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .context("channel created without a Location")?
            .to_owned();
        let channel_url = Url::parse(&channel).or_else(|_| url.join(&channel))?;
        if channel_url.origin() != url.origin() {
            bail!("the frontend named a channel on another host ({channel_url}): not followed");
        }
        // Keep the channel through longer disconnections than the default 300 s.
        let _ = self
            .api(Method::PATCH, channel_url.clone())
            .header("Content-Type", "application/json")
            .body(serde_json::json!({"timeout": self.cfg.channel_timeout}).to_string())
            .send()
            .await;
        info!(channel = %channel_url, "event channel created");
        Ok(channel_url.to_string())
    }

    /// Subscribes `channel` to the `roots` and every directory below them.
    async fn subscribe_tree(
        &self,
        channel: &str,
        roots: &[String],
        subscriptions: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        let mut queue: VecDeque<String> = roots.iter().cloned().collect();
        while let Some(dir) = queue.pop_front() {
            self.subscribe(channel, &dir, subscriptions).await?;
            for child in self.list(&dir).await? {
                if child.is_dir {
                    queue.push_back(child.path);
                }
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        channel: &str,
        dir: &str,
        subscriptions: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        if subscriptions.values().any(|d| d == dir) {
            return Ok(());
        }
        let url = Url::parse(&format!("{channel}/subscriptions/inotify"))?;
        let resp = self
            .api(Method::POST, url.clone())
            .header("Content-Type", "application/json")
            .body(serde_json::json!({"path": dir}).to_string())
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            bail!("404: no such channel {channel}");
        }
        if status != StatusCode::CREATED && status != StatusCode::SEE_OTHER {
            let text = resp.text().await.unwrap_or_default();
            bail!("subscribing to {dir}: {status} {}", text.trim());
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .context("subscription without a Location")?
            .to_owned();
        debug!(dir, subscription = %location, "subscribed");
        subscriptions.insert(location, dir.to_owned());
        Ok(())
    }

    /// The door URL of a namespace path.
    fn door_url(&self, ns_path: &str) -> Result<Url> {
        let rel = ns_path
            .strip_prefix(&self.pool)
            .with_context(|| format!("{ns_path} is not under {}", self.pool))?;
        let mut url = self.door.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| anyhow::anyhow!("door URL cannot have a path"))?;
            segs.pop_if_empty();
            for part in rel.split('/').filter(|p| !p.is_empty()) {
                segs.push(part);
            }
        }
        Ok(url)
    }

    /// PROPFIND Depth 1: each child, by namespace path.
    async fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let mut url = self.door_url(dir)?;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let resp = self
            .api(Method::from_bytes(b"PROPFIND").expect("method"), url.clone())
            .header("Depth", "1")
            .header("Content-Type", "application/xml")
            .body(r#"<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getcontentlength/><d:getetag/><d:getlastmodified/></d:prop></d:propfind>"#)
            // A listing of many entries takes a while: bounded by the transfer timeout.
            .timeout(self.pipeline.engine().settings().timeout)
            .send()
            .await
            .with_context(|| format!("PROPFIND {url}"))?;
        if resp.status().as_u16() != 207 {
            bail!("PROPFIND {url}: {}", resp.status());
        }
        let xml = resp.text().await?;
        let own = percent_encoding::percent_decode_str(url.path())
            .decode_utf8_lossy()
            .trim_end_matches('/')
            .to_owned();
        let mut out = Vec::new();
        for entry in parse_multistatus(&xml)? {
            let path = percent_encoding::percent_decode_str(&entry.path)
                .decode_utf8_lossy()
                .into_owned();
            // hrefs may be absolute URLs or paths.
            let path = Url::parse(&path)
                .map(|u| u.path().to_owned())
                .unwrap_or(path);
            let trimmed = path.trim_end_matches('/');
            if trimmed == own || trimmed.is_empty() {
                continue;
            }
            let door_base = self.door.path().trim_end_matches('/');
            let rel = trimmed.strip_prefix(door_base).unwrap_or(trimmed);
            out.push(Entry {
                path: format!("{}{}", self.pool, rel),
                ..entry
            });
        }
        Ok(out)
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
        let mut dirs: VecDeque<String> = roots.iter().cloned().collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut tasks: JoinSet<bool> = JoinSet::new();
        let mut listed = 0u64;
        let mut failed = None;
        while let Some(dir) = dirs.pop_front() {
            if shutdown.is_cancelled() {
                failed.get_or_insert_with(|| "stopped before it finished".to_owned());
                break;
            }
            if !seen.insert(dir.clone()) {
                continue;
            }
            let children = match self.list(&dir).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(dir, error = %format!("{e:#}"), "cannot list for resynchronisation");
                    failed = Some(format!("listing {dir}: {e:#}"));
                    break;
                }
            };
            for child in children {
                if child.is_dir {
                    dirs.push_back(child.path);
                    continue;
                }
                listed += 1;
                let raw = upload_message(&child);
                match self.admit(&raw, &format!("resync of {dir}")).await {
                    Admitted::Work(task) => {
                        tasks.spawn(task);
                    }
                    Admitted::Nothing => {}
                    Admitted::Unrecorded => {
                        failed = Some("an outcome could not be recorded".into());
                        break;
                    }
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

    #[allow(clippy::too_many_arguments)]
    async fn stream(
        self: &Arc<Self>,
        channel: &str,
        received: &mut Option<u64>,
        subscriptions: &mut BTreeMap<String, String>,
        tasks: &mut JoinSet<()>,
        saved: &mut Saved,
        needs_resync: &mut bool,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Ok(url) = Url::parse(channel) else {
            return Ended::ChannelGone;
        };
        // No overall timeout for the stream itself: an idle one instead, below.
        let mut req = self
            .pipeline
            .engine()
            .api(Method::GET, url)
            .header("Accept", "text/event-stream");
        let last_event_id = *received;
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = tokio::select! {
            r = req.send() => r,
            _ = shutdown.cancelled() => return Ended::Stop,
        };
        let resp = match resp {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => return Ended::ChannelGone,
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return Ended::Reconnect(format!("GET {channel}: {}", r.status())),
            Err(e) => return Ended::Reconnect(e.without_url().to_string()),
        };
        info!(%channel, last_event_id = ?last_event_id, "event stream open");
        let mut events = lossy_utf8(resp.bytes_stream()).eventsource();
        let mut commit_tick = tokio::time::interval(COMMIT_EVERY);
        loop {
            while tasks.try_join_next().is_some() {}
            let next = tokio::select! {
                e = tokio::time::timeout(STREAM_IDLE, events.next()) => match e {
                    Ok(e) => e,
                    Err(_) => return Ended::Reconnect(format!(
                        "nothing received for {} s", STREAM_IDLE.as_secs()
                    )),
                },
                _ = commit_tick.tick() => {
                    if let Err(e) = self.commit(saved) {
                        warn!(error = %e, "cannot save the SSE state");
                    }
                    continue;
                }
                _ = shutdown.cancelled() => return Ended::Stop,
            };
            let event = match next {
                None => return Ended::Reconnect("the server closed the stream".into()),
                Some(Err(e)) => return Ended::Reconnect(e.to_string()),
                Some(Ok(e)) => e,
            };
            if event.event == "SYSTEM" {
                let kind = serde_json::from_str::<System>(&event.data)
                    .map(|s| s.kind)
                    .unwrap_or_default();
                match kind.as_str() {
                    "EVENT_LOSS" => {
                        warn!("dCache lost events for this channel (EVENT_LOSS): resynchronising");
                        self.mark_resync_pending(saved);
                        match self.resync(&self.cfg.paths, shutdown).await {
                            Ok(()) => self.resync_done(saved),
                            Err(e) => return Ended::Resubscribe(format!("{e:#}")),
                        }
                    }
                    "COMPETING_CLIENT" => {
                        warn!("another client opened this channel's stream (COMPETING_CLIENT)");
                        return Ended::Reconnect("COMPETING_CLIENT".into());
                    }
                    "SHUTDOWN" => return Ended::Reconnect("the frontend shuts down".into()),
                    other => debug!(kind = other, data = %event.data, "SYSTEM event"),
                }
                continue;
            }
            let Ok(id) = event.id.trim().parse::<u64>() else {
                debug!(event = %event.event, "event without an id: ignored");
                continue;
            };
            if received.is_some_and(|r| id <= r) {
                continue; // already received on an earlier connection
            }
            *received = Some(id);
            let ticket = self.watermarks.lock().expect("lock").start(0, id as i64);
            let Some(ticket) = ticket else { continue };
            if event.event != "inotify" {
                // dCache's other event types (e.g. `metronome`) are not storage events.
                debug!(event = %event.event, "event of another type: ignored");
                self.finish(&ticket);
                continue;
            }
            let origin = format!("storage event {id}");
            let envelope: Envelope = match serde_json::from_str(&event.data) {
                Ok(e) => e,
                Err(e) => {
                    if self
                        .pipeline
                        .reject_malformed_event(event.data.as_bytes(), &origin, &e.to_string())
                        .await
                        .is_ok()
                    {
                        self.finish(&ticket);
                    }
                    continue;
                }
            };
            let Some(dir) = subscriptions.get(&envelope.subscription).cloned() else {
                debug!(id, subscription = %envelope.subscription, "event of an unknown subscription");
                self.finish(&ticket);
                continue;
            };
            let has = |m: &str| envelope.event.mask.iter().any(|x| x == m);
            if let Some(name) = envelope.event.name.as_deref().filter(|n| !plain_name(n)) {
                // A name is one entry of the watched directory: anything else (`..`, a
                // slash, NUL) would lead outside it.
                let reason = format!("{name:?} is not a plain file or directory name");
                if self
                    .pipeline
                    .reject_malformed_event(event.data.as_bytes(), &origin, &reason)
                    .await
                    .is_ok()
                {
                    self.finish(&ticket);
                }
                continue;
            }
            let child = envelope
                .event
                .name
                .as_deref()
                .map(|n| format!("{}/{n}", dir.trim_end_matches('/')));
            if has("IN_Q_OVERFLOW") {
                warn!(
                    dir,
                    "dCache dropped events (IN_Q_OVERFLOW): resynchronising"
                );
                *needs_resync = false;
                self.mark_resync_pending(saved);
                match self.resync(&self.cfg.paths, shutdown).await {
                    Ok(()) => self.resync_done(saved),
                    Err(e) => return Ended::Resubscribe(format!("{e:#}")),
                }
            } else if has("IN_ISDIR") && (has("IN_CREATE") || has("IN_MOVED_TO")) {
                if let Some(new_dir) = child {
                    info!(dir = %new_dir, "new directory: subscribing and listing it");
                    let roots = [new_dir.clone()];
                    let subscribed = match self.subscribe_tree(channel, &roots, subscriptions).await
                    {
                        // Files written before the subscription took effect.
                        Ok(()) => self.resync(&roots, shutdown).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = subscribed {
                        // Its events, and those of the folders in it, would be missed: the
                        // event id waits until the tree is subscribed and listed again.
                        warn!(dir = %new_dir, error = %format!("{e:#}"), "cannot subscribe to or list a new directory");
                        self.mark_resync_pending(saved);
                        return Ended::Resubscribe(format!("new directory {new_dir}: {e:#}"));
                    }
                }
            } else if (has("IN_CLOSE_WRITE") || has("IN_MOVED_TO")) && !has("IN_ISDIR") {
                if let Some(path) = child {
                    // A slot before the HEAD: a burst of events waits here, in the stream.
                    let slot = tokio::select! {
                        s = self.slots.clone().acquire_owned() => s.expect("never closed"),
                        _ = shutdown.cancelled() => return Ended::Stop,
                    };
                    let this = self.clone();
                    tasks.spawn(async move {
                        if this.file_complete(id, &path, slot).await {
                            this.finish(&ticket);
                        }
                    });
                    continue;
                }
            } else if has("IN_DELETE_SELF") || has("IN_IGNORED") {
                subscriptions.remove(&envelope.subscription);
            }
            self.finish(&ticket);
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
        let mut entry = Entry {
            path: path.to_owned(),
            ..Entry::default()
        };
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
        let raw = upload_message(&entry);
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

/// The stream's bytes with each sequence that is not UTF-8 replaced by U+FFFD. The SSE parser
/// ends the stream at the first invalid byte, and a reconnect with `Last-Event-ID` would fetch
/// the same frame again, for ever; replaced, the frame reaches the parser and is recorded as
/// malformed. A character split between two chunks waits for the next one.
fn lossy_utf8<E>(
    stream: impl futures_util::Stream<Item = Result<bytes::Bytes, E>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, E>> {
    stream.scan(Vec::<u8>::new(), |carry, chunk| {
        let out = chunk.map(|bytes| {
            if carry.is_empty() && std::str::from_utf8(&bytes).is_ok() {
                return bytes;
            }
            carry.extend_from_slice(&bytes);
            let mut text = String::with_capacity(carry.len());
            let mut rest: &[u8] = carry;
            loop {
                match std::str::from_utf8(rest) {
                    Ok(valid) => {
                        text.push_str(valid);
                        rest = &[];
                        break;
                    }
                    Err(e) => {
                        let (good, bad) = rest.split_at(e.valid_up_to());
                        text.push_str(std::str::from_utf8(good).expect("checked valid"));
                        match e.error_len() {
                            Some(n) => {
                                text.push('\u{FFFD}');
                                rest = &bad[n..];
                            }
                            None => {
                                rest = bad; // the start of a character: the next chunk ends it
                                break;
                            }
                        }
                    }
                }
            }
            let incomplete = rest.to_vec();
            *carry = incomplete;
            bytes::Bytes::from(text)
        });
        futures_util::future::ready(Some(out))
    })
}

/// One entry of a directory: not empty, not `.` or `..`, without `/` or NUL.
fn plain_name(name: &str) -> bool {
    !matches!(name, "" | "." | "..") && !name.contains(['/', '\0'])
}

/// One entry of a directory listing (or a HEAD), as the door reports it.
#[derive(Debug, Default, Clone, PartialEq)]
struct Entry {
    /// The namespace path (the href, in [`parse_multistatus`]).
    path: String,
    is_dir: bool,
    size: Option<u64>,
    /// `ETag`: dCache's is `"<pnfsid>_<number>"`.
    etag: Option<String>,
    /// `Last-Modified`.
    modified: Option<String>,
}

impl Entry {
    /// The pnfsid dCache's door puts in the ETag (milton's `uniqueId_modDateHash`, the
    /// unique id being the pnfsid): a re-uploaded path is a new file with a new pnfsid.
    fn pnfsid(&self) -> Option<String> {
        let tag = self.etag.as_deref()?.trim().trim_start_matches("W/");
        let id = tag.trim_matches('"').split('_').next()?;
        dcflow_core::PnfsId::parse(id).ok().map(|p| p.to_string())
    }
}

/// A billing-like upload message for a file reported complete by a storage event or found by
/// a resynchronisation. The pnfsid is dCache's (from the ETag) or, for a door that gives none,
/// a stand-in: 36 hex digits of a hash of the path, the size and the ETag or modification
/// time, the same for one file whoever reports it and new for a re-upload.
fn upload_message(entry: &Entry) -> Vec<u8> {
    let pnfsid = entry.pnfsid().unwrap_or_else(|| {
        let mut h = Md5::new();
        h.update(b"dcflow-sse\0");
        h.update(entry.path.as_bytes());
        h.update(b"\0");
        h.update(
            entry
                .size
                .map(|s| s.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(b"\0");
        h.update(
            entry
                .etag
                .as_deref()
                .or(entry.modified.as_deref())
                .unwrap_or("")
                .as_bytes(),
        );
        let digest: [u8; 16] = h.finalize().into();
        let hex: String = digest.iter().map(|b| format!("{b:02X}")).collect();
        format!("0000{hex}")
    });
    let path = &entry.path;
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0", "msgType": "transfer", "cellType": "pool", "cellName": "sse",
        "isWrite": "write", "isP2p": false, "status": {"code": 0, "msg": ""},
        "pnfsid": pnfsid, "billingPath": path, "transferPath": path,
        "fileSize": entry.size,
    }))
    .expect("JSON")
}

/// Each response of a WebDAV multistatus (href as given).
fn parse_multistatus(xml: &str) -> Result<Vec<Entry>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut out = Vec::new();
    let mut entry = Entry::default();
    let mut href = None::<String>;
    let mut current: Vec<u8> = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                if name == b"response" {
                    entry = Entry::default();
                    href = None;
                }
                if name == b"collection" {
                    entry.is_dir = true;
                }
                current = name;
            }
            Event::Empty(e) if e.local_name().as_ref() == b"collection" => entry.is_dir = true,
            Event::Text(t) => {
                let text = t.unescape()?.into_owned();
                match current.as_slice() {
                    b"href" => href = Some(text),
                    b"getcontentlength" => entry.size = text.trim().parse().ok(),
                    b"getetag" => entry.etag = Some(text),
                    b"getlastmodified" => entry.modified = Some(text),
                    _ => {}
                }
            }
            Event::End(e) => {
                if e.local_name().as_ref() == b"response" {
                    if let Some(h) = href.take() {
                        out.push(Entry {
                            path: h,
                            ..std::mem::take(&mut entry)
                        });
                    }
                }
                current.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `chunks` through `lossy_utf8`, joined.
    async fn lossy(chunks: &[&[u8]]) -> String {
        let items: Vec<Result<bytes::Bytes, ()>> = chunks
            .iter()
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let out: Vec<_> = lossy_utf8(futures_util::stream::iter(items))
            .collect()
            .await;
        out.into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).expect("always UTF-8"))
            .collect()
    }

    #[tokio::test]
    async fn bytes_that_are_not_utf8_become_replacement_characters_and_split_characters_survive() {
        assert_eq!(lossy(&[b"data: ok\n"]).await, "data: ok\n");
        assert_eq!(lossy(&[b"a\xffb\xc3(c"]).await, "a\u{FFFD}b\u{FFFD}(c");
        // "é" (C3 A9) and "€" (E2 82 AC) split across chunks.
        assert_eq!(
            lossy(&[b"caf\xc3", b"\xa9 \xe2", b"\x82", b"\xac"]).await,
            "café €"
        );
        assert_eq!(lossy(&[b"\xff", b"\xfe", b"x"]).await, "\u{FFFD}\u{FFFD}x");
    }

    #[test]
    fn multistatus_and_stand_in_ids() {
        let xml = r#"<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">
<d:response><d:href>/a/dir/</d:href><d:propstat><d:prop><d:resourcetype><d:collection/></d:resourcetype></d:prop></d:propstat></d:response>
<d:response><d:href>/a/dir/f%20one.dat</d:href><d:propstat><d:prop><d:resourcetype/><d:getcontentlength>42</d:getcontentlength><d:getetag>"0000C9B4E0D1A3B24F2AA5E9B2A1C6D3E4F5_-1912412442"</d:getetag></d:prop></d:propstat></d:response>
</d:multistatus>"#;
        let got = parse_multistatus(xml).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].path.as_str(), got[0].is_dir), ("/a/dir/", true));
        assert_eq!(got[1].path, "/a/dir/f%20one.dat");
        assert_eq!((got[1].is_dir, got[1].size), (false, Some(42)));
        assert_eq!(
            got[1].pnfsid().as_deref(),
            Some("0000C9B4E0D1A3B24F2AA5E9B2A1C6D3E4F5"),
            "dCache's pnfsid, from the ETag"
        );
        let file = |size, etag: Option<&str>| Entry {
            path: "/p/x".into(),
            size,
            etag: etag.map(String::from),
            ..Entry::default()
        };
        let a = upload_message(&file(Some(1), None));
        let b = upload_message(&file(Some(1), None));
        let c = upload_message(&file(Some(2), None));
        assert_eq!(a, b, "one file, one stand-in pnfsid");
        assert_ne!(a, c);
        let msg = dcflow_core::BillingMessage::decode(&a).unwrap();
        assert!(msg.upload().is_ok(), "an upload for the pipeline");
    }

    /// Issue 14, item 4: the stand-in id was a hash of the path and size only, so a re-upload
    /// of a path with new content of the same size was the same file for ever.
    #[test]
    fn a_reupload_of_a_path_with_the_same_size_is_a_new_file() {
        let upload = |etag: &str| {
            let raw = upload_message(&Entry {
                path: "/p/x".into(),
                size: Some(7),
                etag: Some(etag.into()),
                ..Entry::default()
            });
            dcflow_core::BillingMessage::decode(&raw)
                .unwrap()
                .upload()
                .unwrap()
                .pnfsid
        };
        let first = upload("\"0000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA_1\"");
        let again = upload("\"0000BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB_2\"");
        assert_ne!(first, again);
        assert_eq!(first.as_str(), "0000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        // A door without dCache's ETag: the ETag (or modification time) still tells them apart.
        assert_ne!(upload("\"v1\""), upload("\"v2\""));
    }
}
