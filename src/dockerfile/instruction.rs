//! The meaning layer: a [`Node`] becomes an [`Instruction`].
//!
//! Checks what the [Dockerfile reference](https://docs.docker.com/reference/dockerfile/) asks of
//! each instruction (known keyword, known flags, argument counts) and keeps every word
//! unexpanded: expansion needs the build's ARG and ENV values, so the executor does it.

use std::sync::LazyLock;

use regex::Regex;

use super::parser::{Heredoc, Node, parse_heredoc};

/// How a command is given: exec form (JSON array) or shell form (run by the stage's SHELL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    /// `["executable", "arg", …]`, run as is. Empty for `CMD []` (and a bare `CMD`), which
    /// clears the command.
    Exec(Vec<String>),
    /// `command line`, passed to the shell as one string.
    Shell(String),
}

/// One Dockerfile instruction. Words are as written: the executor expands them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `FROM [--platform=…] image [AS name]`.
    From {
        /// The base image reference, or the name of an earlier stage.
        image: String,
        /// The stage name, lowercase.
        name: Option<String>,
        /// The `--platform` flag.
        platform: Option<String>,
    },
    /// `RUN`.
    Run(Run),
    /// `CMD`.
    Cmd(CommandForm),
    /// `ENTRYPOINT`.
    Entrypoint(CommandForm),
    /// `SHELL ["executable", "arg", …]` (exec form only).
    Shell(Vec<String>),
    /// `COPY`.
    Copy(CopyArgs),
    /// `ADD`.
    Add(CopyArgs),
    /// `ENV key=value …` (or `ENV key value`); values keep their quotes until expanded.
    Env(Vec<(String, String)>),
    /// `ARG name[=default] …`.
    Arg(Vec<(String, Option<String>)>),
    /// `LABEL key=value …`; values keep their quotes until expanded.
    Label(Vec<(String, String)>),
    /// `USER user[:group]`.
    User(String),
    /// `WORKDIR path`.
    Workdir(String),
    /// `EXPOSE port[/proto] …`.
    Expose(Vec<String>),
    /// `VOLUME path …` or `VOLUME ["path", …]`.
    Volume(Vec<String>),
    /// `STOPSIGNAL signal`.
    StopSignal(String),
    /// `HEALTHCHECK NONE` or `HEALTHCHECK [flags] CMD …`.
    Healthcheck(Healthcheck),
    /// `ONBUILD instruction`: the trigger's text (heredoc bodies appended), stored in the image
    /// config and run by builds that use the image as a base.
    Onbuild(String),
    /// `MAINTAINER name` (deprecated; becomes the image author).
    Maintainer(String),
}

/// A RUN instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The command.
    pub command: CommandForm,
    /// Heredocs opened on the RUN line, `<<-` tabs already stripped.
    pub heredocs: Vec<Heredoc>,
    /// The `--mount`, `--network` and `--security` flags.
    pub flags: RunFlags,
}

/// RUN's flags, values kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunFlags {
    /// Every `--mount=…` value, in order.
    pub mount: Vec<String>,
    /// `--network=default|none|host`.
    pub network: Option<String>,
    /// `--security=sandbox|insecure`.
    pub security: Option<String>,
}

/// The arguments of COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyArgs {
    /// Source paths (or URLs for ADD), heredoc markers excluded.
    pub sources: Vec<String>,
    /// The destination.
    pub dest: String,
    /// Sources given inline as heredocs (`COPY <<EOF /dest`); each becomes a file named after
    /// its delimiter, `<<-` tabs already stripped.
    pub heredocs: Vec<Heredoc>,
    /// `--from=stage|image` (COPY only).
    pub from: Option<String>,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=mode`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// Every `--exclude=pattern`.
    pub exclude: Vec<String>,
    /// `--parents` (COPY only).
    pub parents: bool,
    /// `--checksum=digest` (ADD only).
    pub checksum: Option<String>,
    /// `--keep-git-dir` (ADD only).
    pub keep_git_dir: bool,
    /// `--unpack=bool` (ADD only); `None` when not given.
    pub unpack: Option<bool>,
}

/// A HEALTHCHECK instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable any check inherited from the base image.
    None,
    /// `HEALTHCHECK [flags] CMD …`.
    Cmd(HealthcheckCommand),
}

/// The check of `HEALTHCHECK CMD`. Durations are nanoseconds (as in the image config), parsed
/// like Go's `time.ParseDuration` (`30s`, `1m30s`, `500ms`); 0 means "not set, inherit".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthcheckCommand {
    /// The command: exec form becomes `["CMD", …]`, shell form `["CMD-SHELL", …]` in the image.
    pub test: CommandForm,
    /// `--interval`.
    pub interval: u64,
    /// `--timeout`.
    pub timeout: u64,
    /// `--start-period`.
    pub start_period: u64,
    /// `--start-interval`.
    pub start_interval: u64,
    /// `--retries`.
    pub retries: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    List,
}

/// The flags of one instruction, checked against what it accepts.
struct Flags(Vec<(&'static str, Option<String>)>);

impl Flags {
    fn parse(node: &Node, spec: &[(&'static str, Kind)]) -> Result<Flags, String> {
        let mut out: Vec<(&'static str, Option<String>)> = Vec::new();
        for flag in &node.flags {
            let body = flag.strip_prefix("--").unwrap_or(flag);
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let Some(&(name, kind)) = spec.iter().find(|(n, _)| *n == name) else {
                return Err(format!("unknown flag: {name}"));
            };
            match kind {
                Kind::Str if value.is_none() => {
                    return Err(format!("missing a value on flag: {name}"));
                }
                Kind::Str if out.iter().any(|(n, _)| *n == name) => {
                    return Err(format!("duplicate flag specified: {name}"));
                }
                Kind::Bool => {
                    if let Some(v) = &value
                        && !v.eq_ignore_ascii_case("true")
                        && !v.eq_ignore_ascii_case("false")
                    {
                        return Err(format!("expecting boolean value for flag {name}, not: {v}"));
                    }
                }
                _ => {}
            }
            out.push((name, value));
        }
        Ok(Flags(out))
    }

    fn string(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.clone())
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref().is_none_or(|v| v.eq_ignore_ascii_case("true")))
    }

    fn list(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.clone())
            .collect()
    }
}

static STAGE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z][a-z0-9\-_.]*$").expect("stage name regex is valid"));

static ONBUILD_PREFIX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^\s*ONBUILD\s*").expect("onbuild regex is valid"));

const HEALTH_FLAGS: &[(&str, Kind)] = &[
    ("interval", Kind::Str),
    ("timeout", Kind::Str),
    ("start-period", Kind::Str),
    ("start-interval", Kind::Str),
    ("retries", Kind::Str),
];

impl Instruction {
    /// Gives a node its meaning; the error message says what is wrong (the caller adds where).
    pub(crate) fn from_node(node: &Node) -> Result<Instruction, String> {
        let args = node.arg_strings();
        let upper = node.keyword.to_uppercase();
        let no_flags = |node: &Node| Flags::parse(node, &[]).map(|_| ());
        let exactly_one = |args: &[String]| match args {
            [one] => Ok(one.clone()),
            _ => Err(format!("{upper} requires exactly one argument")),
        };
        let at_least_one = |args: &[String]| match args {
            [] => Err(format!("{upper} requires at least one argument")),
            _ => Ok(()),
        };
        Ok(match node.keyword.as_str() {
            "from" => {
                let flags = Flags::parse(node, &[("platform", Kind::Str)])?;
                let name = match args.as_slice() {
                    [_] => None,
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => {
                        let name = name.to_lowercase();
                        if !STAGE_NAME.is_match(&name) {
                            return Err(format!(
                                "invalid name for build stage: {name:?}, name can't start with a \
                                 number or contain symbols"
                            ));
                        }
                        Some(name)
                    }
                    _ => return Err("FROM requires either one or three arguments".into()),
                };
                Instruction::From {
                    image: args[0].clone(),
                    name,
                    platform: flags.string("platform"),
                }
            }
            "run" => {
                let flags = Flags::parse(
                    node,
                    &[
                        ("mount", Kind::List),
                        ("network", Kind::Str),
                        ("security", Kind::Str),
                    ],
                )?;
                at_least_one(&args)?;
                Instruction::Run(Run {
                    command: command_form(node, args),
                    heredocs: node.heredocs.iter().map(chomped).collect(),
                    flags: RunFlags {
                        mount: flags.list("mount"),
                        network: flags.string("network"),
                        security: flags.string("security"),
                    },
                })
            }
            "cmd" => {
                no_flags(node)?;
                Instruction::Cmd(command_form(node, args))
            }
            "entrypoint" => {
                no_flags(node)?;
                Instruction::Entrypoint(command_form(node, args))
            }
            "shell" => {
                no_flags(node)?;
                at_least_one(&args)?;
                if !node.json {
                    return Err("SHELL requires the arguments to be in JSON form".into());
                }
                Instruction::Shell(args)
            }
            "copy" => Instruction::Copy(copy_args(node, args)?),
            "add" => Instruction::Add(copy_args(node, args)?),
            "env" | "label" => {
                no_flags(node)?;
                at_least_one(&args)?;
                let pairs: Vec<(String, String)> = match &node.args {
                    super::Args::Pairs(pairs) => pairs
                        .iter()
                        .map(|p| (p.key.clone(), p.value.clone()))
                        .collect(),
                    _ => Vec::new(),
                };
                if pairs.iter().any(|(k, _)| k.is_empty()) {
                    return Err(format!("{upper} names can not be blank"));
                }
                if node.keyword == "env" {
                    Instruction::Env(pairs)
                } else {
                    Instruction::Label(pairs)
                }
            }
            "arg" => {
                no_flags(node)?;
                at_least_one(&args)?;
                let pairs = args
                    .iter()
                    .map(|a| match a.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (a.clone(), None),
                    })
                    .collect::<Vec<_>>();
                if pairs.iter().any(|(k, _)| k.is_empty()) {
                    return Err("ARG names can not be blank".into());
                }
                Instruction::Arg(pairs)
            }
            "user" => {
                no_flags(node)?;
                Instruction::User(exactly_one(&args)?)
            }
            "workdir" => {
                no_flags(node)?;
                Instruction::Workdir(exactly_one(&args)?)
            }
            "stopsignal" => {
                no_flags(node)?;
                Instruction::StopSignal(exactly_one(&args)?)
            }
            "maintainer" => {
                no_flags(node)?;
                Instruction::Maintainer(exactly_one(&args)?)
            }
            "expose" => {
                no_flags(node)?;
                at_least_one(&args)?;
                Instruction::Expose(args)
            }
            "volume" => {
                no_flags(node)?;
                at_least_one(&args)?;
                if args.iter().any(|a| a.trim().is_empty()) {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                Instruction::Volume(args)
            }
            "healthcheck" => Instruction::Healthcheck(healthcheck(node, &args)?),
            "onbuild" => onbuild(node, &args)?,
            _ => {
                let written = node.original.split_whitespace().next().unwrap_or_default();
                return Err(format!("unknown instruction: {written}"));
            }
        })
    }
}

fn command_form(node: &Node, args: Vec<String>) -> CommandForm {
    if node.json || args.is_empty() {
        CommandForm::Exec(args)
    } else {
        CommandForm::Shell(args.join(" "))
    }
}

fn chomped(heredoc: &Heredoc) -> Heredoc {
    let mut heredoc = heredoc.clone();
    if heredoc.chomp {
        heredoc.content = heredoc.chomped();
    }
    heredoc
}

fn copy_args(node: &Node, args: Vec<String>) -> Result<CopyArgs, String> {
    let upper = node.keyword.to_uppercase();
    let add = node.keyword == "add";
    let spec: &[(&str, Kind)] = if add {
        &[
            ("chown", Kind::Str),
            ("chmod", Kind::Str),
            ("link", Kind::Bool),
            ("exclude", Kind::List),
            ("checksum", Kind::Str),
            ("keep-git-dir", Kind::Bool),
            ("unpack", Kind::Bool),
        ]
    } else {
        &[
            ("from", Kind::Str),
            ("chown", Kind::Str),
            ("chmod", Kind::Str),
            ("link", Kind::Bool),
            ("exclude", Kind::List),
            ("parents", Kind::Bool),
        ]
    };
    let flags = Flags::parse(node, spec)?;
    let Some((dest, sources)) = args.split_last() else {
        return Err(format!("{upper} requires at least two arguments"));
    };
    if sources.is_empty() {
        return Err(format!(
            "{upper} requires at least two arguments, but only one was provided; destination \
             could not be determined"
        ));
    }
    if !node.json && parse_heredoc(dest)?.is_some() {
        return Err(format!("{upper} cannot accept a heredoc as a destination"));
    }
    let mut out = CopyArgs {
        dest: dest.clone(),
        from: flags.string("from"),
        chown: flags.string("chown"),
        chmod: flags.string("chmod"),
        link: flags.bool("link").unwrap_or(false),
        exclude: flags.list("exclude"),
        parents: flags.bool("parents").unwrap_or(false),
        checksum: flags.string("checksum"),
        keep_git_dir: flags.bool("keep-git-dir").unwrap_or(false),
        unpack: flags.bool("unpack"),
        ..CopyArgs::default()
    };
    for src in sources {
        let marker = if node.json { None } else { parse_heredoc(src)? };
        match marker {
            Some(marker) => {
                let Some(doc) = node.heredocs.iter().find(|h| h.name == marker.name) else {
                    return Err(format!("no body found for heredoc {}", marker.name));
                };
                out.heredocs.push(chomped(doc));
            }
            None => out.sources.push(src.clone()),
        }
    }
    Ok(out)
}

fn healthcheck(node: &Node, args: &[String]) -> Result<Healthcheck, String> {
    let Some((kind, rest)) = args.split_first() else {
        return Err("HEALTHCHECK requires at least one argument".into());
    };
    let flags = Flags::parse(node, HEALTH_FLAGS)?;
    match kind.to_uppercase().as_str() {
        "NONE" if rest.is_empty() => Ok(Healthcheck::None),
        "NONE" => Err("HEALTHCHECK NONE takes no arguments".into()),
        "CMD" => {
            if rest.is_empty() {
                return Err("missing command after HEALTHCHECK CMD".into());
            }
            let duration = |name: &str| -> Result<u64, String> {
                let Some(value) = flags.string(name).filter(|v| !v.is_empty()) else {
                    return Ok(0);
                };
                let nanos = parse_duration(&value).map_err(|e| format!("--{name}: {e}"))?;
                match nanos {
                    0 => Ok(0),
                    n if n < 1_000_000 => Err(format!("interval --{name} cannot be less than 1ms")),
                    n => Ok(n as u64),
                }
            };
            let retries = match flags.string("retries").filter(|v| !v.is_empty()) {
                None => 0,
                Some(v) => {
                    let n: i32 = v
                        .parse()
                        .map_err(|_| format!("--retries: invalid number {v:?}"))?;
                    u32::try_from(n).map_err(|_| format!("--retries cannot be negative ({n})"))?
                }
            };
            Ok(Healthcheck::Cmd(HealthcheckCommand {
                test: command_form(node, rest.to_vec()),
                interval: duration("interval")?,
                timeout: duration("timeout")?,
                start_period: duration("start-period")?,
                start_interval: duration("start-interval")?,
                retries,
            }))
        }
        _ => Err(format!("unknown type {kind:?} in HEALTHCHECK (try CMD)")),
    }
}

fn onbuild(node: &Node, args: &[String]) -> Result<Instruction, String> {
    let super::Args::Trigger(trigger) = &node.args else {
        return Err(format!(
            "{} requires at least one argument",
            node.keyword.to_uppercase()
        ));
    };
    Flags::parse(node, &[])?;
    let upper = args.first().map(|a| a.to_uppercase()).unwrap_or_default();
    match upper.as_str() {
        "ONBUILD" => return Err("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into()),
        "MAINTAINER" | "FROM" => {
            return Err(format!("{upper} isn't allowed as an ONBUILD trigger"));
        }
        _ => {}
    }
    // Check the trigger now rather than in every build that uses the image.
    let mut inner = (**trigger).clone();
    inner.heredocs = node.heredocs.clone();
    Instruction::from_node(&inner)?;
    let mut text = ONBUILD_PREFIX.replace(&node.original, "").into_owned();
    for heredoc in &node.heredocs {
        text.push('\n');
        text.push_str(&heredoc.content);
        text.push_str(&heredoc.name);
    }
    Ok(Instruction::Onbuild(text))
}

/// Parses a duration like Go's `time.ParseDuration` (`300ms`, `1.5h`, `2h45m`, `-1s`, `0`) into
/// nanoseconds.
pub(crate) fn parse_duration(s: &str) -> Result<i128, String> {
    let invalid = || format!("invalid duration {s:?}");
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in duration {s:?}")),
            _ => return Err(format!("unknown unit {unit:?} in duration {s:?}")),
        };
        let int: i128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        let mut value = int.checked_mul(scale).ok_or_else(invalid)?;
        let mut frac_scale = scale;
        for digit in frac.bytes().take(30) {
            frac_scale /= 10;
            value += i128::from(digit - b'0') * frac_scale;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i128::from(i64::MAX) {
            return Err(invalid());
        }
        rest = after;
    }
    Ok(if negative { -total } else { total })
}
