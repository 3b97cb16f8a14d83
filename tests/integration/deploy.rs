//! The deploy hand-off, Flux side. Artifacts go to the real registry and come back through
//! skopeo (`inspect --raw`, `copy` to an OCI layout): media types, annotations, the tar's
//! content, the environment tag, and the same digest for the same input; `build --push
//! --deploy-flux` chains it. Direct apply is in `deploy_apply`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::common::*;
use crate::push_pull::{build, fails, skopeo_ok, strata};
use crate::registry::Registry;

const SCOPES: &str = r#"["altinn:serviceowner/instances.read","altinn:appdeploy"]"#;
const FLUX_CONFIG: &str = "application/vnd.cncf.flux.config.v1+json";
const FLUX_CONTENT: &str = "application/vnd.cncf.flux.content.v1.tar+gzip";

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/deploy")
}

/// Build the fixture app with the maskinporten label and push it as `ttd/app:v1`; returns
/// (reference, digest).
pub(crate) fn push_app(env: &Env, reg: &Registry) -> (String, String) {
    let image = reg.image("ttd/app:v1");
    let label = format!("studio.altinn.maskinporten.scopes={SCOPES}");
    let (digest, _) = build(
        env,
        &fixtures().join("app"),
        &["-t", &image, "--push", "--label", &label],
    );
    (image, digest)
}

fn skopeo_raw(env: &Env, image: &str) -> (serde_json::Value, String) {
    let raw = skopeo_ok(
        env,
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    );
    let digest = format!("sha256:{}", sha256_hex(raw.as_bytes()));
    (serde_json::from_str(&raw).expect("raw manifest"), digest)
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// skopeo copies `image` to an OCI layout; returns the files of its one layer (path → bytes,
/// mode) after checking the layout's manifest is the registry's.
fn artifact_files(env: &Env, image: &str, name: &str) -> Vec<(String, Vec<u8>, u32)> {
    let layout = env.path(name);
    let dest = format!("oci:{}:a", layout.display());
    skopeo_ok(
        env,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &dest,
        ],
    );
    validate_artifact(&layout);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(mdigest)).unwrap();
    assert_eq!(manifest["config"]["mediaType"], FLUX_CONFIG);
    let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&layer[..]));
    let mut out = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mode = e.header().mode().unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((path, data, mode));
    }
    out
}

/// Check an artifact's OCI layout with the image-spec schemas (tests/validate_oci.py's
/// loader): index and manifest against their schemas, every blob against its descriptor. The
/// config is Flux's, not an image config, so the image-config schema does not apply.
fn validate_artifact(layout: &Path) {
    let script = r#"
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[3])
import validate_oci as v
layout, schemas = sys.argv[1], sys.argv[2]
store, by_file = v.load_schemas(schemas)
v.LocalResolver.by_file = by_file
def check(doc, name):
    r = v.LocalResolver(base_uri="file://" + os.path.join(schemas, name), referrer=by_file[name], store=store)
    errs = [e.message for e in v.jsonschema.Draft4Validator(by_file[name], resolver=r).iter_errors(doc)]
    assert not errs, errs
def blob(d):
    data = open(os.path.join(layout, "blobs", "sha256", d["digest"][7:]), "rb").read()
    assert hashlib.sha256(data).hexdigest() == d["digest"][7:] and len(data) == d["size"], d
    return data
index = json.load(open(os.path.join(layout, "index.json")))
check(index, "image-index-schema.json")
for m in index["manifests"]:
    doc = json.loads(blob(m))
    check(doc, "image-manifest-schema.json")
    for d in [doc["config"]] + doc["layers"]:
        blob(d)
print("artifact valid")
"#;
    let schemas = Path::new("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema");
    assert!(
        schemas.is_dir(),
        "OCI schemas missing: apt-get install golang-github-opencontainers-image-spec-dev"
    );
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let out = run_ok(
        std::process::Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(layout)
            .arg(schemas)
            .arg(tests),
    );
    assert!(out.contains("artifact valid"), "{out}");
}

fn flux_args<'a>(artifact: &'a str, image: &'a str, values: &'a str) -> Vec<&'a str> {
    vec![
        "deploy",
        "flux",
        artifact,
        "--values",
        values,
        "--release",
        "ttd-app",
        "--namespace",
        "default",
        "--chart",
        "deployment",
        "--chart-version",
        "3.1.0",
        "--chart-source",
        "HelmRepository/altinn-charts.flux-system",
        "--image",
        image,
        "--env",
        "ASPNETCORE_ENVIRONMENT=Staging",
        "--env",
        "GeneralSettings__HostName=ttd.apps.tt02.altinn.no",
        "--deployment-id",
        "4711",
        "--set-from-label",
        "maskinporten.scopes=studio.altinn.maskinporten.scopes",
        "--set",
        "ingress.route=/ttd/app",
        "--set",
        "autoscaling.replicas.max=4",
        "--source",
        "https://altinn.studio/repos/ttd/app/commit/0123abc",
        "--revision",
        "0123abc",
        "--tag",
        "at22",
    ]
}

#[test]
fn flux_helmrelease_artifact_round_trips_through_skopeo() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let (image, image_digest) = push_app(&env, &reg);
    let values = fixtures().join("app/deployment/values.yaml");
    let values = values.to_str().unwrap();
    let artifact_ref = reg.image("configs/ttd-app:at22-v1");
    let artifact = format!("oci://{artifact_ref}");
    let before = reg.requests().len();
    let out = strata(&env)
        .args(flux_args(&artifact, &image, values))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed = String::from_utf8(out.stdout).unwrap().trim().to_string();

    // Reading the image cost its manifest and config, never a layer.
    let app_manifest = crate::push_pull::remote_manifest(&env, &image, &[]);
    let layers = crate::push_pull::layer_digests(&app_manifest);
    let reqs: Vec<_> = reg.requests().split_off(before);
    let fetched: Vec<&str> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/ttd/app/"))
        .filter_map(|r| r.blob())
        .collect();
    assert_eq!(
        fetched,
        vec![app_manifest["config"]["digest"].as_str().unwrap()],
        "only the config blob is read"
    );
    assert!(layers.iter().all(|l| !fetched.contains(&l.as_str())));

    // The manifest, as skopeo reads it, under both tags.
    let (m, digest) = skopeo_raw(&env, &artifact_ref);
    assert_eq!(digest, printed);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["config"]["mediaType"], FLUX_CONFIG);
    assert_eq!(m["layers"].as_array().unwrap().len(), 1);
    assert_eq!(m["layers"][0]["mediaType"], FLUX_CONTENT);
    let a = &m["annotations"];
    assert_eq!(
        a["org.opencontainers.image.created"],
        "2023-11-14T22:13:20Z"
    );
    assert_eq!(
        a["org.opencontainers.image.source"],
        "https://altinn.studio/repos/ttd/app/commit/0123abc"
    );
    assert_eq!(a["org.opencontainers.image.revision"], "0123abc");
    let (_, env_digest) = skopeo_raw(&env, &reg.image("configs/ttd-app:at22"));
    assert_eq!(env_digest, printed, "the env tag points at the artifact");
    assert!(stderr.contains("at22-v1, at22"), "{stderr}");

    // The content: one helmrelease.yaml with the hoisted values and every override.
    let files = artifact_files(&env, &artifact_ref, "copy");
    assert_eq!(
        files.len(),
        1,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let (path, yaml, mode) = &files[0];
    assert_eq!((path.as_str(), *mode), ("helmrelease.yaml", 0o644));
    let hr: serde_json::Value = serde_saphyr::from_slice(yaml).expect("helmrelease yaml");
    assert_eq!(hr["apiVersion"], "helm.toolkit.fluxcd.io/v2");
    assert_eq!(hr["kind"], "HelmRelease");
    assert_eq!(hr["metadata"]["name"], "ttd-app");
    assert_eq!(hr["metadata"]["namespace"], "default");
    let chart = &hr["spec"]["chart"]["spec"];
    assert_eq!(chart["chart"], "deployment");
    assert_eq!(chart["version"], "3.1.0");
    assert_eq!(
        chart["sourceRef"],
        serde_json::json!({"kind": "HelmRepository", "name": "altinn-charts", "namespace": "flux-system"})
    );
    let v = &hr["spec"]["values"];
    assert!(v.get("deployment").is_none(), "deployment: is hoisted");
    assert_eq!(v["replicaCount"], 2);
    assert_eq!(v["autoscaling"]["replicas"]["max"], 4);
    assert_eq!(v["autoscaling"]["replicas"]["min"], 2);
    assert_eq!(v["image"]["repository"], reg.image("ttd/app"));
    assert_eq!(v["image"]["tag"], format!("v1@{image_digest}"));
    assert_eq!(v["image"]["pullSecrets"][0]["name"], "acr-secret");
    assert_eq!(
        v["env"],
        serde_json::json!([
            {"name": "ASPNETCORE_ENVIRONMENT", "value": "Staging"},
            {"name": "GeneralSettings__HostName", "value": "ttd.apps.tt02.altinn.no"},
        ])
    );
    assert_eq!(v["podAnnotations"]["altinn.studio/deployment-id"], "4711");
    assert_eq!(
        v["maskinporten"]["scopes"],
        serde_json::from_str::<serde_json::Value>(SCOPES).unwrap()
    );
    assert_eq!(v["ingress"]["route"], "/ttd/app");
    assert_eq!(
        v["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "keys"
    );

    // Same input (another home, another tag) → same artifact digest; another revision → not.
    let env2 = Env::new();
    let again = format!("oci://{}", reg.image("configs/ttd-app:at22-v1-again"));
    let out2 = strata(&env2)
        .args(flux_args(&again, &image, values))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    assert_eq!(String::from_utf8(out2.stdout).unwrap().trim(), printed);
    let mut other = flux_args(&again, &image, values);
    let rev = other.iter().position(|a| *a == "0123abc").unwrap();
    other[rev] = "4567def";
    let out3 = strata(&env2)
        .args(other)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(out3.status.success());
    assert_ne!(String::from_utf8(out3.stdout).unwrap().trim(), printed);
}

/// Copy `src` to `dst` with different mtimes (and the given mode bits kept).
fn copy_tree(src: &Path, dst: &Path, mtime: i64) {
    for e in walkdir::WalkDir::new(src).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(src).unwrap();
        let to = dst.join(rel);
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime as u64);
        std::fs::File::options()
            .read(true)
            .open(&to)
            .and_then(|f| f.set_modified(t))
            .ok();
    }
}

#[test]
fn flux_path_artifact_packages_a_directory_reproducibly() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    copy_tree(&fixtures().join("manifests"), &a, 1_000);
    copy_tree(&fixtures().join("manifests"), &b, 2_000_000);
    std::fs::create_dir_all(a.join(".git")).unwrap();
    std::fs::write(a.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    let push = |dir: &Path, tag: &str| {
        let artifact = format!("oci://{}", reg.image(&format!("configs/manifests:{tag}")));
        let out = strata(&env)
            .args([
                "deploy",
                "flux",
                &artifact,
                "--path",
                dir.to_str().unwrap(),
                "--source",
                "https://altinn.studio/repos/ttd/app",
                "--revision",
                "main@sha1:0123abc",
                "--tag",
                "tt02",
            ])
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let da = push(&a, "tt02-1");
    let db = push(&b, "tt02-2");
    assert_eq!(da, db, "mtimes and .git do not change the artifact");
    let (_, tagged) = skopeo_raw(&env, &reg.image("configs/manifests:tt02"));
    assert_eq!(tagged, db);
    let files = artifact_files(&env, &reg.image("configs/manifests:tt02-1"), "dir");
    let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names, ["deployment.yaml", "service.yaml"]);
    let original = std::fs::read(fixtures().join("manifests/service.yaml")).unwrap();
    assert_eq!(files[1].1, original);
}

#[test]
fn flux_usage_errors_exit_2() {
    let env = Env::new();
    let err = fails(
        &env,
        &[
            "deploy",
            "flux",
            "127.0.0.1:1/configs/a:b",
            "--path",
            ".",
            "--source",
            "s",
            "--revision",
            "r",
        ],
        2,
    );
    assert!(err.contains("oci://"), "{err}");
    let err = fails(
        &env,
        &[
            "deploy",
            "flux",
            "oci://127.0.0.1:1/configs/a:b",
            "--release",
            "a",
            "--source",
            "s",
            "--revision",
            "r",
        ],
        2,
    );
    assert!(err.contains("--chart is required"), "{err}");
    let err = fails(
        &env,
        &[
            "deploy",
            "flux",
            "oci://127.0.0.1:1/configs/a:b",
            "--path",
            ".",
            "--revision",
            "r",
        ],
        2,
    );
    assert!(err.contains("--source"), "{err}");
    let err = fails(
        &env,
        &[
            "deploy",
            "flux",
            "oci://127.0.0.1:1/configs/a:b",
            "--path",
            ".",
            "--image",
            "127.0.0.1:1/a:b",
            "--source",
            "s",
            "--revision",
            "r",
        ],
        2,
    );
    assert!(err.contains("--image"), "{err}");
}
#[test]
fn build_push_deploy_flux_chains_in_one_command() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let image = reg.image("ttd/app:v2");
    let artifact = format!("oci://{}", reg.image("configs/ttd-app:at22-v2"));
    let values = fixtures().join("app/deployment/values.yaml");
    let label = format!("studio.altinn.maskinporten.scopes={SCOPES}");
    let (code, stdout, stderr) = crate::deploy_apply::run(strata(&env).args([
        "build",
        "--progress",
        "plain",
        "-t",
        &image,
        "--push",
        "--source-date-epoch",
        "1700000000",
        "--label",
        &label,
        "--deploy-flux",
        &artifact,
        "--deploy-tag",
        "at22",
        "--values",
        values.to_str().unwrap(),
        "--release",
        "ttd-app",
        "--chart",
        "deployment",
        "--chart-version",
        "3.1.0",
        "--set-from-label",
        "maskinporten.scopes=studio.altinn.maskinporten.scopes",
        "--source",
        "https://altinn.studio/repos/ttd/app/commit/89ab",
        "--revision",
        "89ab",
        fixtures().join("app").to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{stderr}");
    let image_digest = crate::push_pull::printed_digest(&stdout);
    let (m, artifact_digest) = skopeo_raw(&env, &reg.image("configs/ttd-app:at22"));
    assert_eq!(
        m["annotations"]["org.opencontainers.image.created"], "2023-11-14T22:13:20Z",
        "the build's --source-date-epoch dates the artifact"
    );
    assert!(
        stderr.contains(&format!("{}@{image_digest}", reg.image("ttd/app")))
            && stderr.contains(&artifact_digest)
            && stderr.contains("at22-v2, at22"),
        "the result names image digest, artifact digest and tags:\n{stderr}"
    );
    let files = artifact_files(&env, &reg.image("configs/ttd-app:at22"), "chained");
    let hr: serde_json::Value = serde_saphyr::from_slice(&files[0].1).unwrap();
    let v = &hr["spec"]["values"];
    assert_eq!(v["image"]["tag"], format!("v2@{image_digest}"));
    assert_eq!(v["maskinporten"]["scopes"][1], "altinn:appdeploy");
    assert_eq!(
        hr["spec"]["chart"]["spec"]["sourceRef"]["name"],
        "deployment"
    );

    let err = fails(
        &env,
        &[
            "build",
            "--deploy-flux",
            &artifact,
            "-t",
            &image,
            fixtures().join("app").to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("--deploy-flux needs --push"), "{err}");
}
