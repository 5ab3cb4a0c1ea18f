//! Amazon SQS as a source, through the AWS SDK: long polling, a message deleted only after
//! its record is written, and its visibility timeout extended every third of it while it
//! waits and runs (the lease heartbeat), so a slow delivery is never handed to another
//! consumer meanwhile. A retryable failure makes the message visible again after its delay;
//! a poison message is left to the queue's redrive policy (it is neither deleted nor
//! extended: it comes back after the visibility timeout, is refused again, and the queue
//! moves it to its dead-letter queue after `maxReceiveCount` receives).
//!
//! The id of a message is its `MessageDeduplicationId` (FIFO queues), else its
//! `MessageId`. Credentials and region come from the environment as for every AWS tool (the
//! file's `region` first; `us-east-1` when nothing says); `endpoint` points the client at
//! another server. TLS is verified against the platform's roots, which `SSL_CERT_FILE` can
//! replace.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::config::Sqs;
use super::{Inbound, RECONNECT, Settle, heartbeat};

/// Feeds `messages` until `closing`, retrying with backoff while SQS cannot be reached.
/// Messages received and not deleted when the source closes come back after their
/// visibility timeout.
pub async fn feed(source: Sqs, subscriber: String, messages: mpsc::Sender<Inbound>, closing: CancellationToken) {
    let client = client(&source).await;
    let mut pause = RECONNECT;
    while let Err(error) = ensure_queue(&client, &source.queue_url).await {
        tracing::warn!(%error, retry_in = ?pause.peek(), "SQS unavailable; will try again");
        tokio::select! {
            () = tokio::time::sleep(pause.next_pause()) => {}
            () = closing.cancelled() => return,
        }
    }
    tracing::info!(queue = %source.queue_url, "consuming from SQS");
    let lag = tokio::spawn(report_lag(client.clone(), source.queue_url.clone(), subscriber));
    let visibility = i32::try_from(source.visibility_timeout.as_secs()).unwrap_or(i32::MAX);
    let wait = i32::try_from(source.wait_time.as_secs()).unwrap_or(20);
    loop {
        let receive = client
            .receive_message()
            .queue_url(&source.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::MessageDeduplicationId)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send();
        let received = tokio::select! {
            received = receive => received,
            () = closing.cancelled() => break,
        };
        let received = match received {
            Ok(received) => {
                pause.reset();
                received
            }
            Err(error) => {
                let error = aws_sdk_sqs::error::DisplayErrorContext(error);
                tracing::warn!(%error, retry_in = ?pause.peek(), "SQS receive failed; will try again");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => continue,
                    () = closing.cancelled() => break,
                }
            }
        };
        for message in received.messages.unwrap_or_default() {
            let (Some(receipt), Some(body)) = (message.receipt_handle, message.body) else { continue };
            let attributes = message.attributes.unwrap_or_default();
            let header_id =
                attributes.get(&MessageSystemAttributeName::MessageDeduplicationId).cloned().or(message.message_id);
            let deliveries = attributes
                .get(&MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let lease = lease(&client, &source.queue_url, &receipt, source.visibility_timeout);
            let settle =
                Box::new(Settled { client: client.clone(), queue_url: source.queue_url.clone(), receipt, lease });
            let inbound = Inbound { header_id, payload: body.into(), deliveries, settle };
            if messages.send(inbound).await.is_err() {
                break;
            }
        }
    }
    lag.abort();
}

async fn client(source: &Sqs) -> Client {
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let mut defaults = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &source.region {
        defaults = defaults.region(aws_config::Region::new(region.clone()));
    }
    let shared = defaults.load().await;
    let mut config = aws_sdk_sqs::config::Builder::from(&shared);
    if shared.region().is_none() {
        config = config.region(aws_config::Region::from_static("us-east-1"));
    }
    if let Some(endpoint) = &source.endpoint {
        config = config.endpoint_url(endpoint);
    }
    Client::from_conf(config.build())
}

/// Creates the queue, named after the URL's last segment, when it is missing (a `.fifo`
/// name makes a FIFO queue).
async fn ensure_queue(client: &Client, queue_url: &str) -> Result<(), String> {
    let probe = client.get_queue_attributes().queue_url(queue_url).send().await;
    match probe {
        Ok(_) => return Ok(()),
        Err(error) if error.as_service_error().is_some_and(|e| e.is_queue_does_not_exist()) => {}
        Err(error) => return Err(aws_sdk_sqs::error::DisplayErrorContext(error).to_string()),
    }
    let name = queue_url.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let mut create = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        create = create.attributes(QueueAttributeName::FifoQueue, "true");
    }
    create
        .send()
        .await
        .map_err(|e| format!("cannot create queue {name}: {}", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
    tracing::info!(queue = name, "SQS queue created");
    Ok(())
}

/// Refreshes `idem_consumer_lag` (messages visible in the queue) every five seconds.
async fn report_lag(client: Client, queue_url: String, subscriber: String) {
    let gauge = metrics::gauge!(crate::metrics::CONSUMER_LAG, "subscriber" => subscriber);
    loop {
        let attributes = client
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await;
        let visible = attributes.ok().and_then(|a| {
            a.attributes?.get(&QueueAttributeName::ApproximateNumberOfMessages).and_then(|n| n.parse::<f64>().ok())
        });
        if let Some(visible) = visible {
            gauge.set(visible);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// The lease heartbeat of one received message: every third of the visibility timeout, the
/// timeout is set again from now. Stops when dropped.
fn lease(client: &Client, queue_url: &str, receipt: &str, visibility: Duration) -> AbortOnDropHandle<()> {
    let (client, queue_url, receipt) = (client.clone(), queue_url.to_owned(), receipt.to_owned());
    let seconds = i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX);
    heartbeat(visibility, move || {
        let extend = client.change_message_visibility().queue_url(&queue_url).receipt_handle(&receipt);
        async move {
            if let Err(error) = extend.visibility_timeout(seconds).send().await {
                let error = aws_sdk_sqs::error::DisplayErrorContext(error);
                tracing::warn!(%error, "SQS: could not extend a message's visibility; it may be delivered twice (its record keeps the effect single)");
            }
        }
    })
}

struct Settled {
    client: Client,
    queue_url: String,
    receipt: String,
    lease: AbortOnDropHandle<()>,
}

#[async_trait::async_trait]
impl Settle for Settled {
    async fn ack(self: Box<Self>) -> Result<(), String> {
        drop(self.lease);
        let delete = self.client.delete_message().queue_url(&self.queue_url).receipt_handle(&self.receipt);
        delete.send().await.map(|_| ()).map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
    }

    async fn retry(self: Box<Self>, after: Duration) -> Result<(), String> {
        drop(self.lease);
        let seconds = i32::try_from(after.as_millis().div_ceil(1000)).unwrap_or(i32::MAX);
        let visible = self.client.change_message_visibility().queue_url(&self.queue_url).receipt_handle(&self.receipt);
        let visible = visible.visibility_timeout(seconds).send().await;
        visible.map(|_| ()).map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
    }

    /// Left to the redrive policy: the lease stops, the message comes back after its
    /// visibility timeout, and the queue counts the receive.
    async fn reject(self: Box<Self>) -> Result<(), String> {
        drop(self.lease);
        Ok(())
    }
}
