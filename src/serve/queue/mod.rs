//! The durable build queue: one table of builds and one of their events, in SQLite (the
//! embedded default, WAL mode, in `$STRATA_HOME/serve/`) or PostgreSQL (shared by replicas).
//!
//! A worker claims the oldest queued build whose repository has no earlier build queued or
//! running (so two publishes of one app run in order), holds it under a lease it renews,
//! and ends it with a write conditioned on still owning it: a build is never run by two
//! workers at once, and its result is recorded once. A build whose worker vanished
//! (process killed, lease expired) is queued again once; the second time it fails with a
//! clear reason.

mod postgres;
mod sqlite;

use std::collections::BTreeMap;

use super::spec::{Build, BuildSpec, State};

pub use postgres::PgQueue;
pub use sqlite::SqliteQueue;

/// How many times a build is taken before a vanished worker fails it.
pub const MAX_ATTEMPTS: i64 = 2;

/// The reason recorded when a build's worker vanished twice.
pub const LOST_TWICE: &str = "the server stopped twice while running this build; not retried again";

/// Errors of the queue's database.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// SQLite failed.
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    /// A row did not hold what this version writes.
    #[error("corrupt queue row: {0}")]
    Corrupt(String),
    /// A database task panicked or was cancelled.
    #[error("database task failed: {0}")]
    Join(String),
}

/// A build to enqueue.
#[derive(Clone, Debug)]
pub struct NewBuild {
    /// Its id.
    pub id: String,
    /// What to build.
    pub spec: BuildSpec,
    /// The git token, sealed.
    pub token: Option<String>,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// sha256 of the request, to tell a retried request from a different one under one key.
    pub request_hash: String,
    /// Now, in ms since 1970.
    pub now_ms: i64,
}

/// What enqueuing did.
#[derive(Debug)]
pub enum Inserted {
    /// A new build.
    New(Build),
    /// The key was used before for the same request: that build.
    Existing(Build),
    /// The key was used before for another request.
    KeyConflict,
}

/// A build a worker took, with its sealed token.
#[derive(Debug)]
pub struct Claimed {
    /// The build.
    pub build: Build,
    /// Its git token, sealed.
    pub token: Option<String>,
}

/// What `DELETE` did.
#[derive(Debug)]
pub enum Deleted {
    /// It was queued and is now cancelled.
    Cancelled(Build),
    /// It is running; its worker was asked to stop.
    Cancelling(Build),
    /// It had already ended.
    Finished(Build),
    /// No such build.
    NotFound,
}

/// How a build ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Succeeded, failed or cancelled.
    pub state: State,
    /// The image digest.
    pub digest: Option<String>,
    /// The references pushed or tagged.
    pub tags: Vec<String>,
    /// The error, if any.
    pub error: Option<String>,
    /// The deploy result.
    pub deploy: Option<serde_json::Value>,
}

/// What a lease renewal learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The worker still owns the build.
    pub owned: bool,
    /// Someone asked to cancel it.
    pub cancel: bool,
}

/// A page of builds.
#[derive(Debug)]
pub struct Page {
    /// The builds, newest first.
    pub builds: Vec<Build>,
    /// The cursor of the next page, if there may be one.
    pub next: Option<i64>,
}

/// One stored event.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// 1-based position in the build's log.
    pub n: i64,
    /// The event as JSON.
    pub data: String,
}

/// The queue: SQLite or PostgreSQL.
#[derive(Clone)]
pub enum Queue {
    /// Embedded.
    Sqlite(SqliteQueue),
    /// Shared.
    Postgres(PgQueue),
}

macro_rules! dispatch {
    ($self:ident . $m:ident ( $($a:expr),* )) => {
        match $self {
            Queue::Sqlite(q) => q.$m($($a),*).await,
            Queue::Postgres(q) => q.$m($($a),*).await,
        }
    };
}

impl Queue {
    /// Enqueue, honouring the idempotency key.
    pub async fn insert(&self, b: NewBuild) -> Result<Inserted, QueueError> {
        dispatch!(self.insert(b))
    }
    /// One build.
    pub async fn get(&self, id: &str) -> Result<Option<Build>, QueueError> {
        let id = id.to_string();
        dispatch!(self.get(id))
    }
    /// A page of builds, newest first, optionally in one state, before `cursor`.
    pub async fn list(
        &self,
        state: Option<State>,
        limit: i64,
        cursor: Option<i64>,
    ) -> Result<Page, QueueError> {
        dispatch!(self.list(state, limit, cursor))
    }
    /// Cancel a queued build or ask a running one to stop.
    pub async fn delete(&self, id: &str, now_ms: i64) -> Result<Deleted, QueueError> {
        let id = id.to_string();
        dispatch!(self.delete(id, now_ms))
    }
    /// Take the next build that may run.
    pub async fn claim(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Claimed>, QueueError> {
        let worker = worker.to_string();
        dispatch!(self.claim(worker, now_ms, lease_ms))
    }
    /// Renew a lease.
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        until_ms: i64,
    ) -> Result<Beat, QueueError> {
        let (id, worker) = (id.to_string(), worker.to_string());
        dispatch!(self.heartbeat(id, worker, until_ms))
    }
    /// Record the commit a build's ref resolved to.
    pub async fn set_commit(&self, id: &str, commit: &str) -> Result<(), QueueError> {
        let (id, commit) = (id.to_string(), commit.to_string());
        dispatch!(self.set_commit(id, commit))
    }
    /// End a build the worker owns; false when it no longer did.
    pub async fn finish(
        &self,
        id: &str,
        worker: &str,
        outcome: Outcome,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let (id, worker) = (id.to_string(), worker.to_string());
        dispatch!(self.finish(id, worker, outcome, now_ms))
    }
    /// Queue again (once) the running builds whose lease ended before `now_ms` (all running
    /// builds when `all`, for an embedded queue at start-up); returns their ids and whether
    /// each was re-queued (else failed).
    pub async fn recover(
        &self,
        now_ms: i64,
        all: bool,
    ) -> Result<Vec<(String, State)>, QueueError> {
        dispatch!(self.recover(now_ms, all))
    }
    /// Append an event to a build's log; returns its number.
    pub async fn append_event(
        &self,
        id: &str,
        data: String,
        now_ms: i64,
    ) -> Result<i64, QueueError> {
        let id = id.to_string();
        dispatch!(self.append_event(id, data, now_ms))
    }
    /// The events of a build after number `after`.
    pub async fn events(&self, id: &str, after: i64) -> Result<Vec<StoredEvent>, QueueError> {
        let id = id.to_string();
        dispatch!(self.events(id, after))
    }
    /// Builds by state.
    pub async fn counts(&self) -> Result<BTreeMap<State, i64>, QueueError> {
        dispatch!(self.counts())
    }
    /// Delete builds (and their events) that ended before `before_ms`; returns how many.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, QueueError> {
        dispatch!(self.prune(before_ms))
    }
}

/// A builds row as both backends read it.
pub(crate) struct Row {
    pub seq: i64,
    pub id: String,
    pub spec: String,
    pub state: String,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub digest: Option<String>,
    pub tags: String,
    pub error: Option<String>,
    pub commit: Option<String>,
    pub deploy: Option<String>,
    pub attempts: i64,
}

/// The columns [`Row`] reads, in order.
pub(crate) const COLUMNS: &str = "seq, id, spec, state, created_ms, started_ms, finished_ms, \
     digest, tags, error, commit_id, deploy, attempts";

/// RFC 3339 with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let s = crate::image::rfc3339(ms.div_euclid(1000));
    format!("{}.{:03}Z", s.trim_end_matches('Z'), ms.rem_euclid(1000))
}

impl Row {
    pub(crate) fn into_build(self) -> Result<Build, QueueError> {
        let corrupt = |what: &str| QueueError::Corrupt(format!("build {}: {what}", self.id));
        Ok(Build {
            state: self.state.parse().map_err(|_| corrupt("state"))?,
            created_at: rfc3339_ms(self.created_ms),
            started_at: self.started_ms.map(rfc3339_ms),
            finished_at: self.finished_ms.map(rfc3339_ms),
            digest: self.digest.clone(),
            tags: serde_json::from_str(&self.tags).map_err(|_| corrupt("tags"))?,
            error: self.error.clone(),
            commit: self.commit.clone(),
            attempts: self.attempts,
            deploy: match &self.deploy {
                Some(d) => Some(serde_json::from_str(d).map_err(|_| corrupt("deploy"))?),
                None => None,
            },
            request: serde_json::from_str(&self.spec).map_err(|_| corrupt("spec"))?,
            id: self.id,
        })
    }
}
