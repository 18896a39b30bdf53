//! What one STS session is for: the pod (its UID), the role, the session name CloudTrail shows,
//! the ExternalId and the session tags. A session belongs to exactly one live pod: two pods never
//! share credentials, whatever their annotations say.
//!
//! The session name is `<namespace>.<pod>`. The `iam.amazonaws.com/session-name` annotation can
//! only add to the pod's own identity: it gives `<namespace>@<override>`, always under the pod's
//! own namespace, and the `@` (which no namespace or pod name can contain) keeps a chosen name
//! from ever reading as another pod's.

use imdsgate_core::PodInfo;
use imdsgate_core::role::RoleArn;
use sha2::{Digest, Sha256};

/// STS's longest role session name.
pub const MAX_SESSION_NAME: usize = 64;

/// Separates the namespace from a session name the pod chose.
pub const OVERRIDE_SEPARATOR: char = '@';

/// The identity of one STS session; the credential cache's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The pod the session was made for; part of the key, so no two pods share one.
    pub pod_uid: String,
    pub role_arn: RoleArn,
    pub session_name: String,
    pub external_id: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// How session tags are made.
#[derive(Clone, Debug, Default)]
pub struct TagConfig {
    /// Add EKS Pod Identity-style tags.
    pub enabled: bool,
    /// Value of `eks-cluster-name`, when set.
    pub cluster_name: Option<String>,
}

impl SessionKey {
    /// The session for `pod` assuming `role`.
    pub fn for_pod(pod: &PodInfo, role: RoleArn, tags: &TagConfig) -> SessionKey {
        let session_name = session_name(&pod.namespace, &pod.name, pod.session_name.as_deref());
        let mut tag_list = Vec::new();
        if tags.enabled {
            tag_list.push(("kubernetes-namespace".to_string(), pod.namespace.clone()));
            tag_list.push(("kubernetes-pod-name".to_string(), pod.name.clone()));
            tag_list.push(("kubernetes-pod-uid".to_string(), pod.uid.clone()));
            tag_list.push((
                "kubernetes-service-account".to_string(),
                pod.service_account.clone().unwrap_or_else(|| "default".into()),
            ));
            if let Some(cluster) = &tags.cluster_name {
                tag_list.push(("eks-cluster-name".to_string(), cluster.clone()));
            }
        }
        SessionKey {
            pod_uid: pod.uid.clone(),
            role_arn: role,
            session_name,
            external_id: pod.external_id.clone(),
            tags: tag_list,
        }
    }
}

/// The session name for pod `namespace/pod`, with the pod's `session-name` override if any:
/// `<namespace>.<pod>` or `<namespace>@<override>`, sanitized for STS.
pub fn session_name(namespace: &str, pod: &str, override_name: Option<&str>) -> String {
    match override_name {
        Some(chosen) => sanitize(&format!("{namespace}{OVERRIDE_SEPARATOR}{chosen}")),
        None => sanitize(&format!("{namespace}.{pod}")),
    }
}

/// Why an override is refused at admission: it would not reach CloudTrail as written.
pub fn check_override(namespace: &str, chosen: &str) -> Result<(), String> {
    let room = MAX_SESSION_NAME.saturating_sub(namespace.len() + 1);
    if chosen.is_empty() {
        return Err("is empty".into());
    }
    if let Some(bad) = chosen.chars().find(|c| !session_char(*c)) {
        return Err(format!("contains {bad:?}; session names use letters, digits and _+=,.@- only"));
    }
    if chosen.len() > room {
        return Err(format!(
            "is {} characters; in namespace {namespace} at most {room} fit (the session name is \
             {namespace}{OVERRIDE_SEPARATOR}<name>, at most {MAX_SESSION_NAME} characters)",
            chosen.len()
        ));
    }
    Ok(())
}

fn session_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// A valid role session name: characters outside `[\w+=,.@-]` become `-`; longer than 64
/// characters is cut and suffixed with `_` and a hash of the whole (80 bits, so distinct names
/// stay distinct even against a deliberate search; `_` never appears in a namespace or pod name,
/// so no pod can be named after another's cut name); shorter than 2 is padded. Only default names
/// (`<namespace>.<pod>`) are ever cut: an override that does not fit is refused.
pub fn sanitize(raw: &str) -> String {
    let mut name: String = raw.chars().map(|c| if session_char(c) { c } else { '-' }).collect();
    if name.len() > MAX_SESSION_NAME {
        let digest = Sha256::digest(raw.as_bytes());
        let suffix = hex::encode(&digest[..10]);
        name.truncate(MAX_SESSION_NAME - suffix.len() - 1);
        name.push('_');
        name.push_str(&suffix);
    }
    while name.len() < 2 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use imdsgate_core::role::resolve;

    fn pod(namespace: &str, name: &str) -> PodInfo {
        PodInfo {
            uid: "uid-1".into(),
            namespace: namespace.into(),
            name: name.into(),
            node: Some("n".into()),
            ips: vec![],
            service_account: Some("sa".into()),
            phase: Some("Running".into()),
            role: Some("app".into()),
            external_id: None,
            session_name: None,
            node_written: false,
        }
    }

    fn arn() -> RoleArn {
        resolve("arn:aws:iam::123456789012:role/app", None).unwrap()
    }

    #[test]
    fn session_name_is_namespace_dot_pod() {
        let key = SessionKey::for_pod(&pod("team-a", "web-7d9"), arn(), &TagConfig::default());
        assert_eq!(key.session_name, "team-a.web-7d9");
        assert!(key.tags.is_empty());
    }

    #[test]
    fn an_override_stays_under_the_pods_own_namespace() {
        let mut p = pod("team-a", "web");
        p.session_name = Some("batch".into());
        let key = SessionKey::for_pod(&p, arn(), &TagConfig::default());
        assert_eq!(key.session_name, "team-a@batch");
        p.session_name = Some("my session/name!".into());
        let key = SessionKey::for_pod(&p, arn(), &TagConfig::default());
        assert_eq!(key.session_name, "team-a@my-session-name-");
    }

    #[test]
    fn an_override_never_reads_as_another_pod_or_namespace() {
        // Pod b/attacker names its session after a/victim, or after b/victim.
        let victim = SessionKey::for_pod(&pod("a", "victim"), arn(), &TagConfig::default());
        let neighbour = SessionKey::for_pod(&pod("b", "victim"), arn(), &TagConfig::default());
        for chosen in ["a.victim", "victim", "b.victim", "a@victim", "../a.victim"] {
            let mut attacker = pod("b", "attacker");
            attacker.uid = "uid-attacker".into();
            attacker.session_name = Some(chosen.into());
            let key = SessionKey::for_pod(&attacker, arn(), &TagConfig::default());
            assert!(key.session_name.starts_with("b@"), "{chosen}: {}", key.session_name);
            assert_ne!(key.session_name, victim.session_name, "{chosen}");
            assert_ne!(key.session_name, neighbour.session_name, "{chosen}");
            assert_ne!(key, victim, "{chosen}: never the victim's session");
        }
    }

    #[test]
    fn two_pods_never_share_a_session_even_with_equal_names() {
        // Same namespace, name, role and tags (a pod recreated under the same name): new UID, new key.
        let first = pod("team-a", "web");
        let mut second = pod("team-a", "web");
        second.uid = "uid-2".into();
        let a = SessionKey::for_pod(&first, arn(), &TagConfig::default());
        let b = SessionKey::for_pod(&second, arn(), &TagConfig::default());
        assert_eq!(a.session_name, b.session_name);
        assert_ne!(a, b);
    }

    #[test]
    fn overrides_are_checked_for_admission() {
        assert_eq!(check_override("team-a", "batch"), Ok(()));
        assert!(check_override("team-a", "").is_err());
        assert!(check_override("team-a", "has space").unwrap_err().contains("' '"));
        assert!(check_override("team-a", "new\nline").is_err());
        assert!(check_override("team-a", &"x".repeat(57)).is_ok(), "6 + 1 + 57 = 64 fits");
        let too_long = check_override("team-a", &"x".repeat(58)).unwrap_err();
        assert!(too_long.contains("at most 57"), "{too_long}");
    }

    #[test]
    fn no_pod_can_be_named_after_another_pods_cut_session_name() {
        let long = format!("web-{}", "a".repeat(70));
        let cut = session_name("team-a", &long, None);
        assert_eq!(cut.len(), MAX_SESSION_NAME);
        // The crafted twin: a valid pod name spelling the cut name's tail.
        let twin = cut.strip_prefix("team-a.").unwrap().replace('_', "-");
        assert_ne!(session_name("team-a", &twin, None), cut, "{cut}");
        assert!(cut[MAX_SESSION_NAME - 21..].starts_with('_'), "{cut}");
    }

    #[test]
    fn long_names_are_cut_with_a_hash_and_stay_unique() {
        let a = sanitize(&format!("{}.{}", "n".repeat(40), "a".repeat(60)));
        let b = sanitize(&format!("{}.{}b", "n".repeat(40), "a".repeat(59)));
        assert_eq!(a.len(), 64);
        assert_eq!(b.len(), 64);
        assert_ne!(a, b);
        assert!(a.starts_with(&"n".repeat(40)));
        assert_eq!(sanitize(&"x".repeat(64)), "x".repeat(64), "exactly 64 is kept whole");
    }

    #[test]
    fn sanitized_names_use_only_sts_characters() {
        let s = sanitize("ünïcode: spaces\ttabs/slashes");
        assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)), "{s}");
        assert_eq!(sanitize(""), "--");
    }

    #[test]
    fn tags_follow_eks_pod_identity() {
        let tags = TagConfig { enabled: true, cluster_name: Some("prod".into()) };
        let key = SessionKey::for_pod(&pod("team-a", "web"), arn(), &tags);
        let names: Vec<_> = key.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            names,
            [
                "kubernetes-namespace=team-a",
                "kubernetes-pod-name=web",
                "kubernetes-pod-uid=uid-1",
                "kubernetes-service-account=sa",
                "eks-cluster-name=prod"
            ]
        );
    }

    #[test]
    fn external_id_is_part_of_the_key() {
        let mut p = pod("team-a", "web");
        let plain = SessionKey::for_pod(&p, arn(), &TagConfig::default());
        p.external_id = Some("ext".into());
        let with_id = SessionKey::for_pod(&p, arn(), &TagConfig::default());
        assert_ne!(plain, with_id);
        assert_eq!(with_id.external_id.as_deref(), Some("ext"));
    }

    /// Properties of session names: always valid for STS, deterministic, distinct for distinct
    /// pods (long ones told apart by their 80-bit hash), readable when short; an override is
    /// accepted exactly when STS would take `<namespace>@<override>` as written.
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::Config;
        use std::collections::HashMap;

        fn config() -> Config {
            Config { cases: 256, failure_persistence: None, ..Config::default() }
        }

        /// STS's RoleSessionName: `[\w+=,.@-]{2,64}`, with `\w` as AWS means it (ASCII).
        fn sts_accepts(name: &str) -> bool {
            static STS: std::sync::LazyLock<regex::Regex> =
                std::sync::LazyLock::new(|| regex::Regex::new(r"^[A-Za-z0-9_+=,.@-]{2,64}$").unwrap());
            STS.is_match(name)
        }

        /// A Kubernetes namespace: a DNS-1123 label.
        fn namespace() -> impl Strategy<Value = String> {
            prop_oneof!["[a-z0-9]", "[a-z0-9][a-z0-9-]{0,61}[a-z0-9]", "team-[a-z]{1,3}"]
        }

        /// A pod name: a DNS-1123 subdomain, often long (generated names, StatefulSets).
        fn pod_name() -> impl Strategy<Value = String> {
            let label = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?";
            prop_oneof![
                prop::collection::vec(label, 1..4).prop_map(|l| l.join(".")),
                "[a-z]{1,8}-[a-z0-9]{5,10}-[a-z0-9]{5}",
                (1..240usize, "[a-z0-9]{1,4}").prop_map(|(n, tail)| format!("{}{tail}", "a".repeat(n))),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn every_session_name_is_valid_for_sts_and_deterministic(
                raw in prop_oneof![".{0,100}", "[a-z.@-]{60,70}", any::<String>()],
                namespace in ".{0,70}",
                pod in ".{0,70}",
                chosen in prop::option::of(".{0,70}"),
            ) {
                let name = sanitize(&raw);
                prop_assert!(sts_accepts(&name), "{:?} -> {:?}", raw, name);
                prop_assert_eq!(sanitize(&raw), name, "deterministic");
                let name = session_name(&namespace, &pod, chosen.as_deref());
                prop_assert!(sts_accepts(&name), "{:?} {:?} {:?} -> {:?}", namespace, pod, chosen, name);
                prop_assert_eq!(session_name(&namespace, &pod, chosen.as_deref()), name);
            }

            #[test]
            fn a_short_name_reads_as_its_pod_and_a_long_one_keeps_its_start(
                namespace in namespace(),
                pod in pod_name(),
            ) {
                let whole = format!("{namespace}.{pod}");
                let name = session_name(&namespace, &pod, None);
                if whole.len() <= MAX_SESSION_NAME {
                    prop_assert_eq!(name, whole);
                } else {
                    prop_assert_eq!(name.len(), MAX_SESSION_NAME);
                    prop_assert!(name.starts_with(&whole[..MAX_SESSION_NAME - 21]), "{} -> {}", whole, name);
                    prop_assert!(
                        name[MAX_SESSION_NAME - 21..].starts_with('_')
                            && name[MAX_SESSION_NAME - 20..]
                                .bytes()
                                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                        "{} ends in its hash", name
                    );
                }
            }

            /// Distinct pods and overrides in one batch (many sharing long prefixes, so that most
            /// are cut) never get the same name, and an override never reads as a default name.
            #[test]
            fn distinct_pods_and_overrides_get_distinct_names(
                namespaces in prop::collection::vec(namespace(), 1..4),
                pods in prop::collection::vec((any::<prop::sample::Index>(), pod_name(), 0..3usize), 1..48),
                prefix in "[a-z0-9]{50,70}",
            ) {
                let mut seen: HashMap<String, (String, String, bool)> = HashMap::new();
                for (ns, pod, shape) in &pods {
                    let ns = ns.get(&namespaces).clone();
                    let (pod, chosen) = match shape {
                        // Long names sharing a prefix: cut, told apart by the hash only.
                        0 => (format!("{prefix}{pod}"), None),
                        1 => (pod.clone(), None),
                        _ if ns.len() + 1 < MAX_SESSION_NAME => {
                            let room = MAX_SESSION_NAME - ns.len() - 1;
                            (pod.clone(), Some(pod.chars().take(room).collect::<String>()))
                        }
                        _ => (pod.clone(), None),
                    };
                    if let Some(chosen) = &chosen {
                        prop_assert_eq!(check_override(&ns, chosen), Ok(()));
                    }
                    let name = session_name(&ns, &pod, chosen.as_deref());
                    let who = (ns.clone(), chosen.clone().unwrap_or(pod.clone()), chosen.is_some());
                    if let Some(before) = seen.insert(name.clone(), who.clone()) {
                        prop_assert_eq!(&before, &who, "{:?} and {:?} share {:?}", before, who, name);
                    }
                    if chosen.is_some() {
                        prop_assert!(name.starts_with(&format!("{ns}{OVERRIDE_SEPARATOR}")), "{}", name);
                    } else {
                        prop_assert!(!name.contains(OVERRIDE_SEPARATOR), "{}", name);
                    }
                }
            }

            /// `check_override` accepts exactly the overrides for which STS takes
            /// `<namespace>@<override>` as written, and those are then used as written.
            #[test]
            fn an_override_is_accepted_iff_sts_takes_it_as_written(
                namespace in namespace(),
                chosen in prop_oneof![
                    "[A-Za-z0-9_+=,.@-]{0,70}",
                    "[A-Za-z0-9_+=,.@ /:*\n\t\u{e9}\u{130}-]{0,70}",
                    ".{0,8}",
                ],
                pod in pod_name(),
            ) {
                let written = format!("{namespace}{OVERRIDE_SEPARATOR}{chosen}");
                let expected = !chosen.is_empty() && sts_accepts(&written);
                let verdict = check_override(&namespace, &chosen);
                prop_assert_eq!(verdict.is_ok(), expected, "{:?}: {:?}", written, verdict);
                if expected {
                    prop_assert_eq!(session_name(&namespace, &pod, Some(&chosen)), written);
                }
            }
        }
    }
}
