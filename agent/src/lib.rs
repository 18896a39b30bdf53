//! imdsgate agent: runs on every node. An iptables rule sends pod traffic for the metadata address
//! to it; it names the calling pod by source IP from a watch of its own node's pods and answers the
//! EC2 instance metadata API (IMDSv2 included) with the pod's role, getting credentials from the
//! imdsgate server.
#![forbid(unsafe_code)]

// The command line and the wiring: flags and their checks, the subcommands, the tasks of a run.
pub mod args;
pub mod run;

// What a pod sees: the metadata API (routes, tokens, documents, proxy, listener, refusal Events).
pub mod imds;

// Where its credentials come from: the cache, the server client, the revocation feed.
pub mod credentials;

// What the agent knows of its node's pods, and what a change there does to the cache.
pub mod pod_watch;

// The node's side: the interception rule, and removing it when imdsgate goes.
pub mod interception;
pub mod uninstall;

// The agent's Prometheus metrics.
pub mod metrics;

pub use args::Args;
