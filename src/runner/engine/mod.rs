//! The engine of `idem run` (SPEC §5): reads records from the source, runs each record's
//! steps in order, and guards every step of every record with a record in the store.
//!
//! A step's record lives at scope `"{flow}:{step}"`, tenant `""`, key = the record's primary
//! key. The store decides (SPEC §2) inside `Store::claim`; the engine only acts on the
//! decision, as the gateway does: the intent is durable before the call, the answer is
//! recorded right after it, and a crash in between leaves a lease that runs out. So a run
//! killed at any point is resumed by running it again, without a duplicate call.
//!
//! The ledger: a completed step stores its status and `{"captures": {…}}` (the values its
//! `capture` pointers found in the answer), never the rest of the answer. Later steps, in
//! this run or a resumed one, read `{{steps.S.C}}` from there.
//!
//! Choices SPEC §5 leaves open, made here:
//!
//! - The fingerprint is the SHA-256 of the primary key for `primary_key` (changed data is
//!   still "already sent"), and of the RFC 8785 JSON of method, URL and body of the step's own
//!   request for `primary_key_hash` (not of the `when_known` update, so create and update of
//!   one version of a record are one intent).
//! - The idempotency header carries `{flow}:{step}:{pk}`, plus `:` and 16 hex digits of the
//!   fingerprint for `primary_key_hash`; a key that is not visible ASCII is replaced by
//!   `sha256:` and its hash. `{{key}}` in templates is that value without the fingerprint
//!   part (which depends on what the templates render).
//! - A lost call is re-executed (in this run, or by a later one once its lease ran out) only
//!   when safe: the claim policy says `on_unknown = Retry` exactly then.
//! - An update (`when_known`) keeps the ids the create captured; its answer only adds values
//!   they lack.
//! - The lease is `2 × timeout + 1 s`, renewed every third of it: a re-run after a crash waits
//!   at most that long for a step the dead run held.
//! - A changed record whose update fails keeps its previous captures in the store (a failed
//!   attempt keeps the record's previous answer, see `Outcome::replaces_response`), so a
//!   later run still sends the update to the known id, never a second create.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::call::{self, Call, Variant, Verdict};
use super::flow::{Flow, Step};
use super::output::{self, RecordReport, ReportFile, StepReport, StepResult, Summary};
use super::source::{self, Item, SourceRecord};
use super::template::Context;
use crate::backoff::Backoff;
use crate::core::units::millis;
use crate::core::{
    ClaimPolicy, Decision, ExecuteReason, Fingerprint, Intent, LeaseToken, Millis, OnChange, OnUnknown, Outcome,
    Record, RecordId, Replays, decide,
};
use crate::store::{self, Claim, Store, now_millis, owner};

/// How a run is changed from the command line.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Store URL instead of the flow's.
    pub store: Option<String>,
    /// Where to write one JSON line per record.
    pub report: Option<PathBuf>,
    /// Print what would be sent; send nothing, write nothing to the store.
    pub dry_run: bool,
}

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source cannot be read at all.
    #[error(transparent)]
    Source(#[from] source::Error),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The report file cannot be written.
    #[error("cannot write the report {}: {source}", path.display())]
    Report {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP client cannot be built.
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
}

impl Error {
    /// True for mistakes in the input (exit status 2), as opposed to an outage.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Source(e) => !e.is_retryable(),
            Error::Store(e) => matches!(e, store::Error::BadUrl { .. } | store::Error::TooNew { .. }),
            Error::Report { .. } => true,
            Error::Client(_) => false,
        }
    }
}

/// A guard step's record is never forgotten: "at most once, ever" (about a hundred years).
const GUARD_TTL_MS: Millis = 100 * 365 * 24 * 3600 * 1000;

/// Runs a flow to the end of its source and returns the counts. When `stop` completes (a
/// signal), no further record is started; the records in flight finish, so nothing is left
/// `in_progress`, and a later run resumes where this one stopped.
pub async fn execute(flow: Flow, options: &Options, stop: impl Future<Output = ()>) -> Result<Summary, Error> {
    let store = open_store(&flow, options).await?;
    let records = source::open(&flow.source.input).await?;
    let report = match &options.report {
        Some(path) => Some(ReportFile::create(path).map_err(|source| Error::Report { path: path.clone(), source })?),
        None => None,
    };
    let engine = Arc::new(Engine::new(flow, store, options.dry_run, Keys::Flow, Attempts::PerRun)?);
    let summary = engine.drive(records, report, stop).await;
    match (summary, &options.report) {
        (Ok(summary), _) => Ok(summary),
        (Err(source), Some(path)) => Err(Error::Report { path: path.clone(), source }),
        (Err(source), None) => Err(Error::Report { path: PathBuf::from("-"), source }),
    }
}

/// Source items read ahead and checked against the ledger in one store read.
const BATCH: usize = 1024;

/// A source item after [`Engine::triage`].
enum Triage {
    /// Nothing to send: its report.
    Done(RecordReport),
    /// Its steps must run.
    Todo(SourceRecord),
}

/// How the idempotency key a step sends is formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keys {
    /// `{flow}:{step}:{pk}` (see [`call::key_stem`]): a runner's keys.
    Flow,
    /// The primary key itself: a consumer's message id, as its endpoint expects it.
    MessageId,
}

/// How many attempts a step gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attempts {
    /// `max_attempts` in this run, with backoff between them; the next run starts afresh.
    PerRun,
    /// One per call of [`Engine::process_keyed`] (a delivery); once the step's record has
    /// counted this many attempts in all, it becomes `needs_review` (a poison message).
    Lifetime(u32),
}

/// The shared state of a run: one store, one HTTP client (keep-alive), one rate limiter.
pub(crate) struct Engine {
    flow: Flow,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    /// Paces every call of every step together (`rate_limit`); `None` is unlimited.
    limiter: Option<DefaultDirectRateLimiter>,
    /// How long a claim holds without renewal: longer than one call, so a live runner never
    /// loses it; short enough that a re-run after a crash does not wait long.
    lease: Duration,
    dry_run: bool,
    keys: Keys,
    attempts: Attempts,
}

/// One step of one record, identified: what the store and the API see.
struct Unit<'a> {
    step: &'a Step,
    fields: &'a Map<String, Value>,
    /// Captures of the record's earlier steps.
    captures: &'a HashMap<String, Map<String, Value>>,
    id: RecordId,
    fingerprint: Fingerprint,
    /// `{{key}}` in templates: the idempotency key without the fingerprint suffix, which
    /// would depend on what the templates render.
    stem: String,
    /// The value of the idempotency header.
    key: String,
    /// The step's own request (the create).
    base: Call,
}

impl Engine {
    /// An engine for `flow`'s steps on `store`. `keys` and `attempts` are a runner's
    /// (`Keys::Flow`, `Attempts::PerRun`) or a consumer's.
    pub(crate) fn new(
        flow: Flow,
        store: Arc<dyn Store>,
        dry_run: bool,
        keys: Keys,
        attempts: Attempts,
    ) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Client(e.to_string()))?;
        let limiter = flow
            .rate_limit
            .filter(|rate| *rate > 0.0)
            .and_then(|rate| Quota::with_period(Duration::from_secs_f64(1.0 / rate)))
            .map(RateLimiter::direct);
        let lease = flow.timeout * 2 + Duration::from_secs(1);
        Ok(Self { flow, store, http, limiter, lease, dry_run, keys, attempts })
    }

    /// Keeps `concurrency` records in flight; the source is read as records finish, so
    /// memory stays flat however long it is. Records are read in batches and checked
    /// against the ledger first ([`Engine::triage`]): a record whose steps were all sent
    /// before is counted at once, without a task or a claim.
    async fn drive(
        self: Arc<Self>,
        records: mpsc::Receiver<Item>,
        mut report: Option<ReportFile>,
        stop: impl Future<Output = ()>,
    ) -> std::io::Result<Summary> {
        let bar = output::progress();
        let mut summary = Summary::default();
        let mut running: JoinSet<RecordReport> = JoinSet::new();
        // Records of the last batch that need their steps run, waiting for a free slot.
        let mut waiting: VecDeque<SourceRecord> = VecDeque::new();
        let mut stop = std::pin::pin!(stop);
        let mut source_done = false;
        let mut triaged = self.triage_ahead(records);
        loop {
            while running.len() < self.flow.concurrency {
                let Some(record) = waiting.pop_front() else { break };
                let engine = self.clone();
                running.spawn(async move { engine.process(record).await });
            }
            if source_done && waiting.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                () = &mut stop => {
                    summary.interrupted = true;
                    bar.suspend(|| eprintln!("idem: stopping: finishing the records in flight; run again to resume"));
                    break;
                }
                Some(done) = running.join_next(), if running.len() >= self.flow.concurrency || source_done => {
                    record_done(done, &mut summary, &mut report, &bar)?;
                }
                item = triaged.recv(), if waiting.is_empty() && !source_done => match item {
                    None => source_done = true,
                    Some(Triage::Done(done)) => record_done(Ok(done), &mut summary, &mut report, &bar)?,
                    Some(Triage::Todo(record)) => waiting.push_back(record),
                },
            }
        }
        while let Some(done) = running.join_next().await {
            record_done(done, &mut summary, &mut report, &bar)?;
        }
        bar.finish_and_clear();
        if let Some(report) = report {
            report.finish()?;
        }
        Ok(summary)
    }

    /// Reads the source in batches and triages them, two batches at a time (one waits on
    /// the store while the other is checked), ahead of the records in flight.
    fn triage_ahead(self: &Arc<Self>, records: mpsc::Receiver<Item>) -> mpsc::Receiver<Triage> {
        let (triaged, receiver) = mpsc::channel(BATCH);
        let records = Arc::new(tokio::sync::Mutex::new(records));
        for _ in 0..2 {
            let (engine, records, triaged) = (self.clone(), records.clone(), triaged.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut records = records.lock().await;
                        let Some(first) = records.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < BATCH {
                            match records.try_recv() {
                                Ok(item) => batch.push(item),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    for item in engine.triage(batch).await {
                        if triaged.send(item).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        receiver
    }

    /// Sorts a batch of source items: lines that are not records and records whose every
    /// step the ledger shows as sent (the decision is a replay, which writes nothing) are
    /// done; the others are to run. One store read for the whole batch.
    async fn triage(&self, batch: Vec<Item>) -> Vec<Triage> {
        let mut keyed: Vec<(SourceRecord, String)> = Vec::with_capacity(batch.len());
        let mut triaged: Vec<Triage> = Vec::with_capacity(batch.len());
        for item in batch {
            match item {
                Err(bad) => triaged.push(Triage::Done(bad_line(bad))),
                Ok(record) => match source::primary_key(&record.fields, &self.flow.source.primary_key) {
                    Ok(key) => keyed.push((record, key)),
                    Err(_) => triaged.push(Triage::Todo(record)),
                },
            }
        }
        if self.dry_run || keyed.is_empty() {
            triaged.extend(keyed.into_iter().map(|(record, _)| Triage::Todo(record)));
            return triaged;
        }
        let steps = &self.flow.steps;
        let ids: Vec<RecordId> = keyed
            .iter()
            .flat_map(|(_, key)| steps.iter().map(|step| RecordId::new(self.flow.scope(&step.name), "", key.as_str())))
            .collect();
        let Ok(ledger) = self.store.get_many(&ids).await else {
            // The steps' own claims will retry the store and report it.
            triaged.extend(keyed.into_iter().map(|(record, _)| Triage::Todo(record)));
            return triaged;
        };
        for ((record, key), entries) in keyed.into_iter().zip(ledger.chunks(steps.len())) {
            match self.all_sent(&record.fields, &key, entries) {
                Some(steps) => {
                    triaged.push(Triage::Done(RecordReport { line: record.line, key: Some(key), steps, error: None }))
                }
                None => triaged.push(Triage::Todo(record)),
            }
        }
        triaged
    }

    /// The steps' reports when the ledger says every step of the record was sent, with
    /// this very request: the same decision as a claim's (`decide` says `Replay`).
    fn all_sent(&self, fields: &Map<String, Value>, pk: &str, entries: &[Option<Record>]) -> Option<Vec<StepReport>> {
        let mut captures: HashMap<String, Map<String, Value>> = HashMap::new();
        let mut reports = Vec::with_capacity(entries.len());
        let now = now_millis();
        for (step, existing) in self.flow.steps.iter().zip(entries) {
            let existing = existing.as_ref()?;
            let stem = self.stem(&step.name, pk);
            let ctx = Context { record: fields, steps: &captures, key: &stem };
            let base = call::render(step, Variant::Create, &ctx).ok()?;
            let intent = Intent {
                id: existing.id.clone(),
                fingerprint: call::fingerprint(step.key_strategy, pk, &base),
                now,
                ttl_ms: 0,
                lease_ms: 0,
                correlation_id: None,
            };
            if decide(Some(existing), &intent, policy(step)) != Decision::Replay {
                return None;
            }
            let stored = call::stored_captures(existing.response.as_ref());
            captures.insert(step.name.clone(), stored.clone());
            reports.push(StepReport { captures: stored, ..StepReport::new(&step.name, StepResult::AlreadySent) });
        }
        Some(reports)
    }

    /// `{{key}}` of a step: the idempotency key without the fingerprint suffix.
    fn stem(&self, step: &str, pk: &str) -> String {
        match self.keys {
            Keys::Flow => call::key_stem(&self.flow.name, step, pk),
            Keys::MessageId => call::message_key(pk),
        }
    }

    /// Runs a record's steps in order; a step that does not complete holds back the rest.
    async fn process(&self, record: SourceRecord) -> RecordReport {
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
            let pending = steps.iter().any(|s| s.result == StepResult::WouldSend);
            let report = self.step(step, fields, &key, &captures, pending).await;
            captures.insert(step.name.clone(), report.captures.clone());
            steps.push(report);
        }
        RecordReport { line, key: Some(key), steps, error: None }
    }

    /// Renders and identifies one step, then executes it (or previews it in a dry run).
    /// `pending`: a dry run has an earlier step that would be sent, whose captures are not
    /// known yet.
    async fn step(
        &self,
        step: &Step,
        fields: &Map<String, Value>,
        pk: &str,
        captures: &HashMap<String, Map<String, Value>>,
        pending: bool,
    ) -> StepReport {
        let stem = self.stem(&step.name, pk);
        let ctx = Context { record: fields, steps: captures, key: &stem };
        let base = match call::render(step, Variant::Create, &ctx) {
            Ok(call) => call,
            Err(_) if pending => {
                println!(
                    "would send {} {} for {pk} (with values from the answers of earlier steps)",
                    step.method, step.url
                );
                return StepReport::new(&step.name, StepResult::WouldSend);
            }
            Err(e) => return StepReport::review(&step.name, StepResult::NeedsReview, format!("not sent: {e}")),
        };
        let fingerprint = call::fingerprint(step.key_strategy, pk, &base);
        let key = call::idempotency_key(step.key_strategy, &stem, &fingerprint);
        let id = RecordId::new(self.flow.scope(&step.name), "", pk);
        let unit = Unit { step, fields, captures, id, fingerprint, stem, key, base };
        if self.dry_run { self.preview(&unit).await } else { self.guarded(&unit).await }
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
            let claim = match self.claim(unit).await {
                Ok(claim) => claim,
                Err(e) => return StepReport::review(&unit.step.name, StepResult::Failed, e.to_string()),
            };
            let (reason, token) = match (claim.decision, claim.token) {
                (Decision::Execute(reason), Some(token)) => (reason, token),
                // Another runner holds the step: wait for it to finish (or its lease to run out).
                (Decision::InFlight, _) if Instant::now() < waiting_until => {
                    tokio::time::sleep(pause.next_pause()).await;
                    continue;
                }
                (decision, _) => return settled(report, decision, claim.record.as_ref()),
            };
            if reason == ExecuteReason::Changed {
                report.result = StepResult::Resent;
            }
            let so_far = claim.record.as_ref().map_or(1, |r| r.attempt_count);
            let last_chance = match self.attempts {
                Attempts::Lifetime(limit) if so_far > u64::from(limit) => {
                    let error = claim.record.as_ref().and_then(|r| r.error_summary.clone()).unwrap_or_default();
                    let error = format!("gave up after {limit} attempts; the last: {error}");
                    let outcome = Outcome::NeedsReview { error: error.clone() };
                    owner::finish(self.store.as_ref(), &unit.id, token, outcome, |_| {}).await;
                    return StepReport::review(&unit.step.name, StepResult::NeedsReview, error);
                }
                Attempts::Lifetime(limit) => so_far >= u64::from(limit),
                Attempts::PerRun => false,
            };
            // A claimed record carries the previous answer when the store kept it (today: a
            // changed record); a later claim of this run without it keeps what was known.
            let carried = call::stored_captures(claim.record.as_ref().and_then(|r| r.response.as_ref()));
            if !carried.is_empty() {
                known = carried;
            }
            attempts += 1;
            let verdict = self.attempt(unit, token, &known, last_chance).await;
            report.calls += u64::from(verdict.sent);
            report.attempts += 1;
            report.status = verdict.status;
            let max_attempts = if self.attempts == Attempts::PerRun { self.flow.max_attempts } else { 1 };
            if attempts < max_attempts && worth_another_attempt(unit.step, &verdict) {
                tokio::time::sleep(call::backoff(attempts, verdict.retry_after)).await;
                continue;
            }
            return finished(report, verdict);
        }
    }

    /// One call under a claim: rendered (as an update once captures are known), sent with
    /// the lease renewed meanwhile, judged, and recorded. On the `last_chance` a retryable
    /// failure is recorded as `needs_review`.
    async fn attempt(
        &self,
        unit: &Unit<'_>,
        token: LeaseToken,
        known: &Map<String, Value>,
        last_chance: bool,
    ) -> Verdict {
        let renewal = owner::keep_alive(self.store.clone(), unit.id.clone(), token, self.lease);
        let call = match self.request(unit, known) {
            Ok(call) => call,
            Err(error) => {
                let error = format!("not sent: {error}");
                let verdict = Verdict {
                    outcome: Outcome::NeedsReview { error },
                    captures: Map::new(),
                    status: None,
                    retryable: false,
                    retry_after: None,
                    sent: false,
                };
                drop(renewal);
                owner::finish(self.store.as_ref(), &unit.id, token, verdict.outcome.clone(), |_| {}).await;
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
        if let (true, Outcome::Retryable { error }) = (last_chance, &verdict.outcome) {
            let error = format!("{error}; gave up after {} attempts", self.flow.max_attempts);
            verdict.outcome = Outcome::NeedsReview { error };
            verdict.retryable = false;
        }
        if !matches!(verdict.outcome, Outcome::Completed(_)) {
            tracing::debug!(scope = %unit.id.scope, status = verdict.outcome.status().as_str(), "a step did not complete");
        }
        owner::finish(self.store.as_ref(), &unit.id, token, verdict.outcome.clone(), |_| {}).await;
        verdict
    }

    /// The request to send: `when_known` once this step has captured values, else the create.
    fn request(&self, unit: &Unit<'_>, known: &Map<String, Value>) -> Result<Call, String> {
        if known.is_empty() || unit.step.when_known.is_none() {
            return Ok(unit.base.clone());
        }
        let mut steps = unit.captures.clone();
        steps.insert(unit.step.name.clone(), known.clone());
        let ctx = Context { record: unit.fields, steps: &steps, key: &unit.stem };
        call::render(unit.step, Variant::Update, &ctx)
    }

    /// `--dry-run`: the same decision, made on what the store holds (read only).
    async fn preview(&self, unit: &Unit<'_>) -> StepReport {
        let report = StepReport::new(&unit.step.name, StepResult::WouldSend);
        let existing = match self.store.get(&unit.id).await {
            Ok(existing) => existing,
            Err(e) => return StepReport::review(&unit.step.name, StepResult::Failed, e.to_string()),
        };
        let decision = decide(existing.as_ref(), &self.intent(unit), policy(unit.step));
        let Decision::Execute(reason) = decision else { return settled(report, decision, existing.as_ref()) };
        let known = match reason {
            ExecuteReason::Changed => call::stored_captures(existing.as_ref().and_then(|r| r.response.as_ref())),
            _ => Map::new(),
        };
        let call = self.request(unit, &known).unwrap_or_else(|_| unit.base.clone());
        let header = match &unit.step.idempotency_header {
            Some(name) => format!(" [{name}: {}]", unit.key),
            None => String::new(),
        };
        println!("would send {} {}{header} {}", call.method, call.url, call.body);
        StepReport { captures: known, ..report }
    }

    fn intent(&self, unit: &Unit<'_>) -> Intent {
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

    /// Claims a step, retrying a store outage for a few seconds.
    async fn claim(&self, unit: &Unit<'_>) -> Result<Claim, store::Error> {
        let mut pause = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match self.store.claim(&self.intent(unit), policy(unit.step)).await {
                Err(error) if error.is_retryable() && tries < 5 => {
                    tracing::warn!(%error, "store unavailable; will try again");
                    tries += 1;
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                other => return other,
            }
        }
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

/// A retryable failure may be tried again now; so may a call that was lost, when re-sending
/// it is safe (the next claim then re-executes it: the policy says `on_unknown = Retry`).
fn worth_another_attempt(step: &Step, verdict: &Verdict) -> bool {
    match &verdict.outcome {
        Outcome::Retryable { .. } => verdict.retryable,
        Outcome::Unknown { .. } => unknown_is_safe(step),
        _ => false,
    }
}

/// The claim policy of a step: an unknown outcome is re-executed only when that is safe,
/// and a changed record is sent again only with `resend_on_change`.
fn policy(step: &Step) -> ClaimPolicy {
    ClaimPolicy {
        on_unknown: if unknown_is_safe(step) { OnUnknown::Retry } else { OnUnknown::Review },
        on_change: if step.resend_on_change { OnChange::Resend } else { OnChange::Reject },
        // A re-run reads its ledger: skipping a step already sent writes nothing.
        replays: Replays::Ignore,
    }
}

/// The report of a step the store did not let execute.
fn settled(mut report: StepReport, decision: Decision, record: Option<&Record>) -> StepReport {
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
        Outcome::Completed(_) => report.captures = verdict.captures,
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

/// The report of a source line that is not a record.
fn bad_line(bad: source::BadRecord) -> RecordReport {
    RecordReport { line: bad.line, key: None, steps: Vec::new(), error: Some(bad.message) }
}

/// Counts a finished record, writes its report line and shows its problems.
fn record_done(
    done: Result<RecordReport, tokio::task::JoinError>,
    summary: &mut Summary,
    report: &mut Option<ReportFile>,
    bar: &indicatif::ProgressBar,
) -> std::io::Result<()> {
    let record = match done {
        Ok(record) => record,
        Err(e) => {
            // A panic in one record's task: count it, never stop the others.
            bar.suspend(|| eprintln!("idem: a record's task failed: {e}"));
            summary.needs_review += 1;
            return Ok(());
        }
    };
    summary.add(&record);
    bar.inc(1);
    bar.set_message(format!(
        "{} calls, {} already sent, {} need review",
        summary.calls_sent, summary.already_sent, summary.needs_review
    ));
    for line in output::problem_lines(&record) {
        bar.suspend(|| eprintln!("{line}"));
    }
    match report {
        Some(file) => file.write(&record),
        None => Ok(()),
    }
}

/// The store of a run. A dry run writes nothing, so a SQLite file that does not exist yet is
/// not created: an empty store in memory stands in for it.
async fn open_store(flow: &Flow, options: &Options) -> Result<Arc<dyn Store>, store::Error> {
    let url = options.store.as_deref().unwrap_or(&flow.store);
    if options.dry_run {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path);
            if !std::path::Path::new(path).exists() {
                return store::open("memory://").await;
            }
        }
    }
    // Another process opening the same SQLite file at the same moment (two runs started
    // together) holds it locked for a moment: worth a few more tries, as is a store outage.
    let mut pause = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));
    for _ in 0..8 {
        match store::open(url).await {
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, "cannot open the store yet; will try again");
                tokio::time::sleep(pause.next_pause()).await;
            }
            other => return other,
        }
    }
    store::open(url).await
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
    fn the_example_flow_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/orders-to-accounting.toml");
        let flow = flow::load(&path).expect("examples/ holds a valid flow");
        assert_eq!(flow.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["customer", "invoice", "email"]);
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

    /// A record whose steps the ledger shows as sent (a later step's request built from an
    /// earlier step's capture) is done without a claim; a changed one is to run.
    #[tokio::test]
    async fn triage_settles_records_sent_before_in_one_read() {
        let text = "flow = \"f\"\n[source]\njsonl = \"x\"\nprimary_key = [\"id\"]\n\
                    [[steps]]\nname = \"a\"\nurl = \"http://h/a\"\ncapture = { ref = \"/id\" }\n\
                    [[steps]]\nname = \"b\"\nurl = \"http://h/b/{{steps.a.ref}}\"\nkey_strategy = \"primary_key_hash\"\n";
        let flow = flow::parse(text).expect("a valid flow");
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::default());
        let engine = Engine::new(flow, store.clone(), false, Keys::Flow, Attempts::PerRun).expect("an engine");
        let fields = |id: &str, n: i64| {
            let Value::Object(map) = serde_json::json!({ "id": id, "n": n }) else { unreachable!() };
            map
        };
        // What a run that sent record "r1" left in the ledger.
        let mut captures = HashMap::new();
        for (step, answer) in engine.flow.steps.iter().zip([r#"{"captures":{"ref":"x-1"}}"#, r#"{"captures":{}}"#]) {
            let stem = engine.stem(&step.name, "r1");
            let ctx = Context { record: &fields("r1", 1), steps: &captures, key: &stem };
            let call = call::render(step, Variant::Create, &ctx).expect("renders");
            let unit = Unit {
                step,
                fields: &fields("r1", 1),
                captures: &captures,
                id: RecordId::new(engine.flow.scope(&step.name), "", "r1"),
                fingerprint: call::fingerprint(step.key_strategy, "r1", &call),
                stem: stem.clone(),
                key: stem.clone(),
                base: call,
            };
            let claim = store.claim(&engine.intent(&unit), policy(step)).await.expect("claims");
            let response =
                crate::core::StoredResponse { status: 201, headers: vec![], body: answer.into(), retained: true };
            let token = claim.token.expect("a lease");
            assert!(store.finish(&unit.id, token, Outcome::Completed(response), now_millis()).await.expect("finishes"));
            let stored = store.get(&unit.id).await.expect("reads").and_then(|r| r.response);
            captures.insert(step.name.clone(), call::stored_captures(stored.as_ref()));
        }
        let item = |id: &str, n: i64| Ok(SourceRecord { line: 1, fields: fields(id, n) });
        let triaged = engine.triage(vec![item("r1", 1), item("r1", 2), item("r2", 1)]).await;
        let Triage::Done(done) = &triaged[0] else { panic!("r1 was sent") };
        assert!(done.steps.iter().all(|s| s.result == StepResult::AlreadySent), "{done:?}");
        assert_eq!(done.steps[0].captures["ref"], "x-1");
        assert!(matches!(&triaged[1], Triage::Todo(_)), "the same key with other data: its claim decides");
        assert!(matches!(&triaged[2], Triage::Todo(_)), "never sent");
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
