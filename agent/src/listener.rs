//! The IMDS listener: HTTP/1.1 with hard limits (header size and read time against slow clients,
//! a deadline per request, a cap on concurrent requests) and a graceful drain on shutdown. One
//! dual-stack socket takes both families (IPv4 peers appear as IPv4-mapped addresses, which
//! [`Imds::handle`] maps back).

use crate::imds::Imds;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Hard limits of the IMDS listener.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_concurrent: usize,
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

/// Serves IMDS on `listener` until `shutdown`, then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    imds: Arc<Imds>,
    limits: Limits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_concurrent));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "IMDS accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (conn_imds, conn_limits, conn_metrics, conn_permits) =
            (imds.clone(), limits.clone(), metrics.clone(), permits.clone());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (imds, limits, metrics, permits) =
                (conn_imds.clone(), conn_limits.clone(), conn_metrics.clone(), conn_permits.clone());
            async move { Ok::<_, Infallible>(respond(&imds, &limits, &metrics, &permits, peer.ip(), req).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "IMDS connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "IMDS connections still open after the grace period");
    }
}

async fn respond(
    imds: &Imds,
    limits: &Limits,
    metrics: &Metrics,
    permits: &Semaphore,
    peer: std::net::IpAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let Ok(_permit) = permits.try_acquire() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "imdsgate agent is busy; retry\n");
    };
    let answer = tokio::time::timeout(
        limits.request_timeout,
        imds.handle(peer, req.method(), req.uri().path(), req.headers()),
    )
    .await;
    let (route, response) = match answer {
        Ok(answer) => answer,
        Err(_) => {
            (crate::metrics::Route::Other, plain(StatusCode::GATEWAY_TIMEOUT, "imdsgate agent timed out\n"))
        }
    };
    metrics.requests.get_or_create(&RequestLabels { route, status: response.status().as_u16() }).inc();
    metrics.request_duration.get_or_create(&RouteLabels { route }).observe(started.elapsed().as_secs_f64());
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
