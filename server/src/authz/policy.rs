//! Namespace policy: which role ARNs a namespace permits. `iam.amazonaws.com/permitted` is a regular
//! expression matched against the whole role ARN (anchored); absent means nothing is permitted.
//! For kube2iam users, `iam.amazonaws.com/allowed-roles` (a JSON array of role names or ARNs, `*`
//! glob) is honoured when `permitted` is absent. Invalid input denies, and says why.

use imdsgate_core::role::{BaseArn, RoleArn};
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
            // The expression must be a regular expression on its own: one that closes the group
            // around it (`a)|(.*`) would otherwise escape the anchors and permit every role.
            return match Regex::new(&expr).and_then(|_| Regex::new(&format!("^(?:{expr})$"))) {
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
                    // A name glob is relative to the base ARN, as kube2iam resolves it (never
                    // matched against the name alone: that would reach other accounts and paths).
                    let full = base.map(|b| format!("{}{}", b.as_str(), g.trim_start_matches('/')));
                    full.is_some_and(|full| glob_match(&full, role.as_str()))
                }
            }),
        };
        if permitted { Ok(()) } else { Err(format!("the namespace's policy does not permit role {role}")) }
    }

    /// Whether a role's verdict can depend on the base ARN: `allowed-roles` with a name glob.
    pub fn uses_base(&self) -> bool {
        match self {
            NamespacePolicy::AllowedRoles(globs) => globs.iter().any(|g| !g.trim().starts_with("arn:")),
            _ => false,
        }
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
    use imdsgate_core::role::resolve;

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

    #[test]
    fn an_expression_closing_its_anchoring_group_is_invalid_and_permits_nothing() {
        // Found by `an_expression_that_is_not_a_regular_expression_or_is_empty_permits_nothing`:
        // wrapped as `^(?:…)$`, this was "starts with …/a" or "anything": every role.
        let p = policy(PERMITTED_ANNOTATION, "arn:aws:iam::000000000000:role/a)|(.*");
        assert!(p.invalid_reason().is_some());
        assert!(p.check(&role("a"), None).is_err());
        assert!(p.check(&role("anything"), None).is_err());
    }

    #[test]
    fn an_allowed_roles_name_never_reaches_another_account_or_path() {
        // Found by `an_allowed_roles_glob_permits_what_it_names_under_the_base_arn`: a name glob
        // was also matched against the role's name alone.
        let p = policy(ALLOWED_ROLES_ANNOTATION, r#"["app-*", "*"]"#);
        let ops = BaseArn::parse("arn:aws:iam::123456789012:role/ops/").unwrap();
        for other in [
            "arn:aws:iam::999999999999:role/app-reader",
            "arn:aws-cn:iam::123456789012:role/app-reader",
            "arn:aws:iam::123456789012:role/admin/app-reader",
        ] {
            assert!(p.check(&resolve(other, None).unwrap(), Some(&ops)).is_err(), "{other}");
        }
        assert!(p.check(&resolve("app-reader", Some(&ops)).unwrap(), Some(&ops)).is_ok());
        assert!(p.check(&resolve("arn:aws:iam::123456789012:role/ops/x", None).unwrap(), Some(&ops)).is_ok());
    }

    /// Properties of namespace policies: `permitted` permits a role exactly when the expression
    /// matches the whole ARN; what does not parse permits nothing; any annotation text is safe.
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::Config;
        use std::collections::BTreeSet;

        fn config() -> Config {
            Config { cases: 256, failure_persistence: None, ..Config::default() }
        }

        /// Role ARNs as IAM writes them.
        fn arn() -> impl Strategy<Value = RoleArn> {
            (
                prop::sample::select(vec!["aws", "aws-cn", "aws-us-gov"]),
                prop::sample::select(vec!["123456789012", "210987654321", "000000000000"]),
                prop::collection::vec("[a-z0-9+=,.@_-]{1,6}", 0..3),
                prop_oneof!["[a-z][a-z0-9-]{0,10}", "[A-Za-z0-9+=,.@_-]{1,12}"],
            )
                .prop_map(|(partition, account, path, name)| {
                    let path: String = path.iter().map(|s| format!("{s}/")).collect();
                    RoleArn::parse(&format!("arn:{partition}:iam::{account}:role/{path}{name}")).unwrap()
                })
        }

        /// A small regular expression over ARNs whose language is known without the `regex` crate.
        #[derive(Clone, Debug)]
        enum Expr {
            Literal(String),
            /// `.*`
            Any,
            /// `[^/]+`
            Segment,
            /// `[0-9]{12}`
            Account,
            /// `(?:a|b|…)` or, at the top level only, `a|b|…` (which the anchors must still enclose).
            Alt(Vec<Expr>),
            Concat(Vec<Expr>),
            /// `(?:e)?`
            Optional(Box<Expr>),
        }

        impl Expr {
            fn render(&self, top: bool) -> String {
                match self {
                    Expr::Literal(s) => regex::escape(s),
                    Expr::Any => ".*".into(),
                    Expr::Segment => "[^/]+".into(),
                    Expr::Account => "[0-9]{12}".into(),
                    Expr::Alt(es) => {
                        let inner: Vec<String> = es.iter().map(|e| e.render(false)).collect();
                        if top { inner.join("|") } else { format!("(?:{})", inner.join("|")) }
                    }
                    Expr::Concat(es) => es.iter().map(|e| e.render(false)).collect(),
                    Expr::Optional(e) => format!("(?:{})?", e.render(false)),
                }
            }

            /// Where a match of `self` starting at `from` can end in `text`.
            fn ends(&self, text: &[char], from: usize) -> BTreeSet<usize> {
                match self {
                    Expr::Literal(s) => {
                        let s: Vec<char> = s.chars().collect();
                        let fits = text.get(from..from + s.len()) == Some(&s[..]);
                        fits.then_some(from + s.len()).into_iter().collect()
                    }
                    Expr::Any => {
                        (from..=text.len()).take_while(|&i| i == from || text[i - 1] != '\n').collect()
                    }
                    Expr::Segment => (from + 1..=text.len()).take_while(|&i| text[i - 1] != '/').collect(),
                    Expr::Account => {
                        let digits =
                            text.get(from..from + 12).is_some_and(|d| d.iter().all(char::is_ascii_digit));
                        digits.then_some(from + 12).into_iter().collect()
                    }
                    Expr::Alt(es) => es.iter().flat_map(|e| e.ends(text, from)).collect(),
                    Expr::Concat(es) => es.iter().fold(BTreeSet::from([from]), |starts, e| {
                        starts.iter().flat_map(|&s| e.ends(text, s)).collect()
                    }),
                    Expr::Optional(e) => {
                        let mut ends = e.ends(text, from);
                        ends.insert(from);
                        ends
                    }
                }
            }

            fn matches_whole(&self, text: &str) -> bool {
                let chars: Vec<char> = text.chars().collect();
                self.ends(&chars, 0).contains(&chars.len())
            }
        }

        /// An expression written from pieces of `arn` (so that it often matches), with parts
        /// replaced by wildcards, alternatives and options, sometimes missing a prefix or a suffix
        /// (which must then not match by substring).
        fn expr_for(arn: String) -> impl Strategy<Value = Expr> {
            let len = arn.chars().count();
            let piece = prop_oneof![
                4 => Just(0u8),
                1 => Just(1u8),
                1 => Just(2u8),
                1 => Just(3u8),
                1 => Just(4u8),
                1 => Just(5u8),
            ];
            (
                prop::collection::btree_set(0..=len, 0..5),
                prop::collection::vec((piece, "[a-z0-9:/-]{0,4}"), 6),
                0..4u8,
                "[a-z0-9:/]{0,6}",
            )
                .prop_map(move |(cuts, pieces, framing, other)| {
                    let chars: Vec<char> = arn.chars().collect();
                    let mut bounds: Vec<usize> = vec![0];
                    bounds.extend(cuts.into_iter().filter(|&c| c > 0 && c < len));
                    bounds.push(len);
                    let mut parts: Vec<Expr> = Vec::new();
                    for (k, w) in bounds.windows(2).enumerate() {
                        let text: String = chars[w[0]..w[1]].iter().collect();
                        let (kind, alt) = &pieces[k % pieces.len()];
                        parts.push(match kind {
                            0 => Expr::Literal(text),
                            1 => Expr::Any,
                            2 if !text.is_empty() && !text.contains('/') => Expr::Segment,
                            3 => Expr::Alt(vec![Expr::Literal(alt.clone()), Expr::Literal(text)]),
                            4 if !text.is_empty() => Expr::Optional(Box::new(Expr::Literal(text))),
                            5 if text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit()) => {
                                Expr::Account
                            }
                            _ => Expr::Literal(text),
                        });
                    }
                    match framing {
                        // Missing its first or last piece: a substring, must not match alone.
                        0 if parts.len() > 1 => {
                            parts.remove(0);
                            Expr::Concat(parts)
                        }
                        1 if parts.len() > 1 => {
                            parts.pop();
                            Expr::Concat(parts)
                        }
                        // A top-level alternation: both branches stay anchored.
                        2 => Expr::Alt(vec![Expr::Literal(other), Expr::Concat(parts)]),
                        _ => Expr::Concat(parts),
                    }
                })
        }

        fn permitted(expr: &str) -> NamespacePolicy {
            NamespacePolicy::from_annotations(|k| (k == PERMITTED_ANNOTATION).then(|| expr.to_string()))
        }

        /// The whole-match oracle with `regex`: the expression must be a regular expression on its
        /// own, and match the whole ARN.
        fn regex_oracle(expr: &str, arn: &str) -> bool {
            regex::Regex::new(expr).is_ok()
                && regex::Regex::new(&format!("^(?:{expr})$")).is_ok_and(|re| re.is_match(arn))
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn permitted_permits_a_role_iff_the_expression_matches_the_whole_arn(
                (role, other, expr) in (arn(), arn()).prop_flat_map(|(role, other)| {
                    let source = prop_oneof![Just(role.to_string()), Just(other.to_string())];
                    (Just(role), Just(other), source.prop_flat_map(expr_for))
                }),
            ) {
                let _ = other;
                let text = expr.render(true);
                let policy = permitted(&text);
                let expected = expr.matches_whole(role.as_str());
                prop_assert_eq!(regex_oracle(&text, role.as_str()), expected, "oracles on {:?}", text);
                prop_assert_eq!(policy.check(&role, None).is_ok(), expected, "{:?} vs {}", text, role);
                prop_assert!(policy.invalid_reason().is_none());
            }

            #[test]
            fn an_expression_that_is_not_a_regular_expression_or_is_empty_permits_nothing(
                expr in prop_oneof![
                    "[a-z:/().*|?+\\[\\]{}\\\\^$0-9-]{0,16}",
                    // A role ARN with a stray `)|(`, `)`, `(`, `[`, `\` or `{` before a tail.
                    r"arn:aws:iam::[0-9]{12}:role/[a-z]{1,4}(\)\|\(|\)|\(|\[|\\|\{)(\.\*|[a-z]{1,3})",
                    Just(String::new()),
                ],
                role in arn(),
            ) {
                let policy = permitted(&expr);
                let expected = regex_oracle(&expr, role.as_str());
                prop_assert_eq!(policy.check(&role, None).is_ok(), expected, "{:?} vs {}", expr, role);
                if regex::Regex::new(&expr).is_err() {
                    prop_assert!(policy.invalid_reason().is_some(), "{:?} is not a regular expression", expr);
                }
            }

            #[test]
            fn any_annotation_text_is_judged_without_panicking(
                permitted_text in prop::option::of(".{0,40}"),
                allowed_text in prop::option::of(prop_oneof![
                    ".{0,40}",
                    prop::collection::vec(".{0,12}", 0..4).prop_map(|v| serde_json::to_string(&v).unwrap()),
                ]),
                role in arn(),
                base in prop::option::of(Just(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap())),
            ) {
                let policy = NamespacePolicy::from_annotations(|k| match k {
                    PERMITTED_ANNOTATION => permitted_text.clone(),
                    ALLOWED_ROLES_ANNOTATION => allowed_text.clone(),
                    _ => None,
                });
                let verdict = policy.check(&role, base.as_ref());
                let _ = (policy.describe(), policy.invalid_reason());
                if permitted_text.is_none() && allowed_text.is_none() {
                    prop_assert!(verdict.is_err());
                }
                if policy.invalid_reason().is_some() {
                    prop_assert!(verdict.is_err());
                }
            }

            /// kube2iam resolves each `allowed-roles` entry as it resolves a pod's role (a name is
            /// joined to the base ARN) and globs the result against the role's ARN: a name glob
            /// never reaches a role in another account, partition or path.
            #[test]
            fn an_allowed_roles_glob_permits_what_it_names_under_the_base_arn(
                globs in prop::collection::vec(
                    prop_oneof![
                        "[a-z]{1,3}\\*?",
                        "/?[a-z]{1,3}/[a-z*]{1,3}",
                        "\\*",
                        "arn:aws:iam::(123456789012|210987654321|\\*):role/[a-z*/]{1,5}",
                    ],
                    1..3,
                ),
                role in (
                    prop::sample::select(vec!["123456789012", "210987654321"]),
                    prop::sample::select(vec!["", "ops/", "a/", "ab/"]),
                    "[a-z]{1,3}",
                ).prop_map(|(account, path, name)| {
                    RoleArn::parse(&format!("arn:aws:iam::{account}:role/{path}{name}")).unwrap()
                }),
                base in prop::sample::select(vec![
                    "arn:aws:iam::123456789012:role/",
                    "arn:aws:iam::123456789012:role/ops/",
                ]),
            ) {
                let base = BaseArn::parse(base).unwrap();
                let json = serde_json::to_string(&globs).unwrap();
                let policy = NamespacePolicy::from_annotations(|k| {
                    (k == ALLOWED_ROLES_ANNOTATION).then(|| json.clone())
                });
                let glob = |pattern: &str| {
                    let re = pattern.split('*').map(regex::escape).collect::<Vec<_>>().join(".*");
                    regex::Regex::new(&format!("^(?:{re})$")).unwrap().is_match(role.as_str())
                };
                let expected = globs.iter().any(|g| {
                    let g = g.trim();
                    if g.starts_with("arn:") {
                        glob(g)
                    } else {
                        glob(&format!("{}{}", base.as_str(), g.trim_start_matches('/')))
                    }
                });
                prop_assert_eq!(
                    policy.check(&role, Some(&base)).is_ok(),
                    expected,
                    "{} against {} (base {})",
                    json,
                    role,
                    base.as_str()
                );
            }
        }
    }
}
