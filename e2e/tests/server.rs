//! The server on real parts: its own process with the shipped RBAC on a real apiserver, moto as
//! STS, and a tonic client with a test CA standing in for agents.

use imdsgate_e2e::components::{ControlPlane, Pki, ServerProcess, grpc_client, http_get};
use imdsgate_e2e::process::free_port;
use imdsgate_e2e::{Cluster, PodSpec, Sts, e2e_enabled};
use imdsgate_proto::Reason;
use imdsgate_proto::v1::{GetCredentialsRequest, GetCredentialsResponse};
use k8s_openapi::api::core::v1::Pod;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const ROLE_BASE: &str = "--role-base-arn=arn:aws:iam::123456789012:role/";

/// A cluster with two nodes, an agent pod on each, namespaces and pods, moto and a running server.
struct Bed {
    cluster: Cluster,
    sts: Sts,
    pki: Pki,
    server: ServerProcess,
    token_a: String,
}

impl Bed {
    async fn start(server_args: &[&str]) -> Bed {
        Bed::start_with(server_args, None, None).await
    }

    /// [`Bed::start`] with the server's STS at `sts_endpoint` instead of moto, and its admission
    /// webhook on `webhook_port` (off when None).
    async fn start_with(server_args: &[&str], sts_endpoint: Option<&str>, webhook_port: Option<u16>) -> Bed {
        let ControlPlane { cluster, sts, agent_token: token_a, .. } =
            ControlPlane::start().await.expect("control plane");
        sts.create_role("app-intermediate").unwrap();
        cluster.create_node("node-b").await.unwrap();
        cluster.create_namespace("locked", &[]).await.unwrap();
        cluster.create_service_account("team-a", "web").await.unwrap();
        let role = ("iam.amazonaws.com/role", "app-reader");
        for (ns, name, node, ip, annotation) in [
            ("team-a", "web", "node-a", "10.1.0.10", Some(role)),
            ("team-a", "plain", "node-a", "10.1.0.11", None),
            ("team-a", "elsewhere", "node-b", "10.1.0.12", Some(role)),
            ("locked", "intruder", "node-a", "10.1.0.13", Some(role)),
            ("team-a", "greedy", "node-a", "10.1.0.14", Some(("iam.amazonaws.com/role", "admin"))),
        ] {
            let mut spec = PodSpec::new(ns, name, node);
            if let Some((k, v)) = annotation {
                spec = spec.annotation(k, v);
            }
            cluster.create_pod(&spec).await.unwrap();
            cluster.set_pod_status(ns, name, &[ip], "Running").await.unwrap();
        }
        let pki = Pki::new().unwrap();
        let tls = pki.files();
        let mut args: Vec<String> = server_args.iter().map(|a| a.to_string()).collect();
        if let Some(port) = webhook_port {
            args.push(format!("--webhook-listen=127.0.0.1:{port}"));
            args.push(format!("--webhook-tls-cert={}", tls.server_cert.display()));
            args.push(format!("--webhook-tls-key={}", tls.server_key.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ServerProcess::start_at(&cluster, sts_endpoint.unwrap_or(sts.endpoint()), &tls, &args)
            .await
            .expect("server starts");
        Bed { cluster, sts, pki, server, token_a }
    }

    async fn uid(&self, ns: &str, name: &str) -> String {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.cluster.client(), ns);
        pods.get(name).await.unwrap().metadata.uid.unwrap()
    }

    async fn ask(&self, ip: &str, uid: &str, role: &str) -> Result<GetCredentialsResponse, tonic::Status> {
        self.ask_as(&self.token_a, ip, uid, role).await
    }

    async fn ask_as(
        &self,
        token: &str,
        ip: &str,
        uid: &str,
        role: &str,
    ) -> Result<GetCredentialsResponse, tonic::Status> {
        self.ask_replica_as(self.server.grpc, token, ip, uid, role).await
    }

    /// [`Bed::ask`] of the server replica listening on `grpc`.
    async fn ask_replica(
        &self,
        grpc: SocketAddr,
        ip: &str,
        uid: &str,
        role: &str,
    ) -> Result<GetCredentialsResponse, tonic::Status> {
        self.ask_replica_as(grpc, &self.token_a, ip, uid, role).await
    }

    async fn ask_replica_as(
        &self,
        grpc: SocketAddr,
        token: &str,
        ip: &str,
        uid: &str,
        role: &str,
    ) -> Result<GetCredentialsResponse, tonic::Status> {
        let mut request = tonic::Request::new(GetCredentialsRequest {
            pod_ip: ip.into(),
            pod_uid: uid.into(),
            role: role.into(),
        });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut client = grpc_client(grpc, &self.pki.ca.cert_pem(), Some(&self.pki.agent))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("transport: {e:#}")))?;
        client.get_credentials(request).await.map(|r| r.into_inner())
    }

    /// Who STS says the holder of `creds` is.
    async fn caller_arn(&self, creds: &GetCredentialsResponse) -> String {
        let credentials = aws_credential_types::Credentials::new(
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(creds.session_token.clone()),
            None,
            "pod",
        );
        let identity = self.sts.client(credentials).get_caller_identity().send().await.unwrap();
        identity.arn().unwrap_or_default().to_string()
    }

    async fn wait_metric_at_least(&self, sample: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.server.metric(sample).await.unwrap() < value {
            assert!(
                Instant::now() < deadline,
                "{sample} never reached {value}; server log:\n{}",
                self.server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The webhook's answer (the AdmissionReview's `response`) for a pod in `namespace`, POSTed over
/// TLS as the apiserver would.
async fn review(
    webhook: SocketAddr,
    ca_pem: &str,
    namespace: &str,
    pod: serde_json::Value,
) -> serde_json::Value {
    let body = imdsgate_e2e::components::pod_review("server-review-1", namespace, pod);
    let (status, text) = imdsgate_e2e::components::post_review(webhook, ca_pem, &body).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let (_, json) = text.split_once("\r\n\r\n").expect("a body");
    serde_json::from_str::<serde_json::Value>(json).expect("an AdmissionReview")["response"].clone()
}

/// A pod manifest for [`review`].
fn pod_manifest(role: Option<&str>, host_network: bool) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "p", "annotations": role.map(|r| serde_json::json!({ "iam.amazonaws.com/role": r })) },
        "spec": { "hostNetwork": host_network, "containers": [{ "name": "c", "image": "registry.invalid/app:1" }] }
    })
}

/// Forwards every connection to 127.0.0.1:`listen` on to 127.0.0.1:`upstream` (STS coming back).
async fn relay(listen: u16, upstream: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await.expect("the STS port is free");
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

fn denied(result: Result<GetCredentialsResponse, tonic::Status>) -> (tonic::Code, Option<Reason>) {
    let status = result.expect_err("request must be refused");
    (status.code(), Reason::of(&status))
}

#[tokio::test]
async fn serves_annotated_permitted_pods_and_refuses_everything_else() {
    if !e2e_enabled("serves_annotated_permitted_pods_and_refuses_everything_else") {
        return;
    }
    let bed = Bed::start(&[ROLE_BASE]).await;
    let web = bed.uid("team-a", "web").await;

    // The permitted pod gets credentials of its own role and session.
    let creds = bed.ask("10.1.0.10", &web, "app-reader").await.expect("credentials for team-a/web");
    assert_eq!(creds.role_arn, "arn:aws:iam::123456789012:role/app-reader");
    assert_eq!(creds.account_id, "123456789012");
    let expiration = creds.expiration.unwrap().seconds;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(expiration - now > 45 * 60, "a fresh one-hour session, not {}s", expiration - now);
    assert_eq!(bed.caller_arn(&creds).await, "arn:aws:sts::123456789012:assumed-role/app-reader/team-a.web");

    // Every refusal, with its code and stable reason.
    let plain = bed.uid("team-a", "plain").await;
    let elsewhere = bed.uid("team-a", "elsewhere").await;
    let intruder = bed.uid("locked", "intruder").await;
    let greedy = bed.uid("team-a", "greedy").await;
    use tonic::Code::*;
    let cases = [
        ("no pod at the IP", "10.1.0.99", &web, "app-reader", NotFound, Reason::PodNotFound),
        ("pod without a role", "10.1.0.11", &plain, "app-reader", NotFound, Reason::NoRole),
        ("another role than annotated", "10.1.0.10", &web, "admin", PermissionDenied, Reason::RoleMismatch),
        (
            "namespace permits nothing",
            "10.1.0.13",
            &intruder,
            "app-reader",
            PermissionDenied,
            Reason::NamespaceForbids,
        ),
        (
            "namespace does not permit it",
            "10.1.0.14",
            &greedy,
            "admin",
            PermissionDenied,
            Reason::NamespaceForbids,
        ),
        ("pod on another node", "10.1.0.12", &elsewhere, "app-reader", PermissionDenied, Reason::WrongNode),
        ("UID of another pod", "10.1.0.10", &plain, "app-reader", FailedPrecondition, Reason::PodUidMismatch),
        ("malformed IP", "10.1.0.x", &web, "app-reader", InvalidArgument, Reason::InvalidArgument),
    ];
    for (case, ip, uid, role, code, reason) in cases {
        assert_eq!(denied(bed.ask(ip, uid, role).await), (code, Some(reason)), "{case}");
    }

    // Only the agent ServiceAccount's node-bound token is accepted.
    let app_token = bed.cluster.service_account_token("team-a", "web", &["imdsgate"], None).await.unwrap();
    let (code, reason) = denied(bed.ask_as(&app_token, "10.1.0.10", &web, "app-reader").await);
    assert_eq!((code, reason), (Unauthenticated, Some(Reason::AgentUnauthenticated)));
    let (code, _) = denied(bed.ask_as("not-a-token", "10.1.0.10", &web, "app-reader").await);
    assert_eq!(code, Unauthenticated);

    // The namespace refusal is recorded as a Warning Event on the pod, once.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(bed.cluster.client(), "locked");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = events.list(&Default::default()).await.unwrap();
        let mine: Vec<_> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("NAMESPACE_FORBIDS"))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("intruder"))
            .collect();
        if let Some(event) = mine.first() {
            assert_eq!(event.type_.as_deref(), Some("Warning"));
            assert!(event.note.as_deref().unwrap_or_default().contains("does not permit"), "{event:?}");
            assert_eq!(mine.len(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "no denial event; server log:\n{}", bed.server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Metrics count by reason, never by pod.
    assert!(
        bed.server.metric("imdsgate_server_denials_total{reason=\"NAMESPACE_FORBIDS\"}").await.unwrap()
            >= 2.0
    );
    let (_, text) = imdsgate_e2e::components::http_get(bed.server.admin, "/metrics").await.unwrap();
    assert!(!text.contains("10.1.0.") && !text.contains("intruder"), "metrics leak pod identity");
}

#[tokio::test]
async fn a_replica_whose_watches_have_not_synced_sends_the_agent_to_another() {
    if !e2e_enabled("a_replica_whose_watches_have_not_synced_sends_the_agent_to_another") {
        return;
    }
    let bed = Bed::start(&[ROLE_BASE]).await;
    let web = bed.uid("team-a", "web").await;
    // A second replica whose identity may review agents' tokens but list nothing: its watches
    // never sync, as a restarted replica's have not in the seconds (minutes, at scale) of its first
    // list. Without the check it would answer this request POD_NOT_FOUND.
    bed.cluster.create_service_account("imdsgate", "unsynced").await.unwrap();
    bed.cluster
        .kubectl(&[
            "create",
            "clusterrole",
            "unsynced",
            "--verb=create",
            "--resource=tokenreviews.authentication.k8s.io",
        ])
        .unwrap();
    bed.cluster
        .kubectl(&[
            "create",
            "clusterrolebinding",
            "unsynced",
            "--clusterrole=unsynced",
            "--serviceaccount=imdsgate:unsynced",
        ])
        .unwrap();
    let tls = bed.pki.files();
    let unsynced =
        ServerProcess::spawn(&bed.cluster, "unsynced", bed.sts.endpoint(), &tls, &[ROLE_BASE]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        // Until it listens, the connection is refused (also Unavailable): wait for its own answer.
        match bed.ask_replica(unsynced.grpc, "10.1.0.10", &web, "app-reader").await {
            Err(status) if status.message() == imdsgate_server::grpc::service::NOT_SYNCED => break status,
            Err(status) if Instant::now() < deadline && status.message().contains("transport") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("expected a refusal for want of sync, got {other:?}\n{}", unsynced.log()),
        }
    };
    // Unavailable with no reason: the agent's cue to try another replica (a POD_NOT_FOUND would
    // be final, and the pod would get a 404 although its pod exists).
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(Reason::of(&status), None, "no reason attached: {status:?}");
    assert_eq!(
        unsynced
            .metric("imdsgate_server_requests_total{rpc=\"GetCredentials\",code=\"Unavailable\"}")
            .await
            .unwrap(),
        1.0
    );
    let (code, _) = http_get(unsynced.admin, "/readyz").await.unwrap();
    assert_eq!(code, 503, "not ready either");
    // The synced replica answers the same request.
    let creds = bed.ask_replica(bed.server.grpc, "10.1.0.10", &web, "app-reader").await.expect("served");
    assert_eq!(bed.caller_arn(&creds).await, "arn:aws:sts::123456789012:assumed-role/app-reader/team-a.web");
}

#[tokio::test]
async fn a_new_pod_is_prefetched_and_sts_is_called_once_per_session() {
    if !e2e_enabled("a_new_pod_is_prefetched_and_sts_is_called_once_per_session") {
        return;
    }
    let bed = Bed::start(&[ROLE_BASE]).await;
    let success = "imdsgate_server_sts_calls_total{result=\"Success\"}";
    // team-a/web and team-a/elsewhere (the permitted pods with roles) are prefetched from the
    // initial list; let both land before counting.
    bed.wait_metric_at_least(success, 2.0).await;
    let before = bed.server.metric(success).await.unwrap();

    bed.cluster
        .create_pod(
            &PodSpec::new("team-a", "late", "node-a").annotation("iam.amazonaws.com/role", "app-reader"),
        )
        .await
        .unwrap();
    // The Pod object alone (no IP yet, as while it is scheduled and its sandbox starts) is
    // enough: its session is fetched before its IP appears.
    bed.wait_metric_at_least(success, before + 1.0).await;
    // Its IP comes later than the cache's sweep of dead pods (every 15 s): a pod waiting for its
    // IP is not dead, and its session stays.
    tokio::time::sleep(Duration::from_secs(16)).await;
    bed.cluster.set_pod_status("team-a", "late", &["10.1.0.20"], "Running").await.unwrap();

    let misses = bed.server.metric("imdsgate_server_cache_misses_total").await.unwrap();
    let late = bed.uid("team-a", "late").await;
    let first = bed.ask("10.1.0.20", &late, "app-reader").await.expect("credentials");
    for _ in 0..20 {
        let again = bed.ask("10.1.0.20", &late, "app-reader").await.unwrap();
        assert_eq!(again.access_key_id, first.access_key_id);
    }
    assert_eq!(
        bed.server.metric("imdsgate_server_cache_misses_total").await.unwrap(),
        misses,
        "first call was a hit"
    );
    assert_eq!(bed.server.metric(success).await.unwrap(), before + 1.0, "one STS call for 21 requests");

    // A pod deleted before it ever had an IP takes its prefetched session with it.
    let sessions = "imdsgate_server_cached_sessions";
    let held = bed.server.metric(sessions).await.unwrap();
    bed.cluster
        .create_pod(
            &PodSpec::new("team-a", "doomed", "node-a").annotation("iam.amazonaws.com/role", "app-reader"),
        )
        .await
        .unwrap();
    bed.wait_metric_at_least(sessions, held + 1.0).await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(bed.cluster.client(), "team-a");
    pods.delete("doomed", &kube::api::DeleteParams::default().grace_period(0)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.server.metric(sessions).await.unwrap() > held {
        assert!(Instant::now() < deadline, "the deleted pod's session is still held:\n{}", bed.server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_are_refused_at_the_handshake() {
    if !e2e_enabled("clients_without_a_certificate_from_the_ca_are_refused_at_the_handshake") {
        return;
    }
    let bed = Bed::start(&[ROLE_BASE]).await;
    let web = bed.uid("team-a", "web").await;
    let request = || {
        let mut r = tonic::Request::new(GetCredentialsRequest {
            pod_ip: "10.1.0.10".into(),
            pod_uid: web.clone(),
            role: "app-reader".into(),
        });
        r.metadata_mut().insert("authorization", format!("Bearer {}", bed.token_a).parse().unwrap());
        r
    };
    let stranger_ca = imdsgate_e2e::TestCa::new("someone-else").unwrap();
    let stranger = stranger_ca.issue_client("imdsgate-agent").unwrap();
    for identity in [None, Some(&stranger)] {
        let outcome = match grpc_client(bed.server.grpc, &bed.pki.ca.cert_pem(), identity).await {
            Err(connect_error) => Err(connect_error.to_string()),
            Ok(mut client) => client.get_credentials(request()).await.map_err(|s| format!("{s:?}")),
        };
        let error = outcome.expect_err("no credentials without a client certificate from the CA");
        assert!(
            !error.contains("PermissionDenied") && !error.contains("NotFound"),
            "refused by TLS, not the service: {error}"
        );
    }
    // The agent's own certificate still works.
    assert!(bed.ask("10.1.0.10", &web, "app-reader").await.is_ok());
}

#[tokio::test]
async fn an_sts_outage_keeps_serving_cached_credentials() {
    if !e2e_enabled("an_sts_outage_keeps_serving_cached_credentials") {
        return;
    }
    let mut bed = Bed::start(&[ROLE_BASE]).await;
    let web = bed.uid("team-a", "web").await;
    let before = bed.ask("10.1.0.10", &web, "app-reader").await.expect("credentials");
    bed.sts.process().terminate(Duration::from_secs(10)).unwrap();

    let during =
        bed.ask("10.1.0.10", &web, "app-reader").await.expect("cached credentials during the outage");
    assert_eq!(during.access_key_id, before.access_key_id);
    assert_eq!(
        bed.server.wait_ready(Duration::from_secs(1)).await.ok(),
        Some(()),
        "stays ready during an STS outage"
    );

    // A pod that has nothing cached gets UNAVAILABLE, so its SDK retries.
    bed.cluster
        .create_pod(
            &PodSpec::new("team-a", "newcomer", "node-a").annotation("iam.amazonaws.com/role", "app-reader"),
        )
        .await
        .unwrap();
    bed.cluster.set_pod_status("team-a", "newcomer", &["10.1.0.21"], "Running").await.unwrap();
    let newcomer = bed.uid("team-a", "newcomer").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        let r = bed.ask("10.1.0.21", &newcomer, "app-reader").await;
        if !matches!(&r, Err(s) if Reason::of(s) == Some(Reason::PodNotFound)) || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(denied(outcome), (tonic::Code::Unavailable, Some(Reason::StsUnavailable)));
}

#[tokio::test]
async fn autodetected_base_arn_intermediate_role_and_session_tags() {
    if !e2e_enabled("autodetected_base_arn_intermediate_role_and_session_tags") {
        return;
    }
    // The server's own identity (moto's default user in account 123456789012) gives the base
    // ARN; pod roles are assumed from an intermediate role; sessions carry EKS-style tags.
    let bed = Bed::start(&[
        "--role-base-arn-autodetect",
        "--assume-role-arn=arn:aws:iam::123456789012:role/app-intermediate",
        "--session-tags",
        "--cluster-name=prod",
    ])
    .await;
    // Detected at start, normally before the first request; ready does not wait for it.
    bed.wait_metric_at_least("imdsgate_server_aws_identity_ready", 1.0).await;
    let web = bed.uid("team-a", "web").await;
    let creds =
        bed.ask("10.1.0.10", &web, "app-reader").await.expect("credentials through the intermediate role");
    assert_eq!(creds.role_arn, "arn:aws:iam::123456789012:role/app-reader");
    assert_eq!(bed.caller_arn(&creds).await, "arn:aws:sts::123456789012:assumed-role/app-reader/team-a.web");
}

#[tokio::test]
async fn a_server_whose_own_aws_credentials_fail_stays_up_and_ready_and_serves_once_they_work() {
    if !e2e_enabled("a_server_whose_own_aws_credentials_fail_stays_up_and_ready_and_serves_once_they_work") {
        return;
    }
    // The server cannot reach STS with its own credentials (as a server pod that cannot reach
    // its node's metadata service at hop limit 1): nothing listens on its STS port yet.
    let sts_port = free_port().unwrap();
    let webhook_port = free_port().unwrap();
    let webhook: SocketAddr = ([127, 0, 0, 1], webhook_port).into();
    let mut bed = Bed::start_with(
        &["--role-base-arn-autodetect"],
        Some(&format!("http://127.0.0.1:{sts_port}")),
        Some(webhook_port),
    )
    .await;
    let ca = bed.pki.ca.cert_pem();
    let identity = "imdsgate_server_aws_identity_ready";

    // Up and ready (its watches synced) all the same: the webhook must answer.
    bed.server.wait_ready(Duration::from_secs(1)).await.expect("ready without AWS credentials");
    let r = review(webhook, &ca, "team-a", pod_manifest(None, false)).await;
    assert_eq!(r["allowed"], true, "{r}");
    let r = review(webhook, &ca, "team-a", pod_manifest(None, true)).await;
    assert_eq!(r["allowed"], false, "placement is still enforced: {r}");
    // A role name cannot be checked without the base: admitted, with a warning saying why.
    let r = review(webhook, &ca, "team-a", pod_manifest(Some("app-reader"), false)).await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(
        r["warnings"][0].as_str().unwrap_or_default().contains("has not yet determined its role base ARN"),
        "{r}"
    );

    // Each failed attempt is logged as an error, with the cause and what to do, and retried
    // (1 s, 2 s, 4 s… at most a minute apart) while the process stays up.
    let failure = "cannot determine its role base ARN";
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(bed.server.child.log_path()).unwrap_or_default();
        if log.lines().filter(|l| l.contains(failure)).count() >= 2 {
            break log;
        }
        assert!(Instant::now() < deadline, "no second failed attempt logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let logged = log.lines().find(|l| l.contains(failure)).unwrap();
    assert!(
        logged.contains("ERROR")
            && logged.contains("Connection refused")
            && logged.contains("IRSA")
            && logged.contains("hop limit of 2 on the server node group")
            && logged.contains("hostNetwork"),
        "{logged}"
    );
    bed.server.child.check_running().expect("still running");
    bed.server.wait_ready(Duration::from_secs(1)).await.expect("still ready");

    // Pods get nothing, fail closed, and are told why (their agent retries on UNAVAILABLE).
    let web = bed.uid("team-a", "web").await;
    let status = bed.ask("10.1.0.10", &web, "app-reader").await.expect_err("no credentials without the base");
    assert_eq!(
        (status.code(), Reason::of(&status)),
        (tonic::Code::Unavailable, Some(Reason::StsUnavailable))
    );
    let message = status.message();
    assert!(
        message.starts_with(
            "the server has not yet determined its role base ARN because its own AWS credentials failed: \
             GetCallerIdentity failed: "
        ) && message.contains("Connection refused"),
        "{message}"
    );
    let exposed = http_get(bed.server.admin, "/metrics").await.unwrap().1;
    assert!(exposed.lines().any(|l| l == format!("{identity} 0")), "{identity} is 0");

    // STS becomes reachable: the next attempt (backoff below a minute) detects the base.
    let relay = relay(sts_port, bed.sts.port()).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while bed.server.metric(identity).await.unwrap() < 1.0 {
        assert!(Instant::now() < deadline, "the base was never detected; log:\n{}", bed.server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(bed.server.child.log_path()).unwrap_or_default();
    assert!(log.contains("role base ARN detected"), "{log}");
    let creds = bed.ask("10.1.0.10", &web, "app-reader").await.expect("credentials once the base is known");
    assert_eq!(creds.role_arn, "arn:aws:iam::123456789012:role/app-reader");
    let r = review(webhook, &ca, "team-a", pod_manifest(Some("app-reader"), false)).await;
    assert_eq!(
        (r["allowed"].clone(), r["warnings"].clone()),
        (serde_json::json!(true), serde_json::Value::Null),
        "{r}"
    );
    let r = review(webhook, &ca, "team-a", pod_manifest(Some("admin"), false)).await;
    assert_eq!(r["allowed"], false, "roles are checked again: {r}");
    relay.abort();
}

#[tokio::test]
async fn rotated_certificates_are_picked_up_without_a_restart() {
    if !e2e_enabled("rotated_certificates_are_picked_up_without_a_restart") {
        return;
    }
    let bed = Bed::start(&[ROLE_BASE]).await;
    let web = bed.uid("team-a", "web").await;
    assert!(bed.ask("10.1.0.10", &web, "app-reader").await.is_ok());

    // cert-manager rotates everything to a new CA: the server's certificate, key and client CA.
    let next = Pki::new().unwrap();
    std::fs::write(&bed.pki.server_files.1, &next.server.key_pem).unwrap();
    std::fs::write(&bed.pki.server_files.0, &next.server.cert_pem).unwrap();
    std::fs::write(&bed.pki.ca_file, next.ca.cert_pem()).unwrap();

    let ask_with = |pki: &Pki| {
        let (addr, ca, id, token, uid) =
            (bed.server.grpc, pki.ca.cert_pem(), pki.agent.clone(), bed.token_a.clone(), web.clone());
        async move {
            let mut client = grpc_client(addr, &ca, Some(&id)).await.map_err(|e| e.to_string())?;
            let mut r = tonic::Request::new(GetCredentialsRequest {
                pod_ip: "10.1.0.10".into(),
                pod_uid: uid,
                role: "app-reader".into(),
            });
            r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            client.get_credentials(r).await.map(|_| ()).map_err(|s| format!("{s:?}"))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask_with(&next).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificates were never loaded; log:\n{}",
            bed.server.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ask_with(&bed.pki).await.is_err(), "agents of the old CA are refused after the rotation");
}
