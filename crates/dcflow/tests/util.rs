//! Shared by the end-to-end tests: a site (the emulator plus a configuration) and the real
//! `dcflow` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use dcache_sim::{Sim, SimConfig};
pub use dcflow_core::RecordFile;

pub const FOLDER: &str = "/lsst/user/j/jdoe";

pub struct Site {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
}

impl Site {
    pub async fn new() -> Self {
        Self::start(None).await
    }

    /// A site whose emulator also publishes its billing messages to `topic` (one partition),
    /// as dCache does.
    pub async fn with_kafka(broker: &str, topic: &str) -> Self {
        Self::start(Some(dcache_sim::SimKafka {
            brokers: broker.into(),
            topic: topic.into(),
            partitions: 1,
        }))
        .await
    }

    /// The same without the emulator billing dcflow's own downloads (as dCache does): for
    /// tests that count the messages they published.
    pub async fn with_kafka_counted(broker: &str, topic: &str) -> Self {
        Self::start_with(
            Some(dcache_sim::SimKafka {
                brokers: broker.into(),
                topic: topic.into(),
                partitions: 1,
            }),
            false,
        )
        .await
    }

    async fn start(kafka: Option<dcache_sim::SimKafka>) -> Self {
        Self::start_with(kafka, true).await
    }

    async fn start_with(kafka: Option<dcache_sim::SimKafka>, bill_reads: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::new(&dir.path().join("sim"));
        cfg.kafka = kafka;
        cfg.bill_reads = bill_reads;
        let sim = Sim::start(cfg).await.unwrap();
        Self { sim, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn download(&self) -> PathBuf {
        self.path("download")
    }

    /// Uploads `rel` below the configured folder; returns the door path.
    pub async fn upload(&self, rel: &str, data: &[u8]) -> String {
        let door_path = format!("{FOLDER}/{rel}");
        self.sim.upload(&door_path, data.to_vec()).await.unwrap();
        door_path
    }

    /// `dcflow replay` of everything the emulator announced so far.
    pub fn replay(&self, config: &Path) -> Output {
        dcflow(&[
            "replay",
            "--config",
            config.to_str().unwrap(),
            self.billing().to_str().unwrap(),
        ])
    }

    /// `dcflow replay` of everything the emulator announced so far, in the background, its log
    /// (DCFLOW_LOG=info) to `log`, or to a pipe without one.
    pub fn spawn_replay(&self, config: &Path, log: Option<&Path>) -> std::process::Child {
        let stderr = match log {
            Some(l) => Stdio::from(std::fs::File::create(l).unwrap()),
            None => Stdio::piped(),
        };
        Command::new(env!("CARGO_BIN_EXE_dcflow"))
            .args([
                "replay",
                "--config",
                config.to_str().unwrap(),
                self.billing().to_str().unwrap(),
            ])
            .env("DCFLOW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// A configuration in the original tool's shape (plus `token` where asked). Keys in
    /// `extra_dcache` replace the test defaults of the same name.
    pub fn write_config(&self, auth: &str, extra_dcache: &str) -> PathBuf {
        let defaults: String = [
            "retryseconds = 0",
            "retrytimes = 3",
            "maxdownloads = 4",
            "timeout = 120",
            "stalltimeout = 5",
        ]
        .iter()
        .filter(|line| !extra_dcache.contains(line.split(' ').next().unwrap()))
        .map(|line| format!("{line}\n"))
        .collect();
        let text = format!(
            r#"[dcache]
url = "{door}"
pool = "/pnfs/example.org/data"
folder = "{FOLDER}"
{defaults}{extra_dcache}
[local]
{auth}
capath = "{capath}"
downloadfolder = "{download}"
permissions = '2750'
failedtasksfile = "{failed}"
successfultaskfile = "{success}"
"#,
            door = self.sim.door_url,
            capath = self.sim.pki.capath.display(),
            download = self.download().display(),
            failed = self.path("failed.csv").display(),
            success = self.path("success.csv").display(),
        );
        let path = self.path("dcflow.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The same configuration with a `[kafka]` section in front.
    pub fn write_kafka_config(&self, kafka: &str, extra_dcache: &str) -> PathBuf {
        let path = self.write_config(&self.proxy_auth(), extra_dcache);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("[kafka]\n{kafka}\n{text}")).unwrap();
        path
    }

    /// The proxy configuration with `[[workflow]]` tables appended.
    pub fn write_workflow_config(&self, extra_dcache: &str, workflows: &str) -> PathBuf {
        let path = self.write_config(&self.proxy_auth(), extra_dcache);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(workflows);
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn proxy_auth(&self) -> String {
        format!("proxy = \"{}\"", self.sim.pki.proxy.display())
    }

    pub fn billing(&self) -> PathBuf {
        self.path("sim/billing.jsonl")
    }

    pub fn records(&self, name: &str) -> Vec<dcflow_core::Record> {
        RecordFile::read_all(&self.path(name)).unwrap_or_default()
    }
}

pub fn dcflow(args: &[&str]) -> Output {
    dcflow_stdin(args, None)
}

/// Runs dcflow with `args`, its stdout discarded and its stderr written to `log`; its exit
/// code and its peak resident memory in KiB: the kernel's high-water mark of the process's
/// own memory (`VmHWM`), read every 20 ms until it exits. (Not `wait4`'s `ru_maxrss`: a child
/// spawned with vfork counts the parent's memory up to its exec, here the test process with
/// the emulator and all its files.)
pub fn dcflow_peak_rss(args: &[&str], log: &Path) -> (i32, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(args)
        .env("DCFLOW_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let code = loop {
        if let Some(kib) = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        }) {
            peak = peak.max(kib);
        }
        if let Some(exit) = child.try_wait().unwrap() {
            break exit.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, peak)
}

pub fn dcflow_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(args)
        .env_remove("X509_USER_PROXY")
        .env_remove("BEARER_TOKEN")
        .env_remove("BEARER_TOKEN_FILE")
        .env("DCFLOW_LOG", "info")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    if std::env::var_os("DCFLOW_TEST_VERBOSE").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn data(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_below(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Produces lines to a topic as dCache does: null keys, UTF-8 JSON values.
pub fn produce(broker: &str, topic: &str, lines: &[Vec<u8>]) {
    let producer: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker)
            .set("linger.ms", "5")
            .create()
            .unwrap();
    for line in lines {
        let record: rdkafka::producer::BaseRecord<'_, (), [u8]> =
            rdkafka::producer::BaseRecord::to(topic).payload(line.as_slice());
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    rdkafka::producer::Producer::flush(&producer, std::time::Duration::from_secs(30)).unwrap();
}

/// `dcflow run --config CONFIG`, its log (DCFLOW_LOG=info) to `log`.
pub fn start_run(config: &Path, log: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--drain-seconds",
            "60",
        ])
        .env("DCFLOW_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// SIGTERM, then the exit code (the drain may take a while).
pub fn stop(mut child: std::process::Child) -> i32 {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dcflow run did not stop after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A local address nothing listens on (for `[metrics] address`).
pub fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with_headers(address, path);
    (status, body)
}

/// [`http_get`], with the response's header lines.
pub fn http_get_with_headers(address: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(address) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (headers, body) = raw
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or_default();
    (status, headers, body)
}

/// The value of a metric line (`name{labels} value`), summed over label sets.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The Kafka broker of the tests (`DCFLOW_KAFKA`, host:port). Without it a test says so and
/// passes, except under CI (`CI` set), where a missing broker is a failure.
/// The tests share one broker; the one that restarts it has it to itself.
static BROKER: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The test broker's address, held shared for as long as the value lives (a test that
/// restarts the broker waits for it, see [`broker_alone`]).
pub struct Broker {
    address: String,
    _shared: std::sync::RwLockReadGuard<'static, ()>,
}

impl std::ops::Deref for Broker {
    type Target = str;
    fn deref(&self) -> &str {
        &self.address
    }
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.address)
    }
}

impl AsRef<std::ffi::OsStr> for Broker {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.address.as_ref()
    }
}

impl From<&Broker> for String {
    fn from(b: &Broker) -> String {
        b.address.clone()
    }
}

fn broker_address() -> Option<String> {
    match std::env::var("DCFLOW_KAFKA") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "DCFLOW_KAFKA is not set: .ci/run must start the broker (scripts/kafka.sh start)"
            )
        }
        _ => {
            eprintln!("SKIPPED: DCFLOW_KAFKA is not set; start a broker with `eval $(scripts/kafka.sh start)`");
            None
        }
    }
}

pub fn broker() -> Option<Broker> {
    let address = broker_address()?;
    let shared = BROKER.read().unwrap_or_else(|e| e.into_inner());
    Some(Broker {
        address,
        _shared: shared,
    })
}

/// The broker, with no other test using it (for a test that stops and starts it).
pub fn broker_alone() -> Option<(String, std::sync::RwLockWriteGuard<'static, ()>)> {
    let address = broker_address()?;
    Some((address, BROKER.write().unwrap_or_else(|e| e.into_inner())))
}

/// A broker of one test's own (scripts/kafka.sh with its own state folder and port), for a
/// test that takes it away without disturbing the others. Stopped when dropped.
pub struct PrivateBroker {
    pub address: String,
    state: tempfile::TempDir,
}

impl PrivateBroker {
    /// `None` where the tests have no Kafka (see [`broker`]).
    pub fn start() -> Option<Self> {
        broker_address()?;
        let state = tempfile::tempdir().unwrap();
        let out = Self::script(state.path(), "start");
        let address = text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("export DCFLOW_KAFKA=").map(str::to_owned))
            .unwrap_or_else(|| panic!("kafka.sh start: {}", text(&out.stderr)));
        Some(Self { address, state })
    }

    fn script(state: &Path, verb: &str) -> Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kafka.sh");
        let out = Command::new("bash")
            .args([script, verb])
            .env("KAFKA_STATE", state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kafka.sh {verb}: {}",
            text(&out.stderr)
        );
        out
    }

    pub fn stop(&self) {
        Self::script(self.state.path(), "stop");
    }

    /// Starts it again on the same port, with its data.
    pub fn restart(&self) {
        Self::script(self.state.path(), "restart");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kafka.sh");
        let _ = Command::new("bash")
            .args([script, "stop"])
            .env("KAFKA_STATE", self.state.path())
            .output();
    }
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// The group's committed offset and the end of partition 0.
pub fn committed_and_end(broker: &str, topic: &str, group: &str) -> (i64, i64) {
    committed_and_ends(broker, topic, group, 1).expect("reading committed offsets")[0]
}

/// Whether `group` committed every partition of `topic` up to its end.
/// The `[kafka]` keys of a one-topic consumer: topic, broker, group.
pub fn kafka_keys(topic: &str, broker: &str, group: &str) -> String {
    format!("topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"")
}

/// Waits until `group` has committed the whole of `topic`'s only partition.
pub fn wait_committed_to_end(broker: &str, topic: &str, group: &str) {
    wait_for(
        "the committed offset to reach the end",
        Duration::from_secs(120),
        || {
            let (committed, end) = committed_and_end(broker, topic, group);
            committed == end
        },
    );
}

pub fn caught_up(broker: &str, topic: &str, group: &str, partitions: i32) -> bool {
    committed_and_ends(broker, topic, group, partitions).is_ok_and(|all| {
        all.iter()
            .all(|&(committed, end)| committed == end || (committed < 0 && end == 0))
    })
}

/// For each partition of `topic`: the group's committed offset (-1 for none) and the end.
fn committed_and_ends(
    broker: &str,
    topic: &str,
    group: &str,
    partitions: i32,
) -> rdkafka::error::KafkaResult<Vec<(i64, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    committed
        .elements()
        .iter()
        .map(|e| {
            let (_, high) =
                consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(10))?;
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            Ok((offset, high))
        })
        .collect()
}

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`wait_for`], and on a timeout the last 60 lines of `log` in the panic message.
pub fn wait_for_logged(what: &str, timeout: Duration, log: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            panic!(
                "timed out waiting for {what}; the end of {}:\n{tail}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn kill9(mut child: std::process::Child) {
    if let Some(status) = child.try_wait().unwrap() {
        panic!("dcflow run had already exited ({status}) before the kill");
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

/// A cheap varying number (no RNG dependency needed for test timing).
pub fn jitter(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos / 1000) % n
}

/// `dcflow ARGS` under strace (every process, file system calls and fsyncs, descriptors shown
/// as paths); the trace goes to `trace`. `None` (the test says SKIPPED) without strace, except
/// under CI, where that is a failure.
pub fn dcflow_traced(args: &[&str], trace: &Path) -> Option<Output> {
    if Command::new("strace").arg("-V").output().is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("strace is missing: .ci/run installs it");
        }
        eprintln!("SKIPPED: strace is not installed");
        return None;
    }
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-e", "trace=%file,fsync,fdatasync", "-o"])
        .arg(trace)
        .arg(env!("CARGO_BIN_EXE_dcflow"))
        .args(args)
        .env_remove("X509_USER_PROXY")
        .env_remove("BEARER_TOKEN")
        .env("DCFLOW_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Some(out)
}

/// What a trace of [`dcflow_traced`] shows: the directories created (in order) and the paths
/// fsynced (in order), each with its line number.
pub struct Trace {
    pub created: Vec<(usize, PathBuf)>,
    pub fsynced: Vec<(usize, PathBuf)>,
}

impl Trace {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap();
        let mut created = Vec::new();
        let mut fsynced = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let ok = line.trim_end().ends_with("= 0");
            if !ok {
                continue;
            }
            if let Some(i) = line.find("mkdir(").or_else(|| line.find("mkdirat(")) {
                if let Some(q) = line[i..].find('"') {
                    let rest = &line[i + q + 1..];
                    if let Some(end) = rest.find('"') {
                        created.push((n, PathBuf::from(&rest[..end])));
                    }
                }
            }
            for call in ["fsync(", "fdatasync("] {
                if let Some(i) = line.find(call) {
                    let rest = &line[i + call.len()..];
                    if let (Some(a), Some(b)) = (rest.find('<'), rest.find(">)")) {
                        fsynced.push((n, PathBuf::from(&rest[a + 1..b])));
                    }
                }
            }
        }
        Self { created, fsynced }
    }

    /// Whether `dir` was fsynced after line `after`.
    pub fn fsynced_after(&self, dir: &Path, after: usize) -> bool {
        self.fsynced.iter().any(|(n, p)| *n > after && p == dir)
    }
}

/// The real dCache of the tests (`scripts/dcache.sh start` prints these variables). Without it
/// a test says SKIPPED and passes, except under CI, where a missing dCache is a failure.
pub struct RealDcache {
    pub door: String,
    pub frontend: String,
    pub ca: PathBuf,
    pub capath: PathBuf,
    pub usercert: PathBuf,
    pub userkey: PathBuf,
    pub topic: String,
    /// The domain's log (pools included).
    pub log: PathBuf,
}

/// The admin user of the test instance (`etc/dcache.kpwd`).
pub const DCACHE_ADMIN: &str = "admin:dickerelch";

pub fn real_dcache() -> Option<RealDcache> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("DCFLOW_DCACHE_DOOR"), var("DCFLOW_DCACHE_CA")) {
        (Some(door), Some(ca)) => Some(RealDcache {
            door,
            frontend: var("DCFLOW_DCACHE_FRONTEND")
                .unwrap_or_else(|| "https://localhost:3881".into()),
            ca: ca.into(),
            capath: var("DCFLOW_DCACHE_CAPATH").unwrap_or_default().into(),
            usercert: var("DCFLOW_DCACHE_USERCERT").unwrap_or_default().into(),
            userkey: var("DCFLOW_DCACHE_USERKEY").unwrap_or_default().into(),
            topic: var("DCFLOW_DCACHE_TOPIC").unwrap_or_else(|| "billing".into()),
            log: var("DCFLOW_DCACHE_LOG").unwrap_or_default().into(),
        }),
        _ if std::env::var_os("CI").is_some() => {
            panic!("DCFLOW_DCACHE_DOOR is not set: .ci/run must start dCache (scripts/dcache.sh start)")
        }
        _ => {
            eprintln!("SKIPPED: no real dCache; start one with `eval \"$(KAFKA=$DCFLOW_KAFKA scripts/dcache.sh start)\"`");
            None
        }
    }
}

impl RealDcache {
    /// curl with the instance's CA and the admin user.
    fn curl(&self) -> Command {
        self.curl_failing("--fail")
    }

    /// curl as [`Self::curl`], with `--fail` or `--fail-with-body` (curl refuses both).
    fn curl_failing(&self, fail: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", fail, "--retry", "3", "--cacert"])
            .arg(&self.ca)
            .args(["-u", DCACHE_ADMIN]);
        c
    }

    /// PUT through the redirecting door (307 to a pool mover, followed).
    /// A failure names dCache's own reason (its error page) and the free space under the
    /// pools: a 507 "All pools are full" is a disk short of dCache's gap, not a dcflow bug.
    pub fn upload(&self, path: &str, file: &Path) {
        let out = self
            .curl_failing("--fail-with-body")
            .args(["-L", "-o", "-", "-T"])
            .arg(file)
            .arg(self.url(path))
            .output()
            .unwrap();
        if !out.status.success() {
            let df = Command::new("df")
                .args(["-h", "/var/tmp", "/tmp"])
                .output()
                .map(|o| text(&o.stdout))
                .unwrap_or_default();
            let body = text(&out.stdout);
            panic!(
                "PUT {path}: {}\ndCache answered: {}\nfree space:\n{df}",
                text(&out.stderr),
                body.chars().take(2000).collect::<String>()
            );
        }
    }

    /// A PUT through the door sent at `rate` (curl's `--limit-rate`), running in the background.
    pub fn start_slow_upload(&self, path: &str, file: &Path, rate: &str) -> std::process::Child {
        self.curl_failing("--fail-with-body")
            .args(["-L", "-o", "/dev/null", "--limit-rate", rate, "-T"])
            .arg(file)
            .arg(self.url(path))
            .spawn()
            .unwrap()
    }

    /// The door's PROPFIND (Depth 1) answer for a folder, as text.
    pub fn propfind(&self, folder: &str) -> String {
        let out = self
            .curl()
            .args(["-X", "PROPFIND", "-H", "Depth: 1"])
            .arg(self.url(&format!("{folder}/")))
            .output()
            .unwrap();
        text(&out.stdout)
    }

    pub fn delete(&self, path: &str) {
        let out = self
            .curl()
            .args(["-X", "DELETE", "-o", "/dev/null"])
            .arg(self.url(path))
            .output()
            .unwrap();
        assert!(out.status.success(), "DELETE {path}: {}", text(&out.stderr));
    }

    /// DELETE on the frontend (a channel URL, say), as the admin user.
    pub fn delete_on_frontend(&self, url: &str) {
        let out = self
            .curl()
            .args(["-X", "DELETE", "-o", "/dev/null"])
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "DELETE {url}: {}", text(&out.stderr));
    }

    /// One command in dCache's admin shell (ssh, port 22224), e.g. `\s pool_write mover ls`;
    /// its output.
    pub fn admin(&self, command: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let askpass = dir.path().join("askpass");
        std::fs::write(&askpass, "#!/bin/sh\necho dickerelch\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut child = Command::new("ssh")
            .args([
                "-p",
                "22224",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "admin@localhost",
            ])
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", "none")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ssh (openssh-client) for dCache's admin shell");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "{command}").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        text(&out.stdout)
    }

    /// Makes every pool log the requests its HTTP movers receive, headers included: with
    /// `org.dcache.http.HttpTransferService` at debug, a pool puts netty's `LoggingHandler`
    /// behind its HTTP decoder, which logs each decoded request (`READ: DefaultHttpRequest`,
    /// then the request line and its headers). The handler's logger exists only once a
    /// mover has served a connection, so this is called again until a request shows up in
    /// [`Self::mover_requests`]. `on = false` turns it off again.
    pub fn log_mover_requests(&self, on: bool) {
        let (service, netty) = if on {
            ("DEBUG", "DEBUG")
        } else {
            ("INFO", "OFF")
        };
        self.admin(&format!(
            "\\s pool_* log set stdout org.dcache.http.HttpTransferService {service}"
        ));
        self.admin(&format!(
            "\\s pool_* log set stdout io.netty.handler.logging.LoggingHandler {netty}"
        ));
    }

    /// The requests that pool movers logged (see [`Self::log_mover_requests`]) whose request
    /// line names a path under `folder`: each its request line and its header lines.
    pub fn mover_requests(&self, folder: &str) -> Vec<(String, Vec<String>)> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Every line of dCache's log starts with its date: "04 Dec 2026 15:39:14 (pool_read) ...".
        let dated = |l: &str| {
            let b = l.as_bytes();
            b.len() > 11 && b[0].is_ascii_digit() && b[2] == b' ' && b[6] == b' '
        };
        let mut requests = Vec::new();
        let mut lines = log.lines().peekable();
        while let Some(line) = lines.next() {
            if !(dated(line) && line.contains("READ: DefaultHttpRequest")) {
                continue;
            }
            let Some(request) = lines.next() else { break };
            let mut headers = Vec::new();
            while let Some(h) = lines.next_if(|l| !dated(l)) {
                headers.push(h.to_owned());
            }
            if request
                .split(' ')
                .nth(1)
                .is_some_and(|t| t.starts_with(folder))
            {
                requests.push((request.to_owned(), headers));
            }
        }
        requests
    }

    /// Whether the door has the file (HEAD).
    pub fn exists(&self, path: &str) -> bool {
        let out = self
            .curl()
            .args(["-I", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(self.url(path))
            .output()
            .unwrap();
        text(&out.stdout).trim() == "200"
    }

    /// The pnfsid of a file, from the door's ETag (`"<pnfsid>_<number>"`).
    pub fn pnfsid(&self, path: &str) -> String {
        let out = self
            .curl()
            .args(["-I"])
            .arg(self.url(path))
            .output()
            .unwrap();
        let head = text(&out.stdout);
        let etag = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("ETag: ")
                    .or_else(|| l.strip_prefix("etag: "))
            })
            .unwrap_or_else(|| panic!("no ETag for {path}: {head}"));
        etag.trim()
            .trim_matches('"')
            .split('_')
            .next()
            .unwrap()
            .to_owned()
    }

    /// The door URL of a namespace path, each segment percent-encoded.
    pub fn url(&self, path: &str) -> String {
        let segs: Vec<String> = path
            .split('/')
            .map(|s| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect();
        format!("{}{}", self.door, segs.join("/"))
    }

    /// A macaroon that the door issues for `path` (dCache's own bearer token).
    pub fn macaroon(&self, path: &str, activities: &str) -> String {
        let out = self
            .curl()
            .args([
                "-X",
                "POST",
                "-H",
                "Content-Type: application/macaroon-request",
                "-d",
            ])
            .arg(format!(
                r#"{{"caveats":["activity:{activities}"],"validity":"PT1H"}}"#
            ))
            .arg(format!("{}/", self.url(path).trim_end_matches('/')))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "macaroon request: {}",
            text(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["macaroon"].as_str().expect("a macaroon").to_owned()
    }

    /// A PEM with the instance's user certificate and its key (an X.509 client certificate,
    /// as `[local] proxy` takes it), mode 0600.
    pub fn cert_and_key(&self, dir: &Path) -> PathBuf {
        let path = dir.join("usercert-and-key.pem");
        let mut pem = std::fs::read(&self.usercert).unwrap();
        pem.extend(std::fs::read(&self.userkey).unwrap());
        std::fs::write(&path, pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// An RFC 3820 proxy of the instance's user (see [`make_proxy`]).
    pub fn proxy(&self, dir: &Path) -> PathBuf {
        make_proxy(&self.usercert, &self.userkey, dir)
    }

    /// A dcflow configuration for this instance: the door's root is the namespace root
    /// (`pool = "/"`), files under `folder`, `auth` lines for `[local]`, `extra` appended.
    pub fn config(
        &self,
        dir: &Path,
        folder: &str,
        auth: &str,
        kafka: Option<&str>,
        extra: &str,
    ) -> PathBuf {
        let kafka = kafka.map(|k| format!("[kafka]\n{k}\n")).unwrap_or_default();
        let text = format!(
            r#"{kafka}[dcache]
url = "{door}"
pool = "/"
folder = "{folder}"
retryseconds = 1
retrytimes = 5
maxdownloads = 4
timeout = 300
stalltimeout = 60
[local]
{auth}
capath = "{capath}"
downloadfolder = "{download}"
permissions = '2750'
failedtasksfile = "{failed}"
successfultaskfile = "{success}"
{extra}
"#,
            door = self.door,
            capath = self.capath.display(),
            download = dir.join("download").display(),
            failed = dir.join("failed.csv").display(),
            success = dir.join("success.csv").display(),
        );
        let path = dir.join("dcflow.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Every message of `topic` so far whose text contains `needle` (billing messages of one
/// test's folder), read from the start by a throw-away consumer.
pub fn topic_messages(broker: &str, topic: &str, needle: &str) -> Vec<Vec<u8>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let (_, end) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    while next < end && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            next = m.offset() + 1;
            if let Some(p) = m.payload() {
                if p.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    out.push(p.to_vec());
                }
            }
        }
    }
    out
}

/// An RFC 3820 proxy (proxyCertInfo, inherit-all) signed by `usercert`, made with openssl as
/// grid tools do, in `dir/x509up`: proxy certificate, its key, the user certificate.
pub fn make_proxy(usercert: &Path, userkey: &Path, dir: &Path) -> PathBuf {
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "compat", "-in"])
        .arg(usercert)
        .output()
        .unwrap();
    let subject = text(&subject.stdout)
        .trim()
        .trim_start_matches("subject=")
        .to_owned();
    let serial = std::process::id();
    let ext = dir.join("proxy.cnf");
    std::fs::write(
            &ext,
            "[p]\nkeyUsage=critical,digitalSignature,keyEncipherment\nproxyCertInfo=critical,language:id-ppl-inheritAll\n",
        )
        .unwrap();
    let (key, csr, cert) = (
        dir.join("proxy.key"),
        dir.join("proxy.csr"),
        dir.join("proxy.crt"),
    );
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    let subj = format!("{subject}/CN={serial}");
    run(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-newkey".as_ref(),
        "rsa:2048".as_ref(),
        "-nodes".as_ref(),
        "-keyout".as_ref(),
        key.as_os_str(),
        "-subj".as_ref(),
        subj.as_ref(),
        "-out".as_ref(),
        csr.as_os_str(),
    ]);
    let serial = serial.to_string();
    run(&[
        "x509".as_ref(),
        "-req".as_ref(),
        "-in".as_ref(),
        csr.as_os_str(),
        "-CA".as_ref(),
        usercert.as_os_str(),
        "-CAkey".as_ref(),
        userkey.as_os_str(),
        "-set_serial".as_ref(),
        serial.as_ref(),
        "-days".as_ref(),
        "1".as_ref(),
        "-extfile".as_ref(),
        ext.as_os_str(),
        "-extensions".as_ref(),
        "p".as_ref(),
        "-out".as_ref(),
        cert.as_os_str(),
    ]);
    let path = dir.join("x509up");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&key).unwrap());
    pem.extend(std::fs::read(usercert).unwrap());
    std::fs::write(&path, pem).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}
