//! Image references with Docker's normalisation: `name`, `name:tag`, `name@sha256:…`,
//! `name:tag@sha256:…`, `host[:port]/…`, `localhost/…`; a name without a registry host is on
//! Docker Hub (`docker.io`, served by `registry-1.docker.io`) and a one-component Hub name is
//! under `library/`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::store::{ImageName, NameError};

/// The registry of names without a host.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API lives.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A fully qualified reference to an image in a registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (and port), normalised: `docker.io` for Docker Hub.
    pub registry: String,
    /// Repository path within the registry (`library/alpine`, `org/app`).
    pub repository: String,
    /// Tag, if given (`latest` is implied when neither tag nor digest is).
    pub tag: Option<String>,
    /// Digest, if given; it wins over the tag when fetching.
    pub digest: Option<Digest>,
}

impl Reference {
    /// The host to talk to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest if pinned, else the tag, else `latest`.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository at another tag (digest dropped).
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same repository pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether the registry is on this machine (plain HTTP is allowed only there, or for
    /// registries named with `--insecure-registry`).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

/// Whether `host[:port]` names this machine.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = match host_port.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl FromStr for Reference {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Reference, NameError> {
        let s = s.strip_prefix("docker://").unwrap_or(s);
        let name: ImageName = s.parse()?;
        let tag_given = {
            let before_digest = s.split('@').next().unwrap_or(s);
            let last = before_digest.rsplit('/').next().unwrap_or(before_digest);
            last.contains(':')
        };
        let (registry, mut repository) = match name.repository.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.repository.clone()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        Ok(Reference {
            registry,
            repository,
            tag: tag_given.then(|| name.tag.clone()),
            digest: name.digest,
        })
    }
}

impl fmt::Display for Reference {
    /// The canonical form: `registry/repository[:tag][@digest]` (`:latest` when neither).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match (&self.tag, &self.digest) {
            (Some(t), _) => write!(f, ":{t}")?,
            (None, None) => write!(f, ":latest")?,
            _ => {}
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        s.parse().unwrap()
    }

    #[test]
    fn docker_hub_names_are_normalised() {
        let a = r("alpine");
        assert_eq!(
            (a.registry.as_str(), a.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        assert_eq!(a.api_host(), "registry-1.docker.io");
        assert_eq!(a.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r("docker.io/org/app:1").to_string(), "docker.io/org/app:1");
        assert_eq!(r("index.docker.io/alpine").repository, "library/alpine");
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        let d = Digest::of(b"x");
        let x = r(&format!("localhost:5000/org/app:v1@{d}"));
        assert_eq!(x.registry, "localhost:5000");
        assert_eq!(x.repository, "org/app");
        assert_eq!(x.tag.as_deref(), Some("v1"));
        assert_eq!(x.digest, Some(d));
        assert_eq!(x.reference(), d.to_string());
        assert!(x.is_loopback());
        let y = r(&format!("ttdaltinnregistry01.azurecr.io/ttd-app@{d}"));
        assert_eq!(y.tag, None);
        assert_eq!(
            y.to_string(),
            format!("ttdaltinnregistry01.azurecr.io/ttd-app@{d}")
        );
        assert!(!y.is_loopback());
        assert!(r("127.0.0.1:5000/a").is_loopback());
        assert!(r("[::1]:5000/a").is_loopback());
        assert_eq!(r("localhost/app").registry, "localhost");
    }

    #[test]
    fn invalid_references_say_what_is_wrong() {
        for bad in ["Upper/case", "app:", "a@sha256:zz", "host:port:x/a"] {
            let e = bad.parse::<Reference>().unwrap_err().to_string();
            assert!(e.contains("invalid image name"), "{bad}: {e}");
        }
    }
}
