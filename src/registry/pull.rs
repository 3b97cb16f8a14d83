//! Pulling: resolve a reference to one platform's image, keep its manifest and config in the
//! store, and fetch layers only when someone needs their bytes.
//!
//! `pull_metadata` is what a `FROM` of a registry image costs: one manifest (two for an
//! index) and the config; the layers are recorded as living in the source repository
//! ([`Store::set_blob_source`]) so a later push can mount them and a later step that needs
//! their files can fetch them ([`ensure_blobs`]).

use std::io::Write;

use bytes::Bytes;

use super::{BlobSink, Client, ManifestResponse, Reference, RegistryError};
use crate::digest::Digest;
use crate::image::{Image, ImageError};
use crate::media::{Descriptor, MediaType, Platform};
use crate::store::{BlobWriter, ImageName, OciIndex, Store, StoreError};

/// Errors of pull, push and copy: the network, the store, or the images themselves.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The registry conversation failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Image metadata is malformed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// An index has no manifest for the platform asked for.
    #[error("{reference} has no image for {platform} (it has: {available})")]
    NoPlatform {
        /// The reference.
        reference: String,
        /// The platform asked for.
        platform: Platform,
        /// What the index offers.
        available: String,
    },
    /// Something strata cannot use.
    #[error("{0}")]
    Unsupported(String),
    /// A blob is neither in the store nor known to live in a registry.
    #[error("blob {0} is neither in the local store nor known to live in a registry")]
    Unreachable(Digest),
}

/// A [`BlobSink`] that streams blob `digest` into a store temp file, committed only when the
/// download verified. The client hashes while it streams, so the store does not hash again.
pub struct StoreSink {
    store: Store,
    digest: Digest,
    writer: Option<BlobWriter>,
}

impl StoreSink {
    /// A sink writing blob `digest` into `store`.
    pub fn new(store: &Store, digest: Digest) -> StoreSink {
        StoreSink {
            store: store.clone(),
            digest,
            writer: None,
        }
    }

    /// Move the downloaded blob into place, verifying it hashes to `expected`.
    pub fn commit(mut self, expected: Digest) -> Result<(), StoreError> {
        match self.writer.take() {
            Some(w) => w.commit(Some(expected)).map(|_| ()),
            None => Err(StoreError::MissingBlob(expected)),
        }
    }
}

impl BlobSink for StoreSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.writer.is_none() {
            self.reset()?;
        }
        self.writer
            .as_mut()
            .expect("reset creates the writer")
            .write_all(bytes)
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.writer = Some(
            self.store
                .verified_blob_writer(self.digest)
                .map_err(|e| match e {
                    StoreError::Io(io) => io,
                    other => std::io::Error::other(other.to_string()),
                })?,
        );
        Ok(())
    }
    fn discard(&mut self) {
        self.writer = None;
    }
}

/// A [`BlobSink`] into a plain file (a relay's spool, outside the store).
pub struct FileSink {
    path: std::path::PathBuf,
    file: std::io::BufWriter<fs_err::File>,
}

impl FileSink {
    /// Create (truncate) `path`.
    pub fn create(path: &std::path::Path) -> std::io::Result<FileSink> {
        Ok(FileSink {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(fs_err::File::create(path)?),
        })
    }
}

impl BlobSink for FileSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.file = std::io::BufWriter::new(fs_err::File::create(&self.path)?);
        Ok(())
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let _ = self.file.flush();
    }
}

/// Resolve `r` to a single-platform manifest, descending into an index or manifest list.
/// Returns the manifest and `r` pinned to its digest.
pub async fn resolve(
    client: &Client,
    r: &Reference,
    platform: &Platform,
) -> Result<(ManifestResponse, Reference), TransferError> {
    let m = client.get_manifest(r).await?;
    if !m.media_type.is_index() && !is_index_json(&m.bytes) {
        return Ok((m.clone(), r.with_digest(m.digest)));
    }
    let index: OciIndex = serde_json::from_slice(&m.bytes)
        .map_err(|e| TransferError::Unsupported(format!("{r}: malformed index: {e}")))?;
    let pick = index
        .manifests
        .iter()
        .filter(|d| d.media_type.is_manifest())
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)));
    let Some(desc) = pick else {
        let available: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
            .collect();
        return Err(TransferError::NoPlatform {
            reference: r.to_string(),
            platform: platform.clone(),
            available: available.join(", "),
        });
    };
    let pinned = r.with_digest(desc.digest);
    let m = client.get_manifest(&pinned).await?;
    Ok((m, pinned))
}

fn is_index_json(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        layers: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .is_ok_and(|p| p.manifests.is_some() && p.layers.is_none())
}

/// Fetch a small blob (a config) whole, verified, and store it.
pub(crate) async fn fetch_small(
    client: &Client,
    store: &Store,
    repo: &Reference,
    desc: &Descriptor,
) -> Result<(), TransferError> {
    if store.has_blob(&desc.digest) {
        return Ok(());
    }
    let mut buf = Vec::new();
    client.fetch_blob(repo, desc, &mut buf).await?;
    store.import(&buf[..], desc)?;
    Ok(())
}

/// Resolve `r`, store its manifest and config, and record where its layers live. No layer
/// bytes are transferred.
pub async fn pull_metadata(
    client: &Client,
    store: &Store,
    r: &Reference,
    platform: &Platform,
) -> Result<(Image, Reference), TransferError> {
    let (m, pinned) = resolve(client, r, platform).await?;
    let view = crate::image::ManifestView::parse(&m.bytes)?;
    fetch_small(client, store, &pinned, &view.config).await?;
    let config = store.read_blob(&view.config.digest)?;
    let image = Image::from_bytes(m.bytes.to_vec(), config)?;
    store.put_bytes(&image.manifest_bytes)?;
    for l in &view.layers {
        if l.media_type.layer_compression().is_none() {
            return Err(TransferError::Unsupported(format!(
                "{r}: layer {} has media type {}, which strata cannot unpack",
                l.digest, l.media_type
            )));
        }
        // Recorded even when the store has the bytes: a push to another repository of the
        // same registry can then mount instead of upload.
        store.set_blob_source(&l.digest, &pinned.name())?;
    }
    store.set_blob_source(&view.config.digest, &pinned.name())?;
    Ok((image, pinned))
}

/// Make sure every blob in `descs` is in the store, fetching missing ones (in parallel,
/// bounded by the client) from the registry each was recorded to live in.
pub async fn ensure_blobs(
    client: &Client,
    store: &Store,
    descs: &[Descriptor],
) -> Result<(), TransferError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for d in descs {
        if store.has_blob(&d.digest) || !seen.insert(d.digest) {
            continue;
        }
        let source = store
            .blob_source(&d.digest)
            .ok_or(TransferError::Unreachable(d.digest))?;
        let repo: Reference = source.parse().map_err(|e| {
            TransferError::Unsupported(format!("recorded source of {}: {e}", d.digest))
        })?;
        let (client, store, d) = (client.clone(), store.clone(), d.clone());
        tasks.spawn(async move {
            let mut sink = StoreSink::new(&store, d.digest);
            client.fetch_blob(&repo, &d, &mut sink).await?;
            sink.commit(d.digest)?;
            Ok::<(), TransferError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| TransferError::Unsupported(format!("download task failed: {e}")))??;
    }
    Ok(())
}

/// `strata pull`: the image and all its layers into the store, tagged with its reference.
pub async fn pull(
    client: &Client,
    store: &Store,
    r: &Reference,
    platform: &Platform,
) -> Result<Image, TransferError> {
    let (image, _) = pull_metadata(client, store, r, platform).await?;
    ensure_blobs(client, store, &image.manifest.layers).await?;
    let names: Vec<ImageName> = local_name(r).into_iter().collect();
    store.commit_image(&image, &names)?;
    Ok(image)
}

/// The local store name of a registry reference (`registry/repo:tag`); none for a reference
/// pinned only by digest.
pub fn local_name(r: &Reference) -> Option<ImageName> {
    let tag = match (&r.tag, &r.digest) {
        (Some(t), _) => t.clone(),
        (None, None) => "latest".to_string(),
        (None, Some(_)) => return None,
    };
    format!("{}:{tag}", r.name()).parse().ok()
}

/// The bytes of a manifest as a re-openable upload source.
pub(crate) fn bytes_of(image: &Image) -> Bytes {
    Bytes::from(image.manifest_bytes.clone())
}

/// Media type to send a manifest with.
pub(crate) fn manifest_type(image: &Image) -> MediaType {
    image
        .manifest
        .media_type
        .clone()
        .unwrap_or(MediaType::OciManifest)
}
