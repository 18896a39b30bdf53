//! Test fixtures for the watch reactions: real indexes, a real [`CredentialCache`] over an
//! in-memory STS, real [`Revocations`] with an agent's stream listening, no cluster.

use super::namespaces::NamespaceWatch;
use super::pods::PodWatch;
use crate::authz::authorizer::Authorizer;
use crate::authz::fixtures::{base_arn, mk_ns};
use crate::authz::namespace_index::NamespaceIndex;
use crate::authz::session::TagConfig;
use crate::credential_cache::fixtures::FakeSts;
use crate::credential_cache::{CacheConfig, CredentialCache};
use crate::grpc::agent_auth::AgentAuthenticator;
use crate::grpc::agent_auth::fixtures::{AGENT, FakeReviewer, auth, bound_status};
use crate::grpc::revocation::{RevocationStream, Revocations, Subscriber};
use crate::metrics::Metrics;
use futures::StreamExt;
use imdsgate_core::{PodIndex, fixtures};
use k8s_openapi::api::core::v1::Pod;
use std::sync::Arc;
use std::time::Duration;

/// What namespace `team` permits at first: the roles `app-*`.
pub const TEAM_PERMITS: &str = "arn:aws:iam::123456789012:role/app-.*";

/// Both watches over one set of indexes, a cache and the revocations, with an unbound agent's
/// revocation stream open (it hears every node).
pub struct Bed {
    pub pods: Arc<PodWatch>,
    pub namespaces: NamespaceWatch,
    pub sts: Arc<FakeSts>,
    pub cache: CredentialCache,
    pub authorizer: Arc<Authorizer>,
    pub agent: RevocationStream,
    /// The agent authenticator the pod watch tells of deletions, and its TokenReview API, which
    /// accepts tokens bound to node-a and the pod `agent-pod` until a test says otherwise.
    pub agent_tokens: Arc<AgentAuthenticator>,
    pub reviewer: Arc<FakeReviewer>,
}

pub fn bed() -> Bed {
    let index = Arc::new(NamespaceIndex::new());
    index.apply(&mk_ns("team", TEAM_PERMITS));
    let authorizer = Arc::new(Authorizer {
        pods: Arc::new(PodIndex::new()),
        namespaces: index.clone(),
        base_arn: base_arn(),
        tags: TagConfig::default(),
    });
    let metrics = Metrics::new();
    let sts = Arc::new(FakeSts::default());
    let cache =
        CredentialCache::new(sts.clone(), CacheConfig::new(Duration::from_secs(3600)), metrics.clone());
    let revocations = Revocations::new(authorizer.clone(), cache.clone(), metrics.clone());
    let agent = revocations.stream(Vec::new(), Subscriber::default());
    let (agent_tokens, reviewer) = auth(bound_status(AGENT, Some("node-a"), Some("agent-pod")), false);
    let agent_tokens = Arc::new(agent_tokens);
    let pods = Arc::new(PodWatch::new(
        authorizer.clone(),
        cache.clone(),
        revocations.clone(),
        agent_tokens.clone(),
        metrics.clone(),
    ));
    Bed {
        pods: pods.clone(),
        namespaces: NamespaceWatch { index, revocations, pods, metrics },
        agent_tokens,
        reviewer,
        sts,
        cache,
        authorizer,
        agent,
    }
}

impl Bed {
    /// The revocations the agent has been told since the last call, as `uid:REASON`.
    pub async fn told(&mut self) -> Vec<String> {
        let mut told = Vec::new();
        while let Ok(Some(revocation)) =
            tokio::time::timeout(Duration::from_millis(50), self.agent.next()).await
        {
            let revocation = revocation.expect("the stream stays open");
            told.push(format!("{}:{}", revocation.pod_uid, revocation.reason));
        }
        told
    }

    /// The session `pod` is entitled to now.
    pub fn key_for(&self, pod: &Pod) -> crate::authz::session::SessionKey {
        self.authorizer.session_for(&imdsgate_core::PodInfo::describe(pod)).expect("entitled")
    }

    /// The role ARN of the session the pod `uid` holds, if it holds one: asked as the pod would,
    /// so a session the cache still holds is a hit and costs no STS call.
    pub async fn session_role(&self, uid: &str) -> Option<String> {
        if !self.cache.holds(uid) {
            return None;
        }
        let pod = self.authorizer.pods.by_uid(uid)?;
        let key = self.authorizer.session_for(&pod).ok()?;
        let (credentials, _) = self.cache.get(&pod.namespace, &key).await.ok()?;
        Some(credentials.role_arn.clone())
    }
}

/// A pod of namespace `team` on node-a: `role` its role annotation, `ip` its IP (none: not yet
/// given one), `phase` its phase.
pub fn pod(uid: &str, role: Option<&str>, ip: Option<&str>, phase: &str) -> Pod {
    let pod = fixtures::pod(uid, uid).ips(ip.as_slice()).phase(phase);
    role.map_or(pod.clone(), |role| pod.role(role)).build()
}

/// A running pod of namespace `team` with an IP.
pub fn running(uid: &str, role: Option<&str>, ip: &str) -> Pod {
    pod(uid, role, Some(ip), "Running")
}

/// A pod of namespace `team`, scheduled to node-a, that names `role` and has no IP yet.
pub fn pending(uid: &str, role: &str) -> Pod {
    pod(uid, Some(role), None, "Pending")
}

/// A pod of namespace `team` that names `role` and is not scheduled yet (no node, no IP).
pub fn unscheduled(uid: &str, role: &str) -> Pod {
    fixtures::pod(uid, uid).node(None).phase("Pending").role(role).build()
}

/// The agent pod `uid` on node-a (host network, the agents' ServiceAccount).
pub fn agent_pod(uid: &str) -> Pod {
    let mut pod = fixtures::pod(uid, uid).namespace("imdsgate").ip("192.168.0.1").build();
    let spec = pod.spec.as_mut().expect("spec");
    spec.host_network = Some(true);
    spec.service_account_name = Some("imdsgate-agent".into());
    pod
}
