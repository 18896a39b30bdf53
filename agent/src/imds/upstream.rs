//! Everything that is not the pod's own identity: proxied to the real metadata service with the
//! agent's own IMDSv2 token, but only for paths on the allow-list (what SDKs need to learn their
//! region and zone). The node's `iam/*` and `identity-credentials/*` are never proxied, whatever
//! the allow-list says. No `X-Forwarded-For` is added; nothing of the pod's request but its path
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
pub struct AllowList(RegexSet);

impl AllowList {
    pub fn new(patterns: &[String]) -> Result<AllowList, regex::Error> {
        Ok(AllowList(RegexSet::new(patterns)?))
    }

    pub fn default_list() -> AllowList {
        AllowList(RegexSet::new(DEFAULT_ALLOW).expect("default patterns compile"))
    }

    /// Whether `path` may be proxied: it matches a pattern and names nothing of the node's own
    /// identity, whatever the patterns say.
    pub fn allows(&self, path: &CanonicalPath) -> bool {
        !path.names_node_identity() && self.0.is_match(path.as_str())
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
}
