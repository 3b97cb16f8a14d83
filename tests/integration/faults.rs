//! Registries misbehaving on purpose: a [`FaultProxy`] in front of a real registry answers
//! 503 and 429, drops connections and cuts bodies short at seeded random points, or flips a
//! byte of every blob. Transfers must come through transient faults with correct content,
//! refuse corrupt content without storing any of it, and give up on a dead registry in
//! bounded time instead of hammering it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;
use sha2::{Digest as _, Sha256};

use crate::push_pull::{
    build, context, fails, layer_digests, noise, ok, output, printed_digest, remote_digest,
    remote_manifest, remote_tree,
};
use crate::registry::{Fault, FaultCounts, FaultProxy, Faults, Registry, is_blob_get, is_manifest};

/// Not the final `PUT` of an upload: a lost answer to that one is
/// [`a_lost_answer_to_the_final_put_is_not_fatal`]'s business.
fn not_the_final_put(method: &str, path: &str) -> bool {
    !(method == "PUT" && path.contains("/blobs/uploads/"))
}

/// Not a manifest: a manifest body cut short is
/// [`a_manifest_body_cut_short_is_fetched_again`]'s business.
fn not_a_manifest(method: &str, path: &str) -> bool {
    !is_manifest(method, path)
}

fn is_patch(method: &str, _path: &str) -> bool {
    method == "PATCH"
}

fn is_put_upload(method: &str, path: &str) -> bool {
    method == "PUT" && path.contains("/blobs/uploads/")
}

/// One fault of each transient kind on the first requests, so each surely happens, then
/// seeded random ones (3% each) on requests `only` lets through.
fn flaky(seed: u64, only: fn(&str, &str) -> bool) -> Faults {
    Faults {
        seed,
        unavailable: 0.03,
        too_many_requests: 0.03,
        reset: 0.03,
        truncate: 0.03,
        script: vec![
            Fault::Status(503),
            Fault::Status(429),
            Fault::Reset,
            Fault::Truncate,
        ],
        only: Some(only),
        ..Faults::none()
    }
}

/// Every kind of transient fault happened at least once.
fn assert_all_kinds(counts: &FaultCounts) {
    assert!(
        counts.unavailable > 0
            && counts.too_many_requests > 0
            && counts.resets > 0
            && counts.truncations > 0,
        "not every kind of fault was injected: {counts:?}"
    );
}

/// An image with a multi-chunk layer (3 MiB of noise) and a small one, built into `env` as
/// `noisy:1`; returns its digest.
fn noisy_image(env: &Env) -> String {
    let ctx = context(
        env,
        "noisy",
        "FROM scratch\nCOPY big.bin /data/big.bin\nCOPY small.txt /data/small.txt\n",
        &[
            ("big.bin", &noise(0xfa17, 3 << 20)),
            ("small.txt", b"small\n"),
        ],
    );
    build(env, &ctx, &["-t", "noisy:1"]).0
}

#[test]
fn push_comes_through_transient_faults() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let proxy = FaultProxy::new(&reg, flaky(7, not_the_final_put));
    let digest = noisy_image(&env);
    let (out, _) = ok(
        &env,
        &[
            "push",
            "--max-chunk-size",
            "1MiB",
            "noisy:1",
            &proxy.image("noisy:1"),
        ],
    );
    assert_eq!(printed_digest(&out), digest);
    let counts = proxy.counts();
    eprintln!("push through faults: {counts:?}");
    assert_all_kinds(&counts);
    assert!(
        proxy.requests().iter().any(|r| r.method == "PATCH"),
        "no chunked upload"
    );

    // Straight from the registry, not through the proxy.
    let image = reg.image("noisy:1");
    assert_eq!(remote_digest(&env, &image, &[]), digest);
    assert_tree(
        &remote_tree(&env, &image, "noisy", &[]),
        &env.unpack("noisy:1", "local"),
    );
    env.fsck();
}

#[test]
fn pull_comes_through_transient_faults() {
    let reg = Registry::anonymous();
    let pusher = Env::new();
    let digest = noisy_image(&pusher);
    ok(&pusher, &["push", "noisy:1", &reg.image("noisy:1")]);
    let expected = pusher.unpack("noisy:1", "pushed");

    let proxy = FaultProxy::new(&reg, flaky(3, not_a_manifest));
    let env = Env::new();
    let image = proxy.image("noisy:1");
    let (out, _) = ok(&env, &["pull", &image]);
    assert_eq!(printed_digest(&out), digest);
    let counts = proxy.counts();
    eprintln!("pull through faults: {counts:?}");
    assert_all_kinds(&counts);
    env.fsck();
    assert_eq!(env.names(), vec![image.clone()]);
    assert_tree(&env.unpack(&image, "pulled"), &expected);
}

#[test]
fn a_manifest_body_cut_short_is_fetched_again() {
    let reg = Registry::anonymous();
    let pusher = Env::new();
    let digest = noisy_image(&pusher);
    ok(&pusher, &["push", "noisy:1", &reg.image("noisy:1")]);

    let proxy = FaultProxy::new(
        &reg,
        Faults {
            script: vec![Fault::Truncate, Fault::Reset],
            cut_after: Some(20),
            only: Some(is_manifest),
            ..Faults::none()
        },
    );
    let env = Env::new();
    let (out, _) = ok(&env, &["pull", &proxy.image("noisy:1")]);
    assert_eq!(printed_digest(&out), digest);
    let counts = proxy.counts();
    assert_eq!((counts.truncations, counts.resets), (1, 1), "{counts:?}");
    env.fsck();
}

/// A one-layer image (3 MiB of noise), built into `env` as `big:1`; returns its digest.
fn one_layer_image(env: &Env) -> String {
    let ctx = context(
        env,
        "big",
        "FROM scratch\nCOPY big.bin /big.bin\n",
        &[("big.bin", &noise(0xb16, 3 << 20))],
    );
    build(env, &ctx, &["-t", "big:1"]).0
}

/// `image`'s config, uploaded to `repo` behind strata's back, so that the only upload left
/// for a push of a one-layer image is its layer's.
fn preload_config(env: &Env, reg: &Registry, image: &str, repo: &str) {
    let out = output(env.cmd().args(["inspect", "--raw", "--config", image]));
    assert!(out.status.success(), "inspect --raw --config failed");
    let config = out.stdout;
    let hex: String = Sha256::digest(&config)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let start = reg
        .http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")
        .expect("start an upload");
    assert_eq!(start.status, 202);
    let location = start.header("location").expect("Location");
    // distribution answers with an absolute URL; the harness client wants the path.
    let path = location
        .strip_prefix(&reg.url())
        .unwrap_or(location)
        .to_string();
    let sep = if path.contains('?') { '&' } else { '?' };
    let put = format!("{path}{sep}digest=sha256:{hex}");
    let resp = reg
        .http(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream")],
            &config,
        )
        .expect("upload the config");
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
}

#[test]
fn a_lost_answer_to_the_final_put_is_not_fatal() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let digest = one_layer_image(&env);
    preload_config(&env, &reg, "big:1", "big");
    // The registry completes the upload; its answer never reaches strata.
    let proxy = FaultProxy::new(
        &reg,
        Faults {
            script: vec![Fault::Reset],
            only: Some(is_put_upload),
            ..Faults::none()
        },
    );
    let (out, _) = ok(
        &env,
        &[
            "push",
            "--max-chunk-size",
            "1MiB",
            "big:1",
            &proxy.image("big:1"),
        ],
    );
    assert_eq!(printed_digest(&out), digest);
    let reqs = proxy.requests();
    assert!(reqs.iter().any(|r| r.method == "PATCH"), "{reqs:#?}");
    assert_eq!(proxy.counts().resets, 1);
    assert_eq!(remote_digest(&env, &reg.image("big:1"), &[]), digest);
}

#[test]
fn a_long_chunked_upload_survives_occasional_failures() {
    let env = Env::new();
    let reg = Registry::anonymous();
    let digest = noisy_image(&env);
    // 24 chunks of 128 KiB; every fourth PATCH is refused once, six times in all.
    let mut script = Vec::new();
    for _ in 0..6 {
        script.extend([Fault::Pass, Fault::Pass, Fault::Pass, Fault::Status(503)]);
    }
    let proxy = FaultProxy::new(
        &reg,
        Faults {
            script,
            only: Some(is_patch),
            ..Faults::none()
        },
    );
    let (out, _) = ok(
        &env,
        &[
            "push",
            "--max-chunk-size",
            "128KiB",
            "noisy:1",
            &proxy.image("noisy:1"),
        ],
    );
    assert_eq!(printed_digest(&out), digest);
    assert_eq!(proxy.counts().unavailable, 6);
    assert_eq!(remote_digest(&env, &reg.image("noisy:1"), &[]), digest);
}

#[test]
fn a_corrupted_blob_fails_the_pull_and_nothing_is_stored() {
    let reg = Registry::anonymous();
    let pusher = Env::new();
    let digest = noisy_image(&pusher);
    let source = reg.image("noisy:1");
    ok(&pusher, &["push", "noisy:1", &source]);
    let manifest = remote_manifest(&pusher, &source, &[]);
    let mut blobs: BTreeSet<String> = layer_digests(&manifest).into_iter().collect();
    blobs.insert(
        manifest["config"]["digest"]
            .as_str()
            .expect("config")
            .into(),
    );

    let proxy = FaultProxy::new(
        &reg,
        Faults {
            corrupt_blobs: 1.0,
            only: Some(is_blob_get),
            ..Faults::none()
        },
    );
    let env = Env::new();
    let err = fails(&env, &["pull", &proxy.image("noisy:1")], 1);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(proxy.counts().corruptions > 0, "{:?}", proxy.counts());

    let fsck = env.ok(&["fsck"]);
    assert!(
        fsck.contains(" 0 problems (0 leftover temp files)"),
        "{fsck}"
    );
    assert!(env.names().is_empty(), "{:?}", env.names());
    let store = env.home().join("blobs/sha256");
    for blob in &blobs {
        let hex = blob.strip_prefix("sha256:").expect("sha256");
        assert!(!store.join(hex).exists(), "{blob} stored after a mismatch");
    }
    assert!(!store.join(&digest["sha256:".len()..]).exists());
}

#[test]
fn a_dead_registry_fails_push_and_pull_in_bounded_time() {
    let reg = Registry::anonymous();
    let env = Env::new();
    noisy_image(&env);
    ok(&env, &["push", "noisy:1", &reg.image("noisy:1")]);
    let proxy = FaultProxy::new(
        &reg,
        Faults {
            unavailable: 1.0,
            ..Faults::none()
        },
    );

    let start = Instant::now();
    let err = fails(&env, &["push", "noisy:1", &proxy.image("other:1")], 1);
    let took = start.elapsed();
    assert!(err.contains("503"), "{err}");
    let pushed = proxy.counts().requests;
    eprintln!("dead registry: push gave up after {took:?} and {pushed} requests");
    assert!(took < Duration::from_secs(180), "push retried for {took:?}");
    assert!(pushed < 200, "{pushed} requests to a dead registry");

    let fresh = Env::new();
    let start = Instant::now();
    let err = fails(&fresh, &["pull", &proxy.image("noisy:1")], 1);
    let took = start.elapsed();
    assert!(err.contains("503"), "{err}");
    let pulled = proxy.counts().requests - pushed;
    eprintln!("dead registry: pull gave up after {took:?} and {pulled} requests");
    assert!(took < Duration::from_secs(180), "pull retried for {took:?}");
    assert!(pulled < 200, "{pulled} requests to a dead registry");
    fresh.fsck();
    assert!(fresh.names().is_empty());
}
