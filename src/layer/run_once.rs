//! `Idem::run_once`: the record and the decision around a plain async closure, for workers
//! and jobs that are not HTTP handlers. The closure gets the claim's transaction; its value
//! is stored as the record's answer (JSON) and handed back, unchanged, to every later call
//! with the same key.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Idem;
use crate::core::key::{self, KeyError, Normalize};
use crate::core::units::millis;
use crate::core::{
    ClaimPolicy, Decision, Fingerprint, Intent, OnChange, OnUnknown, Outcome, RecordId, Replays, Status, StoredResponse,
};
use crate::store::postgres::transaction::{Tx, TxClaim};

/// How [`Idem::run_once`] claims.
#[derive(Clone, Copy, Debug)]
pub struct Jobs {
    /// How long a record is remembered (24 h by default).
    pub ttl: Duration,
    /// How long a call with the same key waits for one in progress before
    /// [`RunOnceError::InFlight`] (none by default).
    pub wait: Duration,
    /// How long the transaction may sit idle before PostgreSQL ends it (30 s by default).
    pub lease: Duration,
}

impl Default for Jobs {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(24 * 3600), wait: Duration::ZERO, lease: Duration::from_secs(30) }
    }
}

/// What [`Idem::run_once`] returns when the work is done: now, or by an earlier call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done<T> {
    /// The closure's value (stored, and read back on a replay).
    pub value: T,
    /// True when an earlier call did the work and this one only read its value.
    pub replayed: bool,
}

/// Why [`Idem::run_once`] did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum RunOnceError<E> {
    /// The closure failed: everything it wrote was rolled back with the claim, and the next
    /// call with this key runs it again.
    #[error("the work failed and was rolled back: {0}")]
    Failed(E),
    /// The key was used before with another fingerprint.
    #[error("this key was already used for other work")]
    KeyReused,
    /// Another call with this key is running and did not finish within [`Jobs::wait`].
    #[error("another call with this key is in progress")]
    InFlight,
    /// The record is in a state an operator must settle first (`outcome_unknown` or
    /// `needs_review`, left by another path on the same scope), or its value was not kept.
    #[error("the record is {0}: settle it first")]
    Unsettled(Status),
    /// The key is not 1–255 visible ASCII characters.
    #[error("invalid key: {0}")]
    InvalidKey(KeyError),
    /// The store failed, or is not PostgreSQL (run_once needs a transaction).
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// The stored value does not read back as the closure's type.
    #[error("the stored value does not read back: {0}")]
    Unreadable(serde_json::Error),
}

impl Idem {
    /// Runs `work` once for `(scope, key)`, in one PostgreSQL transaction with its record:
    /// the work's statements (through the [`Tx`] it gets) and the stored value commit
    /// together, or — when it returns an error, panics or the process dies — none of them
    /// does and the key stays free. A later call with the same key and fingerprint gets the
    /// stored value without running anything; with another fingerprint,
    /// [`RunOnceError::KeyReused`].
    pub async fn run_once<T, E, F, Fut>(
        &self,
        scope: &str,
        key: &str,
        fingerprint: Fingerprint,
        work: F,
    ) -> Result<Done<T>, RunOnceError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Tx) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(transactional) = &self.transactional else {
            return Err(crate::store::Error::Unavailable(
                "run_once needs a PostgreSQL store (Idem::open on a postgres:// URL)".into(),
            )
            .into());
        };
        let key = key::accept(key.as_bytes(), Normalize::None).map_err(RunOnceError::InvalidKey)?;
        let intent = Intent {
            id: RecordId::new(scope, "", key),
            fingerprint,
            now: self.clock.now(),
            ttl_ms: millis(self.jobs.ttl),
            lease_ms: millis(self.jobs.lease),
            correlation_id: None,
        };
        let policy = ClaimPolicy {
            on_unknown: OnUnknown::Review,
            on_change: OnChange::Reject,
            replays: Replays::Count,
            lookup: crate::core::Lookup::None,
        };
        let open = match transactional.claim(&intent, policy, self.jobs.wait, self.jobs.lease).await? {
            TxClaim::Open(open) => open,
            TxClaim::Busy => return Err(RunOnceError::InFlight),
            TxClaim::Decided(claim) => {
                let record = claim.record.ok_or(RunOnceError::InFlight)?;
                return match claim.decision {
                    Decision::Replay => {
                        let body = record.response.map(|r| r.body).unwrap_or_default();
                        let value = serde_json::from_slice(&body).map_err(RunOnceError::Unreadable)?;
                        Ok(Done { value, replayed: true })
                    }
                    Decision::KeyReused => Err(RunOnceError::KeyReused),
                    Decision::InFlight => Err(RunOnceError::InFlight),
                    _ => Err(RunOnceError::Unsettled(record.status)),
                };
            }
        };
        let value = match work(open.tx()).await {
            Ok(value) => value,
            Err(e) => {
                open.rollback().await;
                return Err(RunOnceError::Failed(e));
            }
        };
        let body = match serde_json::to_vec(&value) {
            Ok(body) => body,
            Err(e) => {
                open.rollback().await;
                return Err(RunOnceError::Unreadable(e));
            }
        };
        let answer = StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body),
            retained: true,
        };
        open.commit(Outcome::Completed(answer), self.clock.now()).await?;
        Ok(Done { value, replayed: false })
    }
}
