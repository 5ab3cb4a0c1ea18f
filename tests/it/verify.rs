//! Settling unknown outcomes by asking the destination (SPEC §4): a route, a runner step or
//! a consumer delivery with `verify = { … }` turns an `outcome_unknown` into `completed`
//! (the lookup found it: its answer replays with `Idempotent-Verified: true`) or releases it
//! (absent: the retry executes, once); a lookup that fails settles nothing. Real gateway
//! processes in front of the real demo upstream, whose `/_demo/lookup` searches what it
//! executed.

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, idem_log, postgres_store, send};

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

/// A verifier holds the route's `lease`, renewed while it asks, not the lookup's whole
/// budget: a reconciler killed in the middle of a slow lookup leaves a record that the next
/// one settles once that lease ran out.
#[tokio::test]
async fn a_reconciler_killed_mid_lookup_holds_the_record_no_longer_than_the_lease() {
    let upstream = Upstream::start().await;
    let slow = routes(&upstream, r#", headers = { "X-Demo-Delay" = "3s" }"#).replace(
        r#"upstream_timeout = "2s""#,
        r#"upstream_timeout = "10s"
        lease = "1s""#,
    );
    let mut gateway = Gateway::start(&upstream.url(), &slow).await;
    lose_answer(&gateway, "slow-1", "drop").await;
    gateway.kill9();
    gateway.restart().await;
    let verifying =
        gateway.wait_for_record("orders", "slow-1", "a verifier's lease", |r| r["status"] == "in_progress").await;
    let until = humantime::parse_rfc3339(verifying["locked_until"].as_str().expect("a lease")).expect("a time");
    let left = until.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(left <= std::time::Duration::from_secs(2), "the route's 1 s lease, not 2 × 10 s: {verifying}");
    let retry = send(post(&gateway, "slow-1")).await;
    assert_problem(&retry, 409, "request-in-flight");

    gateway.kill9();
    gateway.restart().await;
    let found = gateway.wait_for_status("orders", "slow-1", "completed").await;
    assert!(found["error_summary"].as_str().unwrap_or_default().starts_with("settled by lookup"), "{found}");
    assert_eq!(upstream.calls_for("slow-1").await, 1, "nothing was sent again");
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

/// `idem run` killed with `-9` while calls without an idempotency header are in flight:
/// today those are left for a person; with a lookup the re-run settles each by asking the
/// destination, sends nothing twice, carries the found ids to the next step, exits 0.
#[tokio::test]
async fn a_killed_run_settles_its_unknown_steps_by_lookup_and_sends_nothing_twice() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = format!("sqlite://{}", dir.path().join("idem.db").display());
    let url = upstream.url();
    let flow = format!(
        r#"flow = "f"
store = "{store}"
concurrency = 2
timeout = "1s"

[source]
jsonl = "data.jsonl"
primary_key = ["id"]

[[steps]]
name = "invoice"
url = "{url}/invoices"
body = {{ order = "{{{{record.id}}}}" }}
idempotency_header = ""
headers = {{ X-Demo-Delay = "300ms" }}
capture = {{ invoice_id = "/id" }}
verify = {{ url = "{url}/_demo/lookup?path=/invoices&order={{{{record.id}}}}", found = "/data/0", status = 201 }}

[[steps]]
name = "notify"
url = "{url}/notify"
body = {{ invoice = "{{{{steps.invoice.invoice_id}}}}" }}
"#
    );
    std::fs::write(dir.path().join("flow.toml"), flow).expect("flow written");
    let lines: Vec<String> = (1..=12).map(|i| format!(r#"{{"id": "o-{i}"}}"#)).collect();
    std::fs::write(dir.path().join("data.jsonl"), lines.join("\n") + "\n").expect("data written");
    let run = || {
        crate::support::idem()
            .arg("run")
            .arg("flow.toml")
            .args(["--report", "report.json"])
            .current_dir(dir.path())
            .output()
            .expect("idem run runs")
    };

    let mut child = crate::support::idem()
        .arg("run")
        .arg("flow.toml")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("idem run starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    // The demo counts a call when it executes it, then answers 300 ms later: killed now,
    // the calls it just executed are sent and never answered.
    while upstream.calls().await < 5 {
        assert!(std::time::Instant::now() < deadline, "the run made no progress");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    let cut_off = idem_log(&store, &["list", "--scope", "f:invoice", "--status", "in_progress", "--json"]).json();
    let cut_off: Vec<String> = cut_off["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["key"].as_str().expect("a key").to_owned())
        .collect();
    // A call the run had claimed may not have reached the demo yet: its lookup finds
    // nothing and the re-run sends it. The ones the demo executed are found.
    let lookup = |order: String| client().get(format!("{url}/_demo/lookup?path=/invoices&order={order}"));
    let mut executed = Vec::new();
    for key in &cut_off {
        if send(lookup(key.clone())).await.json()["data"].as_array().is_some_and(|d| d.len() == 1) {
            executed.push(key.clone());
        }
    }
    assert!(!executed.is_empty(), "calls were executed and unanswered when the run was killed: {cut_off:?}");

    let resumed = run();
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert_eq!(resumed.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(stdout.contains(&format!("settled by lookup: {}\n", executed.len())), "{executed:?}: {stdout}");
    for i in 1..=12 {
        let found = send(lookup(format!("o-{i}"))).await.json();
        assert_eq!(found["data"].as_array().map(Vec::len), Some(1), "o-{i} sent exactly once: {found}");
    }
    assert_eq!(upstream.stats().await["by_path"]["/notify"], 12, "every record went on to its next step");
    let report = std::fs::read_to_string(dir.path().join("report.json")).expect("a report");
    for key in &cut_off {
        let line: serde_json::Value = report
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
            .find(|l| l["key"] == key.as_str())
            .expect("a line");
        let expected = if executed.contains(key) { "verified" } else { "sent" };
        assert_eq!(line["steps"][0]["result"], expected, "{line}");
        let record = idem_log(&store, &["show", "--scope", "f:invoice", "--key", key, "--json"]).json();
        assert_eq!(record["status"], "completed", "{record}");
        let settled = record["error_summary"].as_str().unwrap_or_default().starts_with("settled by lookup");
        assert_eq!(settled, executed.contains(key), "{record}");
    }
    let again = run();
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stdout).contains("calls sent: 0\n"));
}

/// Two gateways on one PostgreSQL store, retries of one unknown outcome racing through both:
/// the record's lease lets one lookup run; every retry gets the found answer (or `409` while
/// the lookup runs), and nothing is sent again.
#[tokio::test]
async fn retries_racing_through_two_gateways_verify_once() {
    let store = postgres_store();
    let upstream = Upstream::start().await;
    let config = routes(&upstream, "");
    let a = Gateway::builder(&upstream.url(), &config).store(&store.url).start().await;
    let b = Gateway::builder(&upstream.url(), &config).store(&store.url).start().await;
    lose_answer(&a, "race-1", "drop").await;

    let gateways = [&a, &b];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let request = post(gateways[i % 2], "race-1");
            tokio::spawn(async move { send(request).await })
        })
        .collect();
    let mut answered = 0;
    for task in tasks {
        let reply = task.await.expect("a retry");
        match reply.status {
            201 => {
                assert_eq!(reply.header("idempotent-verified"), Some("true"), "{reply:?}");
                answered += 1;
            }
            _ => {
                assert_problem(&reply, 409, "request-in-flight");
            }
        }
    }
    assert!(answered > 0, "some retry got the found answer");
    assert_eq!(upstream.calls_for("race-1").await, 1, "nothing was sent again");
    let found = |text: String| text.parse::<u64>().unwrap_or(0);
    assert_eq!(found(verifications(&a, "found").await) + found(verifications(&b, "found").await), 1, "one lookup");
    for gateway in gateways {
        assert_eq!(verifications(gateway, "absent").await, "");
        assert_eq!(verifications(gateway, "failed").await, "");
    }
}
