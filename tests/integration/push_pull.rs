//! Pushing and pulling against a real registry, checked with the other tools: skopeo reads
//! what strata pushed, umoci unpacks it to the tree strata's own export gives, and strata
//! pulls and builds on what skopeo and buildah wrote (OCI, Docker v2s2, zstd, an index).
//! Also the helpers the other registry test modules share.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;
use crate::registry::{Registry, Request};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// strata seeing only the test's own credentials: `DOCKER_CONFIG` in the test's dir, and no
/// auth file, CA bundle or log filter inherited from whoever runs the tests.
pub(crate) fn strata(env: &Env) -> Command {
    let mut c = env.cmd();
    c.env("DOCKER_CONFIG", docker_config(env))
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("SSL_CERT_FILE")
        .env_remove("STRATA_LOG");
    c
}

/// The test's `DOCKER_CONFIG` directory (not created until a login writes to it).
pub(crate) fn docker_config(env: &Env) -> PathBuf {
    env.path("docker-config")
}

pub(crate) fn output(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("run {c:?}: {e}"))
}

/// Run [`strata`] with `args` and require success; returns (stdout, stderr).
pub(crate) fn ok(env: &Env, args: &[&str]) -> (String, String) {
    let out = output(strata(env).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "strata {args:?} failed ({}):\n{stderr}",
        out.status
    );
    (String::from_utf8(out.stdout).expect("utf-8 stdout"), stderr)
}

/// Run [`strata`] with `args` and require exit `code`; returns stderr.
pub(crate) fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let out = output(strata(env).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "strata {args:?} should exit {code}; stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The digest a command printed as its last stdout line.
pub(crate) fn printed_digest(stdout: &str) -> String {
    let d = stdout.lines().last().unwrap_or_default().trim().to_string();
    assert!(d.starts_with("sha256:") && d.len() == 71, "digest {d:?}");
    d
}

/// `strata build --progress plain EXTRA CONTEXT`; returns (digest, stderr).
pub(crate) fn build(env: &Env, context: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec!["build", "--progress", "plain"];
    args.extend_from_slice(extra);
    args.push(context.to_str().expect("utf-8 path"));
    let (out, err) = ok(env, &args);
    (printed_digest(&out), err)
}

/// A build context in the test's dir: `files` and a Dockerfile.
pub(crate) fn context(env: &Env, name: &str, dockerfile: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = env.path(name);
    write(&dir, "Dockerfile", dockerfile.as_bytes());
    for (rel, content) in files {
        write(&dir, rel, content);
        chmod(&dir, rel, 0o644);
    }
    dir
}

/// `n` incompressible bytes, the same for the same `seed` (xorshift64*).
pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// skopeo isolated from the machine's credentials, signature policy and blob-info cache.
pub(crate) fn skopeo(env: &Env, args: &[&str]) -> Output {
    output(
        Command::new(tool("skopeo", "skopeo"))
            .env("HOME", env.path("skopeo-home"))
            .env("REGISTRY_AUTH_FILE", env.path("skopeo-auth.json"))
            .arg("--insecure-policy")
            .args(args),
    )
}

pub(crate) fn skopeo_ok(env: &Env, args: &[&str]) -> String {
    let out = skopeo(env, args);
    assert!(
        out.status.success(),
        "skopeo {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// How skopeo reaches a test registry: no TLS verification (plain HTTP on loopback, or the
/// test CA), plus `extra` (e.g. `--creds`).
fn remote_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--tls-verify=false"];
    v.extend_from_slice(extra);
    v
}

/// The manifest digest of `image` (`host:port/repo:tag`) as skopeo sees it.
pub(crate) fn remote_digest(env: &Env, image: &str, extra: &[&str]) -> String {
    let mut args = vec!["inspect"];
    args.extend(remote_args(extra));
    let transport = format!("docker://{image}");
    args.push(&transport);
    let v: serde_json::Value =
        serde_json::from_str(&skopeo_ok(env, &args)).expect("skopeo inspect json");
    v["Digest"].as_str().expect("Digest").to_string()
}

/// The raw manifest (or index) of `image`.
pub(crate) fn remote_manifest(env: &Env, image: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["inspect", "--raw"];
    args.extend(remote_args(extra));
    let transport = format!("docker://{image}");
    args.push(&transport);
    serde_json::from_str(&skopeo_ok(env, &args)).expect("raw manifest json")
}

/// `manifest.layers[*].digest`.
pub(crate) fn layer_digests(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("layer digest").to_string())
        .collect()
}

/// Copy `image` out of the registry with skopeo (which checks every digest), validate the
/// copy against the OCI schemas, and unpack it; returns the root filesystem.
pub(crate) fn remote_tree(env: &Env, image: &str, name: &str, extra: &[&str]) -> Tree {
    let src = format!("docker://{image}");
    let exact = env.path(&format!("{name}-remote"));
    let mut args = vec!["copy", "--src-tls-verify=false"];
    args.extend_from_slice(extra);
    let dest = format!("oci:{}:t", exact.display());
    args.extend([src.as_str(), dest.as_str()]);
    skopeo_ok(env, &args);
    validate_layout(&exact);
    let mut args = vec!["--src-tls-verify=false"];
    args.extend_from_slice(extra);
    unpack_gzip(env, &src, &format!("{name}-remote"), &args)
}

/// [`Env::unpack`] for any image strata pulled: zstd layers, and Docker manifests (which
/// strata exports to an OCI layout as they are, where skopeo and umoci don't read them, so
/// those go through a docker-archive).
pub(crate) fn local_tree(env: &Env, reference: &str, name: &str) -> Tree {
    let layout = env.path(&format!("{name}-layout"));
    let oci = format!("oci:{}:s", layout.display());
    ok(env, &["export", reference, "--output", &oci]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("read index.json"))
            .expect("index.json");
    if index["manifests"][0]["mediaType"] == DOCKER_MANIFEST {
        let archive = env.path(&format!("{name}.tar"));
        let src = format!("docker-archive:{}:{name}:s", archive.display());
        ok(env, &["export", reference, "--output", &src]);
        return unpack_gzip(env, &src, name, &[]);
    }
    validate_layout(&layout);
    unpack_gzip(env, &oci, name, &[])
}

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// skopeo copies `src` to an OCI layout with gzip layers (umoci 0.4 reads no zstd), then
/// umoci unpacks that.
fn unpack_gzip(env: &Env, src: &str, name: &str, extra: &[&str]) -> Tree {
    let gzip = env.path(&format!("{name}-gzip"));
    let dest = format!("oci:{}:t", gzip.display());
    let mut args = vec!["copy", "--dest-compress-format", "gzip", "--dest-compress"];
    args.extend_from_slice(extra);
    args.extend([src, dest.as_str()]);
    skopeo_ok(env, &args);
    let bundle = env.path(&format!("{name}-bundle"));
    let mut c = Command::new(tool("umoci", "umoci"));
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    c.arg("--image").arg(&dest[4..]).arg(&bundle);
    run_ok(&mut c);
    listing(&bundle.join("rootfs"))
}

/// Requests the registry logged after the first `from`.
pub(crate) fn requests_since(reg: &Registry, from: usize) -> Vec<Request> {
    reg.requests().split_off(from)
}

/// The digests of completed uploads (`PUT …/blobs/uploads/…?digest=`) among `reqs`.
pub(crate) fn uploaded(reqs: &[Request]) -> BTreeSet<String> {
    reqs.iter()
        .filter(|r| r.method == "PUT" && r.is_upload() && r.status == 201)
        .filter_map(|r| r.param("digest"))
        .collect()
}

/// `tree` with one more entry.
fn with(mut tree: Tree, path: &str, entry: (Obj, u32, u32, u32)) -> Tree {
    tree.insert(path.to_string(), entry);
    tree
}

// ---------------------------------------------------------------------------------------------
// strata → registry → other tools
// ---------------------------------------------------------------------------------------------

#[test]
fn build_push_is_what_skopeo_and_umoci_read() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let image = reg.image("sample:1");
    let (digest, stderr) = build(&env, &fixture("sample"), &["--push", "-t", &image]);
    env.fsck();
    assert!(
        stderr.contains(&format!("pushed {image} ({digest})")),
        "{stderr}"
    );
    assert_eq!(remote_digest(&env, &image, &[]), digest);

    let remote = remote_tree(&env, &image, "sample", &[]);
    let local = env.unpack(&image, "sample");
    assert!(local.contains_key("App/start.sh"), "{local:?}");
    assert_tree(&remote, &local);
}

#[test]
fn push_to_two_tags_then_list_and_delete() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let (digest, _) = build(&env, &fixture("sample"), &["-t", "sample-local:1"]);
    let repo = reg.image("repo");
    for tag in ["a", "b"] {
        let dest = format!("{repo}:{tag}");
        let digestfile = env.path(&format!("digest-{tag}"));
        let (out, _) = ok(
            &env,
            &[
                "push",
                "sample-local:1",
                &dest,
                "--digestfile",
                digestfile.to_str().expect("utf-8"),
            ],
        );
        assert_eq!(printed_digest(&out), digest);
        assert_eq!(
            std::fs::read_to_string(&digestfile).expect("digestfile"),
            digest
        );
        assert_eq!(remote_digest(&env, &dest, &[]), digest);
    }
    env.fsck();

    let (tags, _) = ok(&env, &["tags", &repo]);
    let tags: BTreeSet<&str> = tags.lines().collect();
    assert_eq!(tags, BTreeSet::from(["a", "b"]));

    // Deleting by tag resolves it to the digest: the manifest, and so both tags, are gone.
    let (out, _) = ok(&env, &["delete", &format!("{repo}:a")]);
    assert!(out.contains(&digest), "{out}");
    for gone in [
        format!("{repo}:a"),
        format!("{repo}:b"),
        format!("{repo}@{digest}"),
    ] {
        let inspect = skopeo(
            &env,
            &["inspect", "--tls-verify=false", &format!("docker://{gone}")],
        );
        assert!(!inspect.status.success(), "{gone} still there after delete");
    }
    let (tags, _) = ok(&env, &["tags", &repo]);
    assert!(tags.trim().is_empty(), "tags after delete: {tags}");
    // The local image is untouched.
    env.fsck();
    assert_eq!(env.names(), vec!["sample-local:1".to_string()]);
}

/// A push whose blobs are all at the destination: `push` reports each blob as existing.
fn repush(env: &Env, reg: &Registry) -> (String, String, Vec<Request>) {
    let image = reg.image("sample:1");
    let (digest, _) = build(env, &fixture("sample"), &["--push", "-t", &image]);
    let before = reg.requests().len();
    let (out, stderr) = ok(env, &["push", "--progress", "plain", &image]);
    assert_eq!(printed_digest(&out), digest);
    (digest, stderr, requests_since(reg, before))
}

#[test]
fn repush_of_an_unchanged_image_uploads_nothing() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let (digest, stderr, reqs) = repush(&env, &reg);
    let manifest = remote_manifest(&env, &reg.image("sample:1"), &[]);
    let blobs = layer_digests(&manifest).len() + 1;
    let exists = stderr
        .lines()
        .filter(|l| l.ends_with(")") && l.contains(" exists ("))
        .count();
    assert_eq!(exists, blobs, "every blob should exist already:\n{stderr}");
    assert!(!stderr.contains(" done ("), "{stderr}");
    let uploads: Vec<&Request> = reqs.iter().filter(|r| r.is_upload()).collect();
    assert!(uploads.is_empty(), "re-push uploaded: {uploads:#?}");
    assert!(
        reqs.iter()
            .all(|r| r.method != "PATCH" && r.blob().is_none_or(|_| r.method == "HEAD")),
        "{reqs:#?}"
    );
    assert_eq!(remote_digest(&env, &reg.image("sample:1"), &[]), digest);
    env.fsck();
}

#[test]
fn repush_summary_counts_blobs_already_there() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let (digest, stderr, _) = repush(&env, &reg);
    let image = reg.image("sample:1");
    let blobs = layer_digests(&remote_manifest(&env, &image, &[])).len() + 1;
    let expected = format!(
        "pushed {image} ({digest}): 0 uploaded, 0 mounted, {blobs} already there, 0 relayed"
    );
    assert!(
        stderr.contains(&expected),
        "want {expected:?} in:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// other tools → registry → strata
// ---------------------------------------------------------------------------------------------

/// buildah with its own storage (vfs) and no access to the machine's.
fn buildah_ok(env: &Env, args: &[&str]) -> String {
    let authfile = env.path("buildah-auth.json");
    if !authfile.exists() {
        std::fs::write(&authfile, "{}").expect("write buildah's auth file");
    }
    let mut c = Command::new(tool("buildah", "buildah"));
    c.env("HOME", env.path("buildah-home"))
        .env("REGISTRY_AUTH_FILE", &authfile)
        .env_remove("CONTAINERS_STORAGE_CONF")
        .arg("--root")
        .arg(env.path("buildah-root"))
        .arg("--runroot")
        .arg(env.path("buildah-runroot"))
        .arg("--storage-driver")
        .arg("vfs")
        .args(args);
    run_ok(&mut c)
}

/// An image another tool wrote, and what strata should find in it.
struct Foreign {
    /// `host:port/repo:tag`
    image: String,
    /// `--platform` for pull and FROM, if any.
    platform: Option<&'static str>,
    /// The manifest digest the pull should resolve to.
    digest: String,
    /// The root filesystem.
    tree: Tree,
}

/// The sample, exported by strata (`compression`) and pushed by skopeo with `args`.
fn skopeo_pushed(
    env: &Env,
    reg: &Registry,
    repo: &str,
    compression: &str,
    args: &[&str],
) -> Foreign {
    let tag = format!("sample-{compression}:1");
    build(
        env,
        &fixture("sample"),
        &["-t", &tag, "--compression", compression],
    );
    let tree = env.unpack(&tag, &format!("{repo}-base"));
    let layout = env.path(&format!("{repo}-layout"));
    ok(
        env,
        &[
            "export",
            &tag,
            "--output",
            &format!("oci:{}:s", layout.display()),
        ],
    );
    let image = reg.image(&format!("{repo}:1"));
    let mut copy = vec!["copy", "--dest-tls-verify=false"];
    copy.extend_from_slice(args);
    let (src, dest) = (
        format!("oci:{}:s", layout.display()),
        format!("docker://{image}"),
    );
    copy.extend([src.as_str(), dest.as_str()]);
    skopeo_ok(env, &copy);
    let digest = remote_digest(env, &image, &[]);
    Foreign {
        image,
        platform: None,
        digest,
        tree,
    }
}

/// The media types of `image`'s manifest and layers, for the test's own sanity: the other
/// tool really wrote the format the test is about.
fn media_types(env: &Env, image: &str) -> (String, BTreeSet<String>) {
    let m = remote_manifest(env, image, &[]);
    let layers = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["mediaType"].as_str().expect("mediaType").to_string())
        .collect();
    (
        m["mediaType"].as_str().unwrap_or("(none)").to_string(),
        layers,
    )
}

/// Pull `f` into a fresh store and check what landed there.
fn pull_and_check(f: &Foreign, name: &str) {
    let env = Env::new();
    let mut pull = vec!["pull", "--progress", "plain", f.image.as_str()];
    if let Some(p) = f.platform {
        pull.extend(["--platform", p]);
    }
    let (out, _) = ok(&env, &pull);
    assert_eq!(printed_digest(&out), f.digest, "pull of {name}");
    env.fsck();
    assert_eq!(env.names(), vec![f.image.clone()]);
    assert_tree(&local_tree(&env, &f.image, name), &f.tree);
}

/// In a fresh store, build `FROM f` + `COPY`, push to `derived-<name>`, and check what the
/// registry got.
fn build_on_and_check(reg: &Registry, f: &Foreign, name: &str) {
    let env = Env::new();
    let note = format!("built by strata on {name}\n");
    let ctx = context(
        &env,
        "derived",
        &format!("FROM {}\nCOPY new.txt /new.txt\n", f.image),
        &[("new.txt", note.as_bytes())],
    );
    let derived = reg.image(&format!("derived-{name}:1"));
    let mut args = vec!["--push", "-t", derived.as_str()];
    if let Some(p) = f.platform {
        args.extend(["--platform", p]);
    }
    let (digest, _) = build(&env, &ctx, &args);
    env.fsck();
    assert_eq!(remote_digest(&env, &derived, &[]), digest, "{name}");
    let base_layers = layer_digests(&remote_manifest(&env, &f.pinned(), &[]));
    let manifest = remote_manifest(&env, &derived, &[]);
    let layers = layer_digests(&manifest);
    assert_eq!(layers.len(), base_layers.len() + 1, "{name}: {manifest}");
    assert_eq!(layers[..base_layers.len()], base_layers[..], "{name}");
    // One family of media types: an OCI manifest lists OCI layers (same bytes, same
    // digests), a Docker manifest Docker layers.
    let family = if manifest["mediaType"] == DOCKER_MANIFEST {
        "application/vnd.docker."
    } else {
        "application/vnd.oci."
    };
    for l in manifest["layers"].as_array().expect("layers") {
        let t = l["mediaType"].as_str().expect("mediaType");
        assert!(
            t.starts_with(family),
            "{name}: mixed media types: {manifest}"
        );
    }
    let expected = with(f.tree.clone(), "new.txt", file(&note, 0o644, 0, 0));
    assert_tree(&remote_tree(&env, &derived, name, &[]), &expected);
}

impl Foreign {
    /// The single-platform manifest this reference resolves to, by digest.
    fn pinned(&self) -> String {
        let (repo, _) = self.image.rsplit_once(':').expect("tagged");
        format!("{repo}@{}", self.digest)
    }
}

#[test]
fn pulls_and_builds_on_oci_images_skopeo_pushed() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let f = skopeo_pushed(&env, &reg, "oci", "gzip", &[]);
    let (manifest, layers) = media_types(&env, &f.image);
    assert_eq!(manifest, "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        layers,
        BTreeSet::from(["application/vnd.oci.image.layer.v1.tar+gzip".to_string()])
    );
    pull_and_check(&f, "oci");
    build_on_and_check(&reg, &f, "oci");
}

/// The sample as skopeo pushes it in Docker's v2s2 format.
fn skopeo_pushed_v2s2(env: &Env, reg: &Registry) -> Foreign {
    let f = skopeo_pushed(env, reg, "v2s2", "gzip", &["--format", "v2s2"]);
    let (manifest, layers) = media_types(env, &f.image);
    assert_eq!(manifest, DOCKER_MANIFEST);
    assert_eq!(
        layers,
        BTreeSet::from(["application/vnd.docker.image.rootfs.diff.tar.gzip".to_string()])
    );
    f
}

#[test]
fn pulls_docker_v2s2_images_skopeo_pushed() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let f = skopeo_pushed_v2s2(&env, &reg);
    pull_and_check(&f, "v2s2");
}

#[test]
fn builds_on_docker_v2s2_images_skopeo_pushed() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let f = skopeo_pushed_v2s2(&env, &reg);
    build_on_and_check(&reg, &f, "v2s2");
}

#[test]
fn pulls_and_builds_on_zstd_images_skopeo_pushed() {
    let env = Env::new();
    let reg = Registry::anonymous();
    // skopeo compresses only uncompressed layers: export those, let skopeo write zstd.
    let f = skopeo_pushed(
        &env,
        &reg,
        "zstd",
        "uncompressed",
        &["--dest-compress-format", "zstd", "--dest-compress"],
    );
    let (_, layers) = media_types(&env, &f.image);
    assert_eq!(
        layers,
        BTreeSet::from(["application/vnd.oci.image.layer.v1.tar+zstd".to_string()])
    );
    pull_and_check(&f, "zstd");
    build_on_and_check(&reg, &f, "zstd");
}

/// One image per platform built and pushed by strata, then gathered into `multi:1` by
/// buildah; returns the index reference and, per architecture, the manifest digest and tree.
fn buildah_index(env: &Env, reg: &Registry) -> (String, Vec<(&'static str, String, Tree)>) {
    let mut platforms = Vec::new();
    for arch in ["amd64", "arm64"] {
        let content = format!("built for {arch}\n");
        let ctx = context(
            env,
            &format!("ctx-{arch}"),
            "FROM scratch\nCOPY arch.txt /etc/arch.txt\n",
            &[("arch.txt", content.as_bytes())],
        );
        let image = reg.image(&format!("plat:{arch}"));
        let platform = format!("linux/{arch}");
        let (digest, _) = build(
            env,
            &ctx,
            &["--platform", &platform, "--push", "-t", &image],
        );
        let tree = env.unpack(&image, &format!("plat-{arch}"));
        assert_eq!(tree["etc/arch.txt"].0, Obj::File(content.into_bytes()));
        platforms.push((arch, digest, tree));
    }
    env.fsck();

    buildah_ok(env, &["manifest", "create", "list"]);
    for (arch, _, _) in &platforms {
        let image = format!("docker://{}", reg.image(&format!("plat:{arch}")));
        buildah_ok(
            env,
            &["manifest", "add", "--tls-verify=false", "list", &image],
        );
    }
    let multi = reg.image("multi:1");
    let dest = format!("docker://{multi}");
    buildah_ok(
        env,
        &[
            "manifest",
            "push",
            "--all",
            "--tls-verify=false",
            "list",
            &dest,
        ],
    );
    let index = remote_manifest(env, &multi, &[]);
    let entries = index["manifests"].as_array().expect("an index");
    assert_eq!(entries.len(), 2, "{index}");
    for (arch, digest, _) in &platforms {
        let entry = entries
            .iter()
            .find(|m| m["platform"]["architecture"] == *arch)
            .unwrap_or_else(|| panic!("no {arch} in {index}"));
        assert_eq!(
            entry["digest"],
            digest.as_str(),
            "buildah kept the {arch} manifest"
        );
    }
    (multi, platforms)
}

#[test]
fn pulls_and_builds_on_a_multi_platform_index_buildah_pushed() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let (multi, platforms) = buildah_index(&env, &reg);
    for (arch, digest, tree) in platforms {
        let f = Foreign {
            image: multi.clone(),
            platform: Some(if arch == "amd64" {
                "linux/amd64"
            } else {
                "linux/arm64"
            }),
            digest,
            tree,
        };
        pull_and_check(&f, &format!("multi-{arch}"));
        build_on_and_check(&reg, &f, &format!("multi-{arch}"));
    }
}

#[test]
fn pull_of_an_index_picks_the_host_platform_by_default() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let (multi, platforms) = buildah_index(&env, &reg);
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("the index has no image for {other}"),
    };
    let (_, want, tree) = platforms
        .into_iter()
        .find(|(arch, _, _)| *arch == host)
        .expect("host platform");
    let fresh = Env::new();
    let (out, _) = ok(&fresh, &["pull", &multi]);
    assert_eq!(printed_digest(&out), want);
    fresh.fsck();
    assert_tree(&fresh.unpack(&multi, "multi"), &tree);
}

// ---------------------------------------------------------------------------------------------
// Lazy registry bases
// ---------------------------------------------------------------------------------------------

/// `base:1` (the sample) pushed by one store; returns its manifest and unpacked tree.
fn push_base(reg: &Registry) -> (serde_json::Value, Tree) {
    let env = Env::new();
    let base = reg.image("base:1");
    build(&env, &fixture("sample"), &["--push", "-t", &base]);
    let tree = env.unpack(&base, "base");
    (remote_manifest(&env, &base, &[]), tree)
}

const APP_DOCKERFILE: &str = "WORKDIR /App\nCOPY x.txt .\n";

#[test]
fn a_registry_base_is_mounted_not_downloaded() {
    let reg = Registry::anonymous();
    let (base_manifest, base_tree) = push_base(&reg);
    let base_layers: BTreeSet<String> = layer_digests(&base_manifest).into_iter().collect();
    let base_config = base_manifest["config"]["digest"].as_str().expect("config");
    assert!(base_layers.len() >= 2, "{base_manifest}");

    let env = Env::new();
    let ctx = context(
        &env,
        "app",
        &format!("FROM {}\n{APP_DOCKERFILE}", reg.image("base:1")),
        &[("x.txt", b"x marks the spot\n")],
    );
    let app = reg.image("app:1");
    let before = reg.requests().len();
    let (digest, stderr) = build(&env, &ctx, &["--push", "-t", &app]);
    let reqs = requests_since(&reg, before);
    env.fsck();

    // The base's layers were never downloaded, only its manifest and config.
    let fetched: Vec<&Request> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.blob().is_some_and(|d| base_layers.contains(d)))
        .collect();
    assert!(fetched.is_empty(), "base layers downloaded: {fetched:#?}");
    assert!(
        reqs.iter()
            .any(|r| r.method == "GET" && r.blob() == Some(base_config)),
        "the base config was not read: {reqs:#?}"
    );
    // Each reached `app` by a cross-repository mount.
    for layer in &base_layers {
        assert!(
            reqs.iter().any(|r| r.method == "POST"
                && r.path.ends_with("/v2/app/blobs/uploads/")
                && r.param("mount").as_deref() == Some(layer)
                && r.param("from").as_deref() == Some("base")
                && r.status == 201),
            "{layer} not mounted from base: {reqs:#?}"
        );
    }
    let mounted = stderr
        .lines()
        .filter(|l| l.contains(" mounted from "))
        .count();
    assert_eq!(mounted, base_layers.len(), "{stderr}");

    // Only the new config and the new layer were uploaded.
    let manifest = remote_manifest(&env, &app, &[]);
    assert_eq!(remote_digest(&env, &app, &[]), digest);
    let layers = layer_digests(&manifest);
    assert_eq!(layers.len(), base_layers.len() + 1, "{manifest}");
    assert_eq!(
        layers[..base_layers.len()],
        layer_digests(&base_manifest)[..]
    );
    let config = manifest["config"]["digest"].as_str().expect("config");
    let new_layer = layers.last().expect("a new layer");
    assert_eq!(
        uploaded(&reqs),
        BTreeSet::from([config.to_string(), new_layer.clone()])
    );
    let sessions = reqs
        .iter()
        .filter(|r| r.method == "POST" && r.is_upload() && r.param("mount").is_none())
        .count();
    assert_eq!(sessions, 2, "upload sessions: {reqs:#?}");

    let expected = with(
        base_tree,
        "App/x.txt",
        file("x marks the spot\n", 0o644, 0, 0),
    );
    assert_tree(&remote_tree(&env, &app, "app", &[]), &expected);
}

#[test]
fn export_fetches_the_layers_of_a_lazy_registry_base() {
    let reg = Registry::anonymous();
    let (_, base_tree) = push_base(&reg);
    let env = Env::new();
    let ctx = context(
        &env,
        "app",
        &format!("FROM {}\n{APP_DOCKERFILE}", reg.image("base:1")),
        &[("x.txt", b"x\n")],
    );
    build(&env, &ctx, &["-t", "app:1"]);
    let expected = with(base_tree, "App/x.txt", file("x\n", 0o644, 0, 0));
    assert_tree(&env.unpack("app:1", "app"), &expected);
    env.fsck();
}

#[test]
fn a_pulled_docker_image_exports_to_a_readable_oci_layout() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let f = skopeo_pushed_v2s2(&env, &reg);
    let fresh = Env::new();
    ok(&fresh, &["pull", &f.image]);
    let layout = fresh.path("layout");
    let oci = format!("oci:{}:s", layout.display());
    ok(&fresh, &["export", &f.image, "--output", &oci]);
    validate_layout(&layout);
    assert_tree(&unpack_gzip(&fresh, &oci, "v2s2", &[]), &f.tree);
}
