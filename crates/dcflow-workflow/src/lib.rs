//! What dcflow does with a storage event, whatever its source (a replay file, Kafka, SSE).
//!
//! # Layout
//! ```text
//! pipeline   Pipeline: built from the Config; records, dead letters, halting
//! admission  admit(): decode, select, dedupe (door request + pool transfer), take a permit
//! seen       the uploads in flight and recently finished, for merging duplicates
//! executor   run(): each matching workflow's steps in order, resumed from the state store,
//!            then one success or failure record
//! steps/     one module per step kind: copy, delete_source, unpack, exec, webhook, produce,
//!            catalog; StepError (retryable or not) and `retrying`
//! state      StateStore: finished steps and destination claims (SQLite)
//! catalog    Catalog: the `catalog` step's table (SQLite)
//! stats      Stats (Prometheus counters) and Activity (the status page), per pipeline
//! batch      Batch and Summary: a finite source through the pipeline, bounded by permits
//! sync       what dCache holds already (the door's listing, walked) through the pipeline
//! tape       [tape]: locality, staging through dCache's tape API without a transfer slot
//! ```
//! Kafka is reached only through `dcflow_core::Publish` (implemented by dcflow-kafka):
//! nothing here links librdkafka.

pub mod admission;
pub mod batch;
pub mod catalog;
pub mod executor;
pub mod pipeline;
mod seen;
pub mod state;
pub mod stats;
pub mod steps;
pub mod sync;
pub mod tape;

pub use admission::{Admission, Merged, Task};
pub use batch::{Batch, Summary};
pub use pipeline::{dead_letter, FileOutcome, Pipeline, Unrecorded};
pub use stats::{Activity, Stats};
pub use steps::StepError;

use dcflow_core::Config;
use dcflow_transfer::EngineSettings;

/// What the transfer engine needs from the configuration (the engine itself knows no
/// `Config`).
pub fn engine_settings(c: &Config) -> EngineSettings {
    EngineSettings {
        checksums: c.dcache.checksums.clone(),
        require_checksum: c.dcache.require_checksum,
        timeout: c.dcache.timeout,
        stall_timeout: c.dcache.stall_timeout,
        retry: c.dcache.retry,
        permissions: c.local.permissions,
        download_folder: c.local.download_folder.clone(),
        api_origins: std::iter::once(&c.dcache.url)
            .chain(c.sse.as_ref().map(|s| &s.url))
            .chain(c.tape.as_ref().map(|t| &t.api))
            .filter(|u| u.scheme() == "https")
            .map(url::Url::origin)
            .collect(),
    }
}
