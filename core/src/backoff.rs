//! Exponential backoff, the one copy every retry loop uses (accepting connections, the agent's
//! revocation feed, the server's base-ARN detection): from a first pause, doubling up to a
//! ceiling, back to the first after a success.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

/// The pause between failed `accept` calls: 5 ms, doubling up to 1 s.
impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(5), Duration::from_secs(1))
    }
}

impl Backoff {
    /// Pauses from `min`, doubling up to `max` (`max` below `min` counts as `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), next: min }
    }

    /// The pause after one more failure.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// A success: the next failure pauses `min` again.
    pub fn succeeded(&mut self) {
        self.next = self.min;
    }

    /// The pause after `failures` failures in a row, for callers that count failures themselves
    /// (one count per cache entry): `min` after the first, doubling up to `max`.
    pub fn after(&self, failures: u32) -> Duration {
        self.min.saturating_mul(1 << failures.saturating_sub(1).min(31)).min(self.max)
    }
}

/// `pause` with jitter, uniformly in `[pause/2, pause]`: callers that failed together (every pod
/// of a role when STS throttles) do not all retry at once.
pub fn jittered(pause: Duration) -> Duration {
    let half = pause / 2;
    half + (pause - half).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_cap_and_starts_over_after_a_success() {
        let s = Duration::from_secs;
        let mut backoff = Backoff::new(s(1), s(5));
        let pauses: Vec<_> = (0..5).map(|_| backoff.failed()).collect();
        assert_eq!(pauses, [s(1), s(2), s(4), s(5), s(5)]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), s(1));
        assert_eq!(Backoff::new(s(3), s(1)).failed(), s(3));
        let mut accept = Backoff::default();
        let pauses: Vec<u128> = (0..10).map(|_| accept.failed().as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000], "between failed accepts");
    }

    #[test]
    fn a_counted_failure_pauses_as_long_as_that_many_failures_in_a_row() {
        let s = Duration::from_secs;
        let counted = Backoff::new(s(1), s(60));
        let mut stepped = counted.clone();
        for failures in 1..=40 {
            assert_eq!(counted.after(failures), stepped.failed(), "{failures}");
        }
        for pause in [s(0), s(1), s(60)] {
            for _ in 0..100 {
                let j = jittered(pause);
                assert!(j >= pause / 2 && j <= pause, "{j:?} outside [{:?}, {pause:?}]", pause / 2);
            }
        }
    }
}
