//! The IMDS handler as a pod meets it: every route, token, refusal and proxied path through
//! [`Imds::handle`], with a fake server and a fake metadata service.

use super::*;
use crate::credentials::credential_cache::tests::FakeServer;
use futures::FutureExt;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use imdsgate_core::fixtures;
use k8s_openapi::api::core::v1::Pod;
use std::sync::atomic::Ordering;

const NODE_IP: &str = "10.0.0.1";

struct FakeUpstream;

impl Upstream for FakeUpstream {
    fn get(
        &self,
        path: &CanonicalPath,
    ) -> BoxFuture<'static, Result<crate::imds::upstream::UpstreamResponse, String>> {
        let body = Bytes::from(format!("upstream:{path}"));
        async move { Ok(crate::imds::upstream::UpstreamResponse { status: 200, content_type: None, body }) }
            .boxed()
    }
}

fn mk_pod(uid: &str, ip: &str, role: Option<&str>) -> Pod {
    let pod = fixtures::pod(uid, uid).ip(ip);
    match role {
        Some(role) => pod.role(role),
        None => pod,
    }
    .build()
}

struct Bed {
    imds: Imds,
    server: Arc<FakeServer>,
}

fn bed(require_imdsv2: bool) -> Bed {
    let pods = Arc::new(PodIndex::new());
    pods.apply(&mk_pod("uid-app", "10.0.1.1", Some("app-role")));
    pods.apply(&mk_pod("uid-arn", "10.0.1.2", Some("arn:aws:iam::123456789012:role/team/deployer")));
    pods.apply(&mk_pod("uid-none", "10.0.1.3", None));
    let server = FakeServer::new(Duration::from_secs(3600));
    let imds = Imds {
        pods,
        node_ips: vec![NODE_IP.parse().unwrap()],
        pod_wait: Duration::from_millis(200),
        tokens: TokenKey::from_bytes([1; 32]),
        require_imdsv2,
        credentials: Arc::new(CredentialCache::new(server.clone(), Metrics::new())),
        upstream: Some(Arc::new(FakeUpstream)),
        allow: AllowList::default_list(),
        metrics: Metrics::new(),
        events: Arc::new(crate::imds::refusal_events::AgentEvents::new(
            None,
            "node-a".into(),
            Metrics::new(),
        )),
    };
    Bed { imds, server }
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Bed {
    async fn call(&self, from: &str, method: Method, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (_, response) = self.imds.handle(from.parse().unwrap(), None, &method, path, &map).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body =
            String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        Got { status, headers, body }
    }

    async fn get(&self, from: &str, path: &str) -> Got {
        self.call(from, Method::GET, path, &[]).await
    }

    async fn token(&self, from: &str, ttl: &str) -> Got {
        self.call(from, Method::PUT, "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)])
            .await
    }
}

#[tokio::test]
async fn non_canonical_paths_are_refused_with_a_clear_body_and_never_proxied() {
    let mut b = bed(false);
    b.imds.allow = AllowList::new(&[".*".to_string()]).unwrap();
    for path in [
        "/latest/meta-data/./iam/security-credentials/node-role",
        "/latest/meta-data/placement/../iam/info",
        "/latest/meta-data/%69am/info",
        "/latest/meta-data/placement/./region",
    ] {
        let got = b.get("10.0.1.1", path).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        assert!(got.body.contains("only canonical paths are served"), "{path}: {}", got.body);
        assert!(!got.body.contains("upstream:"), "{path}: {}", got.body);
    }
    for path in ["/latest/meta-data/IAM/security-credentials/node-role", "/latest/meta-data/Iam/info"] {
        let got = b.get("10.0.1.1", path).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!got.body.contains("upstream:"), "{path}: {}", got.body);
    }
    let got = b.get("10.0.1.1", "/latest/meta-data/placement/region").await;
    assert_eq!(got.body, "upstream:/latest/meta-data/placement/region");
}

#[tokio::test]
async fn role_name_is_the_annotations_last_segment_without_newline() {
    let b = bed(false);
    for path in ["/latest/meta-data/iam/security-credentials", "/latest/meta-data/iam/security-credentials/"]
    {
        let got = b.get("10.0.1.1", path).await;
        assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "app-role"));
    }
    let got = b.get("10.0.1.2", "/latest/meta-data/iam/security-credentials/").await;
    assert_eq!(got.body, "deployer");
    let got = b.get("10.0.1.3", "/latest/meta-data/iam/security-credentials/").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(got.body.contains("no iam.amazonaws.com/role"), "{}", got.body);
}

/// An annotation that names no role (a trailing `/`, a malformed ARN) is refused as the server
/// refuses it (403, ROLE_INVALID), and never costs a server call.
#[tokio::test]
async fn an_annotation_naming_no_role_is_refused_as_the_server_refuses_it() {
    let b = bed(false);
    for (i, annotation) in ["app-reader/", "arn:aws:iam::12345:role/app", "team//app"].iter().enumerate() {
        let ip = format!("10.0.2.{}", i + 1);
        b.imds.pods.apply(&mk_pod(&format!("uid-bad-{i}"), &ip, Some(annotation)));
        for path in ["/latest/meta-data/iam/security-credentials/", "/latest/meta-data/iam/info"] {
            let got = b.get(&ip, path).await;
            assert_eq!(got.status, StatusCode::FORBIDDEN, "{annotation:?} {path}: {}", got.body);
            assert!(got.body.contains("names no role"), "{}", got.body);
        }
        let got = b.get(&ip, "/latest/meta-data/iam/security-credentials/app-reader").await;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{annotation:?}: {}", got.body);
    }
    assert_eq!(b.server.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn credentials_are_exactly_the_imds_document() {
    let b = bed(false);
    let got = b.get("10.0.1.1", "/latest/meta-data/iam/security-credentials/app-role").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers[header::CONTENT_TYPE], "application/json");
    let lines: Vec<&str> = got.body.lines().collect();
    assert_eq!(lines[0], "{");
    assert_eq!(lines[1], r#"  "Code" : "Success","#);
    assert!(lines[2].starts_with(r#"  "LastUpdated" : ""#) && lines[2].ends_with(r#"Z","#), "{}", lines[2]);
    assert_eq!(lines[3], r#"  "Type" : "AWS-HMAC","#);
    assert!(lines[4].starts_with(r#"  "AccessKeyId" : "ASIA1-uid-app""#));
    assert_eq!(lines[5], r#"  "SecretAccessKey" : "secret\"with/quote","#, "values are JSON-escaped");
    assert_eq!(lines[6], r#"  "Token" : "token","#);
    assert_eq!(lines[8], "}");
    let doc: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    let expiration = doc["Expiration"].as_str().unwrap();
    assert_eq!(expiration.len(), "2026-01-01T00:00:00Z".len());
    assert!(jiff::civil::DateTime::strptime("%Y-%m-%dT%H:%M:%SZ", expiration).is_ok(), "{expiration}");
    assert!(doc.get("AccountId").is_none());

    let extended = b.get("10.0.1.1", "/latest/meta-data/iam/security-credentials-extended/app-role").await;
    let doc: serde_json::Value = serde_json::from_str(&extended.body).unwrap();
    assert_eq!(doc["AccountId"], "123456789012");
    assert_eq!(b.server.calls.load(Ordering::SeqCst), 1, "both served from one server call");
}

#[tokio::test]
async fn another_role_name_is_not_found_and_never_fetched() {
    let b = bed(false);
    let got = b.get("10.0.1.1", "/latest/meta-data/iam/security-credentials/admin").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(b.server.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn info_and_listing() {
    let b = bed(false);
    let got = b.get("10.0.1.1", "/latest/meta-data/iam/").await;
    assert_eq!(got.body, "info\nsecurity-credentials/");
    let got = b.get("10.0.1.1", "/latest/meta-data/iam/info").await;
    let doc: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["InstanceProfileArn"], "arn:aws:iam::123456789012:instance-profile/app-role");
    assert!(doc["InstanceProfileId"].as_str().unwrap().starts_with("AIPA"));
    assert_eq!(b.get("10.0.1.3", "/latest/meta-data/iam/").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn imdsv2_tokens() {
    let b = bed(true);
    let path = "/latest/meta-data/iam/security-credentials/";
    assert_eq!(
        b.get("10.0.1.1", path).await.status,
        StatusCode::UNAUTHORIZED,
        "IMDSv1 refused when v2 is required"
    );
    let issued = b.token("10.0.1.1", "21600").await;
    assert_eq!(issued.status, StatusCode::OK);
    assert_eq!(issued.headers[TTL_HEADER], "21600", "the TTL header is echoed");
    let ok = b.call("10.0.1.1", Method::GET, path, &[(TOKEN_HEADER, &issued.body)]).await;
    assert_eq!((ok.status, ok.body.as_str()), (StatusCode::OK, "app-role"));
    let foreign = b.call("10.0.1.2", Method::GET, path, &[(TOKEN_HEADER, &issued.body)]).await;
    assert_eq!(foreign.status, StatusCode::UNAUTHORIZED, "another pod's token is useless");
    let junk = b.call("10.0.1.1", Method::GET, path, &[(TOKEN_HEADER, "junk")]).await;
    assert_eq!(junk.status, StatusCode::UNAUTHORIZED);
    for bad in ["0", "21601", "x", ""] {
        assert_eq!(b.token("10.0.1.1", bad).await.status, StatusCode::BAD_REQUEST, "ttl {bad:?}");
    }
    let no_ttl = b.call("10.0.1.1", Method::PUT, "/latest/api/token", &[]).await;
    assert_eq!(no_ttl.status, StatusCode::BAD_REQUEST);
    let forwarded = b
        .call(
            "10.0.1.1",
            Method::PUT,
            "/latest/api/token",
            &[(TTL_HEADER, "60"), ("X-Forwarded-For", "1.2.3.4")],
        )
        .await;
    assert_eq!(forwarded.status, StatusCode::FORBIDDEN);
    assert_eq!(
        b.call("10.0.1.1", Method::GET, "/latest/api/token", &[]).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(b.call("10.0.1.1", Method::POST, path, &[]).await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_token_survives_a_restart_with_the_same_key() {
    let first = bed(true);
    let token = first.token("10.0.1.1", "60").await.body;
    let restarted = bed(true);
    let got = restarted
        .call(
            "10.0.1.1",
            Method::GET,
            "/latest/meta-data/iam/security-credentials",
            &[(TOKEN_HEADER, &token)],
        )
        .await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_ips_wait_then_404_and_the_node_is_refused() {
    let b = bed(false);
    let got = b.get("10.0.9.9", "/latest/meta-data/iam/security-credentials/").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(got.body.contains("10.0.9.9"), "the body names the IP: {}", got.body);
    let got = b.get(NODE_IP, "/latest/meta-data/iam/security-credentials/").await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_pod_that_appears_while_waiting_is_answered() {
    let b = Arc::new(bed(false));
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.get("10.0.1.7", "/latest/meta-data/iam/security-credentials/").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.imds.pods.apply(&mk_pod("uid-late", "10.0.1.7", Some("late-role")));
    let got = waiter.await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "late-role"));
}

#[tokio::test]
async fn other_paths_are_proxied_only_when_allowed() {
    let b = bed(false);
    let got = b.get("10.0.1.1", "/latest/meta-data/placement/region").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "upstream:/latest/meta-data/placement/region")
    );
    for blocked in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/iam/whatever",
    ] {
        let got = b.get("10.0.1.1", blocked).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{blocked}");
        assert!(got.body.contains("imdsgate blocked"), "{}", got.body);
    }
    // Even from a pod without a role, the node's role is never proxied.
    let got = b.get("10.0.1.3", "/latest/meta-data/iam/security-credentials/node-role").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(!got.body.contains("upstream"));
}

#[tokio::test]
async fn server_refusals_map_to_http_statuses() {
    let b = bed(false);
    let path = "/latest/meta-data/iam/security-credentials/app-role";
    let cases = [
        (
            ServerError::Refused {
                code: tonic::Code::PermissionDenied,
                reason: Some(Reason::NamespaceForbids),
                message: "no".into(),
            },
            403,
        ),
        (
            ServerError::Refused {
                code: tonic::Code::NotFound,
                reason: Some(Reason::NoRole),
                message: "no".into(),
            },
            404,
        ),
        (
            ServerError::Refused {
                code: tonic::Code::Unavailable,
                reason: Some(Reason::StsUnavailable),
                message: "down".into(),
            },
            503,
        ),
        (
            ServerError::Refused {
                code: tonic::Code::FailedPrecondition,
                reason: Some(Reason::PodUidMismatch),
                message: "reuse".into(),
            },
            503,
        ),
        (ServerError::Unreachable("refused".into()), 503),
    ];
    for (error, status) in cases {
        *b.server.answer.lock().unwrap() = Err(error.clone());
        let got = b.get("10.0.1.1", path).await;
        assert_eq!(got.status.as_u16(), status, "{error:?}");
    }
}

/// Properties over generated request paths. A hostile pod chooses its paths freely: whatever
/// it sends, it reaches credentials only through the one literal spelling of an IAM route, the
/// node's identity never goes upstream in any spelling a lenient metadata service might fold,
/// and what goes upstream is exactly the path that was routed and checked.
mod properties {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::Mutex;

    fn config() -> Config {
        Config { cases: 256, failure_persistence: None, ..Config::default() }
    }

    const IAM_LISTS: [&str; 2] = ["security-credentials", "security-credentials-extended"];

    /// The path's segments as a lenient metadata service might read them: absolute form and
    /// query cut off, percent-decoding (repeated), backslashes as slashes, `;` parameters cut,
    /// empty and dot segments resolved, case and look-alike letters folded.
    fn lenient_segments(path: &str) -> Vec<String> {
        let dropped = |c: char| c.is_control() || c.is_whitespace() || c == '\u{200b}';
        let mut path: String = path.chars().filter(|c| !dropped(*c)).collect();
        for scheme in ["http://", "https://"] {
            if let Some(rest) = path.to_ascii_lowercase().strip_prefix(scheme) {
                let start = path.len() - rest.len();
                path = path[start..]
                    .find(['/', '\\'])
                    .map(|i| path[start + i..].to_string())
                    .unwrap_or_default();
            }
        }
        if let Some(end) = path.find(['?', '#']) {
            path.truncate(end);
        }
        let mut bytes = path.into_bytes();
        for _ in 0..3 {
            let mut decoded = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                let hex = |b: u8| (b as char).to_digit(16);
                if bytes[i] == b'%'
                    && i + 2 < bytes.len()
                    && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
                {
                    decoded.push((h * 16 + l) as u8);
                    i += 3;
                } else {
                    decoded.push(bytes[i]);
                    i += 1;
                }
            }
            bytes = decoded;
        }
        let mut path = String::from_utf8_lossy(&bytes).replace('\\', "/");
        if let Some(end) = path.find(['?', '#']) {
            path.truncate(end);
        }
        let mut segments: Vec<String> = Vec::new();
        for segment in path.split('/') {
            let segment: String = segment
                .split(';')
                .next()
                .unwrap_or_default()
                .chars()
                .map(|c| match c {
                    '\u{131}' | '\u{130}' => 'i',
                    '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xff01 + 0x21).unwrap_or(c),
                    _ => c,
                })
                .flat_map(char::to_lowercase)
                .filter(|c| !dropped(*c))
                .collect();
            match segment.as_str() {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(segment),
            }
        }
        segments
    }

    /// Whether a lenient service could read the path as naming the node's own identity.
    fn leniently_names_node_identity(path: &str) -> bool {
        lenient_segments(path).iter().any(|s| {
            let folded: String = s.chars().filter(char::is_ascii_alphanumeric).collect();
            folded == "iam" || folded == "identitycredentials"
        })
    }

    /// The canonical language, stated independently of the parser (see `upstream`).
    fn is_canonical(path: &str) -> bool {
        static SHAPE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
            regex::Regex::new(r"^/(?:[A-Za-z0-9._~:+=,@-]+/)*[A-Za-z0-9._~:+=,@-]*$").unwrap()
        });
        path.len() <= 1024
            && SHAPE.is_match(path)
            && path[1..].split('/').all(|segment| segment.is_empty() || segment.contains(|c| c != '.'))
    }

    /// The route a path must take if it is one of the agent's own routes, stated literally:
    /// `/<version>/api/token`, `/<version>/meta-data/iam[/]`, `…/iam/info[/]`,
    /// `…/iam/<list>[/]` and `…/iam/<list>/<name>[/]`, with no other spelling.
    fn own_route(path: &str) -> Option<Route<'_>> {
        if !is_canonical(path) {
            return None;
        }
        let rest = path.strip_prefix('/')?;
        let (version, tail) = rest.split_once('/')?;
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return None;
        }
        if tail == "api/token" {
            return Some(Route::Token);
        }
        let iam = tail.strip_prefix("meta-data/iam")?;
        let iam = iam.strip_suffix('/').unwrap_or(iam);
        if iam.is_empty() {
            return Some(Route::IamListing);
        }
        let iam = iam.strip_prefix('/')?;
        if iam == "info" {
            return Some(Route::IamInfo);
        }
        for (list, extended) in [(IAM_LISTS[0], false), (IAM_LISTS[1], true)] {
            if iam == list {
                return Some(Route::RoleName { extended });
            }
            if let Some(name) = iam.strip_prefix(list).and_then(|n| n.strip_prefix('/'))
                && !name.is_empty()
                && !name.contains('/')
            {
                return Some(Route::Credentials { name, extended });
            }
        }
        None
    }

    /// Characters that make paths interesting, and now and then any character at all.
    fn odd_char() -> impl Strategy<Value = char> {
        prop_oneof![
            8 => prop::sample::select(
                "/.%\\;?#aAiImM-_~:+=,@ \0\n\t\r\u{7f}\u{131}\u{130}\u{ff49}\u{200b}"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            1 => any::<char>(),
        ]
    }

    /// A path to the node's identity with its `iam` or `identity-credentials` segment spelled
    /// letter by letter: kept, case flipped, percent-encoded or a look-alike, with punctuation.
    fn identity_spelling() -> impl Strategy<Value = String> {
        let letter = prop_oneof![4 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)];
        (
            prop::sample::select(vec!["iam", "identity-credentials"]),
            prop::collection::vec(letter, 20),
            prop::sample::select(vec!["", "", "", ".", "-", "_", "~"]),
            prop::sample::select(vec!["latest", "2009-04-04"]),
            prop::sample::select(vec!["meta-data", "meta-data", "dynamic", "Meta-Data"]),
            prop::sample::select(vec![
                "info",
                "info/",
                "info/x",
                "",
                "x",
                "security-credentials",
                "Security-Credentials",
                "security-credentials/node-role",
                "security-credentials/node-role/",
                "security-credentials/node-role/x",
                "SECURITY-CREDENTIALS/node-role",
                "security-credentials-extended/node-role",
                "security-credentials-Extended/",
                "ec2/security-credentials/ec2-instance",
            ]),
        )
            .prop_map(|(segment, how, punct, version, meta, tail)| {
                let spelled: String = segment
                    .chars()
                    .zip(how)
                    .map(|(c, how)| match how {
                        1 => c.to_ascii_uppercase().to_string(),
                        2 => format!("%{:02X}", c as u32),
                        3 if c == 'i' => "\u{131}".to_string(),
                        _ => c.to_string(),
                    })
                    .collect();
                format!("/{version}/{meta}/{spelled}{punct}/{tail}")
            })
    }

    /// The agent's own routes, each segment now and then changed a little (case, a letter
    /// more, dropped, doubled), with or without a trailing slash.
    fn near_own_route() -> impl Strategy<Value = String> {
        let change =
            prop_oneof![16 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)];
        (
            prop::sample::select(vec![
                "latest/api/token",
                "latest/meta-data/iam",
                "latest/meta-data/iam/info",
                "latest/meta-data/iam/security-credentials",
                "latest/meta-data/iam/security-credentials-extended",
                "latest/meta-data/iam/security-credentials/app-role",
                "2009-04-04/meta-data/iam/security-credentials-extended/app-role",
            ]),
            prop::collection::vec(change, 6),
            any::<bool>(),
        )
            .prop_map(|(template, changes, trailing_slash)| {
                let mut segments: Vec<String> = Vec::new();
                for (segment, change) in template.split('/').zip(changes) {
                    match change {
                        1 => segments.push(segment[..1].to_ascii_uppercase() + &segment[1..]),
                        2 => segments.push(format!("{segment}s")),
                        3 => {}
                        4 => segments.extend([segment.to_string(), segment.to_string()]),
                        _ => segments.push(segment.to_string()),
                    }
                }
                format!("/{}{}", segments.join("/"), if trailing_slash { "/" } else { "" })
            })
    }

    /// Request paths built from IMDS words and separators, some with odd characters mixed in.
    fn request_path() -> impl Strategy<Value = String> {
        let word = prop::sample::select(vec![
            "latest",
            "2009-04-04",
            "meta-data",
            "META-DATA",
            "iam",
            "IAM",
            "Iam.",
            "i-am",
            "info",
            "security-credentials",
            "security-credentials-extended",
            "Security-Credentials",
            "identity-credentials",
            "identity_credentials",
            "ec2",
            "placement",
            "region",
            "availability-zone",
            "user-data",
            "dynamic",
            "instance-identity",
            "document",
            "api",
            "token",
            "app-role",
            "node-role",
            ".",
            "..",
            "...",
            "",
            "%69am",
            "%2e",
            "%2E%2E",
            "%2f",
            "%252e",
            "ia%6d",
            "\u{131}am",
            "\u{ff49}am",
            "iam;x",
            "iam?x",
            "iam#x",
        ]);
        let separator = prop::sample::select(vec!["/", "/", "/", "/", "//", "\\", "/./", "/../"]);
        let built = (
            prop::sample::select(vec!["/", "/", "/", "", "http://169.254.169.254/", "//", "\\"]),
            prop::collection::vec((word, separator), 0..7),
            prop::option::of(prop::sample::select(vec!["/", "?x=1", "#f", ";p", "%00", "\0", "\n"])),
        )
            .prop_map(|(start, parts, end)| {
                let mut path = start.to_string();
                for (i, (word, separator)) in parts.iter().enumerate() {
                    if i > 0 {
                        path.push_str(separator);
                    }
                    path.push_str(word);
                }
                path.push_str(end.unwrap_or_default());
                path
            });
        prop_oneof![
            4 => built,
            2 => identity_spelling(),
            3 => near_own_route(),
            1 => prop::collection::vec(odd_char(), 0..40).prop_map(|v| v.into_iter().collect()),
        ]
    }

    /// One way to respell a path that a lenient metadata service would read as the same path.
    #[derive(Clone, Debug)]
    enum Respelling {
        PercentEncode {
            at: usize,
            lower: bool,
        },
        DotSegment {
            at: usize,
            up: bool,
        },
        DoubleSlash {
            at: usize,
        },
        TrailingSlash,
        FlipCase {
            at: usize,
        },
        Backslash {
            at: usize,
        },
        /// A character a lenient reading drops: control, space, zero-width.
        Insert {
            at: usize,
            c: char,
        },
        AbsoluteForm,
        Suffix(&'static str),
        LookAlike {
            at: usize,
        },
    }

    fn respelling() -> impl Strategy<Value = Respelling> {
        use Respelling::*;
        let at = any::<usize>();
        let dropped = prop::sample::select(vec!['\0', '\t', '\n', '\r', ' ', '\u{7f}', '\u{1b}', '\u{200b}']);
        prop_oneof![
            (at, any::<bool>()).prop_map(|(at, lower)| PercentEncode { at, lower }),
            (at, any::<bool>()).prop_map(|(at, up)| DotSegment { at, up }),
            at.prop_map(|at| DoubleSlash { at }),
            Just(TrailingSlash),
            at.prop_map(|at| FlipCase { at }),
            at.prop_map(|at| Backslash { at }),
            (at, dropped).prop_map(|(at, c)| Insert { at, c }),
            Just(AbsoluteForm),
            prop::sample::select(vec!["?a=b", "#x", ";x", "%00", "\0", "\r\n", " "]).prop_map(Suffix),
            at.prop_map(|at| LookAlike { at }),
        ]
    }

    /// Applies a respelling to `path` (which holds at least one `/`).
    fn respell(path: &mut String, how: &Respelling) {
        use Respelling::*;
        let char_at = |s: &String, at: usize| {
            let starts: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
            starts[at % starts.len()]
        };
        let slashes: Vec<usize> = path.match_indices(['/', '\\']).map(|(i, _)| i).collect();
        let slash_at = |at: usize| slashes.get(at % slashes.len().max(1)).copied().unwrap_or(0);
        match how {
            PercentEncode { at, lower } => {
                // Half of the time one of the letters of `iam`, which matter most.
                let letters: Vec<usize> = path.match_indices(['i', 'a', 'm']).map(|(i, _)| i).collect();
                let at = if at % 2 == 0 && !letters.is_empty() {
                    letters[at / 2 % letters.len()]
                } else {
                    char_at(path, *at)
                };
                let c = path[at..].chars().next().unwrap();
                let encoded: String = c
                    .to_string()
                    .bytes()
                    .map(|b| if *lower { format!("%{b:02x}") } else { format!("%{b:02X}") })
                    .collect();
                path.replace_range(at..at + c.len_utf8(), &encoded);
            }
            DotSegment { at, up } => {
                let at = slash_at(*at);
                path.insert_str(at, if *up { "/placement/.." } else { "/." });
            }
            DoubleSlash { at } => {
                let at = slash_at(*at);
                path.insert(at, '/');
            }
            TrailingSlash => path.push('/'),
            FlipCase { at } => {
                let at = char_at(path, *at);
                let c = path[at..].chars().next().unwrap();
                if c.is_ascii_alphabetic() {
                    path.replace_range(at..at + 1, &(((c as u8) ^ 0x20) as char).to_string());
                }
            }
            Backslash { at } => {
                let at = slash_at(*at);
                path.replace_range(at..at + 1, "\\");
            }
            Insert { at, c } => {
                let at = char_at(path, *at);
                path.insert(at, *c);
            }
            AbsoluteForm => path.insert_str(0, "http://169.254.169.254/"),
            Suffix(suffix) => path.push_str(suffix),
            LookAlike { at } => {
                let candidates: Vec<usize> = path.match_indices(['i', 'a', 'm']).map(|(i, _)| i).collect();
                if candidates.is_empty() {
                    return;
                }
                let at = candidates[at % candidates.len()];
                let replacement = match &path[at..at + 1] {
                    "i" => ["\u{131}", "\u{130}", "\u{ff49}"][at % 3],
                    "a" => "\u{ff41}",
                    _ => "\u{ff4d}",
                };
                path.replace_range(at..at + 1, replacement);
            }
        }
    }

    fn role_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9+=,.@_-]{1,64}"
            .prop_filter("IMDS cannot carry a name of dots only", |n| n.contains(|c| c != '.'))
    }

    fn version() -> impl Strategy<Value = String> {
        prop_oneof![Just("latest".to_string()), "[0-9]{4}-[0-9]{2}-[0-9]{2}"]
    }

    proptest! {
        // Pure and cheap: many more cases in the same time.
        #![proptest_config(Config { cases: 2048, ..config() })]

        /// Every path routes as the literal spec says; anything else that names the node's
        /// identity, however spelled, is refused rather than proxied.
        #[test]
        fn every_path_routes_literally_and_never_proxies_the_nodes_identity(path in request_path()) {
            let route = Route::of(&path);
            let canonical = CanonicalPath::parse(&path);
            match &route {
                Route::NotCanonical(why) => prop_assert_eq!(&canonical, &Err(why.clone())),
                _ => prop_assert!(canonical.is_ok(), "{:?} routed as {:?}", path, route),
            }
            prop_assert_eq!(matches!(route, Route::NotCanonical(_)), !is_canonical(&path), "{:?}", path);
            let own = matches!(
                route,
                Route::Token
                    | Route::IamListing
                    | Route::IamInfo
                    | Route::RoleName { .. }
                    | Route::Credentials { .. }
            );
            prop_assert_eq!(own.then(|| route.clone()), own_route(&path), "{:?}", path);
            match &route {
                Route::Proxy(upstream) => {
                    prop_assert_eq!(upstream.as_str(), path.as_str(), "only the checked path goes up");
                    prop_assert!(!leniently_names_node_identity(&path), "{:?} proxied", path);
                }
                Route::Blocked => prop_assert!(canonical.unwrap().names_node_identity(), "{:?}", path),
                _ => {}
            }
            if path.contains(|c: char| c.is_control() || !c.is_ascii() || "%\\ ?#;".contains(c)) {
                prop_assert!(matches!(route, Route::NotCanonical(_)), "{:?} routed as {:?}", path, route);
            }
        }

        /// Whatever bytes arrive, what reaches the router (the URI's path, when the target
        /// parses at all; non-UTF-8 never does) never panics it, and reaches credentials or the
        /// proxy only as the literal spec says.
        #[test]
        fn arbitrary_request_targets_never_panic_or_reach_credentials_unless_literal(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut paths = vec![String::from_utf8_lossy(&bytes).into_owned()];
            if let Ok(uri) = http::Uri::try_from(bytes.as_slice()) {
                paths.push(uri.path().to_string());
            }
            for path in paths {
                let route = Route::of(&path);
                if let Route::Credentials { .. } = route {
                    prop_assert_eq!(own_route(&path), Some(route.clone()), "{:?}", path);
                }
                if let Route::Proxy(p) = &route {
                    prop_assert_eq!(p.as_str(), path.as_str());
                    prop_assert!(!leniently_names_node_identity(&path), "{:?}", path);
                }
            }
        }

        /// Respellings of a role's credentials path that a lenient service would read as the
        /// same path (percent-encoding, dot segments, doubled and trailing slashes, case,
        /// backslashes, dropped characters, absolute form, query, look-alike letters) never
        /// reach another role, are never proxied, and reach credentials only in the literal
        /// form (the name's case is kept: the agent compares it exactly with the pod's role).
        #[test]
        fn respelling_a_credentials_path_never_reaches_another_role_or_the_proxy(
            version in version(),
            extended in any::<bool>(),
            name in role_name(),
            respellings in prop::collection::vec(respelling(), 1..4),
        ) {
            let list = IAM_LISTS[usize::from(extended)];
            let literal = format!("/{version}/meta-data/iam/{list}/{name}");
            prop_assert_eq!(Route::of(&literal), Route::Credentials { name: &name, extended });
            let mut path = literal.clone();
            // The absolute form goes around the whole path: applied last, once.
            let absolute = respellings.iter().any(|how| matches!(how, Respelling::AbsoluteForm));
            for how in respellings.iter().filter(|how| !matches!(how, Respelling::AbsoluteForm)) {
                respell(&mut path, how);
            }
            if absolute {
                respell(&mut path, &Respelling::AbsoluteForm);
            }
            prop_assert_eq!(
                lenient_segments(&path),
                lenient_segments(&literal),
                "{:?} is a respelling",
                path
            );
            let route = Route::of(&path);
            match &route {
                Route::Credentials { name: routed, extended: routed_extended } => {
                    prop_assert_eq!(own_route(&path), Some(route.clone()), "{:?}", path);
                    prop_assert_eq!(*routed_extended, extended, "{:?}", path);
                    prop_assert!(
                        routed.eq_ignore_ascii_case(&name),
                        "{:?} reached {:?}, not {:?}",
                        path,
                        routed,
                        name
                    );
                }
                Route::Blocked | Route::NotCanonical(_) => {}
                other => prop_assert!(false, "{:?} routed as {:?}", path, other),
            }
        }
    }

    /// The real metadata service, recording what it was asked.
    #[derive(Default)]
    struct RecordingUpstream(Mutex<Vec<String>>);

    impl Upstream for Arc<RecordingUpstream> {
        fn get(
            &self,
            path: &CanonicalPath,
        ) -> BoxFuture<'static, Result<crate::imds::upstream::UpstreamResponse, String>> {
            self.0.lock().unwrap().push(path.to_string());
            let body = Bytes::from(format!("upstream:{path}"));
            async move {
                Ok(crate::imds::upstream::UpstreamResponse { status: 200, content_type: None, body })
            }
            .boxed()
        }
    }

    /// End to end through `Imds::handle` from a pod whose role is `app-role`: credentials are
    /// served only for the literal path of that role; the server is asked only then; what the
    /// metadata service receives is exactly the request path, allowed by the list, and never a
    /// spelling of the node's identity, even with an allow-everything list.
    #[test]
    fn only_the_pods_own_literal_route_is_served_and_only_checked_paths_go_upstream() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let upstream = Arc::new(RecordingUpstream::default());
        // One agent with the default allow-list, one that allows every path.
        let beds: Vec<Bed> = [AllowList::default_list(), AllowList::new(&[".*".to_string()]).unwrap()]
            .into_iter()
            .map(|allow| {
                let mut b = bed(false);
                b.imds.upstream = Some(Arc::new(upstream.clone()));
                b.imds.allow = allow;
                b
            })
            .collect();
        let strategy = (
            prop_oneof![
                2 => request_path(),
                2 => identity_spelling(),
                2 => (
                    prop::sample::select(vec![
                        "/latest/meta-data/iam/security-credentials/app-role",
                        "/latest/meta-data/iam/security-credentials/node-role",
                        "/latest/meta-data/iam/info",
                        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                    ]),
                    prop::collection::vec(respelling(), 0..3),
                ).prop_map(|(path, respellings)| {
                    let mut path = path.to_string();
                    for how in &respellings {
                        respell(&mut path, how);
                    }
                    path
                }),
                1 => prop::collection::vec(respelling(), 0..3).prop_map(|respellings| {
                    let mut path = "/latest/meta-data/placement/region".to_string();
                    for how in &respellings {
                        respell(&mut path, how);
                    }
                    path
                }),
            ],
            any::<bool>(),
        );
        let mut runner = TestRunner::new(config());
        let result = runner.run(&strategy, |(path, everything)| {
            let b = &beds[usize::from(everything)];
            upstream.0.lock().unwrap().clear();
            let calls = b.server.calls.load(Ordering::SeqCst);
            let got = runtime.block_on(b.get("10.0.1.1", &path));
            let route = Route::of(&path);
            let served = matches!(&route, Route::Credentials { name, .. } if *name == "app-role");
            prop_assert_eq!(
                got.status == StatusCode::OK && got.body.contains("\"AccessKeyId\""),
                served,
                "{:?} ({:?}): {} {}",
                path,
                route,
                got.status,
                got.body
            );
            let asked = b.server.calls.load(Ordering::SeqCst) > calls;
            prop_assert!(!asked || served || route == Route::IamInfo, "{:?} asked the server", path);
            let sent = upstream.0.lock().unwrap().clone();
            prop_assert!(sent.len() <= 1);
            if let Some(sent) = sent.first() {
                prop_assert_eq!(sent, &path, "exactly the request path goes upstream");
                let canonical = CanonicalPath::parse(sent).unwrap();
                prop_assert!(b.imds.allow.allows(&canonical), "{:?} was not allowed", sent);
                prop_assert!(!leniently_names_node_identity(sent), "{:?} reached the metadata service", sent);
                prop_assert_eq!(route, Route::Proxy(canonical));
                prop_assert_eq!(got.body, format!("upstream:{path}"));
            } else {
                prop_assert!(!got.body.contains("upstream:"), "{:?}: {}", path, got.body);
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
