//! The store conformance suite: what every backend must do, as runnable checks.
//!
//! `conformance_tests!(expr)` expands to one `#[tokio::test]` per check, where `expr`
//! (evaluated in an async context) builds a fresh store. Backends run it in their own
//! test modules or integration tests; semantics never change with the backend.
//!
//! `rule_tests!(expr)` checks the rules a backend restates in its own language (SQL `WHERE`
//! clauses, Lua scripts, its row mapping) against the core's statement of them
//! (`Record::is_expired`, `Record::is_owned_by`, `Record::renew`, `Record::finish`,
//! `core::plan_claim`), for every shape of record the rules tell apart: each status, with
//! a live lease, a lease that ends now, one that ran out, and none; expiring before, at and
//! after now; asked with the current token and a wrong one. The store must implement
//! [`Seed`], so the cases can be written as they are.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Cursor, Error, ListQuery, Page, Store};
use crate::core::{
    ClaimPolicy, Decision, ExecuteReason, Fingerprint, Intent, Lease, LeaseToken, Millis, OnChange, OnUnknown, Outcome,
    Record, RecordId, Replays, Resolution, Status, StoredResponse, Transition, plan_claim,
};

/// Expands to one test per conformance check, each on a store built by `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            claim_then_replay, concurrent_claims_have_one_winner, reused_key_is_rejected,
            live_lease_is_in_flight, dead_owner_is_outcome_unknown, stale_owner_is_fenced_off,
            renew_extends_the_lease, retryable_failure_recovers, expired_record_is_claimed_anew,
            purge_removes_only_expired, unretained_response_is_gone, list_pages_newest_first,
            list_filters_by_a_literal_key_prefix,
            delete_forgets, resolve_settles_unknown, stats_count_by_scope_and_status,
            tenants_never_meet, responses_round_trip_exactly, changed_payload_is_resent_when_allowed,
            a_new_version_supersedes_any_state_but_a_live_lease, get_many_reads_in_order,
            a_lookup_settles_an_unknown_outcome_under_the_lease, an_absent_or_failed_lookup_settles_nothing);
    };
    (@each $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let store: std::sync::Arc<dyn $crate::store::Store> = std::sync::Arc::new($make);
                $crate::store::conformance::$case(store).await;
            }
        )*
    };
}

/// Expands to one test per rule check, each on a store built by `$make`, which must
/// implement [`Seed`].
#[macro_export]
macro_rules! rule_tests {
    ($make:expr) => {
        $crate::rule_tests!(@each $make;
            seeded_records_read_back_exactly, purge_deletes_what_the_core_calls_expired,
            renew_is_fenced_as_the_core_says, finish_is_fenced_as_the_core_says,
            claim_decides_as_the_core_plans);
    };
    (@each $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let store: std::sync::Arc<dyn $crate::store::conformance::Seed> = std::sync::Arc::new($make);
                $crate::store::conformance::$case(store).await;
            }
        )*
    };
}

/// A store the rule tables can fill with any record exactly as given, bypassing the core:
/// test fixtures only (idem itself writes records through `plan_claim`, `finish` and
/// `resolve`), implemented by each backend in its tests.
#[async_trait]
pub trait Seed: Store {
    /// Stores `record` under its id, which holds nothing yet, as if written at its
    /// `created_at` (Redis counts its time to live from there).
    async fn seed(&self, record: &Record);
}

const T0: i64 = 1_700_000_000_000;
const TTL: i64 = 3_600_000;
const LEASE: i64 = 30_000;

fn intent(key: &str, fp: u8, now: i64) -> Intent {
    intent_for(RecordId::new("orders", "t1", key), fp, now)
}

fn intent_for(id: RecordId, fp: u8, now: i64) -> Intent {
    Intent {
        id,
        fingerprint: Fingerprint([fp; 32]),
        now,
        ttl_ms: TTL,
        lease_ms: LEASE,
        correlation_id: Some("req-1".into()),
    }
}

fn response(status: u16, body: &'static str) -> StoredResponse {
    StoredResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from_static(body.as_bytes()),
        retained: true,
    }
}

const REVIEW: ClaimPolicy = ClaimPolicy {
    on_unknown: OnUnknown::Review,
    on_change: crate::core::OnChange::Reject,
    replays: crate::core::Replays::Count,
    lookup: crate::core::Lookup::None,
};
const RETRY: ClaimPolicy = ClaimPolicy {
    on_unknown: OnUnknown::Retry,
    on_change: crate::core::OnChange::Reject,
    replays: crate::core::Replays::Count,
    lookup: crate::core::Lookup::None,
};

const LOOKUP: ClaimPolicy = ClaimPolicy { lookup: crate::core::Lookup::Configured, ..REVIEW };

/// Claims `key` and lets the owner die: the record is `in_progress` with a dead lease.
async fn lose_owner(store: &dyn Store, key: &str) -> RecordId {
    let claim = store.claim(&intent(key, 1, T0), REVIEW).await.unwrap();
    assert!(claim.decision.executes());
    claim.record.unwrap().id
}

/// A record whose owner died is verified by one caller at a time under a lease; a found
/// answer completes it with its note, is replayed, and a stale verifier is fenced off.
pub async fn a_lookup_settles_an_unknown_outcome_under_the_lease(store: Arc<dyn Store>) {
    let id = lose_owner(store.as_ref(), "k").await;
    let late = T0 + LEASE + 1;
    let verify = store.claim(&intent("k", 1, late), LOOKUP).await.unwrap();
    assert_eq!(verify.decision, Decision::Verify);
    let token = verify.token.expect("a verifier holds the lease");
    let held = store.get(&id).await.unwrap().unwrap();
    assert_eq!((held.status, held.lease.map(|l| l.token), held.attempt_count), (Status::InProgress, Some(token), 1));
    let other = store.claim(&intent("k", 1, late + 1), LOOKUP).await.unwrap();
    assert_eq!((other.decision, other.token), (Decision::InFlight, None), "one verifier at a time");
    // The verifier dies too: the next caller verifies under a fresh lease, the old one is fenced.
    let again = store.claim(&intent("k", 1, late + LEASE + 1), LOOKUP).await.unwrap();
    assert_eq!(again.decision, Decision::Verify);
    let found = Outcome::Verified { response: response(201, r#"{"id":7}"#), note: "settled by lookup".into() };
    assert!(!store.finish(&id, token, found.clone(), late + LEASE + 2).await.unwrap());
    assert!(store.finish(&id, again.token.unwrap(), found, late + LEASE + 2).await.unwrap());
    let settled = store.get(&id).await.unwrap().unwrap();
    assert_eq!((settled.status, settled.lease), (Status::Completed, None));
    assert_eq!(settled.response, Some(response(201, r#"{"id":7}"#)));
    assert_eq!(settled.error_summary.as_deref(), Some("settled by lookup"));
    assert_eq!(settled.attempt_count, 1, "nothing executed");
    let replay = store.claim(&intent("k", 1, late + LEASE + 3), LOOKUP).await.unwrap();
    assert_eq!(replay.decision, Decision::Replay);
}

/// An absent answer releases the record (the next claim executes it); a failed lookup
/// leaves it `outcome_unknown`, to be verified again.
pub async fn an_absent_or_failed_lookup_settles_nothing(store: Arc<dyn Store>) {
    let id = lose_owner(store.as_ref(), "k").await;
    let late = T0 + LEASE + 1;
    let verify = store.claim(&intent("k", 1, late), LOOKUP).await.unwrap();
    let failed = Outcome::Unknown { error: "lookup answered 500".into() };
    assert!(store.finish(&id, verify.token.unwrap(), failed, late + 1).await.unwrap());
    let unknown = store.get(&id).await.unwrap().unwrap();
    assert_eq!((unknown.status, unknown.lease), (Status::OutcomeUnknown, None));
    assert_eq!(store.claim(&intent("k", 1, late + 2), REVIEW).await.unwrap().decision, Decision::OutcomeUnknown);
    let verify = store.claim(&intent("k", 1, late + 3), LOOKUP).await.unwrap();
    assert_eq!(verify.decision, Decision::Verify);
    let absent = Outcome::Retryable { error: "released: the lookup found nothing".into() };
    assert!(store.finish(&id, verify.token.unwrap(), absent, late + 4).await.unwrap());
    let retry = store.claim(&intent("k", 1, late + 5), LOOKUP).await.unwrap();
    assert_eq!(retry.decision, Decision::Execute(ExecuteReason::RetryRecovery));
    assert_eq!(retry.record.unwrap().attempt_count, 2);
}

/// Claims and completes `key`, returning nothing; panics when the store disagrees.
async fn complete(store: &dyn Store, key: &str, now: i64) {
    let claim = store.claim(&intent(key, 1, now), REVIEW).await.unwrap();
    assert!(claim.decision.executes(), "{key}: {:?}", claim.decision);
    let done = store
        .finish(&claim.record.unwrap().id, claim.token.unwrap(), Outcome::Completed(response(201, "{}")), now)
        .await;
    assert!(done.unwrap());
}

/// A new key executes once; the same intent then replays the stored answer.
pub async fn claim_then_replay(store: Arc<dyn Store>) {
    let first = store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    assert_eq!(first.decision, Decision::Execute(ExecuteReason::New));
    let record = first.record.clone().unwrap();
    assert_eq!((record.status, record.attempt_count), (Status::InProgress, 1));
    assert!(first.token.is_some());
    let done = Outcome::Completed(response(201, r#"{"id":1}"#));
    assert!(store.finish(&record.id, first.token.unwrap(), done, T0 + 5).await.unwrap());
    let again = store.claim(&intent("k", 1, T0 + 10), REVIEW).await.unwrap();
    assert_eq!(again.decision, Decision::Replay);
    assert_eq!(again.token, None);
    assert_eq!(again.record.unwrap().response.unwrap(), response(201, r#"{"id":1}"#));
    let stored = store.get(&record.id).await.unwrap().unwrap();
    assert_eq!(stored.status, Status::Completed);
    assert_eq!(stored.lease, None);
}

/// Many concurrent identical intents: exactly one executes.
pub async fn concurrent_claims_have_one_winner(store: Arc<dyn Store>) {
    race_has_one_winner(&[store]).await;
}

/// Races 32 identical claims across `stores`, round robin: exactly one executes. Several
/// stores opened on one backend make it a race across processes.
pub async fn race_has_one_winner(stores: &[Arc<dyn Store>]) {
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            tokio::spawn(async move { store.claim(&intent("race", 1, T0), REVIEW).await.unwrap().decision })
        })
        .collect();
    let mut executed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Decision::Execute(_) => executed += 1,
            Decision::InFlight => {}
            other => panic!("unexpected decision {other:?}"),
        }
    }
    assert_eq!(executed, 1);
}

/// A key held by another payload is rejected, in flight or completed.
pub async fn reused_key_is_rejected(store: Arc<dyn Store>) {
    let claim = store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    assert_eq!(store.claim(&intent("k", 2, T0), REVIEW).await.unwrap().decision, Decision::KeyReused);
    store
        .finish(&claim.record.unwrap().id, claim.token.unwrap(), Outcome::Completed(response(200, "")), T0)
        .await
        .unwrap();
    assert_eq!(store.claim(&intent("k", 2, T0 + 1), REVIEW).await.unwrap().decision, Decision::KeyReused);
}

/// While the owner's lease lives, duplicates are told the intent is in flight.
pub async fn live_lease_is_in_flight(store: Arc<dyn Store>) {
    store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    let dup = store.claim(&intent("k", 1, T0 + LEASE - 1), REVIEW).await.unwrap();
    assert_eq!(dup.decision, Decision::InFlight);
    assert_eq!(dup.token, None);
}

/// An owner that stops renewing is presumed dead: the record becomes `outcome_unknown`
/// and stays so (review), or is re-executed (retry).
pub async fn dead_owner_is_outcome_unknown(store: Arc<dyn Store>) {
    store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    let later = store.claim(&intent("k", 1, T0 + LEASE + 1), REVIEW).await.unwrap();
    assert_eq!(later.decision, Decision::OutcomeUnknown);
    let id = RecordId::new("orders", "t1", "k");
    assert_eq!(store.get(&id).await.unwrap().unwrap().status, Status::OutcomeUnknown);
    let still = store.claim(&intent("k", 1, T0 + LEASE + 2), REVIEW).await.unwrap();
    assert_eq!(still.decision, Decision::OutcomeUnknown);
    let retried = store.claim(&intent("k", 1, T0 + LEASE + 3), RETRY).await.unwrap();
    assert_eq!(retried.decision, Decision::Execute(ExecuteReason::UnknownRetry));
    assert_eq!(retried.record.unwrap().attempt_count, 2);
}

/// A stale owner can neither renew nor complete once its lease was taken over.
pub async fn stale_owner_is_fenced_off(store: Arc<dyn Store>) {
    let old = store.claim(&intent("k", 1, T0), RETRY).await.unwrap();
    let new = store.claim(&intent("k", 1, T0 + LEASE + 1), RETRY).await.unwrap();
    assert!(new.decision.executes());
    let id = RecordId::new("orders", "t1", "k");
    let old_token = old.token.unwrap();
    assert!(!store.renew(&id, old_token, T0 + 10 * LEASE).await.unwrap());
    assert!(!store.finish(&id, old_token, Outcome::Completed(response(201, "stale")), T0 + LEASE + 2).await.unwrap());
    assert!(
        store
            .finish(&id, new.token.unwrap(), Outcome::Completed(response(201, "fresh")), T0 + LEASE + 3)
            .await
            .unwrap()
    );
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.response.unwrap().body, Bytes::from_static(b"fresh"));
    // A finished record has no owner left at all.
    assert!(
        !store
            .finish(&id, new.token.unwrap(), Outcome::Retryable { error: "late".into() }, T0 + LEASE + 4)
            .await
            .unwrap()
    );
}

/// Renewal keeps an owner alive past its first lease.
pub async fn renew_extends_the_lease(store: Arc<dyn Store>) {
    let claim = store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    let id = claim.record.unwrap().id;
    assert!(store.renew(&id, claim.token.unwrap(), T0 + 3 * LEASE).await.unwrap());
    let dup = store.claim(&intent("k", 1, T0 + 2 * LEASE), REVIEW).await.unwrap();
    assert_eq!(dup.decision, Decision::InFlight);
    assert!(!store.renew(&id, claim.token.unwrap() ^ 1, T0 + 4 * LEASE).await.unwrap());
}

/// A retryable failure releases the key: the next attempt executes (a retry recovery).
pub async fn retryable_failure_recovers(store: Arc<dyn Store>) {
    let claim = store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    let id = claim.record.unwrap().id;
    let failed = Outcome::Retryable { error: "upstream answered 503".into() };
    assert!(store.finish(&id, claim.token.unwrap(), failed, T0 + 1).await.unwrap());
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, Status::FailedRetryable);
    assert_eq!(stored.error_summary.as_deref(), Some("upstream answered 503"));
    let again = store.claim(&intent("k", 1, T0 + 2), REVIEW).await.unwrap();
    assert_eq!(again.decision, Decision::Execute(ExecuteReason::RetryRecovery));
    assert_eq!(again.record.unwrap().attempt_count, 2);
}

/// After its TTL a record no longer counts: the key executes again, even with another payload.
pub async fn expired_record_is_claimed_anew(store: Arc<dyn Store>) {
    complete(store.as_ref(), "k", T0).await;
    let later = store.claim(&intent("k", 2, T0 + TTL + 1), REVIEW).await.unwrap();
    assert_eq!(later.decision, Decision::Execute(ExecuteReason::Expired));
    let record = later.record.unwrap();
    assert_eq!((record.attempt_count, record.created_at), (1, T0 + TTL + 1));
}

/// Purge removes expired records in batches, and nothing else.
pub async fn purge_removes_only_expired(store: Arc<dyn Store>) {
    for i in 0..5 {
        complete(store.as_ref(), &format!("old{i}"), T0).await;
    }
    complete(store.as_ref(), "new", T0 + TTL).await;
    // An action that outlives its TTL keeps its record while its lease lives.
    let slow = store.claim(&intent("slow", 1, T0), REVIEW).await.unwrap();
    store.renew(&slow.record.unwrap().id, slow.token.unwrap(), T0 + 2 * TTL).await.unwrap();
    assert_eq!(store.purge_expired(T0 + TTL + 1, 3).await.unwrap(), 3);
    assert_eq!(store.purge_expired(T0 + TTL + 1, 3).await.unwrap(), 2);
    assert_eq!(store.purge_expired(T0 + TTL + 1, 3).await.unwrap(), 0);
    assert!(store.get(&RecordId::new("orders", "t1", "new")).await.unwrap().is_some());
    assert!(store.get(&RecordId::new("orders", "t1", "slow")).await.unwrap().is_some());
}

/// A completed record whose answer was too large is never executed again, nor replayed.
pub async fn unretained_response_is_gone(store: Arc<dyn Store>) {
    let claim = store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    let big = StoredResponse { status: 200, headers: vec![], body: Bytes::new(), retained: false };
    store.finish(&claim.record.unwrap().id, claim.token.unwrap(), Outcome::Completed(big), T0).await.unwrap();
    assert_eq!(store.claim(&intent("k", 1, T0 + 1), REVIEW).await.unwrap().decision, Decision::NotRetained);
}

/// Listing is newest first, filtered and paginated with an opaque cursor.
pub async fn list_pages_newest_first(store: Arc<dyn Store>) {
    for i in 0..7 {
        complete(store.as_ref(), &format!("key-{i}"), T0 + i).await;
    }
    store.claim(&intent_for(RecordId::new("refunds", "t1", "key-x"), 1, T0 + 100), REVIEW).await.unwrap();
    let mut query = ListQuery { scope: Some("orders".into()), limit: 3, ..Default::default() };
    let mut seen = Vec::new();
    loop {
        let page = store.list(&query).await.unwrap();
        seen.extend(page.records.iter().map(|r| r.id.key.clone()));
        match page.next_cursor {
            Some(token) => query.cursor = Some(Cursor::decode(&token).expect("cursor decodes")),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("key-{i}")).collect();
    assert_eq!(seen, expected);
    let in_progress = ListQuery { status: Some(Status::InProgress), limit: 10, ..Default::default() };
    let page = store.list(&in_progress).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].id.scope, "refunds");
    let prefixed = ListQuery { key_prefix: Some("key-1".into()), limit: 10, ..Default::default() };
    assert_eq!(store.list(&prefixed).await.unwrap().records.len(), 1);
    let other_tenant = ListQuery { tenant: Some("t2".into()), limit: 10, ..Default::default() };
    assert!(store.list(&other_tenant).await.unwrap().records.is_empty());
}

/// The `Key prefix` filter (the Idempotency Log page's): a literal prefix, never a pattern
/// (`_` and `%` match only themselves), combined with the other filters and paged by cursor.
pub async fn list_filters_by_a_literal_key_prefix(store: Arc<dyn Store>) {
    for (i, key) in ["inv_1", "inv%2", "invX3", "inv_4", "other_5"].into_iter().enumerate() {
        complete(store.as_ref(), key, T0 + i as i64).await;
    }
    let keys = |page: &Page| page.records.iter().map(|r| r.id.key.clone()).collect::<Vec<_>>();
    let underscore = ListQuery { key_prefix: Some("inv_".into()), limit: 1, ..Default::default() };
    let first = store.list(&underscore).await.unwrap();
    assert_eq!(keys(&first), ["inv_4"]);
    let cursor = Cursor::decode(&first.next_cursor.expect("a second page")).expect("cursor decodes");
    let second = store.list(&ListQuery { cursor: Some(cursor), ..underscore }).await.unwrap();
    assert_eq!((keys(&second), second.next_cursor), (vec!["inv_1".to_owned()], None));
    let percent = ListQuery {
        scope: Some("orders".into()),
        tenant: Some("t1".into()),
        status: Some(Status::Completed),
        key_prefix: Some("inv%".into()),
        limit: 10,
        cursor: None,
    };
    assert_eq!(keys(&store.list(&percent).await.unwrap()), ["inv%2"]);
}

/// A deleted record is forgotten: the key executes again (a forced re-send).
pub async fn delete_forgets(store: Arc<dyn Store>) {
    complete(store.as_ref(), "k", T0).await;
    let id = RecordId::new("orders", "t1", "k");
    assert!(store.delete(&id).await.unwrap());
    assert!(!store.delete(&id).await.unwrap());
    assert!(store.get(&id).await.unwrap().is_none());
    let again = store.claim(&intent("k", 1, T0 + 1), REVIEW).await.unwrap();
    assert_eq!(again.decision, Decision::Execute(ExecuteReason::New));
}

/// An operator settles `outcome_unknown`: release executes next time; complete replays.
pub async fn resolve_settles_unknown(store: Arc<dyn Store>) {
    for key in ["a", "b"] {
        store.claim(&intent(key, 1, T0), REVIEW).await.unwrap();
        store.claim(&intent(key, 1, T0 + LEASE + 1), REVIEW).await.unwrap();
    }
    let a = RecordId::new("orders", "t1", "a");
    let released = store.resolve(&a, Resolution::Release, T0 + LEASE + 2).await.unwrap();
    assert_eq!(released.status, Status::FailedRetryable);
    let next = store.claim(&intent("a", 1, T0 + LEASE + 3), REVIEW).await.unwrap();
    assert_eq!(next.decision, Decision::Execute(ExecuteReason::RetryRecovery));
    let b = RecordId::new("orders", "t1", "b");
    let settled = store.resolve(&b, Resolution::Complete(response(201, "manual")), T0 + LEASE + 2).await.unwrap();
    assert_eq!(settled.status, Status::Completed);
    let replay = store.claim(&intent("b", 1, T0 + LEASE + 3), REVIEW).await.unwrap();
    assert_eq!(replay.decision, Decision::Replay);
    assert_eq!(replay.record.unwrap().response.unwrap().body, Bytes::from_static(b"manual"));
    let again = store.resolve(&b, Resolution::Release, T0 + LEASE + 4).await;
    assert!(matches!(again, Err(Error::NotResolvable(_))), "{again:?}");
    let missing = store.resolve(&RecordId::new("orders", "t1", "none"), Resolution::Release, T0).await;
    assert!(matches!(missing, Err(Error::NotFound)), "{missing:?}");
}

/// Stats count records by scope and status.
pub async fn stats_count_by_scope_and_status(store: Arc<dyn Store>) {
    complete(store.as_ref(), "a", T0).await;
    complete(store.as_ref(), "b", T0).await;
    store.claim(&intent("c", 1, T0), REVIEW).await.unwrap();
    store.claim(&intent_for(RecordId::new("refunds", "t9", "x"), 1, T0), REVIEW).await.unwrap();
    let mut stats: Vec<(String, Status, u64)> =
        store.stats().await.unwrap().into_iter().map(|s| (s.scope, s.status, s.count)).collect();
    stats.sort();
    assert_eq!(
        stats,
        vec![
            ("orders".into(), Status::InProgress, 1),
            ("orders".into(), Status::Completed, 2),
            ("refunds".into(), Status::InProgress, 1),
        ]
    );
}

/// The same scope and key under two tenants are two independent records.
pub async fn tenants_never_meet(store: Arc<dyn Store>) {
    let a = RecordId::new("orders", "tenant-a", "k");
    let b = RecordId::new("orders", "tenant-b", "k");
    let first = store.claim(&intent_for(a.clone(), 1, T0), REVIEW).await.unwrap();
    store.finish(&a, first.token.unwrap(), Outcome::Completed(response(201, "a's answer")), T0).await.unwrap();
    let other = store.claim(&intent_for(b.clone(), 2, T0 + 1), REVIEW).await.unwrap();
    assert_eq!(other.decision, Decision::Execute(ExecuteReason::New));
    assert!(store.delete(&b).await.unwrap());
    assert!(store.get(&a).await.unwrap().is_some());
}

/// Status, header order, non-UTF-8 header bytes and binary bodies come back exactly.
pub async fn responses_round_trip_exactly(store: Arc<dyn Store>) {
    let claim = store.claim(&intent("k", 1, T0), REVIEW).await.unwrap();
    let answer = StoredResponse {
        status: 418,
        headers: vec![("x-b".into(), "2".into()), ("x-a".into(), "1".into()), ("x-a".into(), "caf\u{e9}".into())],
        body: Bytes::from(vec![0u8, 159, 146, 150, 255]),
        retained: true,
    };
    store
        .finish(&claim.record.unwrap().id, claim.token.unwrap(), Outcome::Completed(answer.clone()), T0)
        .await
        .unwrap();
    let replay = store.claim(&intent("k", 1, T0 + 1), REVIEW).await.unwrap();
    assert_eq!(replay.record.unwrap().response.unwrap(), answer);
}

/// With `OnChange::Resend` a completed key takes a changed payload: it is claimed again
/// under the new fingerprint, keeping the previous answer until the new one replaces it.
pub async fn changed_payload_is_resent_when_allowed(store: Arc<dyn Store>) {
    complete(store.as_ref(), "k", T0).await;
    let resend = ClaimPolicy { on_change: crate::core::OnChange::Resend, ..REVIEW };
    let changed = store.claim(&intent("k", 2, T0 + 1), resend).await.unwrap();
    assert_eq!(changed.decision, Decision::Execute(ExecuteReason::Changed));
    let claimed = changed.record.unwrap();
    assert_eq!(claimed.fingerprint, Fingerprint([2; 32]));
    assert_eq!(claimed.response, Some(response(201, "{}")), "the previous answer is kept while re-sending");
    // A failed re-send keeps it too, so the next attempt still knows the external ids.
    let failed = Outcome::Retryable { error: "upstream answered 503".into() };
    assert!(store.finish(&claimed.id, changed.token.unwrap(), failed, T0 + 2).await.unwrap());
    let stored = store.get(&claimed.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.response), (Status::FailedRetryable, Some(response(201, "{}"))));
    let again = store.claim(&intent("k", 2, T0 + 2), resend).await.unwrap();
    assert_eq!(again.decision, Decision::Execute(ExecuteReason::RetryRecovery));
    assert_eq!(again.record.unwrap().response, Some(response(201, "{}")));
    let done = Outcome::Completed(response(200, "updated"));
    assert!(store.finish(&claimed.id, again.token.unwrap(), done, T0 + 2).await.unwrap());
    let replay = store.claim(&intent("k", 2, T0 + 3), resend).await.unwrap();
    assert_eq!(replay.decision, Decision::Replay);
    assert_eq!(replay.record.unwrap().response.unwrap().body, Bytes::from_static(b"updated"));
    assert_eq!(store.claim(&intent("k", 1, T0 + 4), REVIEW).await.unwrap().decision, Decision::KeyReused);
}

/// With `OnChange::Supersede` (the consumer's ordering guard) another payload takes the key
/// over from a failed or abandoned claim, never from a live lease, and the last completed
/// answer stays on the record through it all.
pub async fn a_new_version_supersedes_any_state_but_a_live_lease(store: Arc<dyn Store>) {
    let supersede = ClaimPolicy {
        on_unknown: OnUnknown::Retry,
        on_change: crate::core::OnChange::Supersede,
        replays: crate::core::Replays::Count,
        lookup: crate::core::Lookup::None,
    };
    complete(store.as_ref(), "o", T0).await;
    let v2 = store.claim(&intent("o", 2, T0 + 1), supersede).await.unwrap();
    assert_eq!(v2.decision, Decision::Execute(ExecuteReason::Changed));
    let held = store.claim(&intent("o", 3, T0 + 2), supersede).await.unwrap();
    assert_eq!(held.decision, Decision::InFlight, "a live lease holds the key");
    let id = v2.record.unwrap().id;
    let failed = Outcome::Retryable { error: "not applied".into() };
    assert!(store.finish(&id, v2.token.unwrap(), failed, T0 + 3).await.unwrap());
    let v3 = store.claim(&intent("o", 3, T0 + 4), supersede).await.unwrap();
    assert_eq!(v3.decision, Decision::Execute(ExecuteReason::Changed), "a failed claim gives the key up");
    assert_eq!(v3.record.unwrap().response, Some(response(201, "{}")));
    // Its owner dies: once the lease ran out, the next version takes over.
    let v4 = store.claim(&intent("o", 4, T0 + 5 + LEASE), supersede).await.unwrap();
    assert_eq!(v4.decision, Decision::Execute(ExecuteReason::Changed), "an abandoned claim gives the key up");
    assert_eq!(v4.record.unwrap().response, Some(response(201, "{}")), "the last completed answer survives");
    assert!(
        !store.finish(&id, v3.token.unwrap(), Outcome::Completed(response(200, "v3")), T0 + 6 + LEASE).await.unwrap()
    );
}

/// `get_many` answers in the order asked, with `None` for what is absent.
pub async fn get_many_reads_in_order(store: Arc<dyn Store>) {
    complete(store.as_ref(), "a", T0).await;
    complete(store.as_ref(), "c", T0).await;
    let ids: Vec<RecordId> = ["c", "b", "a"].iter().map(|k| RecordId::new("orders", "t1", *k)).collect();
    let records = store.get_many(&ids).await.unwrap();
    let keys: Vec<Option<&str>> = records.iter().map(|r| r.as_ref().map(|r| r.id.key.as_str())).collect();
    assert_eq!(keys, [Some("c"), None, Some("a")]);
    assert_eq!(records[0].as_ref().unwrap().response, Some(response(201, "{}")));
    assert!(store.get_many(&[]).await.unwrap().is_empty());
}

/// The instant the rule tables are evaluated at.
const NOW: Millis = T0 + 10 * TTL;
/// An hour, the distance of "before" and "after" now in the rule tables.
const HOUR: Millis = 3_600_000;
/// The lease token of every case that has a lease.
const TOKEN: LeaseToken = 7;
/// A token no case holds.
const WRONG: LeaseToken = 8;

/// Every shape of record the rules tell apart, under keys starting with `tag`: each
/// status; with no lease, a live one, one that ends now and one that ran out; expiring
/// before, at and after [`NOW`] (60 records).
fn shapes(tag: &str) -> Vec<Record> {
    let leases =
        [("no-lease", None), ("alive", Some(NOW + HOUR)), ("ends-now", Some(NOW)), ("ran-out", Some(NOW - HOUR))];
    let expiries = [("expired", NOW - HOUR), ("expires-now", NOW), ("live", NOW + HOUR)];
    let mut out = Vec::new();
    for status in Status::ALL {
        for (lease_name, locked_until) in leases {
            for (expiry_name, expires_at) in expiries {
                out.push(Record {
                    id: RecordId::new("rules", "t1", format!("{tag}/{status}/{lease_name}/{expiry_name}")),
                    fingerprint: Fingerprint([1; 32]),
                    status,
                    lease: locked_until.map(|locked_until| Lease { token: TOKEN, locked_until }),
                    response: (status == Status::Completed).then(|| response(201, "{}")),
                    created_at: NOW - 2 * HOUR,
                    last_seen_at: NOW - 2 * HOUR,
                    expires_at,
                    replay_count: 0,
                    attempt_count: 1,
                    correlation_id: Some("req-0".into()),
                    error_summary: (status != Status::Completed && status != Status::InProgress).then(|| "e".into()),
                });
            }
        }
    }
    out
}

/// Writes `records` into the store.
async fn seed_all(store: &dyn Seed, records: &[Record]) {
    for record in records {
        store.seed(record).await;
    }
}

/// Purges at `now` until nothing is left to purge; returns how many went.
async fn purge_all(store: &dyn Seed, now: Millis) -> u64 {
    let mut purged = 0;
    // Small batches, so the batching paths run too; bounded, so a purge that never
    // finishes fails instead of hanging.
    for _ in 0..1000 {
        match store.purge_expired(now, 7).await.unwrap() {
            0 => return purged,
            n => purged += n,
        }
    }
    panic!("purge_expired kept finding records");
}

/// Checks that the store kept exactly the records the core says are not expired at
/// [`NOW`], after purging.
async fn assert_purged_as_the_core_says(store: &dyn Seed, records: &[Record]) {
    let purged = purge_all(store, NOW).await;
    let mut disagreements = Vec::new();
    for record in records {
        let kept = store.get(&record.id).await.unwrap().is_some();
        if kept == record.is_expired(NOW) {
            disagreements.push(format!("{} (kept: {kept})", record.id.key));
        }
    }
    assert!(disagreements.is_empty(), "the purge disagrees with Record::is_expired on {disagreements:#?}");
    assert_eq!(purged, records.iter().filter(|r| r.is_expired(NOW)).count() as u64);
}

/// Every shape is stored and read back exactly (the backend's row mapping is a twin too:
/// a lease is its token and its `locked_until` together).
pub async fn seeded_records_read_back_exactly(store: Arc<dyn Seed>) {
    let records = shapes("seed");
    seed_all(store.as_ref(), &records).await;
    for record in &records {
        assert_eq!(store.get(&record.id).await.unwrap().as_ref(), Some(record), "{}", record.id.key);
    }
}

/// `purge_expired` deletes exactly what `Record::is_expired` calls expired: an
/// `in_progress` record keeps its record past its expiry only while its lease lives.
pub async fn purge_deletes_what_the_core_calls_expired(store: Arc<dyn Seed>) {
    let records = shapes("purge");
    seed_all(store.as_ref(), &records).await;
    assert_purged_as_the_core_says(store.as_ref(), &records).await;
}

/// `renew` succeeds exactly when `Record::is_owned_by` says so, writes what
/// `Record::renew` writes, and a purge afterwards follows the renewed lease.
pub async fn renew_is_fenced_as_the_core_says(store: Arc<dyn Seed>) {
    let mut expected = Vec::new();
    for (target, locked_until) in [("later", NOW + 2 * HOUR), ("earlier", NOW - 2 * HOUR)] {
        for token in [TOKEN, WRONG] {
            for record in shapes(&format!("renew-{target}-{token}")) {
                store.seed(&record).await;
                let mut renewed = record.clone();
                let owned = renewed.renew(token, locked_until);
                assert_eq!(store.renew(&record.id, token, locked_until).await.unwrap(), owned, "{}", record.id.key);
                assert_eq!(store.get(&record.id).await.unwrap().as_ref(), Some(&renewed), "{}", record.id.key);
                expected.push(renewed);
            }
        }
    }
    assert_purged_as_the_core_says(store.as_ref(), &expected).await;
}

/// `finish` succeeds exactly when `Record::is_owned_by` says so, writes what
/// `Record::finish` writes (a completed answer replaces the stored one, a failure keeps
/// it), and a purge afterwards follows the finished record.
pub async fn finish_is_fenced_as_the_core_says(store: Arc<dyn Seed>) {
    let outcomes = [
        ("completed", Outcome::Completed(response(200, "done"))),
        ("failed", Outcome::Retryable { error: "e2".into() }),
        ("verified", Outcome::Verified { response: response(200, "found"), note: "settled by lookup".into() }),
    ];
    let mut expected = Vec::new();
    for (name, outcome) in outcomes {
        for token in [TOKEN, WRONG] {
            for record in shapes(&format!("finish-{name}-{token}")) {
                store.seed(&record).await;
                let mut finished = record.clone();
                let owned = finished.finish(token, outcome.clone(), NOW);
                let done = store.finish(&record.id, token, outcome.clone(), NOW).await.unwrap();
                assert_eq!(done, owned, "{}", record.id.key);
                assert_eq!(store.get(&record.id).await.unwrap().as_ref(), Some(&finished), "{}", record.id.key);
                expected.push(finished);
            }
        }
    }
    assert_purged_as_the_core_says(store.as_ref(), &expected).await;
}

/// A claim on every shape, with the same payload and another, under three policies,
/// decides, hands out a token and persists exactly what `plan_claim` plans; so does
/// `claim_new` (the claim of an intent most likely new), on the same shapes and on a key
/// nobody used.
pub async fn claim_decides_as_the_core_plans(store: Arc<dyn Seed>) {
    let fresh = intent_for(RecordId::new("claim-new", "", "nobody-used-it"), 1, NOW);
    let claim = store.claim_new(&fresh, REVIEW).await.unwrap();
    assert_eq!(claim.decision, Decision::Execute(ExecuteReason::New));
    let token = claim.token.expect("a new key's claim holds the lease");
    let stored = store.get(&fresh.id).await.unwrap().expect("the claim is stored");
    assert!(stored.status == Status::InProgress && stored.is_owned_by(token), "{stored:?}");
    let policies = [
        ("review", REVIEW),
        (
            "retry-resend",
            ClaimPolicy {
                on_unknown: OnUnknown::Retry,
                on_change: OnChange::Resend,
                replays: Replays::Ignore,
                lookup: crate::core::Lookup::None,
            },
        ),
        ("supersede", ClaimPolicy { on_change: OnChange::Supersede, ..REVIEW }),
        ("lookup", LOOKUP),
    ];
    for (name, policy) in policies {
        for (fp, new) in [(1, false), (2, false), (1, true), (2, true)] {
            for record in shapes(&format!("claim-{name}-{fp}-{new}")) {
                store.seed(&record).await;
                let intent = intent_for(record.id.clone(), fp, NOW);
                let claim = match new {
                    false => store.claim(&intent, policy).await.unwrap(),
                    true => store.claim_new(&intent, policy).await.unwrap(),
                };
                let key = &record.id.key;
                // The backend's token (if any) goes into the core's plan, so the records compare whole.
                let plan = plan_claim(Some(&record), &intent, policy, || claim.token.unwrap_or(0));
                assert_eq!((claim.decision, claim.token), (plan.decision, plan.token), "{key}");
                let stored = store.get(&record.id).await.unwrap();
                match &plan.transition {
                    Transition::None => assert_eq!(stored.as_ref(), Some(&record), "{key}"),
                    Transition::Write(written) => assert_eq!(stored.as_ref(), Some(written), "{key}"),
                    // A replay count may be written lazily: not checked in the store.
                    Transition::Touch(_) => {}
                }
                assert_eq!(claim.record, plan.into_record(Some(record.clone())), "{key}");
            }
        }
    }
}
