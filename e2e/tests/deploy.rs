//! deploy/ on a real apiserver: every kustomization passes a server-side dry run, the Secrets that
//! scripts/gen-certs.sh writes are accepted, and each ServiceAccount has what it needs and nothing
//! it should not.

use imdsgate_e2e::components::install_rbac;
use imdsgate_e2e::process::run;
use imdsgate_e2e::tools::workspace_root;
use imdsgate_e2e::{Cluster, e2e_enabled};
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
    assert!(eks.contains("--host-interface=eni+"));
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
