//! Options and the HTTP transport: reqwest over rustls with the platform's roots plus any
//! configured CA files, and the rule for when plain HTTP is allowed (loopback hosts and
//! registries listed as insecure, never anything else).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::error::RegistryError;
use super::reference::is_loopback_host;
use crate::digest::Digest;

/// How the client talks to registries.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP, like `--insecure-registry`.
    pub insecure_registries: Vec<String>,
    /// PEM files whose certificates are trusted as roots in addition to the system's.
    pub ca_files: Vec<PathBuf>,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for a connection staying idle while a response or body is awaited.
    pub read_timeout: Duration,
    /// Total time spent sleeping between attempts of one request before giving up.
    pub max_total_retry_time: Duration,
    /// Attempts per request (1 = no retries).
    pub max_attempts: usize,
    /// First backoff delay; later ones grow exponentially, with jitter.
    pub initial_backoff: Duration,
    /// Longest wait a `Retry-After` header may impose.
    pub max_retry_after: Duration,
    /// Largest PATCH of a chunked upload (raised to the registry's `OCI-Chunk-Min-Length`).
    pub chunk_size: u64,
    /// Blobs up to this size are uploaded in one PUT; larger ones in chunks.
    pub monolithic_threshold: u64,
    /// Blob transfers running at once through one client.
    pub parallelism: usize,
    /// The `User-Agent` header.
    pub user_agent: String,
}

const MIB: u64 = 1024 * 1024;

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            insecure_registries: Vec::new(),
            ca_files: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            max_total_retry_time: Duration::from_secs(120),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(60),
            chunk_size: 16 * MIB,
            monolithic_threshold: 16 * MIB,
            parallelism: 6,
            user_agent: concat!("strata/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Progress of one blob transfer, reported to the client's progress callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEvent {
    /// Bytes of a blob sent or received so far (may go back when a transfer restarts).
    Progress {
        /// Which blob.
        digest: Digest,
        /// Bytes done.
        done: u64,
        /// Bytes in the blob.
        total: u64,
    },
    /// The registry already had the blob; nothing was sent.
    Skipped {
        /// Which blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// The blob was mounted from another repository of the same registry.
    Mounted {
        /// Which blob.
        digest: Digest,
        /// The repository it came from.
        from: String,
    },
    /// The blob was transferred completely and verified.
    Finished {
        /// Which blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
}

/// The progress callback type.
pub type ProgressFn = Arc<dyn Fn(TransferEvent) + Send + Sync>;

/// Where plain HTTP may be used, and which scheme each host gets.
///
/// Hosts named with `--insecure-registry` get plain HTTP. Loopback hosts get whatever they
/// speak: the first request to one is preceded by a TLS probe (as docker does for
/// `localhost`), HTTPS when a TLS server answers — including when its certificate is not
/// trusted, so that error is reported rather than hidden — plain HTTP otherwise. Every other
/// host gets HTTPS.
#[derive(Clone, Debug)]
pub(crate) struct SchemePolicy {
    insecure: Vec<String>,
    probed: Arc<std::sync::Mutex<std::collections::HashMap<String, &'static str>>>,
}

impl SchemePolicy {
    pub(crate) fn new(insecure: &[String]) -> SchemePolicy {
        SchemePolicy {
            insecure: insecure.iter().map(|h| h.to_ascii_lowercase()).collect(),
            probed: Arc::default(),
        }
    }

    /// Whether `host_port` must be probed before its first request.
    pub(crate) fn needs_probe(&self, host_port: &str) -> bool {
        let h = host_port.to_ascii_lowercase();
        is_loopback_host(&h)
            && !self.insecure.contains(&h)
            && !self
                .probed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&h)
    }

    /// Record what a probe found.
    pub(crate) fn set_probed(&self, host_port: &str, scheme: &'static str) {
        self.probed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_port.to_ascii_lowercase(), scheme);
    }

    /// Whether `host_port` may be spoken to over plain HTTP.
    pub(crate) fn allows_http(&self, host_port: &str) -> bool {
        let h = host_port.to_ascii_lowercase();
        is_loopback_host(&h) || self.insecure.contains(&h)
    }

    /// The scheme for a registry host.
    pub(crate) fn scheme(&self, host_port: &str) -> &'static str {
        let h = host_port.to_ascii_lowercase();
        if let Some(s) = self
            .probed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h)
        {
            return s;
        }
        if self.allows_http(host_port) {
            "http"
        } else {
            "https"
        }
    }

    /// Refuse a URL the server pointed us at (Location, realm, redirect) if it is plain HTTP
    /// to a host that may not have it.
    pub(crate) fn check(&self, url: &Url) -> Result<(), RegistryError> {
        match url.scheme() {
            "https" => Ok(()),
            "http" if self.allows_http(&host_port(url)) => Ok(()),
            "http" => Err(RegistryError::Insecure {
                registry: host_port(url),
            }),
            other => Err(RegistryError::Protocol {
                url: super::error::redact(url),
                msg: format!("unsupported url scheme {other:?}"),
            }),
        }
    }
}

/// `host[:port]` of a URL.
pub(crate) fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// Build the reqwest client: rustls (platform verifier) plus `ca_files` as extra roots,
/// timeouts, and a redirect policy that never downgrades to plain HTTP.
/// The HTTP client, built on first use. Building it loads the system's root certificates
/// (about 150 files under /etc/ssl/certs, tens of milliseconds): a build that never talks to a
/// registry (`FROM scratch`, a cached base) should not pay that. CA files given with
/// `--ca-file` are still read and checked up front.
#[derive(Clone)]
pub(crate) struct LazyHttp(Arc<LazyInner>);

struct LazyInner {
    opts: ClientOptions,
    policy: SchemePolicy,
    certs: Vec<reqwest::Certificate>,
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl LazyHttp {
    /// The client, building it the first time.
    pub(crate) fn client(&self) -> Result<&reqwest::Client, RegistryError> {
        let inner = &self.0;
        inner
            .client
            .get_or_init(|| build_http(&inner.opts, &inner.policy, &inner.certs))
            .as_ref()
            .map_err(|msg| RegistryError::Setup {
                msg: format!("cannot build the http client: {msg}"),
                source: None,
            })
    }
}

impl std::fmt::Debug for LazyHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyHttp")
            .field("built", &self.0.client.get().is_some())
            .finish()
    }
}

pub(crate) fn http_client(
    opts: &ClientOptions,
    policy: &SchemePolicy,
) -> Result<LazyHttp, RegistryError> {
    let mut certs = Vec::new();
    for path in &opts.ca_files {
        let pem = fs_err::read(path).map_err(|e| RegistryError::Setup {
            msg: "cannot read CA file".into(),
            source: Some(Box::new(e)),
        })?;
        let found =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::Setup {
                msg: format!("{} holds no valid PEM certificates", path.display()),
                source: Some(Box::new(e.without_url())),
            })?;
        if found.is_empty() {
            return Err(RegistryError::Setup {
                msg: format!("{} holds no PEM certificates", path.display()),
                source: None,
            });
        }
        certs.extend(found);
    }
    Ok(LazyHttp(Arc::new(LazyInner {
        opts: opts.clone(),
        policy: policy.clone(),
        certs,
        client: std::sync::OnceLock::new(),
    })))
}

fn build_http(
    opts: &ClientOptions,
    policy: &SchemePolicy,
    certs: &[reqwest::Certificate],
) -> Result<reqwest::Client, String> {
    let redirect_policy = policy.clone();
    let redirect = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            attempt.error("too many redirects")
        } else if let Err(e) = redirect_policy.check(attempt.url()) {
            attempt.error(e.to_string())
        } else {
            attempt.follow()
        }
    });
    let mut builder = reqwest::Client::builder()
        .user_agent(opts.user_agent.clone())
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .redirect(redirect);
    if !certs.is_empty() {
        builder = builder.tls_certs_merge(certs.to_vec());
    }
    builder.build().map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_and_insecure_hosts() {
        let p = SchemePolicy::new(&["Reg.Internal:5000".to_string()]);
        assert_eq!(p.scheme("localhost:5000"), "http");
        assert_eq!(p.scheme("127.0.0.1:5000"), "http");
        assert_eq!(p.scheme("reg.internal:5000"), "http");
        assert_eq!(p.scheme("reg.internal"), "https");
        assert_eq!(p.scheme("ghcr.io"), "https");
        let bad: Url = "http://ghcr.io/token?x=1".parse().unwrap();
        let e = p.check(&bad).unwrap_err();
        assert!(matches!(&e, RegistryError::Insecure { registry } if registry == "ghcr.io"));
        assert!(p.check(&"https://ghcr.io/x".parse().unwrap()).is_ok());
        assert!(p.check(&"http://[::1]:9/x".parse().unwrap()).is_ok());
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("not-a-cert.pem");
        std::fs::write(&bad, "hello").unwrap();
        let opts = ClientOptions {
            ca_files: vec![bad],
            ..ClientOptions::default()
        };
        let e = http_client(&opts, &SchemePolicy::new(&[])).unwrap_err();
        assert!(e.to_string().contains("not-a-cert.pem"), "{e}");

        let cert = rcgen::generate_simple_self_signed(vec!["reg.test".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        let opts = ClientOptions {
            ca_files: vec![good],
            ..ClientOptions::default()
        };
        http_client(&opts, &SchemePolicy::new(&[])).unwrap();
    }
}
