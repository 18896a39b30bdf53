//! The admission webhook (`POST /validate/pods`, AdmissionReview v1, for pods and their
//! `pods/binding` subresource): keeps pods off the server nodes — whose instance role may assume
//! every pod role — and off nodes it cannot vouch for (unknown yet, or unreadable); a pod that
//! tolerates the server taint but is bound (`spec.nodeName`) or pinned by name to one node (a
//! DaemonSet's pod) is judged by that node; refuses
//! hostNetwork pods (they bypass the agent and reach the node's own role) outside the exemptions;
//! refuses, at creation, roles a namespace does not permit, with the same resolution and policy
//! code the server uses at request time, and session-name overrides that STS would not take as
//! written. Every denial says exactly what to change.
//!
//! This module is the protocol and the decision; the rules that need nothing but the pod are in
//! [`placement`], the watch of server nodes (and the report of pods found on them) in
//! [`server_nodes`], the HTTPS listener in [`webhook_server`].

use crate::authz::authorizer::{Authorizer, Denial};
use crate::authz::namespace_index::NamespaceRules;
use imdsgate_core::pod_index::annotation;
use k8s_openapi::api::core::v1::{Binding, Namespace, Node, Pod};
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use placement::{Taint, is_server_node, pinned_node, placement_refusals, show_labels};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

pub mod placement;
pub mod server_nodes;
pub mod webhook_server;

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
    MirrorPodRole,
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
            DenyReason::MirrorPodRole => "mirror_pod_role",
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
                Verdict::Deny(
                    DenyReason::RoleNotPermitted | DenyReason::SessionNameInvalid | DenyReason::MirrorPodRole,
                    _
                )
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
        let refused_before: Vec<DenyReason> = old
            .map(|old| placement_refusals(&self.config, old))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| match v {
                Verdict::Deny(reason, _) => Some(reason),
                _ => None,
            })
            .collect();
        for verdict in placement_refusals(&self.config, pod) {
            match verdict {
                // A toleration of the server taint matters where the scheduler may choose the
                // node. A pod bound to a node (spec.nodeName, judged below) or pinned to one by
                // name (as the DaemonSet controller pins each of its pods) can run nowhere else:
                // that node decides.
                Verdict::Deny(DenyReason::ServerTaintToleration, _) if bound || pinned.is_some() => {}
                // An UPDATE is never refused for what it did not change: the old pod earned the
                // same refusal (it predates imdsgate, or came through an exemption), and refusing
                // a label or a finalizer's removal would only leave it stuck. Each refusal is
                // weighed, so one the old pod had cannot hide one the update brings.
                Verdict::Deny(reason, _) if refused_before.contains(&reason) => {}
                verdict => return verdict,
            }
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
            && let Err(why) = crate::authz::session::check_override(namespace, chosen)
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
        let rules = match role {
            Some(_) => Some(self.namespace_rules(namespace).await),
            None => None,
        };
        if let (Some(_), Some(rules)) = (role, &rules)
            && imdsgate_core::pod_index::is_node_written(pod)
            && let Err(denial) = Authorizer::check_mirror(
                namespace,
                pod.metadata.name.as_deref().unwrap_or_default(),
                true,
                rules.mirror_pods,
            )
        {
            return Verdict::Deny(DenyReason::MirrorPodRole, format!("{denial}."));
        }
        if let (Some(annotation), Some(rules)) = (role, rules) {
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
            match self.authorizer.check_policy(namespace, &rules.policy, &resolved) {
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

    /// The namespace's rules: from the index, or read from the apiserver when the watch has not
    /// delivered the namespace yet (created a moment ago). What is read is used for this one
    /// decision and never written to the index: only the watch writes it, in order, so an old
    /// read cannot undo a newer policy.
    async fn namespace_rules(&self, namespace: &str) -> NamespaceRules {
        if !self.authorizer.namespaces.contains(namespace)
            && let Some(client) = &self.client
            && let Ok(ns) = kube::Api::<Namespace>::all(client.clone()).get(namespace).await
        {
            return NamespaceRules::of(&ns);
        }
        self.authorizer.namespaces.rules(namespace)
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

#[cfg(test)]
mod tests;
