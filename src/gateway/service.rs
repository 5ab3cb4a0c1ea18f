//! Request handling: route, identify, claim, then execute, replay or refuse — SPEC §2
//! and §4, on top of the decision the store made.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::capture_connection;
use tokio_util::task::TaskTracker;

use super::body::{Body, BoxError, ReadError, boxed, full, read_limited};
use super::config::Config;
use super::odata;
use super::problem::Problem;
use super::route::{ForwardKey, KeySource, Route, RouteTable, TenantSource};
use super::upstream::{Upstream, UpstreamError, strip_hop_by_hop};
use crate::backoff::Backoff;
use crate::core::fingerprint::{RequestView, fingerprint};
use crate::core::units::millis;
use crate::core::{
    Decision, ExecuteReason, Fingerprint, Intent, LeaseToken, Millis, Outcome, Record, RecordId, StoredResponse, key,
};
use crate::metrics::{Label, RouteMetrics, StoreMetrics};
use crate::store::{Store, now_millis, owner};

/// `Idempotent-Replayed: true` marks an answer served from the store.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// When the record behind a protected answer is forgotten (an HTTP date).
pub const EXPIRES: HeaderName = HeaderName::from_static("idempotency-expires");

/// The gateway: routes, store and upstream, shared by every connection.
pub struct Gateway {
    routes: RouteTable,
    store: Arc<dyn Store>,
    upstream: Upstream,
    odata: odata::Repeatable,
    client_timeout: Duration,
    /// Metric handles, one per route in table order.
    route_metrics: Vec<RouteMetrics>,
    /// Each route's upstream, by the route's index (the gateway's own when it names none).
    route_upstreams: Vec<Upstream>,
    /// Metric handles for requests no route protects.
    unrouted: RouteMetrics,
    store_metrics: StoreMetrics,
    /// Claimed requests run here, detached from their client's connection, so a client
    /// that goes away never cancels an upstream call or leaves its record unfinished.
    /// Graceful shutdown waits for it to drain.
    tasks: TaskTracker,
    /// `X-Forwarded-Proto` for the upstream: how clients reached this gateway.
    forwarded_proto: HeaderValue,
    /// Keyed requests that matched no route, warned about once per pattern.
    unmatched: Unmatched,
}

/// Requests that carry a route's key header but match no protected route are forwarded
/// unprotected (SPEC §4); a route glob that misses must not fail silently, so each such
/// method and path pattern is logged as a warning once. A pattern is the path with every
/// segment that looks like an id written `*` (see [`looks_like_an_id`]), so `/orders/eu/1`
/// and `/orders/eu/2` are one; at most [`Unmatched::PATTERNS`] are remembered.
struct Unmatched {
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

    fn new(routes: &RouteTable) -> Self {
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

    fn notice(&self, method: &Method, path: &str, headers: &HeaderMap) {
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

/// What identifies a protected request.
#[derive(Clone, Debug)]
struct Identified {
    id: RecordId,
    fingerprint: Fingerprint,
    /// How the request came in: an OData repeatable request is answered as one.
    kind: RequestKind,
}

/// Whether a protected request came in as an OData repeatable request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestKind {
    /// An idempotency key (or a body key, or the fingerprint).
    Keyed,
    /// `Repeatability-Request-ID` + `Repeatability-First-Sent`.
    Repeatable,
}

impl Gateway {
    /// The gateway `config` describes, on `store`.
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Result<Self, crate::tls::Error> {
        let routes = RouteTable::new(config.routes.clone());
        let route_metrics = routes.iter().map(|r| RouteMetrics::new(&r.name)).collect();
        let upstream = Upstream::new(config.upstream.clone())?;
        // One pooled client for every upstream: a route's own base shares its connections.
        let route_upstreams =
            routes.iter().map(|r| upstream.at(r.upstream.clone().unwrap_or_else(|| config.upstream.clone()))).collect();
        let unmatched = Unmatched::new(&routes);
        Ok(Self {
            routes,
            store,
            upstream,
            route_upstreams,
            odata: config.odata,
            client_timeout: config.client_timeout,
            route_metrics,
            unrouted: RouteMetrics::new(""),
            store_metrics: StoreMetrics::default(),
            tasks: TaskTracker::new(),
            forwarded_proto: HeaderValue::from_static(if config.tls.is_some() { "https" } else { "http" }),
            unmatched,
        })
    }

    /// The route table as the admin API shows it (`GET /v1/routes`): each route's name,
    /// methods, path glob and upstream, in matching order. Also logs each route and
    /// publishes `idem_route_upstream`.
    pub fn publish_routes(&self) -> Vec<serde_json::Value> {
        self.routes
            .iter()
            .zip(&self.route_upstreams)
            .map(|(route, upstream)| {
                let upstream = upstream.base().to_string();
                tracing::info!(route = %route.name, path = %route.path, upstream = %upstream, "route");
                crate::metrics::set_route_upstream(&route.name, &upstream);
                let methods: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
                serde_json::json!({ "name": route.name, "methods": methods, "path": route.path, "upstream": upstream })
            })
            .collect()
    }

    /// The detached executions, for graceful shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Answers one client request.
    pub async fn handle<B>(self: Arc<Self>, request: Request<B>, peer: Option<SocketAddr>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Some((index, route)) = self.routes.find(request.method(), request.uri().path()) else {
            let safe = request.method() == Method::GET || request.method() == Method::HEAD;
            if self.odata == odata::Repeatable::Honoured && !safe && odata::present(request.headers()) {
                self.unrouted.request(Label::Rejected);
                return Problem::RepeatabilityRejected {
                    status: StatusCode::NOT_IMPLEMENTED,
                    detail: "Repeatable requests are not supported on this resource.".into(),
                }
                .response();
            }
            self.unrouted.request(Label::Passthrough);
            if !safe {
                self.unmatched.notice(request.method(), request.uri().path(), request.headers());
            }
            return self.passthrough(request.map(boxed), peer).await;
        };
        let route = route.clone();
        self.protected(index, route, request, peer).await
    }

    async fn passthrough(&self, mut request: Request<Body>, peer: Option<SocketAddr>) -> Response<Body> {
        self.upstream.prepare(&mut request, peer, &self.forwarded_proto);
        match self.upstream.send(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, boxed(body))
            }
            Err(UpstreamError::NotSent(_)) => Problem::UpstreamUnavailable.response(),
            Err(UpstreamError::Lost(_)) => Problem::UpstreamBroken.response(),
        }
    }

    async fn protected<B>(
        self: Arc<Self>,
        index: usize,
        route: Arc<Route>,
        request: Request<B>,
        peer: Option<SocketAddr>,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let metrics = &self.route_metrics[index];
        let (parts, body) = request.into_parts();
        let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = match declared {
            Some(length) if length > route.max_body => Err(ReadError::TooLarge),
            _ => read_limited(body, route.max_body, self.client_timeout).await,
        };
        let body = match body {
            Ok(body) => body,
            Err(error) => {
                metrics.request(Label::Rejected);
                return match error {
                    ReadError::TooLarge => Problem::BodyTooLarge { limit: route.max_body },
                    ReadError::TimedOut => Problem::ClientTimeout,
                    ReadError::Broken => Problem::BadRequest("The request body could not be read.".into()),
                }
                .response();
            }
        };
        let identified = match identify(&route, self.odata, &parts, &body) {
            Ok(Some(identified)) => identified,
            Ok(None) => {
                metrics.request(Label::MissingKey);
                return self.passthrough(Request::from_parts(parts, full(body)), peer).await;
            }
            Err(problem) => {
                let label =
                    if matches!(problem, Problem::KeyMissing { .. }) { Label::MissingKey } else { Label::Rejected };
                metrics.request(label);
                return problem.response();
            }
        };
        // From here on the work runs detached: a claim is never left without its outcome.
        let gateway = self.clone();
        let work =
            self.tasks.spawn(async move { gateway.claim_and_act(index, &route, parts, body, identified, peer).await });
        work.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a request handler failed");
            Problem::BadRequest("The request could not be processed.".into()).response()
        })
    }

    async fn claim_and_act(
        &self,
        index: usize,
        route: &Route,
        parts: Parts,
        body: Bytes,
        identified: Identified,
        peer: Option<SocketAddr>,
    ) -> Response<Body> {
        let metrics = &self.route_metrics[index];
        let mut intent = Intent {
            id: identified.id.clone(),
            fingerprint: identified.fingerprint,
            now: now_millis(),
            ttl_ms: millis(route.ttl),
            lease_ms: millis(route.lease),
            correlation_id: correlation_id(&parts.headers),
        };
        let deadline = match route.in_flight {
            super::route::InFlight::Wait(wait) => Some(Instant::now() + wait),
            super::route::InFlight::Reject => None,
        };
        let mut pause = Backoff::doubling(Duration::from_millis(10), Duration::from_millis(250));
        let claim = loop {
            let started = Instant::now();
            let claim = self.store.claim(&intent, route.policy()).await;
            self.store_metrics.claim.record(started.elapsed().as_secs_f64());
            let claim = match claim {
                Ok(claim) => claim,
                Err(error) => {
                    tracing::warn!(route = %route.name, %error, "store unavailable: request refused, not forwarded");
                    metrics.request(Label::Rejected);
                    return Problem::StoreUnavailable.response();
                }
            };
            match (claim.decision, deadline) {
                (Decision::InFlight, Some(deadline)) if Instant::now() + pause.peek() < deadline => {
                    tokio::time::sleep(pause.next_pause()).await;
                    intent.now = now_millis();
                }
                _ => break claim,
            }
        };
        tracing::debug!(route = %route.name, key_hash = %key::hash_for_logs(&identified.id.key), decision = ?claim.decision);
        let Some(record) = claim.record else {
            // Every decision but a fresh execute is made on a stored record, and a fresh
            // execute returns the record it claimed; a store that breaks this is refused.
            metrics.request(Label::Rejected);
            return Problem::StoreUnavailable.response();
        };
        let (label, response) = match (claim.decision, claim.token) {
            (Decision::Execute(reason), Some(token)) => {
                match reason {
                    ExecuteReason::RetryRecovery => metrics.retry_recovery(),
                    ExecuteReason::Expired => metrics.expired_key_retry(),
                    ExecuteReason::New | ExecuteReason::UnknownRetry | ExecuteReason::Changed => {}
                }
                let upstream = &self.route_upstreams[index];
                let response = self.execute(route, metrics, upstream, parts, body, &record, token, peer).await;
                (Label::Executed, accepted(response, identified.kind))
            }
            (Decision::Replay, _) => (Label::Replayed, accepted(replay(&record), identified.kind)),
            (Decision::NotRetained, _) => (Label::Rejected, Problem::NotRetained.response()),
            (Decision::KeyReused, _) if identified.kind == RequestKind::Repeatable => (
                Label::KeyReused,
                Problem::RepeatabilityRejected {
                    status: StatusCode::BAD_REQUEST,
                    detail: "This Repeatability-Request-ID was already used with another method, URI or payload."
                        .into(),
                }
                .response(),
            ),
            (Decision::KeyReused, _) => (Label::KeyReused, Problem::KeyReused.response()),
            (Decision::InFlight, _) => {
                let locked_until = record.lease.map_or(intent.now, |l| l.locked_until);
                let retry_after = ((locked_until - now_millis()).max(0) as u64).div_ceil(1000).max(1);
                (Label::InFlight, Problem::InFlight { retry_after }.response())
            }
            (Decision::OutcomeUnknown, _) | (Decision::Execute(_), None) => {
                (Label::OutcomeUnknown, Problem::OutcomeUnknown.response())
            }
            (Decision::NeedsReview, _) => (Label::Rejected, Problem::NeedsReview.response()),
        };
        metrics.request(label);
        with_expiry(response, record.expires_at)
    }

    /// Forwards a claimed request, keeps its lease alive meanwhile, records the outcome
    /// and returns what the client gets.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        route: &Route,
        metrics: &RouteMetrics,
        upstream: &Upstream,
        parts: Parts,
        body: Bytes,
        record: &Record,
        token: LeaseToken,
        peer: Option<SocketAddr>,
    ) -> Response<Body> {
        let mut request = Request::from_parts(parts, full(body));
        forward_key(route, request.headers_mut(), &record.id.key, record.created_at);
        upstream.prepare(&mut request, peer, &self.forwarded_proto);
        let renewal = owner::keep_alive(self.store.clone(), record.id.clone(), token, route.lease);
        // Whether a connection was ever made for this request: a timeout before that sent
        // nothing, so the key stays retryable.
        let connection = capture_connection(&mut request);
        let started = Instant::now();
        let exchange = tokio::time::timeout(route.upstream_timeout, exchange(upstream, request)).await;
        drop(renewal);
        metrics.upstream_time(started.elapsed());
        let (outcome, response) = match exchange {
            Err(_) if connection.connection_metadata().is_none() => (
                Outcome::Retryable {
                    error: format!(
                        "no connection to the upstream within upstream_timeout ({:?})",
                        route.upstream_timeout
                    ),
                },
                Problem::UpstreamUnavailable.response(),
            ),
            Err(_) => (
                Outcome::Unknown { error: format!("no answer within upstream_timeout ({:?})", route.upstream_timeout) },
                Problem::UpstreamTimeout.response(),
            ),
            Ok(Err(UpstreamError::NotSent(error))) => {
                (Outcome::Retryable { error }, Problem::UpstreamUnavailable.response())
            }
            Ok(Err(UpstreamError::Lost(error))) => (Outcome::Unknown { error }, Problem::UpstreamBroken.response()),
            Ok(Ok((parts, bytes))) => answered(route, parts, bytes),
        };
        if let Outcome::Retryable { error } | Outcome::Unknown { error } | Outcome::NeedsReview { error } = &outcome {
            tracing::warn!(route = %route.name, key_hash = %key::hash_for_logs(&record.id.key), status = outcome.status().as_str(), %error, "upstream call did not complete");
        }
        let timer = &self.store_metrics.finish;
        owner::finish(self.store.as_ref(), &record.id, token, outcome, |took| timer.record(took.as_secs_f64())).await;
        response
    }
}

/// Sends a request and reads the whole answer.
async fn exchange(
    upstream: &Upstream,
    request: Request<Body>,
) -> Result<(http::response::Parts, Bytes), UpstreamError> {
    let response = upstream.send(request).await?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|e| UpstreamError::Lost(format!("answer broken off: {e}")))?;
    Ok((parts, bytes.to_bytes()))
}

/// Derives the record id and fingerprint of a protected request. `Ok(None)`: no key on a
/// route where it is optional.
fn identify(
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
    let (fingerprint, _) = fingerprint(&route.fingerprint, view, |name| {
        parts.headers.get_all(name).iter().map(HeaderValue::as_bytes).collect()
    });
    let (raw_key, scope) = match &repeatable {
        Some(r) => {
            let scope = match &r.client_id {
                Some(client) => format!("{}#{client}", route.name),
                None => route.name.clone(),
            };
            (Some(r.request_id.clone()), scope)
        }
        None => (route_key(route, &parts.headers, body, &fingerprint)?, route.name.clone()),
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
    Ok(Some(Identified { id: RecordId::new(scope, tenant, key), fingerprint, kind }))
}

fn route_key(
    route: &Route,
    headers: &HeaderMap,
    body: &[u8],
    fingerprint: &Fingerprint,
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
        KeySource::Fingerprint => Some(fingerprint.to_hex().into_bytes()),
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

fn correlation_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("x-request-id")?.to_str().ok()?;
    (value.len() <= 128).then(|| value.to_owned())
}

/// Applies `forward_key` to the headers sent upstream.
fn forward_key(route: &Route, headers: &mut HeaderMap, key: &str, created_at: Millis) {
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
            let first_sent = httpdate::fmt_http_date(system_time(created_at));
            headers.insert(odata::REQUEST_ID, key_value);
            if let Ok(value) = HeaderValue::from_str(&first_sent) {
                headers.insert(odata::FIRST_SENT, value);
            }
        }
    }
}

/// Turns an upstream answer into the outcome to record and the client's response.
fn answered(route: &Route, mut parts: http::response::Parts, bytes: Bytes) -> (Outcome, Response<Body>) {
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
fn storable_headers(headers: &HeaderMap, denylist: &[HeaderName]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| *name != header::CONTENT_LENGTH && !denylist.contains(name))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().iter().map(|&b| char::from(b)).collect()))
        .collect()
}

/// The stored answer, marked as a replay.
fn replay(record: &Record) -> Response<Body> {
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

fn accepted(mut response: Response<Body>, kind: RequestKind) -> Response<Body> {
    if kind == RequestKind::Repeatable {
        response.headers_mut().insert(odata::RESULT, HeaderValue::from_static("accepted"));
    }
    response
}

fn with_expiry(mut response: Response<Body>, expires_at: Millis) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(system_time(expires_at))) {
        response.headers_mut().insert(EXPIRES, value);
    }
    response
}

fn system_time(at: Millis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(at.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use http_body_util::Full;

    use super::*;
    use crate::core::{ClaimPolicy, Resolution};
    use crate::gateway::store_faults::{demo_upstream, gateway_with};
    use crate::store::{Claim, Error, ListQuery, Page, StatRow};

    /// A store whose every operation fails, as when its server is unreachable.
    struct DownStore;

    fn down<T>() -> Result<T, Error> {
        Err(Error::Unavailable("connection refused".into()))
    }

    #[async_trait]
    impl Store for DownStore {
        async fn claim(&self, _: &Intent, _: ClaimPolicy) -> Result<Claim, Error> {
            down()
        }
        async fn renew(&self, _: &RecordId, _: LeaseToken, _: Millis) -> Result<bool, Error> {
            down()
        }
        async fn finish(&self, _: &RecordId, _: LeaseToken, _: Outcome, _: Millis) -> Result<bool, Error> {
            down()
        }
        async fn get(&self, _: &RecordId) -> Result<Option<Record>, Error> {
            down()
        }
        async fn list(&self, _: &ListQuery) -> Result<Page, Error> {
            down()
        }
        async fn delete(&self, _: &RecordId) -> Result<bool, Error> {
            down()
        }
        async fn resolve(&self, _: &RecordId, _: Resolution, _: Millis) -> Result<Record, Error> {
            down()
        }
        async fn purge_expired(&self, _: Millis, _: usize) -> Result<u64, Error> {
            down()
        }
        async fn stats(&self) -> Result<Vec<StatRow>, Error> {
            down()
        }
    }

    fn gateway(store: Arc<dyn Store>, upstream: SocketAddr) -> Arc<Gateway> {
        gateway_with("client_timeout = \"5s\"", store, upstream)
    }

    fn post(key: &str) -> Request<Full<Bytes>> {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"amount\":1}")))
            .unwrap()
    }

    async fn upstream_calls(upstream: SocketAddr) -> u64 {
        let stats: serde_json::Value =
            reqwest::get(format!("http://{upstream}/_demo/stats")).await.unwrap().json().await.unwrap();
        stats["calls"].as_u64().unwrap()
    }

    #[tokio::test]
    async fn store_outage_fails_closed() {
        let upstream = demo_upstream().await;
        let response = gateway(Arc::new(DownStore), upstream).handle(post("k1"), None).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["type"], "store-unavailable");
        assert_eq!(upstream_calls(upstream).await, 0, "nothing may be forwarded while the store is down");
    }

    #[tokio::test]
    async fn replay_is_served_from_the_store() {
        let upstream = demo_upstream().await;
        let gateway = gateway(Arc::new(crate::store::memory::MemoryStore::default()), upstream);
        let first = gateway.clone().handle(post("k1"), None).await;
        assert_eq!(first.status(), StatusCode::CREATED);
        let first_body = first.into_body().collect().await.unwrap().to_bytes();
        let again = gateway.clone().handle(post("k1"), None).await;
        assert_eq!(again.status(), StatusCode::CREATED);
        assert_eq!(again.headers()[REPLAYED], "true");
        assert!(again.headers().contains_key(EXPIRES));
        assert!(!again.headers().contains_key(header::SET_COOKIE), "set-cookie is on the default denylist");
        assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), first_body);
        assert_eq!(upstream_calls(upstream).await, 1);
    }
}
