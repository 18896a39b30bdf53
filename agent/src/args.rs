//! The agent's command line: the flags (each with its environment variable), the subcommands, and
//! the checks that turn them into a `Validated` configuration before anything starts.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use imdsgate_core::common_args::CommonArgs;
use imdsgate_core::process::parse_duration;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::credentials::server_client::{self, ServerClientConfig};
use crate::imds::upstream::AllowList;
use crate::interception::{Interception, InterfaceMatch};

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
    /// status.hostIP). An IPv6 address (IPv6-primary clusters) is the IPv6 DNAT target unless
    /// --host-ipv6 is given; IPv4 is then REDIRECTed (no IPv4 DNAT target is known).
    #[arg(long, env = "HOST_IP", global = true)]
    pub host_ip: Option<IpAddr>,

    /// This node's IPv6 address, the DNAT target for the IPv6 metadata endpoint. Without it the
    /// IPv6 rule REDIRECTs to --listen's port on the address of the interface a request arrives on.
    #[arg(long, env = "HOST_IPV6", global = true)]
    pub host_ipv6: Option<IpAddr>,

    /// Address of the IMDS listener that the iptables rules redirect to. The default `[::]` takes
    /// IPv4 and IPv6 (IPv4 only where the kernel has no IPv6).
    #[arg(long, env = "IMDSGATE_LISTEN", default_value = "[::]:8183", global = true, value_parser = parse_socket_addr)]
    pub listen: SocketAddr,

    /// Address of the admin HTTP listener (/healthz, /readyz, /metrics). The manifests bind it to
    /// the node's IP ($(HOST_IP):8184), where the kubelet's probes and Prometheus reach it; an
    /// IPv6 address may come without brackets (`fd00::1:8184`, as $(HOST_IP):8184 writes it).
    #[arg(
        long,
        env = "IMDSGATE_ADMIN_LISTEN",
        default_value = "0.0.0.0:8184",
        global = true,
        value_parser = parse_socket_addr
    )]
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
    /// dynamic/instance-identity/document). iam/* and identity-credentials/* are never proxied;
    /// user-data, public-keys and the signed identity (instance-identity/pkcs7, signature,
    /// rsa2048) only with --unsafe-allow-node-secrets.
    #[arg(long = "allow-path", env = "IMDSGATE_ALLOW_PATH", value_delimiter = ',')]
    pub allow_paths: Vec<String>,

    /// Unsafe: let --allow-path open the node's secrets: its user-data (often bootstrap
    /// credentials), its SSH public keys, and the AWS-signed forms of its identity document, which
    /// Vault's and SPIRE's EC2 attestors accept as proof of being this node. Every pod of the node
    /// can then read them.
    #[arg(long, env = "IMDSGATE_UNSAFE_ALLOW_NODE_SECRETS")]
    pub unsafe_allow_node_secrets: bool,

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
pub(crate) struct Validated {
    pub(crate) args: Args,
    pub(crate) node_name: String,
    pub(crate) server: ServerClientConfig,
    pub(crate) allow: AllowList,
    pub(crate) upstream: Option<http::Uri>,
    pub(crate) interception: Vec<Interception>,
}

impl Args {
    pub(crate) fn validate(self) -> anyhow::Result<Validated> {
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
        }
        .with_node_secrets(self.unsafe_allow_node_secrets);
        if self.unsafe_allow_node_secrets {
            tracing::warn!(
                "--unsafe-allow-node-secrets: the allow-list may open the node's user-data, public keys and signed identity to every pod of the node"
            );
        }
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

    /// The rules --host-ip, --listen, --host-interface, --ipv6 and --host-ipv6 describe.
    ///
    /// --host-ip (status.hostIP) is the node's primary address: IPv4, or IPv6 on IPv6-primary
    /// clusters, where it is the IPv6 DNAT target unless --host-ipv6 names one. IPv4 is
    /// intercepted either way: DNAT to an IPv4 --host-ip, else REDIRECT to --listen's port on the
    /// receiving interface's address (dropped by the kernel where that interface has no IPv4
    /// address), never left open to the node's metadata service; the log line says which.
    pub(crate) fn interceptions(&self) -> anyhow::Result<Vec<Interception>> {
        let host_ip =
            self.host_ip.context("the interception rule needs --host-ip (HOST_IP), the DNAT target")?;
        if self.host_ipv6.is_some_and(|ip| !ip.is_ipv6()) {
            bail!("--host-ipv6 must be an IPv6 address");
        }
        let port = self.listen.port();
        let v4_target = host_ip.is_ipv4().then_some(host_ip);
        if v4_target.is_none() {
            tracing::warn!(
                host_ip = %host_ip,
                "--host-ip is IPv6 and no IPv4 DNAT target is known: IPv4 metadata traffic is REDIRECTed to port {port} of the interface it arrives on (dropped where that interface has no IPv4 address)"
            );
        }
        let mut rules = vec![Interception {
            ipv6: false,
            target: v4_target,
            port,
            interfaces: self.host_interfaces.clone(),
        }];
        if self.ipv6 {
            let target = self.host_ipv6.or(host_ip.is_ipv6().then_some(host_ip));
            rules.push(Interception { ipv6: true, target, port, interfaces: self.host_interfaces.clone() });
        } else if host_ip.is_ipv6() {
            tracing::warn!(
                host_ip = %host_ip,
                "--ipv6=false: the IPv6 metadata endpoint is not intercepted although --host-ip is IPv6"
            );
        }
        Ok(rules)
    }
}

/// A socket address, leniently: besides `1.2.3.4:80` and `[fd00::1]:80`, an unbracketed IPv6
/// address followed by `:port` (`fd00::1:80`, as `$(HOST_IP):80` writes it on IPv6 nodes): the
/// part after the last colon is the port.
pub(crate) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("{s:?} is not an address:port (e.g. 10.0.0.1:8184, [fd00::1]:8184 or fd00::1:8184)");
    let (ip, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match (ip.parse::<std::net::Ipv6Addr>(), port.parse::<u16>()) {
        (Ok(ip), Ok(port)) => Ok(SocketAddr::new(IpAddr::V6(ip), port)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("imdsgate-agent").chain(flags.iter().copied()))
    }

    #[test]
    fn admin_listen_takes_host_ip_and_port_as_the_manifests_write_it() {
        for (given, want) in [
            ("10.0.0.1:8184", SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 8184))),
            ("[fd00::1]:8184", SocketAddr::from(("fd00::1".parse::<Ipv6Addr>().unwrap(), 8184))),
            // $(HOST_IP):8184 with an IPv6 status.hostIP.
            ("fd00::1:8184", SocketAddr::from(("fd00::1".parse::<Ipv6Addr>().unwrap(), 8184))),
            (
                "2001:db8:0:0:0:0:0:7:8184",
                SocketAddr::from(("2001:db8::7".parse::<Ipv6Addr>().unwrap(), 8184)),
            ),
            ("::1:9", SocketAddr::from((Ipv6Addr::LOCALHOST, 9))),
        ] {
            assert_eq!(parse_socket_addr(given), Ok(want), "{given}");
            let args = parse(&[&format!("--admin-listen={given}")]).unwrap();
            assert_eq!(args.admin_listen, want, "{given}");
        }
        for bad in ["fd00::1", "10.0.0.1", "fd00::1:port", "10.0.0.1:99999", "host:80", ""] {
            assert!(parse_socket_addr(bad).is_err(), "{bad}");
            assert!(parse(&[&format!("--admin-listen={bad}")]).is_err(), "{bad}");
        }
        assert_eq!(parse(&[]).unwrap().admin_listen, SocketAddr::from(([0, 0, 0, 0], 8184)));
        assert_eq!(parse(&["--listen=fd00::1:8183"]).unwrap().listen.port(), 8183);
    }

    fn targets(rules: &[Interception]) -> Vec<(bool, Option<IpAddr>)> {
        rules.iter().map(|r| (r.ipv6, r.target)).collect()
    }

    #[test]
    fn an_ipv6_host_ip_is_the_ipv6_target_and_ipv4_is_redirected() {
        let v6: IpAddr = "fd00:1::5".parse().unwrap();
        let rules =
            parse(&["--iptables", "--host-ip=fd00:1::5", "--listen=[::]:8183"]).unwrap().interceptions();
        let rules = rules.expect("an IPv6 --host-ip is accepted");
        assert_eq!(targets(&rules), [(false, None), (true, Some(v6))]);
        assert_eq!(
            rules[0].dnat_rule(),
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8183"
        );
        // --host-ipv6 names the IPv6 target when given.
        let rules =
            parse(&["--host-ip=fd00:1::5", "--host-ipv6=fd00:2::5"]).unwrap().interceptions().unwrap();
        assert_eq!(targets(&rules), [(false, None), (true, Some("fd00:2::5".parse().unwrap()))]);
        // IPv6 interception off: IPv4 only, still intercepted.
        let rules = parse(&["--host-ip=fd00:1::5", "--ipv6=false"]).unwrap().interceptions().unwrap();
        assert_eq!(targets(&rules), [(false, None)]);
        // IPv4 primary as before.
        let rules = parse(&["--host-ip=10.0.0.1"]).unwrap().interceptions().unwrap();
        assert_eq!(targets(&rules), [(false, Some("10.0.0.1".parse().unwrap())), (true, None)]);
        let rules = parse(&["--host-ip=10.0.0.1", "--host-ipv6=fd00::1"]).unwrap().interceptions().unwrap();
        assert_eq!(
            targets(&rules),
            [(false, Some("10.0.0.1".parse().unwrap())), (true, Some("fd00::1".parse().unwrap()))]
        );
        // Still refused: no --host-ip, an IPv4 --host-ipv6.
        assert!(parse(&[]).unwrap().interceptions().is_err());
        let e = parse(&["--host-ip=10.0.0.1", "--host-ipv6=10.0.0.2"]).unwrap().interceptions().unwrap_err();
        assert!(e.to_string().contains("--host-ipv6 must be an IPv6 address"), "{e}");
    }
}
