//! TLS as a user meets it (SPEC §4 "Reach"): a gateway in front of an HTTPS API whose
//! certificate comes from a private CA trusted through `SSL_CERT_FILE`, HTTP/2 by ALPN,
//! and verification that is never skipped — an untrusted certificate or one for another
//! host is "not sent": 502, the record released, the upstream untouched.

use serde_json::json;

use crate::support::{Authority, Gateway, Upstream, assert_problem, client, send};

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_is_protected_and_spoken_to_over_http2() {
    let ca = Authority::new("private");
    let upstream = Upstream::start_tls(&ca.issue(&["127.0.0.1", "localhost"]), &ca).await;
    assert!(upstream.url().starts_with("https://"), "{}", upstream.url());
    let gateway = Gateway::builder(&upstream.url(), "").env("SSL_CERT_FILE", &ca.pem_path()).start().await;

    let order =
        || client().post(gateway.url("/orders")).header("Idempotency-Key", "tls-1").json(&json!({ "amount": 5 }));
    let first = send(order()).await;
    assert_eq!(first.status, 201, "{first:?}");
    let retry = send(order()).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.text(), first.text());
    assert_eq!(upstream.calls_for("tls-1").await, 1);
    let stats = upstream.stats().await;
    assert_eq!(stats["by_version"]["HTTP/2.0"], 1, "the upstream offered h2 by ALPN: {stats}");

    // A host name in the URL is verified as well as an IP address.
    let by_name = upstream.url().replace("127.0.0.1", "localhost");
    let named = Gateway::builder(&by_name, "").env("SSL_CERT_FILE", &ca.pem_path()).start().await;
    let reply = send(client().post(named.url("/orders")).header("Idempotency-Key", "tls-2").json(&json!({}))).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(upstream.calls_for("tls-2").await, 1);
}

#[tokio::test]
async fn an_untrusted_certificate_is_not_sent_and_the_retry_executes_once_trusted() {
    let ca = Authority::new("unknown to the gateway");
    let upstream = Upstream::start_tls(&ca.issue(&["127.0.0.1", "localhost"]), &ca).await;
    let mut gateway = Gateway::start(&upstream.url(), "").await;
    let order = || client().post(gateway.url("/orders")).header("Idempotency-Key", "untrusted").json(&json!({}));

    let refused = send(order()).await;
    assert_problem(&refused, 502, "upstream-unavailable");
    assert_eq!(upstream.calls().await, 0, "nothing reached the upstream");
    let record = gateway.record("default", "untrusted").await.expect("a record");
    assert_eq!(record["status"], "failed_retryable", "released, so a retry is safe: {record}");
    assert!(gateway.logs().contains("certificate"), "the log says why: {}", gateway.logs());

    gateway.terminate().await;
    let mut trusting = Gateway::builder(&upstream.url(), "").env("SSL_CERT_FILE", &ca.pem_path());
    trusting = trusting.store(gateway.store_url());
    let gateway = trusting.start().await;
    let order = || client().post(gateway.url("/orders")).header("Idempotency-Key", "untrusted").json(&json!({}));
    let executed = send(order()).await;
    assert_eq!(executed.status, 201, "{executed:?}");
    assert_eq!(upstream.calls_for("untrusted").await, 1);
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    // The certificate names localhost; the gateway is told to reach 127.0.0.1.
    let ca = Authority::new("right CA, wrong name");
    let upstream = Upstream::start_tls(&ca.issue(&["localhost"]), &ca).await;
    let gateway = Gateway::builder(&upstream.url(), "").env("SSL_CERT_FILE", &ca.pem_path()).start().await;
    let reply =
        send(client().post(gateway.url("/orders")).header("Idempotency-Key", "elsewhere").json(&json!({}))).await;
    assert_problem(&reply, 502, "upstream-unavailable");
    assert_eq!(upstream.calls().await, 0, "nothing reached the upstream");
}

/// `idem run` and `idem consume` agree with the gateway: an unusable `SSL_CERT_FILE` is bad input.
#[test]
fn an_unreadable_ssl_cert_file_is_bad_input_for_the_runner_and_the_consumer() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (_, flow, consumer) = crate::support::run_and_consume_files(dir.path(), "https://127.0.0.1:9/x");
    for args in [["run", flow.to_str().unwrap()], ["consume", consumer.to_str().unwrap()]] {
        let output =
            crate::support::idem().args(args).env("SSL_CERT_FILE", "/nonexistent/ca.pem").output().expect("idem runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "idem {args:?}: {stderr}");
        assert!(stderr.contains("/nonexistent/ca.pem"), "idem {args:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_unreadable_ssl_cert_file_is_bad_input() {
    let (status, stderr) =
        Gateway::builder("https://127.0.0.1:1", "").env("SSL_CERT_FILE", "/nonexistent/ca.pem").expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem") && stderr.contains("SSL_CERT_FILE"), "{stderr}");
}

#[tokio::test]
async fn the_listener_serves_tls_and_reads_a_renewed_certificate_on_sighup() {
    let upstream = Upstream::start().await;
    let files = tempfile::tempdir().expect("a temp dir");
    let (cert, key) = (files.path().join("listener.pem"), files.path().join("listener.key"));
    let install = |certificate: &crate::support::Certificate| {
        std::fs::copy(certificate.chain_path(), &cert).expect("the certificate is installed");
        std::fs::copy(certificate.key_path(), &key).expect("the key is installed");
    };
    let first = Authority::new("listener");
    install(&first.issue(&["127.0.0.1", "localhost"]));
    let config = format!("tls = {{ cert = {:?}, key = {:?} }}", cert.display().to_string(), key.display().to_string());
    let gateway = Gateway::start(&upstream.url(), &config).await;
    assert!(gateway.url("/").starts_with("https://"), "{}", gateway.url("/"));

    let reply =
        send(first.client().post(gateway.url("/orders")).header("Idempotency-Key", "over-tls").json(&json!({}))).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let replay = first.client().post(gateway.url("/orders")).header("Idempotency-Key", "over-tls").json(&json!({}));
    let replay = replay.send().await.expect("an answer over TLS");
    assert_eq!(replay.version(), reqwest::Version::HTTP_2, "h2 offered by ALPN");
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(upstream.calls_for("over-tls").await, 1);
    let plaintext = client().get(gateway.url("/orders").replace("https://", "http://")).send().await;
    assert!(plaintext.is_err() || plaintext.is_ok_and(|r| !r.status().is_success()), "no plaintext on a TLS listener");

    // A renewal from another CA, announced by SIGHUP: new connections get it, no restart.
    let renewed = Authority::new("renewed");
    install(&renewed.issue(&["127.0.0.1", "localhost"]));
    let hup = std::process::Command::new("kill").args(["-HUP", &gateway.pid().to_string()]).status();
    assert!(hup.expect("kill runs").success());
    for _ in 0..200 {
        if gateway.logs().contains("certificate reloaded") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(gateway.logs().contains("SIGHUP: certificate reloaded"), "{}", gateway.logs());
    let after =
        send(renewed.client().post(gateway.url("/orders")).header("Idempotency-Key", "renewed").json(&json!({}))).await;
    assert_eq!(after.status, 201, "{after:?}");
    let old = first.client().post(gateway.url("/orders")).header("Idempotency-Key", "old-ca").json(&json!({}));
    assert!(old.send().await.is_err(), "the old certificate is no longer served");
}

#[tokio::test]
async fn a_listener_certificate_that_cannot_be_read_is_bad_input() {
    let config = "tls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }";
    let (status, stderr) = Gateway::builder(&crate::support::closed_port_url(), config).expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/cert.pem: cannot read"), "{stderr}");
    let (status, stderr) =
        Gateway::builder(&crate::support::closed_port_url(), "tls = { cert = \"c.pem\" }").expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tls.key: is required"), "{stderr}");
}

#[tokio::test]
async fn a_route_forwards_to_its_own_upstream_and_the_route_table_says_which() {
    let plain = Upstream::start().await;
    let ca = Authority::new("second API");
    let secure = Upstream::start_tls(&ca.issue(&["127.0.0.1", "localhost"]), &ca).await;
    let config = format!(
        r#"
        [[routes]]
        name = "invoices"
        path = "/invoices"
        upstream = "{}/billing/"

        [[routes]]
        name = "orders"
        path = "/orders"
        "#,
        secure.url()
    );
    let gateway = Gateway::builder(&plain.url(), &config).env("SSL_CERT_FILE", &ca.pem_path()).start().await;
    let post = |path: &str, key: &str| client().post(gateway.url(path)).header("Idempotency-Key", key).json(&json!({}));
    let invoice = send(post("/invoices", "inv-1")).await;
    assert_eq!(invoice.status, 201, "{invoice:?}");
    assert_eq!(invoice.json()["path"], "/billing/invoices", "under the route's upstream prefix: {invoice:?}");
    assert!(send(post("/invoices", "inv-1")).await.replayed());
    let order = send(post("/orders", "ord-1")).await;
    assert_eq!(order.status, 201, "{order:?}");
    assert_eq!((secure.calls_for("inv-1").await, plain.calls_for("inv-1").await), (1, 0));
    assert_eq!((plain.calls_for("ord-1").await, secure.calls_for("ord-1").await), (1, 0));

    let routes = send(client().get(gateway.admin("/v1/routes"))).await.json();
    assert_eq!(routes["routes"][0]["name"], "invoices", "{routes}");
    assert_eq!(routes["routes"][0]["upstream"], format!("{}/billing/", secure.url()), "{routes}");
    assert_eq!(routes["routes"][1]["upstream"], format!("{}/", plain.url()), "{routes}");
    let metrics = send(client().get(gateway.admin("/metrics"))).await.text();
    let line = format!("idem_route_upstream{{route=\"invoices\",upstream=\"{}/billing/\"}} 1", secure.url());
    assert!(metrics.contains(&line), "{line} in {metrics}");

    let bad = "[[routes]]\nname = \"x\"\nupstream = \"ftp://files.example.com\"\n";
    let (status, stderr) = Gateway::builder(&plain.url(), bad).expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("routes[0].upstream") && stderr.contains("\"ftp\" is not supported"), "{stderr}");
}
