//! The shared queue: PostgreSQL, for several `strata serve` replicas. Every operation is one
//! statement (autocommit), so one pipelined client serves all tasks; a claim locks its row
//! with `FOR UPDATE SKIP LOCKED`, so replicas never take the same build.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use super::{
    Beat, COLUMNS, Claimed, Deleted, Inserted, LOST_TWICE, MAX_ATTEMPTS, NewBuild, Outcome, Page,
    QueueError, RELEASED, Row, StoredEvent,
};
use crate::serve::spec::{Build, State};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    idem_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    repo_key TEXT NOT NULL,
    spec TEXT NOT NULL,
    token TEXT,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT,
    finished_ms BIGINT,
    digest TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    commit_id TEXT,
    deploy TEXT,
    attempts BIGINT NOT NULL DEFAULT 0,
    worker TEXT,
    lease_ms BIGINT,
    cancel BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS builds_state ON builds (state, seq);
CREATE INDEX IF NOT EXISTS builds_repo ON builds (repo_key, state, seq);
CREATE TABLE IF NOT EXISTS events (
    build_id TEXT NOT NULL,
    n BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (build_id, n)
);
";

/// The PostgreSQL queue.
#[derive(Clone)]
pub struct PgQueue {
    client: Arc<Client>,
}

fn row(r: &tokio_postgres::Row) -> Row {
    Row {
        seq: r.get(0),
        id: r.get(1),
        spec: r.get(2),
        state: r.get(3),
        created_ms: r.get(4),
        started_ms: r.get(5),
        finished_ms: r.get(6),
        digest: r.get(7),
        tags: r.get(8),
        error: r.get(9),
        commit: r.get(10),
        deploy: r.get(11),
        attempts: r.get(12),
    }
}

fn corrupt(e: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(e.to_string())
}

impl PgQueue {
    /// Connect to `url` (`postgres://…`, or `host=/run/postgresql …`) without TLS: meant for
    /// loopback, a unix socket or a private network.
    pub async fn connect(url: &str) -> Result<PgQueue, QueueError> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::error!(error = %e, "postgres connection ended");
            }
        });
        // Replicas starting together race on CREATE … IF NOT EXISTS; an advisory lock
        // serialises the schema set-up.
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_lock(7215); {SCHEMA} SELECT pg_advisory_unlock(7215);"
            ))
            .await?;
        Ok(PgQueue {
            client: Arc::new(client),
        })
    }

    async fn get_one(&self, id: &str) -> Result<Option<Build>, QueueError> {
        let r = self
            .client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM builds WHERE id = $1"),
                &[&id],
            )
            .await?;
        r.map(|r| row(&r).into_build()).transpose()
    }

    async fn append(&self, id: &str, data: &str, now_ms: i64) -> Result<i64, QueueError> {
        // Two writers of one build's log are rare (worker and a recovering replica); the
        // primary key turns a collision into an error, retried once.
        let sql = "INSERT INTO events (build_id, n, at_ms, data)
             SELECT $1, COALESCE(MAX(n), 0) + 1, $2, $3 FROM events WHERE build_id = $1
             RETURNING n";
        match self.client.query_one(sql, &[&id, &now_ms, &data]).await {
            Ok(r) => Ok(r.get(0)),
            Err(_) => Ok(self
                .client
                .query_one(sql, &[&id, &now_ms, &data])
                .await?
                .get(0)),
        }
    }

    pub(super) async fn insert(&self, b: NewBuild) -> Result<Inserted, QueueError> {
        let spec = serde_json::to_string(&b.spec).map_err(corrupt)?;
        let inserted = self
            .client
            .query_opt(
                "INSERT INTO builds (id, idem_key, request_hash, repo_key, spec, token, state, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7)
                 ON CONFLICT (idem_key) DO NOTHING RETURNING id",
                &[
                    &b.id,
                    &b.idempotency_key,
                    &b.request_hash,
                    &b.spec.repo_key(),
                    &spec,
                    &b.token,
                    &b.now_ms,
                ],
            )
            .await?;
        if inserted.is_some() {
            self.append(&b.id, r#"{"type":"state","state":"queued"}"#, b.now_ms)
                .await?;
            let build = self.get_one(&b.id).await?.ok_or_else(|| corrupt(&b.id))?;
            return Ok(Inserted::New(build));
        }
        let key = b.idempotency_key.as_deref().unwrap_or_default();
        let r = self
            .client
            .query_one(
                "SELECT id, request_hash FROM builds WHERE idem_key = $1",
                &[&key],
            )
            .await?;
        let (id, hash): (String, String) = (r.get(0), r.get(1));
        if hash != b.request_hash {
            return Ok(Inserted::KeyConflict);
        }
        let build = self.get_one(&id).await?.ok_or_else(|| corrupt(&id))?;
        Ok(Inserted::Existing(build))
    }

    pub(super) async fn get(&self, id: String) -> Result<Option<Build>, QueueError> {
        self.get_one(&id).await
    }

    pub(super) async fn list(
        &self,
        state: Option<State>,
        limit: i64,
        cursor: Option<i64>,
    ) -> Result<Page, QueueError> {
        let state = state.map(State::as_str);
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM builds
                     WHERE ($1::TEXT IS NULL OR state = $1) AND ($2::BIGINT IS NULL OR seq < $2)
                     ORDER BY seq DESC LIMIT $3"
                ),
                &[&state, &cursor, &limit],
            )
            .await?;
        let rows: Vec<Row> = rows.iter().map(row).collect();
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
    }

    pub(super) async fn delete(&self, id: String, now_ms: i64) -> Result<Deleted, QueueError> {
        let cancelled = self
            .client
            .execute(
                "UPDATE builds SET state = 'cancelled', finished_ms = $2, token = NULL,
                 error = 'deleted while queued' WHERE id = $1 AND state = 'queued'",
                &[&id, &now_ms],
            )
            .await?;
        if cancelled == 1 {
            self.append(
                &id,
                r#"{"type":"state","state":"cancelled","error":"deleted while queued"}"#,
                now_ms,
            )
            .await?;
            let b = self.get_one(&id).await?.ok_or_else(|| corrupt(&id))?;
            return Ok(Deleted::Cancelled(b));
        }
        let asked = self
            .client
            .execute(
                "UPDATE builds SET cancel = TRUE WHERE id = $1 AND state = 'running'",
                &[&id],
            )
            .await?;
        Ok(match self.get_one(&id).await? {
            None => Deleted::NotFound,
            Some(b) if asked == 1 => Deleted::Cancelling(b),
            Some(b) if b.state == State::Queued => Deleted::Cancelling(b),
            Some(b) => Deleted::Finished(b),
        })
    }

    pub(super) async fn claim(
        &self,
        worker: String,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Claimed>, QueueError> {
        let until = now_ms + lease_ms;
        let r = self
            .client
            .query_opt(
                "UPDATE builds SET state = 'running', started_ms = $1, attempts = attempts + 1,
                 worker = $2, lease_ms = $3, error = NULL
                 WHERE state = 'queued' AND id = (
                     SELECT id FROM builds b WHERE state = 'queued' AND NOT EXISTS (
                         SELECT 1 FROM builds e WHERE e.repo_key = b.repo_key AND e.seq < b.seq
                         AND e.state IN ('queued', 'running'))
                     ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, token",
                &[&now_ms, &worker, &until],
            )
            .await?;
        let Some(r) = r else { return Ok(None) };
        let (id, token): (String, Option<String>) = (r.get(0), r.get(1));
        self.append(&id, r#"{"type":"state","state":"running"}"#, now_ms)
            .await?;
        let build = self.get_one(&id).await?.ok_or_else(|| corrupt(&id))?;
        Ok(Some(Claimed { build, token }))
    }

    pub(super) async fn heartbeat(
        &self,
        id: String,
        worker: String,
        until_ms: i64,
    ) -> Result<Beat, QueueError> {
        let r = self
            .client
            .query_opt(
                "UPDATE builds SET lease_ms = $3 WHERE id = $1 AND worker = $2
                 AND state = 'running' RETURNING cancel",
                &[&id, &worker, &until_ms],
            )
            .await?;
        Ok(Beat {
            owned: r.is_some(),
            cancel: r.is_some_and(|r| r.get::<_, bool>(0)),
        })
    }

    pub(super) async fn set_commit(&self, id: String, commit: String) -> Result<(), QueueError> {
        self.client
            .execute(
                "UPDATE builds SET commit_id = $2 WHERE id = $1",
                &[&id, &commit],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn finish(
        &self,
        id: String,
        worker: String,
        o: Outcome,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let tags = serde_json::to_string(&o.tags).map_err(corrupt)?;
        let deploy = o.deploy.as_ref().map(ToString::to_string);
        let n = self
            .client
            .execute(
                "UPDATE builds SET state = $3, finished_ms = $4, digest = $5, tags = $6,
                 error = $7, deploy = $8, token = NULL, worker = NULL, lease_ms = NULL
                 WHERE id = $1 AND worker = $2 AND state = 'running'",
                &[
                    &id,
                    &worker,
                    &o.state.as_str(),
                    &now_ms,
                    &o.digest,
                    &tags,
                    &o.error,
                    &deploy,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn release(
        &self,
        id: String,
        worker: String,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let n = self
            .client
            .execute(
                "UPDATE builds SET state = 'queued', attempts = attempts - 1, worker = NULL,
                 lease_ms = NULL, started_ms = NULL
                 WHERE id = $1 AND worker = $2 AND state = 'running' AND NOT cancel",
                &[&id, &worker],
            )
            .await?;
        if n == 1 {
            self.append(&id, RELEASED, now_ms).await?;
        }
        Ok(n == 1)
    }

    pub(super) async fn recover(
        &self,
        now_ms: i64,
        all: bool,
    ) -> Result<Vec<(String, State)>, QueueError> {
        // One statement decides every lost build's fate, so two replicas recovering at
        // once cannot both act on a build.
        let rows = self
            .client
            .query(
                "UPDATE builds SET
                   state = CASE WHEN cancel THEN 'cancelled'
                                WHEN attempts >= $3 THEN 'failed' ELSE 'queued' END,
                   error = CASE WHEN cancel THEN 'cancelled while running'
                                WHEN attempts >= $3 THEN $4 ELSE NULL END,
                   finished_ms = CASE WHEN cancel OR attempts >= $3 THEN $1 ELSE NULL END,
                   token = CASE WHEN cancel OR attempts >= $3 THEN NULL ELSE token END,
                   started_ms = CASE WHEN cancel OR attempts >= $3 THEN started_ms ELSE NULL END,
                   worker = NULL, lease_ms = NULL
                 WHERE state = 'running' AND ($2 OR lease_ms < $1)
                 RETURNING id, state, error",
                &[&now_ms, &all, &MAX_ATTEMPTS, &LOST_TWICE],
            )
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let (id, state, error): (String, String, Option<String>) =
                (r.get(0), r.get(1), r.get(2));
            let state: State = state.parse().map_err(corrupt)?;
            let ev = serde_json::json!({
                "type": "state", "state": state.as_str(),
                "reason": "the worker running this build stopped", "error": error,
            });
            self.append(&id, &ev.to_string(), now_ms).await?;
            out.push((id, state));
        }
        Ok(out)
    }

    pub(super) async fn append_event(
        &self,
        id: String,
        data: String,
        now_ms: i64,
    ) -> Result<i64, QueueError> {
        self.append(&id, &data, now_ms).await
    }

    pub(super) async fn events(
        &self,
        id: String,
        after: i64,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        let rows = self
            .client
            .query(
                "SELECT n, data FROM events WHERE build_id = $1 AND n > $2 ORDER BY n LIMIT 1000",
                &[&id, &after],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredEvent {
                n: r.get(0),
                data: r.get(1),
            })
            .collect())
    }

    pub(super) async fn counts(&self) -> Result<BTreeMap<State, i64>, QueueError> {
        let rows = self
            .client
            .query("SELECT state, COUNT(*) FROM builds GROUP BY state", &[])
            .await?;
        let mut out = BTreeMap::new();
        for r in rows {
            if let Ok(s) = r.get::<_, String>(0).parse() {
                out.insert(s, r.get::<_, i64>(1));
            }
        }
        Ok(out)
    }

    pub(super) async fn prune(&self, before_ms: i64) -> Result<u64, QueueError> {
        self.client
            .execute(
                "DELETE FROM events WHERE build_id IN
                 (SELECT id FROM builds WHERE finished_ms < $1)",
                &[&before_ms],
            )
            .await?;
        Ok(self
            .client
            .execute("DELETE FROM builds WHERE finished_ms < $1", &[&before_ms])
            .await?)
    }
}
