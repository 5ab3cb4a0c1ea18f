//! Where records live: one small object-safe trait, chosen once at start-up from a URL.
//!
//! Every backend's `claim` is [`crate::core::plan_claim`] run inside its own atomic
//! section, so two concurrent identical intents never both execute, whatever the store.
//! The fencing and expiry rules are the core's too (`Record::is_owned_by`,
//! `Record::is_expired`); where a backend must restate one in SQL or Lua, the twin is
//! checked against the core case by case ([`conformance`]'s `rule_tests!`). Every backend
//! passes [`conformance`].

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::core::{
    ClaimPolicy, Decision, Intent, LeaseToken, Millis, NotResolvable, Outcome, Plan, Record, RecordId, Resolution,
    Status,
};

pub mod clock;
pub mod conformance;
pub mod encrypted;
pub mod faulty;
pub mod memory;
pub mod owner;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod touch;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store cannot be reached or refused the operation; the caller fails closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's TLS handshake failed: its certificate is not trusted or does not name
    /// the host, or it does not speak TLS where the URL demands it. Not an outage: no
    /// retry fixes it, so start-up stops and says why.
    #[error("store refused over TLS: {0}")]
    Tls(String),
    /// A stored row could not be read back.
    #[error("store holds an unreadable record: {0}")]
    Corrupt(String),
    /// The store URL is malformed or names an unsupported backend.
    #[error("invalid store URL {:?}: {reason}", redact(url))]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was written by a newer idem and is left untouched.
    #[error("the store's schema version {found} is newer than this idem understands ({supported}); upgrade idem")]
    TooNew {
        /// The version found.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// An encryption key in the environment is malformed.
    #[error("invalid encryption key: {0}")]
    BadKey(String),
    /// No record with that id.
    #[error("no such record")]
    NotFound,
    /// The record is in a state the operation does not apply to.
    #[error(transparent)]
    NotResolvable(#[from] NotResolvable),
}

impl Error {
    /// True when trying again later may succeed (an outage, not bad input).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// True when what the user wrote is wrong: the store URL or the encryption key. (A
    /// store written by a newer idem is not: the input is fine, this binary is too old.)
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadUrl { .. } | Error::BadKey(_))
    }
}

/// The result of a claim: the decision and the record it was made on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// What the caller must do.
    pub decision: Decision,
    /// After `Execute`, the claimed record; otherwise the record the decision was made on.
    pub record: Option<Record>,
    /// The caller's lease token, present exactly when the decision executes.
    pub token: Option<LeaseToken>,
}

impl Claim {
    /// The answer to a claim once the backend persisted `plan` (made by
    /// [`crate::core::plan_claim`] on `existing`).
    pub fn planned(plan: Plan, existing: Option<Record>) -> Self {
        let (decision, token) = (plan.decision, plan.token);
        Self { decision, record: plan.into_record(existing), token }
    }
}

/// A page of records, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// The records.
    pub records: Vec<Record>,
    /// Pass this back to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Which records to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this scope.
    pub scope: Option<String>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only keys starting with this.
    pub key_prefix: Option<String>,
    /// At most this many (the store caps it at [`MAX_PAGE`]).
    pub limit: usize,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
}

/// The largest page a store returns.
pub const MAX_PAGE: usize = 1000;

/// The position after the last record of a page: records sort by `created_at`
/// descending, then by id descending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// `created_at` of the last record returned.
    pub created_at: Millis,
    /// Id of the last record returned.
    pub id: RecordId,
}

impl Cursor {
    /// The cursor after `record`.
    pub fn after(record: &Record) -> Self {
        Self { created_at: record.created_at, id: record.id.clone() }
    }

    /// An opaque URL-safe token.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// Reads a token made by [`Cursor::encode`].
    pub fn decode(token: &str) -> Option<Self> {
        use base64::Engine;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// True when `record` sorts after this cursor (belongs to a later page).
    pub fn precedes(&self, record: &Record) -> bool {
        (record.created_at, &record.id) < (self.created_at, &self.id)
    }
}

/// Record counts for one scope and status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRow {
    /// The scope.
    pub scope: String,
    /// The status.
    pub status: Status,
    /// How many records.
    pub count: u64,
}

/// The storage contract. Object-safe, chosen once from the store URL into `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Decides an intent (SPEC §2) and persists what the decision changes, atomically:
    /// [`crate::core::plan_claim`] on the stored record, its transition persisted in one
    /// atomic section. A claim is durable before this returns `Execute`.
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error>;

    /// [`Store::claim`] for an intent that is most likely new — a runner's record its
    /// triage found unsent, a consumer's next message: the same decision and durability,
    /// but a store may go straight to its write path instead of reading first (the read
    /// that answers a replay without a write). The default is `claim`.
    async fn claim_new(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        self.claim(intent, policy).await
    }

    /// Extends a lease, as [`Record::renew`] does. `false` when `token` no longer owns the
    /// record ([`Record::is_owned_by`]: fencing).
    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error>;

    /// Ends a lease with its outcome, as [`Record::finish`] does. `false` when `token` no
    /// longer owns the record: a stale owner can never complete.
    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error>;

    /// One record.
    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error>;

    /// Several records, in the order of `ids` (a runner checking a batch of records against
    /// its ledger). A backend with a cheaper way than one `get` after another overrides it.
    async fn get_many(&self, ids: &[RecordId]) -> Result<Vec<Option<Record>>, Error> {
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            records.push(self.get(id).await?);
        }
        Ok(records)
    }

    /// Records, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Page, Error>;

    /// Forgets a record: the next intent with its key executes. `false` when absent.
    async fn delete(&self, id: &RecordId) -> Result<bool, Error>;

    /// Settles an `outcome_unknown` (or `needs_review`) record.
    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error>;

    /// Removes up to `limit` records that [`Record::is_expired`] calls expired at `now`, and
    /// nothing else; returns how many.
    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error>;

    /// Counts by scope and status.
    async fn stats(&self) -> Result<Vec<StatRow>, Error>;
}

/// Opens the store a URL names, sealing stored answers when `IDEM_ENCRYPTION_KEY` is set
/// (see [`encrypted`]). Every entry point (gateway, runner, `idem log`) opens stores here,
/// so they all read and write sealed answers alike.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    let keys = encrypted::Keys::from_env(|name| std::env::var(name).ok())?;
    let store = open_plain(url).await?;
    Ok(match keys {
        Some(keys) => Arc::new(encrypted::EncryptedStore::new(store, Arc::new(keys))),
        None => store,
    })
}

/// Opens the store a URL names: `sqlite://PATH`, `postgres://…`, `redis://…`, `memory://`.
pub async fn open_plain(url: &str) -> Result<Arc<dyn Store>, Error> {
    let bad = |reason: &str| Error::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected SCHEME://…, e.g. sqlite://./idem.db"))?;
    match scheme {
        "memory" => Ok(Arc::new(memory::MemoryStore::default())),
        "sqlite" => {
            let options = sqlite::Options::from_url_rest(rest).map_err(|reason| bad(&reason))?;
            Ok(Arc::new(sqlite::SqliteStore::open(options).await?))
        }
        "postgres" | "postgresql" => postgres::open(url).await,
        "redis" | "rediss" => redis::open(url).await,
        _ => Err(bad("unknown scheme; use sqlite://PATH, postgres://…, redis://… or memory://")),
    }
}

/// A URL fit for logs and messages: a password in the user-info part or in a
/// `password=` query parameter is replaced by `***`. Works on URLs too broken to parse,
/// since those are exactly the ones that end up in error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => match authority[..at].split_once(':') {
            Some((user, _password)) => format!("{user}:***{}", &authority[at..]),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// True for stores on another machine, worth waiting for when they are down at start-up;
/// a local file that cannot be opened is a mistake to report at once.
pub fn is_networked(url: &str) -> bool {
    ["postgres://", "postgresql://", "redis://", "rediss://"].iter().any(|scheme| url.starts_with(scheme))
}

/// A fresh lease token. Random, so tokens never repeat across processes or restarts.
pub fn new_token() -> LeaseToken {
    // Kept below 2^63 so every backend can store it as a signed 64-bit integer.
    rand::random::<u64>() >> 1
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    crate::core::units::millis(since)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u:pw@h:99999/d?x=1"), "postgres://u:***@h:99999/d?x=1");
        assert_eq!(redact("postgres://u:p@ss@h/d"), "postgres://u:***@h/d");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact("postgres://h/d?user=a@b"), "postgres://h/d?user=a@b");
        assert_eq!(
            redact("postgres://h/db?password=pw&sslmode=disable"),
            "postgres://h/db?password=***&sslmode=disable"
        );
        assert_eq!(redact("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        // Hidden however the parameter name is spelt (the runner once matched it case-sensitively).
        assert_eq!(redact("postgres://h/db?PassWord=pw"), "postgres://h/db?PassWord=***");
        assert_eq!(redact("sqlite://./idem.db"), "sqlite://./idem.db");
        assert_eq!(redact("not a url"), "not a url");
    }
}
