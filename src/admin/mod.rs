//! The admin API (SPEC §4): list, show, forget and resolve records, purge, stats, the
//! decision counters, metrics and probes, on its own listener; and at `/` the Idempotency
//! Log page that drives it (SPEC §8, `page`). `/v1` needs the bearer token when one is
//! configured; `/metrics`, `/healthz`, `/readyz` and the page stay open. The API is
//! described by `docs/openapi.json`, served at `/v1/openapi.json`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::core::{Record, RecordId, Resolution, Status, StoredResponse};
use crate::store::{self, Cursor, ListQuery, Store, now_millis};

mod decisions;
mod page;

/// The OpenAPI 3.1 description of every call on the admin listener, kept in the repository
/// and checked against the running server by the tests.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// What the admin API serves from.
pub struct Admin {
    /// The record store.
    pub store: Arc<dyn Store>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The bearer token `/v1` requires, when configured.
    pub token: Option<String>,
    /// `GET /v1/routes`: what the entry point protects (the gateway's route table: name,
    /// methods, path, upstream); empty for an entry point without routes.
    pub routes: Vec<Value>,
    /// The lookups `POST /v1/records/{scope}/{key}/verify` settles with, by scope.
    pub lookups: crate::verify::Lookups,
}

/// The admin router.
pub fn router(admin: Arc<Admin>) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/records", get(list))
        .route("/v1/records/{scope}/{key}", get(show).delete(forget))
        .route("/v1/records/{scope}/{key}/resolve", post(resolve))
        .route("/v1/records/{scope}/{key}/verify", post(verify))
        .route("/v1/purge", post(purge))
        .route("/v1/stats", get(stats))
        .route("/v1/decisions", get(decisions))
        .route("/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route(
            "/v1/routes",
            get(|State(admin): State<Arc<Admin>>| async move { Json(json!({ "routes": admin.routes })) }),
        )
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorize));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .merge(v1)
        .merge(page::routes())
        .fallback(|| async { AdminError(StatusCode::NOT_FOUND, "not-found", "No such admin call.".into()) })
        .with_state(admin)
}

/// An admin error, as problem+json.
#[derive(Debug)]
pub struct AdminError(StatusCode, &'static str, String);

impl AdminError {
    /// What went wrong, as the problem's `detail` says it.
    pub fn detail(&self) -> &str {
        &self.2
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let AdminError(status, kind, detail) = self;
        let body =
            json!({ "type": kind, "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail });
        (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
    }
}

impl From<store::Error> for AdminError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NotFound => AdminError(StatusCode::NOT_FOUND, "record-not-found", "No such record.".into()),
            store::Error::NotResolvable(e) => AdminError(StatusCode::CONFLICT, "record-not-resolvable", e.to_string()),
            e if e.is_retryable() => {
                tracing::warn!(error = %e, "admin: store unavailable");
                AdminError(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "The store cannot be reached.".into())
            }
            e => {
                tracing::error!(error = %e, "admin: store error");
                AdminError(StatusCode::INTERNAL_SERVER_ERROR, "store-error", "The store failed; see the logs.".into())
            }
        }
    }
}

impl From<QueryRejection> for AdminError {
    fn from(rejection: QueryRejection) -> Self {
        bad_request(rejection.body_text())
    }
}

impl From<PathRejection> for AdminError {
    fn from(rejection: PathRejection) -> Self {
        bad_request(rejection.body_text())
    }
}

fn bad_request(detail: impl Into<String>) -> AdminError {
    AdminError(StatusCode::BAD_REQUEST, "bad-request", detail.into())
}

async fn authorize(State(admin): State<Arc<Admin>>, headers: HeaderMap, request: Request, next: Next) -> Response {
    let Some(expected) = &admin.token else {
        return match foreign(&headers) {
            Some(refusal) => refusal.into_response(),
            None => next.run(request).await,
        };
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time, so the comparison does not reveal how much of a guess was right.
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        next.run(request).await
    } else {
        let mut response =
            AdminError(StatusCode::UNAUTHORIZED, "unauthorized", "A valid bearer token is required.".into())
                .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        response
    }
}

/// Without a token (allowed on loopback only) nothing proves that a caller is the
/// operator, so another site's page must not act through the operator's browser: a request
/// whose `Origin` is not this listener (cross-site), or that names the listener by a name
/// that is not loopback (DNS rebinding: another site's name pointed at 127.0.0.1), is
/// refused. Browsers always send `Origin` on the cross-site requests that could act.
/// With a token this is not needed: no browser attaches it for another site.
fn foreign(headers: &HeaderMap) -> Option<AdminError> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok())?;
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let loopback_name = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost");
    let origin = headers.get(header::ORIGIN).map(|v| v.to_str().unwrap_or("null"));
    let same_origin = origin.is_none_or(|o| o == format!("http://{host}") || o == format!("https://{host}"));
    let refuse = |detail: &str| Some(AdminError(StatusCode::FORBIDDEN, "cross-origin-refused", detail.into()));
    if !loopback_name {
        refuse("Without an admin token, the admin API answers only to a loopback address or localhost.")
    } else if !same_origin {
        refuse("A page of another origin cannot call the admin API.")
    } else {
        None
    }
}

async fn ready(State(admin): State<Arc<Admin>>) -> Result<&'static str, AdminError> {
    admin.store.get(&RecordId::new("idem:readyz", "", "probe")).await?;
    Ok("ready\n")
}

async fn render_metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], admin.metrics.render())
}

/// `GET /v1/records` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    scope: Option<String>,
    tenant: Option<String>,
    status: Option<String>,
    key_prefix: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

impl ListParams {
    fn into_query(self) -> Result<ListQuery, AdminError> {
        let status = self.status.as_deref().map(parse_status).transpose().map_err(bad_request)?;
        let cursor = match self.cursor.as_deref() {
            Some(token) => {
                Some(Cursor::decode(token).ok_or_else(|| bad_request("cursor is not one this API returned"))?)
            }
            None => None,
        };
        Ok(ListQuery {
            scope: self.scope,
            tenant: self.tenant,
            status,
            key_prefix: self.key_prefix,
            limit: match self.limit {
                None => 100,
                Some(limit @ 1..=store::MAX_PAGE) => limit,
                Some(_) => return Err(bad_request(format!("limit must be between 1 and {}", store::MAX_PAGE))),
            },
            cursor,
        })
    }
}

/// Parses a status name, listing the valid ones when it is not one.
pub fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {s:?}; use one of {}", names.join(", "))
    })
}

async fn list(
    State(admin): State<Arc<Admin>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    let Query(params) = params?;
    let page = admin.store.list(&params.into_query()?).await?;
    let records: Vec<Value> = page.records.iter().map(record_json).collect();
    Ok(Json(json!({ "records": records, "next_cursor": page.next_cursor })))
}

/// `?tenant=` on single-record calls; records without a tenant use the empty string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantParam {
    #[serde(default)]
    tenant: String,
}

/// `{scope}/{key}?tenant=` as a record id; a malformed path or query is a problem+json 400.
pub struct Addressed(RecordId);

impl<S: Send + Sync> FromRequestParts<S> for Addressed {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AdminError> {
        let Path((scope, key)) = Path::<(String, String)>::from_request_parts(parts, state).await?;
        let Query(TenantParam { tenant }) = Query::<TenantParam>::from_request_parts(parts, state).await?;
        Ok(Addressed(RecordId::new(scope, tenant, key)))
    }
}

async fn show(State(admin): State<Arc<Admin>>, Addressed(id): Addressed) -> Result<Json<Value>, AdminError> {
    let record = admin.store.get(&id).await?.ok_or(store::Error::NotFound)?;
    Ok(Json(record_json(&record)))
}

async fn forget(State(admin): State<Arc<Admin>>, Addressed(id): Addressed) -> Result<StatusCode, AdminError> {
    if admin.store.delete(&id).await? {
        tracing::info!(scope = %id.scope, "admin: record deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(store::Error::NotFound.into())
    }
}

async fn resolve(
    State(admin): State<Arc<Admin>>,
    Addressed(id): Addressed,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let request: Value = serde_json::from_slice(&body).map_err(|e| bad_request(format!("body is not JSON: {e}")))?;
    let resolution = parse_resolution(&request).map_err(bad_request)?;
    let record = admin.store.resolve(&id, resolution, now_millis()).await?;
    Ok(Json(record_json(&record)))
}

async fn verify(State(admin): State<Arc<Admin>>, Addressed(id): Addressed) -> Result<Json<Value>, AdminError> {
    verify_now(&admin.store, &admin.lookups, &id).await.map(Json)
}

/// Runs the lookup of `id`'s scope now (the admin API's `verify`, `idem log verify`):
/// `{"result": "found"|"absent"|"failed", "detail": …, "record": …}` with the record as
/// the finding left it. A record that is not unknown, or a scope without a lookup, is a
/// `409`.
pub async fn verify_now(
    store: &Arc<dyn Store>,
    lookups: &crate::verify::Lookups,
    id: &RecordId,
) -> Result<Value, AdminError> {
    use crate::verify::{Finding, Settled};
    let record = store.get(id).await?.ok_or(store::Error::NotFound)?;
    let conflict = |kind, detail: String| AdminError(StatusCode::CONFLICT, kind, detail);
    let client = crate::verify::client().map_err(|e| {
        tracing::error!(error = %e, "admin: no HTTP client for lookups");
        AdminError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "lookup-unavailable",
            "No HTTP client for lookups; see the logs.".into(),
        )
    })?;
    let settled = lookups.settle(store, &record, &client, crate::store::clock::Clock::System).await?;
    let finding = match settled {
        None => return Err(conflict("no-lookup", format!("Scope {:?} has no verify lookup configured.", id.scope))),
        Some(Settled::NotUnknown(decision)) => {
            let detail = format!(
                "Only an outcome_unknown record, or an in_progress one whose lease ran out, is verified; this record is {} ({decision:?}).",
                record.status
            );
            return Err(conflict("record-not-unknown", detail));
        }
        Some(Settled::Looked(finding)) => finding,
    };
    let detail = match &finding {
        Finding::Failed(why) => Value::String(why.clone()),
        _ => Value::Null,
    };
    let after = store.get(id).await?.ok_or(store::Error::NotFound)?;
    tracing::info!(scope = %id.scope, result = finding.label(), "admin: record verified");
    Ok(json!({ "result": finding.label(), "detail": detail, "record": record_json(&after) }))
}

async fn purge(State(admin): State<Arc<Admin>>) -> Json<Value> {
    let removed = crate::host::purge_all(admin.store.as_ref(), &Default::default()).await;
    Json(json!({ "purged": removed }))
}

async fn decisions(State(admin): State<Arc<Admin>>) -> Json<Value> {
    Json(decisions::decisions_json(&admin.metrics.render()))
}

async fn stats(State(admin): State<Arc<Admin>>) -> Result<Json<Value>, AdminError> {
    let rows = admin.store.stats().await?;
    crate::metrics::set_records(&rows);
    Ok(Json(stats_json(&rows)))
}

/// Stats as `{"total": N, "scopes": {scope: {status: N}}}`.
pub fn stats_json(rows: &[store::StatRow]) -> Value {
    let mut scopes = serde_json::Map::new();
    for row in rows {
        let entry = scopes.entry(row.scope.clone()).or_insert_with(|| json!({}));
        entry[row.status.as_str()] = row.count.into();
    }
    json!({ "total": rows.iter().map(|r| r.count).sum::<u64>(), "scopes": scopes })
}

/// Reads `{"action":"release"}` or `{"action":"complete","status":201,"headers":{…},"body":…}`.
/// A string body is sent as its text; any other JSON body as its JSON; `body_base64`
/// carries bytes.
pub fn parse_resolution(request: &Value) -> Result<Resolution, String> {
    match request.get("action").and_then(Value::as_str) {
        Some("release") => Ok(Resolution::Release),
        Some("complete") => {
            // JSON does not tell 201 from 201.0 (a client's serializer may write either).
            let status = request
                .get("status")
                .and_then(Value::as_f64)
                .filter(|s| s.fract() == 0.0 && (100.0..=599.0).contains(s))
                .ok_or("\"complete\" needs a \"status\" between 100 and 599")? as u16;
            let headers = match request.get("headers") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(map)) => map.iter().map(|(k, v)| stored_header(k, v)).collect::<Result<_, _>>()?,
                Some(_) => return Err("\"headers\" must be an object of strings".into()),
            };
            let body = match (request.get("body"), request.get("body_base64")) {
                (_, Some(Value::String(b64))) => Bytes::from(
                    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("body_base64: {e}"))?,
                ),
                (None | Some(Value::Null), _) => Bytes::new(),
                (Some(Value::String(text)), _) => Bytes::from(text.clone()),
                (Some(json), _) => Bytes::from(json.to_string()),
            };
            Ok(Resolution::Complete(StoredResponse { status, headers, body, retained: true }))
        }
        _ => Err("\"action\" must be \"release\" or \"complete\"".into()),
    }
}

/// One header of a `complete` resolution, checked now so that the replay can send it: a
/// valid name, and a value of one byte per character (the stored form) without controls.
fn stored_header(name: &str, value: &Value) -> Result<(String, String), String> {
    let Value::String(text) = value else { return Err(format!("header {name:?} must be a string")) };
    http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
    let bytes: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(c).ok()).collect();
    match bytes.map(|b| http::HeaderValue::from_bytes(&b)) {
        Some(Ok(_)) => Ok((name.to_ascii_lowercase(), text.clone())),
        _ => Err(format!("header {name:?} has a value that cannot be sent (control or non-Latin-1 characters)")),
    }
}

/// A record as JSON: times in RFC 3339, the body as text when it is UTF-8, else base64.
pub fn record_json(record: &Record) -> Value {
    let response = record.response.as_ref().map(|r| {
        let mut value = json!({
            "status": r.status,
            "headers": r.headers,
            "retained": r.retained,
        });
        match std::str::from_utf8(&r.body) {
            Ok(text) => value["body"] = text.into(),
            Err(_) => value["body_base64"] = base64::engine::general_purpose::STANDARD.encode(&r.body).into(),
        }
        value
    });
    json!({
        "scope": record.id.scope,
        "tenant": record.id.tenant,
        "key": record.id.key,
        "fingerprint": record.fingerprint.to_hex(),
        "status": record.status.as_str(),
        "locked_until": record.lease.map(|l| rfc3339(l.locked_until)),
        "response": response,
        "created_at": rfc3339(record.created_at),
        "last_seen_at": rfc3339(record.last_seen_at),
        "expires_at": rfc3339(record.expires_at),
        "replay_count": record.replay_count,
        "attempt_count": record.attempt_count,
        "correlation_id": record.correlation_id,
        "error_summary": record.error_summary,
    })
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(at: crate::core::Millis) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_resolution;
    use crate::core::Resolution;
    use serde_json::json;

    #[test]
    fn a_completion_reads_status_headers_and_body() {
        let request = json!({ "action": "complete", "status": 201.0, "headers": { "X-Id": "a" }, "body": { "id": 1 } });
        let Ok(Resolution::Complete(answer)) = parse_resolution(&request) else { panic!("a completion") };
        assert_eq!((answer.status, answer.headers), (201, vec![("x-id".to_owned(), "a".to_owned())]));
        assert_eq!(answer.body, r#"{"id":1}"#);
        assert!(parse_resolution(&json!({ "action": "complete", "status": 201.5 })).is_err());
        assert!(parse_resolution(&json!({ "action": "complete", "status": 600 })).is_err());
    }

    #[test]
    fn a_header_that_cannot_be_replayed_is_refused_by_name() {
        let bad_name = json!({ "action": "complete", "status": 200, "headers": { "a b": "x" } });
        assert_eq!(parse_resolution(&bad_name).unwrap_err(), r#""a b" is not a valid header name"#);
        let bad_value = json!({ "action": "complete", "status": 200, "headers": { "x-note": "line\nbreak" } });
        assert!(parse_resolution(&bad_value).unwrap_err().contains(r#""x-note""#));
        let beyond_latin1 = json!({ "action": "complete", "status": 200, "headers": { "x-note": "€" } });
        assert!(parse_resolution(&beyond_latin1).is_err());
        let latin1 = json!({ "action": "complete", "status": 200, "headers": { "x-note": "café" } });
        assert!(parse_resolution(&latin1).is_ok());
    }
}
