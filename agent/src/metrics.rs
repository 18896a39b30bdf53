//! The agent's Prometheus metrics. Labels are bounded: routes, status codes, outcomes and gRPC
//! codes; never a pod, an IP or a role.

use imdsgate_core::admin::register_common;
use imdsgate_core::cert_expiry::ExpiryGauges;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Route {
    Token,
    IamListing,
    IamInfo,
    RoleName,
    Credentials,
    Proxied,
    Blocked,
    Other,
}

impl Route {
    const COUNT: usize = Route::Other as usize + 1;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Route,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Route,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum WaitOutcome {
    Found,
    TimedOut,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    pub outcome: WaitOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum UpstreamOutcome {
    Proxied,
    Blocked,
    Failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub outcome: UpstreamOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// All of the agent's metrics; cheap to clone.
/// A revocation's or refusal's reason: one of the stable reason codes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevocationLabels {
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub pods_indexed: Gauge,
    pub pod_waits: Family<WaitLabels, Counter>,
    pub upstream: Family<UpstreamLabels, Counter>,
    pub server_errors: Family<CodeLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub watch_restarts: Counter,
    pub revocations: Family<RevocationLabels, Counter>,
    pub revocation_streams: Gauge,
    /// Refusals only the agent decides, by reason (`NO_ROLE`, `ROLE_MISMATCH`, ...).
    pub refusals: Family<RevocationLabels, Counter>,
    pub ready: Gauge,
    pub certificate_expiry: ExpiryGauges,
    /// Whether the interception rule of each family is in place (only with `--iptables`).
    pub rule_present: Family<FamilyLabels, Gauge>,
    /// Times the agent found its rule gone or altered and put it back.
    pub rule_repairs: Family<FamilyLabels, Counter>,
    /// The hot path's series, resolved once: see [`Metrics::request_answered`].
    hot: Arc<HotSeries>,
}

/// Per route, the `requests{route, status="200"}` counter and the `request_duration_seconds{route}`
/// histogram, each the family's own series (a clone shares its value), looked up in the family on
/// first use only: a series appears exactly when the first such request is answered, as with
/// `get_or_create`, and no request after it hashes labels or takes the family's lock.
#[derive(Default)]
struct HotSeries {
    ok: [OnceLock<Counter>; Route::COUNT],
    duration: [OnceLock<Histogram>; Route::COUNT],
}

/// An address family of the interception rule: `ipv4` or `ipv6`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: &'static str,
}

fn sub_millisecond_histogram() -> Histogram {
    Histogram::new([0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 2.5])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(sub_millisecond_histogram),
            pods_indexed: Gauge::default(),
            pod_waits: Family::default(),
            upstream: Family::default(),
            server_errors: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            watch_restarts: Counter::default(),
            revocations: Family::default(),
            revocation_streams: Gauge::default(),
            refusals: Family::default(),
            ready: Gauge::default(),
            certificate_expiry: ExpiryGauges::default(),
            rule_present: Family::default(),
            rule_repairs: Family::default(),
            hot: Arc::default(),
        }
    }

    /// Counts one answered IMDS request: `requests{route, status}` and its duration in
    /// `request_duration_seconds{route}`.
    pub fn request_answered(&self, route: Route, status: u16, seconds: f64) {
        let i = route as usize;
        if status == 200 {
            self.hot.ok[i]
                .get_or_init(|| self.requests.get_or_create(&RequestLabels { route, status }).clone())
                .inc();
        } else {
            self.requests.get_or_create(&RequestLabels { route, status }).inc();
        }
        self.hot.duration[i]
            .get_or_init(|| self.request_duration.get_or_create(&RouteLabels { route }).clone())
            .observe(seconds);
    }

    /// A registry holding every metric under the `imdsgate_agent` prefix.
    pub fn registry(&self) -> Arc<Registry> {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("imdsgate_agent");
        r.register("requests", "IMDS requests by route and HTTP status", self.requests.clone());
        r.register(
            "request_duration_seconds",
            "IMDS request latency by route",
            self.request_duration.clone(),
        );
        r.register("pods_indexed", "Pods of this node in the index", self.pods_indexed.clone());
        r.register(
            "pod_waits",
            "Requests that waited for their pod to appear, by outcome",
            self.pod_waits.clone(),
        );
        r.register("upstream", "Requests for other metadata, by outcome", self.upstream.clone());
        r.register(
            "server_errors",
            "Failed calls to the imdsgate server, by gRPC code",
            self.server_errors.clone(),
        );
        r.register(
            "cache_hits",
            "Credential requests answered from the agent's cache",
            self.cache_hits.clone(),
        );
        r.register("cache_misses", "Credential requests that called the server", self.cache_misses.clone());
        r.register("watch_restarts", "Pod watch errors (each is retried)", self.watch_restarts.clone());
        r.register(
            "revocations",
            "Pods whose cached credentials the server revoked, by reason",
            self.revocations.clone(),
        );
        r.register(
            "revocation_streams",
            "Open revocation streams to server replicas",
            self.revocation_streams.clone(),
        );
        r.register(
            "refusals",
            "Credentials requests the agent itself refused, by reason (each also a Warning Event on the pod)",
            self.refusals.clone(),
        );
        r.register(
            "interception_rule_present",
            "Whether the interception rule is in place, by address family (1 yes; 0 missing and not repairable)",
            self.rule_present.clone(),
        );
        r.register(
            "interception_repairs",
            "Times the interception rule was found missing or altered and put back, by address family",
            self.rule_repairs.clone(),
        );
        register_common(r, &self.ready, &self.certificate_expiry);
        Arc::new(root)
    }
}
