//! Revocations: the moment a pod stops being entitled to what agents may hold for it — it is
//! deleted or terminating, its role, session-name or external-id annotation changes, or its
//! namespace stops permitting its role — the server drops its session and tells the agent of the
//! pod's node, over the `WatchRevocations` stream, to drop its cached credentials. Agents never
//! ask per request; the stream carries only changes.

use crate::authz::authorizer::{Authorizer, Denial};
use crate::credential_cache::CredentialCache;
use futures::{Stream, StreamExt};
use imdsgate_core::latch::Latch;
use imdsgate_core::{PodIndex, PodInfo};
use imdsgate_proto::Reason;
use imdsgate_proto::v1::{HeldCredentials, Revocation};
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Revocations buffered per stream before a slow agent is cut off (it resubscribes and resends
/// what it holds, so nothing is lost).
const BUFFER: usize = 4096;

/// Most held entries one subscription may list (a node runs at most a few hundred pods).
pub const MAX_HELD: usize = 10_000;

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

    /// The stream for an agent on `node` that holds `held`: first what it holds and may no
    /// longer, then every later revocation for its node. A stream that falls behind ends with
    /// UNAVAILABLE, and the agent resubscribes.
    pub fn stream(&self, held: &[HeldCredentials], node: Option<String>) -> RevocationStream {
        // Subscribe before checking, so nothing that happens in between is missed.
        let rx = self.tx.subscribe();
        let initial: Vec<Result<Revocation, tonic::Status>> = held
            .iter()
            .filter_map(|h| {
                self.check_held(h, node.as_deref()).map(|reason| {
                    Ok(Revocation { pod_uid: h.pod_uid.clone(), reason: reason.as_str().into() })
                })
            })
            .collect();
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
        let closed = self.closed.clone();
        futures::stream::iter(initial).chain(later).take_until(async move { closed.wait().await }).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::fixtures::{authorizer, mk_ns};
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
        let mut node_a = r.stream(&[], Some("node-a".into()));
        let mut node_b = r.stream(&[], Some("node-b".into()));
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
        let mut stream = r.stream(&held, Some("node-a".into()));
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
        let mut stream = r.stream(&[held("u-app", "app")], Some("node-a".into()));
        let changed = r.authorizer.namespaces.apply(&mk_ns("team", "arn:aws:iam::123456789012:role/.*"));
        r.recheck_namespaces(&changed.into_iter().collect::<Vec<_>>());
        assert!(next(&mut stream).await.is_none());
    }

    #[tokio::test]
    async fn an_unbound_agent_hears_every_node_and_a_lagging_stream_is_cut_off() {
        let r = revocations();
        let mut all = r.stream(&[], None);
        let pod = r.pods.by_uid("u-b").unwrap();
        r.revoke(&pod, Reason::PodNotFound);
        assert_eq!(next(&mut all).await.unwrap().pod_uid, "u-b");
        for _ in 0..BUFFER + 10 {
            r.revoke(&pod, Reason::PodNotFound);
        }
        let ended = tokio::time::timeout(Duration::from_secs(1), all.next()).await.unwrap().unwrap();
        assert_eq!(ended.unwrap_err().code(), tonic::Code::Unavailable);
        assert!(all.next().await.is_none(), "the stream ends; the agent resubscribes");
    }

    #[tokio::test]
    async fn shutdown_ends_every_stream() {
        let r = revocations();
        let mut open = r.stream(&[], Some("node-a".into()));
        r.close();
        let ended = tokio::time::timeout(Duration::from_secs(1), open.next()).await.expect("ends at once");
        assert!(ended.is_none());
        assert!(r.stream(&[], None).next().await.is_none(), "and new ones end at once too");
    }
}
