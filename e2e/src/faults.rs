//! The fault suite's tools (`e2e/tests/faults.rs`): real traffic through the real path while
//! faults are injected, and a count, per fault, of failed requests and wrong answers.
//!
//! - [`Load`]: one `imdsgate-asker` process per pod, inside the pod's network namespace, asking
//!   for the pod's credentials every few milliseconds and writing one JSON line per answer.
//! - [`classify`]: every answer is ok, failed, or **wrong**: anything from the node's metadata
//!   service, a role other than the pod's, or an access key that was first handed to another pod
//!   or that STS says belongs to another role or session ([`identities`] asks STS whose each key
//!   is). Keys change when sessions are renewed, so a key is only wrong for a pod that is not the
//!   first one it was seen with.
//! - [`Churn`]: Pod objects deleted and recreated at the same IPs (new UIDs, names and roles),
//!   each step synchronised on the agent's own pod index.
//! - [`StsProxy`]: a fault-injecting HTTP proxy in front of moto (slow, throttling, failing,
//!   shifting `Expiration`), switchable at run time, counting the calls that reach it.

use crate::bed::{ACCOUNT, AgentBed, BedPod};
use crate::components::{ServerProcess, http_get, metric_value};
use crate::netns::PodNs;
use crate::process::ChildGuard;
use crate::sts::Sts;
use crate::tools::workspace_bin;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;

/// Unix time in milliseconds (the askers write the same clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Sends SIGKILL to a child and reaps it.
pub fn sigkill(child: &mut ChildGuard) -> Result<()> {
    crate::process::run(Command::new("kill").args(["-KILL", &child.id().to_string()]))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("process {} survived SIGKILL", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// One round of one asker: the last request it made and what came back.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Answer {
    /// The pod (`namespace/name`) whose process asked, and the role it may receive.
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub allowed: String,
    pub t: u64,
    pub ms: u64,
    pub step: String,
    pub status: u16,
    pub role: Option<String>,
    pub key: Option<String>,
    pub exp: Option<String>,
    pub upd: Option<String>,
    pub err: Option<String>,
    #[serde(default)]
    pub node: bool,
    pub tok: Option<u64>,
    pub secret: Option<String>,
    pub session: Option<String>,
}

impl Answer {
    /// Credentials came back.
    pub fn ok(&self) -> bool {
        self.status == 200 && self.step == "creds" && self.key.is_some()
    }

    /// When the round ended (Unix ms).
    pub fn end(&self) -> u64 {
        self.t + self.ms
    }

    /// A short description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{} (may have {}) at {}: {} {} role={:?} key={:?} err={:?}",
            self.pod, self.allowed, self.t, self.step, self.status, self.role, self.key, self.err
        )
    }
}

/// The assumed-role ARN STS reports for `pod`'s (`namespace/name`) session of `role`.
pub fn expected_arn(pod: &str, role: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{}", pod.replacen('/', ".", 1))
}

struct Run {
    pod: String,
    role: String,
    file: PathBuf,
}

/// Pods asking for their credentials all the time: one `imdsgate-asker` per pod.
pub struct Load {
    dir: TempDir,
    exe: PathBuf,
    every: Duration,
    timeout: Duration,
    running: BTreeMap<String, ChildGuard>,
    runs: Vec<Run>,
}

impl Load {
    /// Askers that start a round every `every`.
    pub fn new(every: Duration) -> Result<Load> {
        Ok(Load {
            dir: tempfile::Builder::new().prefix("imdsgate-e2e-load-").tempdir()?,
            exe: workspace_bin("imdsgate-asker")?,
            every,
            timeout: Duration::from_secs(10),
            running: BTreeMap::new(),
            runs: Vec::new(),
        })
    }

    /// How long an asker waits for one request (10 s unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> Load {
        self.timeout = timeout;
        self
    }

    /// Starts asking from `ns` on behalf of `pod` (`namespace/name`), which may receive `role`.
    pub fn start(&mut self, ns: &PodNs, pod: &str, role: &str) -> Result<()> {
        self.stop(pod);
        let n = self.runs.len();
        let file = self.dir.path().join(format!("answers-{n}.jsonl"));
        let child = ChildGuard::spawn(
            &format!("asker for {pod}"),
            ns.command(&self.exe)
                .arg(format!("--every-ms={}", self.every.as_millis()))
                .arg(format!("--timeout-ms={}", self.timeout.as_millis()))
                .arg("--seconds=300")
                .arg(format!("--out={}", file.display())),
            &self.dir.path().join(format!("asker-{n}.log")),
        )?;
        self.running.insert(pod.to_string(), child);
        self.runs.push(Run { pod: pod.to_string(), role: role.to_string(), file });
        Ok(())
    }

    /// Stops `pod`'s asker (its process is gone, as a deleted pod's would be).
    pub fn stop(&mut self, pod: &str) -> bool {
        self.running.remove(pod).is_some()
    }

    pub fn stop_all(&mut self) {
        self.running.clear();
    }

    /// Every answer so far, in the order they were asked.
    pub fn answers(&self) -> Vec<Answer> {
        let mut all = Vec::new();
        for run in &self.runs {
            let text = std::fs::read_to_string(&run.file).unwrap_or_default();
            // A line cut short by a kill is skipped.
            all.extend(text.lines().filter_map(|l| serde_json::from_str::<Answer>(l).ok()).map(|mut a| {
                a.pod = run.pod.clone();
                a.allowed = run.role.clone();
                a
            }));
        }
        all.sort_by_key(|a| a.t);
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// What a run of answers came to.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub wrong: usize,
    /// When the first failed round started and the last one ended (Unix ms).
    pub first_failure: Option<u64>,
    pub last_failure: Option<u64>,
    /// Failed rounds by `step:status`.
    pub failures: BTreeMap<String, usize>,
    /// The first wrong answers, described.
    pub wrong_examples: Vec<String>,
}

impl Tally {
    /// How long after `healed` (Unix ms) the last failed round ended (0: none failed after it).
    pub fn recovery_ms(&self, healed: u64) -> u64 {
        self.last_failure.map(|l| l.saturating_sub(healed)).unwrap_or(0)
    }

    /// From the first failed round's start to the last one's end.
    pub fn outage_ms(&self) -> u64 {
        match (self.first_failure, self.last_failure) {
            (Some(f), Some(l)) => l.saturating_sub(f),
            _ => 0,
        }
    }

    /// The one-line summary RELIABILITY.md collects.
    pub fn line(&self, name: &str, recovery_ms: u64, extra: &str) -> String {
        format!(
            "FAULT {name}: requests={} failed={} wrong={} recovery_ms={recovery_ms} outage_ms={} failures={:?}{}{extra}",
            self.requests,
            self.failed,
            self.wrong,
            self.outage_ms(),
            self.failures,
            if extra.is_empty() { "" } else { " " },
        )
    }
}

/// Sorts answers into ok, failed and wrong. `identities` maps access keys to the ARN STS reports
/// for them ([`identities`]); a key it does not know is judged by role and first sight alone.
pub fn classify(answers: &[Answer], identities: &HashMap<String, String>) -> Tally {
    let mut tally = Tally::default();
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for a in answers {
        tally.requests += 1;
        let mut wrong = Vec::new();
        if a.node {
            wrong.push("carries the node's own metadata".to_string());
        }
        if a.status == 200
            && let Some(role) = &a.role
            && *role != a.allowed
        {
            wrong.push(format!("told role {role}"));
        }
        if let Some(key) = &a.key {
            let first = *owner.entry(key).or_insert(&a.pod);
            if first != a.pod {
                wrong.push(format!("key {key} was first handed to {first}"));
            }
            if let Some(arn) = identities.get(key)
                && *arn != expected_arn(first, &a.allowed)
            {
                wrong.push(format!("key {key} is {arn} by STS"));
            }
        }
        if !wrong.is_empty() {
            tally.wrong += 1;
            if tally.wrong_examples.len() < 10 {
                tally.wrong_examples.push(format!("{}: {}", a.describe(), wrong.join("; ")));
            }
        } else if a.ok() {
            tally.ok += 1;
        } else {
            tally.failed += 1;
            *tally.failures.entry(format!("{}:{}", a.step, a.status)).or_default() += 1;
            tally.first_failure = Some(tally.first_failure.map_or(a.t, |f| f.min(a.t)));
            tally.last_failure = Some(tally.last_failure.map_or(a.end(), |l| l.max(a.end())));
        }
    }
    tally
}

/// Asks STS (moto itself, never a proxy) whose every access key in `answers` is: key → ARN.
pub async fn identities(sts: &Sts, answers: &[Answer]) -> Result<HashMap<String, String>> {
    let mut first: HashMap<String, (String, String)> = HashMap::new();
    for a in answers {
        if let (Some(key), Some(secret), Some(token)) = (&a.key, &a.secret, &a.session) {
            first.entry(key.clone()).or_insert((secret.clone(), token.clone()));
        }
    }
    let lookups = futures::stream::iter(first.into_iter().map(|(key, (secret, token))| async move {
        let credentials =
            aws_credential_types::Credentials::new(&key, &secret, Some(token), None, "imdsgate-e2e-faults");
        let arn = sts
            .client(credentials)
            .get_caller_identity()
            .send()
            .await
            .map(|id| id.arn().unwrap_or_default().to_string())
            .map_err(|e| anyhow::anyhow!("GetCallerIdentity for {key}: {e:?}"));
        (key, arn)
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    let mut out = HashMap::new();
    for (key, arn) in lookups {
        out.insert(key, arn?);
    }
    Ok(out)
}

/// The agent's admin endpoint, reachable from the test process (for its metrics).
pub struct AgentAdmin {
    addr: SocketAddr,
}

impl AgentAdmin {
    pub async fn expose(bed: &AgentBed) -> Result<AgentAdmin> {
        let port = bed.node.expose_on_host(bed.agent().admin_port).await?;
        Ok(AgentAdmin { addr: ([127, 0, 0, 1], port).into() })
    }

    /// The metrics text ("" while the agent is down).
    pub async fn metrics(&self) -> String {
        match http_get(self.addr, "/metrics").await {
            Ok((200, text)) => text,
            _ => String::new(),
        }
    }

    pub async fn value(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// Pods in the agent's index.
    pub async fn pods_indexed(&self) -> Option<f64> {
        let text = self.metrics().await;
        text.contains("imdsgate_agent_pods_indexed")
            .then(|| metric_value(&text, "imdsgate_agent_pods_indexed"))
    }

    /// Waits until `sample` satisfies `done`; returns its value.
    pub async fn wait_for(&self, sample: &str, timeout: Duration, done: impl Fn(f64) -> bool) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            let value = metric_value(&text, sample);
            if !text.is_empty() && done(value) {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("agent metric {sample} is still {value} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sum of every sample of a metric family (`name{…} value` lines, any labels).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Leaks a string (test-run lifetime; the bed's pod descriptions take `&'static str`).
pub fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// One IP whose Pod object is replaced over and over.
pub struct Slot {
    /// The bed pod key of the network namespace holding the IP.
    pub netns: String,
    pub ip: &'static str,
    /// The pod now at the IP (`namespace/name`) and its role.
    pub current: Option<(String, &'static str)>,
}

/// Pods deleted and recreated at the same IPs with new UIDs, names and (mostly) other roles.
pub struct Churn {
    pub namespace: &'static str,
    pub roles: Vec<&'static str>,
    pub slots: Vec<Slot>,
    /// How long the agent's index may take to show a change.
    pub sync_timeout: Duration,
    /// With a late deletion: how long both pods claim the IP.
    pub overlap: Duration,
    seq: usize,
    pub cycles: usize,
    pub late_cycles: usize,
}

impl Churn {
    /// Slots at the IPs of the bed pods (namespace keys) given; they start empty.
    pub fn new(namespace: &'static str, roles: Vec<&'static str>, slots: &[(&str, &'static str)]) -> Churn {
        Churn {
            namespace,
            roles,
            slots: slots
                .iter()
                .map(|(netns, ip)| Slot { netns: netns.to_string(), ip, current: None })
                .collect(),
            sync_timeout: Duration::from_secs(30),
            overlap: Duration::from_millis(300),
            seq: 0,
            cycles: 0,
            late_cycles: 0,
        }
    }

    async fn indexed(&self, agent: &AgentAdmin) -> Result<f64> {
        let deadline = Instant::now() + self.sync_timeout;
        loop {
            if let Some(n) = agent.pods_indexed().await {
                return Ok(n);
            }
            if Instant::now() > deadline {
                bail!("the agent's metrics did not answer for {:?}", self.sync_timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_indexed(&self, agent: &AgentAdmin, n: f64, what: &str) -> Result<()> {
        agent
            .wait_for("imdsgate_agent_pods_indexed", self.sync_timeout, |v| v == n)
            .await
            .with_context(|| format!("the agent's index never showed {what}"))
            .map(|_| ())
    }

    /// Replaces the pod at slot `i` with a new one at the same IP, then starts its asker. The old
    /// pod's asker stops first (its process is gone before its IP is handed on). Normally the old
    /// pod is deleted (every other time for good, otherwise left Terminating) before the new one
    /// is created; with `late`, the new one is created first, starts asking while both claim the
    /// IP, and the old one's deletion follows [`Churn::overlap`] later. Each step waits until the
    /// agent's index shows it, so a new pod's first request is never older than what the agent
    /// knows (answering for the only pod it knows at an IP is, by design, what it must do).
    pub async fn cycle(
        &mut self,
        bed: &AgentBed,
        agent: &AgentAdmin,
        load: &mut Load,
        i: usize,
        late: bool,
    ) -> Result<String> {
        self.seq += 1;
        let seq = self.seq;
        let slot = &self.slots[i];
        let previous = slot.current.clone();
        let role = match &previous {
            // Every third replacement keeps the role: another pod's session of the same role.
            Some((_, prev)) if seq.is_multiple_of(3) => prev,
            Some((_, prev)) => {
                let at = self.roles.iter().position(|r| r == prev).unwrap_or(0);
                self.roles[(at + 1) % self.roles.len()]
            }
            None => self.roles[i % self.roles.len()],
        };
        let name = leak(format!("c{i}-{seq}"));
        let pod = format!("{}/{name}", self.namespace);
        let spec = BedPod::new(self.namespace, name, slot.ip).role(role);
        let netns = bed.pod(&slot.netns).clone();
        let pods: Api<Pod> = Api::namespaced(bed.cluster.client(), self.namespace);
        let delete = |old: &str, forever: bool| {
            let params = DeleteParams { grace_period_seconds: forever.then_some(0), ..Default::default() };
            let (pods, old) = (pods.clone(), old.to_string());
            async move { pods.delete(&old, &params).await.with_context(|| format!("deleting {old}")).map(|_| ()) }
        };
        let n0 = self.indexed(agent).await?;
        match &previous {
            None => {
                bed.create_pod_object(&spec).await?;
                self.wait_indexed(agent, n0 + 1.0, &format!("{pod} added")).await?;
                load.start(&netns, &pod, role)?;
            }
            Some((old, _)) if !late => {
                load.stop(old);
                let old_name = old.rsplit('/').next().unwrap_or_default();
                delete(old_name, seq.is_multiple_of(2)).await?;
                self.wait_indexed(agent, n0 - 1.0, &format!("{old} gone")).await?;
                bed.create_pod_object(&spec).await?;
                self.wait_indexed(agent, n0, &format!("{pod} added")).await?;
                load.start(&netns, &pod, role)?;
            }
            Some((old, _)) => {
                load.stop(old);
                bed.create_pod_object(&spec).await?;
                self.wait_indexed(agent, n0 + 1.0, &format!("{pod} added next to {old}")).await?;
                load.start(&netns, &pod, role)?;
                tokio::time::sleep(self.overlap).await;
                let old_name = old.rsplit('/').next().unwrap_or_default();
                delete(old_name, seq.is_multiple_of(2)).await?;
                self.wait_indexed(agent, n0, &format!("{old} gone")).await?;
                self.late_cycles += 1;
            }
        }
        self.cycles += 1;
        self.slots[i].current = Some((pod.clone(), role));
        Ok(pod)
    }
}

/// A namespace-scoped `/etc/hosts` (`ip netns exec` mounts `/etc/netns/<ns>/hosts` over it),
/// removed on drop.
pub struct NetnsHosts(PathBuf);

impl NetnsHosts {
    pub fn write(ns: &str, hosts: &str) -> Result<NetnsHosts> {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        let guard = NetnsHosts(dir.clone());
        std::fs::write(dir.join("hosts"), hosts)?;
        Ok(guard)
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The name both server replicas go by inside the node namespace.
pub const REPLICAS_HOST: &str = "replicas.imdsgate.test";

/// A second server replica the agent sees next to the bed's: it listens on another port on the
/// machine, reachable in the node namespace at 127.0.0.2 on the first replica's port; the name
/// [`REPLICAS_HOST`] resolves to both there, and the agent is restarted to use it.
pub struct SecondReplica {
    pub server: ServerProcess,
    _hosts: NetnsHosts,
}

impl SecondReplica {
    pub async fn start(
        bed: &mut AgentBed,
        sts_endpoint: &str,
        server_args: &[&str],
    ) -> Result<SecondReplica> {
        let mut args = vec![format!("--role-base-arn=arn:aws:iam::{ACCOUNT}:role/")];
        args.extend(server_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ServerProcess::start_at(&bed.cluster, sts_endpoint, &bed.tls, &args).await?;
        let port = bed.server.grpc.port();
        bed.node.forward_to_host_at([127, 0, 0, 2].into(), port, server.grpc.port()).await?;
        let hosts = NetnsHosts::write(
            bed.node.name(),
            &format!("127.0.0.1 {REPLICAS_HOST}\n127.0.0.2 {REPLICAS_HOST}\n"),
        )?;
        bed.server_host = REPLICAS_HOST;
        let agent = bed.agent.take().context("the agent runs")?;
        bed.agent = Some(agent.restart(&bed.setup(), &[]).await?);
        Ok(SecondReplica { server, _hosts: hosts })
    }
}

/// What the STS proxy does with each call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StsMode {
    /// Forward to moto.
    Pass,
    /// Wait this long, then forward.
    Slow(Duration),
    /// HTTP 400 with STS's `Throttling` error document.
    Throttle,
    /// HTTP 503 with STS's `ServiceUnavailable` error document.
    Fail,
    /// Forward, and move every `Expiration` in the answer by this many seconds (negative:
    /// earlier — STS's clock behind the server's, or credentials handed out already aged).
    ShiftExpiration(i64),
}

/// One call that reached the proxy.
#[derive(Clone, Debug)]
pub struct StsCall {
    pub t: u64,
    pub action: String,
    pub session: String,
    pub mode: StsMode,
    pub status: u16,
}

struct ProxyState {
    mode: Mutex<StsMode>,
    upstream: SocketAddr,
    calls: Mutex<Vec<StsCall>>,
}

/// See the module documentation. Stops on drop.
pub struct StsProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl StsProxy {
    /// Listens on a free loopback port, forwarding to `upstream` (moto's port). Needs a tokio
    /// runtime (it spawns its accept loop there).
    pub fn start(upstream: u16) -> Result<StsProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            mode: Mutex::new(StsMode::Pass),
            upstream: ([127, 0, 0, 1], upstream).into(),
            calls: Mutex::new(Vec::new()),
        });
        let serving = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| proxy(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(StsProxy { addr, state, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: StsMode) {
        *self.state.mode.lock().expect("mode lock") = mode;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<StsCall> {
        self.state.calls.lock().expect("calls lock").clone()
    }
}

impl Drop for StsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn form_value(body: &[u8], key: &str) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.replace("%40", "@").replace("%2F", "/").replace("%3A", ":"))
        .unwrap_or_default()
}

fn sts_error(status: u16, kind: &str, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>{kind}</Type>\n    \
         <Code>{code}</Code>\n    <Message>{message}</Message>\n  </Error>\n  \
         <RequestId>00000000-0000-0000-0000-000000000000</RequestId>\n</ErrorResponse>\n"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// Moves every `<Expiration>` timestamp in an STS answer by `seconds`.
pub fn shift_expirations(body: &str, seconds: i64) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(start) = rest.find("<Expiration>") {
        let (head, tail) = rest.split_at(start + "<Expiration>".len());
        out.push_str(head);
        let Some(end) = tail.find("</Expiration>") else {
            rest = tail;
            break;
        };
        let value = &tail[..end];
        match value.trim().parse::<jiff::Timestamp>() {
            Ok(ts) => {
                let moved = ts.checked_add(jiff::SignedDuration::from_secs(seconds)).unwrap_or(ts);
                out.push_str(&moved.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
            }
            Err(_) => out.push_str(value),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

async fn forward(
    upstream: SocketAddr,
    parts: &http::request::Parts,
    body: Bytes,
) -> Result<(u16, Option<http::HeaderValue>, Bytes)> {
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut head = format!("{} {path} HTTP/1.1\r\n", parts.method);
    for (name, value) in &parts.headers {
        if matches!(name.as_str(), "connection" | "content-length" | "transfer-encoding") {
            continue;
        }
        head.push_str(&format!("{}: {}\r\n", name, value.to_str().unwrap_or_default()));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no answer head from moto")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = Bytes::copy_from_slice(&raw[split + 4..]);
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        payload = dechunk(&payload)?;
    }
    let content_type = header("content-type").and_then(|v| http::HeaderValue::from_str(&v).ok());
    Ok((status, content_type, payload))
}

fn dechunk(mut raw: &[u8]) -> Result<Bytes> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..line_end]).trim(), 16)?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out.into());
        }
        out.extend_from_slice(raw.get(..size).context("short chunk")?);
        raw = raw.get(size + 2..).context("short chunk")?;
    }
}

async fn proxy(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let t = now_ms();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let action = form_value(&body, "Action");
    let session = form_value(&body, "RoleSessionName");
    let mode = *state.mode.lock().expect("mode lock");
    let response = match mode {
        StsMode::Throttle => sts_error(400, "Sender", "Throttling", "Rate exceeded"),
        StsMode::Fail => sts_error(503, "Receiver", "ServiceUnavailable", "Service is unavailable"),
        StsMode::Pass | StsMode::Slow(_) | StsMode::ShiftExpiration(_) => {
            if let StsMode::Slow(delay) = mode {
                tokio::time::sleep(delay).await;
            }
            match forward(state.upstream, &parts, body).await {
                Ok((status, content_type, payload)) => {
                    let payload = match mode {
                        StsMode::ShiftExpiration(s) if action == "AssumeRole" => {
                            Bytes::from(shift_expirations(&String::from_utf8_lossy(&payload), s))
                        }
                        _ => payload,
                    };
                    let mut response = Response::new(Full::new(payload));
                    *response.status_mut() =
                        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
                    if let Some(ct) = content_type {
                        response.headers_mut().insert(http::header::CONTENT_TYPE, ct);
                    }
                    response
                }
                Err(e) => sts_error(502, "Receiver", "ProxyError", &format!("moto: {e}")),
            }
        }
    };
    let status = response.status().as_u16();
    state.calls.lock().expect("calls lock").push(StsCall { t, action, session, mode, status });
    Ok(response)
}

/// A certificate authority with an expired server certificate and a valid agent certificate, in
/// files the server and agent take (the bed's own CA cannot issue certificates of a chosen
/// validity).
pub struct ExpiredServerPki {
    _dir: TempDir,
    pub files: crate::components::TlsFiles,
}

impl ExpiredServerPki {
    pub fn new() -> Result<ExpiredServerPki> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
        };
        let dn = |cn: &str| {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            dn
        };
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-expired-pki-").tempdir()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = dn("imdsgate-e2e-expired-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let issue = |cn: &str, server: bool, expired: bool| -> Result<(String, String)> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = dn(cn);
            if server {
                params.subject_alt_names = vec![
                    SanType::DnsName("localhost".try_into()?),
                    SanType::IpAddress([127, 0, 0, 1].into()),
                ];
            }
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let write = |name: &str, pem: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let (server_cert, server_key) = issue("localhost", true, true)?;
        let (agent_cert, agent_key) = issue("imdsgate-agent", false, false)?;
        let files = crate::components::TlsFiles {
            ca: write("ca.crt", &issuer.pem())?,
            server_cert: write("server.crt", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            agent_cert: write("agent.crt", &agent_cert)?,
            agent_key: write("agent.key", &agent_key)?,
            server_name: "localhost".into(),
        };
        Ok(ExpiredServerPki { _dir: dir, files })
    }
}

/// Seconds since the Unix epoch of an IMDS timestamp (`2026-01-01T00:00:00Z`).
pub fn unix_seconds(ts: &str) -> Option<i64> {
    ts.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The least remaining lifetime imdsgate hands out for a session of `lifetime_secs`
/// (`imdsgate_proto::min_remaining`: 15 minutes, or a quarter of a shorter session).
pub fn min_remaining_secs(lifetime_secs: i64) -> i64 {
    imdsgate_proto::min_remaining(Duration::from_secs(lifetime_secs.max(0) as u64)).as_secs() as i64
}
