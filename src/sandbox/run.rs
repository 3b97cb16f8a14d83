//! The parent side of a run: prepare mountpoints and the child plan, fork, write the id maps,
//! stream output, enforce the timeout and the cancel flag, and read back what the children
//! reported.
//!
//! A timeout and a cancel end a run the same way: SIGKILL to stage 1, whose death kills stage
//! 2 (`PR_SET_PDEATHSIG`), the init of the run's pid namespace, and with it every process of
//! the namespace; its mount namespace (overlay, tmpfs, secrets) goes with the last of them.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libc::c_int;

use super::child::{self, Exec, Fds, Plan, PlannedOp, RootfsStep, step};
use super::idmap::MapPlan;
use super::plan::{
    HostFiles, command_exec, container_rel, cpath, cstr, mount_ops, mountpoints, overlay_escape,
};
use super::{
    CANCEL_POLL, Network, Result, RootfsKind, RunOutcome, RunSpec, RunStatus, SandboxError,
};

/// The directories the sandbox uses inside `work`.
struct WorkDirs {
    root: PathBuf,
    overlay_work: PathBuf,
    skel: PathBuf,
    empty: PathBuf,
    scratch: PathBuf,
    secrets: PathBuf,
}

impl WorkDirs {
    fn new(work: &Path) -> WorkDirs {
        WorkDirs {
            root: work.join("root"),
            overlay_work: work.join("ovl"),
            skel: work.join("skel"),
            empty: work.join("empty"),
            scratch: work.join("scratch"),
            secrets: work.join("secrets"),
        }
    }
}

/// Run `spec`; see [`super::Sandbox::run_with`].
pub(super) fn run(
    fuse: Option<&Path>,
    spec: &RunSpec,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunOutcome> {
    if spec.argv.is_empty() {
        return Err(SandboxError::InvalidSpec("empty command".into()));
    }
    container_rel(&spec.cwd, "working directory")?;
    let map = MapPlan::for_current_user();
    map.map.check_user(spec.uid, spec.gid, &spec.groups)?;
    for d in [&spec.upper, &spec.work] {
        if !fs_err::metadata(d)?.is_dir() {
            return Err(SandboxError::InvalidSpec(format!(
                "{} is not a directory",
                d.display()
            )));
        }
    }
    let dirs = WorkDirs::new(&spec.work);
    if is_cancelled(spec) {
        return Ok(not_started(spec, &map));
    }
    if spec.rootfs != Some(RootfsKind::Copy) {
        let fuse = match spec.rootfs {
            Some(RootfsKind::KernelOverlay) => None,
            Some(RootfsKind::FuseOverlay) if fuse.is_none() => {
                return Err(SandboxError::InvalidSpec(
                    "fuse-overlayfs was asked for but is not installed".into(),
                ));
            }
            _ => fuse,
        };
        let only_fuse = spec.rootfs == Some(RootfsKind::FuseOverlay);
        match run_overlay(spec, &map, &dirs, fuse, only_fuse, on_line)? {
            Some(outcome) => return Ok(outcome),
            None if spec.rootfs.is_none() => {
                tracing::warn!("overlayfs unavailable; using a copy-based snapshot (slower)");
            }
            None => {
                return Err(SandboxError::Setup {
                    step: "mount overlay".into(),
                    source: io::Error::other("the kernel refused overlayfs"),
                });
            }
        }
    }
    if is_cancelled(spec) {
        return Ok(not_started(spec, &map));
    }
    let outcome = run_copy(spec, &map, &dirs, on_line);
    // The scratch root is a full copy of the image: never leave it behind.
    let _ = std::fs::remove_dir_all(&dirs.scratch);
    outcome
}

fn is_cancelled(spec: &RunSpec) -> bool {
    spec.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::SeqCst))
}

/// The outcome of a run cancelled before anything was started.
fn not_started(spec: &RunSpec, map: &MapPlan) -> RunOutcome {
    RunOutcome {
        status: RunStatus::Cancelled,
        output: Vec::new(),
        rootfs: spec.rootfs.unwrap_or(RootfsKind::Copy),
        ids: map.map.clone(),
    }
}

/// Run on an overlay; `None` when neither overlay mechanism could be mounted.
fn run_overlay(
    spec: &RunSpec,
    map: &MapPlan,
    dirs: &WorkDirs,
    fuse: Option<&Path>,
    only_fuse: bool,
    on_line: &mut dyn FnMut(&str),
) -> Result<Option<RunOutcome>> {
    for d in [&dirs.root, &dirs.overlay_work, &dirs.skel] {
        fs_err::create_dir_all(d)?;
    }
    let mut lowers: Vec<PathBuf> = spec.lower.iter().rev().cloned().collect();
    if lowers.is_empty() {
        fs_err::create_dir_all(&dirs.empty)?;
        lowers.push(dirs.empty.clone());
    }
    let (pre, pre_steps, hosts) = mountpoints(spec, &map.map, &dirs.skel, lowers.clone())?;
    // The kernel reads mount options from one page: a deep stack of long paths is given
    // relative to the lowers' common directory, which stage 2 enters before mounting.
    let absolute: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    let base = (absolute > OPTIONS_BUDGET)
        .then(|| common_dir(&lowers))
        .flatten();
    let mut options = b"lowerdir=".to_vec();
    options.extend(overlay_escape(&dirs.skel));
    for l in &lowers {
        options.push(b':');
        match &base {
            Some(b) => options.extend(overlay_escape(l.strip_prefix(b).expect("common prefix"))),
            None => options.extend(overlay_escape(l)),
        }
    }
    options.extend(b",upperdir=");
    options.extend(overlay_escape(&spec.upper));
    options.extend(b",workdir=");
    options.extend(overlay_escape(&dirs.overlay_work));
    let fuse_exec = fuse
        .map(|program| -> Result<Exec> {
            Ok(Exec::new(
                vec![cpath(program)?],
                vec![
                    cstr("fuse-overlayfs")?,
                    cstr("-o")?,
                    cstr(options.clone())?,
                    cpath(&dirs.root)?,
                ],
                Vec::new(),
            ))
        })
        .transpose()?;
    options.extend(b",userxattr");
    let rootfs = match fuse_exec {
        Some(f) if only_fuse => RootfsStep::Fuse(f),
        fuse => RootfsStep::Overlay {
            options: cstr(options)?,
            fuse,
        },
    };
    let rootfs = match &base {
        Some(b) => RootfsStep::InDir {
            dir: cpath(b)?,
            step: Box::new(rootfs),
        },
        None => rootfs,
    };
    let outcome = supervise(spec, map, dirs, rootfs, pre, pre_steps, hosts, on_line)?;
    Ok(outcome)
}

/// Bytes of lower paths given as absolute paths before they are made relative.
const OPTIONS_BUDGET: usize = 3000;

/// The deepest directory containing every path of `paths` (absolute paths), if it is not `/`.
fn common_dir(paths: &[PathBuf]) -> Option<PathBuf> {
    let mut common = paths.first()?.parent()?.to_path_buf();
    for p in paths {
        while !p.starts_with(&common) {
            common = common.parent()?.to_path_buf();
        }
    }
    (common.parent().is_some() && paths.iter().all(|p| p != &common)).then_some(common)
}

/// Run on a copy of the lowers, then diff the copy into the upper.
fn run_copy(
    spec: &RunSpec,
    map: &MapPlan,
    dirs: &WorkDirs,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunOutcome> {
    fs_err::create_dir_all(&dirs.root)?;
    let _ = std::fs::remove_dir_all(&dirs.scratch);
    fs_err::create_dir(&dirs.scratch)?;
    super::copy::populate(&spec.lower, &dirs.scratch)?;
    // Missing mountpoints are made by the caller, who is container root: no chown needed, and
    // one after the snapshot would show up as a change.
    let (_, _, hosts) = mountpoints(spec, &map.map, &dirs.scratch, vec![dirs.scratch.clone()])?;
    let (pre, pre_steps) = (Vec::new(), Vec::new());
    let snapshot = super::copy::Snapshot::take(&dirs.scratch)?;
    let rootfs = RootfsStep::Bind(cpath(&dirs.scratch)?);
    let outcome =
        supervise(spec, map, dirs, rootfs, pre, pre_steps, hosts, on_line)?.ok_or_else(|| {
            SandboxError::Setup {
                step: "bind the copied root".into(),
                source: io::Error::other("unexpected overlay report"),
            }
        })?;
    if outcome.status != RunStatus::Cancelled {
        snapshot.diff_into(&dirs.scratch, &spec.upper)?;
    }
    Ok(outcome)
}

/// Plan, fork and supervise one run. `None` when stage 2 reported that no overlay could be
/// mounted (nothing ran).
#[allow(clippy::too_many_arguments)]
fn supervise(
    spec: &RunSpec,
    map: &MapPlan,
    dirs: &WorkDirs,
    rootfs: RootfsStep,
    pre_ops: Vec<PlannedOp>,
    mut steps: Vec<String>,
    hosts: HostFiles,
    on_line: &mut dyn FnMut(&str),
) -> Result<Option<RunOutcome>> {
    fs_err::create_dir_all(&dirs.secrets)?;
    let ops = mount_ops(spec, &dirs.root, &dirs.secrets, &hosts)?;
    steps.extend(ops.steps);
    let rel_cwd = container_rel(&spec.cwd, "working directory")?;
    let mut cwd_dirs = Vec::new();
    let mut prefix = PathBuf::from("/");
    for c in rel_cwd.components() {
        prefix.push(c);
        cwd_dirs.push(cpath(&prefix)?);
    }
    let mut ns_flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    if spec.network == Network::None {
        ns_flags |= libc::CLONE_NEWNET;
    }
    let plan = Plan {
        ns_flags,
        root: cpath(&dirs.root)?,
        pre_ops,
        rootfs,
        ops: ops.ops,
        hostname: cstr(spec.hostname.as_bytes())?,
        cwd_dirs,
        cwd: cstr(spec.cwd.as_bytes())?,
        dev_null: cstr("/dev/null")?,
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        set_groups: !map.deny_setgroups || !spec.groups.is_empty(),
        command: command_exec(spec)?,
    };
    let started = Instant::now();
    let reports = spawn(
        &plan,
        map,
        spec.timeout,
        spec.cancel.as_deref(),
        spec.output_limit,
        on_line,
    )?;
    let mut kind = None;
    let mut status = None;
    for rec in reports.records.chunks_exact(child::RECORD) {
        let word = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&rec[i * 4..i * 4 + 4]);
            w
        };
        let (tag, a, b) = (
            u32::from_ne_bytes(word(0)),
            u32::from_ne_bytes(word(1)),
            i32::from_ne_bytes(word(2)),
        );
        // A cancelled run was killed, whatever its children managed to report.
        match tag {
            child::TAG_FAIL if !reports.cancelled => return Err(step_error(a, b, &steps, spec)),
            child::TAG_NO_OVERLAY if !reports.cancelled => {
                tracing::debug!(errno = b, "kernel overlayfs refused");
                return Ok(None);
            }
            child::TAG_ROOTFS => {
                kind = Some(match a {
                    0 => RootfsKind::KernelOverlay,
                    1 => RootfsKind::FuseOverlay,
                    _ => RootfsKind::Copy,
                })
            }
            child::TAG_EXIT => status = Some(b),
            _ => {}
        }
    }
    let status = if reports.cancelled {
        RunStatus::Cancelled
    } else if reports.timed_out {
        RunStatus::TimedOut
    } else if let Some(st) = status {
        if libc::WIFEXITED(st) {
            RunStatus::Exited(libc::WEXITSTATUS(st))
        } else {
            RunStatus::Signaled(libc::WTERMSIG(st))
        }
    } else {
        return Err(SandboxError::Setup {
            step: "wait for the sandbox".into(),
            source: io::Error::other("the sandbox exited without reporting the command's status"),
        });
    };
    let rootfs = kind.unwrap_or(RootfsKind::Copy);
    tracing::debug!(?status, ?rootfs, elapsed = ?started.elapsed(), "sandboxed command finished");
    Ok(Some(RunOutcome {
        status,
        output: reports.output,
        rootfs,
        ids: map.map.clone(),
    }))
}

fn step_error(step_id: u32, errno: i32, steps: &[String], spec: &RunSpec) -> SandboxError {
    let source = io::Error::from_raw_os_error(errno);
    let step = match step_id {
        step::UNSHARE => return userns_error(errno),
        step::EXEC => {
            return SandboxError::Exec {
                program: spec.argv[0].clone(),
                source,
            };
        }
        step::FORK_INIT | step::FORK_CMD => "fork".to_owned(),
        step::MAKE_PRIVATE => "make the mount namespace private".to_owned(),
        step::FUSE => "mount fuse-overlayfs".to_owned(),
        step::BIND_ROOT => "bind the copied root".to_owned(),
        step::PIVOT => "pivot_root into the new root".to_owned(),
        step::CWD => format!("enter working directory {}", spec.cwd),
        step::SETGROUPS => format!("set supplementary groups {:?}", spec.groups),
        step::SETGID => format!("set gid {}", spec.gid),
        step::SETUID => format!("set uid {}", spec.uid),
        step::NO_NEW_PRIVS => "set no_new_privs".to_owned(),
        step::STDIO => "set up stdin/stdout/stderr".to_owned(),
        step::HOSTNAME => format!("set hostname {:?}", spec.hostname),
        n => steps
            .get(n.wrapping_sub(step::OPS_BASE) as usize)
            .cloned()
            .unwrap_or_else(|| format!("step {n}")),
    };
    SandboxError::Setup { step, source }
}

/// Name the kernel setting that forbids user namespaces, if one does.
fn userns_error(errno: i32) -> SandboxError {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let why = if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        "kernel.unprivileged_userns_clone=0".to_owned()
    } else if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        "user.max_user_namespaces=0".to_owned()
    } else if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        "kernel.apparmor_restrict_unprivileged_userns=1".to_owned()
    } else {
        format!(
            "unshare(CLONE_NEWUSER) failed: {}",
            io::Error::from_raw_os_error(errno)
        )
    };
    SandboxError::UserNamespacesDisabled { why }
}

/// What the children reported.
struct Reports {
    records: Vec<u8>,
    output: Vec<u8>,
    timed_out: bool,
    cancelled: bool,
}

/// An owned file descriptor closed on drop.
struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: we own the descriptor.
            unsafe { libc::close(self.0) };
        }
    }
}

fn pipe() -> Result<(Fd, Fd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok((Fd(fds[0]), Fd(fds[1])))
}

fn read_fd(fd: &Fd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(fd.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Output lines to the callback, and the last `limit` bytes kept.
struct Output<'a> {
    on_line: &'a mut dyn FnMut(&str),
    partial: Vec<u8>,
    tail: VecDeque<u8>,
    limit: usize,
}

impl Output<'_> {
    fn feed(&mut self, bytes: &[u8]) {
        self.tail.extend(bytes);
        let excess = self.tail.len().saturating_sub(self.limit);
        self.tail.drain(..excess);
        for &b in bytes {
            if b == b'\n' {
                (self.on_line)(&String::from_utf8_lossy(&self.partial));
                self.partial.clear();
            } else if self.partial.len() < 64 * 1024 {
                self.partial.push(b);
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if !self.partial.is_empty() {
            (self.on_line)(&String::from_utf8_lossy(&self.partial));
        }
        self.tail.make_contiguous().to_vec()
    }
}

fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: pid is our child; SIGKILL of stage 1 takes the namespace down via PDEATHSIG.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// Fork stage 1, map its ids, then pump output until it exits; kill it when the timeout
/// expires or `cancel` is set.
fn spawn(
    plan: &Plan,
    map: &MapPlan,
    timeout: Option<Duration>,
    cancel: Option<&AtomicBool>,
    limit: usize,
    on_line: &mut dyn FnMut(&str),
) -> Result<Reports> {
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child only runs async-signal-safe code on data prepared above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if pid == 0 {
        // SAFETY: in the child; closing the parent's ends makes their EOFs meaningful.
        unsafe {
            for fd in [&ready_r, &go_w, &status_r, &out_r] {
                libc::close(fd.0);
            }
            child::stage1(
                plan,
                Fds {
                    ready_w: ready_w.0,
                    go_r: go_r.0,
                    status_w: status_w.0,
                    out_w: out_w.0,
                },
                parent,
            )
        }
    }
    drop((ready_w, go_r, status_w, out_w));
    let collect = |status_r: &Fd| -> Vec<u8> {
        let mut records = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = read_fd(status_r, &mut buf) {
            records.extend_from_slice(&buf[..n]);
        }
        records
    };
    let mut byte = [0u8];
    if read_fd(&ready_r, &mut byte).ok() != Some(1) {
        let mut st = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Ok(Reports {
            records: collect(&status_r),
            output: Vec::new(),
            timed_out: false,
            cancelled: false,
        });
    }
    if let Err(e) = map.apply(pid) {
        kill_and_reap(pid);
        return Err(e);
    }
    // SAFETY: writing one byte from a valid buffer.
    if unsafe { libc::write(go_w.0, byte.as_ptr().cast(), 1) } != 1 {
        let e = io::Error::last_os_error();
        kill_and_reap(pid);
        return Err(e.into());
    }
    // SAFETY: pidfd_open on our own child.
    let pidfd = Fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as c_int);
    if pidfd.0 < 0 {
        let e = io::Error::last_os_error();
        kill_and_reap(pid);
        return Err(e.into());
    }
    let mut output = Output {
        on_line,
        partial: Vec::new(),
        tail: VecDeque::new(),
        limit,
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let mut cancelled = false;
    let mut out_open = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let killed = timed_out || cancelled;
        if !killed {
            let why = if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                cancelled = true;
                "cancelled"
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                timed_out = true;
                "timed out"
            } else {
                ""
            };
            if !why.is_empty() {
                tracing::debug!("sandbox {why}; killing its pid namespace");
                // SAFETY: pid is our child (not yet reaped: its pidfd has not fired).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                continue;
            }
        }
        // Until it is killed: wake at the deadline, and often enough to see a cancel.
        let mut wait = deadline
            .filter(|_| !killed)
            .map(|d| d.saturating_duration_since(Instant::now()));
        if cancel.is_some() && !killed {
            wait = Some(wait.map_or(CANCEL_POLL, |w| w.min(CANCEL_POLL)));
        }
        let wait_ms = wait.map_or(-1, |w| {
            w.as_micros().div_ceil(1000).min(i32::MAX as u128) as c_int
        });
        let mut fds = [
            libc::pollfd {
                fd: pidfd.0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if out_open { out_r.0 } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill_and_reap(pid);
            return Err(e.into());
        }
        if n == 0 {
            continue;
        }
        if fds[1].revents != 0 {
            match read_fd(&out_r, &mut buf)? {
                0 => out_open = false,
                k => output.feed(&buf[..k]),
            }
        }
        if fds[0].revents != 0 {
            break;
        }
    }
    let mut st = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    // Stage 2 exits only after every process of its namespace is gone, so the writers are
    // closed; the deadline guards against a killed stage 1 racing the namespace teardown.
    let drain_until = Instant::now() + Duration::from_secs(5);
    while out_open && Instant::now() < drain_until {
        let mut pfd = libc::pollfd {
            fd: out_r.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
            match read_fd(&out_r, &mut buf)? {
                0 => out_open = false,
                k => output.feed(&buf[..k]),
            }
        }
    }
    Ok(Reports {
        records: collect(&status_r),
        output: output.finish(),
        timed_out,
        cancelled,
    })
}
