//! Everything that is not the pod's own identity: proxied to the real metadata service with the
//! agent's own IMDSv2 token, but only for paths on the allow-list (what SDKs need to learn their
//! region and zone). The node's `iam/*` and `identity-credentials/*` are never proxied, whatever
//! the allow-list says; its secrets (user-data, public keys, the signed identity document) only
//! with `--unsafe-allow-node-secrets`. No `X-Forwarded-For` is added; nothing of the pod's request but its path
//! is passed on, and only as a [`CanonicalPath`]: the one spelling that was routed and checked
//! against the allow-list is the one sent upstream, so no dot segment, empty segment,
//! percent-encoding or case variant can make the metadata service see another path than the one
//! imdsgate checked.

use crate::imds::routes::CanonicalPath;
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use regex::RegexSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Paths proxied by default: region, zone and instance facts that SDKs and tools read.
pub const DEFAULT_ALLOW: &[&str] = &[
    r"^/[^/]+/meta-data/placement(/[a-z0-9-]+)*/?$",
    r"^/[^/]+/meta-data/instance-type$",
    r"^/[^/]+/meta-data/instance-id$",
    r"^/[^/]+/meta-data/local-ipv4$",
    r"^/[^/]+/meta-data/hostname$",
    r"^/[^/]+/meta-data/local-hostname$",
    r"^/[^/]+/meta-data/mac$",
    r"^/[^/]+/dynamic/instance-identity/document$",
];

const MAX_BODY: usize = 1 << 20;

/// Which paths may be proxied, matched against the canonical path.
#[derive(Clone, Debug)]
pub struct AllowList {
    patterns: RegexSet,
    /// `--unsafe-allow-node-secrets`: the patterns may open the node's secrets too.
    node_secrets: bool,
}

impl AllowList {
    pub fn new(patterns: &[String]) -> Result<AllowList, regex::Error> {
        Ok(AllowList { patterns: RegexSet::new(patterns)?, node_secrets: false })
    }

    pub fn default_list() -> AllowList {
        AllowList {
            patterns: RegexSet::new(DEFAULT_ALLOW).expect("default patterns compile"),
            node_secrets: false,
        }
    }

    /// Lets the patterns open the node's secrets (`--unsafe-allow-node-secrets`).
    pub fn with_node_secrets(self, allowed: bool) -> AllowList {
        AllowList { node_secrets: allowed, ..self }
    }

    /// Whether `path` may be proxied: it matches a pattern, names nothing of the node's own
    /// identity whatever the patterns say, and none of its secrets unless they were let through.
    pub fn allows(&self, path: &CanonicalPath) -> bool {
        !path.names_node_identity()
            && (self.node_secrets || !path.names_node_secret())
            && self.patterns.is_match(path.as_str())
    }
}

/// What the real metadata service answered.
#[derive(Clone, Debug)]
pub struct UpstreamResponse {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// The real metadata service, or a fake in tests.
pub trait Upstream: Send + Sync + 'static {
    fn get(&self, path: &CanonicalPath) -> BoxFuture<'static, Result<UpstreamResponse, String>>;
}

/// The real metadata service over HTTP, with the agent's own IMDSv2 token.
pub struct HttpUpstream {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl HttpUpstream {
    pub fn new(base: &Uri) -> Arc<HttpUpstream> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let base = base.to_string().trim_end_matches('/').to_string();
        Arc::new(HttpUpstream {
            base,
            client: Client::builder(TokioExecutor::new()).build(connector),
            token: tokio::sync::Mutex::new(None),
        })
    }

    async fn token(&self) -> Option<String> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Some(token.clone());
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
            .body(Empty::new())
            .ok()?;
        let response =
            tokio::time::timeout(Duration::from_secs(2), self.client.request(request)).await.ok()?.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = Limited::new(response.into_body(), 4096).collect().await.ok()?.to_bytes();
        let token = String::from_utf8(body.to_vec()).ok()?;
        *cached = Some((token.clone(), Instant::now() + Duration::from_secs(21600 - 60)));
        Some(token)
    }

    async fn fetch(self: Arc<Self>, path: CanonicalPath) -> Result<UpstreamResponse, String> {
        let token = self.token().await;
        let mut builder = Request::builder().method(Method::GET).uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            builder = builder.header("X-aws-ec2-metadata-token", token);
        }
        let request = builder.body(Empty::new()).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(3), self.client.request(request))
            .await
            .map_err(|_| "the metadata service did not answer in time".to_string())?
            .map_err(|e| format!("the metadata service cannot be reached: {e}"))?;
        let status = response.status().as_u16();
        let content_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the metadata service's answer: {e}"))?
            .to_bytes();
        Ok(UpstreamResponse { status, content_type, body })
    }
}

impl Upstream for Arc<HttpUpstream> {
    fn get(&self, path: &CanonicalPath) -> BoxFuture<'static, Result<UpstreamResponse, String>> {
        self.clone().fetch(path.clone()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(path: &str) -> CanonicalPath {
        CanonicalPath::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn the_default_list_allows_region_and_zone_and_nothing_secret() {
        let allow = AllowList::default_list();
        for ok in [
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/placement/region",
            "/2009-04-04/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document",
            "/latest/meta-data/placement/",
        ] {
            assert!(allow.allows(&canonical(ok)), "{ok}");
        }
        for blocked in [
            "/latest/user-data",
            "/latest/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/dynamic/instance-identity/signature",
        ] {
            assert!(!allow.allows(&canonical(blocked)), "{blocked}");
        }
    }

    #[test]
    fn an_allow_everything_list_still_never_allows_the_nodes_identity() {
        let allow = AllowList::new(&[".*".to_string()]).unwrap();
        assert!(allow.allows(&canonical("/latest/meta-data/placement/region")));
        assert!(allow.allows(&canonical("/latest/meta-data/network/interfaces/macs/0a:1b:2c:3d:4e:5f/")));
        for node in [
            "/latest/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/IAM/security-credentials/node-role",
            "/latest/meta-data/Iam/info",
            "/latest/meta-data/iam.",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/Identity-Credentials/ec2/info",
            "/latest/meta-data/identity_credentials/ec2/info",
            "/latest/dynamic/iam/info",
            "/iam/meta-data/iam",
        ] {
            assert!(!allow.allows(&canonical(node)), "{node}");
        }
    }

    /// The node's secrets stay closed to an allow-everything list in every spelling the canonical
    /// form lets through, and open only with the explicit unsafe flag.
    #[test]
    fn an_allow_everything_list_opens_the_nodes_secrets_only_with_the_unsafe_flag() {
        let allow = AllowList::new(&[".*".to_string()]).unwrap();
        let secrets = [
            "/latest/user-data",
            "/latest/User-Data",
            "/latest/user_data",
            "/latest/userdata/",
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/meta-data/Public-Keys/",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/PKCS7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048",
            "/2021-01-03/dynamic/instance-identity/RSA-2048",
        ];
        for secret in secrets {
            assert!(!allow.allows(&canonical(secret)), "{secret}");
        }
        assert!(allow.allows(&canonical("/latest/dynamic/instance-identity/document")));
        let opened = allow.with_node_secrets(true);
        for secret in secrets {
            assert!(opened.allows(&canonical(secret)), "{secret}");
        }
        assert!(!opened.allows(&canonical("/latest/meta-data/iam/info")), "the node's role never");
    }
}
