//! The layer over an axum router, called with `oneshot` on the memory store; time is
//! tokio's, paused, and read through [`Clock::tokio`], so expiries and leases are crossed by
//! advancing the clock instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::{Idem, RouteBuilder};
use crate::core::{RecordId, Status};
use crate::store::Store;
use crate::store::clock::Clock;
use crate::store::memory::MemoryStore;

/// A router whose `POST /orders` counts its calls and answers `status`.
fn app(store: Arc<dyn Store>, route: RouteBuilder, status: StatusCode) -> (axum::Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handler = move |body: String| async move {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        (status, format!("call {n}: {body}"))
    };
    let layer = Idem::with_store(store).with_clock(Clock::tokio()).layer().route(route.build().unwrap()).build();
    (axum::Router::new().route("/orders", post(handler)).layer(layer.unwrap()), calls)
}

fn orders() -> RouteBuilder {
    RouteBuilder::new("orders").methods(["POST"]).path("/orders")
}

async fn send(app: &axum::Router, key: Option<&str>, body: &str) -> (StatusCode, bool, String) {
    let mut request = Request::post("/orders").header("content-type", "text/plain");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = app.clone().oneshot(request.body(Body::from(body.to_owned())).unwrap()).await.unwrap();
    let (status, replayed) = (response.status(), response.headers().contains_key("idempotent-replayed"));
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(start_paused = true)]
async fn the_handler_runs_once_and_its_answer_is_replayed() {
    let (app, calls) = app(Arc::new(MemoryStore::default()), orders().key_required(), StatusCode::CREATED);
    assert_eq!(send(&app, Some("k1"), "a").await, (StatusCode::CREATED, false, "call 1: a".into()));
    assert_eq!(send(&app, Some("k1"), "a").await, (StatusCode::CREATED, true, "call 1: a".into()));
    let (status, _, problem) = send(&app, Some("k1"), "b").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem.contains("idempotency-key-reused"), "{problem}");
    let (status, _, problem) = send(&app, None, "a").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem.contains("idempotency-key-missing"), "{problem}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_record_is_forgotten_when_the_clock_passes_its_ttl() {
    let route = orders().ttl(Duration::from_secs(3600));
    let (app, calls) = app(Arc::new(MemoryStore::default()), route, StatusCode::CREATED);
    assert!(!send(&app, Some("k1"), "a").await.1);
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert!(send(&app, Some("k1"), "a").await.1, "still remembered within the TTL");
    tokio::time::advance(Duration::from_secs(3601)).await;
    assert_eq!(send(&app, Some("k1"), "a").await, (StatusCode::CREATED, false, "call 2: a".into()));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_claim_whose_owner_died_becomes_outcome_unknown_once_its_lease_runs_out() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // The first call dies mid-action (a panic unwinds its task, lease renewal included).
    let handler = move || async move {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("the owner dies mid-action");
        }
        StatusCode::CREATED
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let route = orders().lease(Duration::from_secs(2)).build().unwrap();
    let layer = Idem::with_store(store.clone()).with_clock(Clock::tokio()).layer().route(route).build().unwrap();
    let app = axum::Router::new().route("/orders", post(handler)).layer(layer);
    let (status, _, problem) = send(&app, Some("k1"), "a").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{problem}");
    let (status, _, problem) = send(&app, Some("k1"), "a").await;
    assert_eq!((status, problem.contains("request-in-flight")), (StatusCode::CONFLICT, true), "the lease lives");
    tokio::time::advance(Duration::from_millis(2500)).await;
    let (status, _, problem) = send(&app, Some("k1"), "a").await;
    assert_eq!((status, problem.contains("outcome-unknown")), (StatusCode::CONFLICT, true), "{problem}");
    let record = store.get(&RecordId::new("orders", "", "k1")).await.unwrap().unwrap();
    assert_eq!(record.status, Status::OutcomeUnknown);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never executed again");
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_in_flight_gets_409_and_then_the_replay() {
    let release = Arc::new(tokio::sync::Notify::new());
    let waiting = release.clone();
    let handler = move || async move {
        waiting.notified().await;
        (StatusCode::CREATED, "done")
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let layer = Idem::with_store(store).with_clock(Clock::tokio()).layer().route(orders().build().unwrap()).build();
    let app = axum::Router::new().route("/orders", post(handler)).layer(layer.unwrap());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, Some("k1"), "a").await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (status, _, problem) = send(&app, Some("k1"), "a").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem.contains("request-in-flight"), "{problem}");
    release.notify_one();
    assert_eq!(first.await.unwrap(), (StatusCode::CREATED, false, "done".into()));
    assert_eq!(send(&app, Some("k1"), "a").await, (StatusCode::CREATED, true, "done".into()));
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_is_not_final_leaves_the_key_to_the_retry() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let (app, calls) = app(store.clone(), orders(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(send(&app, Some("k1"), "a").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let record = store.get(&RecordId::new("orders", "", "k1")).await.unwrap().unwrap();
    assert_eq!(record.status, Status::FailedRetryable);
    assert_eq!(send(&app, Some("k1"), "a").await, (StatusCode::SERVICE_UNAVAILABLE, false, "call 2: a".into()));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_its_timeout_is_an_unknown_outcome() {
    let handler = || async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        StatusCode::CREATED
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let route = orders().timeout(Duration::from_secs(5)).build().unwrap();
    let layer = Idem::with_store(store.clone()).with_clock(Clock::tokio()).layer().route(route).build().unwrap();
    let app = axum::Router::new().route("/orders", post(handler)).layer(layer);
    let (status, _, problem) = send(&app, Some("k1"), "a").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{problem}");
    let record = store.get(&RecordId::new("orders", "", "k1")).await.unwrap().unwrap();
    assert_eq!(record.status, Status::OutcomeUnknown, "it may have acted: never run again silently");
    let (status, _, problem) = send(&app, Some("k1"), "a").await;
    assert_eq!((status, problem.contains("outcome-unknown")), (StatusCode::CONFLICT, true));
}
