//! The `rucio` step against a real Rucio 41.5.1 (`scripts/rucio.sh`): replicas of the verified
//! copies on a file-system RSE and of the dCache originals on a WebDAV RSE, attached to a
//! dataset created on first use, listed back through Rucio's API with their bytes and adler32;
//! a redelivery registers nothing twice; a file that Rucio knows with other bytes is refused
//! and recorded; an outage of Rucio during a burst delays the registrations and loses none;
//! a dCache original registered without a copy, with a rule, then declared BAD when dCache
//! removes it; uploads to the real dCache followed by `dcflow run` on its billing topic.

use std::time::Duration;

use dcflow_core::RecordFile;
use serde_json::{json, Value};

use crate::util::*;

/// The tests share the Rucio server; the outage test has it alone (it stops the server).
static RUCIO: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The real Rucio of `scripts/rucio.sh start`, signed in as its test account.
struct RealRucio {
    url: String,
    account: String,
    username: String,
    password: String,
    client: reqwest::Client,
    token: String,
}

impl RealRucio {
    async fn connect() -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(url) = var("DCFLOW_RUCIO") else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "DCFLOW_RUCIO is not set: .ci/run must start Rucio (scripts/rucio.sh start)"
                );
            }
            eprintln!("SKIPPED: no Rucio; start one with `eval \"$(scripts/rucio.sh start)\"`");
            return None;
        };
        let account = var("DCFLOW_RUCIO_ACCOUNT").unwrap_or_else(|| "root".into());
        let username = var("DCFLOW_RUCIO_USERNAME").unwrap_or_else(|| "ddmlab".into());
        let password = var("DCFLOW_RUCIO_PASSWORD").unwrap_or_else(|| "secret".into());
        let client = reqwest::Client::new();
        let resp = client
            .get(format!("{url}/auth/userpass"))
            .header("X-Rucio-Account", &account)
            .header("X-Rucio-Username", &username)
            .header("X-Rucio-Password", &password)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "Rucio sign-in: {}",
            resp.status()
        );
        let token = resp.headers()["X-Rucio-Auth-Token"]
            .to_str()
            .unwrap()
            .to_owned();
        Some(Self {
            url,
            account,
            username,
            password,
            client,
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut req = self
            .client
            .request(method, format!("{}/{path}", self.url))
            .header("X-Rucio-Auth-Token", &self.token);
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn post(&self, path: &str, body: Value) {
        let (status, text) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "POST {path}: {text}");
    }

    /// A non-deterministic RSE with one protocol.
    async fn rse(&self, name: &str, scheme: &str, host: &str, port: u16, implementation: &str) {
        self.post(
            &format!("rses/{name}"),
            json!({"deterministic": false, "rse_type": "DISK"}),
        )
        .await;
        let all = json!({"read": 1, "write": 1, "delete": 1});
        self.post(
            &format!("rses/{name}/protocols/{scheme}"),
            json!({"scheme": scheme, "hostname": host, "port": port, "prefix": "/",
                   "impl": implementation, "domains": {"lan": all, "wan": all}}),
        )
        .await;
    }

    /// One JSON object per line, as Rucio lists replicas.
    async fn replicas(&self, scope: &str, name: &str) -> Vec<Value> {
        let (status, text) = self
            .call(
                reqwest::Method::GET,
                &format!("replicas/{scope}/{name}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A scope and two RSEs of the test's own (Rucio's namespace is shared): a file-system
    /// one for the copies and a WebDAV one on the emulator's door for the originals.
    async fn scope_and_rses(&self, site: &Site, tag: &str) -> (String, String, String) {
        let (scope, fs, dc) = names(tag);
        self.post(&format!("scopes/{}/{scope}", self.account), json!({}))
            .await;
        self.rse(
            &fs,
            "file",
            "localhost",
            0,
            "rucio.rse.protocols.posix.Default",
        )
        .await;
        let port = url::Url::parse(&site.sim.door_url).unwrap().port().unwrap();
        self.rse(
            &dc,
            "https",
            "localhost",
            port,
            "rucio.rse.protocols.webdav.Default",
        )
        .await;
        (scope, fs, dc)
    }

    /// `POST /replicas/list` with every state: one object per file that has replicas.
    async fn listed(&self, scope: &str, name: &str) -> Vec<Value> {
        let (status, text) = self
            .call(
                reqwest::Method::POST,
                "replicas/list",
                Some(json!({"dids": [{"scope": scope, "name": name}], "all_states": true})),
            )
            .await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn section(&self, extra: &str) -> String {
        format!(
            "[rucio]\nurl = \"{}\"\naccount = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\n{extra}\n",
            self.url, self.account, self.username, self.password
        )
    }
}

fn adler32(data: &[u8]) -> String {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    format!("{:08x}", (b << 16) | a)
}

/// A scope, RSE and dataset names of this test's own (Rucio's namespace is shared).
fn names(tag: &str) -> (String, String, String) {
    let u = unique(tag).replace('-', "_");
    (
        format!("t{}", &u[u.len() - 12..]),
        format!("FS_{}", u[u.len() - 12..].to_ascii_uppercase()),
        format!("DCACHE_{}", u[u.len() - 12..].to_ascii_uppercase()),
    )
}

fn workflow(scope: &str, fs: &str, dcache: &str) -> String {
    format!(
        r#"
[[workflow]]
name = "register"
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "rucio"
rse = "{fs}"
scope = "{scope}"
pfn = "file://localhost{{local_path}}"
dataset = "run-1"
[[workflow.step]]
type = "rucio"
rse = "{dcache}"
scope = "{scope}"
pfn = "{{source_url}}"
dataset = "run-1"
"#
    )
}

/// Six uploads on the emulator's door, replayed: each copy registered on the file-system RSE
/// and its dCache original on the WebDAV RSE, all attached to a dataset that did not exist;
/// Rucio lists the dataset's six files with two replicas each, with the bytes and adler32 of
/// the uploads. The registrations were gathered (fewer calls than files). A second replay
/// registers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_and_originals_are_registered_in_a_dataset_once() {
    let _shared = RUCIO.read().await;
    let Some(rucio) = RealRucio::connect().await else {
        return;
    };
    let site = Site::new().await;
    let (scope, fs, dc) = rucio.scope_and_rses(&site, "reg").await;
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("r/f-{i}.dat"),
                data(10_000 + i * 17, 900 + i as u32),
            )
        })
        .collect();
    for (rel, body) in &files {
        site.upload(rel, body).await;
    }
    let mut config = site.write_workflow_config("", &workflow(&scope, &fs, &dc));
    let text = std::fs::read_to_string(&config).unwrap() + &rucio.section("batchwait = 2000");
    std::fs::write(&config, text).unwrap();
    let out = site.replay(&config);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!log.contains("secret"), "the password is never logged");
    let calls = log.matches("RUCIO_REPLICAS").count();
    assert!(
        calls < 2 * files.len(),
        "{calls} registration calls for {} replicas:\n{log}",
        2 * files.len()
    );

    let listed = rucio.replicas(&scope, "run-1").await;
    assert_eq!(listed.len(), files.len(), "{listed:#?}");
    for (rel, body) in &files {
        let name = rel.rsplit('/').next().unwrap();
        let r = listed
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {listed:#?}"));
        assert_eq!(r["bytes"].as_u64(), Some(body.len() as u64), "{r}");
        assert_eq!(r["adler32"].as_str(), Some(adler32(body).as_str()), "{r}");
        let rses = r["rses"].as_object().unwrap();
        assert!(rses.contains_key(&fs) && rses.contains_key(&dc), "{r}");
        let local = site.download().join(rel);
        assert_eq!(
            rses[&fs][0].as_str().unwrap(),
            format!("file://localhost{}", local.display()),
            "{r}"
        );
    }

    // A redelivery: nothing registered again.
    config = site.path("dcflow.toml");
    let again = site.replay(&config);
    let log = String::from_utf8_lossy(&again.stderr).to_string();
    assert_eq!(again.status.code(), Some(0), "{log}");
    assert_eq!(log.matches("RUCIO_REPLICAS").count(), 0, "{log}");
    assert_eq!(rucio.replicas(&scope, "run-1").await.len(), files.len());
}

/// A file that Rucio knows with other bytes (registered before by someone else): not
/// registered again (Rucio would accept it and keep its old values), a failure row that says
/// why, exit 1; the other file of the batch is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rucio_knows_with_other_bytes_is_refused_and_recorded() {
    let _shared = RUCIO.read().await;
    let Some(rucio) = RealRucio::connect().await else {
        return;
    };
    let site = Site::new().await;
    let (scope, fs, dc) = rucio.scope_and_rses(&site, "conflict").await;
    rucio
        .post(
            "replicas",
            json!({"rse": fs, "files": [{"scope": scope, "name": "clash.dat", "bytes": 3,
                    "adler32": "00000001", "pfn": "file://localhost/elsewhere/clash.dat"}]}),
        )
        .await;
    let clash = data(7_000, 31);
    let fine = data(8_000, 32);
    site.upload("c/clash.dat", &clash).await;
    site.upload("c/fine.dat", &fine).await;
    let config = site.write_workflow_config("", &workflow(&scope, &fs, &dc));
    let text = std::fs::read_to_string(&config).unwrap() + &rucio.section("batchwait = 2000");
    std::fs::write(&config, text).unwrap();
    let out = site.replay(&config);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{log}");
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].error.contains("not registered") && failed[0].error.contains("00000001"),
        "{failed:#?}"
    );
    let known = rucio.replicas(&scope, "clash.dat").await;
    assert_eq!(
        known[0]["bytes"].as_u64(),
        Some(3),
        "Rucio's entry is untouched: {known:#?}"
    );
    let fine_listed = rucio.replicas(&scope, "fine.dat").await;
    assert_eq!(
        fine_listed[0]["adler32"].as_str(),
        Some(adler32(&fine).as_str())
    );
}

/// HTTP DELETE at the emulator's door (its billing then announces the removal).
fn delete_at_the_door(site: &Site, door: &str) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-f", "-X", "DELETE", "--cacert"])
        .arg(&site.sim.pki.ca_pem)
        .arg("--cert")
        .arg(&site.sim.pki.proxy)
        .arg(format!("{}{door}", site.sim.door_url))
        .output()
        .unwrap();
    assert!(out.status.success(), "DELETE {door}: {}", text(&out.stderr));
}

fn rucio_script(verb: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/rucio.sh");
    let out = std::process::Command::new("bash")
        .args([script, verb])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rucio.sh {verb}: {}",
        text(&out.stderr)
    );
}

/// Rucio's server stopped during a burst of eight uploads (PostgreSQL and the data stay),
/// started again 8 s after the first registration failed: the registrations wait and retry
/// (the workflow's attempts, with back-off; a file waiting for Rucio gives its transfer slot
/// to the next), none is lost, nothing fails; all eight are in the dataset afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_during_a_burst_delays_registrations_without_losing_any() {
    let _alone = RUCIO.write().await;
    let Some(rucio) = RealRucio::connect().await else {
        return;
    };
    let site = Site::new().await;
    let (scope, fs, dc) = rucio.scope_and_rses(&site, "outage").await;
    let mut files = Vec::new();
    for i in 0..8 {
        let (rel, body) = (format!("o/f-{i}.dat"), data(3_000 + i * 11, 500 + i as u32));
        site.upload(&rel, &body).await;
        files.push((rel, body));
    }
    let wf = workflow(&scope, &fs, &dc).replace(
        "name = \"register\"\n",
        "name = \"register\"\nattempts = 30\n",
    );
    let config = site.write_workflow_config("retryseconds = 1", &wf);
    let text_cfg = std::fs::read_to_string(&config).unwrap() + &rucio.section("timeout = 5");
    std::fs::write(&config, text_cfg).unwrap();
    rucio_script("stop-server");
    // Started again whatever happens, for the other tests.
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            rucio_script("start");
        }
    }
    let restart = Restart;
    let log = site.path("replay.log");
    let child = site.spawn_replay(&config, Some(&log));
    wait_for_logged(
        "a registration to fail",
        Duration::from_secs(60),
        &log,
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("(rucio) attempt 1/30 failed")),
    );
    std::thread::sleep(Duration::from_secs(8));
    let before = std::fs::read_to_string(&log).unwrap();
    drop(restart);
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        before.contains("STEP_RUN register step 2 (rucio) attempt 1/30 failed"),
        "the outage was seen:\n{before}"
    );
    assert!(site.records("failed.csv").is_empty());
    let listed = rucio.replicas(&scope, "run-1").await;
    assert_eq!(listed.len(), files.len(), "{listed:#?}");
    for r in &listed {
        let rses = r["rses"].as_object().unwrap();
        assert!(rses.contains_key(&fs) && rses.contains_key(&dc), "{r}");
    }
}

/// Without a copy step: the dCache original registered with dCache's own size and adler32
/// (a HEAD with Want-Digest), attached, with a rule on the dataset (one, however many files).
/// Then the files are deleted in dCache, and a workflow on `remove` events declares their
/// replicas BAD (Rucio lets no account delete a replica: DELETE /replicas answers 401
/// AccessDenied even for root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_is_registered_without_a_copy_ruled_and_declared_bad_once_removed() {
    let _shared = RUCIO.read().await;
    let Some(rucio) = RealRucio::connect().await else {
        return;
    };
    let site = Site::new().await;
    let (scope, _fs, dc) = rucio.scope_and_rses(&site, "nocopy").await;
    rucio
        .post(
            &format!("accounts/{}/limits/local/{dc}", rucio.account),
            json!({"bytes": -1}),
        )
        .await;
    let mut files = Vec::new();
    for i in 0..3 {
        let (rel, body) = (format!("n/f-{i}.dat"), data(4_000 + i, 600 + i as u32));
        let door = site.upload(&rel, &body).await;
        files.push((rel, body, door));
    }
    let wf = format!(
        r#"
[[workflow]]
name = "originals"
[[workflow.step]]
type = "rucio"
rse = "{dc}"
scope = "{scope}"
pfn = "{{source_url}}"
dataset = "raw"
rule = "{dc}"
copies = 1

[[workflow]]
name = "removed"
[workflow.match]
kinds = ["remove"]
[[workflow.step]]
type = "rucio"
rse = "{dc}"
scope = "{scope}"
"#
    );
    let config = site.write_workflow_config("", &wf);
    let text_cfg = std::fs::read_to_string(&config).unwrap() + &rucio.section("batchwait = 1000");
    std::fs::write(&config, text_cfg).unwrap();
    let out = site.replay(&config);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        files
            .iter()
            .all(|(rel, ..)| !site.download().join(rel).exists()),
        "no copy"
    );
    let listed = rucio.listed(&scope, "raw").await;
    assert_eq!(listed.len(), 3, "{listed:#?}");
    for (rel, body, _) in &files {
        let name = rel.rsplit('/').next().unwrap();
        let r = listed.iter().find(|r| r["name"] == name).unwrap();
        assert_eq!(r["bytes"].as_u64(), Some(body.len() as u64), "{r}");
        assert_eq!(r["adler32"].as_str(), Some(adler32(body).as_str()), "{r}");
        assert_eq!(r["states"][&dc], "AVAILABLE", "{r}");
    }
    let (status, rules) = rucio
        .call(
            reqwest::Method::GET,
            &format!("dids/{scope}/raw/rules"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{rules}");
    let rules: Vec<Value> = rules
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rules.len(), 1, "{rules:#?}");
    assert_eq!(rules[0]["rse_expression"].as_str(), Some(dc.as_str()));

    // dCache removes them: their remove messages run the second workflow.
    for (_, _, door) in &files {
        delete_at_the_door(&site, door);
    }
    let out = site.replay(&config);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("RUCIO_BAD"), "{log}");
    let listed = rucio.listed(&scope, "raw").await;
    for r in &listed {
        assert_eq!(r["states"][&dc], "BAD", "{r}");
    }
}

/// Uploads to the real dCache door, `dcflow run` on the billing topic dCache publishes to
/// Kafka: each verified copy registered on a file-system RSE and each dCache original on an
/// RSE of the real door, in one dataset; Rucio lists both replicas of every file with the
/// uploads' bytes and adler32. The same billing messages again (a redelivery) register
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_the_real_dcache_are_registered_from_its_billing_topic() {
    let _shared = RUCIO.read().await;
    let (Some(rucio), Some(broker), Some(dcache)) =
        (RealRucio::connect().await, broker(), real_dcache())
    else {
        return;
    };
    let _dcache = crate::real_dcache::DCACHE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (scope, fs, dc) = names("real");
    rucio
        .post(&format!("scopes/{}/{scope}", rucio.account), json!({}))
        .await;
    rucio
        .rse(
            &fs,
            "file",
            "localhost",
            0,
            "rucio.rse.protocols.posix.Default",
        )
        .await;
    let port = url::Url::parse(&dcache.door).unwrap().port().unwrap();
    rucio
        .rse(
            &dc,
            "https",
            "localhost",
            port,
            "rucio.rse.protocols.webdav.Default",
        )
        .await;
    let folder = format!("/public/{}", unique("rucio"));
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("run/f-{i}.dat"),
                data(20_000 + i * 1_000, 700 + i as u32),
            )
        })
        .collect();
    let group = unique("rucio-run");
    let auth = format!("proxy = \"{}\"", dcache.cert_and_key(dir.path()).display());
    let extra = workflow(&scope, &fs, &dc) + &rucio.section("batchwait = 1000");
    let config = dcache.config(
        dir.path(),
        &folder,
        &auth,
        Some(&kafka_keys(&dcache.topic, &broker, &group)),
        &extra,
    );
    let log = dir.path().join("run.log");
    let child = start_run(&config, &log);
    for (rel, body) in &files {
        crate::real_dcache::put(&dcache, dir.path(), &format!("{folder}/{rel}"), body);
    }
    wait_for_logged(
        "every file registered",
        Duration::from_secs(180),
        &log,
        || {
            RecordFile::read_all(&dir.path().join("success.csv"))
                .is_ok_and(|r| r.len() >= files.len())
        },
    );
    wait_committed_to_end(&broker, &dcache.topic, &group);
    assert_eq!(stop(child), 0, "{}", std::fs::read_to_string(&log).unwrap());
    let listed = rucio.replicas(&scope, "run-1").await;
    assert_eq!(listed.len(), files.len(), "{listed:#?}");
    for (rel, body) in &files {
        let name = rel.rsplit('/').next().unwrap();
        let r = listed
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {listed:#?}"));
        assert_eq!(r["bytes"].as_u64(), Some(body.len() as u64), "{r}");
        assert_eq!(r["adler32"].as_str(), Some(adler32(body).as_str()), "{r}");
        let rses = r["rses"].as_object().unwrap();
        let on_door = rses[&dc][0].as_str().unwrap();
        assert!(on_door.ends_with(&format!("{folder}/{rel}")), "{r}");
        assert!(rses.contains_key(&fs), "{r}");
    }

    // A redelivery of the same billing messages: nothing registered again.
    let messages = topic_messages(&broker, &dcache.topic, &folder);
    let events = dir.path().join("events.jsonl");
    let mut lines = Vec::new();
    for m in messages {
        lines.extend(m);
        lines.push(b'\n');
    }
    std::fs::write(&events, lines).unwrap();
    let again = dcflow(&[
        "replay",
        "-c",
        config.to_str().unwrap(),
        events.to_str().unwrap(),
    ]);
    let log = text(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{log}");
    assert_eq!(log.matches("RUCIO_REPLICAS").count(), 0, "{log}");
    assert_eq!(rucio.replicas(&scope, "run-1").await.len(), files.len());
}

/// X.509 sign-in: `[rucio] x509 = true` with an RFC 3820 proxy of a user whose DN is an
/// identity of the account, against Rucio behind TLS that asks for a client certificate
/// (`scripts/rucio.sh`'s https front, which hands the subject to Rucio as Apache's mod_ssl
/// does). A replica registered beforehand, its file deleted at the emulator's door: the
/// `remove` workflow signs in with the proxy and declares the replica BAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_sign_in_with_the_proxy_then_calls_with_its_token() {
    let _shared = RUCIO.read().await;
    let Some(rucio) = RealRucio::connect().await else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k}: scripts/rucio.sh env"));
    let front = var("DCFLOW_RUCIO_X509");
    let usercert = std::path::PathBuf::from(var("DCFLOW_RUCIO_X509_USERCERT"));
    let userkey = std::path::PathBuf::from(var("DCFLOW_RUCIO_X509_USERKEY"));
    let capath = var("DCFLOW_RUCIO_X509_CAPATH");
    let dn = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "compat", "-in"])
        .arg(&usercert)
        .output()
        .unwrap();
    let dn = text(&dn.stdout)
        .trim()
        .trim_start_matches("subject=")
        .to_owned();
    let (status, answer) = rucio
        .call(
            reqwest::Method::POST,
            &format!("accounts/{}/identities", rucio.account),
            Some(json!({"identity": dn, "authtype": "X509", "email": "dcflow@example.org"})),
        )
        .await;
    assert!(status == 201 || status == 409, "{status} {answer}");

    let site = Site::new().await;
    let (scope, _fs, dc) = rucio.scope_and_rses(&site, "x509").await;
    let door = site.upload("x/gone.dat", &data(1_000, 77)).await;
    rucio
        .post(
            "replicas",
            json!({"rse": dc, "files": [{"scope": scope, "name": "gone.dat", "bytes": 1000,
                    "adler32": "00000001", "pfn": format!("{}{door}", site.sim.door_url)}]}),
        )
        .await;
    delete_at_the_door(&site, &door);

    // [local] proxy: the Rucio user's proxy; capath: Rucio's CA. The door is not contacted
    // for a remove event.
    let proxy = make_proxy(&usercert, &userkey, site.dir.path());
    let config = site.write_workflow_config(
        "",
        &format!(
            "\n[[workflow]]\nname = \"forget\"\n[workflow.match]\nkinds = [\"remove\"]\n\
             [[workflow.step]]\ntype = \"rucio\"\nrse = \"{dc}\"\nscope = \"{scope}\"\n\
             \n[rucio]\nurl = \"{front}\"\naccount = \"{}\"\nx509 = true\n",
            rucio.account
        ),
    );
    let text_cfg = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .map(|l| match l.split('=').next().unwrap_or("").trim() {
            "proxy" => format!("proxy = \"{}\"", proxy.display()),
            "capath" => format!("capath = \"{capath}\""),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, text_cfg).unwrap();
    let out = site.replay(&config);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("RUCIO signed in with the X.509 proxy"),
        "{log}"
    );
    assert!(log.contains("RUCIO_BAD"), "{log}");
    let listed = rucio.listed(&scope, "gone.dat").await;
    assert_eq!(listed[0]["states"][&dc], "BAD", "{listed:#?}");
}
