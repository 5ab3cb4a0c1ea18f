//! OData Repeatable Requests v1.0 (SPEC §4): `Repeatability-*` headers on a gateway with
//! `odata = true`.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, send};

const CONFIG: &str = r#"
    odata = true

    [[routes]]
    name = "orders"
    path = "/odata/**"
    ttl = "1h"
"#;

fn http_date(at: SystemTime) -> String {
    httpdate::fmt_http_date(at)
}

fn repeatable(http: &reqwest::Client, gateway: &Gateway, id: &str, first_sent: &str) -> reqwest::RequestBuilder {
    http.post(gateway.url("/odata/Orders"))
        .header("Repeatability-Request-ID", id)
        .header("Repeatability-First-Sent", first_sent)
        .json(&json!({ "Amount": 10 }))
}

#[track_caller]
fn assert_rejected(reply: &crate::support::Reply, status: u16) {
    assert_problem(reply, status, "repeatability-rejected");
    assert_eq!(reply.header("repeatability-result"), Some("rejected"), "{reply:?}");
}

#[tokio::test]
async fn a_repeatable_request_is_accepted_then_replayed() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), CONFIG).await;
    let http = client();
    let sent = http_date(SystemTime::now());

    let first = send(repeatable(&http, &gateway, "rr-1", &sent)).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.header("repeatability-result"), Some("accepted"), "{first:?}");
    assert!(!first.replayed(), "{first:?}");
    let again = send(repeatable(&http, &gateway, "rr-1", &sent)).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(again.header("repeatability-result"), Some("accepted"), "{again:?}");
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(upstream.calls_for("rr-1").await, 1);
}

#[tokio::test]
async fn half_a_repeatability_pair_is_rejected() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), CONFIG).await;
    let http = client();
    let body = json!({ "Amount": 10 });

    let id_only = send(http.post(gateway.url("/odata/Orders")).header("Repeatability-Request-ID", "rr-2").json(&body));
    assert_rejected(&id_only.await, 400);
    let sent_only = http
        .post(gateway.url("/odata/Orders"))
        .header("Repeatability-First-Sent", http_date(SystemTime::now()))
        .json(&body);
    assert_rejected(&send(sent_only).await, 400);
    let client_only = http.post(gateway.url("/odata/Orders")).header("Repeatability-Client-ID", "app-1").json(&body);
    assert_rejected(&send(client_only).await, 400);
    assert_eq!(upstream.calls().await, 0);
}

#[tokio::test]
async fn a_reused_request_id_with_another_payload_is_rejected() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), CONFIG).await;
    let http = client();
    let sent = http_date(SystemTime::now());
    assert_eq!(send(repeatable(&http, &gateway, "rr-3", &sent)).await.status, 201);
    let other_payload = http
        .post(gateway.url("/odata/Orders"))
        .header("Repeatability-Request-ID", "rr-3")
        .header("Repeatability-First-Sent", &sent)
        .json(&json!({ "Amount": 99 }));
    assert_rejected(&send(other_payload).await, 400);
    let other_uri = http
        .post(gateway.url("/odata/Invoices"))
        .header("Repeatability-Request-ID", "rr-3")
        .header("Repeatability-First-Sent", &sent)
        .json(&json!({ "Amount": 10 }));
    assert_rejected(&send(other_uri).await, 400);
    let other_verb = http
        .patch(gateway.url("/odata/Orders"))
        .header("Repeatability-Request-ID", "rr-3")
        .header("Repeatability-First-Sent", &sent)
        .json(&json!({ "Amount": 10 }));
    assert_rejected(&send(other_verb).await, 400);
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn a_first_sent_time_older_than_the_retention_window_is_412() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), CONFIG).await;
    let stale = http_date(SystemTime::now() - Duration::from_secs(2 * 3600));
    let reply = send(repeatable(&client(), &gateway, "rr-4", &stale)).await;
    assert_rejected(&reply, 412);
    assert_eq!(upstream.calls().await, 0);
}

#[tokio::test]
async fn repeatability_headers_on_an_unprotected_route_are_501() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), CONFIG).await;
    let http = client();
    let sent = http_date(SystemTime::now());
    let elsewhere = http
        .post(gateway.url("/plain/things"))
        .header("Repeatability-Request-ID", "rr-5")
        .header("Repeatability-First-Sent", &sent)
        .json(&json!({ "a": 1 }));
    assert_rejected(&send(elsewhere).await, 501);
    assert_eq!(upstream.calls().await, 0);

    // Safe methods are never claimed, so they pass with or without the headers.
    let read = http
        .get(gateway.url("/odata/Orders"))
        .header("Repeatability-Request-ID", "rr-5")
        .header("Repeatability-First-Sent", &sent);
    let read = send(read).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn the_client_id_is_part_of_the_scope() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), CONFIG).await;
    let http = client();
    let sent = http_date(SystemTime::now());
    let from =
        |client_id: &str| repeatable(&http, &gateway, "rr-6", &sent).header("Repeatability-Client-ID", client_id);

    let one = send(from("app-1")).await;
    let two = send(from("app-2")).await;
    for reply in [&one, &two] {
        assert_eq!(reply.status, 201, "{reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
    }
    assert!(send(from("app-1")).await.replayed());
    assert_eq!(upstream.calls_for("rr-6").await, 2);
    let record = gateway.record("orders#app-1", "rr-6").await.expect("the client id is in the scope");
    assert_eq!(record["status"], "completed", "{record}");
    assert!(gateway.record("orders#app-2", "rr-6").await.is_some());
}
