//! Test fixtures: an in-memory STS for a real [`CredentialCache`](super::CredentialCache), shared
//! by the cache's own tests and the tests of what drives it (revocations, the pod watch).

use super::{AssumeRole, Clock, StsError};
use crate::authz::session::SessionKey;
use futures::FutureExt;
use futures::future::BoxFuture;
use imdsgate_core::latch::Latch;
use imdsgate_proto::Credentials;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;

/// A fake STS: counts calls, can be made to fail, can be held at a gate.
pub struct FakeSts {
    pub calls: AtomicU32,
    pub fail: Mutex<Option<StsError>>,
    pub gate: Arc<Semaphore>,
    pub clock: Clock,
    pub urgencies: Mutex<Vec<Latch>>,
}

impl FakeSts {
    /// A fake that answers every call at once, on `clock`'s time.
    pub fn new(clock: Clock) -> Self {
        FakeSts {
            calls: AtomicU32::new(0),
            fail: Mutex::new(None),
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            clock,
            urgencies: Mutex::new(Vec::new()),
        }
    }

    /// How many AssumeRole calls it has had.
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Default for FakeSts {
    /// On the wall clock.
    fn default() -> Self {
        FakeSts::new(Arc::new(SystemTime::now))
    }
}

impl AssumeRole for FakeSts {
    fn assume_role(
        &self,
        key: SessionKey,
        duration: Duration,
        urgency: Latch,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        self.urgencies.lock().unwrap().push(urgency);
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = self.fail.lock().unwrap().clone();
        let gate = self.gate.clone();
        let now = (self.clock)();
        async move {
            let _permit = gate.acquire().await.unwrap();
            if let Some(e) = fail {
                return Err(e);
            }
            Ok(Credentials {
                access_key_id: format!("ASIA{n}"),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: now + duration,
                issued_at: now,
                role_arn: key.role_arn.to_string(),
                account_id: key.role_arn.account().into(),
            })
        }
        .boxed()
    }
}

/// Lets spawned tasks (fetches, prefetches) run to their next wait.
pub async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}
