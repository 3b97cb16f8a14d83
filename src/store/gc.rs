//! `strata prune` and `strata cache du`: least-recently-used garbage collection of blobs and
//! cache entries, never touching what a running build uses (it holds `gc.lock` shared; prune
//! takes it exclusively) and, unless `--all`, never what a tagged image references.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use fs_err as fs;

use super::{OciIndex, REF_NAME, Store, StoreError, lock::Lock};
use crate::digest::Digest;
use crate::image::ManifestView;

/// What to prune.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// Stop once the blobs take at most this many bytes.
    pub keep_storage: Option<u64>,
    /// Only prune what has not been used for this long.
    pub until: Option<Duration>,
    /// Also prune tagged images.
    pub all: bool,
}

/// What a prune did.
#[derive(Clone, Debug, Default)]
pub struct PruneReport {
    /// Blobs deleted.
    pub blobs: usize,
    /// Bytes freed.
    pub bytes: u64,
    /// Cache entries dropped.
    pub cache_entries: usize,
    /// Images removed from `index.json` (names, or digests of untagged ones).
    pub images: Vec<String>,
    /// RUN snapshots (unpacked layers) removed.
    pub snapshots: usize,
    /// RUN cache mounts removed.
    pub cache_mounts: usize,
}

/// Bytes by kind.
#[derive(Clone, Debug, Default)]
pub struct DiskUsage {
    /// Blobs of images in `index.json`: (count, bytes).
    pub images: (usize, u64),
    /// Blobs only the layer cache refers to.
    pub cache: (usize, u64),
    /// Blobs nothing refers to (pulled metadata, leftovers).
    pub unreferenced: (usize, u64),
    /// Number of cache entries.
    pub cache_entries: usize,
    /// Bytes in other directories (git caches, temp files, metadata, and the RUN caches
    /// below).
    pub other: u64,
    /// RUN's unpacked layer snapshots and cache mounts (counted in `other` too).
    pub run: super::RunCaches,
}

fn mtime(path: &std::path::Path) -> SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn dir_size(dir: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

struct Inventory {
    /// Every blob with its size and last use.
    blobs: BTreeMap<Digest, (u64, SystemTime)>,
    /// Cache entries: file, blob, last use.
    cache: Vec<(std::path::PathBuf, Digest, SystemTime)>,
    /// Blobs of each index entry.
    images: Vec<(String, BTreeSet<Digest>, bool)>,
}

fn inventory(store: &Store) -> Result<Inventory, StoreError> {
    let mut blobs = BTreeMap::new();
    for e in fs::read_dir(store.root().join("blobs/sha256"))? {
        let e = e?;
        if let Ok(d) = Digest::from_hex(&e.file_name().to_string_lossy()) {
            let md = e.metadata()?;
            blobs.insert(
                d,
                (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
            );
        }
    }
    let mut cache = Vec::new();
    let cache_dir = store.root().join("cache/layers");
    if cache_dir.is_dir() {
        for e in fs::read_dir(&cache_dir)? {
            let path = e?.path();
            let Ok(bytes) = fs::read(&path) else { continue };
            let Ok(hit) = serde_json::from_slice::<super::CachedLayer>(&bytes) else {
                continue;
            };
            let used = mtime(&path);
            if let Some(b) = blobs.get_mut(&hit.descriptor.digest) {
                b.1 = b.1.max(used);
            }
            cache.push((path, hit.descriptor.digest, used));
        }
    }
    let mut images = Vec::new();
    for d in OciIndex::read(store.root())?.manifests {
        let mut set = BTreeSet::from([d.digest]);
        if let Ok(bytes) = store.read_blob(&d.digest)
            && let Ok(view) = ManifestView::parse(&bytes)
        {
            set.insert(view.config.digest);
            set.extend(view.layers.iter().map(|l| l.digest));
        }
        let tagged = d.annotations.contains_key(REF_NAME);
        let name = d
            .annotations
            .get(REF_NAME)
            .cloned()
            .unwrap_or_else(|| d.digest.to_string());
        images.push((name, set, tagged));
    }
    Ok(Inventory {
        blobs,
        cache,
        images,
    })
}

/// Sizes by kind.
pub fn disk_usage(store: &Store) -> Result<DiskUsage, StoreError> {
    let inv = inventory(store)?;
    let in_images: BTreeSet<Digest> = inv
        .images
        .iter()
        .flat_map(|(_, s, _)| s.iter().copied())
        .collect();
    let in_cache: BTreeSet<Digest> = inv.cache.iter().map(|(_, d, _)| *d).collect();
    let mut du = DiskUsage {
        cache_entries: inv.cache.len(),
        ..DiskUsage::default()
    };
    for (d, (size, _)) in &inv.blobs {
        let slot = if in_images.contains(d) {
            &mut du.images
        } else if in_cache.contains(d) {
            &mut du.cache
        } else {
            &mut du.unreferenced
        };
        slot.0 += 1;
        slot.1 += size;
    }
    let total = dir_size(store.root());
    du.other = total.saturating_sub(du.images.1 + du.cache.1 + du.unreferenced.1);
    du.run = super::run_caches(store);
    Ok(du)
}

/// Prune least-recently-used blobs. Waits for running builds to finish (they hold the
/// garbage-collection lock shared).
pub fn prune(store: &Store, opts: &PruneOptions) -> Result<PruneReport, StoreError> {
    let _gc = Lock::gc(store.root(), true)?;
    let _index = Lock::exclusive(store.root())?;
    let inv = inventory(store)?;
    let keep: BTreeSet<Digest> = if opts.all {
        BTreeSet::new()
    } else {
        inv.images
            .iter()
            .filter(|(_, _, tagged)| *tagged)
            .flat_map(|(_, s, _)| s.iter().copied())
            .collect()
    };
    let now = SystemTime::now();
    let old_enough = |used: SystemTime| match opts.until {
        None => true,
        Some(age) => now.duration_since(used).is_ok_and(|d| d >= age),
    };
    let mut candidates: Vec<(SystemTime, Digest, u64)> = inv
        .blobs
        .iter()
        .filter(|(d, (_, used))| !keep.contains(d) && old_enough(*used))
        .map(|(d, (size, used))| (*used, *d, *size))
        .collect();
    candidates.sort();
    let mut total: u64 = inv.blobs.values().map(|(s, _)| s).sum();
    let mut report = PruneReport::default();
    let mut deleted = BTreeSet::new();
    for (_, d, size) in candidates {
        if opts.keep_storage.is_some_and(|k| total <= k) {
            break;
        }
        match fs::remove_file(store.blob_path(&d)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        total = total.saturating_sub(size);
        report.blobs += 1;
        report.bytes += size;
        deleted.insert(d);
    }
    for (path, d, _) in &inv.cache {
        if deleted.contains(d) && fs::remove_file(path).is_ok() {
            report.cache_entries += 1;
        }
    }
    report.cache_entries += store.prune_block_records()?;
    report.cache_entries += store.prune_memos(old_enough)?;
    // Images that lost a blob leave the index, so the store stays consistent.
    let mut index = OciIndex::read(store.root())?;
    let broken: BTreeSet<&String> = inv
        .images
        .iter()
        .filter(|(_, set, _)| set.iter().any(|d| deleted.contains(d)))
        .map(|(name, _, _)| name)
        .collect();
    index.manifests.retain(|d| {
        let name = d
            .annotations
            .get(REF_NAME)
            .cloned()
            .unwrap_or_else(|| d.digest.to_string());
        !broken.contains(&name)
    });
    report.images = broken.into_iter().cloned().collect();
    index.write(store.root())?;
    // Unpacked layers and cache mounts are caches; no build runs while we hold gc.lock.
    (report.snapshots, report.cache_mounts) = super::mounts::prune_run_caches(store, opts.until)?;
    // Temp files of interrupted writes, an hour old (a running writer holds younger ones).
    for e in fs::read_dir(store.root().join("tmp"))? {
        let e = e?;
        if now
            .duration_since(mtime(&e.path()))
            .is_ok_and(|d| d > Duration::from_secs(3600))
        {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
    Ok(report)
}
