//! The execution primitive for `RUN`: one command in a rootless sandbox whose root file system
//! is a stack of read-only layer directories plus a writable upper directory, overlayfs-style.
//!
//! - [`Sandbox::run`] starts the command in new user, mount, pid, ipc and uts namespaces (and a
//!   network namespace for [`Network::None`]), with its own `/proc`, a minimal `/dev`, the host's
//!   `/etc/hosts` and `/etc/resolv.conf`, `no_new_privs`, and the root assembled by kernel
//!   overlayfs, `fuse-overlayfs`, or a copy-based snapshot ([`RootfsKind`]).
//! - [`upper_to_entries`] turns the upper directory into layer [`Entry`](crate::layer::Entry)
//!   values, converting overlay whiteouts and opaque directories to the OCI `.wh.` forms
//!   ([OCI image layer spec, whiteouts](https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts)).
//! - [`unpack_layer`] applies a layer tar to a directory, refusing entries that would escape it.
//!
//! Syscalls go through plain `libc`: the code that runs between `fork` and `exec` must not
//! allocate (the caller may be multi-threaded), so every path and argument is prepared as a
//! C string before forking and the child only issues raw calls.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// `p` as a C string for a system call.
fn cpath(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Mark `dir` opaque the way overlayfs with `userxattr` reads it (`user.overlay.opaque=y`).
fn set_opaque_xattr(dir: &std::path::Path) -> io::Result<()> {
    let c = cpath(dir)?;
    // SAFETY: valid C strings and a one-byte value.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

mod child;
mod copy;
mod idmap;
mod plan;
mod run;
mod snapshot;
mod unpack;
mod upper;
mod view;

#[cfg(test)]
mod tests;

pub use idmap::{IdMap, IdRange, MapPlan};
pub use snapshot::{merge_lowers, unpack_layer_dir};
pub use unpack::unpack_layer;
pub use upper::upper_to_entries;

/// Errors from running a sandboxed command, reading its upper directory and unpacking layers.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The kernel refused to create a user namespace.
    #[error("user namespaces are disabled ({why})")]
    UserNamespacesDisabled {
        /// Which kernel setting forbids them, or the refused call.
        why: String,
    },
    /// A step of setting up the sandbox failed.
    #[error("sandbox setup failed: {step}")]
    Setup {
        /// What was being done (`mount overlay on …`, `pivot_root`, …).
        step: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the user namespace's id maps failed.
    #[error("mapping ids into the user namespace failed: {what}")]
    IdMap {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The user the command should run as has no id in the user namespace.
    #[error(
        "{kind} {id} is not mapped in the user namespace (only {mapped}); add a range for this user to /etc/sub{kind}"
    )]
    UnmappedId {
        /// `uid` or `gid`.
        kind: &'static str,
        /// The container id.
        id: u32,
        /// The mapped container ranges, for the message.
        mapped: String,
    },
    /// The command could not be executed.
    #[error("cannot execute {program:?}")]
    Exec {
        /// `argv[0]`.
        program: String,
        /// The cause (`ENOENT` after searching `PATH`).
        #[source]
        source: io::Error,
    },
    /// The run spec is unusable.
    #[error("invalid run spec: {0}")]
    InvalidSpec(String),
    /// A file-system error (fs-err errors name their path).
    #[error("sandbox i/o failed")]
    Io(#[from] io::Error),
    /// A path in the upper directory cannot become a layer entry.
    #[error("{path}: {why}", path = .path.display())]
    Unsupported {
        /// The offending file.
        path: PathBuf,
        /// Why.
        why: &'static str,
    },
    /// A file in the upper directory is owned by a host id outside the sandbox's map.
    #[error("{path}: owner {uid}:{gid} is not mapped into the container", path = .path.display())]
    UnmappedOwner {
        /// The file.
        path: PathBuf,
        /// Host uid.
        uid: u32,
        /// Host gid.
        gid: u32,
    },
    /// Reading a layer tar failed.
    #[error("reading layer tar failed")]
    Tar(#[source] io::Error),
    /// A layer entry was refused by [`unpack_layer`].
    #[error("refusing layer entry {path:?}: {why}")]
    UnsafeEntry {
        /// The entry's path, lossily decoded.
        path: String,
        /// Why it is refused.
        why: String,
    },
}

/// Result with [`SandboxError`].
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// Network access of the command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Network {
    /// The host's network namespace (`RUN --network=host`, the default).
    #[default]
    Host,
    /// A new network namespace with only a loopback interface.
    None,
}

/// An extra mount inside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mount {
    /// A host directory or file bound at `target` (cache mounts, secrets, `type=bind,from=`).
    Bind {
        /// Host path.
        source: PathBuf,
        /// Absolute path inside the container.
        target: String,
        /// Mount read-only.
        readonly: bool,
    },
    /// A fresh tmpfs at `target`; nothing written there reaches the upper directory.
    Tmpfs {
        /// Absolute path inside the container.
        target: String,
        /// Size limit in bytes (the kernel default, half of RAM, when `None`).
        size: Option<u64>,
    },
    /// A file with `data` at `target`, read-only. The bytes never touch the disk: the sandbox
    /// writes them into a tmpfs of its own mount namespace and binds the file from there, so
    /// neither the upper directory nor the host file system ever holds them (`RUN
    /// --mount=type=secret`).
    Secret {
        /// Absolute path inside the container.
        target: String,
        /// The content.
        data: SecretBytes,
        /// File mode.
        mode: u32,
        /// Owner (container uid).
        uid: u32,
        /// Group (container gid).
        gid: u32,
    },
}

impl Mount {
    fn target(&self) -> &str {
        match self {
            Mount::Bind { target, .. }
            | Mount::Tmpfs { target, .. }
            | Mount::Secret { target, .. } => target,
        }
    }
}

/// Secret bytes: compared and cloned like bytes, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} secret bytes>", self.0.len())
    }
}

/// How the root file system of a run was assembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootfsKind {
    /// Kernel overlayfs mounted inside the user namespace (Linux ≥ 5.11), with `userxattr`.
    KernelOverlay,
    /// `fuse-overlayfs`, when the kernel refuses an unprivileged overlay mount.
    FuseOverlay,
    /// The lowers copied into a scratch root, diffed against a snapshot after the run.
    Copy,
}

/// What to run and on which layers.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Read-only layer directories, lowest first.
    pub lower: Vec<PathBuf>,
    /// Empty directory receiving the run's changes, overlayfs-style.
    pub upper: PathBuf,
    /// Empty scratch directory on the same file system as `upper`.
    pub work: PathBuf,
    /// The command; `argv[0]` without a `/` is looked up in the spec's `PATH`.
    pub argv: Vec<String>,
    /// The whole environment of the command.
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the container; created when missing.
    pub cwd: String,
    /// Container uid the command runs as.
    pub uid: u32,
    /// Container gid the command runs as.
    pub gid: u32,
    /// Supplementary container gids.
    pub groups: Vec<u32>,
    /// Network access.
    pub network: Network,
    /// Extra mounts, applied in order. Targets below `/dev` land in the sandbox's own `/dev`
    /// tmpfs; other missing targets are made in a layer under the upper (never in it).
    pub mounts: Vec<Mount>,
    /// Host paths (mount sources such as a new cache directory) whose owner is set to these
    /// container ids inside the user namespace before the mounts, where the ids exist even
    /// when the caller could not chown to them.
    pub chown: Vec<(PathBuf, u32, u32)>,
    /// Host name inside the uts namespace.
    pub hostname: String,
    /// Kill the whole sandbox after this long.
    pub timeout: Option<Duration>,
    /// Kill the whole sandbox once this flag is set (checked before starting and at least
    /// every [`CANCEL_POLL`] while the command runs); the run then ends with
    /// [`RunStatus::Cancelled`] and its upper holds whatever was written until then.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Force a root file system mechanism; `None` picks the first that works.
    pub rootfs: Option<RootfsKind>,
    /// How many bytes of the end of the combined output [`RunOutcome::output`] keeps.
    pub output_limit: usize,
}

impl RunSpec {
    /// A spec running `argv` as root in `/` with the host network and default settings.
    pub fn new(
        lower: Vec<PathBuf>,
        upper: impl Into<PathBuf>,
        work: impl Into<PathBuf>,
        argv: Vec<String>,
    ) -> RunSpec {
        RunSpec {
            lower,
            upper: upper.into(),
            work: work.into(),
            argv,
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            network: Network::Host,
            mounts: Vec::new(),
            chown: Vec::new(),
            hostname: "strata".into(),
            timeout: None,
            cancel: None,
            rootfs: None,
            output_limit: 64 * 1024,
        }
    }
}

/// `PATH` when the spec's environment has none (the Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// The timeout expired and the sandbox was killed.
    TimedOut,
    /// [`RunSpec::cancel`] was set: the sandbox was killed (or never started).
    Cancelled,
}

/// How often a running sandbox looks at [`RunSpec::cancel`]: the longest a set flag goes
/// unnoticed.
pub const CANCEL_POLL: Duration = Duration::from_millis(50);

/// The result of a run.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// How the command ended.
    pub status: RunStatus,
    /// The last [`RunSpec::output_limit`] bytes of combined stdout and stderr.
    pub output: Vec<u8>,
    /// The mechanism that assembled the root.
    pub rootfs: RootfsKind,
    /// The id map of the user namespace; [`upper_to_entries`] needs it to read owners back.
    pub ids: IdMap,
}

impl RunOutcome {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == RunStatus::Exited(0)
    }
}

/// Runs commands in rootless sandboxes; see the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct Sandbox {
    fuse_overlayfs: Option<PathBuf>,
}

impl Sandbox {
    /// A sandbox runner using `fuse-overlayfs` from the system directories when the kernel refuses overlayfs.
    pub fn new() -> Sandbox {
        Sandbox {
            fuse_overlayfs: find_program("fuse-overlayfs"),
        }
    }

    /// Use this `fuse-overlayfs` binary (or none) instead of the one found in the system
    /// directories.
    pub fn fuse_overlayfs(mut self, program: Option<PathBuf>) -> Sandbox {
        self.fuse_overlayfs = program;
        self
    }

    /// Run `spec`, discarding output lines as they come (they are kept in the outcome's tail).
    pub fn run(&self, spec: &RunSpec) -> Result<RunOutcome> {
        self.run_with(spec, &mut |_| {})
    }

    /// Run `spec`, passing each line of combined output to `on_line` as it arrives.
    pub fn run_with(&self, spec: &RunSpec, on_line: &mut dyn FnMut(&str)) -> Result<RunOutcome> {
        run::run(self.fuse_overlayfs.as_deref(), spec, on_line)
    }
}

/// The first executable `name` in the system directories. The host's `PATH` is deliberately not
/// read here (the CLI owns the environment); [`Sandbox::fuse_overlayfs`] overrides.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
