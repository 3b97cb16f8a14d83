//! One layer unpacked on its own, as an overlay lower: the layer's files as
//! [`unpack_layer`](super::unpack_layer) writes them, and its deletions in overlay form — a
//! whiteout `.wh.NAME` becomes a 0/0 character device `NAME` (which unprivileged users may
//! create since Linux 5.8), an opaque marker `.wh..wh..opq` the `user.overlay.opaque=y` xattr
//! on its directory (what kernel overlayfs mounted with `userxattr`, fuse-overlayfs, and the
//! copy fallback all read). Stacking such directories, lowest first, shows the image.
//!
//! The layer is read once: the tar headers are read off the bytes as
//! [`unpack_layer`](super::unpack_layer) consumes them, to list the whiteouts, which unpacking
//! into an empty directory makes no-ops.

use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::view::{self, Found};
use super::{Result, SandboxError, cpath, set_opaque_xattr};

/// The tar headers of a stream, read as the bytes go by (no copy of file data, no second
/// parse): each entry's path, with GNU long names (`L`) and PAX `path` records applied as the
/// `tar` crate applies them, ustar prefixes joined.
#[derive(Default)]
struct HeaderScan {
    /// Bytes of the header block being collected.
    block: Vec<u8>,
    /// File data (or padding) still to pass over.
    skip: u64,
    /// An extension header's data being collected: its type, bytes left, padding after.
    capture: Option<(u8, u64, u64)>,
    captured: Vec<u8>,
    long_name: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    /// Entry paths as written.
    paths: Vec<Vec<u8>>,
    /// The paths of directory entries (type `5`).
    dirs: Vec<Vec<u8>>,
    /// A malformed header: the stream cannot be trusted for whiteouts.
    bad: Option<String>,
}

fn padded(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

fn field_str(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn header_size(b: &[u8]) -> Option<u64> {
    let f = &b[124..136];
    if f[0] & 0x80 != 0 {
        // Base-256 (GNU): big-endian bytes after the marker bit.
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &c in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(c))?;
        }
        return Some(v);
    }
    let t: Vec<u8> = f
        .iter()
        .copied()
        .filter(|c| *c != 0 && *c != b' ')
        .collect();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&t).ok()?, 8).ok()
}

impl HeaderScan {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.bad.is_none() {
            if let Some((kind, left, pad)) = self.capture {
                let n = (left.min(data.len() as u64)) as usize;
                self.captured.extend_from_slice(&data[..n]);
                data = &data[n..];
                let left = left - n as u64;
                if left > 0 {
                    self.capture = Some((kind, left, pad));
                    continue;
                }
                self.capture = None;
                self.skip = pad;
                let bytes = std::mem::take(&mut self.captured);
                match kind {
                    b'L' => self.long_name = Some(field_str(&bytes).to_vec()),
                    _ => self.pax_path = pax_path(&bytes).or(self.pax_path.take()),
                }
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                self.skip -= n;
                data = &data[n as usize..];
                continue;
            }
            let n = (512 - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.block.len() == 512 {
                let block = std::mem::take(&mut self.block);
                self.header(&block);
            }
        }
    }

    fn header(&mut self, b: &[u8]) {
        if b.iter().all(|&c| c == 0) {
            return;
        }
        let Some(size) = header_size(b) else {
            self.bad = Some("unreadable size in a tar header".into());
            return;
        };
        let kind = b[156];
        match kind {
            b'L' | b'x' => {
                if size > 1 << 20 {
                    self.bad = Some("oversized tar extension header".into());
                    return;
                }
                // Finished by the next `feed`, even when empty.
                self.capture = Some((kind, size, padded(size) - size));
                return;
            }
            b'g' | b'K' => {
                self.skip = padded(size);
                return;
            }
            _ => {}
        }
        let mut path = field_str(&b[0..100]).to_vec();
        if &b[257..263] == b"ustar\0" {
            let prefix = field_str(&b[345..500]);
            if !prefix.is_empty() {
                path = [prefix, b"/", &path].concat();
            }
        }
        if let Some(l) = self.long_name.take() {
            path = l;
        }
        if let Some(p) = self.pax_path.take() {
            path = p;
        }
        if kind == b'5' {
            self.dirs.push(path.clone());
        }
        self.paths.push(path);
        // Data follows every entry by its size field, as the `tar` crate (the unpacker) reads.
        self.skip = padded(size);
    }
}

/// The `path` of PAX extended-header records (`LEN key=value\n`).
fn pax_path(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut found = None;
    while !b.is_empty() {
        let sp = b.iter().position(|&c| c == b' ')?;
        let len: usize = std::str::from_utf8(&b[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > b.len() {
            return found;
        }
        let record = &b[sp + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(v) = record.strip_prefix(b"path=") {
            found = Some(v.to_vec());
        }
        b = &b[len..];
    }
    found
}

/// A reader that shows every byte it reads to a [`HeaderScan`].
struct Tee<'a, R> {
    inner: R,
    scan: &'a mut HeaderScan,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.feed(&buf[..n]);
        Ok(n)
    }
}

/// Whiteouts of entry paths as written.
fn whiteouts_of(paths: &[Vec<u8>]) -> Vec<Whiteout> {
    let mut out = Vec::new();
    for raw in paths {
        let path = Path::new(std::ffi::OsStr::from_bytes(raw));
        let clean: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        let Some(name) = clean.file_name().map(|n| n.as_bytes().to_vec()) else {
            continue;
        };
        let parent = clean.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == b".wh..wh..opq" {
            out.push(Whiteout::Opaque(parent));
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            out.push(Whiteout::Path(
                parent.join(std::ffi::OsStr::from_bytes(hidden)),
            ));
        }
    }
    out
}

/// A whiteout of the layer.
enum Whiteout {
    /// `dir/.wh.name`: the path `dir/name`.
    Path(PathBuf),
    /// `dir/.wh..wh..opq`: the directory.
    Opaque(PathBuf),
}

/// The entry paths of a layer tar as the `tar` crate reads them.
fn tar_paths(r: impl Read) -> io::Result<Vec<Vec<u8>>> {
    let mut archive = tar::Archive::new(r);
    let mut out = Vec::new();
    for entry in archive.entries()? {
        out.push(entry?.path_bytes().into_owned());
    }
    Ok(out)
}

/// A tar path without `/`, `.` and `..` components.
fn clean(raw: &[u8]) -> PathBuf {
    Path::new(std::ffi::OsStr::from_bytes(raw))
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// The parent directories a layer's entries need but the layer does not carry itself:
/// refused where the layers below hold a symlink or a non-directory — unpacked onto the whole
/// image the entry would be written through that link (how a hostile layer reaches outside
/// the root), while stacked as an overlay lower it would silently shadow the link, and either
/// way the image is not what the layer says — and otherwise given the mode and (as root)
/// owner the layers below give them, as unpacking onto the whole image would find them.
fn implicit_dirs(
    dest: &Path,
    paths: &[Vec<u8>],
    dirs: &[Vec<u8>],
    below_top_first: &[PathBuf],
) -> Result<()> {
    let carried: std::collections::HashSet<PathBuf> = dirs.iter().map(|d| clean(d)).collect();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut seen = std::collections::HashSet::new();
    for raw in paths {
        let Some(parent) = clean(raw).parent().map(Path::to_path_buf) else {
            continue;
        };
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            if carried.contains(&prefix) || !seen.insert(prefix.clone()) {
                continue;
            }
            let refuse = |why: &str| SandboxError::UnsafeEntry {
                path: String::from_utf8_lossy(raw).into_owned(),
                why: why.into(),
            };
            match view::lookup(below_top_first, &prefix)? {
                Found::Symlink(_) => return Err(refuse("parent directory is a symlink")),
                Found::File | Found::NotDir(_) => return Err(refuse("parent is not a directory")),
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

/// The parent directories of entry paths.
fn parents_of(paths: &[Vec<u8>]) -> Vec<PathBuf> {
    let mut parents: Vec<PathBuf> = paths
        .iter()
        .filter_map(|raw| {
            let clean: PathBuf = Path::new(std::ffi::OsStr::from_bytes(raw))
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect();
            clean.parent().map(Path::to_path_buf)
        })
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    parents.sort();
    parents.dedup();
    parents
}

fn set_opaque(dir: &Path) -> Result<()> {
    if let Err(e) = set_opaque_xattr(dir) {
        return Err(io::Error::new(
            e.kind(),
            format!("mark {} opaque (user.overlay.opaque): {e}", dir.display()),
        )
        .into());
    }
    Ok(())
}

/// Make `rel`'s directories in `dest`, copying mode and (as root) owner from the layers
/// below, so the overlay shows the same metadata.
fn ensure_dirs(dest: &Path, rel: &Path, below_top_first: &[PathBuf]) -> Result<()> {
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
            Found::Symlink(_) | Found::File | Found::NotDir(_) => {
                return Err(SandboxError::UnsafeEntry {
                    path: prefix.display().to_string(),
                    why: "a layer below holds a symlink or non-directory here".into(),
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
            let paths = tar_paths(open()?).map_err(SandboxError::Tar)?;
            for p in parents_of(&paths) {
                ensure_dirs(dest, &p, below_top_first)?;
            }
            attempt(open()?, dest, below_top_first)
        }
        other => other,
    }
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
    let mut scan = HeaderScan::default();
    let mut tee = Tee {
        inner: tar,
        scan: &mut scan,
    };
    {
        // Large reads through the tee: the unpacker's small header reads come from this buffer.
        let mut buffered = io::BufReader::with_capacity(1 << 18, &mut tee);
        super::unpack_layer(&mut buffered, dest)?;
    }
    // Let the scan see the whole stream (the unpacker may stop at the end-of-archive blocks).
    io::copy(&mut tee, &mut io::sink()).map_err(SandboxError::Tar)?;
    if let Some(why) = scan.bad {
        return Err(SandboxError::Tar(io::Error::other(why)));
    }
    implicit_dirs(dest, &scan.paths, &scan.dirs, below_top_first)?;
    let whiteouts = whiteouts_of(&scan.paths);
    for w in whiteouts {
        match w {
            Whiteout::Opaque(dir) => {
                ensure_dirs(dest, &dir, below_top_first)?;
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
                            ensure_dirs(dest, parent, below_top_first)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(tar: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut scan = HeaderScan::default();
        for c in tar.chunks(chunk) {
            scan.feed(c);
        }
        assert!(scan.bad.is_none(), "{:?}", scan.bad);
        scan.paths
    }

    /// The inline header scan reads the same paths as the `tar` crate: plain, ustar-prefixed,
    /// GNU long names, PAX paths, links and directories, fed in any chunk size.
    #[test]
    fn header_scan_agrees_with_the_tar_crate() {
        let long = format!("{}/.wh.{}", "d".repeat(120), "f".repeat(90));
        let mut b = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, mut h: tar::Header, path: &str, data: &[u8]| {
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
        add(&mut b, tar::Header::new_ustar(), "etc/.wh.passwd", b"");
        add(&mut b, tar::Header::new_gnu(), &long, b"");
        add(
            &mut b,
            tar::Header::new_ustar(),
            &format!("{}/x", "p".repeat(150)),
            b"data!",
        );
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        add(&mut b, dir, "srv/", b"");
        b.append_pax_extensions([(
            "path",
            format!("{}/.wh..wh..opq", "q".repeat(200)).as_bytes(),
        )])
        .unwrap();
        add(&mut b, tar::Header::new_ustar(), "placeholder", b"");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_cksum();
        b.append_link(&mut link, "lnk", "etc/passwd").unwrap();
        add(&mut b, tar::Header::new_ustar(), "big", &vec![7u8; 70_000]);
        let tar = b.into_inner().unwrap();
        let expected = tar_paths(&tar[..]).unwrap();
        assert_eq!(expected.len(), 7);
        for chunk in [1, 7, 512, 4096, 1 << 20] {
            assert_eq!(scanned(&tar, chunk), expected, "chunk {chunk}");
        }
        let w = whiteouts_of(&expected);
        assert_eq!(w.len(), 3);
        assert!(matches!(&w[2], Whiteout::Opaque(p) if p == Path::new(&"q".repeat(200))));
    }
}
