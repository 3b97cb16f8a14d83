//! Applying an uncompressed layer tar to a directory, safely: every refusal is an error.
//!
//! Refused: absolute paths, `..` components, entries whose parent path goes through a symlink
//! (writing through it could land outside the directory), symlinks whose relative target climbs
//! above the root, hardlinks to anything outside the directory or through a symlink, and device
//! nodes when not running as root, whiteouts naming `.` or `..`. Whiteouts (`.wh.<name>`,
//! `.wh..wh..opq`) delete what earlier layers put in the directory ([image-spec layer.md §
//! whiteouts](https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts)); an
//! opaque directory keeps only what its own layer wrote, at any depth.
//!
//! Metadata is applied so the snapshot looks like the image to the commands that run on it:
//! owners (as root) before modes, since `chown` clears setuid and setgid bits; modification
//! times of every entry (directories last, once their children exist); missing parent
//! directories are created 0755.

use fs_err::os::unix::fs::OpenOptionsExt;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::{Result, SandboxError, cpath};

fn refuse(path: &[u8], why: impl Into<String>) -> SandboxError {
    SandboxError::UnsafeEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        why: why.into(),
    }
}

/// A tar path as a clean relative path; `None` for the root itself (`./`).
fn clean(raw: &[u8]) -> Result<Option<PathBuf>> {
    if raw.contains(&0) {
        return Err(refuse(raw, "NUL byte in path"));
    }
    if raw.starts_with(b"/") {
        return Err(refuse(raw, "absolute path"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse(raw, "`..` component")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(raw, "absolute path"));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Fail if any ancestor of `rel` inside `dest` is a symlink or not a directory.
fn check_parents(dest: &Path, rel: &Path, raw: &[u8]) -> Result<()> {
    let mut p = dest.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        p.push(c);
        match p.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refuse(raw, "parent directory is a symlink"));
            }
            Ok(m) if !m.is_dir() => return Err(refuse(raw, "parent is not a directory")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether a symlink at `rel` with `target` stays inside the root when resolved lexically
/// (absolute targets are relative to the root, as inside the container).
fn symlink_stays_inside(rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return true;
    }
    let mut depth: usize = rel.components().count().saturating_sub(1);
    for c in target.components() {
        match c {
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    true
}

/// Create the missing ancestors of `rel` (0755; [`check_parents`] has made sure none of the
/// existing ones is a symlink).
fn create_parents(dest: &Path, rel: &Path) -> io::Result<()> {
    match rel.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            let dir = dest.join(p);
            if dir.symlink_metadata().is_err() {
                fs_err::create_dir_all(&dir)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Remove everything below `dir` (relative `rel` to the root) that this layer did not write:
/// the effect of an opaque marker. Directories this layer wrote are kept but cleaned the same
/// way, since their lower content is hidden too.
fn remove_unwritten(dir: &Path, rel: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for child in fs_err::read_dir(dir)? {
        let child = child?;
        let child_rel = rel.join(child.file_name());
        if !written.contains(&child_rel) {
            remove_any(&child.path())?;
        } else if child.file_type()?.is_dir() {
            remove_unwritten(&child.path(), &child_rel, written)?;
        }
    }
    Ok(())
}

/// Set the access and modification times of `path` (not following a symlink) to `mtime`.
fn set_mtime(path: &Path, mtime: u64) -> Result<()> {
    let c = cpath(path)?;
    let t = libc::timespec {
        tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid C string and a two-element timespec array.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(os_err(path));
    }
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs_err::remove_dir_all(path),
        Ok(_) => fs_err::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn os_err(path: &Path) -> SandboxError {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{e} (path: {})", path.display())).into()
}

fn lchown(path: &Path, uid: u64, gid: u64) -> Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    if unsafe { libc::lchown(c.as_ptr(), uid as u32, gid as u32) } != 0 {
        return Err(os_err(path));
    }
    Ok(())
}

/// Apply the uncompressed layer tar read from `tar` to the directory `dest`.
///
/// Owners are applied when running as root (also root of a rootless user namespace, see
/// `strata build`'s re-execution); otherwise every file belongs to the caller (who is root
/// inside a sandbox with a single-id map). Device nodes only as root of the host's user
/// namespace. Dir modes are applied last so a read-only
/// directory can still be filled.
pub fn unpack_layer(tar: impl Read, dest: &Path) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    unpack_with(tar, dest, root && in_initial_user_namespace())
}

/// Whether this process is in the host's user namespace (where root may make device nodes),
/// not root of a rootless one: the initial namespace maps every id to itself.
fn in_initial_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        f == ["0", "0", "4294967295"]
    })
}

/// [`unpack_layer`], with device nodes allowed or not.
pub(super) fn unpack_with(tar: impl Read, dest: &Path, devices: bool) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut archive = tar::Archive::new(tar);
    let mut written: HashSet<PathBuf> = HashSet::new();
    // Directories: (path, mode, mtime), fixed up last.
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    for entry in archive.entries().map_err(SandboxError::Tar)? {
        let mut entry = entry.map_err(SandboxError::Tar)?;
        if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = clean(&raw)? else {
            continue;
        };
        check_parents(dest, &rel, &raw)?;
        let path = dest.join(&rel);
        let name = rel.file_name().unwrap_or_default().as_bytes().to_vec();
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let parent = rel.parent().unwrap_or(Path::new(""));
            if hidden == b".wh..opq" {
                let dir = dest.join(parent);
                if dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    remove_unwritten(&dir, parent, &written)?;
                }
            } else if hidden.is_empty() || hidden.starts_with(b".wh.") {
                return Err(refuse(&raw, "malformed whiteout"));
            } else if hidden == b"." || hidden == b".." {
                return Err(refuse(&raw, "whiteout of `.` or `..`"));
            } else {
                let target = parent.join(OsStr::from_bytes(hidden));
                if !written.contains(&target) {
                    remove_any(&dest.join(target))?;
                }
            }
            continue;
        }
        let header = entry.header();
        let mode = header.mode().map_err(SandboxError::Tar)? & 0o7777;
        let uid = header.uid().map_err(SandboxError::Tar)?;
        let gid = header.gid().map_err(SandboxError::Tar)?;
        let mtime = header.mtime().map_err(SandboxError::Tar)?;
        let kind = header.entry_type();
        create_parents(dest, &rel)?;
        let existing = path.symlink_metadata().ok();
        // The mode to set once the owner is: chown clears setuid/setgid bits.
        let mut chmod_after_chown = None;
        if kind.is_dir() {
            if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                remove_any(&path)?;
            }
            if path.symlink_metadata().is_err() {
                fs_err::create_dir(&path)?;
            }
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
            dirs.push((path.clone(), mode, mtime));
        } else {
            if existing.is_some() {
                remove_any(&path)?;
            }
            if kind.is_file()
                || kind == tar::EntryType::Continuous
                || kind == tar::EntryType::GNUSparse
            {
                let mut out = fs_err::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)?;
                io::copy(&mut entry, &mut out).map_err(SandboxError::Tar)?;
                chmod_after_chown = Some(mode);
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(&raw, "symlink without a target"))?;
                let target = Path::new(OsStr::from_bytes(&target)).to_owned();
                if !symlink_stays_inside(&rel, &target) {
                    return Err(refuse(
                        &raw,
                        format!("symlink target {} escapes the root", target.display()),
                    ));
                }
                std::os::unix::fs::symlink(&target, &path).map_err(|e| {
                    io::Error::new(e.kind(), format!("{e} (path: {})", path.display()))
                })?;
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse(&raw, "hardlink without a target"))?
                    .into_owned();
                let Some(target_rel) = clean(&target)? else {
                    return Err(refuse(&raw, "hardlink to the root"));
                };
                check_parents(dest, &target_rel, &target)?;
                let target_path = dest.join(&target_rel);
                match target_path.symlink_metadata() {
                    Ok(m) if m.is_dir() => return Err(refuse(&raw, "hardlink to a directory")),
                    Ok(_) => fs_err::hard_link(&target_path, &path)?,
                    Err(_) => return Err(refuse(&raw, "hardlink target does not exist")),
                }
                written.insert(rel);
                continue;
            } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                if !kind.is_fifo() && !devices {
                    return Err(refuse(&raw, "device node in a rootless unpack"));
                }
                let major = header
                    .device_major()
                    .map_err(SandboxError::Tar)?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(SandboxError::Tar)?
                    .unwrap_or(0);
                let fmt = if kind.is_fifo() {
                    libc::S_IFIFO
                } else if kind.is_character_special() {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                let c = cpath(&path)?;
                // SAFETY: valid C string.
                if unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, libc::makedev(major, minor)) } != 0
                {
                    return Err(os_err(&path));
                }
                chmod_after_chown = Some(mode);
            } else {
                return Err(refuse(
                    &raw,
                    format!("unsupported entry type {:?}", kind.as_byte() as char),
                ));
            }
        }
        if root {
            lchown(&path, uid, gid)?;
        }
        if let Some(mode) = chmod_after_chown {
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
        if !kind.is_dir() {
            set_mtime(&path, mtime)?;
        }
        written.insert(rel);
    }
    // Deepest last in tar order means children first when reversed. A later entry may have
    // replaced a directory by something else (a symlink, say): never chmod through it.
    for (dir, mode, mtime) in dirs.iter().rev() {
        if dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            fs_err::set_permissions(dir, std::fs::Permissions::from_mode(*mode))?;
            set_mtime(dir, *mtime)?;
        }
    }
    Ok(())
}
