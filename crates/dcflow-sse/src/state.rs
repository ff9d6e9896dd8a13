//! The state file (`[sse] statefile`): the channel, the last event id whose predecessors all
//! finished, and whether a resynchronisation is due. Written atomically (a temporary file,
//! fsync, rename, folder fsync).

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// What survives a restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Saved {
    pub(crate) channel: Option<String>,
    pub(crate) last_event_id: Option<u64>,
    /// Events were lost and the resynchronisation has not finished yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) resync_pending: bool,
}

pub(crate) fn load(path: &Path) -> Saved {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub(crate) fn save(path: &Path, saved: &Saved) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(saved)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the folder is.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
