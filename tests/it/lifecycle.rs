//! Starting and stopping the gateway: graceful shutdown finishes in-flight work, and bad
//! input is refused at start with exit code 2 and a message naming what is wrong.

use serde_json::json;

use crate::support::{Gateway, Upstream, client, idem_log, send};

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_record_its_answer() {
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start(&upstream.url(), "").await;
    let request = client()
        .post(gateway.url("/orders"))
        .header("Idempotency-Key", "graceful")
        .header("X-Demo-Delay", "1s")
        .json(&json!({ "amount": 31 }));
    let in_flight = tokio::spawn(send(request));
    gateway.wait_for_status("default", "graceful", "in_progress").await;

    let exit = gateway.terminate().await;
    let reply = in_flight.await.expect("the request task");
    assert_eq!(reply.status, 201, "the in-flight client still gets its answer: {reply:?}");
    assert!(exit.success(), "a graceful stop exits 0: {exit}\n{}", gateway.logs());

    let shown = idem_log(gateway.store_url(), &["show", "--scope", "default", "--key", "graceful", "--json"]).json();
    assert_eq!(shown["status"], "completed", "{shown}");
    assert_eq!(shown["response"]["status"], 201, "{shown}");
    assert_eq!(upstream.calls_for("graceful").await, 1);
}

#[tokio::test]
async fn sigterm_waits_for_the_call_of_a_client_that_already_left() {
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start(&upstream.url(), "").await;
    let request = client()
        .post(gateway.url("/orders"))
        .header("Idempotency-Key", "orphan")
        .header("X-Demo-Delay", "1s")
        .json(&json!({ "amount": 32 }));
    let in_flight = tokio::spawn(send(request));
    gateway.wait_for_status("default", "orphan", "in_progress").await;
    in_flight.abort();
    assert!(in_flight.await.is_err_and(|e| e.is_cancelled()), "the client went away before its answer");

    let exit = gateway.terminate().await;
    assert!(exit.success(), "a graceful stop exits 0: {exit}\n{}", gateway.logs());
    let shown = idem_log(gateway.store_url(), &["show", "--scope", "default", "--key", "orphan", "--json"]).json();
    assert_eq!(shown["status"], "completed", "the detached call finished before exit: {shown}");
    assert_eq!(upstream.calls_for("orphan").await, 1);
}

#[tokio::test]
async fn a_malformed_config_exits_2_and_names_the_key_path() {
    let upstream = Upstream::start().await;
    let cases = [
        ("[[routes]]\nname = \"orders\"\nttl = \"24x\"\n", "routes[0].ttl"),
        ("[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nttll = \"1h\"\n", "ttll"),
        ("[[routes]]\nname = \"reads\"\nmethods = [\"GET\"]\n", "routes[0].methods[0]"),
        ("[[routes]]\nname = \"orders\"\nkey = { body = \"order_id\" }\n", "routes[0].key.body"),
        ("[[routes]]\nname = \"orders\"\nmax_body = \"1XB\"\n", "routes[0].max_body"),
        ("[[routes]]\nname = \"orders\"\nin_flight = \"queue\"\n", "routes[0].in_flight"),
    ];
    for (config, path) in cases {
        let (status, stderr) = Gateway::builder(&upstream.url(), config).expect_exit().await;
        assert_eq!(status.code(), Some(2), "config {config:?}: {stderr}");
        assert!(stderr.contains(path), "stderr names {path} for {config:?}: {stderr}");
    }
    let (status, stderr) = Gateway::builder(&upstream.url(), "[[routes]]\nttll = \"1h\"\n").expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("routes[0]"), "{stderr}");
    assert_eq!(upstream.calls().await, 0);
}

#[tokio::test]
async fn the_admin_api_refuses_a_public_address_without_a_token() {
    let upstream = Upstream::start().await;
    let (status, stderr) = Gateway::builder(&upstream.url(), "").admin_listen("0.0.0.0:0").expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("IDEM_ADMIN_TOKEN"), "the message says what to set: {stderr}");

    let gateway =
        Gateway::builder(&upstream.url(), "").admin_listen("0.0.0.0:0").env("IDEM_ADMIN_TOKEN", "s3cret").start().await;
    let healthz = send(client().get(gateway.admin("/healthz").replace("0.0.0.0", "127.0.0.1"))).await;
    assert_eq!(healthz.status, 200, "{healthz:?}");
}
