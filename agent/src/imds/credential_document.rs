//! The JSON documents the agent serves under `iam/`, rendered exactly as EC2's metadata service
//! writes them (two-space indent, `"Key" : value`, no final newline): the `security-credentials`
//! document (`Code`, `LastUpdated`, `Type`, `AccessKeyId`, `SecretAccessKey`, `Token`,
//! `Expiration`, and `AccountId` for `-extended`) and `iam/info`. This module owns that rendering
//! and depends on neither the IMDS handler nor the credential cache: the cache renders each
//! credentials document once when credentials arrive ([`credentials_json`]) and the handler serves
//! those bytes as they are.

use imdsgate_proto::Credentials;
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// The credentials document exactly as IMDS writes it.
pub fn credentials_json(c: &Credentials, extended: bool) -> String {
    let mut fields = vec![
        ("Code", quoted("Success")),
        ("LastUpdated", quoted(&utc(c.issued_at))),
        ("Type", quoted("AWS-HMAC")),
        ("AccessKeyId", quoted(&c.access_key_id)),
        ("SecretAccessKey", quoted(&c.secret_access_key)),
        ("Token", quoted(&c.session_token)),
        ("Expiration", quoted(&utc(c.expiration))),
    ];
    if extended {
        fields.push(("AccountId", quoted(&c.account_id)));
    }
    document(&fields)
}

/// `iam/info` describing the pod's role as if it were an instance profile.
pub fn info_json(c: &Credentials) -> String {
    let profile_arn = c.role_arn.replacen(":role/", ":instance-profile/", 1);
    let digest = Sha256::digest(c.role_arn.as_bytes());
    let profile_id = format!("AIPA{}", hex::encode_upper(&digest[..8]));
    document(&[
        ("Code", quoted("Success")),
        ("LastUpdated", quoted(&utc(c.issued_at))),
        ("InstanceProfileArn", quoted(&profile_arn)),
        ("InstanceProfileId", quoted(&profile_id)),
    ])
}

fn utc(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn document(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("  \"{k}\" : {v}")).collect();
    format!("{{\n{}\n}}", body.join(",\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Credentials whose fields need JSON escaping, issued mid-second (timestamps truncate).
    fn creds() -> Credentials {
        let issued_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_225_600_500);
        Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "se\"cr/et\\".into(),
            session_token: "tok\nen".into(),
            expiration: issued_at + Duration::from_secs(3600),
            issued_at,
            role_arn: "arn:aws:iam::123456789012:role/app-role".into(),
            account_id: "123456789012".into(),
        }
    }

    const CREDENTIALS: &str = "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2026-01-01T00:00:00Z\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIAEXAMPLE\",\n  \"SecretAccessKey\" : \"se\\\"cr/et\\\\\",\n  \"Token\" : \"tok\\nen\",\n  \"Expiration\" : \"2026-01-01T01:00:00Z\"\n}";

    #[test]
    fn credentials_document_is_byte_for_byte_the_imds_one() {
        assert_eq!(credentials_json(&creds(), false), CREDENTIALS);
        let doc: serde_json::Value = serde_json::from_str(CREDENTIALS).unwrap();
        assert_eq!(doc["SecretAccessKey"], "se\"cr/et\\", "values are JSON-escaped");
        assert_eq!(doc["Token"], "tok\nen");
    }

    #[test]
    fn extended_document_adds_the_account_id_last() {
        let extended = CREDENTIALS.replace("\"\n}", "\",\n  \"AccountId\" : \"123456789012\"\n}");
        assert_eq!(credentials_json(&creds(), true), extended);
    }

    #[test]
    fn info_document_names_the_role_as_an_instance_profile() {
        assert_eq!(
            info_json(&creds()),
            "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2026-01-01T00:00:00Z\",\n  \
             \"InstanceProfileArn\" : \"arn:aws:iam::123456789012:instance-profile/app-role\",\n  \
             \"InstanceProfileId\" : \"AIPA5298C0D08B8037E5\"\n}"
        );
    }

    #[test]
    fn a_time_before_the_epoch_renders_empty_instead_of_failing() {
        let mut c = creds();
        c.issued_at = SystemTime::UNIX_EPOCH - Duration::from_secs(400_000 * 365 * 86_400);
        assert!(credentials_json(&c, false).contains("\"LastUpdated\" : \"\","));
    }
}
