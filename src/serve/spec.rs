//! The API's nouns: what a client asks for ([`BuildRequest`]), what it gets back
//! ([`Build`]), and the checks that turn a request body into a [`BuildSpec`] the queue can
//! hold. Validation is pure: every rejection is a [`Invalid`] message for a 400.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::registry::Reference;
use crate::source::GitContext;

/// Longest accepted git ref, path, image name, header value.
const MAX_TEXT: usize = 1024;
/// Most build args or labels in one request.
const MAX_ENTRIES: usize = 256;

/// The body of `POST /api/v1/builds`. Unknown fields are refused.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// The git repository (`https://gitea.example/repos/org/app.git`).
    pub repository: String,
    /// A branch, tag or commit id (default `main`).
    #[serde(rename = "ref", default)]
    pub git_ref: Option<String>,
    /// The context directory within the repository (default: its root).
    #[serde(default)]
    pub context: String,
    /// The Dockerfile, relative to the context (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// A layer recipe (TOML) relative to the context, instead of a Dockerfile.
    #[serde(default)]
    pub recipe: Option<String>,
    /// The image reference to tag and push (`registry/org-app:tag`).
    pub image: String,
    /// Push to `image`'s registry (default true); otherwise the image stays in the store.
    #[serde(default = "yes")]
    pub push: bool,
    /// Token for the git remote; never echoed, logged or stored in clear.
    #[serde(default)]
    pub git_token: Option<String>,
    /// `--build-arg` values.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Labels set on the image.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The target stage.
    #[serde(default)]
    pub target: Option<String>,
    /// A hand-off after the push: `{"flux": {…}}` (see [`super::deploy::FluxSpec`]).
    #[serde(default)]
    pub deploy: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// A validated request, as the queue stores it (without the token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// The repository URL.
    pub repository: String,
    /// Branch, tag or commit id.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Context subdirectory (`""` for the root).
    pub context: String,
    /// The Dockerfile path relative to the context, unless `recipe` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// The recipe path relative to the context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// The image reference (normalised).
    pub image: String,
    /// Push after the build.
    pub push: bool,
    /// Build args.
    pub build_args: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Target stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Deploy request, passed through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<serde_json::Value>,
}

impl BuildSpec {
    /// The git context in Docker's syntax (`URL#REF[:SUBDIR]`).
    pub fn git_context(&self) -> String {
        if self.context.is_empty() {
            format!("{}#{}", self.repository, self.git_ref)
        } else {
            format!("{}#{}:{}", self.repository, self.git_ref, self.context)
        }
    }

    /// What builds of the same app are ordered by: the repository without credentials,
    /// case-folded host, no trailing `/` or `.git`.
    pub fn repo_key(&self) -> String {
        let mut s = self.repository.trim_end_matches('/').to_string();
        if let Some(x) = s.strip_suffix(".git") {
            s = x.to_string();
        }
        match url::Url::parse(&s) {
            Ok(u) => format!(
                "{}://{}{}{}",
                u.scheme(),
                u.host_str().unwrap_or("").to_ascii_lowercase(),
                u.port().map(|p| format!(":{p}")).unwrap_or_default(),
                u.path().trim_end_matches('/')
            ),
            Err(_) => s,
        }
    }
}

/// A request that cannot be accepted, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(s: impl Into<String>) -> Invalid {
    Invalid(s.into())
}

/// Text fit for a header line or a log: no control characters, bounded.
fn plain_text(field: &str, v: &str) -> Result<(), Invalid> {
    if v.len() > MAX_TEXT {
        return Err(invalid(format!("{field} is longer than {MAX_TEXT} bytes")));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(format!("{field} contains control characters")));
    }
    Ok(())
}

/// A path inside the repository: relative, no `..`, no empty or `.` tricks that leave it.
pub fn repo_path(field: &str, v: &str) -> Result<String, Invalid> {
    plain_text(field, v)?;
    if v.starts_with('/') || v.contains('\\') {
        return Err(invalid(format!(
            "{field} {v:?} must be a relative path inside the repository"
        )));
    }
    let mut parts = Vec::new();
    for part in v.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(invalid(format!(
                    "{field} {v:?} must not leave the repository (`..`)"
                )));
            }
            p if p.contains(':') || p.contains('#') => {
                return Err(invalid(format!(
                    "{field} {v:?} must not contain `:` or `#`"
                )));
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// A branch, tag or commit id as git accepts it in a ref name (`git check-ref-format`).
pub fn check_ref(v: &str) -> Result<(), Invalid> {
    plain_text("ref", v)?;
    let bad = v.is_empty()
        || v.starts_with('-')
        || v.starts_with('/')
        || v.ends_with('/')
        || v.ends_with('.')
        || v.ends_with(".lock")
        || v.contains("..")
        || v.contains("//")
        || v.contains("@{")
        || v.chars()
            .any(|c| c == ' ' || "~^:?*[\\#".contains(c) || c.is_control());
    if bad {
        return Err(invalid(format!(
            "ref {v:?} is not a valid branch, tag or commit id"
        )));
    }
    Ok(())
}

fn key_values(field: &str, m: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if m.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "{field} has more than {MAX_ENTRIES} entries"
        )));
    }
    for (k, v) in m {
        if k.is_empty() || k.contains('=') {
            return Err(invalid(format!(
                "{field} key {k:?} is empty or contains `=`"
            )));
        }
        plain_text(&format!("{field} key"), k)?;
        if v.len() > 64 * 1024 {
            return Err(invalid(format!("{field} {k:?} is longer than 64 KiB")));
        }
    }
    Ok(())
}

impl BuildRequest {
    /// Check every field and return the spec the queue stores, and the token apart.
    pub fn validate(self) -> Result<(BuildSpec, Option<String>), Invalid> {
        plain_text("repository", &self.repository)?;
        let url = url::Url::parse(&self.repository).map_err(|e| {
            invalid(format!(
                "repository {:?} is not a URL: {e}",
                self.repository
            ))
        })?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(invalid("repository must be an http(s) URL"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("repository URL has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            // Credentials in the URL would be stored and shown with the build.
            return Err(invalid(
                "repository URL must not contain credentials: send them as git_token",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "repository URL must not have a query or fragment: use ref and context",
            ));
        }
        let git_ref = self.git_ref.unwrap_or_else(|| "main".to_string());
        check_ref(&git_ref)?;
        let context = repo_path("context", &self.context)?;
        let (dockerfile, recipe) = match (self.dockerfile, self.recipe) {
            (Some(_), Some(_)) => {
                return Err(invalid("give either dockerfile or recipe, not both"));
            }
            (None, Some(r)) => (None, Some(repo_path("recipe", &r)?)),
            (d, None) => {
                let d = repo_path("dockerfile", d.as_deref().unwrap_or("Dockerfile"))?;
                if d.is_empty() {
                    return Err(invalid("dockerfile must name a file"));
                }
                (Some(d), None)
            }
        };
        if recipe.as_deref() == Some("") {
            return Err(invalid("recipe must name a file"));
        }
        plain_text("image", &self.image)?;
        let image: Reference = self
            .image
            .parse()
            .map_err(|e| invalid(format!("image {:?}: {e}", self.image)))?;
        if image.digest.is_some() {
            return Err(invalid("image must be a name with a tag, not a digest"));
        }
        let image = match image.tag {
            Some(_) => image,
            None => image.with_tag("latest"),
        };
        key_values("build_args", &self.build_args)?;
        key_values("labels", &self.labels)?;
        if let Some(t) = &self.target {
            plain_text("target", t)?;
        }
        if let Some(t) = &self.git_token
            && (t.len() > 4096 || t.chars().any(char::is_control))
        {
            return Err(invalid(
                "git_token is longer than 4096 bytes or has control characters",
            ));
        }
        if let Some(d) = &self.deploy {
            super::deploy::DeploySpec::validate(d)?;
            if !self.push {
                return Err(invalid(
                    "deploy needs push: the cluster pulls from the registry",
                ));
            }
        }
        let spec = BuildSpec {
            repository: self.repository,
            git_ref,
            context,
            dockerfile,
            recipe,
            image: image.to_string(),
            push: self.push,
            build_args: self.build_args,
            labels: self.labels,
            target: self.target,
            deploy: self.deploy,
        };
        spec.git_context()
            .parse::<GitContext>()
            .map_err(|e| invalid(format!("repository and ref: {e}")))?;
        Ok((spec, self.git_token.filter(|t| !t.is_empty())))
    }
}

/// Where a build is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for a worker.
    Queued,
    /// A worker is building it.
    Running,
    /// Built (and pushed).
    Succeeded,
    /// Failed; `error` says why.
    Failed,
    /// Deleted while queued, or cancelled while running.
    Cancelled,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 5] = [
        State::Queued,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// Whether the build is over.
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }
}

impl std::str::FromStr for State {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<State, Invalid> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                invalid(format!(
                    "unknown state {s:?} (queued, running, succeeded, failed, cancelled)"
                ))
            })
    }
}

/// A build as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Build {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: State,
    /// When it was queued (RFC 3339).
    pub created_at: String,
    /// When a worker took it.
    pub started_at: Option<String>,
    /// When it ended.
    pub finished_at: Option<String>,
    /// The manifest digest of the image.
    pub digest: Option<String>,
    /// The references pushed (or tagged in the store).
    pub tags: Vec<String>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The commit the ref resolved to.
    pub commit: Option<String>,
    /// How many times a worker took it (more than one after a restart).
    pub attempts: i64,
    /// The deploy hand-off's result.
    pub deploy: Option<serde_json::Value>,
    /// What was asked for (no token).
    pub request: BuildSpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<(BuildSpec, Option<String>), Invalid> {
        let r: BuildRequest = serde_json::from_str(json).map_err(|e| Invalid(e.to_string()))?;
        r.validate()
    }

    #[test]
    fn a_studio_request_validates() {
        let (spec, token) = req(r#"{"repository":"https://gitea.example/repos/org/app.git",
            "ref":"main","context":"","dockerfile":"Dockerfile",
            "image":"registry.example/org-app:1","push":true,"git_token":"t",
            "build_args":{},"labels":{"a":"b"}}"#)
        .expect("valid");
        assert_eq!(token.as_deref(), Some("t"));
        assert_eq!(
            spec.git_context(),
            "https://gitea.example/repos/org/app.git#main"
        );
        assert_eq!(spec.repo_key(), "https://gitea.example/repos/org/app");
        assert!(
            !serde_json::to_string(&spec)
                .expect("json")
                .contains("\"t\"")
        );
    }

    #[test]
    fn hostile_fields_are_refused() {
        let base = |extra: &str| {
            format!(r#"{{"repository":"https://h/o/a.git","image":"r.example/a:1"{extra}}}"#)
        };
        for (extra, what) in [
            (r#","context":"../etc""#, "leave"),
            (r#","context":"/abs""#, "relative"),
            (r#","dockerfile":"a/../../x""#, "leave"),
            (r#","ref":"a..b""#, "ref"),
            (r#","ref":"x y""#, "ref"),
            (r#","ref":"-x""#, "ref"),
            (r#","color":"red""#, "unknown field"),
            (r#","dockerfile":"D","recipe":"r.toml""#, "not both"),
            (r#","labels":{"":"x"}"#, "empty"),
            (r#","git_token":"a\nb""#, "control"),
        ] {
            let err = req(&base(extra)).expect_err(extra);
            assert!(err.0.contains(what), "{extra}: {err}");
        }
        assert!(
            req(r#"{"repository":"https://u:p@h/o/a.git","image":"r.example/a:1"}"#)
                .expect_err("creds")
                .0
                .contains("credentials")
        );
        assert!(req(r#"{"repository":"file:///etc","image":"r.example/a:1"}"#).is_err());
        assert!(req(r#"{"repository":"https://h/a","image":"UPPER:x"}"#).is_err());
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(repo_path("c", "./App//sub/").expect("ok"), "App/sub");
        assert_eq!(repo_path("c", "").expect("ok"), "");
    }
}
