//! The `catalog` step's table, and its query for `dcflow catalog`: one row per (workflow, billing path)
//! in an SQLite file, upserted, so a redelivered event updates its row instead of adding one.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    workflow   TEXT NOT NULL,
    path       TEXT NOT NULL,
    local_path TEXT,
    size       INTEGER,
    checksum   TEXT,
    pnfsid     TEXT NOT NULL,
    status     TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    updated    TEXT NOT NULL,
    PRIMARY KEY (workflow, path)
);";

/// One catalog file, shared by every step that names it.
#[derive(Clone)]
pub struct Catalog {
    conn: Arc<Mutex<Connection>>,
}

/// A catalog row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub workflow: String,
    pub path: String,
    pub local_path: Option<String>,
    pub size: Option<i64>,
    pub checksum: Option<String>,
    pub pnfsid: String,
    /// `present` (copied and at `local_path`), `announced` (no copy in this workflow),
    /// `removed`, `restored` or `stored`.
    pub status: String,
    pub first_seen: String,
    pub updated: String,
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = crate::state::open_sqlite(path, "the catalog", SCHEMA)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Inserts the row of (workflow, path), or updates it keeping `first_seen`.
    pub async fn upsert(&self, e: Entry) -> Result<()> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("catalog lock");
            conn.execute(
                "INSERT INTO files (workflow, path, local_path, size, checksum, pnfsid, status,
                                    first_seen, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
                         strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                         strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 ON CONFLICT (workflow, path) DO UPDATE SET
                     local_path = excluded.local_path, size = excluded.size,
                     checksum = excluded.checksum, pnfsid = excluded.pnfsid,
                     status = excluded.status, updated = excluded.updated",
                params![
                    e.workflow,
                    e.path,
                    e.local_path,
                    e.size,
                    e.checksum,
                    e.pnfsid,
                    e.status
                ],
            )?;
            Ok(())
        })
        .await?
    }
}

/// Rows of a catalog file, for `dcflow catalog`: optionally of one workflow, and with paths
/// matching an SQLite GLOB (`*`, `?`, `[...]`).
pub fn query(path: &Path, workflow: Option<&str>, glob: Option<&str>) -> Result<Vec<Entry>> {
    if !path.exists() {
        anyhow::bail!("no catalog at {}", path.display());
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening the catalog {}", path.display()))?;
    let mut stmt = conn.prepare(
        "SELECT workflow, path, local_path, size, checksum, pnfsid, status, first_seen, updated
         FROM files WHERE (?1 IS NULL OR workflow = ?1) AND (?2 IS NULL OR path GLOB ?2)
         ORDER BY path, workflow",
    )?;
    let rows = stmt.query_map(params![workflow, glob], |r| {
        Ok(Entry {
            workflow: r.get(0)?,
            path: r.get(1)?,
            local_path: r.get(2)?,
            size: r.get(3)?,
            checksum: r.get(4)?,
            pnfsid: r.get(5)?,
            status: r.get(6)?,
            first_seen: r.get(7)?,
            updated: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
