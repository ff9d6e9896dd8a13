//! `dcflow run` with `[sse]`: dCache's storage events from the emulator's frontend.

use std::time::{Duration, Instant};

use crate::util::*;

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
    // Each file copied once. A file can have a second success row, "already present": when a
    // new folder's listing found it before its close event was received, and the stop came
    // first, the restart is sent that event again (at least once, as promised) and finds the
    // copy in place.
    let copied: u64 = [&log_text, &log2_text]
        .iter()
        .map(|text| stopped_count(text, "copied"))
        .sum();
    let rows = site.records("success.csv");
    let paths: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.billing_path.as_str()).collect();
    assert_eq!(
        (copied, paths.len()),
        (files.len() as u64, files.len()),
        "each file copied once, and recorded: {:#?}\n--- first run:\n{log_text}\n--- second run:\n{log2_text}",
        rows.iter()
            .map(|r| (&r.billing_path, &r.pnfsid, r.time))
            .collect::<Vec<_>>()
    );
}

/// A count from the summary `dcflow run` logs when it stops ("... 13 copied (216 kB), ...").
fn stopped_count(log: &str, what: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("stopped: "))
        .unwrap_or_else(|| panic!("no summary in:\n{log}"));
    line.split(", ")
        .find_map(|part| {
            let part = part.rsplit(": ").next().unwrap_or(part);
            let (n, rest) = part.split_once(' ')?;
            rest.starts_with(what).then(|| n.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {what} count in {line}"))
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

/// The SSE configuration with `extra` appended (workflows, `[dcache]` keys are not here).
fn sse_config_with(site: &Site, auth: &str, dcache: &str, extra: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(site.sim.stored_file(FOLDER)).unwrap();
    let path = site.write_config(auth, dcache);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(extra);
    text.push_str(&format!("\n[sse]\nurl = \"{}\"\n", site.sim.door_url));
    std::fs::write(&path, text).unwrap();
    path
}

/// Issue 14, item 4: SSE events carry no pnfsid, and the stand-in was a hash of the path and
/// the size: a re-upload of a path with new content of the same size was taken for the file
/// already copied (and, under workflows, the state file said every step was done), for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reupload_of_a_path_with_the_same_size_is_copied_again() {
    let site = Site::new().await;
    let workflow = "\n[[workflow]]\nname = \"keep\"\n[[workflow.step]]\ntype = \"copy\"\n";
    let config = sse_config_with(&site, &site.proxy_auth(), "retryseconds = 0", workflow);
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let first = vec![("r/frame.fits".to_owned(), data(50_000, 1))];
    site.upload(&first[0].0, &first[0].1).await;
    wait_for("the first upload", &log, || all_landed(&site, &first));
    let second = vec![("r/frame.fits".to_owned(), data(50_000, 2))];
    assert_ne!(first[0].1, second[0].1);
    site.upload(&second[0].0, &second[0].1).await;
    wait_for("the re-upload", &log, || all_landed(&site, &second));
    assert_eq!(stop(child), 0);
    let rows = site.records("success.csv");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_ne!(rows[0].pnfsid, rows[1].pnfsid, "two files, two pnfsids");
    assert!(site.records("failed.csv").is_empty());
}

/// Issue 14, item 5: a PROPFIND that failed during a resynchronisation was skipped
/// (`continue`) while later event ids were saved: the files whose events were lost were never
/// fetched. Now the resynchronisation is retried until it finishes, and the saved id waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resynchronisation_whose_listing_fails_is_retried_until_it_finishes() {
    use dcache_sim::Fault;
    let site = Site::new().await;
    site.sim.frontend().set_backlog(0);
    let config = sse_config(&site);
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let mut files = vec![("y/first.dat".to_owned(), data(8_000, 1))];
    site.upload(&files[0].0, &files[0].1).await;
    wait_for("the first file", &log, || all_landed(&site, &files));
    // Events are lost while the stream is down, and the next listings of the folder fail.
    site.sim.add_fault(
        &format!("{FOLDER}/y/"),
        Fault::ListStatus { code: 500 },
        Some(3),
    );
    site.sim.add_fault(
        &format!("{FOLDER}/y"),
        Fault::ListStatus { code: 500 },
        Some(3),
    );
    site.sim.frontend().disconnect();
    for i in 0..3 {
        let f = (format!("y/missed-{i}.dat"), data(6_000 + i, 10 + i as u32));
        site.upload(&f.0, &f.1).await;
        files.push(f);
    }
    wait_for("the missed files", &log, || all_landed(&site, &files));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("resynchronisation did not finish") || text.contains("incomplete"),
        "{text}"
    );
    // The files land before the resynchronisation that fetched them has finished.
    wait_for("the resynchronisation to finish", &log, || {
        std::fs::read(site.path("dcflow-sse.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.get("resync_pending").is_none())
    });
    assert_eq!(stop(child), 0);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.path("dcflow-sse.json")).unwrap()).unwrap();
    assert!(saved.get("resync_pending").is_none(), "{saved}");
}

/// Issue 14, item 7: each close-write event started a HEAD at once, before any transfer slot
/// was taken, and the HEAD had no timeout: a burst of events against a door that hangs opened
/// a connection per event, and a hung HEAD held the saved event id for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_events_against_a_hanging_door_is_bounded_and_times_out() {
    use dcache_sim::Fault;
    let site = Site::new().await;
    // maxdownloads = 2; HEADs hang (twice per file) until stalltimeout = 2 s gives up on them.
    let config = sse_config_with(
        &site,
        &site.proxy_auth(),
        "retryseconds = 0\nmaxdownloads = 2\nstalltimeout = 2",
        "",
    );
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let mut files = Vec::new();
    for i in 0..30 {
        let f = (format!("z/f{i:02}.dat"), data(2_000 + i, 40 + i as u32));
        site.sim
            .add_fault(&format!("{FOLDER}/{}", f.0), Fault::Hang, Some(1));
        files.push(f);
    }
    for f in &files {
        site.upload(&f.0, &f.1).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !all_landed(&site, &files) {
        assert!(
            Instant::now() < deadline,
            "not every file landed:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A hung HEAD holds its slot until dcflow gives up on it, 2 s or more later: with two
    // slots, no window shorter than that can see a third hung HEAD arrive.
    let starts = site.sim.hung_head_starts();
    assert!(
        starts.len() >= files.len() / 2,
        "{} hung HEADs",
        starts.len()
    );
    let window = Duration::from_millis(1500);
    let most = starts
        .iter()
        .map(|&t| starts.iter().filter(|&&u| u >= t && u < t + window).count())
        .max()
        .unwrap_or(0);
    let t0 = starts[0];
    let offsets: Vec<u128> = starts.iter().map(|t| (*t - t0).as_millis()).collect();
    assert!(
        most <= 2,
        "{most} hung HEADs within {window:?} with maxdownloads = 2: at {offsets:?} ms"
    );
    // The saved id passes the last file's event (with a HEAD that never ends, it stayed at
    // the first file's for good).
    wait_for("the saved event id", &log, || {
        std::fs::read(site.path("dcflow-sse.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["last_event_id"].as_u64())
            .is_some_and(|id| id >= files.len() as u64)
    });
    assert_eq!(stop(child), 0);
}

/// Issue 14, item 8: the bearer token was added to every request to the frontend, whose
/// channel URL comes from a `Location` header or the state file, with no check of scheme or
/// origin. A state file naming a channel elsewhere got the token sent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_only_to_the_configured_frontend() {
    use std::io::{Read, Write};
    let site = Site::new().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 8192];
            let n = conn.read(&mut buf).unwrap_or(0);
            record
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let token = format!("token = \"{}\"", site.sim.token_file.display());
    let config = sse_config_with(&site, &token, "retryseconds = 0", "");
    std::fs::write(
        site.path("dcflow-sse.json"),
        format!(
            r#"{{"channel": "http://{elsewhere}/api/v1/events/channels/x", "last_event_id": 3}}"#
        ),
    )
    .unwrap();
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let files = vec![("t/a.dat".to_owned(), data(4_000, 3))];
    site.upload(&files[0].0, &files[0].1).await;
    wait_for("the file", &log, || all_landed(&site, &files));
    assert_eq!(stop(child), 0);
    let got = seen.lock().unwrap().clone();
    assert!(
        !got.to_ascii_lowercase().contains("authorization"),
        "the token went to {elsewhere}:\n{got}"
    );
    assert!(
        !got.contains(&site.sim.token),
        "the token went to {elsewhere}"
    );
}

/// dCache's frontend goes away under the SSE source (the emulator halted): the log says so
/// once, `/readyz` answers 503 after `outagegrace`, the status names the frontend and the
/// cause; when it is back, the stream reopens, `/readyz` is 200 again and new files land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_outage_is_told_once_and_readyz_follows_it() {
    let mut site = Site::new().await;
    let address = free_address();
    let config = sse_config_with(
        &site,
        &site.proxy_auth(),
        "retryseconds = 0",
        &format!("\n[metrics]\naddress = \"{address}\"\noutagegrace = 2\n"),
    );
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for_stream(&log);
    let before = vec![("o/before.dat".to_owned(), data(20_000, 5))];
    site.upload(&before[0].0, &before[0].1).await;
    wait_for("the first file", &log, || all_landed(&site, &before));
    wait_for("ready", &log, || http_get(&address, "/readyz").0 == 200);
    site.sim.halt();
    wait_for("/readyz 503 naming the frontend", &log, || {
        let (code, body) = http_get(&address, "/readyz");
        code == 503 && body.contains("frontend (SSE) is unreachable")
    });
    let (_, status) = http_get(&address, "/status.json");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let frontend = &status["upstreams"]["frontend"];
    assert_eq!(frontend["up"], false, "{status}");
    assert!(
        frontend["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Connection refused")),
        "{frontend}"
    );
    // Through a few reconnection attempts (back-off 1, 2, 4 s...): told once.
    std::thread::sleep(Duration::from_secs(8));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged.matches("frontend (SSE) is unreachable").count(),
        1,
        "{logged}"
    );
    site.sim.resume().await.unwrap();
    wait_for("ready again", &log, || {
        http_get(&address, "/readyz").0 == 200
    });
    wait_for("the stream again", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("frontend (SSE) is reachable again after")
    });
    let after = vec![("o/after.dat".to_owned(), data(30_000, 6))];
    site.upload(&after[0].0, &after[0].1).await;
    wait_for("the file after the outage", &log, || {
        all_landed(&site, &after)
    });
    assert_eq!(stop(child), 0);
}
