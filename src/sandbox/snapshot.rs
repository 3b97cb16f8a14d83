//! One layer unpacked on its own, as an overlay lower: the layer's files as
//! [`unpack_layer`](super::unpack_layer) writes them, and its deletions in overlay form — a
//! whiteout `.wh.NAME` becomes a 0/0 character device `NAME` (which unprivileged users may
//! create since Linux 5.8), an opaque marker `.wh..wh..opq` the `user.overlay.opaque=y` xattr
//! on its directory (what kernel overlayfs mounted with `userxattr`, fuse-overlayfs, and the
//! copy fallback all read). Stacking such directories, lowest first, shows the image.
//!
//! The layer is read once: a tee feeds the bytes [`unpack_layer`](super::unpack_layer) reads
//! to a thread that lists the whiteouts, which unpacking into an empty directory makes no-ops.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;

use super::view::{self, Found};
use super::{Result, SandboxError};

/// A reader passing a copy of every chunk it reads to a channel.
struct Tee<R> {
    inner: R,
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && let Some(tx) = &self.tx
            && tx.send(buf[..n].to_vec()).is_err()
        {
            self.tx = None;
        }
        Ok(n)
    }
}

/// The receiving end, as a reader.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A whiteout of the layer.
enum Whiteout {
    /// `dir/.wh.name`: the path `dir/name`.
    Path(PathBuf),
    /// `dir/.wh..wh..opq`: the directory.
    Opaque(PathBuf),
}

/// The whiteouts of a layer tar, and the parent directories of its entries.
/// What a pass over a layer learns besides its content.
#[derive(Default)]
struct Scan {
    whiteouts: Vec<Whiteout>,
    /// Each parent directory the entries need, with the (raw) name of the first entry below
    /// it, for error messages.
    parents: Vec<(PathBuf, String)>,
    /// The directories the layer carries as entries of its own.
    dirs: std::collections::HashSet<PathBuf>,
}

fn scan(r: impl Read) -> io::Result<Scan> {
    let mut out = Vec::new();
    let mut parents: Vec<(PathBuf, String)> = Vec::new();
    let mut dirs = std::collections::HashSet::new();
    let mut archive = tar::Archive::new(r);
    for entry in archive.entries()? {
        let entry = entry?;
        let is_dir = entry.header().entry_type().is_dir();
        let raw = entry.path_bytes().into_owned();
        let path = Path::new(std::ffi::OsStr::from_bytes(&raw));
        let clean: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        let Some(name) = clean.file_name().map(|n| n.as_bytes().to_vec()) else {
            continue;
        };
        if is_dir {
            dirs.insert(clean.clone());
        }
        let parent = clean.parent().unwrap_or(Path::new("")).to_path_buf();
        if !parent.as_os_str().is_empty() && parents.last().map(|(p, _)| p) != Some(&parent) {
            parents.push((parent.clone(), String::from_utf8_lossy(&raw).into_owned()));
        }
        if name == b".wh..wh..opq" {
            out.push(Whiteout::Opaque(parent));
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            out.push(Whiteout::Path(
                parent.join(std::ffi::OsStr::from_bytes(hidden)),
            ));
        }
    }
    parents.sort();
    parents.dedup_by(|a, b| a.0 == b.0);
    Ok(Scan {
        whiteouts: out,
        parents,
        dirs,
    })
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn set_opaque(dir: &Path) -> Result<()> {
    let c = cpath(dir)?;
    // SAFETY: valid C strings and a one-byte value.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mark {} opaque (user.overlay.opaque): {e}", dir.display()),
        )
        .into());
    }
    Ok(())
}

/// Make `rel`'s directories in `dest`, copying mode and (as root) owner from the layers
/// below, so the overlay shows the same metadata. `entry` names what needs them in errors.
///
/// A directory the layer does not carry itself but the layers below hold as a symlink (or a
/// non-directory) is refused: unpacked onto the whole image, the layer would write through
/// that link, which is how a hostile layer reaches outside the root; stacked as an overlay
/// lower it would silently shadow the link instead. Either way the image is not what the
/// layer says, so it is an error, as in [`unpack_layer`](super::unpack_layer).
fn ensure_dirs(dest: &Path, rel: &Path, below_top_first: &[PathBuf], entry: &str) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut prefix = PathBuf::new();
    for c in rel.components() {
        prefix.push(c);
        let at = dest.join(&prefix);
        match at.symlink_metadata() {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(SandboxError::UnsafeEntry {
                    path: prefix.display().to_string(),
                    why: "whiteout below a non-directory".into(),
                });
            }
            Err(_) => {}
        }
        let (mode, owner) = match view::lookup(below_top_first, &prefix)? {
            Found::Dir(meta) => (meta.mode() & 0o7777, Some((meta.uid(), meta.gid()))),
            Found::Symlink(_) => {
                return Err(SandboxError::UnsafeEntry {
                    path: entry.to_string(),
                    why: "parent directory is a symlink".into(),
                });
            }
            Found::File | Found::NotDir(_) => {
                return Err(SandboxError::UnsafeEntry {
                    path: entry.to_string(),
                    why: "parent is not a directory".into(),
                });
            }
            Found::Missing => (0o755, None),
        };
        fs_err::create_dir(&at)?;
        fs_err::set_permissions(&at, std::fs::Permissions::from_mode(mode))?;
        if root && let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&at, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Unpack the layer tar `tar` into the empty directory `dest` as an overlay lower directory
/// (see the module docs); `below_top_first` are the directories of the layers under it, for
/// the metadata of parent directories a whiteout needs but the layer does not carry.
///
/// `open` gives a fresh reader of the uncompressed tar. Layers whose entries lack their parent
/// directories (some tools write only files) would fail on their own: then the layer is read
/// once more for its parents, which are made with the metadata the layers below give them
/// (as unpacking onto the whole image would find them), and unpacked again.
pub fn unpack_layer_dir<R: Read>(
    open: impl Fn() -> io::Result<R>,
    dest: &Path,
    below_top_first: &[PathBuf],
) -> Result<()> {
    match attempt(open()?, dest, below_top_first) {
        Err(SandboxError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
            tracing::debug!("layer lacks parent directory entries ({e}); making them first");
            clear(dest)?;
            let parents = scan(open()?).map_err(SandboxError::Tar)?.parents;
            for (p, entry) in parents {
                ensure_dirs(dest, &p, below_top_first, &entry)?;
            }
            attempt(open()?, dest, below_top_first)
        }
        other => other,
    }
}

/// The parent directories a layer's entries needed but the layer does not carry: refused
/// where the layers below hold a symlink or a non-directory (see [`ensure_dirs`]), else given
/// the mode and (as root) owner the layers below give them, as unpacking onto the whole image
/// would find them.
fn implicit_dirs(
    dest: &Path,
    parents: &[(PathBuf, String)],
    carried: &std::collections::HashSet<PathBuf>,
    below_top_first: &[PathBuf],
) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut seen = std::collections::HashSet::new();
    for (parent, entry) in parents {
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            if carried.contains(&prefix) || !seen.insert(prefix.clone()) {
                continue;
            }
            match view::lookup(below_top_first, &prefix)? {
                Found::Symlink(_) => {
                    return Err(SandboxError::UnsafeEntry {
                        path: entry.clone(),
                        why: "parent directory is a symlink".into(),
                    });
                }
                Found::File | Found::NotDir(_) => {
                    return Err(SandboxError::UnsafeEntry {
                        path: entry.clone(),
                        why: "parent is not a directory".into(),
                    });
                }
                Found::Dir(meta) => {
                    let at = dest.join(&prefix);
                    if at.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                        fs_err::set_permissions(
                            &at,
                            std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                        )?;
                        if root {
                            std::os::unix::fs::lchown(&at, Some(meta.uid()), Some(meta.gid()))?;
                        }
                    }
                }
                Found::Missing => {}
            }
        }
    }
    Ok(())
}

/// Empty `dir`, read-only directories included.
fn clear(dir: &Path) -> Result<()> {
    for e in walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .flatten()
    {
        if e.file_type().is_dir() {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o700));
        }
    }
    for e in fs_err::read_dir(dir)? {
        let p = e?.path();
        if p.symlink_metadata()?.is_dir() {
            fs_err::remove_dir_all(&p)?;
        } else {
            fs_err::remove_file(&p)?;
        }
    }
    Ok(())
}

fn attempt(tar: impl Read, dest: &Path, below_top_first: &[PathBuf]) -> Result<()> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(64);
    let scanner = std::thread::spawn(move || {
        scan(ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        })
    });
    let mut tee = Tee {
        inner: tar,
        tx: Some(tx),
    };
    // Large reads through the tee: the unpacker's small header reads come from this buffer.
    let mut buffered = io::BufReader::with_capacity(1 << 18, &mut tee);
    let unpacked = super::unpack_layer(&mut buffered, dest);
    drop(buffered);
    // Let the scanner see the whole stream (the unpacker may stop at the end-of-archive blocks).
    let drained = unpacked
        .is_ok()
        .then(|| io::copy(&mut tee, &mut io::sink()));
    drop(tee);
    let whiteouts = scanner
        .join()
        .map_err(|_| io::Error::other("whiteout scanner panicked"))?;
    unpacked?;
    if let Some(d) = drained {
        d.map_err(SandboxError::Tar)?;
    }
    let Scan {
        whiteouts,
        parents,
        dirs,
    } = whiteouts.map_err(SandboxError::Tar)?;
    implicit_dirs(dest, &parents, &dirs, below_top_first)?;
    for w in whiteouts {
        match w {
            Whiteout::Opaque(dir) => {
                let entry = dir.join(".wh..wh..opq").display().to_string();
                ensure_dirs(dest, &dir, below_top_first, &entry)?;
                set_opaque(&dest.join(&dir))?;
            }
            Whiteout::Path(rel) => {
                let at = dest.join(&rel);
                match at.symlink_metadata() {
                    // The layer put something new there: a directory replaces the old one.
                    Ok(m) if m.is_dir() => set_opaque(&at)?,
                    Ok(_) => {}
                    Err(_) => {
                        if let Some(parent) = rel.parent() {
                            let entry = rel.display().to_string();
                            ensure_dirs(dest, parent, below_top_first, &entry)?;
                        }
                        let c = cpath(&at)?;
                        // SAFETY: valid C string; a 0/0 character device is a whiteout.
                        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                            let e = io::Error::last_os_error();
                            return Err(io::Error::new(
                                e.kind(),
                                format!("create whiteout {}: {e}", at.display()),
                            )
                            .into());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Copy the layer directories `lowers` (lowest first) into `dest`, applying their overlay
/// whiteouts and opaque directories: one merged tree.
pub fn merge_lowers(lowers: &[PathBuf], dest: &Path) -> Result<()> {
    super::copy::populate(lowers, dest)
}
