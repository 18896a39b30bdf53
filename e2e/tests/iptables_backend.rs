//! The image's iptables backend selector (deploy/docker/select-iptables), run as the agent's
//! container runs it, in fresh network namespaces whose tables look like a node's: the kubelet's
//! hint chain (KUBE-IPTABLES-HINT) or canary (KUBE-KUBELET-CANARY) in one backend decides, whatever
//! rules the other holds; only without them does the rule count decide, nft on a tie. The chains
//! and rules are made inside the test's namespaces only, never in the machine's own.

use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::netns::NS_PREFIX;
use imdsgate_e2e::process::run;
use imdsgate_e2e::tools::workspace_root;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use tempfile::TempDir;

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A fresh network namespace (empty tables in both backends), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NS_PREFIX}{}-{n}-iptables", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name])).expect("ip netns add");
        Netns { name }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        cmd
    }

    /// `iptables-<backend> <args>` (or ip6tables) inside the namespace.
    fn iptables(&self, program: &str, args: &[&str]) {
        run(self.command(program).args(["-w", "5"]).args(args))
            .unwrap_or_else(|e| panic!("{program} {args:?} in {}: {e:#}", self.name));
    }

    /// Legacy tables that exist in the namespace (the kernel's list).
    fn legacy_tables(&self) -> String {
        run(self
            .command("sh")
            .args(["-c", "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null; true"]))
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The image's /usr/local/lib/imdsgate/{nft,legacy} link directories (as the Dockerfile makes
/// them), over this machine's iptables binaries.
fn backend_dirs() -> TempDir {
    let dir = tempfile::Builder::new().prefix("imdsgate-e2e-iptables-dirs-").tempdir().unwrap();
    for mode in ["nft", "legacy"] {
        std::fs::create_dir(dir.path().join(mode)).unwrap();
        for family in ["iptables", "ip6tables"] {
            for suffix in ["", "-save", "-restore"] {
                let target = PathBuf::from(format!("/usr/sbin/{family}-{mode}{suffix}"));
                assert!(target.exists(), "{} (Debian's iptables package)", target.display());
                std::os::unix::fs::symlink(&target, dir.path().join(mode).join(format!("{family}{suffix}")))
                    .unwrap();
            }
        }
    }
    dir
}

struct Selection {
    /// `nft` or `legacy`: whose directory the command found `iptables` in.
    backend: String,
    /// The selector's line on stderr.
    said: String,
    code: Option<i32>,
}

/// Runs select-iptables inside `ns` with `env`, the way the agent's container starts, and reports
/// which backend's `iptables` the command it runs finds first on PATH.
fn select(ns: &Netns, dirs: &Path, env: &[(&str, &str)]) -> Selection {
    let script = workspace_root().join("deploy/docker/select-iptables");
    let mut cmd = ns.command("env");
    cmd.arg(format!("IMDSGATE_IPTABLES_DIRS={}", dirs.display()));
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    // `sh`, not the shebang: the script must stay POSIX (Debian's sh is dash).
    let out = cmd.arg("sh").arg(&script).args(["sh", "-c", "command -v iptables"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let backend = Path::new(&stdout)
        .strip_prefix(dirs)
        .ok()
        .and_then(|p| p.parent())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Selection {
        backend,
        said: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        code: out.status.code(),
    }
}

/// NAT rules that have nothing to do with the kubelet: the decoy that made the old rule count pick
/// the wrong backend on a fresh node.
fn decoy_nat_rules(ns: &Netns, program: &str, count: u8) {
    for i in 1..=count {
        ns.iptables(
            program,
            &["-t", "nat", "-A", "PREROUTING", "-d", &format!("192.0.2.{i}/32"), "-j", "RETURN"],
        );
    }
}

#[test]
fn the_kubelets_hint_chain_decides_whatever_rules_the_other_backend_holds() {
    if !e2e_enabled("the_kubelets_hint_chain_decides_whatever_rules_the_other_backend_holds") {
        return;
    }
    let dirs = backend_dirs();

    // A legacy node where nft has more rules (another tool's): legacy, from the hint.
    let ns = Netns::new();
    ns.iptables("iptables-legacy", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    decoy_nat_rules(&ns, "iptables-nft", 5);
    let chosen = select(&ns, dirs.path(), &[]);
    assert_eq!(chosen.code, Some(0), "{}", chosen.said);
    assert_eq!(chosen.backend, "legacy", "{}", chosen.said);
    assert!(
        chosen.said.contains("using the legacy iptables backend (the kubelet's KUBE-IPTABLES-HINT"),
        "{}",
        chosen.said
    );

    // The reverse: an nft node where legacy has more rules.
    let ns = Netns::new();
    ns.iptables("iptables-nft", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    decoy_nat_rules(&ns, "iptables-legacy", 5);
    let chosen = select(&ns, dirs.path(), &[]);
    assert_eq!(chosen.backend, "nft", "{}", chosen.said);
    assert!(chosen.said.contains("(the kubelet's KUBE-IPTABLES-HINT chain is there)"), "{}", chosen.said);

    // Only in IPv6 (a single-stack IPv6 node): still found.
    let ns = Netns::new();
    ns.iptables("ip6tables-legacy", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    decoy_nat_rules(&ns, "iptables-nft", 3);
    assert_eq!(select(&ns, dirs.path(), &[]).backend, "legacy");
}

#[test]
fn without_the_hint_the_canary_decides_and_a_chain_in_both_backends_says_nothing() {
    if !e2e_enabled("without_the_hint_the_canary_decides_and_a_chain_in_both_backends_says_nothing") {
        return;
    }
    let dirs = backend_dirs();

    let ns = Netns::new();
    ns.iptables("iptables-legacy", &["-t", "mangle", "-N", "KUBE-KUBELET-CANARY"]);
    decoy_nat_rules(&ns, "iptables-nft", 5);
    let chosen = select(&ns, dirs.path(), &[]);
    assert_eq!(chosen.backend, "legacy", "{}", chosen.said);
    assert!(chosen.said.contains("(the kubelet's KUBE-KUBELET-CANARY chain is there)"), "{}", chosen.said);

    // A hint left in both (a node that switched backends): the canary, in one only, decides.
    let ns = Netns::new();
    ns.iptables("iptables-legacy", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    ns.iptables("iptables-nft", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    ns.iptables("iptables-nft", &["-t", "mangle", "-N", "KUBE-KUBELET-CANARY"]);
    decoy_nat_rules(&ns, "iptables-legacy", 5);
    let chosen = select(&ns, dirs.path(), &[]);
    assert_eq!(chosen.backend, "nft", "{}", chosen.said);
    assert!(chosen.said.contains("KUBE-KUBELET-CANARY"), "{}", chosen.said);

    // Both chains in both backends: the rule count.
    let ns = Netns::new();
    for program in ["iptables-legacy", "iptables-nft"] {
        for chain in ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"] {
            ns.iptables(program, &["-t", "mangle", "-N", chain]);
        }
    }
    decoy_nat_rules(&ns, "iptables-legacy", 2);
    let chosen = select(&ns, dirs.path(), &[]);
    assert_eq!(chosen.backend, "legacy", "{}", chosen.said);
    assert!(chosen.said.contains("no kubelet chain tells; rules: 0 nft, 2 legacy"), "{}", chosen.said);
}

#[test]
fn with_no_kubelet_chain_the_rule_count_decides_nft_on_a_tie_and_a_mode_can_be_forced() {
    if !e2e_enabled("with_no_kubelet_chain_the_rule_count_decides_nft_on_a_tie_and_a_mode_can_be_forced") {
        return;
    }
    let dirs = backend_dirs();

    // Fresh: nft, and looking did not create legacy tables (kube-proxy's iptables-nft would warn).
    let ns = Netns::new();
    let chosen = select(&ns, dirs.path(), &[]);
    assert_eq!(chosen.backend, "nft", "{}", chosen.said);
    assert!(chosen.said.contains("rules: 0 nft, 0 legacy"), "{}", chosen.said);
    assert_eq!(ns.legacy_tables().trim(), "", "the selector created legacy tables");

    let ns = Netns::new();
    decoy_nat_rules(&ns, "iptables-legacy", 3);
    decoy_nat_rules(&ns, "iptables-nft", 2);
    assert_eq!(select(&ns, dirs.path(), &[]).backend, "legacy");
    let ns = Netns::new();
    decoy_nat_rules(&ns, "iptables-legacy", 2);
    decoy_nat_rules(&ns, "iptables-nft", 2);
    assert_eq!(select(&ns, dirs.path(), &[]).backend, "nft", "a tie");

    // IMDSGATE_IPTABLES_MODE overrides everything; a wrong value stops the container.
    let ns = Netns::new();
    ns.iptables("iptables-nft", &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    let chosen = select(&ns, dirs.path(), &[("IMDSGATE_IPTABLES_MODE", "legacy")]);
    assert_eq!(chosen.backend, "legacy", "{}", chosen.said);
    assert!(chosen.said.contains("forced by IMDSGATE_IPTABLES_MODE"), "{}", chosen.said);
    let chosen = select(&ns, dirs.path(), &[("IMDSGATE_IPTABLES_MODE", "iptables")]);
    assert_eq!(chosen.code, Some(64), "{}", chosen.said);
    assert!(chosen.said.contains("must be nft or legacy, not iptables"), "{}", chosen.said);
}
