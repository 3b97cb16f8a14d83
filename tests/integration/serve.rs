//! `strata serve` end to end on real parts: an Altinn-shaped app repository served by
//! `git http-backend`, the CNCF registry, the binary on a loopback port. Publish → events →
//! image in the registry; auth and validation; delete and cancel; kill -9 durability; the
//! Gitea webhook; PostgreSQL replicas.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::git_server::{Auth, GitServer};
use crate::registry::Registry;
use crate::serve_support::*;

const GIT_TOKEN: &str = "gitea-token-3f9a1c";

fn publish(repo: &str, image: &str) -> Value {
    json!({
        "repository": repo, "ref": "main", "context": "", "dockerfile": "Dockerfile",
        "image": image, "push": true, "git_token": GIT_TOKEN,
        "build_args": {}, "labels": {"studio.altinn.app": "ttd/serve-app"},
    })
}

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

/// A build of a repository with `mb` MiB of incompressible media, pushed through a proxy at
/// `rate` bytes a second.
fn slow_setup(git: &GitServer, name: &str, mb: usize) -> String {
    app_repo(git, &format!("repos/ttd/{name}.git"), mb << 20).0
}

fn wait_event(serve: &Serve, id: &str, kind: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let evs = events_so_far(serve, id);
        if evs.iter().any(|e| e["type"] == kind) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} event for {id}: {evs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The events stored so far: what an SSE listener gets in its first 700 ms.
fn events_so_far(serve: &Serve, id: &str) -> Vec<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(serve.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    write!(
        s,
        "GET /api/v1/builds/{id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

#[test]
fn delete_queued_and_cancel_running_builds() {
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let url = slow_setup(&git, "slow-app", 6);
    let reg = Registry::anonymous();
    let slow = Throttle::start(reg.addr(), 256 * 1024);
    let env = Env::new();
    let serve = Serve::start(&env, &["--workers", "1"]);

    let running = serve.submit(&publish(&url, &slow.image("ttd/slow-app:1")));
    let queued = serve.submit(&publish(&url, &slow.image("ttd/slow-app:2")));
    wait_event(&serve, &running, "built", 120);
    assert_eq!(
        serve.build(&queued)["state"],
        "queued",
        "same app: waits its turn"
    );

    let r = serve.req("DELETE", &format!("/api/v1/builds/{queued}"), b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "cancelled");

    let asked = Instant::now();
    let r = serve.req("DELETE", &format!("/api/v1/builds/{running}"), b"");
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let b = serve.wait_final(&running, 30);
    assert_eq!(b["state"], "cancelled", "{b:#}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "stopped promptly"
    );
    assert_eq!(b["digest"], Value::Null);
    assert_eq!(serve.build(&queued)["state"], "cancelled");
    // Deleting an ended build is a conflict, not a crash.
    assert_eq!(
        serve
            .req("DELETE", &format!("/api/v1/builds/{running}"), b"")
            .status,
        409
    );

    // Nothing tagged: not in the registry, not in the store; no temp files left.
    slow.set_rate(0);
    assert!(registry_tags(&reg, "ttd/slow-app").is_empty());
    let events = serve.events(&running);
    assert_eq!(events.last().expect("events").2["state"], "cancelled");
    drop(serve);
    assert!(env.names().is_empty(), "{:?}", env.names());
    assert!(
        tmp_entries(&env.home()).is_empty(),
        "{:?}",
        tmp_entries(&env.home())
    );
    env.fsck();
}

#[test]
fn kill_9_mid_build_requeues_once_and_finishes_exactly_once() {
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let slow_url = slow_setup(&git, "big-app", 6);
    let (small_url, _) = app_repo(&git, "repos/ttd/small-app.git", 0);
    let reg = Registry::anonymous();
    let slow = Throttle::start(reg.addr(), 256 * 1024);
    let env = Env::new();
    let mut serve = Serve::start(&env, &["--workers", "1"]);

    let a = serve.submit(&publish(&slow_url, &slow.image("ttd/big-app:1")));
    let b = serve.submit(&publish(&small_url, &reg.image("ttd/small-app:1")));
    let c = serve.submit(&publish(&slow_url, &reg.image("ttd/big-app:2")));
    wait_event(&serve, &a, "built", 120);
    serve.kill9();

    slow.set_rate(0);
    let serve = Serve::start(&env, &["--workers", "2"]);
    let mut digests = Vec::new();
    for id in [&a, &b, &c] {
        let build = serve.wait_final(id, 180);
        assert_eq!(build["state"], "succeeded", "{build:#}");
        digests.push(build["digest"].as_str().expect("digest").to_string());
    }
    assert_eq!(serve.build(&a)["attempts"], 2, "re-queued once");
    assert_eq!(serve.build(&b)["attempts"], 1);
    assert_eq!(serve.build(&c)["attempts"], 1);
    for id in [&a, &b, &c] {
        let finals: Vec<Value> = serve
            .events(id)
            .into_iter()
            .map(|(_, _, v)| v)
            .filter(|v| v["type"] == "state" && v["state"] == "succeeded")
            .collect();
        assert_eq!(finals.len(), 1, "{id} finished once: {finals:?}");
    }
    let a_events = serve.events(&a);
    assert!(
        a_events
            .iter()
            .any(|(_, _, v)| v["state"] == "queued" && v["reason"].is_string()),
        "the re-queue is in the log"
    );
    assert_eq!(
        registry_digest(&reg, "ttd/big-app", "1").as_deref(),
        Some(digests[0].as_str())
    );
    assert_eq!(
        registry_digest(&reg, "ttd/small-app", "1").as_deref(),
        Some(digests[1].as_str())
    );
    assert_eq!(
        registry_digest(&reg, "ttd/big-app", "2").as_deref(),
        Some(digests[2].as_str())
    );
    assert_eq!(digests[0], digests[2], "same commit, same image");
    drop(serve);
    env.fsck();
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

#[test]
fn postgres_replicas_run_each_build_exactly_once() {
    let pg = Postgres::start();
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let repos: Vec<String> = (0..5)
        .map(|i| app_repo(&git, &format!("repos/ttd/pg-app-{i}.git"), 0).0)
        .collect();
    let reg = Registry::anonymous();
    let key_dir = Env::new();
    let key = key_dir.path("secret.key");
    std::fs::write(&key, "ab".repeat(32)).expect("key");
    let flags = |w: &'static str| {
        vec![
            "--database".to_string(),
            pg.url(),
            "--secret-key-file".to_string(),
            key.to_str().expect("utf-8").to_string(),
            "--workers".to_string(),
            w.to_string(),
            "--poll".to_string(),
            "200ms".to_string(),
        ]
    };
    // Two machines: each its own store, one queue.
    let (env_a, env_b) = (Env::new(), Env::new());
    let fa = flags("2");
    let fb = flags("2");
    let a = Serve::start(&env_a, &fa.iter().map(String::as_str).collect::<Vec<_>>());
    let b = Serve::start(&env_b, &fb.iter().map(String::as_str).collect::<Vec<_>>());

    let mut ids = Vec::new();
    for n in 0..20 {
        let server = if n % 2 == 0 { &a } else { &b };
        let repo = &repos[n % repos.len()];
        let image = reg.image(&format!("ttd/pg-app-{}:{n}", n % repos.len()));
        ids.push(server.submit(&publish(repo, &image)));
    }
    let mut builds = Vec::new();
    for id in &ids {
        let build = a.wait_final(id, 240);
        assert_eq!(build["state"], "succeeded", "{build:#}");
        assert_eq!(build["attempts"], 1, "{build:#}");
        builds.push(build);
    }
    for (n, id) in ids.iter().enumerate() {
        let runs = a
            .events(id)
            .into_iter()
            .filter(|(_, _, v)| v["type"] == "state" && v["state"] == "running")
            .count();
        assert_eq!(runs, 1, "build {n} ran {runs} times");
        let tag = n.to_string();
        let repo = format!("ttd/pg-app-{}", n % repos.len());
        assert_eq!(
            registry_digest(&reg, &repo, &tag).as_deref(),
            builds[n]["digest"].as_str()
        );
    }
    // Builds of one app ran one after another, in order. The timestamps are each server's
    // clock read just before its statement, so a claim may carry a time a few ms before the
    // commit of the finish that allowed it.
    let ms = |t: &str| -> i64 {
        let time = &t[11..23];
        let n = |a: usize, b: usize| time[a..b].parse::<i64>().expect("number");
        ((n(0, 2) * 60 + n(3, 5)) * 60 + n(6, 8)) * 1000 + n(9, 12)
    };
    for r in 0..repos.len() {
        let mine: Vec<&Value> = builds.iter().skip(r).step_by(repos.len()).collect();
        for pair in mine.windows(2) {
            let (prev_end, next_start) = (
                pair[0]["finished_at"].as_str().expect("finished"),
                pair[1]["started_at"].as_str().expect("started"),
            );
            assert!(
                ms(prev_end) <= ms(next_start) + 250,
                "{prev_end} > {next_start}"
            );
        }
    }
    let started = |s: &Serve| s.log_text().matches("build started").count();
    let (na, nb) = (started(&a), started(&b));
    eprintln!("replica a ran {na} builds, replica b {nb}");
    assert_eq!(na + nb, 20, "a ran {na}, b ran {nb}");
    drop((a, b));
    env_a.fsck();
    env_b.fsck();
}

#[test]
fn sigterm_gives_running_builds_back_without_using_an_attempt() {
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let url = slow_setup(&git, "term-app", 4);
    let reg = Registry::anonymous();
    let slow = Throttle::start(reg.addr(), 256 * 1024);
    let env = Env::new();
    let mut serve = Serve::start(&env, &["--workers", "1"]);
    let id = serve.submit(&publish(&url, &slow.image("ttd/term-app:1")));
    wait_event(&serve, &id, "built", 120);
    let asked = Instant::now();
    serve.stop();
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "stopped promptly"
    );
    assert!(registry_tags(&reg, "ttd/term-app").is_empty());

    slow.set_rate(0);
    let serve = Serve::start(&env, &[]);
    let b = serve.wait_final(&id, 120);
    assert_eq!(b["state"], "succeeded", "{b:#}");
    assert_eq!(b["attempts"], 1, "a clean stop does not count");
    assert!(registry_digest(&reg, "ttd/term-app", "1").is_some());
    drop(serve);
    env.fsck();
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
fn finished_builds_are_pruned_after_the_retention() {
    let env = Env::new();
    let mut serve = Serve::start(&env, &["--workers", "1"]);
    let failed = serve.submit(&json!({"repository": "http://127.0.0.1:9/ttd/none.git",
                                      "image": "127.0.0.1:9/ttd/none:1", "push": false}));
    let b = serve.wait_final(&failed, 60);
    assert_eq!(b["state"], "failed");
    assert!(b["error"].as_str().is_some_and(|e| !e.is_empty()), "{b:#}");
    serve.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let serve = Serve::start(&env, &["--retention", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while serve
        .req("GET", &format!("/api/v1/builds/{failed}"), b"")
        .status
        != 404
    {
        assert!(Instant::now() < deadline, "not pruned");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        serve.req("GET", "/api/v1/builds", b"").json()["builds"],
        json!([])
    );
}

#[test]
fn cancel_between_build_steps_unwinds_cleanly() {
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    // Six layers of 4 MiB of noise each: seconds of compression, step after step.
    let mut files = Vec::new();
    let mut dockerfile = String::from("FROM scratch\n");
    for i in 0..6 {
        files.push((format!("big/{i}.bin"), noise(4 << 20, 100 + i)));
        dockerfile.push_str(&format!("COPY big/{i}.bin /data/{i}.bin\n"));
    }
    files.push(("Dockerfile.layers".to_string(), dockerfile.into_bytes()));
    let (url, _) = app_repo_with(&git, "repos/ttd/steps-app.git", &files);
    let (small, _) = app_repo(&git, "repos/ttd/after-app.git", 0);
    let reg = Registry::anonymous();
    let env = Env::new();
    let serve = Serve::start(&env, &["--workers", "1"]);
    let mut req = publish(&url, &reg.image("ttd/steps-app:1"));
    req["dockerfile"] = json!("Dockerfile.layers");
    let id = serve.submit(&req);
    wait_event(&serve, &id, "step_done", 120);
    let r = serve.req("DELETE", &format!("/api/v1/builds/{id}"), b"");
    assert_eq!(r.status, 202);
    let b = serve.wait_final(&id, 60);
    assert_eq!(b["state"], "cancelled", "{b:#}");
    let kinds: Vec<String> = serve.events(&id).into_iter().map(|(_, k, _)| k).collect();
    assert!(!kinds.iter().any(|k| k == "built"), "{kinds:?}");
    assert!(registry_tags(&reg, "ttd/steps-app").is_empty());

    // The worker is fine after the unwind: the next build runs.
    let next = serve.submit(&publish(&small, &reg.image("ttd/after-app:1")));
    assert_eq!(serve.wait_final(&next, 120)["state"], "succeeded");
    drop(serve);
    assert!(
        tmp_entries(&env.home()).is_empty(),
        "{:?}",
        tmp_entries(&env.home())
    );
    assert_eq!(env.names(), [reg.image("ttd/after-app:1")]);
    env.fsck();
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
