//! The cache's timing: session lifetime, when credentials are too old to hand out or due for a
//! refresh, how STS failures back off, and the allowances of new sessions (each pod's, and each
//! namespace's).

use crate::budget::Allowance;
use imdsgate_core::backoff::{Backoff, jittered};
use std::time::Duration;

/// A pod may start this many new sessions at once (its first, and a few annotation changes)...
pub const SESSION_BURST: f64 = 4.0;
/// ...and then one more per this long.
pub const SESSION_REFILL: Duration = Duration::from_secs(5 * 60);
/// Each pod's allowance of new sessions: annotation changes in a loop cannot spend STS.
pub const POD_SESSIONS: Allowance = Allowance { burst: SESSION_BURST, every: SESSION_REFILL };

/// A namespace's pods may start this many new sessions at once: a Deployment of up to 300
/// replicas rolled out at once gets every session fetched ahead of its pods' first requests...
pub const NAMESPACE_SESSION_BURST: f64 = 300.0;
/// ...and then one more per this long (5 a second, 18,000 an hour): faster than kubelets start one
/// namespace's pods past such a burst (the rest of a 1,000-replica rollout waits at most 140 s),
/// and a fortieth of the default `--sts-max-rps` (200), so pods created and deleted in a loop
/// (each a new UID, each with a fresh pod allowance) take at most that share of the account's STS
/// quota, whatever their number.
pub const NAMESPACE_SESSION_REFILL: Duration = Duration::from_millis(200);
/// Each namespace's allowance of new sessions, shared by all its pods.
pub const NAMESPACE_SESSIONS: Allowance =
    Allowance { burst: NAMESPACE_SESSION_BURST, every: NAMESPACE_SESSION_REFILL };
/// Namespace allowances counted at most before those whole again are forgotten (one per
/// namespace; a whole allowance is the same as none counted).
pub const MAX_NAMESPACE_BUDGETS: usize = 10_000;

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
