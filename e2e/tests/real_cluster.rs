//! imdsgate installed on a real multi-node cluster (scripts/cluster.sh: kubelets, containerd,
//! kube-proxy and CoreDNS in node namespaces, images built from the repository's Dockerfile), the
//! way the README's kind and EKS steps do it: namespace, `scripts/gen-certs.sh --apply`,
//! `kubectl apply -k deploy/overlays/local`, the webhook's CA patch. Then, through kubectl and from
//! inside real containers: placement, credentials, refusals, the webhook through its Service,
//! rolling the agents and losing a server under load, and the uninstall.

use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::process::run;
use imdsgate_e2e::real_cluster::RealCluster;
use imdsgate_e2e::tools::{tool_bin, workspace_bin, workspace_root};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

const ROLLOUT: Duration = Duration::from_secs(300);
const STS: &str = "http://10.77.0.2:5000";

fn path(rel: &str) -> String {
    workspace_root().join(rel).to_string_lossy().into_owned()
}

/// Node names of the pods `kubectl get pods ARGS` lists, one per pod.
fn pod_nodes(cluster: &RealCluster, ns: &str, selector: &str) -> Vec<String> {
    let out = cluster
        .kubectl(&[
            "-n",
            ns,
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
        ])
        .unwrap();
    let mut nodes: Vec<String> = out.lines().map(str::to_owned).collect();
    nodes.sort();
    nodes
}

/// A pod of the workload image in `team-a` running `command`, with the role annotation if given.
fn workload_pod(name: &str, role: Option<&str>, command: &[&str], restart: &str) -> String {
    let annotations =
        role.map(|r| format!("  annotations:\n    iam.amazonaws.com/role: {r}\n")).unwrap_or_default();
    let command = command.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: team-a\n{annotations}spec:\n  \
         restartPolicy: {restart}\n  terminationGracePeriodSeconds: 1\n  containers:\n    - name: main\n      \
         image: localhost/imdsgate/workload:dev\n      imagePullPolicy: Never\n      command: [{command}]\n      \
         env:\n        - {{name: AWS_ENDPOINT_URL_STS, value: \"{STS}\"}}\n        - {{name: AWS_REGION, value: us-east-1}}\n"
    )
}

/// Waits for a run-once pod to finish; its phase and logs.
async fn finished(cluster: &RealCluster, name: &str) -> (String, String) {
    let phase = cluster
        .wait_for(
            &format!("pod {name} to finish"),
            Duration::from_secs(120),
            &["-n", "team-a", "get", "pod", name, "-o", "jsonpath={.status.phase}"],
            |p| p == "Succeeded" || p == "Failed",
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\n{}",
                cluster.kubectl(&["-n", "team-a", "describe", "pod", name]).unwrap_or_default()
            )
        });
    let logs =
        cluster.kubectl(&["-n", "team-a", "logs", name]).unwrap_or_else(|e| format!("(no logs: {e:#})"));
    (phase, logs)
}

/// The asker's JSON lines (from `kubectl logs`), one per round.
fn rounds(cluster: &RealCluster, pod: &str) -> Vec<Value> {
    let logs = cluster.kubectl(&["-n", "team-a", "logs", pod]).expect("asker logs");
    logs.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
}

/// Rounds started in [from, to) (unix ms): how many, how many did not end in a 200 with
/// credentials, how many carried something of the node's own metadata service.
fn tally(rounds: &[Value], from: u64, to: u64) -> (usize, usize, usize) {
    let window: Vec<&Value> =
        rounds.iter().filter(|r| r["t"].as_u64().is_some_and(|t| t >= from && t < to)).collect();
    let failed = window.iter().filter(|r| !(r["status"] == 200 && r["step"] == "creds")).count();
    let node = window.iter().filter(|r| r["node"] == true).count();
    (window.len(), failed, node)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn imdsgate_on_a_real_cluster() {
    if !e2e_enabled("imdsgate_on_a_real_cluster") {
        return;
    }
    let cluster = RealCluster::up().expect("scripts/cluster.sh up");
    eprintln!("figure: cluster up in {:.1}s", cluster.up_time.as_secs_f64());
    let k = |args: &[&str]| cluster.kubectl(args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"));

    // Install as the README says.
    let installed = Instant::now();
    cluster.install_local_overlay(ROLLOUT).unwrap_or_else(|e| panic!("{e:#}"));
    let timeout = format!("--timeout={}s", ROLLOUT.as_secs());
    eprintln!("figure: installed and rolled out in {:.1}s", installed.elapsed().as_secs_f64());

    // 1. Placement: agents on every worker and no server node; servers on the server nodes.
    assert_eq!(pod_nodes(&cluster, "imdsgate", "app.kubernetes.io/name=imdsgate-agent"), vec!["worker-0"]);
    assert_eq!(
        pod_nodes(&cluster, "imdsgate", "app.kubernetes.io/name=imdsgate-server"),
        vec!["server-0", "server-1"]
    );

    // 2. Credentials from a real SDK inside a container; refusals for the others, with reasons.
    k(&["create", "namespace", "team-a"]);
    k(&[
        "annotate",
        "namespace",
        "team-a",
        "iam.amazonaws.com/permitted=arn:aws:iam::123456789012:role/app-.*",
    ]);
    cluster.apply_yaml(&workload_pod("whoami", Some("app-reader"), &["imds-whoami"], "Never")).unwrap();
    cluster.apply_yaml(&workload_pod("norole", None, &["imds-whoami"], "Never")).unwrap();
    // A role the namespace stops permitting after the pod was admitted: the server refuses it.
    cluster
        .apply_yaml(&workload_pod(
            "revoked",
            Some("app-writer"),
            &["sh", "-c", "sleep 8; exec imds-whoami"],
            "Never",
        ))
        .unwrap();
    k(&[
        "annotate",
        "--overwrite",
        "namespace",
        "team-a",
        "iam.amazonaws.com/permitted=arn:aws:iam::123456789012:role/app-reader",
    ]);
    let (phase, logs) = finished(&cluster, "whoami").await;
    assert_eq!(phase, "Succeeded", "whoami: {logs}");
    assert!(logs.contains("assumed-role/app-reader/team-a.whoami"), "whoami: {logs}");
    // The SDK says what it got (404: no role for this pod; 403 or 503: refused); the pod's Events
    // say why, with the reason code and the text the README's troubleshooting lists.
    for (pod, status, reason) in [("norole", "404", "NO_ROLE"), ("revoked", "40", "NAMESPACE_FORBIDS")] {
        let (phase, logs) = finished(&cluster, pod).await;
        eprintln!("figure: {pod} logs: {}", logs.trim());
        assert_eq!(phase, "Failed", "{pod}: {logs}");
        assert!(!logs.contains("assumed-role"), "{pod}: {logs}");
        assert!(
            !logs.contains("node-secret") && !logs.contains("NODEROLEKEY"),
            "{pod} saw the node's role: {logs}"
        );
        assert!(logs.contains(status), "{pod}'s logs do not show the refusal ({status}): {logs}");
        let events = cluster
            .wait_for(
                &format!("{pod}'s refusal Event"),
                Duration::from_secs(30),
                &[
                    "-n",
                    "team-a",
                    "get",
                    "events",
                    "--field-selector",
                    &format!("involvedObject.name={pod}"),
                    "-o",
                    "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
                ],
                |e| e.contains(reason),
            )
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("figure: {pod} events: {}", events.trim());
    }
    // A role the namespace does not permit is refused when the pod is created.
    let refused = cluster
        .apply_yaml(&workload_pod("unpermitted", Some("admin"), &["imds-whoami"], "Never"))
        .expect_err("a pod with a role its namespace does not permit is refused");
    assert!(format!("{refused:#}").contains("does not permit role"), "{refused:#}");

    // 3. The webhook, called by the apiserver through its Service.
    let pinned = workload_pod("pinned", Some("app-reader"), &["sleep", "60"], "Never").replace(
        "spec:\n",
        "spec:\n  nodeSelector: {kubernetes.io/hostname: server-0}\n  tolerations: [{operator: Exists}]\n",
    );
    let refused = cluster.apply_yaml(&pinned).expect_err("a pod pinned to a server node is refused");
    assert!(format!("{refused:#}").contains("imdsgate"), "{refused:#}");
    assert!(format!("{refused:#}").contains("server node"), "{refused:#}");
    let host = workload_pod("hostnet", Some("app-reader"), &["sleep", "60"], "Never")
        .replace("spec:\n", "spec:\n  hostNetwork: true\n");
    let refused = cluster.apply_yaml(&host).expect_err("a role-annotated hostNetwork pod is refused");
    assert!(format!("{refused:#}").contains("hostNetwork"), "{refused:#}");

    // 4. Under load (one round every 100 ms): roll the agents, then lose a server.
    cluster
        .apply_yaml(&workload_pod(
            "asker",
            Some("app-reader"),
            &[
                "imdsgate-asker",
                "--every-ms",
                "100",
                "--seconds",
                "590",
                "--timeout-ms",
                "2000",
                "--out",
                "/dev/stdout",
            ],
            "Never",
        ))
        .unwrap();
    cluster
        .wait_for(
            "the asker's first credentials",
            Duration::from_secs(60),
            &["-n", "team-a", "logs", "asker"],
            |l| l.contains("\"step\":\"creds\""),
        )
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (checks, missing) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let watcher = {
        let (stop, checks, missing) = (stop.clone(), checks.clone(), missing.clone());
        let worker = cluster.netns("worker-0");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{worker}"))
                    .args(["--", "iptables", "-w", "5", "-t", "nat", "-S"])
                    .output();
                checks.fetch_add(1, Ordering::Relaxed);
                if !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("169.254.169.254")) {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let roll_from = now_ms();
    k(&["-n", "imdsgate", "rollout", "restart", "daemonset/imdsgate-agent"]);
    k(&["-n", "imdsgate", "rollout", "status", "daemonset/imdsgate-agent", &timeout]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let roll_to = now_ms();
    let server_pod = k(&[
        "-n",
        "imdsgate",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=imdsgate-server",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let kill_from = now_ms();
    k(&["-n", "imdsgate", "delete", "pod", &server_pod, "--wait=true"]);
    k(&["-n", "imdsgate", "rollout", "status", "deployment/imdsgate-server", &timeout]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kill_to = now_ms();
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let all = rounds(&cluster, "asker");
    let (roll_n, roll_failed, roll_node) = tally(&all, roll_from, roll_to);
    let (kill_n, kill_failed, kill_node) = tally(&all, kill_from, kill_to);
    eprintln!(
        "figure: agent rollout restart: {roll_n} rounds, {roll_failed} failed, {roll_node} from the node; rule \
         checks {} missing {}",
        checks.load(Ordering::Relaxed),
        missing.load(Ordering::Relaxed)
    );
    eprintln!("figure: server pod deleted: {kill_n} rounds, {kill_failed} failed, {kill_node} from the node");
    assert!(roll_n > 20 && kill_n > 20, "the asker ran through both ({roll_n}, {kill_n} rounds)");
    assert_eq!(roll_node + kill_node, 0, "answers from the node's metadata service");
    assert_eq!(missing.load(Ordering::Relaxed), 0, "the rule was missing during the agent's restart");
    assert_eq!(kill_failed, 0, "requests failed while a server pod was deleted");

    // 5. Uninstall: delete -k, then the documented `imdsgate-agent iptables uninstall` per node.
    k(&["delete", "-k", &path("deploy/overlays/local"), "--wait=true", &timeout]);
    let rules = cluster.nat_rules("worker-0").unwrap();
    assert!(
        rules.contains("169.254.169.254"),
        "the rule stays after the agent is gone (fail closed):\n{rules}"
    );
    let agent = workspace_bin("imdsgate-agent").unwrap();
    for node in ["server-0", "server-1", "worker-0"] {
        run(cluster.in_node(node, &agent.to_string_lossy()).args(["iptables", "uninstall"])).unwrap();
        let rules = cluster.nat_rules(node).unwrap();
        assert!(!rules.contains("169.254.169.254") && !rules.contains("IMDSGATE"), "{node}:\n{rules}");
    }

    // 6. The Helm chart on the same cluster, in another namespace: installed, serving, and
    //    uninstalled with its post-delete hook taking the rule off every node.
    let helm = |args: &[&str]| {
        run(std::process::Command::new(tool_bin("helm").unwrap())
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("HELM_CACHE_HOME", cluster.dir().join("helm-cache"))
            .env("HELM_CONFIG_HOME", cluster.dir().join("helm-config"))
            .env("HELM_DATA_HOME", cluster.dir().join("helm-data")))
        .unwrap_or_else(|e| panic!("helm {args:?}: {e:#}\n{}", cluster.logs_tail()))
    };
    let helm_started = Instant::now();
    helm(&[
        "install",
        "imdsgate",
        &path("deploy/helm/imdsgate"),
        "--namespace",
        "imdsgate-helm",
        "--create-namespace",
        "--values",
        &path("deploy/helm/imdsgate/ci/local-values.yaml"),
        "--wait",
        "--timeout",
        "300s",
    ]);
    eprintln!("figure: helm install --wait in {:.1}s", helm_started.elapsed().as_secs_f64());
    // As the README's Helm steps: `--wait` counts a DaemonSet of one node with maxUnavailable 1
    // as ready before its agent is (the agent refuses, 503, until it reaches a server).
    for what in ["deployment/imdsgate-server", "daemonset/imdsgate-agent"] {
        k(&["-n", "imdsgate-helm", "rollout", "status", what, &timeout]);
    }
    assert_eq!(
        pod_nodes(&cluster, "imdsgate-helm", "app.kubernetes.io/name=imdsgate-agent"),
        vec!["worker-0"]
    );
    cluster.apply_yaml(&workload_pod("whoami-helm", Some("app-reader"), &["imds-whoami"], "Never")).unwrap();
    let (phase, logs) = finished(&cluster, "whoami-helm").await;
    assert_eq!(phase, "Succeeded", "whoami-helm: {logs}");
    assert!(logs.contains("assumed-role/app-reader/team-a.whoami-helm"), "whoami-helm: {logs}");
    assert!(cluster.nat_rules("worker-0").unwrap().contains("169.254.169.254"));
    let uninstall_started = Instant::now();
    helm(&["uninstall", "imdsgate", "--namespace", "imdsgate-helm", "--wait", "--timeout", "300s"]);
    eprintln!("figure: helm uninstall (hook included) in {:.1}s", uninstall_started.elapsed().as_secs_f64());
    for node in ["server-0", "server-1", "worker-0"] {
        let rules = cluster.nat_rules(node).unwrap();
        assert!(
            !rules.contains("169.254.169.254") && !rules.contains("IMDSGATE"),
            "after helm uninstall, {node}:\n{rules}"
        );
    }
    // The hook's DaemonSet and Job are deleted once done; their pods go with the garbage collector.
    cluster
        .wait_for(
            "the uninstall to leave nothing",
            Duration::from_secs(90),
            &["-n", "imdsgate-helm", "get", "all,secrets,configmaps,serviceaccounts", "-o", "name"],
            |left| !left.lines().any(|l| l.contains("imdsgate")),
        )
        .await
        .unwrap_or_else(|e| panic!("helm uninstall left objects behind: {e:#}"));
}
