//! Same inputs, same digest: whatever the directory, file modes from the umask, mtimes,
//! thread count, store or working directory.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::build::feature_context;
use crate::common::*;

fn set_mtimes(root: &Path, t: SystemTime) {
    for e in walkdir::WalkDir::new(root).contents_first(true) {
        let e = e.unwrap();
        if e.path_is_symlink() {
            continue;
        }
        let f = std::fs::File::open(e.path()).unwrap();
        f.set_modified(t).unwrap();
    }
}

#[test]
fn same_context_in_two_places_gives_the_same_digest() {
    let a = Env::new();
    let b = Env::new();
    let ctx_a = a.path("checkout-one");
    let ctx_b = b.path("elsewhere/checkout-two");
    feature_context(&ctx_a, false);
    // The second checkout: umask 002 (group-writable files) and other mtimes.
    feature_context(&ctx_b, true);
    set_mtimes(
        &ctx_a,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    set_mtimes(&ctx_b, SystemTime::now());

    let args = ["--build-arg", "GREETING=bonjour"];
    let da = a.build(&ctx_a, &args);
    // Built from another working directory, into another store.
    let out = b
        .cmd()
        .current_dir(b.path("elsewhere"))
        .args([
            "build",
            "-q",
            "--build-arg",
            "GREETING=bonjour",
            "checkout-two",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(da, db, "the same context built to different images");

    // A real change does change the digest.
    write(&ctx_b, "keep.log", b"changed");
    let dc = b.build(&ctx_b, &args);
    assert_ne!(da, dc);
}

#[test]
fn thread_count_does_not_change_the_bytes() {
    let env = Env::new();
    let ctx = env.path("ctx");
    feature_context(&ctx, false);
    // A layer big enough to span many compression blocks.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 % 17)
        .collect();
    write(&ctx, "bin/big.bin", &big);
    for compression in ["gzip", "zstd"] {
        let mut digests = Vec::new();
        for threads in ["1", "2", "5"] {
            digests.push(env.build(
                &ctx,
                &[
                    "--compression",
                    compression,
                    "--threads",
                    threads,
                    "--build-arg",
                    "GREETING=bonjour",
                ],
            ));
        }
        assert!(
            digests.windows(2).all(|w| w[0] == w[1]),
            "{compression}: digests differ by thread count: {digests:?}"
        );
    }
    env.fsck();
}

#[test]
fn source_date_epoch_sets_every_timestamp() {
    let env = Env::new();
    let d1 = env.build(
        &fixture("sample"),
        &["-t", "t:1", "--source-date-epoch", "1700000000"],
    );
    let d0 = env.build(&fixture("sample"), &["-t", "t:0"]);
    assert_ne!(d0, d1);
    let layout = env.path("t1");
    env.ok(&[
        "export",
        "t:1",
        "--output",
        &format!("oci:{}:t", layout.display()),
    ]);
    let config = skopeo_inspect_config(&format!("oci:{}:t", layout.display()));
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    for h in config["history"].as_array().unwrap() {
        assert_eq!(h["created"], "2023-11-14T22:13:20Z");
    }
    let tree_dir = env.path("t1-bundle");
    let mut c = std::process::Command::new(tool("umoci", "umoci"));
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    run_ok(
        c.arg("--image")
            .arg(format!("{}:t", layout.display()))
            .arg(&tree_dir),
    );
    let md = std::fs::metadata(tree_dir.join("rootfs/App/start.sh")).unwrap();
    assert_eq!(
        md.modified().unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
    // The environment variable works too, and the flag wins over it.
    let out = env
        .cmd()
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["build", "-q"])
        .arg(fixture("sample"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), d1);
}
