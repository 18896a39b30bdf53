//! IMDSv2 session tokens. A token is `base64url(expiry || HMAC-SHA256(key, expiry || pod UID))`:
//! nothing is stored, so tokens survive agent restarts (the key lives in `--token-key-file`), and a
//! token is useless from any other pod because the MAC covers the pod's UID.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Shortest and longest TTL a client may ask for, as real IMDS.
pub const MIN_TTL: u64 = 1;
pub const MAX_TTL: u64 = 21_600;
const DOMAIN: &[u8] = b"imdsgate-imdsv2-token-v1";
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read token key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write token key file {path}: {source}")]
    Create { path: String, source: std::io::Error },
}

/// Why a token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token was not issued to this pod")]
    Foreign,
}

/// The MAC key, as the HMAC state keyed with it and fed the domain once: cloned per token, so
/// issuing or checking one does not hash the key again.
#[derive(Clone)]
pub struct TokenKey(Hmac<Sha256>);

impl TokenKey {
    /// Reads the key from `path`, or generates one and keeps it there (mode 0600). A file that
    /// does not hold a key (empty or truncated, say) is replaced with a warning: tokens issued
    /// under the lost key stop working and SDKs fetch new ones. The file is only ever written
    /// whole: a temporary file in the same directory, synced, then moved into place.
    pub fn load_or_create(path: &Path) -> Result<TokenKey, KeyError> {
        let shown = || path.display().to_string();
        let replace = match std::fs::read_to_string(path) {
            Ok(text) => match parse_key(&text) {
                Some(key) => return Ok(TokenKey::from_bytes(key)),
                None => {
                    tracing::warn!(
                        path = %path.display(),
                        "the token key file does not hold a key; replacing it (IMDSv2 tokens issued before are void)"
                    );
                    true
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            // Not text at all: as corrupt as a wrong length.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(path = %path.display(), "the token key file is not text; replacing it");
                true
            }
            Err(source) => return Err(KeyError::Read { path: shown(), source }),
        };
        let key: [u8; KEY_LEN] = rand::random();
        match write_atomically(path, hex::encode(key).as_bytes(), replace) {
            Ok(()) => Ok(TokenKey::from_bytes(key)),
            // Another agent process created it first: use its key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match std::fs::read_to_string(path) {
                Ok(text) => parse_key(&text)
                    .map(TokenKey::from_bytes)
                    .ok_or_else(|| KeyError::Create { path: shown(), source: e }),
                Err(source) => Err(KeyError::Read { path: shown(), source }),
            },
            Err(source) => Err(KeyError::Create { path: shown(), source }),
        }
    }

    /// A key from its bytes (tests and the hot-path harness; the agent loads its key from a file).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> TokenKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&bytes).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        TokenKey(mac)
    }

    /// A token for `pod_uid` valid for `ttl` from `now`.
    pub fn issue(&self, pod_uid: &str, ttl: Duration, now: SystemTime) -> String {
        let expiry = unix(now).saturating_add(ttl.as_secs()).to_be_bytes();
        let mut raw = [0u8; 8 + 32];
        raw[..8].copy_from_slice(&expiry);
        raw[8..].copy_from_slice(&self.mac(&expiry, pod_uid).finalize().into_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks that `token` was issued to `pod_uid` and has not expired at `now`.
    pub fn verify(&self, token: &str, pod_uid: &str, now: SystemTime) -> Result<(), TokenError> {
        if token.len() > 128 {
            return Err(TokenError::Malformed);
        }
        // Room for anything 128 characters decode to: only the length check below refuses.
        let mut buf = [0u8; 96];
        let len = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(token.trim(), &mut buf)
            .map_err(|_| TokenError::Malformed)?;
        if len != 8 + 32 {
            return Err(TokenError::Malformed);
        }
        let (expiry, tag) = buf[..len].split_at(8);
        let expiry: [u8; 8] = expiry.try_into().map_err(|_| TokenError::Malformed)?;
        self.mac(&expiry, pod_uid).verify_slice(tag).map_err(|_| TokenError::Foreign)?;
        if u64::from_be_bytes(expiry) <= unix(now) {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    fn mac(&self, expiry: &[u8; 8], pod_uid: &str) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(expiry);
        mac.update(pod_uid.as_bytes());
        mac
    }
}

fn parse_key(text: &str) -> Option<[u8; KEY_LEN]> {
    hex::decode(text.trim()).ok()?.try_into().ok()
}

/// Puts `contents` at `path` (mode 0600) so that `path` never holds anything but all of it: written
/// to a temporary file beside it and synced, then renamed over `path` (`replace`) or linked to it
/// (otherwise: fails with `AlreadyExists` if `path` appeared meanwhile), then the directory synced.
fn write_atomically(path: &Path, contents: &[u8], replace: bool) -> std::io::Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.{:016x}.tmp", std::process::id(), rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        if replace {
            return std::fs::rename(&temp, path);
        }
        match std::fs::hard_link(&temp, path) {
            // A file system without hard links: a rename still never exposes a partial file.
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => std::fs::rename(&temp, path),
            linked => linked,
        }
    })();
    if !(replace && written.is_ok()) {
        // Linked (the name stays on `path`) or failed: the temporary name goes.
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header: an integer from 1 to 21600.
pub fn parse_ttl(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    (MIN_TTL..=MAX_TTL).contains(&secs).then(|| Duration::from_secs(secs))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_token_works_for_its_pod_until_it_expires() {
        let key = TokenKey::from_bytes([7; 32]);
        let token = key.issue("uid-a", Duration::from_secs(60), at(NOW));
        assert_eq!(key.verify(&token, "uid-a", at(NOW + 59)), Ok(()));
        assert_eq!(key.verify(&token, "uid-a", at(NOW + 60)), Err(TokenError::Expired));
        assert_eq!(key.verify(&token, "uid-b", at(NOW)), Err(TokenError::Foreign));
    }

    #[test]
    fn tokens_from_another_key_or_tampered_are_refused() {
        let key = TokenKey::from_bytes([7; 32]);
        let other = TokenKey::from_bytes([8; 32]);
        let token = other.issue("uid-a", Duration::from_secs(60), at(NOW));
        assert_eq!(key.verify(&token, "uid-a", at(NOW)), Err(TokenError::Foreign));
        // Pushing the expiry forward breaks the MAC.
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key.issue("uid-a", Duration::from_secs(1), at(NOW)))
            .unwrap();
        raw[7] = raw[7].wrapping_add(100);
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(key.verify(&forged, "uid-a", at(NOW)), Err(TokenError::Foreign));
        for junk in ["", "!!!", "AAAA", &"A".repeat(500)] {
            assert_eq!(key.verify(junk, "uid-a", at(NOW)), Err(TokenError::Malformed), "{junk:?}");
        }
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(parse_ttl(Some("1")), Some(Duration::from_secs(1)));
        assert_eq!(parse_ttl(Some("21600")), Some(Duration::from_secs(21600)));
        for bad in [
            None,
            Some(""),
            Some("0"),
            Some("21601"),
            Some("-5"),
            Some("1.5"),
            Some("abc"),
            Some("99999999999999999999"),
        ] {
            assert_eq!(parse_ttl(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_key_file_is_created_once_and_tokens_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("imdsgate-token-test-{}", std::process::id()));
        let path = dir.join("key");
        let first = TokenKey::load_or_create(&path).unwrap();
        let token = first.issue("uid-a", Duration::from_secs(3600), SystemTime::now());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let restarted = TokenKey::load_or_create(&path).unwrap();
        assert_eq!(restarted.verify(&token, "uid-a", SystemTime::now()), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("imdsgate-token-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_empty_or_corrupt_key_file_is_replaced_by_a_fresh_key() {
        let corrupt: [&[u8]; 6] = [b"", b"short", &[b'z'; 64], &[b'a'; 62], &[b'a'; 66], &[0xff, 0xfe, 0x00]];
        for (i, contents) in corrupt.into_iter().enumerate() {
            let dir = TempDir::new();
            let path = dir.path().join("token.key");
            std::fs::write(&path, contents).unwrap();
            // What a crash left behind (a file written in place would be this one, truncated).
            let before = std::fs::File::open(&path).unwrap();
            let key = TokenKey::load_or_create(&path).unwrap_or_else(|e| panic!("case {i}: {e}"));

            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text.len(), 2 * KEY_LEN, "case {i}: {text:?}");
            let token = key.issue("uid-a", Duration::from_secs(60), SystemTime::now());
            let reloaded = TokenKey::load_or_create(&path).unwrap();
            assert_eq!(reloaded.verify(&token, "uid-a", SystemTime::now()), Ok(()), "case {i}: the key kept");
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600, "case {i}");
            // Replaced by a rename, not rewritten in place: the old file still holds the old bytes.
            let mut old = Vec::new();
            std::io::Read::read_to_end(&mut &before, &mut old).unwrap();
            assert_eq!(old, contents, "case {i}: the key went into a new file");
            assert_eq!(files_in(dir.path()), ["token.key"], "case {i}: no temporary file left");
        }
    }

    #[test]
    fn a_new_key_file_appears_whole_and_an_existing_one_is_never_overwritten() {
        let dir = TempDir::new();
        let path = dir.path().join("sub").join("token.key");
        write_atomically(&path, b"first", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let second = write_atomically(&path, b"second", false).unwrap_err();
        assert_eq!(second.kind(), std::io::ErrorKind::AlreadyExists, "another process's key stays");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_atomically(&path, b"third", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        assert_eq!(files_in(&dir.path().join("sub")), ["token.key"]);
    }

    /// Properties of tokens: bound to the key, the pod and the lifetime that issued them; no
    /// edit of a token's text yields another valid token; hostile text never panics.
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::Config;

        fn config() -> Config {
            Config { cases: 256, failure_persistence: None, ..Config::default() }
        }

        fn uid() -> impl Strategy<Value = String> {
            prop_oneof!["[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", ".{0,40}",]
        }

        /// Issue time and TTL: any second from 1970 to far beyond 2100, any allowed TTL.
        fn issued() -> impl Strategy<Value = (u64, u64)> {
            (1u64..(1 << 40), MIN_TTL..=MAX_TTL)
        }

        /// A time offset from issuance, often near the expiry.
        fn offset(ttl: u64) -> impl Strategy<Value = i64> {
            let ttl = ttl as i64;
            prop_oneof![-100_000i64..3 * ttl, (ttl - 2)..(ttl + 2)]
        }

        /// Whether `mutated` differs from `token` only by whitespace around it, which `verify`
        /// deliberately trims (it is the same token).
        fn same_token(token: &str, mutated: &str) -> bool {
            mutated.trim() == token
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn a_token_verifies_only_for_its_key_and_pod_and_only_before_its_expiry(
                key in any::<[u8; 32]>(),
                other_key in any::<[u8; 32]>(),
                (pod, other_pod) in (uid(), uid()),
                ((issued_at, ttl), dt) in issued().prop_flat_map(|(at, ttl)| (Just((at, ttl)), offset(ttl))),
            ) {
                let key_bytes = key;
                let key = TokenKey::from_bytes(key);
                let token = key.issue(&pod, Duration::from_secs(ttl), at(issued_at));
                let now = at(issued_at.saturating_add_signed(dt));
                let expected = if (dt as i128) < ttl as i128 { Ok(()) } else { Err(TokenError::Expired) };
                prop_assert_eq!(key.verify(&token, &pod, now), expected, "dt {} ttl {}", dt, ttl);
                if other_pod != pod {
                    prop_assert_eq!(key.verify(&token, &other_pod, now), Err(TokenError::Foreign));
                }
                if other_key != key_bytes {
                    let other = TokenKey::from_bytes(other_key);
                    prop_assert_eq!(other.verify(&token, &pod, now), Err(TokenError::Foreign));
                }
            }

            #[test]
            fn no_single_character_edit_truncation_or_extension_yields_a_valid_token(
                key in any::<[u8; 32]>(),
                pod in uid(),
                (issued_at, ttl) in issued(),
                at_index in any::<usize>(),
                replacement in prop_oneof![
                    3 => prop::sample::select(
                        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= \t\n."
                            .chars()
                            .collect::<Vec<_>>()
                    ),
                    1 => any::<char>(),
                ],
                cut in any::<usize>(),
                (prefix, suffix) in (".{0,3}", ".{0,3}"),
            ) {
                let key = TokenKey::from_bytes(key);
                let now = at(issued_at);
                let token = key.issue(&pod, Duration::from_secs(ttl), now);
                prop_assert_eq!(key.verify(&token, &pod, now), Ok(()));
                let i = at_index % token.len();
                let original = token.as_bytes()[i] as char;
                if replacement != original {
                    let mut edited = token.clone();
                    edited.replace_range(i..i + 1, &replacement.to_string());
                    prop_assert!(key.verify(&edited, &pod, now).is_err(), "{:?} -> {:?}", token, edited);
                }
                let truncated = &token[..cut % token.len()];
                prop_assert!(key.verify(truncated, &pod, now).is_err(), "{:?}", truncated);
                let extended = format!("{prefix}{token}{suffix}");
                if !same_token(&token, &extended) {
                    prop_assert!(key.verify(&extended, &pod, now).is_err(), "{:?}", extended);
                }
            }

            #[test]
            fn a_raw_token_with_any_expiry_and_tag_but_the_right_mac_is_refused(
                key in any::<[u8; 32]>(),
                raw in prop::collection::vec(any::<u8>(), 40),
                pod in uid(),
            ) {
                let key = TokenKey::from_bytes(key);
                let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
                let expiry: [u8; 8] = raw[..8].try_into().unwrap();
                let genuine = key.mac(&expiry, &pod).finalize().into_bytes();
                prop_assume!(genuine.as_slice() != &raw[8..]);
                prop_assert_eq!(key.verify(&token, &pod, at(0)), Err(TokenError::Foreign));
            }

            #[test]
            fn arbitrary_text_is_refused_without_panicking(
                text in ".{0,200}",
                pod in uid(),
                now in any::<u64>(),
            ) {
                let key = TokenKey::from_bytes([3; 32]);
                let now = SystemTime::UNIX_EPOCH
                    .checked_add(Duration::from_secs(now))
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                prop_assert!(key.verify(&text, &pod, now).is_err());
            }

            #[test]
            fn the_ttl_header_is_an_integer_from_1_to_21600(
                text in prop_oneof![
                    "[ \t]{0,2}[+-]?[0-9]{1,7}[ \t]{0,2}",
                    "0*(1|21600|21601|0|18446744073709551615|18446744073709551616)",
                    "[0-9.,eE+_ x-]{0,8}",
                    ".{0,12}",
                ],
            ) {
                // Stated without the parser: optional sign `+`, decimal digits, value in range.
                let trimmed = text.trim();
                let digits = trimmed.strip_prefix('+').unwrap_or(trimmed);
                let value = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| {
                    let significant = digits.trim_start_matches('0');
                    if significant.len() > 6 { u64::MAX } else { significant.parse::<u64>().unwrap_or(0) }
                });
                let expected = value.filter(|v| (1..=21_600).contains(v)).map(Duration::from_secs);
                prop_assert_eq!(parse_ttl(Some(&text)), expected, "{:?}", text);
            }
        }
    }
}
