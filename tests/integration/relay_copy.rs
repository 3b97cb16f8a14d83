//! Cross-registry relays and `strata copy` across skopeo's transports.

use crate::common::*;
use crate::push_pull::{layer_digests, remote_digest, remote_manifest, remote_tree};
use crate::registry::Registry;

#[test]
fn a_base_in_another_registry_is_relayed_not_stored() {
    let one = Registry::anonymous();
    let two = Registry::anonymous();
    let env = Env::new();
    // The base lives in registry one, built in another store.
    let seed = Env::new();
    let base = seed.path("base");
    write(&base, "Dockerfile", b"FROM scratch\nCOPY big /big\n");
    let big: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    write(&base, "big", &big);
    seed.build(&base, &["--push", "-t", &one.image("base:1")]);
    let base_layers = layer_digests(&remote_manifest(&seed, &one.image("base:1"), &[]));

    let ctx = env.path("ctx");
    write(
        &ctx,
        "Dockerfile",
        format!("FROM {}\nCOPY app.txt /app.txt\n", one.image("base:1")).as_bytes(),
    );
    write(&ctx, "app.txt", b"app");
    let out = env
        .cmd()
        .args([
            "build",
            "--progress",
            "plain",
            "--push",
            "-t",
            &two.image("app:1"),
        ])
        .arg(&ctx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("1 relayed"), "{stderr}");
    // Relayed through a temp file, never into the store.
    for d in &base_layers {
        let hex = d.trim_start_matches("sha256:");
        assert!(
            !env.home().join("blobs/sha256").join(hex).exists(),
            "base layer {d} was stored locally"
        );
    }
    assert!(
        std::fs::read_dir(env.home().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "temp files left behind"
    );
    // The resolved base is recorded, so the build can be repeated exactly.
    let ann = env.ok(&[
        "inspect",
        &two.image("app:1"),
        "--format",
        ".Manifest.annotations",
    ]);
    let ann: serde_json::Value = serde_json::from_str(&ann).unwrap();
    assert_eq!(
        ann["org.opencontainers.image.base.name"],
        one.image("base:1").as_str()
    );
    let base_digest = remote_digest(&seed, &one.image("base:1"), &[]);
    assert_eq!(
        ann["org.opencontainers.image.base.digest"],
        base_digest.as_str()
    );
    let tree = remote_tree(&env, &two.image("app:1"), "relayed", &[]);
    assert_eq!(tree["big"].0, Obj::File(big));
    assert_eq!(tree["app.txt"].0, Obj::File(b"app".to_vec()));
    env.fsck();
}

#[test]
fn copy_moves_images_between_transports_keeping_digests() {
    let reg = Registry::anonymous();
    let env = Env::new();
    let digest = env.build(&fixture("sample"), &["-t", "sample"]);
    let layout = env.path("layout");
    // store → registry → OCI layout → docker-archive → registry, all by `strata copy`.
    env.ok(&[
        "copy",
        "strata:sample",
        &format!("docker://{}", reg.image("copy:1")),
    ]);
    assert_eq!(remote_digest(&env, &reg.image("copy:1"), &[]), digest);
    env.ok(&[
        "copy",
        &format!("docker://{}", reg.image("copy:1")),
        &format!("oci:{}:c", layout.display()),
    ]);
    validate_layout(&layout);
    assert_eq!(
        skopeo_inspect(&format!("oci:{}:c", layout.display()))["Digest"],
        digest.as_str()
    );
    let archive = env.path("d.tar");
    env.ok(&[
        "copy",
        &format!("oci:{}:c", layout.display()),
        &format!("docker-archive:{}:sample:1", archive.display()),
    ]);
    env.ok(&[
        "copy",
        &format!("docker-archive:{}", archive.display()),
        &format!("docker://{}", reg.image("fromarchive:1")),
    ]);
    // docker-archive has no manifest: a new one, same files.
    assert_eq!(
        remote_tree(&env, &reg.image("fromarchive:1"), "a", &[]),
        remote_tree(&env, &reg.image("copy:1"), "b", &[])
    );
    // Registry to registry within one registry: every blob mounted or already there.
    let out = env
        .cmd()
        .args(["copy", "--progress", "plain"])
        .arg(format!("docker://{}", reg.image("copy:1")))
        .arg(format!("docker://{}", reg.image("other/copy:2")))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(" 0 uploaded"), "{stderr}");
    assert_eq!(remote_digest(&env, &reg.image("other/copy:2"), &[]), digest);
    let bad = env.fail(&["copy", "strata:sample", "ftp://x"], 2);
    assert!(bad.contains("unknown transport"), "{bad}");
}
