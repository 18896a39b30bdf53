//! imdsgate's own components on the test bed: the shipped RBAC applied to the real apiserver, a
//! PKI for mutual TLS, the server process running with its ServiceAccount's kubeconfig, and
//! clients for its gRPC and admin endpoints.

use crate::cluster::Cluster;
use crate::pki::{CertPair, TestCa};
use crate::process::{ChildGuard, free_port, wait_for_port};
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
        pki: &Pki,
        extra_args: &[&str],
    ) -> Result<ServerProcess> {
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-server-").tempdir()?;
        let kubeconfig = cluster.service_account_kubeconfig("imdsgate", "imdsgate-server").await?;
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let child = ChildGuard::spawn(
            "imdsgate-server",
            Command::new(workspace_bin("imdsgate-server")?)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--listen={grpc}"))
                .arg(format!("--admin-listen={admin}"))
                .arg(format!("--tls-cert={}", pki.server_files.0.display()))
                .arg(format!("--tls-key={}", pki.server_files.1.display()))
                .arg(format!("--tls-client-ca={}", pki.ca_file.display()))
                .arg(format!("--sts-endpoint={}", sts.endpoint()))
                .arg(format!("--region={REGION}"))
                .args(extra_args)
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env_remove("AWS_PROFILE")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("RUST_LOG", "info,imdsgate_server=debug"),
            &dir.path().join("server.log"),
        )?;
        let mut server = ServerProcess { child, grpc, admin, _dir: dir };
        server.wait_ready(Duration::from_secs(30)).await?;
        Ok(server)
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

/// Waits for `addr` to accept connections.
pub async fn wait_listening(addr: SocketAddr) -> Result<()> {
    wait_for_port(addr, Duration::from_secs(20)).await
}
