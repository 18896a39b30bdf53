//! deploy/ on a real apiserver: every kustomization passes a server-side dry run, the Secrets that
//! scripts/gen-certs.sh writes are accepted, an overlay that only sets another namespace moves the
//! whole install there, each ServiceAccount has what it needs and nothing it should not, the
//! namespace admits the agent (Pod Security privileged) and an overlay moves the agent's ports.

use imdsgate_e2e::components::install_rbac;
use imdsgate_e2e::manifests::{at, container, objects, str_at};
use imdsgate_e2e::process::run;
use imdsgate_e2e::tools::workspace_root;
use imdsgate_e2e::{Cluster, e2e_enabled};
use serde_yaml::Value;
use std::process::Command;

fn path(rel: &str) -> String {
    workspace_root().join(rel).to_string_lossy().into_owned()
}

#[tokio::test]
async fn every_kustomization_passes_a_server_side_dry_run() {
    if !e2e_enabled("every_kustomization_passes_a_server_side_dry_run") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    cluster.apply(&["-f", &path("deploy/base/namespace.yaml")]).unwrap();
    cluster.apply(&["-f", &path("e2e/testdata/crd-standins.yaml")]).unwrap();
    cluster.kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=30s"]).unwrap();

    for dir in [
        "deploy/base",
        "deploy/overlays/eks",
        "deploy/overlays/kind",
        "deploy/overlays/cert-manager",
        "deploy/overlays/eks-cert-manager",
        "deploy/overlays/monitoring",
    ] {
        let out = cluster
            .apply(&["--dry-run=server", "-k", &path(dir)])
            .unwrap_or_else(|e| panic!("{dir} does not apply: {e:#}"));
        assert!(out.contains("daemonset.apps/imdsgate-agent created (server dry run)"), "{dir}:\n{out}");
        assert!(out.contains("deployment.apps/imdsgate-server created (server dry run)"), "{dir}:\n{out}");
    }
    let eks = cluster.kubectl(&["kustomize", &path("deploy/overlays/eks")]).unwrap();
    assert!(
        eks.contains("--host-interface=eni+,vlan+"),
        "VPC CNI pods, and pods with their own security groups"
    );
    let both = cluster.kubectl(&["kustomize", &path("deploy/overlays/eks-cert-manager")]).unwrap();
    assert!(
        both.contains("--host-interface=eni+") && both.contains("cert-manager.io/inject-ca-from"),
        "{both}"
    );
    let kind = cluster.kubectl(&["kustomize", &path("deploy/overlays/kind")]).unwrap();
    assert!(kind.contains("--host-interface=veth+"));

    // The Secrets from gen-certs.sh are what the workloads mount.
    let certs = tempfile::tempdir().unwrap();
    run(Command::new("bash")
        .arg(path("scripts/gen-certs.sh"))
        .args(["--out", &certs.path().to_string_lossy()]))
    .unwrap();
    let secrets = certs.path().join("secrets.yaml");
    let out = cluster.apply(&["--dry-run=server", "-f", &secrets.to_string_lossy()]).unwrap();
    assert!(
        out.contains("secret/imdsgate-server-tls created")
            && out.contains("secret/imdsgate-agent-tls created"),
        "{out}"
    );
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().into_iter().flatten().map(|v| v.as_str().unwrap_or_default().to_string()).collect()
}

/// Every place in `object` that names the namespace `ns`, as `path: value`: a field equal to it
/// (but a label value, a token audience or the webhook configuration's own name), a Service's DNS
/// name in it (`x.<ns>.svc`), `<ns>:name` and `<ns>/name` references, and lists like `<ns>,b`.
fn namespace_mentions(object: &Value, ns: &str) -> Vec<String> {
    fn walk(value: &Value, path: String, ns: &str, hits: &mut Vec<String>) {
        match value {
            Value::Mapping(map) => {
                for (key, value) in map {
                    walk(value, format!("{path}.{}", key.as_str().unwrap_or("?")), ns, hits);
                }
            }
            Value::Sequence(items) => {
                for (i, value) in items.iter().enumerate() {
                    walk(value, format!("{path}[{i}]"), ns, hits);
                }
            }
            Value::String(s) => {
                let not_a_namespace = path.contains(".labels.")
                    || path.contains(".matchLabels.")
                    || path.ends_with(".audience")
                    || path.ends_with(".image")
                    || path == ".metadata.name";
                let names = if s == ns {
                    !not_a_namespace
                } else {
                    s.contains(&format!(".{ns}.svc"))
                        || (!not_a_namespace
                            && s.split(['=', ',']).any(|t| {
                                t == ns
                                    || t.starts_with(&format!("{ns}:"))
                                    || t.starts_with(&format!("{ns}/"))
                            }))
                };
                if names {
                    hits.push(format!("{path}: {s}"));
                }
            }
            _ => {}
        }
    }
    let mut hits = Vec::new();
    walk(object, String::new(), ns, &mut hits);
    hits
}

#[test]
fn namespace_mentions_finds_the_forms_a_namespace_is_written_in() {
    let object: Value = serde_yaml::from_str(
        r#"
metadata: {name: imdsgate, labels: {app.kubernetes.io/part-of: imdsgate}}
spec:
  image: imdsgate:0.1.0
  audience: imdsgate
  args:
    - --server=https://imdsgate-server.imdsgate.svc:8443
    - --agent-service-account=imdsgate:imdsgate-agent
    - --webhook-exempt-namespaces=kube-system,imdsgate
    - imdsgate/imdsgate-server
    - --host-interface=eni+
    - /etc/imdsgate/tls
    - imdsgate.io/server-node
    - pods.imdsgate.io
    - imdsgate-server.imdsgate-renamed.svc
  namespace: imdsgate
"#,
    )
    .unwrap();
    assert_eq!(
        namespace_mentions(&object, "imdsgate"),
        [
            ".spec.args[0]: --server=https://imdsgate-server.imdsgate.svc:8443",
            ".spec.args[1]: --agent-service-account=imdsgate:imdsgate-agent",
            ".spec.args[2]: --webhook-exempt-namespaces=kube-system,imdsgate",
            ".spec.args[3]: imdsgate/imdsgate-server",
            ".spec.namespace: imdsgate",
        ]
    );
}

/// issue 11: the namespace was written into the agents' `--server`, the server's defaults and the
/// webhook. An overlay that sets nothing but `namespace:` (over deploy/base, and over an overlay
/// with the cert-manager component) must name no other namespace anywhere: the containers take
/// theirs from the downward API (`$(POD_NAMESPACE)`), kustomize fills in the rest. The rendering
/// passes a server-side dry run, and the Secrets of `gen-certs.sh --namespace` fit it.
#[tokio::test]
async fn an_overlay_that_only_sets_a_namespace_moves_the_whole_install() {
    if !e2e_enabled("an_overlay_that_only_sets_a_namespace_moves_the_whole_install") {
        return;
    }
    const NS: &str = "imdsgate-renamed";
    let cluster = Cluster::start().await.expect("cluster");
    cluster.kubectl(&["create", "namespace", NS]).unwrap();
    cluster.apply(&["-f", &path("e2e/testdata/crd-standins.yaml")]).unwrap();
    cluster.kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=30s"]).unwrap();

    // kustomize takes other kustomizations by relative path only: the overlay sits next to a link
    // to deploy/.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(workspace_root().join("deploy"), dir.path().join("deploy")).unwrap();
    let mut server_names = Vec::new();
    for from in ["deploy/base", "deploy/overlays/eks-cert-manager"] {
        // The check finds the namespace where the shipped kustomization names it...
        let shipped = cluster.kubectl(&["kustomize", &path(from)]).unwrap();
        let found: Vec<String> =
            objects(&shipped).values().flat_map(|o| namespace_mentions(o, "imdsgate")).collect();
        for want in [
            ".metadata.namespace: imdsgate",
            ".webhooks[0].clientConfig.service.namespace: imdsgate",
            ".webhooks[0].namespaceSelector.matchExpressions[0].values[0]: imdsgate",
            ".subjects[0].namespace: imdsgate",
        ] {
            assert!(found.iter().any(|f| f == want), "{from}: {want} not found in {found:#?}");
        }
        if from.ends_with("cert-manager") {
            for want in [
                ".spec.dnsNames[0]: imdsgate-server.imdsgate.svc",
                ".metadata.annotations.cert-manager.io/inject-ca-from: imdsgate/imdsgate-server",
            ] {
                assert!(found.iter().any(|f| f == want), "{from}: {want} not found in {found:#?}");
            }
        }

        // ...and nowhere in the overlay's.
        let overlay = dir.path().join(from.replace('/', "-"));
        std::fs::create_dir(&overlay).unwrap();
        std::fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {NS}\nresources:\n  - ../{from}\n"
            ),
        )
        .unwrap();
        let overlay = overlay.to_string_lossy().into_owned();
        let rendered = cluster.kubectl(&["kustomize", &overlay]).unwrap();
        assert!(!rendered.contains("$(IMDSGATE_NAMESPACE)"), "{from}: a var left:\n{rendered}");
        let objects = objects(&rendered);
        assert!(objects.contains_key(&format!("Namespace/{NS}")), "{from}: {:?}", objects.keys());
        assert!(!objects.contains_key("Namespace/imdsgate"), "{from}");
        for (key, object) in &objects {
            let mentions = namespace_mentions(object, "imdsgate");
            assert!(mentions.is_empty(), "{from}: {key} still names namespace imdsgate: {mentions:#?}");
            let cluster_scoped =
                ["Namespace/", "ClusterRole", "ValidatingWebhookConfiguration/", "CustomResource"]
                    .iter()
                    .any(|k| key.starts_with(k));
            if !cluster_scoped {
                assert_eq!(str_at(object, &["metadata", "namespace"]), NS, "{from}: {key}");
            }
        }
        for binding in ["ClusterRoleBinding/imdsgate-server", "ClusterRoleBinding/imdsgate-agent"] {
            assert_eq!(str_at(&objects[binding]["subjects"][0], &["namespace"]), NS, "{from}: {binding}");
        }
        let webhook = &objects["ValidatingWebhookConfiguration/imdsgate"]["webhooks"][0];
        assert_eq!(str_at(webhook, &["clientConfig", "service", "namespace"]), NS, "{from}");
        assert_eq!(
            strings(&at(webhook, &["namespaceSelector", "matchExpressions"])[0]["values"]),
            [NS, "kube-system"],
            "{from}: the server's own namespace is exempt, so its pods start while no server answers"
        );

        // The containers' arguments name the namespace through $(POD_NAMESPACE), which the
        // kubelet expands from the downward API.
        let (agent, server) = (&objects["DaemonSet/imdsgate-agent"], &objects["Deployment/imdsgate-server"]);
        for (workload, want) in [
            (
                agent,
                &[
                    "--server=https://imdsgate-server.$(POD_NAMESPACE).svc:8443",
                    "--server-name=imdsgate-server.$(POD_NAMESPACE).svc",
                ][..],
            ),
            (
                server,
                &[
                    "--agent-service-account=$(POD_NAMESPACE):imdsgate-agent",
                    "--webhook-exempt-namespaces=$(POD_NAMESPACE),kube-system",
                ][..],
            ),
        ] {
            let args = strings(&container(workload)["args"]);
            for want in want {
                assert!(args.iter().any(|a| a == want), "{from}: args lack {want}: {args:?}");
            }
            let env = container(workload)["env"].as_sequence().unwrap();
            let pod_namespace = env.iter().find(|e| e["name"] == "POD_NAMESPACE").expect("POD_NAMESPACE");
            assert_eq!(str_at(pod_namespace, &["valueFrom", "fieldRef", "fieldPath"]), "metadata.namespace");
        }
        let server_name = strings(&container(agent)["args"])
            .iter()
            .find_map(|a| a.strip_prefix("--server-name=").map(|n| n.replace("$(POD_NAMESPACE)", NS)))
            .unwrap();
        server_names.push(server_name);
        let service = at(webhook, &["clientConfig", "service"]);
        server_names.push(format!("{}.{}.svc", str_at(service, &["name"]), str_at(service, &["namespace"])));

        if from.ends_with("cert-manager") {
            let certificate = &objects["Certificate/imdsgate-server"];
            assert_eq!(
                strings(at(certificate, &["spec", "dnsNames"])),
                [
                    format!("imdsgate-server.{NS}.svc"),
                    format!("imdsgate-server.{NS}.svc.cluster.local"),
                    format!("imdsgate-webhook.{NS}.svc")
                ],
                "{from}"
            );
            assert_eq!(
                str_at(
                    &objects["ValidatingWebhookConfiguration/imdsgate"]["metadata"]["annotations"],
                    &["cert-manager.io/inject-ca-from"]
                ),
                format!("{NS}/imdsgate-server")
            );
        }

        let out = cluster
            .apply(&["--dry-run=server", "-k", &overlay])
            .unwrap_or_else(|e| panic!("{from} renamed does not apply: {e:#}"));
        for want in [
            "daemonset.apps/imdsgate-agent created (server dry run)",
            "deployment.apps/imdsgate-server created (server dry run)",
            "validatingwebhookconfiguration.admissionregistration.k8s.io/imdsgate created (server dry run)",
        ] {
            assert!(out.contains(want), "{from}:\n{out}");
        }
    }

    // Without cert-manager: gen-certs.sh --namespace writes the Secrets there, and the server
    // certificate carries the names the agents and the apiserver call in that namespace.
    let certs = tempfile::tempdir().unwrap();
    run(Command::new("bash").arg(path("scripts/gen-certs.sh")).args([
        "--namespace",
        NS,
        "--out",
        &certs.path().to_string_lossy(),
    ]))
    .unwrap();
    let secrets = certs.path().join("secrets.yaml").to_string_lossy().into_owned();
    let out = cluster.apply(&["--dry-run=server", "-f", &secrets]).unwrap();
    assert!(
        out.contains("secret/imdsgate-server-tls created")
            && out.contains("secret/imdsgate-agent-tls created")
    );
    assert!(std::fs::read_to_string(&secrets).unwrap().contains(&format!("namespace: {NS}\n")));
    let server_crt = certs.path().join("imdsgate-server.crt").to_string_lossy().into_owned();
    let sans =
        run(Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in", &server_crt]))
            .unwrap();
    for name in &server_names {
        assert!(sans.contains(&format!("DNS:{name}")), "{name} not in {sans}");
    }
}

#[tokio::test]
async fn service_accounts_have_exactly_the_rights_they_need() {
    if !e2e_enabled("service_accounts_have_exactly_the_rights_they_need") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    install_rbac(&cluster).unwrap();
    let can = |who: &str, verb: &str, resource: &str| -> bool {
        let subject = format!("--as=system:serviceaccount:imdsgate:{who}");
        // `auth can-i` exits 1 for "no"; read the answer rather than the status.
        let out = Command::new(imdsgate_e2e::tools::k8s_bin("kubectl").unwrap())
            .arg(format!("--kubeconfig={}", cluster.admin_kubeconfig().display()))
            .args(["auth", "can-i", verb, resource, "--all-namespaces", &subject])
            .output()
            .unwrap();
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => true,
            "no" => false,
            other => {
                panic!("can-i {who} {verb} {resource}: {other:?} {}", String::from_utf8_lossy(&out.stderr))
            }
        }
    };
    for (verb, resource) in [
        ("list", "pods"),
        ("watch", "pods"),
        ("watch", "namespaces"),
        ("create", "tokenreviews.authentication.k8s.io"),
        ("create", "events.events.k8s.io"),
        ("patch", "events"),
        ("get", "nodes"),
        ("watch", "nodes"),
    ] {
        assert!(can("imdsgate-server", verb, resource), "server must be able to {verb} {resource}");
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("patch", "namespaces"),
        ("patch", "nodes"),
        ("create", "pods/binding"),
        ("create", "serviceaccounts/token"),
    ] {
        assert!(!can("imdsgate-server", verb, resource), "server must not {verb} {resource}");
    }
    for (verb, resource) in
        [("list", "pods"), ("watch", "pods"), ("get", "pods"), ("create", "events.events.k8s.io")]
    {
        assert!(can("imdsgate-agent", verb, resource), "agent must be able to {verb} {resource}");
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("create", "tokenreviews.authentication.k8s.io"),
        ("list", "namespaces"),
        ("delete", "events.events.k8s.io"),
        ("create", "pods"),
    ] {
        assert!(!can("imdsgate-agent", verb, resource), "agent must not {verb} {resource}");
    }
}

/// The agent fails Pod Security's baseline (host network, NET_ADMIN, hostPath), so its namespace is
/// privileged; the server alone would pass restricted. Each agent port is written once: an overlay
/// that changes the containerPorts (and the admin port's annotation, a string) moves the listeners,
/// and the admin port listens on the node's IP only.
#[tokio::test]
async fn the_agent_needs_a_privileged_namespace_and_an_overlay_moves_its_ports_in_one_place() {
    if !e2e_enabled("the_agent_needs_a_privileged_namespace_and_an_overlay_moves_its_ports_in_one_place") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    cluster.apply(&["-f", &path("deploy/base/namespace.yaml")]).unwrap();
    let labels =
        cluster.kubectl(&["get", "namespace", "imdsgate", "-o", "jsonpath={.metadata.labels}"]).unwrap();
    for mode in ["enforce", "audit", "warn"] {
        assert!(labels.contains(&format!(r#""pod-security.kubernetes.io/{mode}":"privileged""#)), "{labels}");
    }

    // What Pod Security says of each workload, from the warnings of a server-side dry run into a
    // namespace that warns at a level.
    let base = objects(&cluster.kubectl(&["kustomize", &path("deploy/base")]).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let warnings = |key: &str, level: &str| -> String {
        let ns = format!("psa-{level}");
        if cluster.kubectl(&["get", "namespace", &ns]).is_err() {
            cluster.kubectl(&["create", "namespace", &ns]).unwrap();
            cluster
                .kubectl(&["label", "namespace", &ns, &format!("pod-security.kubernetes.io/warn={level}")])
                .unwrap();
        }
        let mut object = base[key].clone();
        object["metadata"]["namespace"] = Value::from(ns);
        let file = dir.path().join("workload.yaml");
        std::fs::write(&file, serde_yaml::to_string(&object).unwrap()).unwrap();
        let out = cluster
            .kubectl_output(&["apply".as_ref(), "--dry-run=server".as_ref(), "-f".as_ref(), file.as_os_str()])
            .unwrap();
        assert!(out.status.success(), "{key}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let agent = warnings("DaemonSet/imdsgate-agent", "baseline");
    assert!(agent.contains(r#"would violate PodSecurity "baseline:latest""#), "{agent}");
    assert!(agent.contains("hostNetwork=true") && agent.contains("NET_ADMIN"), "{agent}");
    let server = warnings("Deployment/imdsgate-server", "restricted");
    assert!(!server.contains("would violate PodSecurity"), "the server passes restricted: {server}");

    // deploy/base: the vars put each containerPort into the args; the admin port on the node's IP.
    let args = strings(&container(&base["DaemonSet/imdsgate-agent"])["args"]);
    for want in ["--listen=[::]:8183", "--admin-listen=$(HOST_IP):8184"] {
        assert!(args.iter().any(|a| a == want), "args lack {want}: {args:?}");
    }

    // An overlay that changes the ports as README says.
    std::os::unix::fs::symlink(workspace_root().join("deploy"), dir.path().join("deploy")).unwrap();
    let overlay = dir.path().join("ports");
    std::fs::create_dir(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../deploy/overlays/eks]
patches:
  - target: {kind: DaemonSet, name: imdsgate-agent}
    patch: |-
      - {op: replace, path: /spec/template/spec/containers/0/ports/0/containerPort, value: 18183}
      - {op: replace, path: /spec/template/spec/containers/0/ports/1/containerPort, value: 18184}
      - {op: replace, path: /spec/template/metadata/annotations/prometheus.io~1port, value: "18184"}
"#,
    )
    .unwrap();
    let overlay = overlay.to_string_lossy().into_owned();
    let rendered = cluster.kubectl(&["kustomize", &overlay]).unwrap();
    assert!(!rendered.contains("$(IMDSGATE_AGENT_"), "a var left:\n{rendered}");
    for old in [" 8183", ":8183", " 8184", ":8184", "\"8184\""] {
        assert!(!rendered.contains(old), "an old port is left ({old}):\n{rendered}");
    }
    let agent = &objects(&rendered)["DaemonSet/imdsgate-agent"];
    let args = strings(&container(agent)["args"]);
    for want in ["--listen=[::]:18183", "--admin-listen=$(HOST_IP):18184", "--host-interface=eni+,vlan+"] {
        assert!(args.iter().any(|a| a == want), "args lack {want}: {args:?}");
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(str_at(&container(agent)[probe], &["httpGet", "port"]), "admin", "{probe}");
    }
    let out = cluster.apply(&["--dry-run=server", "-k", &overlay]).unwrap();
    assert!(out.contains("daemonset.apps/imdsgate-agent created (server dry run)"), "{out}");
}
