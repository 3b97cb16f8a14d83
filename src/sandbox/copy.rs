//! The last-resort root: the lowers copied into a scratch directory, and after the run the
//! scratch compared with a metadata snapshot to produce an overlay-style upper directory.
//!
//! Change detection uses the inode number and ctime, which user space cannot set back; the
//! snapshot waits for the clock to move on so that a change in the same tick is still seen.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::view::{is_opaque, is_whiteout};
use super::{Result, SandboxError, cpath, set_opaque_xattr};

fn os_err(path: &Path) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{e} (path: {})", path.display()))
}

fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(os_err(path));
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn fs_err_io(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{e} (path: {})", path.display()))
}

fn remove_any(path: &Path) -> io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs_err::remove_dir_all(path),
        Ok(_) => fs_err::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copy a special file (fifo or device) with mknod.
fn mknod_like(src: &std::fs::Metadata, dest: &Path) -> io::Result<()> {
    let c = cpath(dest)?;
    // SAFETY: valid C string; mode and rdev from a stat.
    if unsafe { libc::mknod(c.as_ptr(), src.mode(), src.rdev()) } != 0 {
        return Err(os_err(dest));
    }
    Ok(())
}

/// Copy the lowers (lowest first) into `scratch`, honouring overlay whiteouts and opaque
/// directories in them as overlayfs would.
pub(super) fn populate(lowers: &[PathBuf], scratch: &Path) -> Result<()> {
    let root = is_root();
    let mut dir_modes = Vec::new();
    for lower in lowers {
        let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
        for entry in walkdir::WalkDir::new(lower)
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| SandboxError::Io(e.into()))?;
            let src = entry.path();
            let rel = src.strip_prefix(lower).map_err(io::Error::other)?;
            let dest = scratch.join(rel);
            let meta = entry.metadata().map_err(|e| SandboxError::Io(e.into()))?;
            if is_whiteout(src, &meta) {
                remove_any(&dest)?;
                continue;
            }
            let ft = meta.file_type();
            if ft.is_dir() {
                let existing = dest.symlink_metadata().ok();
                if existing.as_ref().is_some_and(|m| !m.is_dir()) || is_opaque(src) {
                    remove_any(&dest)?;
                }
                if dest.symlink_metadata().is_err() {
                    fs_err::create_dir(&dest)?;
                }
                dir_modes.push((dest.clone(), meta.mode() & 0o7777));
                fs_err::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))?;
            } else {
                remove_any(&dest)?;
                if ft.is_file() && meta.nlink() > 1 {
                    if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                        fs_err::hard_link(first, &dest)?;
                        continue;
                    }
                    links.insert((meta.dev(), meta.ino()), dest.clone());
                }
                if ft.is_file() {
                    fs_err::copy(src, &dest)?;
                    fs_err::set_permissions(
                        &dest,
                        std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                    )?;
                } else if ft.is_symlink() {
                    std::os::unix::fs::symlink(fs_err::read_link(src)?, &dest).map_err(|e| {
                        io::Error::new(e.kind(), format!("{e}: {}", dest.display()))
                    })?;
                } else {
                    mknod_like(&meta, &dest)?;
                }
            }
            if root {
                lchown(&dest, meta.uid(), meta.gid())?;
            }
        }
    }
    // Directory modes last, deepest first, so read-only directories could still be filled;
    // a higher layer may have deleted a directory a lower one made, and a re-made one takes
    // the mode of the last layer that set it.
    let mut done = HashSet::new();
    for (dir, mode) in dir_modes.iter().rev() {
        if !done.insert(dir) {
            continue;
        }
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err_io(dir, e).into()),
        }
    }
    Ok(())
}

/// What identifies a file's state before the run.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.len(),
        }
    }
    fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// The state of the scratch root before the run.
pub(super) struct Snapshot {
    stamps: HashMap<PathBuf, Stamp>,
}

fn walk(root: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(|e| SandboxError::Io(e.into()))?;
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_owned();
        let meta = entry.metadata().map_err(|e| SandboxError::Io(e.into()))?;
        out.push((rel, meta));
    }
    Ok(out)
}

/// Whether `rel` changed, and how.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Same,
    Modified,
    /// New, or a different inode or type than before.
    Replaced,
}

impl Snapshot {
    /// Record `scratch` and wait until a change would get a later ctime.
    pub fn take(scratch: &Path) -> Result<Snapshot> {
        let stamps = walk(scratch)?
            .into_iter()
            .map(|(rel, m)| (rel, Stamp::of(&m)))
            .collect();
        // File timestamps come from the coarse clock (one tick ≤ 10 ms at HZ=100).
        std::thread::sleep(std::time::Duration::from_millis(20));
        Ok(Snapshot { stamps })
    }

    /// Move what changed in `scratch` into `upper`, with whiteouts for what was deleted.
    pub fn diff_into(&self, scratch: &Path, upper: &Path) -> Result<()> {
        let now = walk(scratch)?;
        let present: HashSet<&Path> = now.iter().map(|(p, _)| p.as_path()).collect();
        let mut changes: HashMap<&Path, Change> = HashMap::new();
        let mut moved: Vec<&Path> = Vec::new();
        let mut made: HashSet<PathBuf> = HashSet::new();
        for (rel, meta) in &now {
            if moved.iter().any(|m| rel.starts_with(m)) {
                continue;
            }
            let stamp = Stamp::of(meta);
            let change = match self.stamps.get(rel) {
                None => Change::Replaced,
                Some(old) if old.ino != stamp.ino || old.file_type() != stamp.file_type() => {
                    Change::Replaced
                }
                Some(old) if *old != stamp => Change::Modified,
                Some(_) => Change::Same,
            };
            changes.insert(rel, change);
            let dest = upper.join(rel);
            match change {
                Change::Same => {}
                Change::Modified if meta.is_dir() => {
                    self.ensure_dirs(scratch, upper, rel, &mut made)?;
                }
                Change::Modified | Change::Replaced => {
                    if let Some(parent) = rel.parent() {
                        self.ensure_dirs(scratch, upper, parent, &mut made)?;
                    }
                    move_path(&scratch.join(rel), &dest)?;
                    let was_dir = self
                        .stamps
                        .get(rel)
                        .is_some_and(|s| s.file_type() == libc::S_IFDIR);
                    if meta.is_dir() {
                        moved.push(rel);
                        if was_dir {
                            mark_opaque(&dest)?;
                        }
                    }
                }
            }
        }
        let mut gone: Vec<&PathBuf> = self
            .stamps
            .keys()
            .filter(|p| !present.contains(p.as_path()))
            .collect();
        gone.sort();
        for rel in gone {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let parent_kept = parent.as_os_str().is_empty()
                || (present.contains(parent) && changes.get(parent) != Some(&Change::Replaced));
            if !parent_kept {
                continue;
            }
            if !parent.as_os_str().is_empty() {
                self.ensure_dirs(scratch, upper, parent, &mut made)?;
            }
            whiteout(&upper.join(rel))?;
        }
        Ok(())
    }

    /// Create `rel` and its parents in `upper` with the scratch's metadata.
    fn ensure_dirs(
        &self,
        scratch: &Path,
        upper: &Path,
        rel: &Path,
        made: &mut HashSet<PathBuf>,
    ) -> Result<()> {
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            prefix.push(c);
            if made.contains(&prefix) {
                continue;
            }
            let dest = upper.join(&prefix);
            if dest.symlink_metadata().is_err() {
                let meta = fs_err::symlink_metadata(scratch.join(&prefix))?;
                fs_err::create_dir(&dest)?;
                fs_err::set_permissions(&dest, std::fs::Permissions::from_mode(meta.mode()))?;
                let mine = fs_err::symlink_metadata(&dest)?;
                if (mine.uid(), mine.gid()) != (meta.uid(), meta.gid()) {
                    lchown(&dest, meta.uid(), meta.gid())?;
                }
            }
            made.insert(prefix.clone());
        }
        Ok(())
    }
}

/// Rename (which keeps owners the caller could not set, and hardlinks); `work` and `upper`
/// must be on one file system.
fn move_path(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{e}: moving {} to {}", from.display(), to.display()),
        )
        .into()),
    }
}

/// An overlay whiteout (a 0/0 character device, which unprivileged users may create since
/// Linux 5.8), or an OCI-style `.wh.` file where that is refused.
fn whiteout(path: &Path) -> Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } == 0 {
        return Ok(());
    }
    let name = path.file_name().unwrap_or_default().as_bytes();
    let marker = path.with_file_name(std::ffi::OsStr::from_bytes(&[b".wh.", name].concat()));
    fs_err::File::create(marker)?;
    Ok(())
}

/// Mark a directory opaque the way overlayfs with `userxattr` does, or with an OCI-style
/// `.wh..wh..opq` file where xattrs are refused.
fn mark_opaque(dir: &Path) -> Result<()> {
    if set_opaque_xattr(dir).is_err() {
        fs_err::File::create(dir.join(".wh..wh..opq"))?;
    }
    Ok(())
}
