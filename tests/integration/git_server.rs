//! git's own smart HTTP server for git-context tests: a loopback HTTP/1.1 server that runs
//! `git http-backend` (Debian package `git`) as a CGI for the repositories under a temp
//! `GIT_PROJECT_ROOT`, with the auth schemes Gitea accepts and a request log.
//! Also helpers that build fixture repositories with the real `git`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const BACKEND: &str = "/usr/lib/git-core/git-http-backend";

/// What the server demands before it serves anything.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Anonymous access.
    None,
    /// HTTP Basic where the token is the password (any user), or the user with an empty
    /// password: what Gitea accepts.
    Basic(String),
    /// `X-Api-Key: <key>` (newer Altinn Studio).
    ApiKey(String),
    /// `Authorization: token <t>` (Gitea's token scheme).
    Token(String),
    /// Every request gets 403.
    Forbidden,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// Length of the response body.
    pub response_bytes: usize,
    /// For protocol-v2 POSTs, the command (`ls-refs`, `fetch`).
    pub command: Option<String>,
}

/// A running server; stops accepting when dropped.
pub struct GitServer {
    root: tempfile::TempDir,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Logged>>>,
    auth: Arc<Mutex<Auth>>,
    stop: Arc<AtomicBool>,
}

impl GitServer {
    pub fn start(auth: Auth) -> GitServer {
        assert!(
            Path::new(BACKEND).exists(),
            "{BACKEND} is missing: install the Debian package `git`"
        );
        let root = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let server = GitServer {
            root,
            addr,
            log: Arc::default(),
            auth: Arc::new(Mutex::new(auth)),
            stop: Arc::default(),
        };
        let shared = Shared {
            root: server.root.path().to_path_buf(),
            log: server.log.clone(),
            auth: server.auth.clone(),
        };
        let stop = server.stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(stream, &shared);
                });
            }
        });
        server
    }

    /// The project root the repositories live in.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `host:port`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_auth(&self, auth: Auth) {
        *self.auth.lock().expect("auth lock") = auth;
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.log.lock().expect("log lock").clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().expect("log lock").clear();
    }

    /// The v2 commands of the logged requests, in order (`ls-refs`, `fetch`).
    pub fn commands(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.command)
            .collect()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

#[derive(Clone)]
struct Shared {
    root: PathBuf,
    log: Arc<Mutex<Vec<Logged>>>,
    auth: Arc<Mutex<Auth>>,
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Serves requests on one keep-alive connection until the client closes it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(req) = read_request(&mut reader)? {
        let (status, headers, body) = respond(&req, shared);
        let command = (req.method == "POST")
            .then(|| v2_command(&req.body))
            .flatten();
        shared.log.lock().expect("log lock").push(Logged {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            status,
            response_bytes: body.len(),
            command,
        });
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (name, value) in &headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        writer.write_all(head.as_bytes())?;
        writer.write_all(&body)?;
        writer.flush()?;
        let close = req
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if close {
            break;
        }
    }
    Ok(())
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = size.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailer lines up to the empty one.
                loop {
                    let mut t = String::new();
                    if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = String::new();
            reader.read_line(&mut crlf)?;
        }
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| std::io::Error::other("bad content-length"))?;
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    }
    Ok(Some(Request {
        method,
        path,
        query,
        headers,
        body,
    }))
}

fn authorized(req: &Request, auth: &Auth) -> Result<(), u16> {
    use base64::Engine as _;
    let authorization = req.headers.get("authorization").map(String::as_str);
    let ok = match auth {
        Auth::None => true,
        Auth::Forbidden => return Err(403),
        Auth::Basic(token) => authorization
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|pair| match pair.split_once(':') {
                Some((user, pass)) => pass == token || (pass.is_empty() && user == token),
                None => false,
            }),
        Auth::ApiKey(key) => req.headers.get("x-api-key") == Some(key),
        Auth::Token(token) => authorization == Some(format!("token {token}").as_str()),
    };
    if ok { Ok(()) } else { Err(401) }
}

fn respond(req: &Request, shared: &Shared) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let auth = shared.auth.lock().expect("auth lock").clone();
    if let Err(status) = authorized(req, &auth) {
        let mut headers = vec![("Content-Type".to_string(), "text/plain".to_string())];
        if status == 401 {
            headers.push((
                "WWW-Authenticate".to_string(),
                "Basic realm=\"git\"".to_string(),
            ));
        }
        return (status, headers, b"denied\n".to_vec());
    }
    run_cgi(req, &shared.root)
}

/// Runs `git http-backend` for one request and splits its CGI answer.
fn run_cgi(req: &Request, root: &Path) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut cmd = Command::new(BACKEND);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REQUEST_METHOD", &req.method)
        .env("PATH_INFO", percent_decode(&req.path))
        .env("QUERY_STRING", &req.query)
        .env("CONTENT_LENGTH", req.body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(v) = req.headers.get("content-type") {
        cmd.env("CONTENT_TYPE", v);
    }
    if let Some(v) = req.headers.get("git-protocol") {
        cmd.env("GIT_PROTOCOL", v);
    }
    if let Some(v) = req.headers.get("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    let mut child = cmd.spawn().expect("run git http-backend");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let body = req.body.clone();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().expect("wait for git http-backend");
    let _ = feeder.join();
    let raw = out.stdout;
    let (head, body) = match find(&raw, b"\r\n\r\n") {
        Some(i) => (&raw[..i], raw[i + 4..].to_vec()),
        None => match find(&raw, b"\n\n") {
            Some(i) => (&raw[..i], raw[i + 2..].to_vec()),
            None => {
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                return (500, vec![], err.into_bytes());
            }
        },
    };
    let mut status = 200;
    let mut headers = Vec::new();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(500);
        } else {
            headers.push((name.to_string(), value));
        }
    }
    (status, headers, body)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The command of a protocol-v2 request body: its first pkt-line `command=<name>`.
fn v2_command(body: &[u8]) -> Option<String> {
    let len = usize::from_str_radix(std::str::from_utf8(body.get(..4)?).ok()?, 16).ok()?;
    let line = std::str::from_utf8(body.get(4..len)?).ok()?;
    line.trim_end().strip_prefix("command=").map(str::to_string)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if b[i] == b'%'
            && let Some(v) = hex
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Status",
    }
}

// ---------------------------------------------------------------------------------------
// Fixture repositories, made with the real git.

/// Fixed identity and dates so commit ids are the same on every run.
pub const COMMIT_DATES: [&str; 4] = [
    "2024-01-02T03:04:05Z",
    "2024-02-03T04:05:06Z",
    "2024-03-04T05:06:07Z",
    "2024-04-05T06:07:08Z",
];

/// Runs the real `git` in `dir` with no user or system config; returns trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    git_at(dir, args, COMMIT_DATES[0])
}

fn git_at(dir: &Path, args: &[&str], date: &str) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Studio")
        .env("GIT_AUTHOR_EMAIL", "studio@example.com")
        .env("GIT_COMMITTER_NAME", "Studio")
        .env("GIT_COMMITTER_EMAIL", "studio@example.com")
        .env("GIT_AUTHOR_DATE", date)
        .env("GIT_COMMITTER_DATE", date)
        .output()
        .expect("run git (Debian package `git`)");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 git output")
        .trim()
        .to_string()
}

/// An Altinn-style app repository served by a [`GitServer`].
pub struct AppRepo {
    /// The working repository the history was made in.
    pub work: PathBuf,
    /// The bare repository the server serves.
    pub bare: PathBuf,
    /// A commit no ref points at (parent of `v1`).
    pub initial: String,
    /// Tagged `v1` (annotated) and `light` (lightweight), and `both` (tag).
    pub v1: String,
    /// The tip of `main` (the remote HEAD), also the branch `both`.
    pub main: String,
    /// The tip of `feature`.
    pub feature: String,
    /// The tip of `with-submodule`: `main` plus a gitlink at `vendor/lib`.
    pub with_submodule: String,
}

fn write(dir: &Path, rel: &str, content: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
    std::fs::write(path, content).expect("write fixture file");
}

impl GitServer {
    /// Creates an app repository served at `/<rel>` (e.g. `repos/org/app.git`), also reachable
    /// without the `.git` suffix as Gitea allows.
    pub fn create_app_repo(&self, rel: &str) -> AppRepo {
        use std::os::unix::fs::PermissionsExt;
        let work = self.root().join(".work").join(rel.replace('/', "_"));
        std::fs::create_dir_all(&work).expect("mkdir work");
        git(&work, &["init", "-q", "-b", "main"]);

        write(&work, "README.md", "An app\n");
        git_at(&work, &["add", "-A"], COMMIT_DATES[0]);
        git_at(&work, &["commit", "-qm", "initial"], COMMIT_DATES[0]);
        let initial = git(&work, &["rev-parse", "HEAD"]);

        write(
            &work,
            "Dockerfile",
            "FROM mcr.microsoft.com/dotnet/sdk:8.0-alpine AS build\nWORKDIR /App\nCOPY /App .\n",
        );
        write(&work, ".dockerignore", ".git\n*/bin\n*/obj\n");
        write(
            &work,
            "App/App.csproj",
            "<Project Sdk=\"Microsoft.NET.Sdk.Web\" />\n",
        );
        write(&work, "App/Program.cs", "// v1\n");
        write(
            &work,
            "App/config/applicationmetadata.json",
            "{\"id\":\"ttd/app\"}\n",
        );
        write(&work, "App/ui/layouts/Side1.json", "{}\n");
        write(&work, "App/wwwroot/bokmål ø.txt", "Hei på deg\n");
        write(&work, "App/a-b", "dash\n");
        write(&work, "App/a/x", "slash\n");
        write(&work, "deployment/values.yaml", "replicaCount: 2\n");
        write(&work, "run.sh", "#!/bin/sh\necho hi\n");
        std::fs::set_permissions(work.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("config/applicationmetadata.json", work.join("App/meta"))
            .expect("symlink");
        std::os::unix::fs::symlink("App/Dockerfile.real", work.join("Dockerfile.link"))
            .expect("symlink");
        write(&work, "App/Dockerfile.real", "FROM scratch\n");
        git_at(&work, &["add", "-A"], COMMIT_DATES[1]);
        git_at(&work, &["commit", "-qm", "app"], COMMIT_DATES[1]);
        let v1 = git(&work, &["rev-parse", "HEAD"]);
        git_at(
            &work,
            &["tag", "-a", "v1", "-m", "release 1"],
            COMMIT_DATES[1],
        );
        git(&work, &["tag", "light"]);
        git(&work, &["tag", "both"]);

        write(&work, "App/Program.cs", "// v2\n");
        write(&work, "App/options/list.json", "[]\n");
        git_at(&work, &["add", "-A"], COMMIT_DATES[2]);
        git_at(&work, &["commit", "-qm", "v2"], COMMIT_DATES[2]);
        let main = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["branch", "both"]);

        git(&work, &["checkout", "-q", "-b", "feature"]);
        write(&work, "feature.txt", "new\n");
        git_at(&work, &["add", "-A"], COMMIT_DATES[3]);
        git_at(&work, &["commit", "-qm", "feature"], COMMIT_DATES[3]);
        let feature = git(&work, &["rev-parse", "HEAD"]);

        git(&work, &["checkout", "-q", "-b", "with-submodule", "main"]);
        git(
            &work,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{initial},vendor/lib"),
            ],
        );
        git_at(&work, &["commit", "-qm", "submodule"], COMMIT_DATES[3]);
        let with_submodule = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["checkout", "-q", "main"]);

        let bare = self.root().join(rel);
        std::fs::create_dir_all(bare.parent().expect("has parent")).expect("mkdir");
        git(
            self.root(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().expect("utf-8"),
                bare.to_str().expect("utf-8"),
            ],
        );
        if let Some(plain) = rel.strip_suffix(".git") {
            std::os::unix::fs::symlink(&bare, self.root().join(plain)).expect("symlink repo");
        }
        AppRepo {
            work,
            bare,
            initial,
            v1,
            main,
            feature,
            with_submodule,
        }
    }
}

/// A real checkout of `commit` from `repo`, made by `git clone` + `git checkout`.
pub fn checkout(repo: &AppRepo, commit: &str, into: &Path) -> PathBuf {
    let dir = into.join(format!("checkout-{}", &commit[..12]));
    git(
        into,
        &[
            "clone",
            "-q",
            "--no-checkout",
            repo.bare.to_str().expect("utf-8"),
            dir.to_str().expect("utf-8"),
        ],
    );
    git(&dir, &["checkout", "-q", commit]);
    dir
}
