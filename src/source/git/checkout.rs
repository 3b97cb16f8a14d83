//! A fetched commit, read straight from the object database: no working tree on disk.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::Arc;

use gix::ObjectId;
use gix::objs::tree::EntryKind as GitKind;

use crate::layer::{Entry, FileSource, Opener};
use crate::source::SourceError;

use super::context::normalize_subdir;

/// How many symlinks [`GitCheckout::read_file`] follows before giving up.
const MAX_SYMLINK_HOPS: usize = 16;

/// One commit of a cached repository, ready to be walked.
#[derive(Clone)]
pub struct GitCheckout {
    /// The commit id, 40 lowercase hex digits.
    pub commit: String,
    /// The committer time, seconds since the Unix epoch (a natural `SOURCE_DATE_EPOCH`).
    pub commit_time: i64,
    /// The commit's root tree.
    tree: ObjectId,
    repo: gix::ThreadSafeRepository,
}

impl std::fmt::Debug for GitCheckout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCheckout")
            .field("commit", &self.commit)
            .field("commit_time", &self.commit_time)
            .finish_non_exhaustive()
    }
}

/// Reads one blob from the object database each time it is opened.
struct BlobOpener {
    repo: gix::ThreadSafeRepository,
    id: ObjectId,
}

impl Opener for BlobOpener {
    fn open(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        // Blobs in packs are stored deltified and compressed; gix decodes one whole, so a
        // file's bytes are in memory while it is read (one file at a time).
        let repo = self.repo.to_thread_local();
        let blob = repo
            .find_blob(self.id)
            .map_err(|e| std::io::Error::other(format!("cannot read git blob {}: {e}", self.id)))?;
        Ok(Box::new(std::io::Cursor::new(blob.detach().data)))
    }
}

/// A submodule (gitlink) of a tree: its path and the commit it pins (hex).
pub type Submodule = (PathBuf, String);

impl GitCheckout {
    /// Opens `commit` in `repo`, failing if it is missing or not a commit.
    pub(crate) fn open(
        repo: gix::ThreadSafeRepository,
        commit: ObjectId,
    ) -> Result<GitCheckout, SourceError> {
        let local = repo.to_thread_local();
        let obj_err = |e: gix::Error| object_error(commit, e);
        let c = local.find_commit(commit).map_err(obj_err)?;
        let tree = c.tree_id().map_err(obj_err)?.detach();
        let commit_time = c.time().map_err(obj_err)?.seconds;
        drop(c);
        Ok(GitCheckout {
            commit: commit.to_string(),
            commit_time,
            tree,
            repo,
        })
    }

    /// Every directory, file and symlink below `subdir` (the repository root when `None`),
    /// with paths relative to it, parents before children and siblings in byte order of
    /// their names (the order [`LocalContext`](crate::source::LocalContext) produces).
    ///
    /// Modes follow git's: directories and executable files `0755`, other files `0644`,
    /// symlinks `0777` with the blob's content as target; owners are `0:0`. Files are
    /// [`FileSource::Open`] with id `git:<blob id>`, read from the object database when
    /// opened; sizes come from the object headers. Submodules (gitlinks) are skipped: their
    /// commits are not in this repository.
    pub fn entries(&self, subdir: Option<&str>) -> Result<Vec<Entry>, SourceError> {
        Ok(self.entries_and_submodules(subdir)?.0)
    }

    /// Like [`entries`](Self::entries), plus the submodules (gitlinks) found: their paths
    /// (relative to `subdir`) and commit ids, for a caller that fetches them.
    pub fn entries_and_submodules(
        &self,
        subdir: Option<&str>,
    ) -> Result<(Vec<Entry>, Vec<Submodule>), SourceError> {
        let repo = self.repo.to_thread_local();
        let root = self.subdir_tree(&repo, subdir)?;
        let mut out = Vec::new();
        let mut links = Vec::new();
        self.walk(&repo, root, &mut PathBuf::new(), &mut out, &mut links)?;
        Ok((out, links))
    }

    /// The content of the file at `path` (relative to the repository root, `/`-separated),
    /// following symlinks that stay inside the repository; `None` if nothing is there or it
    /// is not a file. Meant for the Dockerfile and `.dockerignore`.
    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let repo = self.repo.to_thread_local();
        let mut path = match normalize_subdir(path) {
            Ok(Some(p)) => p,
            _ => return Ok(None),
        };
        for _ in 0..MAX_SYMLINK_HOPS {
            let Some((kind, id)) = self.lookup(&repo, &path)? else {
                return Ok(None);
            };
            match kind {
                GitKind::Blob | GitKind::BlobExecutable => {
                    return Ok(Some(self.blob(&repo, id)?));
                }
                GitKind::Link => {
                    let target = self.blob(&repo, id)?;
                    let target = String::from_utf8_lossy(&target);
                    if target.starts_with('/') {
                        // Points outside the repository.
                        return Ok(None);
                    }
                    let base = match path.rsplit_once('/') {
                        Some((parent, _)) => format!("{parent}/{target}"),
                        None => target.into_owned(),
                    };
                    match resolve_dots(&base) {
                        Some(p) => path = p,
                        None => return Ok(None),
                    }
                }
                GitKind::Tree | GitKind::Commit => return Ok(None),
            }
        }
        Ok(None)
    }

    fn subdir_tree(
        &self,
        repo: &gix::Repository,
        subdir: Option<&str>,
    ) -> Result<ObjectId, SourceError> {
        let missing = || SourceError::GitSubdirNotFound {
            subdir: subdir.unwrap_or_default().to_string(),
            commit: self.commit.clone(),
        };
        let Some(subdir) = normalize_subdir(subdir.unwrap_or_default()).map_err(|_| missing())?
        else {
            return Ok(self.tree);
        };
        match self.lookup(repo, &subdir)? {
            Some((GitKind::Tree, id)) => Ok(id),
            _ => Err(missing()),
        }
    }

    /// The kind and id of the entry at a clean relative `path`, without following symlinks.
    fn lookup(
        &self,
        repo: &gix::Repository,
        path: &str,
    ) -> Result<Option<(GitKind, ObjectId)>, SourceError> {
        let mut tree = self.tree;
        let mut parts = path.split('/').peekable();
        while let Some(name) = parts.next() {
            let t = repo.find_tree(tree).map_err(|e| object_error(tree, e))?;
            let decoded = t.decode().map_err(|e| object_error(tree, e))?;
            let Some(entry) = decoded
                .entries
                .iter()
                .find(|e| e.filename == name.as_bytes())
            else {
                return Ok(None);
            };
            let (kind, id) = (entry.mode.kind(), entry.oid.to_owned());
            if parts.peek().is_none() {
                return Ok(Some((kind, id)));
            }
            if kind != GitKind::Tree {
                return Ok(None);
            }
            tree = id;
        }
        Ok(None)
    }

    fn blob(&self, repo: &gix::Repository, id: ObjectId) -> Result<Vec<u8>, SourceError> {
        Ok(repo
            .find_blob(id)
            .map_err(|e| object_error(id, e))?
            .detach()
            .data)
    }

    fn walk(
        &self,
        repo: &gix::Repository,
        tree: ObjectId,
        prefix: &mut PathBuf,
        out: &mut Vec<Entry>,
        links: &mut Vec<Submodule>,
    ) -> Result<(), SourceError> {
        let t = repo.find_tree(tree).map_err(|e| object_error(tree, e))?;
        let decoded = t.decode().map_err(|e| object_error(tree, e))?;
        let mut children: Vec<(Vec<u8>, GitKind, ObjectId)> = decoded
            .entries
            .iter()
            .map(|e| (e.filename.to_vec(), e.mode.kind(), e.oid.to_owned()))
            .collect();
        drop(decoded);
        drop(t);
        // git sorts a directory as if its name ended in `/`; contexts sort plain bytes.
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind, id) in children {
            prefix.push(std::ffi::OsStr::from_bytes(&name));
            match kind {
                GitKind::Tree => {
                    out.push(Entry::dir(prefix.clone(), 0o755, 0, 0));
                    self.walk(repo, id, prefix, out, links)?;
                }
                GitKind::Blob | GitKind::BlobExecutable => {
                    let size = repo
                        .find_header(id)
                        .map_err(|e| object_error(id, e))?
                        .size();
                    let mode = if kind == GitKind::BlobExecutable {
                        0o755
                    } else {
                        0o644
                    };
                    let source = FileSource::Open {
                        id: format!("git:{id}"),
                        opener: Arc::new(BlobOpener {
                            repo: self.repo.clone(),
                            id,
                        }),
                    };
                    out.push(Entry::file(prefix.clone(), source, size, mode, 0, 0));
                }
                GitKind::Link => {
                    let target = PathBuf::from(OsString::from_vec(self.blob(repo, id)?));
                    out.push(Entry::symlink(prefix.clone(), target, 0, 0));
                }
                GitKind::Commit => {
                    tracing::debug!(path = %prefix.display(), "git submodule");
                    links.push((prefix.clone(), id.to_string()));
                }
            }
            prefix.pop();
        }
        Ok(())
    }
}

/// A `/`-separated path with `.` and `..` resolved; `None` if it leaves the root.
fn resolve_dots(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn object_error(id: ObjectId, e: gix::Error) -> SourceError {
    SourceError::GitObject {
        id: id.to_string(),
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_dots;

    #[test]
    fn dots() {
        assert_eq!(resolve_dots("a/./b/../c").as_deref(), Some("a/c"));
        assert_eq!(resolve_dots("../x"), None);
        assert_eq!(resolve_dots("a/.."), None);
    }
}
