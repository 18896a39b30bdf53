//! scripts/gen-certs.sh: a re-run keeps the CA and issues new server and agent certificates, and a
//! CA rotation (`--rotate-ca start`, `issue`, `finish`) never leaves a certificate in use untrusted
//! by a peer that holds it — at each step, and while some pods still have the previous step's
//! files. Checked without a cluster on what the script would apply (secrets.yaml and the webhook's
//! caBundle patch), with `openssl verify` and with mutual-TLS handshakes through the server's own
//! TLS configuration and a client that loads its CA file as the agent's (tonic's) does; then
//! `--apply` on a real apiserver.

use base64::Engine as _;
use imdsgate_e2e::process::run;
use imdsgate_e2e::tools::{k8s_bin_dir, workspace_root};
use imdsgate_e2e::{Cluster, e2e_enabled};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn gen_certs(out: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(workspace_root().join("scripts/gen-certs.sh"))
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("bash runs")
}

fn gen_certs_ok(out: &Path, args: &[&str]) -> String {
    let o = gen_certs(out, args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "gen-certs.sh {args:?} failed:\n{stderr}");
    stderr
}

fn b64(data: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(data).expect("base64")
}

/// What each party holds after a run: the files of both Secrets as the pods see them, and the
/// apiserver's caBundle for the webhook.
struct Step {
    name: &'static str,
    dir: PathBuf,
}

impl Step {
    /// Unpacks secrets.yaml and webhook-cabundle-patch.json of `out` into `into/<name>`.
    fn capture(out: &Path, into: &Path, name: &'static str) -> Step {
        let dir = into.join(name);
        let secrets = std::fs::read_to_string(out.join("secrets.yaml")).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&secrets) {
            let secret = Value::deserialize(doc).unwrap();
            let party = match secret["metadata"]["name"].as_str().unwrap() {
                "imdsgate-server-tls" => "server",
                "imdsgate-agent-tls" => "agent",
                other => panic!("unexpected Secret {other}"),
            };
            std::fs::create_dir_all(dir.join(party)).unwrap();
            for key in ["tls.crt", "tls.key", "ca.crt"] {
                let data = b64(secret["data"][key].as_str().unwrap());
                std::fs::write(dir.join(party).join(key), data).unwrap();
            }
        }
        let patch: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("webhook-cabundle-patch.json")).unwrap())
                .unwrap();
        assert_eq!(patch[0]["path"], "/webhooks/0/clientConfig/caBundle");
        std::fs::write(dir.join("webhook-ca.crt"), b64(patch[0]["value"].as_str().unwrap())).unwrap();
        let step = Step { name, dir };
        // The same trust everywhere: both Secrets' ca.crt and the caBundle are the bundle in DIR.
        let bundle = std::fs::read(out.join("ca-bundle.crt")).unwrap();
        for file in ["server/ca.crt", "agent/ca.crt", "webhook-ca.crt"] {
            assert_eq!(std::fs::read(step.file(file)).unwrap(), bundle, "{name}: {file}");
        }
        step
    }

    fn file(&self, rel: &str) -> String {
        self.dir.join(rel).to_string_lossy().into_owned()
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(rel)).unwrap()
    }

    fn cas(&self) -> usize {
        CertificateDer::pem_slice_iter(&self.read("server/ca.crt")).count()
    }
}

/// `openssl verify` of `cert` against the CAs in `ca_file`, for `purpose`.
fn verifies(ca_file: &str, cert: &str, purpose: &str) -> bool {
    let out = Command::new("openssl")
        .args(["verify", "-purpose", purpose, "-CAfile", ca_file, cert])
        .output()
        .unwrap();
    out.status.success()
}

/// A mutual-TLS handshake between a server with `server`'s files (the server's own TLS
/// configuration, imdsgate_server::grpc::tls_server) and an agent with `agent`'s files: the client loads
/// every certificate of its ca.crt as trust anchors and presents its certificate, as the agent's
/// tonic client does.
async fn handshake(server: &Step, agent: &Step) -> Result<(), String> {
    let config = imdsgate_server::grpc::tls_server::server_config(
        Path::new(&server.file("server/tls.crt")),
        Path::new(&server.file("server/tls.key")),
        Path::new(&server.file("server/ca.crt")),
    )
    .map_err(|e| format!("server configuration: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    let ca = agent.read("agent/ca.crt");
    let (added, _) = roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&ca).map(Result::unwrap));
    assert!(added >= 1);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&agent.read("agent/tls.crt")).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(&agent.read("agent/tls.key")).unwrap();
    let mut client =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];

    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("imdsgate-server.imdsgate.svc").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (connected, accepted) = tokio::join!(connector.connect(name, client_io), acceptor.accept(server_io));
    connected.map_err(|e| format!("the agent refused the server: {e}"))?;
    accepted.map_err(|e| format!("the server refused the agent: {e}"))?;
    Ok(())
}

/// Every pairing of parties that can meet while `before`'s files give way to `after`'s: each of the
/// agent, the server and the apiserver holds either. Each certificate in use must be trusted.
async fn all_pairings_trust(before: &Step, after: &Step) {
    for server in [before, after] {
        for agent in [before, after] {
            let what = format!("server with {} files, agent with {}", server.name, agent.name);
            assert!(
                verifies(&agent.file("agent/ca.crt"), &server.file("server/tls.crt"), "sslserver"),
                "{what}"
            );
            assert!(
                verifies(&server.file("server/ca.crt"), &agent.file("agent/tls.crt"), "sslclient"),
                "{what}"
            );
            if let Err(e) = handshake(server, agent).await {
                panic!("{what}: {e}");
            }
        }
        for apiserver in [before, after] {
            assert!(
                verifies(&apiserver.file("webhook-ca.crt"), &server.file("server/tls.crt"), "sslserver"),
                "webhook: server with {} files, caBundle of {}",
                server.name,
                apiserver.name
            );
        }
    }
}

#[tokio::test]
async fn a_ca_rotation_keeps_every_certificate_in_use_trusted_at_every_step() {
    rustls::crypto::aws_lc_rs::default_provider().install_default().ok();
    let tmp = tempfile::tempdir().unwrap();
    let (out, steps) = (tmp.path().join("certs"), tmp.path().join("steps"));

    gen_certs_ok(&out, &[]);
    let first = Step::capture(&out, &steps, "first");
    let ca = std::fs::read(out.join("ca.crt")).unwrap();
    assert_eq!(first.cas(), 1);

    // A re-run renews the server and agent certificates under the same CA.
    gen_certs_ok(&out, &[]);
    let renewed = Step::capture(&out, &steps, "renewed");
    assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), ca, "the CA is kept");
    assert_eq!(renewed.read("server/ca.crt"), first.read("server/ca.crt"));
    assert_ne!(renewed.read("server/tls.crt"), first.read("server/tls.crt"), "renewed");
    assert_ne!(renewed.read("agent/tls.key"), first.read("agent/tls.key"), "a new key");
    all_pairings_trust(&first, &renewed).await;

    // Out of order: refused, nothing changed.
    for (args, message) in [
        (&["--rotate-ca", "issue"][..], "--rotate-ca issue follows --rotate-ca start"),
        (&["--rotate-ca", "finish"][..], "--rotate-ca finish follows --rotate-ca issue"),
        (&["--rotate-ca", "later"][..], "--rotate-ca takes start, issue or finish"),
    ] {
        let o = gen_certs(&out, args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(message), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), ca);

    // 1. A new CA, trusted next to the old one; the certificates in use are kept.
    let said = gen_certs_ok(&out, &["--rotate-ca", "start"]);
    assert!(said.contains("--rotate-ca issue --apply"), "says what comes next: {said}");
    let started = Step::capture(&out, &steps, "start");
    let (old_ca, new_ca) = (steps.join("old-ca.crt"), steps.join("new-ca.crt"));
    let new_ca_pem = std::fs::read(out.join("ca-next.crt")).unwrap();
    std::fs::write(&old_ca, &ca).unwrap();
    std::fs::write(&new_ca, &new_ca_pem).unwrap();
    let (old_ca, new_ca) = (old_ca.to_string_lossy().into_owned(), new_ca.to_string_lossy().into_owned());
    assert_eq!(started.cas(), 2);
    assert_eq!(started.read("server/tls.crt"), renewed.read("server/tls.crt"));
    assert_eq!(started.read("agent/tls.crt"), renewed.read("agent/tls.crt"));
    let o = gen_certs(&out, &["--rotate-ca", "start"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("its next step is --rotate-ca issue"));
    let o = gen_certs(&out, &["--rotate-ca", "finish"]);
    assert!(!o.status.success(), "finish before issue is refused");
    all_pairings_trust(&renewed, &started).await;

    // 2. The certificates from the new CA; both still trusted.
    gen_certs_ok(&out, &["--rotate-ca", "issue"]);
    let issued = Step::capture(&out, &steps, "issue");
    assert_eq!(issued.cas(), 2);
    assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), new_ca_pem, "the new CA signs now");
    for (cert, purpose) in [("server/tls.crt", "sslserver"), ("agent/tls.crt", "sslclient")] {
        assert!(verifies(&new_ca, &issued.file(cert), purpose), "{cert} from the new CA");
        assert!(!verifies(&old_ca, &issued.file(cert), purpose), "{cert} not from the old CA");
    }
    // Without the overlap these would meet and fail: the check has teeth.
    assert!(!verifies(&renewed.file("agent/ca.crt"), &issued.file("server/tls.crt"), "sslserver"));
    assert!(handshake(&issued, &renewed).await.is_err(), "old trust, new certificates");
    all_pairings_trust(&started, &issued).await;

    // 3. The old CA dropped.
    gen_certs_ok(&out, &["--rotate-ca", "finish"]);
    let finished = Step::capture(&out, &steps, "finish");
    assert_eq!(finished.cas(), 1);
    assert_eq!(finished.read("server/ca.crt"), new_ca_pem);
    assert_eq!(finished.read("server/tls.crt"), issued.read("server/tls.crt"));
    assert!(!verifies(&finished.file("agent/ca.crt"), &renewed.file("server/tls.crt"), "sslserver"));
    all_pairings_trust(&issued, &finished).await;
    assert!(!out.join("ca-previous.crt").exists() && !out.join("ca-next.key").exists());

    // Renewal after the rotation goes on from the new CA.
    gen_certs_ok(&out, &[]);
    let after = Step::capture(&out, &steps, "after");
    assert_eq!(after.read("server/ca.crt"), new_ca_pem);
    all_pairings_trust(&finished, &after).await;
}

/// `--apply` writes both Secrets and the webhook's caBundle on a real apiserver, at every step.
#[tokio::test]
async fn apply_writes_the_secrets_and_the_webhooks_ca_bundle_at_every_step() {
    if !e2e_enabled("apply_writes_the_secrets_and_the_webhooks_ca_bundle_at_every_step") {
        return;
    }
    let cluster = Cluster::start().await.expect("cluster");
    let base = workspace_root().join("deploy/base");
    cluster.apply(&["-k", &base.to_string_lossy()]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("certs");
    let path = format!("{}:{}", k8s_bin_dir().unwrap().display(), std::env::var("PATH").unwrap());
    let apply = |args: &[&str]| {
        run(Command::new("bash")
            .arg(workspace_root().join("scripts/gen-certs.sh"))
            .arg("--out")
            .arg(&out)
            .args(args)
            .arg("--apply")
            .env("KUBECONFIG", cluster.admin_kubeconfig())
            .env("PATH", &path))
        .unwrap_or_else(|e| panic!("gen-certs.sh {args:?} --apply: {e:#}"));
    };
    let secret = |name: &str, key: &str| {
        let s: Value = serde_yaml::from_str(
            &cluster.kubectl(&["-n", "imdsgate", "get", "secret", name, "-o", "yaml"]).unwrap(),
        )
        .unwrap();
        b64(s["data"][key].as_str().unwrap())
    };
    let ca_bundle = || {
        let w: Value = serde_yaml::from_str(
            &cluster.kubectl(&["get", "validatingwebhookconfiguration", "imdsgate", "-o", "yaml"]).unwrap(),
        )
        .unwrap();
        b64(w["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap())
    };
    let mut server_crt = Vec::new();
    for (args, cas, new_certificates) in [
        (&[][..], 1, true),
        (&["--rotate-ca", "start"][..], 2, false),
        (&["--rotate-ca", "issue"][..], 2, true),
        (&["--rotate-ca", "finish"][..], 1, false),
    ] {
        apply(args);
        let bundle = std::fs::read(out.join("ca-bundle.crt")).unwrap();
        assert_eq!(CertificateDer::pem_slice_iter(&bundle).count(), cas, "{args:?}");
        assert_eq!(secret("imdsgate-server-tls", "ca.crt"), bundle, "{args:?}");
        assert_eq!(secret("imdsgate-agent-tls", "ca.crt"), bundle, "{args:?}");
        assert_eq!(ca_bundle(), bundle, "{args:?}: the webhook's caBundle");
        let crt = secret("imdsgate-server-tls", "tls.crt");
        assert_eq!(crt == server_crt, !new_certificates, "{args:?}: server certificate replaced?");
        assert_eq!(crt, std::fs::read(out.join("imdsgate-server.crt")).unwrap());
        server_crt = crt;
    }
}
