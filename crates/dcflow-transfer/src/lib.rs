//! Getting bytes out of dCache, verified: HTTPS with grid credentials, checksums, atomic
//! publication at the final path.
//!
//! # Layout
//! ```text
//! credentials  CA folder → roots; X.509 proxy → client cert (re-read on change); bearer token
//! engine       Engine::copy: retries around attempts; GET door → pool, stream, verify, rename
//! checksum     adler32/md5 while streaming; Digest header parsing and comparison
//! fsutil       safe directory creation, temporary names, fsync, rename
//! error        TransferError and the retry decision (is_retryable)
//! listing      PROPFIND Depth 1, streamed (size, pnfsid, adler32, locality); walk a tree
//! tape         a file's locality; dCache's WLCG Tape REST API (stage, progress, release)
//! ```

pub mod checksum;
pub mod credentials;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod listing;
pub mod tape;

pub use checksum::Checksum;
pub use credentials::{CredentialError, Credentials};
pub use engine::{Copied, Engine, EngineSettings, Failed, Job, LocalCopy};
pub use error::{causes, TransferError};
