//! Support for the tests of the Idempotency Log page and the OpenAPI document: the Python
//! tools `scripts/install-browser-tools` puts in a venv outside the clone (Playwright,
//! schemathesis), and an admin client that sends the bearer token.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Reply, client, encode, send};

/// The venv of `scripts/install-browser-tools`; a missing one fails the test and says how
/// to make it (the tests never install anything themselves).
pub struct BrowserTools {
    venv: PathBuf,
}

impl BrowserTools {
    /// The installed tools, or a panic that says how to install them.
    pub fn require() -> BrowserTools {
        let venv = std::env::var_os("IDEM_BROWSER_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/idem-tools/browser")
        });
        let tools = BrowserTools { venv };
        for needed in [tools.python(), tools.schemathesis(), PathBuf::from("/usr/bin/chromium")] {
            assert!(
                needed.exists(),
                "{} is missing: run ./scripts/install-browser-tools (it installs Debian's chromium and a venv \
                 with Playwright and schemathesis under $HOME/.cache/idem-tools/browser)",
                needed.display()
            );
        }
        tools
    }

    /// The venv's Python, which has Playwright.
    pub fn python(&self) -> PathBuf {
        self.venv.join("bin/python")
    }

    /// The venv's `schemathesis` command.
    pub fn schemathesis(&self) -> PathBuf {
        self.venv.join("bin/schemathesis")
    }
}

/// A file of the repository.
pub fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a tool to completion, failing the test with its whole output unless it succeeds.
pub fn run_tool(mut command: Command, what: &str) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    eprintln!("{stdout}");
    output
}

/// The admin API of a gateway whose `/v1` needs `token`.
pub struct AdminCalls {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminCalls {
    /// Calls on `base` (`http://HOST:PORT`) with `token`.
    pub fn new(base: &str, token: &str) -> AdminCalls {
        AdminCalls { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), http: client() }
    }

    /// `GET path`, with the token.
    pub async fn get(&self, path: &str) -> Reply {
        send(self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.token)).await
    }

    /// `POST path` with a JSON body, with the token.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        send(self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(body)).await
    }

    /// The path of one record.
    pub fn record_path(scope: &str, tenant: &str, key: &str) -> String {
        format!("/v1/records/{}/{}?tenant={}", encode(scope), encode(key), encode(tenant))
    }

    /// One record; `None` on 404.
    pub async fn record(&self, scope: &str, tenant: &str, key: &str) -> Option<Value> {
        let reply = self.get(&Self::record_path(scope, tenant, key)).await;
        match reply.status {
            200 => Some(reply.json()),
            404 => None,
            _ => panic!("admin show failed: {reply:?}"),
        }
    }

    /// Polls until the record has `status`.
    pub async fn wait_for_status(&self, scope: &str, tenant: &str, key: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let record = self.record(scope, tenant, key).await;
            if let Some(record) = record.as_ref().filter(|r| r["status"] == status) {
                return record.clone();
            }
            assert!(Instant::now() < deadline, "{scope}/{tenant}/{key} never became {status}: {record:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The keys of `GET /v1/records?QUERY`, in the order listed.
    pub async fn keys(&self, query: &str) -> Vec<String> {
        let listed = self.get(&format!("/v1/records?{query}")).await;
        assert_eq!(listed.status, 200, "{listed:?}");
        let records = listed.json()["records"].as_array().expect("records").clone();
        records.iter().map(|r| r["key"].as_str().expect("a key").to_owned()).collect()
    }
}
