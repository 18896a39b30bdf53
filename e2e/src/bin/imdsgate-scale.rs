//! `scripts/scale.sh`: a cluster-scale simulation on the test bed, written as a Markdown section
//! (`scripts/bench-scale.md`, which `imdsgate-bench` appends to BENCHMARKS.md). Measures, never
//! asserts.
//!
//! The bed: a real kube-apiserver + etcd holding `--pods` pods in `--namespaces` namespaces (every
//! namespace permits `.*`; one pod in ten names a role), spread evenly over `--nodes` Node objects;
//! two imdsgate-server replicas as processes (release build, each with its own ports); STS is a
//! counting fake in this process (`--sts fake`, the default: moto, a single Python process, would
//! cost a core at this volume and queue the calls) or moto (`--sts moto`); and `--agents` simulated
//! agents. A simulated agent watches nothing: it has its own Node object and agent pod (hostNetwork,
//! ServiceAccount `imdsgate/imdsgate-agent`) and a real token bound to that pod, holds a lazy
//! mutual-TLS channel to each replica and one `WatchRevocations` stream to each (as the real agent
//! does), and asks `GetCredentials` for the role pods of its node in turn, all agents together at
//! `--rate` calls per second. Replicas are tried as `agent/src/credentials/server_client.rs` does: from a
//! rotating start, a replica that failed as unreachable within 30 s last, the next one at once on
//! an unreachable answer, never after a refusal (an answer carrying a reason).
//!
//! Phases: create the objects; start replica A, then B (time to initial sync: spawn → `/readyz`);
//! let the prefetches settle and measure both at rest; start the agents (time until all are
//! served); a steady window of `--seconds`; a relist (etcd compacted, the apiserver restarted, so
//! every watch must list again; time until each replica has listed again); a reconnect storm
//! (replica A killed with SIGKILL and started again on the same ports; time until every agent is
//! served again, and by A again; failed calls meanwhile). Then the report.
//!
//! ```text
//! imdsgate-scale [--pods 100000] [--namespaces 5000] [--agents 2000] [--nodes N]
//!                [--seconds 60] [--rate R] [--sts fake|moto] [--concurrency 48] [--out FILE]
//! ```
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use imdsgate_e2e::components::{Pki, TlsFiles, http_get, install_rbac, metric_value};
use imdsgate_e2e::process::ChildGuard;
use imdsgate_e2e::report::{Report, machine, rss_kib};
use imdsgate_e2e::sts::REGION;
use imdsgate_e2e::{Cluster, PodSpec, Sts};
use imdsgate_proto::v1::credentials_client::CredentialsClient;
use imdsgate_proto::v1::{GetCredentialsRequest, HeldCredentials, WatchRevocationsRequest};
use imdsgate_proto::{AUTHORIZATION_METADATA_KEY, Reason};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Parser)]
#[command(
    name = "imdsgate-scale",
    about = "Cluster-scale simulation: pods, namespaces, simulated agents, two server replicas"
)]
struct Cli {
    /// Pods on the apiserver (besides the agents' own pods).
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Namespaces the pods are spread over (each permits `.*`).
    #[arg(long, default_value_t = 5_000)]
    namespaces: usize,
    /// Simulated agents.
    #[arg(long, default_value_t = 2_000)]
    agents: usize,
    /// Node objects the pods are spread over (default: one per agent).
    #[arg(long)]
    nodes: Option<usize>,
    /// Seconds of the steady window.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// GetCredentials calls per second, all agents together (default: each agent every 5 s).
    #[arg(long)]
    rate: Option<f64>,
    /// STS: a counting fake in this process, or moto.
    #[arg(long, value_enum, default_value = "fake")]
    sts: StsKind,
    /// Concurrent requests while creating the objects.
    #[arg(long, default_value_t = 48)]
    concurrency: usize,
    /// Where the Markdown section goes (default: scripts/bench-scale.md in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum, Debug)]
enum StsKind {
    Fake,
    Moto,
}

const ROLE_BASE: &str = "arn:aws:iam::123456789012:role/";
const ROLE_EVERY: usize = 10;
/// TokenReviews a replica caches at most.
const REVIEW_CACHE: usize = imdsgate_server::grpc::agent_auth::MAX_CACHE_ENTRIES;
const SUSPECT_FOR_MS: u64 = 30_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const FAILED: u8 = 255;

fn main() -> Result<()> {
    rustls::crypto::aws_lc_rs::default_provider().install_default().ok();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli))
}

// --- measurements of processes --------------------------------------------------------------

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / ticks
}

/// CPU use of several processes over a window: starts a measurement.
struct CpuWindow {
    at: Instant,
    start: Vec<f64>,
    pids: Vec<u32>,
}

impl CpuWindow {
    fn start(pids: &[u32]) -> CpuWindow {
        CpuWindow {
            at: Instant::now(),
            start: pids.iter().map(|p| cpu_seconds(*p)).collect(),
            pids: pids.to_vec(),
        }
    }

    /// Percent of one core per process since the start.
    fn percent(&self) -> Vec<f64> {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        self.pids.iter().zip(&self.start).map(|(p, s)| (cpu_seconds(*p) - s) / wall * 100.0).collect()
    }
}

/// Established TCP connections whose local end is `port` on this network namespace.
fn established_to(port: u16) -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else { return 0 };
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[1].rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
        .count()
}

/// The pid of the first process whose command line satisfies `matches`.
fn find_pid(matches: impl Fn(&str) -> bool) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        matches(&cmd).then_some(pid)
    })
}

fn apiserver_pid(cluster: &Cluster) -> u32 {
    let port = format!("--secure-port={}", cluster.port());
    find_pid(|c| c.contains("kube-apiserver") && c.contains(&port)).unwrap_or(0)
}

fn etcd_pid(cluster: &Cluster) -> u32 {
    let dir = format!("--data-dir={}", cluster.dir().join("etcd").display());
    find_pid(|c| c.contains(&dir)).unwrap_or(0)
}

/// TokenReviews the apiserver has answered since it started (`apiserver_request_total`).
async fn tokenreviews(client: &kube::Client) -> Result<f64> {
    let text =
        client.request_text(http::Request::get("/metrics").body(Vec::new()).expect("static request")).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

// --- a counting fake STS ----------------------------------------------------------------------

/// Answers every AssumeRole with fresh credentials for the requested duration; counts the calls.
struct FakeSts {
    endpoint: String,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeSts {
    async fn start() -> Result<FakeSts> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let calls = counted.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let calls = calls.clone();
                            async move {
                                let body =
                                    req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                                Ok::<_, std::convert::Infallible>(fake_answer(&body, n))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeSts { endpoint: format!("http://{addr}"), calls, task })
    }
}

impl Drop for FakeSts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fake_answer(body: &[u8], n: u64) -> hyper::Response<Full<Bytes>> {
    let form = String::from_utf8_lossy(body);
    let value =
        |key: &str| form.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or("");
    let seconds: i64 = value("DurationSeconds").parse().unwrap_or(3600);
    let expiration = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .strftime("%Y-%m-%dT%H:%M:%SZ");
    let xml = format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
         <Credentials><AccessKeyId>ASIAFAKE{n:012}</AccessKeyId><SecretAccessKey>fake-secret-{n}</SecretAccessKey>\
         <SessionToken>fake-session-token-{n}</SessionToken><Expiration>{expiration}</Expiration></Credentials>\
         </AssumeRoleResult><ResponseMetadata><RequestId>00000000-0000-0000-0000-{n:012}</RequestId>\
         </ResponseMetadata></AssumeRoleResponse>"
    );
    hyper::Response::builder()
        .status(200)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(xml)))
        .expect("static response")
}

// --- server replicas ---------------------------------------------------------------------------

/// One imdsgate-server process; restarted on the same ports.
struct Replica {
    name: &'static str,
    child: Option<ChildGuard>,
    grpc: SocketAddr,
    admin: SocketAddr,
    kubeconfig: PathBuf,
    sts_endpoint: String,
    tls: TlsFiles,
    dir: tempfile::TempDir,
    spawns: usize,
}

impl Replica {
    fn new(name: &'static str, kubeconfig: &Path, sts_endpoint: &str, tls: &TlsFiles) -> Result<Replica> {
        let port = imdsgate_e2e::process::free_port;
        Ok(Replica {
            name,
            child: None,
            grpc: ([127, 0, 0, 1], port()?).into(),
            admin: ([127, 0, 0, 1], port()?).into(),
            kubeconfig: kubeconfig.to_path_buf(),
            sts_endpoint: sts_endpoint.to_string(),
            tls: tls.clone(),
            dir: tempfile::Builder::new().prefix("imdsgate-scale-server-").tempdir()?,
            spawns: 0,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawns += 1;
        let tls = &self.tls;
        let log = self.log_path();
        let child = ChildGuard::spawn(
            "imdsgate-server",
            Command::new(imdsgate_e2e::tools::workspace_bin("imdsgate-server")?)
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .arg(format!("--listen={}", self.grpc))
                .arg(format!("--admin-listen={}", self.admin))
                .arg(format!("--tls-cert={}", tls.server_cert.display()))
                .arg(format!("--tls-key={}", tls.server_key.display()))
                .arg(format!("--tls-client-ca={}", tls.ca.display()))
                .arg(format!("--sts-endpoint={}", self.sts_endpoint))
                .arg(format!("--region={REGION}"))
                .arg(format!("--role-base-arn={ROLE_BASE}"))
                .arg(format!("--pod-name=imdsgate-server-{}", self.name))
                .arg("--log-format=json")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env_remove("AWS_PROFILE")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                // The production level, plus the one debug line that says a watch has listed.
                .env("RUST_LOG", "info,imdsgate_core::watch=debug"),
            &log,
        )?;
        self.child = Some(child);
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.spawns))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn log_tail(&self) -> String {
        self.child.as_ref().map(|c| c.log_tail(30)).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200; returns the time since `since`.
    async fn wait_ready(&mut self, since: Instant, timeout: Duration) -> Result<Duration> {
        loop {
            if let Some(child) = self.child.as_mut() {
                child.check_running()?;
            }
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return Ok(since.elapsed());
            }
            if since.elapsed() > timeout {
                bail!("replica {} not ready after {timeout:?}; its log:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.map(|(_, body)| body).unwrap_or_default()
    }

    async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// Sum of every sample of a metric family (`name{...} v` and `name v`).
    async fn metric_sum(&self, name: &str) -> f64 {
        sum_samples(&self.metrics().await, name)
    }

    /// How many times this spawn's log says the pod watch has listed.
    fn pod_lists(&self) -> usize {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("watch listed") && l.contains("\"pods\""))
            .count()
    }
}

fn sum_samples(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const STS_CALLS: &str = "imdsgate_server_sts_calls_total";

// --- simulated agents --------------------------------------------------------------------------

/// A role pod an agent asks for.
#[derive(Clone)]
struct Target {
    ip: String,
    uid: String,
    role: String,
}

/// One finished GetCredentials call (as an agent sees it, after trying other replicas).
#[derive(Clone, Copy)]
struct Call {
    /// Milliseconds since the run's clock started.
    at_ms: u64,
    agent: u32,
    /// The replica that answered, or [`FAILED`].
    replica: u8,
    latency_us: u32,
}

struct Recorder {
    t0: Instant,
    calls: Mutex<Vec<Call>>,
    failures: Mutex<BTreeMap<String, u64>>,
    /// Attempts on a replica that failed as unreachable (then retried on the other).
    unreachable: [AtomicU64; 2],
    streams_opened: [AtomicU64; 2],
    stream_failures: [AtomicU64; 2],
}

impl Recorder {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
}

struct SimAgent {
    index: u32,
    token: String,
    targets: Vec<Target>,
    channels: [Channel; 2],
    /// When a call to the replica last failed as unreachable (ms on the recorder's clock + 1; 0: never).
    failed_at: [AtomicU64; 2],
    next: AtomicUsize,
}

impl SimAgent {
    fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert(AUTHORIZATION_METADATA_KEY, value);
        }
    }

    /// The real agent's `attempt_order`: a rotating start, replicas that failed within 30 s last.
    fn attempt_order(&self, now_ms: u64) -> [usize; 2] {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % 2;
        let mut order = [start, 1 - start];
        order.sort_by_key(|r| {
            let failed = self.failed_at[*r].load(Ordering::Relaxed);
            failed != 0 && now_ms.saturating_sub(failed) < SUSPECT_FOR_MS
        });
        order
    }

    async fn call(&self, target: &Target, rec: &Recorder) {
        let started = Instant::now();
        let mut last: Option<tonic::Status> = None;
        let mut served = FAILED;
        for r in self.attempt_order(rec.now_ms()) {
            let mut request = tonic::Request::new(GetCredentialsRequest {
                pod_ip: target.ip.clone(),
                pod_uid: target.uid.clone(),
                role: target.role.clone(),
            });
            request.set_timeout(CALL_TIMEOUT);
            self.authorize(&mut request);
            let mut client = CredentialsClient::new(self.channels[r].clone());
            let status = match tokio::time::timeout(CALL_TIMEOUT, client.get_credentials(request)).await {
                Ok(Ok(_)) => {
                    self.failed_at[r].store(0, Ordering::Relaxed);
                    served = r as u8;
                    last = None;
                    break;
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded("no answer in time"),
            };
            if imdsgate_agent::credentials::server_client::retry_elsewhere(&status) {
                self.failed_at[r].store(rec.now_ms().max(1), Ordering::Relaxed);
                rec.unreachable[r].fetch_add(1, Ordering::Relaxed);
                last = Some(status);
            } else {
                self.failed_at[r].store(0, Ordering::Relaxed);
                last = Some(status);
                break;
            }
        }
        if let Some(status) = &last {
            let reason = Reason::of(status).map(|r| r.as_str().to_string()).unwrap_or_else(|| "-".into());
            let key = format!("{:?} ({reason})", status.code());
            *rec.failures.lock().expect("failures").entry(key).or_default() += 1;
        }
        let call = Call {
            at_ms: rec.now_ms(),
            agent: self.index,
            replica: served,
            latency_us: started.elapsed().as_micros().min(u32::MAX as u128) as u32,
        };
        rec.calls.lock().expect("calls").push(call);
    }

    /// Asks for its node's role pods in turn, one call every `every`, starting after `offset`.
    async fn ask_loop(self: Arc<Self>, rec: Arc<Recorder>, every: Duration, offset: Duration) {
        tokio::time::sleep(offset).await;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut k = 0usize;
        loop {
            tick.tick().await;
            let target = &self.targets[k % self.targets.len()];
            k += 1;
            self.call(target, &rec).await;
        }
    }

    /// The revocation stream to one replica, reopened with the real agent's backoff (250 ms .. 5 s).
    async fn follow_revocations(self: Arc<Self>, r: usize, rec: Arc<Recorder>) {
        let mut pause = Duration::from_millis(250);
        loop {
            let held = self
                .targets
                .iter()
                .map(|t| HeldCredentials { pod_uid: t.uid.clone(), role: t.role.clone() })
                .collect();
            let mut request = tonic::Request::new(WatchRevocationsRequest { held });
            self.authorize(&mut request);
            let mut client = CredentialsClient::new(self.channels[r].clone());
            match tokio::time::timeout(CALL_TIMEOUT, client.watch_revocations(request)).await {
                Ok(Ok(response)) => {
                    rec.streams_opened[r].fetch_add(1, Ordering::Relaxed);
                    pause = Duration::from_millis(250);
                    let mut stream = response.into_inner();
                    while let Ok(Some(_revocation)) = stream.message().await {}
                }
                _ => {
                    rec.stream_failures[r].fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

// --- analysis ----------------------------------------------------------------------------------

struct Window {
    ok: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    seconds: f64,
}

fn window(calls: &[Call], from_ms: u64, to_ms: u64) -> Window {
    let inside: Vec<&Call> = calls.iter().filter(|c| c.at_ms >= from_ms && c.at_ms < to_ms).collect();
    let mut lat: Vec<u32> = inside.iter().filter(|c| c.replica != FAILED).map(|c| c.latency_us).collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0)
            as f64
            / 1000.0
    };
    Window {
        ok: lat.len(),
        failed: inside.len() - lat.len(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        seconds: (to_ms.saturating_sub(from_ms)) as f64 / 1000.0,
    }
}

/// When (ms) the last of `agents` got its first grant after `after_ms` (from `replica` if given);
/// `None` while some have not.
fn all_served(calls: &[Call], agents: &[u32], after_ms: u64, replica: Option<u8>) -> Option<u64> {
    let mut first: BTreeMap<u32, u64> = BTreeMap::new();
    for c in calls {
        if c.at_ms >= after_ms && c.replica != FAILED && replica.is_none_or(|r| r == c.replica) {
            first.entry(c.agent).or_insert(c.at_ms);
        }
    }
    let mut last = 0;
    for a in agents {
        last = last.max(*first.get(a)?);
    }
    Some(last)
}

fn failures_text(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| format!("{d} × {k}"))
        })
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

fn progress(what: &str, done: usize, total: usize, started: Instant) {
    if done.is_multiple_of(5_000) || done == total {
        let s = started.elapsed().as_secs_f64();
        eprintln!("  {what}: {done}/{total} ({s:.0} s, {:.0}/s)", done as f64 / s.max(1e-3));
    }
}

// --- the run -------------------------------------------------------------------------------------

async fn run(cli: Cli) -> Result<()> {
    let wall = Instant::now();
    let nodes = cli.nodes.unwrap_or(cli.agents).max(1);
    let (pods, namespaces, agents) = (cli.pods, cli.namespaces.max(1), cli.agents);
    if agents > u32::MAX as usize || agents == 0 {
        bail!("--agents must be between 1 and {}", u32::MAX);
    }
    let rate = cli.rate.unwrap_or(agents as f64 / 5.0);
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| imdsgate_e2e::tools::workspace_root().join("scripts/bench-scale.md"));
    let fds = open_files_limit();
    if fds < (agents as u64) * 4 + 2048 {
        eprintln!(
            "warning: the open-files limit is {fds}; {agents} agents need about {} (ulimit -n)",
            agents * 4 + 2048
        );
    }
    let started_at = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC").to_string();
    let command = format!(
        "target/release/imdsgate-scale --pods {pods} --namespaces {namespaces} --agents {agents} --nodes {nodes} --seconds {} --rate {rate} --sts {}",
        cli.seconds,
        format!("{:?}", cli.sts).to_lowercase()
    );
    eprintln!("==> {command}");

    // --- the bed ---------------------------------------------------------------------------
    let mut cluster = Cluster::start().await?;
    install_rbac(&cluster)?;
    let fake = FakeSts::start().await?;
    let moto = match cli.sts {
        StsKind::Moto => Some(Sts::start().await?),
        StsKind::Fake => None,
    };
    let sts_endpoint =
        moto.as_ref().map(|m| m.endpoint().to_string()).unwrap_or_else(|| fake.endpoint.clone());
    let c = &cluster;
    let conc = cli.concurrency.max(1);

    let t = Instant::now();
    let ns_names: Vec<String> = (0..namespaces).map(|n| format!("ns-{n}")).collect();
    futures::stream::iter(ns_names.iter())
        .map(|ns| c.create_namespace(ns, &[("iam.amazonaws.com/permitted", ".*")]))
        .buffer_unordered(conc)
        .try_collect::<Vec<_>>()
        .await?;
    let node_names: Vec<String> = (0..nodes).map(|n| format!("node-{n}")).collect();
    futures::stream::iter(node_names.iter())
        .map(|n| c.create_node(n))
        .buffer_unordered(conc)
        .try_collect::<Vec<_>>()
        .await?;
    let agent_pods: Vec<k8s_openapi::api::core::v1::Pod> = futures::stream::iter(0..agents)
        .map(|a| {
            let (name, node) = (format!("agent-{a}"), node_names[a % nodes].clone());
            async move {
                c.create_pod(
                    &PodSpec::new("imdsgate", &name, &node).service_account("imdsgate-agent").host_network(),
                )
                .await
            }
        })
        .buffered(conc)
        .try_collect()
        .await?;
    let setup_secs = t.elapsed().as_secs_f64();
    eprintln!("  {namespaces} namespaces, {nodes} nodes, {agents} agent pods: {setup_secs:.0} s");

    // Pod i: namespace i % namespaces, node i % nodes; the j-th pod of a node (j = i / nodes)
    // names a role when j % 10 == 0, so every node holds the same share of role pods.
    let t = Instant::now();
    let done = AtomicUsize::new(0);
    let role_pods: Vec<(usize, Target)> = futures::stream::iter(0..pods)
        .map(|i| {
            let done = &done;
            let ns = &ns_names[i % namespaces];
            let node = &node_names[i % nodes];
            let role = (i / nodes)
                .is_multiple_of(ROLE_EVERY)
                .then(|| format!("app-{}", (i / nodes / ROLE_EVERY) % 50));
            async move {
                let name = format!("p-{i}");
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i as u32).to_string();
                let mut spec = PodSpec::new(ns, &name, node);
                if let Some(role) = &role {
                    spec = spec.annotation("iam.amazonaws.com/role", role);
                }
                let pod = c.create_pod(&spec).await?;
                c.set_pod_status(ns, &name, &[&ip], "Running").await?;
                progress("pods", done.fetch_add(1, Ordering::Relaxed) + 1, pods, t);
                let uid = pod.metadata.uid.unwrap_or_default();
                Ok::<_, anyhow::Error>(role.map(|role| (i % nodes, Target { ip, uid, role })))
            }
        })
        .buffer_unordered(conc)
        .try_filter_map(|x| async move { Ok(x) })
        .try_collect()
        .await?;
    let pods_secs = t.elapsed().as_secs_f64();
    let n_role = role_pods.len();
    let mut by_node: Vec<Vec<Target>> = vec![Vec::new(); nodes];
    for (node, target) in role_pods {
        by_node[node].push(target);
    }
    eprintln!("  {pods} pods ({n_role} with a role): {pods_secs:.0} s");

    let t = Instant::now();
    let tokens: Vec<String> = futures::stream::iter(agent_pods.iter())
        .map(|pod| c.service_account_token("imdsgate", "imdsgate-agent", &["imdsgate"], Some(pod)))
        .buffered(conc)
        .try_collect()
        .await?;
    let tokens_secs = t.elapsed().as_secs_f64();

    let pki = Pki::new()?;
    let tls = pki.files();
    let kubeconfig = cluster.service_account_kubeconfig("imdsgate", "imdsgate-server").await?;
    let mut replicas = [
        Replica::new("a", &kubeconfig, &sts_endpoint, &tls)?,
        Replica::new("b", &kubeconfig, &sts_endpoint, &tls)?,
    ];
    let sync_timeout = Duration::from_secs(900);
    let mut initial_sync = Vec::new();
    for r in replicas.iter_mut() {
        let t = Instant::now();
        r.spawn()?;
        let took = r.wait_ready(t, sync_timeout).await?;
        initial_sync.push((took, r.metric_sum(STS_CALLS).await, rss_kib(r.pid()).unwrap_or(0)));
        eprintln!("  replica {} ready in {:.1} s", r.name, took.as_secs_f64());
    }
    let indexed = replicas[0].metric("imdsgate_server_pods_indexed").await;

    // Let the prefetches settle: STS calls of both replicas unchanged for 5 s (at most 5 minutes).
    let t = Instant::now();
    let mut last = (-1.0, Instant::now());
    while t.elapsed() < Duration::from_secs(300) {
        let calls = replicas[0].metric_sum(STS_CALLS).await + replicas[1].metric_sum(STS_CALLS).await;
        if calls != last.0 {
            last = (calls, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settle_secs = t.elapsed().as_secs_f64();
    let mut prefetch = Vec::new();
    for r in &replicas {
        let m = r.metrics().await;
        prefetch.push((
            sum_samples(&m, STS_CALLS),
            metric_value(&m, "imdsgate_server_prefetches_skipped_total"),
            metric_value(&m, "imdsgate_server_cached_sessions"),
        ));
    }

    let api_pid = apiserver_pid(&cluster);
    let etcd = etcd_pid(&cluster);
    let me = std::process::id();
    let rest_cpu = CpuWindow::start(&[replicas[0].pid(), replicas[1].pid(), api_pid, etcd]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rest_cpu = rest_cpu.percent();
    let rest_rss: Vec<u64> = [replicas[0].pid(), replicas[1].pid(), api_pid, etcd]
        .iter()
        .map(|p| rss_kib(*p).unwrap_or(0))
        .collect();

    // --- the agents ------------------------------------------------------------------------
    let ca_pem = pki.ca.cert_pem();
    let client_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(Identity::from_pem(&pki.agent.cert_pem, &pki.agent.key_pem))
        .domain_name("localhost");
    let channel = |addr: SocketAddr| -> Result<Channel> {
        Ok(Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(client_tls.clone())?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy())
    };
    let rec = Arc::new(Recorder {
        t0: Instant::now(),
        calls: Mutex::new(Vec::new()),
        failures: Mutex::new(BTreeMap::new()),
        unreachable: Default::default(),
        streams_opened: Default::default(),
        stream_failures: Default::default(),
    });
    let sims: Vec<Arc<SimAgent>> = tokens
        .into_iter()
        .enumerate()
        .map(|(a, token)| {
            Ok(Arc::new(SimAgent {
                index: a as u32,
                token,
                targets: by_node[a % nodes].clone(),
                channels: [channel(replicas[0].grpc)?, channel(replicas[1].grpc)?],
                failed_at: Default::default(),
                next: AtomicUsize::new(a),
            }))
        })
        .collect::<Result<_>>()?;
    let asking: Vec<u32> = sims.iter().filter(|s| !s.targets.is_empty()).map(|s| s.index).collect();
    if asking.is_empty() {
        bail!("no agent's node holds a role pod: raise --pods");
    }
    let every = Duration::from_secs_f64(asking.len() as f64 / rate.max(0.001));
    let tr0 = tokenreviews(&cluster.client()).await?;
    let agents_start = rec.now_ms();
    let mut tasks = Vec::new();
    for (k, sim) in sims.iter().enumerate() {
        for r in 0..2 {
            tasks.push(tokio::spawn(sim.clone().follow_revocations(r, rec.clone())));
        }
        if !sim.targets.is_empty() {
            let offset = every.mul_f64(k as f64 / agents as f64);
            tasks.push(tokio::spawn(sim.clone().ask_loop(rec.clone(), every, offset)));
        }
    }
    // Warm-up: every asking agent served, every revocation stream open.
    let warm_deadline = Instant::now() + Duration::from_secs(300) + every;
    let (warm_served_ms, warm_streams_ms) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let served = all_served(&rec.calls.lock().expect("calls"), &asking, agents_start, None);
        let streams = replicas[0].metric("imdsgate_server_revocation_streams").await
            + replicas[1].metric("imdsgate_server_revocation_streams").await;
        if let Some(s) = served
            && streams >= 2.0 * agents as f64
        {
            break (s - agents_start, rec.now_ms() - agents_start);
        }
        if Instant::now() > warm_deadline {
            eprintln!("warning: warm-up incomplete: served {served:?}, streams {streams}");
            break (u64::MAX, u64::MAX);
        }
    };
    let warm_end = rec.now_ms();
    let warm_failures = failures_text(&BTreeMap::new(), &rec.failures.lock().expect("failures"));
    let tr_warm = tokenreviews(&cluster.client()).await? - tr0;
    let warm = window(&rec.calls.lock().expect("calls"), agents_start, warm_end);
    eprintln!("  warm-up: all served after {warm_served_ms} ms, streams after {warm_streams_ms} ms");

    // --- steady window -----------------------------------------------------------------------
    let pids = [replicas[0].pid(), replicas[1].pid(), api_pid, etcd, me];
    let steady_from = rec.now_ms();
    let tr1 = tokenreviews(&cluster.client()).await?;
    let sts1 = replicas[0].metric_sum(STS_CALLS).await + replicas[1].metric_sum(STS_CALLS).await;
    let cpu = CpuWindow::start(&pids);
    let mut peak = [0u64; 5];
    let steady_end = Instant::now() + Duration::from_secs(cli.seconds);
    while Instant::now() < steady_end {
        for (i, p) in pids.iter().enumerate() {
            peak[i] = peak[i].max(rss_kib(*p).unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let steady_cpu = cpu.percent();
    let steady_to = rec.now_ms();
    let tr_steady = tokenreviews(&cluster.client()).await? - tr1;
    let sts_steady = replicas[0].metric_sum(STS_CALLS).await + replicas[1].metric_sum(STS_CALLS).await - sts1;
    let steady_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let conns = [established_to(replicas[0].grpc.port()), established_to(replicas[1].grpc.port())];
    let streams = [
        replicas[0].metric("imdsgate_server_revocation_streams").await,
        replicas[1].metric("imdsgate_server_revocation_streams").await,
    ];
    let cached = [
        replicas[0].metric("imdsgate_server_cached_sessions").await,
        replicas[1].metric("imdsgate_server_cached_sessions").await,
    ];
    let steady = window(&rec.calls.lock().expect("calls"), steady_from, steady_to);
    eprintln!("  steady: {} ok, {} failed", steady.ok, steady.failed);

    // --- relist: etcd compacted, the apiserver restarted ------------------------------------
    let restarts_name = "imdsgate_server_watch_restarts_total";
    let restarts0 =
        [replicas[0].metric_sum(restarts_name).await, replicas[1].metric_sum(restarts_name).await];
    let lists0 = [replicas[0].pod_lists(), replicas[1].pod_lists()];
    let indexed0 = [
        replicas[0].metric("imdsgate_server_pods_indexed").await,
        replicas[1].metric("imdsgate_server_pods_indexed").await,
    ];
    let failures0 = rec.failures.lock().expect("failures").clone();
    // Move etcd's revision past what the watches have seen, then compact: a resumed watch is 410 Gone.
    c.create_namespace("relist-bump", &[]).await?;
    cluster.compact_etcd()?;
    let relist_from = rec.now_ms();
    let away = cluster.restart_apiserver(&[]).await?;
    let api_back_ms = rec.now_ms();
    let c = &cluster;
    c.create_pod(&PodSpec::new("ns-0", "relist-marker", &node_names[0])).await?;
    c.set_pod_status("ns-0", "relist-marker", &["10.255.255.1"], "Running").await?;
    let mut relisted: [Option<u64>; 2] = [None, None];
    let mut marker_seen: [Option<u64>; 2] = [None, None];
    let mut relist_peak = [0u64; 2];
    // A watch that resumes instead of listing again sees the marker but never lists: once both
    // have seen it, wait at most 60 s more for a list.
    let relist_deadline = Instant::now() + Duration::from_secs(600);
    let mut both_seen: Option<Instant> = None;
    while (relisted.iter().any(Option::is_none) || marker_seen.iter().any(Option::is_none))
        && Instant::now() < relist_deadline
        && both_seen.is_none_or(|t| t.elapsed() < Duration::from_secs(60))
    {
        if both_seen.is_none() && marker_seen.iter().all(Option::is_some) {
            both_seen = Some(Instant::now());
        }
        for (i, r) in replicas.iter().enumerate() {
            relist_peak[i] = relist_peak[i].max(rss_kib(r.pid()).unwrap_or(0));
            if relisted[i].is_none() && r.pod_lists() > lists0[i] {
                relisted[i] = Some(rec.now_ms() - api_back_ms);
            }
            if marker_seen[i].is_none() && r.metric("imdsgate_server_pods_indexed").await >= indexed0[i] + 1.0
            {
                marker_seen[i] = Some(rec.now_ms() - api_back_ms);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relist_to = rec.now_ms();
    let restarts1 =
        [replicas[0].metric_sum(restarts_name).await, replicas[1].metric_sum(restarts_name).await];
    let relist_calls = window(&rec.calls.lock().expect("calls"), relist_from, relist_to);
    let relist_failures = failures_text(&failures0, &rec.failures.lock().expect("failures"));
    let api_pid = apiserver_pid(&cluster);
    eprintln!(
        "  relist: apiserver away {:.1} s, relisted {relisted:?} ms, marker {marker_seen:?} ms",
        away.as_secs_f64()
    );

    // --- reconnect storm: replica A killed and started again -------------------------------
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failures1 = rec.failures.lock().expect("failures").clone();
    let unreachable0 = rec.unreachable[0].load(Ordering::Relaxed);
    let tr_storm0 = tokenreviews(&cluster.client()).await?;
    // TokenReviews per second and A's connections, sampled each second from the kill on.
    let storm_peaks = Arc::new(Mutex::new((0.0f64, 0usize)));
    let sampler = {
        let (client, port, peaks) = (cluster.client(), replicas[0].grpc.port(), storm_peaks.clone());
        tokio::spawn(async move {
            let mut prev = tokenreviews(&client).await.unwrap_or(0.0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = tokenreviews(&client).await.unwrap_or(prev);
                let conns = established_to(port);
                let mut peaks = peaks.lock().expect("peaks");
                peaks.0 = peaks.0.max(now - prev);
                peaks.1 = peaks.1.max(conns);
                prev = now;
            }
        })
    };
    let kill_ms = rec.now_ms();
    let kill_at = Instant::now();
    if let Some(child) = replicas[0].child.as_mut() {
        imdsgate_e2e::faults::sigkill(child)?;
    }
    replicas[0].spawn()?;
    let a_ready = replicas[0].wait_ready(kill_at, sync_timeout).await?;
    let a_ready_ms = rec.now_ms();
    let a_pid = replicas[0].pid();
    let storm_cpu = CpuWindow::start(&[a_pid, replicas[1].pid(), api_pid]);
    let mut a_rss_peak = 0u64;
    let mut streams_back_ms = None;
    let storm_deadline = Instant::now() + Duration::from_secs(300) + every * 3;
    let served_by_a = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        a_rss_peak = a_rss_peak.max(rss_kib(a_pid).unwrap_or(0));
        if streams_back_ms.is_none()
            && replicas[0].metric("imdsgate_server_revocation_streams").await >= agents as f64
        {
            streams_back_ms = Some(rec.now_ms() - kill_ms);
        }
        let by_a = all_served(&rec.calls.lock().expect("calls"), &asking, a_ready_ms, Some(0));
        if let Some(t) = by_a
            && streams_back_ms.is_some()
        {
            break Some(t);
        }
        if Instant::now() > storm_deadline {
            break by_a;
        }
    };
    let storm_to = rec.now_ms();
    sampler.abort();
    let (tr_peak, conn_peak) = *storm_peaks.lock().expect("peaks");
    let storm_cpu = storm_cpu.percent();
    let tr_storm = tokenreviews(&cluster.client()).await? - tr_storm0;
    let calls = rec.calls.lock().expect("calls").clone();
    let served_any = all_served(&calls, &asking, kill_ms, None);
    let storm_calls = window(&calls, kill_ms, storm_to);
    let storm_failures = failures_text(&failures1, &rec.failures.lock().expect("failures"));
    let unreachable_a = rec.unreachable[0].load(Ordering::Relaxed) - unreachable0;
    let a_sts_after = replicas[0].metric_sum(STS_CALLS).await;
    let a_conns = established_to(replicas[0].grpc.port());
    for t in &tasks {
        t.abort();
    }
    let total_calls = calls.len();
    let total_failed = calls.iter().filter(|c| c.replica == FAILED).count();
    let all_failures = failures_text(&BTreeMap::new(), &rec.failures.lock().expect("failures"));

    // --- the report ------------------------------------------------------------------------
    let secs = |ms: Option<u64>| {
        ms.map(|m| format!("{:.1} s", m as f64 / 1000.0)).unwrap_or_else(|| "not reached".into())
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let mut r = Report(String::new());
    r.line("## Cluster-scale simulation");
    r.line("");
    r.line(format!(
        "Written by `scripts/scale.sh` (release build; `{command}`) on {started_at}; wall time {:.0} s.",
        wall.elapsed().as_secs_f64()
    ));
    r.line(format!("Machine: {}. Everything below shares it: etcd, kube-apiserver, both server replicas, the {agents} simulated agents and the fake STS (one process, `imdsgate-scale`).", machine()));
    r.line("");
    r.line(format!(
        "The bed: a real kube-apiserver + etcd with **{pods} pods in {namespaces} namespaces** (each namespace permits `.*`; {n_role} pods, one in {ROLE_EVERY}, name a role) spread evenly over {nodes} Node objects ({:.0} pods, {:.1} role pods per node), plus {agents} agent pods. Two imdsgate-server replicas (release build) as processes. STS: {}. **{agents} simulated agents**: each has its own Node object, agent pod and a real token bound to that pod (TokenRequest), watches nothing, holds a lazy mutual-TLS channel and one `WatchRevocations` stream to each replica (as the real agent does), and asks `GetCredentials` for its node's role pods in turn, every {:.1} s ({rate:.0} calls/s in all); replicas are tried as the real agent's `attempt_order` does (rotating start, a replica that failed as unreachable within 30 s last, the other at once on an unreachable answer, never after a refusal). Creating the objects took {setup_secs:.0} s (namespaces, nodes, agent pods), {pods_secs:.0} s (pods: create + status, {:.0} pods/s, {} at a time) and {tokens_secs:.0} s ({agents} bound tokens).",
        pods as f64 / nodes as f64,
        n_role as f64 / nodes as f64,
        match cli.sts {
            StsKind::Fake => "a counting fake in the bench process (it answers every AssumeRole at once; moto, one Python process, would take a core at this volume); calls counted by the servers' `imdsgate_server_sts_calls_total`",
            StsKind::Moto => "moto; calls counted by the servers' `imdsgate_server_sts_calls_total`",
        },
        every.as_secs_f64(),
        pods as f64 / pods_secs.max(1e-3),
        conc,
    ));
    r.line("");
    r.line("### Start and rest");
    r.line("");
    r.line("| | replica A | replica B |");
    r.line("|---|---|---|");
    r.line(format!(
        "| time to initial sync (spawn → `/readyz`), {:.0} pods indexed | {:.1} s | {:.1} s |",
        indexed,
        initial_sync[0].0.as_secs_f64(),
        initial_sync[1].0.as_secs_f64()
    ));
    r.line(format!(
        "| RSS at ready | {:.0} MiB | {:.0} MiB |",
        mib(initial_sync[0].2),
        mib(initial_sync[1].2)
    ));
    r.line(format!(
        "| STS calls by then / after the prefetches settled ({settle_secs:.0} s) | {:.0} / {:.0} | {:.0} / {:.0} |",
        initial_sync[0].1, prefetch[0].0, initial_sync[1].1, prefetch[1].0
    ));
    r.line(format!(
        "| prefetches skipped (STS budget, `--sts-max-rps` 200) / sessions cached | {:.0} / {:.0} | {:.0} / {:.0} |",
        prefetch[0].1, prefetch[0].2, prefetch[1].1, prefetch[1].2
    ));
    r.line(format!(
        "| at rest (no agents, 10 s): RSS / CPU | {:.0} MiB / {:.1} % | {:.0} MiB / {:.1} % |",
        mib(rest_rss[0]),
        rest_cpu[0],
        mib(rest_rss[1]),
        rest_cpu[1]
    ));
    r.line("");
    r.line(format!(
        "At rest the apiserver holds {:.0} MiB ({:.1} % CPU) and etcd {:.0} MiB ({:.1} % CPU). CPU is per cent of one core (utime + stime from `/proc/<pid>/stat`); the machine has {cores}.",
        mib(rest_rss[2]),
        rest_cpu[2],
        mib(rest_rss[3]),
        rest_cpu[3]
    ));
    r.line("");
    r.line("### Under load");
    r.line("");
    r.line(format!(
        "Warm-up (agents started at once: {} TLS connections, {} revocation streams, a TokenReview per agent per replica): every agent served after **{}**, every stream open after {}; {} calls granted, {} failed ({warm_failures}); **{tr_warm:.0} TokenReviews** reached the apiserver ({:.0}/s over the warm-up; {:.2} per agent–replica pair: concurrent calls with one token share one review, and a review is cached once it has succeeded).",
        2 * agents,
        2 * agents,
        secs((warm_served_ms != u64::MAX).then_some(warm_served_ms)),
        secs((warm_streams_ms != u64::MAX).then_some(warm_streams_ms)),
        warm.ok,
        warm.failed,
        tr_warm / warm.seconds.max(1e-3),
        tr_warm / (2 * agents).max(1) as f64
    ));
    r.line("");
    r.line(format!(
        "Steady window, {} s: **{:.0} calls/s** granted (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), {} failed; TokenReviews reaching the apiserver: **{:.2}/s** ({tr_steady:.0}; every agent's review is cached by each replica for min(token lifetime, 10 min), so the steady rate is about {:.1}/s = {agents} agents × 2 replicas / 600 s); STS calls: {sts_steady:.0} (all hits).",
        cli.seconds,
        steady.ok as f64 / steady.seconds.max(1e-3),
        steady.p50_ms,
        steady.p99_ms,
        steady.max_ms,
        steady.failed,
        tr_steady / steady.seconds.max(1e-3),
        2.0 * agents as f64 / 600.0
    ));
    r.line("");
    r.line("| process | RSS at the end (peak) | CPU over the window |");
    r.line("|---|---|---|");
    for (i, name) in
        ["replica A", "replica B", "kube-apiserver", "etcd", "simulated agents + fake STS"].iter().enumerate()
    {
        r.line(format!(
            "| {name} | {:.0} MiB ({:.0}) | {:.1} % |",
            mib(steady_rss[i]),
            mib(peak[i]),
            steady_cpu[i]
        ));
    }
    r.line("");
    r.line(format!(
        "gRPC connections held (established TCP connections to each replica's port, `/proc/net/tcp`): A {}, B {}; revocation streams open (`imdsgate_server_revocation_streams`): A {:.0}, B {:.0}; sessions cached: A {:.0}, B {:.0}.",
        conns[0], conns[1], streams[0], streams[1], cached[0], cached[1]
    ));
    r.line("");
    r.line("### Relist");
    r.line("");
    let fmt_opt = |v: Option<u64>| secs(v);
    let relist_what = |v: Option<u64>| match v {
        Some(ms) => format!("its pod watch **listed again after {:.1} s**", ms as f64 / 1000.0),
        None => "its pod watch resumed without listing again (no new `watch listed` in its log)".into(),
    };
    r.line(format!(
        "etcd's revision moved past what the watches had seen and was compacted, then kube-apiserver restarted (SIGTERM, same flags): away {:.1} s (`imdsgate_server_watch_restarts_total` +{:.0} on A, +{:.0} on B). From the apiserver being ready again: A {}; B {}. A pod created right after was seen after {} (A) and {} (B) (this includes the watch's reconnect backoff, which grows while the apiserver is away). Peak RSS during: A {:.0} MiB, B {:.0} MiB. Agent calls from the restart until both had seen the pod (and a list, or 60 s more), {:.0} s: {} granted, {} failed ({relist_failures}).",
        away.as_secs_f64(),
        restarts1[0] - restarts0[0],
        restarts1[1] - restarts0[1],
        relist_what(relisted[0]),
        relist_what(relisted[1]),
        fmt_opt(marker_seen[0]),
        fmt_opt(marker_seen[1]),
        mib(relist_peak[0]),
        mib(relist_peak[1]),
        relist_calls.seconds,
        relist_calls.ok,
        relist_calls.failed,
    ));
    r.line("");
    r.line("### Reconnect storm");
    r.line("");
    r.line(format!(
        "Replica A killed with SIGKILL under load and started again at once on the same ports (empty caches: every agent's TokenReview and every role pod's session again). A ready again after **{:.1} s**; every agent served again (by either replica) after {} from the kill; every agent served **by A again after {}** from the kill ({} after A was ready); all {agents} revocation streams back on A after {}. Calls from the kill until then: {} granted, **{} failed** ({storm_failures}); {unreachable_a} attempts found A unreachable and went on to B. TokenReviews in the storm: {tr_storm:.0} (peak {tr_peak:.0}/s, sampled each second). A's peak: {conn_peak} connections, {:.0} MiB; {:.0} STS calls since its restart. CPU from A ready until all served by it: A {:.0} %, B {:.0} %, apiserver {:.0} %. Connections on A at the end: {a_conns}.",
        a_ready.as_secs_f64(),
        secs(served_any.map(|t| t.saturating_sub(kill_ms))),
        secs(served_by_a.map(|t| t.saturating_sub(kill_ms))),
        secs(served_by_a.map(|t| t.saturating_sub(a_ready_ms))),
        secs(streams_back_ms),
        storm_calls.ok,
        storm_calls.failed,
        mib(a_rss_peak),
        a_sts_after,
        storm_cpu[0],
        storm_cpu[1],
        storm_cpu[2],
    ));
    if storm_failures.contains("POD_NOT_FOUND") {
        r.line("");
        r.line("The failed calls are refusals from the restarted A before its watches had synced: it serves gRPC from its start, before `/readyz`, and a pod it does not know yet is refused `POD_NOT_FOUND` (after `--pod-wait`) rather than answered `UNAVAILABLE`, so the agent does not go on to B.");
    }
    r.line("");
    r.line(format!("Why \"by A again\" takes longer: an agent whose call found A unreachable tries A last for 30 s (`SUSPECT_FOR`), and each agent calls every {:.1} s, alternating replicas.", every.as_secs_f64()));
    r.line("");
    let sessions = cached[0] + cached[1];
    r.line("### STS calls per hour");
    r.line("");
    r.line(format!(
        "Measured: {:.0} calls at the two initial syncs (prefetches of the {n_role} role pods per replica), {sts_steady:.0} in the {} s steady window (extrapolated: {:.0}/h from requests), {a_sts_after:.0} by A after its restart. Steady state: each replica holds one session per role pod it has seen ({:.0} in all) and renews it 20 minutes before its 1-hour expiry, every 40 minutes: **{:.0} calls/h** ({:.2}/s) for {pods} pods with 2 replicas, plus one call per role pod per replica restart (a rolling restart of both: {:.0} calls).",
        prefetch[0].0 + prefetch[1].0,
        cli.seconds,
        sts_steady / steady.seconds.max(1e-3) * 3600.0,
        sessions,
        sessions * 1.5,
        sessions * 1.5 / 3600.0,
        2.0 * n_role as f64,
    ));
    if cli.sts == StsKind::Fake {
        r.line(format!(
            "The fake STS counted {} AssumeRole calls in the whole run.",
            fake.calls.load(Ordering::Relaxed)
        ));
    }
    r.line("");
    r.line(format!(
        "All calls in the run: {total_calls}, failed {total_failed} ({all_failures}). A call fails when every replica tried failed; `Cancelled` and `DeadlineExceeded` mean no answer within the agent's 5 s call timeout (tonic reports an expired `grpc-timeout` as CANCELLED), `(-)` that the status carried no imdsgate reason."
    ));
    r.line("");
    // --- what breaks first at 10× --------------------------------------------------------
    let rss10 = mib(rest_rss[0].max(rest_rss[1])) * 10.0;
    let sync10 = initial_sync[0].0.as_secs_f64().max(initial_sync[1].0.as_secs_f64()) * 10.0;
    let agents10 = agents * 10;
    let prefetch10 = 10.0 * n_role as f64 / 200.0;
    r.line("### What breaks first at 10×");
    r.line("");
    r.line(format!(
        "At {} pods, {} namespaces and {agents10} agents, scaling the figures above linearly: {} (2) **The server's memory and sync time grow with the pods it watches**: at most about {rss10:.0} MiB per replica at rest (10 × {:.0} MiB at {pods} pods) and an initial sync or relist of the order of {sync10:.0} s on this machine, during which a starting replica refuses calls it cannot judge yet; both are per replica, so more replicas do not help. (3) **STS**: the steady renewals become {:.0} calls/h ({:.1}/s), well inside a per-replica `--sts-max-rps` of 200, but every replica start prefetches one session per role pod — {} calls, which at 200/s take {prefetch10:.0} s per replica and count against the account's STS quota shared with everything else in it; a rolling restart of both replicas doubles that. (4) Connections: {agents10} agents hold {agents10} mutual-TLS connections and {agents10} revocation streams per replica (measured {} per replica here, {:.0} MiB peak for A in the storm); file descriptors and memory follow, and a restart's reconnect storm is {agents10} handshakes + reviews at once. The apiserver, already {:.0} MiB at {pods} pods, would need roughly 10× that for the pods' watch cache.",
        pods * 10,
        namespaces * 10,
        if agents10 > REVIEW_CACHE {
            format!("(1) **The TokenReview cache** is the first hard limit: it holds at most {REVIEW_CACHE} reviews (`MAX_CACHE_ENTRIES` in `server/src/grpc/agent_auth.rs`) and each replica needs one per agent, {agents10}; past that the review closest to its end is evicted for each new one, so the calls of {} agents keep cycling through the cache and reach the apiserver as a TokenReview each ({:.0}/s at this run's call rate × 10, against ~{:.0}/s when all are cached), and every revocation stream reopened costs one too.", agents10 - REVIEW_CACHE, rate * 10.0 * (agents10 - REVIEW_CACHE) as f64 / agents10 as f64, 20.0 * agents as f64 / 600.0)
        } else {
            format!("(1) The TokenReview cache (at most {REVIEW_CACHE} reviews per replica, `MAX_CACHE_ENTRIES` in `server/src/grpc/agent_auth.rs`) still holds all {agents10} agents; steady reviews would be ~{:.0}/s, and a restart's burst about one per agent per replica ({agents10}), concurrent calls with one token sharing one review.", 20.0 * agents as f64 / 600.0)
        },
        mib(rest_rss[0].max(rest_rss[1])),
        sessions * 15.0,
        sessions * 15.0 / 3600.0,
        10 * n_role,
        conns[0].max(conns[1]),
        mib(a_rss_peak),
        mib(rest_rss[2]),
    ));
    r.line("");
    drop(moto);
    drop(fake);
    std::fs::write(&out, &r.0).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({:.0} s)", out.display(), wall.elapsed().as_secs_f64());
    Ok(())
}
