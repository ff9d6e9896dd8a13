//! End to end: the real `dcflow` binary against the dCache emulator, as an operator runs it.

use crate::util::*;
use dcache_sim::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_copies_mixed_sizes_and_odd_names_byte_identical() {
    let site = Site::new().await;
    let files: Vec<(&str, usize)> = vec![
        ("empty.dat", 0),
        ("one-byte", 1),
        ("run 1/with space.fits", 1_048_583),
        ("run#2/hash%percent+plus?.root", 65_537),
        ("ünïcödé/名前.txt", 4_096),
        ("deep/a/b/c/d/e/f.bin", 33 << 20),
        ("big/frame-300MiB.raw", 300 << 20),
    ];
    let mut expected = Vec::new();
    for (i, (rel, size)) in files.iter().enumerate() {
        let body = data(*size, i as u32 + 1);
        site.upload(rel, &body).await;
        expected.push((*rel, body));
    }
    let config = site.write_config(&site.proxy_auth(), "");
    let out = site.replay(&config);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {stderr}",
        text(&out.stdout)
    );
    for (rel, body) in &expected {
        let got = std::fs::read(site.download().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(got == *body, "{rel} differs");
    }
    let success = site.records("success.csv");
    assert_eq!(
        success.len(),
        files.len(),
        "one success row per file (door and pool messages merged)"
    );
    assert!(success
        .iter()
        .all(|r| r.checksum.starts_with("adler32:") && r.error.is_empty()));
    assert!(site.records("failed.csv").is_empty());
    assert!(text(&out.stdout).contains(&format!(
        "{} files selected, {} copied",
        files.len(),
        files.len()
    )));
    for tag in [
        "UPLOAD",
        "COPY_INIT",
        "COPY_START",
        "COPY_OVER",
        "COPY_REPORT",
    ] {
        assert!(stderr.contains(tag), "log tag {tag} missing");
    }
    assert!(stderr.contains("pnfsid="), "structured pnfsid field");
    assert_eq!(
        files_below(&site.download()).len(),
        files.len(),
        "nothing else written"
    );

    // The same events again (a replay, a redelivery): nothing is copied twice.
    let pool_gets = site.sim.pool_gets();
    let again = site.replay(&config);
    assert_eq!(again.status.code(), Some(0));
    assert!(
        text(&again.stdout).contains(&format!("{} already present", files.len())),
        "{}",
        text(&again.stdout)
    );
    assert_eq!(site.sim.pool_gets(), pool_gets, "no byte downloaded again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_recorded_or_skipped_and_good_files_still_land() {
    let site = Site::new().await;
    let good = [
        ("good/one.dat", data(10_000, 7)),
        ("good/two.dat", data(20_000, 8)),
    ];
    for (rel, body) in &good {
        site.upload(rel, body).await;
    }
    // Corpus lines interleaved with the real billing messages, from stdin.
    let corpus = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/bad-input/billing-corpus.jsonl"
    ))
    .unwrap();
    let real = std::fs::read(site.billing()).unwrap();
    let mut input = corpus.clone();
    input.extend_from_slice(&real);
    input.extend_from_slice(&corpus);
    let config = site.write_config(&site.proxy_auth(), "");
    let out = dcflow_stdin(
        &["replay", "--config", config.to_str().unwrap(), "-"],
        Some(&input),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "traversal paths are failures: {}",
        text(&out.stderr)
    );
    for (rel, body) in &good {
        assert_eq!(
            &std::fs::read(site.download().join(rel)).unwrap(),
            body,
            "{rel}"
        );
    }
    let failed = site.records("failed.csv");
    let malformed = failed
        .iter()
        .filter(|r| r.error.starts_with("malformed billing message"))
        .count();
    // 12 malformed lines, twice, less two whole objects that name no path under the folder
    // (`{}` and `{"msgType":7}`): those are dismissed unparsed as unrelated traffic.
    assert_eq!(malformed, 20, "10 malformed lines, twice");
    let escapes = failed
        .iter()
        .filter(|r| r.error.contains("escapes the download folder"))
        .count();
    assert_eq!(
        escapes, 4,
        "4 traversal paths, each recorded once (the second pass finds them refused, as the \
         twin message of a failed upload does)"
    );
    assert_eq!(
        files_below(&site.download()).len(),
        2,
        "only the good files were written"
    );
    assert!(!site.dir.path().join("escape.dat").exists());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("2 copied") && stdout.contains("4 failed"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_always_fails_is_recorded_and_exits_1() {
    let site = Site::new().await;
    let door_path = site.upload("broken.dat", &data(5_000, 3)).await;
    site.upload("fine.dat", &data(6_000, 4)).await;
    site.sim
        .add_fault(&door_path, Fault::Status { code: 500 }, None);
    let config = site.write_config(
        &format!("token = \"{}\"", site.sim.token_file.display()),
        "",
    );
    let out = dcflow(&[
        "--log-format",
        "json",
        "replay",
        "--config",
        config.to_str().unwrap(),
        site.billing().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].attempts, 3);
    assert!(failed[0].error.contains("HTTP 500"), "{}", failed[0].error);
    assert!(failed[0].billing_path.ends_with("/broken.dat"));
    assert!(!site.download().join("broken.dat").exists());
    assert!(site.download().join("fine.dat").exists());
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .lines()
            .all(|l| l.trim().is_empty() || l.starts_with('{')),
        "JSON logs"
    );
    assert!(
        !stderr.contains(&site.sim.token),
        "the token never reaches the logs"
    );
    assert!(!text(&std::fs::read(site.path("failed.csv")).unwrap()).contains(&site.sim.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_summarises_or_lists_every_problem() {
    let site = Site::new().await;
    let config = site.write_config(&site.proxy_auth(), "");
    let out = dcflow(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    for needle in [
        "writes to:",
        "parallelism: 4 transfers",
        "X.509 proxy",
        "Jane Doe",
        "CA files",
        "/pnfs/example.org/data/lsst/user/j/jdoe/",
    ] {
        assert!(
            summary.contains(needle),
            "{needle:?} missing from\n{summary}"
        );
    }
    assert!(summary.lines().count() <= 24, "one screen");

    let bad = site.path("bad.toml");
    std::fs::write(
        &bad,
        "[dcache]\nurl = 'ftp://x'\nmaxdownloads = 0\nspeed = 3\n[local]\npermissions = 'abc'\n",
    )
    .unwrap();
    let out = dcflow(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for key in [
        "dcache.url",
        "dcache.pool",
        "dcache.maxdownloads",
        "dcache.speed: unknown key",
        "local.permissions",
        "local.downloadfolder",
    ] {
        assert!(err.contains(key), "{key} missing from\n{err}");
    }
    // Replay refuses a bad configuration with exit 2 too, and an expired proxy.
    let out = dcflow(&["replay", "--config", bad.to_str().unwrap(), "-"]);
    assert_eq!(out.status.code(), Some(2));
    let expired = site.write_config(
        &format!("proxy = \"{}\"", site.sim.pki.expired_proxy.display()),
        "",
    );
    let out = dcflow(&["check-config", "--config", expired.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("expired"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_directory_pointing_outside_is_refused() {
    let site = Site::new().await;
    site.upload("linked/secret.dat", &data(100, 5)).await;
    let outside = site.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(site.download()).unwrap();
    std::os::unix::fs::symlink(&outside, site.download().join("linked")).unwrap();
    let config = site.write_config(&site.proxy_auth(), "");
    let out = site.replay(&config);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        files_below(&outside).is_empty(),
        "nothing written through the symlink"
    );
    let failed = site.records("failed.csv");
    assert!(failed[0].error.contains("symlink"), "{}", failed[0].error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_from_the_failure_csv_reruns_only_the_failures() {
    let site = Site::new().await;
    let door_path = site.upload("r/flaky.dat", &data(7_000, 9)).await;
    site.upload("r/fine.dat", &data(8_000, 10)).await;
    site.sim
        .add_fault(&door_path, Fault::Status { code: 503 }, None);
    let config = site.write_config(&site.proxy_auth(), "");
    assert_eq!(site.replay(&config).status.code(), Some(1));
    assert!(!site.download().join("r/flaky.dat").exists());

    site.sim.clear_faults();
    let gets = site.sim.pool_gets();
    let failed = site.path("failed.csv");
    let out = dcflow(&[
        "retry",
        "--config",
        config.to_str().unwrap(),
        failed.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(site.download().join("r/flaky.dat")).unwrap(),
        data(7_000, 9)
    );
    assert_eq!(
        site.sim.pool_gets(),
        gets + 1,
        "only the failed file is fetched again"
    );
    assert!(
        text(&out.stdout).contains("1 files selected, 1 copied"),
        "{}",
        text(&out.stdout)
    );
}

/// A replay whose only line is malformed (text, then binary) writes a failure row and exits 1,
/// naming where the failures are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_only_line_is_malformed_exits_1_and_names_the_failure_file() {
    let site = Site::new().await;
    let config = site.write_config(&site.proxy_auth(), "");
    let failed = site.path("failed.csv");
    for (n, line) in [b"{not json".to_vec(), vec![0xff, 0x00, 0xfe, 0x01]]
        .into_iter()
        .enumerate()
    {
        let mut input = line;
        input.push(b'\n');
        let out = dcflow_stdin(
            &["replay", "--config", config.to_str().unwrap(), "-"],
            Some(&input),
        );
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let said = text(&out.stdout);
        assert!(
            said.contains(&format!("failures recorded in {}", failed.display())),
            "{said}"
        );
        assert_eq!(site.records("failed.csv").len(), n + 1);
    }
}

/// `dcflow retry` of the configured failure file moves its rows aside first: afterwards the
/// file holds what still fails, once, and the retried rows are kept beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_the_failure_file_leaves_in_it_only_what_still_fails() {
    let site = Site::new().await;
    let flaky = site.upload("m/flaky.dat", &data(7_000, 21)).await;
    let broken = site.upload("m/broken.dat", &data(7_500, 22)).await;
    site.sim
        .add_fault(&flaky, Fault::Status { code: 503 }, None);
    site.sim
        .add_fault(&broken, Fault::Status { code: 503 }, None);
    let config = site.write_config(&site.proxy_auth(), "");
    assert_eq!(site.replay(&config).status.code(), Some(1));
    assert_eq!(site.records("failed.csv").len(), 2);
    site.sim.clear_faults();
    site.sim
        .add_fault(&broken, Fault::Status { code: 503 }, None);
    let failed = site.path("failed.csv");
    let out = dcflow(&[
        "retry",
        "--config",
        config.to_str().unwrap(),
        failed.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let still: Vec<_> = site.records("failed.csv");
    assert_eq!(still.len(), 1, "{still:#?}");
    assert!(still[0].billing_path.ends_with("m/broken.dat"));
    let aside: Vec<_> = std::fs::read_dir(site.path(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("failed.csv.retried-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        dcflow_core::RecordFile::read_all(&aside[0]).unwrap().len(),
        2,
        "the retried rows are kept"
    );
    assert!(site.download().join("m/flaky.dat").exists());
}

/// `dcflow status --json | head`: a closed pipe ends the command quietly (no panic).
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    // A status endpoint that answers one large status.json.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = format!("{{\"filler\":\"{}\"}}", "x".repeat(4 << 20));
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let status = dir.path().join("status");
    let script = format!(
        "{bin} status --address {address} --json 2>{err} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}} >{status}",
        bin = env!("CARGO_BIN_EXE_dcflow"),
        err = err.display(),
        status = status.display(),
    );
    let ran = std::process::Command::new("bash")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(ran.success());
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let code: i32 = std::fs::read_to_string(&status)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Ended by SIGPIPE (128 + 13), as a Unix filter is; not 101 (a panic).
    assert!(code == 141 || code == 0, "exit status {code}: {stderr}");
}

#[test]
fn help_man_page_and_completions_cover_every_command() {
    let commands = [
        "run",
        "replay",
        "retry",
        "check-config",
        "dispatch",
        "catalog",
        "status",
        "completions",
        "man",
        "demo",
    ];
    let top = dcflow(&["--help"]);
    assert_eq!(top.status.code(), Some(0));
    for c in commands {
        assert!(text(&top.stdout).contains(c), "{c} missing from --help");
        let help = dcflow(&[c, "--help"]);
        assert_eq!(help.status.code(), Some(0), "{c} --help");
        assert!(text(&help.stdout).contains("Usage: dcflow"), "{c}");
    }
    let man = dcflow(&["man"]);
    assert_eq!(man.status.code(), Some(0));
    let man = text(&man.stdout);
    assert!(man.contains(".TH dcflow 1"));
    for c in commands {
        assert!(
            man.contains(&format!(".SH \"DCFLOW {}\"", c.to_uppercase())),
            "{c} has no section in the man page"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = dcflow(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        assert!(text(&out.stdout).contains("check-config"), "{shell}");
    }
    // Issue 17, item 8: the sections a man page has, and no pages that do not exist.
    for section in [
        ".SH \"EXIT STATUS\"",
        ".SH ENVIRONMENT",
        ".SH FILES",
        "DCFLOW_CONFIG",
    ] {
        assert!(man.contains(section), "{section} missing from the man page");
    }
    assert!(
        !man.contains("dcflow-run(1)"),
        "the man page names pages that do not exist"
    );
    let run = text(&dcflow(&["run", "--help"]).stdout);
    for said in [
        "-c, --config <FILE>",
        "DCFLOW_CONFIG",
        "/etc/dcflow/dcflow.toml",
        "[sse]",
        "[kafka]",
    ] {
        assert!(run.contains(said), "run --help does not say {said}:\n{run}");
    }
    let top = text(&top.stdout);
    assert!(
        top.contains("-v, --verbose") && top.contains("-q, --quiet"),
        "{top}"
    );
}

/// `-c` and `$DCFLOW_CONFIG` name the configuration as `--config` does; without any, the
/// default path is named in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_comes_from_c_or_dcflow_config_or_the_default_path() {
    let site = Site::new().await;
    let config = site.write_config(&site.proxy_auth(), "");
    let short = dcflow(&["check-config", "-c", config.to_str().unwrap()]);
    assert_eq!(short.status.code(), Some(0), "{}", text(&short.stderr));
    let from_env = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .arg("check-config")
        .env("DCFLOW_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(
        from_env.status.code(),
        Some(0),
        "{}",
        text(&from_env.stderr)
    );
    assert!(text(&from_env.stdout).contains(config.to_str().unwrap()));
    if !std::path::Path::new("/etc/dcflow/dcflow.toml").exists() {
        let none = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
            .arg("check-config")
            .env_remove("DCFLOW_CONFIG")
            .output()
            .unwrap();
        assert_eq!(none.status.code(), Some(2));
        assert!(
            text(&none.stderr).contains("/etc/dcflow/dcflow.toml"),
            "{}",
            text(&none.stderr)
        );
    }
    // -q leaves warnings and errors; -v adds debug lines (without DCFLOW_LOG, which wins).
    let replay = |flag: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"));
        c.args(flag)
            .args(["replay", "-c", config.to_str().unwrap(), "/dev/null"]);
        text(&c.env_remove("DCFLOW_LOG").output().unwrap().stderr)
    };
    let (usual, quiet, verbose) = (replay(None), replay(Some("-q")), replay(Some("-v")));
    assert!(usual.contains(" INFO "), "{usual}");
    assert!(!quiet.contains(" INFO "), "{quiet}");
    assert!(verbose.contains(" DEBUG "), "{verbose}");
}

/// The packaged unit passes `systemd-analyze verify` (where systemd is installed), pointed
/// at the binary just built.
#[test]
fn the_systemd_unit_verifies() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/systemd/dcflow.service"
    ))
    .unwrap()
    .replace("/usr/bin/dcflow", env!("CARGO_BIN_EXE_dcflow"))
    .replace("Documentation=man:dcflow(1) ", "Documentation=");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dcflow.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    let messages = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && !messages.contains("dcflow.service:"),
        "{messages}"
    );
}

/// The README's first command, small: the emulator, librdkafka's mock cluster and the
/// daemon's loop, in one process.
#[test]
fn demo_runs_the_whole_flow_on_the_mock_cluster() {
    let dir = tempfile::tempdir().unwrap();
    // As a user runs it: the demo's own log level (no DCFLOW_LOG).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args(["demo", "--files", "10", "--max-size-mib", "3", "--dir"])
        .arg(dir.path())
        .env_remove("DCFLOW_LOG")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("librdkafka mock cluster"), "{stdout}");
    assert!(stdout.contains("identical         10/10 files"), "{stdout}");
    assert!(stdout.contains("failed            0"), "{stdout}");
    assert!(stdout.contains("10/10 files done"), "{stdout}");
    // Issue 17, item 1: a successful demo printed a librdkafka ERROR at its end.
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("WARN"),
        "{stderr}"
    );
    let copied = files_below(&dir.path().join("download"));
    assert_eq!(copied.len(), 10, "{copied:?}");
    assert_eq!(
        dcflow_core::RecordFile::read_all(&dir.path().join("success.csv"))
            .unwrap()
            .len(),
        10
    );
}

/// Issue 14, item 9: folders created on the way to a file were never fsynced into their
/// parents, and "already present" reported success without the folder fsync that a crashed
/// predecessor may have skipped. Traced with strace: every folder dcflow creates is followed
/// by an fsync of its parent, and a second replay (nothing to copy) fsyncs the file's folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_folders_and_already_present_files_are_made_durable() {
    let site = Site::new().await;
    let body = data(20_000, 3);
    site.upload("deep/a/b/c.dat", &body).await;
    let config = site.write_config(&site.proxy_auth(), "");
    let billing = site.billing();
    let args = [
        "replay",
        "--config",
        config.to_str().unwrap(),
        billing.to_str().unwrap(),
    ];
    let trace = site.path("first.trace");
    let Some(out) = dcflow_traced(&args, &trace) else {
        return;
    };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let file = site.download().join("deep/a/b/c.dat");
    assert_eq!(std::fs::read(&file).unwrap(), body);
    let t = Trace::read(&trace);
    let below: Vec<_> = t
        .created
        .iter()
        .filter(|(_, d)| d.starts_with(site.download()))
        .collect();
    assert!(below.len() >= 4, "download, deep, a, b created: {below:?}");
    for (n, dir) in below {
        let parent = dir.parent().unwrap();
        assert!(
            t.fsynced_after(parent, *n),
            "{} created but {} never fsynced after it",
            dir.display(),
            parent.display()
        );
    }
    let trace = site.path("second.trace");
    let out = dcflow_traced(&args, &trace).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t = Trace::read(&trace);
    assert!(
        t.fsynced_after(file.parent().unwrap(), 0),
        "an already-present file's folder was not fsynced"
    );
    // Issue 19: a file found in place is verified without the cross-process lock file,
    // whose creation and removal made that folder fsync a journal commit per upload.
    let traced = std::fs::read_to_string(&trace).unwrap();
    let locking: Vec<&str> = traced
        .lines()
        .filter(|l| l.contains("dcflow-lock") && !l.contains("ENOENT"))
        .collect();
    assert!(locking.is_empty(), "the lock file was used: {locking:#?}");
}

/// Issue 14, item 6: in an upload-directory (SRM) flow the pool's message precedes the commit;
/// when its copy ran out of 404 retries, the file was marked failed and the later SRM
/// `putDone`, the message that names the committed file, was skipped as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_putdone_after_its_twin_ran_out_of_retries_still_copies_the_file() {
    let site = Site::new().await;
    let door = format!("{FOLDER}/srm/run042.root");
    site.sim
        .add_fault(&door, Fault::UploadDir { seconds: 1 }, None);
    let body = data(70_000, 8);
    site.upload("srm/run042.root", &body).await;
    wait_for(
        "the putDone message",
        std::time::Duration::from_secs(30),
        || {
            site.sim.flush_billing();
            std::fs::read_to_string(site.billing()).is_ok_and(|b| b.contains("putDone"))
        },
    );
    // Every attempt of the first message's copy (retrytimes = 3) finds nothing.
    site.sim
        .add_fault(&door, Fault::Status { code: 404 }, Some(3));
    let config = site.write_config(&site.proxy_auth(), "");
    let out = site.replay(&config);
    let stderr = text(&out.stderr);
    assert_eq!(
        std::fs::read(site.download().join("srm/run042.root"))
            .ok()
            .as_deref(),
        Some(body.as_slice()),
        "the putDone message did not get its copy:\n{stderr}"
    );
    assert_eq!(site.records("success.csv").len(), 1, "{stderr}");
    // The pool message's copy failed for real (after its retries): that stays on record.
    assert_eq!(site.records("failed.csv").len(), 1, "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

/// Issue 17, item 3: a billing path with a 5,000-byte name was retried as a network error
/// until the run timed out; a 10 MB path wrote 73 MB of log and a 31 MB CSV row that
/// Python's csv module could not read. Now both are refused at once, once each, with short
/// logs and rows that csv readers take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_paths_longer_than_a_file_system_takes_are_refused_at_once() {
    let site = Site::new().await;
    site.upload("long/a.dat", &data(1_000, 3)).await;
    site.upload("long/b.dat", &data(1_000, 4)).await;
    site.sim.flush_billing();
    let billing = std::fs::read_to_string(site.billing()).unwrap();
    let long_name = format!("long/{}.dat", "n".repeat(5_000));
    let huge = format!("long/{}f.dat", "x/".repeat(5_000_000));
    // Each upload's door and pool message, its name made too long (a) or its path (b).
    let mut input = String::new();
    for line in billing.lines() {
        input.push_str(
            &line
                .replace("long/a.dat", &long_name)
                .replace("long/b.dat", &huge),
        );
        input.push('\n');
    }
    let config = site.write_config(&site.proxy_auth(), "retryseconds = 1\nretrytimes = 5");
    let started = std::time::Instant::now();
    let out = dcflow_stdin(
        &["replay", "--config", config.to_str().unwrap(), "-"],
        Some(input.as_bytes()),
    );
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        out.stderr.len() < 64 * 1024,
        "{} bytes of log",
        out.stderr.len()
    );
    let failed = site.records("failed.csv");
    // One row per upload: its door and pool messages are one file.
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert!(
        failed.iter().all(|r| r.attempts == 0),
        "refused, not retried"
    );
    assert!(failed.iter().any(|r| r.error.contains("NAME_MAX")));
    assert!(failed.iter().any(|r| r.error.contains("PATH_MAX")));
    let csv = std::fs::read(site.path("failed.csv")).unwrap();
    assert!(csv.len() < 64 * 1024, "a {} byte failure file", csv.len());
    let python = std::process::Command::new("python3")
        .args([
            "-c",
            "import csv, sys; print(sum(1 for _ in csv.reader(open(sys.argv[1], newline=''))))",
        ])
        .arg(site.path("failed.csv"))
        .output()
        .expect("python3");
    assert_eq!(text(&python.stdout).trim(), "3", "{}", text(&python.stderr));
    assert!(site.records("success.csv").is_empty());
    eprintln!("refused in {secs:.1} s");
}

/// Issue 17, items 5 and 6: check-config said OK for runs that then failed, and its errors were
/// hard to locate. Each case here is refused with its key, all of them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_finds_what_would_stop_a_run_and_says_where() {
    let site = Site::new().await;
    let good = site.write_config(&site.proxy_auth(), "");
    let out = dcflow(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("metrics:     not served"),
        "{}",
        text(&out.stdout)
    );
    let good_text = std::fs::read_to_string(&good).unwrap();
    let check = |name: &str, text: &str| {
        let path = site.path(name);
        std::fs::write(&path, text).unwrap();
        let out = dcflow(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: {}",
            crate::util::text(&out.stdout)
        );
        crate::util::text(&out.stderr)
    };

    // A record folder that cannot be created (below a regular file): run would exit 2.
    let blocker = site.path("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let failed = site.path("failed.csv").display().to_string();
    let err = check(
        "records.toml",
        &good_text.replace(&failed, &format!("{}/sub/failed.csv", blocker.display())),
    );
    assert!(
        err.contains("local.failedtasksfile:") && err.contains("is not a folder"),
        "{err}"
    );

    // [sse] paths outside pool + folder; stalltimeout longer than timeout.
    let err = check(
        "sse.toml",
        &format!(
            "{}\n[sse]\nurl = \"{}\"\npaths = [\"/elsewhere\"]\n",
            good_text.replace("stalltimeout = 5", "stalltimeout = 900"),
            site.sim.door_url
        ),
    );
    assert!(
        err.contains("sse.paths[0]: /elsewhere is not under"),
        "{err}"
    );
    assert!(
        err.contains("dcache.stalltimeout: 900 s is longer than timeout"),
        "{err}"
    );

    // A proxy that others can read: grid tools refuse it, so does dcflow.
    let open = site.path("open-proxy.pem");
    std::fs::copy(&site.sim.pki.proxy, &open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = check(
        "open-proxy.toml",
        &good_text.replace(
            &site.sim.pki.proxy.display().to_string(),
            &open.display().to_string(),
        ),
    );
    assert!(err.contains("readable by others (mode 0644)"), "{err}");

    // A configuration problem and a credential problem, both listed; the CA folder's
    // problem names the key and the environment variable.
    let err = check(
        "both.toml",
        &good_text
            .replace("maxdownloads = 4", "maxdownload = 4")
            .replace(
                &site.sim.pki.capath.display().to_string(),
                "/nonexistent/certificates",
            ),
    );
    assert!(
        err.contains("dcache.maxdownload: unknown key (did you mean maxdownloads?)"),
        "{err}"
    );
    assert!(
        err.contains("credentials: CA folder /nonexistent/certificates (config key local.capath)")
            && err.contains("X509_CERT_DIR"),
        "{err}"
    );

    // Where a TOML syntax error is; workflows named by their name; [sse] in the hint.
    let err = check(
        "syntax.toml",
        "[dcache]\nurl = \"https://x\"\npool = /pnfs\n",
    );
    assert!(err.contains("line 3, column 8: not valid TOML"), "{err}");
    let err = check(
        "named.toml",
        &format!("{good_text}\n[[workflow]]\nname = \"nightly\"\n[[workflow.step]]\ntype = \"teleport\"\n[stream]\n"),
    );
    assert!(
        err.contains("workflow \"nightly\".step[0].type: unknown step"),
        "{err}"
    );
    assert!(
        err.contains("stream: unknown section (expected [kafka], [sse]"),
        "{err}"
    );
}

/// Issue 17, item 4: an unreachable door read only "request failed: error sending request".
/// The records, the log and check-config now carry the cause: the refused connection, the
/// name that does not resolve, the certificate that no CA of the folder signed (naming it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_their_cause_to_records_logs_and_check_config() {
    let site = Site::new().await;
    site.upload("cause/f.dat", &data(2_000, 9)).await;
    site.sim.flush_billing();
    let good = site.write_config(&site.proxy_auth(), "retrytimes = 1");
    let good_text = std::fs::read_to_string(&good).unwrap();
    let door = site.sim.door_url.to_string();
    let door = door.trim_end_matches('/');
    for (name, url, cause) in [
        ("refused", "https://127.0.0.1:1", "Connection refused"),
        ("dns", "https://no-such-host.invalid:2880", "dns error"),
    ] {
        let config = site.path(&format!("{name}.toml"));
        std::fs::write(&config, good_text.replace(door, url)).unwrap();
        let _ = std::fs::remove_file(site.path("failed.csv"));
        let out = site.replay(&config);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let failed = site.records("failed.csv");
        assert!(
            !failed.is_empty() && failed.iter().all(|r| r.error.contains(cause)),
            "{name}: {failed:#?}"
        );
        assert!(text(&out.stderr).contains(cause), "{name}: the log");
        let check = dcflow(&["check-config", "-c", config.to_str().unwrap()]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{name}: a door down is not a bad configuration"
        );
        let said = text(&check.stdout);
        assert!(
            said.contains("door:        cannot be reached now:") && said.contains(cause),
            "{name}: {said}"
        );
    }
    let check = dcflow(&["check-config", "-c", good.to_str().unwrap()]);
    assert!(
        text(&check.stdout).contains("answers (HTTP 200) to these credentials"),
        "{}",
        text(&check.stdout)
    );
    // Another CA's folder: the door's certificate is not trusted; the folder is named.
    let other = Site::new().await;
    let untrusted = site.path("untrusted.toml");
    std::fs::write(
        &untrusted,
        good_text.replace(
            &site.sim.pki.capath.display().to_string(),
            &other.sim.pki.capath.display().to_string(),
        ),
    )
    .unwrap();
    let check = dcflow(&["check-config", "-c", untrusted.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(2));
    let err = text(&check.stderr);
    assert!(
        err.contains("not trusted") && err.contains(&other.sim.pki.capath.display().to_string()),
        "{err}"
    );
}
