//! Blob download: stream into a [`BlobSink`] while hashing, never accept more than the
//! descriptor's size, resume broken streams with `Range`, and verify size and digest before
//! reporting success
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-blobs>).

use std::io;
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};

use super::auth::Scopes;
use super::client::{Client, status_error};
use super::error::{RegistryError, redact};
use super::reference::Reference;
use super::transport::TransferEvent;
use crate::digest::{DigestError, Hasher};
use crate::media::Descriptor;

/// Progress is reported at most once per this many bytes.
const PROGRESS_STEP: u64 = 1024 * 1024;

/// Where a downloaded blob goes: a store temp file, memory, or straight into an upload.
///
/// The client writes bytes in order from offset 0; when a resumed download has to start
/// over it calls [`reset`](BlobSink::reset) first. Only after [`Client::fetch_blob`] returns
/// `Ok` is the content verified; on error the sink has been told to
/// [`discard`](BlobSink::discard) and must not commit what it holds.
pub trait BlobSink: Send {
    /// Append `bytes`.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Forget everything written: the transfer restarts from byte 0.
    fn reset(&mut self) -> io::Result<()>;
    /// The content failed verification (or the transfer failed): throw it away.
    fn discard(&mut self) {
        let _ = self.reset();
    }
}

impl BlobSink for Vec<u8> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
    fn reset(&mut self) -> io::Result<()> {
        self.clear();
        Ok(())
    }
}

/// How one streaming attempt ended.
enum Ended {
    /// The body ended (cleanly or not) after this attempt's bytes.
    Broken(String),
    /// The body ended cleanly.
    Clean,
}

impl Client {
    /// Download blob `desc` of `repo`'s repository into `sink`, verifying size and digest.
    /// A broken or short body is resumed from where it stopped with `Range: bytes=<n>-`
    /// (a server answering 200 instead of 206 restarts the sink from 0).
    pub async fn fetch_blob(
        &self,
        repo: &Reference,
        desc: &Descriptor,
        sink: &mut dyn BlobSink,
    ) -> Result<(), RegistryError> {
        let _permit = self.inner.permits.acquire().await.map_err(|_| closed())?;
        let result = self.fetch_into(repo, desc, sink).await;
        match &result {
            Ok(()) => self.emit(TransferEvent::Finished {
                digest: desc.digest,
                size: desc.size,
            }),
            Err(_) => sink.discard(),
        }
        result
    }

    async fn fetch_into(
        &self,
        repo: &Reference,
        desc: &Descriptor,
        sink: &mut dyn BlobSink,
    ) -> Result<(), RegistryError> {
        let url = self.url(repo, &format!("blobs/{}", desc.digest))?;
        let scopes = Scopes::pull(&repo.repository);
        let max_attempts = self.inner.opts.max_attempts.max(1);
        let mut hasher = Hasher::new();
        let mut attempts = 0usize;
        let mut last_break = String::new();
        sink.reset()?;
        while hasher.len() < desc.size || attempts == 0 {
            if attempts >= max_attempts {
                return Err(RegistryError::Protocol {
                    url: redact(&url),
                    msg: format!(
                        "blob body broke off at byte {} of {} after {attempts} attempts: {last_break}",
                        hasher.len(),
                        desc.size
                    ),
                });
            }
            if attempts > 0 {
                tokio::time::sleep(self.resume_delay(attempts)).await;
            }
            attempts += 1;
            let got = hasher.len();
            let resp = self
                .send(repo, &scopes, Method::GET, &url, true, &|rb| {
                    if got > 0 {
                        rb.header(RANGE, format!("bytes={got}-"))
                    } else {
                        rb
                    }
                })
                .await?;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT if got > 0 => {
                    let start = resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(content_range_start);
                    if start != Some(got) {
                        return Err(RegistryError::Protocol {
                            url: redact(&url),
                            msg: format!(
                                "asked for bytes from {got}, got a Content-Range starting at {start:?}"
                            ),
                        });
                    }
                    tracing::debug!(digest = %desc.digest, from = got, "resuming blob download");
                }
                StatusCode::OK => {
                    if got > 0 {
                        tracing::debug!(digest = %desc.digest, "registry ignored Range; restarting");
                        sink.reset()?;
                        hasher = Hasher::new();
                    }
                }
                _ => return Err(status_error(resp, &Method::GET, &url).await),
            }
            match self.stream_body(resp, desc, sink, &mut hasher).await? {
                Ended::Clean if hasher.len() < desc.size => {
                    last_break = format!("body ended after {} bytes", hasher.len());
                }
                Ended::Clean => {}
                Ended::Broken(why) => last_break = why,
            }
        }
        let found = hasher.finish();
        if found != desc.digest {
            return Err(DigestError::Mismatch {
                expected: desc.digest,
                found,
            }
            .into());
        }
        Ok(())
    }

    /// Copy one response body into the sink, refusing bytes beyond `desc.size`.
    async fn stream_body(
        &self,
        mut resp: reqwest::Response,
        desc: &Descriptor,
        sink: &mut dyn BlobSink,
        hasher: &mut Hasher,
    ) -> Result<Ended, RegistryError> {
        let mut reported = hasher.len() / PROGRESS_STEP;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let after = hasher.len() + chunk.len() as u64;
                    if after > desc.size {
                        return Err(DigestError::SizeMismatch {
                            digest: desc.digest,
                            expected: desc.size,
                            found: after,
                        }
                        .into());
                    }
                    sink.write(&chunk)?;
                    hasher.update(&chunk);
                    if after / PROGRESS_STEP != reported || after == desc.size {
                        reported = after / PROGRESS_STEP;
                        self.emit(TransferEvent::Progress {
                            digest: desc.digest,
                            done: after,
                            total: desc.size,
                        });
                    }
                }
                Ok(None) => return Ok(Ended::Clean),
                Err(e) => {
                    let why = super::retry::transport_error(&Method::GET, resp.url(), e);
                    let why = error_chain(&why);
                    tracing::debug!(digest = %desc.digest, at = hasher.len(), error = %why, "blob body broke off");
                    return Ok(Ended::Broken(why));
                }
            }
        }
    }

    /// Backoff before resume attempt `n` (1-based).
    pub(crate) fn resume_delay(&self, n: usize) -> Duration {
        let base = self.inner.opts.initial_backoff;
        let factor = 1u32 << n.min(6).saturating_sub(1);
        (base * factor).min(Duration::from_secs(30))
    }
}

/// The start of `bytes <start>-<end>/<total>`.
fn content_range_start(v: &str) -> Option<u64> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes")
        .unwrap_or(v)
        .trim_start_matches([' ', '=']);
    v.split('-').next()?.trim().parse().ok()
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn closed() -> RegistryError {
    RegistryError::Setup {
        msg: "the client's transfer limiter was closed".into(),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes=5-"), Some(5));
        assert_eq!(content_range_start("nonsense"), None);
    }
}
