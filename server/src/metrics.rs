//! The server's Prometheus metrics. Every label is bounded: RPC names, gRPC codes, denial reasons,
//! STS results and watch names; never a pod, IP or role.

use imdsgate_core::admin::register_common;
use imdsgate_core::cert_expiry::ExpiryGauges;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub rpc: Rpc,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcOnly {
    pub rpc: Rpc,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Rpc {
    GetCredentials,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StsLabels {
    pub result: StsResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum StsResult {
    Success,
    Denied,
    Unavailable,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub watch: WatchKind,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum WatchKind {
    Pods,
    Namespaces,
    Nodes,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub decision: String,
    pub reason: String,
}

/// All of the server's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RpcLabels, Counter>,
    pub request_duration: Family<RpcOnly, Histogram, fn() -> Histogram>,
    pub denials: Family<ReasonLabels, Counter>,
    pub sts_calls: Family<StsLabels, Counter>,
    pub sts_duration: Family<StsLabels, Histogram, fn() -> Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_stale_served: Counter,
    pub cached_sessions: Gauge,
    pub pods_indexed: Gauge,
    pub namespaces_indexed: Gauge,
    pub watch_restarts: Family<WatchLabels, Counter>,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub admission_duration: Histogram,
    pub revocations: Family<ReasonLabels, Counter>,
    pub revocation_streams: Gauge,
    pub prefetches_skipped: Counter,
    pub pods_on_server_nodes: Gauge,
    pub ready: Gauge,
    /// 1 once the role base ARN is known: at once with `--role-base-arn` (or without a base),
    /// with `--role-base-arn-autodetect` once GetCallerIdentity answered with the server's own
    /// credentials; 0 until then.
    pub aws_identity_ready: Gauge,
    pub certificate_expiry: ExpiryGauges,
    /// gRPC connections whose mutual-TLS handshake failed: `refused` (no valid client
    /// certificate from the CA, say), `timed_out`, `shed` (closed at once: its source already
    /// had its share of pending handshakes) or `evicted` (the oldest handshake of the busiest
    /// source, giving way when the total was reached).
    pub tls_handshake_failures: Family<OutcomeLabels, Counter>,
    /// TokenReviews of agent tokens sent to the apiserver, by outcome: `accepted`, `refused`,
    /// `failed` (no answer).
    pub token_reviews: Family<OutcomeLabels, Counter>,
    /// Agent calls refused without a review: their connection had started too many.
    pub token_reviews_throttled: Counter,
    /// Accepted agent token reviews cached.
    pub review_cache_entries: Gauge,
    /// New STS sessions not started because an allowance was spent, by `budget`: `pod` (a pod's
    /// annotation changes) or `namespace` (a namespace's pods, created and deleted in a loop).
    pub sessions_throttled: Family<BudgetLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub budget: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            denials: Family::default(),
            sts_calls: Family::default(),
            sts_duration: Family::new_with_constructor(latency_histogram),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_stale_served: Counter::default(),
            cached_sessions: Gauge::default(),
            pods_indexed: Gauge::default(),
            namespaces_indexed: Gauge::default(),
            watch_restarts: Family::default(),
            admissions: Family::default(),
            admission_duration: latency_histogram(),
            revocations: Family::default(),
            revocation_streams: Gauge::default(),
            prefetches_skipped: Counter::default(),
            pods_on_server_nodes: Gauge::default(),
            ready: Gauge::default(),
            aws_identity_ready: Gauge::default(),
            certificate_expiry: ExpiryGauges::default(),
            tls_handshake_failures: Family::default(),
            token_reviews: Family::default(),
            token_reviews_throttled: Counter::default(),
            review_cache_entries: Gauge::default(),
            sessions_throttled: Family::default(),
        };
        for budget in ["pod", "namespace"] {
            metrics.sessions_throttled.get_or_create(&BudgetLabels { budget }).inc_by(0);
        }
        for outcome in ["refused", "timed_out"] {
            metrics.tls_handshake_failures.get_or_create(&OutcomeLabels { outcome }).inc_by(0);
        }
        // Every STS result exists from the start at 0, so rate() sees the first failure.
        for result in [StsResult::Success, StsResult::Denied, StsResult::Unavailable] {
            metrics.sts_calls.get_or_create(&StsLabels { result }).inc_by(0);
        }
        metrics
    }

    /// A registry holding every metric under the `imdsgate_server` prefix.
    pub fn registry(&self) -> Arc<Registry> {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("imdsgate_server");
        r.register("requests", "gRPC requests by RPC and status code", self.requests.clone());
        r.register("request_duration_seconds", "gRPC request latency", self.request_duration.clone());
        r.register("denials", "Requests refused, by reason", self.denials.clone());
        r.register("sts_calls", "STS AssumeRole calls by result", self.sts_calls.clone());
        r.register("sts_call_duration_seconds", "STS AssumeRole latency", self.sts_duration.clone());
        r.register("cache_hits", "Credential requests answered from the cache", self.cache_hits.clone());
        r.register("cache_misses", "Credential requests that waited for STS", self.cache_misses.clone());
        r.register(
            "cache_stale_served",
            "Requests answered with still-valid cached credentials while STS failed",
            self.cache_stale_served.clone(),
        );
        r.register("cached_sessions", "STS sessions held in the cache", self.cached_sessions.clone());
        r.register("pods_indexed", "Live pods in the index", self.pods_indexed.clone());
        r.register("namespaces_indexed", "Namespaces in the index", self.namespaces_indexed.clone());
        r.register(
            "watch_restarts",
            "Kubernetes watch errors (each is retried)",
            self.watch_restarts.clone(),
        );
        r.register("admissions", "Admission webhook decisions by reason", self.admissions.clone());
        r.register(
            "admission_duration_seconds",
            "Admission webhook latency",
            self.admission_duration.clone(),
        );
        r.register(
            "revocations",
            "Pods whose credentials were withdrawn (sent to their agent), by reason",
            self.revocations.clone(),
        );
        r.register(
            "revocation_streams",
            "Agents' open WatchRevocations streams",
            self.revocation_streams.clone(),
        );
        r.register(
            "prefetches_skipped",
            "Prefetches not made: the pod's prefetch budget or the STS rate's share for background calls was spent",
            self.prefetches_skipped.clone(),
        );
        r.register(
            "pods_on_server_nodes",
            "Pods outside the exempt namespaces running on server nodes (should be 0)",
            self.pods_on_server_nodes.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "gRPC connections whose mutual-TLS handshake failed, by outcome (refused, timed_out)",
            self.tls_handshake_failures.clone(),
        );
        r.register(
            "token_reviews",
            "TokenReviews of agent tokens sent to the apiserver, by outcome (accepted, refused, failed)",
            self.token_reviews.clone(),
        );
        r.register(
            "token_reviews_throttled",
            "Agent calls refused without a TokenReview because their connection had started too many",
            self.token_reviews_throttled.clone(),
        );
        r.register(
            "token_review_cache_entries",
            "Accepted agent token reviews cached",
            self.review_cache_entries.clone(),
        );
        r.register(
            "sessions_throttled",
            "New STS sessions not started because an allowance was spent, by budget (pod, namespace)",
            self.sessions_throttled.clone(),
        );
        r.register(
            "aws_identity_ready",
            "1 once the server knows its role base ARN (given, or detected with its own AWS credentials); 0 while --role-base-arn-autodetect keeps failing",
            self.aws_identity_ready.clone(),
        );
        register_common(r, &self.ready, &self.certificate_expiry);
        Arc::new(root)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}
