//! Advisory store locks (`flock`):
//! - `lock`: exclusive while `index.json` changes or blobs are deleted (held briefly);
//! - `gc.lock`: shared by every build/pull/push for its whole duration, exclusive for
//!   `prune`/`rmi` — so garbage collection never deletes a blob a running build may still
//!   reference, and waits for builds instead.
//!
//! Blob writes need no lock: they are atomic renames of verified files.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use fs_err as fs;

/// Held lock; released on drop (when the file closes).
pub struct Lock {
    _file: fs::File,
}

impl Lock {
    fn acquire(root: &Path, name: &str, op: libc::c_int) -> io::Result<Lock> {
        let path = root.join(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on a valid, open file descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("lock {}: {e}", path.display()),
            ));
        }
        Ok(Lock { _file: file })
    }

    /// Block until the exclusive index lock on the store at `root` is ours.
    pub fn exclusive(root: &Path) -> io::Result<Lock> {
        Lock::acquire(root, "lock", libc::LOCK_EX)
    }

    /// The garbage-collection lock, shared (builds) or exclusive (prune).
    pub fn gc(root: &Path, exclusive: bool) -> io::Result<Lock> {
        Lock::acquire(
            root,
            "gc.lock",
            if exclusive {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            },
        )
    }
}
