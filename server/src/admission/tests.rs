//! Tests of the webhook as the apiserver calls it: AdmissionReview bodies, verdicts, warn mode,
//! updates, and pods pinned or bound to nodes the webhook looks up.

use super::*;
use crate::admission::placement::parse_selector;
use crate::authz::namespace_index::NamespaceIndex;
use crate::authz::session::TagConfig;
use imdsgate_core::PodIndex;
use serde_json::json;

fn admission() -> Admission {
    let namespaces = Arc::new(NamespaceIndex::new());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": "team", "annotations": {
        "iam.amazonaws.com/permitted": "arn:aws:iam::123456789012:role/app-.*" } } }))
    .unwrap();
    namespaces.apply(&ns);
    Admission {
        config: AdmissionConfig {
            mode: WebhookMode::Enforce,
            server_node_labels: parse_selector("imdsgate.io/server-node=true").unwrap(),
            server_taint: "imdsgate.io/server-node:NoSchedule".parse().unwrap(),
            allow_host_network: false,
            host_network_exempt_label: None,
            exempt_namespaces: ["kube-system".to_string()].into(),
        },
        authorizer: Arc::new(Authorizer {
            pods: Arc::new(PodIndex::new()),
            namespaces,
            base_arn: crate::authz::fixtures::base_arn(),
            tags: TagConfig::default(),
        }),
        client: None,
        metrics: crate::metrics::Metrics::new(),
    }
}

fn review_body(kind: &str, namespace: &str, object: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": kind },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "alice" },
            "object": object,
            "dryRun": false
        }
    }))
    .unwrap()
}

fn response(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
    serde_json::to_value(review).unwrap()["response"].clone()
}

#[tokio::test]
async fn malformed_bodies_are_errors_not_panics() {
    let a = admission();
    let foreign = serde_json::to_vec(&json!({
        "apiVersion": "x", "kind": "y",
        "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "t",
            "operation": "CREATE", "userInfo": {}, "object": null}
    }))
    .unwrap();
    for body in [&b""[..], b"{", b"null", b"{\"kind\":\"AdmissionReview\"}", &[0xff, 0xfe][..], &foreign] {
        assert!(a.review(body).await.is_err(), "{:?}", String::from_utf8_lossy(body));
    }
}

#[tokio::test]
async fn a_pod_review_without_the_pod_is_refused_with_its_uid() {
    let a = admission();
    let r = response(&a.review(&review_body("Pod", "team", serde_json::Value::Null)).await.unwrap());
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002", "the apiserver matches answers by uid: {r}");
}

#[tokio::test]
async fn unknown_kinds_are_allowed_with_a_warning() {
    let a = admission();
    let body = review_body(
        "ConfigMap",
        "team",
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
    );
    let r = response(&a.review(&body).await.unwrap());
    assert_eq!(r["allowed"], true);
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert!(r["warnings"][0].as_str().unwrap().contains("ConfigMap"));
}

#[tokio::test]
async fn decisions_come_back_in_the_review() {
    let a = admission();
    let pod = |role: &str| {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "annotations": { "iam.amazonaws.com/role": role } },
                "spec": { "containers": [{ "name": "c", "image": "i" }] } })
    };
    let ok = response(&a.review(&review_body("Pod", "team", pod("app-reader"))).await.unwrap());
    assert_eq!(ok["allowed"], true);
    let denied = response(&a.review(&review_body("Pod", "team", pod("admin"))).await.unwrap());
    assert_eq!(denied["allowed"], false);
    assert!(denied["status"]["message"].as_str().unwrap().contains("does not permit role"), "{denied}");
    let exempt = response(&a.review(&review_body("Pod", "kube-system", pod("admin"))).await.unwrap());
    assert_eq!(exempt["allowed"], true);
    let unknown_ns = response(&a.review(&review_body("Pod", "elsewhere", pod("app-reader"))).await.unwrap());
    assert_eq!(unknown_ns["allowed"], false, "a namespace nobody can read permits nothing");
}

#[tokio::test]
async fn session_name_overrides_that_would_not_reach_cloudtrail_as_written_are_refused() {
    let a = admission();
    let pod = |name: &str| {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "annotations": {
                    "iam.amazonaws.com/role": "app-reader", "iam.amazonaws.com/session-name": name } },
                "spec": { "containers": [{ "name": "c", "image": "i" }] } })
    };
    let ok = response(&a.review(&review_body("Pod", "team", pod("batch"))).await.unwrap());
    assert_eq!(ok["allowed"], true);
    for bad in ["victim\nINFO credentials issued", "a b", &"x".repeat(60)] {
        let denied = response(&a.review(&review_body("Pod", "team", pod(bad))).await.unwrap());
        assert_eq!(denied["allowed"], false, "{bad:?}");
        let message = denied["status"]["message"].as_str().unwrap();
        assert!(message.contains("session-name") && message.contains("team@<name>"), "{message}");
    }
}

#[tokio::test]
async fn warn_mode_admits_with_a_warning_and_counts_it() {
    let mut a = admission();
    a.config.mode = WebhookMode::Warn;
    let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "annotations": { "iam.amazonaws.com/role": "admin" } },
                      "spec": { "containers": [{ "name": "c", "image": "i" }] } });
    let r = response(&a.review(&review_body("Pod", "team", pod)).await.unwrap());
    assert_eq!(r["allowed"], true);
    let warning = r["warnings"][0].as_str().unwrap();
    assert!(
        warning.starts_with("imdsgate (warn mode) would refuse") && warning.contains("does not permit role"),
        "{warning}"
    );
    let warned =
        crate::metrics::AdmissionLabels { decision: "warned".into(), reason: "role_not_permitted".into() };
    assert_eq!(a.metrics.admissions.get_or_create(&warned).get(), 1);
}

#[tokio::test]
async fn roles_that_need_an_undetected_base_arn_are_admitted_with_a_warning() {
    let mut a = admission();
    let authorizer = Authorizer {
        pods: a.authorizer.pods.clone(),
        namespaces: a.authorizer.namespaces.clone(),
        base_arn: crate::authz::role_base::RoleBase::detecting(),
        tags: TagConfig::default(),
    };
    authorizer.base_arn.failed("GetCallerIdentity failed: no credentials".into());
    a.authorizer = Arc::new(authorizer);
    let pod = |role: &str| {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "annotations": { "iam.amazonaws.com/role": role } },
                "spec": { "containers": [{ "name": "c", "image": "i" }] } })
    };
    // A name needs the base: not checked, admitted, and said so.
    let r = response(&a.review(&review_body("Pod", "team", pod("admin"))).await.unwrap());
    assert_eq!(r["allowed"], true, "{r}");
    let warning = r["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("\"admin\" was not checked")
            && warning.contains("has not yet determined its role base ARN")
            && warning.contains("no credentials"),
        "{warning}"
    );
    let unchecked =
        crate::metrics::AdmissionLabels { decision: "allowed".into(), reason: "role_unchecked".into() };
    assert_eq!(a.metrics.admissions.get_or_create(&unchecked).get(), 1);
    // What needs no base is still decided: a full ARN the namespace does not permit.
    let r = response(
        &a.review(&review_body("Pod", "team", pod("arn:aws:iam::123456789012:role/admin"))).await.unwrap(),
    );
    assert_eq!(r["allowed"], false, "{r}");
    // Once detected, names are checked again.
    assert!(
        a.authorizer
            .base_arn
            .detected(imdsgate_core::role::BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap())
    );
    let r = response(&a.review(&review_body("Pod", "team", pod("admin"))).await.unwrap());
    assert_eq!(r["allowed"], false, "{r}");
    let r = response(&a.review(&review_body("Pod", "team", pod("app-reader"))).await.unwrap());
    assert_eq!((r["allowed"].clone(), r["warnings"].clone()), (json!(true), serde_json::Value::Null), "{r}");
}

#[tokio::test]
async fn an_update_is_judged_on_what_it_changes() {
    let a = admission();
    let pod = |role: &str, node: &str| -> Pod {
        serde_json::from_value(json!({ "metadata": { "name": "p", "annotations": { "iam.amazonaws.com/role": role } },
                                       "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "i" }] } }))
        .unwrap()
    };
    // The namespace no longer permits admin, and node-x cannot be read (no client): created
    // like this, the pod is refused...
    assert!(matches!(a.decide("team", &pod("admin", "node-x")).await, Verdict::Deny(..)));
    // ...but a pod that already runs so can still be updated (its finalizer removed, say).
    let old = pod("admin", "node-x");
    assert_eq!(a.decide_change("team", &pod("admin", "node-x"), Some(&old)).await, Verdict::Allow);
    // Changing the role is judged.
    assert!(matches!(
        a.decide_change("team", &pod("root", "node-x"), Some(&old)).await,
        Verdict::Deny(DenyReason::RoleNotPermitted, _)
    ));
}

/// Nothing a hostNetwork pod's UPDATE did not change is held against it: pods that predate
/// imdsgate or came through an exemption can still be relabelled or lose a finalizer; giving one a
/// role is judged.
#[tokio::test]
async fn an_update_of_a_host_network_pod_is_refused_only_for_what_it_changes() {
    let a = admission();
    let host =
        |label: &str| imdsgate_core::fixtures::pod("u", "exporter").host_network().annotation("x", label);
    let old = host("1").build();
    assert!(matches!(a.decide("team", &old).await, Verdict::Deny(DenyReason::HostNetwork, _)));
    assert_eq!(a.decide_change("team", &host("2").build(), Some(&old)).await, Verdict::Allow);
    let with_role = host("1").role("app-reader").build();
    assert!(matches!(
        a.decide_change("team", &with_role, Some(&old)).await,
        Verdict::Deny(DenyReason::HostNetworkWithRole, _)
    ));
    let old_with_role = with_role.clone();
    assert_eq!(a.decide_change("team", &with_role, Some(&old_with_role)).await, Verdict::Allow);
    // A refusal the old pod already had cannot hide one the update brings: an unscheduled
    // hostNetwork pod that gains a toleration of the server taint could be scheduled there.
    let unscheduled = |tolerant: bool| {
        let pod = imdsgate_core::fixtures::pod("u", "exporter").host_network().node(None);
        let tolerations = if tolerant {
            serde_json::json!([{ "key": "imdsgate.io/server-node", "operator": "Exists", "effect": "NoSchedule" }])
        } else {
            serde_json::json!([])
        };
        pod.spec_field("tolerations", tolerations).build()
    };
    assert!(matches!(
        a.decide_change("team", &unscheduled(true), Some(&unscheduled(false))).await,
        Verdict::Deny(DenyReason::ServerTaintToleration, _)
    ));
}

/// A mirror pod (what a kubelet writes for a static pod, in any namespace, with any annotation)
/// names no role unless its namespace allows it; other pods of the namespace are not affected.
#[tokio::test]
async fn a_mirror_pod_with_a_role_is_refused_unless_its_namespace_allows_it() {
    let a = admission();
    // Judged on the role alone: no node to look up (the test has no apiserver).
    let mirror =
        imdsgate_core::fixtures::pod("u", "static-web").role("app-reader").mirror().node(None).build();
    match a.decide("team", &mirror).await {
        Verdict::Deny(DenyReason::MirrorPodRole, message) => {
            assert!(message.contains("imdsgate.io/allow-mirror-pod-roles"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let plain = imdsgate_core::fixtures::pod("u2", "web").role("app-reader").node(None).build();
    assert_eq!(a.decide("team", &plain).await, Verdict::Allow);
    let no_role = imdsgate_core::fixtures::pod("u3", "static-proxy").mirror().node(None).build();
    assert_eq!(a.decide("team", &no_role).await, Verdict::Allow, "a mirror pod without a role is no concern");
    a.authorizer.namespaces.apply(&imdsgate_core::fixtures::namespace(
        "team",
        &[
            ("iam.amazonaws.com/permitted", "arn:aws:iam::123456789012:role/app-.*"),
            (crate::authz::namespace_index::MIRROR_PODS_ANNOTATION, "true"),
        ],
    ));
    assert_eq!(a.decide("team", &mirror).await, Verdict::Allow);
}

/// A namespace the watch has not delivered yet is read for the one decision, never written into
/// the index the authorizer decides from: only the watch writes it, in order, so an old read can
/// neither undo a narrowed policy nor bring back a deleted namespace.
#[tokio::test]
async fn a_namespace_read_for_one_decision_is_never_written_to_the_index() {
    let a = with_nodes(admission());
    let pod =
        imdsgate_core::fixtures::pod("u", "web").namespace("fresh").role("app-reader").node(None).build();
    assert_eq!(a.decide("fresh", &pod).await, Verdict::Allow, "judged by what was read");
    assert!(!a.authorizer.namespaces.contains("fresh"), "the read left the index alone");
    let denied = imdsgate_core::fixtures::pod("u", "web").namespace("fresh").role("admin").node(None).build();
    assert!(matches!(a.decide("fresh", &denied).await, Verdict::Deny(DenyReason::RoleNotPermitted, _)));
}

/// An apiserver that knows two nodes, `worker-1` and the server node `server-1`, and
/// answers every other read of a node with 404; `broken-1` with a 500; and the namespace `fresh`.
fn with_nodes(mut a: Admission) -> Admission {
    let service = imdsgate_core::http_server::service_fn(
        |req: http::Request<kube::client::Body>| async move {
            let node = |name: &str, labels: serde_json::Value| json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name, "labels": labels } });
            let path = req.uri().path();
            let (status, body) = match path.strip_prefix("/api/v1/nodes/") {
                // A namespace the watch has not delivered yet, permitting app roles.
                None if path == "/api/v1/namespaces/fresh" => (
                    200,
                    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "fresh",
                        "annotations": { "iam.amazonaws.com/permitted": "arn:aws:iam::123456789012:role/app-.*" } } }),
                ),
                Some("worker-1") => (200, node("worker-1", json!({ "kubernetes.io/hostname": "worker-1" }))),
                Some("server-1") => (200, node("server-1", json!({ "imdsgate.io/server-node": "true" }))),
                Some("broken-1") => (
                    500,
                    json!({ "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 500,
                        "reason": "InternalError", "message": "etcdserver: request timed out" }),
                ),
                other => (
                    404,
                    json!({ "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 404,
                        "reason": "NotFound", "message": format!("nodes {other:?} not found") }),
                ),
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                    .unwrap(),
            )
        },
    );
    a.client = Some(kube::Client::new(service, "default"));
    a
}

/// A pod as the DaemonSet controller makes it: owned by a DaemonSet, tolerating every taint,
/// pinned to `node` by `matchFields metadata.name`.
fn daemon_pod(node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": "exporter-x7k2p", "ownerReferences": [{ "apiVersion": "apps/v1",
            "kind": "DaemonSet", "name": "exporter", "uid": "0b5c1a4e-1d0e-4a55-9a3e-4a7d6f1c2b3a",
            "controller": true, "blockOwnerDeletion": true }] },
        "spec": {
            "containers": [{ "name": "c", "image": "i" }],
            "tolerations": [{ "operator": "Exists" },
                            { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute" }],
            "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                { "matchFields": [{ "key": "metadata.name", "operator": "In", "values": [node] }] }
            ] } } }
        }
    }))
    .unwrap()
}

fn deny_reason(v: Verdict) -> Option<DenyReason> {
    match v {
        Verdict::Deny(r, _) => Some(r),
        _ => None,
    }
}

#[tokio::test]
async fn a_daemonset_pod_that_tolerates_everything_is_judged_by_the_node_it_is_pinned_to() {
    let a = with_nodes(admission());
    assert_eq!(a.decide("team", &daemon_pod("worker-1")).await, Verdict::Allow, "an ordinary node");

    let Verdict::Deny(DenyReason::ServerNodeAffinity, message) =
        a.decide("team", &daemon_pod("server-1")).await
    else {
        panic!("a server node")
    };
    assert!(
        message.contains("\"server-1\"")
            && message.contains("imdsgate.io/server-node DoesNotExist")
            && message.contains("--webhook-exempt-namespaces"),
        "{message}"
    );

    // A node the apiserver does not know could join as a server node; one it cannot read
    // could be one: both fail closed, with what went wrong.
    let Verdict::Deny(DenyReason::UnknownNode, message) = a.decide("team", &daemon_pod("future-1")).await
    else {
        panic!("an unknown node")
    };
    assert!(message.contains("\"future-1\"") && message.contains("does not exist"), "{message}");
    let Verdict::Deny(DenyReason::UnknownNode, message) = a.decide("team", &daemon_pod("broken-1")).await
    else {
        panic!("an unreadable node")
    };
    assert!(message.contains("cannot read the node") && message.contains("try again"), "{message}");

    // The pin lifts only the toleration: everything else is judged as for any pod.
    let mut role = daemon_pod("worker-1");
    role.metadata.annotations = Some([("iam.amazonaws.com/role".to_string(), "admin".to_string())].into());
    assert_eq!(deny_reason(a.decide("team", &role).await), Some(DenyReason::RoleNotPermitted));
    let mut host = daemon_pod("worker-1");
    host.spec.as_mut().unwrap().host_network = Some(true);
    assert_eq!(deny_reason(a.decide("team", &host).await), Some(DenyReason::HostNetwork));
    let mut selector = daemon_pod("worker-1");
    selector.spec.as_mut().unwrap().node_selector =
        Some([("imdsgate.io/server-node".to_string(), "true".to_string())].into());
    assert_eq!(deny_reason(a.decide("team", &selector).await), Some(DenyReason::ServerNodeSelector));
    // A pod bound to another node than its pin is judged by its binding.
    let mut bound = daemon_pod("worker-1");
    bound.spec.as_mut().unwrap().node_name = Some("server-1".into());
    assert_eq!(deny_reason(a.decide("team", &bound).await), Some(DenyReason::ServerNodeName));
}

#[tokio::test]
async fn anything_short_of_a_pin_to_one_node_is_judged_as_before() {
    let a = with_nodes(admission());
    let with_terms = |terms: serde_json::Value| {
        let mut p = daemon_pod("worker-1");
        p.spec.as_mut().unwrap().affinity = Some(
            serde_json::from_value(json!({ "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": terms } } }))
            .unwrap(),
        );
        p
    };
    let two_nodes = with_terms(json!([{ "matchFields": [
        { "key": "metadata.name", "operator": "In", "values": ["worker-1", "server-1"] }] }]));
    let by_label = with_terms(json!([{ "matchExpressions": [
        { "key": "kubernetes.io/hostname", "operator": "In", "values": ["worker-1"] }] }]));
    let label_named_like_the_field = with_terms(json!([{ "matchExpressions": [
        { "key": "metadata.name", "operator": "In", "values": ["worker-1"] }] }]));
    // Owner references prove nothing: a forged one without the pin is any tolerating pod.
    let mut forged = daemon_pod("worker-1");
    forged.spec.as_mut().unwrap().affinity = None;
    for (what, pod) in [
        ("pinned to two nodes", two_nodes),
        ("pinned by a node label", by_label),
        ("metadata.name as a label", label_named_like_the_field),
        ("a forged DaemonSet owner without a pin", forged),
    ] {
        assert_eq!(
            deny_reason(a.decide("team", &pod).await),
            Some(DenyReason::ServerTaintToleration),
            "{what}"
        );
    }
    // A pod already bound (spec.nodeName) that tolerates everything is judged by its node too.
    let bound = |node: &str| -> Pod {
        serde_json::from_value(json!({ "metadata": { "name": "p" }, "spec": { "nodeName": node,
            "tolerations": [{ "operator": "Exists" }], "containers": [{ "name": "c", "image": "i" }] } }))
        .unwrap()
    };
    assert_eq!(a.decide("team", &bound("worker-1")).await, Verdict::Allow);
    assert_eq!(deny_reason(a.decide("team", &bound("server-1")).await), Some(DenyReason::ServerNodeName));
    assert_eq!(deny_reason(a.decide("team", &bound("future-1")).await), Some(DenyReason::UnknownNode));
    // Without tolerating the taint, a pin to a server node is refused all the same.
    let mut intolerant = daemon_pod("server-1");
    intolerant.spec.as_mut().unwrap().tolerations = None;
    assert_eq!(deny_reason(a.decide("team", &intolerant).await), Some(DenyReason::ServerNodeAffinity));
}

#[tokio::test]
async fn a_pinned_pod_is_judged_again_only_when_its_pin_or_tolerations_change() {
    let a = with_nodes(admission());
    // Admitted when its node was a worker; the node has since left. Updates (a label, a
    // finalizer's removal) must not be stuck on it.
    let old = daemon_pod("gone-1");
    let mut labelled = old.clone();
    labelled.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
    assert_eq!(a.decide_change("team", &labelled, Some(&old)).await, Verdict::Allow);
    // A new pin is judged.
    let old = daemon_pod("worker-1");
    assert_eq!(
        deny_reason(a.decide_change("team", &daemon_pod("server-1"), Some(&old)).await),
        Some(DenyReason::ServerNodeAffinity)
    );
    // So is a toleration added to a pod whose pin is unchanged.
    let mut old = daemon_pod("server-1");
    old.spec.as_mut().unwrap().tolerations = None;
    assert_eq!(
        deny_reason(a.decide_change("team", &daemon_pod("server-1"), Some(&old)).await),
        Some(DenyReason::ServerNodeAffinity)
    );
}

#[tokio::test]
async fn pinned_pods_and_bindings_fail_closed_when_the_node_cannot_be_vouched_for() {
    // No apiserver to ask (client: None): the node cannot be read, so it could be a server node.
    let a = admission();
    let pinned = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" },
                         "spec": { "nodeName": "node-x", "containers": [{ "name": "c", "image": "i" }] } });
    let r = response(&a.review(&review_body("Pod", "team", pinned)).await.unwrap());
    assert_eq!(r["allowed"], false);
    assert!(r["status"]["message"].as_str().unwrap().contains("node-x"), "{r}");
    let binding = json!({ "apiVersion": "v1", "kind": "Binding", "metadata": { "name": "p", "namespace": "team" },
                          "target": { "kind": "Node", "name": "node-x" } });
    let r = response(&a.review(&review_body("Binding", "team", binding.clone())).await.unwrap());
    assert_eq!(r["allowed"], false);
    assert!(r["status"]["message"].as_str().unwrap().contains("binding target"), "{r}");
    let r = response(&a.review(&review_body("Binding", "kube-system", binding)).await.unwrap());
    assert_eq!(r["allowed"], true, "exempt namespaces bind anywhere");
}
