//! The mutual-TLS listener for gRPC: client certificates signed by `--tls-client-ca` are required;
//! the certificate, key and CA are re-read when their files change. Handshakes run in their own
//! tasks with a short deadline, so a slow or hostile client cannot stall the accept loop; failed
//! accepts back off (the shared [`accept_with_backoff`]).
//!
//! A connection costs a descriptor from its accept, whoever opens it; until its handshake
//! completes, nothing says it is an agent's. So handshakes pending at once are capped per source
//! address ([`HandshakeLimits::per_source`]: one over it is closed at once) and in total (past
//! it, the oldest pending handshake of the source with the most gives way to the new one: an
//! agent's lone handshake takes milliseconds, a flood's idle ones last until their deadline), and the total is a share of the open-file limit, so the
//! webhook's and admin listeners' connections and the agents that completed mutual TLS always find
//! descriptors. [`grpc_server`] caps what one connection may open after the handshake.

use crate::metrics::OutcomeLabels;
use imdsgate_core::backoff::Backoff;
use imdsgate_core::http_server::{Budget, Exhausted, SourceBudget, SourcePermit, accept_with_backoff};
use imdsgate_core::latch::Latch;
use imdsgate_core::tls::{self, Reloading, TlsError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Deadline of a TLS handshake. An agent's takes a few round trips (milliseconds in a cluster,
/// well under a second for a node under load); an idle connection holds a descriptor this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes pending at once from one source address. An agent opens one connection per replica
/// and reconnects one at a time; a neighbour without a certificate gets no more than this.
pub const PENDING_PER_SOURCE: usize = 8;
/// Descriptors kept for everything but pending handshakes: the webhook's (512) and admin (256)
/// listeners' connection caps, and 256 for the apiserver, STS, files and the agents' connections.
pub const RESERVED_DESCRIPTORS: u64 = 1024;
/// Bounds of the pending-handshake total: at least this many even at a low open-file limit...
pub const MIN_PENDING: usize = 32;
/// ...and never more than this (an agent reconnect storm completes a few thousand handshakes a
/// second; this many in flight is plenty).
pub const MAX_PENDING: usize = 1024;

/// HTTP/2 streams one connection may have open at once. An agent's are its revocation stream and
/// the `GetCredentials` calls of its node's pods (a few hundred at most, all at once only when its
/// cache is cold); a client past it waits for a stream to finish.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 keepalive: a connection whose peer does not answer a ping within the timeout is closed,
/// with its revocation stream and its descriptor.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a request's headers (an agent's are its ServiceAccount token and a few gRPC
/// headers: 2 KiB or so).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The gRPC server with the limits of one agent connection: [`MAX_CONCURRENT_STREAMS`],
/// keepalive, header size. (Request sizes are the service's: `CredentialsService::into_server`.)
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
}

/// What the listener allows handshakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    pub timeout: Duration,
    /// Pending at once in total; a new one past it ends the oldest of the source with the most.
    pub total: usize,
    /// Pending at once from one source address; a new one past it is closed at once.
    pub per_source: usize,
}

impl HandshakeLimits {
    /// The limits for a process that may open `fd_limit` descriptors (unknown: the common 1024):
    /// a quarter of what [`RESERVED_DESCRIPTORS`] leaves, between [`MIN_PENDING`] and
    /// [`MAX_PENDING`].
    pub fn for_fd_limit(fd_limit: Option<u64>) -> HandshakeLimits {
        let spare = fd_limit.unwrap_or(1024).saturating_sub(RESERVED_DESCRIPTORS) / 4;
        let total = usize::try_from(spare).unwrap_or(usize::MAX).clamp(MIN_PENDING, MAX_PENDING);
        HandshakeLimits { timeout: HANDSHAKE_TIMEOUT, total, per_source: PENDING_PER_SOURCE }
    }
}

/// The handshakes pending now: a per-source budget, and each source's pending handshakes in
/// arrival order, each with the latch that ends it when it gives way to a newer one.
struct Pending {
    total: usize,
    per_source: Arc<SourceBudget>,
    next: AtomicU64,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    len: usize,
    /// Only sources with a pending handshake have an entry.
    by_source: HashMap<IpAddr, VecDeque<(u64, Latch)>>,
}

impl Queue {
    /// Ends the oldest pending handshake of the source with the most: a flood's, not the lone
    /// handshake of an agent.
    fn evict(&mut self) {
        let busiest = self
            .by_source
            .iter()
            .filter_map(|(source, queue)| {
                queue.front().map(|(id, _)| (queue.len(), std::cmp::Reverse(*id), *source))
            })
            .max();
        let Some((_, _, source)) = busiest else { return };
        if let Some(queue) = self.by_source.get_mut(&source) {
            if let Some((_, latch)) = queue.pop_front() {
                latch.set();
                self.len -= 1;
            }
            if queue.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }

    fn remove(&mut self, source: IpAddr, id: u64) {
        if let Some(queue) = self.by_source.get_mut(&source) {
            let before = queue.len();
            queue.retain(|(pending, _)| *pending != id);
            self.len -= before - queue.len();
            if queue.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
}

/// One pending handshake's place; given back on drop.
struct Admitted {
    pending: Arc<Pending>,
    source: IpAddr,
    id: u64,
    /// Set when a newer handshake took this one's place.
    evicted: Latch,
    _source: SourcePermit,
}

impl Pending {
    fn new(limits: &HandshakeLimits) -> Arc<Pending> {
        Arc::new(Pending {
            total: limits.total,
            // The total is kept below, by eviction rather than refusal.
            per_source: SourceBudget::new(Budget { total: usize::MAX, per_source: limits.per_source }),
            next: AtomicU64::new(0),
            queue: Mutex::default(),
        })
    }

    /// Admits a handshake from `source`; past the total, the oldest pending handshake of the
    /// source with the most gives way; one past its source's share is refused.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Exhausted> {
        let permit = self.per_source.try_acquire(source)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = Latch::default();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while queue.len >= self.total && queue.len > 0 {
            queue.evict();
        }
        queue.by_source.entry(source).or_default().push_back((id, evicted.clone()));
        queue.len += 1;
        Ok(Admitted { pending: self.clone(), source, id, evicted, _source: permit })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.lock().unwrap().len
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.pending.queue.lock().unwrap_or_else(|e| e.into_inner()).remove(self.source, self.id);
    }
}

/// Builds the server TLS configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerConfig, TlsError> {
    let roots = tls::load_roots(client_ca)?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsError::Config(format!("client CA {}: {e}", client_ca.display())))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls::load_certs(cert)?, tls::load_key(key)?)
        .map_err(|e| {
            TlsError::Config(format!("certificate {} and key {}: {e}", cert.display(), key.display()))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A reloading server TLS configuration.
pub fn reloading_config(
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
) -> Result<Arc<Reloading<ServerConfig>>, TlsError> {
    let files = vec![cert.clone(), key.clone(), client_ca.clone()];
    Reloading::new(files, move || server_config(&cert, &key, &client_ca))
}

/// Accepts TCP connections and yields those that complete a mutual-TLS handshake within
/// `limits`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloading<ServerConfig>>,
    limits: HandshakeLimits,
    failures: Family<OutcomeLabels, Counter>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    incoming_with(listener, limits, failures, move |tcp| {
        tokio_rustls::TlsAcceptor::from(tls.get()).accept(tcp)
    })
}

/// [`incoming`] with any `handshake` (a fake in tests).
fn incoming_with<S, H, F>(
    listener: TcpListener,
    limits: HandshakeLimits,
    failures: Family<OutcomeLabels, Counter>,
    handshake: H,
) -> ReceiverStream<Result<S, std::io::Error>>
where
    S: Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = std::io::Result<S>> + Send + 'static,
{
    for outcome in ["shed", "evicted"] {
        failures.get_or_create(&OutcomeLabels { outcome }).inc_by(0);
    }
    let pending = Pending::new(&limits);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut listener = listener;
        let mut backoff = Backoff::default();
        loop {
            let (tcp, peer) = accept_with_backoff(&mut listener, &mut backoff, "gRPC").await;
            if tx.is_closed() {
                return;
            }
            let admitted = match pending.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(_) => {
                    // Closed at once: its descriptor is free again before the next accept.
                    drop(tcp);
                    tracing::debug!(%peer, "too many TLS handshakes pending from this address; closed");
                    failures.get_or_create(&OutcomeLabels { outcome: "shed" }).inc();
                    continue;
                }
            };
            // An answer is a few small HTTP/2 frames written one after another: with Nagle's
            // algorithm on, the last of them waits for the agent's delayed ACK (up to 40 ms).
            let _ = tcp.set_nodelay(true);
            let handshaking = handshake(tcp);
            let (tx, failures) = (tx.clone(), failures.clone());
            tokio::spawn(async move {
                let evicted = admitted.evicted.clone();
                let outcome = tokio::select! {
                    done = tokio::time::timeout(limits.timeout, handshaking) => match done {
                        Ok(Ok(stream)) => {
                            // No longer pending: the connection is the gRPC server's now.
                            drop(admitted);
                            let _ = tx.send(Ok(stream)).await;
                            return;
                        }
                        Ok(Err(error)) => {
                            tracing::info!(%peer, %error, "TLS handshake refused");
                            "refused"
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            "timed_out"
                        }
                    },
                    _ = evicted.wait() => {
                        tracing::debug!(%peer, "TLS handshake ended to make room for a newer one");
                        "evicted"
                    }
                };
                failures.get_or_create(&OutcomeLabels { outcome }).inc();
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::net::{Ipv4Addr, SocketAddr};
    use tokio::io::AsyncReadExt;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn the_pending_total_is_a_share_of_the_open_file_limit() {
        let total = |limit| HandshakeLimits::for_fd_limit(limit).total;
        assert_eq!(total(None), MIN_PENDING, "1024 descriptors: the webhook and admin caps use most");
        assert_eq!(total(Some(1024)), MIN_PENDING);
        assert_eq!(total(Some(4096)), 768);
        assert_eq!(total(Some(1 << 20)), MAX_PENDING);
        assert_eq!(HandshakeLimits::for_fd_limit(None).timeout, HANDSHAKE_TIMEOUT);
    }

    #[test]
    fn pending_handshakes_are_capped_per_source_and_the_busiest_source_gives_way() {
        let pending = Pending::new(&HandshakeLimits { timeout: HANDSHAKE_TIMEOUT, total: 4, per_source: 3 });
        let agent = pending.admit(ip(1)).unwrap();
        let a1 = pending.admit(ip(2)).unwrap();
        let a2 = pending.admit(ip(2)).unwrap();
        let a3 = pending.admit(ip(2)).unwrap();
        assert_eq!(pending.admit(ip(2)).err(), Some(Exhausted::Source), "past its source's share");
        let b1 = pending.admit(ip(3)).unwrap();
        assert!(a1.evicted.is_set(), "127.0.0.2 had the most: its oldest gave way");
        assert!(!agent.evicted.is_set(), "the agent's lone handshake, older still, stays");
        let b2 = pending.admit(ip(3)).unwrap();
        assert!(a2.evicted.is_set() && !agent.evicted.is_set());
        let c1 = pending.admit(ip(4)).unwrap();
        assert!(b1.evicted.is_set(), "two each: the oldest of the two busiest");
        assert!(
            !agent.evicted.is_set() && !a3.evicted.is_set() && !b2.evicted.is_set() && !c1.evicted.is_set()
        );
        assert_eq!(pending.len(), 4);
        assert_eq!(
            pending.admit(ip(2)).err(),
            Some(Exhausted::Source),
            "an evicted one keeps its source's share until its connection is closed"
        );
        drop((a1, a2));
        let a4 = pending.admit(ip(2)).unwrap();
        drop((agent, a3, a4, b1, b2, c1));
        assert_eq!(pending.len(), 0);
    }

    /// A connection from 127.0.0.`last` to `addr`.
    async fn connect_from(last: u8, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, last], 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// Whether the server closed `conn` within `wait`.
    async fn closed_within(conn: &mut TcpStream, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(tokio::time::timeout(wait, conn.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn idle_neighbours_are_shed_and_evicted_while_an_agent_gets_through() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HandshakeLimits { timeout: Duration::from_millis(2500), total: 4, per_source: 2 };
        let failures = Family::<OutcomeLabels, Counter>::default();
        // The fake handshake completes when the client sends a byte; an idle client never does.
        let mut incoming =
            incoming_with(listener, limits, failures.clone(), |mut tcp: TcpStream| async move {
                let mut byte = [0u8; 1];
                tcp.read_exact(&mut byte).await?;
                Ok(tcp)
            });
        let short = Duration::from_millis(200);
        let mut idle = vec![connect_from(2, addr).await, connect_from(2, addr).await];
        let mut third = connect_from(2, addr).await;
        assert!(closed_within(&mut third, Duration::from_secs(1)).await, "past 127.0.0.2's share: closed");
        for conn in &mut idle {
            assert!(!closed_within(conn, short).await, "within its share: kept");
        }
        for last in [3, 3, 4] {
            idle.push(connect_from(last, addr).await);
        }
        assert!(closed_within(&mut idle[0], Duration::from_secs(1)).await, "the oldest gave way");
        for conn in &mut idle[1..] {
            assert!(!closed_within(conn, short).await, "four pending, the total");
        }
        let mut agent = connect_from(1, addr).await;
        tokio::io::AsyncWriteExt::write_all(&mut agent, b"x").await.unwrap();
        let served = tokio::time::timeout(Duration::from_secs(1), incoming.next()).await;
        assert!(matches!(served, Ok(Some(Ok(_)))), "the agent's handshake completes");
        assert!(
            closed_within(&mut idle[2], Duration::from_secs(1)).await,
            "it made room too: the oldest of 127.0.0.3, the busiest source"
        );
        for i in [1, 3, 4] {
            assert!(
                closed_within(&mut idle[i], Duration::from_secs(3)).await,
                "idle ones end at the deadline"
            );
        }
        let count = |outcome| failures.get_or_create(&OutcomeLabels { outcome }).get();
        assert_eq!((count("shed"), count("evicted"), count("timed_out")), (1, 2, 3));
    }

    #[tokio::test]
    async fn one_connection_has_at_most_max_concurrent_streams() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        let serving = grpc_server()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(serving);
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = HealthClient::new(channel);
        let watch = |mut client: HealthClient<_>| async move {
            client.watch(HealthCheckRequest { service: String::new() }).await
        };
        let mut open = Vec::new();
        for _ in 0..MAX_CONCURRENT_STREAMS {
            open.push(watch(client.clone()).await.unwrap());
        }
        let more = tokio::spawn(watch(client.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!more.is_finished(), "stream {} waits for a free one", MAX_CONCURRENT_STREAMS + 1);
        drop(open.pop());
        let opened = tokio::time::timeout(Duration::from_secs(5), more).await;
        assert!(matches!(opened, Ok(Ok(Ok(_)))), "and opens once one ends");
    }
}
