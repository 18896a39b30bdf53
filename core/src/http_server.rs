//! The one hardened HTTP/1.1 server behind every HTTP listener of imdsgate (the agent's IMDS and
//! admin listeners, the server's admin and webhook listeners), and the accept loop with backoff
//! that the gRPC listener shares.
//!
//! What a listener gets, all from [`Limits`]:
//! - `accept` errors (out of file descriptors, say) retried with exponential backoff, never a spin;
//! - a connection budget in total and per source address, with a separate budget for sources a
//!   classifier calls unknown: a connection over budget is closed at once;
//! - a deadline on reading a request head, which also closes idle keep-alive connections, and a cap
//!   on the header buffer (431 beyond it);
//! - tower layers around the listener's service: a deadline per request that covers reading its
//!   body (504), a cap on requests in flight with load shedding (503 at once, never a queue);
//! - optionally TLS, with a deadline on the handshake;
//! - on shutdown, no new connections and a drain of the open ones for at most the grace period.

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::Either;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt as _};

use crate::backoff::Backoff;

/// Builds a listener's service from an async function (tower's, re-exported so listeners need no
/// tower dependency of their own).
pub use tower::service_fn;

/// hyper refuses a read buffer smaller than this.
const MIN_BUFFER: usize = 8192;

/// How many of something (connections, requests) a class of sources may hold at once: in total,
/// and from one source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub total: usize,
    pub per_source: usize,
}

/// The hard limits of one listener.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections of known sources (of every source when the listener has no classifier).
    pub connections: Budget,
    /// Connections of sources the classifier calls unknown.
    pub unknown_connections: Budget,
    /// Most bytes of a request head; a larger one gets 431.
    pub max_header_bytes: usize,
    /// Time allowed to send a request head. hyper starts this clock whenever it waits for a head,
    /// so it is also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// Deadline of one request from its head to the response, reading the body included (504).
    pub request_timeout: Duration,
    /// Requests in flight at once over all connections; more get 503 at once.
    pub max_concurrent_requests: usize,
    /// Deadline of the TLS handshake (TLS listeners only).
    pub tls_handshake_timeout: Duration,
    /// How long open connections may finish after shutdown starts.
    pub shutdown_grace: Duration,
}

impl Limits {
    /// The admin endpoint's limits (`/healthz`, `/readyz`, `/metrics`): a few callers (the kubelet,
    /// Prometheus), answers computed in memory.
    pub fn admin() -> Limits {
        Limits {
            connections: Budget { total: 256, per_source: 64 },
            unknown_connections: Budget { total: 0, per_source: 0 },
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 32,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Which budget a source address draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceClass {
    Known,
    Unknown,
}

/// Names the class of a source address when a connection arrives.
pub type Classify = Arc<dyn Fn(IpAddr) -> SourceClass + Send + Sync>;

/// Where the TLS configuration comes from: called once per connection, so a reloaded certificate
/// applies to the next handshake.
pub type TlsConfig = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// The connection's peer address, in every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Why a [`SourceBudget`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    #[error("the budget is used up")]
    Total,
    #[error("this source's share of the budget is used up")]
    Source,
}

/// A [`Budget`] in use: the units held in total and per source address, under one lock (a
/// budget never waits, so it needs no semaphore). Only sources holding a unit have an entry, so its
/// memory is bounded by the total.
#[derive(Debug)]
pub struct SourceBudget {
    total: usize,
    per_source: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One unit of a [`SourceBudget`], given back on drop.
#[derive(Debug)]
pub struct SourcePermit {
    budget: Arc<SourceBudget>,
    source: IpAddr,
}

impl SourceBudget {
    pub fn new(budget: Budget) -> Arc<SourceBudget> {
        Arc::new(SourceBudget {
            total: budget.total,
            per_source: budget.per_source,
            held: Mutex::new(Held::default()),
        })
    }

    /// Takes one unit for `source` at once, or says why not; never waits.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Result<SourcePermit, Exhausted> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let held = &mut *held;
        // One hash of the address, whatever happens.
        let entry = held.by_source.entry(source);
        let count = match &entry {
            Entry::Occupied(count) => *count.get(),
            Entry::Vacant(_) => 0,
        };
        if count >= self.per_source {
            return Err(Exhausted::Source);
        }
        if held.total >= self.total {
            return Err(Exhausted::Total);
        }
        *entry.or_insert(0) += 1;
        held.total += 1;
        Ok(SourcePermit { budget: self.clone(), source })
    }

    /// Units held now, in total.
    pub fn in_use(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Entry::Occupied(mut count) = held.by_source.entry(self.source) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
            held.total -= 1;
        }
    }
}

/// Something that accepts connections: a [`TcpListener`], or a fake in tests.
pub trait Accept: Send {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<(Self::Io, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// The next connection from `acceptor`; failures are logged and retried after a growing pause.
pub async fn accept_with_backoff<A: Accept>(
    acceptor: &mut A,
    backoff: &mut Backoff,
    listener: &str,
) -> (A::Io, SocketAddr) {
    loop {
        match acceptor.accept().await {
            Ok(conn) => {
                backoff.succeeded();
                return conn;
            }
            Err(error) => {
                let pause = backoff.failed();
                tracing::warn!(listener, %error, ?pause, "accept failed; pausing");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// A listener's HTTP/1.1 server: its name (for logs), limits, and optionally a source classifier
/// and TLS.
pub struct HttpServer {
    name: &'static str,
    limits: Limits,
    classify: Option<Classify>,
    tls: Option<TlsConfig>,
}

/// What the server answers when the listener's service is busy or too slow.
fn refusal(error: BoxError) -> Response<Full<Bytes>> {
    let (status, body) = if error.is::<tower::load_shed::error::Overloaded>() {
        (StatusCode::SERVICE_UNAVAILABLE, "busy; retry\n")
    } else if error.is::<tower::timeout::error::Elapsed>() {
        (StatusCode::GATEWAY_TIMEOUT, "the request took too long\n")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
    };
    plain(status, body)
}

/// A `text/plain` response.
pub fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Written (best effort, never waiting) to a plain-text connection refused for its budget.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\
connection: close\r\n\r\nbusy; retry\n";

impl HttpServer {
    pub fn new(name: &'static str, limits: Limits) -> HttpServer {
        HttpServer { name, limits, classify: None, tls: None }
    }

    /// Sources `classify` calls unknown draw on [`Limits::unknown_connections`].
    pub fn classify(mut self, classify: Classify) -> HttpServer {
        self.classify = Some(classify);
        self
    }

    /// Serves HTTPS with the configuration `tls` returns.
    pub fn tls(mut self, tls: TlsConfig) -> HttpServer {
        self.tls = Some(tls);
        self
    }

    /// Serves `service` on connections from `acceptor` until `shutdown` resolves, then drains for
    /// at most the grace period. The service sees the peer as a [`PeerAddr`] extension.
    pub async fn serve<A, S>(self, acceptor: A, service: S, shutdown: impl Future<Output = ()>)
    where
        A: Accept,
        S: Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let service = service.map_request(|(peer, mut req): (PeerAddr, Request<Incoming>)| {
            req.extensions_mut().insert(peer);
            req
        });
        self.serve_with_peer(acceptor, service, shutdown).await
    }

    /// As [`HttpServer::serve`], but the service takes the peer beside each request rather than
    /// as an extension, which costs a map allocated per request (a hot path's choice).
    pub async fn serve_with_peer<A, S>(self, mut acceptor: A, service: S, shutdown: impl Future<Output = ()>)
    where
        A: Accept,
        S: Service<(PeerAddr, Request<Incoming>), Response = Response<Full<Bytes>>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let HttpServer { name, limits, classify, tls } = self;
        let service = layered(service, &limits);
        let known = SourceBudget::new(limits.connections);
        let unknown = SourceBudget::new(limits.unknown_connections);
        let graceful = GracefulShutdown::new();
        let mut backoff = Backoff::default();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (mut io, peer) = tokio::select! {
                _ = &mut shutdown => break,
                conn = accept_with_backoff(&mut acceptor, &mut backoff, name) => conn,
            };
            let source = peer.ip().to_canonical();
            let class = classify.as_ref().map_or(SourceClass::Known, |classify| classify(source));
            let budget = if class == SourceClass::Known { &known } else { &unknown };
            let permit = match budget.try_acquire(source) {
                Ok(permit) => permit,
                Err(why) => {
                    tracing::debug!(listener = name, %peer, ?class, %why, "connection refused");
                    if tls.is_none() {
                        // One non-blocking attempt: a fresh socket's send buffer takes it.
                        let _ = io.write_all(BUSY).now_or_never();
                    }
                    continue;
                }
            };
            let (service, limits, tls, watcher) =
                (service.clone(), limits.clone(), tls.clone(), graceful.watcher());
            tokio::spawn(async move {
                let _permit = permit;
                let http = http1(&limits);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let mut service = service.clone();
                    // The layers are ready at once (a full request limit is a refusal, not a
                    // wait): call the service when the head arrives rather than when hyper first
                    // polls, so that a service answering at once is done with the request (and
                    // with hyper's read buffer, which it points into) before hyper reads again.
                    match service.ready().now_or_never() {
                        Some(Ok(_)) => Either::Left(service.call((PeerAddr(peer), req))),
                        _ => Either::Right(service.oneshot((PeerAddr(peer), req))),
                    }
                });
                let result = match tls {
                    None => watcher.watch(http.serve_connection(TokioIo::new(io), service)).await,
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls());
                        let stream =
                            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(io))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    tracing::debug!(listener = name, %peer, %error, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                        watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
                }
            });
        }
        drop(acceptor);
        if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
            tracing::warn!(listener = name, grace = ?limits.shutdown_grace, "connections still open after the grace period");
        }
    }
}

/// The listener's service inside the request layers: load shedding over a cap on requests in
/// flight over a deadline per request; refusals become responses (the error type stays only
/// because tower's `map_result` needs one; readiness never fails).
fn layered<R, S>(
    service: S,
    limits: &Limits,
) -> impl Service<R, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send + 'static>
+ Clone
+ Send
+ 'static
where
    S: Service<R, Response = Response<Full<Bytes>>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .map_result(to_response as fn(_) -> _)
        .load_shed()
        .concurrency_limit(limits.max_concurrent_requests)
        .layer_fn(|inner| Deadline { inner, timeout: limits.request_timeout })
        .service(service)
}

/// tower's request timeout, but its timer starts only when the response is not ready at the first
/// poll (from then: when the request was called, give or take that poll): an answer ready at once,
/// most of them, costs no clock read and no timer. Fails with tower's [`Elapsed`].
///
/// [`Elapsed`]: tower::timeout::error::Elapsed
#[derive(Clone)]
struct Deadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S: Service<R>, R> Service<R> for Deadline<S>
where
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        DeadlineFuture { inner: self.inner.call(req), timeout: self.timeout, sleep: None }
    }
}

pin_project_lite::pin_project! {
    struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        timeout: Duration,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F: Future<Output = Result<T, E>>, T, E: Into<BoxError>> Future for DeadlineFuture<F> {
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(tower::timeout::error::Elapsed::new().into())),
            _ => Poll::Pending,
        }
    }
}

fn to_response(result: Result<Response<Full<Bytes>>, BoxError>) -> Result<Response<Full<Bytes>>, BoxError> {
    Ok(result.unwrap_or_else(refusal))
}

fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUFFER))
        .keep_alive(true);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpSocket;
    use tokio::sync::Semaphore;

    /// An acceptor whose every `accept` fails at once, as when the process is out of descriptors.
    struct Failing {
        attempts: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    impl Accept for Failing {
        type Io = TcpStream;

        async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
            self.attempts.lock().unwrap().push(tokio::time::Instant::now());
            Err(std::io::Error::from_raw_os_error(24)) // EMFILE
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failing_accepts_back_off_to_one_attempt_a_second() {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let start = tokio::time::Instant::now();
        let server = HttpServer::new("test", limits());
        let service =
            service_fn(|_req: Request<Incoming>| async { Ok::<_, Infallible>(plain(StatusCode::OK, "")) });
        let task = tokio::spawn(server.serve(
            Failing { attempts: attempts.clone() },
            service,
            std::future::pending(),
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        task.abort();
        let attempts: Vec<Duration> = attempts.lock().unwrap().iter().map(|t| *t - start).collect();
        // 5 ms doubling to 1 s: 9 attempts in the first 1.3 s, then one a second.
        assert!(attempts.len() <= 20, "{} attempts in 10 s: {attempts:?}", attempts.len());
        for second in 2..10 {
            let window = Duration::from_secs(second)..Duration::from_secs(second + 1);
            let n = attempts.iter().filter(|t| window.contains(*t)).count();
            assert!((1..=2).contains(&n), "{n} attempts in second {second}: {attempts:?}");
        }
    }

    #[test]
    fn a_source_budget_caps_each_source_and_the_total_and_frees_on_drop() {
        let budget = SourceBudget::new(Budget { total: 3, per_source: 2 });
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let a1 = budget.try_acquire(a).unwrap();
        let _a2 = budget.try_acquire(a).unwrap();
        assert_eq!(budget.try_acquire(a).unwrap_err(), Exhausted::Source);
        let _b1 = budget.try_acquire(b).unwrap();
        assert_eq!(budget.try_acquire(c).unwrap_err(), Exhausted::Total);
        assert_eq!(budget.in_use(), 3);
        drop(a1);
        let _c1 = budget.try_acquire(c).unwrap();
        assert_eq!(budget.try_acquire(a).unwrap_err(), Exhausted::Total);
    }

    fn limits() -> Limits {
        Limits {
            connections: Budget { total: 64, per_source: 64 },
            header_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(500),
            max_concurrent_requests: 64,
            tls_handshake_timeout: Duration::from_millis(300),
            ..Limits::admin()
        }
    }

    /// Margin for "closed by the server" on a loaded machine.
    const MARGIN: Duration = Duration::from_secs(3);

    /// A running server: its address, a trigger for its shutdown, and its task.
    struct Running {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    /// The test service: `/wait` waits for a permit of `gate`, `/body` reads the body and answers
    /// its length, everything else answers the peer's address.
    async fn start(server: HttpServer, gate: Arc<tokio::sync::Semaphore>) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = service_fn(move |req: Request<Incoming>| {
            let gate = gate.clone();
            async move {
                let peer =
                    req.extensions().get::<PeerAddr>().map(|p| p.0.ip().to_string()).unwrap_or_default();
                let body = match req.uri().path() {
                    "/wait" => {
                        let _ = gate.acquire().await;
                        "waited".to_string()
                    }
                    "/body" => match req.into_body().collect().await {
                        Ok(body) => body.to_bytes().len().to_string(),
                        Err(_) => "body error".to_string(),
                    },
                    _ => peer,
                };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, service, async move {
            let _ = stopped.await;
        }));
        Running { addr, stop: Some(stop), task }
    }

    async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        socket.connect(addr).await.unwrap()
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").into_bytes()
    }

    /// Reads one response (headers and a content-length body) from a keep-alive connection.
    async fn response(stream: &mut TcpStream) -> (u16, String) {
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&raw).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return (status, body.to_string());
                }
            }
            let n =
                tokio::time::timeout(MARGIN, stream.read(&mut chunk)).await.expect("a response").unwrap_or(0);
            assert!(n > 0, "connection closed before a full response: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits until the server closes `stream` (EOF or reset), returning what it sent and how long
    /// that took; fails after `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> (String, Duration) {
        let started = std::time::Instant::now();
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(within, stream.read(&mut chunk)).await {
                Err(_) => panic!("still open after {within:?}; got {:?}", String::from_utf8_lossy(&raw)),
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&raw).into(), started.elapsed()),
                Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
            }
        }
    }

    #[tokio::test]
    async fn a_slow_request_head_and_an_idle_keep_alive_connection_are_closed() {
        let server = start(HttpServer::new("test", limits()), Arc::new(Semaphore::new(0))).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: te").await.unwrap();
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(&get("/")).await.unwrap();
        assert_eq!(response(&mut idle).await, (200, "127.0.0.1".into()));
        closed_within(&mut slow, Duration::from_millis(300) + MARGIN).await;
        closed_within(&mut idle, Duration::from_millis(300) + MARGIN).await;
    }

    #[tokio::test]
    async fn a_request_head_over_the_buffer_gets_431() {
        let server = start(HttpServer::new("test", limits()), Arc::new(Semaphore::new(0))).await;
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n", "a".repeat(20_000));
        let _ = client.write_all(head.as_bytes()).await;
        let (sent, _) = closed_within(&mut client, MARGIN).await;
        assert!(sent.starts_with("HTTP/1.1 431"), "{sent:?}");
    }

    #[tokio::test]
    async fn connections_over_a_sources_share_or_the_total_are_closed_at_once() {
        let limits = Limits { connections: Budget { total: 3, per_source: 2 }, ..limits() };
        let server = start(HttpServer::new("test", limits), Arc::new(Semaphore::new(0))).await;
        let mut held = Vec::new();
        for source in ["127.0.0.1", "127.0.0.1", "127.0.0.2"] {
            let mut conn = connect_from(source, server.addr).await;
            conn.write_all(&get("/")).await.unwrap();
            assert_eq!(response(&mut conn).await, (200, source.to_string()));
            held.push(conn);
        }
        // 127.0.0.1 has its two; 127.0.0.3 finds the total used up: both refused with 503 at once,
        // long before the header timeout would close an accepted connection.
        for source in ["127.0.0.1", "127.0.0.3"] {
            let mut refused = connect_from(source, server.addr).await;
            let (sent, _) = closed_within(&mut refused, Duration::from_millis(200)).await;
            assert!(sent.is_empty() || sent.starts_with("HTTP/1.1 503"), "{source}: {sent:?}");
        }
        // A closed connection frees its place.
        drop(held.remove(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut again = connect_from("127.0.0.3", server.addr).await;
        again.write_all(&get("/")).await.unwrap();
        assert_eq!(response(&mut again).await, (200, "127.0.0.3".into()));
    }

    #[tokio::test]
    async fn unknown_sources_cannot_take_the_connections_of_known_ones() {
        let limits = Limits {
            connections: Budget { total: 2, per_source: 2 },
            unknown_connections: Budget { total: 1, per_source: 1 },
            ..limits()
        };
        let known: IpAddr = "127.0.0.1".parse().unwrap();
        let server = HttpServer::new("test", limits).classify(Arc::new(move |ip| {
            if ip == known { SourceClass::Known } else { SourceClass::Unknown }
        }));
        let server = start(server, Arc::new(Semaphore::new(0))).await;
        let mut unknown = connect_from("127.0.0.2", server.addr).await;
        unknown.write_all(&get("/")).await.unwrap();
        assert_eq!(response(&mut unknown).await.0, 200);
        for source in ["127.0.0.2", "127.0.0.3"] {
            let mut refused = connect_from(source, server.addr).await;
            closed_within(&mut refused, Duration::from_millis(200)).await;
        }
        for _ in 0..2 {
            let mut conn = connect_from("127.0.0.1", server.addr).await;
            conn.write_all(&get("/")).await.unwrap();
            assert_eq!(response(&mut conn).await.0, 200, "known sources keep their budget");
            held_forever(conn);
        }
    }

    /// Keeps a connection open until the test ends.
    fn held_forever(conn: TcpStream) {
        tokio::spawn(async move {
            let _conn = conn;
            std::future::pending::<()>().await
        });
    }

    #[tokio::test]
    async fn requests_over_the_concurrency_cap_get_503_at_once() {
        let limits =
            Limits { max_concurrent_requests: 2, request_timeout: Duration::from_secs(30), ..limits() };
        let gate = Arc::new(Semaphore::new(0));
        let server = start(HttpServer::new("test", limits), gate.clone()).await;
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let mut conn = TcpStream::connect(server.addr).await.unwrap();
            conn.write_all(&get("/wait")).await.unwrap();
            waiting.push(conn);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut shed = TcpStream::connect(server.addr).await.unwrap();
        shed.write_all(&get("/wait")).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(response(&mut shed).await, (503, "busy; retry\n".into()));
        assert!(started.elapsed() < MARGIN, "shed, not queued");
        gate.add_permits(2);
        for conn in &mut waiting {
            assert_eq!(response(conn).await, (200, "waited".into()));
        }
        // The cap is free again.
        shed.write_all(&get("/")).await.unwrap();
        assert_eq!(response(&mut shed).await.0, 200);
    }

    #[tokio::test]
    async fn the_request_deadline_covers_reading_the_body() {
        let server = start(HttpServer::new("test", limits()), Arc::new(Semaphore::new(0))).await;
        let mut whole = TcpStream::connect(server.addr).await.unwrap();
        whole
            .write_all(b"POST /body HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        assert_eq!(response(&mut whole).await, (200, "5".into()));
        let mut trickle = TcpStream::connect(server.addr).await.unwrap();
        trickle
            .write_all(b"POST /body HTTP/1.1\r\nhost: test\r\ncontent-length: 100\r\n\r\nhello")
            .await
            .unwrap();
        let (sent, _) = closed_within(&mut trickle, Duration::from_millis(500) + MARGIN).await;
        assert!(sent.starts_with("HTTP/1.1 504"), "{sent:?}");
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_lets_requests_in_flight_finish() {
        let gate = Arc::new(Semaphore::new(0));
        let mut server = start(HttpServer::new("test", limits()), gate.clone()).await;
        let mut in_flight = TcpStream::connect(server.addr).await.unwrap();
        in_flight.write_all(&get("/wait")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.stop.take().unwrap().send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(server.addr).await.is_err(), "no longer listening");
        assert!(!server.task.is_finished(), "draining");
        gate.add_permits(1);
        assert_eq!(response(&mut in_flight).await, (200, "waited".into()));
        tokio::time::timeout(MARGIN, &mut server.task).await.expect("drained").unwrap();
    }

    #[tokio::test]
    async fn tls_serves_https_and_drops_a_silent_client_after_the_handshake_deadline() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.clone()], key)
                .unwrap(),
        );
        let server = HttpServer::new("test", limits()).tls(Arc::new(move || config.clone()));
        let server = start(server, Arc::new(Semaphore::new(0))).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("127.0.0.1"), "{text}");

        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        closed_within(&mut silent, Duration::from_millis(300) + MARGIN).await;
    }

    #[test]
    fn the_admin_limits_are_sane() {
        let admin = Limits::admin();
        assert!(admin.max_header_bytes >= MIN_BUFFER);
        assert!(admin.connections.per_source <= admin.connections.total);
        assert!(admin.header_timeout < admin.request_timeout);
        assert!(admin.max_concurrent_requests > 0);
    }
}
