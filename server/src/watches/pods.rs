//! The pod watch: keeps the pod index current and reacts to what each pod event means for the
//! credentials the server holds or hands out: a pod whose identity changed is revoked, a pod gone
//! is revoked and forgotten, a new pod with a permitted role is prefetched, and a pod scheduled and
//! still waiting for its IP ([`pending`]) is prefetched and its session kept until the IP comes. A
//! pod deleted also ends the agent tokens bound to it ([`AgentAuthenticator::pod_deleted`]).

pub mod pending;

use crate::authz::authorizer::Authorizer;
use crate::authz::session::SessionKey;
use crate::credential_cache::CredentialCache;
use crate::grpc::agent_auth::AgentAuthenticator;
use crate::grpc::revocation::Revocations;
use crate::metrics::{Metrics, WatchKind};
use imdsgate_core::latch::Latch;
use imdsgate_core::pod_index::Change;
use imdsgate_core::watch::Update;
use imdsgate_core::{PodIndex, PodInfo};
use k8s_openapi::api::core::v1::Pod;
use pending::{Pending, PendingPods};
use std::collections::HashSet;
use std::sync::Arc;

/// What the pod watch updates.
pub struct PodWatch {
    pods: Arc<PodIndex>,
    pending: PendingPods,
    authorizer: Arc<Authorizer>,
    cache: CredentialCache,
    revocations: Revocations,
    /// Told of every pod deleted: agent tokens bound to it stop working.
    agent_tokens: Arc<AgentAuthenticator>,
    metrics: Metrics,
}

impl PodWatch {
    /// The pod watch over the authorizer's pod index.
    pub fn new(
        authorizer: Arc<Authorizer>,
        cache: CredentialCache,
        revocations: Revocations,
        agent_tokens: Arc<AgentAuthenticator>,
        metrics: Metrics,
    ) -> Self {
        PodWatch {
            pods: authorizer.pods.clone(),
            pending: PendingPods::default(),
            authorizer,
            cache,
            revocations,
            agent_tokens,
            metrics,
        }
    }

    /// What one watch update does.
    pub fn update(&self, update: Update<Pod>) {
        match update {
            Update::Apply(pod) => {
                let change = self.pods.apply(&pod);
                self.track_pending(&pod);
                self.changed(change)
            }
            Update::Delete(pod) => {
                self.agent_tokens.pod_deleted(pod.metadata.uid.as_deref().unwrap_or_default());
                self.changed(self.pods.delete(&pod));
                if self.pending.delete(&pod) {
                    self.left_pending(pod.metadata.uid.as_deref().unwrap_or_default());
                }
            }
            Update::Reset(all) => {
                let listed: HashSet<&str> = all.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
                self.agent_tokens.pods_listed(|uid| listed.contains(uid));
                self.pods.reset(all.iter()).into_iter().for_each(|c| self.changed(c));
                for uid in self.pending.reset(all.iter()) {
                    self.left_pending(&uid);
                }
                all.iter()
                    .filter(|pod| pending::is_pending(pod))
                    .for_each(|pod| self.prefetch_before_ip(pod));
            }
        }
        self.metrics.pods_indexed.set(self.pods.len() as i64);
    }

    /// Whether the session of the pod `uid` is still wanted (the refresher drops the others): the
    /// pod is indexed, or it is waiting for its IP and keeps the session fetched for it ahead of
    /// the IP.
    pub fn keeps_session(&self, uid: &str) -> bool {
        self.pods.by_uid(uid).is_some() || self.pending.contains(uid)
    }

    /// Whether `key` is the session its pod is entitled to now (the refresher asks before every
    /// background refresh): the pod is indexed or pending, and the authorizer gives it `key`
    /// today (the same role, permitted by its namespace's policy now, with the same session name,
    /// ExternalId and tags). Anything else, an undecided base ARN included, is no.
    pub fn entitled(&self, key: &SessionKey) -> bool {
        let pod = self.pods.by_uid(&key.pod_uid).or_else(|| self.pending.get(&key.pod_uid).map(Arc::new));
        pod.is_some_and(|pod| self.authorizer.session_for(&pod).is_ok_and(|now| now == *key))
    }

    /// The policies of `namespaces` changed: the sessions fetched ahead for their pending pods
    /// that the new policy no longer permits are dropped (nothing was handed out: no agent is
    /// told). Pods with an IP are the revocations' ([`Revocations::recheck_namespaces`]).
    pub fn recheck_pending(&self, namespaces: &[String]) {
        if namespaces.is_empty() {
            return;
        }
        let namespaces: HashSet<&str> = namespaces.iter().map(String::as_str).collect();
        for pod in self.pending.in_namespaces(&namespaces) {
            if self.authorizer.session_for(&pod).is_err() {
                self.cache.release(&pod.uid);
            }
        }
    }

    fn changed(&self, change: Change) {
        match change {
            Change::Added(pod) => self.prefetch(&pod),
            Change::Updated { pod, identity_changed } => {
                if identity_changed {
                    self.revocations.revoke(&pod, imdsgate_proto::Reason::SessionChanged);
                }
                self.prefetch(&pod);
            }
            // Deleted, terminating, finished or without an IP: nothing more for it.
            Change::Removed(pod) => {
                if pod.role.is_some() {
                    self.revocations.revoke(&pod, imdsgate_proto::Reason::PodNotFound);
                }
                self.cache.pod_gone(&pod.uid);
            }
            Change::Unchanged => {}
        }
    }

    /// A pod scheduled to a node that has no IP yet (its sandbox starting) already names its
    /// role: its credentials are fetched now, so they are ready when its IP appears (the session
    /// does not depend on the IP; it is bound to the pod's UID and served only to the agent of the
    /// pod's node asking from the pod's IP). Repeated status updates of the same pending pod find
    /// the session cached or in flight and cost nothing. A pod not yet scheduled is never
    /// prefetched ([`pending::is_pending`]): it may never run.
    fn prefetch_before_ip(&self, pod: &Pod) {
        let info = PodInfo::describe(pod);
        if !info.uid.is_empty() {
            self.prefetch(&info);
        }
    }

    /// Keeps the pending set (pods with a role and no IP yet) up to date with one event: a pod
    /// pending is prefetched; one that leaves it without getting an IP (finished, deleted, its
    /// role removed) has its session dropped, as a pod leaving the index does.
    fn track_pending(&self, pod: &Pod) {
        match self.pending.apply(pod) {
            Pending::Yes => self.prefetch_before_ip(pod),
            Pending::Left => self.left_pending(pod.metadata.uid.as_deref().unwrap_or_default()),
            Pending::No => {}
        }
    }

    fn left_pending(&self, uid: &str) {
        if self.pods.by_uid(uid).is_none() {
            self.cache.pod_gone(uid);
        }
    }

    /// A pod scheduled to a node with a permitted role gets its credentials fetched before it
    /// asks.
    fn prefetch(&self, pod: &PodInfo) {
        if !matches!(pod.phase.as_deref(), Some("Pending") | Some("Running"))
            || pod.role.is_none()
            || pod.node.as_deref().is_none_or(str::is_empty)
        {
            return;
        }
        if let Ok(key) = self.authorizer.session_for(pod) {
            self.cache.prefetch(&pod.namespace, key);
        }
    }
}

/// Feeds every pod event to `state` until the process ends (a critical task). Starts once the
/// namespace watch has synced: prefetching needs namespace policies.
pub async fn watch(client: kube::Client, state: Arc<PodWatch>, ns_synced: Latch, synced: Latch) {
    ns_synced.wait().await;
    super::watch_all(client, WatchKind::Pods, synced, &state.metrics, |update: Update<Pod>| {
        state.update(update)
    })
    .await;
}

#[cfg(test)]
mod tests;
