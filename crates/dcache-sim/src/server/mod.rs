//! The door and the pool: two TLS listeners sharing one namespace.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use md5::{Digest as _, Md5};
use percent_encoding::percent_decode_str;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::billing::{iso_offset_date_time, BillingLog, Msg};
use crate::faults::{secs, Fault, FaultRule, Faults, Stage};
use crate::pki::{owner_dn, provider, GridClientVerifier, Pki, PkiFiles, ProxyKey};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

mod billing;
mod door;
mod events;
mod pool;
mod tape;
mod webdav;

use billing::*;
use door::*;
use events::*;
use pool::*;
use webdav::*;

const DOOR_CELL: &str = "WebDAV-sim-door";
const DOOR_DOMAIN: &str = "webdav-simDomain";
const POOL_CELL: &str = "pool-sim-1";
const POOL_DOMAIN: &str = "sim-pool-1-Domain";
const CHUNK: usize = 256 * 1024;

/// Order of the pool `transfer` and door `request` messages of one upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingOrder {
    PoolFirst,
    DoorFirst,
    Random,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// State folder: PKI files, token, stored files.
    pub dir: PathBuf,
    /// Namespace path served at the door's `/`, e.g. `/pnfs/example.org/data`.
    pub root: String,
    /// Billing messages are appended here as JSONL.
    pub billing_file: Option<PathBuf>,
    pub order: BillingOrder,
    /// 302 (dCache's default) or 307.
    pub redirect_status: u16,
    /// The pool answers `Want-Digest` on GET (else only the door's HEAD does).
    pub digest_on_get: bool,
    /// Files have checksums (false: like files written without any, no `Digest` at all).
    pub checksums: bool,
    pub proxy_key: ProxyKey,
    pub door_port: u16,
    pub pool_port: u16,
    /// Also publish billing messages to Kafka, as dCache does.
    pub kafka: Option<SimKafka>,
    /// Bill downloads (the pool's read `transfer` and the door's `request`), as dCache does
    /// (default). Off for tests that count the messages they published themselves.
    pub bill_reads: bool,
}

pub use crate::kafka::SimKafka;

impl SimConfig {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            root: "/pnfs/example.org/data".into(),
            billing_file: Some(dir.join("billing.jsonl")),
            order: BillingOrder::Random,
            redirect_status: 302,
            digest_on_get: true,
            checksums: true,
            proxy_key: ProxyKey::RsaPkcs1,
            door_port: 0,
            pool_port: 0,
            kafka: None,
            bill_reads: true,
        }
    }
}

#[derive(Debug, Clone)]
struct FileMeta {
    pnfsid: String,
    size: u64,
    adler32: u32,
    md5: [u8; 16],
    visible_at: Instant,
    /// `srm:FileLocality`: ONLINE unless a test says otherwise (tape).
    locality: String,
    /// `srm:RetentionPolicy` CUSTODIAL (flushed to tape) rather than REPLICA (disk only).
    custodial: bool,
}

struct State {
    cfg: SimConfig,
    storage: PathBuf,
    files: Mutex<HashMap<String, FileMeta>>,
    uploading: Mutex<HashSet<String>>,
    /// One-time pool uuid → (door path, who asked, from where): the pool bills the read.
    uuids: Mutex<HashMap<String, (String, Identity, SocketAddr)>>,
    faults: Faults,
    billing: BillingLog,
    tokens: HashSet<String>,
    pool_origin: String,
    pool_auth_headers: Mutex<Vec<String>>,
    pool_gets: AtomicU64,
    door_gets: AtomicU64,
    /// When each door HEAD that a `Hang` fault holds arrived.
    hung_heads: Mutex<Vec<Instant>>,
    frontend: crate::frontend::Frontend,
    tape: Mutex<tape::Tape>,
}

/// A running emulator. Dropping it stops both listeners.
pub struct Sim {
    state: Arc<State>,
    /// `https://localhost:<port>`: the WebDAV door (namespace root `cfg.root`).
    pub door_url: String,
    /// `https://127.0.0.1:<port>`: the pool, another host name than the door's.
    pub pool_url: String,
    pub pki: PkiFiles,
    /// A bearer token the door accepts, and a file holding it.
    pub token: String,
    pub token_file: PathBuf,
    /// An HTTPS client trusting the emulator's CA, for [`Sim::upload`].
    client: reqwest::Client,
    /// The listeners' ports and TLS settings, to listen again after [`Sim::halt`].
    listeners: Vec<(u16, rustls::ServerConfig, Role)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Sim {
    pub async fn start(cfg: SimConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.dir)?;
        let storage = cfg.dir.join("namespace");
        std::fs::create_dir_all(&storage)?;
        let pki = Pki::create(&cfg.dir, cfg.proxy_key).context("creating the test PKI")?;
        let token = format!("sim.{}", uuid::Uuid::new_v4().simple());
        let token_file = cfg.dir.join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        }

        let door_listener = TcpListener::bind(("127.0.0.1", cfg.door_port)).await?;
        let pool_listener = TcpListener::bind(("127.0.0.1", cfg.pool_port)).await?;
        let door_url = format!("https://localhost:{}", door_listener.local_addr()?.port());
        let pool_url = format!("https://127.0.0.1:{}", pool_listener.local_addr()?.port());

        // TLS 1.3 only at the door: proxy certificates are checked without WebPKI, which
        // rustls offers for TLS 1.3 handshake signatures only.
        let door_tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(GridClientVerifier::new(&pki.ca_der)))
            .with_single_cert(pki.server_chain.clone(), pki.server_key())?;
        let pool_tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(pki.server_chain.clone(), pki.server_key())?;

        let state = Arc::new(State {
            billing: BillingLog::new(
                cfg.billing_file.as_deref(),
                crate::kafka::kafka_sink(cfg.kafka.as_ref()).await?,
            )?,
            cfg,
            storage,
            files: Mutex::default(),
            uploading: Mutex::default(),
            uuids: Mutex::default(),
            faults: Faults::default(),
            tokens: HashSet::from([token.clone()]),
            pool_origin: pool_url.clone(),
            pool_auth_headers: Mutex::default(),
            pool_gets: AtomicU64::new(0),
            door_gets: AtomicU64::new(0),
            hung_heads: Mutex::default(),
            frontend: Default::default(),
            tape: Mutex::default(),
        });
        *state.frontend.base.lock().expect("lock") = door_url.clone();
        let listeners = vec![
            (door_listener.local_addr()?.port(), door_tls, Role::Door),
            (pool_listener.local_addr()?.port(), pool_tls, Role::Pool),
        ];
        let tasks = vec![
            tokio::spawn(serve(
                door_listener,
                listeners[0].1.clone(),
                state.clone(),
                Role::Door,
            )),
            tokio::spawn(serve(
                pool_listener,
                listeners[1].1.clone(),
                state.clone(),
                Role::Pool,
            )),
        ];
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_der(&pki.ca_der)?)
            .build()?;
        Ok(Self {
            state,
            door_url,
            pool_url,
            pki: pki.files,
            token,
            token_file,
            client,
            listeners,
            tasks,
        })
    }

    /// Stops the door and the pool as a dCache restart does: both listeners close and every
    /// open connection is cut mid-request. The namespace (files, pnfsids, checksums), the
    /// billing output, the credentials and the faults survive; [`Sim::resume`] listens again.
    pub fn halt(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    /// Listens again, on the same ports, after [`Sim::halt`].
    pub async fn resume(&mut self) -> Result<()> {
        anyhow::ensure!(self.tasks.is_empty(), "the emulator is running");
        for (port, tls, role) in &self.listeners {
            let listener = TcpListener::bind(("127.0.0.1", *port))
                .await
                .with_context(|| format!("listening again on port {port}"))?;
            self.tasks.push(tokio::spawn(serve(
                listener,
                tls.clone(),
                self.state.clone(),
                *role,
            )));
        }
        Ok(())
    }

    /// The frontend (storage events over SSE), served at the door's address under
    /// `/api/v1/events`: to cut streams, forget channels, evict replay buffers, overflow.
    pub fn frontend(&self) -> &crate::frontend::Frontend {
        &self.state.frontend
    }

    pub fn add_fault(&self, path: &str, fault: Fault, times: Option<u32>) {
        self.state.faults.add(FaultRule {
            path: path.to_owned(),
            fault,
            times,
        });
    }
    pub fn clear_faults(&self) {
        self.state.faults.clear();
    }
    /// How many times faults fired on a door path.
    pub fn faults_fired(&self, path: &str) -> u32 {
        self.state.faults.fired(path)
    }
    /// Waits until the billing messages emitted so far are on the Kafka broker.
    pub fn flush_billing(&self) {
        self.state.billing.flush();
    }

    /// Emits `n` billing messages of the traffic around uploads: reads (pool transfer and door
    /// request), p2p copies, flushes to tape, cache hits, removes.
    pub fn background(&self, n: usize) {
        for i in 0..n {
            self.state
                .billing
                .emit(&background_message(&self.state.cfg.root, i));
        }
    }

    /// Every billing message emitted so far, as JSON lines.
    pub fn billing_messages(&self) -> Vec<String> {
        self.state.billing.messages()
    }
    /// `Authorization` headers the pool received (it must receive none).
    pub fn pool_authorization_headers(&self) -> Vec<String> {
        self.state.pool_auth_headers.lock().expect("lock").clone()
    }
    pub fn pool_gets(&self) -> u64 {
        self.state.pool_gets.load(Ordering::Relaxed)
    }
    /// When each door HEAD held by a `Hang` fault arrived, in order.
    pub fn hung_head_starts(&self) -> Vec<Instant> {
        self.state.hung_heads.lock().expect("lock").clone()
    }

    pub fn door_gets(&self) -> u64 {
        self.state.door_gets.load(Ordering::Relaxed)
    }
    /// The namespace path of a door path (`/lsst/x` → `/pnfs/example.org/data/lsst/x`).
    pub fn namespace_path(&self, door_path: &str) -> String {
        format!("{}{}", self.state.cfg.root, door_path)
    }
    /// Uploads `data` to a door path (`/lsst/a b/f`, not encoded) as a user would: PUT at the
    /// door with the bearer token, checked for 201. Each upload emits its billing messages.
    pub async fn upload(&self, door_path: &str, data: Vec<u8>) -> Result<()> {
        let mut url = reqwest::Url::parse(&self.door_url)?;
        url.path_segments_mut()
            .map_err(|_| anyhow::anyhow!("door URL cannot have a path"))?
            .pop_if_empty()
            .extend(door_path.trim_start_matches('/').split('/'));
        let resp = self
            .client
            .put(url)
            .bearer_auth(&self.token)
            .body(data)
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().as_u16() == 201,
            "upload of {door_path}: {}",
            resp.status()
        );
        Ok(())
    }

    /// Where the emulator stores a door path's bytes.
    /// The pool flushes the file to tape: a `store` billing message; the disk copy stays
    /// (locality ONLINE_AND_NEARLINE).
    pub fn flush_to_tape(&self, door_path: &str) {
        let msg = {
            let mut files = self.state.files.lock().expect("lock");
            let Some(meta) = files.get_mut(door_path) else {
                return;
            };
            meta.locality = "ONLINE_AND_NEARLINE".into();
            meta.custodial = true;
            tape::tape_message(
                "store",
                &meta.pnfsid,
                &self.namespace_path(door_path),
                meta.size,
            )
        };
        self.state.billing.emit(&msg);
    }

    /// The file's locality as the door reports it (`ONLINE`; `NEARLINE`: of a file flushed to
    /// tape, on tape only, a GET hangs as a restore does; of a file never flushed (REPLICA),
    /// dCache's answer for a disk copy on a pool that does not serve reads: a GET works, a
    /// stage is refused; `ONLINE_AND_NEARLINE`; `LOST`; `UNAVAILABLE`).
    pub fn set_locality(&self, door_path: &str, locality: &str) {
        if let Some(meta) = self.state.files.lock().expect("lock").get_mut(door_path) {
            meta.locality = locality.into();
        }
    }

    /// How long a stage takes (the tape's speed).
    pub fn set_stage_delay(&self, delay: Duration) {
        self.state.tape.lock().expect("lock").delay = delay;
    }

    /// The stage of this file fails, with dCache's reason.
    pub fn fail_stage(&self, door_path: &str, why: &str) {
        self.state
            .tape
            .lock()
            .expect("lock")
            .failures
            .insert(door_path.into(), why.into());
    }

    /// The stage requests received, each its namespace paths.
    pub fn stage_requests(&self) -> Vec<Vec<String>> {
        self.state.tape.lock().expect("lock").history.clone()
    }

    /// The namespace paths released so far.
    pub fn released(&self) -> Vec<String> {
        self.state.tape.lock().expect("lock").released.clone()
    }

    /// GETs of files on tape only (none, when the client stages first).
    pub fn nearline_gets(&self) -> u64 {
        self.state.tape.lock().expect("lock").nearline_gets
    }

    /// A file that was there before anyone listened: stored with its namespace entry (a new
    /// pnfsid, checksums), no billing message, no SSE event. For trees too large to upload
    /// one request at a time in a test.
    pub fn preload(&self, door_path: &str, data: &[u8]) -> Result<()> {
        let target = self.stored_file(door_path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, data)?;
        let mut adler = adler2::Adler32::new();
        adler.write_slice(data);
        let meta = FileMeta {
            pnfsid: format!("0000{}", uuid::Uuid::new_v4().simple()).to_ascii_uppercase(),
            size: data.len() as u64,
            adler32: adler.checksum(),
            md5: Md5::digest(data).into(),
            visible_at: Instant::now(),
            locality: "ONLINE".to_owned(),
            custodial: false,
        };
        self.state
            .files
            .lock()
            .expect("lock")
            .insert(door_path.to_owned(), meta);
        Ok(())
    }

    pub fn stored_file(&self, door_path: &str) -> PathBuf {
        self.state.storage.join(door_path.trim_start_matches('/'))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Door,
    Pool,
}

async fn serve(listener: TcpListener, tls: rustls::ServerConfig, state: Arc<State>, role: Role) {
    let mut tls = tls;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    // Owned here, so that aborting this task (Sim::halt) cuts every connection too.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        connections.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(error = %e, "tls handshake failed");
                    return;
                }
            };
            let certs: Option<Arc<Vec<CertificateDer<'static>>>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            let svc = service_fn(move |req| {
                let state = state.clone();
                let certs = certs.clone();
                async move {
                    match role {
                        Role::Door => door(state, certs, peer, req).await,
                        Role::Pool => pool(state, req).await,
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(
            Full::new(body.into())
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
        )
        .expect("response")
}

/// (`/a/b`, `c`) of `/a/b/c`; the root's parent is `""`.
fn split_path(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

/// Creates the directories of door path `dir` that do not exist yet, each announced as
/// `IN_CREATE IN_ISDIR` in its parent. True if the last one was created here.
async fn create_dirs(state: &State, dir: &str) -> std::io::Result<bool> {
    let mut current = String::new();
    let mut created = false;
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        let parent = current.clone();
        current.push('/');
        current.push_str(part);
        let on_disk = state.storage.join(current.trim_start_matches('/'));
        created = match tokio::fs::create_dir(&on_disk).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        if created {
            state.frontend.notify(
                &format!("{}{}", state.cfg.root, parent),
                Some(part),
                &["IN_CREATE", "IN_ISDIR"],
                None,
            );
        }
    }
    Ok(created)
}
