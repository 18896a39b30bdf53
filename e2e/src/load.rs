//! The project's own HTTP load generator for the benchmarks: HTTP/1.1 keep-alive connections that
//! send one fixed request and read `Content-Length` responses. Closed loop (as fast as answers
//! come: saturation) or open loop at a fixed rate. Latency is measured from the moment a request is
//! written; how far sends fell behind their schedule is reported separately (`lag_p99_us`), so an
//! overloaded target — or generator — is visible rather than hidden.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// What one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// 99th percentile of how late requests were sent against the open-loop schedule.
    pub lag_p99_us: f64,
    pub body_bytes: usize,
    pub status: u16,
}

impl LoadReport {
    /// Throughput and percentiles from per-request latencies in microseconds.
    pub fn from_latencies(mut latencies: Vec<u32>, errors: u64, seconds: f64) -> LoadReport {
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
        };
        LoadReport {
            requests: latencies.len() as u64,
            errors,
            seconds,
            rps: latencies.len() as f64 / seconds,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            max_us: latencies.last().copied().unwrap_or(0) as f64,
            ..Default::default()
        }
    }
}

/// One keep-alive connection that sends `request` and reads whole responses.
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    pub async fn open(target: SocketAddr, source: Option<IpAddr>) -> Result<Connection> {
        let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target).await.with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, buf: Vec::with_capacity(8192) })
    }

    /// Sends `request` and returns (status, body length, body).
    pub async fn exchange(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let header_end = loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
        };
        let head = std::str::from_utf8(&self.buf[..header_end]).context("header not UTF-8")?;
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
            })
            .context("no content-length")?;
        while self.buf.len() < header_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed mid-body");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, self.buf[header_end..header_end + length].to_vec()))
    }
}

/// A GET (or other method) request with headers, as bytes.
pub fn request(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: imdsgate-bench\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Runs `connections` connections for `duration`, closed loop (`rate` None) or open loop at
/// `rate` requests per second in total.
pub async fn run(
    target: SocketAddr,
    request: Vec<u8>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<LoadReport> {
    let request = std::sync::Arc::new(request);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(target, None).await?;
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut lags = Vec::new();
            let (mut errors, mut last_status, mut body_bytes) = (0u64, 0u16, 0usize);
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            // Spread the connections' schedules evenly over one interval.
            let mut next =
                started + interval.map(|i| i.mul_f64(c as f64 / connections as f64)).unwrap_or_default();
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let scheduled = match interval {
                    Some(i) => {
                        if next > now {
                            tokio::time::sleep_until(next.into()).await;
                        }
                        let s = next;
                        next += i;
                        s
                    }
                    None => now,
                };
                let sent = Instant::now();
                if interval.is_some() {
                    lags.push(sent.saturating_duration_since(scheduled).as_micros() as u32);
                }
                match conn.exchange(&request).await {
                    Ok((status, body)) => {
                        last_status = status;
                        body_bytes = body.len();
                        if status != 200 {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        conn = Connection::open(target, None).await?;
                    }
                }
                latencies.push(sent.elapsed().as_micros() as u32);
            }
            Ok::<_, anyhow::Error>((latencies, lags, errors, last_status, body_bytes))
        }));
    }
    let (mut all, mut lags, mut errors, mut status, mut body_bytes) = (Vec::new(), Vec::new(), 0, 0, 0);
    for task in tasks {
        let (latencies, task_lags, task_errors, task_status, body) = task.await??;
        all.extend(latencies);
        lags.extend(task_lags);
        errors += task_errors;
        status = task_status;
        body_bytes = body;
    }
    lags.sort_unstable();
    let lag_p99_us = lags.get(lags.len() * 99 / 100).copied().unwrap_or(0) as f64;
    Ok(LoadReport {
        status,
        body_bytes,
        lag_p99_us,
        ..LoadReport::from_latencies(all, errors, started.elapsed().as_secs_f64())
    })
}

/// The bare hyper server of the hot-path comparison: HTTP/1.1 keep-alive, every request answered
/// `200` with `body` as `application/json`, nothing else (no routing, limits or metrics): the
/// physical limit an IMDS answer is measured against. Serves until `shutdown` (connections still
/// open then are dropped) or until `accept` fails.
pub async fn serve_bare(
    listener: tokio::net::TcpListener,
    body: bytes::Bytes,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use http_body_util::Full;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted?.0,
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                let mut response = http::Response::new(Full::new(body.clone()));
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
