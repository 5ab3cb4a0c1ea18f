//! The record model shared by every path (SPEC §1).

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::fingerprint::Fingerprint;

/// Milliseconds since the Unix epoch. Every time in a record uses this unit.
pub type Millis = i64;

/// The owner token of a lease. A store accepts `renew` and `finish` only from the holder
/// of the current token, so an owner whose lease was taken over can never complete.
pub type LeaseToken = u64;

/// Where a record lives: scope, tenant and key together are its identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordId {
    /// The operation: a gateway route, `flow:step`, or `consumer:subscriber`.
    pub scope: String,
    /// Who acted. Records of two tenants never meet.
    pub tenant: String,
    /// The idempotency key, business key or message id.
    pub key: String,
}

impl RecordId {
    /// Builds an id from its three parts.
    pub fn new(scope: impl Into<String>, tenant: impl Into<String>, key: impl Into<String>) -> Self {
        Self { scope: scope.into(), tenant: tenant.into(), key: key.into() }
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tenant = if self.tenant.is_empty() { "-" } else { &self.tenant };
        write!(f, "{}/{}/{}", self.scope, tenant, self.key)
    }
}

/// The life-cycle state of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Claimed: an owner holds the lease and is executing the action.
    InProgress,
    /// Executed with a final answer, which is replayed.
    Completed,
    /// Executed without a final answer; the next attempt executes again.
    FailedRetryable,
    /// The action may or may not have happened; nothing executes until it is resolved.
    OutcomeUnknown,
    /// A failure a person must look at (runner and consumer).
    NeedsReview,
}

impl Status {
    /// Every status, in the order tables and metrics list them.
    pub const ALL: [Status; 5] =
        [Status::InProgress, Status::Completed, Status::FailedRetryable, Status::OutcomeUnknown, Status::NeedsReview];

    /// The stable snake_case name used in the store, the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::FailedRetryable => "failed_retryable",
            Status::OutcomeUnknown => "outcome_unknown",
            Status::NeedsReview => "needs_review",
        }
    }

    /// Parses the stable name back.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lease on an `in_progress` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The owner's fencing token.
    pub token: LeaseToken,
    /// The owner is presumed dead after this instant.
    pub locked_until: Millis,
}

/// A stored answer. Header values keep their bytes: each byte maps to one `char`
/// (ISO-8859-1), so values that are not UTF-8 survive a round trip unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status code (or a step's status).
    pub status: u16,
    /// End-to-end headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body; empty when not retained.
    pub body: Bytes,
    /// False when the answer was too large to keep: the record replays as `410`.
    pub retained: bool,
}

/// One protected intent and everything the store remembers of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Identity.
    pub id: RecordId,
    /// SHA-256 of the canonical request.
    pub fingerprint: Fingerprint,
    /// Life-cycle state.
    pub status: Status,
    /// Present while `in_progress`; cleared when the record leaves that state.
    pub lease: Option<Lease>,
    /// The final answer of a `completed` record.
    pub response: Option<StoredResponse>,
    /// When the record was first claimed (re-set when an expired record is claimed anew).
    pub created_at: Millis,
    /// When a request last touched it.
    pub last_seen_at: Millis,
    /// When it is forgotten.
    pub expires_at: Millis,
    /// How many times the stored answer was replayed.
    pub replay_count: u64,
    /// How many times the action was executed.
    pub attempt_count: u64,
    /// The request id of the attempt that created the current state, for tracing.
    pub correlation_id: Option<String>,
    /// Why the last attempt did not complete.
    pub error_summary: Option<String>,
}

/// The rules every store applies to a stored record, stated once. Backends whose
/// operation must run as SQL or Lua restate one of them (each restatement names the rule it
/// mirrors), and `store::conformance::rule_tests!` checks every such twin against these
/// functions, record shape by record shape.
impl Record {
    /// The instant after which the record no longer counts: its expiry, or the end of a
    /// live lease when that is later (an action that outlives its TTL must not be claimed
    /// twice). Redis indexes and expires records by this instant.
    pub fn deadline(&self) -> Millis {
        match (self.status, self.lease) {
            (Status::InProgress, Some(lease)) => self.expires_at.max(lease.locked_until),
            _ => self.expires_at,
        }
    }

    /// True when the record no longer counts: its [`deadline`](Self::deadline) has passed.
    /// A claim treats an expired record as absent (SPEC §2, "nothing, or an expired
    /// record"), so `purge_expired` deletes exactly the records this says are expired, and
    /// nothing else. An `in_progress` record without a lease has no owner that could ever
    /// finish it, so it expires like any other.
    pub fn is_expired(&self, now: Millis) -> bool {
        self.deadline() <= now
    }

    /// True when an owner holds a lease that has not run out (`locked_until` is the first
    /// instant the owner is presumed dead).
    pub fn lease_alive(&self, now: Millis) -> bool {
        self.status == Status::InProgress && self.lease.is_some_and(|l| l.locked_until > now)
    }

    /// True when `token` is the current lease token: the fencing rule of `renew` and
    /// `finish`. It holds whether or not the lease has run out, as long as nobody took the
    /// record over (a claim that finds the lease dead clears it), so a slow owner that
    /// comes back in time still records its outcome.
    pub fn is_owned_by(&self, token: LeaseToken) -> bool {
        self.status == Status::InProgress && self.lease.is_some_and(|l| l.token == token)
    }

    /// Extends the lease `token` holds to `locked_until`: the pure half of `Store::renew`.
    /// `false`, changing nothing, when `token` does not own the record.
    pub fn renew(&mut self, token: LeaseToken, locked_until: Millis) -> bool {
        if !self.is_owned_by(token) {
            return false;
        }
        self.lease = self.lease.map(|lease| Lease { locked_until, ..lease });
        true
    }

    /// Ends the lease `token` holds with `outcome`: the pure half of `Store::finish`.
    /// `false`, changing nothing, when `token` does not own the record (a stale owner can
    /// never complete).
    pub fn finish(&mut self, token: LeaseToken, outcome: Outcome, now: Millis) -> bool {
        if !self.is_owned_by(token) {
            return false;
        }
        outcome.apply(self, now);
        true
    }
}

/// What a caller wants to do, as the decision table sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// Where the record lives.
    pub id: RecordId,
    /// SHA-256 of the canonical request.
    pub fingerprint: Fingerprint,
    /// The caller's clock.
    pub now: Millis,
    /// How long a completed record is remembered.
    pub ttl_ms: Millis,
    /// How long a claim holds before its owner is presumed dead.
    pub lease_ms: Millis,
    /// The caller's request id, stored for tracing.
    pub correlation_id: Option<String>,
}

/// How an owner ends its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A final answer: replayed from now on.
    Completed(StoredResponse),
    /// Not executed, or not final: the next attempt executes.
    Retryable {
        /// What went wrong, without bodies or credentials.
        error: String,
    },
    /// The action's outcome was unknown and a lookup found it at the destination: the
    /// answer the lookup gave is replayed from now on, and `note` (an `error_summary`
    /// saying when and how it was settled) tells an audit it was verified, not executed.
    Verified {
        /// The looked-up answer (it carries `Idempotent-Verified: true`).
        response: StoredResponse,
        /// What the record says of how it was settled.
        note: String,
    },
    /// Sent but never answered: nothing executes until someone resolves it.
    Unknown {
        /// What went wrong, without bodies or credentials.
        error: String,
    },
    /// A failure a person must look at.
    NeedsReview {
        /// What went wrong, without bodies or credentials.
        error: String,
    },
}

impl Outcome {
    /// The status a record takes on this outcome.
    pub fn status(&self) -> Status {
        match self {
            Outcome::Completed(_) | Outcome::Verified { .. } => Status::Completed,
            Outcome::Retryable { .. } => Status::FailedRetryable,
            Outcome::Unknown { .. } => Status::OutcomeUnknown,
            Outcome::NeedsReview { .. } => Status::NeedsReview,
        }
    }

    /// True when this outcome replaces the record's stored answer. A failed attempt keeps
    /// the previous answer: only a re-send of a changed payload has one, and it holds what
    /// the destination already knows (captured external ids) until a new answer replaces it.
    pub fn replaces_response(&self) -> bool {
        matches!(self, Outcome::Completed(_) | Outcome::Verified { .. })
    }

    /// The answer this outcome stores, if any.
    pub fn response_mut(&mut self) -> Option<&mut StoredResponse> {
        match self {
            Outcome::Completed(response) | Outcome::Verified { response, .. } => Some(response),
            _ => None,
        }
    }

    /// What the outcome writes, as a record: `apply` on a blank in-progress record. Stores
    /// that update only the fields `finish` changes read their values from here, so the
    /// rule stays in `apply`.
    pub fn applied_to_blank(self, id: RecordId, now: Millis) -> Record {
        let mut blank = Record {
            id,
            fingerprint: Fingerprint([0; 32]),
            status: Status::InProgress,
            lease: None,
            response: None,
            created_at: now,
            last_seen_at: now,
            expires_at: now,
            replay_count: 0,
            attempt_count: 0,
            correlation_id: None,
            error_summary: None,
        };
        self.apply(&mut blank, now);
        blank
    }

    /// Applies the outcome to a record the caller owns: the pure half of `Store::finish`.
    pub fn apply(self, record: &mut Record, now: Millis) {
        record.status = self.status();
        record.lease = None;
        record.last_seen_at = now;
        match self {
            Outcome::Completed(response) => {
                record.response = Some(response);
                record.error_summary = None;
            }
            Outcome::Verified { response, note } => {
                record.response = Some(response);
                record.error_summary = Some(note);
            }
            Outcome::Retryable { error } | Outcome::Unknown { error } | Outcome::NeedsReview { error } => {
                record.error_summary = Some(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: Millis = 1_000_000;

    fn record(status: Status, expires_in: Millis, lease_in: Option<Millis>) -> Record {
        let blank = Outcome::Retryable { error: String::new() }.applied_to_blank(RecordId::new("s", "t", "k"), NOW);
        let lease = lease_in.map(|d| Lease { token: 7, locked_until: NOW + d });
        Record { status, lease, expires_at: NOW + expires_in, ..blank }
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        prop::sample::select(Status::ALL.to_vec())
    }

    proptest! {
        /// SPEC §2's "expired record": past its expiry, and no owner holds a live lease.
        #[test]
        fn expired_means_past_expiry_without_a_live_lease(
            status in arb_status(), expires_in in -3i64..3, lease_in in prop::option::of(-3i64..3),
        ) {
            let r = record(status, expires_in, lease_in);
            prop_assert_eq!(r.is_expired(NOW), r.expires_at <= NOW && !r.lease_alive(NOW));
        }

        /// Only the current token of an `in_progress` record renews or finishes it, and a
        /// refused one changes nothing.
        #[test]
        fn only_the_owner_renews_or_finishes(
            status in arb_status(), lease_in in prop::option::of(-3i64..3), token in 6u64..9,
        ) {
            let r = record(status, 100, lease_in);
            let owned = status == Status::InProgress && lease_in.is_some() && token == 7;
            prop_assert_eq!(r.is_owned_by(token), owned);
            let mut renewed = r.clone();
            prop_assert_eq!(renewed.renew(token, NOW + 50), owned);
            let expected = if owned { Some(Lease { token: 7, locked_until: NOW + 50 }) } else { r.lease };
            prop_assert_eq!(renewed.lease, expected);
            let mut finished = r.clone();
            prop_assert_eq!(finished.finish(token, Outcome::Retryable { error: "e".into() }, NOW), owned);
            prop_assert_eq!(finished.status, if owned { Status::FailedRetryable } else { status });
        }
    }

    #[test]
    fn an_in_progress_record_without_a_lease_expires() {
        assert!(record(Status::InProgress, 0, None).is_expired(NOW));
        assert!(!record(Status::InProgress, 1, None).is_expired(NOW));
    }

    #[test]
    fn a_live_lease_outlives_the_expiry() {
        let held = record(Status::InProgress, -5, Some(5));
        assert_eq!(held.deadline(), NOW + 5);
        assert!(!held.is_expired(NOW));
        assert!(held.is_expired(NOW + 5), "the lease runs out at locked_until");
        // A lease on a record that left in_progress holds nothing.
        assert_eq!(record(Status::Completed, -5, Some(5)).deadline(), NOW - 5);
    }
}
