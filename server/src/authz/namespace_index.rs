//! The namespace index: each namespace's role policy, and whether it lets mirror pods have roles,
//! parsed once when the watch delivers it. Only the namespace watch writes it.

use crate::authz::policy::NamespacePolicy;
use k8s_openapi::api::core::v1::Namespace;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Namespace annotation that lets the namespace's mirror pods (objects a kubelet writes for its
/// static pods) have the roles its policy permits: `"true"`. Without it they get none, since any
/// node may write such a pod, with any annotation, in any namespace.
pub const MIRROR_PODS_ANNOTATION: &str = "imdsgate.io/allow-mirror-pod-roles";

/// What the index keeps of a namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceRules {
    pub policy: Arc<NamespacePolicy>,
    /// [`MIRROR_PODS_ANNOTATION`] is `"true"`.
    pub mirror_pods: bool,
}

impl NamespaceRules {
    /// The rules `ns`'s annotations describe.
    pub fn of(ns: &Namespace) -> NamespaceRules {
        let annotations = ns.metadata.annotations.as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        NamespaceRules {
            policy: Arc::new(NamespacePolicy::from_annotations(get)),
            mirror_pods: get(MIRROR_PODS_ANNOTATION).is_some_and(|v| v.trim() == "true"),
        }
    }

    /// A namespace not (yet) seen: nothing permitted.
    fn none() -> NamespaceRules {
        NamespaceRules { policy: Arc::new(NamespacePolicy::Nothing), mirror_pods: false }
    }
}

/// Namespace name to rules.
#[derive(Default)]
pub struct NamespaceIndex {
    policies: RwLock<HashMap<String, NamespaceRules>>,
}

impl NamespaceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a namespace as the watch last saw it; returns its name when its policy changed (so
    /// the credentials it no longer permits can be revoked).
    pub fn apply(&self, ns: &Namespace) -> Option<String> {
        let name = ns.metadata.name.clone()?;
        let rules = NamespaceRules::of(ns);
        if let Some(why) = rules.policy.invalid_reason() {
            tracing::warn!(namespace = %name, reason = why, "namespace role policy is invalid; every role is denied");
        }
        let previous = self.write().insert(name.clone(), rules.clone());
        let unchanged = previous.unwrap_or_else(NamespaceRules::none) == rules;
        (!unchanged).then_some(name)
    }

    /// Forgets a deleted namespace (it then permits nothing); returns its name.
    pub fn delete(&self, ns: &Namespace) -> Option<String> {
        let name = ns.metadata.name.as_ref()?;
        self.write().remove(name).map(|_| name.clone())
    }

    /// Replaces every policy (a relist); returns the namespaces whose policy changed or that left.
    pub fn reset(&self, namespaces: &[Namespace]) -> Vec<String> {
        let fresh: HashMap<_, _> = namespaces
            .iter()
            .filter_map(|ns| Some((ns.metadata.name.clone()?, NamespaceRules::of(ns))))
            .collect();
        let mut policies = self.write();
        let mut changed: Vec<String> = policies
            .iter()
            .filter(|(name, old)| fresh.get(*name).is_none_or(|new| new != *old))
            .map(|(name, _)| name.clone())
            .collect();
        changed.extend(fresh.keys().filter(|name| !policies.contains_key(*name)).cloned());
        *policies = fresh;
        changed
    }

    /// The namespace's rules; a namespace not (yet) seen permits nothing.
    pub fn rules(&self, namespace: &str) -> NamespaceRules {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(namespace)
            .cloned()
            .unwrap_or_else(NamespaceRules::none)
    }

    /// The namespace's role policy; a namespace not (yet) seen permits nothing.
    pub fn policy(&self, namespace: &str) -> Arc<NamespacePolicy> {
        self.rules(namespace).policy
    }

    /// Whether the watch has delivered this namespace.
    pub fn contains(&self, namespace: &str) -> bool {
        self.policies.read().unwrap_or_else(|e| e.into_inner()).contains_key(namespace)
    }

    pub fn len(&self) -> usize {
        self.policies.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, NamespaceRules>> {
        self.policies.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::policy::PERMITTED_ANNOTATION;
    use imdsgate_core::role::resolve;

    fn mk_ns(name: &str, permitted: Option<&str>) -> Namespace {
        let annotations: Vec<_> = permitted.map(|p| (PERMITTED_ANNOTATION, p)).into_iter().collect();
        imdsgate_core::fixtures::namespace(name, &annotations)
    }

    #[test]
    fn apply_delete_reset() {
        let index = NamespaceIndex::new();
        let role = resolve("arn:aws:iam::123456789012:role/app", None).unwrap();
        assert!(index.policy("team").check(&role, None).is_err(), "unknown namespace permits nothing");
        index.apply(&mk_ns("team", Some(".*")));
        assert!(index.policy("team").check(&role, None).is_ok());
        index.apply(&mk_ns("team", None));
        assert!(index.policy("team").check(&role, None).is_err(), "annotation removed");
        index.apply(&mk_ns("team", Some(".*")));
        index.delete(&mk_ns("team", None));
        assert!(index.policy("team").check(&role, None).is_err());
        index.apply(&mk_ns("a", Some(".*")));
        index.reset(&[mk_ns("b", Some(".*"))]);
        assert!(index.policy("a").check(&role, None).is_err());
        assert!(index.policy("b").check(&role, None).is_ok());
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn policy_changes_are_reported() {
        let index = NamespaceIndex::new();
        assert_eq!(index.apply(&mk_ns("team", Some("arn:.*"))).as_deref(), Some("team"), "new policy");
        assert_eq!(index.apply(&mk_ns("team", Some("arn:.*"))), None, "same policy (labels changed, say)");
        assert_eq!(index.apply(&mk_ns("team", Some("arn:.*:role/app"))).as_deref(), Some("team"), "narrowed");
        assert_eq!(index.apply(&mk_ns("team", None)).as_deref(), Some("team"), "removed");
        assert_eq!(
            index.apply(&mk_ns("quiet", None)),
            None,
            "a new namespace without a policy changes nothing"
        );
        assert_eq!(index.delete(&mk_ns("team", None)).as_deref(), Some("team"));
        index.apply(&mk_ns("a", Some(".*")));
        index.apply(&mk_ns("b", Some(".*")));
        let mut changed =
            index.reset(&[mk_ns("b", Some(".*")), mk_ns("c", Some(".*")), mk_ns("quiet", None)]);
        changed.sort();
        assert_eq!(changed, ["a", "c"].map(String::from), "a left, c is new; b and quiet are unchanged");
    }
}
