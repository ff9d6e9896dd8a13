//! `dcflow dispatch`: the billing topic's uploads onto the work topic, for many workers (the
//! loop itself is `dcflow_kafka::dispatch`).

use std::path::Path;

use super::{load_config, Failure};
use crate::daemon::Daemon;

pub async fn command(config: &Path, until_caught_up: bool) -> Result<(), Failure> {
    let cfg = load_config(config)?;
    let Some(kafka) = cfg.kafka.clone().filter(|k| k.work_topic.is_some()) else {
        return Err(Failure::setup(
            "dcflow dispatch",
            anyhow::anyhow!("{} needs [kafka] with worktopic", config.display()),
        ));
    };
    let daemon = Daemon::start();
    let result =
        dcflow_kafka::dispatch::dispatch(&cfg, &kafka, daemon.stop_token(), until_caught_up).await;
    daemon.finish().await;
    let s = result.map_err(|e| Failure::setup("dcflow dispatch", e))?;
    tracing::info!(
        consumed = s.consumed,
        forwarded = s.forwarded,
        malformed = s.malformed,
        "dispatch stopped"
    );
    Ok(())
}
