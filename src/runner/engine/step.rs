//! The step state machine: a unit of work's steps in order (a step that does not complete
//! holds back the rest), and each step claimed → attempted → finished until it settles:
//! retryable failures retried with backoff, `when_known` once the step has captured its ids,
//! a lost call re-sent only when that is safe, attempts counted per run (a runner) or over
//! the record's lifetime (a consumer's deliveries).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::{Attempts, Engine, Mode};
use crate::backoff::Backoff;
use crate::core::units::millis;
use crate::core::{
    ClaimPolicy, Decision, ExecuteReason, Fingerprint, Intent, LeaseToken, Millis, OnChange, OnUnknown, Outcome,
    Record, RecordId, Replays,
};
use crate::runner::call::{self, Call, Variant, Verdict};
use crate::runner::flow::Step;
use crate::runner::output::{RecordReport, StepReport, StepResult};
use crate::runner::source::{self, SourceRecord};
use crate::store::clock::Clock;
use crate::store::{self, Claim, now_millis, owner};
use crate::template::Context;
use crate::verify::{self, Finding};

/// A guard step's record is never forgotten: "at most once, ever" (about a hundred years).
const GUARD_TTL_MS: Millis = 100 * 365 * 24 * 3600 * 1000;

/// One step of one record, identified: what the store and the API see.
pub(super) struct Unit<'a> {
    pub(super) step: &'a Step,
    pub(super) fields: &'a Map<String, Value>,
    /// Captures of the record's earlier steps.
    pub(super) captures: &'a HashMap<String, Map<String, Value>>,
    pub(super) id: RecordId,
    pub(super) fingerprint: Fingerprint,
    /// `{{key}}` in templates: the idempotency key without the fingerprint suffix, which
    /// would depend on what the templates render.
    pub(super) stem: String,
    /// The value of the idempotency header.
    pub(super) key: String,
    /// The step's own request (the create).
    pub(super) base: Call,
}

/// Whether a retryable failure of this attempt may still be tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chance {
    /// It stays retryable.
    NotLast,
    /// The step's last attempt (a consumer's last delivery): it is recorded as `needs_review`.
    Last,
}

impl Engine {
    /// Runs a record's steps in order; a step that does not complete holds back the rest.
    pub(super) async fn process(&self, record: SourceRecord) -> RecordReport {
        match source::primary_key(&record.fields, &self.flow.source.primary_key) {
            Ok(key) => self.process_keyed(record.line, key, &record.fields).await,
            Err(e) => {
                let error = Some(format!("not sent: {e}"));
                RecordReport { line: record.line, key: None, steps: Vec::new(), error }
            }
        }
    }

    /// Runs the steps of one unit of work whose key is known (a record's primary key, a
    /// message's id).
    pub(crate) async fn process_keyed(&self, line: u64, key: String, fields: &Map<String, Value>) -> RecordReport {
        let mut captures: HashMap<String, Map<String, Value>> = HashMap::new();
        let mut steps: Vec<StepReport> = Vec::with_capacity(self.flow.steps.len());
        for step in &self.flow.steps {
            if steps.last().is_some_and(|s| !s.result.lets_record_go_on()) {
                steps.push(StepReport::new(&step.name, StepResult::SkippedAfterFailure));
                continue;
            }
            let report = self.step(step, fields, &key, &captures, &steps).await;
            captures.insert(step.name.clone(), report.captures.clone());
            steps.push(report);
        }
        RecordReport { line, key: Some(key), steps, error: None }
    }

    /// Renders and identifies one step, then executes it (or previews it in a dry run).
    /// `earlier`: the reports of the record's earlier steps.
    async fn step(
        &self,
        step: &Step,
        fields: &Map<String, Value>,
        pk: &str,
        captures: &HashMap<String, Map<String, Value>>,
        earlier: &[StepReport],
    ) -> StepReport {
        let stem = self.stem(&step.name, pk);
        let ctx = Context { record: fields, steps: captures, key: &stem };
        let base = match call::render(step, Variant::Create, &ctx) {
            Ok(call) => call,
            // A dry run's earlier step would be sent: its captures are not known yet.
            Err(_) if earlier.iter().any(|s| s.result == StepResult::WouldSend) => {
                return self.preview_pending(step, pk);
            }
            Err(e) => return StepReport::review(&step.name, StepResult::NeedsReview, format!("not sent: {e}")),
        };
        let fingerprint = call::fingerprint(step.key_strategy, pk, &base);
        let key = call::idempotency_key(step.key_strategy, &stem, &fingerprint);
        let id = RecordId::new(self.flow.scope(&step.name), "", pk);
        let unit = Unit { step, fields, captures, id, fingerprint, stem, key, base };
        match self.mode {
            Mode::Send => self.guarded(&unit).await,
            Mode::DryRun => self.preview(&unit).await,
        }
    }

    /// Claims, sends and records one step until it settles: retryable failures are retried
    /// with backoff (each attempt claimed and finished on its own, so a crash between
    /// attempts is safe), up to `max_attempts`.
    async fn guarded(&self, unit: &Unit<'_>) -> StepReport {
        let mut report = StepReport::new(&unit.step.name, StepResult::Sent);
        // The captures of an earlier answer, once a changed record is claimed: they route it
        // to `when_known`, for every attempt of this run.
        let mut known = Map::new();
        let mut attempts = 0;
        let waiting_until = Instant::now() + self.lease + self.flow.timeout;
        let mut pause = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let claim = match self.claim_waiting(unit, waiting_until, &mut pause).await {
                Ok(claim) => claim,
                Err(e) => return StepReport::review(&unit.step.name, StepResult::Failed, e.to_string()),
            };
            let (reason, token) = match (claim.decision, claim.token, &claim.record) {
                (Decision::Execute(reason), Some(token), _) => (reason, token),
                (Decision::Verify, Some(token), Some(record)) => match self.verify(unit, record, token).await {
                    // Absent: released, so the next claim sends it.
                    Ok(None) => continue,
                    Ok(Some(verified)) => return verified,
                    Err(e) => return StepReport::review(&unit.step.name, StepResult::Failed, e.to_string()),
                },
                (decision, _, _) => return settled(report, decision, claim.record.as_ref()),
            };
            if reason == ExecuteReason::Changed {
                report.result = StepResult::Resent;
            }
            let chance = match self.chance(unit, claim.record.as_ref(), token).await {
                Ok(chance) => chance,
                Err(gave_up) => return gave_up,
            };
            // A claimed record carries the previous answer when the store kept it (today: a
            // changed record); a later claim of this run without it keeps what was known.
            let carried = call::stored_captures(claim.record.as_ref().and_then(|r| r.response.as_ref()));
            if !carried.is_empty() {
                known = carried;
            }
            attempts += 1;
            let verdict = self.attempt(unit, token, &known, chance).await;
            count(&mut report, &verdict);
            if attempts < self.max_attempts() && worth_another_attempt(unit.step, &verdict) {
                tokio::time::sleep(call::backoff(attempts, verdict.retry_after)).await;
                continue;
            }
            return finished(report, verdict);
        }
    }

    /// Claims the step; while another runner holds it, waits for it to finish (or its lease
    /// to run out) until `until`, claiming again after each pause.
    async fn claim_waiting(&self, unit: &Unit<'_>, until: Instant, pause: &mut Backoff) -> Result<Claim, store::Error> {
        loop {
            let claim = self.claim(unit).await?;
            if claim.decision != Decision::InFlight || Instant::now() >= until {
                return Ok(claim);
            }
            tokio::time::sleep(pause.next_pause()).await;
        }
    }

    /// Attempts a step gets in one go: `max_attempts` in a run, one per consumer delivery.
    fn max_attempts(&self) -> u32 {
        match self.attempts {
            Attempts::PerRun => self.flow.max_attempts,
            Attempts::Lifetime(_) => 1,
        }
    }

    /// Whether the attempt just claimed is the step's last. A consumer's record that has
    /// counted more than its lifetime's attempts is given up on here (recorded as
    /// `needs_review`, with the last error): that report is the `Err`.
    async fn chance(&self, unit: &Unit<'_>, claimed: Option<&Record>, token: LeaseToken) -> Result<Chance, StepReport> {
        let so_far = claimed.map_or(1, |r| r.attempt_count);
        match self.attempts {
            Attempts::Lifetime(limit) if so_far > u64::from(limit) => {
                let error = claimed.and_then(|r| r.error_summary.clone()).unwrap_or_default();
                let error = format!("gave up after {limit} attempts; the last: {error}");
                self.finish(unit, token, Outcome::NeedsReview { error: error.clone() }).await;
                Err(StepReport::review(&unit.step.name, StepResult::NeedsReview, error))
            }
            Attempts::Lifetime(limit) if so_far >= u64::from(limit) => Ok(Chance::Last),
            Attempts::Lifetime(_) | Attempts::PerRun => Ok(Chance::NotLast),
        }
    }

    /// One call under a claim: rendered (as an update once captures are known), sent with
    /// the lease renewed meanwhile, judged, and recorded. On the [`Chance::Last`] a
    /// retryable failure is recorded as `needs_review`.
    async fn attempt(&self, unit: &Unit<'_>, token: LeaseToken, known: &Map<String, Value>, chance: Chance) -> Verdict {
        let renewal = owner::keep_alive(self.store.clone(), unit.id.clone(), token, self.lease, Clock::System);
        let call = match self.request(unit, known) {
            Ok(call) => call,
            Err(error) => {
                let verdict = not_sent(format!("not sent: {error}"));
                drop(renewal);
                self.finish(unit, token, verdict.outcome.clone()).await;
                return verdict;
            }
        };
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        let header = unit.step.idempotency_header.as_ref().map(|name| (name, unit.key.as_str()));
        let answer = call::send(&self.http, &call, header, self.flow.timeout).await;
        drop(renewal);
        // An update keeps the ids the create captured; a create (again) takes the new ones.
        let updated = if known.is_empty() || unit.step.when_known.is_none() { &Map::new() } else { known };
        let mut verdict = call::judge(unit.step, &call, answer, updated);
        if chance == Chance::Last {
            give_up_if_retryable(&mut verdict, self.flow.max_attempts);
        }
        if !matches!(verdict.outcome, Outcome::Completed(_)) {
            tracing::debug!(scope = %unit.id.scope, status = verdict.outcome.status().as_str(), "a step did not complete");
        }
        self.finish(unit, token, verdict.outcome.clone()).await;
        verdict
    }

    /// Settles a step whose call was sent and never answered by its lookup, under the
    /// `Verify` lease `token`: found is reported `verified` (with the captures the found
    /// answer holds), failed `unknown`; absent (`None`) released the step to be sent.
    async fn verify(
        &self,
        unit: &Unit<'_>,
        record: &Record,
        token: LeaseToken,
    ) -> Result<Option<StepReport>, store::Error> {
        let Some(lookup) = &unit.step.verify else { return Ok(None) };
        let ctx = Context { record: unit.fields, steps: unit.captures, key: &unit.stem };
        let mut captures = Map::new();
        let ask = async {
            match lookup.ask(&self.http, &ctx, self.flow.timeout).await {
                Finding::Found(found) => {
                    let (stored, found_captures) = call::verified(unit.step, &found);
                    captures = found_captures;
                    Finding::Found(stored)
                }
                other => other,
            }
        };
        let finding = verify::conclude(&self.store, record, token, self.lease, Clock::System, ask).await;
        let mut report = StepReport::new(&unit.step.name, StepResult::Verified);
        match finding? {
            Finding::Found(_) => {
                report.captures = captures;
                Ok(Some(report))
            }
            Finding::Absent => Ok(None),
            Finding::Failed(why) => {
                Ok(Some(StepReport::review(&unit.step.name, StepResult::Unknown, format!("outcome unknown; {why}"))))
            }
        }
    }

    /// Records the outcome of the attempt holding `token` (retrying a short store outage).
    async fn finish(&self, unit: &Unit<'_>, token: LeaseToken, outcome: Outcome) {
        owner::finish(self.store.as_ref(), &unit.id, token, outcome, Clock::System, |_| {}).await;
    }

    /// The request to send: `when_known` once this step has captured values, else the create.
    pub(super) fn request(&self, unit: &Unit<'_>, known: &Map<String, Value>) -> Result<Call, String> {
        if known.is_empty() || unit.step.when_known.is_none() {
            return Ok(unit.base.clone());
        }
        let mut steps = unit.captures.clone();
        steps.insert(unit.step.name.clone(), known.clone());
        let ctx = Context { record: unit.fields, steps: &steps, key: &unit.stem };
        call::render(unit.step, Variant::Update, &ctx)
    }

    /// What the store is asked to decide on for `unit`, now.
    pub(super) fn intent(&self, unit: &Unit<'_>) -> Intent {
        let ttl_ms = if unit.step.guard { GUARD_TTL_MS } else { millis(self.flow.retention) };
        Intent {
            id: unit.id.clone(),
            fingerprint: unit.fingerprint,
            now: now_millis(),
            ttl_ms,
            lease_ms: millis(self.lease),
            correlation_id: None,
        }
    }

    /// Claims a step, retrying a store outage for a few seconds (five pauses, 50 ms doubling);
    /// as one most likely new (`claim_new`): the triage or the broker sent it here to be done.
    async fn claim(&self, unit: &Unit<'_>) -> Result<Claim, store::Error> {
        let mut pause = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));
        for _ in 0..5 {
            match self.store.claim_new(&self.intent(unit), policy(unit.step)).await {
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, "store unavailable; will try again");
                    tokio::time::sleep(pause.next_pause()).await;
                }
                other => return other,
            }
        }
        self.store.claim_new(&self.intent(unit), policy(unit.step)).await
    }
}

/// Re-sending a call that may have taken effect is safe when the destination can tell it
/// is the same call (an idempotency header), when HTTP defines the method as idempotent, or
/// when the flow says so. Never for a guard step.
pub(crate) fn unknown_is_safe(step: &Step) -> bool {
    !step.guard
        && (step.idempotency_header.is_some()
            || matches!(step.method, http::Method::PUT | http::Method::DELETE)
            || step.on_unknown == OnUnknown::Retry)
}

/// The claim policy of a step: an unknown outcome is re-executed only when that is safe,
/// and a changed record is sent again only with `resend_on_change`.
pub(super) fn policy(step: &Step) -> ClaimPolicy {
    ClaimPolicy {
        on_unknown: if unknown_is_safe(step) { OnUnknown::Retry } else { OnUnknown::Review },
        on_change: if step.resend_on_change { OnChange::Resend } else { OnChange::Reject },
        // A re-run reads its ledger: skipping a step already sent writes nothing.
        replays: Replays::Ignore,
        lookup: if step.verify.is_some() { crate::core::Lookup::Configured } else { crate::core::Lookup::None },
    }
}

/// A retryable failure may be tried again now; so may a call that was lost, when re-sending
/// it is safe (the next claim then re-executes it: the policy says `on_unknown = Retry`).
fn worth_another_attempt(step: &Step, verdict: &Verdict) -> bool {
    match &verdict.outcome {
        Outcome::Retryable { .. } => verdict.retryable,
        Outcome::Unknown { .. } => unknown_is_safe(step),
        _ => false,
    }
}

/// Counts an attempt in the step's report.
fn count(report: &mut StepReport, verdict: &Verdict) {
    report.calls += u64::from(verdict.sent);
    report.attempts += 1;
    report.status = verdict.status;
}

/// The verdict of a call that could not be rendered: nothing left, a person must look.
fn not_sent(error: String) -> Verdict {
    Verdict {
        outcome: Outcome::NeedsReview { error },
        captures: Map::new(),
        status: None,
        retryable: false,
        retry_after: None,
        sent: false,
    }
}

/// On a step's last attempt, a retryable failure becomes `needs_review`.
fn give_up_if_retryable(verdict: &mut Verdict, max_attempts: u32) {
    if let Outcome::Retryable { error } = &verdict.outcome {
        let error = format!("{error}; gave up after {max_attempts} attempts");
        verdict.outcome = Outcome::NeedsReview { error };
        verdict.retryable = false;
    }
}

/// The report of a step the store did not let execute.
pub(super) fn settled(mut report: StepReport, decision: Decision, record: Option<&Record>) -> StepReport {
    let stored = || call::stored_captures(record.and_then(|r| r.response.as_ref()));
    let summary = || record.and_then(|r| r.error_summary.clone());
    let status = record.map_or("missing", |r| r.status.as_str());
    let (result, error) = match decision {
        Decision::Replay | Decision::NotRetained => (StepResult::AlreadySent, None),
        Decision::KeyReused if status == "completed" => (StepResult::ChangedNotResent, None),
        Decision::KeyReused => {
            let why =
                format!("the record changed while its previous attempt is {status}; `idem log rm` to send it anew");
            (StepResult::NeedsReview, Some(why))
        }
        Decision::InFlight => (StepResult::InFlight, Some("another run is still sending this step".to_owned())),
        // A dry run's look (a claim hands `Verify` out with its lease, handled before this).
        Decision::Verify => (
            StepResult::Unknown,
            Some("sent earlier and never answered; the next run asks the step's verify lookup".to_owned()),
        ),
        Decision::OutcomeUnknown => (
            StepResult::Unknown,
            Some(
                summary().unwrap_or_else(|| "sent earlier and never answered".into())
                    + "; settle it with `idem log resolve`",
            ),
        ),
        Decision::NeedsReview => (StepResult::NeedsReview, summary().or_else(|| Some("marked needs_review".into()))),
        Decision::Execute(_) => (StepResult::Failed, Some("the store granted no lease".to_owned())),
    };
    if result.lets_record_go_on() {
        report.captures = stored();
    }
    report.result = result;
    report.error = error;
    report
}

/// The report of a step that executed, from its last verdict.
fn finished(mut report: StepReport, verdict: Verdict) -> StepReport {
    match verdict.outcome {
        Outcome::Completed(_) | Outcome::Verified { .. } => report.captures = verdict.captures,
        Outcome::Retryable { error } => {
            report.result = StepResult::Failed;
            report.error = Some(error);
        }
        Outcome::Unknown { error } => {
            report.result = StepResult::Unknown;
            report.error = Some(error);
        }
        Outcome::NeedsReview { error } => {
            report.result = StepResult::NeedsReview;
            report.error = Some(error);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Status, StoredResponse};
    use crate::runner::flow;

    fn step(toml: &str) -> Step {
        let text =
            format!("flow = \"f\"\n[source]\njsonl = \"x\"\nprimary_key = [\"id\"]\n[[steps]]\nname = \"s\"\n{toml}");
        flow::parse(&text).expect("a valid flow").steps.remove(0)
    }

    #[test]
    fn lost_calls_are_re_executed_only_when_safe() {
        let retry = |toml: &str| policy(&step(toml)).on_unknown == OnUnknown::Retry;
        assert!(retry("url = \"http://h/x\""), "the default idempotency header makes it safe");
        assert!(!retry("url = \"http://h/x\"\nidempotency_header = \"\""), "a bare POST is not");
        assert!(retry("url = \"http://h/x\"\nidempotency_header = \"\"\nmethod = \"PUT\""));
        assert!(retry("url = \"http://h/x\"\nidempotency_header = \"\"\nmethod = \"DELETE\""));
        assert!(retry("url = \"http://h/x\"\nidempotency_header = \"\"\non_unknown = \"retry\""));
        assert!(!retry("url = \"http://h/x\"\nmethod = \"PUT\"\nguard = true"), "never a guard");
        let changed = |toml: &str| policy(&step(toml)).on_change;
        assert_eq!(changed("url = \"http://h/x\""), OnChange::Reject);
        let resend = "url = \"http://h/x\"\nkey_strategy = \"primary_key_hash\"\nresend_on_change = true";
        assert_eq!(changed(resend), OnChange::Resend);
    }

    #[test]
    fn settled_steps_read_their_captures_from_the_ledger() {
        let mut record = Record {
            id: RecordId::new("f:s", "", "o-1"),
            fingerprint: Fingerprint([0; 32]),
            status: Status::Completed,
            lease: None,
            response: Some(StoredResponse {
                status: 201,
                headers: vec![],
                body: r#"{"captures":{"id":"x-1"}}"#.into(),
                retained: true,
            }),
            created_at: 0,
            last_seen_at: 0,
            expires_at: 1,
            replay_count: 0,
            attempt_count: 1,
            correlation_id: None,
            error_summary: None,
        };
        let report = || StepReport::new("s", StepResult::Sent);
        let replayed = settled(report(), Decision::Replay, Some(&record));
        assert_eq!((replayed.result, replayed.captures["id"].as_str()), (StepResult::AlreadySent, Some("x-1")));
        let changed = settled(report(), Decision::KeyReused, Some(&record));
        assert_eq!((changed.result, changed.captures["id"].as_str()), (StepResult::ChangedNotResent, Some("x-1")));
        record.status = Status::FailedRetryable;
        let stuck = settled(report(), Decision::KeyReused, Some(&record));
        assert_eq!(stuck.result, StepResult::NeedsReview, "{stuck:?}");
        record.status = Status::OutcomeUnknown;
        record.error_summary = Some("POST /x: no answer".into());
        let unknown = settled(report(), Decision::OutcomeUnknown, Some(&record));
        assert_eq!(unknown.result, StepResult::Unknown);
        assert!(unknown.error.as_deref().is_some_and(|e| e.starts_with("POST /x: no answer")), "{unknown:?}");
        assert!(unknown.captures.is_empty());
    }
}
