//! Bringing images into the store from skopeo's file transports: an OCI layout directory
//! (`oci:DIR[:TAG]`), a tar of one (`oci-archive:FILE[:TAG]`), and `docker save` output
//! (`docker-archive:FILE[:NAME:TAG]`). Every blob is verified on the way in.

use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use fs_err as fs;

use super::{OciIndex, REF_NAME, Store, StoreError};
use crate::digest::{Digest, digest_reader};
use crate::image::{ConfigFile, Image, Layer, ManifestView};
use crate::layer::{ArchiveFormat, detect_format};
use crate::media::{Descriptor, MediaType, Platform};

/// Split `DIR[:TAG]` (a `:` followed by something without `/` is a tag).
pub fn split_layout_spec(spec: &str) -> (PathBuf, Option<String>) {
    match spec.rsplit_once(':') {
        Some((d, t)) if !t.contains('/') && !d.is_empty() => {
            (PathBuf::from(d), (!t.is_empty()).then(|| t.to_string()))
        }
        _ => (PathBuf::from(spec), None),
    }
}

/// Import the image `tag` (or the only image) of the OCI layout at `dir`, choosing
/// `platform` from an index.
pub fn import_oci_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<Image, StoreError> {
    let index = OciIndex::read(dir)?;
    let bad = |msg: String| StoreError::Corrupt(format!("{}: {msg}", dir.display()));
    let mut desc = match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
            .ok_or_else(|| bad(format!("no image tagged {t:?}")))?,
        None if index.manifests.len() == 1 => &index.manifests[0],
        None => {
            return Err(bad(format!(
                "{} images; name one with oci:DIR:TAG",
                index.manifests.len()
            )));
        }
    }
    .clone();
    desc.annotations.clear();
    let open = |d: &Descriptor| -> Result<(), StoreError> {
        let path = dir.join("blobs/sha256").join(d.digest.hex());
        store.import(BufReader::new(fs::File::open(path)?), d)
    };
    open(&desc)?;
    if desc.media_type.is_index() {
        let bytes = store.read_blob(&desc.digest)?;
        let idx: OciIndex = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        desc = idx
            .manifests
            .into_iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| bad(format!("no manifest for {platform}")))?;
        open(&desc)?;
    }
    let bytes = store.read_blob(&desc.digest)?;
    let view = ManifestView::parse(&bytes)?;
    open(&view.config)?;
    for l in &view.layers {
        open(l)?;
    }
    store.image(&desc.digest)
}

/// Unpack the regular files of a tar into `dest`, refusing names that escape it.
fn extract_files(archive: &Path, dest: &Path) -> Result<(), StoreError> {
    let mut tar = tar::Archive::new(BufReader::new(fs::File::open(archive)?));
    let corrupt = |msg: String| StoreError::Corrupt(format!("{}: {msg}", archive.display()));
    for entry in tar.entries().map_err(|e| corrupt(e.to_string()))? {
        let mut entry = entry.map_err(|e| corrupt(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| corrupt(e.to_string()))?
            .into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(corrupt(format!(
                "entry {} escapes the archive",
                path.display()
            )));
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let out = dest.join(&path);
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p)?;
                }
                let mut f = fs::File::create(&out)?;
                io::copy(&mut entry, &mut f)?;
            }
            tar::EntryType::Directory => fs::create_dir_all(dest.join(&path))?,
            // Symlinks and the rest carry nothing an image archive needs.
            _ => {}
        }
    }
    Ok(())
}

/// Import from a tar of an OCI layout.
pub fn import_oci_archive(
    store: &Store,
    file: &Path,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<Image, StoreError> {
    let work = store.temp_dir()?;
    extract_files(file, work.path())?;
    import_oci_layout(store, work.path(), tag, platform)
}

fn hash_file(path: &Path) -> Result<(Digest, u64), StoreError> {
    Ok(digest_reader(BufReader::with_capacity(
        1 << 20,
        fs::File::open(path)?,
    ))?)
}

/// Import a `docker save` archive. Its layers are plain tars (or gzip, for some writers);
/// they are stored as they are, under an OCI manifest strata writes, after checking them
/// against the config's diff_ids.
pub fn import_docker_archive(
    store: &Store,
    file: &Path,
    name: Option<&str>,
) -> Result<Image, StoreError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let work = store.temp_dir()?;
    extract_files(file, work.path())?;
    let corrupt = |msg: String| StoreError::Corrupt(format!("{}: {msg}", file.display()));
    let manifest: Vec<Entry> =
        serde_json::from_slice(&fs::read(work.path().join("manifest.json"))?)
            .map_err(|e| corrupt(format!("manifest.json: {e}")))?;
    let entry = match name {
        Some(n) => manifest
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|t| t == n))
            .ok_or_else(|| corrupt(format!("no image named {n:?}")))?,
        None if manifest.len() == 1 => &manifest[0],
        None => {
            return Err(corrupt(format!(
                "{} images; name one with :NAME:TAG",
                manifest.len()
            )));
        }
    };
    let inside = |rel: &str| -> Result<PathBuf, StoreError> {
        let p = Path::new(rel);
        if p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(corrupt(format!("path {rel:?} escapes the archive")));
        }
        Ok(work.path().join(p))
    };
    let config_bytes = fs::read(inside(&entry.config)?)?;
    let config = ConfigFile::parse(&config_bytes)?;
    let diff_ids = config.diff_ids()?;
    if diff_ids.len() != entry.layers.len() {
        return Err(corrupt(format!(
            "config lists {} diff_ids but the archive has {} layers",
            diff_ids.len(),
            entry.layers.len()
        )));
    }
    let mut layers = Vec::new();
    for (rel, diff_id) in entry.layers.iter().zip(diff_ids) {
        let path = inside(rel)?;
        let mut head = [0u8; 8];
        let n = fs::File::open(&path)?.read(&mut head)?;
        let media_type = match detect_format(&head[..n]) {
            Some(ArchiveFormat::Gzip) => MediaType::OciLayerGzip,
            Some(ArchiveFormat::Zstd) => MediaType::OciLayerZstd,
            _ => MediaType::OciLayer,
        };
        let (digest, size) = hash_file(&path)?;
        if media_type == MediaType::OciLayer && digest != diff_id {
            return Err(corrupt(format!(
                "layer {rel} hashes to {digest}, the config says {diff_id}"
            )));
        }
        let descriptor = Descriptor::new(media_type, digest, size);
        store.import(BufReader::new(fs::File::open(&path)?), &descriptor)?;
        layers.push(Layer {
            descriptor,
            diff_id,
        });
    }
    // Keep the config bytes exactly: re-serialising would change the image id.
    let image = Image::assemble_with_config_bytes(config_bytes, &layers)?;
    store.put_bytes(&image.config_bytes)?;
    store.put_bytes(&image.manifest_bytes)?;
    Ok(image)
}
