//! The deploy hand-off. Flux artifacts go to the real registry and come back through skopeo
//! (`inspect --raw`, `copy` to an OCI layout): media types, annotations, the tar's content,
//! the environment tag, and the same digest for the same input. Direct apply runs against
//! the in-process API server of `deploy_kube` (no Kubernetes can run here), whose recorded
//! requests are checked, and `--dry-run` output goes through kubectl.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::common::*;
use crate::deploy_kube::{FakeKube, Pki, Scenario};
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

// ---------------------------------------------------------------------------------------------
// Direct apply
// ---------------------------------------------------------------------------------------------

const BUSYBOX: &str = "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The fixture manifests directory.
static MANIFESTS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| fixtures().join("manifests").display().to_string());

/// A kubeconfig fixture with its placeholders filled in, written to the test's dir.
fn kubeconfig(env: &Env, fixture: &str, fill: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(fixtures().join("kubeconfig").join(fixture)).unwrap();
    for (k, v) in fill {
        text = text.replace(k, v);
    }
    let path = env.path(&format!("kubeconfig-{fixture}"));
    std::fs::write(&path, text).unwrap();
    path
}

/// strata with no kubeconfig but the one given (HOME has none, KUBECONFIG unset).
fn kstrata(env: &Env) -> std::process::Command {
    let mut c = strata(env);
    c.env("HOME", env.path("home-dir"))
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST");
    c
}

fn run(c: &mut std::process::Command) -> (i32, String, String) {
    let out = c.output().expect("run strata");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn apply_args<'a>(kubeconfig: &'a Path, app: &'a str, busybox: &'a str) -> Vec<&'a str> {
    vec![
        "deploy",
        "apply",
        "-f",
        MANIFESTS.as_str(),
        "--image",
        app,
        "--image",
        busybox,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--poll-interval",
        "20ms",
    ]
}

#[test]
fn apply_pins_images_applies_server_side_and_waits_for_the_rollout() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let (image, digest) = push_app(&env, &reg);
    let kube = FakeKube::start_with(Scenario::Healthy, Some("t0ken-for-tests"));
    let kc = kubeconfig(&env, "token.yaml", &[("@SERVER@", &kube.url())]);
    let app = format!("app={image}");
    let busybox = format!("busybox={BUSYBOX}");
    let mut args = apply_args(&kc, &app, &busybox);
    args.push("--force-conflicts");
    let (code, stdout, stderr) = run(kstrata(&env).args(&args));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("ttd/deployment/ttd-app serverside-applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ttd/service/ttd-app serverside-applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ttd/configmap/ttd-app-settings serverside-applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ttd/deployment/ttd-app successfully rolled out"),
        "{stdout}"
    );
    assert!(stderr.contains("0/2 ready"), "{stderr}");
    assert!(stderr.contains("1/2 ready"), "{stderr}");
    assert!(stderr.contains("2/2 ready"), "{stderr}");

    let reqs = kube.requests();
    assert!(
        reqs.iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer t0ken-for-tests")),
        "every request carries the kubeconfig's token"
    );
    let patches: Vec<_> = reqs.iter().filter(|r| r.method == "PATCH").collect();
    let paths: Vec<&str> = patches.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/apis/apps/v1/namespaces/ttd/deployments/ttd-app",
            "/api/v1/namespaces/ttd/services/ttd-app",
            "/api/v1/namespaces/ttd/configmaps/ttd-app-settings",
        ]
    );
    for p in &patches {
        assert_eq!(
            p.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(p.param("fieldManager").as_deref(), Some("strata"));
        assert_eq!(p.param("force").as_deref(), Some("true"));
    }
    let body: serde_json::Value = serde_saphyr::from_slice(&patches[0].body).unwrap();
    let containers = &body["spec"]["template"]["spec"]["containers"];
    assert_eq!(
        containers[0]["image"],
        format!("{}@{digest}", reg.image("ttd/app"))
    );
    assert_eq!(containers[1]["image"], BUSYBOX);
    assert_eq!(body["metadata"]["namespace"], "ttd");
    let stored = kube
        .object("/apis/apps/v1/namespaces/ttd/deployments", "ttd-app")
        .unwrap();
    assert_eq!(stored["spec"], body["spec"]);
    for (what, path) in [
        (
            "deployment",
            "/apis/apps/v1/namespaces/ttd/deployments/ttd-app",
        ),
        ("replicasets", "/apis/apps/v1/namespaces/ttd/replicasets"),
        ("pods", "/api/v1/namespaces/ttd/pods"),
    ] {
        assert!(
            reqs.iter().any(|r| r.method == "GET" && r.path == path),
            "no GET of {what}"
        );
    }

    // Without --force-conflicts no force; --context picks the other context's namespace;
    // --wait=false returns after applying.
    let mut args = apply_args(&kc, &app, &busybox);
    args.extend(["--context", "staging", "--wait=false"]);
    let (code, stdout, stderr) = run(kstrata(&env).args(&args));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("rolled out"), "{stdout}");
    let reqs = kube.requests();
    let last = reqs.iter().rev().find(|r| r.method == "PATCH").unwrap();
    assert_eq!(
        last.path,
        "/api/v1/namespaces/staging/configmaps/ttd-app-settings"
    );
    assert_eq!(last.param("force"), None);
}

fn failing_rollout(scenario: Scenario, extra: &[&str]) -> String {
    let env = Env::new();
    let kube = FakeKube::start(scenario);
    let kc = kubeconfig(&env, "token.yaml", &[("@SERVER@", &kube.url())]);
    let app = format!(
        "app=127.0.0.1:5000/ttd/app@{}",
        &BUSYBOX[BUSYBOX.len() - 71..]
    );
    let busybox = format!("busybox={BUSYBOX}");
    let mut args = apply_args(&kc, &app, &busybox);
    if extra.is_empty() {
        args.extend(["--timeout", "30s"]);
    }
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(kstrata(&env).args(&args));
    assert_eq!(code, 1, "a failed rollout must exit 1:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("rolled out"), "{stdout}");
    assert!(
        stderr.contains("rollout of ttd/deployment/ttd-app failed"),
        "{stderr}"
    );
    stderr
}

#[test]
fn crash_looping_pods_fail_the_rollout_naming_pod_container_and_reason() {
    let err = failing_rollout(Scenario::CrashLoop, &[]);
    // Pods are judged only once the controller observed the new generation (before that,
    // the revision names the previous ReplicaSet).
    assert!(
        err.contains("0/2 ready, waiting for the controller to observe the new generation"),
        "{err}"
    );
    assert!(
        err.contains(
            "pod ttd-app-rev1-p0 container app: CrashLoopBackOff (last termination: Error, exit code 1)"
        ),
        "{err}"
    );
}

#[test]
fn image_pull_failures_fail_the_rollout() {
    let err = failing_rollout(Scenario::ImagePull, &[]);
    assert!(
        err.contains("pod ttd-app-rev1-p0 container app: ImagePullBackOff: Back-off pulling image"),
        "{err}"
    );
}

#[test]
fn progress_deadline_exceeded_fails_the_rollout() {
    let err = failing_rollout(Scenario::Deadline, &[]);
    assert!(
        err.contains(
            "ProgressDeadlineExceeded: ReplicaSet \"ttd-app-rev1\" has timed out progressing."
        ),
        "{err}"
    );
}

#[test]
fn a_rollout_that_never_finishes_times_out() {
    let err = failing_rollout(Scenario::Stuck, &["--timeout", "1s"]);
    assert!(
        err.contains("timed out after 1s with 0/2 replicas ready"),
        "{err}"
    );
}

/// kubectl's client-side dry run of `yaml` against `kube` (kubectl needs discovery, which the
/// fake server answers); returns kubectl's stdout.
fn kubectl_accepts(env: &Env, kube: &FakeKube, yaml: &str) -> String {
    let kc = kubeconfig(env, "token.yaml", &[("@SERVER@", &kube.url())]);
    let mut child = std::process::Command::new(tool("kubectl", "kubernetes-client"))
        .args(["apply", "--dry-run=client", "--validate=false", "-f", "-"])
        .env("KUBECONFIG", &kc)
        .env("HOME", env.path("kubectl-home"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl refused:\n{yaml}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn dry_run_prints_resolved_yaml_that_kubectl_accepts() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let (image, digest) = push_app(&env, &reg);
    let app = format!("app={image}");
    let busybox = format!("busybox={BUSYBOX}");
    let manifests = fixtures().join("manifests");
    let (code, yaml, stderr) = run(kstrata(&env).args([
        "deploy",
        "apply",
        "-f",
        manifests.join("deployment.yaml").to_str().unwrap(),
        "-f",
        manifests.join("service.yaml").to_str().unwrap(),
        "--image",
        &app,
        "--image",
        &busybox,
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{stderr}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).expect("valid YAML");
    assert_eq!(docs.len(), 3);
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("{}@{digest}", reg.image("ttd/app"))
    );
    assert!(!yaml.contains("strata://"), "{yaml}");
    let kube = FakeKube::start(Scenario::Healthy);
    let out = kubectl_accepts(&env, &kube, &yaml);
    assert!(
        out.contains("deployment.apps/ttd-app created (dry run)"),
        "{out}"
    );
    assert!(
        out.contains("configmap/ttd-app-settings created (dry run)"),
        "{out}"
    );
    assert!(
        kube.requests().iter().all(|r| r.method == "GET"),
        "a dry run changes nothing"
    );

    // Manifests from stdin, a strata:// placeholder naming the registry reference itself.
    let mut child = kstrata(&env)
        .args(["deploy", "apply", "-f", "-", "--dry-run"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    write!(
        child.stdin.take().unwrap(),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: c\n    image: strata://{image}\n"
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("image: {}@{digest}", reg.image("ttd/app"))),
        "{text}"
    );
}

#[test]
fn generate_makes_a_deployment_and_service_from_the_image_config() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let (image, digest) = push_app(&env, &reg);
    let app = format!("ttd-app={image}");
    let (code, yaml, stderr) = run(kstrata(&env).args([
        "deploy",
        "apply",
        "--generate",
        "--image",
        &app,
        "--namespace",
        "ttd",
        "--memory-limit",
        "1Gi",
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{stderr}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).expect("valid YAML");
    assert_eq!(docs.len(), 2);
    let (d, s) = (&docs[0], &docs[1]);
    assert_eq!(
        (d["kind"].as_str(), s["kind"].as_str()),
        (Some("Deployment"), Some("Service"))
    );
    assert_eq!(d["metadata"]["namespace"], "ttd");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 1000);
    assert_eq!(pod["securityContext"]["runAsGroup"], 3000);
    let c = &pod["containers"][0];
    assert_eq!(c["image"], format!("{}@{digest}", reg.image("ttd/app")));
    assert_eq!(c["ports"][0]["containerPort"], 5005);
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert_eq!(c["resources"]["requests"]["memory"], "256Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(s["spec"]["ports"][0]["port"], 5005);
    let kube = FakeKube::start(Scenario::Healthy);
    let out = kubectl_accepts(&env, &kube, &yaml);
    assert!(out.contains("service/ttd-app created (dry run)"), "{out}");
}

#[test]
fn exec_credential_plugin_supplies_the_token() {
    let env = Env::new();
    let kube = FakeKube::start_with(Scenario::Healthy, Some("exec-t0ken"));
    let mark = env.path("plugin-ran");
    let plugin = fixtures().join("kubeconfig/exec-credential.sh");
    let kc = kubeconfig(
        &env,
        "exec.yaml",
        &[
            ("@SERVER@", &kube.url()),
            ("@PLUGIN@", plugin.to_str().unwrap()),
            ("@MARK@", mark.to_str().unwrap()),
        ],
    );
    let app = format!(
        "app=127.0.0.1:5000/ttd/app@{}",
        &BUSYBOX[BUSYBOX.len() - 71..]
    );
    let busybox = format!("busybox={BUSYBOX}");
    let mut args = apply_args(&kc, &app, &busybox);
    args.push("--wait=false");
    // The kubeconfig found through $KUBECONFIG this time.
    let pos = args.iter().position(|a| *a == "--kubeconfig").unwrap();
    args.drain(pos..pos + 2);
    let (code, stdout, stderr) = run(kstrata(&env).args(&args).env("KUBECONFIG", &kc));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(std::fs::read_to_string(&mark).unwrap().contains("ran"));
    let reqs = kube.requests();
    assert!(reqs.iter().any(|r| r.method == "PATCH"));
    assert!(
        reqs.iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer exec-t0ken"))
    );
}

#[test]
fn a_wrong_token_is_reported_not_retried_forever() {
    let env = Env::new();
    let kube = FakeKube::start_with(Scenario::Healthy, Some("another-token"));
    let kc = kubeconfig(&env, "token.yaml", &[("@SERVER@", &kube.url())]);
    let app = format!(
        "app=127.0.0.1:5000/ttd/app@{}",
        &BUSYBOX[BUSYBOX.len() - 71..]
    );
    let busybox = format!("busybox={BUSYBOX}");
    let (code, _, stderr) = run(kstrata(&env).args(apply_args(&kc, &app, &busybox)));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Unauthorized"), "{stderr}");
    assert!(
        !stderr.contains("t0ken-for-tests"),
        "credentials never reach errors: {stderr}"
    );
}

#[test]
fn build_push_deploy_flux_chains_in_one_command() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let image = reg.image("ttd/app:v2");
    let artifact = format!("oci://{}", reg.image("configs/ttd-app:at22-v2"));
    let values = fixtures().join("app/deployment/values.yaml");
    let label = format!("studio.altinn.maskinporten.scopes={SCOPES}");
    let (code, stdout, stderr) = run(strata(&env)
        .args([
            "build",
            "--progress",
            "plain",
            "-t",
            &image,
            "--push",
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
        ])
        .env("SOURCE_DATE_EPOCH", "1700000000"));
    assert_eq!(code, 0, "{stderr}");
    let image_digest = crate::push_pull::printed_digest(&stdout);
    let (_, artifact_digest) = skopeo_raw(&env, &reg.image("configs/ttd-app:at22"));
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

#[test]
fn client_certificate_users_talk_tls_to_the_cluster() {
    use base64::Engine as _;
    let env = Env::new();
    let pki = Pki::new();
    let kube = FakeKube::start_tls(Scenario::Healthy, &pki);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kc = kubeconfig(
        &env,
        "client-cert.yaml",
        &[
            ("@SERVER@", &kube.url()),
            ("@CA@", &b64(&pki.ca_pem)),
            ("@CERT@", &b64(&pki.client_pem)),
            ("@KEY@", &b64(&pki.client_key_pem)),
        ],
    );
    let app = format!(
        "app=127.0.0.1:5000/ttd/app@{}",
        &BUSYBOX[BUSYBOX.len() - 71..]
    );
    let busybox = format!("busybox={BUSYBOX}");
    let mut args = apply_args(&kc, &app, &busybox);
    args.extend(["--timeout", "30s"]);
    let (code, stdout, stderr) = run(kstrata(&env).args(&args));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("default/deployment/ttd-app successfully rolled out"),
        "{stdout}"
    );
    assert!(kube.requests().iter().any(|r| r.method == "PATCH"));

    // The same cluster without a client certificate: the handshake is refused, and said so.
    let no_cert = kubeconfig(
        &env,
        "client-cert.yaml",
        &[("@SERVER@", &kube.url()), ("@CA@", &b64(&pki.ca_pem))],
    );
    let text = std::fs::read_to_string(&no_cert)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("client-"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n      token: none\n";
    std::fs::write(&no_cert, text).unwrap();
    let (code, _, stderr) = run(kstrata(&env).args(apply_args(&no_cert, &app, &busybox)));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("find the API resource of apps/v1 Deployment failed")
            && stderr.contains("CertificateRequired"),
        "{stderr}"
    );
}
