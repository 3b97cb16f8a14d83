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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    const T0: u64 = 1_700_000_000;

    #[derive(Clone, Debug)]
    struct Req {
        path: String,
        form: HashMap<String, String>,
    }

    type Handler = dyn Fn(&Req, usize) -> (u16, String) + Send + Sync;

    /// A loopback HTTP/1.1 server answering each request with `handler(request, index)`.
    struct Server {
        base: String,
        requests: Arc<Mutex<Vec<Req>>>,
    }

    impl Server {
        fn start(handler: impl Fn(&Req, usize) -> (u16, String) + Send + Sync + 'static) -> Server {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let seen = requests.clone();
            let handler: Arc<Handler> = Arc::new(handler);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let form = url::form_urlencoded::parse(&body).into_owned().collect();
                    let req = Req { path, form };
                    let index = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(req.clone());
                        seen.len() - 1
                    };
                    let (status, body) = handler(&req, index);
                    let mut stream = reader.into_inner();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
            Server { base, requests }
        }

        fn requests(&self) -> Vec<Req> {
            self.requests.lock().unwrap().clone()
        }

        fn count(&self, path_end: &str) -> usize {
            self.requests()
                .iter()
                .filter(|r| r.path.ends_with(path_end))
                .count()
        }
    }

    fn jwt(claims: Value) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(r#"{"alg":"RS256"}"#),
            e.encode(claims.to_string())
        )
    }

    /// Entra at `/<tenant>/oauth2/v2.0/token`, ACR at `/oauth2/exchange`; tokens numbered by
    /// request so refreshes are visible.
    fn entra_and_acr(refresh_exp: Option<u64>) -> Server {
        Server::start(move |req, i| match req.path.as_str() {
            "/oauth2/exchange" => {
                let token = match refresh_exp {
                    Some(exp) => jwt(serde_json::json!({"exp": exp, "n": i})),
                    None => format!("acr-refresh-{i}"),
                };
                (200, serde_json::json!({"refresh_token": token}).to_string())
            }
            p if p.ends_with("/oauth2/v2.0/token") => (
                200,
                serde_json::json!({"token_type": "Bearer", "expires_in": 3599,
                                   "access_token": format!("entra-{i}")})
                .to_string(),
            ),
            _ => (404, "{}".into()),
        })
    }

    struct TestClock(Arc<AtomicU64>);

    impl TestClock {
        fn new() -> TestClock {
            TestClock(Arc::new(AtomicU64::new(T0)))
        }
        fn advance(&self, secs: u64) {
            self.0.fetch_add(secs, Ordering::SeqCst);
        }
        fn now(&self) -> impl Fn() -> SystemTime + Send + Sync + 'static {
            let t = self.0.clone();
            move || UNIX_EPOCH + Duration::from_secs(t.load(Ordering::SeqCst))
        }
    }

    fn workload(server: &Server, file: &Path) -> AadSource {
        AadSource::WorkloadIdentity(
            WorkloadIdentity::new(
                "client-id-1",
                "tenant-1",
                file,
                Some(&format!("http://{}", server.base)),
            )
            .unwrap(),
        )
    }

    fn provider(server: &Server, source: AadSource, clock: &TestClock) -> AcrProvider {
        AcrProvider::new(source)
            .unwrap()
            .registries(["*.azurecr.io", server.base.as_str()])
            .plain_http_loopback(true)
            .clock(clock.now())
    }

    #[tokio::test]
    async fn workload_identity_exchange_cached_and_renewed() {
        let server = entra_and_acr(Some(T0 + 3 * 3600));
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("azure-identity-token");
        std::fs::write(&fed, "federated-assertion-1\n").unwrap();
        let clock = TestClock::new();
        let p = provider(&server, workload(&server, &fed), &clock);

        let first = p.credential(&server.base).await.unwrap();
        let second = p.credential(&server.base).await.unwrap();
        assert_eq!(first, second);
        assert!(matches!(first, Some(Credential::IdentityToken(_))));
        let reqs = server.requests();
        assert_eq!(reqs.len(), 2, "{reqs:?}");
        let (token, exchange) = (&reqs[0], &reqs[1]);
        assert_eq!(token.path, "/tenant-1/oauth2/v2.0/token");
        for (k, v) in [
            ("client_id", "client-id-1"),
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", "federated-assertion-1"),
            ("scope", "https://containerregistry.azure.net/.default"),
        ] {
            assert_eq!(token.form.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(exchange.path, "/oauth2/exchange");
        for (k, v) in [
            ("grant_type", "access_token"),
            ("service", server.base.as_str()),
            ("access_token", "entra-0"),
            ("tenant", "tenant-1"),
        ] {
            assert_eq!(exchange.form.get(k).map(String::as_str), Some(v), "{k}");
        }

        // Within five minutes of the refresh token's exp: both tokens renewed, the rotated
        // federated token re-read.
        std::fs::write(&fed, "federated-assertion-2").unwrap();
        clock.advance(3 * 3600 - 4 * 60);
        let third = p.credential(&server.base).await.unwrap();
        assert_ne!(third, first);
        let reqs = server.requests();
        assert_eq!(reqs.len(), 4, "{reqs:?}");
        assert_eq!(reqs[2].form["client_assertion"], "federated-assertion-2");
        assert_eq!(reqs[3].form["access_token"], "entra-2");
    }

    #[tokio::test]
    async fn entra_token_reused_across_registries_until_it_expires() {
        let server = entra_and_acr(None);
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("fed");
        std::fs::write(&fed, "assertion").unwrap();
        let clock = TestClock::new();
        // "localhost:port" is a second name for the same loopback server.
        let other = server.base.replace("127.0.0.1", "localhost");
        let p = provider(&server, workload(&server, &fed), &clock)
            .registries([server.base.clone(), other.clone()]);
        p.refresh_token(&server.base).await.unwrap();
        p.refresh_token(&other).await.unwrap();
        assert_eq!(server.count("/v2.0/token"), 1);
        assert_eq!(server.count("/oauth2/exchange"), 2);
        // the entra token (3599 s) is stale after 55 min, the opaque refresh token (3 h) not
        clock.advance(56 * 60);
        p.refresh_token(&server.base).await.unwrap();
        assert_eq!(server.count("/oauth2/exchange"), 2);
        // an opaque refresh token is assumed to live 3 h
        clock.advance(2 * 3600);
        p.refresh_token(&server.base).await.unwrap();
        assert_eq!(server.count("/v2.0/token"), 2);
        assert_eq!(server.count("/oauth2/exchange"), 3);
        // forget() forces a new exchange
        p.forget(&server.base).await;
        p.refresh_token(&server.base).await.unwrap();
        assert_eq!(server.count("/oauth2/exchange"), 4);
    }

    #[tokio::test]
    async fn token_file_source_sends_the_file_and_its_tenant() {
        let server = entra_and_acr(None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aad-token");
        let entra = jwt(serde_json::json!({"tid": "tenant-from-token", "exp": T0 + 3600}));
        std::fs::write(&file, format!("{entra}\n")).unwrap();
        let clock = TestClock::new();
        let p = provider(&server, AadSource::TokenFile(file), &clock);
        let c = p.credential(&server.base).await.unwrap();
        assert_eq!(
            c,
            Some(Credential::IdentityToken(Secret::new("acr-refresh-0")))
        );
        let reqs = server.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].form["access_token"], entra);
        assert_eq!(reqs[0].form["tenant"], "tenant-from-token");
        assert_eq!(reqs[0].form["grant_type"], "access_token");
    }

    #[tokio::test]
    async fn other_registries_go_to_the_fallback() {
        let server = entra_and_acr(None);
        let clock = TestClock::new();
        let fixed = Credential::Basic {
            username: "u".into(),
            password: Secret::new("p"),
        };
        let p = provider(&server, AadSource::TokenFile("/nonexistent".into()), &clock)
            .fallback(Arc::new(super::super::credential::Fixed(fixed.clone())));
        assert!(p.handles("myorgaltinnregistry01.azurecr.io"));
        assert!(p.handles("MyOrg.AzureCR.io"));
        assert!(!p.handles("azurecr.io"));
        assert!(!p.handles("evil.azurecr.io.example.com"));
        assert!(!p.handles("docker.io"));
        assert_eq!(p.credential("ghcr.io").await.unwrap(), Some(fixed));
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn missing_or_empty_federated_token_file_is_named() {
        let server = entra_and_acr(None);
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let missing = dir.path().join("no-such-token");
        let p = provider(&server, workload(&server, &missing), &clock);
        let e = p.refresh_token(&server.base).await.unwrap_err();
        assert!(
            matches!(e, CredentialError::FederatedTokenFile { .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        assert!(e.to_string().contains("federated token file"), "{e}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let p = provider(&server, workload(&server, &empty), &clock);
        let e = p.refresh_token(&server.base).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("token file {} is empty", empty.display())
        );

        let p = provider(&server, AadSource::TokenFile(missing.clone()), &clock);
        let e = p.refresh_token(&server.base).await.unwrap_err();
        assert!(e.to_string().contains("entra token file"), "{e}");
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn refusals_are_explained_without_secrets() {
        // Entra refuses, echoing the assertion; ACR refuses, echoing the token.
        let server = Server::start(|req, _| match req.path.as_str() {
            "/oauth2/exchange" => (
                401,
                serde_json::json!({"errors": [{"code": "UNAUTHORIZED",
                    "message": format!("bad token {}", req.form["access_token"])}]})
                .to_string(),
            ),
            _ => (
                400,
                serde_json::json!({"error": "invalid_client",
                    "error_description": format!("AADSTS70021: No matching federated identity \
                        record found for presented assertion {}", req.form["client_assertion"])})
                .to_string(),
            ),
        });
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("fed");
        std::fs::write(&fed, "SECRET-ASSERTION").unwrap();
        let clock = TestClock::new();
        let p = provider(&server, workload(&server, &fed), &clock);
        let e = p.credential(&server.base).await.unwrap_err();
        let shown = format!("{e} | {e:?}");
        assert!(shown.contains("http 400"), "{shown}");
        assert!(shown.contains("invalid_client: AADSTS70021"), "{shown}");
        assert!(!shown.contains("SECRET-ASSERTION"), "{shown}");

        let tok = dir.path().join("tok");
        std::fs::write(&tok, "SECRET-ENTRA-TOKEN").unwrap();
        let p = provider(&server, AadSource::TokenFile(tok), &clock);
        let e = p.refresh_token(&server.base).await.unwrap_err();
        let shown = format!("{e} | {e:?} | {p:?}");
        assert!(shown.contains("http 401"), "{shown}");
        assert!(
            shown.contains("UNAUTHORIZED: bad token <redacted>"),
            "{shown}"
        );
        assert!(!shown.contains("SECRET-ENTRA-TOKEN"), "{shown}");
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        let server = Server::start(|req, _| match req.path.as_str() {
            "/oauth2/exchange" => (200, r#"{"access_token": "SECRET-WRONG-FIELD"}"#.into()),
            _ => (200, "<html>SECRET</html>".into()),
        });
        let dir = tempfile::tempdir().unwrap();
        let fed = dir.path().join("fed");
        std::fs::write(&fed, "a").unwrap();
        let clock = TestClock::new();
        let e = provider(&server, workload(&server, &fed), &clock)
            .refresh_token(&server.base)
            .await
            .unwrap_err();
        assert!(e.to_string().ends_with("not json"), "{e}");
        let e = provider(&server, AadSource::TokenFile(fed), &clock)
            .refresh_token(&server.base)
            .await
            .unwrap_err();
        assert!(e.to_string().ends_with("no refresh_token"), "{e}");
        assert!(!format!("{e:?}").contains("SECRET"));
    }

    #[test]
    fn authority_must_be_https_unless_loopback() {
        let ok = WorkloadIdentity::new("c", "t", "/f", None).unwrap();
        assert_eq!(
            ok.token_url().unwrap().as_str(),
            "https://login.microsoftonline.com/t/oauth2/v2.0/token"
        );
        let sov = WorkloadIdentity::new("c", "t", "/f", Some("https://login.microsoftonline.us"))
            .unwrap();
        assert_eq!(
            sov.token_url().unwrap().as_str(),
            "https://login.microsoftonline.us/t/oauth2/v2.0/token"
        );
        assert!(WorkloadIdentity::new("c", "t", "/f", Some("http://127.0.0.1:8080")).is_ok());
        let e =
            WorkloadIdentity::new("c", "t", "/f", Some("http://login.example.com/")).unwrap_err();
        assert!(e.to_string().contains("only allowed to loopback"), "{e}");
        assert!(WorkloadIdentity::new("c", "../x", "/f", None).is_err());
    }

    #[test]
    fn workload_identity_from_env() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(WorkloadIdentity::from_env(env(&[])).unwrap(), None);
        let full = WorkloadIdentity::from_env(env(&[
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(full.client_id, "c");
        let e =
            WorkloadIdentity::from_env(env(&[("AZURE_CLIENT_ID", "c"), ("AZURE_TENANT_ID", "t")]))
                .unwrap_err();
        assert_eq!(
            e.to_string(),
            "workload identity needs AZURE_FEDERATED_TOKEN_FILE to be set"
        );
    }

    #[test]
    fn jwt_payloads() {
        let t = jwt(serde_json::json!({"exp": 42, "tid": "x"}));
        let c = jwt_claims(&t).unwrap();
        assert_eq!((c.exp, c.tid.as_deref()), (Some(42), Some("x")));
        assert!(jwt_claims("opaque-token").is_none());
        assert!(jwt_claims("a.b.c.d").is_none());
    }
}
