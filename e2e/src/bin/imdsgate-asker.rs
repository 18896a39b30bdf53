//! One pod's steady stream of credential requests, for the fault suite (`e2e/tests/faults.rs`):
//! run inside a pod's network namespace, it asks the metadata address for its credentials the way
//! an SDK does — an IMDSv2 token once (kept until refused), the role listing, then the role's
//! credentials — every `--every-ms`, each request on a fresh connection, and appends one JSON line
//! per round to `--out` (flushed at once, so a test reads it while it runs and loses at most the
//! round in flight when it kills the process). Stops by itself after `--seconds`; only talks to
//! link-local, private or loopback addresses.
#![forbid(unsafe_code)]

use anyhow::{Result, bail};
use clap::Parser;
use serde::Serialize;
use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
const MAX_SECONDS: u64 = 600;
/// Anything from the node's own metadata service (the test bed's stand-in) carries one of these.
const NODE_MARKERS: &[&str] = &["NODEROLEKEY", "node-secret", "node-imds-token"];

#[derive(Parser)]
#[command(name = "imdsgate-asker")]
struct Cli {
    #[arg(long, default_value = "169.254.169.254:80")]
    target: SocketAddr,
    /// Start a round this often (a round that takes longer is followed at once by the next).
    #[arg(long, default_value_t = 25)]
    every_ms: u64,
    /// Stop after this long.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Give up on one request after this long (connect included).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// TTL asked for the IMDSv2 token; 0: IMDSv1, no token.
    #[arg(long, default_value_t = 21_600)]
    token_ttl: u64,
    /// File the JSON lines are appended to.
    #[arg(long)]
    out: std::path::PathBuf,
}

/// One round: what the last request of it answered.
#[derive(Default, Serialize)]
struct Round {
    /// Unix time (ms) the round started, and how long it took.
    t: u64,
    ms: u64,
    /// The request that ended the round: `token`, `list` or `creds`.
    step: &'static str,
    /// HTTP status; 0 when nothing answered (refused, reset, timed out).
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<String>,
    /// Something from the node's own metadata service was in an answer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    node: bool,
    /// Unix time (ms) the IMDSv2 token used was issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    tok: Option<u64>,
    /// The secret and session token, the first time this process sees a key (to ask STS whose
    /// it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Asker {
    target: SocketAddr,
    timeout: Duration,
    token_ttl: u64,
    token: Option<(String, u64)>,
    seen: HashSet<String>,
}

impl Asker {
    /// One request on a fresh connection: (status, body), or why nothing answered.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        header: Option<(&str, &str)>,
    ) -> Result<(u16, String)> {
        let mut text = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
        if let Some((k, v)) = header {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        let target = self.target;
        let exchange = async move {
            let mut stream = TcpStream::connect(target).await?;
            stream.write_all(text.as_bytes()).await?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await?;
            anyhow::Ok(raw)
        };
        let raw = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("timed out"),
        };
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no complete answer") };
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        match status {
            Some(status) => Ok((status, body.to_string())),
            None => bail!("no status line"),
        }
    }

    async fn round(&mut self) -> Round {
        let mut round = Round { t: now_ms(), ..Default::default() };
        let started = Instant::now();
        self.steps(&mut round).await;
        round.ms = started.elapsed().as_millis() as u64;
        round
    }

    fn answered(round: &mut Round, step: &'static str, outcome: &Result<(u16, String)>) {
        round.step = step;
        match outcome {
            Ok((status, body)) => {
                round.status = *status;
                round.node |= NODE_MARKERS.iter().any(|m| body.contains(m));
                if *status != 200 {
                    round.err = Some(body.trim().chars().take(200).collect());
                }
            }
            Err(e) => {
                round.status = 0;
                round.err = Some(e.to_string());
            }
        }
    }

    async fn steps(&mut self, round: &mut Round) {
        if self.token_ttl > 0 && self.token.is_none() {
            let ttl = self.token_ttl.to_string();
            let issued = now_ms();
            let outcome = self
                .exchange("PUT", "/latest/api/token", Some(("X-aws-ec2-metadata-token-ttl-seconds", &ttl)))
                .await;
            Self::answered(round, "token", &outcome);
            match outcome {
                Ok((200, token)) => self.token = Some((token.trim().to_string(), issued)),
                _ => return,
            }
        }
        round.tok = self.token.as_ref().map(|t| t.1);
        let token = self.token.as_ref().map(|t| t.0.clone());
        let header = token.as_deref().map(|t| ("X-aws-ec2-metadata-token", t));
        let outcome = self.exchange("GET", CREDENTIALS, header).await;
        Self::answered(round, "list", &outcome);
        let role = match outcome {
            Ok((200, body)) => body.trim().to_string(),
            Ok((401, _)) => {
                self.token = None;
                return;
            }
            _ => return,
        };
        round.role = Some(role.clone());
        let outcome = self.exchange("GET", &format!("{CREDENTIALS}{role}"), header).await;
        Self::answered(round, "creds", &outcome);
        match outcome {
            Ok((200, body)) => {
                let doc: serde_json::Value = match serde_json::from_str(&body) {
                    Ok(doc) => doc,
                    Err(e) => {
                        round.status = 0;
                        round.err = Some(format!("not a credentials document: {e}"));
                        return;
                    }
                };
                let field = |k: &str| doc[k].as_str().map(str::to_string);
                round.key = field("AccessKeyId");
                round.exp = field("Expiration");
                round.upd = field("LastUpdated");
                if field("Code").as_deref() != Some("Success") || round.key.is_none() {
                    round.status = 0;
                    round.err = Some(format!("not a credentials document: {body}"));
                    return;
                }
                if let Some(key) = &round.key
                    && self.seen.insert(key.clone())
                {
                    round.secret = field("SecretAccessKey");
                    round.session = field("Token");
                }
            }
            Ok((401, _)) => self.token = None,
            _ => {}
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let inside = match cli.target.ip() {
        std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_private() || v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    if !inside || cli.seconds > MAX_SECONDS {
        bail!("only test-bed addresses (link-local, private, loopback), for at most {MAX_SECONDS} s");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&cli.out)?;
    let mut asker = Asker {
        target: cli.target,
        timeout: Duration::from_millis(cli.timeout_ms),
        token_ttl: cli.token_ttl,
        token: None,
        seen: HashSet::new(),
    };
    let every = Duration::from_millis(cli.every_ms.max(1));
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    runtime.block_on(async {
        while Instant::now() < deadline {
            let started = Instant::now();
            let round = asker.round().await;
            let mut line = serde_json::to_string(&round)?;
            line.push('\n');
            out.write_all(line.as_bytes())?;
            tokio::time::sleep_until((started + every).into()).await;
        }
        anyhow::Ok(())
    })
}
