//! RUN in the rootless sandbox, on a tiny base made from Debian's busybox-static: the Altinn
//! final stage's user creation and `mkdir` as the new user, a deleted base file, ARG values in
//! the environment, failures located at their line, cache hits that execute nothing, and a
//! running step killed by the build's cancel token.

use crate::common::*;

/// A base image with busybox, /etc/passwd, /etc/group and a file to delete, tagged `busybase`.
fn busybox_base(env: &Env) {
    let ctx = env.path("base");
    let root = ctx.join("rootfs");
    busybox_rootfs(
        &root,
        &[
            "sh", "mkdir", "rm", "echo", "cat", "id", "chmod", "ls", "touch", "sleep",
        ],
    );
    write(&root, "etc/removed", b"delete me\n");
    write(&root, "opt/tree/a", b"a\n");
    write(&ctx, "Dockerfile", b"FROM scratch\nCOPY rootfs/ /\n");
    env.build(&ctx, &["-t", "busybase"]);
}

fn run_ctx(env: &Env, dockerfile: &str) -> std::path::PathBuf {
    let ctx = env.path("app");
    write(&ctx, "Dockerfile", dockerfile.as_bytes());
    ctx
}

#[test]
fn the_altinn_final_stage_runs_rootless() {
    let env = Env::new();
    busybox_base(&env);
    let ctx = run_ctx(
        &env,
        "FROM busybase\nARG GREETING=hello\nRUN chmod 1777 /tmp && echo \"$GREETING\" > /greeting && rm /etc/removed && rm -r /opt/tree\nRUN echo 'dotnet:x:3000:' >> /etc/group && echo 'dotnet:x:1000:3000::/home:/bin/false' >> /etc/passwd\nUSER dotnet\nRUN mkdir /tmp/logtelemetry && id > /tmp/logtelemetry/id\n",
    );
    env.build(&ctx, &["-t", "runapp", "--build-arg", "GREETING=bonjour"]);
    env.fsck();
    let tree = env.unpack("runapp", "runapp");
    assert_eq!(tree["greeting"].0, Obj::File(b"bonjour\n".to_vec()));
    assert!(!tree.contains_key("etc/removed"), "whiteout not applied");
    assert!(!tree.contains_key("opt/tree"), "deleted directory survived");
    assert!(!tree.contains_key("opt/tree/a"));
    let passwd = match &tree["etc/passwd"].0 {
        Obj::File(b) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(passwd.contains("dotnet:x:1000:3000"), "{passwd}");
    let (obj, mode, uid, gid) = &tree["tmp/logtelemetry"];
    assert_eq!(*obj, Obj::Dir);
    assert_eq!(*mode, 0o755);
    if is_root() {
        assert_eq!((*uid, *gid), (1000, 3000));
    }
    assert_eq!(tree["tmp"].1, 0o1777);
    let id = match &tree["tmp/logtelemetry/id"].0 {
        Obj::File(b) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(id.contains("uid=1000(dotnet) gid=3000(dotnet)"), "{id}");
    let user = env.ok(&["inspect", "runapp", "--format", ".Config.config.User"]);
    assert_eq!(user.trim(), "dotnet");
    // ARG values are for RUN only: not in the config.
    let cfg = env.ok(&["inspect", "runapp", "--format", ".Config.config"]);
    assert!(!cfg.contains("GREETING"), "{cfg}");

    // Same inputs: every RUN is a cache hit, nothing executes, same digest.
    let out = env
        .cmd()
        .args([
            "build",
            "--progress",
            "plain",
            "--build-arg",
            "GREETING=bonjour",
        ])
        .arg(&ctx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("CACHED").count(), 3, "{stderr}");
}

#[test]
fn a_failing_run_shows_its_output_and_tags_nothing() {
    let env = Env::new();
    busybox_base(&env);
    let ctx = run_ctx(&env, "FROM busybase\nRUN echo about to fail && ls /nope\n");
    let err = env.fail(&["build", "-t", "broken", ctx.to_str().unwrap()], 1);
    assert!(err.contains("Dockerfile:2:1"), "{err}");
    assert!(err.contains("about to fail"), "{err}");
    assert!(err.contains("nope"), "{err}");
    assert!(!env.names().contains(&"broken:latest".to_string()));
    env.fsck();
}

/// A rebuild reads no base layer: what WORKDIR, COPY (from the context and from a stage) and
/// USER by name derived from a stage's file-system view comes from the memo, keyed by chain
/// ids and the step's inputs. The memo is never stale: a changed source is derived again, and
/// the result equals a build without cache.
#[test]
fn a_rebuild_derives_nothing_from_the_base_layers_again() {
    let env = Env::new();
    busybox_base(&env);
    let ctx = run_ctx(
        &env,
        "FROM busybase AS build\nWORKDIR /src/deep\nCOPY a.txt .\nRUN cat a.txt a.txt > b.txt\n\
         FROM busybase\nRUN echo 'app:x:3000:' >> /etc/group && echo 'app:x:1000:3000::/:/bin/sh' >> /etc/passwd\n\
         COPY --from=build /src/deep/b.txt /srv/b.txt\nUSER app\nWORKDIR /home/app\nRUN id -u > uid\n",
    );
    write(&ctx, "a.txt", b"one\n");
    let build = |extra: &[&str]| -> (String, String) {
        let out = env
            .cmd()
            .env("STRATA_LOG", "strata=debug")
            .args(["build", "--progress", "plain", "-t", "memo"])
            .args(extra)
            .arg(&ctx)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        (
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
            stderr,
        )
    };
    let (cold, log) = build(&[]);
    assert!(
        log.contains("view built"),
        "the cold build reads the base: {log}"
    );

    let (again, log) = build(&[]);
    assert_eq!(again, cold);
    assert!(
        !log.contains("view built"),
        "a view was built again:\n{log}"
    );
    // WORKDIR ×2, COPY ×2, RUN ×3: every layer step is a hit.
    assert_eq!(log.matches("CACHED").count(), 7, "{log}");

    write(&ctx, "a.txt", b"two\n");
    let (changed, _) = build(&[]);
    assert_ne!(changed, cold);
    let (fresh, log) = build(&["--no-cache"]);
    assert_eq!(fresh, changed, "the memo changed the result");
    assert_eq!(log.matches("CACHED").count(), 0, "{log}");
    let tree = env.unpack("memo", "memo");
    assert_eq!(tree["srv/b.txt"].0, Obj::File(b"two\ntwo\n".to_vec()));
    assert_eq!(tree["home/app/uid"].0, Obj::File(b"1000\n".to_vec()));
    if is_root() {
        let (obj, _, uid, gid) = &tree["home/app"];
        assert_eq!((obj, *uid, *gid), (&Obj::Dir, 1000, 3000));
    }
}

#[test]
fn a_cancel_kills_a_running_run_step_and_caches_nothing() {
    use std::time::{Duration, Instant};
    use strata::build::{BuildError, BuildOptions, CancelToken, Event};

    let env = Env::new();
    busybox_base(&env);
    let ctx = run_ctx(&env, "FROM busybase\nRUN echo started && sleep 298\n");
    let store = strata::store::Store::open(env.home()).expect("store");
    // Twice: a step cancelled the first time must run (and be cancelled) again, not come
    // from the cache.
    for attempt in 1..=2 {
        let token = CancelToken::new();
        let opts = BuildOptions {
            context: ctx.clone(),
            context_entries: None,
            dockerfile_path: ctx.join("Dockerfile"),
            dockerfile_name: "Dockerfile".into(),
            dockerfile: std::fs::read_to_string(ctx.join("Dockerfile")).expect("Dockerfile"),
            build_args: Default::default(),
            target: None,
            labels: Default::default(),
            platform: strata::media::Platform::host(),
            compression: strata::media::Compression::Gzip,
            compression_level: None,
            source_date_epoch: 0,
            threads: 1,
            no_cache: false,
            no_cache_filter: Vec::new(),
            secrets: Default::default(),
            cancel: Some(token.clone()),
        };
        // Cancel once the command is seen running, from another thread.
        let setter = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while processes_running(&["sleep", "298"]).is_empty() {
                assert!(Instant::now() < deadline, "the RUN step never started");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_secs(1));
            token.cancel();
            Instant::now()
        });
        let mut steps = Vec::new();
        let result = strata::build::build(&store, None, &opts, &mut |e| {
            if let Event::Step { text, .. } = e {
                steps.push(text);
            }
        });
        let asked = setter.join().expect("cancel thread");
        let took = asked.elapsed();
        eprintln!("attempt {attempt}: the build returned {took:?} after the cancel");
        assert!(
            matches!(result, Err(BuildError::Cancelled)),
            "{:?}",
            result.map(|o| o.digest)
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(
            steps.last().map(String::as_str),
            Some("RUN echo started && sleep 298")
        );
        assert!(
            processes_running(&["sleep", "298"]).is_empty(),
            "the command survived the cancel"
        );
        crate::serve_support::assert_no_tmp(&env.home());
    }
    env.fsck();
}
