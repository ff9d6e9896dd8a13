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
