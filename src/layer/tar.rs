//! The deterministic tar writer.
//!
//! Headers are written by hand rather than through `tar::Builder`: its deterministic mode
//! rewrites permissions to 0644/0755 and it falls back to GNU long-name records, while a layer
//! must keep modes exactly and stay POSIX (ustar, with PAX extended headers only where ustar
//! cannot express a value). See
//! <https://pubs.opengroup.org/onlinepubs/9699919799/utilities/pax.html#tag_20_92_13_06> and the
//! OCI layer spec <https://github.com/opencontainers/image-spec/blob/main/layer.md>.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;

use fs_err::os::unix::fs::OpenOptionsExt;

use crate::digest::{Digest, ThreadedHashingWriter};
use crate::media::Compression;

use super::entry::check_path;
use super::pgzip::{BlockOptions, BlockRecord, ParGzEncoder, ReuseSource};
use super::zstd::ZstdWriter;
use super::{Entry, EntryKind, FileSource, LayerError, Result};

const BLOCK: usize = 512;
/// Largest value of an 8-byte octal field (7 digits).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits).
const MAX_OCTAL_12: u64 = 0o77777777777;
/// The OS byte of every gzip header strata writes (255 = unknown), so output does not depend on
/// the build host.
const GZIP_OS: u8 = 255;

/// gzip level when none is given: 1, as go-containerregistry (ko, crane) uses. Measured on
/// the benchmark app tree (78 MB): level 1 gives a layer 8% larger than level 6 in two thirds
/// of the time, which is the better trade for pushes to and pulls from a registry nearby;
/// `--compression-level 6` (or zstd) for the other trade.
pub const DEFAULT_GZIP_LEVEL: i32 = 1;

/// What writing a layer produced, besides the compressed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the uncompressed tar: the layer's diff_id in the image config.
    pub diff_id: Digest,
    /// Length of the uncompressed tar in bytes.
    pub uncompressed_size: u64,
}

/// Writes a set of [`Entry`] values as a reproducible, compressed tar layer.
///
/// The same entries (in any order) and the same settings always give the same bytes, whatever
/// the thread count, the host, the umask or the files' timestamps:
///
/// - entries are sorted bytewise by path, so parents precede children; duplicates are an error.
///   Missing parent directories are not invented: that is the caller's job.
/// - headers are ustar with the entry's exact mode (`& 0o7777`), uid and gid, no user or group
///   names, and one mtime for every entry (SOURCE_DATE_EPOCH, 0 by default); PAX extended headers
///   appear only for values ustar cannot hold (long names, sizes of 8 GiB and more, large ids).
/// - files sharing a `link_key` are stored once, under the first path in sort order, and the
///   others become hardlinks to it.
/// - gzip is written pigz-style (fixed-size blocks compressed in parallel, each primed with the
///   previous 32 KiB, in one member whose header has no name, mtime 0 and a fixed OS byte);
///   zstd always runs in multi-threaded mode (its single-threaded output differs, and the
///   multi-threaded output does not depend on the number of workers).
#[derive(Clone, Debug)]
pub struct LayerWriter {
    compression: Compression,
    level: Option<i32>,
    mtime: u64,
    threads: u32,
    /// gzip: record block keys and offsets (see [`super::pgzip`]).
    record_blocks: bool,
    /// gzip: blocks of an earlier blob to copy when unchanged.
    reuse: Option<std::sync::Arc<ReuseSource>>,
    /// Checked before each entry: once set, the write stops with [`LayerError::Cancelled`].
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for LayerWriter {
    fn default() -> Self {
        LayerWriter::new()
    }
}

impl LayerWriter {
    /// A gzip writer with the default level, mtime 0 and one thread.
    pub fn new() -> LayerWriter {
        LayerWriter {
            compression: Compression::Gzip,
            level: None,
            mtime: 0,
            threads: 1,
            record_blocks: false,
            reuse: None,
            stop: None,
        }
    }

    /// Stop at the next entry once `flag` is set (a cancelled build); the output is then
    /// incomplete and the caller drops it.
    pub fn stop_on(mut self, flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) -> Self {
        self.stop = flag;
        self
    }

    /// gzip only: record where each block lands ([`LayerWriter::write_recorded`] returns the
    /// records) and copy blocks found in `reuse` instead of compressing them. The output
    /// bytes are the same with or without this.
    pub fn block_reuse(
        mut self,
        record: bool,
        reuse: Option<std::sync::Arc<ReuseSource>>,
    ) -> LayerWriter {
        self.record_blocks = record;
        self.reuse = reuse;
        self
    }

    /// The compression to apply.
    pub fn compression(mut self, compression: Compression) -> LayerWriter {
        self.compression = compression;
        self
    }

    /// The compression level (gzip 0–9, default 1; zstd 1–22, default 3); `None` for the
    /// default. Ignored for uncompressed layers.
    pub fn level(mut self, level: Option<i32>) -> LayerWriter {
        self.level = level;
        self
    }

    /// The modification time of every entry, in seconds since the epoch (SOURCE_DATE_EPOCH).
    pub fn mtime(mut self, mtime: u64) -> LayerWriter {
        self.mtime = mtime;
        self
    }

    /// Compression threads (at least 1). The output does not depend on this.
    pub fn threads(mut self, threads: u32) -> LayerWriter {
        self.threads = threads.max(1);
        self
    }

    /// Write `entries` as a tar layer, compressed, into `out`; return the diff_id and
    /// uncompressed size, and `out` back. The caller hashes `out` for the blob digest.
    pub fn write<W: Write>(&self, entries: Vec<Entry>, out: W) -> Result<(LayerStats, W)> {
        self.write_recorded(entries, out)
            .map(|(stats, out, _)| (stats, out))
    }

    /// [`LayerWriter::write`], also returning the gzip block records (empty unless
    /// [`LayerWriter::block_reuse`] asked for them).
    pub fn write_recorded<W: Write>(
        &self,
        mut entries: Vec<Entry>,
        out: W,
    ) -> Result<(LayerStats, W, Vec<BlockRecord>)> {
        let encoder = self.encoder(out)?;
        for e in &entries {
            check_path(&e.path)?;
        }
        entries.sort_by(|a, b| path_bytes(a).cmp(path_bytes(b)));
        if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(LayerError::DuplicatePath {
                path: w[0].path.clone(),
            });
        }
        // The first path (in sort order) of each hardlink group carries the content.
        let mut first_of_group: HashMap<u64, usize> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if let EntryKind::File {
                link_key: Some(k), ..
            } = e.kind
            {
                first_of_group.entry(k).or_insert(i);
            }
        }

        // The diff_id is hashed on its own thread while this one builds the tar and feeds
        // the compressor.
        let mut tar = ThreadedHashingWriter::new(encoder);
        for (i, e) in entries.iter().enumerate() {
            let link_to = match e.kind {
                EntryKind::File {
                    link_key: Some(k), ..
                } => first_of_group
                    .get(&k)
                    .filter(|&&first| first != i)
                    .map(|&first| &entries[first]),
                _ => None,
            };
            if self
                .stop
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Err(LayerError::Cancelled);
            }
            tar.cut(false)?;
            self.write_entry(&mut tar, e, link_to)?;
        }
        // End of archive: two zero blocks.
        tar.write_all(&[0; 2 * BLOCK])?;
        let (diff_id, uncompressed_size, encoder) = tar.finish()?;
        let (out, records) = encoder.finish()?;
        Ok((
            LayerStats {
                diff_id,
                uncompressed_size,
            },
            out,
            records,
        ))
    }

    fn encoder<W: Write>(&self, out: W) -> Result<Encoder<W>> {
        match self.compression {
            Compression::None => Ok(Encoder::None(out)),
            Compression::Gzip => {
                let level = self.level.unwrap_or(DEFAULT_GZIP_LEVEL);
                let level = u32::try_from(level).ok().filter(|l| *l <= 9).ok_or(
                    LayerError::InvalidLevel {
                        compression: "gzip",
                        level,
                    },
                )?;
                let opts = BlockOptions {
                    hinted: true,
                    record: self.record_blocks,
                    reuse: self.reuse.clone(),
                };
                Ok(Encoder::Gzip(ParGzEncoder::with_options(
                    out,
                    level,
                    self.threads,
                    GZIP_OS,
                    opts,
                )?))
            }
            Compression::Zstd => {
                let level = self.level.unwrap_or(3);
                if !(1..=22).contains(&level) {
                    return Err(LayerError::InvalidLevel {
                        compression: "zstd",
                        level,
                    });
                }
                let z = ZstdWriter::new(out, level, self.threads)?;
                Ok(Encoder::Zstd(z))
            }
        }
    }

    fn write_entry(&self, w: &mut impl Sink, e: &Entry, link_to: Option<&Entry>) -> Result<()> {
        let path = path_bytes(e);
        let mode = e.mode & 0o7777;
        let mut h = HeaderFields {
            name: path.to_vec(),
            typeflag: b'0',
            mode,
            uid: e.uid,
            gid: e.gid,
            size: 0,
            mtime: self.mtime,
            linkname: Vec::new(),
        };
        match (&e.kind, link_to) {
            (EntryKind::Dir, _) => {
                h.typeflag = b'5';
                h.name.push(b'/');
            }
            (EntryKind::Symlink { target }, _) => {
                let target = target.as_os_str().as_bytes();
                if target.contains(&0) {
                    return Err(LayerError::InvalidPath {
                        path: e.path.to_string_lossy().into_owned(),
                        why: "symlink target contains a NUL byte",
                    });
                }
                h.typeflag = b'2';
                h.linkname = target.to_vec();
            }
            (EntryKind::File { .. }, Some(first)) => {
                h.typeflag = b'1';
                h.linkname = path_bytes(first).to_vec();
            }
            (EntryKind::File { size, .. }, None) => h.size = *size,
        }
        write_header(w, &h)?;
        if let (EntryKind::File { source, size, .. }, None) = (&e.kind, link_to) {
            copy_content(w, e, source, *size)?;
            let pad = padding(*size);
            w.write_all(&[0; BLOCK][..pad])?;
        }
        Ok(())
    }
}

fn path_bytes(e: &Entry) -> &[u8] {
    e.path.as_os_str().as_bytes()
}

fn padding(size: u64) -> usize {
    // The remainder is below 512, so the cast cannot truncate.
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// Where tar bytes go: a writer that can also copy from a reader without an intermediate
/// buffer and be told where a compressed block may end.
trait Sink: Write {
    /// A possible gzip block boundary (see [`ParGzEncoder::cut`]); a no-op for other
    /// compressions.
    fn cut(&mut self, force: bool) -> io::Result<()>;
    /// Copy up to `n` bytes from `r`; returns how many were copied.
    fn copy_from(&mut self, r: &mut dyn Read, n: u64) -> io::Result<u64>;
}

impl<W: Write> Sink for ThreadedHashingWriter<Encoder<W>> {
    fn cut(&mut self, force: bool) -> io::Result<()> {
        if !matches!(self.get_ref(), Encoder::Gzip(_)) {
            return Ok(());
        }
        // Hand the buffered bytes down, then cut.
        self.spill()?;
        match self.get_mut() {
            Encoder::Gzip(g) => g.cut(force),
            _ => Ok(()),
        }
    }
    fn copy_from(&mut self, mut r: &mut dyn Read, n: u64) -> io::Result<u64> {
        self.read_from(&mut r, n)
    }
}

/// Copy `size` bytes from `r` in steps of one gzip block, with a forced cut between steps:
/// the blocks inside a file's data then sit at offsets relative to the file, not the stream.
fn copy_cut(r: &mut dyn Read, w: &mut impl Sink, size: u64) -> io::Result<u64> {
    let step = super::pgzip::BLOCK as u64;
    let mut copied = 0;
    while copied < size {
        if copied > 0 {
            w.cut(true)?;
        }
        let want = step.min(size - copied);
        let n = w.copy_from(r, want)?;
        copied += n;
        if n < want {
            break;
        }
    }
    Ok(copied)
}

/// Copy exactly `size` bytes of a file's content, failing if the source has another length.
fn copy_content(w: &mut impl Sink, e: &Entry, source: &FileSource, size: u64) -> Result<()> {
    match source {
        FileSource::Bytes(b) => {
            if b.len() as u64 != size {
                return Err(LayerError::SizeMismatch {
                    path: e.path.clone(),
                    expected: size,
                    found: b.len() as u64,
                });
            }
            copy_cut(&mut &b[..], w, size)?;
        }
        FileSource::Path(p) => {
            // O_NOFOLLOW: a context file swapped for a symlink after the walk must not pull in
            // whatever the link points at.
            let mut f = fs_err::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)?;
            if !f.metadata()?.is_file() {
                return Err(LayerError::NotAFile { path: p.clone() });
            }
            let copied = copy_cut(&mut f, w, size)?;
            let mismatch = |found| LayerError::SizeMismatch {
                path: p.clone(),
                expected: size,
                found,
            };
            if copied != size {
                return Err(mismatch(copied));
            }
            let mut extra = [0u8; 1];
            if f.read(&mut extra)? != 0 {
                return Err(mismatch(size + 1));
            }
        }
        FileSource::Open { id, opener } => {
            let mut r = opener.open()?;
            let copied = copy_cut(&mut r, w, size)?;
            let mut extra = [0u8; 1];
            let found = if copied == size && r.read(&mut extra)? != 0 {
                size + 1
            } else {
                copied
            };
            if found != size {
                return Err(LayerError::SizeMismatch {
                    path: std::path::PathBuf::from(id),
                    expected: size,
                    found,
                });
            }
        }
    }
    Ok(())
}

/// The values of one tar header, before deciding what needs a PAX record.
struct HeaderFields {
    name: Vec<u8>,
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    linkname: Vec<u8>,
}

/// Split `name` into ustar (prefix, name) fields, as GNU tar does: the leftmost `/` that leaves
/// at most 100 bytes of name and at most 155 of prefix.
fn ustar_split(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 {
        return Some((&[], name));
    }
    let start = name.len().saturating_sub(101);
    (start..name.len().min(156))
        .filter(|&i| name[i] == b'/')
        .find(|&i| i > 0 && name.len() - i - 1 <= 100 && name.len() - i - 1 > 0)
        .map(|i| (&name[..i], &name[i + 1..]))
}

fn write_header(w: &mut impl Write, h: &HeaderFields) -> io::Result<()> {
    let mut pax: Vec<(&str, Vec<u8>)> = Vec::new();
    let split = ustar_split(&h.name);
    if split.is_none() {
        pax.push(("path", h.name.clone()));
    }
    if h.linkname.len() > 100 {
        pax.push(("linkpath", h.linkname.clone()));
    }
    if !pax.is_empty() && pax.iter().any(|(_, v)| std::str::from_utf8(v).is_err()) {
        pax.insert(0, ("hdrcharset", b"BINARY".to_vec()));
    }
    for (key, value, max) in [
        ("size", h.size, MAX_OCTAL_12),
        ("uid", h.uid, MAX_OCTAL_8),
        ("gid", h.gid, MAX_OCTAL_8),
        ("mtime", h.mtime, MAX_OCTAL_12),
    ] {
        if value > max {
            pax.push((key, value.to_string().into_bytes()));
        }
    }
    if !pax.is_empty() {
        let records = pax_records(&pax);
        let base = h
            .name
            .rsplit(|&b| b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"entry");
        let mut name = b"PaxHeaders/".to_vec();
        name.extend_from_slice(&base[..base.len().min(89)]);
        let x = HeaderFields {
            name,
            typeflag: b'x',
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: records.len() as u64,
            mtime: h.mtime.min(MAX_OCTAL_12),
            linkname: Vec::new(),
        };
        w.write_all(&ustar_block(&x, ustar_split(&x.name).unwrap_or((&[], &[]))))?;
        w.write_all(&records)?;
        w.write_all(&[0; BLOCK][..padding(records.len() as u64)])?;
    }
    // When the name needs PAX, the ustar field holds a truncated stand-in; readers use the PAX
    // record.
    let (prefix, name) = split.unwrap_or((&[], &h.name[..h.name.len().min(100)]));
    w.write_all(&ustar_block(h, (prefix, name)))
}

/// PAX records: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_records(pax: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in pax {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn ustar_block(h: &HeaderFields, (prefix, name): (&[u8], &[u8])) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], u64::from(h.mode));
    octal(&mut b[108..116], h.uid);
    octal(&mut b[116..124], h.gid);
    octal(&mut b[124..136], h.size);
    octal(&mut b[136..148], h.mtime);
    b[156] = h.typeflag;
    let link = &h.linkname[..h.linkname.len().min(100)];
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], 0);
    octal(&mut b[337..345], 0);
    b[345..345 + prefix.len()].copy_from_slice(prefix);
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    let digits = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(digits.as_bytes());
    b
}

/// Zero-padded octal and a NUL; a value too large for the field (carried in a PAX record
/// instead) is written as 0.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    if s.len() > width {
        field[..width].fill(b'0');
    } else {
        field[..width].copy_from_slice(s.as_bytes());
    }
    field[width] = 0;
}

/// The compressor under the hashing writer.
enum Encoder<W: Write> {
    None(W),
    Gzip(ParGzEncoder<W>),
    Zstd(ZstdWriter<W>),
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<(W, Vec<BlockRecord>)> {
        match self {
            Encoder::None(mut w) => {
                w.flush()?;
                Ok((w, Vec::new()))
            }
            Encoder::Gzip(g) => g.finish_recorded(),
            Encoder::Zstd(z) => Ok((z.finish()?, Vec::new())),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        // A compressor flush ends a block early and so changes the output bytes; everything is
        // written out by `finish` instead.
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(_) | Encoder::Zstd(_) => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "tar_tests.rs"]
mod tests;
