//! Where "now" comes from. Records compare wall-clock milliseconds (several processes and
//! machines share a store), so production reads the system clock; a test can instead follow
//! tokio's clock, which `tokio::time::pause` stops and `advance` moves, so leases and
//! expiries are tested without real sleeps.

use tokio::time::Instant;

use super::now_millis;
use crate::core::Millis;

/// A source of the current time in milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// Tokio's clock: `at` when it read `origin`, moving as tokio's time moves (paused
    /// time included).
    Tokio {
        /// Tokio's instant when the clock was made.
        origin: Instant,
        /// The system time then.
        at: Millis,
    },
}

impl Clock {
    /// A clock that follows tokio's time from the system time now: under
    /// `tokio::time::pause` it stands still until the test advances it.
    pub fn tokio() -> Self {
        Clock::Tokio { origin: Instant::now(), at: now_millis() }
    }

    /// Now.
    pub fn now(&self) -> Millis {
        match self {
            Clock::System => now_millis(),
            Clock::Tokio { origin, at } => at + origin.elapsed().as_millis() as Millis,
        }
    }
}
