//! The unit a layer is made of: one file-system entry with the metadata that goes in its tar
//! header. Everything that produces layer content (context walks, COPY planning, tree views of
//! images) speaks in `Entry` values; the tar writer turns a set of them into bytes.

use std::path::PathBuf;
use std::sync::Arc;

/// Opens a stream of a file's bytes (e.g. a blob in a git object database).
pub trait Opener: Send + Sync {
    /// A fresh reader from the first byte.
    fn open(&self) -> std::io::Result<Box<dyn std::io::Read + Send>>;
}

/// Where the bytes of a regular file come from.
#[derive(Clone)]
pub enum FileSource {
    /// A file on disk (a context file, or a spooled file unpacked from another layer).
    Path(PathBuf),
    /// Bytes held in memory (heredocs, small generated files).
    Bytes(Arc<[u8]>),
    /// Bytes from an opener, identified by `id` (e.g. `git:<blob oid>`): equal ids mean
    /// equal content.
    Open {
        /// What the content is, for equality and messages.
        id: String,
        /// How to read it.
        opener: Arc<dyn Opener>,
    },
}

impl FileSource {
    /// A fresh reader of the content.
    pub fn open(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        match self {
            FileSource::Path(p) => Ok(Box::new(fs_err::File::open(p)?)),
            FileSource::Bytes(b) => Ok(Box::new(std::io::Cursor::new(b.clone()))),
            FileSource::Open { opener, .. } => opener.open(),
        }
    }
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileSource::Path(p) => f.debug_tuple("Path").field(p).finish(),
            FileSource::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            FileSource::Open { id, .. } => f.debug_tuple("Open").field(id).finish(),
        }
    }
}

impl PartialEq for FileSource {
    fn eq(&self, other: &FileSource) -> bool {
        match (self, other) {
            (FileSource::Path(a), FileSource::Path(b)) => a == b,
            (FileSource::Bytes(a), FileSource::Bytes(b)) => a == b,
            (FileSource::Open { id: a, .. }, FileSource::Open { id: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl Eq for FileSource {}

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

impl Entry {
    /// A regular file entry with no hardlink group.
    pub fn file(
        path: impl Into<PathBuf>,
        source: FileSource,
        size: u64,
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File {
                source,
                size,
                link_key: None,
            },
            mode,
            uid,
            gid,
        }
    }

    /// A regular file entry holding `bytes` in memory.
    pub fn bytes(path: impl Into<PathBuf>, bytes: &[u8], mode: u32, uid: u64, gid: u64) -> Entry {
        let size = bytes.len() as u64;
        Entry::file(path, FileSource::Bytes(bytes.into()), size, mode, uid, gid)
    }

    /// A symbolic link entry (symlink modes are conventionally `0o777`).
    pub fn symlink(
        path: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
        uid: u64,
        gid: u64,
    ) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
            mode: 0o777,
            uid,
            gid,
        }
    }

    /// This entry with its file put in hardlink group `key` (no effect on non-files).
    pub fn with_link_key(mut self, key: u64) -> Entry {
        if let EntryKind::File { link_key, .. } = &mut self.kind {
            *link_key = Some(key);
        }
        self
    }
}

/// Check that `path` is a clean relative path as [`Entry::path`] requires, and return its bytes.
pub(crate) fn check_path(path: &std::path::Path) -> Result<&[u8], super::LayerError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let invalid = |why| super::LayerError::InvalidPath {
        path: path.to_string_lossy().into_owned(),
        why,
    };
    if bytes.is_empty() {
        return Err(invalid("empty path"));
    }
    if bytes.contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    if bytes[0] == b'/' {
        return Err(invalid("absolute path"));
    }
    for comp in bytes.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(invalid("empty component (double or trailing slash)")),
            b"." => return Err(invalid("`.` component")),
            b".." => return Err(invalid("`..` component")),
            _ => {}
        }
    }
    Ok(bytes)
}
