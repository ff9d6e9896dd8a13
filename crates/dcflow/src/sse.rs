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
//! Reconnects back off from 1 s to 60 s. SSE events carry no pnfsid: each file gets a stable
//! stand-in (a hash of its path and size), so an event and a resynchronisation that report one
//! file agree (and are merged), and records show it in the pnfsid column.

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

use crate::pipeline::{Admission, Pipeline};
use crate::replay::Summary;

const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// What survives a restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Saved {
    channel: Option<String>,
    last_event_id: Option<u64>,
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

/// Why the stream ended.
enum Ended {
    Stop,
    /// The channel is gone (404): create a new one, subscribe, resynchronise.
    ChannelGone,
    /// A network error or the server closed the stream: reconnect with Last-Event-ID.
    Reconnect(String),
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
    });
    *pipeline.activity.source.lock().expect("activity lock") = format!(
        "dCache storage events at {} ({} watched)",
        cfg.url,
        cfg.paths.join(", ")
    );
    let mut saved = load(&cfg.state_file);
    source.watermarks.lock().expect("lock").assign(0);
    let mut tasks: JoinSet<()> = JoinSet::new();
    // Subscription URL → watched directory (namespace path).
    let mut subscriptions: BTreeMap<String, String> = BTreeMap::new();
    let mut backoff = Duration::from_secs(1);
    let mut needs_resync = false;
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
            source.resync(&cfg.paths, &shutdown).await;
            needs_resync = false;
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
                crate::metrics::Stats::inc(&pipeline.stats.sse_reconnects);
                warn!(%channel, "the event channel is gone (404): creating a new one, then resynchronising");
                saved = Saved::default();
                subscriptions.clear();
                backoff = Duration::from_secs(1);
            }
            Ended::Reconnect(why) => {
                crate::metrics::Stats::inc(&pipeline.stats.sse_reconnects);
                warn!(why, last_event_id = ?received, "event stream ended; reconnecting in {} s", backoff.as_secs());
                // Without an id to resume from, dCache replays nothing: list instead.
                needs_resync |= received.is_none();
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
    fn api(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.pipeline.engine().api(method, url)
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
            for (child, is_dir, _) in self.list(&dir).await? {
                if is_dir {
                    queue.push_back(child);
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

    /// PROPFIND Depth 1: (namespace path, is a directory, size) of each child.
    async fn list(&self, dir: &str) -> Result<Vec<(String, bool, Option<u64>)>> {
        let mut url = self.door_url(dir)?;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let resp = self
            .api(Method::from_bytes(b"PROPFIND").expect("method"), url.clone())
            .header("Depth", "1")
            .header("Content-Type", "application/xml")
            .body(r#"<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getcontentlength/></d:prop></d:propfind>"#)
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
        for (href, is_dir, size) in parse_multistatus(&xml)? {
            let path = percent_encoding::percent_decode_str(&href)
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
            out.push((format!("{}{}", self.pool, rel), is_dir, size));
        }
        Ok(out)
    }

    /// Lists the trees below `roots` and sends each file whose local copy is missing or of
    /// another size through the pipeline; waits for them.
    async fn resync(&self, roots: &[String], shutdown: &CancellationToken) {
        let started = Instant::now();
        crate::metrics::Stats::inc(&self.pipeline.stats.sse_resyncs);
        let mut dirs: VecDeque<String> = roots.iter().cloned().collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut tasks = JoinSet::new();
        let mut listed = 0u64;
        let mut queued = 0u64;
        while let Some(dir) = dirs.pop_front() {
            if shutdown.is_cancelled() || !seen.insert(dir.clone()) {
                continue;
            }
            let children = match self.list(&dir).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(dir, error = %format!("{e:#}"), "cannot list for resynchronisation");
                    continue;
                }
            };
            for (path, is_dir, size) in children {
                if is_dir {
                    dirs.push_back(path);
                    continue;
                }
                listed += 1;
                let present = self
                    .pipeline
                    .mapper()
                    .map(&path)
                    .ok()
                    .flatten()
                    .and_then(|m| std::fs::metadata(&m.destination).ok())
                    .is_some_and(|m| m.is_file() && Some(m.len()) == size);
                if present {
                    continue;
                }
                queued += 1;
                let raw = upload_message(&path, size);
                if let Some(task) = self.admit(&raw, &format!("resync of {dir}")).await {
                    tasks.spawn(task);
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        info!(
            listed,
            queued,
            seconds = started.elapsed().as_secs(),
            "resynchronised: {queued} of {listed} listed files had no local copy of their size"
        );
    }

    /// Admits one synthesised upload message; returns the work to run, if any.
    async fn admit(
        &self,
        raw: &[u8],
        origin: &str,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        match self.pipeline.admit(raw, origin).await {
            Admission::Run(task) => {
                let p = self.pipeline.clone();
                Some(Box::pin(async move {
                    p.run(task).await;
                }))
            }
            Admission::Merged(m) => Some(Box::pin(m.wait())),
            Admission::Skip => None,
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
        let mut req = self
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
                e = events.next() => e,
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
                        self.resync(&self.cfg.paths, shutdown).await;
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
                    self.pipeline
                        .reject_malformed_event(event.data.as_bytes(), &origin, &e.to_string())
                        .await;
                    self.finish(&ticket);
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
                self.pipeline
                    .reject_malformed_event(event.data.as_bytes(), &origin, &reason)
                    .await;
                self.finish(&ticket);
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
                self.resync(&self.cfg.paths, shutdown).await;
            } else if has("IN_ISDIR") && (has("IN_CREATE") || has("IN_MOVED_TO")) {
                if let Some(new_dir) = child {
                    info!(dir = %new_dir, "new directory: subscribing and listing it");
                    let roots = [new_dir.clone()];
                    match self.subscribe_tree(channel, &roots, subscriptions).await {
                        Ok(()) => {
                            // Files written before the subscription took effect.
                            self.resync(&roots, shutdown).await;
                        }
                        Err(e) => {
                            warn!(dir = %new_dir, error = %format!("{e:#}"), "cannot subscribe to a new directory")
                        }
                    }
                }
            } else if (has("IN_CLOSE_WRITE") || has("IN_MOVED_TO")) && !has("IN_ISDIR") {
                if let Some(path) = child {
                    let this = self.clone();
                    tasks.spawn(async move {
                        this.file_complete(id, &path).await;
                        this.finish(&ticket);
                    });
                    continue;
                }
            } else if has("IN_DELETE_SELF") || has("IN_IGNORED") {
                subscriptions.remove(&envelope.subscription);
            }
            self.finish(&ticket);
        }
    }

    /// A file is complete: HEAD for its size, then the pipeline.
    async fn file_complete(&self, id: u64, path: &str) {
        let size = match self.door_url(path) {
            Ok(url) => match self.api(Method::HEAD, url).send().await {
                // The header, not content_length(): a HEAD response has no body to size.
                Ok(r) if r.status().is_success() => r
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
                Ok(r) => {
                    debug!(path, status = %r.status(), "HEAD before copying");
                    None
                }
                Err(_) => None,
            },
            Err(_) => None,
        };
        let raw = upload_message(path, size);
        if let Some(work) = self.admit(&raw, &format!("storage event {id}")).await {
            work.await;
        }
    }

    fn finish(&self, ticket: &Ticket) {
        self.watermarks.lock().expect("lock").finish(ticket);
    }

    /// Saves the id up to which every event has finished.
    fn commit(&self, saved: &mut Saved) -> Result<()> {
        let commits = self.watermarks.lock().expect("lock").take_commits();
        if let Some(&(_, next)) = commits.first() {
            if next > 0 {
                saved.last_event_id = Some(next as u64 - 1);
                save(&self.cfg.state_file, saved)?;
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

/// A billing-like upload message for a file reported complete by a storage event or found by
/// a resynchronisation. The pnfsid is a stand-in: 36 hex digits of a hash of the path and the
/// size, the same for one file whoever reports it.
fn upload_message(path: &str, size: Option<u64>) -> Vec<u8> {
    let mut h = Md5::new();
    h.update(b"dcflow-sse\0");
    h.update(path.as_bytes());
    h.update(b"\0");
    h.update(size.map(|s| s.to_string()).unwrap_or_default().as_bytes());
    let digest: [u8; 16] = h.finalize().into();
    let hex: String = digest.iter().map(|b| format!("{b:02X}")).collect();
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0", "msgType": "transfer", "cellType": "pool", "cellName": "sse",
        "isWrite": "write", "isP2p": false, "status": {"code": 0, "msg": ""},
        "pnfsid": format!("0000{hex}"), "billingPath": path, "transferPath": path,
        "fileSize": size,
    }))
    .expect("JSON")
}

/// (href, is a collection, content length) of each response of a WebDAV multistatus.
fn parse_multistatus(xml: &str) -> Result<Vec<(String, bool, Option<u64>)>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut out = Vec::new();
    let (mut href, mut is_dir, mut size) = (None::<String>, false, None::<u64>);
    let mut current: Vec<u8> = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                if name == b"response" {
                    (href, is_dir, size) = (None, false, None);
                }
                if name == b"collection" {
                    is_dir = true;
                }
                current = name;
            }
            Event::Empty(e) if e.local_name().as_ref() == b"collection" => is_dir = true,
            Event::Text(t) => {
                let text = t.unescape()?.into_owned();
                match current.as_slice() {
                    b"href" => href = Some(text),
                    b"getcontentlength" => size = text.trim().parse().ok(),
                    _ => {}
                }
            }
            Event::End(e) => {
                if e.local_name().as_ref() == b"response" {
                    if let Some(h) = href.take() {
                        out.push((h, is_dir, size));
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
<d:response><d:href>/a/dir/f%20one.dat</d:href><d:propstat><d:prop><d:resourcetype/><d:getcontentlength>42</d:getcontentlength></d:prop></d:propstat></d:response>
</d:multistatus>"#;
        let got = parse_multistatus(xml).unwrap();
        assert_eq!(
            got,
            vec![
                ("/a/dir/".to_owned(), true, None),
                ("/a/dir/f%20one.dat".to_owned(), false, Some(42)),
            ]
        );
        let a = upload_message("/p/x", Some(1));
        let b = upload_message("/p/x", Some(1));
        let c = upload_message("/p/x", Some(2));
        assert_eq!(a, b, "one file, one stand-in pnfsid");
        assert_ne!(a, c);
        let msg = dcflow_core::BillingMessage::decode(&a).unwrap();
        assert!(msg.upload().is_ok(), "an upload for the pipeline");
    }
}
