//! A demo upstream: a small HTTP API that counts every call it executes, so a newcomer
//! (and the end-to-end tests) can see a duplicate prevented. Request headers steer it:
//! `X-Demo-Status: 503` answers that status, `X-Demo-Delay: 2s` executes at once but
//! answers late, and
//! `X-Demo-Fault: drop` closes the connection without answering, and
//! `X-Demo-Fail-First: N` answers `503` with `Retry-After: 0` to the first N calls carrying
//! the same key (a transient outage that a retry gets past).
//! `GET /_demo/stats` reports the calls; `POST /_demo/reset` clears them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What the demo upstream has executed.
#[derive(Default)]
struct Calls {
    total: u64,
    by_key: BTreeMap<String, u64>,
    by_path: BTreeMap<String, u64>,
}

/// Serves the demo API on `listener` forever.
pub async fn serve(listener: TcpListener) {
    let calls = Arc::new(Mutex::new(Calls::default()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let calls = calls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(calls.clone(), request));
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The demo asked to drop the connection without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on request")
    }
}

impl std::error::Error for Dropped {}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

async fn handle(calls: Arc<Mutex<Calls>>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let lock = || calls.lock().unwrap_or_else(|p| p.into_inner());
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/_demo/stats") => {
            let c = lock();
            return Ok(json_response(
                StatusCode::OK,
                &json!({ "calls": c.total, "by_key": c.by_key, "by_path": c.by_path }),
            ));
        }
        (&Method::POST, "/_demo/reset") => {
            *lock() = Calls::default();
            return Ok(json_response(StatusCode::OK, &json!({ "calls": 0 })));
        }
        _ => {}
    }
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let key =
        header("idempotency-key").or_else(|| header("repeatability-request-id")).or_else(|| header("x-request-id"));
    let (call, calls_for_key) = {
        let mut c = lock();
        c.total += 1;
        *c.by_path.entry(path.clone()).or_default() += 1;
        let for_key = key.as_ref().map(|key| {
            let count = c.by_key.entry(key.clone()).or_default();
            *count += 1;
            *count
        });
        (c.total, for_key)
    };
    let fail_first = header("x-demo-fail-first").and_then(|n| n.parse::<u64>().ok());
    if let (Some(n), Some(count)) = (fail_first, calls_for_key) {
        if count <= n {
            let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "error": "try again" }));
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("0"));
            return Ok(response);
        }
    }
    // The call has taken effect; only its answer is late (the case idem exists for).
    if let Some(delay) = header("x-demo-delay").and_then(|d| humantime::parse_duration(&d).ok()) {
        tokio::time::sleep(delay.min(Duration::from_secs(600))).await;
    }
    if header("x-demo-fault").as_deref() == Some("drop") {
        return Err(Dropped);
    }
    let status = header("x-demo-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(if parts.method == Method::POST { StatusCode::CREATED } else { StatusCode::OK });
    let echo: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let size = header("x-demo-size").and_then(|s| s.parse::<usize>().ok()).unwrap_or(0).min(64 << 20);
    let answer = json!({
        "id": format!("demo_{call}"),
        "call": call,
        "method": parts.method.as_str(),
        "path": path,
        "idempotency_key": key,
        "received": echo,
        "padding": "x".repeat(size),
    });
    let mut response = json_response(status, &answer);
    let headers = response.headers_mut();
    headers.insert("x-demo-call", header::HeaderValue::from(call));
    headers.insert(header::SET_COOKIE, header::HeaderValue::from_static("demo_session=abc; Path=/"));
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    Ok(response)
}
