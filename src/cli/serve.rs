//! `strata serve`: the publish backend's flags, secrets and start-up. Reads the environment,
//! key files and the hooks file here and hands [`crate::serve`] plain values.

use fs_err::os::unix::fs::OpenOptionsExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{UsageError, open_store};
use crate::registry::{Reference, Secret};
use crate::serve::{self, Config, Database, Engine, Hooks, SealKey, secret};

/// `strata serve`
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// API bearer token; repeatable (also `$STRATA_SERVE_TOKEN`, comma-separated).
    #[arg(
        long = "token",
        env = "STRATA_SERVE_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    tokens: Vec<String>,
    /// Serve the API without a token (only on a loopback address).
    #[arg(long = "insecure-no-auth")]
    insecure_no_auth: bool,
    /// Builds run at once.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The queue: `postgres://…` (shared by replicas), or `sqlite:PATH`
    /// (default: `$STRATA_HOME/serve/queue.db`).
    #[arg(long, env = "STRATA_SERVE_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// 64 hex digits that seal git tokens at rest (default: `$STRATA_HOME/serve/secret.key`,
    /// created 0600; replicas sharing PostgreSQL must share it).
    #[arg(long = "secret-key-file", env = "STRATA_SERVE_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// The Gitea webhook secret (HMAC-SHA256 of the body in `X-Gitea-Signature`).
    #[arg(
        long = "webhook-secret",
        env = "STRATA_SERVE_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    webhook_secret: Option<String>,
    /// Which pushes build what: a TOML file of `[[repository]]` tables.
    #[arg(long)]
    hooks: Option<PathBuf>,
    /// Token to fetch repositories with for webhook builds.
    #[arg(
        long = "webhook-git-token",
        env = "STRATA_SERVE_WEBHOOK_GIT_TOKEN",
        hide_env_values = true
    )]
    webhook_git_token: Option<String>,
    /// Delete finished builds and their logs after this long (`90s`, `30m`, `24h`, `7d`).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    retention: Duration,
    /// A worker's lease on a running build; a replica that stops renewing it loses the build
    /// (re-queued once) after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    lease: Duration,
    /// How often idle workers look for builds queued elsewhere.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll: Duration,
    /// Largest request body.
    #[arg(long = "max-body", default_value = "1MiB", value_parser = super::registry::parse_size)]
    max_body: u64,
    /// Prune the local store down to this size while idle (the `strata prune` policy).
    #[arg(long = "prune-keep-storage", value_parser = super::registry::parse_size)]
    prune_keep_storage: Option<u64>,
    /// Only prune blobs unused for this long.
    #[arg(long = "prune-until", value_parser = parse_duration)]
    prune_until: Option<Duration>,
    /// Import a layer cache from this registry reference before each build; repeatable.
    #[arg(long = "cache-from", value_name = "REF")]
    cache_from: Vec<String>,
    /// Export each build's layer cache to this registry reference.
    #[arg(long = "cache-to", value_name = "REF")]
    cache_to: Option<String>,
    /// Kubeconfig of the cluster `deploy.apply` builds apply to (repeatable, merged like
    /// `KUBECONFIG`); without it (and outside a cluster) such builds are refused.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Vec<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long = "kube-context", value_name = "NAME")]
    kube_context: Option<String>,
    /// Apply with the in-cluster service account (when running in Kubernetes).
    #[arg(long = "in-cluster", conflicts_with = "kubeconfig")]
    in_cluster: bool,
    /// Compression threads per build (default: the number of CPUs).
    #[arg(long, env = "STRATA_THREADS")]
    threads: Option<u32>,
    #[command(flatten)]
    registry: super::registry::RegistryArgs,
}

/// `90s`, `30m`, `24h`, `7d`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("invalid duration unit in {s:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// The seal key: from the file given, else the store's own (created 0600 on first start).
fn seal_key(a: &ServeArgs, home: &std::path::Path) -> anyhow::Result<SealKey> {
    let path = match &a.secret_key_file {
        Some(p) => p.clone(),
        None => {
            let p = home.join("serve/secret.key");
            if !p.exists() {
                fs_err::create_dir_all(home.join("serve"))?;
                let k = SealKey::generate()?;
                let mut f = fs_err::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)?;
                std::io::Write::write_all(&mut f, secret::format_key(&k).as_bytes())?;
                f.sync_all()?;
            }
            p
        }
    };
    let text = fs_err::read_to_string(&path).context("read the secret key")?;
    let k = secret::parse_key(&text).ok_or_else(|| {
        UsageError(format!(
            "{} must hold 64 hex digits (e.g. from `openssl rand -hex 32`)",
            path.display()
        ))
    })?;
    Ok(SealKey::new(&k))
}

fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}:{}", std::process::id())
}

pub(super) fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let tokens: Vec<Secret> = a
        .tokens
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(Secret::new)
        .collect();
    if tokens.is_empty() && !a.insecure_no_auth {
        return Err(UsageError(
            "strata serve needs an API token: --token or $STRATA_SERVE_TOKEN (or --insecure-no-auth on loopback)".into(),
        )
        .into());
    }
    if a.insecure_no_auth && !a.listen.ip().is_loopback() {
        return Err(
            UsageError("--insecure-no-auth is only allowed on a loopback address".into()).into(),
        );
    }
    let store = open_store()?;
    let home = store.root().to_path_buf();
    let database = match a.database.as_deref() {
        None => Database::Sqlite(home.join("serve/queue.db")),
        Some(d) if d.starts_with("postgres://") || d.starts_with("postgresql://") => {
            if a.secret_key_file.is_none() {
                return Err(UsageError(
                    "--database postgres://… needs --secret-key-file, shared by every replica"
                        .into(),
                )
                .into());
            }
            Database::Postgres(d.to_string())
        }
        Some(d) => match d.strip_prefix("sqlite:") {
            Some(p) => Database::Sqlite(PathBuf::from(p)),
            None => {
                return Err(UsageError(format!(
                    "--database must be postgres://… or sqlite:PATH, not {d:?}"
                ))
                .into());
            }
        },
    };
    let hooks = match (&a.hooks, &a.webhook_secret) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(UsageError("--hooks and --webhook-secret go together".into()).into());
        }
        (Some(f), Some(secret)) => {
            let text = fs_err::read_to_string(f).context("read the hooks file")?;
            Some(
                Hooks::parse(
                    &text,
                    Secret::new(secret.clone()),
                    a.webhook_git_token.clone().map(Secret::new),
                )
                .map_err(|e| UsageError(format!("{}: {e}", f.display())))?,
            )
        }
    };
    let refs = |s: &str| -> Result<Reference, UsageError> {
        s.parse()
            .map_err(|e: crate::store::NameError| UsageError(format!("{s:?}: {e}")))
    };
    let cache_from = a
        .cache_from
        .iter()
        .map(|s| refs(s))
        .collect::<Result<Vec<_>, _>>()?;
    let cache_to = a.cache_to.as_deref().map(refs).transpose()?;
    let config = Config {
        tokens,
        insecure_no_auth: a.insecure_no_auth,
        workers: a.workers.max(1),
        database,
        seal_key: seal_key(&a, &home)?,
        hooks,
        retention: a.retention,
        lease: a.lease.max(Duration::from_secs(1)),
        poll: a.poll.max(Duration::from_millis(50)),
        max_body: usize::try_from(a.max_body).unwrap_or(usize::MAX),
        prune: (a.prune_keep_storage.is_some() || a.prune_until.is_some()).then_some(
            crate::store::PruneOptions {
                keep_storage: a.prune_keep_storage,
                until: a.prune_until,
                all: false,
            },
        ),
        instance: instance(),
    };
    let rt = super::registry::runtime()?;
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let engine = Engine {
        store,
        client: a.registry.client(None)?,
        handle: rt.handle().clone(),
        cache_from,
        cache_to,
        threads,
        cluster: (a.in_cluster || !a.kubeconfig.is_empty()).then(|| crate::deploy::KubeTarget {
            kubeconfigs: a.kubeconfig.clone(),
            context: a.kube_context.clone(),
        }),
    };
    let std_listener =
        std::net::TcpListener::bind(a.listen).with_context(|| format!("listen on {}", a.listen))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        eprintln!("strata serve: listening on http://{addr}");
        serve::run(config, engine, listener, shutdown()).await
    });
    // A build thread that did not stop in time must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(5));
    result?;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT or SIGTERM.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
