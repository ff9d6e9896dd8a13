//! `[tape]`: files whose only copy is on tape, against the emulator's tape (dCache 12.0.1's
//! WLCG Tape REST API and localities): staged without a transfer slot, copied, released;
//! LOST, UNAVAILABLE and failed stages recorded at once; a `store` message as a trigger.

use std::time::Duration;

use crate::util::*;

fn tape_config(site: &Site, extra_dcache: &str, extra: &str) -> std::path::PathBuf {
    let config = site.write_config(&site.proxy_auth(), extra_dcache);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[tape]\napi = \"{}/api/v1/tape\"\nbatch = 10\n{extra}",
        site.sim.door_url
    ));
    std::fs::write(&config, text).unwrap();
    config
}

fn landed(site: &Site, rel: &str, body: &[u8]) -> bool {
    std::fs::read(site.download().join(rel)).is_ok_and(|b| b == body)
}

/// Three files on tape only and two on disk (one of them NEARLINE as dCache says of a
/// disk-only file on a pool that does not serve reads), one transfer slot, a tape that does
/// not answer until the test lets it: the files on disk are copied while the others wait for
/// tape (a waiting file holds no slot), then the tape answers and they are copied and released. The
/// three were asked for together, and never fetched before they were on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_tape_are_staged_without_a_transfer_slot_copied_and_released() {
    let site = Site::new().await;
    let mut on_tape = Vec::new();
    for i in 0..3 {
        let (rel, body) = (format!("t/tape-{i}.raw"), data(40_000 + i, 800 + i as u32));
        let p = site.upload(&rel, &body).await;
        site.sim.flush_to_tape(&p);
        site.sim.set_locality(&p, "NEARLINE");
        on_tape.push((rel, body, p));
    }
    let mut on_disk = Vec::new();
    for i in 0..2 {
        // A level below: the walk lists it after the files on tape.
        let (rel, body) = (
            format!("t/later/disk-{i}.raw"),
            data(30_000 + i, 900 + i as u32),
        );
        let p = site.upload(&rel, &body).await;
        if i == 1 {
            // dCache's NEARLINE for a disk-only file on a pool that does not serve reads
            // (seen on 12.0.1): read at once, never staged.
            site.sim.set_locality(&p, "NEARLINE");
        }
        on_disk.push((rel, body));
    }
    site.sim.set_stage_delay(Duration::from_secs(100_000));
    let config = tape_config(&site, "maxdownloads = 1", "release = true\n");
    let log = site.path("sync.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(["sync", "-c", config.to_str().unwrap()])
        .env("DCFLOW_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_logged(
        "the files on disk, while the others wait for tape",
        Duration::from_secs(60),
        &log,
        || on_disk.iter().all(|(rel, body)| landed(&site, rel, body)),
    );
    assert!(on_tape
        .iter()
        .all(|(rel, ..)| !site.download().join(rel).exists()));
    site.sim.set_stage_delay(Duration::ZERO);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    for (rel, body, _) in &on_tape {
        assert!(landed(&site, rel, body), "{rel}");
    }
    assert_eq!(
        site.sim.nearline_gets(),
        0,
        "nothing fetched before it was on disk"
    );
    let requests = site.sim.stage_requests();
    let staged: usize = requests.iter().map(Vec::len).sum();
    assert_eq!(staged, 3, "{requests:?}");
    assert!(requests.len() < 3, "asked for in batches: {requests:?}");
    let mut released = site.sim.released();
    released.sort();
    let mut expected: Vec<String> = on_tape
        .iter()
        .map(|(_, _, p)| site.sim.namespace_path(p))
        .collect();
    expected.sort();
    assert_eq!(released, expected);
}

/// LOST and UNAVAILABLE files, and a stage that dCache refuses: each a failure row with the
/// reason, at once (no retry loop); the rest lands; exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_unavailable_and_failed_stages_are_recorded_at_once() {
    let site = Site::new().await;
    let mut paths = Vec::new();
    for (i, locality) in ["LOST", "UNAVAILABLE", "NEARLINE", "ONLINE"]
        .iter()
        .enumerate()
    {
        let rel = format!("bad/f-{i}.dat");
        let p = site.upload(&rel, &data(5_000 + i, 70 + i as u32)).await;
        if *locality == "NEARLINE" {
            site.sim.flush_to_tape(&p);
        }
        site.sim.set_locality(&p, locality);
        paths.push(p);
    }
    site.sim.fail_stage(&paths[2], "tape cartridge unreadable");
    let config = tape_config(&site, "retrytimes = 5", "");
    let out = dcflow(&["sync", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 3, "{failed:#?}");
    let reasons: Vec<&str> = failed.iter().map(|r| r.error.as_str()).collect();
    assert!(reasons.iter().any(|e| e.contains("LOST")), "{reasons:?}");
    assert!(
        reasons.iter().any(|e| e.contains("UNAVAILABLE")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|e| e.contains("tape cartridge unreadable")),
        "{reasons:?}"
    );
    assert_eq!(site.records("success.csv").len(), 1);
    assert_eq!(site.sim.pool_gets(), 1, "only the file on disk was fetched");
}

/// With a Kafka source: an upload whose disk copy went before dcflow got to it is staged, then
/// copied; the pool's `store` message of a flushed file runs the workflow that selects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stages_what_is_on_tape_and_a_store_message_runs_its_workflow() {
    let Some(broker) = broker() else { return };
    let topic = unique("tape");
    let site = Site::with_kafka(&broker, &topic).await;
    let evicted = site.upload("k/evicted.raw", &data(60_000, 11)).await;
    site.sim.flush_to_tape(&evicted);
    site.sim.set_locality(&evicted, "NEARLINE");
    let flushed = site.upload("k/flushed.raw", &data(20_000, 12)).await;
    site.sim.flush_to_tape(&flushed);
    site.sim.flush_billing();
    let marks = site.path("stored");
    std::fs::create_dir_all(&marks).unwrap();
    let workflows = format!(
        r#"
[[workflow]]
name = "copy"
[workflow.match]
kinds = ["upload"]
[[workflow.step]]
type = "copy"

[[workflow]]
name = "on-tape"
[workflow.match]
kinds = ["store"]
[[workflow.step]]
type = "exec"
argv = ["touch", "{}/{{name}}"]
"#,
        marks.display()
    );
    let config = site.write_workflow_config("", &workflows);
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg = format!(
        "[kafka]\n{}\n{text_cfg}\n[tape]\napi = \"{}/api/v1/tape\"\n",
        kafka_keys(&topic, &broker, &unique("g")),
        site.sim.door_url
    );
    std::fs::write(&config, text_cfg).unwrap();
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_logged(
        "both copies and the store workflow",
        Duration::from_secs(60),
        &log,
        || {
            site.download().join("k/evicted.raw").exists()
                && site.download().join("k/flushed.raw").exists()
                && marks.join("evicted.raw").exists()
                && marks.join("flushed.raw").exists()
        },
    );
    assert_eq!(stop(child), 0);
    assert_eq!(site.sim.nearline_gets(), 0);
    assert_eq!(
        site.sim.stage_requests().len(),
        1,
        "only the evicted file was staged"
    );
}
