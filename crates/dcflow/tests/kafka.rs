//! `dcflow run` against a real Apache Kafka broker (scripts/kafka.sh) and the emulator.
//! The broker's address comes from `DCFLOW_KAFKA` (host:port). Without it these tests say so
//! and pass, except under CI (`CI` set), where a missing broker is a failure.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dcache_sim::Fault;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn broker() -> Option<String> {
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

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Produces lines to a topic as dCache does: null keys, UTF-8 JSON values.
fn produce(broker: &str, topic: &str, lines: &[Vec<u8>]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for line in lines {
        let record: BaseRecord<'_, (), [u8]> = BaseRecord::to(topic).payload(line.as_slice());
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The group's committed offset and the end of partition 0.
fn committed_and_end(broker: &str, topic: &str, group: &str) -> (i64, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let offset = match committed.elements()[0].offset() {
        Offset::Offset(o) => o,
        _ => -1,
    };
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    (offset, high)
}

fn start_run(config: &std::path::Path, log: &std::path::Path) -> Child {
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

fn stop(mut child: Child) -> i32 {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "dcflow run did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fixture_lines() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/billing");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "json") {
            out.push(std::fs::read(entry.path()).unwrap().trim_ascii().to_vec());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_copies_every_upload_commits_to_the_end_and_restarts_idle() {
    let Some(broker) = broker() else { return };
    let site = Site::new().await;
    let mut expected = Vec::new();
    for i in 0..40 {
        let body = data(1000 + i * 7919, i as u32);
        let rel = format!("k/run{}/file {i}.dat", i % 3);
        site.upload(&rel, &body).await;
        expected.push((rel, body));
    }
    // dCache's messages amid background billing traffic (reads, p2p, stores, removes...).
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let billing = std::fs::read_to_string(site.billing()).unwrap();
    for (n, line) in billing.lines().enumerate() {
        lines.push(line.as_bytes().to_vec());
        if n % 4 == 0 {
            lines.extend(fixture_lines());
        }
    }
    let (topic, group) = (unique("billing"), unique("group"));
    produce(&broker, &topic, &lines);

    let kafka =
        format!("topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"");
    let config = site.write_kafka_config(&kafka, "");
    let child = start_run(&config, &site.path("run1.log"));
    wait_for(
        "the committed offset to reach the end",
        Duration::from_secs(120),
        || {
            let (committed, end) = committed_and_end(&broker, &topic, &group);
            committed == end
        },
    );
    assert_eq!(stop(child), 0, "SIGTERM drains and exits 0");
    for (rel, body) in &expected {
        assert_eq!(
            &std::fs::read(site.download().join(rel)).unwrap(),
            body,
            "{rel}"
        );
    }
    assert_eq!(site.records("success.csv").len(), 40, "each file once");
    let (committed, end) = committed_and_end(&broker, &topic, &group);
    assert_eq!(
        (committed, end),
        (lines.len() as i64, lines.len() as i64),
        "committed to the end"
    );

    // A restart consumes nothing new and copies nothing.
    let pool_gets = site.sim.pool_gets();
    let child = start_run(&config, &site.path("run2.log"));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(stop(child), 0);
    assert_eq!(site.sim.pool_gets(), pool_gets);
    assert_eq!(site.records("success.csv").len(), 40);
    let log = std::fs::read_to_string(site.path("run2.log")).unwrap();
    assert!(!log.contains("UPLOAD"), "nothing consumed after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_at_the_head_does_not_block_the_rest() {
    let Some(broker) = broker() else { return };
    let site = Site::new().await;
    let bad = site.upload("p/always-fails.dat", &data(5000, 1)).await;
    site.sim.add_fault(&bad, Fault::Status { code: 500 }, None);
    let mut lines = vec![b"{this is not json".to_vec()];
    lines.extend(
        std::fs::read_to_string(site.billing())
            .unwrap()
            .lines()
            .map(|l| l.as_bytes().to_vec()),
    );
    let mut good = Vec::new();
    for i in 0..5 {
        let rel = format!("p/good-{i}.dat");
        let body = data(3000 + i, 10 + i as u32);
        site.upload(&rel, &body).await;
        good.push((rel, body));
    }
    let all = std::fs::read_to_string(site.billing()).unwrap();
    lines.extend(all.lines().skip(2).map(|l| l.as_bytes().to_vec()));
    let (topic, group) = (unique("billing"), unique("group"));
    produce(&broker, &topic, &lines);
    let kafka =
        format!("topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"");
    let config = site.write_kafka_config(&kafka, "");
    let child = start_run(&config, &site.path("run.log"));
    wait_for(
        "5 good files and 2 failure rows",
        Duration::from_secs(120),
        || site.records("success.csv").len() >= 5 && site.records("failed.csv").len() >= 2,
    );
    assert_eq!(stop(child), 0);
    for (rel, body) in &good {
        assert_eq!(&std::fs::read(site.download().join(rel)).unwrap(), body);
    }
    let failed = site.records("failed.csv");
    assert!(failed.iter().any(|r| r.error.starts_with("malformed")));
    assert!(failed
        .iter()
        .any(|r| r.billing_path.ends_with("always-fails.dat") && r.error.contains("500")));
    let (committed, end) = committed_and_end(&broker, &topic, &group);
    assert_eq!(
        committed, end,
        "failed and malformed messages are acknowledged once recorded"
    );
}
