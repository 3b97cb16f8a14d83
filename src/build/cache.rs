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
const FORMAT: &str = "strata-layer-cache-v1";

/// The writer settings that shape a layer's bytes.
pub(crate) struct WriterSettings {
    pub compression: Compression,
    pub level: Option<i32>,
    pub mtime: u64,
}

fn field(h: &mut Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The cache key of a layer made of `entries`. Files under `context` go through the stat
/// cache; other files (spooled from other images) are hashed.
pub(crate) fn layer_key(
    entries: &[Entry],
    settings: &WriterSettings,
    stat: &mut StatCache,
    context: Option<&Path>,
) -> std::io::Result<Digest> {
    let mut h = Hasher::new();
    field(&mut h, FORMAT.as_bytes());
    field(&mut h, settings.compression.name().as_bytes());
    field(&mut h, format!("{:?}", settings.level).as_bytes());
    field(&mut h, &settings.mtime.to_le_bytes());
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
        field(&mut h, e.path.as_os_str().as_bytes());
        h.update(&e.mode.to_le_bytes());
        h.update(&e.uid.to_le_bytes());
        h.update(&e.gid.to_le_bytes());
        match &e.kind {
            EntryKind::Dir => field(&mut h, b"dir"),
            EntryKind::Symlink { target } => {
                field(&mut h, b"symlink");
                field(&mut h, target.as_os_str().as_bytes());
            }
            EntryKind::File {
                source,
                size,
                link_key,
            } => {
                field(&mut h, b"file");
                h.update(&size.to_le_bytes());
                match link_key.map(|k| *groups.entry(k).or_insert(&e.path)) {
                    Some(first) if first != e.path => {
                        field(&mut h, b"hardlink");
                        field(&mut h, first.as_os_str().as_bytes());
                        continue;
                    }
                    _ => {}
                }
                let content = match source {
                    FileSource::Bytes(b) => Digest::of(b).to_string(),
                    FileSource::Open { id, .. } => id.clone(),
                    FileSource::Path(p) if context.is_some_and(|c| p.starts_with(c)) => {
                        stat.digest(p)?.to_string()
                    }
                    FileSource::Path(p) => {
                        digest_reader(std::io::BufReader::new(fs_err::File::open(p)?))?
                            .0
                            .to_string()
                    }
                };
                field(&mut h, content.as_bytes());
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
