//! `idem log` (SPEC §4): the admin operations on the command line, against the gateway's
//! SQLite file, with the gateway running and without it.

use std::time::Duration;

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, idem_log, send};

fn keys(listed: &serde_json::Value) -> Vec<&str> {
    listed["records"].as_array().expect("records").iter().map(|r| r["key"].as_str().expect("a key")).collect()
}

#[tokio::test]
async fn idem_log_lists_shows_forgets_and_resolves_records() {
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let order = |key: &str| http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "a": 1 }));
    assert_eq!(send(order("done-1")).await.status, 201);
    assert_problem(&send(order("lost-1").header("X-Demo-Fault", "drop")).await, 502, "upstream-outcome-unknown");
    let store = gateway.store_url().to_owned();

    // While the gateway runs.
    let listed = idem_log(&store, &["list", "--json"]).json();
    assert_eq!(keys(&listed), ["lost-1", "done-1"], "{listed}");
    let unknown = idem_log(&store, &["list", "--status", "outcome_unknown", "--json"]).json();
    assert_eq!(keys(&unknown), ["lost-1"], "{unknown}");
    let shown = idem_log(&store, &["show", "--scope", "default", "--key", "done-1", "--json"]).json();
    assert_eq!(shown["status"], "completed", "{shown}");
    assert_eq!(shown["response"]["status"], 201, "{shown}");
    let table = idem_log(&store, &["list"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(table.stdout.contains("done-1") && table.stdout.contains("outcome_unknown"), "{table:?}");

    let removed = idem_log(&store, &["rm", "--scope", "default", "--key", "done-1"]);
    assert_eq!(removed.code, Some(0), "{removed:?}");
    let gone = idem_log(&store, &["show", "--scope", "default", "--key", "done-1"]);
    assert_eq!(gone.code, Some(1), "a missing record exits 1: {gone:?}");
    let resent = send(order("done-1")).await;
    assert!(!resent.replayed(), "a forgotten key executes again: {resent:?}");
    assert_eq!(upstream.calls_for("done-1").await, 2);

    // Without a gateway.
    assert!(gateway.terminate().await.success());
    let resolve = [
        "resolve",
        "--scope",
        "default",
        "--key",
        "lost-1",
        "--action",
        "complete",
        "--status",
        "201",
        "--header",
        "X-Settled: cli",
        "--body",
        r#"{"id":"by-cli"}"#,
        "--json",
    ];
    let resolved = idem_log(&store, &resolve).json();
    assert_eq!(resolved["status"], "completed", "{resolved}");
    let again = idem_log(&store, &["resolve", "--scope", "default", "--key", "lost-1", "--action", "release"]);
    assert_eq!(again.code, Some(1), "a completed record cannot be resolved: {again:?}");
    let stats = idem_log(&store, &["stats", "--json"]).json();
    assert_eq!(stats["total"], 2, "{stats}");
    assert_eq!(stats["scopes"]["default"]["completed"], 2, "{stats}");

    gateway.restart().await;
    let replay =
        send(client().post(gateway.url("/orders")).header("Idempotency-Key", "lost-1").json(&json!({ "a": 1 }))).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.header("x-settled"), Some("cli"), "{replay:?}");
    assert_eq!(replay.json(), json!({ "id": "by-cli" }));
    assert_eq!(upstream.calls_for("lost-1").await, 1);
}

#[tokio::test]
async fn idem_log_purge_removes_expired_records() {
    let upstream = Upstream::start().await;
    let config = r#"
        purge_interval = "1h"

        [[routes]]
        name = "brief"
        path = "/brief"
        ttl = "1s"
    "#;
    let mut gateway = Gateway::start(&upstream.url(), config).await;
    let reply = send(client().post(gateway.url("/brief")).header("Idempotency-Key", "p-1").json(&json!({}))).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert!(gateway.terminate().await.success());
    let store = gateway.store_url().to_owned();

    assert_eq!(idem_log(&store, &["purge", "--json"]).json(), json!({ "purged": 0 }));
    // The ttl must run out: nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(idem_log(&store, &["purge", "--json"]).json(), json!({ "purged": 1 }));
    assert_eq!(keys(&idem_log(&store, &["list", "--json"]).json()), Vec::<&str>::new());
}

#[tokio::test]
async fn idem_log_refuses_a_bad_store_url_with_exit_2() {
    let run = idem_log("mysql://nowhere", &["list"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("mysql://nowhere"), "{run:?}");
}
