//! The hand-off after a push: a Flux OCI artifact holding a HelmRelease for the pushed image
//! (Altinn's GitOps flow), built from the app's `deployment/values.yaml` at the built commit
//! with the pipeline's overrides, pushed and tagged with the environment.

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

/// `deploy` in a build request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// Push a Flux artifact.
    pub flux: FluxSpec,
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
        let f = &d.flux;
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
        "flux": {
            "artifact": format!("oci://{}", pushed.reference),
            "digest": artifact.digest().to_string(),
            "tags": pushed.tags,
            "missing_labels": missing,
        }
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
        assert_eq!(d.flux.chart, "deployment");
        assert_eq!(d.flux.values, "deployment/values.yaml");
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
        assert!(DeploySpec::validate(&json!({"apply": {}})).is_err());
    }
}
