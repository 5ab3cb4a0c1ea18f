//! Bad input never crashes the gateway or loses a record: oversize and malformed keys,
//! bodies and header sets, invalid UTF-8, hostile JSON, raw header bytes, slow clients and
//! a flood of distinct keys each get a clear answer, and the process stays up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, send};

/// Sends raw bytes on a fresh connection and returns the status line's code (0 when the
/// gateway closed the connection without an answer).
fn raw_status(gateway: &Gateway, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(gateway.address()).expect("the gateway accepts");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).expect("the request is written");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

async fn still_serving(gateway: &Gateway) {
    let reply = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "alive").json(&json!({}))).await;
    assert!(reply.status == 201 || reply.replayed(), "the gateway still serves: {reply:?}");
}

#[tokio::test]
async fn oversize_keys_and_header_sets_are_refused() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let long = "k".repeat(10_000);
    let reply = send(client().post(gateway.url("/orders")).header("Idempotency-Key", long).json(&json!({}))).await;
    assert_problem(&reply, 400, "idempotency-key-invalid");

    let mut request = client().post(gateway.url("/orders")).header("Idempotency-Key", "many-headers");
    for i in 0..200 {
        request = request.header(format!("x-filler-{i}"), "v");
    }
    let reply = crate::support::try_send(request.json(&json!({}))).await;
    match reply {
        Ok(reply) => assert_eq!(reply.status, 431, "{reply:?}"),
        Err(error) => panic!("the gateway answers a flood of headers with 431, not a broken connection: {error}"),
    }
    still_serving(&gateway).await;
    assert_eq!(upstream.calls().await, 1, "only the well-formed request reached the upstream");
}

#[tokio::test]
async fn raw_bytes_in_a_key_are_refused() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    for key in [&b"caf\xc3\xa9"[..], &b"\xff\xfe"[..], &b"a\tb"[..]] {
        let mut request = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nIdempotency-Key: ".to_vec();
        request.extend_from_slice(key);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n{}");
        assert_eq!(raw_status(&gateway, &request), 400, "key {key:?}");
    }
    still_serving(&gateway).await;
}

#[tokio::test]
async fn invalid_utf8_and_hostile_json_bodies_are_fingerprinted_as_bytes() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let nested = "[".repeat(200_000);
    for (key, body) in
        [("utf8", vec![0xff, 0xfe, b'{', 0xc3]), ("deep", nested.into_bytes()), ("cut", b"{\"a\":".to_vec())]
    {
        let post = || {
            client()
                .post(gateway.url("/orders"))
                .header("Idempotency-Key", key)
                .header("Content-Type", "application/json")
                .body(body.clone())
        };
        let first = send(post()).await;
        assert_eq!(first.status, 201, "{key}: {first:?}");
        let again = send(post()).await;
        assert!(again.replayed(), "{key}: the same bytes replay: {again:?}");
    }
    still_serving(&gateway).await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "client_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(gateway.address()).expect("the gateway accepts");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    // Half a request line, then silence: a slowloris client.
    stream.write_all(b"POST /orders HTTP/1.1\r\nHost: x\r\nIdem").unwrap();
    let mut buffer = [0u8; 1024];
    let read = stream.read(&mut buffer);
    assert!(matches!(read, Ok(0)) || read.is_err() || buffer.starts_with(b"HTTP/1.1 408"), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "the connection was closed by the header timeout");
    still_serving(&gateway).await;
}

#[tokio::test]
async fn a_flood_of_distinct_keys_keeps_memory_bounded() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
        line.split_whitespace().nth(1).and_then(|kb| kb.parse().ok()).unwrap_or(0)
    };
    let http = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..3000 {
        let request =
            http.post(gateway.url("/orders")).header("Idempotency-Key", format!("flood-{i}")).json(&json!({ "i": i }));
        tasks.spawn(send(request));
        if tasks.len() >= 32 {
            let reply = tasks.join_next().await.unwrap().unwrap();
            assert_eq!(reply.status, 201, "{reply:?}");
        }
    }
    while let Some(reply) = tasks.join_next().await {
        assert_eq!(reply.unwrap().status, 201);
    }
    assert_eq!(upstream.calls().await, 3000);
    // Records live in the store, not in the gateway: its memory does not grow with keys.
    let kib = rss(gateway.pid());
    assert!(kib > 0 && kib < 100 * 1024, "gateway RSS {kib} KiB after 3000 distinct keys (bound: 100 MiB)");
    still_serving(&gateway).await;
}
