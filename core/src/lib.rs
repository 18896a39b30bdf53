//! What the imdsgate agent and server share: the pod index and the watch driver that feeds it, the
//! admin HTTP endpoint, the hardened HTTP server behind every listener, TLS files with reload,
//! logging, shutdown and start-up errors, and the flags both binaries take alike.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod cert_expiry;
pub mod common_args;
pub mod events;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod http_server;
pub mod latch;
pub mod liveness;
pub mod pod_index;
pub mod process;
pub mod role;
pub mod tls;
pub mod watch;

pub use pod_index::{Change, PodIndex, PodInfo};
