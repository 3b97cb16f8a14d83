//! `strata deploy apply` against the in-process API server of `deploy_kube` (no Kubernetes
//! can run here): the recorded requests (content type, field manager, force, digest-pinned
//! images, token), every rollout failure mode ending in exit 1 with pod, container and reason,
//! kubeconfig users (token, contexts, exec plugin, client certificate over TLS), and
//! `--dry-run`/`--generate` output that kubectl accepts.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::deploy::{fixtures, push_app};
use crate::deploy_kube::{FakeKube, Pki, Scenario};
use crate::push_pull::strata;
use crate::registry::Registry;

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

pub(crate) fn run(c: &mut std::process::Command) -> (i32, String, String) {
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
fn err_image_pull_fails_the_rollout() {
    let err = failing_rollout(Scenario::ErrImagePull, &[]);
    assert!(
        err.contains(
            "pod ttd-app-rev1-p0 container app: ErrImagePull: failed to pull and unpack image"
        ),
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
    let patches = || {
        kube.requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count()
    };
    let before = patches();
    let (code, _, stderr) = run(kstrata(&env).args(apply_args(&no_cert, &app, &busybox)));
    assert_eq!(
        patches(),
        before,
        "nothing is applied without a client certificate"
    );
    assert_eq!(code, 1, "{stderr}");
    // With TLS 1.3 the server's refusal (a certificate_required alert) arrives after the
    // client has finished its side of the handshake: depending on timing, the client reports
    // the alert, or only the connection the server dropped. Either way nothing was applied.
    assert!(
        stderr.contains("find the API resource of apps/v1 Deployment failed")
            && (stderr.contains("CertificateRequired") || stderr.contains("connection")),
        "{stderr}"
    );
}
