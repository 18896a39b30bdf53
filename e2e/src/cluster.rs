//! A real Kubernetes control plane for one test: etcd and kube-apiserver on free loopback ports,
//! with RBAC authorization, a service-account issuer and signing key (TokenRequest and TokenReview
//! work), an admin client, ServiceAccount kubeconfigs, and helpers to create pods and set their
//! status through the status subresource (there is no kubelet).

use crate::pki::{self, TestCa};
use crate::process::{ChildGuard, free_port, run, wait_for_port};
use crate::tools::k8s_bin;
use anyhow::{Context, Result, bail};
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Issuer and default audience of service-account tokens in the test cluster.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running etcd + kube-apiserver; both are stopped and their data removed on drop.
pub struct Cluster {
    // Held for their Drop. Field order is drop order: the apiserver goes before etcd, the
    // directory last.
    _apiserver: ChildGuard,
    _etcd: ChildGuard,
    client: kube::Client,
    url: String,
    ca_pem: String,
    admin_kubeconfig: PathBuf,
    dir: TempDir,
}

impl Cluster {
    /// Starts etcd and kube-apiserver and waits until the apiserver is ready.
    pub async fn start() -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-cluster-").tempdir()?;
        let path = dir.path();

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let mut etcd = ChildGuard::spawn(
            "etcd",
            Command::new(k8s_bin("etcd")?)
                .arg("--name=imdsgate-e2e")
                .arg(format!("--data-dir={}", path.join("etcd").display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
                .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"))
                .arg(format!("--initial-cluster=imdsgate-e2e=http://127.0.0.1:{etcd_peer}"))
                .arg("--unsafe-no-fsync")
                .arg("--log-level=warn"),
            &path.join("etcd.log"),
        )?;
        wait_for_port(([127, 0, 0, 1], etcd_client).into(), Duration::from_secs(20))
            .await
            .with_context(|| format!("etcd did not start:\n{}", etcd.log_tail(20)))?;
        etcd.check_running()?;

        let ca = TestCa::new("imdsgate-e2e-apiserver-ca")?;
        let serving = ca.issue_server(&["127.0.0.1", "localhost", "kubernetes.default.svc"])?;
        let (cert, key) = serving.write(path, "apiserver")?;
        let (sa_key, sa_pub) = (path.join("sa.key"), path.join("sa.pub"));
        let (private_pem, public_pem) = pki::key_pair_pem()?;
        std::fs::write(&sa_key, private_pem)?;
        std::fs::write(&sa_pub, public_pem)?;
        let admin_token = random_token()?;
        let tokens = path.join("tokens.csv");
        std::fs::write(&tokens, format!("{admin_token},imdsgate-e2e-admin,uid-admin,\"system:masters\"\n"))?;

        let port = free_port()?;
        let mut apiserver = ChildGuard::spawn(
            "kube-apiserver",
            Command::new(k8s_bin("kube-apiserver")?)
                .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_client}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={port}"))
                .arg(format!("--cert-dir={}", path.join("certs").display()))
                .arg(format!("--tls-cert-file={}", cert.display()))
                .arg(format!("--tls-private-key-file={}", key.display()))
                .arg(format!("--token-auth-file={}", tokens.display()))
                .arg("--authorization-mode=RBAC")
                .arg(format!("--service-account-issuer={SA_ISSUER}"))
                .arg(format!("--service-account-key-file={}", sa_pub.display()))
                .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
                .arg("--service-cluster-ip-range=10.96.0.0/24")
                // No controller-manager creates `default` ServiceAccounts here; pods name theirs.
                .arg("--disable-admission-plugins=ServiceAccount")
                .arg("--allow-privileged=true")
                .arg("--endpoint-reconciler-type=none")
                .arg("--enable-priority-and-fairness=false")
                .arg("--profiling=false")
                .arg("--v=0"),
            &path.join("kube-apiserver.log"),
        )?;

        let url = format!("https://127.0.0.1:{port}");
        let admin_kubeconfig = path.join("admin.kubeconfig");
        write_kubeconfig(&admin_kubeconfig, &url, &ca.cert_pem(), &admin_token)?;
        let client = client_from_kubeconfig(&admin_kubeconfig).await?;

        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            apiserver.check_running()?;
            let ready = client
                .request_text(http::Request::get("/readyz").body(Vec::new()).expect("static request"))
                .await;
            if matches!(ready.as_deref(), Ok("ok")) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after 90s ({ready:?}); last lines of its log:\n{}",
                    apiserver.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        Ok(Cluster {
            _apiserver: apiserver,
            _etcd: etcd,
            client,
            url,
            ca_pem: ca.cert_pem(),
            admin_kubeconfig,
            dir,
        })
    }

    /// A client with cluster-admin rights.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The apiserver's URL (`https://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The apiserver's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// PEM of the CA that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of a kubeconfig with cluster-admin rights.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The cluster's scratch directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `kubectl` (from the pinned build) with the admin kubeconfig; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(Command::new(k8s_bin("kubectl")?)
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args))
    }

    /// Runs `kubectl` with the admin kubeconfig and returns all it did (status, stdout, stderr:
    /// where kubectl prints admission warnings).
    pub fn kubectl_output(&self, args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
        Ok(Command::new(k8s_bin("kubectl")?)
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args)
            .output()?)
    }

    /// Creates a namespace with the given annotations.
    pub async fn create_namespace(&self, name: &str, annotations: &[(&str, &str)]) -> Result<Namespace> {
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": { "name": name, "annotations": to_map(annotations) }
        }))?;
        Ok(Api::<Namespace>::all(self.client()).create(&PostParams::default(), &ns).await?)
    }

    /// Creates a ServiceAccount.
    pub async fn create_service_account(&self, namespace: &str, name: &str) -> Result<ServiceAccount> {
        let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
        Ok(Api::<ServiceAccount>::namespaced(self.client(), namespace)
            .create(&PostParams::default(), &sa)
            .await?)
    }

    /// Creates a Node object (no kubelet runs behind it).
    pub async fn create_node(&self, name: &str) -> Result<Node> {
        self.create_labelled_node(name, &[]).await
    }

    /// Creates a Node object with labels (`imdsgate.io/server-node=true` makes a server node).
    pub async fn create_labelled_node(&self, name: &str, labels: &[(&str, &str)]) -> Result<Node> {
        let node: Node =
            serde_json::from_value(json!({ "metadata": { "name": name, "labels": to_map(labels) } }))?;
        Ok(Api::<Node>::all(self.client()).create(&PostParams::default(), &node).await?)
    }

    /// Creates a pod from `spec`; its status is empty until [`Cluster::set_pod_status`].
    pub async fn create_pod(&self, spec: &PodSpec<'_>) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": spec.name,
                "namespace": spec.namespace,
                "annotations": to_map(&spec.annotations),
                "finalizers": spec.finalizers,
            },
            "spec": {
                "nodeName": spec.node,
                "serviceAccountName": spec.service_account,
                "hostNetwork": spec.host_network,
                "containers": [{ "name": "main", "image": "registry.invalid/imdsgate-e2e:none" }],
            }
        }))?;
        Ok(Api::<Pod>::namespaced(self.client(), spec.namespace).create(&PostParams::default(), &pod).await?)
    }

    /// Sets `status.podIP`, `status.podIPs` and `status.phase` through the status subresource, as a
    /// kubelet would.
    pub async fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        ips: &[&str],
        phase: &str,
    ) -> Result<Pod> {
        let pod_ips: Vec<_> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
        let status = json!({
            "status": {
                "phase": phase,
                "podIP": ips.first(),
                "podIPs": pod_ips,
            }
        });
        Ok(Api::<Pod>::namespaced(self.client(), namespace)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?)
    }

    /// Mints a token for a ServiceAccount through TokenRequest, optionally bound to a pod (the
    /// apiserver then embeds the pod's node in it).
    pub async fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        bound_pod: Option<&Pod>,
    ) -> Result<String> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                bound_object_ref: bound_pod.map(|pod| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                expiration_seconds: Some(3600),
            },
            ..Default::default()
        };
        let issued = Api::<ServiceAccount>::namespaced(self.client(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{service_account}"))?;
        Ok(issued.status.context("TokenRequest returned no status")?.token)
    }

    /// Writes a kubeconfig that authenticates as the ServiceAccount (API audience), so a component
    /// runs with exactly the RBAC granted to it; returns its path.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, service_account, &[SA_ISSUER], None).await?;
        let path = self.dir().join(format!("{namespace}-{service_account}.kubeconfig"));
        write_kubeconfig(&path, &self.url, &self.ca_pem, &token)?;
        Ok(path)
    }

    /// Stops kube-apiserver (SIGTERM, as a rolling restart does) and starts it again on the same
    /// port with the same flags and data (etcd keeps running), plus `extra_args`; waits until it is
    /// ready again. Returns how long it was away.
    pub async fn restart_apiserver(&mut self, extra_args: &[&str]) -> Result<Duration> {
        let args = cmdline(self._apiserver.id())?;
        let (program, flags) = args.split_first().context("kube-apiserver has no command line")?;
        let stopped = Instant::now();
        // A graceful stop first (it stops listening at once, then drains); what still runs after
        // 5 s is killed, as the kubelet would after its grace period.
        if self._apiserver.terminate(Duration::from_secs(5)).is_err() {
            let _ = Command::new("kill").args(["-KILL", &self._apiserver.id().to_string()]).status();
            while self._apiserver.try_wait()?.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
        let apiserver = ChildGuard::spawn(
            "kube-apiserver",
            Command::new(program).args(flags).args(extra_args),
            &self.dir().join(format!("kube-apiserver-{n}.log")),
        )?;
        self._apiserver = apiserver;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            self._apiserver.check_running()?;
            let ready = self
                .client
                .request_text(http::Request::get("/readyz").body(Vec::new()).expect("static request"))
                .await;
            if matches!(ready.as_deref(), Ok("ok")) {
                return Ok(stopped.elapsed());
            }
            if Instant::now() > deadline {
                bail!("kube-apiserver not ready after a restart:\n{}", self._apiserver.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`).
    pub fn etcd_url(&self) -> Result<String> {
        cmdline(self._etcd.id())?
            .iter()
            .find_map(|a| a.to_str()?.strip_prefix("--listen-client-urls=").map(str::to_string))
            .context("etcd has no --listen-client-urls")
    }

    /// Compacts etcd at its current revision (through its v3 HTTP/JSON gateway, physically: the
    /// history is gone), so any watch resuming from an older resourceVersion gets 410 Gone.
    /// Returns the revision.
    pub fn compact_etcd(&self) -> Result<i64> {
        let url = self.etcd_url()?;
        let post = |path: &str, body: &str| -> Result<serde_json::Value> {
            let out = run(Command::new("curl")
                .args(["-sS", "-m", "10", "-X", "POST", "-H", "Content-Type: application/json"])
                .arg(format!("{url}{path}"))
                .args(["-d", body]))?;
            serde_json::from_str(&out).with_context(|| format!("etcd {path} answered {out}"))
        };
        // Any range answers with the store's current revision in its header ("Lw==" is "/").
        let range = post("/v3/kv/range", r#"{"key":"Lw==","count_only":true}"#)?;
        let revision: i64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .or_else(|| range["header"]["revision"].as_i64())
            .with_context(|| format!("no revision in {range}"))?;
        let done = post("/v3/kv/compaction", &format!(r#"{{"revision":"{revision}","physical":true}}"#))?;
        if done.get("error").is_some() || done.get("code").is_some() {
            bail!("etcd refused the compaction at {revision}: {done}");
        }
        Ok(revision)
    }

    /// Applies a multi-document YAML file (or a kustomize directory with `-k`) as admin.
    pub fn apply(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["apply"];
        all.extend_from_slice(args);
        self.kubectl(&all)
    }
}

/// A process's command line, program first.
fn cmdline(pid: u32) -> Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt as _;
    let raw =
        std::fs::read(format!("/proc/{pid}/cmdline")).with_context(|| format!("process {pid} is gone"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
        .collect())
}

/// 32 random hex characters (the admin's bearer token: other local users must not guess it).
fn random_token() -> Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`Cluster::create_pod`] creates.
#[derive(Clone, Debug)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub service_account: Option<&'a str>,
    pub host_network: bool,
    pub annotations: Vec<(&'a str, &'a str)>,
    pub finalizers: Vec<&'a str>,
}

impl<'a> PodSpec<'a> {
    pub fn new(namespace: &'a str, name: &'a str, node: &'a str) -> Self {
        PodSpec {
            namespace,
            name,
            node,
            service_account: None,
            host_network: false,
            annotations: Vec::new(),
            finalizers: Vec::new(),
        }
    }

    /// A finalizer that holds the pod in Terminating after a delete until it is removed.
    pub fn finalizer(mut self, name: &'a str) -> Self {
        self.finalizers.push(name);
        self
    }

    pub fn annotation(mut self, key: &'a str, value: &'a str) -> Self {
        self.annotations.push((key, value));
        self
    }

    pub fn service_account(mut self, name: &'a str) -> Self {
        self.service_account = Some(name);
        self
    }

    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
}

fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Writes a kubeconfig for `server` trusting `ca_pem` and authenticating with a bearer token.
pub fn write_kubeconfig(path: &Path, server: &str, ca_pem: &str, token: &str) -> Result<()> {
    use std::fmt::Write as _;
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut text = String::new();
    writeln!(text, "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:")?;
    writeln!(text, "    server: {server}\n    certificate-authority-data: {ca_b64}")?;
    writeln!(text, "users:\n- name: e2e\n  user:\n    token: {token}")?;
    writeln!(text, "contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e")?;
    writeln!(text, "current-context: e2e")?;
    std::fs::write(path, text)?;
    Ok(())
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
