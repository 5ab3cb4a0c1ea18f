//! The Idempotency Log page (SPEC §8): served from the binary at the admin listener's `/`,
//! driven in a real browser (Playwright and Debian's chromium, `tests/browser/log_page.py`)
//! over records made by real requests through the gateway and a real `idem run`; and the
//! admin API's refusal of other origins when it has no token.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::browser_support::{AdminCalls, BrowserTools, run_tool};
use crate::support::{Gateway, SharedStore, Upstream, assert_problem, client, idem, postgres_store, redis_store, send};

const TOKEN: &str = "s3cret-page-token";

const CONFIG: &str = r#"
    purge_interval = "1h"

    [[routes]]
    name = "orders"
    path = "/orders"
    tenant = { header = "X-Tenant-ID" }

    [[routes]]
    name = "brief"
    path = "/brief"
    ttl = "1s"
    tenant = { header = "X-Tenant-ID" }
"#;

/// A key whose markup would run if the page ever parsed a key as HTML.
const SCRIPT_KEY: &str = "<script>window.__pwned=1</script>";
/// Likewise inside a stored body (the demo upstream echoes the request body).
const MARKUP_IN_BODY: &str = "<img src=x onerror=window.__pwned=2>";

/// One request through the gateway for `tenant`, with `headers` for the demo upstream.
async fn order(gateway: &Gateway, path: &str, tenant: &str, key: &str, body: Value, headers: &[(&str, &str)]) -> u16 {
    let mut request = client()
        .post(gateway.url(path))
        .header("Idempotency-Key", key)
        .header("X-Tenant-ID", tenant)
        .header("X-Request-Id", format!("req-{key}"))
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request).await.status
}

fn id(scope: &str, tenant: &str, key: &str) -> Value {
    json!({ "scope": scope, "tenant": tenant, "key": key })
}

/// Runs a two-step flow into the demo upstream on the gateway's store: `customer` captures
/// the id the upstream gives, `invoice` is refused with 422 and needs review.
fn run_flow(dir: &Path, store: &str, upstream: &str) {
    std::fs::write(
        dir.join("customers.jsonl"),
        "{\"id\":\"c-1\",\"name\":\"Ada\"}\n{\"id\":\"c-2\",\"name\":\"Grace\"}\n",
    )
    .expect("data written");
    let flow = format!(
        r#"flow = "sync"
store = "{store}"

[source]
jsonl = "customers.jsonl"
primary_key = ["id"]

[[steps]]
name = "customer"
method = "PUT"
url = "{upstream}/customers/{{{{record.id}}}}"
capture = {{ ref = "/id" }}

[[steps]]
name = "invoice"
method = "POST"
url = "{upstream}/invoices"
headers = {{ "X-Demo-Status" = "422" }}
body = {{ customer = "{{{{steps.customer.ref}}}}" }}
"#
    );
    std::fs::write(dir.join("flow.toml"), flow).expect("flow written");
    let output = idem().arg("run").arg(dir.join("flow.toml")).current_dir(dir).output().expect("idem run runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "the invoices need review\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("needs review: 2"), "{stdout}");
}

/// Makes every kind of record the page must show; returns what it made, for the script.
async fn make_records(gateway: &Gateway, upstream: &Upstream, admin: &AdminCalls, dir: &Path) -> Value {
    for n in 0..12 {
        assert_eq!(order(gateway, "/orders", "acme", &format!("bulk-{n:02}"), json!({ "n": n }), &[]).await, 201);
    }
    for key in ["tmp-1", "tmp-2"] {
        assert_eq!(order(gateway, "/brief", "acme", key, json!({}), &[]).await, 201);
    }
    assert_eq!(order(gateway, "/orders", "acme", "inv-1", json!({ "amount": 42 }), &[]).await, 201);
    assert_eq!(order(gateway, "/orders", "globex", "inv-2", json!({ "amount": 7 }), &[]).await, 201);
    assert_eq!(order(gateway, "/orders", "acme", "inv-3", json!({}), &[("X-Demo-Status", "503")]).await, 503);
    let big = [("X-Demo-Size", "100000")];
    assert_eq!(order(gateway, "/orders", "acme", "big-1", json!({}), &big).await, 201);
    let markup = json!({ "note": MARKUP_IN_BODY });
    assert_eq!(order(gateway, "/orders", "acme", SCRIPT_KEY, markup, &[]).await, 201);
    for key in ["lost-1", "lost-2", "lost-3"] {
        assert_eq!(order(gateway, "/orders", "acme", key, json!({}), &[("X-Demo-Fault", "drop")]).await, 502);
        admin.wait_for_status("orders", "acme", key, "outcome_unknown").await;
    }
    // A binary answer can only come from an operator: settle one unknown with bytes.
    let binary = "//79/A==";
    let settled = admin
        .post(
            "/v1/records/orders/lost-3/resolve?tenant=acme",
            &json!({ "action": "complete", "status": 200, "body_base64": binary }),
        )
        .await;
    assert_eq!(settled.status, 200, "{settled:?}");

    run_flow(dir, gateway.store_url(), &upstream.url());
    let runner_keys = admin.keys("scope=sync:customer").await;
    assert_eq!(runner_keys.len(), 2, "{runner_keys:?}");
    let step = admin.record("sync:customer", "", &runner_keys[0]).await.expect("the step's record");
    let body: Value = serde_json::from_str(step["response"]["body"].as_str().expect("a stored body")).expect("JSON");
    let review_key = admin.keys("scope=sync:invoice").await.remove(0);

    json!({
        "gateway": id("orders", "acme", "inv-1"),
        "other_tenant": id("orders", "globex", "inv-2"),
        "failed": id("orders", "acme", "inv-3"),
        "big": id("orders", "acme", "big-1"),
        "binary": { "scope": "orders", "tenant": "acme", "key": "lost-3", "body_base64": binary },
        "unknown": [id("orders", "acme", "lost-1"), id("orders", "acme", "lost-2")],
        "expired": [id("brief", "acme", "tmp-1"), id("brief", "acme", "tmp-2")],
        "inv_keys": ["inv-1", "inv-2", "inv-3"],
        "bulk_keys": admin.keys("key_prefix=bulk-").await,
        "script_key": SCRIPT_KEY,
        "markup_in_body": MARKUP_IN_BODY,
        "runner_step": { "scope": "sync:customer", "tenant": "", "key": runner_keys[0], "captures": body["captures"] },
        "runner_keys": runner_keys,
        "needs_review": id("sync:invoice", "", &review_key),
    })
}

/// Waits until the clock passes a record's expiry (nothing else says it has expired).
async fn wait_until_expired(admin: &AdminCalls, scope: &str, tenant: &str, key: &str) {
    let record = admin.record(scope, tenant, key).await.expect("the record");
    let expires = humantime::parse_rfc3339(record["expires_at"].as_str().expect("expires_at")).expect("RFC 3339");
    while SystemTime::now() <= expires + Duration::from_millis(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the scenario's records live.
enum Backend {
    /// A SQLite file in the gateway's temp dir; the screenshots in docs/ come from this one.
    Sqlite,
    /// PostgreSQL or Redis, in a schema or key prefix of the test's own.
    Shared(SharedStore),
}

/// The whole scenario: records made by real requests and `idem run`, then a person's
/// session in the browser, then what a client observes of what the page did.
async fn a_session_in_the_browser(backend: Backend) {
    let tools = BrowserTools::require();
    let upstream = Upstream::start().await;
    let mut builder = Gateway::builder(&upstream.url(), CONFIG).env("IDEM_ADMIN_TOKEN", TOKEN);
    // Redis forgets an expired record by itself (its TTL), so a purge may find nothing left.
    let purged = match &backend {
        Backend::Shared(store) if store.url.starts_with("redis") => Value::Null,
        _ => json!(2),
    };
    if let Backend::Shared(store) = &backend {
        builder = builder.store(&store.url);
    }
    let gateway = builder.start().await;
    let admin = AdminCalls::new(&gateway.admin(""), TOKEN);
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut made = make_records(&gateway, &upstream, &admin, dir.path()).await;
    made["expect_purged"] = purged;
    wait_until_expired(&admin, "brief", "acme", "tmp-2").await;
    std::fs::write(dir.path().join("records.json"), made.to_string()).expect("records written");
    // The screenshots in docs/ are made by pointing this at docs/ (README says how).
    let shots = match (&backend, std::env::var("IDEM_LOG_PAGE_SCREENSHOTS")) {
        (Backend::Sqlite, Ok(docs)) => docs,
        _ => dir.path().display().to_string(),
    };

    let mut script = Command::new(tools.python());
    script
        .arg(crate::browser_support::repo_file("tests/browser/log_page.py"))
        .args(["--admin", &gateway.admin(""), "--gateway", &gateway.url(""), "--token", TOKEN])
        .arg("--records")
        .arg(dir.path().join("records.json"))
        .args(["--screenshots", &shots]);
    let output = run_tool(script, "the browser test (tests/browser/log_page.py)");
    assert!(String::from_utf8_lossy(&output.stdout).contains("every check passed"));

    // What the page did is what a client now observes.
    let http = client();
    let resend = |tenant: &str, key: &str| {
        http.post(gateway.url("/orders")).header("Idempotency-Key", key).header("X-Tenant-ID", tenant).json(&json!({}))
    };
    let forgotten = send(resend("globex", "inv-2").json(&json!({ "amount": 7 }))).await;
    assert!(forgotten.status == 201 && !forgotten.replayed(), "a forgotten key executes again: {forgotten:?}");
    assert_eq!(upstream.calls_for("inv-2").await, 2);
    let released = send(resend("acme", "lost-1")).await;
    assert!(released.status == 201 && !released.replayed(), "a released key executes again: {released:?}");
    let settled = send(resend("acme", "lost-2")).await;
    assert!(settled.replayed(), "a key marked completed replays: {settled:?}");
    assert_eq!((settled.status, settled.json()), (201, json!({ "id": "settled-by-hand" })));
    assert_eq!(upstream.calls_for("lost-2").await, 1, "marking completed executes nothing");
    assert!(admin.record("orders", "acme", "inv-1").await.is_some(), "a dismissed Forget kept the record");
}

#[tokio::test]
async fn a_person_finds_reads_forgets_and_settles_records_in_a_browser() {
    a_session_in_the_browser(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_page_works_the_same_on_postgres() {
    a_session_in_the_browser(Backend::Shared(postgres_store())).await;
}

#[tokio::test]
async fn the_page_works_the_same_on_redis() {
    a_session_in_the_browser(Backend::Shared(redis_store())).await;
}

#[tokio::test]
async fn the_page_is_served_from_the_binary_without_the_token() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), "").env("IDEM_ADMIN_TOKEN", TOKEN).start().await;
    let http = client();
    let page = send(http.get(gateway.admin("/"))).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let policy = page.header("content-security-policy").expect("a content security policy");
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(page.text().contains("<label for=\"token\">Admin token</label>"), "{page:?}");
    for (asset, kind) in [("page.js", "text/javascript"), ("page.css", "text/css"), ("icon.svg", "image/svg+xml")] {
        let reply = send(http.get(gateway.admin(&format!("/assets/{asset}")))).await;
        assert_eq!(reply.status, 200, "{asset}: {reply:?}");
        assert!(reply.header("content-type").is_some_and(|t| t.starts_with(kind)), "{asset}: {reply:?}");
        // Nothing is fetched from elsewhere: the one absolute URL is the SVG namespace's name.
        let text = reply.text().replace("http://www.w3.org/2000/svg", "");
        assert!(!text.contains("http://") && !text.contains("https://"), "{asset} names no other site");
    }
    let data = send(http.get(gateway.admin("/v1/records"))).await;
    assert_eq!(data.status, 401, "the page is open, the data is not: {data:?}");
    let nothing = send(http.get(gateway.admin("/no-such-page"))).await;
    assert_problem(&nothing, 404, "not-found");
}

#[tokio::test]
async fn without_a_token_another_origin_cannot_act() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    assert_eq!(
        send(http.post(gateway.url("/orders")).header("Idempotency-Key", "o-1").json(&json!({}))).await.status,
        201
    );
    let admin_host = gateway.admin("").trim_start_matches("http://").to_owned();
    let forget = || http.delete(gateway.admin("/v1/records/default/o-1"));

    let cross_site = send(forget().header("Origin", "https://evil.example")).await;
    assert_problem(&cross_site, 403, "cross-origin-refused");
    let rebound =
        send(forget().header("Host", format!("evil.example:{}", admin_host.rsplit(':').next().unwrap()))).await;
    assert_problem(&rebound, 403, "cross-origin-refused");
    let opaque = send(http.post(gateway.admin("/v1/purge")).header("Origin", "null")).await;
    assert_problem(&opaque, 403, "cross-origin-refused");
    assert!(gateway.record("default", "o-1").await.is_some(), "nothing was forgotten");

    let same_origin = send(forget().header("Origin", format!("http://{admin_host}"))).await;
    assert_eq!(same_origin.status, 204, "the page's own calls act: {same_origin:?}");
    let by_name = send(http.get(gateway.admin("/v1/stats")).header("Host", "localhost")).await;
    assert_eq!(by_name.status, 200, "localhost is loopback: {by_name:?}");
}
