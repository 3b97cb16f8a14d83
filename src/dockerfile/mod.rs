//! The Dockerfile front end: text → typed instructions → stages, without touching the
//! filesystem.
//!
//! Implements the [Dockerfile reference](https://docs.docker.com/reference/dockerfile/) and
//! agrees with BuildKit (the parser behind `docker build`) on its parser and shell test data.
//!
//! - [`parse_ast`] checks syntax only and returns one [`Node`] per instruction.
//! - [`parse`] also gives each node its meaning ([`Instruction`]), rejecting unknown
//!   instructions, unknown flags and wrong argument counts.
//! - [`Dockerfile::stages`] groups the instructions into global ARGs and build stages.
//!
//! Words stay unexpanded: variables depend on the build's ARGs and ENVs, so the executor
//! expands them with [`expand_word`], [`expand_words`] and [`expand_heredoc`].

mod instruction;
mod mount;
mod parser;
mod shell;
#[cfg(test)]
mod tests;

pub use instruction::{
    CommandForm, CopyArgs, Healthcheck, HealthcheckCommand, Instruction, Run, RunFlags,
};
pub use mount::{MountType, RunMount, Sharing, parse_mount, parse_ram_size};
pub(crate) use parser::parse_heredoc;
pub use parser::{Args, Ast, Heredoc, Node, Pair, parse_ast};
pub use shell::{expand_heredoc, expand_word, expand_words};

/// An error in a Dockerfile, or while expanding one of its words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    /// The Dockerfile is malformed at a place.
    #[error("{file}:{line}:{column}: {message}\n{line:>4} | {text}")]
    Syntax {
        /// The Dockerfile's name, as given to [`parse`].
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
        /// The offending line, as written.
        text: String,
    },
    /// A word could not be expanded: bad substitution, unterminated quote, or
    /// `${VAR:?message}` with `VAR` unset. [`Dockerfile::error_at`] gives it a place.
    #[error("failed to expand {word:?}: {message}")]
    Expansion {
        /// The word being expanded.
        word: String,
        /// What is wrong.
        message: String,
    },
}

impl DockerfileError {
    fn at(file: &str, lines: &[&str], line: usize, column: usize, message: String) -> Self {
        let text = lines
            .get(line.wrapping_sub(1))
            .map(|l| l.trim_end_matches(['\r', '\n']).to_string())
            .unwrap_or_default();
        DockerfileError::Syntax {
            file: file.to_string(),
            line,
            column,
            message,
            text,
        }
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The name given to [`parse`], used in error messages.
    pub file: String,
    /// The escape character (`\` or `` ` ``).
    pub escape: char,
    /// The value of a `# syntax=` directive, if any; strata ignores it, the caller may warn.
    pub syntax: Option<String>,
    /// The instructions, in order.
    pub steps: Vec<Step>,
    lines: Vec<String>,
}

/// One instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The instruction as written: lines, original text, keyword, flags, raw arguments.
    pub node: Node,
    /// What it means.
    pub instruction: Instruction,
}

/// The instructions of a Dockerfile grouped for execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    /// ARG instructions before the first FROM: usable in FROM lines.
    pub global_args: Vec<Step>,
    /// The build stages, in order; the last one is the default target.
    pub stages: Vec<Stage>,
}

/// One build stage: a FROM and the instructions up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The FROM instruction.
    pub from: Step,
    /// The base image reference (or an earlier stage's name), unexpanded.
    pub base: String,
    /// The stage name given with `AS`, lowercase.
    pub name: Option<String>,
    /// The `--platform` flag, unexpanded.
    pub platform: Option<String>,
    /// The instructions after FROM.
    pub steps: Vec<Step>,
}

/// Parses a Dockerfile into typed instructions.
///
/// `file` names the Dockerfile in error messages. Errors carry the line and column and quote
/// the offending line.
pub fn parse(text: &str, file: &str) -> Result<Dockerfile, DockerfileError> {
    let ast = parse_ast(text, file)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let steps = ast
        .nodes
        .into_iter()
        .map(|node| {
            let instruction = Instruction::from_node(&node).map_err(|message| {
                DockerfileError::at(file, &lines, node.start_line, node.column, message)
            })?;
            Ok(Step { node, instruction })
        })
        .collect::<Result<Vec<_>, DockerfileError>>()?;
    Ok(Dockerfile {
        file: file.to_string(),
        escape: ast.escape,
        syntax: ast.syntax,
        steps,
        lines: lines
            .iter()
            .map(|l| l.trim_end_matches(['\r', '\n']).to_string())
            .collect(),
    })
}

impl Dockerfile {
    /// An error located at `node` (its first line and keyword column), for problems found
    /// later, while building. An [`DockerfileError::Expansion`] keeps its text as the message.
    pub fn error_at(&self, node: &Node, message: impl std::fmt::Display) -> DockerfileError {
        let lines: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        DockerfileError::at(
            &self.file,
            &lines,
            node.start_line,
            node.column,
            message.to_string(),
        )
    }

    /// Splits the instructions into global ARGs (before the first FROM) and stages.
    ///
    /// Fails when an instruction other than ARG comes before the first FROM, when there is no
    /// FROM at all, or when two stages have the same name.
    pub fn stages(&self) -> Result<Stages, DockerfileError> {
        let mut global_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for step in &self.steps {
            match (&step.instruction, stages.last_mut()) {
                (
                    Instruction::From {
                        image,
                        name,
                        platform,
                    },
                    _,
                ) => {
                    if let Some(name) = name
                        && stages.iter().any(|s| s.name.as_ref() == Some(name))
                    {
                        return Err(self
                            .error_at(&step.node, format_args!("duplicate stage name {name:?}")));
                    }
                    stages.push(Stage {
                        from: step.clone(),
                        base: image.clone(),
                        name: name.clone(),
                        platform: platform.clone(),
                        steps: Vec::new(),
                    });
                }
                (_, Some(stage)) => stage.steps.push(step.clone()),
                (Instruction::Arg(_), None) => global_args.push(step.clone()),
                (_, None) => {
                    return Err(self.error_at(
                        &step.node,
                        format_args!(
                            "{} before the first FROM (only ARG may come before it)",
                            step.node.keyword.to_uppercase()
                        ),
                    ));
                }
            }
        }
        if stages.is_empty() {
            let node = self.steps.last().map(|s| &s.node);
            return Err(match node {
                Some(node) => self.error_at(node, "no FROM instruction"),
                None => DockerfileError::at(&self.file, &[], 1, 1, "no FROM instruction".into()),
            });
        }
        Ok(Stages {
            global_args,
            stages,
        })
    }
}
