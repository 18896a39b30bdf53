//! The whole path in network namespaces: a pod namespace reaches 169.254.169.254, the agent's own
//! iptables rule in the node namespace sends it to the agent, the agent names the pod from its
//! node-scoped watch of the real apiserver and gets credentials from the real server, which
//! assumes the role in moto. Real clients: the aws CLI (botocore) and aws-sdk-rust's IMDS provider.

use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod};
use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::netns::NodeNs;
use imdsgate_e2e::process::run;
use imdsgate_e2e::tools::workspace_bin;
use std::process::Output;
use std::time::Duration;

const ASSUMED_WEB: &str = "arn:aws:sts::123456789012:assumed-role/app-reader/team-a.web";

/// The node with three pods of team-a: web and other carry the role, plain does not.
async fn start() -> AgentBed {
    AgentBed::start(BedPlan {
        namespaces: vec![("team-a", "arn:aws:iam::123456789012:role/app-.*")],
        roles: vec!["app-reader"],
        pods: vec![
            BedPod::new("team-a", "web", "10.200.1.10").role("app-reader"),
            BedPod::new("team-a", "plain", "10.200.1.11"),
            BedPod::new("team-a", "other", "10.200.1.12").role("app-reader"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed")
}

const WEB: &str = "team-a/web";
const PLAIN: &str = "team-a/plain";
const OTHER: &str = "team-a/other";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[tokio::test]
async fn real_sdks_in_a_pod_get_the_pods_role_and_nothing_else() {
    if !e2e_enabled("real_sdks_in_a_pod_get_the_pods_role_and_nothing_else") {
        return;
    }
    let bed = start().await;

    // botocore (aws CLI): IMDSv2 through 169.254.169.254, no endpoint override.
    let out = bed.aws_cli(bed.pod(WEB));
    assert!(out.status.success(), "aws CLI failed: {}\nagent log:\n{}", stderr(&out), bed.agent_log());
    assert_eq!(stdout(&out), ASSUMED_WEB);

    // aws-sdk-rust's IMDS credentials provider.
    let out = bed.aws_env(bed.pod(WEB), workspace_bin("imds-whoami").unwrap()).output().unwrap();
    assert!(out.status.success(), "aws-sdk-rust failed: {}\nagent log:\n{}", stderr(&out), bed.agent_log());
    assert_eq!(stdout(&out), ASSUMED_WEB);

    // A pod without a role gets no credentials, and is told why.
    let out = bed.aws_cli(bed.pod(PLAIN));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Unable to locate credentials"), "{}", stderr(&out));
    let out = bed.curl(
        bed.pod(PLAIN),
        &["-w", "\n%{http_code}", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"],
    );
    let text = stdout(&out);
    assert!(text.ends_with("404") && text.contains("no iam.amazonaws.com/role"), "{text}");

    // A token is bound to the pod that asked for it.
    let token = stdout(&bed.curl(
        bed.pod(WEB),
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 300",
            "http://169.254.169.254/latest/api/token",
        ],
    ));
    assert!(!token.is_empty());
    let path = "http://169.254.169.254/latest/meta-data/iam/security-credentials/app-reader";
    let own = bed.curl(
        bed.pod(WEB),
        &["-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("X-aws-ec2-metadata-token: {token}"), path],
    );
    assert_eq!(stdout(&own), "200");
    let stolen = bed.curl(
        bed.pod(OTHER),
        &["-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("X-aws-ec2-metadata-token: {token}"), path],
    );
    assert_eq!(stdout(&stolen), "401", "another pod cannot use the first pod's token");

    // Hard limits: an oversized header is refused, not served.
    let big = format!("X-Big: {}", "a".repeat(20_000));
    let out = bed.curl(bed.pod(WEB), &["-o", "/dev/null", "-w", "%{http_code}", "-H", &big, path]);
    assert_eq!(stdout(&out), "431", "oversized headers get 431");

    // Region facts pass through; the node's secrets and role never do.
    let region = bed.curl(bed.pod(WEB), &["http://169.254.169.254/latest/meta-data/placement/region"]);
    assert_eq!(stdout(&region), "us-east-1");
    for (pod, path) in [
        (bed.pod(WEB), "/latest/user-data"),
        (bed.pod(PLAIN), "/latest/meta-data/iam/security-credentials/node-role"),
        (bed.pod(WEB), "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
    ] {
        let out = bed.curl(pod, &["-w", "\n%{http_code}", &format!("http://169.254.169.254{path}")]);
        let text = stdout(&out);
        assert!(text.ends_with("404"), "{path}: {text}");
        assert!(
            !text.contains("NODEROLEKEY") && !text.contains("node-secret"),
            "{path} leaked the node's: {text}"
        );
    }
}

fn rules_in(nat: &str, chain: &str) -> Vec<String> {
    nat.lines().filter(|l| l.starts_with(&format!("-A {chain} "))).map(str::to_string).collect()
}

#[tokio::test]
async fn the_rule_is_first_survives_restarts_stays_on_exit_and_goes_only_on_uninstall() {
    if !e2e_enabled("the_rule_is_first_survives_restarts_stays_on_exit_and_goes_only_on_uninstall") {
        return;
    }
    let mut bed = start().await;
    let nat = bed.node.nat_rules().unwrap();
    assert_eq!(
        rules_in(&nat, "IMDSGATE"),
        [
            "-A IMDSGATE -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.200.0.1:8181"
        ]
    );
    assert_eq!(rules_in(&nat, "PREROUTING"), ["-A PREROUTING -i veth+ -j IMDSGATE"]);

    // Something (kube-proxy, say) puts its rule in front; a restarted agent takes the first place back.
    run(bed.node.command("iptables").args([
        "-w",
        "-t",
        "nat",
        "-I",
        "PREROUTING",
        "1",
        "-p",
        "udp",
        "--dport",
        "9",
        "-j",
        "RETURN",
    ]))
    .unwrap();
    let agent = bed.agent.take().unwrap();
    bed.agent = Some(agent.restart(&bed.setup(), &[]).await.expect("agent restarts"));
    let nat = bed.node.nat_rules().unwrap();
    assert_eq!(
        rules_in(&nat, "PREROUTING"),
        ["-A PREROUTING -i veth+ -j IMDSGATE", "-A PREROUTING -p udp -m udp --dport 9 -j RETURN"],
        "exactly one jump, in first place"
    );
    assert_eq!(rules_in(&nat, "IMDSGATE").len(), 1);
    assert_eq!(stdout(&bed.aws_cli(bed.pod(WEB))), ASSUMED_WEB, "served after the restart");

    // The agent exits: the rule stays, so pods get "connection refused", never the node's role.
    let mut agent = bed.agent.take().unwrap();
    assert_eq!(agent.child.terminate(Duration::from_secs(15)).unwrap(), Some(0), "clean exit on SIGTERM");
    let nat = bed.node.nat_rules().unwrap();
    assert_eq!(rules_in(&nat, "IMDSGATE").len(), 1, "rule left in place on exit");
    let path = "http://169.254.169.254/latest/meta-data/iam/security-credentials/node-role";
    let out = bed.curl(bed.pod(PLAIN), &[path]);
    assert_eq!(out.status.code(), Some(7), "connection refused while the agent is down: {}", stdout(&out));
    assert!(!stdout(&out).contains("NODEROLEKEY"));

    // Only the explicit uninstall removes it (and then pods would reach the node's metadata).
    run(bed.node.command(workspace_bin("imdsgate-agent").unwrap()).args(["iptables", "uninstall"])).unwrap();
    let nat = bed.node.nat_rules().unwrap();
    assert!(!nat.contains("IMDSGATE"), "{nat}");
    let out = bed.curl(bed.pod(PLAIN), &[path]);
    assert!(
        stdout(&out).contains("NODEROLEKEY"),
        "the stand-in proves what the rule protected: {}",
        stdout(&out)
    );
    drop(agent);
}

#[tokio::test]
async fn iptables_install_is_idempotent_for_both_families_and_uninstall_removes_it() {
    if !e2e_enabled("iptables_install_is_idempotent_for_both_families_and_uninstall_removes_it") {
        return;
    }
    let node = NodeNs::create("10.230.0.1".parse().unwrap()).unwrap();
    let agent = workspace_bin("imdsgate-agent").unwrap();
    let install = [
        "iptables",
        "install",
        "--host-ip=10.230.0.1",
        "--listen=0.0.0.0:8181",
        "--host-interface=cali+,!eth0",
        "--ipv6",
        "--host-ipv6=fd00:230::1",
    ];
    for _ in 0..2 {
        run(node.command(&agent).args(install)).unwrap();
    }
    let v4 = node.nat_rules().unwrap();
    assert_eq!(
        rules_in(&v4, "PREROUTING"),
        ["-A PREROUTING -i cali+ -j IMDSGATE", "-A PREROUTING ! -i eth0 -j IMDSGATE"]
    );
    assert_eq!(
        rules_in(&v4, "IMDSGATE"),
        [
            "-A IMDSGATE -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.230.0.1:8181"
        ]
    );
    let v6 = run(node.command("ip6tables").args(["-w", "5", "-t", "nat", "-S"])).unwrap();
    assert_eq!(
        rules_in(&v6, "PREROUTING"),
        ["-A PREROUTING -i cali+ -j IMDSGATE", "-A PREROUTING ! -i eth0 -j IMDSGATE"]
    );
    assert_eq!(
        rules_in(&v6, "IMDSGATE"),
        [
            "-A IMDSGATE -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00:230::1]:8181"
        ]
    );
    // A new port replaces the rule without a gap: the new rule goes in before the old one leaves.
    run(node.command(&agent).args([
        "iptables",
        "install",
        "--host-ip=10.230.0.1",
        "--listen=0.0.0.0:9191",
        "--host-interface=cali+,!eth0",
    ]))
    .unwrap();
    let v4 = node.nat_rules().unwrap();
    assert_eq!(
        rules_in(&v4, "IMDSGATE"),
        [
            "-A IMDSGATE -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.230.0.1:9191"
        ]
    );
    run(node.command(&agent).args(["iptables", "uninstall", "--ipv6"])).unwrap();
    assert!(!node.nat_rules().unwrap().contains("IMDSGATE"));
    assert!(
        !run(node.command("ip6tables").args(["-w", "5", "-t", "nat", "-S"])).unwrap().contains("IMDSGATE")
    );
    let out = node.command(&agent).args(["iptables", "install"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "install without --host-ip is a configuration error");
}

/// Removes a namespace-scoped hosts file on drop.
struct NetnsHosts(std::path::PathBuf);

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // /etc/netns itself goes too if nothing else uses it (remove_dir refuses a non-empty one).
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[tokio::test]
async fn a_failed_server_replica_is_retried_on_another_within_the_request() {
    if !e2e_enabled("a_failed_server_replica_is_retried_on_another_within_the_request") {
        return;
    }
    let mut bed = start().await;
    // `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts for processes in that namespace
    // only: there the server's name resolves to two replicas, one of which refuses connections.
    let dir = std::path::Path::new("/etc/netns").join(bed.node.name());
    std::fs::create_dir_all(&dir).unwrap();
    let _hosts = NetnsHosts(dir.clone());
    std::fs::write(dir.join("hosts"), "127.0.0.1 replicas.imdsgate.test\n127.0.0.2 replicas.imdsgate.test\n")
        .unwrap();
    bed.server_host = "replicas.imdsgate.test";
    let agent = bed.agent.take().unwrap();
    bed.agent = Some(agent.restart(&bed.setup(), &[]).await.expect("agent restarts"));

    // Each pod's first request calls the server; calls alternate between the replicas.
    let path = "http://169.254.169.254/latest/meta-data/iam/security-credentials/app-reader";
    for pod in [bed.pod(WEB), bed.pod(OTHER)] {
        let out = bed.curl(pod, &["-o", "/dev/null", "-w", "%{http_code}", path]);
        assert_eq!(stdout(&out), "200", "served despite a dead replica; agent log:\n{}", bed.agent_log());
    }
    let metrics = run(bed.node.command("curl").args(["-s", "http://127.0.0.1:9611/metrics"])).unwrap();
    let failed = imdsgate_e2e::components::metric_value(
        &metrics,
        "imdsgate_agent_server_errors_total{code=\"Unavailable\"}",
    );
    assert!(failed >= 1.0, "one call met the dead replica and was retried:\n{metrics}");
}

#[tokio::test]
async fn a_rule_another_tool_deletes_is_put_back_and_counted() {
    if !e2e_enabled("a_rule_another_tool_deletes_is_put_back_and_counted") {
        return;
    }
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("team-a", "arn:aws:iam::123456789012:role/app-.*")],
        roles: vec!["app-reader"],
        pods: vec![BedPod::new("team-a", "web", "10.200.1.10").role("app-reader")],
        agent_args: vec!["--rule-check-interval=1s".into()],
        ..Default::default()
    })
    .await
    .expect("bed");
    let metrics = || run(bed.node.command("curl").args(["-s", "http://127.0.0.1:9611/metrics"])).unwrap();
    let sample = |text: &str, s: &str| imdsgate_e2e::components::metric_value(text, s);
    let present = "imdsgate_agent_interception_rule_present{family=\"ipv4\"}";
    let repairs = "imdsgate_agent_interception_repairs_total{family=\"ipv4\"}";
    assert_eq!(sample(&metrics(), present), 1.0, "{}", metrics());

    // kube2iam's preStop (or an operator's flush) deletes the jump: for a moment pods would reach
    // the node's metadata; the agent puts it back within its check interval.
    run(bed.node.command("iptables").args([
        "-w",
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-i",
        "veth+",
        "-j",
        "IMDSGATE",
    ]))
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !rules_in(&bed.node.nat_rules().unwrap(), "PREROUTING").iter().any(|r| r.ends_with("-j IMDSGATE")) {
        assert!(std::time::Instant::now() < deadline, "jump not restored:\n{}", bed.agent_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A chain flushed by another tool: the DNAT rule goes.
    run(bed.node.command("iptables").args(["-w", "-t", "nat", "-F", "IMDSGATE"])).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while rules_in(&bed.node.nat_rules().unwrap(), "IMDSGATE").is_empty() {
        assert!(std::time::Instant::now() < deadline, "DNAT rule not restored:\n{}", bed.agent_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let nat = bed.node.nat_rules().unwrap();
    assert_eq!(rules_in(&nat, "PREROUTING"), ["-A PREROUTING -i veth+ -j IMDSGATE"]);
    assert_eq!(rules_in(&nat, "IMDSGATE").len(), 1);
    let text = metrics();
    assert_eq!(sample(&text, repairs), 2.0, "{text}");
    assert_eq!(sample(&text, present), 1.0, "{text}");
    assert!(bed.agent_log().contains("the interception rule was missing or altered; put back"));
    assert_eq!(stdout(&bed.aws_cli(bed.pod(WEB))), ASSUMED_WEB, "the pod is intercepted again");
}

#[tokio::test]
async fn a_pod_with_a_role_is_fetched_before_its_first_request() {
    if !e2e_enabled("a_pod_with_a_role_is_fetched_before_its_first_request") {
        return;
    }
    let bed = start().await;
    let metrics = || run(bed.node.command("curl").args(["-s", "http://127.0.0.1:9611/metrics"])).unwrap();
    let sample = |s: &str| imdsgate_e2e::components::metric_value(&metrics(), s);
    let (hits, misses) = ("imdsgate_agent_cache_hits_total", "imdsgate_agent_cache_misses_total");
    // web and other carry a role: the agent fetches theirs as they appear on its node, before
    // either asks (plain has no role: nothing to fetch).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sample(misses) < 2.0 {
        assert!(std::time::Instant::now() < deadline, "no prefetch:\n{}", metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sample(misses), 2.0, "one fetch per pod with a role:\n{}", metrics());
    let hits_before = sample(hits);
    for pod in [WEB, OTHER] {
        let out = bed.aws_env(bed.pod(pod), workspace_bin("imds-whoami").unwrap()).output().unwrap();
        assert!(out.status.success(), "{pod}: {}", stderr(&out));
        assert!(stdout(&out).ends_with(&format!("/{}", pod.replace('/', "."))), "{}", stdout(&out));
    }
    assert_eq!(sample(misses), 2.0, "the first requests were cache hits:\n{}", metrics());
    assert!(sample(hits) >= hits_before + 2.0, "{}", metrics());
}

/// The bed with one pod with a role, its agent checking its rule every second.
async fn start_checking_every_second() -> AgentBed {
    AgentBed::start(BedPlan {
        namespaces: vec![("team-a", "arn:aws:iam::123456789012:role/app-.*")],
        roles: vec!["app-reader"],
        pods: vec![BedPod::new("team-a", "web", "10.200.1.10").role("app-reader")],
        agent_args: vec!["--rule-check-interval=1s".into()],
        ..Default::default()
    })
    .await
    .expect("bed")
}

/// `iptables -w -t nat <args>` in the node's namespace; whether it succeeded.
fn nat(bed: &AgentBed, args: &[&str]) -> bool {
    bed.node.command("iptables").args(["-w", "-t", "nat"]).args(args).status().unwrap().success()
}

fn ipv4_repairs(bed: &AgentBed) -> f64 {
    let text = run(bed.node.command("curl").args(["-s", "http://127.0.0.1:9611/metrics"])).unwrap();
    imdsgate_e2e::components::metric_value(
        &text,
        "imdsgate_agent_interception_repairs_total{family=\"ipv4\"}",
    )
}

#[tokio::test]
async fn a_foreign_jump_kept_above_ours_that_cannot_catch_metadata_traffic_is_left_there() {
    if !e2e_enabled("a_foreign_jump_kept_above_ours_that_cannot_catch_metadata_traffic_is_left_there") {
        return;
    }
    let bed = start_checking_every_second().await;
    // Calico-like chains: cali-PREROUTING jumps to cali-fip-dnat, which DNATs a floating IP only;
    // and another controller's empty chain.
    for rule in [
        &["-N", "cali-PREROUTING"][..],
        &["-N", "cali-fip-dnat"],
        &["-N", "OTHER-CTRL"],
        &[
            "-A",
            "cali-PREROUTING",
            "-m",
            "comment",
            "--comment",
            "cali:r6XmIziWUJsdOK6Z",
            "-j",
            "cali-fip-dnat",
        ],
        &["-A", "cali-fip-dnat", "-d", "10.99.0.5/32", "-j", "DNAT", "--to-destination", "10.200.1.10"],
    ] {
        assert!(nat(&bed, rule), "{rule:?}");
    }
    let calico = ["-m", "comment", "--comment", "cali:6gwbT8clXdHdC1b1", "-j", "cali-PREROUTING"];
    let other = ["-j", "OTHER-CTRL"];
    let before = ipv4_repairs(&bed);
    let path = "http://169.254.169.254/latest/meta-data/iam/security-credentials/app-reader";
    // For 20 s, the stand-ins re-assert their jumps at the top of PREROUTING every second, as
    // Calico's insert mode does.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < end {
        for jump in [&calico[..], &other[..]] {
            let _ = nat(&bed, &[&["-D", "PREROUTING"][..], jump].concat());
            assert!(nat(&bed, &[&["-I", "PREROUTING", "1"][..], jump].concat()));
        }
        let out = bed.curl(bed.pod(WEB), &["-w", "\n%{http_code}", path]);
        let text = stdout(&out);
        assert!(text.ends_with("200") && text.contains("ASIA"), "served by the agent: {text}");
        assert!(!text.contains("NODEROLEKEY"), "the node's role leaked: {text}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let prerouting = rules_in(&bed.node.nat_rules().unwrap(), "PREROUTING");
    assert_eq!(
        prerouting,
        [
            "-A PREROUTING -j OTHER-CTRL",
            "-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING",
            "-A PREROUTING -i veth+ -j IMDSGATE",
        ],
        "the foreign jumps stay above ours"
    );
    assert_eq!(ipv4_repairs(&bed), before, "no repair counted:\n{}", bed.agent_log());
    assert!(!bed.agent_log().contains("put back"), "{}", bed.agent_log());
    assert_eq!(stdout(&bed.aws_cli(bed.pod(WEB))), ASSUMED_WEB, "the pod gets its role from the agent");
}

#[tokio::test]
async fn a_foreign_rule_above_ours_that_dnats_the_metadata_address_is_put_below_ours_and_counted() {
    if !e2e_enabled("a_foreign_rule_above_ours_that_dnats_the_metadata_address_is_put_below_ours_and_counted")
    {
        return;
    }
    let bed = start_checking_every_second().await;
    let before = ipv4_repairs(&bed);
    // kube2iam-like: metadata traffic DNATed to another listener (here the node's own metadata).
    let foreign = "-A PREROUTING -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.254:80";
    assert!(nat(
        &bed,
        &[
            "-I",
            "PREROUTING",
            "1",
            "-d",
            "169.254.169.254/32",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "169.254.169.254:80"
        ]
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while rules_in(&bed.node.nat_rules().unwrap(), "PREROUTING").first().map(String::as_str)
        != Some("-A PREROUTING -i veth+ -j IMDSGATE")
    {
        assert!(std::time::Instant::now() < deadline, "not repaired:\n{}", bed.agent_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ours above it once more; then nothing further to repair.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rules_in(&bed.node.nat_rules().unwrap(), "PREROUTING"),
        ["-A PREROUTING -i veth+ -j IMDSGATE", foreign]
    );
    assert_eq!(ipv4_repairs(&bed), before + 1.0, "one repair counted:\n{}", bed.agent_log());
    assert!(bed.agent_log().contains("could catch metadata traffic"), "{}", bed.agent_log());
    assert_eq!(stdout(&bed.aws_cli(bed.pod(WEB))), ASSUMED_WEB, "the pod gets its role from the agent");
}
