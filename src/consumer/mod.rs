//! `idem consume`: the idempotent consumer for at-least-once brokers (SPEC §6).
//!
//! A broker task ([`nats`], [`rabbitmq`], `kafka`, `sqs`) feeds [`Inbound`] messages; each is decided and
//! delivered by the runner's engine (one step, `[deliver]`, or a flow's steps) under the
//! same records, decision and stores as `idem run`: the message id is the unit's key, its
//! records are `consumer:{subscriber}` (a flow's steps: `consumer:{subscriber}:{step}`),
//! and the endpoint receives the message id as its `Idempotency-Key`. Only then is the
//! message settled:
//!
//! | what happened | decision label | the broker is told |
//! |---|---|---|
//! | delivered now | `delivered` | ack |
//! | delivered before (a redelivery, a copy) | `duplicate` | ack |
//! | not newer than its object's last version | `stale` | ack |
//! | retryable failure, attempts left | `retry` | nak with backoff |
//! | another consumer is delivering it | `in_flight` | nak with a delay |
//! | sent, never answered, re-sending is safe | `retry` | nak with backoff (the next delivery re-sends under the same key) |
//! | sent, never answered, not safe to re-send | `unknown` | term / dead-letter; the record stays `outcome_unknown` |
//! | `max_attempts` reached, or a 4xx | `needs_review` | term / dead-letter |
//! | not a JSON object, no id, no version | `malformed` | term / dead-letter, a `needs_review` record |
//! | the store is unreachable | `store_unavailable` | nak with a delay |

pub mod config;
pub mod guard;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod nats;
pub mod postgres;
pub mod rabbitmq;
#[cfg(feature = "sqs")]
pub mod sqs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use self::config::{Broker, Consumer, MessageId};
use self::guard::{Check, VersionGuard};
use crate::backoff::Backoff;
use crate::core::units::millis;
use crate::core::{ClaimPolicy, Decision, Fingerprint, Intent, Outcome, RecordId, decide_again};
use crate::host::{self, Error};
use crate::runner::engine::{Attempts, Engine, Keys, Mode, unknown_is_safe};
use crate::runner::flow::{Flow, SourceSpec};
use crate::runner::output::{RecordReport, StepResult};
use crate::runner::source::{Input, Source};
use crate::store::clock::Clock;
use crate::store::postgres::transaction::Transactional;
use crate::store::{self, Store, now_millis, owner};

/// The pauses between a broker's reconnection attempts.
const RECONNECT: Backoff = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(30));

/// Runs `beat` every third of `period` until the returned handle is dropped: how a
/// delivery keeps the broker from handing its message to another consumer while it runs
/// (NATS in-progress acknowledgements, SQS visibility).
fn heartbeat<F>(period: Duration, mut beat: impl FnMut() -> F + Send + 'static) -> AbortOnDropHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(period / 3).await;
            beat().await;
        }
    }))
}

/// `idem consume` arguments.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// The consumer file (TOML).
    pub consumer: PathBuf,
    /// Store URL, instead of the file's `store`.
    #[arg(long)]
    pub store: Option<String>,
}

/// One message as the broker delivered it.
pub struct Inbound {
    /// The broker's id of the message: `Nats-Msg-Id`, the AMQP `message_id` property,
    /// Kafka's `topic/partition/offset`, SQS's `MessageDeduplicationId` or `MessageId`.
    pub header_id: Option<String>,
    /// The body.
    pub payload: Bytes,
    /// How many times the broker has delivered it (1 the first time), when it says.
    pub deliveries: u64,
    /// How to tell the broker the outcome.
    pub settle: Box<dyn Settle>,
}

/// Telling the broker what became of a message.
#[async_trait::async_trait]
pub trait Settle: Send {
    /// Done (delivered, or a duplicate to skip): never deliver it again.
    async fn ack(self: Box<Self>) -> Result<(), String>;
    /// Deliver it again after `after`.
    async fn retry(self: Box<Self>, after: Duration) -> Result<(), String>;
    /// Poison: never deliver it again; dead-letter it where the broker can.
    async fn reject(self: Box<Self>) -> Result<(), String>;
}

/// What to tell the broker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Disposition {
    /// Acknowledge.
    Ack,
    /// Redeliver after a delay.
    Retry(Duration),
    /// Terminate / dead-letter.
    Reject,
}

/// The `decision` label of `idem_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// Delivered now.
    Delivered,
    /// Delivered before.
    Duplicate,
    /// Older than its object's last applied version.
    Stale,
    /// Failed retryably; redelivered later.
    Retry,
    /// Another consumer holds it.
    InFlight,
    /// Sent, never answered, not safe to re-send.
    Unknown,
    /// A person must look at it.
    NeedsReview,
    /// Not a usable message.
    Malformed,
    /// The store could not be reached.
    StoreUnavailable,
}

impl Label {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Delivered => "delivered",
            Label::Duplicate => "duplicate",
            Label::Stale => "stale",
            Label::Retry => "retry",
            Label::InFlight => "in_flight",
            Label::Unknown => "unknown",
            Label::NeedsReview => "needs_review",
            Label::Malformed => "malformed",
            Label::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Consumes until `shutdown`: then no new message is taken, the messages in flight are
/// delivered and settled, and the broker connection closes.
pub async fn run(consumer: Consumer, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let stopping = host::cancel_on(shutdown);
    let (store, sink) = match &consumer.postgres {
        None => match host::open_store(&consumer.store, &stopping).await? {
            Some(store) => (store, None),
            None => return Ok(()),
        },
        Some(target) => {
            let open = |url: String| async move { Transactional::open(&url).await };
            let Some((transactional, store)) = host::open_with(&consumer.store, &stopping, open).await? else {
                return Ok(());
            };
            let settings = postgres::Settings {
                scope: format!("consumer:{}", consumer.subscriber),
                retention: consumer.retention,
                lease: consumer.timeout * 2 + Duration::from_secs(1),
                max_attempts: consumer.max_attempts,
            };
            let sink = postgres::Sink::prepare(transactional, store.clone(), target.clone(), settings).await?;
            (store, Some(sink))
        }
    };
    let metrics = crate::metrics::install();
    let handler = Arc::new(Handler::new(&consumer, store.clone(), sink)?);
    let closing = CancellationToken::new();
    let (sender, mut inbox) = mpsc::channel::<Inbound>(1);
    let feeder = match &consumer.broker {
        Broker::Nats { url, stream, subject, durable, ack_wait } => {
            let source = nats::Nats {
                url: url.clone(),
                stream: stream.clone(),
                subject: subject.clone(),
                durable: durable.clone(),
                ack_wait: *ack_wait,
                batch: consumer.concurrency,
            };
            tokio::spawn(nats::feed(source, consumer.subscriber.clone(), sender, closing.clone()))
        }
        Broker::Rabbit { url, queue, dead_letter_exchange } => {
            let source = rabbitmq::Rabbit {
                url: url.clone(),
                queue: queue.clone(),
                dead_letter_exchange: dead_letter_exchange.clone(),
                prefetch: u16::try_from(consumer.concurrency).unwrap_or(u16::MAX),
            };
            tokio::spawn(rabbitmq::feed(source, consumer.subscriber.clone(), sender, closing.clone()))
        }
        #[cfg(feature = "kafka")]
        Broker::Kafka(source) => {
            tokio::spawn(kafka::feed(source.clone(), consumer.subscriber.clone(), sender, closing.clone()))
        }
        #[cfg(feature = "sqs")]
        Broker::Sqs(source) => {
            tokio::spawn(sqs::feed(source.clone(), consumer.subscriber.clone(), sender, closing.clone()))
        }
        #[allow(unreachable_patterns)] // Refused by the file's validation when not built in.
        _ => return Err(Error::Reported("this idem was built without that broker".into())),
    };
    let admin = match consumer.admin {
        Some((address, token)) => {
            let listener = host::bind(address, "admin").await?;
            let address = listener.local_addr().map_err(|e| Error::failed("admin listener", e))?;
            let admin = crate::admin::Admin {
                store: store.clone(),
                metrics,
                token,
                routes: Vec::new(),
                lookups: crate::verify::Lookups::default(),
            };
            println!("idem consume {}: admin http://{address}", consumer.subscriber);
            Some(host::serve_admin(listener, admin, host::ADMIN_MAX_CONNECTIONS, closing.clone()))
        }
        None => None,
    };
    let purge = tokio::spawn(host::purge_loop(store.clone(), Duration::from_secs(60), closing.clone()));
    println!("idem consume {} ready", consumer.subscriber);
    tracing::info!(subscriber = %consumer.subscriber, store = %store::redact(&consumer.store), "idem consume ready");

    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stopping.cancelled() => break,
            Some(_) = running.join_next(), if running.len() >= consumer.concurrency => {}
            message = inbox.recv(), if running.len() < consumer.concurrency => match message {
                Some(message) => {
                    let handler = handler.clone();
                    running.spawn(async move { handler.settle(message).await });
                }
                None => break,
            },
        }
    }
    tracing::info!(in_flight = running.len(), "idem consume stopping: settling the messages in flight");
    while running.join_next().await.is_some() {}
    closing.cancel();
    drop(inbox);
    let _ = feeder.await;
    let _ = purge.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    tracing::info!("idem consume stopped");
    Ok(())
}

/// Where a message goes.
enum Target {
    /// Through the runner's engine: `[deliver]`'s call or a flow's steps.
    Steps(Engine),
    /// A statement in the store's database (`deliver.postgres`).
    Postgres(postgres::Sink),
}

/// Decides, delivers and settles messages: one per call, many at once.
pub struct Handler {
    subscriber: String,
    store: Arc<dyn Store>,
    target: Target,
    /// The scopes of the steps' records, in order.
    scopes: Vec<String>,
    /// The steps whose lost calls may be re-sent (their next delivery re-sends them).
    resendable: Vec<String>,
    message_id: MessageId,
    guard: Option<VersionGuard>,
    retention: Duration,
    counters: Counters,
}

impl Handler {
    /// The handler of `consumer`'s messages on `store`; `sink` when they go into PostgreSQL.
    pub fn new(consumer: &Consumer, store: Arc<dyn Store>, sink: Option<postgres::Sink>) -> Result<Self, Error> {
        let (name, keys) = if consumer.from_flow {
            (format!("consumer:{}", consumer.subscriber), Keys::Flow)
        } else {
            ("consumer".to_owned(), Keys::MessageId)
        };
        let flow = Flow {
            name,
            store: consumer.store.clone(),
            retention: consumer.retention,
            concurrency: consumer.concurrency,
            rate_limit: None,
            max_attempts: consumer.max_attempts,
            timeout: consumer.timeout,
            source: SourceSpec { input: Source::Jsonl(Input::Stdin), primary_key: Vec::new() },
            steps: consumer.steps.clone(),
        };
        let mut scopes: Vec<String> = flow.steps.iter().map(|s| flow.scope(&s.name)).collect();
        // A lost call is tried again on redelivery when re-sending it is safe, or when its
        // lookup may still settle it (a lookup that failed asks again next time).
        let resendable =
            flow.steps.iter().filter(|s| unknown_is_safe(s) || s.verify.is_some()).map(|s| s.name.clone()).collect();
        let lease = consumer.timeout * 2 + Duration::from_secs(1);
        let guard = consumer.version.clone().map(|pointers| {
            VersionGuard::new(pointers, &consumer.subscriber, store.clone(), consumer.retention, lease)
        });
        let target = match sink {
            Some(sink) => {
                scopes = vec![sink.scope().to_owned()];
                Target::Postgres(sink)
            }
            None => Target::Steps(Engine::new(
                flow,
                store.clone(),
                Mode::Send,
                keys,
                Attempts::Lifetime(consumer.max_attempts),
            )?),
        };
        Ok(Self {
            subscriber: consumer.subscriber.clone(),
            store,
            target,
            scopes,
            resendable,
            message_id: consumer.message_id.clone(),
            guard,
            retention: consumer.retention,
            counters: Counters::new(&consumer.subscriber),
        })
    }

    /// Handles one message and tells the broker.
    pub async fn settle(&self, message: Inbound) {
        let deliveries = message.deliveries;
        let (label, disposition) = self.handle(message.header_id.as_deref(), &message.payload, deliveries).await;
        self.counters.count(label);
        let settled = match disposition {
            Disposition::Ack => message.settle.ack().await,
            Disposition::Retry(after) => message.settle.retry(after).await,
            Disposition::Reject => message.settle.reject().await,
        };
        if let Err(error) = settled {
            // The broker redelivers it; the store recognises it then.
            tracing::warn!(%error, decision = label.as_str(), "could not settle a message with the broker");
        }
    }

    /// Decides and delivers one message.
    pub async fn handle(&self, header_id: Option<&str>, payload: &[u8], deliveries: u64) -> (Label, Disposition) {
        let fields = match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => return self.malformed(header_id, payload, "the message is JSON but not an object").await,
            Err(e) => return self.malformed(header_id, payload, &format!("the message is not JSON ({e})")).await,
        };
        let id = match (&self.message_id, header_id) {
            (MessageId::Header, Some(id)) if !id.is_empty() => id.to_owned(),
            (MessageId::Header, _) => return self.malformed(None, payload, "no message id header").await,
            (MessageId::Body(pointer), _) => match fields_pointer(&fields, pointer) {
                Some(Value::String(id)) if !id.is_empty() => id.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return self.malformed(None, payload, &format!("no message id at {pointer}")).await,
            },
        };
        let Some(guard) = &self.guard else {
            return self.deliver(&id, &fields, deliveries).await;
        };
        match self.already_delivered(&id).await {
            Ok(true) => return (Label::Duplicate, Disposition::Ack),
            Ok(false) => {}
            Err(error) => return self.store_unavailable(&error),
        }
        match guard.check(&fields).await {
            Check::Apply(holding) => {
                let (label, disposition) = self.deliver(&id, &fields, deliveries).await;
                if label == Label::Delivered {
                    guard.applied(holding).await;
                } else {
                    guard.release(holding).await;
                }
                (label, disposition)
            }
            Check::Stale => (Label::Stale, Disposition::Ack),
            Check::Busy => (Label::InFlight, Disposition::Retry(busy_delay())),
            Check::Malformed(why) => self.malformed(Some(&id), payload, &why).await,
            Check::Unavailable(error) => self.store_unavailable(&error),
        }
    }

    /// Runs the message through the steps and reads the outcome.
    async fn deliver(&self, id: &str, fields: &Map<String, Value>, deliveries: u64) -> (Label, Disposition) {
        let engine = match &self.target {
            Target::Steps(engine) => engine,
            Target::Postgres(sink) => return sink.deliver(id, fields, deliveries).await,
        };
        let report = engine.process_keyed(0, id.to_owned(), fields).await;
        let (label, disposition) = judge(&report, deliveries, &self.resendable);
        if matches!(label, Label::NeedsReview | Label::Unknown) {
            let why = report.steps.iter().find_map(|s| s.error.as_deref()).unwrap_or("");
            tracing::warn!(subscriber = %self.subscriber, message = %crate::core::key::hash_for_logs(id), decision = label.as_str(), error = why, "a message needs review");
        }
        (label, disposition)
    }

    /// True when every step of the message has its answer (a redelivery or a copy): the
    /// decision table says a claim of each step's record would replay it.
    async fn already_delivered(&self, id: &str) -> Result<bool, store::Error> {
        let now = now_millis();
        for scope in &self.scopes {
            let record = self.store.get(&RecordId::new(scope.clone(), "", id)).await?;
            // A step's policy never turns a record into a replay (it only picks between
            // re-executing and review for an unknown outcome), so the default serves all.
            let answered = record.is_some_and(|r| decide_again(&r, now, ClaimPolicy::default()).answered());
            if !answered {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The poison rule for a message that cannot be delivered at all: a `needs_review`
    /// record under its id (or, without one, the hash of its body) and a rejection. The body
    /// is never logged nor stored.
    async fn malformed(&self, id: Option<&str>, payload: &[u8], why: &str) -> (Label, Disposition) {
        let digest: [u8; 32] = Sha256::digest(payload).into();
        let key = id.map_or_else(|| format!("malformed:sha256:{}", hex::encode(digest)), str::to_owned);
        tracing::warn!(subscriber = %self.subscriber, message = %crate::core::key::hash_for_logs(&key), why, "a malformed message");
        let Some(scope) = self.scopes.first() else { return (Label::Malformed, Disposition::Reject) };
        let intent = Intent {
            id: RecordId::new(scope.clone(), "", key),
            fingerprint: Fingerprint(digest),
            now: now_millis(),
            ttl_ms: millis(self.retention),
            lease_ms: 30_000,
            correlation_id: None,
        };
        match self.store.claim(&intent, ClaimPolicy::default()).await {
            Ok(claim) => match (claim.decision, claim.token) {
                (Decision::Execute(_), Some(token)) => {
                    let outcome = Outcome::NeedsReview { error: format!("malformed message: {why}") };
                    owner::finish(self.store.as_ref(), &intent.id, token, outcome, Clock::System, |_| {}).await;
                    (Label::Malformed, Disposition::Reject)
                }
                // The id was delivered before, with a body that could be read.
                (Decision::Replay | Decision::NotRetained, _) => (Label::Duplicate, Disposition::Ack),
                _ => (Label::Malformed, Disposition::Reject),
            },
            Err(error) => self.store_unavailable(&error.to_string()),
        }
    }

    fn store_unavailable(&self, error: &dyn std::fmt::Display) -> (Label, Disposition) {
        tracing::warn!(subscriber = %self.subscriber, %error, "store unavailable; the message will be redelivered");
        (Label::StoreUnavailable, Disposition::Retry(Duration::from_secs(1)))
    }
}

/// How long a message waits when another consumer holds it.
fn busy_delay() -> Duration {
    Duration::from_millis(500)
}

/// The label and disposition of a delivered message, from the engine's report.
fn judge(report: &RecordReport, deliveries: u64, resendable: &[String]) -> (Label, Disposition) {
    let results: Vec<StepResult> = report.steps.iter().map(|s| s.result).collect();
    let any = |r: StepResult| results.contains(&r);
    if any(StepResult::NeedsReview) {
        return (Label::NeedsReview, Disposition::Reject);
    }
    if any(StepResult::InFlight) {
        return (Label::InFlight, Disposition::Retry(busy_delay()));
    }
    let lost = |s: &&crate::runner::output::StepReport| s.result == StepResult::Unknown;
    if report.steps.iter().filter(lost).any(|s| !resendable.contains(&s.step)) {
        // Not safe to re-send: the record stays `outcome_unknown` for a person.
        return (Label::Unknown, Disposition::Reject);
    }
    if any(StepResult::Failed) || any(StepResult::Unknown) {
        // The next delivery claims the step again (a retry recovery, or a safe re-send of a
        // lost call under the same key).
        let after = crate::runner::call::backoff(u32::try_from(deliveries).unwrap_or(u32::MAX), None);
        return (Label::Retry, Disposition::Retry(after.max(Duration::from_millis(100))));
    }
    if results.iter().all(|r| *r == StepResult::AlreadySent) {
        return (Label::Duplicate, Disposition::Ack);
    }
    (Label::Delivered, Disposition::Ack)
}

fn fields_pointer<'a>(fields: &'a Map<String, Value>, pointer: &str) -> Option<&'a Value> {
    let rest = pointer.strip_prefix('/')?;
    let (first, more) = rest.split_once('/').map_or((rest, None), |(a, b)| (a, Some(b)));
    let first = first.replace("~1", "/").replace("~0", "~");
    let value = fields.get(&first)?;
    match more {
        None => Some(value),
        Some(more) => value.pointer(&format!("/{more}")),
    }
}

/// `idem_messages_total{subscriber,decision}` handles, registered once.
struct Counters(Vec<(Label, metrics::Counter)>);

impl Counters {
    fn new(subscriber: &str) -> Self {
        let labels = [
            Label::Delivered,
            Label::Duplicate,
            Label::Stale,
            Label::Retry,
            Label::InFlight,
            Label::Unknown,
            Label::NeedsReview,
            Label::Malformed,
            Label::StoreUnavailable,
        ];
        Self(
            labels
                .into_iter()
                .map(|label| {
                    let counter = metrics::counter!(
                        crate::metrics::MESSAGES,
                        "subscriber" => subscriber.to_owned(),
                        "decision" => label.as_str()
                    );
                    (label, counter)
                })
                .collect(),
        )
    }

    fn count(&self, label: Label) {
        if let Some((_, counter)) = self.0.iter().find(|(l, _)| *l == label) {
            counter.increment(1);
        }
    }
}
