//! What a pod's own next request gets after each watch event: served from the cache, or asked of
//! the (fake) server again; and whether the watch asked the server ahead of that request.

use super::*;
use crate::credentials::credential_cache::tests::FakeServer;
use imdsgate_core::fixtures;
use imdsgate_core::pod_index::EXTERNAL_ID_ANNOTATION;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A running pod of this node with one IP and a role.
fn with_role(uid: &str, ip: &str, role: &str) -> Pod {
    fixtures::pod(uid, uid).ip(ip).role(role).build()
}

struct Bed {
    watch: PodWatch,
    credentials: Arc<CredentialCache>,
    server: Arc<FakeServer>,
}

fn bed() -> Bed {
    let server = FakeServer::new(Duration::from_secs(3600));
    let credentials = Arc::new(CredentialCache::new(server.clone(), Metrics::new()));
    let watch = PodWatch::new(Arc::new(PodIndex::new()), credentials.clone());
    Bed { watch, credentials, server }
}

impl Bed {
    /// The watch delivers `pod` (added or changed), then any prefetch it started completes (time
    /// is paused: the fake server's delay passes at once).
    async fn apply(&self, pod: &Pod) {
        self.watch.update(Update::Apply(pod.clone()));
        settle().await;
    }

    async fn delete(&self, pod: &Pod) {
        self.watch.update(Update::Delete(pod.clone()));
        settle().await;
    }

    /// How often the server has been asked so far.
    fn calls(&self) -> u32 {
        self.server.calls.load(Ordering::SeqCst)
    }

    /// The pod's own request for its credentials, as the IMDS handler makes it: the access key it
    /// gets (the fake server numbers its answers, so a key says which call it came from).
    async fn ask(&self, uid: &str, ip: &str, role: &str) -> String {
        let ip: IpAddr = ip.parse().unwrap();
        self.credentials.get(ip, uid, &[ip], role).await.unwrap().access_key_id.clone()
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_new_pod_on_an_ip_still_held_by_another_pod_drops_the_previous_owners_credentials() {
    let bed = bed();
    let previous = with_role("uid-old", "10.0.0.5", "app");
    bed.apply(&previous).await;
    assert_eq!(bed.calls(), 1, "prefetched");
    // The IP is handed to a new pod before the old pod's deletion arrives.
    bed.apply(&with_role("uid-new", "10.0.0.5", "app")).await;
    assert_eq!(bed.calls(), 1, "no prefetch while two pods claim the IP");
    assert_eq!(bed.ask("uid-old", "10.0.0.5", "app").await, "ASIA2-uid-old", "not served from the cache");
    assert_eq!(bed.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_removed_pod_loses_its_credentials() {
    let bed = bed();
    let gone = with_role("uid-a", "10.0.0.5", "app");
    bed.apply(&gone).await;
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "app").await, "ASIA1-uid-a", "served the prefetched ones");
    bed.delete(&gone).await;
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "app").await, "ASIA2-uid-a", "asked again after the deletion");
    assert_eq!(bed.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_relist_without_the_pod_removes_it_and_its_credentials() {
    let bed = bed();
    bed.apply(&with_role("uid-a", "10.0.0.5", "app")).await;
    bed.watch.update(Update::Reset(vec![]));
    settle().await;
    assert!(bed.credentials.is_empty());
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "app").await, "ASIA2-uid-a");
}

#[tokio::test(start_paused = true)]
async fn a_role_change_drops_the_old_roles_credentials_and_prefetches_the_new_ones() {
    let bed = bed();
    bed.apply(&with_role("uid-a", "10.0.0.5", "app")).await;
    bed.apply(&with_role("uid-a", "10.0.0.5", "other")).await;
    assert_eq!(bed.calls(), 2, "prefetched for the new role");
    assert_eq!(bed.credentials.held(), [("uid-a".to_string(), "other".to_string())]);
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "other").await, "ASIA2-uid-a", "the prefetched ones");
    assert_eq!(bed.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn another_external_id_for_the_same_role_is_fetched_anew() {
    let bed = bed();
    let ext = |id| {
        fixtures::pod("uid-a", "uid-a")
            .ip("10.0.0.5")
            .role("app")
            .annotation(EXTERNAL_ID_ANNOTATION, id)
            .build()
    };
    bed.apply(&ext("first")).await;
    bed.apply(&ext("second")).await;
    assert_eq!(bed.calls(), 2, "the credentials for the old ExternalId are not kept");
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "app").await, "ASIA2-uid-a");
}

#[tokio::test(start_paused = true)]
async fn a_change_that_leaves_the_identity_alone_keeps_the_credentials() {
    let bed = bed();
    let mut running = with_role("uid-a", "10.0.0.5", "app");
    bed.apply(&running).await;
    running.status.as_mut().unwrap().phase = Some("Pending".into());
    bed.apply(&running).await;
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "app").await, "ASIA1-uid-a");
    assert_eq!(bed.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_pod_is_prefetched_only_with_a_role_and_an_ip_of_its_own() {
    let bed = bed();
    bed.apply(&with_role("uid-a", "10.0.0.5", "app")).await;
    assert_eq!(bed.calls(), 1, "a pod with a role: fetched before its first request");
    assert_eq!(bed.ask("uid-a", "10.0.0.5", "app").await, "ASIA1-uid-a");

    bed.apply(&fixtures::pod("uid-none", "uid-none").ip("10.0.0.6").build()).await;
    assert_eq!(bed.calls(), 1, "no role, nothing to fetch");

    bed.apply(&with_role("uid-b", "10.0.0.7", "app")).await;
    bed.apply(&with_role("uid-c", "10.0.0.7", "app")).await;
    assert_eq!(bed.calls(), 2, "only the first pod on 10.0.0.7; the second shares its IP");
}
