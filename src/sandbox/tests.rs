//! Real processes on a busybox root file system (Debian's `busybox-static`, which `.ci/run`
//! installs).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::layer::{Entry, EntryKind};

const APPLETS: [&str; 15] = [
    "sh", "mkdir", "rm", "chmod", "ln", "cat", "echo", "id", "ls", "touch", "tar", "sleep", "pwd",
    "ip", "chown",
];

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox is not installed: apt-get install -y busybox-static")
}

/// A tiny runnable root: busybox and its applets, a passwd/group, and a few files to delete.
fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "tmp", "var/lib/doomed/sub", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy(busybox(), dir.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(dir.join("etc/removed-file"), "bye\n").unwrap();
    std::fs::write(dir.join("var/lib/doomed/a"), "a").unwrap();
    std::fs::write(dir.join("var/lib/doomed/sub/b"), "b").unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::in_dir(tempfile::tempdir().unwrap())
    }

    fn in_dir(tmp: tempfile::TempDir) -> Fixture {
        let base = tmp.path().join("base");
        let upper = tmp.path().join("upper");
        let work = tmp.path().join("work");
        for d in [&base, &upper, &work] {
            std::fs::create_dir(d).unwrap();
        }
        busybox_rootfs(&base);
        Fixture {
            _tmp: tmp,
            base,
            upper,
            work,
        }
    }

    fn spec(&self, script: &str) -> RunSpec {
        RunSpec::new(
            vec![self.base.clone()],
            &self.upper,
            &self.work,
            vec!["sh".into(), "-c".into(), script.into()],
        )
    }

    fn run(&self, spec: &RunSpec) -> (RunOutcome, BTreeMap<String, Entry>) {
        let outcome = Sandbox::new().run(spec).unwrap();
        let entries = upper_to_entries(&self.upper, &outcome.ids)
            .unwrap()
            .into_iter()
            .map(|e| (e.path.to_string_lossy().into_owned(), e))
            .collect();
        (outcome, entries)
    }
}

fn output(o: &RunOutcome) -> String {
    String::from_utf8_lossy(&o.output).into_owned()
}

fn content(e: &Entry) -> Vec<u8> {
    let EntryKind::File { source, .. } = &e.kind else {
        panic!("{} is not a file", e.path.display());
    };
    let mut buf = Vec::new();
    source.open().unwrap().read_to_end(&mut buf).unwrap();
    buf
}

const BASIC: &str = "echo hi; id -u; mkdir /tmp/x; echo data > /tmp/x/f; rm /etc/removed-file";

fn basic(kind: Option<RootfsKind>) -> RootfsKind {
    let fx = Fixture::new();
    let mut spec = fx.spec(BASIC);
    spec.rootfs = kind;
    let mut lines = Vec::new();
    let outcome = Sandbox::new()
        .run_with(&spec, &mut |l| lines.push(l.to_owned()))
        .unwrap();
    assert!(outcome.success(), "{outcome:?}: {}", output(&outcome));
    assert_eq!(output(&outcome), "hi\n0\n");
    assert_eq!(lines, ["hi", "0"]);
    let entries: BTreeMap<_, _> = upper_to_entries(&fx.upper, &outcome.ids)
        .unwrap()
        .into_iter()
        .map(|e| (e.path.to_string_lossy().into_owned(), e))
        .collect();
    assert_eq!(content(&entries["tmp/x/f"]), b"data\n");
    assert_eq!((entries["tmp/x/f"].uid, entries["tmp/x/f"].gid), (0, 0));
    assert!(entries["tmp/x"].is_dir());
    assert!(
        entries.contains_key("etc/.wh.removed-file"),
        "{:?}",
        entries.keys()
    );
    // Mountpoints and the run's own plumbing never reach the layer.
    for k in entries.keys() {
        assert!(
            !k.starts_with("proc") && !k.starts_with("dev") && k != "etc/hosts",
            "unexpected entry {k}"
        );
    }
    if let Some(kind) = kind {
        assert_eq!(outcome.rootfs, kind);
    }
    eprintln!("root file system assembled with {:?}", outcome.rootfs);
    outcome.rootfs
}

#[test]
fn runs_a_command_and_reads_back_the_upper() {
    basic(None);
}

#[test]
fn kernel_overlay() {
    basic(Some(RootfsKind::KernelOverlay));
}

#[test]
fn fuse_overlay() {
    need_fuse_overlayfs();
    basic(Some(RootfsKind::FuseOverlay));
}

#[test]
fn copy_snapshot() {
    basic(Some(RootfsKind::Copy));
}

#[test]
fn user_and_group_own_created_files() {
    let fx = Fixture::new();
    let mut spec = fx.spec("id -u; id -g; id -G; mkdir /tmp/logtelemetry");
    (spec.uid, spec.gid, spec.groups) = (1000, 3000, vec![3000, 4000]);
    if let Err(e) = idmap::MapPlan::for_current_user()
        .map
        .check_user(1000, 3000, &[4000])
    {
        eprintln!("!!! SKIPPED: {e}");
        return;
    }
    for kind in [None, Some(RootfsKind::FuseOverlay), Some(RootfsKind::Copy)] {
        if kind == Some(RootfsKind::FuseOverlay) {
            need_fuse_overlayfs();
        }
        let fx = Fixture::new();
        let mut spec = RunSpec {
            rootfs: kind,
            ..spec.clone()
        };
        (spec.upper, spec.work, spec.lower) =
            (fx.upper.clone(), fx.work.clone(), vec![fx.base.clone()]);
        let (outcome, entries) = fx.run(&spec);
        assert!(outcome.success(), "{kind:?}: {}", output(&outcome));
        assert_eq!(output(&outcome), "1000\n3000\n3000 4000\n");
        let e = &entries["tmp/logtelemetry"];
        assert_eq!((e.uid, e.gid, e.mode), (1000, 3000, 0o755), "{kind:?}");
    }
}

#[test]
fn failing_command_reports_status_and_output_tail() {
    let fx = Fixture::new();
    let mut spec = fx.spec(
        "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo oops >&2; exit 3",
    );
    spec.output_limit = 100;
    let (outcome, _) = fx.run(&spec);
    assert_eq!(outcome.status, RunStatus::Exited(3));
    let out = output(&outcome);
    assert!(
        out.len() <= 100 && out.ends_with("line 1999\noops\n"),
        "{out:?}"
    );
}

#[test]
fn missing_program_is_an_exec_error() {
    let fx = Fixture::new();
    let spec = RunSpec::new(
        vec![fx.base.clone()],
        &fx.upper,
        &fx.work,
        vec!["nope".into()],
    );
    match Sandbox::new().run(&spec) {
        Err(SandboxError::Exec { program, source }) => {
            assert_eq!(program, "nope");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn network_none_has_only_loopback() {
    let fx = Fixture::new();
    let mut spec = fx.spec("cat /proc/net/dev");
    spec.network = Network::None;
    let (outcome, _) = fx.run(&spec);
    assert!(outcome.success(), "{}", output(&outcome));
    let ifaces: Vec<String> = output(&outcome)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_owned()))
        .collect();
    assert_eq!(ifaces, ["lo"]);
}

#[test]
fn host_network_sees_host_resolver_files_read_only() {
    let fx = Fixture::new();
    let spec = fx.spec("cat /etc/hosts; echo x >> /etc/hosts || echo refused; hostname 2>/dev/null; cat /proc/1/cmdline; echo");
    let (outcome, entries) = fx.run(&spec);
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    let out = output(&outcome);
    assert!(out.starts_with(&hosts) && out.contains("refused"), "{out}");
    // pid 1 is the sandbox's own init (a fork of the caller), not the host's.
    assert!(
        !out.contains("systemd") && !out.contains("/sbin/init"),
        "{out}"
    );
    assert!(entries.is_empty(), "{:?}", entries.keys());
}

#[test]
fn timeout_kills_the_process_tree() {
    let fx = Fixture::new();
    let marker = tempfile::tempdir().unwrap();
    let mut spec = fx.spec("(sleep 3; echo escaped > /m/late) & sleep 100; echo never");
    spec.timeout = Some(Duration::from_millis(500));
    spec.mounts.push(Mount::Bind {
        source: marker.path().to_owned(),
        target: "/m".into(),
        readonly: false,
    });
    let started = Instant::now();
    let (outcome, _) = fx.run(&spec);
    assert_eq!(outcome.status, RunStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!output(&outcome).contains("never"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !marker.path().join("late").exists(),
        "a background process survived"
    );
}

#[test]
fn cancel_kills_the_process_tree() {
    let fx = Fixture::new();
    let marker = tempfile::tempdir().unwrap();
    let mut spec =
        fx.spec("(sleep 3; echo escaped > /m/late) & echo started; sleep 300; echo never");
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    spec.cancel = Some(flag.clone());
    spec.mounts.push(Mount::Bind {
        source: marker.path().to_owned(),
        target: "/m".into(),
        readonly: false,
    });
    let started = Instant::now();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (outcome, _) = fx.run(&spec);
    let took = started.elapsed();
    setter.join().unwrap();
    eprintln!("cancelled run ended {took:?} after it started");
    assert_eq!(outcome.status, RunStatus::Cancelled, "{}", output(&outcome));
    assert!(
        took >= Duration::from_secs(1),
        "ended before the cancel: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(output(&outcome).contains("started"), "{}", output(&outcome));
    assert!(!output(&outcome).contains("never"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !marker.path().join("late").exists(),
        "a background process survived"
    );
}

#[test]
fn a_cancel_set_before_the_run_starts_nothing() {
    let fx = Fixture::new();
    let mut spec = fx.spec("echo ran > /ran");
    spec.cancel = Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
        true,
    )));
    let (outcome, entries) = fx.run(&spec);
    assert_eq!(outcome.status, RunStatus::Cancelled);
    assert!(entries.is_empty(), "{:?}", entries.keys());
}

#[test]
fn env_and_cwd_are_applied() {
    let fx = Fixture::new();
    let mut spec = fx.spec("echo $FOO; pwd; echo $HOME");
    spec.env.push(("FOO".into(), "bar baz".into()));
    spec.cwd = "/app/src".into();
    let (outcome, entries) = fx.run(&spec);
    assert!(outcome.success(), "{}", output(&outcome));
    assert_eq!(output(&outcome), "bar baz\n/app/src\n\n");
    assert!(entries["app/src"].is_dir());
}

#[test]
fn bind_mounts_read_only_and_read_write() {
    let fx = Fixture::new();
    let ro = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let secret = ro.path().join("secret");
    std::fs::write(ro.path().join("f"), "ro data\n").unwrap();
    std::fs::write(&secret, "s3cret\n").unwrap();
    let mut spec = fx.spec(
        "cat /mnt/ro/f; cat /run/secrets/token; echo cached > /root/.cache/pkgs/x; \
         touch /mnt/ro/new && echo WROTE; echo changed > /run/secrets/token || echo refused",
    );
    spec.mounts = vec![
        Mount::Bind {
            source: ro.path().to_owned(),
            target: "/mnt/ro".into(),
            readonly: true,
        },
        Mount::Bind {
            source: cache.path().to_owned(),
            target: "/root/.cache/pkgs".into(),
            readonly: false,
        },
        Mount::Bind {
            source: secret.clone(),
            target: "/run/secrets/token".into(),
            readonly: true,
        },
    ];
    let (outcome, entries) = fx.run(&spec);
    let out = output(&outcome);
    assert!(out.contains("ro data\ns3cret\n"), "{out}");
    assert!(
        out.contains("Read-only file system") && out.contains("refused"),
        "{out}"
    );
    assert!(!out.contains("WROTE"));
    assert!(!ro.path().join("new").exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "s3cret\n");
    assert_eq!(
        std::fs::read_to_string(cache.path().join("x")).unwrap(),
        "cached\n"
    );
    assert!(
        entries.is_empty(),
        "mounts leaked into the upper: {:?}",
        entries.keys()
    );
}

#[test]
fn tmpfs_leaves_nothing_in_the_upper() {
    let fx = Fixture::new();
    let mut spec = fx.spec("echo x > /scratch/f && mkdir /scratch/d && cat /scratch/f");
    spec.mounts.push(Mount::Tmpfs {
        target: "/scratch".into(),
        size: Some(1 << 20),
    });
    let (outcome, entries) = fx.run(&spec);
    assert!(outcome.success(), "{}", output(&outcome));
    assert!(entries.is_empty(), "{:?}", entries.keys());
}

fn deleted_dir(kind: Option<RootfsKind>) {
    let fx = Fixture::new();
    let mut spec = fx.spec("rm -r /var/lib/doomed");
    spec.rootfs = kind;
    let (outcome, entries) = fx.run(&spec);
    assert!(outcome.success(), "{}", output(&outcome));
    assert!(
        entries.contains_key("var/lib/.wh.doomed"),
        "{:?}",
        entries.keys()
    );

    let fx = Fixture::new();
    let mut spec =
        fx.spec("rm -r /var/lib/doomed && mkdir /var/lib/doomed && touch /var/lib/doomed/new");
    spec.rootfs = kind;
    let (outcome, entries) = fx.run(&spec);
    assert!(outcome.success(), "{}", output(&outcome));
    let keys: Vec<_> = entries
        .keys()
        .filter(|k| k.starts_with("var/lib/doomed"))
        .collect();
    let opaque = [
        "var/lib/doomed",
        "var/lib/doomed/.wh..wh..opq",
        "var/lib/doomed/new",
    ];
    // The copy snapshot sees a recreated directory that got its old inode number back as
    // modified, and whites out the old children one by one: the same file system.
    let per_child = [
        "var/lib/doomed",
        "var/lib/doomed/.wh.a",
        "var/lib/doomed/.wh.sub",
        "var/lib/doomed/new",
    ];
    if outcome.rootfs == RootfsKind::Copy {
        assert!(keys == opaque || keys == per_child, "{keys:?}");
    } else {
        assert_eq!(keys, opaque);
    }
}

#[test]
fn deleted_lower_directory_becomes_whiteout_or_opaque() {
    deleted_dir(None);
}

#[test]
fn deleted_lower_directory_with_copy_snapshot() {
    deleted_dir(Some(RootfsKind::Copy));
}

#[test]
fn two_lowers_stack_in_order() {
    let fx = Fixture::new();
    let top = fx._tmp.path().join("top");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::write(
        top.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\ndotnet:x:1000:3000::/:/bin/false\n",
    )
    .unwrap();
    let mut spec = fx.spec("cat /etc/passwd; echo 'dotnet:x:3000:' >> /etc/group");
    spec.lower.push(top);
    let (outcome, entries) = fx.run(&spec);
    assert!(outcome.success(), "{}", output(&outcome));
    assert!(output(&outcome).contains("dotnet:x:1000"));
    assert_eq!(
        content(&entries["etc/group"]),
        b"root:x:0:\ndotnet:x:3000:\n"
    );
}

mod hostile {
    use super::super::unpack::unpack_with;
    use super::*;

    /// One tar entry built by hand, so nothing sanitises it.
    fn entry(
        tar: &mut Vec<u8>,
        path: &[u8],
        kind: tar::EntryType,
        link: Option<&[u8]>,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_old();
        {
            let raw = h.as_old_mut();
            raw.name[..path.len()].copy_from_slice(path);
            if let Some(l) = link {
                raw.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }

    fn finish(mut tar: Vec<u8>) -> Vec<u8> {
        tar.extend_from_slice(&[0; 1024]);
        tar
    }

    fn refused(build: impl Fn(&mut Vec<u8>), devices: bool) -> String {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("root");
        std::fs::create_dir(&dest).unwrap();
        let mut tar = Vec::new();
        build(&mut tar);
        match unpack_with(&finish(tar)[..], &dest, devices) {
            Err(e @ SandboxError::UnsafeEntry { .. }) => {
                assert!(!dir.path().join("evil").exists());
                e.to_string()
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    use tar::EntryType::{Block, Char, Directory, Link, Regular, Symlink};

    #[test]
    fn parent_dir_components() {
        let e = refused(|t| entry(t, b"a/../../evil", Regular, None, b"x"), true);
        assert!(e.contains("`..`"), "{e}");
    }

    #[test]
    fn absolute_paths() {
        refused(|t| entry(t, b"/tmp/evil", Regular, None, b"x"), true);
    }

    #[test]
    fn escaping_symlinks() {
        let e = refused(
            |t| entry(t, b"a/link", Symlink, Some(b"../../evil"), b""),
            true,
        );
        assert!(e.contains("escapes"), "{e}");
    }

    #[test]
    fn writing_through_a_symlink() {
        // An absolute symlink is fine inside the container but must not be followed on the host.
        refused(
            |t| {
                entry(t, b"up", Symlink, Some(b"/"), b"");
                entry(t, b"up/evil", Regular, None, b"x");
            },
            true,
        );
    }

    #[test]
    fn hardlink_escapes() {
        refused(|t| entry(t, b"link", Link, Some(b"../evil"), b""), true);
        refused(|t| entry(t, b"link", Link, Some(b"/etc/passwd"), b""), true);
        refused(
            |t| {
                entry(t, b"up", Symlink, Some(b"/etc"), b"");
                entry(t, b"link", Link, Some(b"up/passwd"), b"");
            },
            true,
        );
    }

    #[test]
    fn devices_when_rootless() {
        let e = refused(|t| entry(t, b"dev/sda", Block, None, b""), false);
        assert!(e.contains("device"), "{e}");
        refused(|t| entry(t, b"null", Char, None, b""), false);
    }

    #[test]
    fn whiteouts_and_opaque_dirs_apply_to_earlier_layers() {
        let dir = tempfile::tempdir().unwrap();
        let mut l1 = Vec::new();
        entry(&mut l1, b"d/", Directory, None, b"");
        entry(&mut l1, b"d/old", Regular, None, b"1");
        entry(&mut l1, b"e/", Directory, None, b"");
        entry(&mut l1, b"e/gone", Regular, None, b"2");
        entry(&mut l1, b"e/kept", Regular, None, b"3");
        entry(&mut l1, b"e/hard", Link, Some(b"e/kept"), b"");
        entry(&mut l1, b"e/sym", Symlink, Some(b"/e/kept"), b"");
        unpack_with(&finish(l1)[..], dir.path(), false).unwrap();
        let mut l2 = Vec::new();
        entry(&mut l2, b"d/", Directory, None, b"");
        entry(&mut l2, b"d/new", Regular, None, b"4");
        entry(&mut l2, b"d/.wh..wh..opq", Regular, None, b"");
        entry(&mut l2, b"e/.wh.gone", Regular, None, b"");
        unpack_with(&finish(l2)[..], dir.path(), false).unwrap();
        let p = dir.path();
        assert!(!p.join("d/old").exists() && p.join("d/new").exists());
        assert!(!p.join("e/gone").exists());
        assert_eq!(std::fs::read_to_string(p.join("e/hard")).unwrap(), "3");
        assert_eq!(
            std::fs::read_link(p.join("e/sym")).unwrap(),
            Path::new("/e/kept")
        );
    }
}

/// The unprivileged half of [`unprivileged_user_can_run`], run by re-executing the test binary
/// as `nobody`; a no-op when run directly.
#[test]
#[ignore = "run by unprivileged_user_can_run"]
fn unprivileged_child() {
    let Some(dir) = std::env::var_os("STRATA_SANDBOX_UNPRIV_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let report = dir.join("report");
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let fx = Fixture::in_dir(tmp);
    let spec = fx.spec(BASIC);
    match Sandbox::new().run(&spec) {
        Err(SandboxError::UserNamespacesDisabled { why }) => {
            std::fs::write(report, format!("disabled: {why}")).unwrap();
        }
        Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
        Ok(outcome) => {
            assert!(outcome.success(), "{}", output(&outcome));
            assert_eq!(output(&outcome), "hi\n0\n");
            let entries = upper_to_entries(&fx.upper, &outcome.ids).unwrap();
            let f = entries
                .iter()
                .find(|e| e.path == Path::new("tmp/x/f"))
                .expect("tmp/x/f in the upper");
            assert_eq!((f.uid, f.gid), (0, 0));
            assert!(
                entries
                    .iter()
                    .any(|e| e.path == Path::new("etc/.wh.removed-file"))
            );
            std::fs::write(report, format!("ok {:?}", outcome.rootfs)).unwrap();
        }
    }
}

#[test]
fn unprivileged_user_can_run() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: every other test here exercises that path.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "sandbox::tests::unprivileged_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("STRATA_SANDBOX_UNPRIV_DIR", dir.path())
        .output()
        .expect("setpriv (util-linux) runs");
    let report = std::fs::read_to_string(dir.path().join("report")).unwrap_or_default();
    assert!(
        out.status.success() && !report.is_empty(),
        "unprivileged run failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(why) = report.strip_prefix("disabled: ") {
        eprintln!(
            "\n!!!!!!!! SKIPPED unprivileged sandbox test: the kernel forbids unprivileged user namespaces ({why}) !!!!!!!!\n"
        );
        return;
    }
    assert!(report.starts_with("ok"), "{report}");
    eprintln!("unprivileged run: {report}");
}

#[test]
fn subordinate_ranges_and_id_conversion() {
    let text = "alice:100000:65536\n1001:200000:65536\nbob:300000:0\n";
    assert_eq!(
        idmap::parse_subordinate(text, 1000, Some("alice")),
        Some((100000, 65536))
    );
    assert_eq!(
        idmap::parse_subordinate(text, 1001, None),
        Some((200000, 65536))
    );
    assert_eq!(idmap::parse_subordinate(text, 1002, Some("bob")), None);
    let map = IdMap {
        uids: vec![
            IdRange {
                inside: 0,
                outside: 1000,
                count: 1,
            },
            IdRange {
                inside: 1,
                outside: 100000,
                count: 65536,
            },
        ],
        gids: vec![IdRange {
            inside: 0,
            outside: 1000,
            count: 1,
        }],
    };
    assert_eq!(map.uid_to_container(1000), Some(0));
    assert_eq!(map.uid_to_container(100999), Some(1000));
    assert_eq!(map.uid_to_host(1000), Some(100999));
    assert_eq!(map.gid_to_container(0), None);
    let e = map.check_user(1000, 3000, &[]).unwrap_err().to_string();
    assert_eq!(
        e,
        "gid 3000 is not mapped in the user namespace (only 0); add a range for this user to /etc/subgid"
    );
}

fn secret_and_dev_mounts(kind: Option<RootfsKind>) {
    let fx = Fixture::new();
    let script_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        script_dir.path().join("EOF"),
        "#!/bin/sh\necho from script $0\n",
    )
    .unwrap();
    std::fs::set_permissions(
        script_dir.path().join("EOF"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut spec = fx.spec(
        "cat /run/secrets/tok; ls -ln /run/secrets/tok; \
         echo x > /run/secrets/tok || echo refused; /dev/pipes/EOF; ls -lnd /c",
    );
    spec.rootfs = kind;
    spec.mounts = vec![
        Mount::Secret {
            target: "/run/secrets/tok".into(),
            data: SecretBytes(b"hunter2\n".to_vec()),
            mode: 0o400,
            uid: 0,
            gid: 0,
        },
        Mount::Bind {
            source: script_dir.path().to_owned(),
            target: "/dev/pipes".into(),
            readonly: true,
        },
        Mount::Bind {
            source: cache.path().to_owned(),
            target: "/c".into(),
            readonly: false,
        },
    ];
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    spec.chown = vec![(cache.path().to_owned(), 0, 0)];
    let (outcome, entries) = fx.run(&spec);
    let out = output(&outcome);
    assert!(out.starts_with("hunter2\n-r--------"), "{out}");
    assert!(out.contains("refused"), "{out}");
    assert!(out.contains("from script /dev/pipes/EOF"), "{out}");
    assert!(out.contains("drwx------"), "{out}");
    assert!(
        entries.is_empty(),
        "mount points leaked into the upper: {:?}",
        entries.keys()
    );
    // The secret never touched the host's disk: only the sandbox's tmpfs held it.
    for e in walkdir::WalkDir::new(fx._tmp.path()).into_iter().flatten() {
        if e.file_type().is_file() {
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            assert!(
                !bytes.windows(7).any(|w| w == b"hunter2"),
                "secret found in {}",
                e.path().display()
            );
        }
    }
}

#[test]
fn secrets_and_dev_mounts_on_kernel_overlay() {
    secret_and_dev_mounts(None);
}

#[test]
fn secrets_and_dev_mounts_on_copy() {
    secret_and_dev_mounts(Some(RootfsKind::Copy));
}

/// A layer tar built with the `tar` crate: (path, Some(content)) files, (path, None) dirs.
fn layer_tar(items: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in items {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match content {
            Some(c) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(c.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, path, c.as_bytes()).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Layers unpacked on their own and stacked show what unpacking them in order shows, on every
/// root mechanism, and a step on top does not turn the lowers' opaque markers into its own.
#[test]
fn layer_directories_stack_like_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (l0, l1, l2) = (
        tmp.path().join("l0"),
        tmp.path().join("l1"),
        tmp.path().join("l2"),
    );
    for d in [&l0, &l1, &l2] {
        std::fs::create_dir(d).unwrap();
    }
    busybox_rootfs(&l0);
    std::fs::create_dir_all(l0.join("srv/keep")).unwrap();
    std::fs::write(l0.join("srv/keep/old"), "old").unwrap();
    std::fs::write(l0.join("srv/gone"), "gone").unwrap();
    // Layer 1: deletes /etc/removed-file (no parent entry), /srv/gone, makes /srv/keep opaque
    // with a new file, replaces /var/lib/doomed with a new directory.
    let t1 = layer_tar(&[
        ("etc/.wh.removed-file", Some("")),
        ("srv/", None),
        ("srv/.wh.gone", Some("")),
        ("srv/keep/", None),
        ("srv/keep/.wh..wh..opq", Some("")),
        ("srv/keep/new", Some("new")),
        ("var/lib/.wh.doomed", Some("")),
        ("var/lib/doomed/", None),
        ("var/lib/doomed/fresh", Some("fresh")),
    ]);
    std::fs::set_permissions(l0.join("var/lib"), std::fs::Permissions::from_mode(0o750)).unwrap();
    unpack_layer_dir(|| Ok(&t1[..]), &l1, std::slice::from_ref(&l0)).unwrap();
    // Parents the layer lacks are made like the lower ones.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&l1.join("var/lib")), 0o750);
    // Layer 2: a file only, without its parent directory's entry.
    let t2 = layer_tar(&[("srv/l2", Some("two"))]);
    unpack_layer_dir(|| Ok(&t2[..]), &l2, &[l1.clone(), l0.clone()]).unwrap();
    assert_eq!(mode(&l2.join("srv")), 0o755);
    let script = "ls /etc/removed-file 2>&1; ls /srv /srv/keep /var/lib/doomed; \
                  touch /srv/keep/touched";
    for kind in [None, Some(RootfsKind::FuseOverlay), Some(RootfsKind::Copy)] {
        if kind == Some(RootfsKind::FuseOverlay) {
            need_fuse_overlayfs();
        }
        let run_dir = tempfile::tempdir().unwrap();
        let (upper, work) = (run_dir.path().join("u"), run_dir.path().join("w"));
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&work).unwrap();
        let mut spec = RunSpec::new(
            vec![l0.clone(), l1.clone(), l2.clone()],
            &upper,
            &work,
            vec!["sh".into(), "-c".into(), script.into()],
        );
        spec.rootfs = kind;
        let outcome = Sandbox::new().run(&spec).unwrap();
        let out = output(&outcome);
        assert!(outcome.success(), "{kind:?}: {out}");
        assert!(out.contains("No such file"), "{kind:?}: {out}");
        assert!(
            out.contains("/srv:\nkeep\nl2\n\n/srv/keep:\nnew\n\n/var/lib/doomed:\nfresh\n"),
            "{kind:?}: {out}"
        );
        let entries: Vec<String> = upper_to_entries(&upper, &outcome.ids)
            .unwrap()
            .into_iter()
            .map(|e| e.path.to_string_lossy().into_owned())
            .collect();
        assert!(
            !entries.iter().any(|p| p.ends_with(".wh..wh..opq")),
            "{kind:?}: a lower's opaque marker reached the layer: {entries:?}"
        );
        assert!(
            entries.contains(&"srv/keep/touched".to_string()),
            "{entries:?}"
        );
    }
    // The same stack merged into one directory.
    let merged = tmp.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    merge_lowers(&[l0, l1, l2], &merged).unwrap();
    assert!(!merged.join("etc/removed-file").exists());
    assert!(!merged.join("srv/gone").exists() && !merged.join("srv/keep/old").exists());
    assert!(merged.join("srv/keep/new").exists() && merged.join("srv/l2").exists());
    assert!(merged.join("var/lib/doomed/fresh").exists());
    assert!(!merged.join("var/lib/doomed/a").exists());
}

/// A stack of lowers whose absolute paths do not fit in one page of mount options still
/// mounts (relative to their common directory) on every mechanism.
#[test]
fn deep_stacks_of_long_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s".repeat(120));
    let mut lowers = Vec::new();
    for i in 0..45 {
        let dir = store.join(format!("{:064x}", i)).join("fs");
        std::fs::create_dir_all(dir.join("layers")).unwrap();
        std::fs::write(dir.join("layers").join(i.to_string()), "x").unwrap();
        if i == 0 {
            busybox_rootfs(&dir);
        }
        lowers.push(dir);
    }
    let total: usize = lowers.iter().map(|l| l.as_os_str().len()).sum();
    assert!(total > 4096, "{total}");
    for kind in [None, Some(RootfsKind::FuseOverlay), Some(RootfsKind::Copy)] {
        if kind == Some(RootfsKind::FuseOverlay) {
            need_fuse_overlayfs();
        }
        let run_dir = tempfile::tempdir().unwrap();
        let (upper, work) = (run_dir.path().join("u"), run_dir.path().join("w"));
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&work).unwrap();
        let mut spec = RunSpec::new(
            lowers.clone(),
            &upper,
            &work,
            vec!["sh".into(), "-c".into(), "ls /layers | wc -l".into()],
        );
        spec.rootfs = kind;
        let outcome = Sandbox::new().run(&spec).unwrap();
        let out = output(&outcome);
        assert!(outcome.success(), "{kind:?}: {out}");
        assert_eq!(out.trim(), "45", "{kind:?}");
        if kind.is_none() {
            assert_eq!(outcome.rootfs, RootfsKind::KernelOverlay);
        }
    }
}

/// fuse-overlayfs is a backend under test, not an optional extra: `.ci/run` installs it, and
/// its absence fails the test rather than skipping it.
fn need_fuse_overlayfs() {
    assert!(
        find_program("fuse-overlayfs").is_some(),
        "fuse-overlayfs is not installed (Debian package fuse-overlayfs; .ci/run installs it)"
    );
}

#[test]
fn secrets_and_dev_mounts_on_fuse_overlay() {
    need_fuse_overlayfs();
    secret_and_dev_mounts(Some(RootfsKind::FuseOverlay));
}
