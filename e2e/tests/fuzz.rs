//! Bounded fuzzing on the whole path, with fixed seeds (issue 13): raw HTTP from inside pod
//! namespaces through the real DNAT rule to the agent (`imdsgate-fuzz`), mutated AdmissionReviews
//! to the server's webhook, and random GetCredentials calls from an authenticated agent to the
//! server's gRPC service. Each test checks that nothing leaks, that what must be refused is, and
//! that the process under fire stays up.
//!
//! Budgets: by default each test runs a small, fixed number of cases (the CI budget, well under a
//! minute each). `IMDSGATE_FUZZ_SECONDS` makes each test fuzz for that long instead, and
//! `IMDSGATE_FUZZ_SEED` changes the seed (`scripts/fuzz.sh` sets both). Every summary is printed
//! on stderr (`--nocapture` shows it).
//!
//! Findings these fuzzers made, fixed and now asserted (each report still counts them): the webhook
//! answered a review whose own `apiVersion`/`kind` were not an AdmissionReview's with 200, echoing
//! them (`foreign_type_meta_answered`, now a 400); it refused a pod CREATE without an object with
//! an empty `response.uid` (`refusals_without_the_uid`); the gRPC server echoed an invalid field
//! whole into `grpc-message`, which past the client's 16 KiB header limit failed the call or the
//! whole HTTP/2 connection (`oversized_transport_errors`).

use imdsgate_e2e::bed::{ACCOUNT, AgentBed, BedPlan, BedPod, NODE};
use imdsgate_e2e::components::{grpc_client, http_get};
use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::netns::PodNs;
use imdsgate_e2e::report::rss_kib;
use imdsgate_e2e::tools::workspace_bin;
use imdsgate_e2e::{Cluster, PodSpec};
use imdsgate_proto::v1::{GetCredentialsRequest, GetCredentialsResponse};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The seed when `IMDSGATE_FUZZ_SEED` is not set.
const DEFAULT_SEED: u64 = 13;
/// CI budgets (cases) when `IMDSGATE_FUZZ_SECONDS` is not set.
const CI_IMDS_REQUESTS: u64 = 3000;
const CI_WEBHOOK_REVIEWS: u64 = 1500;
const CI_GRPC_CALLS: u64 = 1500;
/// The agent's resident memory after fuzzing stays under this.
const AGENT_RSS_BOUND_KIB: u64 = 64 * 1024;

/// The seed, and how long each test fuzzes (None: the CI budget in cases).
struct Budget {
    seed: u64,
    seconds: Option<u64>,
}

fn budget() -> Budget {
    let seed = std::env::var("IMDSGATE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    let seconds = std::env::var("IMDSGATE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).filter(|s| *s > 0);
    Budget { seed, seconds }
}

impl Budget {
    /// Whether case `index` is within budget: its count, or its time.
    fn allows(&self, index: u64, cases: u64, started: Instant) -> bool {
        match self.seconds {
            Some(s) => started.elapsed() < Duration::from_secs(s),
            None => index < cases,
        }
    }
}

use imdsgate_e2e::seeded::SplitMix as Rng;

/// Case `index` of seed `seed` is always the same.
fn rng_for_case(seed: u64, index: u64) -> Rng {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ 0x5DEE_CE66);
    rng.next_u64();
    rng
}

/// Runs several workers pulling case indices until the budget ends; returns how many ran.
async fn run_workers<F, Fut>(budget: &Budget, cases: u64, workers: usize, case: F) -> u64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let case = Arc::new(case);
    let limit = Budget { seed: budget.seed, seconds: budget.seconds };
    let limit = Arc::new(limit);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, case, limit) = (next.clone(), case.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if !limit.allows(index, cases, started) {
                    break;
                }
                case(index).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("a fuzz worker panicked");
    }
    let ran = next.load(Ordering::Relaxed).saturating_sub(workers as u64);
    match budget.seconds {
        Some(_) => ran,
        None => ran.min(cases),
    }
}

// =============================================================================================
// a. Raw HTTP from inside pods, through the DNAT rule, to the agent.

const ROLE_A: &str = "fuzz-a";
const ROLE_B: &str = "fuzz-b";
const ALPHA: &str = "team-f/alpha";
const BETA: &str = "team-f/beta";
const PLAIN: &str = "team-f/plain";
/// What the node's metadata stand-in holds and no pod may ever see.
const NODE_SECRETS: &[&str] = &["NODEROLEKEY", "node-secret", "node-token", "node-imds-token"];

/// Runs `imdsgate-fuzz` inside `pod` with `args`: its exit code and JSON summary.
async fn fuzz_from(pod: &PodNs, args: Vec<String>) -> (Option<i32>, Value) {
    let mut cmd = pod.command(workspace_bin("imdsgate-fuzz").unwrap());
    cmd.args(&args).stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("imdsgate-fuzz runs");
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "imdsgate-fuzz printed no summary ({e}); exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), summary)
}

/// `%XX` decoded (invalid escapes kept) and lowercased.
fn decoded(s: &str) -> String {
    imdsgate_e2e::text::percent_decode(s).to_lowercase()
}

/// Whether a request (`METHOD target`) that reached the node's metadata service asks for the
/// node's IAM role, identity credentials or user data in any spelling the stand-in would fold
/// (decoded twice, any case, `\` for `/`, empty and dot segments dropped, punctuation ignored): a
/// segment reading `iam` or `identity-credentials` anywhere, or `user-data` after the version
/// segment. Any version segment is served, so `/user-data/dynamic/…` names a version and gets
/// the metadata service's 404; other paths under an allowed prefix pass too
/// (`placement/region/node-role`, also a 404).
fn names_node_secrets(request: &str) -> bool {
    let target = request.split_once(' ').map_or(request, |(_, t)| t);
    let path = decoded(&decoded(target)).replace('\\', "/");
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(|s| s.chars().filter(char::is_ascii_alphanumeric).collect())
        .collect();
    segments.iter().any(|s| s == "iam" || s == "identitycredentials")
        || segments.iter().skip(1).any(|s| s == "userdata")
}

#[test]
fn the_upstream_check_reads_paths_as_the_metadata_stand_in_would() {
    for secret in [
        "GET /latest/meta-data/iam/security-credentials/node-role",
        "GET /latest/meta-data/%69am/security-credentials/",
        "GET /latest/meta-data/%2569AM/info",
        "GET /2009-04-04/meta-data/I.A.M/info",
        "GET /latest/meta-data/Identity-Credentials/ec2/info",
        "GET /latest/user-data",
        "GET /latest/USER_DATA",
        "GET /latest//./user-data/",
        "GET /latest\\user-data",
    ] {
        assert!(names_node_secrets(secret), "{secret}");
    }
    for other in [
        "PUT /latest/api/token",
        "GET /latest/meta-data/placement/region",
        "GET /latest/meta-data/placement/region/node-role",
        "GET /latest/dynamic/instance-identity/document",
        "GET /user-data/dynamic/instance-identity/document",
    ] {
        assert!(!names_node_secrets(other), "{other}");
    }
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn raw_http_fuzzing_never_leaks_and_the_agent_stays_up() {
    if !e2e_enabled("raw_http_fuzzing_never_leaks_and_the_agent_stays_up") {
        return;
    }
    let budget = budget();
    let mut bed = AgentBed::start(BedPlan {
        namespaces: vec![("team-f", "arn:aws:iam::123456789012:role/fuzz-.*")],
        roles: vec![ROLE_A, ROLE_B],
        pods: vec![
            BedPod::new("team-f", "alpha", "10.200.1.10").role(ROLE_A),
            BedPod::new("team-f", "beta", "10.200.1.11").role(ROLE_B),
            BedPod::new("team-f", "plain", "10.200.1.12"),
        ],
        ..Default::default()
    })
    .await
    .expect("bed");
    let key_a = bed.access_key(bed.pod(ALPHA), ROLE_A).unwrap_or_else(|s| {
        panic!("alpha gets its credentials first ({s}); agent log:\n{}", bed.agent_log())
    });
    let key_b = bed.access_key(bed.pod(BETA), ROLE_B).expect("beta gets its credentials");
    assert_ne!(key_a, key_b);
    let pid = bed.agent().child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(comm.trim().starts_with("imdsgate-agent"), "pid {pid} is the agent itself, not {comm:?}");
    let rss_before = rss_kib(pid).expect("the agent's VmRSS");

    let common = |seed: u64| -> Vec<String> {
        let mut args =
            vec!["--seed".to_string(), seed.to_string(), "--target".into(), "169.254.169.254:80".into()];
        for role in [ROLE_A, ROLE_B, "node-role"] {
            args.extend(["--role".into(), role.into()]);
        }
        for secret in NODE_SECRETS {
            args.extend(["--forbidden".into(), secret.to_string()]);
        }
        args
    };
    let amount = |share: u64, cases: u64| -> Vec<String> {
        match budget.seconds {
            Some(s) => vec!["--seconds".into(), (s * share / 3).max(1).to_string()],
            None => vec!["--requests".into(), cases.to_string()],
        }
    };

    // The detector is live: alpha's own key, declared forbidden, is reported (a short run).
    let mut canary = common(budget.seed);
    canary.extend(["--requests".into(), "200".into(), "--forbidden".into(), key_a.clone()]);
    let (code, report) = fuzz_from(bed.pod(ALPHA), canary).await;
    assert_eq!(code, Some(1), "the fuzzer fails when a forbidden string comes back: {report}");
    assert!(n(&report, "violation_count") > 0, "{report}");

    // Role A's pod: only its own key may come back; never B's key nor anything of the node's.
    let mut args = common(budget.seed);
    args.extend(amount(2, CI_IMDS_REQUESTS));
    args.extend(["--forbidden".into(), key_b.clone(), "--allowed-key".into(), key_a.clone()]);
    let started = Instant::now();
    let (code_a, alpha) = fuzz_from(bed.pod(ALPHA), args).await;
    eprintln!("imdsgate-fuzz from {ALPHA} ({:?}): {alpha:#}", started.elapsed());
    let rss_mid = rss_kib(pid);

    // The pod without a role: no access key at all.
    let mut args = common(budget.seed.wrapping_add(1));
    args.extend(amount(1, CI_IMDS_REQUESTS / 3));
    args.extend(["--forbidden".into(), key_a.clone(), "--forbidden".into(), key_b.clone()]);
    let started = Instant::now();
    let (code_plain, plain) = fuzz_from(bed.pod(PLAIN), args).await;
    eprintln!("imdsgate-fuzz from {PLAIN} ({:?}): {plain:#}", started.elapsed());

    let rss_after = rss_kib(pid);
    eprintln!(
        "agent VmRSS: {rss_before} KiB before, {rss_mid:?} KiB after {ALPHA}, {rss_after:?} KiB after {PLAIN} \
         (bound {AGENT_RSS_BOUND_KIB} KiB)"
    );

    for (who, code, report) in [(ALPHA, code_a, &alpha), (PLAIN, code_plain, &plain)] {
        assert_eq!(
            n(report, "violation_count"),
            0,
            "{who}: responses leaked: {:#}\nagent log:\n{}",
            report["violations"],
            bed.agent_log()
        );
        assert_eq!(code, Some(0), "{who}: imdsgate-fuzz exit code; {report}");
        assert!(n(report, "requests") > 0 && n(report, "answered") > 0, "{who}: {report}");
        assert_eq!(n(report, "connect_errors"), 0, "{who}: the agent always accepted: {report}");
    }
    assert!(n(&alpha, "allowed_key_seen") > 0, "the fuzzer reached alpha's credentials: {alpha}");

    // The agent is still up and serving.
    bed.agent.as_mut().unwrap().child.check_running().expect("the agent still runs");
    let health =
        bed.node.command("curl").args(["-s", "-m", "5", "http://127.0.0.1:9611/healthz"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok\n", "agent /healthz after fuzzing");
    assert_eq!(bed.access_key(bed.pod(ALPHA), ROLE_A), Ok(key_a.clone()), "alpha still gets its credentials");
    assert_eq!(bed.access_key(bed.pod(BETA), ROLE_B), Ok(key_b.clone()));
    let rss_after = rss_after.expect("the agent's VmRSS after fuzzing");
    assert!(rss_after < AGENT_RSS_BOUND_KIB, "agent VmRSS {rss_after} KiB after fuzzing");

    // Nothing that names the node's identity or user data reached its metadata service.
    let upstream = bed.agent().upstream_requests();
    let leaked: Vec<&String> = upstream.iter().filter(|r| names_node_secrets(r)).collect();
    assert!(leaked.is_empty(), "reached the node's metadata service: {leaked:#?}");
    eprintln!("{} requests reached the node's metadata service, none for its identity", upstream.len());
    let log = bed.agent().child.log_tail(1_000_000);
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

// =============================================================================================
// b. AdmissionReviews to the webhook.

const SERVER_NODE: &str = "server-1";
const TEAM: &str = "team-w";
const LOCKED: &str = "locked-w";
/// Exempt by the server's defaults.
const EXEMPT: &[&str] = &["imdsgate", "kube-system"];

fn review(uid: &str, kind: (&str, &str), namespace: &str, operation: &str, object: Value) -> Value {
    let (group, kind) = kind;
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": group, "version": "v1", "kind": kind },
            "resource": { "group": group, "version": "v1", "resource": if kind == "Binding" { "bindings" } else { "pods" } },
            "name": object["metadata"]["name"].clone(),
            "namespace": namespace,
            "operation": operation,
            "userInfo": { "username": "fuzzer", "groups": ["system:authenticated"] },
            "object": object,
            "dryRun": false
        }
    })
}

fn pod_object(name: &str, annotations: Value, spec: Value) -> Value {
    let mut spec = spec;
    spec["containers"] = json!([{ "name": "main", "image": "registry.invalid/app:1" }]);
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name, "annotations": annotations }, "spec": spec })
}

/// Reviews the webhook must refuse whatever else they carry, with what the refusal is about.
fn must_refuse_case(i: usize, uid: &str, rng: &mut Rng) -> (&'static str, Value) {
    let role = json!({ "iam.amazonaws.com/role": "app-x" });
    let pod = ("", "Pod");
    let (what, mut r) = match i % 12 {
        0 => (
            "pinned to a server node",
            review(uid, pod, TEAM, "CREATE", pod_object("p", json!({}), json!({ "nodeName": SERVER_NODE }))),
        ),
        1 => (
            "a role the namespace does not permit",
            review(
                uid,
                pod,
                TEAM,
                "CREATE",
                pod_object("p", json!({ "iam.amazonaws.com/role": "admin" }), json!({})),
            ),
        ),
        2 => (
            "hostNetwork",
            review(uid, pod, TEAM, "CREATE", pod_object("p", json!({}), json!({ "hostNetwork": true }))),
        ),
        3 => (
            "hostNetwork with a role",
            review(uid, pod, TEAM, "CREATE", pod_object("p", role.clone(), json!({ "hostNetwork": true }))),
        ),
        4 => (
            "a binding to a server node",
            review(
                uid,
                ("", "Binding"),
                TEAM,
                "CREATE",
                json!({ "apiVersion": "v1", "kind": "Binding",
                "metadata": { "name": "p", "namespace": TEAM }, "target": { "apiVersion": "v1", "kind": "Node", "name": SERVER_NODE } }),
            ),
        ),
        5 => (
            "a binding to a node that does not exist",
            review(
                uid,
                ("", "Binding"),
                TEAM,
                "CREATE",
                json!({ "apiVersion": "v1", "kind": "Binding",
                "metadata": { "name": "p", "namespace": TEAM }, "target": { "kind": "Node", "name": "no-such-node" } }),
            ),
        ),
        6 => (
            "tolerating every taint",
            review(
                uid,
                pod,
                TEAM,
                "CREATE",
                pod_object("p", json!({}), json!({ "tolerations": [{ "operator": "Exists" }] })),
            ),
        ),
        7 => (
            "selecting server nodes",
            review(
                uid,
                pod,
                TEAM,
                "CREATE",
                pod_object("p", json!({}), json!({ "nodeSelector": { "imdsgate.io/server-node": "true" } })),
            ),
        ),
        8 => (
            "a role in a namespace that permits none",
            review(uid, pod, LOCKED, "CREATE", pod_object("p", role.clone(), json!({}))),
        ),
        9 => (
            "pinned to a node that does not exist",
            review(
                uid,
                pod,
                TEAM,
                "CREATE",
                pod_object("p", json!({}), json!({ "nodeName": format!("no-such-{}", rng.below(1000)) })),
            ),
        ),
        10 => {
            let mut r = review(
                uid,
                pod,
                TEAM,
                "UPDATE",
                pod_object("p", json!({}), json!({ "nodeName": SERVER_NODE })),
            );
            r["request"]["oldObject"] = pod_object("p", json!({}), json!({}));
            ("moved onto a server node by an update", r)
        }
        _ => (
            "a session name STS would not take",
            review(
                uid,
                pod,
                TEAM,
                "CREATE",
                pod_object(
                    "p",
                    json!({ "iam.amazonaws.com/role": "app-x", "iam.amazonaws.com/session-name": "a b" }),
                    json!({}),
                ),
            ),
        ),
    };
    // Noise that changes nothing about the decision.
    if rng.percent(50) {
        let labels: serde_json::Map<String, Value> =
            (0..rng.range(1, 5)).map(|i| (format!("fuzz.example/l{i}"), json!(rng.string(20)))).collect();
        if r["request"]["object"]["metadata"].is_object() {
            r["request"]["object"]["metadata"]["labels"] = Value::Object(labels);
        }
    }
    if rng.percent(30) {
        r["request"]["fuzzUnknownField"] = json!(rng.string(50));
    }
    if rng.percent(30) {
        r["request"]["object"]["metadata"]["name"] = json!(format!("p{}", rng.below(100_000)));
    }
    (what, r)
}

/// Valid reviews the fuzzer starts from.
fn webhook_seed(uid: &str, rng: &mut Rng) -> Value {
    let pod = ("", "Pod");
    let role = |r: &str| json!({ "iam.amazonaws.com/role": r });
    match rng.below(10) {
        0 => review(uid, pod, TEAM, "CREATE", pod_object("web", role("app-x"), json!({}))),
        1 => review(uid, pod, TEAM, "CREATE", pod_object("plain", json!({}), json!({ "nodeName": NODE }))),
        2 => {
            let mut r = review(
                uid,
                pod,
                TEAM,
                "UPDATE",
                pod_object("web", role("app-x"), json!({ "nodeName": NODE })),
            );
            r["request"]["oldObject"] = pod_object("web", role("app-x"), json!({ "nodeName": NODE }));
            r
        }
        3 => review(uid, pod, TEAM, "DELETE", Value::Null),
        4 => review(
            uid,
            ("", "Binding"),
            TEAM,
            "CREATE",
            json!({ "apiVersion": "v1", "kind": "Binding",
            "metadata": { "name": "web", "namespace": TEAM }, "target": { "kind": "Node", "name": NODE } }),
        ),
        5 => review(
            uid,
            ("", "ConfigMap"),
            TEAM,
            "CREATE",
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" } }),
        ),
        6 => review(
            uid,
            pod,
            "kube-system",
            "CREATE",
            pod_object("sys", json!({}), json!({ "nodeName": SERVER_NODE, "hostNetwork": true })),
        ),
        7 => review(
            uid,
            pod,
            TEAM,
            "CREATE",
            pod_object(
                "aff",
                json!({}),
                json!({
            "tolerations": [{ "operator": "Exists" }],
            "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                { "matchExpressions": [{ "key": "imdsgate.io/server-node", "operator": "NotIn", "values": ["true"] }] }] } } } }),
            ),
        ),
        8 => must_refuse_case(rng.below(12), uid, rng).1,
        _ => review(
            uid,
            pod,
            TEAM,
            "CREATE",
            pod_object(
                "sess",
                json!({ "iam.amazonaws.com/role": "app-x", "iam.amazonaws.com/session-name": "batch" }),
                json!({}),
            ),
        ),
    }
}

/// A random value of a random type, `depth` levels deep at most.
fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.percent(50)),
        2 => json!(*rng.pick(&[0i64, -1, i64::MAX, i64::MIN, 1])),
        3 => json!(*rng.pick(&[1e308, -0.0, 0.5, 1e-300])),
        4 => json!(rng.string(40)),
        5 => json!(*rng.pick(&[
            "Pod",
            "Binding",
            "CREATE",
            "UPDATE",
            "",
            NODE,
            SERVER_NODE,
            TEAM,
            "true",
            "app-x",
            "admin"
        ])),
        6 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth - 1)).collect()),
        _ => {
            Value::Object((0..rng.below(4)).map(|_| (rng.string(8), random_value(rng, depth - 1))).collect())
        }
    }
}

/// A node of `v`, chosen by a random walk down from the top.
fn random_node<'a>(v: &'a mut Value, rng: &mut Rng) -> &'a mut Value {
    let stop = rng.percent(25);
    let len = match &*v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if stop || len == 0 {
        return v;
    }
    let i = rng.below(len);
    match v {
        Value::Object(m) => {
            let v = m.values_mut().nth(i).expect("in range");
            random_node(v, rng)
        }
        Value::Array(a) => random_node(&mut a[i], rng),
        _ => unreachable!(),
    }
}

/// One structural mutation of an AdmissionReview.
fn mutate_review(r: &mut Value, rng: &mut Rng) -> &'static str {
    let targeted: &[&str] = &[
        "/request/kind/kind",
        "/request/kind/group",
        "/request/operation",
        "/request/namespace",
        "/request/uid",
        "/request/object/spec/nodeName",
        "/request/object/spec/hostNetwork",
        "/request/object/spec/tolerations",
        "/request/object/spec/nodeSelector",
        "/request/object/metadata/annotations",
        "/request/object/metadata/namespace",
        "/request/object/target/name",
        "/request/oldObject",
        "/apiVersion",
        "/kind",
        "/request",
        "/request/object",
    ];
    match rng.below(10) {
        0..=2 => {
            let ptr = *rng.pick(targeted);
            if let Some(node) = r.pointer_mut(ptr) {
                *node = random_value(rng, 2);
            }
            "targeted-value"
        }
        3 => {
            let node = random_node(r, rng);
            *node = random_value(rng, 3);
            "random-value"
        }
        4 => {
            let node = random_node(r, rng);
            *node = json!("x".repeat(rng.range(10_000, 600_000)));
            "huge-string"
        }
        5 => {
            let depth = rng.range(10, 3000);
            let mut deep = json!(1);
            for _ in 0..depth.min(120) {
                deep = json!([deep]);
            }
            let node = random_node(r, rng);
            *node = deep;
            "deep-nesting"
        }
        6 => {
            let node = random_node(r, rng);
            match node {
                Value::Object(m) if !m.is_empty() => {
                    let k = m.keys().nth(rng.below(m.len())).cloned().expect("in range");
                    m.remove(&k);
                }
                Value::Array(a) if !a.is_empty() => {
                    a.remove(rng.below(a.len()));
                }
                other => *other = Value::Null,
            }
            "removed-field"
        }
        7 => {
            let node = random_node(r, rng);
            if let Value::Object(m) = node {
                m.insert(rng.string(12), random_value(rng, 2));
            }
            "unknown-field"
        }
        8 => {
            let kind = *rng.pick(&["Pod", "Binding", "ConfigMap", "Deployment", "", "pod", "PodX", "Node"]);
            let group = *rng.pick(&["", "", "apps", "core", "v1"]);
            if let Some(k) = r.pointer_mut("/request/kind") {
                *k = json!({ "group": group, "version": "v1", "kind": kind });
            }
            "kind"
        }
        _ => {
            let node = random_node(r, rng);
            if let Value::Array(a) = node
                && let Some(first) = a.first().cloned()
            {
                // At most about 2 MB of copies.
                let size = serde_json::to_string(&first).map_or(1, |s| s.len().max(1));
                let n = rng.range(2, 2000).min((2 << 20) / size).max(1);
                a.extend(std::iter::repeat_n(first, n));
            } else {
                *node = json!([random_value(rng, 1), random_value(rng, 1)]);
            }
            "repeated-elements"
        }
    }
}

/// Byte-level damage to a serialized review.
fn mutate_bytes(body: &mut Vec<u8>, rng: &mut Rng) -> &'static str {
    let len = body.len().max(1);
    match rng.below(9) {
        0 => {
            body.truncate(rng.below(len));
            "truncated"
        }
        1 => {
            let n = rng.below(4096);
            *body = rng.bytes(n);
            "random-bytes"
        }
        2 => {
            for _ in 0..rng.range(1, 8) {
                let at = rng.below(len);
                if at < body.len() {
                    body[at] ^= 1 << rng.below(8);
                }
            }
            "bit-flips"
        }
        3 => {
            let mut out = b"\xef\xbb\xbf".to_vec();
            out.append(body);
            *body = out;
            "bom"
        }
        4 => {
            body.extend_from_slice(rng.pick::<&[u8]>(&[&b" trailing"[..], b"{}", b"\x00", b"]", b"// c"]));
            "trailing-garbage"
        }
        5 => {
            let text =
                String::from_utf8_lossy(body).replacen("\"request\":", "\"request\":{},\"request\":", 1);
            *body = text.into_bytes();
            "duplicate-key"
        }
        6 => {
            let at = rng.below(len);
            let at = at.min(body.len());
            body.splice(at..at, rng.pick(&[&b"\xff\xfe"[..], b"\xc0\xaf", b"\xed\xa0\x80"]).iter().copied());
            "non-utf8"
        }
        7 => {
            let depth = rng.range(100, 100_000);
            *body = [vec![b'['; depth], vec![b']'; depth]].concat();
            "deep-brackets"
        }
        _ => {
            *body = rng
                .pick(&[&b""[..], b"null", b"[]", b"{}", b"\"AdmissionReview\"", b"NaN", b"1e999999"])
                .to_vec();
            "not-a-review"
        }
    }
}

/// The refusal an independent, conservative reading of a review demands, if any: a pod CREATE in
/// a namespace that is not exempt, pinned to the server node, on the host network, or with a role
/// its namespace cannot permit; a binding of such a namespace to any node but the worker.
fn must_be_refused(r: &Value) -> Option<&'static str> {
    let req = r.get("request")?;
    let kind = req.get("kind")?;
    if !kind.get("group")?.as_str()?.is_empty() {
        return None;
    }
    let object = req.get("object")?;
    let namespace = req
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| object.pointer("/metadata/namespace").and_then(Value::as_str))
        .unwrap_or_default();
    if EXEMPT.contains(&namespace) {
        return None;
    }
    match kind.get("kind")?.as_str()? {
        "Pod" if req.get("operation")?.as_str()? == "CREATE" => {
            if object.pointer("/spec/nodeName").and_then(Value::as_str) == Some(SERVER_NODE) {
                return Some("pinned to a server node");
            }
            if object.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
                return Some("hostNetwork");
            }
            let role =
                object.pointer("/metadata/annotations/iam.amazonaws.com~1role").and_then(Value::as_str);
            match role {
                Some(role) if namespace != TEAM || !role.contains("app-") => Some("role not permitted"),
                _ => None,
            }
        }
        "Binding" => match object.pointer("/target/name").and_then(Value::as_str) {
            Some(NODE) => None,
            _ => Some("binding to a node other than the worker"),
        },
        _ => None,
    }
}

/// One HTTP request over a fresh TLS connection: (status, body); status 0 when nothing came back.
async fn webhook_call(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    head: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(body);
    // The server may answer (400) before it has read a large body, and close.
    let _ = tls.write_all(&request).await;
    let mut raw = Vec::new();
    match tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut raw)).await {
        Err(_) => return Err("no complete answer within 20 s".into()),
        Ok(Err(e)) if raw.is_empty() => return Err(format!("read: {e}")),
        Ok(_) => {}
    }
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok((0, raw));
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, raw[end + 4..].to_vec()))
}

fn post(body_len: usize, content_type: &str) -> String {
    format!(
        "POST /validate/pods HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n\
         Content-Length: {body_len}\r\nConnection: close\r\n\r\n"
    )
}

/// At most `max` characters of `s`.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…({} bytes)", &s[..at], s.len()),
        None => s.to_string(),
    }
}

/// Whether `body` is a well-formed AdmissionReview answer (`response.allowed`, and the request's
/// `uid` when it had one): Ok(allowed). The answer's `apiVersion` and `kind` must be those of an
/// AdmissionReview, or else exactly those the request carried (the webhook echoes them: see the
/// report's `foreign_type_meta_answered`).
/// `Ok((allowed, uid_matches))`: a refusal whose uid is not the request's is returned (the
/// apiserver then fails the call: closed) so the caller can count it; an admission never is.
fn well_formed_answer(body: &[u8], sent: Option<&Value>) -> Result<(bool, bool), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let review = v["kind"] == "AdmissionReview"
        && v["apiVersion"].as_str().is_some_and(|a| a.starts_with("admission.k8s.io/"));
    let echoed =
        sent.is_some_and(|r| r.get("kind") == v.get("kind") && r.get("apiVersion") == v.get("apiVersion"));
    if !review && !echoed {
        return Err(clip(&format!("answer is not an AdmissionReview: {v}"), 600));
    }
    let allowed =
        v["response"]["allowed"].as_bool().ok_or_else(|| clip(&format!("no response.allowed: {v}"), 600))?;
    let got = v["response"]["uid"].as_str().ok_or_else(|| clip(&format!("no response.uid: {v}"), 600))?;
    if let Some(uid) = sent.and_then(|r| r.pointer("/request/uid")).and_then(Value::as_str)
        && got != uid
    {
        if allowed {
            return Err(clip(&format!("admitted with response.uid {got:?}, not the request's {uid:?}"), 600));
        }
        return Ok((false, false));
    }
    Ok((allowed, true))
}

/// Whether a review's own `apiVersion` and `kind` are not an AdmissionReview's.
fn foreign_type_meta(r: &Value) -> bool {
    r.get("kind") != Some(&json!("AdmissionReview"))
        || r.get("apiVersion") != Some(&json!("admission.k8s.io/v1"))
}

#[derive(Default, Debug, serde::Serialize)]
struct WebhookReport {
    reviews: u64,
    by_status: BTreeMap<u16, u64>,
    by_mutation: BTreeMap<&'static str, u64>,
    allowed: u64,
    denied: u64,
    /// Reviews whose own `apiVersion`/`kind` are not an AdmissionReview's, answered 200 (with
    /// those values echoed back) instead of 400; the first few.
    foreign_type_meta_answered: u64,
    foreign_type_meta_examples: Vec<String>,
    /// Refusals answered with a `response.uid` other than the request's (the apiserver rejects
    /// such an answer, so the pod is still refused); the first few.
    refusals_without_the_uid: u64,
    refusals_without_the_uid_examples: Vec<String>,
    must_refuse_sent: u64,
    must_refuse_refused: u64,
    oracle_refusals_checked: u64,
    violations: Vec<String>,
    slowest_ms: u64,
}

#[tokio::test]
async fn webhook_fuzzing_never_panics_and_never_admits_what_it_must_refuse() {
    if !e2e_enabled("webhook_fuzzing_never_panics_and_never_admits_what_it_must_refuse") {
        return;
    }
    // The oracle itself catches what it must (it is what the fuzzing relies on).
    let mut rng = rng_for_case(0, 0);
    for i in 0..12 {
        let (what, r) = must_refuse_case(i, "u", &mut rng);
        if i != 6 && i != 7 && i != 9 && i != 10 && i != 11 {
            assert!(must_be_refused(&r).is_some(), "the oracle knows {what} must be refused");
        }
    }
    let sent =
        json!({ "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": { "uid": "y" } });
    let wrong_uid = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"x","allowed":true}}"#;
    assert!(well_formed_answer(wrong_uid, Some(&sent)).is_err_and(|e| e.contains("uid")));
    let refused = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":false}}"#;
    assert_eq!(well_formed_answer(refused, Some(&sent)), Ok((false, false)));
    assert!(
        well_formed_answer(br#"{"kind":"Pod","response":{"uid":"y","allowed":true}}"#, Some(&sent)).is_err()
    );

    let budget = budget();
    let mut bed = AgentBed::start(BedPlan {
        namespaces: vec![(TEAM, "arn:aws:iam::123456789012:role/app-.*")],
        webhook: true,
        ..Default::default()
    })
    .await
    .expect("bed");
    bed.cluster.create_labelled_node(SERVER_NODE, &[("imdsgate.io/server-node", "true")]).await.unwrap();
    bed.cluster.create_namespace(LOCKED, &[]).await.unwrap();
    let addr = bed.webhook.unwrap();
    let connector = Arc::new(imdsgate_e2e::components::tls_connector(&bed.pki.ca.cert_pem()));
    let server_pid = bed.server.child.id();
    let rss_before = rss_kib(server_pid);

    let report = Arc::new(Mutex::new(WebhookReport::default()));
    let seed = budget.seed;
    let started = Instant::now();
    let ran = {
        let (report, connector) = (report.clone(), connector.clone());
        run_workers(&budget, CI_WEBHOOK_REVIEWS, 4, move |index| {
            let (report, connector) = (report.clone(), connector.clone());
            async move {
                let mut rng = rng_for_case(seed, index);
                let uid = rng.uuid();
                let case_started = Instant::now();
                let mut mutations: Vec<&'static str> = Vec::new();
                // Every fifth case is one that must be refused, noise and all.
                let (must_refuse, head, body, sent) = if index % 5 == 2 {
                    let (what, r) = must_refuse_case(rng.below(12), &uid, &mut rng);
                    let body = serde_json::to_vec(&r).unwrap();
                    (Some(what), post(body.len(), "application/json"), body, Some(r))
                } else if index % 500 == 251 {
                    // Larger than the 3 MiB the webhook reads.
                    let body = format!("{{\"x\":\"{}\"}}", "a".repeat(3_300_000)).into_bytes();
                    mutations.push("over-3-MiB");
                    (None, post(body.len(), "application/json"), body, None)
                } else {
                    let mut r = webhook_seed(&uid, &mut rng);
                    let least = usize::from(!rng.percent(10));
                    for _ in 0..rng.range(least, 4) {
                        mutations.push(mutate_review(&mut r, &mut rng));
                    }
                    let mut body = serde_json::to_vec(&r).unwrap();
                    let mut parsed = Some(r);
                    if rng.percent(20) {
                        mutations.push(mutate_bytes(&mut body, &mut rng));
                        parsed = serde_json::from_slice(&body).ok();
                    }
                    let head = match rng.below(40) {
                        0 => {
                            mutations.push("get");
                            format!("GET /validate/pods HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                        }
                        1 => {
                            mutations.push("other-path");
                            format!("POST /validate/pods/../x HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                        }
                        2 => {
                            mutations.push("content-type");
                            post(body.len(), rng.pick::<&str>(&["text/plain", "application/yaml", "", "application/json; charset=latin1"]))
                        }
                        3 => {
                            mutations.push("chunked");
                            let mut chunked = Vec::new();
                            for piece in body.chunks(rng.range(1, 4096)) {
                                chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                                chunked.extend_from_slice(piece);
                                chunked.extend_from_slice(b"\r\n");
                            }
                            chunked.extend_from_slice(b"0\r\n\r\n");
                            body = chunked;
                            "POST /validate/pods HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string()
                        }
                        _ => post(body.len(), "application/json"),
                    };
                    (None, head, body, parsed)
                };
                let plain_post = head.starts_with("POST /validate/pods HTTP");
                let answer = webhook_call(&connector, addr, &head, &body).await;
                let took = case_started.elapsed().as_millis() as u64;
                let mut report = report.lock().unwrap();
                report.reviews += 1;
                report.slowest_ms = report.slowest_ms.max(took);
                for m in &mutations {
                    *report.by_mutation.entry(m).or_default() += 1;
                }
                let show = |body: &[u8]| String::from_utf8_lossy(&body[..body.len().min(600)]).to_string();
                let describe = || format!("case {index} (seed {seed}) {mutations:?} body {}", clip(&show(&body), 400));
                let (status, answer) = match answer {
                    Ok(a) => a,
                    Err(e) => {
                        report.violations.push(format!("{}: no answer: {e}", describe()));
                        return;
                    }
                };
                *report.by_status.entry(status).or_default() += 1;
                if must_refuse.is_some() {
                    report.must_refuse_sent += 1;
                }
                match status {
                    200 => match well_formed_answer(&answer, sent.as_ref()) {
                        Ok((allowed, uid_matches)) => {
                            if !uid_matches {
                                report.refusals_without_the_uid += 1;
                                if report.refusals_without_the_uid_examples.len() < 3 {
                                    let example = format!("{} -> {}", clip(&describe(), 600), clip(&show(&answer), 300));
                                    report.refusals_without_the_uid_examples.push(example);
                                }
                            }
                            if sent.as_ref().is_some_and(foreign_type_meta) {
                                report.foreign_type_meta_answered += 1;
                                if report.foreign_type_meta_examples.len() < 3 {
                                    let example = format!("{} -> {}", clip(&describe(), 300), clip(&show(&answer), 300));
                                    report.foreign_type_meta_examples.push(example);
                                }
                            }
                            if allowed {
                                report.allowed += 1;
                            } else {
                                report.denied += 1;
                            }
                            if let Some(what) = must_refuse {
                                if allowed {
                                    report.violations.push(format!("admitted {what}: {}", describe()));
                                } else {
                                    report.must_refuse_refused += 1;
                                }
                            }
                            if plain_post && let Some(why) = sent.as_ref().and_then(must_be_refused) {
                                report.oracle_refusals_checked += 1;
                                if allowed {
                                    report.violations.push(format!("admitted a review that must be refused ({why}): {}", describe()));
                                }
                            }
                        }
                        Err(e) => report.violations.push(format!("{}: {e}", describe())),
                    },
                    400..=499 if must_refuse.is_none() => {}
                    _ => report.violations.push(format!("{}: status {status}: {}", describe(), clip(&show(&answer), 400))),
                }
            }
        })
        .await
    };
    let elapsed = started.elapsed();
    let report = std::mem::take(&mut *report.lock().unwrap());
    let rss_after = rss_kib(server_pid);
    eprintln!(
        "webhook fuzzing: {ran} reviews in {elapsed:?}; server VmRSS {rss_before:?} KiB before, {rss_after:?} KiB after\n{}",
        serde_json::to_string_pretty(&report).unwrap()
    );

    assert!(
        report.violations.is_empty(),
        "{} violations:\n{:#?}\nserver log:\n{}",
        report.violations.len(),
        report.violations,
        bed.server.log()
    );
    assert!(
        report.must_refuse_sent > 0 && report.must_refuse_refused == report.must_refuse_sent,
        "{report:?}"
    );
    // Fixed findings, now violations: a foreign envelope is a 400, and a refusal keeps the uid.
    assert_eq!(report.foreign_type_meta_answered, 0, "{:?}", report.foreign_type_meta_examples);
    assert_eq!(report.refusals_without_the_uid, 0, "{:?}", report.refusals_without_the_uid_examples);
    assert!(report.allowed > 0 && report.denied > 0, "the fuzzing reached both decisions: {report:?}");
    bed.server.child.check_running().expect("the server still runs");
    assert_eq!(http_get(bed.server.admin, "/healthz").await.unwrap().0, 200, "server /healthz");
    let (status, answer) = webhook_call(&connector, addr, &post(0, "application/json"), b"").await.unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    let ok = review(
        "after",
        ("", "Pod"),
        TEAM,
        "CREATE",
        pod_object("web", json!({ "iam.amazonaws.com/role": "app-x" }), json!({})),
    );
    let ok = serde_json::to_vec(&ok).unwrap();
    let (status, answer) =
        webhook_call(&connector, addr, &post(ok.len(), "application/json"), &ok).await.unwrap();
    assert_eq!(status, 200, "the webhook still answers");
    let after = serde_json::from_slice::<Value>(&ok).unwrap();
    assert_eq!(
        well_formed_answer(&answer, Some(&after)),
        Ok((true, true)),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let log = bed.server.child.log_tail(1_000_000);
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

// =============================================================================================
// c. GetCredentials from an authenticated agent.

const GRPC_NS: &str = "team-g";
const GRPC_LOCKED: &str = "locked-g";
const OTHER_NODE: &str = "node-b";

/// A pod as the apiserver has it, for the oracle.
#[derive(Clone, Debug)]
struct PodRecord {
    namespace: String,
    name: String,
    uid: String,
    node: String,
    ips: Vec<IpAddr>,
    role: Option<String>,
    deleting: bool,
}

impl PodRecord {
    fn of(pod: &Pod) -> PodRecord {
        let status = pod.status.clone().unwrap_or_default();
        PodRecord {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips: status.pod_ips.unwrap_or_default().iter().filter_map(|i| i.ip.parse().ok()).collect(),
            role: pod.metadata.annotations.as_ref().and_then(|a| a.get("iam.amazonaws.com/role").cloned()),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }

    /// The role ARN the pod's annotation names.
    fn role_arn(&self) -> Option<String> {
        let role = self.role.as_deref()?;
        Some(if role.starts_with("arn:") {
            role.to_string()
        } else {
            format!("arn:aws:iam::{ACCOUNT}:role/{}", role.trim_start_matches('/'))
        })
    }

    /// What the server may hand an agent of `node` asking for `role`: the pod's own role ARN, if
    /// the pod lives there, carries that role, and its namespace permits it.
    fn entitlement(&self, node: &str, role: &str) -> Option<String> {
        let arn = self.role_arn()?;
        let permitted = regex::Regex::new(&format!("^arn:aws:iam::{ACCOUNT}:role/app-[^/]*$")).unwrap();
        let name = arn.rsplit('/').next()?;
        (self.node == node
            && !self.deleting
            && self.namespace == GRPC_NS
            && permitted.is_match(&arn)
            && name == role)
            .then_some(arn)
    }
}

/// Pods for the gRPC fuzzing, on the agent's node and elsewhere: (namespace, name, node, IP, role).
const GRPC_PODS: &[(&str, &str, &str, &str, Option<&str>)] = &[
    (GRPC_NS, "alpha", NODE, "10.200.1.10", Some("app-alpha")),
    (GRPC_NS, "beta", NODE, "10.200.1.11", Some("app-beta")),
    (GRPC_NS, "plain", NODE, "10.200.1.12", None),
    (GRPC_NS, "greedy", NODE, "10.200.1.13", Some("admin")),
    (GRPC_NS, "by-arn", NODE, "10.200.1.14", Some("arn:aws:iam::123456789012:role/app-alpha")),
    (GRPC_NS, "pathy", NODE, "10.200.1.15", Some("team/app-alpha")),
    (GRPC_NS, "odd", NODE, "10.200.1.16", Some("app-alpha\nforged")),
    (GRPC_LOCKED, "intruder", NODE, "10.200.1.17", Some("app-alpha")),
    (GRPC_NS, "remote", OTHER_NODE, "10.200.2.10", Some("app-alpha")),
    (GRPC_NS, "remote-beta", OTHER_NODE, "10.200.2.11", Some("app-beta")),
    (GRPC_NS, "leaving", NODE, "10.200.1.18", Some("app-alpha")),
];

async fn create_grpc_pods(cluster: &Cluster) {
    cluster.create_namespace(GRPC_LOCKED, &[]).await.unwrap();
    for (ns, name, node, ip, role) in GRPC_PODS {
        let mut spec = PodSpec::new(ns, name, node);
        if let Some(role) = role {
            spec = spec.annotation("iam.amazonaws.com/role", role);
        }
        if *name == "leaving" {
            spec = spec.finalizer("fuzz.example/hold");
        }
        cluster.create_pod(&spec).await.unwrap();
        cluster.set_pod_status(ns, name, &[ip], "Running").await.unwrap();
    }
    // Terminating (held by its finalizer): it must get nothing.
    kube::Api::<Pod>::namespaced(cluster.client(), GRPC_NS)
        .delete("leaving", &Default::default())
        .await
        .unwrap();
}

/// A random GetCredentials request: mostly near the real pods, sometimes far off.
fn grpc_request(pods: &[PodRecord], rng: &mut Rng) -> GetCredentialsRequest {
    let pod = rng.pick(pods).clone();
    let other = rng.pick(pods).clone();
    let ip0 = pod.ips.first().map(|i| i.to_string()).unwrap_or_default();
    let huge = |rng: &mut Rng| "9".repeat(rng.range(1000, 300_000));
    let pod_ip = match rng.below(20) {
        0..=9 => ip0.clone(),
        10 => format!("::ffff:{ip0}"),
        11 => (*rng.pick(&[" ", "\n", "\0", "%eth0", "/32", ".", ":80"])).to_string() + &ip0,
        12 => format!("{ip0}{}", rng.pick(&[" ", "\n", "\0", "%eth0", "/32", ".", ":80"])),
        13 => ip0.split('.').map(|o| format!("0{o}")).collect::<Vec<_>>().join("."),
        14 => format!("10.200.{}.{}", rng.below(4), rng.below(256)),
        15 => format!("fd00:{:x}::{:x}", rng.below(0x10000), rng.below(0x10000)),
        16 => (*rng.pick(&[
            "0.0.0.0",
            "127.0.0.1",
            "169.254.169.254",
            "255.255.255.255",
            "::",
            "::1",
            "10.200.0.1",
        ]))
        .into(),
        17 => huge(rng),
        18 => format!("[{ip0}]"),
        _ => rng.string(30),
    };
    let pod_uid = match rng.below(20) {
        0..=11 => pod.uid.clone(),
        12..=13 => other.uid.clone(),
        14 => rng.uuid(),
        15 => pod.uid.to_uppercase(),
        16 => format!("{} ", pod.uid),
        17 => pod.uid[..rng.below(pod.uid.len())].to_string(),
        18 => "a".repeat(rng.range(65, 200_000)),
        _ => rng.string(40),
    };
    let annotated = pod.role.clone().unwrap_or_default();
    let last = annotated.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_string();
    let role = match rng.below(20) {
        0..=9 => last.clone(),
        10..=11 => other.role.clone().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string(),
        12 => annotated,
        13 => last.to_uppercase(),
        14 => format!("{last}/"),
        15 => (*rng.pick(&["", "*", ".*", "..", "admin", "node-role", "app-", "app-alpha\0", "app-alpha "]))
            .into(),
        16 => format!("arn:aws:iam::{ACCOUNT}:role/{last}"),
        17 => "r".repeat(rng.range(65, 300_000)),
        _ => rng.string(30),
    };
    GetCredentialsRequest { pod_ip, pod_uid, role }
}

/// Which pod a request names, if it names one exactly (the IP in its canonical form).
fn named_pod<'a>(pods: &'a [PodRecord], req: &GetCredentialsRequest) -> Option<&'a PodRecord> {
    let ip: IpAddr = req.pod_ip.parse().ok()?;
    let ip = ip.to_canonical();
    let live: Vec<&PodRecord> = pods.iter().filter(|p| p.ips.contains(&ip) && !p.deleting).collect();
    match live.as_slice() {
        [p] if p.uid == req.pod_uid => Some(p),
        _ => None,
    }
}

#[derive(Default, Debug, serde::Serialize)]
struct GrpcReport {
    calls: u64,
    by_code: BTreeMap<String, u64>,
    by_reason: BTreeMap<String, u64>,
    /// The first message of each refusal code.
    example_by_code: BTreeMap<String, String>,
    granted: BTreeMap<String, u64>,
    bad_token_calls: u64,
    other_agent_calls: u64,
    /// Calls with a field over 4 KiB (sent over their own connection).
    oversized_calls: u64,
    /// Of those, the ones that failed in HTTP/2 rather than with a refusal: the server echoes the
    /// field into `grpc-message`, over the client's header-list limit (a finding; the connection
    /// goes down with every call in flight on it).
    oversized_transport_errors: u64,
    violations: Vec<String>,
    slowest_ms: u64,
}

#[tokio::test]
async fn grpc_fuzzing_from_an_authenticated_agent_never_panics_or_leaks() {
    if !e2e_enabled("grpc_fuzzing_from_an_authenticated_agent_never_panics_or_leaks") {
        return;
    }
    let budget = budget();
    let mut bed = AgentBed::start(BedPlan {
        namespaces: vec![(GRPC_NS, "arn:aws:iam::123456789012:role/app-.*")],
        roles: vec!["app-alpha", "app-beta"],
        ..Default::default()
    })
    .await
    .expect("bed");
    let cluster = &bed.cluster;
    cluster.create_node(OTHER_NODE).await.unwrap();
    create_grpc_pods(cluster).await;
    let agent_b = cluster
        .create_pod(
            &PodSpec::new("imdsgate", "agent-b", OTHER_NODE).service_account("imdsgate-agent").host_network(),
        )
        .await
        .unwrap();
    let token_a = cluster
        .service_account_token("imdsgate", "imdsgate-agent", &["imdsgate"], Some(&bed.agent_pod))
        .await
        .unwrap();
    let token_b = cluster
        .service_account_token("imdsgate", "imdsgate-agent", &["imdsgate"], Some(&agent_b))
        .await
        .unwrap();
    cluster.create_service_account(GRPC_NS, "app").await.unwrap();
    let app_token = cluster.service_account_token(GRPC_NS, "app", &["imdsgate"], None).await.unwrap();
    let listed = kube::Api::<Pod>::all(cluster.client()).list(&Default::default()).await.unwrap();
    let pods: Vec<PodRecord> =
        listed.items.iter().map(PodRecord::of).filter(|p| p.namespace != "imdsgate").collect();
    assert_eq!(pods.len(), GRPC_PODS.len(), "{pods:#?}");
    // Requests with a field over 4 KiB go over a connection of their own: a refusal echoes the
    // field into `grpc-message`, and a trailer far over the client's header limit makes the client
    // tear the whole connection down (a finding, see `oversized_transport_errors`), which would
    // otherwise fail every call in flight with it.
    let client = grpc_client(bed.server.grpc, &bed.pki.ca.cert_pem(), Some(&bed.pki.agent)).await.unwrap();
    let oversized_client =
        grpc_client(bed.server.grpc, &bed.pki.ca.cert_pem(), Some(&bed.pki.agent)).await.unwrap();
    let server_pid = bed.server.child.id();
    let rss_before = rss_kib(server_pid);

    // The oracle agrees with the server on the plain cases before anything random is sent.
    let alpha = pods.iter().find(|p| p.name == "alpha").unwrap();
    let remote = pods.iter().find(|p| p.name == "remote").unwrap();
    assert_eq!(
        alpha.entitlement(NODE, "app-alpha").as_deref(),
        Some("arn:aws:iam::123456789012:role/app-alpha")
    );
    assert_eq!(remote.entitlement(NODE, "app-alpha"), None);
    assert_eq!(alpha.entitlement(NODE, "app-beta"), None);

    struct Shared {
        pods: Vec<PodRecord>,
        tokens: [(String, &'static str); 3],
        report: Mutex<GrpcReport>,
        /// Access key → (pod, role ARN) of every grant.
        keys: Mutex<BTreeMap<String, (String, String)>>,
        seed: u64,
    }
    let shared = Arc::new(Shared {
        pods: pods.clone(),
        tokens: [(token_a, NODE), (token_b, OTHER_NODE), (app_token, "")],
        report: Mutex::new(GrpcReport::default()),
        keys: Mutex::new(BTreeMap::new()),
        seed: budget.seed,
    });
    let started = Instant::now();
    let ran = {
        let shared = shared.clone();
        run_workers(&budget, CI_GRPC_CALLS, 48, move |index| {
            let (shared, client, oversized_client) = (shared.clone(), client.clone(), oversized_client.clone());
            async move {
                let mut rng = rng_for_case(shared.seed, index);
                let mut req = if index % 400 == 199 {
                    // Over the server's 4 MiB message limit.
                    GetCredentialsRequest { pod_ip: "10.200.1.10".into(), pod_uid: "u".repeat(5 << 20), role: "app-alpha".into() }
                } else {
                    grpc_request(&shared.pods, &mut rng)
                };
                if rng.percent(3) {
                    req.pod_uid = shared.pods[rng.below(shared.pods.len())].uid.clone();
                }
                // Mostly this node's agent; some from the other node's, some with a bad token.
                let (token, node, bad_token) = match rng.below(20) {
                    0..=13 => (shared.tokens[0].0.clone(), shared.tokens[0].1, false),
                    14..=16 => (shared.tokens[1].0.clone(), shared.tokens[1].1, false),
                    17 => (shared.tokens[2].0.clone(), "", true),
                    _ => {
                        let mut t = shared.tokens[rng.below(2)].0.clone().into_bytes();
                        match rng.below(3) {
                            0 => t.truncate(rng.below(t.len())),
                            1 => {
                                let at = rng.range(t.len() / 2, t.len() - 1);
                                t[at] = if t[at] == b'A' { b'B' } else { b'A' };
                            }
                            _ => t.extend_from_slice(b"x"),
                        }
                        (String::from_utf8(t).unwrap(), "", true)
                    }
                };
                let shown = format!(
                    "case {index} (seed {}): ip {:?} uid {:?} role {:?} as agent of {node:?}{}",
                    shared.seed,
                    &req.pod_ip[..req.pod_ip.len().min(80)],
                    &req.pod_uid[..req.pod_uid.len().min(80)],
                    &req.role[..req.role.len().min(80)],
                    if bad_token { " with a bad token" } else { "" }
                );
                let named = named_pod(&shared.pods, &req).cloned();
                let oversized = req.pod_ip.len().max(req.pod_uid.len()).max(req.role.len()) > 4096;
                let mut request = tonic::Request::new(req.clone());
                request.set_timeout(Duration::from_secs(20));
                match format!("Bearer {token}").parse() {
                    Ok(v) => {
                        request.metadata_mut().insert("authorization", v);
                    }
                    Err(_) => return,
                }
                let call_started = Instant::now();
                let result: Result<GetCredentialsResponse, tonic::Status> =
                    if oversized { oversized_client.clone() } else { client.clone() }
                        .get_credentials(request)
                        .await
                        .map(|r| r.into_inner());
                let took = call_started.elapsed().as_millis() as u64;
                let mut report = shared.report.lock().unwrap();
                report.calls += 1;
                report.slowest_ms = report.slowest_ms.max(took);
                if bad_token {
                    report.bad_token_calls += 1;
                }
                if oversized {
                    report.oversized_calls += 1;
                }
                if node == OTHER_NODE {
                    report.other_agent_calls += 1;
                }
                match result {
                    Err(status) => {
                        *report.by_code.entry(format!("{:?}", status.code())).or_default() += 1;
                        let reason = status
                            .metadata()
                            .get("imdsgate-reason")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        *report.by_reason.entry(reason).or_default() += 1;
                        let code = format!("{:?}", status.code());
                        report.example_by_code.entry(code).or_insert_with(|| {
                            format!("{}: {}", shown.chars().take(300).collect::<String>(), status.message())
                        });
                        let transport = matches!(
                            status.code(),
                            tonic::Code::Unknown
                                | tonic::Code::Internal
                                | tonic::Code::ResourceExhausted
                                | tonic::Code::Cancelled
                                | tonic::Code::DataLoss
                        ) || (status.code() == tonic::Code::Unavailable && !status.message().contains("STS"));
                        if transport && oversized {
                            report.oversized_transport_errors += 1;
                        } else if transport {
                            report.violations.push(format!("{shown}: {:?} {}", status.code(), status.message()));
                        }
                    }
                    Ok(creds) => {
                        *report.by_code.entry("Ok".into()).or_default() += 1;
                        let entitled = named.as_ref().and_then(|p| p.entitlement(node, &req.role));
                        match (&named, entitled) {
                            (Some(pod), Some(arn)) if !bad_token && arn == creds.role_arn && !creds.access_key_id.is_empty() => {
                                let who = format!("{}/{}", pod.namespace, pod.name);
                                *report.granted.entry(who.clone()).or_default() += 1;
                                let mut keys = shared.keys.lock().unwrap();
                                let previous = keys.insert(creds.access_key_id.clone(), (who.clone(), arn.clone()));
                                if let Some((other, _)) = previous.filter(|(o, _)| *o != who) {
                                    report.violations.push(format!("{shown}: key {} given to {who} and {other}", creds.access_key_id));
                                }
                            }
                            _ => report.violations.push(format!(
                                "{shown}: credentials for {} (key {}) to a request not entitled to them (pod {:?})",
                                creds.role_arn,
                                creds.access_key_id,
                                named.as_ref().map(|p| format!("{}/{} on {}", p.namespace, p.name, p.node))
                            )),
                        }
                    }
                }
            }
        })
        .await
    };
    let elapsed = started.elapsed();
    let rss_after = rss_kib(server_pid);
    let keys = std::mem::take(&mut *shared.keys.lock().unwrap());
    let mut report = std::mem::take(&mut *shared.report.lock().unwrap());

    // Each access key handed out really is the session of the pod it was handed for.
    for (key, (who, arn)) in &keys {
        let (namespace, name) = who.split_once('/').unwrap();
        let pod = pods.iter().find(|p| p.namespace == namespace && p.name == name).unwrap();
        let token = &shared.tokens.iter().find(|(_, node)| *node == pod.node).unwrap().0;
        let req = GetCredentialsRequest {
            pod_ip: pod.ips[0].to_string(),
            pod_uid: pod.uid.clone(),
            role: arn.rsplit('/').next().unwrap().to_string(),
        };
        let mut request = tonic::Request::new(req);
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut client =
            grpc_client(bed.server.grpc, &bed.pki.ca.cert_pem(), Some(&bed.pki.agent)).await.unwrap();
        let creds =
            client.get_credentials(request).await.expect("the pod still gets its credentials").into_inner();
        if &creds.access_key_id != key {
            report.violations.push(format!("{who}: now {} instead of {key}", creds.access_key_id));
            continue;
        }
        let credentials = aws_credential_types::Credentials::new(
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(creds.session_token.clone()),
            None,
            "fuzz",
        );
        let identity = bed.sts.client(credentials).get_caller_identity().send().await.unwrap();
        let role_name = arn.rsplit('/').next().unwrap();
        let expected = format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role_name}/{namespace}.{name}");
        if identity.arn() != Some(expected.as_str()) {
            report.violations.push(format!("key {key} for {who} is {:?}, not {expected}", identity.arn()));
        }
    }
    eprintln!(
        "gRPC fuzzing: {ran} calls in {elapsed:?}; {} distinct keys; server VmRSS {rss_before:?} KiB before, {rss_after:?} KiB after\n{}",
        keys.len(),
        serde_json::to_string_pretty(&report).unwrap()
    );
    assert!(
        report.violations.is_empty(),
        "{} violations:\n{:#?}\nserver log:\n{}",
        report.violations.len(),
        report.violations,
        bed.server.log()
    );
    // Refusal texts are cut to 512 bytes (`Denial::to_status`): an oversized field no longer breaks
    // the call or the connection.
    assert_eq!(report.oversized_transport_errors, 0, "oversized fields broke calls: {report:?}");
    let granted: BTreeSet<&str> = report.granted.keys().map(String::as_str).collect();
    assert!(granted.contains("team-g/alpha"), "the fuzzing reached real grants: {report:?}");
    assert!(
        report.by_reason.contains_key("WRONG_NODE") && report.by_reason.contains_key("ROLE_MISMATCH"),
        "{report:?}"
    );
    bed.server.child.check_running().expect("the server still runs");
    assert_eq!(http_get(bed.server.admin, "/healthz").await.unwrap().0, 200, "server /healthz");
    let log = bed.server.child.log_tail(1_000_000);
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
