//! RUN: execute a step in the rootless sandbox on a snapshot of the stage's file system and
//! turn what it changed into a layer.
//!
//! The step's root is the stage's layers stacked as overlay lowers (each unpacked once into
//! the snapshot store, see [`lowers`]), the command runs on top, and the overlay
//! upper (whiteouts and opaque directories included) becomes the layer. The cache key is
//! computed before running: the parent chain id, the command (heredoc bodies included),
//! environment, user, working directory, network, the writer settings, and each mount's
//! identity, so a hit reuses the layer without executing anything.
//!
//! Decisions taken from BuildKit (the `docker build` front end) where the issue is silent:
//! - **Heredocs**: `RUN <<EOF` alone runs the body with the stage's shell (`sh -c BODY`); a body
//!   starting with `#!` becomes an executable file mounted read-only at `/dev/pipes/<NAME>` and
//!   run through the shell; any other form (`RUN python3 <<EOF`, several heredocs, a command
//!   around them) hands the command line, each body and its delimiter back to the shell, which
//!   then does the redirection and expansion itself (so a quoted delimiter means no expansion).
//!   strata never expands a RUN heredoc body (BuildKit does not either).
//! - **Mount identities in the cache key**: type, target, read-only flag, and for binds the
//!   source path plus the content of what is bound (the context subtree's file digests, or the
//!   from-stage's/image's chain id); for caches the id, sharing, mode, uid, gid and the `from`
//!   identity; for tmpfs the size; for secrets the id, target, mode, uid, gid and env name —
//!   never the secret's bytes. A cache mount's content is not in the key (it is a cache).
//! - **Mount points** a step needs but the image lacks are made in a layer below the overlay
//!   upper, so they never reach the layer (BuildKit removes the empty ones it created).
//! - A missing secret without `required` leaves the mount out, as BuildKit does; a secret with
//!   `env=` and no `target` is only a variable.
//! - **Binds** get a private copy of the subtree (the context as COPY sees it, `.dockerignore`
//!   applied; or the stage's/image's files), so `rw` writes are thrown away as in BuildKit.
//! - **Cache ids** are namespaced by the `BUILDKIT_CACHE_MOUNT_NS` build arg, as in BuildKit; a
//!   cache with `from` starts as a copy of that subtree.
//!
//! **Cancellation** ([`super::CancelToken`]): a step whose cache key hits still completes (it
//! runs nothing); otherwise the token is checked before the command starts and the sandbox
//! watches it while the command runs. A cancelled step kills the run's pid namespace, removes
//! its directories (upper, overlay work, mount copies) and writes nothing to the cache.

use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Ctx;
use super::stage::StageState;
use crate::digest::{Digest, Hasher};
use crate::dockerfile::{CommandForm, MountType, Run, RunMount, Sharing, Stages};
use crate::layer::{Entry, EntryKind, open_decompressed};
use crate::media::Descriptor;
use crate::sandbox::{
    Mount, Network, RunSpec, RunStatus, Sandbox, SecretBytes, unpack_layer, unpack_layer_dir,
    upper_to_entries,
};
use crate::store::MountLock;

/// Where the heredoc script of `RUN <<EOF` with a `#!` line is mounted (BuildKit's path).
const PIPES: &str = "/dev/pipes";

/// The stage being built and the ones before it, for `--mount=from=<stage>`.
pub(super) struct StageRefs<'a> {
    pub stages: &'a Stages,
    pub index: usize,
    pub done: &'a mut [Option<StageState>],
}

/// Clean absolute form of a mount target, relative ones taken from the working directory.
fn abs_target(target: &str, workdir: &str) -> Result<String, String> {
    let joined = if target.starts_with('/') {
        target.to_string()
    } else {
        format!("{}/{target}", workdir.trim_end_matches('/'))
    };
    let clean = super::copy::clean(&joined);
    let abs = format!("/{}", clean.display());
    if abs == "/" {
        return Err(format!("invalid mount target {target:?}"));
    }
    Ok(abs)
}

/// Write `entries` (paths relative to the root) under `dest`. Owners are kept when running
/// as root; directory modes are applied last so read-only directories can still be filled.
fn materialize(entries: &[Entry], dest: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut dirs = Vec::new();
    for e in sorted {
        let path = dest.join(&e.path);
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent).map_err(io)?;
        }
        match &e.kind {
            EntryKind::Dir => {
                if !path.is_dir() {
                    fs_err::create_dir(&path).map_err(io)?;
                }
                fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .map_err(io)?;
                dirs.push((path.clone(), e.mode));
            }
            EntryKind::File { source, .. } => {
                let mut r = source.open().map_err(io)?;
                let mut w = fs_err::File::create(&path).map_err(io)?;
                std::io::copy(&mut r, &mut w).map_err(io)?;
                fs_err::set_permissions(&path, std::fs::Permissions::from_mode(e.mode & 0o7777))
                    .map_err(io)?;
            }
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path)
                    .map_err(|err| format!("{err}: {}", path.display()))?;
            }
        }
        if root {
            std::os::unix::fs::lchown(&path, Some(e.uid as u32), Some(e.gid as u32))
                .map_err(|err| format!("{err}: {}", path.display()))?;
        }
    }
    for (dir, mode) in dirs.iter().rev() {
        fs_err::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io)?;
    }
    Ok(())
}

/// The stage or image `--mount=from=` names.
fn from_state<'s>(
    ctx: &'s mut Ctx,
    stages: &'s mut StageRefs,
    f: &str,
) -> Result<&'s mut StageState, String> {
    if let Some(j) = super::stage_ref(stages.stages, stages.index, f) {
        return stages.done[j].as_mut().ok_or_else(|| {
            format!("stage {f:?} was not built (a --mount=from naming a stage through a variable)")
        });
    }
    if !ctx.images.contains_key(f) {
        let platform = ctx.opts.platform.clone();
        let (image, _) = super::stage::load_image(ctx, f, &platform)?;
        let s = StageState::from_image(&image).map_err(|e| e.to_string())?;
        ctx.images.insert(f.to_string(), s);
    }
    Ok(ctx.images.get_mut(f).expect("inserted above"))
}

/// The context's entries under `source` (symlinks resolved) and the resolved path.
fn context_entries(ctx: &mut Ctx, source: &str) -> Result<(Vec<Entry>, PathBuf), String> {
    let rel = super::copy::clean(source);
    let tree = ctx.context_tree().map_err(|e| e.to_string())?;
    let resolved = tree
        .resolve(&rel, true)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{source} not found in the build context"))?;
    let entries = tree.entries_under(&resolved).map_err(|e| e.to_string())?;
    Ok((entries, resolved))
}

/// What identifies `source` in `from` (or the context): the content digest of the context
/// subtree, or the chain id of the stage or image, with the path.
fn source_identity(
    ctx: &mut Ctx,
    stages: &mut StageRefs,
    from: Option<&str>,
    source: &str,
) -> Result<String, String> {
    let rel = super::copy::clean(source);
    match from {
        None => {
            let (entries, resolved) = context_entries(ctx, source)?;
            let settings = super::cache::WriterSettings {
                compression: crate::media::Compression::None,
                level: None,
                mtime: 0,
                threads: ctx.opts.threads,
            };
            let mut stat = ctx.stat.lock();
            let key =
                super::cache::layer_key(&entries, &settings, &mut stat, ctx.context_dir.as_deref())
                    .map_err(|e| e.to_string())?;
            Ok(format!("context:{key}:/{}", resolved.display()))
        }
        Some(f) => {
            let state = from_state(ctx, stages, f)?;
            let diff_ids: Vec<Digest> = state.layers.iter().map(|l| l.diff_id).collect();
            let chain = crate::image::chain_id(&diff_ids)
                .map(|d| d.to_string())
                .unwrap_or_else(|| "scratch".into());
            Ok(format!("{f}@{chain}:/{}", rel.display()))
        }
    }
}

/// Materialize `source` (a path in `from`, or in the build context when `from` is `None`)
/// into a fresh directory under the build's work directory; returns its path there.
fn materialize_source(
    ctx: &mut Ctx,
    stages: &mut StageRefs,
    from: Option<&str>,
    source: &str,
    scratch: &Path,
) -> Result<PathBuf, String> {
    let dir = tempfile::Builder::new()
        .prefix("mnt-")
        .tempdir_in(scratch)
        .map_err(|e| e.to_string())?
        .keep();
    let (entries, resolved) = match from {
        None => context_entries(ctx, source)?,
        Some(f) => {
            let (store, work, remote) = (ctx.store, ctx.work.path().to_path_buf(), ctx.remote);
            let cancel = ctx.opts.cancel.clone();
            let state = from_state(ctx, stages, f)?;
            let fetch = super::Fetch {
                store,
                work: &work,
                remote,
                cancel: cancel.as_ref(),
            };
            state.ensure_tree(&fetch, true).map_err(|e| e.to_string())?;
            let tree = state.tree();
            let resolved = tree
                .resolve(super::copy::clean(source), true)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{source} not found in {f}"))?;
            let entries = tree.entries_under(&resolved).map_err(|e| e.to_string())?;
            (entries, resolved)
        }
    };
    materialize(&entries, &dir)?;
    let path = dir.join(&resolved);
    if !path.exists() {
        fs_err::create_dir_all(&path).map_err(|e| e.to_string())?;
    }
    Ok(path)
}

/// A mount whose identity is known; what it needs on disk is made only when the step runs.
enum Planned {
    /// Ready as is.
    Ready(Mount),
    /// A bind of `source` in `from` (or the context).
    Bind {
        target: String,
        readonly: bool,
        from: Option<String>,
        source: String,
    },
    /// A cache directory named `name`, seeded from `seed` (from, source) when new.
    Cache {
        target: String,
        readonly: bool,
        name: String,
        id: String,
        sharing: Sharing,
        mode: u32,
        owner: (u32, u32),
        seed: Option<(String, String)>,
    },
}

impl Planned {
    fn target(&self) -> &str {
        match self {
            Planned::Ready(Mount::Bind { target, .. })
            | Planned::Ready(Mount::Tmpfs { target, .. })
            | Planned::Ready(Mount::Secret { target, .. })
            | Planned::Bind { target, .. }
            | Planned::Cache { target, .. } => target,
        }
    }
}

/// The RUN's mounts, planned: identities for the cache key, extra environment (secrets with
/// `env=`).
#[derive(Default)]
struct Plan {
    mounts: Vec<Planned>,
    identity: Vec<String>,
    env: Vec<(String, String)>,
}

/// Plan the RUN's `--mount` flags (nothing is written or locked yet).
fn plan_mounts(
    ctx: &mut Ctx,
    stages: &mut StageRefs,
    st: &StageState,
    specs: Vec<RunMount>,
) -> Result<Plan, String> {
    let workdir = st.workdir();
    let mut out = Plan::default();
    for m in specs {
        match m.kind {
            MountType::Bind => {
                let target = abs_target(m.target.as_deref().unwrap_or_default(), &workdir)?;
                let source = m.source.clone().unwrap_or_else(|| "/".into());
                let identity = source_identity(ctx, stages, m.from.as_deref(), &source)?;
                out.identity.push(format!(
                    "bind target={target} ro={} source={identity}",
                    m.readonly
                ));
                out.mounts.push(Planned::Bind {
                    target,
                    readonly: m.readonly,
                    from: m.from.clone(),
                    source,
                });
            }
            MountType::Cache => {
                let raw_target = m.target.clone().unwrap_or_default();
                let target = abs_target(&raw_target, &workdir)?;
                // BuildKit: the id defaults to the cleaned target as written.
                let id = m.id.clone().unwrap_or_else(|| {
                    let c = super::copy::clean(&raw_target);
                    if raw_target.starts_with('/') {
                        format!("/{}", c.display())
                    } else {
                        c.display().to_string()
                    }
                });
                let ns = ctx
                    .opts
                    .build_args
                    .get("BUILDKIT_CACHE_MOUNT_NS")
                    .cloned()
                    .unwrap_or_default();
                let (mode, uid, gid) = (
                    m.mode.unwrap_or(0o755),
                    m.uid.unwrap_or(0),
                    m.gid.unwrap_or(0),
                );
                // BuildKit keys a cache directory by its id and, when it starts from something
                // (`from`, or ownership and mode given), by that too.
                let mut name = format!("{ns}/{id}");
                let seed = match &m.from {
                    Some(f) => {
                        let source = m.source.clone().unwrap_or_else(|| "/".into());
                        let identity = source_identity(ctx, stages, Some(f), &source)?;
                        name.push_str(&format!(" from={identity}"));
                        Some((f.clone(), source))
                    }
                    None => None,
                };
                if m.mode.is_some() || m.uid.is_some() || m.gid.is_some() {
                    name.push_str(&format!(" mode={mode:o} uid={uid} gid={gid}"));
                }
                out.identity.push(format!(
                    "cache target={target} ro={} key={name} sharing={:?}",
                    m.readonly, m.sharing
                ));
                out.mounts.push(Planned::Cache {
                    target,
                    readonly: m.readonly,
                    name,
                    id,
                    sharing: m.sharing,
                    mode,
                    owner: (uid, gid),
                    seed,
                });
            }
            MountType::Tmpfs => {
                let target = abs_target(m.target.as_deref().unwrap_or_default(), &workdir)?;
                out.identity
                    .push(format!("tmpfs target={target} size={:?}", m.size));
                out.mounts.push(Planned::Ready(Mount::Tmpfs {
                    target,
                    size: m.size,
                }));
            }
            MountType::Secret => {
                let id = m.secret_id();
                let target = match (&m.target, &m.env) {
                    (Some(t), _) => Some(abs_target(t, &workdir)?),
                    (None, Some(_)) => None,
                    (None, None) => Some(format!("/run/secrets/{id}")),
                };
                let (mode, uid, gid) = (
                    m.mode.unwrap_or(0o400),
                    m.uid.unwrap_or(0),
                    m.gid.unwrap_or(0),
                );
                out.identity.push(format!(
                    "secret id={id} target={target:?} env={:?} mode={mode:o} uid={uid} gid={gid} required={}",
                    m.env, m.required
                ));
                let Some(value) = ctx.opts.secrets.get(&id) else {
                    if m.required {
                        return Err(format!(
                            "secret {id:?} is required but was not given (strata build --secret id={id},src=FILE)"
                        ));
                    }
                    continue;
                };
                if let Some(var) = &m.env {
                    let text = String::from_utf8(value.0.clone()).map_err(|_| {
                        format!("secret {id:?} is not UTF-8 and cannot be an environment variable")
                    })?;
                    out.env.push((var.clone(), text));
                }
                if let Some(target) = target {
                    out.mounts.push(Planned::Ready(Mount::Secret {
                        target,
                        data: SecretBytes(value.0.clone()),
                        mode,
                        uid,
                        gid,
                    }));
                }
            }
            MountType::Ssh => {
                return Err("RUN --mount=type=ssh is not supported".into());
            }
        }
    }
    // Parents before children, as BuildKit orders mounts.
    out.mounts
        .sort_by_key(|m| m.target().split('/').filter(|c| !c.is_empty()).count());
    Ok(out)
}

/// Sandbox mounts, chowns of new cache directories, and the cache-directory locks held.
type Realized = (Vec<Mount>, Vec<(PathBuf, u32, u32)>, Vec<MountLock>);

/// The sandbox mounts of a plan, with chowns of new cache directories and the held locks.
fn realize_mounts(
    ctx: &mut Ctx,
    stages: &mut StageRefs,
    planned: Vec<Planned>,
    scratch: &Path,
) -> Result<Realized, String> {
    let (mut chown, mut locks) = (Vec::new(), Vec::new());
    let mut held: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    // Cache directories are locked in the order of their names, whatever the order of the
    // mounts, so two builds waiting for each other's `sharing=locked` caches cannot deadlock.
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by(|&a, &b| {
        let name = |p: &Planned| match p {
            Planned::Cache { name, .. } => Some(name.clone()),
            _ => None,
        };
        name(&planned[a]).cmp(&name(&planned[b])).then(a.cmp(&b))
    });
    let mut planned: Vec<Option<Planned>> = planned.into_iter().map(Some).collect();
    let mut slots: Vec<Option<Mount>> = (0..planned.len()).map(|_| None).collect();
    for i in order {
        let p = planned[i].take().expect("each mount once");
        let mounts = &mut slots[i];
        match p {
            Planned::Ready(m) => *mounts = Some(m),
            Planned::Bind {
                target,
                readonly,
                from,
                source,
            } => {
                let path = materialize_source(ctx, stages, from.as_deref(), &source, scratch)?;
                *mounts = Some(Mount::Bind {
                    source: path,
                    target,
                    readonly,
                });
            }
            Planned::Cache {
                target,
                readonly,
                name,
                id,
                sharing,
                mode,
                owner,
                seed,
            } => {
                let seed = match seed {
                    Some((f, source)) => {
                        Some(materialize_source(ctx, stages, Some(&f), &source, scratch)?)
                    }
                    None => None,
                };
                let sharing = match sharing {
                    Sharing::Shared => crate::store::Sharing::Shared,
                    Sharing::Private => crate::store::Sharing::Private,
                    Sharing::Locked => crate::store::Sharing::Locked,
                };
                // The same cache twice in one step: one directory, locked once.
                let dir = match held.get(&name) {
                    Some(dir) => dir.clone(),
                    None => {
                        let (dir, lock, created) = ctx
                            .store
                            .cache_mount(&name, sharing, mode, |fresh| match &seed {
                                Some(src) => copy_tree(src, fresh),
                                None => Ok(()),
                            })
                            .map_err(|e| format!("cache mount {id:?}: {e}"))?;
                        if created {
                            chown.push((dir.clone(), owner.0, owner.1));
                        }
                        locks.push(lock);
                        held.insert(name.clone(), dir.clone());
                        dir
                    }
                };
                *mounts = Some(Mount::Bind {
                    source: dir,
                    target,
                    readonly,
                });
            }
        }
    }
    let mounts = slots.into_iter().flatten().collect();
    Ok((mounts, chown, locks))
}

/// Copy the tree at `src` (a directory or file) to `dest` (an existing empty directory).
fn copy_tree(src: &Path, dest: &Path) -> std::io::Result<()> {
    let meta = fs_err::symlink_metadata(src)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "cache mount source {} is not a directory",
            src.display()
        )));
    }
    crate::sandbox::merge_lowers(&[src.to_path_buf()], dest)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// A `#!` heredoc run as a file: its name and content.
type Script = (String, Vec<u8>);

/// The command's argv, with heredocs handled as BuildKit does (see the module docs), and the
/// script mount of a `#!` heredoc.
fn command_argv(st: &StageState, run: &Run) -> Result<(Vec<String>, Option<Script>), String> {
    let shell = |arg: String| {
        let mut v = st.shell_argv();
        v.push(arg);
        v
    };
    if run.heredocs.is_empty() {
        return match &run.command {
            CommandForm::Exec(v) if v.is_empty() => Err("RUN needs a command".into()),
            CommandForm::Exec(v) => Ok((v.clone(), None)),
            CommandForm::Shell(s) => Ok((shell(s.clone()), None)),
        };
    }
    let CommandForm::Shell(line) = &run.command else {
        return Err("heredocs need the shell form of RUN".into());
    };
    let only = crate::dockerfile::parse_heredoc(line.trim()).ok().flatten();
    if only.is_some() {
        let first = &run.heredocs[0];
        if first.content.starts_with("#!") {
            if first.name.contains('/') || first.name == "." || first.name == ".." {
                return Err(format!("invalid heredoc name {:?}", first.name));
            }
            let path = format!("{PIPES}/{}", first.name);
            return Ok((
                shell(path),
                Some((first.name.clone(), first.content.clone().into_bytes())),
            ));
        }
        return Ok((shell(first.content.clone()), None));
    }
    let mut full = line.clone();
    for h in &run.heredocs {
        full.push('\n');
        full.push_str(&h.content);
        full.push_str(&h.name);
    }
    Ok((shell(full), None))
}

/// Why a RUN step did not make a layer.
#[derive(Debug)]
pub(super) enum StepError {
    /// The build's cancel token was set: the command was not started, or was killed.
    Cancelled,
    /// It failed; the message says why (located at the line by the caller).
    Failed(String),
}

impl From<String> for StepError {
    fn from(m: String) -> StepError {
        StepError::Failed(m)
    }
}

/// Run `run` in stage `st`. Returns the layer it made.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_step(
    ctx: &mut Ctx,
    mut stages: StageRefs,
    st: &mut StageState,
    run: &Run,
    mounts: Vec<RunMount>,
    created_by: &str,
    env: Vec<(String, String)>,
    user: (u32, u32),
) -> Result<Descriptor, StepError> {
    let network = match run.flags.network.as_deref() {
        None | Some("default") | Some("host") => Network::Host,
        Some("none") => Network::None,
        Some(other) => return Err(format!("unknown RUN --network={other} (none or host)").into()),
    };
    let (argv, script) = command_argv(st, run)?;
    let cwd = st.workdir();
    let plan = plan_mounts(ctx, &mut stages, st, mounts)?;

    // The cache key: what the step's result depends on, known before running it.
    let diff_ids: Vec<Digest> = st.layers.iter().map(|l| l.diff_id).collect();
    let mut h = Hasher::new();
    h.field(b"strata-run-v2");
    h.field(
        crate::image::chain_id(&diff_ids)
            .map(|d| d.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    for a in &argv {
        h.field(a.as_bytes());
    }
    if let Some((name, body)) = &script {
        h.field(format!("heredoc script {name}").as_bytes());
        h.field(body);
    }
    for (k, v) in &env {
        h.field(format!("{k}={v}").as_bytes());
    }
    h.field(format!("{}:{}", user.0, user.1).as_bytes());
    h.field(cwd.as_bytes());
    h.field(format!("{network:?}").as_bytes());
    for m in &plan.identity {
        h.field(m.as_bytes());
    }
    h.field(ctx.opts.compression.name().as_bytes());
    h.field(
        format!(
            "{:?}/{}",
            ctx.opts.compression_level, ctx.opts.source_date_epoch
        )
        .as_bytes(),
    );
    let key = h.finish();

    let use_cache = !ctx.opts.no_cache && !ctx.opts.no_cache_filter.contains(&st.name);
    if use_cache && let Some(hit) = ctx.store.cache_get(&key) {
        return Ok(st
            .push_cached(ctx, key, hit, created_by)
            .map_err(|e| e.to_string())?);
    }
    if ctx.is_cancelled() {
        return Err(StepError::Cancelled);
    }

    let scratch = tempfile::Builder::new()
        .prefix("step-")
        .tempdir_in(ctx.work.path())
        .map_err(|e| e.to_string())?
        .keep();
    let result = execute(
        ctx,
        &mut stages,
        st,
        Step {
            run,
            plan,
            argv,
            script,
            env,
            cwd,
            user,
            network,
            key,
            created_by,
        },
        &scratch,
    );
    // Bound copies may hold read-only directories: write access is put back before removing.
    let _ = crate::store::remove_tree(&scratch);
    result
}

/// A RUN step whose cache key missed, ready to execute.
struct Step<'a> {
    run: &'a Run,
    plan: Plan,
    argv: Vec<String>,
    script: Option<Script>,
    env: Vec<(String, String)>,
    cwd: String,
    user: (u32, u32),
    network: Network,
    key: Digest,
    created_by: &'a str,
}

/// Execute `step` in `st`, with its temporary files under `scratch`.
fn execute(
    ctx: &mut Ctx,
    stages: &mut StageRefs,
    st: &mut StageState,
    step: Step,
    scratch: &Path,
) -> Result<Descriptor, StepError> {
    let Step {
        run,
        mut plan,
        argv,
        script,
        mut env,
        cwd,
        user,
        network,
        key,
        created_by,
    } = step;

    // Secrets given as variables reach the command only, never the key or the config.
    for (k, v) in plan.env.drain(..) {
        env.retain(|(e, _)| *e != k);
        env.push((k, v));
    }
    let (mut mounts, chown, locks) = realize_mounts(ctx, stages, plan.mounts, scratch)?;
    if let Some((name, body)) = &script {
        let dir = tempfile::Builder::new()
            .prefix("pipes-")
            .tempdir_in(scratch)
            .map_err(|e| e.to_string())?
            .keep();
        let file = dir.join(name);
        fs_err::write(&file, body).map_err(|e| e.to_string())?;
        fs_err::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        mounts.insert(
            0,
            Mount::Bind {
                source: dir,
                target: PIPES.into(),
                readonly: true,
            },
        );
    }
    let lower = lowers(ctx, st, scratch)?;
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(ctx.work.path())
        .map_err(|e| e.to_string())?
        .keep();
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&upper, &work] {
        fs_err::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let mut spec = RunSpec::new(lower, &upper, &work, argv.clone());
    spec.env = env;
    spec.cwd = cwd;
    spec.uid = user.0;
    spec.gid = user.1;
    spec.network = network;
    spec.mounts = mounts;
    spec.chown = chown;
    spec.cancel = ctx.opts.cancel.as_ref().map(|c| c.flag().clone());
    // Preparing the lowers and mounts may have taken a while: do not start a cancelled step.
    let outcome = if ctx.is_cancelled() {
        Ok(None)
    } else {
        Sandbox::new()
            .run(&spec)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    drop(spec);
    drop(locks);
    // The upper stays for the build (the stage's view reads the layer's files from it); the
    // sandbox's own directories go now (the kernel leaves the overlay work directory mode 000).
    let _ = crate::store::remove_tree(&work);
    let outcome = match outcome {
        Ok(Some(o)) if o.status != RunStatus::Cancelled => o,
        // Killed (its whole pid namespace is gone) or never started: the half-written upper
        // goes too, and nothing reaches the cache.
        Ok(_) => {
            let _ = crate::store::remove_tree(&dir);
            return Err(StepError::Cancelled);
        }
        Err(e) => return Err(e.into()),
    };
    if !outcome.success() {
        let tail = String::from_utf8_lossy(&outcome.output);
        let last: Vec<&str> = tail.lines().rev().take(15).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        let shown = match &run.command {
            CommandForm::Shell(s) => s.clone(),
            CommandForm::Exec(v) => v.join(" "),
        };
        return Err(format!(
            "RUN {shown:?} failed ({:?}); its last output:\n{}",
            outcome.status,
            last.join("\n")
        )
        .into());
    }
    let entries = upper_to_entries(&upper, &outcome.ids).map_err(|e| e.to_string())?;
    Ok(st
        .add_layer_keyed(ctx, entries, created_by, Some(key))
        .map_err(|e| e.to_string())?
        .0)
}

/// Most snapshot directories stacked in one overlay: the kernel takes the mount options in one
/// page (the sandbox passes deep stacks as `<chain-id>/fs` relative to the snapshot store), so
/// a deeper stack is merged into one directory instead.
const MAX_LOWERS: usize = 48;

/// The read-only layer directories of the stage, lowest first: the snapshot store's
/// directories (each layer unpacked once, reused by every step, stage and build on the same
/// chain), else — when a layer cannot be kept as an overlay lower (a hardlink to a lower
/// layer's file, a file system without user xattrs) or the stack is too deep — one merged
/// directory unpacked for this step.
fn lowers(ctx: &mut Ctx, st: &StageState, scratch: &Path) -> Result<Vec<PathBuf>, String> {
    match snapshot_stack(ctx, st)? {
        Ok(stack) if stack.len() <= MAX_LOWERS => return Ok(stack),
        Ok(stack) => {
            tracing::debug!(
                layers = stack.len(),
                "stack too deep for one overlay; merging"
            );
            let lower = tempfile::Builder::new()
                .prefix("lower-")
                .tempdir_in(scratch)
                .map_err(|e| e.to_string())?
                .keep();
            crate::sandbox::merge_lowers(&stack, &lower).map_err(|e| e.to_string())?;
            return Ok(vec![lower]);
        }
        Err(e) => {
            tracing::warn!("layer snapshots unavailable ({e}); unpacking the stage for this step");
        }
    }
    ctx.fetch()
        .fetch_missing(&st.layers)
        .map_err(|e| e.to_string())?;
    let lower = tempfile::Builder::new()
        .prefix("lower-")
        .tempdir_in(scratch)
        .map_err(|e| e.to_string())?
        .keep();
    for l in &st.layers {
        let blob = ctx
            .store
            .open_blob(&l.descriptor.digest)
            .map_err(|e| e.to_string())?;
        let r = open_decompressed(BufReader::with_capacity(1 << 20, blob))
            .map_err(|e| e.to_string())?;
        unpack_layer(r, &lower).map_err(|e| e.to_string())?;
    }
    Ok(vec![lower])
}

/// The snapshot directory of every layer of the stage, lowest first, unpacking the missing
/// ones. Only the blobs of those are fetched: a base whose layers were unpacked by an earlier
/// build is not downloaded again. The outer error (a failed download) fails the step; the
/// inner one (a layer that cannot be a snapshot) asks for the merged fallback.
fn snapshot_stack(ctx: &Ctx, st: &StageState) -> Result<Result<Vec<PathBuf>, String>, String> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut diff_ids = Vec::new();
    for l in &st.layers {
        diff_ids.push(l.diff_id);
        let chain = crate::image::chain_id(&diff_ids).expect("at least one layer");
        let dir = match ctx.store.snapshot(&chain) {
            Some(d) => d,
            None => {
                ctx.fetch()
                    .fetch_missing(std::slice::from_ref(l))
                    .map_err(|e| e.to_string())?;
                let below: Vec<PathBuf> = out.iter().rev().cloned().collect();
                let started = std::time::Instant::now();
                let made = ctx.store.put_snapshot(&chain, |dest| {
                    let open = || {
                        let blob = ctx
                            .store
                            .open_blob(&l.descriptor.digest)
                            .map_err(std::io::Error::other)?;
                        open_decompressed(BufReader::with_capacity(1 << 20, blob))
                            .map_err(std::io::Error::other)
                    };
                    unpack_layer_dir(open, dest, &below).map_err(|e| e.to_string())
                });
                let d = match made {
                    Ok(d) => d,
                    Err(e) => return Ok(Err(e)),
                };
                tracing::debug!(%chain, elapsed = ?started.elapsed(), "unpacked a layer snapshot");
                d
            }
        };
        out.push(dir);
    }
    Ok(Ok(out))
}

/// The `from=` stages the `--mount` flags of a RUN name (unexpanded), for ordering stages.
pub(super) fn mount_froms(run: &Run) -> Vec<String> {
    run.flags
        .mount
        .iter()
        .filter_map(|v| crate::dockerfile::parse_mount(v, &mut |s| Ok(s.to_string())).ok())
        .filter_map(|m| m.from)
        .collect()
}

/// Parse and expand the RUN's `--mount` flags.
pub(super) fn parse_mounts(
    run: &Run,
    mut expand: impl FnMut(&str) -> Result<String, String>,
) -> Result<Vec<RunMount>, String> {
    let mut out = Vec::new();
    for v in &run.flags.mount {
        out.push(crate::dockerfile::parse_mount(v, &mut expand)?);
    }
    Ok(out)
}
