//! The local content-addressed store at `$STRATA_HOME`: an OCI image layout
//! (<https://github.com/opencontainers/image-spec/blob/main/image-layout.md>) whose
//! `index.json` names tagged images with `org.opencontainers.image.ref.name`.
//!
//! Safety rules: a blob enters `blobs/sha256/` only by renaming a fully written, fsynced temp
//! file whose sha256 was computed while writing it, so a blob file is always complete and
//! correct; `index.json` is rewritten the same way under an exclusive `flock`, so concurrent
//! strata processes never lose each other's tags; an image is tagged only after all of its
//! blobs are present.

mod cache;
mod export;
mod fsck;
mod gc;
mod import;
mod lock;
mod mounts;
mod name;

pub use cache::{CachedLayer, LoadingStatCache, Memo, StatCache};
pub use export::{ExportTarget, export};
pub use fsck::{FsckReport, fsck};
pub use gc::{DiskUsage, PruneOptions, PruneReport, disk_usage, prune};
pub use import::{import_docker_archive, import_oci_archive, import_oci_layout, split_layout_spec};
pub use lock::Lock;
pub use mounts::{MountLock, RunCaches, Sharing, remove_tree, run_caches};
pub use name::{ImageName, NameError};

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use fs_err as fs;
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError, VerifyingReader};
use crate::image::{Image, ImageError, ManifestView};
use crate::media::{Descriptor, MediaType};

/// The annotation naming a tagged image in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File-system trouble (the message names the path).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Content did not match its digest.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// A blob the caller asked for is not in the store.
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    /// No image matches a reference.
    #[error("image {0:?} not found in the local store")]
    NotFound(String),
    /// A short digest matches several images.
    #[error("{0:?} is ambiguous: it matches several images")]
    Ambiguous(String),
    /// `index.json` or a manifest is malformed.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// Image metadata is malformed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A reference is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Exporting failed.
    #[error("export to {target}: {msg}")]
    Export {
        /// The target as given.
        target: String,
        /// What went wrong.
        msg: String,
    },
    /// Writing or reading a layer failed.
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
}

/// `index.json` of an OCI layout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciIndex {
    /// Always 2.
    pub schema_version: u32,
    /// `application/vnd.oci.image.index.v1+json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    /// The manifests (tagged ones carry [`REF_NAME`]).
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl Default for OciIndex {
    fn default() -> Self {
        OciIndex {
            schema_version: 2,
            media_type: Some(MediaType::OciIndex),
            manifests: Vec::new(),
        }
    }
}

impl OciIndex {
    /// Read `dir/index.json`, or an empty index when there is none.
    pub fn read(dir: &Path) -> Result<OciIndex, StoreError> {
        let path = dir.join("index.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(OciIndex::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Write `dir/index.json` atomically (pretty, stable order).
    pub fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("index serialises");
        bytes.push(b'\n');
        write_atomic(&dir.join("index.json"), &bytes)?;
        Ok(())
    }

    /// Point `name` at `desc`: drop any entry with the same name, then add.
    pub fn set_ref(&mut self, name: &str, mut desc: Descriptor) {
        self.manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(name));
        desc.annotations
            .insert(REF_NAME.to_string(), name.to_string());
        self.manifests.push(desc);
        self.manifests.sort_by(|a, b| {
            (a.annotations.get(REF_NAME), a.digest).cmp(&(b.annotations.get(REF_NAME), b.digest))
        });
    }
}

/// Make a finished temp file readable by everyone (temp files are created 0600), as the
/// store and exported layouts are meant to be shared.
pub(crate) fn readable(f: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
}

/// Write `bytes` to `path` through a temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_renamed(path, bytes, true)
}

/// Write a hint (a cache entry, the stat cache, gzip block records): through a
/// temp file and a rename like [`write_atomic`], so readers never see half a file, but
/// without the fsync, which costs milliseconds per file on a busy disk. After a crash a
/// hint may be missing, old or empty; readers treat anything unreadable as absent, and every
/// hint is only ever true (same key → same layer; a stat match → that digest).
pub fn write_hint(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_renamed(path, bytes, false)
}

fn write_renamed(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("create temp file in {}: {e}", dir.display()),
        )
    })?;
    tmp.write_all(bytes)?;
    readable(tmp.as_file())?;
    if sync {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| {
        io::Error::new(
            e.error.kind(),
            format!("rename into {}: {}", path.display(), e.error),
        )
    })?;
    Ok(())
}

/// The local store.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// A blob being written: a temp file inside the store, hashed as it is written (unless the
/// writer was made for a stream its producer already verifies, see
/// [`Store::verified_blob_writer`]).
pub struct BlobWriter {
    store: Store,
    file: io::BufWriter<tempfile::NamedTempFile>,
    hasher: Option<crate::digest::Hasher>,
    len: u64,
    vouched: Option<Digest>,
    /// Bytes already handed to the kernel's writeback (see [`WRITEBACK_STEP`]).
    written_back: u64,
}

/// Every this many bytes, a blob writer asks the kernel to start writing back what it has
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the fsync at commit
/// finds little left to flush instead of a whole layer: the same durability, most of its
/// latency overlapped with compressing.
const WRITEBACK_STEP: u64 = 8 << 20;

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.len += n as u64;
        let in_kernel = self.len - self.file.buffer().len() as u64;
        if in_kernel >= self.written_back + WRITEBACK_STEP {
            use std::os::fd::AsRawFd;
            let fd = self.file.get_ref().as_file().as_raw_fd();
            let (from, len) = (self.written_back, in_kernel - self.written_back);
            // SAFETY: plain syscall on an open descriptor with in-range integers; it reads
            // no memory of ours. Failure only loses the optimisation, so it is ignored.
            unsafe {
                libc::sync_file_range(
                    fd,
                    i64::try_from(from).unwrap_or(i64::MAX),
                    i64::try_from(len).unwrap_or(0),
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.written_back = in_kernel;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Finish: fsync, then rename to its digest's path. With `expected`, refuse other content.
    pub fn commit(self, expected: Option<Digest>) -> Result<(Digest, u64), StoreError> {
        let size = self.len;
        let digest = match (self.hasher, self.vouched) {
            (Some(h), _) => h.finish(),
            (None, Some(d)) => d,
            (None, None) => {
                return Err(StoreError::Corrupt(
                    "an unhashed blob writer needs the digest its producer verified".into(),
                ));
            }
        };
        if let Some(e) = expected
            && e != digest
        {
            return Err(DigestError::Mismatch {
                expected: e,
                found: digest,
            }
            .into());
        }
        let buf = self.file;
        let tmp = buf.into_inner().map_err(|e| e.into_error())?;
        let dest = self.store.blob_path(&digest);
        if dest.exists() {
            return Ok((digest, size));
        }
        readable(tmp.as_file())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest).map_err(|e| {
            io::Error::new(
                e.error.kind(),
                format!("rename into {}: {}", dest.display(), e.error),
            )
        })?;
        Ok((digest, size))
    }
}

impl Store {
    /// Open (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        fs::create_dir_all(root.join("blobs/sha256"))?;
        fs::create_dir_all(root.join("tmp"))?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(Store { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Remember that blob `d` can be fetched from `repository` (`registry/repo`): images
    /// based on registry images keep their base layers there until something needs the bytes
    /// (like containerd's distribution-source labels).
    pub fn set_blob_source(&self, d: &Digest, repository: &str) -> Result<(), StoreError> {
        let dir = self.root.join("sources/sha256");
        fs::create_dir_all(&dir)?;
        let path = dir.join(d.hex());
        if fs::read_to_string(&path).ok().as_deref() == Some(repository) {
            return Ok(());
        }
        // Durable: an image in the index may need it to find a layer it never downloaded.
        write_atomic(&path, repository.as_bytes())?;
        Ok(())
    }

    /// Where blob `d` can be fetched from, if it was recorded.
    pub fn blob_source(&self, d: &Digest) -> Option<String> {
        fs::read_to_string(self.root.join("sources/sha256").join(d.hex()))
            .ok()
            .filter(|s| !s.is_empty())
    }

    /// Whether a blob is present or can be fetched from a recorded source.
    pub fn has_blob_or_source(&self, d: &Digest) -> bool {
        self.has_blob(d) || self.blob_source(d).is_some()
    }

    /// A directory for scratch files of one operation; removed when dropped.
    pub fn temp_dir(&self) -> Result<tempfile::TempDir, StoreError> {
        Ok(tempfile::Builder::new()
            .prefix("work-")
            .tempdir_in(self.root.join("tmp"))?)
    }

    /// Start writing a blob.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(self.root.join("tmp"))?;
        Ok(BlobWriter {
            store: self.clone(),
            file: io::BufWriter::with_capacity(1 << 20, tmp),
            hasher: Some(crate::digest::Hasher::new()),
            len: 0,
            vouched: None,
            written_back: 0,
        })
    }

    /// Start writing the blob `digest` from a stream whose producer verifies size and digest
    /// itself before the caller commits (the registry client's `fetch_blob` does, while it
    /// streams): the bytes are not hashed a second time.
    pub fn verified_blob_writer(&self, digest: Digest) -> Result<BlobWriter, StoreError> {
        let mut w = self.blob_writer()?;
        w.hasher = None;
        w.vouched = Some(digest);
        Ok(w)
    }

    /// Store bytes, returning their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let d = Digest::of(bytes);
        if self.has_blob(&d) {
            return Ok(d);
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes)?;
        Ok(w.commit(Some(d))?.0)
    }

    /// Copy a blob from `reader` into the store, verifying size and digest while streaming.
    pub fn import(&self, reader: impl Read, desc: &Descriptor) -> Result<(), StoreError> {
        if self.has_blob(&desc.digest) {
            return Ok(());
        }
        let mut w = self.blob_writer()?;
        let mut r = VerifyingReader::new(reader, desc.digest, desc.size);
        io::copy(&mut r, &mut w).map_err(unwrap_digest_error)?;
        w.commit(Some(desc.digest))?;
        Ok(())
    }

    /// Open a blob for streaming (not verified; see [`Store::read_blob`]).
    pub fn open_blob(&self, d: &Digest) -> Result<fs::File, StoreError> {
        match fs::File::open(self.blob_path(d)) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::MissingBlob(*d)),
            Err(e) => Err(e.into()),
        }
    }

    /// Read a small blob (manifest, config) whole, verifying its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut bytes = Vec::new();
        self.open_blob(d)?.read_to_end(&mut bytes)?;
        d.verify(&bytes)?;
        Ok(bytes)
    }

    /// Load an image by its manifest digest.
    pub fn image(&self, manifest: &Digest) -> Result<Image, StoreError> {
        let mbytes = self.read_blob(manifest)?;
        let view = ManifestView::parse(&mbytes)?;
        let cbytes = self.read_blob(&view.config.digest)?;
        Ok(Image::from_bytes(mbytes, cbytes)?)
    }

    /// Store an image's manifest and config (its layers must already be stored) and, if
    /// `names` are given, tag it under each. Refuses to tag when any blob is missing.
    pub fn commit_image(&self, image: &Image, names: &[ImageName]) -> Result<Digest, StoreError> {
        self.put_bytes(&image.config_bytes)?;
        let digest = self.put_bytes(&image.manifest_bytes)?;
        let desc = image.descriptor();
        // Checked under the lock: `remove` deletes unreferenced blobs under the same lock, so
        // once this check passes nothing can take a blob away before the tag is written.
        let _lock = lock::Lock::exclusive(&self.root)?;
        for d in [&image.manifest.config.digest, &digest] {
            if !self.has_blob(d) {
                return Err(StoreError::MissingBlob(*d));
            }
        }
        for l in &image.manifest.layers {
            if !self.has_blob_or_source(&l.digest) {
                return Err(StoreError::MissingBlob(l.digest));
            }
        }
        let mut index = OciIndex::read(&self.root)?;
        if names.is_empty() {
            if !index.manifests.iter().any(|d| d.digest == digest) {
                index.manifests.push(desc);
            }
        } else {
            for n in names {
                index.set_ref(&n.to_string(), desc.clone());
            }
            // An untagged entry for the same image is now redundant.
            index
                .manifests
                .retain(|d| d.digest != digest || d.annotations.contains_key(REF_NAME));
        }
        index.write(&self.root)?;
        Ok(digest)
    }

    /// The images in `index.json`: (name if tagged, descriptor).
    pub fn list(&self) -> Result<Vec<(Option<String>, Descriptor)>, StoreError> {
        Ok(OciIndex::read(&self.root)?
            .manifests
            .into_iter()
            .map(|d| (d.annotations.get(REF_NAME).cloned(), d))
            .collect())
    }

    /// Find an image by name (`name[:tag]`), full digest (`sha256:…`, `name@sha256:…`) or a
    /// unique prefix of at least 4 hex digits of its digest.
    pub fn resolve(&self, reference: &str) -> Result<Descriptor, StoreError> {
        let list = self.list()?;
        let not_found = || StoreError::NotFound(reference.to_string());
        if let Ok(d) = reference.parse::<Digest>() {
            return self.descriptor_for_digest(&list, d).ok_or_else(not_found);
        }
        if let Some((_, digest)) = reference.rsplit_once('@') {
            let d: Digest = digest.parse()?;
            return self.descriptor_for_digest(&list, d).ok_or_else(not_found);
        }
        let reference = match reference.strip_prefix("sha256:") {
            Some(prefix) if prefix.len() < 64 => prefix,
            _ => reference,
        };
        let hexlike = reference.len() >= 4
            && reference.len() <= 64
            && reference
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if let Ok(name) = reference.parse::<ImageName>() {
            let key = name.to_string();
            if let Some((_, d)) = list
                .iter()
                .find(|(n, _)| n.as_deref() == Some(key.as_str()))
            {
                return Ok(d.clone());
            }
        }
        if hexlike {
            let hits: BTreeSet<Digest> = list
                .iter()
                .map(|(_, d)| d.digest)
                .filter(|d| d.hex().starts_with(reference))
                .collect();
            return match hits.len() {
                0 => Err(not_found()),
                1 => {
                    let d = *hits.iter().next().expect("one hit");
                    self.descriptor_for_digest(&list, d).ok_or_else(not_found)
                }
                _ => Err(StoreError::Ambiguous(reference.to_string())),
            };
        }
        reference.parse::<ImageName>()?;
        Err(not_found())
    }

    fn descriptor_for_digest(
        &self,
        list: &[(Option<String>, Descriptor)],
        d: Digest,
    ) -> Option<Descriptor> {
        if let Some((_, desc)) = list.iter().find(|(_, desc)| desc.digest == d) {
            let mut desc = desc.clone();
            desc.annotations.remove(REF_NAME);
            return Some(desc);
        }
        let bytes = self.read_blob(&d).ok()?;
        let view = ManifestView::parse(&bytes).ok()?;
        Some(Descriptor::new(
            view.media_type.unwrap_or(MediaType::OciManifest),
            d,
            bytes.len() as u64,
        ))
    }

    /// Remove a reference. When no other reference points at the image any more, its blobs
    /// that no remaining image uses are deleted too. Returns the digest that was untagged.
    pub fn remove(&self, reference: &str) -> Result<Digest, StoreError> {
        let _gc = lock::Lock::gc(&self.root, true)?;
        let _lock = lock::Lock::exclusive(&self.root)?;
        let mut index = OciIndex::read(&self.root)?;
        let desc = self.resolve(reference)?;
        let by_name = reference
            .parse::<ImageName>()
            .ok()
            .map(|n| n.to_string())
            .filter(|n| {
                index
                    .manifests
                    .iter()
                    .any(|d| d.annotations.get(REF_NAME) == Some(n))
            });
        match by_name {
            Some(n) => index
                .manifests
                .retain(|d| d.annotations.get(REF_NAME) != Some(&n)),
            None => index.manifests.retain(|d| d.digest != desc.digest),
        }
        index.write(&self.root)?;
        if !index.manifests.iter().any(|d| d.digest == desc.digest) {
            self.delete_unreferenced(&index, desc.digest)?;
        }
        Ok(desc.digest)
    }

    /// Hold the shared garbage-collection lock for the life of the returned guard: nothing
    /// this process uses is pruned meanwhile.
    pub fn in_use(&self) -> Result<lock::Lock, StoreError> {
        Ok(lock::Lock::gc(&self.root, false)?)
    }

    /// Blobs used by the images in `index`.
    pub(crate) fn live_blobs(&self, index: &OciIndex) -> Result<BTreeSet<Digest>, StoreError> {
        let mut live = BTreeSet::new();
        for d in &index.manifests {
            live.insert(d.digest);
            let bytes = self.read_blob(&d.digest)?;
            let view = ManifestView::parse(&bytes)?;
            live.insert(view.config.digest);
            live.extend(view.layers.iter().map(|l| l.digest));
        }
        Ok(live)
    }

    fn delete_unreferenced(&self, index: &OciIndex, manifest: Digest) -> Result<(), StoreError> {
        let live = self.live_blobs(index)?;
        let Ok(bytes) = self.read_blob(&manifest) else {
            return Ok(());
        };
        let view = ManifestView::parse(&bytes)?;
        let candidates = std::iter::once(manifest)
            .chain(std::iter::once(view.config.digest))
            .chain(view.layers.iter().map(|l| l.digest));
        for d in candidates {
            if !live.contains(&d) {
                match fs::remove_file(self.blob_path(&d)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}

/// `io::copy` through a [`VerifyingReader`] reports digest problems as `InvalidData` I/O
/// errors; give them back their own type.
pub(crate) fn unwrap_digest_error(e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::InvalidData && e.get_ref().is_some_and(|i| i.is::<DigestError>())
    {
        let inner = e.into_inner().expect("checked above");
        match inner.downcast::<DigestError>() {
            Ok(d) => StoreError::Digest(*d),
            Err(other) => StoreError::Io(io::Error::new(io::ErrorKind::InvalidData, other)),
        }
    } else {
        StoreError::Io(e)
    }
}
