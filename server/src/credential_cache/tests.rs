//! Tests of the credential cache against an in-memory STS and a clock the tests move.

use super::config::backoff;
use super::fixtures::{FakeSts, settle};
use super::*;
use imdsgate_core::role::resolve;
use std::sync::atomic::{AtomicU64, Ordering};

struct Bed {
    cache: CredentialCache,
    sts: Arc<FakeSts>,
    now: Arc<AtomicU64>,
}

const START: u64 = 1_800_000_000;

fn bed() -> Bed {
    let now = Arc::new(AtomicU64::new(START));
    let clock_now = now.clone();
    let clock: Clock =
        Arc::new(move || SystemTime::UNIX_EPOCH + Duration::from_secs(clock_now.load(Ordering::SeqCst)));
    let sts = Arc::new(FakeSts::new(clock.clone()));
    let cache = CredentialCache::with_clock(
        sts.clone(),
        CacheConfig::new(Duration::from_secs(3600)),
        Metrics::new(),
        clock,
    );
    Bed { cache, sts, now }
}

impl Bed {
    fn advance(&self, secs: u64) {
        self.now.fetch_add(secs, Ordering::SeqCst);
    }
    fn calls(&self) -> u32 {
        self.sts.calls()
    }
    fn fail_with(&self, e: Option<StsError>) {
        *self.sts.fail.lock().unwrap() = e;
    }
}

fn key(pod_uid: &str, name: &str) -> SessionKey {
    SessionKey {
        pod_uid: pod_uid.into(),
        role_arn: resolve(&format!("arn:aws:iam::123456789012:role/{name}"), None).unwrap(),
        session_name: format!("ns.{name}"),
        external_id: None,
        tags: vec![],
    }
}

#[test]
fn timing_follows_the_session_duration() {
    let hour = CacheConfig::new(Duration::from_secs(3600));
    assert_eq!(hour.min_remaining(), Duration::from_secs(900));
    assert_eq!(hour.refresh_remaining(), Duration::from_secs(1200));
    let short = CacheConfig::new(Duration::from_secs(900));
    assert_eq!(short.min_remaining(), Duration::from_secs(225));
    assert!(short.refresh_remaining() < Duration::from_secs(900));
}

#[tokio::test]
async fn one_sts_call_per_session_then_hits() {
    let b = bed();
    let (first, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Miss);
    for _ in 0..100 {
        let (again, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
        assert_eq!(served, Served::Hit);
        assert_eq!(again.access_key_id, first.access_key_id);
    }
    assert_eq!(b.calls(), 1);
}

#[tokio::test]
async fn concurrent_misses_share_one_call() {
    let b = bed();
    let gate = b.sts.gate.clone();
    let permits = gate.available_permits();
    gate.forget_permits(permits);
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let cache = b.cache.clone();
            tokio::spawn(async move { cache.get("ns", &key("pod-1", "app")).await })
        })
        .collect();
    settle().await;
    gate.add_permits(1);
    for w in waiters {
        assert!(w.await.unwrap().is_ok());
    }
    assert_eq!(b.calls(), 1);
}

#[tokio::test]
async fn a_caller_that_goes_away_does_not_cancel_the_fetch() {
    let b = bed();
    let gate = b.sts.gate.clone();
    gate.forget_permits(gate.available_permits());
    let cache = b.cache.clone();
    let impatient = tokio::spawn(async move { cache.get("ns", &key("pod-1", "app")).await });
    settle().await;
    impatient.abort();
    settle().await;
    gate.add_permits(1);
    settle().await;
    let (_, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Hit, "the abandoned fetch completed and filled the cache");
    assert_eq!(b.calls(), 1);
}

#[tokio::test]
async fn refreshes_ahead_of_expiry_in_the_background() {
    let b = bed();
    let (first, _) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    b.advance(30 * 60);
    assert_eq!(b.cache.refresh_due(|_| true), 0, "30 minutes left: not due");
    b.advance(11 * 60);
    assert_eq!(b.cache.refresh_due(|_| true), 1, "19 minutes left: due");
    settle().await;
    let (second, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Hit);
    assert_ne!(second.access_key_id, first.access_key_id);
    assert_eq!(b.calls(), 2);
}

#[tokio::test]
async fn never_hands_out_credentials_with_less_than_the_minimum_left() {
    let b = bed();
    let (first, _) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    b.advance(50 * 60); // 10 minutes left, no refresher ran
    let (second, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Miss);
    assert_ne!(second.access_key_id, first.access_key_id);
    assert!(second.expiration.duration_since(first.expiration).unwrap() >= Duration::from_secs(50 * 60));
}

#[tokio::test]
async fn sts_outage_serves_still_valid_credentials() {
    let b = bed();
    let (first, _) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    b.fail_with(Some(StsError::Unavailable("connection refused".into())));
    b.advance(50 * 60);
    let (served_creds, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Stale);
    assert_eq!(served_creds.access_key_id, first.access_key_id);
    b.advance(11 * 60); // expired now
    let err = b.cache.get("ns", &key("pod-1", "app")).await.unwrap_err();
    assert!(matches!(err, StsError::Unavailable(_)));
}

#[tokio::test]
async fn failures_back_off_instead_of_calling_sts_per_request() {
    let b = bed();
    b.fail_with(Some(StsError::Denied("AccessDenied".into())));
    assert!(b.cache.get("ns", &key("pod-1", "app")).await.is_err());
    for _ in 0..50 {
        let err = b.cache.get("ns", &key("pod-1", "app")).await.unwrap_err();
        assert_eq!(err, StsError::Denied("AccessDenied".into()), "the last error is repeated");
    }
    assert_eq!(b.calls(), 1, "no STS call while backing off");
    b.fail_with(None);
    b.advance(2);
    assert!(b.cache.get("ns", &key("pod-1", "app")).await.is_ok());
    assert_eq!(b.calls(), 2);
}

#[test]
fn backoff_grows_with_jitter_and_is_capped() {
    let c = CacheConfig::new(Duration::from_secs(3600));
    for failures in 1..40 {
        let d = backoff(&c, failures);
        let cap = c.backoff_base.saturating_mul(1 << (failures - 1).min(31)).min(c.backoff_max);
        assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} not in [{:?}, {cap:?}]", cap / 2);
    }
}

#[tokio::test]
async fn released_pods_drop_their_sessions() {
    let b = bed();
    b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    b.cache.get("ns", &key("pod-2", "other")).await.unwrap();
    assert_eq!(b.cache.len(), 2);
    b.cache.release("pod-1");
    assert_eq!(b.cache.len(), 1);
    // A pod whose role changes leaves its old session behind.
    b.cache.get("ns", &key("pod-2", "third")).await.unwrap();
    assert_eq!(b.cache.len(), 1);
}

#[tokio::test]
async fn two_pods_with_equal_sessions_get_different_credentials() {
    let b = bed();
    // Same role and session name (an override naming another pod's session): two pods.
    let (victim, _) = b.cache.get("ns", &key("victim", "app")).await.unwrap();
    let (attacker, served) = b.cache.get("ns", &key("attacker", "app")).await.unwrap();
    assert_eq!(served, Served::Miss, "the attacker's request is no hit on the victim's session");
    assert_ne!(attacker.access_key_id, victim.access_key_id);
    assert_eq!(b.calls(), 2);
}

fn renamed(pod_uid: &str, n: usize) -> SessionKey {
    let mut k = key(pod_uid, "app");
    k.session_name = format!("ns@name-{n}");
    k
}

#[tokio::test]
async fn annotation_changes_in_a_loop_cannot_spend_the_sts_budget() {
    let b = bed();
    // The pod's session-name annotation changes 50 times; each change prefetches.
    for n in 0..50 {
        b.cache.prefetch("ns", renamed("pod-1", n));
        settle().await;
    }
    assert_eq!(b.calls(), SESSION_BURST as u32, "only the pod's allowance of new sessions");
    // Asking while the allowance is spent: refused with a reason, no STS call.
    let error = b.cache.get("ns", &renamed("pod-1", 99)).await.unwrap_err();
    assert!(error.to_string().contains("new sessions recently"), "{error}");
    assert_eq!(b.calls(), SESSION_BURST as u32);
    // Other pods are untouched, and the allowance refills with time.
    b.cache.get("ns", &key("pod-2", "app")).await.unwrap();
    b.advance(SESSION_REFILL.as_secs());
    b.cache.get("ns", &renamed("pod-1", 100)).await.unwrap();
    assert_eq!(b.calls(), SESSION_BURST as u32 + 2);
    // A refresh of a session the pod already holds never counts against it.
    b.advance(41 * 60);
    assert_eq!(b.cache.refresh_due(|_| true), 2);
    settle().await;
    assert_eq!(b.calls(), SESSION_BURST as u32 + 4);
}

#[tokio::test]
async fn a_request_joining_a_background_call_makes_it_urgent() {
    let b = bed();
    let gate = b.sts.gate.clone();
    gate.forget_permits(gate.available_permits());
    b.cache.prefetch("ns", key("pod-1", "app"));
    settle().await;
    let background = b.sts.urgencies.lock().unwrap()[0].clone();
    assert!(!background.is_set(), "a prefetch is background work");
    let cache = b.cache.clone();
    let waiting = tokio::spawn(async move { cache.get("ns", &key("pod-1", "app")).await });
    settle().await;
    assert!(background.is_set(), "a pod now waits on it");
    gate.add_permits(1);
    assert!(waiting.await.unwrap().is_ok());
    assert_eq!(b.calls(), 1);
}

#[tokio::test]
async fn sessions_of_pods_that_are_gone_are_dropped_not_refreshed() {
    let b = bed();
    b.cache.get("ns", &key("live", "app")).await.unwrap();
    b.cache.get("ns", &key("gone", "app")).await.unwrap(); // raced its pod's deletion
    assert_eq!(b.cache.retain_pods(|uid| uid == "live"), 1);
    assert!(!b.cache.holds("gone") && b.cache.holds("live"));
    b.advance(41 * 60);
    assert_eq!(b.cache.refresh_due(|_| true), 1, "only the live pod's session is refreshed");
}

#[tokio::test]
async fn a_deferred_background_call_gives_the_pods_allowance_back() {
    let b = bed();
    b.fail_with(Some(StsError::Deferred));
    for n in 0..10 {
        b.cache.prefetch("ns", renamed("pod-1", n));
        settle().await;
    }
    b.fail_with(None);
    for n in 10..14 {
        b.cache.get("ns", &renamed("pod-1", n)).await.expect("deferrals cost the pod nothing");
    }
}

#[tokio::test]
async fn a_deferred_background_call_is_no_failure() {
    let b = bed();
    b.fail_with(Some(StsError::Deferred));
    b.cache.prefetch("ns", key("pod-1", "app"));
    settle().await;
    b.fail_with(None);
    let (_, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Miss, "no backing off after a deferral");
}

#[tokio::test]
async fn prefetch_makes_the_first_request_a_hit() {
    let b = bed();
    b.cache.prefetch("ns", key("pod-1", "app"));
    settle().await;
    let (_, served) = b.cache.get("ns", &key("pod-1", "app")).await.unwrap();
    assert_eq!(served, Served::Hit);
    assert_eq!(b.calls(), 1);
}

#[tokio::test]
async fn pods_created_in_a_loop_share_their_namespaces_allowance_of_new_sessions() {
    let b = bed();
    let burst = NAMESPACE_SESSION_BURST as u32;
    // Each pod a new UID (created, deleted, created again): each has a whole pod allowance.
    for n in 0..burst + 100 {
        b.cache.prefetch("busy", key(&format!("churn-{n}"), "app"));
        settle().await;
    }
    assert_eq!(b.calls(), burst, "only the namespace's allowance");
    // A pod of the namespace that asks now (it runs on a node) is served all the same: the
    // namespace's allowance limits background work only.
    b.cache.get("busy", &key("asking", "app")).await.unwrap();
    assert_eq!(b.calls(), burst + 1);
    // Other namespaces are untouched.
    b.cache.get("quiet", &key("neighbour", "app")).await.unwrap();
    assert_eq!(b.calls(), burst + 2);
    // The allowance refills at its pace.
    b.advance(1);
    let per_second = (1.0 / NAMESPACE_SESSION_REFILL.as_secs_f64()) as u32;
    for n in 0..per_second + 5 {
        b.cache.prefetch("busy", key(&format!("later-{n}"), "app"));
        settle().await;
    }
    assert_eq!(b.calls(), burst + 2 + per_second);
}

#[tokio::test]
async fn a_refresh_asks_first_whether_the_session_is_still_permitted() {
    let b = bed();
    b.cache.get("ns", &key("permitted", "app")).await.unwrap();
    b.cache.get("ns", &key("withdrawn", "app")).await.unwrap();
    b.advance(41 * 60);
    assert_eq!(b.cache.refresh_due(|k| k.pod_uid == "permitted"), 1);
    settle().await;
    assert_eq!(b.calls(), 3, "one refresh, none for the session no longer permitted");
    assert!(!b.cache.holds("withdrawn"), "which is dropped");
    assert!(b.cache.holds("permitted"));
}
