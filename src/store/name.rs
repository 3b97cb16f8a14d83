//! Image names as Docker spells them: `[host[:port]/]path[:tag][@sha256:…]`, per the grammar of
//! distribution's `reference` package. Local names default to the tag `latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// A malformed image name.
#[derive(Debug, thiserror::Error)]
#[error("invalid image name {name:?}: {why}")]
pub struct NameError {
    /// The name as given.
    pub name: String,
    /// What is wrong.
    pub why: String,
}

/// `name:tag`, optionally pinned by digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageName {
    /// Repository including any registry host (`registry.example:5000/org/app`).
    pub repository: String,
    /// Tag (`latest` when not given).
    pub tag: String,
    /// Digest after `@`, if given.
    pub digest: Option<Digest>,
}

fn component_ok(c: &str) -> bool {
    // [a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*
    if c.is_empty() {
        return false;
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn domain_ok(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    if host.starts_with('[') && host.ends_with(']') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn tag_ok(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

impl FromStr for ImageName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<ImageName, NameError> {
        let err = |why: &str| NameError {
            name: s.to_string(),
            why: why.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty name"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(d.parse::<Digest>().map_err(|e| err(&e.to_string()))?),
            ),
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag
            && !tag_ok(t)
        {
            return Err(err(
                "a tag is 1-128 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'",
            ));
        }
        let mut parts: Vec<&str> = repository.split('/').collect();
        if parts.len() > 1 {
            let first = parts[0];
            if first.contains('.') || first.contains(':') || first == "localhost" {
                if !domain_ok(first) {
                    return Err(err(&format!("{first:?} is not a valid registry host")));
                }
                parts.remove(0);
            }
        }
        for p in &parts {
            if !component_ok(p) {
                return Err(err(&format!(
                    "repository path component {p:?} must be lowercase letters and digits, \
                     separated by '.', '_', '__' or '-'"
                )));
            }
        }
        if repository.len() > 255 {
            return Err(err("repository name longer than 255 characters"));
        }
        Ok(ImageName {
            repository: repository.to_string(),
            tag: tag.unwrap_or("latest").to_string(),
            digest,
        })
    }
}

impl fmt::Display for ImageName {
    /// `repository:tag` (the digest, if any, is not part of a local name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_like_docker() {
        let n: ImageName = "sample".parse().unwrap();
        assert_eq!(n.to_string(), "sample:latest");
        let n: ImageName = "localhost:5000/org/app:v1.2".parse().unwrap();
        assert_eq!(
            (n.repository.as_str(), n.tag.as_str()),
            ("localhost:5000/org/app", "v1.2")
        );
        let n: ImageName = "ttdaltinnregistry01.azurecr.io/ttd-app:abc_1"
            .parse()
            .unwrap();
        assert_eq!(n.tag, "abc_1");
        let d = Digest::of(b"");
        let n: ImageName = format!("app:1@{d}").parse().unwrap();
        assert_eq!(n.digest, Some(d));
    }

    #[test]
    fn bad_names_say_why() {
        for bad in [
            "",
            "UPPER",
            "app:",
            "app:-x",
            "a//b",
            "app@sha256:12",
            "-app",
            "a..b",
        ] {
            let e = bad.parse::<ImageName>().unwrap_err();
            assert!(e.to_string().contains("invalid image name"), "{bad}: {e}");
        }
    }
}
