//! `[deliver] postgres = { url, statement, params }` (SPEC §6): each message runs one SQL
//! statement, and the statement and the message's record commit in one PostgreSQL
//! transaction ([`crate::store::postgres::transaction`]), so a crash anywhere leaves both
//! or neither and no outcome is ever unknown on this path.
//!
//! The statement's parameters are JSON pointers into the message, bound by the type the
//! server infers for each (`bool`, `int2`/`int4`/`int8`, `float4`/`float8`, text types,
//! `json`/`jsonb`); any other type is refused at start-up with the cast to write instead
//! (`$2::text::numeric`). The record's fingerprint is the SHA-256 of the bound values, so a
//! redelivery replays and another message under the same id is `needs_review`.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::{Disposition, Label, fields_pointer};
use crate::config::{Problems, check};
use crate::core::units::millis;
use crate::core::{
    ClaimPolicy, Decision, Fingerprint, Intent, OnChange, OnUnknown, Outcome, RecordId, Replays, StoredResponse,
};
use crate::host::Error;
use crate::store::clock::Clock;
use crate::store::postgres::transaction::{Transactional, TxClaim};
use crate::store::{Store, owner};

/// `deliver.postgres` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// The database; the store's (and it must be the store's).
    pub url: Option<String>,
    /// One SQL statement with `$1…$n` placeholders.
    pub statement: Option<String>,
    /// A JSON pointer into the message per placeholder, in order.
    pub params: Option<Vec<String>>,
}

/// `deliver.postgres`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The statement.
    pub statement: String,
    /// The pointers of its parameters.
    pub params: Vec<String>,
}

impl RawPostgres {
    /// The target; `store` is the consumer's store URL, which the statement must share.
    pub fn validate(self, store: &str, p: &mut Problems) -> Option<Target> {
        let at = "deliver.postgres";
        if !(store.starts_with("postgres://") || store.starts_with("postgresql://")) {
            p.push(
                "store",
                "must be the PostgreSQL database deliver.postgres writes to: the statement and the record commit in one transaction",
            );
        }
        if let Some(url) = &self.url {
            if !same_database(url, store) {
                p.push(
                    &format!("{at}.url"),
                    "must name the store's database (same host, port, database and user): leave it out to use the store's",
                );
            }
        }
        let statement = p.required(&format!("{at}.statement"), self.statement, "statement = \"INSERT INTO …\"");
        let params = self.params.unwrap_or_default();
        let params = p.check(&format!("{at}.params"), check::pointers(params));
        Some(Target { statement: statement.filter(|s| !s.trim().is_empty())?, params: params? })
    }
}

/// Whether two PostgreSQL URLs name the same database as the same user (idem's own
/// parameters such as `schema` may differ).
fn same_database(a: &str, b: &str) -> bool {
    let named = |url: &str| {
        crate::store::postgres::connection(url).ok().map(|(config, _)| {
            (
                format!("{:?}", config.get_hosts()),
                config.get_ports().to_vec(),
                config.get_dbname().map(str::to_owned),
                config.get_user().map(str::to_owned),
            )
        })
    };
    matches!((named(a), named(b)), (Some(x), Some(y)) if x == y)
}

/// Delivers messages into the database.
pub struct Sink {
    transactional: Transactional,
    store: std::sync::Arc<dyn Store>,
    target: Target,
    /// The server's type of each parameter, read when the statement was prepared.
    types: Vec<Type>,
    scope: String,
    retention: Duration,
    lease: Duration,
    max_attempts: u32,
}

/// What a sink needs besides its target.
pub struct Settings {
    /// The records' scope (`consumer:SUBSCRIBER`).
    pub scope: String,
    /// How long a message id is remembered.
    pub retention: Duration,
    /// How long the transaction may sit idle.
    pub lease: Duration,
    /// Deliveries before a failing statement makes the message `needs_review`.
    pub max_attempts: u32,
}

impl Sink {
    /// Prepares the statement once, so a wrong statement or an unbindable parameter type
    /// stops start-up (bad input) instead of failing every message.
    pub async fn prepare(
        transactional: Transactional,
        store: std::sync::Arc<dyn Store>,
        target: Target,
        settings: Settings,
    ) -> Result<Self, Error> {
        let types = transactional.parameter_types(&target.statement).await.map_err(|e| {
            Error::BadInput(anyhow::Error::new(e).context("deliver.postgres.statement cannot be prepared"))
        })?;
        if types.len() != target.params.len() {
            return Err(Error::BadInput(anyhow::anyhow!(
                "deliver.postgres.params: the statement has {} parameters but {} pointers are given",
                types.len(),
                target.params.len()
            )));
        }
        for (i, ty) in types.iter().enumerate() {
            if !bindable(ty) {
                let n = i + 1;
                return Err(Error::BadInput(anyhow::anyhow!(
                    "deliver.postgres.statement: parameter ${n} is of type {ty}, which idem does not bind from JSON; \
                     cast it in the statement, e.g. ${n}::text::{ty}"
                )));
            }
        }
        let Settings { scope, retention, lease, max_attempts } = settings;
        Ok(Self { transactional, store, target, types, scope, retention, lease, max_attempts })
    }

    /// The records' scope.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Runs the statement for one message, in one transaction with its record.
    pub async fn deliver(&self, id: &str, fields: &Map<String, Value>, deliveries: u64) -> (Label, Disposition) {
        let values: Vec<Value> =
            self.target.params.iter().map(|p| fields_pointer(fields, p).cloned().unwrap_or(Value::Null)).collect();
        let fingerprint = Fingerprint::of(serde_jcs::to_vec(&values).unwrap_or_default());
        let intent = Intent {
            id: RecordId::new(self.scope.clone(), "", id),
            fingerprint,
            now: Clock::System.now(),
            ttl_ms: millis(self.retention),
            lease_ms: millis(self.lease),
            correlation_id: None,
        };
        let params: Result<Vec<Param>, String> =
            values.iter().zip(&self.types).enumerate().map(|(i, (v, t))| param(v, t, i)).collect();
        let params = match params {
            Ok(params) => params,
            Err(why) => return self.review(&intent, &why).await,
        };
        let policy = ClaimPolicy {
            on_unknown: OnUnknown::Review,
            on_change: OnChange::Reject,
            replays: Replays::Count,
            lookup: crate::core::Lookup::None,
        };
        let open = match self.transactional.claim(&intent, policy, Duration::ZERO, self.lease).await {
            Ok(TxClaim::Open(open)) => open,
            Ok(TxClaim::Busy) => return (Label::InFlight, Disposition::Retry(super::busy_delay())),
            Ok(TxClaim::Decided(claim)) => return decided(claim.decision),
            Err(error) => return unavailable(&error),
        };
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p: &Param| p as &(dyn ToSql + Sync)).collect();
        let tx = open.tx();
        let executed = match tx.prepare_cached(&self.target.statement).await {
            Ok(statement) => tx.execute(&statement, &refs).await,
            Err(error) => Err(error),
        };
        match executed {
            Ok(rows) => {
                let body = serde_json::json!({ "rows": rows }).to_string();
                let answer = StoredResponse {
                    status: 200,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: body.into(),
                    retained: true,
                };
                match open.commit(Outcome::Completed(answer), Clock::System.now()).await {
                    Ok(()) => (Label::Delivered, Disposition::Ack),
                    // Nothing, or everything, was committed: the redelivery finds out which.
                    Err(error) => unavailable(&error),
                }
            }
            Err(error) => {
                open.rollback().await;
                let why = statement_error(&error);
                if deliveries >= u64::from(self.max_attempts) {
                    return self.review(&intent, &format!("gave up after {deliveries} attempts: {why}")).await;
                }
                tracing::warn!(scope = %self.scope, error = %why, "the statement failed; rolled back, the message will be redelivered");
                let after = crate::runner::call::backoff(u32::try_from(deliveries).unwrap_or(u32::MAX), None);
                (Label::Retry, Disposition::Retry(after.max(Duration::from_millis(100))))
            }
        }
    }

    /// A message that will never go in: a `needs_review` record and a rejection.
    async fn review(&self, intent: &Intent, why: &str) -> (Label, Disposition) {
        tracing::warn!(scope = %self.scope, message = %crate::core::key::hash_for_logs(&intent.id.key), why, "a message needs review");
        match self.store.claim(intent, ClaimPolicy::default()).await {
            Ok(claim) => match (claim.decision, claim.token) {
                (Decision::Execute(_), Some(token)) => {
                    let outcome = Outcome::NeedsReview { error: why.to_owned() };
                    owner::finish(self.store.as_ref(), &intent.id, token, outcome, Clock::System, |_| {}).await;
                    (Label::NeedsReview, Disposition::Reject)
                }
                (decision, _) => decided(decision),
            },
            Err(error) => unavailable(&error),
        }
    }
}

/// The answer to a message whose record already decided.
fn decided(decision: Decision) -> (Label, Disposition) {
    match decision {
        Decision::Replay | Decision::NotRetained => (Label::Duplicate, Disposition::Ack),
        Decision::InFlight | Decision::Execute(_) => (Label::InFlight, Disposition::Retry(super::busy_delay())),
        // No lookup is configured on this path (its outcome is never unknown), so `Verify`
        // cannot arise; were it to, the message waits for a person like any unknown one.
        Decision::KeyReused | Decision::NeedsReview | Decision::OutcomeUnknown | Decision::Verify => {
            (Label::NeedsReview, Disposition::Reject)
        }
    }
}

fn unavailable(error: &dyn std::fmt::Display) -> (Label, Disposition) {
    tracing::warn!(%error, "store unavailable; the message will be redelivered");
    (Label::StoreUnavailable, Disposition::Retry(Duration::from_secs(1)))
}

/// A server error without its DETAIL, which can quote the message's values.
fn statement_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => error.to_string(),
    }
}

fn bindable(ty: &Type) -> bool {
    [
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::JSON,
        Type::JSONB,
    ]
    .contains(ty)
}

/// A JSON value bound as the parameter type the server expects.
#[derive(Debug)]
enum Param {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Text(String),
    Json(Value),
}

fn param(value: &Value, ty: &Type, index: usize) -> Result<Param, String> {
    let n = index + 1;
    let wrong = || format!("parameter ${n} ({ty}) cannot take the message's {}", kind(value));
    let integer = || match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let float = || match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    if value.is_null() {
        return Ok(Param::Null);
    }
    Ok(match *ty {
        Type::BOOL => Param::Bool(value.as_bool().ok_or_else(wrong)?),
        Type::INT2 => Param::Int2(integer().and_then(|i| i.try_into().ok()).ok_or_else(wrong)?),
        Type::INT4 => Param::Int4(integer().and_then(|i| i.try_into().ok()).ok_or_else(wrong)?),
        Type::INT8 => Param::Int8(integer().ok_or_else(wrong)?),
        Type::FLOAT4 => Param::Float4(float().ok_or_else(wrong)? as f32),
        Type::FLOAT8 => Param::Float8(float().ok_or_else(wrong)?),
        Type::JSON | Type::JSONB => Param::Json(value.clone()),
        _ => Param::Text(match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl ToSql for Param {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Param::Null => Ok(IsNull::Yes),
            Param::Bool(v) => v.to_sql(ty, out),
            Param::Int2(v) => v.to_sql(ty, out),
            Param::Int4(v) => v.to_sql(ty, out),
            Param::Int8(v) => v.to_sql(ty, out),
            Param::Float4(v) => v.to_sql(ty, out),
            Param::Float8(v) => v.to_sql(ty, out),
            Param::Text(v) => v.to_sql(ty, out),
            Param::Json(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Each value was converted for its parameter's type when it was made.
        true
    }

    to_sql_checked!();
}
