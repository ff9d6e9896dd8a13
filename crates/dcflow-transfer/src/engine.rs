//! The verified transfer engine: one HTTPS client; GET at the door, 302/307 to the pool;
//! stream to a temporary name while hashing; compare with dCache's checksum; fsync; rename.
//!
//! ```text
//! attempt ─► destination holds same size+checksum? ─► done (no copy)
//!        └─► GET door ─► 302 pool (https only, no Authorization) ─► body chunks
//!              ─► writer thread (hash + write + early writeback) ─► fsync
//!              ─► size and Digest check (else HEAD + Want-Digest) ─► rename ─► fsync dir
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcflow_core::config::Permissions;
use dcflow_core::{ChecksumAlgo, Health, RetryPolicy, Upstream};
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, AUTHORIZATION, LOCATION};
use reqwest::{Method, StatusCode};
use tokio::sync::mpsc;
use tracing::{info, warn};
use url::Url;

use crate::checksum::{compare, Checksum, Hasher};
use crate::credentials::Credentials;
use crate::error::TransferError;
use crate::fsutil;

/// How often a running transfer reports progress (`COPY_RUN`).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Start kernel writeback every this many bytes written.
const WRITEBACK_EVERY: u64 = 8 << 20;
const MAX_REDIRECTS: usize = 5;
/// Body chunks queued between the network task and the writer thread.
const WRITER_QUEUE: usize = 8;
/// The writer's buffer: big writes, few syscalls.
const WRITE_BUFFER: usize = 512 << 10;

/// What the engine needs from the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub checksums: Vec<ChecksumAlgo>,
    pub require_checksum: bool,
    pub timeout: Duration,
    pub stall_timeout: Duration,
    pub retry: RetryPolicy,
    pub permissions: Permissions,
    pub download_folder: PathBuf,
    /// Where [`Engine::api`] may send the bearer token: the door and the frontend, https only.
    pub api_origins: Vec<url::Origin>,
}

/// One file to copy.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    pub source: &'a Url,
    /// Components below the download folder (already checked lexically).
    pub rel: &'a [String],
    pub destination: &'a Path,
    /// The size dCache announced, if any.
    pub expected_size: Option<u64>,
    /// Bytes received by the current attempt, for status displays (reset at each attempt).
    pub progress: Option<&'a std::sync::atomic::AtomicU64>,
    /// dCache's checksums of the file as a listing gave them moments ago (`dcflow sync`):
    /// compared with instead of asking the door again (no HEAD per file).
    pub known_checksums: &'a [Checksum],
}

/// A file now at its final path, verified.
#[derive(Debug, Clone)]
pub struct Copied {
    pub size: u64,
    /// The checksums compared with dCache's (empty only with `requirechecksum = false`).
    pub verified: Vec<Checksum>,
    pub attempts: u32,
    pub elapsed: Duration,
    /// The destination already held the same size and checksum: nothing was copied.
    pub already_present: bool,
}

#[derive(Debug)]
pub struct Failed {
    pub error: TransferError,
    pub attempts: u32,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTPS client: {0}")]
pub struct BuildError(String);

pub struct Engine {
    client: reqwest::Client,
    creds: Arc<Credentials>,
    settings: EngineSettings,
    want_digest: HeaderValue,
    publisher: fsutil::Publisher,
    /// Told whether the door answers (not the pools: a mover is a host of its own).
    health: Option<Arc<Health>>,
}

impl Engine {
    pub fn try_new(settings: EngineSettings, creds: Arc<Credentials>) -> Result<Self, BuildError> {
        let tls = creds.tls_config().map_err(|e| BuildError(e.to_string()))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .tcp_nodelay(true)
            // dCache's event stream is silent while nothing happens: keepalives notice a peer
            // that vanished (a NAT or firewall dropping the connection) without cutting it.
            .tcp_keepalive(Duration::from_secs(60))
            .connect_timeout(settings.stall_timeout.min(Duration::from_secs(60)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("dcflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        let want = settings
            .checksums
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let want_digest = HeaderValue::from_str(&want).map_err(|e| BuildError(e.to_string()))?;
        Ok(Self {
            client,
            creds,
            settings,
            want_digest,
            publisher: Default::default(),
            health: None,
        })
    }

    /// Reports to `health` whether the door answers: any HTTP answer is up; a refused or
    /// reset connection, a DNS or TLS failure, or no answer within `stalltimeout` is down.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// One HEAD of `url` at the door, for `check-config`: the status of its answer, or why
    /// there was none (refused credentials, an untrusted certificate, the network, with the
    /// whole cause chain). Bounded by 10 s.
    pub async fn probe(&self, url: &Url) -> Result<u16, TransferError> {
        tokio::time::timeout(Duration::from_secs(10), self.send(Method::HEAD, url))
            .await
            .map_err(|_| TransferError::TimedOut { seconds: 10 })?
            .map(|r| r.status().as_u16())
    }

    /// The credentials in use (for their expiry dates in `/metrics`).
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Copies one file with retries. Every attempt is bounded by `timeout`; the wait for
    /// another copier of the same final path (see [`fsutil::FinalLock`]) is not.
    pub async fn copy(&self, job: &Job<'_>) -> Result<Copied, Failed> {
        let start = Instant::now();
        let max = self.settings.retry.attempts().get();
        let mut attempt = 0;
        let mut lock: Option<fsutil::FinalLock> = None;
        loop {
            attempt += 1;
            let s = &self.settings;
            // The folder first, as before the change below: it refuses a path that a
            // symlinked folder leads outside the download folder, which the check of a file in
            // place would otherwise read through.
            let parent =
                fsutil::prepare_parent(&s.download_folder, job.rel, s.permissions.dir_mode);
            // A file already in place (a redelivered upload) is verified without the
            // cross-process lock: its lock file, created and removed in the destination's
            // folder, cost two directory changes and made the directory fsync after the check
            // a journal commit (bench/README.md, event path). A rename is atomic, so the check
            // reads a whole file whoever is replacing it. A lock file left by a copier that
            // died names a temporary file to remove: then the check waits for the lock.
            // A file that differs is checked once more under the lock (see `attempt`).
            let unlocked = lock.is_none() && !fsutil::FinalLock::exists(job.destination);
            let present = if parent.is_err() {
                Ok(None)
            } else if unlocked {
                tokio::time::timeout(self.settings.timeout, self.already_present(job))
                    .await
                    .unwrap_or(Err(TransferError::TimedOut {
                        seconds: self.settings.timeout.as_secs(),
                    }))
            } else {
                Ok(None)
            };
            let result = match present {
                Ok(Some(done)) => Ok(done),
                Err(e) => Err(e),
                Ok(None) => match self.lock_destination(job, parent, &mut lock).await {
                    Err(e) => Err(e),
                    Ok((parent, lock)) => {
                        info!(attempt, source = %job.source, "COPY_START attempt {attempt}/{max}");
                        let copy = self.attempt(job, &parent, lock);
                        tokio::time::timeout(self.settings.timeout, copy)
                            .await
                            .unwrap_or(Err(TransferError::TimedOut {
                                seconds: self.settings.timeout.as_secs(),
                            }))
                    }
                },
            };
            match result {
                Ok(mut copied) => {
                    copied.attempts = attempt;
                    copied.elapsed = start.elapsed();
                    return Ok(copied);
                }
                Err(error) if error.is_retryable() && attempt < max => {
                    let wait = self
                        .settings
                        .retry
                        .backoff(attempt, &mut rand::thread_rng());
                    warn!(attempt, error = %error, kind = error.kind(), "COPY_RUN attempt {attempt}/{max} failed, retrying in {:.1} s: {error}", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    return Err(Failed {
                        error,
                        attempts: attempt,
                        elapsed: start.elapsed(),
                    });
                }
            }
        }
    }

    /// The destination's folder (from `fsutil::prepare_parent`) and the cross-process lock on
    /// its final path, taken once for all attempts.
    async fn lock_destination<'l>(
        &self,
        job: &Job<'_>,
        parent: Result<PathBuf, TransferError>,
        lock: &'l mut Option<fsutil::FinalLock>,
    ) -> Result<(PathBuf, &'l fsutil::FinalLock), TransferError> {
        let parent = parent?;
        if lock.is_none() {
            let name = job.rel.last().expect("non-empty rel");
            *lock = Some(fsutil::FinalLock::acquire(&parent, name).await?);
        }
        Ok((parent, lock.as_ref().expect("just set")))
    }

    // Long on purpose: one transfer attempt in order (request, redirect, body to the writer
    // thread, verify, publish); each step is a few lines and they share the attempt's state.
    async fn attempt(
        &self,
        job: &Job<'_>,
        parent: &Path,
        lock: &fsutil::FinalLock,
    ) -> Result<Copied, TransferError> {
        let s = &self.settings;
        // Again under the lock: a copier that held it may have just put the file in place
        // (for a new file, one failed stat).
        if let Some(done) = self.already_present(job).await? {
            return Ok(done);
        }
        // The temporary file first: a folder that cannot be written fails before anything is
        // fetched (and the guard removes the file if the request fails). A new name for each
        // attempt, created exclusively: no other writer can ever share it.
        let name = job.rel.last().expect("non-empty rel");
        let (part, file) =
            fsutil::create_part(parent, name, s.permissions.file_mode, |p| lock.holding(p))?;
        let guard = fsutil::PartGuard::new(part.clone());
        let resp = self.send(Method::GET, job.source).await?;
        let content_length = resp.content_length();
        if let (Some(cl), Some(exp)) = (content_length, job.expected_size) {
            if cl != exp {
                return Err(TransferError::SizeMismatch {
                    received: cl,
                    expected: exp,
                });
            }
        }
        let advertised = digests(resp.headers());

        // A short queue: chunks can be a few hundred KiB, and memory must not grow with
        // the number of transfers times a deep queue when the disk is slower than the network.
        let (tx, rx) = mpsc::channel::<Chunk>(WRITER_QUEUE);
        let algos = s.checksums.clone();
        let part_for_writer = part.clone();
        let writer =
            tokio::task::spawn_blocking(move || write_part(file, rx, &algos, &part_for_writer));

        let mut body = resp.bytes_stream();
        let mut received = 0u64;
        let mut last_report = Instant::now();
        let started = Instant::now();
        let expected = content_length.or(job.expected_size);
        loop {
            let next = tokio::time::timeout(s.stall_timeout, body.next())
                .await
                .map_err(|_| TransferError::Stalled {
                    seconds: s.stall_timeout.as_secs(),
                })?;
            match next {
                None => break,
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if let Some(p) = job.progress {
                        p.store(received, std::sync::atomic::Ordering::Relaxed);
                    }
                    if tx.send(Chunk::Data(chunk)).await.is_err() {
                        break; // the writer failed: its error is reported below
                    }
                }
                Some(Err(e)) => {
                    return Err(match expected {
                        Some(exp) if received < exp => TransferError::Truncated {
                            received,
                            expected: exp,
                        },
                        _ => TransferError::Network {
                            context: "reading the body of",
                            url: strip(job.source),
                            source: e.without_url(),
                        },
                    });
                }
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let pct = expected
                    .map(|e| format!(" ({:.0}%)", 100.0 * received as f64 / e.max(1) as f64))
                    .unwrap_or_default();
                info!(
                    bytes = received,
                    "COPY_RUN {} received{pct}, {:.1} Mbps",
                    human_bytes(received),
                    mbps(received, started.elapsed())
                );
            }
        }
        let _ = tx.send(Chunk::Done).await;
        drop(tx);
        let (written, computed) = writer.await.map_err(|e| TransferError::Io {
            what: "writer thread failed for",
            path: part.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
        if let Some(exp) = content_length {
            if written < exp {
                return Err(TransferError::Truncated {
                    received: written,
                    expected: exp,
                });
            }
        }
        if let Some(exp) = job.expected_size {
            if written != exp {
                return Err(TransferError::SizeMismatch {
                    received: written,
                    expected: exp,
                });
            }
        }
        let expected_sums = if advertised.iter().any(|a| s.checksums.contains(&a.algo())) {
            advertised
        } else if job
            .known_checksums
            .iter()
            .any(|a| s.checksums.contains(&a.algo()))
        {
            job.known_checksums.to_vec()
        } else {
            self.head(job.source).await?.1
        };
        let verified = self.verify(&computed, &expected_sums)?;
        self.publisher.publish(&part, job.destination).await?;
        guard.disarm();
        Ok(Copied {
            size: written,
            verified,
            attempts: 0,
            elapsed: Duration::ZERO,
            already_present: false,
        })
    }

    /// Compares, logging `COPY_OVER` with the result.
    fn verify(
        &self,
        computed: &[Checksum],
        expected: &[Checksum],
    ) -> Result<Vec<Checksum>, TransferError> {
        match compare(computed, expected) {
            Err((computed, expected)) => {
                warn!(%computed, %expected, "COPY_OVER checksum mismatch: computed {computed}, dCache {expected}");
                Err(TransferError::ChecksumMismatch { computed, expected })
            }
            Ok(matched) if matched.is_empty() && self.settings.require_checksum => {
                warn!("COPY_OVER no checksum from dCache to compare");
                Err(TransferError::NoChecksum {
                    wanted: self
                        .settings
                        .checksums
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
            Ok(matched) => {
                let list = matched
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ");
                if matched.is_empty() {
                    info!("COPY_OVER size ok, no checksum offered by dCache (requirechecksum = false)");
                } else {
                    info!(checksum = %list, "COPY_OVER checksum ok {list}");
                }
                Ok(matched)
            }
        }
    }

    /// A destination that already holds the same size and checksum as dCache's copy.
    async fn already_present(&self, job: &Job<'_>) -> Result<Option<Copied>, TransferError> {
        let Ok(meta) = std::fs::symlink_metadata(job.destination) else {
            return Ok(None);
        };
        if !meta.is_file() || job.expected_size.is_some_and(|s| s != meta.len()) {
            return Ok(None);
        }
        let remote = if job.known_checksums.is_empty() {
            let (size, remote) = self.head(job.source).await?;
            if size.is_some_and(|s| s != meta.len()) {
                return Ok(None);
            }
            remote
        } else {
            job.known_checksums.to_vec()
        };
        if remote.is_empty() {
            return Ok(None);
        }
        let local = if meta.len() <= INLINE_HASH_MAX {
            // Hashing a small file costs less than handing it to another thread.
            hash_file(job.destination, &self.settings.checksums)
        } else {
            let path = job.destination.to_owned();
            let algos = self.settings.checksums.clone();
            tokio::task::spawn_blocking(move || hash_file(&path, &algos))
                .await
                .map_err(|e| TransferError::Io {
                    what: "hashing",
                    path: job.destination.to_owned(),
                    source: std::io::Error::other(e.to_string()),
                })?
        }
        .map_err(TransferError::io("cannot read existing", job.destination))?;
        match compare(&local, &remote) {
            Ok(matched) if !matched.is_empty() => {
                // A predecessor that crashed after its rename may not have made it durable:
                // an fsync of the folder that starts now (shared with concurrent ones),
                // unless the path still holds the file it held before one finished.
                self.publisher.make_durable(job.destination, &meta).await?;
                info!(destination = %job.destination.display(), "COPY_OVER already present with the same size and checksum: nothing to copy");
                Ok(Some(Copied {
                    size: meta.len(),
                    verified: matched,
                    attempts: 0,
                    elapsed: Duration::ZERO,
                    already_present: true,
                }))
            }
            _ => {
                info!(destination = %job.destination.display(), "destination differs from dCache's copy: replacing it");
                Ok(None)
            }
        }
    }

    /// A request to another service of the same dCache (the frontend's storage events), with
    /// the engine's TLS identity (the proxy) and, when configured, the bearer token, which is
    /// sent only over https to the door's and the frontend's origins (a channel URL comes
    /// from a `Location` header or the state file: it could name any host). No redirects are
    /// followed.
    pub fn api(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let trusted = url.scheme() == "https" && self.settings.api_origins.contains(&url.origin());
        let mut req = self.client.request(method, url);
        if !trusted {
            return req;
        }
        if let Some(token) = &self.creds.token {
            if let Ok(mut value) =
                HeaderValue::from_str(&format!("Bearer {}", token.get().expose()))
            {
                value.set_sensitive(true);
                req = req.header(AUTHORIZATION, value);
            }
        }
        req
    }

    /// Whether the file at `local` is still a copy of dCache's file at `source`: its size and
    /// a checksum that dCache gives (HEAD with `Want-Digest`), compared with the file's bytes
    /// as they are now. For `delete-source`, which must not trust a record of an earlier copy.
    pub async fn check_local(
        &self,
        source: &Url,
        local: &Path,
    ) -> Result<LocalCopy, TransferError> {
        let meta = match std::fs::symlink_metadata(local) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(LocalCopy::Differs("it is not a regular file".into())),
            Err(e) => return Ok(LocalCopy::Differs(format!("it cannot be read: {e}"))),
        };
        let (size, remote) = match self.head(source).await {
            Ok(found) => found,
            Err(TransferError::NotFound { .. }) => return Ok(LocalCopy::SourceGone),
            Err(e) => return Err(e),
        };
        if let Some(size) = size.filter(|&s| s != meta.len()) {
            return Ok(LocalCopy::Differs(format!(
                "{} bytes here, {size} in dCache",
                meta.len()
            )));
        }
        if remote.is_empty() {
            return Ok(LocalCopy::Differs(
                "dCache gave no checksum to compare it with".into(),
            ));
        }
        let (path, algos) = (local.to_owned(), self.settings.checksums.clone());
        let computed = tokio::task::spawn_blocking(move || hash_file(&path, &algos))
            .await
            .map_err(|e| TransferError::Io {
                what: "hashing",
                path: local.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(TransferError::io("cannot read", local))?;
        Ok(match compare(&computed, &remote) {
            Ok(matched) if !matched.is_empty() => LocalCopy::Matches(matched),
            Ok(_) => LocalCopy::Differs("no checksum in common with dCache's".into()),
            Err((here, there)) => LocalCopy::Differs(format!("{here} here, {there} in dCache")),
        })
    }

    /// One DELETE of the source at the door. `Ok(false)` when dCache no longer has it (a
    /// deletion already done counts as done). The caller retries what is retryable.
    pub async fn delete(&self, url: &Url) -> Result<bool, TransferError> {
        match self.send(Method::DELETE, url).await {
            Ok(_) => Ok(true),
            Err(TransferError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One HEAD at the door: does dCache have the file?
    pub async fn exists(&self, url: &Url) -> Result<bool, TransferError> {
        match self.send(Method::HEAD, url).await {
            Ok(_) => Ok(true),
            Err(TransferError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// HEAD at the door with `Want-Digest`: (size, checksums).
    /// dCache's size and checksums of the file at `url` (a HEAD with `Want-Digest`).
    pub async fn describe(&self, url: &Url) -> Result<(Option<u64>, Vec<Checksum>), TransferError> {
        self.head(url).await
    }

    async fn head(&self, url: &Url) -> Result<(Option<u64>, Vec<Checksum>), TransferError> {
        let resp = self.send(Method::HEAD, url).await?;
        let size = resp
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((size, digests(resp.headers())))
    }

    /// Sends a request, following dCache's redirect to a pool: only to https, and without
    /// `Authorization` on any host other than the door's.
    async fn send(&self, method: Method, url: &Url) -> Result<reqwest::Response, TransferError> {
        let door = url.origin();
        let mut current = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self
                .client
                .request(method.clone(), current.clone())
                .header("Want-Digest", self.want_digest.clone());
            if current.origin() == door {
                if let Some(token) = &self.creds.token {
                    let mut value =
                        HeaderValue::from_str(&format!("Bearer {}", token.get().expose()))
                            .map_err(|_| TransferError::Auth {
                                status: 0,
                                url: strip(&current),
                                hint: "the token holds characters not allowed in a header".into(),
                            })?;
                    value.set_sensitive(true);
                    req = req.header(AUTHORIZATION, value);
                }
            }
            let at_door = current.origin() == door;
            let sent = tokio::time::timeout(self.settings.stall_timeout, req.send())
                .await
                .map_err(|_| TransferError::Stalled {
                    seconds: self.settings.stall_timeout.as_secs(),
                })
                .and_then(|r| r.map_err(|e| self.network_error(&current, e)));
            if let (true, Some(health)) = (at_door, &self.health) {
                match &sent {
                    Ok(_) => health.up(Upstream::Door),
                    Err(e) => health.down(Upstream::Door, &e.to_string()),
                }
            }
            let resp = sent?;
            let status = resp.status();
            if status.is_redirection() {
                let next = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| current.join(l).ok())
                    .ok_or_else(|| TransferError::Http {
                        status: status.as_u16(),
                        url: strip(&current),
                        hint: ": redirect without a usable Location".into(),
                    })?;
                if current.scheme() == "https" && next.scheme() != "https" {
                    return Err(TransferError::RedirectRefused {
                        from: strip(&current),
                        to: strip(&next),
                        why: "https must not be downgraded",
                    });
                }
                current = next;
                continue;
            }
            return self.check_status(resp, &current).await;
        }
        Err(TransferError::Http {
            status: 310,
            url: strip(url),
            hint: ": too many redirects".into(),
        })
    }

    /// A request error: TLS failures that retrying cannot fix are told apart from the rest.
    pub(crate) fn network_error(&self, url: &Url, e: reqwest::Error) -> TransferError {
        use rustls::AlertDescription as A;
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            let tls = err.downcast_ref::<rustls::Error>();
            match tls {
                Some(rustls::Error::InvalidCertificate(why)) => {
                    return TransferError::Tls {
                        url: strip(url),
                        why: format!(
                            "the door's certificate is not trusted ({why:?}); check the CA folder {}",
                            self.creds.capath.path.display()
                        ),
                    };
                }
                Some(rustls::Error::AlertReceived(
                    alert @ (A::BadCertificate
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::CertificateRevoked
                    | A::UnknownCA
                    | A::AccessDenied),
                )) => {
                    return TransferError::Tls {
                        url: strip(url),
                        why: format!(
                            "the door refused our certificate ({alert:?}): {}",
                            self.creds.auth_hint()
                        ),
                    };
                }
                _ => {}
            }
            // io::Error hides the error it wraps from source(): step into it explicitly.
            source = match err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            };
        }
        TransferError::Network {
            context: "request to",
            url: strip(url),
            source: e.without_url(),
        }
    }

    async fn check_status(
        &self,
        resp: reqwest::Response,
        url: &Url,
    ) -> Result<reqwest::Response, TransferError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let url = strip(url);
        match status {
            StatusCode::NOT_FOUND => Err(TransferError::NotFound { url }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(TransferError::Auth {
                status: status.as_u16(),
                url,
                hint: self.creds.auth_hint(),
            }),
            _ => {
                let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                    .trim()
                    .to_owned();
                let hint = if text.is_empty() {
                    String::new()
                } else {
                    format!(": {text}")
                };
                Err(TransferError::Http {
                    status: status.as_u16(),
                    url,
                    hint,
                })
            }
        }
    }
}

/// What [`Engine::check_local`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCopy {
    /// Same size and checksum as dCache's file.
    Matches(Vec<Checksum>),
    /// Not (or no longer) a copy of dCache's file: why.
    Differs(String),
    /// dCache no longer has the file.
    SourceGone,
}

/// A URL for messages: no query (a pool URL's one-time `dcache-http-uuid`), no credentials.
fn strip(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

fn digests(headers: &reqwest::header::HeaderMap) -> Vec<Checksum> {
    headers
        .get_all("digest")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Checksum::parse_digest_header)
        .collect()
}

enum Chunk {
    Data(Bytes),
    Done,
}

/// The writer thread: hash, write through a buffer, start writeback as it goes, fsync at the
/// end. Without `Done` (the attempt was abandoned) it returns an error.
fn write_part(
    file: std::fs::File,
    mut rx: mpsc::Receiver<Chunk>,
    algos: &[ChecksumAlgo],
    path: &Path,
) -> Result<(u64, Vec<Checksum>), TransferError> {
    use std::io::Write;
    let io = |what| TransferError::io(what, path);
    let mut hasher = Hasher::new(algos);
    let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut written = 0u64;
    let mut since_writeback = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        match chunk {
            Chunk::Data(data) => {
                hasher.update(&data);
                out.write_all(&data).map_err(io("cannot write"))?;
                written += data.len() as u64;
                since_writeback += data.len() as u64;
                if since_writeback >= WRITEBACK_EVERY {
                    out.flush().map_err(io("cannot write"))?;
                    fsutil::start_writeback(out.get_ref());
                    since_writeback = 0;
                }
            }
            Chunk::Done => {
                let file = out
                    .into_inner()
                    .map_err(|e| io("cannot write")(e.into_error()))?;
                file.sync_all().map_err(io("cannot fsync"))?;
                return Ok((written, hasher.finish()));
            }
        }
    }
    Err(io("transfer abandoned")(std::io::Error::from(
        std::io::ErrorKind::Interrupted,
    )))
}

/// Existing destinations up to this size are hashed on the async thread.
const INLINE_HASH_MAX: u64 = 256 * 1024;

fn hash_file(path: &Path, algos: &[ChecksumAlgo]) -> std::io::Result<Vec<Checksum>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Hasher::new(algos);
    // A small file gets a small buffer: zeroing 1 MiB to hash 1 KiB dominated re-checks.
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; (len + 1).clamp(4096, 1 << 20) as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

pub fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / 1e6 / elapsed.as_secs_f64().max(1e-6)
}

/// `217 MB`, decimal units as the original tool printed.
pub use dcflow_core::text::human_bytes;
