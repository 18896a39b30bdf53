//! What one agent identity or a certless neighbour can cost a real server process: a flood of
//! revocation streams with a node's worth of the longest valid entries, and oversized requests,
//! leave the replica's memory bounded; idle connections from a few neighbours under a 1024
//! open-file limit leave fresh agent connections and the webhook served. Each test prints its
//! figures (RSS, call times).

use imdsgate_e2e::components::{ControlPlane, Pki, ServerProcess, grpc_client};
use imdsgate_e2e::process::free_port;
use imdsgate_e2e::{Cluster, PodSpec, Sts, e2e_enabled};
use imdsgate_proto::v1::credentials_client::CredentialsClient;
use imdsgate_proto::v1::{GetCredentialsRequest, HeldCredentials, WatchRevocationsRequest};
use k8s_openapi::api::core::v1::Pod;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const ROLE_BASE: &str = "--role-base-arn=arn:aws:iam::123456789012:role/";

/// A cluster with node-a, its agent pod's token, pod team-a/web (role app-reader) on it, moto and
/// a running server with its webhook.
struct Bed {
    _cluster: Cluster,
    _sts: Sts,
    pki: Pki,
    server: ServerProcess,
    webhook: SocketAddr,
    token: String,
    web_uid: String,
}

impl Bed {
    async fn start() -> Bed {
        let ControlPlane { cluster, sts, agent_token: token, .. } =
            ControlPlane::start().await.expect("control plane");
        let web = PodSpec::new("team-a", "web", "node-a").annotation("iam.amazonaws.com/role", "app-reader");
        cluster.create_pod(&web).await.unwrap();
        cluster.set_pod_status("team-a", "web", &["10.1.0.10"], "Running").await.unwrap();
        let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.client(), "team-a");
        let web_uid = pods.get("web").await.unwrap().metadata.uid.unwrap();
        let pki = Pki::new().unwrap();
        let tls = pki.files();
        let webhook: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let args = [
            ROLE_BASE.to_string(),
            format!("--webhook-listen={webhook}"),
            format!("--webhook-tls-cert={}", tls.server_cert.display()),
            format!("--webhook-tls-key={}", tls.server_key.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ServerProcess::start(&cluster, &sts, &tls, &args).await.expect("server starts");
        Bed { _cluster: cluster, _sts: sts, pki, server, webhook, token, web_uid }
    }

    /// A fresh agent connection (mutual TLS) to the server.
    async fn agent(&self) -> anyhow::Result<CredentialsClient<Channel>> {
        grpc_client(self.server.grpc, &self.pki.ca.cert_pem(), Some(&self.pki.agent)).await
    }

    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
        request
    }

    /// web's credentials over a fresh connection, as an agent that just started asks; how long
    /// the whole took.
    async fn fresh_call(&self) -> (Result<(), String>, Duration) {
        let started = Instant::now();
        let result = async {
            let mut client = self.agent().await.map_err(|e| format!("{e:#}"))?;
            let request = self.authorized(GetCredentialsRequest {
                pod_ip: "10.1.0.10".into(),
                pod_uid: self.web_uid.clone(),
                role: "app-reader".into(),
            });
            client.get_credentials(request).await.map(|_| ()).map_err(|s| format!("{s:?}"))
        };
        let result = tokio::time::timeout(Duration::from_secs(20), result)
            .await
            .unwrap_or_else(|_| Err("no answer in 20 s".into()));
        (result, started.elapsed())
    }

    /// The server process's resident memory, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib / 1024.0
    }
}

/// The longest valid held entry `i`: a 64-character UID and a 64-character role name.
fn longest_held(i: usize) -> HeldCredentials {
    HeldCredentials { pod_uid: format!("{i:0>64}"), role: "r".repeat(64) }
}

#[tokio::test]
async fn a_stream_flood_from_one_agent_identity_leaves_the_replica_small_and_serving() {
    if !e2e_enabled("a_stream_flood_from_one_agent_identity_leaves_the_replica_small_and_serving") {
        return;
    }
    // Started with the soft open-file limit many nodes give (1024) under a higher hard limit.
    let me = std::process::id();
    let (_, hard) = nofile(me);
    assert!(hard > 4096, "this test needs a hard open-file limit above 4096, not {hard}");
    prlimit(me, 1024, hard);
    let bed = Bed::start().await;
    prlimit(me, hard, hard);
    assert_eq!(nofile(bed.server.child.id()), (hard, hard), "the server raised its soft limit at start");
    let (warm, _) = bed.fresh_call().await;
    warm.expect("web's credentials before the flood");
    let before = bed.rss_mib();
    let peak = std::sync::Arc::new(std::sync::Mutex::new(before));
    let sampler = {
        let (peak, pid) = (peak.clone(), bed.server.child.id());
        tokio::spawn(async move {
            loop {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                {
                    let mut peak = peak.lock().unwrap();
                    *peak = peak.max(kib / 1024.0);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // 1. 240 streams of one node, over 8 connections, each listing 1,024 of the longest valid
    // entries (each a POD_NOT_FOUND to send), never read.
    let held: Vec<HeldCredentials> = (0..1024).map(longest_held).collect();
    let started = Instant::now();
    let mut open = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..8 {
        let client = bed.agent().await.expect("an agent connection");
        let opening = (0..30).map(|_| {
            let mut client = client.clone();
            let request = bed.authorized(WatchRevocationsRequest { held: held.clone() });
            async move { client.watch_revocations(request).await }
        });
        for opened in futures::future::join_all(opening).await {
            open.push(opened.expect("a valid subscription opens").into_inner());
        }
        connections.push(client);
    }
    let opened_in = started.elapsed();

    // 2. 60 requests of 2 MiB each (entries far past any valid size), all at once.
    let huge: Vec<HeldCredentials> =
        (0..16).map(|i| HeldCredentials { pod_uid: format!("{i}"), role: "x".repeat(128 * 1024) }).collect();
    let refusing = (0..60).map(|i| {
        let mut client = connections[i % connections.len()].clone();
        let request = bed.authorized(WatchRevocationsRequest { held: huge.clone() });
        async move { client.watch_revocations(request).await.map(|_| ()) }
    });
    let refused = futures::future::join_all(refusing).await;
    for outcome in &refused {
        let status = outcome.as_ref().expect_err("an oversized request is refused");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "refused from its length: {status:?}");
    }

    // Meanwhile a legitimate agent is served.
    let (during, during_took) = bed.fresh_call().await;
    during.expect("web's credentials during the flood");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let streams = bed.server.metric("imdsgate_server_revocation_streams").await.unwrap();
    assert_eq!(streams, 2.0, "two streams of node-a live on; the rest were replaced");
    let after = bed.rss_mib();
    sampler.abort();
    let peak = *peak.lock().unwrap();

    // The replaced streams end with their status even though nobody read them; two stay open.
    let (mut aborted, mut still_open) = (0, 0);
    for stream in &mut open {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Err(status)) if status.code() == tonic::Code::Aborted => aborted += 1,
                Err(_) => still_open += 1,
                Ok(other) => panic!("a stream ended otherwise: {other:?}"),
            }
            break;
        }
    }
    drop((open, connections));
    eprintln!(
        "stream flood: RSS {before:.1} MiB before, {peak:.1} MiB peak, {after:.1} MiB after; \
         240 streams opened in {opened_in:?}; {aborted} ended ABORTED, {still_open} stayed open; \
         a fresh agent call during the flood took {during_took:?}"
    );
    assert_eq!((aborted, still_open), (238, 2), "every replaced stream ends ABORTED");
    // The issue's replica went from 75 to 645 MiB; the chart's limit is 512 MiB.
    assert!(peak - before < 128.0, "RSS grew by {:.1} MiB (peak {peak:.1} MiB)", peak - before);
    assert!(during_took < Duration::from_secs(10), "the legitimate call took {during_took:?}");
}

/// Sets the soft and hard open-file limits of `pid` (the prlimit tool).
fn prlimit(pid: u32, soft: u64, hard: u64) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:{hard}")])
        .output()
        .expect("prlimit runs");
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
}

/// The soft and hard open-file limits of `pid`.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].parse().unwrap(), fields[4].parse().unwrap())
}

#[tokio::test]
async fn idle_neighbours_at_a_1024_file_limit_leave_agents_and_the_webhook_served() {
    if !e2e_enabled("idle_neighbours_at_a_1024_file_limit_leave_agents_and_the_webhook_served") {
        return;
    }
    let bed = Bed::start().await;
    // The worst node: a hard open-file limit of 1024, so nothing can be raised (set once the
    // server runs: lowering another process's hard limit needs no privilege, raising one's own
    // back would).
    prlimit(bed.server.child.id(), 1024, 1024);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 1,500 connections from 64 neighbours, never sending a byte; each reopened when closed.
    let flood: Vec<_> = (0..1500)
        .map(|i| {
            let (stop, grpc) = (stop.clone(), bed.server.grpc);
            let source = SocketAddr::from(([127, 0, 0, 2 + (i % 64) as u8], 0));
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.bind(source).unwrap();
                    if let Ok(Ok(mut conn)) =
                        tokio::time::timeout(Duration::from_secs(2), socket.connect(grpc)).await
                    {
                        let mut byte = [0u8; 1];
                        let _ = tokio::time::timeout(
                            Duration::from_secs(15),
                            tokio::io::AsyncReadExt::read(&mut conn, &mut byte),
                        )
                        .await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut took = Vec::new();
    for i in 0..6 {
        let (result, elapsed) = bed.fresh_call().await;
        result.unwrap_or_else(|e| panic!("fresh agent call {i} during the flood: {e}"));
        took.push(elapsed);
        let review = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "p", "namespace": "team-a" },
            "spec": { "containers": [{ "name": "c", "image": "registry.invalid/app:1" }] }
        });
        let body = imdsgate_e2e::components::pod_review("bounds-review", "team-a", review);
        let (status, text) =
            imdsgate_e2e::components::post_review(bed.webhook, &bed.pki.ca.cert_pem(), &body).await.unwrap();
        assert_eq!(status, 200, "webhook review {i} during the flood: {text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let shed =
        bed.server.metric("imdsgate_server_tls_handshake_failures_total{outcome=\"shed\"}").await.unwrap();
    let evicted =
        bed.server.metric("imdsgate_server_tls_handshake_failures_total{outcome=\"evicted\"}").await.unwrap();
    let timed_out = bed
        .server
        .metric("imdsgate_server_tls_handshake_failures_total{outcome=\"timed_out\"}")
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in flood {
        task.abort();
    }
    let slowest = took.iter().max().unwrap();
    eprintln!(
        "descriptor flood at 1024 open files: fresh agent calls took {took:?} (slowest {slowest:?}); \
         6 of 6 webhook reviews answered; handshakes shed {shed}, evicted {evicted}, timed out {timed_out}"
    );
    assert!(*slowest < Duration::from_secs(5), "a fresh agent call took {slowest:?}");
    assert!(shed > 0.0, "the neighbours were over their share");
}
