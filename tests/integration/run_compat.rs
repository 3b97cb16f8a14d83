//! RUN against the real peer: the same multi-stage Dockerfiles built by strata and by
//! `buildah bud --isolation chroot --layers` (vfs storage in a temp dir), both exported to OCI
//! layouts, both unpacked by umoci, and the trees compared: paths, types, modes, owners, link
//! targets, hard-link groups and contents. The config's User, WorkingDir, Env, Entrypoint and
//! Cmd must agree too.
//!
//! The base is a busybox-static root made here and pushed to a real `docker-registry`
//! ([`Registry`]), so both builders pull the very same image.
//!
//! Files excluded from the comparison, each because buildah (not the Dockerfile) puts it there:
//! see [`BUILDAH_ONLY`].

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::registry::Registry;

/// Paths buildah adds to the image that no Dockerfile instruction asked for; they are dropped
/// from buildah's tree before comparing when strata's result lacks them.
///
/// - `etc/hosts`, `etc/resolv.conf`, `etc/hostname`: buildah bind-mounts its generated files
///   there for every RUN and, when the base lacks them, leaves the empty mount-point files in
///   the layer.
/// - `run/.containerenv`: buildah's "you are in a container" marker, same mechanism.
/// - `run`: the directory buildah creates to hold `.containerenv` when the base has no `/run`.
/// - `dev`, `proc`, `sys`: the mount points of buildah's chroot isolation, left in the layer
///   when the base lacks them.
///
/// strata mounts /proc, /dev, /etc/hosts and /etc/resolv.conf too but never lets a mount point
/// reach the layer: these paths are removed from buildah's tree only, so one in strata's tree
/// is a difference.
const BUILDAH_ONLY: [&str; 8] = [
    "etc/hosts",
    "etc/resolv.conf",
    "etc/hostname",
    "run/.containerenv",
    "run",
    "dev",
    "proc",
    "sys",
];

// ---------------------------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Link(String),
    Fifo,
    Other(String),
}

/// One object of an unpacked root: kind, mode, owner, and for files with several links the
/// first path (in sort order) of its hard-link group.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    hardlink_group: Option<String>,
}

type Listing = BTreeMap<String, Node>;

fn list_root(root: &Path) -> Listing {
    let mut out = Listing::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.expect("walk");
        let rel = e
            .path()
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let md = e.path().symlink_metadata().expect("metadata");
        let ft = md.file_type();
        let kind = if ft.is_symlink() {
            Kind::Link(
                std::fs::read_link(e.path())
                    .expect("readlink")
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File(std::fs::read(e.path()).expect("read"))
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::Other(format!("{ft:?} rdev {}", md.rdev()))
        };
        let hardlink_group = (ft.is_file() && md.nlink() > 1).then(|| {
            inodes
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| rel.clone())
                .clone()
        });
        let mode = if ft.is_symlink() {
            0o777
        } else {
            md.mode() & 0o7777
        };
        out.insert(
            rel,
            Node {
                kind,
                mode,
                uid: md.uid(),
                gid: md.gid(),
                hardlink_group,
            },
        );
    }
    out
}

fn show(n: &Node) -> String {
    let kind = match &n.kind {
        Kind::File(b) if b.len() <= 80 => format!("file {:?}", String::from_utf8_lossy(b)),
        Kind::File(b) => format!("file ({} bytes)", b.len()),
        k => format!("{k:?}"),
    };
    let hl = n
        .hardlink_group
        .as_deref()
        .map(|g| format!(" hardlink-group {g}"))
        .unwrap_or_default();
    format!("{kind} {:o} {}:{}{hl}", n.mode, n.uid, n.gid)
}

/// Panic with every difference between the two listings.
fn assert_same(what: &str, strata: &Listing, buildah: &Listing) {
    let mut diff = String::new();
    let keys: BTreeSet<&String> = strata.keys().chain(buildah.keys()).collect();
    for k in keys {
        match (strata.get(k), buildah.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => diff.push_str(&format!(
                "/{k}:\n  strata  {}\n  buildah {}\n",
                a.map(show).unwrap_or_else(|| "-".into()),
                b.map(show).unwrap_or_else(|| "-".into())
            )),
        }
    }
    assert!(
        diff.is_empty(),
        "{what}: strata and buildah differ:\n{diff}"
    );
}

// ---------------------------------------------------------------------------------------------
// OCI layouts
// ---------------------------------------------------------------------------------------------

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("digest");
    layout.join("blobs").join(alg).join(hex)
}

/// The manifest of `tag` in the OCI layout.
fn manifest(layout: &Path, tag: &str) -> serde_json::Value {
    let index = read_json(&layout.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {}: {index}", layout.display()));
    read_json(&blob_path(layout, desc["digest"].as_str().expect("digest")))
}

/// The image config of `tag` in the OCI layout.
fn image_config(layout: &Path, tag: &str) -> serde_json::Value {
    let m = manifest(layout, tag);
    read_json(&blob_path(
        layout,
        m["config"]["digest"].as_str().expect("config digest"),
    ))
}

/// `umoci unpack` of `tag` from the layout into `bundle`; returns the rootfs.
fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let mut c = Command::new(tool("umoci", "umoci"));
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    c.arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle);
    run_ok(&mut c);
    bundle.join("rootfs")
}

/// The layer tars of `tag`, decompressed, as lists of (path, type byte, link name).
fn layer_entries(layout: &Path, tag: &str) -> Vec<Vec<(String, u8, String)>> {
    let m = manifest(layout, tag);
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            let file = std::fs::File::open(blob_path(layout, l["digest"].as_str().unwrap()))
                .expect("layer blob");
            let media = l["mediaType"].as_str().unwrap_or_default();
            let reader: Box<dyn std::io::Read> = if media.ends_with("gzip") {
                Box::new(flate2::read::GzDecoder::new(file))
            } else if media.ends_with("zstd") {
                Box::new(zstd::Decoder::new(file).expect("zstd"))
            } else {
                Box::new(file)
            };
            let mut ar = tar::Archive::new(reader);
            ar.entries()
                .expect("tar")
                .map(|e| {
                    let e = e.expect("entry");
                    let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                    let link = e
                        .link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    (path, e.header().entry_type().as_byte(), link)
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The builders
// ---------------------------------------------------------------------------------------------

/// A registry holding the busybox base as `busybase:latest`, and scratch space.
struct Peers {
    reg: Registry,
    env: Env,
    /// Run strata as this unprivileged user instead of root.
    rootless: Option<Rootless>,
}

/// How strata runs unprivileged: as `nobody` (65534:65534, no supplementary groups, via
/// util-linux's `setpriv`), with its own STRATA_HOME and HOME in a directory it owns.
/// With `subordinate`, a private mount namespace shows `/etc/subuid` and `/etc/subgid` files
/// giving nobody a range (host ids 200000-265535), so the setuid `newuidmap` maps container
/// ids 1.. as on a usual rootless set-up; without, strata gets the single-id map.
struct Rootless {
    dir: PathBuf,
    subordinate: bool,
}

const NOBODY: u32 = 65534;

impl Rootless {
    fn new(env: &Env, subordinate: bool) -> Rootless {
        use std::os::unix::fs::PermissionsExt;
        // nobody must reach the contexts and the binary's output below the test's temp dir.
        std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = env.path("nobody");
        std::fs::create_dir_all(dir.join("home")).unwrap();
        for p in [dir.clone(), dir.join("home")] {
            std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        write(
            &dir,
            "subuid",
            format!("{NOBODY}:200000:65536\n").as_bytes(),
        );
        write(
            &dir,
            "subgid",
            format!("{NOBODY}:200000:65536\n").as_bytes(),
        );
        Rootless { dir, subordinate }
    }

    /// `strata ARGS` as nobody.
    fn command(&self, args: &[&str]) -> Command {
        let strata = env!("CARGO_BIN_EXE_strata");
        let setpriv = tool("setpriv", "util-linux");
        let mut c = if self.subordinate {
            let mut c = Command::new(tool("unshare", "util-linux"));
            c.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                .arg(
                    "mount --bind \"$1\" /etc/subuid && mount --bind \"$2\" /etc/subgid && \
                     shift 2 && exec \"$@\"",
                )
                .arg("sh")
                .arg(self.dir.join("subuid"))
                .arg(self.dir.join("subgid"));
            c.arg(&setpriv);
            c
        } else {
            Command::new(&setpriv)
        };
        c.args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
            "--clear-groups",
            "--",
            strata,
        ])
        .args(args)
        .env("STRATA_HOME", self.dir.join("home/strata"))
        .env("HOME", self.dir.join("home"))
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("STRATA_THREADS");
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.command(args))
    }
}

/// Write the busybox root used as the base: every applet, users and groups, files to delete,
/// a symlink to a directory, files owned by another user.
fn busybox_rootfs(ctx: &Path) {
    let busybox = tool("busybox", "busybox-static");
    let root = ctx.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    let list = run_ok(Command::new(&busybox).arg("--list"));
    for applet in list.split_whitespace() {
        if applet != "busybox" && !applet.contains('[') {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    write(
        &root,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    write(
        &root,
        "etc/group",
        b"root:x:0:\napp:x:1000:\nstaff:x:50:app\nnogroup:x:65534:\n",
    );
    write(&root, "etc/removed", b"delete me\n");
    write(&root, "etc/keep.conf", b"keep\n");
    write(&root, "opt/tree/a", b"a\n");
    write(&root, "opt/tree/sub/b", b"b\n");
    write(&root, "opt/other/c", b"c\n");
    write(&root, "usr/share/doc/readme", b"docs\n");
    write(&root, "srv/data/x", b"x\n");
    write(&root, "srv/data/y", b"y\n");
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    chmod(&root, "tmp", 0o1777);
    std::fs::create_dir_all(root.join("var/lib")).unwrap();
    std::fs::create_dir_all(root.join("run")).unwrap();
    std::os::unix::fs::symlink("../run", root.join("var/run")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh-link")).unwrap();
    write(&ctx.join("home"), "app/.profile", b"export X=1\n");
    write(ctx, "suid", b"#!/bin/sh\n");
    write(ctx, "shared/file", b"shared\n");
    // Context modes are normalized (0644/0755); special bits come from --chmod.
    write(
        ctx,
        "Dockerfile",
        b"FROM scratch\nCOPY rootfs/ /\nCOPY --chown=1000:1000 home/ /home/\n\
          COPY --chmod=4755 suid /usr/bin/suid\nCOPY --chmod=2775 shared /srv/shared\n",
    );
}

impl Peers {
    fn new() -> Peers {
        assert!(
            is_root(),
            "the buildah comparison runs as root, as .ci/run does (buildah's chroot isolation and \
             umoci's owners need it)"
        );
        let reg = Registry::anonymous();
        let env = Env::new();
        let ctx = env.path("busybase");
        busybox_rootfs(&ctx);
        let tag = reg.image("busybase:latest");
        env.build(&ctx, &["--push", "-t", &tag]);
        Peers {
            reg,
            env,
            rootless: None,
        }
    }

    /// [`Peers::new`], with strata running unprivileged (see [`Rootless`]).
    fn rootless(subordinate: bool) -> Peers {
        let mut peers = Peers::new();
        peers.rootless = Some(Rootless::new(&peers.env, subordinate));
        peers
    }

    fn base(&self) -> String {
        self.reg.image("busybase:latest")
    }

    /// Write a context `name` with the Dockerfile (`{BASE}` replaced) and extra files.
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let ctx = self.env.path(&format!("ctx-{name}"));
        write(
            &ctx,
            "Dockerfile",
            dockerfile.replace("{BASE}", &self.base()).as_bytes(),
        );
        for (p, c) in files {
            write(&ctx, p, c.as_bytes());
        }
        ctx
    }

    /// Build with buildah and push to an OCI layout; returns the layout (tag `name`).
    fn buildah(&self, name: &str, ctx: &Path, args: &[&str]) -> PathBuf {
        let storage = self.env.path(&format!("buildah-{name}"));
        let global = |c: &mut Command| {
            c.arg("--root")
                .arg(storage.join("root"))
                .arg("--runroot")
                .arg(storage.join("runroot"))
                .args(["--storage-driver", "vfs"]);
        };
        let mut bud = Command::new(tool("buildah", "buildah"));
        global(&mut bud);
        bud.args([
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--tls-verify=false",
        ])
        .args(args)
        .args(["-t", &format!("localhost/{name}:latest")])
        .arg(ctx);
        run_peer_ok(&mut bud);
        let layout = self.env.path(&format!("{name}-buildah-layout"));
        let mut push = Command::new(tool("buildah", "buildah"));
        global(&mut push);
        push.args(["push", &format!("localhost/{name}:latest")])
            .arg(format!("oci:{}:{name}", layout.display()));
        run_ok(&mut push);
        layout
    }

    /// Build with strata (home `home`, run by `as_user` when given) and export to an OCI layout.
    fn strata(&self, name: &str, ctx: &Path, args: &[&str]) -> PathBuf {
        let tag = format!("{name}:latest");
        let mut full = vec!["-t", tag.as_str()];
        full.extend_from_slice(args);
        let Some(rootless) = &self.rootless else {
            self.env.build(ctx, &full);
            let layout = self.env.path(&format!("{name}-strata-layout"));
            self.env.ok(&[
                "export",
                &tag,
                "--output",
                &format!("oci:{}:{name}", layout.display()),
            ]);
            validate_layout(&layout);
            return layout;
        };
        let mut build = vec!["build", "--progress", "plain"];
        build.extend_from_slice(&full);
        let ctx = ctx.to_str().unwrap();
        build.push(ctx);
        rootless.ok(&build);
        let layout = rootless.dir.join(format!("{name}-strata-layout"));
        rootless.ok(&[
            "export",
            &tag,
            "--output",
            &format!("oci:{}:{name}", layout.display()),
        ]);
        validate_layout(&layout);
        layout
    }

    /// Build `dockerfile` with both, compare trees and configs; returns strata's layout and tree.
    fn compare(
        &self,
        name: &str,
        dockerfile: &str,
        files: &[(&str, &str)],
        args: &[&str],
        unlinked_by_buildah: &[&str],
    ) -> (PathBuf, Listing) {
        let ctx = self.context(name, dockerfile, files);
        let ours = self.strata(name, &ctx, args);
        let theirs = self.buildah(name, &ctx, args);
        let (tree, _) = compare_layouts(&self.env, name, &ours, &theirs, unlinked_by_buildah);
        (ours, tree)
    }

    /// The base exported to an OCI layout (tag `base`).
    fn base_layout(&self) -> PathBuf {
        let layout = self.env.path("busybase-layout");
        if !layout.exists() {
            self.env.ok(&[
                "export",
                &self.base(),
                "--output",
                &format!("oci:{}:base", layout.display()),
            ]);
        }
        layout
    }
}

/// Unpack both layouts (tag `name`) with umoci, drop buildah's own files, compare trees and
/// configs. Returns strata's tree and config.
///
/// `unlinked_by_buildah`: paths that strata keeps as hard links and buildah stores as separate
/// copies (each case says why); for them only, the hard-link group is not compared (contents,
/// modes and owners still are).
fn compare_layouts(
    env: &Env,
    name: &str,
    ours: &Path,
    theirs: &Path,
    unlinked_by_buildah: &[&str],
) -> (Listing, serde_json::Value) {
    let a = umoci_unpack(ours, name, &env.path(&format!("{name}-strata-bundle")));
    let b = umoci_unpack(theirs, name, &env.path(&format!("{name}-buildah-bundle")));
    let (mut ta, mut tb) = (list_root(&a), list_root(&b));
    for p in BUILDAH_ONLY {
        if !ta.contains_key(p) {
            tb.remove(p);
        }
    }
    let full = ta.clone();
    for p in unlinked_by_buildah {
        let a = ta
            .get_mut(*p)
            .unwrap_or_else(|| panic!("{name}: strata has no /{p}"));
        assert!(
            a.hardlink_group.is_some(),
            "{name}: strata should keep /{p} as a hard link"
        );
        a.hardlink_group = None;
        if let Some(b) = tb.get_mut(*p) {
            b.hardlink_group = None;
        }
    }
    assert_same(name, &ta, &tb);
    let ta = full;
    let (ca, cb) = (image_config(ours, name), image_config(theirs, name));
    for key in ["User", "WorkingDir", "Entrypoint", "Cmd"] {
        let norm = |v: &serde_json::Value| match v {
            // buildah writes "" and [] where strata omits the field.
            serde_json::Value::String(s) if s.is_empty() => serde_json::Value::Null,
            serde_json::Value::Array(a) if a.is_empty() => serde_json::Value::Null,
            v => v.clone(),
        };
        assert_eq!(
            norm(&ca["config"][key]),
            norm(&cb["config"][key]),
            "{name}: config {key} differs\nstrata  {}\nbuildah {}",
            ca["config"],
            cb["config"]
        );
    }
    // Env, as a map (the order of keys set in one ENV may differ): both put the default PATH
    // into the config of a stage whose base has none, at FROM.
    let env_map = |c: &serde_json::Value| -> BTreeMap<String, String> {
        c["config"]["Env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(env_map(&ca), env_map(&cb), "{name}: config Env differs");
    (ta, ca)
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// The Dockerfile of [`multi_stage_file_operations_match_buildah`].
const FILEOPS: &str = r#"FROM {BASE} AS build
ARG FLAVOR=plain
ENV GREETING=hello OUT=/src/out
WORKDIR /src
RUN mkdir -p out/sub/deeper && echo "$GREETING $FLAVOR" > out/msg && chmod 0640 out/msg && chmod 0750 out/sub
RUN ln -s msg out/link && ln out/msg out/hard && ln -s /src/out/sub out/dirlink && ln -s nowhere out/dangling
RUN echo data > out/sub/owned && chown 1000:1000 out/sub/owned && chown 123:456 out/sub/deeper
RUN printf '#!/bin/sh\necho run\n' > $OUT/tool && chmod 4755 $OUT/tool && mkdir $OUT/shared && chmod 3777 $OUT/shared
RUN ln /etc/keep.conf /src/keep-hard && echo pid > /var/run/app.pid
WORKDIR out
RUN pwd > where && env | grep -E '^(GREETING|FLAVOR|OUT)=' | sort > env.txt

FROM {BASE}
ENV APP=/app PATH=/app/bin:/usr/bin:/bin
COPY --from=build /src/out /app
COPY --from=build /var/run/app.pid /run/copied.pid
RUN mkdir -p /app/bin && ln -s ../tool /app/bin/tool && chmod 0700 /app/sub/deeper
RUN ln /etc/keep.conf /etc/keep-hard && echo two > /app/h1 && ln /app/h1 /app/h2 && ln /app/h1 /app/bin/h3
RUN chown -R 1000:50 /home/app && chmod 0600 /home/app/.profile && touch /home/app/new
RUN mkdir /app/work && chown 1000:50 /app/work
WORKDIR /app/work
USER 1000:50
RUN echo "$APP as $(id -u):$(id -g)" > whoami && mkdir own && ln -s own ownlink
USER root
ENTRYPOINT ["/app/tool"]
CMD ["--help"]
"#;

/// Hard links buildah does not keep, where strata's layers say what the file system had:
/// - app/msg + app/hard: linked by a RUN of the build stage, then `COPY --from`; buildah's
///   COPY copies each path separately, strata's keeps the link, as BuildKit's does.
/// - etc/keep.conf + etc/keep-hard: a new link to a base file. buildah's vfs driver diffs
///   directories and sees keep.conf unchanged, so its layer has keep-hard as a plain copy;
///   strata's overlay upper holds both names of the one inode, so its layer links them (as
///   docker's overlay2 driver does) and the unpacked file system is the one RUN left.
const FILEOPS_UNLINKED: &[&str] = &["app/msg", "app/hard", "etc/keep.conf", "etc/keep-hard"];

/// The Dockerfile of [`deletions_become_whiteouts_and_match_buildah`].
const DELETIONS: &str = r#"FROM {BASE}
RUN rm /etc/removed && rm -r /opt/tree && rm /srv/data/x
RUN rm -r /usr/share/doc && mkdir /usr/share/doc && echo new > /usr/share/doc/fresh
RUN rm -r /opt/other && echo now-a-file > /opt/other && rm /etc/keep.conf && mkdir /etc/keep.conf && rm /var/run && mkdir /var/run && echo f > /var/run/f
RUN cp -p /usr/bin/suid /suid-copy && stat -c '%a %u:%g %n' /usr/bin/suid /srv/shared /home/app/.profile > /modes
"#;

/// File-system operations in a build stage, the result copied into a runtime stage that runs
/// more steps: mkdir, chmod (setuid, sticky, odd modes), symlinks (to files, to directories,
/// dangling, absolute), hard links (new files and a base file), chown to other users,
/// WORKDIR, ENV and ARG in RUN, writing through a base symlink to a directory.
#[test]
fn multi_stage_file_operations_match_buildah() {
    let peers = Peers::new();
    let (_, tree) = peers.compare(
        "fileops",
        FILEOPS,
        &[],
        &["--build-arg", "FLAVOR=spicy"],
        FILEOPS_UNLINKED,
    );
    // The comparison passed; spot-check that the steps really ran.
    assert_eq!(tree["app/msg"].kind, Kind::File(b"hello spicy\n".to_vec()));
    assert_eq!(tree["app/tool"].mode, 0o4755);
    assert_eq!(tree["app/work/own"].uid, 1000);
    assert_eq!(tree["app/h2"].hardlink_group.as_deref(), Some("app/bin/h3"));
    assert_eq!(
        tree["etc/keep.conf"].hardlink_group,
        tree["etc/keep-hard"].hardlink_group
    );
}

/// Deleting base files and whole base directories: the layers hold `.wh.` whiteouts and an
/// opaque marker (read from strata's layer tars), umoci's unpack no longer has the paths, and
/// the result is buildah's. Also: a base directory replaced by a file, a file by a directory,
/// a symlink to a directory by a directory, and base modes (setuid, setgid) seen from RUN.
#[test]
fn deletions_become_whiteouts_and_match_buildah() {
    let peers = Peers::new();
    let (layout, tree) = peers.compare("deletions", DELETIONS, &[], &[], &[]);
    let base_layers = manifest(&peers.base_layout(), "base")["layers"]
        .as_array()
        .unwrap()
        .len();
    let layers = layer_entries(&layout, "deletions");
    assert_eq!(layers.len(), base_layers + 4, "one layer per RUN");
    let names = |i: usize| -> Vec<&str> {
        layers[base_layers + i]
            .iter()
            .map(|(p, _, _)| p.trim_start_matches("./").trim_end_matches('/'))
            .collect()
    };
    let first = names(0);
    for wh in ["etc/.wh.removed", "opt/.wh.tree", "srv/data/.wh.x"] {
        assert!(
            first.contains(&wh),
            "no {wh} in the first RUN layer: {first:?}"
        );
    }
    assert!(
        !first.iter().any(|p| p.starts_with("opt/tree/")),
        "a deleted directory is one whiteout, not its children: {first:?}"
    );
    let second = names(1);
    assert!(
        second.contains(&"usr/share/doc/.wh..wh..opq") && second.contains(&"usr/share/doc/fresh"),
        "a directory deleted and made again is opaque: {second:?}"
    );
    assert!(!second.iter().any(|p| p.contains("readme")), "{second:?}");
    let kinds: BTreeMap<&str, u8> = layers[base_layers + 2]
        .iter()
        .map(|(p, t, _)| (p.trim_start_matches("./").trim_end_matches('/'), *t))
        .collect();
    assert_eq!(kinds.get("opt/other"), Some(&b'0'), "{kinds:?}");
    assert_eq!(kinds.get("etc/keep.conf"), Some(&b'5'), "{kinds:?}");
    assert_eq!(kinds.get("var/run"), Some(&b'5'), "{kinds:?}");

    for gone in [
        "etc/removed",
        "opt/tree",
        "opt/tree/a",
        "opt/tree/sub/b",
        "srv/data/x",
        "usr/share/doc/readme",
    ] {
        assert!(!tree.contains_key(gone), "/{gone} survived umoci unpack");
    }
    assert!(tree.contains_key("srv/data/y") && tree.contains_key("usr/share/doc/fresh"));
    assert_eq!(tree["opt/other"].kind, Kind::File(b"now-a-file\n".to_vec()));
    assert_eq!(tree["var/run"].kind, Kind::Dir);
    assert_eq!(tree["suid-copy"].mode, 0o4755);
    assert_eq!(
        tree["modes"].kind,
        Kind::File(
            b"4755 0:0 /usr/bin/suid\n2775 0:0 /srv/shared\n644 1000:1000 /home/app/.profile\n"
                .to_vec()
        )
    );
}

// ---------------------------------------------------------------------------------------------
// Hand-made images: raw layer tars (hostile or merely unusual) pushed with skopeo
// ---------------------------------------------------------------------------------------------

/// One raw tar entry: the path bytes exactly as given (no cleaning, unlike the tar crate's
/// builder, which refuses `..`), a type flag, a link name, a mode and contents.
struct Raw<'a> {
    path: &'a str,
    kind: u8,
    link: &'a str,
    mode: u32,
    uid: u32,
    data: &'a [u8],
}

fn raw<'a>(path: &'a str, kind: u8, link: &'a str) -> Raw<'a> {
    Raw {
        path,
        kind,
        link,
        mode: if kind == b'5' { 0o755 } else { 0o644 },
        uid: 0,
        data: b"",
    }
}

fn raw_file<'a>(path: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        data,
        ..raw(path, b'0', "")
    }
}

/// A ustar archive of `entries`, written byte by byte. Paths and link names longer than the
/// header fields are not needed here.
fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    fn octal(field: &mut [u8], v: u64) {
        let s = format!("{:0w$o}\0", v, w = field.len() - 1);
        field.copy_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    for e in entries {
        assert!(e.path.len() <= 100 && e.link.len() <= 100, "{}", e.path);
        let mut h = [0u8; 512];
        h[..e.path.len()].copy_from_slice(e.path.as_bytes());
        octal(&mut h[100..108], u64::from(e.mode));
        octal(&mut h[108..116], u64::from(e.uid));
        octal(&mut h[116..124], u64::from(e.uid));
        octal(&mut h[124..136], e.data.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = e.kind;
        h[157..157 + e.link.len()].copy_from_slice(e.link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if e.kind == b'3' {
            // /dev/null's numbers.
            octal(&mut h[329..337], 1);
            octal(&mut h[337..345], 3);
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Write an OCI layout holding one image whose layers are the given uncompressed tar files,
/// and copy it with skopeo to `reg/<repo>:latest`.
fn push_raw_image(env: &Env, reg: &Registry, repo: &str, layers: &[PathBuf]) {
    let layout = env.path(&format!("raw-{repo}"));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |path: &Path| -> (String, u64) {
        let (d, size) =
            strata::digest::digest_reader(std::fs::File::open(path).unwrap()).expect("hash");
        let dest = blobs.join(d.hex());
        if !dest.exists() {
            std::fs::copy(path, &dest).expect("copy blob");
        }
        (format!("sha256:{}", d.hex()), size)
    };
    let put_bytes = |name: &str, bytes: &[u8]| -> (String, u64) {
        let p = env.path(&format!("raw-{repo}-{name}"));
        std::fs::write(&p, bytes).unwrap();
        put(&p)
    };
    let layer_descs: Vec<(String, u64)> = layers.iter().map(|p| put(p)).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        // buildah checks that history and layers agree.
        "history": (0..layer_descs.len())
            .map(|i| serde_json::json!({
                "created": "2023-11-14T22:13:20Z",
                "created_by": format!("raw layer {i}"),
            }))
            .collect::<Vec<_>>(),
        "rootfs": {
            "type": "layers",
            "diff_ids": layer_descs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        },
    });
    let (cd, cs) = put_bytes("config", &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cd,
            "size": cs,
        },
        "layers": layer_descs.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d,
            "size": s,
        })).collect::<Vec<_>>(),
    });
    let (md, ms) = put_bytes("manifest", &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md,
            "size": ms,
            "annotations": { "org.opencontainers.image.ref.name": "latest" },
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    run_ok(
        Command::new(tool("skopeo", "skopeo"))
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}", reg.image(&format!("{repo}:latest")))),
    );
}

fn push_raw_tars(env: &Env, reg: &Registry, repo: &str, layers: &[Vec<u8>]) {
    let paths: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let p = env.path(&format!("raw-{repo}-layer{i}.tar"));
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect();
    push_raw_image(env, reg, repo, &paths);
}

/// Layers that are unusual but valid: an opaque marker after its siblings (it still hides
/// the lower content of a directory this layer rewrites), entries without their parent
/// directories, a hard link to a file of a lower layer, a setuid file owned by another user,
/// an absolute symlink to a directory next to writes under the real path. strata's RUN sees
/// what buildah's sees.
///
/// Not compared: writing through one name of a hard link whose names all come from lower
/// layers. overlayfs (without `index=on`, as docker's overlay2 mounts it) copies up only the
/// name written to, so the link is broken in the new layer; buildah's vfs driver works on a
/// full copy and keeps it.
#[test]
fn unusual_valid_layers_unpack_like_buildah() {
    let peers = Peers::new();
    let busybox = std::fs::read(tool("busybox", "busybox-static")).unwrap();
    let lower = raw_tar(&[
        raw("bin/", b'5', ""),
        Raw {
            mode: 0o755,
            ..raw_file("bin/busybox", &busybox)
        },
        raw("bin/sh", b'2', "busybox"),
        raw("d/", b'5', ""),
        raw_file("d/keep", b"lower\n"),
        raw("d/sub/", b'5', ""),
        raw_file("d/sub/old", b"old\n"),
        raw_file("shared.txt", b"shared\n"),
        raw("etc/", b'5', ""),
        raw_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    ]);
    let upper = raw_tar(&[
        raw("d/", b'5', ""),
        raw("d/sub/", b'5', ""),
        raw_file("d/sub/new", b"new\n"),
        raw_file("d/.wh..wh..opq", b""),
        raw_file("no/parents/here", b"deep\n"),
        raw("shared-link", b'1', "shared.txt"),
        Raw {
            mode: 0o4750,
            uid: 1000,
            ..raw_file("bin/suid", b"#!/bin/sh\n")
        },
        raw("etc-link", b'2', "/etc"),
        raw_file("etc/group", b"root:x:0:\n"),
    ]);
    push_raw_tars(&peers.env, &peers.reg, "unusual", &[lower, upper]);
    let dockerfile = format!(
        "FROM {}\nRUN busybox ls -R /d > /d-listing && busybox stat -c '%a %u %h %n' /bin/suid /shared.txt /no/parents > /stat && echo y > /etc-link/hostname.conf\n",
        peers.reg.image("unusual:latest")
    );
    let (_, tree) = peers.compare("unusual", &dockerfile, &[], &[], &[]);
    assert_eq!(
        tree["d-listing"].kind,
        Kind::File(b"/d:\nsub\n\n/d/sub:\nnew\n".to_vec())
    );
    assert_eq!(
        tree["stat"].kind,
        Kind::File(b"4750 1000 1 /bin/suid\n644 0 2 /shared.txt\n755 0 2 /no/parents\n".to_vec())
    );
}

/// Base layers that try to escape the root: every one is refused when a RUN needs the base,
/// with an error naming the entry, and nothing lands outside (the escapes all aim at a
/// canary directory, which must stay empty).
#[test]
fn hostile_base_layers_are_refused_by_name() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let canary = env.path("canary");
    std::fs::create_dir_all(&canary).unwrap();
    write(&canary, "secret", b"host file\n");
    let c = canary.display().to_string();
    let up = "../".repeat(16);
    let abs_target = c.clone();
    let escaping = format!("{up}{}", c.trim_start_matches('/'));
    let dotdot_file = format!("{escaping}/dotdot");
    let abs_file = format!("{c}/absolute");
    let through = format!("{}/secret", "evil");
    let cases: Vec<(&str, Vec<Vec<u8>>, String, &str)> = vec![
        (
            "dotdot",
            vec![raw_tar(&[raw_file(&dotdot_file, b"pwned\n")])],
            dotdot_file.clone(),
            "`..` component",
        ),
        (
            "absolute",
            vec![raw_tar(&[raw_file(&abs_file, b"pwned\n")])],
            abs_file.clone(),
            "absolute path",
        ),
        (
            "symlink-escape",
            vec![raw_tar(&[raw("evil", b'2', &escaping)])],
            "evil".into(),
            "escapes the root",
        ),
        (
            "write-through-symlink",
            vec![
                raw_tar(&[raw("evil", b'2', &abs_target)]),
                raw_tar(&[raw_file("evil/pwned", b"pwned\n")]),
            ],
            "evil/pwned".into(),
            "parent directory is a symlink",
        ),
        (
            "hardlink-dotdot",
            vec![raw_tar(&[raw("hl", b'1', &format!("{escaping}/secret"))])],
            format!("{escaping}/secret"),
            "`..` component",
        ),
        (
            "hardlink-absolute",
            vec![raw_tar(&[raw("hl", b'1', &format!("{c}/secret"))])],
            format!("{c}/secret"),
            "absolute path",
        ),
        (
            "hardlink-through-symlink",
            vec![raw_tar(&[
                raw("evil", b'2', &abs_target),
                raw("hl", b'1', &through),
            ])],
            through.clone(),
            "parent directory is a symlink",
        ),
        (
            "whiteout-dotdot",
            vec![raw_tar(&[
                raw("etc/", b'5', ""),
                raw_file("etc/.wh...", b""),
            ])],
            "etc/.wh...".into(),
            "whiteout of `.` or `..`",
        ),
        (
            "whiteout-through-symlink",
            vec![
                raw_tar(&[raw("evil", b'2', &abs_target)]),
                raw_tar(&[raw_file("evil/.wh.secret", b"")]),
            ],
            "evil/.wh.secret".into(),
            "parent directory is a symlink",
        ),
        (
            "opaque-through-symlink",
            vec![
                raw_tar(&[raw("evil", b'2', &abs_target)]),
                raw_tar(&[raw_file("evil/.wh..wh..opq", b"")]),
            ],
            "evil/.wh..wh..opq".into(),
            "parent directory is a symlink",
        ),
    ];
    for (name, layers, entry, why) in &cases {
        push_raw_tars(&env, &reg, name, layers);
        let ctx = env.path(&format!("ctx-{name}"));
        write(
            &ctx,
            "Dockerfile",
            format!("FROM {}\nRUN true\n", reg.image(&format!("{name}:latest"))).as_bytes(),
        );
        let out = env
            .cmd()
            .args(["build", "--progress", "plain", "-t", name])
            .arg(&ctx)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: the build succeeded\n{stderr}"
        );
        let expected = format!("refusing layer entry {entry:?}: ");
        assert!(
            stderr.contains(&expected) && stderr.contains(why),
            "{name}: expected `{expected}…{why}` in:\n{stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(&canary)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("secret")], "{name}");
        assert_eq!(
            std::fs::read(canary.join("secret")).unwrap(),
            b"host file\n"
        );
        assert!(!env.names().contains(&format!("{name}:latest")));
    }
}

// ---------------------------------------------------------------------------------------------
// A real Debian base
// ---------------------------------------------------------------------------------------------

/// A `debootstrap --variant=minbase bookworm` root file system as one uncompressed layer tar,
/// made once (about 70 s, from the Debian mirror) and cached under the cargo target dir keyed
/// by suite, variant and architecture; concurrent tests wait on a lock. As in
/// benches/compare.sh, device nodes, fifos and sockets are removed first: they are not image
/// content (runtimes create /dev). GNU tar writes the layer, keeping modes, owners and hard
/// links exactly.
fn debian_minbase_tar() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debootstrap");
    std::fs::create_dir_all(&dir).unwrap();
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_string();
    let key = format!("bookworm-minbase-{arch}");
    let tar = dir.join(format!("{key}.tar"));
    let lock = std::fs::File::create(dir.join(format!("{key}.lock"))).unwrap();
    // SAFETY: flock on an open file descriptor; released when `lock` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    if tar.exists() {
        return tar;
    }
    let work = dir.join(format!("{key}.work"));
    let rootfs = work.join("rootfs");
    if !work.join("complete").exists() {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let log = dir.join(format!("{key}.log"));
        let status = Command::new(tool("debootstrap", "debootstrap"))
            .args(["--variant=minbase", "bookworm"])
            .arg(&rootfs)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{key}.err"))).unwrap())
            .status()
            .expect("run debootstrap");
        assert!(
            status.success(),
            "debootstrap --variant=minbase bookworm failed ({status}); see {}",
            log.display()
        );
        run_ok(
            Command::new("find")
                .arg(&rootfs)
                .args(["-xdev", "!", "-type", "f", "!", "-type", "d"])
                .args(["!", "-type", "l", "-delete"]),
        );
        std::fs::write(work.join("complete"), b"").unwrap();
    }
    let tmp = dir.join(format!("{key}.tar.tmp"));
    run_ok(
        Command::new(tool("tar", "tar"))
            .args(["--numeric-owner", "--sort=name", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tmp)
            .arg("."),
    );
    std::fs::rename(&tmp, &tar).unwrap();
    tar
}

/// The Altinn runtime stage on Debian: `groupadd`/`useradd` from the real passwd package,
/// then `mkdir` as the new user; compared with buildah on the same Dockerfile.
#[test]
fn altinn_final_stage_on_debian_matches_buildah() {
    let debian = debian_minbase_tar();
    let peers = Peers::new();
    push_raw_image(&peers.env, &peers.reg, "debian", &[debian]);
    let dockerfile = format!(
        "FROM {}\n\
         RUN groupadd -g 3000 dotnet && useradd -u 1000 -g dotnet -M -s /bin/false dotnet\n\
         USER dotnet\n\
         RUN mkdir /tmp/logtelemetry\n",
        peers.reg.image("debian:latest")
    );
    let (layout, tree) = peers.compare("altinn", &dockerfile, &[], &[], &[]);
    let text = |p: &str| match &tree[p].kind {
        Kind::File(b) => String::from_utf8(b.clone()).unwrap(),
        k => panic!("/{p} is {k:?}"),
    };
    assert!(
        text("etc/passwd").contains("\ndotnet:x:1000:3000::/home/dotnet:/bin/false\n"),
        "{}",
        text("etc/passwd")
    );
    assert!(
        text("etc/group").contains("\ndotnet:x:3000:\n"),
        "{}",
        text("etc/group")
    );
    let t = &tree["tmp/logtelemetry"];
    assert_eq!(
        (&t.kind, t.uid, t.gid, t.mode),
        (&Kind::Dir, 1000, 3000, 0o755)
    );
    assert_eq!(image_config(&layout, "altinn")["config"]["User"], "dotnet");
}

// ---------------------------------------------------------------------------------------------
// Rootless
// ---------------------------------------------------------------------------------------------

/// The buildah comparisons again with strata unprivileged (nobody, a subordinate id range as
/// rootless set-ups have, so `chown` to other users and `USER 1000` work).
#[test]
fn rootless_multi_stage_file_operations_match_buildah() {
    let peers = Peers::rootless(true);
    let (_, tree) = peers.compare(
        "fileops",
        FILEOPS,
        &[],
        &["--build-arg", "FLAVOR=spicy"],
        FILEOPS_UNLINKED,
    );
    assert_eq!(tree["app/work/own"].uid, 1000);
}

#[test]
fn rootless_deletions_match_buildah() {
    let peers = Peers::rootless(true);
    peers.compare("deletions", DELETIONS, &[], &[], &[]);
}

/// The Altinn stage on Debian with strata unprivileged: base files keep their owners
/// (`/etc/shadow` is root:shadow 0640, rewritten by useradd) and the result is buildah's.
#[test]
fn rootless_altinn_final_stage_on_debian_matches_buildah() {
    let debian = debian_minbase_tar();
    let peers = Peers::rootless(true);
    push_raw_image(&peers.env, &peers.reg, "debian", &[debian]);
    let dockerfile = format!(
        "FROM {}\n\
         RUN groupadd -g 3000 dotnet && useradd -u 1000 -g dotnet -M -s /bin/false dotnet\n\
         USER dotnet\n\
         RUN mkdir /tmp/logtelemetry\n",
        peers.reg.image("debian:latest")
    );
    let (_, tree) = peers.compare("altinn", &dockerfile, &[], &[], &[]);
    let t = &tree["tmp/logtelemetry"];
    assert_eq!((t.uid, t.gid), (1000, 3000));
    assert_eq!(
        (tree["etc/shadow"].gid, tree["etc/shadow"].mode),
        (42, 0o640)
    );
}

/// Unprivileged without subordinate ids (the single-id map): RUN as root works, a device node
/// in a base layer is refused by name, and `USER 1000` fails naming the missing range.
#[test]
fn rootless_single_id_map_refuses_devices_and_unmapped_users() {
    let peers = Peers::rootless(false);
    let rootless = peers.rootless.as_ref().unwrap();
    let ctx = peers.context(
        "single",
        "FROM {BASE}\nRUN rm /etc/removed && mkdir /made && echo hi > /made/file\n",
        &[],
    );
    rootless.ok(&["build", "-t", "single", ctx.to_str().unwrap()]);

    push_raw_tars(
        &peers.env,
        &peers.reg,
        "device",
        &[raw_tar(&[raw("dev/", b'5', ""), raw("dev/evil", b'3', "")])],
    );
    let ctx = peers.context(
        "device",
        &format!("FROM {}\nRUN true\n", peers.reg.image("device:latest")),
        &[],
    );
    let out = rootless
        .command(&["build", "-t", "device", ctx.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing layer entry \"dev/evil\": device node in a rootless unpack"),
        "{stderr}"
    );

    let ctx = peers.context("unmapped", "FROM {BASE}\nUSER 1000\nRUN true\n", &[]);
    let out = rootless
        .command(&["build", "-t", "unmapped", ctx.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("uid 1000 is not mapped in the user namespace"),
        "{stderr}"
    );
}

/// With subordinate ids the device node is refused too: root of a rootless user namespace
/// cannot make one.
#[test]
fn rootless_with_subordinate_ids_refuses_devices() {
    let peers = Peers::rootless(true);
    let rootless = peers.rootless.as_ref().unwrap();
    push_raw_tars(
        &peers.env,
        &peers.reg,
        "device",
        &[raw_tar(&[raw("dev/", b'5', ""), raw("dev/evil", b'3', "")])],
    );
    let ctx = peers.context(
        "device",
        &format!("FROM {}\nRUN true\n", peers.reg.image("device:latest")),
        &[],
    );
    let out = rootless
        .command(&["build", "-t", "device", ctx.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing layer entry \"dev/evil\": device node in a rootless unpack"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Rebuilds
// ---------------------------------------------------------------------------------------------

/// A lazy registry base, WORKDIR to a directory the base lacks, then RUN: the second build
/// executes nothing and gives the same digest. (The first build used to decide WORKDIR on the
/// lazy view, the second on the base RUN had fetched: another layer, a RUN cache miss.)
#[test]
fn a_rebuild_on_a_lazy_base_with_workdir_reuses_every_run() {
    let peers = Peers::new();
    let ctx = peers.context(
        "rebuild",
        "FROM {BASE}\nWORKDIR /src/new\nCOPY f .\nRUN cat f > g\n",
        &[("f", "content\n")],
    );
    let env = Env::new();
    let first = env.build(&ctx, &["-t", "rebuild"]);
    let out = env
        .cmd()
        .args(["build", "--progress", "plain", "-t", "rebuild"])
        .arg(&ctx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        first,
        "{stderr}"
    );
    assert_eq!(stderr.matches("CACHED").count(), 3, "{stderr}");
    let tree = env.unpack("rebuild", "rebuild");
    assert_eq!(tree["src/new/g"].0, Obj::File(b"content\n".to_vec()));
}
