//! The steps of a workflow, one module per kind. Each is a method of the pipeline that the
//! executor calls in order (`Pipeline::run_step`); each sees a [`Context`] (the event's
//! fields and what earlier steps produced) and returns `Err(StepError)`, retryable or not.
//! [`retrying`] runs a step within the workflow's attempts with back-off (the copy retries
//! inside the transfer engine instead).
//!
//! ```text
//! copy           the verified, atomic copy (dcflow-transfer's Engine)
//! delete_source  the dCache file, once the local copy is checked again
//! unpack         tar / tar.gz / zip into a folder published by one rename
//! exec           a program, no shell
//! webhook        an HTTP POST of the event
//! produce        a message on a Kafka topic (through `Publish`)
//! catalog        a row in the catalog table
//! rucio          a replica in Rucio, attached to a dataset (gathered into batches)
//! slurm          a batch job, submitted and followed to its end (without a transfer slot)
//! ```

pub mod catalog;
pub mod copy;
pub mod delete_source;
pub mod exec;
pub mod produce;
pub mod rucio;
pub mod slurm;
pub mod unpack;
pub mod webhook;

use std::collections::BTreeMap;

use dcflow_core::workflow::Template;
use dcflow_core::RetryPolicy;
use tracing::warn;

pub use exec::is_secret_variable;

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

/// Why a step did not succeed, and whether another attempt may help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// The step cannot do its work for this event, and would fail again the same way: a
    /// template placeholder the event lacks, a refused argument or destination, a program's
    /// failure code, a 4xx, a copy that does not match.
    #[error("{0}")]
    Refused(String),
    /// Worth another attempt: a timeout, a 5xx or a network error, a broker or database
    /// that did not answer, a program's retry code.
    #[error("{0}")]
    Transient(String),
    /// dCache or the local file system, as the transfer engine judged it
    /// (`TransferError::is_retryable`).
    #[error("{what}{error}")]
    Transfer {
        what: &'static str,
        error: String,
        retryable: bool,
    },
}

impl StepError {
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Refused(message.into())
    }

    pub fn retry(message: impl Into<String>) -> Self {
        Self::Transient(message.into())
    }

    /// `what` (e.g. "checking the local copy before deleting: ") and the engine's error.
    pub fn transfer(what: &'static str, e: &dcflow_transfer::TransferError) -> Self {
        Self::Transfer {
            what,
            error: e.to_string(),
            retryable: e.is_retryable(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused(_) => false,
            Self::Transient(_) => true,
            Self::Transfer { retryable, .. } => *retryable,
        }
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
            Err(e) if e.is_retryable() && n < attempts => {
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

/// A templated destination, relative to the download folder, checked component by component
/// as billing paths are (no `..`, `.`, empty components, NUL, absolute paths).
pub(crate) fn relative_destination(rendered: &str) -> Result<Vec<String>, &'static str> {
    if rendered.starts_with('/') {
        return Err("an absolute path");
    }
    let mut rel = Vec::new();
    for part in rendered.split('/') {
        match part {
            "" => return Err("an empty component (// or a trailing /)"),
            "." | ".." => return Err("a . or .. component"),
            p if p.contains('\0') => return Err("a NUL byte"),
            p => rel.push(p.to_owned()),
        }
    }
    Ok(rel)
}
