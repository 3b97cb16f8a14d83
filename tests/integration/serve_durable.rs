//! `strata serve` durability on real parts: delete and cancel (also of a running RUN step and
//! of a base-layer download), kill -9 mid-build, SIGTERM, retention, and two replicas sharing
//! a PostgreSQL queue.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::git_server::{Auth, GitServer};
use crate::registry::Registry;
use crate::serve_support::*;

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
    assert_no_tmp(&env.home());
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

    let mut with_deploy = publish(&slow_url, &slow.image("ttd/big-app:1"));
    with_deploy["deploy"] = json!({"flux": {
        "artifact": format!("oci://{}", slow.image("configs/big-app:at22-1")),
        "tags": ["at22"], "release": "ttd-big-app", "chart_version": "3.x"}});
    let a = serve.submit(&with_deploy);
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
    // The hand-off happened once, after the image, and points at it.
    let flux = serve.build(&a)["deploy"]["flux"].clone();
    assert_eq!(
        registry_digest(&reg, "configs/big-app", "at22").as_deref(),
        flux["digest"].as_str(),
        "{flux}"
    );
    drop(serve);
    env.fsck();
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
    // Sixteen layers of 4 MiB of noise each: seconds of compression, step after step (the
    // DELETE follows the first step's end, and must come before the last).
    let mut files = Vec::new();
    let mut dockerfile = String::from("FROM scratch\n");
    for i in 0..16 {
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
    assert_no_tmp(&env.home());
    assert_eq!(env.names(), [reg.image("ttd/after-app:1")]);
    env.fsck();
}

/// `DELETE` of a build whose `RUN sleep 317` is running: the sandbox is killed within
/// moments (not after 317 s), the step's directories go, nothing is tagged, and the worker's
/// next build (with a RUN of its own) succeeds.
#[test]
fn cancel_kills_a_running_run_step_promptly() {
    const SLEEP: [&str; 2] = ["sleep", "317"];
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let reg = Registry::anonymous();
    // A runnable base in the registry, as an app's `FROM` names one.
    let base_env = Env::new();
    let base_ctx = base_env.path("base");
    busybox_rootfs(&base_ctx.join("rootfs"), &["sh", "echo", "sleep"]);
    write(&base_ctx, "Dockerfile", b"FROM scratch\nCOPY rootfs/ /\n");
    let base = reg.image("ttd/busybox-base:1");
    base_env.build(&base_ctx, &["--push", "-t", &base]);
    let app = |rel: &str, run: &str| {
        let dockerfile = format!("FROM {base}\nRUN {run}\n");
        app_repo_with(
            &git,
            rel,
            &[("Dockerfile.run".to_string(), dockerfile.into_bytes())],
        )
        .0
    };
    let slow = app("repos/ttd/sleepy-app.git", "echo started && sleep 317");
    let quick = app("repos/ttd/quick-app.git", "echo ran > /ran");
    let request = |url: &str, image: &str| {
        let mut req = publish(url, &reg.image(image));
        req["dockerfile"] = json!("Dockerfile.run");
        req
    };
    assert!(
        processes_running(&SLEEP).is_empty(),
        "a sleep 317 is already running"
    );
    let env = Env::new();
    let serve = Serve::start(&env, &["--workers", "1"]);

    let id = serve.submit(&request(&slow, "ttd/sleepy-app:1"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while processes_running(&SLEEP).is_empty() {
        let state = serve.build(&id)["state"].clone();
        assert!(
            state == "queued" || state == "running",
            "the build ended early: {state}"
        );
        assert!(Instant::now() < deadline, "the RUN step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let steps: Vec<Value> = events_so_far(&serve, &id)
        .into_iter()
        .filter(|e| e["type"] == "step")
        .collect();
    assert_eq!(
        steps.last().expect("steps")["text"],
        "RUN echo started && sleep 317",
        "{steps:?}"
    );

    let b = cancel_promptly(&serve, &id, 60);
    assert_eq!(b["digest"], Value::Null);
    assert!(
        processes_running(&SLEEP).is_empty(),
        "the RUN command outlived the cancel"
    );
    // The step's overlay upper and work directories and the build's work directory are gone
    // while the server runs on.
    assert_no_tmp(&env.home());
    let events = serve.events(&id);
    assert!(
        !events.iter().any(|(_, _, v)| v["type"] == "built"),
        "{events:?}"
    );
    assert_eq!(events.last().expect("events").2["state"], "cancelled");
    assert!(registry_tags(&reg, "ttd/sleepy-app").is_empty());

    // The worker and the sandbox are fine: the next build runs its RUN step and succeeds.
    let next = serve.submit(&request(&quick, "ttd/quick-app:1"));
    let b = serve.wait_final(&next, 120);
    assert_eq!(b["state"], "succeeded", "{b:#}");
    assert_eq!(
        registry_digest(&reg, "ttd/quick-app", "1").as_deref(),
        b["digest"].as_str()
    );
    drop(serve);
    let names = env.names();
    assert!(!names.iter().any(|n| n.contains("sleepy-app")), "{names:?}");
    assert!(names.contains(&reg.image("ttd/quick-app:1")), "{names:?}");
    assert_no_tmp(&env.home());
    env.fsck();
}

/// `DELETE` of a build that is downloading its base (a stage with RUN needs the base's files)
/// through a proxy at 512 KiB/s: the download is dropped (about a minute of it was left),
/// nothing of it is stored or left in `tmp/`, nothing is tagged.
#[test]
fn cancel_drops_a_running_base_layer_download() {
    let git = GitServer::start(Auth::Basic(GIT_TOKEN.into()));
    let reg = Registry::anonymous();
    let base_env = Env::new();
    let base_ctx = base_env.path("base");
    busybox_rootfs(&base_ctx.join("rootfs"), &["sh", "true"]);
    write(&base_ctx.join("rootfs"), "opt/big.bin", &noise(32 << 20, 7));
    write(&base_ctx, "Dockerfile", b"FROM scratch\nCOPY rootfs/ /\n");
    base_env.build(&base_ctx, &["--push", "-t", &reg.image("ttd/big-base:1")]);
    let proxy = Throttle::start(reg.addr(), 0);
    proxy.set_down_rate(512 * 1024);
    let dockerfile = format!("FROM {}\nRUN true\n", proxy.image("ttd/big-base:1"));
    let (url, _) = app_repo_with(
        &git,
        "repos/ttd/pulling-app.git",
        &[("Dockerfile.run".to_string(), dockerfile.into_bytes())],
    );
    let env = Env::new();
    let serve = Serve::start(&env, &["--workers", "1"]);
    let mut req = publish(&url, &reg.image("ttd/pulling-app:1"));
    req["dockerfile"] = json!("Dockerfile.run");
    let id = serve.submit(&req);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = serve.build(&id)["state"].clone();
        if state == "running" {
            break;
        }
        assert_eq!(state, "queued");
        assert!(Instant::now() < deadline, "the build never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Well into the download (the git fetch and the manifests take a moment).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(serve.build(&id)["state"], "running");

    cancel_promptly(&serve, &id, 120);
    let events = serve.events(&id);
    assert!(
        !events.iter().any(|(_, _, v)| v["type"] == "built"),
        "{events:?}"
    );
    assert_no_tmp(&env.home());
    assert!(registry_tags(&reg, "ttd/pulling-app").is_empty());
    drop(serve);
    assert!(env.names().is_empty());
    env.fsck();
}

/// `DELETE` the running build `id`; assert it ends `cancelled` within 10 s (waiting up to
/// `wait_secs` for a final state) and return it.
fn cancel_promptly(serve: &Serve, id: &str, wait_secs: u64) -> Value {
    let asked = Instant::now();
    let r = serve.req("DELETE", &format!("/api/v1/builds/{id}"), b"");
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let b = serve.wait_final(id, wait_secs);
    let took = asked.elapsed();
    eprintln!("the build was cancelled {took:?} after the DELETE");
    assert_eq!(b["state"], "cancelled", "{b:#}");
    assert!(
        took < Duration::from_secs(10),
        "not stopped promptly: {took:?}"
    );
    b
}
