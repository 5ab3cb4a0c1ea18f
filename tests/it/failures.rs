//! When the upstream fails: not reached (safe to retry), reached but never answered
//! (ambiguous: `outcome_unknown`, never silently re-executed), and answers too large to
//! keep (delivered once, then `410`).

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, closed_port_url, send};

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_the_retry_executes_once_it_is_back() {
    let mut gateway = Gateway::start(&closed_port_url(), "").await;
    let http = client();
    let order = json!({ "amount": 5 });

    let refused = send(gateway_post(&http, &gateway, "down-1", &order)).await;
    assert_problem(&refused, 502, "upstream-unavailable");
    let record = gateway.record("default", "down-1").await.expect("a record");
    assert_eq!(record["status"], "failed_retryable", "nothing was sent, so retrying is safe: {record}");

    let upstream = Upstream::start().await;
    gateway.kill9();
    gateway.restart_with_upstream(&upstream.url()).await;
    let executed = send(gateway_post(&http, &gateway, "down-1", &order)).await;
    assert_eq!(executed.status, 201, "{executed:?}");
    assert!(!executed.replayed(), "{executed:?}");
    let replayed = send(gateway_post(&http, &gateway, "down-1", &order)).await;
    assert!(replayed.replayed(), "{replayed:?}");
    assert_eq!(replayed.body, executed.body);
    assert_eq!(upstream.calls_for("down-1").await, 1);
}

fn gateway_post(
    http: &reqwest::Client,
    gateway: &Gateway,
    key: &str,
    body: &serde_json::Value,
) -> reqwest::RequestBuilder {
    http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(body)
}

#[tokio::test]
async fn a_connection_dropped_after_sending_is_an_unknown_outcome() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let order = json!({ "amount": 6 });

    let dropped = send(gateway_post(&http, &gateway, "lost-1", &order).header("X-Demo-Fault", "drop")).await;
    assert_problem(&dropped, 502, "upstream-outcome-unknown");
    let record = gateway.record("default", "lost-1").await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");
    assert!(record["error_summary"].as_str().is_some_and(|s| !s.is_empty()), "{record}");

    let retry = send(gateway_post(&http, &gateway, "lost-1", &order)).await;
    assert_problem(&retry, 409, "outcome-unknown");
    assert_eq!(upstream.calls_for("lost-1").await, 1, "the ambiguous call is never re-executed");
}

#[tokio::test]
async fn an_upstream_timeout_is_504_and_an_unknown_outcome() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        upstream_timeout = "500ms"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let order = json!({ "amount": 7 });

    // The upstream executes at once and answers after 10 s: the write happened, the
    // answer is lost, and the gateway must not execute it again.
    let slow = send(gateway_post(&http, &gateway, "slow-1", &order).header("X-Demo-Delay", "10s")).await;
    assert_problem(&slow, 504, "upstream-timeout");
    let record = gateway.record("orders", "slow-1").await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");

    let retry = send(gateway_post(&http, &gateway, "slow-1", &order)).await;
    assert_problem(&retry, 409, "outcome-unknown");
    assert_eq!(upstream.calls_for("slow-1").await, 1, "the retry did not execute");
}

#[tokio::test]
async fn an_answer_too_large_to_keep_is_delivered_once_then_410() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        max_stored_response = "1KiB"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let order = json!({ "amount": 8 });

    let first = send(gateway_post(&http, &gateway, "big-1", &order).header("X-Demo-Size", "4096")).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.json()["padding"].as_str().map(str::len), Some(4096), "the client gets the whole answer");

    let retry = send(gateway_post(&http, &gateway, "big-1", &order).header("X-Demo-Size", "4096")).await;
    assert_problem(&retry, 410, "response-not-retained");
    assert_eq!(upstream.calls_for("big-1").await, 1);
    let record = gateway.record("orders", "big-1").await.expect("a record");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["response"]["retained"], false, "{record}");

    // A small answer on the same route is kept.
    let small = send(gateway_post(&http, &gateway, "small-1", &order)).await;
    assert_eq!(small.status, 201);
    assert!(send(gateway_post(&http, &gateway, "small-1", &order)).await.replayed());
}

#[tokio::test]
async fn a_store_that_cannot_be_written_fails_closed_with_503() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let order = json!({ "amount": 9 });

    // Another writer holds the SQLite file's write lock until the gateway gives up.
    let path = gateway.store_url().strip_prefix("sqlite://").expect("a SQLite store");
    let lock = rusqlite::Connection::open(path).expect("the store file opens");
    lock.execute_batch("BEGIN IMMEDIATE").expect("the write lock is taken");
    let refused = send(gateway_post(&http, &gateway, "locked-1", &order)).await;
    assert_problem(&refused, 503, "store-unavailable");
    let retry_after: u64 = refused.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!(retry_after >= 1, "{refused:?}");
    assert_eq!(upstream.calls().await, 0, "nothing is forwarded without a claim");

    lock.execute_batch("ROLLBACK").expect("the write lock is released");
    drop(lock);
    let executed = send(gateway_post(&http, &gateway, "locked-1", &order)).await;
    assert_eq!(executed.status, 201, "{executed:?}");
    assert!(!executed.replayed(), "{executed:?}");
    assert_eq!(upstream.calls_for("locked-1").await, 1);
}

#[tokio::test]
async fn with_on_unknown_retry_a_dropped_call_executes_again() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        on_unknown = "retry"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let order = json!({ "amount": 10 });

    let dropped = send(gateway_post(&http, &gateway, "lost-2", &order).header("X-Demo-Fault", "drop")).await;
    assert_problem(&dropped, 502, "upstream-outcome-unknown");
    let retry = send(gateway_post(&http, &gateway, "lost-2", &order)).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(!retry.replayed(), "{retry:?}");
    assert!(send(gateway_post(&http, &gateway, "lost-2", &order)).await.replayed());
    assert_eq!(upstream.calls_for("lost-2").await, 2);
}
