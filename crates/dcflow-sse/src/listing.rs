//! The door's listing for the SSE source: the folders below a watched one (to subscribe them)
//! and the files a storage event or a resynchronisation reports, through the same walker and
//! upload message as `dcflow sync` (`dcflow_transfer::listing`, `dcflow_workflow::sync`).

use anyhow::{Context as _, Result};
use dcflow_transfer::listing::Entry;
use url::Url;

use crate::Source;

impl Source {
    /// The door URL of a namespace path.
    pub(crate) fn door_url(&self, ns_path: &str) -> Result<Url> {
        dcflow_workflow::sync::door_url(&self.door, &self.pool, ns_path)
            .with_context(|| format!("{ns_path} is not under {}", self.pool))
    }

    /// The namespace path of a listed entry.
    pub(crate) fn ns_path(&self, entry: &Entry) -> Option<String> {
        dcflow_workflow::sync::namespace_path(&self.door, &self.pool, &entry.path)
    }

    /// The folders directly below `dir` (namespace paths), from a PROPFIND `Depth: 1`.
    pub(crate) async fn subfolders(&self, dir: &str) -> Result<Vec<String>> {
        let url = self.door_url(dir)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Entry>(256);
        let engine = self.pipeline.engine_arc();
        let listing = tokio::spawn(async move { engine.list_folder(&url, &tx).await });
        let mut out = Vec::new();
        while let Some(entry) = rx.recv().await {
            if entry.is_dir {
                out.extend(self.ns_path(&entry));
            }
        }
        listing
            .await
            .context("the listing panicked")?
            .with_context(|| format!("PROPFIND {dir}"))?;
        Ok(out)
    }
}

/// One entry of a directory: not empty, not `.` or `..`, without `/` or NUL.
pub(crate) fn plain_name(name: &str) -> bool {
    !matches!(name, "" | "." | "..") && !name.contains(['/', '\0'])
}

/// The upload message of a file at namespace path `ns` (see
/// `dcflow_workflow::sync::listed_message`).
pub(crate) fn upload_message(ns: &str, entry: &Entry) -> Vec<u8> {
    dcflow_workflow::sync::listed_message("sse", ns, entry)
}
