//! The baseline of `bench/consume.sh`: what a bare broker client does with the same
//! messages, the same broker client (async-nats / lapin / rdkafka / the AWS SDK), the same HTTP client (reqwest, one
//! keep-alive pool) and the same concurrency as `idem consume`, with no store and no
//! bookkeeping — and the helpers the script needs around it (publishing, broker state,
//! clean-up, timing a running `idem consume` from its metrics).
//!
//! ```sh
//! # NATS JetStream: a fresh stream of N messages, then a durable pull consumer on it
//! cargo run --release --example bare_consumer -- nats-publish --stream BENCH_1 --count 50000
//! cargo run --release --example bare_consumer -- nats-consume --stream BENCH_1 --count 50000 \
//!     --concurrency 64 --endpoint http://127.0.0.1:9000/v1/orders   # leave out --endpoint: ack only
//! cargo run --release --example bare_consumer -- nats-info --stream BENCH_1 --durable bench
//! cargo run --release --example bare_consumer -- nats-delete --prefix BENCH_
//! # RabbitMQ: a fresh durable queue of N persistent messages, then manual acks
//! cargo run --release --example bare_consumer -- rabbit-publish --queue bench-1 --count 50000
//! cargo run --release --example bare_consumer -- rabbit-consume --queue bench-1 --count 50000 \
//!     --concurrency 64 --endpoint http://127.0.0.1:9000/v1/orders
//! # Kafka: a fresh one-partition topic, then a consumer group committing each offset after its POST
//! cargo run --release --example bare_consumer -- kafka-publish --brokers 127.0.0.1:9092 --topic bench-1 --count 50000
//! cargo run --release --example bare_consumer -- kafka-consume --topic bench-1 --count 50000 --endpoint http://127.0.0.1:9000/v1/orders
//! # SQS (any server that speaks its API): a fresh queue, then receive, POST, delete
//! cargo run --release --example bare_consumer -- sqs-publish --sqs http://127.0.0.1:5000 --queue bench-1 --count 5000
//! cargo run --release --example bare_consumer -- sqs-consume --sqs http://127.0.0.1:5000 --queue bench-1 --count 5000 \
//!     --endpoint http://127.0.0.1:9000/v1/orders
//! # a running `idem consume` (its [admin] listener): until N messages are settled
//! cargo run --release --example bare_consumer -- watch --admin 127.0.0.1:8082 --subscriber bench --count 50000
//! ```
//!
//! Messages are small JSON objects (~110 bytes) with a unique `"id"` (`m-00000001`, …), the
//! message id `idem consume` reads with `message_id = { body = "/id" }`.
//!
//! `nats-consume` / `rabbit-consume` mirror `idem consume`'s shape: one task reads the
//! broker's stream of messages (NATS: a durable pull consumer, explicit acks,
//! `max_messages_per_batch = concurrency`, the same heartbeat and expiry; RabbitMQ:
//! `basic.qos(prefetch = concurrency)`, manual acks) and spawns one task per message, at
//! most `concurrency` at once; the task POSTs the body with `Idempotency-Key: {id}` (the id
//! parsed out of the body, as idem does) and reads the answer to its end, then acks — or,
//! without `--endpoint`, only acks: the broker client's ceiling. They stop after `count`
//! messages and print one line:
//! `BARE mode=http|ack messages=… errors=… seconds=… rate=… total_seconds=… cpu_seconds=…`,
//! where `seconds` runs from the first message settled to the last (steady state; `rate` =
//! (count − 1) / seconds), `total_seconds` from the first pull to the last ack, and
//! `cpu_seconds` is the process's user + system CPU time (connecting included).
//!
//! `watch` polls `GET /metrics` of an `idem consume` every `--interval-ms` and sums
//! `idem_messages_total{subscriber=…}` over the final decisions (everything but `retry`,
//! `in_flight` and `store_unavailable`); it prints
//! `WATCH messages=… first_seen=… seconds=… rate=… done_at=… delivered=… duplicate=… …`,
//! where `first_seen` is the count at the first poll that saw any, `seconds` runs from that
//! poll to the poll that saw all `count`, `rate` = (count − first_seen) / seconds (the same
//! steady-state definition as the baseline, to within one polling interval), and `done_at`
//! is the Unix time of the last poll (so the script can add the process's start-up).

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// (Re)create a JetStream stream (subjects `{stream}.>`) and publish `count` messages to it.
    NatsPublish {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        count: u64,
        /// Publish acks awaited at once.
        #[arg(long, default_value_t = 512)]
        window: usize,
    },
    /// Consume `count` messages with a durable pull consumer, POST each one (or not), ack it.
    NatsConsume {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        #[arg(long)]
        stream: String,
        #[arg(long, default_value = "bench")]
        durable: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Where to POST each message; without it, messages are only acked.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Print a durable consumer's state: `INFO num_pending=… num_ack_pending=… ack_floor=…`.
    NatsInfo {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        #[arg(long)]
        stream: String,
        #[arg(long, default_value = "bench")]
        durable: String,
    },
    /// Delete streams: these names, and every stream whose name starts with `--prefix`.
    NatsDelete {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
        #[arg(long)]
        prefix: Option<String>,
        streams: Vec<String>,
    },
    /// (Re)declare a durable queue and publish `count` persistent messages to it, confirmed.
    RabbitPublish {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        count: u64,
        /// Publisher confirms awaited at once.
        #[arg(long, default_value_t = 512)]
        window: usize,
    },
    /// Consume `count` messages with manual acks, POST each one (or not), ack it.
    RabbitConsume {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Print a queue's state: `INFO ready=… consumers=…`.
    RabbitInfo {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        #[arg(long)]
        queue: String,
    },
    /// Delete queues (missing ones are fine).
    RabbitDelete {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        queues: Vec<String>,
    },
    /// (Re)create a Kafka topic (one partition, as `idem consume` creates it) and publish
    /// `count` messages to it, each acknowledged by the broker.
    KafkaPublish {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        count: u64,
        /// Deliveries awaited at once.
        #[arg(long, default_value_t = 512)]
        window: usize,
    },
    /// Consume `count` messages in a consumer group, POST each one (or not), then commit
    /// its offset.
    KafkaConsume {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "bench")]
        group: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Print a group's committed offset and the topic's end: `INFO committed=… end=…`.
    KafkaInfo {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "bench")]
        group: String,
    },
    /// Delete topics (missing ones are fine).
    KafkaDelete {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        topics: Vec<String>,
    },
    /// (Re)create an SQS queue and send `count` messages to it, in batches of ten.
    SqsPublish {
        /// The SQS server's URL.
        #[arg(long)]
        sqs: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        count: u64,
        /// Batches in flight at once.
        #[arg(long, default_value_t = 8)]
        window: usize,
    },
    /// Receive `count` messages (long polling, ten at a time), POST each one (or not), then
    /// delete it.
    SqsConsume {
        #[arg(long)]
        sqs: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Print a queue's state: `INFO visible=… in_flight=…`.
    SqsInfo {
        #[arg(long)]
        sqs: String,
        #[arg(long)]
        queue: String,
    },
    /// Delete queues (missing ones are fine).
    SqsDelete {
        #[arg(long)]
        sqs: String,
        queues: Vec<String>,
    },
    /// Poll a running `idem consume`'s /metrics until `count` messages are settled.
    Watch {
        /// The admin listener, HOST:PORT.
        #[arg(long)]
        admin: String,
        #[arg(long)]
        subscriber: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// Message `n` (1-based): ~110 bytes of JSON with a unique `id`.
fn body(n: u64) -> Vec<u8> {
    format!(
        r#"{{"id":"m-{n:08}","order_id":"o-{n:08}","customer":"cus_{}","amount":{},"currency":"EUR","note":"bench"}}"#,
        n % 9973,
        100 + (n * 7919) % 100_000
    )
    .into_bytes()
}

/// The message id, read the way `idem consume` reads it (`message_id = { body = "/id" }`).
fn id_of(payload: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(payload).ok()?.get("id")? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, 100 ticks/s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split(' ').collect();
    // After the name: field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
    seconds
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The same client settings as the runner's engine (which `idem consume` uses).
fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).user_agent("idem-bench-bare/0").build()?)
}

/// POSTs one message; `Err` with a reason when it failed or answered anything but 2xx.
async fn post(client: &reqwest::Client, endpoint: &str, payload: &[u8]) -> Result<(), String> {
    let id = id_of(payload).ok_or("no id in the message")?;
    let response = client
        .post(endpoint)
        .timeout(Duration::from_secs(30))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", id)
        .body(payload.to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    response.bytes().await.map_err(|e| format!("body: {e}"))?;
    if status.is_success() { Ok(()) } else { Err(format!("status {status}")) }
}

/// What the consume loops share: counts, the time of the first and last settled message.
struct Tally {
    started: Instant,
    settled: AtomicU64,
    errors: AtomicU64,
    /// Nanoseconds since `started` of the first and the last settlement.
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            settled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            first_error: std::sync::Mutex::new(None),
        }
    }

    fn settled(&self, outcome: Result<(), String>) {
        let at = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.first_ns.fetch_min(at, Ordering::Relaxed);
        self.last_ns.fetch_max(at, Ordering::Relaxed);
        self.settled.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = outcome {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    }

    /// Prints the BARE line; true when every message was delivered and acked.
    fn report(&self, mode: &str, count: u64) -> bool {
        let total = self.started.elapsed().as_secs_f64();
        let (first, last) = (self.first_ns.load(Ordering::Relaxed), self.last_ns.load(Ordering::Relaxed));
        #[allow(clippy::cast_precision_loss)]
        let seconds = if first <= last { (last - first) as f64 / 1e9 } else { 0.0 };
        let (settled, errors) = (self.settled.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed));
        #[allow(clippy::cast_precision_loss)]
        let rate = if seconds > 0.0 { settled.saturating_sub(1) as f64 / seconds } else { 0.0 };
        println!(
            "BARE mode={mode} messages={settled} errors={errors} seconds={seconds:.3} rate={rate:.0} total_seconds={total:.3} cpu_seconds={:.3}",
            cpu_seconds()
        );
        if let Some(e) = self.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            eprintln!("bare_consumer: first error: {e}");
        }
        errors == 0 && settled == count
    }
}

// ------------------------------------------------------------------------ NATS JetStream

async fn nats(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new().name("idem-bench-bare").connect(url).await?;
    Ok(jetstream::new(client))
}

async fn nats_publish(url: &str, name: &str, count: u64, window: usize) -> anyhow::Result<()> {
    let js = nats(url).await?;
    let _ = js.delete_stream(name).await;
    // The configuration `idem consume` would create: a name and one subject filter.
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.>")],
        ..Default::default()
    })
    .await?;
    let subject = format!("{name}.orders");
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for n in 1..=count {
        pending.push(js.publish(subject.clone(), body(n).into()).await?.into_future());
        while pending.len() >= window.max(1) {
            pending.next().await.transpose()?;
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let info = js.get_stream(name).await?.get_info().await?;
    anyhow::ensure!(info.state.messages == count, "the stream holds {} messages, not {count}", info.state.messages);
    #[allow(clippy::cast_precision_loss)]
    let rate = count as f64 / seconds;
    println!("PUBLISHED broker=nats stream={name} messages={count} seconds={seconds:.3} rate={rate:.0}");
    Ok(())
}

async fn nats_consume(
    url: &str,
    name: &str,
    durable: &str,
    count: u64,
    concurrency: usize,
    endpoint: Option<String>,
) -> anyhow::Result<bool> {
    let js = nats(url).await?;
    let stream = js.get_stream(name).await?;
    // The same consumer and pull settings as `idem consume` (src/consumer/nats.rs).
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: format!("{name}.>"),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let client = http_client()?;
    let endpoint: Option<Arc<str>> = endpoint.map(Into::into);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tally = Arc::new(Tally::new());
    let mut pulled = consumer
        .stream()
        .max_messages_per_batch(concurrency.max(1))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut received = 0u64;
    let mut missed_heartbeats = 0u64;
    while received < count {
        let permit = permits.clone().acquire_owned().await?;
        let Some(message) = pulled.next().await else { anyhow::bail!("the pull subscription ended") };
        let message = match message {
            Ok(message) => message,
            // async-nats reports a missed idle heartbeat (no message nor heartbeat for twice
            // the heartbeat interval, e.g. on a stalled machine) and carries on pulling.
            Err(e) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                eprintln!("bare_consumer: {e} after {received} messages; pulling on");
                missed_heartbeats += 1;
                continue;
            }
            Err(e) => anyhow::bail!("pulling after {received} messages: {e}"),
        };
        received += 1;
        let (client, endpoint, tally) = (client.clone(), endpoint.clone(), tally.clone());
        tasks.spawn(async move {
            let delivered = match &endpoint {
                Some(endpoint) => post(&client, endpoint, &message.payload).await,
                None => Ok(()),
            };
            let outcome = match delivered {
                Ok(()) => message.ack().await.map_err(|e| format!("ack: {e}")),
                Err(e) => {
                    let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
                    Err(e)
                }
            };
            tally.settled(outcome);
            drop(permit);
        });
        // Reap finished tasks as we go, as idem's JoinSet does.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mode = if endpoint.is_some() { "http" } else { "ack" };
    if missed_heartbeats > 0 {
        eprintln!("bare_consumer: {missed_heartbeats} missed idle heartbeat(s) reported by async-nats");
    }
    let all_ok = tally.report(mode, count);
    // Acks are fire-and-forget publishes: flush them before the process exits.
    drop(pulled);
    js.client().flush().await?;
    Ok(all_ok)
}

async fn nats_info(url: &str, name: &str, durable: &str) -> anyhow::Result<()> {
    let js = nats(url).await?;
    let consumer: consumer::PullConsumer = js
        .get_stream(name)
        .await?
        .get_consumer(durable)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {durable}: {e}"))?;
    let info = consumer.get_info().await?;
    println!(
        "INFO num_pending={} num_ack_pending={} num_redelivered={} delivered={} ack_floor={}",
        info.num_pending,
        info.num_ack_pending,
        info.num_redelivered,
        info.delivered.stream_sequence,
        info.ack_floor.stream_sequence
    );
    Ok(())
}

async fn nats_delete(url: &str, prefix: Option<&str>, names: &[String]) -> anyhow::Result<()> {
    let js = nats(url).await?;
    let mut doomed: Vec<String> = names.to_vec();
    if let Some(prefix) = prefix.filter(|p| !p.is_empty()) {
        let mut all = js.stream_names();
        while let Some(name) = all.next().await {
            let name = name?;
            if name.starts_with(prefix) {
                doomed.push(name);
            }
        }
    }
    for name in doomed {
        match js.delete_stream(&name).await {
            Ok(_) => eprintln!("deleted stream {name}"),
            Err(e) => eprintln!("stream {name}: {e}"),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------ RabbitMQ

async fn rabbit(url: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Ok(Connection::connect(url, properties).await?)
}

async fn rabbit_publish(url: &str, queue: &str, count: u64, window: usize) -> anyhow::Result<()> {
    let connection = rabbit(url).await?;
    let channel = connection.create_channel().await?;
    let _ = channel.queue_delete(queue, QueueDeleteOptions::default()).await;
    // What `idem consume` declares when the queue is missing: durable, no arguments.
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue, durable, FieldTable::default()).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let properties = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
    for n in 1..=count {
        let confirm =
            channel.basic_publish("", queue, BasicPublishOptions::default(), &body(n), properties.clone()).await?;
        pending.push(confirm);
        while pending.len() >= window.max(1) {
            if let Some(confirm) = pending.next().await {
                anyhow::ensure!(confirm?.is_ack(), "the broker refused a message");
            }
        }
    }
    while let Some(confirm) = pending.next().await {
        anyhow::ensure!(confirm?.is_ack(), "the broker refused a message");
    }
    let seconds = started.elapsed().as_secs_f64();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let ready = channel.queue_declare(queue, passive, FieldTable::default()).await?.message_count();
    anyhow::ensure!(u64::from(ready) == count, "the queue holds {ready} messages, not {count}");
    let _ = connection.close(200, "published").await;
    #[allow(clippy::cast_precision_loss)]
    let rate = count as f64 / seconds;
    println!("PUBLISHED broker=rabbitmq queue={queue} messages={count} seconds={seconds:.3} rate={rate:.0}");
    Ok(())
}

async fn rabbit_consume(
    url: &str,
    queue: &str,
    count: u64,
    concurrency: usize,
    endpoint: Option<String>,
) -> anyhow::Result<bool> {
    let connection = rabbit(url).await?;
    let channel = connection.create_channel().await?;
    // The same settings as `idem consume` (src/consumer/rabbitmq.rs).
    let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX);
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let client = http_client()?;
    let endpoint: Option<Arc<str>> = endpoint.map(Into::into);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tally = Arc::new(Tally::new());
    let tag = format!("bench-bare-{}", std::process::id());
    let mut deliveries =
        channel.basic_consume(queue, &tag, BasicConsumeOptions::default(), FieldTable::default()).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut received = 0u64;
    while received < count {
        let permit = permits.clone().acquire_owned().await?;
        let Some(delivery) = deliveries.next().await else { anyhow::bail!("the consumer was cancelled") };
        let delivery = delivery?;
        received += 1;
        let (client, endpoint, tally) = (client.clone(), endpoint.clone(), tally.clone());
        tasks.spawn(async move {
            let delivered = match &endpoint {
                Some(endpoint) => post(&client, endpoint, &delivery.data).await,
                None => Ok(()),
            };
            let outcome = match delivered {
                Ok(()) => {
                    delivery.acker.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(|e| format!("ack: {e}"))
                }
                Err(e) => Err(e),
            };
            tally.settled(outcome);
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mode = if endpoint.is_some() { "http" } else { "ack" };
    let all_ok = tally.report(mode, count);
    let _ = connection.close(200, "done").await;
    Ok(all_ok)
}

async fn rabbit_info(url: &str, queue: &str) -> anyhow::Result<()> {
    let connection = rabbit(url).await?;
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = channel.queue_declare(queue, passive, FieldTable::default()).await?;
    println!("INFO ready={} consumers={}", q.message_count(), q.consumer_count());
    let _ = connection.close(200, "done").await;
    Ok(())
}

async fn rabbit_delete(url: &str, queues: &[String]) -> anyhow::Result<()> {
    let connection = rabbit(url).await?;
    for queue in queues {
        // A failed delete closes the channel: one channel per queue.
        let channel = connection.create_channel().await?;
        match channel.queue_delete(queue, QueueDeleteOptions::default()).await {
            Ok(n) => eprintln!("deleted queue {queue} ({n} messages left in it)"),
            Err(e) => eprintln!("queue {queue}: {e}"),
        }
    }
    let _ = connection.close(200, "done").await;
    Ok(())
}

// ------------------------------------------------------------------------ watch

/// Decisions after which `idem consume` acks or rejects: the message is settled for good.
const FINAL: [&str; 6] = ["delivered", "duplicate", "stale", "needs_review", "unknown", "malformed"];

/// `idem_messages_total{subscriber=…}` by decision.
fn decisions(text: &str, subscriber: &str) -> Vec<(String, u64)> {
    let wanted = format!("subscriber=\"{subscriber}\"");
    let mut out: Vec<(String, u64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("idem_messages_total{") && l.contains(&wanted)) {
        let Some(start) = line.find("decision=\"") else { continue };
        let rest = &line[start + 10..];
        let Some(end) = rest.find('"') else { continue };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        out.push((rest[..end].to_owned(), value));
    }
    out
}

async fn watch(
    admin: &str,
    subscriber: &str,
    count: u64,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let url = format!("http://{admin}/metrics");
    let deadline = Instant::now() + timeout;
    let mut first: Option<(Instant, u64)> = None;
    let mut last = Vec::new();
    loop {
        let polled = Instant::now();
        if let Ok(response) = client.get(&url).send().await {
            let text = response.text().await.unwrap_or_default();
            last = decisions(&text, subscriber);
            let settled: u64 = last.iter().filter(|(d, _)| FINAL.contains(&d.as_str())).map(|(_, v)| v).sum();
            if settled > 0 && first.is_none() {
                first = Some((polled, settled));
            }
            if settled >= count {
                let (t1, d1) = first.unwrap_or((polled, settled));
                let seconds = polled.duration_since(t1).as_secs_f64();
                #[allow(clippy::cast_precision_loss)]
                let rate = if seconds > 0.0 { (settled - d1) as f64 / seconds } else { 0.0 };
                let by: Vec<String> = last.iter().map(|(d, v)| format!("{d}={v}")).collect();
                println!(
                    "WATCH messages={settled} first_seen={d1} seconds={seconds:.3} rate={rate:.0} done_at={:.3} {}",
                    unix_now(),
                    by.join(" ")
                );
                return Ok(true);
            }
        }
        if Instant::now() > deadline {
            let by: Vec<String> = last.iter().map(|(d, v)| format!("{d}={v}")).collect();
            println!("WATCH timeout after {}s: {}", timeout.as_secs(), by.join(" "));
            return Ok(false);
        }
        tokio::time::sleep(interval.saturating_sub(polled.elapsed())).await;
    }
}

// ------------------------------------------------------------------------ Kafka

fn kafka_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("client.id", "idem-bench-bare");
    config
}

async fn kafka_delete(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config(brokers).create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    for result in admin.delete_topics(&names, &AdminOptions::new()).await? {
        match result {
            Ok(topic) => eprintln!("deleted topic {topic}"),
            Err((topic, e)) => eprintln!("topic {topic}: {e}"),
        }
    }
    Ok(())
}

async fn kafka_publish(brokers: &str, topic: &str, count: u64, window: usize) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config(brokers).create()?;
    let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new], &AdminOptions::new()).await? {
        result.map_err(|(topic, e)| anyhow::anyhow!("create topic {topic}: {e}"))?;
    }
    let producer: FutureProducer = kafka_config(brokers).create()?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for n in 1..=count {
        let producer = producer.clone();
        pending.push(async move {
            let payload = body(n);
            let record = FutureRecord::<[u8], [u8]>::to(topic).payload(&payload[..]);
            producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
        });
        while pending.len() >= window.max(1) {
            if let Some(sent) = pending.next().await {
                sent?;
            }
        }
    }
    while let Some(sent) = pending.next().await {
        sent?;
    }
    let seconds = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = count as f64 / seconds;
    println!("PUBLISHED broker=kafka topic={topic} messages={count} seconds={seconds:.3} rate={rate:.0}");
    Ok(())
}

async fn kafka_consume(
    brokers: &str,
    topic: &str,
    group: &str,
    count: u64,
    concurrency: usize,
    endpoint: Option<String>,
) -> anyhow::Result<bool> {
    // The settings `idem consume` uses (src/consumer/kafka.rs).
    let consumer: StreamConsumer = kafka_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()?;
    consumer.subscribe(&[topic])?;
    let consumer = Arc::new(consumer);
    let client = http_client()?;
    let endpoint: Option<Arc<str>> = endpoint.map(Into::into);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tally = Arc::new(Tally::new());
    // The highest offset settled (one partition, as published): each settlement commits past
    // it when it moved, so a late commit never moves the group back. (No contiguity
    // tracking: that is idem's work, and this loop may skip a message a crash left unsent.)
    let highest = Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let mut tasks = tokio::task::JoinSet::new();
    let mut received = 0u64;
    while received < count {
        let permit = permits.clone().acquire_owned().await?;
        let message = consumer.recv().await?;
        received += 1;
        let (partition, offset) = (message.partition(), message.offset());
        let payload = message.payload().unwrap_or_default().to_vec();
        drop(message);
        let (client, endpoint, tally, consumer) = (client.clone(), endpoint.clone(), tally.clone(), consumer.clone());
        let (topic, highest) = (topic.to_owned(), highest.clone());
        tasks.spawn(async move {
            let delivered = match &endpoint {
                Some(endpoint) => post(&client, endpoint, &payload).await,
                None => Ok(()),
            };
            let outcome = delivered.and_then(|()| {
                if highest.fetch_max(offset, Ordering::Relaxed) >= offset {
                    return Ok(());
                }
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&topic, partition, Offset::Offset(offset + 1)).map_err(|e| e.to_string())?;
                consumer.commit(&list, CommitMode::Async).map_err(|e| format!("commit: {e}"))
            });
            tally.settled(outcome);
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mode = if endpoint.is_some() { "http" } else { "ack" };
    let all_ok = tally.report(mode, count);
    // The last commit, synchronous, before the group is left.
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(highest.load(Ordering::Relaxed) + 1))?;
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(all_ok)
}

async fn kafka_info(brokers: &str, topic: &str, group: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka_config(brokers).set("group.id", group).create()?;
    let (topic, group) = (topic.to_owned(), group.to_owned());
    let (committed, end) = tokio::task::spawn_blocking(move || -> anyhow::Result<(i64, i64)> {
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut list = TopicPartitionList::new();
        let (mut end, mut committed) = (0, 0);
        for partition in &partitions {
            list.add_partition(&topic, *partition);
            end += consumer.fetch_watermarks(&topic, *partition, Duration::from_secs(10))?.1;
        }
        for element in consumer.committed_offsets(list, Duration::from_secs(10))?.elements() {
            if let Offset::Offset(offset) = element.offset() {
                committed += offset;
            }
        }
        let _ = group;
        Ok((committed, end))
    })
    .await??;
    println!("INFO committed={committed} end={end}");
    Ok(())
}

// ------------------------------------------------------------------------ SQS

/// A client of the SQS server at `url` (credentials and region from the environment, as
/// for `idem consume`; `us-east-1` when none is set).
async fn sqs(url: &str) -> aws_sdk_sqs::Client {
    let http = aws_smithy_http_client::Builder::new().build_http();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).load().await;
    let mut config = aws_sdk_sqs::config::Builder::from(&shared).endpoint_url(url);
    if shared.region().is_none() {
        config = config.region(aws_config::Region::from_static("us-east-1"));
    }
    aws_sdk_sqs::Client::from_conf(config.build())
}

async fn sqs_url(client: &aws_sdk_sqs::Client, queue: &str) -> anyhow::Result<String> {
    let url = client.get_queue_url().queue_name(queue).send().await?;
    url.queue_url.ok_or_else(|| anyhow::anyhow!("no URL for queue {queue}"))
}

async fn sqs_delete(url: &str, queues: &[String]) -> anyhow::Result<()> {
    let client = sqs(url).await;
    for queue in queues {
        match sqs_url(&client, queue).await {
            Ok(queue_url) => match client.delete_queue().queue_url(queue_url).send().await {
                Ok(_) => eprintln!("deleted queue {queue}"),
                Err(e) => eprintln!("queue {queue}: {e}"),
            },
            Err(e) => eprintln!("queue {queue}: {e}"),
        }
    }
    Ok(())
}

async fn sqs_publish(url: &str, queue: &str, count: u64, window: usize) -> anyhow::Result<()> {
    let client = sqs(url).await;
    sqs_delete(url, &[queue.to_owned()]).await?;
    let queue_url = client.create_queue().queue_name(queue).send().await?.queue_url.unwrap_or_default();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut n = 1;
    while n <= count {
        let last = (n + 9).min(count);
        let mut batch = client.send_message_batch().queue_url(&queue_url);
        for m in n..=last {
            let body = String::from_utf8(body(m))?;
            batch =
                batch.entries(SendMessageBatchRequestEntry::builder().id(m.to_string()).message_body(body).build()?);
        }
        pending.push(batch.send());
        n = last + 1;
        while pending.len() >= window.max(1) {
            if let Some(sent) = pending.next().await {
                anyhow::ensure!(sent?.failed.is_empty(), "the queue refused messages");
            }
        }
    }
    while let Some(sent) = pending.next().await {
        anyhow::ensure!(sent?.failed.is_empty(), "the queue refused messages");
    }
    let seconds = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = count as f64 / seconds;
    println!("PUBLISHED broker=sqs queue={queue} messages={count} seconds={seconds:.3} rate={rate:.0}");
    Ok(())
}

async fn sqs_consume(
    url: &str,
    queue: &str,
    count: u64,
    concurrency: usize,
    endpoint: Option<String>,
) -> anyhow::Result<bool> {
    let client = sqs(url).await;
    let queue_url: Arc<str> = sqs_url(&client, queue).await?.into();
    let http = http_client()?;
    let endpoint: Option<Arc<str>> = endpoint.map(Into::into);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tally = Arc::new(Tally::new());
    let mut tasks = tokio::task::JoinSet::new();
    let mut received = 0u64;
    while received < count {
        let output = client.receive_message().queue_url(&*queue_url).max_number_of_messages(10).wait_time_seconds(1);
        for message in output.send().await?.messages.unwrap_or_default() {
            let (Some(receipt), Some(body)) = (message.receipt_handle, message.body) else { continue };
            let permit = permits.clone().acquire_owned().await?;
            received += 1;
            let (client, http, endpoint, tally, queue_url) =
                (client.clone(), http.clone(), endpoint.clone(), tally.clone(), queue_url.clone());
            tasks.spawn(async move {
                let delivered = match &endpoint {
                    Some(endpoint) => post(&http, endpoint, body.as_bytes()).await,
                    None => Ok(()),
                };
                let outcome = match delivered {
                    Ok(()) => {
                        let delete = client.delete_message().queue_url(&*queue_url).receipt_handle(receipt);
                        delete.send().await.map(|_| ()).map_err(|e| format!("delete: {e}"))
                    }
                    Err(e) => Err(e),
                };
                tally.settled(outcome);
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mode = if endpoint.is_some() { "http" } else { "ack" };
    Ok(tally.report(mode, count))
}

async fn sqs_info(url: &str, queue: &str) -> anyhow::Result<()> {
    let client = sqs(url).await;
    let queue_url = sqs_url(&client, queue).await?;
    let attributes = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await?
        .attributes
        .unwrap_or_default();
    let get = |name: &QueueAttributeName| attributes.get(name).cloned().unwrap_or_else(|| "?".into());
    println!(
        "INFO visible={} in_flight={}",
        get(&QueueAttributeName::ApproximateNumberOfMessages),
        get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    );
    Ok(())
}

// ------------------------------------------------------------------------ main

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    // Multi-threaded, default worker count: the same runtime as `idem`.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let ok = runtime.block_on(async {
        match cli.command {
            Command::NatsPublish { url, stream, count, window } => {
                nats_publish(&url, &stream, count, window).await.map(|()| true)
            }
            Command::NatsConsume { url, stream, durable, count, concurrency, endpoint } => {
                nats_consume(&url, &stream, &durable, count, concurrency, endpoint).await
            }
            Command::NatsInfo { url, stream, durable } => nats_info(&url, &stream, &durable).await.map(|()| true),
            Command::NatsDelete { url, prefix, streams } => {
                nats_delete(&url, prefix.as_deref(), &streams).await.map(|()| true)
            }
            Command::RabbitPublish { url, queue, count, window } => {
                rabbit_publish(&url, &queue, count, window).await.map(|()| true)
            }
            Command::RabbitConsume { url, queue, count, concurrency, endpoint } => {
                rabbit_consume(&url, &queue, count, concurrency, endpoint).await
            }
            Command::RabbitInfo { url, queue } => rabbit_info(&url, &queue).await.map(|()| true),
            Command::RabbitDelete { url, queues } => rabbit_delete(&url, &queues).await.map(|()| true),
            Command::KafkaPublish { brokers, topic, count, window } => {
                kafka_publish(&brokers, &topic, count, window).await.map(|()| true)
            }
            Command::KafkaConsume { brokers, topic, group, count, concurrency, endpoint } => {
                kafka_consume(&brokers, &topic, &group, count, concurrency, endpoint).await
            }
            Command::KafkaInfo { brokers, topic, group } => kafka_info(&brokers, &topic, &group).await.map(|()| true),
            Command::KafkaDelete { brokers, topics } => kafka_delete(&brokers, &topics).await.map(|()| true),
            Command::SqsPublish { sqs, queue, count, window } => {
                sqs_publish(&sqs, &queue, count, window).await.map(|()| true)
            }
            Command::SqsConsume { sqs, queue, count, concurrency, endpoint } => {
                sqs_consume(&sqs, &queue, count, concurrency, endpoint).await
            }
            Command::SqsInfo { sqs, queue } => sqs_info(&sqs, &queue).await.map(|()| true),
            Command::SqsDelete { sqs, queues } => sqs_delete(&sqs, &queues).await.map(|()| true),
            Command::Watch { admin, subscriber, count, interval_ms, timeout } => {
                watch(&admin, &subscriber, count, Duration::from_millis(interval_ms), Duration::from_secs(timeout))
                    .await
            }
        }
    })?;
    Ok(if ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}
