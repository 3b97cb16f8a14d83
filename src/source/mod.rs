//! Build contexts: reading a local directory the way `docker build` sees it.
//!
//! - [`Pattern`]: the glob dialect of `.dockerignore` and `COPY --exclude` (Go
//!   [`filepath.Match`](https://pkg.go.dev/path/filepath#Match) plus `**`, as moby's
//!   [`patternmatcher`](https://github.com/moby/patternmatcher) implements it), and plain
//!   `filepath.Match` for `COPY` source wildcards.
//! - [`Dockerignore`]: an ordered list of exclude patterns and `!` exceptions, parsed like
//!   moby's `ignorefile.ReadAll`, with the parent-directory rule and a pruning decision for
//!   walkers; [`find_dockerignore`] picks the file BuildKit would use.
//! - [`LocalContext`]: a walk of a context directory into layer [`Entry`](crate::layer::Entry)
//!   values, and [`normalize_context_path`] for `COPY` source paths.

mod ignore;
mod local;
mod pattern;

use std::path::PathBuf;

pub use ignore::{Dockerignore, find_dockerignore};
pub use local::{LocalContext, normalize_context_path};
pub use pattern::{Pattern, has_glob_meta};

/// Errors from reading build contexts, ignore files and glob patterns.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A glob pattern is malformed (e.g. an unterminated `[` class or a trailing `\`).
    #[error("invalid pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A line of an ignore file holds an invalid pattern.
    #[error("line {line}")]
    IgnoreLine {
        /// 1-based line number.
        line: usize,
        /// Why the pattern was rejected (a [`SourceError::Pattern`]).
        #[source]
        source: Box<SourceError>,
    },
    /// An ignore file could not be used.
    #[error("invalid ignore file {path}")]
    IgnoreFile {
        /// The ignore file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<SourceError>,
    },
    /// An ignore file is not UTF-8 text.
    #[error("ignore file is not valid UTF-8")]
    NotUtf8,
    /// A file or directory of the context could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The build context is not a directory.
    #[error("build context {path} is not a directory")]
    NotADirectory {
        /// The path given as context.
        path: PathBuf,
    },
    /// A source path leaves the build context through `..`.
    #[error("path {path:?} is outside the build context")]
    OutsideContext {
        /// The path as given.
        path: String,
    },
    /// A filesystem error; fs-err errors name their path.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
