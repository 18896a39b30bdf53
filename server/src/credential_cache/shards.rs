//! The cache's maps, split into independently locked shards by pod UID.

use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

/// How many locks the cache's maps are split into.
pub(super) const SHARDS: usize = 32;

/// A map split into independently locked shards by a pod's UID, so that concurrent requests for
/// different pods rarely wait on the same lock (every request takes one, hits included). A
/// caller holds at most one shard of a map at a time.
pub(super) struct Shards<M> {
    shards: Vec<Mutex<M>>,
}

impl<M: Default> Shards<M> {
    pub(super) fn new() -> Self {
        Shards { shards: (0..SHARDS).map(|_| Mutex::default()).collect() }
    }

    /// The shard holding `pod_uid`'s entries.
    pub(super) fn of(&self, pod_uid: &str) -> MutexGuard<'_, M> {
        let mut hasher = std::hash::DefaultHasher::new();
        pod_uid.hash(&mut hasher);
        let shard = &self.shards[(hasher.finish() % self.shards.len() as u64) as usize];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard, one after the other.
    pub(super) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, M>> {
        self.shards.iter().map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
