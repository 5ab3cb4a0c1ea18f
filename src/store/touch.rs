//! Replay bookkeeping (`replay_count`, `last_seen_at`) summed in memory and written in
//! batches: losing a count loses no decision, so a hot key replayed thousands of times a
//! second costs one row update per flush instead of a write per replay.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::core::{Millis, RecordId};

/// How often summed counts are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One record's pending bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touch {
    /// The record.
    pub id: RecordId,
    /// Replays since the last flush.
    pub replays: u64,
    /// The latest replay.
    pub last_seen_at: Millis,
}

/// Pending replay counts.
#[derive(Default)]
pub struct TouchBuffer {
    pending: Mutex<HashMap<RecordId, (u64, Millis)>>,
}

impl TouchBuffer {
    /// Counts one replay of `id` at `now`.
    pub fn add(&self, id: RecordId, now: Millis) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pending.entry(id).or_insert((0, now));
        entry.0 += 1;
        entry.1 = entry.1.max(now);
    }

    /// Takes everything pending.
    pub fn take(&self) -> Vec<Touch> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        pending.into_iter().map(|(id, (replays, last_seen_at))| Touch { id, replays, last_seen_at }).collect()
    }
}

/// Starts a task that hands pending counts to `write` every [`FLUSH_EVERY`] and stops
/// once the buffer (owned by its store) is dropped.
pub fn spawn_flusher<F, Fut>(buffer: &Arc<TouchBuffer>, write: F)
where
    F: Fn(Vec<Touch>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let buffer: Weak<TouchBuffer> = Arc::downgrade(buffer);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(FLUSH_EVERY).await;
            let Some(buffer) = buffer.upgrade() else { return };
            let touches = buffer.take();
            drop(buffer);
            if !touches.is_empty() {
                write(touches).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_summed_per_record() {
        let buffer = TouchBuffer::default();
        let a = RecordId::new("s", "", "a");
        buffer.add(a.clone(), 10);
        buffer.add(a.clone(), 30);
        buffer.add(a.clone(), 20);
        buffer.add(RecordId::new("s", "", "b"), 5);
        let mut touches = buffer.take();
        touches.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(touches[0], Touch { id: a, replays: 3, last_seen_at: 30 });
        assert_eq!(touches[1].replays, 1);
        assert!(buffer.take().is_empty());
    }
}
