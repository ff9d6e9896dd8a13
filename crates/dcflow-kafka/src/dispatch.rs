//! The dispatch loop (`dcflow dispatch`): scale-out beyond dCache's single billing partition.
//!
//! Consumes the billing topic (group `<consumergroup>-dispatch`), keeps the messages that
//! announce an upload under `pool + folder`, and produces each, unchanged, to the work topic
//! keyed by pnfsid (so both messages of one upload reach the same worker, which merges them).
//! Any number of `dcflow run` workers consume the work topic in `consumergroup`. A billing
//! offset is committed only when its message was skipped or acknowledged by the broker on
//! the work topic: the same watermark rule on both hops.

use std::sync::Arc;
use std::time::Duration;

use crate::{CommitMode, KafkaSource, Received, TopicProducer};
use anyhow::{Context, Result};
use dcflow_core::config::KafkaConfig;
use dcflow_core::workflow::EventKind;
use dcflow_core::{Config, PathMapper, Record, RecordFile, Selector, Sorted};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Produces awaiting the broker's acknowledgement at once.
const MAX_OUTSTANDING: usize = 1000;

#[derive(Debug, Default, Clone, Copy)]
pub struct DispatchSummary {
    pub consumed: u64,
    pub forwarded: u64,
    pub malformed: u64,
}

/// Runs until `shutdown`, or, with `until_caught_up`, until every assigned partition has been
/// read to its end (then waits for the work topic's acknowledgements and commits).
// Long on purpose: one consuming loop whose select arms share the in-flight produces, the
// watermarks and the ticks.
pub async fn dispatch(
    config: &Config,
    kafka: &KafkaConfig,
    shutdown: CancellationToken,
    until_caught_up: bool,
) -> Result<DispatchSummary> {
    let work_topic = kafka
        .work_topic
        .as_deref()
        .context("dispatch needs [kafka] worktopic")?;
    let group = format!("{}-dispatch", kafka.consumer_group);
    // Outages are told once (and their end), as `run` tells them.
    let health = Arc::new(dcflow_core::Health::new(config.outage_grace));
    let source = Arc::new(KafkaSource::try_new(
        kafka,
        &kafka.topic,
        &group,
        until_caught_up,
        Some(health),
    )?);
    // The group is joined on librdkafka's threads meanwhile (both take tens of ms).
    TopicProducer::ensure_topic(kafka, work_topic, kafka.work_partitions)
        .await
        .with_context(|| format!("creating work topic {work_topic}"))?;
    let producer = Arc::new(TopicProducer::try_new(kafka, work_topic)?);
    let mapper = PathMapper::new(&config.dcache, config.local.download_folder.clone());
    // Removes, restores and stores go to the workers too when a workflow takes them.
    let other_types: Vec<&'static str> = config
        .workflows()
        .iter()
        .flat_map(|w| w.matcher.kinds.iter().copied())
        .filter(|k| *k != EventKind::Upload)
        .map(EventKind::as_str)
        .collect();
    let selector = Selector::new(mapper.prefix()).also(&other_types);
    let failures = RecordFile::open(&config.local.failed_file)?;
    // The produces awaiting the broker, polled by this loop (no task per message).
    let mut sends = FuturesUnordered::new();
    let mut summary = DispatchSummary::default();
    let mut commit_tick = tokio::time::interval(Duration::from_secs(1));
    info!(from = %kafka.topic, to = work_topic, partitions = kafka.work_partitions, group, "dispatching");
    let mut incoming = source.incoming();
    let dismiss = |raw: &[u8]| selector.dismisses(raw);
    loop {
        let delivery = tokio::select! {
            received = incoming.next(dismiss) => match received {
                Ok(Received::Work(d)) => d,
                Ok(Received::Dismissed { count }) => {
                    summary.consumed += u64::from(count);
                    continue;
                }
                Ok(Received::NotOwned) => continue,
                Ok(Received::End { .. }) => {
                    if until_caught_up && incoming.caught_up() {
                        info!("caught up: every assigned partition read to its end");
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    source.report(&e);
                    continue;
                }
            },
            Some(()) = sends.next(), if !sends.is_empty() => continue,
            _ = commit_tick.tick() => {
                if let Err(e) = source.commit(CommitMode::Async) {
                    warn!(error = %e, "commit failed; retried at the next tick");
                }
                continue;
            }
            _ = shutdown.cancelled() => break,
        };
        summary.consumed += 1;
        let origin = || delivery.origin().to_string();
        let decoded = selector.sort(&delivery.payload).map(|sorted| match sorted {
            Sorted::Candidate(msg) => Some(msg),
            Sorted::Skip(_) => None,
        });
        let key = match decoded {
            Err(e) => {
                summary.malformed += 1;
                warn!(origin = %origin(), error = %e, "malformed billing message skipped");
                if let Err(e) =
                    failures.append(&Record::malformed(&origin(), &e, &delivery.payload))
                {
                    warn!(error = %e, "cannot write failure record");
                }
                None
            }
            // Unsafe paths are forwarded too: the worker records them as failures.
            Ok(Some(msg)) => match msg.upload() {
                Ok(up) => Some(up.pnfsid.to_string()),
                Err(_) if other_types.contains(&msg.msg_type.as_str()) && msg.status.code == 0 => {
                    msg.pnfsid().map(ToString::to_string)
                }
                Err(_) => None,
            },
            Ok(None) => None,
        };
        let Some(key) = key else {
            source.finish(&delivery.ticket);
            continue;
        };
        summary.forwarded += 1;
        debug!(pnfsid = %key, "forwarding");
        while sends.len() >= MAX_OUTSTANDING {
            tokio::select! {
                _ = sends.next() => {}
                _ = shutdown.cancelled() => {
                    // Not forwarded: the watermark stays before it, so it is dispatched again.
                    break;
                }
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        let (source, producer) = (source.clone(), producer.clone());
        sends.push(async move {
            // Retried until the broker takes it: the billing offset must not be committed
            // before the task is safely on the work topic.
            loop {
                match producer.send(Some(&key), &delivery.payload).await {
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, pnfsid = %key, "cannot produce to the work topic; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            source.finish(&delivery.ticket);
        });
    }
    info!(
        outstanding = sends.len(),
        "stopping: waiting for the work topic to acknowledge"
    );
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while sends.next().await.is_some() {}
    })
    .await;
    if let Err(e) = source.commit(CommitMode::Sync) {
        warn!(error = %e, "final commit failed: the last messages will be dispatched again");
    }
    Ok(summary)
}
