//! `.dockerignore`: which context paths the builder never sees.
//!
//! Parsing follows moby's
//! [`ignorefile.ReadAll`](https://github.com/moby/patternmatcher/blob/main/ignorefile/ignorefile.go)
//! and matching its `PatternMatcher.MatchesOrParentMatches`
//! (<https://docs.docker.com/build/concepts/context/#dockerignore-files>):
//!
//! - a line starting with `#` is a comment; blank lines are skipped; whitespace is trimmed;
//! - patterns are cleaned like Go's `filepath.Clean` and a leading `/` is dropped;
//! - `!pattern` is an exception that re-includes what it matches;
//! - a pattern that matches a path or any of its parent directories applies to the path, and
//!   the last pattern that applies decides (exclude, or re-include for an exception).

use std::path::{Path, PathBuf};

use super::SourceError;
use super::pattern::Pattern;

/// One line of an ignore file.
#[derive(Clone, Debug)]
struct Rule {
    pattern: Pattern,
    exception: bool,
}

/// A parsed ignore file (or a list of `COPY --exclude` patterns): ordered exclude patterns
/// and `!` exceptions.
#[derive(Clone, Debug, Default)]
pub struct Dockerignore {
    rules: Vec<Rule>,
}

impl Dockerignore {
    /// An ignore list that excludes nothing.
    pub fn empty() -> Dockerignore {
        Dockerignore::default()
    }

    /// Parses the text of a `.dockerignore` file. Errors name the 1-based line.
    pub fn parse(text: &str) -> Result<Dockerignore, SourceError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut rules = Vec::new();
        for (index, line) in text.split('\n').enumerate() {
            // Go's line scanner drops one trailing CR; the comment test comes before trimming,
            // so an indented `#` starts a pattern, as in Docker.
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with('#') {
                continue;
            }
            let Some(pattern) = read_all_line(line) else {
                continue;
            };
            let rule = compile_rule(&pattern).map_err(|e| SourceError::IgnoreLine {
                line: index + 1,
                source: Box::new(e),
            })?;
            rules.extend(rule);
        }
        Ok(Dockerignore { rules })
    }

    /// Builds the list from patterns given one by one (e.g. `COPY --exclude=...`), with the
    /// same trimming, cleaning and `!` handling as moby's `patternmatcher.New`.
    pub fn from_patterns<I, S>(patterns: I) -> Result<Dockerignore, SourceError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut rules = Vec::new();
        for pattern in patterns {
            rules.extend(compile_rule(pattern.as_ref())?);
        }
        Ok(Dockerignore { rules })
    }

    /// Finds the ignore file BuildKit would use for this context and Dockerfile (see
    /// [`find_dockerignore`]), reads and parses it; an empty list when there is none.
    pub fn load(context_dir: &Path, dockerfile: &Path) -> Result<Dockerignore, SourceError> {
        let Some(path) = find_dockerignore(context_dir, dockerfile)? else {
            return Ok(Dockerignore::empty());
        };
        let wrap = |source| SourceError::IgnoreFile {
            path: path.clone(),
            source: Box::new(source),
        };
        let bytes = fs_err::read(&path)?;
        let text = String::from_utf8(bytes).map_err(|_| wrap(SourceError::NotUtf8))?;
        Dockerignore::parse(&text).map_err(wrap)
    }

    /// Whether there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The patterns in order, each with whether it is a `!` exception.
    pub fn patterns(&self) -> impl Iterator<Item = (&Pattern, bool)> {
        self.rules.iter().map(|r| (&r.pattern, r.exception))
    }

    /// Whether the context path `rel_path` (`/`-separated, relative to the context root,
    /// cleaned) is excluded. Whether the path is a directory makes no difference: Docker
    /// cleans away a pattern's trailing `/`.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        self.rules
            .iter()
            .rev()
            .find(|rule| applies(&rule.pattern, rel_path))
            .is_some_and(|rule| !rule.exception)
    }

    /// Whether a walker may skip the whole directory `rel_dir`: it is excluded and no later
    /// exception could re-include anything below it. `false` means the directory must still
    /// be walked (its own entry is written only if something below it is included).
    pub fn can_prune(&self, rel_dir: &str) -> bool {
        let hits: Vec<bool> = self
            .rules
            .iter()
            .map(|rule| applies(&rule.pattern, rel_dir))
            .collect();
        self.prune_with(&hits, rel_dir)
    }

    /// For each rule, whether it applies to `rel_path`, given the same for its parent
    /// directory (`None` at the top level): the parent-directory rule, computed incrementally.
    pub(crate) fn hits(&self, rel_path: &str, parent: Option<&[bool]>) -> Vec<bool> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                parent.is_some_and(|p| p.get(i).copied().unwrap_or(false))
                    || rule.pattern.matches(rel_path)
            })
            .collect()
    }

    /// Whether a path with these rule hits is excluded.
    pub(crate) fn excluded_with(&self, hits: &[bool]) -> bool {
        self.last_hit(hits)
            .is_some_and(|i| !self.rules[i].exception)
    }

    /// [`Dockerignore::can_prune`] for a directory with these rule hits.
    pub(crate) fn prune_with(&self, hits: &[bool], rel_dir: &str) -> bool {
        let Some(last) = self.last_hit(hits) else {
            return false;
        };
        if self.rules[last].exception {
            return false;
        }
        // Everything below the directory is hit by every rule that hits the directory, so only
        // a later exception that matches something inside it can change the outcome.
        let dir: Vec<&str> = rel_dir.split('/').collect();
        !self.rules[last + 1..]
            .iter()
            .any(|rule| rule.exception && rule.pattern.could_match_below(&dir))
    }

    fn last_hit(&self, hits: &[bool]) -> Option<usize> {
        hits.iter().rposition(|&hit| hit)
    }
}

/// Whether `pattern` matches `rel_path` or one of its parent directories.
fn applies(pattern: &Pattern, rel_path: &str) -> bool {
    rel_path
        .match_indices('/')
        .any(|(i, _)| pattern.matches(&rel_path[..i]))
        || pattern.matches(rel_path)
}

/// `ignorefile.ReadAll`'s treatment of one non-comment line: `None` for a blank line.
fn read_all_line(line: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (invert, pattern) = match line.strip_prefix('!') {
        Some(rest) => (true, rest.trim()),
        None => (false, line),
    };
    let mut pattern = if pattern.is_empty() {
        String::new()
    } else {
        let cleaned = go_clean(pattern);
        match cleaned.strip_prefix('/') {
            Some(rest) if !rest.is_empty() => rest.to_owned(),
            _ => cleaned,
        }
    };
    if invert {
        pattern.insert(0, '!');
    }
    Some(pattern)
}

/// `patternmatcher.New` for one pattern: `None` for a blank one.
fn compile_rule(pattern: &str) -> Result<Option<Rule>, SourceError> {
    let pattern = pattern.trim();
    if pattern.is_empty() {
        return Ok(None);
    }
    let cleaned = go_clean(pattern);
    let (exception, body) = match cleaned.strip_prefix('!') {
        Some("") => {
            return Err(SourceError::Pattern {
                pattern: pattern.to_owned(),
                reason: "an exception needs a pattern after '!'",
            });
        }
        Some(rest) => (true, rest),
        None => (false, cleaned.as_str()),
    };
    Ok(Some(Rule {
        pattern: Pattern::new(body)?,
        exception,
    }))
}

/// Go's `path.Clean`: the shortest equivalent path by lexical processing.
fn go_clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            part => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// The ignore file BuildKit uses: `<Dockerfile name>.dockerignore` beside the Dockerfile if it
/// exists, else `.dockerignore` at the context root if that exists.
///
/// Both paths are used as given; the caller resolves them against its working directory.
pub fn find_dockerignore(
    context_dir: &Path,
    dockerfile: &Path,
) -> Result<Option<PathBuf>, SourceError> {
    let mut candidates = Vec::with_capacity(2);
    if let Some(name) = dockerfile.file_name() {
        let mut name = name.to_os_string();
        name.push(".dockerignore");
        candidates.push(dockerfile.with_file_name(name));
    }
    candidates.push(context_dir.join(".dockerignore"));
    for candidate in candidates {
        match fs_err::metadata(&candidate) {
            Ok(_) => return Ok(Some(candidate)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> Dockerignore {
        Dockerignore::parse(text).unwrap()
    }

    #[test]
    fn clean_like_go() {
        for (input, want) in [
            ("a/b/../c", "a/c"),
            ("./a//b/", "a/b"),
            ("../a", "../a"),
            ("a/../../b", "../b"),
            ("/../a", "/a"),
            ("/", "/"),
            (".", "."),
            ("a/..", "."),
        ] {
            assert_eq!(go_clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn altinn_file() {
        let text = ".dockerignore\n.env\n.git\n.gitignore\n.vs\n.vscode\n\
                    docker-compose.yml\ndocker-compose.*.yml\n*/bin\n*/obj\n";
        let ig = ignore(text);
        assert_eq!(ig.patterns().count(), 10);
        for excluded in [
            ".dockerignore",
            ".env",
            ".git",
            ".git/HEAD",
            ".git/objects/ab/cdef",
            ".gitignore",
            ".vs/config",
            ".vscode/settings.json",
            "docker-compose.yml",
            "docker-compose.override.yml",
            "App/bin",
            "App/bin/Debug/net8.0/App.dll",
            "App/obj/project.assets.json",
        ] {
            assert!(ig.is_excluded(excluded), "{excluded} should be excluded");
        }
        for included in [
            "Dockerfile",
            "App",
            "App/Program.cs",
            "App/App.csproj",
            "bin",
            "App/sub/bin/x.dll",
            ".envrc",
            "docker-compose.yaml",
            "deploy/docker-compose.yml",
            "App/.git",
        ] {
            assert!(!ig.is_excluded(included), "{included} should be included");
        }
        assert!(ig.can_prune(".git"));
        assert!(ig.can_prune("App/bin"));
        assert!(!ig.can_prune("App"));
    }

    #[test]
    fn later_patterns_override_earlier_ones() {
        let ig = ignore("*.md\n!README.md\n");
        assert!(ig.is_excluded("CHANGELOG.md"));
        assert!(!ig.is_excluded("README.md"));
        // `*` does not cross `/`: nested markdown is not matched at all.
        assert!(!ig.is_excluded("docs/guide.md"));

        let ig = ignore("!README.md\n*.md\n");
        assert!(ig.is_excluded("README.md"));

        let ig = ignore("*.md\n!README*.md\nREADME-secret.md\n");
        assert!(ig.is_excluded("a.md"));
        assert!(!ig.is_excluded("README-public.md"));
        assert!(ig.is_excluded("README-secret.md"));
    }

    #[test]
    fn exception_inside_excluded_directory() {
        let ig = ignore("docs\n!docs/keep.txt\n");
        assert!(ig.is_excluded("docs"));
        assert!(ig.is_excluded("docs/other.txt"));
        assert!(!ig.is_excluded("docs/keep.txt"));
        assert!(!ig.can_prune("docs"), "docs/keep.txt must still be found");

        // The exception comes first, so the later pattern wins everywhere below docs.
        let ig = ignore("!docs/keep.txt\ndocs\n");
        assert!(ig.is_excluded("docs/keep.txt"));
        assert!(ig.can_prune("docs"));

        // An exception elsewhere does not stop pruning.
        let ig = ignore("docs\nvendor\n!vendor/keep\n");
        assert!(ig.can_prune("docs"));
        assert!(!ig.can_prune("vendor"));

        // A wildcard exception might match inside: walk.
        let ig = ignore("docs\n!**/*.keep\n");
        assert!(!ig.can_prune("docs"));
        assert!(!ig.is_excluded("docs/a/b.keep"));
        assert!(ig.is_excluded("docs/a/b.txt"));

        // Not excluded: nothing to prune.
        assert!(!ignore("docs\n").can_prune("src"));
    }

    #[test]
    fn directory_pattern_excludes_everything_below() {
        let ig = ignore("build\nnode_modules/\n");
        assert!(ig.is_excluded("build"));
        assert!(ig.is_excluded("build/a/b/c"));
        assert!(ig.is_excluded("node_modules/x/package.json"));
        assert!(!ig.is_excluded("src/build"));
        assert!(!ig.is_excluded("buildx"));
    }

    #[test]
    fn parent_directory_rule() {
        let ig = ignore("*/bin\n");
        assert!(ig.is_excluded("App/bin/x.dll"));
        assert!(ig.is_excluded("App/bin/Debug/x.dll"));
        assert!(!ig.is_excluded("bin/x.dll"));
        let ig = ignore("**/cache\n");
        assert!(ig.is_excluded("cache/x"));
        assert!(ig.is_excluded("a/b/cache/c/d"));
    }

    #[test]
    fn leading_slash_comments_blank_lines_and_whitespace() {
        let text =
            "\u{feff}# a comment\n\n   \n/secrets\n  tmp  \r\n #not-a-comment\n! /secrets/ok\n";
        let ig = ignore(text);
        let pats: Vec<(String, bool)> = ig
            .patterns()
            .map(|(p, e)| (p.as_str().to_owned(), e))
            .collect();
        assert_eq!(
            pats,
            [
                ("secrets".to_owned(), false),
                ("tmp".to_owned(), false),
                ("#not-a-comment".to_owned(), false),
                ("secrets/ok".to_owned(), true),
            ]
        );
        assert!(ig.is_excluded("secrets/key"));
        assert!(!ig.is_excluded("secrets/ok"));
        assert!(ig.is_excluded("tmp"));
        assert!(!ig.is_excluded("# a comment"));
    }

    #[test]
    fn patterns_are_cleaned() {
        let ig = ignore("./a/../b/\nc/./d\n");
        assert!(ig.is_excluded("b/x"));
        assert!(ig.is_excluded("c/d"));
        assert!(!ig.is_excluded("a"));
    }

    #[test]
    fn moby_match_table() {
        // Cases from moby patternmatcher's TestMatches (MatchesOrParentMatches).
        let cases: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**/", "file", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/dir2/file", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**file", "dir/file", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("a**/*.txt", "a/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "ace", true),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc?def", "abcdef", false),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", "bar.foo", false),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
        ];
        for &(pat, path, want) in cases {
            let ig = Dockerignore::from_patterns([pat]).unwrap();
            assert_eq!(ig.is_excluded(path), want, "{pat:?} vs {path:?}");
        }
    }

    #[test]
    fn bad_patterns_name_their_line() {
        let err = Dockerignore::parse("ok\n# c\nbad[\n").unwrap_err();
        assert!(
            matches!(err, SourceError::IgnoreLine { line: 3, .. }),
            "{err:?}"
        );
        let err = Dockerignore::parse("!\n").unwrap_err();
        assert!(
            matches!(err, SourceError::IgnoreLine { line: 1, .. }),
            "{err:?}"
        );
        assert!(Dockerignore::from_patterns(["!"]).is_err());
    }

    #[test]
    fn incremental_hits_agree_with_is_excluded() {
        let ig = ignore("a\n!a/b\na/b/c\n!**/keep\n*/x\n");
        let paths = [
            "a",
            "a/b",
            "a/b/c",
            "a/b/c/keep",
            "a/b/d",
            "q",
            "q/x",
            "q/x/y",
            "q/z",
        ];
        for path in paths {
            let parent = path.rsplit_once('/').map(|(p, _)| p);
            let parent_hits = parent.map(|p| {
                ig.rules
                    .iter()
                    .map(|r| applies(&r.pattern, p))
                    .collect::<Vec<_>>()
            });
            let hits = ig.hits(path, parent_hits.as_deref());
            assert_eq!(ig.excluded_with(&hits), ig.is_excluded(path), "{path}");
        }
        assert!(!ig.is_excluded("a/b"));
        assert!(ig.is_excluded("a/b/c"));
        assert!(!ig.is_excluded("a/b/c/keep"));
    }

    #[test]
    fn find_prefers_dockerfile_specific_ignore() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let df_dir = dir.path().join("df");
        fs_err::create_dir_all(&ctx).unwrap();
        fs_err::create_dir_all(&df_dir).unwrap();
        let dockerfile = df_dir.join("app.Dockerfile");
        assert_eq!(find_dockerignore(&ctx, &dockerfile).unwrap(), None);
        assert!(Dockerignore::load(&ctx, &dockerfile).unwrap().is_empty());

        fs_err::write(ctx.join(".dockerignore"), "from-context\n").unwrap();
        assert_eq!(
            find_dockerignore(&ctx, &dockerfile).unwrap(),
            Some(ctx.join(".dockerignore"))
        );
        fs_err::write(
            df_dir.join("app.Dockerfile.dockerignore"),
            "from-dockerfile\n",
        )
        .unwrap();
        assert_eq!(
            find_dockerignore(&ctx, &dockerfile).unwrap(),
            Some(df_dir.join("app.Dockerfile.dockerignore"))
        );
        let ig = Dockerignore::load(&ctx, &dockerfile).unwrap();
        assert!(ig.is_excluded("from-dockerfile"));
        assert!(!ig.is_excluded("from-context"));

        fs_err::write(ctx.join(".dockerignore"), [0xff, 0xfe, b'\n']).unwrap();
        let err = Dockerignore::load(&ctx, &ctx.join("Dockerfile")).unwrap_err();
        assert!(matches!(err, SourceError::IgnoreFile { .. }), "{err:?}");
    }
}
