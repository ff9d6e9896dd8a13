//! Chaos: the emulator restarts mid-run, the destination fills up, the destination cannot be
//! written. Each run ends with a tally of files expected, landed (byte-identical at the final
//! path), downloaded twice, recorded as failed, lost (must be 0) and corrupt (must be 0),
//! with no temporary file left behind.
//!
//! The full-disk test mounts a small tmpfs and the permission test runs dcflow as `nobody`
//! when the tests run as root; both need root (or, for the permission test, a non-root user)
//! and say SKIPPED otherwise, except under CI where that is a failure.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;
use dcache_sim::Fault;
use dcflow_core::RecordFile;

/// What a chaos run ended with.
#[derive(Debug)]
struct Tally {
    expected: usize,
    landed: usize,
    failed: usize,
    lost: usize,
    corrupt: usize,
    stray: Vec<std::path::PathBuf>,
}

/// Compares the download folder with `expected` (relative path, size, seed of `data`) and the
/// failure records.
fn tally(site: &Site, expected: &[(String, usize, u32)]) -> Tally {
    let failed_paths: Vec<String> = site
        .records("failed.csv")
        .into_iter()
        .map(|r| r.billing_path)
        .collect();
    let (mut landed, mut failed, mut lost, mut corrupt) = (0, 0, 0, 0);
    for (rel, size, seed) in expected {
        match std::fs::read(site.download().join(rel)) {
            Ok(got) if got.len() == *size && got == data(*size, *seed) => landed += 1,
            Ok(_) => corrupt += 1,
            Err(_) if failed_paths.iter().any(|p| p.ends_with(&format!("/{rel}"))) => failed += 1,
            Err(_) => lost += 1,
        }
    }
    let known: Vec<_> = expected
        .iter()
        .map(|(rel, ..)| site.download().join(rel))
        .collect();
    let stray = files_below(&site.download())
        .into_iter()
        .filter(|p| !known.contains(p))
        .collect();
    Tally {
        expected: expected.len(),
        landed,
        failed,
        lost,
        corrupt,
        stray,
    }
}

fn report(name: &str, site: &Site, t: &Tally) {
    eprintln!(
        "chaos {name}: expected {}, landed {}, recorded failed {}, downloaded twice {}, lost {}, corrupt {}, stray files {}",
        t.expected,
        t.landed,
        t.failed,
        site.sim.pool_gets().saturating_sub(t.landed as u64),
        t.lost,
        t.corrupt,
        t.stray.len()
    );
}

/// A replay that recorded failures (exit 1): its tally, reported, and its log.
fn replay_with_failures(
    site: &Site,
    name: &str,
    out: std::process::Output,
    expected: &[(String, usize, u32)],
) -> (Tally, String) {
    let log = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "failures make replay exit 1: {log}"
    );
    let t = tally(site, expected);
    report(name, site, &t);
    (t, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_restarts_mid_run_lose_nothing() {
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("chaos"), unique("group"));
    let mut site = Site::with_kafka(&broker, &topic).await;
    let kafka = kafka_keys(&topic, &broker, &group);
    // Enough attempts, with back-off from 1 s, to outlast a few seconds of downtime.
    let config =
        site.write_kafka_config(&kafka, "maxdownloads = 6\nretryseconds = 1\nretrytimes = 8");
    let child = start_run(&config, &site.path("run.log"));

    let mut expected = Vec::new();
    for round in 0..3u32 {
        let mut slow = Vec::new();
        for i in 0..30usize {
            let n = round as usize * 30 + i;
            let size = match n % 3 {
                0 => 3_000 + n,
                1 => 300_000 + n * 7,
                _ => 2_000_000 + n * 13,
            };
            let rel = format!("restart/r{round}/f-{i:02}.dat");
            let door_path = site.upload(&rel, &data(size, n as u32)).await;
            if n % 3 == 2 {
                // Slow, so that the restart cuts some transfers in the middle.
                site.sim.add_fault(
                    &door_path,
                    Fault::SlowLink {
                        bytes_per_second: 2_000_000,
                    },
                    None,
                );
                slow.push(door_path);
            }
            expected.push((rel, size, n as u32));
            site.sim.background(3);
        }
        site.sim.flush_billing();
        // Once a slow transfer (a second or more) has started, restart the emulator with
        // 1.5 s of downtime. (A fixed delay missed every transfer on a loaded machine.)
        let deadline = Instant::now() + Duration::from_secs(30);
        while !slow.iter().any(|p| site.sim.faults_fired(p) > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100 + jitter(400))).await;
        site.sim.halt();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        site.sim.resume().await.expect("the emulator listens again");
    }

    let records = site.path("success.csv");
    wait_for("every file to land", Duration::from_secs(180), || {
        dcflow_core::RecordFile::read_all(&records).map_or(0, |r| r.len()) >= expected.len()
    });
    assert_eq!(stop(child), 0);
    let t = tally(&site, &expected);
    report("emulator restarts", &site, &t);
    let log = std::fs::read_to_string(site.path("run.log")).unwrap();
    assert!(
        log.contains("failed, retrying in"),
        "the restarts were ridden out by retries, which the log shows"
    );
    assert_eq!(
        (t.landed, t.lost, t.corrupt, t.failed),
        (expected.len(), 0, 0, 0),
        "{t:?}"
    );
    assert!(t.stray.is_empty(), "no temporary file left: {:?}", t.stray);
}

/// Runs `cmd`; false when it failed for lack of privilege (the test then says SKIPPED).
fn privileged(cmd: &mut Command) -> bool {
    let out = cmd.output().expect("running a system command");
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr).into_owned();
    if std::env::var_os("CI").is_some() {
        panic!("{cmd:?} failed under CI: {why}");
    }
    eprintln!(
        "SKIPPED: {cmd:?} failed ({}); this test needs root",
        why.trim()
    );
    false
}

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        privileged(Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0755"),
            "dcflow-chaos",
            dir.to_str().unwrap(),
        ]))
        .then(|| Self(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args([
                "-o",
                &format!("remount,size={size}"),
                self.0.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_destination_fails_cleanly_and_a_retry_lands_the_rest() {
    let site = Site::new().await;
    let Some(disk) = Tmpfs::mount(&site.download(), "8m") else {
        return;
    };
    // 12 files of about 1.5 MiB into 8 MiB: some cannot fit.
    let mut expected = Vec::new();
    for i in 0..12usize {
        let size = 1_500_000 + i * 1000;
        let rel = format!("full/f-{i:02}.dat");
        site.upload(&rel, &data(size, 100 + i as u32)).await;
        expected.push((rel, size, 100 + i as u32));
    }
    let config = site.write_config(&site.proxy_auth(), "maxdownloads = 4");
    let (t, _) = replay_with_failures(&site, "full destination", site.replay(&config), &expected);
    assert!(t.landed >= 1 && t.failed >= 1, "{t:?}");
    assert_eq!((t.lost, t.corrupt), (0, 0), "{t:?}");
    assert!(t.stray.is_empty(), "no temporary file left: {:?}", t.stray);
    let failures = site.records("failed.csv");
    assert!(
        failures
            .iter()
            .all(|r| r.error.contains("No space left on device")),
        "each failure names the cause: {failures:#?}"
    );

    // Space comes back: the failures are re-run from the CSV and land.
    disk.resize("64m");
    let out = dcflow(&[
        "retry",
        "--config",
        config.to_str().unwrap(),
        site.path("failed.csv").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = tally(&site, &expected);
    report("full destination, after the retry", &site, &t);
    assert_eq!(
        (t.landed, t.lost, t.corrupt),
        (expected.len(), 0, 0),
        "{t:?}"
    );
    assert!(t.stray.is_empty(), "{:?}", t.stray);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_write_permission_fails_cleanly_without_retrying() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new().await;
    let mut expected = Vec::new();
    for i in 0..6usize {
        let size = 10_000 + i;
        let rel = format!("locked/f-{i}.dat");
        site.upload(&rel, &data(size, 200 + i as u32)).await;
        expected.push((rel, size, 200 + i as u32));
    }
    let config = site.write_config(&site.proxy_auth(), "retrytimes = 5");
    std::fs::create_dir_all(site.download().join("locked")).unwrap();
    let as_root = unsafe { libc::geteuid() } == 0;
    let nobody = 65534;
    if as_root {
        // Root writes anywhere: dcflow runs as nobody, who may read its configuration and
        // credentials and write its records, but not into the download folder (root's, 0755).
        let status = Command::new("chown")
            .args([
                "-R",
                &format!("{nobody}:{nobody}"),
                site.dir.path().to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::set_permissions(site.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(site.download(), Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(site.download().join("locked"), Some(0), Some(0)).unwrap();
    } else {
        std::fs::set_permissions(
            site.download().join("locked"),
            std::fs::Permissions::from_mode(0o555),
        )
        .unwrap();
    }
    // The parents of the temporary folder must be traversable by nobody.
    let mut args = vec![
        "replay".to_owned(),
        "--config".to_owned(),
        config.to_str().unwrap().to_owned(),
        site.billing().to_str().unwrap().to_owned(),
    ];
    let mut cmd = if as_root {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={nobody}"),
            &format!("--regid={nobody}"),
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_dcflow"),
        ]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_dcflow"))
    };
    let out = cmd
        .args(args.drain(..))
        .env("DCFLOW_LOG", "info")
        .env_remove("X509_USER_PROXY")
        .env_remove("BEARER_TOKEN")
        .env_remove("BEARER_TOKEN_FILE")
        .output()
        .unwrap();
    let (t, log) = replay_with_failures(&site, "no write permission", out, &expected);
    assert_eq!(
        (t.landed, t.failed, t.lost, t.corrupt),
        (0, expected.len(), 0, 0),
        "{t:?}\n{log}"
    );
    assert!(t.stray.is_empty(), "{:?}", t.stray);
    let failures = site.records("failed.csv");
    assert!(
        failures
            .iter()
            .all(|r| r.error.contains("Permission denied")),
        "each failure names the cause: {failures:#?}"
    );
    // A local permission problem is not retried: one attempt per file, no pool GET at all.
    assert!(
        !log.contains("failed, retrying in"),
        "no retry storm:\n{log}"
    );
    assert_eq!(
        site.sim.pool_gets(),
        0,
        "nothing was fetched to be thrown away"
    );
}

/// Issue 14, item 1: two copiers of one file. A `dcflow replay` copies a slow 1 GiB upload;
/// when it is three quarters through, a second `dcflow replay` of the same message starts.
/// With one fixed temporary name opened with truncate, the second cut the first one's file
/// back to nothing while the first went on writing at its offset, and the first then published
/// a file with a hole as "checksum ok". Now the second waits for the first (the final path's
/// lock), and each attempt writes its own exclusively created temporary file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_of_one_slow_upload_publish_it_whole() {
    const SIZE: usize = 1 << 30;
    let site = Site::new().await;
    // Not zeros: a hole in the file must show.
    let block = data(1 << 20, 77);
    let mut body = Vec::with_capacity(SIZE);
    while body.len() < SIZE {
        body.extend_from_slice(&block);
    }
    let door = site.upload("big/frame-1GiB.raw", &body).await;
    site.sim.add_fault(
        &door,
        Fault::SlowLink {
            bytes_per_second: 96 << 20,
        },
        None,
    );
    let config = site.write_config(&site.proxy_auth(), "timeout = 300\nstalltimeout = 60");
    let spawn_replay = || site.spawn_replay(&config, None);
    let final_path = site.download().join("big/frame-1GiB.raw");
    let first = spawn_replay();
    // Three quarters of the first copy written.
    wait_for(
        "the first copy to be three quarters through",
        Duration::from_secs(120),
        || {
            files_below(&site.download().join("big")).iter().any(|p| {
                p.to_string_lossy().contains("dcflow-part")
                    && std::fs::metadata(p).is_ok_and(|m| m.len() >= (SIZE as u64) * 3 / 4)
            })
        },
    );
    let second = spawn_replay();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    // What the first one published, read at once.
    let published = std::fs::read(&final_path).unwrap();
    let intact = published == body;
    let second = second.wait_with_output().unwrap();
    assert!(
        intact,
        "the first replay published a file that differs from dCache's ({} bytes)",
        published.len()
    );
    drop(published);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert!(
        std::fs::read(&final_path).unwrap() == body,
        "after the second replay"
    );
    let stray: Vec<_> = files_below(&site.download())
        .into_iter()
        .filter(|p| p != &final_path)
        .collect();
    assert!(stray.is_empty(), "temporary or lock files left: {stray:?}");
    assert_eq!(
        site.sim.pool_gets(),
        1,
        "the second replay found the first one's copy"
    );
}

/// Issue 14, item 3: a record that could not be written was only logged, and the event's
/// offset was committed all the same: with a full disk every file failed at once and every
/// event was committed with no trace. Now the run stops with a clear error, nothing past the
/// unrecorded events is committed, and the next run (space back) records them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_cannot_be_written_stop_the_run_before_anything_unrecorded_is_committed() {
    let Some(broker) = broker() else { return };
    let topic = unique("records-full");
    let site = Site::with_kafka(&broker, &topic).await;
    let records = site.path("records");
    let Some(disk) = Tmpfs::mount(&records, "512k") else {
        return;
    };
    let group = unique("records-full-group");
    let config = site.write_kafka_config(&kafka_keys(&topic, &broker, &group), "");
    let text_config = std::fs::read_to_string(&config).unwrap();
    let text_config = text_config
        .replace(
            site.path("failed.csv").to_str().unwrap(),
            records.join("failed.csv").to_str().unwrap(),
        )
        .replace(
            site.path("success.csv").to_str().unwrap(),
            records.join("success.csv").to_str().unwrap(),
        );
    std::fs::write(&config, text_config).unwrap();
    let read = |name: &str| RecordFile::read_all(&records.join(name)).unwrap_or_default();

    let log = site.path("run.log");
    let child = start_run(&config, &log);
    let mut expected = Vec::new();
    for i in 0..3usize {
        let rel = format!("before/f-{i}.dat");
        site.upload(&rel, &data(10_000 + i, 1 + i as u32)).await;
        expected.push(rel);
    }
    wait_for("the first rows", Duration::from_secs(60), || {
        read("success.csv").len() == 3
    });
    wait_committed_to_end(&broker, &topic, &group);
    let (recorded_end, _) = committed_and_end(&broker, &topic, &group);

    // The record folder fills up. Rows of the next files are longer than a page, so none
    // fits in what is left of the last page of the file.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(records.join("filler")).unwrap();
        let block = vec![1u8; 4096];
        while filler.write_all(&block).is_ok() {}
    }
    let deep = [
        "d".repeat(250),
        "e".repeat(250),
        "f".repeat(250),
        "g".repeat(250),
    ]
    .join("/");
    for i in 0..3usize {
        let rel = format!("{deep}/after-{i}-{}.dat", "h".repeat(200));
        site.upload(&rel, &data(5_000 + i, 20 + i as u32)).await;
        expected.push(rel);
    }
    // The run stops by itself, saying why.
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "dcflow run went on consuming with records it cannot write:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{logged}");
    assert!(logged.contains("could not be recorded"), "{logged}");
    assert!(logged.contains("No space left on device"), "{logged}");
    let (committed, end) = committed_and_end(&broker, &topic, &group);
    assert!(end > recorded_end);
    assert_eq!(
        committed, recorded_end,
        "events whose outcome has no record were committed"
    );

    // Space comes back: the next run records every file (present already, or copied).
    disk.resize("64m");
    std::fs::remove_file(records.join("filler")).unwrap();
    let out = dcflow(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--until-caught-up",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows = read("success.csv");
    for rel in &expected {
        assert!(
            rows.iter().any(|r| r.billing_path.ends_with(rel.as_str())),
            "{rel} has no success row"
        );
    }
    wait_committed_to_end(&broker, &topic, &group);
}

/// The door goes away while copies run (the emulator halted): the log says so once, with the
/// cause ("Connection refused"), `/readyz` answers 503 after `outagegrace`, the status shows
/// the door's outage and last error; when it is back, the copies land and all of it clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_outage_is_told_once_and_readyz_follows_it() {
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("door-outage"), unique("group"));
    let mut site = Site::with_kafka(&broker, &topic).await;
    let mut expected = Vec::new();
    let mut door_paths = Vec::new();
    for i in 0..4usize {
        let rel = format!("door-outage/f-{i}.dat");
        let size = 1_500_000 + i;
        let door_path = site.upload(&rel, &data(size, 70 + i as u32)).await;
        site.sim.add_fault(
            &door_path,
            Fault::SlowLink {
                bytes_per_second: 500_000,
            },
            Some(1),
        );
        door_paths.push(door_path);
        expected.push((rel, size, 70 + i as u32));
    }
    site.sim.flush_billing();
    let address = free_address();
    let config = site.write_kafka_config(
        &kafka_keys(&topic, &broker, &group),
        "retryseconds = 1\nretrytimes = 30\nmaxdownloads = 2",
    );
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&format!(
        "\n[metrics]\naddress = \"{address}\"\noutagegrace = 2\n"
    ));
    std::fs::write(&config, text_cfg).unwrap();
    let log = site.path("run.log");
    let child = start_run(&config, &log);
    wait_for("a transfer under way", Duration::from_secs(60), || {
        door_paths.iter().any(|p| site.sim.faults_fired(p) > 0)
    });
    // Every transfer slot busy from the start (a backlog) is no reason to say "not ready".
    wait_for_logged(
        "ready with every slot busy",
        Duration::from_secs(30),
        &log,
        || {
            let (_, s) = http_get(&address, "/status.json");
            let busy = serde_json::from_str::<serde_json::Value>(&s)
                .is_ok_and(|s| s["active"].as_array().is_some_and(|a| a.len() == 2));
            busy && http_get(&address, "/readyz").0 == 200
        },
    );
    site.sim.halt();
    wait_for_logged(
        "/readyz 503 naming the door",
        Duration::from_secs(60),
        &log,
        || {
            let (code, body) = http_get(&address, "/readyz");
            code == 503 && body.contains("WebDAV door is unreachable")
        },
    );
    let (_, status) = http_get(&address, "/status.json");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let door = &status["upstreams"]["door"];
    assert_eq!(door["up"], false, "{status}");
    let error = door["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("Connection refused") || error.contains("connection reset"),
        "the cause, not only \"error sending request\": {error}"
    );
    let outage_warnings = std::fs::read_to_string(&log)
        .unwrap()
        .matches("WebDAV door is unreachable")
        .count();
    assert_eq!(outage_warnings, 1, "the outage is told once");

    site.sim.resume().await.expect("the emulator listens again");
    wait_for(
        "every file after the outage",
        Duration::from_secs(120),
        || site.records("success.csv").len() == expected.len(),
    );
    wait_for("ready again", Duration::from_secs(30), || {
        http_get(&address, "/readyz").0 == 200
    });
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("WebDAV door is reachable again after"),
        "{logged}"
    );
    assert_eq!(stop(child), 0);
    let t = tally(&site, &expected);
    assert_eq!((t.lost, t.corrupt, t.failed), (0, 0, 0), "{t:?}");
}
