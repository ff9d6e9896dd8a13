//! Files that live on tape (`[tape]`): before a workflow reads a file, its locality is
//! looked at (or taken from the listing that found it); a `NEARLINE` file is staged through
//! dCache's tape API while its task holds no transfer slot, then copied (and released, with
//! `[tape] release`);
//! `LOST` and `UNAVAILABLE` are failures with that reason, never retried.
//!
//! ```text
//! Task ──► gate: locality? ── ONLINE ──────────────────────────────► steps
//!                          └─ NEARLINE: give the slot back ─► Stager (batches of `batch`
//!                             files, one stage request each, polled with back-off) ─►
//!                             take a slot again ─► steps ─► release (if configured)
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcflow_core::config::TapeConfig;
use dcflow_transfer::listing::Locality;
use dcflow_transfer::tape::StageState;
use dcflow_transfer::Engine;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use url::Url;

/// How long a first file waits for others to share its stage request.
const GATHER: Duration = Duration::from_millis(200);
/// The first wait before a request's progress is asked, doubled up to [`POLL_MAX`].
const POLL_FIRST: Duration = Duration::from_millis(500);
const POLL_MAX: Duration = Duration::from_secs(60);

/// A file back on disk: the request that brought it, for its release.
#[derive(Debug, Clone)]
pub struct Staged {
    pub request: Url,
}

struct Want {
    path: String,
    done: oneshot::Sender<Result<Staged, String>>,
}

/// One stage request in flight.
struct Request {
    url: Url,
    waiting: HashMap<String, Vec<oneshot::Sender<Result<Staged, String>>>>,
    next_poll: Instant,
    backoff: Duration,
    deadline: Instant,
}

/// Stages files in batches and tells each caller when its file is on disk.
pub struct Stager {
    tx: mpsc::Sender<Want>,
    engine: Arc<Engine>,
    cfg: TapeConfig,
    /// Files waiting for tape now (the status page, `/metrics`).
    pub waiting: Arc<AtomicU64>,
}

impl Stager {
    /// Starts the staging loop (a task that ends when the stager is dropped).
    pub fn start(engine: Arc<Engine>, cfg: TapeConfig) -> Self {
        let (tx, rx) = mpsc::channel(10_000);
        tokio::spawn(stage_loop(engine.clone(), cfg.clone(), rx));
        Self {
            tx,
            engine,
            cfg,
            waiting: Arc::default(),
        }
    }

    pub fn config(&self) -> &TapeConfig {
        &self.cfg
    }

    /// The file's locality as the door says it now (PROPFIND Depth 0).
    pub async fn locality(&self, url: &Url) -> Result<Option<Locality>, String> {
        self.engine.locality(url).await.map_err(|e| e.to_string())
    }

    /// Waits until `path` is back on disk (or could not be).
    pub async fn stage(&self, path: &str) -> Result<Staged, String> {
        let (done, wait) = oneshot::channel();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .tx
            .send(Want {
                path: path.to_owned(),
                done,
            })
            .await;
        let result = match sent {
            Ok(()) => wait
                .await
                .unwrap_or_else(|_| Err("the staging loop ended".into())),
            Err(_) => Err("the staging loop ended".into()),
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// The staged copy is no longer needed (`[tape] release`); a failure is only logged.
    pub async fn release(&self, staged: &Staged, path: &str) {
        if !self.cfg.release {
            return;
        }
        if let Err(e) = self
            .engine
            .release(&staged.request, &[path.to_owned()])
            .await
        {
            warn!(path, error = %e, "cannot release the staged copy (dCache ends its pin at pinlifetime)");
        }
    }
}

/// Gathers files into requests of up to `batch`, submits them, polls each with back-off, and
/// answers every waiting caller.
async fn stage_loop(engine: Arc<Engine>, cfg: TapeConfig, mut rx: mpsc::Receiver<Want>) {
    let mut requests: Vec<Request> = Vec::new();
    let mut open = true;
    while open || !requests.is_empty() {
        // Gather: the first file waits briefly for others to share its request.
        let mut batch: Vec<Want> = Vec::new();
        let wait = requests
            .iter()
            .map(|r| r.next_poll)
            .min()
            .map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
        if open {
            tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => batch.push(w),
                    None => open = false,
                },
                _ = tokio::time::sleep(wait) => {}
            }
        } else {
            tokio::time::sleep(wait).await;
        }
        if !batch.is_empty() {
            let until = tokio::time::Instant::now() + GATHER;
            while batch.len() < cfg.batch {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(w)) => batch.push(w),
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
            submit(&engine, &cfg, batch, &mut requests).await;
        }
        poll_due(&engine, &mut requests).await;
    }
}

async fn submit(engine: &Engine, cfg: &TapeConfig, batch: Vec<Want>, requests: &mut Vec<Request>) {
    let mut waiting: HashMap<String, Vec<oneshot::Sender<_>>> = HashMap::new();
    for w in batch {
        waiting.entry(w.path).or_default().push(w.done);
    }
    let paths: Vec<String> = waiting.keys().cloned().collect();
    match engine.stage(&cfg.api, &paths, cfg.pin_lifetime).await {
        Ok(url) => {
            info!(files = paths.len(), request = %url, "TAPE_STAGE requested");
            requests.push(Request {
                url,
                waiting,
                next_poll: Instant::now() + POLL_FIRST,
                backoff: POLL_FIRST,
                deadline: Instant::now() + cfg.stage_timeout,
            });
        }
        Err(e) => {
            warn!(files = paths.len(), error = %e, "TAPE_STAGE request refused");
            for (_, senders) in waiting {
                for s in senders {
                    let _ = s.send(Err(format!("stage request refused: {e}")));
                }
            }
        }
    }
}

async fn poll_due(engine: &Engine, requests: &mut Vec<Request>) {
    let now = Instant::now();
    for r in requests.iter_mut().filter(|r| r.next_poll <= now) {
        match engine.stage_progress(&r.url).await {
            Ok(files) => {
                for (path, state) in files {
                    let outcome = match state {
                        StageState::Waiting => continue,
                        StageState::Completed => Ok(Staged {
                            request: r.url.clone(),
                        }),
                        StageState::Failed(why) => Err(format!("dCache could not stage it: {why}")),
                    };
                    for s in r.waiting.remove(&path).unwrap_or_default() {
                        let _ = s.send(outcome.clone());
                    }
                }
            }
            Err(e) => {
                warn!(request = %r.url, error = %e, "cannot read a stage request's progress; asked again later")
            }
        }
        if now >= r.deadline {
            for (_, senders) in r.waiting.drain() {
                for s in senders {
                    let _ = s.send(Err("not back from tape within [tape] stagetimeout".into()));
                }
            }
        }
        r.backoff = (r.backoff * 2).min(POLL_MAX);
        r.next_poll = Instant::now() + r.backoff;
    }
    requests.retain(|r| !r.waiting.is_empty());
}
