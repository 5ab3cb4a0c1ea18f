//! Several gateways on one shared store (PostgreSQL, Redis): duplicates raced through
//! different gateways execute once, a record written through one replays through the
//! other, a gateway killed mid-flight is reported `outcome_unknown` by the survivor, and
//! a store outage fails closed and recovers without a restart (SPEC §1, §4; issue 3).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    Gateway, Relay, Upstream, assert_problem, client, idem_log, postgres_store, redis_store, send, service_address,
};

const ROUTES: &str = r#"
    [[routes]]
    name = "orders"
    path = "/orders"
    lease = "1s"
"#;

async fn two_gateways(upstream: &Upstream, store: &str) -> (Gateway, Gateway) {
    let a = Gateway::builder(&upstream.url(), ROUTES).store(store).start().await;
    let b = Gateway::builder(&upstream.url(), ROUTES).store(store).start().await;
    (a, b)
}

async fn duplicates_raced_through_two_gateways_execute_once(store: String) {
    let upstream = Upstream::start().await;
    let (a, b) = two_gateways(&upstream, &store).await;
    let order = json!({ "amount": 21 });
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let url = if i % 2 == 0 { a.url("/orders") } else { b.url("/orders") };
        let request = client().post(url).header("Idempotency-Key", "race-1").header("X-Demo-Delay", "1s").json(&order);
        set.spawn(send(request));
    }
    let mut executed = 0;
    while let Some(reply) = set.join_next().await {
        let reply = reply.expect("a request task");
        match reply.status {
            201 => executed += 1,
            409 => {
                assert_problem(&reply, 409, "request-in-flight");
            }
            _ => panic!("unexpected answer {reply:?}"),
        }
    }
    assert_eq!(executed, 1, "exactly one of the raced duplicates executes");
    assert_eq!(upstream.calls_for("race-1").await, 1);
    for gateway in [&a, &b] {
        let replay = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "race-1").json(&order)).await;
        assert!(replay.replayed(), "{replay:?}");
    }
    assert_eq!(upstream.calls_for("race-1").await, 1);
}

async fn a_record_written_through_one_gateway_replays_through_the_other(store: String) {
    let upstream = Upstream::start().await;
    let (a, b) = two_gateways(&upstream, &store).await;
    let order = json!({ "amount": 22 });
    let first = send(client().post(a.url("/orders")).header("Idempotency-Key", "cross-1").json(&order)).await;
    assert_eq!(first.status, 201, "{first:?}");
    let second = send(client().post(b.url("/orders")).header("Idempotency-Key", "cross-1").json(&order)).await;
    assert!(second.replayed(), "{second:?}");
    assert_eq!(second.body, first.body);
    let reused =
        send(client().post(b.url("/orders")).header("Idempotency-Key", "cross-1").json(&json!({ "amount": 1 }))).await;
    assert_problem(&reused, 422, "idempotency-key-reused");
    assert_eq!(upstream.calls_for("cross-1").await, 1);

    // idem log and the admin API read the same shared store.
    let listed = idem_log(&store, &["list", "--scope", "orders", "--json"]).json();
    let keys: Vec<&str> =
        listed["records"].as_array().expect("records").iter().filter_map(|r| r["key"].as_str()).collect();
    assert_eq!(keys, vec!["cross-1"]);
    let record = b.record("orders", "cross-1").await.expect("the record, through the other gateway's admin API");
    assert_eq!(record["status"], "completed");
}

async fn a_gateway_killed_mid_flight_is_reported_unknown_by_the_other(store: String) {
    let upstream = Upstream::start().await;
    let (mut a, b) = two_gateways(&upstream, &store).await;
    let order = json!({ "amount": 23 });
    let slow = client().post(a.url("/orders")).header("Idempotency-Key", "crash-1").header("X-Demo-Delay", "5s");
    let in_flight = tokio::spawn(slow.json(&order).send());
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.calls_for("crash-1").await == 0 {
        assert!(Instant::now() < deadline, "the upstream never received the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill9();
    assert!(in_flight.await.expect("the request task").is_err(), "the killed gateway's client gets no answer");

    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let reply = send(client().post(b.url("/orders")).header("Idempotency-Key", "crash-1").json(&order)).await;
        if !(reply.status == 409 && reply.json()["type"] == "request-in-flight") {
            break reply;
        }
        assert!(Instant::now() < deadline, "the dead gateway's lease never ran out: {reply:?}");
        // The 1 s lease must run out: nothing to await but the clock.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_problem(&answer, 409, "outcome-unknown");
    let record = b.record("orders", "crash-1").await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");
    assert_eq!(upstream.calls_for("crash-1").await, 1, "nothing executed twice");
}

async fn a_store_outage_fails_closed_and_recovers(store: String) {
    let relay = Relay::start(&service_address(&store)).await;
    let through_relay = store.replacen(&service_address(&store), &relay.address(), 1);
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), ROUTES).store(&through_relay).start().await;
    let order = json!({ "amount": 24 });
    let before = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "before").json(&order)).await;
    assert_eq!(before.status, 201, "{before:?}");

    relay.cut();
    let refused = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "outage-1").json(&order)).await;
    assert_problem(&refused, 503, "store-unavailable");
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    assert_eq!(upstream.calls_for("outage-1").await, 0, "nothing is forwarded while the store is down");

    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    let recovered = loop {
        let reply =
            send(client().post(gateway.url("/orders")).header("Idempotency-Key", "outage-1").json(&order)).await;
        if reply.status != 503 {
            break reply;
        }
        assert!(Instant::now() < deadline, "the gateway never recovered: {reply:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(recovered.status, 201, "{recovered:?}");
    assert_eq!(upstream.calls_for("outage-1").await, 1);
    let replay = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "before").json(&order)).await;
    assert!(replay.replayed(), "records written before the outage are still there: {replay:?}");
}

macro_rules! shared_store_tests {
    ($backend:ident, $store:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn duplicates_raced_through_two_gateways_execute_once() {
                let store = $store;
                super::duplicates_raced_through_two_gateways_execute_once(store.url.clone()).await;
            }

            #[tokio::test]
            async fn a_record_written_through_one_gateway_replays_through_the_other() {
                let store = $store;
                super::a_record_written_through_one_gateway_replays_through_the_other(store.url.clone()).await;
            }

            #[tokio::test]
            async fn a_gateway_killed_mid_flight_is_reported_unknown_by_the_other() {
                let store = $store;
                super::a_gateway_killed_mid_flight_is_reported_unknown_by_the_other(store.url.clone()).await;
            }

            #[tokio::test]
            async fn a_store_outage_fails_closed_and_recovers() {
                let store = $store;
                super::a_store_outage_fails_closed_and_recovers(store.url.clone()).await;
            }
        }
    };
}

shared_store_tests!(postgres, postgres_store());
shared_store_tests!(redis, redis_store());
