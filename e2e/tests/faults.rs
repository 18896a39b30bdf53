//! Faults under load, end to end: pods ask for their credentials every 25 ms through the real
//! path (pod namespace → DNAT → agent → mutual-TLS gRPC → server → STS) while one fault at a time
//! is injected, and every answer is counted as ok, failed or wrong. A wrong answer is anything from
//! the node's own metadata service, another role, or an access key that belongs to another pod
//! (first sight, and STS's own word on each key's role and session). Wrong answers must be zero
//! under every fault; each test prints one `FAULT <name>: …` line with its figures.

use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod, NODE};
use imdsgate_e2e::components::{AgentSetup, TlsFiles};
use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::faults::{
    AgentAdmin, Answer, Churn, ExpiredServerPki, Load, SecondReplica, StsMode, StsProxy, Tally, classify,
    identities, metric_sum, min_remaining_secs, now_ms, sigkill, unix_seconds,
};
use imdsgate_e2e::process::run;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const NS: &str = "faults";
const PERMIT: &str = "arn:aws:iam::123456789012:role/app-.*";
const ROLES: [&str; 3] = ["app-a", "app-b", "app-c"];
/// Each pod starts a round (token once, listing, credentials) this often.
const EVERY: Duration = Duration::from_millis(25);

/// `steady` pods with objects (`faults/s<i>`, roles in turn) and `slots` pod namespaces with no
/// object yet (`faults/slot<i>`), for [`Churn`].
fn plan(steady: usize, slots: usize) -> BedPlan {
    let leak = imdsgate_e2e::faults::leak;
    let mut pods = Vec::new();
    for i in 0..steady {
        pods.push(
            BedPod::new(NS, leak(format!("s{i}")), leak(format!("10.200.1.{}", 10 + i)))
                .role(ROLES[i % ROLES.len()]),
        );
    }
    for i in 0..slots {
        pods.push(BedPod {
            object: false,
            ..BedPod::new(NS, leak(format!("slot{i}")), leak(format!("10.200.2.{}", 10 + i)))
        });
    }
    BedPlan { namespaces: vec![(NS, PERMIT)], roles: ROLES.to_vec(), pods, ..Default::default() }
}

fn steady_pods(n: usize) -> Vec<(String, &'static str)> {
    (0..n).map(|i| (format!("{NS}/s{i}"), ROLES[i % ROLES.len()])).collect()
}

fn churn(slots: usize) -> Churn {
    let keys: Vec<(String, &'static str)> = (0..slots)
        .map(|i| (format!("{NS}/slot{i}"), imdsgate_e2e::faults::leak(format!("10.200.2.{}", 10 + i))))
        .collect();
    let refs: Vec<(&str, &'static str)> = keys.iter().map(|(k, ip)| (k.as_str(), *ip)).collect();
    Churn::new(NS, ROLES.to_vec(), &refs)
}

/// Starts the steady pods' askers and waits until each has been served once.
async fn start_steady(bed: &AgentBed, load: &mut Load, n: usize) {
    for (pod, role) in steady_pods(n) {
        load.start(bed.pod(&pod), &pod, role).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answers = load.answers();
        let served: std::collections::BTreeSet<&str> =
            answers.iter().filter(|a| a.ok()).map(|a| a.pod.as_str()).collect();
        if served.len() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "steady pods never served: {served:?}\nagent log:\n{}",
            bed.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects every answer, asks STS whose each key is, classifies, prints the summary line and
/// checks that nothing was wrong.
async fn judge(
    bed: &AgentBed,
    load: &mut Load,
    name: &str,
    healed: u64,
    extra: &str,
) -> (Tally, Vec<Answer>) {
    load.stop_all();
    let answers = load.answers();
    let ids = identities(&bed.sts, &answers).await.expect("STS names every key");
    let tally = classify(&answers, &ids);
    eprintln!("{}", tally.line(name, tally.recovery_ms(healed), extra));
    assert_eq!(
        tally.wrong,
        0,
        "{name}: wrong answers:\n{}\nagent log:\n{}",
        tally.wrong_examples.join("\n"),
        bed.agent_log()
    );
    assert!(tally.ok > 0, "{name}: nothing was ever served");
    (tally, answers)
}

/// Runs churn cycles over every slot in turn for `length` (a late deletion every `late_every`th
/// cycle, none if 0).
async fn churn_for(
    bed: &AgentBed,
    agent: &AgentAdmin,
    load: &mut Load,
    churn: &mut Churn,
    length: Duration,
    late_every: usize,
) {
    let until = Instant::now() + length;
    let mut k = churn.cycles;
    while Instant::now() < until {
        let late = late_every > 0 && k % late_every == late_every - 1;
        let slot = k % churn.slots.len();
        churn
            .cycle(bed, agent, load, slot, late)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", bed.agent_log()));
        k += 1;
    }
}

#[tokio::test]
async fn kill_9_of_one_of_two_server_replicas_fails_no_request() {
    if !e2e_enabled("kill_9_of_one_of_two_server_replicas_fails_no_request") {
        return;
    }
    let began = Instant::now();
    let mut bed = AgentBed::start(plan(4, 3)).await.expect("bed");
    let endpoint = bed.sts.endpoint().to_string();
    let second = SecondReplica::start(&mut bed, &endpoint, &[]).await.expect("second replica");
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    agent
        .wait_for("imdsgate_agent_revocation_streams", Duration::from_secs(20), |v| v >= 2.0)
        .await
        .unwrap_or_else(|e| panic!("{e}: the agent does not see both replicas\n{}", bed.agent_log()));
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 4).await;
    let mut churn = churn(3);
    // New pods all the time: each one's first request calls a server replica.
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(3), 0).await;
    // A call cut by the kill fails as Unknown (stream reset) or Unavailable (connection refused),
    // whichever comes first; both are retried on the other replica.
    let server_errors = "imdsgate_agent_server_errors_total";
    let errors_before = metric_sum(&agent.metrics().await, server_errors);
    let cycles_before = churn.cycles;
    sigkill(&mut bed.server.child).unwrap();
    let killed = now_ms();
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(8), 0).await;
    let errors = metric_sum(&agent.metrics().await, server_errors) - errors_before;
    let new_pods = churn.cycles - cycles_before;
    let (tally, _) = judge(
        &bed,
        &mut load,
        "server_replica_kill_9",
        killed,
        &format!(
            "new_pods_after_kill={new_pods} calls_retried_on_the_other_replica={errors} runtime_s={}",
            began.elapsed().as_secs()
        ),
    )
    .await;
    assert!(
        new_pods > 0 && errors >= 1.0,
        "the dead replica was never tried ({errors} errors, {new_pods} new pods)"
    );
    assert_eq!(
        tally.failed,
        0,
        "a request failed although another replica answered: {:?}\nagent log:\n{}",
        tally.failures,
        bed.agent_log()
    );
    drop(second);
}

#[tokio::test]
async fn ip_reuse_churn_never_hands_over_the_previous_pods_credentials() {
    if !e2e_enabled("ip_reuse_churn_never_hands_over_the_previous_pods_credentials") {
        return;
    }
    let began = Instant::now();
    let bed = AgentBed::start(plan(2, 4)).await.expect("bed");
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 2).await;
    let mut churn = churn(4);
    let started = now_ms();
    // Every 4th replacement is created before its predecessor's deletion arrives.
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(20), 4).await;
    let (cycles, late) = (churn.cycles, churn.late_cycles);
    let (tally, answers) = judge(
        &bed,
        &mut load,
        "ip_reuse_churn",
        started,
        &format!(
            "pods_replaced={cycles} late_deletions={late} rate_per_s={:.1} runtime_s={}",
            cycles as f64 / 20.0,
            began.elapsed().as_secs()
        ),
    )
    .await;
    assert!(late > 0 && cycles > 20, "churn too slow to mean anything: {cycles} cycles");
    // While two pods claimed one IP the agent refused (503), which is how the overlap shows.
    assert!(
        answers.iter().any(|a| a.status == 503),
        "the late deletions never made an IP ambiguous: {:?}",
        tally.failures
    );
}

#[tokio::test]
async fn agent_sigkill_and_restart_refuses_then_serves_with_the_same_tokens() {
    if !e2e_enabled("agent_sigkill_and_restart_refuses_then_serves_with_the_same_tokens") {
        return;
    }
    let began = Instant::now();
    let mut bed = AgentBed::start(plan(4, 0)).await.expect("bed");
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut agent = bed.agent.take().unwrap();
    let killed = now_ms();
    sigkill(&mut agent.child).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = now_ms();
    bed.agent = Some(agent.restart(&bed.setup(), &[]).await.expect("agent restarts"));
    let ready = now_ms();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (tally, answers) = judge(
        &bed,
        &mut load,
        "agent_sigkill_restart",
        ready,
        &format!(
            "down_ms={} restart_to_ready_ms={} runtime_s={}",
            restarting - killed,
            ready - restarting,
            began.elapsed().as_secs()
        ),
    )
    .await;
    // While it was away: refused connections (status 0) or 503, never anything else.
    let odd: Vec<String> = answers
        .iter()
        .filter(|a| !a.ok() && a.status != 0 && a.status != 503)
        .map(Answer::describe)
        .take(5)
        .collect();
    assert!(odd.is_empty(), "failures other than refused/503: {odd:#?}");
    assert!(tally.failed > 0, "the agent's absence was never seen");
    // Tokens issued before the kill still work after the restart, for every pod.
    assert!(!answers.iter().any(|a| a.status == 401), "a token was refused after the restart");
    for (pod, _) in steady_pods(4) {
        assert!(
            answers
                .iter()
                .any(|a| a.pod == pod && a.ok() && a.tok.is_some_and(|t| t < killed) && a.t > ready),
            "{pod} was not served after the restart with its token from before it"
        );
    }
}

/// Lines of a log that say a watch was told 410 Gone (its resourceVersion expired: a relist).
fn relists(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("watch failed") && l.contains("too old"))
        .count()
}

/// Watch errors and 410 relists of the agent and the server so far.
async fn watch_errors(bed: &AgentBed, agent: &AgentAdmin) -> [f64; 4] {
    let agent_errors = agent.value("imdsgate_agent_watch_restarts_total").await;
    let server = imdsgate_e2e::components::http_get(bed.server.admin, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default();
    [
        agent_errors,
        relists(bed.agent().child.log_path()) as f64,
        metric_sum(&server, "imdsgate_server_watch_restarts_total"),
        relists(bed.server.child.log_path()) as f64,
    ]
}

#[tokio::test]
async fn apiserver_restart_under_churn_converges_without_a_wrong_answer() {
    if !e2e_enabled("apiserver_restart_under_churn_converges_without_a_wrong_answer") {
        return;
    }
    let began = Instant::now();
    let mut bed = AgentBed::start(plan(4, 2)).await.expect("bed");
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 4).await;
    let mut churn = churn(2);
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(3), 0).await;
    let before = watch_errors(&bed, &agent).await;
    let away = bed.cluster.restart_apiserver(&[]).await.expect("apiserver restarts");
    let back = now_ms();
    // The first pod created afterwards is served once both watches have caught up.
    let first = churn.cycle(&bed, &agent, &mut load, 0, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let converged = loop {
        if let Some(a) = load.answers().iter().find(|a| a.pod == first && a.ok()) {
            break a.end();
        }
        assert!(Instant::now() < deadline, "{first} never served after the restart\n{}", bed.agent_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(4), 0).await;
    let after = watch_errors(&bed, &agent).await;
    judge(
        &bed,
        &mut load,
        "apiserver_restart",
        back,
        &format!(
            "apiserver_away_ms={} converge_ms={} agent_watch_errors={} agent_relists_410={} server_watch_errors={} server_relists_410={} runtime_s={}",
            away.as_millis(),
            converged.saturating_sub(back),
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
            after[3] - before[3],
            began.elapsed().as_secs()
        ),
    )
    .await;
}

/// Cuts the agent's connections to the apiserver (in the node namespace only): its watch
/// resumes from the last resourceVersion it saw.
fn cut_agent_apiserver_connections(bed: &AgentBed) {
    run(bed.node.command("ss").args([
        "-K",
        "dst",
        "127.0.0.1",
        "dport",
        "=",
        &format!(":{}", bed.cluster.port()),
    ]))
    .expect("ss -K in the node namespace");
}

/// 410 relists of the agent's watch so far.
fn gone_lines(bed: &AgentBed) -> usize {
    relists(bed.agent().child.log_path())
}

#[tokio::test]
async fn etcd_compaction_forces_relists_without_a_wrong_answer() {
    if !e2e_enabled("etcd_compaction_forces_relists_without_a_wrong_answer") {
        return;
    }
    let began = Instant::now();
    let mut bed = AgentBed::start(plan(4, 2)).await.expect("bed");
    // Without the apiserver's watch cache, a watch that resumes is served by etcd itself, from
    // the resourceVersion the client last saw: what compaction takes away. (With the cache, the
    // apiserver keeps its own window of events and compaction changes nothing a client sees.)
    bed.cluster.restart_apiserver(&["--watch-cache=false"]).await.expect("apiserver without watch cache");
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 4).await;
    let mut churn = churn(2);
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(3), 0).await;
    let restarts = "imdsgate_agent_watch_restarts_total";

    // Control: the connection cut alone resumes the watch where it was, no relist.
    let (errors0, gone0) = (agent.value(restarts).await, gone_lines(&bed));
    cut_agent_apiserver_connections(&bed);
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(2), 0).await;
    let (errors1, gone1) = (agent.value(restarts).await, gone_lines(&bed));

    // Writes the agent's watch does not see (other namespaces), then compaction at the newest
    // revision: the revision after the last one the agent saw, where its watch resumes, is gone.
    for marker in ["faults-compaction-1", "faults-compaction-2"] {
        bed.cluster.create_namespace(marker, &[]).await.unwrap();
    }
    let revision = bed.cluster.compact_etcd().expect("compaction");
    let compacted = now_ms();
    cut_agent_apiserver_connections(&bed);
    let first = churn.cycle(&bed, &agent, &mut load, 0, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let converged = loop {
        if let Some(a) = load.answers().iter().find(|a| a.pod == first && a.ok()) {
            break a.end();
        }
        assert!(Instant::now() < deadline, "{first} never served after the compaction\n{}", bed.agent_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(4), 0).await;
    let (errors2, gone2) = (agent.value(restarts).await, gone_lines(&bed));
    judge(
        &bed,
        &mut load,
        "etcd_compaction",
        compacted,
        &format!(
            "revision={revision} converge_ms={} cut_only: watch_errors={} gone={} compaction+cut: watch_errors={} gone={} runtime_s={}",
            converged.saturating_sub(compacted),
            errors1 - errors0,
            gone1 - gone0,
            errors2 - errors1,
            gone2 - gone1,
            began.elapsed().as_secs()
        ),
    )
    .await;
    let watch_lines: Vec<String> = std::fs::read_to_string(bed.agent().child.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("watch"))
        .map(str::to_string)
        .collect();
    assert_eq!(gone1, gone0, "a cut connection alone made the watch relist:\n{}", watch_lines.join("\n"));
    assert!(
        gone2 > gone1,
        "the compaction never reached the agent's watch as 410 Gone:\n{}",
        watch_lines.join("\n")
    );
}

/// Drops (`-I`) or lets through again (`-D`) the node's traffic to `addr:port`: an iptables
/// OUTPUT rule in the node namespace only.
fn black_hole(bed: &AgentBed, op: &str, addr: &str, port: u16) {
    run(bed.node.command("iptables").args([
        "-w",
        "5",
        op,
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "-d",
        addr,
        "--dport",
        &port.to_string(),
        "-j",
        "DROP",
    ]))
    .expect("iptables in the node namespace");
}

/// Waits until every pod in `pods` has been served (at or after `since`); returns when each was
/// first served, or `None` for a pod that was not within `timeout`.
async fn first_served(
    load: &Load,
    pods: &[String],
    since: u64,
    timeout: Duration,
) -> BTreeMap<String, Option<u64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let answers = load.answers();
        let served: BTreeMap<String, Option<u64>> = pods
            .iter()
            .map(|p| {
                (p.clone(), answers.iter().find(|a| a.pod == *p && a.ok() && a.t >= since).map(Answer::end))
            })
            .collect();
        if served.values().all(Option::is_some) || Instant::now() > deadline {
            return served;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn partitions_from_the_servers_serve_cached_credentials_and_heal_within_seconds() {
    if !e2e_enabled("partitions_from_the_servers_serve_cached_credentials_and_heal_within_seconds") {
        return;
    }
    let began = Instant::now();
    let mut bed = AgentBed::start(plan(4, 4)).await.expect("bed");
    let endpoint = bed.sts.endpoint().to_string();
    let second = SecondReplica::start(&mut bed, &endpoint, &[]).await.expect("second replica");
    let port = bed.server.grpc.port();
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    agent.wait_for("imdsgate_agent_revocation_streams", Duration::from_secs(20), |v| v >= 2.0).await.unwrap();
    // The agent gives up on a server call after 5 s per replica: wait longer than both.
    let mut load = Load::new(EVERY).unwrap().with_timeout(Duration::from_secs(20));
    start_steady(&bed, &mut load, 4).await;
    let mut churn = churn(4);

    // A. One replica of two black-holed (packets vanish, nothing refuses): the other answers.
    black_hole(&bed, "-I", "127.0.0.2", port);
    let one_down = now_ms();
    let mut a_pods = Vec::new();
    for slot in 0..4 {
        a_pods.push(churn.cycle(&bed, &agent, &mut load, slot, false).await.unwrap());
    }
    let a_served = first_served(&load, &a_pods, one_down, Duration::from_secs(30)).await;
    let answers = load.answers();
    let a_first: Vec<String> = a_pods
        .iter()
        .filter_map(|p| answers.iter().find(|a| a.pod == *p && a.step == "creds"))
        .map(|a| format!("{}:{}ms", a.status, a.ms))
        .collect();

    // B. Both black-holed: cached credentials are still served; new pods are refused.
    black_hole(&bed, "-I", "127.0.0.1", port);
    let all_down = now_ms();
    let b_pods = vec![
        churn.cycle(&bed, &agent, &mut load, 0, false).await.unwrap(),
        churn.cycle(&bed, &agent, &mut load, 1, false).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_secs(12)).await;
    black_hole(&bed, "-D", "127.0.0.1", port);
    black_hole(&bed, "-D", "127.0.0.2", port);
    let healed = now_ms();
    let b_served = first_served(&load, &b_pods, healed, Duration::from_secs(45)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recovery: Vec<String> = b_served
        .iter()
        .map(|(p, at)| format!("{p}:{}", at.map_or("never".into(), |t| (t - healed).to_string())))
        .collect();
    let (_, answers) = judge(
        &bed,
        &mut load,
        "partition_agent_from_servers",
        healed,
        &format!(
            "one_replica_down_first_answers={a_first:?} all_down_ms={} new_pod_recovery_ms_after_heal={recovery:?} runtime_s={}",
            healed - all_down,
            began.elapsed().as_secs()
        ),
    )
    .await;
    // A: every new pod was served while one replica was black-holed. (Not always at the first
    // request: see `with_one_replica_black_holed_every_new_pod_is_served_at_its_first_request`.)
    assert!(a_served.values().all(Option::is_some), "one replica down: {a_served:?}\n{}", bed.agent_log());
    // B: the steady pods never failed (their cached credentials stay valid for an hour)...
    let steady: Vec<String> = steady_pods(4).into_iter().map(|p| p.0).collect();
    let steady_failed: Vec<String> =
        answers.iter().filter(|a| steady.contains(&a.pod) && !a.ok()).map(Answer::describe).take(5).collect();
    assert!(
        steady_failed.is_empty(),
        "cached credentials not served during the partition: {steady_failed:#?}"
    );
    // ...new pods got nothing but 503 until the partition healed...
    for a in answers.iter().filter(|a| b_pods.contains(&a.pod) && a.end() < healed) {
        assert!(!a.ok(), "served during a full partition: {}", a.describe());
        assert!(a.step != "creds" || a.status == 503, "refused otherwise than 503: {}", a.describe());
    }
    // ...and were served after it healed.
    assert!(
        b_served.values().all(Option::is_some),
        "never served after the partition healed: {recovery:?}\n{}",
        bed.agent_log()
    );
    drop(second);
}

/// A bed whose server reaches moto through a fault-injecting proxy.
async fn bed_behind_proxy(plan: BedPlan) -> (AgentBed, StsProxy) {
    let mut proxy = None;
    let bed = AgentBed::start_with(plan, |sts| {
        let p = StsProxy::start(sts.port()).expect("STS proxy");
        let endpoint = p.endpoint();
        proxy = Some(p);
        Some(endpoint)
    })
    .await
    .expect("bed");
    (bed, proxy.expect("the proxy started"))
}

// The STS proxy runs in this runtime: keep it serving while the test blocks on a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_slow_throttling_and_failing_serve_the_cache_refuse_new_pods_and_recover() {
    if !e2e_enabled("sts_slow_throttling_and_failing_serve_the_cache_refuse_new_pods_and_recover") {
        return;
    }
    let began = Instant::now();
    let (bed, proxy) = bed_behind_proxy(plan(4, 2)).await;
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(EVERY).unwrap().with_timeout(Duration::from_secs(20));
    start_steady(&bed, &mut load, 4).await;
    let mut churn = churn(2);
    let mut figures = Vec::new();
    let mut phases = Vec::new();
    // In each phase an early pod meets the whole fault, a late one its last 3 s. A pod that met
    // more than a few seconds of failing STS may be locked out for minutes after it clears (an
    // open finding: `a_pod_created_during_a_long_sts_outage_is_served_soon_after_it_ends`), so
    // recovery is required of the late pods and only reported for the early ones.
    for (name, mode, length) in [
        ("slow", StsMode::Slow(Duration::from_secs(3)), Duration::from_secs(6)),
        ("throttling", StsMode::Throttle, Duration::from_secs(10)),
        ("failing", StsMode::Fail, Duration::from_secs(10)),
    ] {
        proxy.set_mode(mode);
        let from = now_ms();
        let early = churn.cycle(&bed, &agent, &mut load, 0, false).await.unwrap();
        tokio::time::sleep(
            (length - Duration::from_secs(3)).saturating_sub(Duration::from_millis(now_ms() - from)),
        )
        .await;
        let late = churn.cycle(&bed, &agent, &mut load, 1, false).await.unwrap();
        tokio::time::sleep(length.saturating_sub(Duration::from_millis(now_ms() - from))).await;
        proxy.set_mode(StsMode::Pass);
        let healed = now_ms();
        let served = first_served(&load, std::slice::from_ref(&late), from, Duration::from_secs(15)).await;
        let early_served = load.answers().iter().find(|a| a.pod == early && a.ok()).map(Answer::end);
        let calls: Vec<_> = proxy.calls().into_iter().filter(|c| c.t >= from && c.t < healed).collect();
        let mut per_pod: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for c in &calls {
            per_pod.entry(c.session.clone()).or_default().push(c.t - from);
        }
        let after =
            |at: Option<u64>| at.map_or("not yet".into(), |t| format!("{}", t as i64 - healed as i64));
        figures.push(format!(
            "{name}: sts_calls={} max_calls_per_pod={} call_times_ms={per_pod:?} served_ms_after_clear: early={} late={}",
            calls.len(),
            per_pod.values().map(Vec::len).max().unwrap_or(0),
            after(early_served),
            after(served[&late]),
        ));
        phases.push((name, from, healed, vec![early, late], served, per_pod));
    }
    let (_, answers) = judge(
        &bed,
        &mut load,
        "sts_faults",
        phases.last().map(|p| p.2).unwrap_or(0),
        &format!("{} runtime_s={}", figures.join(" | "), began.elapsed().as_secs()),
    )
    .await;
    // Cached credentials were served throughout: the steady pods never failed.
    let steady: Vec<String> = steady_pods(4).into_iter().map(|p| p.0).collect();
    let steady_failed: Vec<String> =
        answers.iter().filter(|a| steady.contains(&a.pod) && !a.ok()).map(Answer::describe).take(5).collect();
    assert!(
        steady_failed.is_empty(),
        "cached credentials not served while STS misbehaved: {steady_failed:#?}"
    );
    for (name, from, healed, pods, served, per_pod) in &phases {
        // No retry storm: every pod asked 40 times a second, STS saw a handful of calls for it
        // (the SDK's 3 attempts per call, at most 4 new sessions per pod).
        for (session, times) in per_pod {
            assert!(times.len() <= 12, "{name}: {} STS calls for {session}: {times:?}", times.len());
        }
        // The late pod was served once STS was back (the slow phase's pods before).
        assert!(
            served.values().all(Option::is_some),
            "{name}: not served within 15 s of STS recovering: {served:?}\nserver log:\n{}",
            bed.server.log()
        );
        if *name == "slow" {
            continue;
        }
        // New pods got 503 (retry later) while STS failed, never credentials.
        for a in answers.iter().filter(|a| pods.contains(&a.pod) && a.end() < *healed && a.t >= *from) {
            assert!(!a.ok(), "{name}: served while STS failed: {}", a.describe());
            assert!(
                a.step != "creds" || a.status == 503,
                "{name}: refused otherwise than 503: {}",
                a.describe()
            );
        }
    }
}

/// Reproducer of a finding (see the fault suite's report): a pod created while STS fails spends
/// its allowance of new sessions (4, then one per 5 minutes) on failed attempts, and is then
/// refused for up to 5 minutes after STS is back.
// The STS proxy runs in this runtime: keep it serving while the test blocks on a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_during_a_long_sts_outage_is_served_soon_after_it_ends() {
    if !e2e_enabled("a_pod_created_during_a_long_sts_outage_is_served_soon_after_it_ends") {
        return;
    }
    let (bed, proxy) = bed_behind_proxy(plan(1, 1)).await;
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(Duration::from_millis(100)).unwrap();
    start_steady(&bed, &mut load, 1).await;
    let mut churn = churn(1);
    proxy.set_mode(StsMode::Fail);
    let from = now_ms();
    let pod = churn.cycle(&bed, &agent, &mut load, 0, false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.set_mode(StsMode::Pass);
    let healed = now_ms();
    let served = first_served(&load, std::slice::from_ref(&pod), healed, Duration::from_secs(20)).await;
    let calls: Vec<u64> = proxy.calls().iter().filter(|c| c.t >= from).map(|c| c.t - from).collect();
    let answers = load.answers();
    let last_error = answers.iter().rev().find(|a| a.pod == pod && !a.ok()).and_then(|a| a.err.clone());
    eprintln!(
        "FINDING sts_outage_lockout: STS calls for the new pod at {calls:?} ms; served after recovery: {:?}; last refusal: {last_error:?}",
        served[&pod].map(|t| t - healed)
    );
    assert!(served[&pod].is_some(), "{pod} still refused 20 s after STS recovered: {last_error:?}");
}

/// The full log of the running agent.
fn agent_log_all(bed: &AgentBed) -> String {
    std::fs::read_to_string(bed.agent().child.log_path()).unwrap_or_default()
}

#[tokio::test]
async fn expired_server_and_foreign_agent_certificates_fail_closed_visibly() {
    if !e2e_enabled("expired_server_and_foreign_agent_certificates_fail_closed_visibly") {
        return;
    }
    let began = Instant::now();
    let mut bed = AgentBed::start(plan(4, 0)).await.expect("bed");
    let agent_admin = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 4).await;

    // A. A server whose certificate expired (same CA for both sides, only the dates are wrong);
    //    the agent restarts against it with an empty cache.
    let expired = ExpiredServerPki::new().unwrap();
    let role_base = "--role-base-arn=arn:aws:iam::123456789012:role/";
    let stale = imdsgate_e2e::components::ServerProcess::start_at(
        &bed.cluster,
        bed.sts.endpoint(),
        &expired.files,
        &[role_base],
    )
    .await
    .expect("a server with an expired certificate starts");
    bed.node.forward_to_host(stale.grpc.port()).await.unwrap();
    let setup = AgentSetup {
        cluster: &bed.cluster,
        tls: &expired.files,
        node: &bed.node,
        node_name: NODE,
        server_host: "127.0.0.1",
        server_port: stale.grpc.port(),
        agent_pod: &bed.agent_pod,
    };
    let agent = bed.agent.take().unwrap().restart_unready(&setup, &[]).await.expect("agent restarts");
    bed.agent = Some(agent);
    // From here on the only agent running holds the wrong certificates (until phase C).
    let a_from = now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let a_metrics = agent_admin.metrics().await;
    let a_log = agent_log_all(&bed);
    let server_expiry = stale
        .metric("imdsgate_server_certificate_expiry_timestamp_seconds{certificate=\"server\"}")
        .await
        .unwrap();
    let stale_log = std::fs::read_to_string(stale.child.log_path()).unwrap_or_default();

    // B. The bed's server, and an agent certificate from a CA the server does not trust.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = imdsgate_e2e::TestCa::new("someone-else").unwrap().issue_client("imdsgate-agent").unwrap();
    let (cert, key) = foreign.write(foreign_dir.path(), "agent").unwrap();
    let foreign_files = TlsFiles { agent_cert: cert, agent_key: key, ..bed.tls.clone() };
    let agent = bed.agent.take().unwrap();
    let setup = AgentSetup { tls: &foreign_files, ..bed.setup() };
    let agent = agent.restart_unready(&setup, &[]).await.expect("agent restarts");
    bed.agent = Some(agent);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let b_metrics = agent_admin.metrics().await;
    let b_log = agent_log_all(&bed);
    let server_log = std::fs::read_to_string(bed.server.child.log_path()).unwrap_or_default();
    let server_metrics = imdsgate_e2e::components::http_get(bed.server.admin, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default();

    // C. Back to the right certificates.
    let c_from = now_ms();
    let agent = bed.agent.take().unwrap();
    let agent = agent.restart(&bed.setup(), &[]).await.expect("agent restarts");
    bed.agent = Some(agent);
    let ready = now_ms();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (tally, answers) = judge(
        &bed,
        &mut load,
        "certificates",
        ready,
        &format!(
            "expired_server: agent_server_errors={:?} agent_ready={} server_cert_expiry_metric={server_expiry} | foreign_agent_ca: agent_server_errors={:?} agent_ready={} | back_ready_ms={} runtime_s={}",
            server_errors(&a_metrics),
            metric_value_of(&a_metrics, "imdsgate_agent_ready"),
            server_errors(&b_metrics),
            metric_value_of(&b_metrics, "imdsgate_agent_ready"),
            ready - c_from,
            began.elapsed().as_secs()
        ),
    )
    .await;
    // Fail closed: nothing was served with either certificate problem, only 503.
    for a in answers.iter().filter(|a| a.t >= a_from && a.end() < c_from) {
        assert!(!a.ok(), "served with a bad certificate in play: {}", a.describe());
        // 0: the agent was restarting between the phases (connection refused or reset).
        assert!(
            a.status == 503 || a.status == 0 || a.step != "creds",
            "refused otherwise than 503: {}",
            a.describe()
        );
    }
    assert!(tally.failed > 0);
    // Visible: the agent counts the failed calls, says it is not ready, and logs why.
    for (what, metrics, log, says) in [
        ("expired server certificate", &a_metrics, &a_log[..], "xpired"),
        ("foreign agent certificate", &b_metrics, &b_log[..], "server replica failed"),
    ] {
        assert!(
            metric_sum(metrics, "imdsgate_agent_server_errors_total") >= 1.0,
            "{what}: not counted:\n{metrics}"
        );
        assert_eq!(
            metric_value_of(metrics, "imdsgate_agent_ready"),
            0.0,
            "{what}: the agent says it is ready"
        );
        assert!(log.contains(says), "{what}: the agent's log does not say {says:?}:\n{log}");
    }
    // The server's own metric shows its certificate's expiry in the past.
    assert!(server_expiry > 0.0 && server_expiry < now_ms() as f64 / 1000.0, "{server_expiry}");
    // The server logs refused handshakes and counts them.
    assert!(stale_log.contains("TLS handshake refused"), "expired: the server logged nothing:\n{stale_log}");
    assert!(server_log.contains("TLS handshake refused"), "foreign CA: the server logged nothing");
    let refused = imdsgate_e2e::components::metric_value(
        &server_metrics,
        "imdsgate_server_tls_handshake_failures_total{outcome=\"refused\"}",
    );
    assert!(refused >= 1.0, "foreign CA: refused handshakes not counted:\n{server_metrics}");
    eprintln!(
        "certificates: server log on the foreign agent: {:?}; server metrics mentioning tls/handshake: {:?}",
        server_log.lines().rfind(|l| l.contains("TLS handshake refused")),
        server_metrics
            .lines()
            .filter(|l| !l.starts_with('#') && (l.contains("tls") || l.contains("handshake")))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "certificates: agent log on the expired server: {:?}; on the foreign CA: {:?}",
        a_log.lines().rfind(|l| l.contains("xpired")),
        b_log.lines().rfind(|l| l.contains("server replica failed"))
    );
    drop(stale);
}

/// The agent's failed server calls by gRPC code.
fn server_errors(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("imdsgate_agent_server_errors_total"))
        .map(|l| l.replace("{code=\"", "").replace("\"}", ""))
        .collect()
}

fn metric_value_of(text: &str, sample: &str) -> f64 {
    imdsgate_e2e::components::metric_value(text, sample)
}

// The STS proxy runs in this runtime: keep it serving while the test blocks on a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_credentials_always_keep_the_refresh_margin_even_when_sts_hands_out_short_ones() {
    if !e2e_enabled("served_credentials_always_keep_the_refresh_margin_even_when_sts_hands_out_short_ones") {
        return;
    }
    let began = Instant::now();
    let mut plan = plan(4, 3);
    plan.server_args = vec!["--session-duration=15m".into()];
    let (bed, proxy) = bed_behind_proxy(plan).await;
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    let mut load = Load::new(EVERY).unwrap();
    start_steady(&bed, &mut load, 4).await;
    let mut churn = churn(3);
    let mut sdk = Vec::new();
    // 15-minute sessions as STS issues them, then STS answers whose Expiration is 11 and 14
    // minutes earlier (STS's clock behind the server's, or credentials issued aged): 4 minutes
    // and 1 minute of life. Real SDKs (botocore, aws-sdk-rust) in a new pod must still work.
    for (shift, length) in [(0i64, 4u64), (-660, 5), (-840, 5)] {
        proxy.set_mode(if shift == 0 { StsMode::Pass } else { StsMode::ShiftExpiration(shift) });
        churn_for(&bed, &agent, &mut load, &mut churn, Duration::from_secs(length), 0).await;
        let pod = churn.slots[0].current.clone().unwrap().0;
        let ns = bed.pod(&churn.slots[0].netns);
        let cli = bed.caller_arn(ns);
        let rust =
            bed.aws_env(ns, imdsgate_e2e::tools::workspace_bin("imds-whoami").unwrap()).output().unwrap();
        let expected = imdsgate_e2e::faults::expected_arn(&pod, churn.slots[0].current.clone().unwrap().1);
        sdk.push((
            shift,
            pod,
            expected,
            cli,
            String::from_utf8_lossy(&rust.stdout).trim().to_string(),
            String::from_utf8_lossy(&rust.stderr).to_string(),
        ));
    }
    // 20-second sessions (margin 5 s), and one pod that keeps asking through several of them:
    // what it is served must be renewed before less than the margin is left.
    proxy.set_mode(StsMode::ShiftExpiration(-880));
    let kept = churn.cycle(&bed, &agent, &mut load, 1, false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.set_mode(StsMode::Pass);
    let kept_keys: std::collections::BTreeSet<String> =
        load.answers().iter().filter(|a| a.pod == kept && a.ok()).filter_map(|a| a.key.clone()).collect();
    let calls = proxy.calls().iter().filter(|c| c.action == "AssumeRole").count();
    load.stop_all();
    let answers = load.answers();
    // Every answer, whatever the session's length, keeps imdsgate's margin: at least
    // min(15 min, a quarter of the session) left when it arrived, and never expired.
    let mut least: BTreeMap<i64, i64> = BTreeMap::new();
    let mut short = Vec::new();
    for a in answers.iter().filter(|a| a.ok()) {
        let (Some(exp), Some(upd)) =
            (a.exp.as_deref().and_then(unix_seconds), a.upd.as_deref().and_then(unix_seconds))
        else {
            panic!("no Expiration/LastUpdated: {}", a.describe());
        };
        let lifetime = exp - upd;
        let left_ms = exp * 1000 - a.end() as i64;
        let margin_ms = min_remaining_secs(lifetime) * 1000;
        // The document's timestamps are whole seconds: 2 s of slack for the rounding.
        if left_ms < margin_ms - 2000 || left_ms <= 0 {
            short.push(format!(
                "{} left {left_ms} ms of a {lifetime} s session (margin {margin_ms} ms)",
                a.describe()
            ));
        }
        let bucket = lifetime;
        let entry = least.entry(bucket).or_insert(i64::MAX);
        *entry = (*entry).min(left_ms / 1000);
    }
    let extra = format!(
        "least_seconds_left_by_session_seconds={least:?} assume_role_calls={calls} keys_of_the_pod_kept_through_20s_sessions={} sdk={:?} runtime_s={}",
        kept_keys.len(),
        sdk.iter()
            .map(|(s, _, _, cli, rust, err)| format!("shift {s}: cli={cli:?} rust={rust:?} {}", err.trim()))
            .collect::<Vec<_>>(),
        began.elapsed().as_secs()
    );
    judge(&bed, &mut load, "clock_near_expiry", now_ms(), &extra).await;
    assert!(short.is_empty(), "served inside the refresh margin:\n{}", short.join("\n"));
    assert!(kept_keys.len() >= 2, "{kept}'s 20-second sessions were never renewed: {kept_keys:?}");
    for (shift, pod, expected, cli, rust, rust_err) in sdk {
        assert_eq!(
            cli.as_deref(),
            Ok(expected.as_str()),
            "botocore in {pod} with Expiration moved {shift} s"
        );
        assert_eq!(rust, expected, "aws-sdk-rust in {pod} with Expiration moved {shift} s: {rust_err}");
    }
}

fn answer(pod: &str, allowed: &str, t: u64, status: u16, role: Option<&str>, key: Option<&str>) -> Answer {
    Answer {
        pod: pod.into(),
        allowed: allowed.into(),
        t,
        ms: 1,
        step: if key.is_some() || status != 200 { "creds" } else { "list" }.into(),
        status,
        role: role.map(str::to_string),
        key: key.map(str::to_string),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_classifier_counts_every_kind_of_wrong_answer() {
    if !e2e_enabled("the_classifier_counts_every_kind_of_wrong_answer") {
        return;
    }
    let none = HashMap::new();
    let ok = |pod: &str, role: &str, t: u64, key: &str| answer(pod, role, t, 200, Some(role), Some(key));
    // Renewed sessions: a pod's new key is fine; failures are failures, not wrong.
    let fine = [
        ok("a/x", "app-a", 1, "K1"),
        ok("a/x", "app-a", 2, "K2"),
        answer("a/x", "app-a", 3, 503, None, None),
        ok("a/y", "app-b", 4, "K3"),
    ];
    let tally = classify(&fine, &none);
    assert_eq!((tally.ok, tally.failed, tally.wrong), (3, 1, 0), "{tally:?}");
    // Another pod's key, even of the same role.
    let tally = classify(&[ok("a/x", "app-a", 1, "K1"), ok("a/z", "app-a", 2, "K1")], &none);
    assert_eq!(tally.wrong, 1, "{tally:?}");
    // Another role's name or credentials.
    let tally = classify(&[answer("a/x", "app-a", 1, 200, Some("app-b"), Some("K9"))], &none);
    assert_eq!(tally.wrong, 1, "{tally:?}");
    let tally = classify(&[answer("a/x", "app-a", 1, 200, Some("app-b"), None)], &none);
    assert_eq!(tally.wrong, 1, "a listing naming another role: {tally:?}");
    // Anything from the node's metadata service, whatever the status.
    let mut node = answer("a/x", "app-a", 1, 404, None, None);
    node.node = true;
    assert_eq!(classify(&[node], &none).wrong, 1);
    // STS says the key belongs to another role or session.
    let ids: HashMap<String, String> = [
        ("K1".to_string(), imdsgate_e2e::faults::expected_arn("a/x", "app-a")),
        ("K2".to_string(), imdsgate_e2e::faults::expected_arn("a/x", "app-b")),
        ("K3".to_string(), imdsgate_e2e::faults::expected_arn("a/other", "app-a")),
    ]
    .into();
    let tally = classify(
        &[ok("a/x", "app-a", 1, "K1"), ok("a/x", "app-a", 2, "K2"), ok("a/x", "app-a", 3, "K3")],
        &ids,
    );
    assert_eq!((tally.ok, tally.wrong), (1, 2), "{tally:?}");
    // The proxy's Expiration shift, and the margin rule restated.
    assert_eq!(
        imdsgate_e2e::faults::shift_expirations("<Expiration>2026-01-01T00:15:00.123Z</Expiration>", -660),
        "<Expiration>2026-01-01T00:04:00Z</Expiration>"
    );
    assert_eq!(min_remaining_secs(900), 225);
    assert_eq!(min_remaining_secs(3600), 900);
}

/// Reproducer of a finding (see the fault suite's report): the agent retries a failed replica
/// "on another" by taking the next turn of a counter all calls share, so when other calls took
/// turns meanwhile the retry can land on the same dead replica: with one replica of two
/// black-holed, a new pod's first request then waits out two 5 s call timeouts and gets 503.
#[tokio::test]
async fn with_one_replica_black_holed_every_new_pod_is_served_at_its_first_request() {
    if !e2e_enabled("with_one_replica_black_holed_every_new_pod_is_served_at_its_first_request") {
        return;
    }
    let mut bed = AgentBed::start(plan(1, 6)).await.expect("bed");
    let endpoint = bed.sts.endpoint().to_string();
    let _second = SecondReplica::start(&mut bed, &endpoint, &[]).await.expect("second replica");
    let port = bed.server.grpc.port();
    let agent = AgentAdmin::expose(&bed).await.unwrap();
    agent.wait_for("imdsgate_agent_revocation_streams", Duration::from_secs(20), |v| v >= 2.0).await.unwrap();
    let mut load = Load::new(EVERY).unwrap().with_timeout(Duration::from_secs(20));
    start_steady(&bed, &mut load, 1).await;
    let mut churn = churn(6);
    black_hole(&bed, "-I", "127.0.0.2", port);
    let mut pods = Vec::new();
    for slot in 0..6 {
        pods.push(churn.cycle(&bed, &agent, &mut load, slot, false).await.unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    first_served(&load, &pods, 0, Duration::from_secs(30)).await;
    let answers = load.answers();
    let first: Vec<String> = pods
        .iter()
        .filter_map(|p| answers.iter().find(|a| a.pod == *p && a.step == "creds"))
        .map(|a| format!("{} {}:{}ms", a.pod, a.status, a.ms))
        .collect();
    eprintln!("FINDING retry_on_the_same_dead_replica: first answers {first:?}");
    assert!(first.iter().all(|f| f.contains(" 200:")), "refused with a replica answering: {first:?}");
}
