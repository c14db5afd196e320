//! Holding the answer to a rate-limited request for a moment.
//!
//! A refusal that costs nothing invites a client that does not read `Retry-After` to send the
//! next request at once: a flood then becomes a stream of cheap refusals that still costs kas
//! (TLS, HTTP parsing) and the machine CPU at full speed. Holding the refusal for a moment
//! turns each flooding connection into about one request per delay. Holding costs a sleeping
//! task per request, so at most `max_held` are held at once; beyond that refusals are answered
//! at once, and memory stays bounded however many connections a flood opens.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// Shared by every listener's guard.
#[derive(Debug, Clone)]
pub struct Tarpit {
    delay: Duration,
    slots: Arc<Semaphore>,
}

impl Tarpit {
    /// `delay` zero: refusals are answered at once.
    pub fn new(delay: Duration, max_held: usize) -> Self {
        Self {
            delay,
            slots: Arc::new(Semaphore::new(max_held)),
        }
    }

    /// Waits `delay` if a slot is free, else returns at once.
    pub async fn hold(&self) {
        if self.delay.is_zero() {
            return;
        }
        if let Ok(_slot) = self.slots.try_acquire() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn refusals_are_held_for_the_delay_while_slots_last() {
        let t = Tarpit::new(Duration::from_secs(1), 2);
        let started = Instant::now();
        // Two held, the third answered at once.
        let held = tokio::spawn({
            let t = t.clone();
            async move { tokio::join!(t.hold(), t.hold()) }
        });
        tokio::task::yield_now().await;
        t.hold().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        held.await.expect("held");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        // Slots are returned.
        t.hold().await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_delay_holds_nothing() {
        let started = Instant::now();
        Tarpit::new(Duration::ZERO, 1).hold().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
