//! Smoke tests proving the test bed is made of real parts: the apiserver serves watches and
//! TokenReview with node binding, moto issues credentials that identify the assumed role, and a
//! pod namespace reaches its node namespace with its own source IP.

use futures::{StreamExt, TryStreamExt};
use imdsgate_e2e::{Cluster, NodeNs, PodSpec, Sts, e2e_enabled};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::time::Duration;

#[tokio::test]
async fn apiserver_delivers_pod_status_through_a_node_scoped_watch() {
    if !e2e_enabled("apiserver_delivers_pod_status_through_a_node_scoped_watch") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster starts");
    cluster.create_namespace("team-a", &[]).await.unwrap();
    cluster.create_service_account("team-a", "app").await.unwrap();

    let pods: Api<Pod> = Api::all(cluster.client());
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();

    // A pod on another node must never show up in node-a's watch.
    cluster.create_pod(&PodSpec::new("team-a", "elsewhere", "node-b").service_account("app")).await.unwrap();
    cluster.create_pod(&PodSpec::new("team-a", "web", "node-a").service_account("app")).await.unwrap();
    cluster.set_pod_status("team-a", "elsewhere", &["10.1.0.9"], "Running").await.unwrap();
    cluster.set_pod_status("team-a", "web", &["10.1.0.7", "fd00::7"], "Running").await.unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.try_next().await.expect("watch works") {
            if let watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) = event {
                assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("node-a"));
                let status = pod.status.clone().unwrap_or_default();
                if status.pod_ip.is_some() {
                    return pod;
                }
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("the pod's IP arrives through the watch");

    let status = seen.status.unwrap();
    assert_eq!(seen.metadata.name.as_deref(), Some("web"));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ips: Vec<_> = status.pod_ips.unwrap().into_iter().map(|p| p.ip).collect();
    assert_eq!(ips, ["10.1.0.7", "fd00::7"]);
}

#[tokio::test]
async fn token_review_returns_the_node_of_a_pod_bound_token() {
    if !e2e_enabled("token_review_returns_the_node_of_a_pod_bound_token") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster starts");
    cluster.create_namespace("imdsgate", &[]).await.unwrap();
    cluster.create_service_account("imdsgate", "imdsgate-agent").await.unwrap();
    cluster.create_node("node-a").await.unwrap();
    let agent_pod = cluster
        .create_pod(
            &PodSpec::new("imdsgate", "agent-xyz", "node-a").service_account("imdsgate-agent").host_network(),
        )
        .await
        .unwrap();

    let token = cluster
        .service_account_token("imdsgate", "imdsgate-agent", &["imdsgate"], Some(&agent_pod))
        .await
        .unwrap();
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.clone()), audiences: Some(vec!["imdsgate".into()]) },
        ..Default::default()
    };
    let reviewed =
        Api::<TokenReview>::all(cluster.client()).create(&PostParams::default(), &review).await.unwrap();
    let status = reviewed.status.expect("review has a status");
    assert_eq!(status.authenticated, Some(true), "{:?}", status.error);
    let user = status.user.expect("authenticated user");
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:imdsgate:imdsgate-agent"));
    let extra = user.extra.expect("bound token carries extra info");
    assert_eq!(extra.get("authentication.kubernetes.io/node-name"), Some(&vec!["node-a".to_string()]));
    assert_eq!(extra.get("authentication.kubernetes.io/pod-name"), Some(&vec!["agent-xyz".to_string()]));

    // The same token for another audience is refused.
    let wrong_audience = TokenReview {
        spec: TokenReviewSpec { token: Some(token), audiences: Some(vec!["not-imdsgate".into()]) },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(cluster.client())
        .create(&PostParams::default(), &wrong_audience)
        .await
        .unwrap();
    assert_ne!(reviewed.status.unwrap().authenticated, Some(true));
}

#[tokio::test]
async fn moto_assume_role_credentials_identify_the_assumed_role() {
    if !e2e_enabled("moto_assume_role_credentials_identify_the_assumed_role") {
        return;
    }
    let sts = Sts::start().await.expect("moto starts");
    let role_arn = sts.create_role("app-reader").unwrap();
    assert_eq!(role_arn, "arn:aws:iam::123456789012:role/app-reader");

    let assumed = sts
        .root_client()
        .assume_role()
        .role_arn(&role_arn)
        .role_session_name("team-a.web")
        .send()
        .await
        .expect("AssumeRole");
    let creds = assumed.credentials.expect("credentials issued");
    let identity = sts
        .client(aws_credential_types::Credentials::new(
            creds.access_key_id(),
            creds.secret_access_key(),
            Some(creds.session_token().to_string()),
            None,
            "assumed",
        ))
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity");
    assert_eq!(identity.arn(), Some("arn:aws:sts::123456789012:assumed-role/app-reader/team-a.web"));
    assert_eq!(identity.account(), Some("123456789012"));
}

#[tokio::test]
async fn pod_namespace_reaches_the_node_with_its_own_source_ip() {
    if !e2e_enabled("pod_namespace_reaches_the_node_with_its_own_source_ip") {
        return;
    }
    let node = NodeNs::create("10.200.0.1".parse().unwrap()).expect("node namespace");
    let pod = node.add_pod("10.200.1.5".parse().unwrap()).expect("pod namespace");
    let other = node.add_pod("10.200.1.6".parse().unwrap()).expect("pod namespace");

    // A listener in the node namespace that answers each client with the address it came from.
    let logs = tempfile::tempdir().unwrap();
    let _listener = imdsgate_e2e::process::ChildGuard::spawn(
        "peer-echo",
        node.command("socat")
            .args(["TCP-LISTEN:7000,bind=10.200.0.1,reuseaddr,fork", "SYSTEM:echo $SOCAT_PEERADDR"]),
        &logs.path().join("echo.log"),
    )
    .unwrap();
    node.wait_listening(7000, Duration::from_secs(10)).await.unwrap();

    for p in [&pod, &other] {
        let out =
            imdsgate_e2e::process::run(p.command("socat").args(["-T", "5", "-", "TCP:10.200.0.1:7000"]))
                .expect("pod reaches node");
        assert_eq!(out.trim(), p.ip.to_string());
    }
    let node_name = node.name().to_string();
    let pod_name = pod.name.clone();
    drop(node);
    let left = imdsgate_e2e::process::run(std::process::Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(!left.contains(&node_name) && !left.contains(&pod_name), "namespaces left behind:\n{left}");
}
