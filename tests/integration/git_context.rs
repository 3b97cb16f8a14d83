//! Git build contexts against git's own smart HTTP server (`git http-backend`), through the
//! library API: ref resolution, shallow fetches into the cache, entries compared with a real
//! `git checkout`, auth forms and the errors a user sees.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use strata::layer::{Entry, EntryKind, FileSource};
use strata::registry::Secret;
use strata::source::{GitAuth, GitCache, GitCheckout, GitContext, SourceError};

use crate::git_server::{Auth, GitServer, checkout, git};

const REPO: &str = "/repos/org/app.git";

fn ctx(s: &str) -> GitContext {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn fetch(cache: &GitCache, context: &str) -> GitCheckout {
    cache
        .fetch(&ctx(context), &GitAuth::default())
        .unwrap_or_else(|e| panic!("fetch {context}: {}", chain(&e)))
}

/// The error with its sources, as the CLI prints it with `{:#}`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What an entry means, comparable across sources: kind, mode, symlink target or content.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Dir,
    File { mode: u32, content: Vec<u8> },
    Symlink(PathBuf),
}

fn read_source(source: &FileSource) -> Vec<u8> {
    let mut buf = Vec::new();
    source
        .open()
        .expect("open file source")
        .read_to_end(&mut buf)
        .expect("read file source");
    buf
}

fn seen_entries(entries: &[Entry]) -> BTreeMap<PathBuf, Seen> {
    entries
        .iter()
        .map(|e| {
            assert_eq!((e.uid, e.gid), (0, 0), "{}", e.path.display());
            let seen = match &e.kind {
                EntryKind::Dir => {
                    assert_eq!(e.mode, 0o755, "{}", e.path.display());
                    Seen::Dir
                }
                EntryKind::File { source, size, .. } => {
                    let content = read_source(source);
                    assert_eq!(content.len() as u64, *size, "{}", e.path.display());
                    Seen::File {
                        mode: e.mode,
                        content,
                    }
                }
                EntryKind::Symlink { target } => Seen::Symlink(target.clone()),
            };
            (e.path.clone(), seen)
        })
        .collect()
}

/// A real checkout walked like a context: modes as git would write them with umask 022.
fn seen_checkout(dir: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    for item in walkdir::WalkDir::new(dir).min_depth(1) {
        let item = item.expect("walk checkout");
        let rel = item.path().strip_prefix(dir).expect("below root");
        if rel.starts_with(".git") {
            continue;
        }
        let ft = item.file_type();
        let seen = if ft.is_symlink() {
            Seen::Symlink(std::fs::read_link(item.path()).expect("readlink"))
        } else if ft.is_dir() {
            Seen::Dir
        } else {
            let mode = item.metadata().expect("stat").permissions().mode();
            Seen::File {
                mode: if mode & 0o111 != 0 { 0o755 } else { 0o644 },
                content: std::fs::read(item.path()).expect("read"),
            }
        };
        out.insert(rel.to_path_buf(), seen);
    }
    out
}

#[test]
fn resolves_branches_tags_commits_and_head() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    let base = server.url(REPO);
    let cases = [
        (base.clone(), &repo.main),
        (format!("{base}#main"), &repo.main),
        (format!("{base}#feature"), &repo.feature),
        (format!("{base}#refs/heads/feature"), &repo.feature),
        (format!("{base}#v1"), &repo.v1),
        (format!("{base}#light"), &repo.v1),
        // Both a tag (at v1) and a branch (at main): git's order picks the tag.
        (format!("{base}#both"), &repo.v1),
        // Not the tip of any ref.
        (format!("{base}#{}", repo.initial), &repo.initial),
        (format!("{base}#{}", repo.feature), &repo.feature),
        // Gitea's URL form, without `.git`.
        (server.url("/repos/org/app#feature"), &repo.feature),
    ];
    for (context, expected) in cases {
        let checkout = fetch(&cache, &context);
        assert_eq!(&checkout.commit, expected, "{context}");
    }
    // 2024-03-04T05:06:07Z, the committer date of `main`.
    assert_eq!(fetch(&cache, &base).commit_time, 1_709_528_767);
}

#[test]
fn entries_match_a_real_checkout() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    for commit in [&repo.main, &repo.feature] {
        let checkout_dir = checkout(&repo, commit, home.path());
        let got = fetch(&cache, &server.url(&format!("{REPO}#{commit}")));
        let entries = got.entries(None).expect("entries");
        assert_eq!(seen_entries(&entries), seen_checkout(&checkout_dir));

        // Spot checks of what the comparison covers.
        let by_path: BTreeMap<_, _> = entries.iter().map(|e| (e.path.clone(), e)).collect();
        assert_eq!(by_path[Path::new("run.sh")].mode, 0o755);
        assert_eq!(by_path[Path::new("README.md")].mode, 0o644);
        assert!(by_path.contains_key(Path::new("App/wwwroot/bokmål ø.txt")));
        assert_eq!(
            by_path[Path::new("App/meta")].kind,
            EntryKind::Symlink {
                target: "config/applicationmetadata.json".into()
            }
        );
        match &by_path[Path::new("App/Program.cs")].kind {
            EntryKind::File { source, .. } => {
                let FileSource::Open { id, .. } = source else {
                    panic!("git files are read through an opener: {source:?}");
                };
                assert!(id.starts_with("git:") && id.len() == 44, "{id}");
            }
            other => panic!("{other:?}"),
        }

        // Parents before children, siblings in byte order (as a local context walk).
        let paths: Vec<&PathBuf> = entries.iter().map(|e| &e.path).collect();
        let a = paths
            .iter()
            .position(|p| p.as_os_str() == "App/a")
            .expect("App/a");
        let ab = paths
            .iter()
            .position(|p| p.as_os_str() == "App/a-b")
            .expect("App/a-b");
        let ax = paths
            .iter()
            .position(|p| p.as_os_str() == "App/a/x")
            .expect("App/a/x");
        assert!(a < ax && ax < ab, "{paths:?}");

        // A subdirectory as the context root.
        let sub = got.entries(Some("App")).expect("subdir entries");
        assert_eq!(seen_entries(&sub), seen_checkout(&checkout_dir.join("App")));
        let sub2 = got.entries(Some("/App/")).expect("subdir entries");
        assert_eq!(seen_entries(&sub2), seen_entries(&sub));
    }
}

#[test]
fn read_file_for_dockerfile_and_dockerignore() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    let got = fetch(&cache, &server.url(REPO));
    let dockerfile = got.read_file("Dockerfile").expect("read").expect("present");
    assert!(dockerfile.starts_with(b"FROM mcr.microsoft.com/dotnet/sdk"));
    assert_eq!(
        got.read_file(".dockerignore").expect("read").as_deref(),
        Some(&b".git\n*/bin\n*/obj\n"[..])
    );
    assert_eq!(
        got.read_file("Dockerfile.link").expect("read").as_deref(),
        Some(&b"FROM scratch\n"[..]),
        "symlinks inside the repository are followed"
    );
    assert_eq!(
        got.read_file("App/meta").expect("read").as_deref(),
        Some(&b"{\"id\":\"ttd/app\"}\n"[..])
    );
    assert_eq!(got.read_file("App/Dockerfile").expect("read"), None);
    assert_eq!(got.read_file("App").expect("read"), None, "a directory");
    let _ = repo;
}

#[test]
fn submodules_are_skipped() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    let got = fetch(&cache, &server.url(&format!("{REPO}#with-submodule")));
    assert_eq!(got.commit, repo.with_submodule);
    let entries = got.entries(None).expect("entries");
    let paths: Vec<_> = entries.iter().map(|e| e.path.clone()).collect();
    assert!(paths.contains(&PathBuf::from("vendor")), "{paths:?}");
    assert!(!paths.contains(&PathBuf::from("vendor/lib")), "{paths:?}");
}

#[test]
fn fetches_are_shallow_and_cached() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    let by_branch = server.url(&format!("{REPO}#feature"));

    let first = fetch(&cache, &by_branch);
    assert_eq!(
        server.commands(),
        ["ls-refs", "fetch"],
        "{:?}",
        server.requests()
    );
    // Depth 1: the commit is there, its parent is not.
    let cached = cache.repo_dir(&ctx(&by_branch));
    assert!(cached.join("shallow").exists());
    let keeps: Vec<_> = walkdir::WalkDir::new(cached.join("objects/pack"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "keep"))
        .collect();
    assert!(keeps.is_empty(), "{keeps:?}");
    assert_eq!(
        git(
            &cached,
            &[
                "rev-parse",
                &format!("refs/strata/commits/{}", repo.feature)
            ]
        ),
        repo.feature
    );
    git(&cached, &["fsck", "--connectivity-only", "--no-dangling"]);
    git(&cached, &["cat-file", "-e", &repo.feature]);
    let parent = std::process::Command::new("git")
        .current_dir(&cached)
        .args(["cat-file", "-e", &repo.main])
        .status()
        .expect("run git");
    assert!(!parent.success(), "the parent commit must not be fetched");

    // Same branch again: one ref listing, nothing fetched.
    server.clear_log();
    let second = fetch(&cache, &by_branch);
    assert_eq!(second.commit, first.commit);
    assert_eq!(server.commands(), ["ls-refs"], "{:?}", server.requests());
    assert!(
        server.requests().iter().all(|r| r.status == 200),
        "{:?}",
        server.requests()
    );

    // The commit by id: no request at all.
    server.clear_log();
    let by_id = fetch(&cache, &server.url(&format!("{REPO}#{}", repo.feature)));
    assert_eq!(by_id.commit, repo.feature);
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    // A second cache of the same commit gives the same entries.
    let other_home = tempfile::tempdir().expect("temp dir");
    let other = GitCache::new(other_home.path().join("git"));
    let again = fetch(&other, &server.url(&format!("{REPO}#{}", repo.feature)));
    let a = first.entries(None).expect("entries");
    let b = again.entries(None).expect("entries");
    assert_eq!(a, b, "FileSource::Open compares by blob id");
    assert_eq!(seen_entries(&a), seen_entries(&b));
}

#[test]
fn concurrent_fetches_share_the_cache() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let dir = home.path().join("git");
    let context = server.url(&format!("{REPO}#main"));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cache = GitCache::new(&dir);
            let context = context.clone();
            std::thread::spawn(move || fetch(&cache, &context).commit)
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread"), repo.main);
    }
    let fetches = server.commands().iter().filter(|c| *c == "fetch").count();
    assert_eq!(
        fetches, 1,
        "the lock makes later fetches find the commit cached"
    );
}

#[test]
fn each_auth_form_is_accepted() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let token = "gitea-t0ken-123";
    let server = GitServer::start(Auth::Basic(token.into()));
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let url = server.url(REPO);
    let forms: Vec<(Auth, String, GitAuth)> = vec![
        (
            Auth::Basic(token.into()),
            url.clone(),
            GitAuth {
                token: Some(Secret::new(token)),
                headers: vec![],
            },
        ),
        (
            Auth::Basic(token.into()),
            url.replacen("http://", &format!("http://{token}@"), 1),
            GitAuth::default(),
        ),
        (
            Auth::ApiKey(token.into()),
            url.clone(),
            GitAuth {
                token: None,
                headers: vec![("X-Api-Key".into(), Secret::new(token))],
            },
        ),
        (
            Auth::Token(token.into()),
            url.clone(),
            GitAuth {
                token: None,
                headers: vec![(
                    "Authorization".into(),
                    Secret::new(format!("token {token}")),
                )],
            },
        ),
    ];
    for (i, (mode, context, auth)) in forms.into_iter().enumerate() {
        server.set_auth(mode);
        let cache = GitCache::new(home.path().join(format!("git-{i}")));
        let got = cache
            .fetch(&ctx(&context), &auth)
            .unwrap_or_else(|e| panic!("form {i}: {}", chain(&e)));
        assert_eq!(got.commit, repo.main, "form {i}");
    }
}

#[test]
fn refused_credentials_give_the_auth_error() {
    let token = "gitea-t0ken-123";
    let server = GitServer::start(Auth::Basic(token.into()));
    server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    let expected = format!(
        "authentication to {} was refused; check --git-token",
        server.host()
    );
    let wrong = GitAuth {
        token: Some(Secret::new("wrong-s3cret")),
        headers: vec![],
    };
    let cases = [
        (server.url(REPO), GitAuth::default()),
        (server.url(REPO), wrong),
        (
            server
                .url(REPO)
                .replacen("http://", "http://wrong-s3cret@", 1),
            GitAuth::default(),
        ),
    ];
    for (context, auth) in cases {
        let err = cache.fetch(&ctx(&context), &auth).expect_err("refused");
        assert!(matches!(err, SourceError::GitAuthRefused { .. }), "{err:?}");
        let text = chain(&err);
        assert_eq!(text, expected);
        assert!(!text.contains("s3cret") && !format!("{err:?}").contains("s3cret"));
    }
    server.set_auth(Auth::Forbidden);
    let err = cache
        .fetch(
            &ctx(&server.url(REPO)),
            &GitAuth {
                token: Some(Secret::new(token)),
                headers: vec![],
            },
        )
        .expect_err("403");
    assert_eq!(chain(&err), expected);
}

#[test]
fn clear_errors_for_missing_ref_subdir_and_host() {
    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let cache = GitCache::new(home.path().join("git"));
    let url = server.url(REPO);

    let err = cache
        .fetch(&ctx(&format!("{url}#nope")), &GitAuth::default())
        .expect_err("missing ref");
    assert_eq!(err.to_string(), format!("ref nope not found in {url}"));

    let missing = "0123456789abcdef0123456789abcdef01234567";
    let err = cache
        .fetch(&ctx(&format!("{url}#{missing}")), &GitAuth::default())
        .expect_err("missing commit");
    assert_eq!(
        err.to_string(),
        format!("ref {missing} not found in {url}"),
        "{}",
        chain(&err)
    );

    let got = fetch(&cache, &format!("{url}#main:App"));
    assert_eq!(got.commit, repo.main);
    let err = got.entries(Some("Nope/x")).expect_err("missing subdir");
    assert_eq!(
        err.to_string(),
        format!("subdirectory \"Nope/x\" not found in commit {}", repo.main)
    );
    let err = got.entries(Some("README.md")).expect_err("a file");
    assert!(
        matches!(err, SourceError::GitSubdirNotFound { .. }),
        "{err:?}"
    );

    let err = cache
        .fetch(
            &ctx("http://127.0.0.1:1/repos/org/app.git"),
            &GitAuth::default(),
        )
        .expect_err("connection refused");
    let text = chain(&err);
    assert!(
        text.starts_with("cannot connect to git server 127.0.0.1:1: ")
            && text.to_lowercase().contains("connection refused")
            && !text.contains("info/refs"),
        "{text}"
    );

    let err = cache
        .fetch(
            &ctx(&server.url("/repos/org/missing.git")),
            &GitAuth::default(),
        )
        .expect_err("no such repository");
    assert_eq!(
        chain(&err),
        format!(
            "git repository {} not found",
            server.url("/repos/org/missing.git")
        )
    );
}

#[test]
fn a_set_interrupt_flag_stops_the_fetch_and_caches_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let server = GitServer::start(Auth::None);
    let repo = server.create_app_repo("repos/org/app.git");
    let home = tempfile::tempdir().expect("temp dir");
    let flag = Arc::new(AtomicBool::new(true));
    let cache = GitCache::new(home.path().join("git")).interrupt_with(flag.clone());
    let url = server.url(REPO);
    // The refs are listed; receiving the pack stops at once.
    for context in [url.clone(), format!("{url}#{}", repo.feature)] {
        let err = cache
            .fetch(&ctx(&context), &GitAuth::default())
            .expect_err("interrupted");
        assert!(
            matches!(err, SourceError::GitInterrupted { .. }),
            "{}",
            chain(&err)
        );
        assert_eq!(
            err.to_string(),
            format!("git fetch from {url} was interrupted")
        );
    }
    // Nothing half-fetched counts as cached: with the flag down the same cache fetches both.
    flag.store(false, Ordering::SeqCst);
    assert_eq!(fetch(&cache, &url).commit, repo.main);
    assert_eq!(
        fetch(&cache, &format!("{url}#{}", repo.feature)).commit,
        repo.feature
    );
}
