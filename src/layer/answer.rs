//! The answers the layer gives: the inner service's answer and what of it is stored, a
//! replay of a stored answer, and the markers every protected answer carries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::{Body, full};
use super::identify::RequestKind;
use super::odata;
use super::problem::Problem;
use super::route::Route;
use crate::core::{Millis, Outcome, Record, StoredResponse};

/// `Idempotent-Replayed: true` marks an answer served from the store.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// When the record behind a protected answer is forgotten (an HTTP date).
pub const EXPIRES: HeaderName = HeaderName::from_static("idempotency-expires");

/// Turns the inner service's answer into the outcome to record and the client's response.
pub(super) fn answered(route: &Route, mut parts: http::response::Parts, bytes: Bytes) -> (Outcome, Response<Body>) {
    strip_hop_by_hop(&mut parts.headers);
    let status = parts.status.as_u16();
    let outcome = if crate::core::is_final_status(status, route.store_server_errors) {
        let retained = bytes.len() as u64 <= route.max_stored_response;
        Outcome::Completed(StoredResponse {
            status,
            headers: storable_headers(&parts.headers, &route.replay_denylist),
            // A copy: the answer's bytes may be a slice of a larger read buffer, which a
            // stored record must not keep alive.
            body: if retained { Bytes::copy_from_slice(&bytes) } else { Bytes::new() },
            retained,
        })
    } else {
        Outcome::Retryable { error: format!("upstream answered {status}") }
    };
    (outcome, Response::from_parts(parts, full(bytes)))
}

/// End-to-end headers worth replaying. Values keep their bytes (one `char` per byte).
pub(super) fn storable_headers(headers: &HeaderMap, denylist: &[HeaderName]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| *name != header::CONTENT_LENGTH && !denylist.contains(name))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().iter().map(|&b| char::from(b)).collect()))
        .collect()
}

/// The stored answer, marked as a replay.
pub(super) fn replay(record: &Record) -> Response<Body> {
    let Some(stored) = &record.response else {
        return Problem::NotRetained.response();
    };
    let mut response = Response::new(full(stored.body.clone()));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in &stored.headers {
        let bytes: Vec<u8> = value.chars().map(|c| u8::try_from(c).unwrap_or(b'?')).collect();
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_bytes(&bytes)) {
            headers.append(name, value);
        }
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

pub(super) fn accepted(mut response: Response<Body>, kind: RequestKind) -> Response<Body> {
    if kind == RequestKind::Repeatable {
        response.headers_mut().insert(odata::RESULT, HeaderValue::from_static("accepted"));
    }
    response
}

pub(super) fn with_expiry(mut response: Response<Body>, expires_at: Millis) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(system_time(expires_at))) {
        response.headers_mut().insert(EXPIRES, value);
    }
    response
}

pub(super) fn system_time(at: Millis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(at.max(0) as u64)
}

/// The headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
}
