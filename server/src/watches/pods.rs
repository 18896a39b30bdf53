//! The pod watch: keeps the pod index current and reacts to what each pod event means for the
//! credentials the server holds or hands out: a pod whose identity changed is revoked, a pod gone
//! is revoked and forgotten, a new pod with a permitted role is prefetched, and a pod still
//! waiting for its IP ([`pending`]) is prefetched and its session kept until the IP comes.

pub mod pending;

use crate::authz::authorizer::Authorizer;
use crate::credential_cache::CredentialCache;
use crate::grpc::revocation::Revocations;
use crate::metrics::{Metrics, WatchKind, WatchLabels};
use futures::StreamExt;
use imdsgate_core::latch::Latch;
use imdsgate_core::pod_index::Change;
use imdsgate_core::watch::{self, Update};
use imdsgate_core::{PodIndex, PodInfo};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use pending::{Pending, PendingPods};
use std::sync::Arc;

/// What the pod watch updates.
pub struct PodWatch {
    pods: Arc<PodIndex>,
    pending: PendingPods,
    authorizer: Arc<Authorizer>,
    cache: CredentialCache,
    revocations: Revocations,
    metrics: Metrics,
}

impl PodWatch {
    /// The pod watch over the authorizer's pod index.
    pub fn new(
        authorizer: Arc<Authorizer>,
        cache: CredentialCache,
        revocations: Revocations,
        metrics: Metrics,
    ) -> Self {
        PodWatch {
            pods: authorizer.pods.clone(),
            pending: PendingPods::default(),
            authorizer,
            cache,
            revocations,
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
                self.changed(self.pods.delete(&pod));
                if self.pending.delete(&pod) {
                    self.left_pending(pod.metadata.uid.as_deref().unwrap_or_default());
                }
            }
            Update::Reset(all) => {
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

    /// A pod that has no IP yet (just created, being scheduled, its sandbox starting) already
    /// names its role: its credentials are fetched now, so they are ready when its IP appears
    /// (the session does not depend on the IP; it is bound to the pod's UID and served only to
    /// the agent of the pod's node asking from the pod's IP). Repeated status updates of the
    /// same pending pod find the session cached or in flight and cost nothing.
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

    /// A pod with an IP and a permitted role gets its credentials fetched before it asks.
    fn prefetch(&self, pod: &PodInfo) {
        if !matches!(pod.phase.as_deref(), Some("Pending") | Some("Running")) || pod.role.is_none() {
            return;
        }
        if let Ok(key) = self.authorizer.session_for(pod) {
            self.cache.prefetch(key);
        }
    }
}

/// Feeds every pod event to `state` until the process ends (a critical task). Starts once the
/// namespace watch has synced: prefetching needs namespace policies.
pub async fn watch(client: kube::Client, state: Arc<PodWatch>, ns_synced: Latch, synced: Latch) {
    ns_synced.wait().await;
    let stream = watcher(kube::Api::<Pod>::all(client), watcher::Config::default()).default_backoff();
    let restarts =
        state.metrics.watch_restarts.get_or_create(&WatchLabels { watch: WatchKind::Pods }).clone();
    watch::drive(
        "pods",
        stream.boxed(),
        synced,
        |_| {
            restarts.inc();
        },
        |update| state.update(update),
    )
    .await;
}

#[cfg(test)]
mod tests;
