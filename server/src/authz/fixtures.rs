//! Test fixtures for the decision: pods, namespaces with a policy, and an authorizer over them.

use crate::authz::authorizer::Authorizer;
use crate::authz::namespace_index::NamespaceIndex;
use crate::authz::policy::PERMITTED_ANNOTATION;
use crate::authz::role_base::RoleBase;
use crate::authz::session::TagConfig;
use imdsgate_core::role::BaseArn;
use imdsgate_core::{PodIndex, fixtures};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use std::sync::Arc;

/// The base ARN the fixtures' role names are joined to, account 123456789012.
pub fn base_arn() -> RoleBase {
    RoleBase::fixed(Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()))
}

pub fn mk_pod(uid: &str, ns: &str, name: &str, node: &str, ip: &str, role: Option<&str>) -> Pod {
    let pod = fixtures::pod(uid, name).namespace(ns).node(Some(node)).ip(ip);
    role.map_or(pod.clone(), |role| pod.role(role)).build()
}

pub fn mk_ns(name: &str, permitted: &str) -> Namespace {
    fixtures::namespace(name, &[(PERMITTED_ANNOTATION, permitted)])
}

/// Pods u-app (team, node-a, role app), u-none (team, node-a, no role), u-b (team, node-b,
/// app) and u-evil (locked, node-a, admin); both namespaces permit only app.
pub fn authorizer() -> Authorizer {
    let pods = Arc::new(PodIndex::new());
    let namespaces = Arc::new(NamespaceIndex::new());
    pods.apply(&mk_pod("u-app", "team", "app", "node-a", "10.0.0.1", Some("app")));
    pods.apply(&mk_pod("u-none", "team", "none", "node-a", "10.0.0.2", None));
    pods.apply(&mk_pod("u-b", "team", "b", "node-b", "10.0.0.3", Some("app")));
    pods.apply(&mk_pod("u-evil", "locked", "evil", "node-a", "10.0.0.4", Some("admin")));
    namespaces.apply(&mk_ns("team", "arn:aws:iam::123456789012:role/app"));
    namespaces.apply(&mk_ns("locked", "arn:aws:iam::123456789012:role/app"));
    Authorizer { pods, namespaces, base_arn: base_arn(), tags: TagConfig::default() }
}
