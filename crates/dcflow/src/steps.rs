//! The steps after the copy: `exec` and `webhook` (the copy and `delete-source` run in the
//! pipeline, next to the engine and the records).
//!
//! Every step sees a [`Context`]: the event's fields and what earlier steps produced. A step
//! returns `Err(StepError)`, retryable or not; [`retrying`] runs it within the workflow's
//! attempts with back-off.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use dcflow_core::workflow::{ExitCodes, Template, WebhookFormat};
use dcflow_core::RetryPolicy;
use dcflow_transfer::Credentials;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{info, warn};

/// The values templates and webhooks see, by placeholder name.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub values: BTreeMap<&'static str, String>,
}

impl Context {
    pub fn set(&mut self, key: &'static str, value: impl Into<String>) {
        self.values.insert(key, value.into());
    }

    /// Takes back the values a finished step left (from the state file).
    pub fn restore(&mut self, saved: &BTreeMap<String, String>) {
        for (k, v) in saved {
            if let Some(name) = dcflow_core::workflow::placeholder(k) {
                self.values.insert(name, v.clone());
            }
        }
    }

    pub fn render(&self, t: &Template) -> Result<String, StepError> {
        t.render(&self.values).map_err(StepError::fatal)
    }

    pub fn as_json(&self) -> serde_json::Value {
        self.values
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// Why a step did not succeed.
#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    pub retryable: bool,
}

impl StepError {
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `attempt` up to `attempts` times while its error is retryable, with the configured
/// back-off between attempts. Returns the last error and the number of attempts made.
pub async fn retrying<F, Fut>(
    label: &str,
    attempts: u32,
    policy: &RetryPolicy,
    mut attempt: F,
) -> Result<u32, (StepError, u32)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StepError>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Ok(()) => return Ok(n),
            Err(e) if e.retryable && n < attempts => {
                let wait = policy.backoff(n, &mut rand::thread_rng());
                warn!(
                    attempt = n,
                    "STEP_RUN {label} attempt {n}/{attempts} failed, retrying in {:.1} s: {e}",
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err((e, n)),
        }
    }
}

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

/// HTTP client for webhooks: TLS trusts the configured CA folder, never sends the grid proxy.
pub struct Webhooks {
    client: reqwest::Client,
}

impl Webhooks {
    pub fn try_new(creds: &Credentials) -> anyhow::Result<Self> {
        let tls =
            rustls::ClientConfig::builder_with_provider(dcflow_transfer::credentials::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(creds.roots.clone())
                .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dcflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client })
    }

    /// One POST. The idempotency key is the same for every delivery of this event to this
    /// step (pnfsid, workflow, step), so a receiver can drop repeats.
    #[allow(clippy::too_many_arguments)]
    pub async fn post(
        &self,
        ctx: &Context,
        url: &url::Url,
        format: WebhookFormat,
        headers: &BTreeMap<String, Template>,
        token_file: Option<&std::path::Path>,
        timeout: Duration,
        idempotency_key: &str,
        event: &serde_json::Value,
    ) -> Result<(), StepError> {
        let data = serde_json::json!({ "event": event, "context": ctx.as_json() });
        let (body, content_type) = match format {
            WebhookFormat::Json => (data, "application/json"),
            WebhookFormat::CloudEvent => (
                serde_json::json!({
                    "specversion": "1.0",
                    "id": idempotency_key,
                    "source": format!("dcflow/{}", ctx.values.get("workflow").map_or("", String::as_str)),
                    "type": format!("org.dcache.{}", ctx.values.get("kind").map_or("event", String::as_str)),
                    "subject": ctx.values.get("path"),
                    "time": time::OffsetDateTime::now_utc()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                    "datacontenttype": "application/json",
                    "data": data,
                }),
                "application/cloudevents+json",
            ),
        };
        let mut req = self
            .client
            .post(url.clone())
            .timeout(timeout)
            .header("Content-Type", content_type)
            .header("Idempotency-Key", idempotency_key)
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(k.as_str(), ctx.render(v)?);
        }
        if let Some(path) = token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                StepError::retry(format!("cannot read token file {}: {e}", path.display()))
            })?;
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        StepError::fatal(
                            "the webhook token holds characters not allowed in a header",
                        )
                    })?;
            value.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, value);
        }
        let shown = strip(url);
        let resp = req.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                format!("no answer within {} s", timeout.as_secs())
            } else {
                // reqwest's message can hold the URL with its query: keep only the kind.
                format!("cannot reach it: {}", e.without_url())
            };
            StepError::retry(format!("webhook {shown}: {what}"))
        })?;
        let status = resp.status();
        if status.is_success() {
            info!(url = %shown, status = status.as_u16(), "WEBHOOK {shown} answered {status}");
            return Ok(());
        }
        let message = format!("webhook {shown} answered {status}");
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(StepError::retry(message))
        } else {
            Err(StepError::fatal(message))
        }
    }
}

/// A URL without credentials or query, for logs.
fn strip(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.set_query(None);
    u.to_string()
}
