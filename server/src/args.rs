//! The server's flags (clap), the placement flags it shares with `explain`, and their validation
//! into a `Validated` configuration that [`crate::run`] serves.

use crate::admission::{self, webhook_server};
use crate::explain;
use crate::grpc::tls_server;
use anyhow::{Context, anyhow};
use clap::Parser;
use imdsgate_core::common_args::CommonArgs;
use imdsgate_core::process::{bad_config, init_logging, parse_args, parse_duration};
use imdsgate_core::role::BaseArn;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// imdsgate-server: authorizes each pod's IAM role and obtains its credentials from STS.
///
/// `imdsgate-server explain <namespace>/<pod>` (or `--file pod.yaml`) says step by step whether a
/// pod gets its role, and why not; see `imdsgate-server explain --help`.
#[derive(Debug, Parser)]
#[command(name = "imdsgate-server", version)]
pub struct Args {
    /// Address of the gRPC (mutual TLS) listener for agents.
    #[arg(long, env = "IMDSGATE_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP listener (/healthz, /readyz, /metrics).
    #[arg(long, env = "IMDSGATE_ADMIN_LISTEN", default_value = "0.0.0.0:9610")]
    pub admin_listen: SocketAddr,

    /// Server certificate (PEM) presented to agents; re-read when it changes.
    #[arg(long, env = "IMDSGATE_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// Private key (PEM) of the server certificate; re-read when it changes.
    #[arg(long, env = "IMDSGATE_TLS_KEY")]
    pub tls_key: PathBuf,

    /// CA (PEM) that signs agent client certificates; a client certificate is required.
    #[arg(long, env = "IMDSGATE_TLS_CLIENT_CA")]
    pub tls_client_ca: PathBuf,

    /// Base joined to role names in pod annotations, e.g. arn:aws:iam::123456789012:role/.
    #[arg(long, env = "IMDSGATE_ROLE_BASE_ARN", conflicts_with = "role_base_arn_autodetect")]
    pub role_base_arn: Option<String>,

    /// Derive the base ARN from the server's own identity (STS GetCallerIdentity).
    #[arg(long, env = "IMDSGATE_ROLE_BASE_ARN_AUTODETECT")]
    pub role_base_arn_autodetect: bool,

    /// AWS region for STS (default: aws-config's chain, e.g. AWS_REGION).
    #[arg(long, env = "IMDSGATE_REGION")]
    pub region: Option<String>,

    /// STS endpoint URL override (AWS_ENDPOINT_URL_STS also works).
    #[arg(long, env = "IMDSGATE_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,

    /// An intermediate role the server assumes first; pod roles are assumed from it.
    #[arg(long, env = "IMDSGATE_ASSUME_ROLE_ARN")]
    pub assume_role_arn: Option<String>,

    /// Lifetime of pod sessions (15m to 12h; the role's maximum session duration must allow it).
    #[arg(long, env = "IMDSGATE_SESSION_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub session_duration: Duration,

    /// Add EKS Pod Identity session tags (kubernetes-namespace, -pod-name, -pod-uid,
    /// -service-account, eks-cluster-name); roles must trust sts:TagSession.
    #[arg(long, env = "IMDSGATE_SESSION_TAGS")]
    pub session_tags: bool,

    /// Cluster name for the eks-cluster-name session tag.
    #[arg(long, env = "IMDSGATE_CLUSTER_NAME")]
    pub cluster_name: Option<String>,

    /// Most STS AssumeRole calls per second (0: no limit).
    #[arg(long, env = "IMDSGATE_STS_MAX_RPS", default_value_t = 200.0)]
    pub sts_max_rps: f64,

    /// The agents' ServiceAccount, <namespace>:<name>; other callers are refused.
    #[arg(long, env = "IMDSGATE_AGENT_SERVICE_ACCOUNT", default_value = "imdsgate:imdsgate-agent")]
    pub agent_service_account: String,

    /// Audience of the agents' projected ServiceAccount tokens.
    #[arg(long, env = "IMDSGATE_AGENT_TOKEN_AUDIENCE", default_value = "imdsgate")]
    pub agent_token_audience: String,

    /// Accept agent tokens that are not bound to a node (then any agent may ask for any pod).
    #[arg(long, env = "IMDSGATE_ALLOW_UNBOUND_AGENTS")]
    pub allow_unbound_agents: bool,

    // --kubeconfig and --log-format, declared once for both binaries.
    #[command(flatten)]
    pub common: CommonArgs,

    /// How long SIGTERM waits for in-flight requests.
    #[arg(long, env = "IMDSGATE_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How long a request for a pod not yet in this server's watch waits for it to arrive.
    #[arg(long, env = "IMDSGATE_POD_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub pod_wait: Duration,

    /// Address of the admission webhook's HTTPS listener (POST /validate/pods); off when unset.
    #[arg(long, env = "IMDSGATE_WEBHOOK_LISTEN", requires_all = ["webhook_tls_cert", "webhook_tls_key"])]
    pub webhook_listen: Option<SocketAddr>,

    /// Webhook serving certificate (PEM); re-read when it changes.
    #[arg(long, env = "IMDSGATE_WEBHOOK_TLS_CERT")]
    pub webhook_tls_cert: Option<PathBuf>,

    /// Webhook serving key (PEM); re-read when it changes.
    #[arg(long, env = "IMDSGATE_WEBHOOK_TLS_KEY")]
    pub webhook_tls_key: Option<PathBuf>,

    #[command(flatten)]
    pub policy: PolicyArgs,

    /// What the webhook does with a pod whose role or session name it would refuse: enforce
    /// (refuse it) or warn (admit it with an admission warning, counted in
    /// imdsgate_server_admissions_total{decision="warned"}; for migrations from kiam or
    /// kube2iam). Server-node placement and hostNetwork are refused in both modes.
    #[arg(long, env = "IMDSGATE_WEBHOOK_MODE", value_enum, default_value = "enforce")]
    pub webhook_mode: admission::WebhookMode,

    /// This pod's name, to tell replicas apart in Events (from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
}

/// What decides placement and admission, shared by the server and `imdsgate-server explain`
/// (same flags, same environment variables: run inside the server's pod, explain sees the
/// server's own configuration).
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyArgs {
    /// Labels of the server nodes, key=value[,key=value]; pods may not be placed there.
    #[arg(long, env = "IMDSGATE_SERVER_NODE_SELECTOR", default_value = "imdsgate.io/server-node=true")]
    pub server_node_selector: String,

    /// The server nodes' taint, key[=value]:Effect; pods tolerating it are refused.
    #[arg(long, env = "IMDSGATE_SERVER_NODE_TAINT", default_value = "imdsgate.io/server-node:NoSchedule")]
    pub server_node_taint: String,

    /// Admit hostNetwork pods without a role annotation outside the exempt namespaces. Unsafe:
    /// such a pod's requests to 169.254.169.254 never pass the agent and reach the node's own
    /// IAM role. By default they are refused.
    #[arg(long, env = "IMDSGATE_ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,

    /// A pod label, key=value, that admits a hostNetwork pod (without a role) anyway, for node
    /// agents such as node-exporter. Whoever may set it on a pod may read the node's role: pair it
    /// with a policy on who sets it, or prefer exempt namespaces. Off by default.
    #[arg(long, env = "IMDSGATE_HOST_NETWORK_EXEMPT_LABEL")]
    pub host_network_exempt_label: Option<String>,

    /// Namespaces the webhook lets through unchecked (comma-separated).
    #[arg(
        long,
        env = "IMDSGATE_WEBHOOK_EXEMPT_NAMESPACES",
        value_delimiter = ',',
        default_value = "imdsgate,kube-system"
    )]
    pub webhook_exempt_namespaces: Vec<String>,
}

impl PolicyArgs {
    /// The webhook's configuration these flags describe.
    pub fn admission_config(
        &self,
        mode: admission::WebhookMode,
    ) -> anyhow::Result<admission::AdmissionConfig> {
        Ok(admission::AdmissionConfig {
            mode,
            server_node_labels: self.server_node_labels()?,
            server_taint: self.server_node_taint.parse().map_err(|e| anyhow!("--server-node-taint: {e}"))?,
            allow_host_network: self.allow_host_network,
            host_network_exempt_label: match &self.host_network_exempt_label {
                Some(label) => {
                    let parsed = admission::placement::parse_selector(label)
                        .map_err(|e| anyhow!("--host-network-exempt-label: {e}"))?;
                    match parsed.into_iter().collect::<Vec<_>>().as_slice() {
                        [one] => Some(one.clone()),
                        _ => return Err(anyhow!("--host-network-exempt-label takes one key=value")),
                    }
                }
                None => None,
            },
            exempt_namespaces: self.exempt_namespaces(),
        })
    }

    pub fn server_node_labels(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        admission::placement::parse_selector(&self.server_node_selector)
            .map_err(|e| anyhow!("--server-node-selector: {e}"))
    }

    pub fn exempt_namespaces(&self) -> std::collections::HashSet<String> {
        self.webhook_exempt_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect()
    }
}

/// Checked configuration, ready to run.
pub(crate) struct Validated {
    pub(crate) args: Args,
    pub(crate) base_arn: Option<BaseArn>,
    pub(crate) server_node_labels: std::collections::BTreeMap<String, String>,
    pub(crate) tls: Arc<imdsgate_core::tls::Reloading<rustls::ServerConfig>>,
    pub(crate) webhook:
        Option<(Arc<imdsgate_core::tls::Reloading<rustls::ServerConfig>>, admission::AdmissionConfig)>,
}

impl Args {
    /// Parses the command line and runs until shutdown; returns the process exit code.
    /// `imdsgate-server explain …` explains a pod's decision instead ([`explain`]).
    pub fn parse_and_run() -> ExitCode {
        if std::env::args_os().nth(1).is_some_and(|a| a == "explain") {
            return explain::ExplainArgs::parse_and_run();
        }
        let args = match parse_args::<Args>() {
            Ok(args) => args,
            Err(code) => return code,
        };
        init_logging(args.common.log_format);
        let validated = match args.validate() {
            Ok(v) => v,
            Err(error) => return bad_config(format!("{error:#}")),
        };
        imdsgate_core::process::run_to_exit("imdsgate-server", validated.serve())
    }

    fn validate(self) -> anyhow::Result<Validated> {
        let min = Duration::from_secs(15 * 60);
        let max = Duration::from_secs(12 * 3600);
        if self.session_duration < min || self.session_duration > max {
            return Err(anyhow!(
                "--session-duration must be between 15m and 12h, not {:?}",
                self.session_duration
            ));
        }
        if !(self.sts_max_rps == 0.0 || (0.01..=100_000.0).contains(&self.sts_max_rps)) {
            return Err(anyhow!("--sts-max-rps must be 0 (no limit) or between 0.01 and 100000"));
        }
        if self.pod_wait > Duration::from_secs(10) {
            return Err(anyhow!("--pod-wait must be at most 10s"));
        }
        if self.agent_service_account.split_once([':', '/']).is_none() {
            return Err(anyhow!(
                "--agent-service-account must be <namespace>:<name>, not {:?}",
                self.agent_service_account
            ));
        }
        let base_arn =
            self.role_base_arn.as_deref().map(BaseArn::parse).transpose().context("--role-base-arn")?;
        let server_node_labels = self.policy.server_node_labels()?;
        let admission_config = self.policy.admission_config(self.webhook_mode)?;
        let tls = tls_server::reloading_config(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
        )
        .context("TLS files")?;
        let webhook = match (&self.webhook_listen, &self.webhook_tls_cert, &self.webhook_tls_key) {
            (Some(_), Some(cert), Some(key)) => {
                let tls = webhook_server::reloading_config(cert.clone(), key.clone())
                    .context("webhook TLS files")?;
                let config = admission_config;
                Some((tls, config))
            }
            _ => None,
        };
        Ok(Validated { args: self, base_arn, server_node_labels, tls, webhook })
    }
}
