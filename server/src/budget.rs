//! The one token bucket: an allowance of `burst` at once, then one more per `every`. The credential
//! cache's budgets of new STS sessions (per pod, per namespace) and the agent authenticator's
//! TokenReviews per connection are all counted with it.

use std::time::{Duration, SystemTime};

/// How much a bucket allows: `burst` at once, then one more per `every`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Allowance {
    pub burst: f64,
    pub every: Duration,
}

/// What is left of an [`Allowance`], as of when it was last counted.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: SystemTime,
}

impl Bucket {
    /// A bucket with its whole burst.
    pub fn full(allowance: &Allowance, now: SystemTime) -> Bucket {
        Bucket { tokens: allowance.burst, at: now }
    }

    fn refill(&mut self, allowance: &Allowance, now: SystemTime) {
        let earned = now.duration_since(self.at).unwrap_or_default().as_secs_f64()
            / allowance.every.as_secs_f64().max(f64::MIN_POSITIVE);
        self.tokens = (self.tokens + earned).min(allowance.burst);
        // A clock that went back counts nothing, and does not move the bucket back either.
        self.at = self.at.max(now);
    }

    /// Whether one is left now (nothing is taken).
    pub fn has_one(&mut self, allowance: &Allowance, now: SystemTime) -> bool {
        self.refill(allowance, now);
        self.tokens >= 1.0
    }

    /// Takes one, if one is left.
    pub fn take(&mut self, allowance: &Allowance, now: SystemTime) -> bool {
        let ok = self.has_one(allowance, now);
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }

    /// Gives back one taken for something that did not happen.
    pub fn give_back(&mut self, allowance: &Allowance) {
        self.tokens = (self.tokens + 1.0).min(allowance.burst);
    }

    /// Whether it has its whole burst again (then it is no different from a new one, and whoever
    /// keeps many may forget it).
    pub fn is_full(&mut self, allowance: &Allowance, now: SystemTime) -> bool {
        self.refill(allowance, now);
        self.tokens >= allowance.burst
    }

    /// What is left, for choosing which bucket to forget first.
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_period() {
        let allowance = Allowance { burst: 3.0, every: Duration::from_secs(10) };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut bucket = Bucket::full(&allowance, t0);
        assert!((0..3).all(|_| bucket.take(&allowance, t0)));
        assert!(!bucket.take(&allowance, t0));
        assert!(!bucket.take(&allowance, t0 + Duration::from_secs(9)));
        assert!(bucket.take(&allowance, t0 + Duration::from_secs(10)));
        bucket.give_back(&allowance);
        assert!(bucket.take(&allowance, t0 + Duration::from_secs(10)));
        assert!(!bucket.is_full(&allowance, t0 + Duration::from_secs(29)));
        assert!(bucket.is_full(&allowance, t0 + Duration::from_secs(40)));
        // A clock going back earns nothing.
        let mut bucket = Bucket::full(&allowance, t0);
        (0..3).for_each(|_| assert!(bucket.take(&allowance, t0)));
        assert!(!bucket.take(&allowance, t0 - Duration::from_secs(100)));
    }
}
