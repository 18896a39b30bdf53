//! The real multi-node cluster of `scripts/cluster.sh` for one test: brought up in a directory of
//! the test's own, driven with kubectl through the printed kubeconfig, and taken down (processes,
//! namespaces, cgroups, directory) when dropped, whether the test passed or not.

use crate::process::run;
use crate::tools::{k8s_bin, workspace_root};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Directory prefix of the clusters tests bring up; `scripts/test.sh` takes down leftovers by it.
pub const DIR_PREFIX: &str = "/tmp/imdsgate-e2e-realcluster-";

/// A running cluster; `scripts/cluster.sh down` on drop.
pub struct RealCluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// How long `up` took (for the closing figures).
    pub up_time: Duration,
}

impl RealCluster {
    /// Runs `scripts/cluster.sh up` (building what is missing on first use).
    pub fn up() -> Result<RealCluster> {
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}", std::process::id()));
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg("--dir")
            .arg(&dir)
            .output()
            .context("running scripts/cluster.sh up")?;
        // From here on the directory (and whatever `up` started) is ours to take down.
        let cluster = RealCluster { kubeconfig: dir.join("kubeconfig"), dir, up_time: started.elapsed() };
        if !out.status.success() {
            bail!(
                "scripts/cluster.sh up failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                cluster.logs_tail()
            );
        }
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `kubectl ARGS` against the cluster; stdout, or an error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(self.kubectl_command().args(args))
    }

    /// A kubectl command with the cluster's kubeconfig, for callers that need stdin or the status.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(k8s_bin("kubectl").expect("kubectl built by scripts/k8s-bins.sh"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// `kubectl apply -f -` of a manifest given inline.
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .kubectl_command()
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() { Ok(text) } else { bail!("{}", text.trim()) }
    }

    /// The network namespace of cluster member `member` (`cp`, `server-0`, `worker-0`, ...).
    pub fn netns(&self, member: &str) -> String {
        let prefix = std::fs::read_to_string(self.dir.join("netns-prefix")).unwrap_or_default();
        format!("{}-{member}", prefix.trim())
    }

    /// A command run inside the network namespace of `member` (with `nsenter --net`, the mounts
    /// and /sys of the machine stay as they are).
    pub fn in_node(&self, member: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns(member))).arg("--").arg(program);
        cmd
    }

    /// The NAT table of a node's namespace, as `iptables -t nat -S` prints it.
    pub fn nat_rules(&self, node: &str) -> Result<String> {
        run(self.in_node(node, "iptables").args(["-w", "5", "-t", "nat", "-S"]))
    }

    /// Waits until `kubectl ARGS` succeeds and its output satisfies `ok`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        args: &[&str],
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.kubectl(args) {
                Ok(out) if ok(&out) => return Ok(out),
                Ok(out) => last = out,
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("timed out waiting for {what}; last: {last}")
    }

    /// imdsgate installed as the README says (namespace, `scripts/gen-certs.sh --apply`,
    /// `kubectl apply -k deploy/overlays/local`, the webhook's CA patch) and rolled out within
    /// `timeout`: the real agent on every worker and the real server, with moto as STS.
    pub fn install_local_overlay(&self, timeout: Duration) -> Result<()> {
        let path = |rel: &str| workspace_root().join(rel);
        self.kubectl(&["apply", "-f", &path("deploy/base/namespace.yaml").to_string_lossy()])?;
        let certs = self.dir.join("imdsgate-certs");
        let k8s_dir = crate::tools::k8s_bin_dir()?;
        run(Command::new("bash")
            .arg(path("scripts/gen-certs.sh"))
            .args(["--apply", "--out"])
            .arg(&certs)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", format!("{}:{}", k8s_dir.display(), std::env::var("PATH").unwrap_or_default())))
        .context("scripts/gen-certs.sh --apply")?;
        self.kubectl(&["apply", "-k", &path("deploy/overlays/local").to_string_lossy()])?;
        self.kubectl(&[
            "patch",
            "validatingwebhookconfiguration",
            "imdsgate",
            "--type=json",
            &format!("--patch-file={}", certs.join("webhook-cabundle-patch.json").display()),
        ])?;
        let timeout = format!("--timeout={}s", timeout.as_secs());
        for what in ["daemonset/imdsgate-agent", "deployment/imdsgate-server"] {
            if let Err(e) = self.kubectl(&["-n", "imdsgate", "rollout", "status", what, &timeout]) {
                bail!(
                    "{what} did not roll out: {e:#}\n{}\n{}\n{}",
                    self.kubectl(&["get", "pods", "-A", "-o", "wide"]).unwrap_or_default(),
                    self.kubectl(&["-n", "imdsgate", "describe", "pods"]).unwrap_or_default(),
                    self.logs_tail()
                );
            }
        }
        Ok(())
    }

    /// The last lines of the cluster's component logs (for failure messages).
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("log")) {
            let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                out.push_str(&format!("--- {}\n{}\n", p.display(), crate::process::log_tail(&p, 8)));
            }
        }
        out
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        match Command::new("bash").arg(script()).arg("down").arg("--dir").arg(&self.dir).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("scripts/cluster.sh down failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("scripts/cluster.sh down: {e}"),
        }
    }
}

fn script() -> PathBuf {
    workspace_root().join("scripts/cluster.sh")
}
