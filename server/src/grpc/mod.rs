//! The agents' edge: the `Credentials` gRPC [`service`] (GetCredentials, WatchRevocations), the
//! [`agent_auth`]entication of callers by their ServiceAccount token, the mutual-TLS listener
//! ([`tls_server`]), and the [`revocation`]s pushed to agents over their streams.

pub mod agent_auth;
pub mod revocation;
pub mod service;
pub mod tls_server;
