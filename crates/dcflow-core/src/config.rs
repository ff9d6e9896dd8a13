//! Configuration: TOML text → checked, typed [`Config`].
//!
//! The keys of the original tool keep their names and meanings (DESIGN.md, "Configuration
//! contract"); new keys are additions. The TOML is walked key by key instead of through
//! `serde(deny_unknown_fields)` so that *every* problem is reported at once, each naming its
//! key. Validation does no I/O: environment fallbacks come in through [`Env`], and files are
//! only looked at when credentials are loaded (`auth`).

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::retry::RetryPolicy;
pub use crate::section::ConfigProblem;
use crate::section::{problem, Section};

/// Every problem found in a configuration, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} configuration problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Checksum algorithms dcflow can compute while streaming and compare with dCache's `Digest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChecksumAlgo {
    Adler32,
    Md5,
}

impl ChecksumAlgo {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adler32" => Some(Self::Adler32),
            "md5" => Some(Self::Md5),
            _ => None,
        }
    }
    /// The name in `Want-Digest`/`Digest` headers (RFC 3230) and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adler32 => "adler32",
            Self::Md5 => "md5",
        }
    }
}

/// The process environment as validation sees it, so tests can supply their own.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub vars: BTreeMap<String, String>,
    pub uid: u32,
}

impl Env {
    pub fn from_process() -> Self {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        Self {
            vars: std::env::vars().collect(),
            uid,
        }
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Where a credential path came from: operators need to know which one is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration key of that name.
    Key(&'static str),
    /// The environment variable of that name.
    Env(&'static str),
    /// A conventional default location (used only if it exists).
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key(k) => write!(f, "config key {k}"),
            Self::Env(v) => write!(f, "${v}"),
            Self::Default => f.write_str("default location"),
        }
    }
}

/// A credential file and where its name came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPath {
    pub path: PathBuf,
    pub origin: Origin,
}

impl CredentialPath {
    /// An explicitly named file must exist; a default location is used only if present.
    pub fn required(&self) -> bool {
        self.origin != Origin::Default
    }
}

/// Where a bearer token may come from, in WLCG Bearer Token Discovery order.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenCandidate {
    /// The token itself, from `$BEARER_TOKEN`. Never printed.
    Value(String),
    File(CredentialPath),
}

impl fmt::Debug for TokenCandidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value(<redacted>)"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// Credentials to try, before any file is read.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// X.509 proxy candidates, first existing wins.
    pub proxy: Vec<CredentialPath>,
    /// Bearer token candidates, first available wins.
    pub token: Vec<TokenCandidate>,
    /// Trusted CA folder.
    pub capath: CredentialPath,
}

/// Where a consumer group without a committed offset starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The oldest message still in the topic: nothing announced before the first start is
    /// missed (files already copied are recognised and not downloaded again).
    Earliest,
    /// Only messages produced after the group first joins.
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

#[derive(Clone)]
pub struct KafkaConfig {
    pub topic: String,
    pub servers: Vec<String>,
    pub consumer_group: String,
    pub offset_reset: OffsetReset,
    /// Scale-out: `dcflow dispatch` moves selected uploads from `topic` to this topic (keyed
    /// by pnfsid, `work_partitions` partitions) and `dcflow run` consumes it.
    pub work_topic: Option<String>,
    pub work_partitions: i32,
    /// Where files that failed after all retries are published (the event, error, attempts).
    pub dead_letter_topic: Option<String>,
    /// Raw librdkafka properties (SASL, SSL, timeouts...), passed through as given.
    pub properties: BTreeMap<String, String>,
}

/// Property values can be secrets (`sasl.password`, `ssl.key.password`): only their names
/// are printed.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("topic", &self.topic)
            .field("servers", &self.servers)
            .field("consumer_group", &self.consumer_group)
            .field("offset_reset", &self.offset_reset)
            .field("work_topic", &self.work_topic)
            .field("work_partitions", &self.work_partitions)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// librdkafka properties dcflow sets itself: its delivery promise depends on them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

#[derive(Debug, Clone)]
pub struct DcacheConfig {
    /// WebDAV base URL that serves `pool` (no trailing slash in its path).
    pub url: Url,
    /// Namespace prefix served by `url`, normalised: absolute, no trailing slash.
    pub pool: String,
    /// Only files under `pool + folder` are handled; normalised like `pool` ("" = all).
    pub folder: String,
    pub retry: RetryPolicy,
    pub max_downloads: NonZeroUsize,
    /// Bound on one transfer attempt.
    pub timeout: Duration,
    /// An attempt that receives no byte for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// Algorithms computed while streaming and compared with dCache's.
    pub checksums: Vec<ChecksumAlgo>,
    /// Fail a file for which dCache offers none of `checksums` (else: size check only).
    pub require_checksum: bool,
}

/// Modes for what dcflow creates below the download folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    pub dir_mode: u32,
    pub file_mode: u32,
}

impl Permissions {
    /// Directories get `mode`; files the same minus setgid/setuid/sticky and execute bits.
    pub fn from_mode(mode: u32) -> Self {
        Self {
            dir_mode: mode,
            file_mode: mode & 0o666,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub auth: AuthConfig,
    pub download_folder: PathBuf,
    pub permissions: Permissions,
    pub failed_file: PathBuf,
    pub success_file: PathBuf,
    /// Which workflow steps finished, per pnfsid (SQLite). Used only with `[[workflow]]`.
    pub state_file: PathBuf,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: Option<KafkaConfig>,
    pub dcache: DcacheConfig,
    pub local: LocalConfig,
    /// `[[workflow]]` rules, in file order; empty means the original behaviour (see
    /// [`Config::workflows`]).
    pub workflow_rules: Vec<crate::workflow::Workflow>,
    /// `[metrics] address`: where /metrics, /healthz, /readyz and the status page are served.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// `[metrics] outagegrace`: how long the brokers, the frontend or the door may be
    /// unreachable before `/readyz` answers 503.
    pub outage_grace: Duration,
    /// `[sse]`: dCache's storage events from its frontend, the source without Kafka.
    pub sse: Option<SseConfig>,
    /// `[tape]`: files whose only copy is on tape are staged through dCache's WLCG Tape REST
    /// API before they are copied.
    pub tape: Option<TapeConfig>,
    /// `[rucio]`: the Rucio server that `rucio` steps register replicas in.
    pub rucio: Option<RucioConfig>,
}

/// A Rucio server (the catalog of HEP experiments) and how dcflow signs in to it.
#[derive(Debug, Clone)]
pub struct RucioConfig {
    /// The REST API, e.g. `https://rucio.example.org`.
    pub url: Url,
    /// Where tokens are asked for (`authurl`, default `url`).
    pub auth_url: Url,
    pub account: String,
    pub auth: RucioAuth,
    /// Files per registration call (`batch`) and how long a file may wait for others
    /// (`batchwait`, milliseconds).
    pub batch: usize,
    pub batch_wait: Duration,
    /// Seconds one call may take.
    pub timeout: Duration,
}

/// How dcflow signs in to Rucio, as Rucio's own clients do.
#[derive(Clone)]
pub enum RucioAuth {
    /// `username` and `password` (or `passwordfile`): `GET /auth/userpass` gives a token, kept
    /// and renewed before it expires.
    UserPass { username: String, password: String },
    /// `tokenfile`: a token (e.g. OIDC) read from the file for each call, sent as
    /// `X-Rucio-Auth-Token`.
    TokenFile(PathBuf),
    /// `x509 = true`: `GET /auth/x509` with `[local] proxy` as the client certificate gives a
    /// token, kept and renewed before it expires.
    X509,
}

impl std::fmt::Debug for RucioAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPass { username, .. } => write!(f, "userpass {username} (password hidden)"),
            Self::TokenFile(p) => write!(f, "token file {}", p.display()),
            Self::X509 => write!(f, "x509 with [local] proxy"),
        }
    }
}

/// Staging files that live on tape (dCache's WLCG Tape REST API, as FTS uses it).
#[derive(Debug, Clone)]
pub struct TapeConfig {
    /// The API's base, e.g. `https://dcache.example.org:3880/api/v1/tape` (default: the
    /// `[sse]` frontend's).
    pub api: Url,
    /// Files per stage request.
    pub batch: usize,
    /// How long dCache keeps a staged file on disk (`diskLifetime`).
    pub pin_lifetime: Duration,
    /// How long a file may take to come back from tape before it is a failure.
    pub stage_timeout: Duration,
    /// Release the staged copy once the workflow has copied it (off by default: see
    /// `tape_section`).
    pub release: bool,
}

/// The SSE source: a channel on dCache's frontend, inotify subscriptions on the watched
/// directories and their subdirectories.
#[derive(Debug, Clone)]
pub struct SseConfig {
    /// The frontend, e.g. `https://dcache.example.org:3880`.
    pub url: Url,
    /// Watched namespace directories (default: `pool + folder`); each under `pool + folder`.
    pub paths: Vec<String>,
    /// Sent as `client-id` when the channel is created.
    pub client_id: String,
    /// Seconds dCache keeps the channel while disconnected.
    pub channel_timeout: u64,
    /// The channel URL and the last acknowledged event id, for a restart.
    pub state_file: PathBuf,
}

pub const DEFAULT_CAPATH: &str = "/etc/grid-security/certificates";

const KAFKA_KEYS: &[&str] = &[
    "topic",
    "servers",
    "consumergroup",
    "offsetreset",
    "worktopic",
    "workpartitions",
    "deadlettertopic",
    "properties",
];
const DCACHE_KEYS: &[&str] = &[
    "url",
    "pool",
    "folder",
    "retryseconds",
    "retrytimes",
    "maxdownloads",
    "timeout",
    "stalltimeout",
    "checksums",
    "requirechecksum",
];
const LOCAL_KEYS: &[&str] = &[
    "proxy",
    "capath",
    "token",
    "downloadfolder",
    "permissions",
    "failedtasksfile",
    "successfultaskfile",
    "statefile",
];

impl Config {
    /// The workflows to run: the `[[workflow]]` rules, or the implicit `copy` of every upload
    /// under the folder when there are none.
    pub fn workflows(&self) -> Vec<crate::workflow::Workflow> {
        if self.workflow_rules.is_empty() {
            vec![crate::workflow::Workflow::implicit_copy(
                self.dcache.retry.attempts().get(),
            )]
        } else {
            self.workflow_rules.clone()
        }
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        Self::load_checked(path, env).0
    }

    /// [`Config::load`], and the credentials' settings whenever `[local]` itself is valid, so
    /// that `check-config` reports credential problems beside the other ones.
    pub fn load_checked(path: &Path, env: &Env) -> (Result<Self, ConfigError>, Option<AuthConfig>) {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, env),
            Err(e) => (
                Err(ConfigError {
                    problems: vec![ConfigProblem {
                        key: path.display().to_string(),
                        problem: format!("cannot read: {e}"),
                    }],
                }),
                None,
            ),
        }
    }

    /// Validates configuration text, reporting every problem at once.
    pub fn from_toml(text: &str, env: &Env) -> Result<Self, ConfigError> {
        Self::parse(text, env).0
    }

    // Long on purpose: the table of top-level sections, each parsed and its problems collected;
    // one line of wiring per section.
    fn parse(text: &str, env: &Env) -> (Result<Self, ConfigError>, Option<AuthConfig>) {
        let root: toml::Table = match text.parse() {
            Ok(root) => root,
            Err(e) => return (Err(syntax_error(text, &e)), None),
        };
        let mut errs = Vec::new();
        for (key, value) in &root {
            let known = [
                "kafka", "dcache", "local", "workflow", "metrics", "sse", "tape", "rucio",
            ]
            .contains(&key.as_str());
            if !known {
                errs.push(problem(
                    key,
                    "unknown section (expected [kafka], [sse], [dcache], [local], [tape], [rucio], [metrics], [[workflow]])",
                ));
            } else if key != "workflow" && !value.is_table() {
                errs.push(problem(key, "must be a table, e.g. [dcache]"));
            }
        }
        let kafka = root
            .get("kafka")
            .and_then(toml::Value::as_table)
            .map(|t| kafka_section(Section::new("kafka", Some(t), KAFKA_KEYS, &mut errs)));
        let dcache = dcache_section(Section::new(
            "dcache",
            root.get("dcache").and_then(toml::Value::as_table),
            DCACHE_KEYS,
            &mut errs,
        ));
        let local = local_section(
            Section::new(
                "local",
                root.get("local").and_then(toml::Value::as_table),
                LOCAL_KEYS,
                &mut errs,
            ),
            env,
        );
        let metrics = metrics_section(Section::new(
            "metrics",
            root.get("metrics").and_then(toml::Value::as_table),
            &["address", "outagegrace"],
            &mut errs,
        ));
        let sse = root
            .get("sse")
            .and_then(toml::Value::as_table)
            .and_then(|t| sse_section(Section::new("sse", Some(t), SSE_KEYS, &mut errs)));
        if let (Some(sse), Some(dcache)) = (&sse, &dcache) {
            let prefix = format!("{}{}", dcache.pool, dcache.folder);
            for (i, p) in sse.paths.iter().enumerate() {
                let under =
                    prefix.is_empty() || p == &prefix || p.starts_with(&format!("{prefix}/"));
                if !under {
                    errs.push(problem(
                        &format!("sse.paths[{i}]"),
                        format!("{p} is not under pool + folder ({prefix}): its files could not be fetched"),
                    ));
                }
            }
        }
        let tape = root
            .get("tape")
            .and_then(toml::Value::as_table)
            .and_then(|t| {
                let frontend = sse.as_ref().map(|s| s.url.clone());
                tape_section(
                    Section::new("tape", Some(t), TAPE_KEYS, &mut errs),
                    frontend,
                )
            });
        let rucio = root
            .get("rucio")
            .and_then(toml::Value::as_table)
            .and_then(|t| rucio_section(Section::new("rucio", Some(t), RUCIO_KEYS, &mut errs)));
        if root.contains_key("sse") && root.contains_key("kafka") {
            errs.push(problem(
                "sse",
                "[sse] and [kafka] are two sources: keep one of them",
            ));
        }
        let attempts = dcache.as_ref().map_or(1, |d| d.retry.attempts().get());
        let workflow_rules = match root.get("workflow") {
            Some(w) => crate::workflow::parse_workflows(w, attempts, &mut errs),
            None => Vec::new(),
        };
        if kafka.as_ref().is_none_or(Option::is_none) {
            for (i, wf) in workflow_rules.iter().enumerate() {
                for (j, step) in wf.steps.iter().enumerate() {
                    if matches!(step, crate::workflow::Step::Produce { .. }) {
                        errs.push(problem(
                            &format!("workflow[{i}].step[{j}].topic"),
                            "produce publishes to the [kafka] servers: add a [kafka] section",
                        ));
                    }
                }
            }
        }
        if !root.contains_key("rucio") {
            for wf in &workflow_rules {
                for (j, step) in wf.steps.iter().enumerate() {
                    if matches!(step, crate::workflow::Step::Rucio { .. }) {
                        errs.push(problem(
                            &format!("workflow \"{}\".step[{j}].type", wf.name),
                            "a rucio step registers in the [rucio] server: add a [rucio] section",
                        ));
                    }
                }
            }
        }
        let auth = local.as_ref().map(|l| l.auth.clone());
        let config = match (kafka, dcache, local) {
            (kafka, Some(dcache), Some(local)) if errs.is_empty() => {
                let sse = sse.map(|raw| raw.complete(&dcache, &local));
                Ok(Config {
                    kafka: kafka.flatten(),
                    dcache,
                    local,
                    workflow_rules,
                    metrics_address: metrics.address,
                    outage_grace: metrics.outage_grace,
                    sse,
                    tape,
                    rucio,
                })
            }
            _ => Err(ConfigError { problems: errs }),
        };
        (config, auth)
    }
}

/// A TOML syntax error with where it is: "line 12, column 5".
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let key = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}")
        }
        None => "(file)".into(),
    };
    ConfigError {
        problems: vec![ConfigProblem {
            key,
            problem: format!("not valid TOML: {}", e.message().trim()),
        }],
    }
}

const SSE_KEYS: &[&str] = &["url", "paths", "clientid", "channeltimeout", "statefile"];
const TAPE_KEYS: &[&str] = &["api", "batch", "pinlifetime", "stagetimeout", "release"];
const RUCIO_KEYS: &[&str] = &[
    "url",
    "authurl",
    "account",
    "username",
    "password",
    "passwordfile",
    "tokenfile",
    "x509",
    "batch",
    "batchwait",
    "timeout",
];

fn rucio_url(s: &mut Section<'_>, key: &str) -> Option<Url> {
    let raw = s.string(key)?;
    match Url::parse(&raw) {
        Ok(u) if !u.username().is_empty() || u.password().is_some() => {
            s.fail(key, CREDENTIALS_IN_URL);
            None
        }
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Some(u),
        Ok(_) => {
            s.fail(key, "must be an http or https URL of the Rucio server");
            None
        }
        Err(e) => {
            s.fail(key, format!("not a URL: {e}"));
            None
        }
    }
}

fn rucio_section(mut s: Section<'_>) -> Option<RucioConfig> {
    let url = rucio_url(&mut s, "url");
    if s.get("url").is_none() {
        s.fail(
            "url",
            "is required: the Rucio server, e.g. \"https://rucio.example.org\"",
        );
    }
    let auth_url = rucio_url(&mut s, "authurl").or_else(|| url.clone());
    let account = s.required_string("account").filter(|a| !a.is_empty());
    let username = s.string("username");
    let password = s.string("password");
    let password_file = s.path("passwordfile");
    let token_file = s.path("tokenfile");
    let x509 = s.boolean("x509", false);
    let auth = match (username, password, password_file, token_file) {
        (None, None, None, None) if x509 => Some(RucioAuth::X509),
        _ if x509 => {
            s.fail(
                "x509",
                "one way to sign in: x509 (with [local] proxy), userpass or tokenfile",
            );
            None
        }
        (Some(u), Some(p), None, None) => Some(RucioAuth::UserPass {
            username: u,
            password: p,
        }),
        (Some(u), None, Some(f), None) => match std::fs::read_to_string(&f) {
            Ok(p) => Some(RucioAuth::UserPass {
                username: u,
                password: p.trim_end_matches(['\n', '\r']).to_owned(),
            }),
            Err(e) => {
                s.fail("passwordfile", format!("cannot read {}: {e}", f.display()));
                None
            }
        },
        (None, None, None, Some(f)) => Some(RucioAuth::TokenFile(f)),
        (Some(_), None, None, None) => {
            s.fail("password", "username needs a password or a passwordfile");
            None
        }
        _ => {
            s.fail(
                "username",
                "one way to sign in: username with password (or passwordfile), or tokenfile",
            );
            None
        }
    };
    let batch = s.int("batch", 100, 1, 10_000) as usize;
    let batch_wait = Duration::from_millis(s.int("batchwait", 200, 0, 60_000));
    let timeout = Duration::from_secs(s.int("timeout", 30, 1, 3600));
    Some(RucioConfig {
        url: url?,
        auth_url: auth_url?,
        account: account?,
        auth: auth?,
        batch,
        batch_wait,
        timeout,
    })
}

fn tape_section(mut s: Section<'_>, frontend: Option<Url>) -> Option<TapeConfig> {
    let api = match s.string("api") {
        Some(a) => match Url::parse(&a) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                s.fail("api", CREDENTIALS_IN_URL);
                None
            }
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Some(u),
            Ok(_) => {
                s.fail("api", "must be an https URL of dCache's tape API");
                None
            }
            Err(e) => {
                s.fail("api", format!("not a URL: {e}"));
                None
            }
        },
        // The frontend that serves the storage events serves the tape API too.
        None => match frontend.and_then(|f| f.join("/api/v1/tape").ok()) {
            Some(u) => Some(u),
            None => {
                s.fail(
                    "api",
                    "is required (without [sse]): dCache's tape API, e.g. \
                     \"https://dcache.example.org:3880/api/v1/tape\"",
                );
                None
            }
        },
    };
    let batch = s.int("batch", 100, 1, 10_000) as usize;
    let pin_lifetime = Duration::from_secs(s.int("pinlifetime", 86_400, 60, 365 * 86_400));
    let stage_timeout = Duration::from_secs(s.int("stagetimeout", 86_400, 10, 30 * 86_400));
    // Off by default: on dCache 12.0.1 a release (an ephemeral RELEASE bulk request) ends
    // the bulk service's request processor, and every later stage request stays SUBMITTED
    // until dCache restarts (seen twice on the test instance). The pin ends at pinlifetime.
    let release = s.boolean("release", false);
    Some(TapeConfig {
        api: api?,
        batch,
        pin_lifetime,
        stage_timeout,
        release,
    })
}

struct MetricsSection {
    address: Option<std::net::SocketAddr>,
    outage_grace: Duration,
}

fn metrics_section(mut m: Section<'_>) -> MetricsSection {
    let address = m.string("address").and_then(|a| match a.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            m.fail(
                "address",
                format!("{a:?} is not an IP address and port, e.g. \"127.0.0.1:9464\""),
            );
            None
        }
    });
    MetricsSection {
        address,
        outage_grace: Duration::from_secs(m.int("outagegrace", 60, 0, 86_400)),
    }
}

/// `[sse]` as written; [`RawSse::complete`] fills in the defaults that depend on other sections.
struct RawSse {
    url: Url,
    paths: Vec<String>,
    client_id: String,
    channel_timeout: u64,
    state_file: Option<PathBuf>,
}

fn sse_section(mut s: Section<'_>) -> Option<RawSse> {
    let url = s.required_string("url").and_then(|u| match Url::parse(&u) {
        Ok(u) if !u.username().is_empty() || u.password().is_some() => {
            s.fail("url", CREDENTIALS_IN_URL);
            None
        }
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Some(u),
        Ok(_) => {
            s.fail("url", "must be an https URL of dCache's frontend");
            None
        }
        Err(e) => {
            s.fail("url", format!("not a URL: {e}"));
            None
        }
    });
    let paths = s.strings("paths").unwrap_or_default();
    for (i, p) in paths.iter().enumerate() {
        if !p.starts_with('/') || (p.len() > 1 && p.ends_with('/')) {
            s.fail(
                &format!("paths[{i}]"),
                "must be an absolute namespace path without a trailing /",
            );
        }
    }
    let client_id = s.string("clientid").unwrap_or_else(|| "dcflow".to_owned());
    let channel_timeout = s.int("channeltimeout", 3600, 60, 86_400);
    let state_file = s.path("statefile");
    Some(RawSse {
        url: url?,
        paths,
        client_id,
        channel_timeout,
        state_file,
    })
}

impl RawSse {
    /// The watched paths default to `pool + folder`, the state file to the records' folder.
    fn complete(self, dcache: &DcacheConfig, local: &LocalConfig) -> SseConfig {
        let prefix = format!("{}{}", dcache.pool, dcache.folder);
        SseConfig {
            url: self.url,
            paths: if self.paths.is_empty() {
                vec![if prefix.is_empty() {
                    "/".to_owned()
                } else {
                    prefix
                }]
            } else {
                self.paths
            },
            client_id: self.client_id,
            channel_timeout: self.channel_timeout,
            state_file: self.state_file.unwrap_or_else(|| {
                local
                    .failed_file
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join("dcflow-sse.json")
            }),
        }
    }
}

fn kafka_section(mut s: Section<'_>) -> Option<KafkaConfig> {
    let topic = s.string("topic").unwrap_or_else(|| "billing".to_owned());
    let servers = s.strings("servers");
    if s.get("servers").is_none() {
        s.fail(
            "servers",
            "is required: the brokers to bootstrap from, e.g. [\"host:9092\"]",
        );
    }
    if let Some(list) = &servers {
        if list.is_empty() {
            s.fail("servers", "must name at least one broker");
        }
        for (i, server) in list.iter().enumerate() {
            let ok = server
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                s.fail(
                    &format!("servers[{i}]"),
                    format!("{server:?} is not host:port"),
                );
            }
        }
    }
    let group = s.required_string("consumergroup");
    let offset_reset = match s.string("offsetreset").as_deref() {
        None | Some("earliest") => OffsetReset::Earliest,
        Some("latest") => OffsetReset::Latest,
        Some(other) => {
            s.fail(
                "offsetreset",
                format!("{other:?} is not earliest or latest"),
            );
            OffsetReset::Earliest
        }
    };
    let work_topic = s.string("worktopic").filter(|t| !t.is_empty());
    let work_partitions = s.int("workpartitions", 6, 1, 10_000) as i32;
    let dead_letter_topic = s.string("deadlettertopic").filter(|t| !t.is_empty());
    if work_topic.as_deref() == Some(topic.as_str()) {
        s.fail("worktopic", "must differ from topic");
    }
    let properties = kafka_properties(&mut s);
    Some(KafkaConfig {
        topic,
        servers: servers?,
        consumer_group: group?,
        offset_reset,
        work_topic,
        work_partitions,
        dead_letter_topic,
        properties,
    })
}

/// `[kafka.properties]`: librdkafka settings passed through (strings, integers, booleans).
fn kafka_properties(s: &mut Section<'_>) -> BTreeMap<String, String> {
    let mut properties = BTreeMap::new();
    match s.get("properties") {
        None => {}
        Some(toml::Value::Table(t)) => {
            for (key, value) in t {
                let name = format!("properties.{key}");
                let text = match value {
                    toml::Value::String(v) => Some(v.clone()),
                    toml::Value::Integer(i) => Some(i.to_string()),
                    toml::Value::Boolean(b) => Some(b.to_string()),
                    _ => None,
                };
                if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                    s.fail(
                        &name,
                        "is set by dcflow (use servers, consumergroup, offsetreset)",
                    );
                } else if let Some(v) = text {
                    properties.insert(key.clone(), v);
                } else {
                    s.fail(&name, "must be a string, integer or boolean");
                }
            }
        }
        Some(other) => s.fail(
            "properties",
            format!(
                "must be a table of librdkafka properties, found {}",
                other.type_str()
            ),
        ),
    }
    properties
}

/// Normalises a namespace path: absolute, single slashes, no trailing slash, no `.`/`..`.
fn namespace_path(s: &mut Section<'_>, key: &str, raw: &str, allow_root: bool) -> Option<String> {
    if !raw.starts_with('/') {
        s.fail(
            key,
            format!("{raw:?} must be an absolute namespace path starting with /"),
        );
        return None;
    }
    let parts: Vec<&str> = raw.split('/').filter(|p| !p.is_empty()).collect();
    if parts
        .iter()
        .any(|p| *p == "." || *p == ".." || p.contains('\0'))
    {
        s.fail(key, format!("{raw:?} must not contain . or .. components"));
        return None;
    }
    if parts.is_empty() && !allow_root {
        s.fail(key, "must not be /");
        return None;
    }
    Some(parts.iter().map(|p| format!("/{p}")).collect())
}

fn dcache_section(mut s: Section<'_>) -> Option<DcacheConfig> {
    if s.table.is_none() {
        s.errs
            .push(problem("dcache", "section [dcache] is required"));
        return None;
    }
    let url = s
        .required_string("url")
        .map(|raw| redact_userinfo(&raw))
        .and_then(|raw| match Url::parse(&raw) {
            Ok(_) if raw.contains("***@") => {
                s.fail("url", CREDENTIALS_IN_URL);
                None
            }
            Ok(u) if u.scheme() != "https" => {
                s.fail(
                    "url",
                    format!("{raw:?} must be an https:// URL (the WebDAV door)"),
                );
                None
            }
            Ok(u) if u.host_str().is_none() => {
                s.fail("url", format!("{raw:?} has no host"));
                None
            }
            Ok(u) if u.query().is_some() || u.fragment().is_some() => {
                s.fail("url", format!("{raw:?} must not have a query or fragment"));
                None
            }
            Ok(mut u) => {
                let path = u.path().trim_end_matches('/').to_owned();
                u.set_path(&path);
                Some(u)
            }
            Err(e) => {
                s.fail("url", format!("{raw:?} is not a URL: {e}"));
                None
            }
        });
    let pool = s
        .required_string("pool")
        // "/" is a door whose root is the namespace root (dCache's default): stored as "".
        .and_then(|p| namespace_path(&mut s, "pool", &p, true));
    let folder = match s.string("folder") {
        Some(f) if f.is_empty() => Some(String::new()),
        Some(f) => namespace_path(&mut s, "folder", &f, true),
        None => Some(String::new()),
    };
    let retry_seconds = s.int("retryseconds", 1, 0, 86_400);
    let retry_times = s.int("retrytimes", 10, 1, 1_000_000);
    let max_downloads = s.int("maxdownloads", 10, 1, 10_000);
    let timeout = s.int("timeout", 600, 1, 7 * 86_400);
    let stall = s.int("stalltimeout", 60, 1, 86_400);
    let mut checksums = Vec::new();
    for (i, name) in s
        .strings("checksums")
        .unwrap_or_else(|| vec!["adler32".into()])
        .iter()
        .enumerate()
    {
        match ChecksumAlgo::parse(name) {
            Some(a) if !checksums.contains(&a) => checksums.push(a),
            Some(_) => {}
            None => s.fail(
                &format!("checksums[{i}]"),
                format!("{name:?} is not one of adler32, md5"),
            ),
        }
    }
    if checksums.is_empty() && s.get("checksums").is_some() {
        s.fail(
            "checksums",
            "must name at least one algorithm (adler32, md5)",
        );
    }
    if stall > timeout {
        s.fail(
            "stalltimeout",
            format!(
                "{stall} s is longer than timeout ({timeout} s): an attempt is ended by the \
                 timeout before a stall could be noticed; make it shorter"
            ),
        );
    }
    let require_checksum = s.boolean("requirechecksum", true);
    Some(DcacheConfig {
        url: url?,
        pool: pool?,
        folder: folder?,
        retry: RetryPolicy::new(
            Duration::from_secs(retry_seconds),
            NonZeroU32::new(retry_times as u32).expect("retrytimes >= 1"),
        ),
        max_downloads: NonZeroUsize::new(max_downloads as usize).expect("maxdownloads >= 1"),
        timeout: Duration::from_secs(timeout),
        stall_timeout: Duration::from_secs(stall),
        checksums,
        require_checksum,
    })
}

/// `permissions = '2750'`: octal digits as a string (the original's form) or an integer
/// written with the same digits.
fn parse_mode(s: &mut Section<'_>) -> Permissions {
    let text = match s.get("permissions") {
        None => return Permissions::from_mode(0o755),
        Some(toml::Value::String(t)) => t.clone(),
        Some(toml::Value::Integer(i)) => i.to_string(),
        Some(other) => {
            s.fail(
                "permissions",
                format!(
                    "must be octal digits like '2750', found {}",
                    other.type_str()
                ),
            );
            return Permissions::from_mode(0o755);
        }
    };
    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o7777 && mode & 0o700 == 0o700 => Permissions::from_mode(mode),
        Ok(_) => {
            s.fail(
                "permissions",
                format!("{text:?}: the owner needs rwx (7xx) and at most 4 octal digits"),
            );
            Permissions::from_mode(0o755)
        }
        Err(_) => {
            s.fail(
                "permissions",
                format!("{text:?} is not an octal mode like '2750'"),
            );
            Permissions::from_mode(0o755)
        }
    }
}

fn local_section(mut s: Section<'_>, env: &Env) -> Option<LocalConfig> {
    if s.table.is_none() {
        s.errs.push(problem("local", "section [local] is required"));
        return None;
    }
    let proxy_key = s.path("proxy");
    let capath_key = s.path("capath");
    let token_key = s.path("token");
    let download = s.path("downloadfolder");
    if s.get("downloadfolder").is_none() {
        s.fail("downloadfolder", "is required: where copied files land");
    }
    let download = download.filter(|d| {
        let ok = d.is_absolute();
        if !ok {
            s.fail(
                "downloadfolder",
                format!("{} must be an absolute path", d.display()),
            );
        }
        ok
    });
    let permissions = parse_mode(&mut s);
    let failed = s
        .path("failedtasksfile")
        .unwrap_or_else(|| "failed.csv".into());
    let success = s
        .path("successfultaskfile")
        .unwrap_or_else(|| "success.csv".into());

    let proxy = match proxy_key {
        Some(path) => vec![CredentialPath {
            path,
            origin: Origin::Key("local.proxy"),
        }],
        None => match env.get("X509_USER_PROXY") {
            Some(p) => vec![CredentialPath {
                path: p.into(),
                origin: Origin::Env("X509_USER_PROXY"),
            }],
            None => vec![CredentialPath {
                path: format!("/tmp/x509up_u{}", env.uid).into(),
                origin: Origin::Default,
            }],
        },
    };
    let capath = match capath_key {
        Some(path) => CredentialPath {
            path,
            origin: Origin::Key("local.capath"),
        },
        None => match env.get("X509_CERT_DIR") {
            Some(p) => CredentialPath {
                path: p.into(),
                origin: Origin::Env("X509_CERT_DIR"),
            },
            None => CredentialPath {
                path: DEFAULT_CAPATH.into(),
                origin: Origin::Default,
            },
        },
    };
    let token = match token_key {
        Some(path) => vec![TokenCandidate::File(CredentialPath {
            path,
            origin: Origin::Key("local.token"),
        })],
        None => wlcg_token_discovery(env),
    };
    Some(LocalConfig {
        auth: AuthConfig {
            proxy,
            token,
            capath,
        },
        download_folder: download?,
        permissions,
        state_file: s.path("statefile").unwrap_or_else(|| {
            failed
                .parent()
                .unwrap_or(Path::new(""))
                .join("dcflow-state.sqlite")
        }),
        failed_file: failed,
        success_file: success,
    })
}

const CREDENTIALS_IN_URL: &str = "must not hold a user name or password (they would reach logs, \
     records and webhooks): authenticate with [local] token or proxy";

/// `raw` with a `user:password@` part, if any, replaced by `***@`: configuration errors
/// quote the URL, and a password must not reach them.
fn redact_userinfo(raw: &str) -> String {
    let Some(start) = raw.find("://").map(|i| i + 3) else {
        return raw.to_owned();
    };
    let authority_end = raw[start..]
        .find(['/', '?', '#'])
        .map_or(raw.len(), |i| start + i);
    match raw[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &raw[..start], &raw[start + at..]),
        None => raw.to_owned(),
    }
}

/// WLCG Bearer Token Discovery: `$BEARER_TOKEN`, `$BEARER_TOKEN_FILE`,
/// `$XDG_RUNTIME_DIR/bt_u<uid>`, `/tmp/bt_u<uid>`.
fn wlcg_token_discovery(env: &Env) -> Vec<TokenCandidate> {
    if let Some(v) = env.get("BEARER_TOKEN") {
        return vec![TokenCandidate::Value(v.trim().to_owned())];
    }
    if let Some(p) = env.get("BEARER_TOKEN_FILE") {
        return vec![TokenCandidate::File(CredentialPath {
            path: p.into(),
            origin: Origin::Env("BEARER_TOKEN_FILE"),
        })];
    }
    let mut out = Vec::new();
    if let Some(dir) = env.get("XDG_RUNTIME_DIR") {
        out.push(TokenCandidate::File(CredentialPath {
            path: Path::new(dir).join(format!("bt_u{}", env.uid)),
            origin: Origin::Default,
        }));
    }
    out.push(TokenCandidate::File(CredentialPath {
        path: format!("/tmp/bt_u{}", env.uid).into(),
        origin: Origin::Default,
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"
[kafka]
topic = "billing"
servers = ["10.0.0.10:9092", "10.0.0.11:9092"]
consumergroup = "imsimprod001"
[dcache]
url = "https://door.example.org:2880/lsst"
pool = "/pnfs/example.org/data/lsst"
folder = "/lsst/user/j/jdoe"
retryseconds = 1
retrytimes = 10
maxdownloads = 10
timeout = 600
[local]
proxy = "/tmp/x509_proxy"
capath = "/etc/grid-security/certificates"
downloadfolder = "/sps/data/input"
permissions = '2750'
failedtasksfile = "failed.csv"
successfultaskfile = "success.csv"
"#;

    fn env() -> Env {
        Env {
            vars: BTreeMap::new(),
            uid: 1234,
        }
    }

    /// Issue 14, item 12: a door URL with `user:pass@` was accepted, then logged and written
    /// to records and webhook contexts.
    #[test]
    fn credentials_in_a_url_are_refused_without_being_quoted() {
        for url in [
            "https://jdoe:s3cret-pw@door.example.org:2880/lsst",
            "https://s3cret-pw@door.example.org:2880/lsst",
            "ftp://jdoe:s3cret-pw@door.example.org/lsst",
        ] {
            let text = ORIGINAL.replace("https://door.example.org:2880/lsst", url);
            assert!(text.contains(url), "the fixture has the door URL");
            let err = Config::from_toml(&text, &env()).unwrap_err().to_string();
            assert!(
                err.contains("dcache.url: must not hold a user name or password"),
                "{err}"
            );
            assert!(!err.contains("s3cret-pw"), "the password is quoted: {err}");
        }
        assert_eq!(
            redact_userinfo("https://u:p@h/x@y"),
            "https://***@h/x@y",
            "an @ in the path is not a user"
        );
    }

    #[test]
    fn the_rucio_section_and_its_steps() {
        let step = "\n[[workflow]]\nname = \"reg\"\n[[workflow.step]]\ntype = \"copy\"\n\
                    [[workflow.step]]\ntype = \"rucio\"\nrse = \"FS\"\nscope = \"s\"\n";
        let err = Config::from_toml(&format!("{ORIGINAL}{step}"), &env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("add a [rucio] section"), "{err}");
        let good = format!(
            "{ORIGINAL}\n[rucio]\nurl = \"https://rucio.example.org\"\naccount = \"a\"\n\
             username = \"u\"\npassword = \"p4ss\"\n{step}"
        );
        let c = Config::from_toml(&good, &env()).unwrap();
        let r = c.rucio.unwrap();
        assert_eq!(r.auth_url.as_str(), "https://rucio.example.org/");
        assert_eq!((r.batch, r.batch_wait.as_millis()), (100, 200));
        assert!(
            !format!("{r:?}").contains("p4ss"),
            "the password is not shown"
        );
        let bad = format!("{ORIGINAL}\n[rucio]\nurl = \"ftp://x\"\nusername = \"u\"\nbatch = 0\n");
        let err = Config::from_toml(&bad, &env()).unwrap_err().to_string();
        for expected in [
            "rucio.url: must be an http or https URL",
            "rucio.account: ",
            "rucio.password: username needs a password",
            "rucio.batch:",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let no_copy = format!(
            "{ORIGINAL}\n[rucio]\nurl = \"https://r\"\naccount = \"a\"\ntokenfile = \"/t\"\n\
             [[workflow]]\nname = \"reg\"\n[[workflow.step]]\ntype = \"rucio\"\nrse = \"FS\"\nscope = \"s\"\n"
        );
        // Without a copy a rucio step registers dCache's original.
        assert!(Config::from_toml(&no_copy, &env()).is_ok());
        let x509 =
            format!("{ORIGINAL}\n[rucio]\nurl = \"https://r\"\naccount = \"a\"\nx509 = true\n");
        let c = Config::from_toml(&x509, &env()).unwrap();
        assert!(matches!(c.rucio.unwrap().auth, RucioAuth::X509));
        let both = x509.replace("x509 = true", "x509 = true\ntokenfile = \"/t\"");
        let err = Config::from_toml(&both, &env()).unwrap_err().to_string();
        assert!(err.contains("rucio.x509: one way to sign in"), "{err}");
    }

    #[test]
    fn the_slurm_step_and_what_it_refuses() {
        let wf = |keys: &str| {
            format!(
                "{ORIGINAL}\n[[workflow]]\nname = \"reduce\"\n[[workflow.step]]\ntype = \"copy\"\n\
                 [[workflow.step]]\ntype = \"slurm\"\n{keys}\n[[workflow.step]]\ntype = \"exec\"\n\
                 argv = [\"echo\", \"{{job_id}}\"]\n"
            )
        };
        let c = Config::from_toml(
            &wf("script = \"/opt/r.sh\"\nargs = [\"{local_path}\"]\ntime = \"1:00:00\"\nmaxjobs = 5"),
            &env(),
        )
        .unwrap();
        let crate::workflow::Step::Slurm(job) = &c.workflow_rules[0].steps[1] else {
            panic!("not a slurm step")
        };
        assert_eq!((job.max_jobs, job.poll.as_secs()), (5, 30));
        assert_eq!(job.time.as_deref(), Some("1:00:00"));
        for (keys, expected) in [
            ("partition = \"p\"", "step[1].script: is required"),
            (
                "script = \"/r\"\nwrap = \"true\"",
                "step[1].wrap: give script or wrap, not both",
            ),
            (
                "wrap = \"reduce {local_path}\"",
                "step[1].wrap: a shell runs it, so it takes no placeholders ({local_path})",
            ),
            (
                "script = \"/r\"\noptions = [\"--job-name=x\"]",
                "step[1].options[0]: --job-name is set by dcflow",
            ),
            (
                "script = \"/r\"\nmaxjobs = 0",
                "step[1].maxjobs: 0 is out of range",
            ),
        ] {
            let err = Config::from_toml(&wf(keys), &env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let early = format!(
            "{ORIGINAL}\n[[workflow]]\nname = \"w\"\n[[workflow.step]]\ntype = \"exec\"\n\
             argv = [\"echo\", \"{{job_id}}\"]\n"
        );
        let err = Config::from_toml(&early, &env()).unwrap_err().to_string();
        assert!(
            err.contains("{job_id} needs a slurm step before this one"),
            "{err}"
        );
    }

    #[test]
    fn the_sse_source_and_the_metrics_address() {
        let without_kafka = ORIGINAL
            .split("[dcache]")
            .nth(1)
            .map(|rest| format!("[dcache]{rest}"))
            .unwrap();
        let text = format!(
            "{without_kafka}\n[sse]\nurl = \"https://dcache.example.org:3880\"\n[metrics]\naddress = \"127.0.0.1:9464\"\n"
        );
        let c = Config::from_toml(&text, &env()).unwrap();
        let sse = c.sse.unwrap();
        assert_eq!(
            sse.paths,
            vec!["/pnfs/example.org/data/lsst/lsst/user/j/jdoe"]
        );
        assert_eq!(sse.channel_timeout, 3600);
        assert_eq!(sse.state_file, Path::new("dcflow-sse.json"));
        assert_eq!(c.metrics_address.unwrap().port(), 9464);

        let both = format!("{ORIGINAL}\n[sse]\nurl = \"https://x:3880\"\n");
        let err = Config::from_toml(&both, &env()).unwrap_err().to_string();
        assert!(
            err.contains("sse: [sse] and [kafka] are two sources"),
            "{err}"
        );
        let bad = format!(
            "{without_kafka}\n[sse]\npaths = [\"relative\"]\n[metrics]\naddress = \"nowhere\"\n"
        );
        let err = Config::from_toml(&bad, &env()).unwrap_err().to_string();
        for expected in [
            "sse.url: is required",
            "sse.paths[0]: must be an absolute",
            "metrics.address:",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
    }

    #[test]
    fn the_original_configuration_runs_unchanged() {
        let c = Config::from_toml(ORIGINAL, &env()).unwrap();
        let k = c.kafka.unwrap();
        assert_eq!(k.servers.len(), 2);
        assert_eq!(k.consumer_group, "imsimprod001");
        assert_eq!(c.dcache.url.as_str(), "https://door.example.org:2880/lsst");
        assert_eq!(c.dcache.pool, "/pnfs/example.org/data/lsst");
        assert_eq!(c.dcache.folder, "/lsst/user/j/jdoe");
        assert_eq!(c.dcache.retry.attempts().get(), 10);
        assert_eq!(c.dcache.max_downloads.get(), 10);
        assert_eq!(c.dcache.timeout, Duration::from_secs(600));
        assert_eq!(c.dcache.checksums, vec![ChecksumAlgo::Adler32]);
        assert_eq!(
            c.local.permissions,
            Permissions {
                dir_mode: 0o2750,
                file_mode: 0o640
            }
        );
        assert_eq!(c.local.auth.proxy[0].path, Path::new("/tmp/x509_proxy"));
        assert!(c.local.auth.proxy[0].required());
        assert_eq!(c.local.download_folder, Path::new("/sps/data/input"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[dcache]
url = "http://door/x"
pool = "relative"
retrytimes = 0
maxdownloads = "ten"
colour = "blue"
checksums = ["adler32", "crc7"]
[local]
permissions = "rwx"
[extra]
"#;
        let err = Config::from_toml(text, &env()).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "extra",
            "dcache.colour",
            "dcache.url",
            "dcache.pool",
            "dcache.retrytimes",
            "dcache.maxdownloads",
            "dcache.checksums[1]",
            "local.downloadfolder",
            "local.permissions",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(err.to_string().contains("dcache.colour: unknown key"));
    }

    #[test]
    fn kafka_additions() {
        let with = |extra: &str| {
            ORIGINAL.replacen(
                "consumergroup = \"imsimprod001\"",
                &format!("consumergroup = \"imsimprod001\"\n{extra}"),
                1,
            )
        };
        let text = with("offsetreset = \"latest\"\nproperties = { \"security.protocol\" = \"SASL_SSL\", \"session.timeout.ms\" = 45000 }");
        let k = Config::from_toml(&text, &env()).unwrap().kafka.unwrap();
        assert_eq!(k.offset_reset, OffsetReset::Latest);
        assert_eq!(k.properties["security.protocol"], "SASL_SSL");
        assert_eq!(k.properties["session.timeout.ms"], "45000");
        let mut with_password = k.clone();
        with_password
            .properties
            .insert("sasl.password".into(), "hunter2-secret".into());
        let printed = format!("{with_password:?}");
        assert!(
            printed.contains("sasl.password") && !printed.contains("hunter2-secret"),
            "{printed}"
        );
        let k = Config::from_toml(ORIGINAL, &env()).unwrap().kafka.unwrap();
        assert_eq!(k.offset_reset, OffsetReset::Earliest);

        let bad =
            with("offsetreset = \"middle\"\nproperties = { \"group.id\" = \"x\", \"a\" = [1] }");
        let err = Config::from_toml(&bad, &env()).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "kafka.offsetreset",
            "kafka.properties.group.id",
            "kafka.properties.a",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = Config::from_toml("[dcache\nurl=", &env()).unwrap_err();
        assert!(err.to_string().contains("not valid TOML"));
    }

    #[test]
    fn fallbacks_follow_grid_conventions() {
        let minimal = "[dcache]\nurl='https://d/x'\npool='/p'\n[local]\ndownloadfolder='/d'\n";
        let c = Config::from_toml(minimal, &env()).unwrap();
        assert_eq!(c.local.auth.proxy[0].path, Path::new("/tmp/x509up_u1234"));
        assert!(!c.local.auth.proxy[0].required());
        assert_eq!(c.local.auth.capath.path, Path::new(DEFAULT_CAPATH));
        assert_eq!(
            c.local.auth.token.len(),
            1,
            "only /tmp/bt_u<uid> without XDG_RUNTIME_DIR"
        );
        assert!(c.kafka.is_none());
        assert_eq!(c.dcache.folder, "");

        let mut e = env();
        e.vars.insert("X509_USER_PROXY".into(), "/p/proxy".into());
        e.vars.insert("X509_CERT_DIR".into(), "/p/ca".into());
        e.vars.insert("BEARER_TOKEN_FILE".into(), "/p/tok".into());
        let c = Config::from_toml(minimal, &e).unwrap();
        assert_eq!(c.local.auth.proxy[0].origin, Origin::Env("X509_USER_PROXY"));
        assert_eq!(c.local.auth.capath.path, Path::new("/p/ca"));
        assert!(matches!(&c.local.auth.token[0], TokenCandidate::File(p) if p.required()));

        e.vars.insert("BEARER_TOKEN".into(), "secret-value".into());
        let c = Config::from_toml(minimal, &e).unwrap();
        assert!(!format!("{:?}", c.local.auth).contains("secret-value"));
    }

    #[test]
    fn paths_are_normalised() {
        let text = "[dcache]\nurl='https://d:2880/lsst/'\npool='/pnfs//x/'\nfolder='/a/b/'\n[local]\ndownloadfolder='/d'\n";
        let c = Config::from_toml(text, &env()).unwrap();
        assert_eq!(c.dcache.url.path(), "/lsst");
        assert_eq!(c.dcache.pool, "/pnfs/x");
        assert_eq!(c.dcache.folder, "/a/b");
        let bad = "[dcache]\nurl='https://d'\npool='/p'\nfolder='/a/../b'\n[local]\ndownloadfolder='/d'\n";
        let err = Config::from_toml(bad, &env()).unwrap_err();
        assert_eq!(err.problems[0].key, "dcache.folder");
    }
}
