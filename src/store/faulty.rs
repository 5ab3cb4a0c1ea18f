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
