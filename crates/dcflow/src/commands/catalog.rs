//! `dcflow catalog`: the rows of a workflow catalog (the `catalog` step's SQLite file), as
//! CSV or JSON lines.

use std::path::{Path, PathBuf};

use anyhow::Result;
use dcflow_workflow::catalog::{query, Entry};
use serde_json::json;

use super::{load_config, Failure};

const WHO: &str = "dcflow";

pub fn command(
    config: Option<&Path>,
    database: Option<PathBuf>,
    workflow: Option<&str>,
    glob: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let database = match (database, config) {
        (Some(d), _) => d,
        (None, Some(config)) => the_catalog_of(config)?,
        (None, None) => {
            return Err(Failure::setup(
                WHO,
                anyhow::anyhow!(
                    "which catalog? give --database FILE, or --config FILE (also \
                     $DCFLOW_CONFIG; /etc/dcflow/dcflow.toml does not exist)"
                ),
            ))
        }
    };
    query(&database, workflow, glob)
        .and_then(|rows| print(&rows, json))
        .map_err(|e| Failure::setup(WHO, e))
}

/// The one database that the configuration's catalog steps name.
fn the_catalog_of(config: &Path) -> Result<PathBuf, Failure> {
    let cfg = load_config(config)?;
    let mut names: Vec<PathBuf> = cfg
        .workflow_rules
        .iter()
        .flat_map(|w| &w.steps)
        .filter_map(|s| match s {
            dcflow_core::Step::Catalog { database } => Some(database.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Failure::setup(
            WHO,
            anyhow::anyhow!("{} has no catalog step", config.display()),
        )),
        many => Err(Failure::setup(
            WHO,
            anyhow::anyhow!(
                "{} names several catalogs, choose one with --database: {}",
                config.display(),
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Prints rows as CSV (with a header) or as one JSON object per line.
pub fn print(entries: &[Entry], json_lines: bool) -> Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_lines {
        for e in entries {
            let v = json!({
                "workflow": e.workflow, "path": e.path, "local_path": e.local_path,
                "size": e.size, "checksum": e.checksum, "pnfsid": e.pnfsid,
                "status": e.status, "first_seen": e.first_seen, "updated": e.updated,
            });
            writeln!(out, "{v}")?;
        }
        return Ok(());
    }
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "workflow",
        "path",
        "local_path",
        "size",
        "checksum",
        "pnfsid",
        "status",
        "first_seen",
        "updated",
    ])?;
    for e in entries {
        w.write_record([
            e.workflow.as_str(),
            &e.path,
            e.local_path.as_deref().unwrap_or(""),
            &e.size.map(|s| s.to_string()).unwrap_or_default(),
            e.checksum.as_deref().unwrap_or(""),
            &e.pnfsid,
            &e.status,
            &e.first_seen,
            &e.updated,
        ])?;
    }
    w.flush()?;
    Ok(())
}
