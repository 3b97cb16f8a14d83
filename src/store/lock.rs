//! An advisory whole-store lock (`flock` on `<root>/lock`), held while `index.json` changes
//! or blobs are deleted. Blob writes need no lock: they are atomic renames of verified files.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use fs_err as fs;

/// Held lock; released on drop (when the file closes).
pub struct Lock {
    _file: fs::File,
}

impl Lock {
    /// Block until the exclusive lock on the store at `root` is ours.
    pub fn exclusive(root: &Path) -> io::Result<Lock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        // SAFETY: flock on a valid, open file descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("lock {}: {e}", root.join("lock").display()),
            ));
        }
        Ok(Lock { _file: file })
    }
}
