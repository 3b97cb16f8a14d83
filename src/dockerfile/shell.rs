//! Shell-style word expansion, as Dockerfile instructions apply it to their arguments.
//!
//! Implements the subset of POSIX shell word processing the
//! [Dockerfile reference](https://docs.docker.com/reference/dockerfile/#environment-replacement)
//! describes, with BuildKit's semantics: `$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR-word}`,
//! `${VAR:+word}`, `${VAR+word}`, `${VAR:?msg}`, `${VAR?msg}`, single and double quotes and the
//! escape character. There is no command substitution, globbing or arithmetic.

use super::DockerfileError;

/// Expands `word` into one string: variables substituted, quotes and escapes removed.
///
/// `escape` is the Dockerfile's escape character (`\` unless a `# escape=` directive said
/// otherwise); `lookup` returns a variable's value, `None` when it is unset.
pub fn expand_word<F>(word: &str, escape: char, lookup: F) -> Result<String, DockerfileError>
where
    F: Fn(&str) -> Option<String>,
{
    let mut lexer = Lexer::new(word, escape, &lookup);
    lexer
        .process_stop_on(None, false)
        .map(|(s, _)| s)
        .map_err(|message| expansion_error(word, message))
}

/// Expands `word` and splits the result into words, as the shell form of EXPOSE, VOLUME and
/// friends does: unquoted whitespace (also whitespace that came from a variable) separates
/// words; quoted whitespace does not.
pub fn expand_words<F>(word: &str, escape: char, lookup: F) -> Result<Vec<String>, DockerfileError>
where
    F: Fn(&str) -> Option<String>,
{
    let mut lexer = Lexer::new(word, escape, &lookup);
    lexer
        .process_stop_on(None, false)
        .map(|(_, w)| w)
        .map_err(|message| expansion_error(word, message))
}

/// Expands variables in the body of a heredoc whose delimiter was not quoted.
///
/// Like a shell's here-document: quotes are ordinary characters, and the escape character only
/// escapes `$` and itself; every other character, escape included, is kept as written.
pub fn expand_heredoc<F>(body: &str, escape: char, lookup: F) -> Result<String, DockerfileError>
where
    F: Fn(&str) -> Option<String>,
{
    let mut lexer = Lexer::new(body, escape, &lookup);
    lexer.skip_quotes = true;
    let mut out = String::new();
    while let Some(ch) = lexer.peek() {
        if ch == '$' {
            let value = lexer
                .process_dollar()
                .map_err(|message| expansion_error(body, message))?;
            out.push_str(&value);
            continue;
        }
        lexer.pos += 1;
        if ch == escape
            && let Some(next) = lexer.peek()
            && (next == '$' || next == escape)
        {
            lexer.pos += 1;
            out.push(next);
            continue;
        }
        out.push(ch);
    }
    Ok(out)
}

/// Splits a line into words the way BuildKit looks for heredoc markers: quotes and escapes are
/// kept, variables expand to nothing. Returns an empty list when the line does not lex.
pub(crate) fn raw_words(line: &str) -> Vec<String> {
    let none = |_: &str| None;
    let mut lexer = Lexer::new(line, '\\', &none);
    lexer.raw_quotes = true;
    lexer.raw_escapes = true;
    lexer
        .process_stop_on(None, true)
        .map(|(_, w)| w)
        .unwrap_or_default()
}

/// Lexes a heredoc delimiter word (what follows `<<` or `<<-`): returns the delimiter with
/// quotes removed and whether the body should be expanded (no part of the word was quoted).
/// `None` when the text is not a single word.
pub(crate) fn heredoc_name(rest: &str) -> Result<Option<(String, bool)>, String> {
    let none = |_: &str| None;
    let mut lexer = Lexer::new(rest, '\\', &none);
    lexer.skip_unset = true;
    let (_, words) = lexer.process_stop_on(None, false)?;
    let [word] = words.as_slice() else {
        return Ok(None);
    };
    let mut lexer = Lexer::new(rest, '\\', &none);
    lexer.skip_unset = true;
    lexer.raw_quotes = true;
    let (_, raw) = lexer.process_stop_on(None, false)?;
    let quotes = |s: &str| s.chars().filter(|c| *c == '\'' || *c == '"').count();
    let expand = raw.len() == 1 && quotes(word) == quotes(&raw[0]);
    Ok(Some((word.clone(), expand)))
}

fn expansion_error(word: &str, message: String) -> DockerfileError {
    DockerfileError::Expansion {
        word: word.to_string(),
        message,
    }
}

/// Accumulates the words of [`expand_words`]: whitespace from unquoted text splits, quoted text
/// is added whole.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
    /// Keep quote characters in the output.
    raw_quotes: bool,
    /// Keep escape characters in the output.
    raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    skip_quotes: bool,
    /// Leave references to unset variables as written.
    skip_unset: bool,
}

impl<'a> Lexer<'a> {
    fn new(text: &str, escape: char, lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            escape,
            lookup,
            raw_quotes: false,
            raw_escapes: false,
            skip_quotes: false,
            skip_unset: false,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }

    fn env(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
    }

    /// Processes until `stop` (consumed) or the end of input; returns the word and the words.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let result = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        result
    }

    fn process_stop_on_inner(
        &mut self,
        stop: Option<char>,
    ) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match ch {
                '$' => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                    words.add_string(&value);
                }
                '\'' if !self.skip_quotes => {
                    let value = self.process_single_quote()?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                '"' if !self.skip_quotes => {
                    let value = self.process_double_quote()?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                _ => {
                    self.pos += 1;
                    if ch == self.escape {
                        if self.raw_escapes {
                            words.add_raw_char(ch);
                            result.push(ch);
                        }
                        // An escape at the very end is dropped.
                        let Some(escaped) = self.next() else { break };
                        words.add_raw_char(escaped);
                        result.push(escaped);
                    } else {
                        words.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Result<String, String> {
        // Everything up to the next single quote is literal; a single quote cannot be escaped.
        let mut result = String::new();
        let open = self.next();
        if self.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => {
                    if self.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(ch) => result.push(ch),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, String> {
        // Literal except `$`, and the escape character before `"`, `$` or itself.
        let mut result = String::new();
        let open = self.next();
        if self.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    if self.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(mut ch) => {
                    self.pos += 1;
                    if ch == self.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(next) if next == '"' || next == '$' || next == self.escape => {
                                self.pos += 1;
                                ch = next;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Result<String, String> {
        self.pos += 1; // the '$'
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.env(&name) {
                Some(value) => value,
                None if self.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1; // the '{'
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(ch) = self.next() else {
            return Err("syntax error: missing '}'".into());
        };
        if ch == '}' {
            return Ok(match self.env(&name) {
                Some(value) => value,
                None if self.skip_unset => format!("${{{name}}}"),
                None => String::new(),
            });
        }
        let (null_is_unset, modifier) = if ch == ':' {
            (true, self.next())
        } else {
            (false, Some(ch))
        };
        let shown = match (null_is_unset, modifier) {
            (true, Some(m)) => format!(":{m}"),
            (true, None) => ":".to_string(),
            (false, m) => m.map(String::from).unwrap_or_default(),
        };
        let Some(modifier @ ('-' | '+' | '?')) = modifier else {
            return Err(format!("unsupported modifier ({shown}) in substitution"));
        };
        let word = match self.process_stop_on(Some('}'), false) {
            Ok((word, _)) => word,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let value = self.env(&name);
        if self.skip_unset && value.is_none() {
            return Ok(format!("${{{name}{shown}{word}}}"));
        }
        let unset = match &value {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match modifier {
            '-' => Ok(if unset {
                word
            } else {
                value.unwrap_or_default()
            }),
            '+' => Ok(if unset { String::new() } else { word }),
            _ => {
                if !unset {
                    return Ok(value.unwrap_or_default());
                }
                let message = if !word.is_empty() {
                    word
                } else if value.is_none() {
                    "is not allowed to be unset".into()
                } else {
                    "is not allowed to be empty".into()
                };
                Err(format!("{name}: {message}"))
            }
        }
    }

    /// Reads a variable name: letters, digits and `_`; or a run of digits (a positional
    /// parameter); or one special parameter character.
    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_ascii_digit() {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return ch.to_string();
            }
            if !ch.is_alphanumeric() && ch != '_' {
                break;
            }
            name.push(ch);
            self.pos += 1;
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
        ])
    }

    fn conformance(name: &str) -> Option<String> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/conformance/buildkit/shell/"
        );
        match std::fs::read_to_string(format!("{path}{name}")) {
            Ok(text) => Some(text),
            Err(_) => {
                eprintln!("note: conformance data {path}{name} missing, skipping");
                None
            }
        }
    }

    #[test]
    fn env_var_test() {
        let Some(text) = conformance("envVarTest") else {
            return;
        };
        let env = env();
        let mut checked = 0;
        for line in text.lines() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.splitn(3, '|').collect();
            let [platform, input, expected] = fields[..] else {
                panic!("bad line {line:?}");
            };
            if platform != "A" && platform != "U" {
                continue;
            }
            let (input, expected) = (input.trim(), expected.trim());
            let got = expand_word(input, '\\', |k| env.get(k).map(|v| v.to_string()));
            if expected == "error" {
                assert!(got.is_err(), "{input:?}: expected error, got {got:?}");
            } else {
                assert_eq!(got.as_deref(), Ok(expected), "{input:?}");
            }
            checked += 1;
        }
        assert!(checked > 200, "only {checked} cases");
    }

    #[test]
    fn words_test() {
        let Some(text) = conformance("wordsTest") else {
            return;
        };
        let mut env: HashMap<String, String> = HashMap::new();
        let mut checked = 0;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some(kv) = line.strip_prefix("ENV ") {
                let (k, v) = kv.trim_start().split_once('=').expect("ENV k=v");
                env.insert(k.into(), v.into());
                continue;
            }
            let (input, expected) = line.split_once('|').expect("input|expected");
            let input = input.trim();
            let expected: Vec<&str> = expected.trim_start_matches(' ').split(',').collect();
            let got = expand_words(input, '\\', |k| env.get(k).cloned());
            if expected == ["error"] {
                assert!(got.is_err(), "{input:?}: expected error, got {got:?}");
            } else {
                assert_eq!(got.expect(input), expected, "{input:?}");
            }
            checked += 1;
        }
        assert!(checked > 20);
    }

    #[test]
    fn error_messages() {
        let none = |_: &str| None;
        let err = expand_word("${X:?must be set}", '\\', none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to expand \"${X:?must be set}\": X: must be set"
        );
        let err = expand_word("${X?}", '\\', none).unwrap_err();
        assert!(err.to_string().ends_with("X: is not allowed to be unset"));
    }

    #[test]
    fn backtick_escape() {
        let got = expand_word("a`$B c`\\", '`', |_| Some("x".into())).unwrap();
        assert_eq!(got, "a$B c\\");
    }

    #[test]
    fn heredoc_body() {
        let lookup = |k: &str| (k == "NAME").then(|| "world".to_string());
        let body = "echo \"hello $NAME\" '${NAME}' \\$NAME \\\\ \\n\n";
        assert_eq!(
            expand_heredoc(body, '\\', lookup).unwrap(),
            "echo \"hello world\" 'world' $NAME \\ \\n\n"
        );
    }

    #[test]
    fn heredoc_names() {
        assert_eq!(heredoc_name("EOF").unwrap(), Some(("EOF".into(), true)));
        assert_eq!(
            heredoc_name("\"EOF\"").unwrap(),
            Some(("EOF".into(), false))
        );
        assert_eq!(heredoc_name("'EOF'").unwrap(), Some(("EOF".into(), false)));
        assert_eq!(
            heredoc_name("E\"O\"F").unwrap(),
            Some(("EOF".into(), false))
        );
        assert_eq!(heredoc_name("a b").unwrap(), None);
    }

    #[test]
    fn raw_words_keep_quotes() {
        assert_eq!(
            raw_words("RUN <<EOF cat \"a b\" <<'X'"),
            ["RUN", "<<EOF", "cat", "\"a b\"", "<<'X'"]
        );
    }
}
