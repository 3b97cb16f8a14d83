//! Tests of the registry harness itself, proved with a real client (skopeo) where one applies,
//! and with the harness's own HTTP client for what skopeo can't show (exact faults, tokens).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::common::{Env, fixture, tool};
use crate::registry::{
    Fault, FaultProxy, Faults, Registry, TOKEN_ISSUER, TOKEN_SERVICE, TestCa, TokenCredential,
    TokenServer, http, is_blob_get,
};

/// The sample fixture built by strata and exported as an OCI layout (tag `s`).
struct Layout(PathBuf);

impl Layout {
    fn new(env: &Env) -> Layout {
        env.build(&fixture("sample"), &["-t", "s"]);
        let dir = env.path("layout");
        env.ok(&[
            "export",
            "s",
            "--output",
            &format!("oci:{}:s", dir.display()),
        ]);
        Layout(dir)
    }

    /// skopeo's name for it.
    fn source(&self) -> String {
        format!("oci:{}:s", self.0.display())
    }

    /// The manifest digest (skopeo copies the manifest unchanged).
    fn manifest_digest(&self) -> String {
        let index = json(&self.0.join("index.json"));
        index["manifests"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    }

    /// Every blob (manifest, config, layers) with its size, sorted.
    fn blobs(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = std::fs::read_dir(self.0.join("blobs/sha256"))
            .expect("layout blobs")
            .map(|e| {
                let e = e.expect("entry");
                let size = e.metadata().expect("metadata").len();
                (format!("sha256:{}", e.file_name().to_string_lossy()), size)
            })
            .collect();
        out.sort();
        out
    }

    /// The config descriptor: (digest, size).
    fn config(&self) -> (String, u64) {
        let digest = self.manifest_digest();
        let hex = digest.strip_prefix("sha256:").expect("sha256");
        let manifest = json(&self.0.join("blobs/sha256").join(hex));
        (
            manifest["config"]["digest"]
                .as_str()
                .expect("config digest")
                .to_string(),
            manifest["config"]["size"].as_u64().expect("config size"),
        )
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read json")).expect("json")
}

/// skopeo isolated from the machine's credentials and signature policy.
fn skopeo(env: &Env, args: &[&str]) -> Output {
    Command::new(tool("skopeo", "skopeo"))
        .env("HOME", env.path("skopeo-home"))
        .env("REGISTRY_AUTH_FILE", env.path("skopeo-auth.json"))
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("run skopeo")
}

fn skopeo_ok(env: &Env, args: &[&str]) -> String {
    let out = skopeo(env, args);
    assert!(
        out.status.success(),
        "skopeo {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Require failure; returns stderr.
fn skopeo_fails(env: &Env, args: &[&str]) -> String {
    let out = skopeo(env, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "skopeo {args:?} should fail");
    assert!(!stderr.trim().is_empty(), "skopeo {args:?} failed silently");
    stderr
}

fn inspect_digest(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("skopeo inspect json");
    v["Digest"].as_str().expect("Digest").to_string()
}

#[test]
fn anonymous_registry_takes_a_skopeo_push_and_logs_it() {
    let env = Env::new();
    let layout = Layout::new(&env);
    let reg = Registry::anonymous();
    assert!(reg.url().starts_with("http://127.0.0.1:"), "{}", reg.url());
    let dest = format!("docker://{}", reg.image("selftest/sample:v1"));
    skopeo_ok(
        &env,
        &["copy", "--dest-tls-verify=false", &layout.source(), &dest],
    );
    let out = skopeo_ok(&env, &["inspect", "--tls-verify=false", &dest]);
    assert_eq!(inspect_digest(&out), layout.manifest_digest());

    // Storage holds exactly the layout's blobs (manifests are blobs too).
    let expected: Vec<String> = layout.blobs().into_iter().map(|(d, _)| d).collect();
    assert_eq!(reg.blobs(), expected);
    assert_eq!(reg.blob_count(), expected.len());

    let reqs = reg.requests();
    assert!(
        reqs.iter()
            .any(|r| r.method == "PUT" && r.manifest() == Some("v1") && r.status == 201),
        "no manifest PUT in {reqs:#?}"
    );
    // Every blob but the manifest was uploaded and its upload completed with its digest.
    let completed: BTreeSet<String> = reqs
        .iter()
        .filter(|r| r.method == "PUT" && r.is_upload() && r.status == 201)
        .filter_map(|r| r.param("digest"))
        .collect();
    let blobs: BTreeSet<String> = expected
        .into_iter()
        .filter(|d| *d != layout.manifest_digest())
        .collect();
    assert_eq!(completed, blobs);
    // inspect read the config blob: the access log has its GET with the right size.
    let (config, size) = layout.config();
    assert!(
        reqs.iter().any(|r| r.method == "GET"
            && r.blob() == Some(config.as_str())
            && r.status == 200
            && r.bytes == size),
        "no GET of the config {config} ({size} bytes) in {reqs:#?}"
    );
    assert!(reqs.iter().all(|r| r.agent != crate::registry::AGENT));
}

#[test]
fn basic_auth_registry_wants_the_right_password() {
    let env = Env::new();
    let layout = Layout::new(&env);
    let reg = Registry::basic("alice", "alice-s3cret");
    let dest = format!("docker://{}", reg.image("selftest/sample:v1"));
    let copy = |creds: &str| {
        skopeo(
            &env,
            &[
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                creds,
                &layout.source(),
                &dest,
            ],
        )
    };
    let wrong = copy("alice:wrong");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
    assert!(stderr.contains("unauthorized"), "{stderr}");
    skopeo_fails(
        &env,
        &["copy", "--dest-tls-verify=false", &layout.source(), &dest],
    );
    assert_eq!(reg.blob_count(), 0);

    let right = copy("alice:alice-s3cret");
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    let out = skopeo_ok(
        &env,
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "alice:alice-s3cret",
            &dest,
        ],
    );
    assert_eq!(inspect_digest(&out), layout.manifest_digest());
    let reqs = reg.requests();
    assert!(reqs.iter().any(|r| r.status == 401), "{reqs:#?}");
    assert!(
        reqs.iter()
            .any(|r| r.manifest() == Some("v1") && r.status == 201)
    );
}

#[test]
fn tls_registry_is_trusted_through_the_test_ca() {
    let env = Env::new();
    let layout = Layout::new(&env);
    let ca = TestCa::new();
    let reg = Registry::tls(&ca);
    assert!(reg.url().starts_with("https://127.0.0.1:"), "{}", reg.url());
    assert!(ca.pem_path().is_file() && ca.cert_dir().join("ca.crt").is_file());
    let certs = ca.cert_dir();
    let certs = certs.to_str().expect("utf-8");
    let dest = format!("docker://{}", reg.image("selftest/sample:v1"));

    // Without the CA the certificate is unknown.
    let stderr = skopeo_fails(&env, &["inspect", &dest]);
    assert!(stderr.contains("certificate"), "{stderr}");

    skopeo_ok(
        &env,
        &["copy", "--dest-cert-dir", certs, &layout.source(), &dest],
    );
    let out = skopeo_ok(&env, &["inspect", "--cert-dir", certs, &dest]);
    assert_eq!(inspect_digest(&out), layout.manifest_digest());
    // The harness's own client speaks TLS too (readiness, the access-log marker).
    assert_eq!(
        reg.http("GET", "/v2/", &[], b"").expect("GET /v2/").status,
        200
    );
    assert!(reg.requests().iter().any(|r| r.manifest() == Some("v1")));
}

#[test]
fn token_registry_accepts_the_token_servers_tokens() {
    let env = Env::new();
    let layout = Layout::new(&env);
    let ts = TokenServer::new()
        .user("alice", "alice-token-pw")
        .user_with("bob", "bob-token-pw", &["pull"]);
    let reg = Registry::token(&ts);
    let dest = format!("docker://{}", reg.image("selftest/sample:v1"));
    let push = |creds: &str, to: &str| {
        skopeo(
            &env,
            &[
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                creds,
                &layout.source(),
                to,
            ],
        )
    };

    let alice = push("alice:alice-token-pw", &dest);
    assert!(
        alice.status.success(),
        "{}",
        String::from_utf8_lossy(&alice.stderr)
    );
    // bob may pull but not push.
    let out = skopeo_ok(
        &env,
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "bob:bob-token-pw",
            &dest,
        ],
    );
    assert_eq!(inspect_digest(&out), layout.manifest_digest());
    let bob_dest = format!("docker://{}", reg.image("selftest/bob:v1"));
    let bob = push("bob:bob-token-pw", &bob_dest);
    assert!(!bob.status.success(), "bob pushed without push rights");
    assert!(
        !push("alice:not-her-password", &bob_dest).status.success(),
        "a wrong password pushed"
    );

    let log = ts.requests();
    assert!(
        log.iter().any(|r| r.method == "GET"
            && r.credential == TokenCredential::Basic("alice".into())
            && r.status == 200
            && r.service.as_deref() == Some(TOKEN_SERVICE)
            && r.granted
                .iter()
                .any(|g| g == "repository:selftest/sample:pull,push")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|r| r.credential == TokenCredential::Basic("bob".into())
                && r.scopes
                    .iter()
                    .any(|s| s.ends_with("selftest/bob:pull,push"))
                && !r.granted.iter().any(|g| g.contains("push"))),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|r| r.status == 401
            && r.credential == TokenCredential::Rejected("wrong password for alice".into())),
        "{log:#?}"
    );
    let printed = format!("{log:?}");
    assert!(!printed.contains("token-pw") && !printed.contains("not-her-password"));
    let reqs = reg.requests();
    assert!(
        reqs.iter()
            .any(|r| r.manifest() == Some("v1") && r.status == 201)
    );
    assert!(
        !reqs
            .iter()
            .any(|r| r.path.contains("selftest/bob") && r.status == 201)
    );
}

/// GET realm with Basic auth; returns the JSON answer.
fn get_token(ts: &TokenServer, basic: Option<&str>, query: &str) -> (u16, serde_json::Value) {
    let auth = basic.map(|b| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    });
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let r = http(
        ts.addr(),
        None,
        "GET",
        &format!("/token?{query}"),
        &headers,
        b"",
    )
    .expect("GET token");
    (r.status, r.json())
}

fn post_token(ts: &TokenServer, form: &str) -> (u16, serde_json::Value) {
    let r = http(
        ts.addr(),
        None,
        "POST",
        "/token",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )
    .expect("POST token");
    (r.status, r.json())
}

/// Start an upload with a bearer token: 202 when the token grants push.
fn start_upload(reg: &Registry, repo: &str, token: &str) -> u16 {
    let bearer = format!("Bearer {token}");
    reg.http(
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[("Authorization", &bearer)],
        b"",
    )
    .expect("POST upload")
    .status
}

#[test]
fn token_server_speaks_both_grant_flows() {
    let ts = TokenServer::new()
        .user("alice", "alice-pw")
        .refresh_token("rt-seeded", "alice")
        .anonymous(&["pull"]);
    let reg = Registry::token(&ts);
    let scope = "service=strata-test-registry&scope=repository%3Aflows%3Apull%2Cpush";

    // GET, Basic, offline_token: a token the registry accepts, and a refresh token.
    let (status, answer) = get_token(
        &ts,
        Some("alice:alice-pw"),
        &format!("{scope}&offline_token=true"),
    );
    assert_eq!(status, 200, "{answer}");
    let token = answer["token"].as_str().expect("token");
    assert_eq!(answer["access_token"], answer["token"]);
    assert!(answer["expires_in"].as_u64().expect("expires_in") >= 1);
    assert!(
        answer["issued_at"]
            .as_str()
            .expect("issued_at")
            .ends_with('Z')
    );
    let refresh = answer["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_string();
    assert_eq!(start_upload(&reg, "flows", token), 202);

    // The JWT has what the spec asks for.
    let parts: Vec<&str> = token.split('.').collect();
    let decode = |p: &str| -> serde_json::Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .expect("base64url"),
        )
        .expect("json")
    };
    let (header, claims) = (decode(parts[0]), decode(parts[1]));
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["x5c"].as_array().expect("x5c").len(), 1);
    assert_eq!(claims["iss"], TOKEN_ISSUER);
    assert_eq!(claims["aud"], TOKEN_SERVICE);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "flows", "actions": ["pull", "push"]}])
    );

    // POST refresh_token, both the issued and a configured one.
    for rt in [refresh.as_str(), "rt-seeded"] {
        let (status, answer) = post_token(
            &ts,
            &format!("grant_type=refresh_token&refresh_token={rt}&client_id=strata&{scope}"),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            start_upload(&reg, "flows", answer["access_token"].as_str().unwrap()),
            202
        );
    }
    let (status, _) = post_token(
        &ts,
        &format!("grant_type=refresh_token&refresh_token=rt-nope&{scope}"),
    );
    assert_eq!(status, 401);

    // POST password, offline: a refresh token too.
    let (status, answer) = post_token(
        &ts,
        &format!(
            "grant_type=password&username=alice&password=alice-pw&access_type=offline&client_id=strata&{scope}"
        ),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer["refresh_token"].is_string());

    // Anonymous: pull only, so the registry refuses the upload.
    let (status, answer) = get_token(&ts, None, scope);
    assert_eq!(status, 200);
    assert_eq!(
        start_upload(&reg, "flows", answer["token"].as_str().unwrap()),
        401
    );

    let log = ts.requests();
    let creds: Vec<&TokenCredential> = log.iter().map(|r| &r.credential).collect();
    assert_eq!(
        creds,
        [
            &TokenCredential::Basic("alice".into()),
            &TokenCredential::RefreshToken("alice".into()),
            &TokenCredential::RefreshToken("alice".into()),
            &TokenCredential::Rejected("unknown refresh token".into()),
            &TokenCredential::Password("alice".into()),
            &TokenCredential::Anonymous,
        ]
    );
    assert_eq!(log[1].grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(log[5].granted, ["repository:flows:pull"]);
    assert!(!format!("{log:?}").contains("alice-pw") && !format!("{log:?}").contains(&refresh));

    // Without POST support the realm answers 404, as some registries do.
    ts.config().accept_post = false;
    let (status, _) = post_token(
        &ts,
        &format!("grant_type=password&username=alice&password=alice-pw&{scope}"),
    );
    assert_eq!(status, 404);
}

#[test]
fn strict_expiry_makes_the_registry_refuse_old_tokens() {
    let ts = TokenServer::new()
        .user("alice", "alice-pw")
        .lifetime(Duration::from_secs(1))
        .strict_expiry();
    let reg = Registry::token(&ts);
    let token = ts.issue("alice", &[("expiry", &["pull", "push"])]);
    assert_eq!(start_upload(&reg, "expiry", &token), 202);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(start_upload(&reg, "expiry", &token), 401);
}

fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A 1000-byte blob pushed straight to the registry; returns (digest, bytes).
fn push_blob(reg: &Registry, repo: &str) -> (String, Vec<u8>) {
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = sha256(&bytes);
    let start = reg
        .http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")
        .expect("start upload");
    assert_eq!(start.status, 202);
    let location = start.header("location").expect("Location");
    let path = location.strip_prefix(&reg.url()).unwrap_or(location);
    let r = reg
        .http(
            "PUT",
            &format!("{path}&digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            &bytes,
        )
        .expect("monolithic upload");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    (digest, bytes)
}

#[test]
fn transparent_proxy_changes_nothing_and_counts_bytes() {
    let env = Env::new();
    let layout = Layout::new(&env);
    let reg = Registry::anonymous();
    let proxy = FaultProxy::transparent(&reg);
    let dest = format!("docker://{}", proxy.image("selftest/sample:v1"));
    skopeo_ok(
        &env,
        &["copy", "--dest-tls-verify=false", &layout.source(), &dest],
    );
    let out = skopeo_ok(&env, &["inspect", "--tls-verify=false", &dest]);
    assert_eq!(inspect_digest(&out), layout.manifest_digest());

    let counts = proxy.counts();
    assert_eq!(counts.injected(), 0, "{counts:?}");
    assert_eq!(counts.requests, counts.passed, "{counts:?}");
    let proxied = proxy.requests();
    assert_eq!(proxied.len() as u64, counts.requests);
    assert_eq!(reg.requests().len(), proxied.len(), "{proxied:#?}");
    // Every byte of every blob but the manifest went up as request bodies, once.
    let uploaded: u64 = proxied
        .iter()
        .filter(|r| r.target.contains("/blobs/uploads/"))
        .map(|r| r.request_bytes)
        .sum();
    let manifest = layout.manifest_digest();
    let blobs: u64 = layout
        .blobs()
        .iter()
        .filter(|(d, _)| *d != manifest)
        .map(|(_, s)| s)
        .sum();
    assert_eq!(uploaded, blobs, "{proxied:#?}");
}

#[test]
fn scripted_faults_happen_in_order() {
    let reg = Registry::anonymous();
    let (digest, bytes) = push_blob(&reg, "faults");
    let proxy = FaultProxy::new(
        &reg,
        Faults {
            cut_after: Some(10),
            ..Faults::script(&[
                Fault::Status(503),
                Fault::Status(429),
                Fault::Reset,
                Fault::Truncate,
                Fault::Status(500),
            ])
        },
    );
    let get = || {
        http(
            proxy.addr(),
            None,
            "GET",
            &format!("/v2/faults/blobs/{digest}"),
            &[],
            b"",
        )
    };

    let r = get().expect("503 answer");
    assert_eq!((r.status, r.header("retry-after")), (503, Some("0")));
    let r = get().expect("429 answer");
    assert_eq!((r.status, r.header("retry-after")), (429, Some("0")));
    assert!(get().is_err(), "reset went unnoticed");
    let e = get().expect_err("truncation went unnoticed");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(e.to_string(), "body truncated: 10 of 1000 bytes");
    assert_eq!(get().expect("500 answer").status, 500);
    let r = get().expect("script over: pass");
    assert_eq!((r.status, &r.body), (200, &bytes));

    let counts = proxy.counts();
    assert_eq!(
        (
            counts.unavailable,
            counts.too_many_requests,
            counts.resets,
            counts.truncations,
            counts.other_status,
            counts.passed,
            counts.requests,
        ),
        (1, 1, 1, 1, 1, 1, 6),
        "{counts:?}"
    );
    let faults: Vec<Fault> = proxy.requests().iter().map(|r| r.fault).collect();
    assert_eq!(
        faults,
        [
            Fault::Status(503),
            Fault::Status(429),
            Fault::Reset,
            Fault::Truncate,
            Fault::Status(500),
            Fault::Pass
        ]
    );
}

#[test]
fn corruption_hits_blob_bodies_only() {
    let reg = Registry::anonymous();
    let (digest, bytes) = push_blob(&reg, "corrupt");
    let proxy = FaultProxy::new(
        &reg,
        Faults {
            corrupt_blobs: 1.0,
            only: Some(is_blob_get),
            ..Faults::none()
        },
    );
    let path = format!("/v2/corrupt/blobs/{digest}");
    let r = http(proxy.addr(), None, "GET", &path, &[], b"").expect("GET blob");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), bytes.len());
    assert_ne!(r.body, bytes);
    assert_ne!(sha256(&r.body), digest);
    let differing = r.body.iter().zip(&bytes).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 1);
    // HEAD and non-blob requests pass untouched.
    assert_eq!(
        http(proxy.addr(), None, "HEAD", &path, &[], b"")
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        http(proxy.addr(), None, "GET", "/v2/", &[], b"")
            .unwrap()
            .body,
        b"{}"
    );
    let counts = proxy.counts();
    assert_eq!((counts.corruptions, counts.passed), (1, 2), "{counts:?}");
}

/// What a client saw, comparable across runs.
fn outcome(r: std::io::Result<crate::registry::HttpResponse>) -> String {
    match r {
        Ok(r) => format!("status {} ({} bytes)", r.status, r.body.len()),
        Err(e) => format!("error {:?}", e.kind()),
    }
}

#[test]
fn the_same_seed_gives_the_same_faults() {
    let reg = Registry::anonymous();
    let (digest, _) = push_blob(&reg, "seeded");
    let faults = Faults {
        seed: 42,
        unavailable: 0.2,
        too_many_requests: 0.2,
        reset: 0.2,
        truncate: 0.2,
        ..Faults::none()
    };
    let run = |faults: Faults| {
        let proxy = FaultProxy::new(&reg, faults);
        let seen: Vec<String> = (0..20)
            .map(|_| {
                outcome(http(
                    proxy.addr(),
                    None,
                    "GET",
                    &format!("/v2/seeded/blobs/{digest}"),
                    &[],
                    b"",
                ))
            })
            .collect();
        (seen, proxy.counts())
    };
    let (first, counts) = run(faults.clone());
    let (second, _) = run(faults.clone());
    assert_eq!(first, second);
    let (other, _) = run(Faults { seed: 43, ..faults });
    assert_ne!(first, other, "seed makes no difference");
    assert!(counts.injected() > 0 && counts.passed > 0, "{counts:?}");
    assert_eq!(counts.requests, 20);
    assert_eq!(
        counts.requests,
        counts.passed + counts.injected(),
        "{counts:?}"
    );
}

#[test]
fn skopeo_through_a_faulty_proxy_succeeds_or_fails_cleanly() {
    let env = Env::new();
    let layout = Layout::new(&env);
    let reg = Registry::anonymous();
    let proxy = FaultProxy::transparent(&reg);
    let dest = format!("docker://{}", proxy.image("selftest/sample:v1"));
    skopeo_ok(
        &env,
        &["copy", "--dest-tls-verify=false", &layout.source(), &dest],
    );
    proxy.set_faults(Faults {
        seed: 1,
        unavailable: 0.15,
        too_many_requests: 0.1,
        reset: 0.1,
        truncate: 0.1,
        corrupt_blobs: 0.3,
        ..Faults::none()
    });
    let before = proxy.counts();
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..8 {
        let out = skopeo(&env, &["inspect", "--tls-verify=false", &dest]);
        if out.status.success() {
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(inspect_digest(&stdout), layout.manifest_digest());
            ok += 1;
        } else {
            assert!(!out.stderr.is_empty(), "skopeo failed without a word");
            failed += 1;
        }
    }
    let counts = proxy.counts();
    assert!(counts.injected() > before.injected(), "{counts:?}");
    assert_eq!(
        counts.requests,
        counts.passed + counts.injected(),
        "{counts:?}"
    );
    eprintln!("skopeo through faults: {ok} ok, {failed} failed, {counts:?}");
    assert_eq!(ok + failed, 8);
}

#[test]
fn a_fault_proxy_can_front_the_token_server() {
    let ts = TokenServer::new().user("alice", "alice-pw");
    let proxy = FaultProxy::to(ts.addr(), Faults::script(&[Fault::Status(503)]));
    let reg = Registry::start(ts.auth_with_realm(format!("{}/token", proxy.url())), None);
    let challenge = reg.http("GET", "/v2/", &[], b"").expect("GET /v2/");
    assert_eq!(challenge.status, 401);
    let www = challenge.header("www-authenticate").expect("challenge");
    assert!(www.contains(&proxy.url()), "{www}");
    let token = |expect: u16| {
        let r = http(
            proxy.addr(),
            None,
            "GET",
            "/token?service=strata-test-registry",
            &[],
            b"",
        )
        .expect("GET token through the proxy");
        assert_eq!(r.status, expect);
    };
    token(503);
    token(200);
    assert_eq!(ts.requests().len(), 1);
}
