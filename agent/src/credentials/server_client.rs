//! The agent's client for the imdsgate server: mutual TLS (files re-read on change), the agent's
//! projected ServiceAccount token on every call (re-read when rotated), balancing across every
//! address the server's name resolves to (re-resolved periodically), and a failed replica retried
//! on another within the same pod request.

use crate::credentials::credential_cache::{CredentialSource, Quorum};
use crate::metrics::{CodeLabels, Metrics};
use futures::FutureExt;
use futures::future::BoxFuture;
use imdsgate_core::tls::{Reloading, TlsError};
use imdsgate_proto::v1::credentials_client::CredentialsClient;
use imdsgate_proto::v1::{GetCredentialsRequest, HeldCredentials, Revocation, WatchRevocationsRequest};
use imdsgate_proto::{AUTHORIZATION_METADATA_KEY, Credentials, Reason};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How often the server's name is looked up again while it resolves to nothing.
const UNRESOLVED_RETRY: Duration = Duration::from_secs(1);

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct ServerClientConfig {
    pub host: String,
    pub port: u16,
    pub server_name: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_ca: PathBuf,
    pub token_file: Option<PathBuf>,
    pub call_timeout: Duration,
}

/// Why the server gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error("{message}")]
    Refused { code: tonic::Code, reason: Option<Reason>, message: String },
    #[error("the imdsgate server cannot be reached: {0}")]
    Unreachable(String),
}

impl ServerError {
    /// Whether the failure is the server's absence rather than a decision.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ServerError::Unreachable(_))
            || matches!(self, ServerError::Refused { code: tonic::Code::Unavailable, .. })
    }
}

struct Replica {
    addr: SocketAddr,
    channel: Channel,
    /// When a call to it last failed as unreachable (ms since the client started; 0: never).
    failed_at_ms: std::sync::atomic::AtomicU64,
}

/// For this long after a replica failed, calls try the others first.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

struct Replicas {
    addrs: Vec<SocketAddr>,
    tls: Arc<ClientTlsConfig>,
    list: Vec<Replica>,
}

/// See the module documentation.
pub struct ServerClient {
    config: ServerClientConfig,
    tls: Arc<Reloading<ClientTlsConfig>>,
    replicas: RwLock<Arc<Replicas>>,
    next: AtomicUsize,
    /// The clock of the replicas' `failed_at_ms`.
    started: std::time::Instant,
    token: Mutex<Option<(SystemTime, String)>>,
    metrics: Metrics,
}

/// Builds the client TLS configuration from PEM files (checked by loading them).
pub fn client_tls(config: &ServerClientConfig) -> Result<ClientTlsConfig, TlsError> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|source| TlsError::Read { path: p.clone(), source });
    imdsgate_core::tls::load_certs(&config.tls_ca)?;
    imdsgate_core::tls::load_certs(&config.tls_cert)?;
    imdsgate_core::tls::load_key(&config.tls_key)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&config.tls_ca)?))
        .identity(Identity::from_pem(read(&config.tls_cert)?, read(&config.tls_key)?))
        .domain_name(config.server_name.clone()))
}

impl ServerClient {
    /// Checks the TLS files; resolving and connecting happen lazily and keep retrying.
    pub fn new(config: ServerClientConfig, metrics: Metrics) -> Result<Arc<ServerClient>, TlsError> {
        let for_build = config.clone();
        let files = vec![config.tls_cert.clone(), config.tls_key.clone(), config.tls_ca.clone()];
        let tls = Reloading::new(files, move || client_tls(&for_build))?;
        let empty = Replicas { addrs: Vec::new(), tls: tls.get(), list: Vec::new() };
        Ok(Arc::new(ServerClient {
            config,
            tls,
            replicas: RwLock::new(Arc::new(empty)),
            next: AtomicUsize::new(0),
            started: std::time::Instant::now(),
            token: Mutex::new(None),
            metrics,
        }))
    }

    /// Re-resolves the server's name and re-reads the TLS files; rebuilds connections if either
    /// changed.
    pub async fn refresh(&self) {
        self.tls.reload_if_changed();
        let resolved = match tokio::net::lookup_host((self.config.host.as_str(), self.config.port)).await {
            Ok(addrs) => {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                addrs.sort();
                addrs.dedup();
                addrs
            }
            Err(error) => {
                tracing::warn!(host = %self.config.host, %error, "cannot resolve the imdsgate server");
                return;
            }
        };
        let tls = self.tls.get();
        let current = self.current();
        if current.addrs == resolved && Arc::ptr_eq(&current.tls, &tls) {
            return;
        }
        let list = resolved
            .iter()
            .filter_map(|addr| {
                let endpoint = Endpoint::from_shared(format!("https://{addr}")).ok()?;
                let endpoint = endpoint
                    .tls_config((*tls).clone())
                    .ok()?
                    .connect_timeout(Duration::from_secs(3))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30));
                Some(Replica {
                    addr: *addr,
                    channel: endpoint.connect_lazy(),
                    failed_at_ms: Default::default(),
                })
            })
            .collect();
        tracing::info!(replicas = ?resolved, "imdsgate server replicas");
        *self.replicas.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Replicas { addrs: resolved, tls, list });
    }

    /// Refreshes every `every` until the process ends; every second while no replica is known
    /// (at a node's start the cluster's DNS is often not answering yet, and the agent is not ready
    /// until it reaches a server).
    pub fn spawn_refresh(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = if this.current().list.is_empty() { every.min(UNRESOLVED_RETRY) } else { every };
                tokio::time::sleep(wait).await;
                this.refresh().await;
            }
        })
    }

    /// Whether some replica answers the gRPC health check with SERVING.
    pub async fn healthy(&self) -> bool {
        let replicas = self.current();
        for replica in &replicas.list {
            let mut health = tonic_health::pb::health_client::HealthClient::new(replica.channel.clone());
            let check = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() });
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), check).await
                && response.get_ref().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return true;
            }
        }
        false
    }

    /// The replicas' addresses as last resolved.
    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        self.current().addrs.clone()
    }

    /// Opens the revocation stream of the replica at `addr`, telling it what the agent holds.
    pub async fn watch_revocations(
        &self,
        addr: SocketAddr,
        held: Vec<(String, String)>,
    ) -> Result<tonic::Streaming<Revocation>, tonic::Status> {
        let channel = self
            .current()
            .list
            .iter()
            .find(|r| r.addr == addr)
            .map(|r| r.channel.clone())
            .ok_or_else(|| tonic::Status::unavailable(format!("{addr} is no longer a server replica")))?;
        let token = self.token().map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let held = held.into_iter().map(|(pod_uid, role)| HeldCredentials { pod_uid, role }).collect();
        let mut request = tonic::Request::new(WatchRevocationsRequest { held });
        self.authorize(&mut request, token.as_deref());
        let mut client = CredentialsClient::new(channel);
        let opened = tokio::time::timeout(self.config.call_timeout, client.watch_revocations(request)).await;
        match opened {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
        }
    }

    fn authorize<T>(&self, request: &mut tonic::Request<T>, token: Option<&str>) {
        if let Some(token) = token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert(AUTHORIZATION_METADATA_KEY, value);
        }
    }

    fn current(&self) -> Arc<Replicas> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The projected token, re-read when the kubelet rotates the file.
    fn token(&self) -> Result<Option<String>, ServerError> {
        let Some(path) = &self.config.token_file else { return Ok(None) };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).map_err(|e| {
            ServerError::Unreachable(format!("cannot read the identity token {}: {e}", path.display()))
        })?;
        let mut cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some((at, token)) if *at == modified => Ok(Some(token.clone())),
            _ => {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| {
                        ServerError::Unreachable(format!(
                            "cannot read the identity token {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_string();
                *cached = Some((modified, token.clone()));
                Ok(Some(token))
            }
        }
    }

    async fn call(
        &self,
        pod_ip: IpAddr,
        pod_uid: String,
        role: String,
        quorum: Quorum,
    ) -> Result<Credentials, ServerError> {
        let token = self.token()?;
        let mut replicas = self.current();
        if replicas.list.is_empty() {
            self.refresh().await;
            replicas = self.current();
        }
        let token = token.as_deref();
        if quorum == Quorum::All && replicas.list.len() > 1 {
            let all = replicas.list.iter().map(|r| self.call_one(r, pod_ip, &pod_uid, &role, token));
            return agree(futures::future::join_all(all).await);
        }
        let mut last = ServerError::Unreachable(format!("no address for {}", self.config.host));
        for replica in self.attempt_order(&replicas.list) {
            match self.call_one(replica, pod_ip, &pod_uid, &role, token).await {
                Err(ServerError::Unreachable(why)) => {
                    replica.failed_at_ms.store(self.now_ms().max(1), Ordering::Relaxed);
                    tracing::warn!(replica = %replica.addr, why, "server replica failed; trying another");
                    last = ServerError::Unreachable(format!("{}: {why}", replica.addr));
                }
                answer => {
                    replica.failed_at_ms.store(0, Ordering::Relaxed);
                    return answer;
                }
            }
        }
        Err(last)
    }

    /// Every replica once, in turn from a rotating start (spreading the load), replicas that
    /// failed within [`SUSPECT_FOR`] last: a retry never goes back to the replica that just
    /// failed, and a dead replica is not tried first by every call.
    fn attempt_order<'a>(&self, list: &'a [Replica]) -> Vec<&'a Replica> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let suspect_ms = SUSPECT_FOR.as_millis() as u64;
        let mut order: Vec<&Replica> = (0..list.len()).map(|i| &list[(start + i) % list.len()]).collect();
        order.sort_by_key(|r| {
            let failed = r.failed_at_ms.load(Ordering::Relaxed);
            failed != 0 && now.saturating_sub(failed) < suspect_ms
        });
        order
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// One replica's answer; `Unreachable` when another replica may answer instead.
    async fn call_one(
        &self,
        replica: &Replica,
        pod_ip: IpAddr,
        pod_uid: &str,
        role: &str,
        token: Option<&str>,
    ) -> Result<Credentials, ServerError> {
        let mut request = tonic::Request::new(GetCredentialsRequest {
            pod_ip: pod_ip.to_string(),
            pod_uid: pod_uid.to_string(),
            role: role.to_string(),
        });
        request.set_timeout(self.config.call_timeout);
        self.authorize(&mut request, token);
        let mut client = CredentialsClient::new(replica.channel.clone());
        let outcome = tokio::time::timeout(self.config.call_timeout, client.get_credentials(request)).await;
        let status = match outcome {
            Ok(Ok(response)) => return Ok(Credentials::from(response.into_inner())),
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded("no answer in time"),
        };
        self.metrics.server_errors.get_or_create(&CodeLabels { code: format!("{:?}", status.code()) }).inc();
        let reason = Reason::of(&status);
        if retry_elsewhere(&status) {
            Err(ServerError::Unreachable(status.message().to_string()))
        } else {
            Err(ServerError::Refused { code: status.code(), reason, message: status.message().to_string() })
        }
    }
}

/// Whether a failed call may be answered by another replica: no imdsgate reason (a refusal with
/// one is final, whichever replica gave it) and a transport-shaped code (unreachable, timed out,
/// cut, or a replica not ready to judge).
pub fn retry_elsewhere(status: &tonic::Status) -> bool {
    Reason::of(status).is_none()
        && matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
        )
}

/// Every replica's answer to one request, combined when all must agree: one refusal refuses;
/// otherwise any grant grants; otherwise the last failure.
pub fn agree(answers: Vec<Result<Credentials, ServerError>>) -> Result<Credentials, ServerError> {
    let mut granted = None;
    let mut failed = None;
    for answer in answers {
        match answer {
            Ok(creds) => granted = granted.or(Some(creds)),
            Err(error) if error.is_unavailable() => failed = Some(error),
            Err(refusal) => return Err(refusal),
        }
    }
    granted.ok_or_else(|| failed.unwrap_or_else(|| ServerError::Unreachable("no server replica".into())))
}

impl CredentialSource for Arc<ServerClient> {
    fn fetch(
        &self,
        pod_ip: IpAddr,
        pod_uid: &str,
        role: &str,
        quorum: Quorum,
    ) -> BoxFuture<'static, Result<Credentials, ServerError>> {
        let this = self.clone();
        let (uid, role) = (pod_uid.to_string(), role.to_string());
        async move { this.call(pod_ip, uid, role, quorum).await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(key: &str) -> Credentials {
        Credentials {
            access_key_id: key.into(),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            expiration: SystemTime::now(),
            issued_at: SystemTime::now(),
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            account_id: "123456789012".into(),
        }
    }

    fn refused() -> ServerError {
        ServerError::Refused {
            code: tonic::Code::PermissionDenied,
            reason: Some(Reason::NamespaceForbids),
            message: "no".into(),
        }
    }

    #[test]
    fn one_refusal_outweighs_every_grant() {
        // A replica whose watch lags still grants what the up-to-date one refuses.
        let stale = Ok(creds("ASIA-stale"));
        assert_eq!(agree(vec![stale.clone(), Err(refused())]), Err(refused()));
        assert_eq!(agree(vec![Err(refused()), stale]), Err(refused()));
    }

    #[test]
    fn an_unreachable_replica_does_not_block_the_others() {
        let down = Err(ServerError::Unreachable("refused".into()));
        assert_eq!(agree(vec![down.clone(), Ok(creds("ASIA-1"))]).unwrap().access_key_id, "ASIA-1");
        assert_eq!(agree(vec![down.clone(), down.clone()]), down);
        assert!(agree(vec![]).is_err());
    }
}
