//! Every error answer the layer (and so the gateway) emits, in one place: each variant has its status and a
//! stable problem `type` (RFC 9457). Details describe this request only; internal causes
//! are logged, never sent.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::{Body, full};
use super::odata;
use crate::core::key::KeyError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `400 idempotency-key-missing`: the route requires a key.
    KeyMissing {
        /// Where the key was expected.
        source: String,
    },
    /// `400 idempotency-key-invalid`.
    KeyInvalid(KeyError),
    /// `422 idempotency-key-reused`: the key belongs to another payload.
    KeyReused,
    /// `409 request-in-flight`, with `Retry-After`.
    InFlight {
        /// Seconds until the owner's lease runs out.
        retry_after: u64,
    },
    /// `409 outcome-unknown`: the action may have happened; an operator must resolve it.
    OutcomeUnknown,
    /// `409 needs-review`.
    NeedsReview,
    /// `410 response-not-retained`: it executed, but the answer was too large to keep.
    NotRetained,
    /// `413 body-too-large`.
    BodyTooLarge {
        /// The route's limit in bytes.
        limit: u64,
    },
    /// `408 client-timeout`: the request was not received in time.
    ClientTimeout,
    /// `400 bad-request`: the request could not be read.
    BadRequest(String),
    /// `503 store-unavailable`, with `Retry-After`: nothing was forwarded.
    StoreUnavailable,
    /// `502 upstream-unavailable`: the request was not delivered; retrying is safe.
    UpstreamUnavailable,
    /// `504 upstream-timeout`: sent, not answered in time; the outcome is unknown.
    UpstreamTimeout,
    /// `502 upstream-outcome-unknown`: sent, but the connection broke before an answer.
    UpstreamBroken,
    /// `500 handler-failed`: the service behind the layer failed (an error, a panic, a
    /// broken answer). In transactional mode nothing of the request was kept.
    HandlerFailed,
    /// `503 handler-timeout`, with `Retry-After`: in transactional mode, the handler did not
    /// answer within the route's `upstream_timeout` and everything it did was rolled back.
    HandlerTimeout,
    /// OData Repeatable Requests refusal (`400`, `412` or `501`), with
    /// `Repeatability-Result: rejected`.
    RepeatabilityRejected {
        /// The status.
        status: StatusCode,
        /// Why.
        detail: String,
    },
}

impl Problem {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::KeyMissing { .. } | Problem::KeyInvalid(_) | Problem::BadRequest(_) => StatusCode::BAD_REQUEST,
            Problem::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::InFlight { .. } | Problem::OutcomeUnknown | Problem::NeedsReview => StatusCode::CONFLICT,
            Problem::NotRetained => StatusCode::GONE,
            Problem::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::StoreUnavailable | Problem::HandlerTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Problem::HandlerFailed => StatusCode::INTERNAL_SERVER_ERROR,
            Problem::UpstreamUnavailable | Problem::UpstreamBroken => StatusCode::BAD_GATEWAY,
            Problem::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Problem::RepeatabilityRejected { status, .. } => *status,
        }
    }

    /// The stable problem type (a relative URI reference).
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::KeyMissing { .. } => "idempotency-key-missing",
            Problem::KeyInvalid(_) => "idempotency-key-invalid",
            Problem::KeyReused => "idempotency-key-reused",
            Problem::InFlight { .. } => "request-in-flight",
            Problem::OutcomeUnknown => "outcome-unknown",
            Problem::NeedsReview => "needs-review",
            Problem::NotRetained => "response-not-retained",
            Problem::BodyTooLarge { .. } => "body-too-large",
            Problem::ClientTimeout => "client-timeout",
            Problem::BadRequest(_) => "bad-request",
            Problem::StoreUnavailable => "store-unavailable",
            Problem::UpstreamUnavailable => "upstream-unavailable",
            Problem::UpstreamTimeout => "upstream-timeout",
            Problem::UpstreamBroken => "upstream-outcome-unknown",
            Problem::HandlerFailed => "handler-failed",
            Problem::HandlerTimeout => "handler-timeout",
            Problem::RepeatabilityRejected { .. } => "repeatability-rejected",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::KeyMissing { .. } => "Idempotency key missing",
            Problem::KeyInvalid(_) => "Idempotency key invalid",
            Problem::KeyReused => "Idempotency key reused with a different request",
            Problem::InFlight { .. } => "A request with this key is in progress",
            Problem::OutcomeUnknown => "The outcome of this request is unknown",
            Problem::NeedsReview => "This request needs review",
            Problem::NotRetained => "The response was not retained",
            Problem::BodyTooLarge { .. } => "Request body too large",
            Problem::ClientTimeout => "Request not received in time",
            Problem::BadRequest(_) => "Bad request",
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::UpstreamUnavailable => "Upstream unavailable",
            Problem::UpstreamTimeout => "Upstream did not answer in time",
            Problem::UpstreamBroken => "Upstream connection failed after the request was sent",
            Problem::HandlerFailed => "The service failed to handle the request",
            Problem::HandlerTimeout => "The service did not answer in time",
            Problem::RepeatabilityRejected { .. } => "Repeatable request rejected",
        }
    }

    fn detail(&self) -> String {
        match self {
            Problem::KeyMissing { source } => format!("This route requires an idempotency key in {source}."),
            Problem::KeyInvalid(e) => format!("{e}."),
            Problem::KeyReused => {
                "This key was already used with a different request payload; use a new key for a new request.".into()
            }
            Problem::InFlight { retry_after } => {
                format!("A request with this key is still being processed; retry in {retry_after}s to get its answer.")
            }
            Problem::OutcomeUnknown => "A request with this key was sent but its outcome was never recorded; \
                nothing is executed again until an operator resolves the record."
                .into(),
            Problem::NeedsReview => "A request with this key failed and awaits review by an operator.".into(),
            Problem::NotRetained => {
                "A request with this key was executed, but its response was too large to keep for replay.".into()
            }
            Problem::BodyTooLarge { limit } => format!("The request body exceeds the limit of {limit} bytes."),
            Problem::ClientTimeout => "The request was not received completely in time.".into(),
            Problem::BadRequest(detail) => detail.clone(),
            Problem::StoreUnavailable => "The idempotency store cannot be reached; the request was not forwarded. \
                Retry later with the same key."
                .into(),
            Problem::UpstreamUnavailable => {
                "The upstream could not be reached; the request was not delivered. Retry with the same key.".into()
            }
            Problem::UpstreamTimeout | Problem::UpstreamBroken => "The request was sent to the upstream but no \
                answer arrived; whether it took effect is unknown."
                .into(),
            Problem::HandlerFailed => "The service failed while handling this request.".into(),
            Problem::HandlerTimeout => {
                "The service did not answer in time; nothing of the request was kept. Retry with the same key.".into()
            }
            Problem::RepeatabilityRejected { detail, .. } => detail.clone(),
        }
    }

    /// The `application/problem+json` answer.
    pub fn response(&self) -> Response<Body> {
        let status = self.status();
        let mut body = serde_json::json!({
            "type": self.kind(),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": self.detail(),
        });
        if let Problem::InFlight { retry_after } = self {
            body["retry_after"] = (*retry_after).into();
        }
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut response = Response::new(full(bytes));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match self {
            Problem::InFlight { retry_after } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Problem::StoreUnavailable | Problem::HandlerTimeout => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Problem::RepeatabilityRejected { .. } => {
                headers.insert(odata::RESULT, HeaderValue::from_static("rejected"));
            }
            _ => {}
        }
        response
    }
}
