//! The embedded store: one SQLite file in WAL mode.
//!
//! Writes go through one writer thread that commits them in groups: every operation
//! waiting when a transaction starts joins it, so one fsync serves many requests and
//! throughput grows with concurrency instead of being capped by the disk's sync rate.
//! One failing operation never fails its neighbours: an operation writes with at most one
//! statement, which SQLite undoes by itself when it fails, and the one operation that
//! writes several (the replay-count flush) runs in a savepoint of its own. Reads (and decisions that write nothing durable, such as a replay) use a
//! small pool of read connections and never wait for the writer.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot};

use super::memory::page;
use super::touch::{Touch, TouchBuffer, spawn_flusher};
use super::{Claim, Error, ListQuery, MAX_PAGE, Page, StatRow, Store, new_token};
use crate::core::{
    ClaimPolicy, Fingerprint, Intent, Lease, LeaseToken, Millis, Outcome, Plan, Record, RecordId, Resolution, Status,
    StoredResponse, Transition, plan_claim, resolve,
};

/// The schema version this build writes. A file with a higher `user_version` is refused.
const SCHEMA_VERSION: i64 = 1;

/// At most this many operations share one transaction.
const MAX_GROUP: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    scope          TEXT    NOT NULL,
    tenant         TEXT    NOT NULL,
    key            TEXT    NOT NULL,
    fingerprint    TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    lease_token    INTEGER,
    locked_until   INTEGER,
    resp_status    INTEGER,
    resp_headers   TEXT,
    resp_body      BLOB,
    resp_retained  INTEGER,
    created_at     INTEGER NOT NULL,
    last_seen_at   INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    replay_count   INTEGER NOT NULL,
    attempt_count  INTEGER NOT NULL,
    correlation_id TEXT,
    error_summary  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS records_id ON records (scope, tenant, key);
CREATE INDEX IF NOT EXISTS records_expires ON records (expires_at);
CREATE INDEX IF NOT EXISTS records_created ON records (created_at, scope, tenant, key);
";

const COLUMNS: &str = "scope, tenant, key, fingerprint, status, lease_token, locked_until, resp_status, \
    resp_headers, resp_body, resp_retained, created_at, last_seen_at, expires_at, replay_count, attempt_count, \
    correlation_id, error_summary";

/// How hard a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: acknowledged records survive power loss (the default).
    Full,
    /// fsync at checkpoints only: acknowledged records survive `kill -9` of every process,
    /// but the last commits may be lost on power loss or an OS crash.
    Normal,
}

/// Where and how to open the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The database file.
    pub path: PathBuf,
    /// The sync mode.
    pub synchronous: Synchronous,
}

impl Options {
    /// Parses what follows `sqlite://`: `PATH[?synchronous=full|normal]`.
    pub fn from_url_rest(rest: &str) -> Result<Self, String> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err("no file path; write e.g. sqlite://./idem.db".into());
        }
        let mut synchronous = Synchronous::Full;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            synchronous = match pair {
                "synchronous=full" => Synchronous::Full,
                "synchronous=normal" => Synchronous::Normal,
                other => {
                    return Err(format!("unknown option {other:?}; the only option is synchronous=full|normal"));
                }
            };
        }
        Ok(Self { path: PathBuf::from(path), synchronous })
    }
}

/// A unit of work for the writer thread: runs inside the group transaction (or is told
/// why there is none) and returns whether it succeeded and how to deliver its result
/// once the commit is known.
type Job = Box<dyn FnOnce(Result<&Connection, &str>) -> (bool, Deliver) + Send>;
/// Sends an operation's result, given whether the group's commit succeeded.
type Deliver = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The SQLite store.
pub struct SqliteStore {
    /// Jobs for the writer thread. The thread exits when the store is dropped and the
    /// queue is drained, so every accepted write is committed or answered with an error.
    writer: mpsc::UnboundedSender<Job>,
    readers: Arc<Readers>,
    /// Replay counts waiting for the next flush.
    touches: Arc<TouchBuffer>,
}

/// Read connections, opened on demand and kept for reuse.
struct Readers {
    options: Options,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => connect(&self.options)?,
        };
        let result = f(&conn);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        result
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

fn connect(options: &Options) -> Result<Connection, Error> {
    let conn = Connection::open(&options.path)
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", options.path.display())))?;
    let sync = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(unavailable)?;
    conn.execute_batch(&format!("PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};"))
        .map_err(|e| Error::Unavailable(format!("cannot use {}: {e}", options.path.display())))?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), Error> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(unavailable)?;
    if version > SCHEMA_VERSION {
        return Err(Error::TooNew { found: version, supported: SCHEMA_VERSION });
    }
    if version < SCHEMA_VERSION {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"))
            .map_err(unavailable)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating when missing) the file, upgrades its schema and starts the writer.
    pub async fn open(options: Options) -> Result<Self, Error> {
        let opened = options.clone();
        let conn = tokio::task::spawn_blocking(move || {
            let conn = connect(&opened)?;
            migrate(&conn)?;
            Ok::<_, Error>(conn)
        })
        .await
        .map_err(unavailable)??;
        let (writer, jobs) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("idem-sqlite-writer".into())
            .spawn(move || write_loop(conn, jobs))
            .map_err(unavailable)?;
        let touches = Arc::new(TouchBuffer::default());
        let flush_writer = writer.clone();
        spawn_flusher(&touches, move |batch| {
            let _ = flush_writer.send(touch_job(batch));
            std::future::ready(())
        });
        Ok(Self { writer, readers: Arc::new(Readers { options, idle: Mutex::new(Vec::new()) }), touches })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f)).await.map_err(unavailable)?
    }

    /// Runs `f` in the writer's next group transaction. `f` writes with at most one
    /// statement (see the module docs): a failed statement leaves nothing behind, so `f`
    /// needs no savepoint.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = conn.map_err(|reason| Error::Unavailable(reason.to_owned())).and_then(f);
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |commit| {
                let _ = reply.send(commit.map_err(Error::Unavailable).and(result));
            });
            (ok, deliver)
        });
        self.writer.send(job).map_err(|_| Error::Unavailable("the writer thread stopped".into()))?;
        answer.await.map_err(|_| Error::Unavailable("the writer thread stopped".into()))?
    }
}

/// Writes summed replay counts (see [`super::touch`]): several statements, so in a
/// savepoint, undone together when one fails.
fn touch_job(batch: Vec<Touch>) -> Job {
    Box::new(move |conn| {
        let Ok(conn) = conn else { return (false, Box::new(|_| {})) };
        let statement = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([])).is_ok();
        let mut ok = statement("SAVEPOINT touch");
        for touch in batch {
            let id = &touch.id;
            ok &= conn
                .prepare_cached(
                    "UPDATE records SET replay_count = replay_count + ?4, last_seen_at = MAX(last_seen_at, ?5)
                     WHERE scope = ?1 AND tenant = ?2 AND key = ?3",
                )
                .and_then(|mut s| {
                    s.execute(params![id.scope, id.tenant, id.key, touch.replays as i64, touch.last_seen_at])
                })
                .is_ok();
        }
        if !ok {
            statement("ROLLBACK TO touch");
        }
        statement("RELEASE touch");
        (ok, Box::new(|_| {}))
    })
}

/// The writer thread: takes every queued job into one transaction, commits once, then
/// answers each job.
fn write_loop(conn: Connection, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // Prepared once: BEGIN and COMMIT are two statements of every group.
        let statement = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]).map(drop));
        if let Err(e) = statement("BEGIN IMMEDIATE") {
            let reason = format!("cannot begin a transaction: {e}");
            for job in group {
                let (_, deliver) = job(Err(&reason));
                deliver(Err(reason.clone()));
            }
            continue;
        }
        let mut delivers = Vec::with_capacity(group.len());
        for job in group {
            let (_, deliver) = job(Ok(&conn));
            delivers.push(deliver);
        }
        let commit = statement("COMMIT").map_err(|e| format!("commit failed: {e}"));
        if commit.is_err() {
            let _ = statement("ROLLBACK");
        }
        for deliver in delivers {
            deliver(commit.clone());
        }
    }
}

/// The statements run on every request, made once (the statement cache is keyed by text).
static LOAD: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COLUMNS} FROM records WHERE scope = ?1 AND tenant = ?2 AND key = ?3"));
static VALUES: &str = "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)";
static SAVE: LazyLock<String> = LazyLock::new(|| format!("INSERT OR REPLACE INTO records ({COLUMNS}) {VALUES}"));
static INSERT_NEW: LazyLock<String> =
    LazyLock::new(|| format!("INSERT INTO records ({COLUMNS}) {VALUES} ON CONFLICT DO NOTHING"));

/// A claim's write, in the writer, where nothing else can change the record: `plan` was
/// made on `existing` as read before (`None`: no record then). A new key when read is
/// stored with one statement unless a record has appeared since, and then the plan stands
/// without reading again; otherwise the record is read and planned again here.
fn claim_in_writer(
    conn: &Connection,
    existing: Option<Record>,
    plan: Plan,
    intent: &Intent,
    policy: ClaimPolicy,
) -> Result<Claim, Error> {
    if let (None, Transition::Write(record)) = (&existing, &plan.transition) {
        if insert_new(conn, record)? {
            return Ok(Claim::planned(plan, None));
        }
    }
    let existing = load(conn, &intent.id)?;
    let plan = plan_claim(existing.as_ref(), intent, policy, new_token);
    if let Transition::Touch(record) | Transition::Write(record) = &plan.transition {
        save(conn, record)?;
    }
    Ok(Claim::planned(plan, existing))
}

fn load(conn: &Connection, id: &RecordId) -> Result<Option<Record>, Error> {
    let mut stmt = conn.prepare_cached(&LOAD).map_err(unavailable)?;
    let row = stmt.query_row(params![id.scope, id.tenant, id.key], read_row).optional().map_err(unavailable)?;
    row.transpose()
}

/// Stores `r`, replacing the record of its id.
fn save(conn: &Connection, r: &Record) -> Result<(), Error> {
    write_row(conn, &SAVE, r).map(drop)
}

/// Stores `r` unless a record of its id exists: false then.
fn insert_new(conn: &Connection, r: &Record) -> Result<bool, Error> {
    write_row(conn, &INSERT_NEW, r).map(|n| n == 1)
}

/// Runs `sql` (an `INSERT` of [`COLUMNS`]) with `r`'s fields; the number of rows written.
fn write_row(conn: &Connection, sql: &str, r: &Record) -> Result<usize, Error> {
    let response = r.response.as_ref();
    let headers = response.map(|resp| serde_json::to_string(&resp.headers)).transpose().map_err(unavailable)?;
    conn.prepare_cached(sql)
        .and_then(|mut stmt| {
            stmt.execute(params![
                r.id.scope,
                r.id.tenant,
                r.id.key,
                r.fingerprint.to_hex(),
                r.status.as_str(),
                r.lease.map(|l| l.token as i64),
                r.lease.map(|l| l.locked_until),
                response.map(|resp| resp.status),
                headers,
                response.map(|resp| resp.body.as_ref()),
                response.map(|resp| resp.retained),
                r.created_at,
                r.last_seen_at,
                r.expires_at,
                r.replay_count as i64,
                r.attempt_count as i64,
                r.correlation_id,
                r.error_summary,
            ])
        })
        .map_err(unavailable)
}

/// Maps a row to a record. The outer `Result` is SQLite's; the inner one says whether
/// the row makes sense.
fn read_row(row: &Row<'_>) -> rusqlite::Result<Result<Record, Error>> {
    let fingerprint: String = row.get(3)?;
    let status: String = row.get(4)?;
    let token: Option<i64> = row.get(5)?;
    let locked_until: Option<i64> = row.get(6)?;
    let resp_status: Option<u16> = row.get(7)?;
    let resp_headers: Option<String> = row.get(8)?;
    let resp_body: Option<Vec<u8>> = row.get(9)?;
    let resp_retained: Option<bool> = row.get(10)?;
    let id = RecordId::new(row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?);
    let corrupt = |what: &str| Err(Error::Corrupt(format!("{id}: {what}")));
    let Some(fingerprint) = Fingerprint::from_hex(&fingerprint) else {
        return Ok(corrupt("bad fingerprint"));
    };
    let Some(status) = Status::parse(&status) else {
        return Ok(corrupt("bad status"));
    };
    let response = match resp_status {
        None => None,
        Some(status) => {
            let Ok(headers) = serde_json::from_str(resp_headers.as_deref().unwrap_or("[]")) else {
                return Ok(corrupt("bad response headers"));
            };
            Some(StoredResponse {
                status,
                headers,
                body: Bytes::from(resp_body.unwrap_or_default()),
                retained: resp_retained.unwrap_or(true),
            })
        }
    };
    Ok(Ok(Record {
        fingerprint,
        status,
        lease: token.zip(locked_until).map(|(t, until)| Lease { token: t as u64, locked_until: until }),
        response,
        created_at: row.get(11)?,
        last_seen_at: row.get(12)?,
        expires_at: row.get(13)?,
        replay_count: row.get::<_, i64>(14)? as u64,
        attempt_count: row.get::<_, i64>(15)? as u64,
        correlation_id: row.get(16)?,
        error_summary: row.get(17)?,
        id,
    }))
}

/// The SQL twin of [`Record::is_owned_by`] (`?4` is the token): the guard of `renew` and
/// `finish`. Checked against the core by `rule_tests!`.
const OWNED: &str = "scope = ?1 AND tenant = ?2 AND key = ?3 AND status = 'in_progress' AND lease_token = ?4";

/// The SQL twin of [`Record::is_expired`] at `?1`: what `purge_expired` deletes. A row with
/// no `locked_until` has no live lease: `coalesce`, since comparing NULL would keep an
/// `in_progress` row without a lease forever (as this store once did), while a claim
/// already treated it as expired. Checked against the core by `rule_tests!`.
const EXPIRED: &str = "expires_at <= ?1 AND NOT (status = 'in_progress' AND coalesce(locked_until > ?1, 0))";

/// Ends the lease `token` holds with `outcome`: one guarded `UPDATE`, setting the same
/// fields [`Outcome::apply`] sets. `false` when `token` no longer owns the record.
fn finish_owned(
    conn: &Connection,
    id: &RecordId,
    token: LeaseToken,
    outcome: Outcome,
    now: Millis,
) -> Result<bool, Error> {
    let status = outcome.status();
    let owned = format!("WHERE {OWNED}");
    let changed = match outcome {
        Outcome::Completed(_) | Outcome::Verified { .. } => {
            let finished = outcome.applied_to_blank(id.clone(), now);
            let (Some(response), note) = (finished.response, finished.error_summary) else {
                unreachable!("a completed outcome stores an answer")
            };
            let headers = serde_json::to_string(&response.headers).map_err(unavailable)?;
            conn.prepare_cached(&format!(
                "UPDATE records SET status = ?5, lease_token = NULL, locked_until = NULL, resp_status = ?6,
                        resp_headers = ?7, resp_body = ?8, resp_retained = ?9, last_seen_at = ?10,
                        error_summary = ?11 {owned}"
            ))
            .and_then(|mut stmt| {
                stmt.execute(params![
                    id.scope,
                    id.tenant,
                    id.key,
                    token as i64,
                    status.as_str(),
                    response.status,
                    headers,
                    response.body.as_ref(),
                    response.retained,
                    now,
                    note,
                ])
            })
        }
        // A failed attempt keeps the previous answer (see `Outcome::replaces_response`).
        Outcome::Retryable { error } | Outcome::Unknown { error } | Outcome::NeedsReview { error } => conn
            .prepare_cached(&format!(
                "UPDATE records SET status = ?5, lease_token = NULL, locked_until = NULL, last_seen_at = ?6,
                        error_summary = ?7 {owned}"
            ))
            .and_then(|mut stmt| {
                stmt.execute(params![id.scope, id.tenant, id.key, token as i64, status.as_str(), now, error])
            }),
    };
    changed.map(|n| n == 1).map_err(unavailable)
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        // Decisions that change nothing durable (replay, key reused, in flight, …) are
        // made on a read connection: a replay never waits for a commit.
        // A point read on an indexed key takes microseconds, so it runs right here rather
        // than paying a hand-off to the blocking pool on every request.
        let existing = self.readers.with(|conn| load(conn, &intent.id))?;
        let plan = plan_claim(existing.as_ref(), intent, policy, new_token);
        match &plan.transition {
            Transition::None => return Ok(Claim::planned(plan, existing)),
            Transition::Touch(record) => {
                self.touches.add(record.id.clone(), intent.now);
                return Ok(Claim::planned(plan, existing));
            }
            Transition::Write(_) => {}
        }
        let intent = intent.clone();
        self.write(move |conn| claim_in_writer(conn, existing, plan, &intent, policy)).await
    }

    /// No read first: the writer stores a new key's claim with one statement, and only
    /// when a record is there already reads it and plans again.
    async fn claim_new(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        let plan = plan_claim(None, intent, policy, new_token);
        let intent = intent.clone();
        self.write(move |conn| claim_in_writer(conn, None, plan, &intent, policy)).await
    }

    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        let id = id.clone();
        self.write(move |conn| {
            conn.prepare_cached(&format!("UPDATE records SET locked_until = ?5 WHERE {OWNED}"))
                .and_then(|mut s| s.execute(params![id.scope, id.tenant, id.key, token as i64, locked_until]))
                .map(|n| n == 1)
                .map_err(unavailable)
        })
        .await
    }

    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        let id = id.clone();
        self.write(move |conn| finish_owned(conn, &id, token, outcome, now)).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        let id = id.clone();
        self.read(move |conn| load(conn, &id)).await
    }

    /// One read transaction for the batch: one shared lock, one snapshot.
    async fn get_many(&self, ids: &[RecordId]) -> Result<Vec<Option<Record>>, Error> {
        let ids = ids.to_vec();
        self.read(move |conn| {
            let snapshot = conn.unchecked_transaction().map_err(unavailable)?;
            // In index order: neighbouring look-ups walk the same pages.
            let mut order: Vec<usize> = (0..ids.len()).collect();
            order.sort_unstable_by(|a, b| ids[*a].cmp(&ids[*b]));
            let mut records = vec![None; ids.len()];
            for i in order {
                records[i] = load(&snapshot, &ids[i])?;
            }
            snapshot.finish().map_err(unavailable)?;
            Ok(records)
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let query = query.clone();
        self.read(move |conn| list(conn, &query)).await
    }

    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        let id = id.clone();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM records WHERE scope = ?1 AND tenant = ?2 AND key = ?3")
                .and_then(|mut s| s.execute(params![id.scope, id.tenant, id.key]))
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        let id = id.clone();
        self.write(move |conn| {
            let record = load(conn, &id)?.ok_or(Error::NotFound)?;
            let settled = resolve(&record, resolution, now)?;
            save(conn, &settled)?;
            Ok(settled)
        })
        .await
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        self.write(move |conn| {
            conn.prepare_cached(&format!(
                "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records WHERE {EXPIRED} LIMIT ?2)"
            ))
            .and_then(|mut s| s.execute(params![now, limit as i64]))
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT scope, status, COUNT(*) FROM records GROUP BY scope, status ORDER BY scope, status",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (scope, status, count) = row.map_err(unavailable)?;
                let status = Status::parse(&status).ok_or_else(|| Error::Corrupt(format!("bad status {status:?}")))?;
                out.push(StatRow { scope, status, count: count as u64 });
            }
            Ok(out)
        })
        .await
    }
}

fn list(conn: &Connection, query: &ListQuery) -> Result<Page, Error> {
    let mut clauses: Vec<&str> = Vec::new();
    let mut args: Vec<SqlValue> = Vec::new();
    let mut filter = |clause: &'static str, value: Option<SqlValue>| {
        if let Some(v) = value {
            clauses.push(clause);
            args.push(v);
        }
    };
    filter("scope = ?", query.scope.clone().map(SqlValue::Text));
    filter("tenant = ?", query.tenant.clone().map(SqlValue::Text));
    filter("status = ?", query.status.map(|s| SqlValue::Text(s.as_str().into())));
    if let Some(prefix) = &query.key_prefix {
        clauses.push("substr(key, 1, ?) = ?");
        args.push(SqlValue::Integer(prefix.len() as i64));
        args.push(SqlValue::Text(prefix.clone()));
    }
    if let Some(cursor) = &query.cursor {
        clauses.push("(created_at, scope, tenant, key) < (?, ?, ?, ?)");
        args.push(SqlValue::Integer(cursor.created_at));
        args.push(SqlValue::Text(cursor.id.scope.clone()));
        args.push(SqlValue::Text(cursor.id.tenant.clone()));
        args.push(SqlValue::Text(cursor.id.key.clone()));
    }
    let limit = query.limit.clamp(1, MAX_PAGE);
    let where_sql = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
    let sql = format!(
        "SELECT {COLUMNS} FROM records {where_sql} ORDER BY created_at DESC, scope DESC, tenant DESC, key DESC LIMIT {}",
        limit + 1
    );
    let mut stmt = conn.prepare(&sql).map_err(unavailable)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), read_row).map_err(unavailable)?;
    let mut records = Vec::new();
    for row in rows {
        records.push(row.map_err(unavailable)??);
    }
    Ok(page(records, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on a file of its own.
    async fn scratch() -> SqliteStore {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        // The directory must outlive the store; tests are short, so leak it.
        std::mem::forget(dir);
        SqliteStore::open(Options { path, synchronous: Synchronous::Normal }).await.unwrap()
    }

    crate::conformance_tests!(scratch().await);
    crate::rule_tests!(scratch().await);

    #[async_trait]
    impl crate::store::conformance::Seed for SqliteStore {
        async fn seed(&self, record: &Record) {
            let record = record.clone();
            self.write(move |conn| save(conn, &record)).await.unwrap();
        }
    }

    #[test]
    fn url_options() {
        let o = Options::from_url_rest("./idem.db").unwrap();
        assert_eq!((o.path.to_str().unwrap(), o.synchronous), ("./idem.db", Synchronous::Full));
        let o = Options::from_url_rest("/var/lib/idem.db?synchronous=normal").unwrap();
        assert_eq!(o.synchronous, Synchronous::Normal);
        assert!(Options::from_url_rest("").is_err());
        assert!(Options::from_url_rest("x.db?fast=yes").unwrap_err().contains("fast=yes"));
    }

    #[tokio::test]
    async fn newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99;").unwrap();
        let err = SqliteStore::open(Options { path: path.clone(), synchronous: Synchronous::Full }).await.err();
        assert!(matches!(err, Some(Error::TooNew { found: 99, supported: SCHEMA_VERSION })), "{err:?}");
        let version: i64 = Connection::open(&path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 99);
    }
}
