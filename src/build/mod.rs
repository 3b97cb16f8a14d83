//! The plan executor: runs a parsed Dockerfile's stages against the local store and produces
//! an image whose every byte is a function of its inputs.
//!
//! Inputs are passed in by the caller (the CLI reads environment, clock and flags): context
//! directory, Dockerfile text, build args, SOURCE_DATE_EPOCH, platform, compression. Only the
//! stages the target needs are built. Layers go straight from the tar writer into the store
//! (one pass: diff_id, compression, blob digest); the image is tagged only after every blob
//! is stored.

mod cache;
mod copy;
mod recipe;
mod run;
mod stage;

pub use recipe::build_recipe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::digest::Digest;
use crate::dockerfile::{self, Dockerfile, DockerfileError, Instruction, Stages};
use crate::image::Image;
use crate::layer::{FsTree, LayerError};
use crate::media::{Compression, Descriptor, Platform};
use crate::source::{Dockerignore, LocalContext, SourceError};
use crate::store::{Store, StoreError};

use stage::{StageState, execute_stage};

/// Build arguments every Dockerfile may receive without declaring them (BuildKit's
/// predefined ARGs); giving any other undeclared `--build-arg` is an error.
const PREDEFINED_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SOURCE_DATE_EPOCH",
];

/// Everything a build depends on, decided by the caller.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The context directory (for a git context, only a name: see `context_entries`).
    pub context: PathBuf,
    /// The context's files when they do not come from walking `context` (a git commit):
    /// already filtered by its `.dockerignore`.
    pub context_entries: Option<Vec<crate::layer::Entry>>,
    /// The Dockerfile's path (for `.dockerignore` lookup beside it).
    pub dockerfile_path: PathBuf,
    /// The Dockerfile's name for messages (`Dockerfile`, `App/Dockerfile`).
    pub dockerfile_name: String,
    /// The Dockerfile text.
    pub dockerfile: String,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target` stage.
    pub target: Option<String>,
    /// `--label` values, applied to the final image.
    pub labels: BTreeMap<String, String>,
    /// Target platform.
    pub platform: Platform,
    /// Layer compression.
    pub compression: Compression,
    /// Compression level (`None`: the algorithm's default).
    pub compression_level: Option<i32>,
    /// SOURCE_DATE_EPOCH: every timestamp in the image.
    pub source_date_epoch: i64,
    /// Worker threads for compression (output does not depend on it).
    pub threads: u32,
    /// `--no-cache`: build every layer again (results are still cached).
    pub no_cache: bool,
    /// `--no-cache-filter`: stages whose layers are built again.
    pub no_cache_filter: Vec<String>,
    /// `--secret` values by id, for `RUN --mount=type=secret`: never written to a layer, the
    /// cache key, the config or the history ([`crate::sandbox::SecretBytes`] hides them from
    /// `Debug`).
    pub secrets: BTreeMap<String, crate::sandbox::SecretBytes>,
    /// Stop the build when this is set (`None`: it runs to the end). See [`CancelToken`].
    pub cancel: Option<CancelToken>,
}

/// A build's stop switch: a shared flag the caller sets from another thread.
///
/// The build looks at it before every stage and step and before a RUN command starts, and
/// the sandbox watches it while the command runs (at least every
/// [`crate::sandbox::CANCEL_POLL`]): once set, the command's whole pid namespace is killed,
/// its directories are removed, nothing is cached for the step, and the build returns
/// [`BuildError::Cancelled`]. A download of base layers is dropped where it is (blobs are
/// committed only when complete), and a layer being written stops before its next file (its
/// temporary blob is dropped).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not set.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Ask the build to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The shared flag itself, for the sandbox and the git transport.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.0
    }
}

/// Progress of a build, for the CLI to render.
#[derive(Clone, Debug)]
pub enum Event {
    /// A step starts.
    Step {
        /// Sequence number (1-based) across the build.
        id: usize,
        /// Stage name (or index).
        stage: String,
        /// Position within the stage (1-based, the FROM is 1).
        index: usize,
        /// Number of steps in the stage.
        total: usize,
        /// The instruction as written.
        text: String,
    },
    /// A step finished.
    StepDone {
        /// Sequence number.
        id: usize,
        /// Whether its layer came from the cache.
        cached: bool,
        /// The layer it made, if any.
        layer: Option<Descriptor>,
        /// Wall time in milliseconds.
        millis: u64,
    },
    /// Something the user should know.
    Warning(String),
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct BuildOutput {
    /// The image.
    pub image: Image,
    /// Its manifest digest.
    pub digest: Digest,
    /// Layers reused from the cache (no tar, no compression).
    pub cache_hits: u64,
    /// Context files whose content had to be read to compute cache keys.
    pub files_hashed: u64,
    /// Every (cache key, layer) the build produced or reused, for `--cache-to`.
    pub cache_entries: Vec<(Digest, crate::store::CachedLayer)>,
}

/// Errors of a build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile is malformed, or a step failed (located at its line).
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the context failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Writing or reading a layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// Pulling a base image failed.
    #[error(transparent)]
    Transfer(#[from] crate::registry::TransferError),
    /// A problem with the build as a whole (target, build args).
    #[error("{0}")]
    Invalid(String),
    /// The build's [`CancelToken`] was set (a RUN command that was running was killed).
    #[error("the build was cancelled")]
    Cancelled,
}

/// Access to registries during a build: FROM a registry image, fetching base layers when a
/// step needs their files. The build itself is synchronous; it blocks on `handle`.
pub struct Remote {
    /// The registry client.
    pub client: crate::registry::Client,
    /// The runtime the client runs on (the build must not run on one of its threads).
    pub handle: tokio::runtime::Handle,
    /// Resolve registry references remotely even when the local store has the name
    /// (`--pull`).
    pub always_pull: bool,
}

/// What building a file-system view needs.
pub(crate) struct Fetch<'a> {
    pub store: &'a Store,
    pub work: &'a std::path::Path,
    pub remote: Option<&'a Remote>,
    /// A download stops (its temporary blob is dropped) when this is set.
    pub cancel: Option<&'a CancelToken>,
}

impl Fetch<'_> {
    /// Fetch the layers of `layers` the store lacks from the registries they live in (lazy
    /// bases); an error when there is no registry client.
    pub(crate) fn fetch_missing(&self, layers: &[crate::image::Layer]) -> Result<(), BuildError> {
        let missing: Vec<Descriptor> = layers
            .iter()
            .filter(|l| !self.store.has_blob(&l.descriptor.digest))
            .map(|l| l.descriptor.clone())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let remote = self.remote.ok_or_else(|| {
            BuildError::Invalid(
                "base layers live in a registry, but no registry client is configured".into(),
            )
        })?;
        let download = crate::registry::ensure_blobs(&remote.client, self.store, &missing);
        let Some(cancel) = self.cancel else {
            remote.handle.block_on(download)?;
            return Ok(());
        };
        // A cancel drops the download where it is: blobs are committed only when complete.
        let cancelled = async {
            while !cancel.is_cancelled() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        remote.handle.block_on(async {
            tokio::select! {
                r = download => r.map_err(BuildError::from),
                () = cancelled => Err(BuildError::Cancelled),
            }
        })
    }
}

/// Shared state of one build.
pub(crate) struct Ctx<'a> {
    pub store: &'a Store,
    pub remote: Option<&'a Remote>,
    pub opts: &'a BuildOptions,
    pub df: &'a Dockerfile,
    pub events: &'a mut dyn FnMut(Event),
    pub step_id: usize,
    pub work: tempfile::TempDir,
    context_tree: Option<FsTree>,
    /// Global ARG values (after FROM-scope expansion), for FROM lines and in-stage `ARG X`.
    pub global_args: BTreeMap<String, Option<String>>,
    /// Images named by `COPY --from=<image>`, loaded once.
    pub images: HashMap<String, StageState>,
    /// Content digests of context files by stat data.
    pub stat: crate::store::LoadingStatCache,
    /// The context directory (files under it go through the stat cache).
    pub context_dir: Option<PathBuf>,
    /// Layers reused from the cache.
    pub cache_hits: std::sync::atomic::AtomicU64,
    /// Every (cache key, layer) of this build, for `--cache-to`.
    pub used: std::sync::Mutex<Vec<(Digest, crate::store::CachedLayer)>>,
}

impl Ctx<'_> {
    /// Whether the build was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(CancelToken::is_cancelled)
    }

    /// [`BuildError::Cancelled`] when the build was asked to stop.
    pub fn check_cancelled(&self) -> Result<(), BuildError> {
        if self.is_cancelled() {
            Err(BuildError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// What views need to fetch layers.
    pub fn fetch(&self) -> Fetch<'_> {
        Fetch {
            store: self.store,
            work: self.work.path(),
            remote: self.remote,
            cancel: self.opts.cancel.as_ref(),
        }
    }

    /// The build context as a tree (walked once, honouring .dockerignore).
    pub fn context_tree(&mut self) -> Result<&FsTree, BuildError> {
        if self.context_tree.is_none() {
            let started = std::time::Instant::now();
            let mut entries = match &self.opts.context_entries {
                Some(e) => e.clone(),
                None => {
                    let ctx = LocalContext::open(&self.opts.context)?;
                    let ignore = Dockerignore::load(ctx.context_dir(), &self.opts.dockerfile_path)?;
                    ctx.entries(&ignore)?
                }
            };
            for e in &mut entries {
                e.mode = context_mode(e);
            }
            let mut tree = FsTree::new();
            tree.apply_entries(&entries)?;
            self.context_tree = Some(tree);
            tracing::debug!(millis = started.elapsed().as_millis(), "context walked");
        }
        Ok(self.context_tree.as_ref().expect("set above"))
    }

    /// A fresh spool directory for unpacked file content, removed with the build.
    pub fn spool_dir(&self) -> Result<PathBuf, BuildError> {
        let dir = tempfile::Builder::new()
            .prefix("spool-")
            .tempdir_in(self.work.path())
            .map_err(StoreError::Io)?;
        Ok(dir.keep())
    }
}

/// The mode a context file gets in the image: what git can record, so that a checkout's
/// umask never changes a digest. Directories 0755; files 0755 when the owner may execute them,
/// else 0644; symlinks 0777. Other bits (setuid, group write, …) come only from `--chmod`.
fn context_mode(e: &crate::layer::Entry) -> u32 {
    match e.kind {
        crate::layer::EntryKind::Dir => 0o755,
        crate::layer::EntryKind::Symlink { .. } => 0o777,
        crate::layer::EntryKind::File { .. } if e.mode & 0o100 != 0 => 0o755,
        crate::layer::EntryKind::File { .. } => 0o644,
    }
}

/// The automatic platform ARGs (`TARGETPLATFORM`, `BUILDARCH`, …).
fn platform_args(target: &Platform) -> BTreeMap<String, String> {
    let build = Platform::host();
    let mut m = BTreeMap::new();
    for (prefix, p) in [("TARGET", target), ("BUILD", &build)] {
        m.insert(format!("{prefix}PLATFORM"), p.to_string());
        m.insert(format!("{prefix}OS"), p.os.clone());
        m.insert(format!("{prefix}ARCH"), p.architecture.clone());
        m.insert(
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        );
    }
    m
}

/// Build the Dockerfile in `opts` into `store`. Every blob of the result is stored; tagging
/// it ([`Store::commit_image`]) is the caller's last step, after any export has succeeded.
pub fn build(
    store: &Store,
    remote: Option<&Remote>,
    opts: &BuildOptions,
    events: &mut dyn FnMut(Event),
) -> Result<BuildOutput, BuildError> {
    let df = dockerfile::parse(&opts.dockerfile, &opts.dockerfile_name)?;
    if let Some(s) = &df.syntax {
        events(Event::Warning(format!(
            "ignoring the syntax directive {s:?}: strata has its own Dockerfile front end"
        )));
    }
    let stages = df.stages()?;
    check_build_args(&stages, opts)?;
    let target = target_index(&stages, opts.target.as_deref())?;
    let mut ctx = prepare(store, remote, opts, &df, &stages, events)?;
    let needed = needed_stages(&stages, target, &ctx)?;
    let mut done: Vec<Option<StageState>> = (0..stages.stages.len()).map(|_| None).collect();
    for i in needed {
        ctx.check_cancelled()?;
        let state = execute_stage(&mut ctx, &stages, i, &mut done)?;
        done[i] = Some(state);
    }
    let last = done[target].take().expect("the target stage was built");
    finish(ctx, last)
}

/// The shared state of a build of `df`: global ARGs evaluated, caches loaded.
fn prepare<'a>(
    store: &'a Store,
    remote: Option<&'a Remote>,
    opts: &'a BuildOptions,
    df: &'a Dockerfile,
    stages: &Stages,
    events: &'a mut dyn FnMut(Event),
) -> Result<Ctx<'a>, BuildError> {
    // Global ARGs: defaults expanded against earlier global args and build args.
    let auto = platform_args(&opts.platform);
    let mut global_args: BTreeMap<String, Option<String>> = BTreeMap::new();
    for step in &stages.global_args {
        if let Instruction::Arg(args) = &step.instruction {
            for (name, default) in args {
                let value = match (opts.build_args.get(name), default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(
                        dockerfile::expand_word(d, df.escape, |k| {
                            lookup_global(&global_args, &auto, k)
                        })
                        .map_err(|e| df.error_at(&step.node, e))?,
                    ),
                    (None, None) => auto.get(name).cloned(),
                };
                global_args.insert(name.clone(), value);
            }
        }
    }
    Ok(Ctx {
        store,
        remote,
        opts,
        df,
        events,
        step_id: 0,
        work: store.temp_dir()?,
        context_tree: None,
        global_args,
        images: HashMap::new(),
        stat: crate::store::StatCache::load_in_background(store),
        context_dir: std::fs::canonicalize(&opts.context).ok(),
        cache_hits: std::sync::atomic::AtomicU64::new(0),
        used: std::sync::Mutex::new(Vec::new()),
    })
}

/// Turn the final stage into an image: labels, creation time, manifest and config stored.
fn finish(ctx: Ctx, mut last: StageState) -> Result<BuildOutput, BuildError> {
    let (store, opts) = (ctx.store, ctx.opts);
    for (k, v) in &opts.labels {
        last.config.set_label(k, v);
    }
    last.config
        .oci
        .set_created(Some(crate::image::rfc3339(opts.source_date_epoch)));
    let mut annotations = BTreeMap::new();
    if let Some((name, digest)) = &last.base {
        annotations.insert(
            "org.opencontainers.image.base.name".to_string(),
            name.clone(),
        );
        annotations.insert(
            "org.opencontainers.image.base.digest".to_string(),
            digest.to_string(),
        );
    }
    let image = Image::assemble_annotated(last.config.to_bytes(), &last.layers, &annotations)
        .map_err(StoreError::from)?;
    let stat = ctx.stat.into_inner();
    stat.save(store)?;
    store.put_bytes(&image.config_bytes)?;
    let digest = store.put_bytes(&image.manifest_bytes)?;
    Ok(BuildOutput {
        image,
        digest,
        cache_hits: ctx.cache_hits.into_inner(),
        files_hashed: stat.hashed,
        cache_entries: ctx.used.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

fn lookup_global(
    args: &BTreeMap<String, Option<String>>,
    auto: &BTreeMap<String, String>,
    k: &str,
) -> Option<String> {
    match args.get(k) {
        Some(v) => v.clone(),
        None => auto.get(k).cloned(),
    }
}

fn check_build_args(stages: &Stages, opts: &BuildOptions) -> Result<(), BuildError> {
    let mut declared = BTreeSet::new();
    let all = stages
        .global_args
        .iter()
        .chain(stages.stages.iter().flat_map(|s| s.steps.iter()));
    for step in all {
        if let Instruction::Arg(args) = &step.instruction {
            declared.extend(args.iter().map(|(n, _)| n.clone()));
        }
    }
    let unknown: Vec<&String> = opts
        .build_args
        .keys()
        .filter(|k| {
            !declared.contains(*k)
                && !PREDEFINED_ARGS.contains(&k.as_str())
                && !k.starts_with("BUILDKIT_")
        })
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(BuildError::Invalid(format!(
            "build arg{} {} given but not declared by any ARG in {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            opts.dockerfile_name
        )))
    }
}

fn target_index(stages: &Stages, target: Option<&str>) -> Result<usize, BuildError> {
    match target {
        None => Ok(stages.stages.len() - 1),
        Some(t) => stages
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(&t.to_lowercase()))
            .ok_or_else(|| {
                let names: Vec<&str> = stages
                    .stages
                    .iter()
                    .filter_map(|s| s.name.as_deref())
                    .collect();
                BuildError::Invalid(format!(
                    "target stage {t:?} not found (stages: {})",
                    if names.is_empty() {
                        "none named".to_string()
                    } else {
                        names.join(", ")
                    }
                ))
            }),
    }
}

/// The index of the stage a FROM or `--from` names, if it names one.
pub(crate) fn stage_ref(stages: &Stages, before: usize, name: &str) -> Option<usize> {
    let lower = name.to_lowercase();
    if let Some(i) = stages.stages[..before]
        .iter()
        .position(|s| s.name.as_deref() == Some(lower.as_str()))
    {
        return Some(i);
    }
    name.parse::<usize>().ok().filter(|i| *i < before)
}

/// The stages the target depends on, in build order.
fn needed_stages(stages: &Stages, target: usize, ctx: &Ctx) -> Result<Vec<usize>, BuildError> {
    let mut need = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if !need.insert(i) {
            continue;
        }
        let s = &stages.stages[i];
        let base = stage::expand_from(ctx, &s.from, &s.base)?;
        if let Some(j) = stage_ref(stages, i, &base) {
            todo.push(j);
        }
        for step in &s.steps {
            if let Instruction::Copy(c) = &step.instruction
                && let Some(from) = &c.from
                && let Some(j) = stage_ref(stages, i, from)
            {
                todo.push(j);
            }
            if let Instruction::Run(r) = &step.instruction {
                for from in run::mount_froms(r) {
                    if let Some(j) = stage_ref(stages, i, &from) {
                        todo.push(j);
                    }
                }
            }
        }
    }
    Ok(need.into_iter().collect())
}

/// Time a step and report it.
pub(crate) fn timed<T>(
    ctx: &mut Ctx,
    id: usize,
    f: impl FnOnce(&mut Ctx) -> Result<(T, Option<Descriptor>), BuildError>,
) -> Result<T, BuildError> {
    let start = Instant::now();
    let hits = ctx.cache_hits.load(std::sync::atomic::Ordering::Relaxed);
    let (v, layer) = f(ctx)?;
    let cached = ctx.cache_hits.load(std::sync::atomic::Ordering::Relaxed) > hits;
    (ctx.events)(Event::StepDone {
        id,
        cached,
        layer,
        millis: start.elapsed().as_millis() as u64,
    });
    Ok(v)
}
