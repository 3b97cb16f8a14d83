//! Preparing a run before forking: mountpoints in the skeleton layer (or the scratch root),
//! the mounts stage 2 performs, and the command's `execve` arguments, all as C strings.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use libc::c_ulong;

use super::child::{Exec, Op, PlannedOp};
use super::view::{self, Found};
use super::{DEFAULT_PATH, IdMap, Mount, Network, Result, RunSpec, SandboxError};

pub(super) fn cstr(bytes: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(bytes).map_err(|e| SandboxError::InvalidSpec(format!("NUL byte in {e}")))
}

pub(super) fn cpath(p: &Path) -> Result<CString> {
    cstr(p.as_os_str().as_bytes())
}

/// `target` as a clean relative path, or an error naming what it is for.
pub(super) fn container_rel(target: &str, what: &str) -> Result<PathBuf> {
    let bad =
        || SandboxError::InvalidSpec(format!("{what} {target:?} must be a clean absolute path"));
    if !target.starts_with('/') {
        return Err(bad());
    }
    let mut rel = PathBuf::new();
    for c in Path::new(target).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => rel.push(n),
            _ => return Err(bad()),
        }
    }
    Ok(rel)
}

/// Whether the mountpoint is a directory or a file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Point {
    Dir,
    File,
}

/// Creates missing mountpoints in `dest` (the skeleton layer on top of the lowers, or the
/// copy-based scratch root), copying the metadata of directories the lowers already have so
/// the skeleton does not change what the merged view shows.
pub(super) struct Mountpoints<'a> {
    layers: Vec<PathBuf>,
    dest: &'a Path,
    ids: &'a IdMap,
    ops: Vec<PlannedOp>,
    steps: Vec<String>,
}

impl Mountpoints<'_> {
    /// Ensure `rel` exists as `point`; `Ok(false)` when it cannot be (a symlink on the way) and
    /// `skip_symlinks` is set.
    fn ensure(&mut self, rel: &Path, point: Point, skip_symlinks: bool) -> Result<bool> {
        let shown = || format!("/{}", rel.display());
        match view::lookup(&self.layers, rel)? {
            Found::Dir(_) if point == Point::Dir => return Ok(true),
            Found::File if point == Point::File => return Ok(true),
            Found::Dir(_) => {
                return Err(SandboxError::InvalidSpec(format!(
                    "mount target {} is a directory in the image but the source is a file",
                    shown()
                )));
            }
            Found::File => {
                return Err(SandboxError::InvalidSpec(format!(
                    "mount target {} is a file in the image but the source is a directory",
                    shown()
                )));
            }
            Found::Symlink(_) if skip_symlinks => return Ok(false),
            Found::Symlink(p) | Found::NotDir(p) => {
                return Err(SandboxError::InvalidSpec(format!(
                    "mount target {} goes through /{}, which is not a directory",
                    shown(),
                    p.display()
                )));
            }
            Found::Missing => {}
        }
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            prefix.push(c);
            let at = self.dest.join(&prefix);
            let last = i + 1 == comps.len();
            if last {
                if point == Point::Dir {
                    self.mkdir(&at, 0o755, 0, 0)?;
                } else {
                    fs_err::File::create(&at)?;
                    self.chown(&at, 0, 0)?;
                }
                break;
            }
            match view::lookup(&self.layers, &prefix)? {
                Found::Dir(meta) => {
                    let uid = self.ids.uid_to_container(meta.uid()).unwrap_or(0);
                    let gid = self.ids.gid_to_container(meta.gid()).unwrap_or(0);
                    self.mkdir(&at, meta.mode() & 0o7777, uid, gid)?;
                }
                Found::Missing => self.mkdir(&at, 0o755, 0, 0)?,
                Found::Symlink(_) if skip_symlinks => return Ok(false),
                _ => {
                    return Err(SandboxError::InvalidSpec(format!(
                        "mount target {} goes through /{}, which is not a directory",
                        shown(),
                        prefix.display()
                    )));
                }
            }
        }
        Ok(true)
    }

    fn mkdir(&mut self, at: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
        if at.symlink_metadata().is_ok() {
            return Ok(());
        }
        fs_err::create_dir(at)?;
        fs_err::set_permissions(at, std::fs::Permissions::from_mode(mode))?;
        self.chown(at, uid, gid)
    }

    /// Ownership is set by the sandbox's init, inside the user namespace, where the container
    /// ids exist even when the caller could not chown to them.
    fn chown(&mut self, at: &Path, uid: u32, gid: u32) -> Result<()> {
        self.steps
            .push(format!("chown {} {uid}:{gid}", at.display()));
        self.ops.push(PlannedOp {
            op: Op::Chown {
                path: cpath(at)?,
                uid,
                gid,
            },
            optional: false,
        });
        Ok(())
    }
}

/// Mount flags of the mount holding `path`: a read-only remount of a bind inside a user
/// namespace must keep the flags the kernel locked (nosuid, nodev, noexec, atime).
pub(super) fn locked_flags(path: &Path) -> Result<c_ulong> {
    let c = cpath(path)?;
    // SAFETY: statvfs is plain data filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(fs_err_io(path, io::Error::last_os_error()));
    }
    let f = st.f_flag;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

pub(super) fn fs_err_io(path: &Path, e: io::Error) -> SandboxError {
    SandboxError::Io(io::Error::new(
        e.kind(),
        format!("{e} (path: {})", path.display()),
    ))
}

/// Escape a path for overlayfs' comma- and colon-separated options.
pub(super) fn overlay_escape(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        if matches!(b, b',' | b':' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// Ops and their descriptions, built in order.
#[derive(Default)]
pub(super) struct Ops {
    pub(super) ops: Vec<PlannedOp>,
    pub(super) steps: Vec<String>,
}

impl Ops {
    fn push(&mut self, step: String, op: Op, optional: bool) {
        self.steps.push(step);
        self.ops.push(PlannedOp { op, optional });
    }

    fn mount(
        &mut self,
        source: Option<&[u8]>,
        target: &Path,
        fstype: Option<&str>,
        flags: c_ulong,
        data: Option<&str>,
        optional: bool,
    ) -> Result<()> {
        let step = format!(
            "mount {} on {}",
            fstype.map_or_else(
                || String::from_utf8_lossy(source.unwrap_or_default()).into_owned(),
                str::to_owned
            ),
            target.display()
        );
        let op = Op::Mount {
            source: source.map(cstr).transpose()?,
            target: cpath(target)?,
            fstype: fstype.map(cstr).transpose()?,
            flags,
            data: data.map(cstr).transpose()?,
        };
        self.push(step, op, optional);
        Ok(())
    }

    fn bind(&mut self, source: &Path, target: &Path, readonly: bool) -> Result<()> {
        let src = source.as_os_str().as_bytes();
        self.mount(
            Some(src),
            target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
            false,
        )?;
        if readonly {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(source)?;
            self.mount(None, target, None, flags, None, false)?;
        }
        Ok(())
    }
}

/// Which of `/etc/hosts` and `/etc/resolv.conf` get bound from the host.
pub(super) type HostFiles = Vec<&'static str>;

/// Create the mountpoints the run needs under `dest`; returns the ops that fix their
/// ownership inside the namespace, their descriptions, and the host files to bind.
pub(super) fn mountpoints(
    spec: &RunSpec,
    ids: &IdMap,
    dest: &Path,
    layers_top_first: Vec<PathBuf>,
) -> Result<(Vec<PlannedOp>, Vec<String>, HostFiles)> {
    let mut mp = Mountpoints {
        layers: layers_top_first,
        dest,
        ids,
        ops: Vec::new(),
        steps: Vec::new(),
    };
    mp.ensure(Path::new("proc"), Point::Dir, false)?;
    mp.ensure(Path::new("dev"), Point::Dir, false)?;
    let mut hosts = Vec::new();
    if spec.network == Network::Host {
        for f in ["etc/hosts", "etc/resolv.conf"] {
            if Path::new("/").join(f).is_file() && mp.ensure(Path::new(f), Point::File, true)? {
                hosts.push(f);
            } else {
                tracing::debug!(
                    file = f,
                    "not binding host file (missing, or a symlink in the image)"
                );
            }
        }
    }
    for m in &spec.mounts {
        let rel = container_rel(m.target(), "mount target")?;
        if rel.as_os_str().is_empty() || rel == Path::new("proc") || rel == Path::new("dev") {
            return Err(SandboxError::InvalidSpec(format!(
                "mount target {} is reserved",
                m.target()
            )));
        }
        if rel.starts_with("dev") || rel.starts_with("proc") {
            // Made inside the sandbox's own /dev (see mount_ops); /proc is refused there.
            continue;
        }
        mp.ensure(&rel, point_of(m)?, false)?;
    }
    Ok((mp.ops, mp.steps, hosts))
}

/// Whether mount `m` needs a directory or a file as its mountpoint.
fn point_of(m: &Mount) -> Result<Point> {
    Ok(match m {
        Mount::Bind { source, .. } if !fs_err::metadata(source)?.is_dir() => Point::File,
        Mount::Secret { .. } => Point::File,
        _ => Point::Dir,
    })
}

/// The mounts stage 2 performs under the assembled root `root`; `staging` is an empty host
/// directory where a private tmpfs holds the secrets before they are bound into place.
pub(super) fn mount_ops(
    spec: &RunSpec,
    root: &Path,
    staging: &Path,
    hosts: &HostFiles,
) -> Result<Ops> {
    let mut ops = Ops::default();
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    ops.mount(
        Some(b"proc"),
        &root.join("proc"),
        Some("proc"),
        nosuid_nodev_noexec,
        None,
        false,
    )?;
    let dev = root.join("dev");
    ops.mount(
        Some(b"tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
        false,
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        let optional = name == "tty";
        ops.push(
            format!("create {}", target.display()),
            Op::Touch {
                path: cpath(&target)?,
            },
            optional,
        );
        let source = Path::new("/dev").join(name);
        let src = source.as_os_str().as_bytes();
        ops.mount(Some(src), &target, None, libc::MS_BIND, None, optional)?;
    }
    let pts = dev.join("pts");
    ops.push(
        format!("create {}", pts.display()),
        Op::Mkdir {
            path: cpath(&pts)?,
            mode: 0o755,
        },
        false,
    );
    ops.mount(
        Some(b"devpts"),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
        true,
    )?;
    let shm = dev.join("shm");
    ops.push(
        format!("create {}", shm.display()),
        Op::Mkdir {
            path: cpath(&shm)?,
            mode: 0o1777,
        },
        false,
    );
    ops.mount(
        Some(b"shm"),
        &shm,
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some("mode=1777,size=65536k"),
        false,
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = dev.join(link);
        ops.push(
            format!("symlink {}", link.display()),
            Op::Symlink {
                target: cstr(target)?,
                link: cpath(&link)?,
            },
            false,
        );
    }
    for f in hosts {
        ops.bind(&Path::new("/").join(f), &root.join(f), true)?;
    }
    for (path, uid, gid) in &spec.chown {
        ops.push(
            format!("chown {} {uid}:{gid}", path.display()),
            Op::Chown {
                path: cpath(path)?,
                uid: *uid,
                gid: *gid,
            },
            false,
        );
    }
    if spec
        .mounts
        .iter()
        .any(|m| matches!(m, Mount::Secret { .. }))
    {
        ops.mount(
            Some(b"tmpfs"),
            staging,
            Some("tmpfs"),
            nosuid_nodev_noexec,
            Some("mode=700,size=16m"),
            false,
        )?;
    }
    let mut mounted: Vec<PathBuf> = vec![PathBuf::from("dev")];
    for (n, m) in spec.mounts.iter().enumerate() {
        let rel = container_rel(m.target(), "mount target")?;
        if rel.starts_with("proc") {
            return Err(SandboxError::InvalidSpec(format!(
                "mount target {} is below /proc",
                m.target()
            )));
        }
        let target = root.join(&rel);
        // A mountpoint below an earlier mount (or /dev) is not in the skeleton's view: make
        // it, and the directories leading to it, there.
        if let Some(base) = mounted.iter().find(|p| rel.starts_with(p)) {
            let mut dir = root.join(base);
            let below: Vec<_> = rel
                .strip_prefix(base)
                .expect("checked")
                .components()
                .collect();
            for c in below.iter().take(below.len().saturating_sub(1)) {
                dir.push(c);
                ops.push(
                    format!("create {}", dir.display()),
                    Op::Mkdir {
                        path: cpath(&dir)?,
                        mode: 0o755,
                    },
                    false,
                );
            }
            let op = match point_of(m)? {
                Point::File => Op::Touch {
                    path: cpath(&target)?,
                },
                Point::Dir => Op::Mkdir {
                    path: cpath(&target)?,
                    mode: 0o755,
                },
            };
            ops.push(format!("create {}", target.display()), op, false);
        }
        match m {
            Mount::Secret {
                data,
                mode,
                uid,
                gid,
                ..
            } => {
                let file = staging.join(format!("secret-{n}"));
                ops.push(
                    format!("write secret for {}", m.target()),
                    Op::WriteFile {
                        path: cpath(&file)?,
                        data: data.0.clone(),
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                    },
                    false,
                );
                let src = file.as_os_str().as_bytes();
                ops.mount(Some(src), &target, None, libc::MS_BIND, None, false)?;
                let flags =
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev_noexec;
                ops.mount(None, &target, None, flags, None, false)?;
            }
            Mount::Bind {
                source, readonly, ..
            } => ops.bind(source, &target, *readonly)?,
            Mount::Tmpfs { size, .. } => {
                let data = size.map(|s| format!("size={s}"));
                ops.mount(
                    Some(b"tmpfs"),
                    &target,
                    Some("tmpfs"),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    data.as_deref(),
                    false,
                )?;
            }
        }
        mounted.push(rel);
    }
    if spec.network == Network::None {
        ops.push("bring up lo".into(), Op::LoopbackUp, false);
    }
    Ok(ops)
}

/// Build the command's exec: candidates from the spec's `PATH`, argv and envp.
pub(super) fn command_exec(spec: &RunSpec) -> Result<Exec> {
    let argv0 = &spec.argv[0];
    let candidates = if argv0.contains('/') {
        vec![cstr(argv0.as_bytes())?]
    } else {
        let path = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        path.split(':')
            .map(|d| cstr(format!("{}/{argv0}", if d.is_empty() { "." } else { d })))
            .collect::<Result<_>>()?
    };
    let argv = spec
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<_>>()?;
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') {
                return Err(SandboxError::InvalidSpec(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
            cstr(format!("{k}={v}"))
        })
        .collect::<Result<_>>()?;
    Ok(Exec::new(candidates, argv, envp))
}
