//! `dcflow status`: asks a running daemon's status endpoint and prints it for a terminal.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;
use std::path::Path;

use super::{load_config, Failure};

/// GET `http://address/status.json`.
pub async fn fetch(address: &str) -> Result<Value> {
    let url = format!("http://{address}/status.json");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let resp = client.get(&url).send().await.with_context(|| {
        format!("cannot reach {url}: is dcflow running with [metrics] address {address}?")
    })?;
    let resp = resp
        .error_for_status()
        .with_context(|| format!("{url} answered with an error"))?;
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading {url}"))?;
    serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))
}

fn human(n: f64) -> String {
    dcflow_core::text::human_bytes(n.max(0.0) as u64)
}

/// A screenful: counters, lag, transfers in flight, the last failures.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let c = &s["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "dcflow {} — {} — {}",
        s["version"].as_str().unwrap_or("?"),
        s["source"].as_str().unwrap_or("?"),
        if s["ready"].as_bool() == Some(true) {
            "connected"
        } else {
            "not connected"
        }
    );
    if let Some(ups) = s["upstreams"].as_object() {
        for (name, u) in ups {
            if u["up"].as_bool() == Some(false) {
                let _ = writeln!(
                    out,
                    "{name}: UNREACHABLE since {} ({} s): {}",
                    u["down_since"].as_str().unwrap_or("?"),
                    u["down_seconds"].as_u64().unwrap_or(0),
                    u["last_error"].as_str().unwrap_or("")
                );
            } else if let Some(e) = u["last_error"].as_str() {
                let _ = writeln!(
                    out,
                    "{name}: up; last error at {}: {e}",
                    u["last_error_time"].as_str().unwrap_or("?")
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "events {}  selected {}  copied {} ({})  already present {}  failed {}  retries {}  malformed {}",
        n("events"),
        n("selected"),
        n("copied"),
        human(n("bytes") as f64),
        n("already_present"),
        n("failed"),
        n("retries"),
        n("malformed"),
    );
    if let Some(waiting) = c["tape_waiting"].as_u64() {
        let _ = writeln!(out, "waiting for tape: {waiting}");
    }
    if let Some(lag) = s["lag"].as_object().filter(|l| !l.is_empty()) {
        let parts: Vec<String> = lag.iter().map(|(p, l)| format!("{p}: {l}")).collect();
        let _ = writeln!(
            out,
            "lag (messages behind, per partition): {}",
            parts.join(", ")
        );
    }
    let active = s["active"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "in flight: {}", active.len());
    for a in &active {
        let bytes = a["bytes"].as_f64().unwrap_or(0.0);
        let pct = a["size"]
            .as_f64()
            .filter(|s| *s > 0.0)
            .map(|s| format!("{:3.0}%", 100.0 * bytes / s))
            .unwrap_or_else(|| "   ?".into());
        let _ = writeln!(
            out,
            "  {pct} {:>10} {:7.1} Mbps  {}",
            human(bytes),
            a["mbps"].as_f64().unwrap_or(0.0),
            a["path"].as_str().unwrap_or("")
        );
    }
    let failures: Vec<&Value> = s["recent"]
        .as_array()
        .map(|r| r.iter().filter(|e| e["ok"] == false).take(10).collect())
        .unwrap_or_default();
    if !failures.is_empty() {
        let _ = writeln!(out, "recent failures:");
        for e in failures {
            let _ = writeln!(
                out,
                "  {} {}: {}",
                e["time"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or(""),
                e["error"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// `dcflow status`: exit 1 when the daemon cannot be reached.
pub async fn command(
    config: Option<&Path>,
    address: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    let address = match (address, config) {
        (Some(a), _) => a,
        (None, Some(config)) => match load_config(config)?.metrics_address {
            Some(a) => a.to_string(),
            None => {
                return Err(Failure::setup(
                    "dcflow status",
                    anyhow::anyhow!("{} has no [metrics] address", config.display()),
                ))
            }
        },
        (None, None) => {
            return Err(Failure::setup(
                "dcflow status",
                anyhow::anyhow!(
                    "which daemon? give --address HOST:PORT, or --config FILE (also \
                     $DCFLOW_CONFIG; /etc/dcflow/dcflow.toml does not exist)"
                ),
            ))
        }
    };
    let status = fetch(&address)
        .await
        .map_err(|e| Failure::work("dcflow status", e))?;
    if json {
        println!("{status}");
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}
