//! The namespace watch: keeps the namespace index (role policies) current and, when a policy
//! changes, re-checks the pods of that namespace and revokes what it no longer permits, and drops
//! the sessions fetched ahead for its pending pods that it no longer permits.

use super::pods::PodWatch;
use crate::authz::namespace_index::NamespaceIndex;
use crate::grpc::revocation::Revocations;
use crate::metrics::{Metrics, WatchKind};
use imdsgate_core::latch::Latch;
use imdsgate_core::watch::Update;
use k8s_openapi::api::core::v1::Namespace;
use std::sync::Arc;

/// What the namespace watch updates.
pub struct NamespaceWatch {
    pub index: Arc<NamespaceIndex>,
    pub revocations: Revocations,
    /// Its pending pods (scheduled, no IP yet) are rechecked too.
    pub pods: Arc<PodWatch>,
    pub metrics: Metrics,
}

impl NamespaceWatch {
    /// What one watch update does.
    pub fn update(&self, update: Update<Namespace>) {
        let changed: Vec<String> = match update {
            Update::Apply(ns) => self.index.apply(&ns).into_iter().collect(),
            Update::Delete(ns) => self.index.delete(&ns).into_iter().collect(),
            Update::Reset(all) => self.index.reset(&all),
        };
        // A policy that changed may no longer permit roles that pods hold credentials for.
        self.revocations.recheck_namespaces(&changed);
        self.pods.recheck_pending(&changed);
        self.metrics.namespaces_indexed.set(self.index.len() as i64);
    }
}

/// Feeds every namespace event to `state` until the process ends (a critical task).
pub async fn watch(client: kube::Client, state: NamespaceWatch, synced: Latch) {
    super::watch_all(client, WatchKind::Namespaces, synced, &state.metrics.clone(), |update| {
        state.update(update)
    })
    .await;
}

#[cfg(test)]
mod tests;
