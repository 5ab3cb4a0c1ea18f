//! SPEC §3 and §4: where keys come from, what a valid key is, which requests are claimed
//! at all, and what the fingerprint ignores.

use serde_json::json;

use crate::support::{Gateway, Upstream, assert_problem, client, send};

#[tokio::test]
async fn a_route_can_read_its_key_from_a_custom_header() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        key = { header = "X-Idempotency-Key", required = true }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = || http.post(gateway.url("/orders")).json(&json!({ "amount": 1 }));

    let first = send(post().header("X-Idempotency-Key", "custom-1")).await;
    assert_eq!(first.status, 201, "{first:?}");
    let second = send(post().header("X-Idempotency-Key", "custom-1")).await;
    assert!(second.replayed(), "{second:?}");
    assert!(gateway.record("orders", "custom-1").await.is_some());

    let standard_header = send(post().header("Idempotency-Key", "custom-1")).await;
    assert_problem(&standard_header, 400, "idempotency-key-missing");
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn a_json_pointer_into_the_body_is_a_natural_key() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        key = { body = "/order_id", required = true }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |body: serde_json::Value| http.post(gateway.url("/orders")).json(&body);

    let first = send(post(json!({ "order_id": "A-1", "amount": 10 }))).await;
    assert_eq!(first.status, 201, "{first:?}");
    let second = send(post(json!({ "amount": 10, "order_id": "A-1" }))).await;
    assert!(second.replayed(), "the same JSON in another key order is the same intent: {second:?}");
    let record = gateway.record("orders", "A-1").await.expect("the order id is the key");
    assert_eq!(record["status"], "completed", "{record}");

    let changed = send(post(json!({ "order_id": "A-1", "amount": 11 }))).await;
    assert_problem(&changed, 422, "idempotency-key-reused");
    let other = send(post(json!({ "order_id": "A-2", "amount": 10 }))).await;
    assert_eq!(other.status, 201, "{other:?}");
    assert!(!other.replayed());
    let missing = send(post(json!({ "amount": 10 }))).await;
    assert_problem(&missing, 400, "idempotency-key-missing");
    assert_eq!(upstream.calls().await, 2);
}

#[tokio::test]
async fn lowercase_normalisation_makes_keys_that_differ_in_case_one_intent() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        key = { header = "Idempotency-Key", normalize = "lowercase" }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |key: &str| http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "a": 1 }));

    let upper = send(post("INV-ABC")).await;
    assert_eq!(upper.status, 201, "{upper:?}");
    let lower = send(post("inv-abc")).await;
    assert!(lower.replayed(), "{lower:?}");
    assert_eq!(lower.body, upper.body);
    assert_eq!(upstream.calls().await, 1);
    assert!(gateway.record("orders", "inv-abc").await.is_some(), "the record holds the normalised key");
}

#[tokio::test]
async fn keys_that_are_too_long_or_not_visible_ascii_are_refused() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let post = |key: &str| http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "a": 1 }));

    assert_problem(&send(post(&"k".repeat(256))).await, 400, "idempotency-key-invalid");
    assert_problem(&send(post("with space")).await, 400, "idempotency-key-invalid");
    assert_problem(&send(post("")).await, 400, "idempotency-key-invalid");
    let non_ascii = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").expect("an obs-text header value");
    let non_ascii = http.post(gateway.url("/orders")).header("Idempotency-Key", non_ascii).json(&json!({ "a": 1 }));
    assert_problem(&send(non_ascii).await, 400, "idempotency-key-invalid");
    assert_eq!(upstream.calls().await, 0, "a refused key is never forwarded");

    let longest = "k".repeat(255);
    let accepted = send(post(&longest)).await;
    assert_eq!(accepted.status, 201, "{accepted:?}");
    assert!(send(post(&longest)).await.replayed());
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn a_required_key_that_is_missing_is_refused() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "payments"
        path = "/payments"
        key = { header = "Idempotency-Key", required = true }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let missing = send(client().post(gateway.url("/payments")).json(&json!({ "amount": 3 }))).await;
    let problem = assert_problem(&missing, 400, "idempotency-key-missing");
    assert!(problem["detail"].as_str().unwrap_or_default().to_lowercase().contains("idempotency-key"), "{problem}");
    assert_eq!(upstream.calls().await, 0);
}

#[tokio::test]
async fn an_optional_key_that_is_missing_passes_through_unprotected() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    for call in 1..=2 {
        let reply = send(http.post(gateway.url("/orders")).json(&json!({ "amount": 3 }))).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
        assert_eq!(reply.header("idempotency-expires"), None, "an unprotected answer has no expiry: {reply:?}");
        assert_eq!(reply.json()["call"], call, "{reply:?}");
    }
    assert_eq!(upstream.calls().await, 2);
    let listed = send(http.get(gateway.admin("/v1/records"))).await.json();
    assert_eq!(listed["records"], json!([]), "nothing was recorded: {listed}");
}

#[tokio::test]
async fn get_and_head_are_never_claimed() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    for call in 1..=2 {
        let reply = send(http.get(gateway.url("/orders/1")).header("Idempotency-Key", "read-1")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
        assert_eq!(reply.json()["call"], call, "{reply:?}");
    }
    for _ in 0..2 {
        let reply = send(http.head(gateway.url("/orders/1")).header("Idempotency-Key", "read-1")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
    }
    assert_eq!(upstream.calls_for("read-1").await, 4);
    assert!(gateway.record("default", "read-1").await.is_none());
}

#[tokio::test]
async fn excluded_fields_do_not_break_a_retry() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        fingerprint = { exclude = ["/client_sent_at"] }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post =
        |body: serde_json::Value| http.post(gateway.url("/orders")).header("Idempotency-Key", "noisy").json(&body);

    let first = send(post(json!({ "amount": 5, "client_sent_at": "2025-01-01T00:00:00Z" }))).await;
    assert_eq!(first.status, 201, "{first:?}");
    let retry = send(post(json!({ "amount": 5, "client_sent_at": "2025-01-01T00:00:07Z" }))).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    let changed = send(post(json!({ "amount": 6, "client_sent_at": "2025-01-01T00:00:09Z" }))).await;
    assert_problem(&changed, 422, "idempotency-key-reused");
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn the_fingerprint_itself_can_be_the_key() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "webhooks"
        path = "/hooks"
        key = { fingerprint = true }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |body: serde_json::Value| http.post(gateway.url("/hooks")).json(&body);

    let first = send(post(json!({ "event": "paid", "id": 1 }))).await;
    assert_eq!(first.status, 201, "{first:?}");
    let duplicate = send(post(json!({ "id": 1, "event": "paid" }))).await;
    assert!(duplicate.replayed(), "{duplicate:?}");
    let other = send(post(json!({ "event": "paid", "id": 2 }))).await;
    assert!(!other.replayed(), "{other:?}");
    assert_eq!(upstream.calls().await, 2);
}

#[tokio::test]
async fn a_single_star_stays_in_one_path_segment_and_a_double_star_crosses() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        methods = ["POST"]
        path = "/v1/orders/*"
        key = { header = "Idempotency-Key", required = true }

        [[routes]]
        name = "deep"
        methods = ["POST", "PUT"]
        path = "/v2/**"
        key = { header = "Idempotency-Key", required = true }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let body = json!({ "a": 1 });

    let one_segment = send(http.post(gateway.url("/v1/orders/17")).json(&body)).await;
    assert_problem(&one_segment, 400, "idempotency-key-missing");
    let two_segments = send(http.post(gateway.url("/v1/orders/17/items")).json(&body)).await;
    assert_eq!(two_segments.status, 201, "not protected by /v1/orders/*: {two_segments:?}");
    let other_method = send(http.patch(gateway.url("/v1/orders/17")).json(&body)).await;
    assert_eq!(other_method.status, 200, "PATCH is not among the route's methods: {other_method:?}");
    let deep = send(http.put(gateway.url("/v2/a/b/c")).json(&body)).await;
    assert_problem(&deep, 400, "idempotency-key-missing");
    assert_eq!(upstream.calls().await, 2);
}

#[tokio::test]
async fn without_routes_post_and_patch_are_protected_on_every_path() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let body = json!({ "a": 1 });

    let patch = || http.patch(gateway.url("/any/deep/path")).header("Idempotency-Key", "p-1").json(&body);
    assert_eq!(send(patch()).await.status, 200);
    assert!(send(patch()).await.replayed(), "PATCH is protected");
    let put = || http.put(gateway.url("/any/deep/path")).header("Idempotency-Key", "u-1").json(&body);
    for _ in 0..2 {
        let reply = send(put()).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(!reply.replayed(), "PUT is not protected by default: {reply:?}");
    }
    assert_eq!(upstream.calls_for("p-1").await, 1);
    assert_eq!(upstream.calls_for("u-1").await, 2);
    assert!(gateway.record("default", "u-1").await.is_none());
}

#[tokio::test]
async fn the_fingerprint_ignores_query_order_and_form_pair_order() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();

    let query =
        |q: &str| http.post(gateway.url(&format!("/search?{q}"))).header("Idempotency-Key", "q-1").json(&json!({}));
    assert_eq!(send(query("a=1&b=2")).await.status, 201);
    let reordered = send(query("b=2&a=1")).await;
    assert!(reordered.replayed(), "the query is compared sorted: {reordered:?}");
    assert_problem(&send(query("a=1&b=3")).await, 422, "idempotency-key-reused");

    let form = |pairs: &str| {
        http.post(gateway.url("/forms"))
            .header("Idempotency-Key", "f-1")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(pairs.to_owned())
    };
    assert_eq!(send(form("name=ada&amount=3")).await.status, 201);
    let reordered = send(form("amount=3&name=ada")).await;
    assert!(reordered.replayed(), "form pairs are compared sorted: {reordered:?}");
    assert_problem(&send(form("amount=4&name=ada")).await, 422, "idempotency-key-reused");
    assert_eq!(upstream.calls().await, 2);
}

#[tokio::test]
async fn method_path_and_content_type_are_part_of_the_fingerprint() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let body = r#"{"amount":1}"#;
    let request = |method: reqwest::Method, path: &str, content_type: &str| {
        http.request(method, gateway.url(path))
            .header("Idempotency-Key", "fp-1")
            .header("Content-Type", content_type)
            .body(body)
    };

    assert_eq!(send(request(reqwest::Method::POST, "/orders", "application/json")).await.status, 201);
    let other_method = send(request(reqwest::Method::PATCH, "/orders", "application/json")).await;
    assert_problem(&other_method, 422, "idempotency-key-reused");
    let other_path = send(request(reqwest::Method::POST, "/invoices", "application/json")).await;
    assert_problem(&other_path, 422, "idempotency-key-reused");
    let other_type = send(request(reqwest::Method::POST, "/orders", "text/plain")).await;
    assert_problem(&other_type, 422, "idempotency-key-reused");
    let same = send(request(reqwest::Method::POST, "/orders", "application/json")).await;
    assert!(same.replayed(), "{same:?}");
    assert_eq!(upstream.calls().await, 1);
}

#[tokio::test]
async fn a_structured_field_key_and_a_bare_one_are_the_same_key() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let order =
        |key: &str| client().post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "n": 1 }));
    let quoted = send(order("\"sf-1\"")).await;
    assert_eq!(quoted.status, 201, "{quoted:?}");
    let bare = send(order("sf-1")).await;
    assert!(bare.replayed(), "the IETF draft's \"sf-1\" and Stripe's sf-1 are one key: {bare:?}");
    assert_eq!(upstream.calls_for("\"sf-1\"").await + upstream.calls_for("sf-1").await, 1);
    assert!(gateway.record("default", "sf-1").await.is_some(), "stored under the unquoted key");

    for broken in ["\"sf-2", "\"sf-2\";x=1", "\"a\\z\""] {
        let reply = send(order(broken)).await;
        assert_problem(&reply, 400, "idempotency-key-invalid");
    }
    assert_eq!(upstream.calls().await, 1, "a malformed quoted key reached nothing");
}

#[tokio::test]
async fn a_keyed_request_that_matches_no_route_is_forwarded_and_warned_about_once_per_pattern() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/v1/orders/*"
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    // `*` stays within a segment: /v1/orders/eu/N is not protected.
    for n in 1..=3 {
        let request = client().post(gateway.url(&format!("/v1/orders/eu/{n}"))).header("Idempotency-Key", "missed");
        let reply = send(request.json(&json!({}))).await;
        assert_eq!(reply.status, 201, "forwarded unprotected, as before: {reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
    }
    assert_eq!(upstream.calls_for("missed").await, 3, "nothing protected it");
    let unkeyed = client().post(gateway.url("/v1/other/1")).json(&json!({}));
    assert_eq!(send(unkeyed).await.status, 201);
    let logs = gateway.logs();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("matched no protected route")).collect();
    assert_eq!(warnings.len(), 1, "one warning for the pattern, none for the unkeyed request: {logs}");
    assert!(warnings[0].contains("POST /v1/orders/eu/*") && warnings[0].contains("idempotency-key"), "{logs}");
}
