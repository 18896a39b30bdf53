//! "Why does my pod get no credentials?" answered by `kubectl describe pod`: each refusal class
//! leaves one Warning Event on the pod, reason = the refusal's code, however often the pod
//! retries — from the agent (NO_ROLE, ROLE_MISMATCH, POD_NOT_FOUND, SERVER_UNREACHABLE) and from
//! the server (NAMESPACE_FORBIDS, STS_UNAVAILABLE).

use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod};
use imdsgate_e2e::e2e_enabled;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, PostParams};
use serde_json::json;
use std::time::{Duration, Instant};

/// The Events about `pod` in `namespace` with `reason`, waiting up to 10 s for the first.
async fn events_of(bed: &AgentBed, namespace: &str, pod: &str, reason: &str) -> Vec<Event> {
    let api = Api::<Event>::namespaced(bed.cluster.client(), namespace);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Event> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks for credentials `times` times from `pod` (path under security-credentials/).
fn ask(bed: &AgentBed, pod: &str, role: &str, times: usize) -> Vec<u16> {
    (0..times)
        .map(|_| bed.imds_get(bed.pod(pod), &format!("/latest/meta-data/iam/security-credentials/{role}")).0)
        .collect()
}

async fn exactly_one(bed: &AgentBed, namespace: &str, pod: &str, reason: &str, says: &str) {
    let events = events_of(bed, namespace, pod, reason).await;
    assert_eq!(
        events.len(),
        1,
        "one {reason} Event on {namespace}/{pod}, not one per retry: {events:?}\n{}",
        bed.agent_log()
    );
    let event = &events[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.as_deref().unwrap_or_default();
    assert!(note.contains(says), "{reason}: {note:?} does not say {says:?}");
}

#[tokio::test]
async fn each_refusal_class_leaves_one_event_on_the_pod() {
    if !e2e_enabled("each_refusal_class_leaves_one_event_on_the_pod") {
        return;
    }
    let mut bed = AgentBed::start(BedPlan {
        namespaces: vec![("team", "arn:aws:iam::123456789012:role/app-.*")],
        roles: vec!["app-reader"],
        pods: vec![
            BedPod::new("team", "plain", "10.200.1.10"),
            BedPod::new("team", "mismatch", "10.200.1.11").role("app-reader"),
            BedPod::new("team", "greedy", "10.200.1.12").role("admin"),
            // A trailing `/` names no role: the agent refuses it as the server would.
            BedPod::new("team", "slashed", "10.200.1.15").role("app-reader/"),
            // Its Pod object is created once no server replica answers (before, the agent would
            // have fetched its credentials as it appeared).
            BedPod::ghost("stranded", "10.200.1.13"),
            // Traffic from this address reaches node-a, but its pod runs on node-b.
            BedPod::ghost("elsewhere", "10.200.1.50"),
            // Its Pod object is created while STS is down.
            BedPod::ghost("unlucky", "10.200.1.14"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed");
    bed.cluster.create_node("node-b").await.unwrap();
    let elsewhere: Pod = serde_json::from_value(json!({
        "metadata": { "name": "elsewhere", "namespace": "team", "annotations": { "iam.amazonaws.com/role": "app-reader" } },
        "spec": { "nodeName": "node-b", "containers": [{ "name": "main", "image": "registry.invalid/app:1" }] }
    }))
    .unwrap();
    Api::<Pod>::namespaced(bed.cluster.client(), "team")
        .create(&PostParams::default(), &elsewhere)
        .await
        .unwrap();
    bed.cluster.set_pod_status("team", "elsewhere", &["10.200.1.50"], "Running").await.unwrap();

    // Each pod retries as an SDK would.
    assert!(ask(&bed, "team/plain", "", 4).iter().all(|&s| s == 404));
    assert!(ask(&bed, "team/plain", "some-role", 4).iter().all(|&s| s == 404));
    assert!(ask(&bed, "team/mismatch", "admin", 5).iter().all(|&s| s == 404));
    assert!(ask(&bed, "team/greedy", "admin", 5).iter().all(|&s| s == 403));
    assert!(ask(&bed, "team/slashed", "", 3).iter().all(|&s| s == 403));
    assert!(ask(&bed, "ghost/elsewhere", "app-reader", 3).iter().all(|&s| s == 404));

    exactly_one(&bed, "team", "plain", "NO_ROLE", "has no iam.amazonaws.com/role annotation").await;
    exactly_one(&bed, "team", "mismatch", "ROLE_MISMATCH", "asked for role \"admin\"").await;
    exactly_one(&bed, "team", "greedy", "NAMESPACE_FORBIDS", "does not permit").await;
    exactly_one(&bed, "team", "slashed", "ROLE_INVALID", "ends in `/`").await;
    exactly_one(&bed, "team", "elsewhere", "POD_NOT_FOUND", "it runs on node-b").await;

    // STS cannot be reached: the server says so on the pod that asked.
    bed.sts.process().terminate(Duration::from_secs(10)).unwrap();
    bed.create_pod_object(&BedPod::new("team", "unlucky", "10.200.1.14").role("app-reader")).await.unwrap();
    let statuses = ask(&bed, "ghost/unlucky", "app-reader", 3);
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    exactly_one(&bed, "team", "unlucky", "STS_UNAVAILABLE", "STS unavailable").await;

    // No server replica answers: the agent says so on the pod that asked.
    bed.server.child.terminate(Duration::from_secs(10)).unwrap();
    bed.create_pod_object(&BedPod::new("team", "stranded", "10.200.1.13").role("app-reader")).await.unwrap();
    let statuses = ask(&bed, "ghost/stranded", "app-reader", 3);
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    exactly_one(&bed, "team", "stranded", "SERVER_UNREACHABLE", "no imdsgate server replica answers").await;

    let metrics =
        imdsgate_e2e::process::run(bed.node.command("curl").args(["-s", "http://127.0.0.1:9611/metrics"]))
            .unwrap();
    for (reason, at_least) in
        [("NO_ROLE", 8.0), ("ROLE_MISMATCH", 5.0), ("SERVER_UNREACHABLE", 3.0), ("POD_NOT_FOUND", 3.0)]
    {
        let seen = imdsgate_e2e::components::metric_value(
            &metrics,
            &format!("imdsgate_agent_refusals_total{{reason=\"{reason}\"}}"),
        );
        assert!(seen >= at_least, "{reason}: {seen} counted:\n{metrics}");
    }
    bed.agent.take();
}
