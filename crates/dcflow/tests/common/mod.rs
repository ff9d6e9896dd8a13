//! Shared by the end-to-end tests: a site (the emulator plus a configuration) and the real
//! `dcflow` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use dcache_sim::{Sim, SimConfig};
use dcflow_core::RecordFile;

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

    async fn start(kafka: Option<dcache_sim::SimKafka>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::new(&dir.path().join("sim"));
        cfg.kafka = kafka;
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
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(address) else {
        return (0, String::new());
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
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
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
pub fn broker() -> Option<String> {
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
