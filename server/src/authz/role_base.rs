//! The role base ARN as the server holds it: fixed by `--role-base-arn`, or detected from the
//! server's own identity (`sts::base_arn`) and unknown until then. The role grammar itself is
//! `imdsgate_core::role`, shared with the agent.

use imdsgate_core::role::BaseArn;
use std::fmt;
use std::sync::{Mutex, OnceLock};

/// The base ARN as the server holds it: given by `--role-base-arn` (or none), or, with
/// `--role-base-arn-autodetect`, detected from the server's own identity once GetCallerIdentity
/// succeeds — which may be long after start, while the server's own AWS credentials fail. Set at
/// most once; reading it is a plain load, no lock.
#[derive(Debug, Default)]
pub struct RoleBase {
    base: OnceLock<BaseArn>,
    /// Autodetection: `base` comes later; until then, why not (None: no answer yet).
    pending: Option<Mutex<Option<String>>>,
}

/// Why a base that is to be detected is not known yet; reads as the end of "the server has not
/// yet determined its role base ARN …".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasePending {
    /// The last GetCallerIdentity failure; None before the first one answered.
    pub cause: Option<String>,
}

impl fmt::Display for BasePending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Some(cause) => write!(f, "because its own AWS credentials failed: {cause}"),
            None => f.write_str(
                "(its first GetCallerIdentity, with its own AWS credentials, has not answered yet)",
            ),
        }
    }
}

impl RoleBase {
    /// A base known from the start (`--role-base-arn`), or none at all.
    pub fn fixed(base: Option<BaseArn>) -> RoleBase {
        RoleBase { base: base.map(OnceLock::from).unwrap_or_default(), pending: None }
    }

    /// A base to be detected ([`RoleBase::detected`]); unknown until then.
    pub fn detecting() -> RoleBase {
        RoleBase { base: OnceLock::new(), pending: Some(Mutex::new(None)) }
    }

    /// The base, if there is one (yet).
    pub fn get(&self) -> Option<&BaseArn> {
        self.base.get()
    }

    /// Why there is no base yet, when it is still to be detected: `None` when there simply is
    /// none (no `--role-base-arn`). Asked only after [`RoleBase::get`] found none.
    pub fn unknown_because(&self) -> Option<BasePending> {
        let pending = self.pending.as_ref()?;
        Some(BasePending { cause: pending.lock().unwrap_or_else(|e| e.into_inner()).clone() })
    }

    /// Detection failed (again): `cause` is what requests needing the base are told.
    pub fn failed(&self, cause: String) {
        if let Some(pending) = &self.pending {
            *pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(cause);
        }
    }

    /// The base is detected; later calls change nothing. Returns whether this call set it.
    pub fn detected(&self, base: BaseArn) -> bool {
        self.base.set(base).is_ok()
    }
}
