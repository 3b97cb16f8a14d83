//! The upload engine
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-blobs>):
//! HEAD first; monolithic POST + PUT for small blobs; chunked POST + PATCH… + PUT for large
//! ones, honouring `OCI-Chunk-Min-Length`, following the `Location` that every response may
//! change, resuming from the registry's `Range` after a failed PATCH instead of starting
//! over, and falling back to monolithic when a registry refuses chunks. Bodies come from a
//! re-openable [`BlobSource`], so any attempt can be re-sent from any offset.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use backon::Retryable;
use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::auth::Scopes;
use super::client::{Client, check, content_digest, status_error};
use super::error::{RegistryError, redact};
use super::reference::Reference;
use super::transport::TransferEvent;
use crate::digest::{Digest, DigestError};
use crate::media::Descriptor;

/// Bytes per body frame read from a source.
const FRAME: u64 = 256 * 1024;
/// Progress is reported at most once per this many bytes.
const PROGRESS_STEP: u64 = 1024 * 1024;

/// A blob that can be read from any offset, as often as needed (every retry, resume and
/// fallback re-opens it).
pub trait BlobSource: Send + Sync {
    /// A reader positioned at `offset`.
    fn open(&self, offset: u64) -> io::Result<Box<dyn Read + Send>>;
}

impl BlobSource for Bytes {
    fn open(&self, offset: u64) -> io::Result<Box<dyn Read + Send>> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&o| o <= self.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "offset past the end"))?;
        Ok(Box::new(io::Cursor::new(self.slice(start..))))
    }
}

/// A blob in a file (a store blob or a temp file).
#[derive(Clone, Debug)]
pub struct FileSource(pub PathBuf);

impl BlobSource for FileSource {
    fn open(&self, offset: u64) -> io::Result<Box<dyn Read + Send>> {
        let mut f = fs_err::File::open(&self.0)?;
        f.seek(SeekFrom::Start(offset))?;
        Ok(Box::new(io::BufReader::new(f)))
    }
}

/// An open upload session.
struct Session {
    location: Url,
    min_chunk: Option<u64>,
}

/// What went wrong with a PATCH, for deciding between resume, fallback and giving up.
enum Next {
    Resume(RegistryError),
    Fallback(RegistryError),
    Fail(RegistryError),
}

impl Client {
    /// Upload blob `desc` to `target`'s repository unless it is already there. Blobs up to
    /// the monolithic threshold go in one PUT; larger ones in chunks (see the module docs).
    /// Returns whether bytes were uploaded (`false`: the registry had the blob).
    pub async fn push_blob(
        &self,
        target: &Reference,
        desc: &Descriptor,
        source: Arc<dyn BlobSource>,
    ) -> Result<bool, RegistryError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| RegistryError::Setup {
                msg: "the client's transfer limiter was closed".into(),
                source: None,
            })?;
        let scopes = Scopes::push(&target.repository);
        if self
            .blob_exists_in_scope(target, &desc.digest, &scopes)
            .await?
            .is_some()
        {
            self.emit(TransferEvent::Skipped {
                digest: desc.digest,
                size: desc.size,
            });
            return Ok(false);
        }
        if desc.size <= self.inner.opts.monolithic_threshold {
            self.upload_monolithic(target, &scopes, desc, &source)
                .await?;
        } else {
            self.upload_chunked(target, &scopes, desc, &source).await?;
        }
        self.emit(TransferEvent::Finished {
            digest: desc.digest,
            size: desc.size,
        });
        Ok(true)
    }

    /// POST a new upload session.
    async fn start_upload(
        &self,
        target: &Reference,
        scopes: &Scopes,
    ) -> Result<Session, RegistryError> {
        let url = self.url(target, "blobs/uploads/")?;
        let resp = self
            .send(target, scopes, Method::POST, &url, true, &|rb| {
                rb.header(CONTENT_LENGTH, 0)
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(resp, &Method::POST, &url).await);
        }
        let min_chunk = resp
            .headers()
            .get("oci-chunk-min-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Ok(Session {
            location: self.location(&resp)?,
            min_chunk,
        })
    }

    /// Monolithic upload: POST, then PUT `?digest=` with the whole blob. A transient failure
    /// starts a fresh session (a half-received PUT cannot be resumed).
    async fn upload_monolithic(
        &self,
        target: &Reference,
        scopes: &Scopes,
        desc: &Descriptor,
        source: &Arc<dyn BlobSource>,
    ) -> Result<(), RegistryError> {
        let attempt = || async move {
            let session = self.start_upload(target, scopes).await?;
            let url = with_digest(&session.location, &desc.digest);
            let resp = self
                .send(target, scopes, Method::PUT, &url, false, &|rb| {
                    rb.header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, desc.size)
                        .body(self.source_body(source.clone(), 0, desc.size, desc))
                })
                .await?;
            finish(resp, &url, desc).await
        };
        attempt
            .retry(self.inner.retry.backoff())
            .when(RegistryError::is_transient)
            .notify(|e, delay| tracing::debug!(digest = %desc.digest, error = %e, ?delay, "restarting monolithic upload"))
            .await
    }

    /// Chunked upload with resume and monolithic fallback.
    async fn upload_chunked(
        &self,
        target: &Reference,
        scopes: &Scopes,
        desc: &Descriptor,
        source: &Arc<dyn BlobSource>,
    ) -> Result<(), RegistryError> {
        let max_attempts = self.inner.opts.max_attempts.max(1);
        let mut session = self.start_upload(target, scopes).await?;
        let chunk = self
            .inner
            .opts
            .chunk_size
            .max(session.min_chunk.unwrap_or(0))
            .max(1);
        let mut offset = 0u64;
        let mut accepted = 0usize;
        let mut failures = 0usize;
        while offset < desc.size {
            let end = (offset + chunk).min(desc.size);
            let outcome = self
                .patch(target, scopes, &session.location, source, offset, end, desc)
                .await;
            let failure = match outcome {
                Ok(resp) => {
                    let location = self.location(&resp)?;
                    let server = resp
                        .headers()
                        .get("range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| range_offset(v, end));
                    session.location = location;
                    accepted += 1;
                    // Progress: a flaky link may fail again later without giving up.
                    failures = 0;
                    match server {
                        Some(s) if s > end => {
                            return Err(RegistryError::Protocol {
                                url: redact(&session.location),
                                msg: format!("registry claims {s} bytes after {end} were sent"),
                            });
                        }
                        Some(s) if s != end => {
                            tracing::debug!(digest = %desc.digest, sent_to = end, server = s, "registry kept fewer bytes than sent");
                            offset = s;
                        }
                        _ => offset = end,
                    }
                    continue;
                }
                Err(e) => e,
            };
            let err = match classify_patch_failure(failure, accepted) {
                Next::Fail(e) => return Err(e),
                Next::Fallback(e) => {
                    tracing::info!(digest = %desc.digest, error = %e, "registry refused a chunked upload; uploading in one request");
                    self.cancel_upload(target, scopes, &session.location).await;
                    return self.upload_monolithic(target, scopes, desc, source).await;
                }
                Next::Resume(e) => e,
            };
            failures += 1;
            if failures >= max_attempts {
                if accepted == 0 {
                    tracing::info!(digest = %desc.digest, error = %err, "chunked upload keeps failing; uploading in one request");
                    self.cancel_upload(target, scopes, &session.location).await;
                    return self.upload_monolithic(target, scopes, desc, source).await;
                }
                return Err(err);
            }
            tracing::debug!(digest = %desc.digest, offset, error = %err, "PATCH failed; asking the registry where to resume");
            tokio::time::sleep(self.resume_delay(failures)).await;
            match self
                .upload_status(target, scopes, &session.location, offset)
                .await
            {
                Ok((location, at)) => {
                    tracing::debug!(digest = %desc.digest, resume_at = at, "resuming chunked upload");
                    session.location = location;
                    offset = at.min(desc.size);
                }
                Err(e) if e.is_transient() => {}
                Err(e) => {
                    tracing::debug!(digest = %desc.digest, error = %e, "upload session lost; starting over");
                    session = self.start_upload(target, scopes).await?;
                    offset = 0;
                }
            }
        }
        let url = with_digest(&session.location, &desc.digest);
        let result = match self
            .send(target, scopes, Method::PUT, &url, true, &|rb| {
                rb.header(CONTENT_LENGTH, 0)
            })
            .await
        {
            Ok(resp) => finish(resp, &url, desc).await,
            Err(e) => Err(e),
        };
        match result {
            // The answer to the final PUT was lost, and the retried PUT finds the session
            // gone because the first one completed it: the blob is there if HEAD says so.
            Err(e)
                if matches!(
                    &e,
                    RegistryError::Registry { status: 404, .. } | RegistryError::Http { .. }
                ) =>
            {
                match self
                    .blob_exists_in_scope(target, &desc.digest, scopes)
                    .await
                {
                    Ok(Some(size)) if size == desc.size => Ok(()),
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    /// PATCH bytes `[start, end)` to the session.
    #[allow(clippy::too_many_arguments)]
    async fn patch(
        &self,
        target: &Reference,
        scopes: &Scopes,
        location: &Url,
        source: &Arc<dyn BlobSource>,
        start: u64,
        end: u64,
        desc: &Descriptor,
    ) -> Result<Response, RegistryError> {
        let resp = self
            .send(target, scopes, Method::PATCH, location, false, &|rb| {
                rb.header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, end - start)
                    .header("content-range", format!("{start}-{}", end - 1))
                    .body(self.source_body(source.clone(), start, end - start, desc))
            })
            .await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(status_error(resp, &Method::PATCH, location).await)
        }
    }

    /// GET the session's status: its (possibly new) location and how many bytes it holds.
    async fn upload_status(
        &self,
        target: &Reference,
        scopes: &Scopes,
        location: &Url,
        guess: u64,
    ) -> Result<(Url, u64), RegistryError> {
        let resp = self
            .send(target, scopes, Method::GET, location, true, &|rb| rb)
            .await?;
        let resp = check(resp, &Method::GET, location).await?;
        let at = resp
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| range_offset(v, guess))
            .unwrap_or(0);
        let next = if resp.headers().contains_key(reqwest::header::LOCATION) {
            self.location(&resp)?
        } else {
            location.clone()
        };
        Ok((next, at))
    }

    /// A request body streaming `len` bytes of `source` from `offset`, read on a blocking
    /// thread in frames so memory stays flat.
    fn source_body(
        &self,
        source: Arc<dyn BlobSource>,
        offset: u64,
        len: u64,
        desc: &Descriptor,
    ) -> reqwest::Body {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let client = self.clone();
        let (digest, total) = (desc.digest, desc.size);
        tokio::task::spawn_blocking(move || {
            let run = || -> io::Result<()> {
                let mut reader = source.open(offset)?;
                let mut done = 0u64;
                let mut reported = offset / PROGRESS_STEP;
                while done < len {
                    let want = (len - done).min(FRAME);
                    let mut buf = vec![0u8; want as usize];
                    reader.read_exact(&mut buf).map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            io::Error::new(
                                e.kind(),
                                format!("blob source {digest} ended before byte {}", offset + len),
                            )
                        } else {
                            e
                        }
                    })?;
                    done += want;
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return Ok(()); // the request was abandoned
                    }
                    let at = offset + done;
                    if at / PROGRESS_STEP != reported || at == total {
                        reported = at / PROGRESS_STEP;
                        client.emit(TransferEvent::Progress {
                            digest,
                            done: at,
                            total,
                        });
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        reqwest::Body::wrap_stream(stream)
    }
}

/// Decide what a failed PATCH means.
fn classify_patch_failure(e: RegistryError, accepted: usize) -> Next {
    match e.status() {
        Some(413) => Next::Fallback(e),
        Some(416) if accepted > 0 => Next::Resume(e),
        Some(s) if (400..500).contains(&s) && !e.is_transient() && accepted == 0 => {
            Next::Fallback(e)
        }
        _ if e.is_transient() => Next::Resume(e),
        _ => Next::Fail(e),
    }
}

/// The final PUT's answer: 201 (any 2xx), and a `Docker-Content-Digest` that matches.
async fn finish(resp: Response, url: &Url, desc: &Descriptor) -> Result<(), RegistryError> {
    let resp = check(resp, &Method::PUT, url).await?;
    if let Some(d) = content_digest(resp.headers())
        && d != desc.digest
    {
        return Err(DigestError::Mismatch {
            expected: desc.digest,
            found: d,
        }
        .into());
    }
    Ok(())
}

/// The session URL with `digest=<digest>` appended (it may already carry `_state`).
fn with_digest(location: &Url, digest: &Digest) -> Url {
    let mut u = location.clone();
    u.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    u
}

/// Bytes held according to a `Range: 0-<last>` header. `0-0` is ambiguous (distribution
/// sends it for an empty session too); it means one byte only when one byte was `expected`.
fn range_offset(v: &str, expected: u64) -> Option<u64> {
    let v = v.trim();
    let v = v.strip_prefix("bytes=").unwrap_or(v);
    let (first, last) = v.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    if first != 0 {
        return None;
    }
    Some(if last == 0 && expected != 1 {
        0
    } else {
        last + 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(range_offset("0-99", 100), Some(100));
        assert_eq!(range_offset("bytes=0-49", 100), Some(50));
        assert_eq!(range_offset("0-0", 0), Some(0));
        assert_eq!(range_offset("0-0", 1), Some(1));
        assert_eq!(range_offset("5-9", 10), None);
        assert_eq!(range_offset("junk", 10), None);
    }

    #[test]
    fn patch_failures_classified() {
        let reg = |status| RegistryError::Registry {
            method: "PATCH".into(),
            url: "u".into(),
            status,
            code: None,
            message: String::new(),
        };
        assert!(matches!(
            classify_patch_failure(reg(413), 3),
            Next::Fallback(_)
        ));
        assert!(matches!(
            classify_patch_failure(reg(400), 0),
            Next::Fallback(_)
        ));
        assert!(matches!(classify_patch_failure(reg(400), 2), Next::Fail(_)));
        assert!(matches!(
            classify_patch_failure(reg(416), 2),
            Next::Resume(_)
        ));
        assert!(matches!(
            classify_patch_failure(reg(503), 2),
            Next::Resume(_)
        ));
    }

    #[test]
    fn bytes_source_reopens_anywhere() {
        let b = Bytes::from_static(b"hello world");
        let mut s = String::new();
        b.open(6).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "world");
        assert!(b.open(12).is_err());
    }
}
