//! `strata serve` end to end on real parts: an Altinn-shaped app repository served by
//! `git http-backend`, the CNCF registry, the binary on a loopback port. Publish → events →
//! image (and Flux artifact) in the registry; auth and validation; the Gitea webhook; load.
//! Durability (cancel, kill -9, restarts, PostgreSQL replicas) is in `serve_durable`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::git_server::{Auth, GitServer};
use crate::registry::Registry;
use crate::serve_support::*;

#[test]
fn publish_streams_events_and_pushes_the_image() {
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let (url, commit) = app_repo(&git, "repos/ttd/serve-app.git", 0);
    let reg = Registry::anonymous();
    let env = Env::new();
    let serve = Serve::start(&env, &["--workers", "2"]);

    let image = reg.image("ttd/serve-app:1");
    let r = serve.req_with(
        "POST",
        "/api/v1/builds",
        &[("Idempotency-Key", "publish-1")],
        publish(&url, &image).to_string().as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let created = r.json();
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(
        r.header("location"),
        Some(format!("/api/v1/builds/{id}").as_str())
    );
    for key in [
        "state",
        "created_at",
        "started_at",
        "finished_at",
        "digest",
        "tags",
        "error",
    ] {
        assert!(created.get(key).is_some(), "{key} missing from {created}");
    }
    assert!(
        !r.body
            .windows(GIT_TOKEN.len())
            .any(|w| w == GIT_TOKEN.as_bytes())
    );

    // The same key is the same build; the same key for another request is refused.
    let again = serve.req_with(
        "POST",
        "/api/v1/builds",
        &[("Idempotency-Key", "publish-1")],
        publish(&url, &image).to_string().as_bytes(),
    );
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["id"], created["id"]);
    let other = serve.req_with(
        "POST",
        "/api/v1/builds",
        &[("Idempotency-Key", "publish-1")],
        publish(&url, &reg.image("ttd/serve-app:2"))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(other.status, 422);

    // A listener that comes late gets the whole log from the start, then the stream ends.
    let b = serve.wait_final(&id, 120);
    assert_eq!(b["state"], "succeeded", "{b:#}");
    assert_eq!(b["commit"], commit.as_str());
    assert_eq!(b["attempts"], 1);
    assert_eq!(b["tags"], json!([image]));
    let digest = b["digest"].as_str().expect("digest");
    assert_eq!(
        registry_digest(&reg, "ttd/serve-app", "1").as_deref(),
        Some(digest),
        "the registry serves the build's digest"
    );

    let events = serve.events(&id);
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    for k in [
        "state",
        "fetch",
        "fetched",
        "step",
        "step_done",
        "built",
        "pushed",
    ] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    let ids: Vec<i64> = events.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "ordered, gapless"
    );
    let (_, _, last) = events.last().expect("events");
    assert_eq!(last["state"], "succeeded");
    assert_eq!(last["digest"], digest);
    // Resuming after an event id replays only what follows.
    let resumed = serve.req_with(
        "GET",
        &format!("/api/v1/builds/{id}/events"),
        &[("Last-Event-ID", &(ids.len() as i64 - 2).to_string())],
        b"",
    );
    assert_eq!(parse_sse(&String::from_utf8_lossy(&resumed.body)).len(), 2);

    // The image is the app: App/ in, deployment/ and the Dockerfile out.
    let puller = Env::new();
    puller.ok(&["pull", &image]);
    let tree = puller.unpack(&image, "app");
    assert!(tree.contains_key("App/Program.cs"), "{:?}", tree.keys());
    assert!(tree.contains_key("App/config/applicationmetadata.json"));
    assert!(
        !tree
            .keys()
            .any(|k| k.contains("deployment") || k.contains("Dockerfile"))
    );
    let inspect: Value = serde_json::from_str(&puller.ok(&["inspect", &image])).expect("json");
    let config = &inspect["Config"]["config"];
    assert_eq!(config["Labels"]["studio.altinn.app"], "ttd/serve-app");
    assert_eq!(config["User"], "1000:3000");
    puller.fsck();

    // Listed, filterable; the token is nowhere: not in answers, logs or the database.
    let list = serve.req("GET", "/api/v1/builds?state=succeeded&limit=10", b"");
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["builds"][0]["id"], id.as_str());
    let queued = serve.req("GET", "/api/v1/builds?state=queued", b"").json();
    assert_eq!(queued["builds"], json!([]));
    assert!(
        !list
            .body
            .windows(GIT_TOKEN.len())
            .any(|w| w == GIT_TOKEN.as_bytes())
    );
    assert!(!serve.log_text().contains(GIT_TOKEN));
    let leaks = occurs_in_tree(&env.home(), GIT_TOKEN.as_bytes());
    assert!(leaks.is_empty(), "token in clear in {leaks:?}");

    // Health and metrics.
    let h = serve.raw("GET", "/healthz", &[], b"");
    assert_eq!(h.status, 200);
    let m = serve.req("GET", "/metrics", b"");
    let text = String::from_utf8_lossy(&m.body).into_owned();
    assert!(text.contains("strata_serve_queue_depth 0"), "{text}");
    assert!(
        text.contains("strata_serve_builds{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("strata_serve_build_duration_seconds_count{state=\"succeeded\"} 1"));
    assert!(text.contains("strata_serve_cache_hit_ratio"));

    drop(serve);
    env.fsck();
}

#[test]
fn unauthenticated_and_hostile_requests_get_clear_4xx() {
    let env = Env::new();
    let serve = Serve::start(&env, &["--max-body", "64KiB"]);
    let good = publish(
        "https://gitea.example/repos/ttd/app.git",
        "registry.example/ttd-app:1",
    );

    // No token, a wrong one, any path: 401 and nothing else.
    for (method, path) in [
        ("GET", "/api/v1/builds"),
        ("POST", "/api/v1/builds"),
        ("GET", "/api/v1/builds/0123abcd"),
        ("DELETE", "/api/v1/builds/0123abcd"),
        ("GET", "/api/v1/builds/0123abcd/events"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/nothing-here"),
    ] {
        let r = serve.raw(method, path, &[], good.to_string().as_bytes());
        assert_eq!(r.status, 401, "{method} {path}");
        assert_eq!(r.json(), json!({"error": "unauthorized"}));
        let r = serve.raw(method, path, &[("Authorization", "Bearer nope")], b"");
        assert_eq!(r.status, 401, "{method} {path}");
    }
    assert_eq!(
        serve.req("GET", "/api/v1/builds", b"").json()["builds"],
        json!([])
    );

    let post = |body: &[u8]| {
        let r = serve.req("POST", "/api/v1/builds", body);
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        (r.status, msg)
    };
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b.to_string()
    };
    for (body, status, needle) in [
        (b"{not json".to_vec(), 400, "invalid build request"),
        (b"[]".to_vec(), 400, "invalid build request"),
        (b"{}".to_vec(), 400, "missing field"),
        (
            with("colour", json!("red")).into_bytes(),
            400,
            "unknown field",
        ),
        (
            with("context", json!("../../etc")).into_bytes(),
            400,
            "must not leave",
        ),
        (with("context", json!("/etc")).into_bytes(), 400, "relative"),
        (
            with("dockerfile", json!("App/../../x")).into_bytes(),
            400,
            "must not leave",
        ),
        (
            with("ref", json!("main..x")).into_bytes(),
            400,
            "not a valid",
        ),
        (with("ref", json!("")).into_bytes(), 400, "not a valid"),
        (
            with("repository", json!("file:///etc/passwd")).into_bytes(),
            400,
            "http",
        ),
        (
            with("repository", json!("https://u:p@h/x.git")).into_bytes(),
            400,
            "credentials",
        ),
        (with("image", json!("Not A Ref")).into_bytes(), 400, "image"),
        (
            with("push", json!("yes")).into_bytes(),
            400,
            "invalid build request",
        ),
        (
            with("deploy", json!({"flux": {}})).into_bytes(),
            400,
            "deploy",
        ),
        (
            with("recipe", json!("r.toml")).into_bytes(),
            400,
            "not both",
        ),
        (with("labels", json!({"": "x"})).into_bytes(), 400, "labels"),
    ] {
        let (s, msg) = post(&body);
        assert_eq!(s, status, "{}: {msg}", String::from_utf8_lossy(&body));
        assert!(
            msg.contains(needle),
            "{}: {msg}",
            String::from_utf8_lossy(&body)
        );
    }
    let huge = with("labels", json!({"big": "x".repeat(100 * 1024)}));
    let (s, msg) = post(huge.as_bytes());
    assert_eq!((s, msg.as_str()), (413, "request body too large"));

    // Unknown ids, odd ids, bad filters.
    for path in [
        "/api/v1/builds/0123456789abcdef",
        "/api/v1/builds/..%2F..%2Fetc",
        "/api/v1/builds/0123456789abcdef/events",
    ] {
        assert_eq!(serve.req("GET", path, b"").status, 404, "{path}");
    }
    assert_eq!(serve.req("DELETE", "/api/v1/builds/ffff", b"").status, 404);
    for q in [
        "state=bogus",
        "limit=0",
        "limit=x",
        "cursor=-1",
        "color=red",
    ] {
        let r = serve.req("GET", &format!("/api/v1/builds?{q}"), b"");
        assert_eq!(r.status, 400, "{q}");
    }
    let r = serve.req_with(
        "POST",
        "/api/v1/builds",
        &[("Idempotency-Key", "")],
        good.to_string().as_bytes(),
    );
    assert_eq!(r.status, 400);

    // Still alive, still empty.
    assert_eq!(serve.raw("GET", "/healthz", &[], b"").status, 200);
    assert_eq!(
        serve.req("GET", "/api/v1/builds", b"").json()["builds"],
        json!([])
    );
}

#[test]
fn api_needs_a_token_unless_loopback_and_insecure() {
    let env = Env::new();
    let out = env
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("STRATA_SERVE_TOKEN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an API token"));
    let out = env
        .cmd()
        .args(["serve", "--listen", "0.0.0.0:0", "--insecure-no-auth"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn gitea_webhook_needs_a_valid_signature() {
    use hmac::{KeyInit, Mac};
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let (url, commit) = app_repo(&git, "repos/ttd/hook-app.git", 0);
    let reg = Registry::anonymous();
    let env = Env::new();
    let hooks = env.path("hooks.toml");
    std::fs::write(
        &hooks,
        format!(
            "[[repository]]\nrepository = \"ttd/hook-app\"\nbranches = [\"main\"]\nimage = \"{}\"\n",
            reg.image("ttd/hook-app:{short_commit}")
        ),
    )
    .expect("write hooks");
    let serve = Serve::start(
        &env,
        &[
            "--hooks",
            hooks.to_str().expect("utf-8"),
            "--webhook-secret",
            "hook-secret",
            "--webhook-git-token",
            GIT_TOKEN,
        ],
    );
    let payload = json!({
        "ref": "refs/heads/main", "before": "0".repeat(40), "after": commit,
        "repository": {"full_name": "ttd/hook-app", "clone_url": url},
        "pusher": {"login": "studio"},
    })
    .to_string();
    let sign = |body: &[u8], key: &[u8]| -> String {
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        m.update(body);
        m.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let hook = |headers: &[(&str, &str)], body: &str| {
        serve.raw("POST", "/api/v1/hooks/gitea", headers, body.as_bytes())
    };
    let wrong = sign(payload.as_bytes(), b"other-secret");
    assert_eq!(hook(&[("X-Gitea-Event", "push")], &payload).status, 401);
    assert_eq!(hook(&[("X-Gitea-Signature", &wrong)], &payload).status, 401);
    assert_eq!(hook(&[("X-Gitea-Signature", "zz")], &payload).status, 401);
    let good = sign(payload.as_bytes(), b"hook-secret");
    let tampered = payload.replace("ttd/hook-app", "ttd/evil-app");
    assert_eq!(hook(&[("X-Gitea-Signature", &good)], &tampered).status, 401);
    assert_eq!(
        serve.req("GET", "/api/v1/builds", b"").json()["builds"],
        json!([]),
        "nothing queued by bad signatures"
    );

    let headers = [
        ("X-Gitea-Signature", good.as_str()),
        ("X-Gitea-Event", "push"),
        ("X-Gitea-Delivery", "d-1"),
    ];
    let r = hook(&headers, &payload);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["builds"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    // A redelivery is the same build.
    let again = hook(&headers, &payload);
    assert_eq!(again.json()["builds"][0]["id"], id.as_str());
    let b = serve.wait_final(&id, 120);
    assert_eq!(b["state"], "succeeded", "{b:#}");
    assert_eq!(b["commit"], commit.as_str());
    assert!(registry_digest(&reg, "ttd/hook-app", &commit[..12]).is_some());
    let all = serve.req("GET", "/api/v1/builds", b"").json();
    assert_eq!(all["builds"].as_array().map(Vec::len), Some(1));
}

/// One client's (submit?, latency) per request, and its errors.
type ClientLog = (Vec<(bool, Duration)>, Vec<String>);

/// 200 API clients listing and submitting at once for `STRATA_SERVE_LOAD_SECS` (default 5)
/// seconds: no errors. Latencies are printed (and written as Markdown to
/// `$STRATA_SERVE_LOAD_REPORT` when set); they are measured, never asserted.
#[test]
fn two_hundred_clients_list_and_submit_without_errors() {
    let secs: u64 = std::env::var("STRATA_SERVE_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let env = Env::new();
    let serve = Serve::start(&env, &["--workers", "2"]);
    // Builds of a remote that refuses connections: they fail fast, the API is what is timed.
    let body = json!({"repository": "http://127.0.0.1:9/ttd/none.git", "ref": "main",
                      "image": "127.0.0.1:9/ttd/none:1", "push": false})
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let results: Vec<ClientLog> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..200)
            .map(|c| {
                let (serve, body) = (&serve, &body);
                scope.spawn(move || {
                    let mut lat = Vec::new();
                    let mut errors = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let submit = (n + c).is_multiple_of(4);
                        let t = Instant::now();
                        let r = if submit {
                            crate::registry::http(
                                serve.addr,
                                None,
                                "POST",
                                "/api/v1/builds",
                                &[("Authorization", &format!("Bearer {API_TOKEN}"))],
                                body.as_bytes(),
                            )
                        } else {
                            crate::registry::http(
                                serve.addr,
                                None,
                                "GET",
                                "/api/v1/builds?limit=20",
                                &[("Authorization", &format!("Bearer {API_TOKEN}"))],
                                b"",
                            )
                        };
                        let d = t.elapsed();
                        match r {
                            Ok(r) if r.status == if submit { 202 } else { 200 } => {}
                            Ok(r) => errors.push(format!(
                                "{}: {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            )),
                            Err(e) => errors.push(e.to_string()),
                        }
                        lat.push((submit, d));
                        n += 1;
                    }
                    (lat, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let errors: Vec<&String> = results.iter().flat_map(|(_, e)| e).collect();
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    let pct = |submit: bool| {
        let mut v: Vec<Duration> = results
            .iter()
            .flat_map(|(l, _)| l)
            .filter(|(s, _)| *s == submit)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
        (v.len(), at(0.5), at(0.99), v[v.len() - 1])
    };
    let (ln, l50, l99, lmax) = pct(false);
    let (sn, s50, s99, smax) = pct(true);
    let report = format!(
        "| request | count | p50 | p99 | max |\n|---|---|---|---|---|\n\
         | GET /api/v1/builds?limit=20 | {ln} | {l50:.1?} | {l99:.1?} | {lmax:.1?} |\n\
         | POST /api/v1/builds | {sn} | {s50:.1?} | {s99:.1?} | {smax:.1?} |\n\
         \n200 clients, {secs} s, 0 errors, `--workers 2`, embedded SQLite queue.\n"
    );
    eprintln!("{report}");
    if let Ok(path) = std::env::var("STRATA_SERVE_LOAD_REPORT") {
        std::fs::write(path, &report).expect("write report");
    }
    assert_eq!(serve.raw("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn publish_with_a_flux_hand_off_pushes_the_artifact() {
    use std::io::Read;
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let (url, commit) = app_repo(&git, "repos/ttd/flux-app.git", 0);
    let reg = Registry::anonymous();
    let env = Env::new();
    let serve = Serve::start(&env, &[]);
    let image = reg.image("ttd/flux-app:1");
    let mut req = publish(&url, &image);
    req["deploy"] = json!({"flux": {
        "artifact": format!("oci://{}", reg.image("configs/flux-app:at22-1")),
        "tags": ["at22"], "release": "ttd-flux-app", "chart_version": "3.x",
        "deployment_id": "deploy-42",
        "set_from_label": {"maskinporten.scopes": "studio.altinn.maskinporten.scopes"},
    }});
    let id = serve.submit(&req);
    let b = serve.wait_final(&id, 120);
    assert_eq!(b["state"], "succeeded", "{b:#}");
    let flux = &b["deploy"]["flux"];
    let digest = flux["digest"].as_str().expect("artifact digest");
    assert_eq!(
        registry_digest(&reg, "configs/flux-app", "at22").as_deref(),
        Some(digest)
    );
    assert_eq!(
        registry_digest(&reg, "configs/flux-app", "at22-1").as_deref(),
        Some(digest)
    );
    assert!(serve.events(&id).iter().any(|(_, k, _)| k == "deployed"));

    // The artifact holds the HelmRelease for the pushed image, pinned by digest.
    let m = reg
        .http(
            "GET",
            "/v2/configs/flux-app/manifests/at22",
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .expect("manifest")
        .json();
    assert_eq!(
        m["annotations"]["org.opencontainers.image.revision"],
        commit.as_str()
    );
    let layer = m["layers"][0]["digest"].as_str().expect("layer");
    let blob = reg
        .http(
            "GET",
            &format!("/v2/configs/flux-app/blobs/{layer}"),
            &[],
            b"",
        )
        .expect("blob")
        .body;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let mut yaml = String::new();
    for e in tar.entries().expect("tar") {
        let mut e = e.expect("entry");
        if e.path().expect("path").to_string_lossy() == "helmrelease.yaml" {
            e.read_to_string(&mut yaml).expect("read");
        }
    }
    let image_digest = b["digest"].as_str().expect("digest");
    assert!(yaml.contains(&format!("1@{image_digest}")), "{yaml}");
    assert!(yaml.contains("replicaCount: 2"), "{yaml}");
    assert!(yaml.contains("deploy-42"), "{yaml}");
    assert!(yaml.contains("name: ttd-flux-app"), "{yaml}");
}

#[test]
fn publish_with_apply_waits_for_the_rollout_and_reports_a_crash() {
    use crate::deploy_kube::{FakeKube, Scenario};
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let (url, _) = app_repo(&git, "repos/ttd/kube-app.git", 0);
    let reg = Registry::anonymous();
    let mut req = publish(&url, &reg.image("ttd/kube-app:1"));
    req["deploy"] = json!({"apply": {"name": "kube-app", "timeout_seconds": 60}});

    let env = Env::new();
    let healthy = FakeKube::start_with(Scenario::Healthy, Some("kube-t0ken"));
    let kc = env.path("kubeconfig");
    std::fs::write(&kc, healthy.kubeconfig_token("kube-t0ken", "ttd")).expect("kubeconfig");
    let serve = Serve::start(&env, &["--kubeconfig", kc.to_str().expect("utf-8")]);
    let id = serve.submit(&req);
    let b = serve.wait_final(&id, 120);
    assert_eq!(b["state"], "succeeded", "{b:#}");
    assert_eq!(
        b["deploy"]["apply"]["rolled_out"],
        json!(["ttd/deployment/kube-app"])
    );
    let digest = b["digest"].as_str().expect("digest");
    let patch = healthy
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path.ends_with("/deployments/kube-app"))
        .expect("the Deployment was applied");
    let body = String::from_utf8_lossy(&patch.body).into_owned();
    assert!(
        body.contains(&format!("{}@{digest}", reg.image("ttd/kube-app"))),
        "pinned: {body}"
    );
    let events = serve.events(&id);
    assert!(
        events
            .iter()
            .any(|(_, k, v)| k == "rollout" && v["complete"] == true),
        "{events:?}"
    );

    // A crashing pod is a failed publish, with the reason.
    let env2 = Env::new();
    let crashing = FakeKube::start(Scenario::CrashLoop);
    let kc2 = env2.path("kubeconfig");
    std::fs::write(&kc2, crashing.kubeconfig_token("x", "ttd")).expect("kubeconfig");
    let serve2 = Serve::start(&env2, &["--kubeconfig", kc2.to_str().expect("utf-8")]);
    let mut req2 = req.clone();
    req2["image"] = json!(reg.image("ttd/kube-app:2"));
    let id2 = serve2.submit(&req2);
    let b2 = serve2.wait_final(&id2, 120);
    assert_eq!(b2["state"], "failed", "{b2:#}");
    let err = b2["error"].as_str().unwrap_or_default();
    assert!(err.contains("CrashLoopBackOff"), "{err}");

    // Without a cluster, apply is refused up front.
    let env3 = Env::new();
    let serve3 = Serve::start(&env3, &[]);
    let r = serve3.req("POST", "/api/v1/builds", req.to_string().as_bytes());
    assert_eq!(r.status, 400);
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("--kubeconfig"), "{msg}");
}
