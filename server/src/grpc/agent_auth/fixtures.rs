//! Test fixtures: a fake TokenReview API that counts reviews, answers with a status the test sets,
//! can be held at a gate and made to fail; agent tokens (JWT-shaped, with an `exp`) and the
//! statuses the apiserver gives for them.

use super::{AgentAuthenticator, NODE_NAME_EXTRA, POD_UID_EXTRA, TokenReviewer};
use crate::metrics::Metrics;
use base64::Engine as _;
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The agents' ServiceAccount as a username.
pub const AGENT: &str = "system:serviceaccount:imdsgate:imdsgate-agent";

pub struct FakeReviewer {
    pub calls: AtomicU32,
    /// What every review answers (a test may change it between calls).
    pub status: Mutex<TokenReviewStatus>,
    /// Reviews answer once this is true (the apiserver taking its time).
    pub open: tokio::sync::watch::Receiver<bool>,
    /// The first this many reviews fail.
    pub failures: AtomicU32,
}

impl FakeReviewer {
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
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
        let status = self.status.lock().unwrap().clone();
        let mut open = self.open.clone();
        async move {
            let _ = open.wait_for(|open| *open).await;
            if fail { Err("the apiserver is unavailable".to_string()) } else { Ok(status) }
        }
        .boxed()
    }
}

/// What the apiserver answers for a token of `username` valid for the audience `imdsgate`, bound
/// to `node` and to the pod `pod_uid`.
pub fn bound_status(username: &str, node: Option<&str>, pod_uid: Option<&str>) -> TokenReviewStatus {
    let mut extra = BTreeMap::new();
    if let Some(node) = node {
        extra.insert(NODE_NAME_EXTRA.to_string(), vec![node.to_string()]);
    }
    if let Some(uid) = pod_uid {
        extra.insert(POD_UID_EXTRA.to_string(), vec![uid.to_string()]);
    }
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(vec!["imdsgate".into()]),
        user: Some(UserInfo {
            username: Some(username.into()),
            extra: (!extra.is_empty()).then_some(extra),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// [`bound_status`] without a pod.
pub fn status(username: &str, node: Option<&str>) -> TokenReviewStatus {
    bound_status(username, node, None)
}

/// A JWT-shaped token expiring at `exp` (seconds since the epoch); `n` tells tokens apart.
pub fn jwt(exp: u64, n: usize) -> String {
    let claims =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp},"n":{n}}}"#));
    format!("header.{claims}.signature")
}

/// The `authorization` value of a token valid for an hour; `n` tells tokens apart.
pub fn header(n: usize) -> String {
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
    format!("Bearer {}", jwt(exp, n))
}

/// An authenticator whose reviews answer `status` once the returned gate is set to true, the
/// first `failures` of them with an error.
pub fn gated(
    status: TokenReviewStatus,
    allow_unbound: bool,
    open: bool,
    failures: u32,
) -> (AgentAuthenticator, Arc<FakeReviewer>, tokio::sync::watch::Sender<bool>) {
    let (gate, open) = tokio::sync::watch::channel(open);
    let reviewer = Arc::new(FakeReviewer {
        calls: AtomicU32::new(0),
        status: Mutex::new(status),
        open,
        failures: AtomicU32::new(failures),
    });
    let authenticator = AgentAuthenticator::new(
        reviewer.clone(),
        "imdsgate",
        "imdsgate:imdsgate-agent",
        allow_unbound,
        Metrics::new(),
    );
    (authenticator, reviewer, gate)
}

/// An authenticator whose reviews answer `status` at once.
pub fn auth(status: TokenReviewStatus, allow_unbound: bool) -> (AgentAuthenticator, Arc<FakeReviewer>) {
    let (a, reviewer, _gate) = gated(status, allow_unbound, true, 0);
    (a, reviewer)
}
