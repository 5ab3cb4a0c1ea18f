//! OData Repeatable Requests v1.0: the `Repeatability-*` headers.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use http::header::{HeaderMap, HeaderName};

use super::problem::Problem;

/// Whether the gateway honours OData Repeatable Requests (`odata = true`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Repeatable {
    /// `Repeatability-*` headers are ignored (they pass through like any header).
    #[default]
    Ignored,
    /// `Repeatability-Request-ID` is a key; the headers are checked and answered.
    Honoured,
}

/// The client's request id: the idempotency key.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("repeatability-request-id");
/// When the client first sent the request (IMF-fixdate).
pub const FIRST_SENT: HeaderName = HeaderName::from_static("repeatability-first-sent");
/// The client's id: part of the scope.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("repeatability-client-id");
/// The service's verdict: `accepted` or `rejected`.
pub const RESULT: HeaderName = HeaderName::from_static("repeatability-result");

/// A repeatable request's headers, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repeatability {
    /// `Repeatability-Request-ID`, as sent.
    pub request_id: Vec<u8>,
    /// `Repeatability-Client-ID`, when sent.
    pub client_id: Option<String>,
}

/// True when the request carries any `Repeatability-*` header.
pub fn present(headers: &HeaderMap) -> bool {
    headers.contains_key(REQUEST_ID) || headers.contains_key(FIRST_SENT) || headers.contains_key(CLIENT_ID)
}

fn rejected(status: StatusCode, detail: impl Into<String>) -> Problem {
    Problem::RepeatabilityRejected { status, detail: detail.into() }
}

/// Reads the headers. `None` when the request is not a repeatable request. A request
/// with only one of the id and the first-sent time is `400`; a first-sent time older than
/// the retention window is `412`.
pub fn parse(headers: &HeaderMap, now: SystemTime, retention: Duration) -> Result<Option<Repeatability>, Problem> {
    let id = headers.get(REQUEST_ID);
    let first_sent = headers.get(FIRST_SENT);
    let (id, first_sent) = match (id, first_sent) {
        (None, None) if !headers.contains_key(CLIENT_ID) => return Ok(None),
        (Some(id), Some(sent)) => (id, sent),
        _ => {
            return Err(rejected(
                StatusCode::BAD_REQUEST,
                "Repeatability-Request-ID and Repeatability-First-Sent must be sent together.",
            ));
        }
    };
    let sent = first_sent.to_str().ok().and_then(|s| httpdate::parse_http_date(s).ok()).ok_or_else(|| {
        rejected(StatusCode::BAD_REQUEST, "Repeatability-First-Sent is not an HTTP date (IMF-fixdate).")
    })?;
    if now.duration_since(sent).is_ok_and(|age| age > retention) {
        return Err(rejected(
            StatusCode::PRECONDITION_FAILED,
            format!("Repeatability-First-Sent is older than the retention window of {}s.", retention.as_secs()),
        ));
    }
    let client_id = match headers.get(CLIENT_ID) {
        None => None,
        Some(value) => Some(
            crate::core::key::validate(value.as_bytes())
                .map(str::to_owned)
                .map_err(|e| rejected(StatusCode::BAD_REQUEST, format!("Repeatability-Client-ID: {e}.")))?,
        ),
    };
    Ok(Some(Repeatability { request_id: id.as_bytes().to_vec(), client_id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| ((*k).clone(), v.parse().unwrap())).collect()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn both_headers_make_a_repeatable_request() {
        let now = SystemTime::now();
        let sent = httpdate::fmt_http_date(now - Duration::from_secs(60));
        let h = headers(&[(&REQUEST_ID, "abc"), (&FIRST_SENT, &sent), (&CLIENT_ID, "app-1")]);
        let r = parse(&h, now, DAY).unwrap().unwrap();
        assert_eq!(r.request_id, b"abc");
        assert_eq!(r.client_id.as_deref(), Some("app-1"));
    }

    #[test]
    fn half_a_pair_is_rejected() {
        let err = parse(&headers(&[(&REQUEST_ID, "abc")]), SystemTime::now(), DAY).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let err = parse(&headers(&[(&CLIENT_ID, "app")]), SystemTime::now(), DAY).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn stale_first_sent_is_a_failed_precondition() {
        let now = SystemTime::now();
        let sent = httpdate::fmt_http_date(now - 2 * DAY);
        let err = parse(&headers(&[(&REQUEST_ID, "abc"), (&FIRST_SENT, &sent)]), now, DAY).unwrap_err();
        assert_eq!(err.status(), StatusCode::PRECONDITION_FAILED);
    }

    #[test]
    fn garbage_dates_are_rejected() {
        let err = parse(&headers(&[(&REQUEST_ID, "abc"), (&FIRST_SENT, "yesterday")]), SystemTime::now(), DAY);
        assert_eq!(err.unwrap_err().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn no_headers_is_not_repeatable() {
        assert_eq!(parse(&HeaderMap::new(), SystemTime::now(), DAY).unwrap(), None);
    }
}
