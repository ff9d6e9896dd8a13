//! A dCache emulator for dcflow's tests and benchmarks, written from dCache's behaviour (see
//! `fixtures/billing` and `fixtures/sse`), independent of dcflow's own crates so that
//! dcflow's assumptions are tested rather than copied.
//!
//! # Layout
//! ```text
//! pki      test CA in a grid CA folder, host/user certs, RFC 3820 proxies, proxy-aware verifier
//! door     WebDAV door over TLS: auth (client cert or bearer token), HEAD + Want-Digest,
//!          GET → 302/307 to the pool with a one-time dcache-http-uuid, PUT (201), DELETE (204)
//! pool     pool HTTP mover over TLS: one-time uuid, body with faults, records Authorization
//! billing  billing messages in dCache's exact JSON, to a JSONL file and memory
//! frontend storage events over SSE: channels, inotify subscriptions, Last-Event-ID replay,
//!          EVENT_LOSS, 404 for forgotten channels
//! faults   per-path fault rules (status, reset, hang, truncate, stall, flipped byte,
//!          wrong digest, slow link, 404-until-committed upload directory)
//! ```

pub mod billing;
pub mod faults;
pub mod frontend;
pub mod kafka;
pub mod pki;
mod server;

pub use faults::{Fault, FaultRule};
pub use pki::{PkiFiles, ProxyKey};
pub use server::{BillingOrder, Sim, SimConfig, SimKafka};
