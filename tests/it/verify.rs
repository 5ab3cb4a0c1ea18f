//! Settling unknown outcomes by asking the destination (SPEC §4): a route, a runner step or
//! a consumer delivery with `verify = { … }` turns an `outcome_unknown` into `completed`
//! (the lookup found it: its answer replays with `Idempotent-Verified: true`) or releases it
//! (absent: the retry executes, once); a lookup that fails settles nothing. Real gateway
//! processes in front of the real demo upstream, whose `/_demo/lookup` searches what it
//! executed.

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, idem_log, send};

/// One route whose unknown outcomes are settled by searching the demo upstream by key.
/// `extra` goes into the `verify` table.
fn routes(upstream: &Upstream, extra: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        upstream_timeout = "2s"
        verify = {{ url = "{}/_demo/lookup?idempotency_key={{{{key}}}}", found = "/data/0", status = 201{extra} }}
        "#,
        upstream.url()
    )
}

fn post(gateway: &Gateway, key: &str) -> reqwest::RequestBuilder {
    client().post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "amount": 42 }))
}

/// Sends `key` with a fault that leaves it `outcome_unknown` and checks it does.
async fn lose_answer(gateway: &Gateway, key: &str, fault: &str) {
    let lost = send(post(gateway, key).header("X-Demo-Fault", fault)).await;
    assert_problem(&lost, 502, "upstream-outcome-unknown");
    let record = gateway.record("orders", key).await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");
}

async fn verifications(gateway: &Gateway, result: &str) -> String {
    let text = send(client().get(gateway.admin("/metrics"))).await.text();
    let line = format!("idem_verifications_total{{scope=\"orders\",result=\"{result}\"}}");
    text.lines().find(|l| l.starts_with(&line)).map(|l| l[line.len()..].trim().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn a_retry_of_an_unknown_outcome_gets_the_answer_the_lookup_found() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &routes(&upstream, "")).await;
    // Executed, then the connection closed without an answer.
    lose_answer(&gateway, "found-1", "drop").await;
    assert_eq!(upstream.calls_for("found-1").await, 1);

    let retry = send(post(&gateway, "found-1")).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotent-verified"), Some("true"), "{retry:?}");
    let found = retry.json();
    assert_eq!(found["idempotency_key"], "found-1", "the answer is what the destination holds: {found}");
    assert_eq!(found["received"], json!({ "amount": 42 }));
    let replay = send(post(&gateway, "found-1")).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.header("idempotent-verified"), Some("true"), "{replay:?}");
    assert_eq!(replay.body, retry.body);
    assert_eq!(upstream.calls_for("found-1").await, 1, "nothing was sent twice");

    let record = gateway.record("orders", "found-1").await.expect("a record");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["attempt_count"], 1, "{record}");
    let summary = record["error_summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("settled by lookup at 20"), "the record says how it was settled: {record}");
    assert_eq!(verifications(&gateway, "found").await, "1");
}

#[tokio::test]
async fn an_absent_answer_releases_the_record_and_the_retry_executes_once() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &routes(&upstream, "")).await;
    // Reset as soon as the request head arrived: sent, yet never executed.
    lose_answer(&gateway, "absent-1", "reset").await;
    assert_eq!(upstream.calls_for("absent-1").await, 0);

    let retry = send(post(&gateway, "absent-1")).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(!retry.replayed() && retry.header("idempotent-verified").is_none(), "executed: {retry:?}");
    let replay = send(post(&gateway, "absent-1")).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, retry.body);
    assert_eq!(upstream.calls_for("absent-1").await, 1, "executed once");
    let record = gateway.record("orders", "absent-1").await.expect("a record");
    assert_eq!((record["status"].as_str(), record["attempt_count"].as_u64()), (Some("completed"), Some(2)));
    assert_eq!(verifications(&gateway, "absent").await, "1");
}

#[tokio::test]
async fn a_lookup_that_answers_500_leaves_the_record_unknown() {
    let upstream = Upstream::start().await;
    let failing = r#", headers = { "X-Demo-Status" = "500" }"#;
    let gateway = Gateway::start(&upstream.url(), &routes(&upstream, failing)).await;
    lose_answer(&gateway, "failing-1", "drop").await;

    for _ in 0..2 {
        let retry = send(post(&gateway, "failing-1")).await;
        assert_problem(&retry, 409, "outcome-unknown");
    }
    let record = gateway.record("orders", "failing-1").await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");
    let summary = record["error_summary"].as_str().unwrap_or_default();
    assert!(summary.contains("the lookup answered 500"), "{record}");
    assert_eq!(upstream.calls_for("failing-1").await, 1, "nothing was re-sent");
    assert_eq!(verifications(&gateway, "failed").await, "2");
}

#[tokio::test]
async fn a_lookup_that_is_not_a_read_is_bad_input() {
    let upstream = Upstream::start().await;
    for (method, says) in [("DELETE", "not a read"), ("POST", "read_only = true")] {
        let config = routes(&upstream, &format!(r#", method = "{method}""#));
        let (status, stderr) = Gateway::builder(&upstream.url(), &config).expect_exit().await;
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("routes[0].verify.method") && stderr.contains(says), "{stderr}");
    }
    let search = routes(&upstream, r#", method = "POST", read_only = true"#);
    let _gateway = Gateway::start(&upstream.url(), &search).await;
}

#[tokio::test]
async fn the_reconciler_settles_unknown_outcomes_nobody_retried() {
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start(&upstream.url(), &routes(&upstream, "")).await;
    lose_answer(&gateway, "quiet-1", "drop").await;
    lose_answer(&gateway, "quiet-2", "reset").await;
    // A gateway scans its store for unknown outcomes when it starts.
    gateway.kill9();
    gateway.restart().await;
    let found = gateway.wait_for_status("orders", "quiet-1", "completed").await;
    assert!(found["error_summary"].as_str().unwrap_or_default().starts_with("settled by lookup"), "{found}");
    let released = gateway.wait_for_status("orders", "quiet-2", "failed_retryable").await;
    assert!(released["error_summary"].as_str().unwrap_or_default().contains("the lookup found nothing"), "{released}");
    assert_eq!((upstream.calls_for("quiet-1").await, upstream.calls_for("quiet-2").await), (1, 0));

    let replay = send(post(&gateway, "quiet-1")).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.header("idempotent-verified"), Some("true"));
    let executed = send(post(&gateway, "quiet-2")).await;
    assert_eq!((executed.status, executed.replayed()), (201, false), "{executed:?}");
    assert_eq!((upstream.calls_for("quiet-1").await, upstream.calls_for("quiet-2").await), (1, 1));
}

#[tokio::test]
async fn operators_run_a_lookup_on_demand_through_the_admin_api() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &routes(&upstream, "")).await;
    lose_answer(&gateway, "admin-1", "drop").await;

    let verified = send(client().post(gateway.admin("/v1/records/orders/admin-1/verify"))).await;
    assert_eq!(verified.status, 200, "{verified:?}");
    let verified = verified.json();
    assert_eq!(verified["result"], "found", "{verified}");
    assert_eq!(verified["record"]["status"], "completed", "{verified}");
    assert!(verified["record"]["error_summary"].as_str().unwrap_or_default().starts_with("settled by lookup"));
    let again = send(client().post(gateway.admin("/v1/records/orders/admin-1/verify"))).await;
    assert_problem(&again, 409, "record-not-unknown");
    let missing = send(client().post(gateway.admin("/v1/records/orders/nobody/verify"))).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    let replay = send(post(&gateway, "admin-1")).await;
    assert!(replay.replayed() && replay.header("idempotent-verified") == Some("true"), "{replay:?}");
    assert_eq!(upstream.calls_for("admin-1").await, 1);
}

#[tokio::test]
async fn idem_log_verify_settles_a_scope_from_the_config_file() {
    let upstream = Upstream::start().await;
    let config = routes(&upstream, "");
    let gateway = Gateway::start(&upstream.url(), &config).await;
    lose_answer(&gateway, "cli-1", "drop").await;
    lose_answer(&gateway, "cli-2", "reset").await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("idem.toml");
    std::fs::write(&file, &config).expect("written");
    let file = file.display().to_string();

    let one =
        idem_log(gateway.store_url(), &["verify", "--config", &file, "--scope", "orders", "--key", "cli-1", "--json"]);
    assert_eq!(one.json()["verified"][0]["result"], "found", "{one:?}");
    let rest = idem_log(gateway.store_url(), &["verify", "--config", &file, "--scope", "orders", "--json"]);
    let rest = rest.json();
    assert_eq!(rest["verified"].as_array().map(Vec::len), Some(1), "only the unknown one is left: {rest}");
    assert_eq!(
        (rest["verified"][0]["key"].as_str(), rest["verified"][0]["result"].as_str()),
        (Some("cli-2"), Some("absent"))
    );
    assert_eq!(gateway.record("orders", "cli-1").await.expect("a record")["status"], "completed");
    assert_eq!(gateway.record("orders", "cli-2").await.expect("a record")["status"], "failed_retryable");

    std::fs::write(dir.path().join("bad.toml"), routes(&upstream, r#", method = "PUT""#)).expect("written");
    let bad = dir.path().join("bad.toml").display().to_string();
    let refused = idem_log(gateway.store_url(), &["verify", "--config", &bad, "--scope", "orders"]);
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("routes[0].verify.method"), "{refused:?}");
}
