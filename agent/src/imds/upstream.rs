//! Everything that is not the pod's own identity: proxied to the real metadata service with the
//! agent's own IMDSv2 token, but only for paths on the allow-list (what SDKs need to learn their
//! region and zone). The node's `iam/*` and `identity-credentials/*` are never proxied, whatever
//! the allow-list says. No `X-Forwarded-For` is added; nothing of the pod's request but its path
//! is passed on, and only as a [`CanonicalPath`]: the one spelling that was routed and checked
//! against the allow-list is the one sent upstream, so no dot segment, empty segment,
//! percent-encoding or case variant can make the metadata service see another path than the one
//! imdsgate checked.

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use regex::RegexSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Paths proxied by default: region, zone and instance facts that SDKs and tools read.
pub const DEFAULT_ALLOW: &[&str] = &[
    r"^/[^/]+/meta-data/placement(/[a-z0-9-]+)*/?$",
    r"^/[^/]+/meta-data/instance-type$",
    r"^/[^/]+/meta-data/instance-id$",
    r"^/[^/]+/meta-data/local-ipv4$",
    r"^/[^/]+/meta-data/hostname$",
    r"^/[^/]+/meta-data/local-hostname$",
    r"^/[^/]+/meta-data/mac$",
    r"^/[^/]+/dynamic/instance-identity/document$",
];

const MAX_BODY: usize = 1 << 20;

/// Path segments that name the node's own identity, compared after folding (see [`folds_to`]): never proxied.
const NODE_IDENTITY_SEGMENTS: &[&str] = &["iam", "identitycredentials"];

/// Longest path accepted (the longest real IMDS path is far shorter).
const MAX_PATH: usize = 1024;

/// What a byte is to [`CanonicalPath::check`].
#[derive(Clone, Copy)]
enum Class {
    /// A letter, digit or `-_~:+=,@`.
    Letter,
    Dot,
    Slash,
    Percent,
    Other,
}

/// [`Class`] by byte value: one lookup per byte of a path.
static BYTE_CLASS: [Class; 256] = {
    let mut table = [Class::Other; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'/' => Class::Slash,
            b'.' => Class::Dot,
            b'%' => Class::Percent,
            b'-' | b'_' | b'~' | b':' | b'+' | b'=' | b',' | b'@' => Class::Letter,
            _ if c.is_ascii_alphanumeric() => Class::Letter,
            _ => Class::Other,
        };
        b += 1;
    }
    table
};

/// Why a request path is not in canonical form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotCanonical {
    #[error("it does not start with /")]
    NoLeadingSlash,
    #[error("it is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("it has an empty segment (//)")]
    EmptySegment,
    #[error("it has a dot segment (. or ..)")]
    DotSegment,
    #[error("it has percent-encoding")]
    PercentEncoded,
    #[error("it has a character other than letters, digits and -._~:+=,@")]
    Character,
}

/// A request path in the one form imdsgate routes on, checks against the allow-list and sends
/// upstream: `/` then segments of letters, digits and `-._~:+=,@`, none empty (but the last, for a
/// trailing slash) and none made of dots only. Anything else is refused, never rewritten: a
/// metadata service that normalised another spelling could otherwise answer a path imdsgate never
/// saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalPath(String);

impl CanonicalPath {
    pub fn parse(path: &str) -> Result<CanonicalPath, NotCanonical> {
        CanonicalPath::check(path)?;
        Ok(CanonicalPath(path.to_string()))
    }

    /// Whether `path` is canonical, and if not the reason [`CanonicalPath::parse`] gives: the first
    /// of a missing leading `/`, length, `%`, another character, then the first empty (not last)
    /// or dot-only segment. One pass over the bytes, no allocation: the router checks every
    /// request path and keeps an owned copy only for a path it proxies.
    pub fn check(path: &str) -> Result<(), NotCanonical> {
        scan(path, |_, _| {})
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments after the leading `/` (the last is empty for a trailing slash).
    pub fn segments(&self) -> std::str::Split<'_, char> {
        self.0[1..].split('/')
    }

    /// Whether any segment names the node's own identity (`iam`, `identity-credentials`) in any
    /// case or punctuation: such a path is never proxied.
    pub fn names_node_identity(&self) -> bool {
        names_node_identity(self.as_str())
    }
}

/// [`CanonicalPath::check`], calling `segment_at(start, end)` with the byte range of each segment
/// after the leading `/` as it finds it (whether or not the path turns out canonical).
fn scan(path: &str, mut segment_at: impl FnMut(usize, usize)) -> Result<(), NotCanonical> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(NotCanonical::NoLeadingSlash);
    }
    if bytes.len() > MAX_PATH {
        return Err(NotCanonical::TooLong);
    }
    let (mut percent, mut character, mut segment) = (false, false, None);
    // Start of the current segment, and whether it is all dots so far.
    let (mut start, mut dots) = (1, true);
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match BYTE_CLASS[usize::from(b)] {
            Class::Letter => dots = false,
            Class::Dot => {}
            Class::Slash => {
                if segment.is_none() {
                    if i == start {
                        segment = Some(NotCanonical::EmptySegment);
                    } else if dots {
                        segment = Some(NotCanonical::DotSegment);
                    }
                }
                segment_at(start, i);
                (start, dots) = (i + 1, true);
            }
            Class::Percent => (percent, dots) = (true, false),
            Class::Other => (character, dots) = (true, false),
        }
    }
    segment_at(start, bytes.len());
    // The last segment may be empty (a trailing slash), never dots only.
    if segment.is_none() && bytes.len() > start && dots {
        segment = Some(NotCanonical::DotSegment);
    }
    match (percent, character, segment) {
        (true, _, _) => Err(NotCanonical::PercentEncoded),
        (_, true, _) => Err(NotCanonical::Character),
        (_, _, Some(why)) => Err(why),
        _ => Ok(()),
    }
}

/// [`CanonicalPath::check`], and the segments after the leading `/` put into `parts` as far as it
/// goes; returns how many there are (more than `parts` holds, for a longer path). One pass.
pub(crate) fn check_segments<'a>(path: &'a str, parts: &mut [&'a str]) -> Result<usize, NotCanonical> {
    let mut count = 0;
    scan(path, |start, end| {
        if let Some(part) = parts.get_mut(count) {
            *part = path.get(start..end).unwrap_or_default();
        }
        count += 1;
    })?;
    Ok(count)
}

impl std::fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether any segment of the canonical path `path` names the node's own identity (see
/// [`CanonicalPath::names_node_identity`]), without a [`CanonicalPath`] or any allocation.
pub(crate) fn names_node_identity(path: &str) -> bool {
    path[1..].split('/').any(|s| NODE_IDENTITY_SEGMENTS.iter().any(|name| folds_to(s, name)))
}

/// Whether `segment`, lowercased without punctuation, is `name`: `IAM`, `Iam.` and
/// `identity_credentials` fold onto the names they could be mistaken for.
fn folds_to(segment: &str, name: &str) -> bool {
    let mut folded = segment.bytes().filter(u8::is_ascii_alphanumeric).map(|b| b.to_ascii_lowercase());
    name.bytes().all(|n| folded.next() == Some(n)) && folded.next().is_none()
}

/// Which paths may be proxied, matched against the canonical path.
#[derive(Clone, Debug)]
pub struct AllowList(RegexSet);

impl AllowList {
    pub fn new(patterns: &[String]) -> Result<AllowList, regex::Error> {
        Ok(AllowList(RegexSet::new(patterns)?))
    }

    pub fn default_list() -> AllowList {
        AllowList(RegexSet::new(DEFAULT_ALLOW).expect("default patterns compile"))
    }

    /// Whether `path` may be proxied: it matches a pattern and names nothing of the node's own
    /// identity, whatever the patterns say.
    pub fn allows(&self, path: &CanonicalPath) -> bool {
        !path.names_node_identity() && self.0.is_match(path.as_str())
    }
}

/// What the real metadata service answered.
#[derive(Clone, Debug)]
pub struct UpstreamResponse {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// The real metadata service, or a fake in tests.
pub trait Upstream: Send + Sync + 'static {
    fn get(&self, path: &CanonicalPath) -> BoxFuture<'static, Result<UpstreamResponse, String>>;
}

/// The real metadata service over HTTP, with the agent's own IMDSv2 token.
pub struct HttpUpstream {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl HttpUpstream {
    pub fn new(base: &Uri) -> Arc<HttpUpstream> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let base = base.to_string().trim_end_matches('/').to_string();
        Arc::new(HttpUpstream {
            base,
            client: Client::builder(TokioExecutor::new()).build(connector),
            token: tokio::sync::Mutex::new(None),
        })
    }

    async fn token(&self) -> Option<String> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Some(token.clone());
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
            .body(Empty::new())
            .ok()?;
        let response =
            tokio::time::timeout(Duration::from_secs(2), self.client.request(request)).await.ok()?.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = Limited::new(response.into_body(), 4096).collect().await.ok()?.to_bytes();
        let token = String::from_utf8(body.to_vec()).ok()?;
        *cached = Some((token.clone(), Instant::now() + Duration::from_secs(21600 - 60)));
        Some(token)
    }

    async fn fetch(self: Arc<Self>, path: CanonicalPath) -> Result<UpstreamResponse, String> {
        let token = self.token().await;
        let mut builder = Request::builder().method(Method::GET).uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            builder = builder.header("X-aws-ec2-metadata-token", token);
        }
        let request = builder.body(Empty::new()).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(3), self.client.request(request))
            .await
            .map_err(|_| "the metadata service did not answer in time".to_string())?
            .map_err(|e| format!("the metadata service cannot be reached: {e}"))?;
        let status = response.status().as_u16();
        let content_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the metadata service's answer: {e}"))?
            .to_bytes();
        Ok(UpstreamResponse { status, content_type, body })
    }
}

impl Upstream for Arc<HttpUpstream> {
    fn get(&self, path: &CanonicalPath) -> BoxFuture<'static, Result<UpstreamResponse, String>> {
        self.clone().fetch(path.clone()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(path: &str) -> CanonicalPath {
        CanonicalPath::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn the_default_list_allows_region_and_zone_and_nothing_secret() {
        let allow = AllowList::default_list();
        for ok in [
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/placement/region",
            "/2009-04-04/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document",
            "/latest/meta-data/placement/",
        ] {
            assert!(allow.allows(&canonical(ok)), "{ok}");
        }
        for blocked in [
            "/latest/user-data",
            "/latest/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/dynamic/instance-identity/signature",
        ] {
            assert!(!allow.allows(&canonical(blocked)), "{blocked}");
        }
    }

    #[test]
    fn an_allow_everything_list_still_never_allows_the_nodes_identity() {
        let allow = AllowList::new(&[".*".to_string()]).unwrap();
        assert!(allow.allows(&canonical("/latest/meta-data/placement/region")));
        assert!(allow.allows(&canonical("/latest/meta-data/network/interfaces/macs/0a:1b:2c:3d:4e:5f/")));
        for node in [
            "/latest/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/IAM/security-credentials/node-role",
            "/latest/meta-data/Iam/info",
            "/latest/meta-data/iam.",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/Identity-Credentials/ec2/info",
            "/latest/meta-data/identity_credentials/ec2/info",
            "/latest/dynamic/iam/info",
            "/iam/meta-data/iam",
        ] {
            assert!(!allow.allows(&canonical(node)), "{node}");
        }
    }

    #[test]
    fn only_canonical_paths_parse() {
        for ok in ["/", "/latest", "/latest/", "/latest/meta-data/placement/region", "/latest/meta-data/iam/"]
        {
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
            let punct =
                prop::collection::vec(prop::sample::select(vec!["", ".", "-", "_", "~", ":", "@"]), 2);
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
}
