//! `[[workflow]]` end to end: the emulator, the real binary, real programs for `exec` and a
//! real HTTP server (a plain socket) for `webhook`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use crate::util::{data, files_below, text, Site};
use dcache_sim::Fault;

fn replay(config: &std::path::Path, events: &std::path::Path) -> std::process::Output {
    crate::util::dcflow(&[
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
    let config = site.write_workflow_config("", CAMPAIGN);
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

    // The same events again (a replay, a rebalance): the state file says the workflow is
    // done; the files stay, nothing fails.
    let again = replay(&config, &events);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("WORKFLOW_DONE campaign already"),
        "{}",
        text(&again.stderr)
    );
    // Even without the state file, the copy is recognised: at its final path, and gone
    // from dCache.
    std::fs::remove_file(site.path("dcflow-state.sqlite")).unwrap();
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
    let config = site.write_workflow_config("retrytimes = 2", CAMPAIGN);
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

/// How many recorded calls have `tag` as one of their arguments.
fn calls_with(recorded: &str, tag: &str) -> usize {
    recorded
        .lines()
        .filter(|l| l.contains(&format!("\"{tag}\"")))
        .count()
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
[[workflow.step]]
type = "exec"
argv = ["cp", "/proc/self/status", "{status}"]
"#,
        script = script.display(),
        calls = calls.display(),
        status = site.path("child-status").display(),
    );
    let config = site.write_workflow_config("", &workflows);
    let out = crate::util::dcflow(&[
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
    // dcflow runs without transparent huge pages (mimalloc's no_thp); its programs do not.
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    if ours.contains("THP_enabled:\t1") {
        let child = std::fs::read_to_string(site.path("child-status")).unwrap();
        assert!(child.contains("THP_enabled:\t1"), "{child}");
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
    let config = site.write_workflow_config("", &workflows);
    let out = crate::util::dcflow(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        site.billing().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let recorded = std::fs::read_to_string(&calls).unwrap();
    let count = |tag: &str| calls_with(&recorded, tag);
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
    let config = site.write_workflow_config("", &workflows);
    let events = snapshot(&site, "events.jsonl");
    let first = replay(&config, &events);
    assert_eq!(first.status.code(), Some(1), "{}", text(&first.stderr));
    // Delivered again: the state file says the webhook was called; it is not called again.
    let second = replay(&config, &events);
    assert_eq!(second.status.code(), Some(1));
    assert_eq!(requests.lock().unwrap().len(), 1);
    // The state lost (or a crash between the call and its record): the call is repeated,
    // with the same idempotency key.
    std::fs::remove_file(site.path("dcflow-state.sqlite")).unwrap();
    let third = replay(&config, &events);
    assert_eq!(third.status.code(), Some(1));
    assert_eq!(
        std::fs::read(site.download().join("faas/in.dat")).unwrap(),
        body
    );

    let got = requests.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:#?}");
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
    assert!(event["data"]["event"]["msgType"].as_str().is_some());

    let failed = site.records("failed.csv");
    assert_eq!(
        failed.len(),
        3,
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
    let all_logs = format!(
        "{}{}{}",
        text(&first.stderr),
        text(&second.stderr),
        text(&third.stderr)
    );
    assert!(
        !all_logs.contains("s3cr3t"),
        "the token never reaches the logs"
    );
}

/// Every `examples/*.toml` passes `dcflow check-config`, with only the site's credential files
/// (CA folder, proxy, token, which this machine does not have) swapped for the emulator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_every_example() {
    let site = Site::new().await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let text: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| {
                let key = line.split('=').next().unwrap_or("").trim();
                // check-config also checks that the folders can be written: here, below the
                // test's own folder.
                let below = |name: &str| site.path("example-folders").join(name);
                match key {
                    "capath" => format!("capath = \"{}\"", site.sim.pki.capath.display()),
                    "proxy" => format!("proxy = \"{}\"", site.sim.pki.proxy.display()),
                    "token" => format!("token = \"{}\"", site.sim.token_file.display()),
                    "downloadfolder" | "failedtasksfile" | "successfultaskfile" | "statefile" => {
                        format!("{key} = \"{}\"", below(key).display())
                    }
                    _ => line.to_owned(),
                }
            })
            .map(|l| l + "\n")
            .collect();
        let name = path.file_name().unwrap().to_str().unwrap();
        // Issue 17, item 7: examples are copied as they are; none frees a pool by surprise.
        assert!(
            !text.lines().any(|l| l
                .split('#')
                .next()
                .unwrap_or("")
                .contains("\"delete-source\"")),
            "{name}: an active delete-source step"
        );
        let local = site.path(name);
        std::fs::write(&local, &text).unwrap();
        let out = crate::util::dcflow(&[
            "check-config",
            "--offline",
            "--config",
            local.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}{}",
            crate::util::text(&out.stdout),
            crate::util::text(&out.stderr)
        );
        assert!(
            crate::util::text(&out.stdout).contains("workflows:"),
            "{name}"
        );
    }
    assert!(seen >= 5, "examples: {seen}");
}

/// Archives built by Python's tarfile and zipfile: a good one of each format, and hostile ones.
fn make_archives(dir: &std::path::Path) {
    let script = r##"
import io, sys, tarfile, zipfile, os
d = sys.argv[1]
def add(t, name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
with tarfile.open(os.path.join(d, "good.tar.gz"), "w:gz") as t:
    add(t, "top/", kind=tarfile.DIRTYPE)
    add(t, "top/a.txt", b"alpha\n")
    add(t, "top/sub/b.bin", bytes(range(256)) * 40)
    add(t, "top/latest", kind=tarfile.SYMTYPE, link="sub/b.bin")
with zipfile.ZipFile(os.path.join(d, "good.zip"), "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("docs/readme.md", "# hello\n")
    z.writestr("docs/data/c.csv", "a,b\n1,2\n" * 100)
with tarfile.open(os.path.join(d, "dotdot.tar"), "w") as t:
    add(t, "ok.txt")
    add(t, "../../escaped-dotdot.txt")
with tarfile.open(os.path.join(d, "absolute.tar"), "w") as t:
    add(t, "/tmp/escaped-absolute.txt")
with tarfile.open(os.path.join(d, "linkout.tar"), "w") as t:
    add(t, "out", kind=tarfile.SYMTYPE, link="../../..")
    add(t, "out/escaped-link.txt")
with tarfile.open(os.path.join(d, "linkabs.tar"), "w") as t:
    add(t, "etc", kind=tarfile.SYMTYPE, link="/etc")
with tarfile.open(os.path.join(d, "climb.tar"), "w") as t:
    add(t, "here", kind=tarfile.SYMTYPE, link=".")
    add(t, "up", kind=tarfile.SYMTYPE, link="here/..")
with tarfile.open(os.path.join(d, "hardlink.tar"), "w") as t:
    add(t, "passwd", kind=tarfile.LNKTYPE, link="/etc/passwd")
with zipfile.ZipFile(os.path.join(d, "slip.zip"), "w") as z:
    z.writestr("fine.txt", "fine")
    z.writestr("../../escaped-zip.txt", "evil")
"##;
    let out = std::process::Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpack_publishes_whole_trees_and_refuses_every_escape() {
    let site = Site::new().await;
    let archives = site.path("archives");
    std::fs::create_dir_all(&archives).unwrap();
    make_archives(&archives);
    let hostile = [
        "dotdot.tar",
        "absolute.tar",
        "linkout.tar",
        "linkabs.tar",
        "climb.tar",
        "hardlink.tar",
        "slip.zip",
    ];
    for name in ["good.tar.gz", "good.zip"].iter().chain(&hostile) {
        let body = std::fs::read(archives.join(name)).unwrap();
        site.upload(&format!("arc/{name}"), &body).await;
    }
    let workflows = r#"
[[workflow]]
name = "unpack"
[workflow.match]
paths = ["arc/*"]
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "unpack"
"#;
    let config = site.write_workflow_config("", workflows);
    let events = snapshot(&site, "events.jsonl");
    let out = replay(&config, &events);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let arc = site.download().join("arc");
    let tree = arc.join("good.tar.gz.d");
    assert_eq!(std::fs::read(tree.join("top/a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        std::fs::read(tree.join("top/sub/b.bin")).unwrap().len(),
        256 * 40
    );
    assert_eq!(
        std::fs::read_link(tree.join("top/latest")).unwrap(),
        std::path::Path::new("sub/b.bin")
    );
    let zip_tree = arc.join("good.zip.d");
    assert_eq!(
        std::fs::read_to_string(zip_tree.join("docs/readme.md")).unwrap(),
        "# hello\n"
    );
    for name in &hostile {
        assert!(
            !arc.join(format!("{name}.d")).exists(),
            "{name}: nothing is published"
        );
        assert!(
            !arc.join(format!(".{name}.d.dcflow-unpack")).exists(),
            "{name}: no temporary tree left"
        );
    }
    for escaped in [
        "escaped-dotdot.txt",
        "escaped-absolute.txt",
        "escaped-link.txt",
        "escaped-zip.txt",
    ] {
        for dir in [
            site.dir.path(),
            &site.download(),
            &arc,
            std::path::Path::new("/tmp"),
        ] {
            assert!(
                !dir.join(escaped).exists(),
                "{escaped} in {}",
                dir.display()
            );
        }
    }
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), hostile.len(), "{failed:#?}");
    for r in &failed {
        assert!(
            r.error.starts_with("workflow unpack step 2 (unpack): "),
            "{}",
            r.error
        );
        assert!(
            r.error.contains("refused") || r.error.contains("links"),
            "{}",
            r.error
        );
    }

    // Delivered again: the published trees are kept as they are, nothing is unpacked twice.
    let marker = tree.join("top/marker");
    std::fs::write(&marker, b"operator's note").unwrap();
    let again = replay(&config, &events);
    assert_eq!(again.status.code(), Some(1));
    assert!(marker.exists(), "the tree was not replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_keeps_one_row_per_file_and_the_command_lists_them() {
    let site = Site::new().await;
    site.upload("cat/one.dat", &data(11_000, 8)).await;
    site.upload("cat/two.dat", &data(22_000, 9)).await;
    let db = site.path("catalog.sqlite");
    let workflows = format!(
        r#"
[[workflow]]
name = "register"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "catalog"
database = "{db}"
"#,
        db = db.display()
    );
    let config = site.write_workflow_config("", &workflows);
    let events = snapshot(&site, "events.jsonl");
    for _ in 0..2 {
        let out = replay(&config, &events);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    // A fresh state file: the steps run again, and the catalog still has one row per file.
    std::fs::remove_file(site.path("dcflow-state.sqlite")).unwrap();
    let out = replay(&config, &events);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let listed = crate::util::dcflow(&["catalog", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed.stderr));
    let rows: Vec<serde_json::Value> = text(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(
        rows[0]["path"].as_str().unwrap().rsplit('/').next(),
        Some("one.dat")
    );
    assert_eq!(rows[0]["status"], "present");
    assert_eq!(rows[0]["size"], 11_000);
    assert!(rows[0]["checksum"]
        .as_str()
        .unwrap()
        .starts_with("adler32:"));
    assert!(rows[1]["local_path"]
        .as_str()
        .unwrap()
        .ends_with("cat/two.dat"));
    let csv = crate::util::dcflow(&[
        "catalog",
        "--database",
        db.to_str().unwrap(),
        "--path",
        "*/two.dat",
    ]);
    let csv = text(&csv.stdout);
    assert_eq!(csv.lines().count(), 2, "header and one row: {csv}");
    assert!(csv.starts_with("workflow,path,local_path,size,checksum,pnfsid,status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_is_resumed_not_repeated_and_removals_start_their_own_workflow() {
    let site = Site::new().await;
    let door_path = site.upload("res/file.dat", &data(9_000, 10)).await;
    let (script, calls) = argv_recorder(&site);
    let gate = site.path("gate-open");
    let db = site.path("catalog.sqlite");
    // Step 3 fails (exit 3) until the gate file exists.
    let workflows = format!(
        r#"
[[workflow]]
name = "pipeline"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "exec"
argv = ["python3", "{script}", "{calls}", "first", "{{name}}"]
[[workflow.step]]
type = "exec"
argv = ["/bin/sh", "-c", "python3 \"$0\" \"$1\" second \"$2\" && test -e \"$3\" || exit 3", "{script}", "{calls}", "{{name}}", "{gate}"]
[[workflow.step]]
type = "delete-source"

[[workflow]]
name = "forget"
[workflow.match]
kinds = ["remove"]
[[workflow.step]]
type = "exec"
argv = ["python3", "{script}", "{calls}", "removed", "{{path}}", "{{kind}}"]
[[workflow.step]]
type = "catalog"
database = "{db}"
"#,
        script = script.display(),
        calls = calls.display(),
        gate = gate.display(),
        db = db.display(),
    );
    let config = site.write_workflow_config("", &workflows);
    let events = snapshot(&site, "events.jsonl");
    let first = replay(&config, &events);
    assert_eq!(first.status.code(), Some(1), "{}", text(&first.stderr));
    assert!(
        site.sim.stored_file(&door_path).exists(),
        "step 4 not reached"
    );
    let failed = site.records("failed.csv");
    assert!(failed[0]
        .error
        .starts_with("workflow pipeline step 3 (exec): "));

    // `dcflow retry` of the failure, once the gate is open: it resumes at step 3.
    std::fs::write(&gate, b"").unwrap();
    let retried = crate::util::dcflow(&[
        "retry",
        "--config",
        config.to_str().unwrap(),
        site.path("failed.csv").to_str().unwrap(),
    ]);
    assert_eq!(retried.status.code(), Some(0), "{}", text(&retried.stderr));
    assert!(
        text(&retried.stderr).contains("resumes at step 3"),
        "{}",
        text(&retried.stderr)
    );
    assert!(
        !site.sim.stored_file(&door_path).exists(),
        "deleted at last"
    );
    // Everything again, now with dCache's remove messages: "pipeline" is done already, and
    // the removal runs "forget" once (the door's and the pool's messages are one event).
    let all = replay(&config, &site.billing());
    assert_eq!(all.status.code(), Some(0), "{}", text(&all.stderr));
    let recorded = std::fs::read_to_string(&calls).unwrap();
    let count = |tag: &str| calls_with(&recorded, tag);
    assert_eq!(
        count("first"),
        1,
        "a finished step never runs again: {recorded}"
    );
    assert_eq!(count("second"), 2, "failed once, then resumed: {recorded}");
    assert_eq!(count("removed"), 1, "{recorded}");
    assert!(recorded.contains("\"remove\""));
    let rows = crate::util::dcflow(&["catalog", "--database", db.to_str().unwrap(), "--json"]);
    let rows = text(&rows.stdout);
    assert!(rows.contains("\"status\":\"removed\""), "{rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_workflow_resumes_after_the_last_finished_step() {
    let site = Site::new().await;
    let body = data(30_000, 13);
    site.upload("crash/f.dat", &body).await;
    let (script, calls) = argv_recorder(&site);
    let gate = site.path("gate-open");
    let pid_file = site.path("step3.pid");
    // Step 3 records that it started, then waits (for the kill) unless the gate is open.
    let workflows = format!(
        r#"
[[workflow]]
name = "crashy"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "exec"
argv = ["python3", "{script}", "{calls}", "step2", "{{name}}"]
[[workflow.step]]
type = "exec"
argv = ["/bin/sh", "-c", "echo $$ > \"$3\"; python3 \"$0\" \"$1\" step3-start; test -e \"$2\" || sleep 60; python3 \"$0\" \"$1\" step3-done", "{script}", "{calls}", "{gate}", "{pid}"]
timeout = 120
"#,
        script = script.display(),
        calls = calls.display(),
        gate = gate.display(),
        pid = pid_file.display(),
    );
    let config = site.write_workflow_config("", &workflows);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args([
            "replay",
            "--config",
            config.to_str().unwrap(),
            site.billing().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .contains("step3-start")
    {
        assert!(std::time::Instant::now() < deadline, "step 3 never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: no drain, no cleanup
    child.wait().unwrap();
    // The orphaned step-3 program goes too, as it would with the daemon's cgroup.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status();

    std::fs::write(&gate, b"").unwrap();
    let out = replay(&config, &site.billing());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("resumes at step 3"),
        "{}",
        text(&out.stderr)
    );
    let recorded = std::fs::read_to_string(&calls).unwrap();
    let count = |tag: &str| calls_with(&recorded, tag);
    assert_eq!(
        count("step2"),
        1,
        "finished before the crash: not run again"
    );
    assert_eq!(count("step3-start"), 2, "interrupted, so run again");
    assert_eq!(count("step3-done"), 1);
    assert_eq!(
        std::fs::read(site.download().join("crash/f.dat")).unwrap(),
        body
    );
}

/// Issue 14, item 10: unpack had no size, entry-count or ratio limit (a tar.gz bomb filled the
/// destination), and a folder named like its temporary folder was removed with everything in
/// it. Now the bomb is a clean failure that leaves nothing, and a folder of that name that
/// dcflow did not create is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpack_refuses_a_bomb_and_removes_no_folder_it_did_not_create() {
    let site = Site::new().await;
    let archives = site.path("archives");
    std::fs::create_dir_all(&archives).unwrap();
    // 64 MiB of zeros in about 64 KiB, and 300 small entries.
    let script = r#"
import io, sys, tarfile, os
d = sys.argv[1]
with tarfile.open(os.path.join(d, "bomb.tar.gz"), "w:gz") as t:
    info = tarfile.TarInfo("zeros.bin"); info.size = 64 << 20
    class Zeros(io.RawIOBase):
        def __init__(s): s.left = info.size
        def readable(s): return True
        def readinto(s, b):
            n = min(len(b), s.left); b[:n] = bytes(n); s.left -= n; return n
    t.addfile(info, io.BufferedReader(Zeros()))
with tarfile.open(os.path.join(d, "many.tar.gz"), "w:gz") as t:
    for i in range(300):
        info = tarfile.TarInfo(f"f{i}.txt"); data = b"%d\n" % i; info.size = len(data)
        t.addfile(info, io.BytesIO(data))
with tarfile.open(os.path.join(d, "fine.tar.gz"), "w:gz") as t:
    info = tarfile.TarInfo("in/side.txt"); data = b"fine\n"; info.size = len(data)
    t.addfile(info, io.BytesIO(data))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, archives.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in ["bomb.tar.gz", "many.tar.gz", "fine.tar.gz"] {
        site.upload(
            &format!("arc/{name}"),
            &std::fs::read(archives.join(name)).unwrap(),
        )
        .await;
    }
    // A folder that looks like the old temporary folder of fine.tar.gz.d (a dCache folder
    // copied earlier, say): it must survive.
    let lookalike = site.download().join("arc/.fine.tar.gz.d.dcflow-unpack");
    std::fs::create_dir_all(&lookalike).unwrap();
    std::fs::write(lookalike.join("precious.txt"), "keep me").unwrap();
    let workflows = r#"
[[workflow]]
name = "unpack"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "unpack"
maxfiles = 200
"#;
    let config = site.write_workflow_config("", workflows);
    let out = replay(&config, &site.billing());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failed = site.records("failed.csv");
    let why = |name: &str| {
        failed
            .iter()
            .find(|r| r.billing_path.ends_with(name))
            .map(|r| r.error.clone())
            .unwrap_or_else(|| panic!("no failure row for {name}: {failed:?}"))
    };
    assert!(
        why("bomb.tar.gz").contains("maxratio"),
        "{}",
        why("bomb.tar.gz")
    );
    assert!(
        why("many.tar.gz").contains("maxfiles"),
        "{}",
        why("many.tar.gz")
    );
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(
        std::fs::read_to_string(site.download().join("arc/fine.tar.gz.d/in/side.txt")).unwrap(),
        "fine\n"
    );
    assert!(!site.download().join("arc/bomb.tar.gz.d").exists());
    assert!(!site.download().join("arc/many.tar.gz.d").exists());
    assert_eq!(
        std::fs::read_to_string(lookalike.join("precious.txt")).unwrap(),
        "keep me",
        "a folder dcflow did not create was removed"
    );
    let stray: Vec<_> = files_below(&site.download())
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            (s.contains("dcflow-unpack") && !s.contains("precious")) || s.contains("zeros.bin")
        })
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

/// Issue 14, item 11: with `destination = "{name}"`, `/a/x` and `/b/x` map to one local path;
/// the second copy replaced the first, and with delete-source both sources were deleted while
/// one copy survived (reproduced against a real dCache 12). Resuming at delete-source trusted
/// the state row without looking at the local file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_for_one_destination_collide_and_delete_source_checks_the_copy_again() {
    let site = Site::new().await;
    let (a, b) = (data(30_000, 1), data(30_000, 2));
    let door_a = site.upload("a/x", &a).await;
    let door_b = site.upload("b/x", &b).await;
    let workflows = r#"
[[workflow]]
name = "flat"
[[workflow.step]]
type = "copy"
destination = "flat/{name}"
[[workflow.step]]
type = "delete-source"
"#;
    let events = snapshot(&site, "events.jsonl");
    let config = site.write_workflow_config("", workflows);
    let out = replay(&config, &events);
    let stderr = text(&out.stderr);
    let local = std::fs::read(site.download().join("flat/x")).unwrap();
    let (kept, deleted) = if local == a {
        (&door_b, &door_a)
    } else {
        assert!(local == b, "the copy is neither source");
        (&door_a, &door_b)
    };
    assert!(
        !site.sim.stored_file(deleted).exists(),
        "the copied source is freed"
    );
    assert!(
        site.sim.stored_file(kept).exists(),
        "both sources were deleted while one copy survives:\n{stderr}"
    );
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].error.contains("already holds the copy of"),
        "{}",
        failed[0].error
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    // Resuming at delete-source: the copy is done and recorded, a later step fails once;
    // meanwhile the local copy is changed. The resumed workflow must not delete the source.
    let site = Site::new().await;
    let body = data(40_000, 3);
    let door = site.upload("r/y", &body).await;
    let gate = site.path("gate");
    let workflows = format!(
        r#"
[[workflow]]
name = "gated"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "exec"
argv = ["test", "-e", "{gate}"]
[[workflow.step]]
type = "delete-source"
"#,
        gate = gate.display()
    );
    let events = snapshot(&site, "events.jsonl");
    let config = site.write_workflow_config("", &workflows);
    let out = replay(&config, &events);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let copy = site.download().join("r/y");
    assert_eq!(std::fs::read(&copy).unwrap(), body);
    let mut changed = body.clone();
    changed[100] ^= 0xff;
    std::fs::write(&copy, &changed).unwrap();
    std::fs::write(&gate, "").unwrap();
    let out = replay(&config, &events);
    let stderr = text(&out.stderr);
    assert!(
        site.sim.stored_file(&door).exists(),
        "the source was deleted although the local copy no longer matches:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failed = site.records("failed.csv");
    assert!(
        failed
            .last()
            .unwrap()
            .error
            .contains("does not match dCache's file"),
        "{failed:?}"
    );
}

/// Issue 14, item 12: `exec` children inherited the whole environment (`BEARER_TOKEN`
/// included), and a file name starting with `-` reached the program where it reads options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_children_get_no_token_and_a_dash_name_is_not_an_option() {
    let site = Site::new().await;
    site.upload("e/ok.dat", &data(1_000, 1)).await;
    site.upload("e/-rf", &data(1_000, 2)).await;
    let (script, calls) = argv_recorder(&site);
    let env_dump = site.path("env.txt");
    let workflows = format!(
        r#"
[[workflow]]
name = "env"
[workflow.match]
paths = ["**/ok.dat"]
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "exec"
argv = ["/bin/sh", "-c", "env > \"$0\"", "{env_dump}"]

[[workflow]]
name = "dash"
[workflow.match]
paths = ["**/-rf"]
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "exec"
argv = ["python3", "{script}", "{calls}", "--", "{{name}}"]
[[workflow.step]]
type = "exec"
argv = ["python3", "{script}", "{calls}", "{{name}}"]
"#,
        env_dump = env_dump.display(),
        script = script.display(),
        calls = calls.display(),
    );
    let config = site.write_workflow_config("", &workflows);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dcflow"))
        .args([
            "replay",
            "--config",
            config.to_str().unwrap(),
            site.billing().to_str().unwrap(),
        ])
        // dcflow's own token (WLCG discovery): it authenticates at the door with it.
        .env("BEARER_TOKEN", &site.sim.token)
        .env("SITE_API_TOKEN", "secret-api-value")
        .env("DCFLOW_LOG", "info")
        .env_remove("X509_USER_PROXY")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    let env = std::fs::read_to_string(&env_dump).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert!(
        !env.contains(&site.sim.token),
        "BEARER_TOKEN reached the program"
    );
    assert!(
        !env.contains("secret-api-value"),
        "SITE_API_TOKEN reached the program"
    );
    assert!(env.contains("PATH="), "the rest of the environment is kept");
    let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(
        recorded.lines().any(|l| l == r#"["--", "-rf"]"#),
        "after a literal --, the name is passed: {recorded}"
    );
    assert!(
        !recorded.lines().any(|l| l == r#"["-rf"]"#),
        "-rf was handed over where options are read: {recorded}"
    );
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 1, "{failed:?}\n{stderr}");
    assert!(
        failed[0].error.contains("starts with '-'"),
        "{}",
        failed[0].error
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
