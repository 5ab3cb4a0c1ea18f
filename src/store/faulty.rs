//! A store decorator that injects faults, for outage and crash tests (STYLE rule 4): any
//! backend behind it can be made to fail the next calls of one operation, go down and
//! come back, answer slowly, or lose its owner between a claim and its outcome.
//!
//! A fault is always [`Error::Unavailable`], what a backend returns when its server
//! cannot be reached, so callers take the same path as in a real outage: the gateway
//! refuses with `503` and forwards nothing; [`super::owner::finish`] retries; a claim
//! whose outcome is never recorded becomes `outcome_unknown` when its lease runs out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{Claim, Error, ListQuery, Page, StatRow, Store};
use crate::core::{ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Record, RecordId, Resolution};

/// A store operation, as a fault names it. `get_many` counts as [`Op::Get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Store::claim`].
    Claim,
    /// [`Store::renew`].
    Renew,
    /// [`Store::finish`].
    Finish,
    /// [`Store::get`] and [`Store::get_many`].
    Get,
    /// [`Store::list`].
    List,
    /// [`Store::delete`].
    Delete,
    /// [`Store::resolve`].
    Resolve,
    /// [`Store::purge_expired`].
    Purge,
    /// [`Store::stats`].
    Stats,
}

/// A store that fails on command. Faults are programmed through `&self`, so a test keeps
/// an `Arc<FaultyStore>` and hands a clone to the code under test as `Arc<dyn Store>`.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: Mutex<Plan>,
}

/// The faults programmed so far, and what reached the decorator.
#[derive(Default)]
struct Plan {
    /// How many of the next calls of each operation fail.
    failing: HashMap<Op, u32>,
    /// Every call fails until [`FaultyStore::recover`]: the server is down.
    down: bool,
    /// Armed by [`FaultyStore::crash_after_claim`]: the next claim that executes succeeds,
    /// then the store goes down.
    crash_after_claim: bool,
    /// Added to every call before it reaches the inner store (or fails).
    latency: Duration,
    /// Calls made, per operation, failed ones included.
    calls: HashMap<Op, u64>,
}

impl FaultyStore {
    /// A decorator over `inner` with no fault programmed: it behaves exactly like `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, plan: Mutex::new(Plan::default()) }
    }

    /// The store behind the faults, for checking what was really written.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// The next `n` calls of `op` fail; later ones reach the store again.
    pub fn fail_next(&self, op: Op, n: u32) {
        *self.plan().failing.entry(op).or_default() += n;
    }

    /// Every call fails until [`FaultyStore::recover`], as when the server is down.
    pub fn go_down(&self) {
        self.plan().down = true;
    }

    /// The next claim that decides to execute succeeds (it is durable in the inner store),
    /// then the store goes down: the owner can neither renew its lease nor record the
    /// outcome, as if its process died between claim and complete. [`FaultyStore::recover`]
    /// plays the restart.
    pub fn crash_after_claim(&self) {
        self.plan().crash_after_claim = true;
    }

    /// Every call waits `latency` first (a slow network or an overloaded server).
    pub fn set_latency(&self, latency: Duration) {
        self.plan().latency = latency;
    }

    /// Clears every fault and the latency: the store is back.
    pub fn recover(&self) {
        let mut plan = self.plan();
        plan.failing.clear();
        plan.down = false;
        plan.crash_after_claim = false;
        plan.latency = Duration::ZERO;
    }

    /// How many calls of `op` were made, failed ones included.
    pub fn calls(&self, op: Op) -> u64 {
        self.plan().calls.get(&op).copied().unwrap_or(0)
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        // The plan is a handful of counters, each update whole: usable after a panic.
        self.plan.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a call of `op`, waits the latency, and fails it when a fault says so.
    async fn enter(&self, op: Op) -> Result<(), Error> {
        let (latency, fails) = {
            let mut plan = self.plan();
            *plan.calls.entry(op).or_default() += 1;
            let scheduled = plan.failing.get_mut(&op).filter(|n| **n > 0).map(|n| *n -= 1).is_some();
            (plan.latency, plan.down || scheduled)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if fails { Err(Error::Unavailable(format!("injected fault on {op:?}"))) } else { Ok(()) }
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        self.enter(Op::Claim).await?;
        let claim = self.inner.claim(intent, policy).await?;
        if claim.decision.executes() {
            let mut plan = self.plan();
            if plan.crash_after_claim {
                plan.crash_after_claim = false;
                plan.down = true;
            }
        }
        Ok(claim)
    }

    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        self.enter(Op::Renew).await?;
        self.inner.renew(id, token, locked_until).await
    }

    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        self.enter(Op::Finish).await?;
        self.inner.finish(id, token, outcome, now).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        self.enter(Op::Get).await?;
        self.inner.get(id).await
    }

    async fn get_many(&self, ids: &[RecordId]) -> Result<Vec<Option<Record>>, Error> {
        self.enter(Op::Get).await?;
        self.inner.get_many(ids).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        self.enter(Op::List).await?;
        self.inner.list(query).await
    }

    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        self.enter(Op::Delete).await?;
        self.inner.delete(id).await
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        self.enter(Op::Resolve).await?;
        self.inner.resolve(id, resolution, now).await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        self.enter(Op::Purge).await?;
        self.inner.purge_expired(now, limit).await
    }

    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        self.enter(Op::Stats).await?;
        self.inner.stats().await
    }
}

#[cfg(test)]
mod tests {
    //! The gateway (`Gateway::handle`, no sockets on the client side) in front of the demo
    //! upstream, on a memory store behind a `FaultyStore`.

    use std::net::SocketAddr;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode, header};
    use http_body_util::{BodyExt, Full};
    use serde_json::Value;

    use super::*;
    use crate::config::parse_toml;
    use crate::core::Status;
    use crate::gateway::Gateway;
    use crate::gateway::body::Body;
    use crate::gateway::config::{Overrides, RawConfig};
    use crate::store::memory::MemoryStore;

    /// One route with a short lease, so a claim whose owner is lost runs out quickly.
    const ROUTES: &str = r#"
        client_timeout = "5s"
        [[routes]]
        name = "orders"
        path = "/orders"
        lease = "300ms"
    "#;

    /// The wait for a lease of [`ROUTES`] to run out: the store compares wall-clock times,
    /// so there is no signal to await, only the clock.
    const PAST_THE_LEASE: Duration = Duration::from_millis(400);

    async fn demo_upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(crate::demo::serve(listener));
        address
    }

    fn gateway(store: Arc<dyn Store>, upstream: SocketAddr) -> Arc<Gateway> {
        let overrides = Overrides { upstream: Some(format!("http://{upstream}")), ..Overrides::default() };
        let config = parse_toml::<RawConfig>(ROUTES).unwrap().validate(&overrides, &|_| None).unwrap();
        Arc::new(Gateway::new(&config, store).unwrap())
    }

    fn post(key: &str, body: &'static str) -> Request<Full<Bytes>> {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    fn order(key: &str) -> Request<Full<Bytes>> {
        post(key, r#"{"amount":1}"#)
    }

    /// What a client sees: status, replayed or not, and the body as JSON.
    async fn seen(response: Response<Body>) -> (StatusCode, bool, Value) {
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, replayed, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn upstream_calls(upstream: SocketAddr) -> u64 {
        let stats: Value = reqwest::get(format!("http://{upstream}/_demo/stats")).await.unwrap().json().await.unwrap();
        stats["calls"].as_u64().unwrap()
    }

    async fn stored(store: &dyn Store, key: &str) -> Option<Record> {
        store.get(&RecordId::new("orders", "", key)).await.unwrap()
    }

    #[tokio::test]
    async fn a_claim_that_fails_is_refused_with_503_and_nothing_is_forwarded() {
        let upstream = demo_upstream().await;
        let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
        let gateway = gateway(store.clone(), upstream);

        store.fail_next(Op::Claim, 1);
        let refused = gateway.clone().handle(order("k1"), None).await;
        assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
        let (status, _, problem) = seen(refused).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(problem["type"], "store-unavailable");
        assert_eq!(upstream_calls(upstream).await, 0, "nothing is forwarded without a claim");
        assert_eq!(stored(store.inner().as_ref(), "k1").await, None);

        // The store is back: the client's retry executes, once, with no restart.
        let (status, replayed, _) = seen(gateway.clone().handle(order("k1"), None).await).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        assert_eq!(upstream_calls(upstream).await, 1);
    }

    #[tokio::test]
    async fn a_finish_that_fails_for_a_moment_is_retried_and_the_record_completes() {
        let upstream = demo_upstream().await;
        let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
        let gateway = gateway(store.clone(), upstream);

        store.fail_next(Op::Finish, 3);
        let (status, replayed, first) = seen(gateway.clone().handle(order("k1"), None).await).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        assert_eq!(store.calls(Op::Finish), 4, "three failed attempts, then the one that recorded the answer");
        let record = stored(store.inner().as_ref(), "k1").await.expect("a record");
        assert_eq!(record.status, Status::Completed, "{record:?}");

        let (status, replayed, again) = seen(gateway.clone().handle(order("k1"), None).await).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(again, first);
        assert_eq!(upstream_calls(upstream).await, 1);
    }

    #[tokio::test]
    async fn an_owner_lost_between_claim_and_finish_leaves_an_unknown_outcome_never_a_duplicate() {
        let upstream = demo_upstream().await;
        let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
        let gateway = gateway(store.clone(), upstream);

        store.crash_after_claim();
        let (status, _, _) = seen(gateway.clone().handle(order("k1"), None).await).await;
        assert_eq!(status, StatusCode::CREATED, "the upstream answered; only its recording failed");
        assert_eq!(store.calls(Op::Finish), 6, "owner::finish tried six times before giving up");
        let record = stored(store.inner().as_ref(), "k1").await.expect("the claim is durable");
        assert_eq!(record.status, Status::InProgress, "{record:?}");
        assert_eq!(upstream_calls(upstream).await, 1);

        // The restart: a gateway on the same records, once the dead owner's lease is over.
        store.recover();
        let restarted = self::gateway(store.inner().clone(), upstream);
        tokio::time::sleep(PAST_THE_LEASE).await;
        let (status, _, problem) = seen(restarted.clone().handle(order("k1"), None).await).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(problem["type"], "outcome-unknown");
        let record = stored(store.inner().as_ref(), "k1").await.expect("a record");
        assert_eq!(record.status, Status::OutcomeUnknown, "{record:?}");
        assert_eq!(upstream_calls(upstream).await, 1, "the unknown outcome is never executed again");
    }

    /// A run of requests covering the decisions: execute, replay, key reused, a retryable
    /// answer and its retry recovery, an unknown outcome.
    async fn decisions(store: Arc<dyn Store>) -> Vec<(StatusCode, bool)> {
        let upstream = demo_upstream().await;
        let gateway = gateway(store, upstream);
        let mut failing = order("k2");
        failing.headers_mut().insert("x-demo-status", "503".parse().unwrap());
        let mut dropped = order("k3");
        dropped.headers_mut().insert("x-demo-fault", "drop".parse().unwrap());
        let requests = [
            order("k1"),
            order("k1"),
            post("k1", r#"{"amount":2}"#),
            failing,
            order("k2"),
            order("k2"),
            dropped,
            order("k3"),
        ];
        let mut seen_by_client = Vec::new();
        for request in requests {
            let (status, replayed, _) = seen(gateway.clone().handle(request, None).await).await;
            seen_by_client.push((status, replayed));
        }
        seen_by_client
    }

    #[tokio::test]
    async fn latency_does_not_change_decisions() {
        let plain = decisions(Arc::new(MemoryStore::default())).await;
        let slow = Arc::new(FaultyStore::new(Arc::new(MemoryStore::default())));
        slow.set_latency(Duration::from_millis(40));
        assert_eq!(decisions(slow.clone()).await, plain);
        assert_eq!(
            plain,
            [
                (StatusCode::CREATED, false),
                (StatusCode::CREATED, true),
                (StatusCode::UNPROCESSABLE_ENTITY, false),
                (StatusCode::SERVICE_UNAVAILABLE, false),
                (StatusCode::CREATED, false),
                (StatusCode::CREATED, true),
                (StatusCode::BAD_GATEWAY, false),
                (StatusCode::CONFLICT, false),
            ]
        );

        // Slow claims racing for one key: still exactly one executes.
        let upstream = demo_upstream().await;
        let gateway = gateway(slow, upstream);
        let mut racing = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let mut request = order("race");
            request.headers_mut().insert("x-demo-delay", "200ms".parse().unwrap());
            racing.spawn(gateway.clone().handle(request, None));
        }
        let mut executed = 0;
        while let Some(response) = racing.join_next().await {
            match seen(response.unwrap()).await {
                (StatusCode::CREATED, false, _) => executed += 1,
                (StatusCode::CREATED, true, _) => {}
                (StatusCode::CONFLICT, _, problem) => assert_eq!(problem["type"], "request-in-flight"),
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(executed, 1);
        assert_eq!(upstream_calls(upstream).await, 1);
    }

    #[tokio::test]
    async fn faults_fail_only_what_they_name_and_recover_clears_them() {
        let store = FaultyStore::new(Arc::new(MemoryStore::default()));
        let id = RecordId::new("orders", "", "k1");
        store.fail_next(Op::Get, 2);
        assert!(store.get(&id).await.is_err());
        assert!(store.list(&ListQuery::default()).await.is_ok(), "another operation is unaffected");
        assert!(store.get_many(std::slice::from_ref(&id)).await.is_err());
        assert!(store.get(&id).await.is_ok());
        store.go_down();
        assert!(store.stats().await.is_err_and(|e| e.is_retryable()));
        store.recover();
        assert!(store.stats().await.is_ok());
        assert_eq!(store.calls(Op::Get), 3);
    }
}
