//! Bad input: one clear error (with the offending Dockerfile line when there is one), exit 1
//! for a failed build and 2 for a usage error, and nothing lost: no new tag, an existing tag
//! still on its old image, a consistent store and no temp files left in `$STRATA_HOME/tmp`.

use std::path::PathBuf;

use crate::common::{Env, write};

/// A store holding `app:1` (built from `ctx`), and that context, for a test to break.
struct Broken {
    env: Env,
    ctx: PathBuf,
    old: String,
}

impl Broken {
    fn new() -> Broken {
        let env = Env::new();
        let ctx = env.path("ctx");
        write(&ctx, "a.txt", b"a\n");
        write(&ctx, "Dockerfile", b"FROM scratch\nCOPY a.txt /a.txt\n");
        let old = env.build(&ctx, &["-t", "app:1"]);
        Broken { env, ctx, old }
    }

    fn ctx(&self) -> &str {
        self.ctx.to_str().expect("utf-8 path")
    }

    /// Replace the Dockerfile with `dockerfile`, then [`Broken::fails`] on the context.
    fn fails_with(&self, dockerfile: &str, extra: &[&str], code: i32) -> String {
        write(&self.ctx, "Dockerfile", dockerfile.as_bytes());
        self.fails(extra, self.ctx(), code)
    }

    /// `strata build -q -t app:1 -t fresh:1 EXTRA CONTEXT` must exit `code` and lose nothing;
    /// returns stderr.
    fn fails(&self, extra: &[&str], context: &str, code: i32) -> String {
        let mut args = vec!["build", "-q", "-t", "app:1", "-t", "fresh:1"];
        args.extend_from_slice(extra);
        args.push(context);
        let stderr = self.env.fail(&args, code);
        assert!(
            stderr.starts_with("error: "),
            "not one clear error:\n{stderr}"
        );
        for noise in ["panicked", "backtrace", "Backtrace"] {
            assert!(!stderr.contains(noise), "{noise} in:\n{stderr}");
        }
        self.assert_nothing_lost();
        stderr
    }

    fn assert_nothing_lost(&self) {
        assert_eq!(self.env.names(), ["app:1"], "tags changed");
        let now = self.env.ok(&["inspect", "app:1", "--format", ".Digest"]);
        assert_eq!(now.trim(), self.old, "app:1 moved");
        self.env.fsck();
        let tmp = self.env.home().join("tmp");
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .expect("read store tmp")
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
    }
}

/// The error names `Dockerfile:LINE:COL:` and shows that line as written.
fn assert_located(stderr: &str, line: usize, col: usize, text: &str) {
    assert!(
        stderr.contains(&format!("Dockerfile:{line}:{col}: ")),
        "expected Dockerfile:{line}:{col}: in:\n{stderr}"
    );
    let shown = format!("{line} | {text}");
    assert!(
        stderr.lines().any(|l| l.trim_start() == shown),
        "expected the offending line {shown:?} in:\n{stderr}"
    );
}

// Comments, a blank line and a continuation before the error, so that a miscounted line
// number shows.
const PREAMBLE: &str = "# syntax check\nFROM scratch\nCOPY a.txt \\\n  /a.txt\n\n";

#[test]
fn unknown_instruction_names_its_line() {
    let b = Broken::new();
    let err = b.fails_with(&format!("{PREAMBLE}# typo\n  COPPY a.txt /b\n"), &[], 1);
    assert_located(&err, 7, 3, "  COPPY a.txt /b");
    assert!(err.contains("unknown instruction: COPPY"), "{err}");
}

#[test]
fn unterminated_heredoc_names_the_line_it_starts_on() {
    let b = Broken::new();
    let err = b.fails_with(&format!("{PREAMBLE}COPY <<EOF /b\nhello\n"), &[], 1);
    assert_located(&err, 6, 1, "COPY <<EOF /b");
    assert!(err.contains("unterminated heredoc"), "{err}");
}

#[test]
fn flag_without_value_names_its_line() {
    let b = Broken::new();
    let err = b.fails_with(&format!("{PREAMBLE}COPY --chown a.txt /b\n"), &[], 1);
    assert_located(&err, 6, 1, "COPY --chown a.txt /b");
    assert!(err.contains("chown"), "{err}");
}

#[test]
fn a_failing_run_names_its_line_and_command() {
    let b = Broken::new();
    // The COPY before it has already written a layer when RUN fails; FROM scratch has no
    // shell, so the step cannot start.
    let err = b.fails_with(&format!("{PREAMBLE}RUN echo hi\n"), &[], 1);
    assert_located(&err, 6, 1, "RUN echo hi");
    assert!(err.contains("/bin/sh"), "{err}");
}

#[test]
fn missing_copy_source() {
    let b = Broken::new();
    let err = b.fails_with(&format!("{PREAMBLE}COPY nope.txt /b\n"), &[], 1);
    assert_located(&err, 6, 1, "COPY nope.txt /b");
    assert!(
        err.contains("\"nope.txt\": no such file or directory"),
        "{err}"
    );
}

#[test]
fn glob_matching_nothing() {
    let b = Broken::new();
    let err = b.fails_with(&format!("{PREAMBLE}COPY *.nope /b/\n"), &[], 1);
    assert_located(&err, 6, 1, "COPY *.nope /b/");
    assert!(err.contains("no source files match \"*.nope\""), "{err}");
}

#[test]
fn copy_from_outside_the_context() {
    let b = Broken::new();
    // `../x` exists, beside the context; clamping it to the context root would find no `x`
    // either, so only a refusal is right.
    std::fs::write(b.env.path("x"), b"secret\n").expect("write ../x");
    let err = b.fails_with(&format!("{PREAMBLE}COPY ../x /x\n"), &[], 1);
    assert_located(&err, 6, 1, "COPY ../x /x");
    assert!(err.contains("outside the build context"), "{err}");
}

#[test]
fn copy_from_an_unknown_stage_looks_for_an_image() {
    let b = Broken::new();
    let df =
        format!("FROM scratch AS one\nCOPY a.txt /a\n{PREAMBLE}COPY --from=nosuchstage /a /b\n");
    let err = b.fails_with(&df, &[], 1);
    assert_located(&err, 8, 1, "COPY --from=nosuchstage /a /b");
    assert!(
        err.contains("\"nosuchstage\" is not in the local store"),
        "{err}"
    );
}

#[test]
fn unknown_target() {
    let b = Broken::new();
    let df = "FROM scratch AS one\nCOPY a.txt /a\nFROM one AS two\n";
    let err = b.fails_with(df, &["--target", "nope"], 1);
    assert!(err.contains("\"nope\" not found"), "{err}");
    assert!(
        err.contains("one, two"),
        "names the stages there are: {err}"
    );
}

#[test]
fn undeclared_build_arg() {
    let b = Broken::new();
    let df = "ARG DECLARED\nFROM scratch\nCOPY a.txt /a\n";
    let err = b.fails_with(
        df,
        &["--build-arg", "DECLARED=1", "--build-arg", "FOO=1"],
        1,
    );
    assert!(err.contains("FOO") && err.contains("not declared"), "{err}");
    assert!(!err.contains("DECLARED"), "only the undeclared one: {err}");
}

#[test]
fn unreadable_dockerfile() {
    let b = Broken::new();
    let missing = b.env.path("no-such-Dockerfile");
    let missing = missing.to_str().expect("utf-8 path");
    let err = b.fails(&["-f", missing], b.ctx(), 1);
    assert!(err.contains(missing), "names the path: {err}");
    // A directory is no Dockerfile either.
    let err = b.fails(&["-f", b.ctx()], b.ctx(), 1);
    assert!(err.contains(b.ctx()), "names the path: {err}");
}

#[test]

fn context_not_a_directory() {
    let b = Broken::new();
    let file = b.ctx.join("a.txt");
    let file = file.to_str().expect("utf-8 path");
    let err = b.fails(&[], file, 1);
    assert!(
        err.contains(file) && err.contains("not a directory"),
        "{err}"
    );
    let missing = b.env.path("no-such-dir");
    let missing = missing.to_str().expect("utf-8 path");
    let err = b.fails(&[], missing, 1);
    assert!(err.contains(missing), "{err}");
}

#[test]
fn bad_chmod() {
    let b = Broken::new();
    for mode in ["999", "17777", "rwx"] {
        let line = format!("COPY --chmod={mode} a.txt /b");
        let err = b.fails_with(&format!("{PREAMBLE}{line}\n"), &[], 1);
        assert_located(&err, 6, 1, &line);
        assert!(
            err.contains(&format!("invalid --chmod \"{mode}\"")),
            "{err}"
        );
    }
}

#[test]
fn bad_expose_port() {
    let b = Broken::new();
    for port in ["70000", "http", "80/icmp"] {
        let line = format!("EXPOSE 80 {port}");
        let err = b.fails_with(&format!("{PREAMBLE}{line}\n"), &[], 1);
        assert_located(&err, 6, 1, &line);
        assert!(err.contains(port), "{err}");
    }
}

#[test]

fn failed_output_moves_no_tag() {
    let b = Broken::new();
    let out = b.env.path("no-such-dir/out.tar");
    let target = format!("oci-archive:{}", out.display());
    let err = b.fails_with(
        "FROM scratch\nCOPY a.txt /other\n",
        &["--output", &target],
        1,
    );
    assert!(err.contains("no-such-dir"), "{err}");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let b = Broken::new();
    let err = b.fails(&["--no-such-flag"], b.ctx(), 2);
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn bad_output_is_a_usage_error() {
    let b = Broken::new();
    for (output, says) in [
        ("docker:x", "unknown output transport \"docker\""),
        ("oci", "invalid output \"oci\""),
        ("oci:", "the path is empty"),
        ("type=tar,dest=x", "type=tar is not supported"),
        ("docker-archive:x.tar:BAD", "invalid image name \"BAD\""),
    ] {
        let err = b.fails(&["--output", output], b.ctx(), 2);
        assert!(err.contains(says), "--output {output}: {err}");
    }
}

#[test]
fn bad_platform_is_a_usage_error() {
    let b = Broken::new();
    for platform in ["linux", "linux/", "/amd64", "linux/amd64/v8/x"] {
        let err = b.fails(&["--platform", platform], b.ctx(), 2);
        assert!(err.contains(&format!("{platform:?}")), "{err}");
    }
}

#[test]
fn bad_tag_is_a_usage_error() {
    let b = Broken::new();
    for tag in ["App:1", "app:", "app:-x", "a//b"] {
        let err = b.fails(&["-t", tag], b.ctx(), 2);
        assert!(
            err.contains(&format!("invalid image name {tag:?}")),
            "{err}"
        );
    }
}
