//! Role resolution, compatible with kiam and kube2iam: the pod annotation holds a role name (joined
//! to the base ARN, a leading `/` trimmed) or a full role ARN; a request matches when it names the
//! role's last path segment. Every part is held to IAM's own character rules (names
//! `[\w+=,.@-]{1,64}`, paths `/` or `/…/` of printable ASCII up to 512 characters, a 12-digit
//! account, a lowercase partition), so an ARN that reaches a log line, an STS call or a session
//! name never carries a space, a control character or anything outside ASCII.

use std::fmt;

/// A parsed IAM role ARN: `arn:<partition>:iam::<account>:role/<path/><name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoleArn {
    arn: String,
    partition_end: usize,
    account: String,
    name_start: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error(
        "role {0:?} ends in `/`: name a role as `app`, `team/app` or a full role ARN (IAM role names cannot end in `/`)"
    )]
    TrailingSlash(String),
    #[error("{0:?} is not an IAM role ARN (arn:<partition>:iam::<account>:role/<name>)")]
    NotRoleArn(String),
    #[error("{0:?} has no valid partition (lowercase letters, digits and -, e.g. aws, aws-cn)")]
    BadPartition(String),
    #[error("{0:?} has no valid account (12 digits)")]
    BadAccount(String),
    #[error(
        "{0:?} has no valid role path (IAM paths are / or /…/ of printable ASCII without spaces or empty segments, at most 512 characters)"
    )]
    BadPath(String),
    #[error("role {0:?} is a name, but the server has no --role-base-arn to join it to")]
    NoBaseArn(String),
    #[error(
        "role name {0:?} is not valid (IAM names use letters, digits and +=,.@_- and at most 64 characters)"
    )]
    BadName(String),
    #[error("base ARN {0:?} must look like arn:<partition>:iam::<account>:role/ (optionally with a path)")]
    BadBase(String),
}

/// Longest IAM path (`/…/`), as IAM limits it.
const MAX_PATH: usize = 512;

/// Where the parts of a checked role ARN lie: [`RoleArn::check`], without allocating.
struct ArnParts {
    partition_end: usize,
    account_start: usize,
    name_start: usize,
}

impl RoleArn {
    pub fn parse(arn: &str) -> Result<RoleArn, RoleError> {
        let parts = RoleArn::check(arn)?;
        Ok(RoleArn {
            arn: arn.to_string(),
            partition_end: parts.partition_end,
            account: arn[parts.account_start..parts.account_start + 12].to_string(),
            name_start: parts.name_start,
        })
    }

    /// The checks of [`RoleArn::parse`], allocating nothing unless the ARN is refused (the agent
    /// reads a pod's annotation on every request).
    fn check(arn: &str) -> Result<ArnParts, RoleError> {
        let bad = || RoleError::NotRoleArn(arn.to_string());
        let rest = arn.strip_prefix("arn:").ok_or_else(bad)?;
        let (partition, rest) = rest.split_once(':').ok_or_else(bad)?;
        let rest = rest.strip_prefix("iam::").ok_or_else(bad)?;
        let (account, resource) = rest.split_once(':').ok_or_else(bad)?;
        let path_and_name = resource.strip_prefix("role/").ok_or_else(bad)?;
        let (inner_path, name) = match path_and_name.rsplit_once('/') {
            Some((inner_path, name)) => (Some(inner_path), name),
            None => (None, path_and_name),
        };
        if !valid_partition(partition) {
            return Err(RoleError::BadPartition(arn.to_string()));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RoleError::BadAccount(arn.to_string()));
        }
        // The IAM path is `/` plus `inner_path/` when there is one (`role//name` has an empty one).
        if inner_path.is_some_and(|inner| !valid_inner_path(inner)) {
            return Err(RoleError::BadPath(arn.to_string()));
        }
        if !valid_role_name(name) {
            return Err(RoleError::BadName(arn.to_string()));
        }
        let partition_end = 4 + partition.len();
        Ok(ArnParts {
            partition_end,
            account_start: partition_end + ":iam::".len(),
            name_start: arn.len() - name.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    pub fn partition(&self) -> &str {
        &self.arn[4..self.partition_end]
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The role's name: the last path segment.
    pub fn name(&self) -> &str {
        &self.arn[self.name_start..]
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// IAM role names: `[\w+=,.@-]+`, 1 to 64 characters.
pub fn valid_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// The inside of an IAM path `/<inner>/`: printable ASCII (`\x21`-`\x7E`, so no space and no
/// control character), no empty segment, and the whole path at most 512 characters.
fn valid_inner_path(inner: &str) -> bool {
    inner.len() + 2 <= MAX_PATH
        && inner.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && inner.split('/').all(|segment| !segment.is_empty())
}

/// AWS partitions: `aws`, `aws-cn`, `aws-us-gov`, `aws-iso-b`…: lowercase letters, digits and
/// inner dashes, at most 32 characters.
fn valid_partition(partition: &str) -> bool {
    !partition.is_empty()
        && partition.len() <= 32
        && partition.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && partition.as_bytes()[0].is_ascii_lowercase()
        && !partition.ends_with('-')
}

/// The base that role names are joined to: `arn:<partition>:iam::<account>:role/` plus an optional
/// path, always ending in `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseArn(String);

impl BaseArn {
    pub fn parse(base: &str) -> Result<BaseArn, RoleError> {
        let mut base = base.trim().to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        // A base is valid when joining any valid name makes a valid role ARN.
        RoleArn::parse(&format!("{base}x")).map_err(|_| RoleError::BadBase(base.clone()))?;
        Ok(BaseArn(base))
    }

    /// The base for the account and partition of `identity` (an ARN from GetCallerIdentity).
    pub fn from_caller_arn(identity: &str) -> Result<BaseArn, RoleError> {
        let mut parts = identity.splitn(6, ':');
        let (Some("arn"), Some(partition), Some(_service), Some(_region), Some(account)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RoleError::BadBase(identity.to_string()));
        };
        BaseArn::parse(&format!("arn:{partition}:iam::{account}:role/"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The IAM role name a pod's role annotation names (its last path segment), or why it names none.
/// The annotation is a full role ARN or a name with an optional path (`app`, `team/app`, a leading
/// `/` allowed); a trailing `/` names no role (IAM names cannot end in one, and guessing is how a
/// pod would get a role nobody wrote). This is the one reading of the annotation: the agent's
/// listing, the server's decision, the webhook and `explain` all go through it, so they agree on
/// every spelling. The base ARN a name is joined to is not needed here ([`resolve`] adds it).
pub fn role_name(annotation: &str) -> Result<&str, RoleError> {
    let annotation = annotation.trim();
    if annotation.starts_with("arn:") {
        let parts = RoleArn::check(annotation)?;
        return Ok(&annotation[parts.name_start..]);
    }
    if annotation.ends_with('/') {
        return Err(RoleError::TrailingSlash(annotation.to_string()));
    }
    let path_and_name = annotation.trim_start_matches('/');
    let (inner_path, name) = match path_and_name.rsplit_once('/') {
        Some((inner_path, name)) => (Some(inner_path), name),
        None => (None, path_and_name),
    };
    if !valid_role_name(name) {
        return Err(RoleError::BadName(annotation.to_string()));
    }
    if inner_path.is_some_and(|inner| !valid_inner_path(inner)) {
        return Err(RoleError::BadPath(annotation.to_string()));
    }
    Ok(name)
}

/// Resolves a pod's role annotation to a role ARN: [`role_name`]'s reading, a name joined to
/// `base`.
pub fn resolve(annotation: &str, base: Option<&BaseArn>) -> Result<RoleArn, RoleError> {
    role_name(annotation)?;
    let annotation = annotation.trim();
    if annotation.starts_with("arn:") {
        return RoleArn::parse(annotation);
    }
    let base = base.ok_or_else(|| RoleError::NoBaseArn(annotation.to_string()))?;
    let path_and_name = annotation.trim_start_matches('/');
    // The base's own path counts towards IAM's limit on the whole path.
    RoleArn::parse(&format!("{}{path_and_name}", base.as_str())).map_err(|e| match e {
        RoleError::BadPath(_) => RoleError::BadPath(annotation.to_string()),
        _ => RoleError::BadName(annotation.to_string()),
    })
}

#[cfg(test)]
mod tests;
