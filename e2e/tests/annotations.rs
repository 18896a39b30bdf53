//! One reading of the role annotation across the product: for every spelling a pod owner may
//! write, the agent (what it lists at `security-credentials/` and whether it hands out
//! credentials), the server (its decision, reached through the agent as in production), the
//! admission webhook and `imdsgate-server explain` say the same thing. In-process, no root needed.

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use imdsgate_agent::credentials::credential_cache::{CredentialCache, CredentialSource, Quorum};
use imdsgate_agent::credentials::server_client::ServerError;
use imdsgate_agent::imds::Imds;
use imdsgate_agent::imds::refusal_events::AgentEvents;
use imdsgate_agent::imds::token::TokenKey;
use imdsgate_agent::imds::upstream::AllowList;
use imdsgate_core::{PodIndex, fixtures};
use imdsgate_proto::Credentials;
use imdsgate_server::admission::{Admission, AdmissionConfig, Verdict, WebhookMode};
use imdsgate_server::authz::authorizer::{Ask, Authorizer};
use imdsgate_server::authz::namespace_index::NamespaceIndex;
use imdsgate_server::authz::role_base::RoleBase;
use imdsgate_server::authz::session::TagConfig;
use imdsgate_server::explain::{Explanation, explain_pod};
use imdsgate_server::grpc::agent_auth::AgentIdentity;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const NODE: &str = "node-a";

/// The agent's credential source, answered by the server's own authorizer in process: what the
/// agent's gRPC call would get, minus the network.
struct InProcessServer(Arc<Authorizer>);

impl CredentialSource for InProcessServer {
    fn fetch(
        &self,
        pod_ip: IpAddr,
        pod_uid: &str,
        role: &str,
        _quorum: Quorum,
    ) -> BoxFuture<'static, Result<Credentials, ServerError>> {
        let ask = Ask { pod_ip, pod_uid: pod_uid.to_string(), role: role.to_string() };
        let agent = AgentIdentity { username: "agent".into(), node: Some(NODE.into()) };
        let answer = match self.0.authorize(&ask, &agent) {
            Ok((_, key)) => Ok(Credentials {
                access_key_id: "ASIATEST".into(),
                // The role the server issued them for, for the test to read back.
                secret_access_key: key.role_arn.to_string(),
                session_token: "token".into(),
                expiration: SystemTime::now() + Duration::from_secs(3600),
                issued_at: SystemTime::now(),
                role_arn: key.role_arn.to_string(),
                account_id: "123456789012".into(),
            }),
            Err(refusal) => {
                let status = refusal.denial.to_status();
                Err(ServerError::Refused {
                    code: status.code(),
                    reason: imdsgate_proto::Reason::of(&status),
                    message: status.message().to_string(),
                })
            }
        };
        async move { answer }.boxed()
    }
}

/// What each of the four says of one annotation.
#[derive(Debug)]
struct Said {
    /// The agent's `security-credentials/` listing: the role name, or the HTTP status.
    listed: Result<String, StatusCode>,
    /// Credentials for the listed name: the role ARN the server issued, or the HTTP status.
    served: Result<String, StatusCode>,
    webhook_admits: bool,
    explain_admits: bool,
}

async fn get(imds: &Imds, from: IpAddr, path: &str) -> (StatusCode, String) {
    let (_, response) = imds.handle(from, None, &Method::GET, path, &HeaderMap::new()).await;
    let status = response.status();
    let body: Bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn said(i: usize, annotation: &str) -> Said {
    let base = "arn:aws:iam::123456789012:role/";
    let namespaces = Arc::new(NamespaceIndex::new());
    namespaces.apply(&fixtures::namespace(
        "team",
        &[("iam.amazonaws.com/permitted", "arn:aws:iam::123456789012:role/.*")],
    ));
    let pods = Arc::new(PodIndex::new());
    let ip = format!("10.1.0.{}", i + 1);
    let pod = fixtures::pod(&format!("uid-{i}"), "web").node(Some(NODE)).ip(&ip).role(annotation).build();
    pods.apply(&pod);
    let authorizer = Arc::new(Authorizer {
        pods: pods.clone(),
        namespaces,
        base_arn: RoleBase::fixed(Some(imdsgate_core::role::BaseArn::parse(base).unwrap())),
        tags: TagConfig::default(),
    });
    let metrics = imdsgate_agent::metrics::Metrics::new();
    let imds = Imds {
        pods,
        node_ips: vec!["10.0.0.1".parse().unwrap()],
        pod_wait: Duration::from_millis(100),
        tokens: TokenKey::from_bytes([3; 32]),
        require_imdsv2: false,
        credentials: Arc::new(CredentialCache::new(
            Arc::new(InProcessServer(authorizer.clone())),
            metrics.clone(),
        )),
        upstream: None,
        allow: AllowList::default_list(),
        metrics: metrics.clone(),
        events: Arc::new(AgentEvents::new(None, NODE.into(), metrics)),
    };
    let from: IpAddr = ip.parse().unwrap();
    let listing = "/latest/meta-data/iam/security-credentials/";
    let listed = match get(&imds, from, listing).await {
        (StatusCode::OK, name) => Ok(name),
        (status, _) => Err(status),
    };
    // What an SDK does next: ask for the listed name (or, with nothing listed, the name the
    // annotation's last segment would be).
    let asked = listed.clone().unwrap_or_else(|_| annotation.trim().rsplit('/').next().unwrap_or("x").into());
    let asked = if asked.is_empty() { "x".to_string() } else { asked };
    let served = match get(&imds, from, &format!("{listing}{asked}")).await {
        (StatusCode::OK, body) => {
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(doc["Code"], "Success", "{body}");
            Ok(doc["SecretAccessKey"].as_str().unwrap().to_string())
        }
        (status, _) => Err(status),
    };
    let admission = Admission {
        config: AdmissionConfig {
            mode: WebhookMode::Enforce,
            server_node_labels: [("imdsgate.io/server-node".to_string(), "true".to_string())].into(),
            server_taint: "imdsgate.io/server-node:NoSchedule".parse().unwrap(),
            allow_host_network: false,
            host_network_exempt_label: None,
            exempt_namespaces: Default::default(),
        },
        authorizer: authorizer.clone(),
        client: None,
        metrics: imdsgate_server::metrics::Metrics::new(),
    };
    // The webhook judges the pod as created: before it is scheduled or has an IP.
    let created = fixtures::pod(&format!("uid-{i}"), "web").node(None).role(annotation).build();
    let webhook_admits = matches!(admission.decide("team", &created).await, Verdict::Allow);
    let mut explanation = Explanation::default();
    explain_pod(&mut explanation, &pod, "team", false, &authorizer);
    Said { listed, served, webhook_admits, explain_admits: !explanation.refused() }
}

/// What all four must say of a spelling: the role name the agent lists and the role ARN the
/// server issues, or `None` for both when it names no role.
type Expected = (Option<String>, Option<String>);

#[tokio::test]
async fn agent_server_webhook_and_explain_agree_on_every_spelling() {
    let ok = |name: &str, arn: &str| (Some(name.to_string()), Some(arn.to_string()));
    let refused = (None, None);
    let too_long = "r".repeat(65);
    let cases: Vec<(&str, Expected)> = vec![
        ("app-reader", ok("app-reader", "arn:aws:iam::123456789012:role/app-reader")),
        ("/app-reader", ok("app-reader", "arn:aws:iam::123456789012:role/app-reader")),
        (" app-reader\n", ok("app-reader", "arn:aws:iam::123456789012:role/app-reader")),
        ("team/app-reader", ok("app-reader", "arn:aws:iam::123456789012:role/team/app-reader")),
        (
            "arn:aws:iam::123456789012:role/ops/deployer",
            ok("deployer", "arn:aws:iam::123456789012:role/ops/deployer"),
        ),
        // A trailing `/` names no role, in either form.
        ("app-reader/", refused.clone()),
        ("team/app-reader/", refused.clone()),
        ("arn:aws:iam::123456789012:role/app-reader/", refused.clone()),
        ("/", refused.clone()),
        ("team//app-reader", refused.clone()),
        ("arn:aws:iam::12345:role/app-reader", refused.clone()),
        ("arn:aws:iam::123456789012:user/app-reader", refused.clone()),
        ("app reader", refused.clone()),
        ("app-reader\nx", refused.clone()),
        ("app-r\u{e9}ader", refused.clone()),
        (&too_long, refused.clone()),
    ];
    for (i, (annotation, (name, arn))) in cases.iter().enumerate() {
        let said = said(i, annotation).await;
        let what = format!("{annotation:?}: {said:?}");
        assert_eq!(said.listed.as_ref().ok(), name.as_ref(), "agent listing, {what}");
        assert_eq!(said.served.as_ref().ok(), arn.as_ref(), "credentials, {what}");
        let granted = arn.is_some();
        assert_eq!(said.webhook_admits, granted, "webhook, {what}");
        assert_eq!(said.explain_admits, granted, "explain, {what}");
        if !granted {
            assert_eq!(said.listed, Err(StatusCode::FORBIDDEN), "refused as the server refuses, {what}");
        }
    }
}
