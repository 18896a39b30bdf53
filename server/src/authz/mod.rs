//! The decision: may this pod have this role, and under which STS session. The [`authorizer`]
//! answers it from the pod and namespace indexes, with the role grammar of `imdsgate_core::role`
//! (annotation to ARN) joined to the [`role_base`], [`policy`]
//! (what a namespace permits, kept in the [`namespace_index`]) and [`session`] (session name,
//! ExternalId, tags).

pub mod authorizer;
pub mod namespace_index;
pub mod policy;
pub mod role_base;
pub mod session;

#[cfg(test)]
pub mod fixtures;
