//! `dcflow sync`: what the emulator's door holds already, through the same workflows as
//! events; its dry run; `--since`; `--then-follow` during a burst of uploads (real broker).

use std::time::{Duration, Instant};

use crate::util::*;
use dcache_sim::Fault;

fn files(n: usize, tag: u32) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let rel = match i % 3 {
                0 => format!("s/run-{}/f {i}.dat", i % 4),
                1 => format!("s/ünï-{i}.fits"),
                _ => format!("s/deep/er/f-{i}.raw"),
            };
            (rel, data(1_000 + i * 997, tag + i as u32))
        })
        .collect()
}

fn landed(site: &Site, files: &[(String, Vec<u8>)]) -> usize {
    files
        .iter()
        .filter(|(rel, body)| std::fs::read(site.download().join(rel)).is_ok_and(|b| &b == body))
        .count()
}

/// Twelve files: three already at the destination, one there with other bytes of the same
/// size, one there with another size. The dry run writes nothing and says what a sync would
/// copy (by size); the sync copies what is missing or different, verified; a second sync
/// copies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_copies_what_the_destination_lacks_and_a_dry_run_writes_nothing() {
    let site = Site::new().await;
    let all = files(12, 100);
    for (rel, body) in &all {
        site.upload(rel, body).await;
    }
    let put = |rel: &str, body: &[u8]| {
        let p = site.download().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    for (rel, body) in &all[..3] {
        put(rel, body);
    }
    let mut other = all[3].1.clone();
    other[0] ^= 0xff;
    put(&all[3].0, &other);
    put(&all[4].0, b"short");
    let before = files_below(&site.download());
    let config = site.write_config(&site.proxy_auth(), "");

    let dry = dcflow(&["sync", "--dry-run", "-c", config.to_str().unwrap()]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry.stderr));
    let said = text(&dry.stdout);
    assert_eq!(said.matches("would copy ").count(), 8, "{said}");
    assert!(
        said.contains("12 files")
            && said.contains("4 already present")
            && said.contains("8 would be copied"),
        "{said}"
    );
    assert_eq!(
        files_below(&site.download()),
        before,
        "the dry run wrote nothing"
    );
    assert!(!site.path("success.csv").exists() && !site.path("failed.csv").exists());
    assert_eq!(site.sim.pool_gets(), 0);

    let out = dcflow(&["sync", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(landed(&site, &all), 12);
    assert_eq!(
        site.sim.pool_gets(),
        9,
        "the missing, the different and the short"
    );
    assert_eq!(site.records("success.csv").len(), 12);

    let again = dcflow(&["sync", "-c", config.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert_eq!(site.sim.pool_gets(), 9, "nothing copied twice");
    assert!(
        text(&again.stdout).contains("12 already present"),
        "{}",
        text(&again.stdout)
    );
}

/// `--since` leaves out what was modified before the date; a failure to fetch exits 1 with
/// its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_since_a_date_and_a_failed_file_exits_1() {
    let site = Site::new().await;
    let all = files(6, 200);
    let mut door_paths = Vec::new();
    for (rel, body) in &all {
        door_paths.push(site.upload(rel, body).await);
    }
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    for p in &door_paths[..2] {
        let f = std::fs::File::options()
            .write(true)
            .open(site.sim.stored_file(p))
            .unwrap();
        f.set_modified(old).unwrap();
    }
    site.sim
        .add_fault(&door_paths[5], Fault::Status { code: 403 }, None);
    let config = site.write_config(&site.proxy_auth(), "");
    let out = dcflow(&[
        "sync",
        "--since",
        "2024-01-01",
        "-c",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(landed(&site, &all[2..5]), 3);
    assert_eq!(landed(&site, &all[..2]), 0, "older than --since");
    assert_eq!(site.records("failed.csv").len(), 1);
    assert!(text(&out.stdout).contains("failures recorded in"));
}

/// `--then-follow` pins the new group at the topic's end, walks, then follows: files uploaded
/// while it walks are copied once each (listed, announced, or both, and merged), none missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_then_follow_during_a_burst_handles_every_file_once() {
    let Some(broker) = broker() else { return };
    let topic = unique("sync-follow");
    let site = Site::with_kafka(&broker, &topic).await;
    let before = files(15, 300);
    for (rel, body) in &before {
        let p = site.upload(rel, body).await;
        // Slow enough that the walk's copies are still going while more files arrive.
        site.sim.add_fault(
            &p,
            Fault::SlowLink {
                bytes_per_second: 20_000,
            },
            Some(1),
        );
    }
    site.sim.flush_billing();
    let group = unique("g");
    let config = site.write_kafka_config(&kafka_keys(&topic, &broker, &group), "maxdownloads = 4");
    let log = site.path("follow.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(["sync", "--then-follow", "-c", config.to_str().unwrap()])
        .env("DCFLOW_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // During the walk and its copies: a burst of new uploads (announced on the topic).
    let during: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("s/burst/b-{i}.dat"),
                data(2_000 + i, 400 + i as u32),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("consumer group pinned")) {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (rel, body) in &during {
        site.upload(rel, body).await;
        site.sim.flush_billing();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = before.len() + during.len();
    wait_for_logged("every file", Duration::from_secs(180), &log, || {
        landed(&site, &before) + landed(&site, &during) == total
    });
    wait_committed_to_end(&broker, &topic, &group);
    assert_eq!(stop(child), 0);
    assert_eq!(
        site.sim.pool_gets() as usize,
        total,
        "each file copied once"
    );
    assert!(site.records("failed.csv").is_empty());
}

/// `--then-follow` with the SSE source: the channel is subscribed, the tree listed, then its
/// events followed; what was there and what comes after each land once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_then_follow_with_sse_lists_then_follows() {
    let site = Site::new().await;
    let before = files(9, 500);
    for (rel, body) in &before {
        site.upload(rel, body).await;
    }
    let config = site.write_config(&site.proxy_auth(), "");
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&format!("\n[sse]\nurl = \"{}\"\n", site.sim.door_url));
    std::fs::write(&config, text_cfg).unwrap();
    let log = site.path("follow.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(["sync", "--then-follow", "-c", config.to_str().unwrap()])
        .env("DCFLOW_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_logged("the listed files", Duration::from_secs(60), &log, || {
        landed(&site, &before) == before.len()
    });
    wait_for_logged("the stream", Duration::from_secs(30), &log, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("event stream open"))
    });
    let after: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("s/after-{i}.dat"), data(3_000 + i, 600 + i as u32)))
        .collect();
    for (rel, body) in &after {
        site.upload(rel, body).await;
    }
    wait_for_logged("the new files", Duration::from_secs(60), &log, || {
        landed(&site, &after) == after.len()
    });
    assert_eq!(stop(child), 0);
    assert_eq!(site.sim.pool_gets() as usize, before.len() + after.len());
}

/// One folder of 100,000 entries, listed in a single PROPFIND: the dry run's peak memory is
/// about that of a folder of 1,000 (the listing is parsed as it arrives and nothing is kept
/// per file; the answer is about 60 MB of XML). The emulator, like dCache, is silent for
/// seconds while it builds the answer: longer than the test's `stalltimeout` of 5 s, which
/// is not a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_of_100_000_entries_keeps_memory_flat() {
    let mut peaks = Vec::new();
    for count in [1_000, 100_000] {
        let site = Site::new().await;
        for i in 0..count {
            site.sim
                .preload(&format!("{FOLDER}/f{i:06}.dat"), b"x")
                .unwrap();
        }
        let config = site.write_config(&site.proxy_auth(), "timeout = 600");
        let log = site.path("sync.log");
        let (code, kib) =
            dcflow_peak_rss(&["sync", "--dry-run", "-c", config.to_str().unwrap()], &log);
        let logged = std::fs::read_to_string(&log).unwrap();
        let end = logged.len().saturating_sub(3000);
        assert_eq!(
            code,
            0,
            "{count} entries: {}",
            &logged[logged.ceil_char_boundary(end)..]
        );
        peaks.push(kib);
    }
    eprintln!(
        "peak RSS of the dry run: 1,000 entries {} KiB, 100,000 entries {} KiB",
        peaks[0], peaks[1]
    );
    assert!(
        peaks[1] < peaks[0] + 16 * 1024,
        "100,000 entries took {} KiB at peak, 1,000 took {} KiB",
        peaks[1],
        peaks[0]
    );
}
