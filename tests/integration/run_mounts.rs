//! RUN mounts, heredocs and the snapshot store, on a tiny base made from Debian's
//! busybox-static: cache mounts that persist across builds, secrets that never reach a layer,
//! the config, the history or any blob, binds from a stage and from the context, tmpfs,
//! BuildKit's heredoc forms, and layer snapshots unpacked once and reused.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::common::*;

/// A base with busybox and its applets, tagged `mountbase`.
fn base(env: &Env) {
    let ctx = env.path("base");
    busybox_rootfs(
        &ctx.join("rootfs"),
        &[
            "sh", "mkdir", "rm", "echo", "cat", "id", "chmod", "ls", "touch", "test", "env", "wc",
        ],
    );
    write(&ctx, "Dockerfile", b"FROM scratch\nCOPY rootfs/ /\n");
    env.build(&ctx, &["-t", "mountbase"]);
}

fn context(env: &Env, name: &str, dockerfile: &str) -> PathBuf {
    let ctx = env.path(name);
    write(&ctx, "Dockerfile", dockerfile.as_bytes());
    ctx
}

fn text(tree: &Tree, path: &str) -> String {
    match &tree
        .get(path)
        .unwrap_or_else(|| panic!("{path} missing: {:?}", tree.keys()))
        .0
    {
        Obj::File(b) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("{path}: {other:?}"),
    }
}

#[test]
fn cache_mounts_persist_across_builds_and_stay_out_of_the_layer() {
    let env = Env::new();
    base(&env);
    let ctx = context(
        &env,
        "cache",
        "FROM mountbase\nARG V\n\
         RUN --mount=type=cache,target=/root/.cache/pkgs echo \"$V\" >> /root/.cache/pkgs/log && cat /root/.cache/pkgs/log > /seen\n\
         RUN --mount=type=cache,id=owned,target=/var/cache/x,uid=1000,gid=3000,mode=0750,sharing=locked ls -lnd /var/cache/x > /perm\n\
         RUN --mount=type=cache,id=twice,target=/t1,sharing=locked --mount=type=cache,id=twice,target=/t2,sharing=locked touch /t1/f && ls /t2 > /twice\n",
    );
    env.build(&ctx, &["-t", "c1", "--build-arg", "V=one"]);
    env.build(&ctx, &["-t", "c2", "--build-arg", "V=two"]);
    let tree = env.unpack("c2", "c2");
    assert_eq!(text(&tree, "seen"), "one\ntwo\n");
    assert_eq!(text(&tree, "twice"), "f\n", "one cache at two targets");
    for leaked in ["root", "root/.cache", "var", "var/cache/x"] {
        assert!(!tree.contains_key(leaked), "{leaked} leaked into the layer");
    }
    let perm = text(&tree, "perm");
    assert!(perm.starts_with("drwxr-x---"), "{perm}");
    if is_root() {
        assert!(perm.contains(" 1000 ") && perm.contains(" 3000 "), "{perm}");
    }
    // The cache lives in the store: `prune` clears it, and the next build starts empty.
    let mounts = env.home().join("cache/mounts");
    assert!(std::fs::read_dir(&mounts).unwrap().count() >= 2);
    // One directory per cache (beside each, its lock file).
    let n = std::fs::read_dir(&mounts)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    // `cache du` counts them (and the snapshots RUN unpacked).
    let du = env.ok(&["cache", "du"]);
    let count = |kind: &str| -> usize {
        du.lines()
            .find(|l| l.trim_start().starts_with(kind))
            .and_then(|l| l[kind.len() + 2..].split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {kind} row in:\n{du}"))
    };
    assert_eq!(count("cache mounts"), n, "{du}");
    assert!(count("snapshots") >= 1, "{du}");
    env.ok(&["prune"]);
    let left: Vec<_> = std::fs::read_dir(&mounts).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    env.build(&ctx, &["-t", "c3", "--build-arg", "V=three"]);
    assert_eq!(text(&env.unpack("c3", "c3"), "seen"), "three\n");
}

#[test]
fn secrets_never_reach_a_layer_the_config_the_history_or_any_blob() {
    let env = Env::new();
    base(&env);
    let secret_file = env.path("token.txt");
    std::fs::write(&secret_file, "s3cr3t-FILE-VALUE-42").unwrap();
    let ctx = context(
        &env,
        "secret",
        "FROM mountbase\n\
         RUN --mount=type=secret,id=tok test \"$(wc -c < /run/secrets/tok)\" -eq 20 && ls -ln /run/secrets/tok > /perm1\n\
         RUN --mount=type=secret,id=tok,target=/etc/app/token,mode=0440,uid=1,gid=2 --mount=type=secret,id=api,env=API_KEY \
             ls -ln /etc/app/token > /perm2 && test \"${#API_KEY}\" -eq 19 && echo ok > /checked\n\
         RUN --mount=type=secret,id=absent echo optional secrets may be missing > /absent\n",
    );
    let src = format!("id=tok,src={}", secret_file.display());
    let mut c = env.cmd();
    c.env("MY_API_KEY", "s3cr3t-ENV-VALUE-77").args([
        "build",
        "--progress",
        "plain",
        "--compression",
        "uncompressed",
        "-t",
        "sec",
        "--secret",
        &src,
        "--secret",
        "id=api,env=MY_API_KEY",
    ]);
    let out = c.arg(&ctx).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = env.unpack("sec", "sec");
    assert!(text(&tree, "perm1").starts_with("-r--------"));
    let perm2 = text(&tree, "perm2");
    assert!(perm2.starts_with("-r--r-----"), "{perm2}");
    assert!(perm2.contains(" 1 ") && perm2.contains(" 2 "), "{perm2}");
    assert_eq!(text(&tree, "checked"), "ok\n");
    assert!(tree.contains_key("absent"));
    for leaked in ["run", "run/secrets", "etc/app", "etc/app/token"] {
        assert!(!tree.contains_key(leaked), "{leaked} leaked into the layer");
    }
    // Every byte the store holds (layers are uncompressed here), the config and history.
    for e in walkdir::WalkDir::new(env.home()).into_iter().flatten() {
        if e.file_type().is_file() {
            let bytes = std::fs::read(e.path()).unwrap();
            for secret in [&b"s3cr3t-FILE-VALUE-42"[..], b"s3cr3t-ENV-VALUE-77"] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret),
                    "secret found in {}",
                    e.path().display()
                );
            }
        }
    }
    let config = env.ok(&["inspect", "sec", "--format", ".Config"]);
    assert!(!config.contains("s3cr3t"), "{config}");
    assert!(
        config.contains("type=secret"),
        "history keeps the RUN line: {config}"
    );
    // Secret contents are not in the cache key: another value still hits the cache.
    std::fs::write(&secret_file, "another-value").unwrap();
    let mut c = env.cmd();
    c.env("MY_API_KEY", "s3cr3t-ENV-VALUE-77").args([
        "build",
        "--progress",
        "plain",
        "--compression",
        "uncompressed",
        "--secret",
        &src,
        "--secret",
        "id=api,env=MY_API_KEY",
    ]);
    let out = c.arg(&ctx).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("CACHED").count(), 3, "{stderr}");

    // A required secret that was not given fails the step, naming it.
    let ctx = context(
        &env,
        "required",
        "FROM mountbase\nRUN --mount=type=secret,id=nope,required=true true\n",
    );
    let err = env.fail(&["build", ctx.to_str().unwrap()], 1);
    assert!(err.contains("secret \"nope\" is required"), "{err}");
}

#[test]
fn bind_mounts_from_a_stage_and_from_the_context() {
    let env = Env::new();
    base(&env);
    let ctx = context(
        &env,
        "bind",
        "FROM mountbase AS build\nRUN mkdir -p /out && echo built > /out/artifact\n\
         FROM mountbase\n\
         RUN --mount=type=bind,from=build,source=/out,target=/in cat /in/artifact > /copied\n\
         RUN --mount=type=bind,source=src,target=/src cat /src/hello.txt > /from-context && (touch /src/x 2>/dev/null && echo writable || echo read-only) > /ro\n\
         WORKDIR /w\n\
         RUN --mount=type=bind,source=src/hello.txt,target=rel/hello,rw echo changed > rel/hello && echo ok > /rw\n\
         RUN --mount=type=cache,target=/seed,from=build,source=/out cat /seed/artifact > /seeded\n",
    );
    write(&ctx, "src/hello.txt", b"hello from the context\n");
    env.build(&ctx, &["-t", "b1"]);
    let tree = env.unpack("b1", "b1");
    assert_eq!(text(&tree, "copied"), "built\n");
    assert_eq!(text(&tree, "from-context"), "hello from the context\n");
    assert_eq!(text(&tree, "ro"), "read-only\n");
    assert_eq!(text(&tree, "rw"), "ok\n");
    assert_eq!(
        text(&tree, "seeded"),
        "built\n",
        "a cache mount seeded from a stage"
    );
    for leaked in ["in", "src", "w/rel", "w/rel/hello", "out", "seed"] {
        assert!(!tree.contains_key(leaked), "{leaked} leaked into the layer");
    }
    // A rw bind writes to a throw-away copy.
    assert_eq!(
        std::fs::read_to_string(ctx.join("src/hello.txt")).unwrap(),
        "hello from the context\n"
    );
    // The bound content is in the cache key: a changed context file runs the step again.
    write(&ctx, "src/hello.txt", b"changed context\n");
    env.build(&ctx, &["-t", "b2"]);
    assert_eq!(
        text(&env.unpack("b2", "b2"), "from-context"),
        "changed context\n"
    );
}

#[test]
fn tmpfs_content_stays_out_of_the_layer() {
    let env = Env::new();
    base(&env);
    let ctx = context(
        &env,
        "tmpfs",
        "FROM mountbase\nRUN --mount=type=tmpfs,target=/scratch,size=1m echo x > /scratch/f && cat /scratch/f > /saw\n",
    );
    env.build(&ctx, &["-t", "t"]);
    let tree = env.unpack("t", "t");
    assert_eq!(text(&tree, "saw"), "x\n");
    assert!(!tree.contains_key("scratch"));
}

#[test]
fn heredoc_forms_follow_buildkit() {
    let env = Env::new();
    base(&env);
    let ctx = context(
        &env,
        "heredoc",
        "FROM mountbase\nARG NAME=world\n\
         RUN <<EOF\necho \"hello $NAME\" > /h1\nmkdir -p /made\nEOF\n\
         RUN <<-EOT\n\techo tabbed > /h2\n\tEOT\n\
         RUN cat <<'EOF' > /h3\nliteral $NAME\nEOF\n\
         RUN cat <<EOF > /h4\nexpanded $NAME\nEOF\n\
         RUN <<EOF\n#!/bin/sh\necho \"script $0\" > /h5\nEOF\n\
         RUN sh <<EOF\necho from stdin > /h6\nEOF\n\
         RUN cat <<A > /h7 && cat <<B >> /h7\nfirst\nA\nsecond\nB\n",
    );
    env.build(&ctx, &["-t", "h"]);
    let tree = env.unpack("h", "h");
    assert_eq!(text(&tree, "h1"), "hello world\n");
    assert!(tree.contains_key("made"));
    assert_eq!(text(&tree, "h2"), "tabbed\n");
    assert_eq!(text(&tree, "h3"), "literal $NAME\n");
    assert_eq!(text(&tree, "h4"), "expanded world\n");
    assert_eq!(text(&tree, "h5"), "script /dev/pipes/EOF\n");
    assert_eq!(text(&tree, "h6"), "from stdin\n");
    assert_eq!(text(&tree, "h7"), "first\nsecond\n");
    assert!(!tree.contains_key("dev/pipes"));
    // The body is in the cache key: changing only the body runs the step again.
    let ctx2 = context(
        &env,
        "heredoc2",
        "FROM mountbase\nRUN <<EOF\necho one > /f\nEOF\n",
    );
    env.build(&ctx2, &["-t", "hd1"]);
    write(
        &ctx2,
        "Dockerfile",
        b"FROM mountbase\nRUN <<EOF\necho two > /f\nEOF\n",
    );
    env.build(&ctx2, &["-t", "hd2"]);
    assert_eq!(text(&env.unpack("hd2", "hd2"), "f"), "two\n");
}

/// Snapshot directories by name: (inode, mtime) of their `fs/`.
fn snapshots(env: &Env) -> BTreeMap<String, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let dir = env.home().join("snapshots");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let md = std::fs::metadata(e.path().join("fs")).unwrap();
        out.insert(name, (md.ino(), md.mtime(), md.mtime_nsec()));
    }
    out
}

#[test]
fn snapshots_are_unpacked_once_and_builds_are_deterministic() {
    let env = Env::new();
    base(&env);
    let df = "FROM mountbase AS one\nRUN echo a > /a\nRUN rm /bin/wc && echo b > /b\n\
              FROM mountbase AS two\nRUN echo c > /c\n\
              FROM one\nCOPY --from=two /c /c\nRUN test ! -e /bin/wc && cat /a /b /c > /all\n";
    let ctx = context(&env, "snap", df);
    let d1 = env.build(&ctx, &["-t", "s1", "--no-cache"]);
    let first = snapshots(&env);
    // mountbase (1 layer), one's first RUN, one's second RUN, + the COPY: every RUN's parent
    // chain is unpacked once, the base shared by both stages.
    assert_eq!(first.len(), 4, "{first:?}");
    let d2 = env.build(&ctx, &["-t", "s2", "--no-cache"]);
    assert_eq!(
        d1, d2,
        "the same Dockerfile built twice without cache differs"
    );
    let second = snapshots(&env);
    assert_eq!(first, second, "snapshots were unpacked again");
    let tree = env.unpack("s2", "s2");
    assert_eq!(text(&tree, "all"), "a\nb\nc\n");
    assert!(!tree.contains_key("bin/wc"));
    env.fsck();
    env.ok(&["prune"]);
    assert!(snapshots(&env).is_empty());
}
