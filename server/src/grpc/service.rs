//! The `imdsgate.v1.Credentials` gRPC service: authenticate the agent, authorize the pod, serve
//! from the credential cache, audit every issuance and count every outcome; and stream each
//! agent the revocations for its node.

use crate::authz::authorizer::{self, Ask, Authorizer, Denial};
use crate::credential_cache::CredentialCache;
use crate::events::DenialEvents;
use crate::grpc::agent_auth::AgentAuthenticator;
use crate::grpc::revocation::{self, RevocationStream, Revocations, Subscriber};
use crate::metrics::{Metrics, ReasonLabels, Rpc, RpcLabels, RpcOnly};
use imdsgate_proto::AUTHORIZATION_METADATA_KEY;
use imdsgate_proto::v1::credentials_server::{Credentials, CredentialsServer};
use imdsgate_proto::v1::{GetCredentialsRequest, GetCredentialsResponse, WatchRevocationsRequest};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// Largest request message decoded, in bytes: a `WatchRevocations` request with
/// [`revocation::MAX_HELD`] entries of the longest valid UID and role (64 characters each, 135
/// bytes an entry encoded) is 138,240 bytes; a `GetCredentials` request is a few hundred. Anything
/// larger is refused from its length prefix (OUT_OF_RANGE), before it is buffered (tonic's default
/// is 4 MiB a message).
pub const MAX_REQUEST_BYTES: usize = 160 * 1024;

/// The refusal of a replica whose pod and namespace watches have not synced yet.
pub const NOT_SYNCED: &str = "this server replica's watches have not synced yet; try another";

pub struct CredentialsService {
    /// How long a request for a pod this server's watch has not delivered yet waits for it (the
    /// agent's watch may be a little ahead).
    pub pod_wait: std::time::Duration,
    pub authn: Arc<AgentAuthenticator>,
    pub authorizer: Arc<Authorizer>,
    pub cache: CredentialCache,
    pub events: Arc<DenialEvents>,
    pub revocations: Revocations,
    /// Whether the pod and namespace watches have synced (before that, nothing can be judged).
    pub synced: Arc<dyn Fn() -> bool + Send + Sync>,
    pub metrics: Metrics,
}

#[tonic::async_trait]
impl Credentials for CredentialsService {
    type WatchRevocationsStream = RevocationStream;

    async fn watch_revocations(
        &self,
        request: Request<WatchRevocationsRequest>,
    ) -> Result<Response<RevocationStream>, Status> {
        // Checked first: a malformed list costs no TokenReview.
        revocation::validate_held(&request.get_ref().held).map_err(|d| d.to_status())?;
        let agent = self.agent(&request).await.map_err(|d| d.to_status())?;
        if !(self.synced)() {
            return Err(Status::unavailable(NOT_SYNCED));
        }
        let peer = request.remote_addr().map(|addr| addr.ip());
        let held = request.into_inner().held;
        tracing::debug!(agent_node = ?agent.node, held = held.len(), "revocation stream opened");
        let subscriber = Subscriber { node: agent.node, peer };
        Ok(Response::new(self.revocations.stream(held, subscriber)))
    }

    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<GetCredentialsResponse>, Status> {
        let started = Instant::now();
        let rpc = Rpc::GetCredentials;
        if !(self.synced)() {
            // Before its watches have synced this replica knows no pod: every answer would be
            // POD_NOT_FOUND, which the agent takes as final. A plain Unavailable (no reason) sends
            // the agent to another replica. Checked before the token review: a restarted replica
            // facing every agent's reconnect costs the apiserver nothing until it can answer.
            self.metrics.requests.get_or_create(&RpcLabels { rpc, code: "Unavailable".into() }).inc();
            return Err(Status::unavailable(NOT_SYNCED));
        }
        let result = self.answer(request).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(denial) => {
                let reason = denial.reason().as_str().to_string();
                self.metrics.denials.get_or_create(&ReasonLabels { reason }).inc();
                denial.reason().code()
            }
        };
        self.metrics.requests.get_or_create(&RpcLabels { rpc, code: format!("{code:?}") }).inc();
        self.metrics
            .request_duration
            .get_or_create(&RpcOnly { rpc })
            .observe(started.elapsed().as_secs_f64());
        result.map(Response::new).map_err(|d| d.to_status())
    }
}

impl CredentialsService {
    /// The gRPC service, with its limit on request size ([`MAX_REQUEST_BYTES`]).
    pub fn into_server(self) -> CredentialsServer<CredentialsService> {
        CredentialsServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The calling agent, from the token in the request's metadata; the connection (the peer's
    /// address) is charged for the TokenReview, if one is needed.
    async fn agent<T>(&self, request: &Request<T>) -> Result<crate::grpc::agent_auth::AgentIdentity, Denial> {
        let authorization = request.metadata().get(AUTHORIZATION_METADATA_KEY).and_then(|v| v.to_str().ok());
        Ok(self.authn.authenticate(authorization, request.remote_addr()).await?)
    }

    async fn answer(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<GetCredentialsResponse, Denial> {
        let agent = self.agent(&request).await?;
        let req = request.get_ref();
        let ask = Ask::parse(&req.pod_ip, &req.pod_uid, &req.role)?;
        // A pod the agent already knows may not have reached this server's watch yet.
        self.authorizer.pods.wait_for_pod(&ask.pod_ip, &ask.pod_uid, self.pod_wait).await;
        let (pod, key) = match self.authorizer.authorize(&ask, &agent) {
            Ok(found) => found,
            Err(authorizer::Refusal { pod, denial }) => {
                tracing::info!(ip = %ask.pod_ip, agent_node = ?agent.node, reason = denial.reason().as_str(), %denial, "denied");
                if let Some(pod) = pod {
                    self.events.denied(&pod, denial.reason().as_str(), &denial.to_string());
                }
                return Err(denial);
            }
        };
        let (issued, served) = match self.cache.get(&pod.namespace, &key).await {
            Ok(ok) => ok,
            Err(error) => {
                let denial = Denial::Sts(error);
                tracing::warn!(namespace = %pod.namespace, pod = %pod.name, role = %key.role_arn, %denial, "no credentials");
                self.events.denied(&pod, denial.reason().as_str(), &denial.to_string());
                return Err(denial);
            }
        };
        // The pod may have gone while STS answered; its session must not outlive it.
        if self.authorizer.pods.by_uid(&pod.uid).is_none() {
            self.cache.release(&pod.uid);
            return Err(Denial::PodNotFound(ask.pod_ip));
        }
        tracing::info!(
            namespace = %pod.namespace,
            pod = %pod.name,
            role_arn = %key.role_arn,
            session_name = %key.session_name,
            access_key_id = %issued.access_key_id,
            served = ?served,
            "credentials issued"
        );
        Ok(GetCredentialsResponse::from(&*issued))
    }
}
