//! One build stage: its base, its state (config, layers, file-system view) and the dispatch of
//! each instruction, with Docker's semantics for inheritance and expansion.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};

use super::copy::{self, CopySpec};
use super::{BuildError, Ctx, Event, stage_ref, timed};
use crate::dockerfile::{
    self, CommandForm, CopyArgs, Healthcheck, Instruction, Node, Stages, Step,
};
use crate::image::{ConfigFile, HealthConfig, Image, Layer, history};
use crate::layer::{Entry, FsTree, LayerWriter, open_decompressed};
use crate::media::{Descriptor, Platform};
use crate::source::{Dockerignore, normalize_context_path};
use crate::store::{Memo, Store, StoreError};

use super::Fetch;

/// Where a layer's entries can be recovered from, to rebuild a file-system view.
#[derive(Clone, Debug)]
enum LayerSource {
    /// A blob in the store (a base image layer).
    Store,
    /// Entries this build wrote.
    Entries(Arc<Vec<Entry>>),
}

/// The state of a stage: what its image would be if it ended here.
#[derive(Clone, Debug)]
pub(crate) struct StageState {
    /// Name for progress output.
    pub name: String,
    /// The config being built.
    pub config: ConfigFile,
    /// The layers so far, base first.
    pub layers: Vec<Layer>,
    sources: Vec<LayerSource>,
    /// The file-system view, and whether file content (not just metadata) is available.
    tree: Option<(FsTree, bool)>,
    /// Layers added since the view was built, applied to it when a step next needs it
    /// (most stages never look at their view again: a COPY into `FROM scratch` then costs no
    /// second pass over its entries).
    pending: Vec<Arc<Vec<Entry>>>,
    /// Whether the view leaves out base layers still in a registry (a lazy base): paths not
    /// in the view may then exist in the image.
    pub(super) partial: bool,
    /// Declared ARGs and their values.
    args: BTreeMap<String, Option<String>>,
    /// Whether CMD came from the base image (ENTRYPOINT then resets it, as Docker does).
    pub(super) cmd_inherited: bool,
    /// The SHELL for shell-form commands.
    shell: Vec<String>,
    /// The image this stage is based on (its name and resolved manifest digest), for the
    /// `org.opencontainers.image.base.*` annotations.
    pub(super) base: Option<(String, crate::digest::Digest)>,
}

impl StageState {
    fn scratch(platform: &Platform, epoch: i64) -> StageState {
        StageState {
            name: String::new(),
            config: ConfigFile::new(platform, epoch),
            layers: Vec::new(),
            sources: Vec::new(),
            tree: Some((FsTree::new(), true)),
            pending: Vec::new(),
            partial: false,
            args: BTreeMap::new(),
            cmd_inherited: false,
            shell: default_shell(),
            base: None,
        }
    }

    pub(super) fn from_image(image: &Image) -> Result<StageState, BuildError> {
        let layers = image.layers().map_err(StoreError::from)?;
        let shell = match image.config.extra.get("Shell") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => default_shell(),
        };
        Ok(StageState {
            name: String::new(),
            config: image.config.clone(),
            sources: vec![LayerSource::Store; layers.len()],
            layers,
            tree: None,
            pending: Vec::new(),
            partial: false,
            args: BTreeMap::new(),
            cmd_inherited: image.config.config().cmd().is_some(),
            shell,
            base: None,
        })
    }

    /// Make sure the file-system view exists (with content when `content`). Without content,
    /// base layers still in a registry are left out (the view is then partial) rather than
    /// downloaded; with content they are fetched first.
    pub(super) fn ensure_tree(&mut self, f: &Fetch, content: bool) -> Result<(), BuildError> {
        if matches!(self.tree, Some((_, c)) if c || !content) {
            let StageState { tree, pending, .. } = self;
            if let Some((tree, _)) = tree {
                for entries in pending.drain(..) {
                    tree.apply_entries(&entries)?;
                }
            }
            return Ok(());
        }
        // Rebuilt from every layer's source, the pending ones included.
        self.pending.clear();
        let (store, work) = (f.store, f.work);
        if content {
            // Only base layers can be missing: this build's own layers are in the store.
            let base: Vec<Layer> = self
                .layers
                .iter()
                .zip(&self.sources)
                .filter(|(_, s)| matches!(s, LayerSource::Store))
                .map(|(l, _)| l.clone())
                .collect();
            f.fetch_missing(&base)?;
        }
        let spool = if content {
            let dir = tempfile::Builder::new()
                .prefix("spool-")
                .tempdir_in(work)
                .map_err(StoreError::Io)?;
            Some(dir.keep())
        } else {
            None
        };
        let mut tree = FsTree::new();
        self.partial = false;
        for (layer, source) in self.layers.iter().zip(&self.sources) {
            match source {
                LayerSource::Store if !store.has_blob(&layer.descriptor.digest) => {
                    self.partial = true;
                }
                LayerSource::Store => {
                    let blob = store.open_blob(&layer.descriptor.digest)?;
                    let r = open_decompressed(BufReader::with_capacity(1 << 20, blob))?;
                    tree.apply_tar(r, spool.as_deref())?;
                }
                LayerSource::Entries(e) => tree.apply_entries(e)?,
            }
        }
        tracing::debug!(
            layers = self.layers.len(),
            content,
            partial = self.partial,
            "view built"
        );
        self.tree = Some((tree, content));
        Ok(())
    }

    /// Whether making the view (with content when `content`) from scratch reads or downloads
    /// layer blobs: then a step that only needs a result derived from the view asks the memo
    /// first (see [`Memo`]). Whether the view happens to be built already does not count, so
    /// a cold build writes the memos a rebuild looks for.
    pub(super) fn view_costly(&self, store: &Store, content: bool) -> bool {
        content
            || self.layers.iter().zip(&self.sources).any(|(l, s)| {
                matches!(s, LayerSource::Store) && store.has_blob(&l.descriptor.digest)
            })
    }

    /// What the view depends on: its layers' chain id (diff_ids name their content) and,
    /// for a view without content, which base layers it leaves out (those not in the store,
    /// see [`StageState::ensure_tree`]).
    pub(super) fn view_identity(&self, store: &Store, content: bool) -> String {
        let ids: Vec<crate::digest::Digest> = self.layers.iter().map(|l| l.diff_id).collect();
        let mut id = crate::image::chain_id(&ids)
            .map(|d| d.to_string())
            .unwrap_or_else(|| "empty".into());
        if !content {
            id.push(' ');
            for (l, s) in self.layers.iter().zip(&self.sources) {
                let left_out =
                    matches!(s, LayerSource::Store) && !store.has_blob(&l.descriptor.digest);
                id.push(if left_out { '-' } else { '+' });
            }
        }
        id
    }

    pub(super) fn tree(&self) -> &FsTree {
        &self.tree.as_ref().expect("ensure_tree was called").0
    }

    /// Look a variable up for expansion: ENV wins over ARG, as in Docker.
    pub(super) fn lookup(&self, key: &str) -> Option<String> {
        if let Some((_, v)) = self.config.env().into_iter().find(|(k, _)| k == key) {
            return Some(v);
        }
        self.args.get(key).cloned().flatten()
    }

    pub(super) fn workdir(&self) -> String {
        self.config
            .config()
            .working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".to_string())
    }

    /// Write `entries` as a new layer into the store and append it.
    pub(super) fn add_layer(
        &mut self,
        ctx: &Ctx,
        entries: Vec<Entry>,
        created_by: &str,
    ) -> Result<Descriptor, BuildError> {
        self.add_layer_memo(ctx, entries, created_by, None)
    }

    /// [`StageState::add_layer`], remembering the layer's cache key under `memo`.
    pub(super) fn add_layer_memo(
        &mut self,
        ctx: &Ctx,
        entries: Vec<Entry>,
        created_by: &str,
        memo: Option<crate::digest::Digest>,
    ) -> Result<Descriptor, BuildError> {
        let (descriptor, key) = self.add_layer_keyed(ctx, entries, created_by, None)?;
        if let Some(m) = memo {
            ctx.store.memo_put(&m, &Memo::Layer { key })?;
        }
        Ok(descriptor)
    }

    /// Append the layer cached under `key` (a RUN hit): nothing is written or executed.
    pub(super) fn push_cached(
        &mut self,
        ctx: &Ctx,
        key: crate::digest::Digest,
        hit: crate::store::CachedLayer,
        created_by: &str,
    ) -> Result<Descriptor, BuildError> {
        ctx.cache_hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, hit.clone()));
        self.config.push_layer(
            hit.diff_id,
            history(created_by, ctx.opts.source_date_epoch, false),
        );
        self.layers.push(Layer {
            descriptor: hit.descriptor.clone(),
            diff_id: hit.diff_id,
        });
        // The view is rebuilt from the stored blob when a later step needs it.
        self.sources.push(LayerSource::Store);
        self.tree = None;
        Ok(hit.descriptor)
    }

    /// The SHELL for shell-form commands.
    pub(super) fn shell_argv(&self) -> Vec<String> {
        self.shell.clone()
    }

    /// Write `entries` as a new layer under cache key `key` (or reuse the cached one);
    /// without a key, the entries' own ([`entries_key`]): looked up first when the cache is
    /// on, else computed on another thread while the layer is written. Returns the layer and
    /// its key.
    pub(super) fn add_layer_keyed(
        &mut self,
        ctx: &Ctx,
        entries: Vec<Entry>,
        created_by: &str,
        key: Option<crate::digest::Digest>,
    ) -> Result<(Descriptor, crate::digest::Digest), BuildError> {
        let opts = ctx.opts;
        let mtime = u64::try_from(opts.source_date_epoch).unwrap_or(0);
        let use_cache = !opts.no_cache && !opts.no_cache_filter.contains(&self.name);
        let key = match key {
            None if use_cache => {
                let started = std::time::Instant::now();
                let k = entries_key(ctx, &entries)?;
                tracing::debug!(millis = started.elapsed().as_millis(), "layer key");
                Some(k)
            }
            k => k,
        };
        let hit = match (use_cache, &key) {
            (true, Some(k)) => ctx.store.cache_get(k),
            _ => None,
        };
        let (layer, cached, key) = match hit {
            Some(hit) => (
                Layer {
                    descriptor: hit.descriptor,
                    diff_id: hit.diff_id,
                },
                true,
                key.expect("a hit has a key"),
            ),
            None => {
                // With the cache on, gzip blocks unchanged since the slot's last build are
                // copied from its blob rather than compressed again (same bytes either way).
                let slot = (use_cache && opts.compression == crate::media::Compression::Gzip)
                    .then(|| self.slot(created_by, opts));
                let reuse = slot
                    .as_ref()
                    .and_then(|s| ctx.store.block_reuse(s))
                    .map(std::sync::Arc::new);
                let writer = LayerWriter::new()
                    .compression(opts.compression)
                    .level(opts.compression_level)
                    .mtime(mtime)
                    .threads(opts.threads)
                    .block_reuse(slot.is_some(), reuse.clone())
                    .stop_on(opts.cancel.as_ref().map(|c| c.flag().clone()));
                let started = std::time::Instant::now();
                let blob_writer = ctx.store.blob_writer()?;
                let (stat, context_dir) = (&ctx.stat, ctx.context_dir.as_deref());
                let (written, key) = std::thread::scope(|s| {
                    let keying = key
                        .is_none()
                        .then(|| s.spawn(|| entries_key_with(opts, stat, context_dir, &entries)));
                    let written = writer.write_recorded(entries.clone(), blob_writer);
                    let key = match keying {
                        Some(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                        None => Ok(key.expect("a key was given")),
                    };
                    (written, key)
                });
                let (stats, blob, records) = written.map_err(|e| match e {
                    crate::layer::LayerError::Cancelled => BuildError::Cancelled,
                    e => e.into(),
                })?;
                let key = key?;
                let (digest, size) = blob.commit(None)?;
                let reused = reuse.map_or(0, |r| r.hits());
                tracing::debug!(
                    millis = started.elapsed().as_millis(),
                    %digest,
                    reused,
                    blocks = records.len(),
                    "layer written"
                );
                if let Some(slot) = &slot {
                    ctx.store.put_block_records(slot, &digest, &records)?;
                }
                let layer = Layer {
                    descriptor: Descriptor::new(opts.compression.oci_layer_type(), digest, size),
                    diff_id: stats.diff_id,
                };
                ctx.store.cache_put(
                    &key,
                    &crate::store::CachedLayer {
                        descriptor: layer.descriptor.clone(),
                        diff_id: layer.diff_id,
                    },
                )?;
                (layer, false, key)
            }
        };
        ctx.cache_hits
            .fetch_add(u64::from(cached), std::sync::atomic::Ordering::Relaxed);
        ctx.used.lock().unwrap_or_else(|p| p.into_inner()).push((
            key,
            crate::store::CachedLayer {
                descriptor: layer.descriptor.clone(),
                diff_id: layer.diff_id,
            },
        ));
        let descriptor = layer.descriptor.clone();
        self.config.push_layer(
            layer.diff_id,
            history(created_by, opts.source_date_epoch, false),
        );
        self.layers.push(layer);
        let entries = Arc::new(entries);
        if self.tree.is_some() {
            self.pending.push(entries.clone());
        }
        self.sources.push(LayerSource::Entries(entries));
        Ok((descriptor, key))
    }

    /// Where a layer about to be written on top of this stage's layers by `created_by` goes
    /// in the block-reuse cache: the next build of the same instruction on the same parents
    /// finds the blocks of this one.
    fn slot(&self, created_by: &str, opts: &super::BuildOptions) -> crate::digest::Digest {
        let mut h = crate::digest::Hasher::new();
        let mut field = |b: &[u8]| h.field(b);
        field(b"strata-slot-v1");
        for l in &self.layers {
            field(l.diff_id.as_bytes());
        }
        field(created_by.as_bytes());
        field(opts.compression.name().as_bytes());
        field(format!("{:?}", opts.compression_level).as_bytes());
        h.finish()
    }

    pub(super) fn metadata_step(&mut self, created_by: &str, epoch: i64) {
        self.config.push_history(history(created_by, epoch, true));
    }
}

/// The layer-cache key of `entries` written with the build's settings.
fn entries_key(ctx: &Ctx, entries: &[Entry]) -> Result<crate::digest::Digest, BuildError> {
    entries_key_with(ctx.opts, &ctx.stat, ctx.context_dir.as_deref(), entries)
}

fn entries_key_with(
    opts: &super::BuildOptions,
    stat: &crate::store::LoadingStatCache,
    context_dir: Option<&std::path::Path>,
    entries: &[Entry],
) -> Result<crate::digest::Digest, BuildError> {
    let settings = super::cache::WriterSettings {
        compression: opts.compression,
        level: opts.compression_level,
        mtime: u64::try_from(opts.source_date_epoch).unwrap_or(0),
        threads: opts.threads,
    };
    let mut stat = stat.lock();
    Ok(
        super::cache::layer_key(entries, &settings, &mut stat, context_dir)
            .map_err(StoreError::Io)?,
    )
}

/// Whether steps of `st` may use the memo: not when its layers are to be built again.
fn memo_on(ctx: &Ctx, st: &StageState) -> bool {
    !ctx.opts.no_cache && !ctx.opts.no_cache_filter.contains(&st.name)
}

/// A memo key: `kind` and `parts`, each length-prefixed.
fn memo_key(kind: &str, parts: &[&[u8]]) -> crate::digest::Digest {
    let mut h = crate::digest::Hasher::new();
    for b in std::iter::once(kind.as_bytes()).chain(parts.iter().copied()) {
        h.field(b);
    }
    h.finish()
}

fn default_shell() -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string()]
}

/// Expand a FROM line's image with the global ARGs.
pub(crate) fn expand_from(ctx: &Ctx, from: &Step, word: &str) -> Result<String, BuildError> {
    let auto = super::platform_args(&ctx.opts.platform);
    dockerfile::expand_word(word, ctx.df.escape, |k| {
        super::lookup_global(&ctx.global_args, &auto, k)
    })
    .map_err(|e| BuildError::from(ctx.df.error_at(&from.node, e)))
}

fn located(ctx: &Ctx, node: &Node, msg: impl std::fmt::Display) -> BuildError {
    BuildError::Dockerfile(ctx.df.error_at(node, msg))
}

/// Load an image named in FROM or `COPY --from`: `oci:DIR[:TAG]`, a local store name, or a
/// registry reference. A registry image costs its manifest and config only: layers stay in
/// the registry until a step needs their files, or a push to another registry needs them.
/// Names in the local store win unless `--pull` was given.
pub(super) fn load_image(
    ctx: &Ctx,
    name: &str,
    platform: &Platform,
) -> Result<(Image, String), String> {
    let store = ctx.store;
    if let Some(rest) = name.strip_prefix("oci:") {
        let (dir, tag) = crate::store::split_layout_spec(rest);
        return crate::store::import_oci_layout(store, &dir, tag.as_deref(), platform)
            .map(|i| (i, name.to_string()))
            .map_err(|e| e.to_string());
    }
    let reference = name.parse::<crate::registry::Reference>();
    if !ctx.remote.is_some_and(|r| r.always_pull) {
        let normalized = reference.as_ref().ok().map(ToString::to_string);
        for candidate in std::iter::once(name.to_string()).chain(normalized) {
            match store.resolve(&candidate) {
                Ok(desc) => {
                    return store
                        .image(&desc.digest)
                        .map(|i| (i, candidate.clone()))
                        .map_err(|e| e.to_string());
                }
                Err(StoreError::NotFound(_) | StoreError::Name(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    let r = reference.map_err(|e| e.to_string())?;
    let Some(remote) = ctx.remote else {
        return Err(format!(
            "image {name:?} is not in the local store (and no registry access is configured)"
        ));
    };
    remote
        .handle
        .block_on(crate::registry::pull_metadata(
            &remote.client,
            store,
            &r,
            platform,
        ))
        .map(|(image, _)| {
            let mut shown = r.clone();
            shown.digest = None;
            (image, shown.to_string())
        })
        .map_err(|e| format!("image {name:?} is not in the local store and pulling it failed: {e}"))
}

/// Run stage `i`. `done` holds the stages already built.
pub(crate) fn execute_stage(
    ctx: &mut Ctx,
    stages: &Stages,
    i: usize,
    done: &mut [Option<StageState>],
) -> Result<StageState, BuildError> {
    let stage = &stages.stages[i];
    let name = stage.name.clone().unwrap_or_else(|| i.to_string());
    let total = stage.steps.len() + 1;
    let epoch = ctx.opts.source_date_epoch;

    ctx.check_cancelled()?;
    ctx.step_id += 1;
    let id = ctx.step_id;
    (ctx.events)(Event::Step {
        id,
        stage: name.clone(),
        index: 1,
        total,
        text: one_line(&stage.from.node.original),
    });
    let base = expand_from(ctx, &stage.from, &stage.base)?;
    let mut state = timed(ctx, id, |ctx| {
        let s = if base.eq_ignore_ascii_case("scratch") {
            StageState::scratch(&ctx.opts.platform, epoch)
        } else if let Some(j) = stage_ref(stages, i, &base) {
            done[j].clone().expect("dependencies are built first")
        } else {
            let platform = match &stage.platform {
                Some(p) => expand_from(ctx, &stage.from, p)?
                    .parse::<Platform>()
                    .map_err(|m| located(ctx, &stage.from.node, m))?,
                None => ctx.opts.platform.clone(),
            };
            let (image, shown) =
                load_image(ctx, &base, &platform).map_err(|m| located(ctx, &stage.from.node, m))?;
            let mut s = StageState::from_image(&image)?;
            s.base = Some((shown, image.digest()));
            let arch = &image.config.oci.architecture().to_string();
            if *arch != ctx.opts.platform.architecture {
                (ctx.events)(Event::Warning(format!(
                    "base image {base} is {arch}, the target platform is {}",
                    ctx.opts.platform
                )));
            }
            s
        };
        Ok((s, None))
    })?;
    state.name = name.clone();
    state.args.clear();
    // As BuildKit and buildah do: a stage whose base sets no PATH (scratch included) gets the
    // default one in its config at FROM, so the image and `$PATH` in later steps have it.
    if *state.config.oci.os() != oci_spec::image::Os::Windows
        && !state.config.env().iter().any(|(k, _)| k == "PATH")
    {
        state.config.set_env("PATH", crate::sandbox::DEFAULT_PATH);
    }

    // A stage that runs commands needs its base layers anyway: fetch them before any step, so
    // that what WORKDIR and COPY add (missing directories) is decided on the full view in
    // every build. Otherwise the first build decides on a lazy view and later ones, after
    // RUN fetched the base, on the full one: other layers, other RUN cache keys, another
    // image digest from the same inputs.
    if stage
        .steps
        .iter()
        .any(|s| matches!(s.instruction, Instruction::Run(_)))
    {
        ctx.fetch().fetch_missing(&state.layers)?;
        if state.partial {
            state.tree = None;
        }
    }

    // ONBUILD triggers of the base run first, then are dropped from the new image.
    let triggers: Vec<String> = match state.config.extra.remove("OnBuild") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    for t in triggers {
        let text = format!("FROM scratch\n{t}\n");
        let df = dockerfile::parse(&text, &format!("ONBUILD trigger of {base}"))?;
        for step in df.stages()?.stages.remove(0).steps {
            ctx.check_cancelled()?;
            dispatch(ctx, stages, i, done, &mut state, &step, &df)?;
        }
    }

    for (n, step) in stage.steps.iter().enumerate() {
        ctx.check_cancelled()?;
        ctx.step_id += 1;
        let id = ctx.step_id;
        (ctx.events)(Event::Step {
            id,
            stage: name.clone(),
            index: n + 2,
            total,
            text: one_line(&step.node.original),
        });
        let df = ctx.df;
        timed(ctx, id, |ctx| {
            let layer = dispatch(ctx, stages, i, done, &mut state, step, df)?;
            Ok(((), layer))
        })?;
    }
    Ok(state)
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn format_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

/// Execute one instruction. Returns the layer it made, if any.
fn dispatch(
    ctx: &mut Ctx,
    stages: &Stages,
    i: usize,
    done: &mut [Option<StageState>],
    st: &mut StageState,
    step: &Step,
    df: &dockerfile::Dockerfile,
) -> Result<Option<Descriptor>, BuildError> {
    let node = &step.node;
    let epoch = ctx.opts.source_date_epoch;
    let err = |m: String| BuildError::Dockerfile(df.error_at(node, m));
    let expand = |st: &StageState, w: &str| -> Result<String, BuildError> {
        dockerfile::expand_word(w, df.escape, |k| st.lookup(k))
            .map_err(|e| BuildError::Dockerfile(df.error_at(node, e)))
    };
    let expand_words = |st: &StageState, w: &str| -> Result<Vec<String>, BuildError> {
        dockerfile::expand_words(w, df.escape, |k| st.lookup(k))
            .map_err(|e| BuildError::Dockerfile(df.error_at(node, e)))
    };
    match &step.instruction {
        Instruction::From { .. } => unreachable!("FROM starts a stage"),
        Instruction::Run(run) => {
            // ARG values reach RUN's environment (not the image config); ENV wins.
            let mut env: Vec<(String, String)> = st
                .args
                .iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
                .filter(|(k, _)| !st.config.env().iter().any(|(e, _)| e == k))
                .collect();
            env.extend(st.config.env());
            // A Windows base may leave PATH to the OS; a Linux RUN still needs one.
            if !env.iter().any(|(k, _)| k == "PATH") {
                env.push(("PATH".into(), crate::sandbox::DEFAULT_PATH.into()));
            }
            let user = current_user_ids(ctx, st).map_err(&err)?;
            let user = (
                u32::try_from(user.0).map_err(|_| err("uid out of range".into()))?,
                u32::try_from(user.1).map_err(|_| err("gid out of range".into()))?,
            );
            let created_by = format!("{} # strata", one_line(&node.original));
            let mounts = super::run::parse_mounts(run, |w| {
                dockerfile::expand_word(w, df.escape, |k| st.lookup(k)).map_err(|e| e.to_string())
            })
            .map_err(&err)?;
            let refs = super::run::StageRefs {
                stages,
                index: i,
                done,
            };
            let d = super::run::run_step(ctx, refs, st, run, mounts, &created_by, env, user)
                .map_err(|e| match e {
                    super::run::StepError::Cancelled => BuildError::Cancelled,
                    super::run::StepError::Failed(m) => err(m),
                })?;
            Ok(Some(d))
        }
        Instruction::Arg(args) => {
            let mut shown = Vec::new();
            for (name, default) in args {
                let value = match (ctx.opts.build_args.get(name), default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(expand(st, d)?),
                    (None, None) => ctx
                        .global_args
                        .get(name)
                        .cloned()
                        .flatten()
                        .or_else(|| super::platform_args(&ctx.opts.platform).get(name).cloned()),
                };
                shown.push(match &value {
                    Some(v) => format!("{name}={v}"),
                    None => name.clone(),
                });
                st.args.insert(name.clone(), value);
            }
            st.metadata_step(&format!("ARG {}", shown.join(" ")), epoch);
            Ok(None)
        }
        Instruction::Env(pairs) => {
            let mut expanded = Vec::new();
            for (k, v) in pairs {
                expanded.push((expand(st, k)?, expand(st, v)?));
            }
            for (k, v) in &expanded {
                st.config.set_env(k, v);
            }
            let shown: Vec<String> = expanded.iter().map(|(k, v)| format!("{k}={v}")).collect();
            st.metadata_step(&format!("ENV {}", shown.join(" ")), epoch);
            Ok(None)
        }
        Instruction::Label(pairs) => {
            let mut shown = Vec::new();
            for (k, v) in pairs {
                let (k, v) = (expand(st, k)?, expand(st, v)?);
                st.config.set_label(&k, &v);
                shown.push(format!("{k}={v}"));
            }
            st.metadata_step(&format!("LABEL {}", shown.join(" ")), epoch);
            Ok(None)
        }
        Instruction::Maintainer(m) => {
            st.config.oci.set_author(Some(m.clone()));
            st.config.set_label("maintainer", m);
            st.metadata_step(&format!("MAINTAINER {m}"), epoch);
            Ok(None)
        }
        Instruction::User(u) => {
            let u = expand(st, u)?;
            st.config.update_config(|c| {
                c.set_user(Some(u.clone()));
            });
            st.metadata_step(&format!("USER {u}"), epoch);
            Ok(None)
        }
        Instruction::Expose(words) => {
            let mut ports = Vec::new();
            for w in words {
                for p in expand_words(st, w)? {
                    ports.extend(parse_ports(&p).map_err(err)?);
                }
            }
            for p in &ports {
                st.config.add_exposed_port(p);
            }
            let shown: Vec<String> = ports.iter().map(|p| format!("{p}:{{}}")).collect();
            st.metadata_step(&format!("EXPOSE map[{}]", shown.join(" ")), epoch);
            Ok(None)
        }
        Instruction::Volume(words) => {
            let mut vols = Vec::new();
            for w in words {
                let v = expand(st, w)?;
                if v.is_empty() {
                    return Err(err("VOLUME specified can not be an empty string".into()));
                }
                vols.push(v);
            }
            for v in &vols {
                st.config.add_volume(v);
            }
            st.metadata_step(&format!("VOLUME {}", format_list(&vols)), epoch);
            Ok(None)
        }
        Instruction::StopSignal(s) => {
            let s = expand(st, s)?;
            if !valid_signal(&s) {
                return Err(err(format!("invalid signal {s:?}")));
            }
            st.config.update_config(|c| {
                c.set_stop_signal(Some(s.clone()));
            });
            st.metadata_step(&format!("STOPSIGNAL {s}"), epoch);
            Ok(None)
        }
        Instruction::Shell(v) => {
            st.shell = v.clone();
            st.config.set_extra("Shell", Some(json!(v)));
            st.metadata_step(&format!("SHELL {}", format_list(v)), epoch);
            Ok(None)
        }
        Instruction::Entrypoint(form) | Instruction::Cmd(form) => {
            let is_cmd = matches!(step.instruction, Instruction::Cmd(_));
            let argv = match form {
                CommandForm::Exec(v) => v.clone(),
                CommandForm::Shell(s) => {
                    let mut v = st.shell.clone();
                    v.push(s.clone());
                    v
                }
            };
            let shown = format_list(&argv);
            let inherited = st.cmd_inherited;
            st.config.update_config(|c| {
                if is_cmd {
                    c.set_cmd(Some(argv));
                } else {
                    c.set_entrypoint(Some(argv));
                    if inherited {
                        c.set_cmd(None);
                    }
                }
            });
            if is_cmd || inherited {
                st.cmd_inherited = false;
            }
            let kw = if is_cmd { "CMD" } else { "ENTRYPOINT" };
            st.metadata_step(&format!("{kw} {shown}"), epoch);
            Ok(None)
        }
        Instruction::Healthcheck(h) => {
            let cfg = match h {
                Healthcheck::None => HealthConfig {
                    test: vec!["NONE".to_string()],
                    ..HealthConfig::default()
                },
                Healthcheck::Cmd(c) => HealthConfig {
                    test: match &c.test {
                        CommandForm::Exec(v) => std::iter::once("CMD".to_string())
                            .chain(v.iter().cloned())
                            .collect(),
                        CommandForm::Shell(s) => vec!["CMD-SHELL".to_string(), s.clone()],
                    },
                    interval: c.interval,
                    timeout: c.timeout,
                    start_period: c.start_period,
                    start_interval: c.start_interval,
                    retries: u64::from(c.retries),
                },
            };
            st.config.set_extra(
                "Healthcheck",
                Some(serde_json::to_value(&cfg).expect("health config serialises")),
            );
            st.metadata_step(&format!("HEALTHCHECK {}", format_list(&cfg.test)), epoch);
            Ok(None)
        }
        Instruction::Onbuild(trigger) => {
            let mut list = match st.config.extra.get("OnBuild") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            list.push(Value::String(trigger.clone()));
            st.config.set_extra("OnBuild", Some(Value::Array(list)));
            st.metadata_step(&format!("ONBUILD {trigger}"), epoch);
            Ok(None)
        }
        Instruction::Workdir(w) => {
            let w = expand(st, w)?;
            let path = if w.starts_with('/') {
                copy::clean(&w)
            } else {
                copy::clean(&format!("{}/{w}", st.workdir()))
            };
            let abs = format!("/{}", path.display());
            st.config.update_config(|c| {
                c.set_working_dir(Some(abs.clone()));
            });
            // The missing directories depend only on the view: remembered by its identity,
            // so a rebuild does not read the base layers again.
            let memo = (memo_on(ctx, st) && st.view_costly(ctx.store, false)).then(|| {
                memo_key(
                    "strata-memo-workdir-v1",
                    &[
                        st.view_identity(ctx.store, false).as_bytes(),
                        path.as_os_str().as_bytes(),
                    ],
                )
            });
            let dirs = match memo.as_ref().and_then(|k| ctx.store.memo_get(k)) {
                Some(Memo::Dirs { dirs }) => dirs,
                _ => {
                    st.ensure_tree(&ctx.fetch(), false)?;
                    let real = st.tree().resolve_lenient(&path, true)?;
                    let mut dirs = Vec::new();
                    let mut cur = PathBuf::new();
                    // On a lazy base, a directory not in the view may exist in the base: leave
                    // it to the runtime (runc creates a missing working directory) rather than
                    // download the base or override its metadata.
                    if !st.partial {
                        for c in real.components() {
                            cur.push(c);
                            if st.tree().get(&cur).is_none() {
                                dirs.push(cur.clone());
                            }
                        }
                    }
                    if let Some(k) = &memo {
                        ctx.store.memo_put(k, &Memo::Dirs { dirs: dirs.clone() })?;
                    }
                    dirs
                }
            };
            let mut missing: Vec<Entry> = dirs
                .into_iter()
                .map(|d| Entry::dir(d, 0o755, 0, 0))
                .collect();
            if !missing.is_empty() {
                let (uid, gid) = current_user_ids(ctx, st).map_err(err)?;
                for e in &mut missing {
                    (e.uid, e.gid) = (uid, gid);
                }
            }
            if missing.is_empty() {
                st.metadata_step(&format!("WORKDIR {abs}"), epoch);
                Ok(None)
            } else {
                Ok(Some(st.add_layer(
                    ctx,
                    missing,
                    &format!("WORKDIR {abs}"),
                )?))
            }
        }
        Instruction::Copy(c) | Instruction::Add(c) => {
            let is_add = matches!(step.instruction, Instruction::Add(_));
            copy_step(ctx, stages, i, done, st, step, df, c, is_add)
        }
    }
}

/// The (uid, gid) the stage's USER maps to, for directories WORKDIR creates.
fn current_user_ids(ctx: &Ctx, st: &mut StageState) -> Result<(u64, u64), String> {
    let user = st.config.config().user().clone().unwrap_or_default();
    if user.is_empty() {
        return Ok((0, 0));
    }
    resolve_owner(ctx, st, &user, true)
}

/// Resolve `user[:group]` to ids against the stage's /etc/passwd and /etc/group.
/// With `primary_gid`, a user without a group gets its passwd group (USER semantics);
/// otherwise the gid equals the uid (`--chown` semantics, as Docker documents).
pub(super) fn resolve_owner(
    ctx: &Ctx,
    st: &mut StageState,
    spec: &str,
    primary_gid: bool,
) -> Result<(u64, u64), String> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let numeric = |s: &str| s.parse::<u64>().ok();
    let needs_lookup = numeric(u).is_none()
        || g.is_some_and(|g| numeric(g).is_none())
        || (primary_gid && g.is_none());
    if needs_lookup {
        // The ids depend only on the view's content: remembered by its chain id, so a
        // rebuild does not unpack the base to read /etc/passwd again.
        let memo = (memo_on(ctx, st) && st.view_costly(ctx.store, true)).then(|| {
            memo_key(
                "strata-memo-owner-v1",
                &[
                    st.view_identity(ctx.store, true).as_bytes(),
                    spec.as_bytes(),
                    &[u8::from(primary_gid)],
                ],
            )
        });
        if let Some(Memo::Owner { uid, gid }) = memo.as_ref().and_then(|k| ctx.store.memo_get(k)) {
            return Ok((uid, gid));
        }
        st.ensure_tree(&ctx.fetch(), true)
            .map_err(|e| e.to_string())?;
        let (uid, gid) = lookup_owner(st, u, g, primary_gid)?;
        if let Some(k) = &memo {
            ctx.store
                .memo_put(k, &Memo::Owner { uid, gid })
                .map_err(|e| e.to_string())?;
        }
        return Ok((uid, gid));
    }
    lookup_owner(st, u, g, primary_gid)
}

/// [`resolve_owner`] against the view (built with content when a name or primary group is
/// looked up).
fn lookup_owner(
    st: &StageState,
    u: &str,
    g: Option<&str>,
    primary_gid: bool,
) -> Result<(u64, u64), String> {
    let numeric = |s: &str| s.parse::<u64>().ok();
    let (uid, user_gid) = match numeric(u) {
        Some(n) => {
            let gid = if primary_gid {
                passwd_gid_for_uid(st.tree(), n).unwrap_or(n)
            } else {
                n
            };
            (n, gid)
        }
        None => {
            let user = st
                .tree()
                .lookup_user(u)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("unable to find user {u:?} in the image's /etc/passwd"))?;
            (user.uid, if primary_gid { user.gid } else { user.uid })
        }
    };
    let gid = match g {
        None => user_gid,
        Some(g) => match numeric(g) {
            Some(n) => n,
            None => st
                .tree()
                .lookup_group(g)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("unable to find group {g:?} in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn passwd_gid_for_uid(tree: &FsTree, uid: u64) -> Option<u64> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut tree.open("etc/passwd").ok()?, &mut text).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[2].parse::<u64>().ok() == Some(uid)).then(|| f[3].parse().ok())?
    })
}

#[allow(clippy::too_many_arguments)]
fn copy_step(
    ctx: &mut Ctx,
    stages: &Stages,
    i: usize,
    done: &mut [Option<StageState>],
    st: &mut StageState,
    step: &Step,
    df: &dockerfile::Dockerfile,
    c: &CopyArgs,
    is_add: bool,
) -> Result<Option<Descriptor>, BuildError> {
    let node = &step.node;
    let err = |m: String| BuildError::Dockerfile(df.error_at(node, m));
    let kw = if is_add { "ADD" } else { "COPY" };
    let expand = |st: &StageState, w: &str| -> Result<String, BuildError> {
        dockerfile::expand_word(w, df.escape, |k| st.lookup(k))
            .map_err(|e| BuildError::Dockerfile(df.error_at(node, e)))
    };
    if c.parents {
        return Err(err(format!("{kw} --parents is not supported yet")));
    }
    let mut sources = Vec::new();
    for s in &c.sources {
        let s = expand(st, s)?;
        if is_add && (s.contains("://") || s.starts_with("git@")) {
            return Err(err(format!(
                "ADD from a URL ({s}) is not supported yet; download it in an earlier step or COPY a local file"
            )));
        }
        sources.push(s);
    }
    if c.checksum.is_some() {
        return Err(err(
            "ADD --checksum is only valid for URL sources".to_string()
        ));
    }
    let dest_word = expand(st, &c.dest)?;
    let dest = if dest_word.starts_with('/') {
        dest_word.clone()
    } else {
        let wd = st.workdir();
        format!("{}/{dest_word}", wd.trim_end_matches('/'))
    };
    let chown = match &c.chown {
        Some(spec) => {
            let spec = expand(st, spec)?;
            Some(resolve_owner(ctx, st, &spec, false).map_err(err)?)
        }
        None => None,
    };
    let chmod = match &c.chmod {
        Some(m) => {
            let m = expand(st, m)?;
            Some(
                u32::from_str_radix(&m, 8)
                    .ok()
                    .filter(|v| *v <= 0o7777)
                    .ok_or_else(|| {
                        err(format!(
                            "invalid --chmod {m:?}: expected an octal mode such as 0755"
                        ))
                    })?,
            )
        }
        None => None,
    };
    let mut exclude_words = Vec::new();
    for e in &c.exclude {
        exclude_words.push(expand(st, e)?);
    }
    let exclude = Dockerignore::from_patterns(&exclude_words).map_err(|e| err(e.to_string()))?;
    let mut heredocs = Vec::new();
    for h in &c.heredocs {
        let body = if h.expand {
            dockerfile::expand_heredoc(&h.content, df.escape, |k| st.lookup(k))
                .map_err(|e| err(e.to_string()))?
        } else {
            h.content.clone()
        };
        heredocs.push((h.name.clone(), body.into_bytes()));
    }
    let from = match &c.from {
        Some(f) => Some(expand(st, f)?),
        None => None,
    };
    if from.is_none() {
        for s in &mut sources {
            *s = normalize_context_path(s).map_err(|e| err(e.to_string()))?;
        }
    }
    let mut spec = CopySpec {
        sources,
        heredocs,
        dest,
        chown,
        chmod,
        exclude,
        extract_archives: is_add && c.unpack != Some(false),
        keep_owner: from.is_some(),
        dest_partial: false,
    };
    let created_by = format!("{} # strata", one_line(&node.original));
    if let Some(f) = &from
        && stage_ref(stages, i, f).is_none()
        && !ctx.images.contains_key(f)
    {
        let (image, _) = load_image(ctx, f, &ctx.opts.platform).map_err(&err)?;
        let s = StageState::from_image(&image)?;
        ctx.images.insert(f.clone(), s);
    }
    let memo = copy_memo(
        ctx,
        stages,
        i,
        done,
        st,
        &mut spec,
        from.as_deref(),
        &exclude_words,
    )?;
    if let Some(k) = &memo
        && let Some(Memo::Layer { key }) = ctx.store.memo_get(k)
        && let Some(hit) = ctx.store.cache_get(&key)
    {
        return Ok(Some(st.push_cached(ctx, key, hit, &created_by)?));
    }
    st.ensure_tree(&ctx.fetch(), false)?;
    spec.dest_partial = st.partial;
    let spool = ctx.spool_dir()?;
    let entries = match &from {
        None => {
            let src = ctx.context_tree()?;
            copy::plan(&spec, src, st.tree(), &spool)
        }
        Some(f) => {
            spec.extract_archives = false;
            if let Some(j) = stage_ref(stages, i, f) {
                let other = done[j].as_mut().expect("dependencies are built first");
                other.ensure_tree(&ctx.fetch(), true)?;
                copy::plan(&spec, other.tree(), st.tree(), &spool)
            } else {
                let (store, work, remote) = (ctx.store, ctx.work.path().to_path_buf(), ctx.remote);
                let fetch = Fetch {
                    store,
                    work: &work,
                    remote,
                    cancel: ctx.opts.cancel.as_ref(),
                };
                let other = ctx.images.get_mut(f).expect("inserted above");
                other.ensure_tree(&fetch, true)?;
                copy::plan(&spec, other.tree(), st.tree(), &spool)
            }
        }
    }
    .map_err(|e| err(format!("{kw} failed: {e}")))?;
    Ok(Some(st.add_layer_memo(ctx, entries, &created_by, memo)?))
}

/// The memo key of a COPY/ADD whose views are costly to make (see
/// [`StageState::view_costly`]): the destination view's identity, the source's (a stage's or
/// image's chain id; for the context, the layer key of the sources planned onto an empty
/// view, which names every selected file and its content), the expanded step and the writer
/// settings. Everything the layer's entries are a function of, so the layer cached for it is
/// the step's result. `None` when the views are cheap (nothing to save) or the sources cannot
/// be planned on their own; the step then runs as usual.
#[allow(clippy::too_many_arguments)]
fn copy_memo(
    ctx: &mut Ctx,
    stages: &Stages,
    i: usize,
    done: &[Option<StageState>],
    st: &StageState,
    spec: &mut CopySpec,
    from: Option<&str>,
    exclude: &[String],
) -> Result<Option<crate::digest::Digest>, BuildError> {
    if !memo_on(ctx, st) {
        return Ok(None);
    }
    let dest_costly = st.view_costly(ctx.store, false);
    let source = match from {
        Some(f) => {
            let other = match stage_ref(stages, i, f) {
                Some(j) => done[j].as_ref(),
                None => ctx.images.get(f),
            };
            let Some(other) = other else { return Ok(None) };
            if !dest_costly && !other.view_costly(ctx.store, true) {
                return Ok(None);
            }
            format!("from {}", other.view_identity(ctx.store, true))
        }
        None => {
            if !dest_costly {
                return Ok(None);
            }
            let spool = ctx.spool_dir()?;
            let src = ctx.context_tree()?;
            spec.dest_partial = true;
            let planned = copy::plan(spec, src, &FsTree::new(), &spool);
            spec.dest_partial = false;
            let Ok(entries) = planned else {
                return Ok(None);
            };
            format!("context {}", entries_key(ctx, &entries)?)
        }
    };
    let opts = ctx.opts;
    let mut parts: Vec<Vec<u8>> = vec![
        st.view_identity(ctx.store, false).into_bytes(),
        source.into_bytes(),
        spec.dest.clone().into_bytes(),
        format!(
            "{:?} {:?} {} {}",
            spec.chown, spec.chmod, spec.extract_archives, spec.keep_owner
        )
        .into_bytes(),
        format!(
            "{} {:?} {}",
            opts.compression.name(),
            opts.compression_level,
            opts.source_date_epoch
        )
        .into_bytes(),
    ];
    parts.push(format!("{} sources", spec.sources.len()).into_bytes());
    parts.extend(spec.sources.iter().map(|s| s.clone().into_bytes()));
    parts.push(format!("{} heredocs", spec.heredocs.len()).into_bytes());
    for (name, body) in &spec.heredocs {
        parts.push(name.clone().into_bytes());
        parts.push(body.clone());
    }
    parts.push(format!("{} excludes", exclude.len()).into_bytes());
    parts.extend(exclude.iter().map(|s| s.clone().into_bytes()));
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(Some(memo_key("strata-memo-copy-v1", &refs)))
}

/// `80`, `80/udp`, `8000-8002/tcp` → normalised `port/proto` entries.
pub(super) fn parse_ports(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid EXPOSE protocol {proto:?} in {spec:?}"));
    }
    let num = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("invalid port {s:?} in EXPOSE {spec:?}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let p = num(ports)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("invalid port range {spec:?}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
        "PIPE", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
        "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    NAMES.contains(&name) || name.starts_with("RTMIN") || name.starts_with("RTMAX")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_normalise() {
        assert_eq!(parse_ports("5005").unwrap(), vec!["5005/tcp"]);
        assert_eq!(parse_ports("53/UDP").unwrap(), vec!["53/udp"]);
        assert_eq!(
            parse_ports("8000-8002").unwrap(),
            vec!["8000/tcp", "8001/tcp", "8002/tcp"]
        );
        assert!(parse_ports("http").is_err());
        assert!(parse_ports("80/xyz").is_err());
    }

    #[test]
    fn signals() {
        assert!(valid_signal("SIGTERM"));
        assert!(valid_signal("9"));
        assert!(!valid_signal("SIGNOPE"));
    }
}
