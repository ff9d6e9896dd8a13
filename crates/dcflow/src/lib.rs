//! dcflow: dCache storage events in, verified files out.
//!
//! # Layout
//! ```text
//! source (replay file | stdin) ──► pipeline::admit (decode, select, dedupe, permit)
//!     ──► pipeline::run: each matching workflow's steps in order
//!         (copy: Engine::copy, verified and atomic; delete-source; steps::exec; steps::webhook)
//!     ──► records (CSV) + logs
//! ```
//! `main.rs` parses the command line and decides exit codes; `check` summarises a
//! configuration; `demo` runs the whole flow against the in-process emulator.

pub mod check;
pub mod demo;
pub mod dispatch;
pub mod metrics;
pub mod replay;
pub mod retry;
pub mod run;
pub mod status;

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
