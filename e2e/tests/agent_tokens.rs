//! What an agent token and a pod that never runs can still cost, on real parts: the server's own
//! process on a real apiserver, moto as STS, and a tonic client with a test CA standing in for
//! agents. A deleted agent pod's token stops working at once (not ten minutes later); made-up
//! tokens on one connection cost the apiserver a few TokenReviews, not one each; and pods that are
//! never scheduled cost no AssumeRole.

use imdsgate_e2e::components::{ControlPlane, Pki, ServerProcess, grpc_client};
use imdsgate_e2e::{Cluster, PodSpec, Sts, e2e_enabled};
use imdsgate_proto::Reason;
use imdsgate_proto::v1::GetCredentialsRequest;
use imdsgate_proto::v1::credentials_client::CredentialsClient;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const ROLE_BASE: &str = "--role-base-arn=arn:aws:iam::123456789012:role/";
const ROLE: (&str, &str) = ("iam.amazonaws.com/role", "app-reader");
const SUCCESS: &str = "imdsgate_server_sts_calls_total{result=\"Success\"}";

/// A cluster with node-a, its agent pod, namespace team-a permitting `app-.*` with the running pod
/// `web` (10.1.0.10), moto and a running server.
struct Bed {
    cluster: Cluster,
    _sts: Sts,
    pki: Pki,
    server: ServerProcess,
    agent_pod: Pod,
    token: String,
}

impl Bed {
    async fn start() -> Bed {
        let ControlPlane { cluster, sts, agent_pod, agent_token: token } =
            ControlPlane::start().await.expect("control plane");
        cluster
            .create_pod(&PodSpec::new("team-a", "web", "node-a").annotation(ROLE.0, ROLE.1))
            .await
            .unwrap();
        cluster.set_pod_status("team-a", "web", &["10.1.0.10"], "Running").await.unwrap();
        let pki = Pki::new().unwrap();
        let server =
            ServerProcess::start(&cluster, &sts, &pki.files(), &[ROLE_BASE]).await.expect("server starts");
        Bed { cluster, _sts: sts, pki, server, agent_pod, token }
    }

    /// A new mutual-TLS connection, as an agent's.
    async fn connect(&self) -> CredentialsClient<Channel> {
        grpc_client(self.server.grpc, &self.pki.ca.cert_pem(), Some(&self.pki.agent)).await.expect("connects")
    }

    async fn web_uid(&self) -> String {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.cluster.client(), "team-a");
        pods.get("web").await.unwrap().metadata.uid.unwrap()
    }

    /// team-a/web's credentials, asked on `client` with `token`.
    async fn ask(&self, client: &mut CredentialsClient<Channel>, token: &str) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(GetCredentialsRequest {
            pod_ip: "10.1.0.10".into(),
            pod_uid: self.web_uid().await,
            role: ROLE.1.into(),
        });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.get_credentials(request).await.map(|_| ())
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.server.metric(sample).await.unwrap()
    }

    async fn wait_metric_at_least(&self, sample: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric(sample).await < value {
            assert!(
                Instant::now() < deadline,
                "{sample} never reached {value}; server log:\n{}",
                self.server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_deleted_agent_pods_token_is_refused_at_once_and_made_up_tokens_cost_few_reviews() {
    if !e2e_enabled("a_deleted_agent_pods_token_is_refused_at_once_and_made_up_tokens_cost_few_reviews") {
        return;
    }
    let bed = Bed::start().await;
    let mut agent = bed.connect().await;
    bed.ask(&mut agent, &bed.token).await.expect("the agent's token works");

    // A client with a certificate sends 2,000 made-up tokens on one connection.
    let refused = "imdsgate_server_token_reviews_total{outcome=\"refused\"}";
    let before = bed.metric(refused).await;
    let mut flood = bed.connect().await;
    for n in 0..2_000 {
        let status = bed.ask(&mut flood, &format!("made-up-{n}")).await.unwrap_err();
        assert_eq!(Reason::of(&status), Some(Reason::AgentUnauthenticated), "{status:?}");
    }
    let reviews = bed.metric(refused).await - before;
    let throttled = bed.metric("imdsgate_server_token_reviews_throttled_total").await;
    eprintln!(
        "2,000 made-up tokens on one connection: {reviews} TokenReviews, {throttled} calls refused unreviewed"
    );
    assert!(reviews <= 20.0, "{reviews} TokenReviews for 2,000 made-up tokens on one connection");
    assert!(throttled >= 1_900.0, "{throttled}");
    // The agent's own connection is untouched (its review is cached, and it has its own allowance).
    bed.ask(&mut agent, &bed.token).await.expect("the agent still gets through");

    // The agent pod is deleted: its token must stop working now, not when a cached review ends.
    let pods: kube::Api<Pod> = kube::Api::namespaced(bed.cluster.client(), "imdsgate");
    let name = bed.agent_pod.metadata.name.clone().unwrap();
    pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    let deleted = Instant::now();
    let refusal = loop {
        match bed.ask(&mut agent, &bed.token).await {
            Err(status) => break status,
            Ok(()) => {
                assert!(
                    deleted.elapsed() < Duration::from_secs(20),
                    "a deleted agent pod's token still gets credentials after 20 s; server log:\n{}",
                    bed.server.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!("a deleted agent pod's token refused {:?} after the deletion", deleted.elapsed());
    assert_eq!(Reason::of(&refusal), Some(Reason::AgentUnauthenticated), "{refusal:?}");
    // And it stays refused.
    let mut fresh = bed.connect().await;
    assert!(bed.ask(&mut fresh, &bed.token).await.is_err());
}

#[tokio::test]
async fn pods_never_scheduled_cost_no_assume_role() {
    if !e2e_enabled("pods_never_scheduled_cost_no_assume_role") {
        return;
    }
    let bed = Bed::start().await;
    // team-a/web is prefetched from the initial list.
    bed.wait_metric_at_least(SUCCESS, 1.0).await;
    let before = bed.metric(SUCCESS).await;

    // 200 pods naming a permitted role that no scheduler ever places (no nodeName).
    let started = Instant::now();
    for n in 0..200 {
        let name = format!("unscheduled-{n}");
        bed.cluster.create_pod(&PodSpec::new("team-a", &name, "").annotation(ROLE.0, ROLE.1)).await.unwrap();
    }
    // Then one that is scheduled (to node-a; no IP yet): prefetched. The watch delivers events in
    // order, so once its call is counted, every unscheduled pod before it has been judged.
    bed.cluster
        .create_pod(&PodSpec::new("team-a", "scheduled", "node-a").annotation(ROLE.0, ROLE.1))
        .await
        .unwrap();
    bed.wait_metric_at_least(SUCCESS, before + 1.0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = bed.metric(SUCCESS).await - before;
    eprintln!(
        "200 unscheduled pods and 1 scheduled, created in {:?}: {calls} AssumeRole calls",
        started.elapsed()
    );
    assert_eq!(calls, 1.0, "only the scheduled pod costs an AssumeRole");
}
