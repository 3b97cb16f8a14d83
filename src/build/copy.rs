//! COPY and ADD semantics, as the Dockerfile reference defines them: which source paths a
//! step names, where each lands, and with what owner and mode. Pure planning over
//! [`FsTree`]s: the output is the list of layer entries.
//!
//! Rules implemented (<https://docs.docker.com/reference/dockerfile/#copy>):
//! - a source directory copies its *contents*; a file copied to a destination ending in `/`
//!   (or to an existing directory) keeps its name, otherwise it takes the destination name;
//! - several sources (or a wildcard) need a directory destination;
//! - sources are followed through symlinks (the symlinks *inside* a copied directory are
//!   copied as links); destinations resolve existing symlinks in their parent path inside the
//!   image root, never outside it;
//! - missing parent directories are created 0755 (owned by `--chown` when given); existing
//!   ones are left out of the layer so lower layers' metadata stands;
//! - `--chown` sets owner and group of everything copied; otherwise context files are 0:0 and
//!   files from another stage keep theirs; `--chmod` sets the mode of everything copied.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::layer::{
    Entry, EntryKind, FileSource, FsTree, LayerError, NodeKind, PathKey, PathKeyRef,
};
use crate::source::{Dockerignore, Pattern, has_glob_meta};

/// What one COPY/ADD step asks for, with every word already expanded.
pub(super) struct CopySpec {
    /// Sources as written (context-relative, or stage-root-relative with `--from`).
    pub sources: Vec<String>,
    /// Heredoc sources: (name, content).
    pub heredocs: Vec<(String, Vec<u8>)>,
    /// Absolute destination; a trailing `/` marks a directory.
    pub dest: String,
    /// `--chown`, resolved to ids.
    pub chown: Option<(u64, u64)>,
    /// `--chmod`.
    pub chmod: Option<u32>,
    /// `--exclude` patterns.
    pub exclude: Dockerignore,
    /// ADD: unpack local tar archives into the destination.
    pub extract_archives: bool,
    /// Whether sources keep their owner (`--from` a stage or image) or become 0:0 (context).
    pub keep_owner: bool,
    /// Whether the destination view lacks the base layers (a lazy registry base): then a
    /// directory missing from the view may exist in the image, so parents are not written
    /// (the unpacker creates any that are really missing, 0755 root) and existing metadata is
    /// never overridden.
    pub dest_partial: bool,
}

/// A failed COPY/ADD: a user-facing message.
#[derive(Debug, thiserror::Error)]
pub(super) enum CopyError {
    /// The step is wrong (missing source, bad destination, …).
    #[error("{0}")]
    Invalid(String),
    /// Reading a source failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
}

fn invalid(msg: impl Into<String>) -> CopyError {
    CopyError::Invalid(msg.into())
}

/// Clean a path lexically, chroot-style (`..` stops at the root); no leading `/` in the result.
pub(super) fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Plan a COPY/ADD: the entries of its layer. `spool` receives unpacked archive content.
pub(super) fn plan(
    spec: &CopySpec,
    src: &FsTree,
    dest_tree: &FsTree,
    spool: &Path,
) -> Result<Vec<Entry>, CopyError> {
    // Expand wildcards into (name as matched, path in src).
    let mut matched: Vec<PathBuf> = Vec::new();
    let mut wildcard = false;
    for s in &spec.sources {
        let p = clean(s);
        if has_glob_meta(s) {
            wildcard = true;
            let pat = Pattern::filepath(&path_str(&p)).map_err(|e| invalid(e.to_string()))?;
            let hits: Vec<PathBuf> = src
                .walk(Path::new(""))
                .filter(|(path, _)| pat.matches(&path_str(path)))
                .map(|(path, _)| path.to_path_buf())
                .collect();
            if hits.is_empty() {
                return Err(invalid(format!("no source files match {s:?}")));
            }
            matched.extend(hits);
        } else {
            if src.resolve(&p, true)?.is_none() {
                return Err(invalid(format!("{s:?}: no such file or directory")));
            }
            matched.push(p);
        }
    }
    let count = matched.len() + spec.heredocs.len();
    let dest_clean = clean(&spec.dest);
    let dest_real = dest_tree.resolve_lenient(&dest_clean, true)?;
    let dest_is_dir = spec.dest.ends_with('/')
        || spec.dest.ends_with("/.")
        || dest_clean.as_os_str().is_empty()
        || dest_tree
            .get(&dest_real)
            .is_some_and(|n| n.kind == NodeKind::Dir);
    if (count > 1 || wildcard) && !dest_is_dir {
        return Err(invalid(format!(
            "when copying more than one source, the destination must be a directory and end with a / (got {:?})",
            spec.dest
        )));
    }

    let mut out: BTreeMap<PathKey, Entry> = BTreeMap::new();
    let target_for = |name: &Path| -> Result<PathBuf, CopyError> {
        if dest_is_dir {
            let base = name
                .file_name()
                .ok_or_else(|| invalid("cannot copy the root as a file"))?;
            Ok(dest_real.join(base))
        } else {
            let parent = dest_clean.parent().unwrap_or(Path::new(""));
            let parent = dest_tree.resolve_lenient(parent, true)?;
            Ok(parent.join(dest_clean.file_name().unwrap_or_default()))
        }
    };

    for (name, content) in &spec.heredocs {
        let target = target_for(Path::new(name))?;
        let mode = spec.chmod.unwrap_or(0o644);
        let (uid, gid) = spec.chown.unwrap_or((0, 0));
        out.insert(
            PathKey(target.clone()),
            Entry {
                path: target,
                kind: EntryKind::File {
                    source: FileSource::Bytes(content.clone().into()),
                    size: content.len() as u64,
                    link_key: None,
                },
                mode,
                uid,
                gid,
            },
        );
    }

    for name in &matched {
        let real = src
            .resolve(name, true)?
            .ok_or_else(|| invalid(format!("{}: no such file or directory", name.display())))?;
        let node = src.get(&real).expect("resolved paths exist");
        if spec.exclude.is_excluded(&path_str(name)) {
            continue;
        }
        match &node.kind {
            NodeKind::Dir => {
                // A directory source copies its contents into the destination (for
                // `COPY a* /dest/` too: each matched directory's contents land in /dest).
                let dir_target = dest_real.clone();
                let explicit = spec.chown.is_some() || spec.chmod.is_some();
                if !dir_target.as_os_str().is_empty()
                    && dest_tree.get(&dir_target).is_none()
                    && (!spec.dest_partial || explicit)
                {
                    let mut e = Entry::dir(dir_target.clone(), spec.chmod.unwrap_or(0o755), 0, 0);
                    (e.uid, e.gid) = spec.chown.unwrap_or((0, 0));
                    out.insert(PathKey(dir_target.clone()), e);
                }
                for mut e in src.entries_under(&real)? {
                    let rel = e
                        .path
                        .strip_prefix(&real)
                        .expect("entries_under stays under its root")
                        .to_path_buf();
                    if rel.as_os_str().is_empty() {
                        continue;
                    }
                    if !spec.exclude.is_empty()
                        && (spec.exclude.is_excluded(&path_str(&rel))
                            || spec.exclude.is_excluded(&path_str(&name.join(&rel))))
                    {
                        continue;
                    }
                    e.path = dir_target.join(&rel);
                    apply_meta(&mut e, spec);
                    out.insert(PathKey(e.path.clone()), e);
                }
            }
            _ => {
                let target = target_for(name)?;
                if spec.extract_archives && is_local_archive(src, &real)? {
                    extract_into(spec, src, &real, &dest_real, spool, &mut out)?;
                    continue;
                }
                let mut entries = src.entries_under(&real)?;
                let mut e = entries.pop().ok_or_else(|| invalid("source vanished"))?;
                e.path = target;
                apply_meta(&mut e, spec);
                out.insert(PathKey(e.path.clone()), e);
            }
        }
    }

    if !spec.dest_partial {
        add_missing_parents(&mut out, dest_tree, spec.chown.unwrap_or((0, 0)));
    }
    Ok(out.into_values().collect())
}

/// Add a directory entry (0755, `owner`) for every parent of `out`'s paths that neither the
/// destination view nor `out` has. Not for partial views (see `CopySpec::dest_partial`).
pub(super) fn add_missing_parents(
    out: &mut BTreeMap<PathKey, Entry>,
    dest_tree: &FsTree,
    (uid, gid): (u64, u64),
) {
    let mut parents = Vec::new();
    // Each directory is looked at once: its ancestors were handled the first time.
    let mut seen: std::collections::HashSet<&Path> = std::collections::HashSet::new();
    for PathKey(p) in out.keys() {
        let mut a = p.parent();
        while let Some(dir) = a {
            if dir.as_os_str().is_empty() || !seen.insert(dir) {
                break;
            }
            if dest_tree.get(dir).is_none() && !out.contains_key(PathKeyRef::new(dir)) {
                parents.push(dir.to_path_buf());
            }
            a = dir.parent();
        }
    }
    for d in parents {
        out.entry(PathKey(d.clone()))
            .or_insert_with(|| Entry::dir(d, 0o755, uid, gid));
    }
}

fn apply_meta(e: &mut Entry, spec: &CopySpec) {
    if let Some((u, g)) = spec.chown {
        e.uid = u;
        e.gid = g;
    } else if !spec.keep_owner {
        e.uid = 0;
        e.gid = 0;
    }
    if let Some(m) = spec.chmod
        && !matches!(e.kind, EntryKind::Symlink { .. })
    {
        e.mode = m;
    }
}

fn is_local_archive(src: &FsTree, path: &Path) -> Result<bool, CopyError> {
    let r = src.open(path)?;
    Ok(crate::layer::is_archive_reader(r)?)
}

fn extract_into(
    spec: &CopySpec,
    src: &FsTree,
    path: &Path,
    dest_real: &Path,
    spool: &Path,
    out: &mut BTreeMap<PathKey, Entry>,
) -> Result<(), CopyError> {
    let mut tree = FsTree::new();
    let r = crate::layer::open_decompressed(BufReader::new(src.open(path)?))?;
    tree.apply_tar(r, Some(spool))?;
    for mut e in tree.entries_under("")? {
        e.path = dest_real.join(&e.path);
        if let Some((u, g)) = spec.chown {
            e.uid = u;
            e.gid = g;
        }
        out.insert(PathKey(e.path.clone()), e);
    }
    Ok(())
}
