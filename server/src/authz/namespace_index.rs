//! The namespace index: each namespace's role policy, parsed once when the watch delivers it.

use crate::authz::policy::NamespacePolicy;
use k8s_openapi::api::core::v1::Namespace;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Namespace name to policy.
#[derive(Default)]
pub struct NamespaceIndex {
    policies: RwLock<HashMap<String, Arc<NamespacePolicy>>>,
}

impl NamespaceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a namespace as the watch last saw it; returns its name when its policy changed (so
    /// the credentials it no longer permits can be revoked).
    pub fn apply(&self, ns: &Namespace) -> Option<String> {
        let name = ns.metadata.name.clone()?;
        let policy = policy_of(ns);
        if let Some(why) = policy.invalid_reason() {
            tracing::warn!(namespace = %name, reason = why, "namespace role policy is invalid; every role is denied");
        }
        let previous = self.write().insert(name.clone(), Arc::new(policy.clone()));
        let unchanged = match previous {
            Some(previous) => *previous == policy,
            None => policy == NamespacePolicy::Nothing,
        };
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
            .filter_map(|ns| Some((ns.metadata.name.clone()?, Arc::new(policy_of(ns)))))
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

    /// The namespace's policy; a namespace not (yet) seen permits nothing.
    pub fn policy(&self, namespace: &str) -> Arc<NamespacePolicy> {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| Arc::new(NamespacePolicy::Nothing))
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

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<NamespacePolicy>>> {
        self.policies.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn policy_of(ns: &Namespace) -> NamespacePolicy {
    NamespacePolicy::from_annotations(|key| {
        ns.metadata.annotations.as_ref().and_then(|a| a.get(key)).cloned()
    })
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
