//! Rootless builds with subordinate ids run inside one user namespace.
//!
//! An unprivileged caller with ranges in `/etc/subuid` and `/etc/subgid` gets container ids
//! 1.. backed by host ids it does not own. Unpacking base layers with their owners, and
//! reading back files that RUN left owned by those ids (a `chmod 0600` file of user 1000,
//! say), both need privileges over them, which only a process inside a user namespace with
//! that map has. So `strata build` re-executes itself once, as root of a user namespace
//! mapping the caller to 0 and the subordinate range to 1.. (written by the setuid
//! `newuidmap`/`newgidmap`, as podman's and buildah's `unshare` do); everything else is
//! unchanged. Without ranges, strata stays where it is and the sandbox uses a single-id map.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};

use crate::sandbox::MapPlan;

/// Set in the re-executed process's environment.
const INSIDE: &str = "STRATA_IN_USERNS";

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Run this `strata build` again inside a user namespace with the caller's subordinate ranges
/// and return its exit status; `None` when that does not apply (root, already inside, no
/// ranges) or cannot be set up, in which case the build runs here and the sandbox reports
/// what is missing.
pub(super) fn reexec_build() -> Option<ExitCode> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 || std::env::var_os(INSIDE).is_some() {
        return None;
    }
    let plan = MapPlan::for_current_user();
    if plan.map.uids.len() < 2 || plan.map.gids.len() < 2 {
        return None;
    }
    let (pid_r, pid_w) = pipe().ok()?;
    let (go_r, go_w) = pipe().ok()?;
    let (pid_wfd, go_rfd) = (pid_w.as_raw_fd(), go_r.as_raw_fd());
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(std::env::args_os().skip(1)).env(INSIDE, "1");
    // SAFETY: between fork and exec the closure only makes raw system calls on descriptors
    // that stay open until exec, and builds errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            // The build dies with the process that started it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(io::Error::last_os_error());
            }
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(pid_wfd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(io::Error::last_os_error());
            }
            let mut go = 0u8;
            if libc::read(go_rfd, (&raw mut go).cast(), 1) != 1 || go != 1 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        });
    }
    // The maps are written from another thread while `spawn` waits for the exec.
    let mapper = std::thread::spawn(move || {
        let mut pid = [0u8; 4];
        let mut got = 0;
        while got < pid.len() {
            // SAFETY: reading into the unfilled tail of `pid`.
            let n = unsafe {
                libc::read(
                    pid_r.as_raw_fd(),
                    pid[got..].as_mut_ptr().cast(),
                    pid.len() - got,
                )
            };
            if n <= 0 {
                return; // the child failed before unsharing; spawn reports it
            }
            got += n as usize;
        }
        let ok = plan.apply(libc::pid_t::from_ne_bytes(pid)).is_ok();
        let go = [u8::from(ok)];
        // SAFETY: writing one byte from a live buffer.
        unsafe { libc::write(go_w.as_raw_fd(), go.as_ptr().cast(), 1) };
    });
    let spawned = cmd.spawn();
    drop(pid_w);
    drop(go_r);
    let _ = mapper.join();
    let status = spawned.ok()?.wait().ok()?;
    Some(match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    })
}
