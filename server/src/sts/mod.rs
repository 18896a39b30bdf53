//! STS through aws-sdk-sts: AssumeRole for pods (optionally through an intermediate role), the
//! server's own identity for `--role-base-arn-autodetect`, error classification (refused versus
//! unreachable), a cap on the call rate that serves calls pods wait on first, and metrics per call;
//! [`base_arn`] turns the server's identity into the role base ARN.

pub mod base_arn;

use crate::authz::session::SessionKey;
use crate::credential_cache::{AssumeRole, StsError};
use crate::metrics::{Metrics, StsLabels, StsResult};
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::types::Tag;
use futures::FutureExt;
use futures::future::BoxFuture;
use imdsgate_core::latch::Latch;
use imdsgate_proto::Credentials;
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
    limiter: StsLimiter,
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
        Sts { client: aws_sdk_sts::Client::new(&sdk), limiter: StsLimiter::new(config.max_rps), metrics }
    }

    /// The server's own identity ARN (GetCallerIdentity).
    pub async fn caller_arn(&self) -> Result<String, StsError> {
        let out = self.client.get_caller_identity().send().await.map_err(classify)?;
        out.arn()
            .map(str::to_string)
            .ok_or_else(|| StsError::Unavailable("GetCallerIdentity returned no ARN".into()))
    }

    async fn call(
        &self,
        key: SessionKey,
        duration: Duration,
        urgency: Latch,
    ) -> Result<Credentials, StsError> {
        self.limiter.acquire(&urgency).await?;
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
                Ok(Credentials {
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
            Err(StsError::Unavailable(_) | StsError::Deferred) => StsResult::Unavailable,
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
        urgency: Latch,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let sts = self.clone();
        async move { sts.call(key, duration, urgency).await }.boxed()
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

type Gcra = governor::DefaultDirectRateLimiter;

/// How long a background call waits for spare STS budget before it gives way.
const BACKGROUND_PATIENCE: Duration = Duration::from_secs(30);
/// How often a waiting background call looks for spare budget.
const BACKGROUND_POLL: Duration = Duration::from_millis(100);

/// Caps the STS call rate (GCRA, bursts up to one second's worth). Calls a pod waits on queue for
/// the full rate; background calls (prefetch, refresh) run only while the rate has room right
/// now, and at most at half of it, so a flood of background work never delays a waiting pod. A
/// background call that a pod joins becomes urgent and queues like one.
pub struct StsLimiter {
    all: Option<Gcra>,
    background: Option<Gcra>,
}

impl StsLimiter {
    /// `max_rps` 0: no limit.
    pub fn new(max_rps: f64) -> StsLimiter {
        let quota = |rps: f64| {
            let burst =
                std::num::NonZeroU32::new((rps.floor() as u32).max(1)).unwrap_or(std::num::NonZeroU32::MIN);
            governor::Quota::with_period(Duration::from_secs_f64(1.0 / rps)).map(|q| q.allow_burst(burst))
        };
        if max_rps <= 0.0 || !max_rps.is_finite() {
            return StsLimiter { all: None, background: None };
        }
        StsLimiter {
            all: quota(max_rps).map(governor::RateLimiter::direct),
            background: quota(max_rps / 2.0).map(governor::RateLimiter::direct),
        }
    }

    /// Waits for a turn: at once if urgent and within the rate; `Deferred` if a background call
    /// found no room for [`BACKGROUND_PATIENCE`].
    pub async fn acquire(&self, urgency: &Latch) -> Result<(), StsError> {
        let Some(all) = &self.all else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + BACKGROUND_PATIENCE;
        while !urgency.is_set() {
            if self.background.as_ref().is_none_or(|b| b.check().is_ok()) && all.check().is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StsError::Deferred);
            }
            let jitter = BACKGROUND_POLL.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = tokio::time::sleep(BACKGROUND_POLL + jitter) => {}
                _ = urgency.wait() => {}
            }
        }
        loop {
            match all.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urgent_calls_take_the_burst_then_are_paced() {
        let limiter = StsLimiter::new(20.0);
        let urgent = Latch::new(true);
        let start = std::time::Instant::now();
        for _ in 0..25 {
            limiter.acquire(&urgent).await.unwrap();
        }
        // 20 at once, then 5 more at 20 per second: at least 200 ms (a floor, not a speed claim).
        assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn background_calls_never_take_what_waiting_pods_need() {
        let limiter = StsLimiter::new(20.0);
        let background = Latch::new(false);
        // At most half the burst goes to background work...
        let mut granted = 0;
        for _ in 0..20 {
            if tokio::time::timeout(Duration::from_millis(1), limiter.acquire(&background)).await.is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 10, "background work gets half the burst");
        // ...so waiting pods still find the other half at once.
        let urgent = Latch::new(true);
        for _ in 0..10 {
            tokio::time::timeout(Duration::from_millis(50), limiter.acquire(&urgent))
                .await
                .expect("a waiting pod is not queued behind background work")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_waiting_background_call_made_urgent_queues_like_one() {
        let limiter = Arc::new(StsLimiter::new(2.0));
        let urgent = Latch::new(true);
        limiter.acquire(&urgent).await.unwrap();
        limiter.acquire(&urgent).await.unwrap(); // the burst is spent
        let background = Latch::new(false);
        let call = {
            let (limiter, background) = (limiter.clone(), background.clone());
            tokio::spawn(async move { limiter.acquire(&background).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!call.is_finished(), "no room: the background call waits");
        background.set();
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("served at the pace")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_background_call_that_finds_no_room_gives_way() {
        let limiter = StsLimiter::new(1.0);
        limiter.acquire(&Latch::new(true)).await.unwrap();
        // Real time does not pass under a paused clock, so the rate never refills.
        assert_eq!(limiter.acquire(&Latch::new(false)).await, Err(StsError::Deferred));
    }

    #[tokio::test]
    async fn zero_means_unlimited() {
        let limiter = StsLimiter::new(0.0);
        for _ in 0..1000 {
            limiter.acquire(&Latch::new(false)).await.unwrap();
        }
    }
}
