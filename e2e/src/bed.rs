//! The whole path on one node, ready for a test: the apiserver with the shipped RBAC, moto with the
//! roles, the server, a node namespace running the agent with its own iptables rule, and pod
//! namespaces whose Pod objects carry the given IPs and annotations. Tests drive it the way a pod
//! owner and an operator would: requests from inside pod namespaces, kubectl-like API calls.

use crate::components::{AgentProcess, AgentSetup, Pki, ServerProcess, TlsFiles, install_rbac};
use crate::netns::{NodeNs, PodNs};
use crate::tools::venv_bin;
use crate::{Cluster, PodSpec, Sts};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use std::process::{Command, Output};

/// The node every bed pod runs on.
pub const NODE: &str = "node-a";
/// The account moto and the server's role base use.
pub const ACCOUNT: &str = "123456789012";

/// A pod the bed creates: a Pod object with this IP and annotations, and a namespace joined to
/// the node that sends its traffic from that IP.
#[derive(Clone, Debug)]
pub struct BedPod {
    pub namespace: &'static str,
    pub name: &'static str,
    pub ip: &'static str,
    /// A second, IPv6 address (a dual-stack pod).
    pub ipv6: Option<&'static str>,
    pub annotations: Vec<(&'static str, &'static str)>,
    pub finalizers: Vec<&'static str>,
    /// Whether a Pod object exists; `false`: an address on the node that no pod owns.
    pub object: bool,
}

impl BedPod {
    pub fn new(namespace: &'static str, name: &'static str, ip: &'static str) -> BedPod {
        BedPod {
            namespace,
            name,
            ip,
            ipv6: None,
            annotations: Vec::new(),
            finalizers: Vec::new(),
            object: true,
        }
    }

    /// An address on the node with no Pod object behind it; found as `ghost/<name>`.
    pub fn ghost(name: &'static str, ip: &'static str) -> BedPod {
        BedPod { object: false, ..BedPod::new("ghost", name, ip) }
    }

    pub fn ipv6(mut self, ip: &'static str) -> BedPod {
        self.ipv6 = Some(ip);
        self
    }

    pub fn role(self, role: &'static str) -> BedPod {
        self.annotation("iam.amazonaws.com/role", role)
    }

    pub fn annotation(mut self, key: &'static str, value: &'static str) -> BedPod {
        self.annotations.push((key, value));
        self
    }

    pub fn finalizer(mut self, name: &'static str) -> BedPod {
        self.finalizers.push(name);
        self
    }
}

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct BedPlan {
    /// Namespaces with their `iam.amazonaws.com/permitted` regular expression.
    pub namespaces: Vec<(&'static str, &'static str)>,
    /// Roles to create in moto.
    pub roles: Vec<&'static str>,
    pub pods: Vec<BedPod>,
    pub agent_args: Vec<String>,
    pub server_args: Vec<String>,
    /// Serve the admission webhook (on loopback, with the server certificate).
    pub webhook: bool,
}

/// See the module documentation.
pub struct AgentBed {
    pub cluster: Cluster,
    pub sts: Sts,
    pub tls: TlsFiles,
    pub server: ServerProcess,
    /// The webhook's address, when the plan asked for it.
    pub webhook: Option<std::net::SocketAddr>,
    pub pki: Pki,
    pub node: NodeNs,
    pub agent_pod: Pod,
    pub agent: Option<AgentProcess>,
    /// The server's host as the agent resolves it in the node namespace.
    pub server_host: &'static str,
    /// Pod namespaces by `namespace/name` of the Pod object first created at their IP.
    pods: BTreeMap<String, PodNs>,
}

impl AgentBed {
    pub async fn start(plan: BedPlan) -> Result<AgentBed> {
        Self::start_with(plan, |_| None).await
    }

    /// [`AgentBed::start`], with the server's STS endpoint chosen once moto runs (`None`: moto
    /// itself; a fault-injecting proxy in front of it, say).
    pub async fn start_with(
        plan: BedPlan,
        sts_endpoint: impl FnOnce(&Sts) -> Option<String>,
    ) -> Result<AgentBed> {
        let (cluster, sts) = tokio::join!(Cluster::start(), Sts::start());
        let (cluster, sts) = (cluster?, sts?);
        install_rbac(&cluster)?;
        for role in &plan.roles {
            sts.create_role(role)?;
        }
        cluster.create_node(NODE).await?;
        let agent_pod = cluster
            .create_pod(
                &PodSpec::new("imdsgate", "agent-a", NODE).service_account("imdsgate-agent").host_network(),
            )
            .await?;
        for (namespace, permitted) in &plan.namespaces {
            cluster.create_namespace(namespace, &[("iam.amazonaws.com/permitted", permitted)]).await?;
        }
        let node = NodeNs::create("10.200.0.1".parse()?)?;
        let mut pods = BTreeMap::new();
        for pod in &plan.pods {
            if pod.object {
                create_pod_object(&cluster, pod).await?;
            }
            let ns = node.add_pod(pod.ip.parse()?)?;
            if let Some(v6) = pod.ipv6 {
                node.add_pod_ipv6(&ns, v6.parse()?)?;
            }
            node.forward_to_host_from_pod(&ns, sts.port()).await?;
            pods.insert(format!("{}/{}", pod.namespace, pod.name), ns);
        }
        let pki = Pki::new()?;
        let tls = pki.files();
        let mut server_args = vec![format!("--role-base-arn=arn:aws:iam::{ACCOUNT}:role/")];
        let webhook = match plan.webhook {
            true => Some(std::net::SocketAddr::from(([127, 0, 0, 1], crate::process::free_port()?))),
            false => None,
        };
        if let Some(addr) = webhook {
            server_args.push(format!("--webhook-listen={addr}"));
            server_args.push(format!("--webhook-tls-cert={}", tls.server_cert.display()));
            server_args.push(format!("--webhook-tls-key={}", tls.server_key.display()));
        }
        server_args.extend(plan.server_args.iter().cloned());
        let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
        let endpoint = sts_endpoint(&sts).unwrap_or_else(|| sts.endpoint().to_string());
        let server = ServerProcess::start_at(&cluster, &endpoint, &tls, &server_args)
            .await
            .context("server starts")?;
        node.forward_to_host(cluster.port()).await?;
        node.forward_to_host(server.grpc.port()).await?;
        let mut bed = AgentBed {
            cluster,
            sts,
            tls,
            server,
            webhook,
            pki,
            node,
            agent_pod,
            agent: None,
            server_host: "127.0.0.1",
            pods,
        };
        let agent_args: Vec<&str> = plan.agent_args.iter().map(String::as_str).collect();
        bed.agent = Some(AgentProcess::start(&bed.setup(), &agent_args).await.context("agent starts")?);
        Ok(bed)
    }

    pub fn setup(&self) -> AgentSetup<'_> {
        AgentSetup {
            cluster: &self.cluster,
            tls: &self.tls,
            node: &self.node,
            node_name: NODE,
            server_host: self.server_host,
            server_port: self.server.grpc.port(),
            agent_pod: &self.agent_pod,
        }
    }

    /// The pod namespace first created for `namespace/name`.
    pub fn pod(&self, key: &str) -> &PodNs {
        self.pods.get(key).unwrap_or_else(|| panic!("no bed pod {key}"))
    }

    pub fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("the agent runs")
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }

    /// `curl -s -m 5 <args>` inside a pod namespace.
    pub fn curl(&self, pod: &PodNs, args: &[&str]) -> Output {
        pod.command("curl").args(["-s", "-m", "5"]).args(args).output().expect("curl runs")
    }

    /// GETs a metadata path from a pod: (HTTP status, body); status 0 when nothing answered.
    pub fn imds_get(&self, pod: &PodNs, path: &str) -> (u16, String) {
        let out = self.curl(pod, &["-w", "\n%{http_code}", &format!("http://169.254.169.254{path}")]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The AccessKeyId a pod is handed for `role`, or the status it got instead.
    pub fn access_key(&self, pod: &PodNs, role: &str) -> Result<String, u16> {
        let (status, body) =
            self.imds_get(pod, &format!("/latest/meta-data/iam/security-credentials/{role}"));
        if status != 200 {
            return Err(status);
        }
        let doc: serde_json::Value = serde_json::from_str(&body).map_err(|_| 0u16)?;
        doc["AccessKeyId"].as_str().map(str::to_string).ok_or(0)
    }

    /// `program` in a pod namespace with a clean AWS environment: no credentials, no config
    /// files, no IMDS endpoint override, STS at the emulator.
    pub fn aws_env(&self, pod: &PodNs, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = pod.command(program);
        let home = self.agent.as_ref().map(|a| a.state_dir().display().to_string()).unwrap_or("/tmp".into());
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_ENDPOINT_URL_STS", format!("http://127.0.0.1:{}", self.sts.port()))
            .env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "2");
        cmd
    }

    /// `aws sts get-caller-identity` (botocore) in a pod namespace: the ARN, or stderr.
    pub fn caller_arn(&self, pod: &PodNs) -> Result<String, String> {
        let out = self.aws_cli(pod);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// The raw output of `aws sts get-caller-identity --query Arn --output text` in a pod.
    pub fn aws_cli(&self, pod: &PodNs) -> Output {
        self.aws_env(pod, venv_bin("aws").expect("aws CLI in the venv"))
            .args(["sts", "get-caller-identity", "--query", "Arn", "--output", "text"])
            .output()
            .expect("aws CLI runs")
    }

    /// Creates another Pod object at the IP of an existing pod namespace (IP reuse).
    pub async fn create_pod_object(&self, pod: &BedPod) -> Result<()> {
        create_pod_object(&self.cluster, pod).await
    }
}

async fn create_pod_object(cluster: &Cluster, pod: &BedPod) -> Result<()> {
    let mut spec = PodSpec::new(pod.namespace, pod.name, NODE);
    for (k, v) in &pod.annotations {
        spec = spec.annotation(k, v);
    }
    for f in &pod.finalizers {
        spec = spec.finalizer(f);
    }
    cluster.create_pod(&spec).await?;
    let ips: Vec<&str> = std::iter::once(pod.ip).chain(pod.ipv6).collect();
    cluster.set_pod_status(pod.namespace, pod.name, &ips, "Running").await?;
    Ok(())
}
