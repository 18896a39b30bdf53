//! The gRPC contract between the imdsgate agent and server (package `imdsgate.v1`), generated at
//! build time from `proto/imdsgate/v1/credentials.proto`, and the stable error reasons both sides
//! agree on.
#![forbid(unsafe_code)]

/// Generated messages, client and server for `imdsgate.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("imdsgate.v1");
}

/// The ASCII metadata key that carries an error's stable reason next to the gRPC status code.
pub const REASON_METADATA_KEY: &str = "imdsgate-reason";

/// The metadata key that carries the agent's projected ServiceAccount token.
pub const AUTHORIZATION_METADATA_KEY: &str = "authorization";

/// Temporary AWS credentials as the server issues them and the agent hands them to a pod. The
/// secret and token never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: std::time::SystemTime,
    pub issued_at: std::time::SystemTime,
    pub role_arn: String,
    pub account_id: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Whether these may still be handed out at `now` while fresh ones can be had.
    pub fn fresh_at(&self, now: std::time::SystemTime) -> bool {
        let lifetime = self.expiration.duration_since(self.issued_at).unwrap_or_default();
        self.expiration.duration_since(now).is_ok_and(|left| left >= min_remaining(lifetime))
    }

    /// Whether these still work at `now` at all.
    pub fn valid_at(&self, now: std::time::SystemTime) -> bool {
        self.expiration > now
    }
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn system_time(t: Option<prost_types::Timestamp>) -> std::time::SystemTime {
    t.map(|t| {
        std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(t.seconds).unwrap_or(0),
                u32::try_from(t.nanos).unwrap_or(0),
            )
    })
    .unwrap_or(std::time::UNIX_EPOCH)
}

impl From<&Credentials> for v1::GetCredentialsResponse {
    fn from(c: &Credentials) -> Self {
        v1::GetCredentialsResponse {
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.secret_access_key.clone(),
            session_token: c.session_token.clone(),
            expiration: Some(timestamp(c.expiration)),
            issued_at: Some(timestamp(c.issued_at)),
            role_arn: c.role_arn.clone(),
            account_id: c.account_id.clone(),
        }
    }
}

impl From<v1::GetCredentialsResponse> for Credentials {
    fn from(r: v1::GetCredentialsResponse) -> Self {
        Credentials {
            access_key_id: r.access_key_id,
            secret_access_key: r.secret_access_key,
            session_token: r.session_token,
            expiration: system_time(r.expiration),
            issued_at: system_time(r.issued_at),
            role_arn: r.role_arn,
            account_id: r.account_id,
        }
    }
}

/// Credentials with less than this left are not handed to pods while fresh ones can be had:
/// 15 minutes (botocore, Java and Go SDKs refresh within 15 minutes of expiry and would otherwise
/// call on every request), or a quarter of a shorter session. Server and agent share this rule, so
/// the agent asks again exactly when the server has fresh credentials.
pub fn min_remaining(lifetime: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(15 * 60).min(lifetime / 4)
}

/// Stable, machine-readable reasons for refusals. The agent acts on these, so they never change
/// meaning; new ones may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    PodNotFound,
    NoRole,
    RoleMismatch,
    RoleInvalid,
    NamespaceForbids,
    WrongNode,
    AgentUnauthenticated,
    PodUidMismatch,
    InvalidArgument,
    StsUnavailable,
    StsDenied,
    Internal,
    /// Only in revocations: the pod's role, session-name or external-id annotation changed.
    SessionChanged,
    /// The pod's session-name annotation cannot be used as written.
    SessionNameInvalid,
    /// The pod object is one its node could have written (a mirror pod), in a namespace that
    /// does not let such pods have roles.
    MirrorPod,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::PodNotFound,
        Reason::NoRole,
        Reason::RoleMismatch,
        Reason::RoleInvalid,
        Reason::NamespaceForbids,
        Reason::WrongNode,
        Reason::AgentUnauthenticated,
        Reason::PodUidMismatch,
        Reason::InvalidArgument,
        Reason::StsUnavailable,
        Reason::StsDenied,
        Reason::Internal,
        Reason::SessionChanged,
        Reason::SessionNameInvalid,
        Reason::MirrorPod,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodNotFound => "POD_NOT_FOUND",
            Reason::NoRole => "NO_ROLE",
            Reason::RoleMismatch => "ROLE_MISMATCH",
            Reason::RoleInvalid => "ROLE_INVALID",
            Reason::NamespaceForbids => "NAMESPACE_FORBIDS",
            Reason::WrongNode => "WRONG_NODE",
            Reason::AgentUnauthenticated => "AGENT_UNAUTHENTICATED",
            Reason::PodUidMismatch => "POD_UID_MISMATCH",
            Reason::InvalidArgument => "INVALID_ARGUMENT",
            Reason::StsUnavailable => "STS_UNAVAILABLE",
            Reason::StsDenied => "STS_DENIED",
            Reason::Internal => "INTERNAL",
            Reason::SessionChanged => "SESSION_CHANGED",
            Reason::SessionNameInvalid => "SESSION_NAME_INVALID",
            Reason::MirrorPod => "MIRROR_POD",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The gRPC code each reason travels with.
    pub fn code(self) -> tonic::Code {
        match self {
            Reason::PodNotFound | Reason::NoRole => tonic::Code::NotFound,
            Reason::RoleMismatch
            | Reason::RoleInvalid
            | Reason::NamespaceForbids
            | Reason::WrongNode
            | Reason::SessionNameInvalid
            | Reason::MirrorPod
            | Reason::StsDenied => tonic::Code::PermissionDenied,
            Reason::AgentUnauthenticated => tonic::Code::Unauthenticated,
            Reason::PodUidMismatch | Reason::SessionChanged => tonic::Code::FailedPrecondition,
            Reason::InvalidArgument => tonic::Code::InvalidArgument,
            Reason::StsUnavailable => tonic::Code::Unavailable,
            Reason::Internal => tonic::Code::Internal,
        }
    }

    /// Builds the status for this reason, carrying the reason in metadata.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        let mut status = tonic::Status::new(self.code(), message);
        status
            .metadata_mut()
            .insert(REASON_METADATA_KEY, tonic::metadata::MetadataValue::from_static(self.as_str()));
        status
    }

    /// Reads the reason back from a status, if the server sent one.
    pub fn of(status: &tonic::Status) -> Option<Reason> {
        status.metadata().get(REASON_METADATA_KEY).and_then(|v| v.to_str().ok()).and_then(Reason::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_a_status() {
        for reason in Reason::ALL {
            let status = reason.status("why");
            assert_eq!(status.code(), reason.code());
            assert_eq!(Reason::of(&status), Some(reason));
        }
    }

    #[test]
    fn credentials_survive_the_wire() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 123_000_000);
        let c = Credentials {
            access_key_id: "ASIA".into(),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration: now + std::time::Duration::from_secs(3600),
            issued_at: now,
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            account_id: "123456789012".into(),
        };
        assert_eq!(Credentials::from(v1::GetCredentialsResponse::from(&c)), c);
        assert!(!format!("{c:?}").contains("secret"), "Debug hides the secret");
        assert!(c.fresh_at(now + std::time::Duration::from_secs(45 * 60)));
        assert!(!c.fresh_at(now + std::time::Duration::from_secs(46 * 60)), "under 15 minutes left");
        assert!(c.valid_at(now + std::time::Duration::from_secs(59 * 60)));
    }

    #[test]
    fn reason_strings_are_unique() {
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    /// The error table in credentials.proto lists every reason with the gRPC code it travels
    /// with, and names no reason the code does not have.
    #[test]
    fn the_proto_error_table_matches_the_reasons() {
        let proto = include_str!("../proto/imdsgate/v1/credentials.proto");
        let code_name = |code: tonic::Code| match code {
            tonic::Code::NotFound => "NOT_FOUND",
            tonic::Code::PermissionDenied => "PERMISSION_DENIED",
            tonic::Code::Unauthenticated => "UNAUTHENTICATED",
            tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
            tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
            tonic::Code::Unavailable => "UNAVAILABLE",
            tonic::Code::Internal => "INTERNAL",
            other => panic!("no proto name for {other:?}"),
        };
        let rows: Vec<Vec<&str>> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("//   "))
            .map(|row| row.split_whitespace().take(2).collect())
            .filter(|cells: &Vec<&str>| {
                cells.len() == 2 && cells[0].chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect();
        for reason in Reason::ALL {
            assert!(
                rows.contains(&vec![reason.as_str(), code_name(reason.code())]),
                "credentials.proto's error table lacks {} {}",
                reason.as_str(),
                code_name(reason.code())
            );
        }
        assert_eq!(
            rows.len(),
            Reason::ALL.len(),
            "credentials.proto's table has rows no reason has: {rows:?}"
        );
        for word in proto
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .filter(|w| w.contains('_') && !w.starts_with('_') && !w.ends_with('_'))
        {
            let known = Reason::parse(word).is_some()
                || ["FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"]
                    .contains(&word);
            assert!(known, "credentials.proto names {word}, which is no reason");
        }
    }
}
