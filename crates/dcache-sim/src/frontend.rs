//! dCache's frontend storage events (SSE), as in `fixtures/sse/`: channels
//! (`POST /api/v1/events/channels` → 201 Location), inotify subscriptions on one directory
//! each (`POST <channel>/subscriptions/inotify {"path": ...}` → 201 Location, non-recursive),
//! and the stream (`GET <channel>`, `Accept: text/event-stream`). Inotify events carry
//! per-channel integer ids from 0 and are kept in a ring buffer: a `Last-Event-ID` still in it
//! replays what followed, one that is not gets a single `SYSTEM EVENT_LOSS`. An unknown channel
//! (forgotten, or the frontend restarted) answers 404. SYSTEM events have no id. No
//! keep-alive comments are sent. A second stream on one channel ends the first with
//! `SYSTEM COMPETING_CLIENT`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use tokio::sync::mpsc;

/// Events kept per channel for `Last-Event-ID` replay (dCache: frontend.limit.events.backlog).
pub const BACKLOG: usize = 16383;

struct Channel {
    /// Subscription id → watched namespace path (as the client gave it).
    subscriptions: HashMap<String, String>,
    buffer: VecDeque<(u64, Bytes)>,
    next_id: u64,
    stream: Option<mpsc::UnboundedSender<Bytes>>,
}

/// The frontend's channels (in memory, as in dCache: a restart forgets them).
#[derive(Default)]
pub struct Frontend {
    channels: Mutex<HashMap<String, Channel>>,
    /// `https://host:port`, for Location headers.
    pub(crate) base: Mutex<String>,
    backlog: Mutex<Option<usize>>,
}

/// What a stream request gets.
pub enum Stream {
    NotFound,
    Events(mpsc::UnboundedReceiver<Bytes>),
}

fn frame(event: &str, id: Option<u64>, data: &str) -> Bytes {
    frame_bytes(event, id, data.as_bytes())
}

/// A frame whose data may be any bytes (hostile-input tests).
fn frame_bytes(event: &str, id: Option<u64>, data: &[u8]) -> Bytes {
    let mut s = format!("event: {event}\n").into_bytes();
    if let Some(id) = id {
        s.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    // A line break in the data continues it on another `data:` line (the SSE format).
    for line in data.split(|b| *b == b'\n') {
        s.extend_from_slice(b"data: ");
        s.extend_from_slice(line);
        s.push(b'\n');
    }
    s.push(b'\n');
    Bytes::from(s)
}

/// `data` with each `{subscription}` replaced by `url`, byte for byte.
fn fill_subscription(data: &[u8], url: &str) -> Vec<u8> {
    const MARK: &[u8] = b"{subscription}";
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(MARK) {
            out.extend_from_slice(url.as_bytes());
            i += MARK.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

fn system(kind: &str, subscription: Option<&str>) -> Bytes {
    let data = match subscription {
        Some(s) => serde_json::json!({"type": kind, "subscription": s}),
        None => serde_json::json!({"type": kind}),
    };
    frame("SYSTEM", None, &data.to_string())
}

impl Frontend {
    fn channel_url(&self, id: &str) -> String {
        format!(
            "{}/api/v1/events/channels/{id}",
            self.base.lock().expect("lock")
        )
    }

    fn subscription_url(&self, channel: &str, sub: &str) -> String {
        format!("{}/subscriptions/inotify/{sub}", self.channel_url(channel))
    }

    /// A new channel; returns its URL.
    pub fn create_channel(&self) -> String {
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().as_bytes());
        self.channels.lock().expect("lock").insert(
            id.clone(),
            Channel {
                subscriptions: HashMap::new(),
                buffer: VecDeque::new(),
                next_id: 0,
                stream: None,
            },
        );
        self.channel_url(&id)
    }

    pub fn exists(&self, channel: &str) -> bool {
        self.channels.lock().expect("lock").contains_key(channel)
    }

    pub fn delete_channel(&self, channel: &str) -> bool {
        self.channels
            .lock()
            .expect("lock")
            .remove(channel)
            .is_some()
    }

    /// Subscribes `channel` to one directory; the same directory again is the same
    /// subscription (dCache answers 303 then). `None`: no such channel.
    pub fn subscribe(&self, channel: &str, path: &str) -> Option<(String, bool)> {
        let mut channels = self.channels.lock().expect("lock");
        let ch = channels.get_mut(channel)?;
        if let Some((id, _)) = ch.subscriptions.iter().find(|(_, p)| *p == path) {
            return Some((self.subscription_url(channel, id), false));
        }
        // Standard base64 without padding: ids may hold '+' and '/', as dCache's do.
        let mut raw = [0u8; 18];
        raw[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        raw[16] = 0xfb;
        raw[17] = 0xff;
        let id = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
        ch.subscriptions.insert(id.clone(), path.to_owned());
        let url = self.subscription_url(channel, &id);
        if let Some(s) = &ch.stream {
            let _ = s.send(system("NEW_SUBSCRIPTION", Some(&url)));
        }
        Some((url, true))
    }

    /// Opens the stream of `channel`, replaying after `last_event_id` when it is still in the
    /// buffer, else announcing `EVENT_LOSS`.
    pub fn stream(&self, channel: &str, last_event_id: Option<u64>) -> Stream {
        let mut channels = self.channels.lock().expect("lock");
        let Some(ch) = channels.get_mut(channel) else {
            return Stream::NotFound;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(old) = ch.stream.take() {
            let _ = old.send(system("COMPETING_CLIENT", None));
        }
        if let Some(last) = last_event_id {
            let oldest = ch.buffer.front().map(|(id, _)| *id).unwrap_or(ch.next_id);
            if last + 1 >= oldest && last < ch.next_id {
                for (id, bytes) in &ch.buffer {
                    if *id > last {
                        let _ = tx.send(bytes.clone());
                    }
                }
            } else {
                let _ = tx.send(system("EVENT_LOSS", None));
            }
        }
        ch.stream = Some(tx);
        Stream::Events(rx)
    }

    /// An inotify event for `name` in the watched directory `dir` (namespace path), to every
    /// subscription of that directory.
    pub fn notify(&self, dir: &str, name: Option<&str>, mask: &[&str], cookie: Option<&str>) {
        let backlog = self.backlog.lock().expect("lock").unwrap_or(BACKLOG);
        let base = self.base.lock().expect("lock").clone();
        let mut channels = self.channels.lock().expect("lock");
        for (cid, ch) in channels.iter_mut() {
            let subs: Vec<String> = ch
                .subscriptions
                .iter()
                .filter(|(_, p)| p.as_str() == dir)
                .map(|(id, _)| id.clone())
                .collect();
            for sub in subs {
                let mut event = serde_json::Map::new();
                if let Some(n) = name {
                    event.insert("name".into(), n.into());
                }
                if let Some(c) = cookie {
                    event.insert("cookie".into(), c.into());
                }
                event.insert("mask".into(), mask.to_vec().into());
                let data = serde_json::json!({
                    "event": event,
                    "subscription": format!("{base}/api/v1/events/channels/{cid}/subscriptions/inotify/{sub}"),
                });
                let id = ch.next_id;
                ch.next_id += 1;
                let bytes = frame("inotify", Some(id), &data.to_string());
                ch.buffer.push_back((id, bytes.clone()));
                while ch.buffer.len() > backlog {
                    ch.buffer.pop_front();
                }
                if let Some(s) = &ch.stream {
                    if s.send(bytes).is_err() {
                        ch.stream = None;
                    }
                }
            }
        }
    }

    /// Sends an arbitrary event, with the channel's next id, to every channel subscribed to
    /// `dir`: for hostile-input tests. `{subscription}` in `data` becomes the URL of the
    /// channel's subscription of `dir`.
    pub fn inject(&self, dir: &str, event: &str, data: &str) {
        self.inject_bytes(dir, event, data.as_bytes());
    }

    /// The same with data that may be any bytes, UTF-8 or not.
    pub fn inject_bytes(&self, dir: &str, event: &str, data: &[u8]) {
        let mut channels = self.channels.lock().expect("lock");
        let ids: Vec<String> = channels.keys().cloned().collect();
        for cid in ids {
            let Some(sub) = channels[&cid]
                .subscriptions
                .iter()
                .find(|(_, p)| p.as_str() == dir)
                .map(|(id, _)| id.clone())
            else {
                continue;
            };
            let data = fill_subscription(data, &self.subscription_url(&cid, &sub));
            let ch = channels.get_mut(&cid).expect("channel");
            let id = ch.next_id;
            ch.next_id += 1;
            let bytes = frame_bytes(event, Some(id), &data);
            ch.buffer.push_back((id, bytes.clone()));
            if let Some(s) = &ch.stream {
                if s.send(bytes).is_err() {
                    ch.stream = None;
                }
            }
        }
    }

    /// Ends every open stream (a network cut): clients reconnect with `Last-Event-ID`.
    pub fn disconnect(&self) {
        for ch in self.channels.lock().expect("lock").values_mut() {
            ch.stream = None;
        }
    }

    /// Forgets every channel (the frontend restarted): streams end and reconnects get 404.
    pub fn forget_channels(&self) {
        self.channels.lock().expect("lock").clear();
    }

    /// Empties every replay buffer: a reconnect after this gets `EVENT_LOSS`.
    pub fn evict(&self) {
        for ch in self.channels.lock().expect("lock").values_mut() {
            ch.buffer.clear();
        }
    }

    /// Sends `IN_Q_OVERFLOW` to every subscription (events were dropped).
    pub fn overflow(&self) {
        let dirs: Vec<String> = self
            .channels
            .lock()
            .expect("lock")
            .values()
            .flat_map(|c| c.subscriptions.values().cloned())
            .collect();
        for d in dirs {
            self.notify(&d, None, &["IN_Q_OVERFLOW"], None);
        }
    }

    /// How many events each channel keeps for replay (default [`BACKLOG`]).
    pub fn set_backlog(&self, backlog: usize) {
        *self.backlog.lock().expect("lock") = Some(backlog);
    }

    /// Open streams and subscriptions, for tests.
    pub fn subscriptions(&self) -> Vec<String> {
        self.channels
            .lock()
            .expect("lock")
            .values()
            .flat_map(|c| c.subscriptions.values().cloned())
            .collect()
    }
}
