//! Paths, logs and IPv6 on the whole path (network namespaces, real apiserver, server and agent, moto as STS,
//! a lenient stand-in for the node's metadata service that records every request it receives):
//! no spelling of the node's `iam/` or `identity-credentials/` reaches the metadata service even
//! with `--allow-path '.*'`; the IPv6 endpoint is intercepted by default; a role annotation cannot
//! forge a log line.

use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod};
use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::netns::{NodeNs, PodNs};
use imdsgate_e2e::process::{ChildGuard, run};
use imdsgate_e2e::text::percent_decode;
use imdsgate_e2e::tools::{venv_bin, workspace_bin, workspace_root};
use std::process::{Command, Output};

const WEB_V6: &str = "fd00:210::10";
/// A role annotation whose IAM path carries a newline and a complete forged log line.
const FORGED: &str = "arn:aws:iam::123456789012:role/x\n2026-01-01T00:00:00Z  INFO imdsgate_server::service: credentials issued namespace=victim/app-reader";

const WEB: &str = "team-a/web";
const FORGER: &str = "team-a/forger";

/// The agent runs with `--allow-path=.*` and no IPv6 flag at all; `web` has an IPv4 and an IPv6
/// address; `forger`'s role annotation carries a forged log line.
async fn start() -> AgentBed {
    AgentBed::start(BedPlan {
        namespaces: vec![("team-a", "arn:aws:iam::123456789012:role/.*")],
        roles: vec!["app-reader"],
        pods: vec![
            BedPod::new("team-a", "web", "10.200.1.10").ipv6(WEB_V6).role("app-reader"),
            BedPod::new("team-a", "forger", "10.200.1.11").role(FORGED),
        ],
        agent_args: vec!["--allow-path=.*".into()],
        ..Default::default()
    })
    .await
    .expect("bed")
}

/// `curl -s -g -m 5 --path-as-is <args>` in a pod: the spelling is sent as written.
fn curl(pod: &PodNs, args: &[&str]) -> Output {
    pod.command("curl").args(["-s", "-g", "-m", "5", "--path-as-is"]).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Whether a request target names the node's identity in any spelling: decoded (twice, for
/// double encoding), lowercased, anything but letters removed.
fn names_node_identity(target: &str) -> bool {
    let folded: String = percent_decode(&percent_decode(target))
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { ' ' })
        .collect();
    folded.split_whitespace().any(|w| w == "iam" || w == "identity")
        || folded.contains("noderole")
        || folded.contains("node role")
}

/// Request targets spelling the node's role and identity credentials every way we could think of,
/// and its secrets (user-data, public keys, the signed identity document).
const SPELLINGS: &[&str] = &[
    "/latest/meta-data/./iam/security-credentials/node-role",
    "/latest/./meta-data/iam/security-credentials/node-role",
    "/./latest/meta-data/iam/security-credentials/node-role",
    "/latest/meta-data/placement/../iam/security-credentials/node-role",
    "/latest/meta-data/placement/../../latest/meta-data/iam/security-credentials/node-role",
    "/latest/meta-data/iam/security-credentials/./node-role",
    "/latest/meta-data/iam/security-credentials/x/../node-role",
    "/latest/meta-data/iam/security-credentials/.",
    "/latest/meta-data/iam/./security-credentials/",
    "/latest//meta-data/iam/security-credentials/node-role",
    "//latest/meta-data/iam/security-credentials/node-role",
    "/latest/meta-data//iam/security-credentials/node-role",
    "/latest/meta-data/iam//security-credentials/node-role",
    "/latest/meta-data/iam/security-credentials//node-role",
    "/latest/meta-data/%2e/iam/security-credentials/node-role",
    "/latest/meta-data/%2E%2E/meta-data/iam/security-credentials/node-role",
    "/latest/meta-data/placement/..%2F..%2Fiam/security-credentials/node-role",
    "/latest/meta-data/%69am/security-credentials/node-role",
    "/latest/meta-data/%49%41%4D/security-credentials/node-role",
    "/latest/meta-data/%2569am/security-credentials/node-role",
    "/latest/meta-data/iam/security-credentials%2Fnode-role",
    "/latest/meta-data/iam%2Fsecurity-credentials%2Fnode-role",
    "/latest/meta-data/IAM/security-credentials/node-role",
    "/latest/meta-data/Iam/security-credentials/node-role",
    "/latest/meta-data/iAm/security-credentials/",
    "/latest/meta-data/iam/Security-Credentials/node-role",
    "/latest/meta-data/iam/SECURITY-CREDENTIALS/",
    "/latest/meta-data/iam/security-credentials/NODE-ROLE",
    "/latest/Meta-Data/iam/security-credentials/node-role",
    "/LATEST/META-DATA/IAM/SECURITY-CREDENTIALS/NODE-ROLE",
    "/latest/meta-data/iam./security-credentials/node-role",
    "/latest/meta-data/iam;/security-credentials/node-role",
    "/latest/meta-data/iam/security-credentials/node-role;x",
    "/latest/meta-data/iam/security-credentials/node-role%00",
    "/latest/meta-data/iam/security-credentials/node-role?x=1",
    "/latest/meta-data/iam/info/../security-credentials/node-role",
    "/latest/meta-data/iam/",
    "/latest/meta-data/iam/info",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/Identity-Credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/IDENTITY-CREDENTIALS/ec2/info",
    "/latest/meta-data/./identity-credentials/ec2/info",
    "/latest/meta-data/identity-credentials%2Fec2/info",
    "/latest/meta-data/%69dentity-credentials/ec2/info",
    "/latest/dynamic/../meta-data/identity-credentials/ec2/info",
    // The node's secrets: never proxied without --unsafe-allow-node-secrets, even by `.*`.
    "/latest/user-data",
    "/latest/User-Data",
    "/latest/user_data/",
    "/latest/meta-data/public-keys/",
    "/latest/meta-data/public-keys/0/openssh-key",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/PKCS7",
    "/latest/dynamic/instance-identity/signature",
    "/latest/dynamic/instance-identity/rsa2048",
];

/// Raw request lines sent over a TCP socket from the pod, untouched by any client library.
const RAW_REQUESTS: &[&str] = &[
    "GET http://169.254.169.254/latest/meta-data/iam/security-credentials/node-role HTTP/1.1",
    "GET http://169.254.169.254/latest/meta-data/./iam/security-credentials/node-role HTTP/1.1",
    "GET HTTP://169.254.169.254/latest/meta-data/%69am/security-credentials/node-role HTTP/1.1",
    "GET http://169.254.169.254//latest/meta-data/iam/security-credentials/node-role HTTP/1.1",
    "GET http://evil.example/latest/meta-data/IAM/security-credentials/node-role HTTP/1.1",
    "GET //169.254.169.254/latest/meta-data/iam/security-credentials/node-role HTTP/1.1",
    "GET /latest/meta-data/iam/../iam/security-credentials/node-role HTTP/1.1",
    "GET /latest/meta-data/iam/security-credentials/../security-credentials/node-role HTTP/1.0",
    "GET /latest/meta-data/iam\\security-credentials\\node-role HTTP/1.1",
    "GET /latest/meta-data/.\\iam/security-credentials/node-role HTTP/1.1",
    "GET latest/meta-data/iam/security-credentials/node-role HTTP/1.1",
    "GET /latest/meta-data/iam/security-credentials/node-role#frag HTTP/1.1",
    "GET /latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance/. HTTP/1.1",
    "GET * HTTP/1.1",
];

/// Sends each raw request line (one per argument) to 169.254.169.254:80 and prints each answer as
/// one JSON string per line.
const RAW_CLIENT: &str = r#"
import json, socket, sys
for line in sys.argv[1:]:
    s = socket.create_connection(("169.254.169.254", 80), timeout=5)
    s.sendall((line + "\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n").encode())
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    s.close()
    print(json.dumps(data.decode("latin-1")))
"#;

#[tokio::test]
async fn no_spelling_of_the_nodes_identity_reaches_the_metadata_service() {
    if !e2e_enabled("no_spelling_of_the_nodes_identity_reaches_the_metadata_service") {
        return;
    }
    let bed = start().await;
    let token = stdout(&curl(
        bed.pod(WEB),
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 300",
            "http://169.254.169.254/latest/api/token",
        ],
    ));
    assert!(!token.is_empty(), "a token; agent log:\n{}", bed.agent_log());
    let token_header = format!("X-aws-ec2-metadata-token: {token}");

    let mut answers = Vec::new();
    for path in SPELLINGS {
        let url = format!("http://169.254.169.254{path}");
        for with_token in [false, true] {
            let mut args = vec!["-w", "\n%{http_code}", url.as_str()];
            if with_token {
                args.extend(["-H", token_header.as_str()]);
            }
            let out = curl(bed.pod(WEB), &args);
            answers.push((format!("{path} (token: {with_token})"), stdout(&out)));
        }
    }
    let raw = bed
        .pod(WEB)
        .command(venv_bin("python").unwrap())
        .arg("-c")
        .arg(RAW_CLIENT)
        .args(RAW_REQUESTS)
        .output()
        .unwrap();
    assert!(raw.status.success(), "raw client: {}", String::from_utf8_lossy(&raw.stderr));
    let raw_answers: Vec<String> =
        stdout(&raw).lines().map(|l| serde_json::from_str::<String>(l).unwrap()).collect();
    assert_eq!(raw_answers.len(), RAW_REQUESTS.len());
    answers.extend(RAW_REQUESTS.iter().map(|r| r.to_string()).zip(raw_answers));

    for (request, answer) in &answers {
        assert!(
            !answer.contains("NODEROLEKEY")
                && !answer.contains("node-secret")
                && !answer.contains("node-token"),
            "{request} got the node's credentials: {answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or(answer);
        assert!(
            !body.trim_end_matches(|c: char| c.is_ascii_digit()).trim().eq("node-role"),
            "{request}: {answer}"
        );
    }

    // An allowed path still passes, in its one canonical spelling.
    let region = curl(
        bed.pod(WEB),
        &["-H", &token_header, "http://169.254.169.254/latest/meta-data/placement/region"],
    );
    assert_eq!(stdout(&region), "us-east-1");
    let refused = curl(
        bed.pod(WEB),
        &["-w", "\n%{http_code}", "http://169.254.169.254/latest/meta-data/./placement/region"],
    );
    let refused = stdout(&refused);
    assert!(refused.ends_with("404") && refused.contains("only canonical paths are served"), "{refused}");

    let upstream = bed.agent().upstream_requests();
    assert!(
        upstream.iter().any(|r| r == "GET /latest/meta-data/placement/region"),
        "the stand-in records what reaches it: {upstream:#?}"
    );
    let leaked: Vec<&String> = upstream.iter().filter(|r| names_node_identity(r)).collect();
    assert!(leaked.is_empty(), "reached the node's metadata service: {leaked:#?}\nall answers: {answers:#?}");
    assert!(
        upstream
            .iter()
            .all(|r| r == "PUT /latest/api/token" || r == "GET /latest/meta-data/placement/region"),
        "only the agent's token and the canonical allowed path went upstream: {upstream:#?}"
    );
}

#[tokio::test]
async fn the_ipv6_endpoint_is_intercepted_by_default_and_answered_by_the_agent() {
    if !e2e_enabled("the_ipv6_endpoint_is_intercepted_by_default_and_answered_by_the_agent") {
        return;
    }
    let bed = start().await;
    let rules = bed.node.nat6_rules().unwrap();
    assert!(
        rules.contains(
            "-A IMDSGATE -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8181"
        ),
        "the agent installed the IPv6 rule without being asked: {rules}\nagent log:\n{}",
        bed.agent_log()
    );
    // The node's own metadata service also answers on [fd00:ec2::254], as on a Nitro instance with
    // the IPv6 endpoint enabled: without interception the pod would get the node's role here.
    run(bed.node.command("ip").args(["addr", "add", "fd00:ec2::254/128", "dev", "eth0", "nodad"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _node_imds_v6 = ChildGuard::spawn(
        "node metadata stand-in (IPv6)",
        bed.node
            .command(venv_bin("python").unwrap())
            .arg(workspace_root().join("e2e/fake_imds.py"))
            .args(["fd00:ec2::254", "80"]),
        &dir.path().join("fake-imds-v6.log"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // From the node itself (no PREROUTING): the node's own IPv6 metadata service answers.
        let own = bed
            .node
            .command("curl")
            .args([
                "-s",
                "-g",
                "-m",
                "2",
                "http://[fd00:ec2::254]/latest/meta-data/iam/security-credentials/node-role",
            ])
            .output()
            .unwrap();
        if stdout(&own).contains("NODEROLEKEY") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the IPv6 stand-in does not answer");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let base = "http://[fd00:ec2::254]";
    let token = stdout(&curl(
        bed.pod(WEB),
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 300",
            &format!("{base}/latest/api/token"),
        ],
    ));
    assert!(!token.is_empty() && token != "node-imds-token", "the agent's token over IPv6: {token:?}");
    let header = format!("X-aws-ec2-metadata-token: {token}");
    let role =
        curl(bed.pod(WEB), &["-H", &header, &format!("{base}/latest/meta-data/iam/security-credentials/")]);
    assert_eq!(
        stdout(&role),
        "app-reader",
        "the pod's role, not the node's; agent log:\n{}",
        bed.agent_log()
    );
    let creds = curl(
        bed.pod(WEB),
        &[
            "-H",
            &header,
            "-w",
            "\n%{http_code}",
            &format!("{base}/latest/meta-data/iam/security-credentials/app-reader"),
        ],
    );
    let creds = stdout(&creds);
    assert!(
        creds.ends_with("200") && creds.contains("\"AccessKeyId\""),
        "{creds}\nagent log:\n{}",
        bed.agent_log()
    );
    assert!(!creds.contains("NODEROLEKEY"));
    // IPv4 still works through the same dual-stack listener (an IPv4-mapped peer).
    let v4 = curl(bed.pod(WEB), &["http://169.254.169.254/latest/meta-data/iam/security-credentials/"]);
    assert_eq!(stdout(&v4), "app-reader");
}

#[tokio::test]
async fn iptables_intercepts_ipv6_by_default_and_skips_it_only_where_ip6tables_is_unusable() {
    if !e2e_enabled("iptables_intercepts_ipv6_by_default_and_skips_it_only_where_ip6tables_is_unusable") {
        return;
    }
    let node = NodeNs::create("10.231.0.1".parse().unwrap()).unwrap();
    let agent = workspace_bin("imdsgate-agent").unwrap();
    let imdsgate_rules = |text: &str| -> Vec<String> {
        text.lines().filter(|l| l.contains("IMDSGATE")).map(str::to_string).collect()
    };
    run(node.command(&agent).args(["iptables", "install", "--host-ip=10.231.0.1", "--host-interface=veth+"]))
        .unwrap();
    assert_eq!(
        imdsgate_rules(&node.nat6_rules().unwrap()),
        [
            "-N IMDSGATE",
            "-A PREROUTING -i veth+ -j IMDSGATE",
            // No --listen: the default port.
            "-A IMDSGATE -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8183"
        ]
    );
    assert_eq!(imdsgate_rules(&node.nat_rules().unwrap()).len(), 3, "IPv4 too");
    run(node.command(&agent).args(["iptables", "uninstall"])).unwrap();
    assert!(imdsgate_rules(&node.nat6_rules().unwrap()).is_empty(), "uninstall removes the IPv6 rule");
    assert!(imdsgate_rules(&node.nat_rules().unwrap()).is_empty(), "and the IPv4 rule");

    // Opting out: no IPv6 rule.
    run(node.command(&agent).args(["iptables", "install", "--host-ip=10.231.0.1", "--ipv6=false"])).unwrap();
    run(node.command(&agent).env("IMDSGATE_IPV6", "false").args([
        "iptables",
        "install",
        "--host-ip=10.231.0.1",
    ]))
    .unwrap();
    assert!(imdsgate_rules(&node.nat6_rules().unwrap()).is_empty());
    assert_eq!(imdsgate_rules(&node.nat_rules().unwrap()).len(), 3);
    run(node.command(&agent).args(["iptables", "uninstall"])).unwrap();

    // Where ip6tables' nat table cannot be used, IPv4 is still installed, with a warning.
    let fake = tempfile::tempdir().unwrap();
    let ip6tables = fake.path().join("ip6tables");
    std::fs::write(
        &ip6tables,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'ip6tables v1.8.9 (nf_tables)'; exit 0; fi\n\
         echo \"ip6tables v1.8.9 (nf_tables): can't initialize ip6tables table 'nat': Table does not exist\" >&2\nexit 3\n",
    )
    .unwrap();
    run(Command::new("chmod").arg("+x").arg(&ip6tables)).unwrap();
    let path = format!("{}:{}", fake.path().display(), std::env::var("PATH").unwrap_or_default());
    let out = node
        .command(&agent)
        .env("PATH", &path)
        .args(["iptables", "install", "--host-ip=10.231.0.1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: IPv6 metadata endpoint not intercepted"), "{stderr}");
    assert_eq!(imdsgate_rules(&node.nat_rules().unwrap()).len(), 3, "IPv4 intercepted: {stderr}");
    let out = node.command(&agent).env("PATH", &path).args(["iptables", "uninstall"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(imdsgate_rules(&node.nat_rules().unwrap()).is_empty());
}

#[tokio::test]
async fn a_role_annotation_cannot_forge_a_log_line() {
    if !e2e_enabled("a_role_annotation_cannot_forge_a_log_line") {
        return;
    }
    let bed = start().await;
    let out = curl(
        bed.pod(FORGER),
        &[
            "-w",
            "\n%{http_code}",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/app-reader",
        ],
    );
    let answer = stdout(&out);
    assert!(answer.ends_with("403"), "denied: {answer}");
    assert!(answer.contains("no valid role path"), "with IAM's reason: {answer}");
    assert!(!answer.contains("\n2026-01-01T00:00:00Z"), "{answer}");

    // The agent reads the annotation as the server does and refuses it itself (it names no valid
    // role): the attempt is in its log, escaped, and never reaches the server.
    let agent_log = bed.agent().child.log_tail(100_000);
    assert!(
        agent_log.contains("2026-01-01T00:00:00Z"),
        "agent: the attempt is logged, escaped:\n{agent_log}"
    );
    for (who, log) in [("server", bed.server.child.log_tail(100_000)), ("agent", agent_log)] {
        let forged: Vec<&str> = log.lines().filter(|l| l.starts_with("2026-01-01T00:00:00Z")).collect();
        assert!(forged.is_empty(), "{who} log has a forged line: {forged:?}");
        for line in log.lines() {
            assert!(!line.chars().any(|c| c.is_control()), "{who} log has a raw control character: {line:?}");
        }
    }
}
