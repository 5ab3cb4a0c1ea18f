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
//!
//! The engine is split along its seams: `Engine` and how a run starts (here);
//! `schedule.rs`, the records in flight; `triage.rs`, the re-run's batch check against the
//! ledger; `step.rs`, the state machine of one step (claim → attempt → finish, retries,
//! `when_known`, lost calls); `preview.rs`, `--dry-run`. What the user sees goes through
//! one [`Progress`].

mod preview;
mod schedule;
mod step;
mod triage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::call;
use super::flow::Flow;
use super::output::{ReportFile, Summary};
use super::progress::Progress;
use super::source;
use crate::backoff::Backoff;
use crate::store::{self, Store};

pub(crate) use step::unknown_is_safe;

/// How a run is changed from the command line.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Store URL instead of the flow's.
    pub store: Option<String>,
    /// Where to write one JSON line per record.
    pub report: Option<PathBuf>,
    /// Send, or only show what would be sent (`--dry-run`).
    pub mode: Mode,
}

/// Whether a run acts or only looks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Claim, send and record every step that is due.
    #[default]
    Send,
    /// `--dry-run`: print what would be sent; send nothing, write nothing to the store.
    DryRun,
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
    /// The TLS configuration cannot be used (`SSL_CERT_FILE`).
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

/// What `idem` exits with: a source that cannot be read as written and a report file that
/// cannot be written are bad input; the store says for itself.
impl From<Error> for crate::host::Error {
    fn from(error: Error) -> Self {
        let bad_input = match &error {
            Error::Source(e) => !e.is_retryable(),
            Error::Store(e) => e.is_bad_input(),
            Error::Report { .. } => true,
            Error::Client(_) => false,
            // Only a file the user named (`SSL_CERT_FILE`) can make it unusable.
            Error::Tls(_) => true,
        };
        if bad_input { Self::BadInput(error.into()) } else { Self::Failed(error.into()) }
    }
}

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
    let engine = Engine::new(flow, store, options.mode, Keys::Flow, Attempts::PerRun)?;
    let summary = Arc::new(engine.reporting_to(Progress::terminal())).drive(records, report, stop).await;
    match (summary, &options.report) {
        (Ok(summary), _) => Ok(summary),
        (Err(source), Some(path)) => Err(Error::Report { path: path.clone(), source }),
        (Err(source), None) => Err(Error::Report { path: PathBuf::from("-"), source }),
    }
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
    mode: Mode,
    keys: Keys,
    attempts: Attempts,
    /// Where the user is told what happens: a terminal for `idem run`, quiet for a consumer.
    progress: Progress,
}

impl Engine {
    /// An engine for `flow`'s steps on `store`, reporting to nobody ([`Progress::Quiet`]).
    /// `keys` and `attempts` are a runner's (`Keys::Flow`, `Attempts::PerRun`) or a
    /// consumer's.
    pub(crate) fn new(
        flow: Flow,
        store: Arc<dyn Store>,
        mode: Mode,
        keys: Keys,
        attempts: Attempts,
    ) -> Result<Self, Error> {
        let http = crate::tls::http_client_builder()?.build().map_err(|e| Error::Client(e.to_string()))?;
        let limiter = flow
            .rate_limit
            .filter(|rate| *rate > 0.0)
            .and_then(|rate| Quota::with_period(Duration::from_secs_f64(1.0 / rate)))
            .map(RateLimiter::direct);
        let lease = crate::verify::lease_for(flow.timeout);
        let progress = Progress::Quiet;
        Ok(Self { flow, store, http, limiter, lease, mode, keys, attempts, progress })
    }

    /// The same engine, telling `progress` what happens.
    pub(crate) fn reporting_to(self, progress: Progress) -> Self {
        Self { progress, ..self }
    }

    /// `{{key}}` of a step: the idempotency key without the fingerprint suffix.
    fn stem(&self, step: &str, pk: &str) -> String {
        match self.keys {
            Keys::Flow => call::key_stem(&self.flow.name, step, pk),
            Keys::MessageId => call::message_key(pk),
        }
    }
}

/// The store of a run. A dry run writes nothing, so a SQLite file that does not exist yet is
/// not created: an empty store in memory stands in for it.
async fn open_store(flow: &Flow, options: &Options) -> Result<Arc<dyn Store>, store::Error> {
    let url = options.store.as_deref().unwrap_or(&flow.store);
    if options.mode == Mode::DryRun {
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
    use crate::runner::flow;

    #[test]
    fn the_example_flow_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/orders-to-accounting.toml");
        let flow = flow::load(&path).expect("examples/ holds a valid flow");
        assert_eq!(flow.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["customer", "invoice", "email"]);
    }
}
