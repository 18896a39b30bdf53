//! What the cache asks of STS: the [`AssumeRole`] interface (real STS in [`crate::sts`], fakes in
//! tests), why a call gave nothing ([`StsError`]), and whether a pod waits on it (a [`Latch`] set
//! the moment a request joins a background call).

use crate::authz::session::SessionKey;
use futures::future::BoxFuture;
use imdsgate_core::latch::Latch;
use imdsgate_proto::Credentials;
use std::time::Duration;

/// Why STS gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// STS could not be reached or failed (network, throttling, 5xx): retry later.
    #[error("STS unavailable: {0}")]
    Unavailable(String),
    /// STS refused (AccessDenied, bad trust policy, bad ExternalId).
    #[error("STS refused AssumeRole: {0}")]
    Denied(String),
    /// A background call gave way to calls pods are waiting on; nothing failed.
    #[error("STS call deferred: the STS budget is in use by requests pods are waiting on")]
    Deferred,
}

/// Something that turns a session into credentials: STS itself, or a fake in tests.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role(
        &self,
        key: SessionKey,
        duration: Duration,
        urgency: Latch,
    ) -> BoxFuture<'static, Result<Credentials, StsError>>;
}
