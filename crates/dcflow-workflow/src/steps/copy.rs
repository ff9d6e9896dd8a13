//! The `copy` step: the verified, atomic copy of the dCache file (dcflow-transfer's
//! `Engine::copy`), one at a time per destination, claimed in the state store so that two
//! dCache files never share one local path.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use dcflow_core::{Mapped, Record, Template};
use dcflow_transfer::engine::{human_bytes, mbps};
use dcflow_transfer::Job;
use time::OffsetDateTime;
use tracing::{error, info};

use super::{relative_destination, Context as StepContext};
use crate::admission::Subject;
use crate::pipeline::{FileOutcome, Pipeline};
use crate::stats::{Active, Stats};

impl Pipeline {
    /// The verified copy, its logs and counters; fills `record` and the context's
    /// `local_path` and `checksum`. `Err` holds the error and the attempts made.
    // Long on purpose: the copy's sequence (destination, lock, claim, already-deleted check,
    // engine, counters, record) in order, sharing its guard.
    pub(crate) async fn copy_step(
        &self,
        upload: &Subject,
        mapped: &Mapped,
        template: Option<&Template>,
        deletes_source: bool,
        ctx: &mut StepContext,
        record: &mut Record,
    ) -> Result<FileOutcome, (String, u32)> {
        let rel = match template {
            None => mapped.rel.clone(),
            Some(t) => {
                let rendered = ctx.render(t).map_err(|e| (e.to_string(), 0))?;
                relative_destination(&rendered).map_err(|why| {
                    (
                        format!("destination {rendered:?} escapes the download folder: {why}"),
                        0,
                    )
                })?
            }
        };
        let mut destination = self.engine.settings().download_folder.clone();
        destination.extend(&rel);
        record.destination = destination.display().to_string();
        ctx.set("local_path", destination.display().to_string());
        let lock = self.destination_lock(&destination);
        let guard = lock.lock().await;
        // Two dCache files mapped to one destination (a template such as "{name}"): the
        // second would silently replace the first one's copy, and with delete-source both
        // sources would go while one copy survives.
        if let Some(state) = &self.state {
            match state
                .claim(&destination, &upload.billing_path, upload.pnfsid.as_str())
                .await
            {
                Ok(None) => {}
                Ok(Some(other)) => {
                    drop(guard);
                    self.release_destination(&destination, lock);
                    return Err((
                        format!(
                            "destination {} already holds the copy of {other}: {} is not copied over it (does the destination template map two files to one path?)",
                            destination.display(),
                            upload.billing_path
                        ),
                        0,
                    ));
                }
                Err(e) => {
                    drop(guard);
                    self.release_destination(&destination, lock);
                    return Err((
                        format!("cannot claim the destination in the state file: {e:#}"),
                        0,
                    ));
                }
            }
        }
        // A workflow that deletes its sources, delivered again: the file is at its final path
        // (only verified files are ever renamed there) and dCache no longer has it.
        if deletes_source && !upload.awaits_commit {
            let present = std::fs::symlink_metadata(&destination)
                .is_ok_and(|m| m.is_file() && upload.size.is_none_or(|s| s == m.len()));
            if present && matches!(self.engine.exists(&mapped.source_url).await, Ok(false)) {
                drop(guard);
                self.release_destination(&destination, lock);
                Stats::inc(&self.stats.already_present);
                info!(destination = %destination.display(), "COPY_OVER already at its final path, and its source already deleted by this workflow");
                ctx.set("checksum", "");
                return Ok(FileOutcome::AlreadyPresent);
            }
        }
        info!(
            source = %mapped.source_url,
            destination = %destination.display(),
            awaits_commit = upload.awaits_commit,
            "COPY_INIT {} -> {}",
            mapped.source_url,
            destination.display()
        );
        let progress = Arc::new(AtomicU64::new(0));
        let job = Job {
            source: &mapped.source_url,
            rel: &rel,
            destination: &destination,
            expected_size: upload.size,
            progress: Some(&progress),
            known_checksums: &upload.listed_checksums,
        };
        let started = Instant::now();
        Stats::inc(&self.stats.transfers_started);
        self.stats.in_flight.inc();
        let id = self.activity.start(Active {
            workflow: ctx.values.get("workflow").cloned().unwrap_or_default(),
            path: upload.billing_path.clone(),
            destination: destination.display().to_string(),
            size: upload.size,
            bytes: progress.clone(),
            started,
        });
        let result = self.engine.copy(&job).await;
        self.activity.stop(id);
        self.stats.in_flight.dec();
        drop(guard);
        self.release_destination(&destination, lock);
        let attempts = match &result {
            Ok(c) => c.attempts,
            Err(f) => f.attempts,
        };
        self.stats
            .retries
            .inc_by(u64::from(attempts.saturating_sub(1)));
        match result {
            Ok(copied) => {
                record.size = Some(copied.size);
                record.checksum = copied
                    .verified
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ");
                record.attempts = copied.attempts;
                record.seconds = copied.elapsed.as_secs_f64();
                ctx.set("checksum", record.checksum.clone());
                ctx.set("size", copied.size.to_string());
                if copied.already_present {
                    Stats::inc(&self.stats.already_present);
                    info!("COPY_REPORT already present, nothing copied");
                    Ok(FileOutcome::AlreadyPresent)
                } else {
                    Stats::inc(&self.stats.copied);
                    self.stats.duration.observe(copied.elapsed.as_secs_f64());
                    self.stats
                        .last_success
                        .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
                    self.stats.bytes.inc_by(copied.size);
                    info!(
                        bytes = copied.size,
                        attempts = copied.attempts,
                        "COPY_REPORT {} copied in {} ms, {:.2} Mbps",
                        human_bytes(copied.size),
                        started.elapsed().as_millis(),
                        mbps(copied.size, started.elapsed())
                    );
                    Ok(FileOutcome::Copied)
                }
            }
            Err(failed) => {
                record.attempts = failed.attempts;
                error!(
                    attempts = failed.attempts,
                    kind = failed.error.kind(),
                    "COPY_REPORT failed after {} attempt(s): {}",
                    failed.attempts,
                    failed.error
                );
                Err((failed.error.to_string(), failed.attempts))
            }
        }
    }

    fn destination_lock(&self, dest: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.destinations
            .lock()
            .expect("destinations lock")
            .entry(dest.to_owned())
            .or_default()
            .clone()
    }

    fn release_destination(&self, dest: &Path, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.destinations.lock().expect("destinations lock");
        drop(lock);
        if map.get(dest).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(dest);
        }
    }
}
