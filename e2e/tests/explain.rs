//! `imdsgate-server explain` against the real apiserver, as a user runs it with their kubeconfig:
//! the step-by-step output and the exit code for an allowed pod and for each refusal class, for a
//! pod in the cluster and for a manifest checked in CI before the pod exists.

use imdsgate_e2e::components::install_rbac;
use imdsgate_e2e::tools::workspace_bin;
use imdsgate_e2e::{Cluster, e2e_enabled};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

async fn pod(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    node: &str,
    annotations: serde_json::Value,
    extra: serde_json::Value,
) {
    let mut spec =
        json!({ "nodeName": node, "containers": [{ "name": "main", "image": "registry.invalid/app:1" }] });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": ns, "annotations": annotations,
                      "labels": { "app.kubernetes.io/name": if ns == "imdsgate" { "imdsgate-agent" } else { "app" } } },
        "spec": spec
    }))
    .unwrap();
    Api::<Pod>::namespaced(cluster.client(), ns).create(&PostParams::default(), &pod).await.unwrap();
}

/// Runs the explain command; returns (exit code, stdout + stderr).
fn explain(cluster: &Cluster, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(workspace_bin("imdsgate-server").unwrap())
        .arg("explain")
        .arg(format!("--kubeconfig={}", cluster.admin_kubeconfig().display()))
        .arg("--role-base-arn=arn:aws:iam::123456789012:role/")
        .args(args)
        .env_remove("IMDSGATE_ROLE_BASE_ARN")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn explain_says_why_and_exits_non_zero_when_refused() {
    if !e2e_enabled("explain_says_why_and_exits_non_zero_when_refused") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    install_rbac(&cluster).unwrap();
    cluster.create_node("worker-1").await.unwrap();
    cluster.create_node("worker-2").await.unwrap();
    cluster.create_labelled_node("server-1", &[("imdsgate.io/server-node", "true")]).await.unwrap();
    // A ready agent on worker-1 only.
    pod(&cluster, "imdsgate", "agent-w1", "worker-1", json!({}), json!({ "hostNetwork": true })).await;
    let ready =
        json!({ "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] } });
    Api::<Pod>::namespaced(cluster.client(), "imdsgate")
        .patch_status("agent-w1", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    cluster
        .create_namespace("team", &[("iam.amazonaws.com/permitted", "arn:aws:iam::123456789012:role/app-.*")])
        .await
        .unwrap();
    let role = |r: &str| json!({ "iam.amazonaws.com/role": r });
    pod(&cluster, "team", "web", "worker-1", role("app-reader"), json!({})).await;
    pod(&cluster, "team", "plain", "worker-1", json!({}), json!({})).await;
    pod(&cluster, "team", "greedy", "worker-1", role("admin"), json!({})).await;
    pod(&cluster, "team", "typo", "worker-1", role("arn:aws:iam::12345:role/app-reader"), json!({})).await;
    let renamed =
        json!({ "iam.amazonaws.com/role": "app-reader", "iam.amazonaws.com/session-name": "has space" });
    pod(&cluster, "team", "renamed", "worker-1", renamed, json!({})).await;
    pod(&cluster, "team", "hostnet", "worker-1", json!({}), json!({ "hostNetwork": true })).await;
    pod(&cluster, "team", "agentless", "worker-2", role("app-reader"), json!({})).await;
    pod(&cluster, "team", "intruder", "server-1", role("app-reader"), json!({})).await;

    let (code, text) = explain(&cluster, &["team/web"]);
    assert_eq!(code, 0, "{text}");
    for line in [
        "pod team/web",
        "ok      annotation iam.amazonaws.com/role: \"app-reader\"",
        "ok      role ARN: arn:aws:iam::123456789012:role/app-reader",
        "ok      namespace team permits it: iam.amazonaws.com/permitted: \"arn:aws:iam::123456789012:role/app-.*\"",
        "ok      session name: team.web",
        "ok      node worker-1: imdsgate agent imdsgate/agent-w1 runs there and is ready",
        "ok      admission webhook: would admit the pod",
        "verdict: the pod would get credentials",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }

    for (pod, needle) in [
        ("team/plain", "no iam.amazonaws.com/role annotation (reason NO_ROLE)"),
        ("team/greedy", "(reason NAMESPACE_FORBIDS)"),
        ("team/typo", "(reason ROLE_INVALID)"),
        ("team/renamed", "(reason SESSION_NAME_INVALID)"),
        ("team/hostnet", "hostNetwork: true"),
        ("team/agentless", "node worker-2: no imdsgate agent"),
        ("team/intruder", "node server-1 is an imdsgate server node"),
    ] {
        let (code, text) = explain(&cluster, &[pod]);
        assert_eq!(code, 1, "{pod} is refused:\n{text}");
        assert!(text.contains(needle) && text.contains("REFUSED"), "{pod}: {needle:?} not in:\n{text}");
        assert!(text.contains("verdict: the pod would get NO credentials"), "{text}");
    }
    let (_, text) = explain(&cluster, &["team/greedy"]);
    assert!(
        text.contains("admission webhook: would refuse it (role_not_permitted)"),
        "what the webhook would say:\n{text}"
    );

    // A manifest, in CI, before the pod exists.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pod.yaml");
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: batch\n  namespace: team\n  annotations:\n    iam.amazonaws.com/role: ROLE\nspec:\n  containers:\n  - name: main\n    image: registry.invalid/app:1\n";
    std::fs::write(&manifest, yaml.replace("ROLE", "app-writer")).unwrap();
    let (code, text) = explain(&cluster, &["--file", manifest.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("manifest team/batch") && text.contains("node: not scheduled yet"), "{text}");
    std::fs::write(&manifest, yaml.replace("ROLE", "root")).unwrap();
    let (code, text) = explain(&cluster, &["--file", manifest.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("reason NAMESPACE_FORBIDS"), "{text}");

    // Bad input: a clear error and exit 64.
    let (code, text) = explain(&cluster, &["team/nonexistent"]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("reading pod team/nonexistent"), "{text}");
}
