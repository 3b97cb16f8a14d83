//! Export an image from the store in skopeo's transport formats: `oci:DIR[:TAG]`,
//! `oci-archive:FILE[:TAG]` and `docker-archive:FILE[:NAME:TAG]`
//! (the format of `docker save`, read by `docker load` and skopeo).
//!
//! Archives are written with the same deterministic tar writer as layers, into a temp file
//! beside the destination that is renamed only when complete.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use fs_err as fs;
use serde_json::json;

use super::{OciIndex, Store, StoreError, write_atomic};
use crate::digest::HashingWriter;
use crate::image::Image;
use crate::layer::{Entry, EntryKind, FileSource, LayerWriter, open_decompressed};
use crate::media::{Compression, Descriptor};

/// Where an export goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTarget {
    /// An OCI image layout directory, the image tagged `tag` in its index.
    OciDir {
        /// The layout directory (created if missing; other images in it are kept).
        dir: PathBuf,
        /// `org.opencontainers.image.ref.name` for the image.
        tag: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        /// The archive file.
        file: PathBuf,
        /// `org.opencontainers.image.ref.name` for the image.
        tag: Option<String>,
    },
    /// A `docker save` archive.
    DockerArchive {
        /// The archive file.
        file: PathBuf,
        /// `NAME:TAG` for `RepoTags`.
        name: Option<String>,
    },
}

impl FromStr for ExportTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (transport, rest) = s.split_once(':').ok_or_else(|| {
            format!("invalid output {s:?}: expected oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG]")
        })?;
        if rest.is_empty() {
            return Err(format!("invalid output {s:?}: the path is empty"));
        }
        let split = |r: &str| match r.split_once(':') {
            Some((p, t)) if !t.is_empty() => (PathBuf::from(p), Some(t.to_string())),
            Some((p, _)) => (PathBuf::from(p), None),
            None => (PathBuf::from(r), None),
        };
        match transport {
            "oci" => {
                let (dir, tag) = split(rest);
                Ok(ExportTarget::OciDir { dir, tag })
            }
            "oci-archive" => {
                let (file, tag) = split(rest);
                Ok(ExportTarget::OciArchive { file, tag })
            }
            "docker-archive" => {
                let (file, name) = split(rest);
                if let Some(n) = &name {
                    n.parse::<super::ImageName>().map_err(|e| e.to_string())?;
                }
                Ok(ExportTarget::DockerArchive { file, name })
            }
            other => Err(format!(
                "unknown output transport {other:?} (expected oci, oci-archive or docker-archive)"
            )),
        }
    }
}

impl std::fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (t, p, x) = match self {
            ExportTarget::OciDir { dir, tag } => ("oci", dir, tag),
            ExportTarget::OciArchive { file, tag } => ("oci-archive", file, tag),
            ExportTarget::DockerArchive { file, name } => ("docker-archive", file, name),
        };
        write!(f, "{t}:{}", p.display())?;
        if let Some(x) = x {
            write!(f, ":{x}")?;
        }
        Ok(())
    }
}

/// The blobs of an image: manifest, config, layers (deduplicated, in that order).
fn blobs(image: &Image, manifest: &Descriptor) -> Vec<Descriptor> {
    let mut out = vec![manifest.clone(), image.manifest.config.clone()];
    for l in &image.manifest.layers {
        if !out.iter().any(|d| d.digest == l.digest) {
            out.push(l.clone());
        }
    }
    out
}

/// Export the image `manifest` (already in `store`) to `target`.
pub fn export(
    store: &Store,
    manifest: &Descriptor,
    target: &ExportTarget,
) -> Result<(), StoreError> {
    let mut image = store.image(&manifest.digest)?;
    let mut manifest = manifest.clone();
    let docker = image.manifest.media_type == Some(crate::media::MediaType::DockerManifest)
        || image.manifest.config.media_type == crate::media::MediaType::DockerConfig;
    if docker && !matches!(target, ExportTarget::DockerArchive { .. }) {
        // An OCI layout holds OCI manifests: re-describe the same config and layer blobs
        // with OCI media types (as skopeo does; the manifest digest changes, no blob does).
        let layers = image.layers()?;
        image = Image::assemble_with_config_bytes(image.config_bytes.clone(), &layers)?;
        store.put_bytes(&image.manifest_bytes)?;
        manifest = image.descriptor();
    }
    manifest.annotations.clear();
    manifest.platform = None;
    match target {
        ExportTarget::OciDir { dir, tag } => {
            export_oci_dir(store, &image, &manifest, dir, tag.as_deref())
        }
        ExportTarget::OciArchive { file, tag } => {
            let mut index = OciIndex::default();
            match tag {
                Some(t) => index.set_ref(t, manifest.clone()),
                None => index.manifests.push(manifest.clone()),
            }
            let mut entries = vec![
                bytes_entry("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
                bytes_entry(
                    "index.json",
                    serde_json::to_vec(&index).expect("index serialises"),
                ),
                Entry::dir("blobs", 0o755, 0, 0),
                Entry::dir("blobs/sha256", 0o755, 0, 0),
            ];
            for d in blobs(&image, &manifest) {
                entries.push(file_entry(
                    format!("blobs/sha256/{}", d.digest.hex()),
                    store.blob_path(&d.digest),
                    d.size,
                ));
            }
            write_archive(store, file, entries)
        }
        ExportTarget::DockerArchive { file, name } => {
            export_docker_archive(store, &image, file, name.as_deref())
        }
    }
}

fn bytes_entry(path: &str, bytes: Vec<u8>) -> Entry {
    let size = bytes.len() as u64;
    Entry {
        path: path.into(),
        kind: EntryKind::File {
            source: FileSource::Bytes(Arc::from(bytes)),
            size,
            link_key: None,
        },
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}

fn file_entry(path: String, source: PathBuf, size: u64) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File {
            source: FileSource::Path(source),
            size,
            link_key: None,
        },
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}

fn export_oci_dir(
    store: &Store,
    image: &Image,
    manifest: &Descriptor,
    dir: &Path,
    tag: Option<&str>,
) -> Result<(), StoreError> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    for d in blobs(image, manifest) {
        let dest = dir.join("blobs/sha256").join(d.digest.hex());
        if dest.is_file() && fs::metadata(&dest)?.len() == d.size {
            continue;
        }
        // Same file system: a hard link costs nothing (blobs are immutable, and tools write
        // new blobs by rename, never in place). Otherwise copy.
        let link = dir.join("blobs/sha256").join(format!(
            ".strata-link-{}-{}",
            std::process::id(),
            d.digest.hex()
        ));
        if std::fs::hard_link(store.blob_path(&d.digest), &link).is_ok() {
            fs::rename(&link, &dest)?;
            continue;
        }
        let tmp = tempfile::NamedTempFile::new_in(dir.join("blobs/sha256"))?;
        let mut w = io::BufWriter::new(tmp);
        io::copy(&mut store.open_blob(&d.digest)?, &mut w)?;
        let tmp = w.into_inner().map_err(|e| e.into_error())?;
        super::readable(tmp.as_file())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest).map_err(|e| e.error)?;
    }
    write_atomic(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut index = OciIndex::read(dir)?;
    match tag {
        Some(t) => index.set_ref(t, manifest.clone()),
        None => {
            if !index.manifests.iter().any(|d| d.digest == manifest.digest) {
                index.manifests.push(manifest.clone());
            }
        }
    }
    index.write(dir)
}

fn export_docker_archive(
    store: &Store,
    image: &Image,
    file: &Path,
    name: Option<&str>,
) -> Result<(), StoreError> {
    let work = store.temp_dir()?;
    let config_name = format!("{}.json", image.manifest.config.digest.hex());
    let mut entries = vec![file_entry(
        config_name.clone(),
        store.blob_path(&image.manifest.config.digest),
        image.manifest.config.size,
    )];
    let mut layer_names = Vec::new();
    for layer in image.layers()? {
        let lname = format!("{}.tar", layer.diff_id.hex());
        layer_names.push(lname.clone());
        if entries.iter().any(|e| e.path == Path::new(&lname)) {
            continue;
        }
        // docker-archive carries uncompressed layers named by diff_id; decompress and check.
        let path = work.path().join(&lname);
        let mut out = HashingWriter::new(io::BufWriter::new(fs::File::create(&path)?));
        io::copy(
            &mut open_decompressed(io::BufReader::new(
                store.open_blob(&layer.descriptor.digest)?,
            ))?,
            &mut out,
        )?;
        let (diff_id, size, mut w) = out.finish();
        w.flush()?;
        if diff_id != layer.diff_id {
            return Err(crate::digest::DigestError::Mismatch {
                expected: layer.diff_id,
                found: diff_id,
            }
            .into());
        }
        entries.push(file_entry(lname, path, size));
    }
    let repo_tags: Vec<String> = name.map(str::to_string).into_iter().collect();
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_names,
    }]);
    entries.push(bytes_entry(
        "manifest.json",
        serde_json::to_vec(&manifest).expect("manifest.json serialises"),
    ));
    write_archive(store, file, entries)
}

fn write_archive(store: &Store, file: &Path, entries: Vec<Entry>) -> Result<(), StoreError> {
    let _ = store;
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".strata-export-")
        .tempfile_in(&dir)
        .map_err(|e| StoreError::Export {
            target: file.display().to_string(),
            msg: format!("create temp file in {}: {e}", dir.display()),
        })?;
    let (_, w) = LayerWriter::new()
        .compression(Compression::None)
        .write(entries, io::BufWriter::with_capacity(1 << 20, tmp))?;
    let tmp = w.into_inner().map_err(|e| e.into_error())?;
    super::readable(tmp.as_file())?;
    tmp.as_file().sync_all()?;
    tmp.persist(file).map_err(|e| StoreError::Export {
        target: file.display().to_string(),
        msg: e.error.to_string(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_like_skopeo() {
        assert_eq!(
            "oci:/tmp/x:v1".parse::<ExportTarget>().unwrap(),
            ExportTarget::OciDir {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "docker-archive:a.tar:app:1"
                .parse::<ExportTarget>()
                .unwrap(),
            ExportTarget::DockerArchive {
                file: "a.tar".into(),
                name: Some("app:1".into())
            }
        );
        assert_eq!(
            "oci-archive:a.tar".parse::<ExportTarget>().unwrap(),
            ExportTarget::OciArchive {
                file: "a.tar".into(),
                tag: None
            }
        );
        assert!("docker:x".parse::<ExportTarget>().is_err());
        assert!("oci:".parse::<ExportTarget>().is_err());
        assert!("docker-archive:a.tar:BAD".parse::<ExportTarget>().is_err());
    }
}
