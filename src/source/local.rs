//! A build context in a local directory, read the way BuildKit's `fsutil` walker sends it.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::layer::{Entry, EntryKind, FileSource};

use super::SourceError;
use super::ignore::Dockerignore;

/// A local directory used as a build context.
#[derive(Clone, Debug)]
pub struct LocalContext {
    dir: PathBuf,
}

/// A directory on the walk's current path, with the ignore rules that apply to it.
struct Ancestor {
    depth: usize,
    hits: Vec<bool>,
    /// The directory's entry while it is excluded and not yet written: it is written only if
    /// an exception re-includes something below it.
    pending: Option<Entry>,
}

/// A depth-first walk of a directory in the order of BuildKit's walker: parents before
/// children, siblings in byte order of their names, symlinks not followed.
///
/// Unlike `walkdir`, which stats every entry by its full path (a lookup of each component),
/// entries are stat'ed relative to their open directory (`statx(dirfd, name)`, what
/// `std::fs::DirEntry::metadata` does).
struct Walk {
    /// Per open directory: its depth, and its entries not yet yielded, last first.
    stack: Vec<(usize, Vec<std::fs::DirEntry>)>,
    /// The directory yielded last, entered on the next call unless skipped.
    descend: Option<(usize, PathBuf)>,
}

/// One entry of a [`Walk`].
struct WalkItem {
    path: PathBuf,
    depth: usize,
    file_type: std::fs::FileType,
    entry: std::fs::DirEntry,
}

impl WalkItem {
    fn metadata(&self) -> Result<std::fs::Metadata, SourceError> {
        self.entry.metadata().map_err(|source| SourceError::Read {
            path: self.path.clone(),
            source,
        })
    }
}

impl Walk {
    fn new(root: &Path) -> Result<Walk, SourceError> {
        Ok(Walk {
            stack: vec![(1, Walk::read(root)?)],
            descend: None,
        })
    }

    /// A directory's entries, sorted so that popping yields them in byte order.
    fn read(dir: &Path) -> Result<Vec<std::fs::DirEntry>, SourceError> {
        let read = |source| SourceError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut entries = std::fs::read_dir(dir)
            .map_err(read)?
            .map(|e| e.map(|e| (e.file_name(), e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read)?;
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(entries.into_iter().rev().map(|(_, e)| e).collect())
    }

    /// Do not enter the directory yielded last.
    fn skip_current_dir(&mut self) {
        self.descend = None;
    }

    fn next(&mut self) -> Result<Option<WalkItem>, SourceError> {
        if let Some((depth, dir)) = self.descend.take() {
            let entries = Walk::read(&dir)?;
            self.stack.push((depth + 1, entries));
        }
        while let Some((depth, entries)) = self.stack.last_mut() {
            let Some(entry) = entries.pop() else {
                self.stack.pop();
                continue;
            };
            let depth = *depth;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|source| SourceError::Read {
                path: path.clone(),
                source,
            })?;
            if file_type.is_dir() {
                self.descend = Some((depth, path.clone()));
            }
            return Ok(Some(WalkItem {
                path,
                depth,
                file_type,
                entry,
            }));
        }
        Ok(None)
    }
}

impl LocalContext {
    /// Opens the context directory; the path is made absolute (symlinks resolved) so the
    /// file sources the walk produces do not depend on the working directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<LocalContext, SourceError> {
        let dir = fs_err::canonicalize(dir.as_ref())?;
        if !fs_err::metadata(&dir)?.is_dir() {
            return Err(SourceError::NotADirectory { path: dir });
        }
        Ok(LocalContext { dir })
    }

    /// The absolute context directory.
    pub fn context_dir(&self) -> &Path {
        &self.dir
    }

    /// Every file, directory and symlink of the context that `ignore` does not exclude, with
    /// paths relative to the context root (which has no entry of its own), parents before
    /// children and siblings in byte order of their names.
    ///
    /// Symlinks are not followed. Names that are not UTF-8 are matched against the ignore
    /// patterns in their lossy UTF-8 form but keep their exact bytes in the entries. Owners are root (0:0), as for any `COPY` without `--chown`;
    /// modes are the permission bits on disk. Regular files with several links share a
    /// `link_key` derived from (device, inode). Sockets, FIFOs and device nodes are skipped
    /// with a warning. An excluded directory is still walked when an exception could
    /// re-include something below it, and is then written if something was.
    pub fn entries(&self, ignore: &Dockerignore) -> Result<Vec<Entry>, SourceError> {
        let mut out = Vec::new();
        let mut ancestors: Vec<Ancestor> = Vec::new();
        let mut walk = Walk::new(&self.dir)?;
        while let Some(item) = walk.next()? {
            let depth = item.depth;
            while ancestors.last().is_some_and(|a| a.depth >= depth) {
                ancestors.pop();
            }
            let rel = item
                .path
                .strip_prefix(&self.dir)
                .expect("the walk yields paths below its root")
                .to_path_buf();
            let rel_str = rel.to_string_lossy();
            let hits = ignore.hits(&rel_str, ancestors.last().map(|a| a.hits.as_slice()));
            let excluded = ignore.excluded_with(&hits);
            let file_type = item.file_type;

            if file_type.is_dir() {
                if excluded && ignore.prune_with(&hits, &rel_str) {
                    walk.skip_current_dir();
                    continue;
                }
                let meta = item.metadata()?;
                let entry = Entry::dir(rel, meta.mode() & 0o7777, 0, 0);
                let pending = if excluded {
                    Some(entry)
                } else {
                    flush(&mut ancestors, &mut out);
                    out.push(entry);
                    None
                };
                ancestors.push(Ancestor {
                    depth,
                    hits,
                    pending,
                });
                continue;
            }
            if excluded {
                continue;
            }
            let meta = item.metadata()?;
            let path = item.path.as_path();
            let kind = if file_type.is_file() {
                // Fail now, naming the file, rather than halfway through writing a layer. The
                // mode bits answer for nearly every file without a syscall; only a file they
                // say we cannot read is opened, for the system's own error (or an ACL's yes).
                if !may_read(&meta) {
                    fs_err::File::open(path)?;
                }
                EntryKind::File {
                    source: FileSource::Path(path.to_path_buf()),
                    size: meta.len(),
                    link_key: (meta.nlink() > 1).then(|| link_key(meta.dev(), meta.ino())),
                }
            } else if file_type.is_symlink() {
                EntryKind::Symlink {
                    target: fs_err::read_link(path)?,
                }
            } else {
                let what = if file_type.is_socket() {
                    "socket"
                } else if file_type.is_fifo() {
                    "fifo"
                } else {
                    "device node"
                };
                tracing::warn!(path = %path.display(), "skipping {what} in build context");
                continue;
            };
            flush(&mut ancestors, &mut out);
            out.push(Entry {
                path: rel,
                kind,
                mode: meta.mode() & 0o7777,
                uid: 0,
                gid: 0,
            });
        }
        Ok(out)
    }
}

/// Writes the excluded ancestors that are still pending, outermost first: something below
/// them is being included.
fn flush(ancestors: &mut [Ancestor], out: &mut Vec<Entry>) {
    out.extend(ancestors.iter_mut().filter_map(|a| a.pending.take()));
}

/// A hardlink group key: a fixed mix of (device, inode), injective in the inode for a given
/// device, so equal keys mean one file.
fn link_key(dev: u64, ino: u64) -> u64 {
    // splitmix64's finaliser: a bijection on u64.
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    mix(mix(dev) ^ ino)
}

/// Normalises a `COPY` source path given relative to the context: `.` and empty components
/// are dropped, `..` is resolved lexically, and a leading `/` means the context root. Returns
/// the `/`-separated relative path, empty for the root itself.
///
/// A path that climbs above the root (`../x`, `/../x`, `a/../../x`) is refused with
/// [`SourceError::OutsideContext`], as the classic Docker builder does (BuildKit silently
/// clamps it to the root instead).
pub fn normalize_context_path(path: &str) -> Result<String, SourceError> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(SourceError::OutsideContext {
                        path: path.to_owned(),
                    });
                }
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// Whether the mode bits let this process read a file (root reads everything). ACLs are not
/// consulted: a `false` is double-checked by opening the file.
fn may_read(meta: &std::fs::Metadata) -> bool {
    static IDS: std::sync::OnceLock<(u32, u32, Vec<u32>)> = std::sync::OnceLock::new();
    let (uid, gid, groups) = IDS.get_or_init(|| {
        // SAFETY: plain syscalls without memory arguments, or filling a buffer of the length
        // passed (getgroups with the count it reported).
        unsafe {
            let n = libc::getgroups(0, std::ptr::null_mut());
            let mut groups = vec![0; usize::try_from(n).unwrap_or(0)];
            let n = libc::getgroups(n.max(0), groups.as_mut_ptr());
            groups.truncate(usize::try_from(n).unwrap_or(0));
            (libc::geteuid(), libc::getegid(), groups)
        }
    });
    let mode = meta.mode();
    if *uid == 0 {
        return true;
    }
    if meta.uid() == *uid {
        return mode & 0o400 != 0;
    }
    if meta.gid() == *gid || groups.contains(&meta.gid()) {
        return mode & 0o040 != 0;
    }
    mode & 0o004 != 0
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    /// path → (kind letter, mode), for compact assertions.
    fn summary(entries: &[Entry]) -> BTreeMap<String, (char, u32)> {
        entries
            .iter()
            .map(|e| {
                let kind = match e.kind {
                    EntryKind::Dir => 'd',
                    EntryKind::File { .. } => 'f',
                    EntryKind::Symlink { .. } => 'l',
                };
                (e.path.to_string_lossy().into_owned(), (kind, e.mode))
            })
            .collect()
    }

    fn write(root: &Path, rel: &str, body: &str, mode: u32) {
        let path = root.join(rel);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(&path, body).unwrap();
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkdir(root: &Path, rel: &str, mode: u32) {
        let path = root.join(rel);
        fs_err::create_dir_all(&path).unwrap();
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn walk_reports_kinds_modes_links_and_names() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "Dockerfile", "FROM scratch\n", 0o644);
        write(root, "bin/run.sh", "#!/bin/sh\n", 0o755);
        write(root, "bin/setuid", "", 0o4750);
        mkdir(root, "bin", 0o750);
        mkdir(root, "empty", 0o700);
        write(root, "data/æøå ☺.txt", "blåbær", 0o600);
        symlink("../bin/run.sh", root.join("data/link")).unwrap();
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
        symlink("bin", root.join("binlink")).unwrap();
        write(root, "hard/a", "same", 0o644);
        fs_err::hard_link(root.join("hard/a"), root.join("hard/b")).unwrap();
        mkdir(root, "data", 0o755);
        mkdir(root, "hard", 0o755);
        let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

        let ctx = LocalContext::open(root).unwrap();
        assert_eq!(ctx.context_dir(), fs_err::canonicalize(root).unwrap());
        let entries = ctx.entries(&Dockerignore::empty()).unwrap();
        let got = summary(&entries);
        let want: BTreeMap<String, (char, u32)> = [
            ("Dockerfile", ('f', 0o644)),
            ("bin", ('d', 0o750)),
            ("bin/run.sh", ('f', 0o755)),
            ("bin/setuid", ('f', 0o4750)),
            ("empty", ('d', 0o700)),
            ("data", ('d', 0o755)),
            ("data/æøå ☺.txt", ('f', 0o600)),
            ("data/link", ('l', 0o777)),
            ("dangling", ('l', 0o777)),
            ("binlink", ('l', 0o777)),
            ("hard", ('d', 0o755)),
            ("hard/a", ('f', 0o644)),
            ("hard/b", ('f', 0o644)),
        ]
        .into_iter()
        .map(|(p, v)| (p.to_owned(), v))
        .collect();
        assert_eq!(got, want);
        assert!(entries.iter().all(|e| e.uid == 0 && e.gid == 0));

        // Parents come before children.
        for (i, e) in entries.iter().enumerate() {
            if let Some(parent) = e.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                let pos = entries.iter().position(|p| p.path == parent).unwrap();
                assert!(pos < i, "{} listed before its parent", e.path.display());
            }
        }

        let find = |p: &str| entries.iter().find(|e| e.path == Path::new(p)).unwrap();
        match &find("data/æøå ☺.txt").kind {
            EntryKind::File {
                source,
                size,
                link_key,
            } => {
                let abs = ctx.context_dir().join("data/æøå ☺.txt");
                assert_eq!(source, &FileSource::Path(abs));
                assert_eq!(*size, "blåbær".len() as u64);
                assert_eq!(*link_key, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            find("data/link").kind,
            EntryKind::Symlink {
                target: "../bin/run.sh".into()
            }
        );
        assert_eq!(
            find("dangling").kind,
            EntryKind::Symlink {
                target: "/nonexistent/target".into()
            }
        );
        let key = |p: &str| match find(p).kind {
            EntryKind::File { link_key, .. } => link_key,
            _ => panic!("{p} is not a file"),
        };
        assert!(key("hard/a").is_some());
        assert_eq!(key("hard/a"), key("hard/b"));
        assert_eq!(key("Dockerfile"), None);
    }

    #[test]
    fn walk_is_independent_of_creation_order() {
        let names = ["b", "a", "c/z", "c/y", "Ä", "_", "A"];
        let walk = |order: &[&str]| {
            let tmp = tempfile::tempdir().unwrap();
            for name in order {
                write(tmp.path(), name, name, 0o644);
            }
            let entries = LocalContext::open(tmp.path())
                .unwrap()
                .entries(&Dockerignore::empty())
                .unwrap();
            entries
                .into_iter()
                .map(|e| e.path.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let forward = walk(&names);
        let mut reversed = names;
        reversed.reverse();
        assert_eq!(forward, walk(&reversed));
        assert_eq!(forward, ["A", "_", "a", "b", "c", "c/y", "c/z", "Ä"]);
    }

    #[test]
    fn walk_applies_dockerignore() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for f in [
            ".dockerignore",
            ".git/HEAD",
            "App/Program.cs",
            "App/bin/Debug/App.dll",
            "App/obj/x.json",
            "docs/keep.txt",
            "docs/drop.txt",
            "docs/sub/deep.txt",
            "README.md",
            "NOTES.md",
        ] {
            write(root, f, "x", 0o644);
        }
        let ignore = Dockerignore::parse(
            ".dockerignore\n.git\n*/bin\n*/obj\n*.md\n!README.md\ndocs\n!docs/keep.txt\n",
        )
        .unwrap();
        let entries = LocalContext::open(root).unwrap().entries(&ignore).unwrap();
        let paths: Vec<String> = entries
            .iter()
            .map(|e| e.path.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            paths,
            [
                "App",
                "App/Program.cs",
                "README.md",
                "docs",
                "docs/keep.txt"
            ]
        );
    }

    #[test]
    fn open_rejects_files_and_missing_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "file", "", 0o644);
        assert!(matches!(
            LocalContext::open(tmp.path().join("file")),
            Err(SourceError::NotADirectory { .. })
        ));
        let err = LocalContext::open(tmp.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn normalize_paths() {
        for (input, want) in [
            ("./App/../App/x", "App/x"),
            ("App/x/", "App/x"),
            ("/App//x", "App/x"),
            (".", ""),
            ("/", ""),
            ("a/b/..", "a"),
            ("a/..", ""),
            ("æ/ø", "æ/ø"),
        ] {
            assert_eq!(normalize_context_path(input).unwrap(), want, "{input:?}");
        }
        for input in ["..", "../x", "/../x", "a/../../x", "./.."] {
            match normalize_context_path(input) {
                Err(SourceError::OutsideContext { path }) => assert_eq!(path, input),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn non_utf8_names_keep_their_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xff.log");
        fs_err::write(tmp.path().join(name), "x").unwrap();
        write(tmp.path(), "good.txt", "x", 0o644);
        let ctx = LocalContext::open(tmp.path()).unwrap();
        let all = ctx.entries(&Dockerignore::empty()).unwrap();
        assert_eq!(all[0].path.as_os_str(), name);
        let ignore = Dockerignore::parse("*.log\n").unwrap();
        let kept = ctx.entries(&ignore).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].path, Path::new("good.txt"));
    }

    #[test]
    fn link_keys_differ_per_inode() {
        assert_ne!(link_key(1, 2), link_key(1, 3));
        assert_ne!(link_key(1, 2), link_key(2, 2));
        assert_eq!(link_key(7, 9), link_key(7, 9));
    }
}
