//! Which workflow steps finished, per pnfsid: an SQLite file (`[local] statefile`).
//!
//! After each step succeeds, a row (pnfsid, workflow, step, context) is written. When the
//! same event comes again (a replay, a crash before the offset was committed, a rebalance,
//! `dcflow retry`), the workflow resumes after its last finished step, with the context that
//! step left: nothing finished is done twice. A crash between a step's effect and its row
//! means that one step runs again (at least once).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Clone)]
pub struct StateStore {
    conn: Arc<Mutex<Connection>>,
}

/// Where a workflow stands for one event.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Steps finished, counted from the first (they finish in order).
    pub done: usize,
    /// The context the last finished step left.
    pub context: BTreeMap<String, String>,
}

impl StateStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = open_sqlite(
            path,
            "the state file",
            "CREATE TABLE IF NOT EXISTS steps (
                 pnfsid   TEXT NOT NULL,
                 workflow TEXT NOT NULL,
                 step     INTEGER NOT NULL,
                 kind     TEXT NOT NULL,
                 done_at  TEXT NOT NULL,
                 context  TEXT NOT NULL,
                 PRIMARY KEY (pnfsid, workflow, step)
             );
             CREATE TABLE IF NOT EXISTS slurm_jobs (
                 pnfsid    TEXT NOT NULL,
                 workflow  TEXT NOT NULL,
                 step      INTEGER NOT NULL,
                 job_id    TEXT NOT NULL,
                 submitted TEXT NOT NULL,
                 ended     TEXT,
                 state     TEXT,
                 exit_code TEXT,
                 PRIMARY KEY (pnfsid, workflow, step, job_id)
             );
             CREATE TABLE IF NOT EXISTS destinations (
                 local_path   TEXT PRIMARY KEY,
                 billing_path TEXT NOT NULL,
                 pnfsid       TEXT NOT NULL,
                 claimed_at   TEXT NOT NULL
             );",
        )?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Where `workflow` stands for the event `key` (pnfsid, or kind:pnfsid).
    pub async fn progress(&self, key: &str, workflow: &str) -> Result<Progress> {
        let conn = self.conn.clone();
        let (key, workflow) = (key.to_owned(), workflow.to_owned());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("state lock");
            let row: Option<(i64, String)> = conn
                .query_row(
                    "SELECT step, context FROM steps WHERE pnfsid = ?1 AND workflow = ?2
                     ORDER BY step DESC LIMIT 1",
                    params![key, workflow],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(match row {
                Some((step, context)) => Progress {
                    done: step as usize,
                    context: serde_json::from_str(&context).unwrap_or_default(),
                },
                None => Progress::default(),
            })
        })
        .await?
    }

    /// Step `step` (1-based) of `workflow` finished for `key`, leaving `context`.
    pub async fn finished(
        &self,
        key: &str,
        workflow: &str,
        step: usize,
        kind: &str,
        context: &BTreeMap<&'static str, String>,
    ) -> Result<()> {
        let conn = self.conn.clone();
        let row = (
            key.to_owned(),
            workflow.to_owned(),
            step as i64,
            kind.to_owned(),
            serde_json::to_string(context)?,
        );
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("state lock");
            conn.execute(
                "INSERT OR REPLACE INTO steps (pnfsid, workflow, step, kind, done_at, context)
                 VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?5)",
                params![row.0, row.1, row.2, row.3, row.4],
            )?;
            Ok(())
        })
        .await?
    }
}

/// A Slurm job of a `slurm` step, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_id: String,
    /// The state it ended in; `None` while it has not been seen to end.
    pub ended: Option<String>,
}

impl StateStore {
    /// The jobs submitted (or adopted) for step `step` (1-based) of `workflow`, oldest first.
    pub async fn jobs(&self, key: &str, workflow: &str, step: usize) -> Result<Vec<JobRow>> {
        let conn = self.conn.clone();
        let (key, workflow) = (key.to_owned(), workflow.to_owned());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("state lock");
            let mut q = conn.prepare(
                "SELECT job_id, state FROM slurm_jobs WHERE pnfsid = ?1 AND workflow = ?2
                 AND step = ?3 ORDER BY submitted, CAST(job_id AS INTEGER)",
            )?;
            let rows = q.query_map(params![key, workflow, step as i64], |r| {
                Ok(JobRow {
                    job_id: r.get(0)?,
                    ended: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?
    }

    /// Job `job_id` is this step's now (submitted, or found in Slurm by its name); written
    /// before it is waited for, so that a restart follows it instead of submitting another.
    pub async fn job_submitted(
        &self,
        key: &str,
        workflow: &str,
        step: usize,
        job_id: &str,
    ) -> Result<()> {
        let conn = self.conn.clone();
        let row = (
            key.to_owned(),
            workflow.to_owned(),
            step as i64,
            job_id.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("state lock");
            conn.execute(
                "INSERT OR IGNORE INTO slurm_jobs (pnfsid, workflow, step, job_id, submitted)
                 VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                params![row.0, row.1, row.2, row.3],
            )?;
            Ok(())
        })
        .await?
    }

    /// Job `job_id` ended in `state` with `exit_code` (Slurm's `status:signal`).
    pub async fn job_ended(&self, job_id: &str, state: &str, exit_code: &str) -> Result<()> {
        let conn = self.conn.clone();
        let row = (job_id.to_owned(), state.to_owned(), exit_code.to_owned());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("state lock");
            conn.execute(
                "UPDATE slurm_jobs SET ended = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 state = ?2, exit_code = ?3 WHERE job_id = ?1",
                params![row.0, row.1, row.2],
            )?;
            Ok(())
        })
        .await?
    }
}

impl StateStore {
    /// Claims `local_path` for the file at `billing_path` before it is copied there. `Ok(None)`:
    /// it is ours (new, or already this path's: a re-upload replaces its own copy); `Some(other)`:
    /// another dCache file's copy is there (two sources mapped to one destination by a
    /// template), and copying would overwrite it. A claim whose file is gone from the
    /// destination is given up, so an operator who removes the file lets the other in.
    pub async fn claim(
        &self,
        local_path: &Path,
        billing_path: &str,
        pnfsid: &str,
    ) -> Result<Option<String>> {
        let conn = self.conn.clone();
        let local = local_path.to_owned();
        let (billing, pnfsid) = (billing_path.to_owned(), pnfsid.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().expect("state lock");
            // One claim at a time, across processes too (`run` beside `replay`).
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let key = local.to_string_lossy().into_owned();
            let holder: Option<String> = tx
                .query_row(
                    "SELECT billing_path FROM destinations WHERE local_path = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(other) = holder.filter(|h| h != &billing) {
                if std::fs::symlink_metadata(&local).is_ok() {
                    return Ok(Some(other));
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO destinations (local_path, billing_path, pnfsid, claimed_at)
                 VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                params![key, billing, pnfsid],
            )?;
            tx.commit()?;
            Ok(None)
        })
        .await?
    }
}

/// Opens (creating its folder and file) an SQLite database for dcflow's own use: WAL,
/// `synchronous = NORMAL`, a 10 s busy timeout, then `schema`. `what` names it in errors.
pub(crate) fn open_sqlite(path: &Path, what: &str, schema: &str) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the folder of {}", path.display()))?;
    }
    let conn =
        Connection::open(path).with_context(|| format!("opening {what} {}", path.display()))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; {schema}"
    ))
    .with_context(|| format!("preparing {what} {}", path.display()))?;
    Ok(conn)
}
