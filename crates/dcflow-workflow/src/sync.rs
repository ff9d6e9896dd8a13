//! What is in dCache already, through the same workflows as events: `dcflow sync` walks
//! `pool + folder` on the door (`dcflow_transfer::listing::walk`, streamed, level by level)
//! and sends each file through the pipeline, which copies what the destination lacks or holds
//! with another size or checksum. The SSE source's resynchronisation lists the same way.
//!
//! ```text
//! walk (PROPFIND Depth 1, streamed) ──► Listed (namespace path, size, pnfsid, adler32,
//!   locality) ──► --since filter ──► upload message ──► Pipeline::admit ──► Batch
//! ```

use std::sync::Arc;

use anyhow::{Context, Result};
use dcflow_transfer::listing::{walk, Entry};
use md5::{Digest, Md5};
use tokio::sync::mpsc;
use url::Url;

use crate::batch::{Batch, Summary};
use crate::pipeline::Pipeline;

/// The door URL of a namespace path (`pool + rel` → `url + rel`), each segment encoded.
pub fn door_url(door: &Url, pool: &str, ns_path: &str) -> Option<Url> {
    let rel = if pool.is_empty() {
        ns_path
    } else {
        ns_path.strip_prefix(pool)?
    };
    let mut url = door.clone();
    {
        let mut segs = url.path_segments_mut().ok()?;
        segs.pop_if_empty();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            segs.push(part);
        }
    }
    Some(url)
}

/// The namespace path of a listed entry (`url`'s path + rel → `pool + rel`).
pub fn namespace_path(door: &Url, pool: &str, url_path: &str) -> Option<String> {
    let base = percent_encoding::percent_decode_str(door.path())
        .decode_utf8_lossy()
        .trim_end_matches('/')
        .to_owned();
    let rel = url_path.strip_prefix(&base)?;
    if !(rel.is_empty() || rel.starts_with('/')) {
        return None;
    }
    Some(format!("{pool}{rel}"))
}

/// A billing-like upload message for a file that a listing (or a storage event) reports, at
/// namespace path `ns_path`. The pnfsid is dCache's (from the ETag) or, for a door that gives
/// none, a stand-in: 36 hex digits of a hash of the path, the size and the ETag or
/// modification time, the same for one file whoever reports it and new for a re-upload.
pub fn listed_message(signal: &str, ns_path: &str, entry: &Entry) -> Vec<u8> {
    let pnfsid = entry.pnfsid().unwrap_or_else(|| {
        let mut h = Md5::new();
        h.update(b"dcflow-sse\0");
        h.update(ns_path.as_bytes());
        h.update(b"\0");
        h.update(
            entry
                .size
                .map(|s| s.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(b"\0");
        h.update(
            entry
                .etag
                .as_deref()
                .or(entry.modified.as_deref())
                .unwrap_or("")
                .as_bytes(),
        );
        let digest: [u8; 16] = h.finalize().into();
        let hex: String = digest.iter().map(|b| format!("{b:02X}")).collect();
        format!("0000{hex}")
    });
    dcflow_core::upload_message(signal, &pnfsid, ns_path, entry.size)
}

/// What a dry run found.
#[derive(Debug, Clone, Copy, Default)]
pub struct DryRun {
    pub files: u64,
    pub bytes: u64,
    /// The destination holds a file of the same size (a real sync also compares checksums).
    pub present: u64,
    pub would_copy: u64,
    pub would_copy_bytes: u64,
    /// Listed, but not ours: older than --since, not under pool + folder, or still being
    /// uploaded (listed without a size).
    pub skipped: u64,
}

impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files ({}): {} already present (same size), {} would be copied ({}); {} skipped",
            self.files,
            dcflow_transfer::engine::human_bytes(self.bytes),
            self.present,
            self.would_copy,
            dcflow_transfer::engine::human_bytes(self.would_copy_bytes),
            self.skipped
        )
    }
}

/// Where a walk starts and how its entries map: the door, `pool`, and the folder below it.
#[derive(Debug, Clone)]
pub struct Tree {
    pub door: Url,
    pub pool: String,
    pub folder: String,
}

impl Tree {
    pub fn of(c: &dcflow_core::Config) -> Self {
        Self {
            door: c.dcache.url.clone(),
            pool: c.dcache.pool.clone(),
            folder: c.dcache.folder.clone(),
        }
    }

    fn root(&self) -> Result<Url> {
        door_url(
            &self.door,
            &self.pool,
            &format!("{}{}", self.pool, self.folder),
        )
        .context("the folder's URL on the door")
    }

    /// The files below the tree's root, as (namespace path, entry), newer than `since` when
    /// given; the walk runs as they are taken (a bounded channel between them).
    fn files(&self, engine: Arc<dcflow_transfer::Engine>, since: Option<i64>) -> Result<Listing> {
        let root = self.root()?;
        let (tx, rx) = mpsc::channel::<Entry>(1024);
        let at = root.clone();
        let walker = tokio::spawn(async move { walk(&engine, &at, tx).await });
        Ok(Listing {
            root,
            rx,
            walker,
            tree: self.clone(),
            since,
            left_out: 0,
        })
    }
}

/// The files of a walk as they come.
struct Listing {
    root: Url,
    rx: mpsc::Receiver<Entry>,
    walker: tokio::task::JoinHandle<Result<u64, dcflow_transfer::TransferError>>,
    tree: Tree,
    since: Option<i64>,
    /// Files left out: older than `since`, or still being uploaded.
    left_out: u64,
}

impl Listing {
    async fn next(&mut self) -> Option<(String, Entry)> {
        while let Some(entry) = self.rx.recv().await {
            if entry.is_dir {
                continue;
            }
            let Some(ns) = namespace_path(&self.tree.door, &self.tree.pool, &entry.path) else {
                continue;
            };
            if self
                .since
                .is_some_and(|since| entry.modified_unix().is_some_and(|m| m < since))
            {
                self.left_out += 1;
                continue;
            }
            if entry.being_written() {
                // Copying it now would fail (dCache answers 500) and record a failure.
                tracing::info!(path = %ns, "listed without a size: still being uploaded, left for its storage event or the next sync");
                self.left_out += 1;
                continue;
            }
            return Some((ns, entry));
        }
        None
    }

    /// The walk's own end: an error when a listing failed.
    async fn end(self) -> Result<u64> {
        self.walker
            .await
            .context("the walk panicked")?
            .with_context(|| format!("listing {} did not finish", self.root))
    }
}

/// Says, on `say`, what a sync would copy, and sums it up; reads the door's listing and the
/// destination's metadata only (nothing is written, no record either).
pub async fn dry_run(
    engine: Arc<dcflow_transfer::Engine>,
    mapper: &dcflow_core::PathMapper,
    tree: &Tree,
    since: Option<i64>,
    mut say: impl FnMut(&str),
) -> Result<DryRun> {
    let mut listing = tree.files(engine, since)?;
    let mut dry = DryRun::default();
    while let Some((ns, entry)) = listing.next().await {
        let size = entry.size.unwrap_or(0);
        let Ok(Some(mapped)) = mapper.map(&ns) else {
            dry.skipped += 1;
            continue;
        };
        dry.files += 1;
        dry.bytes += size;
        let local = std::fs::metadata(&mapped.destination).ok();
        if local
            .as_ref()
            .is_some_and(|m| m.is_file() && m.len() == size)
        {
            dry.present += 1;
            continue;
        }
        dry.would_copy += 1;
        dry.would_copy_bytes += size;
        let why = if local.is_some() {
            "differs"
        } else {
            "missing"
        };
        say(&format!(
            "would copy {ns} ({}) to {} ({why})",
            dcflow_transfer::engine::human_bytes(size),
            mapped.destination.display()
        ));
    }
    dry.skipped += listing.left_out;
    listing.end().await?;
    Ok(dry)
}

/// Walks the tree and sends every file through the pipeline, as a batch: what the destination
/// lacks, or holds with another size or checksum, is copied; every workflow runs as for an
/// event. The walk waits while every transfer slot is busy.
pub async fn sync(pipeline: Arc<Pipeline>, tree: &Tree, since: Option<i64>) -> Result<Summary> {
    let mut listing = tree.files(pipeline.engine_arc(), since)?;
    let mut batch = Batch::new(pipeline.clone());
    while let Some((ns, entry)) = listing.next().await {
        // The listing says where the bytes are and their checksums: no request of its own
        // per file (a PROPFIND for the locality, a HEAD for the checksum).
        pipeline.note_listed(&ns, &entry);
        let raw = listed_message("sync", &ns, &entry);
        batch.push(&raw, &format!("sync of {ns}")).await?;
    }
    // What was listed before a listing failed still ends (copied or recorded); then the
    // listing's error is the run's.
    let summary = batch.finish().await?;
    listing.end().await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn door_and_namespace_paths_map_both_ways() {
        let door = Url::parse("https://door:2880/lsst").unwrap();
        let pool = "/pnfs/example.org/data/lsst";
        let url = door_url(&door, pool, "/pnfs/example.org/data/lsst/run 1/f#1.dat").unwrap();
        assert_eq!(url.as_str(), "https://door:2880/lsst/run%201/f%231.dat");
        assert_eq!(
            namespace_path(&door, pool, "/lsst/run 1/f#1.dat").as_deref(),
            Some("/pnfs/example.org/data/lsst/run 1/f#1.dat")
        );
        assert_eq!(
            namespace_path(&door, pool, "/lsst2/x"),
            None,
            "not below the door's path"
        );
        let root = Url::parse("https://door:2880").unwrap();
        assert_eq!(
            namespace_path(&root, "", "/public/a").as_deref(),
            Some("/public/a")
        );
        assert_eq!(
            door_url(&root, "", "/public/a b").unwrap().as_str(),
            "https://door:2880/public/a%20b"
        );
    }

    #[test]
    fn a_listed_file_is_an_upload_with_dcache_s_pnfsid_or_a_stand_in() {
        let entry = |etag: Option<&str>| Entry {
            path: "/door/x".into(),
            size: Some(7),
            etag: etag.map(String::from),
            ..Entry::default()
        };
        let decode = |raw: &[u8]| {
            dcflow_core::BillingMessage::decode(raw)
                .unwrap()
                .upload()
                .unwrap()
                .pnfsid
                .to_string()
        };
        let real = listed_message(
            "sync",
            "/p/x",
            &entry(Some("\"0000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA_1\"")),
        );
        assert_eq!(decode(&real), "0000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        let a = listed_message("sync", "/p/x", &entry(Some("\"v1\"")));
        let b = listed_message("sync", "/p/x", &entry(Some("\"v1\"")));
        let c = listed_message("sync", "/p/x", &entry(Some("\"v2\"")));
        assert_eq!(decode(&a), decode(&b), "one file, one stand-in");
        assert_ne!(decode(&a), decode(&c), "a re-upload is a new file");
    }
}
