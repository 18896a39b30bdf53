//! What one STS session is for: the role, the session name CloudTrail shows (`<namespace>.<pod>`,
//! sanitized, at most 64 characters), the ExternalId and the session tags. Two pods share cached
//! credentials only when all of these are equal.

use crate::role::RoleArn;
use imdsgate_core::PodInfo;
use sha2::{Digest, Sha256};

/// STS's longest role session name.
pub const MAX_SESSION_NAME: usize = 64;

/// The identity of one STS session; the credential cache's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
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
        let session_name = match &pod.session_name {
            Some(name) => sanitize(name),
            None => sanitize(&format!("{}.{}", pod.namespace, pod.name)),
        };
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
        SessionKey { role_arn: role, session_name, external_id: pod.external_id.clone(), tags: tag_list }
    }
}

/// A valid role session name: characters outside `[\w+=,.@-]` become `-`; longer than 64
/// characters is cut and suffixed with a short hash of the whole so distinct names stay distinct;
/// shorter than 2 is padded.
pub fn sanitize(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' })
        .collect();
    if name.len() > MAX_SESSION_NAME {
        let digest = Sha256::digest(raw.as_bytes());
        let suffix = hex::encode(&digest[..4]);
        name.truncate(MAX_SESSION_NAME - suffix.len() - 1);
        name.push('-');
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
    use crate::role::resolve;

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
    fn annotation_overrides_and_is_sanitized() {
        let mut p = pod("team-a", "web");
        p.session_name = Some("my session/name!".into());
        let key = SessionKey::for_pod(&p, arn(), &TagConfig::default());
        assert_eq!(key.session_name, "my-session-name-");
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
}
