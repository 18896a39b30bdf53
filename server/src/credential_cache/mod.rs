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
//! first, and background calls (prefetches, refreshes) only use what is left ([`Urgency`]). Each
//! pod may start only a few new sessions in a row ([`SESSION_BURST`], then one per
//! [`SESSION_REFILL`]), so changing a pod's annotations in a loop cannot spend the budget.

use crate::authz::session::SessionKey;
use crate::metrics::Metrics;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Temporary credentials from STS (the type both sides of the contract share).
pub use imdsgate_proto::Credentials as Issued;

/// Why STS gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// STS could not be reached or failed (network, throttling, 5xx): retry later.
    #[error("STS unavailable: {0}")]
    Unavailable(String),
    /// STS refused (AccessDenied, bad trust policy, bad ExternalId).
    #[error("STS refused AssumeRole: {0}")]
    Denied(String),
    /// A background call gave way to calls pods are waiting on; nothing failed.
    #[error("STS call deferred: the STS budget is in use by requests pods are waiting on")]
    Deferred,
}

/// A pod may start this many new sessions at once (its first, and a few annotation changes)...
pub const SESSION_BURST: f64 = 4.0;
/// ...and then one more per this long.
pub const SESSION_REFILL: Duration = Duration::from_secs(5 * 60);

/// Whether a pod is waiting on an STS call. A background call becomes urgent the moment a
/// request joins it.
#[derive(Debug, Default)]
pub struct Urgency {
    urgent: std::sync::atomic::AtomicBool,
    raised: tokio::sync::Notify,
}

impl Urgency {
    pub fn new(urgent: bool) -> Arc<Urgency> {
        Arc::new(Urgency { urgent: urgent.into(), raised: tokio::sync::Notify::new() })
    }

    pub fn is_urgent(&self) -> bool {
        self.urgent.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn raise(&self) {
        if !self.urgent.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.raised.notify_waiters();
        }
    }

    /// Resolves once the call is urgent.
    pub async fn raised(&self) {
        loop {
            let notified = self.raised.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_urgent() {
                return;
            }
            notified.await;
        }
    }
}

/// Something that turns a session into credentials: STS itself, or a fake in tests.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role(
        &self,
        key: SessionKey,
        duration: Duration,
        urgency: Arc<Urgency>,
    ) -> BoxFuture<'static, Result<Issued, StsError>>;
}

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

/// Reads the wall clock; replaced in tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

type Fetch = Shared<BoxFuture<'static, Result<Arc<Issued>, StsError>>>;

#[derive(Default)]
struct Entry {
    current: Option<Arc<Issued>>,
    inflight: Option<(Fetch, Arc<Urgency>)>,
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
    /// Each live pod's allowance of new sessions: (tokens, when last counted).
    budgets: Mutex<HashMap<String, (f64, SystemTime)>>,
}

impl Inner {
    /// Sessions held, counted shard by shard (never call it holding a shard's lock).
    fn sessions(&self) -> usize {
        self.entries.each().map(|shard| shard.len()).sum()
    }
}

/// How many locks the cache's maps are split into.
const SHARDS: usize = 32;

/// A map split into independently locked shards by a pod's UID, so that concurrent requests for
/// different pods rarely wait on the same lock (every request takes one, hits included). A
/// caller holds at most one shard of a map at a time.
struct Shards<M> {
    shards: Vec<Mutex<M>>,
}

impl<M: Default> Shards<M> {
    fn new() -> Self {
        Shards { shards: (0..SHARDS).map(|_| Mutex::default()).collect() }
    }

    /// The shard holding `pod_uid`'s entries.
    fn of(&self, pod_uid: &str) -> MutexGuard<'_, M> {
        let mut hasher = std::hash::DefaultHasher::new();
        pod_uid.hash(&mut hasher);
        let shard = &self.shards[(hasher.finish() % self.shards.len() as u64) as usize];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard, one after the other.
    fn each(&self) -> impl Iterator<Item = MutexGuard<'_, M>> {
        self.shards.iter().map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()))
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
            }),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Credentials for `key`, on behalf of the pod `key.pod_uid`, which is waiting for them.
    pub async fn get(&self, key: &SessionKey) -> Result<(Arc<Issued>, Served), StsError> {
        self.get_with(key, true).await
    }

    async fn get_with(&self, key: &SessionKey, urgent: bool) -> Result<(Arc<Issued>, Served), StsError> {
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
                        drop(self.start_fetch(entry, key.clone(), false, false));
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
                        urgency.raise();
                    }
                    fetch.clone()
                }
                None => {
                    let new_session = entry.current.is_none();
                    if new_session && !self.take_session_budget(&key.pod_uid, now) {
                        entries.remove(key);
                        drop(entries);
                        return Err(if urgent {
                            StsError::Unavailable(format!(
                                "this pod started {SESSION_BURST} new sessions recently (annotation changes); the next is possible within {} s",
                                SESSION_REFILL.as_secs()
                            ))
                        } else {
                            StsError::Deferred
                        });
                    }
                    self.start_fetch(entry, key.clone(), urgent, new_session)
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

    /// Starts fetching credentials for a pod that just appeared, so its first request is a hit.
    /// A background call: it spends only STS budget that no waiting pod needs, and only the
    /// pod's own allowance of new sessions.
    pub fn prefetch(&self, key: SessionKey) {
        let cache = self.clone();
        tokio::spawn(async move {
            match cache.get_with(&key, false).await {
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

    /// Takes one new session from the pod's allowance, if it has one.
    fn take_session_budget(&self, pod_uid: &str, now: SystemTime) -> bool {
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

    /// Starts background refreshes for sessions close to expiry; returns how many it started.
    pub fn refresh_due(&self) -> usize {
        let now = (self.inner.clock)();
        let mut started = 0;
        for mut entries in self.inner.entries.each() {
            let keys: Vec<SessionKey> = entries.keys().cloned().collect();
            for key in keys {
                let Some(entry) = entries.get_mut(&key) else { continue };
                let due = entry
                    .current
                    .as_ref()
                    .is_none_or(|c| remaining(c, now) < self.inner.config.refresh_remaining());
                if due && self.may_fetch(entry, now) {
                    drop(self.start_fetch(entry, key, false, false));
                    started += 1;
                }
            }
        }
        started
    }

    /// Every `every` until the process ends: drops what pods no longer `live` hold, then runs
    /// [`CredentialCache::refresh_due`].
    pub fn spawn_refresher(
        &self,
        every: Duration,
        live: impl Fn(&str) -> bool + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                cache.retain_pods(&live);
                cache.refresh_due();
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

    fn fall_back(
        &self,
        fallback: Option<Arc<Issued>>,
        error: StsError,
    ) -> Result<(Arc<Issued>, Served), StsError> {
        match fallback {
            Some(issued) => {
                self.inner.metrics.cache_stale_served.inc();
                tracing::warn!(%error, "STS failed; serving cached credentials that are still valid");
                Ok((issued, Served::Stale))
            }
            None => Err(error),
        }
    }

    fn may_fetch(&self, entry: &Entry, now: SystemTime) -> bool {
        entry.inflight.is_none() && entry.retry_at.is_none_or(|at| now >= at)
    }

    /// Starts the STS call for `key`; `charged`: it took one of the pod's new sessions, given back
    /// if the call gives way.
    fn start_fetch(&self, entry: &mut Entry, key: SessionKey, urgent: bool, charged: bool) -> Fetch {
        let inner = self.inner.clone();
        let duration = inner.config.session_duration;
        let urgency = Urgency::new(urgent);
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

fn remaining(issued: &Issued, now: SystemTime) -> Duration {
    issued.expiration.duration_since(now).unwrap_or_default()
}

/// Exponential backoff with full jitter in [base/2, cap].
fn backoff(config: &CacheConfig, failures: u32) -> Duration {
    let exp = config.backoff_base.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let cap = exp.min(config.backoff_max);
    let half = cap / 2;
    half + cap.saturating_sub(half).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::role::resolve;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use tokio::sync::Semaphore;

    /// A fake STS: counts calls, can be made to fail, can be held at a gate.
    struct FakeSts {
        calls: AtomicU32,
        fail: Mutex<Option<StsError>>,
        gate: Arc<Semaphore>,
        clock: Clock,
        urgencies: Mutex<Vec<Arc<Urgency>>>,
    }

    impl AssumeRole for FakeSts {
        fn assume_role(
            &self,
            key: SessionKey,
            duration: Duration,
            urgency: Arc<Urgency>,
        ) -> BoxFuture<'static, Result<Issued, StsError>> {
            self.urgencies.lock().unwrap().push(urgency);
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let fail = self.fail.lock().unwrap().clone();
            let gate = self.gate.clone();
            let now = (self.clock)();
            async move {
                let _permit = gate.acquire().await.unwrap();
                if let Some(e) = fail {
                    return Err(e);
                }
                Ok(Issued {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    expiration: now + duration,
                    issued_at: now,
                    role_arn: key.role_arn.to_string(),
                    account_id: key.role_arn.account().into(),
                })
            }
            .boxed()
        }
    }

    struct Bed {
        cache: CredentialCache,
        sts: Arc<FakeSts>,
        now: Arc<AtomicU64>,
    }

    const START: u64 = 1_800_000_000;

    fn bed() -> Bed {
        let now = Arc::new(AtomicU64::new(START));
        let clock_now = now.clone();
        let clock: Clock =
            Arc::new(move || SystemTime::UNIX_EPOCH + Duration::from_secs(clock_now.load(Ordering::SeqCst)));
        let sts = Arc::new(FakeSts {
            calls: AtomicU32::new(0),
            fail: Mutex::new(None),
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            clock: clock.clone(),
            urgencies: Mutex::new(Vec::new()),
        });
        let cache = CredentialCache::with_clock(
            sts.clone(),
            CacheConfig::new(Duration::from_secs(3600)),
            Metrics::new(),
            clock,
        );
        Bed { cache, sts, now }
    }

    impl Bed {
        fn advance(&self, secs: u64) {
            self.now.fetch_add(secs, Ordering::SeqCst);
        }
        fn calls(&self) -> u32 {
            self.sts.calls.load(Ordering::SeqCst)
        }
        fn fail_with(&self, e: Option<StsError>) {
            *self.sts.fail.lock().unwrap() = e;
        }
    }

    fn key(pod_uid: &str, name: &str) -> SessionKey {
        SessionKey {
            pod_uid: pod_uid.into(),
            role_arn: resolve(&format!("arn:aws:iam::123456789012:role/{name}"), None).unwrap(),
            session_name: format!("ns.{name}"),
            external_id: None,
            tags: vec![],
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn timing_follows_the_session_duration() {
        let hour = CacheConfig::new(Duration::from_secs(3600));
        assert_eq!(hour.min_remaining(), Duration::from_secs(900));
        assert_eq!(hour.refresh_remaining(), Duration::from_secs(1200));
        let short = CacheConfig::new(Duration::from_secs(900));
        assert_eq!(short.min_remaining(), Duration::from_secs(225));
        assert!(short.refresh_remaining() < Duration::from_secs(900));
    }

    #[tokio::test]
    async fn one_sts_call_per_session_then_hits() {
        let b = bed();
        let (first, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Miss);
        for _ in 0..100 {
            let (again, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
            assert_eq!(served, Served::Hit);
            assert_eq!(again.access_key_id, first.access_key_id);
        }
        assert_eq!(b.calls(), 1);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_call() {
        let b = bed();
        let gate = b.sts.gate.clone();
        let permits = gate.available_permits();
        gate.forget_permits(permits);
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let cache = b.cache.clone();
                tokio::spawn(async move { cache.get(&key("pod-1", "app")).await })
            })
            .collect();
        settle().await;
        gate.add_permits(1);
        for w in waiters {
            assert!(w.await.unwrap().is_ok());
        }
        assert_eq!(b.calls(), 1);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_cancel_the_fetch() {
        let b = bed();
        let gate = b.sts.gate.clone();
        gate.forget_permits(gate.available_permits());
        let cache = b.cache.clone();
        let impatient = tokio::spawn(async move { cache.get(&key("pod-1", "app")).await });
        settle().await;
        impatient.abort();
        settle().await;
        gate.add_permits(1);
        settle().await;
        let (_, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Hit, "the abandoned fetch completed and filled the cache");
        assert_eq!(b.calls(), 1);
    }

    #[tokio::test]
    async fn refreshes_ahead_of_expiry_in_the_background() {
        let b = bed();
        let (first, _) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        b.advance(30 * 60);
        assert_eq!(b.cache.refresh_due(), 0, "30 minutes left: not due");
        b.advance(11 * 60);
        assert_eq!(b.cache.refresh_due(), 1, "19 minutes left: due");
        settle().await;
        let (second, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Hit);
        assert_ne!(second.access_key_id, first.access_key_id);
        assert_eq!(b.calls(), 2);
    }

    #[tokio::test]
    async fn never_hands_out_credentials_with_less_than_the_minimum_left() {
        let b = bed();
        let (first, _) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        b.advance(50 * 60); // 10 minutes left, no refresher ran
        let (second, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Miss);
        assert_ne!(second.access_key_id, first.access_key_id);
        assert!(second.expiration.duration_since(first.expiration).unwrap() >= Duration::from_secs(50 * 60));
    }

    #[tokio::test]
    async fn sts_outage_serves_still_valid_credentials() {
        let b = bed();
        let (first, _) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        b.fail_with(Some(StsError::Unavailable("connection refused".into())));
        b.advance(50 * 60);
        let (served_creds, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Stale);
        assert_eq!(served_creds.access_key_id, first.access_key_id);
        b.advance(11 * 60); // expired now
        let err = b.cache.get(&key("pod-1", "app")).await.unwrap_err();
        assert!(matches!(err, StsError::Unavailable(_)));
    }

    #[tokio::test]
    async fn failures_back_off_instead_of_calling_sts_per_request() {
        let b = bed();
        b.fail_with(Some(StsError::Denied("AccessDenied".into())));
        assert!(b.cache.get(&key("pod-1", "app")).await.is_err());
        for _ in 0..50 {
            let err = b.cache.get(&key("pod-1", "app")).await.unwrap_err();
            assert_eq!(err, StsError::Denied("AccessDenied".into()), "the last error is repeated");
        }
        assert_eq!(b.calls(), 1, "no STS call while backing off");
        b.fail_with(None);
        b.advance(2);
        assert!(b.cache.get(&key("pod-1", "app")).await.is_ok());
        assert_eq!(b.calls(), 2);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let c = CacheConfig::new(Duration::from_secs(3600));
        for failures in 1..40 {
            let d = backoff(&c, failures);
            let cap = c.backoff_base.saturating_mul(1 << (failures - 1).min(16)).min(c.backoff_max);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} not in [{:?}, {cap:?}]", cap / 2);
        }
    }

    #[tokio::test]
    async fn released_pods_drop_their_sessions() {
        let b = bed();
        b.cache.get(&key("pod-1", "app")).await.unwrap();
        b.cache.get(&key("pod-2", "other")).await.unwrap();
        assert_eq!(b.cache.len(), 2);
        b.cache.release("pod-1");
        assert_eq!(b.cache.len(), 1);
        // A pod whose role changes leaves its old session behind.
        b.cache.get(&key("pod-2", "third")).await.unwrap();
        assert_eq!(b.cache.len(), 1);
    }

    #[tokio::test]
    async fn two_pods_with_equal_sessions_get_different_credentials() {
        let b = bed();
        // Same role and session name (an override naming another pod's session): two pods.
        let (victim, _) = b.cache.get(&key("victim", "app")).await.unwrap();
        let (attacker, served) = b.cache.get(&key("attacker", "app")).await.unwrap();
        assert_eq!(served, Served::Miss, "the attacker's request is no hit on the victim's session");
        assert_ne!(attacker.access_key_id, victim.access_key_id);
        assert_eq!(b.calls(), 2);
    }

    fn renamed(pod_uid: &str, n: usize) -> SessionKey {
        let mut k = key(pod_uid, "app");
        k.session_name = format!("ns@name-{n}");
        k
    }

    #[tokio::test]
    async fn annotation_changes_in_a_loop_cannot_spend_the_sts_budget() {
        let b = bed();
        // The pod's session-name annotation changes 50 times; each change prefetches.
        for n in 0..50 {
            b.cache.prefetch(renamed("pod-1", n));
            settle().await;
        }
        assert_eq!(b.calls(), SESSION_BURST as u32, "only the pod's allowance of new sessions");
        // Asking while the allowance is spent: refused with a reason, no STS call.
        let error = b.cache.get(&renamed("pod-1", 99)).await.unwrap_err();
        assert!(error.to_string().contains("new sessions recently"), "{error}");
        assert_eq!(b.calls(), SESSION_BURST as u32);
        // Other pods are untouched, and the allowance refills with time.
        b.cache.get(&key("pod-2", "app")).await.unwrap();
        b.advance(SESSION_REFILL.as_secs());
        b.cache.get(&renamed("pod-1", 100)).await.unwrap();
        assert_eq!(b.calls(), SESSION_BURST as u32 + 2);
        // A refresh of a session the pod already holds never counts against it.
        b.advance(41 * 60);
        assert_eq!(b.cache.refresh_due(), 2);
        settle().await;
        assert_eq!(b.calls(), SESSION_BURST as u32 + 4);
    }

    #[tokio::test]
    async fn a_request_joining_a_background_call_makes_it_urgent() {
        let b = bed();
        let gate = b.sts.gate.clone();
        gate.forget_permits(gate.available_permits());
        b.cache.prefetch(key("pod-1", "app"));
        settle().await;
        let background = b.sts.urgencies.lock().unwrap()[0].clone();
        assert!(!background.is_urgent(), "a prefetch is background work");
        let cache = b.cache.clone();
        let waiting = tokio::spawn(async move { cache.get(&key("pod-1", "app")).await });
        settle().await;
        assert!(background.is_urgent(), "a pod now waits on it");
        gate.add_permits(1);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(b.calls(), 1);
    }

    #[tokio::test]
    async fn sessions_of_pods_that_are_gone_are_dropped_not_refreshed() {
        let b = bed();
        b.cache.get(&key("live", "app")).await.unwrap();
        b.cache.get(&key("gone", "app")).await.unwrap(); // raced its pod's deletion
        assert_eq!(b.cache.retain_pods(|uid| uid == "live"), 1);
        assert!(!b.cache.holds("gone") && b.cache.holds("live"));
        b.advance(41 * 60);
        assert_eq!(b.cache.refresh_due(), 1, "only the live pod's session is refreshed");
    }

    #[tokio::test]
    async fn a_deferred_background_call_gives_the_pods_allowance_back() {
        let b = bed();
        b.fail_with(Some(StsError::Deferred));
        for n in 0..10 {
            b.cache.prefetch(renamed("pod-1", n));
            settle().await;
        }
        b.fail_with(None);
        for n in 10..14 {
            b.cache.get(&renamed("pod-1", n)).await.expect("deferrals cost the pod nothing");
        }
    }

    #[tokio::test]
    async fn a_deferred_background_call_is_no_failure() {
        let b = bed();
        b.fail_with(Some(StsError::Deferred));
        b.cache.prefetch(key("pod-1", "app"));
        settle().await;
        b.fail_with(None);
        let (_, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Miss, "no backing off after a deferral");
    }

    #[tokio::test]
    async fn prefetch_makes_the_first_request_a_hit() {
        let b = bed();
        b.cache.prefetch(key("pod-1", "app"));
        settle().await;
        let (_, served) = b.cache.get(&key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Hit);
        assert_eq!(b.calls(), 1);
    }
}
