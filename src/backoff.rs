//! The one backoff schedule: every wait-and-try-again loop in idem (a store that is not up
//! yet, a broker reconnect, a claim waiting for another owner, a retried call) takes its
//! pauses from a [`Backoff`], so the doubling, the cap and the jitter are written once.

use std::time::Duration;

/// Exponential backoff: `initial`, then doubling up to `cap`, optionally with full jitter
/// (a uniformly random wait between zero and the pause, so that many clients retrying the
/// same outage do not come back in lockstep).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    jitter: Jitter,
    /// The pause [`Backoff::next_pause`] hands out next (before jitter).
    next: Duration,
}

/// Whether a pause is used as it is or drawn below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// The pause itself: for one process waiting on one resource.
    None,
    /// A uniformly random wait in `[0, pause]`.
    Full,
}

impl Backoff {
    /// Pauses of `initial`, `2 × initial`, … up to `cap`, without jitter.
    pub const fn doubling(initial: Duration, cap: Duration) -> Self {
        Backoff { initial, cap, jitter: Jitter::None, next: initial }
    }

    /// The same schedule with full jitter.
    pub const fn with_full_jitter(mut self) -> Self {
        self.jitter = Jitter::Full;
        self
    }

    /// The pause to wait now; the next one doubles (up to the cap).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.cap);
        self.jittered(pause)
    }

    /// The pause the next call to [`Backoff::next_pause`] starts from, before jitter: for
    /// log lines that say how long the wait will be.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to `initial`, after the thing waited for worked.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The pause before attempt `attempt + 1`, for a caller that counts its attempts
    /// (1-based `attempt`: the first retry waits `initial`).
    pub fn for_attempt(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        let pause = self.initial.saturating_mul(1u32 << doublings).min(self.cap);
        self.jittered(pause)
    }

    fn jittered(&self, pause: Duration) -> Duration {
        match self.jitter {
            Jitter::None => pause,
            Jitter::Full => pause.mul_f64(rand::random::<f64>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::doubling(100 * MS, 350 * MS);
        let pauses: Vec<_> = (0..4).map(|_| backoff.next_pause()).collect();
        assert_eq!(pauses, [100 * MS, 200 * MS, 350 * MS, 350 * MS]);
        backoff.reset();
        assert_eq!(backoff.next_pause(), 100 * MS);
    }

    #[test]
    fn attempts_count_from_one_and_never_overflow() {
        let backoff = Backoff::doubling(200 * MS, Duration::from_secs(30));
        assert_eq!(backoff.for_attempt(0), 200 * MS);
        assert_eq!(backoff.for_attempt(1), 200 * MS);
        assert_eq!(backoff.for_attempt(3), 800 * MS);
        assert_eq!(backoff.for_attempt(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn full_jitter_stays_below_the_pause() {
        let mut backoff = Backoff::doubling(100 * MS, Duration::from_secs(1)).with_full_jitter();
        for _ in 0..100 {
            assert!(backoff.next_pause() <= Duration::from_secs(1));
            assert!(backoff.for_attempt(2) <= 200 * MS);
        }
    }
}
