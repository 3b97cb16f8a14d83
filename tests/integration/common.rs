//! Shared helpers: a private store per test, running the binary, unpacking with umoci,
//! validating against the OCI schemas.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A test's own strata home and scratch space.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.env("STRATA_HOME", self.home())
            .env_remove("SOURCE_DATE_EPOCH")
            .env_remove("STRATA_THREADS");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run strata")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Run and require failure with `code`; returns stderr.
    pub fn fail(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "strata {args:?} should exit {code}; stderr:\n{stderr}"
        );
        stderr
    }

    /// Build `context` and return the printed digest.
    pub fn build(&self, context: &Path, extra: &[&str]) -> String {
        let ctx = context.to_str().expect("utf-8 path");
        let mut args = vec!["build", "--progress", "plain"];
        args.extend_from_slice(extra);
        args.push(ctx);
        let out = self.ok(&args);
        let digest = out.trim().to_string();
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "digest {digest:?}"
        );
        digest
    }

    /// `strata fsck` must pass.
    pub fn fsck(&self) {
        let out = self.ok(&["fsck"]);
        assert!(out.contains(" 0 problems"), "{out}");
    }

    /// Names in the store.
    pub fn names(&self) -> Vec<String> {
        let out = self.ok(&["images", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("images --json");
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Export `reference` to an OCI layout, validate it against the schemas and unpack it
    /// with umoci; returns the listing of the root filesystem.
    pub fn unpack(&self, reference: &str, name: &str) -> Tree {
        let layout = self.path(&format!("{name}-layout"));
        let target = format!("oci:{}:{name}", layout.display());
        self.ok(&["export", reference, "--output", &target]);
        validate_layout(&layout);
        let bundle = self.path(&format!("{name}-bundle"));
        let mut c = Command::new(tool("umoci", "umoci"));
        c.arg("unpack");
        if !is_root() {
            c.arg("--rootless");
        }
        c.arg("--image")
            .arg(format!("{}:{name}", layout.display()))
            .arg(&bundle);
        run_ok(&mut c);
        listing(&bundle.join("rootfs"))
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The path of a required tool; panics naming the Debian package when it is missing.
pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is required by this test: apt-get install {package} (.ci/run installs it)");
}

pub fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("run {c:?}: {e}"));
    check_ok(c, &out)
}

/// [`run_ok`] for a peer that runs containers (buildah), run once more when it failed on
/// runc's transient "sealing memfd copy: Device or resource busy": runc copies its own binary
/// into a sealed memfd before every container, and the seal fails with EBUSY while another
/// process still maps the copy writable (seen when buildah builds run side by side). Any other
/// failure, or the same one twice, fails the test.
pub fn run_peer_ok(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("run {c:?}: {e}"));
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("sealing memfd copy")
    {
        eprintln!("{c:?}: runc's transient memfd sealing error; running it once more");
        return run_ok(c);
    }
    check_ok(c, &out)
}

fn check_ok(c: &Command, out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Validate an OCI layout with the image-spec schemas (Debian's
/// golang-github-opencontainers-image-spec-dev) and python3-jsonschema.
pub fn validate_layout(layout: &Path) {
    let schemas = Path::new("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema");
    assert!(
        schemas.is_dir(),
        "OCI schemas missing: apt-get install golang-github-opencontainers-image-spec-dev (.ci/run installs it)"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/validate_oci.py");
    let out = run_ok(
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(layout)
            .arg(schemas),
    );
    assert!(out.contains("image(s) valid"), "{out}");
}

/// One file-system object as a test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Obj {
    Dir,
    File(Vec<u8>),
    Link(String),
}

/// (object, mode, uid, gid) by path relative to the root.
pub type Tree = BTreeMap<String, (Obj, u32, u32, u32)>;

pub fn listing(root: &Path) -> Tree {
    let mut out = Tree::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.expect("walk");
        let rel = e
            .path()
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let md = e.path().symlink_metadata().expect("metadata");
        let obj = if md.file_type().is_symlink() {
            Obj::Link(
                std::fs::read_link(e.path())
                    .expect("readlink")
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if md.is_dir() {
            Obj::Dir
        } else {
            Obj::File(std::fs::read(e.path()).expect("read"))
        };
        out.insert(
            rel,
            (obj, md.permissions().mode() & 0o7777, md.uid(), md.gid()),
        );
    }
    out
}

/// Write a file, creating parents.
pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(&p, content).expect("write");
}

pub fn chmod(root: &Path, rel: &str, mode: u32) {
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Copy a directory tree (files, dirs, symlinks; hardlinks within it preserved).
pub fn copy_tree(from: &Path, to: &Path) {
    let mut inodes: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    for e in walkdir::WalkDir::new(from).sort_by_file_name() {
        let e = e.expect("walk");
        let rel = e.path().strip_prefix(from).expect("under");
        let dest = to.join(rel);
        let md = e.path().symlink_metadata().expect("md");
        if md.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).expect("link"), &dest)
                .expect("symlink");
        } else if md.is_dir() {
            std::fs::create_dir_all(&dest).expect("mkdir");
        } else if md.nlink() > 1 && inodes.contains_key(&(md.dev(), md.ino())) {
            std::fs::hard_link(&inodes[&(md.dev(), md.ino())], &dest).expect("hardlink");
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
            inodes.insert((md.dev(), md.ino()), dest.clone());
        }
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

pub fn file(content: &str, mode: u32, uid: u32, gid: u32) -> (Obj, u32, u32, u32) {
    (Obj::File(content.as_bytes().to_vec()), mode, uid, gid)
}

pub fn dir(mode: u32, uid: u32, gid: u32) -> (Obj, u32, u32, u32) {
    (Obj::Dir, mode, uid, gid)
}

pub fn link(target: &str) -> (Obj, u32, u32, u32) {
    (Obj::Link(target.to_string()), 0o777, 0, 0)
}

/// Compare two trees, ignoring owners when not root (umoci --rootless maps them away).
pub fn assert_tree(actual: &Tree, expected: &Tree) {
    let norm = |t: &Tree| -> Tree {
        t.iter()
            .map(|(k, (o, m, u, g))| {
                let (m, u, g) = match o {
                    Obj::Link(_) => (0o777, 0, 0),
                    _ if !is_root() => (*m, 0, 0),
                    _ => (*m, *u, *g),
                };
                (k.clone(), (o.clone(), m, u, g))
            })
            .collect()
    };
    let (a, e) = (norm(actual), norm(expected));
    if a != e {
        let mut diff = String::new();
        for k in a
            .keys()
            .chain(e.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            match (a.get(k), e.get(k)) {
                (Some(x), Some(y)) if x == y => {}
                (x, y) => diff.push_str(&format!("{k}:\n  actual   {x:?}\n  expected {y:?}\n")),
            }
        }
        panic!("unpacked tree differs:\n{diff}");
    }
}

pub fn skopeo_inspect(transport_ref: &str) -> serde_json::Value {
    let out = run_ok(Command::new(tool("skopeo", "skopeo")).args(["inspect", transport_ref]));
    serde_json::from_str(&out).expect("skopeo json")
}

pub fn skopeo_inspect_config(transport_ref: &str) -> serde_json::Value {
    let out =
        run_ok(Command::new(tool("skopeo", "skopeo")).args(["inspect", "--config", transport_ref]));
    serde_json::from_str(&out).expect("skopeo json")
}

/// A minimal root file system under `root`: Debian's static busybox as /bin/busybox with
/// `applets` linked to it, root's /etc/passwd and /etc/group, and /tmp.
pub fn busybox_rootfs(root: &Path, applets: &[&str]) {
    let busybox = tool("busybox", "busybox-static");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for c in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(c)).unwrap();
    }
    write(root, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    write(root, "etc/group", b"root:x:0:\n");
    std::fs::create_dir_all(root.join("tmp")).unwrap();
}

/// Processes whose command line is `argv` (on this host, any pid namespace).
pub fn processes_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}
