//! What the cache asks of STS: the [`AssumeRole`] interface (real STS in [`crate::sts`], fakes in
//! tests), why a call gave nothing ([`StsError`]), and whether a pod waits on it ([`Urgency`]).

use crate::authz::session::SessionKey;
use futures::future::BoxFuture;
use imdsgate_proto::Credentials;
use std::sync::Arc;
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

/// Whether a pod is waiting on an STS call. A background call becomes urgent the moment a
/// request joins it.
#[derive(Debug, Default)]
pub struct Urgency {
    urgent: std::sync::atomic::AtomicBool,
    raised: tokio::sync::Notify,
}

impl Urgency {
    pub fn new(urgent: bool) -> Arc<Urgency> {
        Arc::new(Urgency { urgent: urgent.into(), raised: tokio::sync::Notify::new() })
    }

    pub fn is_urgent(&self) -> bool {
        self.urgent.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn raise(&self) {
        if !self.urgent.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.raised.notify_waiters();
        }
    }

    /// Resolves once the call is urgent.
    pub async fn raised(&self) {
        loop {
            let notified = self.raised.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_urgent() {
                return;
            }
            notified.await;
        }
    }
}

/// Something that turns a session into credentials: STS itself, or a fake in tests.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role(
        &self,
        key: SessionKey,
        duration: Duration,
        urgency: Arc<Urgency>,
    ) -> BoxFuture<'static, Result<Credentials, StsError>>;
}
