//! Building fixtures and checking the result with the real tools: umoci unpacks exactly the
//! expected tree, skopeo reads every export, the layout validates against the OCI schemas.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::common::*;

/// `RepoTags` of a docker-archive, read with GNU tar.
fn docker_archive_tags(archive: &Path) -> Vec<String> {
    let out = run_ok(
        Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg("manifest.json"),
    );
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    m[0]["RepoTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn fixture_file(rel: &str) -> String {
    std::fs::read_to_string(fixture("sample").join(rel)).expect("fixture file")
}

#[test]
fn sample_service_builds_unpacks_and_exports() {
    let env = Env::new();
    let digest = env.build(&fixture("sample"), &["-t", "sample-app:1"]);
    env.fsck();
    assert_eq!(env.names(), vec!["sample-app:1".to_string()]);

    let tree = env.unpack("sample-app:1", "sample");
    let mut expected = Tree::new();
    expected.insert("App".into(), dir(0o755, 0, 0));
    for (f, mode) in [
        ("Altinn.Application.dll", 0o644),
        ("Altinn.Application.runtimeconfig.json", 0o644),
        ("start.sh", 0o755),
    ] {
        expected.insert(
            format!("App/{f}"),
            file(&fixture_file(&format!("publish/{f}")), mode, 0, 0),
        );
    }
    expected.insert("App/app.dll".into(), link("Altinn.Application.dll"));
    for d in [
        "config",
        "config/authorization",
        "config/process",
        "config/texts",
    ] {
        expected.insert(format!("App/{d}"), dir(0o755, 1000, 3000));
    }
    for f in [
        "config/applicationmetadata.json",
        "config/authorization/policy.xml",
        "config/process/process.bpmn",
        "config/texts/resource.nb.json",
    ] {
        expected.insert(
            format!("App/{f}"),
            file(&fixture_file(&format!("App/{f}")), 0o644, 1000, 3000),
        );
    }
    assert_tree(&tree, &expected);

    // The image config, as skopeo reads it from each export format.
    let oci = env.path("sample-oci");
    let oci_ref = format!("oci:{}:v1", oci.display());
    env.ok(&["export", "sample-app:1", "--output", &oci_ref]);
    let archive = env.path("sample-docker.tar");
    let docker_ref = format!("docker-archive:{}:sample-app:1", archive.display());
    env.ok(&["export", "sample-app:1", "--output", &docker_ref]);
    let oci_archive = env.path("sample-oci.tar");
    let oci_archive_ref = format!("oci-archive:{}", oci_archive.display());
    env.ok(&["export", "sample-app:1", "--output", &oci_archive_ref]);

    let from_oci = skopeo_inspect(&oci_ref);
    assert_eq!(from_oci["Digest"], digest.as_str());
    assert_eq!(from_oci["Layers"].as_array().unwrap().len(), 3);
    assert_eq!(skopeo_inspect(&oci_archive_ref)["Digest"], digest.as_str());
    let from_docker = skopeo_inspect(&format!("docker-archive:{}", archive.display()));
    assert_eq!(docker_archive_tags(&archive), vec!["sample-app:1"]);
    for info in [&from_oci, &from_docker] {
        assert_eq!(info["Labels"]["studio.altinn.app"], "Altinn.Application");
        assert_eq!(info["Os"], "linux");
        assert_eq!(info["Created"], "1970-01-01T00:00:00Z");
        let env_vars: Vec<&str> = info["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            env_vars,
            vec![
                // FROM scratch sets no PATH: the stage gets the default one, as with BuildKit.
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ASPNETCORE_URLS=",
                "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=false"
            ]
        );
    }
    let config = skopeo_inspect_config(&oci_ref);
    assert_eq!(config["config"]["User"], "1000:3000");
    assert_eq!(config["config"]["WorkingDir"], "/App");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["dotnet", "Altinn.Application.dll"])
    );
    assert!(config["config"]["ExposedPorts"]["5005/tcp"].is_object());
    // One history entry per instruction of the final stage; layers only for file changes.
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), 9);
    let layered = history.iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(
        layered,
        config["rootfs"]["diff_ids"].as_array().unwrap().len()
    );

    // A docker-archive is loadable: skopeo copies it into a layout umoci unpacks.
    let copied = env.path("copied");
    run_ok(Command::new(tool("skopeo", "skopeo")).args([
        "copy",
        &format!("docker-archive:{}", archive.display()),
        &format!("oci:{}:c", copied.display()),
    ]));
    let bundle = env.path("copied-bundle");
    let mut c = Command::new(tool("umoci", "umoci"));
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    run_ok(
        c.arg("--image")
            .arg(format!("{}:c", copied.display()))
            .arg(&bundle),
    );
    assert_tree(&listing(&bundle.join("rootfs")), &expected);
}

/// A context exercising every COPY/ADD feature; returns the expected tree of the final image.
pub fn feature_context(root: &Path, group_writable: bool) -> Tree {
    let (fmode, xmode) = if group_writable {
        (0o664, 0o775)
    } else {
        (0o644, 0o755)
    };
    write(
        root,
        "Dockerfile",
        br#"# escape=\
ARG BASE=scratch
FROM ${BASE} AS base
ENV APPDIR=/srv/app
WORKDIR $APPDIR
COPY bin/ ./bin/
COPY links ./links
COPY hard ./hard
COPY empty ./empty
COPY long/ ./long/
COPY unicode ./unicode
COPY *.log ./logs/
COPY --chmod=0600 --chown=7:8 app/*.txt ./app/
COPY --exclude=*.md app/ ./app2/
COPY <<EOF ./note.txt
dir=${APPDIR}
EOF
ADD archive.tar.gz /opt/

FROM scratch AS unused
COPY missing-on-purpose /nowhere

FROM ${BASE}
ARG GREETING=hello
COPY --from=base /srv/app /srv/app
COPY --from=base /opt/x/inner.txt /opt/inner-${GREETING}.txt
ENV GREETING=$GREETING \
    LONG="a b"
LABEL greeting="${GREETING}" multi="x y"
CMD ["serve", "--port", "8080"]
"#,
    );
    write(
        root,
        ".dockerignore",
        b"# logs\n*.log\n!keep.log\nsecret/\narchive-src\n",
    );
    write(root, "a.log", b"excluded");
    write(root, "keep.log", b"kept");
    write(root, "secret/key", b"never in the image");
    write(root, "bin/tool", b"#!/bin/sh\necho tool\n");
    write(root, "bin/data", b"data");
    chmod(root, "bin/tool", xmode);
    chmod(root, "bin/data", fmode);
    std::fs::create_dir_all(root.join("links")).unwrap();
    std::os::unix::fs::symlink("../bin/tool", root.join("links/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("links/abs")).unwrap();
    write(root, "hard/one", b"same inode");
    std::fs::hard_link(root.join("hard/one"), root.join("hard/two")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let long_dir = "d".repeat(120);
    let long_file = format!("{}.txt", "f".repeat(110));
    write(root, &format!("long/{long_dir}/{long_file}"), b"long path");
    write(root, "unicode/grüße.txt", "Grüße".as_bytes());
    write(root, "unicode/日本語.txt", "こんにちは".as_bytes());
    write(root, "app/one.txt", b"one");
    write(root, "app/two.txt", b"two");
    write(root, "app/skip.md", b"skipped by --exclude");
    write(root, "archive-src/x/inner.txt", b"from the archive");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(root.join("archive-src"))
            .args([
                "--owner=5",
                "--group=6",
                "--mode=0640",
                "--mtime=@0",
                "-czf",
            ])
            .arg(root.join("archive.tar.gz"))
            .arg("x"),
    );
    for p in [
        "", "bin", "links", "hard", "empty", "long", "unicode", "app",
    ] {
        chmod(root, p, xmode);
    }

    let mut t = Tree::new();
    for d in [
        "srv",
        "srv/app",
        "srv/app/bin",
        "srv/app/links",
        "srv/app/hard",
    ] {
        t.insert(d.into(), dir(0o755, 0, 0));
    }
    t.insert(
        "srv/app/bin/tool".into(),
        file("#!/bin/sh\necho tool\n", 0o755, 0, 0),
    );
    t.insert("srv/app/bin/data".into(), file("data", 0o644, 0, 0));
    t.insert("srv/app/links/rel".into(), link("../bin/tool"));
    t.insert("srv/app/links/abs".into(), link("/etc/passwd"));
    t.insert("srv/app/hard/one".into(), file("same inode", 0o644, 0, 0));
    t.insert("srv/app/hard/two".into(), file("same inode", 0o644, 0, 0));
    t.insert("srv/app/empty".into(), dir(0o755, 0, 0));
    t.insert("srv/app/long".into(), dir(0o755, 0, 0));
    t.insert(format!("srv/app/long/{long_dir}"), dir(0o755, 0, 0));
    t.insert(
        format!("srv/app/long/{long_dir}/{long_file}"),
        file("long path", 0o644, 0, 0),
    );
    t.insert("srv/app/unicode".into(), dir(0o755, 0, 0));
    t.insert(
        "srv/app/unicode/grüße.txt".into(),
        file("Grüße", 0o644, 0, 0),
    );
    t.insert(
        "srv/app/unicode/日本語.txt".into(),
        file("こんにちは", 0o644, 0, 0),
    );
    t.insert("srv/app/logs".into(), dir(0o755, 0, 0));
    t.insert("srv/app/logs/keep.log".into(), file("kept", 0o644, 0, 0));
    t.insert("srv/app/app".into(), dir(0o755, 7, 8));
    t.insert("srv/app/app/one.txt".into(), file("one", 0o600, 7, 8));
    t.insert("srv/app/app/two.txt".into(), file("two", 0o600, 7, 8));
    t.insert("srv/app/app2".into(), dir(0o755, 0, 0));
    t.insert("srv/app/app2/one.txt".into(), file("one", 0o644, 0, 0));
    t.insert("srv/app/app2/two.txt".into(), file("two", 0o644, 0, 0));
    t.insert(
        "srv/app/note.txt".into(),
        file("dir=/srv/app\n", 0o644, 0, 0),
    );
    t.insert("opt".into(), dir(0o755, 0, 0));
    t.insert(
        "opt/inner-bonjour.txt".into(),
        file("from the archive", 0o640, 5, 6),
    );
    t
}

#[test]
fn every_copy_feature_lands_exactly_where_docker_puts_it() {
    let env = Env::new();
    let ctx = env.path("ctx");
    let expected = feature_context(&ctx, false);
    env.build(&ctx, &["-t", "features", "--build-arg", "GREETING=bonjour"]);
    env.fsck();
    let tree = env.unpack("features", "features");
    assert_tree(&tree, &expected);

    // Hardlinks stay hardlinks.
    let bundle = env.path("features-bundle/rootfs/srv/app/hard");
    let one = std::fs::metadata(bundle.join("one")).unwrap();
    let two = std::fs::metadata(bundle.join("two")).unwrap();
    assert_eq!(
        one.ino(),
        two.ino(),
        "hard/one and hard/two should share an inode"
    );

    let layout = env.path("features-layout");
    let config = skopeo_inspect_config(&format!("oci:{}:features", layout.display()));
    let env_vars = config["config"]["Env"].as_array().unwrap();
    assert!(
        env_vars.contains(&serde_json::json!("GREETING=bonjour")),
        "{env_vars:?}"
    );
    assert!(
        env_vars.contains(&serde_json::json!("LONG=a b")),
        "{env_vars:?}"
    );
    // ARG values never reach the config, ENV values from the base stage do not leak into a
    // stage that starts from scratch.
    assert!(
        !env_vars
            .iter()
            .any(|v| v.as_str().unwrap().starts_with("APPDIR="))
    );
    assert_eq!(config["config"]["Labels"]["greeting"], "bonjour");
    assert_eq!(config["config"]["Labels"]["multi"], "x y");
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["serve", "--port", "8080"])
    );
}

#[test]
fn stages_inherit_from_local_images_like_docker() {
    let env = Env::new();
    let base = env.path("base");
    write(
        &base,
        "Dockerfile",
        b"FROM scratch\nCOPY f /etc/f\nENV A=1 B=2\nCMD [\"base-cmd\"]\nUSER 5\nWORKDIR /work\nONBUILD COPY trigger /trigger\nLABEL from=base\n",
    );
    write(&base, "f", b"base file");
    env.build(&base, &["-t", "base:1"]);

    let child = env.path("child");
    write(
        &child,
        "Dockerfile",
        b"FROM base:1\nENV B=3\nENTRYPOINT [\"child\"]\nCOPY g sub/g\nWORKDIR rel\n",
    );
    write(&child, "g", b"child file");
    write(&child, "trigger", b"onbuild ran");
    env.build(&child, &["-t", "child:1"]);
    env.fsck();

    let layout = env.path("child-layout");
    env.ok(&[
        "export",
        "child:1",
        "--output",
        &format!("oci:{}:c", layout.display()),
    ]);
    let config = skopeo_inspect_config(&format!("oci:{}:c", layout.display()));
    let c = &config["config"];
    assert_eq!(
        c["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "A=1",
            "B=3"
        ])
    );
    // ENTRYPOINT resets a CMD inherited from the base image.
    assert_eq!(c["Entrypoint"], serde_json::json!(["child"]));
    assert!(c["Cmd"].is_null(), "{c}");
    assert_eq!(c["User"], "5");
    assert_eq!(c["WorkingDir"], "/work/rel");
    assert_eq!(c["Labels"]["from"], "base");
    // The ONBUILD trigger ran in the child and is not inherited further.
    assert!(c["OnBuild"].is_null(), "{c}");

    let tree = env.unpack("child:1", "child");
    assert_eq!(tree["etc/f"].0, Obj::File(b"base file".to_vec()));
    assert_eq!(tree["trigger"].0, Obj::File(b"onbuild ran".to_vec()));
    assert_eq!(tree["work/sub/g"].0, Obj::File(b"child file".to_vec()));
    // WORKDIR creates its directory owned by the USER in effect.
    assert_eq!(
        (tree["work/rel"].2, tree["work/rel"].3),
        if is_root() { (5, 5) } else { (0, 0) }
    );
}

#[test]
fn zstd_and_uncompressed_layers_are_valid_images() {
    let env = Env::new();
    let ctx = env.path("ctx");
    let expected = feature_context(&ctx, false);
    for c in ["zstd", "uncompressed"] {
        let name = format!("f-{c}");
        env.build(
            &ctx,
            &[
                "-t",
                &name,
                "--compression",
                c,
                "--build-arg",
                "GREETING=bonjour",
            ],
        );
        let layout = env.path(&format!("{name}-layout"));
        let oci_ref = format!("oci:{}:{name}", layout.display());
        env.ok(&["export", &name, "--output", &oci_ref]);
        validate_layout(&layout);
        // Debian's umoci predates zstd: let skopeo (containers/image) decode the layers and
        // re-encode them as gzip, then unpack that with umoci.
        let regz = env.path(&format!("{name}-regz"));
        run_ok(Command::new(tool("skopeo", "skopeo")).args([
            "copy",
            "--dest-compress-format",
            "gzip",
            "--dest-compress",
            &oci_ref,
            &format!("oci:{}:r", regz.display()),
        ]));
        let bundle = env.path(&format!("{name}-bundle"));
        let mut cmd = Command::new(tool("umoci", "umoci"));
        cmd.arg("unpack");
        if !is_root() {
            cmd.arg("--rootless");
        }
        run_ok(
            cmd.arg("--image")
                .arg(format!("{}:r", regz.display()))
                .arg(&bundle),
        );
        assert_tree(&listing(&bundle.join("rootfs")), &expected);
        let raw =
            run_ok(Command::new(tool("skopeo", "skopeo")).args(["inspect", "--raw", &oci_ref]));
        let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
        let want = if c == "zstd" {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        for l in manifest["layers"].as_array().unwrap() {
            assert_eq!(l["mediaType"], want);
        }
    }
    env.fsck();
}

#[test]
fn progress_json_and_metadata_files() {
    let env = Env::new();
    let out = env
        .cmd()
        .args(["build", "--progress", "json", "-t", "p"])
        .arg("--iidfile")
        .arg(env.path("iid"))
        .arg("--metadata-file")
        .arg(env.path("meta.json"))
        .arg(fixture("sample"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "step" && e["text"] == "WORKDIR /App")
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "step_done" && e["layer"]["digest"].is_string())
    );
    assert_eq!(events.last().unwrap()["type"], "result");
    assert_eq!(events.last().unwrap()["digest"], digest.as_str());
    assert_eq!(std::fs::read_to_string(env.path("iid")).unwrap(), digest);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["containerimage.digest"], digest.as_str());
    assert_eq!(meta["image.name"], "p:latest");

    // -q prints only the digest, nothing on stderr.
    let out = env
        .cmd()
        .args(["build", "-q"])
        .arg(fixture("sample"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), digest);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn build_outputs_write_archives_skopeo_reads() {
    let env = Env::new();
    let oci_tar = env.path("out-oci.tar");
    let docker_tar = env.path("out-docker.tar");
    let digest = env.build(
        &fixture("sample"),
        &[
            "-o",
            &format!("type=oci,dest={}", oci_tar.display()),
            "-o",
            &format!("docker-archive:{}:sample:2", docker_tar.display()),
        ],
    );
    assert_eq!(
        skopeo_inspect(&format!("oci-archive:{}", oci_tar.display()))["Digest"],
        digest.as_str()
    );
    skopeo_inspect(&format!("docker-archive:{}", docker_tar.display()));
    assert_eq!(docker_archive_tags(&docker_tar), vec!["sample:2"]);
}
