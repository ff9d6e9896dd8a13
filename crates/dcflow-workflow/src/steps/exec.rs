//! The `exec` step: a program run without a shell, its arguments rendered templates.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use dcflow_core::workflow::{ExitCodes, Template};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::info;

use super::{Context, StepError};

/// Environment variables that hold secrets and that `exec` children do not inherit (a step's
/// own `env` may still set them): `BEARER_TOKEN`, names ending in `_TOKEN`, and names with
/// `SECRET`, `PASSWORD` or `PASSWD` in them. Paths (`BEARER_TOKEN_FILE`, `X509_USER_PROXY`)
/// are passed on.
pub fn is_secret_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper == "BEARER_TOKEN"
        || upper.ends_with("_TOKEN")
        || ["SECRET", "PASSWORD", "PASSWD"]
            .iter()
            .any(|w| upper.contains(w))
}

/// What is kept of a program's output for the log.
const OUTPUT_LIMIT: usize = 16 * 1024;

/// Runs a program without a shell: every argument is one rendered template, so nothing in a
/// file name is ever interpreted. Stdout and stderr go to the log (the first 16 KiB of
/// each); the program is killed at the timeout.
pub async fn exec(
    ctx: &Context,
    argv: &[Template],
    env: &BTreeMap<String, Template>,
    timeout: Duration,
    codes: &ExitCodes,
) -> Result<(), StepError> {
    let args = argv
        .iter()
        .map(|t| ctx.render(t))
        .collect::<Result<Vec<_>, _>>()?;
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| StepError::fatal("empty argv"))?;
    // A file name such as `-rf` must not become an option: an argument that starts with `-`
    // only because of what was substituted into it is refused, unless a literal `--` (the
    // end of options) comes before it.
    let mut options_ended = false;
    for (i, (template, arg)) in argv.iter().zip(&args).enumerate().skip(1) {
        if template.as_str() == "--" {
            options_ended = true;
        }
        if !options_ended && arg.starts_with('-') && !template.as_str().starts_with('-') {
            return Err(StepError::fatal(format!(
                "argument {i} ({arg:?}) starts with '-' because of the file name, and {program:?} \
                 would take it as an option: put \"--\" before it in argv (or a prefix such as \"./\")"
            )));
        }
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // dcflow runs without transparent huge pages (see main.rs) and children inherit that:
    // give the site's programs the system's default back.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            Ok(())
        });
    }
    // dcflow's own secrets stay with dcflow: a token in the environment is not passed on.
    for (k, _) in std::env::vars_os() {
        if is_secret_variable(&k.to_string_lossy()) {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, ctx.render(v)?);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| StepError::fatal(format!("cannot start {program:?}: {e}")))?;
    let stdout = child.stdout.take().map(read_limited);
    let stderr = child.stderr.take().map(read_limited);
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            status.map_err(|e| StepError::retry(format!("waiting for {program:?}: {e}")))?
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(StepError::retry(format!(
                "{program:?} still running after {} s: killed",
                timeout.as_secs()
            )));
        }
    };
    // A background child of the program may keep the pipes open: do not wait for ever.
    let collect = |h: Option<tokio::task::JoinHandle<String>>| async move {
        match h {
            Some(h) => tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => String::new(),
        }
    };
    let out = collect(stdout).await;
    let err = collect(stderr).await;
    info!(program, status = %status, stdout = out.trim_end(), stderr = err.trim_end(), "EXEC {program} ended: {status}");
    match status.code() {
        Some(0) => Ok(()),
        Some(code) if codes.retry.contains(&code) => Err(StepError::retry(format!(
            "{program:?} exited with {code} (retry later): {}",
            last_line(&err)
        ))),
        Some(code) => Err(StepError::fatal(format!(
            "{program:?} exited with {code}: {}",
            last_line(&err)
        ))),
        None => Err(StepError::fatal(format!("{program:?} ended by {status}"))),
    }
}

fn read_limited<R: AsyncRead + Unpin + Send + 'static>(
    mut r: R,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        // Read to the end (a full pipe would block the program), keep the start.
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = OUTPUT_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

fn last_line(s: &str) -> &str {
    s.trim_end().lines().last().unwrap_or("")
}
