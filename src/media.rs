//! Media types, descriptors and platforms: the nouns of the OCI image spec
//! (<https://github.com/opencontainers/image-spec/blob/main/media-types.md>) and of Docker's
//! image manifest v2 schema 2, which registries still serve.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;

/// The media types strata reads and writes.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum MediaType {
    /// `application/vnd.oci.image.manifest.v1+json`
    OciManifest,
    /// `application/vnd.oci.image.index.v1+json`
    OciIndex,
    /// `application/vnd.oci.image.config.v1+json`
    OciConfig,
    /// `application/vnd.oci.image.layer.v1.tar`
    OciLayer,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    OciLayerGzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`
    OciLayerZstd,
    /// `application/vnd.docker.distribution.manifest.v2+json`
    DockerManifest,
    /// `application/vnd.docker.distribution.manifest.list.v2+json`
    DockerManifestList,
    /// `application/vnd.docker.container.image.v1+json`
    DockerConfig,
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip`
    DockerLayerGzip,
    /// Anything else, kept verbatim.
    Other(String),
}

impl MediaType {
    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            MediaType::OciManifest => "application/vnd.oci.image.manifest.v1+json",
            MediaType::OciIndex => "application/vnd.oci.image.index.v1+json",
            MediaType::OciConfig => "application/vnd.oci.image.config.v1+json",
            MediaType::OciLayer => "application/vnd.oci.image.layer.v1.tar",
            MediaType::OciLayerGzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            MediaType::OciLayerZstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            MediaType::DockerManifest => "application/vnd.docker.distribution.manifest.v2+json",
            MediaType::DockerManifestList => {
                "application/vnd.docker.distribution.manifest.list.v2+json"
            }
            MediaType::DockerConfig => "application/vnd.docker.container.image.v1+json",
            MediaType::DockerLayerGzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            MediaType::Other(s) => s,
        }
    }

    /// The OCI equivalent of a Docker media type (same bytes, OCI name); others unchanged.
    /// An OCI manifest may only list OCI layer types.
    pub fn to_oci(&self) -> MediaType {
        match self {
            MediaType::DockerLayerGzip => MediaType::OciLayerGzip,
            MediaType::DockerConfig => MediaType::OciConfig,
            MediaType::DockerManifest => MediaType::OciManifest,
            MediaType::DockerManifestList => MediaType::OciIndex,
            MediaType::Other(s) if s == "application/vnd.docker.image.rootfs.diff.tar" => {
                MediaType::OciLayer
            }
            other => other.clone(),
        }
    }

    /// Whether this names a single-image manifest (OCI or Docker).
    pub fn is_manifest(&self) -> bool {
        matches!(self, MediaType::OciManifest | MediaType::DockerManifest)
    }

    /// Whether this names a multi-platform index (OCI index or Docker manifest list).
    pub fn is_index(&self) -> bool {
        matches!(self, MediaType::OciIndex | MediaType::DockerManifestList)
    }

    /// The compression of a layer of this type, if it is a layer type strata can read.
    pub fn layer_compression(&self) -> Option<Compression> {
        match self {
            MediaType::OciLayer => Some(Compression::None),
            MediaType::OciLayerGzip | MediaType::DockerLayerGzip => Some(Compression::Gzip),
            MediaType::OciLayerZstd => Some(Compression::Zstd),
            MediaType::Other(s) if s == "application/vnd.docker.image.rootfs.diff.tar" => {
                Some(Compression::None)
            }
            _ => None,
        }
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for MediaType {
    fn from(s: &str) -> MediaType {
        [
            MediaType::OciManifest,
            MediaType::OciIndex,
            MediaType::OciConfig,
            MediaType::OciLayer,
            MediaType::OciLayerGzip,
            MediaType::OciLayerZstd,
            MediaType::DockerManifest,
            MediaType::DockerManifestList,
            MediaType::DockerConfig,
            MediaType::DockerLayerGzip,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .unwrap_or_else(|| MediaType::Other(s.to_string()))
    }
}

impl Serialize for MediaType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MediaType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MediaType, D::Error> {
        Ok(MediaType::from(String::deserialize(d)?.as_str()))
    }
}

impl From<&MediaType> for oci_spec::image::MediaType {
    fn from(m: &MediaType) -> Self {
        oci_spec::image::MediaType::from(m.as_str())
    }
}

/// Layer compression.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (the default: every registry and runtime reads it).
    #[default]
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn oci_layer_type(self) -> MediaType {
        match self {
            Compression::None => MediaType::OciLayer,
            Compression::Gzip => MediaType::OciLayerGzip,
            Compression::Zstd => MediaType::OciLayerZstd,
        }
    }
    /// Lowercase name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            "uncompressed" | "none" => Ok(Compression::None),
            _ => Err(format!(
                "unknown compression {s:?} (expected gzip, zstd or uncompressed)"
            )),
        }
    }
}

/// A content descriptor
/// (<https://github.com/opencontainers/image-spec/blob/main/descriptor.md>).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: MediaType,
    /// Its sha256.
    pub digest: Digest,
    /// Its length in bytes.
    pub size: u64,
    /// Annotations (sorted, so serialisation is deterministic).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform of a manifest inside an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor with no annotations or platform.
    pub fn new(media_type: MediaType, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type,
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }

    /// Describe `bytes` as a blob of type `media_type`.
    pub fn for_bytes(media_type: MediaType, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    /// This descriptor as an oci-spec descriptor (for building manifests).
    pub fn to_oci(&self) -> oci_spec::image::Descriptor {
        let mut d = oci_spec::image::Descriptor::new(
            (&self.media_type).into(),
            self.size,
            oci_spec::image::Digest::from(self.digest),
        );
        if !self.annotations.is_empty() {
            d.set_annotations(Some(
                self.annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ));
        }
        if let Some(p) = &self.platform {
            d.set_platform(Some(p.to_oci()));
        }
        d
    }
}

/// An OS/architecture/variant triple, as in `--platform linux/arm64/v8`.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Platform {
    /// GOARCH-style architecture (`amd64`, `arm64`, …).
    pub architecture: String,
    /// GOOS-style operating system (`linux`).
    pub os: String,
    /// CPU variant (`v7`, `v8`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine strata runs on, in Go's naming.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            variant: None,
        }
    }

    /// Normalise the way containerd's platform matcher does (`aarch64` → `arm64`, arm64's
    /// default variant `v8` dropped, `x86_64` → `amd64`).
    pub fn normalized(mut self) -> Platform {
        self.os = self.os.to_lowercase();
        self.architecture = match self.architecture.to_lowercase().as_str() {
            "x86_64" | "x86-64" => "amd64".into(),
            "aarch64" => "arm64".into(),
            "i386" => "386".into(),
            other => other.into(),
        };
        if self.architecture == "arm64" && self.variant.as_deref() == Some("v8") {
            self.variant = None;
        }
        self
    }

    /// Whether an index entry for `other` satisfies a request for `self`.
    pub fn matches(&self, other: &Platform) -> bool {
        let a = self.clone().normalized();
        let b = other.clone().normalized();
        a.os == b.os
            && a.architecture == b.architecture
            && (a.variant.is_none() || a.variant == b.variant)
    }

    /// This platform as an oci-spec platform.
    pub fn to_oci(&self) -> oci_spec::image::Platform {
        let mut p = oci_spec::image::Platform::default();
        p.set_architecture(oci_spec::image::Arch::from(self.architecture.as_str()));
        p.set_os(oci_spec::image::Os::from(self.os.as_str()));
        p.set_variant(self.variant.clone());
        p
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad =
            || format!("invalid platform {s:?} (expected OS/ARCH[/VARIANT], e.g. linux/amd64)");
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(bad()),
        }
        .map(Platform::normalized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_round_trip() {
        for s in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/x-custom",
        ] {
            assert_eq!(MediaType::from(s).as_str(), s);
        }
        assert_eq!(
            MediaType::from("application/vnd.oci.image.layer.v1.tar+zstd").layer_compression(),
            Some(Compression::Zstd)
        );
    }

    #[test]
    fn platforms_parse_and_match() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        assert!(p.matches(&"linux/aarch64".parse().unwrap()));
        assert!(!p.matches(&"linux/amd64".parse().unwrap()));
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!arm.matches(&"linux/arm/v6".parse().unwrap()));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
    }

    #[test]
    fn descriptor_json_shape() {
        let d = Descriptor::for_bytes(MediaType::OciConfig, b"{}");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}"#
        );
    }
}
