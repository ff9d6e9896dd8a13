//! `dcflow retry`: re-run recorded failures through the same pipeline, from the failure CSV
//! or from the dead-letter topic.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dcflow_core::config::KafkaConfig;
use dcflow_core::{Record, RecordFile};
use tracing::{info, warn};

use dcflow_workflow::{Batch, Pipeline, Summary};

use super::{finish_batch, load_config, load_pipeline, Failure};

/// A billing message equivalent to a recorded failure: a completed pool upload of that
/// pnfsid, path and size. `None` for rows without both (malformed messages: their text is
/// in the error column, and the dead-letter topic keeps them whole).
pub fn upload_message(r: &Record) -> Option<Vec<u8>> {
    if r.pnfsid.is_empty() || r.billing_path.is_empty() {
        return None;
    }
    Some(dcflow_core::upload_message(
        "retry",
        &r.pnfsid,
        &r.billing_path,
        r.size,
    ))
}

pub async fn retry_csv(pipeline: Arc<Pipeline>, csv: &Path) -> Result<Summary> {
    let rows = RecordFile::read_all(csv).with_context(|| format!("reading {}", csv.display()))?;
    let mut batch = Batch::new(pipeline);
    let mut unusable = 0;
    for (i, row) in rows.iter().enumerate() {
        match upload_message(row) {
            Some(msg) => {
                batch
                    .push(&msg, &format!("{} row {}", csv.display(), i + 2))
                    .await?
            }
            None => unusable += 1,
        }
    }
    if unusable > 0 {
        warn!(
            rows = unusable,
            "rows without pnfsid and path (malformed messages) cannot be re-run from the CSV"
        );
    }
    batch.finish().await
}

pub async fn retry_dead_letters(pipeline: Arc<Pipeline>, kafka: &KafkaConfig) -> Result<Summary> {
    let topic = kafka
        .dead_letter_topic
        .clone()
        .context("no [kafka] deadlettertopic configured")?;
    let cfg = kafka.clone();
    let letters = tokio::task::spawn_blocking(move || {
        dcflow_kafka::read_topic(&cfg, &topic, Duration::from_secs(30))
    })
    .await?
    .context("reading the dead-letter topic")?;
    info!(letters = letters.len(), "re-running dead letters");
    let mut batch = Batch::new(pipeline);
    for (i, letter) in letters.iter().enumerate() {
        let event = serde_json::from_slice::<serde_json::Value>(letter)
            .ok()
            .and_then(|v| v.get("event").cloned())
            .map(|e| match e {
                serde_json::Value::String(s) => s.into_bytes(),
                other => serde_json::to_vec(&other).expect("JSON"),
            })
            .unwrap_or_else(|| letter.clone());
        batch
            .push(&event, &format!("dead letter {}", i + 1))
            .await?;
    }
    batch.finish().await
}

/// `dcflow retry`: a failure CSV's rows, or the dead-letter topic.
pub async fn command(
    config: &Path,
    failures: Option<&Path>,
    dead_letters: bool,
) -> Result<(), Failure> {
    // Retrying the configured failure file: its rows are moved aside first, so that the file
    // then holds what still fails, not the old rows and their new twins.
    let moved = match failures {
        Some(csv) => move_aside_if_recording(&load_config(config)?, csv)?,
        None => None,
    };
    let (cfg, pipeline) = load_pipeline(config, None).await?;
    let result = match (moved.as_deref().or(failures), cfg.kafka.as_ref()) {
        (Some(csv), _) => retry_csv(pipeline.clone(), csv).await,
        (None, Some(kafka)) if dead_letters => retry_dead_letters(pipeline.clone(), kafka).await,
        _ => Err(anyhow::anyhow!(
            "--dead-letters needs a [kafka] section with deadlettertopic"
        )),
    };
    finish_batch(result, &pipeline)
}

/// When `csv` is the configured failure file, renames it to `<name>.retried-<unix time>` and
/// returns the new name; a new failure file is then opened by the pipeline.
fn move_aside_if_recording(
    cfg: &dcflow_core::Config,
    csv: &Path,
) -> Result<Option<std::path::PathBuf>, Failure> {
    let same = match (csv.canonicalize(), cfg.local.failed_file.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Ok(None);
    }
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut name = csv.as_os_str().to_owned();
    name.push(format!(".retried-{stamp}"));
    let aside = std::path::PathBuf::from(name);
    std::fs::rename(csv, &aside).map_err(|e| {
        Failure::setup(
            "dcflow retry",
            anyhow::anyhow!(
                "cannot move {} aside to {}: {e}",
                csv.display(),
                aside.display()
            ),
        )
    })?;
    println!(
        "retrying the rows of {} (moved aside from {}, which now records what still fails)",
        aside.display(),
        csv.display()
    );
    Ok(Some(aside))
}
