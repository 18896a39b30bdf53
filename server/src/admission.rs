//! The admission webhook (`POST /validate/pods`, AdmissionReview v1, for pods and their
//! `pods/binding` subresource): keeps pods off the server nodes — whose instance role may assume
//! every pod role — and off nodes it cannot vouch for (unknown yet, or unreadable); a pod that
//! tolerates the server taint but is bound (`spec.nodeName`) or pinned by name to one node (a
//! DaemonSet's pod) is judged by that node; refuses
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
        let spec = pod.spec.clone().unwrap_or_default();
        let bound = spec.node_name.as_deref().is_some_and(|n| !n.is_empty());
        let pinned = pinned_node(spec.affinity.as_ref()).filter(|_| !bound);
        match check_placement(&self.config, pod) {
            None => {}
            // A toleration of the server taint matters where the scheduler may choose the node. A
            // pod bound to a node (spec.nodeName, judged below) or pinned to one by name (as the
            // DaemonSet controller pins each of its pods) can run nowhere else: that node decides.
            Some(Verdict::Deny(DenyReason::ServerTaintToleration, _)) if bound || pinned.is_some() => {}
            Some(verdict) => return verdict,
        }
        // The pin decides however the pod was made (anyone can write a DaemonSet owner reference).
        // On UPDATE, a pin and tolerations that did not change were judged at creation.
        let old_spec = old.and_then(|o| o.spec.as_ref());
        let pin_unchanged = old_spec
            .is_some_and(|o| pinned_node(o.affinity.as_ref()) == pinned && o.tolerations == spec.tolerations);
        if let Some(node) = pinned.as_deref().filter(|_| !pin_unchanged) {
            match self.node_kind(node).await {
                NodeKind::Ordinary => {}
                NodeKind::Server => {
                    return Verdict::Deny(
                        DenyReason::ServerNodeAffinity,
                        self.pinned_to_server_message(node),
                    );
                }
                other => {
                    return Verdict::Deny(
                        DenyReason::UnknownNode,
                        unknown_node_message(
                            "the required node affinity's matchFields metadata.name",
                            node,
                            &other,
                        ),
                    );
                }
            }
        }
        let old_node = old_spec.and_then(|s| s.node_name.as_deref());
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

    fn pinned_to_server_message(&self, node: &str) -> String {
        let key = self.config.server_node_labels.keys().next().map(String::as_str).unwrap_or_default();
        format!(
            "the pod's required node affinity pins it to {node:?} (matchFields metadata.name, as a DaemonSet's pods are), an imdsgate server node (labels {}); server nodes run only the imdsgate server. A DaemonSet that must not run there should keep off server nodes with a required node affinity `{key} DoesNotExist` in its pod template (its controller then creates no pod there); one that must run there needs its namespace exempted (--webhook-exempt-namespaces).",
            show_labels(&self.config.server_node_labels)
        )
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

/// The checks that need nothing but the pod: hostNetwork, nodeSelector, affinity, tolerations.
/// A toleration of the server taint is refused here whatever the pod's node; the webhook lifts
/// that refusal for a pod bound or pinned to one node once it has judged that node.
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
        assert_eq!(
            pin(json!([{ "matchFields": [name_in(json!(["worker-1"]))] }])).as_deref(),
            Some("worker-1")
        );
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

    /// An apiserver that knows two nodes, `worker-1` and the server node `server-1`, and
    /// answers every other read of a node with 404; `broken-1` with a 500.
    fn with_nodes(mut a: Admission) -> Admission {
        let service = imdsgate_core::http_server::service_fn(
            |req: http::Request<kube::client::Body>| async move {
                let node = |name: &str, labels: serde_json::Value| json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name, "labels": labels } });
                let (status, body) = match req.uri().path().strip_prefix("/api/v1/nodes/") {
                    Some("worker-1") => {
                        (200, node("worker-1", json!({ "kubernetes.io/hostname": "worker-1" })))
                    }
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
        role.metadata.annotations =
            Some([("iam.amazonaws.com/role".to_string(), "admin".to_string())].into());
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
}
