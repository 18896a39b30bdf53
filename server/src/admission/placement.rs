//! Placement rules: what makes a node a server node (its labels, its taint), and whether a pod
//! could land on one through its nodeSelector, required node affinity or tolerations, or reach
//! the node's own role through hostNetwork. Pure functions over the pod spec; the webhook
//! ([`crate::admission`]) looks up the nodes a pod is bound or pinned to.

use crate::admission::{AdmissionConfig, DenyReason, Verdict};
use imdsgate_core::pod_index::annotation;
use k8s_openapi::api::core::v1::{Affinity, Pod, Toleration};
use std::collections::BTreeMap;

/// A taint as `--server-node-taint` names it: `key[=value]:Effect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: Option<String>,
    pub effect: String,
}

impl std::str::FromStr for Taint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kv, effect) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not key[=value]:Effect"))?;
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(format!("taint effect {effect:?} must be NoSchedule, PreferNoSchedule or NoExecute"));
        }
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (kv, None),
        };
        if key.is_empty() {
            return Err(format!("{s:?} has no key"));
        }
        Ok(Taint { key: key.to_string(), value, effect: effect.to_string() })
    }
}

impl std::fmt::Display for Taint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}:{}", self.key, v, self.effect),
            None => write!(f, "{}:{}", self.key, self.effect),
        }
    }
}

/// Parses `--server-node-selector`: `key=value[,key=value…]`.
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let labels: BTreeMap<String, String> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("{pair:?} is not key=value"))
        })
        .collect::<Result<_, _>>()?;
    if labels.is_empty() {
        return Err("the server node selector is empty".into());
    }
    Ok(labels)
}

/// Whether a node with `labels` is a server node.
pub fn is_server_node(server_labels: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    server_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The one node a pod's required node affinity allows, when every term pins it by name —
/// `matchFields: [{key: metadata.name, operator: In, values: [<node>]}]`, as the DaemonSet
/// controller pins each of its pods — and all name the same node. Anything else (several nodes or
/// values, `matchExpressions` on a label such as `kubernetes.io/hostname`, which a node's owner
/// sets) is no pin. Owner references play no part: anyone creating a pod can write them.
pub fn pinned_node(affinity: Option<&Affinity>) -> Option<String> {
    let terms = required_terms(affinity);
    let mut pinned: Option<&str> = None;
    for term in &terms {
        let pins = term.match_fields.iter().flatten().filter_map(|r| match r.values.as_deref() {
            Some([node]) if r.key == "metadata.name" && r.operator == "In" && !node.is_empty() => {
                Some(node.as_str())
            }
            _ => None,
        });
        let mut pinned_here = false;
        for node in pins {
            if pinned.is_some_and(|p| p != node) {
                return None;
            }
            pinned = Some(node);
            pinned_here = true;
        }
        if !pinned_here {
            return None;
        }
    }
    pinned.map(str::to_string)
}

/// The first of [`placement_refusals`]: what the webhook tells a new pod.
pub fn check_placement(config: &AdmissionConfig, pod: &Pod) -> Option<Verdict> {
    placement_refusals(config, pod).into_iter().next()
}

/// The checks that need nothing but the pod: hostNetwork, nodeSelector, affinity, tolerations;
/// every refusal they make, in the order a new pod is told them (an UPDATE is judged on each one
/// it changes). A toleration of the server taint is refused here whatever the pod's node; the
/// webhook lifts that refusal for a pod bound or pinned to one node once it has judged that node.
pub fn placement_refusals(config: &AdmissionConfig, pod: &Pod) -> Vec<Verdict> {
    let mut refusals = Vec::new();
    let spec = pod.spec.clone().unwrap_or_default();
    let has_role = annotation(pod, imdsgate_core::pod_index::ROLE_ANNOTATION).is_some();
    if spec.host_network == Some(true) {
        if has_role {
            refusals.push(Verdict::Deny(
                DenyReason::HostNetworkWithRole,
                "a hostNetwork pod's traffic never passes the imdsgate agent, so it cannot have an iam.amazonaws.com/role. Remove hostNetwork: true or the annotation.".into(),
            ));
        }
        let labelled = config
            .host_network_exempt_label
            .as_ref()
            .is_some_and(|(k, v)| pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
        if !config.allow_host_network && !labelled {
            let label_hint = match &config.host_network_exempt_label {
                Some((k, v)) => format!(
                    ", or label the pod {k}={v} if it must run on the host network knowing it can read the node's role"
                ),
                None => String::new(),
            };
            refusals.push(Verdict::Deny(
                DenyReason::HostNetwork,
                format!(
                    "a hostNetwork pod shares the node's network: its requests to 169.254.169.254 never pass the imdsgate agent and reach the node's own IAM role. Remove hostNetwork: true, or run the pod in an exempt namespace{label_hint}."
                ),
            ));
        }
    }
    let labels = &config.server_node_labels;
    if let Some(selector) = &spec.node_selector
        && labels.iter().all(|(k, v)| selector.get(k) == Some(v))
    {
        refusals.push(Verdict::Deny(
            DenyReason::ServerNodeSelector,
            format!("spec.nodeSelector {} selects imdsgate server nodes. Remove it.", show_labels(labels)),
        ));
    }
    if affinity_requires_server_nodes(spec.affinity.as_ref(), labels) {
        refusals.push(Verdict::Deny(
            DenyReason::ServerNodeAffinity,
            format!(
                "the pod's required node affinity can only match imdsgate server nodes ({}). Change spec.affinity.nodeAffinity.",
                show_labels(labels)
            ),
        ));
    }
    if let Some((index, _)) =
        spec.tolerations.iter().flatten().enumerate().find(|(_, t)| tolerates(t, &config.server_taint))
        && !affinity_excludes_server_nodes(spec.affinity.as_ref(), labels)
    {
        let (k, v) = labels.iter().next().map(|(k, v)| (k.as_str(), v.as_str())).unwrap_or_default();
        refusals.push(Verdict::Deny(
            DenyReason::ServerTaintToleration,
            format!(
                "spec.tolerations[{index}] tolerates {}, the taint of imdsgate server nodes, so the pod could be scheduled there. Remove that toleration, or add a required node affinity `{k} NotIn [{v}]` that keeps the pod off server nodes.",
                config.server_taint
            ),
        ));
    }
    refusals
}

/// Whether `toleration` tolerates `taint` (as the scheduler decides it; a taint named without a
/// value is treated as tolerated by any value, to stay on the safe side).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
    if !effect_ok {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or("");
    let operator = toleration.operator.as_deref().unwrap_or("Equal");
    if key.is_empty() {
        // An empty key with Exists tolerates everything.
        return operator == "Exists";
    }
    if key != taint.key {
        return false;
    }
    match operator {
        "Exists" => true,
        _ => match &taint.value {
            Some(value) => toleration.value.as_deref().unwrap_or("") == value,
            None => true,
        },
    }
}

fn required_terms(affinity: Option<&Affinity>) -> Vec<k8s_openapi::api::core::v1::NodeSelectorTerm> {
    affinity
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default()
}

/// Whether there are required node-affinity terms and each has an expression on a server label
/// (key, wanted value) that `matches`.
fn every_required_term(
    affinity: Option<&Affinity>,
    labels: &BTreeMap<String, String>,
    matches: impl Fn(&k8s_openapi::api::core::v1::NodeSelectorRequirement, &str) -> bool,
) -> bool {
    let terms = required_terms(affinity);
    !terms.is_empty()
        && terms.iter().all(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .any(|e| labels.get(&e.key).is_some_and(|want| matches(e, want)))
        })
}

/// Every required term demands the server labels: the pod can only land on server nodes.
pub fn affinity_requires_server_nodes(
    affinity: Option<&Affinity>,
    labels: &BTreeMap<String, String>,
) -> bool {
    every_required_term(affinity, labels, |e, want| match e.operator.as_str() {
        "In" => {
            e.values.as_ref().is_some_and(|values| !values.is_empty() && values.iter().all(|v| v == want))
        }
        "Exists" => true,
        _ => false,
    })
}

/// Every required term rules server nodes out: a toleration of their taint is then harmless.
pub fn affinity_excludes_server_nodes(
    affinity: Option<&Affinity>,
    labels: &BTreeMap<String, String>,
) -> bool {
    every_required_term(affinity, labels, |e, want| match e.operator.as_str() {
        "NotIn" => e.values.iter().flatten().any(|v| v == want),
        "DoesNotExist" => true,
        "In" => {
            e.values.as_ref().is_some_and(|values| !values.is_empty() && values.iter().all(|v| v != want))
        }
        _ => false,
    })
}

pub(crate) fn show_labels(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
