//! imdsgate server: the only part of imdsgate with AWS rights. It watches every pod and namespace,
//! decides whether a pod may have the role it asks for, obtains credentials from STS, caches and
//! refreshes them, and answers agents over mutual-TLS gRPC.
#![forbid(unsafe_code)]

pub mod admission;
pub mod agent_auth;
pub mod authorizer;
pub mod credential_cache;
pub mod events;
pub mod explain;
pub mod metrics;
pub mod namespace_index;
pub mod pending_pods;
pub mod policy;
pub mod revocation;
pub mod role;
pub mod server_nodes;
pub mod service;
pub mod session;
pub mod sts;
pub mod tls_server;
pub mod webhook_server;

use anyhow::{Context, anyhow};
use clap::Parser;
use futures::StreamExt;
use imdsgate_core::admin::Admin;
use imdsgate_core::common_args::CommonArgs;
use imdsgate_core::pod_index::Change;
use imdsgate_core::process::{bad_config, init_logging, parse_args, parse_duration};
use imdsgate_core::watch::{self, Synced, Update};
use imdsgate_core::{PodIndex, PodInfo};
use imdsgate_proto::v1::credentials_server::CredentialsServer;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::runtime::{WatchStreamExt, watcher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::agent_auth::AgentAuthenticator;
use crate::authorizer::Authorizer;
use crate::credential_cache::{CacheConfig, CredentialCache, StsError};
use crate::metrics::{Metrics, WatchKind, WatchLabels};
use crate::namespace_index::NamespaceIndex;
use crate::revocation::Revocations;
use crate::role::{BaseArn, RoleBase};
use crate::service::CredentialsService;
use crate::session::TagConfig;
use crate::sts::{Sts, StsConfig};

const REFRESH_EVERY: Duration = Duration::from_secs(15);
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How often the certificate expiry metric re-reads the TLS files.
const CERT_EXPIRY_EVERY: Duration = Duration::from_secs(60);
/// `--role-base-arn-autodetect` retries GetCallerIdentity after this long, doubling up to
/// [`DETECT_RETRY_MAX`].
const DETECT_RETRY_FIRST: Duration = Duration::from_secs(1);
const DETECT_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long the start waits for the first attempt before it goes on without the base.
const DETECT_FIRST_WAIT: Duration = Duration::from_secs(5);

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
                    let parsed = admission::parse_selector(label)
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
        admission::parse_selector(&self.server_node_selector)
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
struct Validated {
    args: Args,
    base_arn: Option<BaseArn>,
    server_node_labels: std::collections::BTreeMap<String, String>,
    tls: Arc<imdsgate_core::tls::Reloading<rustls::ServerConfig>>,
    webhook: Option<(Arc<imdsgate_core::tls::Reloading<rustls::ServerConfig>>, admission::AdmissionConfig)>,
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

impl Validated {
    async fn serve(self) -> anyhow::Result<ExitCode> {
        let Validated { args, base_arn, server_node_labels, tls, webhook } = self;
        let client = match imdsgate_core::process::kube_client(args.common.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(error) => return Ok(bad_config(format!("Kubernetes client: {error:#}"))),
        };
        let metrics = Metrics::new();
        let sts_config = StsConfig {
            region: args.region.clone(),
            endpoint: args.sts_endpoint.clone(),
            intermediate_role: args.assume_role_arn.clone(),
            max_rps: args.sts_max_rps,
        };
        let sts = Arc::new(Sts::connect(&sts_config, metrics.clone()).await);
        let base_arn = if args.role_base_arn_autodetect {
            RoleBase::detecting()
        } else {
            metrics.aws_identity_ready.set(1);
            RoleBase::fixed(base_arn)
        };
        let pods = Arc::new(PodIndex::new());
        let namespaces = Arc::new(NamespaceIndex::new());
        let authorizer = Arc::new(Authorizer {
            pods: pods.clone(),
            namespaces: namespaces.clone(),
            base_arn,
            tags: TagConfig { enabled: args.session_tags, cluster_name: args.cluster_name.clone() },
        });
        if args.role_base_arn_autodetect {
            // Detection goes on in the background until it succeeds: a server whose own AWS
            // credentials fail still starts, serves the webhook and says why pods get nothing,
            // rather than crash-loop. Its first attempt is given a few seconds, so that normally
            // the base is known before the first request.
            let (first_done, first) = tokio::sync::oneshot::channel();
            tokio::spawn(detect_base_arn(sts.clone(), authorizer.clone(), metrics.clone(), first_done));
            let _ = tokio::time::timeout(DETECT_FIRST_WAIT, first).await;
        }

        let grpc_listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => return Ok(bad_config(format!("cannot listen on --listen {}: {e}", args.listen))),
        };
        let admin_listener = match tokio::net::TcpListener::bind(args.admin_listen).await {
            Ok(l) => l,
            Err(e) => {
                return Ok(bad_config(format!("cannot listen on --admin-listen {}: {e}", args.admin_listen)));
            }
        };
        let webhook_listener = match args.webhook_listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => return Ok(bad_config(format!("cannot listen on --webhook-listen {addr}: {e}"))),
            },
            None => None,
        };
        tls.spawn_watch(TLS_RELOAD_EVERY);

        let cache = CredentialCache::new(
            Arc::new(sts.clone()),
            CacheConfig::new(args.session_duration),
            metrics.clone(),
        );
        let authn = Arc::new(AgentAuthenticator::new(
            Arc::new(client.clone()),
            &args.agent_token_audience,
            &args.agent_service_account,
            args.allow_unbound_agents,
        ));
        let events = Arc::new(events::DenialEvents::new(Some(client.clone()), args.pod_name.clone()));
        let revocations = Revocations::new(authorizer.clone(), cache.clone(), metrics.clone());

        let ns_synced = Synced::default();
        let pods_synced = Synced::default();
        let ns_task = tokio::spawn(watch_namespaces(
            client.clone(),
            namespaces.clone(),
            revocations.clone(),
            ns_synced.clone(),
            metrics.clone(),
        ));
        let pending = Arc::new(pending_pods::PendingPods::default());
        let pod_task = tokio::spawn(watch_pods(
            client.clone(),
            PodWatch {
                pods: pods.clone(),
                pending: pending.clone(),
                authorizer: authorizer.clone(),
                cache: cache.clone(),
                revocations: revocations.clone(),
                metrics: metrics.clone(),
            },
            ns_synced.clone(),
            pods_synced.clone(),
        ));
        let refresher = {
            let pods = pods.clone();
            // A pod waiting for its IP keeps the session fetched for it ahead of the IP.
            cache.spawn_refresher(REFRESH_EVERY, move |uid| {
                pods.by_uid(uid).is_some() || pending.contains(uid)
            })
        };
        let server_nodes = Arc::new(server_nodes::ServerNodes::new(server_node_labels));
        let node_task = tokio::spawn(watch_nodes(client.clone(), server_nodes.clone(), metrics.clone()));
        let intruder_task = tokio::spawn(server_nodes::report(
            client.clone(),
            server_nodes,
            args.policy.exempt_namespaces(),
            events.clone(),
            metrics.clone(),
        ));

        let ready = {
            let (ns, pods) = (ns_synced.clone(), pods_synced.clone());
            Arc::new(move || match (ns.get(), pods.get()) {
                (true, true) => Ok(()),
                (false, _) => Err("namespace watch has not synced".to_string()),
                (_, false) => Err("pod watch has not synced".to_string()),
            })
        };
        let shutdown = imdsgate_core::process::Shutdown::default();
        let admin = Admin { registry: metrics.registry(), ready, ready_gauge: metrics.ready.clone() };
        let mut certificates =
            vec![("server", args.tls_cert.clone()), ("client_ca", args.tls_client_ca.clone())];
        certificates.extend(args.webhook_tls_cert.clone().map(|cert| ("webhook", cert)));
        tokio::spawn(imdsgate_core::cert_expiry::watch(
            metrics.certificate_expiry.clone(),
            certificates,
            CERT_EXPIRY_EVERY,
        ));
        let admin_task = tokio::spawn(admin.serve(admin_listener, shutdown.wait()));

        let (health, health_service) = tonic_health::server::health_reporter();
        {
            let health = health.clone();
            let (ns, pods) = (ns_synced.clone(), pods_synced.clone());
            tokio::spawn(async move {
                ns.wait().await;
                pods.wait().await;
                health.set_serving::<CredentialsServer<CredentialsService>>().await;
                tracing::info!("watches synced; serving");
            });
        }
        let webhook_task = match (webhook, webhook_listener) {
            (Some((webhook_tls, config)), Some(listener)) => {
                webhook_tls.spawn_watch(TLS_RELOAD_EVERY);
                let admission = Arc::new(admission::Admission {
                    config,
                    authorizer: authorizer.clone(),
                    client: Some(client.clone()),
                    metrics: metrics.clone(),
                });
                tokio::spawn(webhook_server::serve(listener, webhook_tls, admission, shutdown.wait()))
            }
            _ => tokio::spawn(std::future::pending::<()>()),
        };
        let synced = {
            let (ns, pods) = (ns_synced.clone(), pods_synced.clone());
            Arc::new(move || ns.get() && pods.get())
        };
        let closing_streams = revocations.clone();
        let handshake_failures = metrics.tls_handshake_failures.clone();
        let service = CredentialsService {
            pod_wait: args.pod_wait,
            authn,
            authorizer,
            cache,
            events,
            revocations,
            synced,
            metrics,
        };
        let incoming = tls_server::incoming(grpc_listener, tls, handshake_failures);
        let grpc = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(CredentialsServer::new(service))
            .serve_with_incoming_shutdown(incoming, shutdown.wait());
        let mut grpc_task = tokio::spawn(grpc);
        tracing::info!(listen = %args.listen, admin = %args.admin_listen, "imdsgate-server started");

        let critical = vec![
            ("namespace watch", ns_task),
            ("pod watch", pod_task),
            ("credential refresher", refresher),
            ("node watch", node_task),
            ("server node scan", intruder_task),
            ("admin server", admin_task),
            ("webhook server", webhook_task),
        ];
        if let Err(why) = imdsgate_core::process::supervise(&mut grpc_task, critical).await {
            tracing::error!(why, "a critical task died; exiting so Kubernetes restarts the server");
            return Ok(ExitCode::FAILURE);
        }
        health.set_not_serving::<CredentialsServer<CredentialsService>>().await;
        // Revocation streams never end by themselves: close them, or the drain waits for them.
        closing_streams.close();
        shutdown.trigger();
        match tokio::time::timeout(args.shutdown_grace, grpc_task).await {
            Ok(_) => tracing::info!("drained; bye"),
            Err(_) => {
                tracing::warn!(grace = ?args.shutdown_grace, "in-flight requests did not finish within the grace period")
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// What the server's log says when it cannot learn its own identity (see the README's "The
/// server's own credentials").
const SERVER_CREDENTIALS_HINT: &str = "the server's own AWS credentials (or STS) fail, so it cannot determine its role base ARN (--role-base-arn-autodetect); pods get no credentials for role names until it can. Give the server credentials pods cannot reach: IRSA for its ServiceAccount (aws.credentialsSource=irsa), a metadata hop limit of 2 on the server node group only (instanceProfile), or server.hostNetwork=true; or set --role-base-arn";

/// `--role-base-arn-autodetect`: the base from the server's own identity (GetCallerIdentity),
/// retried with a capped exponential backoff until it succeeds; each failure is logged and is
/// what requests needing the base are told meanwhile. `first_done` hears when the first attempt
/// has ended, either way.
async fn detect_base_arn(
    sts: Arc<Sts>,
    authorizer: Arc<Authorizer>,
    metrics: Metrics,
    first_done: tokio::sync::oneshot::Sender<()>,
) {
    let mut first_done = Some(first_done);
    let mut retry = DETECT_RETRY_FIRST;
    loop {
        let detected = match sts.caller_arn().await {
            Ok(arn) => BaseArn::from_caller_arn(&arn).map_err(|e| format!("GetCallerIdentity: {e}")),
            Err(StsError::Denied(why)) => Err(format!("STS refused GetCallerIdentity: {why}")),
            Err(StsError::Unavailable(why)) => Err(format!("GetCallerIdentity failed: {why}")),
            Err(StsError::Deferred) => Err("GetCallerIdentity was deferred".into()),
        };
        match detected {
            Ok(base) => {
                tracing::info!(base = base.as_str(), "role base ARN detected");
                authorizer.base_arn.detected(base);
                metrics.aws_identity_ready.set(1);
                if let Some(done) = first_done.take() {
                    let _ = done.send(());
                }
                return;
            }
            Err(cause) => {
                tracing::error!(%cause, retry_in = ?retry, "{SERVER_CREDENTIALS_HINT}");
                authorizer.base_arn.failed(cause);
                if let Some(done) = first_done.take() {
                    let _ = done.send(());
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(DETECT_RETRY_MAX);
            }
        }
    }
}

async fn watch_namespaces(
    client: kube::Client,
    index: Arc<NamespaceIndex>,
    revocations: Revocations,
    synced: Synced,
    metrics: Metrics,
) {
    let stream = watcher(kube::Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    let restarts =
        metrics.watch_restarts.get_or_create(&WatchLabels { watch: WatchKind::Namespaces }).clone();
    watch::drive(
        "namespaces",
        stream,
        synced,
        |_| {
            restarts.inc();
        },
        |update| {
            let changed: Vec<String> = match update {
                Update::Apply(ns) => index.apply(&ns).into_iter().collect(),
                Update::Delete(ns) => index.delete(&ns).into_iter().collect(),
                Update::Reset(all) => index.reset(&all),
            };
            // A policy that changed may no longer permit roles that pods hold credentials for.
            revocations.recheck_namespaces(&changed);
            metrics.namespaces_indexed.set(index.len() as i64);
        },
    )
    .await;
}

async fn watch_nodes(client: kube::Client, nodes: Arc<server_nodes::ServerNodes>, metrics: Metrics) {
    let stream = watcher(kube::Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    let restarts = metrics.watch_restarts.get_or_create(&WatchLabels { watch: WatchKind::Nodes }).clone();
    watch::drive(
        "nodes",
        stream,
        Synced::default(),
        |_| {
            restarts.inc();
        },
        |update| match update {
            Update::Apply(node) => nodes.apply(&node),
            Update::Delete(node) => nodes.delete(&node),
            Update::Reset(all) => nodes.reset(&all),
        },
    )
    .await;
}

/// What the pod watch updates.
struct PodWatch {
    pods: Arc<PodIndex>,
    pending: Arc<pending_pods::PendingPods>,
    authorizer: Arc<Authorizer>,
    cache: CredentialCache,
    revocations: Revocations,
    metrics: Metrics,
}

impl PodWatch {
    fn changed(&self, change: Change) {
        match change {
            Change::Added(pod) => self.prefetch(&pod),
            Change::Updated { pod, identity_changed } => {
                if identity_changed {
                    self.revocations.revoke(&pod, imdsgate_proto::Reason::SessionChanged);
                }
                self.prefetch(&pod);
            }
            // Deleted, terminating, finished or without an IP: nothing more for it.
            Change::Removed(pod) => {
                if pod.role.is_some() {
                    self.revocations.revoke(&pod, imdsgate_proto::Reason::PodNotFound);
                }
                self.cache.pod_gone(&pod.uid);
            }
            Change::Unchanged => {}
        }
    }

    /// A pod that has no IP yet (just created, being scheduled, its sandbox starting) already
    /// names its role: its credentials are fetched now, so they are ready when its IP appears
    /// (the session does not depend on the IP; it is bound to the pod's UID and served only to
    /// the agent of the pod's node asking from the pod's IP). Repeated status updates of the
    /// same pending pod find the session cached or in flight and cost nothing.
    fn prefetch_before_ip(&self, pod: &Pod) {
        let info = PodInfo::describe(pod);
        if !info.uid.is_empty() {
            self.prefetch(&info);
        }
    }

    /// Keeps the pending set (pods with a role and no IP yet) up to date with one event: a pod
    /// pending is prefetched; one that leaves it without getting an IP (finished, deleted, its
    /// role removed) has its session dropped, as a pod leaving the index does.
    fn track_pending(&self, pod: &Pod) {
        match self.pending.apply(pod) {
            pending_pods::Pending::Yes => self.prefetch_before_ip(pod),
            pending_pods::Pending::Left => self.left_pending(pod.metadata.uid.as_deref().unwrap_or_default()),
            pending_pods::Pending::No => {}
        }
    }

    fn left_pending(&self, uid: &str) {
        if self.pods.by_uid(uid).is_none() {
            self.cache.pod_gone(uid);
        }
    }

    /// A pod with an IP and a permitted role gets its credentials fetched before it asks.
    fn prefetch(&self, pod: &PodInfo) {
        if !matches!(pod.phase.as_deref(), Some("Pending") | Some("Running")) || pod.role.is_none() {
            return;
        }
        if let Ok(key) = self.authorizer.session_for(pod) {
            self.cache.prefetch(key);
        }
    }
}

async fn watch_pods(client: kube::Client, state: PodWatch, ns_synced: Synced, synced: Synced) {
    // Prefetching needs namespace policies; start once they are known.
    ns_synced.wait().await;
    let stream = watcher(kube::Api::<Pod>::all(client), watcher::Config::default()).default_backoff();
    let restarts =
        state.metrics.watch_restarts.get_or_create(&WatchLabels { watch: WatchKind::Pods }).clone();
    watch::drive(
        "pods",
        stream.boxed(),
        synced,
        |_| {
            restarts.inc();
        },
        |update| {
            match update {
                Update::Apply(pod) => {
                    let change = state.pods.apply(&pod);
                    state.track_pending(&pod);
                    state.changed(change)
                }
                Update::Delete(pod) => {
                    state.changed(state.pods.delete(&pod));
                    if state.pending.delete(&pod) {
                        state.left_pending(pod.metadata.uid.as_deref().unwrap_or_default());
                    }
                }
                Update::Reset(all) => {
                    state.pods.reset(all.iter()).into_iter().for_each(|c| state.changed(c));
                    for uid in state.pending.reset(all.iter()) {
                        state.left_pending(&uid);
                    }
                    all.iter()
                        .filter(|pod| pending_pods::is_pending(pod))
                        .for_each(|pod| state.prefetch_before_ip(pod));
                }
            }
            state.metrics.pods_indexed.set(state.pods.len() as i64);
        },
    )
    .await;
}
