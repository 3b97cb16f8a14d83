//! Cache keys for layer-producing steps.
//!
//! A layer's bytes are a function of its entries (paths, kinds, modes, owners, link targets,
//! hardlink grouping, file contents) and of the writer's settings (compression, level,
//! mtime). The key is a digest of exactly that, with file contents named by their sha256
//! (from the stat cache for context files, so unchanged files are not re-read) or by a
//! content-addressed id (`git:<oid>`). So a key never depends on mtimes, the checkout's umask
//! or the parent image, only on what ends up in the layer — two steps with the same key would
//! write the same bytes, which is what makes reusing the stored layer safe.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::digest::{Digest, Hasher, digest_reader};
use crate::layer::{Entry, EntryKind, FileSource};
use crate::media::Compression;
use crate::store::StatCache;

/// Bump when the layer writer's output for the same entries changes.
const FORMAT: &str = "strata-layer-cache-v2";

/// The writer settings that shape a layer's bytes (and the threads to hash with, which do
/// not).
pub(crate) struct WriterSettings {
    pub compression: Compression,
    pub level: Option<i32>,
    pub mtime: u64,
    pub threads: u32,
}

/// The content digest of every on-disk file of `entries`: from the stat cache for context
/// files whose stat data is unchanged, the rest hashed. Both the stat calls and the hashing
/// are spread over `threads` threads (a context of thousands of files costs thousands of
/// `statx` calls even when nothing changed).
fn file_digests<'a>(
    entries: &'a [Entry],
    stat: &mut StatCache,
    context: Option<&Path>,
    threads: u32,
) -> std::io::Result<HashMap<&'a Path, Digest>> {
    let files: Vec<&'a Path> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File {
                source: FileSource::Path(p),
                ..
            } => Some(p.as_path()),
            _ => None,
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = usize::try_from(threads)
        .unwrap_or(1)
        .clamp(1, 16)
        .min(files.len().max(1));
    /// A file's digest, and its stat data when the stat cache should learn it.
    type Found = (usize, Digest, Option<std::fs::Metadata>);
    let cache: &StatCache = stat;
    let found: Vec<std::io::Result<Vec<Found>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(p) = files.get(i) else { break };
                        let md = match context.is_some_and(|c| p.starts_with(c)) {
                            true => Some(fs_err::symlink_metadata(p)?),
                            false => None,
                        };
                        if let Some(d) = md.as_ref().and_then(|md| cache.lookup(p, md)) {
                            out.push((i, d, None));
                            continue;
                        }
                        let f = fs_err::File::open(p)?;
                        out.push((i, digest_reader(f)?.0, md));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked")))
            })
            .collect()
    });
    let mut known = HashMap::with_capacity(files.len());
    for part in found {
        for (i, d, md) in part? {
            if let Some(md) = md {
                stat.insert(files[i], &md, d);
            }
            known.insert(files[i], d);
        }
    }
    Ok(known)
}

/// The cache key of a layer made of `entries`. Files under `context` go through the stat
/// cache; other files (spooled from other images) are hashed.
pub(crate) fn layer_key(
    entries: &[Entry],
    settings: &WriterSettings,
    stat: &mut StatCache,
    context: Option<&Path>,
) -> std::io::Result<Digest> {
    let digests = file_digests(entries, stat, context, settings.threads)?;
    let mut h = Hasher::new();
    h.field(FORMAT.as_bytes());
    h.field(settings.compression.name().as_bytes());
    // The effective level, so a change of default never reuses layers made with another.
    let level = settings.level.unwrap_or(match settings.compression {
        Compression::Gzip => crate::layer::DEFAULT_GZIP_LEVEL,
        Compression::Zstd => 3,
        Compression::None => 0,
    });
    h.field(&level.to_le_bytes());
    h.field(&settings.mtime.to_le_bytes());
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    // Hardlink groups by their first member in sort order, as the writer stores them.
    let mut groups: HashMap<u64, &Path> = HashMap::new();
    for e in &sorted {
        h.field(e.path.as_os_str().as_bytes());
        h.update(&e.mode.to_le_bytes());
        h.update(&e.uid.to_le_bytes());
        h.update(&e.gid.to_le_bytes());
        match &e.kind {
            EntryKind::Dir => h.field(b"dir"),
            EntryKind::Symlink { target } => {
                h.field(b"symlink");
                h.field(target.as_os_str().as_bytes());
            }
            EntryKind::File {
                source,
                size,
                link_key,
            } => {
                h.field(b"file");
                h.update(&size.to_le_bytes());
                match link_key.map(|k| *groups.entry(k).or_insert(&e.path)) {
                    Some(first) if first != e.path => {
                        h.field(b"hardlink");
                        h.field(first.as_os_str().as_bytes());
                        continue;
                    }
                    _ => {}
                }
                let content = match source {
                    FileSource::Bytes(b) => Digest::of(b).to_string(),
                    FileSource::Open { id, .. } => id.clone(),
                    FileSource::Path(p) => digests
                        .get(p.as_path())
                        .expect("every path was hashed above")
                        .to_string(),
                };
                h.field(content.as_bytes());
            }
        }
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WriterSettings {
        WriterSettings {
            compression: Compression::Gzip,
            level: None,
            mtime: 0,
            threads: 2,
        }
    }

    fn key(entries: &[Entry]) -> Digest {
        layer_key(entries, &settings(), &mut StatCache::default(), None).unwrap()
    }

    #[test]
    fn keys_follow_content_not_order() {
        let a = Entry::bytes("a", b"1", 0o644, 0, 0);
        let b = Entry::bytes("b", b"2", 0o644, 0, 0);
        assert_eq!(key(&[a.clone(), b.clone()]), key(&[b.clone(), a.clone()]));
        let a2 = Entry::bytes("a", b"x", 0o644, 0, 0);
        assert_ne!(key(&[a.clone(), b.clone()]), key(&[a2, b.clone()]));
        let a_exec = Entry::bytes("a", b"1", 0o755, 0, 0);
        assert_ne!(key(std::slice::from_ref(&a)), key(&[a_exec]));
        let mut zstd = settings();
        zstd.compression = Compression::Zstd;
        assert_ne!(
            key(std::slice::from_ref(&a)),
            layer_key(&[a], &zstd, &mut StatCache::default(), None).unwrap()
        );
    }

    #[test]
    fn file_contents_on_disk_are_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let e = Entry::file("f", FileSource::Path(p.clone()), 3, 0o644, 0, 0);
        let k1 = layer_key(
            std::slice::from_ref(&e),
            &settings(),
            &mut StatCache::default(),
            Some(dir.path()),
        )
        .unwrap();
        std::fs::write(&p, b"two").unwrap();
        let k2 = layer_key(
            &[e],
            &settings(),
            &mut StatCache::default(),
            Some(dir.path()),
        )
        .unwrap();
        assert_ne!(k1, k2);
    }
}
