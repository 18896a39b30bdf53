//! Node binding: each agent call carries the agent's projected ServiceAccount token (audience
//! `imdsgate`). The server verifies it with TokenReview, requires the configured agent
//! ServiceAccount, and takes the node name the apiserver put in the review; the server then only
//! answers for pods on that node. Reviews are cached by token digest until the token expires
//! (at most ten minutes, so a deleted agent pod's token stops working soon after), and concurrent
//! calls with one token share one review: an agent's stream and first calls, all arriving together
//! when a replica starts, cost the apiserver one review, not one each.

use base64::Engine as _;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The extra key in which the apiserver reports the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const MAX_CACHE_TTL: Duration = Duration::from_secs(600);
/// Reviews cached at most: one per agent token in use (an agent holds one token at a time, two
/// around a rotation), so 100,000 agents' nodes; about 150 bytes each.
pub const MAX_CACHE_ENTRIES: usize = 100_000;
/// Reviews in flight shared at most; past this (a reconnect storm of more distinct tokens at once)
/// a call reviews on its own.
const MAX_IN_FLIGHT: usize = 4_096;

type Review = Shared<BoxFuture<'static, Result<TokenReviewStatus, String>>>;

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
    cache: Mutex<HashMap<[u8; 32], (AgentIdentity, SystemTime)>>,
    /// Reviews under way, by token digest.
    in_flight: Mutex<HashMap<[u8; 32], Review>>,
}

impl AgentAuthenticator {
    /// `service_account` is `<namespace>:<name>` or `<namespace>/<name>`.
    pub fn new(
        reviewer: Arc<dyn TokenReviewer>,
        audience: &str,
        service_account: &str,
        allow_unbound: bool,
    ) -> Self {
        let (ns, name) = service_account.split_once([':', '/']).unwrap_or(("imdsgate", service_account));
        AgentAuthenticator {
            reviewer,
            audience: audience.to_string(),
            expected_username: format!("system:serviceaccount:{ns}:{name}"),
            allow_unbound,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Authenticates the value of the `authorization` metadata (`Bearer <token>`).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<AgentIdentity, AuthError> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = SystemTime::now();
        if let Some((identity, until)) = self.lock().get(&digest)
            && *until > now
        {
            return Ok(identity.clone());
        }
        let review = self.review(digest, token);
        let outcome = review.clone().await;
        let identity = outcome.map_err(AuthError::ReviewFailed).and_then(|status| self.identity_from(status));
        if let Ok(identity) = &identity {
            let until = token_expiry(token).unwrap_or(now).min(now + MAX_CACHE_TTL);
            let mut cache = self.lock();
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.retain(|_, (_, t)| *t > now);
            }
            if cache.len() < MAX_CACHE_ENTRIES {
                cache.insert(digest, (identity.clone(), until));
            }
        }
        // Cached (if it passed) before it stops being shared: a call arriving now finds one or the
        // other. A failed review is not kept: the next call reviews again.
        let mut in_flight = lock(&self.in_flight);
        if in_flight.get(&digest).is_some_and(|shared| shared.ptr_eq(&review)) {
            in_flight.remove(&digest);
        }
        identity
    }

    /// The review of `token` under way, or a new one shared with the calls that follow.
    fn review(&self, digest: [u8; 32], token: &str) -> Review {
        let mut in_flight = lock(&self.in_flight);
        if let Some(shared) = in_flight.get(&digest) {
            return shared.clone();
        }
        let review = self.reviewer.review(token.to_string(), self.audience.clone()).shared();
        if in_flight.len() >= MAX_IN_FLIGHT {
            // Reviews every caller gave up on (cancelled calls) hold only the map's handle.
            in_flight.retain(|_, shared| shared.strong_count().is_some_and(|n| n > 1));
        }
        if in_flight.len() < MAX_IN_FLIGHT {
            in_flight.insert(digest, review.clone());
        }
        review
    }

    fn identity_from(&self, status: TokenReviewStatus) -> Result<AgentIdentity, AuthError> {
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.expected_username {
            return Err(AuthError::WrongServiceAccount(username));
        }
        let node = user.extra.as_ref().and_then(|e| e.get(NODE_NAME_EXTRA)).and_then(|v| v.first()).cloned();
        if node.is_none() && !self.allow_unbound {
            return Err(AuthError::Unbound);
        }
        Ok(AgentIdentity { username, node })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (AgentIdentity, SystemTime)>> {
        lock(&self.cache)
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
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct FakeReviewer {
        calls: AtomicU32,
        status: TokenReviewStatus,
        /// Reviews answer once this is true (the apiserver taking its time).
        open: tokio::sync::watch::Receiver<bool>,
        /// The first this many reviews fail.
        failures: AtomicU32,
    }

    impl TokenReviewer for FakeReviewer {
        fn review(
            &self,
            _token: String,
            audience: String,
        ) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
            assert_eq!(audience, "imdsgate");
            self.calls.fetch_add(1, Ordering::SeqCst);
            let fail =
                self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            let status = self.status.clone();
            let mut open = self.open.clone();
            async move {
                let _ = open.wait_for(|open| *open).await;
                if fail { Err("the apiserver is unavailable".to_string()) } else { Ok(status) }
            }
            .boxed()
        }
    }

    fn status(username: &str, node: Option<&str>) -> TokenReviewStatus {
        let extra = node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])]));
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo { username: Some(username.into()), extra, ..Default::default() }),
            ..Default::default()
        }
    }

    fn jwt(exp: u64) -> String {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        format!("header.{claims}.signature")
    }

    fn auth(status: TokenReviewStatus, allow_unbound: bool) -> (AgentAuthenticator, Arc<FakeReviewer>) {
        let (a, reviewer, _gate) = gated(status, allow_unbound, true, 0);
        (a, reviewer)
    }

    /// An authenticator whose reviews answer once the returned gate is set to true, the first
    /// `failures` of them with an error.
    fn gated(
        status: TokenReviewStatus,
        allow_unbound: bool,
        open: bool,
        failures: u32,
    ) -> (AgentAuthenticator, Arc<FakeReviewer>, tokio::sync::watch::Sender<bool>) {
        let (gate, open) = tokio::sync::watch::channel(open);
        let reviewer = Arc::new(FakeReviewer {
            calls: AtomicU32::new(0),
            status,
            open,
            failures: AtomicU32::new(failures),
        });
        (
            AgentAuthenticator::new(reviewer.clone(), "imdsgate", "imdsgate:imdsgate-agent", allow_unbound),
            reviewer,
            gate,
        )
    }

    /// `n` calls with `header` at once, the reviewer answering once they all wait.
    async fn together(
        a: &AgentAuthenticator,
        header: &str,
        n: usize,
        gate: &tokio::sync::watch::Sender<bool>,
    ) -> Vec<Result<AgentIdentity, AuthError>> {
        let calls = futures::future::join_all((0..n).map(|_| a.authenticate(Some(header))));
        let answered = async {
            tokio::task::yield_now().await;
            gate.send_replace(true);
        };
        tokio::join!(calls, answered).0
    }

    fn header_valid_for_an_hour() -> String {
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
        format!("Bearer {}", jwt(exp))
    }

    #[tokio::test]
    async fn concurrent_calls_with_one_token_share_one_review() {
        let (a, reviewer, gate) = gated(status(AGENT, Some("node-a")), false, false, 0);
        let header = header_valid_for_an_hour();
        let answers = together(&a, &header, 50, &gate).await;
        assert!(answers.iter().all(|id| id.as_ref().unwrap().node.as_deref() == Some("node-a")));
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 1);
        // Cached now, and no longer in flight.
        a.authenticate(Some(&header)).await.unwrap();
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 1);
        assert!(lock(&a.in_flight).is_empty());
    }

    #[tokio::test]
    async fn a_failed_shared_review_fails_every_waiting_call_and_the_next_call_reviews_again() {
        let (a, reviewer, gate) = gated(status(AGENT, Some("node-a")), false, false, 1);
        let header = header_valid_for_an_hour();
        let answers = together(&a, &header, 5, &gate).await;
        for answer in answers {
            assert_eq!(answer, Err(AuthError::ReviewFailed("the apiserver is unavailable".into())));
        }
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.authenticate(Some(&header)).await.unwrap().node.as_deref(), Some("node-a"));
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_review_every_caller_gave_up_on_is_finished_by_the_next_caller() {
        let (a, reviewer, gate) = gated(status(AGENT, Some("node-a")), false, false, 0);
        let header = header_valid_for_an_hour();
        // The agent's call is cancelled while the review is under way.
        let cancelled = tokio::time::timeout(Duration::from_millis(20), a.authenticate(Some(&header))).await;
        assert!(cancelled.is_err());
        gate.send_replace(true);
        assert_eq!(a.authenticate(Some(&header)).await.unwrap().node.as_deref(), Some("node-a"));
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 1);
        assert!(lock(&a.in_flight).is_empty());
    }

    const AGENT: &str = "system:serviceaccount:imdsgate:imdsgate-agent";

    #[tokio::test]
    async fn bound_agent_token_yields_its_node_and_is_cached() {
        let (a, reviewer) = auth(status(AGENT, Some("node-a")), false);
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
        let header = format!("Bearer {}", jwt(exp));
        for _ in 0..3 {
            let id = a.authenticate(Some(&header)).await.unwrap();
            assert_eq!(id.node.as_deref(), Some("node-a"));
        }
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn expired_tokens_are_not_cached() {
        let (a, reviewer) = auth(status(AGENT, Some("node-a")), false);
        let header = format!("Bearer {}", jwt(1));
        a.authenticate(Some(&header)).await.unwrap();
        a.authenticate(Some(&header)).await.unwrap();
        assert_eq!(reviewer.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refusals() {
        let (a, _) = auth(status(AGENT, Some("node-a")), false);
        assert_eq!(a.authenticate(None).await, Err(AuthError::Missing));
        assert_eq!(a.authenticate(Some("Basic abc")).await, Err(AuthError::Missing));
        let (a, _) = auth(status("system:serviceaccount:default:app", Some("node-a")), false);
        assert!(matches!(a.authenticate(Some("Bearer t")).await, Err(AuthError::WrongServiceAccount(_))));
        let (a, _) = auth(status(AGENT, None), false);
        assert_eq!(a.authenticate(Some("Bearer t")).await, Err(AuthError::Unbound));
        let (a, _) = auth(
            TokenReviewStatus { authenticated: Some(false), error: Some("bad".into()), ..Default::default() },
            false,
        );
        assert_eq!(a.authenticate(Some("Bearer t")).await, Err(AuthError::Rejected("bad".into())));
    }

    #[tokio::test]
    async fn unbound_tokens_pass_only_when_allowed() {
        let (a, _) = auth(status(AGENT, None), true);
        assert_eq!(a.authenticate(Some("Bearer t")).await.unwrap().node, None);
    }
}
