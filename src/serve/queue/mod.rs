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

/// The event recorded when a shutting-down server gives a build back.
pub(crate) const RELEASED: &str = r#"{"type":"state","state":"queued","reason":"the server running this build is shutting down"}"#;

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
    /// Give a running build back to the queue without counting the attempt (the server is
    /// shutting down); false when the worker no longer owned it.
    pub async fn release(&self, id: &str, worker: &str, now_ms: i64) -> Result<bool, QueueError> {
        let (id, worker) = (id.to_string(), worker.to_string());
        dispatch!(self.release(id, worker, now_ms))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::spec::BuildRequest;

    fn new(id: &str, repo: &str, key: Option<&str>, image: &str) -> NewBuild {
        let req: BuildRequest = serde_json::from_value(serde_json::json!({
            "repository": repo, "image": image,
        }))
        .expect("request");
        let (spec, _) = req.validate().expect("valid");
        NewBuild {
            id: id.into(),
            spec,
            token: None,
            idempotency_key: key.map(str::to_string),
            request_hash: image.into(),
            now_ms: 1,
        }
    }

    fn queue() -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().expect("temp dir");
        let q = Queue::Sqlite(SqliteQueue::open(&dir.path().join("q.db")).expect("open"));
        (dir, q)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    async fn claim(q: &Queue) -> Option<String> {
        q.claim("w", 10, 1000)
            .await
            .expect("claim")
            .map(|c| c.build.id)
    }

    fn done() -> Outcome {
        Outcome {
            state: State::Succeeded,
            digest: Some("sha256:x".into()),
            tags: vec![],
            error: None,
            deploy: None,
        }
    }

    #[test]
    fn one_repository_runs_in_order_others_in_parallel() {
        let (_d, q) = queue();
        rt().block_on(async {
            for (id, repo) in [
                ("a1", "https://h/o/a.git"),
                ("a2", "https://H/o/a/"),
                ("b1", "https://h/o/b"),
            ] {
                q.insert(new(id, repo, None, "r.example/x:1"))
                    .await
                    .expect("insert");
            }
            assert_eq!(claim(&q).await.as_deref(), Some("a1"));
            assert_eq!(claim(&q).await.as_deref(), Some("b1"), "a2 waits for a1");
            assert_eq!(claim(&q).await, None);
            assert!(q.finish("a1", "w", done(), 20).await.expect("finish"));
            assert!(
                !q.finish("a1", "w", done(), 20).await.expect("finish"),
                "once"
            );
            assert_eq!(claim(&q).await.as_deref(), Some("a2"));
        });
    }

    #[test]
    fn lost_builds_are_requeued_once_then_failed() {
        let (_d, q) = queue();
        rt().block_on(async {
            q.insert(new("a", "https://h/o/a", None, "r.example/x:1"))
                .await
                .expect("insert");
            claim(&q).await.expect("claimed");
            assert_eq!(
                q.recover(100, true).await.expect("recover"),
                [("a".to_string(), State::Queued)]
            );
            claim(&q).await.expect("claimed again");
            assert_eq!(
                q.recover(100, true).await.expect("recover"),
                [("a".to_string(), State::Failed)]
            );
            let b = q.get("a").await.expect("get").expect("exists");
            assert_eq!((b.state, b.attempts), (State::Failed, 2));
            assert_eq!(b.error.as_deref(), Some(LOST_TWICE));
            // A lease that has not run out is left alone.
            q.insert(new("b", "https://h/o/b", None, "r.example/x:1"))
                .await
                .expect("insert");
            claim(&q).await.expect("claimed");
            assert!(q.recover(500, false).await.expect("recover").is_empty());
            assert_eq!(q.recover(5000, false).await.expect("recover").len(), 1);
        });
    }

    #[test]
    fn idempotency_keys_and_deletes() {
        let (_d, q) = queue();
        rt().block_on(async {
            let first = q.insert(new("a", "https://h/o/a", Some("k"), "r.example/x:1")).await.expect("insert");
            assert!(matches!(first, Inserted::New(_)));
            let again = q.insert(new("b", "https://h/o/a", Some("k"), "r.example/x:1")).await.expect("insert");
            assert!(matches!(again, Inserted::Existing(b) if b.id == "a"));
            let other = q.insert(new("c", "https://h/o/a", Some("k"), "r.example/x:2")).await.expect("insert");
            assert!(matches!(other, Inserted::KeyConflict));
            q.insert(new("d", "https://h/o/d", None, "r.example/x:1")).await.expect("insert");
            assert_eq!(claim(&q).await.as_deref(), Some("a"));
            assert!(matches!(q.delete("d", 5).await.expect("delete"), Deleted::Cancelled(b) if b.state == State::Cancelled));
            assert!(matches!(q.delete("a", 5).await.expect("delete"), Deleted::Cancelling(_)));
            assert_eq!(q.heartbeat("a", "w", 99).await.expect("beat"), Beat { owned: true, cancel: true });
            assert!(!q.heartbeat("a", "other", 99).await.expect("beat").owned);
            assert!(matches!(q.delete("zz", 5).await.expect("delete"), Deleted::NotFound));
            assert!(matches!(q.delete("d", 5).await.expect("delete"), Deleted::Finished(_)));
            let page = q.list(None, 1, None).await.expect("list");
            assert_eq!(page.builds.len(), 1);
            let rest = q.list(None, 10, page.next).await.expect("list");
            assert_eq!(rest.builds.len(), 1);
            assert_eq!(q.events("d", 0).await.expect("events").len(), 2);
        });
    }
}
