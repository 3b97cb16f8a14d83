//! The HTTP API (axum): builds, their events as Server-Sent Events, the Gitea webhook,
//! health and metrics. Every error is JSON `{"error": "…"}` with a 4xx/5xx status; an
//! unauthenticated request gets 401 whatever it asked for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::Shared;
use super::queue::{Deleted, Inserted, NewBuild};
use super::spec::{Build, BuildRequest};
use super::worker::now_ms;

/// An API error: a status and a message for the client.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(json!({"error": self.1}))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such build".into())
}

impl From<super::QueueError> for ApiError {
    fn from(e: super::QueueError) -> ApiError {
        tracing::error!(error = %super::chain(&e), "queue");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The API's routes over `shared`.
pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/api/v1/builds", post(create).get(list))
        .route("/api/v1/builds/{id}", get(show).delete(delete))
        .route("/api/v1/builds/{id}/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/hooks/gitea", post(gitea))
        .merge(api)
        .layer(DefaultBodyLimit::max(shared.max_body))
        .with_state(shared)
}

/// Equal in constant time (by comparing hashes, so lengths leak nothing either).
fn same_secret(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if s.insecure_no_auth {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Check every token, so timing does not tell which one matched.
    let ok = given.is_some_and(|g| {
        s.tokens
            .iter()
            .fold(false, |acc, t| same_secret(g, t.expose()) | acc)
    });
    if ok {
        next.run(req).await
    } else {
        ApiError(StatusCode::UNAUTHORIZED, "unauthorized".into()).into_response()
    }
}

/// A build as the API returns it: the record plus its URLs.
fn resource(b: &Build) -> Value {
    let mut v = serde_json::to_value(b).unwrap_or_else(|_| json!({}));
    v["url"] = json!(format!("/api/v1/builds/{}", b.id));
    v["events_url"] = json!(format!("/api/v1/builds/{}/events", b.id));
    v
}

/// A new build id: time-ordered, unguessable.
fn new_id() -> String {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut r = [0u8; 8];
    let _ = SystemRandom::new().fill(&mut r);
    let rand: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{:012x}{rand}", now_ms())
}

/// Ids are hex; anything else is unknown without asking the database.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large".to_string()
        } else {
            format!("unreadable request body: {e}")
        };
        ApiError(status, msg)
    })
}

/// Queue `req`; `key` makes it idempotent. Returns the build and whether it already existed.
pub(crate) async fn enqueue(
    s: &Shared,
    req: BuildRequest,
    key: Option<String>,
) -> ApiResult<(Build, bool)> {
    let (spec, token) = req.validate().map_err(|e| bad(e.0))?;
    if s.engine.cluster.is_none()
        && spec
            .deploy
            .as_ref()
            .is_some_and(|d| d.get("apply").is_some())
    {
        return Err(bad(
            "deploy.apply: this server has no cluster to apply to (start it with --kubeconfig)",
        ));
    }
    let id = new_id();
    let sealed = match token {
        Some(t) => Some(s.seal.seal(&id, &t).map_err(|e| {
            tracing::error!(error = %e, "sealing a token");
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
        })?),
        None => None,
    };
    let hash = Sha256::digest(serde_json::to_vec(&spec).unwrap_or_default());
    let request_hash: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let inserted = s
        .queue
        .insert(NewBuild {
            id,
            spec,
            token: sealed,
            idempotency_key: key,
            request_hash,
            now_ms: now_ms(),
        })
        .await?;
    match inserted {
        Inserted::New(b) => {
            tracing::info!(build = %b.id, repository = %b.request.repository, "build queued");
            s.wake.notify_waiters();
            s.tick();
            Ok((b, false))
        }
        Inserted::Existing(b) => Ok((b, true)),
        Inserted::KeyConflict => Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key was already used for a different request".into(),
        )),
    }
}

async fn create(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let raw = body(raw)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| bad("Idempotency-Key must be 1 to 255 visible ASCII characters"))?;
            Some(k.to_string())
        }
    };
    let req: BuildRequest =
        serde_json::from_slice(&raw).map_err(|e| bad(format!("invalid build request: {e}")))?;
    let (b, replayed) = enqueue(&s, req, key).await?;
    let url = format!("/api/v1/builds/{}", b.id);
    let mut r = (StatusCode::ACCEPTED, axum::Json(resource(&b))).into_response();
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(r)
}

async fn list(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    if let Some(k) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "state" | "limit" | "cursor"))
    {
        return Err(bad(format!(
            "unknown query parameter {k:?} (state, limit, cursor)"
        )));
    }
    let state = q
        .get("state")
        .map(|v| v.parse())
        .transpose()
        .map_err(|e: super::spec::Invalid| bad(e.0))?;
    let limit = match q.get("limit") {
        None => 50,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| bad("limit must be a number from 1 to 500"))?,
    };
    let cursor = q
        .get("cursor")
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|c| *c > 0)
                .ok_or_else(|| bad("invalid cursor"))
        })
        .transpose()?;
    let page = s.queue.list(state, limit, cursor).await?;
    let builds: Vec<Value> = page.builds.iter().map(resource).collect();
    Ok(axum::Json(json!({
        "builds": builds,
        "next_cursor": page.next.map(|c| c.to_string()),
    }))
    .into_response())
}

async fn show(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult<Response> {
    if !valid_id(&id) {
        return Err(not_found());
    }
    let b = s.queue.get(&id).await?.ok_or_else(not_found)?;
    Ok(axum::Json(resource(&b)).into_response())
}

async fn delete(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult<Response> {
    if !valid_id(&id) {
        return Err(not_found());
    }
    let out = s.queue.delete(&id, now_ms()).await?;
    s.tick();
    Ok(match out {
        Deleted::NotFound => return Err(not_found()),
        Deleted::Cancelled(b) => (StatusCode::OK, axum::Json(resource(&b))).into_response(),
        Deleted::Cancelling(b) => {
            // This replica may be running it: stop it now rather than at the next heartbeat.
            if let Some(c) = s.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                c.cancel();
            }
            (StatusCode::ACCEPTED, axum::Json(resource(&b))).into_response()
        }
        Deleted::Finished(b) => {
            let msg = format!("build {} already ended ({})", b.id, b.state.as_str());
            return Err(ApiError(StatusCode::CONFLICT, msg));
        }
    })
}

type SseItem = Result<SseEvent, std::convert::Infallible>;

/// The build's events from the start (or after `Last-Event-ID`), then live ones, until it
/// ends.
async fn events(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = SseItem>>> {
    if !valid_id(&id) || s.queue.get(&id).await?.is_none() {
        return Err(not_found());
    }
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    let ticks = s.events.subscribe();
    let state = (s, id, after, ticks, false);
    let st = stream::unfold(state, |(s, id, mut after, mut ticks, done)| async move {
        if done {
            return None;
        }
        loop {
            if s.stopping() {
                return None;
            }
            let Ok(evs) = s.queue.events(&id, after).await else {
                return None;
            };
            if let Some(last) = evs.last() {
                after = last.n;
                let items: Vec<SseItem> = evs
                    .into_iter()
                    .map(|e| {
                        let kind = serde_json::from_str::<Value>(&e.data)
                            .ok()
                            .and_then(|v| v["type"].as_str().map(str::to_string))
                            .unwrap_or_else(|| "message".into());
                        Ok(SseEvent::default()
                            .id(e.n.to_string())
                            .event(kind)
                            .data(e.data))
                    })
                    .collect();
                return Some((stream::iter(items), (s, id, after, ticks, false)));
            }
            let ended = match s.queue.get(&id).await {
                Ok(Some(b)) => b.state.is_final(),
                _ => true,
            };
            if ended {
                // The final event is stored before the final state: one more look.
                let rest = s.queue.events(&id, after).await.unwrap_or_default();
                if rest.is_empty() {
                    return None;
                }
                continue;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), ticks.changed()).await;
        }
    })
    .flatten();
    Ok(Sse::new(st).keep_alive(KeepAlive::default()))
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    match s.queue.counts().await {
        Ok(_) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        Err(e) => {
            tracing::error!(error = %super::chain(&e), "health check");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "queue unavailable"})),
            )
                .into_response()
        }
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> ApiResult<Response> {
    let counts = s.queue.counts().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(&counts),
    )
        .into_response())
}

async fn gitea(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let unauthorized = || ApiError(StatusCode::UNAUTHORIZED, "unauthorized".into());
    let hooks = s.hooks.as_ref().ok_or_else(unauthorized)?;
    let raw = body(raw)?;
    let sig = headers
        .get("x-gitea-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    if !hooks.verify(&raw, sig) {
        return Err(unauthorized());
    }
    let event = headers
        .get("x-gitea-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("push");
    if event != "push" {
        return Ok(axum::Json(json!({"builds": [], "ignored": event})).into_response());
    }
    let delivery = headers
        .get("x-gitea-delivery")
        .and_then(|v| v.to_str().ok())
        .filter(|d| !d.is_empty() && d.len() <= 200)
        .map(str::to_string);
    let reqs = hooks.requests(&raw).map_err(|e| bad(e.0))?;
    let mut out = Vec::new();
    for (i, req) in reqs.into_iter().enumerate() {
        let key = delivery.as_ref().map(|d| format!("gitea:{d}:{i}"));
        let (b, _) = enqueue(&s, req, key).await?;
        out.push(resource(&b));
    }
    let status = if out.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, axum::Json(json!({"builds": out}))).into_response())
}
