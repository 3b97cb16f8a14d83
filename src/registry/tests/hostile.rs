//! The client against servers that misbehave on purpose.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fake::{self, Knobs};
use super::server::{Reply, Req, Server};
use crate::digest::{Digest, DigestError};
use crate::media::{Descriptor, MediaType};
use crate::registry::{
    Anonymous, BlobSink, BlobSource, Client, ClientOptions, Credential, CredentialProvider, Fixed,
    Reference, RegistryError, Secret, TransferEvent,
};

const MIB: usize = 1024 * 1024;

fn opts() -> ClientOptions {
    ClientOptions {
        initial_backoff: Duration::from_millis(5),
        max_attempts: 4,
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

fn client_with(o: ClientOptions, creds: Arc<dyn CredentialProvider>) -> Client {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "strata=debug".into()))
        .try_init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    Client::new(o, creds).unwrap()
}

fn client() -> Client {
    client_with(opts(), Arc::new(Anonymous))
}

fn reference(s: &Server, rest: &str) -> Reference {
    format!("{}/{rest}", s.host()).parse().unwrap()
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn manifest() -> Vec<u8> {
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#.to_vec()
}

fn manifest_reply() -> Reply {
    Reply::new(200)
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest())
}

/// Serve `blob` honouring Range, misbehaving on the first `n` requests via `first`.
fn blob_server(
    blob: Vec<u8>,
    first: impl Fn(usize, &[u8]) -> Option<Reply> + Send + Sync + 'static,
) -> impl Fn(&Req) -> Reply + Send + Sync + 'static {
    let count = Mutex::new(0usize);
    move |req: &Req| {
        let n = {
            let mut c = count.lock().unwrap();
            *c += 1;
            *c - 1
        };
        if let Some(r) = first(n, &blob) {
            return r;
        }
        match req.header("range").and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let start: usize = r.trim_end_matches('-').parse().unwrap();
                Reply::new(206)
                    .header(
                        "Content-Range",
                        format!("bytes {start}-{}/{}", blob.len() - 1, blob.len()),
                    )
                    .body(blob[start..].to_vec())
            }
            None => Reply::new(200).body(blob.clone()),
        }
    }
}

/// A sink that records resets and discards.
#[derive(Default)]
struct Recorder {
    bytes: Vec<u8>,
    resets: usize,
    discarded: bool,
}

impl BlobSink for Recorder {
    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.bytes.extend_from_slice(b);
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.bytes.clear();
        self.resets += 1;
        Ok(())
    }
    fn discard(&mut self) {
        self.bytes.clear();
        self.discarded = true;
    }
}

#[tokio::test]
async fn retries_429_honouring_retry_after() {
    let count = Mutex::new(0);
    let s = Server::start(move |_| {
        let mut c = count.lock().unwrap();
        *c += 1;
        if *c == 1 {
            Reply::new(429).header("Retry-After", "1")
        } else {
            manifest_reply()
        }
    })
    .await;
    let start = Instant::now();
    let m = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "Retry-After ignored"
    );
    assert_eq!(m.digest, Digest::of(&manifest()));
    assert_eq!(m.media_type, MediaType::OciManifest);
    assert_eq!(s.requests().len(), 2);
}

#[tokio::test]
async fn retries_503_then_gives_up_with_the_status() {
    let count = Mutex::new(0);
    let s = Server::start(move |_| {
        let mut c = count.lock().unwrap();
        *c += 1;
        if *c <= 2 {
            Reply::new(503)
        } else {
            manifest_reply()
        }
    })
    .await;
    client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap();
    assert_eq!(s.requests().len(), 3);

    let s = Server::start(|_| Reply::new(503).body("busy")).await;
    let e = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert_eq!(s.requests().len(), 4, "max_attempts bounds the retries");
}

#[tokio::test]
async fn other_4xx_are_not_retried_and_render_the_error_body() {
    let s = Server::start(|_| {
        Reply::new(404).json(serde_json::json!({"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v1"}}]}))
    })
    .await;
    let e = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert_eq!(s.requests().len(), 1);
    match &e {
        RegistryError::Registry { status, code, .. } => {
            assert_eq!((*status, code.as_deref()), (404, Some("MANIFEST_UNKNOWN")))
        }
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("MANIFEST_UNKNOWN: manifest unknown"),
        "{text}"
    );
    assert!(!text.contains('\n'));
    assert!(
        client()
            .head_manifest(&reference(&s, "a/b:v1"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn fetch_resumes_with_range_after_a_reset() {
    let blob = data(300_000);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    let s = Server::start(blob_server(blob.clone(), |n, b| {
        (n == 0).then(|| Reply::new(200).body(b.to_vec()).cut(100_000, true))
    }))
    .await;
    let mut sink = Recorder::default();
    client()
        .fetch_blob(&reference(&s, "a/b"), &desc, &mut sink)
        .await
        .unwrap();
    assert_eq!(sink.bytes, blob);
    let reqs = s.requests();
    assert_eq!(reqs.len(), 2);
    let range = reqs[1].header("range").expect("resume sent a Range");
    let from: usize = range
        .strip_prefix("bytes=")
        .unwrap()
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0 && from <= 100_000, "{range}");
}

#[tokio::test]
async fn fetch_resumes_a_truncated_body_and_restarts_on_200() {
    let blob = data(200_000);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    // Body cut short by a clean close; then a server that ignores Range (200, full body).
    let s = Server::start(blob_server(blob.clone(), |n, b| match n {
        0 => Some(Reply::new(200).body(b.to_vec()).cut(50_000, false)),
        1 => Some(Reply::new(200).body(b.to_vec())),
        _ => None,
    }))
    .await;
    let mut sink = Recorder::default();
    client()
        .fetch_blob(&reference(&s, "a/b"), &desc, &mut sink)
        .await
        .unwrap();
    assert_eq!(sink.bytes, blob);
    assert_eq!(sink.resets, 2, "initial reset and the restart from 0");
    assert_eq!(s.requests()[1].header("range"), Some("bytes=50000-"));
}

#[tokio::test]
async fn fetch_refuses_wrong_bytes_and_too_many_bytes() {
    let blob = data(10_000);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    let mut evil = blob.clone();
    evil[5000] ^= 1;
    let s = Server::start(move |_| Reply::new(200).body(evil.clone())).await;
    let mut sink = Recorder::default();
    let e = client()
        .fetch_blob(&reference(&s, "a/b"), &desc, &mut sink)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Digest(DigestError::Mismatch { .. })),
        "{e}"
    );
    assert!(sink.discarded && sink.bytes.is_empty());

    let mut long = blob.clone();
    long.extend_from_slice(b"trailing");
    let s = Server::start(move |_| Reply::new(200).body(long.clone())).await;
    let mut sink = Recorder::default();
    let e = client()
        .fetch_blob(&reference(&s, "a/b"), &desc, &mut sink)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Digest(DigestError::SizeMismatch { .. })),
        "{e}"
    );
    assert!(sink.discarded);

    // Always short: bounded attempts, then an error.
    let short = blob[..4000].to_vec();
    let s = Server::start(move |_| Reply::new(200).body(short.clone())).await;
    let mut sink = Recorder::default();
    let e = client()
        .fetch_blob(&reference(&s, "a/b"), &desc, &mut sink)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("broke off"), "{e}");
    assert!(sink.discarded);
}

#[tokio::test]
async fn manifests_must_match_the_pinned_and_announced_digests() {
    let s = Server::start(|_| manifest_reply()).await;
    let other = Digest::of(b"something else");
    let r = reference(&s, "a/b").with_digest(other);
    let e = client().get_manifest(&r).await.unwrap_err();
    assert!(
        matches!(e, RegistryError::Digest(DigestError::Mismatch { expected, .. }) if expected == other),
        "{e}"
    );

    let s = Server::start(move |_| manifest_reply().header("Docker-Content-Digest", other)).await;
    let e = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Digest(_)), "{e}");

    let big = vec![b' '; 5 * MIB];
    let s = Server::start(move |_| Reply::new(200).body(big.clone())).await;
    let e = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}

#[tokio::test]
async fn bearer_challenge_with_identity_token_posts_the_refresh_grant() {
    let seen: Arc<Mutex<Vec<Req>>> = Arc::default();
    let seen2 = seen.clone();
    let host = Arc::new(Mutex::new(String::new()));
    let host2 = host.clone();
    let s = Server::start(move |req| {
        if req.path() == "/token" {
            seen2.lock().unwrap().push(req.clone());
            return Reply::new(200).json(serde_json::json!({"access_token":"at-1"}));
        }
        if req.header("authorization") == Some("Bearer at-1") {
            return manifest_reply();
        }
        Reply::new(401).header(
            "WWW-Authenticate",
            format!(r#"Bearer realm="http://{}/token",service="svc.example",scope="repository:a/b:pull""#, host2.lock().unwrap()),
        )
    })
    .await;
    *host.lock().unwrap() = s.host();
    let c = client_with(
        opts(),
        Arc::new(Fixed(Credential::IdentityToken(Secret::new("refresh-me")))),
    );
    c.get_manifest(&reference(&s, "a/b:v1")).await.unwrap();
    c.get_manifest(&reference(&s, "a/b:v2")).await.unwrap();
    let tokens = seen.lock().unwrap().clone();
    assert_eq!(tokens.len(), 1, "the token is cached");
    let t = &tokens[0];
    assert_eq!(t.method, "POST");
    assert_eq!(t.form("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(t.form("service").as_deref(), Some("svc.example"));
    assert_eq!(t.form("scope").as_deref(), Some("repository:a/b:pull"));
    assert_eq!(t.form("refresh_token").as_deref(), Some("refresh-me"));
    assert_eq!(t.form("client_id").as_deref(), Some("strata"));
    // One anonymous try, then everything with the token.
    let reqs = s.requests();
    let anonymous = reqs
        .iter()
        .filter(|r| r.path() != "/token" && r.header("authorization").is_none());
    assert_eq!(anonymous.count(), 1);
}

#[tokio::test]
async fn basic_credentials_go_to_the_token_realm_and_never_into_errors() {
    let seen: Arc<Mutex<Vec<Req>>> = Arc::default();
    let seen2 = seen.clone();
    let host = Arc::new(Mutex::new(String::new()));
    let host2 = host.clone();
    let s = Server::start(move |req| {
        if req.path() == "/token" {
            seen2.lock().unwrap().push(req.clone());
            return Reply::new(401).body("bad password hunter2-secret? no, never echo");
        }
        bearer_challenge(&host2)
    })
    .await;
    *host.lock().unwrap() = s.host();
    let cred = Credential::Basic {
        username: "me".into(),
        password: Secret::new("hunter2-secret"),
    };
    let c = client_with(opts(), Arc::new(Fixed(cred)));
    let e = c.get_manifest(&reference(&s, "a/b:v1")).await.unwrap_err();
    let t = &seen.lock().unwrap()[0];
    assert_eq!(t.method, "GET");
    assert_eq!(t.query("scope"), vec!["repository:a/b:pull".to_string()]);
    assert_eq!(t.query("service"), vec!["svc".to_string()]);
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("me:hunter2-secret");
    assert_eq!(
        t.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    match &e {
        RegistryError::Auth { registry, msg } => {
            assert_eq!(registry, &s.host());
            assert!(
                msg.contains("was refused (401)") && msg.contains("check the credentials"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    for text in [e.to_string(), format!("{e:?}"), format!("{c:?}")] {
        assert!(
            !text.contains("hunter2") && !text.contains(&basic),
            "{text}"
        );
    }
}

#[tokio::test]
async fn refused_fresh_tokens_are_an_auth_error_without_the_token() {
    let host = Arc::new(Mutex::new(String::new()));
    let host2 = host.clone();
    let s = Server::start(move |req| {
        if req.path() == "/token" {
            return Reply::new(200).json(serde_json::json!({"token":"sekrit-token-value"}));
        }
        Reply::new(401).header(
            "WWW-Authenticate",
            format!(
                r#"Bearer realm="http://{}/token?account=x",service="svc""#,
                host2.lock().unwrap()
            ),
        )
    })
    .await;
    *host.lock().unwrap() = s.host();
    let e = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("sekrit"), "{text}");
    // anonymous, then with two fresh tokens: both refused, give up
    assert_eq!(
        s.requests().iter().filter(|r| r.path() != "/token").count(),
        3
    );
}

#[tokio::test]
async fn a_fresh_token_refused_once_is_replaced_once() {
    // The first fresh token is refused (as one that expired during a retry's backoff would
    // be); the second is accepted.
    let host = Arc::new(Mutex::new(String::new()));
    let host2 = host.clone();
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = Server::start(move |req| {
        if req.path() == "/token" {
            let n = issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            return Reply::new(200).json(serde_json::json!({ "token": format!("t-{n}") }));
        }
        if req.header("authorization") == Some("Bearer t-2") {
            return manifest_reply();
        }
        bearer_challenge(&host2)
    })
    .await;
    *host.lock().unwrap() = s.host();
    client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .expect("the second fresh token is used");
    let tokens = s.requests().iter().filter(|r| r.path() == "/token").count();
    assert_eq!(tokens, 2);
}

/// A 401 asking for a Bearer token from `/token` on `host` (filled in once the server runs).
fn bearer_challenge(host: &Mutex<String>) -> Reply {
    Reply::new(401).header(
        "WWW-Authenticate",
        format!(
            r#"Bearer realm="http://{}/token",service="svc""#,
            host.lock().unwrap()
        ),
    )
}

async fn fake_registry(knobs: Knobs) -> (Server, fake::Shared) {
    let state = fake::new(knobs);
    let st = state.clone();
    let s = Server::start(move |req| fake::handle(&st, req)).await;
    state.lock().unwrap().host = s.host();
    (s, state)
}

fn patches(s: &Server) -> Vec<Req> {
    s.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect()
}

fn chunky(chunk: usize) -> ClientOptions {
    ClientOptions {
        chunk_size: chunk as u64,
        monolithic_threshold: chunk as u64,
        ..opts()
    }
}

#[tokio::test]
async fn token_expiring_mid_chunked_upload_is_refreshed() {
    let (s, state) = fake_registry(Knobs {
        bearer: true,
        expire_tokens_after_patches: Some(2),
        ..Knobs::default()
    })
    .await;
    let blob = data(5 * MIB + 123);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    let events: Arc<Mutex<Vec<TransferEvent>>> = Arc::default();
    let ev = events.clone();
    let c = client_with(chunky(MIB), Arc::new(Anonymous))
        .with_progress(Arc::new(move |e| ev.lock().unwrap().push(e)));
    let r = reference(&s, "a/b");
    c.push_blob(&r, &desc, Arc::new(Bytes::from(blob.clone())))
        .await
        .unwrap();
    {
        let st = state.lock().unwrap();
        assert_eq!(st.tokens_issued, 2, "one token, then one refresh");
        assert_eq!(st.blobs[&format!("a/b@{}", desc.digest)], blob);
    }
    assert_eq!(
        patches(&s)
            .iter()
            .filter(|p| p.header("authorization").is_some())
            .count(),
        7,
        "6 chunks, one re-sent"
    );
    {
        let ev = events.lock().unwrap();
        assert_eq!(
            ev.last(),
            Some(&TransferEvent::Finished {
                digest: desc.digest,
                size: desc.size
            })
        );
        assert!(
            ev.iter()
                .any(|e| matches!(e, TransferEvent::Progress { done, .. } if *done == desc.size))
        );
    }
    // A second push is skipped after HEAD.
    c.push_blob(&r, &desc, Arc::new(Bytes::from(blob)))
        .await
        .unwrap();
    assert!(matches!(
        events.lock().unwrap().last(),
        Some(TransferEvent::Skipped { .. })
    ));
}

#[tokio::test]
async fn failed_patch_resumes_from_the_servers_range() {
    let keep = 300_000;
    let (s, state) = fake_registry(Knobs {
        break_patch: Some((1, keep)),
        ..Knobs::default()
    })
    .await;
    let blob = data(3 * MIB + MIB / 2);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    client_with(chunky(MIB), Arc::new(Anonymous))
        .push_blob(
            &reference(&s, "a/b"),
            &desc,
            Arc::new(Bytes::from(blob.clone())),
        )
        .await
        .unwrap();
    assert_eq!(
        state.lock().unwrap().blobs[&format!("a/b@{}", desc.digest)],
        blob
    );
    let reqs = s.requests();
    let broken = reqs
        .iter()
        .position(|r| {
            r.method == "PATCH"
                && r.header("content-range") == Some(&format!("{MIB}-{}", 2 * MIB - 1))
        })
        .unwrap();
    assert_eq!(
        reqs[broken + 1].method,
        "GET",
        "status asked after the failure"
    );
    let after: Vec<&Req> = reqs[broken + 1..]
        .iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    let resumed = after[0].header("content-range").unwrap();
    assert!(
        resumed.starts_with(&format!("{}-", MIB + keep)),
        "{resumed}"
    );
    let resent: usize = after.iter().map(|r| r.body.len()).sum();
    assert_eq!(
        resent,
        blob.len() - MIB - keep,
        "only the missing bytes are sent again"
    );
}

#[tokio::test]
async fn chunk_min_length_is_honoured() {
    let (s, _) = fake_registry(Knobs {
        min_chunk: Some(3 * MIB as u64),
        ..Knobs::default()
    })
    .await;
    let blob = data(7 * MIB);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    client_with(chunky(MIB), Arc::new(Anonymous))
        .push_blob(&reference(&s, "a/b"), &desc, Arc::new(Bytes::from(blob)))
        .await
        .unwrap();
    let sizes: Vec<usize> = patches(&s).iter().map(|p| p.body.len()).collect();
    assert_eq!(sizes, vec![3 * MIB, 3 * MIB, MIB]);
    for p in patches(&s) {
        assert_eq!(p.header("content-type"), Some("application/octet-stream"));
    }
}

#[tokio::test]
async fn refused_patch_falls_back_to_monolithic() {
    for status in [413, 400] {
        let (s, state) = fake_registry(Knobs {
            refuse_patch: Some(status),
            ..Knobs::default()
        })
        .await;
        let blob = data(2 * MIB + 5);
        let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
        client_with(chunky(MIB), Arc::new(Anonymous))
            .push_blob(
                &reference(&s, "a/b"),
                &desc,
                Arc::new(Bytes::from(blob.clone())),
            )
            .await
            .unwrap();
        assert_eq!(
            state.lock().unwrap().blobs[&format!("a/b@{}", desc.digest)],
            blob
        );
        let reqs = s.requests();
        assert!(
            reqs.iter().any(|r| r.method == "DELETE"),
            "abandoned session cancelled"
        );
        let put = reqs.iter().find(|r| r.method == "PUT").unwrap();
        assert_eq!(put.body.len(), blob.len());
    }
}

#[tokio::test]
async fn plain_http_is_refused_for_other_hosts() {
    let (s, _) = fake_registry(Knobs {
        location_prefix: Some("http://uploads.example.com".into()),
        ..Knobs::default()
    })
    .await;
    let blob = data(100);
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    let e = client()
        .push_blob(&reference(&s, "a/b"), &desc, Arc::new(Bytes::from(blob)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RegistryError::Insecure { registry } if registry == "uploads.example.com"),
        "{e}"
    );

    let (s, _) = fake_registry(Knobs {
        bearer: true,
        realm: Some("http://auth.example.com/token".into()),
        ..Knobs::default()
    })
    .await;
    let e = client()
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RegistryError::Insecure { registry } if registry == "auth.example.com"),
        "{e}"
    );

    // Listing the host as insecure allows it (the connection then fails: nothing listens).
    let mut o = opts();
    o.insecure_registries = vec!["auth.example.com".into()];
    o.max_attempts = 1;
    let e = client_with(o, Arc::new(Anonymous))
        .get_manifest(&reference(&s, "a/b:v1"))
        .await
        .unwrap_err();
    assert!(!matches!(e, RegistryError::Insecure { .. }), "{e}");
}

#[tokio::test]
async fn mounts_and_tag_pages() {
    let mount_status = Arc::new(Mutex::new(201));
    let ms = mount_status.clone();
    let s = Server::start(move |req| {
        let path = req.path();
        if path == "/v2/a/b/blobs/uploads/" && req.method == "POST" {
            assert_eq!(req.query("from"), vec!["c/d".to_string()]);
            return Reply::new(*ms.lock().unwrap())
                .header("Location", "/v2/a/b/blobs/uploads/x?_state=1");
        }
        if path == "/v2/a/b/tags/list" {
            return match req.query("last").first().map(String::as_str) {
                None => Reply::new(200)
                    .header("Link", r#"</v2/a/b/tags/list?n=2&last=v2>; rel="next""#)
                    .json(serde_json::json!({"name":"a/b","tags":["v1","v2"]})),
                Some("v2") => Reply::new(200).json(serde_json::json!({"name":"a/b","tags":["v3"]})),
                Some(_) => Reply::new(500),
            };
        }
        Reply::new(204)
    })
    .await;
    let c = client();
    let r = reference(&s, "a/b");
    let d = Digest::of(b"layer");
    assert!(c.mount_blob(&r, &d, "c/d").await.unwrap());
    *mount_status.lock().unwrap() = 202;
    assert!(!c.mount_blob(&r, &d, "c/d").await.unwrap());
    assert!(
        s.requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path() == "/v2/a/b/blobs/uploads/x")
    );
    assert_eq!(c.list_tags(&r).await.unwrap(), vec!["v1", "v2", "v3"]);
}

#[tokio::test]
async fn blob_sources_are_reopened_for_every_attempt() {
    struct Counting(Bytes, Mutex<Vec<u64>>);
    impl BlobSource for Counting {
        fn open(&self, offset: u64) -> std::io::Result<Box<dyn std::io::Read + Send>> {
            self.1.lock().unwrap().push(offset);
            self.0.open(offset)
        }
    }
    let count = Mutex::new(0);
    let s = Server::start(move |req| {
        if req.method == "POST" {
            return Reply::new(202).header("Location", "/v2/a/b/blobs/uploads/x");
        }
        if req.method == "PUT" {
            let mut c = count.lock().unwrap();
            *c += 1;
            if *c == 1 {
                return Reply::new(503);
            }
            return Reply::new(201);
        }
        Reply::new(404)
    })
    .await;
    let blob = Bytes::from(data(1000));
    let desc = Descriptor::for_bytes(MediaType::OciLayerGzip, &blob);
    let src = Arc::new(Counting(blob, Mutex::default()));
    client()
        .push_blob(&reference(&s, "a/b"), &desc, src.clone())
        .await
        .unwrap();
    assert_eq!(*src.1.lock().unwrap(), vec![0, 0]);
    let puts: Vec<Req> = s
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), 2);
    assert!(
        puts.iter()
            .all(|p| p.body.len() == 1000 && p.query("digest") == vec![desc.digest.to_string()])
    );
}
