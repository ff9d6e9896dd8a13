//! `[[workflow]]` end to end: the emulator, the real binary, real programs for `exec` and a
//! real HTTP server (a plain socket) for `webhook`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::{data, files_below, text, Site};
use dcache_sim::Fault;

fn with_workflows(site: &Site, extra_dcache: &str, workflows: &str) -> std::path::PathBuf {
    let path = site.write_config(&site.proxy_auth(), extra_dcache);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(workflows);
    std::fs::write(&path, text).unwrap();
    path
}

fn replay(config: &std::path::Path, events: &std::path::Path) -> std::process::Output {
    common::dcflow(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        events.to_str().unwrap(),
    ])
}

/// The billing messages announced so far, kept aside: deletions add their own messages.
fn snapshot(site: &Site, name: &str) -> std::path::PathBuf {
    let copy = site.path(name);
    std::fs::copy(site.billing(), &copy).unwrap();
    copy
}

const CAMPAIGN: &str = r#"
[[workflow]]
name = "campaign"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "delete-source"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_copies_then_frees_the_pool_and_a_redelivery_changes_nothing() {
    let site = Site::new().await;
    let files = [
        ("run1/a.dat", data(300_000, 1)),
        ("run1/b.dat", data(70_000, 2)),
    ];
    let mut door_paths = Vec::new();
    for (rel, body) in &files {
        door_paths.push(site.upload(rel, body).await);
    }
    let events = snapshot(&site, "events.jsonl");
    let config = with_workflows(&site, "", CAMPAIGN);
    let out = replay(&config, &events);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for ((rel, body), door_path) in files.iter().zip(&door_paths) {
        assert_eq!(&std::fs::read(site.download().join(rel)).unwrap(), body);
        assert!(
            !site.sim.stored_file(door_path).exists(),
            "{rel} still on the pool"
        );
    }
    let log = text(&out.stderr);
    assert!(log.contains("DELETE_SOURCE"), "{log}");
    assert!(log.contains("WORKFLOW_DONE campaign"), "{log}");

    // The same events again (a replay, a rebalance): the files stay, nothing fails.
    let again = replay(&config, &events);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("source already deleted by this workflow"),
        "{}",
        text(&again.stderr)
    );
    for (rel, body) in &files {
        assert_eq!(&std::fs::read(site.download().join(rel)).unwrap(), body);
    }
    assert!(site.records("failed.csv").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_source_never_deletes_a_file_whose_copy_was_not_verified() {
    let site = Site::new().await;
    let flipped = site.upload("bad/flipped.dat", &data(200_000, 3)).await;
    let lying = site.upload("bad/lying.dat", &data(50_000, 4)).await;
    site.sim
        .add_fault(&flipped, Fault::FlipByte { at: 1_000 }, None);
    site.sim.add_fault(&lying, Fault::WrongDigest, None);
    let events = snapshot(&site, "events.jsonl");
    let config = with_workflows(&site, "retrytimes = 2", CAMPAIGN);
    let out = replay(&config, &events);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    for door_path in [&flipped, &lying] {
        assert!(
            site.sim.stored_file(door_path).exists(),
            "{door_path} was deleted without a verified copy"
        );
    }
    assert!(
        files_below(&site.download()).is_empty(),
        "nothing at a final path: {:?}",
        files_below(&site.download())
    );
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 2, "{failed:?}");
    for r in &failed {
        assert!(
            r.error.starts_with("workflow campaign step 1 (copy): "),
            "{}",
            r.error
        );
    }
}

/// A program that appends its arguments, as one JSON array per call, to the file named first.
fn argv_recorder(site: &Site) -> (std::path::PathBuf, std::path::PathBuf) {
    let script = site.path("record-argv.py");
    std::fs::write(
        &script,
        "import json, sys\nwith open(sys.argv[1], 'a') as f:\n    f.write(json.dumps(sys.argv[2:]) + '\\n')\n",
    )
    .unwrap();
    (script, site.path("calls.jsonl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gets_hostile_file_names_as_plain_arguments() {
    let site = Site::new().await;
    let name = "x $(touch PWNED) `touch PWNED2`; rm -rf ~ & 'q\".dat";
    let body = data(10_000, 5);
    site.upload(&format!("in/{name}"), &body).await;
    let (script, calls) = argv_recorder(&site);
    let workflows = format!(
        r#"
[[workflow]]
name = "batch"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "exec"
argv = ["python3", "{script}", "{calls}", "{{name}}", "{{local_path}}", "{{pnfsid}}", "{{checksum}}", "{{workflow}}"]
env = {{ DCFLOW_FILE = "{{name}}" }}
"#,
        script = script.display(),
        calls = calls.display(),
    );
    let config = with_workflows(&site, "", &workflows);
    let out = common::dcflow(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        site.billing().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let local = site.download().join("in").join(name);
    assert_eq!(std::fs::read(&local).unwrap(), body);
    let recorded = std::fs::read_to_string(&calls).unwrap();
    let mut lines = recorded.lines();
    let args: Vec<String> = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(args[0], name, "one argument, exactly the name");
    assert_eq!(args[1], local.display().to_string());
    assert_eq!(args[2].len(), 36, "pnfsid {:?}", args[2]);
    assert!(args[3].starts_with("adler32:"), "checksum {:?}", args[3]);
    assert_eq!(args[4], "batch");
    assert_eq!(lines.next(), None, "the door and pool messages ran it once");
    for dir in [site.dir.path(), std::path::Path::new(".")] {
        assert!(!dir.join("PWNED").exists() && !dir.join("PWNED2").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_statuses_map_to_success_retry_and_failure_and_a_hung_program_is_killed() {
    let site = Site::new().await;
    for name in ["ok.dat", "later.dat", "broken.dat", "hangs.dat"] {
        site.upload(&format!("x/{name}"), &data(4_000, 6)).await;
    }
    let (script, calls) = argv_recorder(&site);
    // Exits 0, 75 (EX_TEMPFAIL: retried) or 3 (a failure) depending on the file; sleeps for
    // the last one.
    let program = site.path("status.sh");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\npython3 {} {} \"$1\"\ncase \"$1\" in\n  later.dat) exit 75;;\n  broken.dat) exit 3;;\n  hangs.dat) exec sleep 60;;\nesac\nexit 0\n",
            script.display(),
            calls.display()
        ),
    )
    .unwrap();
    let workflows = format!(
        r#"
[[workflow]]
name = "jobs"
attempts = 3
[[workflow.step]]
type = "exec"
argv = ["/bin/sh", "{program}", "{{name}}"]
timeout = 1
"#,
        program = program.display()
    );
    let config = with_workflows(&site, "", &workflows);
    let out = common::dcflow(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        site.billing().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let recorded = std::fs::read_to_string(&calls).unwrap();
    let count = |name: &str| {
        recorded
            .lines()
            .filter(|l| l.contains(&format!("\"{name}\"")))
            .count()
    };
    assert_eq!(count("ok.dat"), 1);
    assert_eq!(count("later.dat"), 3, "75 is retried up to the attempts");
    assert_eq!(count("broken.dat"), 1, "3 is a failure, not retried");
    assert_eq!(count("hangs.dat"), 3, "a timeout is retried");
    let failed = site.records("failed.csv");
    let error_of = |name: &str| {
        failed
            .iter()
            .find(|r| r.billing_path.ends_with(name))
            .map(|r| r.error.clone())
            .unwrap_or_default()
    };
    assert!(error_of("later.dat").contains("exited with 75"));
    assert!(error_of("broken.dat").starts_with("workflow jobs step 1 (exec): "));
    assert!(error_of("hangs.dat").contains("killed"), "{failed:?}");
    assert!(error_of("ok.dat").is_empty());
    assert!(
        files_below(&site.download()).is_empty(),
        "no copy step, no copy"
    );
}

/// A one-thread HTTP/1.1 server: records each request's head and body, answers 200, or never
/// answers when `hang`.
fn http_server(hang: bool) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let mut s = stream.unwrap();
            if hang {
                held.push(s);
                continue;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, length) = loop {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break (0, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    break (pos + 4, length);
                }
            };
            while buf.len() < head_end + length {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf).into_owned());
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_posts_a_cloudevent_with_a_stable_idempotency_key_and_a_hung_endpoint_fails() {
    let site = Site::new().await;
    let body = data(20_000, 7);
    site.upload("faas/in.dat", &body).await;
    let (url, requests) = http_server(false);
    let (hung_url, _) = http_server(true);
    let token = site.path("hook.token");
    std::fs::write(&token, "s3cr3t-hook-token\n").unwrap();
    let workflows = format!(
        r#"
[[workflow]]
name = "faas"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "webhook"
url = "{url}"
format = "cloudevent"
headers = {{ X-Dcflow-Workflow = "{{workflow}}" }}
tokenfile = "{token}"

[[workflow]]
name = "slow"
attempts = 2
[[workflow.step]]
type = "webhook"
url = "{hung_url}"
timeout = 1
"#,
        token = token.display()
    );
    let config = with_workflows(&site, "", &workflows);
    let events = snapshot(&site, "events.jsonl");
    let first = replay(&config, &events);
    assert_eq!(first.status.code(), Some(1), "{}", text(&first.stderr));
    let second = replay(&config, &events);
    assert_eq!(second.status.code(), Some(1));
    assert_eq!(
        std::fs::read(site.download().join("faas/in.dat")).unwrap(),
        body
    );

    let got = requests.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "one call per delivery: {got:#?}");
    let key = |req: &str| {
        req.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("idempotency-key:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap()
    };
    assert_eq!(key(&got[0]), key(&got[1]), "the same key for a redelivery");
    let req = &got[0];
    assert!(req
        .to_ascii_lowercase()
        .contains("content-type: application/cloudevents+json"));
    assert!(req.to_ascii_lowercase().contains("x-dcflow-workflow: faas"));
    assert!(req.contains("Bearer s3cr3t-hook-token"));
    let json_start = req.find("\r\n\r\n").unwrap() + 4;
    let event: serde_json::Value = serde_json::from_str(&req[json_start..]).unwrap();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "org.dcache.upload");
    assert!(event["data"]["context"]["local_path"]
        .as_str()
        .unwrap()
        .ends_with("faas/in.dat"));
    assert_eq!(event["data"]["event"]["msgType"].as_str().is_some(), true);

    let failed = site.records("failed.csv");
    assert_eq!(
        failed.len(),
        2,
        "the hung endpoint, once per delivery: {failed:?}"
    );
    assert!(failed[0]
        .error
        .starts_with("workflow slow step 1 (webhook): "));
    assert!(
        failed[0].error.contains("no answer within 1 s"),
        "{}",
        failed[0].error
    );
    let all_logs = format!("{}{}", text(&first.stderr), text(&second.stderr));
    assert!(
        !all_logs.contains("s3cr3t"),
        "the token never reaches the logs"
    );
}

#[test]
fn every_example_configuration_is_accepted() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let config = dcflow_core::Config::from_toml(&text, &dcflow_core::Env::default());
        assert!(
            config.is_ok(),
            "{}: {}",
            path.display(),
            config.unwrap_err()
        );
    }
    assert!(seen >= 4, "examples: {seen}");
}
