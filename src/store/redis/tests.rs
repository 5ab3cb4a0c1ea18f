//! Tests against a real Redis: `IDEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`),
//! each test under a fresh random prefix.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::core::{Decision, ExecuteReason, Fingerprint, OnUnknown, StoredResponse};
use crate::store::{ListQuery, now_millis};

crate::conformance_tests!({ fresh_store().await });
crate::rule_tests!({ fresh_store().await });

#[async_trait]
impl crate::store::conformance::Seed for RedisStore {
    async fn seed(&self, record: &Record) {
        // Written "at" its creation, so its time to live runs from there: the rule tests'
        // instants are fixed, and Redis's own expiry must not beat the purge under test.
        let seen = self.claim_script(&record.id, Some(record), record.created_at).await.unwrap();
        assert!(matches!(seen, Seen::Inserted), "{} was taken", record.id);
    }
}

const REVIEW: ClaimPolicy = ClaimPolicy {
    on_unknown: OnUnknown::Review,
    on_change: crate::core::OnChange::Reject,
    replays: crate::core::Replays::Count,
    lookup: crate::core::Lookup::None,
};

fn base_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn with_prefix(url: &str, prefix: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}prefix={prefix}")
}

fn fresh_prefix() -> String {
    format!("idem_t_{:016x}", rand::random::<u64>())
}

/// A store under a fresh prefix; panics loudly when Redis is not there, since CI treats a
/// missing service as a failure.
async fn fresh_store() -> RedisStore {
    store_at(&fresh_prefix()).await
}

async fn store_at(prefix: &str) -> RedisStore {
    let base = base_url();
    let store = RedisStore::connect(&with_prefix(&base, prefix)).await.unwrap_or_else(|e| {
        panic!(
            "\n\nthe Redis store tests need a running Redis at {} (set IDEM_TEST_REDIS_URL to use another): {e}\n\n",
            target::redact(&base)
        )
    });
    expire_schema(&store).await;
    store
}

/// The schema key never expires by design; a test's must not stay behind for ever (records
/// and indexes expire by themselves).
async fn expire_schema(store: &RedisStore) {
    let _: () = redis::cmd("PEXPIRE")
        .arg(&store.keys.schema)
        .arg(3_600_000)
        .query_async(&mut store.conn.clone())
        .await
        .unwrap();
}

fn intent(key: &str, now: Millis, ttl_ms: Millis) -> Intent {
    Intent {
        id: RecordId::new("orders", "t1", key),
        fingerprint: Fingerprint([1; 32]),
        now,
        ttl_ms,
        lease_ms: 5_000,
        correlation_id: None,
    }
}

fn answer() -> Outcome {
    Outcome::Completed(StoredResponse { status: 201, headers: vec![], body: Bytes::from_static(b"{}"), retained: true })
}

async fn complete(store: &RedisStore, key: &str, now: Millis) -> RecordId {
    let claim = store.claim(&intent(key, now, 60_000), REVIEW).await.unwrap();
    assert_eq!(claim.decision, Decision::Execute(ExecuteReason::New));
    let id = claim.record.unwrap().id;
    assert!(store.finish(&id, claim.token.unwrap(), answer(), now).await.unwrap());
    id
}

async fn pttl(store: &RedisStore, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(&mut store.conn.clone()).await.unwrap()
}

#[tokio::test]
async fn bad_urls_are_refused_before_connecting() {
    for url in
        ["redis://127.0.0.1:6379?prefx=a", "redis://127.0.0.1:6379/zero", "redis//127.0.0.1", "rediss://h/0#insecure"]
    {
        let err = open(url).await.err();
        assert!(matches!(err, Some(Error::BadUrl { .. })), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_and_the_message_has_no_password() {
    let err = open("redis://:hunter2@127.0.0.1:1").await.err().expect("nothing listens on port 1");
    let message = err.to_string();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(message.contains("127.0.0.1:1") && !message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn a_prefix_written_by_a_newer_idem_is_refused() {
    let prefix = fresh_prefix();
    let store = store_at(&prefix).await;
    let _: () = redis::cmd("SET")
        .arg(&store.keys.schema)
        .arg(99)
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut store.conn.clone())
        .await
        .unwrap();
    let err = RedisStore::connect(&with_prefix(&base_url(), &prefix)).await.err();
    assert!(matches!(err, Some(Error::TooNew { found: 99, supported: SCHEMA_VERSION })), "{err:?}");
}

/// Redis forgets a record by itself: a time to live is set at its expiry, extended while a
/// renewed lease outlives it; the indexes live as long as their records.
#[tokio::test]
async fn records_carry_a_redis_time_to_live() {
    let store = fresh_store().await;
    let now = now_millis();
    let id = complete(&store, "done", now).await;
    let left = pttl(&store, &store.keys.record(&id)).await;
    assert!(left > 0 && left <= 60_000, "completed record: PTTL {left}");
    for index in [&store.keys.created, &store.keys.expires] {
        assert!(pttl(&store, index).await > 0, "{index} expires with its records");
    }
    let slow = store.claim(&intent("slow", now, 60_000), REVIEW).await.unwrap();
    assert!(store.renew(&slow.record.unwrap().id, slow.token.unwrap(), now + 120_000).await.unwrap());
    let left = pttl(&store, &store.keys.record(&RecordId::new("orders", "t1", "slow"))).await;
    assert!(left > 60_000 && left <= 120_000, "a lease renewed past the expiry keeps the record: PTTL {left}");
}

/// Two processes sharing one Redis: exactly one claim of many concurrent ones executes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_race_across_two_stores_has_one_winner() {
    let prefix = fresh_prefix();
    let stores: [Arc<dyn Store>; 2] = [Arc::new(store_at(&prefix).await), Arc::new(store_at(&prefix).await)];
    crate::store::conformance::race_has_one_winner(&stores).await;
}

/// Many concurrent claims on a record that must be rewritten (a retry recovery) go through
/// the compare-and-set: exactly one wins, across processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_recovery_race_has_one_winner() {
    let prefix = fresh_prefix();
    let stores = [Arc::new(store_at(&prefix).await), Arc::new(store_at(&prefix).await)];
    let now = now_millis();
    let first = stores[0].claim(&intent("again", now, 60_000), REVIEW).await.unwrap();
    let id = first.record.unwrap().id;
    let failed = Outcome::Retryable { error: "upstream answered 503".into() };
    assert!(stores[0].finish(&id, first.token.unwrap(), failed, now).await.unwrap());
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = stores[i % 2].clone();
            tokio::spawn(async move { store.claim(&intent("again", now + 1, 60_000), REVIEW).await.unwrap().decision })
        })
        .collect();
    let mut decisions = Vec::new();
    for task in tasks {
        decisions.push(task.await.unwrap());
    }
    let recovered = decisions.iter().filter(|d| **d == Decision::Execute(ExecuteReason::RetryRecovery)).count();
    assert_eq!(recovered, 1, "{decisions:?}");
    assert!(decisions.iter().all(|d| d.executes() || *d == Decision::InFlight), "{decisions:?}");
    assert_eq!(stores[1].get(&id).await.unwrap().unwrap().attempt_count, 2);
}

/// Replays are counted in memory and written by one TOUCH per flush.
#[tokio::test]
async fn replay_counts_are_flushed() {
    let store = fresh_store().await;
    let now = now_millis();
    let id = complete(&store, "hot", now).await;
    for later in [now + 5, now + 9, now + 7] {
        assert_eq!(store.claim(&intent("hot", later, 60_000), REVIEW).await.unwrap().decision, Decision::Replay);
    }
    flush(store.conn.clone(), store.keys.clone(), store.addr.clone(), store.touches.take()).await;
    let record = store.get(&id).await.unwrap().unwrap();
    assert_eq!((record.replay_count, record.last_seen_at), (3, now + 9));
}

/// When Redis drops a record by itself, its index entries go at purge, with any record
/// that Redis still holds past its deadline; the key is new again.
#[tokio::test]
async fn entries_of_records_redis_dropped_are_purged() {
    let store = fresh_store().await;
    let now = now_millis();
    let id = complete(&store, "gone", now).await;
    complete(&store, "kept", now).await;
    // What Redis does when the time to live runs out.
    let _: () = redis::cmd("DEL").arg(store.keys.record(&id)).query_async(&mut store.conn.clone()).await.unwrap();
    assert_eq!(store.purge_expired(now + 60_000, 10).await.unwrap(), 2);
    assert_eq!(store.get(&RecordId::new("orders", "t1", "kept")).await.unwrap(), None);
    for index in [&store.keys.created, &store.keys.expires] {
        let left: i64 = redis::cmd("ZCARD").arg(index).query_async(&mut store.conn.clone()).await.unwrap();
        assert_eq!(left, 0, "{index}");
    }
    let again = store.claim(&intent("gone", now + 60_001, 60_000), REVIEW).await.unwrap();
    assert_eq!(again.decision, Decision::Execute(ExecuteReason::New));
}

/// Listing reads the index, never the keyspace: a record missing from the index is not
/// listed, and an index entry without a record is skipped and removed.
#[tokio::test]
async fn listing_reads_the_index_not_the_keyspace() {
    let store = fresh_store().await;
    let now = now_millis();
    for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
        complete(&store, key, now + i as i64).await;
    }
    let b = RecordId::new("orders", "t1", "b");
    let mut conn = store.conn.clone();
    let _: () =
        redis::cmd("ZREM").arg(&store.keys.created).arg(member(now + 1, &b)).query_async(&mut conn).await.unwrap();
    let ghost = member(now + 3, &RecordId::new("orders", "t1", "ghost"));
    let _: () = redis::cmd("ZADD").arg(&store.keys.created).arg(0).arg(&ghost).query_async(&mut conn).await.unwrap();
    let page = store.list(&ListQuery { limit: 10, ..Default::default() }).await.unwrap();
    let keys: Vec<_> = page.records.iter().map(|r| r.id.key.as_str()).collect();
    assert_eq!(keys, ["c", "a"]);
    assert!(store.get(&b).await.unwrap().is_some(), "b exists, it is only missing from the index");
    let score: Option<f64> =
        redis::cmd("ZSCORE").arg(&store.keys.created).arg(&ghost).query_async(&mut conn).await.unwrap();
    assert_eq!(score, None, "the entry without a record was removed");
}

/// Forwards connections to Redis until aborted; aborting closes every forwarded connection.
fn relay(listener: TcpListener, upstream: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            connections.spawn(async move {
                if let Ok(mut server) = TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

/// Accepts connections and never answers.
fn black_hole(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    })
}

/// While Redis is away every operation fails promptly with `Unavailable` (refused, or no
/// answer at all); once it is back, operations recover without reopening the store.
#[tokio::test]
async fn operations_fail_fast_during_an_outage_and_recover_after_it() {
    let base = url::Url::parse(&base_url()).unwrap();
    let upstream = format!("{}:{}", base.host_str().unwrap(), base.port().unwrap_or(6379));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut through = base.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(port)).unwrap();
    let mut forwarding = relay(listener, upstream.clone());
    let store = RedisStore::connect(&with_prefix(through.as_str(), &fresh_prefix())).await.unwrap();
    expire_schema(&store).await;
    let now = now_millis();
    let before = complete(&store, "before", now).await;

    let fails_fast = |key: &'static str| {
        let store = &store;
        async move {
            let intent = intent(key, now, 60_000);
            let claim = tokio::time::timeout(Duration::from_secs(10), store.claim(&intent, REVIEW));
            let result = claim.await.expect("an outage never hangs a request");
            assert!(matches!(result, Err(Error::Unavailable(_))), "{key}: {result:?}");
        }
    };
    forwarding.abort();
    let _ = forwarding.await;
    fails_fast("refused-1").await;
    fails_fast("refused-2").await;
    let hole = black_hole(TcpListener::bind(("127.0.0.1", port)).await.unwrap());
    fails_fast("no-answer").await;
    hole.abort();
    let _ = hole.await;

    forwarding = relay(TcpListener::bind(("127.0.0.1", port)).await.unwrap(), upstream);
    let mut recovered = None;
    for _ in 0..50 {
        match store.claim(&intent("after", now, 60_000), REVIEW).await {
            Ok(claim) => {
                recovered = Some(claim.decision);
                break;
            }
            Err(Error::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(recovered, Some(Decision::Execute(ExecuteReason::New)), "the store reconnects by itself");
    assert!(store.get(&before).await.unwrap().is_some());
    forwarding.abort();
}
