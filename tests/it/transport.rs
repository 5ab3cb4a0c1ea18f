//! The client side of the connection (SPEC §4): a client that goes away does not cancel
//! the upstream call, bodies over the limit are refused, and HTTP/2 clients are served.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Gateway, Upstream, assert_problem, client, client_with_timeout, send, try_send};

#[tokio::test]
async fn a_client_that_goes_away_does_not_cancel_the_call_and_its_retry_gets_the_replay() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let order = json!({ "amount": 21 });

    // The client hangs up once the gateway has claimed its request (a timeout alone could
    // fire before the request even arrived on a loaded machine).
    let impatient = client_with_timeout(Duration::from_secs(20))
        .post(gateway.url("/orders"))
        .header("Idempotency-Key", "impatient")
        .header("X-Demo-Delay", "1s")
        .json(&order);
    let in_flight = tokio::spawn(try_send(impatient));
    gateway.wait_for_status("default", "impatient", "in_progress").await;
    in_flight.abort();
    assert!(in_flight.await.is_err_and(|e| e.is_cancelled()), "the client went away before its answer");

    let record = gateway.wait_for_status("default", "impatient", "completed").await;
    assert_eq!(record["response"]["status"], 201, "{record}");
    let retry = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "impatient").json(&order)).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(upstream.calls_for("impatient").await, 1);
}

#[tokio::test]
async fn a_body_over_max_body_is_413() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "uploads"
        path = "/uploads"
        max_body = "1KiB"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |size: usize| {
        http.post(gateway.url("/uploads")).header("Idempotency-Key", format!("up-{size}")).json(&json!({
            "data": "x".repeat(size)
        }))
    };
    let too_large = send(post(2048)).await;
    assert_problem(&too_large, 413, "body-too-large");
    assert_eq!(upstream.calls().await, 0);
    let fits = send(post(512)).await;
    assert_eq!(fits.status, 201, "{fits:?}");
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn http2_clients_with_prior_knowledge_are_served() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP/2 client");
    let post = || h2.post(gateway.url("/orders")).header("Idempotency-Key", "h2-1").json(&json!({ "a": 1 }));

    let first = send(post()).await;
    assert_eq!(first.version, reqwest::Version::HTTP_2, "{first:?}");
    assert_eq!(first.status, 201, "{first:?}");
    let again = send(post()).await;
    assert_eq!(again.version, reqwest::Version::HTTP_2, "{again:?}");
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(upstream.calls_for("h2-1").await, 1);
}

#[tokio::test]
async fn a_client_that_stalls_while_sending_its_body_times_out_with_408() {
    let upstream = Upstream::start().await;
    let config = r#"
        client_timeout = "500ms"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let address = gateway.url("").trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("the gateway accepts");
    let head = "POST /orders HTTP/1.1\r\nHost: gateway\r\nIdempotency-Key: stalled\r\n\
        Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"amount\":";
    stream.write_all(head.as_bytes()).await.expect("the head is sent");

    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await.expect("the answer is read");
            if n == 0 {
                return;
            }
            answer.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                if body.contains('}') {
                    return;
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "the gateway never answered a stalled client: {text}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("client-timeout"), "{text}");
    assert_eq!(upstream.calls().await, 0);
    assert!(gateway.record("default", "stalled").await.is_none(), "nothing was claimed");
}

#[tokio::test]
async fn a_chunked_body_over_max_body_is_413() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "uploads"
        path = "/uploads"
        max_body = "1KiB"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let address = gateway.url("").trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("the gateway accepts");
    let chunk = format!("{{\"data\":\"{}\"}}", "x".repeat(2048));
    let request = format!(
        "POST /uploads HTTP/1.1\r\nHost: gateway\r\nIdempotency-Key: chunked\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    stream.write_all(request.as_bytes()).await.expect("the request is sent");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "no answer: {text}");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body-too-large"), "{text}");
    assert_eq!(upstream.calls().await, 0);
}

#[tokio::test]
async fn an_upstream_path_prefix_is_kept() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&format!("{}/api/", upstream.url()), "").await;
    let http = client();
    let reply = send(http.post(gateway.url("/orders")).header("Idempotency-Key", "prefixed").json(&json!({}))).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.json()["path"], "/api/orders", "{reply:?}");
    let read = send(http.get(gateway.url("/orders/1?expand=items"))).await;
    assert_eq!(read.json()["path"], "/api/orders/1", "{read:?}");
}

/// Sends one keyed POST on an open connection and reads the status line of its answer.
async fn post_on(stream: &mut tokio::net::TcpStream, key: &str) -> String {
    let request = format!(
        "POST /orders HTTP/1.1\r\nHost: gateway\r\nIdempotency-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.expect("the request is sent");
    status_line(stream).await
}

async fn status_line(stream: &mut tokio::net::TcpStream) -> String {
    let mut buffer = vec![0; 4096];
    let n = stream.read(&mut buffer).await.expect("an answer");
    String::from_utf8_lossy(&buffer[..n]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "max_connections = 2").await;
    let address = gateway.url("").trim_start_matches("http://").to_owned();
    let connect = || tokio::net::TcpStream::connect(address.clone());
    let mut first = connect().await.expect("the gateway accepts");
    let mut second = connect().await.expect("the gateway accepts");
    assert_eq!(post_on(&mut first, "cap-1").await, "HTTP/1.1 201 Created");
    assert_eq!(post_on(&mut second, "cap-2").await, "HTTP/1.1 201 Created");
    // Both stay open (keep-alive), so the cap is reached and said so.
    for _ in 0..200 {
        if gateway.logs().contains("connection cap reached") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gateway.logs().contains("connection cap reached"), "{}", gateway.logs());

    // The third connection is not refused: the kernel queues it, and its request waits.
    let mut third = connect().await.expect("a connection past the cap still connects");
    let request = "POST /orders HTTP/1.1\r\nHost: gateway\r\nIdempotency-Key: cap-3\r\n\
                   Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    third.write_all(request.as_bytes()).await.expect("the request is sent");
    let early = tokio::time::timeout(Duration::from_millis(300), status_line(&mut third)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    assert_eq!(upstream.calls_for("cap-3").await, 0, "nothing past the cap reached the upstream");

    // One closes: the waiting connection is accepted and served.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(10), status_line(&mut third)).await;
    assert_eq!(answer.expect("served once a connection closed"), "HTTP/1.1 201 Created");
    assert_eq!(upstream.calls_for("cap-3").await, 1);
    assert_eq!(post_on(&mut second, "cap-4").await, "HTTP/1.1 201 Created", "the open connection still works");
}

#[tokio::test]
async fn a_connection_cap_of_zero_is_bad_input() {
    let (status, stderr) =
        Gateway::builder(&crate::support::closed_port_url(), "max_connections = 0").expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("max_connections: 0 is not between 1 and 1000000"), "{stderr}");
}
