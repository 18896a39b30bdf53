//! `imdsgate-hotpath`: what one hot-path request costs the agent, in CPU instructions and heap
//! allocations, against the bare hyper server of the benchmarks (`load::serve_bare`). Counts, not
//! wall-clock: they do not depend on the machine's load, so they can be taken anywhere.
//!
//! `count` runs the server under valgrind (callgrind for instructions, DHAT for allocations) in a
//! process of its own, answers `--base` and then `--requests` requests over keep-alive loopback
//! connections from a client outside valgrind, and reports the difference divided by the
//! difference in requests: start-up, the first credentials fetch and the connection set-up cancel
//! out. The agent side is the agent's own listener (`imdsgate_agent::imds::listener::serve`: the shared
//! hardened HTTP server, budgets, timeouts, metrics) and IMDS service, with one pod in its index
//! and that pod's credentials cached (a fixed credential source, so the first request fills the
//! cache); the loopback peer is presented to it as the pod's address, the one thing the DNAT path
//! gives a real agent. The credentials document is sized to the bench's 610 bytes, and the bare
//! server answers a body of that size to every request. Request kinds: `creds-v1` (GET
//! `…/security-credentials/<role>`), `creds-v2` (the same with an IMDSv2 token), `token` (PUT
//! `/latest/api/token`), `listing` (GET `…/security-credentials/`).
//!
//! ```text
//! imdsgate-hotpath count [--requests 20000] [--base 2000] [--tool both|callgrind|dhat]
//!                        [--kinds creds-v1,creds-v2,token,listing] [--targets agent,bare]
//!                        [--connections 1] [--workers 1] [--valgrind valgrind]
//!                        [--keep DIR] [--json FILE]
//! imdsgate-hotpath serve --target agent|bare [--workers 1]  # prints `listening <addr>`, exits at stdin EOF
//! imdsgate-hotpath drive --addr ADDR --kind KIND --requests N [--connections 1]
//! ```
//!
//! `count` prints a Markdown table on stdout (progress on stderr) and, with `--json`, the same
//! figures as JSON. `--keep` keeps valgrind's files, `DIR/<target>-<kind>-<n>.callgrind` and
//! `.dhat.json`; to read where the instructions go (`callgrind_annotate --inclusive=yes FILE`) build
//! with symbols: `CARGO_PROFILE_RELEASE_STRIP=none cargo build --release -p imdsgate-e2e --bin
//! imdsgate-hotpath`. SHA-256 runs in software under valgrind (no SHA extensions), so the token
//! kinds count more instructions than the same code spends on a CPU with them.
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use imdsgate_agent::credentials::credential_cache::{CredentialCache, CredentialSource, Quorum};
use imdsgate_agent::credentials::server_client::ServerError;
use imdsgate_agent::imds::Imds;
use imdsgate_agent::imds::listener;
use imdsgate_agent::imds::token::TokenKey;
use imdsgate_agent::imds::upstream::AllowList;
use imdsgate_agent::metrics::Metrics;
use imdsgate_core::PodIndex;
use imdsgate_core::http_server::{Accept, Budget};
use imdsgate_e2e::load;
use imdsgate_proto::Credentials;
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 220, 1, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 1);
const ROLE: &str = "bench-role";
/// The credentials body the bench measured (moto's credentials for `bench-role`).
const BODY_BYTES: usize = 610;
const HOST: &str = "169.254.169.254";

#[derive(Parser)]
#[command(name = "imdsgate-hotpath")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Agent,
    Bare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    /// GET …/security-credentials/<role> without a token.
    CredsV1,
    /// The same with an IMDSv2 token header.
    CredsV2,
    /// PUT /latest/api/token.
    Token,
    /// GET …/security-credentials/ (the role listing).
    Listing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Tool {
    Both,
    Callgrind,
    Dhat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Instructions and allocations per request, agent and bare server, each kind.
    Count {
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        #[arg(long, default_value_t = 2_000)]
        base: u64,
        #[arg(long, value_enum, default_value = "both")]
        tool: Tool,
        #[arg(long, value_enum, value_delimiter = ',', default_value = "creds-v1,creds-v2,token,listing")]
        kinds: Vec<Kind>,
        #[arg(long, value_enum, value_delimiter = ',', default_value = "agent,bare")]
        targets: Vec<Target>,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Server runtime worker threads (0: a current-thread runtime).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value = "valgrind")]
        valgrind: PathBuf,
        /// Keep valgrind's output files here.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// (internal) One server on 127.0.0.1; prints `listening <addr>`, exits when stdin closes.
    Serve {
        #[arg(long, value_enum)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// (internal) `requests` requests of one kind, spread over `connections` keep-alive
    /// connections; fails on any answer but 200.
    Drive {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        requests: u64,
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Serve { target, workers } => {
            let runtime = if workers == 0 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?
            };
            runtime.block_on(serve(target))
        }
        Cmd::Drive { addr, kind, requests, connections } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(async { drive(addr, kind, requests, connections).await }),
        Cmd::Count { requests, base, tool, kinds, targets, connections, workers, valgrind, keep, json } => {
            if requests <= base {
                bail!("--requests must exceed --base");
            }
            let dir = match &keep {
                Some(dir) => {
                    std::fs::create_dir_all(dir)?;
                    None
                }
                None => Some(tempfile::tempdir()?),
            };
            let dir_path = keep
                .clone()
                .unwrap_or_else(|| dir.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_default());
            let counter = Counter { valgrind, dir: dir_path, connections, workers };
            let mut rows = Vec::new();
            for &kind in &kinds {
                for &target in &targets {
                    let mut row = Row { target, kind, instructions: None, allocations: None, bytes: None };
                    if matches!(tool, Tool::Both | Tool::Callgrind) {
                        let [low, high] =
                            [base, requests].map(|n| counter.run(target, kind, n, Tool::Callgrind));
                        let (low, high) = (low?, high?);
                        row.instructions = Some((high.0 - low.0) as f64 / (requests - base) as f64);
                    }
                    if matches!(tool, Tool::Both | Tool::Dhat) {
                        let [low, high] = [base, requests].map(|n| counter.run(target, kind, n, Tool::Dhat));
                        let (low, high) = (low?, high?);
                        row.allocations = Some((high.0 - low.0) as f64 / (requests - base) as f64);
                        row.bytes = Some((high.1 - low.1) as f64 / (requests - base) as f64);
                    }
                    eprintln!("{row:?}");
                    rows.push(row);
                }
            }
            print_table(&rows);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
            }
            Ok(())
        }
    }
}

/// Figures per request for one target and kind.
#[derive(Debug, Serialize)]
struct Row {
    target: Target,
    kind: Kind,
    instructions: Option<f64>,
    allocations: Option<f64>,
    bytes: Option<f64>,
}

fn print_table(rows: &[Row]) {
    let show = |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    let find = |kind: Kind, target: Target| rows.iter().find(|r| r.kind == kind && r.target == target);
    println!(
        "| request | agent instr/req | agent allocs/req | agent bytes/req | bare instr/req | bare allocs/req | agent / bare instr |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut kinds: Vec<Kind> = rows.iter().map(|r| r.kind).collect();
    kinds.dedup();
    for kind in kinds {
        let (agent, bare) = (find(kind, Target::Agent), find(kind, Target::Bare));
        let ratio = match (agent.and_then(|a| a.instructions), bare.and_then(|b| b.instructions)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {ratio} |",
            kind.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
            show(agent.and_then(|r| r.instructions), 0),
            show(agent.and_then(|r| r.allocations), 2),
            show(agent.and_then(|r| r.bytes), 0),
            show(bare.and_then(|r| r.instructions), 0),
            show(bare.and_then(|r| r.allocations), 2),
        );
    }
}

struct Counter {
    valgrind: PathBuf,
    dir: PathBuf,
    connections: usize,
    workers: usize,
}

impl Counter {
    /// Runs the server under `tool`, drives `n` requests at it, and returns (instructions, 0) or
    /// (heap blocks, heap bytes) over the whole process.
    fn run(&self, target: Target, kind: Kind, n: u64, tool: Tool) -> Result<(u64, u64)> {
        let name = |t: Target| t.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
        let kind_name = kind.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
        let stem = self.dir.join(format!("{}-{kind_name}-{n}", name(target)));
        let (tool_arg, out) = match tool {
            Tool::Dhat => ("--tool=dhat", stem.with_extension("dhat.json")),
            _ => ("--tool=callgrind", stem.with_extension("callgrind")),
        };
        let out_arg = match tool {
            Tool::Dhat => format!("--dhat-out-file={}", out.display()),
            _ => format!("--callgrind-out-file={}", out.display()),
        };
        let mut child = Command::new(&self.valgrind)
            .args([tool_arg, &out_arg, "--log-file=/dev/null"])
            .arg(std::env::current_exe()?)
            .args(["serve", "--target", &name(target), "--workers", &self.workers.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.valgrind.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("the server said {line:?}"))?
            .parse()?;
        let driven = tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(drive(
            addr,
            kind,
            n,
            self.connections,
        ));
        drop(child.stdin.take());
        let status = child.wait()?;
        driven?;
        if !status.success() {
            bail!("the server under valgrind exited with {status}");
        }
        match tool {
            Tool::Dhat => dhat_totals(&out),
            _ => Ok((callgrind_total(&out)?, 0)),
        }
    }
}

fn callgrind_total(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no totals in {}", path.display()))
}

/// Total heap blocks and bytes allocated over the run, from DHAT's JSON.
fn dhat_totals(path: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let pps = doc["pps"].as_array().context("no pps in the DHAT output")?;
    let sum = |key: &str| pps.iter().filter_map(|pp| pp[key].as_u64()).sum::<u64>();
    Ok((sum("tbk"), sum("tb")))
}

/// The request bytes of `kind` (IMDSv2 with `token`).
fn request(kind: Kind, token: &str) -> Vec<u8> {
    let creds = format!("/latest/meta-data/iam/security-credentials/{ROLE}");
    match kind {
        Kind::CredsV1 => load::request("GET", HOST, &creds, &[]),
        Kind::CredsV2 => load::request("GET", HOST, &creds, &[("X-aws-ec2-metadata-token", token)]),
        Kind::Token => load::request(
            "PUT",
            HOST,
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        ),
        Kind::Listing => load::request("GET", HOST, "/latest/meta-data/iam/security-credentials/", &[]),
    }
}

async fn drive(addr: SocketAddr, kind: Kind, requests: u64, connections: usize) -> Result<()> {
    let connections = connections.max(1);
    // Every kind asks once for a token first, so the runs of all kinds start alike.
    let mut first = load::Connection::open(addr, None).await?;
    let (status, token) = first.exchange(&request(Kind::Token, "")).await?;
    drop(first);
    // The bare server answers anything with its body; only the agent's token is one.
    let token = if status == 200 { String::from_utf8(token)?.trim().to_string() } else { String::new() };
    let request = Arc::new(request(kind, &token));
    let mut tasks = Vec::new();
    for c in 0..connections as u64 {
        let share = requests / connections as u64 + u64::from(c < requests % connections as u64);
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = load::Connection::open(addr, None).await?;
            for _ in 0..share {
                let (status, body) = conn.exchange(&request).await?;
                if status != 200 {
                    bail!("status {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Prints the address, serves until stdin closes.
async fn serve(target: Target) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    println!("listening {}", listener.local_addr()?);
    // A thread, not tokio's stdin (its `io-std` feature is not in the workspace's tokio).
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed.send(());
    });
    let stdin_closed = async {
        let _ = stdin_closed.await;
    };
    match target {
        Target::Bare => {
            load::serve_bare(listener, bytes::Bytes::from(vec![b'x'; BODY_BYTES]), stdin_closed).await?;
        }
        Target::Agent => {
            imdsgate_core::process::init_logging(imdsgate_core::process::LogFormat::Json);
            let metrics = Metrics::new();
            let pods = Arc::new(PodIndex::new());
            pods.apply(&serde_json::from_value(serde_json::json!({
                "metadata": { "uid": "uid-hotpath", "name": "load", "namespace": "bench",
                              "annotations": { "iam.amazonaws.com/role": ROLE } },
                "spec": { "nodeName": "bench-node", "containers": [] },
                "status": { "phase": "Running", "podIP": POD_IP.to_string(), "podIPs": [{ "ip": POD_IP.to_string() }] }
            }))?);
            let pod_wait = Duration::from_secs(2);
            let imds = Arc::new(Imds {
                pods,
                node_ips: vec![IpAddr::V4(NODE_IP)],
                pod_wait,
                tokens: TokenKey::from_bytes([7; 32]),
                require_imdsv2: false,
                credentials: Arc::new(CredentialCache::new(
                    Arc::new(FixedCredentials::new()),
                    metrics.clone(),
                )),
                upstream: None,
                allow: AllowList::default_list(),
                metrics: metrics.clone(),
                events: Arc::new(imdsgate_agent::imds::refusal_events::AgentEvents::new(
                    None,
                    "bench-node".into(),
                    metrics.clone(),
                )),
            });
            // The agent's defaults (imdsgate_agent::Args).
            let limits = listener::Limits {
                max_header_bytes: 16 * 1024,
                header_timeout: Duration::from_secs(5),
                request_timeout: pod_wait + Duration::from_secs(15),
                pods: Budget { total: 1024, per_source: 64 },
                unknown: Budget { total: 256, per_source: listener::REQUESTS_PER_UNKNOWN_SOURCE },
            };
            let acceptor = AsPod { listener, pod: IpAddr::V4(POD_IP) };
            listener::serve(acceptor, imds, limits, metrics, stdin_closed, Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

/// Loopback connections presented as coming from the pod (as the DNAT path presents a real pod's).
struct AsPod {
    listener: TcpListener,
    pod: IpAddr,
}

impl Accept for AsPod {
    type Io = TcpStream;

    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = Accept::accept(&mut self.listener).await?;
        Ok((stream, SocketAddr::new(self.pod, peer.port())))
    }
}

/// Credentials valid for an hour from start, with a session token sized so that the document is
/// [`BODY_BYTES`] long.
struct FixedCredentials(Credentials);

impl FixedCredentials {
    fn new() -> FixedCredentials {
        let issued_at = SystemTime::now();
        let mut creds = Credentials {
            access_key_id: "ASIAHOTPATHEXAMPLE01".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYHOTPATHKEY".into(),
            session_token: String::new(),
            expiration: issued_at + Duration::from_secs(3600),
            issued_at,
            role_arn: format!("arn:aws:iam::123456789012:role/{ROLE}"),
            account_id: "123456789012".into(),
        };
        let empty = imdsgate_agent::imds::credential_document::credentials_json(&creds, false).len();
        creds.session_token = "T".repeat(BODY_BYTES.saturating_sub(empty));
        FixedCredentials(creds)
    }
}

impl CredentialSource for FixedCredentials {
    fn fetch(
        &self,
        _pod_ip: IpAddr,
        _pod_uid: &str,
        _role: &str,
        _quorum: Quorum,
    ) -> futures::future::BoxFuture<'static, Result<Credentials, ServerError>> {
        let creds = self.0.clone();
        Box::pin(async move { Ok(creds) })
    }
}
