//! What the server does when the cluster changes, one module per watched resource. Each keeps its
//! reactions (what one event does: index it, revoke, prefetch) in a plain synchronous method on a
//! state struct, tested without a cluster, and a small async `watch` that feeds it from the
//! Kubernetes watch through [`imdsgate_core::watch::drive`].

pub mod namespaces;
pub mod nodes;
pub mod pods;

use crate::metrics::{Metrics, WatchKind, WatchLabels};
use imdsgate_core::latch::Latch;
use imdsgate_core::watch::{self, Update};
use kube::runtime::{WatchStreamExt, watcher};

/// Watches every `K` of the cluster and hands each update to `update` until the process ends (a
/// critical task), counting the watch's restarts under `kind`; `synced` is set once the first
/// complete list has been handed over.
async fn watch_all<K>(
    client: kube::Client,
    kind: WatchKind,
    synced: Latch,
    metrics: &Metrics,
    update: impl FnMut(Update<K>),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let stream = watcher(kube::Api::<K>::all(client), watcher::Config::default()).default_backoff();
    let restarts = metrics.watch_restarts.get_or_create(&WatchLabels { watch: kind }).clone();
    let what = match kind {
        WatchKind::Pods => "pods",
        WatchKind::Namespaces => "namespaces",
        WatchKind::Nodes => "nodes",
    };
    watch::drive(
        what,
        Box::pin(stream),
        synced,
        |_| {
            restarts.inc();
        },
        update,
    )
    .await;
}

#[cfg(test)]
pub(crate) mod fixtures;
