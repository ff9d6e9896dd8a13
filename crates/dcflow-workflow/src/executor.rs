//! The executor: the matching workflows of one admitted event, each one's steps in order
//! (resumed after the last step the state store says finished), then one success or failure
//! record. What each step does is in `steps/`.

use std::sync::Arc;
use std::time::Instant;

use dcflow_core::workflow::EventKind;
use dcflow_core::{Mapped, Record, Step, Workflow};
use time::OffsetDateTime;
use tracing::{error, info, warn, Instrument};

use crate::admission::{Facts, Subject, Task};
use crate::pipeline::{FileOutcome, Pipeline, Unrecorded};
use crate::seen::Seen;
use crate::stats::{Ended, Stats, StepLabel};
use crate::steps::{self, retrying, Context as StepContext, StepError};

impl Pipeline {
    /// Copies one admitted file and records the outcome. `Err` when the outcome could not be
    /// recorded: the event must then not be acknowledged.
    pub async fn run(self: &Arc<Self>, task: Box<Task>) -> Result<FileOutcome, Unrecorded> {
        let span = tracing::info_span!("file", pnfsid = %task.upload.pnfsid);
        self.run_inner(task).instrument(span).await
    }

    async fn run_inner(&self, task: Box<Task>) -> Result<FileOutcome, Unrecorded> {
        let Task {
            mut upload,
            mapped,
            workflows,
            facts,
            raw,
            origin,
            ended,
            _permit,
        } = *task;
        // What the listing that found the file said of it (sync): no request to ask again.
        let listed = self.take_listed(&upload.billing_path).unwrap_or_default();
        upload.listed_checksums = listed.checksums;
        // A file that lives on tape is staged first, without its transfer slot.
        let gated = self
            .tape_gate(&upload, &mapped, &workflows, listed.locality, _permit)
            .await;
        let (permit, staged) = match gated {
            Ok(gated) => gated,
            Err(why) => {
                let outcome = self
                    .fail_before_steps(&upload, &mapped, &raw, &origin, why)
                    .await;
                self.mark(
                    &(upload.kind, upload.pnfsid.clone(), upload.precedes_commit),
                    Seen::Failed,
                );
                ended.send_replace(outcome.is_ok());
                return outcome;
            }
        };
        let mut slot = Slot {
            permit: Some(permit),
            permits: self.permits.clone(),
        };
        let mut outcome: Result<Option<FileOutcome>, Unrecorded> = Ok(None);
        for i in workflows {
            let wf = &self.workflows[i];
            let span = tracing::info_span!("workflow", workflow = %wf.name);
            let o = self
                .run_workflow(wf, &upload, &mapped, &facts, &raw, &origin, &mut slot)
                .instrument(span)
                .await;
            outcome = match (outcome, o) {
                (Ok(prev), Ok(o)) => Ok(Some(prev.map_or(o, |p| p.and(o)))),
                _ => Err(Unrecorded),
            };
        }
        let outcome = outcome.map(|o| o.unwrap_or(FileOutcome::Done));
        if let (Some(staged), Some(stager)) = (&staged, &self.stager) {
            stager.release(staged, &upload.billing_path).await;
        }
        let state = match outcome {
            Ok(FileOutcome::Failed) | Err(Unrecorded) => Seen::Failed,
            Ok(_) => Seen::Done,
        };
        self.mark(
            &(upload.kind, upload.pnfsid.clone(), upload.precedes_commit),
            state,
        );
        ended.send_replace(outcome.is_ok());
        outcome
    }

    /// With `[tape]`, before any workflow reads the file: its locality, and for a `NEARLINE`
    /// one, its stage, waited for without the transfer slot (given back, taken again after).
    /// `Err` for a file that cannot be read: LOST, UNAVAILABLE, or not staged.
    async fn tape_gate(
        &self,
        upload: &Subject,
        mapped: &Mapped,
        workflows: &[usize],
        listed: Option<dcflow_transfer::listing::Locality>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<
        (
            tokio::sync::OwnedSemaphorePermit,
            Option<crate::tape::Staged>,
        ),
        String,
    > {
        use dcflow_transfer::listing::Locality;
        let Some(stager) = &self.stager else {
            return Ok((permit, None));
        };
        let reads = workflows.iter().any(|&i| {
            self.workflows[i]
                .steps
                .iter()
                .any(|s| matches!(s, Step::Copy { .. }))
        });
        if !reads || upload.kind == EventKind::Remove {
            return Ok((permit, None));
        }
        let locality = match listed {
            Some(l) => Some(l),
            None => stager
                .locality(&mapped.source_url)
                .await
                .unwrap_or_else(|e| {
                    warn!(error = %e, "cannot learn the file's locality; copying as if on disk");
                    None
                }),
        };
        match locality {
            Some(Locality::Nearline) => {
                drop(permit);
                info!(path = %upload.billing_path, "TAPE_WAIT the file is on tape only: staging it (its transfer slot is free meanwhile)");
                let staged = stager.stage(&upload.billing_path).await?;
                info!(path = %upload.billing_path, "TAPE_STAGED back on disk");
                let permit = self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                Ok((permit, Some(staged)))
            }
            Some(Locality::Lost) => {
                Err("dCache says the file is LOST (no copy left): not retried".into())
            }
            Some(Locality::Unavailable) => Err(
                "dCache says the file is UNAVAILABLE (its pool or tape is offline): not retried; \
                 `dcflow retry` once it is back"
                    .into(),
            ),
            _ => Ok((permit, None)),
        }
    }

    /// A file refused before any step ran (the tape gate): one failure row per workflow.
    async fn fail_before_steps(
        &self,
        upload: &Subject,
        mapped: &Mapped,
        raw: &[u8],
        origin: &str,
        why: String,
    ) -> Result<FileOutcome, Unrecorded> {
        Stats::inc(&self.stats.failed);
        error!(path = %upload.billing_path, "TAPE_FAILED {why}");
        let record = Record {
            time: Some(OffsetDateTime::now_utc()),
            pnfsid: upload.pnfsid.to_string(),
            billing_path: upload.billing_path.clone(),
            source_url: mapped.source_url.to_string(),
            destination: mapped.destination.display().to_string(),
            size: upload.size,
            error: why.clone(),
            ..Default::default()
        };
        self.activity.ended(Ended {
            time: OffsetDateTime::now_utc(),
            workflow: String::new(),
            path: upload.billing_path.clone(),
            ok: false,
            bytes: 0,
            seconds: 0.0,
            error: why,
        });
        self.fail(record, raw, origin).await?;
        Ok(FileOutcome::Failed)
    }

    /// Runs one workflow's steps in order for one upload. The first step that fails (after
    /// its attempts) ends the workflow for this event and is recorded, naming the step.
    #[allow(clippy::too_many_arguments)]
    async fn run_workflow(
        &self,
        wf: &Workflow,
        upload: &Subject,
        mapped: &Mapped,
        facts: &Facts,
        raw: &[u8],
        origin: &str,
        slot: &mut Slot,
    ) -> Result<FileOutcome, Unrecorded> {
        // Steps already finished for this event (an earlier delivery, `dcflow retry`).
        let state_key = match upload.kind {
            EventKind::Upload => upload.pnfsid.to_string(),
            other => format!("{}:{}", other.as_str(), upload.pnfsid.as_str()),
        };
        let mut run = Run {
            slot,
            state_key: state_key.clone(),
            wf,
            upload,
            mapped,
            raw,
            ctx: context(wf, upload, mapped, facts),
            record: Record {
                pnfsid: upload.pnfsid.to_string(),
                billing_path: upload.billing_path.clone(),
                source_url: mapped.source_url.to_string(),
                size: upload.size,
                ..Default::default()
            },
            outcome: FileOutcome::Done,
            verified_copy: false,
        };
        let started = Instant::now();
        let resume_at = match self.resume(&mut run, &state_key).await {
            Some(at) => at,
            None => return Ok(FileOutcome::AlreadyPresent),
        };
        for (j, step) in wf.steps.iter().enumerate().skip(resume_at) {
            let label = format!("{} step {} ({})", wf.name, j + 1, step.kind());
            let result = self.run_step(&mut run, step, j, &label).await;
            self.stats
                .steps
                .get_or_create(&StepLabel {
                    workflow: wf.name.clone(),
                    step: step.kind().into(),
                    result: if result.is_ok() { "done" } else { "failed" }.into(),
                })
                .inc();
            match result {
                Ok(()) => {
                    if self.explicit_workflows {
                        info!(step = j + 1, kind = step.kind(), "STEP_DONE {label}");
                    }
                    if let Some(state) = &self.state {
                        if let Err(e) = state
                            .finished(&state_key, &wf.name, j + 1, step.kind(), &run.ctx.values)
                            .await
                        {
                            warn!(error = %e, "cannot record the finished step: a redelivery runs it again");
                        }
                    }
                }
                Err((error, attempts)) => {
                    return self
                        .workflow_failed(run, step, j, &label, error, attempts, started, origin)
                        .await
                }
            }
        }
        self.workflow_done(run, started)
    }

    /// Where a workflow starts for this event: after the steps the state store says finished
    /// (with the context they left), or `None` when every step already finished.
    async fn resume(&self, run: &mut Run<'_>, state_key: &str) -> Option<usize> {
        let (wf, upload) = (run.wf, run.upload);
        let Some(state) = &self.state else {
            return Some(0);
        };
        match state.progress(state_key, &wf.name).await {
            Ok(p) if p.done >= wf.steps.len() => {
                info!(
                    "WORKFLOW_DONE {} already, for {}: nothing to do",
                    wf.name, upload.billing_path
                );
                None
            }
            Ok(p) if p.done > 0 => {
                info!(
                    resume_at = p.done + 1,
                    "WORKFLOW {} resumes at step {} for {}",
                    wf.name,
                    p.done + 1,
                    upload.billing_path
                );
                run.ctx.restore(&p.context);
                run.verified_copy = wf.steps[..p.done]
                    .iter()
                    .any(|s| matches!(s, Step::Copy { .. }));
                if let Some(local) = run.ctx.values.get("local_path") {
                    run.record.destination = local.clone();
                }
                if let Some(sum) = run.ctx.values.get("checksum") {
                    run.record.checksum = sum.clone();
                }
                Some(p.done)
            }
            Ok(_) => Some(0),
            Err(e) => {
                // Without its state a workflow still runs, from the start: at least once.
                warn!(error = %e, "cannot read the workflow state; running every step");
                Some(0)
            }
        }
    }

    /// One step of a run: the step kind's own module does the work. `Err` holds the error
    /// and the attempts made.
    // Long on purpose: one arm per step kind, each a call into that kind's module.
    async fn run_step(
        &self,
        run: &mut Run<'_>,
        step: &Step,
        j: usize,
        label: &str,
    ) -> Result<(), (String, u32)> {
        let (wf, upload, mapped) = (run.wf, run.upload, run.mapped);
        let retried =
            |r: Result<u32, (StepError, u32)>| r.map(drop).map_err(|(e, n)| (e.to_string(), n));
        match step {
            Step::Copy { destination } => {
                let deletes_source = wf.steps.iter().any(|s| matches!(s, Step::DeleteSource));
                run.outcome = self
                    .copy_step(
                        upload,
                        mapped,
                        destination.as_ref(),
                        deletes_source,
                        &mut run.ctx,
                        &mut run.record,
                    )
                    .await?;
                run.verified_copy = true;
                Ok(())
            }
            Step::DeleteSource if !run.verified_copy => Err((
                "no verified copy in this workflow: the source is kept".into(),
                0,
            )),
            Step::DeleteSource => {
                let ctx = &run.ctx;
                retried(
                    retrying(label, wf.attempts, &self.retry, || {
                        self.delete_source_step(mapped, ctx)
                    })
                    .await,
                )
            }
            Step::Unpack {
                destination,
                format,
                limits,
            } => self
                .unpack_step(&mut run.ctx, destination.as_ref(), *format, *limits)
                .await
                .map_err(|e| (e, 1)),
            Step::Produce { topic, key } => {
                let event: serde_json::Value =
                    serde_json::from_slice(run.raw).unwrap_or(serde_json::Value::Null);
                let ctx = &run.ctx;
                retried(
                    retrying(label, wf.attempts, &self.retry, || {
                        self.produce_step(ctx, topic, key, &event)
                    })
                    .await,
                )
            }
            Step::Catalog { database } => {
                let entry = self.catalog_entry(run);
                retried(
                    retrying(label, wf.attempts, &self.retry, || {
                        self.catalog_step(database, &entry)
                    })
                    .await,
                )
            }
            Step::Rucio { .. } => self.rucio_step(run, step, label).await,
            Step::Slurm(job) => self.slurm_step(run, job, j, label).await,
            Step::Exec {
                argv,
                env,
                timeout,
                codes,
            } => {
                let ctx = &run.ctx;
                retried(
                    retrying(label, wf.attempts, &self.retry, || {
                        steps::exec::exec(ctx, argv, env, *timeout, codes)
                    })
                    .await,
                )
            }
            Step::Webhook {
                url,
                format,
                headers,
                token_file,
                timeout,
            } => {
                let key = format!("{}-{}-{}", upload.pnfsid.as_str(), wf.name, j + 1);
                let event: serde_json::Value =
                    serde_json::from_slice(run.raw).unwrap_or(serde_json::Value::Null);
                let ctx = &run.ctx;
                retried(
                    retrying(label, wf.attempts, &self.retry, || {
                        self.webhooks.post(
                            ctx,
                            url,
                            *format,
                            headers,
                            token_file.as_deref(),
                            *timeout,
                            &key,
                            &event,
                        )
                    })
                    .await,
                )
            }
        }
    }

    /// A step failed after its attempts: one failure record (naming the workflow and step
    /// when `[[workflow]]` rules are configured), the status page, the dead-letter topic.
    #[allow(clippy::too_many_arguments)]
    async fn workflow_failed(
        &self,
        run: Run<'_>,
        step: &Step,
        j: usize,
        label: &str,
        error: String,
        attempts: u32,
        started: Instant,
        origin: &str,
    ) -> Result<FileOutcome, Unrecorded> {
        let Run {
            wf,
            upload,
            raw,
            mut record,
            ..
        } = run;
        Stats::inc(&self.stats.failed);
        record.time = Some(OffsetDateTime::now_utc());
        record.seconds = started.elapsed().as_secs_f64();
        if !matches!(step, Step::Copy { .. }) {
            record.attempts = attempts;
        }
        record.error = if self.explicit_workflows {
            error!(
                step = j + 1,
                kind = step.kind(),
                attempts,
                "STEP_FAILED {label} after {attempts} attempt(s): {error}"
            );
            format!(
                "workflow {} step {} ({}): {error}",
                wf.name,
                j + 1,
                step.kind()
            )
        } else {
            error
        };
        self.activity.ended(Ended {
            time: OffsetDateTime::now_utc(),
            workflow: wf.name.clone(),
            path: upload.billing_path.clone(),
            ok: false,
            bytes: 0,
            seconds: record.seconds,
            error: record.error.clone(),
        });
        self.fail(record, raw, origin).await?;
        Ok(FileOutcome::Failed)
    }

    /// Every step finished: one success record (an error halts the pipeline: the event must
    /// not be acknowledged).
    fn workflow_done(&self, run: Run<'_>, started: Instant) -> Result<FileOutcome, Unrecorded> {
        let Run {
            wf,
            upload,
            mut record,
            outcome,
            ..
        } = run;
        record.time = Some(OffsetDateTime::now_utc());
        if let Err(e) = self.success.append(&record) {
            self.halt_for(format!("cannot write the success record: {e}"));
            return Err(Unrecorded);
        }
        if self.explicit_workflows {
            info!("WORKFLOW_DONE {} for {}", wf.name, upload.billing_path);
        }
        self.activity.ended(Ended {
            time: OffsetDateTime::now_utc(),
            workflow: wf.name.clone(),
            path: upload.billing_path.clone(),
            ok: true,
            bytes: if outcome == FileOutcome::Copied {
                record.size.unwrap_or(0)
            } else {
                0
            },
            seconds: started.elapsed().as_secs_f64(),
            error: String::new(),
        });
        Ok(outcome)
    }
}

/// One workflow for one event, as its steps run: what they produced so far.
pub(crate) struct Run<'a> {
    /// The file's transfer slot, given back while a step waits outside dcflow.
    pub(crate) slot: &'a mut Slot,
    /// The file's key in the state store (its pnfsid, or kind:pnfsid).
    pub(crate) state_key: String,
    pub(crate) wf: &'a Workflow,
    pub(crate) upload: &'a Subject,
    pub(crate) mapped: &'a Mapped,
    /// The billing message (produce, webhook).
    pub(crate) raw: &'a [u8],
    pub(crate) ctx: StepContext,
    pub(crate) record: Record,
    pub(crate) outcome: FileOutcome,
    /// A copy step of this workflow verified the local file (delete-source needs one).
    pub(crate) verified_copy: bool,
}

/// The transfer slot (a `maxdownloads` permit) a file holds while its workflows run; given
/// back while it waits for something outside dcflow (a batch job, Rucio's answer), so that
/// other files are admitted and copied meanwhile, and taken again after.
pub(crate) struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Slot {
    pub(crate) fn release(&mut self) {
        self.permit = None;
    }

    pub(crate) async fn retake(&mut self) {
        if self.permit.is_none() {
            self.permit = Some(
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed"),
            );
        }
    }
}

/// The values templates see for this event: its fields, before any step ran.
fn context(wf: &Workflow, upload: &Subject, mapped: &Mapped, facts: &Facts) -> StepContext {
    let mut ctx = StepContext::default();
    ctx.set("path", &upload.billing_path);
    ctx.set("rel", mapped.rel.join("/"));
    ctx.set("name", mapped.rel.last().cloned().unwrap_or_default());
    ctx.set("pnfsid", upload.pnfsid.as_str());
    if let Some(size) = upload.size {
        ctx.set("size", size.to_string());
    }
    ctx.set("kind", upload.kind.as_str());
    ctx.set("workflow", &wf.name);
    ctx.set("source_url", mapped.source_url.as_str());
    if let Some(v) = &facts.storage_info {
        ctx.set("storageclass", v.split('@').next().unwrap_or(v));
    }
    if let Some(v) = &facts.owner {
        ctx.set("owner", v);
    }
    if let Some(v) = facts.uid {
        ctx.set("uid", v.to_string());
    }
    ctx
}
