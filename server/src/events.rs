//! The server's Events on pods (see [`imdsgate_core::events`]): a Warning for each refusal it
//! decides (reason: the refusal's code, as in `denials_total{reason}`), and one for a pod found
//! running on a server node (`POD_ON_SERVER_NODE`). Deduplicated across replicas and agents.

use imdsgate_core::PodInfo;
use imdsgate_core::events::{RefusalEvents, Write};

pub use imdsgate_core::events::PodRef;

/// The reason of the Event on a pod found on a server node.
pub const ON_SERVER_NODE: &str = "POD_ON_SERVER_NODE";

/// Publishes the server's Events.
pub struct DenialEvents(RefusalEvents);

impl DenialEvents {
    pub fn new(client: Option<kube::Client>, instance: Option<String>) -> Self {
        let instance = instance.unwrap_or_else(|| "imdsgate-server".into());
        DenialEvents(RefusalEvents::new(client, "imdsgate.io/server", instance))
    }

    /// Records that `pod` was denied for `reason`; returns whether an Event is written.
    pub fn denied(&self, pod: &PodInfo, reason: &'static str, message: &str) -> bool {
        let pod = PodRef { namespace: &pod.namespace, name: &pod.name, uid: &pod.uid };
        self.0.refused(pod, reason, "GetCredentials", message) != Write::Nothing
    }

    /// Records that a pod runs on a server node; returns whether an Event is written.
    pub fn on_server_node(&self, pod: PodRef<'_>, message: &str) -> bool {
        self.0.refused(pod, ON_SERVER_NODE, "Scan", message) != Write::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str) -> PodInfo {
        PodInfo { uid: uid.into(), namespace: "ns".into(), name: "p".into(), ..Default::default() }
    }

    #[test]
    fn one_event_per_pod_and_reason_per_window() {
        let events = DenialEvents::new(None, None);
        assert!(events.denied(&pod("a"), "NAMESPACE_FORBIDS", "x"));
        assert!(!events.denied(&pod("a"), "NAMESPACE_FORBIDS", "x"));
        assert!(events.denied(&pod("a"), "ROLE_MISMATCH", "x"));
        assert!(events.denied(&pod("b"), "NAMESPACE_FORBIDS", "x"));
    }
}
