//! One STS call for a session: started in its own task and shared by every caller, its result
//! recorded in the session's entry (credentials, or the failure and when to retry), the pod's
//! allowance of new sessions taken and given back, and still-valid credentials served when STS
//! fails.

use super::config::{MAX_NAMESPACE_BUDGETS, NAMESPACE_SESSIONS, POD_SESSIONS, backoff};
use super::{CredentialCache, Entry, Fetch, Served, StsError};
use crate::authz::session::SessionKey;
use crate::budget::Bucket;
use crate::metrics::BudgetLabels;
use futures::FutureExt;
use imdsgate_core::latch::Latch;
use imdsgate_proto::Credentials;
use std::sync::Arc;
use std::time::SystemTime;

/// Which allowance of new sessions was spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Spent {
    Pod,
    Namespace,
}

impl CredentialCache {
    /// Takes one new session from the pod's allowance and from its namespace's, if both have one
    /// (neither is taken otherwise). The namespace's allowance limits only background work
    /// (`urgent` false: prefetches of pods that may never run, which is what create/delete loops
    /// spend): a pod waiting on its own first credentials runs on a node, and is limited by its own
    /// allowance and `--sts-max-rps`; it takes from the namespace's allowance when there is some.
    pub(super) fn take_session_budget(
        &self,
        pod_uid: &str,
        namespace: &str,
        urgent: bool,
        now: SystemTime,
    ) -> Result<(), Spent> {
        let mut budgets = self.inner.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let mut namespaces = self.inner.namespace_budgets.lock().unwrap_or_else(|e| e.into_inner());
        let pod = budgets.entry(pod_uid.to_string()).or_insert_with(|| Bucket::full(&POD_SESSIONS, now));
        let spent = if !pod.has_one(&POD_SESSIONS, now) {
            Some(Spent::Pod)
        } else {
            if !namespaces.contains_key(namespace) && namespaces.len() >= MAX_NAMESPACE_BUDGETS {
                namespaces.retain(|_, bucket| !bucket.is_full(&NAMESPACE_SESSIONS, now));
            }
            let shared = namespaces
                .entry(namespace.to_string())
                .or_insert_with(|| Bucket::full(&NAMESPACE_SESSIONS, now));
            if shared.take(&NAMESPACE_SESSIONS, now) || urgent {
                pod.take(&POD_SESSIONS, now);
                None
            } else {
                Some(Spent::Namespace)
            }
        };
        match spent {
            None => Ok(()),
            Some(spent) => {
                let budget = match spent {
                    Spent::Pod => "pod",
                    Spent::Namespace => "namespace",
                };
                self.inner.metrics.sessions_throttled.get_or_create(&BudgetLabels { budget }).inc();
                Err(spent)
            }
        }
    }

    /// Gives back the new session taken from the pod's and the namespace's allowances for a call
    /// that made none.
    fn give_back_session_budget(&self, pod_uid: &str, namespace: &str) {
        if let Some(pod) = self.inner.budgets.lock().unwrap_or_else(|e| e.into_inner()).get_mut(pod_uid) {
            pod.give_back(&POD_SESSIONS);
        }
        if let Some(shared) =
            self.inner.namespace_budgets.lock().unwrap_or_else(|e| e.into_inner()).get_mut(namespace)
        {
            shared.give_back(&NAMESPACE_SESSIONS);
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

    /// Starts the STS call for `key`; `charged`: the namespace whose allowance (and the pod's) it
    /// took a new session from, given back if the call makes none.
    pub(super) fn start_fetch(
        &self,
        entry: &mut Entry,
        key: SessionKey,
        urgent: bool,
        charged: Option<String>,
    ) -> Fetch {
        let cache = self.clone();
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
            if let Some(namespace) = &charged
                && matches!(result, Err(StsError::Deferred | StsError::Unavailable(_)))
            {
                cache.give_back_session_budget(&key.pod_uid, namespace);
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
