//! The consumer file of `idem consume` (SPEC §6): the raw TOML tree, and its validation into
//! a [`Consumer`] with every problem named by its key path.
//!
//! `[deliver]` is a runner step in all but name (same templates, same checks, same
//! messages), so it is validated by the runner's own code; `deliver.flow` borrows the steps
//! of a flow file instead. Reading, `[admin]` and the checks are the [`crate::config`]
//! toolkit's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{self, Alternative, Kind, Problems, RawAdmin, WordOr, check, parse_toml};
use crate::core::OnUnknown;
use crate::runner::flow::{self, RawFlow, RawStep, Step};

/// The consumer file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    /// The subscriber's name: records are `consumer:{subscriber}`.
    pub subscriber: Option<String>,
    /// Store URL.
    pub store: Option<String>,
    /// Deliveries of one message before it is `needs_review`.
    pub max_attempts: Option<i64>,
    /// How long a message id (and an object's last version) is remembered.
    pub retention: Option<String>,
    /// Messages in flight at once (and the broker's prefetch).
    pub concurrency: Option<i64>,
    /// Time limit of one call to the endpoint.
    pub timeout: Option<String>,
    /// `[source]`.
    pub source: Option<RawSource>,
    /// `[deliver]`.
    pub deliver: Option<RawDeliver>,
    /// `[admin]`: metrics and the records API on a listener of their own (off by default).
    pub admin: Option<RawAdmin>,
}

/// `[source]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// `nats = { … }`.
    pub nats: Option<RawNats>,
    /// `rabbitmq = { … }`.
    pub rabbitmq: Option<RawRabbit>,
    /// `kafka = { … }`.
    pub kafka: Option<RawKafka>,
    /// `sqs = { … }`.
    pub sqs: Option<RawSqs>,
    /// `"header"`, `"offset"` (Kafka) or `{ body = "/pointer" }`.
    pub message_id: Option<RawMessageId>,
}

/// `source.nats`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNats {
    /// `nats://host:port`.
    pub url: Option<String>,
    /// The JetStream stream (created when missing).
    pub stream: Option<String>,
    /// The subject filter.
    pub subject: Option<String>,
    /// The durable pull consumer's name (created when missing).
    pub durable: Option<String>,
    /// How long the server waits for an ack before it redelivers.
    pub ack_wait: Option<String>,
}

/// `source.rabbitmq`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRabbit {
    /// `amqp://user:password@host:port/vhost`.
    pub url: Option<String>,
    /// The queue (declared durable when missing).
    pub queue: Option<String>,
    /// Where rejected (poison) messages go, set on a queue idem declares.
    pub dead_letter_exchange: Option<String>,
}

/// `source.kafka`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: Option<String>,
    /// The topic (created when missing, with the broker's defaults).
    pub topic: Option<String>,
    /// The consumer group.
    pub group: Option<String>,
    /// Where `needs_review` messages are published.
    pub dead_letter_topic: Option<String>,
    /// How long the group waits for a silent member before it hands its partitions on.
    pub session_timeout: Option<String>,
}

/// `source.sqs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSqs {
    /// The queue's URL (created when missing, named after its last path segment).
    pub queue_url: Option<String>,
    /// Another endpoint than AWS's (a local or compatible server).
    pub endpoint: Option<String>,
    /// The AWS region (default: the environment's, else `us-east-1`).
    pub region: Option<String>,
    /// How long a received message stays invisible to others; extended while it runs.
    pub visibility_timeout: Option<String>,
    /// How long one receive waits for messages (long polling, at most 20 s).
    pub wait_time: Option<String>,
}

/// `source.message_id`: `"header"` or `{ body = "/id" }`.
pub type RawMessageId = WordOr<RawMessageBody>;

/// `message_id = { body = "/id" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMessageBody {
    /// JSON pointer into the message.
    pub body: String,
}

impl Alternative for RawMessageBody {
    const EXPECTED: &'static str = "\"header\" or { body = \"/id\" }";
}

/// `[deliver]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeliver {
    /// HTTP method.
    pub method: Option<String>,
    /// URL template.
    pub url: Option<String>,
    /// Body template (default: the message).
    pub body: Option<toml::Value>,
    /// Extra headers.
    pub headers: Option<BTreeMap<String, String>>,
    /// The header carrying the message id.
    pub idempotency_header: Option<String>,
    /// Values of the answer kept in the ledger.
    pub capture: Option<BTreeMap<String, String>>,
    /// A delivery sent but never answered: `"retry"` or `"review"`.
    pub on_unknown: Option<OnUnknown>,
    /// A flow file whose steps each message runs through, instead of one call.
    pub flow: Option<String>,
    /// The ordering guard.
    pub version: Option<RawVersion>,
    /// Run a statement in the store's database instead of a call.
    pub postgres: Option<super::postgres::RawPostgres>,
    /// The lookup that settles a delivery sent but never answered, on redelivery.
    pub verify: Option<crate::verify::RawVerify>,
}

/// `deliver.version`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    /// JSON pointer to the object's id.
    pub object: Option<String>,
    /// JSON pointer to its version (a number, or a string that sorts).
    pub version: Option<String>,
}

/// A validated consumer.
#[derive(Clone, Debug)]
pub struct Consumer {
    /// The subscriber's name.
    pub subscriber: String,
    /// Store URL.
    pub store: String,
    /// Deliveries of one message before it is `needs_review`.
    pub max_attempts: u32,
    /// How long message ids and versions are remembered.
    pub retention: Duration,
    /// Messages in flight at once.
    pub concurrency: usize,
    /// Time limit of one call.
    pub timeout: Duration,
    /// The broker.
    pub broker: Broker,
    /// Where the message id comes from.
    pub message_id: MessageId,
    /// The steps a message runs through: one (`[deliver]`), or a flow's.
    pub steps: Vec<Step>,
    /// True when the steps come from `deliver.flow` (their keys are then the runner's).
    pub from_flow: bool,
    /// The ordering guard.
    pub version: Option<VersionPointers>,
    /// `deliver.postgres`: the statement each message runs, in one transaction with its
    /// record (then `steps` is empty).
    pub postgres: Option<super::postgres::Target>,
    /// The admin listener and its token.
    pub admin: Option<(SocketAddr, Option<String>)>,
}

/// The broker and what to consume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Broker {
    /// NATS JetStream, durable pull consumer.
    Nats {
        /// Server URL.
        url: String,
        /// Stream name.
        stream: String,
        /// Subject filter.
        subject: String,
        /// Durable consumer name.
        durable: String,
        /// Redelivery after this long without an ack.
        ack_wait: Duration,
    },
    /// RabbitMQ, manual acks.
    Rabbit {
        /// AMQP URL.
        url: String,
        /// Queue name.
        queue: String,
        /// Dead-letter exchange for a queue idem declares.
        dead_letter_exchange: Option<String>,
    },
    /// Kafka, a consumer group committing offsets by hand.
    Kafka(Kafka),
    /// Amazon SQS (or a server that speaks its API).
    Sqs(Sqs),
}

/// `source.kafka`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kafka {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Where `needs_review` messages are published.
    pub dead_letter_topic: Option<String>,
    /// The group's session timeout.
    pub session_timeout: Duration,
}

/// `source.sqs`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sqs {
    /// The queue's URL.
    pub queue_url: String,
    /// A non-AWS endpoint.
    pub endpoint: Option<String>,
    /// The region, when the file names one.
    pub region: Option<String>,
    /// The visibility timeout of a received message.
    pub visibility_timeout: Duration,
    /// Long polling's wait.
    pub wait_time: Duration,
}

/// Where a message's id is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageId {
    /// The broker's id of the message: `Nats-Msg-Id`, the AMQP `message_id` property,
    /// Kafka's `topic/partition/offset` (`"offset"`), SQS's `MessageDeduplicationId` or
    /// `MessageId`.
    Header,
    /// A JSON pointer into the message.
    Body(String),
}

/// `deliver.version`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionPointers {
    /// Pointer to the object's id.
    pub object: String,
    /// Pointer to its version.
    pub version: String,
}

/// Reads and validates a consumer file; `deliver.flow` is resolved against its directory.
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Consumer, config::Error> {
    let raw: RawConsumer = config::read_toml(path, Kind::Consumer)?;
    raw.validate(path.parent().unwrap_or(Path::new("")), env).map_err(|e| e.in_file(path))
}

impl RawConsumer {
    /// Validates the tree; `base_dir` is where a relative `deliver.flow` starts.
    pub fn validate(self, base_dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Consumer, config::Error> {
        let mut p = Problems::default();
        let subscriber = p.required("subscriber", self.subscriber, "subscriber = \"orders-sync\"");
        let subscriber = subscriber.and_then(|s| p.check("subscriber", name(&s).map(|()| s)));
        let store = self.store.unwrap_or_else(|| flow::DEFAULT_STORE.into());
        if store.trim().is_empty() {
            p.push("store", "must not be empty");
        }
        let max_attempts = p.check("max_attempts", check::bounded(self.max_attempts.unwrap_or(5), 1, 1000));
        let retention = p.check("retention", check::duration(self.retention.as_deref().unwrap_or("7d")));
        let concurrency = p.check("concurrency", check::bounded(self.concurrency.unwrap_or(16), 1, 4096));
        let timeout = p.check("timeout", check::duration(self.timeout.as_deref().unwrap_or(config::DEFAULT_TIMEOUT)));
        let source = p.required("source", self.source, "[source] with nats = { url, stream, subject, durable }");
        let (broker, message_id) = match source {
            Some(source) => source.validate(&mut p),
            None => (None, None),
        };
        let deliver = p.required("deliver", self.deliver, "[deliver] with url = \"http://127.0.0.1:9000/orders\"");
        let (steps, from_flow, version, postgres) = match (deliver, &subscriber) {
            (Some(deliver), Some(subscriber)) => deliver.validate_any(subscriber, &store, base_dir, &mut p),
            _ => (None, false, None, None),
        };
        // `[admin]` is off unless the file has the table; then its `listen` is required.
        let admin = self.admin.and_then(|admin| admin.validate(None, env, &mut p));
        let consumer = || {
            Some(Consumer {
                subscriber: subscriber?,
                store,
                max_attempts: max_attempts?,
                retention: retention?,
                concurrency: concurrency?,
                timeout: timeout?,
                broker: broker?,
                message_id: message_id?,
                steps: steps?,
                from_flow,
                version,
                postgres,
                admin: admin.map(|admin| (admin.listen, admin.token)),
            })
        };
        p.finish(Kind::Consumer, consumer())
    }
}

impl RawSource {
    fn validate(self, p: &mut Problems) -> (Option<Broker>, Option<MessageId>) {
        let given: Vec<&str> = [
            ("nats", self.nats.is_some()),
            ("rabbitmq", self.rabbitmq.is_some()),
            ("kafka", self.kafka.is_some()),
            ("sqs", self.sqs.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        let kafka = self.kafka.is_some();
        let broker = if given.len() > 1 {
            p.push("source", format_args!("{} are given together; give exactly one", given.join(" and ")));
            None
        } else if let Some(nats) = self.nats {
            nats.validate(p)
        } else if let Some(rabbit) = self.rabbitmq {
            rabbit.validate(p)
        } else if let Some(kafka) = self.kafka {
            kafka.validate(p)
        } else if let Some(sqs) = self.sqs {
            sqs.validate(p)
        } else {
            p.push(
                "source",
                "give nats = { url, stream, subject, durable }, rabbitmq = { url, queue }, \
                 kafka = { brokers, topic, group } or sqs = { queue_url }",
            );
            None
        };
        (broker, message_id(self.message_id, kafka, p))
    }
}

/// `source.message_id`. Kafka has no id header: there the default is `{ body = "/id" }`,
/// and `"offset"` names a message by its place (`topic/partition/offset`).
fn message_id(raw: Option<RawMessageId>, kafka: bool, p: &mut Problems) -> Option<MessageId> {
    match raw {
        None if kafka => Some(MessageId::Body("/id".into())),
        None => Some(MessageId::Header),
        Some(WordOr::Word(name)) if name == if kafka { "offset" } else { "header" } => Some(MessageId::Header),
        Some(WordOr::Word(name)) if kafka => {
            p.push(
                "source.message_id",
                format_args!("{name:?}: say \"offset\" or {{ body = \"/id\" }} (Kafka has no id header)"),
            );
            None
        }
        Some(WordOr::Word(name)) => {
            p.push("source.message_id", format_args!("{name:?}: say {}", RawMessageBody::EXPECTED));
            None
        }
        Some(WordOr::Table(RawMessageBody { body })) => {
            p.check("source.message_id.body", check::pointer(&body)).map(|()| MessageId::Body(body))
        }
    }
}

impl RawNats {
    fn validate(self, p: &mut Problems) -> Option<Broker> {
        let url = p.required("source.nats.url", self.url, "url = \"nats://127.0.0.1:4222\"");
        let url = url.and_then(|u| p.check("source.nats.url", check::url(&u, &["nats", "tls"]).map(|_| u)));
        let stream = p.required("source.nats.stream", self.stream, "stream = \"ORDERS\"");
        let stream = stream.and_then(|s| p.check("source.nats.stream", nats_name(&s).map(|()| s)));
        let subject = p.required("source.nats.subject", self.subject, "subject = \"orders.>\"");
        let subject = subject.and_then(|s| {
            let ok = !s.is_empty() && !s.contains(char::is_whitespace) && !s.split('.').any(str::is_empty);
            p.check("source.nats.subject", if ok { Ok(s) } else { Err("not a subject, e.g. \"orders.>\"".into()) })
        });
        let durable = p.required("source.nats.durable", self.durable, "durable = \"orders-sync\"");
        let durable = durable.and_then(|d| p.check("source.nats.durable", nats_name(&d).map(|()| d)));
        let ack_wait = p.check("source.nats.ack_wait", check::duration(self.ack_wait.as_deref().unwrap_or("30s")));
        Some(Broker::Nats { url: url?, stream: stream?, subject: subject?, durable: durable?, ack_wait: ack_wait? })
    }
}

impl RawRabbit {
    fn validate(self, p: &mut Problems) -> Option<Broker> {
        let url = p.required("source.rabbitmq.url", self.url, "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"");
        let url = url.and_then(|u| p.check("source.rabbitmq.url", check::url(&u, &["amqp", "amqps"]).map(|_| u)));
        let queue = p.required("source.rabbitmq.queue", self.queue, "queue = \"orders\"");
        let queue = queue.and_then(|q| {
            let ok = !q.is_empty() && q.len() <= 255;
            p.check("source.rabbitmq.queue", if ok { Ok(q) } else { Err("1 to 255 bytes".into()) })
        });
        if self.dead_letter_exchange.as_deref().is_some_and(|x| x.len() > 255) {
            p.push("source.rabbitmq.dead_letter_exchange", "at most 255 bytes");
        }
        Some(Broker::Rabbit { url: url?, queue: queue?, dead_letter_exchange: self.dead_letter_exchange })
    }
}

impl RawKafka {
    fn validate(self, p: &mut Problems) -> Option<Broker> {
        if !cfg!(feature = "kafka") {
            p.push("source.kafka", "this idem was built without the kafka feature");
        }
        let brokers = p.required("source.kafka.brokers", self.brokers, "brokers = \"127.0.0.1:9092\"");
        let brokers = brokers.and_then(|b| p.check("source.kafka.brokers", kafka_brokers(&b).map(|()| b)));
        let topic = p.required("source.kafka.topic", self.topic, "topic = \"orders\"");
        let topic = topic.and_then(|t| p.check("source.kafka.topic", kafka_name(&t).map(|()| t)));
        let group = p.required("source.kafka.group", self.group, "group = \"orders-sync\"");
        let group = group.and_then(|g| {
            let ok = !g.is_empty() && g.len() <= 255;
            p.check("source.kafka.group", if ok { Ok(g) } else { Err("1 to 255 bytes".into()) })
        });
        let dead = self.dead_letter_topic;
        let dead = dead.and_then(|t| p.check("source.kafka.dead_letter_topic", kafka_name(&t).map(|()| t)));
        let session = self.session_timeout.as_deref().unwrap_or("45s");
        let session_timeout = p.check("source.kafka.session_timeout", check::duration(session));
        Some(Broker::Kafka(Kafka {
            brokers: brokers?,
            topic: topic?,
            group: group?,
            dead_letter_topic: dead,
            session_timeout: session_timeout?,
        }))
    }
}

impl RawSqs {
    fn validate(self, p: &mut Problems) -> Option<Broker> {
        if !cfg!(feature = "sqs") {
            p.push("source.sqs", "this idem was built without the sqs feature");
        }
        let example = "queue_url = \"https://sqs.eu-west-1.amazonaws.com/123456789012/orders\"";
        let queue_url = p.required("source.sqs.queue_url", self.queue_url, example);
        let queue_url = queue_url.and_then(|u| {
            let named = check::url(&u, &["https", "http"]).and_then(|url| {
                let name = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or("");
                if name.is_empty() { Err("the URL must end with the queue's name".to_owned()) } else { Ok(()) }
            });
            p.check("source.sqs.queue_url", named.map(|()| u))
        });
        let endpoint = self.endpoint;
        let endpoint =
            endpoint.and_then(|e| p.check("source.sqs.endpoint", check::url(&e, &["https", "http"]).map(|_| e)));
        if self.region.as_deref().is_some_and(str::is_empty) {
            p.push("source.sqs.region", "must not be empty");
        }
        let at = "source.sqs.visibility_timeout";
        let visibility = p.check(at, check::duration(self.visibility_timeout.as_deref().unwrap_or("30s")));
        let visibility = visibility.and_then(|v| {
            let ok = v >= Duration::from_secs(3) && v <= Duration::from_secs(12 * 3600);
            p.check(at, if ok { Ok(v) } else { Err("between 3s and 12h".into()) })
        });
        let wait = p.check("source.sqs.wait_time", check::duration(self.wait_time.as_deref().unwrap_or("20s")));
        let wait = wait.and_then(|w| {
            let ok = w <= Duration::from_secs(20);
            p.check(
                "source.sqs.wait_time",
                if ok { Ok(w) } else { Err("at most 20s, SQS's long polling limit".into()) },
            )
        });
        Some(Broker::Sqs(Sqs {
            queue_url: queue_url?,
            endpoint,
            region: self.region,
            visibility_timeout: visibility?,
            wait_time: wait?,
        }))
    }
}

fn kafka_brokers(s: &str) -> Result<(), String> {
    let address =
        |b: &str| b.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !s.is_empty() && s.split(',').all(address) { Ok(()) } else { Err(format!("{s:?}: host:port, comma-separated")) }
}

fn kafka_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 249 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok { Ok(()) } else { Err(format!("{s:?}: letters, digits, '-', '_' and '.' only (1 to 249)")) }
}

/// What `[deliver]` validates into: the steps, whether they come from a flow, the ordering
/// guard, and a PostgreSQL target.
type Delivery = (Option<Vec<Step>>, bool, Option<VersionPointers>, Option<super::postgres::Target>);

impl RawDeliver {
    /// `[deliver]` with a call, a flow or (`postgres`) a statement.
    fn validate_any(mut self, subscriber: &str, store: &str, base_dir: &Path, p: &mut Problems) -> Delivery {
        let Some(postgres) = self.postgres.take() else {
            let (steps, from_flow, version) = self.validate(subscriber, base_dir, p);
            return (steps, from_flow, version, None);
        };
        let version = self.version.take().and_then(|v| v.validate(p));
        let flow = self.flow.is_some().then_some("flow");
        for key in self.call_keys().into_iter().chain(flow) {
            p.push(
                &format!("deliver.{key}"),
                "does not go with deliver.postgres, which runs a statement instead of a call",
            );
        }
        (Some(Vec::new()), false, version, postgres.validate(store, p))
    }

    /// The keys of a call that are given.
    fn call_keys(&self) -> Vec<&'static str> {
        let keys = [
            ("method", self.method.is_some()),
            ("url", self.url.is_some()),
            ("body", self.body.is_some()),
            ("headers", self.headers.is_some()),
            ("idempotency_header", self.idempotency_header.is_some()),
            ("capture", self.capture.is_some()),
            ("on_unknown", self.on_unknown.is_some()),
            ("verify", self.verify.is_some()),
        ];
        keys.into_iter().filter(|(_, given)| *given).map(|(key, _)| key).collect()
    }

    /// The steps, whether they come from a flow, and the ordering guard.
    fn validate(
        mut self,
        subscriber: &str,
        base_dir: &Path,
        p: &mut Problems,
    ) -> (Option<Vec<Step>>, bool, Option<VersionPointers>) {
        let version = self.version.take().and_then(|v| v.validate(p));
        let Some(file) = self.flow.take() else {
            let step = flow::validate_step(self.into_step(subscriber), "deliver", p);
            return (step.map(|s| vec![s]), false, version);
        };
        for key in self.call_keys() {
            p.push(&format!("deliver.{key}"), "comes from the flow's steps when deliver.flow is given");
        }
        let path = base_dir.join(&file);
        (flow_steps(&path).map_err(|e| p.push("deliver.flow", e)).ok(), true, version)
    }

    /// `[deliver]` as the runner step it is, named after the subscriber.
    fn into_step(self, subscriber: &str) -> RawStep {
        RawStep {
            name: Some(subscriber.to_owned()),
            method: self.method,
            url: self.url,
            body: self.body,
            headers: self.headers,
            key_strategy: None,
            resend_on_change: None,
            idempotency_header: self.idempotency_header,
            capture: self.capture,
            when_known: None,
            guard: None,
            on_unknown: self.on_unknown,
            verify: self.verify,
        }
    }
}

impl RawVersion {
    /// The ordering guard's two pointers, both required.
    fn validate(self, p: &mut Problems) -> Option<VersionPointers> {
        let pointer = |p: &mut Problems, at: &str, value: Option<String>, example: &str| {
            let value = p.required(at, value, example)?;
            p.check(at, check::pointer(&value).map(|()| value))
        };
        let object = pointer(p, "deliver.version.object", self.object, "object = \"/order_id\"");
        let version = pointer(p, "deliver.version.version", self.version, "version = \"/version\"");
        Some(VersionPointers { object: object?, version: version? })
    }
}

/// The steps of a flow file; its `[source]` does not matter here and may be left out.
fn flow_steps(path: &PathBuf) -> Result<Vec<Step>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut raw: RawFlow = parse_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if raw.source.is_none() {
        raw.source = Some(flow::RawSource {
            jsonl: Some("-".into()),
            primary_key: Some(vec!["id".into()]),
            ..Default::default()
        });
    }
    let flow = raw.validate(None).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(flow.steps)
}

fn name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok { Ok(()) } else { Err(format!("{s:?}: letters, digits, '-', '_' and '.' only (1 to 100)")) }
}

fn nats_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && !s.bytes().any(|b| b.is_ascii_whitespace() || b".*>/\\".contains(&b));
    if ok { Ok(()) } else { Err(format!("{s:?}: no spaces, '.', '*', '>', '/' or '\\\\'")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Consumer, config::Error> {
        let raw: RawConsumer = parse_toml(text).map_err(|e| config::Error(vec![e], Kind::Consumer))?;
        raw.validate(Path::new("."), &|_| None)
    }

    const NATS: &str = r#"
        subscriber = "orders-sync"
        [source]
        nats = { url = "nats://127.0.0.1:4222", stream = "ORDERS", subject = "orders.>", durable = "orders-sync" }
        [deliver]
        url = "http://127.0.0.1:9000/orders"
        version = { object = "/order_id", version = "/version" }
    "#;

    #[test]
    fn the_spec_example_is_valid() {
        let consumer = parse(NATS).expect("valid");
        assert_eq!(consumer.steps.len(), 1);
        assert_eq!(consumer.steps[0].name, "orders-sync");
        assert_eq!(consumer.message_id, MessageId::Header);
        assert!(matches!(&consumer.broker, Broker::Nats { durable, .. } if durable == "orders-sync"));
        assert_eq!(consumer.version.as_ref().map(|v| v.object.as_str()), Some("/order_id"));
        let rabbit = r#"
            subscriber = "s"
            [source]
            rabbitmq = { url = "amqp://guest:guest@127.0.0.1:5672/%2f", queue = "orders" }
            message_id = { body = "/id" }
            [deliver]
            url = "http://h/x/{{record.id}}"
        "#;
        let consumer = parse(rabbit).expect("valid");
        assert_eq!(consumer.message_id, MessageId::Body("/id".into()));
    }

    #[test]
    fn broker_urls_over_tls_are_accepted_and_other_schemes_are_not() {
        let nats = |url: &str| parse(&NATS.replace("nats://127.0.0.1:4222", url));
        for url in ["nats://127.0.0.1:4222", "tls://nats.example.com:4222", "tls://user:secret@10.0.0.5:4222"] {
            assert!(matches!(nats(url).map(|c| c.broker), Ok(Broker::Nats { url: u, .. }) if u == url), "{url}");
        }
        let refused = nats("https://nats.example.com").expect_err("not a NATS scheme").0.join("\n");
        assert!(refused.contains("source.nats.url: the scheme must be one of nats, tls"), "{refused}");
        let rabbit = |url: &str| {
            let source = format!("rabbitmq = {{ url = \"{url}\", queue = \"q\" }}");
            parse(&NATS.replace("nats = {", "# nats = {").replace("[source]", &format!("[source]\n{source}")))
        };
        for url in ["amqp://guest:guest@127.0.0.1:5672/%2f", "amqps://app:secret@mq.example.com:5671/orders"] {
            assert!(matches!(rabbit(url).map(|c| c.broker), Ok(Broker::Rabbit { url: u, .. }) if u == url), "{url}");
        }
        let refused = rabbit("http://mq.example.com").expect_err("not an AMQP scheme").0.join("\n");
        assert!(refused.contains("source.rabbitmq.url: the scheme must be one of amqp, amqps"), "{refused}");
    }

    #[test]
    fn the_example_consumer_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/orders-consumer.toml");
        let consumer = load(&path, &|_| None).expect("examples/ holds a valid consumer");
        assert_eq!(consumer.subscriber, "orders-sync");
        assert!(consumer.admin.is_some());
        for (file, kafka) in [("orders-consumer-kafka.toml", true), ("orders-consumer-sqs.toml", false)] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
            let consumer = load(&path, &|_| None).expect("examples/ holds a valid consumer");
            assert_eq!(matches!(consumer.broker, Broker::Kafka(_)), kafka, "{file}");
        }
    }

    #[test]
    fn mistakes_are_named_by_their_path() {
        let problems = |text: &str| parse(text).expect_err("invalid").0.join("\n");
        let unknown = problems(&NATS.replace("[deliver]", "[deliver]\nretries = 3"));
        assert!(unknown.contains("deliver.retries") || unknown.contains("deliver"), "{unknown}");
        assert!(unknown.contains("unknown field"), "{unknown}");
        let bad = problems(&NATS.replace("url = \"http://127.0.0.1:9000/orders\"", "url = \"ftp://h/{{steps.x.id}}\""));
        assert!(bad.contains("deliver.url"), "{bad}");
        let both = problems(&NATS.replace("[deliver]", "rabbitmq = { url = \"amqp://h\", queue = \"q\" }\n[deliver]"));
        assert!(both.contains("source: nats and rabbitmq are given together"), "{both}");
        let pointer = problems(&NATS.replace("\"/version\"", "\"version\""));
        assert!(pointer.contains("deliver.version.version"), "{pointer}");
        let attempts = problems(&format!("max_attempts = 0\n{NATS}"));
        // One bounds message in every file (it was "0 is out of range 1..=1000" here).
        assert!(attempts.contains("max_attempts: 0 is not between 1 and 1000"), "{attempts}");
    }

    #[test]
    fn message_id_refuses_unknown_keys_and_names_both_shapes() {
        let problems = |message_id: &str| {
            let text = NATS.replace("[deliver]", &format!("message_id = {message_id}\n[deliver]"));
            parse(&text).expect_err("invalid").0.join("\n")
        };
        let unknown = problems("{ body = \"/id\", header = \"X-Id\" }");
        assert!(unknown.contains("source.message_id.header: unknown field `header`, expected `body`"), "{unknown}");
        let shape = problems("7");
        assert!(
            shape.contains(r#"source.message_id: invalid type: integer `7`, expected "header" or { body = "/id" }"#),
            "{shape}"
        );
        let word = problems("\"body\"");
        assert!(word.contains(r#"source.message_id: "body": say "header" or { body = "/id" }"#), "{word}");
    }

    #[test]
    fn a_pointer_must_name_a_field() {
        let problems = |text: &str| parse(text).expect_err("invalid").0.join("\n");
        let body = problems(&NATS.replace("[deliver]", "message_id = { body = \"\" }\n[deliver]"));
        assert!(body.contains("source.message_id.body: invalid JSON pointer \"\": it would name the whole"), "{body}");
        let object = problems(&NATS.replace("\"/order_id\"", "\"\""));
        assert!(object.contains("deliver.version.object: invalid JSON pointer \"\""), "{object}");
        let capture = problems(&NATS.replace("[deliver]", "[deliver]\ncapture = { id = \"\" }"));
        assert!(capture.contains("deliver.capture.id: invalid JSON pointer \"\""), "{capture}");
    }

    #[test]
    fn kafka_and_sqs_sources_are_validated_by_their_paths() {
        let with = |source: &str| NATS.replace("nats = {", &format!("{source}\n# nats = {{"));
        let kafka = "kafka = { brokers = \"127.0.0.1:9092\", topic = \"orders\", group = \"orders-sync\" }";
        let consumer = parse(&with(kafka)).expect("valid");
        assert_eq!(consumer.message_id, MessageId::Body("/id".into()), "Kafka has no id header");
        assert!(
            matches!(&consumer.broker, Broker::Kafka(k) if k.group == "orders-sync" && k.dead_letter_topic.is_none())
        );
        let offset = parse(&with(&format!("{kafka}\nmessage_id = \"offset\""))).expect("valid");
        assert_eq!(offset.message_id, MessageId::Header, "the broker's id: topic/partition/offset");
        let problems = |text: &str| parse(text).expect_err("invalid").0.join("\n");
        let header = problems(&with(&format!("{kafka}\nmessage_id = \"header\"")));
        assert!(header.contains("source.message_id: \"header\": say \"offset\""), "{header}");
        let bad = problems(&with("kafka = { brokers = \"localhost\", topic = \"a b\", dead_letter_topic = \"\" }"));
        for needle in [
            "source.kafka.brokers: \"localhost\": host:port",
            "source.kafka.topic: \"a b\"",
            "source.kafka.group: required",
            "source.kafka.dead_letter_topic",
        ] {
            assert!(bad.contains(needle), "{needle} missing from {bad}");
        }
        let sqs = "sqs = { queue_url = \"https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo\" }";
        let consumer = parse(&with(sqs)).expect("valid");
        assert_eq!(consumer.message_id, MessageId::Header, "MessageDeduplicationId, then MessageId");
        assert!(
            matches!(&consumer.broker, Broker::Sqs(q) if q.wait_time == Duration::from_secs(20) && q.endpoint.is_none())
        );
        let bad = problems(&with(
            "sqs = { queue_url = \"https://h/\", endpoint = \"ftp://h\", wait_time = \"30s\", visibility_timeout = \"1s\" }",
        ));
        for needle in [
            "source.sqs.queue_url: the URL must end with the queue's name",
            "source.sqs.endpoint: the scheme must be one of https, http",
            "source.sqs.wait_time: at most 20s",
            "source.sqs.visibility_timeout: between 3s and 12h",
        ] {
            assert!(bad.contains(needle), "{needle} missing from {bad}");
        }
        let both = problems(&NATS.replace("[deliver]", &format!("{sqs}\n[deliver]")));
        assert!(both.contains("source: nats and sqs are given together"), "{both}");
    }

    #[test]
    fn admin_is_the_shared_table() {
        let problems = |admin: &str| parse(&format!("{NATS}\n[admin]\n{admin}\n")).expect_err("invalid").0.join("\n");
        assert!(problems("").contains("admin.listen: required"), "an [admin] table needs its listener");
        let public = problems("listen = \"0.0.0.0:8082\"");
        assert!(public.contains("admin.listen: 0.0.0.0:8082 is not a loopback address"), "{public}");
        assert!(problems("listen = \"127.0.0.1:1\"\ntoken = \"x\"").contains("admin.token: unknown field"));
        let consumer = parse(&format!("{NATS}\n[admin]\nlisten = \"127.0.0.1:8082\"\n")).expect("valid");
        assert_eq!(consumer.admin.map(|(listen, token)| (listen.port(), token)), Some((8082, None)));
    }
}
