//! The embedded queue: SQLite in WAL mode with `synchronous=FULL`, so a build acknowledged
//! with 202 survives a power cut. One connection behind a mutex, used from blocking tasks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    Beat, COLUMNS, Claimed, Deleted, Inserted, LOST_TWICE, MAX_ATTEMPTS, NewBuild, Outcome, Page,
    QueueError, RELEASED, Row, StoredEvent,
};
use crate::serve::spec::{Build, State};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idem_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    repo_key TEXT NOT NULL,
    spec TEXT NOT NULL,
    token TEXT,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    digest TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    commit_id TEXT,
    deploy TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_ms INTEGER,
    cancel INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS builds_state ON builds (state, seq);
CREATE INDEX IF NOT EXISTS builds_repo ON builds (repo_key, state, seq);
CREATE TABLE IF NOT EXISTS events (
    build_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (build_id, n)
);
";

/// The SQLite queue: one writer connection, and reader connections that WAL lets run
/// beside it (listing and event streams never wait for a commit's fsync).
#[derive(Clone)]
pub struct SqliteQueue {
    conn: Arc<Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: Arc<std::path::PathBuf>,
}

/// Idle reader connections kept open.
const IDLE_READERS: usize = 8;

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        seq: r.get(0)?,
        id: r.get(1)?,
        spec: r.get(2)?,
        state: r.get(3)?,
        created_ms: r.get(4)?,
        started_ms: r.get(5)?,
        finished_ms: r.get(6)?,
        digest: r.get(7)?,
        tags: r.get(8)?,
        error: r.get(9)?,
        commit: r.get(10)?,
        deploy: r.get(11)?,
        attempts: r.get(12)?,
    })
}

fn get(c: &Connection, id: &str) -> Result<Option<Build>, QueueError> {
    c.query_row(
        &format!("SELECT {COLUMNS} FROM builds WHERE id = ?1"),
        [id],
        row,
    )
    .optional()?
    .map(Row::into_build)
    .transpose()
}

fn append(c: &Connection, id: &str, data: &str, now_ms: i64) -> Result<i64, QueueError> {
    Ok(c.query_row(
        "INSERT INTO events (build_id, n, at_ms, data)
         SELECT ?1, COALESCE(MAX(n), 0) + 1, ?2, ?3 FROM events WHERE build_id = ?1
         RETURNING n",
        params![id, now_ms, data],
        |r| r.get(0),
    )?)
}

impl SqliteQueue {
    /// Open (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteQueue, QueueError> {
        let c = Connection::open(path)?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        c.execute_batch(SCHEMA)?;
        Ok(SqliteQueue {
            conn: Arc::new(Mutex::new(c)),
            readers: Arc::default(),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// Run a read-only `f` on a reader connection.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (readers, path) = (self.readers.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let idle = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let c = match idle {
                Some(c) => c,
                None => {
                    let c = Connection::open(&*path)?;
                    c.busy_timeout(std::time::Duration::from_secs(10))?;
                    c.pragma_update(None, "query_only", true)?;
                    c
                }
            };
            let out = f(&c);
            let mut idle = readers.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_READERS {
                idle.push(c);
            }
            out
        })
        .await
        .map_err(|e| QueueError::Join(e.to_string()))?
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| QueueError::Join(e.to_string()))?
    }

    pub(super) async fn insert(&self, b: NewBuild) -> Result<Inserted, QueueError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(key) = &b.idempotency_key {
                let found: Option<(String, String)> = tx
                    .query_row(
                        "SELECT id, request_hash FROM builds WHERE idem_key = ?1",
                        [key],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((id, hash)) = found {
                    if hash != b.request_hash {
                        return Ok(Inserted::KeyConflict);
                    }
                    let build = get(&tx, &id)?.ok_or_else(|| QueueError::Corrupt(id.clone()))?;
                    return Ok(Inserted::Existing(build));
                }
            }
            let spec = serde_json::to_string(&b.spec).map_err(|e| QueueError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO builds (id, idem_key, request_hash, repo_key, spec, token, state, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7)",
                params![
                    b.id,
                    b.idempotency_key,
                    b.request_hash,
                    b.spec.repo_key(),
                    spec,
                    b.token,
                    b.now_ms
                ],
            )?;
            append(&tx, &b.id, r#"{"type":"state","state":"queued"}"#, b.now_ms)?;
            let build = get(&tx, &b.id)?.ok_or_else(|| QueueError::Corrupt(b.id.clone()))?;
            tx.commit()?;
            Ok(Inserted::New(build))
        })
        .await
    }

    pub(super) async fn get(&self, id: String) -> Result<Option<Build>, QueueError> {
        self.read(move |c| get(c, &id)).await
    }

    pub(super) async fn list(
        &self,
        state: Option<State>,
        limit: i64,
        cursor: Option<i64>,
    ) -> Result<Page, QueueError> {
        self.read(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM builds
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR seq < ?2)
                 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![state.map(State::as_str), cursor, limit], row)?
                .collect::<Result<Vec<Row>, _>>()?;
            let next = if rows.len() as i64 == limit {
                rows.last().map(|r| r.seq)
            } else {
                None
            };
            let builds = rows
                .into_iter()
                .map(Row::into_build)
                .collect::<Result<_, _>>()?;
            Ok(Page { builds, next })
        })
        .await
    }

    pub(super) async fn delete(&self, id: String, now_ms: i64) -> Result<Deleted, QueueError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let state: Option<String> = tx
                .query_row("SELECT state FROM builds WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()?;
            let out = match state.as_deref() {
                None => return Ok(Deleted::NotFound),
                Some("queued") => {
                    tx.execute(
                        "UPDATE builds SET state = 'cancelled', finished_ms = ?2, token = NULL,
                         error = 'deleted while queued' WHERE id = ?1",
                        params![id, now_ms],
                    )?;
                    append(
                        &tx,
                        &id,
                        r#"{"type":"state","state":"cancelled","error":"deleted while queued"}"#,
                        now_ms,
                    )?;
                    Deleted::Cancelled
                }
                Some("running") => {
                    tx.execute("UPDATE builds SET cancel = 1 WHERE id = ?1", [&id])?;
                    Deleted::Cancelling
                }
                Some(_) => Deleted::Finished,
            };
            let build = get(&tx, &id)?.ok_or_else(|| QueueError::Corrupt(id.clone()))?;
            tx.commit()?;
            Ok(out(build))
        })
        .await
    }

    pub(super) async fn claim(
        &self,
        worker: String,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Claimed>, QueueError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id: Option<String> = tx
                .query_row(
                    "SELECT id FROM builds b WHERE state = 'queued' AND NOT EXISTS (
                         SELECT 1 FROM builds e WHERE e.repo_key = b.repo_key AND e.seq < b.seq
                         AND e.state IN ('queued', 'running'))
                     ORDER BY seq LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(id) = id else { return Ok(None) };
            let token: Option<String> = tx.query_row(
                "UPDATE builds SET state = 'running', started_ms = ?2, attempts = attempts + 1,
                 worker = ?3, lease_ms = ?4, error = NULL WHERE id = ?1 RETURNING token",
                params![id, now_ms, worker, now_ms + lease_ms],
                |r| r.get(0),
            )?;
            append(&tx, &id, r#"{"type":"state","state":"running"}"#, now_ms)?;
            let build = get(&tx, &id)?.ok_or_else(|| QueueError::Corrupt(id.clone()))?;
            tx.commit()?;
            Ok(Some(Claimed { build, token }))
        })
        .await
    }

    pub(super) async fn heartbeat(
        &self,
        id: String,
        worker: String,
        until_ms: i64,
    ) -> Result<Beat, QueueError> {
        self.with(move |c| {
            let cancel: Option<i64> = c
                .query_row(
                    "UPDATE builds SET lease_ms = ?3 WHERE id = ?1 AND worker = ?2
                     AND state = 'running' RETURNING cancel",
                    params![id, worker, until_ms],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(Beat {
                owned: cancel.is_some(),
                cancel: cancel.unwrap_or(0) != 0,
            })
        })
        .await
    }

    pub(super) async fn set_commit(&self, id: String, commit: String) -> Result<(), QueueError> {
        self.with(move |c| {
            c.execute(
                "UPDATE builds SET commit_id = ?2 WHERE id = ?1",
                params![id, commit],
            )?;
            Ok(())
        })
        .await
    }

    pub(super) async fn finish(
        &self,
        id: String,
        worker: String,
        o: Outcome,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        self.with(move |c| {
            let tags =
                serde_json::to_string(&o.tags).map_err(|e| QueueError::Corrupt(e.to_string()))?;
            let deploy = o.deploy.as_ref().map(ToString::to_string);
            let n = c.execute(
                "UPDATE builds SET state = ?3, finished_ms = ?4, digest = ?5, tags = ?6,
                 error = ?7, deploy = ?8, token = NULL, worker = NULL, lease_ms = NULL
                 WHERE id = ?1 AND worker = ?2 AND state = 'running'",
                params![
                    id,
                    worker,
                    o.state.as_str(),
                    now_ms,
                    o.digest,
                    tags,
                    o.error,
                    deploy
                ],
            )?;
            Ok(n == 1)
        })
        .await
    }

    pub(super) async fn release(
        &self,
        id: String,
        worker: String,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE builds SET state = 'queued', attempts = attempts - 1, worker = NULL,
                 lease_ms = NULL, started_ms = NULL
                 WHERE id = ?1 AND worker = ?2 AND state = 'running' AND cancel = 0",
                params![id, worker],
            )?;
            if n == 1 {
                append(&tx, &id, RELEASED, now_ms)?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }

    pub(super) async fn recover(
        &self,
        now_ms: i64,
        all: bool,
    ) -> Result<Vec<(String, State)>, QueueError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let lost: Vec<(String, i64, i64)> = tx
                .prepare(
                    "SELECT id, attempts, cancel FROM builds
                     WHERE state = 'running' AND (?1 OR lease_ms < ?2) ORDER BY seq",
                )?
                .query_map(params![all, now_ms], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::new();
            for (id, attempts, cancel) in lost {
                let (state, error) = if cancel != 0 {
                    (State::Cancelled, Some("cancelled while running"))
                } else if attempts >= MAX_ATTEMPTS {
                    (State::Failed, Some(LOST_TWICE))
                } else {
                    (State::Queued, None)
                };
                if state == State::Queued {
                    tx.execute(
                        "UPDATE builds SET state = 'queued', worker = NULL, lease_ms = NULL,
                         started_ms = NULL WHERE id = ?1",
                        [&id],
                    )?;
                } else {
                    tx.execute(
                        "UPDATE builds SET state = ?2, error = ?3, finished_ms = ?4,
                         token = NULL, worker = NULL, lease_ms = NULL WHERE id = ?1",
                        params![id, state.as_str(), error, now_ms],
                    )?;
                }
                let ev = serde_json::json!({
                    "type": "state", "state": state.as_str(),
                    "reason": "the worker running this build stopped", "error": error,
                });
                append(&tx, &id, &ev.to_string(), now_ms)?;
                out.push((id, state));
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    pub(super) async fn append_event(
        &self,
        id: String,
        data: String,
        now_ms: i64,
    ) -> Result<i64, QueueError> {
        self.with(move |c| append(c, &id, &data, now_ms)).await
    }

    pub(super) async fn events(
        &self,
        id: String,
        after: i64,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        self.read(move |c| {
            let mut stmt = c.prepare(
                "SELECT n, data FROM events WHERE build_id = ?1 AND n > ?2 ORDER BY n LIMIT 1000",
            )?;
            let v = stmt
                .query_map(params![id, after], |r| {
                    Ok(StoredEvent {
                        n: r.get(0)?,
                        data: r.get(1)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(v)
        })
        .await
    }

    pub(super) async fn counts(&self) -> Result<BTreeMap<State, i64>, QueueError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT state, COUNT(*) FROM builds GROUP BY state")?;
            let mut out = BTreeMap::new();
            for r in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (s, n) = r?;
                if let Ok(s) = s.parse() {
                    out.insert(s, n);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn prune(&self, before_ms: i64) -> Result<u64, QueueError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM events WHERE build_id IN
                 (SELECT id FROM builds WHERE finished_ms < ?1)",
                [before_ms],
            )?;
            let n = tx.execute("DELETE FROM builds WHERE finished_ms < ?1", [before_ms])?;
            tx.commit()?;
            Ok(n as u64)
        })
        .await
    }
}
