//! The hand-off after a push: a Flux OCI artifact holding a HelmRelease for the pushed image
//! (Altinn's GitOps flow), built from the app's `deployment/values.yaml` at the built commit
//! with the pipeline's overrides, pushed and tagged with the environment; and/or a
//! server-side apply to the server's cluster that waits for the rollout and reports the truth.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::spec::{Invalid, repo_path};
use crate::deploy::{
    AppOverrides, ArtifactFiles, ArtifactMeta, FluxArtifact, HelmRelease, ImageInfo, Values,
    push_artifact,
};
use crate::image::ConfigFile;
use crate::registry::{Client, Reference};

/// `deploy` in a build request: a Flux artifact, a server-side apply, or both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// Push a Flux artifact.
    #[serde(default)]
    pub flux: Option<FluxSpec>,
    /// Apply to the server's cluster and wait for the rollout.
    #[serde(default)]
    pub apply: Option<ApplySpec>,
}

/// Server-side apply to the cluster the server is configured for (`--kubeconfig`), as
/// `strata deploy apply` does, then wait for every Deployment to roll out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplySpec {
    /// YAML or JSON manifest files in the repository; `strata://image` (or `strata://<the
    /// image reference>`) names the pushed image, other `strata://REF` are pinned from their
    /// registry. Empty: generate a Deployment and Service for the image (`name` needed).
    #[serde(default)]
    pub manifests: Vec<String>,
    /// The app name for generated objects.
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace for objects that name none (default: the kubeconfig context's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Replicas of a generated Deployment (default 2, the chart's).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Wait for the rollout (default true): a crashing pod fails the build.
    #[serde(default = "yes")]
    pub wait: bool,
    /// Give up waiting after this many seconds (default 300).
    #[serde(default = "five_minutes")]
    pub timeout_seconds: u64,
    /// Take over conflicting fields.
    #[serde(default)]
    pub force: bool,
}

fn yes() -> bool {
    true
}
fn five_minutes() -> u64 {
    300
}

/// A Flux artifact of a HelmRelease (`strata deploy flux`'s options).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxSpec {
    /// Where to push: `oci://REGISTRY/REPO:TAG` (Altinn: `oci://ACR/configs/APP:ENV-TAG`).
    pub artifact: String,
    /// Also point these tags at it (the environment, e.g. `at22`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// HelmRelease name.
    pub release: String,
    /// HelmRelease namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Chart name (default `deployment`).
    #[serde(default = "chart")]
    pub chart: String,
    /// Chart version or range.
    pub chart_version: String,
    /// Chart source `KIND/NAME[.NAMESPACE]` (default `HelmRepository/<chart>`).
    #[serde(default)]
    pub chart_source: Option<String>,
    /// Values file in the repository (default `deployment/values.yaml`; may be absent).
    #[serde(default = "values")]
    pub values: String,
    /// Environment variables set in the values' `env` list.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Pod annotation `altinn.studio/deployment-id`.
    #[serde(default)]
    pub deployment_id: Option<String>,
    /// Values set by path, applied last.
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    /// Values copied from image labels (`path → label`).
    #[serde(default)]
    pub set_from_label: BTreeMap<String, String>,
    /// Reconcile interval.
    #[serde(default = "interval")]
    pub interval: String,
}

fn chart() -> String {
    "deployment".into()
}
fn values() -> String {
    "deployment/values.yaml".into()
}
fn interval() -> String {
    "1m".into()
}

/// `oci://REGISTRY/REPO[:TAG]` → a reference.
fn artifact_ref(s: &str) -> Result<Reference, Invalid> {
    s.strip_prefix("oci://")
        .ok_or_else(|| {
            Invalid(format!(
                "deploy.flux.artifact {s:?}: expected oci://REGISTRY/REPO:TAG"
            ))
        })?
        .parse()
        .map_err(|e: crate::store::NameError| Invalid(format!("deploy.flux.artifact {s:?}: {e}")))
}

impl DeploySpec {
    /// Check a request's `deploy` object.
    pub fn validate(v: &Value) -> Result<DeploySpec, Invalid> {
        let d: DeploySpec = serde_json::from_value(v.clone())
            .map_err(|e| Invalid(format!("invalid deploy: {e}")))?;
        if let Some(a) = &d.apply {
            for m in &a.manifests {
                if repo_path("deploy.apply.manifests", m)?.is_empty() {
                    return Err(Invalid("deploy.apply.manifests: empty path".into()));
                }
            }
            let dns = |s: &str| {
                !s.is_empty()
                    && s.len() <= 63
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !s.starts_with('-')
                    && !s.ends_with('-')
            };
            match &a.name {
                Some(n) if !dns(n) => {
                    return Err(Invalid(format!(
                        "deploy.apply.name {n:?} is not a DNS label"
                    )));
                }
                None if a.manifests.is_empty() => {
                    return Err(Invalid(
                        "deploy.apply needs manifests or a name to generate".into(),
                    ));
                }
                _ => {}
            }
            if let Some(ns) = &a.namespace
                && !dns(ns)
            {
                return Err(Invalid(format!(
                    "deploy.apply.namespace {ns:?} is not a DNS label"
                )));
            }
        }
        let Some(f) = &d.flux else {
            if d.apply.is_none() {
                return Err(Invalid("deploy needs flux or apply".into()));
            }
            return Ok(d);
        };
        artifact_ref(&f.artifact)?;
        for t in &f.tags {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(Invalid(format!(
                    "deploy.flux.tags: {t:?} is not a valid tag"
                )));
            }
        }
        if f.release.is_empty() || f.chart.is_empty() || f.chart_version.is_empty() {
            return Err(Invalid(
                "deploy.flux needs release, chart and chart_version".into(),
            ));
        }
        if let Some(s) = &f.chart_source {
            HelmRelease::parse_source(s)
                .map_err(|e| Invalid(format!("deploy.flux.chart_source: {e}")))?;
        }
        repo_path("deploy.flux.values", &f.values)?;
        for p in f.set.keys() {
            crate::deploy::parse_set(&format!("{p}=x"))
                .map_err(|e| Invalid(format!("deploy.flux.set {p:?}: {e}")))?;
        }
        Ok(d)
    }
}

/// What the job hands over.
pub struct Pushed<'a> {
    /// The image reference pushed (with its tag).
    pub image: &'a Reference,
    /// Its manifest digest.
    pub digest: crate::Digest,
    /// Its config bytes.
    pub config: &'a [u8],
    /// The values file's text at the commit, if the repository has one.
    pub values_text: Option<String>,
    /// The repository URL, the commit and its time.
    pub repository: &'a str,
    /// The commit id.
    pub commit: &'a str,
    /// The commit time.
    pub commit_time: i64,
}

/// Apply the manifests (read from the commit by the caller, or generated for the image) to
/// `cluster`, then wait for each Deployment's rollout; `progress` hears rollout states.
pub async fn apply(
    client: &Client,
    cluster: &crate::deploy::KubeTarget,
    spec: &ApplySpec,
    p: Pushed<'_>,
    manifests: Vec<(String, String)>,
    progress: &(dyn Fn(Value) + Send + Sync),
) -> crate::Result<Value> {
    use crate::deploy::{self as d, RolloutState};
    let (image, digest, config) = (p.image, p.digest, p.config);
    let pinned = format!("{}@{digest}", image.name());
    let mut docs = if manifests.is_empty() {
        let name = spec.name.clone().unwrap_or_default();
        let g = d::Generate {
            namespace: spec.namespace.clone(),
            replicas: spec.replicas.unwrap_or(2),
            ..d::Generate::new(&name, &pinned)
        };
        d::generate(&g, &ConfigFile::parse(config)?)?
    } else {
        let mut docs = Vec::new();
        for (path, text) in &manifests {
            docs.extend(d::parse_manifests(text, path)?);
        }
        docs
    };
    let mut map = d::ImageMap::new();
    for name in d::resolve::placeholders(&docs) {
        if name == "image" || name == image.to_string() || name == image.name() {
            map.insert(name, pinned.clone());
            continue;
        }
        let r: Reference = name.parse().map_err(|e: crate::store::NameError| {
            crate::build::BuildError::Invalid(format!("strata://{name}: {e}"))
        })?;
        let found = client
            .head_manifest(&r)
            .await
            .map_err(crate::registry::TransferError::from)?
            .ok_or_else(|| {
                crate::build::BuildError::Invalid(format!("image {r} does not exist"))
            })?;
        map.insert(name, format!("{}@{}", r.name(), found.digest));
    }
    d::resolve_images(&mut docs, &map)?;
    let (kube, context_ns) = d::kube_client(cluster).await?;
    let opts = d::ApplyOptions {
        field_manager: "strata".into(),
        force: spec.force,
        namespace: spec.namespace.clone().unwrap_or(context_ns),
    };
    let applied = d::apply_objects(&kube, &docs, &opts).await?;
    let objects: Vec<String> = applied.iter().map(|o| o.object.clone()).collect();
    progress(json!({"type": "applied", "objects": objects}));
    let mut rolled_out = Vec::new();
    if spec.wait {
        let ropts = d::RolloutOptions {
            timeout: std::time::Duration::from_secs(spec.timeout_seconds),
            poll: std::time::Duration::from_secs(1),
        };
        for o in applied
            .iter()
            .filter(|o| o.kind == "Deployment" && o.group == "apps")
        {
            let ns = o.namespace.as_deref().unwrap_or("default");
            let object = o.object.clone();
            let mut report = |s: &RolloutState| {
                let v = match s {
                    RolloutState::Progressing {
                        ready,
                        desired,
                        waiting_for,
                    } => json!({
                        "type": "rollout", "object": object, "ready": ready,
                        "desired": desired, "waiting_for": waiting_for}),
                    RolloutState::Complete { desired } => json!({
                        "type": "rollout", "object": object, "ready": desired,
                        "desired": desired, "complete": true}),
                    RolloutState::Failed(why) => json!({
                        "type": "rollout", "object": object, "failed": why}),
                };
                progress(v);
            };
            d::wait_for_rollout(&kube, ns, &o.name, &ropts, &mut report).await?;
            rolled_out.push(o.object.clone());
        }
    }
    Ok(json!({"applied": objects, "rolled_out": rolled_out}))
}

/// Render the HelmRelease, package and push the artifact; the result for the build record.
pub async fn flux(client: &Client, spec: &FluxSpec, p: Pushed<'_>) -> crate::Result<Value> {
    let dest = artifact_ref(&spec.artifact).map_err(|e| crate::build::BuildError::Invalid(e.0))?;
    let mut values = match &p.values_text {
        Some(t) => Values::parse(t, &spec.values)?,
        None => Values::default(),
    };
    let config = ConfigFile::parse(p.config)?;
    let mut sets = Vec::new();
    for (k, v) in &spec.set {
        sets.push((k.clone(), v.clone()));
    }
    let overrides = AppOverrides {
        image: Some(ImageInfo {
            reference: p.image.with_digest(p.digest),
            config,
        }),
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deployment_id: spec.deployment_id.clone(),
        from_labels: spec
            .set_from_label
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        sets,
    };
    let missing = overrides.apply(&mut values)?;
    let source = match &spec.chart_source {
        Some(s) => HelmRelease::parse_source(s)?,
        None => ("HelmRepository".to_string(), spec.chart.clone(), None),
    };
    let hr = HelmRelease {
        name: spec.release.clone(),
        namespace: spec.namespace.clone(),
        chart: spec.chart.clone(),
        chart_version: spec.chart_version.clone(),
        source,
        interval: spec.interval.clone(),
        values,
    };
    let repo = p.repository.trim_end_matches('/').trim_end_matches(".git");
    let meta = ArtifactMeta {
        source: format!("{repo}/commit/{}", p.commit),
        revision: p.commit.to_string(),
        created: p.commit_time,
        mtime: p.commit_time.max(0) as u64,
    };
    let artifact = FluxArtifact::build(
        ArtifactFiles::single("helmrelease.yaml", hr.to_yaml().as_bytes()),
        &meta,
    )?;
    let pushed = push_artifact(client, &artifact, &dest, &spec.tags).await?;
    Ok(json!({
        "artifact": format!("oci://{}", pushed.reference),
        "digest": artifact.digest().to_string(),
        "tags": pushed.tags,
        "missing_labels": missing,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_requests_are_checked() {
        let ok = json!({"flux": {"artifact": "oci://r.example/configs/app:at22-1",
                                 "tags": ["at22"], "release": "ttd-app", "chart_version": "3.x"}});
        let d = DeploySpec::validate(&ok).expect("valid");
        let f = d.flux.expect("flux");
        assert_eq!(f.chart, "deployment");
        assert_eq!(f.values, "deployment/values.yaml");
        assert!(DeploySpec::validate(&json!({"apply": {"name": "app"}})).is_ok());
        assert!(DeploySpec::validate(&json!({"apply": {}})).is_err());
        assert!(DeploySpec::validate(&json!({"apply": {"name": "App_1"}})).is_err());
        assert!(DeploySpec::validate(&json!({"apply": {"manifests": ["../x.yaml"]}})).is_err());
        assert!(DeploySpec::validate(&json!({})).is_err());
        for (patch, needle) in [
            (json!({"artifact": "r.example/configs/app:1"}), "oci://"),
            (json!({"tags": ["bad tag"]}), "not a valid tag"),
            (json!({"values": "../secrets.yaml"}), "must not leave"),
            (json!({"release": ""}), "needs release"),
            (json!({"colour": "red"}), "unknown field"),
        ] {
            let mut v = ok.clone();
            for (k, x) in patch.as_object().expect("object") {
                v["flux"][k] = x.clone();
            }
            let e = DeploySpec::validate(&v).expect_err(needle);
            assert!(e.0.contains(needle), "{needle}: {e}");
        }
        assert!(DeploySpec::validate(&json!({"kustomize": {}})).is_err());
    }
}
