//! `strata build`: buildx's flag names, the local store as the default output.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use std::sync::Arc;

use super::progress::{Mode, Renderer, TransferRenderer};
use super::{UsageError, open_store};
use crate::build::{self, BuildOptions};
use crate::media::{Compression, Platform};
use crate::store::{self, ExportTarget, ImageName};

/// `strata build`
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The build context: a directory, or a git repository
    /// (`https://host/org/repo.git#REF:SUBDIR`, `git+https://…`).
    #[arg(default_value = ".")]
    context: String,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file", conflicts_with = "recipe")]
    file: Option<PathBuf>,
    /// Build from a layer recipe (`layers/*.toml`) instead of a Dockerfile.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Name and optionally tag the image (`name[:tag]`); repeatable.
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Set a build-time variable (`KEY=VALUE`, or `KEY` to take it from the environment).
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    /// Build this stage (and what it needs) instead of the last one.
    #[arg(long)]
    target: Option<String>,
    /// Set a label on the image (`KEY=VALUE`); repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Target platform `OS/ARCH[/VARIANT]` (default: the host's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Also write the image to `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
    /// `docker-archive:FILE[:NAME:TAG]`, or buildx's `type=oci|docker,dest=FILE[,name=N]`.
    /// The image always lands in the local store.
    #[arg(short = 'o', long = "output")]
    outputs: Vec<String>,
    /// Layer compression.
    #[arg(long, default_value = "gzip", value_parser = ["gzip", "zstd", "uncompressed"])]
    compression: String,
    /// Compression level (gzip 0-9, default 1 as in ko/crane; zstd 1-22, default 3).
    #[arg(long = "compression-level")]
    compression_level: Option<i32>,
    /// Timestamp for every file and date in the image: seconds since 1970, or `commit` for
    /// a git context's commit time (default: $SOURCE_DATE_EPOCH, else 0).
    #[arg(long = "source-date-epoch")]
    source_date_epoch: Option<String>,
    /// Token for a git context (sent as HTTP Basic; also `$STRATA_GIT_TOKEN`).
    #[arg(long = "git-token", env = "STRATA_GIT_TOKEN", hide_env_values = true)]
    git_token: Option<String>,
    /// Extra HTTP header for a git context (`X-Api-Key: …`, `Authorization: token …`).
    #[arg(long = "git-header", value_name = "NAME: VALUE")]
    git_headers: Vec<String>,
    /// Also fetch a git context's submodules (recursively) and include their files.
    #[arg(long = "git-submodules")]
    git_submodules: bool,
    /// Write the image digest to this file.
    #[arg(long)]
    iidfile: Option<PathBuf>,
    /// Write build result metadata (JSON, buildx's keys) to this file.
    #[arg(long = "metadata-file")]
    metadata_file: Option<PathBuf>,
    /// Progress output: `auto` (bars on a terminal, plain lines otherwise), `plain`, `json`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "plain", "tty", "json", "rawjson", "quiet"])]
    progress: String,
    /// Print nothing but the image digest.
    #[arg(short, long)]
    quiet: bool,
    /// Compression worker threads (default: the number of CPUs). Output bytes do not depend on it.
    #[arg(long, env = "STRATA_THREADS")]
    threads: Option<u32>,
    /// Build every layer again instead of reusing cached ones (results are still cached).
    #[arg(long = "no-cache")]
    no_cache: bool,
    /// Build the layers of these stages again (repeatable or comma-separated).
    #[arg(long = "no-cache-filter", value_name = "STAGE")]
    no_cache_filter: Vec<String>,
    /// Import a layer cache from a registry (`REF` or `type=registry,ref=REF`); repeatable.
    #[arg(long = "cache-from", value_name = "REF")]
    cache_from: Vec<String>,
    /// Export this build's layer cache to a registry (`REF` or `type=registry,ref=REF`).
    #[arg(long = "cache-to", value_name = "REF")]
    cache_to: Option<String>,
    /// Push the image to every `-t` registry reference (same as `--output type=registry`).
    #[arg(long)]
    push: bool,
    /// Resolve registry base images again even when the local store has the name.
    #[arg(long)]
    pull: bool,
    /// A secret for `RUN --mount=type=secret` (buildx syntax): `id=ID,src=FILE`,
    /// `id=ID,env=VAR`, `type=file|env`, or `id=ID` alone (the variable ID if set, else the
    /// file ID). Never stored in a layer, the cache, the config or the history; repeatable.
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
    secrets: Vec<String>,
    #[command(flatten)]
    registry: super::registry::RegistryArgs,
    /// After `--push`, hand the image to Flux: push a HelmRelease artifact to
    /// `oci://REGISTRY/REPO:TAG` (see `strata deploy flux`; the image is the first `-t`).
    #[arg(
        long = "deploy-flux",
        value_name = "oci://REF",
        help_heading = "Deploy"
    )]
    deploy_flux: Option<String>,
    /// Also point these tags at the Flux artifact (the environment); repeatable.
    #[arg(long = "deploy-tag", value_name = "ENV", help_heading = "Deploy")]
    deploy_tags: Vec<String>,
    #[command(flatten, next_help_heading = "Deploy")]
    flux: super::deploy::FluxOptions,
}

fn key_values(
    items: &[String],
    what: &str,
    from_env: bool,
) -> Result<BTreeMap<String, String>, UsageError> {
    let mut out = BTreeMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            None if from_env && !item.is_empty() => {
                if let Ok(v) = std::env::var(item) {
                    out.insert(item.clone(), v);
                }
            }
            _ => {
                return Err(UsageError(format!(
                    "invalid {what} {item:?}: expected KEY=VALUE"
                )));
            }
        }
    }
    Ok(out)
}

/// A cache location: `REF`, or buildx's `type=registry,ref=REF[,…]`.
fn cache_ref(s: &str) -> Result<crate::registry::Reference, UsageError> {
    let r = if s.starts_with("type=") || s.contains("ref=") {
        let mut kind = None;
        let mut r = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("type", t)) => kind = Some(t),
                Some(("ref", x)) => r = Some(x),
                _ => {}
            }
        }
        if kind.is_some_and(|k| k != "registry") {
            return Err(UsageError(format!(
                "cache {s:?}: only type=registry is supported"
            )));
        }
        r.ok_or_else(|| UsageError(format!("cache {s:?} needs ref=REF")))?
    } else {
        s
    };
    r.parse()
        .map_err(|e: crate::store::NameError| UsageError(e.to_string()))
}

/// Parse `--output`: skopeo transport syntax, or buildx's `type=…,dest=…`.
fn parse_output(s: &str) -> Result<ExportTarget, UsageError> {
    if s.starts_with("type=") || s.contains(",dest=") {
        let mut kv = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                UsageError(format!("invalid --output {s:?}: {part:?} is not key=value"))
            })?;
            kv.insert(k, v);
        }
        let dest = kv.get("dest").map(PathBuf::from);
        let name = kv.get("name").map(|n| n.to_string());
        return match (kv.get("type").copied(), dest) {
            (Some("oci"), Some(file)) => Ok(ExportTarget::OciArchive { file, tag: name }),
            (Some("docker"), Some(file)) => Ok(ExportTarget::DockerArchive { file, name }),
            (Some("oci" | "docker"), None) => {
                Err(UsageError(format!("--output {s:?} needs dest=FILE")))
            }
            (Some(t), _) => Err(UsageError(format!(
                "--output type={t} is not supported (use type=oci, type=docker or type=registry)"
            ))),
            (None, _) => Err(UsageError(format!("--output {s:?} needs type="))),
        };
    }
    s.parse().map_err(UsageError)
}

pub(super) fn run(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let build_args = key_values(&a.build_args, "--build-arg", true)?;
    let labels = key_values(&a.labels, "--label", false)?;
    let tags = a
        .tags
        .iter()
        .map(|t| {
            t.parse::<ImageName>()
                .map_err(|e| UsageError(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut push = a.push;
    let mut outputs = Vec::new();
    for o in &a.outputs {
        if o == "type=registry" || o.starts_with("type=registry,") {
            push = true;
        } else {
            outputs.push(parse_output(o)?);
        }
    }
    if push && tags.is_empty() {
        return Err(UsageError("--push needs at least one -t registry/repo:tag".into()).into());
    }
    let deploy_flux = a
        .deploy_flux
        .as_deref()
        .map(super::deploy::parse_artifact)
        .transpose()?;
    if deploy_flux.is_some() && !push {
        return Err(UsageError("--deploy-flux needs --push".into()).into());
    }
    let compression: Compression = a.compression.parse().map_err(UsageError)?;
    let store = open_store()?;
    let _in_use = store.in_use()?;
    let recipe = match &a.recipe {
        Some(path) => {
            let text = fs_err::read_to_string(path).context("read the recipe")?;
            Some(crate::recipe::parse(&text, &display_name(path))?)
        }
        None => None,
    };
    let source = if crate::source::is_git_context(&a.context) {
        git_source(&a, &store, recipe.is_some())?
    } else {
        local_source(&a, recipe.is_some())?
    };
    let epoch_text = a.source_date_epoch.clone().or_else(|| {
        std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .filter(|v| !v.is_empty())
    });
    let source_date_epoch = match epoch_text.as_deref() {
        None => 0,
        Some("commit") => source
            .commit_time
            .ok_or_else(|| UsageError("--source-date-epoch=commit needs a git context".into()))?,
        Some(v) => v
            .parse()
            .map_err(|_| UsageError(format!("invalid source date epoch {v:?}")))?,
    };
    if source_date_epoch < 0 {
        return Err(UsageError("--source-date-epoch must not be negative".into()).into());
    }
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let mut secrets = BTreeMap::new();
    for spec in &a.secrets {
        let (id, value) = read_secret(spec)?;
        secrets.insert(id, value);
    }
    let opts = BuildOptions {
        context: source.dir,
        context_entries: source.entries,
        dockerfile_name: source.dockerfile_name,
        dockerfile_path: source.dockerfile_path,
        dockerfile: source.dockerfile,
        build_args,
        target: a.target.clone(),
        labels,
        platform: a.platform.clone().unwrap_or_else(Platform::host),
        compression,
        compression_level: a.compression_level,
        source_date_epoch,
        threads: threads.max(1),
        no_cache: a.no_cache,
        no_cache_filter: a
            .no_cache_filter
            .iter()
            .flat_map(|s| s.split(','))
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .collect(),
        secrets,
        cancel: None,
    };
    let mode = if a.quiet {
        Mode::Quiet
    } else {
        Mode::parse(&a.progress)
    };
    let mut renderer = Renderer::new(mode);
    if let Some(note) = &source.note {
        renderer.note(note);
    }
    let transfers = Arc::new(TransferRenderer::new(mode));
    let rt = super::registry::runtime()?;
    let remote = build::Remote {
        client: a.registry.client(Some(&transfers))?,
        handle: rt.handle().clone(),
        always_pull: a.pull,
    };
    let cache_from = a
        .cache_from
        .iter()
        .map(|c| cache_ref(c))
        .collect::<Result<Vec<_>, _>>()?;
    let cache_to = a.cache_to.as_deref().map(cache_ref).transpose()?;
    for c in &cache_from {
        let n = rt.block_on(crate::registry::import_cache(&remote.client, &store, c))?;
        renderer.note(&format!("imported {n} cache entries from {c}"));
    }
    let result = match &recipe {
        Some(r) => {
            build::build_recipe(&store, Some(&remote), r, &opts, &mut |e| renderer.event(&e))
        }
        None => build::build(&store, Some(&remote), &opts, &mut |e| renderer.event(&e)),
    };
    renderer.finish();
    let out = result?;
    let needs_layers = !outputs.is_empty();
    if needs_layers {
        // Exports carry every layer: fetch base layers still in their registry.
        rt.block_on(crate::registry::ensure_blobs(
            &remote.client,
            &store,
            &out.image.manifest.layers,
        ))?;
    }
    for target in &outputs {
        store::export(&store, &out.image.descriptor(), target)?;
        renderer.note(&format!("exported to {target}"));
    }
    let mut pushed_image = None;
    if push {
        for t in &tags {
            let dest: crate::registry::Reference = t
                .to_string()
                .parse()
                .map_err(|e: crate::store::NameError| UsageError(e.to_string()))?;
            let report = rt.block_on(crate::registry::push(
                &remote.client,
                &store,
                &out.image,
                &dest,
            ))?;
            transfers.finish();
            transfers.pushed(&dest, &report);
            pushed_image.get_or_insert(dest.with_digest(report.digest));
        }
    }
    if let Some(c) = &cache_to {
        let report = rt.block_on(crate::registry::export_cache(
            &remote.client,
            &store,
            &out.cache_entries,
            c,
        ))?;
        transfers.finish();
        renderer.note(&format!(
            "exported {} cache entries to {c} ({})",
            out.cache_entries.len(),
            report.digest
        ));
    }
    // Tag last: a failed export or push leaves every name where it was.
    store.commit_image(&out.image, &tags)?;
    if let (Some(dest), Some(image)) = (&deploy_flux, pushed_image) {
        // The image config is at hand: no registry read is needed for its labels.
        let info = crate::deploy::ImageInfo {
            reference: image,
            config: out.image.config.clone(),
        };
        let artifact = a.flux.push(
            &rt,
            &remote.client,
            dest,
            Some(&info),
            &a.deploy_tags,
            epoch_text.is_some().then_some(source_date_epoch),
        )?;
        renderer.note(&format!(
            "handed to flux: image {} → artifact oci://{} (tags: {})",
            info.pinned(),
            artifact.reference,
            artifact.tags.join(", ")
        ));
    }
    if let Some(f) = &a.iidfile {
        fs_err::write(f, out.digest.to_string())?;
    }
    if let Some(f) = &a.metadata_file {
        let names: Vec<String> = tags.iter().map(ToString::to_string).collect();
        let manifest: serde_json::Value = serde_json::from_slice(&out.image.manifest_bytes)?;
        let base = |k: &str| manifest["annotations"][k].clone();
        let meta = json!({
            "containerimage.base.name": base("org.opencontainers.image.base.name"),
            "containerimage.base.digest": base("org.opencontainers.image.base.digest"),
            "containerimage.digest": out.digest.to_string(),
            "containerimage.config.digest": out.image.manifest.config.digest.to_string(),
            "containerimage.descriptor": out.image.descriptor(),
            "image.name": names.join(","),
        });
        fs_err::write(f, serde_json::to_vec_pretty(&meta)?)?;
    }
    renderer.result(&out.digest, &tags);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", out.digest)?;
    Ok(ExitCode::SUCCESS)
}

/// Where a build's Dockerfile and files come from.
struct Source {
    dir: PathBuf,
    entries: Option<Vec<crate::layer::Entry>>,
    dockerfile_path: PathBuf,
    dockerfile_name: String,
    dockerfile: String,
    commit_time: Option<i64>,
    note: Option<String>,
}

fn local_source(a: &BuildArgs, recipe: bool) -> anyhow::Result<Source> {
    let dir = PathBuf::from(&a.context);
    if !dir.is_dir() {
        anyhow::bail!("build context {} is not a directory", dir.display());
    }
    let dockerfile_path = a.file.clone().unwrap_or_else(|| dir.join("Dockerfile"));
    let dockerfile = if recipe {
        String::new()
    } else {
        fs_err::read_to_string(&dockerfile_path).context("read the Dockerfile")?
    };
    Ok(Source {
        dir,
        entries: None,
        dockerfile_name: display_name(&dockerfile_path),
        dockerfile_path,
        dockerfile,
        commit_time: None,
        note: None,
    })
}

/// Fetch a git context (one commit, shallow, cached in the store) and read the Dockerfile
/// and `.dockerignore` from its objects; no checkout is written.
fn git_source(a: &BuildArgs, store: &crate::store::Store, recipe: bool) -> anyhow::Result<Source> {
    use crate::registry::Secret;
    use crate::source::{Dockerignore, GitAuth, GitCache, GitContext};
    let ctx: GitContext = a.context.parse()?;
    let mut headers = Vec::new();
    for h in &a.git_headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| UsageError("--git-header must be NAME: VALUE".into()))?;
        headers.push((k.trim().to_string(), Secret::new(v.trim())));
    }
    let auth = GitAuth {
        token: a.git_token.clone().map(Secret::new),
        headers,
    };
    let cache = GitCache::new(store.root().join("git"));
    let checkout = cache.fetch(&ctx, &auth)?;
    let sub = ctx.subdir().unwrap_or("").trim_matches('/').to_string();
    let in_repo = |rel: &str| {
        if sub.is_empty() {
            rel.to_string()
        } else {
            format!("{sub}/{rel}")
        }
    };
    let file = a
        .file
        .as_ref()
        .map(|f| f.to_string_lossy().trim_start_matches("./").to_string())
        .unwrap_or_else(|| "Dockerfile".to_string());
    let dockerfile = if recipe {
        String::new()
    } else {
        let bytes = checkout
            .read_file(&in_repo(&file))?
            .ok_or_else(|| anyhow::anyhow!("{file} not found in {ctx} at {}", checkout.commit))?;
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{file} is not UTF-8 text"))?
    };
    let ignore_text = match checkout.read_file(&in_repo(&format!("{file}.dockerignore")))? {
        Some(t) => Some(t),
        None => checkout.read_file(&in_repo(".dockerignore"))?,
    };
    let ignore = match ignore_text {
        Some(t) => Dockerignore::parse(&String::from_utf8_lossy(&t))?,
        None => Dockerignore::empty(),
    };
    let mut entries = if a.git_submodules {
        with_submodules(&cache, &auth, &ctx, &checkout, ctx.subdir(), 0)?
    } else {
        checkout.entries(ctx.subdir())?
    };
    entries.retain(|e| !ignore.is_excluded(&e.path.to_string_lossy()));
    Ok(Source {
        dir: PathBuf::from(format!("git-context-{}", checkout.commit)),
        entries: Some(entries),
        dockerfile_path: PathBuf::from(&file),
        dockerfile_name: format!("{ctx}/{file}"),
        dockerfile,
        commit_time: Some(checkout.commit_time),
        note: Some(format!("fetched {ctx} at {}", checkout.commit)),
    })
}

/// The entries of `checkout` (below `subdir`) with every submodule's files in place: each
/// gitlink's commit is fetched (shallow, cached, same auth) from the URL `.gitmodules` gives,
/// relative URLs resolved against the parent's.
fn with_submodules(
    cache: &crate::source::GitCache,
    auth: &crate::source::GitAuth,
    ctx: &crate::source::GitContext,
    checkout: &crate::source::GitCheckout,
    subdir: Option<&str>,
    depth: usize,
) -> anyhow::Result<Vec<crate::layer::Entry>> {
    if depth > 8 {
        anyhow::bail!("{ctx}: submodules nest more than 8 levels deep");
    }
    let (mut entries, links) = checkout.entries_and_submodules(subdir)?;
    if links.is_empty() {
        return Ok(entries);
    }
    let modules = checkout
        .read_file(".gitmodules")?
        .map(|b| parse_gitmodules(&String::from_utf8_lossy(&b)))
        .unwrap_or_default();
    let prefix = subdir.unwrap_or("").trim_matches('/');
    for (path, commit) in links {
        let repo_path = if prefix.is_empty() {
            path.to_string_lossy().into_owned()
        } else {
            format!("{prefix}/{}", path.display())
        };
        let url = modules.get(&repo_path).ok_or_else(|| {
            anyhow::anyhow!("{ctx}: submodule {repo_path} has no url in .gitmodules")
        })?;
        let url = resolve_submodule_url(ctx.url(), url);
        let sub_ctx: crate::source::GitContext = format!("{url}#{commit}").parse()?;
        let sub = cache.fetch(&sub_ctx, auth)?;
        entries.push(crate::layer::Entry::dir(path.clone(), 0o755, 0, 0));
        for mut e in with_submodules(cache, auth, &sub_ctx, &sub, None, depth + 1)? {
            e.path = path.join(&e.path);
            entries.push(e);
        }
    }
    Ok(entries)
}

/// `path → url` from a `.gitmodules` file.
fn parse_gitmodules(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let (mut path, mut url) = (None::<String>, None::<String>);
    let mut flush = |p: &mut Option<String>, u: &mut Option<String>| {
        if let (Some(p), Some(u)) = (p.take(), u.take()) {
            out.insert(p, u);
        }
    };
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            flush(&mut path, &mut url);
        } else if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "path" => path = Some(v.trim().trim_matches('/').to_string()),
                "url" => url = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    flush(&mut path, &mut url);
    out
}

/// A submodule URL as git resolves it: `../x.git` and `./x` relative to the parent's URL.
fn resolve_submodule_url(parent: &str, url: &str) -> String {
    if !(url.starts_with("../") || url.starts_with("./")) {
        return url.to_string();
    }
    let mut base: Vec<&str> = parent.trim_end_matches('/').split('/').collect();
    for part in url.split('/') {
        match part {
            "." => {}
            ".." => {
                base.pop();
            }
            p => base.push(p),
        }
    }
    // The first `..` replaces the parent repository's own last component.
    base.join("/")
}

fn display_name(p: &Path) -> String {
    p.strip_prefix("./").unwrap_or(p).display().to_string()
}

/// Read one `--secret` as buildx does: CSV fields `id`, `type=file|env`, `src`/`source`,
/// `env`; with neither a source nor a variable, the variable named like the id if it is set,
/// else the file named like the id.
fn read_secret(spec: &str) -> anyhow::Result<(String, crate::sandbox::SecretBytes)> {
    let (mut id, mut typ, mut src, mut env) = (None, None, None, None);
    for field in spec.split(',') {
        let (k, v) = field.split_once('=').ok_or_else(|| {
            UsageError(format!(
                "invalid --secret field {field:?}: must be a key=value pair"
            ))
        })?;
        match k.to_ascii_lowercase().as_str() {
            "id" => id = Some(v.to_string()),
            "type" if v == "file" || v == "env" => typ = Some(v.to_string()),
            "type" => return Err(UsageError(format!("unsupported secret type {v:?}")).into()),
            "src" | "source" => src = Some(v.to_string()),
            "env" => env = Some(v.to_string()),
            _ => {
                return Err(
                    UsageError(format!("unexpected key {k:?} in --secret {spec:?}")).into(),
                );
            }
        }
    }
    if typ.as_deref() == Some("env") && env.is_none() {
        env = src.take();
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| UsageError(format!("--secret {spec:?} needs an id")))?;
    if src.is_none() && env.is_none() {
        if std::env::var_os(&id).is_some() {
            env = Some(id.clone());
        } else {
            src = Some(id.clone());
        }
    }
    let bytes = match (env, src) {
        (Some(var), _) => std::env::var_os(&var)
            .ok_or_else(|| {
                UsageError(format!(
                    "secret {id:?}: environment variable {var} is not set"
                ))
            })?
            .into_encoded_bytes(),
        (None, Some(path)) => fs_err::read(&path).with_context(|| format!("read secret {id:?}"))?,
        (None, None) => unreachable!("one of them is set above"),
    };
    Ok((id, crate::sandbox::SecretBytes(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_parse_like_buildx() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, "v4lue").unwrap();
        let (id, v) = read_secret(&format!("id=tok,src={}", file.display())).unwrap();
        assert_eq!((id.as_str(), v.0.as_slice()), ("tok", &b"v4lue"[..]));
        let (_, v) = read_secret(&format!("id=t,type=file,source={}", file.display())).unwrap();
        assert_eq!(v.0, b"v4lue");
        let path = std::env::var("PATH").unwrap();
        let (id, v) = read_secret("id=p,env=PATH").unwrap();
        assert_eq!((id.as_str(), v.0), ("p", path.clone().into_bytes()));
        let (_, v) = read_secret("type=env,id=p,src=PATH").unwrap();
        assert_eq!(v.0, path.clone().into_bytes());
        // An id alone: the variable of that name when set.
        let (_, v) = read_secret("id=PATH").unwrap();
        assert_eq!(v.0, path.into_bytes());
        assert!(
            format!("{v:?}").contains("secret bytes"),
            "Debug hides the value"
        );
        for bad in [
            "src=/x",
            "id=a,type=ssh",
            "id=a,bogus=1",
            "id=a,flag",
            "id=a,env=STRATA_NO_SUCH_VAR_X",
        ] {
            assert!(read_secret(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn outputs_parse_both_syntaxes() {
        assert_eq!(
            parse_output("type=oci,dest=out.tar").unwrap(),
            ExportTarget::OciArchive {
                file: "out.tar".into(),
                tag: None
            }
        );
        assert_eq!(
            parse_output("type=docker,dest=d.tar,name=app:1").unwrap(),
            ExportTarget::DockerArchive {
                file: "d.tar".into(),
                name: Some("app:1".into())
            }
        );
        assert!(parse_output("type=registry").is_err());
        assert!(matches!(
            parse_output("oci:dir").unwrap(),
            ExportTarget::OciDir { .. }
        ));
    }

    #[test]
    fn submodule_urls_resolve_like_git() {
        let m = parse_gitmodules(
            "[submodule \"lib\"]\n\tpath = vendor/lib\n\turl = ../lib.git\n[submodule \"x\"]\n path = x\n url = https://h/x.git\n",
        );
        assert_eq!(m["vendor/lib"], "../lib.git");
        assert_eq!(m["x"], "https://h/x.git");
        assert_eq!(
            resolve_submodule_url("https://h/repos/org/app.git", "../lib.git"),
            "https://h/repos/org/lib.git"
        );
        assert_eq!(
            resolve_submodule_url("https://h/org/app", "https://g/y.git"),
            "https://g/y.git"
        );
    }

    #[test]
    fn key_values_need_keys() {
        assert!(key_values(&["=x".into()], "--label", false).is_err());
        assert!(key_values(&["x".into()], "--label", false).is_err());
        assert_eq!(
            key_values(&["a=b=c".into()], "--label", false).unwrap()["a"],
            "b=c"
        );
    }
}
