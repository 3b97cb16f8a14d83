//! What the client needs from whoever knows the credentials: one lookup per registry.
//! Secrets are wrapped so they can never be printed by accident.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A secret string (password, token). `Debug` and `Display` print `<redacted>`; the value is
/// only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for putting on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A credential for one registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Username and password: HTTP Basic, or the Basic credentials of a token request.
    Basic {
        /// User name (not secret).
        username: String,
        /// Password or personal access token.
        password: Secret,
    },
    /// An OAuth2 refresh token (docker config's `identitytoken`, ACR's exchanged token):
    /// POSTed to the token realm with `grant_type=refresh_token`.
    IdentityToken(Secret),
}

/// Boxed error of a credential lookup.
pub type CredentialLookupError = Box<dyn std::error::Error + Send + Sync>;

/// The future a [`CredentialProvider`] returns.
pub type CredentialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Credential>, CredentialLookupError>> + Send + 'a>>;

/// Supplies credentials for a registry host (`host[:port]`, `docker.io` for Docker Hub).
pub trait CredentialProvider: Send + Sync {
    /// The credential for `registry`, or `None` for anonymous access.
    fn credential<'a>(&'a self, registry: &'a str) -> CredentialFuture<'a>;
}

/// No credentials: anonymous access everywhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct Anonymous;

impl CredentialProvider for Anonymous {
    fn credential<'a>(&'a self, _registry: &'a str) -> CredentialFuture<'a> {
        Box::pin(async { Ok(None) })
    }
}

/// A fixed credential for every registry (tests, `--creds`).
#[derive(Clone, Debug)]
pub struct Fixed(pub Credential);

impl CredentialProvider for Fixed {
    fn credential<'a>(&'a self, _registry: &'a str) -> CredentialFuture<'a> {
        let c = self.0.clone();
        Box::pin(async move { Ok(Some(c)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = Credential::Basic {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(Secret::new("x").to_string(), "<redacted>");
    }
}
