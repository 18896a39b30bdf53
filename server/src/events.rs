//! Kubernetes Events on pods: a Warning for each denial (reason `ImdsgateRoleDenied`) saying why,
//! and one for a pod found running on a server node (`ImdsgatePodOnServerNode`); at most once per
//! pod and reason per ten minutes, so a retrying pod does not flood the apiserver.

use imdsgate_core::PodInfo;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const DENIED_REASON: &str = "ImdsgateRoleDenied";
pub const ON_SERVER_NODE_REASON: &str = "ImdsgatePodOnServerNode";
const WINDOW: Duration = Duration::from_secs(600);
const MAX_REMEMBERED: usize = 50_000;

/// The pod an Event is about.
#[derive(Clone, Copy, Debug)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// Publishes Events, deduplicated.
pub struct DenialEvents {
    recorder: Option<Recorder>,
    recent: Mutex<HashMap<(String, &'static str), Instant>>,
}

impl DenialEvents {
    pub fn new(client: Option<kube::Client>, instance: Option<String>) -> Self {
        let recorder =
            client.map(|c| Recorder::new(c, Reporter { controller: "imdsgate-server".into(), instance }));
        DenialEvents { recorder, recent: Mutex::new(HashMap::new()) }
    }

    /// Records that `pod` was denied for `reason`; returns whether an Event is sent.
    pub fn denied(&self, pod: &PodInfo, reason: &'static str, message: &str) -> bool {
        let pod = PodRef { namespace: &pod.namespace, name: &pod.name, uid: &pod.uid };
        self.warn(pod, DENIED_REASON, "GetCredentials", reason, message)
    }

    /// Records that a pod runs on a server node; returns whether an Event is sent.
    pub fn on_server_node(&self, pod: PodRef<'_>, message: &str) -> bool {
        self.warn(pod, ON_SERVER_NODE_REASON, "Scan", "POD_ON_SERVER_NODE", message)
    }

    fn warn(
        &self,
        pod: PodRef<'_>,
        event_reason: &'static str,
        action: &'static str,
        reason: &'static str,
        message: &str,
    ) -> bool {
        if !self.first_in_window(pod.uid, reason) {
            return false;
        }
        let Some(recorder) = self.recorder.clone() else { return true };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.to_string()),
            namespace: Some(pod.namespace.to_string()),
            uid: Some(pod.uid.to_string()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: event_reason.into(),
            note: Some(format!("{reason}: {message}").chars().take(1024).collect()),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot publish denial event");
            }
        });
        true
    }

    fn first_in_window(&self, uid: &str, reason: &'static str) -> bool {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= MAX_REMEMBERED {
            recent.retain(|_, at| now.duration_since(*at) < WINDOW);
        }
        match recent.get(&(uid.to_string(), reason)) {
            Some(at) if now.duration_since(*at) < WINDOW => false,
            _ => {
                recent.insert((uid.to_string(), reason), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: "p".into(),
            node: None,
            ips: vec![],
            service_account: None,
            phase: None,
            role: None,
            external_id: None,
            session_name: None,
        }
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
