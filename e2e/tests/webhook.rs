//! The admission webhook through the real apiserver: a ValidatingWebhookConfiguration pointing at
//! the running server, and pods created and updated as a user would.

use imdsgate_e2e::components::{Pki, ServerProcess, http_get, install_rbac, metric_value};
use imdsgate_e2e::process::free_port;
use imdsgate_e2e::{Cluster, Sts, e2e_enabled};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::{Duration, Instant};

async fn create(cluster: &Cluster, ns: &str, pod: serde_json::Value) -> Result<Pod, String> {
    let mut pod = pod;
    pod["spec"]["containers"] = json!([{ "name": "main", "image": "registry.invalid/app:1" }]);
    let pod: Pod = serde_json::from_value(pod).unwrap();
    Api::<Pod>::namespaced(cluster.client(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .map_err(|e| e.to_string())
}

fn rejected(result: Result<Pod, String>, needle: &str) {
    match result {
        Ok(pod) => panic!("admitted {:?}, expected a rejection mentioning {needle:?}", pod.metadata.name),
        Err(message) => {
            assert!(message.contains("imdsgate:"), "rejected by someone else: {message}");
            assert!(message.contains(needle), "message {message:?} does not mention {needle:?}");
        }
    }
}

#[tokio::test]
async fn the_apiserver_rejects_what_the_webhook_denies() {
    if !e2e_enabled("the_apiserver_rejects_what_the_webhook_denies") {
        return;
    }
    let (cluster, sts) = tokio::join!(Cluster::start(), Sts::start());
    let (cluster, sts) = (cluster.unwrap(), sts.unwrap());
    install_rbac(&cluster).unwrap();
    let pki = Pki::new().unwrap();
    let tls = pki.files();
    let port = free_port().unwrap();
    let server = ServerProcess::start(
        &cluster,
        &sts,
        &tls,
        &[
            "--role-base-arn=arn:aws:iam::123456789012:role/",
            &format!("--webhook-listen=127.0.0.1:{port}"),
            &format!("--webhook-tls-cert={}", tls.server_cert.display()),
            &format!("--webhook-tls-key={}", tls.server_key.display()),
        ],
    )
    .await
    .expect("server with webhook starts");

    let server_node: Node = serde_json::from_value(
        json!({ "metadata": { "name": "server-1", "labels": { "imdsgate.io/server-node": "true" } } }),
    )
    .unwrap();
    Api::<Node>::all(cluster.client()).create(&PostParams::default(), &server_node).await.unwrap();
    cluster.create_node("worker-1").await.unwrap();

    use base64::Engine as _;
    let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": { "name": "imdsgate" },
        "webhooks": [{
            "name": "pods.imdsgate.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "failurePolicy": "Fail",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/validate/pods"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(pki.ca.cert_pem()),
            },
            "rules": [{ "operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                        "resources": ["pods"], "scope": "Namespaced" }],
            "namespaceSelector": { "matchExpressions": [{ "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                                          "values": ["imdsgate", "kube-system"] }] }
        }]
    }))
    .unwrap();
    Api::<ValidatingWebhookConfiguration>::all(cluster.client())
        .create(&PostParams::default(), &vwc)
        .await
        .unwrap();

    cluster
        .create_namespace("team", &[("iam.amazonaws.com/permitted", "arn:aws:iam::123456789012:role/app-.*")])
        .await
        .unwrap();
    // The configuration takes effect asynchronously in the apiserver; wait for the first denial.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "pinned" }, "spec": { "nodeName": "server-1" } }),
        )
        .await;
        match r {
            Err(message) if message.contains("imdsgate:") => {
                assert!(message.contains("server-1") && message.contains("server node"), "{message}");
                break;
            }
            Ok(_) => {
                Api::<Pod>::namespaced(cluster.client(), "team")
                    .delete("pinned", &Default::default())
                    .await
                    .unwrap();
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
        assert!(Instant::now() < deadline, "the webhook never took effect; server log:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "tolerant" }, "spec": { "tolerations": [
                { "key": "imdsgate.io/server-node", "operator": "Exists", "effect": "NoSchedule" }] } }),
        )
        .await,
        "tolerates imdsgate.io/server-node:NoSchedule",
    );
    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "hostnet", "annotations": { "iam.amazonaws.com/role": "app-reader" } },
                    "spec": { "hostNetwork": true } }),
        )
        .await,
        "hostNetwork",
    );
    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "greedy", "annotations": { "iam.amazonaws.com/role": "admin" } }, "spec": {} }),
        )
        .await,
        "does not permit role arn:aws:iam::123456789012:role/admin",
    );
    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "selector" }, "spec": { "nodeSelector": { "imdsgate.io/server-node": "true" } } }),
        )
        .await,
        "nodeSelector",
    );

    // Permitted pods, pods on other nodes and exempt namespaces go through.
    create(
        &cluster,
        "team",
        json!({ "metadata": { "name": "web", "annotations": { "iam.amazonaws.com/role": "app-reader" } }, "spec": {} }),
    )
    .await
    .expect("a permitted pod is admitted");
    create(&cluster, "team", json!({ "metadata": { "name": "worker" }, "spec": { "nodeName": "worker-1" } }))
        .await
        .expect("pinned to a worker");
    cluster.kubectl(&["create", "namespace", "kube-system"]).ok();
    create(
        &cluster,
        "kube-system",
        json!({ "metadata": { "name": "system" }, "spec": { "nodeName": "server-1", "tolerations": [{ "operator": "Exists" }] } }),
    )
    .await
    .expect("exempt namespace admitted");
    cluster.create_namespace("brand-new", &[("iam.amazonaws.com/permitted", ".*")]).await.unwrap();
    create(
        &cluster,
        "brand-new",
        json!({ "metadata": { "name": "fresh", "annotations": { "iam.amazonaws.com/role": "anything" } }, "spec": {} }),
    )
    .await
    .expect("a namespace created a moment ago is read, not assumed to permit nothing");

    // An UPDATE that adds an unpermitted role is rejected too.
    let patch = json!({ "metadata": { "annotations": { "iam.amazonaws.com/role": "admin" } } });
    let update = Api::<Pod>::namespaced(cluster.client(), "team")
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    let message = update.expect_err("the update is rejected").to_string();
    assert!(message.contains("does not permit role arn:aws:iam::123456789012:role/admin"), "{message}");

    // What a pod creation costs in the webhook, as the server measured it.
    let (_, metrics) = http_get(server.admin, "/metrics").await.unwrap();
    let sum = metric_value(&metrics, "imdsgate_server_admission_duration_seconds_sum");
    let count = metric_value(&metrics, "imdsgate_server_admission_duration_seconds_count");
    assert!(
        count >= 9.0,
        "every admission was measured ({count}):\n{}",
        metrics.lines().filter(|l| l.contains("admission")).collect::<Vec<_>>().join("\n")
    );
    eprintln!("webhook: {count} reviews, mean {:.3} ms inside the server", sum / count * 1000.0);
    let denied = metric_value(
        &metrics,
        "imdsgate_server_admissions_total{decision=\"denied\",reason=\"role_not_permitted\"}",
    );
    assert!(denied >= 2.0, "denials counted by reason: {denied}");
}
