//! Attacks on identity, tried end to end as a hostile pod owner would: a session name that names
//! another pod, a pod kept running in Terminating and its IP handed on, permission withdrawn while
//! an agent holds credentials, and annotation changes in a loop to burn the STS budget. Each test
//! fails without its defence (see SECURITY.md).

use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod};
use imdsgate_e2e::components::metric_value;
use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::netns::PodNs;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use std::time::{Duration, Instant};

const PERMIT_APP: &str = "arn:aws:iam::123456789012:role/app-.*";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/app-reader";
/// The revocation promise: a withdrawn pod is no longer served within this.
const REVOCATION_BOUND: Duration = Duration::from_secs(2);

/// `kubectl annotate` (`None`: remove the annotation).
async fn annotate(bed: &AgentBed, pod: &str, key: &str, value: Option<&str>) {
    let (namespace, name) = pod.split_once('/').expect("namespace/name");
    let patch = json!({ "metadata": { "annotations": { key: value } } });
    Api::<Pod>::namespaced(bed.cluster.client(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("pod patched");
}

/// Polls `check` from the pod until it holds; returns when, after the change, the first request
/// that saw it was sent (a request that waits for its pod, like one right after a deletion, counts
/// from its start: nothing was served to it).
fn time_until(
    bed: &AgentBed,
    pod: &PodNs,
    changed_at: Instant,
    what: &str,
    check: impl Fn(u16, &str) -> bool,
) -> Duration {
    loop {
        let sent = changed_at.elapsed();
        let (status, body) = bed.imds_get(pod, CREDS);
        if check(status, &body) {
            return sent;
        }
        assert!(
            changed_at.elapsed() < Duration::from_secs(10),
            "{what}: still {status} after 10 s: {body}\nagent log:\n{}",
            bed.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_session_belongs_to_one_live_pod() {
    if !e2e_enabled("a_session_belongs_to_one_live_pod") {
        return;
    }
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("a", PERMIT_APP), ("b", PERMIT_APP)],
        roles: vec!["app-reader"],
        pods: vec![
            BedPod::new("a", "victim", "10.200.1.10").role("app-reader"),
            // Names its session after a/victim.
            BedPod::new("b", "attacker", "10.200.1.11")
                .role("app-reader")
                .annotation("iam.amazonaws.com/session-name", "a.victim"),
            BedPod::new("a", "held", "10.200.1.12").role("app-reader").finalizer("imdsgate.test/hold"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed");
    let (victim, attacker, held) = (bed.pod("a/victim"), bed.pod("b/attacker"), bed.pod("a/held"));

    // 1. Session-name hijack: the attacker never holds the victim's credentials, and CloudTrail
    //    shows its own namespace.
    let victim_key = bed.access_key(victim, "app-reader").expect("victim served");
    let attacker_key = bed.access_key(attacker, "app-reader").expect("attacker served its own");
    assert_ne!(attacker_key, victim_key, "b/attacker was handed a/victim's access key");
    assert_eq!(bed.caller_arn(victim).unwrap(), "arn:aws:sts::123456789012:assumed-role/app-reader/a.victim");
    assert_eq!(
        bed.caller_arn(attacker).unwrap(),
        "arn:aws:sts::123456789012:assumed-role/app-reader/b@a.victim",
        "the override stays under the attacker's own namespace"
    );

    // 2. A pod held in Terminating by a finalizer (phase still Running) gets nothing.
    let held_key = bed.access_key(held, "app-reader").expect("served while live");
    let deleting = Instant::now();
    Api::<Pod>::namespaced(bed.cluster.client(), "a").delete("held", &DeleteParams::default()).await.unwrap();
    let pod = Api::<Pod>::namespaced(bed.cluster.client(), "a").get("held").await.unwrap();
    assert!(pod.metadata.deletion_timestamp.is_some(), "the finalizer keeps it, terminating");
    let took = time_until(&bed, held, deleting, "terminating pod", |status, _| status != 200);
    let (status, body) = bed.imds_get(held, CREDS);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("found no pod"), "{body}");
    eprintln!("terminating pod refused {took:?} after the delete");

    // 3. Its IP goes to a new pod before the old one is gone: the newcomer gets its own session,
    //    never the old pod's cached entry.
    bed.create_pod_object(&BedPod::new("a", "successor", "10.200.1.12").role("app-reader")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let successor_key = loop {
        match bed.access_key(held, "app-reader") {
            Ok(key) => break key,
            Err(status) => {
                assert!(Instant::now() < deadline, "successor never served ({status})\n{}", bed.agent_log());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_ne!(successor_key, held_key, "the new owner of the IP got the old pod's credentials");
    assert_eq!(
        bed.caller_arn(held).unwrap(),
        "arn:aws:sts::123456789012:assumed-role/app-reader/a.successor"
    );
}

#[tokio::test]
async fn revocations_reach_the_agent_within_two_seconds() {
    if !e2e_enabled("revocations_reach_the_agent_within_two_seconds") {
        return;
    }
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("team", PERMIT_APP), ("narrow", PERMIT_APP)],
        roles: vec!["app-reader", "app-writer"],
        pods: vec![
            BedPod::new("narrow", "web", "10.200.1.20").role("app-reader"),
            BedPod::new("team", "changed", "10.200.1.21").role("app-reader"),
            BedPod::new("team", "removed", "10.200.1.22").role("app-reader"),
            BedPod::new("team", "deleted", "10.200.1.23").role("app-reader"),
            BedPod::new("team", "renamed", "10.200.1.24").role("app-reader"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed");
    let pods = ["narrow/web", "team/changed", "team/removed", "team/deleted", "team/renamed"];
    let mut keys = Vec::new();
    for key in pods {
        // Twice: the second is an agent cache hit, which is what revocation must reach.
        bed.access_key(bed.pod(key), "app-reader").expect("served");
        keys.push(bed.access_key(bed.pod(key), "app-reader").expect("served again"));
    }
    let mut figures = Vec::new();

    // The namespace stops permitting the role: only the server knows; it must tell the agent.
    let at = Instant::now();
    let patch = json!({ "metadata": { "annotations": {
        "iam.amazonaws.com/permitted": "arn:aws:iam::123456789012:role/app-writer" } } });
    Api::<Namespace>::all(bed.cluster.client())
        .patch("narrow", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let took = time_until(&bed, bed.pod("narrow/web"), at, "namespace narrowed", |status, _| status != 200);
    let (status, body) = bed.imds_get(bed.pod("narrow/web"), CREDS);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not permit"), "{body}");
    figures.push(("namespace permission narrowed", took));

    // The role annotation changes.
    let at = Instant::now();
    annotate(&bed, "team/changed", "iam.amazonaws.com/role", Some("app-writer")).await;
    let took = time_until(&bed, bed.pod("team/changed"), at, "role changed", |status, _| status == 404);
    figures.push(("role annotation changed", took));

    // The role annotation is removed.
    let at = Instant::now();
    annotate(&bed, "team/removed", "iam.amazonaws.com/role", None).await;
    let took = time_until(&bed, bed.pod("team/removed"), at, "role removed", |status, _| status == 404);
    figures.push(("role annotation removed", took));

    // The pod is deleted (no kubelet here: it stays Terminating, as with a slow shutdown).
    let at = Instant::now();
    Api::<Pod>::namespaced(bed.cluster.client(), "team")
        .delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    let took = time_until(&bed, bed.pod("team/deleted"), at, "pod deleted", |status, _| status == 404);
    figures.push(("pod deleted", took));

    // The session name changes: the old credentials are dropped and new ones issued.
    let old = keys[4].clone();
    let at = Instant::now();
    annotate(&bed, "team/renamed", "iam.amazonaws.com/session-name", Some("batch")).await;
    let took = time_until(&bed, bed.pod("team/renamed"), at, "session renamed", |status, body| {
        status == 200 && !body.contains(&old)
    });
    figures.push(("session-name changed", took));

    for (what, took) in &figures {
        eprintln!("revocation: {what}: {} ms", took.as_millis());
    }
    for (what, took) in figures {
        assert!(took < REVOCATION_BOUND, "{what}: served for {took:?} after the change\n{}", bed.agent_log());
    }
    let metrics =
        imdsgate_e2e::process::run(bed.node.command("curl").args(["-s", "http://127.0.0.1:9611/metrics"]))
            .unwrap();
    assert!(
        metric_value(&metrics, "imdsgate_agent_revocations_total{reason=\"NAMESPACE_FORBIDS\"}") >= 1.0,
        "the namespace change reached the agent as a revocation:\n{metrics}"
    );
    assert!(metric_value(&metrics, "imdsgate_agent_revocation_streams") >= 1.0, "{metrics}");
}

#[tokio::test]
async fn annotation_changes_in_a_loop_cannot_burn_the_sts_budget() {
    if !e2e_enabled("annotation_changes_in_a_loop_cannot_burn_the_sts_budget") {
        return;
    }
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("team", PERMIT_APP)],
        roles: vec!["app-reader"],
        pods: vec![
            BedPod::new("team", "burner", "10.200.1.30").role("app-reader"),
            BedPod::new("team", "neighbour", "10.200.1.31").role("app-reader"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed");
    let success = "imdsgate_server_sts_calls_total{result=\"Success\"}";
    // Both pods' prefetches.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.server.metric(success).await.unwrap() < 2.0 {
        assert!(Instant::now() < deadline, "prefetches never ran:\n{}", bed.server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // kubectl annotate in a loop: each change used to cost one AssumeRole.
    for n in 0..20 {
        let name = format!("burn-{n}");
        annotate(&bed, "team/burner", "iam.amazonaws.com/session-name", Some(&name)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = bed.server.metric(success).await.unwrap();
    let skipped = bed.server.metric("imdsgate_server_prefetches_skipped_total").await.unwrap();
    eprintln!("20 session-name changes: {calls} STS calls in all, {skipped} prefetches skipped");
    assert!(calls <= 2.0 + 3.0, "the burner's allowance is 4 new sessions (1 spent at start): {calls} calls");
    assert!(skipped >= 15.0, "{skipped}");
    // The neighbour is untouched.
    bed.access_key(bed.pod("team/neighbour"), "app-reader").expect("neighbour still served");
}

/// A compromised node may write a mirror pod (the kubelet's copy of a static pod) in any
/// namespace, naming any role, on itself. With the node's agent identity it asks for that role:
/// nothing is issued and no STS call is made for it, while an ordinary pod of the namespace is
/// served; once the namespace opts its mirror pods in, the same request is served.
#[tokio::test]
async fn a_mirror_pod_gets_no_role_unless_its_namespace_opts_in() {
    if !e2e_enabled("a_mirror_pod_gets_no_role_unless_its_namespace_opts_in") {
        return;
    }
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("payments", "arn:aws:iam::123456789012:role/payments-.*")],
        roles: vec!["payments-admin"],
        pods: vec![
            BedPod::new("payments", "static-admin-node-a", "10.200.1.30")
                .role("payments-admin")
                .annotation("kubernetes.io/config.mirror", "0123abcd"),
            BedPod::new("payments", "web", "10.200.1.31").role("payments-admin"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed");
    let creds = "/latest/meta-data/iam/security-credentials/payments-admin";
    let (status, body) = bed.imds_get(bed.pod("payments/web"), creds);
    assert_eq!(status, 200, "the ordinary pod is served: {body}");
    for _ in 0..3 {
        let (status, body) = bed.imds_get(bed.pod("payments/static-admin-node-a"), creds);
        assert_eq!(status, 403, "the mirror pod is refused: {body}");
        assert!(body.contains("mirror pod"), "{body}");
    }
    let success = "imdsgate_server_sts_calls_total{result=\"Success\"}";
    assert_eq!(bed.server.metric(success).await.unwrap(), 1.0, "one AssumeRole, the ordinary pod's");

    let opt_in = json!({ "metadata": { "annotations": { "imdsgate.io/allow-mirror-pod-roles": "true" } } });
    Api::<Namespace>::all(bed.cluster.client())
        .patch("payments", &PatchParams::default(), &Patch::Merge(&opt_in))
        .await
        .expect("namespace patched");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = bed.imds_get(bed.pod("payments/static-admin-node-a"), creds);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused after the opt-in: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
