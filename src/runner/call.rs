//! One HTTP call of a step: rendered from its templates, identified (fingerprint and
//! idempotency key), sent, and its answer turned into a store [`Outcome`].
//!
//! The distinction the decision table needs is kept exactly: a connection that could not be
//! made was not sent (retrying is safe); a call that was sent and never answered is
//! ambiguous (`Outcome::Unknown`).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::flow::{KeyStrategy, Step};
use crate::backoff::Backoff;
use crate::core::{Fingerprint, Outcome, StoredResponse};
use crate::template::{Context, Escape};
use crate::verify::root_cause;

/// A rendered request, ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// The full URL.
    pub url: String,
    /// The JSON body.
    pub body: Value,
    /// The step's own headers, rendered.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Which of a step's two requests to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The step's own method, URL and body (a create).
    Create,
    /// `when_known`: the update made once the step has captured its external ids.
    Update,
}

/// What came back from a call.
#[derive(Debug)]
pub enum Answer {
    /// An HTTP answer, read to its end.
    Answered {
        /// Status code.
        status: u16,
        /// Body.
        body: Bytes,
        /// `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// The connection could not be made: nothing was sent.
    NotSent(String),
    /// Sent, but no (complete) answer: the call may or may not have taken effect.
    Lost(String),
}

/// What an answer means for the step.
#[derive(Debug)]
pub struct Verdict {
    /// What the store records.
    pub outcome: Outcome,
    /// Captured values, for a completed call.
    pub captures: Map<String, Value>,
    /// The status received, if any.
    pub status: Option<u16>,
    /// Whether another attempt may be made now (only for retryable failures).
    pub retryable: bool,
    /// How long the destination asked us to wait.
    pub retry_after: Option<Duration>,
    /// Whether the request left (a connection that could not be made sent nothing).
    pub sent: bool,
}

/// Renders a step's request for one record. `Variant::Update` needs `when_known`.
pub fn render(step: &Step, variant: Variant, ctx: &Context<'_>) -> Result<Call, String> {
    let (method, url, body) = match (variant, &step.when_known) {
        (Variant::Update, Some(known)) => (&known.method, &known.url, known.body.as_ref().or(step.body.as_ref())),
        _ => (&step.method, &step.url, step.body.as_ref()),
    };
    let url = url.render(ctx, Escape::UrlComponent).map_err(|e| e.to_string())?;
    let body = match body {
        Some(template) => template.render(ctx).map_err(|e| e.to_string())?,
        None => Value::Object(ctx.record.clone()),
    };
    let mut headers = Vec::with_capacity(step.headers.len());
    for (name, template) in &step.headers {
        let text = template.render(ctx, Escape::None).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(&text)
            .map_err(|_| format!("header {name}: the record's value cannot be sent in a header"))?;
        headers.push((name.clone(), value));
    }
    Ok(Call { method: method.clone(), url, body, headers })
}

/// The fingerprint of a step's intent: the primary key alone for `primary_key` (changed
/// data is still "already sent"), or what is sent (method, URL, body as RFC 8785 JSON) for
/// `primary_key_hash`.
pub fn fingerprint(strategy: KeyStrategy, pk: &str, call: &Call) -> Fingerprint {
    let bytes = match strategy {
        KeyStrategy::PrimaryKey => pk.as_bytes().to_vec(),
        KeyStrategy::PrimaryKeyHash => {
            let sent = json!({ "method": call.method.as_str(), "url": call.url, "body": call.body });
            // A serde_json value always serialises; the fallback keeps this total.
            serde_jcs::to_vec(&sent).unwrap_or_else(|_| sent.to_string().into_bytes())
        }
    };
    Fingerprint(Sha256::digest(&bytes).into())
}

/// The stem of the idempotency key sent to the API, `{flow}:{step}:{pk}`; a primary key
/// that is not visible ASCII (or too long) is replaced by its SHA-256.
pub fn key_stem(flow: &str, step: &str, pk: &str) -> String {
    let plain = format!("{flow}:{step}:{pk}");
    // Room for the fingerprint suffix of `primary_key_hash`.
    if plain.len() + 17 <= crate::core::key::MAX_KEY_LEN && crate::core::key::validate(plain.as_bytes()).is_ok() {
        plain
    } else {
        format!("{flow}:{step}:sha256:{}", hex::encode(Sha256::digest(pk.as_bytes())))
    }
}

/// A message id as the idempotency key its endpoint receives: as it is when it is a valid
/// key, else `sha256:` and its hash.
pub fn message_key(id: &str) -> String {
    if crate::core::key::validate(id.as_bytes()).is_ok() {
        id.to_owned()
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(id.as_bytes())))
    }
}

/// The idempotency key sent to the API: the stem, plus the first 16 hex digits of the
/// fingerprint for `primary_key_hash` (a changed record is a new request).
pub fn idempotency_key(strategy: KeyStrategy, stem: &str, fingerprint: &Fingerprint) -> String {
    match strategy {
        KeyStrategy::PrimaryKey => stem.to_owned(),
        KeyStrategy::PrimaryKeyHash => format!("{stem}:{}", &fingerprint.to_hex()[..16]),
    }
}

/// Sends a call and reads its whole answer within `timeout`.
pub async fn send(
    client: &reqwest::Client,
    call: &Call,
    key_header: Option<(&HeaderName, &str)>,
    timeout: Duration,
) -> Answer {
    let mut request = client.request(call.method.clone(), &call.url).timeout(timeout).json(&call.body);
    for (name, value) in &call.headers {
        request = request.header(name, value);
    }
    if let Some((name, key)) = key_header {
        request = request.header(name, key);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_connect() => return Answer::NotSent(format!("cannot connect: {}", root_cause(&e))),
        Err(e) if e.is_builder() => return Answer::NotSent(format!("cannot build the request: {e}")),
        Err(e) if e.is_timeout() => return Answer::Lost(format!("no answer within timeout ({timeout:?})")),
        Err(e) => return Answer::Lost(format!("sent, then the connection failed: {}", root_cause(&e))),
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().get(http::header::RETRY_AFTER).and_then(parse_retry_after);
    match response.bytes().await {
        Ok(body) => Answer::Answered { status, body, retry_after },
        Err(e) if e.is_timeout() => Answer::Lost(format!("answer not complete within timeout ({timeout:?})")),
        Err(e) => Answer::Lost(format!("answer broken off: {}", root_cause(&e))),
    }
}

/// Turns an answer into what the store records. A `guard` step is never re-sent once it may
/// have been sent: only a connection that could not be made stays retryable.
///
/// `known`: what the step captured before (an update's). Those values are kept over what an
/// update's answer says: the identity registry holds the ids the create was given, and an
/// update's answer adds only what they lack.
pub fn judge(step: &Step, call: &Call, answer: Answer, known: &Map<String, Value>) -> Verdict {
    let summary = |status: u16| format!("{} {} answered {status}", call.method, url_path(&call.url));
    let verdict = |outcome, status, retryable, retry_after| Verdict {
        outcome,
        captures: Map::new(),
        status,
        retryable,
        retry_after,
        sent: true,
    };
    match answer {
        Answer::Answered { status, body, .. } if (200..300).contains(&status) => {
            let mut captures = known.clone();
            for (name, value) in capture(step, &body) {
                captures.entry(name).or_insert(value);
            }
            let stored = StoredResponse {
                status,
                headers: Vec::new(),
                body: Bytes::from(json!({ "captures": captures }).to_string()),
                retained: true,
            };
            Verdict { captures, ..verdict(Outcome::Completed(stored), Some(status), false, None) }
        }
        Answer::Answered { status, retry_after, .. } if matches!(status, 408 | 429 | 500..=599) => {
            if step.guard {
                let error = format!("{}; a guard step is not re-sent", summary(status));
                verdict(Outcome::NeedsReview { error }, Some(status), false, None)
            } else {
                verdict(Outcome::Retryable { error: summary(status) }, Some(status), true, retry_after)
            }
        }
        Answer::Answered { status, .. } => {
            verdict(Outcome::NeedsReview { error: summary(status) }, Some(status), false, None)
        }
        Answer::NotSent(error) => Verdict { sent: false, ..verdict(Outcome::Retryable { error }, None, true, None) },
        Answer::Lost(error) => {
            let error = format!("{} {}: {error}", call.method, url_path(&call.url));
            verdict(Outcome::Unknown { error }, None, false, None)
        }
    }
}

/// What a step stores of a lookup's found answer: its captures, as a sent call's answer
/// would give them (`{"captures": {…}}`), marked as verified.
pub fn verified(step: &Step, found: &StoredResponse) -> (StoredResponse, Map<String, Value>) {
    let captures = capture(step, &found.body);
    let stored = StoredResponse {
        status: found.status,
        headers: vec![(crate::verify::VERIFIED_HEADER.to_owned(), "true".to_owned())],
        body: Bytes::from(json!({ "captures": captures }).to_string()),
        retained: true,
    };
    (stored, captures)
}

/// The captures a stored response holds (`{"captures": {…}}`).
pub fn stored_captures(response: Option<&StoredResponse>) -> Map<String, Value> {
    response
        .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .and_then(|mut v| match v.get_mut("captures").map(Value::take) {
            Some(Value::Object(map)) => Some(map),
            _ => None,
        })
        .unwrap_or_default()
}

/// The wait before attempt `attempt + 1` (1-based `attempt`): the destination's
/// `Retry-After` when it gave one, else exponential backoff with full jitter.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    const RETRIES: Backoff = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(30)).with_full_jitter();
    match retry_after {
        // Honoured, but a destination cannot park a run for hours.
        Some(wait) => wait.min(Duration::from_secs(300)),
        None => RETRIES.for_attempt(attempt),
    }
}

fn capture(step: &Step, body: &[u8]) -> Map<String, Value> {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else { return Map::new() };
    step.capture.iter().filter_map(|(name, pointer)| Some((name.clone(), answer.pointer(pointer)?.clone()))).collect()
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The path of a URL, for summaries: never the query (it may hold data) nor the host.
fn url_path(url: &str) -> String {
    url::Url::parse(url).map(|u| u.path().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(body: Value) -> Call {
        Call { method: Method::POST, url: "http://h/invoices?x=1".into(), body, headers: vec![] }
    }

    #[test]
    fn fingerprints_follow_the_key_strategy() {
        let a = call(json!({ "amount": 1, "order": "o1" }));
        let reordered = call(json!({ "order": "o1", "amount": 1 }));
        let changed = call(json!({ "order": "o1", "amount": 2 }));
        let hash = KeyStrategy::PrimaryKeyHash;
        assert_eq!(fingerprint(hash, "o1", &a), fingerprint(hash, "o1", &reordered), "canonical JSON");
        assert_ne!(fingerprint(hash, "o1", &a), fingerprint(hash, "o1", &changed));
        let pk = KeyStrategy::PrimaryKey;
        assert_eq!(fingerprint(pk, "o1", &a), fingerprint(pk, "o1", &changed), "the key alone");
    }

    #[test]
    fn keys_are_visible_ascii_or_hashed() {
        assert_eq!(key_stem("f", "s", "o-1"), "f:s:o-1");
        let hashed = key_stem("f", "s", "ordre n°1");
        assert!(hashed.starts_with("f:s:sha256:") && hashed.len() == "f:s:sha256:".len() + 64, "{hashed}");
        let fp = Fingerprint([0xab; 32]);
        assert_eq!(idempotency_key(KeyStrategy::PrimaryKeyHash, "f:s:o-1", &fp), "f:s:o-1:abababababababab");
        assert_eq!(idempotency_key(KeyStrategy::PrimaryKey, "f:s:o-1", &fp), "f:s:o-1");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_backoff_is_capped() {
        assert_eq!(parse_retry_after(&HeaderValue::from_static("3")), Some(Duration::from_secs(3)));
        let past = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        assert_eq!(backoff(3, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert!(backoff(1, None) <= Duration::from_millis(200));
        assert!(backoff(40, None) <= Duration::from_secs(30));
    }

    #[test]
    fn summaries_name_method_and_path_only() {
        assert_eq!(url_path("http://h/invoices?secret=1"), "/invoices");
        let stored =
            StoredResponse { status: 201, headers: vec![], body: r#"{"captures":{"id":"x"}}"#.into(), retained: true };
        assert_eq!(stored_captures(Some(&stored))["id"], "x");
        assert!(stored_captures(None).is_empty());
    }
}
