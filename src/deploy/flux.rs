//! Flux OCI artifacts, as `flux push artifact` writes them
//! (<https://fluxcd.io/flux/cheatsheets/oci-artifacts/>, source-controller's `OCIRepository`):
//! an OCI image manifest whose config has media type [`FLUX_CONFIG_TYPE`] and whose one layer
//! ([`FLUX_CONTENT_TYPE`]) is a tar.gz of the files, annotated with
//! `org.opencontainers.image.created`, `.source` and `.revision`; then `flux tag artifact`:
//! the same manifest put under more tags (the environment an `OCIRepository` follows).
//!
//! Decisions where flux leaves room: the config blob is `{}` (the OCI "empty" config;
//! source-controller never reads it), the tar is strata's deterministic layer (sorted, modes
//! as git records them, uid/gid 0, one mtime), and the manifest is canonical JSON — so the
//! same files, source, revision and creation time always give the same artifact digest.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::digest::Digest;
use crate::image::canonical_json;
use crate::layer::{Entry, FileSource, LayerWriter};
use crate::media::{Descriptor, MediaType};
use crate::registry::{Client, Reference, TransferError};

use super::image::ImageInfo;
use super::values::Values;
use super::{DeployError, Result};

/// Media type of a Flux artifact's config.
pub const FLUX_CONFIG_TYPE: &str = "application/vnd.cncf.flux.config.v1+json";
/// Media type of a Flux artifact's content layer.
pub const FLUX_CONTENT_TYPE: &str = "application/vnd.cncf.flux.content.v1.tar+gzip";

/// A Flux `HelmRelease` (`helm.toolkit.fluxcd.io/v2`,
/// <https://fluxcd.io/flux/components/helm/helmreleases/>) for one app.
#[derive(Clone, Debug)]
pub struct HelmRelease {
    /// `metadata.name` and `spec.releaseName`.
    pub name: String,
    /// `metadata.namespace`, when given.
    pub namespace: Option<String>,
    /// `spec.chart.spec.chart`.
    pub chart: String,
    /// `spec.chart.spec.version`.
    pub chart_version: String,
    /// `spec.chart.spec.sourceRef`: kind, name and optional namespace.
    pub source: (String, String, Option<String>),
    /// `spec.interval` (flux's `create helmrelease` default is `1m`).
    pub interval: String,
    /// `spec.values`.
    pub values: Values,
}

impl HelmRelease {
    /// Parse `--chart-source KIND/NAME[.NAMESPACE]` (flux's `--source` syntax).
    pub fn parse_source(s: &str) -> Result<(String, String, Option<String>)> {
        let bad = || {
            DeployError::invalid(
                format!("--chart-source {s}"),
                "expected KIND/NAME[.NAMESPACE]",
            )
        };
        let (kind, rest) = s.split_once('/').ok_or_else(bad)?;
        if kind.is_empty() || rest.is_empty() {
            return Err(bad());
        }
        let (name, ns) = match rest.split_once('.') {
            Some((n, ns)) if !n.is_empty() && !ns.is_empty() => (n, Some(ns.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        Ok((kind.to_string(), name.to_string(), ns))
    }

    /// The object as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut source = json!({"kind": self.source.0, "name": self.source.1});
        if let Some(ns) = &self.source.2 {
            source["namespace"] = json!(ns);
        }
        let mut metadata = json!({"name": self.name});
        if let Some(ns) = &self.namespace {
            metadata["namespace"] = json!(ns);
        }
        json!({
            "apiVersion": "helm.toolkit.fluxcd.io/v2",
            "kind": "HelmRelease",
            "metadata": metadata,
            "spec": {
                "releaseName": self.name,
                "interval": self.interval,
                "chart": {"spec": {
                    "chart": self.chart,
                    "version": self.chart_version,
                    "sourceRef": source,
                }},
                "values": self.values.to_value(),
            },
        })
    }

    /// The object as one YAML document.
    pub fn to_yaml(&self) -> String {
        super::resolve::to_yaml(&[self.to_value()])
    }
}

/// What the deploy pipeline sets on top of the app's values file (Altinn's overrides), in
/// the order they apply; later ones win, `--set` last, as with helm's `--values` then `--set`.
#[derive(Clone, Debug, Default)]
pub struct AppOverrides {
    /// The pushed image: `image.repository` = `registry/repo`, `image.tag` = `TAG@sha256:…`.
    pub image: Option<ImageInfo>,
    /// `NAME=VALUE` entries set (or replaced by name) in the `env` list.
    pub env: Vec<(String, String)>,
    /// The pod annotation `altinn.studio/deployment-id`, under `podAnnotations`.
    pub deployment_id: Option<String>,
    /// `(values path, image label)`: a label of the image config copied into the values
    /// (parsed as JSON when it is JSON, like the maskinporten scope list).
    pub from_labels: Vec<(String, String)>,
    /// `--set key.path=value`.
    pub sets: Vec<(String, Value)>,
}

/// The values key of the environment list.
pub const ENV_KEY: &str = "env";
/// The pod annotation carrying the deployment id.
pub const DEPLOYMENT_ID_ANNOTATION: &str = "altinn.studio/deployment-id";

impl AppOverrides {
    /// Apply to `values`. Returns the labels asked for that the image does not have.
    ///
    /// `image.tag` carries the digest as `TAG@sha256:…` (the tag defaults to `latest`): Altinn's
    /// chart, like most, renders `{{ .Values.image.repository }}:{{ .Values.image.tag }}`, and
    /// `repo:TAG@sha256:…` is a reference every runtime pulls by digest — pinned, yet readable.
    pub fn apply(&self, values: &mut Values) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        if let Some(img) = &self.image {
            let r = &img.reference;
            let digest = r.digest.expect("ImageInfo is always pinned");
            let tag = r.tag.as_deref().unwrap_or("latest");
            values.set("image.repository", Value::from(r.name()))?;
            values.set("image.tag", Value::from(format!("{tag}@{digest}")))?;
        }
        for (k, v) in &self.env {
            values.set_env(ENV_KEY, k, v)?;
        }
        if let Some(id) = &self.deployment_id {
            values.set(
                &format!(
                    "podAnnotations.{}",
                    DEPLOYMENT_ID_ANNOTATION.replace('.', "\\.")
                ),
                Value::from(id.clone()),
            )?;
        }
        let labels = self
            .image
            .as_ref()
            .map(|i| i.config.labels())
            .unwrap_or_default();
        for (path, label) in &self.from_labels {
            match labels.get(label) {
                Some(text) => {
                    let v = serde_json::from_str::<Value>(text)
                        .unwrap_or_else(|_| Value::from(text.clone()));
                    values.set(path, v)?;
                }
                None => missing.push(label.clone()),
            }
        }
        for (k, v) in &self.sets {
            values.set(k, v.clone())?;
        }
        Ok(missing)
    }
}

/// The files an artifact carries.
#[derive(Clone, Debug, Default)]
pub struct ArtifactFiles(pub Vec<Entry>);

impl ArtifactFiles {
    /// One file, `name`, holding `bytes`.
    pub fn single(name: &str, bytes: &[u8]) -> ArtifactFiles {
        ArtifactFiles(vec![Entry::bytes(name, bytes, 0o644, 0, 0)])
    }

    /// Every regular file and directory below `dir` (paths relative to it), like `flux push
    /// artifact --path DIR`. `.git` is left out (flux's default ignore); symlinks and special
    /// files are left out too, as flux's archiver skips what is not a regular file. Modes are
    /// what git records (0755 when the owner may execute, else 0644), owners 0.
    pub fn from_dir(dir: &Path) -> Result<ArtifactFiles> {
        if !dir.is_dir() {
            return Err(DeployError::invalid(
                dir.display().to_string(),
                "is not a directory",
            ));
        }
        let mut out = Vec::new();
        let walk = walkdir::WalkDir::new(dir)
            .min_depth(1)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.file_name() != ".git");
        for e in walk {
            let e = e.map_err(|e| std::io::Error::other(e.to_string()))?;
            let rel = e
                .path()
                .strip_prefix(dir)
                .expect("walkdir yields paths below its root")
                .to_path_buf();
            let md = e.path().symlink_metadata().map_err(|err| {
                std::io::Error::new(err.kind(), format!("{}: {err}", e.path().display()))
            })?;
            if md.is_dir() {
                out.push(Entry::dir(rel, 0o755, 0, 0));
            } else if md.is_file() {
                let mode = if md.permissions().mode() & 0o100 != 0 {
                    0o755
                } else {
                    0o644
                };
                out.push(Entry::file(
                    rel,
                    FileSource::Path(e.path().to_path_buf()),
                    md.len(),
                    mode,
                    0,
                    0,
                ));
            }
        }
        Ok(ArtifactFiles(out))
    }
}

/// The artifact's provenance (flux's `--source`, `--revision`) and time.
#[derive(Clone, Debug)]
pub struct ArtifactMeta {
    /// `org.opencontainers.image.source`: where the content comes from (a commit URL).
    pub source: String,
    /// `org.opencontainers.image.revision`: `main@sha1:…` or a commit id.
    pub revision: String,
    /// `org.opencontainers.image.created`, seconds since the epoch (SOURCE_DATE_EPOCH when
    /// set, else now: the CLI decides).
    pub created: i64,
    /// mtime of every tar entry.
    pub mtime: u64,
}

/// A built artifact: the exact bytes of manifest, config and layer.
#[derive(Clone, Debug)]
pub struct FluxArtifact {
    /// Manifest bytes (canonical JSON); their sha256 is the artifact digest.
    pub manifest: Bytes,
    /// Config bytes (`{}`).
    pub config: Bytes,
    /// Config descriptor.
    pub config_desc: Descriptor,
    /// The tar.gz content.
    pub layer: Bytes,
    /// Layer descriptor.
    pub layer_desc: Descriptor,
}

impl FluxArtifact {
    /// Package `files` with `meta`.
    pub fn build(files: ArtifactFiles, meta: &ArtifactMeta) -> Result<FluxArtifact> {
        let (_, layer) = LayerWriter::new()
            .mtime(meta.mtime)
            .write(files.0, Vec::new())?;
        let layer = Bytes::from(layer);
        let config = Bytes::from_static(b"{}");
        let config_desc = Descriptor::for_bytes(MediaType::Other(FLUX_CONFIG_TYPE.into()), &config);
        let layer_desc = Descriptor::for_bytes(MediaType::Other(FLUX_CONTENT_TYPE.into()), &layer);
        let annotations: BTreeMap<&str, String> = [
            (
                "org.opencontainers.image.created",
                crate::image::rfc3339(meta.created),
            ),
            ("org.opencontainers.image.source", meta.source.clone()),
            ("org.opencontainers.image.revision", meta.revision.clone()),
        ]
        .into();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MediaType::OciManifest.as_str(),
            "config": config_desc,
            "layers": [layer_desc],
            "annotations": annotations,
        });
        Ok(FluxArtifact {
            manifest: Bytes::from(canonical_json(&manifest)),
            config,
            config_desc,
            layer,
            layer_desc,
        })
    }

    /// The artifact digest (of the manifest bytes).
    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushedArtifact {
    /// The artifact's repository, pinned to its digest (tag kept).
    pub reference: Reference,
    /// The tags that now point at it (the reference's own first).
    pub tags: Vec<String>,
}

/// Push `artifact` to `dest` (its tag, else by digest), then put the same manifest under each
/// of `tags`, as `flux tag artifact` does. Blobs go through the registry client (HEAD first,
/// retries, auth); the manifest only after both blobs landed.
pub async fn push_artifact(
    client: &Client,
    artifact: &FluxArtifact,
    dest: &Reference,
    tags: &[String],
) -> Result<PushedArtifact> {
    for (desc, bytes) in [
        (&artifact.config_desc, &artifact.config),
        (&artifact.layer_desc, &artifact.layer),
    ] {
        client
            .push_blob(dest, desc, Arc::new(bytes.clone()))
            .await
            .map_err(TransferError::from)?;
    }
    let digest = artifact.digest();
    let first = match &dest.tag {
        Some(_) => dest.clone(),
        None => dest.with_digest(digest),
    };
    let mut pushed = Vec::new();
    let targets = std::iter::once(first.clone()).chain(tags.iter().map(|t| dest.with_tag(t)));
    for target in targets {
        let got = client
            .put_manifest(&target, artifact.manifest.clone(), &MediaType::OciManifest)
            .await
            .map_err(TransferError::from)?;
        if got != digest {
            return Err(TransferError::Unsupported(format!(
                "{target} stored the artifact as {got}, expected {digest}"
            ))
            .into());
        }
        if let Some(t) = &target.tag
            && !pushed.contains(t)
        {
            pushed.push(t.clone());
        }
    }
    Ok(PushedArtifact {
        reference: first.with_digest(digest),
        tags: pushed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ArtifactMeta {
        ArtifactMeta {
            source: "https://gitea.example/repos/ttd/app/commit/abc".into(),
            revision: "abc".into(),
            created: 1_700_000_000,
            mtime: 1_700_000_000,
        }
    }

    #[test]
    fn helmrelease_has_flux_shape() {
        let mut values = Values::default();
        values.set("image.tag", json!("v1")).unwrap();
        let hr = HelmRelease {
            name: "ttd-app".into(),
            namespace: Some("default".into()),
            chart: "deployment".into(),
            chart_version: "1.2.3".into(),
            source: HelmRelease::parse_source("HelmRepository/altinn.flux-system").unwrap(),
            interval: "1m".into(),
            values,
        };
        let v = hr.to_value();
        assert_eq!(v["apiVersion"], "helm.toolkit.fluxcd.io/v2");
        assert_eq!(
            v["spec"]["chart"]["spec"]["sourceRef"]["namespace"],
            "flux-system"
        );
        assert_eq!(v["spec"]["values"]["image"]["tag"], "v1");
        let back: Value = serde_saphyr::from_str(&hr.to_yaml()).unwrap();
        assert_eq!(back, v);
        assert!(HelmRelease::parse_source("nokind").is_err());
        assert!(HelmRelease::parse_source("Kind/").is_err());
    }

    #[test]
    fn same_input_same_digest() {
        let a = FluxArtifact::build(ArtifactFiles::single("hr.yaml", b"x: 1\n"), &meta()).unwrap();
        let b = FluxArtifact::build(ArtifactFiles::single("hr.yaml", b"x: 1\n"), &meta()).unwrap();
        assert_eq!(a.digest(), b.digest());
        let mut m = meta();
        m.revision = "def".into();
        let c = FluxArtifact::build(ArtifactFiles::single("hr.yaml", b"x: 1\n"), &m).unwrap();
        assert_ne!(a.digest(), c.digest());
        let v: Value = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(v["config"]["mediaType"], FLUX_CONFIG_TYPE);
        assert_eq!(v["layers"][0]["mediaType"], FLUX_CONTENT_TYPE);
        assert_eq!(
            v["annotations"]["org.opencontainers.image.created"],
            "2023-11-14T22:13:20Z"
        );
    }
}
