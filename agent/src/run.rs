//! The agent's wiring: which subcommand runs, and for the agent itself every client, listener and
//! task it starts, what readiness means, how a dying task or SIGTERM ends it.

use anyhow::anyhow;
use imdsgate_core::PodIndex;
use imdsgate_core::admin::Admin;
use imdsgate_core::http_server::Budget;
use imdsgate_core::latch::Latch;
use imdsgate_core::process::{bad_config, init_logging, parse_args};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::args::{Args, Command, IptablesAction, Validated};
use crate::credentials::credential_cache::CredentialCache;
use crate::credentials::revocation;
use crate::credentials::server_client::ServerClient;
use crate::imds::token::TokenKey;
use crate::imds::upstream::{HttpUpstream, Upstream};
use crate::imds::{Imds, listener, refusal_events};
use crate::interception::{self, Progress};
use crate::metrics::{FamilyLabels, Metrics};
use crate::pod_watch::PodWatch;
use crate::uninstall;

const SERVER_REFRESH_EVERY: Duration = Duration::from_secs(30);
const SERVER_HEALTH_EVERY: Duration = Duration::from_secs(5);
/// How often the certificate expiry metric re-reads the TLS files.
const CERT_EXPIRY_EVERY: Duration = Duration::from_secs(60);

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
                    Ok::<_, String>(iptables_uninstall(args.ipv6))
                });
            }
            Some(Command::WaitDaemonset { daemonset, timeout }) => {
                let (kubeconfig, target, timeout) =
                    (args.common.kubeconfig.clone(), daemonset.clone(), *timeout);
                return imdsgate_core::process::run_to_exit("imdsgate-agent", async move {
                    Ok::<_, String>(uninstall::wait_daemonset(kubeconfig.as_deref(), &target, timeout).await)
                });
            }
            Some(Command::Iptables { action: IptablesAction::Install }) => return iptables_install(&args),
            None => {}
        }
        let validated = match args.validate() {
            Ok(v) => v,
            Err(error) => return bad_config(format!("{error:#}")),
        };
        imdsgate_core::process::run_to_exit("imdsgate-agent", validated.serve())
    }
}

/// `iptables install`: installs (or repairs) the rules and exits.
fn iptables_install(args: &Args) -> ExitCode {
    let rules = match args.interceptions() {
        Ok(rules) if !rules.is_empty() => rules,
        Ok(_) => return bad_config("iptables install needs --host-ip (HOST_IP)"),
        Err(error) => return bad_config(format!("{error:#}")),
    };
    let installed = interception::install(rules, |progress| match progress {
        Progress::Ipv6Unusable(why) => {
            eprintln!("warning: IPv6 metadata endpoint not intercepted, ip6tables is unusable here: {why}");
        }
        Progress::Installed(rule) => {
            eprintln!(
                "imdsgate interception installed (ipv6: {}, target {})",
                rule.ipv6,
                rule.describe_target()
            );
        }
    });
    match installed {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `iptables uninstall`: removes the rules of both families (IPv6 as `--ipv6` says).
fn iptables_uninstall(ipv6: bool) -> ExitCode {
    let removed = interception::uninstall(ipv6, |progress| {
        if let Progress::Ipv6Unusable(why) = progress {
            eprintln!("note: no IPv6 rule to remove, ip6tables is unusable here: {why}");
        }
    });
    if let Err(error) = removed {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    eprintln!("imdsgate interception removed");
    ExitCode::SUCCESS
}

impl Validated {
    /// Starts everything and runs until SIGTERM (or a critical task dies).
    async fn serve(self) -> anyhow::Result<ExitCode> {
        let Validated { args, node_name, server, allow, upstream, interception } = self;
        // Before any socket: every pod's connection, watch and file counts against it.
        imdsgate_core::process::raise_fd_limit_logged();
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
        let installed = interception::install(interception, |progress| match progress {
            Progress::Ipv6Unusable(why) => {
                tracing::warn!(%why, "IPv6 metadata endpoint not intercepted: ip6tables is unusable here");
            }
            Progress::Installed(rule) => {
                tracing::info!(
                    ipv6 = rule.ipv6,
                    target = rule.describe_target(),
                    "interception rule installed"
                );
                let family = FamilyLabels { family: rule.family() };
                metrics.rule_present.get_or_create(&family).set(1);
                metrics.rule_repairs.get_or_create(&family).inc_by(0); // from 0: increase() sees the first
            }
        })
        .map_err(|failed| {
            anyhow::Error::new(failed.error)
                .context(format!("installing the interception rule (ipv6: {})", failed.ipv6))
        })?;
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

        let synced = Latch::default();
        let pod_watch = PodWatch::new(pods, credentials.clone());
        let watch_task =
            tokio::spawn(pod_watch.run(client, node_name.clone(), synced.clone(), metrics.clone()));
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
            Arc::new(move || match (synced.is_set(), up.load(Ordering::Relaxed)) {
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
        if imdsgate_core::process::supervise(&mut imds_task, critical).await.is_err() {
            return Ok(ExitCode::FAILURE);
        }
        shutdown.trigger();
        // listener::serve drains within the grace period itself.
        let _ = tokio::time::timeout(args.shutdown_grace + Duration::from_secs(1), imds_task).await;
        tracing::info!("drained; the interception rule stays in place");
        Ok(ExitCode::SUCCESS)
    }
}
