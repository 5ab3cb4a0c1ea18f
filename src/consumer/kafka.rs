//! Kafka as a source: a consumer group (cooperative-sticky assignment) that commits offsets
//! by hand. Messages of one partition are delivered concurrently, so a partition's offset is
//! committed only up to the last message before which every message taken is settled: a
//! crash redelivers from the first unsettled one, never skips it. A retryable failure is
//! delivered again by this process after its delay (Kafka has no `nak`), holding the
//! partition's commit back meanwhile; a poison message is published to `dead_letter_topic`
//! when one is set, and then counts as settled.
//!
//! A rebalance that revokes a partition commits what is settled and abandons the
//! partition's messages still in flight: they finish and write their records, but commit
//! nothing, and the partition's next owner meets them again as duplicates (or, while the
//! first delivery still runs, `in_flight`). A long delivery keeps its partition: the
//! group's heartbeats come from librdkafka's own thread, not from the deliveries.
//!
//! librdkafka is built from source without TLS or SASL: `brokers` are plain TCP.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::Kafka;
use super::{Inbound, Settle};

/// Feeds `messages` until `closing`. librdkafka reconnects by itself; what was taken and
/// not committed when the source closes is redelivered to the group's next owner.
pub async fn feed(source: Kafka, subscriber: String, messages: mpsc::Sender<Inbound>, closing: CancellationToken) {
    if let Err(error) = consume(&source, &subscriber, &messages, &closing).await {
        // Only a configuration librdkafka refuses gets here; the log says which.
        tracing::error!(%error, "Kafka consumer stopped");
    }
}

async fn consume(
    source: &Kafka,
    subscriber: &str,
    messages: &mpsc::Sender<Inbound>,
    closing: &CancellationToken,
) -> Result<(), String> {
    let mut common = ClientConfig::new();
    common.set("bootstrap.servers", &source.brokers).set("client.id", format!("idem-consume-{subscriber}"));
    create_topic(&common, &source.topic, closing).await;
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let session_ms = source.session_timeout.as_millis().to_string();
    let consumer: StreamConsumer<Context> = common
        .clone()
        .set("group.id", &source.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", &session_ms)
        .set("heartbeat.interval.ms", (source.session_timeout.as_millis() / 3).max(100).to_string())
        .create_with_context(Context { tracker: tracker.clone(), topic: source.topic.clone() })
        .map_err(|e| format!("Kafka consumer: {e}"))?;
    let consumer = Arc::new(consumer);
    consumer.subscribe(&[source.topic.as_str()]).map_err(|e| format!("subscribe to {}: {e}", source.topic))?;
    let dead_letter = match &source.dead_letter_topic {
        Some(topic) => {
            let producer: FutureProducer = common.create().map_err(|e| format!("Kafka producer of {topic}: {e}"))?;
            Some(DeadLetter { producer, topic: topic.clone() })
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        consumer: consumer.clone(),
        tracker: tracker.clone(),
        topic: source.topic.clone(),
        dead_letter,
        messages: messages.clone(),
    });
    tracing::info!(topic = %source.topic, group = %source.group, "consuming from Kafka");
    let lag = tokio::spawn(report_lag(shared.clone(), subscriber.to_owned()));
    loop {
        let message = tokio::select! {
            message = consumer.recv() => message,
            () = closing.cancelled() => break,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                // Transport errors are reported here and retried by librdkafka itself.
                tracing::warn!(%error, "Kafka consumer");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        let payload = Bytes::copy_from_slice(message.payload().unwrap_or_default());
        let key = message.key().map(<[u8]>::to_vec);
        drop(message);
        let epoch = tracker.lock().expect("tracker").take(partition, offset);
        let place = Place { partition, offset, epoch };
        let inbound = shared.inbound(place, payload, key, 1);
        if messages.send(inbound).await.is_err() {
            break;
        }
    }
    lag.abort();
    // Every settled message's commit was sent on its way; a last synchronous commit makes
    // sure they are stored before the group hears that this member leaves.
    let pending = tracker.lock().expect("tracker").committable(&source.topic);
    if pending.count() > 0
        && let Err(error) = consumer.commit(&pending, CommitMode::Sync)
    {
        tracing::warn!(%error, "Kafka: the last commit failed; those messages come back as duplicates");
    }
    Ok(())
}

/// Creates `topic` with the broker's defaults when it is missing.
async fn create_topic(common: &ClientConfig, topic: &str, closing: &CancellationToken) {
    let admin: AdminClient<DefaultClientContext> = match common.create() {
        Ok(admin) => admin,
        Err(error) => return tracing::warn!(%error, "Kafka admin client"),
    };
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut pause = super::RECONNECT;
    loop {
        match admin.create_topics([&new], &options).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(_) => tracing::info!(topic, "Kafka topic created"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((_, code)) => tracing::warn!(topic, error = %code, "Kafka: cannot create the topic"),
                    }
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?pause.peek(), "Kafka unavailable; will try again");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => {}
                    () = closing.cancelled() => return,
                }
            }
        }
    }
}

/// Which message of which partition assignment.
#[derive(Clone, Copy, Debug)]
struct Place {
    partition: i32,
    offset: i64,
    /// The assignment the message was taken under; a settlement of an earlier one commits
    /// nothing.
    epoch: u64,
}

/// The offsets taken per partition, and which are settled.
#[derive(Default)]
struct Tracker {
    partitions: HashMap<i32, Partition>,
    epochs: u64,
}

struct Partition {
    epoch: u64,
    /// Offsets taken and not yet committed: `true` once settled.
    offsets: BTreeMap<i64, bool>,
    /// The offset to commit (the next one to read), once something is settled.
    commit: Option<i64>,
    /// The last offset taken.
    seen: i64,
}

impl Tracker {
    fn assign(&mut self, partition: i32) -> &mut Partition {
        self.epochs += 1;
        let epoch = self.epochs;
        self.partitions.insert(partition, Partition { epoch, offsets: BTreeMap::new(), commit: None, seen: -1 });
        self.partitions.get_mut(&partition).expect("just inserted")
    }

    /// A message taken: its partition's epoch.
    fn take(&mut self, partition: i32, offset: i64) -> u64 {
        let state = match self.partitions.contains_key(&partition) {
            true => self.partitions.get_mut(&partition).expect("present"),
            false => self.assign(partition),
        };
        state.offsets.insert(offset, false);
        state.seen = state.seen.max(offset);
        state.epoch
    }

    /// True while `place`'s partition is still held under the same assignment.
    fn holds(&self, place: Place) -> bool {
        self.partitions.get(&place.partition).is_some_and(|p| p.epoch == place.epoch)
    }

    /// A message settled: the partition's new commit offset when it moved.
    fn settle(&mut self, place: Place) -> Option<i64> {
        let state = self.partitions.get_mut(&place.partition).filter(|p| p.epoch == place.epoch)?;
        state.offsets.insert(place.offset, true);
        let mut moved = None;
        while let Some(entry) = state.offsets.first_entry() {
            if !*entry.get() {
                break;
            }
            moved = Some(entry.remove_entry().0 + 1);
        }
        if moved.is_some() {
            state.commit = moved;
        }
        moved
    }

    /// The commit offsets of every partition held.
    fn committable(&self, topic: &str) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (partition, state) in &self.partitions {
            if let Some(offset) = state.commit {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(offset));
            }
        }
        list
    }
}

/// The rebalance callbacks: run by librdkafka inside `recv`.
struct Context {
    tracker: Arc<Mutex<Tracker>>,
    topic: String,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let mut tracker = self.tracker.lock().expect("tracker");
        let mut commit = TopicPartitionList::new();
        for element in revoked.elements_for_topic(&self.topic) {
            let Some(state) = tracker.partitions.remove(&element.partition()) else { continue };
            let abandoned = state.offsets.values().filter(|settled| !**settled).count();
            if abandoned > 0 {
                tracing::info!(
                    partition = element.partition(),
                    abandoned,
                    "Kafka partition revoked with messages in flight; its next owner meets them as duplicates"
                );
            }
            if let Some(offset) = state.commit {
                let _ = commit.add_partition_offset(&self.topic, element.partition(), Offset::Offset(offset));
            }
        }
        drop(tracker);
        if commit.count() > 0
            && let Err(error) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(%error, "Kafka: commit before a revocation failed; those messages come back as duplicates");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let mut tracker = self.tracker.lock().expect("tracker");
            for element in assigned.elements_for_topic(&self.topic) {
                tracker.assign(element.partition());
            }
            tracing::info!(partitions = assigned.count(), "Kafka partitions assigned");
        }
    }
}

struct DeadLetter {
    producer: FutureProducer,
    topic: String,
}

/// What every message's settlement needs.
struct Shared {
    consumer: Arc<StreamConsumer<Context>>,
    tracker: Arc<Mutex<Tracker>>,
    topic: String,
    dead_letter: Option<DeadLetter>,
    /// Where a message to deliver again goes back in.
    messages: mpsc::Sender<Inbound>,
}

impl Shared {
    fn inbound(self: &Arc<Self>, place: Place, payload: Bytes, key: Option<Vec<u8>>, deliveries: u64) -> Inbound {
        let header_id = Some(format!("{}/{}/{}", self.topic, place.partition, place.offset));
        let settle = Box::new(Settled { shared: self.clone(), place, payload: payload.clone(), key, deliveries });
        Inbound { header_id, payload, deliveries, settle }
    }

    /// Marks `place` settled and commits its partition when that moved the commit offset.
    fn done(&self, place: Place) -> Result<(), String> {
        let Some(offset) = self.tracker.lock().expect("tracker").settle(place) else { return Ok(()) };
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, place.partition, Offset::Offset(offset)).map_err(|e| e.to_string())?;
        self.consumer.commit(&list, CommitMode::Async).map_err(|e| e.to_string())
    }
}

struct Settled {
    shared: Arc<Shared>,
    place: Place,
    payload: Bytes,
    key: Option<Vec<u8>>,
    deliveries: u64,
}

impl Settled {
    /// Delivers the message again after `after`, unless its partition moved on meanwhile.
    fn again(self, after: Duration) {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if !self.shared.tracker.lock().expect("tracker").holds(self.place) {
                return;
            }
            let inbound = self.shared.inbound(self.place, self.payload, self.key, self.deliveries + 1);
            // Refused only while the consumer stops: the message is not committed, so it
            // comes back after the restart.
            let _ = self.shared.messages.clone().send(inbound).await;
        });
    }
}

#[async_trait::async_trait]
impl Settle for Settled {
    async fn ack(self: Box<Self>) -> Result<(), String> {
        self.shared.done(self.place)
    }

    async fn retry(self: Box<Self>, after: Duration) -> Result<(), String> {
        self.again(after);
        Ok(())
    }

    async fn reject(self: Box<Self>) -> Result<(), String> {
        if let Some(dead) = &self.shared.dead_letter {
            let mut record = FutureRecord::<[u8], [u8]>::to(&dead.topic).payload(&self.payload[..]);
            if let Some(key) = &self.key {
                record = record.key(&key[..]);
            }
            if let Err((error, _)) = dead.producer.send(record, Duration::from_secs(10)).await {
                // Not dead-lettered: not settled either. It is decided again (the record
                // says `needs_review`) and dead-lettered then.
                let why = format!("dead letter to {}: {error}", dead.topic);
                self.again(Duration::from_secs(1));
                return Err(why);
            }
        }
        self.shared.done(self.place)
    }
}

/// Refreshes `idem_consumer_lag` every five seconds: per partition held, the end of the log
/// (the high watermark, or past the last message taken when the broker reports less) less
/// the committed offset.
async fn report_lag(shared: Arc<Shared>, subscriber: String) {
    let gauge = metrics::gauge!(crate::metrics::CONSUMER_LAG, "subscriber" => subscriber);
    loop {
        let held: Vec<(i32, i64, i64)> = {
            let tracker = shared.tracker.lock().expect("tracker");
            let first = |p: &Partition| p.offsets.keys().next().copied().or(p.commit).unwrap_or(p.seen + 1);
            tracker.partitions.iter().map(|(n, p)| (*n, p.commit.unwrap_or_else(|| first(p)), p.seen)).collect()
        };
        let consumer = shared.consumer.clone();
        let topic = shared.topic.clone();
        let lag = tokio::task::spawn_blocking(move || {
            held.into_iter()
                .map(|(partition, committed, seen)| {
                    let high = match consumer.fetch_watermarks(&topic, partition, Duration::from_secs(2)) {
                        Ok((_, high)) => high,
                        Err(_) => seen + 1,
                    };
                    (high.max(seen + 1) - committed).max(0)
                })
                .sum::<i64>()
        })
        .await
        .unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        gauge.set(lag as f64);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_commits_only_up_to_its_first_unsettled_message() {
        let mut tracker = Tracker::default();
        tracker.assign(0);
        let epoch = tracker.take(0, 10);
        let place = |offset| Place { partition: 0, offset, epoch };
        for offset in [11, 13] {
            tracker.take(0, offset);
        }
        assert_eq!(tracker.settle(place(11)), None, "10 is still in flight");
        assert_eq!(tracker.settle(place(13)), None);
        // 12 was never taken (a compacted or control record): no gap.
        assert_eq!(tracker.settle(place(10)), Some(14), "everything taken up to 13 is settled");
        tracker.take(0, 14);
        tracker.take(0, 15);
        assert_eq!(tracker.settle(place(15)), None, "14 is in flight: never commit past it");
        // Revoked and assigned again: a late settlement of the old assignment commits nothing.
        tracker.assign(0);
        assert!(!tracker.holds(place(14)));
        assert_eq!(tracker.settle(place(14)), None);
        assert_eq!(tracker.committable("t").count(), 0, "the new assignment has settled nothing yet");
    }
}
