//! The client against the real CNCF distribution registry (Debian package
//! `docker-registry`), started on a free loopback port with a temp dir.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::digest::Digest;
use crate::media::{Descriptor, MediaType};
use crate::registry::{Anonymous, Client, ClientOptions, Reference, RegistryError, TransferEvent};

const BINARY: &str = "/usr/bin/docker-registry";
const MIB: usize = 1024 * 1024;

/// A running registry, killed on drop.
struct Registry {
    child: Child,
    host: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    async fn start() -> Registry {
        assert!(
            Path::new(BINARY).exists(),
            "{BINARY} is missing: apt-get install docker-registry"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n  secret: strata-test-secret\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reg = Registry {
            child,
            host,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("http://{}/v2/", reg.host)).send().await
                && r.status().is_success()
            {
                return reg;
            }
            assert!(Instant::now() < deadline, "docker-registry did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn reference(&self, rest: &str) -> Reference {
        format!("{}/{rest}", self.host).parse().unwrap()
    }
}

fn blob(n: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_mount_and_list_against_distribution() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let reg = Registry::start().await;
    let events: Arc<Mutex<Vec<TransferEvent>>> = Arc::default();
    let ev = events.clone();
    let opts = ClientOptions {
        chunk_size: MIB as u64,
        monolithic_threshold: MIB as u64,
        initial_backoff: Duration::from_millis(10),
        ..ClientOptions::default()
    };
    let client = Client::new(opts, Arc::new(Anonymous))
        .unwrap()
        .with_progress(Arc::new(move |e| ev.lock().unwrap().push(e)));
    let app = reg.reference("strata/app:v1");

    // Blobs: a small one (monolithic), a large one (chunked), a config.
    let small = blob(10_000, 1);
    let large = blob(3 * MIB + MIB / 2, 2);
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let small_d = Descriptor::for_bytes(MediaType::OciLayerGzip, &small);
    let large_d = Descriptor::for_bytes(MediaType::OciLayerGzip, &large);
    let config_d = Descriptor::for_bytes(MediaType::OciConfig, &config);
    for (d, b) in [(&small_d, &small), (&large_d, &large), (&config_d, &config)] {
        assert_eq!(client.blob_exists(&app, &d.digest).await.unwrap(), None);
        client
            .push_blob(&app, d, Arc::new(b.clone()))
            .await
            .unwrap();
        assert_eq!(
            client.blob_exists(&app, &d.digest).await.unwrap(),
            Some(d.size)
        );
    }
    // Pushing again is a HEAD and nothing else.
    client
        .push_blob(&app, &large_d, Arc::new(large.clone()))
        .await
        .unwrap();
    {
        let ev = events.lock().unwrap();
        assert!(ev.contains(&TransferEvent::Skipped {
            digest: large_d.digest,
            size: large_d.size
        }));
        assert!(ev.contains(&TransferEvent::Finished {
            digest: large_d.digest,
            size: large_d.size
        }));
    }

    // Manifest: put by tag, get it back, HEAD it, list tags.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::OciManifest.as_str(),
        "config": config_d,
        "layers": [small_d, large_d],
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest).unwrap());
    let digest = client
        .put_manifest(&app, manifest.clone(), &MediaType::OciManifest)
        .await
        .unwrap();
    assert_eq!(digest, Digest::of(&manifest));
    let got = client.get_manifest(&app).await.unwrap();
    assert_eq!(
        (got.bytes.clone(), got.media_type.clone(), got.digest),
        (manifest.clone(), MediaType::OciManifest, digest)
    );
    let by_digest = client.get_manifest(&app.with_digest(digest)).await.unwrap();
    assert_eq!(by_digest.bytes, manifest);
    let head = client.head_manifest(&app).await.unwrap().unwrap();
    assert_eq!(head, got.descriptor());
    client
        .put_manifest(
            &app.with_tag("v2"),
            manifest.clone(),
            &MediaType::OciManifest,
        )
        .await
        .unwrap();
    let mut tags = client.list_tags(&app).await.unwrap();
    tags.sort();
    assert_eq!(tags, vec!["v1", "v2"]);
    assert!(
        client
            .head_manifest(&app.with_tag("nope"))
            .await
            .unwrap()
            .is_none()
    );
    let e = client
        .get_manifest(&app.with_tag("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RegistryError::Registry { status: 404, code: Some(c), .. } if c == "MANIFEST_UNKNOWN"),
        "{e}"
    );

    // Fetch and verify both layers.
    for (d, b) in [(&small_d, &small), (&large_d, &large)] {
        let mut sink = Vec::new();
        client.fetch_blob(&app, d, &mut sink).await.unwrap();
        assert_eq!(&sink[..], &b[..]);
    }
    // A descriptor with the wrong digest is refused.
    let lie = Descriptor::new(MediaType::OciLayerGzip, Digest::of(b"other"), small_d.size);
    let mut sink = Vec::new();
    assert!(client.fetch_blob(&app, &lie, &mut sink).await.is_err());
    assert!(sink.is_empty());

    // Cross-repository mount, then the same manifest in the other repository.
    let other = reg.reference("strata/other:v1");
    for d in [&small_d, &large_d, &config_d] {
        assert!(
            client
                .mount_blob(&other, &d.digest, &app.repository)
                .await
                .unwrap()
        );
    }
    assert!(
        !client
            .mount_blob(&other, &Digest::of(b"absent"), &app.repository)
            .await
            .unwrap()
    );
    client
        .put_manifest(&other, manifest.clone(), &MediaType::OciManifest)
        .await
        .unwrap();
    assert_eq!(client.get_manifest(&other).await.unwrap().digest, digest);

    // Delete by digest.
    client
        .delete_manifest(&other.with_digest(digest))
        .await
        .unwrap();
    assert!(
        client
            .head_manifest(&other.with_digest(digest))
            .await
            .unwrap()
            .is_none()
    );
}
