//! The consumer suite on every broker (SPEC §6): the same scenarios (duplicates and stale
//! versions, poison messages, `kill -9` mid-stream, a graceful stop, a cut connection, a
//! delivery slower than the broker's lease) run against NATS JetStream, RabbitMQ, Kafka
//! (a private `tansu` broker per test) and SQS (a private moto server per test), each
//! through the real `idem consume` binary delivering to the real demo upstream.
//!
//! The Kafka and SQS servers come from `scripts/install-broker-tools` (a venv under
//! `$HOME/.cache/idem-tools/brokers`, or `IDEM_BROKER_TOOLS`); a missing one fails the test
//! and says how to install it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use aws_sdk_sqs::types::QueueAttributeName;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::consumer::{Consumer, eventually};
use crate::support::{Gateway, Relay, Upstream, unique_suffix};

/// A broker the consumer suite runs on: where `idem consume` reads, how the test publishes,
/// and where poison messages end up.
pub trait TestBroker: Sized {
    /// A broker for one test, with a fresh topic or queue.
    async fn start() -> Self;
    /// The `[source]` table's broker line for `subscriber`, through `address` (the
    /// broker's own, or a relay's) when given.
    fn source(&self, subscriber: &str) -> String;
    /// The host:port `idem consume` connects to, which a relay may stand in for.
    fn address(&self) -> String;
    /// The `[source]` line with `relay` standing in for the broker.
    fn source_through(&self, subscriber: &str, relay: &str) -> String {
        self.source(subscriber).replace(&self.address(), relay)
    }
    /// Waits until the consumer is ready to receive what is published (its stream, queue
    /// or group exists).
    async fn ready(&self, consumer: &Consumer);
    /// Publishes one message and waits until the broker has it.
    async fn publish(&self, body: &[u8]);
    /// The bodies that reached the dead-letter destination within `within`, up to `count`.
    async fn dead_letters(&self, count: usize, within: Duration) -> Vec<String>;
    /// The relay the broker's clients must go through (Kafka's metadata names it), when
    /// the broker has one; other brokers get a relay of the test's in front.
    fn own_relay(&self) -> Option<&Relay> {
        None
    }
    /// The environment `idem consume` needs (credentials).
    fn env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// How long the broker takes to hand a killed consumer's messages to a new one.
    const REDELIVERY: Duration;
}

/// The venv of `scripts/install-broker-tools`.
fn broker_tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("IDEM_BROKER_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/idem-tools/brokers")
    });
    let path = venv.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/install-broker-tools (a venv under $HOME/.cache/idem-tools/brokers with \
         tansu and moto's server)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("an address").port()
}

/// A private server process, killed when dropped.
struct Server(Child);

impl Server {
    async fn start(mut command: Command, port: u16, what: &str) -> Server {
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("{what} does not start: {e}"));
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Server(child);
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("{what} exited ({status}) before it listened on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        panic!("{what} did not listen on {port} within 10 s");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Kafka: a private tansu broker. It advertises the port of a relay in front of it, so a
// test can cut the consumer's connections (the metadata names the relay).

pub struct Kafka {
    _server: Server,
    relay: Relay,
    topic: String,
    dead: String,
    producer: FutureProducer,
}

impl TestBroker for Kafka {
    const REDELIVERY: Duration = Duration::from_secs(6);

    async fn start() -> Kafka {
        let (port, relay_port) = (free_port(), free_port());
        let mut command = Command::new(broker_tool("tansu"));
        command.args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{relay_port}"),
            "--storage-engine",
            "memory://tansu/",
        ]);
        let server = Server::start(command, port, "tansu").await;
        let relay = Relay::start_at(&format!("127.0.0.1:{relay_port}"), &format!("127.0.0.1:{port}")).await;
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", relay.address());
        let (topic, dead) = (format!("orders-{}", unique_suffix()), format!("dead-{}", unique_suffix()));
        // Three partitions, so messages in flight on several at once commit independently.
        let admin: AdminClient<DefaultClientContext> = config.create().expect("a Kafka admin client");
        let topics =
            [NewTopic::new(&topic, 3, TopicReplication::Fixed(1)), NewTopic::new(&dead, 1, TopicReplication::Fixed(1))];
        let created = admin.create_topics(&topics, &AdminOptions::new()).await.expect("create the topics");
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        let producer: FutureProducer = config.create().expect("a Kafka producer");
        Kafka { _server: server, relay, topic, dead, producer }
    }

    fn source(&self, subscriber: &str) -> String {
        format!(
            "kafka = {{ brokers = \"{}\", topic = \"{}\", group = \"{subscriber}\", dead_letter_topic = \"{}\", session_timeout = \"6s\" }}",
            self.address(),
            self.topic,
            self.dead
        )
    }

    fn address(&self) -> String {
        self.relay.address()
    }

    fn own_relay(&self) -> Option<&Relay> {
        Some(&self.relay)
    }

    /// The group has its partitions once the consumer's lag gauge appears; publishing
    /// before that is kept too (a new group reads from the earliest offset).
    async fn ready(&self, _consumer: &Consumer) {}

    async fn publish(&self, body: &[u8]) {
        // Keyed by the body's order, so the messages spread over the partitions.
        let key = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["order_id"].as_str().map(str::to_owned));
        let key = key.unwrap_or_else(|| "none".into());
        let record = FutureRecord::to(&self.topic).payload(body).key(&key);
        self.producer.send(record, Duration::from_secs(10)).await.expect("Kafka stored the message");
    }

    async fn dead_letters(&self, count: usize, within: Duration) -> Vec<String> {
        // Read by assignment, not in a group: no group to join first.
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.relay.address())
            .set("group.id", format!("dead-reader-{}", unique_suffix()))
            .create()
            .expect("a Kafka consumer");
        let mut partitions = rdkafka::TopicPartitionList::new();
        partitions.add_partition_offset(&self.dead, 0, rdkafka::Offset::Beginning).expect("partition 0");
        consumer.assign(&partitions).expect("assign the dead-letter partition");
        let mut bodies = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while bodies.len() < count {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(message)) => bodies.push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into()),
                Ok(Err(_)) => {}
                Err(_) => break,
            }
        }
        bodies
    }
}

// ---------------------------------------------------------------------------------------
// SQS: a private moto server, with a dead-letter queue that the main queue's redrive
// policy sends a message to after two receives.

pub struct Sqs {
    _server: Server,
    port: u16,
    client: aws_sdk_sqs::Client,
    queue_url: String,
    dead_url: String,
}

const SQS_VISIBILITY_S: u64 = 3;

fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::config::Builder::new()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

impl TestBroker for Sqs {
    const REDELIVERY: Duration = Duration::from_secs(SQS_VISIBILITY_S);

    async fn start() -> Sqs {
        let port = free_port();
        let mut command = Command::new(broker_tool("python"));
        command.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]);
        let server = Server::start(command, port, "moto's server").await;
        let client = sqs_client(&format!("http://127.0.0.1:{port}"));
        let name = format!("orders-{}", unique_suffix());
        let dead = client.create_queue().queue_name(format!("{name}-dead")).send().await.expect("the dead queue");
        let dead_url = dead.queue_url.expect("a queue URL");
        let dead_arn = client
            .get_queue_attributes()
            .queue_url(&dead_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("the dead queue's ARN");
        let dead_arn = dead_arn.attributes.and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned()).expect("ARN");
        let redrive = json!({ "deadLetterTargetArn": dead_arn, "maxReceiveCount": "2" }).to_string();
        let queue = client
            .create_queue()
            .queue_name(&name)
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .send()
            .await
            .expect("the queue");
        let queue_url = queue.queue_url.expect("a queue URL");
        Sqs { _server: server, port, client, queue_url, dead_url }
    }

    fn source(&self, _subscriber: &str) -> String {
        format!(
            "sqs = {{ queue_url = \"{}\", endpoint = \"http://{}\", visibility_timeout = \"{SQS_VISIBILITY_S}s\", wait_time = \"1s\" }}",
            self.queue_url,
            self.address()
        )
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn ready(&self, _consumer: &Consumer) {}

    async fn publish(&self, body: &[u8]) {
        let body = String::from_utf8(body.to_vec()).expect("SQS bodies are text");
        self.client.send_message().queue_url(&self.queue_url).message_body(body).send().await.expect("SQS stored it");
    }

    async fn dead_letters(&self, count: usize, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut bodies = Vec::new();
        while bodies.len() < count && tokio::time::Instant::now() < deadline {
            let received = self.client.receive_message().queue_url(&self.dead_url).max_number_of_messages(10);
            let received = received.wait_time_seconds(1).send().await.expect("receive the dead letters");
            bodies.extend(received.messages.unwrap_or_default().into_iter().filter_map(|m| m.body));
        }
        bodies
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("AWS_ACCESS_KEY_ID", "test".into()), ("AWS_SECRET_ACCESS_KEY", "test".into())]
    }
}

// ---------------------------------------------------------------------------------------
// NATS JetStream and RabbitMQ: the machine's servers, a fresh stream or queue per test.

pub struct Nats {
    js: jetstream::Context,
    stream: String,
    url: String,
}

impl TestBroker for Nats {
    const REDELIVERY: Duration = Duration::from_secs(2);

    async fn start() -> Nats {
        let url = crate::consumer::nats_url();
        let client = async_nats::connect(&url).await.expect("connect to NATS");
        Nats { js: jetstream::new(client), stream: format!("IT_{}", unique_suffix()), url }
    }

    fn source(&self, subscriber: &str) -> String {
        let stream = &self.stream;
        format!(
            "nats = {{ url = \"nats://{}\", stream = \"{stream}\", subject = \"{stream}.>\", durable = \"{subscriber}\", ack_wait = \"2s\" }}",
            self.address()
        )
    }

    fn address(&self) -> String {
        crate::support::service_address(&self.url)
    }

    async fn ready(&self, _consumer: &Consumer) {
        eventually("the consumer to create its stream", || async { self.js.get_stream(&self.stream).await.is_ok() })
            .await;
    }

    async fn publish(&self, body: &[u8]) {
        let subject = format!("{}.x", self.stream);
        let ack = self.js.publish(subject, body.to_vec().into()).await.expect("publish");
        ack.await.expect("JetStream stored the message");
    }

    /// A terminated message stays in the stream; JetStream has no dead-letter destination.
    async fn dead_letters(&self, _count: usize, _within: Duration) -> Vec<String> {
        Vec::new()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let (js, stream) = (self.js.clone(), self.stream.clone());
        tokio::spawn(async move {
            let _ = js.delete_stream(&stream).await;
        });
    }
}

pub struct Rabbit {
    connection: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
    dead: String,
    url: String,
}

impl TestBroker for Rabbit {
    const REDELIVERY: Duration = Duration::from_millis(500);

    async fn start() -> Rabbit {
        let url = crate::consumer::rabbit_url();
        let connection = crate::consumer::rabbit().await;
        let channel = connection.create_channel().await.expect("a channel");
        let queue = format!("it-suite-{}", unique_suffix());
        let dead = format!("{queue}-dead");
        let fanout = ExchangeDeclareOptions { auto_delete: true, ..Default::default() };
        channel.exchange_declare(&dead, ExchangeKind::Fanout, fanout, FieldTable::default()).await.expect("dlx");
        channel.queue_declare(&dead, QueueDeclareOptions::default(), FieldTable::default()).await.expect("dead queue");
        channel.queue_bind(&dead, &dead, "", QueueBindOptions::default(), FieldTable::default()).await.expect("bind");
        Rabbit { connection, channel, queue, dead, url }
    }

    fn source(&self, _subscriber: &str) -> String {
        let url = self.url.replace(&crate::support::service_address(&self.url), &self.address());
        format!(
            "rabbitmq = {{ url = \"{url}\", queue = \"{}\", dead_letter_exchange = \"{}\" }}",
            self.queue, self.dead
        )
    }

    fn address(&self) -> String {
        crate::support::service_address(&self.url)
    }

    async fn ready(&self, _consumer: &Consumer) {
        eventually("the consumer to declare its queue", || async {
            let probe = self.connection.create_channel().await.expect("a channel");
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            probe.queue_declare(&self.queue, passive, FieldTable::default()).await.is_ok()
        })
        .await;
    }

    async fn publish(&self, body: &[u8]) {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let publish = self.channel.basic_publish("", &self.queue, Default::default(), body, properties);
        publish.await.expect("publish").await.expect("confirmed");
    }

    async fn dead_letters(&self, count: usize, within: Duration) -> Vec<String> {
        use futures_util::StreamExt;
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let tag = format!("it-dead-{}", unique_suffix());
        let mut deliveries =
            self.channel.basic_consume(&self.dead, &tag, options, FieldTable::default()).await.expect("consume");
        let deadline = tokio::time::Instant::now() + within;
        let mut bodies = Vec::new();
        while bodies.len() < count {
            match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(Some(Ok(delivery))) => bodies.push(String::from_utf8_lossy(&delivery.data).into()),
                _ => break,
            }
        }
        bodies
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let (channel, queue, dead) = (self.channel.clone(), self.queue.clone(), self.dead.clone());
        tokio::spawn(async move {
            let _ = channel.queue_delete(&queue, Default::default()).await;
            let _ = channel.queue_delete(&dead, Default::default()).await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// The scenarios

/// A consumer file on `broker`, ids in the body (every broker carries a body).
fn consumer_file<B: TestBroker>(broker: &B, subscriber: &str, source: &str, upstream: &str, deliver: &str) -> String {
    let _ = broker;
    format!(
        r#"
subscriber = "{subscriber}"
store = "sqlite://./idem.db"
max_attempts = 3
timeout = "10s"

[source]
{source}
message_id = {{ body = "/id" }}

[deliver]
url = "{upstream}/orders/{{{{record.order_id}}}}"
{deliver}

[admin]
listen = "127.0.0.1:0"
"#
    )
}

async fn start_consumer<B: TestBroker>(broker: &B, subscriber: &str, toml: &str) -> Consumer {
    let env = broker.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let consumer = Consumer::start_with_env(subscriber, toml, &env).await;
    broker.ready(&consumer).await;
    consumer
}

fn order(id: &str, order_id: &str, extra: Value) -> Vec<u8> {
    let mut body = json!({ "id": id, "order_id": order_id });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body.to_string().into_bytes()
}

/// Ten orders published twice (a producer's retry), a late older version and a newer one:
/// each effect once, the copies duplicates, the old version stale.
async fn duplicates_and_stale_versions<B: TestBroker>() {
    let (broker, upstream) = (B::start().await, Upstream::start().await);
    let deliver = "version = { object = \"/order_id\", version = \"/version\" }";
    let toml = consumer_file(&broker, "dups", &broker.source("dups"), &upstream.url(), deliver);
    let consumer = start_consumer(&broker, "dups", &toml).await;
    for _ in 0..2 {
        for n in 0..10 {
            broker.publish(&order(&format!("m-{n}"), &format!("o-{n}"), json!({ "version": 2 }))).await;
        }
    }
    broker.publish(&order("m-old", "o-0", json!({ "version": 1 }))).await;
    broker.publish(&order("m-new", "o-1", json!({ "version": 3 }))).await;
    eventually("22 messages settled", || async {
        consumer.count("delivered").await + consumer.count("duplicate").await + consumer.count("stale").await == 22
    })
    .await;
    assert_eq!(consumer.count("delivered").await, 11, "{}", consumer.logs());
    assert_eq!(consumer.count("duplicate").await, 10);
    assert_eq!(consumer.count("stale").await, 1, "the late version 1 of o-0");
    let stats = upstream.stats().await;
    assert_eq!(stats["calls"], 11, "{stats}");
    assert_eq!(stats["by_key"]["m-3"], 1, "the message id is the Idempotency-Key: {stats}");
    assert_eq!(stats["by_path"]["/orders/o-1"], 2, "versions 2 and 3 of o-1: {stats}");
}

/// A 400 and a body that is not JSON: both `needs_review`, never retried, and dead-lettered
/// where the broker has a destination for them; the good message around them is delivered.
async fn poison_messages_end_in_review<B: TestBroker>() {
    let (broker, upstream) = (B::start().await, Upstream::start().await);
    let deliver = "headers = { \"X-Demo-Status\" = \"{{record.status}}\" }";
    let toml = consumer_file(&broker, "poison", &broker.source("poison"), &upstream.url(), deliver);
    let consumer = start_consumer(&broker, "poison", &toml).await;
    broker.publish(&order("ok-1", "o-1", json!({ "status": 201 }))).await;
    broker.publish(&order("bad-request", "o-2", json!({ "status": 400 }))).await;
    broker.publish(b"<order>not json</order>").await;
    broker.publish(&order("ok-3", "o-3", json!({ "status": 201 }))).await;
    eventually("every message settled", || async {
        consumer.count("delivered").await == 2
            && consumer.count("needs_review").await >= 1
            && consumer.count("malformed").await >= 1
    })
    .await;
    let stats = upstream.stats().await;
    assert_eq!(stats["by_key"]["bad-request"], 1, "a 400 is not retried: {stats}");
    assert_eq!(stats["calls"], 3, "{stats}");
    let store = format!("sqlite://{}", consumer.dir.path().join("idem.db").display());
    let review = crate::support::idem_log(&store, &["list", "--status", "needs_review", "--json"]).json();
    let keys: Vec<&str> =
        review["records"].as_array().expect("records").iter().filter_map(|r| r["key"].as_str()).collect();
    assert!(keys.contains(&"bad-request"), "{keys:?}");
    // The body that is not JSON has no id of its own: its record is named by the broker's
    // id of the message (Kafka's place, SQS's MessageId), else by the hash of the body.
    assert_eq!(keys.len(), 2, "{keys:?}");
    let malformed = review["records"].as_array().into_iter().flatten().find(|r| r["key"] != "bad-request");
    let summary = malformed.and_then(|r| r["error_summary"].as_str()).unwrap_or_default();
    assert!(summary.contains("malformed message"), "{summary}");
    assert!(!consumer.logs().contains("not json"), "a malformed body is never logged");
    let mut dead = broker.dead_letters(2, Duration::from_secs(30)).await;
    dead.sort();
    if std::any::type_name::<B>().ends_with("Nats") {
        assert!(dead.is_empty(), "JetStream terminates poison messages and keeps them in the stream");
    } else {
        assert_eq!(dead.len(), 2, "both poison messages dead-lettered: {dead:?}");
        assert!(dead[0].starts_with("<order>") && dead[1].contains("bad-request"), "{dead:?}");
    }
    // Once dead-lettered, a message is not delivered again.
    tokio::time::sleep(B::REDELIVERY + Duration::from_secs(1)).await;
    assert_eq!(upstream.stats().await["calls"], 3);
}

/// `kill -9` mid-stream, then a new process: every order executed exactly once (the
/// endpoint honours `Idempotency-Key`: the product's gateway in front of the demo).
async fn kill_9_mid_stream_then_resume<B: TestBroker>() {
    const ORDERS: u32 = 60;
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let broker = B::start().await;
    let deliver = "headers = { \"X-Demo-Delay\" = \"20ms\" }";
    let toml = consumer_file(&broker, "kill", &broker.source("kill"), &gateway.url(""), deliver);
    let mut consumer = start_consumer(&broker, "kill", &toml).await;
    for n in 0..ORDERS {
        broker.publish(&order(&format!("msg-{n}"), &format!("o-{n}"), json!({}))).await;
    }
    eventually("some deliveries", || async { upstream.calls().await >= 15 }).await;
    consumer.kill9();
    let at_kill = upstream.calls().await;
    consumer.restart().await;
    eventually("every order executed", || async { upstream.calls().await >= u64::from(ORDERS) }).await;
    tokio::time::sleep(B::REDELIVERY + Duration::from_secs(2)).await;
    let stats = upstream.stats().await;
    assert_eq!(stats["calls"], ORDERS, "killed after {at_kill} calls: {stats}");
    for n in 0..ORDERS {
        assert_eq!(stats["by_key"][format!("msg-{n}")], 1, "msg-{n}: {stats}");
    }
}

/// SIGTERM while a delivery runs: it finishes, is recorded and settled, and the process
/// exits 0; a new process receives nothing more.
async fn sigterm_finishes_the_messages_in_flight<B: TestBroker>() {
    let (broker, upstream) = (B::start().await, Upstream::start().await);
    let deliver = "headers = { \"X-Demo-Delay\" = \"1s\" }";
    let toml = consumer_file(&broker, "graceful", &broker.source("graceful"), &upstream.url(), deliver);
    let mut consumer = start_consumer(&broker, "graceful", &toml).await;
    broker.publish(&order("slow-1", "slow", json!({}))).await;
    eventually("the slow call to reach the endpoint", || async { upstream.calls().await == 1 }).await;
    let status = consumer.terminate().await;
    assert!(status.success(), "{status}: {}", consumer.logs());
    let store = format!("sqlite://{}", consumer.dir.path().join("idem.db").display());
    let record =
        crate::support::idem_log(&store, &["show", "--scope", "consumer:graceful", "--key", "slow-1", "--json"]).json();
    assert_eq!(record["status"], "completed", "recorded before the exit: {record}");
    consumer.spawn().await;
    tokio::time::sleep(B::REDELIVERY + Duration::from_secs(3)).await;
    assert_eq!(consumer.count("delivered").await + consumer.count("duplicate").await, 0, "{}", consumer.logs());
    assert_eq!(upstream.calls().await, 1);
}

/// The broker connection cut and restored: what was published meanwhile is delivered
/// after it comes back, nothing twice.
async fn the_broker_connection_cut_and_restored<B: TestBroker>() {
    let (broker, upstream) = (B::start().await, Upstream::start().await);
    let ours;
    let (source, relay) = match broker.own_relay() {
        Some(relay) => (broker.source("cut"), relay),
        None => {
            ours = Relay::start(&broker.address()).await;
            (broker.source_through("cut", &ours.address()), &ours)
        }
    };
    let toml = consumer_file(&broker, "cut", &source, &upstream.url(), "");
    let consumer = start_consumer(&broker, "cut", &toml).await;
    for n in 0..5 {
        broker.publish(&order(&format!("m-{n}"), &format!("o-{n}"), json!({}))).await;
    }
    eventually("the first five delivered", || async { consumer.count("delivered").await == 5 }).await;
    relay.cut();
    // Published while the consumer is cut off (a Kafka producer behind the same relay
    // waits for it, so the restore runs alongside).
    let publish = async {
        for n in 5..10 {
            broker.publish(&order(&format!("m-{n}"), &format!("o-{n}"), json!({}))).await;
        }
    };
    let restore = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        relay.restore();
    };
    tokio::join!(publish, restore);
    eventually("the next five delivered after the broker came back", || async {
        consumer.count("delivered").await == 10
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(upstream.stats().await["calls"], 10, "{}", consumer.logs());
}

/// An endpoint slower than the broker's lease (ack wait, visibility timeout, session
/// timeout): the lease follows the delivery, so it is never handed out again meanwhile.
async fn a_delivery_longer_than_the_lease_is_not_redelivered<B: TestBroker>() {
    let (broker, upstream) = (B::start().await, Upstream::start().await);
    let lease = B::REDELIVERY.max(Duration::from_secs(2));
    let delay = format!("{}ms", (lease * 2 + Duration::from_secs(1)).as_millis());
    let deliver = format!("headers = {{ \"X-Demo-Delay\" = \"{delay}\" }}");
    let toml = consumer_file(&broker, "slow", &broker.source("slow"), &upstream.url(), &deliver)
        .replace("timeout = \"10s\"", "timeout = \"30s\"");
    let consumer = start_consumer(&broker, "slow", &toml).await;
    broker.publish(&order("slow-1", "slow", json!({}))).await;
    broker.publish(&order("slow-2", "slow-2", json!({}))).await;
    eventually("both delivered", || async { consumer.count("delivered").await == 2 }).await;
    tokio::time::sleep(lease + Duration::from_secs(1)).await;
    let stats = upstream.stats().await;
    assert_eq!(stats["by_key"]["slow-1"], 1, "{stats}");
    assert_eq!(stats["by_key"]["slow-2"], 1, "{stats}");
    assert_eq!(
        consumer.count("in_flight").await + consumer.count("duplicate").await,
        0,
        "no second delivery raced the first"
    );
}

/// The scenarios as tests, one module per broker.
macro_rules! consumer_suite {
    ($($module:ident => $broker:ty: [$($scenario:ident),* $(,)?]);* $(;)?) => {
        $(mod $module {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    super::$scenario::<$broker>().await;
                }
            )*
        })*
    };
}

consumer_suite! {
    kafka => super::Kafka: [
        duplicates_and_stale_versions,
        poison_messages_end_in_review,
        kill_9_mid_stream_then_resume,
        sigterm_finishes_the_messages_in_flight,
        the_broker_connection_cut_and_restored,
        a_delivery_longer_than_the_lease_is_not_redelivered,
    ];
    sqs => super::Sqs: [
        duplicates_and_stale_versions,
        poison_messages_end_in_review,
        kill_9_mid_stream_then_resume,
        sigterm_finishes_the_messages_in_flight,
        the_broker_connection_cut_and_restored,
        a_delivery_longer_than_the_lease_is_not_redelivered,
    ];
    nats => super::Nats: [
        duplicates_and_stale_versions,
        poison_messages_end_in_review,
        kill_9_mid_stream_then_resume,
        sigterm_finishes_the_messages_in_flight,
        the_broker_connection_cut_and_restored,
        a_delivery_longer_than_the_lease_is_not_redelivered,
    ];
    rabbitmq => super::Rabbit: [
        duplicates_and_stale_versions,
        poison_messages_end_in_review,
        kill_9_mid_stream_then_resume,
        sigterm_finishes_the_messages_in_flight,
        the_broker_connection_cut_and_restored,
        a_delivery_longer_than_the_lease_is_not_redelivered,
    ];
}

/// SQS names a message by its `MessageDeduplicationId` (a FIFO queue's), else by its
/// `MessageId`: with `message_id = "header"`, those are the records' keys.
#[tokio::test(flavor = "multi_thread")]
async fn sqs_names_a_message_by_its_deduplication_id_then_its_message_id() {
    let (broker, upstream) = (Sqs::start().await, Upstream::start().await);
    let fifo = broker.client.create_queue().queue_name(format!("orders-{}.fifo", unique_suffix()));
    let fifo = fifo.attributes(QueueAttributeName::FifoQueue, "true").send().await.expect("a FIFO queue");
    let fifo_url = fifo.queue_url.expect("a queue URL");
    let source = broker.source("ids").replace(&broker.queue_url, &fifo_url);
    let toml = consumer_file(&broker, "ids", &source, &upstream.url(), "").replace("{ body = \"/id\" }", "\"header\"");
    let consumer = start_consumer(&broker, "ids", &toml).await;
    let send = broker.client.send_message().queue_url(&fifo_url).message_body(r#"{"order_id":"o-1"}"#);
    send.message_group_id("orders").message_deduplication_id("order-1-created").send().await.expect("sent");
    let plain = format!("orders-plain-{}", unique_suffix());
    let plain_url =
        broker.client.create_queue().queue_name(&plain).send().await.expect("a queue").queue_url.expect("URL");
    let source = broker.source("ids-plain").replace(&broker.queue_url, &plain_url);
    let toml =
        consumer_file(&broker, "ids-plain", &source, &upstream.url(), "").replace("{ body = \"/id\" }", "\"header\"");
    let second = start_consumer(&broker, "ids-plain", &toml).await;
    let sent = broker.client.send_message().queue_url(&plain_url).message_body(r#"{"order_id":"o-2"}"#).send().await;
    let message_id = sent.expect("sent").message_id.expect("a MessageId");
    eventually("both delivered", || async {
        consumer.count("delivered").await == 1 && second.count("delivered").await == 1
    })
    .await;
    let stats = upstream.stats().await;
    assert_eq!(stats["by_key"]["order-1-created"], 1, "the FIFO message's deduplication id: {stats}");
    assert_eq!(stats["by_key"][message_id.as_str()], 1, "the standard queue's MessageId: {stats}");
}
