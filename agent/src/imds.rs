//! The IMDS API as a pod sees it: IMDSv2 session tokens, the pod's role and credentials under
//! `iam/`, and everything else proxied or blocked. The calling pod is named by the connection's
//! source IP; a request never gets another pod's credentials or the node's role. Every refusal is
//! an [`ImdsError`], turned into an HTTP status in one place ([`ImdsError::status`]).

use crate::credential_cache::{CachedCreds, CredentialCache, Creds, ServerError};
use crate::metrics::{
    Metrics, Route as RouteLabel, UpstreamLabels, UpstreamOutcome, WaitLabels, WaitOutcome,
};
use crate::token::{self, TokenError, TokenKey};
use crate::upstream::{AllowList, CanonicalPath, NotCanonical, Upstream};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use imdsgate_core::{PodIndex, PodInfo};
use imdsgate_proto::Reason;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// What a path asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Token,
    IamListing,
    IamInfo,
    RoleName {
        extended: bool,
    },
    Credentials {
        name: String,
        extended: bool,
    },
    /// Never proxied: the node's own IAM and identity credentials, in any spelling.
    Blocked,
    /// Refused: not a canonical path (see [`CanonicalPath`]).
    NotCanonical(NotCanonical),
    /// Proxied if the allow-list permits: exactly this path goes upstream.
    Proxy(CanonicalPath),
}

impl Route {
    /// Routes a request path (`/<version>/…`; any version segment, `latest` included). Only a
    /// [`CanonicalPath`] is routed; a segment naming `iam` or `identity-credentials` in any case or
    /// punctuation is [`Route::Blocked`] unless the path is exactly one of the IAM routes that the
    /// agent answers itself.
    pub fn of(path: &str) -> Route {
        let path = match CanonicalPath::parse(path) {
            Ok(path) => path,
            Err(why) => return Route::NotCanonical(why),
        };
        let segments: Vec<&str> = path.segments().collect();
        let version_ok =
            |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        let own = match segments.as_slice() {
            [v, "api", "token"] if version_ok(v) => Some(Route::Token),
            [v, "meta-data", "iam"] | [v, "meta-data", "iam", ""] if version_ok(v) => Some(Route::IamListing),
            [v, "meta-data", "iam", "info"] | [v, "meta-data", "iam", "info", ""] if version_ok(v) => {
                Some(Route::IamInfo)
            }
            [v, "meta-data", "iam", list] | [v, "meta-data", "iam", list, ""] if version_ok(v) => match *list
            {
                "security-credentials" => Some(Route::RoleName { extended: false }),
                "security-credentials-extended" => Some(Route::RoleName { extended: true }),
                _ => None,
            },
            [v, "meta-data", "iam", list, name] | [v, "meta-data", "iam", list, name, ""]
                if version_ok(v) && !name.is_empty() =>
            {
                match *list {
                    "security-credentials" => {
                        Some(Route::Credentials { name: name.to_string(), extended: false })
                    }
                    "security-credentials-extended" => {
                        Some(Route::Credentials { name: name.to_string(), extended: true })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match own {
            Some(route) => route,
            None if path.names_node_identity() => Route::Blocked,
            None => Route::Proxy(path),
        }
    }

    pub fn label(&self) -> RouteLabel {
        match self {
            Route::Token => RouteLabel::Token,
            Route::IamListing => RouteLabel::IamListing,
            Route::IamInfo => RouteLabel::IamInfo,
            Route::RoleName { .. } => RouteLabel::RoleName,
            Route::Credentials { .. } => RouteLabel::Credentials,
            Route::Blocked | Route::NotCanonical(_) => RouteLabel::Blocked,
            Route::Proxy(_) => RouteLabel::Proxied,
        }
    }
}

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
            ImdsError::FromNode | ImdsError::Forwarded => StatusCode::FORBIDDEN,
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
    pub events: Arc<crate::refusal_events::AgentEvents>,
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

    /// Answers one request from `peer`.
    pub async fn handle(
        &self,
        peer: IpAddr,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> (RouteLabel, Response<Full<Bytes>>) {
        let route = Route::of(path);
        let label = route.label();
        let response = match self.answer(peer.to_canonical(), method, path, headers, route).await {
            Ok(response) => response,
            Err(error) => {
                if matches!(error, ImdsError::Blocked(_) | ImdsError::NotCanonical { .. }) {
                    self.metrics
                        .upstream
                        .get_or_create(&UpstreamLabels { outcome: UpstreamOutcome::Blocked })
                        .inc();
                }
                tracing::debug!(%peer, path, %error, "refused");
                text(error.status(), format!("{error}\n"))
            }
        };
        (label, response)
    }

    async fn answer(
        &self,
        peer: IpAddr,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        route: Route,
    ) -> Result<Response<Full<Bytes>>, ImdsError> {
        if route == Route::Token {
            return self.issue_token(peer, method, headers).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(ImdsError::MethodNotAllowed(method.clone()));
        }
        let asks_for_credentials = matches!(
            route,
            Route::IamListing | Route::RoleName { .. } | Route::Credentials { .. } | Route::IamInfo
        );
        let pod = match self.pod_of(peer).await {
            Ok(pod) => pod,
            Err(error) => {
                if asks_for_credentials && matches!(error, ImdsError::PodNotFound(_)) {
                    self.events.unknown_source(peer);
                }
                return Err(error);
            }
        };
        self.check_token(&pod, headers)?;
        let answer = self.answer_pod(&pod, peer, path, route).await;
        if let Err(error) = &answer
            && asks_for_credentials
        {
            self.events.refused(&pod, error);
        }
        answer
    }

    async fn answer_pod(
        &self,
        pod: &PodInfo,
        peer: IpAddr,
        path: &str,
        route: Route,
    ) -> Result<Response<Full<Bytes>>, ImdsError> {
        match route {
            Route::Token => unreachable!("handled above"),
            Route::IamListing => {
                role_name(pod)?;
                Ok(text(StatusCode::OK, "info\nsecurity-credentials/".into()))
            }
            Route::RoleName { .. } => Ok(text(StatusCode::OK, role_name(pod)?.to_string())),
            Route::Credentials { name, extended } => {
                if name != role_name(pod)? {
                    return Err(ImdsError::NotThePodsRole(name));
                }
                let creds = self.creds(pod, peer).await?;
                Ok(json(creds.document(extended)))
            }
            Route::IamInfo => {
                let creds = self.creds(pod, peer).await?;
                Ok(json(info_json(&creds).into()))
            }
            Route::Blocked => Err(ImdsError::Blocked(path.to_string())),
            Route::NotCanonical(why) => Err(ImdsError::NotCanonical { path: path.to_string(), why }),
            Route::Proxy(canonical) => self.proxy(&canonical).await,
        }
    }

    async fn issue_token(
        &self,
        peer: IpAddr,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response<Full<Bytes>>, ImdsError> {
        if method != Method::PUT {
            return Err(ImdsError::MethodNotAllowed(method.clone()));
        }
        if headers.contains_key("x-forwarded-for") {
            return Err(ImdsError::Forwarded);
        }
        let ttl_header = headers.get(TTL_HEADER).and_then(|v| v.to_str().ok());
        let ttl = token::parse_ttl(ttl_header).ok_or(ImdsError::BadTtl)?;
        let pod = self.pod_of(peer).await?;
        let token = self.tokens.issue(&pod.uid, ttl, SystemTime::now());
        let mut response = text(StatusCode::OK, token);
        response.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl.as_secs()));
        Ok(response)
    }

    fn check_token(&self, pod: &PodInfo, headers: &HeaderMap) -> Result<(), ImdsError> {
        match headers.get(TOKEN_HEADER) {
            Some(value) => {
                let token = value.to_str().map_err(|_| ImdsError::BadToken(TokenError::Malformed))?;
                self.tokens.verify(token, &pod.uid, SystemTime::now()).map_err(ImdsError::BadToken)
            }
            None if self.require_imdsv2 => Err(ImdsError::TokenRequired),
            None => Ok(()),
        }
    }

    /// The pod at `peer`, waiting (event-driven) up to `--pod-wait` for the watch to deliver it.
    async fn pod_of(&self, peer: IpAddr) -> Result<Arc<PodInfo>, ImdsError> {
        if !self.can_be_pod(peer) {
            return Err(ImdsError::FromNode);
        }
        let mut pods = self.pods.by_ip(&peer);
        if pods.is_empty() {
            pods = self.pods.wait_for_ip(&peer, self.pod_wait).await;
            let outcome = if pods.is_empty() { WaitOutcome::TimedOut } else { WaitOutcome::Found };
            self.metrics.pod_waits.get_or_create(&WaitLabels { outcome }).inc();
        }
        match pods.as_slice() {
            [] => Err(ImdsError::PodNotFound(peer)),
            [pod] => Ok(pod.clone()),
            _ => Err(ImdsError::AmbiguousPod(peer)),
        }
    }

    async fn creds(&self, pod: &PodInfo, peer: IpAddr) -> Result<Arc<CachedCreds>, ImdsError> {
        let role = role_name(pod)?;
        self.credentials.get(peer, &pod.uid, &pod.ips, role).await.map_err(ImdsError::Server)
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

/// The role name a pod carries: the last path segment of its annotation.
fn role_name(pod: &PodInfo) -> Result<&str, ImdsError> {
    let annotation =
        pod.role.as_deref().ok_or_else(|| ImdsError::NoRole(format!("{}/{}", pod.namespace, pod.name)))?;
    let name = annotation.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    if name.is_empty() || name.starts_with("arn:") {
        return Err(ImdsError::NoRole(format!("{}/{}", pod.namespace, pod.name)));
    }
    Ok(name)
}

fn utc(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The credentials document exactly as IMDS writes it.
pub fn credentials_json(c: &Creds, extended: bool) -> String {
    let mut fields = vec![
        ("Code", quoted("Success")),
        ("LastUpdated", quoted(&utc(c.issued_at))),
        ("Type", quoted("AWS-HMAC")),
        ("AccessKeyId", quoted(&c.access_key_id)),
        ("SecretAccessKey", quoted(&c.secret_access_key)),
        ("Token", quoted(&c.session_token)),
        ("Expiration", quoted(&utc(c.expiration))),
    ];
    if extended {
        fields.push(("AccountId", quoted(&c.account_id)));
    }
    document(&fields)
}

/// `iam/info` describing the pod's role as if it were an instance profile.
pub fn info_json(c: &Creds) -> String {
    let profile_arn = c.role_arn.replacen(":role/", ":instance-profile/", 1);
    let digest = Sha256::digest(c.role_arn.as_bytes());
    let profile_id = format!("AIPA{}", hex::encode_upper(&digest[..8]));
    document(&[
        ("Code", quoted("Success")),
        ("LastUpdated", quoted(&utc(c.issued_at))),
        ("InstanceProfileArn", quoted(&profile_arn)),
        ("InstanceProfileId", quoted(&profile_id)),
    ])
}

fn document(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("  \"{k}\" : {v}")).collect();
    format!("{{\n{}\n}}", body.join(",\n"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
mod tests {
    use super::*;
    use crate::credential_cache::tests::FakeServer;
    use futures::FutureExt;
    use futures::future::BoxFuture;
    use http_body_util::BodyExt;
    use imdsgate_core::pod_index::ROLE_ANNOTATION;
    use k8s_openapi::api::core::v1::Pod;
    use std::sync::atomic::Ordering;

    const NODE_IP: &str = "10.0.0.1";

    struct FakeUpstream;

    impl Upstream for FakeUpstream {
        fn get(
            &self,
            path: &CanonicalPath,
        ) -> BoxFuture<'static, Result<crate::upstream::UpstreamResponse, String>> {
            let body = Bytes::from(format!("upstream:{path}"));
            async move { Ok(crate::upstream::UpstreamResponse { status: 200, content_type: None, body }) }
                .boxed()
        }
    }

    fn mk_pod(uid: &str, ip: &str, role: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "uid": uid, "name": uid, "namespace": "team",
                          "annotations": role.map(|r| serde_json::json!({ ROLE_ANNOTATION: r })) },
            "spec": { "nodeName": "node-a", "containers": [] },
            "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
        }))
        .unwrap()
    }

    struct Bed {
        imds: Imds,
        server: Arc<FakeServer>,
    }

    fn bed(require_imdsv2: bool) -> Bed {
        let pods = Arc::new(PodIndex::new());
        pods.apply(&mk_pod("uid-app", "10.0.1.1", Some("app-role")));
        pods.apply(&mk_pod("uid-arn", "10.0.1.2", Some("arn:aws:iam::123456789012:role/team/deployer")));
        pods.apply(&mk_pod("uid-none", "10.0.1.3", None));
        let server = FakeServer::new(Duration::from_secs(3600));
        let imds = Imds {
            pods,
            node_ips: vec![NODE_IP.parse().unwrap()],
            pod_wait: Duration::from_millis(200),
            tokens: TokenKey::from_bytes([1; 32]),
            require_imdsv2,
            credentials: Arc::new(CredentialCache::new(server.clone(), Metrics::new())),
            upstream: Some(Arc::new(FakeUpstream)),
            allow: AllowList::default_list(),
            metrics: Metrics::new(),
            events: Arc::new(crate::refusal_events::AgentEvents::new(None, "node-a".into(), Metrics::new())),
        };
        Bed { imds, server }
    }

    struct Got {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    impl Bed {
        async fn call(&self, from: &str, method: Method, path: &str, headers: &[(&str, &str)]) -> Got {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let (_, response) = self.imds.handle(from.parse().unwrap(), &method, path, &map).await;
            let status = response.status();
            let headers = response.headers().clone();
            let body =
                String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
            Got { status, headers, body }
        }

        async fn get(&self, from: &str, path: &str) -> Got {
            self.call(from, Method::GET, path, &[]).await
        }

        async fn token(&self, from: &str, ttl: &str) -> Got {
            self.call(
                from,
                Method::PUT,
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
            )
            .await
        }
    }

    #[test]
    fn routes() {
        use Route::*;
        assert_eq!(Route::of("/latest/api/token"), Token);
        assert_eq!(Route::of("/2021-01-03/api/token"), Token);
        assert_eq!(Route::of("/latest/meta-data/iam"), IamListing);
        assert_eq!(Route::of("/latest/meta-data/iam/"), IamListing);
        assert_eq!(Route::of("/latest/meta-data/iam/info"), IamInfo);
        assert_eq!(Route::of("/latest/meta-data/iam/security-credentials"), RoleName { extended: false });
        assert_eq!(Route::of("/latest/meta-data/iam/security-credentials/"), RoleName { extended: false });
        assert_eq!(
            Route::of("/latest/meta-data/iam/security-credentials-extended/"),
            RoleName { extended: true }
        );
        assert_eq!(
            Route::of("/latest/meta-data/iam/security-credentials/app"),
            Credentials { name: "app".into(), extended: false }
        );
        assert_eq!(
            Route::of("/2009-04-04/meta-data/iam/security-credentials-extended/app"),
            Credentials { name: "app".into(), extended: true }
        );
        for blocked in [
            "/latest/meta-data/iam/anything-else",
            "/latest/meta-data/iam/security-credentials-foo",
            "/latest/meta-data/iam/security-credentials/node-role/extra",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/identity-credentials/ec2/info",
            // Case and punctuation variants a lenient metadata service might fold onto iam/.
            "/latest/meta-data/IAM/security-credentials/node-role",
            "/latest/meta-data/Iam/info",
            "/latest/meta-data/iAm/",
            "/latest/META-DATA/iam/info",
            "/latest/Meta-Data/iam/security-credentials/node-role",
            "/latest/meta-data/iam./info",
            "/latest/meta-data/Identity-Credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/IDENTITY-CREDENTIALS/ec2/info",
            "/latest/meta-data/identity_credentials/ec2/info",
            "/latest/dynamic/iam/info",
            "/latest/iam/security-credentials/node-role",
            "/iam/meta-data",
        ] {
            assert_eq!(Route::of(blocked), Blocked, "{blocked}");
        }
        for not_canonical in [
            "/latest/meta-data/./iam/security-credentials/node-role",
            "/latest/./meta-data/iam/security-credentials/node-role",
            "/./latest/meta-data/iam/info",
            "/latest/meta-data/placement/../iam/info",
            "/latest/meta-data/placement/../../latest/meta-data/iam/info",
            "/latest/meta-data/iam/security-credentials/..",
            "/latest/meta-data/iam/security-credentials/.",
            "/latest/meta-data/iam/security-credentials%2Fapp",
            "/latest/meta-data/%69am/info",
            "/latest/meta-data/%2e/iam/info",
            "/latest/meta-data/%2E%2E/meta-data/iam/info",
            "/latest//meta-data/iam/info",
            "//latest/meta-data/iam/info",
            "/latest/meta-data//iam/info",
            "/latest/meta-data/iam//security-credentials/node-role",
            "/latest/meta-data\\iam\\info",
            "/latest/meta-data/placement/region;/../../iam/info",
            "/latest/meta-data/\u{130}am/info",
            "latest/meta-data/iam/info",
            "http://169.254.169.254/latest/meta-data/iam/info",
            "",
            "*",
            // Harmless, but still not the one spelling: refused, never rewritten.
            "/latest/meta-data/placement/./region",
            "/latest/meta-data/placement//region",
        ] {
            assert!(matches!(Route::of(not_canonical), NotCanonical(_)), "{not_canonical:?}");
        }
        let proxied = |p: &str| Proxy(CanonicalPath::parse(p).unwrap());
        for proxy in [
            "/latest/meta-data/placement/region",
            "/latest/user-data",
            "/latest/meta-data/network/interfaces/macs/0a:1b:2c:3d:4e:5f/local-ipv4s",
            "/latest/meta-data/",
            "/",
        ] {
            assert_eq!(Route::of(proxy), proxied(proxy), "{proxy}");
        }
    }

    #[tokio::test]
    async fn non_canonical_paths_are_refused_with_a_clear_body_and_never_proxied() {
        let mut b = bed(false);
        b.imds.allow = AllowList::new(&[".*".to_string()]).unwrap();
        for path in [
            "/latest/meta-data/./iam/security-credentials/node-role",
            "/latest/meta-data/placement/../iam/info",
            "/latest/meta-data/%69am/info",
            "/latest/meta-data/placement/./region",
        ] {
            let got = b.get("10.0.1.1", path).await;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
            assert!(got.body.contains("only canonical paths are served"), "{path}: {}", got.body);
            assert!(!got.body.contains("upstream:"), "{path}: {}", got.body);
        }
        for path in ["/latest/meta-data/IAM/security-credentials/node-role", "/latest/meta-data/Iam/info"] {
            let got = b.get("10.0.1.1", path).await;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
            assert!(!got.body.contains("upstream:"), "{path}: {}", got.body);
        }
        let got = b.get("10.0.1.1", "/latest/meta-data/placement/region").await;
        assert_eq!(got.body, "upstream:/latest/meta-data/placement/region");
    }

    #[tokio::test]
    async fn role_name_is_the_annotations_last_segment_without_newline() {
        let b = bed(false);
        for path in
            ["/latest/meta-data/iam/security-credentials", "/latest/meta-data/iam/security-credentials/"]
        {
            let got = b.get("10.0.1.1", path).await;
            assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "app-role"));
        }
        let got = b.get("10.0.1.2", "/latest/meta-data/iam/security-credentials/").await;
        assert_eq!(got.body, "deployer");
        let got = b.get("10.0.1.3", "/latest/meta-data/iam/security-credentials/").await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert!(got.body.contains("no iam.amazonaws.com/role"), "{}", got.body);
    }

    #[tokio::test]
    async fn credentials_are_exactly_the_imds_document() {
        let b = bed(false);
        let got = b.get("10.0.1.1", "/latest/meta-data/iam/security-credentials/app-role").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.headers[header::CONTENT_TYPE], "application/json");
        let lines: Vec<&str> = got.body.lines().collect();
        assert_eq!(lines[0], "{");
        assert_eq!(lines[1], r#"  "Code" : "Success","#);
        assert!(
            lines[2].starts_with(r#"  "LastUpdated" : ""#) && lines[2].ends_with(r#"Z","#),
            "{}",
            lines[2]
        );
        assert_eq!(lines[3], r#"  "Type" : "AWS-HMAC","#);
        assert!(lines[4].starts_with(r#"  "AccessKeyId" : "ASIA1-uid-app""#));
        assert_eq!(lines[5], r#"  "SecretAccessKey" : "secret\"with/quote","#, "values are JSON-escaped");
        assert_eq!(lines[6], r#"  "Token" : "token","#);
        assert_eq!(lines[8], "}");
        let doc: serde_json::Value = serde_json::from_str(&got.body).unwrap();
        let expiration = doc["Expiration"].as_str().unwrap();
        assert_eq!(expiration.len(), "2026-01-01T00:00:00Z".len());
        assert!(jiff::civil::DateTime::strptime("%Y-%m-%dT%H:%M:%SZ", expiration).is_ok(), "{expiration}");
        assert!(doc.get("AccountId").is_none());

        let extended =
            b.get("10.0.1.1", "/latest/meta-data/iam/security-credentials-extended/app-role").await;
        let doc: serde_json::Value = serde_json::from_str(&extended.body).unwrap();
        assert_eq!(doc["AccountId"], "123456789012");
        assert_eq!(b.server.calls.load(Ordering::SeqCst), 1, "both served from one server call");
    }

    #[tokio::test]
    async fn another_role_name_is_not_found_and_never_fetched() {
        let b = bed(false);
        let got = b.get("10.0.1.1", "/latest/meta-data/iam/security-credentials/admin").await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert_eq!(b.server.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn info_and_listing() {
        let b = bed(false);
        let got = b.get("10.0.1.1", "/latest/meta-data/iam/").await;
        assert_eq!(got.body, "info\nsecurity-credentials/");
        let got = b.get("10.0.1.1", "/latest/meta-data/iam/info").await;
        let doc: serde_json::Value = serde_json::from_str(&got.body).unwrap();
        assert_eq!(doc["Code"], "Success");
        assert_eq!(doc["InstanceProfileArn"], "arn:aws:iam::123456789012:instance-profile/app-role");
        assert!(doc["InstanceProfileId"].as_str().unwrap().starts_with("AIPA"));
        assert_eq!(b.get("10.0.1.3", "/latest/meta-data/iam/").await.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn imdsv2_tokens() {
        let b = bed(true);
        let path = "/latest/meta-data/iam/security-credentials/";
        assert_eq!(
            b.get("10.0.1.1", path).await.status,
            StatusCode::UNAUTHORIZED,
            "IMDSv1 refused when v2 is required"
        );
        let issued = b.token("10.0.1.1", "21600").await;
        assert_eq!(issued.status, StatusCode::OK);
        assert_eq!(issued.headers[TTL_HEADER], "21600", "the TTL header is echoed");
        let ok = b.call("10.0.1.1", Method::GET, path, &[(TOKEN_HEADER, &issued.body)]).await;
        assert_eq!((ok.status, ok.body.as_str()), (StatusCode::OK, "app-role"));
        let foreign = b.call("10.0.1.2", Method::GET, path, &[(TOKEN_HEADER, &issued.body)]).await;
        assert_eq!(foreign.status, StatusCode::UNAUTHORIZED, "another pod's token is useless");
        let junk = b.call("10.0.1.1", Method::GET, path, &[(TOKEN_HEADER, "junk")]).await;
        assert_eq!(junk.status, StatusCode::UNAUTHORIZED);
        for bad in ["0", "21601", "x", ""] {
            assert_eq!(b.token("10.0.1.1", bad).await.status, StatusCode::BAD_REQUEST, "ttl {bad:?}");
        }
        let no_ttl = b.call("10.0.1.1", Method::PUT, "/latest/api/token", &[]).await;
        assert_eq!(no_ttl.status, StatusCode::BAD_REQUEST);
        let forwarded = b
            .call(
                "10.0.1.1",
                Method::PUT,
                "/latest/api/token",
                &[(TTL_HEADER, "60"), ("X-Forwarded-For", "1.2.3.4")],
            )
            .await;
        assert_eq!(forwarded.status, StatusCode::FORBIDDEN);
        assert_eq!(
            b.call("10.0.1.1", Method::GET, "/latest/api/token", &[]).await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(b.call("10.0.1.1", Method::POST, path, &[]).await.status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn a_token_survives_a_restart_with_the_same_key() {
        let first = bed(true);
        let token = first.token("10.0.1.1", "60").await.body;
        let restarted = bed(true);
        let got = restarted
            .call(
                "10.0.1.1",
                Method::GET,
                "/latest/meta-data/iam/security-credentials",
                &[(TOKEN_HEADER, &token)],
            )
            .await;
        assert_eq!(got.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_ips_wait_then_404_and_the_node_is_refused() {
        let b = bed(false);
        let got = b.get("10.0.9.9", "/latest/meta-data/iam/security-credentials/").await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert!(got.body.contains("10.0.9.9"), "the body names the IP: {}", got.body);
        let got = b.get(NODE_IP, "/latest/meta-data/iam/security-credentials/").await;
        assert_eq!(got.status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_pod_that_appears_while_waiting_is_answered() {
        let b = Arc::new(bed(false));
        let waiter = {
            let b = b.clone();
            tokio::spawn(
                async move { b.get("10.0.1.7", "/latest/meta-data/iam/security-credentials/").await },
            )
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.imds.pods.apply(&mk_pod("uid-late", "10.0.1.7", Some("late-role")));
        let got = waiter.await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "late-role"));
    }

    #[tokio::test]
    async fn other_paths_are_proxied_only_when_allowed() {
        let b = bed(false);
        let got = b.get("10.0.1.1", "/latest/meta-data/placement/region").await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "upstream:/latest/meta-data/placement/region")
        );
        for blocked in [
            "/latest/user-data",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/iam/whatever",
        ] {
            let got = b.get("10.0.1.1", blocked).await;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{blocked}");
            assert!(got.body.contains("imdsgate blocked"), "{}", got.body);
        }
        // Even from a pod without a role, the node's role is never proxied.
        let got = b.get("10.0.1.3", "/latest/meta-data/iam/security-credentials/node-role").await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert!(!got.body.contains("upstream"));
    }

    #[tokio::test]
    async fn server_refusals_map_to_http_statuses() {
        let b = bed(false);
        let path = "/latest/meta-data/iam/security-credentials/app-role";
        let cases = [
            (
                ServerError::Refused {
                    code: tonic::Code::PermissionDenied,
                    reason: Some(Reason::NamespaceForbids),
                    message: "no".into(),
                },
                403,
            ),
            (
                ServerError::Refused {
                    code: tonic::Code::NotFound,
                    reason: Some(Reason::NoRole),
                    message: "no".into(),
                },
                404,
            ),
            (
                ServerError::Refused {
                    code: tonic::Code::Unavailable,
                    reason: Some(Reason::StsUnavailable),
                    message: "down".into(),
                },
                503,
            ),
            (
                ServerError::Refused {
                    code: tonic::Code::FailedPrecondition,
                    reason: Some(Reason::PodUidMismatch),
                    message: "reuse".into(),
                },
                503,
            ),
            (ServerError::Unreachable("refused".into()), 503),
        ];
        for (error, status) in cases {
            *b.server.answer.lock().unwrap() = Err(error.clone());
            let got = b.get("10.0.1.1", path).await;
            assert_eq!(got.status.as_u16(), status, "{error:?}");
        }
    }
}
