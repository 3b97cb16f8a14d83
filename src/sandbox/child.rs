//! The code that runs after `fork`: three processes, raw syscalls only, no allocation.
//!
//! - **stage 1** unshares the namespaces, tells the parent, and waits until the parent has
//!   written the id maps; then forks stage 2 and waits for it.
//! - **stage 2** is pid 1 of the new pid namespace: it assembles the root (overlay, fuse or a
//!   bind of the copy), mounts `/proc`, `/dev` and the extra mounts, pivots into the root, forks
//!   the command (stage 3) and reaps until it exits. Its exit tears the namespace down, killing
//!   whatever the command left behind.
//! - **stage 3** drops to the requested user and executes the command.
//!
//! Failures are reported to the parent as fixed-size records on the status pipe.

use std::ffi::CString;

use libc::{c_char, c_int, c_ulong};

/// A record on the status pipe: `[tag, a, b]` as native-endian 32-bit words.
pub(super) const RECORD: usize = 12;
/// Step `a` failed with errno `b`.
pub(super) const TAG_FAIL: u32 = 1;
/// The root was assembled with mechanism `a` (0 kernel overlay, 1 fuse, 2 bind of a copy).
pub(super) const TAG_ROOTFS: u32 = 2;
/// The command ended with wait status `b`.
pub(super) const TAG_EXIT: u32 = 3;
/// Neither overlay mechanism worked; `b` is the kernel's errno.
pub(super) const TAG_NO_OVERLAY: u32 = 4;

/// Fixed steps, for [`TAG_FAIL`] records (prepared operations use `OPS_BASE + index`).
pub(super) mod step {
    pub const UNSHARE: u32 = 1;
    pub const FORK_INIT: u32 = 2;
    pub const MAKE_PRIVATE: u32 = 3;
    pub const FUSE: u32 = 4;
    pub const BIND_ROOT: u32 = 5;
    pub const PIVOT: u32 = 6;
    pub const CWD: u32 = 7;
    pub const FORK_CMD: u32 = 8;
    pub const SETGROUPS: u32 = 9;
    pub const SETGID: u32 = 10;
    pub const SETUID: u32 = 11;
    pub const NO_NEW_PRIVS: u32 = 12;
    pub const STDIO: u32 = 13;
    pub const EXEC: u32 = 14;
    pub const HOSTNAME: u32 = 15;
    pub const OPS_BASE: u32 = 1000;
}

/// One prepared mount-namespace operation, run by stage 2 before `pivot_root`.
pub(super) enum Op {
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: c_ulong,
        data: Option<CString>,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    Touch {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Chown {
        path: CString,
        uid: u32,
        gid: u32,
    },
    /// Create `path` (which must not exist) holding `data`, with this mode and owner.
    WriteFile {
        path: CString,
        data: Vec<u8>,
        mode: libc::mode_t,
        uid: u32,
        gid: u32,
    },
    /// Bring the loopback interface up (a fresh network namespace has it down).
    LoopbackUp,
}

/// An operation and whether its failure is tolerated (devpts, for example).
pub(super) struct PlannedOp {
    pub op: Op,
    pub optional: bool,
}

/// A prepared `execve`: program, argv and envp with their pointer arrays.
pub(super) struct Exec {
    pub candidates: Vec<CString>,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

impl Exec {
    pub fn new(candidates: Vec<CString>, argv: Vec<CString>, envp: Vec<CString>) -> Exec {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Exec {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            candidates,
            _argv: argv,
            _envp: envp,
        }
    }
}

/// How stage 2 assembles the root at [`Plan::root`].
pub(super) enum RootfsStep {
    /// Kernel overlayfs with these options, falling back to `fuse` when given.
    Overlay {
        options: CString,
        fuse: Option<Exec>,
    },
    /// `fuse-overlayfs` only.
    Fuse(Exec),
    /// Bind-mount a prepared directory (the copy-based snapshot).
    Bind(CString),
    /// `step` with `dir` as the working directory (relative overlay lower paths).
    InDir { dir: CString, step: Box<RootfsStep> },
}

/// Everything the child processes need, prepared before forking.
pub(super) struct Plan {
    pub ns_flags: c_int,
    pub root: CString,
    pub pre_ops: Vec<PlannedOp>,
    pub rootfs: RootfsStep,
    pub ops: Vec<PlannedOp>,
    pub hostname: CString,
    pub cwd_dirs: Vec<CString>,
    pub cwd: CString,
    pub dev_null: CString,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub set_groups: bool,
    pub command: Exec,
}

/// The pipe ends the children use.
#[derive(Clone, Copy)]
pub(super) struct Fds {
    pub ready_w: c_int,
    pub go_r: c_int,
    pub status_w: c_int,
    pub out_w: c_int,
}

fn errno() -> i32 {
    // SAFETY: errno is thread-local and always readable.
    unsafe { *libc::__errno_location() }
}

unsafe fn record(fd: c_int, tag: u32, a: u32, b: i32) {
    let mut buf = [0u8; RECORD];
    buf[0..4].copy_from_slice(&tag.to_ne_bytes());
    buf[4..8].copy_from_slice(&a.to_ne_bytes());
    buf[8..12].copy_from_slice(&b.to_ne_bytes());
    // SAFETY: buf is RECORD bytes long; a short write only loses the report.
    unsafe { libc::write(fd, buf.as_ptr().cast(), RECORD) };
}

unsafe fn fail(fds: &Fds, step: u32) -> ! {
    let e = errno();
    // SAFETY: async-signal-safe calls only.
    unsafe {
        record(fds.status_w, TAG_FAIL, step, e);
        libc::_exit(127)
    }
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Stage 1, in the process just forked from the caller. Never returns.
///
/// # Safety
/// Must be called in a freshly forked child; uses only async-signal-safe calls.
pub(super) unsafe fn stage1(plan: &Plan, fds: Fds, parent: libc::pid_t) -> ! {
    // SAFETY: raw syscalls on prepared data.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        if libc::unshare(plan.ns_flags) != 0 {
            fail(&fds, step::UNSHARE);
        }
        let b = [1u8];
        libc::write(fds.ready_w, b.as_ptr().cast(), 1);
        let mut go = [0u8];
        if libc::read(fds.go_r, go.as_mut_ptr().cast(), 1) != 1 {
            libc::_exit(1);
        }
        let pid = libc::fork();
        if pid < 0 {
            fail(&fds, step::FORK_INIT);
        }
        if pid == 0 {
            stage2(plan, fds);
        }
        let mut st = 0;
        while libc::waitpid(pid, &mut st, 0) < 0 && errno() == libc::EINTR {}
        libc::_exit(0)
    }
}

unsafe fn run_op(op: &Op) -> bool {
    // SAFETY: every pointer comes from a CString owned by the plan.
    unsafe {
        match op {
            Op::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                libc::mount(
                    opt_ptr(source),
                    target.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                ) == 0
            }
            Op::Mkdir { path, mode } => {
                libc::mkdir(path.as_ptr(), *mode) == 0 || errno() == libc::EEXIST
            }
            Op::Touch { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                );
                fd >= 0 && libc::close(fd) == 0
            }
            Op::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()) == 0,
            Op::Chown { path, uid, gid } => libc::lchown(path.as_ptr(), *uid, *gid) == 0,
            Op::WriteFile {
                path,
                data,
                mode,
                uid,
                gid,
            } => write_file(path, data, *mode, *uid, *gid),
            Op::LoopbackUp => loopback_up(),
        }
    }
}

unsafe fn write_file(path: &CString, data: &[u8], mode: libc::mode_t, uid: u32, gid: u32) -> bool {
    // SAFETY: raw calls on a prepared path and buffer; the descriptor is closed on every path.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600,
        );
        if fd < 0 {
            return false;
        }
        let mut off = 0;
        let mut ok = true;
        while off < data.len() {
            let n = libc::write(fd, data[off..].as_ptr().cast(), data.len() - off);
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                ok = false;
                break;
            }
            off += n as usize;
        }
        ok = ok && libc::fchown(fd, uid, gid) == 0 && libc::fchmod(fd, mode) == 0;
        libc::close(fd) == 0 && ok
    }
}

unsafe fn loopback_up() -> bool {
    // SAFETY: ifreq is plain data; the socket is closed on every path.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return false;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as c_char;
        }
        let mut ok = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0;
        if ok {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            ok = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) == 0;
        }
        libc::close(sock);
        ok
    }
}

unsafe fn run_ops(ops: &[PlannedOp], base: u32, fds: &Fds) {
    for (i, planned) in ops.iter().enumerate() {
        // SAFETY: see run_op.
        if unsafe { !run_op(&planned.op) } && !planned.optional {
            // SAFETY: async-signal-safe.
            unsafe { fail(fds, base + i as u32) };
        }
    }
}

/// Fork, exec `fuse-overlayfs` (which daemonizes once mounted) and wait for the mount.
unsafe fn run_fuse(exec: &Exec, dev_null: &CString) -> bool {
    // SAFETY: fork/exec with prepared arrays.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return false;
        }
        if pid == 0 {
            let fd = libc::open(dev_null.as_ptr(), libc::O_RDWR);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
            }
            for c in &exec.candidates {
                libc::execve(c.as_ptr(), exec.argv_ptrs.as_ptr(), exec.envp_ptrs.as_ptr());
            }
            libc::_exit(127);
        }
        let mut st = 0;
        while libc::waitpid(pid, &mut st, 0) < 0 {
            if errno() != libc::EINTR {
                return false;
            }
        }
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0
    }
}

/// Stage 2: pid 1 of the new pid namespace.
unsafe fn stage2(plan: &Plan, fds: Fds) -> ! {
    // SAFETY: raw syscalls on prepared data.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong);
        let slash = c"/";
        if libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(&fds, step::MAKE_PRIVATE);
        }
        run_ops(&plan.pre_ops, step::OPS_BASE, &fds);
        let mut rootfs = &plan.rootfs;
        if let RootfsStep::InDir { dir, step: inner } = rootfs {
            if libc::chdir(dir.as_ptr()) != 0 {
                fail(&fds, step::MAKE_PRIVATE);
            }
            rootfs = inner;
        }
        match rootfs {
            RootfsStep::Overlay { options, fuse } => {
                let overlay = c"overlay";
                if libc::mount(
                    overlay.as_ptr(),
                    plan.root.as_ptr(),
                    overlay.as_ptr(),
                    0,
                    options.as_ptr().cast(),
                ) == 0
                {
                    record(fds.status_w, TAG_ROOTFS, 0, 0);
                } else {
                    let e = errno();
                    match fuse {
                        Some(f) if run_fuse(f, &plan.dev_null) => {
                            record(fds.status_w, TAG_ROOTFS, 1, 0)
                        }
                        _ => {
                            record(fds.status_w, TAG_NO_OVERLAY, 0, e);
                            libc::_exit(127);
                        }
                    }
                }
            }
            RootfsStep::Fuse(f) => {
                if !run_fuse(f, &plan.dev_null) {
                    fail(&fds, step::FUSE);
                }
                record(fds.status_w, TAG_ROOTFS, 1, 0);
            }
            RootfsStep::Bind(source) => {
                if libc::mount(
                    source.as_ptr(),
                    plan.root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    fail(&fds, step::BIND_ROOT);
                }
                record(fds.status_w, TAG_ROOTFS, 2, 0);
            }
            RootfsStep::InDir { .. } => fail(&fds, step::MAKE_PRIVATE),
        }
        let base = step::OPS_BASE + plan.pre_ops.len() as u32;
        run_ops(&plan.ops, base, &fds);
        if libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()) != 0 {
            fail(&fds, step::HOSTNAME);
        }
        // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
        // the new root alone without needing a put_old directory inside it.
        let dot = c".";
        if libc::chdir(plan.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0
            || libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(slash.as_ptr()) != 0
        {
            fail(&fds, step::PIVOT);
        }
        for d in &plan.cwd_dirs {
            if libc::mkdir(d.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                fail(&fds, step::CWD);
            }
        }
        let pid = libc::fork();
        if pid < 0 {
            fail(&fds, step::FORK_CMD);
        }
        if pid == 0 {
            stage3(plan, fds);
        }
        libc::close(fds.out_w);
        loop {
            let mut st = 0;
            let r = libc::waitpid(-1, &mut st, 0);
            if r == pid {
                record(fds.status_w, TAG_EXIT, 0, st);
                libc::_exit(0);
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(1);
            }
        }
    }
}

/// Stage 3: become the requested user and execute the command.
unsafe fn stage3(plan: &Plan, fds: Fds) -> ! {
    // SAFETY: raw syscalls on prepared data.
    unsafe {
        // The caller may ignore SIGPIPE (Rust programs do); ignored dispositions survive exec.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if plan.set_groups && libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) != 0 {
            fail(&fds, step::SETGROUPS);
        }
        if libc::setresgid(plan.gid, plan.gid, plan.gid) != 0 {
            fail(&fds, step::SETGID);
        }
        if libc::setresuid(plan.uid, plan.uid, plan.uid) != 0 {
            fail(&fds, step::SETUID);
        }
        libc::umask(0o022);
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as c_ulong, 0, 0, 0) != 0 {
            fail(&fds, step::NO_NEW_PRIVS);
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(&fds, step::CWD);
        }
        let null = libc::open(plan.dev_null.as_ptr(), libc::O_RDONLY);
        if null < 0
            || libc::dup2(null, 0) < 0
            || libc::dup2(fds.out_w, 1) < 0
            || libc::dup2(fds.out_w, 2) < 0
        {
            fail(&fds, step::STDIO);
        }
        libc::close(null);
        libc::close(fds.out_w);
        let mut last = libc::ENOENT;
        for c in &plan.command.candidates {
            libc::execve(
                c.as_ptr(),
                plan.command.argv_ptrs.as_ptr(),
                plan.command.envp_ptrs.as_ptr(),
            );
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => last = libc::EACCES,
                e => {
                    last = e;
                    break;
                }
            }
        }
        record(fds.status_w, TAG_FAIL, step::EXEC, last);
        libc::_exit(127)
    }
}
