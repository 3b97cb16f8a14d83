//! The layer cache and the stat cache, kept in the store.
//!
//! - `cache/layers/<key>.json` maps a step's cache key (a digest of everything the layer's
//!   bytes depend on) to the layer it produced: a hit reuses the stored blob without writing,
//!   compressing or hashing anything. The file's mtime is its last use, for pruning.
//! - `cache/stat.json` remembers, per context file, (size, mtime, ctime, inode, device) →
//!   sha256 of its content, like git's index: an unchanged file is never re-read, and a
//!   touched-but-identical one is re-hashed once and still hits.
//! - `cache/slots/<slot>` names the blob last written for a "slot" (same parent layers, same
//!   instruction, same compression), and `cache/blocks/<blob>` lists where that blob's gzip
//!   blocks sit and what input each compressed (see `layer::pgzip`): the next build of the slot
//!   copies unchanged blocks instead of compressing them again. Both are hints; a missing or
//!   damaged one only costs the compression time.
//! - `cache/memo/<key>` remembers what a step derived from a stage's file-system view
//!   (WORKDIR's missing directories, a USER's ids, a COPY's layer key), keyed by the chain ids
//!   of the views it read and the step's inputs (see `build::stage`): a rebuild then never
//!   reads base layers to rebuild a view. A memo is a pure function of its key, so it is never
//!   stale; `prune` drops those that point at a pruned layer entry or were not used within
//!   the prune's age.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fs_err as fs;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, write_hint};
use crate::digest::{Digest, digest_reader};
use crate::layer::{BlockRecord, ReuseSource};
use crate::media::Descriptor;

/// A cached layer: its blob and its diff_id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedLayer {
    /// The (compressed) blob.
    pub descriptor: Descriptor,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
}

/// A remembered result of a step that read a stage's file-system view (`cache/memo/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Memo {
    /// The step's layer is the one cached under this layer-cache key.
    Layer {
        /// Key into `cache/layers/`.
        key: Digest,
    },
    /// A `user[:group]` resolved against the view's /etc/passwd and /etc/group.
    Owner {
        /// User id.
        uid: u64,
        /// Group id.
        gid: u64,
    },
    /// Directories (relative to the root) a WORKDIR has to create.
    Dirs {
        /// Missing directories, outermost first.
        dirs: Vec<PathBuf>,
    },
}

/// First line of a `cache/blocks/` file; records follow, 48 bytes each (key, offset, length,
/// CRC-32; little-endian).
const BLOCKS_MAGIC: &[u8] = b"strata-blocks-v1\n";
const RECORD: usize = 48;

impl Store {
    fn blocks_path(&self, blob: &Digest) -> PathBuf {
        self.root().join("cache/blocks").join(blob.hex())
    }

    fn slot_path(&self, slot: &Digest) -> PathBuf {
        self.root().join("cache/slots").join(slot.hex())
    }

    /// The blob last written for `slot`, with its block records, when both are still there.
    pub fn block_reuse(&self, slot: &Digest) -> Option<ReuseSource> {
        let text = fs::read_to_string(self.slot_path(slot)).ok()?;
        let blob = Digest::from_hex(text.trim()).ok()?;
        let bytes = fs::read(self.blocks_path(&blob)).ok()?;
        let body = bytes.strip_prefix(BLOCKS_MAGIC)?;
        if body.len() % RECORD != 0 {
            return None;
        }
        let records: Vec<BlockRecord> = body
            .chunks_exact(RECORD)
            .map(|r| BlockRecord {
                key: r[..32].try_into().expect("32 bytes"),
                offset: u64::from_le_bytes(r[32..40].try_into().expect("8 bytes")),
                len: u32::from_le_bytes(r[40..44].try_into().expect("4 bytes")),
                crc: u32::from_le_bytes(r[44..48].try_into().expect("4 bytes")),
            })
            .collect();
        let file = std::fs::File::open(self.blob_path(&blob)).ok()?;
        Some(ReuseSource::new(file, &records))
    }

    /// Remember that `blob`, written for `slot`, has gzip blocks `records`.
    pub fn put_block_records(
        &self,
        slot: &Digest,
        blob: &Digest,
        records: &[BlockRecord],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(BLOCKS_MAGIC.len() + records.len() * RECORD);
        bytes.extend_from_slice(BLOCKS_MAGIC);
        for r in records {
            bytes.extend_from_slice(&r.key);
            bytes.extend_from_slice(&r.offset.to_le_bytes());
            bytes.extend_from_slice(&r.len.to_le_bytes());
            bytes.extend_from_slice(&r.crc.to_le_bytes());
        }
        for dir in ["cache/blocks", "cache/slots"] {
            fs::create_dir_all(self.root().join(dir))?;
        }
        write_hint(&self.blocks_path(blob), &bytes)?;
        write_hint(
            &self.slot_path(slot),
            format!("{}\n", blob.hex()).as_bytes(),
        )?;
        Ok(())
    }

    /// Drop block records and slots whose blob is gone; returns how many files went.
    pub(crate) fn prune_block_records(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        let gone = |text: &str| Digest::from_hex(text.trim()).is_ok_and(|d| !self.has_blob(&d));
        for (dir, by_content) in [("cache/blocks", false), ("cache/slots", true)] {
            let dir = self.root().join(dir);
            if !dir.is_dir() {
                continue;
            }
            for e in fs::read_dir(&dir)? {
                let path = e?.path();
                let name = if by_content {
                    fs::read_to_string(&path).unwrap_or_default()
                } else {
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                };
                if gone(&name) && fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn memo_path(&self, key: &Digest) -> PathBuf {
        self.root().join("cache/memo").join(key.hex())
    }

    /// The memo under `key` (a hit marks it as used now). For a [`Memo::Layer`], the caller
    /// still looks the layer up with [`Store::cache_get`].
    pub fn memo_get(&self, key: &Digest) -> Option<Memo> {
        let path = self.memo_path(key);
        let memo = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(memo)
    }

    /// Remember `memo` under `key` (a hint: written without fsync).
    pub fn memo_put(&self, key: &Digest, memo: &Memo) -> Result<(), StoreError> {
        let path = self.memo_path(key);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        write_hint(&path, &serde_json::to_vec(memo).expect("memo serialises"))?;
        Ok(())
    }

    /// Drop memos that point at a layer entry no longer cached, are unreadable, or (with
    /// `old_enough`) were last used long enough ago; returns how many went.
    pub(crate) fn prune_memos(
        &self,
        old_enough: impl Fn(SystemTime) -> bool,
    ) -> Result<usize, StoreError> {
        let dir = self.root().join("cache/memo");
        if !dir.is_dir() {
            return Ok(0);
        }
        let mut removed = 0;
        for e in fs::read_dir(&dir)? {
            let path = e?.path();
            let used = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let gone = match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Memo>(&b).ok())
            {
                None => true,
                Some(Memo::Layer { key }) => !self.cache_path(&key).exists(),
                Some(_) => old_enough(used),
            };
            if gone && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn cache_path(&self, key: &Digest) -> PathBuf {
        self.root()
            .join("cache/layers")
            .join(format!("{}.json", key.hex()))
    }

    /// The layer cached under `key`, if its blob is still in the store (or known to live in
    /// a registry). A hit marks the entry as used now.
    pub fn cache_get(&self, key: &Digest) -> Option<CachedLayer> {
        let path = self.cache_path(key);
        let bytes = fs::read(&path).ok()?;
        let hit: CachedLayer = serde_json::from_slice(&bytes).ok()?;
        if !self.has_blob_or_source(&hit.descriptor.digest) {
            return None;
        }
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(hit)
    }

    /// Remember that `key` produced `layer`.
    pub fn cache_put(&self, key: &Digest, layer: &CachedLayer) -> Result<(), StoreError> {
        let path = self.cache_path(key);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        write_hint(
            &path,
            &serde_json::to_vec(layer).expect("cache entry serialises"),
        )?;
        Ok(())
    }
}

/// A stat cache being loaded on another thread (see [`StatCache::load_in_background`]).
#[derive(Debug)]
pub struct LoadingStatCache {
    loading: std::sync::Mutex<Option<std::thread::JoinHandle<StatCache>>>,
    cache: std::sync::OnceLock<std::sync::Mutex<StatCache>>,
}

impl LoadingStatCache {
    fn ready(&self) -> &std::sync::Mutex<StatCache> {
        self.cache.get_or_init(|| {
            let handle = self
                .loading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            // A panicked loader leaves an empty cache: it is only a cache.
            std::sync::Mutex::new(handle.and_then(|h| h.join().ok()).unwrap_or_default())
        })
    }

    /// The cache, once loaded.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, StatCache> {
        self.ready().lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache itself, once loaded.
    pub fn into_inner(self) -> StatCache {
        self.ready();
        self.cache
            .into_inner()
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct StatEntry {
    size: u64,
    mtime: i64,
    mtime_ns: i64,
    ctime: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
    digest: Digest,
}

impl StatEntry {
    fn matches(&self, md: &std::fs::Metadata) -> bool {
        self.size == md.len()
            && self.mtime == md.mtime()
            && self.mtime_ns == md.mtime_nsec()
            && self.ctime == md.ctime()
            && self.ctime_ns == md.ctime_nsec()
            && self.ino == md.ino()
            && self.dev == md.dev()
    }
}

/// Content digests of files, remembered by their stat data.
#[derive(Debug, Default)]
pub struct StatCache {
    entries: BTreeMap<PathBuf, StatEntry>,
    dirty: bool,
    /// Files hashed (read) during this build, for diagnostics and tests.
    pub hashed: u64,
}

impl StatCache {
    fn path(store: &Store) -> PathBuf {
        store.root().join("cache/stat.json")
    }

    /// Load the store's stat cache (empty when missing or unreadable: it is only a cache).
    pub fn load(store: &Store) -> StatCache {
        Self::load_from(&Self::path(store))
    }

    /// Load the store's stat cache on another thread (it is parsed while the build walks its
    /// context); [`LoadingStatCache::lock`] waits for it.
    pub fn load_in_background(store: &Store) -> LoadingStatCache {
        let path = Self::path(store);
        LoadingStatCache {
            loading: std::sync::Mutex::new(Some(std::thread::spawn(move || {
                Self::load_from(&path)
            }))),
            cache: std::sync::OnceLock::new(),
        }
    }

    fn load_from(path: &Path) -> StatCache {
        let entries = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatCache {
            entries,
            dirty: false,
            hashed: 0,
        }
    }

    /// Save it if anything changed.
    pub fn save(&self, store: &Store) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        let path = Self::path(store);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        write_hint(
            &path,
            &serde_json::to_vec(&self.entries).expect("stat cache serialises"),
        )?;
        Ok(())
    }

    /// The cached digest of `path` if its stat data `md` is unchanged.
    pub fn lookup(&self, path: &Path, md: &std::fs::Metadata) -> Option<Digest> {
        self.entries
            .get(path)
            .filter(|e| e.matches(md))
            .map(|e| e.digest)
    }

    /// Remember `digest` for `path` with stat data `md` (hashed by the caller).
    pub fn insert(&mut self, path: &Path, md: &std::fs::Metadata, digest: Digest) {
        self.hashed += 1;
        self.dirty = true;
        let recent = md
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age.as_secs() < 2);
        if recent {
            self.entries.remove(path);
            return;
        }
        self.entries.insert(
            path.to_path_buf(),
            StatEntry {
                size: md.len(),
                mtime: md.mtime(),
                mtime_ns: md.mtime_nsec(),
                ctime: md.ctime(),
                ctime_ns: md.ctime_nsec(),
                ino: md.ino(),
                dev: md.dev(),
                digest,
            },
        );
    }

    /// The sha256 of the file at `path`, from the cache when its stat data is unchanged.
    /// A file modified less than a second ago is hashed but not remembered (its mtime may
    /// not change on the next write: git's "racy" rule).
    pub fn digest(&mut self, path: &Path) -> io::Result<Digest> {
        let md = fs::symlink_metadata(path)?;
        if let Some(d) = self.lookup(path, &md) {
            return Ok(d);
        }
        let (digest, _) = digest_reader(fs::File::open(path)?)?;
        self.insert(path, &md, digest);
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cache_rehashes_only_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"one").unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .append(true)
            .open(&f)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mut c = StatCache::load(&store);
        assert_eq!(c.digest(&f).unwrap(), Digest::of(b"one"));
        assert_eq!(c.digest(&f).unwrap(), Digest::of(b"one"));
        assert_eq!(c.hashed, 1);
        c.save(&store).unwrap();
        let mut c = StatCache::load(&store);
        assert_eq!(c.digest(&f).unwrap(), Digest::of(b"one"));
        assert_eq!(c.hashed, 0, "unchanged file was re-read");
        std::fs::write(&f, b"two").unwrap();
        assert_eq!(c.digest(&f).unwrap(), Digest::of(b"two"));
        assert_eq!(c.hashed, 1);
    }

    #[test]
    fn memos_go_with_their_layer_entry_or_their_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = store.put_bytes(b"layer").unwrap();
        let layer_key = Digest::of(b"layer key");
        store
            .cache_put(
                &layer_key,
                &CachedLayer {
                    descriptor: Descriptor::new(crate::media::MediaType::OciLayer, blob, 5),
                    diff_id: blob,
                },
            )
            .unwrap();
        let (to_layer, to_ids) = (Digest::of(b"copy"), Digest::of(b"owner"));
        let layer = Memo::Layer { key: layer_key };
        let ids = Memo::Owner {
            uid: 1000,
            gid: 3000,
        };
        store.memo_put(&to_layer, &layer).unwrap();
        store.memo_put(&to_ids, &ids).unwrap();
        assert_eq!(store.prune_memos(|_| false).unwrap(), 0);
        assert_eq!(store.memo_get(&to_layer), Some(layer));
        assert_eq!(store.memo_get(&to_ids), Some(ids));
        // The layer entry goes: so does the memo that names it; the ids stay until old.
        std::fs::remove_file(store.cache_path(&layer_key)).unwrap();
        assert_eq!(store.prune_memos(|_| false).unwrap(), 1);
        assert_eq!(store.memo_get(&to_layer), None);
        assert!(store.memo_get(&to_ids).is_some());
        assert_eq!(store.prune_memos(|_| true).unwrap(), 1);
        assert_eq!(store.memo_get(&to_ids), None);
    }

    #[test]
    fn cache_entries_need_their_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = Digest::of(b"key");
        let blob = store.put_bytes(b"layer").unwrap();
        let layer = CachedLayer {
            descriptor: Descriptor::new(crate::media::MediaType::OciLayer, blob, 5),
            diff_id: blob,
        };
        store.cache_put(&key, &layer).unwrap();
        assert_eq!(store.cache_get(&key), Some(layer));
        std::fs::remove_file(store.blob_path(&blob)).unwrap();
        assert_eq!(store.cache_get(&key), None);
    }
}
