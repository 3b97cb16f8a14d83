//! The merged view of a stack of layer directories, as overlayfs would show it, read without
//! mounting: enough to know whether a mountpoint exists before the sandbox starts.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// What a path is in the merged view.
#[derive(Debug)]
pub(super) enum Found {
    /// Nothing there (or whited out).
    Missing,
    /// A directory; the metadata of the topmost layer holding it.
    Dir(std::fs::Metadata),
    /// A regular file.
    File,
    /// A component (or the path itself) is a symbolic link.
    Symlink(PathBuf),
    /// A component is a file, device or fifo.
    NotDir(PathBuf),
}

/// Whether `meta` at `path` is an overlay whiteout (a 0/0 character device, or a file marked
/// with the `overlay.whiteout` xattr).
pub(super) fn is_whiteout(path: &Path, meta: &std::fs::Metadata) -> bool {
    let ft = meta.file_type();
    (ft.is_char_device() && meta.rdev() == 0)
        || (ft.is_file()
            && meta.len() == 0
            && (has_xattr(path, "trusted.overlay.whiteout")
                || has_xattr(path, "user.overlay.whiteout")))
}

/// Whether directory `path` is marked opaque by an overlay implementation.
pub(super) fn is_opaque(path: &Path) -> bool {
    [
        "trusted.overlay.opaque",
        "user.overlay.opaque",
        "user.fuseoverlayfs.opaque",
    ]
    .iter()
    .any(|name| matches!(get_xattr(path, name), Ok(Some(v)) if v == b"y"))
        || path.join(".wh..wh..opq").symlink_metadata().is_ok()
}

fn has_xattr(path: &Path, name: &str) -> bool {
    matches!(get_xattr(path, name), Ok(Some(_)))
}

/// The value of extended attribute `name` of `path` (not following symlinks).
pub(super) fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let n = std::ffi::CString::new(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid C strings and a buffer of the given length.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// Look `rel` (relative, clean) up in `layers`, topmost first.
pub(super) fn lookup(layers_top_first: &[PathBuf], rel: &Path) -> io::Result<Found> {
    let comps: Vec<_> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for layer in layers_top_first {
        let mut p = layer.clone();
        let mut opaque_below = false;
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            let meta = match p.symlink_metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            };
            if is_whiteout(&p, &meta) {
                return Ok(Found::Missing);
            }
            let here: PathBuf = comps[..=i].iter().collect();
            let ft = meta.file_type();
            if ft.is_symlink() {
                return Ok(Found::Symlink(here));
            }
            let last = i + 1 == comps.len();
            if last {
                return Ok(if ft.is_dir() {
                    Found::Dir(meta)
                } else if ft.is_file() {
                    Found::File
                } else {
                    Found::NotDir(here)
                });
            }
            if !ft.is_dir() {
                return Ok(Found::NotDir(here));
            }
            opaque_below |= is_opaque(&p);
        }
        if opaque_below {
            return Ok(Found::Missing);
        }
    }
    Ok(Found::Missing)
}
