//! Kubernetes objects for tests, as the apiserver would send them, shared by every crate's tests
//! (feature `fixtures`, on for the workspace's dev-dependencies): a pod, a namespace and a node,
//! each a builder with sensible defaults so a test names only what it is about.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Map, Value, json};

/// A pod `team/<name>` with UID `uid`, Running on `node-a` with ServiceAccount `app`, no IP and
/// no annotation until given.
pub fn pod(uid: &str, name: &str) -> PodBuilder {
    PodBuilder(json!({
        "metadata": { "uid": uid, "name": name, "namespace": "team", "annotations": {} },
        "spec": { "nodeName": "node-a", "serviceAccountName": "app", "containers": [] },
        "status": { "phase": "Running" },
    }))
}

/// See [`pod`].
#[derive(Clone, Debug)]
pub struct PodBuilder(Value);

impl PodBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.0["metadata"]["namespace"] = json!(namespace);
        self
    }

    /// `spec.nodeName`; `None` for a pod not yet scheduled.
    pub fn node(mut self, node: Option<&str>) -> Self {
        match node {
            Some(node) => self.0["spec"]["nodeName"] = json!(node),
            None => {
                self.spec().remove("nodeName");
            }
        }
        self
    }

    /// `status.podIP` (the first) and `status.podIPs`.
    pub fn ips(mut self, ips: &[&str]) -> Self {
        let status = self.0["status"].as_object_mut().expect("status");
        match ips.first() {
            Some(first) => {
                status.insert("podIP".into(), json!(first));
                status.insert("podIPs".into(), ips.iter().map(|ip| json!({ "ip": ip })).collect());
            }
            None => {
                status.remove("podIP");
                status.remove("podIPs");
            }
        }
        self
    }

    pub fn ip(self, ip: &str) -> Self {
        self.ips(&[ip])
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.0["status"]["phase"] = json!(phase);
        self
    }

    /// The role annotation (`iam.amazonaws.com/role`).
    pub fn role(self, role: &str) -> Self {
        self.annotation(crate::pod_index::ROLE_ANNOTATION, role)
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0["metadata"]["annotations"][key] = json!(value);
        self
    }

    pub fn host_network(mut self) -> Self {
        self.0["spec"]["hostNetwork"] = json!(true);
        self
    }

    /// A mirror pod, as the kubelet writes one for a static pod: the mirror annotation and its
    /// node as owner.
    pub fn mirror(mut self) -> Self {
        let node = self.0["spec"]["nodeName"].as_str().unwrap_or("node-a").to_string();
        self.0["metadata"]["annotations"][crate::pod_index::MIRROR_ANNOTATION] = json!("0123abcd");
        self.0["metadata"]["ownerReferences"] = json!([{ "apiVersion": "v1", "kind": "Node", "name": node, "uid": "node-uid", "controller": true }]);
        self
    }

    /// `metadata.deletionTimestamp` set: the pod is being deleted.
    pub fn deleting(mut self) -> Self {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        self.0["metadata"]["deletionTimestamp"] = serde_json::to_value(now).expect("time");
        self
    }

    /// `status.containerStatuses`: one container per entry, terminated or running.
    pub fn containers_terminated(mut self, terminated: &[bool]) -> Self {
        let statuses: Vec<Value> = terminated
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let state = if t { json!({ "terminated": { "exitCode": 0 } }) } else { json!({ "running": {} }) };
                json!({ "name": format!("c{i}"), "image": "i", "imageID": "", "ready": !t, "restartCount": 0, "state": state })
            })
            .collect();
        self.0["status"]["containerStatuses"] = json!(statuses);
        self
    }

    /// Any other part of the spec, e.g. `("tolerations", json!([...]))`.
    pub fn spec_field(mut self, key: &str, value: Value) -> Self {
        self.spec().insert(key.into(), value);
        self
    }

    pub fn build(self) -> Pod {
        serde_json::from_value(self.0).expect("a valid pod")
    }

    fn spec(&mut self) -> &mut Map<String, Value> {
        self.0["spec"].as_object_mut().expect("spec")
    }
}

/// A namespace with these annotations (e.g. `iam.amazonaws.com/permitted`).
pub fn namespace(name: &str, annotations: &[(&str, &str)]) -> Namespace {
    let annotations: Map<String, Value> =
        annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    serde_json::from_value(json!({ "metadata": { "name": name, "annotations": annotations } }))
        .expect("a valid namespace")
}

/// A node with these labels.
pub fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    let labels: Map<String, Value> = labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).expect("a valid node")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_says_what_it_was_given() {
        let p = pod("u1", "web").namespace("shop").ip("10.0.0.1").role("app").deleting().build();
        let info = crate::PodInfo::describe(&p);
        assert_eq!((info.uid.as_str(), info.namespace.as_str(), info.name.as_str()), ("u1", "shop", "web"));
        assert_eq!(info.ips, vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(info.role.as_deref(), Some("app"));
        assert!(p.metadata.deletion_timestamp.is_some());
        assert_eq!(pod("u", "n").node(None).build().spec.unwrap().node_name, None);
    }
}
