//! Pods that name a role, are scheduled to a node, and have no IP yet (their images pulling,
//! their sandbox starting). The pod index holds only pods with an IP; this set is what keeps the
//! sessions the server fetched for these pods ahead of their IP alive until the IP comes (or the
//! pod goes), so the cache's sweep of dead pods does not throw them away and fetch them again. It
//! keeps each pod's description, so that a namespace's new policy and the refresher can judge the
//! pod again. A pod not yet scheduled is not kept: it may never run, and costs no STS call.

use imdsgate_core::PodInfo;
use k8s_openapi::api::core::v1::Pod;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PendingPods {
    pods: Mutex<HashMap<String, PodInfo>>,
}

/// What one watch event did to a pod's place in the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// It is pending (newly or still): its session is wanted.
    Yes,
    /// It was pending and is no longer (it got its IP, finished, lost its role or is being
    /// deleted).
    Left,
    /// It was not pending and is not.
    No,
}

/// Whether `pod` is one the set keeps: a role annotation, scheduled to a node, no IP, not
/// host-network, live ([`imdsgate_core::liveness`]) and not yet running.
pub fn is_pending(pod: &Pod) -> bool {
    let no_ip = pod.status.as_ref().is_none_or(|s| s.pod_ip.as_deref().is_none_or(str::is_empty));
    let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.as_deref().is_some_and(|n| !n.is_empty()));
    no_ip
        && scheduled
        && imdsgate_core::liveness::is_live(pod)
        && pod.spec.as_ref().is_some_and(|s| s.host_network != Some(true))
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_none_or(|p| p == "Pending")
        && imdsgate_core::pod_index::annotation(pod, imdsgate_core::pod_index::ROLE_ANNOTATION).is_some()
}

impl PendingPods {
    /// Records the pod's state from a watch event.
    pub fn apply(&self, pod: &Pod) -> Pending {
        let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else { return Pending::No };
        let mut pods = self.lock();
        if is_pending(pod) {
            pods.insert(uid.to_string(), PodInfo::describe(pod));
            Pending::Yes
        } else if pods.remove(uid).is_some() {
            Pending::Left
        } else {
            Pending::No
        }
    }

    /// Forgets a deleted pod; whether it was pending.
    pub fn delete(&self, pod: &Pod) -> bool {
        pod.metadata.uid.as_deref().is_some_and(|uid| self.lock().remove(uid).is_some())
    }

    /// Replaces the set with the pending pods of a full list; returns the UIDs that were pending
    /// and are not now.
    pub fn reset<'a>(&self, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<String> {
        let now: HashMap<String, PodInfo> = pods
            .into_iter()
            .filter(|p| is_pending(p))
            .filter_map(|p| Some((p.metadata.uid.clone()?, PodInfo::describe(p))))
            .collect();
        let mut kept = self.lock();
        let before: HashSet<&String> = kept.keys().collect();
        let left = before.into_iter().filter(|uid| !now.contains_key(*uid)).cloned().collect();
        *kept = now;
        left
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    /// The pending pod `uid`, as last seen.
    pub fn get(&self, uid: &str) -> Option<PodInfo> {
        self.lock().get(uid).cloned()
    }

    /// The pending pods of `namespaces`, as last seen.
    pub fn in_namespaces(&self, namespaces: &HashSet<&str>) -> Vec<PodInfo> {
        self.lock().values().filter(|p| namespaces.contains(p.namespace.as_str())).cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodInfo>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imdsgate_core::fixtures;

    fn mk_pod(uid: &str, ip: Option<&str>, phase: &str, role: bool) -> Pod {
        let pod = fixtures::pod(uid, uid).ips(ip.as_slice()).phase(phase);
        if role { pod.role("app") } else { pod }.build()
    }

    #[test]
    fn a_role_pod_is_pending_until_its_ip_comes() {
        let pending = PendingPods::default();
        assert_eq!(pending.apply(&mk_pod("u1", None, "Pending", true)), Pending::Yes);
        assert_eq!(pending.apply(&mk_pod("u1", None, "Pending", true)), Pending::Yes);
        assert!(pending.contains("u1"));
        assert_eq!(pending.apply(&mk_pod("u1", Some("10.0.0.1"), "Running", true)), Pending::Left);
        assert!(!pending.contains("u1"));
        // Later updates of the running pod concern the pod index, not this set.
        assert_eq!(pending.apply(&mk_pod("u1", Some("10.0.0.1"), "Running", true)), Pending::No);
    }

    #[test]
    fn pods_without_a_role_host_network_finished_or_deleting_are_not_kept() {
        let pending = PendingPods::default();
        assert_eq!(pending.apply(&mk_pod("plain", None, "Pending", false)), Pending::No);
        let mut host = mk_pod("host", None, "Pending", true);
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(pending.apply(&host), Pending::No);
        assert_eq!(pending.apply(&mk_pod("failed", None, "Failed", true)), Pending::No);
        assert!(["plain", "host", "failed"].iter().all(|uid| !pending.contains(uid)));

        // A pending pod that fails, loses its role, or starts deleting leaves.
        for (gone, reason) in [
            (mk_pod("u", None, "Failed", true), "finished"),
            (mk_pod("u", None, "Pending", false), "role removed"),
            (
                {
                    let mut p = mk_pod("u", None, "Pending", true);
                    p.metadata.deletion_timestamp =
                        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));
                    p
                },
                "deleting",
            ),
        ] {
            assert_eq!(pending.apply(&mk_pod("u", None, "Pending", true)), Pending::Yes);
            assert_eq!(pending.apply(&gone), Pending::Left, "{reason}");
        }
    }

    #[test]
    fn delete_and_reset_say_which_pods_left() {
        let pending = PendingPods::default();
        pending.apply(&mk_pod("a", None, "Pending", true));
        pending.apply(&mk_pod("b", None, "Pending", true));
        assert!(pending.delete(&mk_pod("a", None, "Pending", true)));
        assert!(!pending.delete(&mk_pod("a", None, "Pending", true)));
        pending.apply(&mk_pod("c", None, "Pending", true));
        // A relist: b got its IP while the watch was away, c is still pending, d is new.
        let list = [
            mk_pod("b", Some("10.0.0.2"), "Running", true),
            mk_pod("c", None, "Pending", true),
            mk_pod("d", None, "Pending", true),
        ];
        assert_eq!(pending.reset(list.iter()), ["b"]);
        assert!(pending.contains("c") && pending.contains("d") && !pending.contains("b"));
    }
}
