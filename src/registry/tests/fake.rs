//! An in-memory registry with knobs for misbehaviour: bearer auth with expiring tokens,
//! `_state` that changes on every response (so stale Locations are caught), chunk minimums,
//! refused or broken PATCHes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::server::{Reply, Req};
use crate::digest::Digest;

#[derive(Default)]
pub struct Knobs {
    /// Require `Authorization: Bearer <issued token>`.
    pub bearer: bool,
    /// Expire every token issued so far after this many successful PATCHes.
    pub expire_tokens_after_patches: Option<usize>,
    /// Advertise `OCI-Chunk-Min-Length`.
    pub min_chunk: Option<u64>,
    /// Answer every PATCH with this status.
    pub refuse_patch: Option<u16>,
    /// On PATCH number `.0` (0-based), keep only `.1` bytes of the body and hang up.
    pub break_patch: Option<(usize, usize)>,
    /// Location of upload sessions points here instead (absolute URL prefix).
    pub location_prefix: Option<String>,
    /// Bearer realm to advertise (default: this server's `/token`).
    pub realm: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub knobs: Knobs,
    pub host: String,
    pub tokens_issued: usize,
    pub valid_tokens: HashSet<String>,
    pub sessions: HashMap<String, (u64, Vec<u8>)>,
    pub blobs: HashMap<String, Vec<u8>>,
    pub patches: usize,
    pub next_session: usize,
}

pub type Shared = Arc<Mutex<State>>;

pub fn new(knobs: Knobs) -> Shared {
    Arc::new(Mutex::new(State {
        knobs,
        ..State::default()
    }))
}

fn err(status: u16, code: &str) -> Reply {
    Reply::new(status)
        .json(serde_json::json!({"errors":[{"code":code,"message":code.to_lowercase()}]}))
}

pub fn handle(state: &Shared, req: &Req) -> Reply {
    let mut s = state.lock().unwrap();
    let path = req.path().to_string();
    if path == "/token" {
        s.tokens_issued += 1;
        let t = format!("tok-{}", s.tokens_issued);
        s.valid_tokens.insert(t.clone());
        return Reply::new(200).json(serde_json::json!({"token": t, "expires_in": 300}));
    }
    if s.knobs.bearer {
        let ok = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| s.valid_tokens.contains(t));
        if !ok {
            let realm = s
                .knobs
                .realm
                .clone()
                .unwrap_or_else(|| format!("http://{}/token", s.host));
            return err(401, "UNAUTHORIZED").header(
                "WWW-Authenticate",
                format!(r#"Bearer realm="{realm}",service="fake""#),
            );
        }
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return err(404, "NOT_FOUND");
    };
    if let Some((repo, digest)) = rest.split_once("/blobs/sha256:") {
        let key = format!("{repo}@sha256:{digest}");
        return match (req.method.as_str(), s.blobs.get(&key)) {
            ("HEAD", Some(b)) => Reply::new(200).header("Content-Length", b.len()),
            ("GET", Some(b)) => Reply::new(200).body(b.clone()),
            _ => err(404, "BLOB_UNKNOWN"),
        };
    }
    let Some((repo, upload)) = rest.split_once("/blobs/uploads/") else {
        return err(404, "NOT_FOUND");
    };
    let repo = repo.to_string();
    let location = |s: &State, id: &str, state: u64| {
        let prefix = s.knobs.location_prefix.clone().unwrap_or_default();
        format!("{prefix}/v2/{repo}/blobs/uploads/{id}?_state={state}")
    };
    if req.method == "POST" && upload.is_empty() {
        s.next_session += 1;
        let id = format!("u{}", s.next_session);
        s.sessions.insert(id.clone(), (1, Vec::new()));
        let mut r = Reply::new(202)
            .header("Location", location(&s, &id, 1))
            .header("Range", "0-0");
        if let Some(m) = s.knobs.min_chunk {
            r = r.header("OCI-Chunk-Min-Length", m);
        }
        return r;
    }
    let id = upload.to_string();
    let given_state: u64 = req
        .query("_state")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let Some((current, _)) = s.sessions.get(&id).map(|(st, d)| (*st, d.len())) else {
        return err(404, "BLOB_UPLOAD_UNKNOWN");
    };
    if given_state != current {
        return err(400, "BLOB_UPLOAD_INVALID");
    }
    let next_state = current + 1;
    match req.method.as_str() {
        "PATCH" => {
            if let Some(status) = s.knobs.refuse_patch {
                return err(status, "SIZE_INVALID");
            }
            let have = s.sessions[&id].1.len() as u64;
            let start: u64 = req
                .header("content-range")
                .and_then(|r| r.split('-').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            if start != have {
                return err(416, "BLOB_UPLOAD_INVALID");
            }
            let n = s.patches;
            s.patches += 1;
            let mut body = req.body.clone();
            let broken = s.knobs.break_patch.filter(|(k, _)| *k == n);
            if let Some((_, keep)) = broken {
                body.truncate(keep);
            }
            let sess = s.sessions.get_mut(&id).unwrap();
            sess.1.extend_from_slice(&body);
            // A broken PATCH keeps the session's state: the client must ask for it.
            if broken.is_some() {
                return Reply::hang_up();
            }
            sess.0 = next_state;
            let len = sess.1.len();
            if let Some(after) = s.knobs.expire_tokens_after_patches
                && s.patches == after
            {
                s.valid_tokens.clear();
            }
            Reply::new(202)
                .header("Location", location(&s, &id, next_state))
                .header("Range", format!("0-{}", len.saturating_sub(1)))
        }
        "GET" => {
            let sess = s.sessions.get_mut(&id).unwrap();
            sess.0 = next_state;
            let len = sess.1.len();
            Reply::new(204)
                .header("Location", location(&s, &id, next_state))
                .header("Range", format!("0-{}", len.saturating_sub(1)))
        }
        "PUT" => {
            let (_, mut data) = s.sessions.remove(&id).unwrap();
            data.extend_from_slice(&req.body);
            let digest = req.query("digest").first().cloned().unwrap_or_default();
            if Digest::of(&data).to_string() != digest {
                return err(400, "DIGEST_INVALID");
            }
            s.blobs.insert(format!("{repo}@{digest}"), data);
            Reply::new(201).header("Docker-Content-Digest", digest)
        }
        "DELETE" => {
            s.sessions.remove(&id);
            Reply::new(204)
        }
        _ => err(405, "UNSUPPORTED"),
    }
}
