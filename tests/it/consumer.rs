//! `idem consume` end to end (SPEC §6): the real binary consuming the real NATS JetStream
//! and RabbitMQ servers of this machine, delivering to the real demo upstream (or through a
//! real gateway), counted by what the endpoint executed.

use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::{
    Gateway, Relay, Upstream, client, idem, idem_log, postgres_store, read, require_service, service_address,
    spawn_until_ready, unique_suffix, wait_for_exit,
};

pub fn nats_url() -> String {
    let url = std::env::var("IDEM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    require_service("NATS", "IDEM_TEST_NATS_URL", &url);
    url
}

pub fn rabbit_url() -> String {
    let url =
        std::env::var("IDEM_TEST_RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    require_service("RabbitMQ", "IDEM_TEST_RABBITMQ_URL", &url);
    url
}

/// A running `idem consume` with its consumer file and logs in a temp dir.
pub struct Consumer {
    pub dir: TempDir,
    file: PathBuf,
    subscriber: String,
    child: Option<Child>,
    admin: String,
    starts: u32,
    env: Vec<(String, String)>,
}

impl Consumer {
    /// Starts `idem consume` on `toml` (which must configure `[admin] listen = "127.0.0.1:0"`).
    pub async fn start(subscriber: &str, toml: &str) -> Consumer {
        Consumer::start_with_env(subscriber, toml, &[]).await
    }

    /// [`Consumer::start`] with these environment variables set for the process.
    pub async fn start_with_env(subscriber: &str, toml: &str, env: &[(&str, &str)]) -> Consumer {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("consumer.toml");
        std::fs::write(&file, toml).expect("write the consumer file");
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let subscriber = subscriber.to_owned();
        let mut consumer = Consumer { dir, file, subscriber, child: None, admin: String::new(), starts: 0, env };
        consumer.spawn().await;
        consumer
    }

    pub async fn spawn(&mut self) {
        self.starts += 1;
        let (stdout, stderr) = self.log_files();
        let mut command = idem();
        command.arg("consume").arg(&self.file).current_dir(self.dir.path());
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let prefix = format!("idem consume {}: admin http://", self.subscriber);
        let (child, line) = spawn_until_ready(command, &stdout, &stderr, &prefix).await;
        self.admin = line[prefix.len()..].to_owned();
        self.child = Some(child);
    }

    fn log_files(&self) -> (PathBuf, PathBuf) {
        let n = self.starts;
        (self.dir.path().join(format!("consume-{n}.stdout")), self.dir.path().join(format!("consume-{n}.stderr")))
    }

    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let err = self.dir.path().join(format!("consume-{n}.stderr"));
                format!("--- idem consume, start {n} ---\n{}", read(&err))
            })
            .collect()
    }

    /// `idem_messages_total{subscriber, decision}`.
    pub async fn count(&self, decision: &str) -> u64 {
        let Ok(reply) = client().get(format!("http://{}/metrics", self.admin)).send().await else { return 0 };
        let text = reply.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("idem_messages_total{"))
            .filter(|l| l.contains(&format!("decision=\"{decision}\"")))
            .filter(|l| l.contains(&format!("subscriber=\"{}\"", self.subscriber)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        wait_for_exit(&mut child, Duration::from_secs(30)).await.expect("idem consume stops after SIGTERM")
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Polls `test` until it holds; panics with `what` after 60 s.
pub async fn eventually<F: Future<Output = bool>>(what: &str, mut test: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !test().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// NATS JetStream

struct Nats {
    js: jetstream::Context,
    stream: String,
}

impl Nats {
    async fn connect(stream: &str) -> Nats {
        let client = async_nats::connect(nats_url()).await.expect("connect to NATS");
        Nats { js: jetstream::new(client), stream: stream.to_owned() }
    }

    /// Waits for the consumer to create its stream, so what is published is kept.
    async fn wait_for_stream(&self) {
        eventually("the consumer to create its stream", || async { self.js.get_stream(&self.stream).await.is_ok() })
            .await;
    }

    async fn publish(&self, subject: &str, body: Value, msg_id: Option<&str>) {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let ack =
            self.js.publish_with_headers(subject.to_owned(), headers, body.to_string().into()).await.expect("publish");
        ack.await.expect("JetStream stored the message");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let js = self.js.clone();
        let stream = self.stream.clone();
        // Best effort: a stream left behind is harmless (names are unique per run).
        tokio::spawn(async move {
            let _ = js.delete_stream(&stream).await;
        });
    }
}

fn nats_consumer(subscriber: &str, stream: &str, upstream: &str, extra_source: &str, deliver: &str) -> String {
    format!(
        r#"
subscriber = "{subscriber}"
store = "sqlite://./idem.db"
max_attempts = 3
timeout = "2s"

[source]
nats = {{ url = "{nats}", stream = "{stream}", subject = "{stream}.>", durable = "{subscriber}", ack_wait = "2s" }}
{extra_source}

[deliver]
url = "{upstream}/orders/{{{{record.order_id}}}}"
{deliver}

[admin]
listen = "127.0.0.1:0"
"#,
        nats = nats_url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_every_message_published_twice_is_delivered_once_and_stale_versions_are_skipped() {
    let upstream = Upstream::start().await;
    let stream = format!("IT_{}", unique_suffix());
    let toml = nats_consumer(
        "orders-sync",
        &stream,
        &upstream.url(),
        "message_id = { body = \"/id\" }",
        "version = { object = \"/order_id\", version = \"/version\" }",
    );
    let consumer = Consumer::start("orders-sync", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    let subject = format!("{stream}.created");
    // Ten orders, each published twice (a producer's retry), then an older version of
    // order 0 that arrives late, and a newer version of order 1.
    for copy in 0..2 {
        for n in 0..10 {
            nats.publish(&subject, json!({ "id": format!("m-{n}"), "order_id": format!("o-{n}"), "version": 2 }), None)
                .await;
        }
        let _ = copy;
    }
    nats.publish(&subject, json!({ "id": "m-old", "order_id": "o-0", "version": 1 }), None).await;
    nats.publish(&subject, json!({ "id": "m-new", "order_id": "o-1", "version": 3 }), None).await;
    eventually("22 messages settled", || async {
        consumer.count("delivered").await + consumer.count("duplicate").await + consumer.count("stale").await == 22
    })
    .await;
    assert_eq!(consumer.count("delivered").await, 11, "{}", consumer.logs());
    assert_eq!(consumer.count("duplicate").await, 10);
    assert_eq!(consumer.count("stale").await, 1, "the late version 1 of o-0");
    let stats = upstream.stats().await;
    assert_eq!(stats["calls"], 11, "{stats}");
    assert_eq!(stats["by_key"]["m-3"], 1, "the endpoint receives the message id as its Idempotency-Key: {stats}");
    assert_eq!(stats["by_path"]["/orders/o-1"], 2, "versions 2 and 3 of o-1: {stats}");
    assert_eq!(stats["by_path"]["/orders/o-0"], 1, "version 1 arrived after 2: {stats}");
    let listed = idem_log(
        &format!("sqlite://{}", consumer.dir.path().join("idem.db").display()),
        &["list", "--scope", "consumer:orders-sync", "--json"],
    );
    assert_eq!(listed.json()["records"].as_array().map(Vec::len), Some(11), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_header_ids_poison_and_malformed_messages_end_in_needs_review() {
    let upstream = Upstream::start().await;
    let stream = format!("IT_{}", unique_suffix());
    let deliver =
        "headers = { \"X-Demo-Status\" = \"{{record.status}}\", \"X-Demo-Fail-First\" = \"{{record.fail_first}}\" }";
    let toml = nats_consumer("poison", &stream, &upstream.url(), "", deliver);
    let consumer = Consumer::start("poison", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    let subject = format!("{stream}.x");
    let order = |n: u32, status: u16, fail_first: u32| json!({ "order_id": format!("o-{n}"), "status": status, "fail_first": fail_first });
    nats.publish(&subject, order(1, 201, 0), Some("ok-1")).await;
    nats.publish(&subject, order(2, 400, 0), Some("bad-request")).await;
    nats.publish(&subject, order(3, 201, 2), Some("flaky")).await;
    nats.publish(&subject, order(4, 201, 100), Some("always-down")).await;
    nats.publish(&subject, json!({ "order_id": "o-5", "status": 201, "fail_first": 0 }), None).await;
    let raw = async_nats::HeaderMap::new();
    let mut with_id = raw.clone();
    with_id.insert(async_nats::header::NATS_MESSAGE_ID, "not-json");
    nats.js
        .publish_with_headers(subject.clone(), with_id, "<order>".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    nats.publish(&subject, order(6, 201, 0), Some("ok-6")).await;

    eventually("every message settled", || async {
        consumer.count("delivered").await == 3
            && consumer.count("needs_review").await == 2
            && consumer.count("malformed").await == 2
    })
    .await;
    let stats = upstream.stats().await;
    assert_eq!(stats["by_key"]["flaky"], 3, "two 503s, then delivered on the third delivery: {stats}");
    assert_eq!(stats["by_key"]["always-down"], 3, "max_attempts = 3 deliveries, then needs_review: {stats}");
    assert_eq!(stats["by_key"]["bad-request"], 1, "a 400 is not retried: {stats}");
    assert!(stats["by_key"].get("not-json").is_none(), "a malformed message is never delivered: {stats}");
    assert!(consumer.count("retry").await >= 4, "redelivered with a nak: flaky twice, always-down twice");

    let store = format!("sqlite://{}", consumer.dir.path().join("idem.db").display());
    let review = idem_log(&store, &["list", "--status", "needs_review", "--json"]).json();
    let keys: Vec<&str> =
        review["records"].as_array().expect("records").iter().filter_map(|r| r["key"].as_str()).collect();
    assert!(keys.contains(&"bad-request") && keys.contains(&"always-down") && keys.contains(&"not-json"), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("malformed:sha256:")), "the message without an id: {keys:?}");
    assert!(!consumer.logs().contains("<order>"), "a malformed body is never logged");
    let always = review["records"].as_array().into_iter().flatten().find(|r| r["key"] == "always-down").cloned();
    let summary = always.and_then(|r| r["error_summary"].as_str().map(str::to_owned)).unwrap_or_default();
    assert!(summary.contains("gave up after 3 attempts"), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_kill_9_mid_stream_then_restart_has_no_duplicate_effect() {
    let upstream = Upstream::start().await;
    // The endpoint honours Idempotency-Key: the product's own gateway in front of the demo.
    let gateway = Gateway::start(&upstream.url(), "").await;
    let stream = format!("IT_{}", unique_suffix());
    let toml = nats_consumer("kill", &stream, &gateway.url(""), "", "headers = { \"X-Demo-Delay\" = \"20ms\" }");
    let mut consumer = Consumer::start("kill", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    let subject = format!("{stream}.x");
    for n in 0..150 {
        nats.publish(&subject, json!({ "order_id": format!("o-{n}") }), Some(&format!("msg-{n}"))).await;
    }
    eventually("some deliveries", || async { upstream.calls().await >= 20 }).await;
    consumer.kill9();
    let at_kill = upstream.calls().await;
    consumer.restart().await;
    eventually("all 150 orders executed", || async { upstream.calls().await >= 150 }).await;
    // Quiet for a few redelivery periods: nothing more arrives.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats = upstream.stats().await;
    assert_eq!(stats["calls"], 150, "killed after {at_kill} calls: {stats}");
    for n in 0..150 {
        assert_eq!(stats["by_key"][format!("msg-{n}")], 1, "msg-{n}: {stats}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consumers_on_one_postgres_store_share_the_work_without_duplicates() {
    let upstream = Upstream::start().await;
    let store = postgres_store();
    let stream = format!("IT_{}", unique_suffix());
    let toml = nats_consumer("shared", &stream, &upstream.url(), "message_id = { body = \"/id\" }", "")
        .replace("sqlite://./idem.db", &store.url);
    let first = Consumer::start("shared", &toml).await;
    let second = Consumer::start("shared", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    let subject = format!("{stream}.x");
    for n in 0..60 {
        let message = json!({ "id": format!("m-{n}"), "order_id": format!("o-{n}") });
        nats.publish(&subject, message.clone(), None).await;
        nats.publish(&subject, message, None).await;
    }
    let settled = || async {
        let mut total = 0;
        for consumer in [&first, &second] {
            total += consumer.count("delivered").await + consumer.count("duplicate").await;
        }
        total
    };
    eventually("120 messages settled", || async { settled().await == 120 }).await;
    let stats = upstream.stats().await;
    assert_eq!(stats["calls"], 60, "{stats}");
    for n in 0..60 {
        assert_eq!(stats["by_key"][format!("m-{n}")], 1, "m-{n}: {stats}");
    }
    let (a, b) = (first.count("delivered").await, second.count("delivered").await);
    eprintln!("deliveries: first consumer {a}, second {b}");
}

// ---------------------------------------------------------------------------------------
// RabbitMQ

pub async fn rabbit() -> Connection {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Connection::connect(&rabbit_url(), properties).await.expect("connect to RabbitMQ")
}

async fn publish_amqp(channel: &lapin::Channel, queue: &str, body: &[u8], message_id: Option<&str>) {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    channel
        .basic_publish("", queue, BasicPublishOptions::default(), body, properties)
        .await
        .expect("publish")
        .await
        .expect("confirmed");
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_duplicates_are_skipped_and_poison_is_dead_lettered() {
    let upstream = Upstream::start().await;
    let queue = format!("it-orders-{}", unique_suffix());
    let dead = format!("{queue}-dead");
    let connection = rabbit().await;
    let channel = connection.create_channel().await.expect("a channel");
    // A dead-letter exchange and its queue, for the consumer to name.
    let fanout = ExchangeDeclareOptions { auto_delete: true, ..Default::default() };
    channel.exchange_declare(&dead, ExchangeKind::Fanout, fanout, FieldTable::default()).await.expect("dlx");
    channel.queue_declare(&dead, QueueDeclareOptions::default(), FieldTable::default()).await.expect("dead queue");
    channel.queue_bind(&dead, &dead, "", QueueBindOptions::default(), FieldTable::default()).await.expect("bind");

    let toml = format!(
        r#"
subscriber = "rabbit"
max_attempts = 2
timeout = "2s"

[source]
rabbitmq = {{ url = "{url}", queue = "{queue}", dead_letter_exchange = "{dead}" }}

[deliver]
url = "{upstream}/orders/{{{{record.order_id}}}}"
headers = {{ "X-Demo-Status" = "{{{{record.status}}}}" }}

[admin]
listen = "127.0.0.1:0"
"#,
        url = rabbit_url(),
        upstream = upstream.url(),
    );
    let mut consumer = Consumer::start("rabbit", &toml).await;
    // The consumer declares the queue (with its dead-letter exchange) when it is missing.
    eventually("the consumer to declare its queue", || async {
        let probe = connection.create_channel().await.expect("a channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        probe.queue_declare(&queue, passive, FieldTable::default()).await.is_ok()
    })
    .await;
    for copy in 0..2 {
        for n in 0..10 {
            let body = json!({ "order_id": format!("o-{n}"), "status": 201 }).to_string();
            publish_amqp(&channel, &queue, body.as_bytes(), Some(&format!("m-{n}"))).await;
        }
        let _ = copy;
    }
    publish_amqp(&channel, &queue, br#"{"order_id":"o-x","status":400}"#, Some("rejected")).await;
    publish_amqp(&channel, &queue, b"not json", Some("garbled")).await;
    eventually("22 messages settled", || async {
        consumer.count("delivered").await + consumer.count("duplicate").await == 20
            && consumer.count("needs_review").await + consumer.count("malformed").await == 2
    })
    .await;
    let stats = upstream.stats().await;
    assert_eq!(stats["calls"], 11, "ten orders once, the rejected one once: {stats}");
    // Both poison messages went to the dead-letter queue.
    let mut dead_letters = channel
        .basic_consume(
            &dead,
            "it-dead",
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume the dead letters");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
            .await
            .expect("a dead letter within 10 s")
            .expect("a delivery")
            .expect("ok");
        ids.push(delivery.properties.message_id().as_ref().map(|id| id.to_string()).unwrap_or_default());
    }
    ids.sort();
    assert_eq!(ids, ["garbled", "rejected"]);

    // SIGTERM: a clean stop, exit 0; what it recorded is there for the next start.
    assert!(consumer.terminate().await.success(), "{}", consumer.logs());
    consumer.spawn().await;
    publish_amqp(&channel, &queue, br#"{"order_id":"o-1","status":201}"#, Some("m-1")).await;
    eventually("the copy after a restart is a duplicate", || async { consumer.count("duplicate").await == 1 }).await;
    assert_eq!(upstream.stats().await["calls"], 11);
    let _ = channel.queue_delete(&queue, QueueDeleteOptions::default()).await;
    let _ = channel.queue_delete(&dead, QueueDeleteOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_consumer_file_is_refused_with_the_key_path() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("consumer.toml");
    std::fs::write(
        &file,
        "subscriber = \"s\"\n[source]\nnats = { url = \"nats://127.0.0.1:4222\", stream = \"S\", subject = \"s.>\", durable = \"s\" }\n[deliver]\nurl = \"http://h/x\"\nretry = 3\n",
    )
    .expect("write");
    let output = idem().arg("consume").arg(&file).output().expect("idem consume runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("deliver.retry") && stderr.contains("unknown field"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_reconnect_when_the_broker_connection_is_cut() {
    let upstream = Upstream::start().await;
    // NATS: the client reconnects by itself; the pull subscription is made anew.
    let nats_relay = Relay::start(&service_address(&nats_url())).await;
    let stream = format!("IT_{}", unique_suffix());
    let toml = nats_consumer("nats-cut", &stream, &upstream.url(), "", "")
        .replace(&nats_url(), &format!("nats://{}", nats_relay.address()));
    let nats_consumer = Consumer::start("nats-cut", &toml).await;
    // RabbitMQ: idem reconnects with backoff and consumes again.
    let rabbit_relay = Relay::start(&service_address(&rabbit_url())).await;
    let queue = format!("it-cut-{}", unique_suffix());
    let toml = format!(
        "subscriber = \"rabbit-cut\"\n[source]\nrabbitmq = {{ url = \"amqp://guest:guest@{}/%2f\", queue = \"{queue}\" }}\n\
         [deliver]\nurl = \"{}/orders\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        rabbit_relay.address(),
        upstream.url()
    );
    let rabbit_consumer = Consumer::start("rabbit-cut", &toml).await;

    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    let connection = rabbit().await;
    let channel = connection.create_channel().await.expect("a channel");
    eventually("the consumer to declare its queue", || async {
        let probe = connection.create_channel().await.expect("a channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        probe.queue_declare(&queue, passive, FieldTable::default()).await.is_ok()
    })
    .await;
    let publish_both = |range: std::ops::Range<u32>| {
        let (nats, channel, queue, subject) = (&nats, &channel, &queue, format!("{stream}.x"));
        async move {
            for n in range {
                nats.publish(&subject, json!({ "order_id": n }), Some(&format!("nats-{n}"))).await;
                let body = json!({ "order_id": n }).to_string();
                publish_amqp(channel, queue, body.as_bytes(), Some(&format!("amqp-{n}"))).await;
            }
        }
    };
    publish_both(0..5).await;
    eventually("the first five delivered by both", || async {
        nats_consumer.count("delivered").await == 5 && rabbit_consumer.count("delivered").await == 5
    })
    .await;
    nats_relay.cut();
    rabbit_relay.cut();
    publish_both(5..10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats_relay.restore();
    rabbit_relay.restore();
    eventually("the next five delivered after the broker came back", || async {
        nats_consumer.count("delivered").await == 10 && rabbit_consumer.count("delivered").await == 10
    })
    .await;
    assert_eq!(upstream.stats().await["calls"], 20);
    let _ = channel.queue_delete(&queue, QueueDeleteOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_messages_in_flight() {
    let upstream = Upstream::start().await;
    let stream = format!("IT_{}", unique_suffix());
    let toml = nats_consumer("graceful", &stream, &upstream.url(), "", "headers = { \"X-Demo-Delay\" = \"1s\" }");
    let mut consumer = Consumer::start("graceful", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    nats.publish(&format!("{stream}.x"), json!({ "order_id": "slow" }), Some("slow-1")).await;
    eventually("the slow call to reach the endpoint", || async { upstream.calls().await == 1 }).await;
    let status = consumer.terminate().await;
    assert!(status.success(), "{status}: {}", consumer.logs());
    let store = format!("sqlite://{}", consumer.dir.path().join("idem.db").display());
    let record = idem_log(&store, &["show", "--scope", "consumer:graceful", "--key", "slow-1", "--json"]).json();
    assert_eq!(record["status"], "completed", "the answer was recorded before the exit: {record}");
    // Acknowledged too: a new consumer process receives nothing more.
    consumer.spawn().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(consumer.count("delivered").await + consumer.count("duplicate").await, 0);
    assert_eq!(upstream.calls().await, 1);
}

/// The Idempotency Log page on the consumer's admin listener (no token: loopback), driven
/// in the browser over a delivered message's record (`tests/browser/consumer_page.py`).
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_serves_the_log_page_over_its_records() {
    let tools = crate::browser_support::BrowserTools::require();
    let upstream = Upstream::start().await;
    let stream = format!("IT_{}", unique_suffix());
    let toml = nats_consumer("page-sync", &stream, &upstream.url(), "message_id = { body = \"/id\" }", "");
    let consumer = Consumer::start("page-sync", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    nats.publish(&format!("{stream}.created"), json!({ "id": "msg-1", "order_id": "o-1" }), None).await;
    eventually("the message delivered", || async { consumer.count("delivered").await == 1 }).await;

    let admin = format!("http://{}", consumer.admin);
    let mut script = std::process::Command::new(tools.python());
    script.arg(crate::browser_support::repo_file("tests/browser/consumer_page.py"));
    script.args(["--admin", &admin, "--subscriber", "page-sync", "--key", "msg-1"]);
    crate::browser_support::run_tool(script, "the browser test (tests/browser/consumer_page.py)");
}

/// `[deliver] postgres` (SPEC §6): each message's statement and its record commit in one
/// transaction. The statement is a plain `INSERT` into a table keyed by the order id, so a
/// statement run twice would fail on the key and end `needs_review`: with duplicates
/// published and the consumer killed with `-9` mid-stream, every order is inserted exactly
/// once and every record is `completed`.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_delivery_commits_each_message_with_its_record_through_kill_9() {
    const ORDERS: usize = 120;
    let store = postgres_store();
    let table = format!("orders_{}", unique_suffix());
    let (db, connection) =
        tokio_postgres::connect(&crate::support::postgres_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    db.batch_execute(&format!("CREATE TABLE {table} (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")).await.unwrap();
    let stream = format!("IT_{}", unique_suffix());
    let toml = format!(
        r#"
        subscriber = "pg-sync"
        store = "{store}"
        [source]
        nats = {{ url = "{nats}", stream = "{stream}", subject = "{stream}.>", durable = "pg-sync", ack_wait = "2s" }}
        message_id = {{ body = "/order_id" }}
        [deliver]
        postgres = {{ statement = "INSERT INTO {table} (id, amount) VALUES ($1, $2)", params = ["/order_id", "/amount"] }}
        [admin]
        listen = "127.0.0.1:0"
        "#,
        store = store.url,
        nats = nats_url(),
    );
    let mut consumer = Consumer::start("pg-sync", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    for i in 0..ORDERS {
        let order = json!({ "order_id": format!("o-{i}"), "amount": i });
        nats.publish(&format!("{stream}.created"), order.clone(), None).await;
        if i % 3 == 0 {
            nats.publish(&format!("{stream}.created"), order, None).await;
        }
    }
    let inserted =
        || async { db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get::<_, i64>(0) };
    eventually("a third of the orders inserted", || async { inserted().await >= (ORDERS / 3) as i64 }).await;
    consumer.restart().await; // kill -9, then a new process on the same durable consumer
    // A redelivered copy of an order already inserted is a duplicate, and a message under
    // a known id with other values is refused for review.
    nats.publish(&format!("{stream}.created"), json!({ "order_id": "o-1", "amount": 999 }), None).await;
    eventually("every order inserted", || async { inserted().await == ORDERS as i64 }).await;
    eventually("the changed copy refused", || async { consumer.count("needs_review").await == 1 }).await;
    let amount: i64 = db.query_one(&format!("SELECT amount FROM {table} WHERE id = 'o-1'"), &[]).await.unwrap().get(0);
    assert_eq!(amount, 1, "the changed copy changed nothing");
    let records = idem_log(&store.url, &["list", "--scope", "consumer:pg-sync", "--json", "--limit", "1000"]).json();
    let records = records["records"].as_array().expect("a list of records").clone();
    let completed = records.iter().filter(|r| r["status"] == "completed").count();
    assert_eq!((completed, records.len()), (ORDERS, ORDERS), "one completed record per order, nothing unknown");
    db.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_delivery_needs_the_store_to_be_that_database() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("consumer.toml");
    let toml = r#"
        subscriber = "pg-sync"
        store = "sqlite://./idem.db"
        [source]
        nats = { url = "nats://127.0.0.1:4222", stream = "S", subject = "s.>", durable = "d" }
        [deliver]
        postgres = { url = "postgres://root@127.0.0.1:5432/other", statement = "SELECT 1", params = ["id"] }
        url = "http://127.0.0.1:9000"
        "#;
    std::fs::write(&file, toml).unwrap();
    let output = idem().arg("consume").arg(&file).output().expect("idem runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for needle in [
        "store: must be the PostgreSQL database deliver.postgres writes to",
        "deliver.postgres.url: must name the store's database",
        "deliver.postgres.params: invalid JSON pointer \"id\"",
        "deliver.url: does not go with deliver.postgres",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from {stderr}");
    }
}

/// A delivery sent and never answered, without an idempotency header (not safe to re-send):
/// with a `verify` lookup its redelivery asks the endpoint, finds the order there, and is
/// acknowledged as delivered; the order is executed once.
#[tokio::test(flavor = "multi_thread")]
async fn nats_a_lost_delivery_is_settled_by_its_lookup_on_redelivery() {
    let upstream = Upstream::start().await;
    let stream = format!("IT_{}", unique_suffix());
    let url = upstream.url();
    let deliver = format!(
        "idempotency_header = \"\"\nheaders = {{ X-Demo-Fault = \"drop\" }}\n\
         verify = {{ url = \"{url}/_demo/lookup?order_id={{{{record.order_id}}}}\", found = \"/data/0\" }}"
    );
    let toml = nats_consumer("lost-sync", &stream, &url, "message_id = { body = \"/id\" }", &deliver);
    let consumer = Consumer::start("lost-sync", &toml).await;
    let nats = Nats::connect(&stream).await;
    nats.wait_for_stream().await;
    nats.publish(&format!("{stream}.created"), json!({ "id": "m-1", "order_id": "o-1" }), None).await;
    eventually("the lost delivery settled", || async { consumer.count("delivered").await == 1 }).await;
    assert_eq!(consumer.count("retry").await, 1, "the first delivery lost its answer: {}", consumer.logs());
    assert_eq!(upstream.stats().await["by_path"]["/orders/o-1"], 1, "executed once");
    let store = format!("sqlite://{}", consumer.dir.path().join("idem.db").display());
    let record = idem_log(&store, &["show", "--scope", "consumer:lost-sync", "--key", "m-1", "--json"]).json();
    assert_eq!(record["status"], "completed", "{record}");
    assert!(record["error_summary"].as_str().unwrap_or_default().starts_with("settled by lookup"), "{record}");
}
