//! STS through aws-sdk-sts: AssumeRole for pods (optionally through an intermediate role), the
//! server's own identity for `--role-base-arn-autodetect`, error classification (refused versus
//! unreachable), a cap on the call rate, and metrics per call.

use crate::credential_cache::{AssumeRole, Issued, StsError};
use crate::metrics::{Metrics, StsLabels, StsResult};
use crate::session::SessionKey;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::types::Tag;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// STS error codes that mean "refused" rather than "try again".
const REFUSALS: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "RegionDisabledException",
    "ValidationError",
    "InvalidParameterValue",
    "InvalidClientTokenId",
    "ExpiredToken",
];

/// How the server reaches STS.
#[derive(Clone, Debug, Default)]
pub struct StsConfig {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub intermediate_role: Option<String>,
    pub max_rps: f64,
}

/// AssumeRole against real STS (or anything speaking its API).
pub struct Sts {
    client: aws_sdk_sts::Client,
    limiter: RateLimiter,
    metrics: Metrics,
}

impl Sts {
    /// Builds the client from aws-config's default credential chain.
    pub async fn connect(config: &StsConfig, metrics: Metrics) -> Sts {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let mut sdk = loader.load().await;
        if let Some(role) = &config.intermediate_role {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role.clone())
                .session_name("imdsgate-server")
                .configure(&sdk)
                .build()
                .await;
            sdk = sdk
                .into_builder()
                .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(
                    provider,
                ))
                .build();
        }
        Sts { client: aws_sdk_sts::Client::new(&sdk), limiter: RateLimiter::new(config.max_rps), metrics }
    }

    /// The server's own identity ARN (GetCallerIdentity).
    pub async fn caller_arn(&self) -> Result<String, StsError> {
        let out = self.client.get_caller_identity().send().await.map_err(classify)?;
        out.arn()
            .map(str::to_string)
            .ok_or_else(|| StsError::Unavailable("GetCallerIdentity returned no ARN".into()))
    }

    async fn call(&self, key: SessionKey, duration: Duration) -> Result<Issued, StsError> {
        self.limiter.acquire().await;
        let started = Instant::now();
        let tags = (!key.tags.is_empty()).then(|| {
            key.tags
                .iter()
                .filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok())
                .collect::<Vec<_>>()
        });
        let result = self
            .client
            .assume_role()
            .role_arn(key.role_arn.as_str())
            .role_session_name(&key.session_name)
            .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX))
            .set_external_id(key.external_id.clone())
            .set_tags(tags)
            .send()
            .await
            .map_err(classify)
            .and_then(|out| {
                let creds = out
                    .credentials()
                    .ok_or_else(|| StsError::Unavailable("AssumeRole returned no credentials".into()))?;
                let expiration = SystemTime::try_from(*creds.expiration())
                    .map_err(|e| StsError::Unavailable(format!("bad expiration from STS: {e}")))?;
                Ok(Issued {
                    access_key_id: creds.access_key_id().to_string(),
                    secret_access_key: creds.secret_access_key().to_string(),
                    session_token: creds.session_token().to_string(),
                    expiration,
                    issued_at: SystemTime::now(),
                    role_arn: key.role_arn.to_string(),
                    account_id: key.role_arn.account().to_string(),
                })
            });
        let outcome = match &result {
            Ok(_) => StsResult::Success,
            Err(StsError::Denied(_)) => StsResult::Denied,
            Err(StsError::Unavailable(_)) => StsResult::Unavailable,
        };
        let labels = StsLabels { result: outcome };
        self.metrics.sts_calls.get_or_create(&labels).inc();
        self.metrics.sts_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        result
    }
}

impl AssumeRole for Arc<Sts> {
    fn assume_role(
        &self,
        key: SessionKey,
        duration: Duration,
    ) -> BoxFuture<'static, Result<Issued, StsError>> {
        let sts = self.clone();
        async move { sts.call(key, duration).await }.boxed()
    }
}

/// Sorts an SDK error into refused (the request itself is wrong or not allowed) or unavailable.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    err: SdkError<E, R>,
) -> StsError {
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown");
            let message = format!("{code}: {}", e.message().unwrap_or("no message"));
            if REFUSALS.contains(&code) { StsError::Denied(message) } else { StsError::Unavailable(message) }
        }
        _ => StsError::Unavailable(aws_smithy_types::error::display::DisplayErrorContext(&err).to_string()),
    }
}

/// Caps the STS call rate (GCRA: bursts up to one second's worth, then an even pace).
struct RateLimiter {
    interval: Option<Duration>,
    burst: u32,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    fn new(max_rps: f64) -> Self {
        let interval = (max_rps > 0.0).then(|| Duration::from_secs_f64(1.0 / max_rps));
        RateLimiter {
            interval,
            burst: (max_rps.floor() as u32).max(1),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn acquire(&self) {
        let Some(interval) = self.interval else { return };
        let mut tat = self.next.lock().await;
        let now = tokio::time::Instant::now();
        let start = (*tat).max(now);
        let allowed_at = start.checked_sub(interval * (self.burst - 1)).unwrap_or(now);
        if allowed_at > now {
            tokio::time::sleep_until(allowed_at).await;
        }
        *tat = start + interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_a_burst_then_paces() {
        let limiter = RateLimiter::new(5.0);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(1), "a burst of 5 passes at once");
        for _ in 0..10 {
            limiter.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1990) && elapsed <= Duration::from_millis(2010),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0.0);
        let start = tokio::time::Instant::now();
        for _ in 0..1000 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
