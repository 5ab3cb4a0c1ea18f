//! NATS JetStream as a source: a durable pull consumer with explicit acks. The stream and
//! the consumer are created when missing; a retryable failure is a `nak` with a delay; a
//! poison message is terminated (`term`: never redelivered; the stream keeps it under its
//! own limits). While a message waits and runs, an in-progress acknowledgement every
//! third of `ack_wait` keeps the server from redelivering it, so a delivery slower than
//! `ack_wait` never races a second one.
//!
//! TLS: `tls://host:port`, or a `nats://` server that requires it, is verified against the
//! roots of [`crate::tls`] (a private CA through `SSL_CERT_FILE`). A handshake that fails
//! is a connection that failed: logged with its reason and tried again with backoff.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::RECONNECT;
use super::{Inbound, Settle, heartbeat};
use crate::backoff::Backoff;

/// Where to consume from.
pub struct Nats {
    /// Server URL.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subject filter.
    pub subject: String,
    /// Durable consumer name.
    pub durable: String,
    /// Redelivery after this long without an ack.
    pub ack_wait: Duration,
    /// Messages pulled ahead.
    pub batch: usize,
}

/// Feeds `messages` until `closing`, reconnecting with backoff. Messages taken but not
/// settled when the source closes are redelivered by the server after `ack_wait`.
pub async fn feed(source: Nats, subscriber: String, messages: mpsc::Sender<Inbound>, closing: CancellationToken) {
    let mut pause = RECONNECT;
    loop {
        match consume(&source, &subscriber, &messages, &closing, &mut pause).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?pause.peek(), "NATS JetStream unavailable; will reconnect");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => {}
                    () = closing.cancelled() => return,
                }
            }
        }
    }
}

/// One connection's life: `Ok` when the consumer stopped taking messages, `Err` to reconnect.
async fn consume(
    source: &Nats,
    subscriber: &str,
    messages: &mpsc::Sender<Inbound>,
    closing: &CancellationToken,
    pause: &mut Backoff,
) -> Result<(), String> {
    // TLS is used when the URL says `tls://` or the server's INFO requires it, and then it
    // is verified against the one set of roots (`tls`), so `SSL_CERT_FILE` names a private
    // CA here as for every other client.
    let tls = crate::tls::client_config().map_err(|e| format!("TLS: {e}"))?;
    let url = crate::store::redact(&source.url);
    let client = async_nats::ConnectOptions::new()
        .name(format!("idem consume {subscriber}"))
        .tls_client_config(tls.as_ref().clone())
        .connect(source.url.as_str())
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: source.stream.clone(),
            subjects: vec![source.subject.clone()],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", source.stream))?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &source.durable,
            consumer::pull::Config {
                durable_name: Some(source.durable.clone()),
                filter_subject: source.subject.clone(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: source.ack_wait,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {}: {e}", source.durable))?;
    let mut pulled = consumer
        .stream()
        .max_messages_per_batch(source.batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| format!("cannot pull from {}: {e}", source.durable))?;
    tracing::info!(stream = %source.stream, durable = %source.durable, "consuming from NATS JetStream");
    pause.reset();
    let lag = report_lag(consumer.clone(), subscriber.to_owned());
    let _lag = AbortOnDropHandle::new(lag);
    loop {
        let message = tokio::select! {
            message = pulled.next() => message,
            () = closing.cancelled() => {
                // The acks of the messages settled before closing are queued in the client:
                // they leave before the connection closes.
                let _ = client.flush().await;
                return Ok(());
            }
        };
        let Some(message) = message else { break };
        let message = match message {
            Ok(message) => message,
            // A heartbeat that came late (a busy machine) is not a broken subscription: the
            // library goes on pulling.
            Err(e) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                tracing::debug!(durable = %source.durable, "a JetStream heartbeat came late");
                continue;
            }
            Err(e) => return Err(format!("pulling from {}: {e}", source.durable)),
        };
        let deliveries = message.info().map(|info| u64::try_from(info.delivered).unwrap_or(1)).unwrap_or(1);
        let header_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|value| value.as_str().to_owned());
        let progress = in_progress(&message, source.ack_wait);
        let settle = Box::new(Settled(message, progress));
        let inbound = Inbound { header_id, payload: settle.0.payload.clone(), deliveries, settle };
        if messages.send(inbound).await.is_err() {
            return Ok(());
        }
    }
    Err("the pull subscription ended".into())
}

/// Refreshes `idem_consumer_lag` (messages the consumer has not been delivered yet) every
/// five seconds.
fn report_lag(consumer: consumer::PullConsumer, subscriber: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let gauge = metrics::gauge!(crate::metrics::CONSUMER_LAG, "subscriber" => subscriber);
        loop {
            if let Ok(info) = consumer.get_info().await {
                #[allow(clippy::cast_precision_loss)]
                gauge.set(info.num_pending as f64);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}

/// The in-progress acknowledgements of one message until it is settled (dropped).
fn in_progress(message: &jetstream::Message, ack_wait: Duration) -> AbortOnDropHandle<()> {
    let message = message.clone();
    heartbeat(ack_wait, move || {
        let message = message.clone();
        async move {
            if let Err(error) = message.ack_with(AckKind::Progress).await {
                tracing::debug!(%error, "NATS: an in-progress acknowledgement failed");
            }
        }
    })
}

struct Settled(jetstream::Message, AbortOnDropHandle<()>);

impl Settled {
    /// The message, its in-progress acknowledgements stopped.
    fn settling(self: Box<Self>) -> jetstream::Message {
        let Settled(message, progress) = *self;
        drop(progress);
        message
    }
}

#[async_trait::async_trait]
impl Settle for Settled {
    /// A plain ack: queued in the client, flushed before a graceful stop closes the
    /// connection. One lost in a crash brings the message back, and the store recognises it.
    async fn ack(self: Box<Self>) -> Result<(), String> {
        self.settling().ack().await.map_err(|e| e.to_string())
    }

    async fn retry(self: Box<Self>, after: Duration) -> Result<(), String> {
        self.settling().ack_with(AckKind::Nak(Some(after))).await.map_err(|e| e.to_string())
    }

    async fn reject(self: Box<Self>) -> Result<(), String> {
        self.settling().ack_with(AckKind::Term).await.map_err(|e| e.to_string())
    }
}
