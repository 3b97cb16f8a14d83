//! The distribution client: one authenticated, retrying request path and the manifest, tag
//! and blob-existence endpoints of the spec
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#endpoints>).
//! Blob transfers live in [`super::fetch`] and [`super::upload`].

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, LINK, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use tokio::sync::Semaphore;
use url::Url;

use super::auth::{Authenticator, Scopes};
use super::credential::CredentialProvider;
use super::error::{RegistryError, parse_error_body, redact};
use super::reference::Reference;
use super::retry::{self, RetryPolicy};
use super::transport::{self, ClientOptions, ProgressFn, SchemePolicy, TransferEvent};
use crate::digest::{Digest, DigestError};
use crate::media::{Descriptor, MediaType};

/// Manifests larger than this are refused (the distribution registry's own limit is 4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;
/// Tag list pages larger than this are refused.
const MAX_TAGS_PAGE: usize = 16 * 1024 * 1024;
/// Error bodies are read up to this size.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Pages of a tag listing followed at most.
const MAX_TAG_PAGES: usize = 10_000;

/// The manifest media types strata accepts, most preferred first.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// A manifest as the registry sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestResponse {
    /// The raw bytes (their sha256 is the digest).
    pub bytes: Bytes,
    /// The media type (from `Content-Type`, else the manifest's `mediaType`).
    pub media_type: MediaType,
    /// sha256 of `bytes`, verified against the reference and `Docker-Content-Digest`.
    pub digest: Digest,
}

impl ManifestResponse {
    /// A descriptor of this manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest,
            self.bytes.len() as u64,
        )
    }
}

pub(crate) struct Inner {
    pub(crate) http: super::transport::LazyHttp,
    pub(crate) opts: ClientOptions,
    pub(crate) retry: RetryPolicy,
    pub(crate) once: RetryPolicy,
    pub(crate) scheme: SchemePolicy,
    pub(crate) auth: Authenticator,
    pub(crate) permits: Semaphore,
}

/// A registry client: cheap to clone, shared connection pool, token cache and transfer
/// limit.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    progress: Option<ProgressFn>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("options", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client with `opts`, asking `credentials` for each registry's credential.
    pub fn new(
        opts: ClientOptions,
        credentials: Arc<dyn CredentialProvider>,
    ) -> Result<Client, RegistryError> {
        if opts.chunk_size == 0 || opts.parallelism == 0 {
            return Err(RegistryError::Setup {
                msg: "chunk size and parallelism must be at least 1".into(),
                source: None,
            });
        }
        let scheme = SchemePolicy::new(&opts.insecure_registries);
        let http = transport::http_client(&opts, &scheme)?;
        let retry = RetryPolicy::from_options(&opts);
        let once = RetryPolicy {
            max_attempts: 1,
            ..retry
        };
        let auth = Authenticator::new(credentials, http.clone(), retry, scheme.clone());
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                permits: Semaphore::new(opts.parallelism),
                opts,
                retry,
                once,
                scheme,
                auth,
            }),
            progress: None,
        })
    }

    /// This client reporting transfers to `progress`.
    pub fn with_progress(mut self, progress: ProgressFn) -> Client {
        self.progress = Some(progress);
        self
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    pub(crate) fn emit(&self, event: TransferEvent) {
        if let Some(p) = &self.progress {
            p(event);
        }
    }

    /// Decide, once per loopback host, whether it speaks TLS (see `SchemePolicy`).
    pub(crate) async fn ensure_scheme(&self, r: &Reference) {
        let host = r.api_host();
        if !self.inner.scheme.needs_probe(host) {
            return;
        }
        let Ok(http) = self.inner.http.client() else {
            // The request that follows reports why there is no client.
            return;
        };
        let probe = http
            .get(format!("https://{host}/v2/"))
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await;
        let scheme = match probe {
            Ok(_) => "https",
            Err(e) if speaks_tls(&e) => "https",
            Err(_) => "http",
        };
        tracing::debug!(host, scheme, "probed loopback registry");
        self.inner.scheme.set_probed(host, scheme);
    }

    /// `<scheme>://<api host>/v2/<repository>/<rest>`.
    pub(crate) fn url(&self, r: &Reference, rest: &str) -> Result<Url, RegistryError> {
        let host = r.api_host();
        let text = format!(
            "{}://{host}/v2/{}/{rest}",
            self.inner.scheme.scheme(host),
            r.repository
        );
        Url::parse(&text).map_err(|e| RegistryError::Protocol {
            url: format!("{host}/v2/{}", r.repository),
            msg: format!("cannot form a url: {e}"),
        })
    }

    /// Resolve a `Location` header against the request URL, refusing plain-HTTP downgrades.
    pub(crate) fn location(&self, resp: &Response) -> Result<Url, RegistryError> {
        let base = resp.url();
        let loc = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                url: redact(base),
                msg: format!("{} response without a Location header", resp.status()),
            })?;
        let url = base.join(loc).map_err(|e| RegistryError::Protocol {
            url: redact(base),
            msg: format!("invalid Location header: {e}"),
        })?;
        self.inner.scheme.check(&url)?;
        Ok(url)
    }

    /// Send one request with authentication and retries; `decorate` adds headers and body
    /// to a fresh builder for every attempt. A 401 triggers (re-)authentication once: a
    /// cached token that expired mid-operation is dropped and replaced here.
    pub(crate) async fn send(
        &self,
        r: &Reference,
        scopes: &Scopes,
        method: Method,
        url: &Url,
        retrying: bool,
        decorate: &(dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Sync),
    ) -> Result<Response, RegistryError> {
        let registry = r.registry.as_str();
        // URLs are formed before a loopback host's scheme is known; settle it here, once.
        self.ensure_scheme(r).await;
        let mut url = url.clone();
        if transport::host_port(&url) == r.api_host() {
            let want = self.inner.scheme.scheme(r.api_host());
            if url.scheme() != want {
                let _ = url.set_scheme(want);
            }
        }
        let url = &url;
        let policy = if retrying {
            &self.inner.retry
        } else {
            &self.inner.once
        };
        // A fresh token refused once is not yet proof of bad credentials: if the request was
        // retried after a dropped connection, the token may have expired during the backoff
        // (short-lived tokens). A second fresh token refused is final.
        let mut fresh_tokens = 0u8;
        let http = self.inner.http.client()?;
        loop {
            let auth = self.inner.auth.header(registry, scopes).await?;
            let resp = retry::send(policy, &method, url, || {
                let rb = decorate(http.request(method.clone(), url.clone()));
                match &auth {
                    Some(h) => rb.header(AUTHORIZATION, h.clone()),
                    None => rb,
                }
            })
            .await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if fresh_tokens == 2 {
                self.inner.auth.forget(registry, scopes);
                return Err(self.inner.auth.refused(registry, scopes));
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            tracing::debug!(registry, url = %redact(url), had_auth = auth.is_some(), "401, authenticating");
            self.inner
                .auth
                .challenged(registry, scopes, challenge.as_deref())
                .await?;
            fresh_tokens += 1;
        }
    }

    /// Check that the credentials for `registry` are accepted, as `docker login` does: `GET
    /// /v2/`, authenticating as the registry asks (a token with no scope for Bearer).
    pub async fn check_login(&self, registry: &str) -> Result<(), RegistryError> {
        let r: Reference =
            format!("{registry}/login-check")
                .parse()
                .map_err(|e: crate::store::NameError| RegistryError::Protocol {
                    url: registry.to_string(),
                    msg: e.to_string(),
                })?;
        let host = r.api_host();
        let text = format!("{}://{host}/v2/", self.inner.scheme.scheme(host));
        let url = Url::parse(&text).map_err(|e| RegistryError::Protocol {
            url: host.to_string(),
            msg: format!("cannot form a url: {e}"),
        })?;
        let resp = self
            .send(&r, &Scopes::none(), Method::GET, &url, true, &|rb| rb)
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(status_error(resp, &Method::GET, &url).await)
        }
    }

    /// Fetch a manifest by tag or digest, verifying its digest against the reference (when
    /// pinned) and the registry's `Docker-Content-Digest` (when sent). A body that breaks
    /// off or arrives wrong is fetched again (bounded), like any transient failure.
    pub async fn get_manifest(&self, r: &Reference) -> Result<ManifestResponse, RegistryError> {
        let attempts = self.inner.opts.max_attempts.max(1);
        let mut n = 0;
        loop {
            n += 1;
            match self.get_manifest_once(r).await {
                Err(e) if n < attempts && body_failure(&e) => {
                    tracing::debug!(reference = %r, error = %e, "manifest body failed; fetching again");
                    tokio::time::sleep(self.inner.opts.initial_backoff * n as u32).await;
                }
                other => return other,
            }
        }
    }

    async fn get_manifest_once(&self, r: &Reference) -> Result<ManifestResponse, RegistryError> {
        let url = self.url(r, &format!("manifests/{}", r.reference()))?;
        let resp = self
            .send(
                r,
                &Scopes::pull(&r.repository),
                Method::GET,
                &url,
                true,
                &|rb| rb.header(ACCEPT, MANIFEST_ACCEPT),
            )
            .await?;
        let resp = check(resp, &Method::GET, &url).await?;
        let header_type = content_type(resp.headers());
        let header_digest = content_digest(resp.headers());
        let bytes = read_limited(resp, MAX_MANIFEST_SIZE, &url).await?;
        let digest = Digest::of(&bytes);
        for expected in [r.digest, header_digest].into_iter().flatten() {
            if expected != digest {
                return Err(DigestError::Mismatch {
                    expected,
                    found: digest,
                }
                .into());
            }
        }
        let media_type = match header_type {
            Some(t) if is_manifest_type(&t) => t,
            _ => sniff_media_type(&bytes).ok_or_else(|| RegistryError::Protocol {
                url: redact(&url),
                msg: "the manifest has no recognisable media type".into(),
            })?,
        };
        Ok(ManifestResponse {
            bytes,
            media_type,
            digest,
        })
    }

    /// Describe a manifest without downloading it (HEAD); `None` if the registry has no such
    /// manifest. Falls back to GET when the registry omits the digest or size.
    pub async fn head_manifest(&self, r: &Reference) -> Result<Option<Descriptor>, RegistryError> {
        let url = self.url(r, &format!("manifests/{}", r.reference()))?;
        let resp = self
            .send(
                r,
                &Scopes::pull(&r.repository),
                Method::HEAD,
                &url,
                true,
                &|rb| rb.header(ACCEPT, MANIFEST_ACCEPT),
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = check(resp, &Method::HEAD, &url).await?;
        let h = resp.headers();
        let digest = content_digest(h).or(r.digest);
        match (digest, header_len(h), content_type(h)) {
            (Some(digest), Some(size), Some(t)) if is_manifest_type(&t) => {
                if let Some(pinned) = r.digest
                    && pinned != digest
                {
                    return Err(DigestError::Mismatch {
                        expected: pinned,
                        found: digest,
                    }
                    .into());
                }
                Ok(Some(Descriptor::new(t, digest, size)))
            }
            _ => Ok(Some(self.get_manifest(r).await?.descriptor())),
        }
    }

    /// Whether `repo`'s repository holds blob `digest` (HEAD); its size if so.
    pub async fn blob_exists(
        &self,
        repo: &Reference,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        self.blob_exists_in_scope(repo, digest, &Scopes::pull(&repo.repository))
            .await
    }

    pub(crate) async fn blob_exists_in_scope(
        &self,
        repo: &Reference,
        digest: &Digest,
        scopes: &Scopes,
    ) -> Result<Option<u64>, RegistryError> {
        let url = self.url(repo, &format!("blobs/{digest}"))?;
        let resp = self
            .send(repo, scopes, Method::HEAD, &url, true, &|rb| rb)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = check(resp, &Method::HEAD, &url).await?;
        Ok(Some(header_len(resp.headers()).unwrap_or(0)))
    }

    /// Mount blob `digest` from `from_repository` (same registry) into `target`'s
    /// repository. `true` if mounted; `false` if the registry declined (the upload session
    /// it opened instead is cancelled).
    pub async fn mount_blob(
        &self,
        target: &Reference,
        digest: &Digest,
        from_repository: &str,
    ) -> Result<bool, RegistryError> {
        let mut url = self.url(target, "blobs/uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from_repository);
        let scopes = Scopes::push(&target.repository).and(Scopes::pull(from_repository));
        let resp = self
            .send(target, &scopes, Method::POST, &url, true, &|rb| {
                rb.header(CONTENT_LENGTH, 0)
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED => {
                self.emit(TransferEvent::Mounted {
                    digest: *digest,
                    from: from_repository.to_string(),
                });
                Ok(true)
            }
            StatusCode::ACCEPTED => {
                if let Ok(session) = self.location(&resp) {
                    self.cancel_upload(target, &scopes, &session).await;
                }
                Ok(false)
            }
            _ => Err(status_error(resp, &Method::POST, &url).await),
        }
    }

    /// Abandon an upload session; failures only matter to the registry's garbage collector.
    pub(crate) async fn cancel_upload(&self, r: &Reference, scopes: &Scopes, session: &Url) {
        let result = self
            .send(r, scopes, Method::DELETE, session, false, &|rb| rb)
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "cancelling an upload session failed");
        }
    }

    /// Upload a manifest under `r`'s tag (or digest) and return its digest, checked against
    /// the registry's `Docker-Content-Digest`.
    pub async fn put_manifest(
        &self,
        r: &Reference,
        bytes: Bytes,
        media_type: &MediaType,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        if let Some(pinned) = r.digest
            && pinned != digest
        {
            return Err(DigestError::Mismatch {
                expected: pinned,
                found: digest,
            }
            .into());
        }
        let url = self.url(r, &format!("manifests/{}", r.reference()))?;
        let resp = self
            .send(
                r,
                &Scopes::push(&r.repository),
                Method::PUT,
                &url,
                true,
                &|rb| {
                    rb.header(CONTENT_TYPE, media_type.as_str())
                        .body(bytes.clone())
                },
            )
            .await?;
        let resp = check(resp, &Method::PUT, &url).await?;
        if let Some(sent) = content_digest(resp.headers())
            && sent != digest
        {
            return Err(DigestError::Mismatch {
                expected: digest,
                found: sent,
            }
            .into());
        }
        Ok(digest)
    }

    /// All tags of `r`'s repository, following `Link` pagination.
    pub async fn list_tags(&self, r: &Reference) -> Result<Vec<String>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let scopes = Scopes::pull(&r.repository);
        let mut url = self.url(r, "tags/list")?;
        let mut tags = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            let resp = self
                .send(r, &scopes, Method::GET, &url, true, &|rb| rb)
                .await?;
            let resp = check(resp, &Method::GET, &url).await?;
            let next = next_link(resp.headers(), resp.url())?;
            let body = read_limited(resp, MAX_TAGS_PAGE, &url).await?;
            let page: Page =
                serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
                    url: redact(&url),
                    msg: format!("tag list is not valid json: {e}"),
                })?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(n) => {
                    self.inner.scheme.check(&n)?;
                    url = n;
                }
                None => return Ok(tags),
            }
        }
        Err(RegistryError::Protocol {
            url: redact(&url),
            msg: format!("tag list has more than {MAX_TAG_PAGES} pages"),
        })
    }

    /// Delete the manifest `r` names (by digest when pinned, else by tag, which registries
    /// implementing distribution-spec 1.1 accept; distribution 2.x needs a digest).
    pub async fn delete_manifest(&self, r: &Reference) -> Result<(), RegistryError> {
        let url = self.url(r, &format!("manifests/{}", r.reference()))?;
        let scopes = Scopes::delete(&r.repository).and(Scopes::push(&r.repository));
        let resp = self
            .send(r, &scopes, Method::DELETE, &url, true, &|rb| rb)
            .await?;
        check(resp, &Method::DELETE, &url).await.map(|_| ())
    }
}

/// Pass 2xx responses through; turn anything else into [`RegistryError::Registry`].
pub(crate) async fn check(
    resp: Response,
    method: &Method,
    url: &Url,
) -> Result<Response, RegistryError> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(status_error(resp, method, url).await)
    }
}

/// A registry error from a response, with its distribution error body on one line.
/// Whether a manifest fetch failed in its body (broken off, truncated, or bytes that do not
/// match the digest the response announced), which a new request may fix.
fn body_failure(e: &RegistryError) -> bool {
    match e {
        RegistryError::Http { source, .. } => !super::error::is_certificate_error(source),
        RegistryError::Io(_) | RegistryError::Digest(_) => true,
        RegistryError::Protocol { msg, .. } => msg.contains("body") || msg.contains("truncat"),
        _ => false,
    }
}

/// Whether a failed HTTPS request reached a TLS server (it presented a certificate we did
/// not accept) rather than something that does not speak TLS at all.
fn speaks_tls(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(_)
            );
        }
        let text = s.to_string();
        if text.contains("certificate") || text.contains("UnknownIssuer") {
            return true;
        }
        source = s.source();
    }
    false
}

pub(crate) async fn status_error(resp: Response, method: &Method, url: &Url) -> RegistryError {
    let status = resp.status().as_u16();
    let body = if *method == Method::HEAD {
        Bytes::new()
    } else {
        read_limited(resp, MAX_ERROR_BODY, url)
            .await
            .unwrap_or_default()
    };
    let (code, message) = parse_error_body(&body);
    RegistryError::Registry {
        method: method.to_string(),
        url: redact(url),
        status,
        code,
        message,
    }
}

/// Read a whole body, refusing more than `max` bytes.
pub(crate) async fn read_limited(
    mut resp: Response,
    max: usize,
    url: &Url,
) -> Result<Bytes, RegistryError> {
    let too_big = || RegistryError::Protocol {
        url: redact(url),
        msg: format!("response body larger than {max} bytes"),
    };
    if header_len(resp.headers()).is_some_and(|n| n > max as u64) {
        return Err(too_big());
    }
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| retry::transport_error(&Method::GET, url, e))?
    {
        if out.len() + chunk.len() > max {
            return Err(too_big());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// `Content-Length` as sent (reqwest's own view of a HEAD body is 0).
pub(crate) fn header_len(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// `Docker-Content-Digest`, when it is a sha256 digest.
pub(crate) fn content_digest(h: &HeaderMap) -> Option<Digest> {
    let v = h.get("docker-content-digest")?.to_str().ok()?.trim();
    match v.parse() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::debug!(value = v, error = %e, "ignoring Docker-Content-Digest");
            None
        }
    }
}

fn content_type(h: &HeaderMap) -> Option<MediaType> {
    let v = h.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = v.split(';').next().unwrap_or(v).trim();
    Some(MediaType::from(essence))
}

fn is_manifest_type(t: &MediaType) -> bool {
    t.is_manifest() || t.is_index()
}

/// The media type of a manifest from its own `mediaType` field (or its shape).
fn sniff_media_type(bytes: &[u8]) -> Option<MediaType> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => Some(MediaType::from(m)),
        None if v.get("manifests").is_some() => Some(MediaType::OciIndex),
        None if v.get("layers").is_some() => Some(MediaType::OciManifest),
        None => None,
    }
}

/// The `rel="next"` target of a `Link` header, resolved against the request URL.
fn next_link(h: &HeaderMap, base: &Url) -> Result<Option<Url>, RegistryError> {
    for v in h.get_all(LINK) {
        let Ok(v) = v.to_str() else { continue };
        for link in v.split(',') {
            let mut parts = link.split(';');
            let target = parts.next().unwrap_or("").trim();
            let is_next = parts.any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            if is_next && target.starts_with('<') && target.ends_with('>') {
                let t = &target[1..target.len() - 1];
                return base.join(t).map(Some).map_err(|e| RegistryError::Protocol {
                    url: redact(base),
                    msg: format!("invalid Link header: {e}"),
                });
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            LINK,
            "</v2/a/tags/list?n=2&last=b>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        let base: Url = "http://localhost:5000/v2/a/tags/list".parse().unwrap();
        assert_eq!(
            next_link(&h, &base).unwrap().unwrap().as_str(),
            "http://localhost:5000/v2/a/tags/list?n=2&last=b"
        );
        assert_eq!(next_link(&HeaderMap::new(), &base).unwrap(), None);
    }

    #[test]
    fn media_types_sniffed() {
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#),
            Some(MediaType::OciIndex)
        );
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            Some(MediaType::DockerManifest)
        );
    }
}
