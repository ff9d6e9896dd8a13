//! `dcflow sync`: what dCache holds already, through the same workflows as events (see
//! `dcflow_workflow::sync`); `--then-follow` then follows new events from the moment the walk
//! began.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dcflow_core::PathMapper;
use dcflow_transfer::{Credentials, Engine};
use dcflow_workflow::sync::{dry_run, sync, Tree};
use tracing::info;

use super::{finish_batch, load_config, load_pipeline, Failure};
use crate::daemon::Daemon;

const WHO: &str = "dcflow sync";

/// `--since`: a date (`2026-12-01`, midnight UTC) or an RFC 3339 time.
pub fn parse_since(text: &str) -> Result<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    let date = time::Date::parse(
        text,
        &time::macros::format_description!("[year]-[month]-[day]"),
    )
    .with_context(|| {
        format!("--since {text:?}: not a date (2026-12-01) or a time (2026-12-01T12:00:00Z)")
    })?;
    Ok(date.midnight().assume_utc().unix_timestamp())
}

pub async fn command(
    config: &Path,
    dry: bool,
    since: Option<&str>,
    then_follow: bool,
    drain: Duration,
) -> Result<(), Failure> {
    let since = since
        .map(parse_since)
        .transpose()
        .map_err(|e| Failure::setup(WHO, e))?;
    if dry {
        return dry_run_command(config, since).await;
    }
    if then_follow {
        let daemon = Daemon::start();
        let result = follow(config, since, &daemon, drain).await;
        daemon.finish().await;
        return result;
    }
    let (cfg, pipeline) = load_pipeline(config, None).await?;
    finish_batch(
        sync(pipeline.clone(), &Tree::of(&cfg), since).await,
        &pipeline,
    )
}

/// What would be copied, from the listing and the destination's metadata; nothing is written
/// (no pipeline either: it would open the record files).
async fn dry_run_command(config: &Path, since: Option<i64>) -> Result<(), Failure> {
    let cfg = load_config(config)?;
    let creds = Credentials::load(&cfg.local.auth)
        .map_err(|e| Failure::setup(WHO, anyhow::anyhow!("loading credentials: {e}")))?;
    let engine = Engine::try_new(dcflow_workflow::engine_settings(&cfg), Arc::new(creds))
        .map_err(|e| Failure::setup(WHO, e.into()))?;
    let mapper = PathMapper::new(&cfg.dcache, cfg.local.download_folder.clone());
    let summary = dry_run(Arc::new(engine), &mapper, &Tree::of(&cfg), since, |line| {
        println!("{line}")
    })
    .await
    .map_err(|e| Failure::setup(WHO, e))?;
    println!("dry run: {summary}; nothing was written");
    Ok(())
}

/// Pins the source (Kafka: the group's position; SSE: the channel, subscribed before the
/// listing), walks, then follows as `dcflow run` does, in one process: a file uploaded during
/// the walk is both listed and announced, and the two are merged by pnfsid (handled once).
async fn follow(
    config: &Path,
    since: Option<i64>,
    daemon: &Daemon,
    drain: Duration,
) -> Result<(), Failure> {
    let (cfg, pipeline) = load_pipeline(config, Some(daemon)).await?;
    let shutdown = daemon.stop_token();
    let ended = match (cfg.kafka.clone(), cfg.sse.clone()) {
        (Some(kafka), _) => {
            let topic = kafka.work_topic.clone().unwrap_or(kafka.topic.clone());
            let (k, t) = (kafka.clone(), topic.clone());
            let pinned = tokio::task::spawn_blocking(move || {
                dcflow_kafka::pin_group(&k, &t, &k.consumer_group, Duration::from_secs(30))
            })
            .await
            .map_err(|e| Failure::setup(WHO, e.into()))?
            .map_err(|e| {
                Failure::setup(
                    WHO,
                    anyhow::anyhow!(
                        "pinning group {} on {topic}: {e} (is a dcflow of this group running? \
                         stop it first)",
                        kafka.consumer_group
                    ),
                )
            })?;
            info!(?pinned, "walking the tree; the events from here on follow");
            let synced = sync(pipeline.clone(), &Tree::of(&cfg), since)
                .await
                .map_err(|e| Failure::setup(WHO, e))?;
            println!("sync: {synced}");
            super::run::run_kafka(pipeline, &kafka, shutdown, drain, false).await
        }
        (None, Some(sse)) => {
            if since.is_some() {
                eprintln!("{WHO}: --since does not apply to the SSE source's listing; ignored");
            }
            dcflow_sse::run_sse(
                pipeline,
                &sse,
                cfg.dcache.url.clone(),
                cfg.dcache.pool.clone(),
                shutdown,
                drain,
                true,
            )
            .await
        }
        (None, None) => Err(anyhow::anyhow!(
            "--then-follow needs a source to follow: [kafka] or [sse]"
        )),
    };
    let summary = ended.map_err(|e| Failure::setup(WHO, e))?;
    info!("stopped: {summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_date_or_a_time() {
        assert_eq!(parse_since("2026-12-01").unwrap(), 1796083200);
        assert_eq!(
            parse_since("2026-12-01T12:00:00Z").unwrap(),
            1796083200 + 43200
        );
        assert!(parse_since("yesterday").is_err());
    }
}
