//! Abusive clients for the limits tests (`e2e/tests/limits.rs`), run inside a test namespace:
//! `flood` keeps many requests in flight from one address (one request per connection, each
//! connection at most once per `--min-cycle-ms`), `slow` opens connections that send part of a
//! request head and then nothing, and measures when the server closes them. Both are bounded in
//! count and time, stop by themselves, only talk to link-local, private or loopback addresses, and
//! print one JSON report on stdout.
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MAX_CONNECTIONS: usize = 5000;
const MAX_SECONDS: u64 = 120;

#[derive(Parser)]
#[command(name = "imdsgate-flood")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Keep `--connections` GET requests in flight for `--seconds`.
    Flood {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: u64,
        /// Each connection starts its next request at most this often.
        #[arg(long, default_value_t = 1000)]
        min_cycle_ms: u64,
    },
    /// Open `--connections` connections that send a partial request head, and wait up to
    /// `--seconds` for the server to close each.
    Slow {
        #[arg(long)]
        target: SocketAddr,
        /// Source address of the connections.
        #[arg(long)]
        source: Option<IpAddr>,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: u64,
        /// Speak TLS first, trusting this CA (PEM).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
}

/// What a flood saw.
#[derive(Debug, Default, Serialize)]
struct FloodReport {
    requests: usize,
    /// Answers by HTTP status.
    statuses: BTreeMap<u16, usize>,
    /// Connections closed (or reset) before a status line.
    closed_without_answer: usize,
    connect_failed: usize,
    timed_out: usize,
    /// Time from connect to the whole answer, of answered requests.
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
}

/// What slow clients saw.
#[derive(Debug, Default, Serialize)]
struct SlowReport {
    opened: usize,
    connect_failed: usize,
    /// When the server closed each connection, in ms from its connect, sorted.
    closed_after_ms: Vec<u64>,
    still_open: usize,
}

fn check_target(target: &SocketAddr, connections: usize, seconds: u64) -> Result<()> {
    let inside = match target.ip() {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    if !inside {
        bail!("{target} is not a test-bed address (link-local, private or loopback)");
    }
    if connections == 0 || connections > MAX_CONNECTIONS || seconds == 0 || seconds > MAX_SECONDS {
        bail!("at most {MAX_CONNECTIONS} connections for at most {MAX_SECONDS} s");
    }
    Ok(())
}

fn main() -> Result<()> {
    rustls::crypto::aws_lc_rs::default_provider().install_default().ok();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let json = match Cli::parse().command {
        Cmd::Flood { target, path, connections, seconds, min_cycle_ms } => {
            check_target(&target, connections, seconds)?;
            let cycle = Duration::from_millis(min_cycle_ms);
            serde_json::to_string(&runtime.block_on(flood(target, path, connections, seconds, cycle)))?
        }
        Cmd::Slow { target, source, connections, seconds, tls_ca, server_name } => {
            check_target(&target, connections, seconds)?;
            let tls = match tls_ca {
                Some(ca) => Some((connector(&ca)?, server_name)),
                None => None,
            };
            serde_json::to_string(&runtime.block_on(slow(target, source, connections, seconds, tls)))?
        }
    };
    println!("{json}");
    Ok(())
}

enum Outcome {
    Status(u16, Duration),
    Closed,
    ConnectFailed,
    TimedOut,
}

async fn flood(
    target: SocketAddr,
    path: String,
    connections: usize,
    seconds: u64,
    cycle: Duration,
) -> FloodReport {
    let request = Arc::new(
        format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", target.ip()).into_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                outcomes.push(exchange(target, &request).await);
                tokio::time::sleep_until((started + cycle).into()).await;
            }
            outcomes
        }));
    }
    let mut report = FloodReport::default();
    let mut latencies = Vec::new();
    for task in tasks {
        for outcome in task.await.unwrap_or_default() {
            report.requests += 1;
            match outcome {
                Outcome::Status(status, took) => {
                    *report.statuses.entry(status).or_default() += 1;
                    latencies.push(took.as_secs_f64() * 1000.0);
                }
                Outcome::Closed => report.closed_without_answer += 1,
                Outcome::ConnectFailed => report.connect_failed += 1,
                Outcome::TimedOut => report.timed_out += 1,
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
    };
    report.latency_ms_p50 = pct(0.5).copied().unwrap_or(0.0);
    report.latency_ms_p99 = pct(0.99).copied().unwrap_or(0.0);
    report.latency_ms_max = latencies.last().copied().unwrap_or(0.0);
    report
}

/// One request on a fresh connection; the answer read to the server's close.
async fn exchange(target: SocketAddr, request: &[u8]) -> Outcome {
    let started = Instant::now();
    let mut stream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return Outcome::ConnectFailed,
        Err(_) => return Outcome::TimedOut,
    };
    if stream.write_all(request).await.is_err() {
        return Outcome::Closed;
    }
    let mut raw = Vec::new();
    // A reset after a full answer still counts as the answer: only a timeout loses it.
    if tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await.is_err() {
        return Outcome::TimedOut;
    }
    let status = std::str::from_utf8(&raw)
        .ok()
        .and_then(|text| text.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match status {
        Some(status) => Outcome::Status(status, started.elapsed()),
        None => Outcome::Closed,
    }
}

fn connector(ca: &std::path::Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A partial request head: the request line and one header, never finished.
const PARTIAL: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: aaaaaaaa";

async fn slow(
    target: SocketAddr,
    source: Option<IpAddr>,
    connections: usize,
    seconds: u64,
    tls: Option<(tokio_rustls::TlsConnector, String)>,
) -> SlowReport {
    let limit = Duration::from_secs(seconds);
    let tls = Arc::new(tls);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let tcp = match connect_from(source, target).await {
                Ok(tcp) => tcp,
                Err(_) => return None,
            };
            let closed = match tls.as_ref() {
                None => hold(tcp, started, limit).await,
                Some((connector, name)) => {
                    let Ok(name) = rustls::pki_types::ServerName::try_from(name.clone()) else { return None };
                    match tokio::time::timeout(limit, connector.connect(name, tcp)).await {
                        Ok(Ok(stream)) => hold(stream, started, limit).await,
                        // Refused or cut during the handshake: closed by the server.
                        Ok(Err(_)) => Some(started.elapsed()),
                        Err(_) => None,
                    }
                }
            };
            Some(closed)
        }));
    }
    let mut report = SlowReport::default();
    for task in tasks {
        match task.await.ok().flatten() {
            None => report.connect_failed += 1,
            Some(closed) => {
                report.opened += 1;
                match closed {
                    Some(after) => report.closed_after_ms.push(after.as_millis() as u64),
                    None => report.still_open += 1,
                }
            }
        }
    }
    report.closed_after_ms.sort_unstable();
    report
}

async fn connect_from(source: Option<IpAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Sends the partial head and waits for the server to close; `None` if it is still open after
/// `limit` from `started`.
async fn hold<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    started: Instant,
    limit: Duration,
) -> Option<Duration> {
    if stream.write_all(PARTIAL).await.is_err() || stream.flush().await.is_err() {
        return Some(started.elapsed());
    }
    let mut chunk = [0u8; 1024];
    let deadline = started + limit;
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            // A 503 (refused) or 408: wait for the close that follows.
            Ok(Ok(_)) => continue,
        }
    }
}
