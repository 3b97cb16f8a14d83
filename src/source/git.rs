//! Build contexts in remote git repositories, fetched with gix (no `git` binary) into a
//! cache of bare repositories and read straight from the object database.
//!
//! - [`GitContext`]: Docker's git-context syntax, `URL[#REF[:SUBDIR]]`.
//! - [`GitCache`]: one bare repository per remote URL; [`GitCache::fetch`] resolves REF with
//!   the remote's ref listing and fetches that one commit shallowly (depth 1), or nothing
//!   at all when the commit is already cached.
//! - [`GitCheckout`]: the fetched commit as layer [`Entry`](crate::layer::Entry) values whose
//!   files are read from the object database on demand.
//!
//! Transport: [protocol v2](https://git-scm.com/docs/protocol-v2) over smart HTTP(S).

mod checkout;
mod context;
mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;

use crate::digest::Digest;
use crate::registry::Secret;

use super::SourceError;
use context::RefKind;

pub use checkout::GitCheckout;
pub use context::{GitContext, is_git_context};

/// Credentials for a git remote. They are sent with every request, before any challenge
/// (as BuildKit does with `GIT_AUTH_TOKEN`), and never appear in logs or errors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GitAuth {
    /// A token (Gitea access token, GitHub/GitLab personal access token), sent as HTTP Basic
    /// with user `x-access-token` and the token as password. Gitea takes a non-empty Basic
    /// password as the token whatever the user name; GitHub and GitLab do the same for
    /// personal access tokens. When `None`, a token found in the URL's user part is used.
    pub token: Option<Secret>,
    /// Extra headers sent verbatim, e.g. `("X-Api-Key", key)` or
    /// `("Authorization", "token <t>")`. An `Authorization` header here replaces the Basic
    /// header of [`GitAuth::token`].
    pub headers: Vec<(String, Secret)>,
}

/// The user name sent with a token (BuildKit's choice; any non-empty name works for Gitea).
const TOKEN_USER: &str = "x-access-token";

impl GitAuth {
    /// The header lines (`Name: value`) to send to the remote of `ctx`.
    fn header_lines(&self, ctx: &GitContext) -> Result<Vec<String>, SourceError> {
        use base64::Engine as _;
        let mut lines = Vec::new();
        let mut has_authorization = false;
        for (name, value) in &self.headers {
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                return Err(SourceError::GitHeader {
                    name: name.clone(),
                    reason: "not a valid HTTP header name",
                });
            }
            if value
                .expose()
                .bytes()
                .any(|b| b == b'\r' || b == b'\n' || b == 0)
            {
                return Err(SourceError::GitHeader {
                    name: name.clone(),
                    reason: "the value contains a line break",
                });
            }
            has_authorization |= name.eq_ignore_ascii_case("authorization");
            lines.push(format!("{name}: {}", value.expose()));
        }
        if let Some(token) = self.token.as_ref().or(ctx.token())
            && !has_authorization
        {
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{TOKEN_USER}:{}", token.expose()));
            lines.push(format!("Authorization: Basic {basic}"));
        }
        Ok(lines)
    }
}

/// A directory of bare repositories, one per remote URL (e.g. `$STRATA_HOME/git`).
///
/// Layout: `repos/<key>` is the bare repository of the URL whose normalised form (no
/// credentials, lowercase host, no default port, no trailing `/`) hashes to `<key>` (the
/// first 32 hex digits of its sha256), and `repos/<key>.lock` the file lock that serialises
/// fetches into it across processes. Repositories are created in a temporary directory and
/// renamed into place.
#[derive(Clone, Debug)]
pub struct GitCache {
    dir: PathBuf,
    interrupt: Arc<AtomicBool>,
}

impl GitCache {
    /// A cache in `dir` (created on first fetch).
    pub fn new(dir: impl Into<PathBuf>) -> GitCache {
        GitCache {
            dir: dir.into(),
            interrupt: Arc::default(),
        }
    }

    /// Stop a fetch once `flag` is set: gix checks it while it negotiates and receives the
    /// pack (every read of the pack stream), and the fetch fails with
    /// [`SourceError::GitInterrupted`]; nothing is referenced in the cache repository for a
    /// commit that did not arrive in full. The ref listing before it is not interrupted.
    /// Without this the flag is never set (the CLI's case).
    pub fn interrupt_with(mut self, flag: Arc<AtomicBool>) -> GitCache {
        self.interrupt = flag;
        self
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bare repository that caches `ctx`'s remote.
    pub fn repo_dir(&self, ctx: &GitContext) -> PathBuf {
        self.dir.join("repos").join(repo_key(ctx))
    }

    /// Makes the commit `ctx` names available in the cache and returns it.
    ///
    /// A full commit id already in the cache needs no network at all. Otherwise the remote's
    /// refs are listed once (filtered to the names REF could mean); if the commit they name
    /// is cached nothing more is transferred, else that one commit is fetched with depth 1.
    /// Fetches into one cache repository are serialised by a file lock, so concurrent
    /// processes are safe.
    ///
    /// HTTPS goes through gix's reqwest/rustls transport: the process needs a rustls
    /// `CryptoProvider` installed (the CLI installs aws-lc-rs at start-up). Fetched commits
    /// are kept under `refs/strata/commits/<id>` in the cache repository.
    pub fn fetch(&self, ctx: &GitContext, auth: &GitAuth) -> Result<GitCheckout, SourceError> {
        let headers = auth.header_lines(ctx)?;
        let repos = self.dir.join("repos");
        fs_err::create_dir_all(&repos)?;
        let key = repo_key(ctx);
        let lock_path = repos.join(format!("{key}.lock"));
        let lock = fs_err::File::create(&lock_path)?;
        lock.file().lock().map_err(|source| SourceError::Read {
            path: lock_path.clone(),
            source,
        })?;
        let repo = open_or_init(&repos, &key, ctx)?;
        let local = repo.to_thread_local();
        if let RefKind::Commit(hex) = ctx.ref_kind() {
            let id = ObjectId::from_hex(hex.as_bytes()).map_err(|_| SourceError::GitUrl {
                url: ctx.to_string(),
                reason: "invalid commit id".into(),
            })?;
            if has_commit(&local, id) {
                tracing::debug!(commit = %id, url = ctx.url(), "git commit already cached");
                return GitCheckout::open(repo, id);
            }
        }
        let id = remote::fetch(&local, ctx, &headers, &self.interrupt)?;
        drop(local);
        let checkout = GitCheckout::open(repo, id);
        // Held until the commit is known to be complete in the cache.
        drop(lock);
        checkout
    }
}

/// The cache directory name of `ctx`'s remote.
fn repo_key(ctx: &GitContext) -> String {
    let mut hex = Digest::of(ctx.normalized_url().as_bytes()).hex();
    hex.truncate(32);
    hex
}

/// Whether the commit `id` is in `repo` (and so, with depth-1 fetches, its whole tree).
fn has_commit(repo: &gix::Repository, id: ObjectId) -> bool {
    repo.find_header(id)
        .is_ok_and(|h| h.kind() == gix::object::Kind::Commit)
}

/// Opens `repos/<key>`, creating it (atomically, through a temporary directory) if missing.
/// The caller holds the repository's lock.
fn open_or_init(
    repos: &Path,
    key: &str,
    ctx: &GitContext,
) -> Result<gix::ThreadSafeRepository, SourceError> {
    let path = repos.join(key);
    let repo_error = |path: &Path, e: gix::Error| SourceError::GitRepo {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    if !path.exists() {
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(repos)
            .map_err(|source| SourceError::Read {
                path: repos.to_path_buf(),
                source,
            })?;
        gix::ThreadSafeRepository::init_opts(
            tmp.path(),
            gix::create::Kind::Bare,
            gix::create::Options::default(),
            gix::open::Options::isolated(),
        )
        .map_err(|e| repo_error(tmp.path(), e))?;
        // For people looking into the cache: which remote this is.
        fs_err::write(tmp.path().join("description"), format!("{}\n", ctx.url()))?;
        fs_err::rename(tmp.keep(), &path)?;
    }
    gix::ThreadSafeRepository::open_opts(&path, gix::open::Options::isolated())
        .map_err(|e| repo_error(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(s: &str) -> GitContext {
        s.parse().expect("valid context")
    }

    #[test]
    fn token_is_sent_as_basic_password() {
        let auth = GitAuth {
            token: Some(Secret::new("t0k")),
            headers: vec![],
        };
        let lines = auth.header_lines(&ctx("https://h/o/r.git")).expect("valid");
        // base64("x-access-token:t0k")
        assert_eq!(lines, ["Authorization: Basic eC1hY2Nlc3MtdG9rZW46dDBr"]);
        assert!(!format!("{auth:?}").contains("t0k"));
    }

    #[test]
    fn url_token_is_the_fallback() {
        let lines = GitAuth::default()
            .header_lines(&ctx("https://t0k@h/o/r.git"))
            .expect("valid");
        assert_eq!(lines, ["Authorization: Basic eC1hY2Nlc3MtdG9rZW46dDBr"]);
    }

    #[test]
    fn explicit_authorization_header_wins() {
        let auth = GitAuth {
            token: Some(Secret::new("t0k")),
            headers: vec![("Authorization".into(), Secret::new("token abc"))],
        };
        let lines = auth.header_lines(&ctx("https://h/o/r.git")).expect("valid");
        assert_eq!(lines, ["Authorization: token abc"]);
    }

    #[test]
    fn bad_headers_are_rejected_without_their_value() {
        let auth = GitAuth {
            token: None,
            headers: vec![("X-Api-Key".into(), Secret::new("k\r\nX-Evil: 1"))],
        };
        let err = auth
            .header_lines(&ctx("https://h/o/r.git"))
            .expect_err("line break");
        assert!(!err.to_string().contains("Evil"), "{err}");
        let auth = GitAuth {
            token: None,
            headers: vec![("Bad Name".into(), Secret::new("v"))],
        };
        assert!(auth.header_lines(&ctx("https://h/o/r.git")).is_err());
    }

    #[test]
    fn cache_key_ignores_credentials_and_case() {
        assert_eq!(
            repo_key(&ctx("https://tok@Host.example/o/r.git#main")),
            repo_key(&ctx("https://host.example:443/o/r.git/"))
        );
        assert_ne!(
            repo_key(&ctx("https://host.example/o/r.git")),
            repo_key(&ctx("https://host.example/o/other.git"))
        );
    }
}
