//! `dcflow check-config`: validate a configuration and say, on one screen, what will happen.

use std::fmt::Write as _;

use dcflow_core::config::Origin;
use dcflow_core::Config;
use dcflow_transfer::Credentials;

use super::{load_config, Failure};

/// The summary, or the list of problems (configuration first, then credentials).
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
pub fn command(config: &std::path::Path) -> Result<(), Failure> {
    let cfg = load_config(config)?;
    match check(&cfg, config) {
        Ok(summary) => {
            print!("{summary}");
            Ok(())
        }
        Err(problems) => Err(Failure::setup(
            "dcflow",
            anyhow::anyhow!(
                "{}:\n{}",
                config.display(),
                problems
                    .iter()
                    .map(|p| format!("  {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        )),
    }
}
