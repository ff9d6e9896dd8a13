//! The fault matrix: every emulator fault, for one attempt (transient) and for ever
//! (persistent), under a workflow that runs every step kind after the copy (unpack, exec,
//! catalog, webhook, delete-source). A transient fault ends in a retried, verified copy and
//! every later step done once; a persistent one in a failure recorded at the copy step, with
//! nothing at a final path, no later step run and the source kept.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use crate::util::{files_below, text, Site};
use dcache_sim::Fault;

/// A tar archive of one small file, built by Python's tarfile.
fn archive(seed: u32) -> Vec<u8> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import io,sys,tarfile\nb=io.BytesIO()\nt=tarfile.open(fileobj=b,mode='w')\nd=(sys.argv[1]*5000).encode()\ni=tarfile.TarInfo('inner.txt'); i.size=len(d); t.addfile(i, io.BytesIO(d)); t.close()\nsys.stdout.buffer.write(b.getvalue())",
            &format!("seed{seed}-"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Counts webhook POSTs by path mentioned in their body.
fn webhook_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut s = stream.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(pos) = text.find("\r\n\r\n") {
                    let len: usize = text[..pos]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= pos + 4 + len {
                        break;
                    }
                }
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf).into_owned());
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_in_a_verified_workflow_or_a_recorded_failure_at_the_copy() {
    let site = Site::new().await;
    // (name, fault, does the transient form end in a copy?, does the persistent form?)
    // A redirect to http is refused at once: never retried, so never copied.
    let faults: Vec<(&str, Fault, bool, bool)> = vec![
        ("500", Fault::Status { code: 500 }, true, false),
        ("503", Fault::Status { code: 503 }, true, false),
        ("429", Fault::Status { code: 429 }, true, false),
        ("404", Fault::Status { code: 404 }, true, false),
        ("reset", Fault::Reset, true, false),
        ("hang", Fault::Hang, true, false),
        ("truncate", Fault::Truncate { at: 3_000 }, true, false),
        (
            "stall",
            Fault::Stall {
                at: 2_000,
                seconds: 4,
            },
            true,
            false,
        ),
        ("flip", Fault::FlipByte { at: 1_234 }, true, false),
        ("wrongdigest", Fault::WrongDigest, true, false),
        ("downgrade", Fault::RedirectHttp, false, false),
        (
            "slow",
            Fault::SlowLink {
                bytes_per_second: 40_000,
            },
            true,
            true,
        ),
    ];
    let mut expected = Vec::new();
    for (i, (name, fault, transient_ok, persistent_ok)) in faults.iter().enumerate() {
        for (form, times) in [("t", Some(1)), ("p", None)] {
            let rel = format!("m/{form}-{name}.tar");
            let body = archive(i as u32 * 2 + (form == "p") as u32);
            let door = site.upload(&rel, &body).await;
            site.sim.add_fault(&door, fault.clone(), times);
            let ok = if form == "t" {
                *transient_ok
            } else {
                *persistent_ok
            };
            expected.push((rel, door, body, ok));
        }
    }
    let calls = site.path("calls.txt");
    let db = site.path("catalog.sqlite");
    let (hook, posts) = webhook_server();
    let workflows = format!(
        r#"
[[workflow]]
name = "matrix"
attempts = 2
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "unpack"
[[workflow.step]]
type = "exec"
argv = ["/bin/sh", "-c", "echo \"$1\" >> \"$0\"", "{calls}", "{{name}}"]
[[workflow.step]]
type = "catalog"
database = "{db}"
[[workflow.step]]
type = "webhook"
url = "{hook}"
timeout = 5
[[workflow.step]]
type = "delete-source"
"#,
        calls = calls.display(),
        db = db.display(),
    );
    let config = site.write_workflow_config(
        "retryseconds = 0\nretrytimes = 3\nstalltimeout = 2\ntimeout = 30",
        &workflows,
    );
    let out = crate::util::dcflow(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        site.billing().to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "persistent faults fail: {}",
        text(&out.stderr)
    );

    let called = std::fs::read_to_string(&calls).unwrap_or_default();
    let posted = posts.lock().unwrap().clone();
    let rows = text(&crate::util::dcflow(&["catalog", "--database", db.to_str().unwrap()]).stdout);
    let failed = site.records("failed.csv");
    for (rel, door, body, ok) in &expected {
        let name = rel.rsplit('/').next().unwrap();
        let final_path = site.download().join(rel);
        let exec_calls = called.lines().filter(|l| *l == name).count();
        let hooks = posted.iter().filter(|p| p.contains(rel.as_str())).count();
        let in_catalog = rows.lines().filter(|l| l.contains(rel.as_str())).count();
        let failures: Vec<_> = failed
            .iter()
            .filter(|r| r.billing_path.ends_with(rel.as_str()))
            .collect();
        if *ok {
            let got = std::fs::read(&final_path).unwrap_or_else(|e| {
                panic!("{rel}: {e}; failures {failures:?}\n{}", text(&out.stderr))
            });
            assert_eq!(&got, body, "{rel}");
            assert!(
                site.download().join(format!("{rel}.d/inner.txt")).exists(),
                "{rel} unpacked"
            );
            assert_eq!(exec_calls, 1, "{rel}: exec once");
            assert_eq!(hooks, 1, "{rel}: webhook once");
            assert_eq!(in_catalog, 1, "{rel}: one catalog row");
            assert!(!site.sim.stored_file(door).exists(), "{rel}: source freed");
            assert!(failures.is_empty(), "{rel}: {failures:?}");
        } else {
            assert!(!final_path.exists(), "{rel}: nothing at the final path");
            assert!(!site.download().join(format!("{rel}.d")).exists(), "{rel}");
            assert_eq!(
                (exec_calls, hooks, in_catalog),
                (0, 0, 0),
                "{rel}: no later step"
            );
            assert!(site.sim.stored_file(door).exists(), "{rel}: source kept");
            assert_eq!(failures.len(), 1, "{rel}");
            assert!(
                failures[0]
                    .error
                    .starts_with("workflow matrix step 1 (copy): "),
                "{rel}: {}",
                failures[0].error
            );
        }
    }
    let leftovers: Vec<_> = files_below(&site.download())
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.contains(".dcflow-part") || n.contains(".dcflow-unpack")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
