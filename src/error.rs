//! The crate-wide error: one variant per module's error enum.

/// Any error strata's library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest was malformed or content did not match it.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    /// An I/O error (fs-err errors name their path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
