//! The `slurm` step against a real Slurm 22.05 (`scripts/slurm.sh`: slurmctld, slurmd,
//! slurmdbd, MUNGE): a job that reads the verified copy, the source freed only after it
//! COMPLETED; a failing job retried, then recorded with its exit code, the source kept; a
//! cancelled job recorded at once; a job over its time limit; `maxjobs` holding workflows back while other files are copied; a
//! job already in Slurm under the step's name followed instead of a second one; `dcflow run`
//! killed while its jobs run, restarted: no job twice, every workflow ends, the offsets reach
//! the end only then.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// The jobs folder of the real Slurm, or `None` (a skip, a failure under CI).
fn slurm() -> Option<PathBuf> {
    let base = std::env::var("DCFLOW_SLURM_BASE")
        .ok()
        .filter(|_| std::env::var_os("SLURM_CONF").is_some());
    let Some(base) = base else {
        if std::env::var_os("CI").is_some() {
            panic!("SLURM_CONF is not set: .ci/run must start Slurm (scripts/slurm.sh start)");
        }
        eprintln!("SKIPPED: no Slurm; start one with `eval \"$(scripts/slurm.sh start)\"`");
        return None;
    };
    Some(Path::new(&base).join("jobs"))
}

/// Every job Slurm's accounting knows whose name starts with `prefix`: (id, name, state, exit
/// code), oldest first.
fn jobs(prefix: &str) -> Vec<(String, String, String, String)> {
    let out = Command::new("sacct")
        .args([
            "-n",
            "-X",
            "-P",
            "-a",
            "-S",
            "now-1days",
            "-o",
            "JobID,JobName,State,ExitCode",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "sacct: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 4 && f[1].starts_with(prefix)).then(|| {
                (
                    f[0].to_owned(),
                    f[1].to_owned(),
                    f[2].split(' ').next().unwrap().to_owned(),
                    f[3].to_owned(),
                )
            })
        })
        .collect()
}

/// [`jobs`], once accounting lists `n` of them, all ended (its records land a moment after
/// slurmctld's).
fn ended_jobs(prefix: &str, n: usize) -> Vec<(String, String, String, String)> {
    let ended = |j: &(String, String, String, String)| {
        !["PENDING", "RUNNING", "COMPLETING"].contains(&j.2.as_str())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = jobs(prefix);
        if (found.len() == n && found.iter().all(ended)) || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A batch script: `$1` the copy, `$2` the source on the emulator's pool. It writes the copy's
/// SHA-256 beside it and whether the source was still there, sleeps `SLEEP`, exits `EXIT`.
fn script(site: &Site) -> PathBuf {
    let path = site.path("reduce.sh");
    std::fs::write(
        &path,
        "#!/bin/sh\n\
         test -e \"$2\" && src=present || src=gone\n\
         sha256sum < \"$1\" | cut -d' ' -f1 > \"$1.sha256\"\n\
         echo \"$src\" > \"$1.source\"\n\
         echo \"$SLURM_JOB_ID $DCFLOW_PNFSID\" >> \"$1.jobs\"\n\
         sleep \"${SLEEP:-1}\"\n\
         exit \"${EXIT:-0}\"\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

/// copy → slurm (the script above) → delete-source, as workflow `name`.
fn workflow(site: &Site, jobs_dir: &Path, name: &str, slurm_keys: &str, attempts: u32) -> String {
    format!(
        r#"
[[workflow]]
name = "{name}"
attempts = {attempts}
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "slurm"
script = "{script}"
args = ["{{local_path}}", "{pool}/{{rel}}"]
chdir = "{jobs}"
output = "{jobs}/%j.out"
{slurm_keys}
[[workflow.step]]
type = "delete-source"
"#,
        script = script(site).display(),
        pool = site.sim.stored_file(FOLDER).display(),
        jobs = jobs_dir.display(),
    )
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    text(&out.stdout).split(' ').next().unwrap().to_owned()
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The pnfsid the emulator gave `rel` (from its billing messages).
fn pnfsid_of(site: &Site, rel: &str) -> String {
    site.sim.flush_billing();
    site.sim
        .billing_messages()
        .iter()
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .find(|m| {
            m["billingPath"]
                .as_str()
                .is_some_and(|p| p.ends_with(&format!("/{rel}")))
        })
        .and_then(|m| m["pnfsid"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no billing message for {rel}"))
}

/// Three uploads → copy → a job that reads the copy → delete-source. The jobs saw the sources
/// still on the pool (freed only after COMPLETED) and the copies' bytes; one job each; the
/// job id reached the success records' workflow; a replay submits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reads_the_copy_and_the_source_is_freed_only_after_it_completed() {
    let Some(jobs_dir) = slurm() else { return };
    let site = Site::new().await;
    let wf = unique("reduce").replace('-', "_");
    let mut files = Vec::new();
    for i in 0..3 {
        let rel = format!("slurm/run {i}/f-{i}.dat");
        let door = site
            .upload(&rel, &data(20_000 + i * 100, 40 + i as u32))
            .await;
        files.push((rel, door));
    }
    let config = site.write_workflow_config("", &workflow(&site, &jobs_dir, &wf, "", 2));
    let out = site.replay(&config);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    for (rel, door) in &files {
        let copy = site.download().join(rel);
        assert_eq!(
            read(copy.with_extension("dat.sha256")),
            sha256(&copy),
            "{rel}"
        );
        assert_eq!(
            read(copy.with_extension("dat.source")),
            "present",
            "{rel}: job ran after the delete"
        );
        assert!(
            !site.sim.stored_file(door).exists(),
            "{rel}: source not freed"
        );
    }
    let ran = ended_jobs(&format!("dcflow.{wf}."), 3);
    assert_eq!(ran.len(), 3, "{ran:?}");
    assert!(
        ran.iter().all(|j| j.2 == "COMPLETED" && j.3 == "0:0"),
        "{ran:?}"
    );
    assert_eq!(log.matches("SLURM_SUBMIT").count(), 3, "{log}");
    assert_eq!(log.matches("SLURM_END").count(), 3, "{log}");

    let again = site.replay(&config);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(
        !text(&again.stderr).contains("SLURM_SUBMIT"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(jobs(&format!("dcflow.{wf}.")).len(), 3);
}

/// A job that exits 3: submitted again (attempts = 2), then one failure row naming the job,
/// FAILED and 3:0; the source stays on the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_then_recorded_with_its_exit_code_and_the_source_kept() {
    let Some(jobs_dir) = slurm() else { return };
    let site = Site::new().await;
    let wf = unique("fails").replace('-', "_");
    let rel = "slurm/bad.dat";
    let door = site.upload(rel, &data(5_000, 9)).await;
    let keys = "env = { EXIT = \"3\", SLEEP = \"0\" }";
    let config = site.write_workflow_config("", &workflow(&site, &jobs_dir, &wf, keys, 2));
    let out = site.replay(&config);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let ran = ended_jobs(&format!("dcflow.{wf}."), 2);
    assert_eq!(ran.len(), 2, "one job, then one more: {ran:?}\n{log}");
    assert!(
        ran.iter().all(|j| j.2 == "FAILED" && j.3 == "3:0"),
        "{ran:?}"
    );
    let failed = site.records("failed.csv");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let last = &ran[1].0;
    assert!(
        failed[0]
            .error
            .contains(&format!("Slurm job {last} ended FAILED (exit code 3:0)")),
        "{}",
        failed[0].error
    );
    assert!(site.sim.stored_file(&door).exists(), "the source is kept");
    assert!(site.records("success.csv").is_empty());
}

/// A job cancelled by someone else (`scancel`): a failure at once, not another job
/// (attempts = 3); the source kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_by_someone_else_is_a_failure_not_a_retry_loop() {
    let Some(jobs_dir) = slurm() else { return };
    let site = Site::new().await;
    let wf = unique("cancelled").replace('-', "_");
    let door = site.upload("slurm/cancelled.dat", &data(2_000, 5)).await;
    let keys = "env = { SLEEP = \"300\" }";
    let config = site.write_workflow_config("", &workflow(&site, &jobs_dir, &wf, keys, 3));
    let child = site.spawn_replay(&config, None);
    let prefix = format!("dcflow.{wf}.");
    wait_for("the job to run", Duration::from_secs(60), || {
        jobs(&prefix).iter().any(|j| j.2 == "RUNNING")
    });
    let id = jobs(&prefix)[0].0.clone();
    let cancel = Command::new("scancel").arg(&id).output().unwrap();
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let out = child.wait_with_output().unwrap();
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let ran = ended_jobs(&prefix, 1);
    assert_eq!(ran.len(), 1, "not submitted again: {ran:?}");
    assert_eq!(ran[0].2, "CANCELLED", "{ran:?}");
    let failed = site.records("failed.csv");
    assert!(
        failed[0]
            .error
            .contains(&format!("Slurm job {id} ended CANCELLED"))
            && failed[0].error.contains("not submitted again"),
        "{}",
        failed[0].error
    );
    assert!(site.sim.stored_file(&door).exists(), "the source is kept");
}

/// `time = "0:01"`: Slurm ends the job as TIMEOUT (its limits are checked every ~30 s), and
/// the workflow records it (attempts = 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_time_limit_ends_as_timeout() {
    let Some(jobs_dir) = slurm() else { return };
    let site = Site::new().await;
    let wf = unique("slow").replace('-', "_");
    site.upload("slurm/slow.dat", &data(1_000, 3)).await;
    let keys = "time = \"0:01\"\nenv = { SLEEP = \"600\" }";
    let config = site.write_workflow_config("", &workflow(&site, &jobs_dir, &wf, keys, 1));
    let out = site.replay(&config);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let ran = ended_jobs(&format!("dcflow.{wf}."), 1);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(ran[0].2, "TIMEOUT", "{ran:?}");
    let failed = site.records("failed.csv");
    assert!(
        failed[0].error.contains("ended TIMEOUT"),
        "{}",
        failed[0].error
    );
}

/// `maxjobs = 1`, one transfer slot, four files, jobs of 4 s: never two jobs of the step at
/// once, and every file copied while the first job still runs (a workflow waiting for its
/// job, or for a job slot, holds no transfer slot). The first file's job was submitted before
/// dcflow started, under the step's name (as after a crash between sbatch and the state
/// file): it is followed, not submitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxjobs_holds_workflows_back_while_copies_go_on_and_a_job_found_by_name_is_followed() {
    let Some(jobs_dir) = slurm() else { return };
    let site = Site::new().await;
    let wf = unique("capped").replace('-', "_");
    let mut rels = Vec::new();
    for i in 0..4 {
        let rel = format!("slurm/capped-{i}.dat");
        site.upload(&rel, &data(30_000 + i, 70 + i as u32)).await;
        rels.push(rel);
    }
    // The job of file 0, already in Slurm under its deterministic name.
    let name = format!("dcflow.{wf}.2.{}", pnfsid_of(&site, &rels[0]));
    let marker = site.path("adopted");
    let pre = Command::new("sbatch")
        .args([
            "--parsable",
            &format!("--job-name={name}"),
            &format!("--chdir={}", jobs_dir.display()),
            "--output=/dev/null",
            &format!("--wrap=sleep 2; touch {}", marker.display()),
        ])
        .output()
        .unwrap();
    assert!(pre.status.success(), "sbatch: {}", text(&pre.stderr));
    let keys = "maxjobs = 1\nenv = { SLEEP = \"4\" }";
    let config = site.write_workflow_config(
        "maxdownloads = 1",
        &workflow(&site, &jobs_dir, &wf, keys, 1),
    );
    let log = site.path("replay.log");
    let mut child = site.spawn_replay(&config, Some(&log));
    let pre_id = text(&pre.stdout).trim().to_owned();
    let mut most = 0;
    let mut jobs_started_when_all_copied = None;
    let out = loop {
        let squeue = Command::new("squeue")
            .args(["-h", "-o", "%i %j"])
            .output()
            .unwrap();
        let in_slurm = text(&squeue.stdout)
            .lines()
            .filter(|l| {
                l.contains(&format!(" dcflow.{wf}.")) && !l.starts_with(&format!("{pre_id} "))
            })
            .count();
        most = most.max(in_slurm);
        if jobs_started_when_all_copied.is_none()
            && rels.iter().all(|r| site.download().join(r).exists())
        {
            let started = rels
                .iter()
                .filter(|r| site.download().join(format!("{r}.jobs")).exists())
                .count();
            jobs_started_when_all_copied = Some(started);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out, Some(0), "{log}");
    assert_eq!(most, 1, "maxjobs = 1 let {most} jobs into Slurm at once");
    assert!(
        jobs_started_when_all_copied.is_some_and(|n| n <= 1),
        "the copies waited for the jobs ({jobs_started_when_all_copied:?} jobs had started)\n{log}"
    );
    assert!(marker.exists(), "the job found by name ran to its end");
    assert!(log.contains("found in Slurm by its name"), "{log}");
    let ran = ended_jobs(&format!("dcflow.{wf}."), 4);
    assert_eq!(
        ran.len(),
        4,
        "one job per file, the first not submitted twice: {ran:?}"
    );
    assert_eq!(log.matches("SLURM_SUBMIT").count(), 3, "{log}");
}

/// `dcflow run` on the billing topic, killed (SIGKILL) while its jobs run, started again: the
/// jobs are followed, not submitted again; every workflow ends; the offsets reach the end of
/// the topic only once the jobs ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_jobs_run_then_restarted_no_job_twice_and_every_workflow_ends() {
    let Some(jobs_dir) = slurm() else { return };
    let Some(broker) = broker() else { return };
    let (topic, group) = (unique("billing"), unique("group"));
    let site = Site::with_kafka_counted(&broker, &topic).await;
    let wf = unique("restart").replace('-', "_");
    let mut rels = Vec::new();
    for i in 0..3 {
        let rel = format!("slurm/k-{i}.dat");
        site.upload(&rel, &data(10_000 + i, 90 + i as u32)).await;
        rels.push(rel);
    }
    site.sim.flush_billing();
    let keys = "env = { SLEEP = \"6\" }";
    let kafka = kafka_keys(&topic, &broker, &group);
    let config = site.write_kafka_config(&kafka, "");
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str(&workflow(&site, &jobs_dir, &wf, keys, 1));
    let address = free_address();
    text_cfg.push_str(&format!("\n[metrics]\naddress = \"{address}\"\n"));
    std::fs::write(&config, text_cfg).unwrap();
    let jobs_metric = |state: &str, name: &str| -> f64 {
        let (_, body) = http_get(&address, "/metrics");
        let line = format!("{name}{{state=\"{state}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&line)?.parse().ok())
            .unwrap_or(0.0)
    };

    let log1 = site.path("run1.log");
    let first = start_run(&config, &log1);
    wait_for_logged(
        "three jobs submitted",
        Duration::from_secs(60),
        &log1,
        || std::fs::read_to_string(&log1).is_ok_and(|l| l.matches("SLURM_SUBMIT").count() == 3),
    );
    wait_for_logged(
        "/metrics to count 3 jobs in Slurm",
        Duration::from_secs(30),
        &log1,
        || {
            jobs_metric("PENDING", "dcflow_slurm_jobs")
                + jobs_metric("RUNNING", "dcflow_slurm_jobs")
                == 3.0
        },
    );
    let (_, status) = http_get(&address, "/status.json");
    assert!(status.contains("\"slurm\""), "{status}");
    kill9(first);
    let (committed, end) = committed_and_end(&broker, &topic, &group);
    assert!(
        committed < end,
        "committed {committed} of {end} while the jobs ran"
    );

    let log2 = site.path("run2.log");
    let second = start_run(&config, &log2);
    wait_for_logged(
        "every workflow ended",
        Duration::from_secs(120),
        &log2,
        || site.records("success.csv").len() >= 3,
    );
    wait_committed_to_end(&broker, &topic, &group);
    assert_eq!(
        jobs_metric("COMPLETED", "dcflow_slurm_jobs_ended_total"),
        3.0
    );
    assert_eq!(stop(second), 0);
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(
        !log.contains("SLURM_SUBMIT"),
        "a job submitted again:\n{log}"
    );
    assert_eq!(log.matches("SLURM_FOLLOW").count(), 3, "{log}");
    let ran = ended_jobs(&format!("dcflow.{wf}."), 3);
    assert_eq!(ran.len(), 3, "{ran:?}");
    assert!(ran.iter().all(|j| j.2 == "COMPLETED"), "{ran:?}");
    for rel in &rels {
        let copy = site.download().join(rel);
        assert_eq!(read(copy.with_extension("dat.sha256")), sha256(&copy));
    }
    let success = site.records("success.csv");
    assert_eq!(success.len(), 3, "{success:?}");
}
