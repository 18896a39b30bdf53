//! The watch of this node's pods: it keeps the pod index that names a caller by its IP, and reacts
//! to what changed there on the credential cache — a pod that leaves, changes identity or loses
//! its IP to a new pod has its cached credentials forgotten, and a pod with a role that gets an IP
//! has them fetched ahead of its first request.

use imdsgate_core::latch::Latch;
use imdsgate_core::pod_index::Change;
use imdsgate_core::watch::{self, Update};
use imdsgate_core::{PodIndex, PodInfo};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::Arc;

use crate::credentials::credential_cache::CredentialCache;
use crate::imds;
use crate::metrics::Metrics;

/// The pod index and the credential cache the watch keeps in step with it.
#[derive(Clone)]
pub struct PodWatch {
    pods: Arc<PodIndex>,
    credentials: Arc<CredentialCache>,
}

impl PodWatch {
    pub fn new(pods: Arc<PodIndex>, credentials: Arc<CredentialCache>) -> PodWatch {
        PodWatch { pods, credentials }
    }

    /// Watches the pods of `node` until the process ends, taking every update as [`PodWatch::update`]
    /// does; `synced` is set once the first list is in.
    pub async fn run(self, client: kube::Client, node: String, synced: Latch, metrics: Metrics) {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let stream = watcher(kube::Api::<Pod>::all(client), config).default_backoff();
        let restarts = metrics.watch_restarts.clone();
        watch::drive(
            "pods",
            stream,
            synced,
            |_| {
                restarts.inc();
            },
            |update| {
                self.update(update);
                metrics.pods_indexed.set(self.pods.len() as i64);
            },
        )
        .await;
    }

    /// Takes one update of the watch into the index and reacts to each change it makes.
    pub fn update(&self, update: Update<Pod>) {
        match update {
            Update::Apply(pod) => self.react(self.pods.apply(&pod)),
            Update::Delete(pod) => self.react(self.pods.delete(&pod)),
            Update::Reset(all) => {
                self.pods.reset(all.iter()).into_iter().for_each(|change| self.react(change))
            }
        }
    }

    /// What one change of the index (already made) does to the credential cache.
    pub fn react(&self, change: Change) {
        match change {
            Change::Removed(pod) => {
                self.credentials.forget(&pod.uid);
            }
            Change::Updated { pod, identity_changed: true } => {
                self.credentials.forget(&pod.uid);
                self.prefetch(&pod);
            }
            Change::Added(pod) => {
                // Its IP was someone else's: whatever is cached for the previous owner is never
                // served again (both stay unserved, as ambiguous, until the old pod's deletion
                // arrives).
                for ip in &pod.ips {
                    for previous in self.pods.by_ip(ip).iter().filter(|p| p.uid != pod.uid) {
                        self.credentials.forget(&previous.uid);
                    }
                }
                self.prefetch(&pod);
            }
            _ => {}
        }
    }

    /// A pod with a role that just got its IP on this node has its credentials fetched now, as its
    /// own first request would (from its IP, bound to its UID), so that request is a cache hit. Not
    /// while another pod still claims one of its IPs: nothing is served there until that clears.
    fn prefetch(&self, pod: &Arc<PodInfo>) {
        let Ok(role) = imds::role_name(pod) else { return };
        let Some(peer) = pod.ips.first().copied() else { return };
        if pod.ips.iter().any(|ip| self.pods.by_ip(ip).len() != 1) {
            return;
        }
        let (credentials, pod, role) = (self.credentials.clone(), pod.clone(), role.to_string());
        tokio::spawn(async move {
            if let Err(error) = credentials.get(peer, &pod.uid, &pod.ips, &role).await {
                tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), %error, "prefetch failed");
            }
        });
    }
}

#[cfg(test)]
mod tests;
