//! The credential cache: one STS session per [`SessionKey`], fetched once and shared by every
//! concurrent caller (the fetch runs in its own task, so a caller that goes away cancels nothing),
//! refreshed in the background ahead of expiry, and never handed out with less than the minimum
//! remaining lifetime (SDKs refresh within 15 minutes of expiry and would otherwise call on every
//! request). When STS fails, still-valid credentials keep being served (static stability) and
//! retries back off with jitter. Every session belongs to one pod (its UID is part of the
//! [`SessionKey`]); a pod holds at most one session, and it is dropped when the pod is deleted,
//! changes its annotations or loses its namespace's permission.
//!
//! STS is a shared budget (`--sts-max-rps`, the account's quota): calls a pod is waiting on go
//! first, and background calls (prefetches, refreshes) only use what is left (an urgency [`Latch`]). Each
//! pod may start only a few new sessions in a row ([`SESSION_BURST`], then one per
//! [`SESSION_REFILL`]), so changing a pod's annotations in a loop cannot spend the budget; and the
//! pods of a namespace share an allowance of new sessions fetched ahead
//! ([`NAMESPACE_SESSION_BURST`], then one per [`NAMESPACE_SESSION_REFILL`]), so pods created and
//! deleted in a loop, each a new UID, cannot either; a pod waiting on its own first credentials
//! (it runs on a node) is not held to it. A background refresh first asks whether the session is still what its pod is entitled
//! to (the refresher's `entitled`); one that is not is dropped, not refreshed.

mod assume_role;
mod config;
mod fetch;
mod shards;

pub use assume_role::{AssumeRole, StsError};
pub use config::{
    CacheConfig, NAMESPACE_SESSION_BURST, NAMESPACE_SESSION_REFILL, NAMESPACE_SESSIONS, POD_SESSIONS,
    SESSION_BURST, SESSION_REFILL,
};

use crate::authz::session::SessionKey;
use crate::budget::Bucket;
use crate::metrics::Metrics;
use fetch::Spent;
use futures::future::{BoxFuture, Shared};
use imdsgate_core::latch::Latch;
use imdsgate_proto::Credentials;
use shards::Shards;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Reads the wall clock; replaced in tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

type Fetch = Shared<BoxFuture<'static, Result<Arc<Credentials>, StsError>>>;

#[derive(Default)]
struct Entry {
    current: Option<Arc<Credentials>>,
    inflight: Option<(Fetch, Latch)>,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<StsError>,
}

struct Inner {
    sts: Arc<dyn AssumeRole>,
    config: CacheConfig,
    clock: Clock,
    metrics: Metrics,
    /// Sessions, sharded by their pod's UID.
    entries: Shards<HashMap<SessionKey, Entry>>,
    /// The session each pod (by UID) holds.
    owners: Shards<HashMap<String, SessionKey>>,
    /// Each live pod's allowance of new sessions, by UID.
    budgets: Mutex<HashMap<String, Bucket>>,
    /// Each namespace's allowance of new sessions, shared by its pods (locked after `budgets`).
    namespace_budgets: Mutex<HashMap<String, Bucket>>,
}

impl Inner {
    /// Sessions held, counted shard by shard (never call it holding a shard's lock).
    fn sessions(&self) -> usize {
        self.entries.each().map(|shard| shard.len()).sum()
    }
}

/// How a request was answered (for metrics and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Hit,
    Miss,
    Stale,
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

impl CredentialCache {
    pub fn new(sts: Arc<dyn AssumeRole>, config: CacheConfig, metrics: Metrics) -> Self {
        Self::with_clock(sts, config, metrics, Arc::new(SystemTime::now))
    }

    pub fn with_clock(sts: Arc<dyn AssumeRole>, config: CacheConfig, metrics: Metrics, clock: Clock) -> Self {
        CredentialCache {
            inner: Arc::new(Inner {
                sts,
                config,
                clock,
                metrics,
                entries: Shards::new(),
                owners: Shards::new(),
                budgets: Mutex::new(HashMap::new()),
                namespace_budgets: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Credentials for `key`, on behalf of the pod `key.pod_uid` of `namespace`, which is waiting
    /// for them.
    pub async fn get(
        &self,
        namespace: &str,
        key: &SessionKey,
    ) -> Result<(Arc<Credentials>, Served), StsError> {
        self.get_with(namespace, key, true).await
    }

    async fn get_with(
        &self,
        namespace: &str,
        key: &SessionKey,
        urgent: bool,
    ) -> Result<(Arc<Credentials>, Served), StsError> {
        self.register(key);
        let now = (self.inner.clock)();
        let min_remaining = self.inner.config.min_remaining();
        let (fetch, fallback) = {
            let mut entries = self.inner.entries.of(&key.pod_uid);
            // A hit must not copy the key: look it up first, insert only when absent.
            let entry = if entries.contains_key(key) { entries.get_mut(key) } else { None };
            let entry = match entry {
                Some(entry) => entry,
                None => entries.entry(key.clone()).or_default(),
            };
            if let Some(current) = &entry.current {
                let left = remaining(current, now);
                if left >= min_remaining {
                    let current = current.clone();
                    if left < self.inner.config.refresh_remaining() && self.may_fetch(entry, now) {
                        // The fetch runs in its own task; nobody needs to wait for it here.
                        drop(self.start_fetch(entry, key.clone(), false, None));
                    }
                    drop(entries);
                    self.inner.metrics.cache_hits.inc();
                    return Ok((current, Served::Hit));
                }
            }
            let fallback = entry.current.clone().filter(|c| c.expiration > now);
            if entry.inflight.is_none() && !self.may_fetch(entry, now) {
                // Backing off after a failure: do not hammer STS for every request.
                let error = entry.last_error.clone().unwrap_or(StsError::Unavailable("backing off".into()));
                drop(entries);
                return self.fall_back(fallback, error);
            }
            let fetch = match &entry.inflight {
                Some((fetch, urgency)) => {
                    if urgent {
                        urgency.set();
                    }
                    fetch.clone()
                }
                None => {
                    let new_session = entry.current.is_none();
                    if new_session
                        && let Err(spent) = self.take_session_budget(&key.pod_uid, namespace, urgent, now)
                    {
                        entries.remove(key);
                        drop(entries);
                        return Err(match (urgent, spent) {
                            (true, Spent::Pod) => StsError::Unavailable(format!(
                                "this pod started {SESSION_BURST} new sessions recently (annotation changes); the next is possible within {} s",
                                SESSION_REFILL.as_secs()
                            )),
                            // Background work (the only work a namespace's allowance holds back).
                            _ => StsError::Deferred,
                        });
                    }
                    self.start_fetch(entry, key.clone(), urgent, new_session.then(|| namespace.to_string()))
                }
            };
            (fetch, fallback)
        };
        self.inner.metrics.cache_misses.inc();
        match fetch.await {
            Ok(issued) => Ok((issued, Served::Miss)),
            Err(error) => self.fall_back(fallback, error),
        }
    }

    /// Starts fetching credentials for a pod of `namespace` that just appeared, so its first
    /// request is a hit. A background call: it spends only STS budget that no waiting pod needs,
    /// and only the pod's and its namespace's allowances of new sessions.
    pub fn prefetch(&self, namespace: &str, key: SessionKey) {
        let cache = self.clone();
        let namespace = namespace.to_string();
        tokio::spawn(async move {
            match cache.get_with(&namespace, &key, false).await {
                Err(StsError::Deferred) => {
                    cache.inner.metrics.prefetches_skipped.inc();
                }
                Err(error) => tracing::debug!(role = %key.role_arn, %error, "prefetch failed"),
                Ok(_) => {}
            }
        });
    }

    /// Drops the sessions and allowances of pods for which `live` says no (a request that raced
    /// the pod's deletion may have put its session back; refreshing it would cost STS forever).
    pub fn retain_pods(&self, live: impl Fn(&str) -> bool) -> usize {
        let dead: Vec<String> = self
            .inner
            .owners
            .each()
            .flat_map(|owners| owners.keys().filter(|uid| !live(uid)).cloned().collect::<Vec<_>>())
            .collect();
        for uid in &dead {
            self.pod_gone(uid);
        }
        self.inner.budgets.lock().unwrap_or_else(|e| e.into_inner()).retain(|uid, _| live(uid));
        dead.len()
    }

    /// Forgets a pod that is gone for good: its session and its allowance.
    pub fn pod_gone(&self, pod_uid: &str) {
        self.release(pod_uid);
        self.inner.budgets.lock().unwrap_or_else(|e| e.into_inner()).remove(pod_uid);
    }

    /// Forgets the pod `pod_uid` and drops its session.
    pub fn release(&self, pod_uid: &str) {
        let old = self.inner.owners.of(pod_uid).remove(pod_uid);
        if let Some(old) = old {
            self.drop_session(&old);
        }
    }

    /// Whether the pod `pod_uid` holds a session.
    pub fn holds(&self, pod_uid: &str) -> bool {
        self.inner.owners.of(pod_uid).contains_key(pod_uid)
    }

    /// Whether the cache counts an allowance of new sessions for the pod `pod_uid`.
    #[cfg(test)]
    pub(crate) fn counts_allowance(&self, pod_uid: &str) -> bool {
        self.inner.budgets.lock().unwrap_or_else(|e| e.into_inner()).contains_key(pod_uid)
    }

    /// Starts background refreshes for sessions close to expiry that are still what their pod is
    /// `entitled` to now (its namespace still permits the role, say); drops those that are not.
    /// Returns how many refreshes it started.
    pub fn refresh_due(&self, entitled: impl Fn(&SessionKey) -> bool) -> usize {
        let now = (self.inner.clock)();
        let due = |entry: &Entry| {
            entry.current.as_ref().is_none_or(|c| remaining(c, now) < self.inner.config.refresh_remaining())
                && self.may_fetch(entry, now)
        };
        // Which sessions are due, shard by shard; then each asked about with no shard locked.
        let candidates: Vec<SessionKey> = self
            .inner
            .entries
            .each()
            .flat_map(|entries| {
                entries.iter().filter(|(_, e)| due(e)).map(|(k, _)| k.clone()).collect::<Vec<_>>()
            })
            .collect();
        let mut started = 0;
        for key in candidates {
            if !entitled(&key) {
                tracing::info!(role = %key.role_arn, session = %key.session_name, "session no longer permitted; dropped, not refreshed");
                self.drop_unentitled(&key);
                continue;
            }
            let mut entries = self.inner.entries.of(&key.pod_uid);
            if let Some(entry) = entries.get_mut(&key)
                && due(entry)
            {
                drop(self.start_fetch(entry, key, false, None));
                started += 1;
            }
        }
        started
    }

    /// Drops `key`, and forgets its pod's hold on it if it is still the pod's session.
    fn drop_unentitled(&self, key: &SessionKey) {
        {
            let mut owners = self.inner.owners.of(&key.pod_uid);
            if owners.get(&key.pod_uid) == Some(key) {
                owners.remove(&key.pod_uid);
            }
        }
        self.drop_session(key);
    }

    /// Every `every` until the process ends: drops what pods no longer `live` hold, then runs
    /// [`CredentialCache::refresh_due`] with `entitled`.
    pub fn spawn_refresher(
        &self,
        every: Duration,
        live: impl Fn(&str) -> bool + Send + 'static,
        entitled: impl Fn(&SessionKey) -> bool + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                cache.retain_pods(&live);
                cache.refresh_due(&entitled);
            }
        })
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.inner.sessions()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that `key.pod_uid` now holds `key`; the session it held before (another role,
    /// session name or ExternalId) is dropped.
    fn register(&self, key: &SessionKey) {
        let previous = {
            let mut owners = self.inner.owners.of(&key.pod_uid);
            if owners.get(&key.pod_uid) == Some(key) {
                // The usual case (every hit): nothing to copy or drop.
                return;
            }
            owners.insert(key.pod_uid.clone(), key.clone())
        };
        if let Some(previous) = previous.filter(|p| p != key) {
            self.drop_session(&previous);
        }
    }

    fn drop_session(&self, key: &SessionKey) {
        self.inner.entries.of(&key.pod_uid).remove(key);
        self.inner.metrics.cached_sessions.set(self.inner.sessions() as i64);
    }
}

fn remaining(issued: &Credentials, now: SystemTime) -> Duration {
    issued.expiration.duration_since(now).unwrap_or_default()
}

#[cfg(test)]
pub mod fixtures;
#[cfg(test)]
mod tests;
