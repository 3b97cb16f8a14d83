//! Registry test harness: a real CNCF distribution registry (`docker-registry`, Debian package
//! docker-registry) per test on a free loopback port, and the in-process pieces a real server
//! won't give on demand: a Docker token server ([`TokenServer`]), a fault-injecting proxy
//! ([`FaultProxy`]) and a test CA ([`TestCa`]).
//!
//! Everything is synchronous (std sockets and threads), so a test that drives the strata binary
//! needs no runtime. Every server stops on Drop and its temp dir goes with it; a registry dropped
//! while its test is panicking prints the tail of its log first.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::common::tool;

/// The User-Agent of the harness's own requests; [`Registry::requests`] leaves them out.
pub const AGENT: &str = "strata-test-harness";

/// How long any socket of the harness waits for its peer before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Test CA
// ---------------------------------------------------------------------------------------------

/// A throwaway certificate authority: `ca.pem`, a containers-style cert dir, and server certs.
pub struct TestCa {
    dir: tempfile::TempDir,
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    issued: AtomicUsize,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir for the test CA");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "strata test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        // containers/image (skopeo, buildah) trust every `*.crt` in a `--cert-dir`.
        fs::create_dir(dir.path().join("certs")).expect("mkdir certs");
        fs::write(dir.path().join("certs/ca.crt"), cert.pem()).expect("write ca.crt");
        TestCa {
            dir,
            cert,
            issuer: rcgen::Issuer::new(params, key),
            issued: AtomicUsize::new(0),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A directory holding only `ca.crt`, for skopeo's `--cert-dir`/`--dest-cert-dir`.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> &[u8] {
        self.cert.der()
    }

    /// A server certificate for `names` (IP addresses or DNS names) signed by this CA; returns
    /// the paths of the certificate and of its PKCS#8 key, both PEM.
    pub fn issue(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("server cert params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server cert");
        let cert_path = self.dir.path().join(format!("server-{n}.pem"));
        let key_path = self.dir.path().join(format!("server-{n}-key.pem"));
        fs::write(&cert_path, cert.pem()).expect("write server cert");
        fs::write(&key_path, key.serialize_pem()).expect("write server key");
        (cert_path, key_path)
    }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// How a [`Registry`] authenticates clients.
#[derive(Clone, Debug)]
pub enum Auth {
    Anonymous,
    /// htpasswd with one bcrypt user.
    Basic {
        user: String,
        password: String,
    },
    /// Docker token auth (<https://distribution.github.io/distribution/spec/auth/token/>).
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_bundle: PathBuf,
    },
}

/// A `docker-registry serve` child on `127.0.0.1:PORT`, storage in a temp dir, killed on Drop.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    ca: Option<Vec<u8>>,
    syncs: AtomicU64,
}

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw query, without `?` (empty when there is none).
    pub query: String,
    pub status: u16,
    /// Response body bytes the registry wrote (the access log has no request sizes: put a
    /// transparent [`FaultProxy`] in front to count those).
    pub bytes: u64,
    pub agent: String,
}

impl Request {
    /// The digest of `/v2/<name>/blobs/<digest>` (not upload URLs).
    pub fn blob(&self) -> Option<&str> {
        let (_, digest) = self.path.rsplit_once("/blobs/")?;
        (!self.path.contains("/blobs/uploads")).then_some(digest)
    }

    /// The reference of `/v2/<name>/manifests/<reference>`.
    pub fn manifest(&self) -> Option<&str> {
        self.path.rsplit_once("/manifests/").map(|(_, r)| r)
    }

    /// A request to `/v2/<name>/blobs/uploads/…` (start, chunk, completion, or mount).
    pub fn is_upload(&self) -> bool {
        self.path.contains("/blobs/uploads/")
    }

    /// A query parameter, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }
}

impl Registry {
    pub fn anonymous() -> Registry {
        Registry::start(Auth::Anonymous, None)
    }

    /// htpasswd auth with one user (bcrypt cost 5: fast, and the registry accepts it).
    pub fn basic(user: &str, password: &str) -> Registry {
        Registry::start(
            Auth::Basic {
                user: user.to_string(),
                password: password.to_string(),
            },
            None,
        )
    }

    /// HTTPS, anonymous, with a server cert for `127.0.0.1` and `localhost` signed by `ca`.
    pub fn tls(ca: &TestCa) -> Registry {
        Registry::start(Auth::Anonymous, Some(ca))
    }

    /// Token auth delegated to `server`.
    pub fn token(server: &TokenServer) -> Registry {
        Registry::start(server.auth(), None)
    }

    /// Any combination of auth and TLS. Waits until the registry answers.
    pub fn start(auth: Auth, tls: Option<&TestCa>) -> Registry {
        let mut dir = tempfile::tempdir().expect("temp dir for the registry");
        let certs = tls.map(|ca| ca.issue(&["127.0.0.1", "localhost"]));
        let mut failures = Vec::new();
        // The port is free when we pick it but another process may take it before the
        // registry binds: try a few.
        for _ in 0..3 {
            let addr = free_port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                registry_config(dir.path(), addr, &auth, certs.as_ref()),
            )
            .expect("write registry config");
            let mut command = Command::new(tool("docker-registry", "docker-registry"));
            command
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                // distribution writes its access log (Apache combined format) to stdout and
                // its own log to stderr.
                .stdout(fs::File::create(dir.path().join("access.log")).expect("access.log"))
                .stderr(fs::File::create(dir.path().join("registry.log")).expect("registry.log"));
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("REGISTRY_") {
                    command.env_remove(k);
                }
            }
            let child = command.spawn().expect("spawn docker-registry");
            let mut registry = Registry {
                child,
                dir,
                addr,
                ca: tls.map(|ca| ca.der().to_vec()),
                syncs: AtomicU64::new(0),
            };
            match registry.try_ready() {
                Ok(()) => return registry,
                Err(e) => {
                    failures.push(e);
                    let _ = registry.child.kill();
                    let _ = registry.child.wait();
                    // Take the dir back for the next attempt; Drop of a reaped child is harmless.
                    dir = std::mem::replace(
                        &mut registry.dir,
                        tempfile::tempdir().expect("temp dir"),
                    );
                }
            }
        }
        panic!(
            "docker-registry did not start:\n{}",
            failures.join("\n---\n")
        );
    }

    /// Poll `GET /v2/` until the registry answers (401 counts as up); panics with its log if it
    /// exits or takes more than 20 s.
    pub fn wait_ready(&mut self) {
        if let Err(e) = self.try_ready() {
            panic!("{e}");
        }
    }

    fn try_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for docker-registry") {
                return Err(format!(
                    "docker-registry exited ({status}):\n{}",
                    self.log()
                ));
            }
            // Only our child writes this log: a probe answered by whoever else might hold the
            // port (our child then exits with "address already in use") doesn't count.
            let bound = self.log().contains(&format!("listening on {}", self.addr));
            if bound && self.http("GET", "/v2/", &[], b"").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "docker-registry not up after 20 s:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `127.0.0.1:PORT/<path>`, e.g. `reg.image("app:v1")`.
    pub fn image(&self, path: &str) -> String {
        format!("{}/{path}", self.addr)
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn is_tls(&self) -> bool {
        self.ca.is_some()
    }

    /// The storage root (`docker/registry/v2/…` below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's own log (stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// One request to the registry from the harness (trusting the test CA when TLS).
    pub fn http(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        http(self.addr, self.ca.as_deref(), method, target, headers, body)
    }

    /// Every request the registry served so far, oldest first, from its access log (the
    /// harness's own requests left out).
    pub fn requests(&self) -> Vec<Request> {
        // The access log line is written after the response, so a client that has just exited
        // may not be logged yet: send a marker request and wait for its line.
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        let marker = format!("/v2/?harness-sync={n}");
        let _ = self.http("GET", &marker, &[], b"");
        let deadline = Instant::now() + Duration::from_secs(5);
        let path = self.dir.path().join("access.log");
        loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.contains(&marker) || Instant::now() > deadline {
                return text
                    .lines()
                    .filter_map(parse_access_line)
                    .filter(|r| r.agent != AGENT)
                    .collect();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The digests of all blobs in storage (manifests are blobs too).
    pub fn blobs(&self) -> Vec<String> {
        let root = self.storage().join("docker/registry/v2/blobs/sha256");
        let mut out = Vec::new();
        if !root.is_dir() {
            return out;
        }
        for e in walkdir::WalkDir::new(&root).min_depth(3).max_depth(3) {
            let e = e.expect("walk registry blobs");
            if e.file_name() == "data" {
                let hex = e
                    .path()
                    .parent()
                    .and_then(Path::file_name)
                    .expect("blob dir");
                out.push(format!("sha256:{}", hex.to_string_lossy()));
            }
        }
        out.sort();
        out
    }

    pub fn blob_count(&self) -> usize {
        self.blobs().len()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- docker-registry log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn registry_config(
    dir: &Path,
    addr: SocketAddr,
    auth: &Auth,
    tls: Option<&(PathBuf, PathBuf)>,
) -> String {
    let mut y = format!(
        "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: '{storage}'
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: strata-harness-not-a-secret
",
        storage = dir.join("storage").display()
    );
    if let Some((cert, key)) = tls {
        y += &format!(
            "  tls:\n    certificate: '{}'\n    key: '{}'\n",
            cert.display(),
            key.display()
        );
    }
    match auth {
        Auth::Anonymous => {}
        Auth::Basic { user, password } => {
            let hash = bcrypt::hash(password, 5).expect("bcrypt");
            let path = dir.join("htpasswd");
            fs::write(&path, format!("{user}:{hash}\n")).expect("write htpasswd");
            y += &format!(
                "auth:\n  htpasswd:\n    realm: strata-test\n    path: '{}'\n",
                path.display()
            );
        }
        Auth::Token {
            realm,
            service,
            issuer,
            root_bundle,
        } => {
            y += &format!(
                "auth:\n  token:\n    realm: '{realm}'\n    service: '{service}'\n    issuer: '{issuer}'\n    rootcertbundle: '{}'\n",
                root_bundle.display()
            );
        }
    }
    y
}

/// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "agent"` (gorilla's combined log).
fn parse_access_line(line: &str) -> Option<Request> {
    let (_, rest) = line.split_once('"')?;
    let (request_line, rest) = rest.split_once('"')?;
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let mut fields = rest.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().unwrap_or(0);
    let quoted: Vec<&str> = rest.split('"').collect();
    let agent = quoted.get(3).copied().unwrap_or_default().to_string();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        status,
        bytes,
        agent,
    })
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr")
}

fn query_param(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------------------------

/// What the token server knows; change it while running through [`TokenServer::config`].
#[derive(Clone, Debug)]
pub struct TokenConfig {
    pub users: BTreeMap<String, TokenUser>,
    /// Actions granted without credentials (empty: anonymous tokens carry no access).
    pub anonymous: Vec<String>,
    /// Accepted refresh tokens → the user each belongs to.
    pub refresh_tokens: BTreeMap<String, String>,
    /// `expires_in`; the `exp` claim lets a token live between this and a second more.
    pub lifetime: Duration,
    /// Backdate `exp` by the registry's 60 s clock-skew leeway so that the registry itself
    /// refuses the token once `lifetime` has passed (for refresh-mid-push tests).
    pub strict_expiry: bool,
    /// When false, `POST realm` answers 404 (as some registries do) and clients must use GET.
    pub accept_post: bool,
}

#[derive(Clone, Debug)]
pub struct TokenUser {
    pub password: String,
    /// Actions this user may get on any repository; `*` grants whatever is asked.
    pub actions: Vec<String>,
}

/// The credential a token request presented (never the secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenCredential {
    Anonymous,
    /// `GET` with `Authorization: Basic` for this user.
    Basic(String),
    /// `POST grant_type=password` for this user.
    Password(String),
    /// `POST grant_type=refresh_token` with a token belonging to this user.
    RefreshToken(String),
    /// Refused credentials, and why (e.g. "wrong password for alice").
    Rejected(String),
}

/// One request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub method: String,
    pub grant_type: Option<String>,
    pub service: Option<String>,
    /// Requested scopes, e.g. `repository:app:pull,push`.
    pub scopes: Vec<String>,
    pub credential: TokenCredential,
    pub status: u16,
    /// Granted scopes in the same form (actions possibly fewer than asked).
    pub granted: Vec<String>,
    pub refresh_token_issued: bool,
}

/// An in-process Docker token server (<https://distribution.github.io/distribution/spec/auth/token/>
/// and the OAuth2 flavour, `…/spec/auth/oauth/`) issuing ES256 JWTs signed by a key made here,
/// with `x5c` = its self-signed certificate, which is the registry's `rootcertbundle`.
///
/// Grants: `GET realm` (anonymous or Basic; `offline_token=true` adds a `refresh_token` for a
/// user), `POST realm` with `grant_type=password` (`access_type=offline` adds a
/// `refresh_token`) or `grant_type=refresh_token` (answers with the same refresh token). Each
/// requested scope is granted the actions the user may have; the rest are silently dropped,
/// as Docker Hub does, so the registry is the one that refuses.
pub struct TokenServer {
    server: Server,
    shared: Arc<TokenShared>,
    dir: tempfile::TempDir,
}

struct TokenShared {
    config: Mutex<TokenConfig>,
    log: Mutex<Vec<TokenRequest>>,
    key: aws_lc_rs::signature::EcdsaKeyPair,
    x5c: String,
    rng: aws_lc_rs::rand::SystemRandom,
}

pub const TOKEN_SERVICE: &str = "strata-test-registry";
pub const TOKEN_ISSUER: &str = "strata-test-token-server";

impl TokenServer {
    /// A running token server with no users, POST accepted, tokens for 5 minutes.
    pub fn new() -> TokenServer {
        let dir = tempfile::tempdir().expect("temp dir for the token server");
        let key = rcgen::KeyPair::generate().expect("token signing key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "strata test token signer");
        let cert = params.self_signed(&key).expect("self-sign token cert");
        fs::write(dir.path().join("token-signer.pem"), cert.pem()).expect("write token cert");
        let signing = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
        )
        .expect("load the token key into aws-lc-rs");
        let shared = Arc::new(TokenShared {
            config: Mutex::new(TokenConfig {
                users: BTreeMap::new(),
                anonymous: Vec::new(),
                refresh_tokens: BTreeMap::new(),
                lifetime: Duration::from_secs(300),
                strict_expiry: false,
                accept_post: true,
            }),
            log: Mutex::new(Vec::new()),
            key: signing,
            x5c: STANDARD.encode(cert.der()),
            rng: aws_lc_rs::rand::SystemRandom::new(),
        });
        let handler = Arc::clone(&shared);
        let server = Server::spawn("token-server", move |s| handler.serve(s));
        TokenServer {
            server,
            shared,
            dir,
        }
    }

    /// A user who gets whatever actions are asked.
    pub fn user(self, name: &str, password: &str) -> Self {
        self.user_with(name, password, &["*"])
    }

    /// A user who gets only `actions` (e.g. `&["pull"]` to provoke a missing push scope).
    pub fn user_with(self, name: &str, password: &str, actions: &[&str]) -> Self {
        self.config().users.insert(
            name.to_string(),
            TokenUser {
                password: password.to_string(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
            },
        );
        self
    }

    pub fn anonymous(self, actions: &[&str]) -> Self {
        self.config().anonymous = actions.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn refresh_token(self, token: &str, user: &str) -> Self {
        self.config()
            .refresh_tokens
            .insert(token.to_string(), user.to_string());
        self
    }

    pub fn lifetime(self, lifetime: Duration) -> Self {
        self.config().lifetime = lifetime;
        self
    }

    /// See [`TokenConfig::strict_expiry`].
    pub fn strict_expiry(self) -> Self {
        self.config().strict_expiry = true;
        self
    }

    pub fn without_post(self) -> Self {
        self.config().accept_post = false;
        self
    }

    pub fn config(&self) -> MutexGuard<'_, TokenConfig> {
        self.shared.config.lock().expect("token config lock")
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// The signing certificate (PEM): the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("token-signer.pem")
    }

    /// The registry configuration that trusts this server.
    pub fn auth(&self) -> Auth {
        self.auth_with_realm(self.realm())
    }

    /// The same, advertising another realm: e.g. `format!("{}/token", proxy.url())` for a
    /// [`FaultProxy`] in front of this server.
    pub fn auth_with_realm(&self, realm: String) -> Auth {
        Auth::Token {
            realm,
            service: TOKEN_SERVICE.to_string(),
            issuer: TOKEN_ISSUER.to_string(),
            root_bundle: self.cert_path(),
        }
    }

    /// Requests answered so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.server.quiesce();
        self.shared.log.lock().expect("token log lock").clone()
    }

    /// Mint a token directly: `access` is `(repository, actions)`.
    pub fn issue(&self, subject: &str, access: &[(&str, &[&str])]) -> String {
        let access = access
            .iter()
            .map(|(name, actions)| {
                serde_json::json!({"type": "repository", "name": name, "actions": actions})
            })
            .collect();
        let (lifetime, strict) = {
            let config = self.config();
            (config.lifetime, config.strict_expiry)
        };
        self.shared.sign(subject, access, lifetime, strict)
    }
}

impl TokenShared {
    fn serve(&self, mut stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let mut buf = Vec::new();
        let Ok(Some(end)) = read_head(&mut stream, &mut buf) else {
            return;
        };
        let Some(head) = parse_head(&buf[..end]) else {
            return;
        };
        let len = head.content_length().unwrap_or(0);
        while buf.len() < end + len {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let (status, body) = self.respond(&head, &buf[end..end + len]);
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Error",
        };
        let mut response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if status == 401 {
            response += "WWW-Authenticate: Basic realm=\"strata-test-token\"\r\n";
        }
        response += "\r\n";
        response += &body;
        let _ = stream.write_all(response.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
    }

    fn respond(&self, head: &Head, body: &[u8]) -> (u16, String) {
        let config = self.config.lock().expect("token config lock").clone();
        let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
        let mut entry = TokenRequest {
            method: head.method.clone(),
            grant_type: None,
            service: None,
            scopes: Vec::new(),
            credential: TokenCredential::Anonymous,
            status: 200,
            granted: Vec::new(),
            refresh_token_issued: false,
        };
        let result = self.authenticate(head, path, query, body, &config, &mut entry);
        let (status, json) = match result {
            Err((status, msg)) => (status, serde_json::json!({ "details": msg })),
            Ok((user, offline, presented_refresh)) => {
                let allowed = match &user {
                    Some(u) => config.users.get(u).map(|u| u.actions.clone()),
                    None => Some(config.anonymous.clone()),
                }
                .unwrap_or_default();
                let mut access = Vec::new();
                for scope in &entry.scopes {
                    let Some((kind, name, actions)) = parse_scope(scope) else {
                        continue;
                    };
                    let granted: Vec<&str> = actions
                        .iter()
                        .copied()
                        .filter(|a| allowed.iter().any(|x| x == "*" || x == a))
                        .collect();
                    entry
                        .granted
                        .push(format!("{kind}:{name}:{}", granted.join(",")));
                    access
                        .push(serde_json::json!({"type": kind, "name": name, "actions": granted}));
                }
                let subject = user.clone().unwrap_or_default();
                let token = self.sign(&subject, access, config.lifetime, config.strict_expiry);
                let now = now_secs();
                let mut json = serde_json::json!({
                    "token": token,
                    "access_token": token,
                    "expires_in": config.lifetime.as_secs().max(1),
                    "issued_at": rfc3339(now),
                });
                if let Some(user) = user.filter(|_| offline) {
                    let refresh = presented_refresh.unwrap_or_else(|| {
                        let fresh = format!("rt-{}", self.random_hex(16));
                        self.config
                            .lock()
                            .expect("token config lock")
                            .refresh_tokens
                            .insert(fresh.clone(), user);
                        fresh
                    });
                    json["refresh_token"] = refresh.into();
                    entry.refresh_token_issued = true;
                }
                (200, json)
            }
        };
        entry.status = status;
        self.log.lock().expect("token log lock").push(entry);
        (status, json.to_string())
    }

    /// Who is asking: `Ok((user or anonymous, wants a refresh token, refresh token presented))`.
    #[allow(clippy::type_complexity)]
    fn authenticate(
        &self,
        head: &Head,
        path: &str,
        query: &str,
        body: &[u8],
        config: &TokenConfig,
        entry: &mut TokenRequest,
    ) -> Result<(Option<String>, bool, Option<String>), (u16, String)> {
        if path != "/token" {
            return Err((404, format!("no such endpoint {path}")));
        }
        let check = |user: &str, password: &str| match config.users.get(user) {
            Some(u) if u.password == password => Ok(()),
            Some(_) => Err(format!("wrong password for {user}")),
            None => Err(format!("unknown user {user}")),
        };
        match head.method.as_str() {
            "GET" => {
                let params = form(query.as_bytes());
                entry.service = params.get("service").and_then(|v| v.first()).cloned();
                entry.scopes = scopes(params.get("scope"));
                let offline = params
                    .get("offline_token")
                    .is_some_and(|v| v.iter().any(|v| v == "true"));
                let Some(auth) = head.header("authorization") else {
                    return Ok((None, false, None));
                };
                let basic = auth
                    .strip_prefix("Basic ")
                    .and_then(|b| STANDARD.decode(b.trim()).ok())
                    .and_then(|b| String::from_utf8(b).ok());
                let Some((user, password)) = basic.as_deref().and_then(|b| b.split_once(':'))
                else {
                    entry.credential = TokenCredential::Rejected("malformed authorization".into());
                    return Err((401, "malformed authorization".into()));
                };
                if let Err(why) = check(user, password) {
                    entry.credential = TokenCredential::Rejected(why.clone());
                    return Err((401, why));
                }
                entry.credential = TokenCredential::Basic(user.to_string());
                Ok((Some(user.to_string()), offline, None))
            }
            "POST" if !config.accept_post => Err((404, "POST not supported here".into())),
            "POST" => {
                let params = form(body);
                let one = |k: &str| params.get(k).and_then(|v| v.first()).cloned();
                entry.grant_type = one("grant_type");
                entry.service = one("service");
                entry.scopes = scopes(params.get("scope"));
                match entry.grant_type.as_deref() {
                    Some("password") => {
                        let user = one("username").unwrap_or_default();
                        let password = one("password").unwrap_or_default();
                        if let Err(why) = check(&user, &password) {
                            entry.credential = TokenCredential::Rejected(why.clone());
                            return Err((401, why));
                        }
                        entry.credential = TokenCredential::Password(user.clone());
                        let offline = one("access_type").as_deref() == Some("offline");
                        Ok((Some(user), offline, None))
                    }
                    Some("refresh_token") => {
                        let token = one("refresh_token").unwrap_or_default();
                        let Some(user) = config.refresh_tokens.get(&token) else {
                            let why = "unknown refresh token".to_string();
                            entry.credential = TokenCredential::Rejected(why.clone());
                            return Err((401, why));
                        };
                        entry.credential = TokenCredential::RefreshToken(user.clone());
                        Ok((Some(user.clone()), true, Some(token)))
                    }
                    other => Err((400, format!("unsupported grant_type {other:?}"))),
                }
            }
            other => Err((405, format!("method {other} not allowed"))),
        }
    }

    fn sign(
        &self,
        subject: &str,
        access: Vec<serde_json::Value>,
        lifetime: Duration,
        strict: bool,
    ) -> String {
        let now = now_secs();
        // `now` is whole seconds: one more keeps a token minted late in a second valid for
        // at least `lifetime` (else it could expire at once, before its first use).
        let mut exp = now + 1 + lifetime.as_secs().max(1) as i64;
        if strict {
            // distribution accepts a token until exp + 60 s (registry/auth/token Leeway).
            exp -= 60;
        }
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": exp,
            "nbf": now,
            "iat": now,
            "jti": self.random_hex(12),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .expect("ES256 signature");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn random_hex(&self, n: usize) -> String {
        let mut bytes = vec![0u8; n];
        aws_lc_rs::rand::SecureRandom::fill(&self.rng, &mut bytes).expect("random bytes");
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `repository:name:pull,push` → ("repository", "name", ["pull", "push"]).
fn parse_scope(scope: &str) -> Option<(&str, &str, Vec<&str>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        kind,
        name,
        actions.split(',').filter(|a| !a.is_empty()).collect(),
    ))
}

/// Scopes may come as repeated parameters or space-separated in one (the OAuth2 form).
fn scopes(values: Option<&Vec<String>>) -> Vec<String> {
    values
        .into_iter()
        .flatten()
        .flat_map(|v| v.split(' '))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn form(bytes: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(bytes) {
        out.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    out
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Fault proxy
// ---------------------------------------------------------------------------------------------

/// What the proxy does to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Answer this status with `Retry-After: 0` instead of forwarding.
    Status(u16),
    /// Forward, then reset the connection (SO_LINGER 0) part-way through the response.
    Reset,
    /// Forward, then close cleanly part-way through the response.
    Truncate,
    /// Forward, flipping one byte of a `200` blob body (`GET /v2/*/blobs/*` only).
    Corrupt,
}

/// Fault plan: first the `script`, one entry per matching request, then the rates, drawn from a
/// RNG seeded with `seed`. Build with struct update syntax:
/// `Faults { seed: 7, unavailable: 0.2, ..Faults::none() }`.
#[derive(Clone, Debug)]
pub struct Faults {
    pub seed: u64,
    /// Rate of `503 Service Unavailable`.
    pub unavailable: f64,
    /// Rate of `429 Too Many Requests`.
    pub too_many_requests: f64,
    pub reset: f64,
    pub truncate: f64,
    /// Rate of corruption among blob GETs.
    pub corrupt_blobs: f64,
    pub script: Vec<Fault>,
    /// Body bytes delivered before a Reset or Truncate; None: a random point in the body. (A
    /// bodiless response is cut inside its head.)
    pub cut_after: Option<u64>,
    /// Only requests for which this returns true (method, path with query) get faults.
    pub only: Option<fn(&str, &str) -> bool>,
}

impl Faults {
    /// Transparent: every request passes (the proxy still counts bytes).
    pub fn none() -> Faults {
        Faults {
            seed: 0,
            unavailable: 0.0,
            too_many_requests: 0.0,
            reset: 0.0,
            truncate: 0.0,
            corrupt_blobs: 0.0,
            script: Vec::new(),
            cut_after: None,
            only: None,
        }
    }

    /// Exactly these faults for the first matching requests, then pass.
    pub fn script(faults: &[Fault]) -> Faults {
        Faults {
            script: faults.to_vec(),
            ..Faults::none()
        }
    }
}

/// A filter for [`Faults::only`].
pub fn is_blob_get(method: &str, path: &str) -> bool {
    method == "GET" && path.contains("/blobs/") && !path.contains("/blobs/uploads")
}

/// A filter for [`Faults::only`]: upload starts, chunks and completions.
pub fn is_upload(_method: &str, path: &str) -> bool {
    path.contains("/blobs/uploads")
}

/// A filter for [`Faults::only`].
pub fn is_manifest(_method: &str, path: &str) -> bool {
    path.contains("/manifests/")
}

/// Faults injected so far. `requests` = `passed` + every other field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub requests: u64,
    pub passed: u64,
    /// 503 answers.
    pub unavailable: u64,
    /// 429 answers.
    pub too_many_requests: u64,
    /// Other injected statuses (from a script).
    pub other_status: u64,
    pub resets: u64,
    pub truncations: u64,
    pub corruptions: u64,
    /// Requests answered 502 because the upstream could not be reached.
    pub upstream_errors: u64,
}

impl FaultCounts {
    pub fn injected(&self) -> u64 {
        self.unavailable
            + self.too_many_requests
            + self.other_status
            + self.resets
            + self.truncations
            + self.corruptions
    }
}

/// One request through the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedRequest {
    pub method: String,
    /// Path with query, as the client sent it.
    pub target: String,
    /// What was done (a Corrupt/Reset/Truncate that found nothing to act on shows as Pass).
    pub fault: Fault,
    /// Upstream's status, or the injected one; None when no response head reached us.
    pub status: Option<u16>,
    /// Request body bytes forwarded (on the wire: chunked framing included).
    pub request_bytes: u64,
    /// Response bytes (head and body) sent to the client.
    pub response_bytes: u64,
}

/// A loopback HTTP/1.1 proxy in front of a plain-HTTP server (a [`Registry`] or a
/// [`TokenServer`]) that injects faults by plan.
///
/// To keep request boundaries trivial it handles one request per connection: it sends
/// `Connection: close` upstream, so the response (also `Connection: close`) ends at EOF and the
/// client opens a new connection for its next request. So "per connection" and "per request"
/// are the same here, and keep-alive reuse itself is not exercised through the proxy.
pub struct FaultProxy {
    server: Server,
    shared: Arc<ProxyShared>,
}

struct ProxyShared {
    upstream: SocketAddr,
    state: Mutex<ProxyState>,
}

struct ProxyState {
    faults: Faults,
    rng: Rng,
    script_pos: usize,
    counts: FaultCounts,
    log: Vec<ProxiedRequest>,
}

impl FaultProxy {
    /// In front of `registry` (plain HTTP only: the proxy must read the requests).
    pub fn new(registry: &Registry, faults: Faults) -> FaultProxy {
        assert!(
            !registry.is_tls(),
            "FaultProxy reads HTTP, so it cannot sit in front of a TLS registry"
        );
        FaultProxy::to(registry.addr(), faults)
    }

    /// A transparent proxy: counts requests and their body bytes.
    pub fn transparent(registry: &Registry) -> FaultProxy {
        FaultProxy::new(registry, Faults::none())
    }

    /// In front of any plain-HTTP server.
    pub fn to(upstream: SocketAddr, faults: Faults) -> FaultProxy {
        let shared = Arc::new(ProxyShared {
            upstream,
            state: Mutex::new(ProxyState {
                rng: Rng(faults.seed),
                faults,
                script_pos: 0,
                counts: FaultCounts::default(),
                log: Vec::new(),
            }),
        });
        let handler = Arc::clone(&shared);
        let server = Server::spawn("fault-proxy", move |s| {
            let _ = handler.serve(s);
        });
        FaultProxy { server, shared }
    }

    /// Replace the plan (script restarts, RNG reseeded); counters are kept.
    pub fn set_faults(&self, faults: Faults) {
        let mut st = self.shared.lock();
        st.rng = Rng(faults.seed);
        st.faults = faults;
        st.script_pos = 0;
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `127.0.0.1:PORT`: use in image references instead of the registry's.
    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    pub fn image(&self, path: &str) -> String {
        format!("{}/{path}", self.server.addr)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Counters, once in-flight connections are done (waits up to 5 s for them).
    pub fn counts(&self) -> FaultCounts {
        self.server.quiesce();
        self.shared.lock().counts
    }

    /// Requests so far, in arrival order, once in-flight connections are done.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.server.quiesce();
        self.shared.lock().log.clone()
    }
}

impl ProxyShared {
    fn lock(&self) -> MutexGuard<'_, ProxyState> {
        self.state.lock().expect("proxy state lock")
    }

    /// Pick the fault for a request and log it; returns the log index.
    fn decide(&self, head: &Head) -> (Fault, usize) {
        let mut st = self.lock();
        st.counts.requests += 1;
        let applies = st.faults.only.is_none_or(|f| f(&head.method, &head.target));
        let fault = if !applies {
            Fault::Pass
        } else if st.script_pos < st.faults.script.len() {
            st.script_pos += 1;
            st.faults.script[st.script_pos - 1]
        } else {
            let blob = is_blob_get(&head.method, &head.target);
            let f = &st.faults;
            let table = [
                (f.unavailable, Fault::Status(503)),
                (f.too_many_requests, Fault::Status(429)),
                (f.reset, Fault::Reset),
                (f.truncate, Fault::Truncate),
                (if blob { f.corrupt_blobs } else { 0.0 }, Fault::Corrupt),
            ];
            let r = st.rng.unit();
            let mut acc = 0.0;
            table
                .iter()
                .find(|(rate, _)| {
                    acc += rate;
                    r < acc
                })
                .map_or(Fault::Pass, |(_, f)| *f)
        };
        if let Fault::Status(code) = fault {
            match code {
                503 => st.counts.unavailable += 1,
                429 => st.counts.too_many_requests += 1,
                _ => st.counts.other_status += 1,
            }
        }
        st.log.push(ProxiedRequest {
            method: head.method.clone(),
            target: head.target.clone(),
            fault,
            status: None,
            request_bytes: 0,
            response_bytes: 0,
        });
        (fault, st.log.len() - 1)
    }

    fn serve(&self, mut client: TcpStream) -> io::Result<()> {
        client.set_read_timeout(Some(IO_TIMEOUT))?;
        client.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut first = [0u8; 1];
        if client.peek(&mut first)? == 1 && !first[0].is_ascii_uppercase() {
            // Not HTTP: a TLS ClientHello from a client that tries https first (skopeo with
            // tls-verify off). Answer as Go's server does so it falls back to http at once.
            let _ = client.write_all(b"HTTP/1.0 400 Bad Request\r\nConnection: close\r\n\r\n");
            lingering_close(client);
            return Ok(());
        }
        let mut buf = Vec::new();
        let Some(end) = read_head(&mut client, &mut buf)? else {
            return Ok(());
        };
        let head = parse_head(&buf[..end])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad request head"))?;
        let (fault, index) = self.decide(&head);
        if let Fault::Status(code) = fault {
            let body = format!(
                "{{\"errors\":[{{\"code\":\"{}\",\"message\":\"injected by FaultProxy\"}}]}}",
                if code == 429 {
                    "TOOMANYREQUESTS"
                } else {
                    "UNAVAILABLE"
                }
            );
            let response = format!(
                "HTTP/1.1 {code} Injected\r\nRetry-After: 0\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let sent = client.write_all(response.as_bytes());
            {
                let mut st = self.lock();
                st.log[index].status = Some(code);
                st.log[index].response_bytes = response.len() as u64;
            }
            sent?;
            lingering_close(client);
            return Ok(());
        }
        let mut upstream = match TcpStream::connect_timeout(&self.upstream, Duration::from_secs(5))
        {
            Ok(s) => s,
            Err(e) => {
                self.lock().counts.upstream_errors += 1;
                let _ = client.write_all(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return Err(e);
            }
        };
        upstream.set_read_timeout(Some(IO_TIMEOUT))?;
        upstream.write_all(&head.forward())?;
        upstream.write_all(&buf[end..])?;

        // The request body, concurrently with the response (100-continue, early answers).
        let early = (buf.len() - end) as u64;
        let (mut from_client, mut to_upstream) = (client.try_clone()?, upstream.try_clone()?);
        let pump = thread::spawn(move || {
            let mut total = early;
            let mut chunk = vec![0u8; 64 * 1024];
            let mut forwarding = true;
            loop {
                match from_client.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        // Keep draining after upstream stopped listening, so closing the
                        // client later does not turn into a reset.
                        forwarding = forwarding && to_upstream.write_all(&chunk[..n]).is_ok();
                    }
                }
            }
            let _ = to_upstream.shutdown(Shutdown::Write);
            total
        });

        let outcome = self.relay(&head, &mut upstream, &mut client, fault);
        let (status, sent, applied) = outcome.unwrap_or((None, 0, Fault::Pass));
        match applied {
            Fault::Reset => set_linger_zero(&client),
            _ => {
                let _ = client.shutdown(Shutdown::Write);
            }
        }
        if applied != Fault::Pass {
            // Don't wait for the client: end the pump now.
            let _ = client.shutdown(Shutdown::Read);
        }
        let request_bytes = pump.join().unwrap_or(0);
        let mut st = self.lock();
        match applied {
            Fault::Pass => st.counts.passed += 1,
            Fault::Reset => st.counts.resets += 1,
            Fault::Truncate => st.counts.truncations += 1,
            Fault::Corrupt => st.counts.corruptions += 1,
            Fault::Status(_) => unreachable!("statuses are answered before forwarding"),
        }
        let entry = &mut st.log[index];
        entry.fault = applied;
        entry.status = status;
        entry.request_bytes = request_bytes;
        entry.response_bytes = sent;
        Ok(())
    }

    /// Copy the response to the client, applying `fault`; returns (status, bytes sent, the
    /// fault actually applied).
    fn relay(
        &self,
        head: &Head,
        upstream: &mut TcpStream,
        client: &mut TcpStream,
        fault: Fault,
    ) -> io::Result<(Option<u16>, u64, Fault)> {
        let mut sent = 0u64;
        let mut buf = Vec::new();
        // Interim 1xx answers go through untouched.
        let (end, status, content_length) = loop {
            let Some(end) = read_head(upstream, &mut buf)? else {
                return Ok((None, sent, Fault::Pass));
            };
            let status = parse_status(&buf[..end]).unwrap_or(0);
            if (100..200).contains(&status) {
                client.write_all(&buf[..end])?;
                sent += end as u64;
                buf.drain(..end);
                continue;
            }
            let length = parse_head(&buf[..end]).and_then(|h| h.content_length());
            break (end, status, length);
        };
        let body_len = if head.method == "HEAD" || status == 204 || status == 304 {
            Some(0)
        } else {
            content_length
        };
        let mut st = self.lock();
        // Absolute offsets into the response stream.
        let (cut, flip, applied) = match fault {
            Fault::Reset | Fault::Truncate => {
                let end = end as u64;
                let cut = match (body_len.map(|n| n as u64), st.faults.cut_after) {
                    // A fixed cut past the end leaves nothing to cut.
                    (Some(n), Some(c)) if n > 0 => (c < n).then_some(end + c),
                    (Some(n), None) if n > 0 => Some(end + st.rng.below(n)),
                    (Some(_), _) => Some(1 + st.rng.below(end - 1)),
                    (None, c) => Some(end + c.unwrap_or_else(|| st.rng.below(16))),
                };
                (cut, None, if cut.is_some() { fault } else { Fault::Pass })
            }
            Fault::Corrupt => match body_len {
                Some(n) if n > 0 && status == 200 => {
                    (None, Some(end as u64 + st.rng.below(n as u64)), fault)
                }
                _ => (None, None, Fault::Pass),
            },
            _ => (None, None, Fault::Pass),
        };
        drop(st);
        let mut offset = sent;
        let base = sent;
        let mut chunk = buf;
        loop {
            if let Some(at) = flip {
                let (lo, hi) = (offset - base, offset - base + chunk.len() as u64);
                if (lo..hi).contains(&at) {
                    chunk[(at - lo) as usize] ^= 0xff;
                }
            }
            let mut n = chunk.len();
            if let Some(cut) = cut {
                n = n.min(cut.saturating_sub(offset - base) as usize);
            }
            client.write_all(&chunk[..n])?;
            offset += n as u64;
            if cut.is_some_and(|c| offset - base >= c) {
                return Ok((Some(status), offset, applied));
            }
            chunk.resize(64 * 1024, 0);
            match upstream.read(&mut chunk)? {
                0 => break,
                n => chunk.truncate(n),
            }
        }
        // The response ended before the cut or the flip: nothing was injected after all.
        let applied = match applied {
            Fault::Reset | Fault::Truncate => Fault::Pass,
            Fault::Corrupt if flip.is_some_and(|f| f >= offset - base) => Fault::Pass,
            other => other,
        };
        Ok((Some(status), offset, applied))
    }
}

/// Close after a reply without reading the request body: stop sending, then discard what the
/// client still sends, so the kernel does not answer it with a reset that could destroy the
/// reply in flight.
fn lingering_close(mut s: TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sink = [0u8; 64 * 1024];
    while Instant::now() < deadline {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(_) => break,
        }
    }
}

fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a pointer to a live linger of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// splitmix64: tiny, seedable, good enough to spread faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); 0 when n is 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1: servers and the harness's own client
// ---------------------------------------------------------------------------------------------

/// A loopback listener that hands each connection to `handler` on its own thread.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn spawn(name: &str, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let (stop2, active2) = (Arc::clone(&stop), Arc::clone(&active));
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let guard = ActiveGuard::new(&active2);
                    let handler = Arc::clone(&handler);
                    thread::spawn(move || {
                        let _guard = guard;
                        handler(conn);
                    });
                }
            })
            .expect("spawn server thread");
        Server {
            addr,
            stop,
            active,
            thread: Some(thread),
        }
    }

    /// Wait (up to 5 s) until no connection is being handled.
    fn quiesce(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts a connection as active until dropped, even if its handler panics.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> ActiveGuard {
        active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request or response head.
#[derive(Clone, Debug)]
struct Head {
    method: String,
    target: String,
    /// The request line (or status line) as received.
    first_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.trim().parse().ok()
    }

    /// The head to send upstream: hop-by-hop connection headers replaced by `Connection: close`.
    fn forward(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first_line);
        for (k, v) in &self.headers {
            let hop = ["connection", "keep-alive", "proxy-connection"]
                .iter()
                .any(|h| k.eq_ignore_ascii_case(h));
            if !hop {
                out += &format!("{k}: {v}\r\n");
            }
        }
        out += "Connection: close\r\n\r\n";
        out.into_bytes()
    }
}

/// Read until the end of a head (`\r\n\r\n`) is in `buf`; returns its end offset, or None if
/// the peer closed before sending anything.
fn read_head(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "head over 64 KiB",
            ));
        }
        match stream.read(&mut chunk)? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head")),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn parse_head(bytes: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.split("\r\n");
    let first_line = lines.next()?.to_string();
    let mut parts = first_line.splitn(3, ' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Head {
        method,
        target,
        first_line,
        headers,
    })
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

/// A response as the harness's client saw it.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), over TLS trusting only
/// `ca` (DER) when given. A body shorter than its Content-Length is an `UnexpectedEof` error.
pub fn http(
    addr: SocketAddr,
    ca: Option<&[u8]>,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {AGENT}\r\nConnection: close\r\n"
    );
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        request += &format!("Content-Length: {}\r\n", body.len());
    }
    for (k, v) in headers {
        request += &format!("{k}: {v}\r\n");
    }
    request += "\r\n";
    let mut request = request.into_bytes();
    request.extend_from_slice(body);

    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut raw = Vec::new();
    match ca {
        None => {
            let mut stream = stream;
            stream.write_all(&request)?;
            stream.read_to_end(&mut raw)?;
        }
        Some(der) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
                .map_err(io::Error::other)?;
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string())
                .map_err(io::Error::other)?;
            let conn =
                rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
            let mut tls = rustls::StreamOwned::new(conn, stream);
            tls.write_all(&request)?;
            match tls.read_to_end(&mut raw) {
                // A peer closing without close_notify; the framing check below still applies.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
                other => {
                    other?;
                }
            }
        }
    }
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], bodiless: bool) -> io::Result<HttpResponse> {
    let eof = |what: &str| io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| eof("connection closed inside the response head"))?
        + 4;
    let head = parse_head(&raw[..end]).ok_or_else(|| eof("malformed response head"))?;
    let status: u16 = head
        .target
        .parse()
        .map_err(|_| eof("malformed status line"))?;
    let rest = &raw[end..];
    let body = if bodiless || status == 204 || status == 304 {
        Vec::new()
    } else if head
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest).ok_or_else(|| eof("truncated chunked body"))?
    } else if let Some(n) = head.content_length() {
        if rest.len() < n {
            return Err(eof(&format!("body truncated: {} of {n} bytes", rest.len())));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers: head.headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if rest.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
