//! The `imdsgate.v1.Credentials` gRPC service: authenticate the agent, authorize the pod, serve
//! from the credential cache, audit every issuance and count every outcome.

use crate::agent_auth::AgentAuthenticator;
use crate::authorizer::{self, Ask, Authorizer, Denial};
use crate::credential_cache::CredentialCache;
use crate::events::DenialEvents;
use crate::metrics::{Metrics, ReasonLabels, Rpc, RpcLabels, RpcOnly};
use imdsgate_proto::AUTHORIZATION_METADATA_KEY;
use imdsgate_proto::v1::credentials_server::Credentials;
use imdsgate_proto::v1::{GetCredentialsRequest, GetCredentialsResponse};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct CredentialsService {
    /// How long a request for a pod this server's watch has not delivered yet waits for it (the
    /// agent's watch may be a little ahead).
    pub pod_wait: std::time::Duration,
    pub authn: Arc<AgentAuthenticator>,
    pub authorizer: Arc<Authorizer>,
    pub cache: CredentialCache,
    pub events: Arc<DenialEvents>,
    pub metrics: Metrics,
}

#[tonic::async_trait]
impl Credentials for CredentialsService {
    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<GetCredentialsResponse>, Status> {
        let started = Instant::now();
        let result = self.answer(request).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(denial) => {
                let reason = denial.reason().as_str().to_string();
                self.metrics.denials.get_or_create(&ReasonLabels { reason }).inc();
                denial.reason().code()
            }
        };
        let rpc = Rpc::GetCredentials;
        self.metrics.requests.get_or_create(&RpcLabels { rpc, code: format!("{code:?}") }).inc();
        self.metrics
            .request_duration
            .get_or_create(&RpcOnly { rpc })
            .observe(started.elapsed().as_secs_f64());
        result.map(Response::new).map_err(|d| d.to_status())
    }
}

impl CredentialsService {
    async fn answer(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<GetCredentialsResponse, Denial> {
        let authorization = request.metadata().get(AUTHORIZATION_METADATA_KEY).and_then(|v| v.to_str().ok());
        let agent = self.authn.authenticate(authorization).await?;
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
        let (issued, served) = match self.cache.get(&pod.uid, &key).await {
            Ok(ok) => ok,
            Err(error) => {
                let denial = Denial::Sts(error);
                tracing::warn!(namespace = %pod.namespace, pod = %pod.name, role = %key.role_arn, %denial, "no credentials");
                self.events.denied(&pod, denial.reason().as_str(), &denial.to_string());
                return Err(denial);
            }
        };
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
