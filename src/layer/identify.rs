//! Identify a protected request: its key (a header, OData `Repeatability-*`, JSON pointers
//! into the body, or the fingerprint), its tenant and its fingerprint (SPEC §3); and how
//! the key reaches the inner service (`forward_key`).

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};

use super::odata;
use super::problem::Problem;
use super::route::{ForwardKey, KeySource, Route, RouteTable, TenantSource};
use crate::core::fingerprint::{RequestView, fingerprint};
use crate::core::{Fingerprint, Millis, RecordId, key};

/// What identifies a protected request.
#[derive(Clone, Debug)]
pub(super) struct Identified {
    pub(super) id: RecordId,
    pub(super) fingerprint: Fingerprint,
    /// How the request came in: an OData repeatable request is answered as one.
    pub(super) kind: RequestKind,
}

/// Whether a protected request came in as an OData repeatable request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// An idempotency key (or a body key, or the fingerprint).
    Keyed,
    /// `Repeatability-Request-ID` + `Repeatability-First-Sent`.
    Repeatable,
}

/// Derives the record id and fingerprint of a protected request. `Ok(None)`: no key on a
/// route where it is optional.
pub(super) fn identify(
    route: &Route,
    odata: odata::Repeatable,
    parts: &Parts,
    body: &Bytes,
) -> Result<Option<Identified>, Problem> {
    let repeatable = match odata {
        odata::Repeatable::Honoured => odata::parse(&parts.headers, SystemTime::now(), route.ttl)?,
        odata::Repeatable::Ignored => None,
    };
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        content_type,
        body,
    };
    // Computed once, and only when needed: a request without its key on a route where the
    // key is optional passes through without one.
    let mut computed = None;
    let mut fingerprint = || {
        *computed.get_or_insert_with(|| {
            fingerprint(&route.fingerprint, view, |name| {
                parts.headers.get_all(name).iter().map(HeaderValue::as_bytes).collect()
            })
            .0
        })
    };
    let (raw_key, scope) = match &repeatable {
        Some(r) => {
            let scope = match &r.client_id {
                Some(client) => format!("{}#{client}", route.name),
                None => route.name.clone(),
            };
            (Some(r.request_id.clone()), scope)
        }
        None => (route_key(route, &parts.headers, body, &mut fingerprint)?, route.name.clone()),
    };
    let Some(raw_key) = raw_key else {
        return if route.required { Err(Problem::KeyMissing { source: key_source(route) }) } else { Ok(None) };
    };
    let key = key::accept(&raw_key, route.normalize).map_err(|e| match repeatable {
        Some(_) => Problem::RepeatabilityRejected {
            status: StatusCode::BAD_REQUEST,
            detail: format!("Repeatability-Request-ID: {e}."),
        },
        None => Problem::KeyInvalid(e),
    })?;
    let tenant = tenant(route, &parts.headers)?;
    let kind = if repeatable.is_some() { RequestKind::Repeatable } else { RequestKind::Keyed };
    Ok(Some(Identified { id: RecordId::new(scope, tenant, key), fingerprint: fingerprint(), kind }))
}

fn route_key(
    route: &Route,
    headers: &HeaderMap,
    body: &[u8],
    fingerprint: &mut dyn FnMut() -> Fingerprint,
) -> Result<Option<Vec<u8>>, Problem> {
    Ok(match &route.key {
        KeySource::Header(name) => {
            let mut values = headers.get_all(name).iter();
            let first = values.next();
            if values.next().is_some() {
                return Err(Problem::BadRequest(format!("Send exactly one {name} header.")));
            }
            match first {
                Some(value) => Some(key::from_header(value.as_bytes()).map_err(Problem::KeyInvalid)?.into_owned()),
                None => None,
            }
        }
        KeySource::Body(pointers) => key::from_body(body, pointers).map(String::into_bytes),
        KeySource::Fingerprint => Some(fingerprint().to_hex().into_bytes()),
    })
}

fn key_source(route: &Route) -> String {
    match &route.key {
        KeySource::Header(name) => format!("the {name} header"),
        KeySource::Body(pointers) => format!("the JSON body at {}", pointers.join(", ")),
        KeySource::Fingerprint => "the request".into(),
    }
}

fn tenant(route: &Route, headers: &HeaderMap) -> Result<String, Problem> {
    if let TenantSource::Header(name) = &route.tenant {
        if let Some(value) = headers.get(name) {
            return key::validate(value.as_bytes())
                .map(str::to_owned)
                .map_err(|e| Problem::BadRequest(format!("The {name} header is invalid: {e}.")));
        }
    }
    Ok(key::tenant_from_credential(headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes)))
}

pub(super) fn correlation_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("x-request-id")?.to_str().ok()?;
    (value.len() <= 128).then(|| value.to_owned())
}

/// Applies `forward_key` to the headers sent upstream.
pub(super) fn forward_key(route: &Route, headers: &mut HeaderMap, key: &str, created_at: Millis) {
    let key_header = match &route.key {
        KeySource::Header(name) => Some(name.clone()),
        _ => None,
    };
    let Ok(key_value) = HeaderValue::from_str(key) else {
        return;
    };
    match &route.forward_key {
        ForwardKey::AsIs => {}
        ForwardKey::Strip => {
            key_header.map(|h| headers.remove(h));
            for name in [odata::REQUEST_ID, odata::FIRST_SENT, odata::CLIENT_ID] {
                headers.remove(name);
            }
        }
        ForwardKey::Rename(name) => {
            key_header.map(|h| headers.remove(h));
            headers.insert(name.clone(), key_value);
        }
        ForwardKey::OData => {
            key_header.map(|h| headers.remove(h));
            let first_sent = httpdate::fmt_http_date(super::answer::system_time(created_at));
            headers.insert(odata::REQUEST_ID, key_value);
            if let Ok(value) = HeaderValue::from_str(&first_sent) {
                headers.insert(odata::FIRST_SENT, value);
            }
        }
    }
}

/// Requests that carry a route's key header but match no protected route are forwarded
/// unprotected (SPEC §4); a route glob that misses must not fail silently, so each such
/// method and path pattern is logged as a warning once. A pattern is the path with every
/// segment that looks like an id written `*` (see [`looks_like_an_id`]), so `/orders/eu/1`
/// and `/orders/eu/2` are one; at most [`Unmatched::PATTERNS`] are remembered.
pub(super) struct Unmatched {
    key_headers: Vec<HeaderName>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A path segment that names one thing rather than a kind of thing: it starts with a digit
/// (`42`, `2026-12-01`, a UUID that does) or is long and holds one (`ord_12345678`, a
/// UUID); a short word with a digit, like the version `v1`, is kept.
fn looks_like_an_id(segment: &str) -> bool {
    let has_digit = segment.bytes().any(|b| b.is_ascii_digit());
    segment.starts_with(|c: char| c.is_ascii_digit()) || (has_digit && segment.len() >= 8)
}

impl Unmatched {
    const PATTERNS: usize = 1024;

    pub(super) fn new(routes: &RouteTable) -> Self {
        let mut key_headers: Vec<HeaderName> = routes
            .iter()
            .filter_map(|route| match &route.key {
                KeySource::Header(name) => Some(name.clone()),
                KeySource::Body(_) | KeySource::Fingerprint => None,
            })
            .collect();
        key_headers.dedup();
        Unmatched { key_headers, seen: Default::default() }
    }

    pub(super) fn notice(&self, method: &Method, path: &str, headers: &HeaderMap) {
        let Some(header) = self.key_headers.iter().find(|name| headers.contains_key(*name)) else { return };
        let pattern: Vec<&str> =
            path.split('/').map(|segment| if looks_like_an_id(segment) { "*" } else { segment }).collect();
        let pattern = format!("{method} {}", pattern.join("/"));
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.len() < Self::PATTERNS && seen.insert(pattern.clone()) {
            tracing::warn!(
                request = %pattern, header = %header,
                "a request with an idempotency key matched no protected route and was forwarded unprotected; \
                 check the routes' methods and path globs (`*` stays within a segment, `**` crosses them)"
            );
        }
    }
}
