//! Node binding: each agent call carries the agent's projected ServiceAccount token (audience
//! `imdsgate`). The server verifies it with TokenReview, requires the configured audience in the
//! review's answer, the configured agent ServiceAccount, and takes the node name the apiserver put
//! in the review; the server then only answers for pods on that node.
//!
//! Reviews are cached by token digest ([`reviews`]) until the token expires (at most ten minutes)
//! or the pod the token is bound to is deleted, which the pod watch reports
//! ([`AgentAuthenticator::pod_deleted`], [`AgentAuthenticator::pods_listed`]): a deleted agent
//! pod's token stops working as soon as this replica's watch sees the deletion. Refusals are cached
//! for a few seconds; concurrent calls with one token share one review (an agent's stream and first
//! calls, all arriving together when a replica starts, cost the apiserver one review, not one
//! each); and each connection may start only a few reviews ([`REVIEWS_PER_CONNECTION`]), so a
//! client with a certificate cannot turn a stream of made-up tokens into a stream of TokenReviews.

mod reviews;

pub use reviews::{MAX_ACCEPTED, MAX_PER_HOLDER, MAX_REFUSED, REFUSAL_TTL};

/// Accepted reviews cached at most (the name the scale run reports).
pub const MAX_CACHE_ENTRIES: usize = MAX_ACCEPTED;

use crate::budget::{Allowance, Bucket};
use crate::metrics::{Metrics, OutcomeLabels};
use base64::Engine as _;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use reviews::{Deleted, Reviews, TokenDigest};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The extra key in which the apiserver reports the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The extra key in which the apiserver reports the UID of the pod a token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const MAX_CACHE_TTL: Duration = Duration::from_secs(600);
/// TokenReviews one connection may start: 8 at once, then one per 15 s. An agent presents one
/// token at a time (two around its rotation, every ~48 minutes), reviewed once per replica while
/// cached, so it needs one or two; a replica restart or a rotation never needs 8. 2,000 made-up
/// tokens on one connection cost the apiserver 8 reviews and then 4 a minute.
pub const REVIEWS_PER_CONNECTION: Allowance = Allowance { burst: 8.0, every: Duration::from_secs(15) };
/// Connections whose review allowance is counted at most; past this, connections whose allowance
/// is whole again are forgotten first, then the one with the most left.
const MAX_CONNECTIONS: usize = 65_536;
/// Reviews in flight shared at most; past this (a reconnect storm of more distinct tokens at once)
/// a call reviews on its own.
const MAX_IN_FLIGHT: usize = 4_096;

type Review = Shared<BoxFuture<'static, Result<TokenReviewStatus, String>>>;
/// A review under way, and the deletion mark it started at.
type InFlight = (Review, u64);

/// Who the calling agent is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    pub username: String,
    /// The node the agent's token is bound to; `None` only with `--allow-unbound-agents`.
    pub node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no agent token in the `authorization` metadata")]
    Missing,
    #[error("the agent token was not accepted: {0}")]
    Rejected(String),
    #[error("the token belongs to {0}, not the imdsgate agent's ServiceAccount")]
    WrongServiceAccount(String),
    #[error(
        "the agent token is not bound to a node (use a projected, pod-bound token, or --allow-unbound-agents)"
    )]
    Unbound,
    #[error("TokenReview failed: {0}")]
    ReviewFailed(String),
    #[error("the TokenReview's audiences {0:?} do not include this server's audience")]
    WrongAudience(Vec<String>),
    #[error("the agent pod the token is bound to has been deleted")]
    PodGone,
    #[error("this connection sent too many distinct agent tokens; reconnect and send a valid one")]
    Throttled,
}

/// Reviews tokens: the apiserver, or a fake in tests.
pub trait TokenReviewer: Send + Sync + 'static {
    fn review(
        &self,
        token: String,
        audience: String,
    ) -> BoxFuture<'static, Result<TokenReviewStatus, String>>;
}

impl TokenReviewer for kube::Client {
    fn review(
        &self,
        token: String,
        audience: String,
    ) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
        let api: Api<TokenReview> = Api::all(self.clone());
        async move {
            let review = TokenReview {
                spec: TokenReviewSpec { token: Some(token), audiences: Some(vec![audience]) },
                ..Default::default()
            };
            let out = api.create(&PostParams::default(), &review).await.map_err(|e| e.to_string())?;
            out.status.ok_or_else(|| "TokenReview returned no status".to_string())
        }
        .boxed()
    }
}

/// Authenticates agents.
pub struct AgentAuthenticator {
    reviewer: Arc<dyn TokenReviewer>,
    audience: String,
    expected_username: String,
    allow_unbound: bool,
    reviews: Mutex<Reviews>,
    /// Reviews under way, by token digest.
    in_flight: Mutex<HashMap<TokenDigest, InFlight>>,
    /// Each connection's allowance of new reviews, by the peer's address.
    connections: Mutex<HashMap<SocketAddr, Bucket>>,
    metrics: Metrics,
}

impl AgentAuthenticator {
    /// `service_account` is `<namespace>:<name>` or `<namespace>/<name>`.
    pub fn new(
        reviewer: Arc<dyn TokenReviewer>,
        audience: &str,
        service_account: &str,
        allow_unbound: bool,
        metrics: Metrics,
    ) -> Self {
        let (ns, name) = service_account.split_once([':', '/']).unwrap_or(("imdsgate", service_account));
        for outcome in ["accepted", "refused", "failed"] {
            metrics.token_reviews.get_or_create(&OutcomeLabels { outcome }).inc_by(0);
        }
        AgentAuthenticator {
            reviewer,
            audience: audience.to_string(),
            expected_username: format!("system:serviceaccount:{ns}:{name}"),
            allow_unbound,
            reviews: Mutex::new(Reviews::default()),
            in_flight: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Authenticates the value of the `authorization` metadata (`Bearer <token>`) of a call on the
    /// connection from `peer` (None: unknown, then no per-connection allowance applies).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> Result<AgentIdentity, AuthError> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let digest: TokenDigest = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = lock(&self.reviews).lookup(&digest, SystemTime::now()) {
            return known;
        }
        let (review, mark) = self.review(digest, token, peer)?;
        let outcome = review.clone().await;
        let now = SystemTime::now();
        let identity = match outcome {
            // The apiserver did not answer: not the token's fault, not remembered.
            Err(error) => Err(AuthError::ReviewFailed(error)),
            Ok(status) => {
                let mut reviews = lock(&self.reviews);
                match self.identity_from(status) {
                    Ok((identity, pod)) => {
                        let deleted = pod.as_deref().map(|uid| reviews.deleted(uid, mark));
                        match deleted {
                            // Its pod is gone; the apiserver answered before it saw it go, or from
                            // its own cache of token checks.
                            Some(Deleted::Yes) => {
                                reviews.refuse(digest, AuthError::PodGone, now);
                                Err(AuthError::PodGone)
                            }
                            // Too many deletions meanwhile to tell: answered, not remembered.
                            Some(Deleted::Unknown) => Ok(identity),
                            Some(Deleted::No) | None => {
                                tracing::debug!(node = ?identity.node, pod = ?pod, "agent token accepted");
                                let until = token_expiry(token).unwrap_or(now).min(now + MAX_CACHE_TTL);
                                reviews.accept(digest, identity.clone(), pod, until, now);
                                Ok(identity)
                            }
                        }
                    }
                    Err(refusal) => {
                        reviews.refuse(digest, refusal.clone(), now);
                        Err(refusal)
                    }
                }
            }
        };
        self.metrics.review_cache_entries.set(lock(&self.reviews).accepted_len() as i64);
        // Remembered (accepted or refused) before it stops being shared: a call arriving now finds
        // one or the other.
        let mut in_flight = lock(&self.in_flight);
        if in_flight.get(&digest).is_some_and(|(shared, _)| shared.ptr_eq(&review)) {
            in_flight.remove(&digest);
        }
        identity
    }

    /// The pod `uid` was deleted: tokens bound to it stop working here now.
    pub fn pod_deleted(&self, uid: &str) {
        if !uid.is_empty() {
            tracing::trace!(uid, "pod deleted; agent tokens bound to it end");
            lock(&self.reviews).pod_deleted(uid);
        }
    }

    /// A full list of pods (a relist): tokens bound to pods not in it stop working here now.
    pub fn pods_listed(&self, alive: impl Fn(&str) -> bool) {
        let mut reviews = lock(&self.reviews);
        for uid in reviews.gone_pods(alive) {
            reviews.pod_deleted(&uid);
        }
    }

    /// The review of `token` under way, or a new one shared with the calls that follow, if the
    /// connection from `peer` may start one.
    fn review(
        &self,
        digest: TokenDigest,
        token: &str,
        peer: Option<SocketAddr>,
    ) -> Result<InFlight, AuthError> {
        let mut in_flight = lock(&self.in_flight);
        if let Some(shared) = in_flight.get(&digest) {
            return Ok(shared.clone());
        }
        if let Some(peer) = peer
            && !self.connection_may_review(peer)
        {
            self.metrics.token_reviews_throttled.inc();
            return Err(AuthError::Throttled);
        }
        let mark = lock(&self.reviews).mark();
        let metrics = self.metrics.clone();
        let review = self
            .reviewer
            .review(token.to_string(), self.audience.clone())
            .inspect(move |outcome| {
                let outcome = match outcome {
                    Ok(status) if status.authenticated == Some(true) => "accepted",
                    Ok(_) => "refused",
                    Err(_) => "failed",
                };
                metrics.token_reviews.get_or_create(&OutcomeLabels { outcome }).inc();
            })
            .boxed()
            .shared();
        if in_flight.len() >= MAX_IN_FLIGHT {
            // Reviews every caller gave up on (cancelled calls) hold only the map's handle.
            in_flight.retain(|_, (shared, _)| shared.strong_count().is_some_and(|n| n > 1));
        }
        if in_flight.len() < MAX_IN_FLIGHT {
            in_flight.insert(digest, (review.clone(), mark));
        }
        Ok((review, mark))
    }

    /// Takes one review from the allowance of the connection from `peer`, if it has one left.
    fn connection_may_review(&self, peer: SocketAddr) -> bool {
        let now = SystemTime::now();
        let mut connections = lock(&self.connections);
        if !connections.contains_key(&peer) && connections.len() >= MAX_CONNECTIONS {
            connections.retain(|_, bucket| !bucket.is_full(&REVIEWS_PER_CONNECTION, now));
            if connections.len() >= MAX_CONNECTIONS
                && let Some(most) = connections
                    .iter()
                    .max_by(|a, b| a.1.tokens().total_cmp(&b.1.tokens()))
                    .map(|(peer, _)| *peer)
            {
                connections.remove(&most);
            }
        }
        connections
            .entry(peer)
            .or_insert_with(|| Bucket::full(&REVIEWS_PER_CONNECTION, now))
            .take(&REVIEWS_PER_CONNECTION, now)
    }

    /// The agent a review describes, and the pod its token is bound to.
    fn identity_from(&self, status: TokenReviewStatus) -> Result<(AgentIdentity, Option<String>), AuthError> {
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        // The apiserver answers with the requested audiences the token is valid for; an
        // authenticator that ignores audiences answers none, and is not trusted either.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(AuthError::WrongAudience(audiences));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.expected_username {
            return Err(AuthError::WrongServiceAccount(username));
        }
        let extra = |key: &str| user.extra.as_ref().and_then(|e| e.get(key)).and_then(|v| v.first()).cloned();
        let node = extra(NODE_NAME_EXTRA);
        if node.is_none() && !self.allow_unbound {
            return Err(AuthError::Unbound);
        }
        Ok((AgentIdentity { username, node }, extra(POD_UID_EXTRA)))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `exp` claim of a JWT, read without verifying (TokenReview verified it).
fn token_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
