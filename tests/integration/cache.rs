//! The layer cache: rebuilds cost nothing, one changed file rebuilds one layer, a new base
//! keeps the application layers, concurrent builds and prunes stay consistent, and a cache
//! exported to a registry makes a fresh store rebuild nothing.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::registry::Registry;

/// Build with JSON progress; returns (digest, [(step text, cached, has layer)]).
fn build_json(env: &Env, ctx: &Path, extra: &[&str]) -> (String, Vec<(String, bool, bool)>) {
    let mut c = env.cmd();
    c.args(["build", "--progress", "json"]).args(extra).arg(ctx);
    let out = c.output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let mut texts = std::collections::HashMap::new();
    let mut steps = Vec::new();
    for line in stderr.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        match e["type"].as_str() {
            Some("step") => {
                texts.insert(
                    e["id"].as_u64().unwrap(),
                    e["text"].as_str().unwrap().to_string(),
                );
            }
            Some("step_done") => steps.push((
                texts[&e["id"].as_u64().unwrap()].clone(),
                e["cached"] == true,
                e["layer"].is_object(),
            )),
            _ => {}
        }
    }
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        steps,
    )
}

fn rebuilt(steps: &[(String, bool, bool)]) -> Vec<String> {
    steps
        .iter()
        .filter(|(_, cached, layer)| *layer && !cached)
        .map(|(t, _, _)| t.clone())
        .collect()
}

fn app_context(root: &Path, base: &str) {
    write(
        root,
        "Dockerfile",
        format!(
            "FROM {base}\nWORKDIR /App\nCOPY deps/ ./\nCOPY app/ ./\nCOPY content/ ./content/\nENTRYPOINT [\"dotnet\", \"App.dll\"]\n"
        )
        .as_bytes(),
    );
    for i in 0..20 {
        write(
            root,
            &format!("deps/Lib{i}.dll"),
            format!("library {i}").as_bytes(),
        );
    }
    write(root, "app/App.dll", b"app v1");
    write(root, "content/config.json", b"{}");
}

#[test]
fn rebuilds_reuse_layers_and_one_change_rebuilds_one_layer() {
    let env = Env::new();
    let ctx = env.path("ctx");
    app_context(&ctx, "scratch");
    let (d1, steps) = build_json(&env, &ctx, &[]);
    assert_eq!(rebuilt(&steps).len(), 4, "{steps:?}");

    // Nothing changed: every layer from the cache, same digest.
    let (d2, steps) = build_json(&env, &ctx, &[]);
    assert_eq!(d1, d2);
    assert!(rebuilt(&steps).is_empty(), "{steps:?}");

    // Touched but identical: still a hit.
    let f = ctx.join("app/App.dll");
    std::fs::File::options()
        .append(true)
        .open(&f)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    let (d3, steps) = build_json(&env, &ctx, &[]);
    assert_eq!(d1, d3);
    assert!(rebuilt(&steps).is_empty(), "{steps:?}");

    // One file changed: exactly the layer that holds it.
    write(&ctx, "app/App.dll", b"app v2");
    let (d4, steps) = build_json(&env, &ctx, &[]);
    assert_ne!(d1, d4);
    assert_eq!(rebuilt(&steps), vec!["COPY app/ ./".to_string()]);

    // --no-cache rebuilds everything, to the same bytes.
    let (d5, steps) = build_json(&env, &ctx, &["--no-cache"]);
    assert_eq!(d4, d5);
    assert_eq!(rebuilt(&steps).len(), 4);
    env.fsck();
}

#[test]
fn no_cache_filter_rebuilds_only_that_stage() {
    let env = Env::new();
    let ctx = env.path("ctx");
    write(
        &ctx,
        "Dockerfile",
        b"FROM scratch AS one\nCOPY a /a\nFROM scratch AS two\nCOPY --from=one /a /b\nCOPY a /c\n",
    );
    write(&ctx, "a", b"a");
    build_json(&env, &ctx, &[]);
    let (_, steps) = build_json(&env, &ctx, &["--no-cache-filter", "one"]);
    assert_eq!(rebuilt(&steps), vec!["COPY a /a".to_string()]);
}

#[test]
fn a_new_base_keeps_the_application_layers() {
    let reg = Registry::anonymous();
    let env = Env::new();
    // Two different bases in the registry.
    for (tag, content) in [("1", "base one"), ("2", "base two")] {
        let b = env.path(&format!("base{tag}"));
        write(
            &b,
            "Dockerfile",
            b"FROM scratch\nCOPY os-release /etc/os-release\n",
        );
        write(&b, "os-release", content.as_bytes());
        env.build(&b, &["--push", "-t", &reg.image(&format!("base:{tag}"))]);
    }
    let ctx = env.path("ctx");
    app_context(&ctx, &reg.image("base:1"));
    let (_, steps) = build_json(&env, &ctx, &[]);
    assert_eq!(rebuilt(&steps).len(), 4, "{steps:?}");
    app_context(&ctx, &reg.image("base:2"));
    let (_, steps) = build_json(&env, &ctx, &[]);
    assert!(
        rebuilt(&steps).is_empty(),
        "app layers rebuilt after a base change: {steps:?}"
    );
}

#[test]
fn concurrent_builds_and_prune_keep_the_store_consistent() {
    let env = Env::new();
    let mut contexts = Vec::new();
    for i in 0..4 {
        let ctx = env.path(&format!("ctx{i}"));
        app_context(&ctx, "scratch");
        write(&ctx, "app/App.dll", format!("app {i}").as_bytes());
        contexts.push(ctx);
    }
    // 8 builds at once: each context twice, plus a prune racing them.
    let mut children = Vec::new();
    for (i, ctx) in contexts.iter().chain(contexts.iter()).enumerate() {
        let mut c = env.cmd();
        c.args(["build", "-q", "-t", &format!("app{}:{}", i % 4, i / 4)])
            .arg(ctx);
        children.push(c.spawn().unwrap());
    }
    let prune = env.cmd().args(["prune"]).output().unwrap();
    assert!(
        prune.status.success(),
        "{}",
        String::from_utf8_lossy(&prune.stderr)
    );
    for mut ch in children {
        assert!(ch.wait().unwrap().success());
    }
    env.fsck();
    assert_eq!(env.names().len(), 8);
    for n in env.names() {
        env.ok(&[
            "export",
            &n,
            "--output",
            &format!("oci:{}", env.path("check").display()),
        ]);
    }
    // Prune keeps what tagged images use; --all empties the store consistently.
    env.ok(&["prune"]);
    env.fsck();
    assert_eq!(env.names().len(), 8);
    env.ok(&["prune", "--all"]);
    env.fsck();
    assert!(env.names().is_empty());
    let du = env.ok(&["cache", "du"]);
    assert!(du.contains("images") && du.contains("layer cache"), "{du}");
}

#[test]
fn a_registry_cache_makes_a_fresh_store_rebuild_nothing() {
    let reg = Registry::anonymous();
    let a = Env::new();
    let ctx = a.path("ctx");
    app_context(&ctx, "scratch");
    let cache = reg.image("cache:app");
    let (da, steps) = build_json(&a, &ctx, &["--cache-to", &cache]);
    assert_eq!(rebuilt(&steps).len(), 4);

    // Another machine: a new store, the same sources in another directory.
    let b = Env::new();
    let ctx_b = b.path("elsewhere/ctx");
    app_context(&ctx_b, "scratch");
    let (db, steps) = build_json(
        &b,
        &ctx_b,
        &[
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            "--push",
            "-t",
            &reg.image("app:1"),
        ],
    );
    assert_eq!(da, db);
    assert!(rebuilt(&steps).is_empty(), "{steps:?}");
    // The layers were never downloaded to B: the push mounted them from the cache repo.
    let gets: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.blob().is_some() && r.path.contains("/cache/"))
        .filter(|r| r.bytes > 2000)
        .collect();
    assert!(gets.is_empty(), "{gets:?}");
    let out = run_ok(Command::new(tool("skopeo", "skopeo")).args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}", reg.image("app:1")),
    ]));
    assert!(out.contains(&da), "{out}");
}

/// A one-file change copies the unchanged gzip blocks of the previous layer instead of
/// compressing them again; the result is byte for byte what a build from nothing gives, and
/// the block records go away with their blob.
#[test]
fn unchanged_gzip_blocks_are_reused_with_identical_bytes() {
    let env = Env::new();
    let ctx = env.path("ctx");
    write(
        &ctx,
        "Dockerfile",
        b"FROM scratch\nWORKDIR /App\nCOPY app/ ./\n",
    );
    let mut state = 7u64;
    for i in 0..40 {
        let len = [2_000usize, 90_000, 300_000][i % 3];
        let content: Vec<u8> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b"ab cd,ef\n01{}"[(state >> 60) as usize % 13]
            })
            .collect();
        write(&ctx, &format!("app/lib{i:02}.dll"), &content);
    }
    let (d1, _) = build_json(&env, &ctx, &[]);
    let records = env.home().join("cache/blocks");
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 1);

    let mut grown = std::fs::read(ctx.join("app/lib10.dll")).unwrap();
    grown.extend_from_slice(b"{ \"benchRun\": 1 }\n");
    write(&ctx, "app/lib10.dll", &grown);
    let out = env
        .cmd()
        .env("STRATA_LOG", "strata=debug")
        .args(["build", "-q"])
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(out.status.success());
    let d2 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let log = String::from_utf8_lossy(&out.stderr);
    // `... layer written millis=… digest=… reused=N blocks=M`
    let field = |name: &str| -> usize {
        log.split(&format!(" {name}="))
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the log:\n{log}"))
    };
    let (reused, blocks) = (field("reused"), field("blocks"));
    assert!(blocks > 30, "{blocks} blocks:\n{log}");
    assert!(
        reused + 4 >= blocks,
        "only {reused} of {blocks} blocks reused:\n{log}"
    );
    assert_ne!(d1, d2);

    let fresh = Env::new();
    let (d3, _) = build_json(&fresh, &ctx, &["--no-cache"]);
    assert_eq!(d2, d3, "reuse changed the bytes");

    // The records of a pruned blob are pruned with it.
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 2);
    run_ok(env.cmd().args(["prune", "--all"]));
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    env.fsck();
}
