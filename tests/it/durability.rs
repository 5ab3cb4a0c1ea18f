//! A record the store acknowledged survives `kill -9` (SPEC §1), and a gateway killed
//! mid-flight leaves an explicit `outcome_unknown`, never a silent duplicate (SPEC §2).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Gateway, Reply, Upstream, assert_problem, client, send};

#[tokio::test]
async fn a_completed_record_replays_after_kill_9_and_restart() {
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let order = json!({ "amount": 11 });

    let first = send(http.post(gateway.url("/orders")).header("Idempotency-Key", "durable").json(&order)).await;
    assert_eq!(first.status, 201, "{first:?}");
    gateway.kill9();
    gateway.restart().await;

    let after = send(http.post(gateway.url("/orders")).header("Idempotency-Key", "durable").json(&order)).await;
    assert_eq!(after.status, 201, "{after:?}");
    assert!(after.replayed(), "{after:?}");
    assert_eq!(after.body, first.body);
    assert_eq!(upstream.calls_for("durable").await, 1);
}

/// Starts a slow request in the background, waits until the upstream has executed it
/// (its answer is still 3 s away), then kills the gateway with `kill -9` and starts it
/// again on the same store.
async fn crash_mid_flight(gateway: &mut Gateway, upstream: &Upstream, key: &str, order: &serde_json::Value) {
    let request = client().post(gateway.url("/orders")).header("Idempotency-Key", key).header("X-Demo-Delay", "3s");
    let in_flight = tokio::spawn(request.json(order).send());
    gateway.wait_for_status("orders", key, "in_progress").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.calls_for(key).await == 0 {
        assert!(Instant::now() < deadline, "the upstream never received the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.kill9();
    let lost = in_flight.await.expect("the request task");
    assert!(lost.is_err(), "the client of a killed gateway gets no answer: {lost:?}");
    gateway.restart().await;
}

/// Retries until the dead owner's lease has run out (a `409 request-in-flight` until then).
async fn retry_after_lease(gateway: &Gateway, key: &str, order: &serde_json::Value) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = send(client().post(gateway.url("/orders")).header("Idempotency-Key", key).json(order)).await;
        let in_flight = reply.status == 409 && reply.json()["type"] == "request-in-flight";
        if !in_flight {
            return reply;
        }
        assert!(Instant::now() < deadline, "the lease never ran out: {reply:?}");
        // The lease (1 s) must run out: nothing to await but the clock.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_gateway_killed_mid_flight_leaves_an_unknown_outcome() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        lease = "1s"
    "#;
    let mut gateway = Gateway::start(&upstream.url(), config).await;
    let order = json!({ "amount": 12 });
    crash_mid_flight(&mut gateway, &upstream, "crash-1", &order).await;
    let executed_before = upstream.calls_for("crash-1").await;
    assert_eq!(executed_before, 1);

    let retry = retry_after_lease(&gateway, "crash-1", &order).await;
    assert_problem(&retry, 409, "outcome-unknown");
    let record = gateway.record("orders", "crash-1").await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");
    let again = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "crash-1").json(&order)).await;
    assert_problem(&again, 409, "outcome-unknown");
    assert_eq!(upstream.calls_for("crash-1").await, executed_before, "nothing is executed again");
}

#[tokio::test]
async fn with_on_unknown_retry_a_request_of_a_killed_gateway_executes_again() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        lease = "1s"
        on_unknown = "retry"
    "#;
    let mut gateway = Gateway::start(&upstream.url(), config).await;
    let order = json!({ "amount": 13 });
    crash_mid_flight(&mut gateway, &upstream, "crash-2", &order).await;
    let executed_before = upstream.calls_for("crash-2").await;

    let retry = retry_after_lease(&gateway, "crash-2", &order).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(!retry.replayed(), "{retry:?}");
    assert_eq!(upstream.calls_for("crash-2").await, executed_before + 1);
    let replay = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "crash-2").json(&order)).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, retry.body);
    assert_eq!(upstream.calls_for("crash-2").await, executed_before + 1);
}

#[tokio::test]
async fn a_lease_is_renewed_while_the_upstream_call_runs() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        lease = "500ms"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let order = json!({ "amount": 14 });
    let slow = client().post(gateway.url("/orders")).header("Idempotency-Key", "long-1").header("X-Demo-Delay", "2s");
    let in_flight = tokio::spawn(send(slow.json(&order)));
    gateway.wait_for_status("orders", "long-1", "in_progress").await;

    // Three lease lengths pass: without renewal the claim would have run out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let duplicate = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "long-1").json(&order)).await;
    assert_problem(&duplicate, 409, "request-in-flight");

    let first = in_flight.await.expect("the request task");
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.replayed(), "{first:?}");
    let record = gateway.record("orders", "long-1").await.expect("a record");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(upstream.calls_for("long-1").await, 1);
}
