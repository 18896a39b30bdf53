//! A real Prometheus (built by `scripts/tool-bins.sh`) scraping the test bed: started on a free
//! loopback port with a scrape configuration and rule files, queried through its HTTP API with
//! curl, stopped and its data removed on drop.

use crate::process::{ChildGuard, free_port, run};
use crate::tools::tool_bin;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub struct Prometheus {
    _child: ChildGuard,
    pub url: String,
    _dir: TempDir,
}

/// One scrape job: a name and the `host:port` targets it scrapes.
pub struct Job<'a> {
    pub name: &'a str,
    pub targets: Vec<String>,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second and evaluating `rule_files` every second;
    /// returns once it answers `/-/ready`.
    pub async fn start(jobs: &[Job<'_>], rule_files: &[PathBuf]) -> Result<Prometheus> {
        let dir = tempfile::Builder::new().prefix("imdsgate-prometheus-").tempdir()?;
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": rule_files,
            "scrape_configs": jobs.iter().map(|j| serde_json::json!({
                "job_name": j.name,
                "static_configs": [{"targets": j.targets}],
            })).collect::<Vec<_>>(),
        });
        // JSON is YAML.
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_string_pretty(&config)?)?;
        let port = free_port()?;
        let child = ChildGuard::spawn(
            "prometheus",
            Command::new(tool_bin("prometheus")?)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn"),
            &dir.path().join("prometheus.log"),
        )?;
        let prometheus = Prometheus { _child: child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new("curl")
                .args(["-sf", "-m", "2", &format!("{}/-/ready", prometheus.url)])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 60s; its log:\n{}", prometheus._child.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// GET an API path with URL-encoded parameters; the `data` of a successful answer, or the
    /// error Prometheus gave.
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sG", "-m", "10", &format!("{}{path}", self.url)]);
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let body: Value = serde_json::from_str(&run(&mut cmd)?).context("prometheus answer is not JSON")?;
        if body["status"] != "success" {
            bail!("{path} {params:?}: {} {}", body["errorType"], body["error"]);
        }
        Ok(body["data"].clone())
    }

    /// An instant query's result vector.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/query", &[("query", promql)])?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query that yields one sample; `None` when it yields none.
    pub fn value(&self, promql: &str) -> Result<Option<f64>> {
        let result = self.query(promql)?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
            many => bail!("{promql} yields {} series: {many:?}", many.len()),
        }
    }

    /// Waits until `promql` yields exactly `want` (scrapes are every second).
    pub async fn wait_value(&self, promql: &str, want: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.value(promql)?;
            if got == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{promql} is {got:?}, not {want}, after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
