//! The Helm chart (deploy/helm/imdsgate): `helm lint` and `helm template` for every values file of
//! its ci/ matrix, each rendering through a server-side dry run on the real apiserver; its
//! defaults render what deploy/base applies (one install, two ways to write it); bad values stop
//! the rendering with a message; and `helm install`, `upgrade` and `uninstall` on the real
//! apiserver (no kubelet here: the workloads' pods are not started, their objects are checked).

use imdsgate_e2e::manifests::{at, container, objects, str_at};
use imdsgate_e2e::process::run;
use imdsgate_e2e::tools::{k8s_bin, tool_bin, workspace_root};
use imdsgate_e2e::{Cluster, e2e_enabled};
use serde_yaml::Value;
use std::process::{Command, Output};

const KUBE_VERSION: &str = "1.34.4";

fn chart() -> String {
    workspace_root().join("deploy/helm/imdsgate").to_string_lossy().into_owned()
}

fn helm(args: &[&str]) -> Output {
    Command::new(tool_bin("helm").expect("helm (scripts/tool-bins.sh)"))
        .args(args)
        // Helm keeps its cache and config under HOME: keep them out of the user's.
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("imdsgate-helm-cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("imdsgate-helm-config"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("imdsgate-helm-data"))
        .output()
        .expect("helm runs")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn template(values: &[&str], namespace: &str) -> String {
    let chart = chart();
    let mut args =
        vec!["template", "imdsgate", &chart, "--namespace", namespace, "--kube-version", KUBE_VERSION];
    args.extend_from_slice(values);
    ok(helm(&args), &format!("helm template {values:?}"))
}

fn values_files() -> Vec<String> {
    let dir = workspace_root().join("deploy/helm/imdsgate/ci");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("ci/ of the chart")
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .filter(|p| p.ends_with("-values.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the values matrix: {files:?}");
    files
}

fn container_args(object: &Value) -> Vec<String> {
    container(object)["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_values_file_lints_renders_and_passes_a_server_side_dry_run() {
    if !e2e_enabled("every_values_file_lints_renders_and_passes_a_server_side_dry_run") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    for ns in ["imdsgate", "iam-system", "monitoring"] {
        cluster.kubectl(&["create", "namespace", ns]).unwrap();
    }
    let standins = workspace_root().join("e2e/testdata/crd-standins.yaml");
    cluster.apply(&["-f", &standins.to_string_lossy()]).unwrap();
    cluster.kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=30s"]).unwrap();
    let chart = chart();

    for file in values_files() {
        let lint = helm(&["lint", &chart, "--strict", "--kube-version", KUBE_VERSION, "-f", &file]);
        let text = ok(lint, &format!("helm lint -f {file}"));
        assert!(text.contains("0 chart(s) failed"), "{file}: {text}");

        let rendered = template(&["-f", &file], "imdsgate");
        let path = cluster.dir().join("rendered.yaml");
        std::fs::write(&path, &rendered).unwrap();
        let out = cluster
            .apply(&["--dry-run=server", "-f", &path.to_string_lossy()])
            .unwrap_or_else(|e| panic!("{file} does not apply: {e:#}\n{rendered}"));
        let objects = objects(&rendered);
        for object in objects.values() {
            let (kind, name) = (str_at(object, &["kind"]), str_at(object, &["metadata", "name"]));
            let line = format!("{}/{name} created (server dry run)", kind.to_lowercase());
            assert!(
                out.lines().any(|l| l.starts_with(&kind.to_lowercase()) && l.ends_with(&line[kind.len()..])),
                "{file}: {kind}/{name} not accepted:\n{out}"
            );
        }
    }

    // The renamed install: every name and the namespace follow the values, so agents find the
    // server, the server accepts the agents' ServiceAccount and the webhook exempts its namespace.
    // The containers name their namespace as deploy/base does, $(POD_NAMESPACE) from the downward
    // API, which is the namespace the workloads are rendered into.
    let everything = workspace_root().join("deploy/helm/imdsgate/ci/everything-values.yaml");
    let objects = objects(&template(&["-f", &everything.to_string_lossy()], "imdsgate"));
    for workload in ["DaemonSet/iam-agent", "Deployment/iam-server"] {
        assert_eq!(str_at(&objects[workload], &["metadata", "namespace"]), "iam-system", "{workload}");
        let env = &at(&objects[workload], &["spec", "template", "spec", "containers"])[0]["env"];
        let pod_namespace = env.as_sequence().unwrap().iter().find(|e| e["name"] == "POD_NAMESPACE");
        assert_eq!(
            pod_namespace.map(|e| str_at(e, &["valueFrom", "fieldRef", "fieldPath"])).as_deref(),
            Some("metadata.namespace"),
            "{workload}: {env:?}"
        );
    }
    let agent = container_args(&objects["DaemonSet/iam-agent"]);
    for want in [
        "--server=https://iam-server.$(POD_NAMESPACE).svc:18443",
        "--server-name=iam-server.$(POD_NAMESPACE).svc",
        "--listen=[::]:18181",
        "--admin-listen=$(HOST_IP):19611",
        "--host-interface=cali+,eni+",
        "--ipv6=false",
        "--max-requests-per-pod=32",
    ] {
        assert!(agent.contains(&want.to_string()), "agent args lack {want}: {agent:?}");
    }
    let server = container_args(&objects["Deployment/iam-server"]);
    for want in [
        "--role-base-arn=arn:aws:iam::123456789012:role/k8s/",
        "--agent-service-account=$(POD_NAMESPACE):iam-agent",
        "--listen=0.0.0.0:18443",
        "--webhook-listen=0.0.0.0:19443",
        "--server-node-selector=node-role.example.com/iam=yes",
        "--server-node-taint=node-role.example.com/iam=yes:NoExecute",
        "--webhook-exempt-namespaces=$(POD_NAMESPACE),kube-system,monitoring",
        "--webhook-mode=warn",
        "--pod-wait=2s",
    ] {
        assert!(server.contains(&want.to_string()), "server args lack {want}: {server:?}");
    }
    let webhook = &objects["ValidatingWebhookConfiguration/iam"]["webhooks"][0];
    assert_eq!(str_at(webhook, &["failurePolicy"]), "Ignore");
    assert_eq!(str_at(webhook, &["clientConfig", "service", "namespace"]), "iam-system");
    let exempt = &at(webhook, &["namespaceSelector", "matchExpressions"])[0]["values"];
    assert_eq!(serde_yaml::to_string(exempt).unwrap(), "- iam-system\n- kube-system\n- monitoring\n");
    let deployment = &objects["Deployment/iam-server"];
    assert_eq!(at(deployment, &["spec", "template", "spec", "hostNetwork"]), &Value::Bool(true));
    let env = serde_yaml::to_string(at(deployment, &["spec", "template", "spec", "containers"])).unwrap();
    assert!(env.contains("name: imdsgate-aws") && env.contains("AWS_SECRET_ACCESS_KEY"), "{env}");
    assert_eq!(str_at(&objects["ConfigMap/iam-dashboard"], &["metadata", "namespace"]), "monitoring");
    // The agent never lands on a server node or a node it cannot run on, whatever affinity the
    // values add (their kubernetes.io/os term is not repeated); the uninstall hook runs where it ran,
    // and waits on the port the agent's admin port listens on.
    let affinity = |ds: &str| at(&objects[ds], &["spec", "template", "spec", "affinity"]).clone();
    let terms = serde_yaml::to_string(&affinity("DaemonSet/iam-agent")).unwrap();
    for want in [
        "key: kubernetes.io/os",
        "key: node-role.example.com/iam",
        "key: eks.amazonaws.com/compute-type",
        "- fargate\n",
        "- hybrid\n",
        "- auto\n",
        "- virtual-kubelet\n",
    ] {
        assert!(terms.contains(want), "agent affinity lacks {want}: {terms}");
    }
    assert_eq!(terms.matches("key: kubernetes.io/os").count(), 1, "{terms}");
    assert_eq!(affinity("DaemonSet/iam-uninstall"), affinity("DaemonSet/iam-agent"));
    let hook = serde_yaml::to_string(container(&objects["DaemonSet/iam-uninstall"])).unwrap();
    assert!(hook.contains(r#"--admin-listen="$HOST_IP:19611""#) && hook.contains("status.hostIP"), "{hook}");
}

/// What deploy/base and the chart both describe, for comparison: metadata labels and annotations
/// dropped (each adds its own), the generated caBundle dropped.
fn comparable(mut object: Value) -> Value {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_mapping_mut) {
        meta.remove("labels");
        meta.remove("annotations");
    }
    if let Some(hooks) = object.get_mut("webhooks").and_then(Value::as_sequence_mut) {
        for hook in hooks {
            if let Some(cc) = hook.get_mut("clientConfig").and_then(Value::as_mapping_mut) {
                cc.remove("caBundle");
            }
        }
    }
    object
}

#[test]
fn the_charts_defaults_render_what_deploy_base_applies() {
    if !e2e_enabled("the_charts_defaults_render_what_deploy_base_applies") {
        return;
    }
    let base = run(Command::new(k8s_bin("kubectl").unwrap())
        .args(["kustomize", &workspace_root().join("deploy/base").to_string_lossy()]))
    .unwrap();
    let mut base = objects(&base);
    let mut chart = objects(&template(&[], "imdsgate"));
    // Hooks (the uninstall hook's objects) live only around `helm uninstall`.
    chart.retain(|_, o| at(o, &["metadata", "annotations", "helm.sh/hook"]).is_null());
    // Only in one of them: the Namespace (helm install --create-namespace) and the Secrets the chart
    // generates (deploy/base leaves them to gen-certs.sh or cert-manager).
    assert!(base.remove("Namespace/imdsgate").is_some());
    assert!(chart.remove("Secret/imdsgate-server-tls").is_some());
    assert!(chart.remove("Secret/imdsgate-agent-tls").is_some());
    assert_eq!(base.keys().collect::<Vec<_>>(), chart.keys().collect::<Vec<_>>(), "the same objects");
    for (key, base_object) in base {
        let chart_object = chart.remove(&key).unwrap();
        // The chart's labels include every label of the base's.
        for (label, value) in at(&base_object, &["metadata", "labels"]).as_mapping().into_iter().flatten() {
            assert_eq!(
                at(&chart_object, &["metadata", "labels"]).get(label),
                Some(value),
                "{key}: label {label:?}"
            );
        }
        let json = |v: Value| serde_json::to_value(comparable(v)).unwrap();
        let (b, c) = (json(base_object), json(chart_object));
        assert!(
            b == c,
            "{key} differs between deploy/base and the chart's defaults:\nbase:\n{}\nchart:\n{}",
            serde_json::to_string_pretty(&b).unwrap(),
            serde_json::to_string_pretty(&c).unwrap()
        );
    }
}

#[test]
fn bad_values_stop_the_rendering_with_what_to_change() {
    if !e2e_enabled("bad_values_stop_the_rendering_with_what_to_change") {
        return;
    }
    let chart = chart();
    for (set, message) in [
        ("tls.source=vault", "tls.source must be generate, certManager or existingSecret, not \"vault\""),
        ("tls.source=existingSecret", "needs tls.existingSecret.caBundle"),
        ("aws.credentialsSource=irsa", "aws.credentialsSource=irsa needs aws.irsaRoleArn"),
        ("aws.credentialsSource=secret", "needs aws.credentialsSecret"),
        ("webhook.failurePolicy=fail", "webhook.failurePolicy must be Fail or Ignore"),
        ("webhook.mode=audit", "webhook.mode must be enforce or warn"),
        ("server.podAntiAffinity=soft", "server.podAntiAffinity must be required, preferred or none"),
        (
            "server.pdb.minAvailable=2",
            "server.pdb.minAvailable=2 with server.replicas=2 lets no server pod be evicted",
        ),
    ] {
        let text = helm_fails(&["template", "x", &chart, "--kube-version", KUBE_VERSION, "--set", set]);
        assert!(text.contains(message), "--set {set}: {text}");
    }
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_on_a_real_apiserver() {
    if !e2e_enabled("helm_install_upgrade_and_uninstall_on_a_real_apiserver") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    let kubeconfig = cluster.admin_kubeconfig().to_string_lossy().into_owned();
    let chart = chart();
    let release = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--kubeconfig", &kubeconfig, "--namespace", "imdsgate"]);
        helm(&all)
    };
    let installed = ok(release(&["install", "imdsgate", &chart, "--create-namespace"]), "helm install");
    // NOTES.txt: what to check after the install, how to see why a pod gets no credentials, and
    // what failurePolicy=Fail refuses while no server answers.
    for want in [
        "kubectl -n imdsgate rollout status deployment/imdsgate-server",
        "kubectl -n imdsgate rollout status daemonset/imdsgate-agent",
        "helm test imdsgate -n imdsgate",
        "kubernetes.io/service-name=imdsgate-webhook",
        "--dry-run=server --annotations=iam.amazonaws.com/role=",
        "kubectl -n imdsgate exec deploy/imdsgate-server -- imdsgate-server explain <namespace>/<pod>",
        "webhook.failurePolicy=Fail: the apiserver refuses the pods the webhook must judge",
        "(outside\n   the exempt namespaces: imdsgate, kube-system)",
        "pods naming a role or session (iam.amazonaws.com/role",
        "matchConditions let it through",
    ] {
        assert!(installed.contains(want), "NOTES lack {want:?}:\n{installed}");
    }
    assert_eq!(notes_of(&ok(release(&["get", "notes", "imdsgate"]), "helm get notes")), notes_of(&installed));
    // Another install's NOTES follow its names, namespace and failurePolicy (a dry run: not kept).
    let everything = workspace_root().join("deploy/helm/imdsgate/ci/everything-values.yaml");
    let other = ok(
        release(&["install", "other", &chart, "--dry-run=server", "-f", &everything.to_string_lossy()]),
        "helm install --dry-run=server -f everything-values.yaml",
    );
    let other = notes_of(&other);
    for want in [
        "kubectl -n iam-system rollout status deployment/iam-server",
        "kubectl -n iam-system exec deploy/iam-server -- imdsgate-server explain",
        "webhook.failurePolicy=Ignore: the apiserver admits every pod unchecked",
    ] {
        assert!(other.contains(want), "NOTES lack {want:?}:\n{other}");
    }
    assert!(!other.contains("failurePolicy=Fail"), "{other}");

    let get = |what: &str| cluster.kubectl(&["-n", "imdsgate", "get", what, "-o", "yaml"]).unwrap();
    let secret = |name: &str, key: &str| {
        let s: Value = serde_yaml::from_str(&get(&format!("secret/{name}"))).unwrap();
        str_at(&s, &["data", key])
    };
    for what in [
        "daemonset/imdsgate-agent",
        "deployment/imdsgate-server",
        "service/imdsgate-server",
        "service/imdsgate-webhook",
        "serviceaccount/imdsgate-agent",
        "poddisruptionbudget/imdsgate-server",
    ] {
        get(what);
    }
    // The generated TLS: one CA for both Secrets and the webhook's caBundle; the server certificate
    // names the Services the agents and the apiserver call.
    let ca = secret("imdsgate-server-tls", "ca.crt");
    assert!(!ca.is_empty());
    assert_eq!(secret("imdsgate-agent-tls", "ca.crt"), ca);
    let webhook: Value = serde_yaml::from_str(
        &cluster.kubectl(&["get", "validatingwebhookconfiguration/imdsgate", "-o", "yaml"]).unwrap(),
    )
    .unwrap();
    assert_eq!(str_at(&webhook["webhooks"][0], &["clientConfig", "caBundle"]), ca);
    let dir = cluster.dir();
    let decode = |b64: &str, file: &str| {
        use base64::Engine;
        let pem = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        std::fs::write(dir.join(file), pem).unwrap();
        dir.join(file).to_string_lossy().into_owned()
    };
    let (ca_file, server_crt) =
        (decode(&ca, "ca.pem"), decode(&secret("imdsgate-server-tls", "tls.crt"), "server.pem"));
    let agent_crt = decode(&secret("imdsgate-agent-tls", "tls.crt"), "agent.pem");
    for (crt, purpose) in [(&server_crt, "sslserver"), (&agent_crt, "sslclient")] {
        let out =
            run(Command::new("openssl").args(["verify", "-purpose", purpose, "-CAfile", &ca_file, crt]))
                .unwrap();
        assert!(out.contains(": OK"), "{purpose}: {out}");
    }
    let sans =
        run(Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in", &server_crt]))
            .unwrap();
    for name in ["imdsgate-server.imdsgate.svc", "imdsgate-webhook.imdsgate.svc"] {
        assert!(sans.contains(&format!("DNS:{name}")), "{sans}");
    }
    let server_key = secret("imdsgate-server-tls", "tls.key");

    // An upgrade changes what the values say and keeps the certificates (no new CA under running
    // agents).
    ok(
        release(&[
            "upgrade",
            "imdsgate",
            &chart,
            "--set",
            "agent.hostInterfaces={eni+}",
            "--set",
            "metrics.dashboards.enabled=true",
        ]),
        "helm upgrade",
    );
    let ds: Value = serde_yaml::from_str(&get("daemonset/imdsgate-agent")).unwrap();
    assert!(container_args(&ds).contains(&"--host-interface=eni+".to_string()));
    get("configmap/imdsgate-dashboard");
    assert_eq!(secret("imdsgate-server-tls", "tls.key"), server_key, "upgrade kept the server key");
    assert_eq!(secret("imdsgate-server-tls", "ca.crt"), ca, "upgrade kept the CA");
    let history = ok(release(&["history", "imdsgate"]), "helm history");
    assert_eq!(history.lines().count(), 3, "header and two revisions:\n{history}");

    // The release carries the post-delete hook that cleans the nodes; it needs kubelets to run (its
    // pieces are tested below), so this uninstall skips it.
    let hooks = ok(release(&["get", "hooks", "imdsgate"]), "helm get hooks");
    for object in ["kind: DaemonSet", "kind: Job", "helm.sh/hook: post-delete", "--after-agent-exit=5m"] {
        assert!(hooks.contains(object), "hooks lack {object}:\n{hooks}");
    }
    // And the `helm test` pod; running it needs a kubelet (none here: its shape and its script are
    // tested in the_helm_test_pod_asks_a_server_replica_for_readyz).
    for object in ["name: imdsgate-test-readyz", "helm.sh/hook: test"] {
        assert!(hooks.contains(object), "hooks lack {object}:\n{hooks}");
    }
    // Uninstall removes every object, the cluster-scoped ones included.
    ok(release(&["uninstall", "imdsgate", "--wait", "--no-hooks"]), "helm uninstall");
    let left = cluster
        .kubectl(&["get", "clusterrole,clusterrolebinding,validatingwebhookconfiguration", "-o", "name"])
        .unwrap();
    assert!(!left.contains("imdsgate"), "left behind: {left}");
    let left = cluster
        .kubectl(&["-n", "imdsgate", "get", "all,secret,configmap,serviceaccount,pdb", "-o", "name"])
        .unwrap();
    let ours: Vec<&str> = left.lines().filter(|l| l.contains("imdsgate")).collect();
    // The namespace's own kube-root-ca.crt ConfigMap and default ServiceAccount stay with it.
    assert!(ours.is_empty(), "left behind: {ours:?}");
}

/// The NOTES part of `helm install`'s output.
fn notes_of(output: &str) -> String {
    output.split_once("NOTES:\n").map(|(_, notes)| notes.trim().to_string()).unwrap_or_default()
}

fn helm_fails(args: &[&str]) -> String {
    let out = helm(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "helm {args:?} succeeded:\n{text}");
    text
}

#[test]
fn the_schema_refuses_misspelled_and_kiam_style_keys_naming_them() {
    if !e2e_enabled("the_schema_refuses_misspelled_and_kiam_style_keys_naming_them") {
        return;
    }
    let chart = chart();
    for (set, message) in [
        // Misspellings of this chart's keys.
        ("agent.hostInterface=eni+", "at '/agent': additional properties 'hostInterface' not allowed"),
        ("server.replica=3", "at '/server': additional properties 'replica' not allowed"),
        ("server.pdb.minAvaliable=1", "at '/server/pdb': additional properties 'minAvaliable' not allowed"),
        ("webhook.failurPolicy=Ignore", "at '/webhook': additional properties 'failurPolicy' not allowed"),
        ("imagePullSecret[0].name=x", "additional properties 'imagePullSecret' not allowed"),
        // Keys of kiam's and kube2iam's charts.
        ("agent.host.interface=cali+", "at '/agent': additional properties 'host' not allowed"),
        (
            "server.assumeRoleArn=arn:aws:iam::1:role/x",
            "at '/server': additional properties 'assumeRoleArn' not allowed",
        ),
        ("host.iptables=true", "additional properties 'host' not allowed"),
        ("extraArgs.base-role-arn=x", "additional properties 'extraArgs' not allowed"),
        // Wrong types and values the templates would pass through.
        ("server.replicas=two", "at '/server/replicas'"),
        ("server.ports.admin=70000", "at '/server/ports/admin'"),
        ("logFormat=yaml", "at '/logFormat'"),
        ("server.serverNodeTaint=imdsgate.io/server-node", "at '/server/serverNodeTaint'"),
    ] {
        let text = helm_fails(&["template", "x", &chart, "--kube-version", KUBE_VERSION, "--set", set]);
        assert!(text.contains(message), "helm template --set {set}: {text}");
        let text = helm_fails(&["lint", &chart, "--strict", "--kube-version", KUBE_VERSION, "--set", set]);
        assert!(
            text.contains(message) && text.contains("1 chart(s) failed"),
            "helm lint --set {set}: {text}"
        );
    }
    // The free-form maps stay open.
    template(
        &[
            "--set",
            "server.resources.limits.cpu=1",
            "--set",
            "server.nodeSelector.pool=iam",
            "--set",
            "agent.podAnnotations.example\\.com/a=b",
            "--set",
            "server.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
            "--set",
            "server.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].key=a",
            "--set",
            "server.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].operator=Exists",
            "--set",
            "agent.tolerations[0].operator=Exists",
            "--set",
            "tls.certManager.issuerRef.name=ca",
        ],
        "imdsgate",
    );
}

/// With several server-node labels, the webhook counts as a server node only a node that has them
/// all; the agents must then run on every other node (and on none with them all), as the DaemonSet
/// and the uninstall hook's nodeSelectorTerms (ORed) say: one term per label, each excluding it.
#[test]
fn agents_avoid_exactly_the_nodes_the_webhook_counts_as_server_nodes() {
    if !e2e_enabled("agents_avoid_exactly_the_nodes_the_webhook_counts_as_server_nodes") {
        return;
    }
    let rendered = objects(&template(
        &["--set", "server.nodeSelector.pool=iam", "--set", "server.nodeSelector.tier=server"],
        "imdsgate",
    ));
    let terms = |object: &Value| -> Vec<Vec<String>> {
        let path = [
            "spec",
            "template",
            "spec",
            "affinity",
            "nodeAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
            "nodeSelectorTerms",
        ];
        at(object, &path)
            .as_sequence()
            .expect("nodeSelectorTerms")
            .iter()
            .map(|term| {
                at(term, &["matchExpressions"])
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter(|e| {
                        str_at(e, &["operator"]) == "NotIn"
                            && ["pool", "tier"].contains(&str_at(e, &["key"]).as_str())
                    })
                    .map(|e| {
                        format!("{} NotIn {}", str_at(e, &["key"]), at(e, &["values"])[0].as_str().unwrap())
                    })
                    .collect()
            })
            .collect()
    };
    // A node matches if it matches any term: it lacks `pool=iam`, or it lacks `tier=server`.
    let expected = vec![vec!["pool NotIn iam".to_string()], vec!["tier NotIn server".to_string()]];
    assert_eq!(terms(&rendered["DaemonSet/imdsgate-agent"]), expected);
    assert_eq!(
        terms(&rendered["DaemonSet/imdsgate-uninstall"]),
        expected,
        "the uninstall hook runs where the agents run"
    );
    let default = objects(&template(&[], "imdsgate"));
    let path = [
        "spec",
        "template",
        "spec",
        "affinity",
        "nodeAffinity",
        "requiredDuringSchedulingIgnoredDuringExecution",
        "nodeSelectorTerms",
    ];
    assert_eq!(
        at(&default["DaemonSet/imdsgate-agent"], &path).as_sequence().unwrap().len(),
        1,
        "one label: one term"
    );
}

#[test]
fn one_server_replica_renders_no_disruption_budget_that_blocks_every_drain() {
    if !e2e_enabled("one_server_replica_renders_no_disruption_budget_that_blocks_every_drain") {
        return;
    }
    let pdb = |values: &[&str]| {
        objects(&template(values, "imdsgate")).remove("PodDisruptionBudget/imdsgate-server")
    };
    assert_eq!(pdb(&["--set", "server.replicas=1"]), None, "one replica: no PodDisruptionBudget");
    assert_eq!(pdb(&["--set", "server.replicas=0"]), None);
    let two = pdb(&[]).expect("two replicas (the default): a PodDisruptionBudget");
    assert_eq!(at(&two, &["spec", "minAvailable"]), &Value::from(1));
    let three = pdb(&["--set", "server.replicas=3", "--set", "server.pdb.minAvailable=2"]).unwrap();
    assert_eq!(at(&three, &["spec", "minAvailable"]), &Value::from(2));
    let percent = pdb(&["--set", "server.pdb.minAvailable=50%"]).unwrap();
    assert_eq!(str_at(&percent, &["spec", "minAvailable"]), "50%");
    assert_eq!(pdb(&["--set", "server.pdb.enabled=false"]), None);
}

#[test]
fn helm_template_without_kube_version_says_what_to_pass() {
    if !e2e_enabled("helm_template_without_kube_version_says_what_to_pass") {
        return;
    }
    let chart = chart();
    let says_what_to_pass = |text: &str| {
        text.contains("imdsgate needs Kubernetes 1.30 or later")
            && text.contains("not v1.20.0")
            && text.contains("pass your cluster's version, e.g. --kube-version 1.34")
    };
    let text = helm_fails(&["template", "x", &chart]);
    assert!(says_what_to_pass(&text), "{text}");
    // helm lint reports a template's `fail` as [INFO] and passes: it still says it.
    let out = helm(&["lint", &chart, "--strict"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(says_what_to_pass(&text), "{text}");
    let text = helm_fails(&["template", "x", &chart, "--kube-version", "1.29.9"]);
    assert!(
        text.contains("imdsgate needs Kubernetes 1.30 or later") && text.contains("not v1.29.9"),
        "{text}"
    );
    for version in ["1.30.0", "v1.30.14-eks-931bdca"] {
        let out = helm(&["template", "x", &chart, "--kube-version", version]);
        ok(out, &format!("helm template --kube-version {version}"));
    }
}

/// The `helm test` pod: its shape (image, names, restricted security context), and its script
/// run here against a stand-in for the admin port (the test bed has no kubelet to run the pod).
#[test]
fn the_helm_test_pod_asks_a_server_replica_for_readyz() {
    if !e2e_enabled("the_helm_test_pod_asks_a_server_replica_for_readyz") {
        return;
    }
    use std::io::{Read, Write};

    let everything = workspace_root().join("deploy/helm/imdsgate/ci/everything-values.yaml");
    for (values, name, host, port) in [
        (vec![], "Pod/imdsgate-test-readyz", "imdsgate-server.imdsgate.svc", "9610"),
        (
            vec!["-f", &*everything.to_string_lossy()],
            "Pod/iam-test-readyz",
            "iam-server.iam-system.svc",
            "19610",
        ),
    ] {
        let objects = objects(&template(&values, "imdsgate"));
        let pod = &objects[name];
        let server = objects.iter().find(|(k, _)| k.starts_with("Deployment/")).unwrap().1;
        assert_eq!(str_at(pod, &["metadata", "annotations", "helm.sh/hook"]), "test", "{name}");
        assert_eq!(str_at(pod, &["spec", "restartPolicy"]), "Never");
        let c = &at(pod, &["spec", "containers"])[0];
        assert_eq!(c["image"], container(server)["image"], "{name}: the server's image");
        assert_eq!(
            at(pod, &["spec", "imagePullSecrets"]),
            at(server, &["spec", "template", "spec", "imagePullSecrets"])
        );
        assert_eq!(c["command"][0].as_str(), Some("/bin/bash"));
        let env = |key: &str| {
            c["env"].as_sequence().unwrap().iter().find(|e| e["name"] == key).map(|e| str_at(e, &["value"]))
        };
        assert_eq!(env("IMDSGATE_READYZ_HOST").as_deref(), Some(host), "{name}");
        assert_eq!(env("IMDSGATE_READYZ_PORT").as_deref(), Some(port), "{name}");
        // Pod Security "restricted", whatever the namespace enforces.
        assert_eq!(at(pod, &["spec", "securityContext", "runAsNonRoot"]), &Value::Bool(true));
        assert_eq!(str_at(pod, &["spec", "securityContext", "seccompProfile", "type"]), "RuntimeDefault");
        assert_eq!(at(c, &["securityContext", "allowPrivilegeEscalation"]), &Value::Bool(false));
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0].as_str(), Some("ALL"));
    }
    // No server replica's hostname or toleration: the webhook's matchConditions let the pod through.
    let objects = objects(&template(&[], "imdsgate"));
    let pod = &objects["Pod/imdsgate-test-readyz"];
    assert!(at(pod, &["spec", "tolerations"]).is_null() && at(pod, &["spec", "affinity"]).is_null());
    assert!(at(pod, &["metadata", "annotations", "iam.amazonaws.com/role"]).is_null());

    // Its script, with bash as in the image, against a listener answering as /readyz does.
    let script = at(pod, &["spec", "containers"])[0]["args"][0].as_str().unwrap().to_string();
    let serve = |status: &'static str| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answered = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // The whole request (bash may write it in pieces), as an HTTP server reads it.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short: {request:?}");
                request.extend_from_slice(&buf[..n]);
            }
            let request = String::from_utf8_lossy(&request).into_owned();
            let body = if status.starts_with("200") { "ok" } else { "not ready: pods not listed yet" };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes()).unwrap();
            request
        });
        (port, answered)
    };
    let run_script = |port: u16| {
        let out = Command::new("bash")
            .args(["-c", &script])
            .env("IMDSGATE_READYZ_HOST", "127.0.0.1")
            .env("IMDSGATE_READYZ_PORT", port.to_string())
            .env("IMDSGATE_READYZ_ATTEMPTS", "1")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (port, answered) = serve("200 OK");
    let (code, stdout) = run_script(port);
    assert_eq!(code, Some(0), "{stdout}");
    let request = answered.join().unwrap();
    assert!(request.starts_with("GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n"), "{request}");
    assert!(stdout.contains("/readyz: HTTP/1.1 200 OK"), "{stdout}");
    let (code, stdout) = run_script(serve("503 Service Unavailable").0);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("not ready: pods not listed yet"), "says why: {stdout}");
    assert!(stdout.contains("no imdsgate server replica answered 200 on http://127.0.0.1:"), "{stdout}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (code, stdout) = run_script(closed);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("cannot connect to 127.0.0.1:"), "{stdout}");
}

/// The chart's post-delete hook, piece by piece (the whole hook needs kubelets): on a node, the
/// rule is removed only once the node's agent has exited (else its keeper would put it back); the
/// hook's Job waits until the removing DaemonSet is ready on every node.
#[tokio::test]
async fn the_uninstall_hook_waits_for_the_agent_then_removes_the_rule_and_its_job_waits_for_every_node() {
    if !e2e_enabled(
        "the_uninstall_hook_waits_for_the_agent_then_removes_the_rule_and_its_job_waits_for_every_node",
    ) {
        return;
    }
    use imdsgate_e2e::bed::{AgentBed, BedPlan};
    use imdsgate_e2e::process::ChildGuard;
    use imdsgate_e2e::tools::workspace_bin;
    use std::time::Duration;

    let mut bed = AgentBed::start(BedPlan::default()).await.expect("bed");
    let agent_bin = workspace_bin("imdsgate-agent").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut uninstall = ChildGuard::spawn(
        "iptables uninstall --after-agent-exit",
        bed.node.command(&agent_bin).args([
            "iptables",
            "uninstall",
            "--after-agent-exit=60s",
            // The address the agent's admin port listens on (the bed's agent: 127.0.0.1:9611),
            // as the hook gives the node's IP.
            "--admin-listen=127.0.0.1:9611",
        ]),
        &dir.path().join("uninstall.log"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    uninstall.check_running().expect("still waiting while the agent runs");
    assert!(bed.node.nat_rules().unwrap().contains("-j IMDSGATE"), "the rule stays while the agent runs");

    let mut agent = bed.agent.take().unwrap();
    assert_eq!(agent.child.terminate(Duration::from_secs(15)).unwrap(), Some(0));
    let status =
        uninstall.wait_exit(Duration::from_secs(15), "uninstall after the agent exited").await.unwrap();
    assert_eq!(status, Some(0), "{}", uninstall.log_tail(20));
    assert!(!bed.node.nat_rules().unwrap().contains("IMDSGATE"), "rule removed");

    // The hook gives the node's IP, where the agents' admin port listens: it waits on that address,
    // not on loopback (a listener there stands in for an agent bound to it).
    let admin = format!("{}:19184", bed.node.host_ip());
    let mut listener = ChildGuard::spawn(
        "a listener on the node's IP",
        bed.node.command("socat").args([
            format!("TCP-LISTEN:19184,bind={},reuseaddr,fork", bed.node.host_ip()).as_str(),
            "SYSTEM:true",
        ]),
        &dir.path().join("listener.log"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while run(bed.node.command("ss").args(["-Hltn", &format!("src {admin}")])).unwrap().trim().is_empty() {
        assert!(std::time::Instant::now() < deadline, "socat does not listen at {admin}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut uninstall = ChildGuard::spawn(
        "iptables uninstall --admin-listen=<node IP>",
        bed.node.command(&agent_bin).args([
            "iptables",
            "uninstall",
            "--after-agent-exit=60s",
            &format!("--admin-listen={admin}"),
        ]),
        &dir.path().join("uninstall-node-ip.log"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    uninstall.check_running().expect("waits while something answers at the node's IP");
    listener.terminate(Duration::from_secs(5)).unwrap();
    let status =
        uninstall.wait_exit(Duration::from_secs(15), "uninstall after the listener left").await.unwrap();
    assert_eq!(status, Some(0), "{}", uninstall.log_tail(20));

    // wait-daemonset, against the apiserver (no DaemonSet controller here: the test writes the
    // status the controller would).
    let cluster = &bed.cluster;
    let ds = r#"{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"imdsgate-uninstall","namespace":"imdsgate"},
        "spec":{"selector":{"matchLabels":{"a":"b"}},"template":{"metadata":{"labels":{"a":"b"}},
        "spec":{"containers":[{"name":"c","image":"i"}]}}}}"#;
    let file = dir.path().join("ds.json");
    std::fs::write(&file, ds).unwrap();
    cluster.apply(&["-f", &file.to_string_lossy()]).unwrap();
    let status = |ready: i32| {
        let patch = format!(
            r#"{{"status":{{"observedGeneration":1,"desiredNumberScheduled":2,"currentNumberScheduled":2,"numberMisscheduled":0,"updatedNumberScheduled":2,"numberReady":{ready}}}}}"#
        );
        cluster
            .kubectl(&[
                "-n",
                "imdsgate",
                "patch",
                "daemonset/imdsgate-uninstall",
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ])
            .unwrap();
    };
    status(1);
    let kubeconfig = format!("--kubeconfig={}", cluster.admin_kubeconfig().display());
    let out = Command::new(&agent_bin)
        .args(["wait-daemonset", "imdsgate/imdsgate-uninstall", "--timeout=3s", &kubeconfig])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "one node not done: gives up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not rolled out after 3s: 1 of 2 pods ready"), "{stderr}");
    let mut wait = ChildGuard::spawn(
        "wait-daemonset",
        Command::new(&agent_bin).args([
            "wait-daemonset",
            "imdsgate/imdsgate-uninstall",
            "--timeout=60s",
            &kubeconfig,
        ]),
        &dir.path().join("wait.log"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait.check_running().expect("waits while a node is not done");
    status(2);
    let code = wait.wait_exit(Duration::from_secs(15), "wait-daemonset with every node done").await.unwrap();
    assert_eq!(code, Some(0), "{}", wait.log_tail(10));
}
