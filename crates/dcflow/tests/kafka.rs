//! `dcflow run` against a real Apache Kafka broker (scripts/kafka.sh) and the emulator.
//! The broker's address comes from `DCFLOW_KAFKA` (host:port). Without it these tests say so
//! and pass, except under CI (`CI` set), where a missing broker is a failure.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;
use dcache_sim::Fault;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

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
    let (topic, group) = (unique("billing"), unique("group"));
    // The emulator publishes to Kafka itself, as dCache does: uploads amid background
    // billing traffic (reads, p2p copies, stores, hits, removes).
    // It counts the messages it published: dcflow's own downloads are not billed here.
    let site = Site::with_kafka_counted(&broker, &topic).await;
    let mut expected = Vec::new();
    for i in 0..40 {
        let body = data(1000 + i * 7919, i as u32);
        let rel = format!("k/run{}/file {i}.dat", i % 3);
        site.upload(&rel, &body).await;
        site.sim.background(8);
        expected.push((rel, body));
    }
    site.sim.flush_billing();
    let lines = site.sim.billing_messages();

    let kafka = kafka_keys(&topic, &broker, &group);
    let config = site.write_kafka_config(&kafka, "");
    let child = start_run(&config, &site.path("run1.log"));
    wait_committed_to_end(&broker, &topic, &group);
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
async fn full_transfer_slots_pause_fetching_and_nothing_is_skipped() {
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("billing"), unique("group"));
    // It counts the messages it published: dcflow's own downloads are not billed here.
    let site = Site::with_kafka_counted(&broker, &topic).await;
    // One transfer slot; the first three files take about 3 s each, so the partition is
    // paused (after 2 s) with fetched messages still in hand, and resumed three times.
    let mut expected = Vec::new();
    for i in 0..12u32 {
        let body = data(150_000 + i as usize * 101, i);
        let rel = format!("pause/f-{i:02}.dat");
        let door_path = site.upload(&rel, &body).await;
        if i < 3 {
            site.sim.add_fault(
                &door_path,
                Fault::SlowLink {
                    bytes_per_second: 50_000,
                },
                None,
            );
        }
        site.sim.background(300);
        expected.push((rel, body));
    }
    site.sim.flush_billing();
    let lines = site.sim.billing_messages();
    let kafka = kafka_keys(&topic, &broker, &group);
    let config = site.write_kafka_config(&kafka, "maxdownloads = 1");
    let log = site.path("run.log");
    let child = Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("DCFLOW_LOG", "info,dcflow::commands::run=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_committed_to_end(&broker, &topic, &group);
    assert_eq!(stop(child), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    let pauses = text.matches("fetching paused").count();
    assert!(
        pauses >= 2,
        "the slow files paused fetching ({pauses} times):\n{text}"
    );
    assert_eq!(pauses, text.matches("fetching resumed").count(), "{text}");
    for (rel, body) in &expected {
        assert_eq!(
            &std::fs::read(site.download().join(rel)).unwrap(),
            body,
            "{rel}"
        );
    }
    assert_eq!(site.records("success.csv").len(), 12, "each file once");
    assert_eq!(site.sim.pool_gets(), 12, "each file fetched once");
    let (committed, end) = committed_and_end(&broker, &topic, &group);
    assert_eq!((committed, end), (lines.len() as i64, lines.len() as i64));
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
    let dead = unique("dead");
    let kafka = format!(
        "topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"\ndeadlettertopic = \"{dead}\""
    );
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

    // Both failures are on the dead-letter topic; once the cause is gone, a retry from it
    // copies the file. The malformed message is recorded again (a failure row, so exit 1,
    // naming the failure file), not as a file failure.
    site.sim.clear_faults();
    let out = dcflow(&[
        "retry",
        "--config",
        config.to_str().unwrap(),
        "--dead-letters",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("failures recorded in"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("2 messages: 1 files selected, 1 copied"),
        "{}",
        text(&out.stdout)
    );
    assert!(site.download().join("p/always-fails.dat").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_leaves_no_partial_file() {
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("billing"), unique("group"));
    let site = Site::with_kafka(&broker, &topic).await;
    let mut expected = Vec::new();
    let files: usize = std::env::var("DCFLOW_CRASH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    for i in 0..files {
        let size = match i % 10 {
            0 => 0,
            1..=6 => 1000 + i * 37,
            7 | 8 => 200_000 + i * 101,
            _ => 2_000_000 + i * 997,
        };
        let rel = format!("crash/d{}/f-{i:03}.dat", i % 7);
        let door_path = site.upload(&rel, &data(size, i as u32 + 7)).await;
        if i % 10 == 9 {
            // Slow transfers, so that kills land in the middle of some.
            site.sim.add_fault(
                &door_path,
                Fault::SlowLink {
                    bytes_per_second: 4_000_000,
                },
                None,
            );
        }
        expected.push((rel, size, i as u32 + 7));
        site.sim.background(2);
    }
    site.sim.flush_billing();
    let kafka = format!(
        "topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"\n\
         properties = {{ \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 1000 }}"
    );
    let config = site.write_kafka_config(&kafka, "maxdownloads = 8");

    let mut kills = 0;
    for round in 0..5 {
        let child = start_run(&config, &site.path(&format!("crash-{round}.log")));
        std::thread::sleep(Duration::from_millis(1500 + jitter(4000)));
        kill9(child);
        kills += 1;
    }
    let child = start_run(&config, &site.path("final.log"));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (committed, end) = committed_and_end(&broker, &topic, &group);
        if committed == end {
            break;
        }
        if Instant::now() > deadline {
            let log: String = ["crash-0.log", "crash-4.log", "final.log"]
                .iter()
                .map(|f| {
                    format!(
                        "== {f}\n{}",
                        std::fs::read_to_string(site.path(f)).unwrap_or_default()
                    )
                })
                .collect();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("COPY_")).collect();
            panic!(
                "committed {committed} of {end} after 300 s; log without COPY_ lines (last 40):\n{}",
                tail[tail.len().saturating_sub(40)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(stop(child), 0);

    for (rel, size, seed) in &expected {
        let got = std::fs::read(site.download().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(
            got.len() == *size && got == data(*size, *seed),
            "{rel} differs"
        );
    }
    let all = files_below(&site.download());
    assert_eq!(
        all.len(),
        expected.len(),
        "exactly the expected files, no temporary file: {all:?}"
    );
    let downloaded_twice = site.sim.pool_gets().saturating_sub(expected.len() as u64);
    eprintln!(
        "crash test: {kills} kill -9, {} files, {} pool GETs in all ({downloaded_twice} downloaded again), {} success rows",
        expected.len(),
        site.sim.pool_gets(),
        site.records("success.csv").len()
    );
}

fn start(args: &[&str], log: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(args)
        .env("DCFLOW_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dispatcher_three_workers_survive_losing_a_worker() {
    let Some(broker) = broker() else { return };
    let site = Site::new().await;
    let mut expected = Vec::new();
    for i in 0..150usize {
        let rel = format!("scale/f-{i:03}.dat");
        let door_path = site
            .upload(&rel, &data(20_000 + i * 131, i as u32 + 3))
            .await;
        // Slow enough that the run lasts a while and work spreads over the workers.
        site.sim.add_fault(
            &door_path,
            Fault::SlowLink {
                bytes_per_second: 400_000,
            },
            None,
        );
        expected.push((rel, 20_000 + i * 131, i as u32 + 3));
    }
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let fixtures = fixture_lines();
    for (n, line) in std::fs::read_to_string(site.billing())
        .unwrap()
        .lines()
        .enumerate()
    {
        lines.push(line.as_bytes().to_vec());
        lines.push(fixtures[n % fixtures.len()].clone());
    }
    let (topic, work, group) = (unique("billing"), unique("work"), unique("group"));
    produce(&broker, &topic, &lines);
    let kafka = format!(
        "topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"\n\
         worktopic = \"{work}\"\nworkpartitions = 6\n\
         properties = {{ \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 1000 }}"
    );
    let config = site.write_kafka_config(&kafka, "maxdownloads = 4");
    let cfg = config.to_str().unwrap();
    let dispatcher = start(&["dispatch", "--config", cfg], &site.path("dispatch.log"));
    let mut workers: Vec<Option<Child>> = (0..3)
        .map(|w| {
            Some(start(
                &["run", "--config", cfg, "--drain-seconds", "60"],
                &site.path(&format!("worker-{w}.log")),
            ))
        })
        .collect();
    wait_for(
        "a first share of the files",
        Duration::from_secs(120),
        || site.records("success.csv").len() >= 30,
    );
    kill9(workers[1].take().unwrap());

    wait_for(
        "dispatcher and workers to commit everything",
        Duration::from_secs(300),
        || {
            caught_up(&broker, &topic, &format!("{group}-dispatch"), 1)
                && caught_up(&broker, &work, &group, 6)
        },
    );
    assert_eq!(stop(dispatcher), 0);
    for w in workers.iter_mut().filter_map(Option::take) {
        assert_eq!(stop(w), 0);
    }
    for (rel, size, seed) in &expected {
        assert_eq!(
            std::fs::read(site.download().join(rel)).unwrap(),
            data(*size, *seed),
            "{rel}"
        );
    }
    assert_eq!(files_below(&site.download()).len(), expected.len());
    let shares: Vec<usize> = (0..3)
        .map(|w| {
            std::fs::read_to_string(site.path(&format!("worker-{w}.log")))
                .unwrap()
                .lines()
                .filter(|l| l.contains("COPY_REPORT"))
                .count()
        })
        .collect();
    eprintln!(
        "scale-out: 1 dispatcher, 3 workers on 6 partitions, worker 1 killed: shares {shares:?} of {} files, {} pool GETs",
        expected.len(),
        site.sim.pool_gets()
    );
    assert!(
        shares.iter().filter(|&&s| s > 0).count() >= 2,
        "work was spread: {shares:?}"
    );
}

/// Every message of partition 0 of `topic`, as (key, payload).
fn messages_of(broker: &str, topic: &str) -> Vec<(String, serde_json::Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < high && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_secs(1)) {
            use rdkafka::Message;
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            out.push((key, value));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_step_publishes_each_finished_file_once_to_its_topic() {
    let Some(broker) = broker() else { return };
    let billing = unique("billing");
    let follow_up = unique("follow-up");
    let site = Site::with_kafka(&broker, &billing).await;
    site.upload("prod/a.dat", &data(12_000, 11)).await;
    site.upload("prod/b.dat", &data(13_000, 12)).await;
    site.sim.flush_billing();
    let config = site.write_kafka_config(
        &format!(
            "topic = \"{billing}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{}\"",
            unique("g")
        ),
        "",
    );
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&format!(
        r#"
[[workflow]]
name = "announce"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "produce"
topic = "{follow_up}"
key = "{{name}}"
"#
    ));
    std::fs::write(&config, text_cfg).unwrap();
    // The second run is a new consumer group: every message is delivered again, and the
    // state file keeps the follow-up messages from being published twice.
    for run in 0..2 {
        if run == 1 {
            let text_cfg = std::fs::read_to_string(&config).unwrap();
            let regrouped = text_cfg.replace("consumergroup = \"", "consumergroup = \"again-");
            std::fs::write(&config, regrouped).unwrap();
        }
        let out = dcflow(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--until-caught-up",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        if run == 1 {
            assert!(
                text(&out.stderr).contains("WORKFLOW_DONE announce already"),
                "{}",
                text(&out.stderr)
            );
        }
    }
    let got = messages_of(&broker, &follow_up);
    let mut keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["a.dat", "b.dat"], "once per file, not per delivery");
    for (key, value) in &got {
        assert_eq!(value["workflow"], "announce");
        assert!(value["context"]["local_path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("prod/{key}")));
        assert!(value["context"]["checksum"]
            .as_str()
            .unwrap()
            .starts_with("adler32:"));
        assert!(value["event"]["pnfsid"].is_string());
    }
}

fn chromium() -> Option<String> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(name.into());
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("chromium is not installed: .ci/run installs the Debian package");
    }
    eprintln!("SKIPPED the browser part: install chromium (Debian package `chromium`)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_page_and_status_command_follow_a_run() {
    let Some(broker) = broker() else { return };
    let topic = unique("billing");
    let site = Site::with_kafka(&broker, &topic).await;
    let mut copied_bytes = 0;
    for i in 0..4 {
        let body = data(50_000 + i * 1_000, 20 + i as u32);
        copied_bytes += body.len();
        site.upload(&format!("ops/ok-{i}.dat"), &body).await;
    }
    let broken = site.upload("ops/broken.dat", &data(5_000, 30)).await;
    site.sim
        .add_fault(&broken, Fault::Status { code: 500 }, None);
    let slow = site.upload("ops/slow.dat", &data(3_000_000, 31)).await;
    site.sim.add_fault(
        &slow,
        Fault::SlowLink {
            bytes_per_second: 150_000,
        },
        None,
    );
    site.sim.flush_billing();
    let address = free_address();
    let config = site.write_kafka_config(
        &format!(
            "topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{}\"",
            unique("g")
        ),
        "retrytimes = 2",
    );
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&format!("\n[metrics]\naddress = \"{address}\"\n"));
    std::fs::write(&config, text_cfg).unwrap();
    let log = site.path("run.log");
    let child = start_run(&config, &log);

    // Ready once partitions are assigned; then wait for the fast files, the failure and the
    // slow file in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        assert!(
            Instant::now() < deadline,
            "the run did not get there: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let (code, body) = http_get(&address, "/status.json");
        if code == 200 {
            let s: serde_json::Value = serde_json::from_str(&body).unwrap();
            let c = &s["counters"];
            if c["copied"] == 4
                && c["failed"] == 1
                && s["active"].as_array().is_some_and(|a| a.len() == 1)
                && s["lag"].as_object().is_some_and(|l| !l.is_empty())
            {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(http_get(&address, "/healthz").0, 200);
    assert_eq!(http_get(&address, "/readyz").0, 200);
    assert!(status["active"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("ops/slow.dat"));
    assert!(status["recent"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["ok"] == false && e["path"].as_str().unwrap().ends_with("broken.dat")));

    let (code, metrics) = http_get(&address, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(metric(&metrics, "dcflow_transfers_succeeded_total"), 4.0);
    assert_eq!(metric(&metrics, "dcflow_transfers_failed_total"), 1.0);
    assert_eq!(
        metric(&metrics, "dcflow_bytes_copied_total"),
        copied_bytes as f64
    );
    assert_eq!(metric(&metrics, "dcflow_transfers_in_flight"), 1.0);
    assert_eq!(
        metric(&metrics, "dcflow_transfer_retries_total"),
        1.0,
        "broken.dat: 2 attempts"
    );
    assert_eq!(metric(&metrics, "dcflow_transfers_started_total"), 6.0);
    assert_eq!(
        metric(&metrics, "dcflow_transfer_duration_seconds_count"),
        4.0
    );
    assert!(metric(&metrics, "dcflow_events_consumed_total") >= 6.0);
    assert!(metric(&metrics, "dcflow_last_success_timestamp_seconds") > 1.7e9);
    assert!(
        metrics.contains("dcflow_consumer_lag{partition=\"0\"}"),
        "{metrics}"
    );
    // Issue 17, item 9: the format said as it is written, the process's own figures, and
    // when the proxy runs out.
    let (_, headers, _) = http_get_with_headers(&address, "/metrics");
    assert!(
        headers.contains("application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"));
    assert!(
        metric(&metrics, "process_resident_memory_bytes") > 1e6,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "process_cpu_seconds_total") > 0.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "process_open_fds") > 3.0, "{metrics}");
    assert!(
        metric(&metrics, "process_start_time_seconds") > 1.7e9,
        "{metrics}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        metric(&metrics, "dcflow_credential_expiry_timestamp_seconds") > now,
        "{metrics}"
    );

    let out = dcflow(&["status", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("in flight: 1") && shown.contains("ops/slow.dat"),
        "{shown}"
    );
    assert!(
        shown.contains("failed 1") && shown.contains("broken.dat"),
        "{shown}"
    );

    if let Some(browser) = chromium() {
        let url = format!("http://{address}/");
        let profile = site.path("chromium-profile");
        let common_args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=4000",
        ];
        let dom = Command::new(&browser)
            .args(common_args)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--dump-dom", &url])
            .output()
            .unwrap();
        let dom = text(&dom.stdout);
        let section = |id: &str| {
            let start = dom.find(&format!("id=\"{id}\"")).unwrap_or(0);
            dom[start..]
                .split("</table>")
                .next()
                .unwrap_or("")
                .to_owned()
        };
        assert!(section("inflight").contains("ops/slow.dat"), "{dom}");
        assert!(section("recent").contains("broken.dat"), "{dom}");
        assert!(section("recent").contains("failed"), "{dom}");
        assert!(dom.contains("data-name=\"copied\"><b>4</b>"), "{dom}");
        assert!(section("lag").contains("<td>0</td>"), "{dom}");
        let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
        std::fs::create_dir_all(&artefacts).unwrap();
        let shot = artefacts.join("status-page.png");
        let _ = std::fs::remove_file(&shot);
        let out = Command::new(&browser)
            .args(common_args)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--screenshot={}", shot.display()))
            .args(["--window-size=1280,1000", &url])
            .output()
            .unwrap();
        let png = std::fs::read(&shot).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "no screenshot: {}",
            text(&out.stderr)
        );
        eprintln!("status page screenshot: {}", shot.display());
    }
    // Once every message is handled, the lag shown is 0, not the last figure of a backlog.
    wait_for(
        "every file ended and no lag",
        Duration::from_secs(90),
        || {
            let (_, body) = http_get(&address, "/status.json");
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|s| {
                s["counters"]["copied"] == 5
                    && s["lag"]
                        .as_object()
                        .is_some_and(|l| !l.is_empty() && l.values().all(|v| v == 0))
            })
        },
    );
    assert_eq!(stop(child), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_until_caught_up_forwards_every_upload_commits_and_exits() {
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("billing"), unique("group"));
    let work = unique("work");
    let site = Site::with_kafka(&broker, &topic).await;
    for i in 0..5 {
        site.upload(&format!("disp/f-{i}.dat"), &data(3_000 + i, i as u32))
            .await;
        site.sim.background(4);
    }
    site.sim.flush_billing();
    let kafka = format!(
        "topic = \"{topic}\"\nservers = [\"{broker}\"]\nconsumergroup = \"{group}\"\n\
         worktopic = \"{work}\"\nworkpartitions = 1"
    );
    let config = site.write_kafka_config(&kafka, "");
    let out = dcflow(&[
        "dispatch",
        "--config",
        config.to_str().unwrap(),
        "--until-caught-up",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let forwarded = messages_of(&broker, &work);
    let mut keys: Vec<&str> = forwarded.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5, "one key (pnfsid) per upload: {forwarded:#?}");
    assert!(forwarded.iter().all(|(_, m)| m["billingPath"]
        .as_str()
        .is_some_and(|p| p.contains("/disp/f-"))));
    let (committed, end) = committed_and_end(&broker, &topic, &format!("{group}-dispatch"));
    assert_eq!(committed, end, "the billing offset is committed to the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_run_ends_at_the_last_message_and_leaves_its_group() {
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("billing"), unique("group"));
    // It counts the messages it published: dcflow's own downloads are not billed here.
    let site = Site::with_kafka_counted(&broker, &topic).await;
    for i in 0..5 {
        site.upload(&format!("end/f-{i}.dat"), &data(2_000 + i, i as u32))
            .await;
        site.sim.background(20);
    }
    site.sim.flush_billing();
    // The broker holds a fetch that finds nothing for fetch.wait.max.ms: librdkafka's own
    // end-of-partition report would come that long after the last message.
    let kafka = format!(
        "{}\n[kafka.properties]\n\"fetch.wait.max.ms\" = \"50000\"\n\"socket.timeout.ms\" = \"60000\"",
        kafka_keys(&topic, &broker, &group)
    );
    let config = site.write_kafka_config(&kafka, "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--until-caught-up",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 30 s on: waiting for a fetch that comes back empty");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
    assert_eq!(site.records("success.csv").len(), 5);
    let (committed, end) = committed_and_end(&broker, &topic, &group);
    assert_eq!(committed, end, "committed to the end");

    // It left the group on the way out: no member stays behind for the session timeout.
    let admin: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .create()
        .unwrap();
    let groups = admin
        .fetch_group_list(Some(&group), Duration::from_secs(10))
        .unwrap();
    let members: usize = groups.groups().iter().map(|g| g.members().len()).sum();
    assert_eq!(members, 0, "members left in the group");
}
