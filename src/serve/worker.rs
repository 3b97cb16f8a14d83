//! The worker pool: each worker claims a build, runs it on a blocking thread with the
//! embedded engine, renews its lease meanwhile (learning of cancellations from other
//! replicas), streams its events into the queue, and records the outcome once.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Shared;
use super::job::{self, Cancel, JobError};
use super::queue::{Claimed, Outcome};
use super::spec::State;

/// Milliseconds since 1970 (the server's clock, read here and in the API only).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Worker `n`: claim, run, repeat.
pub async fn worker(shared: Arc<Shared>, n: usize) {
    let me = format!("{}/{n}", shared.instance);
    while !shared.stopping() {
        let lease = shared.lease.as_millis() as i64;
        // Register for a wake-up before looking, so an enqueue in between is not missed.
        let woken = shared.wake.notified();
        let stop = shared.stop.notified();
        match shared.queue.claim(&me, now_ms(), lease).await {
            Ok(Some(c)) => run_claimed(&shared, &me, c).await,
            Ok(None) => {
                tokio::select! {
                    () = woken => {}
                    () = stop => {}
                    () = tokio::time::sleep(shared.poll) => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::serve::chain(&e), "claiming a build failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Store a job's events in order and wake the listeners.
async fn pump(shared: Arc<Shared>, id: String, mut rx: mpsc::UnboundedReceiver<Value>) {
    while let Some(v) = rx.recv().await {
        if v["type"] == "fetched"
            && let Some(c) = v["commit"].as_str()
            && let Err(e) = shared.queue.set_commit(&id, c).await
        {
            tracing::warn!(build = %id, error = %crate::serve::chain(&e), "recording the commit failed");
        }
        if let Err(e) = shared
            .queue
            .append_event(&id, v.to_string(), now_ms())
            .await
        {
            tracing::warn!(build = %id, error = %crate::serve::chain(&e), "storing an event failed");
        }
        shared.tick();
    }
}

/// Renew the lease until the build ends; pass cancellations on; stop the build if the lease
/// was lost (another replica re-queued it).
async fn heartbeat(shared: Arc<Shared>, id: String, me: String, cancel: Arc<Cancel>) {
    // Often enough that a DELETE sent to another replica stops the build within seconds.
    let every = (shared.lease / 3).min(Duration::from_secs(2));
    loop {
        tokio::time::sleep(every).await;
        let until = now_ms() + shared.lease.as_millis() as i64;
        match shared.queue.heartbeat(&id, &me, until).await {
            Ok(b) if !b.owned => {
                tracing::warn!(build = %id, "lease lost; stopping the build");
                cancel.cancel();
                return;
            }
            Ok(b) if b.cancel => cancel.cancel(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(build = %id, error = %crate::serve::chain(&e), "renewing the lease failed")
            }
        }
    }
}

async fn run_claimed(shared: &Arc<Shared>, me: &str, c: Claimed) {
    let id = c.build.id.clone();
    tracing::info!(build = %id, repository = %c.build.request.repository, "build started");
    shared.tick();
    let cancel = Arc::new(Cancel::default());
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), cancel.clone());
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let pump = tokio::spawn(pump(shared.clone(), id.clone(), rx));
    let beat = tokio::spawn(heartbeat(
        shared.clone(),
        id.clone(),
        me.to_string(),
        cancel.clone(),
    ));
    let started = std::time::Instant::now();
    let token = match c.token.as_deref().map(|t| shared.seal.open(&id, t)) {
        None => Ok(None),
        Some(Ok(t)) => Ok(Some(t)),
        Some(Err(e)) => Err(JobError::Failed(e.to_string())),
    };
    let result = match token {
        Err(e) => Err(e),
        Ok(token) => {
            let engine = shared.engine.clone();
            let spec = c.build.request.clone();
            let cancel = cancel.clone();
            let emit: job::Emit = Arc::new(move |v| {
                let _ = tx.send(v);
            });
            tokio::task::spawn_blocking(move || job::run(&engine, &spec, token, &cancel, emit))
                .await
                .unwrap_or_else(|e| Err(JobError::Failed(format!("the build task failed: {e}"))))
        }
    };
    beat.abort();
    // The job's event sender is gone with it; the pump drains what is left and ends.
    let _ = pump.await;
    let elapsed = started.elapsed();
    if matches!(result, Err(JobError::Cancelled)) && shared.stopping() {
        match shared.queue.release(&id, me, now_ms()).await {
            Ok(true) => {
                tracing::info!(build = %id, "build given back to the queue");
                shared
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(build = %id, error = %crate::serve::chain(&e), "giving the build back failed");
                return;
            }
        }
    }
    let outcome = match &result {
        Ok(r) => Outcome {
            state: State::Succeeded,
            digest: Some(r.digest.clone()),
            tags: r.tags.clone(),
            error: None,
            deploy: r.deploy.clone(),
        },
        Err(JobError::Cancelled) => Outcome {
            state: State::Cancelled,
            digest: None,
            tags: Vec::new(),
            error: Some("cancelled while running".into()),
            deploy: None,
        },
        Err(JobError::Failed(m)) => Outcome {
            state: State::Failed,
            digest: None,
            tags: Vec::new(),
            error: Some(m.clone()),
            deploy: None,
        },
    };
    let last = json!({"type": "state", "state": outcome.state.as_str(), "digest": outcome.digest,
                      "tags": outcome.tags, "error": outcome.error});
    // The final event goes in before the state, so a listener that sees the build ended has
    // every event to read.
    if let Err(e) = shared
        .queue
        .append_event(&id, last.to_string(), now_ms())
        .await
    {
        tracing::warn!(build = %id, error = %crate::serve::chain(&e), "storing an event failed");
    }
    match shared
        .queue
        .finish(&id, me, outcome.clone(), now_ms())
        .await
    {
        Ok(true) => {
            tracing::info!(build = %id, state = outcome.state.as_str(), "build ended");
            if let Ok(r) = &result {
                shared.metrics.layers(r.cache_hits, r.layer_steps);
            }
            shared.metrics.finished(outcome.state, elapsed);
        }
        Ok(false) => {
            tracing::warn!(build = %id, "the build was taken from this worker; its result is dropped")
        }
        Err(e) => {
            tracing::error!(build = %id, error = %crate::serve::chain(&e), "recording the result failed")
        }
    }
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    shared.tick();
    // A build of the same repository may now run.
    shared.wake.notify_waiters();
}
