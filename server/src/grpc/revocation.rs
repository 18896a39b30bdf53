//! Revocations: the moment a pod stops being entitled to what agents may hold for it — it is
//! deleted or terminating, its role, session-name or external-id annotation changes, or its
//! namespace stops permitting its role — the server drops its session and tells the agent of the
//! pod's node, over the `WatchRevocations` stream, to drop its cached credentials. Agents never
//! ask per request; the stream carries only changes.
//!
//! What one agent identity can hold here is bounded: a subscription lists at most [`MAX_HELD`]
//! entries, each a Kubernetes UID and an IAM role name ([`validate_held`]); its first revocations
//! are judged one at a time as the stream is read, never materialised; and one agent node holds at
//! most [`STREAMS_PER_AGENT`] streams on this replica: a newer one replaces the oldest, which ends
//! with ABORTED ([`REPLACED`]).

use crate::authz::authorizer::{Ask, Authorizer, Denial};
use crate::credential_cache::CredentialCache;
use futures::{Stream, StreamExt};
use imdsgate_core::latch::Latch;
use imdsgate_core::{PodIndex, PodInfo};
use imdsgate_proto::Reason;
use imdsgate_proto::v1::{HeldCredentials, Revocation};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Revocations buffered per stream before a slow agent is cut off (it resubscribes and resends
/// what it holds, so nothing is lost).
const BUFFER: usize = 4096;

/// Revocations queued for one stream's response at most; the stream waits while they are.
const QUEUE: usize = 16;

/// Most held entries one subscription may list. An agent holds credentials only for pods of its
/// own node, and a Kubernetes node runs at most a few hundred pods (the kubelet's `--max-pods` is
/// 110 by default, Kubernetes' large-cluster guidance is at most 110 per node, and EKS lists at
/// most 737 for its largest instance types). 1,024 leaves room for a node's churn while one
/// stream's entries stay under about 140 KiB.
pub const MAX_HELD: usize = 1024;

/// Revocation streams one agent node (or, for an unbound agent, one source address) may hold open
/// on one replica at once. Its agent keeps one; a second covers the overlap of a DaemonSet surge
/// update or a reconnect before the server has noticed the old connection is gone. A newer stream
/// replaces the oldest.
pub const STREAMS_PER_AGENT: usize = 2;

/// The status that ends a stream replaced by a newer one of the same agent node.
pub const REPLACED: &str = "replaced by a newer revocation stream of this agent node on this replica";

/// Checks a subscription's held entries: at most [`MAX_HELD`], each a Kubernetes UID and an IAM
/// role name (the rules a `GetCredentials` request's fields follow).
pub fn validate_held(held: &[HeldCredentials]) -> Result<(), Denial> {
    if held.len() > MAX_HELD {
        return Err(Denial::InvalidArgument(format!(
            "{} held entries; at most {MAX_HELD} (a node's pods)",
            held.len()
        )));
    }
    for h in held {
        // The same rules as a request's UID and role.
        Ask::check_pod_and_role(&h.pod_uid, &h.role)?;
    }
    Ok(())
}

/// Who opened a stream: its agent's node, and the connection's source address (which tells
/// unbound agents apart).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscriber {
    pub node: Option<String>,
    pub peer: Option<IpAddr>,
}

/// What [`STREAMS_PER_AGENT`] counts by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Node(String),
    Unbound(Option<IpAddr>),
}

impl Subscriber {
    fn owner(&self) -> Owner {
        match &self.node {
            Some(node) => Owner::Node(node.clone()),
            None => Owner::Unbound(self.peer),
        }
    }
}

/// The open streams of each owner, oldest first, each with the latch that replaces it. Only owners
/// with an open stream have an entry.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<Owner, VecDeque<(u64, Latch)>>>,
}

/// One open stream's place in the [`Registry`], given back when the stream is dropped.
struct Registration {
    registry: Arc<Registry>,
    owner: Owner,
    id: u64,
}

impl Registry {
    /// Registers a new stream of `owner`, replacing its oldest one if it has its share already;
    /// the new stream's latch is set when it is replaced in turn.
    fn register(self: &Arc<Self>, owner: Owner) -> (Registration, Latch) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let replaced = Latch::default();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let streams = open.entry(owner.clone()).or_default();
        while streams.len() >= STREAMS_PER_AGENT {
            if let Some((_, oldest)) = streams.pop_front() {
                oldest.set();
            }
        }
        streams.push_back((id, replaced.clone()));
        (Registration { registry: self.clone(), owner, id }, replaced)
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.lock().unwrap().values().map(VecDeque::len).sum()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.registry.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(streams) = open.get_mut(&self.owner) {
            streams.retain(|(id, _)| *id != self.id);
            if streams.is_empty() {
                open.remove(&self.owner);
            }
        }
    }
}

/// One pod's credentials withdrawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub pod_uid: String,
    /// The pod's node: only that node's agent is told.
    pub node: Option<String>,
    pub reason: Reason,
}

impl From<&Revoked> for Revocation {
    fn from(r: &Revoked) -> Revocation {
        Revocation { pod_uid: r.pod_uid.clone(), reason: r.reason.as_str().to_string() }
    }
}

/// A stream of revocations for one agent.
pub type RevocationStream = Pin<Box<dyn Stream<Item = Result<Revocation, tonic::Status>> + Send>>;

/// Decides and publishes revocations. Cheap to clone.
#[derive(Clone)]
pub struct Revocations {
    tx: broadcast::Sender<Arc<Revoked>>,
    pods: Arc<PodIndex>,
    authorizer: Arc<Authorizer>,
    cache: CredentialCache,
    metrics: crate::metrics::Metrics,
    /// Ends every stream when the server shuts down (they would hold the drain open).
    closed: Latch,
    /// The open streams of each agent node.
    streams: Arc<Registry>,
}

impl Revocations {
    pub fn new(
        authorizer: Arc<Authorizer>,
        cache: CredentialCache,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        Revocations {
            tx,
            pods: authorizer.pods.clone(),
            authorizer,
            cache,
            metrics,
            closed: Latch::default(),
            streams: Arc::default(),
        }
    }

    /// Ends every open stream (at shutdown: agents reconnect to another replica).
    pub fn close(&self) {
        self.closed.set();
    }

    /// Withdraws whatever `pod` holds: its server-side session, and its credentials on its agent.
    pub fn revoke(&self, pod: &PodInfo, reason: Reason) {
        self.cache.release(&pod.uid);
        self.metrics
            .revocations
            .get_or_create(&crate::metrics::ReasonLabels { reason: reason.as_str().into() })
            .inc();
        tracing::info!(namespace = %pod.namespace, pod = %pod.name, reason = reason.as_str(), "credentials revoked");
        // No subscriber (no agent connected) is fine: agents resend what they hold on connect.
        let _ = self.tx.send(Arc::new(Revoked { pod_uid: pod.uid.clone(), node: pod.node.clone(), reason }));
    }

    /// Re-checks every pod with a role in `namespaces` (whose policy just changed) and revokes
    /// those no longer permitted.
    pub fn recheck_namespaces(&self, namespaces: &[String]) {
        if namespaces.is_empty() {
            return;
        }
        let namespaces: HashSet<&str> = namespaces.iter().map(String::as_str).collect();
        for pod in self.pods.pods() {
            // A base ARN not yet detected decides nothing: what agents hold (from another
            // replica, say) stays until this server can tell.
            if pod.role.is_some()
                && namespaces.contains(pod.namespace.as_str())
                && let Err(denial) = self.authorizer.session_for(&pod)
                && !matches!(denial, Denial::BaseArnUnknown(_))
            {
                self.revoke(&pod, denial.reason());
            }
        }
    }

    /// Why an agent on `node` (None: an unbound agent) must drop what it holds for `held`, if it must.
    pub fn check_held(&self, held: &HeldCredentials, node: Option<&str>) -> Option<Reason> {
        let Some(pod) = self.pods.by_uid(&held.pod_uid) else { return Some(Reason::PodNotFound) };
        if node.is_some_and(|node| pod.node.as_deref() != Some(node)) {
            return Some(Reason::WrongNode);
        }
        match self.authorizer.session_for(&pod) {
            // Undecided, not refused: another replica may well have issued them rightly.
            Err(Denial::BaseArnUnknown(_)) => None,
            Err(denial) => Some(denial.reason()),
            Ok(key) if key.role_arn.name() != held.role => Some(Reason::RoleMismatch),
            Ok(_) => None,
        }
    }

    /// The stream for `subscriber`, whose agent holds `held` (checked by [`validate_held`]): first
    /// what it holds and may no longer, judged one entry at a time as the stream is read, then
    /// every later revocation for its node. A stream that falls behind ends with UNAVAILABLE, and
    /// the agent resubscribes; one replaced by a newer stream of its node ends with ABORTED.
    pub fn stream(&self, held: Vec<HeldCredentials>, subscriber: Subscriber) -> RevocationStream {
        let (registration, replaced) = self.streams.register(subscriber.owner());
        let node = subscriber.node;
        // Subscribe before checking, so nothing that happens in between is missed.
        let rx = self.tx.subscribe();
        let initial = {
            let (this, node) = (self.clone(), node.clone());
            futures::stream::iter(held).filter_map(move |h| {
                let reason = this.check_held(&h, node.as_deref());
                futures::future::ready(
                    reason
                        .map(|reason| Ok(Revocation { pod_uid: h.pod_uid, reason: reason.as_str().into() })),
                )
            })
        };
        let later = futures::stream::unfold(Some(rx), move |rx| {
            let node = node.clone();
            async move {
                let mut rx = rx?;
                loop {
                    match rx.recv().await {
                        Ok(revoked) => {
                            if node.is_none() || revoked.node == node {
                                return Some((Ok(Revocation::from(&*revoked)), Some(rx)));
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let status = tonic::Status::unavailable(format!(
                                "revocation stream fell behind by {missed}; resubscribe with what you hold"
                            ));
                            return Some((Err(status), None));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        // The stream runs in its own task and hands the response a few revocations at a time: a
        // replaced stream, or one at shutdown, gives back its subscription, its held entries and
        // its place at once, even if its agent never reads what is queued for it.
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let closed = self.closed.clone();
        let gauge = self.metrics.revocation_streams.clone();
        gauge.inc();
        tokio::spawn(async move {
            let _registered = registration;
            let mut revocations = std::pin::pin!(initial.chain(later));
            loop {
                tokio::select! {
                    biased;
                    _ = closed.wait() => break,
                    _ = replaced.wait() => {
                        let _ = tx.try_send(Err(tonic::Status::aborted(REPLACED)));
                        break;
                    }
                    // The agent went away.
                    _ = tx.closed() => break,
                    sent = async {
                        // Two slots, one used: a slot is always left for the status that ends a
                        // replaced stream.
                        let mut slots = tx.reserve_many(2).await.ok()?;
                        let item = revocations.next().await?;
                        slots.next()?.send(item);
                        Some(())
                    } => if sent.is_none() {
                        break;
                    },
                }
            }
            gauge.dec();
        });
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::fixtures::{authorizer, mk_ns, mk_pod};
    use crate::credential_cache::CacheConfig;
    use crate::credential_cache::fixtures::FakeSts;
    use std::time::Duration;

    fn revocations() -> Revocations {
        let metrics = crate::metrics::Metrics::new();
        let cache = CredentialCache::new(
            Arc::new(FakeSts::default()),
            CacheConfig::new(Duration::from_secs(3600)),
            metrics.clone(),
        );
        Revocations::new(Arc::new(authorizer()), cache, metrics)
    }

    fn held(uid: &str, role: &str) -> HeldCredentials {
        HeldCredentials { pod_uid: uid.into(), role: role.into() }
    }

    fn on(node: &str) -> Subscriber {
        Subscriber { node: Some(node.into()), peer: None }
    }

    async fn next(stream: &mut RevocationStream) -> Option<Revocation> {
        tokio::time::timeout(Duration::from_millis(200), stream.next())
            .await
            .ok()
            .flatten()
            .map(|r| r.unwrap())
    }

    #[tokio::test]
    async fn a_narrowed_namespace_revokes_its_pods_and_tells_only_their_nodes() {
        let r = revocations();
        let app = r.pods.by_uid("u-app").unwrap();
        r.cache.get(&app.namespace, &r.authorizer.session_for(&app).unwrap()).await.unwrap();
        assert!(r.cache.holds("u-app"));
        let mut node_a = r.stream(vec![], on("node-a"));
        let mut node_b = r.stream(vec![], on("node-b"));
        let changed = r.authorizer.namespaces.apply(&mk_ns("team", "arn:aws:iam::123456789012:role/other"));
        r.recheck_namespaces(&changed.into_iter().collect::<Vec<_>>());
        let got = next(&mut node_a).await.expect("node-a's agent is told");
        assert_eq!((got.pod_uid.as_str(), got.reason.as_str()), ("u-app", "NAMESPACE_FORBIDS"));
        assert!(
            next(&mut node_a).await.is_none(),
            "u-evil (another namespace) and u-b (node-b) are not node-a's news"
        );
        assert_eq!(next(&mut node_b).await.expect("node-b's agent is told").pod_uid, "u-b");
        assert!(!r.cache.holds("u-app"), "the server's own session is gone too");
    }

    #[tokio::test]
    async fn a_subscription_first_revokes_what_the_agent_holds_and_may_no_longer() {
        let r = revocations();
        let held = [
            held("u-app", "app"),    // still fine
            held("u-gone", "app"),   // deleted while the agent was disconnected
            held("u-app", "admin"),  // not (or no longer) the pod's role
            held("u-evil", "admin"), // its namespace does not permit it
            held("u-b", "app"),      // on node-b, not the caller's node
        ];
        let mut stream = r.stream(held.to_vec(), on("node-a"));
        let mut got = Vec::new();
        while let Some(rev) = next(&mut stream).await {
            got.push(format!("{}:{}", rev.pod_uid, rev.reason));
        }
        assert_eq!(
            got,
            ["u-gone:POD_NOT_FOUND", "u-app:ROLE_MISMATCH", "u-evil:NAMESPACE_FORBIDS", "u-b:WRONG_NODE"]
        );
    }

    #[tokio::test]
    async fn a_base_arn_not_yet_detected_revokes_nothing() {
        let mut a = authorizer();
        a.base_arn = crate::authz::role_base::RoleBase::detecting();
        let metrics = crate::metrics::Metrics::new();
        let cache = CredentialCache::new(
            Arc::new(FakeSts::default()),
            CacheConfig::new(Duration::from_secs(3600)),
            metrics.clone(),
        );
        let r = Revocations::new(Arc::new(a), cache, metrics);
        // What an agent holds from a replica that knows the base stays until this one can judge.
        let mut stream = r.stream(vec![held("u-app", "app")], on("node-a"));
        let changed = r.authorizer.namespaces.apply(&mk_ns("team", "arn:aws:iam::123456789012:role/.*"));
        r.recheck_namespaces(&changed.into_iter().collect::<Vec<_>>());
        assert!(next(&mut stream).await.is_none());
    }

    #[tokio::test]
    async fn an_unbound_agent_hears_every_node_and_a_lagging_stream_is_cut_off() {
        let r = revocations();
        let mut all = r.stream(vec![], Subscriber::default());
        let pod = r.pods.by_uid("u-b").unwrap();
        r.revoke(&pod, Reason::PodNotFound);
        assert_eq!(next(&mut all).await.unwrap().pod_uid, "u-b");
        for _ in 0..BUFFER + 10 {
            r.revoke(&pod, Reason::PodNotFound);
        }
        let ended = ending(&mut all).await.expect("ends");
        assert_eq!(ended.code(), tonic::Code::Unavailable);
        assert!(all.next().await.is_none(), "the stream ends; the agent resubscribes");
    }

    #[tokio::test]
    async fn shutdown_ends_every_stream() {
        let r = revocations();
        let mut open = r.stream(vec![], on("node-a"));
        r.close();
        let ended = tokio::time::timeout(Duration::from_secs(1), open.next()).await.expect("ends at once");
        assert!(ended.is_none());
        assert!(
            r.stream(vec![], Subscriber::default()).next().await.is_none(),
            "and new ones end at once too"
        );
    }

    /// The status a stream ends with, skipping the revocations before it; None if it stays open.
    async fn ending(stream: &mut RevocationStream) -> Option<tonic::Status> {
        loop {
            match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(status))) => return Some(status),
                Ok(None) => return Some(tonic::Status::ok("ended without a status")),
                Err(_) => return None,
            }
        }
    }

    #[tokio::test]
    async fn a_node_holds_two_streams_and_a_third_replaces_the_oldest() {
        let r = revocations();
        let mut first = r.stream(vec![], on("node-a"));
        let mut second = r.stream(vec![], on("node-a"));
        let mut other_node = r.stream(vec![], on("node-b"));
        let peer = |last: u8| Subscriber { node: None, peer: Some(IpAddr::from([10, 9, 0, last])) };
        let mut unbound = r.stream(vec![], peer(1));
        let _unbound_elsewhere = [r.stream(vec![], peer(2)), r.stream(vec![], peer(3))];
        assert!(ending(&mut first).await.is_none(), "two streams of a node stay open");
        let mut third = r.stream(vec![held("u-gone", "app")], on("node-a"));
        let status = ending(&mut first).await.expect("the oldest ends");
        assert_eq!((status.code(), status.message()), (tonic::Code::Aborted, REPLACED));
        assert!(first.next().await.is_none(), "and nothing follows");
        assert_eq!(next(&mut third).await.unwrap().pod_uid, "u-gone", "the newest is served");
        for (name, open) in
            [("second", &mut second), ("node-b's", &mut other_node), ("unbound", &mut unbound)]
        {
            assert!(ending(open).await.is_none(), "the {name} stream stays open");
        }
        assert_eq!(r.streams.open(), 6);
        drop((first, second, third, other_node, unbound, _unbound_elsewhere));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.streams.open(), 0, "a dropped stream gives its place back");
    }

    #[tokio::test]
    async fn a_flood_of_streams_of_one_node_keeps_two() {
        let r = revocations();
        let held: Vec<_> = (0..MAX_HELD).map(|i| held(&format!("u-{i:060}"), "app")).collect();
        let mut streams: Vec<_> = (0..500).map(|_| r.stream(held.clone(), on("node-a"))).collect();
        assert_eq!(r.streams.open(), STREAMS_PER_AGENT);
        // Unread, the replaced ones give back their subscriptions and held entries at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.metrics.revocation_streams.get(), STREAMS_PER_AGENT as i64);
        let mut replaced = 0;
        for stream in &mut streams[..498] {
            if ending(stream).await.is_some_and(|s| s.code() == tonic::Code::Aborted) {
                replaced += 1;
            }
        }
        assert_eq!(replaced, 498);
        drop(streams);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.metrics.revocation_streams.get(), 0, "a dropped stream's task ends");
    }

    #[tokio::test]
    async fn held_entries_are_judged_as_the_stream_is_read() {
        let r = revocations();
        let mut stream = r.stream(vec![held("u-app", "app"), held("u-none", "app")], on("node-a"));
        // Both are fine when subscribing; u-app goes before the stream is read (without a
        // revocation being published: only the late judgement can tell).
        r.pods.delete(&mk_pod("u-app", "team", "app", "node-a", "10.0.0.1", Some("app")));
        let got = next(&mut stream).await.expect("judged when read");
        assert_eq!((got.pod_uid.as_str(), got.reason.as_str()), ("u-app", "POD_NOT_FOUND"));
        assert_eq!(next(&mut stream).await.unwrap().pod_uid, "u-none", "u-none has no role: NO_ROLE");
    }

    #[test]
    fn held_entries_are_a_nodes_worth_of_uids_and_role_names() {
        let longest = |c: char| c.to_string().repeat(64);
        let full: Vec<_> = (0..MAX_HELD).map(|_| held(&longest('u'), &longest('r'))).collect();
        assert!(validate_held(&full).is_ok(), "a full node of the longest valid entries");
        let mut over = full.clone();
        over.push(held("u-1", "app"));
        assert!(validate_held(&over).is_err(), "one more than MAX_HELD");
        let (long_uid, long_role) = (format!("{}u", longest('u')), format!("{}r", longest('r')));
        for (uid, role) in [
            ("", "app"),
            (long_uid.as_str(), "app"),
            ("u/1", "app"),
            ("u 1", "app"),
            ("u-1", ""),
            ("u-1", long_role.as_str()),
            ("u-1", "role/app"),
            ("u-1", "a:b"),
        ] {
            let refused = validate_held(&[held("u-ok", "app"), held(uid, role)]).unwrap_err();
            assert_eq!(refused.reason(), Reason::InvalidArgument, "{uid:?} {role:?}");
        }
    }
}
