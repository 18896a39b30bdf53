//! The pod index: every live pod under each IP in `status.podIPs`, fed by a Kubernetes watch through
//! [`PodIndex::apply`], [`PodIndex::delete`] and [`PodIndex::reset`]. Readers never block behind the
//! watch (sharded maps), and a reader may wait, event-driven, for an IP to appear.

use dashmap::DashMap;
use k8s_openapi::api::core::v1::Pod;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Pod annotation naming the role (a role name or a full ARN), as in kiam and kube2iam.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// Pod annotation carrying the STS ExternalId.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// Pod annotation overriding the STS session name.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// The annotation the kubelet puts on the mirror pod of a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the index keeps of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    pub service_account: Option<String>,
    pub phase: Option<String>,
    pub role: Option<String>,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    /// A pod object its node could have written: a mirror pod (the kubelet's copy of a static
    /// pod: [`MIRROR_ANNOTATION`], or an owner reference to a Node). A kubelet may create those in
    /// any namespace with any annotation, so they name no role unless their namespace says so.
    pub node_written: bool,
}

impl PodInfo {
    /// What the index keeps of `pod`, or `None` if the pod must not be indexed: no UID or IP,
    /// `hostNetwork` (its traffic is the node's), or not live ([`crate::liveness`]).
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) || !crate::liveness::is_live(pod) {
            return None;
        }
        let info = PodInfo::describe(pod);
        (meta.uid.is_some() && !info.ips.is_empty()).then_some(info)
    }

    /// What a pod says of itself, whatever its state (no IP yet, finished, a manifest not yet
    /// created): what [`PodInfo::from_pod`] keeps once it has decided the pod is live.
    pub fn describe(pod: &Pod) -> PodInfo {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .chain(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()))
            .collect();
        ips.sort_unstable();
        ips.dedup();
        let annotation = |key: &str| annotation(pod, key).map(str::to_string);
        PodInfo {
            uid: meta.uid.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            ips,
            service_account: spec.and_then(|s| s.service_account_name.clone()),
            phase: status.and_then(|s| s.phase.clone()),
            role: annotation(ROLE_ANNOTATION),
            external_id: annotation(EXTERNAL_ID_ANNOTATION),
            session_name: annotation(SESSION_NAME_ANNOTATION),
            node_written: is_node_written(pod),
        }
    }
}

/// Whether the pod object is one its node could have written (see [`PodInfo::node_written`]):
/// NodeRestriction lets a kubelet create only mirror pods, marked by the annotation and owned by
/// its Node, so either mark is enough to tell.
pub fn is_node_written(pod: &Pod) -> bool {
    let meta = &pod.metadata;
    meta.annotations.as_ref().is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
        || meta.owner_references.iter().flatten().any(|o| o.kind == "Node")
}

/// A pod's annotation, trimmed; `None` when absent or blank.
pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(|v| v.trim()).filter(|v| !v.is_empty())
}

impl PodInfo {
    /// Whether `other` asks for the same credentials: role, ExternalId and session name.
    pub fn same_identity(&self, other: &PodInfo) -> bool {
        self.role == other.role
            && self.external_id == other.external_id
            && self.session_name == other.session_name
            && self.node_written == other.node_written
    }
}

/// What an [`PodIndex::apply`] did, so callers can react (prefetch, drop cached credentials).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The pod was not indexed before and is now.
    Added(Arc<PodInfo>),
    /// The pod was indexed and changed; `identity_changed` says whether what its credentials
    /// depend on did (the role, external-id or session-name annotation).
    Updated { pod: Arc<PodInfo>, identity_changed: bool },
    /// The pod was indexed and no longer is (finished, lost its IP, deleted).
    Removed(Arc<PodInfo>),
    /// Nothing the index keeps changed.
    Unchanged,
}

/// Who claims an IP: see [`PodIndex::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Nobody,
    One(Arc<PodInfo>),
    /// More than one live pod (only while an IP is being reused).
    Several,
}

/// Live pods by IP and by UID.
#[derive(Default)]
pub struct PodIndex {
    by_uid: DashMap<String, Arc<PodInfo>>,
    by_ip: DashMap<IpAddr, Vec<Arc<PodInfo>>>,
    /// Requests waiting for an IP to appear, woken only by changes to that IP.
    waiters: DashMap<IpAddr, Arc<Notify>>,
}

impl PodIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Indexes (or re-indexes, or removes) a pod as the watch last saw it.
    pub fn apply(&self, pod: &Pod) -> Change {
        match PodInfo::from_pod(pod) {
            Some(info) => self.insert(info),
            None => match pod.metadata.uid.as_deref() {
                Some(uid) => self.remove_uid(uid),
                None => Change::Unchanged,
            },
        }
    }

    /// Removes a pod the watch saw deleted.
    pub fn delete(&self, pod: &Pod) -> Change {
        match pod.metadata.uid.as_deref() {
            Some(uid) => self.remove_uid(uid),
            None => Change::Unchanged,
        }
    }

    /// Replaces the whole index with `pods` (a relist); returns the pods that left it.
    pub fn reset<'a>(&self, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<Change> {
        let fresh: Vec<PodInfo> = pods.into_iter().filter_map(PodInfo::from_pod).collect();
        let keep: std::collections::HashSet<&str> = fresh.iter().map(|p| p.uid.as_str()).collect();
        let gone: Vec<String> = self
            .by_uid
            .iter()
            .filter(|e| !keep.contains(e.key().as_str()))
            .map(|e| e.key().clone())
            .collect();
        let mut changes: Vec<Change> = gone.iter().map(|uid| self.remove_uid(uid)).collect();
        changes.extend(fresh.into_iter().map(|info| self.insert(info)));
        changes
    }

    /// The live pods that claim `ip` (more than one only while an IP is being reused).
    pub fn by_ip(&self, ip: &IpAddr) -> Vec<Arc<PodInfo>> {
        self.by_ip.get(ip).map(|pods| pods.clone()).unwrap_or_default()
    }

    /// Who claims `ip`, without copying the claimants (the hot path: one hash lookup, one `Arc`
    /// clone, no allocation).
    pub fn claim(&self, ip: &IpAddr) -> Claim {
        match self.by_ip.get(ip).as_deref().map(Vec::as_slice) {
            None | Some([]) => Claim::Nobody,
            Some([pod]) => Claim::One(pod.clone()),
            Some(_) => Claim::Several,
        }
    }

    /// Whether some live pod claims `ip` (no copy of the claimants, for the hot path).
    pub fn knows_ip(&self, ip: &IpAddr) -> bool {
        self.by_ip.contains_key(ip)
    }

    /// The pod with this UID, if live.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.by_uid.get(uid).map(|p| p.clone())
    }

    /// Every indexed pod (a snapshot).
    pub fn pods(&self) -> Vec<Arc<PodInfo>> {
        self.by_uid.iter().map(|e| e.value().clone()).collect()
    }

    /// Number of indexed pods.
    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    /// The pods at `ip`, waiting up to `timeout` for the watch to deliver one if there is none yet.
    /// Returns as soon as a pod arrives; no polling.
    pub async fn wait_for_ip(&self, ip: &IpAddr, timeout: Duration) -> Vec<Arc<PodInfo>> {
        self.wait_at(ip, timeout, |pods| Some(pods).filter(|pods| !pods.is_empty())).await.unwrap_or_default()
    }

    /// The pod with `uid` at `ip`, waiting up to `timeout` for the watch to deliver it.
    pub async fn wait_for_pod(&self, ip: &IpAddr, uid: &str, timeout: Duration) -> Option<Arc<PodInfo>> {
        self.wait_at(ip, timeout, |pods| pods.into_iter().find(|p| p.uid == uid)).await
    }

    /// Evaluates `found` on the pods at `ip` now and after every change at that IP, until it yields
    /// something or `timeout` passes. Event-driven, and only this IP's changes wake the waiter (a
    /// start storm of hundreds of pods does not wake every waiting request for every pod).
    async fn wait_at<T>(
        &self,
        ip: &IpAddr,
        timeout: Duration,
        found: impl Fn(Vec<Arc<PodInfo>>) -> Option<T>,
    ) -> Option<T> {
        // The common case, a pod already known, registers no waiter.
        if let Some(hit) = found(self.by_ip(ip)) {
            return Some(hit);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let notify = self.waiters.entry(*ip).or_default().clone();
        let outcome = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(hit) = found(self.by_ip(ip)) {
                break Some(hit);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break found(self.by_ip(ip));
            }
        };
        drop(notify);
        // The last waiter for this IP removes its entry (the map holds one reference).
        self.waiters.remove_if(ip, |_, n| Arc::strong_count(n) == 1);
        outcome
    }

    fn insert(&self, info: PodInfo) -> Change {
        let info = Arc::new(info);
        let previous = self.by_uid.insert(info.uid.clone(), info.clone());
        if let Some(old) = &previous {
            for ip in old.ips.iter().filter(|ip| !info.ips.contains(ip)) {
                self.unlink(ip, &old.uid);
            }
        }
        for ip in &info.ips {
            let mut pods = self.by_ip.entry(*ip).or_default();
            pods.retain(|p| p.uid != info.uid);
            pods.push(info.clone());
        }
        let change = match previous {
            None => Change::Added(info),
            Some(old) if *old == *info => Change::Unchanged,
            Some(old) => Change::Updated { identity_changed: !old.same_identity(&info), pod: info },
        };
        if !matches!(change, Change::Unchanged) {
            let pod = match &change {
                Change::Added(pod) | Change::Updated { pod, .. } => pod,
                _ => unreachable!("only additions and updates reach here"),
            };
            for ip in &pod.ips {
                if let Some(notify) = self.waiters.get(ip) {
                    notify.notify_waiters();
                }
            }
        }
        change
    }

    fn remove_uid(&self, uid: &str) -> Change {
        match self.by_uid.remove(uid) {
            Some((_, old)) => {
                for ip in &old.ips {
                    self.unlink(ip, uid);
                }
                Change::Removed(old)
            }
            None => Change::Unchanged,
        }
    }

    fn unlink(&self, ip: &IpAddr, uid: &str) {
        self.by_ip.remove_if_mut(ip, |_, pods| {
            pods.retain(|p| p.uid != uid);
            pods.is_empty()
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fixtures;

    /// A pod as the apiserver would send it.
    pub fn mk_pod(uid: &str, name: &str, ips: &[&str], phase: &str, role: Option<&str>) -> Pod {
        let pod = crate::fixtures::pod(uid, name).ips(ips).phase(phase);
        role.map_or(pod.clone(), |role| pod.role(role)).build()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn uids(pods: &[Arc<PodInfo>]) -> Vec<&str> {
        pods.iter().map(|p| p.uid.as_str()).collect()
    }

    #[test]
    fn indexes_every_pod_ip() {
        let index = PodIndex::new();
        let change = index.apply(&mk_pod("u1", "web", &["10.0.0.1", "fd00::1"], "Running", Some("app")));
        assert!(matches!(change, Change::Added(_)));
        assert_eq!(uids(&index.by_ip(&ip("10.0.0.1"))), ["u1"]);
        assert_eq!(uids(&index.by_ip(&ip("fd00::1"))), ["u1"]);
        assert!(index.knows_ip(&ip("fd00::1")) && !index.knows_ip(&ip("10.0.0.2")));
        let pod = index.by_uid("u1").unwrap();
        assert_eq!(pod.role.as_deref(), Some("app"));
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("team", "web"));
    }

    #[test]
    fn skips_host_network_finished_and_ipless_pods() {
        let index = PodIndex::new();
        let mut host = mk_pod("u1", "h", &["10.0.0.1"], "Running", Some("app"));
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(index.apply(&host), Change::Unchanged);
        assert_eq!(index.apply(&mk_pod("u2", "done", &["10.0.0.2"], "Succeeded", None)), Change::Unchanged);
        assert_eq!(index.apply(&mk_pod("u3", "failed", &["10.0.0.3"], "Failed", None)), Change::Unchanged);
        assert_eq!(index.apply(&mk_pod("u4", "pending", &[], "Pending", None)), Change::Unchanged);
        assert!(index.is_empty());
    }

    #[test]
    fn a_mirror_pod_is_known_by_its_annotation_or_its_node_owner() {
        let describe = |pod: Pod| PodInfo::describe(&pod).node_written;
        assert!(describe(fixtures::pod("u", "static-web").mirror().build()));
        assert!(!describe(fixtures::pod("u", "web").build()));
        let annotated = fixtures::pod("u", "a").annotation(MIRROR_ANNOTATION, "x").build();
        assert!(describe(annotated));
        let mut owned = fixtures::pod("u", "o").mirror().build();
        owned.metadata.annotations.as_mut().unwrap().remove(MIRROR_ANNOTATION);
        assert!(describe(owned), "a Node owner is enough");
        let mut by_replicaset = fixtures::pod("u", "r").mirror().build();
        by_replicaset.metadata.annotations.as_mut().unwrap().remove(MIRROR_ANNOTATION);
        by_replicaset.metadata.owner_references.as_mut().unwrap()[0].kind = "ReplicaSet".into();
        assert!(!describe(by_replicaset));
    }

    #[test]
    fn a_terminating_pod_leaves_the_index_at_once() {
        let index = PodIndex::new();
        index.apply(&mk_pod("u1", "web", &["10.0.0.1"], "Running", Some("app")));
        // Deleted with a finalizer pending (or within its grace period): still Running, but going.
        let going = fixtures::pod("u1", "web").ip("10.0.0.1").role("app").deleting().build();
        assert!(matches!(index.apply(&going), Change::Removed(p) if p.uid == "u1"));
        assert!(index.by_ip(&ip("10.0.0.1")).is_empty());
        assert!(index.by_uid("u1").is_none());
        // A relist that still shows it terminating does not bring it back.
        index.reset([&going]);
        assert!(index.is_empty());
    }

    #[test]
    fn a_run_once_pod_whose_containers_all_ended_leaves_the_index_before_its_phase_says_so() {
        let index = PodIndex::new();
        let job = |ended: &[bool]| {
            fixtures::pod("u1", "job")
                .ip("10.0.0.1")
                .role("app")
                .spec_field("restartPolicy", "Never".into())
                .containers_terminated(ended)
                .build()
        };
        index.apply(&job(&[false]));
        assert_eq!(index.apply(&job(&[true, false])), Change::Unchanged, "one container still runs");
        assert!(matches!(index.apply(&job(&[true])), Change::Removed(_)));
        // A pod that restarts its containers keeps its IP through a crash: it stays.
        let service =
            fixtures::pod("u2", "svc").ip("10.0.0.2").role("app").containers_terminated(&[true]).build();
        assert!(matches!(index.apply(&service), Change::Added(_)));
    }

    #[test]
    fn a_pod_that_finishes_leaves_the_index() {
        let index = PodIndex::new();
        index.apply(&mk_pod("u1", "job", &["10.0.0.1"], "Running", None));
        assert!(matches!(
            index.apply(&mk_pod("u1", "job", &["10.0.0.1"], "Succeeded", None)),
            Change::Removed(_)
        ));
        assert!(index.by_ip(&ip("10.0.0.1")).is_empty());
    }

    #[test]
    fn ip_change_moves_the_pod() {
        let index = PodIndex::new();
        index.apply(&mk_pod("u1", "web", &["10.0.0.1"], "Running", None));
        index.apply(&mk_pod("u1", "web", &["10.0.0.2"], "Running", None));
        assert!(index.by_ip(&ip("10.0.0.1")).is_empty());
        assert_eq!(uids(&index.by_ip(&ip("10.0.0.2"))), ["u1"]);
    }

    #[test]
    fn identity_changes_are_reported() {
        let index = PodIndex::new();
        index.apply(&mk_pod("u1", "web", &["10.0.0.1"], "Running", Some("a")));
        match index.apply(&mk_pod("u1", "web", &["10.0.0.1"], "Running", Some("b"))) {
            Change::Updated { identity_changed, pod } => {
                assert!(identity_changed);
                assert_eq!(pod.role.as_deref(), Some("b"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(index.apply(&mk_pod("u1", "web", &["10.0.0.1"], "Running", Some("b"))), Change::Unchanged);
        let mut renamed = mk_pod("u1", "web", &["10.0.0.1"], "Running", Some("b"));
        renamed.metadata.annotations.as_mut().unwrap().insert(SESSION_NAME_ANNOTATION.into(), "x".into());
        assert!(matches!(index.apply(&renamed), Change::Updated { identity_changed: true, .. }));
        let mut other_phase = renamed.clone();
        other_phase.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(matches!(index.apply(&other_phase), Change::Updated { identity_changed: false, .. }));
    }

    #[test]
    fn ip_reuse_keeps_both_claimants_until_the_old_one_goes() {
        let index = PodIndex::new();
        index.apply(&mk_pod("old", "a", &["10.0.0.1"], "Running", Some("a")));
        index.apply(&mk_pod("new", "b", &["10.0.0.1"], "Running", Some("b")));
        assert_eq!(uids(&index.by_ip(&ip("10.0.0.1"))), ["old", "new"]);
        assert_eq!(index.claim(&ip("10.0.0.1")), Claim::Several);
        index.delete(&mk_pod("old", "a", &["10.0.0.1"], "Running", Some("a")));
        assert_eq!(uids(&index.by_ip(&ip("10.0.0.1"))), ["new"]);
        assert!(matches!(index.claim(&ip("10.0.0.1")), Claim::One(p) if p.uid == "new"));
        index.delete(&mk_pod("new", "b", &["10.0.0.1"], "Running", Some("b")));
        assert_eq!(index.claim(&ip("10.0.0.1")), Claim::Nobody);
    }

    #[test]
    fn reset_replaces_everything() {
        let index = PodIndex::new();
        index.apply(&mk_pod("u1", "a", &["10.0.0.1"], "Running", None));
        index.apply(&mk_pod("u2", "b", &["10.0.0.2"], "Running", None));
        let fresh = [
            mk_pod("u2", "b", &["10.0.0.2"], "Running", None),
            mk_pod("u3", "c", &["10.0.0.3"], "Running", None),
        ];
        let changes = index.reset(fresh.iter());
        assert!(changes.iter().any(|c| matches!(c, Change::Removed(p) if p.uid == "u1")));
        assert!(index.by_ip(&ip("10.0.0.1")).is_empty());
        assert_eq!(index.len(), 2);
        assert_eq!(uids(&index.by_ip(&ip("10.0.0.3"))), ["u3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_an_ip_returns_when_the_pod_arrives() {
        let index = Arc::new(PodIndex::new());
        let waiter = {
            let index = index.clone();
            tokio::spawn(async move { index.wait_for_ip(&ip("10.0.0.9"), Duration::from_secs(2)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        index.apply(&mk_pod("u9", "late", &["10.0.0.9"], "Running", None));
        let started = tokio::time::Instant::now();
        let pods = waiter.await.unwrap();
        assert_eq!(uids(&pods), ["u9"]);
        assert!(started.elapsed() < Duration::from_millis(10), "answered on arrival, not at the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_pod_ignores_the_previous_owner_of_its_ip() {
        let index = Arc::new(PodIndex::new());
        index.apply(&mk_pod("old", "a", &["10.0.0.9"], "Running", None));
        let waiter = {
            let index = index.clone();
            tokio::spawn(
                async move { index.wait_for_pod(&ip("10.0.0.9"), "new", Duration::from_secs(2)).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        index.apply(&mk_pod("new", "b", &["10.0.0.9"], "Running", None));
        assert_eq!(waiter.await.unwrap().map(|p| p.uid.clone()).as_deref(), Some("new"));
        assert!(index.wait_for_pod(&ip("10.0.0.9"), "ghost", Duration::from_secs(1)).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_an_ip_gives_up_at_the_deadline() {
        let index = PodIndex::new();
        index.apply(&mk_pod("u1", "other", &["10.0.0.1"], "Running", None));
        let pods = index.wait_for_ip(&ip("10.0.0.9"), Duration::from_secs(2)).await;
        assert!(pods.is_empty());
    }
}
