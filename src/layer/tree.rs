//! The file system a stack of layers describes, held in memory.
//!
//! Layers are applied with the semantics of the OCI layer spec
//! (<https://github.com/opencontainers/image-spec/blob/main/layer.md#applying-changesets>):
//! later entries replace earlier ones, `.wh.<name>` deletes `<name>` from lower layers and
//! `.wh..wh..opq` hides everything lower layers had in its directory. Entry paths are taken
//! literally, as an overlay filesystem would: a lower-layer symlink in the middle of a path is
//! replaced by a directory, never followed, so no entry can land outside the tree.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::{Entry, EntryKind, FileSource, LayerError, Result};

/// Symlinks followed while resolving one path before giving up (Linux's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;
/// Mode of directories a layer implies without listing them.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// What kind of node, with its kind-specific data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// A regular file.
    File {
        /// Where the content can be read; `None` when the layer was applied without a spool
        /// directory and only metadata was kept (reading it is an error).
        source: Option<FileSource>,
        /// Length in bytes.
        size: u64,
        /// Hardlink group within this tree; hardlinks in a layer resolve to a copy of their
        /// target's node sharing its key.
        link_key: Option<u64>,
    },
    /// A symbolic link.
    Symlink {
        /// The target as stored.
        target: PathBuf,
    },
    /// A device node or fifo, kept as metadata only: it cannot be read or copied into a layer
    /// ([`FsTree::entries_under`] refuses it), but listing and path lookups see it.
    Special {
        /// Which kind of special file.
        kind: SpecialKind,
        /// Device major number (0 for a fifo).
        major: u32,
        /// Device minor number (0 for a fifo).
        minor: u32,
    },
}

/// The kinds of special file a layer may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecialKind {
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

/// One node of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Kind and kind-specific data.
    pub kind: NodeKind,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

impl Node {
    fn dir(mode: u32, uid: u64, gid: u64) -> Node {
        Node {
            kind: NodeKind::Dir,
            mode,
            uid,
            gid,
        }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir)
    }
}

/// An account from the tree's `/etc/passwd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u64,
    /// Primary group id.
    pub gid: u64,
    /// Home directory.
    pub home: String,
}

/// An in-memory file-system tree: normalised relative paths (the root is the empty path) to
/// nodes. Every node's parent exists and is a directory.
#[derive(Clone, Debug)]
pub struct FsTree {
    nodes: BTreeMap<Key, Node>,
    next_link_key: u64,
}

impl Default for FsTree {
    fn default() -> Self {
        FsTree::new()
    }
}

/// A tree's key: a normalised relative path. Ordered as [`Path`] orders normalised paths
/// (component by component, so a directory's subtree is one contiguous range), but by
/// comparing bytes with `/` below every other byte: the same order without parsing components
/// on every comparison (most of the time of building a tree of thousands of entries).
#[derive(Clone, Debug)]
pub(crate) struct Key(pub(crate) PathBuf);

/// The borrowed form of [`Key`], for lookups by `&Path`.
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct KeyRef(Path);

impl KeyRef {
    pub(crate) fn new(path: &Path) -> &KeyRef {
        // SAFETY: KeyRef is a transparent wrapper around Path.
        unsafe { &*(std::ptr::from_ref::<Path>(path) as *const KeyRef) }
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_os_str().as_bytes()
    }
}

impl std::borrow::Borrow<KeyRef> for Key {
    fn borrow(&self) -> &KeyRef {
        KeyRef::new(&self.0)
    }
}

impl PartialEq for KeyRef {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}
impl Eq for KeyRef {}
impl PartialOrd for KeyRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KeyRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.bytes(), other.bytes());
        let rank = |c: u8| if c == b'/' { 0 } else { u16::from(c) + 1 };
        match a.iter().zip(b).position(|(x, y)| x != y) {
            Some(i) => rank(a[i]).cmp(&rank(b[i])),
            None => a.len().cmp(&b.len()),
        }
    }
}
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        KeyRef::new(&self.0) == KeyRef::new(&other.0)
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        KeyRef::new(&self.0).cmp(KeyRef::new(&other.0))
    }
}

/// Bookkeeping while one layer is applied.
#[derive(Default)]
struct LayerState {
    /// Paths this layer created, and their ancestors: whiteouts only remove lower content.
    touched: HashSet<PathBuf>,
    /// The entries' hardlink keys, mapped to keys unique in this tree.
    keys: HashMap<u64, u64>,
}

impl FsTree {
    /// An empty tree: a root directory, mode 0755, owned by 0:0.
    pub fn new() -> FsTree {
        let mut nodes = BTreeMap::new();
        nodes.insert(Key(PathBuf::new()), Node::dir(0o755, 0, 0));
        FsTree {
            nodes,
            next_link_key: 1,
        }
    }

    /// The node at `path`, taken literally (no symlinks followed; a leading `/` is ignored).
    pub fn get(&self, path: impl AsRef<Path>) -> Option<&Node> {
        self.nodes.get(KeyRef::new(&lexical(path.as_ref())?))
    }

    /// The direct children of `dir` (a normalised path), with their full paths, sorted.
    pub fn children<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = (&'a Path, &'a Node)> {
        self.walk(dir).filter(move |(p, _)| p.parent() == Some(dir))
    }

    /// Everything beneath `dir` (a normalised path; not `dir` itself), parents before children.
    pub fn walk<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = (&'a Path, &'a Node)> {
        self.nodes
            .range::<KeyRef, _>((
                std::ops::Bound::Excluded(KeyRef::new(dir)),
                std::ops::Bound::Unbounded,
            ))
            .map(|(p, n)| (p.0.as_path(), n))
            .take_while(move |(p, _)| p.starts_with(dir))
    }

    /// Resolve `path` inside the tree, following symlinks as a chroot would: an absolute target
    /// starts again at the root of the tree and `..` stops at the root. The last component is
    /// followed only if `follow_last`. `None` if the resolved path does not exist; an error if a
    /// middle component is not a directory or more than 40 links are followed.
    pub fn resolve(&self, path: impl AsRef<Path>, follow_last: bool) -> Result<Option<PathBuf>> {
        let resolved = self.resolve_lenient(path, follow_last)?;
        Ok(self
            .nodes
            .contains_key(KeyRef::new(&resolved))
            .then_some(resolved))
    }

    /// Like [`resolve`](Self::resolve), but a path that does not exist (yet) resolves to where
    /// it would be created: existing symlinks along the way followed, missing components kept.
    pub fn resolve_lenient(&self, path: impl AsRef<Path>, follow_last: bool) -> Result<PathBuf> {
        let path = path.as_ref();
        let mut todo: VecDeque<PathBuf> = components(path.as_os_str().as_bytes()).collect();
        let mut cur = PathBuf::new();
        let mut links = 0;
        while let Some(comp) = todo.pop_front() {
            if comp.as_os_str() == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&comp);
            match self.nodes.get(KeyRef::new(&next)).map(|n| &n.kind) {
                Some(NodeKind::Symlink { target }) if follow_last || !todo.is_empty() => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(LayerError::SymlinkLoop {
                            path: path.to_path_buf(),
                        });
                    }
                    let target = target.as_os_str().as_bytes();
                    if target.first() == Some(&b'/') {
                        cur = PathBuf::new();
                    }
                    for c in components(target).rev() {
                        todo.push_front(c);
                    }
                }
                Some(NodeKind::Dir) | None => cur = next,
                Some(_) if todo.is_empty() => cur = next,
                Some(_) => return Err(LayerError::NotADirectory { path: next }),
            }
        }
        Ok(cur)
    }

    /// The node at `path` (normalised, taken literally) and everything beneath it, as entries
    /// with paths relative to the root, for copying a subtree. The root itself has no entry form
    /// and is left out. Fails on files whose content was not kept and on special files.
    pub fn entries_under(&self, path: impl AsRef<Path>) -> Result<Vec<Entry>> {
        let path = path.as_ref();
        let start = lexical(path)
            .filter(|p| self.nodes.contains_key(KeyRef::new(p)))
            .ok_or_else(|| LayerError::NotFound {
                path: path.to_path_buf(),
            })?;
        let mut out = Vec::new();
        let this = self
            .nodes
            .get(KeyRef::new(&start))
            .filter(|_| !start.as_os_str().is_empty());
        for (p, node) in this
            .map(|n| (start.as_path(), n))
            .into_iter()
            .chain(self.walk(&start))
        {
            let kind = match &node.kind {
                NodeKind::Dir => EntryKind::Dir,
                NodeKind::File {
                    source: Some(source),
                    size,
                    link_key,
                } => EntryKind::File {
                    source: source.clone(),
                    size: *size,
                    link_key: *link_key,
                },
                NodeKind::File { source: None, .. } => {
                    return Err(LayerError::ContentUnavailable { path: p.into() });
                }
                NodeKind::Symlink { target } => EntryKind::Symlink {
                    target: target.clone(),
                },
                NodeKind::Special { .. } => return Err(LayerError::SpecialFile { path: p.into() }),
            };
            out.push(Entry {
                path: p.to_path_buf(),
                kind,
                mode: node.mode,
                uid: node.uid,
                gid: node.gid,
            });
        }
        Ok(out)
    }

    /// Open the content of the file at `path` (symlinks followed).
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Box<dyn Read + Send>> {
        let path = path.as_ref();
        let resolved = self
            .resolve(path, true)?
            .ok_or_else(|| LayerError::NotFound { path: path.into() })?;
        match self.nodes.get(KeyRef::new(&resolved)).map(|n| &n.kind) {
            Some(NodeKind::File {
                source: Some(source),
                ..
            }) => Ok(source.open()?),
            Some(NodeKind::File { source: None, .. }) => {
                Err(LayerError::ContentUnavailable { path: resolved })
            }
            _ => Err(LayerError::NotAFile { path: resolved }),
        }
    }

    /// The account `name` from the tree's `/etc/passwd`, if the file and the account exist.
    pub fn lookup_user(&self, name: &str) -> Result<Option<User>> {
        let Some(fields) = self.lookup_db("etc/passwd", name, 6)? else {
            return Ok(None);
        };
        Ok(Some(User {
            uid: fields.1[1],
            gid: fields.1[2],
            home: fields.0,
        }))
    }

    /// The id of group `name` from the tree's `/etc/group`, if the file and the group exist.
    pub fn lookup_group(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.lookup_db("etc/group", name, 3)?.map(|f| f.1[1]))
    }

    /// Find `name` in a colon-separated database; return field 5 (home, for passwd) and the
    /// numeric fields 2 and 3 (at indices 1 and 2).
    fn lookup_db(
        &self,
        db: &str,
        name: &str,
        min_fields: usize,
    ) -> Result<Option<(String, [u64; 3])>> {
        if self.resolve(db, true)?.is_none() {
            return Ok(None);
        }
        let mut text = Vec::new();
        self.open(db)?.read_to_end(&mut text)?;
        for (i, line) in String::from_utf8_lossy(&text).lines().enumerate() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields[0] != name {
                continue;
            }
            let bad = || LayerError::BadDatabase {
                path: db.into(),
                line: i + 1,
            };
            if fields.len() < min_fields {
                return Err(bad());
            }
            let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
            let third = if min_fields > 3 { num(fields[3])? } else { 0 };
            let home = fields.get(5).unwrap_or(&"").to_string();
            return Ok(Some((home, [0, num(fields[2])?, third])));
        }
        Ok(None)
    }

    /// Apply a layer given as entries (one strata produced); `.wh.` names are whiteouts, as in a
    /// tar layer.
    pub fn apply_entries(&mut self, entries: &[Entry]) -> Result<()> {
        let mut st = LayerState::default();
        for e in entries {
            let path = normalize(e.path.as_os_str().as_bytes())?;
            let kind = match &e.kind {
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::Symlink { target } => NodeKind::Symlink {
                    target: target.clone(),
                },
                EntryKind::File {
                    source,
                    size,
                    link_key,
                } => NodeKind::File {
                    source: Some(source.clone()),
                    size: *size,
                    link_key: link_key.map(|k| self.map_key(&mut st, k)),
                },
            };
            let node = Node {
                kind,
                mode: e.mode & 0o7777,
                uid: e.uid,
                gid: e.gid,
            };
            self.apply_node(&mut st, path, node)?;
        }
        Ok(())
    }

    /// Apply one uncompressed layer tar. With `spool`, regular file contents are copied into
    /// new uniquely named files in that directory (the caller owns and cleans it up) and the
    /// nodes point at them; without, only metadata is kept.
    ///
    /// Leading `/` and `./` are stripped from entry names; a `..` component, a hardlink to a
    /// missing file or a directory, and unsupported entry types (GNU sparse files, …) are
    /// errors. Device nodes and fifos are kept as metadata ([`NodeKind::Special`]).
    pub fn apply_tar<R: Read>(&mut self, tar: R, spool: Option<&Path>) -> Result<()> {
        let mut st = LayerState::default();
        let mut archive = tar::Archive::new(tar);
        for entry in archive.entries().map_err(LayerError::ReadTar)? {
            let mut entry = entry.map_err(LayerError::ReadTar)?;
            let raw = entry.path_bytes().into_owned();
            let path = normalize(&raw)?;
            let h = entry.header();
            let (mode, uid, gid) = (
                h.mode().map_err(LayerError::ReadTar)? & 0o7777,
                h.uid().map_err(LayerError::ReadTar)?,
                h.gid().map_err(LayerError::ReadTar)?,
            );
            let typeflag = h.entry_type().as_byte();
            let special = |kind| -> Result<NodeKind> {
                Ok(NodeKind::Special {
                    kind,
                    major: h.device_major().map_err(LayerError::ReadTar)?.unwrap_or(0),
                    minor: h.device_minor().map_err(LayerError::ReadTar)?.unwrap_or(0),
                })
            };
            let meta = |kind| Node {
                kind,
                mode,
                uid,
                gid,
            };
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let node = match typeflag {
                // tar expands GNU sparse files ('S') to their full content.
                b'0' | b'\0' | b'7' | b'S' => {
                    let size = entry.size();
                    let source = match spool {
                        Some(dir) => Some(FileSource::Path(spool_file(&mut entry, &path, dir)?)),
                        None => None,
                    };
                    meta(NodeKind::File {
                        source,
                        size,
                        link_key: None,
                    })
                }
                b'5' => meta(NodeKind::Dir),
                b'2' => meta(NodeKind::Symlink {
                    target: PathBuf::from(OsStr::from_bytes(&link.unwrap_or_default())),
                }),
                b'1' => self.hardlink(&path, &link.unwrap_or_default())?,
                b'3' => meta(special(SpecialKind::Char)?),
                b'4' => meta(special(SpecialKind::Block)?),
                b'6' => meta(special(SpecialKind::Fifo)?),
                // A global PAX header describes the archive, not a file.
                b'g' => continue,
                other => {
                    return Err(LayerError::UnsupportedEntry {
                        path: String::from_utf8_lossy(&raw).into_owned(),
                        typeflag: char::from(other),
                    });
                }
            };
            self.apply_node(&mut st, path, node)?;
        }
        Ok(())
    }

    /// The node a hardlink entry stands for: its target's, sharing a hardlink key.
    fn hardlink(&mut self, path: &Path, target: &[u8]) -> Result<Node> {
        let target = normalize(target)?;
        let bad = |why| LayerError::BadHardlink {
            path: path.into(),
            target: target.clone(),
            why,
        };
        let fresh = self.next_link_key;
        let node = self
            .nodes
            .get_mut(KeyRef::new(&target))
            .ok_or_else(|| bad("target does not exist"))?;
        match &mut node.kind {
            NodeKind::Dir => return Err(bad("target is a directory")),
            NodeKind::File { link_key, .. } if link_key.is_none() => {
                *link_key = Some(fresh);
                self.next_link_key += 1;
            }
            _ => {}
        }
        Ok(node.clone())
    }

    fn map_key(&mut self, st: &mut LayerState, key: u64) -> u64 {
        *st.keys.entry(key).or_insert_with(|| {
            self.next_link_key += 1;
            self.next_link_key - 1
        })
    }

    /// Put `node` at `path`, or carry out the whiteout `path` names.
    fn apply_node(&mut self, st: &mut LayerState, path: PathBuf, node: Node) -> Result<()> {
        let name = path.file_name().map(OsStrExt::as_bytes);
        if let Some(hidden) = name.and_then(|n| n.strip_prefix(b".wh.")) {
            let parent = path.parent().unwrap_or(Path::new(""));
            if hidden == b".wh..opq" {
                let lower: Vec<PathBuf> = self
                    .walk(parent)
                    .map(|(p, _)| p.to_path_buf())
                    .filter(|p| !st.touched.contains(p))
                    .collect();
                for p in lower {
                    self.nodes.remove(KeyRef::new(&p));
                }
            } else if !hidden.starts_with(b".wh.") {
                // Other `.wh..wh.` names are aufs bookkeeping, not whiteouts.
                let gone = parent.join(OsStr::from_bytes(hidden));
                if !st.touched.contains(&gone) {
                    self.remove_subtree(&gone);
                }
            }
            return Ok(());
        }
        if path.as_os_str().is_empty() {
            if !node.is_dir() {
                return Err(LayerError::NotADirectory { path });
            }
            self.nodes.insert(Key(path), node);
            return Ok(());
        }
        // Missing or non-directory ancestors become plain directories, as on an overlay.
        for anc in path.ancestors().skip(1) {
            if anc.as_os_str().is_empty() {
                break;
            }
            let is_dir = self.nodes.get(KeyRef::new(anc)).is_some_and(Node::is_dir);
            // A directory this layer already touched has directories all the way up (replacing
            // or whiting out an ancestor removes its whole subtree): nothing more to check.
            if is_dir && st.touched.contains(anc) {
                break;
            }
            if !is_dir {
                self.nodes
                    .insert(Key(anc.to_path_buf()), Node::dir(IMPLICIT_DIR_MODE, 0, 0));
            }
            st.touched.insert(anc.to_path_buf());
        }
        let keep_children =
            node.is_dir() && self.nodes.get(KeyRef::new(&path)).is_some_and(Node::is_dir);
        if !keep_children {
            self.remove_subtree(&path);
        }
        st.touched.insert(path.clone());
        self.nodes.insert(Key(path), node);
        Ok(())
    }

    fn remove_subtree(&mut self, path: &Path) {
        let doomed: Vec<PathBuf> = self
            .nodes
            .range::<KeyRef, _>((
                std::ops::Bound::Included(KeyRef::new(path)),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(p, _)| p.0.starts_with(path))
            .map(|(p, _)| p.0.clone())
            .collect();
        for p in doomed {
            self.nodes.remove(KeyRef::new(&p));
        }
    }
}

/// Copy an entry's content into a new file in `dir`, returning its path.
fn spool_file(content: &mut impl Read, path: &Path, dir: &Path) -> Result<PathBuf> {
    let spool_err = |source| LayerError::Spool {
        path: path.into(),
        dir: dir.into(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix("spool-")
        .tempfile_in(dir)
        .map_err(spool_err)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LayerError::ReadTar(e)),
        };
        tmp.write_all(&buf[..n]).map_err(spool_err)?;
    }
    let (_, kept) = tmp.keep().map_err(|e| spool_err(e.error))?;
    Ok(kept)
}

/// The components of a path's bytes, `.` and empty ones dropped, `..` kept.
fn components(bytes: &[u8]) -> impl DoubleEndedIterator<Item = PathBuf> + '_ {
    bytes
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| PathBuf::from(OsStr::from_bytes(c)))
}

/// Normalise a layer entry's name: leading `/` and `./`, trailing `/` and `.` components
/// dropped; `..` refused. The root is the empty path.
fn normalize(raw: &[u8]) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in components(raw) {
        if c.as_os_str() == ".." {
            return Err(LayerError::InvalidPath {
                path: String::from_utf8_lossy(raw).into_owned(),
                why: "`..` component",
            });
        }
        out.push(c);
    }
    Ok(out)
}

/// A lookup path made relative to the root, or `None` if it has a `..` (no literal match).
fn lexical(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => return None,
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

#[cfg(test)]
#[path = "tree_tests.rs"]
mod tests;
