//! The agent's credential cache: per pod, the credentials the server last gave, served until they
//! come within the server's refresh margin. Concurrent requests of one pod share one server call;
//! when the server cannot be reached, credentials that are still valid keep being served. A pod
//! that is deleted, starts terminating, or whose annotations change loses its entry at once, and
//! so does one the server revokes. An entry is bound to the pod UID and the source IP it was
//! fetched for: it is never served to another pod, nor to the same UID at another address.

use crate::metrics::Metrics;
use dashmap::DashMap;
use futures::future::BoxFuture;
use imdsgate_proto::Reason;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// Credentials for one pod, as the server issued them.
pub use imdsgate_proto::Credentials as Creds;

/// Credentials as cached: with their IMDS document rendered once, so serving a cache hit copies
/// bytes instead of formatting JSON and timestamps on every request.
pub struct CachedCreds {
    creds: Creds,
    document: bytes::Bytes,
    extended: std::sync::OnceLock<bytes::Bytes>,
}

impl CachedCreds {
    pub fn new(creds: Creds) -> CachedCreds {
        let document = crate::imds::credentials_json(&creds, false).into();
        CachedCreds { creds, document, extended: std::sync::OnceLock::new() }
    }

    /// The `security-credentials` document, or with `AccountId` for `-extended`.
    pub fn document(&self, extended: bool) -> bytes::Bytes {
        if extended {
            self.extended.get_or_init(|| crate::imds::credentials_json(&self.creds, true).into()).clone()
        } else {
            self.document.clone()
        }
    }
}

impl std::fmt::Debug for CachedCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.creds.fmt(f)
    }
}

impl std::ops::Deref for CachedCreds {
    type Target = Creds;
    fn deref(&self) -> &Creds {
        &self.creds
    }
}

/// Why the server gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error("{message}")]
    Refused { code: tonic::Code, reason: Option<Reason>, message: String },
    #[error("the imdsgate server cannot be reached: {0}")]
    Unreachable(String),
}

impl ServerError {
    /// Whether the failure is the server's absence rather than a decision.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ServerError::Unreachable(_))
            || matches!(self, ServerError::Refused { code: tonic::Code::Unavailable, .. })
    }
}

/// Where credentials come from: the server, or a fake in tests.
pub trait CredentialSource: Send + Sync + 'static {
    fn fetch(
        &self,
        pod_ip: IpAddr,
        pod_uid: &str,
        role: &str,
    ) -> BoxFuture<'static, Result<Creds, ServerError>>;
}

struct Slot {
    role: String,
    ip: IpAddr,
    current: RwLock<Option<Arc<CachedCreds>>>,
    fetching: tokio::sync::Mutex<()>,
}

/// See the module documentation.
pub struct CredentialCache {
    source: Arc<dyn CredentialSource>,
    slots: DashMap<String, Arc<Slot>>,
    metrics: Metrics,
    clock: fn() -> SystemTime,
}

impl CredentialCache {
    pub fn new(source: Arc<dyn CredentialSource>, metrics: Metrics) -> Self {
        CredentialCache { source, slots: DashMap::new(), metrics, clock: SystemTime::now }
    }

    /// Credentials of `role` for the pod `pod_uid` at `pod_ip`.
    pub async fn get(
        &self,
        pod_ip: IpAddr,
        pod_uid: &str,
        role: &str,
    ) -> Result<Arc<CachedCreds>, ServerError> {
        let slot = self.slot(pod_uid, pod_ip, role);
        if let Some(creds) = self.fresh(&slot) {
            self.metrics.cache_hits.inc();
            return Ok(creds);
        }
        let _turn = slot.fetching.lock().await;
        // Whoever fetched while this request waited may have filled the slot.
        if let Some(creds) = self.fresh(&slot) {
            self.metrics.cache_hits.inc();
            return Ok(creds);
        }
        self.metrics.cache_misses.inc();
        match self.source.fetch(pod_ip, pod_uid, role).await {
            Ok(creds) => {
                let creds = Arc::new(CachedCreds::new(creds));
                *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Some(creds.clone());
                Ok(creds)
            }
            Err(error) if error.is_unavailable() => {
                let still_valid = slot.current.read().unwrap_or_else(|e| e.into_inner()).clone();
                match still_valid.filter(|c| c.valid_at((self.clock)())) {
                    Some(creds) => {
                        tracing::warn!(%error, "server unavailable; serving cached credentials that are still valid");
                        Ok(creds)
                    }
                    None => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Drops what is cached for a pod (deleted, terminating, annotations changed, or revoked);
    /// returns whether there was anything.
    pub fn forget(&self, pod_uid: &str) -> bool {
        self.slots.remove(pod_uid).is_some()
    }

    /// The pods (UID) and role names that credentials are held for.
    pub fn held(&self) -> Vec<(String, String)> {
        self.slots.iter().map(|e| (e.key().clone(), e.value().role.clone())).collect()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn slot(&self, pod_uid: &str, ip: IpAddr, role: &str) -> Arc<Slot> {
        let matches = |s: &Slot| s.role == role && s.ip == ip;
        if let Some(slot) = self.slots.get(pod_uid).filter(|s| matches(s)) {
            return slot.clone();
        }
        let slot = Arc::new(Slot {
            role: role.to_string(),
            ip,
            current: RwLock::new(None),
            fetching: Default::default(),
        });
        self.slots
            .entry(pod_uid.to_string())
            .and_modify(|existing| {
                if !matches(existing) {
                    *existing = slot.clone();
                }
            })
            .or_insert(slot)
            .clone()
    }

    fn fresh(&self, slot: &Slot) -> Option<Arc<CachedCreds>> {
        let now = (self.clock)();
        slot.current.read().unwrap_or_else(|e| e.into_inner()).clone().filter(|c| c.fresh_at(now))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// A fake server: counts calls, answers with what it is told.
    pub struct FakeServer {
        pub calls: AtomicU32,
        /// The session lifetime of issued credentials, or the error to answer with.
        pub answer: Mutex<Result<Duration, ServerError>>,
        /// How long ago the issued credentials were minted (close to expiry when large).
        pub age: Mutex<Duration>,
        pub delay: Duration,
    }

    impl FakeServer {
        pub fn new(lifetime: Duration) -> Arc<FakeServer> {
            Arc::new(FakeServer {
                calls: AtomicU32::new(0),
                answer: Mutex::new(Ok(lifetime)),
                age: Mutex::new(Duration::ZERO),
                delay: Duration::from_millis(20),
            })
        }
    }

    impl CredentialSource for FakeServer {
        fn fetch(
            &self,
            _ip: IpAddr,
            uid: &str,
            role: &str,
        ) -> BoxFuture<'static, Result<Creds, ServerError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = self.answer.lock().unwrap().clone();
            let age = *self.age.lock().unwrap();
            let (uid, role, delay) = (uid.to_string(), role.to_string(), self.delay);
            async move {
                tokio::time::sleep(delay).await;
                let lifetime = answer?;
                let now = SystemTime::now() - age;
                Ok(Creds {
                    access_key_id: format!("ASIA{n}-{uid}"),
                    secret_access_key: "secret\"with/quote".into(),
                    session_token: "token".into(),
                    expiration: now + lifetime,
                    issued_at: now,
                    role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
                    account_id: "123456789012".into(),
                })
            }
            .boxed()
        }
    }

    fn ip() -> IpAddr {
        "10.0.0.1".parse().unwrap()
    }

    #[tokio::test]
    async fn concurrent_requests_of_a_pod_share_one_call() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = Arc::new(CredentialCache::new(server.clone(), Metrics::new()));
        let all: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(
                    async move { cache.get(ip(), "uid-a", "app").await.unwrap().access_key_id.clone() },
                )
            })
            .collect();
        let mut keys = Vec::new();
        for task in all {
            keys.push(task.await.unwrap());
        }
        keys.dedup();
        assert_eq!(keys.len(), 1);
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn credentials_near_expiry_are_fetched_again() {
        // One-hour sessions minted 50 minutes ago: 10 minutes left, under the 15-minute margin.
        let server = FakeServer::new(Duration::from_secs(3600));
        *server.age.lock().unwrap() = Duration::from_secs(3000);
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        cache.get(ip(), "uid-a", "app").await.unwrap();
        cache.get(ip(), "uid-a", "app").await.unwrap();
        assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn server_outage_serves_still_valid_credentials_but_not_refusals() {
        let server = FakeServer::new(Duration::from_secs(3600));
        *server.age.lock().unwrap() = Duration::from_secs(3000);
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        let first = cache.get(ip(), "uid-a", "app").await.unwrap();
        *server.answer.lock().unwrap() = Err(ServerError::Unreachable("connection refused".into()));
        assert_eq!(cache.get(ip(), "uid-a", "app").await.unwrap().access_key_id, first.access_key_id);
        let refused = ServerError::Refused {
            code: tonic::Code::PermissionDenied,
            reason: Some(Reason::NamespaceForbids),
            message: "no".into(),
        };
        *server.answer.lock().unwrap() = Err(refused.clone());
        assert_eq!(
            cache.get(ip(), "uid-a", "app").await.unwrap_err(),
            refused,
            "a refusal is never papered over"
        );
    }

    #[tokio::test]
    async fn a_role_change_or_forget_drops_the_entry() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        let a = cache.get(ip(), "uid-a", "app").await.unwrap();
        let b = cache.get(ip(), "uid-a", "other").await.unwrap();
        assert_ne!(a.access_key_id, b.access_key_id);
        assert!(b.role_arn.ends_with("/other"));
        assert_eq!(cache.held(), [("uid-a".to_string(), "other".to_string())]);
        assert!(cache.forget("uid-a"));
        assert!(cache.is_empty());
        cache.get(ip(), "uid-a", "other").await.unwrap();
        assert_eq!(server.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_entry_is_served_only_to_the_address_it_was_fetched_for() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        let first = cache.get(ip(), "uid-a", "app").await.unwrap();
        let elsewhere = cache.get("10.0.0.2".parse().unwrap(), "uid-a", "app").await.unwrap();
        assert_ne!(first.access_key_id, elsewhere.access_key_id, "another address asks the server again");
        assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    }
}
