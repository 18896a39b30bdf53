//! Soak run on the real test bed (`scripts/soak.sh --minutes N`): pods ask for credentials all the
//! time while Pod objects are deleted and recreated (new UIDs, roles switching, the same IPs), and
//! every interval the agent's and the server's RSS, open file descriptors and the pods' request
//! latency are sampled. Prints a table, then the RSS trend over the second half of the run (KiB per
//! minute, least squares), and exits 1 if a wrong answer was ever served or either process died.
//! Stops by itself after --minutes.

use anyhow::{Context, Result, bail};
use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod};
use std::time::{Duration, Instant};

struct Args {
    minutes: f64,
    pods: usize,
    sample_every: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { minutes: 30.0, pods: 6, sample_every: Duration::from_secs(30) };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => args.minutes = value()?.parse().context("--minutes")?,
            "--pods" => args.pods = value()?.parse().context("--pods")?,
            "--sample-seconds" => {
                args.sample_every = Duration::from_secs(value()?.parse().context("--sample-seconds")?)
            }
            other => bail!("unknown argument {other:?} (--minutes N, --pods N, --sample-seconds N)"),
        }
    }
    if !(0.1..=24.0 * 60.0).contains(&args.minutes) || !(2..=40).contains(&args.pods) {
        bail!("--minutes must be 0.1..1440 and --pods 2..40");
    }
    Ok(args)
}

/// RSS (KiB) and open file descriptors of a process.
fn usage(pid: u32) -> Result<(u64, usize)> {
    let rss = imdsgate_e2e::report::rss_kib(pid).context("process gone")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// Least-squares slope of `ys` over `xs`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let roles = ["soak-a", "soak-b"];
    let pods: Vec<BedPod> = (0..args.pods)
        .map(|i| {
            BedPod::new("soak", leak(format!("p{i}")), leak(format!("10.200.2.{}", 10 + i)))
                .role(roles[i % 2])
        })
        .collect();
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("soak", "arn:aws:iam::123456789012:role/soak-.*")],
        roles: roles.to_vec(),
        pods: pods.clone(),
        ..Default::default()
    })
    .await?;
    let agent_pid = bed.agent().child.id();
    let server_pid = bed.server.child.id();
    let end = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let start = Instant::now();
    println!("soak: {} pods, {:.1} minutes, a sample every {:?}", args.pods, args.minutes, args.sample_every);
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>8} {:>6}",
        "minute",
        "agentKiB",
        "agentFDs",
        "serverKiB",
        "serverFDs",
        "p50ms",
        "p99ms",
        "requests",
        "churned",
        "wrong"
    );
    let (mut latencies, mut requests, mut churned, mut wrong, mut failed) =
        (Vec::new(), 0u64, 0u64, 0u64, 0u64);
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut next_sample = Instant::now();
    let mut round = 0usize;
    let mut current_role: Vec<&str> = pods.iter().map(|p| p.annotations[0].1).collect();
    while Instant::now() < end {
        // Every pod asks once per round; its answer must be its own current role or a refusal.
        for (i, pod) in pods.iter().enumerate() {
            let t = Instant::now();
            let (status, body) = bed.imds_get(
                bed.pod(&format!("soak/{}", pod.name)),
                "/latest/meta-data/iam/security-credentials/",
            );
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            requests += 1;
            match status {
                200 if body.trim() == current_role[i] => {}
                200 => {
                    wrong += 1;
                    eprintln!("WRONG: soak/{} is {} but was told {body:?}", pod.name, current_role[i]);
                }
                _ => failed += 1,
            }
        }
        // Churn: one pod a round is deleted and recreated with a new UID and the other role.
        let i = round % pods.len();
        let name = pods[i].name;
        bed.cluster.kubectl(&["-n", "soak", "delete", "pod", name, "--force", "--grace-period=0"])?;
        current_role[i] = if current_role[i] == roles[0] { roles[1] } else { roles[0] };
        let mut replacement = pods[i].clone();
        replacement.annotations = vec![("iam.amazonaws.com/role", current_role[i])];
        bed.create_pod_object(&replacement).await?;
        churned += 1;
        round += 1;

        if Instant::now() >= next_sample {
            next_sample += args.sample_every;
            let (agent_rss, agent_fds) = usage(agent_pid).context("the agent died")?;
            let (server_rss, server_fds) = usage(server_pid).context("the server died")?;
            latencies.sort_by(f64::total_cmp);
            let minute = start.elapsed().as_secs_f64() / 60.0;
            println!(
                "{minute:>7.1} {agent_rss:>9} {agent_fds:>9} {server_rss:>9} {server_fds:>9} {:>7.1} {:>7.1} {requests:>9} {churned:>8} {wrong:>6}",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99)
            );
            samples.push((minute, agent_rss, server_rss));
            latencies.clear();
        }
    }
    let second_half: Vec<_> = samples.iter().skip(samples.len() / 2).collect();
    let agent_trend = slope(&second_half.iter().map(|s| (s.0, s.1 as f64)).collect::<Vec<_>>());
    let server_trend = slope(&second_half.iter().map(|s| (s.0, s.2 as f64)).collect::<Vec<_>>());
    println!(
        "soak: {requests} requests ({failed} refused while a pod was being recreated, {wrong} wrong), {churned} pods recreated"
    );
    println!(
        "soak: RSS trend over the second half: agent {agent_trend:+.1} KiB/min, server {server_trend:+.1} KiB/min"
    );
    if wrong > 0 {
        bail!("{wrong} wrong answers");
    }
    Ok(())
}
