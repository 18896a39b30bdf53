//! Role resolution, compatible with kiam and kube2iam: the pod annotation holds a role name (joined
//! to the base ARN, a leading `/` trimmed) or a full role ARN; a request matches when it names the
//! role's last path segment. Every part is held to IAM's own character rules (names
//! `[\w+=,.@-]{1,64}`, paths `/` or `/…/` of printable ASCII up to 512 characters, a 12-digit
//! account, a lowercase partition), so an ARN that reaches a log line, an STS call or a session
//! name never carries a space, a control character or anything outside ASCII.

use std::fmt;
use std::sync::{Mutex, OnceLock};

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

impl RoleArn {
    pub fn parse(arn: &str) -> Result<RoleArn, RoleError> {
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
        Ok(RoleArn {
            arn: arn.to_string(),
            partition_end: 4 + partition.len(),
            account: account.to_string(),
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

/// Resolves a pod's role annotation to a role ARN.
pub fn resolve(annotation: &str, base: Option<&BaseArn>) -> Result<RoleArn, RoleError> {
    let annotation = annotation.trim();
    if annotation.starts_with("arn:") {
        return RoleArn::parse(annotation);
    }
    let name = annotation.trim_start_matches('/');
    let last = name.rsplit('/').next().unwrap_or_default();
    if !valid_role_name(last) {
        return Err(RoleError::BadName(annotation.to_string()));
    }
    let base = base.ok_or_else(|| RoleError::NoBaseArn(annotation.to_string()))?;
    RoleArn::parse(&format!("{}{name}", base.as_str())).map_err(|e| match e {
        RoleError::BadPath(_) => RoleError::BadPath(annotation.to_string()),
        _ => RoleError::BadName(annotation.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()
    }

    #[test]
    fn names_join_the_base_and_leading_slashes_are_trimmed() {
        let arn = resolve("app", Some(&base())).unwrap();
        assert_eq!(arn.as_str(), "arn:aws:iam::123456789012:role/app");
        assert_eq!(resolve("/app", Some(&base())).unwrap(), arn);
        let pathed = resolve("team/app", Some(&base())).unwrap();
        assert_eq!(pathed.as_str(), "arn:aws:iam::123456789012:role/team/app");
        assert_eq!(pathed.name(), "app");
    }

    #[test]
    fn full_arns_are_taken_as_they_are() {
        let arn = resolve("arn:aws-cn:iam::210987654321:role/ops/deployer", Some(&base())).unwrap();
        assert_eq!(arn.partition(), "aws-cn");
        assert_eq!(arn.account(), "210987654321");
        assert_eq!(arn.name(), "deployer");
    }

    #[test]
    fn a_name_without_a_base_is_an_error() {
        assert_eq!(resolve("app", None), Err(RoleError::NoBaseArn("app".into())));
    }

    #[test]
    fn malformed_roles_are_refused() {
        for bad in [
            "arn:aws:iam::123:role/app",
            "arn:aws:iam::123456789012:user/app",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a//b",
        ] {
            assert!(resolve(bad, Some(&base())).is_err(), "{bad}");
        }
        for bad in ["", "has space", "semi;colon", &"x".repeat(65)] {
            assert!(resolve(bad, Some(&base())).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn iam_character_rules_hold_for_names_paths_partitions_and_accounts() {
        let ok = [
            "arn:aws:iam::123456789012:role/app",
            "arn:aws:iam::123456789012:role/a+b=c,d.e@f_g-h",
            "arn:aws:iam::123456789012:role/team/sub-team/app",
            "arn:aws:iam::123456789012:role/!#$%&'()*+,-.:;<=>?@[]^_`{|}~/app",
            "arn:aws-us-gov:iam::123456789012:role/app",
            "arn:aws-iso-b:iam::123456789012:role/app",
        ];
        for arn in ok {
            assert_eq!(RoleArn::parse(arn).map(|r| r.to_string()), Ok(arn.to_string()));
        }
        let long_path = format!("arn:aws:iam::123456789012:role/{}/app", "p".repeat(MAX_PATH - 2));
        assert!(RoleArn::parse(&long_path).is_ok(), "a path of exactly 512 characters");
        let too_long = format!("arn:aws:iam::123456789012:role/{}/app", "p".repeat(MAX_PATH - 1));
        let forged = "arn:aws:iam::123456789012:role/x\n2026-01-01T00:00:00Z  INFO credentials issued namespace=victim/app";
        for (arn, expect) in [
            (forged, RoleError::BadPath(forged.into())),
            ("arn:aws:iam::123456789012:role/team\r/app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/te am/app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/t\tab/app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/\u{1b}[31m/app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/t\u{7f}/app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/équipe/app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/a//app", RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role//app", RoleError::BadPath("".into())),
            (&too_long, RoleError::BadPath("".into())),
            ("arn:aws:iam::123456789012:role/app\n", RoleError::BadName("".into())),
            ("arn:aws:iam::123456789012:role/app name", RoleError::BadName("".into())),
            ("arn:aws:iam::123456789012:role/appé", RoleError::BadName("".into())),
            ("arn:aws:iam::123456789012:role/app\u{85}", RoleError::BadName("".into())),
            ("arn:aws:iam::123456789012:role/team/", RoleError::BadName("".into())),
            ("arn:aws:iam::123456789012:role/", RoleError::BadName("".into())),
            ("arn:aws\n:iam::123456789012:role/app", RoleError::BadPartition("".into())),
            ("arn:AWS:iam::123456789012:role/app", RoleError::BadPartition("".into())),
            ("arn:aws-:iam::123456789012:role/app", RoleError::BadPartition("".into())),
            ("arn::iam::123456789012:role/app", RoleError::BadPartition("".into())),
            ("arn:aws:iam::12345678901\n:role/app", RoleError::BadAccount("".into())),
            ("arn:aws:iam::１２３456789012:role/app", RoleError::BadAccount("".into())),
        ] {
            let got = RoleArn::parse(arn).unwrap_err();
            assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&expect), "{arn:?}: {got}");
            let message = got.to_string();
            assert!(!message.chars().any(|c| c.is_control()), "the message escapes the input: {message:?}");
        }
        // Through the annotation's name form too.
        let got = resolve("team\n2026-01-01T00:00:00Z INFO x/app", Some(&base())).unwrap_err();
        assert!(matches!(got, RoleError::BadPath(_)), "{got}");
        for name in ["app\nx", "app\u{1b}", "app\u{7f}", "ünicode"] {
            assert!(matches!(resolve(name, Some(&base())), Err(RoleError::BadName(_))), "{name:?}");
        }
    }

    #[test]
    fn base_from_caller_identity() {
        let b = BaseArn::from_caller_arn("arn:aws:sts::123456789012:assumed-role/server/i-123").unwrap();
        assert_eq!(b.as_str(), "arn:aws:iam::123456789012:role/");
        let b = BaseArn::from_caller_arn("arn:aws-us-gov:iam::123456789012:user/x").unwrap();
        assert_eq!(b.as_str(), "arn:aws-us-gov:iam::123456789012:role/");
        assert!(BaseArn::from_caller_arn("nonsense").is_err());
    }

    #[test]
    fn base_gets_a_trailing_slash_and_may_have_a_path() {
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123456789012:role").unwrap().as_str(),
            "arn:aws:iam::123456789012:role/"
        );
        assert_eq!(
            resolve("app", Some(&BaseArn::parse("arn:aws:iam::123456789012:role/k8s/").unwrap()))
                .unwrap()
                .as_str(),
            "arn:aws:iam::123456789012:role/k8s/app"
        );
        assert!(BaseArn::parse("arn:aws:iam::123456789012:user/").is_err());
    }

    /// Properties of role resolution: whatever a pod owner writes in the annotation, an accepted
    /// role is an ARN IAM could have written, the same role resolves the same way in either form,
    /// and nothing outside IAM's characters ever reaches the ARN.
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::Config;

        fn config() -> Config {
            Config { cases: 256, failure_persistence: None, ..Config::default() }
        }

        /// IAM's rules for a role ARN: partition, 12-digit account, a path `/` or `/…/` of
        /// printable ASCII (no empty segment here, at most 512), a name of `[\w+=,.@-]{1,64}`.
        fn iam_accepts(arn: &str) -> bool {
            static SHAPE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
                regex::Regex::new(
                    r"^arn:([a-z][a-z0-9-]{0,31}):iam::[0-9]{12}:role/(?:[!-~]+/)?[A-Za-z0-9_+=,.@-]{1,64}$",
                )
                .unwrap()
            });
            let Some(captures) = SHAPE.captures(arn) else { return false };
            let resource = &arn[arn.find(":role/").unwrap() + ":role/".len()..];
            let name = resource.rsplit('/').next().unwrap_or_default();
            // The path: `/`, then what precedes the name (each segment non-empty), at most 512.
            let path_len = 1 + resource.len() - name.len();
            !captures[1].ends_with('-') && path_len <= MAX_PATH && resource.split('/').all(|s| !s.is_empty())
        }

        fn partition() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec!["aws", "aws-cn", "aws-us-gov", "aws-iso-b"]).prop_map(String::from),
                "[a-z][a-z0-9-]{0,3}",
            ]
        }

        fn path_segment() -> impl Strategy<Value = String> {
            prop_oneof!["[a-z0-9-]{1,8}", "[!-.0-~]{1,6}"]
        }

        /// Path segments, sometimes empty or long enough to pass IAM's 512 characters.
        fn any_path() -> impl Strategy<Value = Vec<String>> {
            let segment = prop_oneof![4 => path_segment(), 1 => Just(String::new()), 1 => "[a-z]{100,260}"];
            prop_oneof![
                6 => prop::collection::vec(path_segment(), 0..3),
                2 => prop::collection::vec(segment, 1..5),
                // Around the limit: a path `/<inner>/` of 507 to 517 characters.
                1 => "[a-z]{505,515}".prop_map(|s| vec![s]),
            ]
        }

        fn name() -> impl Strategy<Value = String> {
            prop_oneof!["[a-z][a-z0-9-]{0,12}", "[A-Za-z0-9_+=,.@-]{1,64}"]
        }

        fn base() -> impl Strategy<Value = BaseArn> {
            (partition(), "[0-9]{12}", prop::collection::vec(path_segment(), 0..3)).prop_filter_map(
                "a valid base",
                |(partition, account, path)| {
                    let path: String = path.iter().map(|s| format!("{s}/")).collect();
                    BaseArn::parse(&format!("arn:{partition}:iam::{account}:role/{path}")).ok()
                },
            )
        }

        /// What a hostile pod owner might write: names, paths, ARNs, with odd characters.
        fn annotation() -> impl Strategy<Value = String> {
            let odd = prop::sample::select(vec![
                "\n",
                "\r",
                "\t",
                " ",
                "\0",
                "\u{1b}[31m",
                "\u{7f}",
                "\u{85}",
                "\u{2028}",
                "\u{e9}",
                "..",
                "//",
                "/",
                ":",
                "*",
                "%2F",
                "\u{ff11}",
            ]);
            prop_oneof![
                name(),
                (any_path(), name()).prop_map(|(path, name)| format!(
                    "{}{name}",
                    path.iter().map(|s| format!("{s}/")).collect::<String>()
                )),
                (partition(), "[0-9]{11,13}", prop::sample::select(vec!["", "", "/"]), any_path(), name())
                    .prop_map(|(partition, account, extra_slash, path, name)| {
                        let path: String = path.iter().map(|s| format!("{s}/")).collect();
                        format!("arn:{partition}:iam::{account}:role/{extra_slash}{path}{name}")
                    }),
                ".{0,40}",
            ]
            .prop_flat_map(move |text| {
                let len = text.len();
                (Just(text), prop::collection::vec((0..=len, odd.clone()), 0..3))
            })
            .prop_map(|(mut text, inserts)| {
                for (at, odd) in inserts {
                    let mut at = at.min(text.len());
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text.insert_str(at, odd);
                }
                text
            })
        }

        proptest! {
            // Pure and cheap: many more cases in the same time.
            #![proptest_config(Config { cases: 1024, ..config() })]

            /// Whatever the annotation, an accepted role is an ARN IAM could have written,
            /// parsed the same way again, carrying the annotation's own name and nothing but
            /// printable ASCII; a name is joined to the base ARN as written.
            #[test]
            fn an_accepted_role_is_always_an_iam_role_arn(
                text in annotation(),
                base in prop::option::of(base()),
            ) {
                let Ok(role) = resolve(&text, base.as_ref()) else { return Ok(()) };
                let arn = role.as_str();
                prop_assert!(iam_accepts(arn), "{:?} resolved to {:?}", text, arn);
                prop_assert_eq!(RoleArn::parse(arn), Ok(role.clone()));
                prop_assert!(arn.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{:?}", arn);
                prop_assert_eq!(role.name(), arn.rsplit('/').next().unwrap());
                let prefix = &arn[..arn.find(":role/").unwrap() + ":role/".len()];
                prop_assert_eq!(format!("arn:{}:iam::{}:role/", role.partition(), role.account()), prefix);
                let written = text.trim();
                if written.starts_with("arn:") {
                    prop_assert_eq!(arn, written);
                } else {
                    let base = base.as_ref().unwrap();
                    prop_assert_eq!(arn, format!("{}{}", base.as_str(), written.trim_start_matches('/')));
                }
            }

            /// A role named relative to the base ARN and the same role written as a full ARN
            /// resolve to the same role (the base does not matter for a full ARN).
            #[test]
            fn a_name_and_its_full_arn_resolve_identically(
                base in base(),
                other_base in prop::option::of(base()),
                path in any_path(),
                name in name(),
                leading_slash in any::<bool>(),
                padding in prop::sample::select(vec!["", " ", "\n", "\t "]),
            ) {
                let relative: String = path.iter().map(|s| format!("{s}/")).collect::<String>() + &name;
                // Leading slashes of a name are trimmed (kube2iam): the ARN has none of them.
                let full = format!("{}{}", base.as_str(), relative.trim_start_matches('/'));
                let written = format!("{padding}{}{relative}{padding}", if leading_slash { "/" } else { "" });
                // A path whose first segment starts `arn:` reads as an ARN: not a name.
                prop_assume!(!relative.starts_with("arn:"));
                let by_name = resolve(&written, Some(&base));
                let by_arn = resolve(&full, other_base.as_ref());
                let expected = iam_accepts(&full);
                prop_assert_eq!(by_name.is_ok(), expected, "{:?}: {:?}", written, by_name);
                prop_assert_eq!(by_arn.is_ok(), expected, "{:?}: {:?}", full, by_arn);
                if let (Ok(by_name), Ok(by_arn)) = (by_name, by_arn) {
                    prop_assert_eq!(&by_name, &by_arn);
                    prop_assert_eq!(by_name.as_str(), full.as_str());
                    prop_assert_eq!(by_name.name(), name.as_str());
                    prop_assert_eq!(Ok(by_name), RoleArn::parse(&full));
                }
            }

            /// A character outside IAM's set inside a valid role, in either form, is refused.
            #[test]
            fn a_character_outside_iams_set_inside_a_role_is_refused(
                base in base(),
                path in prop::collection::vec(path_segment(), 0..3),
                name in name(),
                bad in prop_oneof![
                    prop::sample::select(vec![
                        ' ', '\n', '\r', '\t', '\0', '\u{1b}', '\u{7f}', '\u{85}', '\u{a0}', '\u{2028}',
                        '\u{e9}', '\u{130}', '\u{ff10}',
                    ]),
                    any::<char>().prop_filter("outside printable ASCII", |c| !('!'..='~').contains(c)),
                ],
                at in any::<prop::sample::Index>(),
                full_form in any::<bool>(),
            ) {
                let relative: String = path.iter().map(|s| format!("{s}/")).collect::<String>() + &name;
                let written = if full_form { format!("{}{relative}", base.as_str()) } else { relative };
                // Strictly inside: whitespace around the annotation is trimmed, never kept.
                let boundaries: Vec<usize> = (1..written.len()).collect();
                prop_assume!(!boundaries.is_empty());
                let mut text = written.clone();
                text.insert(*at.get(&boundaries), bad);
                prop_assert!(resolve(&text, Some(&base)).is_err(), "{:?} accepted", text);
                prop_assert!(RoleArn::parse(&text).is_err(), "{:?} accepted", text);
            }
        }
    }
}
