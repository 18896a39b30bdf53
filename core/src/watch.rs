//! Drives a Kubernetes watch into an index: objects applied, deleted, and whole relists delivered
//! as one [`Update::Reset`] so an index never serves a half-listed view. Counts restarts and says
//! when the first list has completed (readiness).

use crate::latch::Latch;
use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};

/// One change for an index to take.
#[derive(Debug)]
pub enum Update<K> {
    Apply(K),
    Delete(K),
    /// A complete relist: everything not in it is gone.
    Reset(Vec<K>),
}

/// Feeds `events` (a kube-runtime watcher stream, with backoff) to `handle` until the stream ends,
/// which a watcher with backoff never does: the caller treats a return as the death of a critical
/// task. `synced` is set once the first complete list has been handed over (readiness). `on_error`
/// is told about every watch error (they are retried by the stream's backoff).
pub async fn drive<K, S>(
    what: &'static str,
    events: S,
    synced: Latch,
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
        let synced = Latch::default();
        let mut seen = Vec::new();
        drive("test", events, synced.clone(), |_| {}, |u| seen.push(format!("{u:?}"))).await;
        assert_eq!(seen, ["Reset([1, 2])", "Apply(3)", "Delete(1)"]);
        assert!(synced.is_set());
    }

    #[tokio::test]
    async fn not_synced_before_the_first_list_completes() {
        let events = futures::stream::iter(vec![Ok(Event::Init), Ok(Event::InitApply(1))]);
        let synced = Latch::default();
        drive("test", events, synced.clone(), |_| {}, |_: Update<i32>| {}).await;
        assert!(!synced.is_set());
    }
}
