//! `dcflow check-config`: validate a configuration and say, on one screen, what will happen.

use std::fmt::Write as _;

use std::path::Path;

use dcflow_core::config::Origin;
use dcflow_core::{Config, Env};
use dcflow_transfer::Credentials;

use super::Failure;

/// Every problem that would stop a run, at once: the configuration's, the credentials' (even
/// when the configuration has problems of its own), and folders that cannot be written.
pub fn problems(path: &Path) -> Result<Config, Vec<String>> {
    let (config, auth) = Config::load_checked(path, &Env::from_process());
    let mut problems: Vec<String> = match &config {
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        Ok(_) => Vec::new(),
    };
    if let Some(auth) = &auth {
        problems.extend(
            Credentials::problems(auth)
                .iter()
                .map(|e| format!("credentials: {e}")),
        );
    }
    if let Ok(c) = &config {
        problems.extend(folder_problems(c));
    }
    match config {
        Ok(c) if problems.is_empty() => Ok(c),
        _ => Err(problems),
    }
}

/// The folders a run writes to: each must exist and be writable, or be creatable (its nearest
/// existing parent writable). A run that cannot create them stops at once (exit 2).
fn folder_problems(c: &Config) -> Vec<String> {
    let parent = |p: &Path| p.parent().unwrap_or(Path::new(".")).to_path_buf();
    let l = &c.local;
    let mut folders = vec![
        ("local.downloadfolder", l.download_folder.clone()),
        ("local.successfultaskfile", parent(&l.success_file)),
        ("local.failedtasksfile", parent(&l.failed_file)),
    ];
    if !c.workflow_rules.is_empty() {
        folders.push(("local.statefile", parent(&l.state_file)));
    }
    if let Some(sse) = &c.sse {
        folders.push(("sse.statefile", parent(&sse.state_file)));
    }
    folders
        .into_iter()
        .filter_map(|(key, dir)| writable(&dir).err().map(|why| format!("{key}: {why}")))
        .collect()
}

/// Whether this user can write in `dir`, or create it.
fn writable(dir: &Path) -> Result<(), String> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a folder", at.display())),
            // Not there, or below a file: look at what is above.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match at.parent() {
                    Some(up) if !up.as_os_str().is_empty() => at = up,
                    _ => at = Path::new("."),
                }
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a NUL byte in the path", at.display()))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        return Ok(());
    }
    let uid = unsafe { libc::geteuid() };
    Err(if at == dir {
        format!("{} is not writable by this user (uid {uid})", dir.display())
    } else {
        format!(
            "{} cannot be created: {} is not writable by this user (uid {uid})",
            dir.display(),
            at.display()
        )
    })
}

/// The one-screen summary of a valid configuration.
// Long on purpose: one paragraph of the one-screen summary per configuration section, in the
// order they are printed.
pub fn check(config: &Config, path: &std::path::Path) -> Result<String, Vec<String>> {
    let creds = Credentials::load(&config.local.auth).map_err(|e| vec![e.to_string()])?;
    let d = &config.dcache;
    let l = &config.local;
    let prefix = format!("{}{}", d.pool, d.folder);
    let url_base = format!("{}{}", d.url.as_str().trim_end_matches('/'), d.folder);
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", path.display());
    let source = match &config.kafka {
        Some(k) => {
            let mut line = format!(
                "Kafka topic {:?} on {}, group {:?}, new groups start at the {} offset",
                k.topic,
                k.servers.join(", "),
                k.consumer_group,
                k.offset_reset.as_str()
            );
            if let Some(work) = &k.work_topic {
                line.push_str(&format!(
                    "\n             scale-out: dcflow dispatch forwards to {work:?} ({} partitions), dcflow run consumes it",
                    k.work_partitions
                ));
            }
            if let Some(dead) = &k.dead_letter_topic {
                line.push_str(&format!(
                    "\n             failures also go to dead-letter topic {dead:?}"
                ));
            }
            line
        }
        None => match &config.sse {
            Some(sse) => format!(
                "dCache storage events (SSE) at {}, watching {} and below; state in {}",
                sse.url,
                sse.paths.join(", "),
                sse.state_file.display()
            ),
            None => "no [kafka] or [sse] section: events come from `dcflow replay` files".into(),
        },
    };
    let _ = writeln!(out, "source:      {source}");
    let _ = writeln!(out, "selects:     completed uploads under {prefix}/");
    let _ = writeln!(out, "reads from:  {url_base}/<path below it>");
    let _ = writeln!(
        out,
        "writes to:   {}/<path below it>  (directories {:04o}, files {:04o}){}",
        l.download_folder.display(),
        l.permissions.dir_mode,
        l.permissions.file_mode,
        if l.download_folder.is_dir() {
            ""
        } else {
            "  [folder will be created]"
        }
    );
    let _ = writeln!(
        out,
        "parallelism: {} transfers; {} s per attempt, stalled after {} s without data; {} attempts, back-off from {} s",
        d.max_downloads,
        d.timeout.as_secs(),
        d.stall_timeout.as_secs(),
        d.retry.attempts(),
        d.retry.first().as_secs()
    );
    let algos: Vec<&str> = d.checksums.iter().map(|a| a.as_str()).collect();
    let _ = writeln!(
        out,
        "checksums:   {} computed while streaming, compared with dCache's ({})",
        algos.join(", "),
        if d.require_checksum {
            "required"
        } else {
            "size check if dCache has none"
        }
    );
    match &creds.proxy {
        Some(p) => {
            let i = p.info();
            let _ = writeln!(
                out,
                "auth:        X.509 proxy {} (from {}): {}, valid until {}",
                i.path.display(),
                i.origin,
                i.subject,
                i.not_after
            );
        }
        None => {
            let _ = writeln!(out, "auth:        no X.509 proxy");
        }
    }
    match &creds.token {
        Some(t) => {
            let _ = writeln!(
                out,
                "             bearer token from {} (sent to the door only)",
                t.describe()
            );
        }
        None if creds.proxy.is_none() => {
            let _ = writeln!(
                out,
                "             no bearer token either: requests are anonymous"
            );
        }
        None => {}
    }
    let origin = match &creds.capath.origin {
        Origin::Default => "default".to_owned(),
        o => o.to_string(),
    };
    let _ = writeln!(
        out,
        "trust:       {} ({origin}): {} CA files",
        creds.capath.path.display(),
        creds.ca_files
    );
    let _ = writeln!(
        out,
        "records:     {} (success), {} (failures)",
        l.success_file.display(),
        l.failed_file.display()
    );
    if let Some(t) = &config.tape {
        let _ = writeln!(
            out,
            "tape:        files on tape only are staged at {} ({} a request, kept {} s, given up after {} s){} before they are copied",
            t.api,
            t.batch,
            t.pin_lifetime.as_secs(),
            t.stage_timeout.as_secs(),
            if t.release { ", released after" } else { "" }
        );
    }
    if let Some(r) = &config.rucio {
        let _ = writeln!(
            out,
            "rucio:       {} as account {} ({:?}; tokens from {}), up to {} files a call, {} ms to gather them",
            r.url,
            r.account,
            r.auth,
            r.auth_url,
            r.batch,
            r.batch_wait.as_millis()
        );
    }
    if config
        .workflow_rules
        .iter()
        .flat_map(|w| &w.steps)
        .any(|s| matches!(s, dcflow_core::Step::Slurm(_)))
    {
        let found = |tool: &str| {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        };
        let missing: Vec<&str> = ["sbatch", "squeue", "sacct", "scontrol"]
            .into_iter()
            .filter(|t| !found(t))
            .collect();
        let conf = std::env::var("SLURM_CONF")
            .unwrap_or_else(|_| "/etc/slurm/slurm.conf (default)".into());
        let _ = if missing.is_empty() {
            writeln!(
                out,
                "slurm:       sbatch, squeue, sacct, scontrol on PATH; SLURM_CONF {conf}"
            )
        } else {
            writeln!(
                out,
                "slurm:       NOT ON PATH: {} (slurm steps submit with sbatch and follow jobs with sacct/scontrol); SLURM_CONF {conf}",
                missing.join(", ")
            )
        };
    }
    let _ = match config.metrics_address {
        Some(a) => writeln!(
            out,
            "metrics:     http://{a}/ (status page, /metrics, /healthz, /readyz: 503 after {} s of an unreachable broker, frontend or door)",
            config.outage_grace.as_secs()
        ),
        None => writeln!(out, "metrics:     not served (no [metrics] address)"),
    };
    if config.workflow_rules.is_empty() {
        let _ = writeln!(
            out,
            "workflows:   copy (implicit: every upload under the folder)"
        );
    } else {
        for (i, wf) in config.workflow_rules.iter().enumerate() {
            let label = if i == 0 {
                "workflows:  "
            } else {
                "            "
            };
            let _ = writeln!(out, "{label} {wf}");
        }
    }
    Ok(out)
}

/// `dcflow check-config`: the summary on stdout, or every problem (exit 2).
/// The door, asked once (HEAD of `url + folder`) with the configured credentials: refused
/// credentials and an untrusted certificate are problems (every transfer would fail); a door
/// that cannot be reached now is said, with its cause, but is no problem of the configuration
/// (a run retries).
async fn probe_door(config: &Config) -> Result<String, String> {
    use dcflow_transfer::TransferError as E;
    let creds = Credentials::load(&config.local.auth).map_err(|e| e.to_string())?;
    let engine = dcflow_transfer::Engine::try_new(
        dcflow_workflow::engine_settings(config),
        std::sync::Arc::new(creds),
    )
    .map_err(|e| e.to_string())?;
    let d = &config.dcache;
    let mut url = d.url.clone();
    url.set_path(&format!(
        "{}{}/",
        d.url.path().trim_end_matches('/'),
        d.folder
    ));
    match engine.probe(&url).await {
        Ok(status) => Ok(format!(
            "door:        {url} answers (HTTP {status}) to these credentials"
        )),
        Err(e @ (E::Auth { .. } | E::Tls { .. } | E::RedirectRefused { .. })) => {
            Err(format!("dcache.url: the door refuses: {e}"))
        }
        Err(e @ E::NotFound { .. }) => Ok(format!(
            "door:        {e} (the folder does not exist yet? uploads create it)"
        )),
        Err(e) => Ok(format!(
            "door:        cannot be reached now: {e} (a run retries; check the URL and the network)"
        )),
    }
}

pub async fn command(config: &std::path::Path, offline: bool) -> Result<(), Failure> {
    let listed = |problems: Vec<String>| {
        Failure::setup(
            "dcflow",
            anyhow::anyhow!(
                "{}: {} problem{}:\n{}",
                config.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems
                    .iter()
                    .map(|p| format!("  {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        )
    };
    let cfg = problems(config).map_err(listed)?;
    let mut summary = check(&cfg, config).map_err(listed)?;
    if !offline {
        let door = probe_door(&cfg).await.map_err(|p| listed(vec![p]))?;
        summary.push_str(&door);
        summary.push('\n');
    }
    print!("{summary}");
    Ok(())
}
