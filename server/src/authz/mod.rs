//! The decision: may this pod have this role, and under which STS session. The [`authorizer`]
//! answers it from the pod and namespace indexes, with [`role`] (annotation to ARN), [`policy`]
//! (what a namespace permits, kept in the [`namespace_index`]) and [`session`] (session name,
//! ExternalId, tags).

pub mod authorizer;
pub mod namespace_index;
pub mod policy;
pub mod role;
pub mod session;

#[cfg(test)]
pub mod fixtures;
