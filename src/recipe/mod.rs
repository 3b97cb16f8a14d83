//! Layer recipes: a TOML description of an image — base, config, and an ordered list of
//! layers that each claim files from the context by glob — for build outputs that need no
//! Dockerfile (the Jib/ko idea: split by how often things change, so a code change rebuilds
//! one small layer). Parsing is pure; [`crate::build::build_recipe`] executes a recipe with
//! the same stage machinery, layer writer and cache as Dockerfile builds.
//!
//! The format is documented in `layers/README.md`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::source::Pattern;

/// A recipe that does not parse or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The TOML is malformed or has unknown keys.
    #[error("{file}: {msg}")]
    Syntax {
        /// The recipe's name for messages.
        file: String,
        /// The parser's message (with line and column).
        msg: String,
    },
    /// A value is invalid.
    #[error("{file}: {msg}")]
    Invalid {
        /// The recipe's name for messages.
        file: String,
        /// What is wrong.
        msg: String,
    },
}

/// What to do with context files no layer claims.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Unclaimed {
    /// Fail the build, naming the files (the default: nothing slips in or out unnoticed).
    #[default]
    Error,
    /// Put them in a final catch-all layer at `unclaimed-dest`.
    Layer,
    /// Leave them out.
    Ignore,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRecipe {
    base: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    unclaimed: Unclaimed,
    #[serde(default)]
    unclaimed_dest: Option<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    config: RawConfig,
    #[serde(default, rename = "layer")]
    layers: Vec<RawLayer>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    workdir: Option<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    stop_signal: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLayer {
    name: String,
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    dest: String,
    chown: Option<String>,
    chmod: Option<String>,
}

/// The image config a recipe sets (on top of the base's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecipeConfig {
    /// Working directory.
    pub workdir: Option<String>,
    /// User (`uid[:gid]` or a name).
    pub user: Option<String>,
    /// Entrypoint (exec form).
    pub entrypoint: Option<Vec<String>>,
    /// Cmd (exec form).
    pub cmd: Option<Vec<String>>,
    /// Environment, set in key order.
    pub env: BTreeMap<String, String>,
    /// Exposed ports (`5005`, `5005/tcp`).
    pub ports: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Stop signal.
    pub stop_signal: Option<String>,
}

/// One layer: the files it claims and where they go.
#[derive(Clone, Debug)]
pub struct RecipeLayer {
    /// Name (for progress and history).
    pub name: String,
    /// Files (relative to the recipe's source dir) this layer takes.
    pub include: Vec<Pattern>,
    /// Files it leaves to later layers.
    pub exclude: Vec<Pattern>,
    /// Absolute destination directory; paths below the source dir are kept below it.
    pub dest: String,
    /// `uid[:gid]` owner of everything in the layer.
    pub chown: Option<String>,
    /// Mode of every file (octal), e.g. `0644`.
    pub chmod: Option<u32>,
}

impl RecipeLayer {
    /// Whether this layer claims `rel` (a path relative to the source dir).
    pub fn claims(&self, rel: &str) -> bool {
        self.include.iter().any(|p| p.matches(rel)) && !self.exclude.iter().any(|p| p.matches(rel))
    }
}

/// A parsed, checked recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// The recipe's name for messages.
    pub file: String,
    /// Free text.
    pub description: Option<String>,
    /// Base image reference (`scratch`, a local name, a registry reference, `oci:DIR`);
    /// `${NAME}` is replaced by `--build-arg NAME=…`.
    pub base: String,
    /// Context subdirectory the layers select from (`""` = the context root).
    pub source: String,
    /// What happens to unclaimed files.
    pub unclaimed: Unclaimed,
    /// Destination of the catch-all layer.
    pub unclaimed_dest: String,
    /// Files no layer may take (sources, build folders): dropped before claiming.
    pub exclude: Vec<Pattern>,
    /// Config.
    pub config: RecipeConfig,
    /// Layers, base first.
    pub layers: Vec<RecipeLayer>,
}

fn pattern(file: &str, p: &str) -> Result<Pattern, RecipeError> {
    Pattern::new(p).map_err(|e| RecipeError::Invalid {
        file: file.to_string(),
        msg: e.to_string(),
    })
}

/// Parse a recipe. `file` names it in messages.
pub fn parse(text: &str, file: &str) -> Result<Recipe, RecipeError> {
    let raw: RawRecipe = toml::from_str(text).map_err(|e| RecipeError::Syntax {
        file: file.to_string(),
        msg: e.to_string().trim().replace('\n', " "),
    })?;
    let invalid = |msg: String| RecipeError::Invalid {
        file: file.to_string(),
        msg,
    };
    if raw.base.trim().is_empty() {
        return Err(invalid("base must name an image or \"scratch\"".into()));
    }
    if raw.layers.is_empty() && raw.unclaimed != Unclaimed::Layer {
        return Err(invalid("a recipe needs at least one [[layer]]".into()));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut layers = Vec::new();
    for l in raw.layers {
        if !names.insert(l.name.clone()) {
            return Err(invalid(format!("two layers are named {:?}", l.name)));
        }
        if !l.dest.starts_with('/') {
            return Err(invalid(format!(
                "layer {:?}: dest must be absolute, got {:?}",
                l.name, l.dest
            )));
        }
        if l.include.is_empty() {
            return Err(invalid(format!("layer {:?}: include is empty", l.name)));
        }
        let chmod = match &l.chmod {
            Some(m) => Some(
                u32::from_str_radix(m, 8)
                    .ok()
                    .filter(|v| *v <= 0o7777)
                    .ok_or_else(|| invalid(format!("layer {:?}: invalid chmod {m:?}", l.name)))?,
            ),
            None => None,
        };
        layers.push(RecipeLayer {
            include: l
                .include
                .iter()
                .map(|p| pattern(file, p))
                .collect::<Result<_, _>>()?,
            exclude: l
                .exclude
                .iter()
                .map(|p| pattern(file, p))
                .collect::<Result<_, _>>()?,
            name: l.name,
            dest: l.dest,
            chown: l.chown,
            chmod,
        });
    }
    let unclaimed_dest = raw
        .unclaimed_dest
        .or_else(|| raw.config.workdir.clone())
        .unwrap_or_else(|| "/".to_string());
    if !unclaimed_dest.starts_with('/') {
        return Err(invalid(format!(
            "unclaimed-dest must be absolute, got {unclaimed_dest:?}"
        )));
    }
    Ok(Recipe {
        file: file.to_string(),
        description: raw.description,
        base: raw.base,
        source: raw.source.trim_matches('/').to_string(),
        unclaimed: raw.unclaimed,
        unclaimed_dest,
        exclude: raw
            .exclude
            .iter()
            .map(|p| pattern(file, p))
            .collect::<Result<_, _>>()?,
        config: RecipeConfig {
            workdir: raw.config.workdir,
            user: raw.config.user,
            entrypoint: raw.config.entrypoint,
            cmd: raw.config.cmd,
            env: raw.config.env,
            ports: raw.config.ports,
            labels: raw.config.labels,
            stop_signal: raw.config.stop_signal,
        },
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_recipes_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/layers");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let text = std::fs::read_to_string(&p).unwrap();
                parse(&text, &p.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 3, "expected the shipped recipes in layers/");
    }

    #[test]
    fn claims_follow_include_then_exclude() {
        let r = parse(
            "base = \"scratch\"\n[[layer]]\nname = \"deps\"\ninclude = [\"*.dll\"]\nexclude = [\"App*.dll\"]\ndest = \"/App\"\n",
            "t.toml",
        )
        .unwrap();
        assert!(r.layers[0].claims("Newtonsoft.Json.dll"));
        assert!(!r.layers[0].claims("App.dll"));
        assert!(!r.layers[0].claims("appsettings.json"));
    }

    #[test]
    fn bad_recipes_say_what_is_wrong() {
        for (text, says) in [
            ("base = \"scratch\"\nbogus = 1\n", "unknown field"),
            ("base = \"scratch\"\n", "at least one [[layer]]"),
            (
                "base = \"scratch\"\n[[layer]]\nname = \"a\"\ninclude = [\"x\"]\ndest = \"rel\"\n",
                "dest must be absolute",
            ),
            (
                "base = \"scratch\"\n[[layer]]\nname = \"a\"\ninclude = [\"[\"]\ndest = \"/x\"\n",
                "invalid pattern",
            ),
            (
                "base = \"scratch\"\n[[layer]]\nname = \"a\"\ninclude = [\"x\"]\ndest = \"/x\"\nchmod = \"9\"\n",
                "invalid chmod",
            ),
        ] {
            let e = parse(text, "r.toml").unwrap_err().to_string();
            assert!(e.contains(says) && e.starts_with("r.toml"), "{text}: {e}");
        }
    }
}
