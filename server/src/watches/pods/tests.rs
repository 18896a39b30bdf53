//! What the server does on each pod event, checked on real indexes, a real cache over an in-memory
//! STS, and the revocations an agent's stream hears.

use crate::credential_cache::fixtures::settle;
use crate::grpc::agent_auth::AuthError;
use crate::grpc::agent_auth::fixtures::header;
use crate::watches::fixtures::{agent_pod, bed, pending, pod, running, unscheduled};
use imdsgate_core::watch::Update;

const APP_A: &str = "arn:aws:iam::123456789012:role/app-a";
const APP_B: &str = "arn:aws:iam::123456789012:role/app-b";

#[tokio::test]
async fn a_changed_role_revokes_the_session_and_fetches_the_new_one() {
    let mut b = bed();
    b.pods.update(Update::Apply(running("u1", Some("app-a"), "10.0.0.1")));
    settle().await;
    assert_eq!(b.session_role("u1").await.as_deref(), Some(APP_A));

    // Whatever else changes, the same identity keeps its session: nothing told, no STS call.
    let mut moved = running("u1", Some("app-a"), "10.0.0.9");
    moved.metadata.labels = Some([("tier".to_string(), "web".to_string())].into());
    b.pods.update(Update::Apply(moved));
    settle().await;
    assert!(b.told().await.is_empty());
    assert_eq!(b.sts.calls(), 1);

    // The role annotation changes: the agent drops what it holds, and the old session is not
    // handed out again; the new role's session is fetched ahead of the pod's next request.
    b.pods.update(Update::Apply(running("u1", Some("app-b"), "10.0.0.9")));
    settle().await;
    assert_eq!(b.told().await, ["u1:SESSION_CHANGED"]);
    assert_eq!(b.session_role("u1").await.as_deref(), Some(APP_B));
    assert_eq!((b.sts.calls(), b.cache.len()), (2, 1), "one new call; the old session is gone");

    // The role removed: told again, nothing left to hold or fetch.
    b.pods.update(Update::Apply(running("u1", None, "10.0.0.9")));
    settle().await;
    assert_eq!(b.told().await, ["u1:SESSION_CHANGED"]);
    assert!(!b.cache.holds("u1"));
    assert_eq!(b.sts.calls(), 2);
}

#[tokio::test]
async fn a_pod_deleted_or_finished_is_revoked_and_forgotten() {
    let mut b = bed();
    b.pods.update(Update::Apply(running("deleted", Some("app-a"), "10.0.0.1")));
    b.pods.update(Update::Apply(running("finished", Some("app-a"), "10.0.0.2")));
    b.pods.update(Update::Apply(running("plain", None, "10.0.0.3")));
    settle().await;
    assert!(b.cache.holds("deleted") && b.cache.holds("finished"));
    assert!(b.cache.counts_allowance("deleted") && b.cache.counts_allowance("finished"));

    b.pods.update(Update::Delete(running("deleted", Some("app-a"), "10.0.0.1")));
    b.pods.update(Update::Apply(pod("finished", Some("app-a"), Some("10.0.0.2"), "Succeeded")));
    // A pod without a role held nothing: its agent has nothing to drop.
    b.pods.update(Update::Delete(running("plain", None, "10.0.0.3")));
    assert_eq!(b.told().await, ["deleted:POD_NOT_FOUND", "finished:POD_NOT_FOUND"]);
    for uid in ["deleted", "finished"] {
        assert!(!b.cache.holds(uid), "{uid}: its session is dropped");
        assert!(!b.cache.counts_allowance(uid), "{uid}: and its allowance of new sessions");
    }
    assert_eq!(b.cache.len(), 0);
}

#[tokio::test]
async fn a_new_pod_is_prefetched_only_for_a_role_its_namespace_permits() {
    let mut b = bed();
    b.pods.update(Update::Apply(running("permitted", Some("app-a"), "10.0.0.1")));
    settle().await;
    assert_eq!(b.sts.calls(), 1, "one STS call, before the pod asks");
    assert!(b.cache.holds("permitted"));

    b.pods.update(Update::Apply(running("forbidden", Some("admin"), "10.0.0.2")));
    b.pods.update(Update::Apply(running("no-role", None, "10.0.0.3")));
    settle().await;
    assert_eq!(b.sts.calls(), 1, "no call for a role the namespace does not permit, nor without one");
    assert!(!b.cache.holds("forbidden") && !b.cache.holds("no-role"));
    assert!(b.told().await.is_empty());
}

#[tokio::test]
async fn a_pending_pod_is_prefetched_and_kept_until_its_ip_comes() {
    let b = bed();
    b.pods.update(Update::Apply(pending("early", "app-a")));
    settle().await;
    assert_eq!(b.sts.calls(), 1, "fetched before the pod has an IP");
    assert!(b.cache.holds("early"));
    // The refresher's sweep of sessions nobody needs keeps it: the pod is waiting for its IP.
    assert!(b.pods.keeps_session("early"));
    assert_eq!(b.cache.retain_pods(|uid| b.pods.keeps_session(uid)), 0);
    assert!(b.cache.holds("early"));

    // Its IP comes: the session fetched ahead is the one it gets, no second call.
    b.pods.update(Update::Apply(running("early", Some("app-a"), "10.0.0.1")));
    settle().await;
    assert_eq!(b.session_role("early").await.as_deref(), Some(APP_A));
    assert_eq!(b.sts.calls(), 1);
}

#[tokio::test]
async fn a_pending_pod_that_leaves_without_an_ip_loses_its_session() {
    let b = bed();
    b.pods.update(Update::Apply(pending("deleted", "app-a")));
    b.pods.update(Update::Apply(pending("failed", "app-a")));
    b.pods.update(Update::Apply(pending("unannotated", "app-a")));
    settle().await;
    assert_eq!(b.sts.calls(), 3);

    b.pods.update(Update::Delete(pending("deleted", "app-a")));
    b.pods.update(Update::Apply(pod("failed", Some("app-a"), None, "Failed")));
    b.pods.update(Update::Apply(pod("unannotated", None, None, "Pending")));
    for uid in ["deleted", "failed", "unannotated"] {
        assert!(!b.cache.holds(uid), "{uid}: dropped at once");
        assert!(!b.pods.keeps_session(uid), "{uid}: and not kept by the sweep");
    }
}

#[tokio::test]
async fn a_relist_revokes_the_pods_gone_meanwhile_and_prefetches_the_pending_ones() {
    let mut b = bed();
    b.pods.update(Update::Apply(running("stays", Some("app-a"), "10.0.0.1")));
    b.pods.update(Update::Apply(running("gone", Some("app-a"), "10.0.0.2")));
    b.pods.update(Update::Apply(pending("was-pending", "app-a")));
    settle().await;
    assert_eq!(b.sts.calls(), 3);

    // While the watch was away: `gone` and `was-pending` were deleted, `new` was created pending.
    b.pods.update(Update::Reset(vec![running("stays", Some("app-a"), "10.0.0.1"), pending("new", "app-a")]));
    settle().await;
    assert_eq!(b.told().await, ["gone:POD_NOT_FOUND"]);
    assert!(!b.cache.holds("gone") && !b.cache.holds("was-pending"));
    assert!(b.cache.holds("stays") && b.cache.holds("new"));
    assert_eq!(b.sts.calls(), 4, "only the new pending pod cost a call");
}

#[tokio::test]
async fn a_pod_not_yet_scheduled_costs_no_sts_call_until_it_is() {
    let b = bed();
    for n in 0..200 {
        b.pods.update(Update::Apply(unscheduled(&format!("never-{n}"), "app-a")));
    }
    settle().await;
    assert_eq!(b.sts.calls(), 0, "200 pods that may never run: no AssumeRole");
    assert!(!b.cache.holds("never-0") && !b.pods.keeps_session("never-0"));

    // The scheduler gives one a node: now it is fetched ahead of its IP.
    b.pods.update(Update::Apply(pending("never-0", "app-a")));
    settle().await;
    assert_eq!(b.sts.calls(), 1);
    assert!(b.cache.holds("never-0"));
}

#[tokio::test]
async fn a_relist_prefetches_only_scheduled_pending_pods() {
    let b = bed();
    b.pods.update(Update::Reset(vec![unscheduled("floating", "app-a"), pending("placed", "app-a")]));
    settle().await;
    assert_eq!(b.sts.calls(), 1);
    assert!(b.cache.holds("placed") && !b.cache.holds("floating"));
}

/// What the agent authenticator says of `header` now, the apiserver still accepting it (as it
/// may for ten seconds after the pod is deleted: it caches its own token checks).
async fn after_review(b: &crate::watches::fixtures::Bed, header: &str) -> Result<(), AuthError> {
    b.agent_tokens.authenticate(Some(header), None).await.map(|_| ())
}

#[tokio::test]
async fn a_deleted_agent_pod_ends_the_tokens_bound_to_it() {
    let b = bed();
    let header = header(0);
    b.pods.update(Update::Apply(agent_pod("agent-pod")));
    b.agent_tokens.authenticate(Some(&header), None).await.unwrap();
    assert_eq!(b.reviewer.calls(), 1);

    // Other pods coming and going change nothing.
    b.pods.update(Update::Delete(running("other", Some("app-a"), "10.0.0.1")));
    b.agent_tokens.authenticate(Some(&header), None).await.unwrap();
    assert_eq!(b.reviewer.calls(), 1, "still cached");

    // The agent pod is deleted: its token is refused, whatever the apiserver still says.
    b.pods.update(Update::Delete(agent_pod("agent-pod")));
    assert_eq!(after_review(&b, &header).await, Err(AuthError::PodGone));
    assert_eq!(b.reviewer.calls(), 2);
}

#[tokio::test]
async fn a_relist_without_the_agent_pod_ends_the_tokens_bound_to_it() {
    let b = bed();
    let header = header(0);
    b.agent_tokens.authenticate(Some(&header), None).await.unwrap();
    b.pods.update(Update::Reset(vec![agent_pod("agent-pod"), running("web", Some("app-a"), "10.0.0.1")]));
    b.agent_tokens.authenticate(Some(&header), None).await.unwrap();
    assert_eq!(b.reviewer.calls(), 1, "listed: still cached");
    // Deleted while the watch was away.
    b.pods.update(Update::Reset(vec![running("web", Some("app-a"), "10.0.0.1")]));
    assert_eq!(after_review(&b, &header).await, Err(AuthError::PodGone));
    assert_eq!(b.reviewer.calls(), 2);
}
