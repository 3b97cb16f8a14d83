//! One build, run by the embedded engine on a blocking thread: fetch the commit from the git
//! remote (into the store's git cache), build the Dockerfile or recipe read from it, push,
//! then tag in the local store. Progress is reported as JSON events.
//!
//! Cancellation ([`Cancel`], set by `DELETE /api/v1/builds/{id}`, by a heartbeat that learns
//! of a cancel on another replica or of a lost lease, and at shutdown) shares one flag with
//! the engine ([`crate::build::CancelToken`]) and the git transport, and is seen:
//! - during the git fetch: gix checks the flag while it negotiates and receives the pack, and
//!   the fetch fails at its next read (the ref listing before it is not interrupted);
//! - between phases (after the fetch, the cache import and the build);
//! - by the build before every stage and step and before a RUN command starts, and at every
//!   build event (a step starting or ending: the build unwinds from there);
//! - while a RUN command runs: the sandbox looks at the flag every
//!   [`crate::sandbox::CANCEL_POLL`] and SIGKILLs the run's first stage, which takes down its
//!   whole pid namespace (the command and everything it started); the step's directories are
//!   removed and nothing is cached for it;
//! - while base layers download (the download is dropped; blobs are committed only whole);
//! - while a layer is written, before each of its files (the temporary blob is dropped);
//! - during the push, the cache export and the deploy hand-off (the futures are dropped
//!   where they are: a push stops before its manifest is sent).
//!
//! Work between those points (one file of a layer, the ref listing) runs to its end first,
//! so a cancel takes effect within a poll interval during a RUN or a download and after at
//! most the current such piece of work otherwise. Either way the build's
//! work directory (under the store's `tmp/`) is removed as the build returns or unwinds, and
//! the job ends as [`JobError::Cancelled`], also when the build reports a different error
//! after the flag was set (a step killed halfway may fail in its own way). Nothing is tagged,
//! locally or in the registry, unless every phase completed; a deploy hand-off (a Flux
//! artifact) runs after the image is pushed.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Notify;

use super::deploy::{self, DeploySpec};
use super::spec::BuildSpec;
use crate::build::{self, BuildError, BuildOptions, CancelToken, Event};
use crate::media::{Compression, Platform};
use crate::registry::{Client, Reference, Secret, TransferEvent};
use crate::source::{Dockerignore, GitAuth, GitCache, GitContext};
use crate::store::{ImageName, Store};

/// A build's stop switch, shared by the worker, the API and the build thread; its flag is
/// the engine's [`CancelToken`] (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct Cancel {
    token: CancelToken,
    notify: Notify,
}

impl Cancel {
    /// Ask the build to stop.
    pub fn cancel(&self) {
        self.token.cancel();
        self.notify.notify_waiters();
    }

    /// Whether it was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The flag as the engine takes it: set by [`Cancel::cancel`].
    pub fn token(&self) -> CancelToken {
        self.token.clone()
    }

    /// Resolves once it is asked to stop.
    pub async fn cancelled(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            n.await;
        }
    }
}

/// The unwind payload that stops a build at its next event.
struct Stop;

/// Why a job did not succeed.
#[derive(Debug)]
pub enum JobError {
    /// It was cancelled.
    Cancelled,
    /// It failed; the message is the error chain.
    Failed(String),
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> JobError {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(c) = src {
            let m = c.to_string();
            if !s.contains(&m) {
                s.push_str(": ");
                s.push_str(&m);
            }
            src = c.source();
        }
        JobError::Failed(s)
    }
}

fn failed(s: impl Into<String>) -> JobError {
    JobError::Failed(s.into())
}

/// What a finished job made.
#[derive(Debug)]
pub struct JobResult {
    /// The image's manifest digest.
    pub digest: String,
    /// References pushed (or, without push, tagged in the store).
    pub tags: Vec<String>,
    /// Layers reused from the cache.
    pub cache_hits: u64,
    /// Steps that made or reused a layer.
    pub layer_steps: u64,
    /// The hand-off's result.
    pub deploy: Option<Value>,
}

/// What every job of this server shares.
#[derive(Clone)]
pub struct Engine {
    /// The local store.
    pub store: Store,
    /// The registry client (a per-job copy reports progress).
    pub client: Client,
    /// The runtime registry calls run on.
    pub handle: tokio::runtime::Handle,
    /// Import layer caches from these references before each build.
    pub cache_from: Vec<Reference>,
    /// Export each build's layer cache here.
    pub cache_to: Option<Reference>,
    /// Compression threads per build.
    pub threads: u32,
    /// The cluster `deploy.apply` applies to (`None`: refused).
    pub cluster: Option<crate::deploy::KubeTarget>,
}

/// A sink for a job's JSON events (sync: called from the build thread).
pub type Emit = Arc<dyn Fn(Value) + Send + Sync>;

fn event_json(e: &Event) -> Value {
    match e {
        Event::Step {
            id,
            stage,
            index,
            total,
            text,
        } => json!({"type": "step", "step": id, "stage": stage, "index": index,
                    "total": total, "text": text}),
        Event::StepDone {
            id,
            cached,
            layer,
            millis,
        } => json!({"type": "step_done", "step": id, "cached": cached, "millis": millis,
                    "layer": layer.as_ref().map(|l| json!({"digest": l.digest.to_string(), "size": l.size}))}),
        Event::Warning(w) => json!({"type": "warning", "message": w}),
    }
}

/// Transfer progress as events, at most two a second per blob (plus its end).
fn transfer_progress(emit: Emit) -> crate::registry::ProgressFn {
    let last: Mutex<HashMap<String, Instant>> = Mutex::default();
    Arc::new(move |e: TransferEvent| {
        let v = match &e {
            TransferEvent::Progress {
                digest,
                done,
                total,
            } => {
                let key = digest.to_string();
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let due = last
                    .get(&key)
                    .is_none_or(|t| now.duration_since(*t) >= Duration::from_millis(500));
                if !due && done != total {
                    return;
                }
                last.insert(key.clone(), now);
                json!({"type": "transfer", "digest": key, "done": done, "total": total})
            }
            TransferEvent::Skipped { digest, size } => {
                json!({"type": "blob", "digest": digest.to_string(), "size": size, "route": "present"})
            }
            TransferEvent::Mounted { digest, from } => {
                json!({"type": "blob", "digest": digest.to_string(), "route": "mounted", "from": from})
            }
            TransferEvent::Finished { digest, size } => {
                json!({"type": "blob", "digest": digest.to_string(), "size": size, "route": "uploaded"})
            }
        };
        emit(v);
    })
}

/// Run `f` unless cancelled; a cancel stops the future where it is.
fn until_cancelled<T>(
    engine: &Engine,
    cancel: &Cancel,
    f: impl std::future::Future<Output = T>,
) -> Result<T, JobError> {
    engine.handle.block_on(async {
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(JobError::Cancelled),
            v = f => Ok(v),
        }
    })
}

/// `e`, unless the job was cancelled: a fetch or step stopped halfway fails in its own way.
fn cancelled_or(cancel: &Cancel, e: impl std::error::Error) -> JobError {
    if cancel.is_cancelled() {
        JobError::Cancelled
    } else {
        e.into()
    }
}

fn check(cancel: &Cancel) -> Result<(), JobError> {
    if cancel.is_cancelled() {
        Err(JobError::Cancelled)
    } else {
        Ok(())
    }
}

/// Run one build. Blocking: call it on a blocking thread.
pub fn run(
    engine: &Engine,
    spec: &BuildSpec,
    token: Option<Secret>,
    cancel: &Cancel,
    emit: Emit,
) -> Result<JobResult, JobError> {
    let store = &engine.store;
    let _in_use = store.in_use()?;
    let ctx: GitContext = spec.git_context().parse()?;
    let auth = GitAuth {
        token,
        headers: Vec::new(),
    };
    emit(json!({"type": "fetch", "repository": spec.repository, "ref": spec.git_ref}));
    let cache = GitCache::new(store.root().join("git")).interrupt_with(cancel.token.flag().clone());
    let checkout = cache
        .fetch(&ctx, &auth)
        .map_err(|e| cancelled_or(cancel, e))?;
    let commit = checkout.commit.to_string();
    emit(json!({"type": "fetched", "commit": commit}));
    check(cancel)?;

    let sub = spec.context.clone();
    let in_repo = |rel: &str| {
        if sub.is_empty() {
            rel.to_string()
        } else {
            format!("{sub}/{rel}")
        }
    };
    let read = |rel: &str| -> Result<String, JobError> {
        let bytes = checkout
            .read_file(&in_repo(rel))?
            .ok_or_else(|| failed(format!("{rel} not found in {ctx} at {commit}")))?;
        String::from_utf8(bytes).map_err(|_| failed(format!("{rel} is not UTF-8 text")))
    };
    let (file, dockerfile, recipe) = match (&spec.dockerfile, &spec.recipe) {
        (_, Some(r)) => {
            let text = read(r)?;
            (
                r.clone(),
                String::new(),
                Some(crate::recipe::parse(&text, r)?),
            )
        }
        (d, None) => {
            let f = d.clone().unwrap_or_else(|| "Dockerfile".into());
            let text = read(&f)?;
            (f, text, None)
        }
    };
    let ignore_text = match checkout.read_file(&in_repo(&format!("{file}.dockerignore")))? {
        Some(t) => Some(t),
        None => checkout.read_file(&in_repo(".dockerignore"))?,
    };
    let ignore = match ignore_text {
        Some(t) => Dockerignore::parse(&String::from_utf8_lossy(&t))?,
        None => Dockerignore::empty(),
    };
    let mut entries = checkout.entries(ctx.subdir())?;
    entries.retain(|e| !ignore.is_excluded(&e.path.to_string_lossy()));

    let opts = BuildOptions {
        context: PathBuf::from(format!("git-context-{commit}")),
        context_entries: Some(entries),
        dockerfile_path: PathBuf::from(&file),
        dockerfile_name: format!("{ctx}/{file}"),
        dockerfile,
        build_args: spec.build_args.clone(),
        target: spec.target.clone(),
        labels: spec.labels.clone(),
        platform: Platform::host(),
        compression: Compression::Gzip,
        compression_level: None,
        // The commit's time: a rebuild of the same commit gives the same digest.
        source_date_epoch: checkout.commit_time.max(0),
        threads: engine.threads.max(1),
        no_cache: false,
        no_cache_filter: Vec::new(),
        // The publish API takes no build secrets (a repository's build gets none).
        secrets: Default::default(),
        cancel: Some(cancel.token()),
    };
    let client = engine
        .client
        .clone()
        .with_progress(transfer_progress(emit.clone()));
    let remote = build::Remote {
        client: client.clone(),
        handle: engine.handle.clone(),
        always_pull: false,
    };
    for c in &engine.cache_from {
        match until_cancelled(
            engine,
            cancel,
            crate::registry::import_cache(&client, store, c),
        )? {
            Ok(n) => emit(
                json!({"type": "log", "message": format!("imported {n} cache entries from {c}")}),
            ),
            Err(e) => emit(
                json!({"type": "warning", "message": format!("cache import from {c} failed: {e}")}),
            ),
        }
    }
    check(cancel)?;

    let mut layer_steps = 0u64;
    let mut on_event = |e: Event| {
        if cancel.is_cancelled() {
            // Unwinding drops the build's context and with it its temporary directory.
            resume_unwind(Box::new(Stop));
        }
        if let Event::StepDone { layer: Some(_), .. } = &e {
            layer_steps += 1;
        }
        emit(event_json(&e));
    };
    let built = catch_unwind(AssertUnwindSafe(|| match &recipe {
        Some(r) => build::build_recipe(store, Some(&remote), r, &opts, &mut on_event),
        None => build::build(store, Some(&remote), &opts, &mut on_event),
    }));
    let out = match built {
        Ok(Ok(out)) => out,
        Ok(Err(BuildError::Cancelled)) => return Err(JobError::Cancelled),
        Ok(Err(e)) => return Err(cancelled_or(cancel, e)),
        Err(p) if p.is::<Stop>() => return Err(JobError::Cancelled),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(failed(format!("the build panicked: {msg}")));
        }
    };
    emit(json!({"type": "built", "digest": out.digest.to_string(), "cache_hits": out.cache_hits}));
    check(cancel)?;

    let image_ref: Reference = spec.image.parse()?;
    let tags = vec![spec.image.clone()];
    let mut deployed = None;
    if spec.push {
        let report = until_cancelled(
            engine,
            cancel,
            crate::registry::push(&client, store, &out.image, &image_ref),
        )??;
        emit(
            json!({"type": "pushed", "reference": spec.image, "digest": report.digest.to_string(),
                    "blobs": report.blobs.len()}),
        );
        if let Some(d) = &spec.deploy {
            let d = DeploySpec::validate(d).map_err(|e| failed(e.0))?;
            let mut result = serde_json::Map::new();
            if let Some(f) = &d.flux {
                let values_text = checkout
                    .read_file(&f.values)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                let pushed = deploy::Pushed {
                    image: &image_ref,
                    digest: report.digest,
                    config: &out.image.config_bytes,
                    values_text,
                    repository: &spec.repository,
                    commit: &commit,
                    commit_time: checkout.commit_time,
                };
                let r = until_cancelled(engine, cancel, deploy::flux(&client, f, pushed))??;
                emit(json!({"type": "deployed", "flux": r}));
                result.insert("flux".into(), r);
            }
            if let Some(a) = &d.apply {
                let cluster = engine.cluster.as_ref().ok_or_else(|| {
                    failed("deploy.apply: this server has no cluster (--kubeconfig)")
                })?;
                let mut manifests = Vec::new();
                for m in &a.manifests {
                    let bytes = checkout
                        .read_file(m)?
                        .ok_or_else(|| failed(format!("{m} not found in {ctx} at {commit}")))?;
                    manifests.push((m.clone(), String::from_utf8_lossy(&bytes).into_owned()));
                }
                let progress = |v: Value| emit(v);
                let r = until_cancelled(
                    engine,
                    cancel,
                    deploy::apply(
                        &client,
                        cluster,
                        a,
                        deploy::Pushed {
                            image: &image_ref,
                            digest: report.digest,
                            config: &out.image.config_bytes,
                            values_text: None,
                            repository: &spec.repository,
                            commit: &commit,
                            commit_time: checkout.commit_time,
                        },
                        manifests,
                        &progress,
                    ),
                )??;
                emit(json!({"type": "deployed", "apply": r}));
                result.insert("apply".into(), r);
            }
            deployed = Some(Value::Object(result));
        }
    }
    if let Some(c) = &engine.cache_to {
        let r = until_cancelled(
            engine,
            cancel,
            crate::registry::export_cache(&client, store, &out.cache_entries, c),
        )?;
        match r {
            Ok(rep) => emit(
                json!({"type": "log", "message": format!("exported cache to {c} ({})", rep.digest)}),
            ),
            Err(e) => emit(
                json!({"type": "warning", "message": format!("cache export to {c} failed: {e}")}),
            ),
        }
    }
    // Tag last: a cancelled or failed build leaves every name where it was.
    let name: ImageName = spec.image.parse()?;
    store.commit_image(&out.image, &[name])?;
    Ok(JobResult {
        digest: out.digest.to_string(),
        tags,
        deploy: deployed,
        cache_hits: out.cache_hits,
        layer_steps,
    })
}
