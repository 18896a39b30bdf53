//! The node watch: keeps the set of server nodes current (the intruder report wakes on changes).

use crate::admission::server_nodes::ServerNodes;
use crate::metrics::{Metrics, WatchKind};
use imdsgate_core::latch::Latch;
use imdsgate_core::watch::Update;
use k8s_openapi::api::core::v1::Node;
use std::sync::Arc;

/// What one watch update does to the server nodes.
pub fn update(nodes: &ServerNodes, update: Update<Node>) {
    match update {
        Update::Apply(node) => nodes.apply(&node),
        Update::Delete(node) => nodes.delete(&node),
        Update::Reset(all) => nodes.reset(&all),
    }
}

/// Feeds every node event to `nodes` until the process ends (a critical task).
pub async fn watch(client: kube::Client, nodes: Arc<ServerNodes>, metrics: Metrics) {
    super::watch_all(client, WatchKind::Nodes, Latch::default(), &metrics, |event| update(&nodes, event))
        .await;
}
