//! The agent's side of "why does my pod get no credentials?": every refusal only the agent sees —
//! the pod asks for credentials without a role annotation (`NO_ROLE`), for another role than its
//! own (`ROLE_MISMATCH`), while no server replica answers (`SERVER_UNREACHABLE`), or from an
//! address this node does not know (`POD_NOT_FOUND`) — becomes a Warning Event on the pod,
//! deduplicated as [`imdsgate_core::events`] describes, and is counted in
//! `imdsgate_agent_refusals_total{reason}`. Refusals the server decides carry its own Events.

use crate::credentials::server_client::ServerError;
use crate::imds::ImdsError;
use crate::metrics::{Metrics, RevocationLabels};
use imdsgate_core::PodInfo;
use imdsgate_core::events::{PodRef, RefusalEvents};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An unknown address is looked up (cluster-wide, by `status.podIP`) at most this often...
const LOOKUP_SAME_IP_EVERY: Duration = Duration::from_secs(600);
/// ...and at most this many lookups a minute in all, each served from the apiserver's watch cache
/// (`resourceVersion=0`), so a flood costs the apiserver next to nothing.
const LOOKUPS_PER_MINUTE: usize = 3;
/// Addresses remembered at most for the per-address limit.
const MAX_LOOKED_UP: usize = 10_000;

/// Whether `pod` is live ([`imdsgate_core::liveness`]), not host-network, and on another node.
fn is_live_elsewhere(pod: &Pod, node: &str) -> bool {
    let spec = pod.spec.as_ref();
    imdsgate_core::liveness::is_live(pod)
        && spec.and_then(|s| s.host_network) != Some(true)
        && spec.and_then(|s| s.node_name.as_deref()) != Some(node)
}

/// See the module documentation.
pub struct AgentEvents {
    events: Arc<RefusalEvents>,
    client: Option<kube::Client>,
    node: String,
    metrics: Metrics,
    lookups: Mutex<Lookups>,
}

#[derive(Default)]
struct Lookups {
    by_ip: HashMap<IpAddr, Instant>,
    recent: Vec<Instant>,
}

impl AgentEvents {
    pub fn new(client: Option<kube::Client>, node: String, metrics: Metrics) -> Self {
        AgentEvents {
            events: Arc::new(RefusalEvents::new(client.clone(), "imdsgate.io/agent", node.clone())),
            client,
            node,
            metrics,
            lookups: Mutex::default(),
        }
    }

    /// Records a refusal of a credentials request from `pod`, when it is one only the agent sees.
    pub fn refused(&self, pod: &PodInfo, error: &ImdsError) {
        let (reason, message) = match error {
            ImdsError::NoRole(_) => (
                "NO_ROLE",
                "the pod asks for AWS credentials at 169.254.169.254 but has no iam.amazonaws.com/role annotation; add one naming its role (and check that its namespace's iam.amazonaws.com/permitted allows it)".to_string(),
            ),
            ImdsError::RoleInvalid { error, .. } => (
                "ROLE_INVALID",
                format!("the pod asks for AWS credentials at 169.254.169.254 but its iam.amazonaws.com/role annotation names no role: {error}"),
            ),
            ImdsError::NotThePodsRole(asked) => (
                "ROLE_MISMATCH",
                format!(
                    "the pod asked for role {asked:?}, but its iam.amazonaws.com/role annotation names {:?}; the SDK asks for the role the agent lists at .../security-credentials/ — check AWS_ROLE_ARN or profile settings in the pod",
                    pod.role.as_deref().unwrap_or_default()
                ),
            ),
            ImdsError::Server(ServerError::Unreachable(why)) => (
                "SERVER_UNREACHABLE",
                format!(
                    "no imdsgate server replica answers the agent on node {} ({why}); the pod gets credentials again as soon as one does",
                    self.node
                ),
            ),
            _ => return,
        };
        self.count(reason);
        let pod = PodRef { namespace: &pod.namespace, name: &pod.name, uid: &pod.uid };
        self.events.refused(pod, reason, "GetCredentials", &message);
    }

    /// Records a credentials request from `ip`, which no pod of this node has: if a pod elsewhere
    /// has it (another node, or host network), that pod gets a `POD_NOT_FOUND` Event. Looked up
    /// in the background, within a small budget.
    pub fn unknown_source(&self, ip: IpAddr) {
        self.count("POD_NOT_FOUND");
        let Some(client) = self.client.clone() else { return };
        if !self.may_look_up(ip, Instant::now()) {
            return;
        }
        let node = self.node.clone();
        let events_of = self.events.clone();
        tokio::spawn(async move {
            let pods = kube::Api::<Pod>::all(client);
            let params = ListParams::default().fields(&format!("status.podIP={ip}")).match_any().limit(5);
            let found = match pods.list(&params).await {
                Ok(list) => list.items,
                Err(error) => {
                    tracing::debug!(%error, "cannot look up the pod of an unknown address");
                    return;
                }
            };
            // Only a live pod that is alone at that address and runs elsewhere is told: finished
            // pods keep their old IP, and host-network pods share the node's.
            let live: Vec<&Pod> = found.iter().filter(|p| is_live_elsewhere(p, &node)).collect();
            let [pod] = live.as_slice() else { return };
            let (namespace, name, uid) = (
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default(),
                pod.metadata.uid.as_deref().unwrap_or_default(),
            );
            let runs_on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("no node yet");
            let message = format!(
                "a request for credentials from {ip} reached the imdsgate agent on node {node}, which does not serve this pod: it runs on {runs_on}. Pods get credentials only from the agent of their own node, over 169.254.169.254 from their own network namespace (not hostNetwork)"
            );
            events_of.refused(PodRef { namespace, name, uid }, "POD_NOT_FOUND", "GetCredentials", &message);
        });
    }

    fn count(&self, reason: &'static str) {
        self.metrics.refusals.get_or_create(&RevocationLabels { reason }).inc();
    }

    /// Whether `ip` may be looked up at `now` (and counts it if so).
    fn may_look_up(&self, ip: IpAddr, now: Instant) -> bool {
        let mut lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        lookups.recent.retain(|at| now.duration_since(*at) < Duration::from_secs(60));
        if lookups.recent.len() >= LOOKUPS_PER_MINUTE {
            return false;
        }
        if lookups.by_ip.get(&ip).is_some_and(|at| now.duration_since(*at) < LOOKUP_SAME_IP_EVERY) {
            return false;
        }
        if lookups.by_ip.len() >= MAX_LOOKED_UP {
            lookups.by_ip.retain(|_, at| now.duration_since(*at) < LOOKUP_SAME_IP_EVERY);
            if lookups.by_ip.len() >= MAX_LOOKED_UP {
                return false;
            }
        }
        lookups.by_ip.insert(ip, now);
        lookups.recent.push(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_addresses_are_looked_up_rarely_and_within_a_budget() {
        let events = AgentEvents::new(None, "node-a".into(), Metrics::new());
        let t0 = Instant::now();
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        assert!(events.may_look_up(ip(1), t0));
        assert!(
            !events.may_look_up(ip(1), t0 + Duration::from_secs(30)),
            "the same address: once per 10 minutes"
        );
        for n in 2..=LOOKUPS_PER_MINUTE as u8 {
            assert!(events.may_look_up(ip(n), t0));
        }
        assert!(!events.may_look_up(ip(200), t0), "at most 3 a minute in all, whatever the flood");
        assert!(events.may_look_up(ip(200), t0 + Duration::from_secs(61)));
    }

    #[test]
    fn only_a_live_pod_on_another_node_is_blamed() {
        let pod = |node: &str, phase: &str, host: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p", "namespace": "ns" },
                "spec": { "nodeName": node, "hostNetwork": host, "containers": [] },
                "status": { "phase": phase } }))
            .unwrap()
        };
        assert!(is_live_elsewhere(&pod("node-b", "Running", false), "node-a"));
        assert!(
            !is_live_elsewhere(&pod("node-a", "Running", false), "node-a"),
            "this node's: the watch lags"
        );
        assert!(
            !is_live_elsewhere(&pod("node-b", "Succeeded", false), "node-a"),
            "finished pods keep old IPs"
        );
        assert!(
            !is_live_elsewhere(&pod("node-b", "Running", true), "node-a"),
            "host network shares the node's IP"
        );
    }

    #[test]
    fn only_the_agents_own_refusals_are_counted_here() {
        let metrics = Metrics::new();
        let events = AgentEvents::new(None, "node-a".into(), metrics.clone());
        let pod = PodInfo {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            role: Some("app".into()),
            ..Default::default()
        };
        events.refused(&pod, &ImdsError::NotThePodsRole("admin".into()));
        events.refused(&pod, &ImdsError::Server(ServerError::Unreachable("refused".into())));
        // Decided by the server, which writes its own Event.
        events.refused(
            &pod,
            &ImdsError::Server(ServerError::Refused {
                code: tonic::Code::PermissionDenied,
                reason: Some(imdsgate_proto::Reason::NamespaceForbids),
                message: "no".into(),
            }),
        );
        let count = |reason| metrics.refusals.get_or_create(&RevocationLabels { reason }).get();
        assert_eq!(
            (count("ROLE_MISMATCH"), count("SERVER_UNREACHABLE"), count("NAMESPACE_FORBIDS")),
            (1, 1, 0)
        );
    }
}
