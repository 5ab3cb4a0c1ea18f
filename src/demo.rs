//! A demo upstream: a small HTTP API that counts every call it executes, so a newcomer
//! (and the end-to-end tests) can see a duplicate prevented. Request headers steer it:
//!
//! - `X-Demo-Status: 503` answers that status (`429` and `503` come with `Retry-After: 1`);
//! - `X-Demo-Delay: 2s` executes at once but answers late;
//! - `X-Demo-Fail-First: N` answers `503` with `Retry-After: 0` to the first N calls
//!   carrying the same key (a transient outage that a retry gets past);
//! - `X-Demo-Size: N` pads the answer with N bytes;
//! - `X-Demo-Fault` breaks the exchange at one chosen point, for the fault tests (SPEC §2
//!   says how the gateway must classify each):
//!   - `reset`: resets the connection (TCP RST) as soon as the request head is read,
//!     before the body: nothing executes, yet the client has already sent its request;
//!   - `drop`: executes, then closes the connection without answering;
//!   - `reset-after`: executes, then resets the connection without answering;
//!   - `reset-mid-response`: executes, sends the status line, the headers (with the whole
//!     answer's `Content-Length`) and half the body, then resets the connection;
//!   - `slow-body`: executes, sends the status line and headers at once, then the body in
//!     ten parts spread over `X-Demo-Delay` (10 s when not given).
//!
//!   The faults act on the connection, so they are meant for HTTP/1.1 clients (the
//!   gateway's upstream client is one).
//!
//! `GET /_demo/stats` reports the calls (in all, by key, by path, by HTTP version);
//! `POST /_demo/reset` clears them. `GET /_demo/lookup?FIELD=VALUE` searches the answers of
//! executed calls (the latest [`LOOKUP_KEPT`]): `{"data": [answer, …]}` with every answer
//! whose `FIELD` (or whose request body's `FIELD`) is `VALUE`, e.g.
//! `?idempotency_key=k1` or `?order_id=42` — a destination that can say whether an action
//! happened, for `verify` lookups; it honours `X-Demo-Status` (a lookup that fails) and
//! `X-Demo-Delay` (a slow search) too. `--tls-cert`/`--tls-key` make it an HTTPS API.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::ServerTls;

/// What the demo upstream has executed.
#[derive(Default)]
struct Calls {
    total: u64,
    by_key: BTreeMap<String, u64>,
    by_path: BTreeMap<String, u64>,
    /// Executed calls by HTTP version (`HTTP/1.1`, `HTTP/2.0`): which one a client chose.
    by_version: BTreeMap<String, u64>,
    /// The answers of executed calls, newest last, for `/_demo/lookup`.
    answers: VecDeque<Value>,
}

/// How many executed answers `/_demo/lookup` searches.
pub const LOOKUP_KEPT: usize = 100_000;

/// The demo's answer bodies: whole, or sent in timed parts that may break off.
type DemoBody = UnsyncBoxBody<Bytes, Broken>;

/// How long `slow-body` spreads its body over when `X-Demo-Delay` says nothing.
const SLOW_BODY_DEFAULT: Duration = Duration::from_secs(10);

/// Serves the demo API on `listener` forever.
pub async fn serve(listener: TcpListener) {
    serve_with(listener, None).await;
}

/// Serves the demo API on `listener` forever, over TLS (HTTP/2 or HTTP/1.1 by ALPN) when
/// `tls` is given: an HTTPS API to put the gateway in front of.
pub async fn serve_with(listener: TcpListener, tls: Option<Arc<ServerTls>>) {
    let calls = Arc::new(Mutex::new(Calls::default()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection { stream, reset: Arc::new(AtomicBool::new(false)) };
        let (calls, reset) = (calls.clone(), connection.reset.clone());
        let acceptor = tls.as_ref().map(|tls| tokio_rustls::TlsAcceptor::from(tls.config()));
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(calls.clone(), reset.clone(), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(connection), service).await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(connection).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            }
        });
    }
}

/// The demo broke the exchange on purpose (a fault asked for by `X-Demo-Fault`).
#[derive(Debug)]
struct Broken;

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection broken on request")
    }
}

impl std::error::Error for Broken {}

/// An accepted connection that a handler can turn into a reset: once `reset` is set, the
/// connection ends with a TCP RST (zero linger, no FIN first), as a crashed server or a
/// middlebox would end it, instead of an orderly close.
struct Connection {
    stream: TcpStream,
    /// Set by the handler of a request that asked for a reset; read when hyper shuts the
    /// connection down and when it drops it.
    reset: Arc<AtomicBool>,
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset.load(Ordering::SeqCst) {
            // A FIN now would tell the client the answer ended cleanly; the reset on drop
            // is the whole goodbye.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            // Zero linger: closing the socket discards what is unsent and sends an RST.
            let _ = self.stream.set_zero_linger();
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

fn whole(response: Response<Bytes>) -> Response<DemoBody> {
    response.map(|bytes| Full::new(bytes).map_err(|never| match never {}).boxed_unsync())
}

/// A body sent in parts: each part waits its pause, then is sent or breaks the exchange.
fn in_parts(parts: Vec<(Duration, Result<Bytes, Broken>)>) -> DemoBody {
    let stream = futures_util::stream::iter(parts).then(|(pause, part)| async move {
        tokio::time::sleep(pause).await;
        part.map(Frame::data)
    });
    StreamBody::new(stream).boxed_unsync()
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The `X-Demo-Fault` values (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Reset,
    Drop,
    ResetAfter,
    ResetMidResponse,
    SlowBody,
}

impl Fault {
    fn from_headers(headers: &HeaderMap) -> Option<Fault> {
        match header(headers, "x-demo-fault")?.as_str() {
            "reset" => Some(Fault::Reset),
            "drop" => Some(Fault::Drop),
            "reset-after" => Some(Fault::ResetAfter),
            "reset-mid-response" => Some(Fault::ResetMidResponse),
            "slow-body" => Some(Fault::SlowBody),
            _ => None,
        }
    }
}

impl Calls {
    /// Counts an executed call: its number, and how many calls its key has had.
    fn count(&mut self, path: &str, key: Option<&str>, version: http::Version) -> (u64, Option<u64>) {
        self.total += 1;
        *self.by_path.entry(path.to_owned()).or_default() += 1;
        *self.by_version.entry(format!("{version:?}")).or_default() += 1;
        let for_key = key.map(|key| {
            let count = self.by_key.entry(key.to_owned()).or_default();
            *count += 1;
            *count
        });
        (self.total, for_key)
    }
}

async fn handle(
    calls: Arc<Mutex<Calls>>,
    reset: Arc<AtomicBool>,
    request: Request<Incoming>,
) -> Result<Response<DemoBody>, Broken> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let lock = || calls.lock().unwrap_or_else(|p| p.into_inner());
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/_demo/stats") => {
            let c = lock();
            let stats =
                json!({ "calls": c.total, "by_key": c.by_key, "by_path": c.by_path, "by_version": c.by_version });
            return Ok(whole(json_response(StatusCode::OK, &stats)));
        }
        (&Method::GET, "/_demo/lookup") => {
            if let Some(status) = header(&parts.headers, "x-demo-status").and_then(|s| s.parse::<u16>().ok()) {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Ok(whole(json_response(status, &json!({ "error": "lookup failed on request" }))));
            }
            if let Some(delay) = header(&parts.headers, "x-demo-delay").and_then(|d| humantime::parse_duration(&d).ok())
            {
                tokio::time::sleep(delay.min(Duration::from_secs(600))).await;
            }
            let wanted: Vec<(String, String)> =
                url::form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
            let data: Vec<Value> = lock().answers.iter().filter(|a| matches_all(a, &wanted)).cloned().collect();
            return Ok(whole(json_response(StatusCode::OK, &json!({ "data": data }))));
        }
        (&Method::POST, "/_demo/reset") => {
            *lock() = Calls::default();
            return Ok(whole(json_response(StatusCode::OK, &json!({ "calls": 0 }))));
        }
        _ => {}
    }
    let fault = Fault::from_headers(&parts.headers);
    if fault == Some(Fault::Reset) {
        // Only the head has been read: the call never executes.
        reset.store(true, Ordering::SeqCst);
        return Err(Broken);
    }
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let key = header(&parts.headers, "idempotency-key")
        .or_else(|| header(&parts.headers, "repeatability-request-id"))
        .or_else(|| header(&parts.headers, "x-request-id"));
    let (call, calls_for_key) = lock().count(&path, key.as_deref(), parts.version);
    let fail_first = header(&parts.headers, "x-demo-fail-first").and_then(|n| n.parse::<u64>().ok());
    if let (Some(n), Some(count)) = (fail_first, calls_for_key) {
        if count <= n {
            let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "error": "try again" }));
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("0"));
            return Ok(whole(response));
        }
    }
    let delay = header(&parts.headers, "x-demo-delay")
        .and_then(|d| humantime::parse_duration(&d).ok())
        .map(|d| d.min(Duration::from_secs(600)));
    let (response, executed) = answer(&parts, &path, key, call, &body);
    if response.status().is_success() {
        let mut calls = lock();
        if calls.answers.len() == LOOKUP_KEPT {
            calls.answers.pop_front();
        }
        calls.answers.push_back(executed);
    }
    // The call has taken effect (a lookup finds it from now on); only its answer is late
    // (the case idem exists for).
    // `slow-body` spends the delay on the body instead.
    if let (Some(delay), false) = (delay, fault == Some(Fault::SlowBody)) {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(Fault::Drop) => Err(Broken),
        Some(Fault::ResetAfter) => {
            reset.store(true, Ordering::SeqCst);
            Err(Broken)
        }
        Some(Fault::ResetMidResponse) => {
            reset.store(true, Ordering::SeqCst);
            Ok(broken_off(response))
        }
        Some(Fault::SlowBody) => Ok(slowly(response, delay.unwrap_or(SLOW_BODY_DEFAULT))),
        Some(Fault::Reset) | None => Ok(whole(response)),
    }
}

/// True when every `FIELD=VALUE` pair names the answer: its own field or its request body's.
fn matches_all(answer: &Value, wanted: &[(String, String)]) -> bool {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    wanted.iter().all(|(field, value)| {
        [answer.get(field), answer.get("received").and_then(|r| r.get(field))]
            .into_iter()
            .any(|v| text(v).as_deref() == Some(value.as_str()))
    })
}

/// The answer to an executed call, and what `/_demo/lookup` keeps of it (no padding).
fn answer(
    parts: &http::request::Parts,
    path: &str,
    key: Option<String>,
    call: u64,
    body: &[u8],
) -> (Response<Bytes>, Value) {
    let status = header(&parts.headers, "x-demo-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(if parts.method == Method::POST { StatusCode::CREATED } else { StatusCode::OK });
    let echo: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let size = header(&parts.headers, "x-demo-size").and_then(|s| s.parse::<usize>().ok()).unwrap_or(0).min(64 << 20);
    let mut answer = json!({
        "id": format!("demo_{call}"),
        "call": call,
        "method": parts.method.as_str(),
        "path": path,
        "idempotency_key": key,
        "received": echo,
        "padding": "",
    });
    let kept = answer.clone();
    answer["padding"] = Value::String("x".repeat(size));
    let mut response = json_response(status, &answer);
    let headers = response.headers_mut();
    headers.insert("x-demo-call", header::HeaderValue::from(call));
    headers.insert(header::SET_COOKIE, header::HeaderValue::from_static("demo_session=abc; Path=/"));
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    (response, kept)
}

/// `reset-mid-response`: the head announces the whole answer, half the body follows,
/// then the exchange breaks. The pause lets the client read what was sent before the reset.
fn broken_off(mut response: Response<Bytes>) -> Response<DemoBody> {
    let bytes = std::mem::take(response.body_mut());
    response.headers_mut().insert(header::CONTENT_LENGTH, header::HeaderValue::from(bytes.len()));
    let half = bytes.slice(..bytes.len() / 2);
    response.map(|_| in_parts(vec![(Duration::ZERO, Ok(half)), (Duration::from_millis(100), Err(Broken))]))
}

/// `slow-body`: the head at once, then the body in ten parts spread over `over`.
fn slowly(mut response: Response<Bytes>, over: Duration) -> Response<DemoBody> {
    let bytes = std::mem::take(response.body_mut());
    response.headers_mut().insert(header::CONTENT_LENGTH, header::HeaderValue::from(bytes.len()));
    let step = bytes.len().div_ceil(10).max(1);
    let parts = (0..bytes.len())
        .step_by(step)
        .map(|start| (over / 10, Ok(bytes.slice(start..(start + step).min(bytes.len())))))
        .collect();
    response.map(|_| in_parts(parts))
}
