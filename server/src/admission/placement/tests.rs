//! Tests of the placement rules: taints, tolerations, selectors, affinity, pins, hostNetwork.

use super::*;
use crate::admission::{AdmissionConfig, DenyReason, Verdict, WebhookMode};
use serde_json::json;

fn config() -> AdmissionConfig {
    AdmissionConfig {
        mode: WebhookMode::Enforce,
        server_node_labels: parse_selector("imdsgate.io/server-node=true").unwrap(),
        server_taint: "imdsgate.io/server-node:NoSchedule".parse().unwrap(),
        allow_host_network: false,
        host_network_exempt_label: None,
        exempt_namespaces: ["imdsgate".to_string(), "kube-system".to_string()].into(),
    }
}

fn pod(spec: serde_json::Value, role: Option<&str>) -> Pod {
    let mut spec = spec;
    spec["containers"] = json!([{ "name": "c", "image": "i" }]);
    serde_json::from_value(json!({
        "metadata": { "name": "p", "annotations": role.map(|r| json!({ "iam.amazonaws.com/role": r })) },
        "spec": spec
    }))
    .unwrap()
}

fn reason(v: Option<Verdict>) -> Option<DenyReason> {
    match v {
        Some(Verdict::Deny(r, _)) => Some(r),
        _ => None,
    }
}

fn toleration(v: serde_json::Value) -> Toleration {
    serde_json::from_value(v).unwrap()
}

#[test]
fn taint_and_selector_flags() {
    let t: Taint = "a/b=c:NoExecute".parse().unwrap();
    assert_eq!((t.key.as_str(), t.value.as_deref(), t.effect.as_str()), ("a/b", Some("c"), "NoExecute"));
    assert_eq!(t.to_string(), "a/b=c:NoExecute");
    assert!("nokey".parse::<Taint>().is_err());
    assert!("k:Sometimes".parse::<Taint>().is_err());
    assert_eq!(parse_selector("a=1, b=2").unwrap().len(), 2);
    assert!(parse_selector("").is_err());
    assert!(parse_selector("novalue").is_err());
}

#[test]
fn tolerations_case_by_case() {
    let taint: Taint = "imdsgate.io/server-node:NoSchedule".parse().unwrap();
    let valued: Taint = "imdsgate.io/server-node=true:NoSchedule".parse().unwrap();
    let t = |v| toleration(v);
    assert!(tolerates(&t(json!({ "operator": "Exists" })), &taint), "tolerate-everything");
    assert!(tolerates(&t(json!({ "key": "imdsgate.io/server-node", "operator": "Exists" })), &taint));
    assert!(tolerates(
        &t(json!({ "key": "imdsgate.io/server-node", "operator": "Exists", "effect": "NoSchedule" })),
        &taint
    ));
    assert!(!tolerates(
        &t(json!({ "key": "imdsgate.io/server-node", "operator": "Exists", "effect": "NoExecute" })),
        &taint
    ));
    assert!(!tolerates(&t(json!({ "key": "other", "operator": "Exists" })), &taint));
    assert!(
        tolerates(&t(json!({ "key": "imdsgate.io/server-node", "value": "anything" })), &taint),
        "value-less taint: any value"
    );
    assert!(tolerates(&t(json!({ "key": "imdsgate.io/server-node", "value": "true" })), &valued));
    assert!(!tolerates(&t(json!({ "key": "imdsgate.io/server-node", "value": "false" })), &valued));
    assert!(!tolerates(&t(json!({ "operator": "Equal" })), &taint), "empty key with Equal tolerates nothing");
}

#[test]
fn node_selector_and_affinity() {
    let c = config();
    assert_eq!(
        reason(check_placement(
            &c,
            &pod(json!({ "nodeSelector": { "imdsgate.io/server-node": "true" } }), None)
        )),
        Some(DenyReason::ServerNodeSelector)
    );
    assert_eq!(
        reason(check_placement(
            &c,
            &pod(json!({ "nodeSelector": { "imdsgate.io/server-node": "false" } }), None)
        )),
        None
    );
    let only_server = json!({ "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
        { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "In", "values": ["true"] }] }
    ] } } } });
    assert_eq!(reason(check_placement(&c, &pod(only_server, None))), Some(DenyReason::ServerNodeAffinity));
    let either = json!({ "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
        { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "In", "values": ["true"] }] },
        { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] }
    ] } } } });
    assert_eq!(reason(check_placement(&c, &pod(either, None))), None, "another term can match other nodes");
    let exists = json!({ "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
        { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "Exists" }] }
    ] } } } });
    assert_eq!(reason(check_placement(&c, &pod(exists, None))), Some(DenyReason::ServerNodeAffinity));
}

#[test]
fn a_toleration_is_refused_unless_affinity_keeps_the_pod_off_server_nodes() {
    let c = config();
    let tolerant = json!({ "tolerations": [{ "operator": "Exists" }] });
    assert_eq!(reason(check_placement(&c, &pod(tolerant, None))), Some(DenyReason::ServerTaintToleration));
    let kept_off = json!({
        "tolerations": [{ "operator": "Exists" }],
        "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
            { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "NotIn", "values": ["true"] }] }
        ] } } }
    });
    assert_eq!(reason(check_placement(&c, &pod(kept_off, None))), None);
    let other_taint = json!({ "tolerations": [{ "key": "gpu", "operator": "Exists" }] });
    assert_eq!(reason(check_placement(&c, &pod(other_taint, None))), None);
}

#[test]
fn host_network_is_refused_by_default() {
    let mut c = config();
    let host = |labels: serde_json::Value| {
        let mut p = pod(json!({ "hostNetwork": true }), None);
        p.metadata.labels = serde_json::from_value(labels).unwrap();
        p
    };
    assert_eq!(
        reason(check_placement(&c, &pod(json!({ "hostNetwork": true }), Some("app")))),
        Some(DenyReason::HostNetworkWithRole)
    );
    assert_eq!(reason(check_placement(&c, &host(json!({})))), Some(DenyReason::HostNetwork));
    c.host_network_exempt_label = Some(("imdsgate.io/host-network".into(), "allowed".into()));
    let Some(Verdict::Deny(_, message)) = check_placement(&c, &host(json!({}))) else { panic!("denied") };
    assert!(
        message.contains("imdsgate.io/host-network=allowed") && message.contains("node's own IAM role"),
        "{message}"
    );
    assert_eq!(reason(check_placement(&c, &host(json!({ "imdsgate.io/host-network": "allowed" })))), None);
    assert_eq!(
        reason(check_placement(&c, &host(json!({ "imdsgate.io/host-network": "yes" })))),
        Some(DenyReason::HostNetwork),
        "only the exact label"
    );
    c.allow_host_network = true;
    assert_eq!(reason(check_placement(&c, &host(json!({})))), None, "explicit opt-out");
    assert_eq!(
        reason(check_placement(&c, &pod(json!({ "hostNetwork": true }), Some("app")))),
        Some(DenyReason::HostNetworkWithRole),
        "never with a role"
    );
}

fn pin(terms: serde_json::Value) -> Option<String> {
    let affinity: Affinity = serde_json::from_value(json!({ "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": terms } } }))
    .unwrap();
    pinned_node(Some(&affinity))
}

#[test]
fn only_a_required_match_fields_name_in_one_node_in_every_term_is_a_pin() {
    let name_in =
        |nodes: serde_json::Value| json!({ "key": "metadata.name", "operator": "In", "values": nodes });
    // As the DaemonSet controller writes it.
    assert_eq!(pin(json!([{ "matchFields": [name_in(json!(["worker-1"]))] }])).as_deref(), Some("worker-1"));
    // Other requirements only narrow a pinned term; every term pinned to the same node.
    assert_eq!(
        pin(json!([
            { "matchFields": [name_in(json!(["worker-1"]))],
              "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] },
            { "matchFields": [name_in(json!(["worker-1"])), name_in(json!(["worker-1", "server-1"]))] }
        ]))
        .as_deref(),
        Some("worker-1")
    );
    for not_a_pin in [
        json!([{ "matchFields": [name_in(json!(["worker-1", "server-1"]))] }]),
        json!([{ "matchFields": [name_in(json!([]))] }]),
        json!([{ "matchFields": [name_in(json!([""]))] }]),
        json!([{ "matchFields": [{ "key": "metadata.name", "operator": "NotIn", "values": ["server-1"] }] }]),
        json!([{ "matchExpressions": [name_in(json!(["worker-1"]))] }]),
        json!([{ "matchExpressions": [{ "key": "kubernetes.io/hostname", "operator": "In", "values": ["worker-1"] }] }]),
        // Terms are alternatives: one unpinned term lets the scheduler choose.
        json!([{ "matchFields": [name_in(json!(["worker-1"]))] }, { "matchExpressions": [{ "key": "zone", "operator": "Exists" }] }]),
        json!([{ "matchFields": [name_in(json!(["worker-1"]))] }, { "matchFields": [name_in(json!(["server-1"]))] }]),
        json!([{ "matchFields": [name_in(json!(["worker-1"])), name_in(json!(["server-1"]))] }]),
        json!([]),
    ] {
        assert_eq!(pin(not_a_pin.clone()), None, "{not_a_pin}");
    }
    assert_eq!(pinned_node(None), None);
}

#[test]
fn messages_say_what_to_change() {
    let c = config();
    let Some(Verdict::Deny(_, message)) =
        check_placement(&c, &pod(json!({ "tolerations": [{ "operator": "Exists" }] }), None))
    else {
        panic!("denied")
    };
    assert!(message.contains("spec.tolerations[0]") && message.contains("NotIn"), "{message}");
}
