//! The unit a layer is made of: one file-system entry with the metadata that goes in its tar
//! header. Everything that produces layer content (context walks, COPY planning, tree views of
//! images) speaks in `Entry` values; the tar writer turns a set of them into bytes.

use std::path::PathBuf;
use std::sync::Arc;

/// Where the bytes of a regular file come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSource {
    /// A file on disk (a context file, or a spooled file unpacked from another layer).
    Path(PathBuf),
    /// Bytes held in memory (heredocs, small generated files).
    Bytes(Arc<[u8]>),
}

/// What kind of entry, with the data that kind needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes read from `source`.
    ///
    /// Files sharing the same `link_key` are one inode: the writer stores the content once,
    /// under the first path in sort order, and writes the others as hardlinks to it, so the
    /// result does not depend on the order the files were found in.
    File {
        /// Where the content is read from.
        source: FileSource,
        /// Length in bytes; the writer fails if the source yields a different length.
        size: u64,
        /// Hardlink group (e.g. from (dev, inode)); `None` for a file with one link.
        link_key: Option<u64>,
    },
    /// A symbolic link with this target, stored verbatim.
    Symlink {
        /// The link target as written.
        target: PathBuf,
    },
}

/// One entry of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the root: no leading `/`, no trailing `/`, no `.` or `..` components.
    pub path: PathBuf,
    /// Kind and kind-specific data.
    pub kind: EntryKind,
    /// Permission bits, including setuid/setgid/sticky (`0o7777` mask); no file-type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: impl Into<PathBuf>, mode: u32, uid: u64, gid: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir,
            mode,
            uid,
            gid,
        }
    }
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }
}
