//! Drives a Kubernetes watch into an index: objects applied, deleted, and whole relists delivered
//! as one [`Update::Reset`] so an index never serves a half-listed view. Counts restarts and says
//! when the first list has completed (readiness).

use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One change for an index to take.
#[derive(Debug)]
pub enum Update<K> {
    Apply(K),
    Delete(K),
    /// A complete relist: everything not in it is gone.
    Reset(Vec<K>),
}

/// Whether a watch has delivered its first complete list.
#[derive(Clone, Debug, Default)]
pub struct Synced(Arc<(AtomicBool, tokio::sync::Notify)>);

impl Synced {
    pub fn get(&self) -> bool {
        self.0.0.load(Ordering::Acquire)
    }

    /// Resolves once the watch has synced.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        self.0.0.store(true, Ordering::Release);
        self.0.1.notify_waiters();
    }
}

/// Feeds `events` (a kube-runtime watcher stream, with backoff) to `handle` until the stream ends,
/// which a watcher with backoff never does: the caller treats a return as the death of a critical
/// task. `on_error` is told about every watch error (they are retried by the stream's backoff).
pub async fn drive<K, S>(
    what: &'static str,
    events: S,
    synced: Synced,
    mut on_error: impl FnMut(&watcher::Error),
    mut handle: impl FnMut(Update<K>),
) where
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    let mut relist: Option<Vec<K>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist = Some(Vec::new()),
            Ok(Event::InitApply(obj)) => match relist.as_mut() {
                Some(buffer) => buffer.push(obj),
                None => handle(Update::Apply(obj)),
            },
            Ok(Event::InitDone) => {
                let objs = relist.take().unwrap_or_default();
                tracing::debug!(what, count = objs.len(), "watch listed");
                handle(Update::Reset(objs));
                synced.set();
            }
            Ok(Event::Apply(obj)) => handle(Update::Apply(obj)),
            Ok(Event::Delete(obj)) => handle(Update::Delete(obj)),
            Err(error) => {
                tracing::warn!(what, %error, "watch failed; retrying with backoff");
                on_error(&error);
            }
        }
    }
    tracing::error!(what, "watch stream ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_relist_is_delivered_whole_and_marks_the_watch_synced() {
        let events = futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(1)),
            Ok(Event::InitApply(2)),
            Ok(Event::InitDone),
            Ok(Event::Apply(3)),
            Ok(Event::Delete(1)),
        ]);
        let synced = Synced::default();
        let mut seen = Vec::new();
        drive("test", events, synced.clone(), |_| {}, |u| seen.push(format!("{u:?}"))).await;
        assert_eq!(seen, ["Reset([1, 2])", "Apply(3)", "Delete(1)"]);
        assert!(synced.get());
    }

    #[tokio::test]
    async fn not_synced_before_the_first_list_completes() {
        let events = futures::stream::iter(vec![Ok(Event::Init), Ok(Event::InitApply(1))]);
        let synced = Synced::default();
        drive("test", events, synced.clone(), |_| {}, |_: Update<i32>| {}).await;
        assert!(!synced.get());
    }
}
