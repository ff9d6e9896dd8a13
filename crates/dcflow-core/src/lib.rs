//! dcflow's rules: what a dCache event means, what the configuration says, where a file goes,
//! and how outcomes are recorded. No sockets, no Kafka.
//!
//! # Layout
//! ```text
//! event    JSON billing message → BillingMessage → Upload (or why not)
//! health   whether the brokers, the frontend and the door answer; outages logged once
//! config   TOML → Config (every problem reported with its key)
//! mapping  billing path → (source URL, destination) with escape checks
//! publish  Publish: a topic to write messages to (implemented by dcflow-kafka)
//! retry    RetryPolicy: attempts and back-off with jitter
//! section  the raw TOML walk that reports every problem (used by config and workflow)
//! text     an error with its causes; fields cut to a bounded length, with a marker
//! records  success/failure CSV files
//! watermark contiguous commit positions per partition (Kafka offsets, SSE ids)
//! workflow [[workflow]] rules: which uploads start which ordered steps
//! ```

pub mod config;
pub mod event;
pub mod health;
pub mod mapping;
pub mod publish;
pub mod records;
pub mod retry;
mod section;
pub mod text;
pub mod watermark;
pub mod workflow;

pub use config::{ChecksumAlgo, Config, ConfigError, Env};
pub use event::{
    upload_message, BillingMessage, DecodeError, Glance, NotAnUpload, Peek, PnfsId, Selector,
    Sorted, Upload, UploadSignal,
};
pub use health::{Health, Upstream};
pub use mapping::{Mapped, PathEscapes, PathMapper};
pub use publish::{Connect, Publish};
pub use records::{Record, RecordFile};
pub use retry::RetryPolicy;
pub use watermark::{Ticket, Watermarks};
pub use workflow::{Step, Template, Workflow};
