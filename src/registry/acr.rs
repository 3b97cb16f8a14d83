//! Azure Container Registry credentials from Microsoft Entra, in-process (no helper binary),
//! following Microsoft's documented protocol
//! (<https://github.com/Azure/acr/blob/main/docs/AAD-OAuth.md>):
//!
//! 1. an Entra access token for `https://containerregistry.azure.net/.default`, read from a
//!    file or obtained with AKS workload identity's client-assertion grant
//!    (<https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow#third-case-access-token-request-with-a-federated-credential>);
//! 2. `POST https://<registry>/oauth2/exchange` (`grant_type=access_token`) → an ACR refresh
//!    token, handed to the registry client as [`Credential::IdentityToken`]; the client then does
//!    the ordinary `grant_type=refresh_token` token request itself.
//!
//! Both tokens are cached and renewed five minutes before they expire, so long pushes keep
//! working.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::Value;
use url::Url;

use super::config::{CredentialError, normalize_registry};
use super::credential::{Anonymous, Credential, CredentialFuture, CredentialProvider, Secret};
use super::reference::is_loopback_host;

/// The scope of an Entra token good for any ACR's `/oauth2/exchange` (public cloud).
const ACR_SCOPE: &str = "https://containerregistry.azure.net/.default";
/// How long before expiry a token is renewed.
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Assumed lifetime of an ACR refresh token that is not a readable JWT.
const ACR_REFRESH_LIFETIME: Duration = Duration::from_secs(3 * 60 * 60);
/// Token responses are small; anything bigger is not one.
const MAX_RESPONSE: usize = 64 * 1024;

/// AKS workload identity, from the values the webhook injects as environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// `AZURE_CLIENT_ID`: the application (managed identity) to act as.
    pub client_id: String,
    /// `AZURE_TENANT_ID`.
    pub tenant_id: String,
    /// `AZURE_FEDERATED_TOKEN_FILE`: the projected service-account token, re-read for every
    /// token request (the kubelet rotates it).
    pub federated_token_file: PathBuf,
    /// `AZURE_AUTHORITY_HOST`, ending in `/`.
    authority_host: Url,
}

impl WorkloadIdentity {
    /// Entra's public-cloud authority, used when `AZURE_AUTHORITY_HOST` is not set.
    pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";

    /// A workload identity; `authority_host` defaults to [`Self::DEFAULT_AUTHORITY_HOST`] and
    /// must be https (plain http only to a loopback host).
    pub fn new(
        client_id: impl Into<String>,
        tenant_id: impl Into<String>,
        federated_token_file: impl Into<PathBuf>,
        authority_host: Option<&str>,
    ) -> Result<WorkloadIdentity, CredentialError> {
        let tenant_id = tenant_id.into();
        let client_id = client_id.into();
        if client_id.is_empty() {
            return Err(CredentialError::MissingSetting("AZURE_CLIENT_ID"));
        }
        if tenant_id.is_empty()
            || !tenant_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(CredentialError::MissingSetting("a valid AZURE_TENANT_ID"));
        }
        let raw = authority_host
            .filter(|s| !s.is_empty())
            .unwrap_or(Self::DEFAULT_AUTHORITY_HOST);
        let with_slash = if raw.ends_with('/') {
            raw.to_string()
        } else {
            format!("{raw}/")
        };
        let bad = |problem| CredentialError::Url {
            url: raw.to_string(),
            problem,
        };
        let authority_host = Url::parse(&with_slash).map_err(|_| bad("not a url"))?;
        check_scheme(&authority_host).map_err(bad)?;
        Ok(WorkloadIdentity {
            client_id,
            tenant_id,
            federated_token_file: federated_token_file.into(),
            authority_host,
        })
    }

    /// From the environment as the CLI reads it (`lookup` is e.g. `|k| std::env::var(k).ok()`):
    /// `None` when neither `AZURE_CLIENT_ID` nor `AZURE_FEDERATED_TOKEN_FILE` is set, an error
    /// naming the missing variable when only some are.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<WorkloadIdentity>, CredentialError> {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        let (client, file) = (get("AZURE_CLIENT_ID"), get("AZURE_FEDERATED_TOKEN_FILE"));
        if client.is_none() && file.is_none() {
            return Ok(None);
        }
        let client = client.ok_or(CredentialError::MissingSetting("AZURE_CLIENT_ID"))?;
        let file = file.ok_or(CredentialError::MissingSetting(
            "AZURE_FEDERATED_TOKEN_FILE",
        ))?;
        let tenant =
            get("AZURE_TENANT_ID").ok_or(CredentialError::MissingSetting("AZURE_TENANT_ID"))?;
        let authority = get("AZURE_AUTHORITY_HOST");
        WorkloadIdentity::new(client, tenant, file, authority.as_deref()).map(Some)
    }

    /// The authority host (`AZURE_AUTHORITY_HOST`), ending in `/`.
    pub fn authority_host(&self) -> &Url {
        &self.authority_host
    }

    fn token_url(&self) -> Result<Url, CredentialError> {
        self.authority_host
            .join(&format!("{}/oauth2/v2.0/token", self.tenant_id))
            .map_err(|_| CredentialError::Url {
                url: self.authority_host.to_string(),
                problem: "cannot form the token endpoint",
            })
    }
}

/// Where the Entra access token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AadSource {
    /// A file holding an Entra access token (`--aad-token-file`), re-read whenever a new ACR
    /// refresh token is needed so an outside process can keep it fresh.
    TokenFile(PathBuf),
    /// AKS workload identity: a client-assertion grant with the federated token.
    WorkloadIdentity(WorkloadIdentity),
}

#[derive(Clone)]
struct Cached {
    token: Secret,
    renew_at: SystemTime,
}

#[derive(Default)]
struct Cache {
    entra: Option<Cached>,
    refresh: HashMap<String, Cached>,
}

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A [`CredentialProvider`] answering for Azure Container Registries with an ACR refresh token
/// exchanged for an Entra token, and delegating every other registry to a fallback provider.
pub struct AcrProvider {
    source: AadSource,
    registries: Vec<String>,
    fallback: Arc<dyn CredentialProvider>,
    http: reqwest::Client,
    plain_http_loopback: bool,
    clock: Clock,
    cache: tokio::sync::Mutex<Cache>,
}

impl fmt::Debug for AcrProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcrProvider")
            .field("source", &self.source)
            .field("registries", &self.registries)
            .field("plain_http_loopback", &self.plain_http_loopback)
            .finish_non_exhaustive()
    }
}

impl AcrProvider {
    /// A provider for `*.azurecr.io` with anonymous access elsewhere; see the builder methods.
    pub fn new(source: AadSource) -> Result<AcrProvider, CredentialError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(60))
            // A redirected POST could carry a token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(CredentialError::Client)?;
        Ok(AcrProvider {
            source,
            registries: vec!["*.azurecr.io".to_string()],
            fallback: Arc::new(Anonymous),
            http,
            plain_http_loopback: false,
            clock: Arc::new(SystemTime::now),
            cache: tokio::sync::Mutex::new(Cache::default()),
        })
    }

    /// The registries to answer for: exact `host[:port]`s or `*.suffix` wildcards.
    pub fn registries<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.registries = patterns
            .into_iter()
            .map(|p| p.into().to_ascii_lowercase())
            .collect();
        self
    }

    /// Who answers for every other registry (e.g. a
    /// [`CredentialStore`](super::CredentialStore)).
    pub fn fallback(mut self, inner: Arc<dyn CredentialProvider>) -> Self {
        self.fallback = inner;
        self
    }

    /// Talk plain HTTP to loopback registries (tests, a local mirror); others stay https.
    pub fn plain_http_loopback(mut self, yes: bool) -> Self {
        self.plain_http_loopback = yes;
        self
    }

    /// The clock token expiry is judged by (tests).
    pub fn clock(mut self, now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(now);
        self
    }

    /// Whether `registry` is one this provider answers for.
    pub fn handles(&self, registry: &str) -> bool {
        let registry = normalize_registry(registry);
        let host = match registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => registry.as_str(),
        };
        self.registries.iter().any(|p| match p.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => {
                host.len() > suffix.len() && host.ends_with(suffix)
            }
            _ => *p == registry,
        })
    }

    /// Drop the cached tokens for `registry` (say, after the registry rejected the refresh
    /// token) so the next lookup exchanges afresh.
    pub async fn forget(&self, registry: &str) {
        let mut cache = self.cache.lock().await;
        cache.refresh.remove(&normalize_registry(registry));
        cache.entra = None;
    }

    /// The ACR refresh token for `registry`, from the cache while it has more than five
    /// minutes to live, else freshly exchanged.
    pub async fn refresh_token(&self, registry: &str) -> Result<Secret, CredentialError> {
        let registry = normalize_registry(registry);
        // Held across the exchange: concurrent lookups wait for one exchange, not race.
        let mut cache = self.cache.lock().await;
        let now = (self.clock)();
        if let Some(c) = cache.refresh.get(&registry)
            && now < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let (entra, tenant) = self.entra_token(&mut cache, now).await?;
        let token = self.exchange(&registry, &entra, tenant.as_deref()).await?;
        let expires = jwt_claims(token.expose())
            .and_then(|c| c.exp)
            .map(|exp| UNIX_EPOCH + Duration::from_secs(exp))
            .unwrap_or(now + ACR_REFRESH_LIFETIME);
        tracing::debug!(%registry, "exchanged an entra token for an acr refresh token");
        cache.refresh.insert(
            registry,
            Cached {
                token: token.clone(),
                renew_at: renew_at(expires),
            },
        );
        Ok(token)
    }

    /// The Entra access token and the tenant, when known.
    async fn entra_token(
        &self,
        cache: &mut Cache,
        now: SystemTime,
    ) -> Result<(Secret, Option<String>), CredentialError> {
        let wi = match &self.source {
            AadSource::TokenFile(path) => {
                let token = read_token_file(path, |path, source| CredentialError::TokenFile {
                    path,
                    source,
                })
                .await?;
                let tenant = jwt_claims(token.expose()).and_then(|c| c.tid);
                return Ok((token, tenant));
            }
            AadSource::WorkloadIdentity(wi) => wi,
        };
        let tenant = Some(wi.tenant_id.clone());
        if let Some(c) = &cache.entra
            && now < c.renew_at
        {
            return Ok((c.token.clone(), tenant));
        }
        let assertion = read_token_file(&wi.federated_token_file, |path, source| {
            CredentialError::FederatedTokenFile { path, source }
        })
        .await?;
        let url = wi.token_url()?;
        let answer = self
            .post_form(
                &url,
                &[
                    ("client_id", wi.client_id.as_str()),
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.expose()),
                    ("scope", ACR_SCOPE),
                ],
                &[assertion.expose()],
            )
            .await?;
        let token = string_field(&answer, "access_token", &url)?;
        let expires_in = match answer.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(0);
        tracing::debug!(expires_in, "got an entra token with workload identity");
        cache.entra = Some(Cached {
            token: token.clone(),
            renew_at: renew_at(now + Duration::from_secs(expires_in)),
        });
        Ok((token, tenant))
    }

    async fn exchange(
        &self,
        registry: &str,
        entra: &Secret,
        tenant: Option<&str>,
    ) -> Result<Secret, CredentialError> {
        let scheme = if self.plain_http_loopback && is_loopback_host(registry) {
            "http"
        } else {
            "https"
        };
        let raw = format!("{scheme}://{registry}/oauth2/exchange");
        let url = Url::parse(&raw).map_err(|_| CredentialError::Url {
            url: raw.clone(),
            problem: "not a registry host",
        })?;
        let mut form = vec![
            ("grant_type", "access_token"),
            ("service", registry),
            ("access_token", entra.expose()),
        ];
        if let Some(t) = tenant {
            form.push(("tenant", t));
        }
        let answer = self.post_form(&url, &form, &[entra.expose()]).await?;
        string_field(&answer, "refresh_token", &url)
    }

    /// POST a form, return the JSON answer. `secrets` are scrubbed from any error text.
    async fn post_form(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        secrets: &[&str],
    ) -> Result<Value, CredentialError> {
        check_scheme(url).map_err(|problem| CredentialError::Url {
            url: url.to_string(),
            problem,
        })?;
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let http_err = |e: reqwest::Error| CredentialError::Http {
            url: url.to_string(),
            source: e.without_url(),
        };
        let mut resp = self
            .http
            .post(url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(http_err)?;
        let status = resp.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
            if bytes.len() + chunk.len() > MAX_RESPONSE {
                return Err(CredentialError::TokenResponse {
                    url: url.to_string(),
                    problem: "response too large",
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(CredentialError::TokenRefused {
                url: url.to_string(),
                status: status.as_u16(),
                reason: refusal_reason(&bytes, secrets),
            });
        }
        serde_json::from_slice(&bytes).map_err(|_| CredentialError::TokenResponse {
            url: url.to_string(),
            problem: "not json",
        })
    }
}

impl CredentialProvider for AcrProvider {
    fn credential<'a>(&'a self, registry: &'a str) -> CredentialFuture<'a> {
        Box::pin(async move {
            if !self.handles(registry) {
                return self.fallback.credential(registry).await;
            }
            let token = self.refresh_token(registry).await?;
            Ok(Some(Credential::IdentityToken(token)))
        })
    }
}

fn renew_at(expires: SystemTime) -> SystemTime {
    expires.checked_sub(RENEW_BEFORE).unwrap_or(UNIX_EPOCH)
}

/// https, or plain http to a loopback host only.
fn check_scheme(url: &Url) -> Result<(), &'static str> {
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or("");
            if is_loopback_host(host) {
                Ok(())
            } else {
                Err("plain http is only allowed to loopback hosts")
            }
        }
        _ => Err("scheme must be https"),
    }
}

async fn read_token_file(
    path: &Path,
    err: impl Fn(PathBuf, std::io::Error) -> CredentialError,
) -> Result<Secret, CredentialError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| err(path.to_path_buf(), e))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CredentialError::EmptyTokenFile {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(token))
}

fn string_field(answer: &Value, field: &'static str, url: &Url) -> Result<Secret, CredentialError> {
    match answer.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(Secret::new(s.as_str())),
        _ => Err(CredentialError::TokenResponse {
            url: url.to_string(),
            problem: match field {
                "access_token" => "no access_token",
                _ => "no refresh_token",
            },
        }),
    }
}

/// The endpoint's own error code and description (Entra's `error`/`error_description`, ACR's
/// `errors[].code`/`message`), one line, bounded, with anything we sent scrubbed out. A body
/// that is not such JSON is not echoed at all.
fn refusal_reason(body: &[u8], secrets: &[&str]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return "no error description".to_string();
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let (code, desc) = match v.get("errors").and_then(|e| e.get(0)) {
        Some(e) => (text(e.get("code")), text(e.get("message"))),
        None => (text(v.get("error")), text(v.get("error_description"))),
    };
    let mut reason = match (code.is_empty(), desc.is_empty()) {
        (true, true) => return "no error description".to_string(),
        (false, true) => code,
        (true, false) => desc,
        (false, false) => format!("{code}: {desc}"),
    };
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        reason = reason.replace(s, "<redacted>");
    }
    let one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect();
    one_line
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    tid: Option<String>,
}

/// The payload of a JWT (`header.payload.signature`), unverified: we only read expiry and
/// tenant hints from tokens we were handed by the issuer.
fn jwt_claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    serde_json::from_slice(&engine.decode(payload).ok()?).ok()
}
