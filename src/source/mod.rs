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
//! - [`GitContext`], [`GitCache`], [`GitCheckout`]: a context in a remote git repository
//!   (`https://host/org/repo.git#REF:SUBDIR`), fetched with gix into a cache of bare
//!   repositories and read from the object database.

mod git;
mod ignore;
mod local;
mod pattern;

use std::path::PathBuf;

pub use git::{GitAuth, GitCache, GitCheckout, GitContext, is_git_context};
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
    /// A git context URL is malformed or unsupported (the URL is shown without credentials).
    #[error("invalid git context {url}: {reason}")]
    GitUrl {
        /// The context as given, credentials redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An extra header for a git remote is malformed (its value is never shown).
    #[error("invalid git header {name:?}: {reason}")]
    GitHeader {
        /// The header name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The git server could not be reached (unknown host, connection refused, TLS failure).
    #[error("cannot connect to git server {host}")]
    GitConnect {
        /// Host (and port) of the remote.
        host: String,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The git server answered 401 or 403.
    #[error("authentication to {host} was refused; check --git-token")]
    GitAuthRefused {
        /// Host (and port) of the remote.
        host: String,
    },
    /// REF names no branch, tag or commit on the remote.
    #[error("ref {reference} not found in {url}")]
    GitRefNotFound {
        /// The REF as given (or `HEAD`).
        reference: String,
        /// The repository URL, without credentials.
        url: String,
    },
    /// The remote answered 404 for the repository.
    #[error("git repository {url} not found")]
    GitRepoNotFound {
        /// The repository URL, without credentials.
        url: String,
    },
    /// The context's SUBDIR is not a directory of the commit.
    #[error("subdirectory {subdir:?} not found in commit {commit}")]
    GitSubdirNotFound {
        /// The SUBDIR as given.
        subdir: String,
        /// The commit id.
        commit: String,
    },
    /// Listing refs or fetching from the remote failed for another reason.
    #[error("git fetch from {url} failed")]
    GitRemote {
        /// The repository URL, without credentials.
        url: String,
        /// The gix error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The fetch was interrupted through [`GitCache::interrupt_with`]'s flag.
    #[error("git fetch from {url} was interrupted")]
    GitInterrupted {
        /// The repository URL, without credentials.
        url: String,
    },
    /// A cache repository could not be created or opened.
    #[error("cannot use git cache repository {path}")]
    GitRepo {
        /// The bare repository's directory.
        path: PathBuf,
        /// The gix error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An object of a fetched commit could not be read from the cache.
    #[error("cannot read git object {id}")]
    GitObject {
        /// The object id.
        id: String,
        /// The gix error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A filesystem error; fs-err errors name their path.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
