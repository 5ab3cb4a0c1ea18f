//! The claim, the caller's own writes and the stored answer in one PostgreSQL transaction
//! (SPEC §7): what only code inside the service that does the write can get.
//!
//! [`Transactional::claim`] opens a transaction on a pooled connection and claims the key
//! in it. While that transaction is open, its claim is invisible to everyone else: nothing
//! `in_progress` is ever committed on this path, so no other process can find it with a
//! dead owner, and no `outcome_unknown` can arise. The caller runs its statements on the
//! same connection ([`Tx`]), then [`OpenClaim::commit`] writes the answer and commits, or
//! [`OpenClaim::rollback`] leaves nothing at all: the key is free again.
//!
//! # Concurrency
//!
//! The transaction runs at PostgreSQL's default isolation, `READ COMMITTED`. The primary
//! key is the arbiter, as in the store's plain claim: a concurrent identical claim's
//! `INSERT … ON CONFLICT` finds the uncommitted row and waits for its transaction to end —
//! then sees the committed answer and replays it, or, after a rollback, claims the key
//! itself. The wait is bounded by `lock_timeout`, set for the claim only to the route's
//! `in_flight` wait (1 ms for `reject`); past it the duplicate gets [`TxClaim::Busy`] (a
//! `409`). The caller's own statements run without that bound.
//!
//! What an open claim holds: the record's row (its unique index entry, for a new key), and
//! whatever rows the caller's statements lock, until the commit. A process that dies
//! mid-transaction loses its connection and PostgreSQL rolls it back; a process that hangs
//! is cut off by `idle_in_transaction_session_timeout`, set to the route's lease.
//!
//! # Round trips
//!
//! `BEGIN` (with the two settings), the claim and the reset of `lock_timeout` are pipelined
//! into one round trip; the answer's `UPDATE` and `COMMIT` into another. So a claimed
//! request costs two round trips besides the caller's own statements — as many as the
//! caller's own `BEGIN` and `COMMIT` would.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::row::Values;
use super::{FINISHED_COLUMNS, HOT_DEADLINE, MAX_CLAIM_ATTEMPTS, PostgresStore, Seen};
use crate::core::units::millis;
use crate::core::{ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Plan, Record, RecordId, Transition, plan_claim};
use crate::store::encrypted::{EncryptedStore, Keys};
use crate::store::{Claim, Error, Store, new_token};

/// The PostgreSQL store, able to claim inside a transaction the caller writes in.
#[derive(Clone)]
pub struct Transactional {
    store: Arc<PostgresStore>,
    /// Seal stored answers, as [`crate::store::open`] does when `IDEM_ENCRYPTION_KEY` is set.
    keys: Option<Arc<Keys>>,
}

/// What a transactional claim found.
pub enum TxClaim {
    /// The key is claimed inside an open transaction: run the action in it.
    Open(OpenClaim),
    /// Nothing to run: the decision on the committed record (replay, key reused, …).
    Decided(Claim),
    /// Another transaction holds the key and did not end within the wait.
    Busy,
}

/// A claim inside an open transaction; it ends with [`Self::commit`] or [`Self::rollback`].
/// Dropped without either, its connection is closed, which rolls the transaction back.
pub struct OpenClaim {
    tx: Tx,
    record: Record,
    token: LeaseToken,
    transactional: Transactional,
}

/// The claim's open transaction, for the caller's own statements: a pooled
/// [`tokio_postgres::Client`] (through deadpool's wrapper, which adds `prepare_cached`) on
/// which `BEGIN` was sent. Valid until the claim ends; run no `COMMIT` or `ROLLBACK` of
/// your own on it.
#[derive(Clone)]
pub struct Tx(Arc<Connection>);

/// The pooled connection of an open transaction.
struct Connection {
    /// `Some` until dropped.
    client: Option<deadpool_postgres::Client>,
    /// Set once `COMMIT` or `ROLLBACK` succeeded: only then may the connection go back to
    /// the pool. Otherwise it is closed on drop, so a transaction never outlives its claim
    /// on a connection somebody else gets next.
    ended: AtomicBool,
}

impl Deref for Tx {
    type Target = deadpool_postgres::ClientWrapper;

    fn deref(&self) -> &deadpool_postgres::ClientWrapper {
        // `client` is taken only in `Drop`, after the last `Tx` is gone.
        self.0.client.as_deref().expect("an open transaction's connection")
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !self.ended.load(Ordering::Acquire) {
                // Out of the pool and closed: the server rolls the transaction back.
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

impl Transactional {
    /// Opens `url` (a `postgres://` store URL) for transactional claims; also returns the
    /// same store as a plain [`Store`] (sealing answers when `IDEM_ENCRYPTION_KEY` is set)
    /// for everything else: the admin API, the purge, reads.
    pub async fn open(url: &str) -> Result<(Self, Arc<dyn Store>), Error> {
        let keys = Keys::from_env(|name| std::env::var(name).ok())?.map(Arc::new);
        let store = Arc::new(PostgresStore::open(url).await?);
        let plain: Arc<dyn Store> = match &keys {
            Some(keys) => Arc::new(EncryptedStore::new(store.clone(), keys.clone())),
            None => store.clone(),
        };
        Ok((Self { store, keys }, plain))
    }

    /// The server's type of each parameter of `statement` (prepared on a pooled connection).
    pub async fn parameter_types(&self, statement: &str) -> Result<Vec<tokio_postgres::types::Type>, Error> {
        let client = self.store.client().await?;
        let prepared = client.prepare_cached(statement).await.map_err(|e| self.store.db(e))?;
        Ok(prepared.params().to_vec())
    }

    /// Claims `intent` in a new transaction. A duplicate waits up to `wait` for another
    /// transaction holding the key; `lease` bounds how long the transaction may sit idle.
    pub async fn claim(
        &self,
        intent: &Intent,
        policy: ClaimPolicy,
        wait: Duration,
        lease: Duration,
    ) -> Result<TxClaim, Error> {
        let work = self.claim_now(intent, policy, wait, lease);
        tokio::time::timeout(HOT_DEADLINE + wait, work).await.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "PostgreSQL at {} gave no answer within {HOT_DEADLINE:?}",
                self.store.target
            )))
        })
    }

    async fn claim_now(
        &self,
        intent: &Intent,
        policy: ClaimPolicy,
        wait: Duration,
        lease: Duration,
    ) -> Result<TxClaim, Error> {
        let store = &self.store;
        let token = new_token();
        let absent = plan_claim(None, intent, policy, || token);
        let Transition::Write(fresh) = &absent.transition else {
            return Ok(TxClaim::Decided(Claim::planned(absent, None)));
        };
        let tx = Tx(Arc::new(Connection { client: Some(store.client().await?), ended: AtomicBool::new(false) }));
        let claim = tx.prepare_cached(&store.sql.claim).await.map_err(|e| store.db(e))?;
        let swap = tx.prepare_cached(&store.sql.swap).await.map_err(|e| store.db(e))?;
        // A lock wait of 0 would mean "no limit": `reject` waits one millisecond.
        let bound = format!("SET LOCAL lock_timeout = {}", millis(wait).max(1));
        let begin = format!("BEGIN; {bound}; SET LOCAL idle_in_transaction_session_timeout = {}", millis(lease));
        let unbound = "SET LOCAL lock_timeout TO DEFAULT";
        let values = Values::of(fresh)?;
        let fresh_params = values.params();
        let (began, seen, reset) =
            tokio::join!(tx.batch_execute(&begin), tx.query_opt(&claim, &fresh_params), tx.batch_execute(unbound));
        began.map_err(|e| store.db(e))?;
        let mut seen = seen;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let found = match seen {
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => return Ok(self.busy(tx).await),
                Err(e) => return Err(self.failed(tx, e).await),
                Ok(row) => store.seen(row)?,
            };
            match found {
                Seen::Inserted => {
                    reset.map_err(|e| store.db(e))?;
                    return Ok(TxClaim::Open(self.opened(tx, absent, None, token)));
                }
                Seen::Existing(version, existing) => {
                    let existing = self.open_answer(*existing)?;
                    let plan = plan_claim(Some(&existing), intent, policy, || token);
                    let next = match &plan.transition {
                        Transition::Write(next) => next.clone(),
                        Transition::None | Transition::Touch(_) => return Ok(self.decided(tx, plan, existing).await),
                    };
                    // Re-claiming a stored record (expired, failed): the same bounded wait.
                    let next_values = Values::of(&next)?;
                    let mut params: Vec<&(dyn ToSql + Sync)> = next_values.params().to_vec();
                    params.push(&version);
                    let (_, swapped, _) =
                        tokio::join!(tx.batch_execute(&bound), tx.execute(&swap, &params), tx.batch_execute(unbound));
                    match swapped {
                        Ok(1) => return Ok(TxClaim::Open(self.opened(tx, plan, Some(existing), token))),
                        Ok(_) => {}
                        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => return Ok(self.busy(tx).await),
                        Err(e) => return Err(self.failed(tx, e).await),
                    }
                }
                // A concurrent insert committed after the statement's snapshot: look again.
                Seen::Nothing => {}
            }
            let (_, again, _) =
                tokio::join!(tx.batch_execute(&bound), tx.query_opt(&claim, &fresh_params), tx.batch_execute(unbound));
            seen = again;
        }
        let _ = tx.batch_execute("ROLLBACK").await;
        Err(Error::Unavailable(format!("a claim on {} lost {MAX_CLAIM_ATTEMPTS} races in a row", intent.id)))
    }

    fn opened(&self, tx: Tx, plan: Plan, existing: Option<Record>, token: LeaseToken) -> OpenClaim {
        let claimed = Claim::planned(plan, existing);
        let record = claimed.record.expect("an executing plan writes its record");
        OpenClaim { tx, record, token, transactional: self.clone() }
    }

    /// Nothing to run: end the transaction (it wrote nothing) and count a replay.
    async fn decided(&self, tx: Tx, plan: Plan, existing: Record) -> TxClaim {
        if let Transition::Touch(record) = &plan.transition {
            self.store.touches.add(record.id.clone(), record.last_seen_at);
        }
        end(&tx, "ROLLBACK").await;
        TxClaim::Decided(Claim::planned(plan, Some(existing)))
    }

    async fn busy(&self, tx: Tx) -> TxClaim {
        end(&tx, "ROLLBACK").await;
        TxClaim::Busy
    }

    async fn failed(&self, tx: Tx, e: tokio_postgres::Error) -> Error {
        end(&tx, "ROLLBACK").await;
        self.store.db(e)
    }

    fn open_answer(&self, mut record: Record) -> Result<Record, Error> {
        if let Some(keys) = &self.keys {
            if let Some(response) = record.response.take() {
                record.response = Some(keys.open(&record.id, response)?);
            }
        }
        Ok(record)
    }
}

impl OpenClaim {
    /// The open transaction, for the caller's statements.
    pub fn tx(&self) -> Tx {
        self.tx.clone()
    }

    /// The claimed record (uncommitted).
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The record's id.
    pub fn id(&self) -> &RecordId {
        &self.record.id
    }

    /// Writes `outcome` into the record and commits everything: the claim, the caller's
    /// statements and the answer become durable together, or (on an error) not at all.
    pub async fn commit(self, outcome: Outcome, now: Millis) -> Result<(), Error> {
        let store = &self.transactional.store;
        let id = &self.record.id;
        let mut outcome = outcome;
        if let (Some(response), Some(keys)) = (outcome.response_mut(), &self.transactional.keys) {
            *response = keys.seal(id, response);
        }
        let finished = outcome.applied_to_blank(id.clone(), now);
        let values = Values::of(&finished)?;
        let all = values.params();
        let token = self.token as i64;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![all[0], all[1], all[2], &token];
        params.extend(FINISHED_COLUMNS.iter().map(|&i| all[i]));
        let statement = self.tx.prepare_cached(&store.sql.finish_in_tx).await.map_err(|e| store.db(e))?;
        // Pipelined: if the update fails (it fails on purpose when it finds no row it
        // owns), the transaction is aborted and the `COMMIT` rolls it back.
        let (finished, committed) =
            tokio::join!(self.tx.query_one(&statement, &params), self.tx.batch_execute("COMMIT"));
        finished.map_err(|e| store.db(e))?;
        committed.map_err(|e| store.db(e))?;
        self.tx.0.ended.store(true, Ordering::Release);
        Ok(())
    }

    /// Rolls everything back: the claim and the caller's statements are gone, the key is free.
    pub async fn rollback(self) {
        end(&self.tx, "ROLLBACK").await;
    }
}

/// Sends `COMMIT` or `ROLLBACK`; the connection goes back to the pool only if it succeeded.
async fn end(tx: &Tx, statement: &str) {
    if tx.batch_execute(statement).await.is_ok() {
        tx.0.ended.store(true, Ordering::Release);
    }
}
