//! Publishing through transient refusals, and backoff for reconnects.
//!
//! Every process that publishes (a client its calls, a worker its replies,
//! the coordinator its decisions' effects) retries the same way: a refusal
//! the broker may take back ([`Error::is_transient`]) is tried again after a
//! growing, jittered pause, until a deadline; anything else, and the
//! deadline, end it. [`Backoff`] is that pause, and also paces reconnects.

use std::time::Duration;

use tokio::time::Instant;

use crate::{Broker, Error, Message};

/// Growing pauses: each the double of the one before, up to a cap, each
/// drawn at random from its upper half so that many processes that failed
/// together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
    seed: u64,
}

impl Backoff {
    /// Pauses from `first` up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            next: first,
            cap: cap.max(first),
            seed: seed(),
        }
    }

    /// The next pause (jittered), and the one after grows.
    pub fn next_delay(&mut self) -> Duration {
        let full = self.next;
        self.next = (self.next * 2).min(self.cap);
        // xorshift: cheap, and enough to spread retries apart.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = full / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(if nanos == 0 { 0 } else { self.seed % nanos })
    }

    /// The pause the next call of [`Backoff::next_delay`] grows from, without
    /// jitter: where the backoff stands.
    pub fn current(&self) -> Duration {
        self.next
    }

    /// Starts over from the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// Publishes `message` to `queue` with confirm, retrying transient refusals
/// (queue full, no confirm, a dropped connection, a slow broker) with
/// [`Backoff`] from 5 ms up to 1 s, until `give_up`. The first error that is
/// not transient is returned at once; at the deadline, the last error seen,
/// or [`Error::Timeout`] of `budget` when the publish itself was still
/// waiting. `budget` only names the wait in that error.
pub async fn publish_until(
    broker: &dyn Broker,
    queue: &str,
    message: &Message,
    give_up: Instant,
    budget: Duration,
) -> Result<(), Error> {
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        let sent = tokio::time::timeout_at(give_up, broker.publish(queue, message.clone()))
            .await
            .unwrap_or(Err(Error::Timeout(budget)));
        match sent {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                let pause = backoff.next_delay();
                if Instant::now() + pause >= give_up {
                    return Err(e);
                }
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// [`publish_until`] within `budget` from now.
pub async fn publish_within(
    broker: &dyn Broker,
    queue: &str,
    message: &Message,
    budget: Duration,
) -> Result<(), Error> {
    publish_until(broker, queue, message, Instant::now() + budget, budget).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_stay_in_their_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let mut fulls = Vec::new();
        for _ in 0..6 {
            let full = b.current();
            let d = b.next_delay();
            assert!(
                d >= full / 2 && d <= full,
                "{d:?} outside [{:?}, {full:?}]",
                full / 2
            );
            fulls.push(full.as_millis());
        }
        assert_eq!(fulls, [10, 20, 40, 80, 80, 80]);
        b.reset();
        assert_eq!(b.current(), Duration::from_millis(10));
    }
}
