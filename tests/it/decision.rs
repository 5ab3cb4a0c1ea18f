//! SPEC §2, the decision table, as a client sees it: execute once, replay, reject a
//! reused key, refuse or wait for a duplicate in flight, retry what was not final, and
//! forget what expired.

use std::time::Duration;

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, fire_together, send};

#[tokio::test]
async fn a_new_key_executes_once_and_its_retries_are_replayed() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let order = json!({ "amount": 42 });
    let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", "order-1").json(&order);

    let first = send(post()).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.replayed(), "{first:?}");
    assert_eq!(first.json()["received"], order, "{first:?}");
    assert_eq!(first.json()["idempotency_key"], "order-1", "{first:?}");

    for _ in 0..2 {
        let again = send(post()).await;
        assert_eq!(again.status, 201, "{again:?}");
        assert!(again.replayed(), "{again:?}");
        assert_eq!(again.body, first.body, "a replay carries the stored body");
        assert_eq!(again.header("x-demo-call"), Some("1"), "{again:?}");
        assert_eq!(again.header("content-type"), Some("application/json"), "{again:?}");
    }
    assert_eq!(upstream.calls_for("order-1").await, 1);
    assert_eq!(upstream.calls().await, 1);
    // Replay counts are bookkeeping the store may write a moment later.
    let record = gateway.wait_for_record("default", "order-1", "replay_count 2", |r| r["replay_count"] == 2).await;
    assert_eq!(record["status"], "completed", "{record}");
}

#[tokio::test]
async fn the_same_key_with_another_payload_is_refused_with_422() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let post = |amount: u32| {
        http.post(gateway.url("/orders")).header("Idempotency-Key", "order-7").json(&json!({ "amount": amount }))
    };

    assert_eq!(send(post(4242)).await.status, 201);
    let reused = send(post(9999)).await;
    let problem = assert_problem(&reused, 422, "idempotency-key-reused");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(!detail.contains("4242") && !detail.contains("9999"), "the detail echoes no payload: {detail}");
    assert_eq!(upstream.calls().await, 1);

    // The original payload still replays.
    let again = send(post(4242)).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert!(again.replayed(), "{again:?}");
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn concurrent_duplicates_execute_once_and_the_others_are_told_to_retry() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let replies = fire_together(20, || {
        http.post(gateway.url("/orders"))
            .header("Idempotency-Key", "burst")
            .header("X-Demo-Delay", "2s")
            .json(&json!({ "amount": 1 }))
    })
    .await;

    let executed: Vec<_> = replies.iter().filter(|r| r.status == 201).collect();
    assert_eq!(executed.len(), 1, "exactly one executes: {replies:#?}");
    assert!(!executed[0].replayed(), "{:?}", executed[0]);
    for reply in replies.iter().filter(|r| r.status != 201) {
        assert_problem(reply, 409, "request-in-flight");
        let retry_after: u64 = reply.header("retry-after").expect("Retry-After").parse().expect("seconds");
        assert!((1..=30).contains(&retry_after), "{reply:?}");
    }
    assert_eq!(upstream.calls_for("burst").await, 1);

    let later =
        send(http.post(gateway.url("/orders")).header("Idempotency-Key", "burst").json(&json!({ "amount": 1 }))).await;
    assert!(later.replayed(), "{later:?}");
    assert_eq!(later.body, executed[0].body);
    assert_eq!(upstream.calls_for("burst").await, 1);
}

#[tokio::test]
async fn concurrent_duplicates_that_may_wait_all_get_the_one_answer() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        methods = ["POST"]
        path = "/orders"
        in_flight = { wait = "5s" }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let replies = fire_together(20, || {
        http.post(gateway.url("/orders"))
            .header("Idempotency-Key", "burst")
            .header("X-Demo-Delay", "1s")
            .json(&json!({ "amount": 1 }))
    })
    .await;

    let fresh: Vec<_> = replies.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(fresh.len(), 1, "exactly one executes: {replies:#?}");
    for reply in &replies {
        assert_eq!(reply.status, 201, "{reply:?}");
        assert_eq!(reply.body, fresh[0].body, "every waiter gets the one answer");
    }
    assert_eq!(upstream.calls_for("burst").await, 1);
}

#[tokio::test]
async fn answers_that_are_not_final_leave_the_key_retryable() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    for status in [408, 409, 425, 429, 500, 502, 503] {
        let key = format!("not-final-{status}");
        let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", &key).json(&json!({ "n": 1 }));

        let failed = send(post().header("X-Demo-Status", status.to_string())).await;
        assert_eq!(failed.status, status, "the upstream's answer is passed on: {failed:?}");
        assert!(!failed.replayed(), "{failed:?}");
        if status == 429 || status == 503 {
            assert_eq!(failed.header("retry-after"), Some("1"), "{failed:?}");
        }
        let record = gateway.record("default", &key).await.expect("a record");
        assert_eq!(record["status"], "failed_retryable", "{record}");

        let failed_again = send(post().header("X-Demo-Status", status.to_string())).await;
        assert_eq!(failed_again.status, status, "{failed_again:?}");
        assert!(!failed_again.replayed(), "a failed attempt is never replayed: {failed_again:?}");
        assert_eq!(upstream.calls_for(&key).await, 2, "the retry executed again");

        let succeeded = send(post()).await;
        assert_eq!(succeeded.status, 201, "{succeeded:?}");
        assert!(!succeeded.replayed(), "{succeeded:?}");
        let replayed = send(post()).await;
        assert_eq!(replayed.status, 201, "{replayed:?}");
        assert!(replayed.replayed(), "{replayed:?}");
        assert_eq!(replayed.body, succeeded.body);
        assert_eq!(upstream.calls_for(&key).await, 3, "status {status}");
        let record = gateway.record("default", &key).await.expect("a record");
        assert_eq!(record["attempt_count"], 3, "{record}");
    }
}

#[tokio::test]
async fn a_deterministic_client_error_is_final_and_replayed() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let post = || {
        http.post(gateway.url("/orders"))
            .header("Idempotency-Key", "bad-order")
            .header("X-Demo-Status", "400")
            .json(&json!({ "amount": -1 }))
    };
    let first = send(post()).await;
    assert_eq!(first.status, 400, "{first:?}");
    assert!(!first.replayed());
    let second = send(post()).await;
    assert_eq!(second.status, 400, "{second:?}");
    assert!(second.replayed(), "{second:?}");
    assert_eq!(second.body, first.body);
    assert_eq!(upstream.calls_for("bad-order").await, 1);
}

#[tokio::test]
async fn store_server_errors_makes_a_500_final() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        store_server_errors = true
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = || {
        http.post(gateway.url("/orders"))
            .header("Idempotency-Key", "boom")
            .header("X-Demo-Status", "500")
            .json(&json!({ "amount": 1 }))
    };
    let first = send(post()).await;
    assert_eq!(first.status, 500, "{first:?}");
    let second = send(post()).await;
    assert_eq!(second.status, 500, "{second:?}");
    assert!(second.replayed(), "{second:?}");
    assert_eq!(second.body, first.body);
    assert_eq!(upstream.calls_for("boom").await, 1);
    let record = gateway.record("orders", "boom").await.expect("a record");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["response"]["status"], 500, "{record}");
}

#[tokio::test]
async fn an_expired_record_is_forgotten_and_its_key_executes_again() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        ttl = "1s"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |key: &str, body: serde_json::Value| {
        http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(&body)
    };
    for key in ["same-payload", "other-payload"] {
        assert_eq!(send(post(key, json!({ "a": 1 }))).await.status, 201);
        assert!(send(post(key, json!({ "a": 1 }))).await.replayed(), "replayed while the record lives");
    }

    // The ttl must run out: nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = send(post("same-payload", json!({ "a": 1 }))).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert!(!again.replayed(), "an expired key executes again: {again:?}");
    assert_eq!(again.header("x-demo-call"), Some("3"), "{again:?}");
    let changed = send(post("other-payload", json!({ "b": 2 }))).await;
    assert_eq!(changed.status, 201, "an expired key is new again, whatever it held: {changed:?}");
    assert!(!changed.replayed(), "{changed:?}");
    assert_eq!(upstream.calls_for("same-payload").await, 2);
    assert_eq!(upstream.calls_for("other-payload").await, 2);
}

#[tokio::test]
async fn a_duplicate_that_waits_too_long_is_told_to_retry() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        in_flight = { wait = "300ms" }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = || http.post(gateway.url("/orders")).header("Idempotency-Key", "patient").json(&json!({ "a": 1 }));
    let slow = tokio::spawn(send(post().header("X-Demo-Delay", "1s")));
    gateway.wait_for_status("orders", "patient", "in_progress").await;

    let duplicate = send(post()).await;
    assert_problem(&duplicate, 409, "request-in-flight");
    assert!(duplicate.header("retry-after").is_some(), "{duplicate:?}");
    let first = slow.await.expect("the request task");
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(upstream.calls_for("patient").await, 1);
}
