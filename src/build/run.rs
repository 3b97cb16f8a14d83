//! RUN: execute a step in the rootless sandbox on a snapshot of the stage's file system and
//! turn what it changed into a layer.
//!
//! This first version assembles one merged lower directory per step (every layer of the
//! stage unpacked in order, whiteouts applied, refusing hostile entries), runs the command
//! on top of it with overlayfs, and converts the overlay upper (whiteouts and opaque
//! directories included) into layer entries. The cache key is computed before running: the
//! parent chain id, the command, environment, user, working directory and network, plus the
//! writer settings, so a hit reuses the layer without executing anything.
//! Not yet: `--mount` (cache, secret, bind, tmpfs) and snapshots reused across steps.

use super::Ctx;
use super::stage::StageState;
use crate::digest::{Digest, Hasher};
use crate::dockerfile::{CommandForm, Run};
use crate::layer::open_decompressed;
use crate::media::Descriptor;
use crate::sandbox::{Network, RunSpec, Sandbox, unpack_layer, upper_to_entries};
use std::io::BufReader;

/// Run `run` in stage `st`. Returns the layer it made.
pub(super) fn run_step(
    ctx: &mut Ctx,
    st: &mut StageState,
    run: &Run,
    created_by: &str,
    env: Vec<(String, String)>,
    user: (u32, u32),
) -> Result<Descriptor, String> {
    if !run.flags.mount.is_empty() {
        return Err("RUN --mount is not supported yet".into());
    }
    if !run.heredocs.is_empty() {
        return Err("RUN with heredocs is not supported yet".into());
    }
    let network = match run.flags.network.as_deref() {
        None | Some("default") | Some("host") => Network::Host,
        Some("none") => Network::None,
        Some(other) => return Err(format!("unknown RUN --network={other} (none or host)")),
    };
    let argv = match &run.command {
        CommandForm::Exec(v) if v.is_empty() => return Err("RUN needs a command".into()),
        CommandForm::Exec(v) => v.clone(),
        CommandForm::Shell(s) => {
            let mut v = st.shell_argv();
            v.push(s.clone());
            v
        }
    };
    let cwd = st.workdir();

    // The cache key: what the step's result depends on, known before running it.
    let diff_ids: Vec<Digest> = st.layers.iter().map(|l| l.diff_id).collect();
    let mut h = Hasher::new();
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(b"strata-run-v1");
    field(
        crate::image::chain_id(&diff_ids)
            .map(|d| d.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    for a in &argv {
        field(a.as_bytes());
    }
    for (k, v) in &env {
        field(format!("{k}={v}").as_bytes());
    }
    field(format!("{}:{}", user.0, user.1).as_bytes());
    field(cwd.as_bytes());
    field(format!("{network:?}").as_bytes());
    field(ctx.opts.compression.name().as_bytes());
    field(
        format!(
            "{:?}/{}",
            ctx.opts.compression_level, ctx.opts.source_date_epoch
        )
        .as_bytes(),
    );
    let key = h.finish();

    let use_cache = !ctx.opts.no_cache && !ctx.opts.no_cache_filter.contains(&st.name);
    if use_cache && let Some(hit) = ctx.store.cache_get(&key) {
        return st
            .push_cached(ctx, key, hit, created_by)
            .map_err(|e| e.to_string());
    }

    // A merged snapshot of the stage as the lower, then the command on top.
    ctx.fetch()
        .fetch_missing(&st.layers)
        .map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(ctx.work.path())
        .map_err(|e| e.to_string())?
        .keep();
    let (lower, upper, work) = (dir.join("lower"), dir.join("upper"), dir.join("work"));
    for d in [&lower, &upper, &work] {
        fs_err::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    for l in &st.layers {
        let blob = ctx
            .store
            .open_blob(&l.descriptor.digest)
            .map_err(|e| e.to_string())?;
        let r = open_decompressed(BufReader::with_capacity(1 << 20, blob))
            .map_err(|e| e.to_string())?;
        unpack_layer(r, &lower).map_err(|e| e.to_string())?;
    }
    let mut spec = RunSpec::new(vec![lower], &upper, &work, argv.clone());
    spec.env = env;
    spec.cwd = cwd;
    spec.uid = user.0;
    spec.gid = user.1;
    spec.network = network;
    let outcome = Sandbox::new().run(&spec).map_err(|e| e.to_string())?;
    if !outcome.success() {
        let tail = String::from_utf8_lossy(&outcome.output);
        let last: Vec<&str> = tail.lines().rev().take(15).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(format!(
            "RUN {:?} failed ({:?}); its last output:\n{}",
            argv.join(" "),
            outcome.status,
            last.join("\n")
        ));
    }
    let entries = upper_to_entries(&upper, &outcome.ids).map_err(|e| e.to_string())?;
    st.add_layer_keyed(ctx, entries, created_by, key)
        .map_err(|e| e.to_string())
}
