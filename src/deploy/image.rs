//! What the hand-off needs to know about a pushed image: its digest and its config (labels,
//! exposed ports, user). Costs one manifest (two for an index) and the config blob — never a
//! layer: the old pipeline pulled the whole image to read one label.

use crate::image::{ConfigFile, ManifestView};
use crate::media::Platform;
use crate::registry::{Client, Reference, TransferError};

use super::Result;

/// Configs larger than this are refused (real ones are a few KiB).
const MAX_CONFIG_SIZE: u64 = 4 * 1024 * 1024;

/// A registry image pinned by digest, with its config.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// The reference as given, pinned to the digest the registry serves for it (an index's
    /// own digest for a multi-platform image, so every node pulls its own platform).
    pub reference: Reference,
    /// The config of the platform's image.
    pub config: ConfigFile,
}

impl ImageInfo {
    /// `registry/repository@sha256:…`: what a pod spec should name.
    pub fn pinned(&self) -> String {
        let d = self.reference.digest.expect("ImageInfo is always pinned");
        format!("{}@{d}", self.reference.name())
    }
}

/// Resolve `r` to its digest and fetch the config of `platform`'s image (the manifest list is
/// descended for the config only; the pin stays on the list).
pub async fn inspect_image(
    client: &Client,
    r: &Reference,
    platform: &Platform,
) -> Result<ImageInfo> {
    let top = client.get_manifest(r).await.map_err(TransferError::from)?;
    let pinned = r.with_digest(top.digest);
    let (manifest, at) = if top.media_type.is_index() {
        crate::registry::resolve(client, &pinned, platform).await?
    } else {
        (top, pinned.clone())
    };
    let view = ManifestView::parse(&manifest.bytes).map_err(TransferError::from)?;
    if view.config.size > MAX_CONFIG_SIZE {
        return Err(TransferError::Unsupported(format!(
            "{r}: config of {} bytes is larger than {MAX_CONFIG_SIZE}",
            view.config.size
        ))
        .into());
    }
    let mut bytes = Vec::new();
    client
        .fetch_blob(&at, &view.config, &mut bytes)
        .await
        .map_err(TransferError::from)?;
    let config = ConfigFile::parse(&bytes).map_err(TransferError::from)?;
    Ok(ImageInfo {
        reference: pinned,
        config,
    })
}
