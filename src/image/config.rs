//! The image config blob
//! (<https://github.com/opencontainers/image-spec/blob/main/config.md>) as oci-spec's
//! `ImageConfiguration`, plus the Docker extensions BuildKit also writes (`Healthcheck`,
//! `OnBuild`, `Shell`, …) that oci-spec does not model, kept verbatim so nothing a base image
//! carries is lost.

use std::collections::BTreeMap;

use oci_spec::image::{Config, History, ImageConfiguration, RootFs};
use serde_json::{Map, Value};

use super::{ImageError, canonical_json, rfc3339};
use crate::digest::Digest;
use crate::media::Platform;

/// Keys of the `config` object that oci-spec models; everything else is carried in `extra`.
const OCI_CONFIG_KEYS: &[&str] = &[
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
];

/// A HEALTHCHECK, in Docker's config shape (durations in nanoseconds).
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", …]` or `["CMD-SHELL", "…"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    /// Time between checks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: u64,
    /// Time a check may take.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: u64,
    /// Grace period after start.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: u64,
    /// Interval during the start period.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: u64,
    /// Failures before unhealthy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// An image config: oci-spec's typed view plus the untyped Docker extensions.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigFile {
    /// The OCI fields.
    pub oci: ImageConfiguration,
    /// Keys of `config` oci-spec does not model (`Healthcheck`, `OnBuild`, `Shell`, …).
    pub extra: BTreeMap<String, Value>,
}

impl ConfigFile {
    /// An empty config for `platform`, created at `epoch` (for `FROM scratch`).
    pub fn new(platform: &Platform, epoch: i64) -> ConfigFile {
        let mut oci = ImageConfiguration::default();
        oci.set_architecture(platform.architecture.as_str().into());
        oci.set_os(platform.os.as_str().into());
        oci.set_variant(platform.variant.clone());
        oci.set_created(Some(rfc3339(epoch)));
        oci.set_rootfs(RootFs::default());
        oci.set_config(Some(Config::default()));
        oci.set_history(Some(Vec::new()));
        oci.set_author(None);
        ConfigFile {
            oci,
            extra: BTreeMap::new(),
        }
    }

    /// Parse config bytes.
    pub fn parse(bytes: &[u8]) -> Result<ConfigFile, ImageError> {
        let json = |source| ImageError::Json {
            what: "image config",
            source,
        };
        let mut value: Value = serde_json::from_slice(bytes).map_err(json)?;
        let mut extra = BTreeMap::new();
        if let Some(Value::Object(cfg)) = value.get_mut("config") {
            let keys: Vec<String> = cfg.keys().cloned().collect();
            for k in keys {
                if !OCI_CONFIG_KEYS.contains(&k.as_str()) {
                    if let Some(v) = cfg.remove(&k)
                        && !v.is_null()
                    {
                        extra.insert(k, v);
                    }
                } else if cfg.get(&k).is_some_and(Value::is_null) {
                    cfg.remove(&k);
                }
            }
        }
        // Docker writes `"config": null`, `"Env": null` etc.; oci-spec wants absence.
        if value.get("config").is_some_and(Value::is_null)
            && let Some(o) = value.as_object_mut()
        {
            o.remove("config");
        }
        let oci: ImageConfiguration = serde_json::from_value(value).map_err(json)?;
        Ok(ConfigFile { oci, extra })
    }

    /// The canonical bytes of this config (sorted keys, compact).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(&self.oci).expect("config serialises");
        if !self.extra.is_empty()
            && let Some(obj) = v.as_object_mut()
        {
            let cfg = obj
                .entry("config")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(cfg) = cfg.as_object_mut() {
                for (k, x) in &self.extra {
                    cfg.insert(k.clone(), x.clone());
                }
            }
        }
        canonical_json(&v)
    }

    /// The `rootfs.diff_ids`.
    pub fn diff_ids(&self) -> Result<Vec<Digest>, ImageError> {
        self.oci
            .rootfs()
            .diff_ids()
            .iter()
            .map(|d| d.parse().map_err(ImageError::from))
            .collect()
    }

    /// Change the runtime config (created empty when missing).
    pub fn update_config(&mut self, f: impl FnOnce(&mut Config)) {
        let mut c = self.config();
        f(&mut c);
        self.oci.set_config(Some(c));
    }

    /// The runtime config (default when missing).
    pub fn config(&self) -> Config {
        self.oci.config().clone().unwrap_or_default()
    }

    /// Environment as ordered (key, value) pairs.
    pub fn env(&self) -> Vec<(String, String)> {
        self.config()
            .env()
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect()
    }

    /// Set (or replace in place) an environment variable.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let mut env = self.config().env().clone().unwrap_or_default();
        let entry = format!("{key}={value}");
        match env
            .iter_mut()
            .find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == key)
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
        self.update_config(|c| {
            c.set_env(Some(env));
        });
    }

    /// Set a label.
    pub fn set_label(&mut self, key: &str, value: &str) {
        let mut labels = self.config().labels().clone().unwrap_or_default();
        labels.insert(key.to_string(), value.to_string());
        self.update_config(|c| {
            c.set_labels(Some(labels));
        });
    }

    /// Labels, sorted.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.config()
            .labels()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// Add an exposed port (`5005/tcp`), keeping the set sorted and unique.
    pub fn add_exposed_port(&mut self, port: &str) {
        let mut ports = self.config().exposed_ports().clone().unwrap_or_default();
        if !ports.iter().any(|p| p == port) {
            ports.push(port.to_string());
            ports.sort();
        }
        self.update_config(|c| {
            c.set_exposed_ports(Some(ports));
        });
    }

    /// Add a volume, keeping the set sorted and unique.
    pub fn add_volume(&mut self, path: &str) {
        let mut vols = self.config().volumes().clone().unwrap_or_default();
        if !vols.iter().any(|p| p == path) {
            vols.push(path.to_string());
            vols.sort();
        }
        self.update_config(|c| {
            c.set_volumes(Some(vols));
        });
    }

    /// Set a Docker extension key of `config` (`Healthcheck`, `Shell`, `OnBuild`, …);
    /// `None` removes it.
    pub fn set_extra(&mut self, key: &str, value: Option<Value>) {
        match value {
            Some(v) => {
                self.extra.insert(key.to_string(), v);
            }
            None => {
                self.extra.remove(key);
            }
        }
    }

    /// Append a layer's diff_id and its history entry.
    pub fn push_layer(&mut self, diff_id: Digest, history: History) {
        let mut rootfs = self.oci.rootfs().clone();
        let mut ids = rootfs.diff_ids().clone();
        ids.push(diff_id.to_string());
        rootfs.set_diff_ids(ids);
        self.oci.set_rootfs(rootfs);
        self.push_history(history);
    }

    /// Append a history entry.
    pub fn push_history(&mut self, history: History) {
        let mut h = self.oci.history().clone().unwrap_or_default();
        h.push(history);
        self.oci.set_history(Some(h));
    }
}

/// A history entry like BuildKit's: `created_by` text, creation time, and `empty_layer` for
/// steps that changed only metadata.
pub fn history(created_by: &str, epoch: i64, empty_layer: bool) -> History {
    let mut h = History::default();
    h.set_created(Some(rfc3339(epoch)));
    h.set_created_by(Some(created_by.to_string()));
    h.set_comment(Some("strata".to_string()));
    if empty_layer {
        h.set_empty_layer(Some(true));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_extensions_survive_a_round_trip() {
        let raw = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Healthcheck":{"Test":["CMD","true"]},"OnBuild":null,"Shell":["/bin/bash","-c"],"Cmd":null},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cfg = ConfigFile::parse(raw).unwrap();
        assert_eq!(cfg.env(), vec![("A".to_string(), "1".to_string())]);
        let out = String::from_utf8(cfg.to_bytes()).unwrap();
        assert!(
            out.contains(r#""Healthcheck":{"Test":["CMD","true"]}"#),
            "{out}"
        );
        assert!(out.contains(r#""Shell":["/bin/bash","-c"]"#), "{out}");
        assert!(!out.contains("OnBuild"), "{out}");
    }

    #[test]
    fn labels_serialise_sorted_whatever_the_insertion_order() {
        let mut a = ConfigFile::new(&Platform::host(), 0);
        let mut b = a.clone();
        for k in ["z", "a", "m", "b", "y"] {
            a.set_label(k, "1");
        }
        for k in ["y", "b", "m", "a", "z"] {
            b.set_label(k, "1");
        }
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn env_replaces_in_place() {
        let mut c = ConfigFile::new(&Platform::host(), 0);
        c.set_env("PATH", "/bin");
        c.set_env("A", "1");
        c.set_env("PATH", "/usr/bin:/bin");
        assert_eq!(
            c.env(),
            vec![
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("A".to_string(), "1".to_string())
            ]
        );
    }
}
