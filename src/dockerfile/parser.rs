//! The syntax layer: Dockerfile text → [`Node`]s, one per instruction.
//!
//! Follows the [Dockerfile reference](https://docs.docker.com/reference/dockerfile/#format) and
//! agrees with BuildKit's parser on its test data: parser directives, comments, line
//! continuations, flags, exec (JSON) vs shell form, `key=value` pairs and heredocs. Instruction
//! names are not checked here; [`super::Instruction`] does that.

use std::sync::LazyLock;

use regex::Regex;

use super::{DockerfileError, shell};

/// A Dockerfile split into instructions, before any meaning is given to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ast {
    /// The escape character: `\`, or `` ` `` after `# escape=``.
    pub escape: char,
    /// The value of a `# syntax=` directive, if any; strata does not load frontends, so the
    /// caller may warn about it.
    pub syntax: Option<String>,
    /// The instructions, in order.
    pub nodes: Vec<Node>,
}

/// One instruction as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The instruction keyword, lowercase (`run`, `copy`, …); not checked against the known ones.
    pub keyword: String,
    /// First line of the instruction (1-based).
    pub start_line: usize,
    /// Last line of the instruction, continuation lines and heredoc bodies included.
    pub end_line: usize,
    /// Column of the keyword on `start_line` (1-based).
    pub column: usize,
    /// The instruction text with continuations joined and comment lines removed; what image
    /// history records and error messages quote.
    pub original: String,
    /// `--name[=value]` flags that started the arguments, as written (quotes removed).
    pub flags: Vec<String>,
    /// The arguments.
    pub args: Args,
    /// Whether the arguments were given in exec (JSON array) form.
    pub json: bool,
    /// Heredocs the instruction opened, bodies as written (see [`Heredoc`]).
    pub heredocs: Vec<Heredoc>,
}

/// The arguments of a [`Node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Args {
    /// A list of strings: the JSON array's elements; the words of whitespace-separated
    /// instructions (FROM, EXPOSE, ARG, shell-form COPY/ADD/VOLUME); or the single rest of the
    /// line for shell-form RUN/CMD/ENTRYPOINT and one-argument instructions. For HEALTHCHECK,
    /// the type (`CMD`, `NONE`) followed by the command. Quotes and escapes are kept as written.
    Words(Vec<String>),
    /// ENV and LABEL pairs.
    Pairs(Vec<Pair>),
    /// The instruction ONBUILD wraps.
    Trigger(Box<Node>),
}

/// One `key=value` (or old-style `key value`) pair of ENV or LABEL, quotes kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The key.
    pub key: String,
    /// The value; for the old `ENV key value` form, the whole rest of the line.
    pub value: String,
    /// Whether the pair was written `key=value` (rather than the old `key value`).
    pub equals: bool,
}

/// A heredoc: `<<NAME` (or `<<-NAME`) on an instruction line and the body that follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter, quotes removed.
    pub name: String,
    /// The body, every line with its newline. In a [`Node`] it is as written; in a typed
    /// [`super::Instruction`] the leading tabs of `<<-` heredocs are already stripped.
    pub content: String,
    /// Whether variables in the body should be expanded (the delimiter was not quoted); see
    /// [`super::expand_heredoc`].
    pub expand: bool,
    /// Whether it was opened with `<<-` (strip leading tabs of each line).
    pub chomp: bool,
}

impl Heredoc {
    /// The body with leading tabs stripped from every line, as `<<-` asks.
    pub fn chomped(&self) -> String {
        self.content
            .split_inclusive('\n')
            .map(|l| l.trim_start_matches('\t'))
            .collect()
    }
}

impl Node {
    fn can_contain_heredoc(&self) -> bool {
        let node = match &self.args {
            Args::Trigger(inner) if self.keyword == "onbuild" => inner,
            _ => self,
        };
        matches!(node.keyword.as_str(), "run" | "copy" | "add") && !node.json
    }

    /// The arguments as a list of strings; ENV/LABEL pairs become key, value, separator triples
    /// and a trigger its keyword followed by its arguments, as BuildKit's instruction parser
    /// sees them.
    pub fn arg_strings(&self) -> Vec<String> {
        match &self.args {
            Args::Words(w) => w.clone(),
            Args::Pairs(pairs) => pairs
                .iter()
                .flat_map(|p| {
                    let sep = if p.equals { "=" } else { "" };
                    [p.key.clone(), p.value.clone(), sep.to_string()]
                })
                .collect(),
            Args::Trigger(node) => std::iter::once(node.keyword.to_uppercase())
                .chain(node.arg_strings())
                .collect(),
        }
    }
}

/// Parses Dockerfile text into instructions, checking only syntax.
///
/// `file` names the Dockerfile in error messages. Fails on an empty file (no instructions),
/// malformed parser directives, ENV/LABEL without value, JSON arrays holding non-strings and
/// unterminated heredocs.
pub fn parse_ast(text: &str, file: &str) -> Result<Ast, DockerfileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let error = |line: usize, message: String| DockerfileError::at(file, &lines, line, 1, message);

    let mut directives = Directives::default();
    let mut nodes = Vec::new();
    let mut next = 0; // index of the next line to read; also the number of lines read
    while next < lines.len() {
        let token = trim_newline(lines[next]).trim_start();
        directives.process(token).map_err(|m| error(next + 1, m))?;
        next += 1;
        let start_line = next;
        let escape = directives.escape;
        let token = if is_comment(token) { "" } else { token };
        let (line, mut end) = trim_continuation(token, escape);
        if end && line.is_empty() {
            continue;
        }

        let mut buf = line.to_string();
        while !end && next < lines.len() {
            let raw = trim_newline(lines[next]);
            directives.process(raw).map_err(|m| error(next + 1, m))?;
            next += 1;
            if is_comment(raw) || raw.trim_start().is_empty() {
                // BuildKit skips comment and empty lines inside a continuation.
                continue;
            }
            let (part, e) = trim_continuation(raw, escape);
            end = e;
            buf.push_str(part);
        }

        let mut node = node_from_line(&buf, escape).map_err(|m| error(start_line, m))?;
        let first = lines[start_line - 1];
        node.column = first.chars().take_while(|c| c.is_whitespace()).count() + 1;
        node.start_line = start_line;

        if node.can_contain_heredoc() && line.contains("<<") {
            for mut heredoc in heredocs_from_line(line).map_err(|m| error(start_line, m))? {
                let mut terminated = false;
                while next < lines.len() {
                    let raw = lines[next];
                    next += 1;
                    let mut candidate = trim_newline(raw);
                    if heredoc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == heredoc.name {
                        terminated = true;
                        break;
                    }
                    heredoc.content.push_str(raw);
                }
                if !terminated {
                    return Err(error(start_line, "unterminated heredoc".into()));
                }
                node.heredocs.push(heredoc);
            }
        }
        node.end_line = next;
        if let Args::Trigger(inner) = &mut node.args {
            inner.start_line = node.start_line;
            inner.end_line = node.end_line;
            inner.column = node.column;
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(error(next.max(1), "file with no instructions".into()));
    }
    Ok(Ast {
        escape: directives.escape,
        syntax: directives.syntax,
        nodes,
    })
}

/// Parser directives (`# escape=`, `# syntax=`, `# check=`): only before anything else.
struct Directives {
    escape: char,
    syntax: Option<String>,
    seen: Vec<String>,
    done: bool,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            seen: Vec::new(),
            done: false,
        }
    }
}

static DIRECTIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$").expect("directive regex is valid")
});

impl Directives {
    fn process(&mut self, line: &str) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        let Some(caps) = DIRECTIVE.captures(line) else {
            self.done = true;
            return Ok(());
        };
        let key = caps[1].to_lowercase();
        let value = caps[2].to_string();
        if !matches!(key.as_str(), "escape" | "syntax" | "check") {
            self.done = true;
            return Ok(());
        }
        if self.seen.contains(&key) {
            return Err(format!("only one {key} parser directive can be used"));
        }
        self.seen.push(key.clone());
        match key.as_str() {
            "escape" => {
                self.escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ => {
                        return Err(format!(
                            "invalid escape token '{value}' does not match ` or \\"
                        ));
                    }
                }
            }
            "syntax" => self.syntax = Some(value),
            _ => {} // `check` configures BuildKit's linter; strata has none.
        }
        Ok(())
    }
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    trim_newline(line).trim_start().starts_with('#')
}

/// Strips a trailing line-continuation escape (and the blanks after it). The escape continues
/// the line unless it is itself escaped, like BuildKit's `([^\\])\\[ \t]*$|^\\[ \t]*$`.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    if let Some(before) = trimmed.strip_suffix(escape)
        && !before.ends_with(escape)
    {
        return (before, false);
    }
    (line, true)
}

fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{b}' | '\u{c}' | '\r')
}

/// Splits on runs of blanks, like BuildKit's `[\t\v\f\r ]+`.
fn split_blanks(s: &str) -> Vec<String> {
    s.split(is_separator)
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

fn node_from_line(line: &str, escape: char) -> Result<Node, String> {
    let trimmed = line.trim();
    let (cmd, rest) = match trimmed.find(is_separator) {
        Some(i) => (
            &trimmed[..i],
            Some(trimmed[i..].trim_start_matches(is_separator)),
        ),
        None => (trimmed, None),
    };
    let (args, flags) = match rest {
        Some(rest) => extract_flags(rest),
        None => (String::new(), Vec::new()),
    };
    let rest = args.trim();
    let keyword = cmd.to_lowercase();
    let (args, json) = match keyword.as_str() {
        "add" | "copy" | "volume" => match parse_json(rest)? {
            Some(words) => (words, true),
            None => (split_blanks(rest), false),
        },
        "cmd" | "entrypoint" | "run" | "shell" => maybe_json(rest)?,
        "env" | "label" => {
            let pairs = parse_pairs(rest, &keyword, escape)?;
            return Ok(new_node(keyword, line, flags, Args::Pairs(pairs), false));
        }
        "arg" => (parse_words(rest, escape), false),
        "expose" | "from" => (split_blanks(rest), false),
        "healthcheck" => {
            let (kind, cmd) = match rest.find(char::is_whitespace) {
                Some(i) => (&rest[..i], rest[i..].trim_start()),
                None => (rest, ""),
            };
            if kind.is_empty() {
                (Vec::new(), false)
            } else {
                let (mut words, json) = maybe_json(cmd)?;
                words.insert(0, kind.to_string());
                (words, json)
            }
        }
        "onbuild" if !rest.is_empty() => {
            let inner = node_from_line(rest, escape)?;
            return Ok(new_node(
                keyword,
                line,
                flags,
                Args::Trigger(Box::new(inner)),
                false,
            ));
        }
        "maintainer" | "stopsignal" | "user" | "workdir" | "onbuild" => {
            (non_empty(rest).into_iter().collect(), false)
        }
        _ => (Vec::new(), false),
    };
    Ok(new_node(keyword, line, flags, Args::Words(args), json))
}

fn new_node(keyword: String, line: &str, flags: Vec<String>, args: Args, json: bool) -> Node {
    Node {
        keyword,
        start_line: 0,
        end_line: 0,
        column: 1,
        original: line.to_string(),
        flags,
        args,
        json,
        heredocs: Vec::new(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Exec form if `rest` is a JSON array of strings, else shell form (the whole rest).
fn maybe_json(rest: &str) -> Result<(Vec<String>, bool), String> {
    Ok(match parse_json(rest)? {
        Some(words) => (words, true),
        None => (non_empty(rest).into_iter().collect(), false),
    })
}

/// `Ok(None)` when `rest` is not a JSON array (shell form); an error when it is one but holds
/// something other than strings.
fn parse_json(rest: &str) -> Result<Option<Vec<String>>, String> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str(rest) else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|item| match item {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(
                "when using JSON array syntax, arrays must be comprised of strings only"
                    .to_string(),
            ),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Takes the leading `--flag[=value]` words off `line`; returns the rest and the flags. A bare
/// `--` ends the flags.
fn extract_flags(line: &str) -> (String, Vec<String>) {
    let chars: Vec<char> = line.chars().collect();
    let mut flags = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut blank_ok = false;
    let mut in_word = false;
    let mut pos = 0;
    let rest = |pos: usize| chars[pos..].iter().collect::<String>();
    while pos < chars.len() {
        let ch = chars[pos];
        if !in_word {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            if ch != '-' || chars.get(pos + 1) != Some(&'-') {
                return (rest(pos), flags);
            }
            in_word = true;
        }
        if let Some(q) = quote {
            if ch == q {
                quote = None;
            } else if ch == '\\' {
                pos += 1;
                match chars.get(pos) {
                    Some(&c) => word.push(c),
                    None => quote = None,
                }
            } else {
                word.push(ch);
            }
            pos += 1;
            continue;
        }
        if ch.is_whitespace() {
            in_word = false;
            if word == "--" {
                return (rest(pos), flags);
            }
            if blank_ok || !word.is_empty() {
                flags.push(std::mem::take(&mut word));
            }
            word.clear();
            blank_ok = false;
        } else if ch == '\'' || ch == '"' {
            quote = Some(ch);
            blank_ok = true;
        } else if ch == '\\' {
            if let Some(&c) = chars.get(pos + 1) {
                word.push(c);
                pos += 1;
            }
        } else {
            word.push(ch);
        }
        pos += 1;
    }
    if in_word && word != "--" && (blank_ok || !word.is_empty()) {
        flags.push(word);
    }
    (String::new(), flags)
}

/// Splits on whitespace outside quotes, keeping quotes and escapes as written (ENV, LABEL, ARG).
fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut blank_ok = false;
    let mut pos = 0;
    while pos < chars.len() {
        let mut ch = chars[pos];
        if !in_word {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            in_word = true;
        }
        match quote {
            None => {
                if ch.is_whitespace() {
                    in_word = false;
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    blank_ok = false;
                    pos += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    quote = Some(ch);
                    blank_ok = true;
                }
                if ch == escape {
                    if pos + 1 == chars.len() {
                        pos += 1;
                        continue; // an escape at the very end is dropped
                    }
                    // Unquoted, an escape keeps itself and the next character, even a quote.
                    word.push(ch);
                    pos += 1;
                    ch = chars[pos];
                }
                word.push(ch);
            }
            Some(q) => {
                if ch == q {
                    quote = None;
                }
                // Inside single quotes the escape is an ordinary character.
                if ch == escape && q != '\'' {
                    if pos + 1 == chars.len() {
                        quote = None;
                        pos += 1;
                        continue;
                    }
                    word.push(ch);
                    pos += 1;
                    ch = chars[pos];
                }
                word.push(ch);
            }
        }
        pos += 1;
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

fn parse_pairs(rest: &str, keyword: &str, escape: char) -> Result<Vec<Pair>, String> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        // Old form: `ENV key value…`, the value being the rest of the line.
        let Some(i) = rest.find(is_separator) else {
            return Err(format!(
                "{} must have two arguments",
                keyword.to_uppercase()
            ));
        };
        return Ok(vec![Pair {
            key: rest[..i].to_string(),
            value: rest[i..].trim_start_matches(is_separator).to_string(),
            equals: false,
        }]);
    }
    words
        .into_iter()
        .map(|word| match word.split_once('=') {
            Some((k, v)) => Ok(Pair {
                key: k.to_string(),
                value: v.to_string(),
                equals: true,
            }),
            None => Err(format!(
                "syntax error - can't find = in {word:?}; must be of the form: name=value"
            )),
        })
        .collect()
}

static HEREDOC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(\d*)<<(-?)([^<]*)$").expect("heredoc regex is valid"));

/// Parses one word as a heredoc marker (`<<EOF`, `<<-EOF`, `<<"EOF"`); `Ok(None)` if it is not
/// one. The body is left empty.
pub(crate) fn parse_heredoc(word: &str) -> Result<Option<Heredoc>, String> {
    let Some(caps) = HEREDOC.captures(word) else {
        return Ok(None);
    };
    if caps[1].parse::<u64>().unwrap_or(0) != 0 {
        return Err("file descriptor heredocs are not supported".into());
    }
    let chomp = &caps[2] == "-";
    let rest = &caps[3];
    if rest.is_empty() {
        return Ok(None);
    }
    Ok(shell::heredoc_name(rest)?.map(|(name, expand)| Heredoc {
        name,
        content: String::new(),
        expand,
        chomp,
    }))
}

fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let mut docs = Vec::new();
    for word in shell::raw_words(line) {
        docs.extend(parse_heredoc(&word)?);
    }
    Ok(docs)
}
