//! `strata deploy apply --generate`: a Deployment and a Service made from the image config,
//! for apps that have no manifests — with the defaults of Altinn's `deployment` chart
//! (2 replicas, requests 50m CPU / 256Mi, `/health` probes).
//!
//! From the config: container ports from `EXPOSE`, `runAsUser`/`runAsGroup` from a numeric
//! `USER uid[:gid]`. A `USER` given by name cannot be resolved without the image's
//! `/etc/passwd` (a layer, which the hand-off never fetches), so it gets the chart's
//! 1000/3000 unless `--run-as-user`/`--run-as-group` say otherwise.

use serde_json::{Value, json};

use crate::image::ConfigFile;

use super::{DeployError, Result};

/// The chart's user and group for images whose `USER` is a name.
pub const CHART_USER: (u64, u64) = (1000, 3000);

/// What to generate; [`Generate::new`] has the chart defaults.
#[derive(Clone, Debug)]
pub struct Generate {
    /// Name of the Deployment, Service, container and `app.kubernetes.io/name` label.
    pub name: String,
    /// Namespace, when given.
    pub namespace: Option<String>,
    /// The image, pinned (`repo@sha256:…`).
    pub image: String,
    /// Replicas.
    pub replicas: u32,
    /// CPU request.
    pub cpu_request: String,
    /// Memory request.
    pub memory_request: String,
    /// CPU limit, if any.
    pub cpu_limit: Option<String>,
    /// Memory limit, if any.
    pub memory_limit: Option<String>,
    /// HTTP path of the readiness and liveness probes; `None` for no probes.
    pub probe_path: Option<String>,
    /// Container ports instead of the image's `EXPOSE`.
    pub ports: Vec<u16>,
    /// `runAsUser` instead of the image's `USER`.
    pub run_as_user: Option<u64>,
    /// `runAsGroup` instead of the image's `USER`.
    pub run_as_group: Option<u64>,
}

impl Generate {
    /// The chart's defaults for `name` running `image`.
    pub fn new(name: &str, image: &str) -> Generate {
        Generate {
            name: name.to_string(),
            namespace: None,
            image: image.to_string(),
            replicas: 2,
            cpu_request: "50m".into(),
            memory_request: "256Mi".into(),
            cpu_limit: None,
            memory_limit: None,
            probe_path: Some("/health".into()),
            ports: Vec::new(),
            run_as_user: None,
            run_as_group: None,
        }
    }
}

/// `(port, protocol)` of each `EXPOSE`d port (`5005/tcp` → `(5005, "TCP")`).
fn exposed(config: &ConfigFile) -> Result<Vec<(u16, String)>> {
    let c = config.config();
    let mut out = Vec::new();
    for p in c.exposed_ports().clone().unwrap_or_default() {
        let (n, proto) = p.split_once('/').unwrap_or((p.as_str(), "tcp"));
        let n: u16 = n.parse().map_err(|_| {
            DeployError::invalid("image config", format!("EXPOSE {p:?} is not a port"))
        })?;
        out.push((n, proto.to_uppercase()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The user and group a numeric `USER` names; the chart's for a name; none for root/unset.
fn user_of(config: &ConfigFile) -> (Option<u64>, Option<u64>) {
    let user = config.config().user().clone().unwrap_or_default();
    if user.is_empty() {
        return (None, None);
    }
    let (u, g) = user.split_once(':').unwrap_or((user.as_str(), ""));
    match (u.parse::<u64>(), g.parse::<u64>()) {
        (Ok(u), Ok(g)) => (Some(u), Some(g)),
        (Ok(u), Err(_)) if g.is_empty() => (Some(u), None),
        _ => {
            tracing::warn!(
                user,
                "USER is a name; using the chart's runAsUser 1000, runAsGroup 3000"
            );
            (Some(CHART_USER.0), Some(CHART_USER.1))
        }
    }
}

/// A Deployment and (when the container has ports) a Service.
pub fn generate(g: &Generate, config: &ConfigFile) -> Result<Vec<Value>> {
    let ports: Vec<(u16, String)> = if g.ports.is_empty() {
        exposed(config)?
    } else {
        g.ports.iter().map(|p| (*p, "TCP".to_string())).collect()
    };
    let (img_user, img_group) = user_of(config);
    let user = g.run_as_user.or(img_user);
    let group = g.run_as_group.or(img_group);
    let labels = json!({"app.kubernetes.io/name": g.name});
    let mut metadata = json!({"name": g.name, "labels": labels});
    if let Some(ns) = &g.namespace {
        metadata["namespace"] = json!(ns);
    }
    let mut resources = json!({"requests": {"cpu": g.cpu_request, "memory": g.memory_request}});
    let mut limits = serde_json::Map::new();
    if let Some(c) = &g.cpu_limit {
        limits.insert("cpu".into(), json!(c));
    }
    if let Some(m) = &g.memory_limit {
        limits.insert("memory".into(), json!(m));
    }
    if !limits.is_empty() {
        resources["limits"] = Value::Object(limits);
    }
    let mut container = json!({
        "name": g.name,
        "image": g.image,
        "resources": resources,
    });
    if !ports.is_empty() {
        container["ports"] = ports
            .iter()
            .enumerate()
            .map(|(i, (p, proto))| {
                json!({"name": port_name(i), "containerPort": p, "protocol": proto})
            })
            .collect();
        if let Some(path) = &g.probe_path {
            let probe = json!({"httpGet": {"path": path, "port": port_name(0)}});
            container["readinessProbe"] = probe.clone();
            container["livenessProbe"] = probe;
        }
    }
    let mut security = serde_json::Map::new();
    if let Some(u) = user {
        security.insert("runAsUser".into(), json!(u));
        if u != 0 {
            security.insert("runAsNonRoot".into(), json!(true));
        }
    }
    if let Some(gid) = group {
        security.insert("runAsGroup".into(), json!(gid));
    }
    let mut pod_spec = json!({"containers": [container]});
    if !security.is_empty() {
        pod_spec["securityContext"] = Value::Object(security);
    }
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": g.replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    });
    let mut out = vec![deployment];
    if !ports.is_empty() {
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata,
            "spec": {
                "selector": labels,
                "ports": ports.iter().enumerate().map(|(i, (p, proto))| json!({
                    "name": port_name(i),
                    "port": p,
                    "targetPort": port_name(i),
                    "protocol": proto,
                })).collect::<Vec<_>>(),
            },
        }));
    }
    Ok(out)
}

fn port_name(i: usize) -> String {
    if i == 0 {
        "http".to_string()
    } else {
        format!("http-{i}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Platform;

    fn config(user: &str, ports: &[&str]) -> ConfigFile {
        let mut c = ConfigFile::new(&Platform::host(), 0);
        for p in ports {
            c.add_exposed_port(p);
        }
        let user = user.to_string();
        c.update_config(|cfg| {
            cfg.set_user(Some(user));
        });
        c
    }

    #[test]
    fn chart_defaults_ports_and_user() {
        let g = Generate::new("app", "r/app@sha256:x");
        let out = generate(&g, &config("1000:3000", &["5005/tcp"])).unwrap();
        assert_eq!(out.len(), 2);
        let d = &out[0];
        assert_eq!(d["spec"]["replicas"], 2);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["ports"][0]["containerPort"], 5005);
        assert_eq!(c["resources"]["requests"]["cpu"], "50m");
        assert_eq!(c["resources"]["requests"]["memory"], "256Mi");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health");
        let sc = &d["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(
            (sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()),
            (Some(1000), Some(3000))
        );
        assert_eq!(out[1]["spec"]["ports"][0]["targetPort"], "http");
    }

    #[test]
    fn named_user_gets_chart_ids_and_no_ports_no_service() {
        let out = generate(&Generate::new("a", "i"), &config("dotnet", &[])).unwrap();
        assert_eq!(out.len(), 1);
        let sc = &out[0]["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(sc["runAsUser"], 1000);
        assert_eq!(sc["runAsGroup"], 3000);
        let root = generate(&Generate::new("a", "i"), &config("", &[])).unwrap();
        assert!(root[0]["spec"]["template"]["spec"]["securityContext"].is_null());
        assert!(generate(&Generate::new("a", "i"), &config("", &["x/tcp"])).is_err());
    }
}
