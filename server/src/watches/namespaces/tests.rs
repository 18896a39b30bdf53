//! What the server does on namespace events: a policy that narrows revokes what it no longer
//! permits.

use crate::authz::fixtures::mk_ns;
use crate::credential_cache::fixtures::settle;
use crate::watches::fixtures::{TEAM_PERMITS, bed, pending, running};
use imdsgate_core::watch::Update;

#[tokio::test]
async fn a_narrowed_policy_revokes_the_sessions_it_no_longer_permits() {
    let mut b = bed();
    b.pods.update(Update::Apply(running("reader", Some("app-reader"), "10.0.0.1")));
    b.pods.update(Update::Apply(running("writer", Some("app-writer"), "10.0.0.2")));
    settle().await;
    assert!(b.cache.holds("reader") && b.cache.holds("writer"));

    // The same policy again changes nothing.
    b.namespaces.update(Update::Apply(mk_ns("team", TEAM_PERMITS)));
    assert!(b.told().await.is_empty());

    b.namespaces.update(Update::Apply(mk_ns("team", "arn:aws:iam::123456789012:role/app-reader")));
    assert_eq!(b.told().await, ["writer:NAMESPACE_FORBIDS"]);
    assert!(!b.cache.holds("writer"), "the server's own session is dropped too");
    assert!(b.cache.holds("reader"));

    // A namespace gone from a relist permits nothing: every pod of it with a role is told again
    // (the server does not know what each agent holds; an agent drops what it has, if anything).
    b.namespaces.update(Update::Reset(vec![]));
    let mut told = b.told().await;
    told.sort();
    assert_eq!(told, ["reader:NAMESPACE_FORBIDS", "writer:NAMESPACE_FORBIDS"]);
    assert!(!b.cache.holds("reader"));
}

#[tokio::test]
async fn a_withdrawn_role_drops_the_pending_pods_sessions_and_they_are_not_refreshed() {
    let b = bed();
    for n in 0..20 {
        b.pods.update(Update::Apply(pending(&format!("waiting-{n}"), "app-writer")));
    }
    b.pods.update(Update::Apply(pending("reader", "app-reader")));
    settle().await;
    assert_eq!(b.sts.calls(), 21);
    let writer_key = b.key_for(&pending("waiting-0", "app-writer"));
    assert!(b.pods.entitled(&writer_key));

    b.namespaces.update(Update::Apply(mk_ns("team", "arn:aws:iam::123456789012:role/app-reader")));
    for n in 0..20 {
        assert!(!b.cache.holds(&format!("waiting-{n}")), "waiting-{n}: its session is dropped at once");
    }
    assert!(b.cache.holds("reader"), "a pod still permitted keeps its session");
    // And were a session left (a missed event), the refresher would ask first and drop it.
    assert!(!b.pods.entitled(&writer_key));
    assert!(b.pods.entitled(&b.key_for(&pending("reader", "app-reader"))));
    assert_eq!(b.sts.calls(), 21, "no AssumeRole for what the namespace no longer permits");
}
