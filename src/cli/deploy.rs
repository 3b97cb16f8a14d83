//! `strata deploy flux` and `strata deploy apply`: the hand-off to Kubernetes. Flag names
//! follow flux (`push artifact`, `create helmrelease`) and kubectl (`apply`, `rollout
//! status`), so pipelines map one to one. The environment (KUBECONFIG, HOME,
//! SOURCE_DATE_EPOCH) and the clock are read here and passed in.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::UsageError;
use super::registry::{RegistryArgs, runtime};
use crate::deploy::{
    self, AppOverrides, ArtifactFiles, ArtifactMeta, FluxArtifact, HelmRelease, ImageInfo,
    PushedArtifact, RolloutState, Values,
};
use crate::media::Platform;
use crate::registry::{Client, Reference};

/// `strata deploy`
#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(subcommand)]
    command: DeployCommand,
}

#[derive(Subcommand, Debug)]
enum DeployCommand {
    /// Push a Flux OCI artifact (a HelmRelease for the app, or a manifests directory) and
    /// tag it with the environment (`flux push artifact` + `flux tag artifact`).
    Flux(Box<FluxArgs>),
    /// Pin images by digest in manifests (or generate them) and server-side apply them,
    /// then wait for the rollout.
    Apply(Box<ApplyArgs>),
}

pub(super) fn run(a: DeployArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        DeployCommand::Flux(f) => flux(*f),
        DeployCommand::Apply(a) => apply(*a),
    }
}

/// What goes into a Flux artifact; shared by `deploy flux` and `build --deploy-flux`.
#[derive(Args, Debug, Clone, Default)]
pub struct FluxOptions {
    /// Package this manifests directory as is (`flux push artifact --path`), instead of a
    /// HelmRelease.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["values", "release", "chart"])]
    path: Option<PathBuf>,
    /// The app's values file (`deployment/values.yaml`; a top-level `deployment:` key is
    /// hoisted).
    #[arg(long, value_name = "FILE")]
    values: Option<PathBuf>,
    /// Set a value by path (`image.pullPolicy=Always`, `a\.b.c[0]=x`); repeatable, applied last.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    sets: Vec<String>,
    /// Set an environment variable in the values' `env` list (`NAME=VALUE`); repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Pod annotation `altinn.studio/deployment-id` (under `podAnnotations`).
    #[arg(long = "deployment-id", value_name = "ID")]
    deployment_id: Option<String>,
    /// Copy an image label into the values (`maskinporten.scopes=studio.altinn.maskinporten.scopes`);
    /// reads the image config only.
    #[arg(long = "set-from-label", value_name = "KEY.PATH=LABEL")]
    from_labels: Vec<String>,
    /// HelmRelease name (and Helm release name).
    #[arg(long, value_name = "NAME")]
    release: Option<String>,
    /// HelmRelease namespace.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Chart name.
    #[arg(long, value_name = "NAME")]
    chart: Option<String>,
    /// Chart version (or semver range).
    #[arg(long = "chart-version", value_name = "V")]
    chart_version: Option<String>,
    /// Chart source, flux's syntax `KIND/NAME[.NAMESPACE]` (default `HelmRepository/CHART`).
    #[arg(long = "chart-source", value_name = "KIND/NAME")]
    chart_source: Option<String>,
    /// HelmRelease reconcile interval.
    #[arg(long, default_value = "1m")]
    interval: String,
    /// Where the content comes from (`org.opencontainers.image.source`, e.g. the commit URL).
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// Revision of the content (`org.opencontainers.image.revision`, e.g. the commit id).
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
}

/// `strata deploy flux`
#[derive(Args, Debug)]
pub struct FluxArgs {
    /// Where to push: `oci://REGISTRY/REPO:TAG` (Altinn: `oci://ACR/configs/APP:ENV-TAG`).
    artifact: String,
    /// The pushed image, for `image.repository`/`image.tag` (pinned by digest) and labels.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Also point these tags at the artifact (`flux tag artifact`); repeatable.
    #[arg(long = "tag", value_name = "ENV")]
    tags: Vec<String>,
    /// Platform whose config to read from a multi-platform image (default: linux/amd64).
    #[arg(long)]
    platform: Option<Platform>,
    #[command(flatten)]
    flux: FluxOptions,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// `oci://REGISTRY/REPO:TAG` → a reference.
pub(super) fn parse_artifact(s: &str) -> Result<Reference, UsageError> {
    let rest = s.strip_prefix("oci://").ok_or_else(|| {
        UsageError(format!(
            "artifact {s:?}: expected oci://REGISTRY/REPO[:TAG] (flux's syntax)"
        ))
    })?;
    rest.parse()
        .map_err(|e: crate::store::NameError| UsageError(e.to_string()))
}

fn parse_ref(s: &str) -> Result<Reference, UsageError> {
    s.parse()
        .map_err(|e: crate::store::NameError| UsageError(e.to_string()))
}

fn pairs(items: &[String], flag: &str) -> Result<Vec<(String, String)>, UsageError> {
    items
        .iter()
        .map(|i| match i.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(UsageError(format!("{flag} {i:?}: expected KEY=VALUE"))),
        })
        .collect()
}

/// The creation time and tar mtime: `epoch` (a build's `--source-date-epoch`) or
/// SOURCE_DATE_EPOCH when set (reproducible artifacts), else now and 0.
fn artifact_times(epoch: Option<i64>) -> anyhow::Result<(i64, u64)> {
    if let Some(e) = epoch.filter(|e| *e >= 0) {
        return Ok((e, e as u64));
    }
    match std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(v) => {
            let e: i64 = v
                .parse()
                .ok()
                .filter(|e| *e >= 0)
                .ok_or_else(|| UsageError(format!("invalid SOURCE_DATE_EPOCH {v:?}")))?;
            Ok((e, e as u64))
        }
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            Ok((now, 0))
        }
    }
}

impl FluxOptions {
    /// The files of the artifact: the directory, or a rendered `helmrelease.yaml`.
    fn files(&self, image: Option<&ImageInfo>) -> anyhow::Result<(ArtifactFiles, Vec<String>)> {
        if let Some(dir) = &self.path {
            if !self.sets.is_empty() || !self.env.is_empty() || self.deployment_id.is_some() {
                return Err(UsageError(
                    "--set, --env and --deployment-id need a HelmRelease (--values/--release), not --path".into(),
                )
                .into());
            }
            return Ok((ArtifactFiles::from_dir(dir)?, Vec::new()));
        }
        let need = |v: &Option<String>, flag: &str| {
            v.clone().ok_or_else(|| {
                UsageError(format!(
                    "{flag} is required (or package a directory with --path)"
                ))
            })
        };
        let release = need(&self.release, "--release")?;
        let chart = need(&self.chart, "--chart")?;
        let chart_version = need(&self.chart_version, "--chart-version")?;
        let source = match &self.chart_source {
            Some(s) => HelmRelease::parse_source(s).map_err(|e| UsageError(e.to_string()))?,
            None => ("HelmRepository".to_string(), chart.clone(), None),
        };
        let mut values = match &self.values {
            Some(f) => {
                let text = fs_err::read_to_string(f).context("read the values file")?;
                Values::parse(&text, &f.display().to_string())?
            }
            None => Values::default(),
        };
        let mut sets = Vec::new();
        for s in &self.sets {
            sets.push(deploy::parse_set(s).map_err(|e| UsageError(e.to_string()))?);
        }
        let overrides = AppOverrides {
            image: image.cloned(),
            env: pairs(&self.env, "--env")?,
            deployment_id: self.deployment_id.clone(),
            from_labels: pairs(&self.from_labels, "--set-from-label")?,
            sets,
        };
        if !overrides.from_labels.is_empty() && image.is_none() {
            return Err(UsageError("--set-from-label needs --image".into()).into());
        }
        let missing = overrides.apply(&mut values)?;
        let hr = HelmRelease {
            name: release,
            namespace: self.namespace.clone(),
            chart,
            chart_version,
            source,
            interval: self.interval.clone(),
            values,
        };
        Ok((
            ArtifactFiles::single("helmrelease.yaml", hr.to_yaml().as_bytes()),
            missing,
        ))
    }

    /// Build and push the artifact to `dest`, tag it with `tags`, and report on stderr.
    /// `epoch` overrides SOURCE_DATE_EPOCH (a build passes its own).
    pub(super) fn push(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &Client,
        dest: &Reference,
        image: Option<&ImageInfo>,
        tags: &[String],
        epoch: Option<i64>,
    ) -> anyhow::Result<PushedArtifact> {
        let source = self
            .source
            .clone()
            .ok_or_else(|| UsageError("--source URL is required".into()))?;
        let revision = self
            .revision
            .clone()
            .ok_or_else(|| UsageError("--revision REV is required".into()))?;
        let (files, missing) = self.files(image)?;
        for label in missing {
            eprintln!("note: the image has no label {label:?}; its value was not set");
        }
        let (created, mtime) = artifact_times(epoch)?;
        let meta = ArtifactMeta {
            source,
            revision,
            created,
            mtime,
        };
        let artifact = FluxArtifact::build(files, &meta)?;
        let pushed = rt.block_on(deploy::push_artifact(client, &artifact, dest, tags))?;
        eprintln!(
            "pushed artifact oci://{} (tags: {})",
            pushed.reference,
            pushed.tags.join(", ")
        );
        Ok(pushed)
    }
}

/// The platform whose config the hand-off reads: clusters run linux/amd64 unless told.
fn deploy_platform(p: &Option<Platform>) -> Platform {
    p.clone().unwrap_or_else(|| {
        "linux/amd64"
            .parse()
            .expect("linux/amd64 is a valid platform")
    })
}

fn flux(a: FluxArgs) -> anyhow::Result<ExitCode> {
    let dest = parse_artifact(&a.artifact)?;
    if a.flux.path.is_some() && a.image.is_some() {
        return Err(UsageError(
            "--image sets HelmRelease values; with --path the directory is packaged as it is"
                .into(),
        )
        .into());
    }
    let client = a.registry.client(None)?;
    let rt = runtime()?;
    let image = match &a.image {
        Some(i) => {
            let r = parse_ref(i)?;
            let info = rt
                .block_on(deploy::inspect_image(
                    &client,
                    &r,
                    &deploy_platform(&a.platform),
                ))
                .with_context(|| format!("read image {r}"))?;
            Some(info)
        }
        None => None,
    };
    let pushed = a
        .flux
        .push(&rt, &client, &dest, image.as_ref(), &a.tags, None)?;
    let digest = pushed
        .reference
        .digest
        .expect("pushed artifacts are pinned");
    println!("{digest}");
    Ok(ExitCode::SUCCESS)
}

/// `strata deploy apply`
#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Manifests: a file, a directory (its `*.yaml`, `*.yml`, `*.json`), or `-` for stdin;
    /// repeatable.
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    files: Vec<String>,
    /// Pin an image: `NAME=REF` replaces `strata://NAME` and `image: NAME[:tag]` with
    /// `REF` resolved to `repo@sha256:…`; repeatable.
    #[arg(long = "image", value_name = "NAME=REF")]
    images: Vec<String>,
    /// Generate a Deployment and Service from the image config (needs one `--image NAME=REF`).
    #[arg(long, conflicts_with = "files")]
    generate: bool,
    /// Print the resolved YAML; contact no cluster.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Namespace for objects that name none (default: the context's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: current-context).
    #[arg(long)]
    context: Option<String>,
    /// Take over fields other field managers own.
    #[arg(long = "force-conflicts")]
    force_conflicts: bool,
    /// Wait for Deployments to roll out (`--wait=false` to return after applying).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    wait: bool,
    /// Give up waiting after this long (`90s`, `5m`, `1h`).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Time between looks at a rollout.
    #[arg(long = "poll-interval", default_value = "1s", value_parser = parse_duration, hide = true)]
    poll_interval: Duration,
    /// Platform whose config `--generate` reads (default: linux/amd64).
    #[arg(long)]
    platform: Option<Platform>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    generated: GenerateArgs,
}

/// `--generate`'s knobs; defaults are Altinn's chart's.
#[derive(Args, Debug)]
#[command(next_help_heading = "Generate")]
struct GenerateArgs {
    /// Replicas.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// CPU request.
    #[arg(long = "cpu-request", default_value = "50m")]
    cpu_request: String,
    /// Memory request.
    #[arg(long = "memory-request", default_value = "256Mi")]
    memory_request: String,
    /// CPU limit.
    #[arg(long = "cpu-limit")]
    cpu_limit: Option<String>,
    /// Memory limit.
    #[arg(long = "memory-limit")]
    memory_limit: Option<String>,
    /// Readiness and liveness probe path (empty for no probes).
    #[arg(long = "probe-path", default_value = "/health")]
    probe_path: String,
    /// Container port instead of the image's EXPOSE; repeatable.
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// runAsUser instead of the image's USER.
    #[arg(long = "run-as-user")]
    run_as_user: Option<u64>,
    /// runAsGroup instead of the image's USER.
    #[arg(long = "run-as-group")]
    run_as_group: Option<u64>,
}

/// `90s`, `5m`, `1h`, `1m30s`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (e.g. 90s, 5m, 1h)");
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            Duration::from_millis(n)
        } else {
            match c {
                'h' => Duration::from_secs(n * 3600),
                'm' => Duration::from_secs(n * 60),
                's' => Duration::from_secs(n),
                _ => return Err(bad()),
            }
        };
        total += unit;
    }
    if !num.is_empty() || s.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// Read manifests from files, directories (sorted, `*.yaml|*.yml|*.json`) and stdin.
fn read_manifests(files: &[String]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read manifests from stdin")?;
            docs.extend(deploy::parse_manifests(&text, "stdin")?);
            continue;
        }
        let p = PathBuf::from(f);
        let paths: Vec<PathBuf> = if p.is_dir() {
            let mut v: Vec<PathBuf> = walkdir::WalkDir::new(&p)
                .sort_by_file_name()
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|x| x.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            v.sort();
            v
        } else {
            vec![p]
        };
        for path in paths {
            let text = fs_err::read_to_string(&path)?;
            docs.extend(deploy::parse_manifests(&text, &path.display().to_string())?);
        }
    }
    Ok(docs)
}

/// Kubeconfig files as kubectl picks them: `--kubeconfig`, else each existing file of
/// `$KUBECONFIG`, else `~/.kube/config` if it exists; none means in-cluster.
fn kubeconfigs(flag: &Option<PathBuf>) -> Vec<PathBuf> {
    if let Some(f) = flag {
        return vec![f.clone()];
    }
    if let Some(list) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        let found: Vec<PathBuf> = std::env::split_paths(&list)
            .filter(|p| p.is_file())
            .collect();
        if !found.is_empty() {
            return found;
        }
    }
    match std::env::var_os("HOME") {
        Some(h) => {
            let p = PathBuf::from(h).join(".kube/config");
            if p.is_file() { vec![p] } else { Vec::new() }
        }
        None => Vec::new(),
    }
}

fn apply(a: ApplyArgs) -> anyhow::Result<ExitCode> {
    if !a.generate && a.files.is_empty() {
        return Err(
            UsageError("give manifests with -f FILE|DIR|- or use --generate".into()).into(),
        );
    }
    let images = pairs(&a.images, "--image")?;
    let client = a.registry.client(None)?;
    let rt = runtime()?;
    let mut docs = if a.generate {
        let [(name, r)] = images.as_slice() else {
            return Err(UsageError("--generate needs exactly one --image NAME=REF".into()).into());
        };
        let r = parse_ref(r)?;
        let info = rt
            .block_on(deploy::inspect_image(
                &client,
                &r,
                &deploy_platform(&a.platform),
            ))
            .with_context(|| format!("read image {r}"))?;
        let g = &a.generated;
        let spec = deploy::Generate {
            namespace: a.namespace.clone(),
            replicas: g.replicas,
            cpu_request: g.cpu_request.clone(),
            memory_request: g.memory_request.clone(),
            cpu_limit: g.cpu_limit.clone(),
            memory_limit: g.memory_limit.clone(),
            probe_path: Some(g.probe_path.clone()).filter(|p| !p.is_empty()),
            ports: g.ports.clone(),
            run_as_user: g.run_as_user,
            run_as_group: g.run_as_group,
            ..deploy::Generate::new(name, &info.pinned())
        };
        deploy::generate(&spec, &info.config)?
    } else {
        read_manifests(&a.files)?
    };
    // Every name to pin: the --image ones, and placeholders naming a registry reference.
    let mut wanted: BTreeMap<String, String> = images.iter().cloned().collect();
    for name in deploy::resolve::placeholders(&docs) {
        wanted.entry(name.clone()).or_insert(name);
    }
    let mut map = deploy::ImageMap::new();
    for (name, r) in &wanted {
        let r = parse_ref(r)?;
        let digest = match r.digest {
            Some(d) => d,
            None => {
                rt.block_on(client.head_manifest(&r))
                    .with_context(|| format!("resolve image {r}"))?
                    .ok_or_else(|| anyhow::anyhow!("image {r} does not exist"))?
                    .digest
            }
        };
        map.insert(name.clone(), format!("{}@{digest}", r.name()));
    }
    let replaced = deploy::resolve_images(&mut docs, &map)?;
    for (old, new) in &replaced {
        tracing::debug!(old, new, "pinned image");
    }
    if a.dry_run {
        let mut out = std::io::stdout().lock();
        out.write_all(deploy::to_yaml(&docs).as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    let target = deploy::KubeTarget {
        kubeconfigs: kubeconfigs(&a.kubeconfig),
        context: a.context.clone(),
    };
    let (kube, context_ns) = rt.block_on(deploy::kube_client(&target))?;
    let opts = deploy::ApplyOptions {
        field_manager: "strata".into(),
        force: a.force_conflicts,
        namespace: a.namespace.clone().unwrap_or(context_ns),
    };
    let applied = rt.block_on(deploy::apply_objects(&kube, &docs, &opts))?;
    for o in &applied {
        println!("{} serverside-applied", o.object);
    }
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let ropts = deploy::RolloutOptions {
        timeout: a.timeout,
        poll: a.poll_interval,
    };
    for o in applied
        .iter()
        .filter(|o| o.kind == "Deployment" && o.group == "apps")
    {
        let ns = o.namespace.as_deref().unwrap_or("default");
        let object = o.object.clone();
        let mut progress = |s: &RolloutState| match s {
            RolloutState::Progressing {
                ready,
                desired,
                waiting_for,
            } => eprintln!("{object}: {ready}/{desired} ready, waiting for {waiting_for}"),
            RolloutState::Complete { desired } => {
                eprintln!("{object}: {desired}/{desired} ready")
            }
            RolloutState::Failed(_) => {}
        };
        rt.block_on(deploy::wait_for_rollout(
            &kube,
            ns,
            &o.name,
            &ropts,
            &mut progress,
        ))?;
        println!("{} successfully rolled out", o.object);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubectl() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5m3").is_err());
    }

    #[test]
    fn artifact_references_need_oci_scheme() {
        let r = parse_artifact("oci://127.0.0.1:5000/configs/app:at22-v1").unwrap();
        assert_eq!(r.repository, "configs/app");
        assert_eq!(r.tag.as_deref(), Some("at22-v1"));
        assert!(parse_artifact("127.0.0.1:5000/configs/app").is_err());
    }
}
