//! The PostgreSQL store: one table shared by every idem process and machine.
//!
//! # Claim: one round trip, no check-then-insert
//!
//! The primary key `(scope, tenant, key)` is the only arbiter. `claim` sends one statement
//! that inserts the record `core::plan_claim` plans for an absent key, or — when the key
//! is taken — returns the row that holds it:
//!
//! ```sql
//! WITH ins AS (INSERT … ON CONFLICT (scope, tenant, key) DO NOTHING RETURNING …)
//! SELECT true, … FROM ins UNION ALL
//! SELECT false, … FROM records WHERE <pk> AND NOT EXISTS (SELECT 1 FROM ins)
//! ```
//!
//! Inserted: the caller executes. A row came back: `core::plan_claim` runs on it here, and a durable change is written with a compare-and-swap on the row's
//! `version` (bumped by every write), so the decision holds only if nothing changed the
//! row since it was read; a lost swap, or no row at all (a concurrent insert committed
//! after the statement's snapshot), starts the claim again. Replays write nothing: a
//! conflicting `INSERT … DO NOTHING` stops at the index check without touching the heap,
//! so a replay is one read-only round trip, and its counts go through the
//! [`TouchBuffer`] to one batched `UPDATE … FROM unnest(…)` per second.
//! `renew` and `finish` are one `UPDATE` each, guarded by `status = 'in_progress' AND
//! lease_token = $token`, which fences a stale owner off.
//!
//! Round trips (statements are prepared once per connection and cached):
//!
//! | operation | round trips |
//! |---|---|
//! | claim of an absent key (execute) | 1 (the insert, committed) |
//! | claim that replays, or answers in flight / key reused / unknown / needs review | 1 (read-only) |
//! | claim that writes (expired, retry recovery, unknown retry, lease ran out) | 2 (read + swap) |
//! | renew, finish, get, delete, one purge batch, list, stats | 1 |
//! | resolve | 2 (read + swap) |
//! | replay counts | 1 per second for up to 1000 records |
//!
//! Each lost race adds the round trips of one more attempt. Measured here with pgbench
//! running the claim statement from 4 clients (figures below): 5200 claims of new keys a
//! second (p50 0.64 ms, each one a commit), and 4900 replays a second (p50 0.40 ms) that
//! wrote no WAL at all.
//!
//! # Retention at a billion rows
//!
//! Expired records are deleted in small batches found through the `expires_at` index,
//! one statement per batch:
//!
//! ```sql
//! WITH purged AS (
//!     DELETE FROM records WHERE ctid = ANY(ARRAY(
//!         SELECT ctid FROM records WHERE expires_at >= $mark AND <expired at $now>
//!         ORDER BY expires_at LIMIT $n FOR UPDATE SKIP LOCKED))
//!     AND <expired at $now>
//!     RETURNING expires_at)
//! SELECT count(*), max(expires_at) FROM purged
//! ```
//!
//! - A batch reads a slice of the index and the rows it deletes, never the rest of the
//!   table: its cost depends on the batch size, not on how many records are kept.
//!   `ctid = ANY(ARRAY(…))` makes the inner select run once and the delete a TID scan
//!   (`ctid IN (…)` may be planned as a join).
//! - `$mark` (see `PurgeCursor`) is the highest expiry the previous batch deleted.
//!   Deleted rows leave dead index entries at the front of the index until vacuum; a
//!   batch starting at the front walks all of them, so without the mark a long purge
//!   slows down batch after batch — at a billion rows, with tens of millions of dead
//!   entries between two vacuums of the table, to a crawl.
//! - `SKIP LOCKED`: several processes purge side by side without waiting for each other,
//!   and a purge never waits for a claim that is re-claiming an expired row (that row is
//!   no longer expired once the claim commits). The outer re-check keeps any row that
//!   stopped being expired before it was locked.
//! - Autovacuum is tuned on the table (2 % scale factor instead of 20 %) so dead rows are
//!   reclaimed long before they number in the hundreds of millions.
//!
//! Measured here (PostgreSQL 15, 2 cores shared with compilers, fsync on; rows of about
//! 700 bytes with a 360-byte stored body; pgbench running the exact statements, prepared):
//!
//! | purge of 1 M expired rows beside 1 M live ones | total | per batch (mean, p99) |
//! |---|---|---|
//! | batches of 500 | 5.6 s | 2.8 ms, 6.8 ms (first tenth 2.3 ms, last tenth 2.9 ms) |
//! | batches of 5000 | 4.6 s | 22.8 ms, 106 ms |
//! | batches of 500 without the mark | 13.2 s | 6.6 ms, 11.4 ms (first tenth 5.4, last 9.8 ms) |
//!
//! | claims of new keys, 4 clients, 3 M expired + 1 M live rows | claims/s | p50 | p90 | p99 |
//! |---|---|---|---|---|
//! | no purge | 5200 | 0.64 ms | 0.92 ms | 1.5 ms |
//! | purge at the gateway's pace (500, 5 ms pause: 64 k rows/s) | 5400 | 0.58 ms | 1.0 ms | 2.7 ms |
//! | purge of 500 flat out (130 k rows/s) | 2460 | 1.2 ms | 2.9 ms | 4.7 ms |
//! | purge of 5000 flat out (273 k rows/s) | 2150 | 0.96 ms | 4.0 ms | 8.0 ms |
//!
//! (Flat out, the purging backend takes one of the two cores, hence the halved claim rate.)
//!
//! Why not time-partitioned tables, where retention would be a `DROP TABLE` of an old
//! partition? A primary key on a partitioned table must include the partition key.
//! Partitioned by time, `(scope, tenant, key)` would be unique only inside one partition,
//! and the same key could be claimed twice, once in each — exactly what the atomic claim
//! exists to prevent. (Rows would also move between partitions, since a retry extends
//! `expires_at`.) Hash partitions on `(scope, tenant, key)` would keep the key unique and
//! make each vacuum smaller; they remain open to a later migration but would not make
//! deleting any cheaper.
//!
//! # Outages
//!
//! Connections come from a deadpool pool. A connection the server closed is dropped when
//! it comes back to the pool, and new ones are opened on demand, so the store recovers by
//! itself when the server returns. While it is down every operation fails fast with
//! [`Error::Unavailable`]: connects time out after 5 s, and every operation has a deadline,
//! so a hung server cannot hold a request forever. A claim that fails after its insert
//! reached the server may have been committed: nobody holds its token, so its lease runs
//! out and the record turns `outcome_unknown`, exactly as if the process had died.

mod options;
mod row;
mod schema;
#[cfg(test)]
mod tests;
mod tls;
pub mod transaction;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, WeakPool};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::memory::page;
use super::touch::{Touch, TouchBuffer, spawn_flusher};
use super::{Claim, Error, ListQuery, MAX_PAGE, Page, StatRow, Store, new_token};
use crate::core::{
    ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Record, RecordId, Resolution, Status, Transition, plan_claim,
    resolve,
};
use options::Options;
use row::{COLUMN_COUNT, COLUMNS, Values};

/// Deadline of an operation on the request path (claim, renew, finish, get, delete,
/// resolve): past it the store counts as unavailable and the gateway fails closed.
const HOT_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of operations that may read much of the table (list, stats, a purge batch).
const SCAN_DEADLINE: Duration = Duration::from_secs(300);
/// A claim that lost this many races in a row gives up (each loss means another writer
/// changed the record, so this only happens under pathological contention).
const MAX_CLAIM_ATTEMPTS: usize = 16;
/// How often the purge starts again from the front of the `expires_at` index.
const RESCAN_EVERY: Duration = Duration::from_secs(600);
/// Replay counts written per statement, so one flush never holds many row locks at once.
const FLUSH_CHUNK: usize = 1000;

/// Which columns `finish` writes: those `Outcome::apply` sets (status, the lease, the
/// four response columns, last_seen_at, error_summary), by position in [`COLUMNS`].
const FINISHED_COLUMNS: [usize; 9] = [4, 5, 6, 7, 8, 9, 10, 12, 17];

/// Which columns `finish` writes for a failed attempt: the same but the four response
/// columns, since a failed attempt keeps the previous answer (`Outcome::replaces_response`).
const FAILED_COLUMNS: [usize; 5] = [4, 5, 6, 12, 17];

/// Opens a `postgres://` store: parses the URL, connects once, and brings the schema up
/// to date.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    Ok(Arc::new(PostgresStore::open(url).await?))
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
    /// SQL texts with the schema's name filled in.
    sql: Arc<Statements>,
    /// `host:port/db`, for messages (never the password).
    target: Arc<str>,
    /// Replay counts waiting for the next flush.
    touches: Arc<TouchBuffer>,
    /// Where the next purge batch starts in the `expires_at` index.
    purge_from: Mutex<PurgeCursor>,
}

/// The purge's low-water mark: each batch starts in the `expires_at` index at the highest
/// expiry the previous batch deleted, past the dead entries earlier batches left (see the
/// module's notes on retention). The mark only decides where a batch starts looking
/// (whether a row may go is the expiry test's call alone), and it is reset every
/// [`RESCAN_EVERY`] to collect what it passed by: records whose lease outlived their
/// expiry, and records created with an expiry below it (a TTL shorter than the clock
/// skew between two machines).
struct PurgeCursor {
    from: Millis,
    /// When the next batch starts from the front again.
    rescan_at: Instant,
}

impl PurgeCursor {
    fn new() -> Self {
        Self { from: Millis::MIN, rescan_at: Instant::now() + RESCAN_EVERY }
    }

    /// Where this batch starts.
    fn start(&mut self) -> Millis {
        if Instant::now() >= self.rescan_at {
            *self = Self::new();
        }
        self.from
    }

    /// Moves past the highest expiry a batch deleted. Rows that share it may remain, so
    /// the next batch starts at it, not after it.
    fn advance(&mut self, highest: Option<Millis>) {
        if let Some(highest) = highest {
            self.from = self.from.max(highest);
        }
    }
}

/// What a client other than the store needs to connect to the server `url` names (the
/// runner's PostgreSQL source, for one): the driver's configuration and the TLS connector,
/// with `sslmode` and `sslrootcert` meaning what they mean for the store (module
/// `tls`). idem's own parameters (`schema`, `pool_size`) are accepted and ignored.
pub fn connection(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), Error> {
    let options = Options::parse(url).map_err(|reason| Error::BadUrl { url: options::redact(url), reason })?;
    let connector = tls::connector(&options.tls, &options::redact(url))?;
    Ok((options.pg, connector))
}

/// Why a connection made with [`connection`] failed, when TLS is the reason: a rejected
/// certificate or a server without TLS (not an outage: no retry fixes it).
pub fn tls_failure(error: &tokio_postgres::Error) -> Option<String> {
    tls::failure(error)
}

impl PostgresStore {
    /// Opens the store `url` names. Tries once: the caller decides whether to retry an
    /// [`Error::Unavailable`].
    pub async fn open(url: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::BadUrl { url: options::redact(url), reason };
        let options = Options::parse(url).map_err(bad)?;
        let target: Arc<str> = Arc::from(options.target.as_str());
        let manager = Manager::from_config(
            options.pg.clone(),
            tls::connector(&options.tls, &options::redact(url))?,
            // `Fast` only checks that the connection is still open: a health query on every
            // checkout would double the round trips of every operation.
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(HOT_DEADLINE))
            .create_timeout(Some(HOT_DEADLINE))
            .recycle_timeout(Some(HOT_DEADLINE))
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot build a connection pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| pool_error(&target, e))?;
        schema::migrate(&mut client, &options.schema, |e| db_error(&target, &e)).await?;
        drop(client);
        let sql = Arc::new(Statements::new(&format!("{}.records", options.quoted_schema())));
        let touches = Arc::new(TouchBuffer::default());
        let flush = Flush { pool: Arc::new(pool.weak()), sql: sql.clone(), target: target.clone() };
        spawn_flusher(&touches, move |batch| flush.clone().write(batch));
        Ok(Self { pool, sql, target, touches, purge_from: Mutex::new(PurgeCursor::new()) })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, Error> {
        self.pool.get().await.map_err(|e| pool_error(&self.target, e))
    }

    fn db(&self, e: tokio_postgres::Error) -> Error {
        db_error(&self.target, &e)
    }

    /// Runs `work` within `deadline`, or reports the store unavailable.
    async fn within<T>(
        &self,
        deadline: Duration,
        work: impl Future<Output = Result<T, Error>> + Send,
    ) -> Result<T, Error> {
        tokio::time::timeout(deadline, work).await.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!("PostgreSQL at {} gave no answer within {deadline:?}", self.target)))
        })
    }

    /// One statement, prepared once per connection, returning its rows.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(|e| self.db(e))?;
        client.query(&statement, params).await.map_err(|e| self.db(e))
    }

    /// One statement, returning how many rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(|e| self.db(e))?;
        client.execute(&statement, params).await.map_err(|e| self.db(e))
    }

    /// The record and its version, as stored.
    async fn load(&self, id: &RecordId) -> Result<Option<(i64, Record)>, Error> {
        self.load_on(&self.client().await?, id).await
    }

    /// [`Self::load`] on a connection the caller already holds: an operation never waits
    /// for a second connection while holding one, which could starve a full pool.
    async fn load_on(&self, client: &deadpool_postgres::Client, id: &RecordId) -> Result<Option<(i64, Record)>, Error> {
        let statement = client.prepare_cached(&self.sql.load).await.map_err(|e| self.db(e))?;
        let row = client.query_opt(&statement, &[&id.scope, &id.tenant, &id.key]).await.map_err(|e| self.db(e))?;
        row.map(|row| Ok((row.try_get(0).map_err(|e| self.db(e))?, row::read(&row, 1)?))).transpose()
    }

    /// Inserts `fresh` unless its key is taken; else returns the row holding the key.
    async fn insert_or_load(&self, client: &deadpool_postgres::Client, fresh: &Record) -> Result<Seen, Error> {
        let values = Values::of(fresh)?;
        let statement = client.prepare_cached(&self.sql.claim).await.map_err(|e| self.db(e))?;
        let row = client.query_opt(&statement, &values.params()).await.map_err(|e| self.db(e))?;
        self.seen(row)
    }

    /// What the claim statement's row says.
    fn seen(&self, row: Option<Row>) -> Result<Seen, Error> {
        let Some(row) = row else { return Ok(Seen::Nothing) };
        if row.try_get(0).map_err(|e| self.db(e))? {
            return Ok(Seen::Inserted);
        }
        Ok(Seen::Existing(row.try_get(1).map_err(|e| self.db(e))?, Box::new(row::read(&row, 2)?)))
    }

    /// Replaces the record with `next` if it is still at `version`; `false` when another
    /// writer got there first (or the record is gone).
    async fn swap(&self, client: &deadpool_postgres::Client, version: i64, next: &Record) -> Result<bool, Error> {
        let values = Values::of(next)?;
        let mut params: Vec<&(dyn ToSql + Sync)> = values.params().to_vec();
        params.push(&version);
        let statement = client.prepare_cached(&self.sql.swap).await.map_err(|e| self.db(e))?;
        Ok(client.execute(&statement, &params).await.map_err(|e| self.db(e))? == 1)
    }

    async fn claim_now(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        let client = self.client().await?;
        // One token serves every attempt: at most one attempt writes anything.
        let token = new_token();
        let absent = plan_claim(None, intent, policy, || token);
        // The row the key's absence calls for, proposed by the insert of every attempt.
        let proposal = match &absent.transition {
            Transition::Write(record) => Some(record),
            Transition::None | Transition::Touch(_) => None,
        };
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let seen = match proposal {
                Some(fresh) => self.insert_or_load(&client, fresh).await?,
                None => {
                    self.load_on(&client, &intent.id).await?.map_or(Seen::Nothing, |(v, r)| Seen::Existing(v, r.into()))
                }
            };
            match seen {
                // The key was free: the proposal is the claimed record.
                Seen::Inserted => return Ok(Claim::planned(absent, None)),
                Seen::Nothing if proposal.is_none() => return Ok(Claim::planned(absent, None)),
                // A concurrent insert committed after this statement's snapshot was taken.
                Seen::Nothing => {}
                Seen::Existing(version, existing) => {
                    if let Some(claim) = self.claim_existing(&client, intent, policy, token, version, *existing).await?
                    {
                        return Ok(claim);
                    }
                }
            }
        }
        Err(Error::Unavailable(format!("a claim on {} lost {MAX_CLAIM_ATTEMPTS} races in a row", intent.id)))
    }

    /// Decides on the record that holds the key and persists what the decision changes.
    /// `None` when another writer changed the record since it was read: decide again.
    async fn claim_existing(
        &self,
        client: &deadpool_postgres::Client,
        intent: &Intent,
        policy: ClaimPolicy,
        token: LeaseToken,
        version: i64,
        existing: Record,
    ) -> Result<Option<Claim>, Error> {
        let plan = plan_claim(Some(&existing), intent, policy, || token);
        let persisted = match &plan.transition {
            Transition::None => true,
            Transition::Touch(record) => {
                self.touches.add(record.id.clone(), intent.now);
                true
            }
            Transition::Write(record) => self.swap(client, version, record).await?,
        };
        Ok(persisted.then(|| Claim::planned(plan, Some(existing))))
    }

    async fn resolve_now(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        let client = self.client().await?;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let (version, record) = self.load_on(&client, id).await?.ok_or(Error::NotFound)?;
            let settled = resolve(&record, resolution.clone(), now)?;
            if self.swap(&client, version, &settled).await? {
                return Ok(settled);
            }
        }
        Err(Error::Unavailable(format!("resolving {id} lost {MAX_CLAIM_ATTEMPTS} races in a row")))
    }

    async fn list_now(&self, query: &ListQuery) -> Result<Page, Error> {
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            format!("${}", params.len())
        };
        let mut filters = Vec::new();
        if let Some(scope) = &query.scope {
            filters.push(format!("scope = {}", arg(Box::new(scope.clone()))));
        }
        if let Some(tenant) = &query.tenant {
            filters.push(format!("tenant = {}", arg(Box::new(tenant.clone()))));
        }
        if let Some(status) = query.status {
            filters.push(format!("status = {}", arg(Box::new(status.as_str()))));
        }
        if let Some(prefix) = &query.key_prefix {
            filters.push(format!("starts_with(key, {})", arg(Box::new(prefix.clone()))));
        }
        if let Some(cursor) = &query.cursor {
            let (c, s) = (arg(Box::new(cursor.created_at)), arg(Box::new(cursor.id.scope.clone())));
            let (t, k) = (arg(Box::new(cursor.id.tenant.clone())), arg(Box::new(cursor.id.key.clone())));
            filters.push(format!("(created_at, scope, tenant, key) < ({c}, {s}, {t}, {k})"));
        }
        let limit = query.limit.clamp(1, MAX_PAGE);
        let limit_arg = arg(Box::new(limit as i64 + 1));
        let sql = self.sql.list(&filters, &limit_arg);
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        let records = self.query(&sql, &refs).await?.iter().map(|row| row::read(row, 0)).collect::<Result<_, _>>()?;
        Ok(page(records, limit))
    }

    async fn purge_now(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        let limit = limit.min(i64::MAX as usize) as i64;
        let from = self.purge_from.lock().unwrap_or_else(|p| p.into_inner()).start();
        let rows = self.query(&self.sql.purge, &[&now, &limit, &from]).await?;
        let row = rows.first().ok_or_else(|| Error::Corrupt("a purge returned no count".into()))?;
        let deleted: i64 = row.try_get(0).map_err(|e| self.db(e))?;
        let highest: Option<Millis> = row.try_get(1).map_err(|e| self.db(e))?;
        self.purge_from.lock().unwrap_or_else(|p| p.into_inner()).advance(highest);
        Ok(deleted as u64)
    }

    async fn stats_now(&self) -> Result<Vec<StatRow>, Error> {
        let mut out = Vec::new();
        for row in self.query(&self.sql.stats, &[]).await? {
            let (scope, status, count): (String, &str, i64) = (
                row.try_get(0).map_err(|e| self.db(e))?,
                row.try_get(1).map_err(|e| self.db(e))?,
                row.try_get(2).map_err(|e| self.db(e))?,
            );
            let status = Status::parse(status).ok_or_else(|| Error::Corrupt(format!("unknown status {status:?}")))?;
            out.push(StatRow { scope, status, count: count as u64 });
        }
        Ok(out)
    }
}

/// What the claim statement found.
enum Seen {
    /// The proposed record was inserted: the key was free.
    Inserted,
    /// The key is held by this record, at this version.
    Existing(i64, Box<Record>),
    /// Neither: the key was taken by a transaction that committed after the statement's
    /// snapshot, so the holder is invisible to it. Looking again finds it.
    Nothing,
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        self.within(HOT_DEADLINE, self.claim_now(intent, policy)).await
    }

    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        let params: [&(dyn ToSql + Sync); 5] = [&id.scope, &id.tenant, &id.key, &(token as i64), &locked_until];
        Ok(self.within(HOT_DEADLINE, self.execute(&self.sql.renew, &params)).await? == 1)
    }

    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        let (columns, sql): (&[usize], _) = if outcome.replaces_response() {
            (&FINISHED_COLUMNS, &self.sql.finish)
        } else {
            (&FAILED_COLUMNS, &self.sql.finish_failed)
        };
        // `Outcome::apply` decides every value, so this store repeats none of its rules.
        let finished = outcome.applied_to_blank(id.clone(), now);
        let values = Values::of(&finished)?;
        let all = values.params();
        let token = token as i64;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![all[0], all[1], all[2], &token];
        params.extend(columns.iter().map(|&i| all[i]));
        Ok(self.within(HOT_DEADLINE, self.execute(sql, &params)).await? == 1)
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        Ok(self.within(HOT_DEADLINE, self.load(id)).await?.map(|(_, record)| record))
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        self.within(SCAN_DEADLINE, self.list_now(query)).await
    }

    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        let params: [&(dyn ToSql + Sync); 3] = [&id.scope, &id.tenant, &id.key];
        Ok(self.within(HOT_DEADLINE, self.execute(&self.sql.delete, &params)).await? > 0)
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        self.within(HOT_DEADLINE, self.resolve_now(id, resolution, now)).await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        self.within(SCAN_DEADLINE, self.purge_now(now, limit)).await
    }

    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        self.within(SCAN_DEADLINE, self.stats_now()).await
    }
}

/// Writes summed replay counts: one `UPDATE … FROM unnest(…)` per chunk.
#[derive(Clone)]
struct Flush {
    /// Weak, so a dropped store closes its connections without waiting for the flusher.
    pool: Arc<WeakPool>,
    sql: Arc<Statements>,
    target: Arc<str>,
}

impl Flush {
    async fn write(self, mut touches: Vec<Touch>) {
        let Some(pool) = self.pool.upgrade() else { return };
        // Locking rows in one order keeps two processes' flushes from deadlocking.
        touches.sort_by(|a, b| a.id.cmp(&b.id));
        for chunk in touches.chunks(FLUSH_CHUNK) {
            let written = tokio::time::timeout(HOT_DEADLINE, self.write_chunk(&pool, chunk)).await;
            let error = match written {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(_) => Error::Unavailable(format!("PostgreSQL at {} gave no answer", self.target)),
            };
            // Only bookkeeping is lost: no decision depends on these counts.
            tracing::warn!(%error, records = chunk.len(), "replay counts not written");
        }
    }

    async fn write_chunk(&self, pool: &Pool, chunk: &[Touch]) -> Result<(), Error> {
        let client = pool.get().await.map_err(|e| pool_error(&self.target, e))?;
        let scopes: Vec<&str> = chunk.iter().map(|t| t.id.scope.as_str()).collect();
        let tenants: Vec<&str> = chunk.iter().map(|t| t.id.tenant.as_str()).collect();
        let keys: Vec<&str> = chunk.iter().map(|t| t.id.key.as_str()).collect();
        let replays: Vec<i64> = chunk.iter().map(|t| t.replays as i64).collect();
        let seen: Vec<i64> = chunk.iter().map(|t| t.last_seen_at).collect();
        let db = |e: tokio_postgres::Error| db_error(&self.target, &e);
        let statement = client.prepare_cached(&self.sql.touch).await.map_err(db)?;
        client.execute(&statement, &[&scopes, &tenants, &keys, &replays, &seen]).await.map_err(db)?;
        Ok(())
    }
}

/// Every statement's text, with the table's schema-qualified name filled in once.
struct Statements {
    table: String,
    claim: String,
    swap: String,
    load: String,
    renew: String,
    finish: String,
    finish_failed: String,
    /// `finish` for a claim inside a transaction: it fails (division by zero) when it finds
    /// no row it owns, so the `COMMIT` pipelined behind it rolls everything back.
    finish_in_tx: String,
    delete: String,
    purge: String,
    stats: String,
    touch: String,
}

/// A row `purge_expired` may delete at `$1`: the SQL twin of `Record::is_expired` (an
/// action that outlives its TTL keeps its record while its lease lives; a row without
/// `locked_until` has no live lease). Checked against the core by `rule_tests!`.
const EXPIRED: &str = "expires_at <= $1 AND NOT (status = 'in_progress' AND coalesce(locked_until > $1, false))";

impl Statements {
    fn new(table: &str) -> Self {
        let columns: Vec<&str> = COLUMNS.split(", ").collect();
        let placeholders = |from: usize, count: usize| -> String {
            (from..from + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
        };
        let pk = "scope = $1 AND tenant = $2 AND key = $3";
        // The SQL twin of `Record::is_owned_by` (`$4` is the token), checked by `rule_tests!`.
        let owned = format!("{pk} AND status = 'in_progress' AND lease_token = $4");
        let finished: Vec<&str> = FINISHED_COLUMNS.iter().map(|&i| columns[i]).collect();
        let failed: Vec<&str> = FAILED_COLUMNS.iter().map(|&i| columns[i]).collect();
        Self {
            table: table.to_owned(),
            claim: format!(
                "WITH ins AS (
                    INSERT INTO {table} (version, {COLUMNS}) VALUES (1, {values})
                    ON CONFLICT (scope, tenant, key) DO NOTHING
                    RETURNING version, {COLUMNS})
                 SELECT true, version, {COLUMNS} FROM ins
                 UNION ALL
                 SELECT false, version, {COLUMNS} FROM {table} WHERE {pk} AND NOT EXISTS (SELECT 1 FROM ins)",
                values = placeholders(1, COLUMN_COUNT),
            ),
            swap: format!(
                "UPDATE {table} SET version = version + 1, ({}) = ({}) WHERE {pk} AND version = ${}",
                columns[3..].join(", "),
                placeholders(4, COLUMN_COUNT - 3),
                COLUMN_COUNT + 1,
            ),
            load: format!("SELECT version, {COLUMNS} FROM {table} WHERE {pk}"),
            renew: format!("UPDATE {table} SET version = version + 1, locked_until = $5 WHERE {owned}"),
            finish: format!(
                "UPDATE {table} SET version = version + 1, ({}) = ({}) WHERE {owned}",
                finished.join(", "),
                placeholders(5, finished.len()),
            ),
            finish_failed: format!(
                "UPDATE {table} SET version = version + 1, ({}) = ({}) WHERE {owned}",
                failed.join(", "),
                placeholders(5, failed.len()),
            ),
            finish_in_tx: format!(
                "WITH f AS (UPDATE {table} SET version = version + 1, ({}) = ({}) WHERE {owned} RETURNING 1)
                 SELECT 1 / count(*)::int FROM f",
                finished.join(", "),
                placeholders(5, finished.len()),
            ),
            delete: format!("DELETE FROM {table} WHERE {pk}"),
            purge: format!(
                "WITH purged AS (
                    DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM {table} WHERE expires_at >= $3 AND {EXPIRED}
                        ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))
                    AND {EXPIRED}
                    RETURNING expires_at)
                 SELECT count(*), max(expires_at) FROM purged"
            ),
            stats: format!("SELECT scope, status, count(*) FROM {table} GROUP BY scope, status ORDER BY scope, status"),
            touch: format!(
                "UPDATE {table} AS r SET version = r.version + 1, replay_count = r.replay_count + t.replays,
                        last_seen_at = greatest(r.last_seen_at, t.seen)
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])
                      AS t(scope, tenant, key, replays, seen)
                 WHERE r.scope = t.scope AND r.tenant = t.tenant AND r.key = t.key"
            ),
        }
    }

    /// A page of records, newest first, matching `filters` (already numbered), with the
    /// row limit bound to `limit`.
    fn list(&self, filters: &[String], limit: &str) -> String {
        let filter = if filters.is_empty() { String::new() } else { format!("WHERE {}", filters.join(" AND ")) };
        format!(
            "SELECT {COLUMNS} FROM {} {filter} \
             ORDER BY created_at DESC, scope DESC, tenant DESC, key DESC LIMIT {limit}",
            self.table
        )
    }
}

/// A driver error as a readable reason. A server error keeps its severity, message and
/// SQLSTATE but not its DETAIL, which can quote a row (and so a stored body).
fn db_error(target: &str, e: &tokio_postgres::Error) -> Error {
    if let Some(reason) = tls::failure(e) {
        return Error::Tls(format!("PostgreSQL at {target}: {reason}"));
    }
    let reason = match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => {
            let mut reason = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                reason = format!("{reason}: {c}");
                cause = c.source();
            }
            reason
        }
    };
    Error::Unavailable(format!("PostgreSQL at {target}: {reason}"))
}

fn pool_error(target: &str, e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => db_error(target, &e),
        PoolError::Timeout(_) => {
            Error::Unavailable(format!("PostgreSQL at {target}: no connection within {HOT_DEADLINE:?}"))
        }
        other => Error::Unavailable(format!("PostgreSQL at {target}: {other}")),
    }
}
