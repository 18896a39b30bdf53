//! The demo behind `scripts/demo.sh`: the whole of imdsgate on the test bed — real apiserver and
//! etcd, moto as STS, the server with its shipped RBAC and TLS from `scripts/gen-certs.sh`, an
//! agent in a node network namespace with its iptables rule — and pods as network namespaces in
//! which real clients ask 169.254.169.254 for credentials. The end-to-end tests run this same code.

use crate::components::{AgentProcess, AgentSetup, ServerProcess, TlsFiles, install_rbac};
use crate::netns::{NodeNs, PodNs};
use crate::sts::{ACCOUNT_ID, REGION};
use crate::tools::{venv_bin, workspace_root};
use crate::{Cluster, PodSpec, Sts};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use tempfile::TempDir;

pub const NODE_NAME: &str = "demo-node";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);

/// A running demo; everything stops and is removed when it is dropped.
pub struct Demo {
    // Drop order: the agent and server before the network and the control plane.
    agent: AgentProcess,
    _server: ServerProcess,
    pods: Mutex<HashMap<String, PodNs>>,
    node: NodeNs,
    sts: Sts,
    cluster: Cluster,
    _tls_dir: TempDir,
    next_ip: AtomicU8,
}

impl Demo {
    /// Starts everything, telling `say` what it does.
    pub async fn up(say: &dyn Fn(&str)) -> Result<Demo> {
        say("starting etcd + kube-apiserver and the STS emulator (moto)");
        let (cluster, sts) = tokio::join!(Cluster::start(), Sts::start());
        let (cluster, sts) = (cluster?, sts?);
        say(&format!("apiserver at {}, STS at {}", cluster.url(), sts.endpoint()));
        say("applying namespace, ServiceAccounts and RBAC from deploy/base");
        install_rbac(&cluster)?;
        say("making the CA and key pairs with scripts/gen-certs.sh");
        let tls_dir = tempfile::Builder::new().prefix("imdsgate-demo-tls-").tempdir()?;
        let tls = TlsFiles::generate_with_script(tls_dir.path())?;
        say("starting imdsgate-server with the imdsgate-server ServiceAccount's kubeconfig");
        let server = ServerProcess::start(
            &cluster,
            &sts,
            &tls,
            &[&format!("--role-base-arn=arn:aws:iam::{ACCOUNT_ID}:role/")],
        )
        .await?;
        say(&format!("creating node {NODE_NAME} as a network namespace with IP {NODE_IP}"));
        cluster.create_node(NODE_NAME).await?;
        let agent_pod = cluster
            .create_pod(
                &PodSpec::new("imdsgate", "imdsgate-agent-demo", NODE_NAME)
                    .service_account("imdsgate-agent")
                    .host_network(),
            )
            .await?;
        let node = NodeNs::create(NODE_IP)?;
        node.forward_to_host(cluster.port()).await?;
        node.forward_to_host(server.grpc.port()).await?;
        say("starting imdsgate-agent in the node namespace (--iptables --host-interface=veth+)");
        let setup = AgentSetup {
            cluster: &cluster,
            tls: &tls,
            node: &node,
            node_name: NODE_NAME,
            server_host: "127.0.0.1",
            server_port: server.grpc.port(),
            agent_pod: &agent_pod,
        };
        let agent = AgentProcess::start(&setup, &[]).await?;
        for line in node.nat_rules()?.lines().filter(|l| l.contains("IMDSGATE")) {
            say(&format!("  node nat rule: {line}"));
        }
        Ok(Demo {
            agent,
            _server: server,
            pods: Mutex::new(HashMap::new()),
            node,
            sts,
            cluster,
            _tls_dir: tls_dir,
            next_ip: AtomicU8::new(10),
        })
    }

    /// Creates pod `namespace/name` (and its namespace, annotated to permit `permits` when given)
    /// with a network namespace on the demo node; returns it.
    pub async fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        role: Option<&str>,
        permits: Option<&str>,
    ) -> Result<PodNs> {
        let key = format!("{namespace}/{name}");
        if self.pods.lock().expect("pods").contains_key(&key) {
            bail!("pod {key} already exists");
        }
        let namespaces: kube::Api<Namespace> = kube::Api::all(self.cluster.client());
        let annotations: Vec<(&str, &str)> =
            permits.map(|p| ("iam.amazonaws.com/permitted", p)).into_iter().collect();
        match namespaces.get_opt(namespace).await? {
            None => {
                self.cluster.create_namespace(namespace, &annotations).await?;
            }
            Some(_) if !annotations.is_empty() => {
                let patch = serde_json::json!({ "metadata": { "annotations": { "iam.amazonaws.com/permitted": permits } } });
                namespaces
                    .patch(namespace, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                    .await?;
            }
            Some(_) => {}
        }
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed);
        if n == u8::MAX {
            bail!("the demo node is full");
        }
        let ip = Ipv4Addr::new(10, 210, 1, n);
        let mut spec = PodSpec::new(namespace, name, NODE_NAME);
        if let Some(role) = role {
            spec = spec.annotation("iam.amazonaws.com/role", role);
        }
        self.cluster.create_pod(&spec).await?;
        self.cluster.set_pod_status(namespace, name, &[&ip.to_string()], "Running").await?;
        let pod = self.node.add_pod(ip)?;
        self.node.forward_to_host_from_pod(&pod, self.sts.port()).await?;
        self.pods.lock().expect("pods").insert(key, pod.clone());
        Ok(pod)
    }

    /// The pod `namespace/name` the demo made.
    pub fn pod(&self, key: &str) -> Result<PodNs> {
        self.pods.lock().expect("pods").get(key).cloned().with_context(|| format!("no demo pod {key}"))
    }

    /// A command inside a pod's network namespace, as a program in that pod would run: no AWS
    /// credentials or IMDS override, region set, STS at the emulator, the aws CLI on PATH.
    pub fn command_in(&self, pod: &PodNs, program: &str) -> Result<Command> {
        let mut cmd = pod.command(program);
        let venv_bin_dir = venv_bin("aws")?.parent().context("venv")?.to_path_buf();
        let path = format!("{}:{}", venv_bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "AWS_EC2_METADATA_DISABLED",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("PATH", path)
            .env("AWS_REGION", REGION)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_ENDPOINT_URL_STS", self.sts.endpoint());
        Ok(cmd)
    }

    /// Creates an IAM role in the emulator.
    pub fn create_role(&self, name: &str) -> Result<String> {
        self.sts.create_role(name)
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn agent_log(&self) -> String {
        self.agent.log()
    }
}

/// The one-shot demo: `demo/app` gets its role through 169.254.169.254 with the aws CLI,
/// `demo/no-role` gets nothing and is told why. Fails if either outcome is not what it should be.
pub async fn run(say: &dyn Fn(&str)) -> Result<()> {
    let demo = Demo::up(say).await?;
    demo.create_role("demo-app")?;
    let permits = format!("arn:aws:iam::{ACCOUNT_ID}:role/demo-.*");
    say(&format!("creating namespace demo (iam.amazonaws.com/permitted: {permits})"));
    say("creating pod demo/app (iam.amazonaws.com/role: demo-app) and pod demo/no-role");
    let app = demo.add_pod("demo", "app", Some("demo-app"), Some(&permits)).await?;
    let no_role = demo.add_pod("demo", "no-role", None, None).await?;
    say(&format!("pod demo/app has IP {}, demo/no-role has IP {}", app.ip, no_role.ip));

    say("in demo/app: aws sts get-caller-identity (credentials from 169.254.169.254, no override)");
    let out =
        demo.command_in(&app, "aws")?.args(["sts", "get-caller-identity", "--output", "json"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{}", stdout.trim());
    let identity: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
    let arn = identity["Arn"].as_str().unwrap_or_default().to_string();
    if !out.status.success() || !arn.starts_with(&format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/demo-app/"))
    {
        bail!(
            "demo/app did not get its role: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            demo.agent_log()
        );
    }
    say(&format!("demo/app is {arn}"));

    say("in demo/no-role: aws sts get-caller-identity");
    let out = demo.command_in(&no_role, "aws")?.args(["sts", "get-caller-identity"]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("demo/no-role got credentials: {}", String::from_utf8_lossy(&out.stdout));
    }
    println!("{}", stderr.trim());
    let why = demo
        .command_in(&no_role, "curl")?
        .args([
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        ])
        .output()?;
    let why = String::from_utf8_lossy(&why.stdout);
    let (body, code) = why.trim().rsplit_once('\n').unwrap_or(("", why.trim()));
    say(&format!("why: the agent answers {} (HTTP {code})", body.trim()));
    say("tearing everything down");
    drop(demo);
    Ok(())
}

/// Where `scripts/demo.sh up` keeps its state.
pub fn state_dir() -> std::path::PathBuf {
    std::env::var("IMDSGATE_DEMO_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir().join("imdsgate-demo"))
}

/// The script's path, for messages.
pub fn script() -> String {
    workspace_root().join("scripts/demo.sh").display().to_string()
}
