//! The command line: clap definitions and one function per subcommand. The only place that
//! reads the environment, the clock and the working directory.

mod build;
mod deploy;
mod images;
mod progress;
mod registry;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::store::Store;

/// strata: build reproducible OCI images without a daemon.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `debug`, `strata=trace`).
    #[arg(long, global = true, env = "STRATA_LOG", default_value = "strata=warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build an image from a Dockerfile.
    Build(Box<build::BuildArgs>),
    /// List images in the local store.
    Images(images::ImagesArgs),
    /// Show an image's manifest and config.
    Inspect(images::InspectArgs),
    /// Remove images from the local store.
    Rmi(images::RmiArgs),
    /// Copy an image from the local store to an OCI layout or archive.
    Export(images::ExportArgs),
    /// Verify every blob and reference in the local store.
    Fsck(images::FsckArgs),
    /// Remove least-recently-used blobs and cache entries.
    Prune(images::PruneArgs),
    /// Inspect the layer cache.
    Cache(images::CacheArgs),
    /// Pull an image from a registry into the local store.
    Pull(registry::PullArgs),
    /// Push an image from the local store to a registry.
    Push(registry::PushArgs),
    /// Save credentials for a registry (docker's config.json, or --authfile).
    Login(registry::LoginArgs),
    /// Remove saved credentials for a registry.
    Logout(registry::LogoutArgs),
    /// Copy an image between registries, OCI layouts and archives (skopeo's transports).
    Copy(registry::CopyArgs),
    /// List the tags of a repository.
    Tags(registry::TagsArgs),
    /// Delete a manifest from a registry.
    Delete(registry::DeleteArgs),
    /// Hand an image to Kubernetes: a Flux OCI artifact, or server-side apply and rollout.
    Deploy(deploy::DeployArgs),
    /// Run the publish backend: a build queue behind a JSON API.
    Serve(Box<serve::ServeArgs>),
}

/// An error that is the user's fault in how strata was called (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The store root: `$STRATA_HOME`, else `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`.
pub fn store_root() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("STRATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("strata"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/strata")),
        None => anyhow::bail!("cannot locate the store: set STRATA_HOME (or HOME)"),
    }
}

fn open_store() -> anyhow::Result<Store> {
    let root = store_root()?;
    Store::open(&root).map_err(|e| anyhow::anyhow!("open store {}: {e}", root.display()))
}

/// Run the CLI and map the outcome to an exit status: 0 ok, 1 failure, 2 usage error.
pub fn main() -> ExitCode {
    // One TLS provider for the whole process, chosen explicitly (rustls would otherwise
    // refuse to pick when more than one is compiled in).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("strata=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: logs captured to a file or a CI log stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let result = match cli.command {
        Command::Build(a) => build::run(*a),
        Command::Images(a) => images::images(a),
        Command::Inspect(a) => images::inspect(a),
        Command::Rmi(a) => images::rmi(a),
        Command::Export(a) => images::export(a),
        Command::Fsck(a) => images::fsck(a),
        Command::Prune(a) => images::prune(a),
        Command::Cache(a) => images::cache(a),
        Command::Pull(a) => registry::pull(a),
        Command::Push(a) => registry::push(a),
        Command::Login(a) => registry::login(a),
        Command::Logout(a) => registry::logout(a),
        Command::Copy(a) => registry::copy(a),
        Command::Tags(a) => registry::tags(a),
        Command::Delete(a) => registry::delete(a),
        Command::Deploy(a) => deploy::run(a),
        Command::Serve(a) => serve::run(*a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
