//! The layer cache shared through a registry (`--cache-to` / `--cache-from`): the key →
//! layer mapping of a build, stored as an OCI artifact whose config lists the mapping and
//! whose layers are the cached layer blobs themselves (so the registry keeps them, and a
//! push from a machine that imported the cache mounts them instead of uploading).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::pull::{TransferError, fetch_small};
use super::push::{PushReport, push_manifest};
use super::{Client, Reference, RegistryError};
use crate::digest::Digest;
use crate::image::canonical_json;
use crate::media::{Descriptor, MediaType};
use crate::store::{CachedLayer, Store};

/// Media type of the cache artifact's config.
pub const CACHE_CONFIG_TYPE: &str = "application/vnd.strata.cache.config.v1+json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheConfig {
    /// Cache key (hex) → layer.
    layers: BTreeMap<String, CachedLayer>,
}

/// Push the mapping `entries` (and their layers) to `dest`.
pub async fn export_cache(
    client: &Client,
    store: &Store,
    entries: &[(Digest, CachedLayer)],
    dest: &Reference,
) -> Result<PushReport, TransferError> {
    let config = CacheConfig {
        layers: entries.iter().map(|(k, l)| (k.hex(), l.clone())).collect(),
    };
    let config_bytes = canonical_json(&config);
    store.put_bytes(&config_bytes)?;
    let config_desc =
        Descriptor::for_bytes(MediaType::Other(CACHE_CONFIG_TYPE.into()), &config_bytes);
    let mut layers: Vec<Descriptor> = Vec::new();
    for (_, l) in entries {
        if !layers.iter().any(|d| d.digest == l.descriptor.digest) {
            layers.push(l.descriptor.clone());
        }
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::OciManifest.as_str(),
        "artifactType": CACHE_CONFIG_TYPE,
        "config": config_desc,
        "layers": layers,
    });
    let bytes = canonical_json(&manifest);
    store.put_bytes(&bytes)?;
    let mut descs = vec![config_desc];
    descs.extend(layers);
    push_manifest(
        client,
        store,
        &descs,
        bytes::Bytes::from(bytes),
        &MediaType::OciManifest,
        dest,
    )
    .await
}

/// Read the mapping at `src` into the local cache: each entry becomes a cache hit whose
/// layer stays in the registry until its bytes are needed. Returns how many entries were
/// imported; a missing cache is not an error (`Ok(0)`).
pub async fn import_cache(
    client: &Client,
    store: &Store,
    src: &Reference,
) -> Result<usize, TransferError> {
    let m = match client.get_manifest(src).await {
        Ok(m) => m,
        Err(RegistryError::Registry { status: 404, .. }) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let view = crate::image::ManifestView::parse(&m.bytes)?;
    if view.config.media_type.as_str() != CACHE_CONFIG_TYPE {
        return Err(TransferError::Unsupported(format!(
            "{src} is not a strata cache (config type {})",
            view.config.media_type
        )));
    }
    let pinned = src.with_digest(m.digest);
    fetch_small(client, store, &pinned, &view.config).await?;
    let config: CacheConfig = serde_json::from_slice(&store.read_blob(&view.config.digest)?)
        .map_err(|e| TransferError::Unsupported(format!("{src}: malformed cache config: {e}")))?;
    let mut n = 0;
    for (key, layer) in config.layers {
        let key = Digest::from_hex(&key).map_err(crate::store::StoreError::from)?;
        if !view
            .layers
            .iter()
            .any(|d| d.digest == layer.descriptor.digest)
        {
            continue;
        }
        store.set_blob_source(&layer.descriptor.digest, &pinned.name())?;
        if store.cache_get(&key).is_none() {
            store.cache_put(&key, &layer)?;
            n += 1;
        }
    }
    Ok(n)
}
