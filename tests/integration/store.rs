//! The local store and its commands: `images`, `inspect`, reference resolution, `rmi`,
//! `fsck`, concurrent writers, `FROM oci:DIR:TAG`, and exports read back by skopeo and umoci.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::common::{
    Env, Tree, assert_tree, copy_tree, dir, file, is_root, listing, run_ok, skopeo_inspect, tool,
    validate_layout, write,
};

/// `sha256:<hex>` of `bytes`, computed here rather than by strata.
fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("a sha256 digest")
}

fn raw(env: &Env, args: &[&str]) -> Vec<u8> {
    let out = env.run(args);
    assert!(
        out.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn manifest(env: &Env, reference: &str) -> Value {
    serde_json::from_slice(&raw(env, &["inspect", reference, "--raw"])).expect("manifest json")
}

fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// Manifest, config and layer digests of an image.
fn blobs_of(env: &Env, reference: &str) -> BTreeSet<String> {
    let m = manifest(env, reference);
    let mut out: BTreeSet<String> = layer_digests(&m).into_iter().collect();
    out.insert(m["config"]["digest"].as_str().expect("config").to_string());
    out.insert(sha256(&raw(env, &["inspect", reference, "--raw"])));
    out
}

/// The blobs in the store, as digests.
fn store_blobs(env: &Env) -> BTreeSet<String> {
    std::fs::read_dir(env.home().join("blobs/sha256"))
        .expect("read blobs")
        .map(|e| format!("sha256:{}", e.expect("entry").file_name().to_string_lossy()))
        .collect()
}

fn blob_path(root: &Path, digest: &str) -> PathBuf {
    root.join("blobs/sha256").join(hex(digest))
}

/// Run `strata fsck`, require exit 1, return the `problem:` lines.
fn fsck_problems(env: &Env) -> Vec<String> {
    let out = env.run(&["fsck"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "fsck should fail:\n{stdout}");
    stdout
        .lines()
        .filter(|l| l.starts_with("problem: "))
        .map(str::to_string)
        .collect()
}

fn assert_tmp_empty(env: &Env) {
    let tmp = env.home().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read store tmp")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
}

/// A context whose Dockerfile is `dockerfile` and whose files are `files`.
fn context(env: &Env, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let ctx = env.path(name);
    write(&ctx, "Dockerfile", dockerfile.as_bytes());
    for (p, content) in files {
        write(&ctx, p, content.as_bytes());
    }
    ctx
}

/// Unpack image `tag` of an OCI layout with umoci; the listing of its root filesystem.
fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> Tree {
    let mut c = Command::new(tool("umoci", "umoci"));
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    c.arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle);
    run_ok(&mut c);
    listing(&bundle.join("rootfs"))
}

#[test]
fn images_lists_name_digest_size_created() {
    let env = Env::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM scratch\nCOPY a.txt /a.txt\n",
        &[("a.txt", "a\n")],
    );
    let app = env.build(&ctx, &["-t", "app:1", "--source-date-epoch", "1700000000"]);
    let ctx2 = context(
        &env,
        "ctx2",
        "FROM scratch\nCOPY b.txt /b.txt\n",
        &[("b.txt", "b\n")],
    );
    let untagged = env.build(&ctx2, &[]);

    let json: Value = serde_json::from_str(&env.ok(&["images", "--json"])).expect("json");
    let rows = json.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{json:#}");
    let row = |d: &str| {
        rows.iter()
            .find(|r| r["digest"] == d)
            .unwrap_or_else(|| panic!("{d} not in {json:#}"))
    };
    let m = manifest(&env, &app);
    let size = raw(&env, &["inspect", &app, "--raw"]).len() as u64
        + m["config"]["size"].as_u64().expect("config size")
        + m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["size"].as_u64().expect("size"))
            .sum::<u64>();
    assert_eq!(
        row(&app),
        &json!({"name": "app:1", "digest": app, "size": size, "created": "2023-11-14T22:13:20Z"})
    );
    assert_eq!(row(&untagged)["name"], Value::Null);
    assert_eq!(row(&untagged)["created"], "1970-01-01T00:00:00Z");
    assert_eq!(env.names(), ["app:1"]);

    let quiet: BTreeSet<String> = env
        .ok(&["images", "-q"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(quiet, BTreeSet::from([app.clone(), untagged.clone()]));

    let table = env.ok(&["images"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["NAME", "DIGEST", "SIZE", "CREATED"]);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{table}");
    let app_row = rows
        .iter()
        .find(|r| r[0] == "app:1")
        .unwrap_or_else(|| panic!("no app:1 row:\n{table}"));
    assert_eq!(app_row[1], &app[..19], "short digest:\n{table}");
    let size_text = size.to_string();
    assert_eq!(
        app_row[2..],
        [size_text.as_str(), "B", "2023-11-14T22:13:20Z"]
    );
    let none_row = rows
        .iter()
        .find(|r| r[0] == "<none>")
        .unwrap_or_else(|| panic!("no <none> row:\n{table}"));
    assert_eq!(none_row[1], &untagged[..19]);
    env.fsck();
}

#[test]
fn inspect_shows_manifest_config_and_raw_bytes() {
    let env = Env::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM scratch\nENV A=1 B=\"two words\"\nCOPY a.txt /a.txt\n",
        &[("a.txt", "a\n")],
    );
    let digest = env.build(&ctx, &["-t", "app:1"]);

    let doc: Value = serde_json::from_str(&env.ok(&["inspect", "app:1"])).expect("inspect json");
    assert_eq!(doc["Digest"], digest.as_str());
    assert_eq!(doc["Names"], json!(["app:1"]));
    assert_eq!(doc["Manifest"]["schemaVersion"], 2);
    assert_eq!(doc["Config"]["rootfs"]["type"], "layers");

    let env_line = env.ok(&["inspect", "app:1", "--format", ".Config.config.Env"]);
    let vars: Value = serde_json::from_str(&env_line).expect("env json");
    assert_eq!(
        vars,
        json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "A=1",
            "B=two words"
        ])
    );
    let go_style = env.ok(&["inspect", "app:1", "--format", "{{.Digest}}"]);
    assert_eq!(go_style, format!("{digest}\n"));

    let manifest_bytes = raw(&env, &["inspect", "app:1", "--raw"]);
    assert_eq!(
        sha256(&manifest_bytes),
        digest,
        "--raw is the manifest as stored"
    );
    let m: Value = serde_json::from_slice(&manifest_bytes).expect("manifest");
    assert_eq!(doc["Manifest"], m);
    let config_bytes = raw(&env, &["inspect", "app:1", "--raw", "--config"]);
    assert_eq!(sha256(&config_bytes), m["config"]["digest"]);
    assert_eq!(config_bytes.len() as u64, m["config"]["size"]);
    let config: Value = serde_json::from_slice(&config_bytes).expect("config");
    assert_eq!(doc["Config"], config);

    let err = env.fail(&["inspect", "app:1", "--format", ".NoSuchField"], 2);
    assert!(err.contains("NoSuchField"), "{err}");
}

#[test]
fn references_resolve_by_prefix_and_digest() {
    let env = Env::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM scratch\nCOPY a.txt /a.txt\n",
        &[("a.txt", "a\n")],
    );
    let digest = env.build(&ctx, &["-t", "app"]);
    let other = context(
        &env,
        "other",
        "FROM scratch\nCOPY b.txt /b.txt\n",
        &[("b.txt", "b\n")],
    );
    let other_digest = env.build(&other, &["-t", "other:1"]);
    let digest_of = |r: &str| env.ok(&["inspect", r, "--format", ".Digest"]);
    let want = format!("{digest}\n");

    // A prefix long enough to tell the two apart.
    let unique = (4..=64)
        .map(|n| &hex(&digest)[..n])
        .find(|p| !hex(&other_digest).starts_with(p))
        .expect("different digests");
    let at_name = format!("app@{digest}");
    for r in [
        "app",
        "app:latest",
        &digest,
        hex(&digest),
        &hex(&digest)[..12],
        unique,
        &at_name,
    ] {
        assert_eq!(digest_of(r), want, "{r}");
    }
    let exported = env.path("out");
    let target = format!("oci:{}:v1", exported.display());
    env.ok(&["export", &hex(&digest)[..12], "--output", &target]);
    validate_layout(&exported);

    // Unknown: a name, a digest, a name@digest, a prefix of neither.
    let absent = format!("sha256:{}", "0".repeat(64));
    let absent_at = format!("app@{absent}");
    let absent_prefix = ["0000", "1111", "2222"]
        .into_iter()
        .find(|p| !hex(&digest).starts_with(p) && !hex(&other_digest).starts_with(p))
        .expect("one of three prefixes matches neither");
    for r in ["nope:1", &absent, &absent_at, absent_prefix] {
        let err = env.fail(&["inspect", r], 1);
        assert!(err.contains("not found in the local store"), "{r}: {err}");
        assert!(err.contains(r), "names {r}: {err}");
    }
    env.fsck();
}

#[test]
fn ambiguous_prefix_is_refused() {
    let env = Env::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM scratch\nCOPY a.txt /a.txt\n",
        &[("a.txt", "a\n")],
    );
    let digest = env.build(&ctx, &["-t", "app:1"]);

    // Two valid images whose digests share their first four hex digits: the same config and
    // layers under manifests that differ in an annotation (a birthday search over a few
    // hundred variants), added to the store as any OCI layout writer would.
    let base = manifest(&env, &digest);
    let mut seen: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let (a, b) = (0..)
        .find_map(|i| {
            let mut m = base.clone();
            m["annotations"] = json!({ "org.example.variant": i.to_string() });
            let bytes = serde_json::to_vec(&m).expect("manifest");
            let d = sha256(&bytes);
            let prefix = hex(&d)[..4].to_string();
            seen.insert(prefix, bytes.clone())
                .map(|earlier| (earlier, bytes))
        })
        .expect("a collision");
    let index_path = env.home().join("index.json");
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("index json");
    for (bytes, name) in [(&a, "amb:a"), (&b, "amb:b")] {
        let d = sha256(bytes);
        std::fs::write(blob_path(&env.home(), &d), bytes).expect("write blob");
        index["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": d,
                "size": bytes.len(),
                "annotations": { "org.opencontainers.image.ref.name": name },
            }));
    }
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("index")).expect("index");
    env.fsck();

    let (da, db) = (sha256(&a), sha256(&b));
    let shared = &hex(&da)[..4];
    assert!(hex(&db).starts_with(shared));
    let err = env.fail(&["inspect", shared], 1);
    assert!(err.contains("ambiguous") && err.contains(shared), "{err}");
    let err = env.fail(&["rmi", shared], 1);
    assert!(err.contains("ambiguous"), "{err}");
    // Longer prefixes tell them apart.
    for d in [&da, &db] {
        let unique = (5..=64)
            .map(|n| &hex(d)[..n])
            .find(|p| {
                [&da, &db, &digest]
                    .iter()
                    .filter(|x| hex(x).starts_with(p))
                    .count()
                    == 1
            })
            .expect("distinct digests");
        assert_eq!(
            env.ok(&["inspect", unique, "--format", ".Digest"]),
            format!("{d}\n")
        );
    }
    let mut names = env.names();
    names.sort();
    assert_eq!(names, ["amb:a", "amb:b", "app:1"]);
    env.fsck();
}

#[test]
fn rmi_keeps_shared_layers() {
    let env = Env::new();
    let image = |name: &str, last: &str| {
        let df = format!(
            "FROM scratch AS base\nCOPY base.txt /base.txt\nFROM base\nCOPY {last} /{last}\n"
        );
        let ctx = context(
            &env,
            name,
            &df,
            &[("base.txt", "shared\n"), (last, &format!("{name}\n"))],
        );
        env.build(&ctx, &["-t", &format!("{name}:1")])
    };
    let one = image("one", "one.txt");
    let two = image("two", "two.txt");
    let (m1, m2) = (manifest(&env, &one), manifest(&env, &two));
    let (l1, l2) = (layer_digests(&m1), layer_digests(&m2));
    assert_eq!(l1[0], l2[0], "the base layer is shared");
    assert_ne!(l1[1], l2[1]);
    let blobs_one = blobs_of(&env, "one:1");
    let blobs_two = blobs_of(&env, "two:1");
    env.fsck();

    let out = env.ok(&["rmi", "one:1"]);
    assert!(out.contains(&one), "{out}");
    assert_eq!(env.names(), ["two:1"]);
    let err = env.fail(&["inspect", "one:1"], 1);
    assert!(err.contains("not found"), "{err}");
    let left = store_blobs(&env);
    for gone in blobs_one.difference(&blobs_two) {
        assert!(!left.contains(gone), "{gone} of one:1 is still stored");
    }
    assert!(left.is_superset(&blobs_two), "two:1 lost blobs");
    env.fsck();
    let tree = env.unpack("two:1", "two");
    assert_tree(
        &tree,
        &[
            ("base.txt".to_string(), file("shared\n", 0o644, 0, 0)),
            ("two.txt".to_string(), file("two\n", 0o644, 0, 0)),
        ]
        .into_iter()
        .collect(),
    );

    // An image under two names loses nothing until its last name goes.
    let ctx = context(&env, "three", "FROM two:1\nENV THREE=3\n", &[]);
    let three = env.build(&ctx, &["-t", "three:1", "-t", "three:2"]);
    env.ok(&["rmi", "three:1"]);
    assert_eq!(env.names(), ["three:2", "two:1"]);
    assert!(store_blobs(&env).is_superset(&blobs_of(&env, "three:2")));
    env.fsck();
    env.ok(&["rmi", "three:2", "two:1"]);
    assert!(env.names().is_empty());
    let err = env.fail(&["inspect", &three], 1);
    assert!(err.contains("not found"), "{err}");
    assert!(
        store_blobs(&env).is_empty(),
        "blobs left: {:?}",
        store_blobs(&env)
    );
    env.fsck();
}

#[test]
fn fsck_names_a_tampered_or_missing_blob() {
    for damage in ["tamper layer", "remove layer", "remove config"] {
        let env = Env::new();
        let ctx = context(
            &env,
            "ctx",
            "FROM scratch\nCOPY a.txt /a.txt\nCOPY b.txt /b.txt\n",
            &[("a.txt", "a\n"), ("b.txt", "b\n")],
        );
        env.build(&ctx, &["-t", "app:1"]);
        env.fsck();
        let m = manifest(&env, "app:1");
        let victim = match damage {
            "remove config" => m["config"]["digest"].as_str().expect("config").to_string(),
            _ => layer_digests(&m)[0].clone(),
        };
        let path = blob_path(&env.home(), &victim);
        if damage == "tamper layer" {
            let mut bytes = std::fs::read(&path).expect("read blob");
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&path, bytes).expect("overwrite blob");
        } else {
            std::fs::remove_file(&path).expect("remove blob");
        }
        let problems = fsck_problems(&env);
        assert!(
            problems.iter().any(|p| p.contains(&victim)),
            "{damage}: no problem names {victim}: {problems:#?}"
        );
    }
}

#[test]
fn concurrent_builds_keep_every_tag() {
    let env = Env::new();
    let mut expected = Vec::new();
    for round in 0..4 {
        let children: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|side| {
                let name = format!("r{round}{side}");
                // A shared first layer, so both processes also store the same blob at once.
                let ctx = context(
                    &env,
                    &name,
                    &format!("FROM scratch\nCOPY shared.txt /\nCOPY own.txt /{name}.txt\n"),
                    &[("shared.txt", "shared\n"), ("own.txt", &name)],
                );
                let tag = format!("{name}:1");
                let child = env
                    .cmd()
                    .args(["build", "-q", "-t", &tag])
                    .arg(&ctx)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn strata build");
                (tag, child)
            })
            .collect();
        for (tag, child) in children {
            let out = child.wait_with_output().expect("wait for strata build");
            assert!(
                out.status.success(),
                "build {tag}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let digest = String::from_utf8(out.stdout)
                .expect("utf-8")
                .trim()
                .to_string();
            expected.push((tag, digest));
        }
        let names: BTreeSet<String> = env.names().into_iter().collect();
        for (tag, _) in &expected {
            assert!(names.contains(tag), "round {round}: {tag} lost: {names:?}");
        }
    }
    let index: Value = serde_json::from_slice(
        &std::fs::read(env.home().join("index.json")).expect("read index.json"),
    )
    .expect("index json");
    for (tag, digest) in &expected {
        let hit = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str());
        let hit = hit.unwrap_or_else(|| panic!("{tag} not in index.json: {index:#}"));
        assert_eq!(hit["digest"], digest.as_str(), "{tag}");
    }
    assert_eq!(env.names().len(), expected.len());
    env.fsck();
    assert_tmp_empty(&env);
}

#[test]
fn from_oci_layout() {
    let env = Env::new();
    let base_ctx = context(
        &env,
        "base",
        "FROM scratch\nENV BASE=1\nCOPY one.txt /one.txt\nCOPY two.txt /etc/two.txt\n",
        &[("one.txt", "one\n"), ("two.txt", "two\n")],
    );
    let base = env.build(&base_ctx, &["-t", "base:1"]);
    let base_layers = layer_digests(&manifest(&env, "base:1"));
    let layout = env.path("layout");
    env.ok(&[
        "export",
        "base:1",
        "--output",
        &format!("oci:{}:base", layout.display()),
    ]);
    validate_layout(&layout);
    env.ok(&["rmi", "base:1"]);
    assert!(store_blobs(&env).is_empty(), "rmi left the base's blobs");

    // A layout whose last layer blob was tampered with (same size) is refused.
    let tampered = env.path("tampered");
    copy_tree(&layout, &tampered);
    let victim = base_layers.last().expect("a layer").clone();
    let path = blob_path(&tampered, &victim);
    let mut bytes = std::fs::read(&path).expect("read blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).expect("tamper");
    let bad_ctx = context(
        &env,
        "bad",
        &format!(
            "FROM oci:{}:base\nCOPY three.txt /three.txt\n",
            tampered.display()
        ),
        &[("three.txt", "three\n")],
    );
    let err = env.fail(
        &[
            "build",
            "-q",
            "-t",
            "app:1",
            bad_ctx.to_str().expect("utf-8"),
        ],
        1,
    );
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(err.contains(&victim), "names the blob: {err}");
    assert!(env.names().is_empty(), "{:?}", env.names());
    env.fsck();
    assert_tmp_empty(&env);

    // The intact layout works as a base, after the store has lost the image.
    let ctx = context(
        &env,
        "app",
        &format!(
            "FROM oci:{}:base\nCOPY three.txt /three.txt\n",
            layout.display()
        ),
        &[("three.txt", "three\n")],
    );
    let app = env.build(&ctx, &["-t", "app:1"]);
    assert_ne!(app, base);
    let layers = layer_digests(&manifest(&env, "app:1"));
    assert_eq!(layers.len(), base_layers.len() + 1);
    assert_eq!(layers[..base_layers.len()], base_layers[..]);
    let env_line = env.ok(&["inspect", "app:1", "--format", ".Config.config.Env"]);
    assert!(env_line.contains("BASE=1"), "{env_line}");
    env.fsck();
    let tree = env.unpack("app:1", "app");
    assert_tree(
        &tree,
        &[
            ("etc".to_string(), dir(0o755, 0, 0)),
            ("etc/two.txt".to_string(), file("two\n", 0o644, 0, 0)),
            ("one.txt".to_string(), file("one\n", 0o644, 0, 0)),
            ("three.txt".to_string(), file("three\n", 0o644, 0, 0)),
        ]
        .into_iter()
        .collect(),
    );
}

#[test]
fn exports_are_read_by_skopeo_and_umoci() {
    let env = Env::new();
    let ctx = context(
        &env,
        "ctx",
        "FROM scratch\nENV A=1\nLABEL org.example.l=v\nCOPY a.txt /a.txt\nCOPY bin/ /usr/bin/\n",
        &[("a.txt", "a\n"), ("bin/tool", "#!/bin/sh\n")],
    );
    crate::common::chmod(&ctx, "bin/tool", 0o755);
    let docker = env.path("docker.tar");
    let oci_tar = env.path("oci.tar");
    let digest = env.build(
        &ctx,
        &[
            "-t",
            "app:1",
            "--output",
            &format!("docker-archive:{}:app:1", docker.display()),
            "--output",
            &format!("type=oci,dest={},name=v1", oci_tar.display()),
        ],
    );
    let config: Value =
        serde_json::from_slice(&raw(&env, &["inspect", "app:1", "--raw", "--config"]))
            .expect("config");
    let diff_ids = &config["rootfs"]["diff_ids"];

    let from_docker = skopeo_inspect(&format!("docker-archive:{}:app:1", docker.display()));
    assert_eq!(from_docker["Layers"], *diff_ids, "{from_docker:#}");
    assert_eq!(
        from_docker["Env"],
        json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "A=1"
        ])
    );
    assert_eq!(from_docker["Labels"], json!({"org.example.l": "v"}));

    let from_oci = skopeo_inspect(&format!("oci-archive:{}:v1", oci_tar.display()));
    assert_eq!(from_oci["Digest"], digest.as_str(), "{from_oci:#}");
    assert_eq!(
        from_oci["Layers"],
        json!(layer_digests(&manifest(&env, &digest)))
    );
    assert_eq!(from_oci["Labels"], json!({"org.example.l": "v"}));

    let exported = env.path("exported.tar");
    env.ok(&[
        "export",
        "app:1",
        "--output",
        &format!("oci-archive:{}:v2", exported.display()),
    ]);
    let again = skopeo_inspect(&format!("oci-archive:{}:v2", exported.display()));
    assert_eq!(again["Digest"], digest.as_str());

    // skopeo turns the docker archive into an OCI layout with the same file system.
    let copied = env.path("copied");
    run_ok(Command::new(tool("skopeo", "skopeo")).args([
        "copy",
        &format!("docker-archive:{}", docker.display()),
        &format!("oci:{}:v1", copied.display()),
    ]));
    validate_layout(&copied);
    let via_skopeo = umoci_unpack(&copied, "v1", &env.path("copied-bundle"));
    let direct = env.unpack("app:1", "direct");
    assert_eq!(via_skopeo, direct);
    assert_tree(
        &direct,
        &[
            ("a.txt".to_string(), file("a\n", 0o644, 0, 0)),
            ("usr".to_string(), dir(0o755, 0, 0)),
            ("usr/bin".to_string(), dir(0o755, 0, 0)),
            ("usr/bin/tool".to_string(), file("#!/bin/sh\n", 0o755, 0, 0)),
        ]
        .into_iter()
        .collect(),
    );
    env.fsck();
}

#[test]
fn exported_layouts_are_world_readable_and_short_digests_resolve() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let digest = env.build(&crate::common::fixture("sample"), &["-t", "perm"]);
    let short = &digest[..7 + 12];
    assert_eq!(
        env.ok(&["inspect", short, "--format", ".Digest"]).trim(),
        digest
    );
    let layout = env.path("perm-layout");
    env.ok(&[
        "export",
        "perm",
        "--output",
        &format!("oci:{}", layout.display()),
    ]);
    for dir in [
        layout.clone(),
        layout.join("blobs/sha256"),
        env.home().join("blobs/sha256"),
    ] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() && e.file_name() != "lock" {
                let mode = e.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o644, "{} is {mode:o}", e.path().display());
            }
        }
    }
}
