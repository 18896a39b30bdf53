//! The decision: may the pod at this IP, with this UID, asked for by this agent, have this role?
//! Pure logic over the pod and namespace indexes; every refusal is a [`Denial`] that says why.

use crate::authz::namespace_index::NamespaceIndex;
use crate::authz::policy::NamespacePolicy;
use crate::authz::role_base::{BasePending, RoleBase};
use crate::authz::session::{SessionKey, TagConfig};
use crate::credential_cache::StsError;
use crate::grpc::agent_auth::{AgentIdentity, AuthError};
use imdsgate_core::role::{self, RoleArn, RoleError};
use imdsgate_core::{PodIndex, PodInfo};
use imdsgate_proto::Reason;
use std::net::IpAddr;
use std::sync::Arc;

/// Why a request gets no credentials.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("agent not authenticated: {0}")]
    Unauthenticated(#[from] AuthError),
    #[error("no live pod has IP {0}")]
    PodNotFound(IpAddr),
    #[error("pod UID {uid} does not own IP {ip} (the IP now belongs to another pod)")]
    PodUidMismatch { ip: IpAddr, uid: String },
    #[error("pod {namespace}/{pod} runs on node {pod_node:?}, not on the calling agent's node {agent_node}")]
    WrongNode { namespace: String, pod: String, pod_node: Option<String>, agent_node: String },
    #[error("pod {namespace}/{pod} has no iam.amazonaws.com/role annotation")]
    NoRole { namespace: String, pod: String },
    #[error("pod's role annotation is not usable: {0}")]
    RoleInvalid(#[from] RoleError),
    #[error("requested role {requested:?} is not the pod's role {annotated:?}")]
    RoleMismatch { requested: String, annotated: String },
    #[error("pod's iam.amazonaws.com/session-name {chosen:?} {why}")]
    SessionNameInvalid { chosen: String, why: String },
    #[error("namespace {namespace} does not permit role {role}: {why}")]
    NamespaceForbids { namespace: String, role: String, why: String },
    #[error(
        "pod {namespace}/{pod} is a mirror pod (an object its node could have written, with any annotation): it gets no role unless its namespace is annotated {annotation}: \"true\""
    )]
    MirrorPod { namespace: String, pod: String, annotation: &'static str },
    #[error("{0}")]
    Sts(#[from] StsError),
    /// `--role-base-arn-autodetect` has not succeeded yet, and the answer depends on the base.
    #[error("the server has not yet determined its role base ARN {0}")]
    BaseArnUnknown(BasePending),
}

/// The longest refusal text sent back to an agent, in bytes.
pub const MAX_STATUS_MESSAGE: usize = 512;

impl Denial {
    /// The stable reason the agent acts on.
    pub fn reason(&self) -> Reason {
        match self {
            Denial::InvalidArgument(_) => Reason::InvalidArgument,
            Denial::Unauthenticated(_) => Reason::AgentUnauthenticated,
            Denial::PodNotFound(_) => Reason::PodNotFound,
            Denial::PodUidMismatch { .. } => Reason::PodUidMismatch,
            Denial::WrongNode { .. } => Reason::WrongNode,
            Denial::NoRole { .. } => Reason::NoRole,
            Denial::RoleInvalid(_) => Reason::RoleInvalid,
            Denial::RoleMismatch { .. } => Reason::RoleMismatch,
            Denial::NamespaceForbids { .. } => Reason::NamespaceForbids,
            Denial::SessionNameInvalid { .. } => Reason::SessionNameInvalid,
            Denial::MirrorPod { .. } => Reason::MirrorPod,
            Denial::Sts(StsError::Denied(_)) => Reason::StsDenied,
            Denial::Sts(StsError::Unavailable(_) | StsError::Deferred) | Denial::BaseArnUnknown(_) => {
                Reason::StsUnavailable
            }
        }
    }

    /// The gRPC status for this denial: the one place denials become statuses. The text may echo
    /// what a pod sent (a role annotation, say); it is cut to [`MAX_STATUS_MESSAGE`] bytes, as an
    /// unbounded one overflows the HTTP/2 trailer and fails every call on the agent's connection.
    pub fn to_status(&self) -> tonic::Status {
        let mut message = self.to_string();
        if message.len() > MAX_STATUS_MESSAGE {
            let cut = (0..=MAX_STATUS_MESSAGE).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            message.truncate(cut);
            message.push_str("… (cut)");
        }
        self.reason().status(message)
    }
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub pod_ip: IpAddr,
    pub pod_uid: String,
    pub role: String,
}

impl Ask {
    /// Validates the raw request fields.
    pub fn parse(pod_ip: &str, pod_uid: &str, role: &str) -> Result<Ask, Denial> {
        let pod_ip = pod_ip
            .parse()
            .map_err(|_| Denial::InvalidArgument(format!("pod_ip {pod_ip:?} is not an IP address")))?;
        Ask::check_pod_and_role(pod_uid, role)?;
        Ok(Ask { pod_ip, pod_uid: pod_uid.to_string(), role: role.to_string() })
    }

    /// The rules for a pod UID and a role name as an agent sends them (in a request, or in what
    /// it holds when it opens a revocation stream).
    pub fn check_pod_and_role(pod_uid: &str, role: &str) -> Result<(), Denial> {
        if pod_uid.is_empty()
            || pod_uid.len() > 64
            || !pod_uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Denial::InvalidArgument(format!("pod_uid {pod_uid:?} is not a Kubernetes UID")));
        }
        if !role::valid_role_name(role) {
            return Err(Denial::InvalidArgument(format!("role {role:?} is not an IAM role name")));
        }
        Ok(())
    }
}

/// A refusal, with the pod when one was identified (for its Event).
#[derive(Debug)]
pub struct Refusal {
    pub pod: Option<Arc<PodInfo>>,
    pub denial: Denial,
}

/// The outcome of [`Authorizer::authorize`].
pub type Decision = Result<(Arc<PodInfo>, SessionKey), Refusal>;

/// Decides requests.
pub struct Authorizer {
    pub pods: Arc<PodIndex>,
    pub namespaces: Arc<NamespaceIndex>,
    /// Joined to role names; with autodetection it may not be known yet, and what depends on it
    /// is then refused with [`Denial::BaseArnUnknown`] (fail closed, and retried by the agent).
    pub base_arn: RoleBase,
    pub tags: TagConfig,
}

impl Authorizer {
    /// The pod behind a request, checked against the agent's node; then its session.
    pub fn authorize(&self, ask: &Ask, agent: &AgentIdentity) -> Decision {
        let claimants = self.pods.by_ip(&ask.pod_ip);
        if claimants.is_empty() {
            return Err(Refusal { pod: None, denial: Denial::PodNotFound(ask.pod_ip) });
        }
        let pod = claimants.into_iter().find(|p| p.uid == ask.pod_uid).ok_or_else(|| Refusal {
            pod: None,
            denial: Denial::PodUidMismatch { ip: ask.pod_ip, uid: ask.pod_uid.clone() },
        })?;
        if let Some(agent_node) = &agent.node
            && pod.node.as_deref() != Some(agent_node.as_str())
        {
            let denial = Denial::WrongNode {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                pod_node: pod.node.clone(),
                agent_node: agent_node.clone(),
            };
            return Err(Refusal { pod: None, denial });
        }
        let key = self.session_for(&pod).map_err(|denial| Refusal { pod: Some(pod.clone()), denial })?;
        if key.role_arn.name() != ask.role {
            let denial = Denial::RoleMismatch {
                requested: ask.role.clone(),
                annotated: key.role_arn.name().to_string(),
            };
            return Err(Refusal { pod: Some(pod), denial });
        }
        Ok((pod, key))
    }

    /// The session a pod is entitled to: its annotated role, permitted by its namespace. Every
    /// path to credentials goes through here: requests, prefetches, refreshes, revocation
    /// rechecks and `explain`.
    pub fn session_for(&self, pod: &PodInfo) -> Result<SessionKey, Denial> {
        let annotation = pod
            .role
            .as_deref()
            .ok_or_else(|| Denial::NoRole { namespace: pod.namespace.clone(), pod: pod.name.clone() })?;
        let role = self.resolve_role(annotation)?;
        let rules = self.namespaces.rules(&pod.namespace);
        Self::check_mirror(&pod.namespace, &pod.name, pod.node_written, rules.mirror_pods)?;
        self.check_policy(&pod.namespace, &rules.policy, &role)?;
        // The webhook refuses such pods; pods it never saw (exempt, or older) are refused here.
        if let Some(chosen) = &pod.session_name {
            crate::authz::session::check_override(&pod.namespace, chosen)
                .map_err(|why| Denial::SessionNameInvalid { chosen: chosen.clone(), why })?;
        }
        Ok(SessionKey::for_pod(pod, role, &self.tags))
    }

    /// A pod object its node could have written gets a role only where its namespace allows it
    /// (the server's and the webhook's rule).
    pub fn check_mirror(
        namespace: &str,
        pod: &str,
        node_written: bool,
        namespace_allows: bool,
    ) -> Result<(), Denial> {
        if node_written && !namespace_allows {
            return Err(Denial::MirrorPod {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                annotation: crate::authz::namespace_index::MIRROR_PODS_ANNOTATION,
            });
        }
        Ok(())
    }

    /// A role annotation's ARN (the server's and the webhook's resolution). A name needs the base
    /// ARN: while autodetection has not found it, [`Denial::BaseArnUnknown`].
    pub fn resolve_role(&self, annotation: &str) -> Result<RoleArn, Denial> {
        match role::resolve(annotation, self.base_arn.get()) {
            Ok(role) => Ok(role),
            Err(RoleError::NoBaseArn(name)) => Err(match self.base_arn.unknown_because() {
                Some(cause) => Denial::BaseArnUnknown(cause),
                None => Denial::RoleInvalid(RoleError::NoBaseArn(name)),
            }),
            Err(e) => Err(Denial::RoleInvalid(e)),
        }
    }

    /// Whether `policy`, `namespace`'s, permits `role`. A refusal that a name glob (relative to
    /// the base ARN) could have turned into a permission is [`Denial::BaseArnUnknown`] while
    /// autodetection has not found the base.
    pub fn check_policy(
        &self,
        namespace: &str,
        policy: &NamespacePolicy,
        role: &RoleArn,
    ) -> Result<(), Denial> {
        let base = self.base_arn.get();
        policy.check(role, base).map_err(|why| {
            let undecided =
                if base.is_none() && policy.uses_base() { self.base_arn.unknown_because() } else { None };
            match undecided {
                Some(cause) => Denial::BaseArnUnknown(cause),
                None => {
                    Denial::NamespaceForbids { namespace: namespace.to_string(), role: role.to_string(), why }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::fixtures::{authorizer, mk_pod};
    use imdsgate_core::role::BaseArn;
    use k8s_openapi::api::core::v1::Namespace;
    use serde_json::json;

    fn agent(node: &str) -> AgentIdentity {
        AgentIdentity { username: "agent".into(), node: Some(node.into()) }
    }

    fn ask(ip: &str, uid: &str, role: &str) -> Ask {
        Ask::parse(ip, uid, role).unwrap()
    }

    fn reason(decision: Decision) -> Reason {
        decision.expect_err("denied").denial.reason()
    }

    #[test]
    fn annotated_permitted_pod_gets_its_session() {
        let a = authorizer();
        let (pod, key) = a.authorize(&ask("10.0.0.1", "u-app", "app"), &agent("node-a")).unwrap();
        assert_eq!(pod.name, "app");
        assert_eq!(key.role_arn.as_str(), "arn:aws:iam::123456789012:role/app");
        assert_eq!(key.session_name, "team.app");
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let a = authorizer();
        let node_a = agent("node-a");
        assert_eq!(reason(a.authorize(&ask("10.9.9.9", "u-app", "app"), &node_a)), Reason::PodNotFound);
        assert_eq!(reason(a.authorize(&ask("10.0.0.1", "u-other", "app"), &node_a)), Reason::PodUidMismatch);
        assert_eq!(reason(a.authorize(&ask("10.0.0.2", "u-none", "app"), &node_a)), Reason::NoRole);
        assert_eq!(reason(a.authorize(&ask("10.0.0.1", "u-app", "admin"), &node_a)), Reason::RoleMismatch);
        assert_eq!(reason(a.authorize(&ask("10.0.0.3", "u-b", "app"), &node_a)), Reason::WrongNode);
        assert_eq!(
            reason(a.authorize(&ask("10.0.0.4", "u-evil", "admin"), &node_a)),
            Reason::NamespaceForbids
        );
    }

    /// A compromised node can write a mirror pod in any namespace, naming any role, on itself: it
    /// gets nothing for it, unless the namespace opted its mirror pods in.
    #[test]
    fn a_mirror_pod_gets_no_role_unless_its_namespace_allows_it() {
        let a = authorizer();
        let mirror = imdsgate_core::fixtures::pod("u-static", "static-app")
            .ip("10.0.0.8")
            .role("app")
            .mirror()
            .build();
        a.pods.apply(&mirror);
        let asked = ask("10.0.0.8", "u-static", "app");
        assert_eq!(reason(a.authorize(&asked, &agent("node-a"))), Reason::MirrorPod);
        let info = a.pods.by_uid("u-static").unwrap();
        assert!(matches!(a.session_for(&info), Err(Denial::MirrorPod { .. })), "prefetch and rechecks too");
        a.namespaces.apply(&imdsgate_core::fixtures::namespace(
            "team",
            &[
                (crate::authz::policy::PERMITTED_ANNOTATION, "arn:aws:iam::123456789012:role/app"),
                (crate::authz::namespace_index::MIRROR_PODS_ANNOTATION, "true"),
            ],
        ));
        assert!(a.authorize(&asked, &agent("node-a")).is_ok());
    }

    #[test]
    fn an_unusable_session_name_is_refused_not_cut() {
        let a = authorizer();
        let mut pod = mk_pod("u-long", "team", "long", "node-a", "10.0.0.9", Some("app"));
        pod.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(imdsgate_core::pod_index::SESSION_NAME_ANNOTATION.into(), "x".repeat(60));
        a.pods.apply(&pod);
        assert_eq!(
            reason(a.authorize(&ask("10.0.0.9", "u-long", "app"), &agent("node-a"))),
            Reason::SessionNameInvalid
        );
    }

    #[test]
    fn unbound_agents_may_ask_for_any_node_only_when_allowed_upstream() {
        let a = authorizer();
        let unbound = AgentIdentity { username: "agent".into(), node: None };
        assert!(a.authorize(&ask("10.0.0.3", "u-b", "app"), &unbound).is_ok());
    }

    #[test]
    fn malformed_requests_are_invalid_arguments() {
        for (ip, uid, role) in [
            ("not-an-ip", "u", "app"),
            ("10.0.0.1", "", "app"),
            ("10.0.0.1", "uid with space", "app"),
            ("10.0.0.1", "u", ""),
            ("10.0.0.1", "u", "bad/role"),
            ("10.0.0.1", &"u".repeat(65), "app"),
        ] {
            let denial = Ask::parse(ip, uid, role).unwrap_err();
            assert_eq!(denial.reason(), Reason::InvalidArgument, "{ip} {uid} {role}");
            assert_eq!(denial.to_status().code(), tonic::Code::InvalidArgument);
        }
    }
    #[test]
    fn refusal_texts_echoing_huge_fields_are_cut() {
        let huge = "ä".repeat(60_000);
        let denial = Ask::parse("10.0.0.1", "u-1", &huge).unwrap_err();
        let status = denial.to_status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE + 10, "{}", status.message().len());
        assert!(
            status.message().contains("role \"ää") && status.message().ends_with("… (cut)"),
            "{}",
            status.message()
        );
        let short = Ask::parse("nope", "u-1", "r").unwrap_err().to_status();
        assert!(short.message().ends_with("pod_ip \"nope\" is not an IP address"), "{}", short.message());
    }

    #[test]
    fn until_the_base_arn_is_detected_what_needs_it_is_unavailable_then_served() {
        let mut a = authorizer();
        a.base_arn = RoleBase::detecting();
        a.pods.apply(&mk_pod(
            "u-arn",
            "team",
            "arn",
            "node-a",
            "10.0.0.5",
            Some("arn:aws:iam::123456789012:role/app"),
        ));
        let globbed: Namespace = serde_json::from_value(json!({ "metadata": { "name": "globbed",
            "annotations": { crate::authz::policy::ALLOWED_ROLES_ANNOTATION: "[\"app\"]" } } }))
        .unwrap();
        a.namespaces.apply(&globbed);
        a.pods.apply(&mk_pod(
            "u-glob",
            "globbed",
            "g",
            "node-a",
            "10.0.0.6",
            Some("arn:aws:iam::123456789012:role/app"),
        ));
        let node_a = agent("node-a");

        // Before the first answer, and after a failure: refused, fail closed, saying why.
        let before = a.authorize(&ask("10.0.0.1", "u-app", "app"), &node_a).unwrap_err().denial.to_status();
        assert_eq!(before.code(), tonic::Code::Unavailable);
        assert_eq!(
            before.message(),
            "the server has not yet determined its role base ARN (its first GetCallerIdentity, with its \
             own AWS credentials, has not answered yet)"
        );
        a.base_arn.failed("GetCallerIdentity failed: dispatch failure: no credentials".into());

        // A role name needs the base: refused, fail closed, with the cause; the pod is named (for
        // its Event).
        let refusal = a.authorize(&ask("10.0.0.1", "u-app", "app"), &node_a).unwrap_err();
        assert_eq!(refusal.pod.as_ref().map(|p| p.name.as_str()), Some("app"));
        let status = refusal.denial.to_status();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(Reason::of(&status), Some(Reason::StsUnavailable));
        assert_eq!(
            status.message(),
            "the server has not yet determined its role base ARN because its own AWS credentials failed: \
             GetCallerIdentity failed: dispatch failure: no credentials"
        );
        // So does a policy whose name globs are relative to it.
        assert!(matches!(
            a.authorize(&ask("10.0.0.6", "u-glob", "app"), &node_a).unwrap_err().denial,
            Denial::BaseArnUnknown(_)
        ));
        // A full ARN under a full-ARN policy does not, and other refusals stay what they are.
        assert!(a.authorize(&ask("10.0.0.5", "u-arn", "app"), &node_a).is_ok());
        assert_eq!(reason(a.authorize(&ask("10.0.0.2", "u-none", "app"), &node_a)), Reason::NoRole);

        assert!(a.base_arn.detected(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()));
        let (_, key) = a.authorize(&ask("10.0.0.1", "u-app", "app"), &node_a).expect("served once detected");
        assert_eq!(key.role_arn.as_str(), "arn:aws:iam::123456789012:role/app");
        assert!(a.authorize(&ask("10.0.0.6", "u-glob", "app"), &node_a).is_ok());
        assert_eq!(
            reason(a.authorize(&ask("10.0.0.4", "u-evil", "admin"), &node_a)),
            Reason::NamespaceForbids
        );
        assert!(!a.base_arn.detected(BaseArn::parse("arn:aws:iam::210987654321:role/").unwrap()), "set once");
    }

    #[test]
    fn ip_reuse_answers_only_for_the_requested_uid() {
        let a = authorizer();
        a.pods.apply(&mk_pod("u-new", "team", "new", "node-a", "10.0.0.1", Some("app")));
        let (pod, _) = a.authorize(&ask("10.0.0.1", "u-new", "app"), &agent("node-a")).unwrap();
        assert_eq!(pod.name, "new");
        let (pod, _) = a.authorize(&ask("10.0.0.1", "u-app", "app"), &agent("node-a")).unwrap();
        assert_eq!(pod.name, "app");
    }
}
