//! The decision table of SPEC §2, once, for every path and every store.
//!
//! A store calls [`plan_claim`] inside its own atomic section (a mutex, a single writer
//! thread, a compare-and-swap) and persists the [`Plan`]'s transition, so the table is
//! enforced the same way whatever the backend. Read-only paths (a dry run, a ledger check,
//! a consumer's duplicate check) ask [`decide`] alone: it is the same table.

use serde::{Deserialize, Serialize};

use super::record::{Intent, Lease, LeaseToken, Millis, Outcome, Record, Status, StoredResponse};

/// What to do when a record's outcome is unknown (its owner died, or the upstream never
/// answered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    /// Execute nothing until an operator resolves the record.
    #[default]
    Review,
    /// Execute again: only for actions the destination deduplicates itself.
    Retry,
}

/// Whether the destination can be asked what became of an unknown outcome (a `verify`
/// lookup is configured for the scope, SPEC §4 "Settling unknown outcomes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Lookup {
    /// No lookup: an unknown outcome follows `on_unknown`.
    #[default]
    None,
    /// A lookup is configured: an unknown outcome is settled by asking the destination
    /// first ([`Decision::Verify`]), whatever `on_unknown` says.
    Configured,
}

/// What a completed record does when the same key comes with another payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnChange {
    /// Refuse it (`422`): a key names one request, forever (the gateway).
    #[default]
    Reject,
    /// Execute the changed payload under the same key, keeping the previous answer on the
    /// claimed record until the new one replaces it (the runner's `resend_on_change`, where
    /// the key is a business key and the previous answer holds the external ids).
    Resend,
    /// A changed payload takes the key over from whatever the previous one left (completed,
    /// failed, unknown), unless a live lease holds it; the previous answer stays on the
    /// claimed record. The consumer's ordering guard: the key is an object, each payload one
    /// of its versions, and the record a lock around applying it.
    Supersede,
}

/// Whether a replay is counted on the record (`replay_count`, `last_seen_at`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replays {
    /// Counted (lazily, see [`Transition::Touch`]): the gateway's replays are visible.
    #[default]
    Count,
    /// Not counted: a runner re-reading its ledger (a re-run skipping a million steps
    /// already sent) writes nothing.
    Ignore,
}

/// The per-scope settings the decision depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimPolicy {
    /// What an unknown outcome turns into.
    pub on_unknown: OnUnknown,
    /// What a changed payload under a completed key does.
    pub on_change: OnChange,
    /// Whether replays are counted on the record.
    pub replays: Replays,
    /// Whether an unknown outcome is settled by a lookup.
    pub lookup: Lookup,
}

/// Why an intent is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExecuteReason {
    /// No record for this key.
    New,
    /// The record had expired: the key is new again.
    Expired,
    /// The last attempt failed retryably: a *retry recovery*.
    RetryRecovery,
    /// The outcome was unknown and the policy says re-execute.
    UnknownRetry,
    /// A completed key came with a changed payload and the policy says send it again.
    Changed,
}

/// The decision for one intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The caller now owns a lease and must execute, then `finish`.
    Execute(ExecuteReason),
    /// Completed with the same fingerprint: replay the stored answer.
    Replay,
    /// Completed, but the answer was too large to keep: `410`.
    NotRetained,
    /// The key is held by a different payload: `422`.
    KeyReused,
    /// Another owner is executing it now: `409` (or wait and look again).
    InFlight,
    /// The action may have happened; execute nothing until resolved.
    OutcomeUnknown,
    /// A failure a person must look at.
    NeedsReview,
    /// The outcome is unknown and a lookup is configured: the caller now holds the
    /// record's lease (one verifier at a time, fenced like an execution), asks the
    /// destination, and `finish`es with what it learnt: `Outcome::Verified` when found,
    /// `Outcome::Retryable` when absent (released: the next claim executes),
    /// `Outcome::Unknown` when the lookup failed. It never executes the action.
    Verify,
}

impl Decision {
    /// True when the caller holds a lease and must execute.
    pub fn executes(self) -> bool {
        matches!(self, Decision::Execute(_))
    }

    /// True when the caller holds a lease and must `finish` it: to execute, or to verify.
    pub fn holds_lease(self) -> bool {
        self.executes() || self == Decision::Verify
    }

    /// True when the intent already has its final answer: replayed, or completed with an
    /// answer too large to keep. Nothing executes, and nothing is left to do.
    pub fn answered(self) -> bool {
        matches!(self, Decision::Replay | Decision::NotRetained)
    }
}

/// Decides what an intent does, given what the store holds for its key.
pub fn decide(existing: Option<&Record>, intent: &Intent, policy: ClaimPolicy) -> Decision {
    let now = intent.now;
    let Some(record) = existing else {
        return Decision::Execute(ExecuteReason::New);
    };
    if record.is_expired(now) {
        return Decision::Execute(ExecuteReason::Expired);
    }
    if record.fingerprint != intent.fingerprint {
        return match (policy.on_change, record.status) {
            (OnChange::Resend, Status::Completed) => Decision::Execute(ExecuteReason::Changed),
            (OnChange::Supersede, Status::InProgress) if record.lease_alive(now) => Decision::InFlight,
            (OnChange::Supersede, _) => Decision::Execute(ExecuteReason::Changed),
            _ => Decision::KeyReused,
        };
    }
    match record.status {
        Status::Completed => match &record.response {
            Some(response) if response.retained => Decision::Replay,
            _ => Decision::NotRetained,
        },
        Status::InProgress if record.lease_alive(now) => Decision::InFlight,
        Status::InProgress | Status::OutcomeUnknown => match (policy.lookup, policy.on_unknown) {
            (Lookup::Configured, _) => Decision::Verify,
            (Lookup::None, OnUnknown::Review) => Decision::OutcomeUnknown,
            (Lookup::None, OnUnknown::Retry) => Decision::Execute(ExecuteReason::UnknownRetry),
        },
        Status::FailedRetryable => Decision::Execute(ExecuteReason::RetryRecovery),
        Status::NeedsReview => Decision::NeedsReview,
    }
}

/// What a claim does: the decision, the caller's lease token, and what the store must
/// persist before it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// What the caller must do.
    pub decision: Decision,
    /// The caller's lease token: present exactly when the decision holds a lease
    /// ([`Decision::holds_lease`]: execute or verify).
    pub token: Option<LeaseToken>,
    /// What the store persists.
    pub transition: Transition,
}

impl Plan {
    /// The record the claim leaves behind: the one written or touched, else `existing` as
    /// it was (what the caller is answered with).
    pub fn into_record(self, existing: Option<Record>) -> Option<Record> {
        match self.transition {
            Transition::None => existing,
            Transition::Touch(record) | Transition::Write(record) => Some(record),
        }
    }
}

/// Plans a claim: [`decide`], a fresh lease token from `new_token` when the decision
/// holds a lease (and only then), and the [`Transition`] to persist. Every store's `claim` is
/// this call plus persisting the transition atomically; none decides on its own.
pub fn plan_claim(
    existing: Option<&Record>,
    intent: &Intent,
    policy: ClaimPolicy,
    new_token: impl FnOnce() -> LeaseToken,
) -> Plan {
    let decision = decide(existing, intent, policy);
    let token = decision.holds_lease().then(new_token);
    // A decision that holds no lease hands out no token, so the placeholder is never stored.
    let transition = transition(decision, existing, intent, token.unwrap_or(0), policy);
    Plan { decision, token, transition }
}

/// What a claim would decide for the very request `existing` was stored for (a redelivered
/// message, a copy of one): read-only, so there is nothing to plan. The payload is the
/// stored one, so `on_change` plays no part; `on_unknown` only chooses between executing
/// again and waiting for review.
pub fn decide_again(existing: &Record, now: Millis, policy: ClaimPolicy) -> Decision {
    let intent = Intent {
        id: existing.id.clone(),
        fingerprint: existing.fingerprint,
        now,
        // Read by the transition only, which a read-only decision never makes.
        ttl_ms: 0,
        lease_ms: 0,
        correlation_id: None,
    };
    decide(Some(existing), &intent, policy)
}

/// What a store must persist after a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changes.
    None,
    /// Bookkeeping only (`replay_count`, `last_seen_at`): a store may write it lazily,
    /// since losing it loses no decision.
    Touch(Record),
    /// A state change that must be durable before the caller acts on the decision.
    Write(Record),
}

/// The record a decision leaves behind. `token` is the fresh lease token the store
/// generated for the caller; it is used only when the decision executes.
/// `policy` is the one the decision was made with (it says whether a replay is counted).
/// Private: stores reach it only through [`plan_claim`], so a decision and its token
/// can never be paired by hand.
fn transition(
    decision: Decision,
    existing: Option<&Record>,
    intent: &Intent,
    token: LeaseToken,
    policy: ClaimPolicy,
) -> Transition {
    let now = intent.now;
    let lease = Some(Lease { token, locked_until: now.saturating_add(intent.lease_ms) });
    match (decision, existing) {
        (Decision::Execute(ExecuteReason::New | ExecuteReason::Expired), _) | (Decision::Execute(_), None) => {
            Transition::Write(Record {
                id: intent.id.clone(),
                fingerprint: intent.fingerprint,
                status: Status::InProgress,
                lease,
                response: None,
                created_at: now,
                last_seen_at: now,
                expires_at: now.saturating_add(intent.ttl_ms),
                replay_count: 0,
                attempt_count: 1,
                correlation_id: intent.correlation_id.clone(),
                error_summary: None,
            })
        }
        (Decision::Execute(_), Some(record)) => Transition::Write(Record {
            fingerprint: intent.fingerprint,
            status: Status::InProgress,
            lease,
            // Re-executing keeps the previous answer until a new one replaces it: after a
            // changed payload (and a failed re-send of it) it holds what the destination
            // already knows (captured external ids); otherwise there is none.
            response: record.response.clone(),
            last_seen_at: now,
            expires_at: record.expires_at.max(now.saturating_add(intent.ttl_ms)),
            attempt_count: record.attempt_count + 1,
            correlation_id: intent.correlation_id.clone(),
            ..record.clone()
        }),
        // A verifier takes the lease as an owner would, but executes nothing: the attempt
        // count and what the record says of the lost attempt stay as they are.
        (Decision::Verify, Some(record)) => {
            Transition::Write(Record { status: Status::InProgress, lease, last_seen_at: now, ..record.clone() })
        }
        (Decision::Replay | Decision::NotRetained, Some(_)) if policy.replays == Replays::Ignore => Transition::None,
        (Decision::Replay | Decision::NotRetained, Some(record)) => {
            Transition::Touch(Record { replay_count: record.replay_count + 1, last_seen_at: now, ..record.clone() })
        }
        (Decision::OutcomeUnknown, Some(record)) if record.status == Status::InProgress => Transition::Write(Record {
            status: Status::OutcomeUnknown,
            lease: None,
            last_seen_at: now,
            error_summary: Some("lease expired: the owner stopped before recording an answer".into()),
            ..record.clone()
        }),
        _ => Transition::None,
    }
}

/// What a record settled by a lookup says of itself (its `error_summary`), so an audit can
/// tell a verified answer from an executed one.
pub fn settled_by_lookup(now: Millis) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(now).unwrap_or(0));
    format!(
        "settled by lookup at {}: the destination had it; not executed by idem",
        humantime::format_rfc3339_millis(at)
    )
}

/// Whether an answer with this status is final (stored and replayed) or leaves the key
/// retryable (SPEC §2): `408`, `409`, `425`, `429` and `5xx` are not final, unless
/// `store_server_errors` makes `5xx` final.
pub fn is_final_status(status: u16, store_server_errors: bool) -> bool {
    match status {
        408 | 409 | 425 | 429 => false,
        500..=599 => store_server_errors,
        _ => true,
    }
}

/// How an operator settles a record whose outcome is unknown (admin `resolve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The action did not happen (or may happen again): the next request executes.
    Release,
    /// The action happened with this answer: it is replayed from now on.
    Complete(StoredResponse),
}

/// Why a record cannot be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "only outcome_unknown, needs_review or an in_progress record whose lease ran out can be resolved; this record is {0}"
)]
pub struct NotResolvable(pub Status);

/// Applies an operator's resolution: the pure half of `Store::resolve`.
pub fn resolve(record: &Record, resolution: Resolution, now: Millis) -> Result<Record, NotResolvable> {
    let settleable = match record.status {
        Status::OutcomeUnknown | Status::NeedsReview => true,
        Status::InProgress => !record.lease_alive(now),
        Status::Completed | Status::FailedRetryable => false,
    };
    if !settleable {
        return Err(NotResolvable(record.status));
    }
    let mut settled = record.clone();
    let outcome = match resolution {
        Resolution::Release => Outcome::Retryable { error: "released by an operator".into() },
        Resolution::Complete(response) => Outcome::Completed(response),
    };
    outcome.apply(&mut settled, now);
    Ok(settled)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::core::{Fingerprint, RecordId, StoredResponse};

    const NOW: i64 = 1_000_000;

    fn intent(fp: u8) -> Intent {
        Intent {
            id: RecordId::new("orders", "t1", "k1"),
            fingerprint: Fingerprint([fp; 32]),
            now: NOW,
            ttl_ms: 86_400_000,
            lease_ms: 30_000,
            correlation_id: None,
        }
    }

    fn record(status: Status, fp: u8, expires_in: i64, lease_in: Option<i64>, retained: bool) -> Record {
        let response = (status == Status::Completed).then(|| StoredResponse {
            status: 201,
            headers: vec![],
            body: Bytes::from_static(b"{}"),
            retained,
        });
        Record {
            id: RecordId::new("orders", "t1", "k1"),
            fingerprint: Fingerprint([fp; 32]),
            status,
            lease: lease_in.map(|d| Lease { token: 7, locked_until: NOW + d }),
            response,
            created_at: NOW - 10,
            last_seen_at: NOW - 10,
            expires_at: NOW + expires_in,
            replay_count: 0,
            attempt_count: 1,
            correlation_id: None,
            error_summary: None,
        }
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        prop::sample::select(Status::ALL.to_vec())
    }

    proptest! {
        /// Row "any record, different fingerprint": a live record with another payload is
        /// never executed, replayed or leaked — always `KeyReused`.
        #[test]
        fn different_fingerprint_is_always_rejected(
            status in arb_status(), lease_in in prop::option::of(-50_000i64..50_000), retry in any::<bool>(),
        ) {
            let existing = record(status, 1, 1_000, lease_in, true);
            let policy = ClaimPolicy { on_unknown: if retry { OnUnknown::Retry } else { OnUnknown::Review }, ..ClaimPolicy::default() };
            prop_assert_eq!(decide(Some(&existing), &intent(2), policy), Decision::KeyReused);
        }

        /// Row "nothing, or an expired record": whatever it held, an expired record without a
        /// live lease is claimed anew, with a fresh record.
        #[test]
        fn expired_records_are_claimed_anew(status in arb_status(), fp in 0u8..4, expired_by in 0i64..1_000_000) {
            let existing = record(status, fp, -expired_by, None, true);
            let incoming = intent(1);
            let decision = decide(Some(&existing), &incoming, ClaimPolicy::default());
            prop_assert_eq!(decision, Decision::Execute(ExecuteReason::Expired));
            let Transition::Write(new) = transition(decision, Some(&existing), &incoming, 9, ClaimPolicy::default()) else {
                panic!("an execute decision must write a claim");
            };
            prop_assert_eq!(new.status, Status::InProgress);
            prop_assert_eq!(new.attempt_count, 1);
            prop_assert_eq!(new.fingerprint, incoming.fingerprint);
            prop_assert_eq!(new.lease, Some(Lease { token: 9, locked_until: NOW + 30_000 }));
        }

        /// A decision executes exactly when the transition hands the caller a lease, and
        /// every written claim carries the caller's token.
        #[test]
        fn only_execute_hands_out_a_lease(
            status in arb_status(), fp in 0u8..3, expires_in in -1_000i64..1_000,
            lease_in in prop::option::of(-1_000i64..1_000), retry in any::<bool>(), retained in any::<bool>(),
            lookup in any::<bool>(),
        ) {
            let existing = record(status, fp, expires_in, lease_in, retained);
            let lookup = if lookup { Lookup::Configured } else { Lookup::None };
            let policy = ClaimPolicy { on_unknown: if retry { OnUnknown::Retry } else { OnUnknown::Review }, lookup, ..ClaimPolicy::default() };
            let incoming = intent(1);
            let decision = decide(Some(&existing), &incoming, policy);
            let leased = match transition(decision, Some(&existing), &incoming, 42, ClaimPolicy::default()) {
                Transition::Write(r) => r.lease.map(|l| l.token) == Some(42),
                _ => false,
            };
            prop_assert_eq!(decision.holds_lease(), leased);
        }
    }

    proptest! {
        /// `plan_claim` asks for a token exactly when the decision executes, hands it to
        /// the caller, and plans the transition made with it.
        #[test]
        fn a_plan_takes_a_token_only_to_execute(
            status in arb_status(), fp in 0u8..3, expires_in in -1_000i64..1_000,
            lease_in in prop::option::of(-1_000i64..1_000), retry in any::<bool>(), absent in any::<bool>(),
        ) {
            let existing = (!absent).then(|| record(status, fp, expires_in, lease_in, true));
            let policy = ClaimPolicy { on_unknown: if retry { OnUnknown::Retry } else { OnUnknown::Review }, ..ClaimPolicy::default() };
            let asked = std::cell::Cell::new(0);
            let plan = plan_claim(existing.as_ref(), &intent(1), policy, || { asked.set(asked.get() + 1); 42 });
            let decision = decide(existing.as_ref(), &intent(1), policy);
            prop_assert_eq!(plan.decision, decision);
            prop_assert_eq!(asked.get(), usize::from(decision.holds_lease()));
            prop_assert_eq!(plan.token, decision.holds_lease().then_some(42));
            prop_assert_eq!(plan.transition, transition(decision, existing.as_ref(), &intent(1), 42, policy));
        }

        /// A redelivery's check: the table answers it exactly for a completed record that
        /// has not expired, whatever the policy.
        #[test]
        fn asking_again_is_answered_only_by_a_live_completed_record(
            status in arb_status(), expires_in in -1_000i64..1_000, lease_in in prop::option::of(-1_000i64..1_000),
            retained in any::<bool>(), retry in any::<bool>(),
        ) {
            let existing = record(status, 1, expires_in, lease_in, retained);
            let policy = ClaimPolicy { on_unknown: if retry { OnUnknown::Retry } else { OnUnknown::Review }, ..ClaimPolicy::default() };
            let answered = decide_again(&existing, NOW, policy).answered();
            prop_assert_eq!(answered, status == Status::Completed && !existing.is_expired(NOW));
        }
    }

    #[test]
    fn a_plan_leaves_the_written_record_or_the_existing_one() {
        let existing = record(Status::Completed, 1, 1_000, None, true);
        let ignore = ClaimPolicy { replays: Replays::Ignore, ..ClaimPolicy::default() };
        let replay = plan_claim(Some(&existing), &intent(1), ignore, || unreachable!("a replay takes no token"));
        assert_eq!(replay.into_record(Some(existing.clone())), Some(existing.clone()));
        let claimed = plan_claim(None, &intent(1), ClaimPolicy::default(), || 5);
        let left = claimed.clone().into_record(None).expect("a claim writes a record");
        assert_eq!((left.status, left.lease.map(|l| l.token)), (Status::InProgress, Some(5)));
        assert_eq!(claimed.transition, Transition::Write(left));
    }

    #[test]
    fn finality_follows_the_spec() {
        for status in [200, 201, 204, 301, 400, 401, 403, 404, 410, 422] {
            assert!(is_final_status(status, false), "{status}");
        }
        for status in [408, 409, 425, 429, 500, 502, 503, 504] {
            assert!(!is_final_status(status, false), "{status}");
        }
        assert!(is_final_status(500, true));
        assert!(!is_final_status(429, true));
    }

    #[test]
    fn supersede_takes_any_key_a_live_lease_does_not_hold() {
        let policy = ClaimPolicy {
            on_unknown: OnUnknown::Retry,
            on_change: OnChange::Supersede,
            replays: Replays::Ignore,
            lookup: crate::core::Lookup::None,
        };
        for status in Status::ALL {
            let lease = (status == Status::InProgress).then_some(-1);
            let mut existing = record(status, 1, 1_000, lease, true);
            existing.response = Some(StoredResponse {
                status: 200,
                headers: vec![],
                body: Bytes::from_static(b"{\"version\":4}"),
                retained: true,
            });
            let decision = decide(Some(&existing), &intent(2), policy);
            assert_eq!(decision, Decision::Execute(ExecuteReason::Changed), "{status:?}");
            let Transition::Write(claimed) =
                transition(decision, Some(&existing), &intent(2), 9, ClaimPolicy::default())
            else {
                panic!("a claim writes");
            };
            assert_eq!(claimed.response, existing.response, "the previous answer stays on the claimed record");
        }
        let held = record(Status::InProgress, 1, 1_000, Some(5_000), true);
        assert_eq!(decide(Some(&held), &intent(2), policy), Decision::InFlight);
    }

    #[test]
    fn nothing_stored_executes() {
        assert_eq!(decide(None, &intent(1), ClaimPolicy::default()), Decision::Execute(ExecuteReason::New));
    }

    #[test]
    fn completed_same_fingerprint_replays() {
        let existing = record(Status::Completed, 1, 1_000, None, true);
        assert_eq!(decide(Some(&existing), &intent(1), ClaimPolicy::default()), Decision::Replay);
        let ignore = ClaimPolicy { replays: Replays::Ignore, ..ClaimPolicy::default() };
        assert_eq!(transition(Decision::Replay, Some(&existing), &intent(1), 0, ignore), Transition::None);
        let Transition::Touch(touched) =
            transition(Decision::Replay, Some(&existing), &intent(1), 0, ClaimPolicy::default())
        else {
            panic!("a replay only touches the record");
        };
        assert_eq!(touched.replay_count, 1);
        assert_eq!(touched.status, Status::Completed);
    }

    #[test]
    fn completed_but_not_retained_is_gone() {
        let existing = record(Status::Completed, 1, 1_000, None, false);
        assert_eq!(decide(Some(&existing), &intent(1), ClaimPolicy::default()), Decision::NotRetained);
    }

    #[test]
    fn live_lease_is_in_flight() {
        let existing = record(Status::InProgress, 1, 1_000, Some(500), true);
        assert_eq!(decide(Some(&existing), &intent(1), ClaimPolicy::default()), Decision::InFlight);
    }

    #[test]
    fn live_lease_outlives_ttl() {
        let existing = record(Status::InProgress, 1, -1, Some(500), true);
        assert_eq!(decide(Some(&existing), &intent(1), ClaimPolicy::default()), Decision::InFlight);
    }

    #[test]
    fn dead_owner_becomes_outcome_unknown() {
        let existing = record(Status::InProgress, 1, 1_000, Some(-1), true);
        let decision = decide(Some(&existing), &intent(1), ClaimPolicy::default());
        assert_eq!(decision, Decision::OutcomeUnknown);
        let Transition::Write(new) = transition(decision, Some(&existing), &intent(1), 0, ClaimPolicy::default())
        else {
            panic!("the lost lease must be recorded");
        };
        assert_eq!(new.status, Status::OutcomeUnknown);
        assert_eq!(new.lease, None);
    }

    #[test]
    fn unknown_stays_unknown_unless_policy_retries() {
        let existing = record(Status::OutcomeUnknown, 1, 1_000, None, true);
        assert_eq!(decide(Some(&existing), &intent(1), ClaimPolicy::default()), Decision::OutcomeUnknown);
        assert_eq!(
            transition(Decision::OutcomeUnknown, Some(&existing), &intent(1), 0, ClaimPolicy::default()),
            Transition::None
        );
        let retry = ClaimPolicy { on_unknown: OnUnknown::Retry, ..ClaimPolicy::default() };
        assert_eq!(decide(Some(&existing), &intent(1), retry), Decision::Execute(ExecuteReason::UnknownRetry));
    }

    #[test]
    fn failed_retryable_is_a_retry_recovery() {
        let existing = record(Status::FailedRetryable, 1, 1_000, None, true);
        let decision = decide(Some(&existing), &intent(1), ClaimPolicy::default());
        assert_eq!(decision, Decision::Execute(ExecuteReason::RetryRecovery));
        let Transition::Write(new) = transition(decision, Some(&existing), &intent(1), 3, ClaimPolicy::default())
        else {
            panic!("a retry recovery claims the record");
        };
        assert_eq!(new.attempt_count, 2);
        assert_eq!(new.created_at, existing.created_at);
    }

    #[test]
    fn a_changed_payload_is_resent_only_when_the_policy_says_so() {
        let existing = record(Status::Completed, 1, 1_000, None, true);
        let resend = ClaimPolicy { on_change: OnChange::Resend, ..ClaimPolicy::default() };
        assert_eq!(decide(Some(&existing), &intent(2), ClaimPolicy::default()), Decision::KeyReused);
        let decision = decide(Some(&existing), &intent(2), resend);
        assert_eq!(decision, Decision::Execute(ExecuteReason::Changed));
        let Transition::Write(claimed) = transition(decision, Some(&existing), &intent(2), 5, ClaimPolicy::default())
        else {
            panic!("a re-send claims the record");
        };
        assert_eq!(claimed.fingerprint, Fingerprint([2; 32]));
        assert_eq!(claimed.status, Status::InProgress);
        assert_eq!(claimed.response, existing.response, "the previous answer is kept until replaced");
        let in_flight = record(Status::InProgress, 1, 1_000, Some(500), true);
        assert_eq!(decide(Some(&in_flight), &intent(2), resend), Decision::KeyReused);
    }

    #[test]
    fn a_lookup_settles_what_is_unknown_and_nothing_else() {
        let lookup = ClaimPolicy { lookup: Lookup::Configured, ..ClaimPolicy::default() };
        let retry = ClaimPolicy { on_unknown: OnUnknown::Retry, ..lookup };
        for (status, lease) in [(Status::OutcomeUnknown, None), (Status::InProgress, Some(-1))] {
            let mut existing = record(status, 1, 1_000, lease, true);
            existing.error_summary = Some("sent, never answered".into());
            for policy in [lookup, retry] {
                let plan = plan_claim(Some(&existing), &intent(1), policy, || 9);
                assert_eq!((plan.decision, plan.token), (Decision::Verify, Some(9)), "{status:?}");
                let Transition::Write(claimed) = plan.transition else { panic!("a verifier takes the lease") };
                assert_eq!(claimed.status, Status::InProgress);
                assert_eq!(claimed.lease, Some(Lease { token: 9, locked_until: NOW + 30_000 }));
                assert_eq!(claimed.attempt_count, existing.attempt_count, "verifying executes nothing");
                assert_eq!(claimed.error_summary, existing.error_summary);
            }
            assert_eq!(decide(Some(&existing), &intent(2), lookup), Decision::KeyReused, "another payload");
        }
        let held = record(Status::InProgress, 1, 1_000, Some(5_000), true);
        assert_eq!(decide(Some(&held), &intent(1), lookup), Decision::InFlight, "one verifier at a time");
        for status in [Status::Completed, Status::FailedRetryable, Status::NeedsReview] {
            let existing = record(status, 1, 1_000, None, true);
            assert_eq!(
                decide(Some(&existing), &intent(1), lookup),
                decide(Some(&existing), &intent(1), ClaimPolicy::default())
            );
        }
        assert!(settled_by_lookup(0).starts_with("settled by lookup at 1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn needs_review_blocks() {
        let existing = record(Status::NeedsReview, 1, 1_000, None, true);
        assert_eq!(decide(Some(&existing), &intent(1), ClaimPolicy::default()), Decision::NeedsReview);
    }
}
