//! The gateway end to end, in process: `Gateway::handle` on the memory store in front of a
//! raw HTTP/1.1 upstream whose answer the fuzzer writes byte for byte. Each input is sent
//! twice, which exercises the private request identification (key, OData request id, tenant,
//! fingerprint), the forward-key rewrite, and the stored-header filter and replay.
//!
//! Properties, beyond "never panics": the first request is never a replay; a claimed request
//! whose final answer was kept is replayed the second time — same status, body and headers
//! (less the denylist), without reaching the upstream; a non-final answer executes again; a
//! request sent but not answered is never silently executed again; and a request that was not
//! claimed gets the same status twice.
//!
//! Input: a request in the format of `idem_fuzz::Message`, a line `=====`, then the
//! upstream's answer: its status line (without `HTTP/1.1 `), header lines written as they
//! are, an empty line and the body. `x-fuzz-route: N` picks one of the gateway configs below.

#![no_main]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use idem::config::parse_toml;
use idem::core::is_final_status;
use idem::gateway::Gateway;
use idem::layer::body::{Body, full};
use idem::gateway::config::{Overrides, RawConfig};
use idem::layer::route::RouteTable;
use idem::store::memory::MemoryStore;
use idem::store::{ListQuery, Store};
use idem_fuzz::Message;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// The routes a request can meet (the upstream address is filled in).
const CONFIGS: [&str; 4] = [
    // Zero config, plus OData: an optional Idempotency-Key on POST and PATCH.
    r#"odata = true
    [[routes]]
    upstream_timeout = "5s""#,
    // A required, lower-cased key; tenants by header; the key goes upstream as OData.
    r#"odata = true
    [[routes]]
    name = "orders"
    path = "/v1/orders/**"
    methods = ["POST", "PUT"]
    ttl = "1h"
    key = { header = "idempotency-key", required = true, normalize = "lowercase" }
    tenant = { header = "x-tenant" }
    fingerprint = { exclude = ["/ts", "/items/0/at"], headers = ["content-type", "x-api-version"] }
    forward_key = "odata"
    replay_header_denylist = ["set-cookie", "x-secret"]
    upstream_timeout = "5s""#,
    // A key from the body, renamed upstream; 5xx kept; unknown outcomes retried; small answers.
    r#"[[routes]]
    name = "webhooks"
    methods = ["POST", "DELETE", "PATCH"]
    key = { body = ["/event/id", "/order_id"] }
    forward_key = { header = "x-request-key" }
    store_server_errors = true
    on_unknown = "retry"
    max_stored_response = "64B"
    max_body = "4KiB"
    upstream_timeout = "5s""#,
    // The fingerprint as the key, stripped upstream, only what the pointers name counted.
    r#"odata = true
    [[routes]]
    name = "by-content"
    key = { fingerprint = true }
    fingerprint = { include = ["/amount", "/currency"] }
    forward_key = "strip"
    replay_header_denylist = []
    upstream_timeout = "5s""#,
];

/// How many requests the upstream has read.
static CALLS: AtomicUsize = AtomicUsize::new(0);
/// The bytes the upstream answers with.
static ANSWER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct World {
    runtime: Runtime,
    store: Arc<MemoryStore>,
    /// Each gateway with its routes, to know which route a request met.
    gateways: Vec<(Arc<Gateway>, RouteTable)>,
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let (request, answer) = match data.windows(7).position(|w| w == b"\n=====\n") {
        Some(at) => (&data[..at], &data[at + 7..]),
        None => (data, &b"200 OK\ncontent-type: application/json\n\n{}"[..]),
    };
    let message = Message::parse(request);
    let choice = message.text("x-fuzz-route").and_then(|n| n.trim().parse::<usize>().ok()).unwrap_or(0);
    let (gateway, routes) = &world.gateways[choice % world.gateways.len()];
    *ANSWER.lock().unwrap() = raw_answer(answer);
    let Some(build) = request_builder(&message) else { return };

    world.runtime.block_on(async {
        let before = CALLS.load(Ordering::SeqCst);
        let first = send(gateway, build()).await;
        let first_calls = CALLS.load(Ordering::SeqCst) - before;
        let second = send(gateway, build()).await;
        let second_calls = CALLS.load(Ordering::SeqCst) - before - first_calls;
        assert!(first_calls <= 1 && second_calls <= 1, "one request, one call at most");
        assert!(!replayed(&first), "the first request is a replay: {first:?}");

        let request = build();
        let claimed = first.headers().contains_key("idempotency-expires");
        let served = first.headers().contains_key("x-fuzz-served");
        let Some((_, route)) = routes.find(request.method(), request.uri().path()) else {
            assert!(!claimed, "an unprotected request was claimed");
            return;
        };
        if !claimed {
            assert_eq!(first.status(), second.status(), "not claimed, yet answered differently");
        } else if served {
            // Executed, and the upstream's answer came back.
            assert_eq!(first_calls, 1, "an answer from the upstream without a call");
            let status = first.status().as_u16();
            let kept = first.body().len() as u64 <= route.max_stored_response;
            if !is_final_status(status, route.store_server_errors) {
                assert_eq!(second_calls, 1, "a non-final {status} was not executed again");
            } else if kept {
                assert!(replayed(&second), "a final {status} was not replayed: {second:?}");
                assert_eq!(second_calls, 0, "a replay reached the upstream");
                same_answer(&first, &second, &route.replay_denylist);
            } else {
                assert_eq!(second.status(), 410, "an answer too large to keep");
                assert_eq!(second_calls, 0);
            }
        } else if first_calls == 1 {
            // Sent, but no usable answer: the outcome is unknown.
            let retried = matches!(route.on_unknown, idem::core::OnUnknown::Retry);
            assert!(second_calls == 0 || retried, "an unknown outcome was executed again: {first:?}");
        } else {
            assert_eq!(second_calls, 0, "a refused request was executed the second time");
        }
        forget_everything(&world.store).await;
    });
});

/// The answer as the client got it, with the body read.
async fn send(gateway: &Arc<Gateway>, request: Request<Body>) -> Response<Bytes> {
    let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
    let response = gateway.clone().handle(request, Some(peer)).await;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Response::from_parts(parts, bytes)
}

fn replayed(response: &Response<Bytes>) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|v| v == "true")
}

/// A replay carries the status, body and every header of the first answer but the
/// denylisted ones, whose values never come back.
fn same_answer(first: &Response<Bytes>, replay: &Response<Bytes>, denylist: &[HeaderName]) {
    assert_eq!(first.status(), replay.status());
    assert_eq!(first.body(), replay.body());
    let own = ["content-length", "idempotent-replayed", "idempotency-expires"];
    for name in first.headers().keys() {
        if own.contains(&name.as_str()) {
            continue;
        }
        let sent: Vec<&HeaderValue> = first.headers().get_all(name).iter().collect();
        let again: Vec<&HeaderValue> = replay.headers().get_all(name).iter().collect();
        if denylist.contains(name) {
            assert!(again.is_empty(), "denylisted {name} replayed");
        } else {
            assert_eq!(sent, again, "{name} replayed differently");
        }
    }
    for name in replay.headers().keys() {
        assert!(first.headers().contains_key(name) || own.contains(&name.as_str()), "{name} appeared in the replay");
    }
}

/// A function that builds the request again, as a client retrying it would; `None` when the
/// start line is no method and target. Framing is what a server would have read: a body's
/// length, never a chunked encoding.
fn request_builder(message: &Message<'_>) -> Option<impl Fn() -> Request<Body>> {
    let (method, target) = message.start_parts();
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let uri: Uri = target.parse().ok()?;
    uri.path_and_query()?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &message.headers {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) else { continue };
        if name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING {
            headers.append(name, value);
        }
    }
    let body = Bytes::copy_from_slice(message.body);
    if !body.is_empty() {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    Some(move || {
        let mut request = Request::new(full(body.clone()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers.clone();
        request
    })
}

/// The upstream's answer on the wire. Header lines go as written (a malformed one is the
/// upstream's problem); the answer is marked, framed by its length and closes the connection.
/// Lines naming the gateway's own headers are dropped, so their presence means the gateway.
fn raw_answer(answer: &[u8]) -> Vec<u8> {
    let message = Message::parse(answer);
    let mut out = b"HTTP/1.1 ".to_vec();
    out.extend_from_slice(message.start);
    out.extend_from_slice(b"\r\n");
    for (name, value) in &message.headers {
        let own = ["idempotency-expires", "idempotent-replayed", "x-fuzz-served", "content-length", "connection"];
        if own.iter().any(|o| name.eq_ignore_ascii_case(o.as_bytes())) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!("x-fuzz-served: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", message.body.len()).as_bytes(),
    );
    out.extend_from_slice(message.body);
    out
}

/// Empties the store, so inputs do not meet each other's records and memory stays flat.
async fn forget_everything(store: &MemoryStore) {
    loop {
        let page = store.list(&ListQuery { limit: 1000, ..Default::default() }).await.expect("the memory store lists");
        if page.records.is_empty() {
            return;
        }
        for record in page.records {
            store.delete(&record.id).await.expect("the memory store deletes");
        }
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("a loopback port");
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(serve(listener));
        let store = Arc::new(MemoryStore::default());
        let gateways = CONFIGS
            .iter()
            .map(|text| {
                let raw: RawConfig = parse_toml(text).expect("a fuzz config parses");
                let overrides = Overrides { upstream: Some(upstream.clone()), ..Default::default() };
                let config = raw.validate(&overrides, &|_| None).expect("a fuzz config validates");
                let gateway = Gateway::new(&config, store.clone()).expect("the TLS roots load");
                (Arc::new(gateway), RouteTable::new(config.routes))
            })
            .collect();
        World { runtime, store, gateways }
    })
}

/// The upstream: reads one request (head, then a body of its `content-length`), counts it,
/// answers with the fuzzer's bytes and closes.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 8192];
                loop {
                    let n = socket.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
                    buffer.extend_from_slice(&chunk[..n]);
                    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buffer.len() >= end + 4 + length {
                        return Some(());
                    }
                }
            });
            if read.await.ok().flatten().is_none() {
                return;
            }
            CALLS.fetch_add(1, Ordering::SeqCst);
            let answer = ANSWER.lock().unwrap().clone();
            let _ = socket.write_all(&answer).await;
            let _ = socket.shutdown().await;
        });
    }
}
