//! Credentials and transport security against real registries: htpasswd (Basic), Docker token
//! auth (users, pull-only users, identity tokens, tokens expiring mid-push) and TLS with a
//! test CA. Every strata run here reads credentials only from the test's own `DOCKER_CONFIG`,
//! and no secret may ever show up in what strata prints.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::common::*;
use crate::push_pull::{
    build, context, docker_config, fails, noise, ok, output, printed_digest, remote_digest,
    requests_since, strata, uploaded,
};
use crate::registry::{
    Fault, FaultProxy, Faults, Registry, TestCa, TokenCredential, TokenServer, is_upload,
};

const USER: &str = "alice";
const PASSWORD: &str = "correct-horse-battery-staple";
const WRONG: &str = "tr0ub4dor-and-3";

/// Fail if any of `secrets` (or the Basic `auth` value made of them) is in what strata printed.
fn assert_no_secret(out: &Output, secrets: &[&str]) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for s in secrets {
        assert!(
            !text.contains(s),
            "{s:?} leaked into strata's output:\n{text}"
        );
        let basic = STANDARD.encode(format!("{USER}:{s}"));
        assert!(!text.contains(&basic), "base64 of {s:?} leaked:\n{text}");
    }
}

/// `strata login HOST -u USER --password-stdin` with debug logging.
fn login(env: &Env, host: &str, user: &str, password: &str) -> Output {
    let mut child = strata(env)
        .args(["login", host, "-u", user, "--password-stdin"])
        .env("STRATA_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata login");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("wait for strata login");
    assert_no_secret(&out, &[password]);
    out
}

fn login_ok(env: &Env, host: &str, user: &str, password: &str) {
    let out = login(env, host, user, password);
    assert!(
        out.status.success(),
        "login failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// strata with `args` and `STRATA_LOG=debug`; checks no secret leaked.
fn debug_run(env: &Env, args: &[&str], secrets: &[&str]) -> Output {
    let out = output(strata(env).args(args).env("STRATA_LOG", "debug"));
    assert_no_secret(&out, secrets);
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `$DOCKER_CONFIG/config.json`, parsed.
fn config_json(env: &Env) -> serde_json::Value {
    let path = docker_config(env).join("config.json");
    serde_json::from_slice(&std::fs::read(&path).expect("read config.json")).expect("json")
}

/// Write `$DOCKER_CONFIG/config.json` by hand (what another tool would have left).
fn write_config_json(env: &Env, value: serde_json::Value) {
    let dir = docker_config(env);
    std::fs::create_dir_all(&dir).expect("mkdir DOCKER_CONFIG");
    std::fs::write(dir.join("config.json"), value.to_string()).expect("write config.json");
}

fn basic_auth(user: &str, password: &str) -> String {
    STANDARD.encode(format!("{user}:{password}"))
}

/// The sample, built into the store as `sample:1`; returns its digest.
fn sample(env: &Env) -> String {
    build(env, &fixture("sample"), &["-t", "sample:1"]).0
}

// ---------------------------------------------------------------------------------------------
// Basic (htpasswd)
// ---------------------------------------------------------------------------------------------

#[test]
fn login_saves_basic_credentials_that_push_uses() {
    let env = Env::new();
    let reg = Registry::basic(USER, PASSWORD);
    let host = reg.host();
    login_ok(&env, &host, USER, PASSWORD);

    let path = docker_config(&env).join("config.json");
    let mode = std::fs::metadata(&path)
        .expect("config.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "config.json mode {mode:o}");
    let config = config_json(&env);
    assert_eq!(
        config["auths"][&host]["auth"],
        basic_auth(USER, PASSWORD).as_str(),
        "{config}"
    );

    let digest = sample(&env);
    let image = reg.image("sample:1");
    let out = debug_run(
        &env,
        &["push", "--progress", "plain", "sample:1", &image],
        &[PASSWORD],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        printed_digest(&String::from_utf8_lossy(&out.stdout)),
        digest
    );
    let creds = format!("--creds={USER}:{PASSWORD}");
    assert_eq!(remote_digest(&env, &image, &[&creds]), digest);
    env.fsck();
}

#[test]
fn a_wrong_password_fails_the_push_naming_the_registry() {
    let env = Env::new();
    let reg = Registry::basic(USER, PASSWORD);
    let host = reg.host();
    write_config_json(
        &env,
        serde_json::json!({"auths": {&host: {"auth": basic_auth(USER, WRONG)}}}),
    );
    sample(&env);
    let before = reg.requests().len();
    let out = debug_run(
        &env,
        &["push", "sample:1", &reg.image("sample:1")],
        &[WRONG],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("authentication with {host} failed")),
        "{err}"
    );
    // Refused once, not hammered: a handful of requests, no upload.
    let reqs = requests_since(&reg, before);
    assert!(
        reqs.iter().all(|r| !r.is_upload() || r.status == 401),
        "{reqs:#?}"
    );
    assert!(
        reqs.len() < 20,
        "{} requests for a refused push",
        reqs.len()
    );
    assert!(reg.blobs().is_empty());
}

#[test]
fn login_checks_the_password_with_the_registry() {
    let env = Env::new();
    let reg = Registry::basic(USER, PASSWORD);
    let host = reg.host();
    let out = login(&env, &host, USER, WRONG);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("authentication with {host} failed")),
        "{err}"
    );
    assert!(
        !docker_config(&env).join("config.json").exists()
            || config_json(&env)["auths"].get(&host).is_none(),
        "refused credentials were saved"
    );
    // Right password: checked, then saved.
    let before = reg.requests().len();
    login_ok(&env, &host, USER, PASSWORD);
    assert!(
        requests_since(&reg, before)
            .iter()
            .any(|r| r.path == "/v2/" && r.status == 200),
        "login did not ask the registry"
    );
}

#[test]
fn logout_forgets_the_credentials() {
    let env = Env::new();
    let reg = Registry::basic(USER, PASSWORD);
    let host = reg.host();
    login_ok(&env, &host, USER, PASSWORD);
    sample(&env);
    ok(&env, &["push", "sample:1", &reg.image("sample:1")]);

    let (out, _) = ok(&env, &["logout", &host]);
    assert!(out.contains(&host), "{out}");
    let config = config_json(&env);
    assert!(config["auths"].get(&host).is_none(), "{config}");
    let text = std::fs::read_to_string(docker_config(&env).join("config.json")).expect("read");
    assert!(!text.contains(&basic_auth(USER, PASSWORD)), "{text}");

    let err = fails(&env, &["push", "sample:1", &reg.image("again:1")], 1);
    assert!(err.contains(&host), "{err}");
    assert!(err.contains("authentication"), "{err}");
    let (out, _) = ok(&env, &["logout", &host]);
    assert!(out.contains("Not logged in"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Token auth
// ---------------------------------------------------------------------------------------------

/// Token requests that were answered with a token.
fn granted(ts: &TokenServer) -> Vec<crate::registry::TokenRequest> {
    ts.requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .collect()
}

#[test]
fn a_token_user_with_push_rights_pushes() {
    let env = Env::new();
    let ts = TokenServer::new().user(USER, PASSWORD);
    let reg = Registry::token(&ts);
    login_ok(&env, &reg.host(), USER, PASSWORD);
    let image = reg.image("team/app:1");
    let (digest, _) = build(&env, &fixture("sample"), &["--push", "-t", &image]);
    env.fsck();
    let creds = format!("--creds={USER}:{PASSWORD}");
    assert_eq!(remote_digest(&env, &image, &[&creds]), digest);

    let log = granted(&ts);
    assert!(
        log.iter().any(|r| matches!(
            &r.credential,
            TokenCredential::Basic(u) | TokenCredential::Password(u) if u == USER
        ) && r
            .granted
            .iter()
            .any(|g| g == "repository:team/app:pull,push")),
        "no push token for {USER}: {log:#?}"
    );
}

#[test]
fn a_pull_only_user_is_refused_push_naming_registry_and_scope() {
    let env = Env::new();
    let ts = TokenServer::new().user_with("bob", PASSWORD, &["pull"]);
    let reg = Registry::token(&ts);
    let host = reg.host();
    login_ok(&env, &host, "bob", PASSWORD);
    sample(&env);
    let out = debug_run(
        &env,
        &["push", "sample:1", &reg.image("team/app:1")],
        &[PASSWORD],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&host), "{err}");
    assert!(last.contains("team/app"), "no repository in: {last}");
    assert!(last.contains("push"), "no push scope in: {last}");
    assert!(reg.blobs().is_empty());
}

#[test]
fn an_identity_token_is_exchanged_with_the_refresh_token_grant() {
    const REFRESH: &str = "rt-long-lived-identity-token-0123456789";
    let env = Env::new();
    let ts = TokenServer::new()
        .user(USER, PASSWORD)
        .refresh_token(REFRESH, USER);
    let reg = Registry::token(&ts);
    // What `docker login` leaves for registries that hand out identity tokens.
    write_config_json(
        &env,
        serde_json::json!({"auths": {reg.host(): {
            "auth": STANDARD.encode("<token>:"),
            "identitytoken": REFRESH,
        }}}),
    );
    sample(&env);
    let image = reg.image("team/app:1");
    let out = debug_run(&env, &["push", "sample:1", &image], &[REFRESH]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = ts.requests();
    let creds = format!("--creds={USER}:{PASSWORD}");
    let digest = printed_digest(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(remote_digest(&env, &image, &[&creds]), digest);

    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(r.method, "POST", "{r:#?}");
        assert_eq!(r.grant_type.as_deref(), Some("refresh_token"), "{r:#?}");
        assert_eq!(r.credential, TokenCredential::RefreshToken(USER.into()));
        assert_eq!(r.status, 200);
    }
}

#[test]
fn tokens_expiring_mid_push_are_renewed() {
    let env = Env::new();
    let ts = TokenServer::new()
        .user(USER, PASSWORD)
        .lifetime(Duration::from_secs(1))
        .strict_expiry();
    let reg = Registry::token(&ts);
    // A push over loopback takes well under a second; three dropped connections during the
    // upload each cost strata a backoff of at least half a second, so the push surely
    // outlives its first token.
    let proxy = FaultProxy::new(
        &reg,
        Faults {
            only: Some(is_upload),
            script: [Fault::Pass, Fault::Pass, Fault::Reset].repeat(3),
            ..Faults::none()
        },
    );
    login_ok(&env, &proxy.host(), USER, PASSWORD);
    let big = noise(0x5747_a7a5, 12 << 20);
    let ctx = context(
        &env,
        "big",
        "FROM scratch\nCOPY big.bin /big.bin\n",
        &[("big.bin", &big)],
    );
    // Uncompressed, so the layer is as big as the file: twelve 1 MiB chunks.
    let (digest, _) = build(
        &env,
        &ctx,
        &["-t", "big:1", "--compression", "uncompressed"],
    );
    let before = reg.requests().len();
    let out = output(strata(&env).args([
        "push",
        "--max-chunk-size",
        "1MiB",
        "--max-parallel",
        "1",
        "big:1",
        &proxy.image("big:1"),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        printed_digest(&String::from_utf8_lossy(&out.stdout)),
        digest
    );
    let log = granted(&ts);
    assert_eq!(proxy.counts().resets, 3, "{:?}", proxy.counts());
    let reqs = requests_since(&reg, before);
    let patches = reqs.iter().filter(|r| r.method == "PATCH").count();
    assert!(patches >= 12, "{patches} PATCHes: {reqs:#?}");
    let creds = format!("--creds={USER}:{PASSWORD}");
    assert_eq!(remote_digest(&env, &reg.image("big:1"), &[&creds]), digest);

    let push_tokens = log
        .iter()
        .filter(|r| r.granted.iter().any(|g| g == "repository:big:pull,push"))
        .count();
    assert!(push_tokens >= 2, "one push token for a long push: {log:#?}");
}

// ---------------------------------------------------------------------------------------------
// TLS and plain HTTP
// ---------------------------------------------------------------------------------------------

fn ca_args(ca: &TestCa) -> [String; 2] {
    ["--ca-file".into(), ca.pem_path().display().to_string()]
}

#[test]
fn a_tls_registry_is_trusted_through_ca_file_or_ssl_cert_file() {
    let env = Env::new();
    let ca = TestCa::new();
    let reg = Registry::tls(&ca);
    assert!(reg.url().starts_with("https://"));
    let image = reg.image("sample:1");
    let [flag, pem] = ca_args(&ca);
    let (digest, _) = build(
        &env,
        &fixture("sample"),
        &["--push", "-t", &image, &flag, &pem],
    );
    env.fsck();
    let certs = format!("--cert-dir={}", ca.cert_dir().display());
    assert_eq!(remote_digest_verified(&env, &image, &certs), digest);

    // The same trust from $SSL_CERT_FILE.
    let other = reg.image("other:1");
    let out = output(
        strata(&env)
            .env("SSL_CERT_FILE", ca.pem_path())
            .args(["push", &image, &other]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(remote_digest_verified(&env, &other, &certs), digest);
}

/// The digest as skopeo sees it verifying the registry's certificate with `cert_dir`.
fn remote_digest_verified(env: &Env, image: &str, cert_dir: &str) -> String {
    let out =
        crate::push_pull::skopeo_ok(env, &["inspect", cert_dir, &format!("docker://{image}")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("skopeo json");
    v["Digest"].as_str().expect("Digest").to_string()
}

#[test]
fn an_unknown_certificate_authority_is_refused() {
    let env = Env::new();
    let ca = TestCa::new();
    let reg = Registry::tls(&ca);
    sample(&env);
    // 0.0.0.0 reaches the registry on Linux without being a loopback name, so strata speaks
    // HTTPS to it whatever it does for loopback hosts.
    let host = format!("0.0.0.0:{}", reg.addr().port());
    let image = format!("{host}/sample:1");
    let err = fails(&env, &["push", "sample:1", &image], 1);
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.contains(&host), "{err}");
    assert!(
        last.to_lowercase().contains("certificate"),
        "not a TLS error: {err}"
    );

    // A CA that isn't the registry's is no better.
    let stranger = TestCa::new();
    let [flag, pem] = ca_args(&stranger);
    let err = fails(&env, &["push", &flag, &pem, "sample:1", &image], 1);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(reg.blobs().is_empty());
}

#[test]
fn a_tls_registry_on_loopback_without_its_ca_is_refused() {
    let env = Env::new();
    let ca = TestCa::new();
    let reg = Registry::tls(&ca);
    sample(&env);
    let err = fails(&env, &["push", "sample:1", &reg.image("sample:1")], 1);
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.contains(&reg.host()), "{err}");
    assert!(
        last.to_lowercase().contains("certificate"),
        "not a TLS error: {err}"
    );
}

#[test]
fn plain_http_only_for_loopback_and_insecure_registries() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let digest = sample(&env);
    // Loopback: plain HTTP without being asked.
    ok(&env, &["push", "sample:1", &reg.image("sample:1")]);
    assert_eq!(remote_digest(&env, &reg.image("sample:1"), &[]), digest);

    // 0.0.0.0 reaches the same registry on Linux, but is not a loopback name: strata must
    // insist on HTTPS there (and so fail against a plain-HTTP server)...
    let port = reg.addr().port();
    let elsewhere = format!("0.0.0.0:{port}");
    let before = reg.requests().len();
    let err = fails(&env, &["push", "sample:1", &format!("{elsewhere}/x:1")], 1);
    assert!(err.contains(&format!("https://{elsewhere}/")), "{err}");
    let reqs = requests_since(&reg, before);
    assert!(
        reqs.is_empty(),
        "plain HTTP reached the registry: {reqs:#?}"
    );

    // ...unless told it is insecure.
    let (out, _) = ok(
        &env,
        &[
            "push",
            "--insecure-registry",
            &elsewhere,
            "sample:1",
            &format!("{elsewhere}/x:1"),
        ],
    );
    assert_eq!(printed_digest(&out), digest);
    assert_eq!(remote_digest(&env, &reg.image("x:1"), &[]), digest);
    let blobs: BTreeSet<String> = uploaded(&requests_since(&reg, before));
    assert!(!blobs.is_empty());
}
