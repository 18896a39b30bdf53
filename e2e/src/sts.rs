//! The STS emulator for one test: `moto` in server mode from the project's virtualenv, on a free
//! loopback port, with helpers to create IAM roles and to build AWS SDK clients against it.

use crate::process::{ChildGuard, free_port, run, wait_for_port};
use crate::tools::venv_bin;
use anyhow::{Context, Result};
use aws_credential_types::Credentials;
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// The account moto answers for.
pub const ACCOUNT_ID: &str = "123456789012";
/// The region the test bed uses.
pub const REGION: &str = "us-east-1";

/// A running moto server; stopped on drop.
pub struct Sts {
    process: ChildGuard,
    endpoint: String,
    port: u16,
    _dir: TempDir,
}

impl Sts {
    /// Starts moto and waits until it accepts connections.
    pub async fn start() -> Result<Sts> {
        let dir = tempfile::Builder::new().prefix("imdsgate-e2e-sts-").tempdir()?;
        let port = free_port()?;
        let mut process = ChildGuard::spawn(
            "moto_server",
            Command::new(venv_bin("moto_server")?)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_ACCOUNT_ID", ACCOUNT_ID),
            &dir.path().join("moto.log"),
        )?;
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30))
            .await
            .with_context(|| format!("moto did not start:\n{}", process.log_tail(20)))?;
        process.check_running()?;
        Ok(Sts { process, endpoint: format!("http://127.0.0.1:{port}"), port, _dir: dir })
    }

    /// The endpoint URL (`http://127.0.0.1:<port>`), for `AWS_ENDPOINT_URL_STS` or `--sts-endpoint`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The moto server's process id (tests stop it to simulate an STS outage).
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.process
    }

    /// Creates an IAM role that anyone in the account may assume (or finds the one of that name);
    /// returns its ARN.
    pub fn create_role(&self, name: &str) -> Result<String> {
        let script = r#"
import json, sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": ["sts:AssumeRole", "sts:TagSession"]}]}
try:
    role = iam.create_role(RoleName=sys.argv[2], AssumeRolePolicyDocument=json.dumps(trust))
except iam.exceptions.EntityAlreadyExistsException:  # pods share roles: the second one reuses it
    role = iam.get_role(RoleName=sys.argv[2])
print(role["Role"]["Arn"])
"#;
        let out = run(Command::new(venv_bin("python")?).args(["-c", script, &self.endpoint, name]))?;
        Ok(out.trim().to_string())
    }

    /// An STS client against the emulator with the given credentials.
    pub fn client(&self, credentials: Credentials) -> aws_sdk_sts::Client {
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(credentials)
            .build();
        aws_sdk_sts::Client::from_conf(config)
    }

    /// An STS client with the emulator's static root credentials (what the server would hold).
    pub fn root_client(&self) -> aws_sdk_sts::Client {
        self.client(Credentials::new("testing", "testing", None, None, "imdsgate-e2e"))
    }
}
