//! The admin API (SPEC §4): list, show, forget and resolve records, purge, stats,
//! metrics, probes, and the bearer token that guards `/v1`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Gateway, Upstream, assert_problem, client, encode, send};

fn order(http: &reqwest::Client, gateway: &Gateway, key: &str) -> reqwest::RequestBuilder {
    http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "amount": 1 }))
}

fn keys(listed: &Value) -> Vec<&str> {
    listed["records"].as_array().expect("records").iter().map(|r| r["key"].as_str().expect("a key")).collect()
}

#[tokio::test]
async fn records_can_be_listed_shown_and_forgotten() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    assert_eq!(send(order(&http, &gateway, "list-1")).await.status, 201);
    assert_eq!(send(order(&http, &gateway, "list-2")).await.status, 201);
    let failed = send(order(&http, &gateway, "other-3").header("X-Demo-Status", "503")).await;
    assert_eq!(failed.status, 503);

    let all = send(http.get(gateway.admin("/v1/records"))).await.json();
    assert_eq!(keys(&all), ["other-3", "list-2", "list-1"], "newest first: {all}");
    let completed = send(http.get(gateway.admin("/v1/records?scope=default&status=completed"))).await.json();
    assert_eq!(keys(&completed), ["list-2", "list-1"], "{completed}");
    let failed = send(http.get(gateway.admin("/v1/records?status=failed_retryable"))).await.json();
    assert_eq!(keys(&failed), ["other-3"], "{failed}");
    let prefixed = send(http.get(gateway.admin("/v1/records?key_prefix=list-&tenant="))).await.json();
    assert_eq!(keys(&prefixed), ["list-2", "list-1"], "{prefixed}");
    let bad = send(http.get(gateway.admin("/v1/records?status=done"))).await;
    assert_eq!(bad.status, 400, "{bad:?}");

    let page1 = send(http.get(gateway.admin("/v1/records?key_prefix=list-&limit=1"))).await.json();
    assert_eq!(keys(&page1), ["list-2"], "{page1}");
    let cursor = page1["next_cursor"].as_str().expect("a cursor to the next page");
    let page2 =
        send(http.get(gateway.admin(&format!("/v1/records?key_prefix=list-&limit=1&cursor={}", encode(cursor)))))
            .await
            .json();
    assert_eq!(keys(&page2), ["list-1"], "{page2}");

    let shown = gateway.record("default", "list-1").await.expect("a record");
    assert_eq!(shown["scope"], "default");
    assert_eq!(shown["tenant"], "");
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["attempt_count"], 1);
    assert_eq!(shown["response"]["status"], 201);
    assert_eq!(serde_json::from_str::<Value>(shown["response"]["body"].as_str().expect("a body")).unwrap()["call"], 1);

    let forgotten = send(http.delete(gateway.admin("/v1/records/default/list-1"))).await;
    assert_eq!(forgotten.status, 204, "{forgotten:?}");
    assert!(gateway.record("default", "list-1").await.is_none());
    let again = send(http.delete(gateway.admin("/v1/records/default/list-1"))).await;
    assert_eq!(again.status, 404, "{again:?}");
    let resent = send(order(&http, &gateway, "list-1")).await;
    assert_eq!(resent.status, 201, "{resent:?}");
    assert!(!resent.replayed(), "a forgotten key executes again: {resent:?}");
    assert_eq!(upstream.calls_for("list-1").await, 2);
}

#[tokio::test]
async fn an_unknown_outcome_is_settled_by_release_or_complete() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    for key in ["released", "completed"] {
        let lost = send(order(&http, &gateway, key).header("X-Demo-Fault", "drop")).await;
        assert_problem(&lost, 502, "upstream-outcome-unknown");
        gateway.wait_for_status("default", key, "outcome_unknown").await;
    }

    let resolve =
        |key: &str, body: Value| http.post(gateway.admin(&format!("/v1/records/default/{key}/resolve"))).json(&body);
    let released = send(resolve("released", json!({ "action": "release" }))).await;
    assert_eq!(released.status, 200, "{released:?}");
    let executed = send(order(&http, &gateway, "released")).await;
    assert_eq!(executed.status, 201, "{executed:?}");
    assert!(!executed.replayed(), "a released key executes again: {executed:?}");
    assert_eq!(upstream.calls_for("released").await, 2);

    let settled = resolve(
        "completed",
        json!({ "action": "complete", "status": 201, "headers": { "X-Settled": "by-hand" }, "body": { "id": "manual-1" } }),
    );
    let settled = send(settled).await;
    assert_eq!(settled.status, 200, "{settled:?}");
    assert_eq!(settled.json()["status"], "completed", "{settled:?}");
    let replayed = send(order(&http, &gateway, "completed")).await;
    assert_eq!(replayed.status, 201, "{replayed:?}");
    assert!(replayed.replayed(), "{replayed:?}");
    assert_eq!(replayed.header("x-settled"), Some("by-hand"), "{replayed:?}");
    assert_eq!(replayed.json(), json!({ "id": "manual-1" }));
    assert_eq!(upstream.calls_for("completed").await, 1, "a completed resolution executes nothing");

    let not_unknown = send(resolve("completed", json!({ "action": "release" }))).await;
    assert_eq!(not_unknown.status, 409, "only an unknown outcome is resolved: {not_unknown:?}");
    let missing = send(resolve("nobody", json!({ "action": "release" }))).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    let nonsense = send(resolve("released", json!({ "action": "shrug" }))).await;
    assert_eq!(nonsense.status, 400, "{nonsense:?}");
}

#[tokio::test]
async fn stats_count_records_and_purge_removes_the_expired() {
    let upstream = Upstream::start().await;
    let config = r#"
        purge_interval = "1h"

        [[routes]]
        name = "brief"
        path = "/brief"
        ttl = "1s"

        [[routes]]
        name = "orders"
        path = "/orders"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    for key in ["b-1", "b-2"] {
        let reply = send(http.post(gateway.url("/brief")).header("Idempotency-Key", key).json(&json!({}))).await;
        assert_eq!(reply.status, 201, "{reply:?}");
    }
    assert_eq!(send(order(&http, &gateway, "o-1")).await.status, 201);
    assert_eq!(send(order(&http, &gateway, "o-2").header("X-Demo-Status", "503")).await.status, 503);

    let stats = send(http.get(gateway.admin("/v1/stats"))).await.json();
    assert_eq!(stats["total"], 4, "{stats}");
    assert_eq!(stats["scopes"]["brief"]["completed"], 2, "{stats}");
    assert_eq!(stats["scopes"]["orders"]["completed"], 1, "{stats}");
    assert_eq!(stats["scopes"]["orders"]["failed_retryable"], 1, "{stats}");

    // The ttl must run out: nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let purged = send(http.post(gateway.admin("/v1/purge"))).await;
    assert_eq!(purged.status, 200, "{purged:?}");
    assert_eq!(purged.json()["purged"], 2, "{purged:?}");
    let stats = send(http.get(gateway.admin("/v1/stats"))).await.json();
    assert_eq!(stats["total"], 2, "{stats}");
    assert!(stats["scopes"].get("brief").is_none(), "{stats}");
    assert!(gateway.record("brief", "b-1").await.is_none());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_decision() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    assert_eq!(send(order(&http, &gateway, "m-1")).await.status, 201);
    assert!(send(order(&http, &gateway, "m-1")).await.replayed());
    assert!(send(order(&http, &gateway, "m-1")).await.replayed());
    let reused = http.post(gateway.url("/orders")).header("Idempotency-Key", "m-1").json(&json!({ "amount": 2 }));
    assert_eq!(send(reused).await.status, 422);
    assert_eq!(send(order(&http, &gateway, "m-2").header("X-Demo-Status", "503")).await.status, 503);
    assert_eq!(send(order(&http, &gateway, "m-2")).await.status, 201);
    assert_eq!(send(http.get(gateway.admin("/v1/stats"))).await.status, 200);

    let metrics = send(http.get(gateway.admin("/metrics"))).await;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let text = metrics.text();
    for line in [
        r#"idem_requests_total{route="orders",decision="executed"} 3"#,
        r#"idem_requests_total{route="orders",decision="replayed"} 2"#,
        r#"idem_requests_total{route="orders",decision="key_reused"} 1"#,
        r#"idem_retry_recoveries_total{route="orders"} 1"#,
        r#"idem_records{status="completed"} 2"#,
        r#"idem_records{status="failed_retryable"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("idem_upstream_seconds"), "{text}");
    assert!(text.contains("idem_store_seconds"), "{text}");
    assert!(!text.contains("m-1"), "metrics never carry keys:\n{text}");

    // The same counters as JSON, for the Idempotency Log page.
    let counters = send(http.get(gateway.admin("/v1/decisions"))).await.json();
    let count = |list: &str, decision: Option<&str>| -> u64 {
        let entries = counters[list].as_array().expect("a list").iter();
        let ours = entries.filter(|e| e["route"] == "orders" && decision.is_none_or(|d| e["decision"] == d));
        ours.map(|e| e["count"].as_u64().expect("a count")).sum()
    };
    assert_eq!(count("requests", Some("executed")), 3, "{counters}");
    assert_eq!(count("requests", Some("replayed")), 2, "{counters}");
    assert_eq!(count("requests", Some("key_reused")), 1, "{counters}");
    assert_eq!(count("retry_recoveries", None), 1, "{counters}");
    assert_eq!(counters["messages"], json!([]), "{counters}");
}

#[tokio::test]
async fn a_configured_token_guards_v1_but_not_the_probes() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), "").env("IDEM_ADMIN_TOKEN", "s3cret-token").start().await;
    let http = client();

    let anonymous = send(http.get(gateway.admin("/v1/records"))).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"), "{anonymous:?}");
    let wrong = send(http.get(gateway.admin("/v1/stats")).bearer_auth("guess")).await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let forget = send(http.delete(gateway.admin("/v1/records/default/x"))).await;
    assert_eq!(forget.status, 401, "{forget:?}");
    let right = send(http.get(gateway.admin("/v1/records")).bearer_auth("s3cret-token")).await;
    assert_eq!(right.status, 200, "{right:?}");
    for probe in ["/metrics", "/healthz", "/readyz"] {
        let open = send(http.get(gateway.admin(probe))).await;
        assert_eq!(open.status, 200, "{probe} stays open: {open:?}");
    }
}

#[tokio::test]
async fn the_token_can_come_from_a_variable_the_config_names() {
    let upstream = Upstream::start().await;
    let config = r#"
        [admin]
        token_env = "ORDERS_ADMIN_TOKEN"
    "#;
    let gateway = Gateway::builder(&upstream.url(), config).env("ORDERS_ADMIN_TOKEN", "other-token").start().await;
    let http = client();
    assert_eq!(send(http.get(gateway.admin("/v1/stats"))).await.status, 401);
    assert_eq!(send(http.get(gateway.admin("/v1/stats")).bearer_auth("other-token")).await.status, 200);
}

#[tokio::test]
async fn keys_with_url_reserved_characters_are_addressable() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let key = "a/b?c#d%e&f+g";
    assert_eq!(send(order(&http, &gateway, key)).await.status, 201);

    let shown = gateway.record("default", key).await.expect("the record, by its URL-encoded key");
    assert_eq!(shown["key"], key, "{shown}");
    let forgotten = send(http.delete(gateway.admin(&format!("/v1/records/default/{}", encode(key))))).await;
    assert_eq!(forgotten.status, 204, "{forgotten:?}");
    assert!(!send(order(&http, &gateway, key)).await.replayed(), "a forgotten key executes again");
    assert_eq!(upstream.calls_for(key).await, 2);
}

#[tokio::test]
async fn expired_records_are_purged_in_the_background() {
    let upstream = Upstream::start().await;
    let config = r#"
        purge_interval = "200ms"

        [[routes]]
        name = "brief"
        path = "/brief"
        ttl = "1s"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let reply = send(http.post(gateway.url("/brief")).header("Idempotency-Key", "bg-1").json(&json!({}))).await;
    assert_eq!(reply.status, 201, "{reply:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gateway.record("brief", "bg-1").await.is_some() {
        assert!(std::time::Instant::now() < deadline, "the expired record was never purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = send(http.get(gateway.admin("/v1/stats"))).await.json();
    assert_eq!(stats["total"], 0, "{stats}");
}
