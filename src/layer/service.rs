//! The layer's logic: route, identify, claim, then execute (call the inner service),
//! replay or refuse — SPEC §2 and §4, on the decision the store made. Protected requests
//! are buffered (bounded by the route's `max_body`); everything else streams through.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header;
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};

use super::Shared;
use super::answer::{accepted, answered, replay, with_expiry};
use super::body::{Body, BoxError, ReadError, full, read_limited};
use super::identify::{Identified, RequestKind, correlation_id, forward_key, identify};
use super::odata;
use super::problem::Problem;
use super::route::{InFlight, Route};
use crate::backoff::Backoff;
use crate::core::units::millis;
use crate::core::{Decision, ExecuteReason, Intent, LeaseToken, Outcome, Record, key};
use crate::metrics::{Label, RouteMetrics};
use crate::store::owner;
use crate::store::postgres::transaction::{OpenClaim, Transactional, TxClaim};

/// The idem middleware around an inner HTTP service (made by [`super::IdemLayer`]).
#[derive(Clone)]
pub struct IdemService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> IdemService<S> {
    pub(super) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

/// Put into the extensions of every request the layer hands its inner service on a
/// protected route: which route matched (its position in the table and the route). The
/// gateway's proxy uses it to pick the route's own upstream.
#[derive(Clone, Debug)]
pub struct MatchedRoute {
    /// The route's position in the table.
    pub index: usize,
    /// The route.
    pub route: Arc<Route>,
}

/// Put on a response by an inner service that knows its request failed in transit (a
/// proxy): the layer records the failure as such instead of storing the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request never reached its destination: retrying is safe (`failed_retryable`).
    NotSent(String),
    /// The request may have reached it, but no complete answer came back (`outcome_unknown`).
    Lost(String),
}

/// Put into the extensions of a claimed request. An inner service that can tell a request
/// that never left from one that may have (a proxy watching its connection) reports how
/// to ask; when the route's `upstream_timeout` runs out, a request that provably never
/// left is retryable rather than unknown. In-process services need not touch it.
#[derive(Clone, Default)]
pub struct Delivery(Arc<OnceLock<Box<dyn Fn() -> bool + Send + Sync>>>);

impl Delivery {
    /// Reports how to ask whether the request is still unsent: `never_left` answers true
    /// while no byte of it can have reached the destination.
    pub fn report(&self, never_left: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(never_left));
    }

    fn never_left(&self) -> bool {
        self.0.get().is_some_and(|never_left| never_left())
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for IdemService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service that was polled ready goes with this request; a clone stays for the
        // next one (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(self.shared.clone().handle(inner, request))
    }
}

/// What the inner service's call came to.
enum Exchanged<E> {
    /// A whole answer.
    Answered(http::response::Parts, Bytes),
    /// A failure the inner service reported ([`Failure`]), with its answer.
    Failed(Failure, Response<Body>),
    /// The answer's body broke off.
    Broken(String),
    /// The inner service failed.
    Error(E),
}

impl Shared {
    async fn handle<S, B, ResBody>(self: Arc<Self>, inner: S, request: Request<B>) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let Some((index, route)) = self.routes.find(request.method(), request.uri().path()) else {
            let safe = request.method() == Method::GET || request.method() == Method::HEAD;
            if self.odata == odata::Repeatable::Honoured && !safe && odata::present(request.headers()) {
                self.unrouted.request(Label::Rejected);
                return Ok(Problem::RepeatabilityRejected {
                    status: StatusCode::NOT_IMPLEMENTED,
                    detail: "Repeatable requests are not supported on this resource.".into(),
                }
                .response());
            }
            self.unrouted.request(Label::Passthrough);
            if !safe {
                self.unmatched.notice(request.method(), request.uri().path(), request.headers());
            }
            return passthrough(inner, request.map(Body::new)).await;
        };
        let route = route.clone();
        let metrics = &self.route_metrics[index];
        let (parts, body) = request.into_parts();
        let body = match self.read_body(&route, &parts, body).await {
            Ok(body) => body,
            Err(problem) => {
                metrics.request(Label::Rejected);
                return Ok(problem.response());
            }
        };
        let identified = match identify(&route, self.odata, &parts, &body) {
            Ok(Some(identified)) => identified,
            Ok(None) => {
                metrics.request(Label::MissingKey);
                let mut request = Request::from_parts(parts, full(body));
                request.extensions_mut().insert(MatchedRoute { index, route });
                return passthrough(inner, request).await;
            }
            Err(problem) => {
                let label =
                    if matches!(problem, Problem::KeyMissing { .. }) { Label::MissingKey } else { Label::Rejected };
                metrics.request(label);
                return Ok(problem.response());
            }
        };
        // From here on the work runs detached: a client that goes away never cancels the
        // call or leaves a claim without its outcome. Graceful shutdown waits for it.
        let shared = self.clone();
        let call = Call { index, route, parts, body, identified };
        // Boxed: the state machine of `claim_and_act` is tens of kilobytes (every path's
        // futures side by side), and tokio moves a task's future and its output several
        // times; moving a box moves a pointer (bench/cost.sh: a third of a miss's
        // instructions were those copies).
        let work = self.tasks.spawn(Box::pin(async move { shared.claim_and_act(call, inner).await }));
        work.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a request handler failed");
            Ok(Problem::HandlerFailed.response())
        })
    }

    /// The whole body of a protected request, within the route's `max_body` and the
    /// `client_timeout`.
    async fn read_body<B>(&self, route: &Route, parts: &Parts, body: B) -> Result<Bytes, Problem>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body = match declared {
            Some(length) if length > route.max_body => Err(ReadError::TooLarge),
            _ => read_limited(body, route.max_body, self.client_timeout).await,
        };
        body.map_err(|error| match error {
            ReadError::TooLarge => Problem::BodyTooLarge { limit: route.max_body },
            ReadError::TimedOut => Problem::ClientTimeout,
            ReadError::Broken => Problem::BadRequest("The request body could not be read.".into()),
        })
    }

    async fn claim_and_act<S, ResBody>(&self, call: Call, inner: S) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<ResBody>> + Send,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let metrics = &self.route_metrics[call.index];
        let intent = Intent {
            id: call.identified.id.clone(),
            fingerprint: call.identified.fingerprint,
            now: self.clock.now(),
            ttl_ms: millis(call.route.ttl),
            lease_ms: millis(call.route.lease),
            correlation_id: correlation_id(&call.parts.headers),
        };
        if let Some(transactional) = &self.transactional {
            // Boxed, so the transactional path's futures do not enlarge every other path's.
            return Box::pin(self.in_transaction(transactional, call, intent, inner)).await;
        }
        let claimed = match self.claim(&call.route, intent.clone()).await {
            Ok(claim) => self.settle_unknown(&call.route, &call.body, claim, intent).await,
            Err(problem) => Err(problem),
        };
        let claim = match claimed {
            Ok(claim) => claim,
            Err(problem) => {
                metrics.request(Label::Rejected);
                return Ok(problem.response());
            }
        };
        let Some(record) = claim.record else {
            // Every decision but a fresh execute is made on a stored record, and a fresh
            // execute returns the record it claimed; a store that breaks this is refused.
            metrics.request(Label::Rejected);
            return Ok(Problem::StoreUnavailable.response());
        };
        let kind = call.identified.kind;
        let (label, response) = match (claim.decision, claim.token) {
            (Decision::Execute(reason), Some(token)) => {
                count(metrics, reason);
                let response = self.execute(call, inner, &record, token).await?;
                (Label::Executed, accepted(response, kind))
            }
            (decision, _) => self.refuse_or_replay(decision, &record, kind),
        };
        metrics.request(label);
        Ok(with_expiry(response, record.expires_at))
    }

    /// Claims `intent`, waiting out a request in flight when the route says so.
    async fn claim(&self, route: &Route, mut intent: Intent) -> Result<crate::store::Claim, Problem> {
        let deadline = match route.in_flight {
            InFlight::Wait(wait) => Some(Instant::now() + wait),
            InFlight::Reject => None,
        };
        let mut pause = Backoff::doubling(Duration::from_millis(10), Duration::from_millis(250));
        loop {
            let started = Instant::now();
            let claim = self.store.claim(&intent, route.policy()).await;
            self.store_metrics.claim.record(started.elapsed().as_secs_f64());
            let claim = claim.map_err(|error| {
                tracing::warn!(route = %route.name, %error, "store unavailable: request refused, not forwarded");
                Problem::StoreUnavailable
            })?;
            match (claim.decision, deadline) {
                (Decision::InFlight, Some(deadline)) if Instant::now() + pause.peek() < deadline => {
                    tokio::time::sleep(pause.next_pause()).await;
                    intent.now = self.clock.now();
                }
                _ => {
                    tracing::debug!(route = %route.name, key_hash = %key::hash_for_logs(&intent.id.key), decision = ?claim.decision);
                    return Ok(claim);
                }
            }
        }
    }

    /// The answer to every decision that does not execute.
    fn refuse_or_replay(&self, decision: Decision, record: &Record, kind: RequestKind) -> (Label, Response<Body>) {
        match decision {
            Decision::Replay => (Label::Replayed, accepted(replay(record), kind)),
            Decision::NotRetained => (Label::Rejected, Problem::NotRetained.response()),
            Decision::KeyReused if kind == RequestKind::Repeatable => (
                Label::KeyReused,
                Problem::RepeatabilityRejected {
                    status: StatusCode::BAD_REQUEST,
                    detail: "This Repeatability-Request-ID was already used with another method, URI or payload."
                        .into(),
                }
                .response(),
            ),
            Decision::KeyReused => (Label::KeyReused, Problem::KeyReused.response()),
            Decision::InFlight => {
                let now = self.clock.now();
                let locked_until = record.lease.map_or(now, |l| l.locked_until);
                let retry_after = ((locked_until - now).max(0) as u64).div_ceil(1000).max(1);
                (Label::InFlight, Problem::InFlight { retry_after }.response())
            }
            Decision::OutcomeUnknown | Decision::Execute(_) | Decision::Verify => {
                (Label::OutcomeUnknown, Problem::OutcomeUnknown.response())
            }
            Decision::NeedsReview => (Label::Rejected, Problem::NeedsReview.response()),
        }
    }

    /// Calls the inner service with a claimed request, keeps the lease alive meanwhile,
    /// records the outcome and returns what the client gets.
    async fn execute<S, ResBody>(
        &self,
        call: Call,
        inner: S,
        record: &Record,
        token: LeaseToken,
    ) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<ResBody>>,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let route = call.route.clone();
        let metrics = &self.route_metrics[call.index];
        let delivery = Delivery::default();
        let mut request = call.into_request(record);
        request.extensions_mut().insert(delivery.clone());
        let renewal = owner::keep_alive(self.store.clone(), record.id.clone(), token, route.lease, self.clock);
        let started = Instant::now();
        let exchanged = tokio::time::timeout(route.upstream_timeout, exchange(inner, request)).await;
        drop(renewal);
        metrics.upstream_time(started.elapsed());
        let timeout = route.upstream_timeout;
        let mut error = None;
        let (outcome, response) = match exchanged {
            Err(_) if delivery.never_left() => (
                Outcome::Retryable {
                    error: format!("no connection to the upstream within upstream_timeout ({timeout:?})"),
                },
                Problem::UpstreamUnavailable.response(),
            ),
            Err(_) => (
                Outcome::Unknown { error: format!("no answer within upstream_timeout ({timeout:?})") },
                Problem::UpstreamTimeout.response(),
            ),
            Ok(Exchanged::Failed(Failure::NotSent(error), response)) => (Outcome::Retryable { error }, response),
            Ok(Exchanged::Failed(Failure::Lost(error), response)) => (Outcome::Unknown { error }, response),
            Ok(Exchanged::Broken(error)) => (Outcome::Unknown { error }, Problem::UpstreamBroken.response()),
            Ok(Exchanged::Error(e)) => {
                error = Some(e);
                let failed = "the inner service failed; it may have acted".to_owned();
                (Outcome::Unknown { error: failed }, Problem::HandlerFailed.response())
            }
            Ok(Exchanged::Answered(parts, bytes)) => answered(&route, parts, bytes),
        };
        if let Outcome::Retryable { error } | Outcome::Unknown { error } | Outcome::NeedsReview { error } = &outcome {
            tracing::warn!(route = %route.name, key_hash = %key::hash_for_logs(&record.id.key), status = outcome.status().as_str(), %error, "upstream call did not complete");
        }
        let timer = &self.store_metrics.finish;
        owner::finish(self.store.as_ref(), &record.id, token, outcome, self.clock, |took| {
            timer.record(took.as_secs_f64())
        })
        .await;
        match error {
            Some(e) => Err(e),
            None => Ok(response),
        }
    }

    /// Transactional mode: the claim, the handler's statements and the answer commit in
    /// one transaction, or none of them does.
    async fn in_transaction<S, ResBody>(
        &self,
        transactional: &Transactional,
        call: Call,
        intent: Intent,
        inner: S,
    ) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<ResBody>> + Send,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let metrics = &self.route_metrics[call.index];
        let route = call.route.clone();
        let wait = match route.in_flight {
            InFlight::Wait(wait) => wait,
            InFlight::Reject => Duration::ZERO,
        };
        let started = Instant::now();
        let claim = transactional.claim(&intent, route.policy(), wait, route.lease).await;
        self.store_metrics.claim.record(started.elapsed().as_secs_f64());
        let open = match claim {
            Ok(TxClaim::Open(open)) => open,
            Ok(TxClaim::Decided(claim)) => {
                let Some(record) = claim.record else {
                    metrics.request(Label::Rejected);
                    return Ok(Problem::StoreUnavailable.response());
                };
                let (label, response) = self.refuse_or_replay(claim.decision, &record, call.identified.kind);
                metrics.request(label);
                return Ok(with_expiry(response, record.expires_at));
            }
            Ok(TxClaim::Busy) => {
                metrics.request(Label::InFlight);
                return Ok(Problem::InFlight { retry_after: 1 }.response());
            }
            Err(error) => {
                tracing::warn!(route = %route.name, %error, "store unavailable: request refused, not run");
                metrics.request(Label::Rejected);
                return Ok(Problem::StoreUnavailable.response());
            }
        };
        let kind = call.identified.kind;
        let expires_at = open.record().expires_at;
        let response = self.run_in(open, call, inner).await?;
        metrics.request(Label::Executed);
        Ok(with_expiry(accepted(response, kind), expires_at))
    }

    /// Runs the handler in the claim's transaction and commits when its answer is final;
    /// anything else — an answer that is not final, an error, a panic, the timeout — rolls
    /// back the claim with the handler's statements, so the key is free for the retry.
    async fn run_in<S, ResBody>(&self, open: OpenClaim, call: Call, inner: S) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<ResBody>> + Send,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let route = call.route.clone();
        let metrics = &self.route_metrics[call.index];
        let mut request = call.into_request(open.record());
        request.extensions_mut().insert(open.tx());
        let started = Instant::now();
        let ran =
            tokio::time::timeout(route.upstream_timeout, AssertUnwindSafe(exchange(inner, request)).catch_unwind());
        let ran = ran.await;
        metrics.upstream_time(started.elapsed());
        let key_hash = key::hash_for_logs(&open.id().key);
        let (parts, bytes) = match ran {
            Ok(Ok(Exchanged::Answered(parts, bytes))) => (parts, bytes),
            Ok(Ok(Exchanged::Error(e))) => {
                open.rollback().await;
                return Err(e);
            }
            Ok(Ok(Exchanged::Failed(_, response))) => {
                open.rollback().await;
                return Ok(response);
            }
            Ok(Ok(Exchanged::Broken(error))) => {
                tracing::warn!(route = %route.name, %key_hash, %error, "the handler's answer broke off: rolled back");
                open.rollback().await;
                return Ok(Problem::HandlerFailed.response());
            }
            Ok(Err(panic)) => {
                tracing::error!(route = %route.name, %key_hash, panic = panic_message(&panic), "the handler panicked: rolled back");
                open.rollback().await;
                return Ok(Problem::HandlerFailed.response());
            }
            Err(_) => {
                tracing::warn!(route = %route.name, %key_hash, timeout = ?route.upstream_timeout, "the handler did not answer in time: rolled back");
                open.rollback().await;
                return Ok(Problem::HandlerTimeout.response());
            }
        };
        let (outcome, response) = answered(&route, parts, bytes);
        if !matches!(outcome, Outcome::Completed(_)) {
            // Not final (a 5xx, a 409, a 429…): nothing of this attempt is kept.
            open.rollback().await;
            return Ok(response);
        }
        let started = Instant::now();
        let committed = open.commit(outcome, self.clock.now()).await;
        self.store_metrics.finish.record(started.elapsed().as_secs_f64());
        match committed {
            Ok(()) => Ok(response),
            Err(error) => {
                // Either nothing was committed, or (the connection broke during the
                // `COMMIT`) everything was: a retry finds out which, and never runs twice.
                tracing::warn!(route = %route.name, %key_hash, %error, "could not commit: the client is told to retry");
                Ok(Problem::StoreUnavailable.response())
            }
        }
    }
}

/// A claimed request on its way to the inner service.
struct Call {
    index: usize,
    route: Arc<Route>,
    parts: Parts,
    body: Bytes,
    identified: Identified,
}

impl Call {
    /// The request the inner service gets: the key forwarded as the route says, and the
    /// matched route in its extensions.
    fn into_request(self, record: &Record) -> Request<Body> {
        let mut request = Request::from_parts(self.parts, full(self.body));
        forward_key(&self.route, request.headers_mut(), &record.id.key, record.created_at);
        request.extensions_mut().insert(MatchedRoute { index: self.index, route: self.route });
        request
    }
}

fn count(metrics: &RouteMetrics, reason: ExecuteReason) {
    match reason {
        ExecuteReason::RetryRecovery => metrics.retry_recovery(),
        ExecuteReason::Expired => metrics.expired_key_retry(),
        ExecuteReason::New | ExecuteReason::UnknownRetry | ExecuteReason::Changed => {}
    }
}

/// Calls the inner service and reads its whole answer.
async fn exchange<S, ResBody>(inner: S, request: Request<Body>) -> Exchanged<S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let response = match inner.oneshot(request).await {
        Ok(response) => response,
        Err(e) => return Exchanged::Error(e),
    };
    if let Some(failure) = response.extensions().get::<Failure>().cloned() {
        return Exchanged::Failed(failure, response.map(Body::new));
    }
    let (parts, body) = response.into_parts();
    match body.collect().await {
        Ok(collected) => Exchanged::Answered(parts, collected.to_bytes()),
        Err(e) => Exchanged::Broken(format!("answer broken off: {}", e.into())),
    }
}

/// An unprotected request, streamed to the inner service and back.
async fn passthrough<S, ResBody>(inner: S, request: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    Ok(inner.oneshot(request).await?.map(Body::new))
}

fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("")
}
