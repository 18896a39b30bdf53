//! The IMDS API as a pod sees it: IMDSv2 session tokens, the pod's role and credentials under
//! `iam/`, and everything else proxied or blocked. The calling pod is named by the connection's
//! source IP; a request never gets another pod's credentials or the node's role. Every refusal is
//! an [`ImdsError`], turned into an HTTP status in one place ([`ImdsError::status`]).

pub mod credential_document;
pub mod listener;
pub mod refusal_events;
pub mod routes;
pub mod token;
pub mod upstream;

use crate::credentials::credential_cache::CredentialCache;
use crate::credentials::server_client::ServerError;
use crate::imds::credential_document::info_json;
use crate::imds::routes::{CanonicalPath, NotCanonical, Route};
use crate::imds::token::{TokenError, TokenKey};
use crate::imds::upstream::{AllowList, Upstream};
use crate::metrics::{
    Metrics, Route as RouteLabel, UpstreamLabels, UpstreamOutcome, WaitLabels, WaitOutcome,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use imdsgate_core::pod_index::Claim;
use imdsgate_core::role::{self, RoleError};
use imdsgate_core::{PodIndex, PodInfo};
use imdsgate_proto::Reason;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
// The same names parsed once: a lookup by `&str` parses the name on every request.
static TOKEN: HeaderName = HeaderName::from_static(TOKEN_HEADER);
static TTL: HeaderName = HeaderName::from_static(TTL_HEADER);
static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("requests from the node's own addresses (or loopback) are not served by imdsgate")]
    FromNode,
    #[error("imdsgate found no pod with IP {0} on this node")]
    PodNotFound(IpAddr),
    #[error("more than one pod claims IP {0}; try again")]
    AmbiguousPod(IpAddr),
    #[error("pod {0} has no iam.amazonaws.com/role annotation")]
    NoRole(String),
    /// The annotation names no role, read as the server reads it ([`imdsgate_core::role`]).
    #[error("pod {pod}'s iam.amazonaws.com/role annotation names no role: {error}")]
    RoleInvalid { pod: String, error: RoleError },
    #[error("{0} is not this pod's role")]
    NotThePodsRole(String),
    #[error("a session token is required (IMDSv2)")]
    TokenRequired,
    #[error("the session token is not valid: {0}")]
    BadToken(TokenError),
    #[error("X-aws-ec2-metadata-token-ttl-seconds must be an integer from 1 to 21600")]
    BadTtl,
    #[error("requests carrying X-Forwarded-For are refused")]
    Forwarded,
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(Method),
    #[error("imdsgate blocked {0}: it is not on the agent's allow-list")]
    Blocked(String),
    #[error("imdsgate refused {path:?}: {why}; only canonical paths are served")]
    NotCanonical { path: String, why: NotCanonical },
    #[error("{0}")]
    Server(ServerError),
    #[error("the metadata service failed: {0}")]
    Upstream(String),
}

impl ImdsError {
    /// The one place refusals become HTTP statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            // The server would refuse it (ROLE_INVALID) the same way.
            ImdsError::FromNode | ImdsError::Forwarded | ImdsError::RoleInvalid { .. } => {
                StatusCode::FORBIDDEN
            }
            ImdsError::PodNotFound(_)
            | ImdsError::NoRole(_)
            | ImdsError::NotThePodsRole(_)
            | ImdsError::Blocked(_)
            | ImdsError::NotCanonical { .. } => StatusCode::NOT_FOUND,
            // Transient: the watch is catching up; SDKs retry 5xx.
            ImdsError::AmbiguousPod(_) => StatusCode::SERVICE_UNAVAILABLE,
            ImdsError::TokenRequired | ImdsError::BadToken(_) => StatusCode::UNAUTHORIZED,
            ImdsError::BadTtl => StatusCode::BAD_REQUEST,
            ImdsError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ImdsError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ImdsError::Server(ServerError::Unreachable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ImdsError::Server(ServerError::Refused { code, reason, .. }) => match (code, reason) {
                (_, Some(Reason::NoRole)) => StatusCode::NOT_FOUND,
                (tonic::Code::PermissionDenied, _) => StatusCode::FORBIDDEN,
                (tonic::Code::InvalidArgument, _) => StatusCode::INTERNAL_SERVER_ERROR,
                // Pod not yet known to the server, IP reuse, STS down, agent not authenticated:
                // nothing the pod did; it may succeed on retry.
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }
}

/// The IMDS service for the pods of one node.
pub struct Imds {
    pub pods: Arc<PodIndex>,
    pub node_ips: Vec<IpAddr>,
    pub pod_wait: Duration,
    pub tokens: TokenKey,
    pub require_imdsv2: bool,
    pub credentials: Arc<CredentialCache>,
    pub upstream: Option<Arc<dyn Upstream>>,
    pub allow: AllowList,
    pub metrics: Metrics,
    /// Warning Events on pods for the refusals only the agent sees.
    pub events: Arc<crate::imds::refusal_events::AgentEvents>,
}

impl Imds {
    /// Whether `ip` can be the address of a pod of this node at all: not the node's own, not
    /// loopback, unspecified, multicast or broadcast. Others are refused at once, with no wait.
    pub fn can_be_pod(&self, ip: IpAddr) -> bool {
        // The dual-stack socket shows IPv4 peers as IPv4-mapped IPv6 addresses.
        let ip = ip.to_canonical();
        let special = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()
            }
            IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast(),
        };
        !special && !self.node_ips.contains(&ip)
    }

    /// Who claims `ip` in the pod index: [`Claim::Nobody`] for an address no pod can have.
    pub fn claim(&self, ip: IpAddr) -> Claim {
        let ip = ip.to_canonical();
        if self.can_be_pod(ip) { self.pods.claim(&ip) } else { Claim::Nobody }
    }

    /// Answers one request from `peer`. `claim`: who claims `peer` in the pod index, if the caller
    /// has just looked ([`Imds::claim`]; the listener does, for the budget), so the index is not
    /// asked twice; `None` to look here. A pod not yet known is waited for all the same.
    pub async fn handle(
        &self,
        peer: IpAddr,
        claim: Option<Claim>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> (RouteLabel, Response<Full<Bytes>>) {
        let route = Route::of(path);
        let label = route.label();
        // The dual-stack socket shows IPv4 peers as IPv4-mapped IPv6 addresses.
        let source = peer.to_canonical();
        // Built synchronously around at most one await on the hot path (the credential cache), in
        // this one function: every nested `async fn` is one more copy of its state per request.
        let answer = 'answer: {
            let token_ttl = if matches!(route, Route::Token) {
                match token_request(method, headers) {
                    Ok(ttl) => Some(ttl),
                    Err(error) => break 'answer Err(error),
                }
            } else if method != Method::GET && method != Method::HEAD {
                break 'answer Err(ImdsError::MethodNotAllowed(method.clone()));
            } else {
                None
            };
            let asks_for_credentials = matches!(
                route,
                Route::IamListing | Route::RoleName { .. } | Route::Credentials { .. } | Route::IamInfo
            );
            let pod = match self.known_pod(source, claim) {
                Ok(Some(pod)) => Ok(pod),
                // Boxed: the wait's state stays out of the future of a request whose pod is known.
                Ok(None) => Box::pin(self.wait_for_pod(source)).await,
                Err(error) => Err(error),
            };
            let pod = match pod {
                Ok(pod) => pod,
                Err(error) => {
                    if asks_for_credentials && matches!(error, ImdsError::PodNotFound(_)) {
                        self.events.unknown_source(source);
                    }
                    break 'answer Err(error);
                }
            };
            if let Some(ttl) = token_ttl {
                break 'answer Ok(self.issue_token(&pod, ttl));
            }
            if let Err(error) = self.check_token(&pod, headers) {
                break 'answer Err(error);
            }
            let answer = match answer_pod(&pod, path, route) {
                Ok(Step::Answer(response)) => Ok(response),
                Ok(Step::Credentials { role, document }) => {
                    match self.credentials.get(source, &pod.uid, &pod.ips, role).await {
                        Ok(creds) => Ok(json(match document {
                            Document::Credentials { extended } => creds.document(extended),
                            Document::Info => info_json(&creds).into(),
                        })),
                        Err(error) => Err(ImdsError::Server(error)),
                    }
                }
                // Boxed: the proxy's state stays out of every other request's future.
                Ok(Step::Proxy(canonical)) => Box::pin(self.proxy(&canonical)).await,
                Err(error) => Err(error),
            };
            if let Err(error) = &answer
                && asks_for_credentials
            {
                self.events.refused(&pod, error);
            }
            answer
        };
        let response = match answer {
            Ok(response) => response,
            Err(error) => {
                if matches!(error, ImdsError::Blocked(_) | ImdsError::NotCanonical { .. }) {
                    self.metrics
                        .upstream
                        .get_or_create(&UpstreamLabels { outcome: UpstreamOutcome::Blocked })
                        .inc();
                }
                tracing::debug!(%peer, path, %error, "refused");
                text(error.status(), format!("{error}\n").into())
            }
        };
        (label, response)
    }

    /// A session token for `pod`, valid for `ttl` (the request checked by [`token_request`]).
    fn issue_token(&self, pod: &PodInfo, ttl: Duration) -> Response<Full<Bytes>> {
        let token = self.tokens.issue(&pod.uid, ttl, SystemTime::now());
        let mut response = text(StatusCode::OK, token.into());
        let ttl = match ttl.as_secs() {
            // What the SDKs ask for.
            token::MAX_TTL => HeaderValue::from_static("21600"),
            secs => HeaderValue::from(secs),
        };
        response.headers_mut().insert(TTL.clone(), ttl);
        response
    }

    fn check_token(&self, pod: &PodInfo, headers: &HeaderMap) -> Result<(), ImdsError> {
        match headers.get(&TOKEN) {
            Some(value) => {
                let token = value.to_str().map_err(|_| ImdsError::BadToken(TokenError::Malformed))?;
                self.tokens.verify(token, &pod.uid, SystemTime::now()).map_err(ImdsError::BadToken)
            }
            None if self.require_imdsv2 => Err(ImdsError::TokenRequired),
            None => Ok(()),
        }
    }

    /// The pod at `peer` if the index (`claim`: who claimed it a moment ago, if the caller
    /// looked) has it; `None` when it is to be waited for ([`Imds::wait_for_pod`]).
    fn known_pod(&self, peer: IpAddr, claim: Option<Claim>) -> Result<Option<Arc<PodInfo>>, ImdsError> {
        if !self.can_be_pod(peer) {
            return Err(ImdsError::FromNode);
        }
        match claim.unwrap_or_else(|| self.pods.claim(&peer)) {
            Claim::One(pod) => Ok(Some(pod)),
            Claim::Several => Err(ImdsError::AmbiguousPod(peer)),
            Claim::Nobody => Ok(None),
        }
    }

    /// The pod at `peer`, waiting (event-driven) up to `--pod-wait` for the watch to deliver it.
    async fn wait_for_pod(&self, peer: IpAddr) -> Result<Arc<PodInfo>, ImdsError> {
        let pods = self.pods.wait_for_ip(&peer, self.pod_wait).await;
        let outcome = if pods.is_empty() { WaitOutcome::TimedOut } else { WaitOutcome::Found };
        self.metrics.pod_waits.get_or_create(&WaitLabels { outcome }).inc();
        match pods.as_slice() {
            [] => Err(ImdsError::PodNotFound(peer)),
            [pod] => Ok(pod.clone()),
            _ => Err(ImdsError::AmbiguousPod(peer)),
        }
    }

    async fn proxy(&self, path: &CanonicalPath) -> Result<Response<Full<Bytes>>, ImdsError> {
        let upstream = match &self.upstream {
            Some(u) if self.allow.allows(path) => u,
            _ => return Err(ImdsError::Blocked(path.to_string())),
        };
        let outcome = upstream.get(path).await;
        let label = if outcome.is_ok() { UpstreamOutcome::Proxied } else { UpstreamOutcome::Failed };
        self.metrics.upstream.get_or_create(&UpstreamLabels { outcome: label }).inc();
        let answer = outcome.map_err(ImdsError::Upstream)?;
        let mut response = Response::new(Full::new(answer.body));
        *response.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
        if let Some(content_type) = answer.content_type {
            response.headers_mut().insert(header::CONTENT_TYPE, content_type);
        }
        Ok(response)
    }
}

/// What a request of `pod` needs once its token is checked: an answer, the pod's credentials, or
/// the metadata service.
enum Step<'a> {
    Answer(Response<Full<Bytes>>),
    Credentials { role: &'a str, document: Document },
    Proxy(CanonicalPath),
}

/// Which document of the pod's credentials.
enum Document {
    Credentials { extended: bool },
    Info,
}

/// The answer to `route` from `pod`, as far as it needs nothing but the pod.
fn answer_pod<'a>(pod: &'a PodInfo, path: &str, route: Route<'_>) -> Result<Step<'a>, ImdsError> {
    match route {
        Route::Token => unreachable!("handled before"),
        Route::IamListing => {
            role_name(pod)?;
            Ok(Step::Answer(text(StatusCode::OK, Bytes::from_static(b"info\nsecurity-credentials/"))))
        }
        Route::RoleName { .. } => {
            Ok(Step::Answer(text(StatusCode::OK, Bytes::copy_from_slice(role_name(pod)?.as_bytes()))))
        }
        Route::Credentials { name, extended } => {
            let role = role_name(pod)?;
            if name != role {
                return Err(ImdsError::NotThePodsRole(name.to_string()));
            }
            Ok(Step::Credentials { role, document: Document::Credentials { extended } })
        }
        Route::IamInfo => Ok(Step::Credentials { role: role_name(pod)?, document: Document::Info }),
        Route::Blocked => Err(ImdsError::Blocked(path.to_string())),
        Route::NotCanonical(why) => Err(ImdsError::NotCanonical { path: path.to_string(), why }),
        Route::Proxy(canonical) => Ok(Step::Proxy(canonical)),
    }
}

/// The TTL a token request asks for, if it is one: a PUT with no `X-Forwarded-For` and a valid
/// TTL header.
fn token_request(method: &Method, headers: &HeaderMap) -> Result<Duration, ImdsError> {
    if method != Method::PUT {
        return Err(ImdsError::MethodNotAllowed(method.clone()));
    }
    if headers.contains_key(&FORWARDED_FOR) {
        return Err(ImdsError::Forwarded);
    }
    let ttl_header = headers.get(&TTL).and_then(|v| v.to_str().ok());
    token::parse_ttl(ttl_header).ok_or(ImdsError::BadTtl)
}

/// The role name a pod carries, as the server reads its annotation ([`role::role_name`]).
pub(crate) fn role_name(pod: &PodInfo) -> Result<&str, ImdsError> {
    let name = || format!("{}/{}", pod.namespace, pod.name);
    let annotation = pod.role.as_deref().ok_or_else(|| ImdsError::NoRole(name()))?;
    role::role_name(annotation).map_err(|error| ImdsError::RoleInvalid { pod: name(), error })
}

fn text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn json(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests;
