//! Security (SPEC §7): stored answers sealed at rest, and logs that never carry bodies
//! or credentials.

use serde_json::json;

use crate::support::{Gateway, Upstream, client, idem_log, send};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SECRET: &str = "sk_plaintext_marker_9f3a";

fn store_files(store_url: &str) -> Vec<u8> {
    let path = store_url.trim_start_matches("sqlite://");
    let mut bytes = Vec::new();
    for file in [path.to_owned(), format!("{path}-wal")] {
        bytes.extend(std::fs::read(&file).unwrap_or_default());
    }
    assert!(!bytes.is_empty(), "the store file exists");
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn with_a_key_the_store_file_holds_no_plaintext_answer() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), "").env("IDEM_ENCRYPTION_KEY", KEY).start().await;
    let order = json!({ "card": SECRET });
    let first = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "sealed-1").json(&order)).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(first.text().contains(SECRET), "the demo echoes the request: {first:?}");

    let replay = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "sealed-1").json(&order)).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, first.body, "the replay opens the sealed answer");
    assert_eq!(replay.header("content-type"), Some("application/json"), "headers are restored too");
    assert!(!contains(&store_files(gateway.store_url()), SECRET), "the stored answer is sealed");

    // The same key reads it back through `idem log`; without it, the answer stays sealed.
    let with_key = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["log", "show", "--store", gateway.store_url(), "--scope", "default", "--key", "sealed-1", "--json"])
        .env("IDEM_ENCRYPTION_KEY", KEY)
        .output()
        .expect("idem log runs");
    assert!(String::from_utf8_lossy(&with_key.stdout).contains(SECRET));
    let without_key = idem_log(gateway.store_url(), &["show", "--scope", "default", "--key", "sealed-1", "--json"]);
    assert!(!without_key.stdout.contains(SECRET), "{}", without_key.stdout);
}

#[tokio::test]
async fn a_malformed_key_is_bad_input() {
    let upstream = Upstream::start().await;
    let (status, stderr) =
        Gateway::builder(&upstream.url(), "").env("IDEM_ENCRYPTION_KEY", "too-short").expect_exit().await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("IDEM_ENCRYPTION_KEY"), "{stderr}");
}

/// Every subcommand agrees (they once did not: `idem run` exited 1 for a malformed key).
#[test]
fn a_malformed_key_is_bad_input_for_every_subcommand() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (store, flow, consumer) = crate::support::run_and_consume_files(dir.path(), "http://127.0.0.1:9/x");
    let runs: [&[&str]; 3] = [
        &["run", flow.to_str().unwrap()],
        &["consume", consumer.to_str().unwrap()],
        &["log", "stats", "--store", &store],
    ];
    for args in runs {
        let output =
            crate::support::idem().args(args).env("IDEM_ENCRYPTION_KEY", "too-short").output().expect("idem runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "idem {args:?}: {stderr}");
        assert!(stderr.contains("IDEM_ENCRYPTION_KEY"), "idem {args:?}: {stderr}");
    }
}

#[tokio::test]
async fn logs_never_carry_bodies_or_credentials() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), "").env("IDEM_LOG", "trace").start().await;
    let credential = "Bearer sk_live_credential_marker_77";
    for fault in ["none", "drop"] {
        let request = client()
            .post(gateway.url("/orders"))
            .header("Idempotency-Key", format!("log-{fault}"))
            .header("Authorization", credential)
            .header("X-Demo-Fault", fault)
            .json(&json!({ "card": SECRET }));
        send(request).await;
    }
    let logs = gateway.logs();
    assert!(logs.contains("upstream call did not complete"), "the logs were captured: {logs}");
    assert!(!logs.contains(SECRET), "a body reached the logs");
    assert!(!logs.contains("sk_live_credential_marker_77"), "a credential reached the logs");
}
