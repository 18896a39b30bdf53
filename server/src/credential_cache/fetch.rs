//! One STS call for a session: started in its own task and shared by every caller, its result
//! recorded in the session's entry (credentials, or the failure and when to retry), the pod's
//! allowance of new sessions taken and given back, and still-valid credentials served when STS
//! fails.

use super::config::{SESSION_BURST, SESSION_REFILL, backoff};
use super::{CredentialCache, Entry, Fetch, Served, StsError};
use crate::authz::session::SessionKey;
use futures::FutureExt;
use imdsgate_core::latch::Latch;
use imdsgate_proto::Credentials;
use std::sync::Arc;
use std::time::SystemTime;

impl CredentialCache {
    /// Takes one new session from the pod's allowance, if it has one.
    pub(super) fn take_session_budget(&self, pod_uid: &str, now: SystemTime) -> bool {
        let mut budgets = self.inner.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = budgets.entry(pod_uid.to_string()).or_insert((SESSION_BURST, now));
        let earned = now.duration_since(*at).unwrap_or_default().as_secs_f64() / SESSION_REFILL.as_secs_f64();
        *tokens = (*tokens + earned).min(SESSION_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub(super) fn fall_back(
        &self,
        fallback: Option<Arc<Credentials>>,
        error: StsError,
    ) -> Result<(Arc<Credentials>, Served), StsError> {
        match fallback {
            Some(issued) => {
                self.inner.metrics.cache_stale_served.inc();
                tracing::warn!(%error, "STS failed; serving cached credentials that are still valid");
                Ok((issued, Served::Stale))
            }
            None => Err(error),
        }
    }

    pub(super) fn may_fetch(&self, entry: &Entry, now: SystemTime) -> bool {
        entry.inflight.is_none() && entry.retry_at.is_none_or(|at| now >= at)
    }

    /// Starts the STS call for `key`; `charged`: it took one of the pod's new sessions, given back
    /// if the call gives way.
    pub(super) fn start_fetch(
        &self,
        entry: &mut Entry,
        key: SessionKey,
        urgent: bool,
        charged: bool,
    ) -> Fetch {
        let inner = self.inner.clone();
        let duration = inner.config.session_duration;
        let urgency = Latch::new(urgent);
        let call_urgency = urgency.clone();
        let task = tokio::spawn(async move {
            let result = inner.sts.assume_role(key.clone(), duration, call_urgency).await.map(Arc::new);
            let now = (inner.clock)();
            let mut entries = inner.entries.of(&key.pod_uid);
            // The session may have been dropped (pod deleted) while STS answered.
            // No session was made: the call gave way to waiting pods, or STS was unavailable (an
            // outage is not the pod's doing: its retries are paced by the backoff, and must not
            // spend the allowance meant for annotation changes). A refusal (Denied) keeps it spent.
            if charged
                && matches!(result, Err(StsError::Deferred | StsError::Unavailable(_)))
                && let Some((tokens, _)) =
                    inner.budgets.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&key.pod_uid)
            {
                *tokens = (*tokens + 1.0).min(SESSION_BURST);
            }
            if let Some(entry) = entries.get_mut(&key) {
                entry.inflight = None;
                match &result {
                    // Gave way to waiting pods: not a failure, nothing to back off from.
                    Err(StsError::Deferred) => {}
                    Ok(issued) => {
                        entry.current = Some(issued.clone());
                        entry.failures = 0;
                        entry.retry_at = None;
                        entry.last_error = None;
                    }
                    Err(error) => {
                        entry.failures = entry.failures.saturating_add(1);
                        entry.retry_at = Some(now + backoff(&inner.config, entry.failures));
                        entry.last_error = Some(error.clone());
                    }
                }
            }
            drop(entries);
            inner.metrics.cached_sessions.set(inner.sessions() as i64);
            result
        });
        let fetch = async move {
            task.await
                .unwrap_or_else(|e| Err(StsError::Unavailable(format!("credential fetch task failed: {e}"))))
        }
        .boxed()
        .shared();
        entry.inflight = Some((fetch.clone(), urgency));
        fetch
    }
}
