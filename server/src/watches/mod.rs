//! What the server does when the cluster changes, one module per watched resource. Each keeps its
//! reactions (what one event does: index it, revoke, prefetch) in a plain synchronous method on a
//! state struct, tested without a cluster, and a small async `watch` that feeds it from the
//! Kubernetes watch through [`imdsgate_core::watch::drive`].

pub mod namespaces;
pub mod nodes;
pub mod pods;

#[cfg(test)]
pub(crate) mod fixtures;
