//! An overlay upper directory read back as layer entries.
//!
//! Whiteouts come in three forms depending on who wrote the upper: a 0/0 character device
//! (kernel overlayfs, fuse-overlayfs with mknod), a zero-size file with an
//! `overlay.whiteout` xattr, or an OCI-style `.wh.<name>` file (fuse-overlayfs without mknod,
//! the copy-based fallback). Opaque directories: `trusted.overlay.opaque`,
//! `user.overlay.opaque`, `user.fuseoverlayfs.opaque` = `y`, or a `.wh..wh..opq` file. All
//! become the OCI forms ([image-spec layer.md § whiteouts](https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts)).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::view::{get_xattr, is_opaque, is_whiteout};
use super::{IdMap, Result, SandboxError};
use crate::layer::{Entry, EntryKind, FileSource};

const OPAQUE: &str = ".wh..wh..opq";

/// Overlay features strata never enables; an upper using them cannot be read as a plain diff.
const UNSUPPORTED_XATTRS: [&str; 4] = [
    "trusted.overlay.redirect",
    "user.overlay.redirect",
    "trusted.overlay.metacopy",
    "user.overlay.metacopy",
];

fn whiteout_entry(rel: &Path) -> Entry {
    let name = rel.file_name().unwrap_or_default().as_bytes();
    let wh = rel.with_file_name(OsStr::from_bytes(&[b".wh.", name].concat()));
    Entry::bytes(wh, b"", 0o644, 0, 0)
}

/// The layer entries of an overlay `upper` directory written by a sandbox whose user namespace
/// had the id map `ids` ([`RunOutcome::ids`](super::RunOutcome::ids)): on-disk owners are host
/// ids and are converted back to container ids.
///
/// Regular files point at the upper ([`FileSource::Path`]), so the upper must outlive the
/// layer writing; files with several links inside the upper share a `link_key`. Sockets are
/// skipped (tar cannot hold them); fifos and devices other than whiteouts are errors.
pub fn upper_to_entries(upper: &Path, ids: &IdMap) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for item in walkdir::WalkDir::new(upper)
        .min_depth(1)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| SandboxError::Io(e.into()))?;
        let path = item.path();
        let rel: PathBuf = path
            .strip_prefix(upper)
            .map_err(std::io::Error::other)?
            .to_owned();
        let meta = item.metadata().map_err(|e| SandboxError::Io(e.into()))?;
        let unsupported = |why| SandboxError::Unsupported {
            path: path.to_owned(),
            why,
        };
        for name in UNSUPPORTED_XATTRS {
            if get_xattr(path, name)?.is_some() {
                return Err(unsupported(
                    "uses overlayfs redirect/metacopy, which strata does not read",
                ));
            }
        }
        if is_whiteout(path, &meta) {
            entries.push(whiteout_entry(&rel));
            continue;
        }
        let name = rel.file_name().unwrap_or_default().as_bytes();
        let ft = meta.file_type();
        if ft.is_file() && name.starts_with(b".wh.") {
            // Already in OCI form (`.wh.<name>` or the opaque marker).
            entries.push(Entry::bytes(rel, b"", 0o644, 0, 0));
            continue;
        }
        let uid = ids.uid_to_container(meta.uid());
        let gid = ids.gid_to_container(meta.gid());
        let (Some(uid), Some(gid)) = (uid, gid) else {
            return Err(SandboxError::UnmappedOwner {
                path: path.to_owned(),
                uid: meta.uid(),
                gid: meta.gid(),
            });
        };
        let (uid, gid) = (u64::from(uid), u64::from(gid));
        let mode = meta.mode() & 0o7777;
        if ft.is_dir() {
            entries.push(Entry::dir(rel.clone(), mode, uid, gid));
            let marker_file = path.join(OPAQUE).symlink_metadata().is_ok();
            if is_opaque(path) && !marker_file {
                entries.push(Entry::bytes(rel.join(OPAQUE), b"", 0o644, 0, 0));
            }
        } else if ft.is_file() {
            let entry = Entry {
                path: rel,
                kind: EntryKind::File {
                    source: FileSource::Path(path.to_owned()),
                    size: meta.len(),
                    link_key: None,
                },
                mode,
                uid,
                gid,
            };
            entries.push(if meta.nlink() > 1 {
                entry.with_link_key(meta.ino())
            } else {
                entry
            });
        } else if ft.is_symlink() {
            let target = fs_err::read_link(path)?;
            entries.push(Entry::symlink(rel, target, uid, gid));
        } else if ft.is_socket() {
            tracing::warn!(path = %path.display(), "skipping socket left by RUN");
        } else if ft.is_fifo() {
            return Err(unsupported("is a fifo, which a layer entry cannot hold"));
        } else {
            return Err(unsupported(
                "is a device node, which a rootless layer cannot hold",
            ));
        }
    }
    Ok(entries)
}
