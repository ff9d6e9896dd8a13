//! Feeding a pipeline from a finite source (`replay`, `retry`, `sync`): [`Batch`] runs
//! messages as they come, bounded by the transfer slots, and sums up in a [`Summary`].

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::admission::Admission;
use crate::pipeline::{FileOutcome, Pipeline, Unrecorded};
use crate::stats::Stats;

/// The end of a run: what `replay`, `retry`, `demo` and a stopped daemon print.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub events: u64,
    pub selected: u64,
    pub copied: u64,
    pub already_present: u64,
    pub failed: u64,
    pub skipped: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub bytes: u64,
}

impl Summary {
    pub fn of(stats: &Stats) -> Self {
        let g = Stats::get;
        Self {
            events: g(&stats.events),
            selected: g(&stats.selected),
            copied: g(&stats.copied),
            already_present: g(&stats.already_present),
            failed: g(&stats.failed),
            skipped: g(&stats.not_upload) + g(&stats.outside_folder),
            duplicates: g(&stats.duplicates),
            malformed: g(&stats.malformed),
            bytes: g(&stats.bytes),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages: {} files selected, {} copied ({}), {} already present, {} failed; {} skipped, {} duplicates merged, {} malformed",
            self.events,
            self.selected,
            self.copied,
            dcflow_transfer::engine::human_bytes(self.bytes),
            self.already_present,
            self.failed,
            self.skipped,
            self.duplicates,
            self.malformed
        )
    }
}

/// Runs messages through the pipeline as they come: a transfer slot is taken before a copy
/// starts, so the producer of messages waits while all slots are busy.
pub struct Batch {
    pipeline: Arc<Pipeline>,
    tasks: JoinSet<Result<FileOutcome, Unrecorded>>,
}

impl Batch {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self {
            pipeline,
            tasks: JoinSet::new(),
        }
    }

    pub async fn push(&mut self, raw: &[u8], origin: &str) -> Result<()> {
        // A merged message needs no acknowledgement here: the batch waits for every copy.
        if let Admission::Run(task) = self.pipeline.admit(raw, origin).await {
            let p = self.pipeline.clone();
            self.tasks.spawn(async move { p.run(task).await });
        }
        while let Some(done) = self.tasks.try_join_next() {
            let _recorded_or_halted = done.context("copy task panicked")?;
        }
        self.halted()
    }

    /// An error once an outcome could not be recorded.
    fn halted(&self) -> Result<()> {
        match self.pipeline.halted() {
            Some(why) => anyhow::bail!("stopped: an outcome could not be recorded ({why})"),
            None => Ok(()),
        }
    }

    /// Waits for every copy, then sums up.
    pub async fn finish(mut self) -> Result<Summary> {
        while let Some(done) = self.tasks.join_next().await {
            let _recorded_or_halted = done.context("copy task panicked")?;
        }
        self.halted()?;
        self.pipeline
            .sync_records()
            .map_err(|e| anyhow::anyhow!("the records are not durable: {e}"))?;
        Ok(Summary::of(&self.pipeline.stats))
    }
}
