//! `strata build` from a git repository served by the real `git http-backend`: the same
//! digest as building the plain checkout, token auth, cached commits, clear errors.

use crate::common::*;
use crate::git_server::{AppRepo, Auth, GitServer, checkout, git};

const TOKEN: &str = "s3cr3t-gitea-token";

/// Add a strata-buildable Dockerfile to the repository's `main` and publish it.
fn add_dockerfile(repo: &AppRepo) -> String {
    std::fs::write(
        repo.work.join("Dockerfile.strata"),
        "FROM scratch\nWORKDIR /App\nCOPY App .\nCOPY run.sh /usr/local/bin/\nENTRYPOINT [\"/usr/local/bin/run.sh\"]\n",
    )
    .unwrap();
    git(&repo.work, &["add", "-A"]);
    git(
        &repo.work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-qm",
            "strata dockerfile",
        ],
    );
    git(
        &repo.work,
        &["push", "-q", repo.bare.to_str().unwrap(), "main"],
    );
    git(&repo.work, &["rev-parse", "HEAD"])
}

#[test]
fn git_context_builds_like_its_checkout() {
    let server = GitServer::start(Auth::Basic(TOKEN.into()));
    let repo = server.create_app_repo("repos/org/app.git");
    let commit = add_dockerfile(&repo);
    let env = Env::new();
    let url = server.url("/repos/org/app.git");

    let from_git = env.ok(&[
        "build",
        "-q",
        "--git-token",
        TOKEN,
        "-f",
        "Dockerfile.strata",
        "-t",
        "from-git",
        &format!("{url}#main"),
    ]);
    let co = checkout(&repo, &commit, env.dir.path());
    let dockerfile = co.join("Dockerfile.strata");
    let from_dir = env.ok(&[
        "build",
        "-q",
        "--no-cache",
        "-f",
        dockerfile.to_str().unwrap(),
        co.to_str().unwrap(),
    ]);
    assert_eq!(
        from_git.trim(),
        from_dir.trim(),
        "git context and checkout differ"
    );
    env.fsck();
    let tree = env.unpack("from-git", "g");
    assert_eq!(tree["App/Program.cs"].0, Obj::File(b"// v2\n".to_vec()));
    assert_eq!(tree["usr/local/bin/run.sh"].1, 0o755);
    assert!(!tree.contains_key("App/bin"), "dockerignored");

    // A second build of the pinned commit talks to nobody and rebuilds nothing.
    server.clear_log();
    let out = env
        .cmd()
        .args([
            "build",
            "--progress",
            "json",
            "--git-token",
            TOKEN,
            "-f",
            "Dockerfile.strata",
        ])
        .arg(format!("{url}#{commit}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        from_git.trim()
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    let stderr = String::from_utf8(out.stderr).unwrap();
    for line in stderr.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["type"] == "step_done" && e["layer"].is_object() {
            assert_eq!(e["cached"], true, "layer rebuilt: {line}");
        }
    }
    assert!(!stderr.contains(TOKEN));

    // The commit time as SOURCE_DATE_EPOCH.
    let out = env.ok(&[
        "build",
        "-q",
        "--git-token",
        TOKEN,
        "--source-date-epoch",
        "commit",
        "-f",
        "Dockerfile.strata",
        "-t",
        "dated",
        &format!("{url}#{commit}"),
    ]);
    assert_ne!(out.trim(), from_git.trim());
    let created = env.ok(&["inspect", "dated", "--format", ".Config.created"]);
    let when = git(&repo.work, &["show", "-s", "--format=%cI", &commit]);
    assert_eq!(&created.trim()[..10], &when[..10], "{created} vs {when}");
}

#[test]
fn git_errors_are_one_clear_line() {
    let server = GitServer::start(Auth::Basic(TOKEN.into()));
    server.create_app_repo("repos/org/app.git");
    let env = Env::new();
    let url = server.url("/repos/org/app.git");
    let err = env.fail(
        &[
            "build",
            "--git-token",
            "wrong-token",
            &format!("{url}#main"),
        ],
        1,
    );
    assert!(
        err.contains("authentication to") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("wrong-token"), "{err}");
    let err = env.fail(&["build", "--git-token", TOKEN, &format!("{url}#nope")], 1);
    assert!(err.contains("ref nope not found"), "{err}");
    let err = env.fail(
        &[
            "build",
            "--git-token",
            TOKEN,
            &format!("{url}#main:NoSuchDir"),
        ],
        1,
    );
    assert!(err.contains("NoSuchDir"), "{err}");
    let err = env.fail(&["build", "http://127.0.0.1:1/repos/org/app.git#main"], 1);
    assert!(err.contains("cannot connect"), "{err}");
    // The token in the URL's user part is never printed either.
    let with_user = url.replacen("http://", &format!("http://{TOKEN}@"), 1);
    let out = env
        .cmd()
        .args(["build", "--progress", "plain"])
        .arg(format!("{with_user}#nope"))
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(TOKEN), "{all}");
}

#[test]
fn git_submodules_are_fetched_when_asked() {
    let server = GitServer::start(Auth::Basic(TOKEN.into()));
    let lib = server.create_app_repo("repos/org/lib.git");
    let app = server.create_app_repo("repos/org/app.git");
    std::fs::write(
        app.work.join(".gitmodules"),
        "[submodule \"lib\"]\n\tpath = vendor/lib\n\turl = ../lib.git\n",
    )
    .unwrap();
    std::fs::write(
        app.work.join("Dockerfile.sub"),
        "FROM scratch\nCOPY vendor/lib/App/Program.cs /lib-program.cs\n",
    )
    .unwrap();
    git(&app.work, &["add", ".gitmodules", "Dockerfile.sub"]);
    git(
        &app.work,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{},vendor/lib", lib.v1),
        ],
    );
    git(
        &app.work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-qm",
            "submodule",
        ],
    );
    git(
        &app.work,
        &["push", "-q", app.bare.to_str().unwrap(), "main"],
    );
    let env = Env::new();
    let url = format!("{}#main", server.url("/repos/org/app.git"));
    // Without the flag the submodule is empty, so the COPY fails clearly.
    let err = env.fail(
        &["build", "--git-token", TOKEN, "-f", "Dockerfile.sub", &url],
        1,
    );
    assert!(err.contains("vendor/lib/App/Program.cs"), "{err}");
    env.ok(&[
        "build",
        "-q",
        "--git-token",
        TOKEN,
        "--git-submodules",
        "-f",
        "Dockerfile.sub",
        "-t",
        "sub",
        &url,
    ]);
    let tree = env.unpack("sub", "sub");
    // lib's v1 commit has the v1 Program.cs.
    assert_eq!(tree["lib-program.cs"].0, Obj::File(b"// v1\n".to_vec()));
}

#[test]
fn short_commit_ids_resolve_like_git() {
    let server = GitServer::start(Auth::Basic(TOKEN.into()));
    let repo = server.create_app_repo("repos/org/app.git");
    let commit = add_dockerfile(&repo);
    let env = Env::new();
    let url = server.url("/repos/org/app.git");
    let full = env.ok(&[
        "build",
        "-q",
        "--git-token",
        TOKEN,
        "-f",
        "Dockerfile.strata",
        &format!("{url}#{commit}"),
    ]);
    // A short id of the tip, and of a commit no ref points at.
    let short = env.ok(&[
        "build",
        "-q",
        "--git-token",
        TOKEN,
        "-f",
        "Dockerfile.strata",
        &format!("{url}#{}", &commit[..8]),
    ]);
    assert_eq!(full, short);
    let err = env.fail(
        &[
            "build",
            "--git-token",
            TOKEN,
            &format!("{url}#{}:NoDir", &repo.initial[..9]),
        ],
        1,
    );
    assert!(
        err.contains("NoDir"),
        "resolved the old commit, then missed the subdir: {err}"
    );
    let err = env.fail(
        &["build", "--git-token", TOKEN, &format!("{url}#deadbeef")],
        1,
    );
    assert!(err.contains("deadbeef not found"), "{err}");
}
