//! What the authenticator remembers of past TokenReviews, by token digest: accepted reviews until
//! the token expires (at most ten minutes) or its agent pod is deleted, whichever comes first;
//! refusals for a few seconds (a token sent again and again costs one review, not one each); and
//! the pods deleted lately: a token bound to one of them is refused whatever a review says (the
//! apiserver caches its own token checks for ten seconds, and a review it answered just before the
//! pod went may arrive after the deletion was seen). A pod's UID is never reused, so a pod deleted
//! stays deleted.
//!
//! Bounded and fair: each node (the holder of a bound token) keeps at most a few accepted reviews
//! (a node that mints tokens in a loop pushes out only its own), the whole map is capped and, when
//! full, gives up the review closest to its end; refusals are capped and the oldest goes first.

use super::{AgentIdentity, AuthError};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

pub(super) type TokenDigest = [u8; 32];

/// Accepted reviews cached at most: one per agent token in use (an agent holds one token at a
/// time, two around a rotation), so 25,000 nodes at [`MAX_PER_HOLDER`]; about 250 bytes each.
pub const MAX_ACCEPTED: usize = 100_000;
/// Accepted reviews cached per holder (a node; an unbound token's pod): an agent pod holds one
/// token, two around a rotation, and a DaemonSet rollout briefly runs two agent pods on a node.
pub const MAX_PER_HOLDER: usize = 4;
/// How long a refusal is remembered: long enough that a token sent in a loop costs one review
/// every few seconds, short enough that a token refused by a passing fault (a pod not yet in the
/// apiserver's cache) works again soon.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// Refusals remembered at most (about 100 bytes each); past this the oldest is forgotten.
pub const MAX_REFUSED: usize = 10_000;
/// Pod deletions remembered: more than any apiserver deletes in the ten seconds it may still
/// accept a deleted pod's token. Past this, a review that started before the oldest remembered
/// deletion is answered but not cached.
pub const MAX_DELETIONS: usize = 8_192;

struct Accepted {
    identity: AgentIdentity,
    until: SystemTime,
    /// The agent pod the token is bound to (`authentication.kubernetes.io/pod-uid`).
    pod: Option<String>,
    holder: Option<String>,
}

/// See the module documentation.
#[derive(Default)]
pub(super) struct Reviews {
    accepted: HashMap<TokenDigest, Accepted>,
    /// Accepted reviews of each holder, oldest first.
    by_holder: HashMap<String, VecDeque<TokenDigest>>,
    /// Accepted reviews of tokens bound to each pod.
    by_pod: HashMap<String, Vec<TokenDigest>>,
    refused: HashMap<TokenDigest, (AuthError, SystemTime)>,
    refused_order: VecDeque<TokenDigest>,
    /// Pod deletions seen, numbered: (number, pod UID), oldest first.
    deletions: VecDeque<(u64, String)>,
    /// The number the next deletion gets.
    next_deletion: u64,
}

/// Whether a pod is known to be deleted.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Deleted {
    Yes,
    No,
    /// Not among the deletions remembered, but some since the review started were forgotten.
    Unknown,
}

impl Reviews {
    /// What is remembered of the token `digest` and still holds at `now`.
    pub(super) fn lookup(
        &mut self,
        digest: &TokenDigest,
        now: SystemTime,
    ) -> Option<Result<AgentIdentity, AuthError>> {
        if let Some(accepted) = self.accepted.get(digest) {
            if accepted.until > now {
                return Some(Ok(accepted.identity.clone()));
            }
            self.remove(digest);
        }
        match self.refused.get(digest) {
            Some((error, until)) if *until > now => Some(Err(error.clone())),
            _ => None,
        }
    }

    /// The mark a review takes when it starts, for [`Reviews::deleted`].
    pub(super) fn mark(&self) -> u64 {
        self.next_deletion
    }

    /// Whether the pod `uid` is deleted, for a review that started at `mark`.
    pub(super) fn deleted(&self, uid: &str, mark: u64) -> Deleted {
        if self.deletions.iter().any(|(_, gone)| gone == uid) {
            Deleted::Yes
        } else if self.deletions.front().is_some_and(|(oldest, _)| *oldest > mark) {
            Deleted::Unknown
        } else {
            Deleted::No
        }
    }

    /// Remembers an accepted review of `digest` until `until`.
    pub(super) fn accept(
        &mut self,
        digest: TokenDigest,
        identity: AgentIdentity,
        pod: Option<String>,
        until: SystemTime,
        now: SystemTime,
    ) {
        self.remove(&digest);
        if until <= now {
            return;
        }
        let holder = identity.node.clone().or_else(|| pod.clone());
        if let Some(holder) = &holder {
            let held = self.by_holder.get(holder).map_or(0, VecDeque::len);
            if held >= MAX_PER_HOLDER
                && let Some(oldest) = self.by_holder.get(holder).and_then(|q| q.front().copied())
            {
                self.remove(&oldest);
            }
        }
        if self.accepted.len() >= MAX_ACCEPTED {
            let ended: Vec<TokenDigest> =
                self.accepted.iter().filter(|(_, a)| a.until <= now).map(|(d, _)| *d).collect();
            ended.iter().for_each(|d| self.remove(d));
        }
        if self.accepted.len() >= MAX_ACCEPTED
            && let Some(soonest) = self.accepted.iter().min_by_key(|(_, a)| a.until).map(|(d, _)| *d)
        {
            self.remove(&soonest);
        }
        if let Some(holder) = &holder {
            self.by_holder.entry(holder.clone()).or_default().push_back(digest);
        }
        if let Some(pod) = &pod {
            self.by_pod.entry(pod.clone()).or_default().push(digest);
        }
        self.accepted.insert(digest, Accepted { identity, until, pod, holder });
    }

    /// Remembers that `digest` was refused with `error`, for [`REFUSAL_TTL`].
    pub(super) fn refuse(&mut self, digest: TokenDigest, error: AuthError, now: SystemTime) {
        if self.refused.insert(digest, (error, now + REFUSAL_TTL)).is_some() {
            return;
        }
        self.refused_order.push_back(digest);
        // Forget refusals that ended, then the oldest while over the cap.
        while let Some(oldest) = self.refused_order.front().copied() {
            let ended = self.refused.get(&oldest).is_none_or(|(_, until)| *until <= now);
            if !ended && self.refused.len() <= MAX_REFUSED {
                break;
            }
            self.refused_order.pop_front();
            self.refused.remove(&oldest);
        }
    }

    /// The pod `uid` was deleted: the reviews of tokens bound to it are forgotten, and a review
    /// under way for one of them will not be cached.
    pub(super) fn pod_deleted(&mut self, uid: &str) {
        if self.deletions.len() >= MAX_DELETIONS {
            self.deletions.pop_front();
        }
        self.deletions.push_back((self.next_deletion, uid.to_string()));
        self.next_deletion += 1;
        for digest in self.by_pod.remove(uid).unwrap_or_default() {
            self.remove(&digest);
        }
    }

    /// Pods of cached reviews that `alive` says are gone (a relist of every pod).
    pub(super) fn gone_pods(&self, alive: impl Fn(&str) -> bool) -> Vec<String> {
        self.by_pod.keys().filter(|uid| !alive(uid)).cloned().collect()
    }

    fn remove(&mut self, digest: &TokenDigest) {
        let Some(gone) = self.accepted.remove(digest) else { return };
        if let Some(holder) = gone.holder
            && let Some(held) = self.by_holder.get_mut(&holder)
        {
            held.retain(|d| d != digest);
            if held.is_empty() {
                self.by_holder.remove(&holder);
            }
        }
        if let Some(pod) = gone.pod
            && let Some(tokens) = self.by_pod.get_mut(&pod)
        {
            tokens.retain(|d| d != digest);
            if tokens.is_empty() {
                self.by_pod.remove(&pod);
            }
        }
    }

    pub(super) fn accepted_len(&self) -> usize {
        self.accepted.len()
    }

    #[cfg(test)]
    pub(super) fn refused_len(&self) -> usize {
        self.refused.len()
    }
}
