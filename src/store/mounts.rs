//! Directories RUN keeps across builds: cache mounts (`cache/mounts/`) and the snapshot
//! store of unpacked layers (`snapshots/`).
//!
//! - A **cache mount** (`RUN --mount=type=cache`) is `cache/mounts/<hex>/`, `<hex>` the sha256
//!   of its identity (id, namespace, `from`, ownership). `<hex>.lock` is `flock`ed for the
//!   step's duration — shared for `sharing=shared`, exclusive for `locked` (waiting for
//!   other users) and `private` (a user that finds it busy takes `<hex>-1`, `<hex>-2`, … as
//!   BuildKit creates a new mount) — and its mtime is the last use, for `prune --until`.
//! - A **snapshot** is `snapshots/<chain-id hex>/` holding `fs/` (one layer's files, deletions
//!   as overlay whiteouts, ready to stack as an overlay lower) and `used` (its mtime is the
//!   last use). It appears by an atomic no-replace rename of a fully written temp directory,
//!   so concurrent builds either find a complete one or make their own and keep the winner.
//!
//! Both are caches: `prune` removes those unused for `--until` (all of them without it)
//! while it holds the garbage-collection lock exclusively, so no build is using them.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fs_err as fs;

use super::{Store, StoreError};
use crate::digest::Digest;

/// How concurrent builds share a cache mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// At the same time.
    Shared,
    /// A busy directory makes the next user take another one.
    Private,
    /// One at a time.
    Locked,
}

/// A held cache-mount lock; released on drop.
#[derive(Debug)]
pub struct MountLock {
    _file: fs::File,
}

/// Rename `from` to `to` unless `to` exists; `Ok(false)` when it does.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: valid C strings; renameat2 with AT_FDCWD.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Ok(false),
        // File systems without RENAME_NOREPLACE: a plain rename refuses a non-empty target.
        Some(libc::EINVAL) if !to.exists() => fs::rename(from, to).map(|()| true),
        Some(libc::EINVAL) => Ok(false),
        _ => Err(io::Error::new(
            e.kind(),
            format!("rename {} to {}: {e}", from.display(), to.display()),
        )),
    }
}

/// Remove a tree even when its directories are read-only (as overlayfs leaves its work
/// directory).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    for e in walkdir::WalkDir::new(path).into_iter().flatten() {
        if e.file_type().is_dir() {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o700));
        }
    }
    fs::remove_dir_all(path)
}

fn touch(path: &Path) -> io::Result<()> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.file().set_modified(SystemTime::now())
}

impl Store {
    /// The directory of cache mount `name` (created, mode `mode`, and filled by `seed` when
    /// new), with its lock held as `sharing` asks, and whether it was just created.
    pub fn cache_mount(
        &self,
        name: &str,
        sharing: Sharing,
        mode: u32,
        seed: impl FnOnce(&Path) -> io::Result<()>,
    ) -> Result<(PathBuf, MountLock, bool), StoreError> {
        let base = self.root.join("cache/mounts");
        fs::create_dir_all(&base)?;
        let hex = Digest::of(name.as_bytes()).hex().to_string();
        let mut instance = 0u32;
        let (stem, file) = loop {
            let stem = if instance == 0 {
                hex.clone()
            } else {
                format!("{hex}-{instance}")
            };
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(base.join(format!("{stem}.lock")))?;
            let op = match sharing {
                Sharing::Shared => libc::LOCK_SH,
                Sharing::Locked => libc::LOCK_EX,
                Sharing::Private => libc::LOCK_EX | libc::LOCK_NB,
            };
            // SAFETY: flock on an open descriptor owned by `file`.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                break (stem, file);
            }
            let e = io::Error::last_os_error();
            if sharing == Sharing::Private && e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                instance += 1;
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("lock cache mount {stem}: {e}")).into());
        };
        file.file().set_modified(SystemTime::now())?;
        let dir = base.join(&stem);
        let mut created = false;
        if !dir.is_dir() {
            let tmp = tempfile::Builder::new()
                .prefix(".new-")
                .tempdir_in(&base)?
                .keep();
            fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))?;
            if let Err(e) = seed(&tmp) {
                let _ = remove_tree(&tmp);
                return Err(e.into());
            }
            created = rename_noreplace(&tmp, &dir)?;
            if !created {
                remove_tree(&tmp)?;
            }
        }
        Ok((dir, MountLock { _file: file }, created))
    }

    /// Where the snapshot of chain id `chain` lives (whether or not it exists).
    pub fn snapshot_dir(&self, chain: &Digest) -> PathBuf {
        self.root.join("snapshots").join(chain.hex())
    }

    /// The layer directory (`fs/`) of snapshot `chain`, if it is complete; marks it used.
    pub fn snapshot(&self, chain: &Digest) -> Option<PathBuf> {
        let dir = self.snapshot_dir(chain);
        let fs_dir = dir.join("fs");
        if !fs_dir.is_dir() {
            return None;
        }
        let _ = touch(&dir.join("used"));
        Some(fs_dir)
    }

    /// Make snapshot `chain`: `fill` writes the layer's files into the given empty directory;
    /// the result appears atomically. When another process made it first, theirs is kept.
    pub fn put_snapshot(
        &self,
        chain: &Digest,
        fill: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        let base = self.root.join("snapshots");
        fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let tmp = tempfile::Builder::new()
            .prefix(".new-")
            .tempdir_in(&base)
            .map_err(|e| e.to_string())?
            .keep();
        let fs_dir = tmp.join("fs");
        let result = fs::create_dir(&fs_dir)
            .map_err(|e| e.to_string())
            .and_then(|()| fill(&fs_dir))
            .and_then(|()| touch(&tmp.join("used")).map_err(|e| e.to_string()));
        if let Err(e) = result {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        let dest = self.snapshot_dir(chain);
        if !rename_noreplace(&tmp, &dest).map_err(|e| e.to_string())? {
            let _ = remove_tree(&tmp);
        }
        Ok(dest.join("fs"))
    }
}

/// Bytes and count of the snapshots and cache mounts.
#[derive(Clone, Debug, Default)]
pub struct RunCaches {
    /// Snapshots: (count, bytes).
    pub snapshots: (usize, u64),
    /// Cache mounts: (count, bytes).
    pub mounts: (usize, u64),
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn last_use(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// What `cache du` counts for RUN.
pub fn run_caches(store: &Store) -> RunCaches {
    let mut out = RunCaches::default();
    for p in entries(&store.root.join("snapshots")) {
        if p.is_dir() {
            out.snapshots.0 += 1;
            out.snapshots.1 += size(&p);
        }
    }
    for p in entries(&store.root.join("cache/mounts")) {
        if p.is_dir() {
            out.mounts.0 += 1;
            out.mounts.1 += size(&p);
        }
    }
    out
}

/// Remove snapshots and cache mounts unused for `until` (all when `None`). The caller holds
/// the garbage-collection lock exclusively. Returns (snapshots, cache mounts) removed; one
/// that cannot be removed is reported as a warning, not an error.
pub(crate) fn prune_run_caches(
    store: &Store,
    until: Option<Duration>,
) -> Result<(usize, usize), StoreError> {
    let now = SystemTime::now();
    let old = |t: SystemTime| match until {
        None => true,
        Some(age) => now.duration_since(t).is_ok_and(|d| d >= age),
    };
    let mut removed = (0, 0);
    for p in entries(&store.root.join("snapshots")) {
        let stale_tmp = p
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b".new-"));
        if p.is_dir() && (stale_tmp || old(last_use(&p.join("used")))) {
            match remove_tree(&p) {
                Ok(()) => removed.0 += 1,
                Err(e) => tracing::warn!("cannot remove snapshot {}: {e}", p.display()),
            }
        }
    }
    let mounts = store.root.join("cache/mounts");
    for p in entries(&mounts) {
        if !p.is_dir() {
            continue;
        }
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let lock = mounts.join(format!("{name}.lock"));
        if name.starts_with(".new-") || old(last_use(&lock)) {
            // A rootless build with subordinate ids may have left files the caller cannot
            // delete (owned by a mapped id): say so and go on.
            match remove_tree(&p) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&lock);
                    removed.1 += 1;
                }
                Err(e) => tracing::warn!("cannot remove cache mount {}: {e}", p.display()),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_mount_sharing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let seeded = |d: &Path| fs::write(d.join("seed"), "s");
        let (a, lock_a, created) = store
            .cache_mount("id", Sharing::Shared, 0o750, seeded)
            .unwrap();
        assert!(created && a.join("seed").is_file());
        let mode = fs::metadata(&a).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750);
        // Shared: the same directory, not created again.
        let (b, _lock_b, created) = store
            .cache_mount("id", Sharing::Shared, 0o755, |_| Ok(()))
            .unwrap();
        assert!(!created);
        assert_eq!(a, b);
        // Private while in use: another directory.
        let (c, _lock_c, created) = store
            .cache_mount("id", Sharing::Private, 0o755, |_| Ok(()))
            .unwrap();
        assert!(created);
        assert_ne!(a, c);
        drop((lock_a, _lock_b));
        // Once free, private gets the first one back.
        let (d, _lock_d, _) = store
            .cache_mount("id", Sharing::Private, 0o755, |_| Ok(()))
            .unwrap();
        assert_eq!(a, d);
        assert_eq!(run_caches(&store).mounts.0, 2);
        prune_run_caches(&store, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(run_caches(&store).mounts.0, 2, "recently used ones stay");
        prune_run_caches(&store, None).unwrap();
        assert_eq!(run_caches(&store).mounts.0, 0);
    }

    #[test]
    fn snapshots_appear_whole_and_the_first_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let chain = Digest::of(b"chain");
        assert!(store.snapshot(&chain).is_none());
        let failed = store.put_snapshot(&chain, |d| {
            fs::write(d.join("half"), "x").unwrap();
            Err("refused".into())
        });
        assert!(failed.is_err() && store.snapshot(&chain).is_none());
        let first = store
            .put_snapshot(&chain, |d| {
                fs::write(d.join("f"), "1").map_err(|e| e.to_string())
            })
            .unwrap();
        let second = store
            .put_snapshot(&chain, |d| {
                fs::write(d.join("f"), "2").map_err(|e| e.to_string())
            })
            .unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::read_to_string(first.join("f")).unwrap(), "1");
        assert_eq!(store.snapshot(&chain), Some(first));
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
