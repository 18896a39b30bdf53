//! imdsgate server: the only part of imdsgate with AWS rights. It watches every pod and namespace,
//! decides whether a pod may have the role it asks for, obtains credentials from STS, caches and
//! refreshes them, and answers agents over mutual-TLS gRPC.
//!
//! Reading order: [`args`] (flags and validation), [`run`] (what starts and how it stops), then
//! one folder per face: [`watches`] (what a Pod, Namespace or Node event does), [`authz`] (the
//! decision), [`grpc`] (the agents' edge), [`admission`] (the webhook).
#![forbid(unsafe_code)]

// Start-up: flags, validation, wiring.
pub mod args;
pub mod run;

// What the server does when the cluster changes: pods, namespaces, nodes.
pub mod watches;

// The decision: may this pod have this role, under which session.
pub mod authz;

// Credentials: STS (and the base-ARN detection), and the cache in front of it.
pub mod budget;
pub mod credential_cache;
pub mod sts;

// The agents' edge: the gRPC service, agent authentication, the mTLS listener, revocations.
pub mod grpc;

// The admission webhook: protocol, placement rules, server nodes, listener.
pub mod admission;

// Around them: `explain`, Kubernetes Events, Prometheus metrics.
pub mod events;
pub mod explain;
pub mod metrics;

pub use args::{Args, PolicyArgs};
