//! The cache's timing: session lifetime, when credentials are too old to hand out or due for a
//! refresh, how STS failures back off, and each pod's allowance of new sessions.

use imdsgate_core::backoff::{Backoff, jittered};
use std::time::Duration;

/// A pod may start this many new sessions at once (its first, and a few annotation changes)...
pub const SESSION_BURST: f64 = 4.0;
/// ...and then one more per this long.
pub const SESSION_REFILL: Duration = Duration::from_secs(5 * 60);

/// Cache timing.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Requested session lifetime (`--session-duration`).
    pub session_duration: Duration,
    /// First retry delay after an STS failure; doubles per failure, with jitter.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl CacheConfig {
    pub fn new(session_duration: Duration) -> Self {
        CacheConfig {
            session_duration,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }

    /// Credentials with less than this left are not handed out while STS works: 15 minutes, or a
    /// quarter of a shorter session.
    pub fn min_remaining(&self) -> Duration {
        imdsgate_proto::min_remaining(self.session_duration)
    }

    /// The background refresh starts when this much is left.
    pub fn refresh_remaining(&self) -> Duration {
        self.min_remaining() + Duration::from_secs(5 * 60).min(self.session_duration / 4)
    }
}

/// The pause after `failures` STS failures in a row: exponential, capped, with jitter.
pub(super) fn backoff(config: &CacheConfig, failures: u32) -> Duration {
    jittered(Backoff::new(config.backoff_base, config.backoff_max).after(failures))
}
