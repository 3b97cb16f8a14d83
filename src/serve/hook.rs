//! Gitea push webhooks: the body's HMAC-SHA256 under the configured secret must match
//! `X-Gitea-Signature` (hex); a push to a mapped repository and branch enqueues a build of
//! the pushed commit. Redeliveries (same `X-Gitea-Delivery`) map to the same build.

use std::collections::BTreeMap;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::spec::BuildRequest;
use crate::registry::Secret;

/// Which pushes build what.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookRule {
    /// Gitea's `repository.full_name` (`org/app`), compared case-insensitively.
    pub repository: String,
    /// Branches that build (empty: every branch).
    #[serde(default)]
    pub branches: Vec<String>,
    /// The image to push; `{commit}`, `{short_commit}` and `{branch}` are replaced.
    pub image: String,
    /// The Dockerfile (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// A recipe instead.
    #[serde(default)]
    pub recipe: Option<String>,
    /// Context subdirectory.
    #[serde(default)]
    pub context: String,
    /// Push (default true).
    #[serde(default = "yes")]
    pub push: bool,
    /// Build args.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The clone URL to fetch from instead of the payload's `clone_url`.
    #[serde(default)]
    pub clone_url: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct HooksFile {
    #[serde(default, rename = "repository")]
    rules: Vec<HookRule>,
}

/// The webhook's secret and rules.
#[derive(Clone, Debug)]
pub struct Hooks {
    secret: Secret,
    rules: Vec<HookRule>,
    git_token: Option<Secret>,
}

/// The parts of Gitea's push payload that matter.
#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    repository: PushRepo,
}

#[derive(Deserialize)]
struct PushRepo {
    full_name: String,
    clone_url: String,
}

/// A push that is not for us, or malformed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

impl Hooks {
    /// Rules from a TOML file's text (`[[repository]]` tables), the secret, and the token
    /// used to fetch (Gitea's payload carries none).
    pub fn parse(text: &str, secret: Secret, git_token: Option<Secret>) -> Result<Hooks, String> {
        let f: HooksFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(Hooks {
            secret,
            rules: f.rules,
            git_token,
        })
    }

    /// Whether `signature` (hex) is the HMAC-SHA256 of `body`; constant time.
    pub fn verify(&self, body: &[u8], signature: &str) -> bool {
        let Some(sig) = hex(signature.trim()) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes()) else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    }

    /// The build requests a verified push payload asks for.
    pub fn requests(&self, body: &[u8]) -> Result<Vec<BuildRequest>, HookError> {
        let p: Push = serde_json::from_slice(body)
            .map_err(|e| HookError(format!("not a Gitea push payload: {e}")))?;
        let Some(branch) = p.git_ref.strip_prefix("refs/heads/") else {
            return Ok(Vec::new());
        };
        if p.after.len() != 40 || !p.after.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HookError("`after` is not a commit id".into()));
        }
        if p.after.bytes().all(|b| b == b'0') {
            // A deleted branch.
            return Ok(Vec::new());
        }
        let commit = p.after.to_ascii_lowercase();
        let out = self
            .rules
            .iter()
            .filter(|r| r.repository.eq_ignore_ascii_case(&p.repository.full_name))
            .filter(|r| r.branches.is_empty() || r.branches.iter().any(|b| b == branch))
            .map(|r| {
                let image = r
                    .image
                    .replace("{commit}", &commit)
                    .replace("{short_commit}", &commit[..12])
                    .replace("{branch}", &branch.replace('/', "-"));
                BuildRequest {
                    repository: r
                        .clone_url
                        .clone()
                        .unwrap_or_else(|| p.repository.clone_url.clone()),
                    git_ref: Some(commit.clone()),
                    context: r.context.clone(),
                    dockerfile: r.dockerfile.clone(),
                    recipe: r.recipe.clone(),
                    image,
                    push: r.push,
                    git_token: self.git_token.as_ref().map(|t| t.expose().to_string()),
                    build_args: r.build_args.clone(),
                    labels: r.labels.clone(),
                    target: None,
                    deploy: None,
                }
            })
            .collect();
        Ok(out)
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks() -> Hooks {
        Hooks::parse(
            "[[repository]]\nrepository = \"org/app\"\nbranches = [\"main\"]\nimage = \"r.example/org-app:{short_commit}\"\n",
            Secret::new("s3cret"),
            None,
        )
        .expect("valid rules")
    }

    fn sign(body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").expect("key");
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn signatures_are_checked() {
        let h = hooks();
        let body = br#"{"x":1}"#;
        assert!(h.verify(body, &sign(body)));
        assert!(!h.verify(b"{\"x\":2}", &sign(body)));
        assert!(!h.verify(body, ""));
        assert!(!h.verify(body, "zz"));
    }

    #[test]
    fn mapped_pushes_become_requests() {
        let h = hooks();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{commit}","repository":{{"full_name":"Org/App","clone_url":"https://g/org/app.git"}}}}"#
        );
        let r = h.requests(body.as_bytes()).expect("parse");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].image, "r.example/org-app:0123456789ab");
        assert_eq!(r[0].git_ref.as_deref(), Some(commit));
        let other = body.replace("refs/heads/main", "refs/heads/dev");
        assert!(h.requests(other.as_bytes()).expect("parse").is_empty());
        let tag = body.replace("refs/heads/main", "refs/tags/v1");
        assert!(h.requests(tag.as_bytes()).expect("parse").is_empty());
    }
}
