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
}

impl Reason {
    pub const ALL: [Reason; 12] = [
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
            | Reason::StsDenied => tonic::Code::PermissionDenied,
            Reason::AgentUnauthenticated => tonic::Code::Unauthenticated,
            Reason::PodUidMismatch => tonic::Code::FailedPrecondition,
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
    fn reason_strings_are_unique() {
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
