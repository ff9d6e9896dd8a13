//! The `slurm` step: a batch job submitted with `sbatch`, then followed to its end. The step
//! ends as the job did. One watcher follows every waiting job: whenever one is due, all of
//! them in one `sacct` call (per 500), `scontrol show job` for the due ones that accounting
//! does not know (yet, or at all). A job is due 1 s after it was submitted or changed state,
//! then after a quarter of the time it has been in that state, at most the step's `poll`. As Slurm 22.05 answers
//! (its `--json` output reports exit codes wrongly, so text is read):
//!
//! ```text
//! sbatch --parsable --job-name=N ... → "1234" (or "1234;cluster")
//! sacct -n -X -P -j 1,2 -o JobID,State,ExitCode,Submit,Start,End
//!       → "2|FAILED|3:0|1796451310|1796451311|1796451312" (times: SLURM_TIME_FORMAT=%s)
//!       ("CANCELLED by 0" for a cancelled job; nothing for a job it does not know yet)
//! scontrol show job -o 2 → "JobId=2 JobName=.. JobState=FAILED Reason=NonZeroExitCode ..
//!       ExitCode=3:0 .." (while slurmctld keeps the job, MinJobAge after its end)
//! squeue -h --states=all --name=N -o %i → the ids of jobs of that name slurmctld keeps
//! ```
//!
//! The job name is deterministic (workflow, step, file): before submitting, a job of that name
//! that the state file does not know yet (submitted just before a crash) is followed instead.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn};

use dcflow_core::workflow::SlurmJob;

use super::{retrying, Context, StepError};
use crate::executor::Run;
use crate::pipeline::Pipeline;

/// Slurm job states after which the job does not run again.
const ENDED: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
];

/// How long a job may be unknown to both `sacct` and `scontrol` before it counts as lost.
const UNKNOWN_FOR: Duration = Duration::from_secs(300);

/// A job as Slurm reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The first word of Slurm's state (`CANCELLED by 0` is `CANCELLED`).
    pub state: String,
    /// `status:signal`.
    pub exit_code: String,
    pub submit: Option<i64>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl Status {
    pub fn ended(&self) -> bool {
        ENDED.contains(&self.state.as_str())
    }
}

/// How a job ended, and when dcflow noticed.
#[derive(Debug, Clone)]
pub struct JobEnd {
    pub job_id: String,
    pub status: Status,
    /// From its end (as Slurm says) to dcflow noticing it.
    pub noticed_after: Option<Duration>,
}

impl JobEnd {
    /// COMPLETED is done; CANCELLED (by someone else) is a failure, never retried; the other
    /// ends (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED...) are worth another job.
    pub fn outcome(&self) -> Result<(), StepError> {
        let s = &self.status;
        let what = format!(
            "Slurm job {} ended {} (exit code {})",
            self.job_id, s.state, s.exit_code
        );
        match s.state.as_str() {
            "COMPLETED" => Ok(()),
            "CANCELLED" | "REVOKED" => Err(StepError::fatal(format!(
                "{what}: cancelled outside dcflow, not submitted again"
            ))),
            "UNKNOWN" => Err(StepError::fatal(format!(
                "{what}: Slurm no longer knows the job"
            ))),
            _ => Err(StepError::retry(what)),
        }
    }
}

/// What to submit, rendered.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub name: String,
    pub script: Option<String>,
    pub args: Vec<String>,
    pub wrap: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub time: Option<String>,
    pub chdir: Option<String>,
    pub output: Option<String>,
    pub options: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Jobs now, for `/metrics` and the status page.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Workflows waiting for a `maxjobs` slot (nothing submitted yet).
    pub waiting_for_slot: u64,
    /// Jobs followed now, by their last state (PENDING, RUNNING...).
    pub active: BTreeMap<String, u64>,
    /// Jobs that ended since the start, by state.
    pub ended: BTreeMap<String, u64>,
}

struct Watch {
    job_id: String,
    poll: Duration,
    reply: oneshot::Sender<JobEnd>,
}

/// The Slurm client of a pipeline: submissions, the watcher, the `maxjobs` slots.
pub struct Slurm {
    watch: mpsc::UnboundedSender<Watch>,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    counts: Arc<Mutex<Counts>>,
}

impl Default for Slurm {
    fn default() -> Self {
        Self::start()
    }
}

impl Slurm {
    pub fn start() -> Self {
        let (watch, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Mutex::new(Counts::default()));
        tokio::spawn(watcher(rx, counts.clone()));
        Self {
            watch,
            slots: Mutex::default(),
            counts,
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts.lock().expect("counts lock").clone()
    }

    /// Waits for one of `max` slots of the step `label` (jobs submitted and not yet ended).
    pub async fn slot(&self, label: &str, max: usize) -> tokio::sync::OwnedSemaphorePermit {
        let slots = self
            .slots
            .lock()
            .expect("slots lock")
            .entry(label.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(max)))
            .clone();
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return p;
        }
        self.counts.lock().expect("counts lock").waiting_for_slot += 1;
        let p = slots.acquire_owned().await.expect("never closed");
        self.counts.lock().expect("counts lock").waiting_for_slot -= 1;
        p
    }

    /// `sbatch`: the new job's id.
    pub async fn submit(&self, sub: &Submission) -> Result<String, StepError> {
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", sub.name));
        let flags = [
            ("--partition", &sub.partition),
            ("--account", &sub.account),
            ("--time", &sub.time),
            ("--chdir", &sub.chdir),
            ("--output", &sub.output),
        ];
        for (flag, value) in flags {
            if let Some(v) = value {
                cmd.arg(format!("{flag}={v}"));
            }
        }
        cmd.args(&sub.options);
        match (&sub.script, &sub.wrap) {
            (Some(script), _) => {
                if script.starts_with('-') {
                    return Err(StepError::fatal(format!(
                        "the script {script:?} starts with '-': sbatch would take it as an option"
                    )));
                }
                // After the script, sbatch passes every argument to it as it is.
                cmd.arg(script).args(&sub.args);
            }
            (None, Some(wrap)) => {
                cmd.arg(format!("--wrap={wrap}"));
            }
            (None, None) => return Err(StepError::fatal("neither script nor wrap")),
        }
        // sbatch hands its environment to the job: not dcflow's secrets.
        for (k, _) in std::env::vars_os() {
            if super::is_secret_variable(&k.to_string_lossy()) {
                cmd.env_remove(&k);
            }
        }
        cmd.envs(sub.env.iter().map(|(k, v)| (k, v)));
        let out = run(cmd, "sbatch").await?;
        let id = out
            .trim()
            .split(';')
            .next()
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                StepError::retry(format!("sbatch printed no job id: {:?}", out.trim()))
            })?;
        Ok(id.to_owned())
    }

    /// The ids of the jobs named `name` that Slurm knows (slurmctld's and accounting's).
    pub async fn named(&self, name: &str) -> Result<Vec<String>, StepError> {
        let mut cmd = Command::new("squeue");
        cmd.args(["-h", "--states=all", "-o", "%i", &format!("--name={name}")]);
        let mut ids: Vec<String> = run(cmd, "squeue")
            .await?
            .lines()
            .map(|l| l.trim().to_owned())
            .collect();
        let mut cmd = Command::new("sacct");
        cmd.args(["-n", "-X", "-P", "-S", "now-30days", "-o", "JobID"])
            .arg(format!("--name={name}"));
        // Without accounting (no slurmdbd) squeue's answer is all there is.
        if let Ok(out) = run(cmd, "sacct").await {
            ids.extend(out.lines().map(|l| l.trim().to_owned()));
        }
        ids.retain(|id| !id.is_empty());
        ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
        ids.dedup();
        Ok(ids)
    }

    /// Follows `job_id` to its end (however long that takes), looking at it after 1 s, then
    /// less often (a quarter of the time it has spent in its state), at least every `poll`.
    pub async fn wait(&self, job_id: &str, poll: Duration) -> JobEnd {
        let (reply, answer) = oneshot::channel();
        let _ = self.watch.send(Watch {
            job_id: job_id.to_owned(),
            poll,
            reply,
        });
        answer.await.unwrap_or_else(|_| JobEnd {
            job_id: job_id.to_owned(),
            status: Status {
                state: "UNKNOWN".into(),
                ..Default::default()
            },
            noticed_after: None,
        })
    }
}

impl Pipeline {
    /// The `slurm` step of `run`: a job submitted (or the one already submitted for this file
    /// and step followed), waited for without the file's transfer slot, retried per the
    /// workflow's attempts; `{job_id}` for the steps after it.
    pub(crate) async fn slurm_step(
        &self,
        run: &mut Run<'_>,
        job: &SlurmJob,
        j: usize,
        label: &str,
    ) -> Result<(), (String, u32)> {
        let (Some(slurm), Some(state)) = (&self.slurm, &self.state) else {
            return Err(("no Slurm client or state file".into(), 1));
        };
        let name = job_name(&run.wf.name, j + 1, &run.state_key);
        let sub = submission(job, &run.ctx, name).map_err(|e| (e.to_string(), 1))?;
        let slot_label = format!("{}#{}", run.wf.name, j + 1);
        let (key, workflow) = (run.state_key.clone(), run.wf.name.clone());
        let last_job: Mutex<Option<String>> = Mutex::default();
        run.slot.release();
        let attempt = || async {
            let _in_slurm = slurm.slot(&slot_label, job.max_jobs).await;
            let job_id = self
                .slurm_job(slurm, state, &key, &workflow, j + 1, &sub)
                .await?;
            *last_job.lock().expect("lock") = Some(job_id.clone());
            let end = slurm.wait(&job_id, job.poll).await;
            log_end(&end);
            if let Err(e) = state
                .job_ended(&job_id, &end.status.state, &end.status.exit_code)
                .await
            {
                warn!(error = %e, "cannot record the job's end in the state file");
            }
            end.outcome()
        };
        let result = retrying(label, run.wf.attempts, &self.retry, attempt).await;
        run.slot.retake().await;
        if let Some(id) = last_job.into_inner().expect("lock") {
            run.ctx.set("job_id", id);
        }
        result.map(drop).map_err(|(e, n)| (e.to_string(), n))
    }

    /// The job to follow for this attempt: one of this step not seen to end (the state file
    /// says so), one of its name that the state file does not know (submitted just before a
    /// crash), or a new one.
    async fn slurm_job(
        &self,
        slurm: &Slurm,
        state: &crate::state::StateStore,
        key: &str,
        workflow: &str,
        step: usize,
        sub: &Submission,
    ) -> Result<String, StepError> {
        let known = state
            .jobs(key, workflow, step)
            .await
            .map_err(|e| StepError::retry(format!("reading the state file: {e:#}")))?;
        if let Some(open) = known.iter().find(|r| r.ended.is_none()) {
            info!(job_id = %open.job_id, "SLURM_FOLLOW job {} (submitted earlier for this file)", open.job_id);
            return Ok(open.job_id.clone());
        }
        let found = slurm.named(&sub.name).await?;
        let unknown = found
            .into_iter()
            .rfind(|id| !known.iter().any(|r| &r.job_id == id));
        let job_id = match unknown {
            Some(id) => {
                info!(job_id = %id, name = %sub.name, "SLURM_FOLLOW job {id}: found in Slurm by its name");
                id
            }
            None => {
                let id = slurm.submit(sub).await?;
                info!(job_id = %id, name = %sub.name, "SLURM_SUBMIT job {id} ({})", sub.name);
                id
            }
        };
        if let Err(e) = state.job_submitted(key, workflow, step, &job_id).await {
            // The job's name finds it again after a restart.
            warn!(error = %e, "cannot record the job in the state file");
        }
        Ok(job_id)
    }
}

/// The step's submission for one file: templates rendered, the file's fields in `DCFLOW_*`
/// environment variables (sbatch gives its environment to the job).
fn submission(job: &SlurmJob, ctx: &Context, name: String) -> Result<Submission, StepError> {
    let render =
        |t: &Option<dcflow_core::workflow::Template>| t.as_ref().map(|t| ctx.render(t)).transpose();
    let mut env: Vec<(String, String)> = ctx
        .values
        .iter()
        .map(|(k, v)| (format!("DCFLOW_{}", k.to_ascii_uppercase()), v.clone()))
        .collect();
    for (k, t) in &job.env {
        env.push((k.clone(), ctx.render(t)?));
    }
    Ok(Submission {
        name,
        script: render(&job.script)?,
        args: job
            .args
            .iter()
            .map(|t| ctx.render(t))
            .collect::<Result<_, _>>()?,
        wrap: job.wrap.clone(),
        partition: job.partition.clone(),
        account: job.account.clone(),
        time: job.time.clone(),
        chdir: render(&job.chdir)?,
        output: render(&job.output)?,
        options: job.options.clone(),
        env,
    })
}

/// Runs a Slurm command: its standard output, or why not. A controller that does not answer is
/// worth another try; a refusal is not.
async fn run(mut cmd: Command, what: &str) -> Result<String, StepError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .map_err(|_| StepError::retry(format!("{what} did not answer in 120 s")))?
        .map_err(|e| {
            StepError::fatal(format!(
                "cannot run {what}: {e} (is Slurm's client installed, on PATH?)"
            ))
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let err = dcflow_core::text::bounded(err.trim(), 500);
    let transient = [
        "Unable to contact",
        "timed out",
        "temporarily",
        "try again",
        "Connection refused",
        "Zero Bytes were transmitted",
    ]
    .iter()
    .any(|w| err.contains(w));
    let message = format!("{what} failed ({}): {err}", out.status);
    if transient {
        Err(StepError::retry(message))
    } else {
        Err(StepError::fatal(message))
    }
}

struct Waiting {
    replies: Vec<oneshot::Sender<JobEnd>>,
    since: Instant,
    /// When its state last changed.
    changed: Instant,
    next: Instant,
    poll: Duration,
    state: String,
}

/// Follows every waiting job: all in one query whenever one is due (see the module comment).
async fn watcher(mut rx: mpsc::UnboundedReceiver<Watch>, counts: Arc<Mutex<Counts>>) {
    let mut jobs: HashMap<String, Waiting> = HashMap::new();
    let mut last_error_logged: Option<Instant> = None;
    loop {
        let next = jobs.values().map(|w| w.next).min();
        tokio::select! {
            w = rx.recv() => match w {
                Some(w) => {
                    let now = Instant::now();
                    let entry = jobs.entry(w.job_id).or_insert_with(|| Waiting {
                        replies: Vec::new(),
                        since: now,
                        changed: now,
                        next: now + Duration::from_secs(1),
                        poll: w.poll,
                        state: "PENDING".into(),
                    });
                    entry.poll = entry.poll.min(w.poll);
                    entry.replies.push(w.reply);
                    publish(&jobs, &counts);
                    continue;
                }
                // The pipeline is gone, and with it whoever waited.
                None => return,
            },
            _ = sleep_until(next) => {}
        }
        let now = Instant::now();
        let due: Vec<String> = jobs
            .iter()
            .filter(|(_, w)| w.next <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if due.is_empty() {
            continue;
        }
        // One sacct call answers for any number of jobs: all of them are asked about
        // whenever one is due, so a job that starts or ends is seen at the next call.
        let all: Vec<String> = jobs.keys().cloned().collect();
        let seen = match query(&all, &due).await {
            Ok(seen) => seen,
            Err(e) => {
                if last_error_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    warn!(error = %e, jobs = jobs.len(), "cannot ask Slurm about the waiting jobs; asking again");
                    last_error_logged = Some(Instant::now());
                }
                for id in &due {
                    if let Some(w) = jobs.get_mut(id) {
                        w.next = Instant::now() + w.poll.min(Duration::from_secs(10));
                    }
                }
                continue;
            }
        };
        for id in all {
            let Some(w) = jobs.get_mut(&id) else { continue };
            let was_due = w.next <= now;
            let status = match seen.get(&id) {
                Some(s) => s.clone(),
                None if was_due && w.since.elapsed() > UNKNOWN_FOR => Status {
                    state: "UNKNOWN".into(),
                    ..Default::default()
                },
                None => Status::default(),
            };
            if status.ended() || status.state == "UNKNOWN" {
                let w = jobs.remove(&id).expect("present");
                let end = JobEnd {
                    noticed_after: status.end.and_then(since_unix),
                    job_id: id.clone(),
                    status,
                };
                *counts
                    .lock()
                    .expect("counts lock")
                    .ended
                    .entry(end.status.state.clone())
                    .or_default() += 1;
                for r in w.replies {
                    let _ = r.send(end.clone());
                }
                continue;
            }
            if !status.state.is_empty() && status.state != w.state {
                // It moved (PENDING → RUNNING...): look again soon, then back off anew.
                w.state = status.state;
                w.changed = Instant::now();
                w.next = Instant::now() + Duration::from_secs(1);
            } else if was_due {
                // A quarter of the time it has spent in this state: a job's end is noticed
                // within a quarter of its run time, or `poll`, whichever is less.
                let every = (w.changed.elapsed() / 4).clamp(Duration::from_secs(1), w.poll);
                w.next = Instant::now() + every;
            }
        }
        publish(&jobs, &counts);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn publish(jobs: &HashMap<String, Waiting>, counts: &Mutex<Counts>) {
    let mut active = BTreeMap::new();
    for w in jobs.values() {
        *active.entry(w.state.clone()).or_default() += 1;
    }
    counts.lock().expect("counts lock").active = active;
}

/// What Slurm says of `ids`: accounting first (one call per 500 jobs), `scontrol` for those of
/// `due` it does not know. `Err` when Slurm could not be asked at all.
async fn query(ids: &[String], due: &[String]) -> Result<HashMap<String, Status>, StepError> {
    let mut seen = HashMap::new();
    for chunk in ids.chunks(500) {
        let mut cmd = Command::new("sacct");
        cmd.args([
            "-n",
            "-X",
            "-P",
            "-o",
            "JobID,State,ExitCode,Submit,Start,End",
            "-j",
            &chunk.join(","),
        ])
        .env("SLURM_TIME_FORMAT", "%s");
        if let Ok(out) = run(cmd, "sacct").await {
            seen.extend(parse_sacct(&out));
        }
    }
    let mut reached = !seen.is_empty();
    let mut last_error = None;
    let missing: Vec<&String> = due.iter().filter(|id| !seen.contains_key(*id)).collect();
    for id in missing {
        let mut cmd = Command::new("scontrol");
        cmd.args(["show", "job", "-o", id])
            .env("SLURM_TIME_FORMAT", "%s");
        match run(cmd, "scontrol").await {
            Ok(out) => {
                reached = true;
                if let Some(s) = parse_scontrol(&out) {
                    seen.insert(id.clone(), s);
                }
            }
            Err(e) if e.to_string().contains("Invalid job id") => reached = true,
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) if !reached => Err(e),
        _ => Ok(seen),
    }
}

/// `sacct -n -X -P -o JobID,State,ExitCode,Submit,Start,End` lines.
pub fn parse_sacct(out: &str) -> HashMap<String, Status> {
    out.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.trim().split('|').collect();
            let (id, state) = (f.first()?, f.get(1)?);
            Some((
                (*id).to_owned(),
                Status {
                    state: state.split_whitespace().next().unwrap_or("").to_owned(),
                    exit_code: f.get(2).copied().unwrap_or("").to_owned(),
                    submit: f.get(3).and_then(|t| parse_time(t)),
                    start: f.get(4).and_then(|t| parse_time(t)),
                    end: f.get(5).and_then(|t| parse_time(t)),
                },
            ))
        })
        .filter(|(_, s)| !s.state.is_empty())
        .collect()
}

/// `scontrol show job -o ID`: one line of `Key=Value` fields.
pub fn parse_scontrol(out: &str) -> Option<Status> {
    let fields: HashMap<&str, &str> = out
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    Some(Status {
        state: fields.get("JobState")?.to_string(),
        exit_code: fields.get("ExitCode").unwrap_or(&"").to_string(),
        submit: fields.get("SubmitTime").and_then(|t| parse_time(t)),
        start: fields.get("StartTime").and_then(|t| parse_time(t)),
        end: fields.get("EndTime").and_then(|t| parse_time(t)),
    })
}

/// A Slurm time as `SLURM_TIME_FORMAT=%s` prints it: Unix seconds (`Unknown`, `None`: none).
fn parse_time(t: &str) -> Option<i64> {
    t.trim().parse().ok().filter(|&t| t > 0)
}

/// Time since `t` (Unix seconds).
fn since_unix(t: i64) -> Option<Duration> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    now.checked_sub(Duration::from_secs(u64::try_from(t).ok()?))
}

/// The seconds between two Slurm times, for the log.
pub fn between(a: Option<i64>, b: Option<i64>) -> Option<f64> {
    Some((b? - a?) as f64)
}

/// A job name Slurm takes and that says what it is for: `dcflow.<workflow>.<step>.<file key>`.
pub fn job_name(workflow: &str, step: usize, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("dcflow.{}.{step}.{}", clean(workflow), clean(key))
}

/// Logs how a job ended, with its queue and run times.
pub fn log_end(end: &JobEnd) {
    let s = &end.status;
    info!(
        job_id = %end.job_id,
        state = %s.state,
        exit_code = %s.exit_code,
        queued_seconds = between(s.submit, s.start),
        ran_seconds = between(s.start, s.end),
        noticed_after_seconds = end.noticed_after.map(|d| d.as_secs_f64()),
        "SLURM_END job {} {} (exit code {})",
        end.job_id,
        s.state,
        s.exit_code
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sacct_and_scontrol_text_as_slurm_22_05_prints_it() {
        let seen = parse_sacct(
            "2|FAILED|3:0|1796451310|1796451311|1796451312\n\
             3|CANCELLED by 0|0:0|1796451310|1796451311|1796451320\n\
             4|PENDING|0:0|1796451310|Unknown|Unknown\n",
        );
        assert_eq!(seen["2"].state, "FAILED");
        assert_eq!(seen["2"].exit_code, "3:0");
        assert_eq!(between(seen["2"].submit, seen["2"].start), Some(1.0));
        assert_eq!(seen["3"].state, "CANCELLED");
        assert!(seen["3"].ended() && !seen["4"].ended());
        assert_eq!(seen["4"].start, None);
        let s = parse_scontrol(
            "JobId=7 JobName=dcflow.w.2.x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit \
             Dependency=(null) ExitCode=0:15 RunTime=00:01:27 SubmitTime=1796451310 \
             StartTime=1796451311 EndTime=1796451398",
        )
        .unwrap();
        assert_eq!(
            (s.state.as_str(), s.exit_code.as_str()),
            ("TIMEOUT", "0:15")
        );
        assert_eq!(between(s.start, s.end), Some(87.0));
    }

    #[test]
    fn each_end_maps_to_done_a_retry_or_a_failure() {
        let end = |state: &str| JobEnd {
            job_id: "9".into(),
            status: Status {
                state: state.into(),
                exit_code: "3:0".into(),
                ..Default::default()
            },
            noticed_after: None,
        };
        assert!(end("COMPLETED").outcome().is_ok());
        for retried in [
            "FAILED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "PREEMPTED",
        ] {
            assert!(
                end(retried).outcome().unwrap_err().is_retryable(),
                "{retried}"
            );
        }
        for fatal in ["CANCELLED", "UNKNOWN"] {
            assert!(!end(fatal).outcome().unwrap_err().is_retryable(), "{fatal}");
        }
        assert!(end("FAILED")
            .outcome()
            .unwrap_err()
            .to_string()
            .contains("job 9 ended FAILED (exit code 3:0)"));
    }

    #[test]
    fn job_names_are_deterministic_and_plain() {
        assert_eq!(
            job_name("reduce it", 2, "remove:0000ABC"),
            "dcflow.reduce_it.2.remove_0000ABC"
        );
    }
}
