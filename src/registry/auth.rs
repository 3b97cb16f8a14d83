//! Registry authentication: `WWW-Authenticate` challenges (Basic and Bearer), the token
//! dance of the distribution token spec
//! (<https://distribution.github.io/distribution/spec/auth/token/>, and `grant_type=
//! refresh_token` from the OAuth2 variant), and a token cache per (registry, scope set).
//!
//! Secrets live in [`Secret`]s and sensitive header values; nothing here logs them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode};
use url::Url;

use super::credential::{Credential, CredentialProvider, Secret};
use super::error::{RegistryError, redact};
use super::retry::{self, RetryPolicy};
use super::transport::SchemePolicy;

/// Tokens are reused until this long before they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Lifetime of a token whose response gave none (the token spec's default).
const DEFAULT_EXPIRES_IN: u64 = 60;
/// Token responses are small; refuse anything huge.
const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;

/// A sorted, deduplicated set of token scopes (`repository:<repo>:pull,push`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Scopes(Vec<String>);

impl Scopes {
    /// No scope: what `docker login` asks for to check credentials.
    pub(crate) fn none() -> Scopes {
        Scopes(Vec::new())
    }

    /// `repository:<repo>:pull`.
    pub(crate) fn pull(repository: &str) -> Scopes {
        Scopes(vec![format!("repository:{repository}:pull")])
    }
    /// `repository:<repo>:pull,push`.
    pub(crate) fn push(repository: &str) -> Scopes {
        Scopes(vec![format!("repository:{repository}:pull,push")])
    }
    /// `repository:<repo>:delete`.
    pub(crate) fn delete(repository: &str) -> Scopes {
        Scopes(vec![format!("repository:{repository}:delete")])
    }
    /// This set plus `other`'s scopes.
    pub(crate) fn and(mut self, other: Scopes) -> Scopes {
        self.0.extend(other.0);
        self.0.sort();
        self.0.dedup();
        self
    }
    fn key(&self) -> String {
        self.0.join(" ")
    }
}

/// What a registry asked for in its `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP Basic with the registry credentials.
    Basic,
    /// A bearer token from `realm`.
    Bearer {
        realm: Url,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse a `WWW-Authenticate` value; Bearer wins when both are offered.
pub(crate) fn parse_challenge(value: &str) -> Result<Challenge, String> {
    let challenges = http_auth::parse_challenges(value).map_err(|e| e.to_string())?;
    let param = |c: &http_auth::ChallengeRef<'_>, name: &str| {
        c.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_unescaped())
    };
    if let Some(c) = challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
    {
        let realm = param(c, "realm").ok_or("bearer challenge without realm")?;
        let realm = Url::parse(&realm).map_err(|e| format!("bearer realm is not a url: {e}"))?;
        return Ok(Challenge::Bearer {
            realm,
            service: param(c, "service"),
            scope: param(c, "scope"),
        });
    }
    if challenges
        .iter()
        .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
    {
        return Ok(Challenge::Basic);
    }
    Err(format!(
        "unsupported authentication scheme(s): {}",
        challenges
            .iter()
            .map(|c| c.scheme)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

struct Token {
    value: Secret,
    usable_until: Instant,
}

#[derive(Default)]
struct RegistryState {
    challenge: Option<Challenge>,
    tokens: HashMap<String, Token>,
}

/// Credentials, challenges and tokens for every registry one client talks to.
pub(crate) struct Authenticator {
    credentials: Arc<dyn CredentialProvider>,
    http: super::transport::LazyHttp,
    retry: RetryPolicy,
    scheme: SchemePolicy,
    state: Mutex<HashMap<String, RegistryState>>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl Authenticator {
    pub(crate) fn new(
        credentials: Arc<dyn CredentialProvider>,
        http: super::transport::LazyHttp,
        retry: RetryPolicy,
        scheme: SchemePolicy,
    ) -> Authenticator {
        Authenticator {
            credentials,
            http,
            retry,
            scheme,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn with_state<T>(&self, registry: &str, f: impl FnOnce(&mut RegistryState) -> T) -> T {
        let mut all = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(all.entry(registry.to_string()).or_default())
    }

    async fn credential(&self, registry: &str) -> Result<Option<Credential>, RegistryError> {
        self.credentials
            .credential(registry)
            .await
            .map_err(|e| RegistryError::Auth {
                registry: registry.to_string(),
                msg: format!("looking up credentials failed: {e}"),
            })
    }

    /// The `Authorization` header to send for `scopes`, if the registry is known to want
    /// one: Basic credentials, a cached token, or a token fetched now because the realm is
    /// already known. `None` means: try anonymously.
    pub(crate) async fn header(
        &self,
        registry: &str,
        scopes: &Scopes,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let (challenge, cached) = self.with_state(registry, |s| {
            let cached = s
                .tokens
                .get(&scopes.key())
                .filter(|t| Instant::now() < t.usable_until)
                .map(|t| t.value.clone());
            (s.challenge.clone(), cached)
        });
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => match self.credential(registry).await? {
                Some(Credential::Basic { username, password }) => {
                    Ok(Some(basic_header(&username, &password)))
                }
                _ => Ok(None),
            },
            Some(Challenge::Bearer { .. }) => {
                let token = match cached {
                    Some(t) => t,
                    None => self.fetch_token(registry, scopes).await?,
                };
                Ok(Some(bearer_header(&token)))
            }
        }
    }

    /// React to a 401: remember the challenge, drop any cached token for `scopes`, and get
    /// a new one (Bearer) or check credentials exist (Basic).
    pub(crate) async fn challenged(
        &self,
        registry: &str,
        scopes: &Scopes,
        www_authenticate: Option<&str>,
    ) -> Result<(), RegistryError> {
        let value = www_authenticate.ok_or_else(|| RegistryError::Auth {
            registry: registry.to_string(),
            msg: "the registry answered 401 without a WWW-Authenticate challenge".into(),
        })?;
        let challenge = parse_challenge(value).map_err(|msg| RegistryError::Auth {
            registry: registry.to_string(),
            msg: format!("cannot parse the WWW-Authenticate challenge: {msg}"),
        })?;
        self.with_state(registry, |s| {
            s.tokens.remove(&scopes.key());
            s.challenge = Some(challenge.clone());
        });
        match challenge {
            Challenge::Basic => match self.credential(registry).await? {
                Some(Credential::Basic { .. }) => Ok(()),
                Some(Credential::IdentityToken(_)) => Err(RegistryError::Auth {
                    registry: registry.to_string(),
                    msg: "the registry wants a username and password, but only an identity token is configured".into(),
                }),
                None => Err(RegistryError::Auth {
                    registry: registry.to_string(),
                    msg: "the registry requires credentials and none are configured".into(),
                }),
            },
            Challenge::Bearer { .. } => self.fetch_token(registry, scopes).await.map(|_| ()),
        }
    }

    /// Forget the token for `scopes` (after it was refused).
    pub(crate) fn forget(&self, registry: &str, scopes: &Scopes) {
        self.with_state(registry, |s| {
            s.tokens.remove(&scopes.key());
        });
    }

    /// The error for a request still refused after fresh authentication.
    pub(crate) fn refused(&self, registry: &str, scopes: &Scopes) -> RegistryError {
        let challenge = self.with_state(registry, |s| s.challenge.clone());
        let msg = match challenge {
            Some(Challenge::Bearer { .. }) => format!(
                "the registry refused a fresh token for {} (401): check the credentials for {registry}",
                scopes.key()
            ),
            Some(Challenge::Basic) => format!(
                "the registry refused the credentials (401): check the credentials for {registry}"
            ),
            None => "the registry answered 401".to_string(),
        };
        RegistryError::Auth {
            registry: registry.to_string(),
            msg,
        }
    }

    async fn fetch_token(&self, registry: &str, scopes: &Scopes) -> Result<Secret, RegistryError> {
        let Some(Challenge::Bearer {
            realm,
            service,
            scope,
        }) = self.with_state(registry, |s| s.challenge.clone())
        else {
            return Err(RegistryError::Auth {
                registry: registry.to_string(),
                msg: "no bearer challenge to answer".into(),
            });
        };
        self.scheme.check(&realm)?;
        let mut wanted = scopes.clone();
        if let Some(s) = scope {
            wanted = wanted.and(Scopes(s.split(' ').map(str::to_string).collect()));
        }
        let credential = self.credential(registry).await?;
        let shown = redact(&realm);
        let (method, response) = match &credential {
            Some(Credential::IdentityToken(refresh)) => {
                // The serializer is not Send: finish it before the first await.
                let body = {
                    let mut form = url::form_urlencoded::Serializer::new(String::new());
                    form.append_pair("grant_type", "refresh_token");
                    if let Some(s) = &service {
                        form.append_pair("service", s);
                    }
                    form.append_pair("scope", &wanted.key());
                    form.append_pair("refresh_token", refresh.expose());
                    form.append_pair("client_id", "strata");
                    bytes::Bytes::from(form.finish())
                };
                let http = self.http.client()?;
                let r = retry::send(&self.retry, &Method::POST, &realm, || {
                    http.post(realm.clone())
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body.clone())
                })
                .await?;
                ("POST", r)
            }
            other => {
                let mut url = realm.clone();
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = &service {
                        q.append_pair("service", s);
                    }
                    for s in &wanted.0 {
                        q.append_pair("scope", s);
                    }
                }
                let basic = match other {
                    Some(Credential::Basic { username, password }) => {
                        Some(basic_header(username, password))
                    }
                    _ => None,
                };
                let http = self.http.client()?;
                let r = retry::send(&self.retry, &Method::GET, &url, || {
                    let rb = http.get(url.clone());
                    match &basic {
                        Some(h) => rb.header(AUTHORIZATION, h.clone()),
                        None => rb,
                    }
                })
                .await?;
                ("GET", r)
            }
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let hint = if credential.is_some() {
                format!("check the credentials for {registry}")
            } else {
                format!("no credentials are configured for {registry}; log in first")
            };
            return Err(RegistryError::Auth {
                registry: registry.to_string(),
                msg: format!(
                    "token request ({method}) to {shown} was refused ({}): {hint}",
                    status.as_u16()
                ),
            });
        }
        let body = super::client::read_limited(response, MAX_TOKEN_RESPONSE, &realm).await?;
        if !status.is_success() {
            let (_, text) = super::error::parse_error_body(&body);
            return Err(RegistryError::Auth {
                registry: registry.to_string(),
                msg: format!(
                    "token request ({method}) to {shown} failed ({}): {text}",
                    status.as_u16()
                ),
            });
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Auth {
                registry: registry.to_string(),
                msg: format!("token response from {shown} is not valid json: {e}"),
            })?;
        let value = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| RegistryError::Auth {
                registry: registry.to_string(),
                msg: format!("token response from {shown} holds no token"),
            })?;
        let value = Secret::new(value);
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(DEFAULT_EXPIRES_IN));
        let margin = EXPIRY_MARGIN.min(lifetime / 2);
        let usable_until = Instant::now() + lifetime - margin;
        tracing::debug!(registry, scopes = %scopes.key(), ?lifetime, "obtained registry token");
        self.with_state(registry, |s| {
            s.tokens.insert(
                scopes.key(),
                Token {
                    value: value.clone(),
                    usable_until,
                },
            );
        });
        Ok(value)
    }
}

fn basic_header(username: &str, password: &Secret) -> HeaderValue {
    let raw = base64::engine::general_purpose::STANDARD
        .encode(format!("{username}:{}", password.expose()));
    sensitive(format!("Basic {raw}"))
}

fn bearer_header(token: &Secret) -> HeaderValue {
    sensitive(format!("Bearer {}", token.expose()))
}

fn sensitive(s: String) -> HeaderValue {
    // Base64 and token characters are always valid header bytes; an invalid token (control
    // characters) degrades to an anonymous-looking empty value rather than a panic.
    let mut v = HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".parse().unwrap(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#).unwrap(),
            Challenge::Basic
        );
        assert!(parse_challenge(r#"Negotiate realm="x""#).is_err());
        assert!(parse_challenge(r#"Bearer service="x""#).is_err());
    }

    #[test]
    fn scopes_are_a_set() {
        let s = Scopes::push("a")
            .and(Scopes::pull("b"))
            .and(Scopes::push("a"));
        assert_eq!(s.key(), "repository:a:pull,push repository:b:pull");
    }

    #[test]
    fn auth_headers_are_sensitive() {
        let h = basic_header("u", &Secret::new("hunter2"));
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("aHVudGVy"));
    }
}
