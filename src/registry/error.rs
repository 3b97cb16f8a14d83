//! The one error type of the distribution client.
//!
//! Variants are structured so callers can branch (a 404 on a manifest, a refused login, a
//! digest mismatch); messages are one line, and URLs in them never carry query strings (upload
//! `_state`, signed redirect parameters) or user info.

use std::time::Duration;

use crate::digest::DigestError;

/// Errors from talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an error status. `code` and `message` come from the
    /// distribution error body (`{"errors":[{"code","message","detail"}]}`) when there is one.
    #[error(
        "{method} {url}: registry answered {status}{}",
        render_codes(code, message)
    )]
    Registry {
        /// HTTP method of the failed request.
        method: String,
        /// The request URL, without query or user info.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The first distribution error code (`MANIFEST_UNKNOWN`, `DENIED`, …), if any.
        code: Option<String>,
        /// All error codes and messages of the body, rendered on one line.
        message: String,
    },
    /// Authentication failed or was refused.
    #[error("authentication with {registry} failed: {msg}")]
    Auth {
        /// The registry host (`docker.io` for Docker Hub).
        registry: String,
        /// What was refused, and what to check.
        msg: String,
    },
    /// Content did not match its digest or size.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// Reading a blob source or writing a blob sink failed.
    #[error("blob i/o failed")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange itself failed (connection, TLS, timeout, broken body).
    #[error("{method} {url} failed")]
    Http {
        /// HTTP method.
        method: String,
        /// The request URL, without query or user info.
        url: String,
        /// The transport error (its own URL stripped).
        #[source]
        source: reqwest::Error,
    },
    /// Plain HTTP was asked for (a `Location`, redirect or token realm) on a host that is
    /// neither loopback nor listed as insecure.
    #[error(
        "refusing plain http to {registry}: only loopback hosts and --insecure-registry hosts may use http"
    )]
    Insecure {
        /// The host that would have been contacted over plain HTTP.
        registry: String,
    },
    /// The registry answered something the protocol does not allow (a missing `Location`,
    /// an oversized manifest, a malformed header).
    #[error("{url}: {msg}")]
    Protocol {
        /// The request URL, without query or user info.
        url: String,
        /// What was wrong.
        msg: String,
    },
    /// The client could not be set up (bad CA file, bad option).
    #[error("registry client setup failed: {msg}")]
    Setup {
        /// What was wrong.
        msg: String,
        /// The cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

fn render_codes(code: &Option<String>, message: &str) -> String {
    match (code, message.is_empty()) {
        (_, false) => format!(": {message}"),
        (Some(c), true) => format!(": {c}"),
        (None, true) => String::new(),
    }
}

impl RegistryError {
    /// The HTTP status, for registry errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Registry { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether retrying the same operation later could succeed: transport failures, timeouts,
    /// 408, 429 and 5xx gateway/availability errors.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Registry { status, .. } => is_retryable_status(*status),
            RegistryError::Http { source, .. } => is_transient_transport(source),
            _ => false,
        }
    }
}

/// Whether a response status is worth retrying.
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// Whether a transport error is worth retrying (not a bad request, a refused redirect, or a
/// TLS certificate we do not trust: asking again gets the same certificate).
pub(crate) fn is_transient_transport(e: &reqwest::Error) -> bool {
    !(e.is_builder() || e.is_redirect() || e.is_decode() || is_certificate_error(e))
}

/// Whether the error chain holds a refused TLS certificate.
pub(crate) fn is_certificate_error(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        if s.to_string().contains("invalid peer certificate") {
            return true;
        }
        source = s.source();
    }
    false
}

/// `url` without query, fragment or user info, for errors and logs.
pub(crate) fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Parse a distribution error body into (first code, one-line rendering).
pub(crate) fn parse_error_body(body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        detail: serde_json::Value,
    }
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    match serde_json::from_slice::<Body>(body) {
        Ok(b) if !b.errors.is_empty() => {
            let code = b.errors.first().map(|e| e.code.clone());
            let parts: Vec<String> = b
                .errors
                .iter()
                .map(|e| {
                    let mut s = e.code.clone();
                    if !e.message.is_empty() {
                        s.push_str(": ");
                        s.push_str(&one_line(&e.message));
                    }
                    if !e.detail.is_null() {
                        let d = match &e.detail {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        s.push_str(&format!(" ({})", one_line(&d)));
                    }
                    s
                })
                .collect();
            (code, truncate(&parts.join("; "), 512))
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            (None, truncate(&one_line(&text), 200))
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A `Retry-After` value (delta seconds or IMF-fixdate), as a wait from now.
pub(crate) fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parse an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only HTTP-date form senders
/// may generate (RFC 9110 §5.6.7).
fn parse_http_date(s: &str) -> Option<std::time::SystemTime> {
    let rest = s.split_once(", ")?.1;
    let mut it = rest.split(' ');
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || day == 0 || day > 31 || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_render_on_one_line() {
        let body = br#"{"errors":[{"code":"MANIFEST_INVALID","message":"manifest\ninvalid","detail":{"a":1}},{"code":"DENIED","message":"no"}]}"#;
        let (code, msg) = parse_error_body(body);
        assert_eq!(code.as_deref(), Some("MANIFEST_INVALID"));
        assert_eq!(
            msg,
            r#"MANIFEST_INVALID: manifest invalid ({"a":1}); DENIED: no"#
        );
        let (code, msg) = parse_error_body(b"<html>\n oops </html>");
        assert_eq!((code, msg.as_str()), (None, "<html> oops </html>"));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_770);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn urls_are_redacted() {
        let u: url::Url = "https://u:p@h/v2/r/blobs/uploads/x?_state=secret&digest=d"
            .parse()
            .unwrap();
        assert_eq!(redact(&u), "https://h/v2/r/blobs/uploads/x");
    }
}
