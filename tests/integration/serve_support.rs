//! Helpers for the `strata serve` tests: the binary as a child process on a free loopback
//! port, a tiny HTTP client (the registry harness's), an Altinn-shaped app repository made
//! from `fixtures/serve/app` and served by `git http-backend`, a throttling TCP proxy that
//! makes a push slow enough to cancel or kill, and a private PostgreSQL cluster.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::git_server::{GitServer, git};
use crate::registry::{HttpResponse, http};

pub const API_TOKEN: &str = "serve-test-token";

/// The Gitea token the test repositories demand.
pub const GIT_TOKEN: &str = "gitea-token-3f9a1c";

/// A publish request as Studio sends it.
pub fn publish(repo: &str, image: &str) -> Value {
    json!({
        "repository": repo, "ref": "main", "context": "", "dockerfile": "Dockerfile",
        "image": image, "push": true, "git_token": GIT_TOKEN,
        "build_args": {}, "labels": {"studio.altinn.app": "ttd/serve-app"},
    })
}

/// A running `strata serve`.
pub struct Serve {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Serve {
    /// Start `strata serve` with `env`'s store, an API token and `extra` flags; waits until it
    /// listens.
    pub fn start(env: &Env, extra: &[&str]) -> Serve {
        let n = std::fs::read_dir(env.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = env.path(&format!("serve-{n}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        let child = env
            .cmd()
            .env("STRATA_LOG", "strata=info")
            .args(["serve", "--listen", "127.0.0.1:0", "--token", API_TOKEN])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start strata serve");
        let mut s = Serve {
            child: Some(child),
            addr: "127.0.0.1:1".parse().expect("addr"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = s.log_text();
            // Only a whole line: the log may be read while the server is still writing it.
            if let Some((addr, _)) = text
                .split("listening on http://")
                .nth(1)
                .and_then(|rest| rest.split_once('\n'))
            {
                s.addr = addr
                    .split_whitespace()
                    .next()
                    .expect("address")
                    .parse()
                    .expect("socket address");
                return s;
            }
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("strata serve exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "strata serve did not start:\n{text}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A request without credentials.
    pub fn raw(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        http(self.addr, None, method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}\n{}", self.log_text()))
    }

    /// A request with the API token.
    pub fn req(&self, method: &str, target: &str, body: &[u8]) -> HttpResponse {
        self.req_with(method, target, &[], body)
    }

    pub fn req_with(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        let auth = format!("Bearer {API_TOKEN}");
        let mut h = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        h.extend_from_slice(headers);
        self.raw(method, target, &h, body)
    }

    /// POST a build; returns its id (asserting 202).
    pub fn submit(&self, req: &Value) -> String {
        let r = self.req("POST", "/api/v1/builds", req.to_string().as_bytes());
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().expect("id").to_string()
    }

    pub fn build(&self, id: &str) -> Value {
        let r = self.req("GET", &format!("/api/v1/builds/{id}"), b"");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// Poll until the build's state satisfies `done`.
    pub fn wait_for(&self, id: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let b = self.build(id);
            if done(&b) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "build {id} stuck: {b:#}\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the build has ended.
    pub fn wait_final(&self, id: &str, secs: u64) -> Value {
        self.wait_for(id, secs, |b| {
            matches!(
                b["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
    }

    /// The build's Server-Sent Events from the start, read until the stream ends (the build
    /// ended): (id, event, data).
    pub fn events(&self, id: &str) -> Vec<(i64, String, Value)> {
        let r = self.req("GET", &format!("/api/v1/builds/{id}/events"), b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        parse_sse(&String::from_utf8_lossy(&r.body))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- strata serve log ---\n{}", self.log_text());
        }
        self.kill9();
    }
}

/// Parse an SSE body into (id, event, data as JSON); comments (keep-alives) skipped.
pub fn parse_sse(text: &str) -> Vec<(i64, String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut id, mut event, mut data) = (0, String::from("message"), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((
                id,
                event,
                serde_json::from_str(&data).expect("event data is JSON"),
            ));
        }
    }
    out
}

/// Pseudo-random bytes (xorshift): incompressible, the same on every run.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An app repository from `fixtures/serve/app` (plus `media` bytes of noise in
/// `App/wwwroot/media.bin` when non-zero), committed and served at `/<rel>`. Returns the
/// clone URL and the commit id.
pub fn app_repo(server: &GitServer, rel: &str, media: usize) -> (String, String) {
    let extra = if media > 0 {
        vec![(
            "App/wwwroot/media.bin".to_string(),
            noise(media, rel.len() as u64),
        )]
    } else {
        Vec::new()
    };
    app_repo_with(server, rel, &extra)
}

/// [`app_repo`] with `extra` files added (or replaced) before the commit.
pub fn app_repo_with(
    server: &GitServer,
    rel: &str,
    extra: &[(String, Vec<u8>)],
) -> (String, String) {
    let work = server.root().join(".work").join(rel.replace('/', "_"));
    std::fs::create_dir_all(&work).expect("mkdir work");
    copy_tree(&fixture("serve/app"), &work);
    for (path, bytes) in extra {
        write(&work, path, bytes);
    }
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "app"]);
    let commit = git(&work, &["rev-parse", "HEAD"]);
    let bare = server.root().join(rel);
    std::fs::create_dir_all(bare.parent().expect("parent")).expect("mkdir");
    git(
        server.root(),
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().expect("utf-8"),
            bare.to_str().expect("utf-8"),
        ],
    );
    (server.url(&format!("/{rel}")), commit)
}

/// A TCP proxy that sends client bytes upstream at most `rate` bytes a second (0: as fast
/// as they come), to make pushes slow on demand, and the replies back at most
/// [`Throttle::set_down_rate`] bytes a second (0 until set), to make pulls slow.
pub struct Throttle {
    pub addr: SocketAddr,
    rate: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Throttle {
    pub fn start(upstream: SocketAddr, rate: u64) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let rate = Arc::new(AtomicU64::new(rate));
        let down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, d, st) = (rate.clone(), down.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (r, d) = (r.clone(), d.clone());
                let (c2, u2) = (
                    client.try_clone().expect("clone"),
                    up.try_clone().expect("clone"),
                );
                thread::spawn(move || pipe(client, up, Some(r)));
                thread::spawn(move || pipe(u2, c2, Some(d)));
            }
        });
        Throttle {
            addr,
            rate,
            down,
            stop,
        }
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::SeqCst);
    }

    /// Replies (downloads) at most `rate` bytes a second from now on (0: unthrottled).
    pub fn set_down_rate(&self, rate: u64) {
        self.down.store(rate, Ordering::SeqCst);
    }

    /// `127.0.0.1:PORT/<path>`.
    pub fn image(&self, path: &str) -> String {
        format!("{}/{path}", self.addr)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, rate: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let limit = rate.as_ref().map_or(0, |r| r.load(Ordering::SeqCst));
        let want = if limit == 0 {
            buf.len()
        } else {
            buf.len().min((limit / 10).max(1) as usize)
        };
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if limit > 0 {
            thread::sleep(Duration::from_secs_f64(n as f64 / limit as f64));
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// The manifest digest the registry serves for `repo:tag` (None: no such tag).
pub fn registry_digest(reg: &crate::registry::Registry, repo: &str, tag: &str) -> Option<String> {
    let r = reg
        .http(
            "HEAD",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            b"",
        )
        .expect("registry HEAD");
    (r.status == 200).then(|| {
        r.header("docker-content-digest")
            .expect("digest")
            .to_string()
    })
}

/// The tags of `repo` in the registry.
pub fn registry_tags(reg: &crate::registry::Registry, repo: &str) -> Vec<String> {
    let r = reg
        .http("GET", &format!("/v2/{repo}/tags/list"), &[], b"")
        .expect("registry GET");
    if r.status != 200 {
        return Vec::new();
    }
    r.json()["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Files left in a store's `tmp/` (a cancelled or killed build must leave none once the
/// server has cleaned up).
pub fn tmp_entries(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("tmp"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Fail, listing them, if the store at `home` has anything left in `tmp/`.
pub fn assert_no_tmp(home: &Path) {
    let left = tmp_entries(home);
    assert!(left.is_empty(), "left in tmp/: {left:?}");
}

/// Whether `needle` occurs anywhere in the files under `dir`.
pub fn occurs_in_tree(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            std::fs::read(e.path())
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .map(|e| e.path().to_path_buf())
        .collect()
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private PostgreSQL cluster in a temp dir on a free loopback port (Debian package
/// `postgresql`). PostgreSQL refuses to run as root, so as root it runs as `nobody`.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Postgres {
        use std::os::unix::fs::PermissionsExt;
        let bin = Path::new(PG_BIN);
        assert!(
            bin.join("initdb").is_file(),
            "{PG_BIN}/initdb is missing: apt-get install postgresql (.ci/run installs it)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        if is_root() {
            // SAFETY: chown(2) on a path we created.
            let c = std::ffi::CString::new(data.to_str().expect("utf-8")).expect("path");
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0, "chown");
        }
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let as_pg = |tool: &str| {
            let mut c = if is_root() {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "nobody", "--"]).arg(bin.join(tool));
                c
            } else {
                std::process::Command::new(bin.join(tool))
            };
            c.current_dir(dir.path());
            c
        };
        run_ok(
            as_pg("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data),
        );
        let log = data.join("server.log");
        run_ok(
            as_pg("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
                    data.display()
                ))
                .args(["-w", "start"]),
        );
        Postgres { dir, port }
    }

    /// The connection string strata takes.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut c = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "nobody", "--"])
                .arg(Path::new(PG_BIN).join("pg_ctl"));
            c
        } else {
            std::process::Command::new(Path::new(PG_BIN).join("pg_ctl"))
        };
        let _ = c
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .current_dir(self.dir.path())
            .output();
    }
}
