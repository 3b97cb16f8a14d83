//! Executing a layer recipe with the Dockerfile machinery: the base is loaded by a
//! synthetic `FROM` stage (so registry, local and `oci:` bases, lazy layers and ONBUILD
//! behave the same), each recipe layer becomes a layer through the same writer and cache as a
//! `COPY`, and the config is set on top.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::copy::{add_missing_parents, clean};
use super::stage::{StageState, execute_stage, parse_ports, resolve_owner};
use super::{BuildError, BuildOptions, BuildOutput, Event, Remote, finish, prepare, timed};
use crate::dockerfile;
use crate::layer::{Entry, EntryKind, FsTree};
use crate::recipe::{Recipe, Unclaimed};
use crate::store::Store;

/// One layer to write: name, destination, claimed files, owner spec, mode.
type PlannedLayer = (String, String, Vec<PathBuf>, Option<String>, Option<u32>);

/// Build `recipe` with the context, platform, compression, cache and output settings of
/// `opts` (its Dockerfile fields are ignored).
pub fn build_recipe(
    store: &Store,
    remote: Option<&Remote>,
    recipe: &Recipe,
    opts: &BuildOptions,
    events: &mut dyn FnMut(Event),
) -> Result<BuildOutput, BuildError> {
    // `${NAME}` in the base comes from --build-arg, exactly as for a Dockerfile's FROM.
    let mut text = String::new();
    for k in opts.build_args.keys() {
        text.push_str(&format!("ARG {k}\n"));
    }
    text.push_str(&format!("FROM {} AS recipe\n", recipe.base));
    let df = dockerfile::parse(&text, &recipe.file)?;
    let stages = df.stages()?;
    let mut ctx = prepare(store, remote, opts, &df, &stages, events)?;
    let mut done = vec![None];
    let mut st = execute_stage(&mut ctx, &stages, 0, &mut done)?;

    // Which layer claims each file of the source directory.
    let tree = ctx.context_tree()?.clone();
    let root = clean(&recipe.source);
    if !root.as_os_str().is_empty() && tree.get(&root).is_none() {
        return Err(BuildError::Invalid(format!(
            "{}: source {:?} is not in the build context",
            recipe.file, recipe.source
        )));
    }
    let mut claimed: Vec<Vec<PathBuf>> = vec![Vec::new(); recipe.layers.len()];
    let mut unclaimed = Vec::new();
    for (path, node) in tree.walk(&root) {
        if node.is_dir() {
            continue;
        }
        let rel = path.strip_prefix(&root).expect("walk stays under its root");
        let rel_s = rel.to_string_lossy();
        if recipe.exclude.iter().any(|p| p.matches(&rel_s)) {
            continue;
        }
        match recipe.layers.iter().position(|l| l.claims(&rel_s)) {
            Some(i) => claimed[i].push(path.to_path_buf()),
            None => unclaimed.push(path.to_path_buf()),
        }
    }
    let mut plan: Vec<PlannedLayer> = recipe
        .layers
        .iter()
        .zip(claimed)
        .map(|(l, files)| {
            (
                l.name.clone(),
                l.dest.clone(),
                files,
                l.chown.clone(),
                l.chmod,
            )
        })
        .collect();
    match recipe.unclaimed {
        Unclaimed::Error if !unclaimed.is_empty() => {
            let shown: Vec<String> = unclaimed
                .iter()
                .take(10)
                .map(|p| p.display().to_string())
                .collect();
            return Err(BuildError::Invalid(format!(
                "{}: {} file(s) claimed by no layer: {}{} (add a layer, or set unclaimed = \"layer\" or \"ignore\")",
                recipe.file,
                unclaimed.len(),
                shown.join(", "),
                if unclaimed.len() > 10 { ", …" } else { "" }
            )));
        }
        Unclaimed::Layer if !unclaimed.is_empty() => plan.push((
            "unclaimed".into(),
            recipe.unclaimed_dest.clone(),
            unclaimed,
            None,
            None,
        )),
        _ => {}
    }

    let total = plan.len() + 2;
    for (n, (name, dest, files, chown, chmod)) in plan.into_iter().enumerate() {
        ctx.check_cancelled()?;
        ctx.step_id += 1;
        let id = ctx.step_id;
        (ctx.events)(Event::Step {
            id,
            stage: "recipe".into(),
            index: n + 2,
            total,
            text: format!("LAYER {name} → {dest} ({} files)", files.len()),
        });
        if files.is_empty() {
            (ctx.events)(Event::Warning(format!(
                "{}: layer {name:?} claims no files; it is left out",
                recipe.file
            )));
            timed(&mut ctx, id, |_| Ok(((), None)))?;
            continue;
        }
        timed(&mut ctx, id, |ctx| {
            let owner = match &chown {
                Some(spec) => {
                    Some(resolve_owner(ctx, &mut st, spec, false).map_err(BuildError::Invalid)?)
                }
                None => None,
            };
            st.ensure_tree(&ctx.fetch(), false)?;
            let entries = layer_entries(
                &tree,
                &root,
                &files,
                &dest,
                owner,
                chmod,
                st.tree(),
                st.partial,
            )?;
            let created_by = format!("RECIPE {} layer {name} # strata", recipe.file);
            let d = st.add_layer(ctx, entries, &created_by)?;
            Ok(((), Some(d)))
        })?;
    }

    ctx.check_cancelled()?;
    ctx.step_id += 1;
    let id = ctx.step_id;
    (ctx.events)(Event::Step {
        id,
        stage: "recipe".into(),
        index: total,
        total,
        text: "CONFIG".into(),
    });
    apply_config(&mut st, recipe, opts.source_date_epoch)?;
    timed(&mut ctx, id, |_| Ok(((), None)))?;
    finish(ctx, st)
}

/// The entries of one recipe layer: each claimed file below `dest`, keeping its path relative
/// to the source root, with the layer's owner and mode.
#[allow(clippy::too_many_arguments)]
fn layer_entries(
    tree: &FsTree,
    root: &Path,
    files: &[PathBuf],
    dest: &str,
    owner: Option<(u64, u64)>,
    chmod: Option<u32>,
    dest_tree: &FsTree,
    partial: bool,
) -> Result<Vec<Entry>, BuildError> {
    let dest = clean(dest);
    let mut out = BTreeMap::new();
    for path in files {
        let mut e = tree
            .entries_under(path)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                BuildError::Invalid(format!("{} vanished from the context", path.display()))
            })?;
        let rel = path
            .strip_prefix(root)
            .expect("claimed files are under the root");
        e.path = dest.join(rel);
        if let Some((u, g)) = owner {
            (e.uid, e.gid) = (u, g);
        }
        if let (Some(m), false) = (chmod, matches!(e.kind, EntryKind::Symlink { .. })) {
            e.mode = m;
        }
        out.insert(crate::layer::PathKey(e.path.clone()), e);
    }
    if !partial {
        add_missing_parents(&mut out, dest_tree, owner.unwrap_or((0, 0)));
    }
    Ok(out.into_values().collect())
}

fn apply_config(st: &mut StageState, recipe: &Recipe, epoch: i64) -> Result<(), BuildError> {
    let c = &recipe.config;
    let invalid = |m: String| BuildError::Invalid(format!("{}: {m}", recipe.file));
    for (k, v) in &c.env {
        st.config.set_env(k, v);
    }
    for (k, v) in &c.labels {
        st.config.set_label(k, v);
    }
    for p in &c.ports {
        for port in parse_ports(p).map_err(invalid)? {
            st.config.add_exposed_port(&port);
        }
    }
    let inherited = st.cmd_inherited;
    st.config.update_config(|cfg| {
        if let Some(w) = &c.workdir {
            cfg.set_working_dir(Some(w.clone()));
        }
        if let Some(u) = &c.user {
            cfg.set_user(Some(u.clone()));
        }
        if let Some(e) = &c.entrypoint {
            cfg.set_entrypoint(Some(e.clone()));
            if inherited && c.cmd.is_none() {
                cfg.set_cmd(None);
            }
        }
        if let Some(cmd) = &c.cmd {
            cfg.set_cmd(Some(cmd.clone()));
        }
        if let Some(s) = &c.stop_signal {
            cfg.set_stop_signal(Some(s.clone()));
        }
    });
    st.metadata_step(&format!("RECIPE {} config", recipe.file), epoch);
    Ok(())
}
