//! A one-shot flag that tasks wait on: set once (a watch synced, a stream closed, a base ARN
//! detected), never cleared, and waiting costs nothing once it is set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

/// See the module documentation. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct Latch(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    set: AtomicBool,
    notify: Notify,
}

impl Latch {
    /// A latch set from the start when `set`.
    pub fn new(set: bool) -> Latch {
        let latch = Latch::default();
        if set {
            latch.set();
        }
        latch
    }

    /// Sets the flag and wakes every waiter; later calls change nothing.
    pub fn set(&self) {
        self.0.set.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set (at once if it is).
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a `set` between the two is not missed.
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_wake_when_set_and_later_waits_return_at_once() {
        let latch = Latch::default();
        assert!(!latch.is_set());
        let waiter = tokio::spawn({
            let latch = latch.clone();
            async move { latch.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a wait on an unset latch returned");
        latch.set();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(latch.is_set());
        tokio::time::timeout(Duration::from_secs(1), latch.wait()).await.unwrap();
        latch.set();
        assert!(latch.is_set());
    }
}
