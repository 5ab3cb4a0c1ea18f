//! The OpenAPI 3.1 document of the admin API (`docs/openapi.json`): served from the binary
//! at `/v1/openapi.json`, and checked against a running gateway by schemathesis (every
//! check: no server error, every answer's status, type, headers and body as documented,
//! bad input refused) over records made by real requests.

use std::process::Command;

use serde_json::{Value, json};

use crate::browser_support::{AdminCalls, BrowserTools, repo_file, run_tool};
use crate::support::{Gateway, Upstream, assert_problem, client, send};

const TOKEN: &str = "openapi-token";

fn document() -> Value {
    let text = std::fs::read_to_string(repo_file("docs/openapi.json")).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

#[tokio::test]
async fn the_document_is_served_and_names_every_call() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), "").env("IDEM_ADMIN_TOKEN", TOKEN).start().await;
    let admin = AdminCalls::new(&gateway.admin(""), TOKEN);
    let served = admin.get("/v1/openapi.json").await;
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!(served.header("content-type"), Some("application/json"));
    let document = document();
    assert_eq!(served.json(), document, "the binary serves the document kept in the repository");
    assert!(document["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "OpenAPI 3.1");
    let paths = document["paths"].as_object().expect("paths");
    for call in [
        "/v1/records",
        "/v1/records/{scope}/{key}",
        "/v1/records/{scope}/{key}/resolve",
        "/v1/purge",
        "/v1/stats",
        "/v1/routes",
        "/v1/decisions",
        "/v1/openapi.json",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
    ] {
        assert!(paths.contains_key(call), "{call} is described");
    }
    let anonymous = send(client().get(gateway.admin("/v1/openapi.json"))).await;
    assert_eq!(anonymous.status, 401, "behind the token like the rest of /v1: {anonymous:?}");
}

#[tokio::test]
async fn malformed_parameters_get_problem_json() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    for path in ["/v1/records?limit=-1", "/v1/records?limit=1001", "/v1/records?limit=0", "/v1/records?colour=red"] {
        let reply = send(http.get(gateway.admin(path))).await;
        assert_problem(&reply, 400, "bad-request");
    }
    let bad_header = json!({ "action": "complete", "status": 200, "headers": { "bad header": "x" } });
    let reply = send(http.post(gateway.admin("/v1/records/default/k/resolve")).json(&bad_header)).await;
    let problem = assert_problem(&reply, 400, "bad-request");
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains("bad header")), "{problem}");
    let reply = send(http.get(gateway.admin("/v1/records/default/k?tenant=a&tenant=b"))).await;
    assert_problem(&reply, 400, "bad-request");
}

#[tokio::test]
async fn the_running_server_matches_its_openapi_document() {
    let tools = BrowserTools::require();
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), "").env("IDEM_ADMIN_TOKEN", TOKEN).start().await;
    let admin = AdminCalls::new(&gateway.admin(""), TOKEN);
    let http = client();
    let order = |key: &str| http.post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({}));
    assert_eq!(send(order("done-1")).await.status, 201);
    assert_eq!(send(order("done-1")).await.status, 201);
    assert_eq!(send(order("failed-1").header("X-Demo-Status", "503")).await.status, 503);
    assert_eq!(send(order("lost-1").header("X-Demo-Fault", "drop")).await.status, 502);
    admin.wait_for_status("default", "", "lost-1", "outcome_unknown").await;

    let dir = tempfile::tempdir().expect("a temp dir");
    let mut schemathesis = Command::new(tools.schemathesis());
    schemathesis
        .current_dir(dir.path())
        .arg("--config-file")
        .arg(repo_file("tests/browser/schemathesis.toml"))
        .arg("run")
        .arg(repo_file("docs/openapi.json"))
        .args(["--url", &gateway.admin(""), "--header", &format!("Authorization: Bearer {TOKEN}")])
        // Few examples per call and a fixed seed: a minute of CI at most, the same cases each run.
        .args(["--checks", "all", "--max-examples", "25", "--seed", "14", "--workers", "1", "--no-color"])
        .args(["--generation-database", "none"]);
    let output = run_tool(schemathesis, "schemathesis against the admin API");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let operations: usize = document()["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().expect("a path item").keys().filter(|k| *k != "parameters").count())
        .sum();
    assert!(
        stdout.contains(&format!("Tested: {operations}")),
        "all {operations} documented calls were tested:\n{stdout}"
    );
}
