//! `dcflow run` with the `[kafka]` source: consume, copy, commit contiguous offsets, drain on
//! SIGTERM.
//!
//! A transfer slot is made free before the next message is pulled; while all slots are
//! busy the partitions are paused and the consumer keeps polling (heartbeats, rebalances),
//! so a long transfer neither drops the consumer out of its group nor grows a queue beyond
//! the batch already taken from librdkafka (at most 1,024 messages, kept in `backlog`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dcflow_core::config::KafkaConfig;
use dcflow_kafka::{CommitMode, Delivery, KafkaSource, Received};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use dcflow_workflow::{Admission, Pipeline, Summary};
use std::path::Path;

use super::{load_pipeline, Failure};
use crate::daemon::Daemon;

const COMMIT_EVERY: Duration = Duration::from_secs(1);
const LAG_EVERY: Duration = Duration::from_secs(15);
/// How long to wait for a transfer slot before pausing the partitions.
const PAUSE_AFTER: Duration = Duration::from_secs(2);
/// While messages flow, clocks (commit, lag), the stop signal and finished tasks are looked
/// at once per this many messages: reading clocks for every message costs more than
/// dismissing the message itself.
const CHECK_EVERY: u32 = 256;

// Long on purpose: one consuming loop whose arms share the backlog, the tasks, the ticks and
// the pause state; each arm is short and the order of the checks matters.
pub async fn run_kafka(
    pipeline: Arc<Pipeline>,
    cfg: &KafkaConfig,
    shutdown: CancellationToken,
    drain: Duration,
    until_caught_up: bool,
) -> Result<Summary> {
    // With a work topic, `dcflow dispatch` feeds it and workers consume it.
    let topic = cfg.work_topic.as_deref().unwrap_or(&cfg.topic);
    let source = Arc::new(
        KafkaSource::try_new(
            cfg,
            topic,
            &cfg.consumer_group,
            until_caught_up,
            Some(pipeline.health.clone()),
        )
        .context("creating the Kafka consumer")?,
    );
    // An offset is committed only once the records of the work it covers are durable.
    let records = pipeline.clone();
    source.set_before_commit(Box::new(move || records.sync_records()));
    // A record that cannot be written stops the source, as a stop signal does.
    let shutdown = pipeline.stop_token(&shutdown);
    info!(topic, group = %cfg.consumer_group, servers = %cfg.servers.join(","), "consuming");
    *pipeline.activity.source.lock().expect("activity lock") = format!(
        "Kafka topic {topic}, group {}, brokers {}",
        cfg.consumer_group,
        cfg.servers.join(",")
    );
    let mut tasks = JoinSet::new();
    let mut backlog: VecDeque<Delivery> = VecDeque::new();
    let mut commit_tick = tokio::time::interval(COMMIT_EVERY);
    let mut last_commit = Instant::now();
    // The first lag reading comes a few seconds in, once partitions are assigned.
    // (checked: the monotonic clock starts at boot, and a unit may start just after it).
    let mut last_lag = Instant::now()
        .checked_sub(LAG_EVERY - Duration::from_secs(3))
        .unwrap_or_else(Instant::now);
    // Wakes the loop when no message comes, for the checks below.
    let mut idle = std::pin::pin!(tokio::time::sleep(COMMIT_EVERY));
    let mut unchecked = CHECK_EVERY;
    let mut incoming = source.incoming();
    let dismiss = |raw: &[u8]| pipeline.dismisses(raw);

    'consume: loop {
        unchecked += 1;
        if unchecked >= CHECK_EVERY {
            unchecked = 0;
            while tasks.try_join_next().is_some() {}
            if shutdown.is_cancelled() {
                break;
            }
            if last_commit.elapsed() >= COMMIT_EVERY {
                commit(&source, CommitMode::Async);
                last_commit = Instant::now();
            }
            pipeline.activity.set_ready(source.assigned() > 0);
            if last_lag.elapsed() >= LAG_EVERY {
                log_lag(&source, &pipeline);
                last_lag = Instant::now();
            }
        }
        // All slots busy: a slot usually frees within moments. Only a longer wait pauses
        // the partitions (pausing makes librdkafka drop what it prefetched, and resuming
        // fetches it again), while polling goes on so the consumer stays in its group.
        if pipeline.free_slots() == 0
            && tokio::time::timeout(PAUSE_AFTER, pipeline.wait_for_slot())
                .await
                .is_err()
        {
            match source.pause() {
                Ok(()) => debug!("every transfer slot busy for {PAUSE_AFTER:?}: fetching paused"),
                Err(e) => warn!(error = %e, "cannot pause partitions"),
            }
            loop {
                tokio::select! {
                    _ = pipeline.wait_for_slot() => break,
                    received = incoming.next(dismiss) => match received {
                        Ok(Received::Work(d)) => backlog.push_back(d),
                        Ok(Received::Dismissed { count }) => pipeline.dismissed(count),
                        Ok(Received::NotOwned | Received::End { .. }) => {}
                        Err(e) => source.report(&e),
                    },
                    // Busy from the start (a backlog): ready all the same once assigned.
                    _ = commit_tick.tick() => {
                        commit(&source, CommitMode::Async);
                        pipeline.activity.set_ready(source.assigned() > 0);
                        // The lag shown must not stay at a figure from before the pause.
                        if last_lag.elapsed() >= LAG_EVERY {
                            log_lag(&source, &pipeline);
                            last_lag = Instant::now();
                        }
                    }
                    _ = shutdown.cancelled() => break 'consume,
                }
            }
            match source.resume() {
                Ok(()) => debug!(
                    backlog = backlog.len(),
                    "a transfer slot is free: fetching resumed"
                ),
                Err(e) => warn!(error = %e, "cannot resume partitions"),
            }
        }
        let delivery = match backlog.pop_front() {
            Some(d) => d,
            None => tokio::select! {
                biased;
                received = incoming.next(dismiss) => match received {
                    Ok(Received::Work(d)) => d,
                    Ok(Received::Dismissed { count }) => {
                        pipeline.dismissed(count);
                        // A run of dismissed messages counts as that many for the checks.
                        unchecked += count;
                        continue;
                    }
                    Ok(Received::NotOwned) => continue,
                    Ok(Received::End { .. }) => {
                        if until_caught_up && backlog.is_empty() && incoming.caught_up() {
                            info!("caught up: every assigned partition read to its end");
                            break 'consume;
                        }
                        continue;
                    }
                    Err(e) => {
                        // Broker outages: librdkafka reconnects; told once, then go on.
                        source.report(&e);
                        continue;
                    }
                },
                // Nothing to read: wake up now and then for commits and lag.
                _ = &mut idle => {
                    idle.as_mut().reset(tokio::time::Instant::now() + COMMIT_EVERY);
                    unchecked = CHECK_EVERY;
                    continue;
                }
                _ = shutdown.cancelled() => break 'consume,
            },
        };
        match pipeline.admit(&delivery.payload, &delivery.origin()).await {
            // An event whose outcome could not be recorded is never finished: its offset, and
            // every later one of its partition, stays uncommitted.
            Admission::Run(task) => {
                let (p, s) = (pipeline.clone(), source.clone());
                tasks.spawn(async move {
                    if p.run(task).await.is_ok() {
                        s.finish(&delivery.ticket);
                    }
                });
            }
            Admission::Merged(merged) => {
                let s = source.clone();
                tasks.spawn(async move {
                    if merged.wait().await {
                        s.finish(&delivery.ticket);
                    }
                });
            }
            Admission::Skip => source.finish(&delivery.ticket),
            Admission::Unrecorded => {}
        }
    }

    info!(
        in_flight = tasks.len(),
        drain_seconds = drain.as_secs(),
        "stopping: no new messages; letting transfers finish"
    );
    let drained =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            unfinished = tasks.len(),
            "drain deadline reached: unfinished transfers are abandoned and will be redelivered"
        );
        tasks.shutdown().await;
    }
    match source.commit(CommitMode::Sync) {
        Ok(c) => info!(committed = ?c, "final commit"),
        Err(e) => warn!(error = %e, "final commit failed: the last messages will be redelivered"),
    }
    if let Some(why) = pipeline.halted() {
        anyhow::bail!(
            "stopped because an outcome could not be recorded ({why}); nothing after it was \
             committed: free the space (or fix the record folder) and start again"
        );
    }
    Ok(Summary::of(&pipeline.stats))
}

fn commit(source: &KafkaSource, mode: CommitMode) {
    if let Err(e) = source.commit(mode) {
        warn!(error = %e, "commit failed; retried at the next tick");
    }
}

fn log_lag(source: &KafkaSource, pipeline: &Pipeline) {
    let lag = source.lag();
    pipeline.stats.set_lag(&lag);
    let in_flight = source.in_flight();
    for (partition, behind) in lag {
        info!(partition, lag = behind, in_flight, "consumer lag");
    }
}

/// `dcflow run`: the daemon, on the configured source, until a stop signal (or caught up).
pub async fn command(
    config: &Path,
    drain_seconds: u64,
    until_caught_up: bool,
) -> Result<(), Failure> {
    let daemon = Daemon::start();
    let result = run(
        config,
        &daemon,
        Duration::from_secs(drain_seconds),
        until_caught_up,
    )
    .await;
    daemon.finish().await;
    result
}

async fn run(
    config: &Path,
    daemon: &Daemon,
    drain: Duration,
    until_caught_up: bool,
) -> Result<(), Failure> {
    let (cfg, pipeline) = load_pipeline(config, Some(daemon)).await?;
    let shutdown = daemon.stop_token();
    let result = match (cfg.kafka.clone(), cfg.sse.clone()) {
        (Some(kafka), _) => run_kafka(pipeline, &kafka, shutdown, drain, until_caught_up).await,
        (None, Some(sse)) => {
            if until_caught_up {
                eprintln!("dcflow run: --until-caught-up applies to Kafka only; ignored");
            }
            dcflow_sse::run_sse(
                pipeline,
                &sse,
                cfg.dcache.url.clone(),
                cfg.dcache.pool.clone(),
                shutdown,
                drain,
                false,
            )
            .await
        }
        (None, None) => Err(anyhow::anyhow!(
            "{} has no source: add [kafka] (dCache's billing topic) or [sse] (dCache's storage \
             events); `dcflow replay` reads a file",
            config.display()
        )),
    };
    let summary = result.map_err(|e| Failure::setup("dcflow run", e))?;
    info!("stopped: {summary}");
    Ok(())
}
