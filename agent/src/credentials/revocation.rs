//! The revocation feed: one `WatchRevocations` stream to every server replica, each opened with
//! what the agent holds (so revocations missed while a stream was down are caught up at once),
//! and every revocation received drops the pod's cached credentials. Nothing is asked per
//! request: the hot path only reads the cache. Any one replica's revocation suffices; listening to
//! all of them also catches a replica whose watch lags and that re-issued in the meantime.

use crate::credentials::credential_cache::CredentialCache;
use crate::credentials::server_client::ServerClient;
use crate::metrics::{Metrics, RevocationLabels};
use imdsgate_core::backoff::Backoff;
use imdsgate_proto::Reason;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often the set of replicas is compared with the open streams.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// First and longest pause before a failed stream is opened again.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Keeps a stream open to every replica until the process ends (a critical task).
pub async fn follow(client: Arc<ServerClient>, cache: Arc<CredentialCache>, metrics: Metrics) {
    let mut streams: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let addrs = client.replica_addrs();
        streams.retain(|addr, task| {
            let keep = addrs.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for addr in addrs {
            streams.entry(addr).or_insert_with(|| {
                tokio::spawn(follow_replica(client.clone(), addr, cache.clone(), metrics.clone()))
            });
        }
    }
}

/// Follows one replica's stream, reopening it (with backoff) whenever it ends.
async fn follow_replica(
    client: Arc<ServerClient>,
    addr: SocketAddr,
    cache: Arc<CredentialCache>,
    metrics: Metrics,
) {
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        match client.watch_revocations(addr, cache.held()).await {
            Ok(mut stream) => {
                tracing::debug!(replica = %addr, "revocation stream open");
                backoff.succeeded();
                metrics.revocation_streams.inc();
                loop {
                    match stream.message().await {
                        Ok(Some(revocation)) => {
                            apply(&cache, &metrics, &revocation.pod_uid, &revocation.reason);
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::info!(replica = %addr, code = ?status.code(), message = status.message(), "revocation stream ended");
                            break;
                        }
                    }
                }
                metrics.revocation_streams.dec();
            }
            Err(status) => {
                tracing::debug!(replica = %addr, code = ?status.code(), message = status.message(), "cannot open the revocation stream");
            }
        }
        tokio::time::sleep(backoff.failed()).await;
    }
}

/// Drops what the cache holds for `pod_uid`.
pub fn apply(cache: &CredentialCache, metrics: &Metrics, pod_uid: &str, reason: &str) {
    let reason = Reason::parse(reason).map(Reason::as_str).unwrap_or("UNKNOWN");
    metrics.revocations.get_or_create(&RevocationLabels { reason }).inc();
    if cache.revoke(pod_uid) {
        tracing::info!(pod_uid, reason, "credentials revoked by the server");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::credential_cache::tests::FakeServer;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn a_revocation_drops_the_pods_entry_and_the_next_request_asks_again() {
        let server = FakeServer::new(Duration::from_secs(3600));
        let metrics = Metrics::new();
        let cache = CredentialCache::new(server.clone(), metrics.clone());
        let ip = "10.0.0.1".parse().unwrap();
        cache.get(ip, "uid-a", &[ip], "app").await.unwrap();
        cache.get(ip, "uid-b", &[ip], "app").await.unwrap();
        apply(&cache, &metrics, "uid-a", "NAMESPACE_FORBIDS");
        apply(&cache, &metrics, "uid-unknown", "made-up reason\nwith newline");
        assert_eq!(cache.held(), [("uid-b".to_string(), "app".to_string())]);
        cache.get(ip, "uid-a", &[ip], "app").await.unwrap();
        assert_eq!(server.calls.load(Ordering::SeqCst), 3, "uid-a's next request went to the server");
        let labels = |reason| RevocationLabels { reason };
        assert_eq!(metrics.revocations.get_or_create(&labels("NAMESPACE_FORBIDS")).get(), 1);
        assert_eq!(metrics.revocations.get_or_create(&labels("UNKNOWN")).get(), 1, "labels stay bounded");
    }
}
