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

/// dCache's Kafka billing output.
#[derive(Debug, Clone)]
pub struct SimKafka {
    pub brokers: String,
    pub topic: String,
    /// dCache's billing topic usually has one partition.
    pub partitions: i32,
}

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

/// Door path from the request URI: percent-decoded, no `..`.
fn door_path(req: &Request<Incoming>) -> Option<String> {
    let raw = req.uri().path();
    let decoded = percent_decode_str(raw).decode_utf8().ok()?.into_owned();
    if decoded.split('/').any(|p| p == ".." || p == ".") || decoded.contains('\0') {
        return None;
    }
    Some(decoded)
}

/// Who the client is: the end-entity DN of its certificate chain, or the token's subject.
#[derive(Clone)]
enum Identity {
    Cert(String),
    Token,
}

fn authenticate(
    state: &State,
    certs: Option<&Vec<CertificateDer<'static>>>,
    req: &Request<Incoming>,
) -> Option<Identity> {
    if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        let token = auth.to_str().ok()?.strip_prefix("Bearer ")?.trim();
        return state.tokens.contains(token).then_some(Identity::Token);
    }
    certs.and_then(|c| owner_dn(c)).map(Identity::Cert)
}

async fn door(
    state: Arc<State>,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if req.uri().path() == "/.sim/faults" {
        return control(&state, req).await;
    }
    let Some(identity) = authenticate(&state, certs.as_deref(), &req) else {
        let mut r = full(StatusCode::UNAUTHORIZED, "Unauthorized\n");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"dcache-sim\"".parse().expect("header"),
        );
        return Ok(r);
    };
    if req.uri().path().starts_with("/api/v1/events/") {
        return events(state, req).await;
    }
    let Some(path) = door_path(&req) else {
        return Ok(full(StatusCode::BAD_REQUEST, "bad path\n"));
    };
    match req.method().as_str() {
        "GET" | "HEAD" => door_read(state, identity, peer, req, path).await,
        "PUT" => put(state, identity, peer, req, path).await,
        "DELETE" => delete(state, identity, peer, path).await,
        "MKCOL" => {
            let created = create_dirs(&state, &path).await?;
            Ok(full(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::METHOD_NOT_ALLOWED
                },
                "",
            ))
        }
        "PROPFIND" => propfind(&state, &req, &path).await,
        _ => Ok(full(StatusCode::METHOD_NOT_ALLOWED, "")),
    }
}

/// `POST /.sim/faults` with a [`FaultRule`] adds it; `DELETE` clears all.
async fn control(state: &State, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    match *req.method() {
        Method::DELETE => {
            state.faults.clear();
            Ok(full(StatusCode::NO_CONTENT, ""))
        }
        Method::POST => {
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            match serde_json::from_slice::<FaultRule>(&body) {
                Ok(rule) => {
                    state.faults.add(rule);
                    Ok(full(StatusCode::CREATED, ""))
                }
                Err(e) => Ok(full(StatusCode::BAD_REQUEST, format!("{e}\n"))),
            }
        }
        _ => Ok(full(StatusCode::METHOD_NOT_ALLOWED, "")),
    }
}

/// Algorithms named in `Want-Digest` (RFC 3230), lower-cased, q-values ignored.
fn wanted_digests(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get("want-digest")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .filter_map(|p| p.split(';').next())
                .map(|p| p.trim().to_ascii_lowercase())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// `Digest: adler32=<8 lower-case hex>,md5=<base64>` for the wanted algorithms dCache knows.
fn digest_header(meta: &FileMeta, wanted: &[String], wrong: bool) -> Option<String> {
    let mut parts = Vec::new();
    for algo in wanted {
        match algo.as_str() {
            "adler32" => {
                let v = if wrong {
                    meta.adler32 ^ 0x0101_0101
                } else {
                    meta.adler32
                };
                parts.push(format!("adler32={v:08x}"));
            }
            "md5" => {
                let mut v = meta.md5;
                if wrong {
                    v[0] ^= 0xff;
                }
                parts.push(format!(
                    "md5={}",
                    base64::engine::general_purpose::STANDARD.encode(v)
                ));
            }
            _ => {}
        }
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

async fn door_read(
    state: Arc<State>,
    identity: Identity,
    peer: SocketAddr,
    req: Request<Incoming>,
    path: String,
) -> Result<Response<Body>, std::io::Error> {
    let is_get = req.method() == Method::GET;
    if is_get {
        state.door_gets.fetch_add(1, Ordering::Relaxed);
    }
    let door_fault = state.faults.take(&path, Stage::Door);
    match door_fault {
        Some(Fault::Status { code }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(full(status, format!("injected {code}\n")));
        }
        Some(Fault::Reset) => return Err(std::io::Error::other("injected connection reset")),
        Some(Fault::Hang) => {
            if !is_get {
                state.hung_heads.lock().expect("lock").push(Instant::now());
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Err(std::io::Error::other("hang ended"));
        }
        _ => {}
    }
    if state.uploading.lock().expect("lock").contains(&path) {
        if is_get {
            let msg = door_request(
                &state,
                &identity,
                peer,
                &path,
                None,
                10022,
                "File upload not yet completed",
                None,
            );
            state.billing.emit(&msg);
        }
        return Ok(full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "File upload not yet completed\n",
        ));
    }
    let meta = state.files.lock().expect("lock").get(&path).cloned();
    let Some(meta) = meta.filter(|m| Instant::now() >= m.visible_at) else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    if !is_get {
        let wrong = state.faults.take(&path, Stage::Digest).is_some();
        let mut r = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, meta.size)
            .header(header::ETAG, format!("\"{}_0\"", meta.pnfsid));
        if let Some(d) =
            digest_header(&meta, &wanted_digests(&req), wrong).filter(|_| state.cfg.checksums)
        {
            r = r.header("Digest", d);
        }
        return Ok(r
            .body(
                Full::new(Bytes::new())
                    .map_err(|e: Infallible| match e {})
                    .boxed_unsync(),
            )
            .expect("response"));
    }
    let uuid = uuid::Uuid::new_v4().to_string();
    state
        .uuids
        .lock()
        .expect("lock")
        .insert(uuid.clone(), (path.clone(), identity.clone(), peer));
    // As dCache 12.0.1 redirects: the one-time uuid and the door it came from.
    let door_ref: String = url_escape(
        state
            .frontend
            .base
            .lock()
            .expect("lock")
            .trim_end_matches('/'),
    );
    let mut location = format!(
        "{}{}?dcache-http-uuid={uuid}&dcache-http-ref={door_ref}",
        state.pool_origin,
        req.uri().path()
    );
    if door_fault == Some(Fault::RedirectHttp) {
        location = location.replacen("https://", "http://", 1);
    }
    let status = StatusCode::from_u16(state.cfg.redirect_status).unwrap_or(StatusCode::FOUND);
    Ok(Response::builder()
        .status(status)
        .header(header::LOCATION, location)
        .body(
            Full::new(Bytes::new())
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
        )
        .expect("response"))
}

async fn pool(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    if let Some(a) = req.headers().get(header::AUTHORIZATION) {
        state
            .pool_auth_headers
            .lock()
            .expect("lock")
            .push(String::from_utf8_lossy(a.as_bytes()).into_owned());
    }
    if req.method() != Method::GET {
        return Ok(full(StatusCode::METHOD_NOT_ALLOWED, ""));
    }
    let uuid = req
        .uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("dcache-http-uuid="))
        })
        .map(str::to_owned);
    let Some(uuid) = uuid else {
        return Ok(full(
            StatusCode::BAD_REQUEST,
            "Query string does not include any UUID.\n",
        ));
    };
    let Some(path) = door_path(&req) else {
        return Ok(full(StatusCode::BAD_REQUEST, "bad path\n"));
    };
    // One-time: removed on first use.
    let known = state.uuids.lock().expect("lock").remove(&uuid);
    let Some((_, identity, peer)) = known.filter(|(p, _, _)| p == &path) else {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "Request is no longer valid. Please resubmit to door.\n",
        ));
    };
    state.pool_gets.fetch_add(1, Ordering::Relaxed);
    let meta = state.files.lock().expect("lock").get(&path).cloned();
    let Some(meta) = meta else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    let file = tokio::fs::File::open(state.storage.join(path.trim_start_matches('/'))).await?;
    let fault = state.faults.take(&path, Stage::Pool);
    let mut r = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, meta.size);
    if state.cfg.digest_on_get {
        let wrong = state.faults.take(&path, Stage::Digest).is_some();
        if let Some(d) =
            digest_header(&meta, &wanted_digests(&req), wrong).filter(|_| state.cfg.checksums)
        {
            r = r.header("Digest", d);
        }
    }
    // Once the whole body is sent, dCache bills the read: the pool's `transfer` (isWrite
    // "read") and the door's `request` (without moverInfo), as dCache 12.0.1 publishes them.
    // (At the last byte: with a Content-Length, hyper does not poll the body to its end.)
    let started = Instant::now();
    let size = meta.size;
    let state_bills_reads = state.cfg.bill_reads;
    let bill = move || {
        let ns_path = format!("{}{}", state.cfg.root, path);
        let (pool_msg, _) = pool_transfer(&meta, &ns_path, &ns_path, started.elapsed(), "read");
        state.billing.emit(&pool_msg);
        let door = door_request(&state, &identity, peer, &path, Some(&meta), 0, "", None);
        state.billing.emit(&door);
    };
    let mut bill = Some(bill).filter(|_| state_bills_reads);
    if size == 0 {
        if let Some(b) = bill.take() {
            b();
        }
    }
    let mut sent = 0u64;
    let billed = file_stream(file, fault).inspect(move |chunk| {
        if let Ok(c) = chunk {
            sent += c.len() as u64;
            if sent >= size {
                if let Some(b) = bill.take() {
                    b();
                }
            }
        }
    });
    let body = StreamBody::new(billed.map(|r| r.map(Frame::data)));
    Ok(r.body(body.boxed_unsync()).expect("response"))
}

/// The file's bytes in chunks, with a pool fault applied on the wire.
fn file_stream(
    file: tokio::fs::File,
    fault: Option<Fault>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    struct S {
        file: tokio::fs::File,
        sent: u64,
        fault: Option<Fault>,
        done: bool,
    }
    let start = Instant::now();
    futures_util::stream::unfold(
        S {
            file,
            sent: 0,
            fault,
            done: false,
        },
        move |mut s| async move {
            if s.done {
                return None;
            }
            let mut buf = BytesMut::zeroed(CHUNK);
            let mut limit = CHUNK;
            match s.fault {
                Some(Fault::Truncate { at }) | Some(Fault::Stall { at, .. }) if s.sent < at => {
                    limit = limit.min((at - s.sent) as usize);
                }
                Some(Fault::Truncate { at }) if s.sent >= at => {
                    s.done = true;
                    // Let what was sent reach the client before the connection drops.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Some((Err(std::io::Error::other("injected truncation")), s));
                }
                Some(Fault::Stall { seconds, .. }) => {
                    tokio::time::sleep(secs(seconds)).await;
                    s.fault = None;
                }
                _ => {}
            }
            let n = match s.file.read(&mut buf[..limit]).await {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
            };
            buf.truncate(n);
            match s.fault {
                Some(Fault::FlipByte { at }) if at >= s.sent && at < s.sent + n as u64 => {
                    buf[(at - s.sent) as usize] ^= 0x5a;
                }
                Some(Fault::SlowLink { bytes_per_second }) if bytes_per_second > 0 => {
                    let due = Duration::from_secs_f64(
                        (s.sent + n as u64) as f64 / bytes_per_second as f64,
                    );
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                _ => {}
            }
            s.sent += n as u64;
            Some((Ok(buf.freeze()), s))
        },
    )
}

async fn put(
    state: Arc<State>,
    identity: Identity,
    peer: SocketAddr,
    req: Request<Incoming>,
    path: String,
) -> Result<Response<Body>, std::io::Error> {
    let started = Instant::now();
    let target = state.storage.join(path.trim_start_matches('/'));
    let (dir, name) = split_path(&path);
    create_dirs(&state, dir).await?;
    let ns_dir = format!("{}{}", state.cfg.root, dir);
    state.uploading.lock().expect("lock").insert(path.clone());
    let tmp = target.with_file_name(format!(".upload-{}", uuid::Uuid::new_v4().simple()));
    // Benchmark aid (not dCache): `X-Sim-Link: <door path>` stores a hard link to a file
    // already uploaded instead of a body, so that 64 files of 1 GiB take 1 GiB of disk.
    let link_from = req
        .headers()
        .get("x-sim-link")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let result = async {
        if let Some(from) = link_from {
            let meta = state.files.lock().expect("lock").get(&from).cloned();
            let meta =
                meta.ok_or_else(|| std::io::Error::other(format!("no file {from} to link")))?;
            tokio::fs::hard_link(state.storage.join(from.trim_start_matches('/')), &tmp).await?;
            tokio::fs::rename(&tmp, &target).await?;
            return Ok((meta.size, meta.adler32, meta.md5));
        }
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut adler = adler2::Adler32::new();
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Some(data) = frame.data_ref() {
                adler.write_slice(data);
                md5.update(data);
                size += data.len() as u64;
                file.write_all(data).await?;
            }
        }
        file.flush().await?;
        drop(file);
        tokio::fs::rename(&tmp, &target).await?;
        Ok::<_, std::io::Error>((size, adler.checksum(), md5.finalize().into()))
    }
    .await;
    state.uploading.lock().expect("lock").remove(&path);
    let (size, adler32, md5) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let pnfsid = format!("0000{}", uuid::Uuid::new_v4().simple()).to_ascii_uppercase();
    let upload_dir = match state.faults.peek(&path, Stage::Upload) {
        Some(Fault::UploadDir { seconds }) => Some(seconds),
        _ => None,
    };
    if upload_dir.is_none() {
        // The door creates the entry when the upload starts; the pool closes it once the
        // namespace has the size and checksum (fixtures/sse/03-stream-webdav-upload.txt).
        state
            .frontend
            .notify(&ns_dir, Some(name), &["IN_CREATE"], None);
    }
    let meta = FileMeta {
        pnfsid: pnfsid.clone(),
        size,
        adler32,
        md5,
        visible_at: Instant::now() + secs(upload_dir.unwrap_or(0)),
    };
    state
        .files
        .lock()
        .expect("lock")
        .insert(path.clone(), meta.clone());
    let elapsed = started.elapsed();
    let billing_path = format!("{}{}", state.cfg.root, path);
    match upload_dir {
        None => {
            let mover = pool_transfer(&meta, &billing_path, &billing_path, elapsed, "write");
            let door_msg = door_request(
                &state,
                &identity,
                peer,
                &path,
                Some(&meta),
                0,
                "",
                Some(mover.1),
            );
            let door_first = match state.cfg.order {
                BillingOrder::DoorFirst => true,
                BillingOrder::PoolFirst => false,
                BillingOrder::Random => rand::random(),
            };
            if door_first {
                state.billing.emit(&door_msg);
                state.billing.emit(&mover.0);
            } else {
                state.billing.emit(&mover.0);
                state.billing.emit(&door_msg);
            }
            state
                .frontend
                .notify(&ns_dir, Some(name), &["IN_CLOSE_WRITE"], None);
        }
        Some(seconds) => {
            // SRM / upload-directory flow: written under /upload, visible at its final
            // path only once committed; putDone (dCache >= 10.1) announces the commit.
            let name = path.rsplit('/').next().unwrap_or("file");
            let transfer_path = format!(
                "/upload/{}/{}/{name}",
                rand::random::<u8>() % 16,
                uuid::Uuid::new_v4()
            );
            let (pool_msg, _) =
                pool_transfer(&meta, &billing_path, &transfer_path, elapsed, "write");
            state.billing.emit(&pool_msg);
            let state2 = state.clone();
            let (ns_dir, name) = (ns_dir.clone(), name.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(secs(seconds)).await;
                let msg = srm_put_done(&meta, &billing_path, &transfer_path);
                state2.billing.emit(&msg);
                // The commit renames the file out of the upload directory.
                let cookie = base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(&uuid::Uuid::new_v4().as_bytes()[..12]);
                state2
                    .frontend
                    .notify(&ns_dir, Some(&name), &["IN_MOVED_TO"], Some(&cookie));
            });
        }
    }
    Ok(full(StatusCode::CREATED, ""))
}

async fn delete(
    state: Arc<State>,
    identity: Identity,
    peer: SocketAddr,
    path: String,
) -> Result<Response<Body>, std::io::Error> {
    let meta = state.files.lock().expect("lock").remove(&path);
    let Some(meta) = meta else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    tokio::fs::remove_file(state.storage.join(path.trim_start_matches('/'))).await?;
    let (dir, name) = split_path(&path);
    state.frontend.notify(
        &format!("{}{}", state.cfg.root, dir),
        Some(name),
        &["IN_DELETE"],
        None,
    );
    let billing_path = format!("{}{}", state.cfg.root, path);
    let (uid, subject, owner) = principal(&identity, peer);
    let msg = door_common(&state, "remove", peer, &path, &subject, uid, owner)
        .put("sessionDuration", 0)
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", &billing_path)
        .put("fileSize", meta.size)
        .put("status", serde_json::json!({"code": 0, "msg": ""}));
    state.billing.emit(&msg);
    let pool_session = format!("pool:{POOL_CELL}@{POOL_DOMAIN}:{}", session_id());
    let pool_msg = Msg::default()
        .put("version", "1.0")
        .put("msgType", "remove")
        .put("date", now())
        .put("queuingTime", 0)
        .put("transaction", &pool_session)
        .put("session", &pool_session)
        .put("cellName", POOL_CELL)
        .put("cellType", "pool")
        .put("cellDomain", POOL_DOMAIN)
        .put("status", serde_json::json!({"code": 0, "msg": "[>cleaner-disk@namespaceDomain] [PoolRemoveFilesMessage]"}))
        .put("subject", ["UidPrincipal[0]", "GidPrincipal[0,primary]"])
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", "Unknown")
        .put("fileSize", meta.size)
        .put("storageInfo", "disk:sim@osm");
    state.billing.emit(&pool_msg);
    Ok(full(StatusCode::NO_CONTENT, ""))
}

fn now() -> String {
    let offset = time::UtcOffset::from_hms(2, 0, 0).expect("offset");
    iso_offset_date_time(OffsetDateTime::now_utc().to_offset(offset))
}

fn session_id() -> String {
    format!(
        "{}:{}",
        uuid::Uuid::new_v4().simple(),
        OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000
    )
}

fn principal(identity: &Identity, peer: SocketAddr) -> (u32, Vec<String>, Option<String>) {
    let ip = peer.ip().to_string();
    match identity {
        Identity::Cert(dn) => (
            3915,
            vec![
                "UidPrincipal[3915]".into(),
                "GidPrincipal[239,primary]".into(),
                "UserNamePrincipal[jdoe]".into(),
                format!("Origin[{ip}]"),
                format!("GlobusPrincipal[{dn}]"),
            ],
            Some(dn.clone()),
        ),
        Identity::Token => (
            3915,
            vec![
                "UidPrincipal[3915]".into(),
                "GidPrincipal[239,primary]".into(),
                "UserNamePrincipal[jdoe]".into(),
                format!("Origin[{ip}]"),
                "OidcSubjectPrincipal[jdoe@https://sim.example.org]".into(),
            ],
            // Without a DN, dCache's owner is the user name (DoorRequestInfoMessage;
            // dCache 12.0.1 wrote "owner":"admin" for a macaroon of admin).
            Some("jdoe".into()),
        ),
    }
}

fn door_common(
    state: &State,
    kind: &str,
    peer: SocketAddr,
    path: &str,
    subject: &[String],
    uid: u32,
    owner: Option<String>,
) -> Msg {
    let ip = peer.ip().to_string();
    Msg::default()
        .put("VERSION", "1.0")
        .put("msgType", kind)
        .put("date", now())
        .put("queuingTime", 0)
        .put("cellName", DOOR_CELL)
        .put("cellType", "door")
        .put("cellDomain", DOOR_DOMAIN)
        .put(
            "session",
            format!("door:{DOOR_CELL}@{DOOR_DOMAIN}:{}", session_id()),
        )
        .put("transferPath", format!("{}{}", state.cfg.root, path))
        .put("subject", subject)
        .put("client", &ip)
        .put("clientChain", &ip)
        .put("mappedUID", uid)
        .put("mappedGID", 239)
        .put("owner", owner)
}

/// The pool's `transfer` message (first) and its `moverInfo` form for the door (second).
fn pool_transfer(
    meta: &FileMeta,
    billing_path: &str,
    transfer_path: &str,
    elapsed: Duration,
    direction: &str,
) -> (Msg, Msg) {
    let ms = elapsed.as_millis().max(1) as u64;
    let bandwidth = meta.size as f64 / elapsed.as_secs_f64().max(1e-3);
    let session = format!("pool:{POOL_CELL}@{POOL_DOMAIN}:{}", session_id());
    let protocol = serde_json::json!({"protocol":"Https","versionMajor":1,"versionMinor":1,"transferTag":"","port":53412,"host":"127.0.0.1"});
    let (bw, idle, active) = if direction == "read" {
        ("meanReadBandwidth", "readIdle", "readActive")
    } else {
        ("meanWriteBandwidth", "writeIdle", "writeActive")
    };
    let common = |m: Msg| {
        m.put("version", "1.0")
            .put("msgType", "transfer")
            .put("date", now())
            .put("queuingTime", 0)
            .put("cellName", POOL_CELL)
            .put("cellType", "pool")
            .put("cellDomain", POOL_DOMAIN)
            .put_double(bw, bandwidth)
            .put(idle, "PT0.004S")
            .put(active, format!("PT{}.{:03}S", ms / 1000, ms % 1000))
            .put("localEndpoint", "127.0.0.1:24125")
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("session", &session)
            .put("transferSize", meta.size)
            .put("transferTime", ms)
            .put("isWrite", direction)
            .put("protocolInfo", &protocol)
            .put("isP2p", false)
            .put("transferPath", transfer_path)
    };
    let full_msg = common(Msg::default())
        .put(
            "subject",
            ["UidPrincipal[3915]", "GidPrincipal[239,primary]"],
        )
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", billing_path)
        .put("fileSize", meta.size)
        .put("storageInfo", "disk:sim@osm")
        .put(
            "initiator",
            format!("door:{DOOR_CELL}@{DOOR_DOMAIN}:{}", session_id()),
        );
    (full_msg, common(Msg::default()))
}

#[allow(clippy::too_many_arguments)]
fn door_request(
    state: &State,
    identity: &Identity,
    peer: SocketAddr,
    path: &str,
    meta: Option<&FileMeta>,
    code: i64,
    msg: &str,
    mover: Option<Msg>,
) -> Msg {
    let (uid, subject, owner) = principal(identity, peer);
    let known = state.files.lock().expect("lock").get(path).cloned();
    let meta = meta.cloned().or(known);
    let mut m = door_common(state, "request", peer, path, &subject, uid, owner)
        .put("sessionDuration", 692)
        .put("status", serde_json::json!({"code": code, "msg": msg}))
        .put("billingPath", format!("{}{}", state.cfg.root, path))
        .put("storageInfo", "disk:sim@osm")
        .put("fileSize", meta.as_ref().map(|m| m.size).unwrap_or(0));
    if let Some(meta) = &meta {
        m = m.put("pnfsid", &meta.pnfsid);
    }
    if let Some(mover) = mover {
        m = m.put_msg("moverInfo", mover);
    }
    m
}

fn srm_put_done(meta: &FileMeta, billing_path: &str, transfer_path: &str) -> Msg {
    Msg::default()
        .put("VERSION", "1.0")
        .put("msgType", "request")
        .put("date", now())
        .put("queuingTime", 0)
        .put("cellName", "SrmManager")
        .put("cellType", "door")
        .put("cellDomain", "srmmanagerDomain")
        .put("status", serde_json::json!({"code": 0, "msg": ""}))
        .put(
            "session",
            format!("srm2:putDone:-{}", rand::random::<u32>() >> 1),
        )
        .put("sessionDuration", 0)
        .put("transferPath", transfer_path)
        .put(
            "subject",
            ["UidPrincipal[3915]", "GidPrincipal[239,primary]"],
        )
        .put("client", "127.0.0.1")
        .put("clientChain", "unknown")
        .put("mappedUID", 3915)
        .put("mappedGID", 239)
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", billing_path)
        .put("fileSize", meta.size)
        .put("storageInfo", "disk:sim@osm")
}

/// One message of background billing traffic, in the fixtures' shapes.
fn background_message(root: &str, i: usize) -> Msg {
    let pnfsid = format!("0000{}", uuid::Uuid::new_v4().simple()).to_ascii_uppercase();
    let path = format!("{root}/other/run{}/file-{i}.dat", i % 17);
    let size = 1_000_000 + (i as u64 * 7919) % 100_000_000;
    let pool = |kind: &str| {
        Msg::default()
            .put("version", "1.0")
            .put("msgType", kind)
            .put("date", now())
            .put("queuingTime", 0)
            .put("cellName", POOL_CELL)
            .put("cellType", "pool")
            .put("cellDomain", POOL_DOMAIN)
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("pnfsid", &pnfsid)
            .put("billingPath", &path)
            .put("fileSize", size)
            .put("storageInfo", "disk:sim@osm")
    };
    let mover = |m: Msg, direction: &str, p2p: bool| {
        m.put_double("meanReadBandwidth", 2.3981544E8)
            .put("readIdle", "PT0.021S")
            .put("readActive", "PT0.5S")
            .put("transferSize", size)
            .put("transferTime", 641)
            .put("isWrite", direction)
            .put("isP2p", p2p)
            .put("transferPath", &path)
            .put("protocolInfo", serde_json::json!({"protocol": if p2p {"Http"} else {"Https"}, "versionMajor":1,"versionMinor":1,"transferTag":"","port":53988,"host":"127.0.0.1"}))
    };
    match i % 6 {
        0 => mover(pool("transfer"), "read", false).put("subject", ["UidPrincipal[3915]"]),
        1 => mover(pool("transfer"), "write", true).put("subject", ["UidPrincipal[0]"]),
        2 => pool("store")
            .put("transferTime", 48211)
            .put("hsm", serde_json::json!({"type":"osm","instance":"hpss","provider":"script"}))
            .put("locations", ["osm://hpss/?store=sim&group=disk&bfid=0000000000001A2B3C4D"]),
        3 => Msg::default()
            .put("version", "1.0")
            .put("msgType", "hit")
            .put("date", now())
            .put("cellName", POOL_CELL)
            .put("cellType", "pool")
            .put("cellDomain", POOL_DOMAIN)
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("pnfsid", &pnfsid)
            .put("filesize", size)
            .put("billingPath", &path)
            .put("cached", true),
        4 => pool("remove").put("billingPath", "Unknown"),
        _ => Msg::default()
            .put("VERSION", "1.0")
            .put("msgType", "request")
            .put("date", now())
            .put("cellName", DOOR_CELL)
            .put("cellType", "door")
            .put("cellDomain", DOOR_DOMAIN)
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("pnfsid", &pnfsid)
            .put("billingPath", &path)
            .put("transferPath", &path)
            .put("fileSize", size)
            .put("moverInfo", serde_json::json!({"version":"1.0","msgType":"transfer","cellType":"pool","isWrite":"read","isP2p":false,"status":{"code":0,"msg":""}})),
    }
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

/// `PROPFIND` with `Depth: 0` or `1`: a WebDAV multistatus of the entry and its children
/// (name, collection or not, size), as dCache's door answers.
async fn propfind(
    state: &State,
    req: &Request<Incoming>,
    path: &str,
) -> Result<Response<Body>, std::io::Error> {
    let depth = req
        .headers()
        .get("Depth")
        .and_then(|d| d.to_str().ok())
        .unwrap_or("1");
    if let Some(Fault::ListStatus { code }) = state.faults.take(path, Stage::List) {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(full(status, format!("injected {code}\n")));
    }
    let on_disk = state.storage.join(path.trim_start_matches('/'));
    let Ok(meta) = tokio::fs::metadata(&on_disk).await else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    // A visible file's pnfsid: dCache's door gives it in the ETag (milton's
    // `"<uniqueId>_<modification date hash>"`, the unique id being the pnfsid).
    let visible = |p: &str| {
        state
            .files
            .lock()
            .expect("lock")
            .get(p)
            .filter(|m| Instant::now() >= m.visible_at)
            .map(|m| m.pnfsid.clone())
    };
    let encode = |p: &str| {
        p.split('/')
            .map(|s| percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    let entry = |p: &str, dir: bool, size: u64, pnfsid: Option<String>| {
        let kind = if dir { "<d:collection/>" } else { "" };
        let length = if dir {
            String::new()
        } else {
            format!("<d:getcontentlength>{size}</d:getcontentlength>")
        };
        let length = match pnfsid {
            Some(id) => format!("{length}<d:getetag>\"{id}_0\"</d:getetag>"),
            None => length,
        };
        format!(
            "<d:response><d:href>{}</d:href><d:propstat><d:prop><d:resourcetype>{kind}</d:resourcetype>{length}</d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>",
            encode(p)
        )
    };
    let mut body =
        String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><d:multistatus xmlns:d=\"DAV:\">");
    let self_path = if meta.is_dir() && !path.ends_with('/') {
        format!("{path}/")
    } else {
        path.to_owned()
    };
    body.push_str(&entry(&self_path, meta.is_dir(), meta.len(), visible(path)));
    if meta.is_dir() && depth != "0" {
        let mut rd = tokio::fs::read_dir(&on_disk).await?;
        while let Some(e) = rd.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") {
                continue;
            }
            let child = format!("{}/{name}", path.trim_end_matches('/'));
            let m = e.metadata().await?;
            if m.is_dir() {
                body.push_str(&entry(&format!("{child}/"), true, 0, None));
            } else if let Some(id) = visible(&child) {
                body.push_str(&entry(&child, false, m.len(), Some(id)));
            }
        }
    }
    body.push_str("</d:multistatus>");
    Ok(Response::builder()
        .status(StatusCode::MULTI_STATUS)
        .header(header::CONTENT_TYPE, "application/xml; charset=utf-8")
        .body(full(StatusCode::OK, body).into_body())
        .expect("response"))
}

/// A query value, percent-encoded as dCache writes `dcache-http-ref`.
fn url_escape(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Path segments as the door writes them in hrefs.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'&')
    .add(b'+');

/// `/api/v1/events/...`: channels, subscriptions, the stream.
async fn events(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let fe = &state.frontend;
    let path = req.uri().path().to_owned();
    let rest = path.trim_start_matches("/api/v1/events/channels");
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let not_found = || {
        let mut r = full(
            StatusCode::NOT_FOUND,
            r#"{"errors":[{"message":"Not Found","status":"404"}]}"#,
        );
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            "application/json".parse().expect("header"),
        );
        r
    };
    let method = req.method().clone();
    match (method.as_str(), parts.as_slice()) {
        ("POST", []) => {
            let url = fe.create_channel();
            let mut r = full(StatusCode::CREATED, "");
            r.headers_mut()
                .insert(header::LOCATION, url.parse().expect("header"));
            Ok(r)
        }
        ("PATCH", [id]) if fe.exists(id) => Ok(full(StatusCode::NO_CONTENT, "")),
        ("DELETE", [id]) if fe.delete_channel(id) => Ok(full(StatusCode::NO_CONTENT, "")),
        ("GET", [id]) => {
            let wants_stream = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("text/event-stream"));
            if !wants_stream {
                return Ok(if fe.exists(id) {
                    full(StatusCode::OK, r#"{"timeout":300}"#)
                } else {
                    not_found()
                });
            }
            let last = req
                .headers()
                .get("Last-Event-ID")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            match fe.stream(id, last) {
                crate::frontend::Stream::NotFound => Ok(not_found()),
                crate::frontend::Stream::Events(mut rx) => {
                    let body = futures_util::stream::poll_fn(move |cx| {
                        rx.poll_recv(cx).map(|b| {
                            b.map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b)))
                        })
                    });
                    Ok(Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .header(header::CACHE_CONTROL, "no-cache")
                        .body(http_body_util::BodyExt::boxed_unsync(
                            http_body_util::StreamBody::new(body),
                        ))
                        .expect("response"))
                }
            }
        }
        ("POST", [id, "subscriptions", "inotify"]) => {
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            let selector: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return Ok(full(StatusCode::BAD_REQUEST, format!("Bad selector: {e}"))),
            };
            let Some(watched) = selector["path"].as_str().map(str::to_owned) else {
                return Ok(full(StatusCode::BAD_REQUEST, "Bad selector: no path"));
            };
            let valid = watched == "/" || (watched.starts_with('/') && !watched.ends_with('/'));
            let door = watched.strip_prefix(state.cfg.root.as_str());
            let is_dir = match door {
                Some(d) if valid => state.storage.join(d.trim_start_matches('/')).is_dir(),
                _ => false,
            };
            if !is_dir {
                return Ok(full(
                    StatusCode::BAD_REQUEST,
                    format!("Not found: Problem with path: {watched}"),
                ));
            }
            match fe.subscribe(id, &watched) {
                None => Ok(not_found()),
                Some((url, created)) => {
                    let mut r = full(
                        if created {
                            StatusCode::CREATED
                        } else {
                            StatusCode::SEE_OTHER
                        },
                        "",
                    );
                    r.headers_mut()
                        .insert(header::LOCATION, url.parse().expect("header"));
                    Ok(r)
                }
            }
        }
        _ => Ok(not_found()),
    }
}
