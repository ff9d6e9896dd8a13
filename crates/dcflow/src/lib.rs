//! dcflow, the binary: wiring only. The work is in the libraries:
//!
//! ```text
//! dcflow-core      events, configuration, mapping, records, watermarks, Publish
//! dcflow-transfer  the verified, atomic HTTPS copy (Engine)
//! dcflow-workflow  Pipeline: admission ──► executor ──► steps/ ──► records
//! dcflow-kafka     the billing-topic source (commits), producers, the dispatch loop
//! dcflow-sse       the storage-event source (frontend channels, resynchronisation)
//! ```
//!
//! # Layout
//! ```text
//! main.rs      parse, log, run one command; the exit code in one match
//! cli.rs       the command line (clap)
//! commands/    one module per command; Failure → exit code
//! daemon.rs    signals, root cancellation tokens, the tracker of long-lived tasks
//! metrics.rs   the HTTP endpoint: /metrics, /healthz, /readyz, the status page
//! ```
//! `commands/demo` (and its emulator) is behind the default-on `demo` feature:
//! `cargo build --release --no-default-features -p dcflow` builds the production binary
//! without them.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod metrics;

/// The pipeline of a configuration, with Kafka producers (the `produce` steps, the
/// dead-letter topic) when `[kafka]` is configured.
pub fn pipeline(cfg: &dcflow_core::Config) -> anyhow::Result<dcflow_workflow::Pipeline> {
    match &cfg.kafka {
        Some(kafka) => {
            let connect = dcflow_kafka::connector(kafka);
            dcflow_workflow::Pipeline::try_new(cfg, Some(&connect))
        }
        None => dcflow_workflow::Pipeline::try_new(cfg, None),
    }
}
