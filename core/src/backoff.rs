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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_ceiling_and_start_over_after_a_success() {
        let s = Duration::from_secs;
        let mut backoff = Backoff::new(s(1), s(5));
        let pauses: Vec<_> = (0..5).map(|_| backoff.failed()).collect();
        assert_eq!(pauses, [s(1), s(2), s(4), s(5), s(5)]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), s(1));
        assert_eq!(Backoff::new(s(3), s(1)).failed(), s(3));
    }
}
