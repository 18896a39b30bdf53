//! The routes and the canonical path grammar: examples, and properties over generated paths.

use super::*;
use crate::imds::upstream::{AllowList, DEFAULT_ALLOW};

fn canonical(path: &str) -> CanonicalPath {
    CanonicalPath::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn routes() {
    use Route::*;
    assert_eq!(Route::of("/latest/api/token"), Token);
    assert_eq!(Route::of("/2021-01-03/api/token"), Token);
    assert_eq!(Route::of("/latest/meta-data/iam"), IamListing);
    assert_eq!(Route::of("/latest/meta-data/iam/"), IamListing);
    assert_eq!(Route::of("/latest/meta-data/iam/info"), IamInfo);
    assert_eq!(Route::of("/latest/meta-data/iam/security-credentials"), RoleName { extended: false });
    assert_eq!(Route::of("/latest/meta-data/iam/security-credentials/"), RoleName { extended: false });
    assert_eq!(
        Route::of("/latest/meta-data/iam/security-credentials-extended/"),
        RoleName { extended: true }
    );
    assert_eq!(
        Route::of("/latest/meta-data/iam/security-credentials/app"),
        Credentials { name: "app", extended: false }
    );
    assert_eq!(
        Route::of("/2009-04-04/meta-data/iam/security-credentials-extended/app"),
        Credentials { name: "app", extended: true }
    );
    for blocked in [
        "/latest/meta-data/iam/anything-else",
        "/latest/meta-data/iam/security-credentials-foo",
        "/latest/meta-data/iam/security-credentials/node-role/extra",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/identity-credentials/ec2/info",
        // Case and punctuation variants a lenient metadata service might fold onto iam/.
        "/latest/meta-data/IAM/security-credentials/node-role",
        "/latest/meta-data/Iam/info",
        "/latest/meta-data/iAm/",
        "/latest/META-DATA/iam/info",
        "/latest/Meta-Data/iam/security-credentials/node-role",
        "/latest/meta-data/iam./info",
        "/latest/meta-data/Identity-Credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/IDENTITY-CREDENTIALS/ec2/info",
        "/latest/meta-data/identity_credentials/ec2/info",
        "/latest/dynamic/iam/info",
        "/latest/iam/security-credentials/node-role",
        "/iam/meta-data",
    ] {
        assert_eq!(Route::of(blocked), Blocked, "{blocked}");
    }
    for not_canonical in [
        "/latest/meta-data/./iam/security-credentials/node-role",
        "/latest/./meta-data/iam/security-credentials/node-role",
        "/./latest/meta-data/iam/info",
        "/latest/meta-data/placement/../iam/info",
        "/latest/meta-data/placement/../../latest/meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials/..",
        "/latest/meta-data/iam/security-credentials/.",
        "/latest/meta-data/iam/security-credentials%2Fapp",
        "/latest/meta-data/%69am/info",
        "/latest/meta-data/%2e/iam/info",
        "/latest/meta-data/%2E%2E/meta-data/iam/info",
        "/latest//meta-data/iam/info",
        "//latest/meta-data/iam/info",
        "/latest/meta-data//iam/info",
        "/latest/meta-data/iam//security-credentials/node-role",
        "/latest/meta-data\\iam\\info",
        "/latest/meta-data/placement/region;/../../iam/info",
        "/latest/meta-data/\u{130}am/info",
        "latest/meta-data/iam/info",
        "http://169.254.169.254/latest/meta-data/iam/info",
        "",
        "*",
        // Harmless, but still not the one spelling: refused, never rewritten.
        "/latest/meta-data/placement/./region",
        "/latest/meta-data/placement//region",
    ] {
        assert!(matches!(Route::of(not_canonical), NotCanonical(_)), "{not_canonical:?}");
    }
    let proxied = |p: &str| Proxy(CanonicalPath::parse(p).unwrap());
    for proxy in [
        "/latest/meta-data/placement/region",
        "/latest/user-data",
        "/latest/meta-data/network/interfaces/macs/0a:1b:2c:3d:4e:5f/local-ipv4s",
        "/latest/meta-data/",
        "/",
    ] {
        assert_eq!(Route::of(proxy), proxied(proxy), "{proxy}");
    }
}

#[test]
fn only_canonical_paths_parse() {
    for ok in ["/", "/latest", "/latest/", "/latest/meta-data/placement/region", "/latest/meta-data/iam/"] {
        assert_eq!(canonical(ok).as_str(), ok);
    }
    use NotCanonical::*;
    for (path, why) in [
        ("", NoLeadingSlash),
        ("latest/meta-data", NoLeadingSlash),
        ("http://169.254.169.254/latest/meta-data/iam/info", NoLeadingSlash),
        ("*", NoLeadingSlash),
        ("//latest/meta-data", EmptySegment),
        ("/latest//meta-data/iam/info", EmptySegment),
        ("/latest/meta-data//", EmptySegment),
        ("/latest/meta-data/./iam/info", DotSegment),
        ("/latest/./meta-data/iam/info", DotSegment),
        ("/./latest/meta-data", DotSegment),
        ("/latest/meta-data/placement/../iam/info", DotSegment),
        ("/latest/meta-data/iam/..", DotSegment),
        ("/latest/meta-data/iam/.", DotSegment),
        ("/latest/meta-data/.../iam", DotSegment),
        ("/latest/meta-data/%69am/info", PercentEncoded),
        ("/latest/meta-data/%2e/iam/info", PercentEncoded),
        ("/latest/meta-data/iam/security-credentials%2Fnode-role", PercentEncoded),
        ("/latest/meta-data\\iam\\info", Character),
        ("/latest/meta-data/iam;x/info", Character),
        ("/latest/meta-data/ iam", Character),
        ("/latest/meta-data/iam\n", Character),
        ("/latest/meta-data/\u{131}am", Character),
        ("/latest/meta-data/iam?x=1", Character),
        ("/latest/meta-data/iam#x", Character),
    ] {
        assert_eq!(CanonicalPath::parse(path), Err(why), "{path:?}");
    }
    assert_eq!(CanonicalPath::parse(&format!("/{}", "a".repeat(MAX_PATH))), Err(TooLong));
}

/// Properties over generated paths: the parser accepts exactly the canonical language, hands
/// back its input unchanged, and no allow-list ever lets the node's identity through.
mod properties {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::Config;

    fn config() -> Config {
        Config { cases: 256, failure_persistence: None, ..Config::default() }
    }

    /// Characters that make paths interesting, and now and then any character at all.
    fn path_char() -> impl Strategy<Value = char> {
        prop_oneof![
            8 => prop::sample::select(
                "/////....aAiImM-_~:+=,@%2eEfF09\\;?# \0\n\t\r\u{7f}\u{131}\u{130}\u{ff41}\u{200b}"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            1 => any::<char>(),
        ]
    }

    fn path_text() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            3 => "[A-Za-z0-9._~:+=,@-]{1,6}",
            1 => prop::sample::select(vec![
                "", ".", "..", "...", ".a", "a.", "%2e", "%2E%2e", "a b", "a\\b", "\u{e9}",
            ])
                .prop_map(String::from),
        ];
        prop_oneof![
            // Close to canonical: mostly valid segments, some empty, dot-only or odd.
            2 => prop::collection::vec(segment, 0..6).prop_map(|s| format!("/{}", s.join("/"))),
            1 => prop::collection::vec(path_char(), 0..48).prop_map(|v| v.into_iter().collect()),
            1 => prop::collection::vec(path_char(), 0..48)
                .prop_map(|v| format!("/{}", v.into_iter().collect::<String>())),
            // Long ones, around the length limit.
            1 => (1000..1030usize, path_char()).prop_map(|(n, c)| {
                let mut s = format!("/{}", "a".repeat(n - 1));
                s.push(c);
                s
            }),
        ]
    }

    /// The canonical language, stated independently of the parser.
    fn is_canonical(path: &str) -> bool {
        static SHAPE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
            regex::Regex::new(r"^/(?:[A-Za-z0-9._~:+=,@-]+/)*[A-Za-z0-9._~:+=,@-]*$").unwrap()
        });
        path.len() <= MAX_PATH
            && SHAPE.is_match(path)
            && path[1..].split('/').all(|segment| segment.is_empty() || segment.contains(|c| c != '.'))
    }

    /// Spellings of the node's identity segments that a lenient service might fold onto them.
    fn identity_segment() -> impl Strategy<Value = String> {
        let base = prop::sample::select(vec!["iam", "identity-credentials", "identity_credentials"]);
        let punct = prop::collection::vec(prop::sample::select(vec!["", ".", "-", "_", "~", ":", "@"]), 2);
        (base, punct, any::<u64>()).prop_map(|(base, punct, case)| {
            let cased: String = base
                .chars()
                .enumerate()
                .map(|(i, c)| if case >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect();
            format!("{}{cased}{}", punct[0], punct[1])
        })
    }

    /// The parser as first written, over a vector of segments: the reference for the reason
    /// the one-pass [`CanonicalPath::check`] gives.
    fn reference_check(path: &str) -> Result<(), NotCanonical> {
        let rest = path.strip_prefix('/').ok_or(NotCanonical::NoLeadingSlash)?;
        if path.len() > MAX_PATH {
            return Err(NotCanonical::TooLong);
        }
        if path.contains('%') {
            return Err(NotCanonical::PercentEncoded);
        }
        if !path.bytes().all(|b| b == b'/' || b.is_ascii_alphanumeric() || b"-._~:+=,@".contains(&b)) {
            return Err(NotCanonical::Character);
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let last = segments.len() - 1;
        for (i, segment) in segments.iter().enumerate() {
            if segment.is_empty() && i != last {
                return Err(NotCanonical::EmptySegment);
            }
            if !segment.is_empty() && segment.bytes().all(|b| b == b'.') {
                return Err(NotCanonical::DotSegment);
            }
        }
        Ok(())
    }

    /// The identity check as first written (a folded copy of each segment).
    fn reference_names_node_identity(path: &CanonicalPath) -> bool {
        let fold = |s: &str| -> String {
            s.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
        };
        path.segments().any(|s| NODE_IDENTITY_SEGMENTS.contains(&fold(s).as_str()))
    }

    fn canonical_segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._~:+=,@-]{1,12}".prop_filter("not a dot segment", |s| s.contains(|c| c != '.'))
    }

    proptest! {
        // Pure and cheap: many more cases in the same time.
        #![proptest_config(Config { cases: 2048, ..config() })]

        #[test]
        fn parse_accepts_exactly_the_canonical_language_and_returns_its_input(path in path_text()) {
            let parsed = CanonicalPath::parse(&path);
            prop_assert_eq!(parsed.is_ok(), is_canonical(&path), "{:?} -> {:?}", path, parsed);
            if let Ok(canonical) = parsed {
                prop_assert_eq!(canonical.as_str(), path.as_str());
                prop_assert_eq!(canonical.to_string(), path.clone());
                let again = CanonicalPath::parse(canonical.as_str());
                prop_assert_eq!(again, Ok(canonical.clone()), "idempotent");
                let segments: Vec<&str> = canonical.segments().collect();
                prop_assert_eq!(segments.join("/"), path[1..].to_string());
            }
        }

        #[test]
        fn check_gives_the_reference_reason(path in path_text()) {
            prop_assert_eq!(CanonicalPath::check(&path), reference_check(&path), "{:?}", path);
        }

        #[test]
        fn the_identity_check_agrees_with_the_reference(
            segments in prop::collection::vec(
                prop_oneof![canonical_segment(), identity_segment()],
                1..5,
            ),
            trailing_slash in any::<bool>(),
        ) {
            let mut path = format!("/{}", segments.join("/"));
            if trailing_slash {
                path.push('/');
            }
            let canonical = CanonicalPath::parse(&path).unwrap();
            prop_assert_eq!(canonical.names_node_identity(), reference_names_node_identity(&canonical));
        }

        #[test]
        fn no_allow_list_lets_a_segment_naming_the_nodes_identity_through(
            before in prop::collection::vec(canonical_segment(), 0..4),
            identity in identity_segment(),
            after in prop::collection::vec(canonical_segment(), 0..4),
            trailing_slash in any::<bool>(),
            list in 0..4usize,
        ) {
            type Lists = Vec<(Vec<String>, AllowList)>;
            static LISTS: std::sync::LazyLock<Lists> = std::sync::LazyLock::new(|| {
                [
                    vec![".*".to_string()],
                    vec!["^/.*$".to_string(), "iam".to_string()],
                    vec!["(?i).*iam.*".to_string(), "(?i).*identity.*".to_string()],
                    DEFAULT_ALLOW.iter().map(|p| p.to_string()).collect(),
                ]
                .into_iter()
                .map(|patterns| (patterns.clone(), AllowList::new(&patterns).unwrap()))
                .collect()
            });
            let (patterns, allow) = &LISTS[list];
            let segments: Vec<String> = before.iter().chain([&identity]).chain(&after).cloned().collect();
            let mut path = format!("/{}", segments.join("/"));
            if trailing_slash {
                path.push('/');
            }
            let canonical = CanonicalPath::parse(&path).unwrap();
            prop_assert!(canonical.names_node_identity(), "{}", path);
            prop_assert!(!allow.allows(&canonical), "{} allowed by {:?}", path, patterns);
        }
    }
}
