//! The Prometheus side, proven with a real Prometheus: it scrapes the agent and the server of the
//! test bed; every series the README lists exists with the documented labels; a credentials
//! request moves the counters and histograms as it should; every Grafana dashboard query runs;
//! the alert rules load and evaluate against real data; and promtool checks and unit-tests them.

use imdsgate_e2e::bed::{AgentBed, BedPlan, BedPod};
use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::process::run;
use imdsgate_e2e::prometheus::{Job, Prometheus};
use imdsgate_e2e::tools::{tool_bin, workspace_root};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/app-reader";

fn files(name: &str) -> std::path::PathBuf {
    workspace_root().join("deploy/helm/imdsgate/files").join(name)
}

/// The metrics the README's Metrics section lists, with their label names, by full name.
fn documented_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme.split("\n## Metrics\n").nth(1).unwrap().split("\n## ").next().unwrap();
    let token = regex::Regex::new(r"^([a-z_]+)(?:\{([a-z_,]+)\})?$").unwrap();
    let parens = regex::Regex::new(r"\([^()]*\)").unwrap();
    let mut all = BTreeMap::new();
    for paragraph in section.split("\n\n") {
        let prefix = match paragraph.split_whitespace().next() {
            Some("Server") => "imdsgate_server_",
            Some("Agent") => "imdsgate_agent_",
            _ => continue,
        };
        let without_notes = parens.replace_all(paragraph, "");
        for quoted in without_notes.split('`').skip(1).step_by(2) {
            if let Some(m) = token.captures(quoted) {
                let labels = m.get(2).map(|l| l.as_str().split(',').map(str::to_string).collect());
                all.insert(format!("{prefix}{}", &m[1]), labels.unwrap_or_default());
            }
        }
    }
    assert!(all.len() > 30, "the README's metric lists were not found: {all:?}");
    all
}

/// Label names of a series, without the ones Prometheus adds and the histogram's `le`.
fn label_names(series: &Value) -> BTreeSet<String> {
    series
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !["__name__", "job", "instance", "le"].contains(&k.as_str()))
        .cloned()
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_bed_and_every_documented_series_query_and_rule_works() {
    if !e2e_enabled("prometheus_scrapes_the_bed_and_every_documented_series_query_and_rule_works") {
        return;
    }
    let bed = AgentBed::start(BedPlan {
        namespaces: vec![("team-a", "arn:aws:iam::123456789012:role/app-.*")],
        roles: vec!["app-reader", "admin"],
        pods: vec![
            BedPod::new("team-a", "web", "10.200.1.10").role("app-reader"),
            BedPod::new("team-a", "plain", "10.200.1.11"),
            BedPod::new("team-a", "rogue", "10.200.1.12").role("admin"),
            BedPod::new("team-a", "worker", "10.200.1.14").role("app-reader"),
            BedPod::ghost("stranger", "10.200.1.13"),
        ],
        webhook: true,
        ..Default::default()
    })
    .await
    .expect("bed");
    let agent_admin = bed.node.expose_on_host(9611).await.expect("agent admin port reachable");
    let prometheus = Prometheus::start(
        &[
            Job { name: "imdsgate-server", targets: vec![bed.server.admin.to_string()] },
            Job { name: "imdsgate-agent", targets: vec![format!("127.0.0.1:{agent_admin}")] },
        ],
        &[files("prometheus-rules.yaml")],
    )
    .await
    .expect("prometheus");
    let up = Duration::from_secs(30);
    prometheus.wait_value("up{job=\"imdsgate-server\"}", 1.0, up).await.unwrap();
    prometheus.wait_value("up{job=\"imdsgate-agent\"}", 1.0, up).await.unwrap();
    prometheus.wait_value("imdsgate_agent_ready", 1.0, up).await.unwrap();
    prometheus.wait_value("imdsgate_server_ready", 1.0, up).await.unwrap();

    // A credentials request moves exactly what it should: one 200 on the Credentials route, one
    // histogram observation, at most one STS call; both requests are agent cache hits (the agent
    // fetched the pod's credentials when the pod appeared on its node).
    let agent_200 = "imdsgate_agent_requests_total{route=\"Credentials\",status=\"200\"}";
    let agent_observed = "imdsgate_agent_request_duration_seconds_count{route=\"Credentials\"}";
    let sts_ok = "imdsgate_server_sts_calls_total{result=\"Success\"}";
    let hits = "imdsgate_agent_cache_hits_total";
    let before: Vec<f64> = [agent_200, agent_observed, sts_ok, hits]
        .iter()
        .map(|q| prometheus.value(q).unwrap().unwrap_or(0.0))
        .collect();
    for _ in 0..2 {
        let (status, body) = bed.imds_get(bed.pod("team-a/web"), CREDENTIALS);
        assert_eq!(status, 200, "{body}");
    }
    prometheus.wait_value(agent_200, before[0] + 2.0, up).await.unwrap();
    prometheus.wait_value(agent_observed, before[1] + 2.0, up).await.unwrap();
    prometheus.wait_value(hits, before[3] + 2.0, up).await.unwrap();
    let sts_after = prometheus.value(sts_ok).unwrap().unwrap_or(0.0);
    assert!(sts_after >= 1.0 && sts_after <= before[2] + 1.0, "STS calls {} -> {sts_after}", before[2]);
    assert_eq!(
        prometheus.value("sum(imdsgate_server_request_duration_seconds_count)").unwrap(),
        prometheus.value("sum(imdsgate_server_requests_total)").unwrap(),
        "every gRPC request observed once"
    );

    // The rest of the labelled families, the way users meet them: a refusal (no role), a denial
    // (a role the namespace does not permit), other metadata, an address no pod owns, an
    // admission review, and a pod deleted while its credentials are cached (a revocation).
    assert_ne!(bed.imds_get(bed.pod("team-a/plain"), CREDENTIALS).0, 200);
    let rogue = "/latest/meta-data/iam/security-credentials/admin";
    assert_ne!(bed.imds_get(bed.pod("team-a/rogue"), rogue).0, 200);
    let region = "/latest/meta-data/placement/region";
    assert_eq!(bed.imds_get(bed.pod("team-a/web"), region).0, 200);
    assert_ne!(bed.imds_get(bed.pod("ghost/stranger"), CREDENTIALS).0, 200);
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a", "operation": "CREATE", "userInfo": {"username": "alice"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "x", "namespace": "team-a", "annotations": {"iam.amazonaws.com/role": "admin"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]}}}
    });
    let webhook = bed.webhook.expect("webhook listener");
    let answer = run(Command::new("curl").args([
        "-sk",
        "-H",
        "content-type: application/json",
        "--data",
        &review.to_string(),
        &format!("https://{webhook}/validate/pods"),
    ]))
    .unwrap();
    assert!(answer.contains("\"allowed\":false"), "{answer}");
    bed.cluster.kubectl(&["-n", "team-a", "delete", "pod", "web", "--wait=false"]).unwrap();
    prometheus.wait_value("sum(imdsgate_agent_revocations_total)", 1.0, up).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // one more scrape of everything

    // Every documented metric is exposed (metadata), and every series carries exactly the
    // documented labels. Families with labels exist once something happened to them; those this
    // bed cannot provoke are named here.
    let never_provoked = ["imdsgate_server_cache_stale_served_total"];
    let metadata = prometheus.api("/api/v1/metadata", &[]).unwrap();
    for (metric, labels) in documented_metrics() {
        let family = metric.strip_suffix("_total").unwrap_or(&metric);
        assert!(metadata.get(family).is_some(), "{family} ({metric}) is documented but not exposed");
        let sample_name = if metric.ends_with("_seconds") && metadata[family][0]["type"] == "histogram" {
            format!("{metric}_count")
        } else {
            metric.clone()
        };
        let series = prometheus.api("/api/v1/series", &[("match[]", &sample_name)]).unwrap();
        let series = series.as_array().unwrap();
        if series.is_empty() {
            assert!(
                never_provoked.contains(&metric.as_str()) || labels.is_empty(),
                "{metric}: no series although the test provoked it"
            );
            continue;
        }
        for s in series {
            assert_eq!(label_names(s), labels, "{metric}: labels of {s}");
        }
    }

    // Every target of every dashboard panel is a valid query, and the main panels have data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(files("grafana-dashboard.json")).unwrap()).unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s")
                .replace("$__range", "1h");
            prometheus.query(&expr).unwrap_or_else(|e| panic!("panel {}: {e:#}", panel["title"]));
            queries += 1;
        }
    }
    assert!(queries > 20, "{queries} dashboard queries");
    for main in [
        "sum by (route) (rate(imdsgate_agent_requests_total[1m]))",
        "sum by (result) (rate(imdsgate_server_sts_calls_total[1m]))",
        "sum(imdsgate_agent_pods_indexed)",
    ] {
        assert!(!prometheus.query(main).unwrap().is_empty(), "{main} has no data");
    }

    // The alert rules load into a real Prometheus and evaluate against real series without error;
    // nothing fires on a healthy bed.
    let rules = prometheus.api("/api/v1/rules", &[]).unwrap();
    let mut evaluated = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{}: {}", rule["name"], rule["lastError"]);
            assert_ne!(
                rule["state"], "firing",
                "{} fires on a healthy bed: {}",
                rule["name"], rule["alerts"]
            );
            evaluated += 1;
        }
    }
    assert!(evaluated >= 10, "{evaluated} rules loaded");

    if let Ok(png) = std::env::var("IMDSGATE_RENDER_DASHBOARD") {
        render_dashboard(&bed, &prometheus, &png).await;
    }
}

/// Not a test: with IMDSGATE_RENDER_DASHBOARD=<file.png>, keeps pods asking for five minutes (a
/// worker every 50 ms, pods without a permitted role now and then, the aws CLI in a fresh process
/// every few seconds) and renders the dashboard's main panels from this Prometheus (the picture in
/// the README).
async fn render_dashboard(bed: &AgentBed, prometheus: &Prometheus, png: &str) {
    let start = std::time::Instant::now();
    let mut round = 0u64;
    while start.elapsed() < Duration::from_secs(300) {
        bed.imds_get(bed.pod("team-a/worker"), CREDENTIALS);
        if round.is_multiple_of(10) {
            bed.imds_get(bed.pod("team-a/plain"), CREDENTIALS);
            bed.imds_get(bed.pod("team-a/rogue"), "/latest/meta-data/iam/security-credentials/admin");
        }
        if round.is_multiple_of(60) {
            bed.aws_cli(bed.pod("team-a/worker"));
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run(Command::new("bash").args([
        &workspace_root().join("scripts/render-dashboard.sh").to_string_lossy(),
        "--prometheus",
        &prometheus.url,
        "--range",
        "5m",
        "--out",
        png,
    ]))
    .unwrap();
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    if !e2e_enabled("alert_rules_pass_promtool_check_and_unit_tests") {
        return;
    }
    let promtool = tool_bin("promtool").unwrap();
    let out =
        run(Command::new(&promtool).args(["check", "rules"]).arg(files("prometheus-rules.yaml"))).unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "prometheus-rules.test.yaml"])
        .current_dir(files("")))
    .unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
}
