//! What a replay carries (SPEC §4): status, body and end-to-end headers, never cookies or
//! hop-by-hop headers, plus the record's expiry; and how the key reaches the upstream
//! (`forward_key`).

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::support::{Gateway, Upstream, client, send};

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[tokio::test]
async fn a_replay_restores_end_to_end_headers_but_not_cookies_or_hop_by_hop_headers() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", "headers-1").json(&json!({ "a": 1 }));

    let first = send(post()).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.header("set-cookie"), Some("demo_session=abc; Path=/"), "the first answer is whole: {first:?}");
    let replay = send(post()).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("x-demo-call"), Some("1"), "{replay:?}");
    assert_eq!(replay.header("content-type"), Some("application/json"), "{replay:?}");
    assert_eq!(replay.header("set-cookie"), None, "a session cookie is not handed to a retry: {replay:?}");
    assert_eq!(replay.header("idempotency-expires"), first.header("idempotency-expires"), "{replay:?}");
    for name in HOP_BY_HOP {
        assert_eq!(replay.header(name), None, "{name} is hop-by-hop: {replay:?}");
    }

    let record = gateway.record("default", "headers-1").await.expect("a record");
    let stored: Vec<String> = record["response"]["headers"]
        .as_array()
        .expect("stored headers")
        .iter()
        .map(|pair| pair[0].as_str().expect("a header name").to_ascii_lowercase())
        .collect();
    assert!(stored.contains(&"x-demo-call".to_owned()), "{stored:?}");
    for name in HOP_BY_HOP.iter().chain(&["set-cookie"]) {
        assert!(!stored.iter().any(|s| s == name), "{name} is not stored: {stored:?}");
    }
}

#[tokio::test]
async fn the_replay_header_denylist_is_configurable() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        replay_header_denylist = ["x-demo-call"]
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", "deny-1").json(&json!({ "a": 1 }));
    assert_eq!(send(post()).await.status, 201);
    let replay = send(post()).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.header("x-demo-call"), None, "{replay:?}");
    assert_eq!(replay.header("set-cookie"), Some("demo_session=abc; Path=/"), "{replay:?}");
}

#[tokio::test]
async fn every_protected_answer_names_the_expiry_of_its_record() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        ttl = "1h"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", "exp-1").json(&json!({ "a": 1 }));
    let first = send(post()).await;
    let header = first.header("idempotency-expires").expect("Idempotency-Expires");
    let expires = httpdate::parse_http_date(header).expect("an HTTP date");
    let expected = SystemTime::now() + Duration::from_secs(3600);
    let off = expected.duration_since(expires).or_else(|_| expires.duration_since(expected)).expect("a difference");
    assert!(off < Duration::from_secs(30), "{header} is not about an hour from now");

    let record = gateway.record("orders", "exp-1").await.expect("a record");
    let stored = humantime::parse_rfc3339(record["expires_at"].as_str().expect("expires_at")).expect("RFC 3339");
    assert_eq!(httpdate::fmt_http_date(stored), header, "the header is the record's expiry");
}

/// What the demo upstream saw as the key (`Idempotency-Key`, else
/// `Repeatability-Request-ID`, else `X-Request-Id`) for a route with this `forward_key`.
/// The client sends `FWD-1` and the route lower-cases keys, so a key the gateway wrote
/// itself (`fwd-1`) is told apart from the client's header passed on unchanged.
async fn key_seen_upstream(forward_key: &str) -> (serde_json::Value, Upstream) {
    let upstream = Upstream::start().await;
    let config = format!(
        r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        key = {{ header = "Idempotency-Key", normalize = "lowercase" }}
        forward_key = {forward_key}
    "#
    );
    let gateway = Gateway::start(&upstream.url(), &config).await;
    let http = client();
    let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", "FWD-1").json(&json!({ "a": 1 }));
    let first = send(post()).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(send(post()).await.replayed(), "forward_key changes nothing for the client");
    assert_eq!(upstream.calls().await, 1);
    (first.json()["idempotency_key"].clone(), upstream)
}

#[tokio::test]
async fn forward_key_as_is_hands_the_key_to_the_upstream() {
    let (seen, upstream) = key_seen_upstream(r#""as-is""#).await;
    assert_eq!(seen, "FWD-1", "the client's header, unchanged");
    assert_eq!(upstream.calls_for("FWD-1").await, 1);
}

#[tokio::test]
async fn forward_key_strip_keeps_the_key_from_the_upstream() {
    let (seen, upstream) = key_seen_upstream(r#""strip""#).await;
    assert_eq!(seen, serde_json::Value::Null);
    assert_eq!(upstream.stats().await["by_key"], json!({}));
}

#[tokio::test]
async fn forward_key_can_rename_the_header() {
    // The demo reads X-Request-Id only when the other two headers are absent.
    let (seen, upstream) = key_seen_upstream(r#"{ header = "X-Request-Id" }"#).await;
    assert_eq!(seen, "fwd-1");
    assert_eq!(upstream.calls_for("fwd-1").await, 1);
}

#[tokio::test]
async fn forward_key_odata_sends_a_repeatability_request_id() {
    // The demo reads Repeatability-Request-ID only when Idempotency-Key is absent.
    let (seen, upstream) = key_seen_upstream(r#""odata""#).await;
    assert_eq!(seen, "fwd-1");
    assert_eq!(upstream.calls_for("fwd-1").await, 1);
}
