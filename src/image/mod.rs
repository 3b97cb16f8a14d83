//! Images as values: the exact manifest and config bytes, parsed views of them, and pure
//! mutations that produce new bytes.
//!
//! An image's identity is the sha256 of its manifest bytes exactly as stored
//! (<https://github.com/opencontainers/image-spec/blob/main/manifest.md>), so bytes are
//! produced once, by [`canonical_json`], and never re-serialised afterwards.

mod config;
pub use config::{ConfigFile, HealthConfig, history};

use serde::Serialize;

use crate::digest::{Digest, DigestError};
use crate::media::{Descriptor, MediaType};

/// Errors building or parsing image metadata.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Manifest or config JSON did not parse.
    #[error("invalid {what}: {source}")]
    Json {
        /// Which document.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest of a type strata cannot use as an image.
    #[error("unsupported manifest media type {0}")]
    UnsupportedManifest(String),
    /// The config's diff_ids and the manifest's layers disagree.
    #[error("config lists {diff_ids} diff_ids but the manifest has {layers} layers")]
    LayerCountMismatch {
        /// Number of `rootfs.diff_ids`.
        diff_ids: usize,
        /// Number of manifest layers.
        layers: usize,
    },
    /// A digest inside the document is malformed.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// Serialise `value` as compact JSON with every object's keys sorted.
///
/// oci-spec keeps labels and annotations in `HashMap`s, whose iteration order changes from run
/// to run; going through `serde_json::Value` (a sorted map, as serde_json's `preserve_order`
/// feature is off) makes the bytes a function of the content alone.
pub fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    let v = serde_json::to_value(value).expect("image metadata serialises to JSON");
    serde_json::to_vec(&v).expect("a JSON value serialises")
}

/// Format seconds since the Unix epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
pub fn rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A manifest as strata reads it: the config and layer descriptors, whatever the flavour
/// (OCI image manifest or Docker v2 schema 2).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestView {
    /// `schemaVersion`, always 2.
    pub schema_version: u32,
    /// The manifest's own media type, when it states one.
    #[serde(default)]
    pub media_type: Option<MediaType>,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, base first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

impl ManifestView {
    /// Parse manifest bytes.
    pub fn parse(bytes: &[u8]) -> Result<ManifestView, ImageError> {
        let m: ManifestView = serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "manifest",
            source,
        })?;
        match &m.media_type {
            None | Some(MediaType::OciManifest) | Some(MediaType::DockerManifest) => Ok(m),
            Some(other) => Err(ImageError::UnsupportedManifest(other.to_string())),
        }
    }
}

/// One layer of an image: its blob descriptor and the digest of its uncompressed tar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The (usually compressed) blob.
    pub descriptor: Descriptor,
    /// sha256 of the uncompressed tar, as listed in the config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// An image: raw manifest and config bytes plus their parsed views.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest bytes exactly as stored; the image digest is their sha256.
    pub manifest_bytes: Vec<u8>,
    /// Parsed manifest.
    pub manifest: ManifestView,
    /// The config bytes exactly as stored.
    pub config_bytes: Vec<u8>,
    /// Parsed config.
    pub config: ConfigFile,
}

impl Image {
    /// Parse an image from its manifest and config bytes, checking that they agree.
    pub fn from_bytes(manifest_bytes: Vec<u8>, config_bytes: Vec<u8>) -> Result<Image, ImageError> {
        let manifest = ManifestView::parse(&manifest_bytes)?;
        manifest.config.digest.verify(&config_bytes)?;
        let config = ConfigFile::parse(&config_bytes)?;
        let n = config.diff_ids()?.len();
        if n != manifest.layers.len() {
            return Err(ImageError::LayerCountMismatch {
                diff_ids: n,
                layers: manifest.layers.len(),
            });
        }
        Ok(Image {
            manifest_bytes,
            manifest,
            config_bytes,
            config,
        })
    }

    /// Assemble a new OCI image from a config and its layers; the bytes are made here, once.
    pub fn assemble(config: ConfigFile, layers: &[Layer]) -> Result<Image, ImageError> {
        Image::assemble_with_config_bytes(config.to_bytes(), layers)
    }

    /// Assemble an OCI image around config bytes kept exactly as they are.
    pub fn assemble_with_config_bytes(
        config_bytes: Vec<u8>,
        layers: &[Layer],
    ) -> Result<Image, ImageError> {
        Image::assemble_annotated(config_bytes, layers, &std::collections::BTreeMap::new())
    }

    /// Assemble an OCI image with manifest annotations (e.g. the base image it was built on,
    /// <https://github.com/opencontainers/image-spec/blob/main/annotations.md>).
    pub fn assemble_annotated(
        config_bytes: Vec<u8>,
        layers: &[Layer],
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<Image, ImageError> {
        let config_desc = Descriptor::for_bytes(MediaType::OciConfig, &config_bytes);
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(oci_spec::image::MediaType::ImageManifest)
            .config(config_desc.to_oci())
            .layers(
                layers
                    .iter()
                    .map(|l| {
                        let mut d = l.descriptor.clone();
                        d.media_type = d.media_type.to_oci();
                        d.to_oci()
                    })
                    .collect::<Vec<_>>(),
            )
            .build()
            .expect("all required manifest fields are set");
        let mut manifest = manifest;
        if !annotations.is_empty() {
            manifest.set_annotations(Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ));
        }
        Image::from_bytes(canonical_json(&manifest), config_bytes)
    }

    /// The image digest: sha256 of the manifest bytes.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest_bytes)
    }

    /// A descriptor of the manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.manifest
                .media_type
                .clone()
                .unwrap_or(MediaType::OciManifest),
            self.digest(),
            self.manifest_bytes.len() as u64,
        )
    }

    /// The layers with their diff_ids.
    pub fn layers(&self) -> Result<Vec<Layer>, ImageError> {
        Ok(self
            .manifest
            .layers
            .iter()
            .cloned()
            .zip(self.config.diff_ids()?)
            .map(|(descriptor, diff_id)| Layer {
                descriptor,
                diff_id,
            })
            .collect())
    }

    /// Total size: manifest, config and layer blobs.
    pub fn size(&self) -> u64 {
        self.manifest_bytes.len() as u64
            + self.config_bytes.len() as u64
            + self.manifest.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// The chain id of a stack of layers
/// (<https://github.com/opencontainers/image-spec/blob/main/config.md#layer-chainid>).
pub fn chain_id(diff_ids: &[Digest]) -> Option<Digest> {
    let mut it = diff_ids.iter();
    let mut chain = *it.next()?;
    for d in it {
        chain = Digest::of(format!("{chain} {d}").as_bytes());
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(chain_id(&[a]), Some(a));
        assert_eq!(
            chain_id(&[a, b]),
            Some(Digest::of(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(chain_id(&[]), None);
    }

    #[test]
    fn assembled_image_is_consistent_and_stable() {
        let cfg = ConfigFile::new(&crate::media::Platform::host(), 0);
        let img = Image::assemble(cfg.clone(), &[]).unwrap();
        let again = Image::assemble(cfg, &[]).unwrap();
        assert_eq!(img.digest(), again.digest());
        assert_eq!(img.manifest.config.digest, Digest::of(&img.config_bytes));
        let text = String::from_utf8(img.manifest_bytes.clone()).unwrap();
        assert!(
            text.contains("application/vnd.oci.image.manifest.v1+json"),
            "{text}"
        );
    }
}
