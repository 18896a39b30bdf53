//! The paths a pod may ask for: the one canonical spelling of a path (anything else is refused,
//! never rewritten), the agent's own routes (`api/token`, `meta-data/iam/…`), and the node's own
//! identity, which is never proxied in any spelling.

use crate::metrics::Route as RouteLabel;

/// What a path asks for (a role name borrowed from the path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Token,
    IamListing,
    IamInfo,
    RoleName {
        extended: bool,
    },
    Credentials {
        name: &'a str,
        extended: bool,
    },
    /// Never proxied: the node's own IAM and identity credentials, in any spelling.
    Blocked,
    /// Refused: not a canonical path (see [`CanonicalPath`]).
    NotCanonical(NotCanonical),
    /// Proxied if the allow-list permits: exactly this path goes upstream.
    Proxy(CanonicalPath),
}

impl Route<'_> {
    /// Routes a request path (`/<version>/…`; any version segment, `latest` included). Only a
    /// [`CanonicalPath`] is routed; a segment naming `iam` or `identity-credentials` in any case or
    /// punctuation is [`Route::Blocked`] unless the path is exactly one of the IAM routes that the
    /// agent answers itself. Allocates only for a path it proxies.
    pub fn of(path: &str) -> Route<'_> {
        // The agent's own routes have at most six segments: a longer path is none of them.
        let mut parts = [""; 6];
        let count = match check_segments(path, &mut parts) {
            Ok(count) => count,
            Err(why) => return Route::NotCanonical(why),
        };
        let segments = parts.get(..count).unwrap_or_default();
        let version_ok =
            |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        // `security-credentials[-extended]`: whether extended.
        let list = |list: &str| match list {
            "security-credentials" => Some(false),
            "security-credentials-extended" => Some(true),
            _ => None,
        };
        let own = match segments {
            [v, rest @ ..] if version_ok(v) => match rest {
                ["api", "token"] => Some(Route::Token),
                ["meta-data", "iam", tail @ ..] => match tail {
                    [] | [""] => Some(Route::IamListing),
                    ["info"] | ["info", ""] => Some(Route::IamInfo),
                    [name] | [name, ""] => list(name).map(|extended| Route::RoleName { extended }),
                    [name, role] | [name, role, ""] if !role.is_empty() => {
                        list(name).map(|extended| Route::Credentials { name: role, extended })
                    }
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        match own {
            Some(route) => route,
            None if names_node_identity(path) => Route::Blocked,
            None => CanonicalPath::parse(path).map_or_else(Route::NotCanonical, Route::Proxy),
        }
    }

    pub fn label(&self) -> RouteLabel {
        match self {
            Route::Token => RouteLabel::Token,
            Route::IamListing => RouteLabel::IamListing,
            Route::IamInfo => RouteLabel::IamInfo,
            Route::RoleName { .. } => RouteLabel::RoleName,
            Route::Credentials { .. } => RouteLabel::Credentials,
            Route::Blocked | Route::NotCanonical(_) => RouteLabel::Blocked,
            Route::Proxy(_) => RouteLabel::Proxied,
        }
    }
}

/// Path segments that name the node's own identity, compared after folding (see [`folds_to`]): never proxied.
const NODE_IDENTITY_SEGMENTS: &[&str] = &["iam", "identitycredentials"];

/// Path segments that name the node's secrets, compared after folding: its bootstrap user-data,
/// its SSH public keys, and the AWS-signed forms of its identity document (`pkcs7`, `signature`,
/// `rsa2048`, `rsa4096` under `dynamic/instance-identity/`), which Vault's and SPIRE's EC2
/// attestors accept as proof of being the node. Proxied only with `--unsafe-allow-node-secrets`,
/// whatever the allow-list says.
const NODE_SECRET_SEGMENTS: &[&str] = &["userdata", "publickeys", "pkcs7", "signature", "rsa2048", "rsa4096"];

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

    /// Whether any segment names one of the node's secrets (user-data, public keys, the signed
    /// identity document) in any case or punctuation.
    pub fn names_node_secret(&self) -> bool {
        self.segments().any(|s| NODE_SECRET_SEGMENTS.iter().any(|name| folds_to(s, name)))
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
fn check_segments<'a>(path: &'a str, parts: &mut [&'a str]) -> Result<usize, NotCanonical> {
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
fn names_node_identity(path: &str) -> bool {
    path[1..].split('/').any(|s| NODE_IDENTITY_SEGMENTS.iter().any(|name| folds_to(s, name)))
}

/// Whether `segment`, lowercased without punctuation, is `name`: `IAM`, `Iam.` and
/// `identity_credentials` fold onto the names they could be mistaken for.
fn folds_to(segment: &str, name: &str) -> bool {
    let mut folded = segment.bytes().filter(u8::is_ascii_alphanumeric).map(|b| b.to_ascii_lowercase());
    name.bytes().all(|n| folded.next() == Some(n)) && folded.next().is_none()
}

#[cfg(test)]
mod tests;
