//! The frontend's API: creating a channel, subscribing directories (inotify), and the event
//! stream (`text/event-stream`, resumed with `Last-Event-ID`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use dcflow_core::Upstream;

use crate::listing::plain_name;
use crate::state::Saved;
use crate::{Ended, Source, COMMIT_EVERY, STREAM_IDLE};

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

impl Source {
    pub(crate) async fn create_channel(&self) -> Result<String> {
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
    pub(crate) async fn subscribe_tree(
        &self,
        channel: &str,
        roots: &[String],
        subscriptions: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        let mut queue: VecDeque<String> = roots.iter().cloned().collect();
        while let Some(dir) = queue.pop_front() {
            self.subscribe(channel, &dir, subscriptions).await?;
            queue.extend(self.subfolders(&dir).await?);
        }
        Ok(())
    }

    pub(crate) async fn subscribe(
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

    // Long on purpose: one loop over the event stream whose arms share the channel, the
    // subscriptions, the tasks and the saved id; each arm is short.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn stream(
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
        let health = &self.pipeline.health;
        let resp = match resp {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => return Ended::ChannelGone,
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let why = format!("GET {channel}: {}", r.status());
                if r.status().is_server_error() {
                    health.down(Upstream::Frontend, &why);
                }
                return Ended::Reconnect(why);
            }
            Err(e) => {
                let why = format!(
                    "GET {channel}: {}",
                    dcflow_core::text::causes(&e.without_url())
                );
                health.down(Upstream::Frontend, &why);
                return Ended::Reconnect(why);
            }
        };
        health.up(Upstream::Frontend);
        // Ready from the first open stream on; an outage later is `/readyz`'s own check.
        self.pipeline.activity.set_ready(true);
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
}

/// The stream's bytes with each sequence that is not UTF-8 replaced by U+FFFD. The SSE parser
/// ends the stream at the first invalid byte, and a reconnect with `Last-Event-ID` would fetch
/// the same frame again, for ever; replaced, the frame reaches the parser and is recorded as
/// malformed. A character split between two chunks waits for the next one.
pub(crate) fn lossy_utf8<E>(
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
}
