//! Retries with exponential backoff and jitter (backon) for one HTTP request: connection
//! errors, timeouts, 408, 429 (honouring `Retry-After`, capped) and 500/502/503/504. Other
//! statuses are returned at once. Requests are rebuilt for every attempt by a closure, so
//! bodies are re-sent from their opener rather than from a consumed reader.

use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, Response};
use url::Url;

use super::error::{
    RegistryError, is_retryable_status, is_transient_transport, parse_retry_after, redact,
};
use super::transport::ClientOptions;

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) max_attempts: usize,
    pub(crate) max_total: Duration,
    pub(crate) initial: Duration,
    pub(crate) max_retry_after: Duration,
}

impl RetryPolicy {
    pub(crate) fn from_options(o: &ClientOptions) -> RetryPolicy {
        RetryPolicy {
            max_attempts: o.max_attempts.max(1),
            max_total: o.max_total_retry_time,
            initial: o.initial_backoff,
            max_retry_after: o.max_retry_after,
        }
    }

    /// The backoff schedule: `max_attempts - 1` sleeps, exponential with jitter, bounded in
    /// total.
    pub(crate) fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.initial)
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.max_attempts - 1)
            .with_total_delay(Some(self.max_total))
    }
}

enum Failure {
    Status(Response),
    Transport(reqwest::Error),
}

impl Failure {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status(r) => r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            Failure::Transport(_) => None,
        }
    }
}

/// Send the request `build` makes, retrying transient failures. Returns the last response
/// even when its status is a retryable error (the caller turns statuses into errors, with the
/// body); transport failures become [`RegistryError::Http`].
pub(crate) async fn send<F>(
    policy: &RetryPolicy,
    method: &Method,
    url: &Url,
    mut build: F,
) -> Result<Response, RegistryError>
where
    F: FnMut() -> reqwest::RequestBuilder,
{
    let attempt = || {
        let request = build();
        async move {
            match request.send().await {
                Ok(r) if is_retryable_status(r.status().as_u16()) => Err(Failure::Status(r)),
                Ok(r) => Ok(r),
                Err(e) => Err(Failure::Transport(e)),
            }
        }
    };
    let cap = policy.max_retry_after;
    let shown = redact(url);
    let result = attempt
        .retry(policy.backoff())
        .when(|f| match f {
            Failure::Status(_) => true,
            Failure::Transport(e) => is_transient_transport(e),
        })
        .adjust(|f, delay| delay.map(|d| f.retry_after().map_or(d, |ra| ra.min(cap))))
        .notify(|f, delay| match f {
            Failure::Status(r) => {
                tracing::debug!(%method, url = %shown, status = r.status().as_u16(), ?delay, "retrying")
            }
            Failure::Transport(e) => {
                let e = e_without_url(e);
                tracing::debug!(%method, url = %shown, error = %e, ?delay, "retrying")
            }
        })
        .await;
    match result {
        Ok(r) | Err(Failure::Status(r)) => Ok(r),
        Err(Failure::Transport(e)) => Err(transport_error(method, url, e)),
    }
}

fn e_without_url(e: &reqwest::Error) -> String {
    // reqwest prints the URL (with its query) in Display; say only what happened.
    let mut s = String::new();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    if e.is_timeout() {
        s.push_str("timed out");
    } else if e.is_connect() {
        s.push_str("connection failed");
    } else {
        s.push_str("request failed");
    }
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A transport error, with the URL redacted.
pub(crate) fn transport_error(method: &Method, url: &Url, e: reqwest::Error) -> RegistryError {
    RegistryError::Http {
        method: method.to_string(),
        url: redact(url),
        source: e.without_url(),
    }
}
