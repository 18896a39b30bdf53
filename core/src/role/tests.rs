//! Tests of the role grammar: names, paths, partitions, accounts and the annotation forms.

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

#[test]
fn the_role_name_is_the_last_segment_of_either_form() {
    for (annotation, name) in [
        ("app", "app"),
        ("/app", "app"),
        ("  team/app\n", "app"),
        ("team/sub/app", "app"),
        ("arn:aws:iam::123456789012:role/ops/deployer", "deployer"),
    ] {
        assert_eq!(role_name(annotation), Ok(name), "{annotation:?}");
    }
}

#[test]
fn a_trailing_slash_names_no_role_in_either_reading() {
    for annotation in ["app-reader/", "team/app-reader/", "/", "arn:aws:iam::123456789012:role/app/"] {
        let named = role_name(annotation);
        assert!(named.is_err(), "{annotation:?} named {named:?}");
        assert!(resolve(annotation, Some(&base())).is_err(), "{annotation:?}");
    }
    let message = role_name("app-reader/").unwrap_err().to_string();
    assert!(message.contains("ends in `/`"), "{message}");
}

#[test]
fn the_name_reading_and_the_resolution_agree() {
    for annotation in [
        "app",
        "/app",
        "team/app",
        "app-reader/",
        "a//b",
        "has space",
        "x\ny",
        "",
        "arn:aws:iam::1:role/x",
        "arn:aws:iam::123456789012:role/app",
        "arn:aws:s3:::bucket",
        "team/app\u{0}",
    ] {
        let named = role_name(annotation);
        let resolved = resolve(annotation, Some(&base()));
        assert_eq!(named.is_ok(), resolved.is_ok(), "{annotation:?}: {named:?} vs {resolved:?}");
        if let (Ok(name), Ok(arn)) = (named, resolved) {
            assert_eq!(name, arn.name(), "{annotation:?}");
        }
    }
}
