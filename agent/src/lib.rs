//! imdsgate agent: runs on every node. An iptables rule sends pod traffic for the metadata address
//! to it; it names the calling pod by source IP from a watch of its own node's pods and answers the
//! EC2 instance metadata API (IMDSv2 included) with the pod's role, getting credentials from the
//! imdsgate server.
#![forbid(unsafe_code)]

pub mod credentials;
pub mod imds;
pub mod interception;
pub mod metrics;
pub mod uninstall;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use imdsgate_core::PodIndex;
use imdsgate_core::admin::Admin;
use imdsgate_core::common_args::CommonArgs;
use imdsgate_core::http_server::Budget;
use imdsgate_core::pod_index::Change;
use imdsgate_core::process::{bad_config, init_logging, parse_args, parse_duration};
use imdsgate_core::watch::{self, Synced, Update};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::credentials::credential_cache::CredentialCache;
use crate::credentials::server_client::{ServerClient, ServerClientConfig};
use crate::credentials::{revocation, server_client};
use crate::imds::Imds;
use crate::imds::token::TokenKey;
use crate::imds::upstream::{AllowList, HttpUpstream, Upstream};
use crate::imds::{listener, refusal_events};
use crate::interception::{Interception, InterfaceMatch};
use crate::metrics::{FamilyLabels, Metrics};

const SERVER_REFRESH_EVERY: Duration = Duration::from_secs(30);
const SERVER_HEALTH_EVERY: Duration = Duration::from_secs(5);
/// How often the certificate expiry metric re-reads the TLS files.
const CERT_EXPIRY_EVERY: Duration = Duration::from_secs(60);

/// imdsgate-agent: answers the EC2 instance metadata API for the pods of one node.
#[derive(Debug, Parser)]
#[command(name = "imdsgate-agent", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// This node's name; only its pods are watched and served (downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// This node's IP: the DNAT target, and requests from it are refused (downward API:
    /// status.hostIP).
    #[arg(long, env = "HOST_IP", global = true)]
    pub host_ip: Option<IpAddr>,

    /// This node's IPv6 address, the DNAT target for the IPv6 metadata endpoint. Without it the
    /// IPv6 rule REDIRECTs to --listen's port on the address of the interface a request arrives on.
    #[arg(long, env = "HOST_IPV6", global = true)]
    pub host_ipv6: Option<IpAddr>,

    /// Address of the IMDS listener that the iptables rules redirect to. The default `[::]` takes
    /// IPv4 and IPv6 (IPv4 only where the kernel has no IPv6).
    #[arg(long, env = "IMDSGATE_LISTEN", default_value = "[::]:8183", global = true)]
    pub listen: SocketAddr,

    /// Address of the admin HTTP listener (/healthz, /readyz, /metrics). The manifests bind it to
    /// the node's IP ($(HOST_IP):8184), where the kubelet's probes and Prometheus reach it.
    #[arg(long, env = "IMDSGATE_ADMIN_LISTEN", default_value = "0.0.0.0:8184", global = true)]
    pub admin_listen: SocketAddr,

    /// Install the iptables rule that redirects pod traffic for 169.254.169.254:80 to --listen.
    #[arg(long, env = "IMDSGATE_IPTABLES")]
    pub iptables: bool,

    /// Interfaces pod traffic arrives on (repeatable or comma-separated): veth+, eni+, cali+, !eth0.
    /// None: every interface.
    #[arg(long = "host-interface", env = "IMDSGATE_HOST_INTERFACE", value_delimiter = ',', global = true)]
    pub host_interfaces: Vec<InterfaceMatch>,

    /// Also intercept the IPv6 metadata endpoint [fd00:ec2::254]:80 (ip6tables); on by default,
    /// `--ipv6=false` to opt out. Where ip6tables' nat table cannot be used the agent warns and
    /// intercepts IPv4 only (there is then no IPv6 path to intercept).
    #[arg(
        long,
        env = "IMDSGATE_IPV6",
        global = true,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub ipv6: bool,

    /// How long a request from an IP not yet known waits for the pod watch to deliver it.
    #[arg(long, env = "IMDSGATE_POD_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub pod_wait: Duration,

    /// File with the key that signs IMDSv2 tokens; generated when missing. Keep it on the node
    /// (hostPath) so tokens survive agent restarts.
    #[arg(long, env = "IMDSGATE_TOKEN_KEY_FILE", default_value = "/var/lib/imdsgate/token.key")]
    pub token_key_file: PathBuf,

    /// Refuse metadata requests without an IMDSv2 session token.
    #[arg(long, env = "IMDSGATE_REQUIRE_IMDSV2")]
    pub require_imdsv2: bool,

    /// The real metadata service, for allow-listed paths ("none" disables proxying).
    #[arg(long, env = "IMDSGATE_METADATA_UPSTREAM", default_value = "http://169.254.169.254")]
    pub metadata_upstream: String,

    /// Regular expression of a path that may be proxied (repeatable); replaces the default list
    /// (placement/*, instance-type, instance-id, local-ipv4, hostname, local-hostname, mac,
    /// dynamic/instance-identity/document). iam/* and identity-credentials/* are never proxied.
    #[arg(long = "allow-path", env = "IMDSGATE_ALLOW_PATH", value_delimiter = ',')]
    pub allow_paths: Vec<String>,

    /// The imdsgate server, e.g. https://imdsgate-server.imdsgate.svc:8443; every address the name
    /// resolves to is used.
    #[arg(long, env = "IMDSGATE_SERVER")]
    pub server: Option<String>,

    /// Name to verify in the server's certificate (default: the host of --server).
    #[arg(long, env = "IMDSGATE_SERVER_NAME")]
    pub server_name: Option<String>,

    /// Agent client certificate (PEM); re-read when it changes.
    #[arg(long, env = "IMDSGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the agent certificate; re-read when it changes.
    #[arg(long, env = "IMDSGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that signs the server's certificate.
    #[arg(long, env = "IMDSGATE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Projected ServiceAccount token (audience imdsgate) sent to the server; re-read when rotated.
    #[arg(long, env = "IMDSGATE_IDENTITY_TOKEN_FILE", default_value = "/var/run/secrets/imdsgate/token")]
    pub identity_token_file: PathBuf,

    /// Most IMDS requests from this node's pods served at once; more get 503 (SDKs retry).
    #[arg(long, env = "IMDSGATE_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,

    /// Most of --max-concurrent-requests one pod may hold at once; more get 503.
    #[arg(long, env = "IMDSGATE_MAX_REQUESTS_PER_POD", default_value_t = 64)]
    pub max_requests_per_pod: usize,

    /// Most IMDS requests served at once, on top of --max-concurrent-requests, from addresses
    /// that are not a known pod of this node (a pod the watch has not delivered yet, others), at
    /// most 4 per address; more get 503 at once.
    #[arg(long, env = "IMDSGATE_MAX_UNKNOWN_SOURCE_REQUESTS", default_value_t = 256)]
    pub max_unknown_source_requests: usize,

    /// How often the agent checks that its interception rule is still in place (another tool's
    /// cleanup, kube2iam's preStop for one, deletes such rules) and puts it back; 1s to 10m.
    #[arg(long, env = "IMDSGATE_RULE_CHECK_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub rule_check_interval: Duration,

    // --kubeconfig and --log-format, declared once for both binaries.
    #[command(flatten)]
    pub common: CommonArgs,

    /// How long SIGTERM waits for in-flight requests. The iptables rule stays.
    #[arg(long, env = "IMDSGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the interception rule.
    Iptables {
        #[command(subcommand)]
        action: IptablesAction,
    },
    /// Wait until a DaemonSet's pods are ready on every node it targets (the Helm chart's uninstall
    /// hook waits so for its rule-removing DaemonSet); exits 1 after --timeout.
    WaitDaemonset {
        /// `<namespace>/<name>`.
        daemonset: String,
        /// How long to wait.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum IptablesAction {
    /// Install (or repair) the rule and exit, e.g. from an init container; takes --host-ip,
    /// --listen, --host-interface, --ipv6 and --host-ipv6.
    Install,
    /// Remove the IMDSGATE chain and its PREROUTING jumps (pods then reach the real metadata
    /// service: do this only when removing imdsgate).
    Uninstall {
        /// First wait until the node's agent has exited (nothing answers at --admin-listen, or at
        /// 127.0.0.1 on its port when its address is 0.0.0.0 or [::]), so it cannot put the rule
        /// back; give up after this long.
        #[arg(long, env = "IMDSGATE_AFTER_AGENT_EXIT", value_parser = parse_duration)]
        after_agent_exit: Option<Duration>,
    },
}

/// Checked configuration, ready to run.
struct Validated {
    args: Args,
    node_name: String,
    server: ServerClientConfig,
    allow: AllowList,
    upstream: Option<http::Uri>,
    interception: Vec<Interception>,
}

impl Args {
    /// Parses the command line and runs until shutdown; returns the process exit code.
    pub fn parse_and_run() -> ExitCode {
        let args = match parse_args::<Args>() {
            Ok(args) => args,
            Err(code) => return code,
        };
        init_logging(args.common.log_format);
        match &args.command {
            Some(Command::Iptables { action: IptablesAction::Uninstall { after_agent_exit } }) => {
                let admin = match args.admin_listen {
                    any if any.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], any.port())),
                    admin => admin,
                };
                let wait = *after_agent_exit;
                return imdsgate_core::process::run_to_exit("imdsgate-agent", async move {
                    if let Some(timeout) = wait {
                        uninstall::wait_agent_exit(admin, timeout).await?;
                    }
                    Ok::<_, String>(uninstall(args.ipv6))
                });
            }
            Some(Command::WaitDaemonset { daemonset, timeout }) => {
                let (kubeconfig, target, timeout) =
                    (args.common.kubeconfig.clone(), daemonset.clone(), *timeout);
                return imdsgate_core::process::run_to_exit("imdsgate-agent", async move {
                    Ok::<_, String>(uninstall::wait_daemonset(kubeconfig.as_deref(), &target, timeout).await)
                });
            }
            Some(Command::Iptables { action: IptablesAction::Install }) => return install(&args),
            None => {}
        }
        let validated = match args.validate() {
            Ok(v) => v,
            Err(error) => return bad_config(format!("{error:#}")),
        };
        imdsgate_core::process::run_to_exit("imdsgate-agent", validated.serve())
    }

    fn validate(self) -> anyhow::Result<Validated> {
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .context("--node-name (NODE_NAME) is required")?;
        let server_url = self.server.clone().context("--server (IMDSGATE_SERVER) is required")?;
        let uri: http::Uri =
            server_url.parse().with_context(|| format!("--server {server_url:?} is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            bail!("--server must be an https:// URL, not {server_url:?}");
        }
        let host =
            uri.host().context("--server has no host")?.trim_matches(|c| c == '[' || c == ']').to_string();
        let port = uri.port_u16().unwrap_or(443);
        let need = |p: &Option<PathBuf>, flag: &str| p.clone().with_context(|| format!("{flag} is required"));
        let server = ServerClientConfig {
            server_name: self.server_name.clone().unwrap_or_else(|| host.clone()),
            host,
            port,
            tls_cert: need(&self.tls_cert, "--tls-cert (IMDSGATE_TLS_CERT)")?,
            tls_key: need(&self.tls_key, "--tls-key (IMDSGATE_TLS_KEY)")?,
            tls_ca: need(&self.tls_ca, "--tls-ca (IMDSGATE_TLS_CA)")?,
            token_file: Some(self.identity_token_file.clone()),
            call_timeout: Duration::from_secs(5),
        };
        server_client::client_tls(&server).context("TLS files")?;
        let allow = if self.allow_paths.is_empty() {
            AllowList::default_list()
        } else {
            AllowList::new(&self.allow_paths).context("--allow-path")?
        };
        let upstream = match self.metadata_upstream.trim() {
            "" | "none" => None,
            url => Some(
                url.parse::<http::Uri>()
                    .with_context(|| format!("--metadata-upstream {url:?} is not a URL"))?,
            ),
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.rule_check_interval) {
            anyhow::bail!("--rule-check-interval must be between 1s and 10m");
        }
        if self.pod_wait > Duration::from_secs(30) {
            bail!("--pod-wait must be at most 30s");
        }
        if self.max_concurrent_requests == 0 {
            bail!("--max-concurrent-requests must be at least 1");
        }
        if self.max_requests_per_pod == 0 || self.max_unknown_source_requests == 0 {
            bail!("--max-requests-per-pod and --max-unknown-source-requests must be at least 1");
        }
        let interception = if self.iptables { self.interceptions()? } else { Vec::new() };
        Ok(Validated { args: self, node_name, server, allow, upstream, interception })
    }
}

fn install(args: &Args) -> ExitCode {
    let rules = match args.interceptions() {
        Ok(rules) if !rules.is_empty() => rules,
        Ok(_) => return bad_config("iptables install needs --host-ip (HOST_IP)"),
        Err(error) => return bad_config(format!("{error:#}")),
    };
    for rule in rules {
        if rule.ipv6
            && let Err(why) = interception::family_usable(true)
        {
            eprintln!("warning: IPv6 metadata endpoint not intercepted, ip6tables is unusable here: {why}");
            continue;
        }
        if let Err(error) = rule.install() {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
        eprintln!("imdsgate interception installed (ipv6: {}, target {})", rule.ipv6, rule.describe_target());
    }
    ExitCode::SUCCESS
}

impl Args {
    /// The rules --host-ip, --listen, --host-interface, --ipv6 and --host-ipv6 describe.
    fn interceptions(&self) -> anyhow::Result<Vec<Interception>> {
        let target =
            self.host_ip.context("the interception rule needs --host-ip (HOST_IP), the DNAT target")?;
        if !target.is_ipv4() {
            bail!("--host-ip must be IPv4; use --host-ipv6 for the IPv6 endpoint");
        }
        let port = self.listen.port();
        let mut rules = vec![Interception {
            ipv6: false,
            target: Some(target),
            port,
            interfaces: self.host_interfaces.clone(),
        }];
        if self.ipv6 {
            if self.host_ipv6.is_some_and(|ip| !ip.is_ipv6()) {
                bail!("--host-ipv6 must be an IPv6 address");
            }
            let target = self.host_ipv6;
            rules.push(Interception { ipv6: true, target, port, interfaces: self.host_interfaces.clone() });
        }
        Ok(rules)
    }
}

fn uninstall(ipv6: bool) -> ExitCode {
    let mut families = vec![false];
    if ipv6 {
        families.push(true);
    }
    for v6 in families {
        if v6 && let Err(why) = interception::family_usable(true) {
            eprintln!("note: no IPv6 rule to remove, ip6tables is unusable here: {why}");
            continue;
        }
        if let Err(error) = Interception::uninstall(v6) {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    }
    eprintln!("imdsgate interception removed");
    ExitCode::SUCCESS
}

impl Validated {
    async fn serve(self) -> anyhow::Result<ExitCode> {
        let Validated { args, node_name, server, allow, upstream, interception } = self;
        let tokens = match TokenKey::load_or_create(&args.token_key_file) {
            Ok(key) => key,
            Err(error) => return Ok(bad_config(error)),
        };
        let client = match imdsgate_core::process::kube_client(args.common.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(error) => return Ok(bad_config(format!("Kubernetes client: {error:#}"))),
        };
        let metrics = Metrics::new();
        let certificates = vec![("client", server.tls_cert.clone()), ("ca", server.tls_ca.clone())];
        let server_client =
            ServerClient::new(server, metrics.clone()).map_err(|e| anyhow!("TLS files: {e}"))?;
        let imds_listener = match listener::bind(args.listen) {
            Ok(l) => l,
            Err(e) => return Ok(bad_config(format!("cannot listen on --listen {}: {e}", args.listen))),
        };
        let admin_listener = match tokio::net::TcpListener::bind(args.admin_listen).await {
            Ok(l) => l,
            Err(e) => {
                return Ok(bad_config(format!("cannot listen on --admin-listen {}: {e}", args.admin_listen)));
            }
        };
        // The listener is up before the rule points at it.
        let mut installed = Vec::new();
        for rule in interception {
            if rule.ipv6
                && let Err(why) = interception::family_usable(true)
            {
                tracing::warn!(%why, "IPv6 metadata endpoint not intercepted: ip6tables is unusable here");
                continue;
            }
            rule.install()
                .with_context(|| format!("installing the interception rule (ipv6: {})", rule.ipv6))?;
            tracing::info!(ipv6 = rule.ipv6, target = rule.describe_target(), "interception rule installed");
            let family = FamilyLabels { family: rule.family() };
            metrics.rule_present.get_or_create(&family).set(1);
            metrics.rule_repairs.get_or_create(&family).inc_by(0); // from 0: increase() sees the first

            installed.push(rule);
        }
        let rule_task =
            tokio::spawn(interception::keep(installed, metrics.clone(), args.rule_check_interval));

        let pods = Arc::new(PodIndex::new());
        let credentials = Arc::new(CredentialCache::new(Arc::new(server_client.clone()), metrics.clone()));
        let upstream: Option<Arc<dyn Upstream>> =
            upstream.map(|u| Arc::new(HttpUpstream::new(&u)) as Arc<dyn Upstream>);
        let node_ips = args.host_ip.into_iter().chain(args.host_ipv6).collect();
        let imds = Arc::new(Imds {
            pods: pods.clone(),
            node_ips,
            pod_wait: args.pod_wait,
            tokens,
            require_imdsv2: args.require_imdsv2,
            credentials: credentials.clone(),
            upstream,
            allow,
            metrics: metrics.clone(),
            events: Arc::new(refusal_events::AgentEvents::new(
                Some(client.clone()),
                node_name.clone(),
                metrics.clone(),
            )),
        });

        let synced = Synced::default();
        let watch_task = tokio::spawn(watch_pods(
            client,
            node_name.clone(),
            imds.clone(),
            synced.clone(),
            metrics.clone(),
        ));
        server_client.refresh().await;
        let refresh_task = server_client.spawn_refresh(SERVER_REFRESH_EVERY);
        let revocation_task =
            tokio::spawn(revocation::follow(server_client.clone(), credentials, metrics.clone()));
        let server_up = Arc::new(AtomicBool::new(false));
        let health_task = {
            let (client, up) = (server_client.clone(), server_up.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SERVER_HEALTH_EVERY);
                loop {
                    tick.tick().await;
                    up.store(client.healthy().await, Ordering::Relaxed);
                }
            })
        };

        let shutdown = imdsgate_core::process::Shutdown::default();
        let ready = {
            let (synced, up) = (synced.clone(), server_up.clone());
            Arc::new(move || match (synced.get(), up.load(Ordering::Relaxed)) {
                (true, true) => Ok(()),
                (false, _) => Err("pod watch has not synced".to_string()),
                (_, false) => Err("no imdsgate server replica answers its health check".to_string()),
            })
        };
        let admin = Admin { registry: metrics.registry(), ready, ready_gauge: metrics.ready.clone() };
        tokio::spawn(imdsgate_core::cert_expiry::watch(
            metrics.certificate_expiry.clone(),
            certificates,
            CERT_EXPIRY_EVERY,
        ));
        let admin_task = tokio::spawn(admin.serve(admin_listener, shutdown.wait()));
        let limits = listener::Limits {
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(5),
            request_timeout: args.pod_wait + Duration::from_secs(15),
            pods: Budget { total: args.max_concurrent_requests, per_source: args.max_requests_per_pod },
            unknown: Budget {
                total: args.max_unknown_source_requests,
                per_source: listener::REQUESTS_PER_UNKNOWN_SOURCE,
            },
        };
        let mut imds_task = tokio::spawn(listener::serve(
            imds_listener,
            imds,
            limits,
            metrics.clone(),
            shutdown.wait(),
            args.shutdown_grace,
        ));
        tracing::info!(node = %node_name, listen = %args.listen, admin = %args.admin_listen, "imdsgate-agent started");

        let critical = vec![
            ("pod watch", watch_task),
            ("server resolver", refresh_task),
            ("revocation feed", revocation_task),
            ("server health check", health_task),
            ("admin server", admin_task),
            ("interception rule keeper", rule_task),
        ];
        if let Err(why) = imdsgate_core::process::supervise(&mut imds_task, critical).await {
            tracing::error!(why, "a critical task died; exiting so Kubernetes restarts the agent");
            return Ok(ExitCode::FAILURE);
        }
        shutdown.trigger();
        // listener::serve drains within the grace period itself.
        let _ = tokio::time::timeout(args.shutdown_grace + Duration::from_secs(1), imds_task).await;
        tracing::info!("drained; the interception rule stays in place");
        Ok(ExitCode::SUCCESS)
    }
}

/// A pod with a role that just got its IP on this node has its credentials fetched now, as its
/// own first request would (from its IP, bound to its UID), so that request is a cache hit. Not
/// while another pod still claims one of its IPs: nothing is served there until that clears.
fn prefetch(imds: &Arc<Imds>, pod: &Arc<imdsgate_core::PodInfo>) {
    let Ok(role) = imds::role_name(pod) else { return };
    let Some(peer) = pod.ips.first().copied() else { return };
    if pod.ips.iter().any(|ip| imds.pods.by_ip(ip).len() != 1) {
        return;
    }
    let (imds, pod, role) = (imds.clone(), pod.clone(), role.to_string());
    tokio::spawn(async move {
        if let Err(error) = imds.credentials.get(peer, &pod.uid, &pod.ips, &role).await {
            tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), %error, "prefetch failed");
        }
    });
}

async fn watch_pods(client: kube::Client, node: String, imds: Arc<Imds>, synced: Synced, metrics: Metrics) {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher(kube::Api::<Pod>::all(client), config).default_backoff();
    let forget = |change: Change| match change {
        Change::Removed(pod) => {
            imds.credentials.forget(&pod.uid);
        }
        Change::Updated { pod, identity_changed: true } => {
            imds.credentials.forget(&pod.uid);
            prefetch(&imds, &pod);
        }
        Change::Added(pod) => {
            // Its IP was someone else's: whatever is cached for the previous owner is never served
            // again (both stay unserved, as ambiguous, until the old pod's deletion arrives).
            for ip in &pod.ips {
                for previous in imds.pods.by_ip(ip).iter().filter(|p| p.uid != pod.uid) {
                    imds.credentials.forget(&previous.uid);
                }
            }
            prefetch(&imds, &pod);
        }
        _ => {}
    };
    let restarts = metrics.watch_restarts.clone();
    watch::drive(
        "pods",
        stream,
        synced,
        |_| {
            restarts.inc();
        },
        |update| {
            match update {
                Update::Apply(pod) => forget(imds.pods.apply(&pod)),
                Update::Delete(pod) => forget(imds.pods.delete(&pod)),
                Update::Reset(all) => imds.pods.reset(all.iter()).into_iter().for_each(forget),
            }
            metrics.pods_indexed.set(imds.pods.len() as i64);
        },
    )
    .await;
}
