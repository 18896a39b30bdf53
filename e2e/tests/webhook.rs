//! The admission webhook through the real apiserver: a ValidatingWebhookConfiguration pointing at
//! the running server, and pods created and updated as a user would.

use imdsgate_e2e::components::{Pki, ServerProcess, http_get, install_rbac, metric_value};
use imdsgate_e2e::process::free_port;
use imdsgate_e2e::tools::workspace_root;
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

/// The matchConditions deploy/base/webhook.yaml ships (what the apiserver evaluates before it
/// calls the webhook at all).
fn shipped_match_conditions() -> serde_json::Value {
    let yaml = std::fs::read_to_string(workspace_root().join("deploy/base/webhook.yaml")).unwrap();
    let config: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let conditions = config["webhooks"][0]["matchConditions"].clone();
    assert!(
        conditions.as_array().is_some_and(|c| !c.is_empty()),
        "deploy/base/webhook.yaml has matchConditions"
    );
    conditions
}

/// The apiserver, the server with its webhook, a server node and a worker, and the webhook
/// configured for pods and pods/binding with the shipped matchConditions (as
/// deploy/base/webhook.yaml does), in effect.
struct WebhookBed {
    cluster: Cluster,
    server: ServerProcess,
    _sts: Sts,
    _pki: Pki,
}

async fn start(extra_server_args: &[&str]) -> WebhookBed {
    let (cluster, sts) = tokio::join!(Cluster::start(), Sts::start());
    let (cluster, sts) = (cluster.unwrap(), sts.unwrap());
    install_rbac(&cluster).unwrap();
    let pki = Pki::new().unwrap();
    let tls = pki.files();
    let port = free_port().unwrap();
    let mut args = vec![
        "--role-base-arn=arn:aws:iam::123456789012:role/".to_string(),
        format!("--webhook-listen=127.0.0.1:{port}"),
        format!("--webhook-tls-cert={}", tls.server_cert.display()),
        format!("--webhook-tls-key={}", tls.server_key.display()),
    ];
    args.extend(extra_server_args.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&cluster, &sts, &tls, &args).await.expect("server with webhook starts");

    cluster.create_labelled_node("server-1", &[("imdsgate.io/server-node", "true")]).await.unwrap();
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
            "rules": [
                { "operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                  "resources": ["pods"], "scope": "Namespaced" },
                { "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                  "resources": ["pods/binding", "bindings"], "scope": "Namespaced" }
            ],
            "namespaceSelector": { "matchExpressions": [{ "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                                          "values": ["imdsgate", "kube-system"] }] },
            "matchConditions": shipped_match_conditions(),
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
    WebhookBed { cluster, server, _sts: sts, _pki: pki }
}

#[tokio::test]
async fn the_apiserver_rejects_what_the_webhook_denies() {
    if !e2e_enabled("the_apiserver_rejects_what_the_webhook_denies") {
        return;
    }
    let WebhookBed { cluster, server, .. } = start(&[]).await;

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
    // A DaemonSet's pod, as its controller creates it: tolerating every taint (node-exporter, log
    // shippers) and pinned to one node by `matchFields metadata.name`. Judged by that node.
    let daemon_pod = |name: &str, node: &str| {
        json!({
            "metadata": { "name": name, "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "DaemonSet",
                "name": "exporter", "uid": "0b5c1a4e-1d0e-4a55-9a3e-4a7d6f1c2b3a", "controller": true }] },
            "spec": {
                "tolerations": [{ "operator": "Exists" }],
                "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                    { "matchFields": [{ "key": "metadata.name", "operator": "In", "values": [node] }] }] } } }
            }
        })
    };
    create(&cluster, "team", daemon_pod("exporter-worker", "worker-1"))
        .await
        .expect("a DaemonSet pod pinned to a worker is admitted");
    Api::<Pod>::namespaced(cluster.client(), "team")
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "exporter-worker",
            &PostParams::default(),
            &json!({ "apiVersion": "v1", "kind": "Binding", "metadata": { "name": "exporter-worker", "namespace": "team" },
                     "target": { "apiVersion": "v1", "kind": "Node", "name": "worker-1" } }),
        )
        .await
        .expect("and bound there, as the scheduler would");
    let relabel = json!({ "metadata": { "labels": { "pod-template-generation": "2" } } });
    Api::<Pod>::namespaced(cluster.client(), "team")
        .patch("exporter-worker", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .expect("and updated there");
    rejected(
        create(&cluster, "team", daemon_pod("exporter-server", "server-1")).await,
        "imdsgate.io/server-node DoesNotExist",
    );
    // Without the pin, the owner reference alone changes nothing.
    let mut forged = daemon_pod("exporter-forged", "worker-1");
    forged["spec"].as_object_mut().unwrap().remove("affinity");
    rejected(create(&cluster, "team", forged).await, "tolerates imdsgate.io/server-node:NoSchedule");
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

#[tokio::test]
async fn host_network_unknown_nodes_bindings_overrides_and_pods_on_server_nodes() {
    if !e2e_enabled("host_network_unknown_nodes_bindings_overrides_and_pods_on_server_nodes") {
        return;
    }
    let WebhookBed { cluster, server, .. } =
        start(&["--host-network-exempt-label=imdsgate.io/host-network=allowed"]).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), "team");

    // A hostNetwork pod without a role reads the node's own role: refused by default...
    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "exporter" }, "spec": { "hostNetwork": true } }),
        )
        .await,
        "node's own IAM role",
    );
    // ...unless it carries the label the operator named, knowingly.
    create(
        &cluster,
        "team",
        json!({ "metadata": { "name": "exporter", "labels": { "imdsgate.io/host-network": "allowed" } },
                "spec": { "hostNetwork": true } }),
    )
    .await
    .expect("a labelled node agent is admitted");

    // A node that does not exist yet could join as a server node.
    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "early" }, "spec": { "nodeName": "future-1" } }),
        )
        .await,
        "does not exist",
    );

    // Binding (the scheduler's step, or anyone allowed pods/binding) goes through the webhook too.
    create(&cluster, "team", json!({ "metadata": { "name": "floating" }, "spec": {} }))
        .await
        .expect("unscheduled");
    let binding = |node: &str| {
        json!({ "apiVersion": "v1", "kind": "Binding", "metadata": { "name": "floating", "namespace": "team" },
                "target": { "apiVersion": "v1", "kind": "Node", "name": node } })
    };
    let refused = pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "floating",
            &PostParams::default(),
            &binding("server-1"),
        )
        .await
        .expect_err("binding to a server node is refused")
        .to_string();
    assert!(refused.contains("imdsgate:") && refused.contains("server node"), "{refused}");
    // The legacy bindings resource is the same door.
    let legacy: k8s_openapi::api::core::v1::Binding = serde_json::from_value(binding("server-1")).unwrap();
    let refused = Api::<k8s_openapi::api::core::v1::Binding>::namespaced(cluster.client(), "team")
        .create(&PostParams::default(), &legacy)
        .await
        .expect_err("a legacy binding to a server node is refused")
        .to_string();
    assert!(refused.contains("imdsgate:") && refused.contains("server node"), "{refused}");
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        "floating",
        &PostParams::default(),
        &binding("worker-1"),
    )
    .await
    .expect("binding to a worker is allowed");
    assert_eq!(pods.get("floating").await.unwrap().spec.unwrap().node_name.as_deref(), Some("worker-1"));

    // A session name that names another namespace's pod is refused with what to do instead.
    rejected(
        create(
            &cluster,
            "team",
            json!({ "metadata": { "name": "sneaky", "annotations": {
                "iam.amazonaws.com/role": "app-reader", "iam.amazonaws.com/session-name": "other ns/victim" } },
                    "spec": {} }),
        )
        .await,
        "team@<name>",
    );

    // A worker running an ordinary pod becomes a server node: the pod is reported.
    cluster.create_node("worker-2").await.unwrap();
    create(
        &cluster,
        "team",
        json!({ "metadata": { "name": "resident" }, "spec": { "nodeName": "worker-2" } }),
    )
    .await
    .expect("an ordinary node");
    assert_eq!(server.metric("imdsgate_server_pods_on_server_nodes").await.unwrap(), 0.0);
    let label = json!({ "metadata": { "labels": { "imdsgate.io/server-node": "true" } } });
    Api::<Node>::all(cluster.client())
        .patch("worker-2", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("imdsgate_server_pods_on_server_nodes").await.unwrap() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the pod on the new server node was never reported:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client(), "team");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = events.list(&Default::default()).await.unwrap();
        let found = list.items.iter().find(|e| {
            e.reason.as_deref() == Some("POD_ON_SERVER_NODE")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("resident")
        });
        if let Some(event) = found {
            assert_eq!(event.type_.as_deref(), Some("Warning"));
            assert!(event.note.as_deref().unwrap_or_default().contains("worker-2"), "{event:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no Warning Event on the pod:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.log().contains("a pod runs on a server node"), "{}", server.log());
}

#[tokio::test]
async fn warn_mode_admits_with_a_warning_what_enforce_refuses() {
    if !e2e_enabled("warn_mode_admits_with_a_warning_what_enforce_refuses") {
        return;
    }
    let WebhookBed { cluster, server, .. } = start(&["--webhook-mode=warn"]).await;
    // As a user migrating off kiam would: kubectl, which prints admission warnings on stderr.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("greedy.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: greedy\n  namespace: team\n  annotations:\n    iam.amazonaws.com/role: admin\nspec:\n  containers:\n  - name: main\n    image: registry.invalid/app:1\n",
    )
    .unwrap();
    let out = cluster.kubectl_output(&["create".as_ref(), "-f".as_ref(), manifest.as_os_str()]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "admitted in warn mode: {stderr}");
    assert!(
        stderr.contains("Warning: imdsgate (warn mode) would refuse this pod")
            && stderr.contains("does not permit role arn:aws:iam::123456789012:role/admin"),
        "kubectl shows what enforcing would refuse: {stderr}"
    );
    Api::<Pod>::namespaced(cluster.client(), "team").get("greedy").await.expect("the pod exists");
    let warned = server
        .metric("imdsgate_server_admissions_total{decision=\"warned\",reason=\"role_not_permitted\"}")
        .await
        .unwrap();
    assert_eq!(warned, 1.0);
    // A permitted pod draws no warning.
    std::fs::write(
        &manifest,
        std::fs::read_to_string(&manifest).unwrap().replace("greedy", "fine").replace("admin", "app-reader"),
    )
    .unwrap();
    let out = cluster.kubectl_output(&["create".as_ref(), "-f".as_ref(), manifest.as_os_str()]).unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("imdsgate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With no server answering (failurePolicy Fail), the apiserver still creates every pod that
/// carries nothing imdsgate decides and cannot reach a server node, and relabels pods whose
/// judged fields did not change; what needs judging is refused until a server answers.
#[tokio::test]
async fn an_unanswering_webhook_blocks_only_what_it_must_judge() {
    if !e2e_enabled("an_unanswering_webhook_blocks_only_what_it_must_judge") {
        return;
    }
    let WebhookBed { cluster, mut server, .. } = start(&[]).await;
    create(
        &cluster,
        "team",
        json!({ "metadata": { "name": "web", "annotations": { "iam.amazonaws.com/role": "app-reader" } }, "spec": {} }),
    )
    .await
    .expect("a permitted pod is admitted while the server answers");
    server.child.terminate(Duration::from_secs(10)).unwrap();

    let started = Instant::now();
    let plain = json!({ "metadata": { "name": "plain", "labels": { "app": "plain" } }, "spec": {
        // As every pod has them once the apiserver's DefaultTolerationSeconds has run.
        "tolerations": [
            { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 },
            { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 }
        ],
        "affinity": { "nodeAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [
            { "weight": 1, "preference": { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] } }] } }
    } });
    create(&cluster, "team", plain).await.expect("an ordinary pod never reaches the webhook");
    cluster.create_namespace("fresh", &[]).await.unwrap();
    create(&cluster, "fresh", json!({ "metadata": { "name": "job" }, "spec": {} }))
        .await
        .expect("nor does one in a namespace created a moment ago");
    assert!(started.elapsed() < Duration::from_secs(5), "admitted at once, not after the webhook's timeout");
    // Updates that change nothing imdsgate judges go through, even on a pod with a role.
    let relabel = json!({ "metadata": { "labels": { "version": "2" } } });
    Api::<Pod>::namespaced(cluster.client(), "team")
        .patch("web", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .expect("a relabel of a role pod is not judged again");

    let failed = |result: Result<Pod, String>, what: &str| match result {
        Ok(_) => panic!("{what} was admitted with no server to judge it"),
        Err(message) => assert!(message.contains("pods.imdsgate.io"), "{what}: {message}"),
    };
    let role = json!({ "metadata": { "name": "r", "annotations": { "iam.amazonaws.com/role": "app-reader" } }, "spec": {} });
    failed(create(&cluster, "team", role).await, "a pod naming a role");
    let session = json!({ "metadata": { "name": "s", "annotations": { "iam.amazonaws.com/session-name": "x" } }, "spec": {} });
    failed(create(&cluster, "team", session).await, "a pod naming a session");
    let tolerant = json!({ "metadata": { "name": "t" }, "spec": { "tolerations": [
        { "key": "imdsgate.io/server-node", "operator": "Exists", "effect": "NoSchedule" }] } });
    failed(create(&cluster, "team", tolerant).await, "a pod tolerating the server taint");
    let everything =
        json!({ "metadata": { "name": "e" }, "spec": { "tolerations": [{ "operator": "Exists" }] } });
    failed(create(&cluster, "team", everything).await, "a pod tolerating every taint");
    let bound = json!({ "metadata": { "name": "b" }, "spec": { "nodeName": "server-1" } });
    failed(create(&cluster, "team", bound).await, "a pod bound to a node");
    let host = json!({ "metadata": { "name": "h" }, "spec": { "hostNetwork": true } });
    failed(create(&cluster, "team", host).await, "a hostNetwork pod");
    let selector = json!({ "metadata": { "name": "n" }, "spec": { "nodeSelector": { "imdsgate.io/server-node": "true" } } });
    failed(create(&cluster, "team", selector).await, "a pod selecting server nodes");
    let pinned = json!({ "metadata": { "name": "p" }, "spec": { "affinity": { "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
            { "matchFields": [{ "key": "metadata.name", "operator": "In", "values": ["server-1"] }] }] } } } } });
    failed(create(&cluster, "team", pinned).await, "a pod pinned to a node");
    // A binding by anyone but the scheduler is judged: the test's client is an administrator.
    let binding = Api::<Pod>::namespaced(cluster.client(), "team")
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "plain",
            &PostParams::default(),
            &json!({ "apiVersion": "v1", "kind": "Binding", "metadata": { "name": "plain", "namespace": "team" },
                     "target": { "apiVersion": "v1", "kind": "Node", "name": "server-1" } }),
        )
        .await;
    let message = binding.expect_err("a binding by an administrator is judged").to_string();
    assert!(message.contains("pods.imdsgate.io"), "{message}");
    // Changing a role is judged.
    let patch = json!({ "metadata": { "annotations": { "iam.amazonaws.com/role": "app-writer" } } });
    let update = Api::<Pod>::namespaced(cluster.client(), "team")
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    assert!(update.expect_err("a role change is judged").to_string().contains("pods.imdsgate.io"));
}
