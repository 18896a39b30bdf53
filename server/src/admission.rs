//! The admission webhook (`POST /validate/pods`, AdmissionReview v1, for pods and their
//! `pods/binding` subresource): keeps pods off the server nodes — whose instance role may assume
//! every pod role — and off nodes it cannot vouch for (unknown yet, or unreadable); refuses
//! hostNetwork pods (they bypass the agent and reach the node's own role) outside the exemptions;
//! refuses, at creation, roles a namespace does not permit, with the same resolution and policy
//! code the server uses at request time, and session-name overrides that STS would not take as
//! written. Every denial says exactly what to change.

use crate::authorizer::{Authorizer, Denial};
use imdsgate_core::pod_index::annotation;
use k8s_openapi::api::core::v1::{Affinity, Binding, Namespace, Node, Pod, Toleration};
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Why a pod is refused (bounded: these are metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    ServerNodeName,
    UnknownNode,
    ServerNodeBinding,
    ServerNodeSelector,
    ServerNodeAffinity,
    ServerTaintToleration,
    HostNetworkWithRole,
    HostNetwork,
    RoleNotPermitted,
    SessionNameInvalid,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::ServerNodeName => "server_node_name",
            DenyReason::UnknownNode => "unknown_node",
            DenyReason::ServerNodeBinding => "server_node_binding",
            DenyReason::ServerNodeSelector => "server_node_selector",
            DenyReason::ServerNodeAffinity => "server_node_affinity",
            DenyReason::ServerTaintToleration => "server_taint_toleration",
            DenyReason::HostNetworkWithRole => "host_network_with_role",
            DenyReason::HostNetwork => "host_network",
            DenyReason::RoleNotPermitted => "role_not_permitted",
            DenyReason::SessionNameInvalid => "session_name_invalid",
        }
    }
}

/// The webhook's decision about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Exempt,
    Deny(DenyReason, String),
    /// Admitted with a warning: the role check needs the base ARN, which the server has not
    /// detected yet (its own AWS credentials fail). Refusing would block every such pod for as
    /// long; the server still refuses the role at request time, once it can decide.
    RoleUnchecked(String),
}

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

/// What the webhook does with a pod it would refuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookMode {
    /// Refuse it, with a message saying what to change.
    #[default]
    Enforce,
    /// Admit a pod whose role or session name would be refused, with an admission warning
    /// (kubectl prints it), and count it: for migrations from kiam or kube2iam, to see what
    /// enforcing would refuse. Placement on server nodes and hostNetwork stay refused.
    Warn,
}

/// Webhook configuration.
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// Enforce refusals, or only warn.
    pub mode: WebhookMode,
    /// Labels that mark server nodes.
    pub server_node_labels: BTreeMap<String, String>,
    /// The taint server nodes carry.
    pub server_taint: Taint,
    /// Admit hostNetwork pods without a role (they can read the node's own role).
    pub allow_host_network: bool,
    /// A pod label (key, value) that admits a hostNetwork pod without a role anyway.
    pub host_network_exempt_label: Option<(String, String)>,
    /// Namespaces let through unchecked.
    pub exempt_namespaces: HashSet<String>,
}

/// What the webhook knows of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Server,
    Ordinary,
    /// No such node (yet): it may still join as a server node.
    Unknown,
    /// The node could not be read.
    Unreadable(String),
}

/// Decides pod admissions.
pub struct Admission {
    pub config: AdmissionConfig,
    pub authorizer: Arc<Authorizer>,
    /// For node labels (`spec.nodeName`) and namespaces the watch has not delivered yet.
    pub client: Option<kube::Client>,
    pub metrics: crate::metrics::Metrics,
}

impl Admission {
    /// Answers one AdmissionReview body; `Err` is a malformed body (HTTP 400).
    pub async fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, String> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
        if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
            return Err(format!(
                "not an admission.k8s.io/v1 AdmissionReview: apiVersion {:?}, kind {:?}",
                review.types.api_version, review.types.kind
            ));
        }
        let request: AdmissionRequest<DynamicObject> =
            review.try_into().map_err(|_| "the AdmissionReview has no request".to_string())?;
        let response = AdmissionResponse::from(&request);
        if request.kind.kind == "Binding" && request.kind.group.is_empty() {
            let namespace = request.namespace.clone().unwrap_or_default();
            let verdict = match request
                .object
                .as_ref()
                .map(|o| serde_json::to_value(o).and_then(serde_json::from_value::<Binding>))
            {
                Some(Ok(binding)) => self.decide_binding(&namespace, &binding).await,
                _ => Verdict::Deny(DenyReason::ServerNodeBinding, "imdsgate cannot read this binding".into()),
            };
            return Ok(self.answer(response, &namespace, &request.name, &request.operation, verdict));
        }
        if request.kind.kind != "Pod" || !request.kind.group.is_empty() {
            tracing::warn!(kind = %request.kind.kind, "admission request for an unexpected kind; allowed");
            let mut response = response;
            response.warnings = Some(vec![format!("imdsgate only reviews Pods, not {}", request.kind.kind)]);
            return Ok(response.into_review());
        }
        if !matches!(request.operation, Operation::Create | Operation::Update) {
            return Ok(response.into_review());
        }
        let Some(object) = &request.object else {
            // Refused with the request's uid (`AdmissionResponse::invalid` drops it, and the
            // apiserver would not take the answer).
            return Ok(response.deny("imdsgate: the request carries no pod").into_review());
        };
        let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
            Ok(pod) => pod,
            Err(e) => return Ok(response.deny(format!("imdsgate cannot read this pod: {e}")).into_review()),
        };
        let namespace =
            request.namespace.clone().or_else(|| pod.metadata.namespace.clone()).unwrap_or_default();
        let name =
            pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
        // On UPDATE, what did not change was decided at creation: re-deciding it could only block
        // the pod's updates (a finalizer's removal, say) after a node or namespace changed.
        let old: Option<Pod> = request
            .old_object
            .as_ref()
            .and_then(|o| serde_json::to_value(o).and_then(serde_json::from_value).ok());
        let verdict = self.decide_change(&namespace, &pod, old.as_ref()).await;
        Ok(self.answer(response, &namespace, &name, &request.operation, verdict))
    }

    /// Counts, logs and encodes a verdict.
    fn answer(
        &self,
        response: AdmissionResponse,
        namespace: &str,
        name: &str,
        operation: &Operation,
        verdict: Verdict,
    ) -> AdmissionReview<DynamicObject> {
        // Warn mode eases only the role checks that kiam and kube2iam users migrate from; keeping
        // pods off server nodes and off the host network stays enforced (those reach node roles).
        let warn_only = self.config.mode == WebhookMode::Warn
            && matches!(
                verdict,
                Verdict::Deny(DenyReason::RoleNotPermitted | DenyReason::SessionNameInvalid, _)
            );
        let (decision, reason) = match &verdict {
            Verdict::Allow => ("allowed", "permitted"),
            Verdict::Exempt => ("allowed", "exempt_namespace"),
            Verdict::RoleUnchecked(_) => ("allowed", "role_unchecked"),
            Verdict::Deny(reason, _) if warn_only => ("warned", reason.as_str()),
            Verdict::Deny(reason, _) => ("denied", reason.as_str()),
        };
        self.metrics
            .admissions
            .get_or_create(&crate::metrics::AdmissionLabels {
                decision: decision.into(),
                reason: reason.into(),
            })
            .inc();
        tracing::info!(namespace, pod = name, ?operation, decision, reason, "admission");
        match verdict {
            Verdict::Allow | Verdict::Exempt => response.into_review(),
            Verdict::RoleUnchecked(message) => {
                let mut response = response;
                response.warnings = Some(vec![format!("imdsgate: {message}")]);
                response.into_review()
            }
            Verdict::Deny(_, message) if warn_only => {
                let mut response = response;
                response.warnings =
                    Some(vec![format!("imdsgate (warn mode) would refuse this pod: {message}")]);
                response.into_review()
            }
            Verdict::Deny(_, message) => response.deny(format!("imdsgate: {message}")).into_review(),
        }
    }

    /// The decision for binding a pod of `namespace` to a node (the scheduler's step, or anyone
    /// with `pods/binding`): never to a server node, nor to a node that cannot be vouched for.
    pub async fn decide_binding(&self, namespace: &str, binding: &Binding) -> Verdict {
        if self.config.exempt_namespaces.contains(namespace) {
            return Verdict::Exempt;
        }
        let node = binding.target.name.as_deref().unwrap_or_default();
        match self.node_kind(node).await {
            NodeKind::Ordinary => Verdict::Allow,
            NodeKind::Server => Verdict::Deny(
                DenyReason::ServerNodeBinding,
                format!(
                    "binding pod {:?} to {node:?}, an imdsgate server node (labels {}), is refused; server nodes run only the imdsgate server.",
                    binding.metadata.name.as_deref().unwrap_or_default(),
                    show_labels(&self.config.server_node_labels)
                ),
            ),
            other => Verdict::Deny(
                DenyReason::ServerNodeBinding,
                unknown_node_message("the binding target", node, &other),
            ),
        }
    }

    /// The decision for a new `pod` in `namespace`.
    pub async fn decide(&self, namespace: &str, pod: &Pod) -> Verdict {
        self.decide_change(namespace, pod, None).await
    }

    /// The decision for `pod` in `namespace`, created (`old`: None) or updated from `old`.
    pub async fn decide_change(&self, namespace: &str, pod: &Pod, old: Option<&Pod>) -> Verdict {
        let unchanged = |key: &str| old.is_some_and(|old| annotation(old, key) == annotation(pod, key));
        if self.config.exempt_namespaces.contains(namespace) {
            return Verdict::Exempt;
        }
        if let Some(verdict) = check_placement(&self.config, pod) {
            return verdict;
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let old_node = old.and_then(|o| o.spec.as_ref()).and_then(|s| s.node_name.as_deref());
        if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty() && old_node != Some(*n)) {
            match self.node_kind(node).await {
                NodeKind::Ordinary => {}
                NodeKind::Server => {
                    return Verdict::Deny(
                        DenyReason::ServerNodeName,
                        format!(
                            "spec.nodeName {node:?} is an imdsgate server node (labels {}); server nodes run only the imdsgate server. Remove spec.nodeName or name another node.",
                            show_labels(&self.config.server_node_labels)
                        ),
                    );
                }
                other => {
                    return Verdict::Deny(
                        DenyReason::UnknownNode,
                        unknown_node_message("spec.nodeName", node, &other),
                    );
                }
            }
        }
        if let Some(chosen) = annotation(pod, imdsgate_core::pod_index::SESSION_NAME_ANNOTATION)
            && !unchanged(imdsgate_core::pod_index::SESSION_NAME_ANNOTATION)
            && let Err(why) = crate::session::check_override(namespace, chosen)
        {
            return Verdict::Deny(
                DenyReason::SessionNameInvalid,
                format!(
                    "annotation iam.amazonaws.com/session-name {chosen:?} {why}. The session name is always {namespace}@<name>: it can add to the pod's identity, never name another pod or namespace."
                ),
            );
        }
        let role = annotation(pod, imdsgate_core::pod_index::ROLE_ANNOTATION)
            .filter(|_| !unchanged(imdsgate_core::pod_index::ROLE_ANNOTATION));
        if let Some(annotation) = role {
            let resolved = match self.authorizer.resolve_role(annotation) {
                Ok(arn) => arn,
                Err(Denial::RoleInvalid(e)) => {
                    return Verdict::Deny(
                        DenyReason::RoleNotPermitted,
                        format!("annotation iam.amazonaws.com/role: {e}"),
                    );
                }
                Err(other) => return unchecked(annotation, &other),
            };
            let policy = self.namespace_policy(namespace).await;
            match self.authorizer.check_policy(namespace, &policy, &resolved) {
                Ok(()) => {}
                Err(Denial::NamespaceForbids { why, .. }) => {
                    return Verdict::Deny(
                        DenyReason::RoleNotPermitted,
                        format!(
                            "namespace {namespace} does not permit role {resolved}: {why}. Change the pod's iam.amazonaws.com/role, or the namespace's iam.amazonaws.com/permitted annotation."
                        ),
                    );
                }
                Err(other) => return unchecked(annotation, &other),
            }
        }
        Verdict::Allow
    }

    async fn namespace_policy(&self, namespace: &str) -> Arc<crate::policy::NamespacePolicy> {
        if self.authorizer.namespaces.contains(namespace) {
            return self.authorizer.namespaces.policy(namespace);
        }
        // Created a moment ago: the watch may not have delivered it yet.
        if let Some(client) = &self.client
            && let Ok(ns) = kube::Api::<Namespace>::all(client.clone()).get(namespace).await
        {
            self.authorizer.namespaces.apply(&ns);
        }
        self.authorizer.namespaces.policy(namespace)
    }

    async fn node_kind(&self, node: &str) -> NodeKind {
        let Some(client) = &self.client else { return NodeKind::Unreadable("no Kubernetes client".into()) };
        match kube::Api::<Node>::all(client.clone()).get_opt(node).await {
            Ok(Some(node)) => {
                let labels = node.metadata.labels.unwrap_or_default();
                if is_server_node(&self.config.server_node_labels, &labels) {
                    NodeKind::Server
                } else {
                    NodeKind::Ordinary
                }
            }
            Ok(None) => NodeKind::Unknown,
            Err(error) => {
                // Fail closed: if we cannot tell, the node could be a server node.
                tracing::warn!(node, %error, "cannot read node labels; refusing");
                NodeKind::Unreadable(error.to_string())
            }
        }
    }
}

/// The verdict on a role the server cannot check yet ([`Denial::BaseArnUnknown`]).
fn unchecked(annotation: &str, why: &Denial) -> Verdict {
    Verdict::RoleUnchecked(format!(
        "iam.amazonaws.com/role {annotation:?} was not checked: {why}. The pod is admitted; the server refuses its credentials until it can check the role."
    ))
}

/// Whether a node with `labels` is a server node.
pub fn is_server_node(server_labels: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    server_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn unknown_node_message(field: &str, node: &str, kind: &NodeKind) -> String {
    match kind {
        NodeKind::Unreadable(error) => format!(
            "{field} {node:?}: imdsgate cannot read the node to check that it is not a server node ({error}); try again."
        ),
        _ => format!(
            "{field} {node:?} names a node that does not exist (yet); it could join as an imdsgate server node. Name an existing node, or leave placement to the scheduler."
        ),
    }
}

/// The checks that need nothing but the pod: hostNetwork, nodeSelector, affinity, tolerations.
pub fn check_placement(config: &AdmissionConfig, pod: &Pod) -> Option<Verdict> {
    let spec = pod.spec.clone().unwrap_or_default();
    let has_role = annotation(pod, imdsgate_core::pod_index::ROLE_ANNOTATION).is_some();
    if spec.host_network == Some(true) {
        if has_role {
            return Some(Verdict::Deny(
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
            return Some(Verdict::Deny(
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
        return Some(Verdict::Deny(
            DenyReason::ServerNodeSelector,
            format!("spec.nodeSelector {} selects imdsgate server nodes. Remove it.", show_labels(labels)),
        ));
    }
    if affinity_requires_server_nodes(spec.affinity.as_ref(), labels) {
        return Some(Verdict::Deny(
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
        return Some(Verdict::Deny(
            DenyReason::ServerTaintToleration,
            format!(
                "spec.tolerations[{index}] tolerates {}, the taint of imdsgate server nodes, so the pod could be scheduled there. Remove that toleration, or add a required node affinity `{k} NotIn [{v}]` that keeps the pod off server nodes.",
                config.server_taint
            ),
        ));
    }
    None
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

fn show_labels(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(
            !tolerates(&t(json!({ "operator": "Equal" })), &taint),
            "empty key with Equal tolerates nothing"
        );
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
        assert_eq!(
            reason(check_placement(&c, &pod(only_server, None))),
            Some(DenyReason::ServerNodeAffinity)
        );
        let either = json!({ "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
            { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "In", "values": ["true"] }] },
            { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] }
        ] } } } });
        assert_eq!(
            reason(check_placement(&c, &pod(either, None))),
            None,
            "another term can match other nodes"
        );
        let exists = json!({ "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
            { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "Exists" }] }
        ] } } } });
        assert_eq!(reason(check_placement(&c, &pod(exists, None))), Some(DenyReason::ServerNodeAffinity));
    }

    #[test]
    fn a_toleration_is_refused_unless_affinity_keeps_the_pod_off_server_nodes() {
        let c = config();
        let tolerant = json!({ "tolerations": [{ "operator": "Exists" }] });
        assert_eq!(
            reason(check_placement(&c, &pod(tolerant, None))),
            Some(DenyReason::ServerTaintToleration)
        );
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
        assert_eq!(
            reason(check_placement(&c, &host(json!({ "imdsgate.io/host-network": "allowed" })))),
            None
        );
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
}

#[cfg(test)]
mod review_tests {
    use super::*;
    use crate::namespace_index::NamespaceIndex;
    use crate::session::TagConfig;
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
                base_arn: crate::role::RoleBase::fixed(Some(
                    crate::role::BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap(),
                )),
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
        for body in [&b""[..], b"{", b"null", b"{\"kind\":\"AdmissionReview\"}", &[0xff, 0xfe][..], &foreign]
        {
            assert!(a.review(body).await.is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[tokio::test]
    async fn a_pod_review_without_the_pod_is_refused_with_its_uid() {
        let a = admission();
        let r = response(&a.review(&review_body("Pod", "team", serde_json::Value::Null)).await.unwrap());
        assert_eq!(r["allowed"], false, "{r}");
        assert_eq!(
            r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
            "the apiserver matches answers by uid: {r}"
        );
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
        let unknown_ns =
            response(&a.review(&review_body("Pod", "elsewhere", pod("app-reader"))).await.unwrap());
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
            warning.starts_with("imdsgate (warn mode) would refuse")
                && warning.contains("does not permit role"),
            "{warning}"
        );
        let warned = crate::metrics::AdmissionLabels {
            decision: "warned".into(),
            reason: "role_not_permitted".into(),
        };
        assert_eq!(a.metrics.admissions.get_or_create(&warned).get(), 1);
    }

    #[tokio::test]
    async fn roles_that_need_an_undetected_base_arn_are_admitted_with_a_warning() {
        let mut a = admission();
        let authorizer = Authorizer {
            pods: a.authorizer.pods.clone(),
            namespaces: a.authorizer.namespaces.clone(),
            base_arn: crate::role::RoleBase::detecting(),
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
            &a.review(&review_body("Pod", "team", pod("arn:aws:iam::123456789012:role/admin")))
                .await
                .unwrap(),
        );
        assert_eq!(r["allowed"], false, "{r}");
        // Once detected, names are checked again.
        assert!(
            a.authorizer
                .base_arn
                .detected(crate::role::BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap())
        );
        let r = response(&a.review(&review_body("Pod", "team", pod("admin"))).await.unwrap());
        assert_eq!(r["allowed"], false, "{r}");
        let r = response(&a.review(&review_body("Pod", "team", pod("app-reader"))).await.unwrap());
        assert_eq!(
            (r["allowed"].clone(), r["warnings"].clone()),
            (json!(true), serde_json::Value::Null),
            "{r}"
        );
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
}
