//! The transfer engine against the dCache emulator on 127.0.0.1: every fault kind ends in a
//! retried success or a reported failure, never a partial or wrong file at the final path,
//! never a temporary file left behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dcache_sim::{Fault, ProxyKey, Sim, SimConfig};
use dcflow_core::{Config, Env, PathMapper};
use dcflow_transfer::{Copied, Credentials, Engine, EngineSettings, Failed, Job, TransferError};

struct Setup {
    sim: Sim,
    dir: tempfile::TempDir,
}

enum Auth {
    Proxy,
    Token,
    BadToken,
}

impl Setup {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tweak: impl FnOnce(&mut SimConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::new(&dir.path().join("sim"));
        tweak(&mut cfg);
        let sim = Sim::start(cfg).await.unwrap();
        Self { sim, dir }
    }

    fn download(&self) -> PathBuf {
        self.dir.path().join("download")
    }

    async fn upload(&self, door_path: &str, data: &[u8]) {
        self.sim.upload(door_path, data.to_vec()).await.unwrap();
    }

    fn config(&self, auth: Auth, extra: &str) -> Config {
        let auth_keys = match auth {
            Auth::Proxy => format!("proxy = '{}'", self.sim.pki.proxy.display()),
            Auth::Token => format!("token = '{}'", self.sim.token_file.display()),
            Auth::BadToken => {
                let bad = self.dir.path().join("bad-token");
                std::fs::write(&bad, "not-a-valid-token\n").unwrap();
                format!("token = '{}'", bad.display())
            }
        };
        let defaults: String = [
            "retryseconds = 0",
            "retrytimes = 3",
            "timeout = 30",
            "stalltimeout = 1",
        ]
        .iter()
        .filter(|line| !extra.contains(line.split(' ').next().unwrap()))
        .map(|line| format!("{line}\n"))
        .collect();
        let text = format!(
            "[dcache]\nurl = '{}'\npool = '/pnfs/example.org/data'\n{defaults}{extra}\n[local]\n{auth_keys}\ncapath = '{}'\ndownloadfolder = '{}'\npermissions = '2750'\nfailedtasksfile = '{}'\nsuccessfultaskfile = '{}'\n",
            self.sim.door_url,
            self.sim.pki.capath.display(),
            self.download().display(),
            self.dir.path().join("failed.csv").display(),
            self.dir.path().join("success.csv").display(),
        );
        // No proxy fallback from this machine's environment.
        Config::from_toml(
            &text,
            &Env {
                uid: 4_000_000_000,
                ..Env::default()
            },
        )
        .unwrap()
    }

    fn engine(&self, config: &Config) -> Engine {
        let creds = Credentials::load(&config.local.auth).unwrap();
        Engine::try_new(settings(config), Arc::new(creds)).unwrap()
    }

    async fn copy(
        &self,
        engine: &Engine,
        config: &Config,
        door_path: &str,
        size: Option<u64>,
    ) -> Result<Copied, Failed> {
        let mapper = PathMapper::new(&config.dcache, config.local.download_folder.clone());
        let mapped = mapper
            .map(&self.sim.namespace_path(door_path))
            .unwrap()
            .unwrap();
        let job = Job {
            known_checksums: &[],
            source: &mapped.source_url,
            rel: &mapped.rel,
            destination: &mapped.destination,
            expected_size: size,
            progress: None,
        };
        engine.copy(&job).await
    }

    /// Nothing but final files under the download folder.
    fn assert_no_part_files(&self) {
        for path in walk(&self.download()) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                !name.contains("dcflow-part") && !name.ends_with(".part"),
                "temporary file left: {}",
                path.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed as u32)
                .rotate_right(13) as u8
        })
        .collect()
}

#[tokio::test]
async fn copies_verified_with_proxy_and_keeps_credentials_at_the_door() {
    let s = Setup::new().await;
    let body = data(3 << 20, 1);
    s.upload("/d/a b/f#1.dat", &body).await;
    for auth in [Auth::Proxy, Auth::Token] {
        let cfg = s.config(auth, "checksums = ['adler32', 'md5']");
        let engine = s.engine(&cfg);
        let _ = std::fs::remove_dir_all(s.download());
        let done = s
            .copy(&engine, &cfg, "/d/a b/f#1.dat", Some(body.len() as u64))
            .await
            .unwrap();
        assert_eq!(done.size, body.len() as u64);
        assert_eq!(done.verified.len(), 2, "adler32 and md5 both compared");
        assert!(!done.already_present);
        let dest = s.download().join("d/a b/f#1.dat");
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::metadata(s.download().join("d"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o2750
        );
    }
    assert!(
        s.sim.pool_authorization_headers().is_empty(),
        "the pool must never see Authorization"
    );
    s.assert_no_part_files();
}

#[tokio::test]
async fn an_identical_destination_is_not_copied_again_and_a_different_one_is_replaced() {
    let s = Setup::new().await;
    let body = data(100_000, 2);
    s.upload("/d/f", &body).await;
    let cfg = s.config(Auth::Token, "");
    let engine = s.engine(&cfg);
    s.copy(&engine, &cfg, "/d/f", None).await.unwrap();
    let gets = s.sim.pool_gets();
    let again = s
        .copy(&engine, &cfg, "/d/f", Some(body.len() as u64))
        .await
        .unwrap();
    assert!(again.already_present);
    assert_eq!(s.sim.pool_gets(), gets, "no second download");

    let dest = s.download().join("d/f");
    let mut wrong = body.clone();
    wrong[500] ^= 1;
    std::fs::write(&dest, &wrong).unwrap();
    let replaced = s
        .copy(&engine, &cfg, "/d/f", Some(body.len() as u64))
        .await
        .unwrap();
    assert!(!replaced.already_present);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
}

/// A file in place is verified without the lock, unless a lock file is there: a copier that
/// died left the name of its temporary file in it, which the check under the lock removes.
#[tokio::test]
async fn a_file_in_place_behind_a_dead_copiers_lock_is_checked_under_the_lock() {
    let s = Setup::new().await;
    let body = data(50_000, 4);
    s.upload("/d/g", &body).await;
    let cfg = s.config(Auth::Token, "");
    let engine = s.engine(&cfg);
    s.copy(&engine, &cfg, "/d/g", None).await.unwrap();
    let folder = s.download().join("d");
    let part = ".g.0123456789abcdef.dcflow-part";
    std::fs::write(folder.join(part), b"half a file").unwrap();
    std::fs::write(folder.join(".g.dcflow-lock"), part).unwrap();
    let again = s
        .copy(&engine, &cfg, "/d/g", Some(body.len() as u64))
        .await
        .unwrap();
    assert!(again.already_present);
    let mut left: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["g"], "the dead copier's files are gone");
}

/// Each fault, for a limited number of requests: retried, then a verified success.
#[tokio::test]
async fn transient_faults_are_retried_to_a_verified_success() {
    let s = Setup::new().await;
    let cfg = s.config(Auth::Token, "");
    let engine = s.engine(&cfg);
    let faults = [
        ("/t/503", Fault::Status { code: 503 }, 2),
        ("/t/500", Fault::Status { code: 500 }, 1),
        ("/t/429", Fault::Status { code: 429 }, 1),
        ("/t/404", Fault::Status { code: 404 }, 2),
        ("/t/reset", Fault::Reset, 1),
        ("/t/hang", Fault::Hang, 1),
        ("/t/truncate", Fault::Truncate { at: 70_000 }, 2),
        (
            "/t/stall",
            Fault::Stall {
                at: 50_000,
                seconds: 3,
            },
            1,
        ),
        ("/t/flip", Fault::FlipByte { at: 12_345 }, 1),
        ("/t/wrongdigest", Fault::WrongDigest, 1),
        (
            "/t/slow",
            Fault::SlowLink {
                bytes_per_second: 1_000_000,
            },
            1,
        ),
    ];
    for (i, (path, fault, times)) in faults.iter().enumerate() {
        let body = data(200_000 + i, i as u8);
        s.upload(path, &body).await;
        s.sim.add_fault(path, fault.clone(), Some(*times));
        let done = s
            .copy(&engine, &cfg, path, Some(body.len() as u64))
            .await
            .unwrap_or_else(|f| panic!("{path}: {}", f.error));
        let expected_attempts = if matches!(fault, Fault::SlowLink { .. }) {
            1
        } else {
            times + 1
        };
        assert_eq!(done.attempts, expected_attempts, "{path}");
        assert_eq!(
            std::fs::read(s.download().join(&path[1..])).unwrap(),
            body,
            "{path}"
        );
        assert!(
            s.sim.faults_fired(path) >= *times,
            "{path}: the fault did fire"
        );
    }
    s.assert_no_part_files();
}

/// The same faults for ever: a reported failure, nothing at the final path.
#[tokio::test]
async fn persistent_faults_fail_cleanly() {
    let s = Setup::new().await;
    let cfg = s.config(Auth::Token, "");
    let engine = s.engine(&cfg);
    let cases: [(&str, Fault, &str, u32); 6] = [
        ("/p/500", Fault::Status { code: 500 }, "http", 3),
        ("/p/truncate", Fault::Truncate { at: 1000 }, "truncated", 3),
        ("/p/flip", Fault::FlipByte { at: 7 }, "checksum-mismatch", 3),
        ("/p/wrongdigest", Fault::WrongDigest, "checksum-mismatch", 3),
        ("/p/403", Fault::Status { code: 403 }, "auth", 1),
        ("/p/downgrade", Fault::RedirectHttp, "redirect-refused", 1),
    ];
    for (path, fault, kind, attempts) in cases {
        s.upload(path, &data(150_000, 9)).await;
        s.sim.add_fault(path, fault, None);
        let Err(failed) = s.copy(&engine, &cfg, path, None).await else {
            panic!("{path}: copied despite the fault")
        };
        assert_eq!(failed.error.kind(), kind, "{path}: {}", failed.error);
        assert_eq!(failed.attempts, attempts, "{path}");
        assert!(
            !s.download().join(&path[1..]).exists(),
            "{path}: nothing at the final path"
        );
    }
    let missing = s
        .copy(&engine, &cfg, "/p/never-uploaded", None)
        .await
        .unwrap_err();
    assert!(matches!(missing.error, TransferError::NotFound { .. }));
    assert_eq!(missing.attempts, 3, "404 is retried (not committed yet)");
    s.assert_no_part_files();
}

#[tokio::test]
async fn upload_directory_flow_404_until_commit_then_success() {
    let s = Setup::new().await;
    let cfg = s.config(Auth::Token, "retrytimes = 10\nretryseconds = 1");
    let engine = s.engine(&cfg);
    s.sim
        .add_fault("/srm/run042.root", Fault::UploadDir { seconds: 2 }, None);
    let body = data(64_000, 3);
    s.upload("/srm/run042.root", &body).await;
    let done = s
        .copy(&engine, &cfg, "/srm/run042.root", Some(body.len() as u64))
        .await
        .unwrap();
    assert!(done.attempts > 1, "the first attempt met a 404");
    assert_eq!(
        std::fs::read(s.download().join("srm/run042.root")).unwrap(),
        body
    );
    let msgs = s.sim.billing_messages();
    assert!(
        msgs.iter().any(|m| m.contains("\"/upload/")),
        "transferPath under /upload"
    );
}

#[tokio::test]
async fn digest_from_head_when_the_pool_sends_none_and_307_redirects() {
    let s = Setup::with(|c| {
        c.digest_on_get = false;
        c.redirect_status = 307;
    })
    .await;
    let cfg = s.config(Auth::Proxy, "");
    let engine = s.engine(&cfg);
    let body = data(10_001, 4);
    s.upload("/h/f", &body).await;
    let done = s.copy(&engine, &cfg, "/h/f", None).await.unwrap();
    assert_eq!(done.verified.len(), 1);
    s.sim.add_fault("/h/g", Fault::WrongDigest, None);
    s.upload("/h/g", &body).await;
    let failed = s.copy(&engine, &cfg, "/h/g", None).await.unwrap_err();
    assert_eq!(
        failed.error.kind(),
        "checksum-mismatch",
        "HEAD's digest is used and checked"
    );
}

#[tokio::test]
async fn empty_and_odd_files() {
    let s = Setup::new().await;
    let cfg = s.config(Auth::Proxy, "");
    let engine = s.engine(&cfg);
    s.upload("/o/empty", b"").await;
    let done = s.copy(&engine, &cfg, "/o/empty", Some(0)).await.unwrap();
    assert_eq!(done.size, 0);
    assert_eq!(
        std::fs::metadata(s.download().join("o/empty"))
            .unwrap()
            .len(),
        0
    );
    let body = data(1, 5);
    s.upload("/o/été +?", &body).await;
    s.copy(&engine, &cfg, "/o/été +?", Some(1)).await.unwrap();
    assert_eq!(std::fs::read(s.download().join("o/été +?")).unwrap(), body);
    let wrong_size = s
        .copy(&engine, &cfg, "/o/empty", Some(5))
        .await
        .unwrap_err();
    assert_eq!(wrong_size.error.kind(), "size-mismatch");
}

#[tokio::test]
async fn credentials_problems_are_clear_and_not_retried() {
    let s = Setup::new().await;
    s.upload("/c/f", b"abc").await;
    let cfg = s.config(Auth::BadToken, "");
    let engine = s.engine(&cfg);
    let failed = s.copy(&engine, &cfg, "/c/f", None).await.unwrap_err();
    assert_eq!(failed.attempts, 1, "401 is not retried");
    let msg = failed.error.to_string();
    assert!(msg.contains("401") && msg.contains("bearer token"), "{msg}");
    assert!(
        !msg.contains("not-a-valid-token"),
        "the token never appears in errors"
    );

    // An expired proxy is refused when loading, naming the file and the date.
    let mut cfg = s.config(Auth::Proxy, "");
    cfg.local.auth.proxy[0].path = s.sim.pki.expired_proxy.clone();
    let err = Credentials::load(&cfg.local.auth).unwrap_err().to_string();
    assert!(
        err.contains("expired") && err.contains("x509up-expired"),
        "{err}"
    );

    // A CA folder that does not hold the door's CA: refused at once, naming the folder.
    let other = Setup::new().await;
    let mut cfg = s.config(Auth::Token, "");
    cfg.local.auth.capath.path = other.sim.pki.capath.clone();
    let engine = s.engine(&cfg);
    let failed = s.copy(&engine, &cfg, "/c/f", None).await.unwrap_err();
    assert_eq!(failed.error.kind(), "tls", "{:?}", failed.error);
    assert_eq!(failed.attempts, 1);
    assert!(failed.error.to_string().contains("not trusted"));
}

#[tokio::test]
async fn ecdsa_pkcs8_proxies_work_too() {
    let s = Setup::with(|c| c.proxy_key = ProxyKey::EcdsaPkcs8).await;
    let key = std::fs::read_to_string(&s.sim.pki.proxy).unwrap();
    assert!(key.contains("BEGIN PRIVATE KEY"));
    let rsa = Setup::new().await;
    assert!(std::fs::read_to_string(&rsa.sim.pki.proxy)
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    s.upload("/e/f", b"ecdsa").await;
    let cfg = s.config(Auth::Proxy, "");
    let engine = s.engine(&cfg);
    s.copy(&engine, &cfg, "/e/f", None).await.unwrap();
}

#[tokio::test]
async fn a_file_without_checksum_fails_unless_size_only_is_allowed() {
    let s = Setup::with(|c| c.checksums = false).await;
    let body = data(4_000, 6);
    s.upload("/n/f", &body).await;
    let cfg = s.config(Auth::Token, "");
    let failed = s
        .copy(&s.engine(&cfg), &cfg, "/n/f", None)
        .await
        .unwrap_err();
    assert_eq!(failed.error.kind(), "no-checksum");
    assert_eq!(failed.attempts, 1);
    assert!(!s.download().join("n/f").exists());
    let cfg = s.config(Auth::Token, "requirechecksum = false");
    let done = s
        .copy(&s.engine(&cfg), &cfg, "/n/f", Some(4_000))
        .await
        .unwrap();
    assert!(done.verified.is_empty(), "size check only");
    assert_eq!(std::fs::read(s.download().join("n/f")).unwrap(), body);
    s.assert_no_part_files();
}

/// Issue 14, item 2: a dCache file named `.x.dcflow-part` was `x`'s temporary path, and two
/// long names whose adler32 collide shared one temporary file. Copied at the same time over a slow link,
/// each must land with its own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_named_like_each_others_temporary_files_each_land_with_their_own_bytes() {
    use dcache_sim::Fault;
    let s = Setup::new().await;
    // Two names over 240 bytes with one adler32 (`…1221` and `…2112`), and `x` beside a file
    // called `.x.dcflow-part`. Sizes so that the file whose temporary path another one
    // shared finishes last.
    let long = "x".repeat(240);
    let names = [
        "x".to_owned(),
        ".x.dcflow-part".to_owned(),
        format!("{long}1221"),
        format!("{long}2112"),
    ];
    let sizes = [700_000, 600_000, 600_000, 650_000];
    let mut bodies = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let body = data(sizes[i], 40 + i as u8);
        let door = format!("/d/{n}");
        s.upload(&door, &body).await;
        s.sim.add_fault(
            &door,
            Fault::SlowLink {
                bytes_per_second: 1_000_000,
            },
            None,
        );
        bodies.push((door, body));
    }
    let cfg = s.config(Auth::Token, "");
    let engine = s.engine(&cfg);
    let copies = bodies
        .iter()
        .map(|(door, body)| s.copy(&engine, &cfg, door, Some(body.len() as u64)));
    for result in futures_util::future::join_all(copies).await {
        result.unwrap();
    }
    for (n, (_, body)) in names.iter().zip(&bodies) {
        let got = std::fs::read(s.download().join("d").join(n)).unwrap();
        assert!(got == *body, "{n} holds other bytes than its own");
    }
    let mut left: Vec<String> = walk(&s.download())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want = names.to_vec();
    want.sort();
    assert_eq!(left, want, "only the four files, no temporary or lock file");
}

/// Issue 14, item 1, inside one process: two engines (as a `run` and a `replay`) copy one file
/// at the same time; the second waits for the first and finds its verified copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_copying_one_file_take_turns_and_publish_it_whole() {
    use dcache_sim::Fault;
    let s = Setup::new().await;
    let body = data(3_000_000, 9);
    s.upload("/d/big", &body).await;
    s.sim.add_fault(
        "/d/big",
        Fault::SlowLink {
            bytes_per_second: 3_000_000,
        },
        None,
    );
    let cfg = s.config(Auth::Token, "");
    let (one, two) = (s.engine(&cfg), s.engine(&cfg));
    let first = s.copy(&one, &cfg, "/d/big", Some(body.len() as u64));
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        s.copy(&two, &cfg, "/d/big", Some(body.len() as u64)).await
    };
    let (a, b) = tokio::join!(first, second);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(std::fs::read(s.download().join("d/big")).unwrap() == body);
    assert!(!a.already_present);
    assert!(
        b.already_present,
        "the second copier found the first one's copy"
    );
    assert_eq!(s.sim.pool_gets(), 1, "one transfer");
    s.assert_no_part_files();
    let left: Vec<_> = walk(&s.download())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("dcflow-lock"))
        .collect();
    assert!(left.is_empty(), "lock files left: {left:?}");
}

/// The engine's settings from a test configuration (what dcflow-workflow's
/// `engine_settings` does: the engine knows no `Config`).
fn settings(c: &Config) -> EngineSettings {
    EngineSettings {
        checksums: c.dcache.checksums.clone(),
        require_checksum: c.dcache.require_checksum,
        timeout: c.dcache.timeout,
        stall_timeout: c.dcache.stall_timeout,
        retry: c.dcache.retry,
        permissions: c.local.permissions,
        download_folder: c.local.download_folder.clone(),
        api_origins: vec![c.dcache.url.origin()],
    }
}
