//! `--role-base-arn-autodetect`: the role base ARN from the server's own identity
//! (GetCallerIdentity), retried in the background until it succeeds.

use crate::authz::authorizer::Authorizer;
use crate::credential_cache::StsError;
use crate::metrics::Metrics;
use crate::sts::Sts;
use imdsgate_core::backoff::Backoff;
use imdsgate_core::latch::Latch;
use imdsgate_core::role::BaseArn;
use std::sync::Arc;
use std::time::Duration;

/// Detection retries GetCallerIdentity after this long, doubling up to [`DETECT_RETRY_MAX`].
const DETECT_RETRY_FIRST: Duration = Duration::from_secs(1);
const DETECT_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long the start waits for the first attempt before it goes on without the base.
const DETECT_FIRST_WAIT: Duration = Duration::from_secs(5);

/// Starts detection in the background and waits (a few seconds at most) for its first attempt.
/// Detection goes on until it succeeds: a server whose own AWS credentials fail still starts,
/// serves the webhook and says why pods get nothing, rather than crash-loop. Its first attempt is
/// given a few seconds, so that normally the base is known before the first request.
pub async fn start_detecting(sts: Arc<Sts>, authorizer: Arc<Authorizer>, metrics: Metrics) {
    let first_done = Latch::default();
    tokio::spawn(detect_base_arn(sts, authorizer, metrics, first_done.clone()));
    let _ = tokio::time::timeout(DETECT_FIRST_WAIT, first_done.wait()).await;
}

/// What the server's log says when it cannot learn its own identity (see the README's "The
/// server's own credentials").
const SERVER_CREDENTIALS_HINT: &str = "the server's own AWS credentials (or STS) fail, so it cannot determine its role base ARN (--role-base-arn-autodetect); pods get no credentials for role names until it can. Give the server credentials pods cannot reach: IRSA for its ServiceAccount (aws.credentialsSource=irsa), a metadata hop limit of 2 on the server node group only (instanceProfile), or server.hostNetwork=true; or set --role-base-arn";

/// `--role-base-arn-autodetect`: the base from the server's own identity (GetCallerIdentity),
/// retried with a capped exponential backoff until it succeeds; each failure is logged and is
/// what requests needing the base are told meanwhile. `first_done` is set when the first attempt
/// has ended, either way.
async fn detect_base_arn(sts: Arc<Sts>, authorizer: Arc<Authorizer>, metrics: Metrics, first_done: Latch) {
    let mut backoff = Backoff::new(DETECT_RETRY_FIRST, DETECT_RETRY_MAX);
    loop {
        let detected = match sts.caller_arn().await {
            Ok(arn) => BaseArn::from_caller_arn(&arn).map_err(|e| format!("GetCallerIdentity: {e}")),
            Err(StsError::Denied(why)) => Err(format!("STS refused GetCallerIdentity: {why}")),
            Err(StsError::Unavailable(why)) => Err(format!("GetCallerIdentity failed: {why}")),
            Err(StsError::Deferred) => Err("GetCallerIdentity was deferred".into()),
        };
        match detected {
            Ok(base) => {
                tracing::info!(base = base.as_str(), "role base ARN detected");
                authorizer.base_arn.detected(base);
                metrics.aws_identity_ready.set(1);
                first_done.set();
                return;
            }
            Err(cause) => {
                let retry = backoff.failed();
                tracing::error!(%cause, retry_in = ?retry, "{SERVER_CREDENTIALS_HINT}");
                authorizer.base_arn.failed(cause);
                first_done.set();
                tokio::time::sleep(retry).await;
            }
        }
    }
}
