//! Talking to the remote: list refs, resolve REF, fetch one commit with depth 1.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};

use gix::ObjectId;
use gix::protocol::handshake::Ref;
use gix::protocol::transport::client::blocking_io::http;
use gix::remote::fetch::{Shallow, Tags};
use gix::remote::{Direction, ref_map};

use crate::source::SourceError;

use super::context::{GitContext, RefKind};
use super::has_commit;

type Prepare<'remote, 'repo> = gix::remote::fetch::Prepare<
    'remote,
    'repo,
    Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>,
>;

/// Resolves `ctx`'s REF on the remote and makes sure its commit is in `repo`; returns it.
/// A REF that names no ref but looks like an abbreviated commit id (4–39 hex digits) is
/// resolved the way git resolves it locally: against the history of every branch and tag,
/// fetched in full once (the protocol cannot expand abbreviations remotely).
pub(super) fn fetch(
    repo: &gix::Repository,
    ctx: &GitContext,
    headers: &[String],
    interrupt: &AtomicBool,
) -> Result<ObjectId, SourceError> {
    match fetch_ref(repo, ctx, headers, interrupt) {
        Err(SourceError::GitRefNotFound { reference, url }) => match ctx.ref_kind() {
            RefKind::Name(name) if is_short_hex(name) => {
                fetch_abbreviated(repo, ctx, headers, name, interrupt)
            }
            _ => Err(SourceError::GitRefNotFound { reference, url }),
        },
        other => other,
    }
}

fn is_short_hex(s: &str) -> bool {
    (4..40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit an abbreviated id names in `repo`, if exactly one does.
fn resolve_abbreviated(
    repo: &gix::Repository,
    ctx: &GitContext,
    prefix: &str,
) -> Result<Option<ObjectId>, SourceError> {
    let Ok(p) = gix::hash::Prefix::from_hex(prefix) else {
        return Ok(None);
    };
    match repo.objects.lookup_prefix(p, None) {
        Ok(Some(Ok(id))) if has_commit(repo, id) => Ok(Some(id)),
        Ok(Some(Err(()))) => Err(SourceError::GitRemote {
            url: ctx.url().to_string(),
            source: format!("commit id {prefix} is ambiguous; give more digits").into(),
        }),
        _ => Ok(None),
    }
}

fn fetch_abbreviated(
    repo: &gix::Repository,
    ctx: &GitContext,
    headers: &[String],
    prefix: &str,
    interrupt: &AtomicBool,
) -> Result<ObjectId, SourceError> {
    let not_found = || SourceError::GitRefNotFound {
        reference: prefix.to_string(),
        url: ctx.url().to_string(),
    };
    let id = match resolve_abbreviated(repo, ctx, prefix)? {
        Some(id) => id,
        None => {
            let url = gix::url::parse(ctx.url()).map_err(|e| remote_error(ctx, e))?;
            let remote = repo
                .remote_at_without_url_rewrite(url)
                .and_then(|r| {
                    r.with_refspecs(
                        [
                            "+refs/heads/*:refs/strata/history/heads/*",
                            "+refs/tags/*:refs/strata/history/tags/*",
                        ],
                        Direction::Fetch,
                    )
                })
                .map(|r| r.with_fetch_tags(Tags::None))
                .map_err(|_| not_found())?;
            let prepare = prepare(&remote, ctx, headers)?;
            prepare
                .with_shallow(Shallow::undo())
                .receive(gix::progress::Discard, interrupt)
                .map_err(|e| interrupted(ctx, interrupt).unwrap_or_else(|| remote_error(ctx, e)))?;
            resolve_abbreviated(repo, ctx, prefix)?.ok_or_else(not_found)?
        }
    };
    repo.reference(
        format!("refs/strata/commits/{id}").as_str(),
        id,
        gix::refs::transaction::PreviousValue::Any,
        "strata: fetch",
    )
    .map_err(|e| remote_error(ctx, e))?;
    Ok(id)
}

fn fetch_ref(
    repo: &gix::Repository,
    ctx: &GitContext,
    headers: &[String],
    interrupt: &AtomicBool,
) -> Result<ObjectId, SourceError> {
    let spec = match ctx.ref_kind() {
        RefKind::Head => "HEAD",
        RefKind::Commit(hex) => hex,
        RefKind::Name(name) => name,
    };
    let remote = remote(repo, ctx, spec)?;
    let prepare = prepare(&remote, ctx, headers)?;
    let (name, id) = resolve(ctx, &prepare)?;
    if has_commit(repo, id) {
        tracing::debug!(commit = %id, url = ctx.url(), "git commit already cached");
        return Ok(id);
    }
    if prepare.ref_map().mappings.len() > 1 {
        // A name that is both a tag and a branch (say): fetch only the one git would pick.
        drop(prepare);
        let remote = self::remote(repo, ctx, &name)?;
        let prepare = self::prepare(&remote, ctx, headers)?;
        let (_, id) = resolve(ctx, &prepare)?;
        return receive(repo, ctx, prepare, id, interrupt);
    }
    receive(repo, ctx, prepare, id, interrupt)
}

/// A remote for `ctx`'s URL that fetches `spec` (no local ref is written, no tags follow).
fn remote<'repo>(
    repo: &'repo gix::Repository,
    ctx: &GitContext,
    spec: &str,
) -> Result<gix::Remote<'repo>, SourceError> {
    let url = gix::url::parse(ctx.url()).map_err(|e| remote_error(ctx, e))?;
    repo.remote_at_without_url_rewrite(url)
        .and_then(|r| r.with_refspecs([spec], Direction::Fetch))
        .map(|r| r.with_fetch_tags(Tags::None))
        .map_err(|_| SourceError::GitRefNotFound {
            reference: spec.to_string(),
            url: ctx.url().to_string(),
        })
}

/// Connects and lists the refs that match the remote's refspec.
fn prepare<'remote, 'repo>(
    remote: &'remote gix::Remote<'repo>,
    ctx: &GitContext,
    headers: &[String],
) -> Result<Prepare<'remote, 'repo>, SourceError> {
    let options = http::Options {
        extra_headers: headers.to_vec(),
        user_agent: Some(concat!("strata/", env!("CARGO_PKG_VERSION")).into()),
        connect_timeout: Some(std::time::Duration::from_secs(30)),
        ..http::Options::default()
    };
    let connection = remote
        .connect(Direction::Fetch)
        .map_err(|e| remote_error(ctx, e))?
        // Credentials go out with every request (headers above); never ask a credential
        // helper or a terminal, which would also make a refused token look like a prompt.
        .with_credentials(|_| Ok(None))
        .with_transport_options(Box::new(options));
    connection
        .prepare_fetch(gix::progress::Discard, ref_map::Options::default())
        .map_err(|e| remote_error(ctx, e))
}

/// The full name and commit the remote's refs give for `ctx`'s REF.
fn resolve(ctx: &GitContext, prepare: &Prepare<'_, '_>) -> Result<(String, ObjectId), SourceError> {
    let not_found = |reference: &str| SourceError::GitRefNotFound {
        reference: reference.to_string(),
        url: ctx.url().to_string(),
    };
    let map = prepare.ref_map();
    match ctx.ref_kind() {
        RefKind::Commit(hex) => {
            let id = ObjectId::from_hex(hex.as_bytes()).map_err(|_| not_found(hex))?;
            Ok((hex.to_string(), id))
        }
        RefKind::Head => map
            .remote_refs
            .iter()
            .find_map(|r| match r {
                Ref::Symbolic {
                    full_ref_name,
                    object,
                    ..
                }
                | Ref::Direct {
                    full_ref_name,
                    object,
                }
                | Ref::Peeled {
                    full_ref_name,
                    object,
                    ..
                } if full_ref_name == "HEAD" => Some(("HEAD".to_string(), *object)),
                _ => None,
            })
            .ok_or_else(|| not_found("HEAD")),
        RefKind::Name(name) => {
            let candidates: Vec<String> = if name.starts_with("refs/") {
                vec![name.to_string()]
            } else {
                // git's rev-parse order, which `git fetch origin <name>` also uses.
                vec![
                    name.to_string(),
                    format!("refs/{name}"),
                    format!("refs/tags/{name}"),
                    format!("refs/heads/{name}"),
                    format!("refs/remotes/{name}"),
                    format!("refs/remotes/{name}/HEAD"),
                ]
            };
            candidates
                .iter()
                .find_map(|candidate| {
                    map.mappings.iter().find_map(|m| {
                        (m.remote.as_name()? == candidate.as_str())
                            .then(|| {
                                m.remote
                                    .peeled_id()
                                    .map(|id| (candidate.clone(), id.to_owned()))
                            })
                            .flatten()
                    })
                })
                .ok_or_else(|| not_found(name))
        }
    }
}

/// Fetches the pack for the prepared refspec with depth 1 and checks `id` arrived.
fn receive(
    repo: &gix::Repository,
    ctx: &GitContext,
    prepare: Prepare<'_, '_>,
    id: ObjectId,
    interrupt: &AtomicBool,
) -> Result<ObjectId, SourceError> {
    let depth = NonZeroU32::new(1).expect("1 is not zero");
    let outcome = prepare
        .with_shallow(Shallow::DepthAtRemote(depth))
        .receive(gix::progress::Discard, interrupt);
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            return Err(interrupted(ctx, interrupt).unwrap_or_else(|| receive_error(ctx, id, e)));
        }
    };
    if !has_commit(repo, id) {
        return Err(SourceError::GitRefNotFound {
            reference: ctx.reference().unwrap_or("HEAD").to_string(),
            url: ctx.url().to_string(),
        });
    }
    // A ref keeps the commit's objects alive should anyone run `git gc` on the cache; with
    // it in place the pack's `.keep` guard (which gix leaves when no ref was updated) can go.
    let name = format!("refs/strata/commits/{id}");
    repo.reference(
        name.as_str(),
        id,
        gix::refs::transaction::PreviousValue::Any,
        "strata: fetch",
    )
    .map_err(|e| remote_error(ctx, e))?;
    if let gix::remote::fetch::Status::Change {
        write_pack_bundle, ..
    } = &outcome.status
        && let Some(keep) = &write_pack_bundle.keep_path
    {
        fs_err::remove_file(keep)?;
    }
    tracing::debug!(commit = %id, url = ctx.url(), "fetched git commit");
    Ok(id)
}

/// The error of a receive that failed because `interrupt` was set.
fn interrupted(ctx: &GitContext, interrupt: &AtomicBool) -> Option<SourceError> {
    interrupt
        .load(Ordering::SeqCst)
        .then(|| SourceError::GitInterrupted {
            url: ctx.url().to_string(),
        })
}

/// Sorts an error from receiving the pack.
fn receive_error(ctx: &GitContext, id: ObjectId, e: gix::Error) -> SourceError {
    // upload-pack refuses wants it does not have with "not our ref".
    let unknown_commit = matches!(ctx.ref_kind(), RefKind::Commit(_))
        && e.iter_errors()
            .any(|e| e.to_string().contains("not our ref"));
    if unknown_commit {
        return SourceError::GitRefNotFound {
            reference: id.to_string(),
            url: ctx.url().to_string(),
        };
    }
    remote_error(ctx, e)
}

/// Sorts a gix error into what the user can act on.
fn remote_error(ctx: &GitContext, e: gix::Error) -> SourceError {
    if e.is_unauthenticated() || e.is_permission_denied() {
        return SourceError::GitAuthRefused { host: ctx.host() };
    }
    let unreachable = e.iter_errors().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect())
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::HostUnreachable
                )
            })
    });
    if unreachable {
        // The transport's chain repeats the URL at every level; the innermost cause
        // ("connection refused", "failed to lookup address") is what the user needs.
        return SourceError::GitConnect {
            host: ctx.host(),
            source: root_cause(&e).into(),
        };
    }
    let not_found = e.iter_errors().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.status() == Some(reqwest::StatusCode::NOT_FOUND))
    });
    if not_found {
        return SourceError::GitRepoNotFound {
            url: ctx.url().to_string(),
        };
    }
    SourceError::GitRemote {
        url: ctx.url().to_string(),
        source: Box::new(e),
    }
}

/// The message of the last error in `e`'s source chain.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
