//! The owner's side of a lease, shared by every path that executes a claim (the gateway,
//! the runner): keep the lease alive while the action runs, then record its outcome
//! durably, retrying a short store outage. If the outcome still cannot be recorded, the
//! lease runs out and the record becomes `outcome_unknown`: explicit, never a duplicate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;

use super::Store;
use super::clock::Clock;
use crate::backoff::Backoff;
use crate::core::units::millis;
use crate::core::{LeaseToken, Outcome, RecordId, key};

/// Renews the lease every third of its length until the returned handle is dropped.
pub fn keep_alive(
    store: Arc<dyn Store>,
    id: RecordId,
    token: LeaseToken,
    lease: Duration,
    clock: Clock,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease / 3).await;
            match store.renew(&id, token, clock.now() + millis(lease)).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(scope = %id.scope, key_hash = %key::hash_for_logs(&id.key), "lease lost while the action runs");
                    return;
                }
                Err(error) => tracing::warn!(%error, "could not renew a lease; will try again"),
            }
        }
    }))
}

/// Records an outcome, retrying a store outage for a few seconds; `timed` sees how long
/// each attempt took (for metrics).
pub async fn finish(
    store: &dyn Store,
    id: &RecordId,
    token: LeaseToken,
    outcome: Outcome,
    clock: Clock,
    timed: impl Fn(Duration),
) {
    let mut pause = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));
    for attempt in 0..6 {
        let started = Instant::now();
        let finished = store.finish(id, token, outcome.clone(), clock.now()).await;
        timed(started.elapsed());
        match finished {
            Ok(true) => return,
            Ok(false) => {
                tracing::warn!(scope = %id.scope, key_hash = %key::hash_for_logs(&id.key), "lease lost before the outcome was recorded");
                return;
            }
            Err(error) if error.is_retryable() && attempt < 5 => {
                tracing::warn!(%error, "could not record an outcome; retrying");
                tokio::time::sleep(pause.next_pause()).await;
            }
            Err(error) => {
                tracing::error!(%error, scope = %id.scope, key_hash = %key::hash_for_logs(&id.key), "could not record an outcome; it becomes outcome_unknown when its lease runs out");
                return;
            }
        }
    }
}
