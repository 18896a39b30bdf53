//! Where the test bed's outside programs live: the Kubernetes binaries built by
//! `scripts/k8s-bins.sh`, helm and Prometheus built by `scripts/tool-bins.sh`, the project's Python virtualenv with moto and the aws CLI, and the
//! workspace's own binaries. Also decides whether the end-to-end tests run at all.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e sits in the workspace").to_path_buf()
}

/// The directory holding kube-apiserver, kubectl and etcd: `IMDSGATE_K8S_BIN_DIR`, else whatever
/// `scripts/k8s-bins.sh` prints (it builds them on first use).
pub fn k8s_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| built_bin_dir("IMDSGATE_K8S_BIN_DIR", "scripts/k8s-bins.sh"))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The directory holding helm, prometheus and promtool: `IMDSGATE_TOOLS_BIN_DIR`, else whatever
/// `scripts/tool-bins.sh` prints (it builds them on first use).
pub fn tools_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| built_bin_dir("IMDSGATE_TOOLS_BIN_DIR", "scripts/tool-bins.sh"))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `$env` if set, else the last line a build script prints (the directory it built into).
fn built_bin_dir(env: &str, script: &str) -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var(env) {
        return Ok(PathBuf::from(dir));
    }
    let script = workspace_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(stdout.lines().last().unwrap_or_default().trim()))
}

/// Path of one Kubernetes binary, checked to exist.
pub fn k8s_bin(name: &str) -> Result<PathBuf> {
    checked(k8s_bin_dir()?.join(name), "scripts/k8s-bins.sh")
}

/// Path of helm, prometheus or promtool, checked to exist.
pub fn tool_bin(name: &str) -> Result<PathBuf> {
    checked(tools_bin_dir()?.join(name), "scripts/tool-bins.sh")
}

fn checked(path: PathBuf, script: &str) -> Result<PathBuf> {
    if !path.is_file() {
        bail!("{} is missing; run {script}", path.display());
    }
    Ok(path)
}

/// The project's virtualenv (`IMDSGATE_VENV`, else `<workspace>/.venv`), checked to hold `bin`.
pub fn venv_bin(bin: &str) -> Result<PathBuf> {
    let venv =
        std::env::var("IMDSGATE_VENV").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join(".venv"));
    let path = venv.join("bin").join(bin);
    if !path.is_file() {
        bail!(
            "{} is missing; scripts/test.sh creates the virtualenv (scripts/setup.sh venv)",
            path.display()
        );
    }
    Ok(path)
}

/// A binary of this workspace (`imdsgate-agent`, `imdsgate-server`), from the target directory
/// cargo built the tests into.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let mut profile_dir = exe.parent().context("executable has no directory")?;
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().context("deps has no parent")?;
    }
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!("{} is missing; build it with `cargo build --workspace --bins`", path.display());
    }
    Ok(path)
}

/// Whether end-to-end tests run. They need root (network namespaces, iptables). Under CI they
/// always run and a missing prerequisite fails loudly; a developer without root may set
/// `IMDSGATE_E2E=0` to skip them, and the skip is printed.
pub fn e2e_enabled(test: &str) -> bool {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if !in_ci && std::env::var("IMDSGATE_E2E").is_ok_and(|v| v == "0") {
        eprintln!("SKIPPED end-to-end test {test}: IMDSGATE_E2E=0");
        return false;
    }
    let uid =
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        panic!(
            "end-to-end test {test} needs root (network namespaces, iptables); \
             run as root, or set IMDSGATE_E2E=0 to skip end-to-end tests outside CI"
        );
    }
    true
}
