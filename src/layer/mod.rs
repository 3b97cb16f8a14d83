//! Layers: deterministic tar writing, compression with one-pass digests, reading and applying
//! layers (whiteouts included) to an in-memory file-system tree.
//!
//! - [`LayerWriter`] turns a set of [`Entry`] values into a reproducible tar layer
//!   ([OCI image layer spec](https://github.com/opencontainers/image-spec/blob/main/layer.md)),
//!   hashing the uncompressed tar (the diff_id) while compressing it, in one pass.
//! - [`open_decompressed`] and [`is_archive`] read layer blobs and local archives back.
//! - [`FsTree`] is the file system a stack of layers describes, for path resolution, user
//!   lookups and copying subtrees between stages.

use std::io;
use std::path::PathBuf;

mod entry;
mod pgzip;
mod read;
mod tar;
mod tree;
mod zstd;

pub use entry::{Entry, EntryKind, FileSource, Opener};
pub use pgzip::{BlockRecord, ReuseSource};
pub use read::{ArchiveFormat, detect_format, is_archive, is_archive_reader, open_decompressed};
pub use tar::{DEFAULT_GZIP_LEVEL, LayerStats, LayerWriter};
pub use tree::{FsTree, Node, NodeKind, SpecialKind, User};
/// Paths ordered as the layer writer orders entries (bytes, `/` lowest), for maps of them.
pub(crate) use tree::{Key as PathKey, KeyRef as PathKeyRef};

/// Errors from writing, reading and applying layers.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading or writing bytes failed (fs-err errors name their path).
    #[error("layer i/o failed")]
    Io(#[from] io::Error),
    /// The writer's stop flag was set (a cancelled build): the layer was not finished.
    #[error("writing the layer was cancelled")]
    Cancelled,
    /// Reading a layer tar failed: malformed header, truncated stream, bad compression.
    #[error("reading layer tar failed")]
    ReadTar(#[source] io::Error),
    /// Two entries of one layer have the same path.
    #[error("duplicate path {path} in layer", path = .path.display())]
    DuplicatePath {
        /// The path given twice.
        path: PathBuf,
    },
    /// A path is not a clean relative path (absolute, `..`, empty component, …).
    #[error("invalid path {path:?} in layer: {why}")]
    InvalidPath {
        /// The offending path, lossily decoded.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A file source yielded a different number of bytes than the entry's size.
    #[error("{path}: expected {expected} bytes, found {found}", path = .path.display())]
    SizeMismatch {
        /// The source file.
        path: PathBuf,
        /// The size the entry gave.
        expected: u64,
        /// Bytes actually found (or at least this many, when the file is longer).
        found: u64,
    },
    /// A file source is not a regular file.
    #[error("{path} is not a regular file", path = .path.display())]
    NotAFile {
        /// The source path.
        path: PathBuf,
    },
    /// The compression level is out of range for the algorithm.
    #[error("invalid {compression} compression level {level}")]
    InvalidLevel {
        /// The algorithm's name.
        compression: &'static str,
        /// The level asked for.
        level: i32,
    },
    /// A tar entry type strata does not handle (GNU sparse files, for example).
    #[error("unsupported tar entry type {typeflag:?} for {path:?}")]
    UnsupportedEntry {
        /// The entry's path, lossily decoded.
        path: String,
        /// The typeflag byte, as a char.
        typeflag: char,
    },
    /// A hardlink points at something that cannot be linked to.
    #[error("hardlink {path} -> {target}: {why}", path = .path.display(), target = .target.display())]
    BadHardlink {
        /// The link.
        path: PathBuf,
        /// What it points at.
        target: PathBuf,
        /// Why that does not work.
        why: &'static str,
    },
    /// Symlink resolution went through more than 40 links.
    #[error("too many levels of symbolic links resolving {path}", path = .path.display())]
    SymlinkLoop {
        /// The path being resolved.
        path: PathBuf,
    },
    /// A path component that must be a directory is something else.
    #[error("{path} is not a directory", path = .path.display())]
    NotADirectory {
        /// The component that is not a directory.
        path: PathBuf,
    },
    /// A path does not exist in the tree.
    #[error("{path} does not exist", path = .path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// The tree only kept metadata for this file (the layer was applied without a spool).
    #[error("content of {path} was not kept (layer applied without a spool directory)", path = .path.display())]
    ContentUnavailable {
        /// The file whose content is unavailable.
        path: PathBuf,
    },
    /// Spooling a file's content to disk failed.
    #[error("spooling {path} into {dir} failed", path = .path.display(), dir = .dir.display())]
    Spool {
        /// The file being spooled.
        path: PathBuf,
        /// The spool directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A device node or fifo cannot become an [`Entry`].
    #[error("{path} is a device node or fifo, which strata does not copy", path = .path.display())]
    SpecialFile {
        /// The special file.
        path: PathBuf,
    },
    /// A line of `/etc/passwd` or `/etc/group` could not be parsed.
    #[error("malformed line {line} in {path}", path = .path.display())]
    BadDatabase {
        /// The file (`etc/passwd` or `etc/group`).
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
}

/// Result with [`LayerError`].
pub type Result<T, E = LayerError> = std::result::Result<T, E>;
