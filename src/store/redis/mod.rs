//! The Redis store: records shared by every idem process that points at one Redis.
//!
//! # Layout
//!
//! Every key starts with the URL's `prefix` (default `idem`). A record is one hash,
//! `{prefix}:rec:["scope","tenant","key"]`, holding its fields (see `codec.rs`) and a
//! `v` counter that every write bumps. Two sorted sets index the records with the same
//! member per record (its `created_at` then its id, encoded so that byte order is listing
//! order): `{prefix}:idx:created` (every score 0, read with `ZREVRANGEBYLEX`, so a page
//! starts exactly at its cursor, ties on `created_at` included) and `{prefix}:idx:expires`
//! (scored by the record's deadline, read by `purge_expired`). `{prefix}:schema` holds the
//! layout version; a prefix written by a newer idem is refused.
//!
//! # How an operation runs
//!
//! Decisions are made in Rust by [`crate::core::plan_claim`]; the Lua scripts (`*.lua`, see
//! `scripts.rs`) only check versions and lease tokens and keep the indexes in step,
//! atomically. The two rules they restate, fencing (`FENCED`: [`Record::is_owned_by`]) and
//! the deadline a purge goes by (`common.lua`'s `deadline`: [`Record::deadline`]), are
//! checked against the core case by case (`conformance::rule_tests!`).
//!
//! - `claim` runs CLAIM, which inserts the core's brand-new record if the key is absent
//!   (one round trip for a new key) or returns the record there, packed into one string
//!   (`codec::unpack`): the client parses one bulk string much faster than a reply of
//!   thirty-odd. Rust decides on it; a
//!   decision that writes (a retry recovery, a lost lease) goes through WRITE, a
//!   compare-and-set on `v` that returns the current record on conflict, and Rust decides
//!   again on that. A replay writes nothing: its count goes to the [`TouchBuffer`], flushed
//!   once a second by TOUCH.
//! - `renew` and `finish` run FENCED, which writes only while the record is `in_progress`
//!   under the caller's token (fencing). `finish` writes the fields [`Outcome::apply`] sets,
//!   computed by applying it in Rust.
//! - `resolve` reads, calls [`crate::core::resolve`] and writes with WRITE.
//! - `list` reads the created index a batch at a time (never `KEYS` or `SCAN`), fetches the
//!   records of a batch in one pipeline and filters in Rust. `stats` walks the same index:
//!   it costs O(records). Index entries whose record Redis has dropped are skipped and
//!   removed on the way.
//!
//! # Expiry
//!
//! Redis forgets a record by itself: its time to live is set to its deadline,
//! `max(expires_at, locked_until)` while a lease lives (an action that outlives its TTL
//! keeps its record), and only ever grows (renew extends it). It is given relative to the
//! writer's `now` (`PEXPIRE deadline - now`), not as an absolute `PEXPIREAT`, so Redis's
//! clock and idem's may differ; keep the clocks of idem's hosts in sync, as for leases.
//! Consequences: `purge_expired` mostly removes index entries of records Redis already
//! dropped, and a key whose record Redis dropped is claimed as new, so
//! `idem_expired_key_retries_total` stays at 0 on this store. The indexes expire with their
//! longest-lived record, so an abandoned prefix leaves only its schema key behind.
//!
//! # Durability
//!
//! A record is as durable as Redis makes it. Without persistence nothing survives a Redis
//! restart; with RDB snapshots only, the records written since the last snapshot (minutes)
//! are lost; with AOF and `appendfsync everysec` (Redis's AOF default) up to about one
//! second of acknowledged records can be lost when Redis crashes or the machine loses
//! power; with `appendfsync always` every acknowledged write survives. Replication is
//! asynchronous: a failover to a replica can lose acknowledged writes too. A lost claim
//! means a retry may execute again, so run Redis with AOF (`appendfsync always` for the
//! SQLite-like guarantee). idem checks none of this at run time, except one warning at
//! start-up when `CONFIG GET appendonly` answers `no` (many managed Redis services forbid
//! `CONFIG`; then nothing is said).
//!
//! # Redis Cluster (on paper, not tested)
//!
//! A record is one key, but each script also touches the two index keys, and every
//! script's keys must live in one slot. A prefix that is a hash tag, such as `{idem}`,
//! puts every key of the prefix in one slot: that works, but then one shard holds
//! everything, so a cluster adds no capacity for idem. This build connects to a single
//! Redis (or a primary behind a proxy); the cluster client is not compiled in.
//!
//! # TLS
//!
//! `rediss://` connects over TLS (rustls, the ring provider), verifying the chain and the
//! host name against the roots of [`crate::tls`]: Mozilla's, the platform's and the PEM
//! bundle in `SSL_CERT_FILE`, so a private CA is trusted by pointing `SSL_CERT_FILE` at
//! it. The redis crate's `#insecure` is refused as bad input. A certificate that fails
//! verification is [`Error::Tls`]: not an outage, so start-up stops instead of waiting.
//! The crate builds its rustls configuration with the process's default provider, which
//! is ring, the only one linked in.
//!
//! # Outages
//!
//! A [`ConnectionManager`] reconnects by itself: after Redis goes away and comes back,
//! operations recover without a restart. While it is away every operation returns
//! [`Error::Unavailable`] promptly: connecting and each answer time out after 2 s, and a
//! failed reconnect is not retried in the background of a request.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ScriptInvocation, Value};
use rustls::pki_types::CertificateDer;

use super::memory::{matches, page};
use super::touch::{Touch, TouchBuffer, spawn_flusher};
use super::{Claim, Error, ListQuery, MAX_PAGE, Page, StatRow, Store, new_token};
use crate::core::{
    ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Record, RecordId, Resolution, Status, Transition, plan_claim,
    resolve,
};
use codec::{Keys, SCHEMA_VERSION, Stored, member, parse_member};
use target::Trust;

mod codec;
mod scripts;
mod target;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long Redis may take to answer one command or pipeline.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound on one round trip including a reconnect it waits for: a dead server never
/// hangs a request, whatever the redis crate does.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts before giving up: every failed attempt means another writer
/// succeeded, so this is only reached under pathological contention on one key.
const MAX_ATTEMPTS: usize = 32;
/// Index members read per round trip when walking the index (`stats`, filtered lists).
const SCAN_BATCH: usize = 1000;
/// Records per TOUCH call, so a flush never holds Redis for long.
const TOUCH_CHUNK: usize = 256;

/// Why connecting failed: a TLS handshake that failed is the configuration's fault (an
/// untrusted certificate, another host's name), not an outage to wait out.
fn connect_error(addr: &str, e: &redis::RedisError) -> Error {
    match crate::tls::handshake_error(e) {
        Some(handshake) => {
            let mut reason = crate::tls::describe(handshake);
            if matches!(handshake, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) {
                reason.push_str("; trust the server's CA with SSL_CERT_FILE");
            }
            Error::Tls(format!("Redis at {addr}: {reason}"))
        }
        None => Error::Unavailable(format!("cannot connect to Redis at {addr}: {e}")),
    }
}

/// Opens a `redis://[[user]:password@]host[:port][/db][?prefix=NAME]` store. Tries once.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    Ok(Arc::new(RedisStore::connect(url).await?))
}

/// The Redis store.
pub struct RedisStore {
    /// One multiplexed connection that reconnects by itself; cloning it is cheap and every
    /// clone shares the connection.
    conn: ConnectionManager,
    /// Key names under this store's prefix.
    keys: Arc<Keys>,
    /// `host:port/db` for messages: never the password.
    addr: Arc<str>,
    /// Replay counts waiting for the next flush.
    touches: Arc<TouchBuffer>,
}

/// What CLAIM found.
// A record is large next to the empty variant, but these values live for one round trip
// on the stack; boxing would only add an allocation.
#[expect(clippy::large_enum_variant, reason = "a short-lived return value")]
enum Seen {
    /// The key was absent and the brand-new record is now stored.
    Inserted,
    /// The record there (`None`: absent, and nothing was inserted).
    Current(Option<Stored>),
}

/// What WRITE did.
#[expect(clippy::large_enum_variant, reason = "a short-lived return value")]
enum Cas {
    /// The record had the expected version and now holds the new one.
    Written,
    /// It had changed: here it is now (`None`: gone).
    Conflict(Option<Stored>),
}

impl RedisStore {
    /// Connects (once), checks the prefix's layout version, loads the scripts and starts
    /// the replay-count flusher.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, Trust::Default).await
    }

    /// [`RedisStore::connect`], but a `rediss://` connection trusts only the CA
    /// certificates `roots`, not the usual roots (for a private CA named in code rather
    /// than through `SSL_CERT_FILE`; tests use it). The host name is verified all the same.
    pub async fn connect_trusting(url: &str, roots: &[CertificateDer<'static>]) -> Result<Self, Error> {
        Self::connect_with(url, Trust::Only(roots)).await
    }

    async fn connect_with(url: &str, trust: Trust<'_>) -> Result<Self, Error> {
        let target = target::parse(url, trust)?;
        // No reconnect retries inside a request: one attempt, bounded by the connection
        // timeout, then the error; the next request tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(0);
        let addr: Arc<str> = target.addr.into();
        let conn =
            match tokio::time::timeout(ROUND_TRIP_LIMIT, ConnectionManager::new_with_config(target.client, config))
                .await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(connect_error(&addr, &e)),
                Err(_) => return Err(Error::Unavailable(format!("Redis at {addr} did not answer in time"))),
            };
        let store =
            Self { conn, keys: Arc::new(Keys::new(&target.prefix)), addr, touches: Arc::new(TouchBuffer::default()) };
        store.check_schema().await?;
        store.load_scripts().await?;
        store.warn_without_aof().await;
        store.start_flusher();
        Ok(store)
    }

    /// Runs one round trip, bounded by [`ROUND_TRIP_LIMIT`]; every failure is an outage.
    async fn call<T>(&self, round_trip: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Error> {
        match tokio::time::timeout(ROUND_TRIP_LIMIT, round_trip).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::Unavailable(format!("Redis at {}: {e}", self.addr))),
            Err(_) => Err(Error::Unavailable(format!("Redis at {} did not answer in time", self.addr))),
        }
    }

    /// Marks a fresh prefix with [`SCHEMA_VERSION`] and refuses one written by a newer idem.
    async fn check_schema(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&self.keys.schema).arg(SCHEMA_VERSION).arg("NX").ignore();
        pipe.cmd("GET").arg(&self.keys.schema);
        let (found,): (Option<String>,) = self.call(pipe.query_async(&mut conn)).await?;
        let found = found
            .as_deref()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(|| Error::Corrupt(format!("{} does not hold a schema version", self.keys.schema)))?;
        if found > SCHEMA_VERSION {
            return Err(Error::TooNew { found, supported: SCHEMA_VERSION });
        }
        Ok(())
    }

    /// Loads every script once, so the first requests need no extra round trip and a
    /// script that does not compile fails at start-up. (After a Redis restart the scripts
    /// are loaded again on first use.)
    async fn load_scripts(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for script in scripts::all() {
            pipe.load_script(script).ignore();
        }
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    /// Says once when Redis keeps no append-only file (see the module comment).
    async fn warn_without_aof(&self) {
        let mut conn = self.conn.clone();
        let mut ask = redis::cmd("CONFIG");
        ask.arg("GET").arg("appendonly");
        if let Ok(reply) = self.call(ask.query_async::<Vec<String>>(&mut conn)).await {
            if reply.get(1).map(String::as_str) == Some("no") {
                tracing::warn!(
                    redis = %self.addr,
                    "Redis runs without an append-only file (appendonly no): records written since its last \
                     snapshot, if any, are lost when Redis restarts; use appendonly yes (appendfsync always keeps \
                     every acknowledged record)"
                );
            }
        }
    }

    fn start_flusher(&self) {
        let (conn, keys, addr) = (self.conn.clone(), self.keys.clone(), self.addr.clone());
        spawn_flusher(&self.touches, move |touches| flush(conn.clone(), keys.clone(), addr.clone(), touches));
    }

    /// The three keys every record script is given: the record and the two indexes.
    fn record_keys(&self, invocation: &mut ScriptInvocation<'_>, rec: &str) {
        invocation.key(rec).key(&self.keys.created).key(&self.keys.expires);
    }

    /// CLAIM: inserts `fresh` if the key is absent, else reads what is there.
    async fn claim_script(&self, id: &RecordId, fresh: Option<&Record>, now: Millis) -> Result<Seen, Error> {
        let mut invocation = scripts::CLAIM.prepare_invoke();
        self.record_keys(&mut invocation, &self.keys.record(id));
        if let Some(record) = fresh {
            push_record(&mut invocation, record, now);
        }
        let mut conn = self.conn.clone();
        match self.call(invocation.invoke_async::<Value>(&mut conn)).await? {
            Value::Int(1) => Ok(Seen::Inserted),
            Value::BulkString(packed) => Ok(Seen::Current(codec::parse(id, codec::unpack(id, &packed)?)?)),
            other => Ok(Seen::Current(codec::parse(id, other)?)),
        }
    }

    /// WRITE: stores `record` if the stored one still has `version`.
    async fn write(&self, version: u64, record: &Record, now: Millis) -> Result<Cas, Error> {
        let mut invocation = scripts::WRITE.prepare_invoke();
        self.record_keys(&mut invocation, &self.keys.record(&record.id));
        invocation.arg(version.to_string());
        push_record(&mut invocation, record, now);
        let mut conn = self.conn.clone();
        match self.call(invocation.invoke_async::<Value>(&mut conn)).await? {
            Value::Int(1) => Ok(Cas::Written),
            other => Ok(Cas::Conflict(codec::parse(&record.id, other)?)),
        }
    }

    /// FENCED: removes `removed` and sets `set` while `token` owns the record.
    async fn fenced(
        &self,
        id: &RecordId,
        token: LeaseToken,
        removed: &[&str],
        set: Vec<(&str, Vec<u8>)>,
    ) -> Result<bool, Error> {
        let mut invocation = scripts::FENCED.prepare_invoke();
        self.record_keys(&mut invocation, &self.keys.record(id));
        invocation.arg(token.to_string()).arg(removed.len());
        for name in removed {
            invocation.arg(*name);
        }
        for (name, value) in set {
            invocation.arg(name).arg(value);
        }
        let mut conn = self.conn.clone();
        let owned: i64 = self.call(invocation.invoke_async(&mut conn)).await?;
        Ok(owned == 1)
    }

    /// One record with its version.
    async fn read(&self, id: &RecordId) -> Result<Option<Stored>, Error> {
        let mut conn = self.conn.clone();
        let value: Value = self.call(redis::cmd("HGETALL").arg(self.keys.record(id)).query_async(&mut conn)).await?;
        codec::parse(id, value)
    }

    /// The records of `ids`, in one pipeline.
    async fn read_many<'a>(&self, ids: impl Iterator<Item = &'a RecordId>) -> Result<Vec<Value>, Error> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.keys.record(id));
        }
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        self.call(pipe.query_async(&mut conn)).await
    }

    /// Up to `count` index members from the created index: newest first below `bound`
    /// (`ZREVRANGEBYLEX`), or with `ascending` oldest first above it (`ZRANGEBYLEX`).
    async fn members(&self, bound: &[u8], ascending: bool, count: usize) -> Result<Vec<Vec<u8>>, Error> {
        let mut command = if ascending { redis::cmd("ZRANGEBYLEX") } else { redis::cmd("ZREVRANGEBYLEX") };
        let end = if ascending { "+" } else { "-" };
        command.arg(&self.keys.created).arg(bound).arg(end).arg("LIMIT").arg(0).arg(count);
        let mut conn = self.conn.clone();
        self.call(command.query_async(&mut conn)).await
    }

    /// UNINDEX: drops entries found pointing at no record (or at an older incarnation).
    async fn unindex(&self, stale: Vec<(Vec<u8>, RecordId)>) -> Result<(), Error> {
        if stale.is_empty() {
            return Ok(());
        }
        let mut invocation = scripts::UNINDEX.prepare_invoke();
        invocation.key(&self.keys.created).key(&self.keys.expires);
        for (_, id) in &stale {
            invocation.key(self.keys.record(id));
        }
        for (member, _) in stale {
            invocation.arg(member);
        }
        let mut conn = self.conn.clone();
        self.call(invocation.invoke_async::<()>(&mut conn)).await
    }
}

/// Appends a record to a CLAIM or WRITE call: time to live, deadline, index member, fields.
fn push_record(invocation: &mut ScriptInvocation<'_>, record: &Record, now: Millis) {
    let due = record.deadline();
    // Relative to the writer's clock (see "Expiry" above); at least 1 ms, since 0 would
    // delete the key at once.
    invocation.arg((due - now).max(1)).arg(due).arg(member(record.created_at, &record.id));
    for (name, value) in codec::fields(record) {
        invocation.arg(name).arg(value);
    }
}

/// `(` + member: the exclusive bound after (or before) a member in a lex range.
fn exclusive(member: &[u8]) -> Vec<u8> {
    [b"(".as_slice(), member].concat()
}

/// Whether an id passes the query's filters on the id alone (checked before fetching).
fn id_matches(query: &ListQuery, id: &RecordId) -> bool {
    query.scope.as_ref().is_none_or(|s| &id.scope == s)
        && query.tenant.as_ref().is_none_or(|t| &id.tenant == t)
        && query.key_prefix.as_ref().is_none_or(|p| id.key.starts_with(p.as_str()))
}

/// Decodes index members, dropping any that are not idem's.
fn decode(members: Vec<Vec<u8>>) -> Vec<(Vec<u8>, Millis, RecordId)> {
    members
        .into_iter()
        .filter_map(|m| {
            let (created_at, id) = parse_member(&m)?;
            Some((m, created_at, id))
        })
        .collect()
}

/// Writes summed replay counts (see [`super::touch`]). Failures lose counts, never a
/// decision, so they are only logged.
async fn flush(mut conn: ConnectionManager, keys: Arc<Keys>, addr: Arc<str>, touches: Vec<Touch>) {
    for chunk in touches.chunks(TOUCH_CHUNK) {
        let mut invocation = scripts::TOUCH.prepare_invoke();
        for touch in chunk {
            invocation.key(keys.record(&touch.id));
        }
        for touch in chunk {
            invocation.arg(touch.replays).arg(touch.last_seen_at);
        }
        let outcome = tokio::time::timeout(ROUND_TRIP_LIMIT, invocation.invoke_async::<()>(&mut conn)).await;
        if !matches!(outcome, Ok(Ok(()))) {
            tracing::warn!(redis = %addr, records = chunk.len(), "could not write replay counts; they are dropped");
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        // What a claim writes when nothing is stored, planned by the core like every other
        // row and sent along, so that a new key takes a single round trip.
        let fresh = plan_claim(None, intent, policy, new_token);
        let fresh_record = match &fresh.transition {
            Transition::Write(record) => Some(record),
            Transition::None | Transition::Touch(_) => None,
        };
        let mut seen = self.claim_script(&intent.id, fresh_record, intent.now).await?;
        for _ in 0..MAX_ATTEMPTS {
            let stored = match seen {
                Seen::Inserted => return Ok(Claim::planned(fresh, None)),
                Seen::Current(None) if fresh_record.is_none() => return Ok(Claim::planned(fresh, None)),
                // Gone between a read and a write: insert it now.
                Seen::Current(None) => {
                    seen = self.claim_script(&intent.id, fresh_record, intent.now).await?;
                    continue;
                }
                Seen::Current(Some(stored)) => stored,
            };
            let plan = plan_claim(Some(&stored.record), intent, policy, new_token);
            match &plan.transition {
                Transition::None => {}
                Transition::Touch(record) => self.touches.add(record.id.clone(), intent.now),
                Transition::Write(record) => match self.write(stored.version, record, intent.now).await? {
                    Cas::Written => {}
                    // Someone else wrote first: decide again on what they wrote.
                    Cas::Conflict(current) => {
                        seen = Seen::Current(current);
                        continue;
                    }
                },
            }
            return Ok(Claim::planned(plan, Some(stored.record)));
        }
        Err(Error::Unavailable(format!("{} kept changing during {MAX_ATTEMPTS} claim attempts", intent.id)))
    }

    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        self.fenced(id, token, &[], vec![("lu", locked_until.to_string().into_bytes())]).await
    }

    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        let (removed, set) = codec::finish_fields(outcome, now);
        self.fenced(id, token, &removed, set).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        Ok(self.read(id).await?.map(|stored| stored.record))
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        // One more than the page, to learn whether a next page exists; larger batches when
        // filters may drop records, so a selective filter costs fewer round trips.
        let filtered =
            query.status.is_some() || query.scope.is_some() || query.tenant.is_some() || query.key_prefix.is_some();
        let batch = if filtered { SCAN_BATCH.max(limit + 1) } else { limit + 1 };
        let mut upper = match &query.cursor {
            Some(cursor) => exclusive(&member(cursor.created_at, &cursor.id)),
            None => b"+".to_vec(),
        };
        let mut found = Vec::new();
        loop {
            let members = self.members(&upper, false, batch).await?;
            let Some(last) = members.last() else { break };
            upper = exclusive(last);
            let exhausted = members.len() < batch;
            let entries: Vec<_> = decode(members).into_iter().filter(|(_, _, id)| id_matches(query, id)).collect();
            let values = self.read_many(entries.iter().map(|(_, _, id)| id)).await?;
            let mut stale = Vec::new();
            for ((member, created_at, id), value) in entries.into_iter().zip(values) {
                match codec::parse(&id, value)? {
                    Some(stored) if stored.record.created_at == created_at => {
                        if matches(query, &stored.record) {
                            found.push(stored.record);
                        }
                    }
                    _ => stale.push((member, id)),
                }
            }
            self.unindex(stale).await?;
            if found.len() > limit || exhausted {
                break;
            }
        }
        Ok(page(found, limit))
    }

    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        let mut invocation = scripts::DELETE.prepare_invoke();
        self.record_keys(&mut invocation, &self.keys.record(id));
        let mut conn = self.conn.clone();
        let deleted: i64 = self.call(invocation.invoke_async(&mut conn)).await?;
        Ok(deleted == 1)
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        let mut current = self.read(id).await?;
        for _ in 0..MAX_ATTEMPTS {
            let stored = current.ok_or(Error::NotFound)?;
            let settled = resolve(&stored.record, resolution.clone(), now)?;
            match self.write(stored.version, &settled, now).await? {
                Cas::Written => return Ok(settled),
                Cas::Conflict(now_there) => current = now_there,
            }
        }
        Err(Error::Unavailable(format!("{id} kept changing during {MAX_ATTEMPTS} resolve attempts")))
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        if limit == 0 {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let due: Vec<Vec<u8>> = self
            .call(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&self.keys.expires)
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn),
            )
            .await?;
        let entries = decode(due);
        if entries.is_empty() {
            return Ok(0);
        }
        let mut invocation = scripts::PURGE.prepare_invoke();
        invocation.key(&self.keys.created).key(&self.keys.expires).arg(now);
        for (member, _, id) in entries {
            invocation.key(self.keys.record(&id)).arg(member);
        }
        self.call(invocation.invoke_async(&mut conn)).await
    }

    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        // Walks the whole index: O(records), in batches of SCAN_BATCH, two round trips each.
        let mut counts: BTreeMap<(String, Status), u64> = BTreeMap::new();
        let mut lower = b"-".to_vec();
        loop {
            let members = self.members(&lower, true, SCAN_BATCH).await?;
            let Some(last) = members.last() else { break };
            lower = exclusive(last);
            let exhausted = members.len() < SCAN_BATCH;
            let entries = decode(members);
            let mut pipe = redis::pipe();
            for (_, _, id) in &entries {
                pipe.cmd("HMGET").arg(self.keys.record(id)).arg("st").arg("ca");
            }
            let mut conn = self.conn.clone();
            let rows: Vec<(Option<String>, Option<i64>)> =
                if entries.is_empty() { Vec::new() } else { self.call(pipe.query_async(&mut conn)).await? };
            let mut stale = Vec::new();
            for ((member, created_at, id), row) in entries.into_iter().zip(rows) {
                match row {
                    (Some(status), Some(ca)) if ca == created_at => {
                        let status = Status::parse(&status)
                            .ok_or_else(|| Error::Corrupt(format!("{id}: bad status {status:?}")))?;
                        *counts.entry((id.scope, status)).or_default() += 1;
                    }
                    _ => stale.push((member, id)),
                }
            }
            self.unindex(stale).await?;
            if exhausted {
                break;
            }
        }
        Ok(counts.into_iter().map(|((scope, status), count)| StatRow { scope, status, count }).collect())
    }
}

#[cfg(test)]
mod tests;
