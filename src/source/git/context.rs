//! Docker's git build-context syntax: `https://host/org/repo.git#REF:SUBDIR`.

use std::fmt;
use std::str::FromStr;

use crate::registry::{Secret, is_loopback_host};
use crate::source::SourceError;

/// A build context in a remote git repository, as `docker build` writes it:
/// `URL[#REF[:SUBDIR]]`.
///
/// - URL: `https://…` (any host) or `http://…` (loopback hosts only), optionally prefixed
///   with `git+`. A token in the user part (`https://<token>@host/…`, or the password of
///   `https://user:<token>@host/…`) is taken out of the URL and kept as [`GitContext::token`].
/// - REF: a branch, a tag, a full ref name (`refs/pull/1/head`) or a full 40-hex commit id;
///   absent or empty means the remote's `HEAD`. Names resolve in git's order
///   (`refs/<name>`, `refs/tags/<name>`, `refs/heads/<name>`, …), as `git fetch origin <name>`
///   does. A name that matches no ref but looks like an abbreviated commit id is resolved
///   against the fetched history (see `remote::fetch`).
/// - SUBDIR: the directory inside the repository used as the context root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitContext {
    url: url::Url,
    reference: Option<String>,
    subdir: Option<String>,
    token: Option<Secret>,
}

/// What a REF names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefKind<'a> {
    /// The remote's default branch (`HEAD`).
    Head,
    /// A full commit id (40 lowercase hex digits).
    Commit(&'a str),
    /// A branch, tag or full ref name.
    Name(&'a str),
}

impl GitContext {
    /// The repository URL without credentials or fragment (safe to print).
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The host (with port, if not the scheme's default), for messages.
    pub fn host(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// The REF part, if given (`None` = the remote's `HEAD`).
    pub fn reference(&self) -> Option<&str> {
        self.reference.as_deref()
    }

    /// The SUBDIR part, normalised (no leading, trailing or doubled `/`), if given.
    pub fn subdir(&self) -> Option<&str> {
        self.subdir.as_deref()
    }

    /// The token found in the URL's user part, if any.
    pub fn token(&self) -> Option<&Secret> {
        self.token.as_ref()
    }

    /// The cache key: the URL without credentials, with a lowercase scheme and host, no
    /// default port and no trailing `/` (as the `url` crate normalises it).
    pub(crate) fn normalized_url(&self) -> &str {
        self.url.as_str()
    }

    pub(crate) fn ref_kind(&self) -> RefKind<'_> {
        match self.reference.as_deref() {
            None => RefKind::Head,
            Some(r) if is_full_commit_id(r) => RefKind::Commit(r),
            Some(r) => RefKind::Name(r),
        }
    }
}

impl fmt::Display for GitContext {
    /// The context as written, without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())?;
        if self.reference.is_some() || self.subdir.is_some() {
            write!(f, "#{}", self.reference.as_deref().unwrap_or(""))?;
        }
        if let Some(subdir) = &self.subdir {
            write!(f, ":{subdir}")?;
        }
        Ok(())
    }
}

/// Whether `s` names a git build context rather than a local directory or a remote tarball:
/// an `http(s)://` URL whose path ends in `.git`, any `git+http(s)://` URL, or a Gitea
/// repository URL under `/repos/<org>/<repo>` (Altinn Studio's layout). Like Docker's
/// `urlutil.IsGitURL`, minus the `git://`, `git@` and `github.com/` forms (only HTTP(S) is
/// supported).
pub fn is_git_context(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("git+https://") || lower.starts_with("git+http://") {
        return true;
    }
    let Some(rest) = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    else {
        return false;
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let rest = rest.split('?').next().unwrap_or_default();
    let Some((_, path)) = rest.split_once('/') else {
        return false;
    };
    let path = path.trim_end_matches('/');
    if path.ends_with(".git") {
        return true;
    }
    let segments: Vec<&str> = path.split('/').collect();
    segments.len() == 3 && segments[0] == "repos" && segments.iter().all(|s| !s.is_empty())
}

impl FromStr for GitContext {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<GitContext, SourceError> {
        let invalid = |reason: String| SourceError::GitUrl {
            url: redact_url(s),
            reason,
        };
        let (base, fragment) = match s.split_once('#') {
            Some((base, fragment)) => (base, Some(fragment)),
            None => (s, None),
        };
        let base = if base.len() > 4 && base[..4].eq_ignore_ascii_case("git+") {
            &base[4..]
        } else {
            base
        };
        let mut url = url::Url::parse(base).map_err(|e| invalid(e.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let host = url.host_str().unwrap_or_default();
                if !is_loopback_host(host) {
                    return Err(invalid(
                        "plain http is only allowed for loopback hosts; use https".into(),
                    ));
                }
            }
            other => {
                return Err(invalid(format!(
                    "unsupported scheme {other:?}; only https (and http to loopback hosts) is supported"
                )));
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("missing host".into()));
        }
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| invalid("credentials are not valid UTF-8".into()))
        };
        let user = decode(url.username())?;
        let password = url.password().map(decode).transpose()?.unwrap_or_default();
        let token = if !password.is_empty() {
            Some(Secret::new(password))
        } else if !user.is_empty() {
            Some(Secret::new(user))
        } else {
            None
        };
        // Clearing cannot fail for a URL with a host, which was checked above.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_fragment(None);
        let trimmed = url.path().trim_end_matches('/').to_string();
        if trimmed.is_empty() {
            return Err(invalid("missing repository path".into()));
        }
        url.set_path(&trimmed);

        let (reference, subdir) = match fragment {
            None => (None, None),
            Some(fragment) => {
                let (reference, subdir) = match fragment.split_once(':') {
                    Some((r, d)) => (r, Some(d)),
                    None => (fragment, None),
                };
                let reference = if reference.is_empty() {
                    None
                } else {
                    check_ref(reference).map_err(|reason| invalid(reason.into()))?;
                    Some(reference.to_string())
                };
                let subdir = match subdir {
                    Some(d) => normalize_subdir(d).map_err(|reason| invalid(reason.into()))?,
                    None => None,
                };
                (reference, subdir)
            }
        };
        Ok(GitContext {
            url,
            reference,
            subdir,
            token,
        })
    }
}

/// Whether `s` is a full SHA-1 commit id.
pub(crate) fn is_full_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reject what cannot be a ref name or commit id (`git check-ref-format`'s rules, loosely:
/// the remote has the final word).
fn check_ref(r: &str) -> Result<(), &'static str> {
    if r.starts_with('-') {
        return Err("ref must not start with '-'");
    }
    if r.bytes()
        .any(|b| b.is_ascii_control() || b" ~^:?*[\\".contains(&b))
    {
        return Err("ref contains a character git does not allow in ref names");
    }
    if r.contains("..") || r.contains("@{") || r.ends_with('/') || r.ends_with(".lock") {
        return Err("ref is not a valid git ref name");
    }
    Ok(())
}

/// A subdirectory as a clean relative path, `None` for the repository root.
pub(crate) fn normalize_subdir(d: &str) -> Result<Option<String>, &'static str> {
    let mut parts = Vec::new();
    for part in d.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("subdirectory must not contain '..'"),
            p => parts.push(p),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// `%XX` decoding of a URL's user part; `None` when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `s` with any user part of its authority replaced, for error messages about URLs that
/// could not be parsed.
pub(crate) fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let start = scheme_end + 3;
    let rest = &s[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &s[..start], &rest[at..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> GitContext {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_syntax() {
        let c = parse("https://git.example.com/org/app.git#main:App");
        assert_eq!(c.url(), "https://git.example.com/org/app.git");
        assert_eq!(c.reference(), Some("main"));
        assert_eq!(c.subdir(), Some("App"));
        assert_eq!(c.ref_kind(), RefKind::Name("main"));
        assert_eq!(
            c.to_string(),
            "https://git.example.com/org/app.git#main:App"
        );

        let c = parse("https://altinn.studio/repos/ttd/app");
        assert_eq!(c.reference(), None);
        assert_eq!(c.subdir(), None);
        assert_eq!(c.ref_kind(), RefKind::Head);

        let c = parse("git+https://Host.Example:443/org/app.git/#:/sub//dir/");
        assert_eq!(c.url(), "https://host.example/org/app.git");
        assert_eq!(c.reference(), None);
        assert_eq!(c.subdir(), Some("sub/dir"));

        let id = "0123456789abcdef0123456789abcdef01234567";
        let c = parse(&format!("https://h/o/r.git#{id}"));
        assert_eq!(c.ref_kind(), RefKind::Commit(id));
        assert_eq!(
            parse("https://h/o/r.git#abc1234").ref_kind(),
            RefKind::Name("abc1234")
        );
        assert_eq!(
            parse("https://h/o/r.git#refs/pull/1/head").reference(),
            Some("refs/pull/1/head")
        );
    }

    #[test]
    fn token_in_user_part_is_extracted() {
        let c = parse("https://s3cr3t@host/repos/org/app");
        assert_eq!(c.token().map(Secret::expose), Some("s3cr3t"));
        assert_eq!(c.url(), "https://host/repos/org/app");
        assert!(!format!("{c:?} {c}").contains("s3cr3t"));

        let c = parse("https://oauth2:p%40ss@host/org/app.git#v1");
        assert_eq!(c.token().map(Secret::expose), Some("p@ss"));
        assert_eq!(c.url(), "https://host/org/app.git");
    }

    #[test]
    fn rejections() {
        for bad in [
            "http://git.example.com/org/app.git",
            "ssh://git@host/org/app.git",
            "git://host/org/app.git",
            "https://host/org/app.git#main:../etc",
            "https://host/org/app.git#-main",
            "https://host/org/app.git#a..b",
            "https://host",
        ] {
            assert!(
                bad.parse::<GitContext>().is_err(),
                "{bad} should be rejected"
            );
        }
        assert!(
            "http://127.0.0.1:8080/org/app.git"
                .parse::<GitContext>()
                .is_ok()
        );
        assert!("http://localhost/org/app.git".parse::<GitContext>().is_ok());
        let err = "http://tok3n@example.com/org/app.git"
            .parse::<GitContext>()
            .expect_err("plain http to a remote host");
        assert!(!err.to_string().contains("tok3n"), "{err}");
    }

    #[test]
    fn detects_git_contexts() {
        for yes in [
            "https://host/org/app.git",
            "https://host/org/app.git#main:App",
            "http://127.0.0.1:3000/org/app.git/",
            "git+https://host/org/app",
            "https://altinn.studio/repos/ttd/app",
            "https://altinn.studio/repos/ttd/app#main",
        ] {
            assert!(is_git_context(yes), "{yes}");
        }
        for no in [
            ".",
            "./app.git",
            "https://host/context.tar.gz",
            "https://host/org/app",
            "https://host/repos/ttd",
            "ftp://host/org/app.git",
        ] {
            assert!(!is_git_context(no), "{no}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("https://tok@host/x"),
            "https://<redacted>@host/x"
        );
        assert_eq!(redact_url("https://host/x@y"), "https://host/x@y");
    }
}
