//! Transfer errors, and the one place that decides which are retried.

use std::path::PathBuf;

use dcflow_core::PathEscapes;

use crate::checksum::Checksum;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Connection refused or reset, TLS failure, broken body: the network's fault. Shown with
    /// its whole cause chain ("tcp connect error: Connection refused (os error 111)"):
    /// reqwest's own text is only "error sending request".
    #[error("{context} {url}: {}", causes(source))]
    Network {
        context: &'static str,
        /// Scheme, host, port and path (no query).
        url: String,
        source: reqwest::Error,
    },
    /// An HTTP status dCache answered with. `hint` names a likely cause.
    #[error("HTTP {status} from {url}{hint}")]
    Http {
        status: u16,
        url: String,
        hint: String,
    },
    /// 404: the file is not (yet) at its path; retried, since after SRM or upload-directory
    /// flows the file appears at its billing path only after commit (dCache #5285).
    #[error("not found (404) at {url}: not committed yet, or removed")]
    NotFound { url: String },
    #[error("authentication refused (HTTP {status}) by {url}: {hint}")]
    Auth {
        status: u16,
        url: String,
        hint: String,
    },
    #[error("no byte received for {seconds} s (stalled)")]
    Stalled { seconds: u64 },
    #[error("attempt took longer than the {seconds} s timeout")]
    TimedOut { seconds: u64 },
    #[error("body truncated: received {received} of {expected} bytes")]
    Truncated { received: u64, expected: u64 },
    #[error("size mismatch: received {received} bytes, dCache says {expected}")]
    SizeMismatch { received: u64, expected: u64 },
    #[error("checksum mismatch: computed {computed}, dCache says {expected}")]
    ChecksumMismatch {
        computed: Checksum,
        expected: Checksum,
    },
    #[error("dCache offers no checksum of the configured kinds ({wanted}); set requirechecksum = false to accept a size check only")]
    NoChecksum { wanted: String },
    /// The TLS handshake failed for a reason another attempt will not fix: the door's
    /// certificate is not trusted, or the door refused our certificate.
    #[error("TLS with {url} failed: {why}")]
    Tls { url: String, why: String },
    #[error("refusing redirect from {from} to {to}: {why}")]
    RedirectRefused {
        from: String,
        to: String,
        why: &'static str,
    },
    #[error(transparent)]
    PathEscapes(#[from] PathEscapes),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub use dcflow_core::text::causes;

impl TransferError {
    /// Whether another attempt may succeed. Timeouts, resets, stalls, 5xx, 429, 404 (not
    /// committed yet), truncated bodies and checksum mismatches are retried; auth failures,
    /// other 4xx, unsafe paths, refused redirects and local I/O errors are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Network { .. }
            | Self::NotFound { .. }
            | Self::Stalled { .. }
            | Self::TimedOut { .. }
            | Self::Truncated { .. }
            | Self::SizeMismatch { .. }
            | Self::ChecksumMismatch { .. } => true,
            Self::Http { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            Self::Auth { .. }
            | Self::Tls { .. }
            | Self::NoChecksum { .. }
            | Self::RedirectRefused { .. }
            | Self::PathEscapes(_) => false,
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Network { .. } => "network",
            Self::Http { .. } => "http",
            Self::NotFound { .. } => "not-found",
            Self::Auth { .. } => "auth",
            Self::Tls { .. } => "tls",
            Self::Stalled { .. } => "stalled",
            Self::TimedOut { .. } => "timeout",
            Self::Truncated { .. } => "truncated",
            Self::SizeMismatch { .. } => "size-mismatch",
            Self::ChecksumMismatch { .. } => "checksum-mismatch",
            Self::NoChecksum { .. } => "no-checksum",
            Self::RedirectRefused { .. } => "redirect-refused",
            Self::PathEscapes(_) => "path-escapes",
            Self::Io { .. } => "io",
        }
    }
}
