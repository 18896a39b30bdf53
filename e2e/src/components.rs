//! imdsgate's own components on the test bed: the shipped RBAC applied to the real apiserver, a
//! PKI for mutual TLS, the server process running with its ServiceAccount's kubeconfig, and
//! clients for its gRPC and admin endpoints.

use crate::cluster::Cluster;
use crate::pki::{CertPair, TestCa};
use crate::process::{ChildGuard, free_port};
use crate::sts::{REGION, Sts};
use crate::tools::{workspace_bin, workspace_root};
use anyhow::{Context, Result, bail};
use imdsgate_proto::v1::credentials_client::CredentialsClient;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Applies the namespace, ServiceAccounts and RBAC from `deploy/base`, exactly as shipped.
pub fn install_rbac(cluster: &Cluster) -> Result<()> {
    let base = workspace_root().join("deploy/base");
    for file in ["namespace.yaml", "serviceaccounts.yaml", "rbac.yaml"] {
        cluster.apply(&["-f", &base.join(file).to_string_lossy()])?;
    }
    Ok(())
}

/// A CA with a server certificate (127.0.0.1, localhost) and an agent client certificate.
pub struct Pki {
    pub dir: TempDir,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub server: CertPair,
    pub server_files: (PathBuf, PathBuf),
    pub agent: CertPair,
    pub agent_files: (PathBuf, PathBuf),
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-pki-").tempdir()?;
        let ca = TestCa::new("imdsgate-e2e-ca")?;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem())?;
        let server = ca.issue_server(&["imdsgate-server.imdsgate.svc", "localhost", "127.0.0.1"])?;
        let server_files = server.write(dir.path(), "server")?;
        let agent = ca.issue_client("imdsgate-agent")?;
        let agent_files = agent.write(dir.path(), "agent")?;
        Ok(Pki { dir, ca, ca_file, server, server_files, agent, agent_files })
    }
}

/// Where the mutual-TLS files are, and the name the server's certificate carries.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub server_name: String,
}

impl TlsFiles {
    /// The files `scripts/gen-certs.sh --out DIR` writes (the production recipe).
    pub fn generate_with_script(dir: &std::path::Path) -> Result<TlsFiles> {
        crate::process::run(
            Command::new("bash").arg(workspace_root().join("scripts/gen-certs.sh")).arg("--out").arg(dir),
        )?;
        Ok(TlsFiles {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("imdsgate-server.crt"),
            server_key: dir.join("imdsgate-server.key"),
            agent_cert: dir.join("imdsgate-agent.crt"),
            agent_key: dir.join("imdsgate-agent.key"),
            server_name: "imdsgate-server.imdsgate.svc".into(),
        })
    }
}

impl Pki {
    /// This PKI's files; the server certificate is for `localhost`.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca_file.clone(),
            server_cert: self.server_files.0.clone(),
            server_key: self.server_files.1.clone(),
            agent_cert: self.agent_files.0.clone(),
            agent_key: self.agent_files.1.clone(),
            server_name: "localhost".into(),
        }
    }
}

/// A running imdsgate-server.
pub struct ServerProcess {
    pub child: ChildGuard,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _dir: TempDir,
}

impl ServerProcess {
    /// Starts the server with the `imdsgate-server` ServiceAccount's kubeconfig, moto as STS, and
    /// the role base `arn:aws:iam::123456789012:role/`, then waits for `/readyz`.
    pub async fn start(
        cluster: &Cluster,
        sts: &Sts,
        tls: &TlsFiles,
        extra_args: &[&str],
    ) -> Result<ServerProcess> {
        Self::start_at(cluster, sts.endpoint(), tls, extra_args).await
    }

    /// [`ServerProcess::start`] with STS at `sts_endpoint` (a fault-injecting proxy in front of
    /// moto, say).
    pub async fn start_at(
        cluster: &Cluster,
        sts_endpoint: &str,
        tls: &TlsFiles,
        extra_args: &[&str],
    ) -> Result<ServerProcess> {
        let mut server = Self::spawn(cluster, "imdsgate-server", sts_endpoint, tls, extra_args).await?;
        server.wait_ready(Duration::from_secs(30)).await?;
        Ok(server)
    }

    /// Starts the server as ServiceAccount `imdsgate/<service_account>`, without waiting for it
    /// to be ready.
    pub async fn spawn(
        cluster: &Cluster,
        service_account: &str,
        sts_endpoint: &str,
        tls: &TlsFiles,
        extra_args: &[&str],
    ) -> Result<ServerProcess> {
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-server-").tempdir()?;
        let kubeconfig = cluster.service_account_kubeconfig("imdsgate", service_account).await?;
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let child = ChildGuard::spawn(
            "imdsgate-server",
            Command::new(workspace_bin("imdsgate-server")?)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--listen={grpc}"))
                .arg(format!("--admin-listen={admin}"))
                .arg(format!("--tls-cert={}", tls.server_cert.display()))
                .arg(format!("--tls-key={}", tls.server_key.display()))
                .arg(format!("--tls-client-ca={}", tls.ca.display()))
                .arg(format!("--sts-endpoint={sts_endpoint}"))
                .arg(format!("--region={REGION}"))
                .args(extra_args)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env_remove("AWS_PROFILE")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("RUST_LOG", "info,imdsgate_server=debug"),
            &dir.path().join("server.log"),
        )?;
        Ok(ServerProcess { child, grpc, admin, _dir: dir })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.child.check_running()?;
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("imdsgate-server not ready after {timeout:?}; its log:\n{}", self.child.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one metric sample (`name{labels}` exactly as exposed), 0 if absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        let (_, text) = http_get(self.admin, "/metrics").await?;
        Ok(metric_value(&text, sample))
    }

    pub fn log(&self) -> String {
        self.child.log_tail(60)
    }
}

/// A sample's value from OpenMetrics text, 0 when the sample is not there.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A gRPC client for the server with the given client identity (none: no client certificate).
pub async fn grpc_client(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&CertPair>,
) -> Result<CredentialsClient<Channel>> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connecting to imdsgate-server")?;
    Ok(CredentialsClient::new(channel))
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A running imdsgate-agent inside a node namespace, with the node's "real" metadata service (a
/// stand-in answering with the node's identity) at 169.254.169.254:80 in that namespace.
pub struct AgentProcess {
    pub child: ChildGuard,
    pub admin_port: u16,
    pub listen_port: u16,
    node_ns: String,
    _fake_imds: Option<ChildGuard>,
    dir: TempDir,
}

/// What an agent needs to be started.
pub struct AgentSetup<'a> {
    pub cluster: &'a Cluster,
    pub tls: &'a TlsFiles,
    pub node: &'a crate::netns::NodeNs,
    pub node_name: &'a str,
    /// The server's host name or address as the agent resolves it inside the node namespace.
    pub server_host: &'a str,
    pub server_port: u16,
    /// The agent pod object its identity token is bound to.
    pub agent_pod: &'a k8s_openapi::api::core::v1::Pod,
}

impl AgentProcess {
    /// Starts the agent in the node namespace with `--iptables` on `veth+`, the agent
    /// ServiceAccount's kubeconfig, a pod-bound identity token, and the node's metadata stand-in as
    /// upstream. The node namespace must already forward the apiserver and server ports.
    pub async fn start(setup: &AgentSetup<'_>, extra_args: &[&str]) -> Result<AgentProcess> {
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-agent-").tempdir()?;
        let fake_imds = Self::start_fake_imds(setup.node, dir.path())?;
        Self::start_in(setup, dir, Some(fake_imds), extra_args).await
    }

    /// Starts another agent process against the same state directory (a restart).
    pub async fn restart(self, setup: &AgentSetup<'_>, extra_args: &[&str]) -> Result<AgentProcess> {
        let AgentProcess { mut child, dir, _fake_imds, .. } = self;
        child.terminate(Duration::from_secs(15))?;
        drop(child);
        Self::start_in(setup, dir, _fake_imds, extra_args).await
    }

    fn start_fake_imds(node: &crate::netns::NodeNs, dir: &std::path::Path) -> Result<ChildGuard> {
        let n = node.name();
        crate::process::run(Command::new("ip").args([
            "-n",
            n,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "eth0",
        ]))?;
        ChildGuard::spawn(
            "node metadata stand-in",
            node.command(crate::tools::venv_bin("python")?)
                .arg(workspace_root().join("e2e/fake_imds.py"))
                .args(["169.254.169.254", "80"])
                .env("FAKE_IMDS_RECORD", dir.join(UPSTREAM_RECORD)),
            &dir.join("fake-imds.log"),
        )
    }

    /// Starts another agent process against the same state directory without waiting for it to
    /// be ready (one that cannot reach a server never is): returns once its IMDS port listens.
    pub async fn restart_unready(self, setup: &AgentSetup<'_>, extra_args: &[&str]) -> Result<AgentProcess> {
        let AgentProcess { mut child, dir, _fake_imds, .. } = self;
        child.terminate(Duration::from_secs(15))?;
        drop(child);
        let mut agent = Self::spawn_in(setup, dir, _fake_imds, extra_args).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while setup.node.wait_listening(agent.listen_port, Duration::from_millis(200)).await.is_err() {
            agent.child.check_running()?;
            if Instant::now() > deadline {
                bail!("imdsgate-agent does not listen after 30 s; its log:\n{}", agent.child.log_tail(40));
            }
        }
        Ok(agent)
    }

    async fn start_in(
        setup: &AgentSetup<'_>,
        dir: TempDir,
        fake_imds: Option<ChildGuard>,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        let mut agent = Self::spawn_in(setup, dir, fake_imds, extra_args).await?;
        agent.wait_ready(Duration::from_secs(30)).await?;
        Ok(agent)
    }

    async fn spawn_in(
        setup: &AgentSetup<'_>,
        dir: TempDir,
        fake_imds: Option<ChildGuard>,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        let path = dir.path();
        let kubeconfig = setup.cluster.service_account_kubeconfig("imdsgate", "imdsgate-agent").await?;
        let token = setup
            .cluster
            .service_account_token("imdsgate", "imdsgate-agent", &["imdsgate"], Some(setup.agent_pod))
            .await?;
        let token_file = path.join("identity-token");
        std::fs::write(&token_file, token)?;
        let (listen_port, admin_port) = (8181, 9611);
        let host_ip = setup.node.host_ip().to_string();
        let child = ChildGuard::spawn(
            "imdsgate-agent",
            setup
                .node
                .command(workspace_bin("imdsgate-agent")?)
                .arg(format!("--node-name={}", setup.node_name))
                .arg(format!("--host-ip={host_ip}"))
                .arg(format!("--listen=[::]:{listen_port}"))
                .arg(format!("--admin-listen=127.0.0.1:{admin_port}"))
                .arg("--iptables")
                .arg("--host-interface=veth+")
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--server=https://{}:{}", setup.server_host, setup.server_port))
                .arg(format!("--server-name={}", setup.tls.server_name))
                .arg(format!("--tls-cert={}", setup.tls.agent_cert.display()))
                .arg(format!("--tls-key={}", setup.tls.agent_key.display()))
                .arg(format!("--tls-ca={}", setup.tls.ca.display()))
                .arg(format!("--identity-token-file={}", token_file.display()))
                .arg(format!("--token-key-file={}", path.join("token.key").display()))
                .arg("--metadata-upstream=http://169.254.169.254")
                .args(extra_args)
                .env("RUST_LOG", "info,imdsgate_agent=debug"),
            &path.join(format!(
                "agent-{}.log",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()
            )),
        )?;
        Ok(AgentProcess {
            child,
            admin_port,
            listen_port,
            node_ns: setup.node.name().to_string(),
            _fake_imds: fake_imds,
            dir,
        })
    }

    /// Waits until the agent's `/readyz` answers 200 (watch synced, server reachable).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        loop {
            self.child.check_running()?;
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.node_ns, "curl", "-sf", "-m", "2", &url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("imdsgate-agent not ready after {timeout:?}; its log:\n{}", self.child.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        self.child.log_tail(60)
    }

    pub fn state_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Every request the node's metadata stand-in has received (`METHOD target`, as sent), in order.
    pub fn upstream_requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(UPSTREAM_RECORD))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// File in the agent's state directory where the metadata stand-in records what it received.
const UPSTREAM_RECORD: &str = "upstream-requests.log";

/// A TLS client trusting only the CA in `ca_pem` (the test PKI's): for the webhook's listener.
pub fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("PEM certificate")).expect("CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A Pod CREATE AdmissionReview in `namespace` as the apiserver sends it, with request uid `uid`.
pub fn pod_review(uid: &str, namespace: &str, pod: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "name": pod["metadata"]["name"].clone(),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "tester" },
            "object": pod,
            "dryRun": false
        }
    })
    .to_string()
}

/// POSTs `body` to the webhook's `/validate/pods` at `webhook` over TLS (trusting `ca_pem`, as the
/// apiserver would) on a fresh connection; the HTTP status (0 if none) and the whole response.
pub async fn post_review(webhook: SocketAddr, ca_pem: &str, body: &str) -> Result<(u16, String)> {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(webhook).await.context("the webhook listens")?;
    let mut tls = tls_connector(ca_pem).connect(ServerName::try_from("localhost")?, tcp).await?;
    let request = format!(
        "POST /validate/pods HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw))
        .await
        .context("an answer")?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

/// What the server-side tests start from: the apiserver with the shipped RBAC, moto with the
/// role `app-reader`, node `node-a` with an agent pod (`imdsgate/agent-a`) and that pod's
/// node-bound token, and namespace `team-a` permitting `app-.*`.
pub struct ControlPlane {
    pub cluster: Cluster,
    pub sts: Sts,
    pub agent_pod: k8s_openapi::api::core::v1::Pod,
    pub agent_token: String,
}

impl ControlPlane {
    pub async fn start() -> Result<ControlPlane> {
        let (cluster, sts) = tokio::join!(Cluster::start(), Sts::start());
        let (cluster, sts) = (cluster.context("cluster")?, sts.context("moto")?);
        install_rbac(&cluster).context("shipped RBAC applies")?;
        sts.create_role("app-reader")?;
        cluster.create_node("node-a").await?;
        let agent_pod = cluster
            .create_pod(
                &crate::PodSpec::new("imdsgate", "agent-a", "node-a")
                    .service_account("imdsgate-agent")
                    .host_network(),
            )
            .await?;
        let agent_token = cluster
            .service_account_token("imdsgate", "imdsgate-agent", &["imdsgate"], Some(&agent_pod))
            .await?;
        cluster
            .create_namespace(
                "team-a",
                &[("iam.amazonaws.com/permitted", "arn:aws:iam::123456789012:role/app-.*")],
            )
            .await?;
        Ok(ControlPlane { cluster, sts, agent_pod, agent_token })
    }
}
