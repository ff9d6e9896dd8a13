//! `dcflow run` with `[sse]`: dCache's storage events from the emulator's frontend.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn sse_config(site: &Site) -> std::path::PathBuf {
    // dCache watches existing directories only: the folder exists before dcflow starts.
    std::fs::create_dir_all(site.sim.stored_file(FOLDER)).unwrap();
    let path = site.write_config(&site.proxy_auth(), "retryseconds = 0");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("\n[sse]\nurl = \"{}\"\n", site.sim.door_url));
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_for(what: &str, log: &std::path::Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_stream(log: &std::path::Path) {
    wait_for("the stream", log, || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("event stream open")
    });
}

/// Every uploaded file is at its destination, byte for byte.
fn all_landed(site: &Site, files: &[(String, Vec<u8>)]) -> bool {
    files
        .iter()
        .all(|(rel, body)| std::fs::read(site.download().join(rel)).is_ok_and(|b| &b == body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_new_directories_a_cut_stream_and_a_restart_lose_nothing() {
    let site = Site::new().await;
    let mut files = Vec::new();
    // Present before dcflow starts: found by the first listing.
    let early = ("early.dat".to_owned(), data(30_000, 1));
    site.upload(&early.0, &early.1).await;
    files.push(early);
    let config = sse_config(&site);
    let address = free_address();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[metrics]\naddress = \"{address}\"\n"));
    std::fs::write(&config, text).unwrap();
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    for i in 0..12 {
        let rel = if i % 3 == 0 {
            format!("new-dir-{}/deeper/f{i}.dat", i % 2)
        } else {
            format!("burst/f{i}.dat")
        };
        let body = data(10_000 + i * 1_000, 100 + i as u32);
        site.upload(&rel, &body).await;
        files.push((rel, body));
        if i == 5 {
            site.sim.frontend().disconnect(); // mid-burst: reconnect with Last-Event-ID
        }
    }
    wait_for("every file", &log, || all_landed(&site, &files));
    let (_, metrics) = http_get(&address, "/metrics");
    assert!(
        metric(&metrics, "dcflow_sse_reconnects_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "dcflow_sse_resyncs_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "dcflow_transfers_failed_total"), 0.0);
    assert_eq!(stop(child), 0);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("reconnecting"), "{log_text}");
    assert!(
        log_text.contains("new directory: subscribing"),
        "{log_text}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.path("dcflow-sse.json")).unwrap()).unwrap();
    assert!(
        state["channel"].is_string() && state["last_event_id"].is_u64(),
        "{state}"
    );

    // Stopped: a file arrives; the restart resumes the saved channel after its last id.
    let late = ("burst/late.dat".to_owned(), data(20_000, 7));
    site.upload(&late.0, &late.1).await;
    files.push(late);
    let log2 = site.path("run2.log");
    let child = start_run(&config, &log2);
    wait_for("the late file", &log2, || all_landed(&site, &files));
    assert_eq!(stop(child), 0);
    let log2_text = std::fs::read_to_string(&log2).unwrap();
    assert!(
        !log2_text.contains("event channel created"),
        "the saved channel is reused: {log2_text}"
    );
    assert!(site.records("failed.csv").is_empty());
    assert_eq!(
        site.records("success.csv").len(),
        files.len(),
        "each file once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_channel_is_recreated_and_the_tree_resynchronised() {
    let site = Site::new().await;
    let config = sse_config(&site);
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let mut files = Vec::new();
    for i in 0..3 {
        let f = (format!("a/f{i}.dat"), data(5_000 + i, i as u32));
        site.upload(&f.0, &f.1).await;
        files.push(f);
    }
    wait_for("the first files", &log, || all_landed(&site, &files));
    // The frontend restarts: channels are gone; what is uploaded meanwhile has no event.
    site.sim.frontend().forget_channels();
    for i in 3..6 {
        let f = (format!("a/f{i}.dat"), data(5_000 + i, i as u32));
        site.upload(&f.0, &f.1).await;
        files.push(f);
    }
    wait_for("every file", &log, || all_landed(&site, &files));
    assert_eq!(stop(child), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the event channel is gone (404)"), "{text}");
    assert!(text.contains("resynchronised"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_loss_marker_and_a_queue_overflow_resynchronise() {
    let site = Site::new().await;
    // Nothing kept for replay: a reconnect after missed events gets EVENT_LOSS.
    site.sim.frontend().set_backlog(0);
    let config = sse_config(&site);
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let mut files = vec![("x/first.dat".to_owned(), data(8_000, 1))];
    site.upload(&files[0].0, &files[0].1).await;
    wait_for("the first file", &log, || all_landed(&site, &files));
    site.sim.frontend().disconnect();
    for i in 0..3 {
        let f = (format!("x/missed-{i}.dat"), data(6_000 + i, 10 + i as u32));
        site.upload(&f.0, &f.1).await;
        files.push(f);
    }
    wait_for("the missed files", &log, || all_landed(&site, &files));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("EVENT_LOSS"), "{text}");

    site.sim.frontend().overflow();
    wait_for("the overflow", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("IN_Q_OVERFLOW")
    });
    assert_eq!(stop(child), 0);
    assert_eq!(site.records("success.csv").len(), files.len());
}

/// The hostile and malformed storage events of `fixtures/bad-input/sse-corpus.jsonl`, sent on
/// the live stream between good uploads: each one that is `recorded` there becomes one row of
/// the failure record, the others are ignored, nothing is written outside the download
/// folder, and the good files land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_storage_events_are_recorded_or_ignored_and_good_files_land() {
    let corpus = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/bad-input/sse-corpus.jsonl"
    ))
    .unwrap();
    let events: Vec<serde_json::Value> = corpus
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let site = Site::new().await;
    let config = sse_config(&site);
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let before: Vec<_> = files_below(site.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with(site.download()))
        .collect();

    let mut files = vec![("first.dat".to_owned(), data(5_000, 1))];
    site.upload(&files[0].0, &files[0].1).await;
    wait_for("the first file", &log, || all_landed(&site, &files));
    let watched = site.sim.namespace_path(FOLDER);
    for e in &events {
        let data = match e["data"].as_str() {
            Some(text) => text.as_bytes().to_vec(),
            None => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(e["data_base64"].as_str().unwrap())
                    .unwrap()
            }
        };
        site.sim
            .frontend()
            .inject_bytes(&watched, e["event"].as_str().unwrap(), &data);
    }
    let last = ("last.dat".to_owned(), data(7_000, 2));
    site.upload(&last.0, &last.1).await;
    files.push(last);
    let count = |expect: &str| events.iter().filter(|e| e["expect"] == expect).count();
    let (recorded, failed) = (count("recorded"), count("failed"));
    wait_for("the last file and every failure row", &log, || {
        all_landed(&site, &files) && site.records("failed.csv").len() >= recorded + failed
    });
    assert_eq!(stop(child), 0);

    let failures = site.records("failed.csv");
    assert_eq!(failures.len(), recorded + failed, "{failures:#?}");
    let malformed = failures
        .iter()
        .filter(|r| {
            r.error
                .starts_with("malformed storage event (storage event ")
        })
        .count();
    assert_eq!(malformed, recorded, "{failures:#?}");
    // Bytes that are not UTF-8 were read as U+FFFD and the stream went on.
    assert!(
        failures.iter().any(|r| r.billing_path.contains('\u{FFFD}')),
        "{failures:#?}"
    );
    let landed = files_below(&site.download());
    assert_eq!(landed.len(), files.len(), "only the good files: {landed:?}");
    let after: Vec<_> = files_below(site.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with(site.download()) && !before.contains(p))
        .filter(|p| {
            !["run.log", "failed.csv", "success.csv"]
                .iter()
                .any(|n| p.ends_with(n))
        })
        .filter(|p| !p.starts_with(site.path("sim")))
        .collect();
    assert!(
        after.is_empty(),
        "nothing written outside the download folder: {after:?}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log_text.contains("subscribing and listing it"),
        "no hostile name became a subscription:\n{log_text}"
    );
}
