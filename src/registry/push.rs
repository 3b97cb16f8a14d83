//! Pushing: every blob the destination lacks, in parallel, by the cheapest route — already
//! there (HEAD), a cross-repository mount when the blob lives in another repository of the
//! same registry, else an upload from the store (fetching it first from its recorded source
//! if the image was built on a registry base) — then the manifest, then the tags.

use std::sync::Arc;

use super::pull::{FileSink, TransferError, bytes_of, manifest_type};
use super::{Client, FileSource, Reference};
use crate::digest::Digest;
use crate::image::Image;
use crate::media::Descriptor;
use crate::store::{Store, StoreError};

/// How one blob reached the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobRoute {
    /// The destination had it.
    Present,
    /// Mounted from another repository of the same registry.
    Mounted(String),
    /// Uploaded from the local store.
    Uploaded,
    /// Fetched from its source registry, then uploaded.
    Relayed(String),
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// The manifest digest at the destination.
    pub digest: Digest,
    /// How each blob got there.
    pub blobs: Vec<(Digest, BlobRoute)>,
}

async fn push_one(
    client: Client,
    store: Store,
    dest: Reference,
    desc: Descriptor,
) -> Result<(Digest, BlobRoute), TransferError> {
    let d = desc.digest;
    let source = match store.blob_source(&d) {
        Some(s) => Some(
            s.parse::<Reference>()
                .map_err(|e| TransferError::Unsupported(format!("recorded source of {d}: {e}")))?,
        ),
        None => None,
    };
    // A blob that lives in another repository of the destination registry is mounted, even
    // when the store has a copy: no bytes move at all.
    if let Some(src) = &source
        && src.registry == dest.registry
    {
        if client.blob_exists(&dest, &d).await?.is_some() {
            return Ok((d, BlobRoute::Present));
        }
        if src.repository != dest.repository
            && client.mount_blob(&dest, &d, &src.repository).await?
        {
            return Ok((d, BlobRoute::Mounted(src.name())));
        }
    }
    if store.has_blob(&d) {
        // push_blob asks the destination first (HEAD).
        let uploaded = client
            .push_blob(&dest, &desc, Arc::new(FileSource(store.blob_path(&d))))
            .await?;
        return Ok((
            d,
            if uploaded {
                BlobRoute::Uploaded
            } else {
                BlobRoute::Present
            },
        ));
    }
    let src = source.ok_or(TransferError::Unreachable(d))?;
    // Another registry (or a refused mount): relay through a temp file that is never added
    // to the store, so the upload can resume from any offset and memory stays bounded.
    let spool = store.temp_dir()?;
    let path = spool.path().join("relay");
    let mut sink = FileSink::create(&path).map_err(StoreError::Io)?;
    client.fetch_blob(&src, &desc, &mut sink).await?;
    drop(sink);
    client
        .push_blob(&dest, &desc, Arc::new(FileSource(path)))
        .await?;
    Ok((d, BlobRoute::Relayed(src.name())))
}

/// Push `image` (from `store`) to `dest` and tag it there with `dest`'s tag (or push by
/// digest when `dest` has none).
pub async fn push(
    client: &Client,
    store: &Store,
    image: &Image,
    dest: &Reference,
) -> Result<PushReport, TransferError> {
    let mut descs: Vec<Descriptor> = vec![image.manifest.config.clone()];
    descs.extend(image.manifest.layers.iter().cloned());
    push_manifest(
        client,
        store,
        &descs,
        bytes_of(image),
        &manifest_type(image),
        dest,
    )
    .await
}

/// Push the blobs `descs` (from the store, or mounted/relayed from their recorded sources),
/// then the manifest `bytes` — only after every blob made it.
pub async fn push_manifest(
    client: &Client,
    store: &Store,
    descs: &[Descriptor],
    bytes: bytes::Bytes,
    media_type: &crate::media::MediaType,
    dest: &Reference,
) -> Result<PushReport, TransferError> {
    let expected = Digest::of(&bytes);
    let mut unique: Vec<Descriptor> = Vec::new();
    for d in descs {
        if !unique.iter().any(|u| u.digest == d.digest) {
            unique.push(d.clone());
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for desc in unique {
        tasks.spawn(push_one(client.clone(), store.clone(), dest.clone(), desc));
    }
    let mut blobs = Vec::new();
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(b)) => blobs.push(b),
            Ok(Err(e)) => {
                // Stop starting new work; the manifest is never pushed after a failure.
                tasks.abort_all();
                first_error.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first_error.get_or_insert(TransferError::Unsupported(format!(
                    "upload task failed: {e}"
                )));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    blobs.sort_by_key(|(d, _)| *d);
    let target = match &dest.tag {
        Some(_) => dest.clone(),
        None if dest.digest.is_none() => dest.with_tag("latest"),
        None => dest.with_digest(expected),
    };
    let digest = client.put_manifest(&target, bytes, media_type).await?;
    if digest != expected {
        return Err(TransferError::Unsupported(format!(
            "{target} stored the manifest as {digest}, expected {expected}"
        )));
    }
    Ok(PushReport { digest, blobs })
}
