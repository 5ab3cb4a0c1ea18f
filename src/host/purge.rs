//! Retention for every entry point: the background purge of expired records, in batches
//! small enough that traffic never stalls behind it, and the record gauges it refreshes.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{Store, now_millis};

/// How many expired records one purge statement removes: small enough that the writer
/// is never held for long, so traffic does not stall behind retention.
pub const PURGE_BATCH: usize = 500;

/// Removes expired records every `every` until `stop`, then refreshes the record gauges.
/// Counting records can mean reading a whole table, so after a count the next one waits a
/// hundred times as long as it took: a count that takes 1 s runs at most every 100 s.
pub async fn purge_loop(store: Arc<dyn Store>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_count = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let removed = purge_all(store.as_ref(), &stop).await;
        if removed > 0 {
            tracing::info!(removed, "purged expired records");
        }
        if tokio::time::Instant::now() < next_count {
            continue;
        }
        let started = tokio::time::Instant::now();
        match store.stats().await {
            Ok(stats) => crate::metrics::set_records(&stats),
            Err(error) => tracing::warn!(%error, "could not read record counts"),
        }
        next_count = started + started.elapsed() * 100;
    }
}

/// Purges every expired record, one small batch at a time, yielding between batches;
/// returns how many were removed.
pub async fn purge_all(store: &dyn Store, stop: &CancellationToken) -> u64 {
    let mut removed = 0;
    while !stop.is_cancelled() {
        match store.purge_expired(now_millis(), PURGE_BATCH).await {
            Ok(n) => {
                removed += n;
                if (n as usize) < PURGE_BATCH {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "purge failed; will try again");
                break;
            }
        }
    }
    removed
}
