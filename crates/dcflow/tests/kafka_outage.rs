//! The broker stops and comes back while `dcflow run` works: it rides through and loses
//! nothing. It has the broker to itself (`broker_alone`), since it restarts the shared broker (scripts/kafka.sh,
//! whose state folder comes from `KAFKA_STATE`, as in .ci/run).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;
use dcache_sim::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The broker is held alone for the whole test: a std lock, since `broker()` is synchronous
// (no test thread waits on it while holding another lock).
#[allow(clippy::await_holding_lock)]
async fn a_broker_restart_mid_run_loses_nothing() {
    // Every other test that uses the broker waits while it restarts.
    let Some((broker, _alone)) = broker_alone() else {
        return;
    };
    let site = Site::new().await;
    let mut expected = Vec::new();
    let mut lines = Vec::new();
    for i in 0..80usize {
        let rel = format!("outage/f-{i:02}.dat");
        let door_path = site.upload(&rel, &data(50_000 + i, i as u32)).await;
        site.sim.add_fault(
            &door_path,
            Fault::SlowLink {
                bytes_per_second: 250_000,
            },
            None,
        );
        expected.push((rel, 50_000 + i, i as u32));
    }
    for line in std::fs::read_to_string(site.billing()).unwrap().lines() {
        lines.push(line.to_owned());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("outage-{nanos}");
    produce(
        &broker,
        &topic,
        &lines
            .iter()
            .map(|l| l.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    );

    let kafka =
        format!("topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"g-{nanos}\"");
    let config = site.write_kafka_config(&kafka, "maxdownloads = 4");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("DCFLOW_LOG", "info")
        .stderr(std::fs::File::create(site.path("run.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while site.records("success.csv").len() < 10 {
        assert!(Instant::now() < deadline, "no progress before the outage");
        std::thread::sleep(Duration::from_millis(200));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kafka.sh");
    let status = Command::new("bash")
        .args([script, "restart"])
        .status()
        .unwrap();
    assert!(status.success(), "broker restart");

    let deadline = Instant::now() + Duration::from_secs(240);
    while site.records("success.csv").len() < expected.len() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "dcflow run exited during the outage"
        );
        assert!(
            Instant::now() < deadline,
            "not all files landed after the broker came back"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Let the last commits reach the restarted broker, then stop: the restart consumes nothing.
    std::thread::sleep(Duration::from_secs(3));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    for (rel, size, seed) in &expected {
        assert_eq!(
            std::fs::read(site.download().join(rel)).unwrap(),
            data(*size, *seed),
            "{rel}"
        );
    }
    let log = std::fs::read_to_string(site.path("run.log")).unwrap();
    assert!(log.contains("kafka"), "the outage is visible in the log");
    eprintln!(
        "outage: {} files landed across a broker restart, {} success rows, {} pool GETs",
        expected.len(),
        site.records("success.csv").len(),
        site.sim.pool_gets()
    );
}

/// The brokers go away under a running daemon (a broker of the test's own, stopped): the log
/// says so once (not once per reconnection: librdkafka alone used to write about 40 lines a
/// second), `/readyz` answers 503 after `outagegrace`, the status page, `dcflow status` and
/// `/metrics` show the outage and its error; when the broker is back, all of it clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_told_once_and_readyz_follows_it() {
    let Some(kafka) = PrivateBroker::start() else {
        return;
    };
    let topic = unique("outage-told");
    let site = Site::with_kafka(&kafka.address, &topic).await;
    for i in 0..3 {
        site.upload(&format!("told/f-{i}.dat"), &data(10_000 + i, i as u32))
            .await;
    }
    site.sim.flush_billing();
    let address = free_address();
    let config = site.write_kafka_config(
        &format!(
            "topic = \"{topic}\"\nservers = [\"{}\"]\nconsumergroup = \"{}\"",
            kafka.address,
            unique("g")
        ),
        "",
    );
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&format!(
        "\n[metrics]\naddress = \"{address}\"\noutagegrace = 3\n"
    ));
    std::fs::write(&config, text_cfg).unwrap();
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for("the three files", Duration::from_secs(60), || {
        site.records("success.csv").len() == 3
    });
    wait_for("ready", Duration::from_secs(30), || {
        http_get(&address, "/readyz").0 == 200
    });
    let lines = |from: usize| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .skip(from)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let before = lines(0).len();

    kafka.stop();
    let stopped = Instant::now();
    wait_for(
        "/readyz 503 naming the brokers",
        Duration::from_secs(40),
        || {
            let (code, body) = http_get(&address, "/readyz");
            code == 503 && body.contains("Kafka brokers are unreachable")
        },
    );
    // Some seconds of outage: the log holds the outage's warning, not a line per attempt.
    let quiet_for = Duration::from_secs(20);
    std::thread::sleep(quiet_for.saturating_sub(stopped.elapsed()));
    let during = lines(before);
    eprintln!("the log during the outage:\n{}", during.join("\n"));
    assert!(
        during
            .iter()
            .any(|l| l.contains("Kafka brokers are unreachable")),
        "no outage warning: {during:#?}"
    );
    assert!(
        during.len() <= 12,
        "{} lines in {} s of outage: {during:#?}",
        during.len(),
        stopped.elapsed().as_secs()
    );
    let (_, status) = http_get(&address, "/status.json");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let k = &status["upstreams"]["kafka"];
    assert_eq!(k["up"], false, "{status}");
    assert!(
        k["down_since"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{k}"
    );
    assert!(!k["last_error"].as_str().unwrap_or("").is_empty(), "{k}");
    let out = dcflow(&["status", "--address", &address]);
    assert!(
        text(&out.stdout).contains("kafka: UNREACHABLE since"),
        "{}",
        text(&out.stdout)
    );
    let (_, metrics) = http_get(&address, "/metrics");
    assert!(
        metrics.contains("dcflow_upstream_up{upstream=\"kafka\"} 0"),
        "{metrics}"
    );

    kafka.restart();
    wait_for("ready again", Duration::from_secs(60), || {
        http_get(&address, "/readyz").0 == 200
    });
    let (_, metrics) = http_get(&address, "/metrics");
    assert!(metrics.contains("dcflow_upstream_up{upstream=\"kafka\"} 1"));
    assert!(
        lines(before)
            .iter()
            .any(|l| l.contains("Kafka brokers are reachable again after")),
        "{:#?}",
        lines(before)
    );
    assert_eq!(stop(child), 0);
}
