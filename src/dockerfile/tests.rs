//! Conformance with BuildKit's parser test data, and the typed layer's checks.

use std::path::{Path, PathBuf};

use super::*;

fn conformance_dir() -> Option<PathBuf> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/conformance/buildkit/parser"
    ));
    if dir.is_dir() {
        Some(dir.to_path_buf())
    } else {
        eprintln!("note: {} missing, skipping conformance test", dir.display());
        None
    }
}

/// Go's `%q`: a double-quoted string with Go escapes.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders a node like BuildKit's `Node.Dump`.
fn dump(node: &Node) -> String {
    let mut s = node.keyword.clone();
    if !node.flags.is_empty() {
        let flags: Vec<String> = node.flags.iter().map(|f| go_quote(f)).collect();
        s.push_str(&format!(" [{}]", flags.join(" ")));
    }
    match &node.args {
        Args::Trigger(inner) => s.push_str(&format!(" {}", dump(inner))),
        _ => {
            for arg in node.arg_strings() {
                s.push(' ');
                s.push_str(&go_quote(&arg));
            }
        }
    }
    format!("({s})")
}

#[test]
fn buildkit_testfiles() {
    let Some(dir) = conformance_dir() else { return };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir.join("testfiles"))
        .expect("read testfiles")
        .map(|e| e.expect("dir entry").path())
        .collect();
    cases.sort();
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().expect("case name").to_string_lossy();
        let text = std::fs::read_to_string(case.join("Dockerfile")).expect("Dockerfile");
        let expected = std::fs::read_to_string(case.join("result")).expect("result");
        match parse_ast(&text, "Dockerfile") {
            Ok(ast) => {
                let got: String = ast.nodes.iter().map(|n| dump(n) + "\n").collect();
                if got != expected {
                    failures.push(format!("{name}:\n--- got\n{got}--- expected\n{expected}"));
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert_eq!(cases.len(), 33, "expected 33 BuildKit cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn buildkit_negative() {
    let Some(dir) = conformance_dir() else { return };
    let mut count = 0;
    for entry in std::fs::read_dir(dir.join("testfiles-negative")).expect("read negative") {
        let case = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(case.join("Dockerfile")).expect("Dockerfile");
        let result = parse_ast(&text, "Dockerfile");
        assert!(result.is_err(), "{}: parsed {result:?}", case.display());
        assert!(parse(&text, "Dockerfile").is_err());
        count += 1;
    }
    assert!(count >= 4);
}

#[test]
fn buildkit_line_information() {
    let Some(dir) = conformance_dir() else { return };
    let text = std::fs::read_to_string(dir.join("testfile-line/Dockerfile")).expect("Dockerfile");
    let ast = parse_ast(&text, "Dockerfile").expect("parse");
    let lines: Vec<(usize, usize)> = ast
        .nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    assert_eq!(lines, [(5, 5), (11, 12), (17, 31)]);
}

fn one(text: &str) -> Instruction {
    let df = parse(text, "Dockerfile").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(df.steps.len(), 1, "{text}");
    df.steps[0].instruction.clone()
}

fn err(text: &str) -> String {
    parse(text, "Dockerfile").expect_err(text).to_string()
}

#[test]
fn from_variants() {
    assert_eq!(
        one("FROM --platform=$BUILDPLATFORM golang:1.22 AS Build\n"),
        Instruction::From {
            image: "golang:1.22".into(),
            name: Some("build".into()),
            platform: Some("$BUILDPLATFORM".into()),
        }
    );
    assert!(err("FROM\n").contains("FROM requires either one or three arguments"));
    assert!(err("FROM a AS\n").contains("one or three"));
    assert!(err("FROM a AS 1x\n").contains("invalid name for build stage"));
    assert!(err("FROM --plaform=x a\n").contains("unknown flag: plaform"));
}

#[test]
fn error_display() {
    let e = parse("FROM scratch\n\n  COPPY a b\n", "Dockerfile").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile:3:3: unknown instruction: COPPY\n   3 |   COPPY a b"
    );
    let e = parse("FROM scratch\nCOPY a\n", "ctx/Dockerfile").unwrap_err();
    assert!(matches!(
        e,
        DockerfileError::Syntax {
            line: 2,
            column: 1,
            ..
        }
    ));
    assert!(
        e.to_string()
            .contains("COPY requires at least two arguments")
    );
    assert!(e.to_string().ends_with("   2 | COPY a"), "{e}");
    assert!(err("FROM a\nARG\n").contains("ARG requires at least one argument"));
    assert!(err("FROM a\nCMD --doit ls\n").contains("unknown flag: doit"));
    assert!(err("").contains("file with no instructions"));
}

#[test]
fn copy_and_add() {
    let Instruction::Copy(c) =
        one("COPY --from=build --chown=1:1 --chmod=755 --link --exclude=*.md --exclude=x a b /d/")
    else {
        panic!()
    };
    assert_eq!(c.sources, ["a", "b"]);
    assert_eq!(c.dest, "/d/");
    assert_eq!(c.from.as_deref(), Some("build"));
    assert_eq!(c.chown.as_deref(), Some("1:1"));
    assert_eq!(c.chmod.as_deref(), Some("755"));
    assert!(c.link && !c.parents);
    assert_eq!(c.exclude, ["*.md", "x"]);
    let Instruction::Add(a) =
        one("ADD --checksum=sha256:abc --keep-git-dir=true [\"a b\", \"/c\"]")
    else {
        panic!()
    };
    assert_eq!(a.sources, ["a b"]);
    assert_eq!(a.checksum.as_deref(), Some("sha256:abc"));
    assert!(a.keep_git_dir);
    assert!(err("FROM a\nADD --from=x a b\n").contains("unknown flag: from"));
    assert!(err("FROM a\nCOPY --link=maybe a b\n").contains("expecting boolean"));
    assert!(err("FROM a\nCOPY --from a b\n").contains("missing a value on flag: from"));
}

#[test]
fn heredocs() {
    let text = "FROM alpine\nRUN <<EOF bash\necho $HOME\n\tindented\nEOF\n\
                COPY <<-\"A\" <<B /dest/\n\tone\n\tA\ntwo\nB\nRUN echo done\n";
    let df = parse(text, "Dockerfile").unwrap();
    assert_eq!(df.steps.len(), 4);
    let Instruction::Run(run) = &df.steps[1].instruction else {
        panic!()
    };
    assert_eq!(run.command, CommandForm::Shell("<<EOF bash".into()));
    assert_eq!(run.heredocs.len(), 1);
    assert_eq!(run.heredocs[0].content, "echo $HOME\n\tindented\n");
    assert!(run.heredocs[0].expand);
    assert_eq!(
        (df.steps[1].node.start_line, df.steps[1].node.end_line),
        (2, 5)
    );
    let Instruction::Copy(c) = &df.steps[2].instruction else {
        panic!()
    };
    assert!(c.sources.is_empty());
    assert_eq!(c.dest, "/dest/");
    let docs: Vec<(&str, &str, bool)> = c
        .heredocs
        .iter()
        .map(|h| (h.name.as_str(), h.content.as_str(), h.expand))
        .collect();
    assert_eq!(docs, [("A", "one\n", false), ("B", "two\n", true)]);
    assert_eq!(df.steps[3].node.start_line, 11);
    assert!(err("FROM a\nRUN <<EOF\nno end\n").contains("unterminated heredoc"));
    // JSON form has no heredocs.
    let df = parse("FROM a\nRUN [\"cat\", \"<<EOF\"]\nEOF\n", "Dockerfile");
    assert!(df.is_err(), "EOF is then an unknown instruction");
}

#[test]
fn env_label_arg() {
    assert_eq!(
        one("ENV A=1 B=\"two words\" C=x\\ y"),
        Instruction::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "\"two words\"".into()),
            ("C".into(), "x\\ y".into()),
        ])
    );
    assert_eq!(
        one("ENV PATH /usr/bin:$PATH"),
        Instruction::Env(vec![("PATH".into(), "/usr/bin:$PATH".into())])
    );
    assert_eq!(
        one("LABEL a=b"),
        Instruction::Label(vec![("a".into(), "b".into())])
    );
    assert_eq!(
        one("ARG A B=2 C="),
        Instruction::Arg(vec![
            ("A".into(), None),
            ("B".into(), Some("2".into())),
            ("C".into(), Some(String::new())),
        ])
    );
    assert!(err("ARG =x\n").contains("ARG names can not be blank"));
    assert!(err("ENV a=b c\n").contains("can't find ="));
}

#[test]
fn commands() {
    assert_eq!(
        one("CMD [\"a\", \"b\"]"),
        Instruction::Cmd(CommandForm::Exec(vec!["a".into(), "b".into()]))
    );
    assert_eq!(
        one("entrypoint exec \"$@\""),
        Instruction::Entrypoint(CommandForm::Shell("exec \"$@\"".into()))
    );
    assert_eq!(one("CMD []"), Instruction::Cmd(CommandForm::Exec(vec![])));
    assert_eq!(
        one("SHELL [\"/bin/bash\", \"-c\"]"),
        Instruction::Shell(vec!["/bin/bash".into(), "-c".into()])
    );
    assert!(err("SHELL /bin/bash -c\n").contains("JSON form"));
    let Instruction::Run(run) =
        one("RUN --mount=type=cache,target=/root/.cache --network=none make")
    else {
        panic!()
    };
    assert_eq!(run.flags.mount, ["type=cache,target=/root/.cache"]);
    assert_eq!(run.flags.network.as_deref(), Some("none"));
    assert_eq!(run.command, CommandForm::Shell("make".into()));
    assert!(err("RUN\n").contains("RUN requires at least one argument"));
}

#[test]
fn simple_instructions() {
    assert_eq!(
        one("EXPOSE 80/tcp 443"),
        Instruction::Expose(vec!["80/tcp".into(), "443".into()])
    );
    assert_eq!(
        one("VOLUME /a /b"),
        Instruction::Volume(vec!["/a".into(), "/b".into()])
    );
    assert_eq!(one("USER app:app"), Instruction::User("app:app".into()));
    assert_eq!(one("WORKDIR /src"), Instruction::Workdir("/src".into()));
    assert_eq!(
        one("STOPSIGNAL SIGTERM"),
        Instruction::StopSignal("SIGTERM".into())
    );
    assert_eq!(
        one("MAINTAINER me <me@x>"),
        Instruction::Maintainer("me <me@x>".into())
    );
    assert!(err("WORKDIR\n").contains("WORKDIR requires exactly one argument"));
    assert!(err("EXPOSE\n").contains("EXPOSE requires at least one argument"));
}

#[test]
fn healthcheck_durations() {
    assert_eq!(
        one("HEALTHCHECK NONE"),
        Instruction::Healthcheck(Healthcheck::None)
    );
    assert_eq!(
        one(
            "HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=1.5s --retries=3 CMD curl -f x"
        ),
        Instruction::Healthcheck(Healthcheck::Cmd(HealthcheckCommand {
            test: CommandForm::Shell("curl -f x".into()),
            interval: 90_000_000_000,
            timeout: 500_000_000,
            start_period: 1_500_000_000,
            start_interval: 0,
            retries: 3,
        }))
    );
    assert!(err("HEALTHCHECK --interval=10us CMD x\n").contains("cannot be less than 1ms"));
    assert!(err("HEALTHCHECK --retries=-1 CMD x\n").contains("cannot be negative"));
    assert!(err("HEALTHCHECK CMD\n").contains("missing command"));
    assert!(err("HEALTHCHECK CONNECT TCP 7000\n").contains("unknown type"));
    assert!(err("HEALTHCHECK --interval=5 CMD x\n").contains("missing unit"));
}

#[test]
fn onbuild() {
    assert_eq!(
        one("ONBUILD RUN make"),
        Instruction::Onbuild("RUN make".into())
    );
    assert_eq!(
        one("ONBUILD COPY <<EOF /x\nhi\nEOF\n"),
        Instruction::Onbuild("COPY <<EOF /x\nhi\nEOF".into())
    );
    assert!(err("ONBUILD ONBUILD RUN x\n").contains("chaining"));
    assert!(err("ONBUILD FROM x\n").contains("isn't allowed as an ONBUILD trigger"));
    assert!(err("ONBUILD COPY a\n").contains("COPY requires"));
}

#[test]
fn directives_and_escape() {
    let df = parse(
        "# syntax=docker/dockerfile:1\n# check=skip=all\n# escape=`\nFROM a\nRUN echo \\\n",
        "Dockerfile",
    )
    .unwrap();
    assert_eq!(df.escape, '`');
    assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1"));
    assert_eq!(df.steps.len(), 2);
    assert!(err("# escape=x\nFROM a\n").contains("invalid escape token"));
    assert!(err("# escape=`\n# escape=`\nFROM a\n").contains("only one escape"));
    // After an instruction, a directive-looking line is a comment.
    let df = parse("FROM a\n# escape=`\nRUN a \\\n  b\n", "Dockerfile").unwrap();
    assert_eq!(df.escape, '\\');
    assert_eq!(df.steps[1].node.original, "RUN a   b");
}

#[test]
fn stages() {
    let df = parse(
        "ARG V=1\nFROM a:$V AS build\nRUN x\nFROM build\nCOPY --from=build /a /b\n",
        "Dockerfile",
    )
    .unwrap();
    let stages = df.stages().unwrap();
    assert_eq!(stages.global_args.len(), 1);
    assert_eq!(stages.stages.len(), 2);
    assert_eq!(stages.stages[0].name.as_deref(), Some("build"));
    assert_eq!(stages.stages[0].base, "a:$V");
    assert_eq!(stages.stages[0].steps.len(), 1);
    assert_eq!(stages.stages[1].base, "build");
    assert_eq!(stages.stages[1].steps.len(), 1);

    let dup = parse("FROM a AS x\nFROM b AS X\n", "Dockerfile").unwrap();
    let e = dup.stages().unwrap_err().to_string();
    assert!(
        e.starts_with("Dockerfile:2:1: duplicate stage name \"x\""),
        "{e}"
    );
    let early = parse("RUN x\nFROM a\n", "Dockerfile").unwrap();
    assert!(
        early
            .stages()
            .unwrap_err()
            .to_string()
            .contains("before the first FROM")
    );
    let none = parse("ARG a\n", "Dockerfile").unwrap();
    assert!(none.stages().unwrap_err().to_string().contains("no FROM"));
}

#[test]
fn expansion_error_located() {
    let df = parse("FROM a\nWORKDIR ${DIR:?set DIR}\n", "Dockerfile").unwrap();
    let step = &df.steps[1];
    let Instruction::Workdir(w) = &step.instruction else {
        panic!()
    };
    let e = expand_word(w, df.escape, |_| None).unwrap_err();
    let located = df.error_at(&step.node, e);
    assert_eq!(
        located.to_string(),
        "Dockerfile:2:1: failed to expand \"${DIR:?set DIR}\": DIR: set DIR\n   2 | WORKDIR ${DIR:?set DIR}"
    );
}

#[test]
fn durations_like_go() {
    use super::instruction::parse_duration;
    assert_eq!(parse_duration("0"), Ok(0));
    assert_eq!(parse_duration("1h2m3.5s"), Ok(3_723_500_000_000));
    assert_eq!(parse_duration("1.5µs"), Ok(1500));
    assert_eq!(parse_duration("-2ms"), Ok(-2_000_000));
    assert!(parse_duration("").is_err());
    assert!(parse_duration("1x").is_err());
    assert!(parse_duration(".s").is_err());
}

#[test]
fn crlf_bom_and_comments_in_continuations() {
    let text = "\u{feff}FROM a\r\nRUN echo a \\\r\n  # a comment\r\n\r\n  b\r\nCOPY <<EOF /x\r\nhi\r\nEOF\r\n";
    let df = parse(text, "Dockerfile").unwrap();
    assert_eq!(df.steps.len(), 3);
    assert_eq!(df.steps[1].node.original, "RUN echo a   b");
    assert_eq!(
        (df.steps[1].node.start_line, df.steps[1].node.end_line),
        (2, 5)
    );
    let Instruction::Copy(c) = &df.steps[2].instruction else {
        panic!()
    };
    assert_eq!(c.heredocs[0].content, "hi\r\n");
    let win = parse("# escape=`\nFROM a\nRUN dir c:\\ `\n  /s\n", "Dockerfile").unwrap();
    assert_eq!(
        win.steps[1].instruction,
        Instruction::Run(Run {
            command: CommandForm::Shell("dir c:\\   /s".into()),
            heredocs: vec![],
            flags: RunFlags::default(),
        })
    );
}
