//! TLS for the runner's and the consumer's side (SPEC §4 "Reach"): a flow step to an HTTPS
//! API, a NATS server that speaks TLS only, and a private RabbitMQ node the test boots with
//! an `amqps://` listener, each with a certificate from a private CA made at test time and
//! trusted through `SSL_CERT_FILE`, as for the gateway. Without the CA nothing is sent or
//! consumed, and the log says why.

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::{Authority, NatsTls, RabbitTls, Upstream, idem, idem_log, read, spawn_until_ready, unique_suffix};

/// The flow of the runner tests: one step to `{base}/export`, a guard, so a call that may
/// have been sent is never sent again; a run over one record, `o-1`.
fn write_flow(dir: &Path, base: &str) {
    let flow = format!(
        "flow = \"f\"\nstore = \"sqlite://{}\"\nmax_attempts = 2\n\n[source]\njsonl = \"data.jsonl\"\n\
         primary_key = [\"id\"]\n\n[[steps]]\nname = \"export\"\nurl = \"{base}/export\"\nguard = true\n",
        dir.join("idem.db").display()
    );
    std::fs::write(dir.join("flow.toml"), flow).expect("flow written");
    std::fs::write(dir.join("data.jsonl"), "{\"id\": \"o-1\"}\n").expect("data written");
}

/// `idem run flow.toml` in `dir`, with `SSL_CERT_FILE` as given (and none inherited).
fn run(dir: &Path, ssl_cert_file: Option<&str>) -> Output {
    let mut command = idem();
    command.arg("run").arg(dir.join("flow.toml")).current_dir(dir).env_remove("SSL_CERT_FILE");
    if let Some(path) = ssl_cert_file {
        command.env("SSL_CERT_FILE", path);
    }
    command.output().expect("idem run runs")
}

/// The count a summary line gives, e.g. `calls sent`.
fn count(output: &Output, name: &str) -> u64 {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let prefix = format!("{name}: ");
    let line = stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {name}: {output:?}"));
    line[prefix.len()..].parse().expect("a count")
}

#[tokio::test]
async fn a_step_to_an_https_api_with_a_private_ca_is_not_sent_until_the_ca_is_trusted_then_sent_once() {
    let ca = Authority::new("runner");
    let upstream = Upstream::start_tls(&ca.issue(&["127.0.0.1", "localhost"]), &ca).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    write_flow(dir.path(), &upstream.url());
    let store = format!("sqlite://{}", dir.path().join("idem.db").display());
    let record = || idem_log(&store, &["show", "--scope", "f:export", "--key", "o-1", "--json"]).json();

    // Not trusted: the handshake fails, so nothing was sent — the run says what an
    // unreachable destination gets (retried, exit 1), and even a guard step may be sent later.
    let untrusted = run(dir.path(), None);
    assert_eq!((untrusted.status.code(), count(&untrusted, "retried")), (Some(1), 1), "{untrusted:?}");
    assert_eq!(count(&untrusted, "calls sent"), 0, "{untrusted:?}");
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(stderr.contains("cannot connect") && stderr.contains("certificate"), "the log says why: {stderr}");
    assert_eq!(upstream.calls().await, 0, "nothing reached the API");
    assert_eq!(record()["status"], "failed_retryable");

    // Trusted through SSL_CERT_FILE: sent once; a re-run sends nothing.
    let trusted = run(dir.path(), Some(&ca.pem_path()));
    assert_eq!((trusted.status.code(), count(&trusted, "calls sent")), (Some(0), 1), "{trusted:?}");
    assert_eq!(upstream.calls_for("f:export:o-1").await, 1);
    assert_eq!(record()["status"], "completed");
    let again = run(dir.path(), Some(&ca.pem_path()));
    assert_eq!((again.status.code(), count(&again, "calls sent")), (Some(0), 0), "{again:?}");
    assert_eq!(upstream.calls().await, 1, "the re-run sent nothing");
}

/// A running `idem consume` with its file, store and logs in a temp dir.
struct Consume {
    child: Child,
    dir: TempDir,
    stderr: PathBuf,
}

impl Consume {
    /// Starts `idem consume` on `toml` with `SSL_CERT_FILE` as given (none inherited) and
    /// waits for its ready line (printed before the broker is reached).
    async fn start(toml: &str, ssl_cert_file: Option<&str>) -> Consume {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("consumer.toml");
        std::fs::write(&file, toml).expect("write the consumer file");
        let mut command = idem();
        command.arg("consume").arg(&file).current_dir(dir.path()).env_remove("SSL_CERT_FILE");
        if let Some(path) = ssl_cert_file {
            command.env("SSL_CERT_FILE", path);
        }
        let (stdout, stderr) = (dir.path().join("consume.stdout"), dir.path().join("consume.stderr"));
        let (child, _) = spawn_until_ready(command, &stdout, &stderr, "idem consume ").await;
        Consume { child, dir, stderr }
    }

    fn logs(&self) -> String {
        read(&self.stderr)
    }

    fn record(&self, scope: &str, key: &str) -> Option<Value> {
        let store = format!("sqlite://{}", self.dir.path().join("idem.db").display());
        let shown = idem_log(&store, &["show", "--scope", scope, "--key", key, "--json"]);
        (shown.code == Some(0)).then(|| shown.json())
    }
}

impl Drop for Consume {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- idem consume ---\n{}", self.logs());
        }
    }
}

/// Polls `test` until it holds; panics with `what` after 30 s.
async fn eventually<F: Future<Output = bool>>(what: &str, mut test: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !test().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn nats_consumer(subscriber: &str, url: &str, stream: &str, upstream: &str) -> String {
    format!(
        "subscriber = \"{subscriber}\"\nstore = \"sqlite://./idem.db\"\ntimeout = \"5s\"\n\n[source]\n\
         nats = {{ url = \"{url}\", stream = \"{stream}\", subject = \"{stream}.>\", durable = \"{subscriber}\" }}\n\n\
         [deliver]\nurl = \"{upstream}/orders/{{{{record.order_id}}}}\"\n"
    )
}

/// A publisher on the private server, trusting its CA.
async fn publisher(server: &NatsTls, ca: &Authority) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(PathBuf::from(ca.pem_path()))
        .connect(format!("tls://127.0.0.1:{}", server.port()))
        .await
        .expect("the test connects to its NATS server over TLS");
    jetstream::new(client)
}

async fn publish(js: &jetstream::Context, subject: &str, id: &str, body: Value) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    let ack = js.publish_with_headers(subject.to_owned(), headers, body.to_string().into()).await.expect("publish");
    ack.await.expect("JetStream stored the message");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_over_tls_with_a_private_ca_delivers_once_by_tls_and_by_a_nats_url_to_a_tls_only_server() {
    let ca = Authority::new("nats");
    let server = NatsTls::start(&ca.issue(&["127.0.0.1", "localhost"])).await;
    let upstream = Upstream::start().await;
    let js = publisher(&server, &ca).await;
    // `tls://` asks for TLS; a `nats://` URL gets it because the server requires it. Each
    // consumer has its own stream, so each sees only its own messages.
    for scheme in ["tls", "nats"] {
        let stream = format!("TLS_{scheme}_{}", unique_suffix());
        let subscriber = format!("tls-{scheme}");
        let url = format!("{scheme}://127.0.0.1:{}", server.port());
        let consumer =
            Consume::start(&nats_consumer(&subscriber, &url, &stream, &upstream.url()), Some(&ca.pem_path())).await;
        eventually("the consumer to create its stream over TLS", || async { js.get_stream(&stream).await.is_ok() })
            .await;
        let id = format!("{scheme}-1");
        for _ in 0..2 {
            // Published twice (a producer's retry): delivered once.
            publish(&js, &format!("{stream}.created"), &id, json!({ "order_id": id })).await;
        }
        eventually("the message delivered", || async { upstream.calls_for(&id).await == 1 }).await;
        let scope = format!("consumer:{subscriber}");
        eventually("its record completed", || async {
            consumer.record(&scope, &id).is_some_and(|r| r["status"] == "completed")
        })
        .await;
        assert!(!consumer.logs().contains("unavailable"), "connected the first time: {}", consumer.logs());
    }
    assert_eq!(upstream.calls().await, 2, "each message once");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_over_tls_without_the_ca_trusted_does_not_connect_says_why_and_keeps_trying() {
    let ca = Authority::new("nats untrusted");
    let server = NatsTls::start(&ca.issue(&["127.0.0.1", "localhost"])).await;
    let upstream = Upstream::start().await;
    let stream = format!("TLS_UNTRUSTED_{}", unique_suffix());
    let url = format!("tls://127.0.0.1:{}", server.port());
    let consumer = Consume::start(&nats_consumer("tls-untrusted", &url, &stream, &upstream.url()), None).await;
    let tries = |logs: &str| logs.matches("NATS JetStream unavailable; will reconnect").count();
    eventually("two failed connection attempts in the log", || async { tries(&consumer.logs()) >= 2 }).await;
    let logs = consumer.logs();
    assert!(logs.contains("certificate"), "the log says why: {logs}");
    let js = publisher(&server, &ca).await;
    assert!(js.get_stream(&stream).await.is_err(), "the consumer never reached the server: {logs}");
    assert_eq!(upstream.calls().await, 0);
}

/// A publisher's channel on the private RabbitMQ node, trusting its CA.
async fn rabbit_channel(server: &RabbitTls, ca: &Authority) -> (lapin::Connection, lapin::Channel) {
    let properties = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let pem = std::fs::read_to_string(ca.pem_path()).expect("the CA file");
    let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: Some(pem) };
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", server.port());
    let connection =
        lapin::Connection::connect_with_config(&url, properties, tls).await.expect("the test connects over TLS");
    let channel = connection.create_channel().await.expect("a channel");
    (connection, channel)
}

fn rabbit_consumer(subscriber: &str, port: u16, queue: &str, upstream: &str) -> String {
    format!(
        "subscriber = \"{subscriber}\"\nstore = \"sqlite://./idem.db\"\ntimeout = \"5s\"\n\n[source]\n\
         rabbitmq = {{ url = \"amqps://guest:guest@127.0.0.1:{port}/%2f\", queue = \"{queue}\" }}\n\n\
         [deliver]\nurl = \"{upstream}/orders/{{{{record.order_id}}}}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_amqps_with_a_private_ca_delivers_once_and_without_it_does_not_connect_and_says_why() {
    let ca = Authority::new("rabbitmq");
    let server = RabbitTls::start(&ca.issue(&["127.0.0.1", "localhost"])).await;
    let upstream = Upstream::start().await;

    // Not trusted: no connection, the reason in the log, tried again; the password never.
    let untrusted =
        Consume::start(&rabbit_consumer("amqps-untrusted", server.port(), "untrusted", &upstream.url()), None).await;
    let tries = |logs: &str| logs.matches("RabbitMQ unavailable; will reconnect").count();
    eventually("two failed connection attempts in the log", || async { tries(&untrusted.logs()) >= 2 }).await;
    let logs = untrusted.logs();
    assert!(logs.contains("certificate"), "the log says why: {logs}");
    assert!(!logs.contains("guest:guest"), "no credentials in the log: {logs}");
    drop(untrusted);

    let queue = format!("amqps-{}", unique_suffix());
    let consumer =
        Consume::start(&rabbit_consumer("amqps", server.port(), &queue, &upstream.url()), Some(&ca.pem_path())).await;
    let (connection, channel) = rabbit_channel(&server, &ca).await;
    eventually("the consumer to declare its queue over TLS", || async {
        let probe = connection.create_channel().await.expect("a channel");
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        probe.queue_declare(&queue, passive, lapin::types::FieldTable::default()).await.is_ok()
    })
    .await;
    for _ in 0..2 {
        // Published twice under one message id (a producer's retry): delivered once.
        let properties = lapin::BasicProperties::default().with_delivery_mode(2).with_message_id("amqps-1".into());
        let body = json!({ "order_id": "amqps-1" }).to_string();
        let publish = lapin::options::BasicPublishOptions::default();
        channel.basic_publish("", &queue, publish, body.as_bytes(), properties).await.expect("publish");
    }
    eventually("the message delivered", || async { upstream.calls_for("amqps-1").await == 1 }).await;
    eventually("its record completed", || async {
        consumer.record("consumer:amqps", "amqps-1").is_some_and(|r| r["status"] == "completed")
    })
    .await;
    assert_eq!(upstream.calls().await, 1, "once");
}
