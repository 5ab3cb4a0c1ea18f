//! Fail closed, tested in process: the gateway (`Gateway::handle`, no sockets on the
//! client side) in front of the demo upstream, on a memory store behind a
//! [`FaultyStore`](crate::store::faulty::FaultyStore) that fails, stalls or loses an owner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::config::parse_toml;
use crate::core::{Record, RecordId, Status};
use crate::gateway::Gateway;
use crate::gateway::config::{Overrides, RawConfig};
use crate::layer::body::Body;
use crate::store::faulty::*;
use crate::store::memory::MemoryStore;
use crate::store::{ListQuery, Store};

/// One route with a short lease, so a claim whose owner is lost runs out quickly.
const ROUTES: &str = r#"
    client_timeout = "5s"
    [[routes]]
    name = "orders"
    path = "/orders"
    lease = "300ms"
"#;

/// The wait for a lease of [`ROUTES`] to run out: the store compares wall-clock times,
/// so there is no signal to await, only the clock.
const PAST_THE_LEASE: Duration = Duration::from_millis(400);

/// The demo upstream on a free port, in this process.
pub(super) async fn demo_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(crate::demo::serve(listener));
    address
}

fn gateway(store: Arc<dyn Store>, upstream: SocketAddr) -> Arc<Gateway> {
    gateway_with(ROUTES, store, upstream)
}

/// A gateway configured by `toml`, on `store`, in front of `upstream`.
pub(super) fn gateway_with(toml: &str, store: Arc<dyn Store>, upstream: SocketAddr) -> Arc<Gateway> {
    let overrides = Overrides { upstream: Some(format!("http://{upstream}")), ..Overrides::default() };
    let config = parse_toml::<RawConfig>(toml).unwrap().validate(&overrides, &|_| None).unwrap();
    Arc::new(Gateway::new(&config, store).unwrap())
}

fn post(key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn order(key: &str) -> Request<Full<Bytes>> {
    post(key, r#"{"amount":1}"#)
}

/// What a client sees: status, replayed or not, and the body as JSON.
async fn seen(response: Response<Body>) -> (StatusCode, bool, Value) {
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn upstream_calls(upstream: SocketAddr) -> u64 {
    let stats: Value = reqwest::get(format!("http://{upstream}/_demo/stats")).await.unwrap().json().await.unwrap();
    stats["calls"].as_u64().unwrap()
}

async fn stored(store: &dyn Store, key: &str) -> Option<Record> {
    store.get(&RecordId::new("orders", "", key)).await.unwrap()
}

#[tokio::test]
async fn a_claim_that_fails_is_refused_with_503_and_nothing_is_forwarded() {
    let upstream = demo_upstream().await;
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
    let gateway = gateway(store.clone(), upstream);

    store.fail_next(Op::Claim, 1);
    let refused = gateway.handle(order("k1"), None).await;
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let (status, _, problem) = seen(refused).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem["type"], "store-unavailable");
    assert_eq!(upstream_calls(upstream).await, 0, "nothing is forwarded without a claim");
    assert_eq!(stored(store.inner().as_ref(), "k1").await, None);

    // The store is back: the client's retry executes, once, with no restart.
    let (status, replayed, _) = seen(gateway.handle(order("k1"), None).await).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(upstream_calls(upstream).await, 1);
}

#[tokio::test]
async fn a_finish_that_fails_for_a_moment_is_retried_and_the_record_completes() {
    let upstream = demo_upstream().await;
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
    let gateway = gateway(store.clone(), upstream);

    store.fail_next(Op::Finish, 3);
    let (status, replayed, first) = seen(gateway.handle(order("k1"), None).await).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(store.calls(Op::Finish), 4, "three failed attempts, then the one that recorded the answer");
    let record = stored(store.inner().as_ref(), "k1").await.expect("a record");
    assert_eq!(record.status, Status::Completed, "{record:?}");

    let (status, replayed, again) = seen(gateway.handle(order("k1"), None).await).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(again, first);
    assert_eq!(upstream_calls(upstream).await, 1);
}

#[tokio::test]
async fn an_owner_lost_between_claim_and_finish_leaves_an_unknown_outcome_never_a_duplicate() {
    let upstream = demo_upstream().await;
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
    let gateway = gateway(store.clone(), upstream);

    store.crash_after_claim();
    let (status, _, _) = seen(gateway.handle(order("k1"), None).await).await;
    assert_eq!(status, StatusCode::CREATED, "the upstream answered; only its recording failed");
    assert_eq!(store.calls(Op::Finish), 6, "owner::finish tried six times before giving up");
    let record = stored(store.inner().as_ref(), "k1").await.expect("the claim is durable");
    assert_eq!(record.status, Status::InProgress, "{record:?}");
    assert_eq!(upstream_calls(upstream).await, 1);

    // The restart: a gateway on the same records, once the dead owner's lease is over.
    store.recover();
    let restarted = self::gateway(store.inner().clone(), upstream);
    tokio::time::sleep(PAST_THE_LEASE).await;
    let (status, _, problem) = seen(restarted.handle(order("k1"), None).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["type"], "outcome-unknown");
    let record = stored(store.inner().as_ref(), "k1").await.expect("a record");
    assert_eq!(record.status, Status::OutcomeUnknown, "{record:?}");
    assert_eq!(upstream_calls(upstream).await, 1, "the unknown outcome is never executed again");
}

/// A run of requests covering the decisions: execute, replay, key reused, a retryable
/// answer and its retry recovery, an unknown outcome.
async fn decisions(store: Arc<dyn Store>) -> Vec<(StatusCode, bool)> {
    let upstream = demo_upstream().await;
    let gateway = gateway(store, upstream);
    let mut failing = order("k2");
    failing.headers_mut().insert("x-demo-status", "503".parse().unwrap());
    let mut dropped = order("k3");
    dropped.headers_mut().insert("x-demo-fault", "drop".parse().unwrap());
    let requests = [
        order("k1"),
        order("k1"),
        post("k1", r#"{"amount":2}"#),
        failing,
        order("k2"),
        order("k2"),
        dropped,
        order("k3"),
    ];
    let mut seen_by_client = Vec::new();
    for request in requests {
        let (status, replayed, _) = seen(gateway.handle(request, None).await).await;
        seen_by_client.push((status, replayed));
    }
    seen_by_client
}

#[tokio::test]
async fn latency_does_not_change_decisions() {
    let plain = decisions(Arc::new(MemoryStore::default())).await;
    let slow = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
    slow.set_latency(Duration::from_millis(40));
    assert_eq!(decisions(slow.clone()).await, plain);
    assert_eq!(
        plain,
        [
            (StatusCode::CREATED, false),
            (StatusCode::CREATED, true),
            (StatusCode::UNPROCESSABLE_ENTITY, false),
            (StatusCode::SERVICE_UNAVAILABLE, false),
            (StatusCode::CREATED, false),
            (StatusCode::CREATED, true),
            (StatusCode::BAD_GATEWAY, false),
            (StatusCode::CONFLICT, false),
        ]
    );

    // Slow claims racing for one key: still exactly one executes.
    let upstream = demo_upstream().await;
    let gateway = gateway(slow, upstream);
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut request = order("race");
        request.headers_mut().insert("x-demo-delay", "200ms".parse().unwrap());
        let gateway = gateway.clone();
        racing.spawn(async move { gateway.handle(request, None).await });
    }
    let mut executed = 0;
    while let Some(response) = racing.join_next().await {
        match seen(response.unwrap()).await {
            (StatusCode::CREATED, false, _) => executed += 1,
            (StatusCode::CREATED, true, _) => {}
            (StatusCode::CONFLICT, _, problem) => assert_eq!(problem["type"], "request-in-flight"),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(executed, 1);
    assert_eq!(upstream_calls(upstream).await, 1);
}

#[tokio::test]
async fn faults_fail_only_what_they_name_and_recover_clears_them() {
    let store = FaultyStore::new(Arc::new(MemoryStore::default()));
    let id = RecordId::new("orders", "", "k1");
    store.fail_next(Op::Get, 2);
    assert!(store.get(&id).await.is_err());
    assert!(store.list(&ListQuery::default()).await.is_ok(), "another operation is unaffected");
    assert!(store.get_many(std::slice::from_ref(&id)).await.is_err());
    assert!(store.get(&id).await.is_ok());
    store.go_down();
    assert!(store.stats().await.is_err_and(|e| e.is_retryable()));
    store.recover();
    assert!(store.stats().await.is_ok());
    assert_eq!(store.calls(Op::Get), 3);
}
