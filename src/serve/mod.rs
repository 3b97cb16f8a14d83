//! `strata serve`: the publish backend. A JSON API queues builds of git repositories at a
//! ref; a pool of workers runs them with the embedded engine (fetch → build → push → tag),
//! streams their progress as Server-Sent Events, and records the outcome in a durable queue
//! (SQLite in `$STRATA_HOME/serve/`, or PostgreSQL shared by replicas).
//!
//! The caller (the CLI) reads flags, environment and key files and passes a [`Config`] and
//! an [`Engine`] in; this module reads only the clock.

mod api;
pub mod deploy;
mod hook;
pub mod job;
mod metrics;
pub mod queue;
pub mod secret;
pub mod spec;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

pub use hook::{HookRule, Hooks};
pub use job::Engine;
pub use queue::{PgQueue, Queue, QueueError, SqliteQueue};
pub use secret::SealKey;

use crate::registry::Secret;

/// Where the queue lives.
#[derive(Clone, Debug)]
pub enum Database {
    /// The embedded SQLite database at this path (one server process at a time).
    Sqlite(PathBuf),
    /// A PostgreSQL connection string, shared by replicas.
    Postgres(String),
}

/// How the server runs.
pub struct Config {
    /// Bearer tokens the API accepts; empty only with `insecure_no_auth`.
    pub tokens: Vec<Secret>,
    /// Serve the API without authentication (loopback only; the CLI checks).
    pub insecure_no_auth: bool,
    /// Worker count.
    pub workers: usize,
    /// The queue.
    pub database: Database,
    /// The key that seals git tokens at rest.
    pub seal_key: SealKey,
    /// Gitea webhook secret and repository mapping.
    pub hooks: Option<Hooks>,
    /// Finished builds and their logs are deleted after this long.
    pub retention: Duration,
    /// A worker's lease on a running build; renewed every third of it.
    pub lease: Duration,
    /// How often idle workers look for builds queued by other replicas.
    pub poll: Duration,
    /// Largest accepted request body.
    pub max_body: usize,
    /// The local-store prune policy run while no build runs (`None`: never).
    pub prune: Option<crate::store::PruneOptions>,
    /// This server's name in leases (host and pid).
    pub instance: String,
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The queue's database failed.
    #[error("build queue")]
    Queue(#[from] QueueError),
    /// Listening failed.
    #[error("serve HTTP")]
    Io(#[from] std::io::Error),
    /// Another server uses the embedded database.
    #[error(
        "another strata serve uses {0} (the embedded queue allows one server; use --database postgres://… for replicas)"
    )]
    Busy(PathBuf),
}

/// The error and its causes, one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// State shared by the API and the workers.
pub(crate) struct Shared {
    pub queue: Queue,
    pub seal: SealKey,
    pub tokens: Vec<Secret>,
    pub insecure_no_auth: bool,
    pub hooks: Option<Hooks>,
    pub engine: Engine,
    pub running: Mutex<HashMap<String, Arc<job::Cancel>>>,
    pub wake: Notify,
    pub events: watch::Sender<u64>,
    pub metrics: metrics::Metrics,
    pub instance: String,
    pub lease: Duration,
    pub poll: Duration,
    pub max_body: usize,
    /// Set once the server is shutting down: no more claims, running builds given back.
    pub stopping: std::sync::atomic::AtomicBool,
    pub stop: Notify,
}

impl Shared {
    /// Whether the server is shutting down.
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tell event listeners something changed.
    pub fn tick(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Open the queue `config` names. For SQLite, the returned guard holds the file lock that
/// keeps a second server off the database.
pub async fn open_queue(db: &Database) -> Result<(Queue, Option<std::fs::File>), ServeError> {
    match db {
        Database::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                fs_err::create_dir_all(dir)?;
            }
            let lock_path = path.with_extension("lock");
            let lock = std::fs::File::create(&lock_path)?;
            if lock.try_lock().is_err() {
                return Err(ServeError::Busy(path.clone()));
            }
            Ok((Queue::Sqlite(SqliteQueue::open(path)?), Some(lock)))
        }
        Database::Postgres(url) => Ok((Queue::Postgres(PgQueue::connect(url).await?), None)),
    }
}

/// Run the server on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    engine: Engine,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (queue, _lock) = open_queue(&config.database).await?;
    let embedded = matches!(config.database, Database::Sqlite(_));
    // The embedded queue has one server: whatever was running when it stopped was lost.
    // Replicas re-queue only builds whose lease ran out.
    for (id, state) in queue.recover(worker::now_ms(), embedded).await? {
        tracing::warn!(build = %id, state = state.as_str(), "build was running when its server stopped");
    }
    let (events, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        queue,
        seal: config.seal_key,
        tokens: config.tokens,
        insecure_no_auth: config.insecure_no_auth,
        hooks: config.hooks,
        engine,
        running: Mutex::default(),
        wake: Notify::new(),
        events,
        metrics: metrics::Metrics::default(),
        instance: config.instance,
        lease: config.lease,
        poll: config.poll,
        max_body: config.max_body,
        stopping: false.into(),
        stop: Notify::new(),
    });
    let workers: Vec<_> = (0..config.workers.max(1))
        .map(|n| tokio::spawn(worker::worker(shared.clone(), n)))
        .collect();
    tokio::spawn(maintenance(
        shared.clone(),
        config.retention,
        config.prune,
        embedded,
    ));
    let app = api::router(shared.clone());
    let stopping = shared.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Event streams end within a second of this; workers stop claiming.
            stopping
                .stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            stopping.stop.notify_waiters();
            stopping.tick();
        })
        .await?;
    // Running builds stop and go back to the queue without using up an attempt.
    tracing::info!("shutting down");
    for c in shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
    {
        c.cancel();
    }
    let all = futures_util::future::join_all(workers);
    if tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .is_err()
    {
        tracing::warn!("builds did not stop in 30 s; they are re-queued at the next start");
    }
    Ok(())
}

/// At start and then every minute: re-queue builds of vanished replicas, delete old builds,
/// prune the store when idle.
async fn maintenance(
    shared: Arc<Shared>,
    retention: Duration,
    prune: Option<crate::store::PruneOptions>,
    embedded: bool,
) {
    let every = if embedded {
        Duration::from_secs(60)
    } else {
        shared.lease.min(Duration::from_secs(60))
    };
    // The first round right away: a restarted server applies its retention at once.
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(every).await;
        }
        first = false;
        let now = worker::now_ms();
        if !embedded {
            match shared.queue.recover(now, false).await {
                Ok(lost) if !lost.is_empty() => {
                    shared.wake.notify_waiters();
                    shared.tick();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %chain(&e), "recovering lost builds failed"),
            }
        }
        match shared.queue.prune(now - retention.as_millis() as i64).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(builds = n, "pruned finished builds"),
            Err(e) => tracing::warn!(error = %chain(&e), "pruning builds failed"),
        }
        let idle = shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if let (Some(opts), true) = (&prune, idle) {
            let store = shared.engine.store.clone();
            let opts = opts.clone();
            match tokio::task::spawn_blocking(move || crate::store::prune(&store, &opts)).await {
                Ok(Ok(r)) if r.blobs > 0 => {
                    tracing::info!(blobs = r.blobs, bytes = r.bytes, "pruned the store")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %chain(&e), "pruning the store failed"),
                Err(e) => tracing::warn!(error = %e, "pruning the store failed"),
            }
        }
    }
}
