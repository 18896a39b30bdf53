//! The wiring: builds the clients, indexes and caches from a `Validated` configuration, spawns
//! the watches, the refresher and the listeners, supervises them, and drains on shutdown.

use crate::admission::{self, server_nodes, webhook_server};
use crate::args::Validated;
use crate::authz::authorizer::Authorizer;
use crate::authz::namespace_index::NamespaceIndex;
use crate::authz::role_base::RoleBase;
use crate::authz::session::TagConfig;
use crate::credential_cache::{CacheConfig, CredentialCache};
use crate::events;
use crate::grpc::agent_auth::AgentAuthenticator;
use crate::grpc::revocation::Revocations;
use crate::grpc::service::CredentialsService;
use crate::grpc::tls_server;
use crate::metrics::Metrics;
use crate::sts::{Sts, StsConfig, base_arn};
use crate::watches::{namespaces, nodes, pods};
use imdsgate_core::PodIndex;
use imdsgate_core::admin::Admin;
use imdsgate_core::latch::Latch;
use imdsgate_core::process::bad_config;
use imdsgate_proto::v1::credentials_server::CredentialsServer;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const REFRESH_EVERY: Duration = Duration::from_secs(15);
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How often the certificate expiry metric re-reads the TLS files.
const CERT_EXPIRY_EVERY: Duration = Duration::from_secs(60);

impl Validated {
    /// Runs the server until shutdown or the death of a critical task.
    pub(crate) async fn serve(self) -> anyhow::Result<ExitCode> {
        let Validated { args, base_arn, server_node_labels, tls, webhook } = self;
        // Before any socket: every connection, watch and file counts against it.
        let fd_limit = imdsgate_core::process::raise_fd_limit_logged();
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
            base_arn::start_detecting(sts.clone(), authorizer.clone(), metrics.clone()).await;
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
            metrics.clone(),
        ));
        let events = Arc::new(events::DenialEvents::new(Some(client.clone()), args.pod_name.clone()));
        let revocations = Revocations::new(authorizer.clone(), cache.clone(), metrics.clone());

        let ns_synced = Latch::default();
        let pods_synced = Latch::default();
        let pod_watch = Arc::new(pods::PodWatch::new(
            authorizer.clone(),
            cache.clone(),
            revocations.clone(),
            authn.clone(),
            metrics.clone(),
        ));
        let ns_task = tokio::spawn(namespaces::watch(
            client.clone(),
            namespaces::NamespaceWatch {
                index: namespaces.clone(),
                revocations: revocations.clone(),
                pods: pod_watch.clone(),
                metrics: metrics.clone(),
            },
            ns_synced.clone(),
        ));
        let pod_task = tokio::spawn(pods::watch(
            client.clone(),
            pod_watch.clone(),
            ns_synced.clone(),
            pods_synced.clone(),
        ));
        let refresher = {
            let (live, entitled) = (pod_watch.clone(), pod_watch);
            cache.spawn_refresher(
                REFRESH_EVERY,
                move |uid| live.keeps_session(uid),
                move |key| entitled.entitled(key),
            )
        };
        let server_nodes = Arc::new(server_nodes::ServerNodes::new(server_node_labels));
        let node_task = tokio::spawn(nodes::watch(client.clone(), server_nodes.clone(), metrics.clone()));
        let intruder_task = tokio::spawn(server_nodes::report(
            client.clone(),
            server_nodes,
            args.policy.exempt_namespaces(),
            events.clone(),
            metrics.clone(),
        ));

        let ready = {
            let (ns, pods) = (ns_synced.clone(), pods_synced.clone());
            Arc::new(move || match (ns.is_set(), pods.is_set()) {
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
            Arc::new(move || ns.is_set() && pods.is_set())
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
        let handshakes = tls_server::HandshakeLimits::for_fd_limit(fd_limit);
        tracing::debug!(?handshakes, "gRPC handshake limits");
        let incoming = tls_server::incoming(grpc_listener, tls, handshakes, handshake_failures);
        let grpc = tls_server::grpc_server()
            .add_service(health_service)
            .add_service(service.into_server())
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
        if imdsgate_core::process::supervise(&mut grpc_task, critical).await.is_err() {
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
