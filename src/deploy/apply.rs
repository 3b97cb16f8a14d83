//! Server-side apply (<https://kubernetes.io/docs/reference/using-api/server-side-apply/>)
//! with kube-rs: each object is `PATCH`ed with `application/apply-patch+yaml` under the field
//! manager `strata` (`force` takes over fields other managers own, as
//! `kubectl apply --server-side --force-conflicts`). Resources are found the way kubectl finds
//! them: discovery of the object's group/version (one `GET /api/v1` or `/apis/GROUP/VERSION`,
//! cached per group/version), which also says whether the kind is namespaced.

use std::collections::HashMap;
use std::path::PathBuf;

use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use serde_json::Value;

use super::resolve::describe;
use super::{DeployError, Result};

/// Which cluster, as kubectl picks it: kubeconfig files (merged in order, as `$KUBECONFIG`
/// lists them) and a context, else the in-cluster service account.
#[derive(Clone, Debug, Default)]
pub struct KubeTarget {
    /// Kubeconfig files; empty means in-cluster configuration.
    pub kubeconfigs: Vec<PathBuf>,
    /// The context to use instead of `current-context`.
    pub context: Option<String>,
}

/// A client for `target`, and the namespace its context names (`default` when none).
/// Token, client-certificate and exec-plugin (`kubelogin`, …) users are all kube-rs's
/// kubeconfig loader's; an exec plugin runs when the client first needs a token.
pub async fn kube_client(target: &KubeTarget) -> Result<(kube::Client, String)> {
    let config = if target.kubeconfigs.is_empty() {
        kube::Config::incluster().map_err(|e| DeployError::KubeConfig(Box::new(e)))?
    } else {
        let mut merged: Option<Kubeconfig> = None;
        for path in &target.kubeconfigs {
            let k = Kubeconfig::read_from(path)
                .map_err(|e| DeployError::KubeConfig(format!("{}: {e}", path.display()).into()))?;
            merged = Some(match merged {
                None => k,
                Some(m) => m
                    .merge(k)
                    .map_err(|e| DeployError::KubeConfig(Box::new(e)))?,
            });
        }
        let options = KubeConfigOptions {
            context: target.context.clone(),
            ..KubeConfigOptions::default()
        };
        kube::Config::from_custom_kubeconfig(merged.expect("at least one kubeconfig"), &options)
            .await
            .map_err(|e| DeployError::KubeConfig(Box::new(e)))?
    };
    let ns = config.default_namespace.clone();
    let client = kube::Client::try_from(config).map_err(|e| DeployError::Kube {
        action: "create the Kubernetes client".into(),
        source: e,
    })?;
    Ok((client, ns))
}

/// How to apply.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// The field manager (`strata`).
    pub field_manager: String,
    /// Take over conflicting fields (`--force-conflicts`).
    pub force: bool,
    /// Namespace for namespaced objects that name none (the context's, or `--namespace`).
    pub namespace: String,
}

/// One applied object.
#[derive(Clone, Debug)]
pub struct Applied {
    /// `kind/name`, with `namespace/` in front for namespaced objects.
    pub object: String,
    /// Kind (`Deployment`).
    pub kind: String,
    /// API group (`apps`, empty for the core group).
    pub group: String,
    /// Name.
    pub name: String,
    /// Namespace, for namespaced objects.
    pub namespace: Option<String>,
}

/// Server-side apply `docs`, in order. Stops at the first refusal (the API server's message
/// is in the error).
pub async fn apply_objects(
    client: &kube::Client,
    docs: &[Value],
    opts: &ApplyOptions,
) -> Result<Vec<Applied>> {
    let mut found: HashMap<GroupVersionKind, (ApiResource, ApiCapabilities)> = HashMap::new();
    let mut params = PatchParams::apply(&opts.field_manager);
    if opts.force {
        params = params.force();
    }
    let mut out = Vec::new();
    for doc in docs {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"]
            .as_str()
            .ok_or_else(|| DeployError::invalid(describe(doc), "metadata.name is missing"))?
            .to_string();
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        if !found.contains_key(&gvk) {
            let r = kube::discovery::pinned_kind(client, &gvk)
                .await
                .map_err(|e| DeployError::Kube {
                    action: format!("find the API resource of {api_version} {kind}"),
                    source: e,
                })?;
            found.insert(gvk.clone(), r);
        }
        let (resource, caps) = &found[&gvk];
        let mut body = doc.clone();
        let (api, namespace): (Api<DynamicObject>, _) = match caps.scope {
            Scope::Namespaced => {
                let ns = doc["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(&opts.namespace)
                    .to_string();
                body["metadata"]["namespace"] = Value::from(ns.clone());
                (
                    Api::namespaced_with(client.clone(), &ns, resource),
                    Some(ns),
                )
            }
            Scope::Cluster => (Api::all_with(client.clone(), resource), None),
        };
        let object = describe(&body);
        tracing::debug!(object, "server-side apply");
        api.patch(&name, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| DeployError::Kube {
                action: format!("apply {object}"),
                source: e,
            })?;
        out.push(Applied {
            object,
            kind: kind.to_string(),
            group: group.to_string(),
            name,
            namespace,
        });
    }
    Ok(out)
}
