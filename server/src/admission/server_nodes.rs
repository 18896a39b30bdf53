//! Server nodes, as a watch of the cluster's nodes sees them, and the pods found on them. A server
//! node's instance role may assume every pod role, so an ordinary pod there is an incident: the
//! webhook keeps new pods off, but a node can gain the server label while pods already run on it,
//! and a pod can be bound around the webhook while it is down. Every such pod is reported — a
//! warning in the log, a Warning Event on the pod, and the `pods_on_server_nodes` gauge — whenever
//! the set of server nodes changes and on a regular scan.

use crate::admission::placement::is_server_node;
use crate::events::{DenialEvents, PodRef};
use crate::metrics::Metrics;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

/// How often pods on server nodes are looked for when nothing changes.
pub const SCAN_EVERY: Duration = Duration::from_secs(60);

/// The names of the server nodes.
pub struct ServerNodes {
    labels: BTreeMap<String, String>,
    names: RwLock<HashSet<String>>,
    /// Woken when the set changes.
    pub changed: Notify,
}

impl ServerNodes {
    pub fn new(labels: BTreeMap<String, String>) -> Self {
        ServerNodes { labels, names: RwLock::default(), changed: Notify::new() }
    }

    /// Takes a node as the watch saw it.
    pub fn apply(&self, node: &Node) {
        let Some(name) = node.metadata.name.clone() else { return };
        let server = is_server_node(&self.labels, &node.metadata.labels.clone().unwrap_or_default());
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        let changed = if server { names.insert(name) } else { names.remove(&name) };
        drop(names);
        if changed {
            self.changed.notify_one();
        }
    }

    pub fn delete(&self, node: &Node) {
        let Some(name) = &node.metadata.name else { return };
        if self.names.write().unwrap_or_else(|e| e.into_inner()).remove(name) {
            self.changed.notify_one();
        }
    }

    pub fn reset(&self, nodes: &[Node]) {
        let fresh: HashSet<String> = nodes
            .iter()
            .filter(|n| is_server_node(&self.labels, &n.metadata.labels.clone().unwrap_or_default()))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        let changed = *names != fresh;
        *names = fresh;
        drop(names);
        if changed {
            self.changed.notify_one();
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.names.read().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        names.sort();
        names
    }
}

/// Whether `pod` counts as an intruder: not exempt, not finished, not on its way out.
pub fn is_intruder(pod: &Pod, exempt_namespaces: &HashSet<String>) -> bool {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    !exempt_namespaces.contains(namespace) && imdsgate_core::liveness::is_live(pod)
}

/// Reports pods on server nodes until the process ends (a critical task).
pub async fn report(
    client: kube::Client,
    nodes: Arc<ServerNodes>,
    exempt_namespaces: HashSet<String>,
    events: Arc<DenialEvents>,
    metrics: Metrics,
) {
    let pods = kube::Api::<Pod>::all(client);
    loop {
        // A node that just gained the label, or the regular scan.
        let _ = tokio::time::timeout(SCAN_EVERY, nodes.changed.notified()).await;
        let mut found = 0i64;
        let mut complete = true;
        for node in nodes.names() {
            let listed = pods.list(&ListParams::default().fields(&format!("spec.nodeName={node}"))).await;
            let list = match listed {
                Ok(list) => list,
                Err(error) => {
                    tracing::warn!(node, %error, "cannot list the pods of a server node");
                    complete = false;
                    continue;
                }
            };
            for pod in list.items.iter().filter(|p| is_intruder(p, &exempt_namespaces)) {
                found += 1;
                let (namespace, name, uid) = (
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    pod.metadata.uid.as_deref().unwrap_or_default(),
                );
                let message = format!(
                    "pod runs on {node}, an imdsgate server node whose instance role may assume every pod role; move it off (delete it, and keep it off with the server nodes' taint) or remove the node's server label"
                );
                if events.on_server_node(PodRef { namespace, name, uid }, &message) {
                    tracing::warn!(namespace, pod = name, node, "a pod runs on a server node");
                }
            }
        }
        // A partial count would read as "fewer intruders"; keep the last full one instead.
        if complete || found > metrics.pods_on_server_nodes.get() {
            metrics.pods_on_server_nodes.set(found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn node(name: &str, server: bool) -> Node {
        let labels: &[(&str, &str)] = if server { &[("imdsgate.io/server-node", "true")] } else { &[] };
        imdsgate_core::fixtures::node(name, labels)
    }

    fn nodes() -> ServerNodes {
        ServerNodes::new(crate::admission::placement::parse_selector("imdsgate.io/server-node=true").unwrap())
    }

    #[tokio::test]
    async fn a_node_that_gains_the_label_becomes_a_server_node_and_wakes_the_scan() {
        let n = nodes();
        n.reset(&[node("a", false), node("b", true)]);
        assert_eq!(n.names(), ["b"]);
        n.changed.notified().await; // the reset changed the set
        n.apply(&node("a", true));
        assert_eq!(n.names(), ["a", "b"]);
        tokio::time::timeout(Duration::from_secs(1), n.changed.notified()).await.expect("woken");
        n.apply(&node("a", true));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), n.changed.notified()).await.is_err(),
            "no change, no wake-up"
        );
        n.delete(&node("b", true));
        n.apply(&node("a", false));
        assert!(n.names().is_empty());
    }

    #[test]
    fn intruders_are_live_pods_outside_the_exempt_namespaces() {
        let exempt: HashSet<String> = ["imdsgate".to_string()].into();
        let pod = |ns: &str, phase: &str, deleting: bool| -> Pod {
            let p = imdsgate_core::fixtures::pod("u", "p").namespace(ns).phase(phase);
            if deleting { p.deleting() } else { p }.build()
        };
        assert!(is_intruder(&pod("team", "Running", false), &exempt));
        assert!(is_intruder(&pod("team", "Pending", false), &exempt));
        assert!(!is_intruder(&pod("imdsgate", "Running", false), &exempt));
        assert!(!is_intruder(&pod("team", "Succeeded", false), &exempt));
        assert!(!is_intruder(&pod("team", "Running", true), &exempt));
    }
}
