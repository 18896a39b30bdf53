//! The authenticator against a fake TokenReview API: shared reviews, what is cached and for how
//! long, what ends a cached review, and what bounds the reviews a caller can cause.

use super::fixtures::{AGENT, auth, bound_status, gated, header, jwt, status};
use super::reviews::{MAX_ACCEPTED, Reviews};
use super::*;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use sha2::Digest;

fn peer(port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::from(([10, 0, 0, 1], port)))
}

/// `n` calls with `header` at once, the reviewer answering once they all wait.
async fn together(
    a: &AgentAuthenticator,
    header: &str,
    n: usize,
    gate: &tokio::sync::watch::Sender<bool>,
) -> Vec<Result<AgentIdentity, AuthError>> {
    let calls = futures::future::join_all((0..n).map(|_| a.authenticate(Some(header), peer(1))));
    let answered = async {
        tokio::task::yield_now().await;
        gate.send_replace(true);
    };
    tokio::join!(calls, answered).0
}

#[tokio::test]
async fn concurrent_calls_with_one_token_share_one_review() {
    let (a, reviewer, gate) = gated(status(AGENT, Some("node-a")), false, false, 0);
    let header = header(0);
    let answers = together(&a, &header, 50, &gate).await;
    assert!(answers.iter().all(|id| id.as_ref().unwrap().node.as_deref() == Some("node-a")));
    assert_eq!(reviewer.calls(), 1);
    // Cached now, and no longer in flight.
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    assert_eq!(reviewer.calls(), 1);
    assert!(lock(&a.in_flight).is_empty());
}

#[tokio::test]
async fn a_failed_shared_review_fails_every_waiting_call_and_the_next_call_reviews_again() {
    let (a, reviewer, gate) = gated(status(AGENT, Some("node-a")), false, false, 1);
    let header = header(0);
    let answers = together(&a, &header, 5, &gate).await;
    for answer in answers {
        assert_eq!(answer, Err(AuthError::ReviewFailed("the apiserver is unavailable".into())));
    }
    assert_eq!(reviewer.calls(), 1);
    assert_eq!(a.authenticate(Some(&header), peer(1)).await.unwrap().node.as_deref(), Some("node-a"));
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test]
async fn a_review_every_caller_gave_up_on_is_finished_by_the_next_caller() {
    let (a, reviewer, gate) = gated(status(AGENT, Some("node-a")), false, false, 0);
    let header = header(0);
    // The agent's call is cancelled while the review is under way.
    let cancelled =
        tokio::time::timeout(Duration::from_millis(20), a.authenticate(Some(&header), peer(1))).await;
    assert!(cancelled.is_err());
    gate.send_replace(true);
    assert_eq!(a.authenticate(Some(&header), peer(1)).await.unwrap().node.as_deref(), Some("node-a"));
    assert_eq!(reviewer.calls(), 1);
    assert!(lock(&a.in_flight).is_empty());
}

#[tokio::test]
async fn bound_agent_token_yields_its_node_and_is_cached() {
    let (a, reviewer) = auth(status(AGENT, Some("node-a")), false);
    let header = header(0);
    for _ in 0..3 {
        let id = a.authenticate(Some(&header), peer(1)).await.unwrap();
        assert_eq!(id.node.as_deref(), Some("node-a"));
    }
    assert_eq!(reviewer.calls(), 1);
}

#[tokio::test]
async fn expired_tokens_are_not_cached() {
    let (a, reviewer) = auth(status(AGENT, Some("node-a")), false);
    let header = format!("Bearer {}", jwt(1, 0));
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test]
async fn refusals() {
    let (a, _) = auth(status(AGENT, Some("node-a")), false);
    assert_eq!(a.authenticate(None, peer(1)).await, Err(AuthError::Missing));
    assert_eq!(a.authenticate(Some("Basic abc"), peer(1)).await, Err(AuthError::Missing));
    let (a, _) = auth(status("system:serviceaccount:default:app", Some("node-a")), false);
    assert!(matches!(
        a.authenticate(Some("Bearer t"), peer(1)).await,
        Err(AuthError::WrongServiceAccount(_))
    ));
    let (a, _) = auth(status(AGENT, None), false);
    assert_eq!(a.authenticate(Some("Bearer t"), peer(1)).await, Err(AuthError::Unbound));
    let (a, _) = auth(
        TokenReviewStatus { authenticated: Some(false), error: Some("bad".into()), ..Default::default() },
        false,
    );
    assert_eq!(a.authenticate(Some("Bearer t"), peer(1)).await, Err(AuthError::Rejected("bad".into())));
}

#[tokio::test]
async fn unbound_tokens_pass_only_when_allowed() {
    let (a, _) = auth(status(AGENT, None), true);
    assert_eq!(a.authenticate(Some("Bearer t"), peer(1)).await.unwrap().node, None);
}

#[tokio::test]
async fn the_review_must_be_for_this_servers_audience() {
    // An authenticator that ignores audiences answers none; a token for another audience, others.
    for audiences in [None, Some(vec![]), Some(vec!["https://kubernetes.default.svc".to_string()])] {
        let mut answer = status(AGENT, Some("node-a"));
        answer.audiences = audiences.clone();
        let (a, _) = auth(answer, false);
        assert_eq!(
            a.authenticate(Some(&header(0)), peer(1)).await,
            Err(AuthError::WrongAudience(audiences.unwrap_or_default())),
        );
    }
}

#[tokio::test]
async fn a_deleted_agent_pods_token_stops_working_at_once() {
    let (a, reviewer) = auth(bound_status(AGENT, Some("node-a"), Some("agent-pod")), false);
    let header = header(0);
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    assert_eq!(reviewer.calls(), 1, "cached while its pod lives");

    // Another pod's deletion changes nothing.
    a.pod_deleted("another-pod");
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    assert_eq!(reviewer.calls(), 1);

    // The agent pod is deleted. The apiserver may go on accepting its token for a while (it
    // caches its own token checks for ten seconds): the server refuses it anyway.
    a.pod_deleted("agent-pod");
    assert_eq!(a.authenticate(Some(&header), peer(1)).await, Err(AuthError::PodGone));
    assert_eq!(reviewer.calls(), 2, "reviewed again, and refused whatever the review said");
    assert_eq!(a.authenticate(Some(&header), peer(1)).await, Err(AuthError::PodGone));
    assert_eq!(reviewer.calls(), 2, "the refusal is remembered");
}

#[tokio::test]
async fn a_relist_without_the_agent_pod_ends_its_tokens() {
    let (a, reviewer) = auth(bound_status(AGENT, Some("node-a"), Some("agent-pod")), false);
    let header = header(0);
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    a.pods_listed(|uid| uid == "agent-pod");
    a.authenticate(Some(&header), peer(1)).await.unwrap();
    assert_eq!(reviewer.calls(), 1, "still listed: still cached");
    // The deletion happened while the watch was away: the relist does not list the pod.
    a.pods_listed(|uid| uid == "other");
    assert_eq!(a.authenticate(Some(&header), peer(1)).await, Err(AuthError::PodGone));
    assert_eq!(reviewer.calls(), 2, "reviewed again, and refused");
}

#[tokio::test]
async fn a_review_answered_as_its_pod_was_deleted_is_refused_and_not_cached() {
    let (a, reviewer, gate) = gated(bound_status(AGENT, Some("node-a"), Some("agent-pod")), false, false, 0);
    let header = header(0);
    let call = a.authenticate(Some(&header), peer(1));
    let deleted_meanwhile = async {
        tokio::task::yield_now().await;
        a.pod_deleted("agent-pod");
        gate.send_replace(true);
    };
    let (answer, ()) = tokio::join!(call, deleted_meanwhile);
    assert_eq!(answer, Err(AuthError::PodGone));
    assert_eq!(a.authenticate(Some(&header), peer(1)).await, Err(AuthError::PodGone), "remembered");
    assert_eq!(reviewer.calls(), 1);
}

#[tokio::test]
async fn a_refused_token_sent_again_costs_no_review() {
    let (a, reviewer) = auth(
        TokenReviewStatus { authenticated: Some(false), error: Some("invalid".into()), ..Default::default() },
        false,
    );
    for _ in 0..100 {
        assert!(matches!(a.authenticate(Some(&header(7)), peer(1)).await, Err(AuthError::Rejected(_))));
    }
    assert_eq!(reviewer.calls(), 1);
}

#[tokio::test]
async fn a_connection_sending_made_up_tokens_gets_a_few_reviews_not_one_each() {
    let (a, reviewer) = auth(
        TokenReviewStatus { authenticated: Some(false), error: Some("invalid".into()), ..Default::default() },
        false,
    );
    let mut throttled = 0;
    for n in 0..2_000 {
        match a.authenticate(Some(&header(n)), peer(1)).await {
            Err(AuthError::Throttled) => throttled += 1,
            other => assert!(matches!(other, Err(AuthError::Rejected(_))), "{other:?}"),
        }
    }
    let burst = REVIEWS_PER_CONNECTION.burst as u32;
    assert_eq!(reviewer.calls(), burst);
    assert_eq!(throttled, 2_000 - burst);
    // Another connection (the node's real agent) is reviewed as usual.
    *reviewer.status.lock().unwrap() = status(AGENT, Some("node-a"));
    assert!(a.authenticate(Some(&header(5_000)), peer(2)).await.is_ok());
}

#[tokio::test]
async fn a_node_minting_tokens_pushes_out_only_its_own_cached_reviews() {
    let (a, reviewer) = auth(status(AGENT, Some("node-b")), false);
    a.authenticate(Some(&header(0)), peer(1)).await.unwrap();
    *reviewer.status.lock().unwrap() = status(AGENT, Some("node-a"));
    for n in 1..=20 {
        a.authenticate(Some(&header(n)), peer(100 + n as u16)).await.unwrap();
    }
    assert_eq!(reviewer.calls(), 21);
    // node-b's review is still cached: no review, and still node-b.
    assert_eq!(a.authenticate(Some(&header(0)), peer(1)).await.unwrap().node.as_deref(), Some("node-b"));
    // node-a keeps its latest few.
    a.authenticate(Some(&header(20)), peer(1)).await.unwrap();
    assert_eq!(reviewer.calls(), 21);
    assert_eq!(lock(&a.reviews).accepted_len(), 1 + MAX_PER_HOLDER);
}

#[test]
fn a_full_cache_gives_up_the_review_closest_to_its_end_and_keeps_caching() {
    let mut reviews = Reviews::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let digest = |n: usize| -> [u8; 32] { Sha256::digest(n.to_le_bytes()).into() };
    let identity = |n: usize| AgentIdentity { username: AGENT.into(), node: Some(format!("node-{n}")) };
    for n in 0..MAX_ACCEPTED {
        // Node 17's token ends first.
        let left = if n == 17 { 60 } else { 600 };
        reviews.accept(digest(n), identity(n), None, now + Duration::from_secs(left), now);
    }
    let newcomer = MAX_ACCEPTED;
    reviews.accept(digest(newcomer), identity(newcomer), None, now + Duration::from_secs(600), now);
    assert_eq!(reviews.accepted_len(), MAX_ACCEPTED);
    assert!(reviews.lookup(&digest(newcomer), now).is_some(), "the newcomer is cached");
    assert!(reviews.lookup(&digest(17), now).is_none(), "the review closest to its end went");
    assert!(reviews.lookup(&digest(18), now).is_some());
}

#[test]
fn refusals_are_remembered_briefly_and_boundedly() {
    let mut reviews = Reviews::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let digest = |n: usize| -> [u8; 32] { Sha256::digest(n.to_le_bytes()).into() };
    reviews.refuse(digest(0), AuthError::Unbound, now);
    assert_eq!(reviews.lookup(&digest(0), now + REFUSAL_TTL / 2), Some(Err(AuthError::Unbound)));
    assert_eq!(reviews.lookup(&digest(0), now + REFUSAL_TTL), None, "reviewed again after");
    for n in 1..=MAX_REFUSED + 10 {
        reviews.refuse(digest(n), AuthError::Unbound, now);
    }
    assert_eq!(reviews.refused_len(), MAX_REFUSED);
    assert_eq!(reviews.lookup(&digest(5), now), None, "the oldest went first");
    assert!(reviews.lookup(&digest(MAX_REFUSED + 10), now).is_some());
}
