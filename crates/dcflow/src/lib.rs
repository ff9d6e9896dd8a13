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

pub mod catalog;
pub mod check;
pub mod demo;
pub mod dispatch;
pub mod metrics;
pub mod pipeline;
pub mod replay;
pub mod retry;
pub mod run;
pub mod sse;
pub mod state;
pub mod status;
pub mod steps;
pub mod unpack;
