//! Against a real dCache 12.0.1 (`scripts/dcache.sh`) and the real broker it publishes its
//! billing messages to: uploads through the redirecting HTTPS door, then the real `dcflow`
//! binary as a site runs it. Without the instance these tests say SKIPPED (under CI, fail).
//!
//! The door's root is the namespace root, so every configuration here says `pool = "/"`, and
//! each test works in a folder of its own below `/public` (writable by all on this instance).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Writes `data` to a file and uploads it to `path`.
fn put(dcache: &RealDcache, dir: &Path, path: &str, body: &[u8]) {
    let file = dir.join("upload.bin");
    std::fs::write(&file, body).unwrap();
    dcache.upload(path, &file);
}

fn landed(download: &Path, rel: &str, body: &[u8]) -> bool {
    std::fs::read(download.join(rel)).is_ok_and(|b| b == body)
}

/// The billing topic: door `request` and pool `transfer` of each upload, published by dCache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_copies_every_upload_of_the_real_door_with_a_client_certificate() {
    let (Some(broker), Some(dcache)) = (broker(), real_dcache()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = format!("/public/{}", unique("run"));
    let files: Vec<(String, Vec<u8>)> = [
        ("empty.dat", 0usize),
        ("one-byte", 1),
        ("with space/ünïcödé 名前.bin", 65_537),
        ("new/nested/dirs/c.dat", (1 << 20) + 7),
        ("big/frame-100MiB.raw", 100 << 20),
    ]
    .iter()
    .enumerate()
    .map(|(i, (rel, size))| (rel.to_string(), data(*size, 300 + i as u32)))
    .collect();
    let group = unique("real-run");
    let auth = format!("proxy = \"{}\"", dcache.cert_and_key(dir.path()).display());
    let config = dcache.config(
        dir.path(),
        &folder,
        &auth,
        Some(&kafka_keys(&dcache.topic, &broker, &group)),
        "",
    );
    let log = dir.path().join("run.log");
    let child = start_run(&config, &log);
    for (rel, body) in &files {
        put(&dcache, dir.path(), &format!("{folder}/{rel}"), body);
    }
    let download = dir.path().join("download");
    wait_for("every file to land", Duration::from_secs(300), || {
        files.iter().all(|(rel, body)| landed(&download, rel, body))
    });
    wait_for("one success row per file", Duration::from_secs(60), || {
        RecordFile::read_all(&dir.path().join("success.csv")).is_ok_and(|r| r.len() >= files.len())
    });
    wait_committed_to_end(&broker, &dcache.topic, &group);
    assert_eq!(
        stop(child),
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let rows = RecordFile::read_all(&dir.path().join("success.csv")).unwrap();
    assert_eq!(
        rows.len(),
        files.len(),
        "door and pool messages merged: {rows:#?}"
    );
    for (rel, _) in &files {
        let path = format!("{folder}/{rel}");
        assert_eq!(
            rows.iter().filter(|r| r.billing_path == path).count(),
            1,
            "{path}"
        );
    }
    assert!(
        rows.iter().all(|r| r.checksum.starts_with("adler32:")),
        "{rows:#?}"
    );
    let stray: Vec<_> = files_below(&download)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".dcflow-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert!(!RecordFile::read_all(&dir.path().join("failed.csv")).is_ok_and(|r| !r.is_empty()));
}

/// `dcflow replay` of the billing messages the real instance published, with a macaroon that
/// dCache issued, then with an RFC 3820 proxy made from the instance's user certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_real_billing_messages_with_a_macaroon_and_with_a_proxy() {
    let (Some(broker), Some(dcache)) = (broker(), real_dcache()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = format!("/public/{}", unique("replay"));
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("r{i}/f {i}.dat"),
                data(20_000 + i * 999, 400 + i as u32),
            )
        })
        .collect();
    for (rel, body) in &files {
        put(&dcache, dir.path(), &format!("{folder}/{rel}"), body);
    }
    let events = dir.path().join("events.jsonl");
    wait_for("dCache's billing messages", Duration::from_secs(60), || {
        let msgs = topic_messages(&broker, &dcache.topic, &folder);
        let uploads = msgs
            .iter()
            .filter(|m| String::from_utf8_lossy(m).contains("\"isWrite\":\"write\""))
            .count();
        let mut jsonl = Vec::new();
        for m in &msgs {
            jsonl.extend_from_slice(m);
            jsonl.push(b'\n');
        }
        std::fs::write(&events, jsonl).unwrap();
        uploads >= 2 * files.len()
    });
    let download = dir.path().join("download");
    let token = dir.path().join("macaroon");
    std::fs::write(&token, dcache.macaroon(&folder, "DOWNLOAD,LIST")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    for auth in [
        format!("token = \"{}\"", token.display()),
        format!("proxy = \"{}\"", dcache.proxy(dir.path()).display()),
    ] {
        let _ = std::fs::remove_dir_all(&download);
        let _ = std::fs::remove_file(dir.path().join("success.csv"));
        let config = dcache.config(dir.path(), &folder, &auth, None, "");
        let out = dcflow(&[
            "replay",
            "--config",
            config.to_str().unwrap(),
            events.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{auth}: {}", text(&out.stderr));
        for (rel, body) in &files {
            assert!(landed(&download, rel, body), "{auth}: {rel}");
        }
        assert_eq!(
            RecordFile::read_all(&dir.path().join("success.csv"))
                .unwrap()
                .len(),
            files.len(),
            "{auth}"
        );
        let log = text(&out.stderr);
        let secret = std::fs::read_to_string(&token).unwrap();
        assert!(!log.contains(secret.trim()), "the macaroon is in the log");
    }
}

/// `delete-source` against the real door, and the `remove` messages dCache then publishes
/// going through a remove workflow, once per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_source_frees_the_real_pool_and_its_removes_run_their_workflow() {
    let (Some(broker), Some(dcache)) = (broker(), real_dcache()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = format!("/public/{}", unique("free"));
    let removed = dir.path().join("removed.txt");
    let workflows = format!(
        r#"
[[workflow]]
name = "campaign"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "delete-source"

[[workflow]]
name = "forget"
[workflow.match]
kinds = ["remove"]
[[workflow.step]]
type = "exec"
argv = ["/bin/sh", "-c", "echo \"$1\" >> \"$0\"", "{removed}", "{{path}}"]
"#,
        removed = removed.display()
    );
    let group = unique("real-free");
    let auth = format!("proxy = \"{}\"", dcache.cert_and_key(dir.path()).display());
    let config = dcache.config(
        dir.path(),
        &folder,
        &auth,
        Some(&kafka_keys(&dcache.topic, &broker, &group)),
        &workflows,
    );
    let log = dir.path().join("run.log");
    let child = start_run(&config, &log);
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("d/f{i}.dat"), data(30_000 + i, 500 + i as u32)))
        .collect();
    for (rel, body) in &files {
        put(&dcache, dir.path(), &format!("{folder}/{rel}"), body);
    }
    let download = dir.path().join("download");
    wait_for(
        "copies, deletions and remove workflows",
        Duration::from_secs(180),
        || {
            let lines = std::fs::read_to_string(&removed).unwrap_or_default();
            files.iter().all(|(rel, body)| {
                let path = format!("{folder}/{rel}");
                landed(&download, rel, body) && lines.lines().any(|l| l == path)
            })
        },
    );
    for (rel, _) in &files {
        assert!(
            !dcache.exists(&format!("{folder}/{rel}")),
            "{rel} is still in dCache"
        );
    }
    wait_committed_to_end(&broker, &dcache.topic, &group);
    assert_eq!(
        stop(child),
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let lines = std::fs::read_to_string(&removed).unwrap();
    for (rel, _) in &files {
        let path = format!("{folder}/{rel}");
        assert_eq!(
            lines.lines().filter(|l| *l == path).count(),
            1,
            "{path}: {lines}"
        );
    }
}

/// The SSE source against the real frontend: a channel, inotify subscriptions (a directory
/// created during the run included), files copied as they are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_follows_the_real_frontend_into_new_directories() {
    let (Some(_broker), Some(dcache)) = (broker(), real_dcache()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = format!("/public/{}", unique("sse"));
    // dCache watches existing directories: the folder exists before dcflow starts.
    put(
        &dcache,
        dir.path(),
        &format!("{folder}/before.dat"),
        b"already there",
    );
    let token = dir.path().join("macaroon");
    std::fs::write(
        &token,
        dcache.macaroon(&folder, "DOWNLOAD,LIST,READ_METADATA"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let auth = format!("token = \"{}\"", token.display());
    let sse = format!("[sse]\nurl = \"{}\"\n", dcache.frontend);
    let config = dcache.config(dir.path(), &folder, &auth, None, &sse);
    let log = dir.path().join("run.log");
    let child = start_run(&config, &log);
    wait_for("the event stream", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("event stream open")
    });
    let download = dir.path().join("download");
    // The file that was there before the run: found by the first resynchronisation.
    wait_for("the file from before", Duration::from_secs(60), || {
        landed(&download, "before.dat", b"already there")
    });
    let files: Vec<(String, Vec<u8>)> = vec![
        ("a.dat".into(), data(40_000, 600)),
        ("newdir/b.dat".into(), data(50_000, 601)),
        ("newdir/deeper/c.dat".into(), data(60_000, 602)),
    ];
    for (rel, body) in &files {
        put(&dcache, dir.path(), &format!("{folder}/{rel}"), body);
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_for("the new files", Duration::from_secs(120), || {
        files.iter().all(|(rel, body)| landed(&download, rel, body))
    });
    assert_eq!(
        stop(child),
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let rows = RecordFile::read_all(&dir.path().join("success.csv")).unwrap();
    assert_eq!(rows.len(), files.len() + 1, "{rows:#?}");
    // dCache's own pnfsid (from the door's ETag), not a stand-in.
    for (rel, _) in &files {
        let path = format!("{folder}/{rel}");
        let row = rows.iter().find(|r| r.billing_path == path).expect("a row");
        assert_eq!(row.pnfsid, dcache.pnfsid(&path), "{path}");
    }
}
