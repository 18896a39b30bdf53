//! Namespace policy: which role ARNs a namespace permits. `iam.amazonaws.com/permitted` is a regular
//! expression matched against the whole role ARN (anchored); absent means nothing is permitted.
//! For kube2iam users, `iam.amazonaws.com/allowed-roles` (a JSON array of role names or ARNs, `*`
//! glob) is honoured when `permitted` is absent. Invalid input denies, and says why.

use crate::role::{BaseArn, RoleArn};
use regex::Regex;

/// Namespace annotation with the kiam-style regular expression.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";
/// Namespace annotation with the kube2iam-style JSON list.
pub const ALLOWED_ROLES_ANNOTATION: &str = "iam.amazonaws.com/allowed-roles";

/// What a namespace permits.
#[derive(Clone, Debug)]
pub enum NamespacePolicy {
    /// No annotation: no role is permitted.
    Nothing,
    /// `permitted`: an anchored regular expression over the role ARN.
    Permitted(Regex),
    /// `allowed-roles`: globs over role names or ARNs.
    AllowedRoles(Vec<String>),
    /// The annotation could not be parsed; every role is denied with this explanation.
    Invalid(String),
}

impl PartialEq for NamespacePolicy {
    fn eq(&self, other: &Self) -> bool {
        use NamespacePolicy::*;
        match (self, other) {
            (Nothing, Nothing) => true,
            (Permitted(a), Permitted(b)) => a.as_str() == b.as_str(),
            (AllowedRoles(a), AllowedRoles(b)) => a == b,
            (Invalid(a), Invalid(b)) => a == b,
            _ => false,
        }
    }
}

impl NamespacePolicy {
    /// The policy a namespace's annotations describe.
    pub fn from_annotations(get: impl Fn(&str) -> Option<String>) -> NamespacePolicy {
        if let Some(expr) = get(PERMITTED_ANNOTATION) {
            return match Regex::new(&format!("^(?:{expr})$")) {
                Ok(re) => NamespacePolicy::Permitted(re),
                Err(e) => NamespacePolicy::Invalid(format!(
                    "annotation {PERMITTED_ANNOTATION} is not a valid regular expression: {e}"
                )),
            };
        }
        if let Some(json) = get(ALLOWED_ROLES_ANNOTATION) {
            return match serde_json::from_str::<Vec<String>>(&json) {
                Ok(globs) => NamespacePolicy::AllowedRoles(globs),
                Err(e) => NamespacePolicy::Invalid(format!(
                    "annotation {ALLOWED_ROLES_ANNOTATION} is not a JSON array of strings: {e}"
                )),
            };
        }
        NamespacePolicy::Nothing
    }

    /// Whether the namespace permits `role`; `Err` explains a denial.
    pub fn check(&self, role: &RoleArn, base: Option<&BaseArn>) -> Result<(), String> {
        let permitted = match self {
            NamespacePolicy::Nothing => {
                return Err(format!(
                    "the namespace has no {PERMITTED_ANNOTATION} annotation, so it permits no role"
                ));
            }
            NamespacePolicy::Invalid(why) => return Err(why.clone()),
            NamespacePolicy::Permitted(re) => re.is_match(role.as_str()),
            NamespacePolicy::AllowedRoles(globs) => globs.iter().any(|g| {
                let g = g.trim();
                if g.starts_with("arn:") {
                    glob_match(g, role.as_str())
                } else {
                    // A name glob is relative to the base ARN, as kube2iam resolves it.
                    let full = base.map(|b| format!("{}{}", b.as_str(), g.trim_start_matches('/')));
                    full.is_some_and(|full| glob_match(&full, role.as_str()))
                        || glob_match(g.trim_start_matches('/'), role.name())
                }
            }),
        };
        if permitted { Ok(()) } else { Err(format!("the namespace's policy does not permit role {role}")) }
    }

    /// The policy as its annotation states it, for people.
    pub fn describe(&self) -> String {
        match self {
            NamespacePolicy::Nothing => {
                format!(
                    "no {PERMITTED_ANNOTATION} or {ALLOWED_ROLES_ANNOTATION} annotation: no role is permitted"
                )
            }
            NamespacePolicy::Permitted(re) => {
                let expr = re
                    .as_str()
                    .strip_prefix("^(?:")
                    .and_then(|r| r.strip_suffix(")$"))
                    .unwrap_or(re.as_str());
                format!("{PERMITTED_ANNOTATION}: {expr:?} (matched against the whole role ARN)")
            }
            NamespacePolicy::AllowedRoles(globs) => format!("{ALLOWED_ROLES_ANNOTATION}: {globs:?}"),
            NamespacePolicy::Invalid(why) => format!("invalid: {why}"),
        }
    }

    /// Whether the policy itself is broken (for logs and Events).
    pub fn invalid_reason(&self) -> Option<&str> {
        match self {
            NamespacePolicy::Invalid(why) => Some(why),
            _ => None,
        }
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::resolve;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()
    }

    fn role(name: &str) -> RoleArn {
        resolve(name, Some(&base())).unwrap()
    }

    fn policy(key: &str, value: &str) -> NamespacePolicy {
        NamespacePolicy::from_annotations(|k| (k == key).then(|| value.to_string()))
    }

    #[test]
    fn no_annotation_permits_nothing() {
        let p = NamespacePolicy::from_annotations(|_| None);
        let err = p.check(&role("app"), Some(&base())).unwrap_err();
        assert!(err.contains("permits no role"), "{err}");
    }

    #[test]
    fn permitted_is_anchored_to_the_whole_arn() {
        let p = policy(PERMITTED_ANNOTATION, "arn:aws:iam::123456789012:role/app");
        assert!(p.check(&role("app"), None).is_ok());
        assert!(p.check(&role("app-admin"), None).is_err(), "no implicit suffix match");
        let p = policy(PERMITTED_ANNOTATION, "app");
        assert!(p.check(&role("app"), None).is_err(), "no implicit substring match");
        let p = policy(PERMITTED_ANNOTATION, ".*");
        assert!(p.check(&role("anything"), None).is_ok());
        // A top-level alternation stays inside the anchors: `…/a|b` is "…/a" or exactly "b".
        let p = policy(PERMITTED_ANNOTATION, "arn:aws:iam::123456789012:role/a|b");
        assert!(p.check(&role("a"), None).is_ok());
        assert!(p.check(&role("b"), None).is_err());
        assert!(p.check(&resolve("arn:aws:iam::999999999999:role/b", None).unwrap(), None).is_err());
        let p = policy(PERMITTED_ANNOTATION, "arn:aws:iam::123456789012:role/(a|b)");
        assert!(p.check(&role("b"), None).is_ok());
        assert!(p.check(&role("ab"), None).is_err());
    }

    #[test]
    fn invalid_regex_denies_and_says_why() {
        let p = policy(PERMITTED_ANNOTATION, "arn:(unclosed");
        assert!(p.invalid_reason().unwrap().contains("not a valid regular expression"));
        assert!(p.check(&role("app"), None).is_err());
    }

    #[test]
    fn kube2iam_allowed_roles_with_globs() {
        let p = policy(ALLOWED_ROLES_ANNOTATION, r#"["app-*", "arn:aws:iam::123456789012:role/ops/*"]"#);
        assert!(p.check(&role("app-reader"), Some(&base())).is_ok());
        assert!(p.check(&role("ops/deployer"), Some(&base())).is_ok());
        assert!(p.check(&role("db-admin"), Some(&base())).is_err());
        assert!(
            p.check(&resolve("arn:aws:iam::999999999999:role/ops/x", None).unwrap(), Some(&base())).is_err()
        );
    }

    #[test]
    fn permitted_wins_over_allowed_roles() {
        let p = NamespacePolicy::from_annotations(|k| match k {
            PERMITTED_ANNOTATION => Some("arn:aws:iam::123456789012:role/only".into()),
            ALLOWED_ROLES_ANNOTATION => Some(r#"["*"]"#.into()),
            _ => None,
        });
        assert!(p.check(&role("only"), Some(&base())).is_ok());
        assert!(p.check(&role("other"), Some(&base())).is_err());
    }

    #[test]
    fn invalid_json_denies() {
        for bad in ["not json", r#"{"a": 1}"#, r#"[1, 2]"#] {
            let p = policy(ALLOWED_ROLES_ANNOTATION, bad);
            assert!(p.invalid_reason().is_some(), "{bad}");
            assert!(p.check(&role("app"), Some(&base())).is_err());
        }
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*c", "abd"));
        assert!(!glob_match("abc", "abcd"));
    }
}
