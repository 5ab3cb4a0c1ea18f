//! RabbitMQ as a source: manual acks with a prefetch window, the queue declared (durable)
//! when missing. A retryable failure is requeued after its delay (RabbitMQ has no delayed
//! `nack`, so the message keeps its prefetch slot while it waits); a poison message is
//! rejected without requeueing, which dead-letters it when the queue has a dead-letter
//! exchange.
//!
//! TLS: an `amqps://` URL is verified against the roots of [`crate::tls`] (a private CA
//! through `SSL_CERT_FILE`), the same as every other client of idem.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::tcp::{HandshakeResult, RustlsConnector, TcpStream};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::RECONNECT;
use super::{Inbound, Settle};
use crate::backoff::Backoff;

/// Where to consume from.
pub struct Rabbit {
    /// AMQP URL.
    pub url: String,
    /// Queue name.
    pub queue: String,
    /// Dead-letter exchange of a queue idem declares.
    pub dead_letter_exchange: Option<String>,
    /// Unacknowledged messages the broker sends ahead.
    pub prefetch: u16,
}

/// Feeds `messages` until `closing`, reconnecting with backoff. When the connection closes,
/// the broker requeues what was delivered and not acknowledged.
pub async fn feed(source: Rabbit, subscriber: String, messages: mpsc::Sender<Inbound>, closing: CancellationToken) {
    let mut pause = RECONNECT;
    loop {
        let connection = match connect(&source.url).await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?pause.peek(), "RabbitMQ unavailable; will reconnect");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => {}
                    () = closing.cancelled() => return,
                }
                continue;
            }
        };
        let outcome = tokio::select! {
            outcome = consume(&connection, &source, &subscriber, &messages, &mut pause) => outcome,
            () = closing.cancelled() => Ok(()),
        };
        match outcome {
            Ok(()) => {
                // Settlements in flight were awaited before `closing`; closing the connection
                // now hands back whatever was prefetched and never taken.
                let _ = connection.close(200, "idem consume stopping").await;
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?pause.peek(), "RabbitMQ connection lost; will reconnect");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => {}
                    () = closing.cancelled() => return,
                }
            }
        }
    }
}

// `HandshakeResult` is the type lapin's connector takes; its size is lapin's choice.
#[allow(clippy::result_large_err)]
async fn connect(url: &str) -> Result<Connection, String> {
    let uri: AMQPUri = url.parse().map_err(|e| format!("not an AMQP URL: {e}"))?;
    let tls = tls_connector().map_err(|e| format!("TLS: {e}"))?;
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let open = Box::new(move |uri: &AMQPUri| open_stream(uri, &tls));
    Connection::connector(uri, open, properties).await.map_err(|e| format!("cannot connect: {e}"))
}

/// The TLS connector of `amqps://`: the one client configuration of [`crate::tls`]. lapin's
/// own would trust only the platform's store, and build its config with whatever crypto
/// provider happens to be the process default.
fn tls_connector() -> Result<RustlsConnector, crate::tls::Error> {
    Ok(RustlsConnector::from(crate::tls::client_config()?))
}

/// The socket of one connection attempt, as lapin's default opens it (the URL's
/// `connection_timeout`, TLS for `amqps`) but with idem's TLS. It runs on lapin's blocking
/// connect path, so the handshake completes before the socket turns non-blocking.
#[allow(clippy::result_large_err)] // lapin's type, as on `connect`.
fn open_stream(uri: &AMQPUri, tls: &RustlsConnector) -> HandshakeResult {
    let address = (uri.authority.host.as_str(), uri.authority.port);
    let stream = match uri.query.connection_timeout {
        Some(timeout) => TcpStream::connect_timeout(address, Duration::from_millis(timeout)),
        None => TcpStream::connect(address),
    }?;
    let stream = match uri.scheme {
        AMQPScheme::AMQP => stream,
        AMQPScheme::AMQPS => stream.into_rustls(tls, &uri.authority.host)?,
    };
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Declares the queue when missing. A passive declaration first: a queue that exists is used
/// as it is (redeclaring it with other arguments would fail).
async fn declare(connection: &Connection, source: &Rabbit) -> Result<u32, String> {
    let probe = connection.create_channel().await.map_err(|e| e.to_string())?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    if let Ok(queue) = probe.queue_declare(&source.queue, passive, FieldTable::default()).await {
        let _ = probe.close(200, "declared").await;
        return Ok(queue.message_count());
    }
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let mut arguments = FieldTable::default();
    if let Some(exchange) = &source.dead_letter_exchange {
        arguments.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(exchange.as_str().into()));
    }
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let queue = channel
        .queue_declare(&source.queue, durable, arguments)
        .await
        .map_err(|e| format!("cannot declare queue {}: {e}", source.queue))?;
    let _ = channel.close(200, "declared").await;
    Ok(queue.message_count())
}

/// One connection's life: `Ok` when the consumer stopped taking messages, `Err` to reconnect.
async fn consume(
    connection: &Connection,
    source: &Rabbit,
    subscriber: &str,
    messages: &mpsc::Sender<Inbound>,
    pause: &mut Backoff,
) -> Result<(), String> {
    declare(connection, source).await?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel.basic_qos(source.prefetch, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
    let tag = format!("idem-{subscriber}-{}", std::process::id());
    let mut deliveries = channel
        .basic_consume(&source.queue, &tag, BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(|e| format!("cannot consume {}: {e}", source.queue))?;
    tracing::info!(queue = %source.queue, "consuming from RabbitMQ");
    pause.reset();
    let lag_channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let lag = tokio::spawn(report_lag(lag_channel, source.queue.clone(), subscriber.to_owned()));
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _lag = Abort(lag);
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery.map_err(|e| format!("consuming {}: {e}", source.queue))?;
        let header_id = delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
        let inbound = Inbound {
            header_id,
            payload: bytes::Bytes::from(delivery.data),
            deliveries: if delivery.redelivered { 2 } else { 1 },
            settle: Box::new(Settled(delivery.acker)),
        };
        if messages.send(inbound).await.is_err() {
            return Ok(());
        }
    }
    Err("the consumer was cancelled".into())
}

/// Refreshes `idem_consumer_lag` (messages ready in the queue) every five seconds.
async fn report_lag(channel: lapin::Channel, queue: String, subscriber: String) {
    let gauge = metrics::gauge!(crate::metrics::CONSUMER_LAG, "subscriber" => subscriber);
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    loop {
        if let Ok(queue) = channel.queue_declare(&queue, passive, FieldTable::default()).await {
            gauge.set(f64::from(queue.message_count()));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

struct Settled(lapin::acker::Acker);

#[async_trait::async_trait]
impl Settle for Settled {
    async fn ack(self: Box<Self>) -> Result<(), String> {
        self.0.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn retry(self: Box<Self>, after: Duration) -> Result<(), String> {
        tokio::time::sleep(after).await;
        let requeue = BasicNackOptions { requeue: true, ..Default::default() };
        self.0.nack(requeue).await.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn reject(self: Box<Self>) -> Result<(), String> {
        let drop = BasicNackOptions { requeue: false, ..Default::default() };
        self.0.nack(drop).await.map(|_| ()).map_err(|e| e.to_string())
    }
}
