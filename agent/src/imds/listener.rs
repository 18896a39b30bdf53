//! The IMDS listener: the shared hardened HTTP/1.1 server ([`imdsgate_core::http_server`]) with
//! budgets by source. A pod of this node draws on the main budget (`--max-concurrent-requests`)
//! within its own share; every other address (a pod the watch has not delivered yet, a
//! host-network process, a pod of another node reaching `<node IP>:8183`, the IMDS port; the admin
//! endpoint on 8184 is a listener of its own) shares a small separate budget with a smaller share
//! each, so unknown-source load, which waits up to `--pod-wait`, never takes a slot from a known
//! pod. Addresses that cannot be a pod (loopback, unspecified, multicast,
//! the node's own) are answered at once. The same split applies to connections.
//! One dual-stack socket takes both families (IPv4 peers appear as IPv4-mapped addresses, which
//! [`Imds::handle`] maps back).

use crate::imds::Imds;
use crate::imds::routes::Route;
use crate::metrics::Metrics;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use imdsgate_core::http_server::{self, Accept, Budget, HttpServer, PeerAddr, SourceBudget, SourceClass};
use imdsgate_core::pod_index::Claim;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Most requests one unknown source address may have in flight.
pub const REQUESTS_PER_UNKNOWN_SOURCE: usize = 4;

/// Hard limits of the IMDS listener.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// Requests in flight from pods of this node, in total and per pod.
    pub pods: Budget,
    /// Requests in flight from every other address, in total and per address.
    pub unknown: Budget,
}

impl Limits {
    /// The shared server's limits: connections in each class at most twice its requests (an idle
    /// keep-alive connection holds no request), and the outer request cap the sum of both classes,
    /// so only the class budgets below ever refuse a request.
    fn server(&self, grace: Duration) -> http_server::Limits {
        let twice = |b: Budget| Budget {
            total: b.total.saturating_mul(2),
            per_source: b.per_source.saturating_mul(2),
        };
        http_server::Limits {
            connections: twice(self.pods),
            unknown_connections: twice(self.unknown),
            max_header_bytes: self.max_header_bytes,
            header_timeout: self.header_timeout,
            // The IMDS service answers 504 itself (and counts it) at `request_timeout`.
            request_timeout: self.request_timeout + Duration::from_secs(1),
            max_concurrent_requests: self.pods.total.saturating_add(self.unknown.total),
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: grace,
        }
    }
}

fn class_of(imds: &Imds, ip: IpAddr) -> SourceClass {
    let ip = ip.to_canonical();
    if imds.can_be_pod(ip) && imds.pods.knows_ip(&ip) { SourceClass::Known } else { SourceClass::Unknown }
}

#[derive(Clone)]
struct State {
    imds: Arc<Imds>,
    request_timeout: Duration,
    metrics: Metrics,
    pods: Arc<SourceBudget>,
    unknown: Arc<SourceBudget>,
}

/// Binds the IMDS listener. An IPv6 wildcard (`[::]`, the default) takes IPv4 too, whatever the
/// node's `net.ipv6.bindv6only`; where the kernel has no IPv6 it binds `0.0.0.0` on the same port
/// instead (nothing can then arrive over IPv6).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let open = |addr: std::net::SocketAddr| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    match open(addr) {
        Err(error) if addr.is_ipv6() && addr.ip().is_unspecified() && error.raw_os_error() == Some(97) => {
            // EAFNOSUPPORT: no IPv6 in this kernel.
            tracing::warn!(%addr, "no IPv6 on this node; the IMDS listener takes IPv4 only");
            open((std::net::Ipv4Addr::UNSPECIFIED, addr.port()).into())
        }
        other => other,
    }
}

/// Serves IMDS on `listener` (a bound [`TcpListener`]; any [`Accept`], so a harness can name the
/// peer) until `shutdown`, then drains for at most `grace`.
pub async fn serve<A: Accept>(
    listener: A,
    imds: Arc<Imds>,
    limits: Limits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    // Shared: one reference count per request, not one per metric family.
    let state = Arc::new(State {
        imds: imds.clone(),
        request_timeout: limits.request_timeout,
        metrics,
        pods: SourceBudget::new(limits.pods),
        unknown: SourceBudget::new(limits.unknown),
    });
    let service = http_server::service_fn(move |(peer, req): (PeerAddr, Request<Incoming>)| {
        let state = state.clone();
        // Boxed, so the layers around it move a pointer rather than the whole answer's state, and
        // polled once right away (the server calls this as the request head arrives): most
        // answers are ready then (a known pod, cached credentials), and the request is released
        // before the server reads on. An answer that must wait is polled on as usual.
        let mut answering = Box::pin(async move { respond(&state, peer, req).await });
        let pending = match answering.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(response) => Err(response),
            Poll::Pending => Ok(answering),
        };
        async move {
            Ok::<_, Infallible>(match pending {
                Ok(answering) => answering.await,
                Err(response) => response,
            })
        }
    });
    HttpServer::new("IMDS", limits.server(grace))
        .classify(Arc::new(move |ip| class_of(&imds, ip)))
        .serve_with_peer(listener, service, shutdown)
        .await
}

async fn respond(state: &State, peer: PeerAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let peer = peer.0.ip().to_canonical();
    let (route, response) = answer(state, peer, req).await;
    state.metrics.request_answered(route, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn answer<B>(
    state: &State,
    peer: IpAddr,
    req: Request<B>,
) -> (crate::metrics::Route, Response<Full<Bytes>>) {
    let imds = &state.imds;
    // As `class_of`, and the pod for `Imds::handle`: one index lookup per request.
    let claim = imds.claim(peer);
    let budget = match claim {
        Claim::Nobody => &state.unknown,
        Claim::One(_) | Claim::Several => &state.pods,
    };
    // An address no pod can have is refused at once by `Imds::handle`: it needs no budget.
    let _permit = match imds.can_be_pod(peer).then(|| budget.try_acquire(peer)) {
        Some(Err(_)) => {
            return (
                Route::of(req.uri().path()).label(),
                http_server::plain(StatusCode::SERVICE_UNAVAILABLE, "imdsgate agent is busy; retry\n"),
            );
        }
        permit => permit,
    };
    let mut handling =
        std::pin::pin!(imds.handle(peer, Some(claim), req.method(), req.uri().path(), req.headers()));
    // Most answers are ready at once (a known pod, cached credentials): those need no timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx))).await;
    if let Poll::Ready(answer) = first {
        return answer;
    }
    // Boxed: the timer's state stays out of the future of every answer ready at once.
    Box::pin(tokio::time::timeout(state.request_timeout, handling)).await.unwrap_or_else(|_| {
        (
            crate::metrics::Route::Other,
            http_server::plain(StatusCode::GATEWAY_TIMEOUT, "imdsgate agent timed out\n"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::credential_cache::CredentialCache;
    use crate::credentials::credential_cache::tests::FakeServer;
    use crate::imds::token::TokenKey;
    use crate::imds::upstream::AllowList;
    use imdsgate_core::PodIndex;
    use std::net::Ipv4Addr;

    fn pod(uid: &str, ip: &str) -> k8s_openapi::api::core::v1::Pod {
        imdsgate_core::fixtures::pod(uid, uid).ip(ip).role("app-role").build()
    }

    /// Pod 10.0.1.1 known; budgets: pods 8 (2 each), unknown 6 (4 each); a 2 s pod wait.
    fn state() -> State {
        let pods = Arc::new(PodIndex::new());
        pods.apply(&pod("uid-app", "10.0.1.1"));
        let imds = Imds {
            pods,
            node_ips: vec!["10.0.0.1".parse().unwrap()],
            pod_wait: Duration::from_secs(2),
            tokens: TokenKey::from_bytes([1; 32]),
            require_imdsv2: false,
            credentials: Arc::new(CredentialCache::new(
                FakeServer::new(Duration::from_secs(3600)),
                Metrics::new(),
            )),
            upstream: None,
            allow: AllowList::default_list(),
            metrics: Metrics::new(),
            events: Arc::new(crate::imds::refusal_events::AgentEvents::new(
                None,
                "node-a".into(),
                Metrics::new(),
            )),
        };
        State {
            imds: Arc::new(imds),
            request_timeout: Duration::from_secs(20),
            metrics: Metrics::new(),
            pods: SourceBudget::new(Budget { total: 8, per_source: 2 }),
            unknown: SourceBudget::new(Budget { total: 6, per_source: REQUESTS_PER_UNKNOWN_SOURCE }),
        }
    }

    const ROLE_PATH: &str = "/latest/meta-data/iam/security-credentials/";

    fn call(state: &State, from: &str) -> tokio::task::JoinHandle<StatusCode> {
        let (state, from) = (state.clone(), from.parse().unwrap());
        tokio::spawn(async move {
            let req = Request::get(ROLE_PATH).body(()).unwrap();
            answer(&state, from, req).await.1.status()
        })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_sources_wait_within_their_own_budget_and_never_crowd_out_known_pods() {
        let state = state();
        // One unknown address holds its 4 waits; its other requests are refused at once.
        let flood: Vec<_> = (0..10).map(|_| call(&state, "10.0.9.9")).collect();
        // Two more unknown addresses fill the unknown budget (6) and overflow it.
        let others: Vec<_> = ["10.0.9.1", "10.0.9.2", "10.0.9.3"].iter().map(|ip| call(&state, ip)).collect();
        settle().await;
        let refused_at_once = flood.iter().chain(&others).filter(|t| t.is_finished()).count();
        assert_eq!(refused_at_once, 6 + 1, "beyond 4 per address and 6 in all");
        assert_eq!(state.unknown.in_use(), 6);

        // Meanwhile the known pod is served, and loopback and the node are answered at once.
        assert_eq!(call(&state, "10.0.1.1").await.unwrap(), StatusCode::OK);
        assert_eq!(call(&state, "127.0.0.1").await.unwrap(), StatusCode::FORBIDDEN);
        assert_eq!(call(&state, "10.0.0.1").await.unwrap(), StatusCode::FORBIDDEN);
        assert_eq!(state.unknown.in_use(), 6, "loopback and the node took no wait slot");

        // A pod the watch delivers during the wait is served: the wait is for exactly that.
        state.imds.pods.apply(&pod("uid-late", "10.0.9.9"));
        let mut statuses = Vec::new();
        for task in flood.into_iter().chain(others) {
            statuses.push(task.await.unwrap().as_u16());
        }
        statuses.sort();
        let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
        assert_eq!((count(200), count(404), count(503)), (4, 2, 7), "{statuses:?}");
        assert_eq!(state.unknown.in_use(), 0);
    }

    #[test]
    fn ipv4_peers_on_the_dual_stack_socket_are_classed_by_their_ipv4_address() {
        let state = state();
        let mapped = |ip: &str| IpAddr::V6(ip.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped());
        assert_eq!(class_of(&state.imds, mapped("10.0.1.1")), SourceClass::Known);
        assert_eq!(class_of(&state.imds, mapped("10.0.9.9")), SourceClass::Unknown);
        assert!(!state.imds.can_be_pod(mapped("10.0.0.1")), "the node, mapped, is still the node");
        assert!(!state.imds.can_be_pod(mapped("127.0.0.1")));
    }

    #[tokio::test(start_paused = true)]
    async fn one_pod_cannot_take_the_whole_budget() {
        let state = state();
        let gate = state.pods.clone();
        // The pod's share is 2: hold both and the third is refused, another pod is not.
        state.imds.pods.apply(&pod("uid-b", "10.0.1.2"));
        let a1 = gate.try_acquire("10.0.1.1".parse().unwrap()).unwrap();
        let _a2 = gate.try_acquire("10.0.1.1".parse().unwrap()).unwrap();
        assert_eq!(call(&state, "10.0.1.1").await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(call(&state, "10.0.1.2").await.unwrap(), StatusCode::OK);
        drop(a1);
        assert_eq!(call(&state, "10.0.1.1").await.unwrap(), StatusCode::OK);
    }
}
