//! The stores over TLS against real TLS-only servers (issue 12): a PostgreSQL cluster
//! that admits `hostssl` only and a `redis-server` with a TLS port only, each serving a
//! certificate made at test time by a private CA. What is shown: every `sslmode` does what
//! README says, a certificate that fails verification refuses to open with the reason and
//! is not retried (exit 1, the store named, the password redacted), `rediss://` trusts
//! `SSL_CERT_FILE` and nothing else by default, and a gateway runs on both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::core::{ClaimPolicy, Fingerprint, Intent, OnChange, OnUnknown, Outcome, RecordId, Replays, StoredResponse};
use idem::store::{self, Store};
use serde_json::json;

use crate::store_servers::{PgCluster, RedisTls, ca_certificates};
use crate::support::{Authority, Gateway, Upstream, client, idem, send};

const POLICY: ClaimPolicy = ClaimPolicy {
    on_unknown: OnUnknown::Review,
    on_change: OnChange::Reject,
    replays: Replays::Count,
    lookup: idem::core::Lookup::None,
};

const ROUTES: &str = "[[routes]]\nname = \"orders\"\npath = \"/orders\"\n";

/// A claim that executes, its finish, and the same intent again: a replay.
async fn claim_finish_replay(store: &dyn Store) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let key = format!("tls-{:016x}", rand::random::<u64>());
    let intent = Intent {
        id: RecordId::new("orders", "t1", &key),
        fingerprint: Fingerprint([7; 32]),
        now,
        ttl_ms: 60_000,
        lease_ms: 30_000,
        correlation_id: None,
    };
    let claim = store.claim(&intent, POLICY).await.expect("a claim over TLS");
    assert!(claim.decision.executes(), "{:?}", claim.decision);
    let answer = StoredResponse { status: 201, headers: Vec::new(), body: Bytes::from_static(b"{}"), retained: true };
    let token = claim.token.expect("an executing claim holds a lease");
    assert!(store.finish(&intent.id, token, Outcome::Completed(answer), now).await.expect("a finish over TLS"));
    let again = store.claim(&intent, POLICY).await.expect("a second claim");
    assert!(again.decision.answered(), "the finished record replays: {:?}", again.decision);
}

fn tls_error(result: Result<Arc<dyn Store>, store::Error>) -> String {
    match result {
        Err(error @ store::Error::Tls(_)) => {
            assert!(!error.is_retryable(), "a TLS failure is not an outage: {error}");
            let text = error.to_string();
            assert!(!text.contains("s3cret"), "{text}");
            text
        }
        Err(other) => panic!("expected a TLS refusal, got {other:?}"),
        Ok(_) => panic!("expected a TLS refusal, but the store opened"),
    }
}

#[tokio::test]
async fn postgres_sslmodes_against_a_tls_only_server() {
    let ca = Authority::new("pg");
    let cluster = PgCluster::start(&ca.issue(&["localhost"]));
    let root = format!("sslrootcert={}", ca.pem_path());

    // verify-full with the server's CA: chain and name check out; the store works.
    let store = store::open(&cluster.url("localhost", &format!("sslmode=verify-full&{root}"))).await.unwrap();
    claim_finish_replay(&*store).await;

    // disable: the server admits no plaintext connection (pg_hba.conf has only hostssl).
    let refused = store::open(&cluster.url("localhost", "sslmode=disable")).await.err().expect("plaintext refused");
    let text = refused.to_string();
    assert!(text.contains("no pg_hba.conf entry") && text.contains("no encryption"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");

    // verify-full with another CA: not trusted, and said so.
    let other = Authority::new("other");
    let wrong = format!("sslmode=verify-full&sslrootcert={}", other.pem_path());
    let text = tls_error(store::open(&cluster.url("localhost", &wrong)).await);
    assert!(text.contains("not signed by a trusted CA") && text.contains("sslrootcert"), "{text}");

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let text = tls_error(store::open(&cluster.url("127.0.0.1", &format!("sslmode=verify-full&{root}"))).await);
    assert!(text.contains("does not name the host"), "{text}");
    let store = store::open(&cluster.url("127.0.0.1", &format!("sslmode=verify-ca&{root}"))).await.unwrap();
    claim_finish_replay(&*store).await;

    // require checks the chain too: without the CA (not among the usual roots) it refuses,
    // with it, any name goes.
    let text = tls_error(store::open(&cluster.url("localhost", "sslmode=require")).await);
    assert!(text.contains("not signed by a trusted CA"), "{text}");
    store::open(&cluster.url("127.0.0.1", &format!("sslmode=require&{root}"))).await.unwrap();

    // prefer (the default) encrypts opportunistically: this server takes only TLS, so
    // opening at all shows that the connection was encrypted.
    let store = store::open(&cluster.url("localhost", "")).await.unwrap();
    claim_finish_replay(&*store).await;
}

#[tokio::test]
async fn a_postgres_store_failing_verification_stops_the_gateway_naming_the_store() {
    let ca = Authority::new("pg-gateway");
    let cluster = PgCluster::start(&ca.issue(&["localhost"]));
    let upstream = Upstream::start().await;

    let wrong = Authority::new("not-the-server's");
    let url = cluster.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", wrong.pem_path()));
    let started = Instant::now();
    let (status, stderr) = Gateway::builder(&upstream.url(), ROUTES).store(&url).expect_exit().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot open store postgres://postgres:***@localhost"), "{stderr}");
    assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "a TLS failure is not waited out");

    // With the right CA the gateway runs on the TLS-only cluster: one execution, then a replay.
    let url = cluster.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", ca.pem_path()));
    let gateway = Gateway::builder(&upstream.url(), ROUTES).store(&url).start().await;
    let order = json!({ "amount": 12 });
    let first = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "pg-tls-1").json(&order)).await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "pg-tls-1").json(&order)).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(upstream.calls_for("pg-tls-1").await, 1);
}

#[tokio::test]
async fn rediss_trusts_the_usual_roots_or_the_ca_it_is_given_and_never_insecure() {
    let ca = Authority::new("redis");
    let server = RedisTls::start(&ca.issue(&["localhost"]), &ca.pem_path()).await;

    // The private CA is not among the usual roots: whatever SSL_CERT_FILE this process
    // has, it cannot hold a CA made a moment ago.
    let text = tls_error(store::open(&server.url("localhost", "")).await);
    assert!(text.contains("not signed by a trusted CA") && text.contains("SSL_CERT_FILE"), "{text}");

    // Trusted explicitly, the store works; the name is still checked.
    let roots = ca_certificates(&ca.pem_path());
    let store = store::redis::RedisStore::connect_trusting(&server.url("localhost", ""), &roots).await.unwrap();
    claim_finish_replay(&store).await;
    let mismatch = store::redis::RedisStore::connect_trusting(&server.url("127.0.0.1", ""), &roots).await;
    let text = tls_error(mismatch.map(|s| Arc::new(s) as Arc<dyn Store>));
    assert!(text.contains("does not name the host"), "{text}");

    // The redis crate's "#insecure" is refused as bad input, not obeyed.
    match store::open(&server.url("localhost", "#insecure")).await {
        Err(store::Error::BadUrl { reason, .. }) => assert!(reason.contains("verification"), "{reason}"),
        Err(other) => panic!("expected a bad URL, got {other:?}"),
        Ok(_) => panic!("#insecure was obeyed"),
    }
}

#[tokio::test]
async fn ssl_cert_file_makes_a_private_ca_trusted_by_the_idem_binary_and_its_gateway() {
    let ca = Authority::new("redis-env");
    let server = RedisTls::start(&ca.issue(&["localhost"]), &ca.pem_path()).await;
    let url = server.url("localhost", "");

    let without =
        idem().args(["log", "stats", "--store", &url]).env_remove("SSL_CERT_FILE").output().expect("idem log runs");
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert_eq!(without.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");

    let with = idem()
        .args(["log", "stats", "--store", &url])
        .env("SSL_CERT_FILE", ca.pem_path())
        .output()
        .expect("idem log runs");
    assert_eq!(with.status.code(), Some(0), "{}", String::from_utf8_lossy(&with.stderr));

    let upstream = Upstream::start().await;
    let gateway =
        Gateway::builder(&upstream.url(), ROUTES).store(&url).env("SSL_CERT_FILE", &ca.pem_path()).start().await;
    let order = json!({ "amount": 13 });
    let first = send(client().post(gateway.url("/orders")).header("Idempotency-Key", "redis-tls-1").json(&order)).await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay =
        send(client().post(gateway.url("/orders")).header("Idempotency-Key", "redis-tls-1").json(&order)).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(upstream.calls_for("redis-tls-1").await, 1);
}
