//! Glob patterns over `/`-separated relative paths.
//!
//! Two dialects share one parser:
//!
//! - [`Pattern::new`] is the dialect of `.dockerignore` and `COPY --exclude`, moby's
//!   [`patternmatcher`](https://github.com/moby/patternmatcher/blob/main/patternmatcher.go):
//!   Go [`filepath.Match`](https://pkg.go.dev/path/filepath#Match) syntax, plus `**`, which
//!   matches any number of path components (`**/` may match none, a trailing `**` at least one).
//! - [`Pattern::filepath`] is plain `filepath.Match`, which `COPY` uses for source wildcards;
//!   there `**` is just two `*`.
//!
//! In both, `*` and `?` never match `/`, `[...]` is a class of characters and ranges negated by
//! a leading `^` (as in Go, `!` is an ordinary character), `\` makes the next character literal,
//! and a pattern must match the whole path.

use regex::Regex;

use super::SourceError;

/// Characters that make a path component something other than a literal name.
const META: &[char] = &['*', '?', '[', ']', '\\'];

/// A compiled glob pattern.
#[derive(Clone, Debug)]
pub struct Pattern {
    text: String,
    matcher: Matcher,
    /// Leading components free of metacharacters; used to decide whether the pattern could
    /// match anything below a directory.
    literal_prefix: Vec<String>,
    /// Whether every component is literal.
    all_literal: bool,
}

#[derive(Clone, Debug)]
enum Matcher {
    Regex(Regex),
    /// moby's fast path for `**` followed by literal text that does not start with `/`:
    /// a plain string-suffix test, so `**.txt` matches `a/b.txt` at any depth (and `**foo`
    /// matches `barfoo`). Kept because it is what `docker build` does.
    Suffix(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Dockerignore,
    Filepath,
}

impl Pattern {
    /// Parses a pattern in the `.dockerignore` dialect (with `**`).
    ///
    /// The pattern is used as written: callers that read ignore files clean it first (see
    /// [`Dockerignore`](super::Dockerignore)).
    pub fn new(pattern: &str) -> Result<Pattern, SourceError> {
        Pattern::compile(pattern, Dialect::Dockerignore)
    }

    /// Parses a pattern with Go `filepath.Match` semantics only, where `**` means the same as
    /// `*`: the rule for `COPY` source wildcards.
    pub fn filepath(pattern: &str) -> Result<Pattern, SourceError> {
        Pattern::compile(pattern, Dialect::Filepath)
    }

    /// Whether the pattern matches the whole of `rel_path`, a `/`-separated relative path.
    pub fn matches(&self, rel_path: &str) -> bool {
        match &self.matcher {
            Matcher::Regex(re) => re.is_match(rel_path),
            Matcher::Suffix(suffix) => rel_path.ends_with(suffix.as_str()),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern might match some path strictly below the directory whose
    /// components are `dir`. Conservative: `true` unless the pattern's literal leading
    /// components rule it out.
    pub(crate) fn could_match_below(&self, dir: &[&str]) -> bool {
        let diverges = self
            .literal_prefix
            .iter()
            .zip(dir)
            .any(|(pat, name)| pat != name);
        if diverges {
            return false;
        }
        if self.all_literal {
            return self.literal_prefix.len() > dir.len();
        }
        true
    }

    fn compile(pattern: &str, dialect: Dialect) -> Result<Pattern, SourceError> {
        let bad = |reason| SourceError::Pattern {
            pattern: pattern.to_owned(),
            reason,
        };
        // Validate (and translate) the whole pattern even when the suffix fast path applies,
        // so errors do not depend on which matcher is used.
        let regex = translate(pattern, dialect).map_err(bad)?;
        let matcher = match suffix_fast_path(pattern, dialect) {
            Some(suffix) => Matcher::Suffix(suffix.to_owned()),
            None => Matcher::Regex(
                Regex::new(&regex)
                    .map_err(|_| bad("cannot be compiled to a regular expression"))?,
            ),
        };
        let components: Vec<&str> = pattern.split('/').collect();
        let literal_prefix: Vec<String> = components
            .iter()
            .take_while(|c| !c.contains(META))
            .map(|c| (*c).to_owned())
            .collect();
        let all_literal = literal_prefix.len() == components.len();
        Ok(Pattern {
            text: pattern.to_owned(),
            matcher,
            literal_prefix,
            all_literal,
        })
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `s` contains an unescaped glob metacharacter (`*`, `?` or `[`), i.e. whether a
/// `COPY` source is a wildcard rather than a path. Mirrors BuildKit's `containsWildcards`.
pub fn has_glob_meta(s: &str) -> bool {
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// moby `patternmatcher` treats a pattern that starts with `**` and continues with plain text
/// as a string-suffix test; returns that text when the shortcut applies and differs from the
/// regular expression (a `**/` prefix is equivalent either way).
fn suffix_fast_path(pattern: &str, dialect: Dialect) -> Option<&str> {
    if dialect != Dialect::Dockerignore {
        return None;
    }
    let rest = pattern.strip_prefix("**")?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(META) {
        return None;
    }
    Some(rest)
}

/// Translates a glob into an anchored regular expression, validating it the way Go's
/// `filepath.Match` does (`ErrBadPattern`).
fn translate(pattern: &str, dialect: Dialect) -> Result<String, &'static str> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut re = String::from("(?s)^");
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if dialect == Dialect::Dockerignore && chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                // As moby: `**` at the end matches anything (so `dir/**` needs something after
                // `dir/`); elsewhere `**/` matches zero or more whole components.
                re.push_str(if i == chars.len() { ".*" } else { "(?:.*/)?" });
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '\\' => {
                let escaped = chars.get(i).ok_or("trailing backslash")?;
                i += 1;
                push_literal(&mut re, *escaped);
            }
            '[' => i = translate_class(&chars, i, &mut re)?,
            c => push_literal(&mut re, c),
        }
    }
    re.push('$');
    Ok(re)
}

/// Translates the class starting after its `[` at `chars[i]`; returns the index after `]`.
fn translate_class(chars: &[char], mut i: usize, re: &mut String) -> Result<usize, &'static str> {
    re.push('[');
    if chars.get(i) == Some(&'^') {
        re.push('^');
        i += 1;
    }
    let mut ranges = 0;
    loop {
        if chars.get(i) == Some(&']') && ranges > 0 {
            re.push(']');
            return Ok(i + 1);
        }
        let (lo, next) = class_char(chars, i)?;
        i = next;
        push_literal(re, lo);
        if chars.get(i) == Some(&'-') {
            let (hi, next) = class_char(chars, i + 1)?;
            i = next;
            if hi < lo {
                return Err("character class range is out of order");
            }
            re.push('-');
            push_literal(re, hi);
        }
        ranges += 1;
    }
}

/// One (possibly escaped) character of a class, as Go's `getEsc`.
fn class_char(chars: &[char], i: usize) -> Result<(char, usize), &'static str> {
    match chars.get(i) {
        None => Err("unterminated character class"),
        Some('-') | Some(']') => Err("'-' or ']' must be escaped in a character class"),
        Some('\\') => match chars.get(i + 1) {
            None => Err("unterminated character class"),
            Some(c) => Ok((*c, i + 2)),
        },
        Some(c) => Ok((*c, i + 1)),
    }
}

fn push_literal(re: &mut String, c: char) {
    let mut buf = [0; 4];
    re.push_str(&regex::escape(c.encode_utf8(&mut buf)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Go's `filepath.Match` test table (path/filepath/match_test.go), as far as it applies to
    /// Unix paths; `None` means the pattern is malformed.
    const GO_MATCH: &[(&str, &str, Option<bool>)] = &[
        ("abc", "abc", Some(true)),
        ("*", "abc", Some(true)),
        ("*c", "abc", Some(true)),
        ("a*", "a", Some(true)),
        ("a*", "abc", Some(true)),
        ("a*", "ab/c", Some(false)),
        ("a*/b", "abc/b", Some(true)),
        ("a*/b", "a/c/b", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
        ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)),
        ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
        ("ab[c]", "abc", Some(true)),
        ("ab[b-d]", "abc", Some(true)),
        ("ab[e-g]", "abc", Some(false)),
        ("ab[^c]", "abc", Some(false)),
        ("ab[^b-d]", "abc", Some(false)),
        ("ab[^e-g]", "abc", Some(true)),
        ("a\\*b", "a*b", Some(true)),
        ("a\\*b", "ab", Some(false)),
        ("a?b", "a☺b", Some(true)),
        ("a[^a]b", "a☺b", Some(true)),
        ("a???b", "a☺b", Some(false)),
        ("a[^a][^a][^a]b", "a☺b", Some(false)),
        ("[a-ζ]*", "α", Some(true)),
        ("*[a-ζ]", "A", Some(false)),
        ("a?b", "a/b", Some(false)),
        ("a*b", "a/b", Some(false)),
        ("[\\]a]", "]", Some(true)),
        ("[\\-]", "-", Some(true)),
        ("[x\\-]", "x", Some(true)),
        ("[x\\-]", "-", Some(true)),
        ("[x\\-]", "z", Some(false)),
        ("[\\-x]", "x", Some(true)),
        ("[\\-x]", "-", Some(true)),
        ("[\\-x]", "a", Some(false)),
        ("[]a]", "]", None),
        ("[-]", "-", None),
        ("[x-]", "x", None),
        ("[-x]", "x", None),
        ("\\", "a", None),
        ("[a-b-c]", "a", None),
        ("[", "a", None),
        ("[^", "a", None),
        ("[^bc", "a", None),
        ("a[", "a", None),
        ("a/b[", "x", None),
        ("*x", "xxx", Some(true)),
    ];

    #[test]
    fn go_filepath_match_table() {
        for dialect in [Pattern::new, Pattern::filepath] {
            for &(pat, path, want) in GO_MATCH {
                match (dialect(pat), want) {
                    (Ok(p), Some(want)) => {
                        assert_eq!(p.matches(path), want, "{pat:?} vs {path:?}");
                    }
                    (Err(SourceError::Pattern { .. }), None) => {}
                    (got, want) => panic!("{pat:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn bang_is_literal_in_classes_as_in_go() {
        let p = Pattern::new("[!a]").unwrap();
        assert!(p.matches("!"));
        assert!(p.matches("a"));
        assert!(!p.matches("b"));
    }

    #[test]
    fn escapes_and_regex_specials_are_literal() {
        for (pat, yes, no) in [
            ("a\\d", "ad", "a1"),
            ("a\\b", "ab", "a\\b"),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", "aX|)$(}+{bc"),
            ("abc.def", "abc.def", "abcZdef"),
            ("a(b)c/def", "a(b)c/def", "a(b)c/xyz"),
            ("a\\\\", "a\\", "a"),
            ("[&&a]", "&", "b"),
            ("[a~~]", "~", "b"),
            ("x\ny", "x\ny", "xy"),
        ] {
            let p = Pattern::new(pat).unwrap();
            assert!(p.matches(yes), "{pat:?} should match {yes:?}");
            assert!(!p.matches(no), "{pat:?} should not match {no:?}");
        }
        assert!(Pattern::new("*").unwrap().matches("new\nline"));
    }

    #[test]
    fn reversed_range_is_an_error() {
        assert!(matches!(
            Pattern::new("[z-a]"),
            Err(SourceError::Pattern { .. })
        ));
    }

    #[test]
    fn double_star() {
        let cases: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**", "a/b/c", true),
            ("**/file", "file", true),
            ("**/file", "dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file", "dir/xfile", false),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/b", true),
            ("a/**/b", "a/x/y/z/b", true),
            ("a/**/b", "a/xb", false),
            ("a/**/b", "ab", false),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def", true),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            // moby's suffix shortcut: `**` + plain text is a string-suffix test.
            ("**file", "file", true),
            ("**file", "dir/dir/file", true),
            ("**.txt", "a/b/c.txt", true),
            ("**foo", "barfoo", true),
        ];
        for &(pat, path, want) in cases {
            let p = Pattern::new(pat).unwrap();
            assert_eq!(p.matches(path), want, "{pat:?} vs {path:?}");
        }
    }

    #[test]
    fn filepath_dialect_has_no_double_star() {
        let p = Pattern::filepath("a/**/b").unwrap();
        assert!(p.matches("a/x/b"));
        assert!(!p.matches("a/b"));
        assert!(!p.matches("a/x/y/b"));
        assert!(!Pattern::filepath("**").unwrap().matches("a/b"));
    }

    #[test]
    fn glob_meta_detection() {
        assert!(has_glob_meta("*.txt"));
        assert!(has_glob_meta("a?c"));
        assert!(has_glob_meta("[ab]"));
        assert!(has_glob_meta("a\\\\*"));
        assert!(!has_glob_meta("plain/path.txt"));
        assert!(!has_glob_meta("a\\*b"));
        assert!(!has_glob_meta("a]b"));
    }

    #[test]
    fn could_match_below() {
        let p = Pattern::new("docs/keep.txt").unwrap();
        assert!(p.could_match_below(&["docs"]));
        assert!(!p.could_match_below(&["docs", "keep.txt"]));
        assert!(!p.could_match_below(&["src"]));
        let p = Pattern::new("docs/*/x").unwrap();
        assert!(p.could_match_below(&["docs"]));
        assert!(p.could_match_below(&["docs", "a", "b"]));
        assert!(!p.could_match_below(&["src", "a"]));
        assert!(Pattern::new("**/x").unwrap().could_match_below(&["any"]));
    }
}
