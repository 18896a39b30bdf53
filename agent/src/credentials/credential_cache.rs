//! The agent's credential cache: per pod, the credentials the server last gave, served until they
//! come within the server's refresh margin. Concurrent requests of one pod share one server call;
//! when the server cannot be reached, credentials that are still valid keep being served. A pod
//! that is deleted, starts terminating, or whose annotations change loses its entry at once, and
//! so does one the server revokes. An entry is bound to the pod UID and the source IP it was
//! fetched for: it is never served to another pod, nor to the same UID at another address.
//!
//! A revocation from the server leaves a tombstone for [`TOMBSTONE`]: while it stands, the pod's
//! credentials are asked of every server replica and served only if all agree, so a replica whose
//! watch lags behind the one that revoked cannot hand the revoked credentials straight back.

use crate::credentials::server_client::ServerError;
use crate::imds::credential_document::credentials_json;
use crate::metrics::Metrics;
use dashmap::DashMap;
use futures::future::BoxFuture;
use imdsgate_proto::Credentials;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How long after a server revocation every replica must agree before a pod is served again: far
/// longer than a watch normally lags, short enough that a replica restored in the meantime is
/// trusted again.
pub const TOMBSTONE: Duration = Duration::from_secs(60);
/// Tombstones kept at most (older ones are swept first).
const MAX_TOMBSTONES: usize = 10_000;

/// Credentials as cached: with their IMDS document rendered once, so serving a cache hit copies
/// bytes instead of formatting JSON and timestamps on every request.
pub struct CachedCredentials {
    creds: Credentials,
    document: bytes::Bytes,
    extended: std::sync::OnceLock<bytes::Bytes>,
}

impl CachedCredentials {
    pub fn new(creds: Credentials) -> CachedCredentials {
        let document = credentials_json(&creds, false).into();
        CachedCredentials { creds, document, extended: std::sync::OnceLock::new() }
    }

    /// The `security-credentials` document, or with `AccountId` for `-extended`.
    pub fn document(&self, extended: bool) -> bytes::Bytes {
        if extended {
            self.extended.get_or_init(|| credentials_json(&self.creds, true).into()).clone()
        } else {
            self.document.clone()
        }
    }
}

impl std::fmt::Debug for CachedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.creds.fmt(f)
    }
}

impl std::ops::Deref for CachedCredentials {
    type Target = Credentials;
    fn deref(&self) -> &Credentials {
        &self.creds
    }
}

/// Whether an answer must come from one replica or from all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quorum {
    Any,
    /// Every replica that answers must grant, and one refusal refuses.
    All,
}

/// Where credentials come from: the server, or a fake in tests.
pub trait CredentialSource: Send + Sync + 'static {
    fn fetch(
        &self,
        pod_ip: IpAddr,
        pod_uid: &str,
        role: &str,
        quorum: Quorum,
    ) -> BoxFuture<'static, Result<Credentials, ServerError>>;
}

struct Slot {
    role: String,
    /// Every IP of the pod (a dual-stack pod asks from either).
    ips: Vec<IpAddr>,
    /// Set when the slot is dropped: a request that took it before then must not be answered
    /// from it.
    revoked: AtomicBool,
    current: RwLock<Option<Arc<CachedCredentials>>>,
    fetching: tokio::sync::Mutex<()>,
}

/// See the module documentation.
pub struct CredentialCache {
    source: Arc<dyn CredentialSource>,
    slots: DashMap<String, Arc<Slot>>,
    tombstones: DashMap<String, Instant>,
    metrics: Metrics,
    clock: fn() -> SystemTime,
}

impl CredentialCache {
    pub fn new(source: Arc<dyn CredentialSource>, metrics: Metrics) -> Self {
        CredentialCache {
            source,
            slots: DashMap::new(),
            tombstones: DashMap::new(),
            metrics,
            clock: SystemTime::now,
        }
    }

    /// Credentials of `role` for the pod `pod_uid` (whose IPs are `pod_ips`), asked from `peer`.
    pub async fn get(
        &self,
        peer: IpAddr,
        pod_uid: &str,
        pod_ips: &[IpAddr],
        role: &str,
    ) -> Result<Arc<CachedCredentials>, ServerError> {
        // A second round only when the first one's slot was revoked while it waited.
        let mut rounds = 0;
        loop {
            rounds += 1;
            let slot = self.slot(pod_uid, pod_ips, role);
            let answer = self.get_from(&slot, peer, pod_uid, role).await;
            if !slot.revoked.load(Ordering::Acquire) {
                return answer;
            }
            if rounds >= 2 {
                return Err(ServerError::Refused {
                    code: tonic::Code::Unavailable,
                    reason: None,
                    message: "the pod's credentials were revoked while this request waited; retry".into(),
                });
            }
        }
    }

    async fn get_from(
        &self,
        slot: &Slot,
        peer: IpAddr,
        pod_uid: &str,
        role: &str,
    ) -> Result<Arc<CachedCredentials>, ServerError> {
        if let Some(creds) = self.fresh(slot) {
            self.metrics.cache_hits.inc();
            return Ok(creds);
        }
        let _turn = slot.fetching.lock().await;
        // Whoever fetched while this request waited may have filled the slot.
        if let Some(creds) = self.fresh(slot) {
            self.metrics.cache_hits.inc();
            return Ok(creds);
        }
        self.metrics.cache_misses.inc();
        let quorum = if self.tombstoned(pod_uid) { Quorum::All } else { Quorum::Any };
        match self.source.fetch(peer, pod_uid, role, quorum).await {
            Ok(creds) => {
                let creds = Arc::new(CachedCredentials::new(creds));
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

    /// Drops what is cached for a pod (deleted, terminating, annotations changed); returns
    /// whether there was anything.
    pub fn forget(&self, pod_uid: &str) -> bool {
        match self.slots.remove(pod_uid) {
            Some((_, slot)) => {
                slot.revoked.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Drops what is cached for a pod because a server replica revoked it, and leaves a
    /// tombstone (see the module documentation).
    pub fn revoke(&self, pod_uid: &str) -> bool {
        if self.tombstones.len() >= MAX_TOMBSTONES {
            self.tombstones.retain(|_, at| at.elapsed() < TOMBSTONE);
        }
        self.tombstones.insert(pod_uid.to_string(), Instant::now());
        self.forget(pod_uid)
    }

    fn tombstoned(&self, pod_uid: &str) -> bool {
        let standing = self.tombstones.get(pod_uid).is_some_and(|at| at.elapsed() < TOMBSTONE);
        if !standing {
            self.tombstones.remove_if(pod_uid, |_, at| at.elapsed() >= TOMBSTONE);
        }
        standing
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

    fn slot(&self, pod_uid: &str, ips: &[IpAddr], role: &str) -> Arc<Slot> {
        let matches = |s: &Slot| s.role == role && s.ips == ips;
        if let Some(slot) = self.slots.get(pod_uid).filter(|s| matches(s)) {
            return slot.clone();
        }
        let slot = Arc::new(Slot {
            role: role.to_string(),
            ips: ips.to_vec(),
            revoked: AtomicBool::new(false),
            current: RwLock::new(None),
            fetching: Default::default(),
        });
        self.slots
            .entry(pod_uid.to_string())
            .and_modify(|existing| {
                if !matches(existing) {
                    existing.revoked.store(true, Ordering::Release);
                    *existing = slot.clone();
                }
            })
            .or_insert(slot)
            .clone()
    }

    fn fresh(&self, slot: &Slot) -> Option<Arc<CachedCredentials>> {
        let now = (self.clock)();
        slot.current.read().unwrap_or_else(|e| e.into_inner()).clone().filter(|c| c.fresh_at(now))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures::FutureExt;
    use imdsgate_proto::Reason;
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
        /// The quorum each call asked for.
        pub quorums: Mutex<Vec<Quorum>>,
    }

    impl FakeServer {
        pub fn new(lifetime: Duration) -> Arc<FakeServer> {
            Arc::new(FakeServer {
                calls: AtomicU32::new(0),
                answer: Mutex::new(Ok(lifetime)),
                age: Mutex::new(Duration::ZERO),
                delay: Duration::from_millis(20),
                quorums: Mutex::new(Vec::new()),
            })
        }
    }

    impl CredentialSource for FakeServer {
        fn fetch(
            &self,
            _ip: IpAddr,
            uid: &str,
            role: &str,
            quorum: Quorum,
        ) -> BoxFuture<'static, Result<Credentials, ServerError>> {
            self.quorums.lock().unwrap().push(quorum);
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = self.answer.lock().unwrap().clone();
            let age = *self.age.lock().unwrap();
            let (uid, role, delay) = (uid.to_string(), role.to_string(), self.delay);
            async move {
                tokio::time::sleep(delay).await;
                let lifetime = answer?;
                let now = SystemTime::now() - age;
                Ok(Credentials {
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
                tokio::spawn(async move {
                    cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap().access_key_id.clone()
                })
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
        cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap();
        cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap();
        assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn server_outage_serves_still_valid_credentials_but_not_refusals() {
        let server = FakeServer::new(Duration::from_secs(3600));
        *server.age.lock().unwrap() = Duration::from_secs(3000);
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        let first = cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap();
        *server.answer.lock().unwrap() = Err(ServerError::Unreachable("connection refused".into()));
        assert_eq!(
            cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap().access_key_id,
            first.access_key_id
        );
        let refused = ServerError::Refused {
            code: tonic::Code::PermissionDenied,
            reason: Some(Reason::NamespaceForbids),
            message: "no".into(),
        };
        *server.answer.lock().unwrap() = Err(refused.clone());
        assert_eq!(
            cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap_err(),
            refused,
            "a refusal is never papered over"
        );
    }

    #[tokio::test]
    async fn a_role_change_or_forget_drops_the_entry() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        let a = cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap();
        let b = cache.get(ip(), "uid-a", &[ip()], "other").await.unwrap();
        assert_ne!(a.access_key_id, b.access_key_id);
        assert!(b.role_arn.ends_with("/other"));
        assert_eq!(cache.held(), [("uid-a".to_string(), "other".to_string())]);
        assert!(cache.forget("uid-a"));
        assert!(cache.is_empty());
        cache.get(ip(), "uid-a", &[ip()], "other").await.unwrap();
        assert_eq!(server.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_entry_is_bound_to_the_pods_addresses() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let first = cache.get(ip(), "uid-a", &[ip(), v6], "app").await.unwrap();
        let same = cache.get(v6, "uid-a", &[ip(), v6], "app").await.unwrap();
        assert_eq!(first.access_key_id, same.access_key_id, "a dual-stack pod asks from either address");
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let elsewhere = cache.get(other, "uid-a", &[other], "app").await.unwrap();
        assert_ne!(first.access_key_id, elsewhere.access_key_id, "other addresses ask the server again");
        assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn after_a_server_revocation_every_replica_must_agree() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = CredentialCache::new(server.clone(), Metrics::new());
        cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap();
        assert!(cache.revoke("uid-a"));
        cache.get(ip(), "uid-a", &[ip()], "app").await.unwrap();
        cache.forget("uid-b"); // a local forget leaves no tombstone
        cache.get(ip(), "uid-b", &[ip()], "app").await.unwrap();
        assert_eq!(*server.quorums.lock().unwrap(), [Quorum::Any, Quorum::All, Quorum::Any]);
    }

    #[tokio::test]
    async fn a_request_waiting_on_a_revoked_entry_is_not_answered_from_it() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let cache = Arc::new(CredentialCache::new(server.clone(), Metrics::new()));
        let waiting = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(ip(), "uid-a", &[ip()], "app").await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await; // the fetch is on its way
        cache.revoke("uid-a");
        let answered = waiting.await.unwrap().unwrap();
        assert!(answered.access_key_id.starts_with("ASIA2"), "asked again after the revocation");
        assert_eq!(*server.quorums.lock().unwrap(), [Quorum::Any, Quorum::All]);
    }
}
