//! A raw-HTTP fuzzer for the agent's IMDS API (`e2e/tests/fuzz.rs`), run inside a pod's network
//! namespace against 169.254.169.254:80, so every request goes through the node's real DNAT rule
//! to the agent. Requests are valid IMDS requests from a seed corpus (token PUT, role listing,
//! credentials with and without a token, proxied and blocked paths), mutated in their method,
//! target (encodings, dot segments, length, control characters, NUL, non-UTF-8), version, headers
//! (duplicates, huge, missing Host, bogus TTLs and tokens, X-Forwarded-For, Transfer-Encoding and
//! Content-Length conflicts), body and framing (pipelining, line endings), and delivered whole,
//! slowly, cut short or abandoned.
//!
//! Request `i` depends only on `--seed` and `i`, so any request can be made again with
//! `--seed S --first i --requests 1 --verbose`. Every byte read back is checked: a response
//! containing a `--forbidden` substring that the request did not itself contain, or an access key
//! other than `--allowed-key` (`AccessKeyId`, or any `ASIA…`/`AKIA…` token), is a violation.
//! Prints one JSON summary on stdout; exits 1 on any violation, 2 on bad arguments. Bounded in
//! count and time, stops by itself, and only talks to link-local, private or loopback addresses.
#![forbid(unsafe_code)]

use anyhow::{Result, bail};
use clap::Parser;
use regex::bytes::Regex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_SECONDS: u64 = 6 * 3600;
/// Violations kept in the summary (all are counted).
const KEEP_VIOLATIONS: usize = 50;
/// Examples kept of each kind of unanswered request.
const KEEP_EXAMPLES: usize = 5;
/// Bytes of a connection's answers read at most.
const MAX_READ: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(name = "imdsgate-fuzz")]
struct Cli {
    /// Seed of the generator: the same seed makes the same requests.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run this many requests (cases; a pipelined case sends several).
    #[arg(long)]
    requests: Option<u64>,
    /// Run for this long (with --requests: whichever ends first).
    #[arg(long)]
    seconds: Option<u64>,
    #[arg(long, default_value = "169.254.169.254:80")]
    target: SocketAddr,
    /// A substring no response may contain (repeatable).
    #[arg(long)]
    forbidden: Vec<String>,
    /// The only access key this pod may ever see (none: it may see none).
    #[arg(long)]
    allowed_key: Option<String>,
    /// Role names to put in paths, besides the one the pod's listing names (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Index of the first request (to replay one request of a run).
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// How long to wait for the first byte of an answer.
    #[arg(long, default_value_t = 1500)]
    answer_timeout_ms: u64,
    /// Print each request and what came back on stderr.
    #[arg(long)]
    verbose: bool,
}

// ---------------------------------------------------------------------------------------------
// A small deterministic generator (SplitMix64): no dependency whose stream could change.

use imdsgate_e2e::seeded::SplitMix as Rng;

/// A generator seeded from `seed`.
fn rng_new(seed: u64) -> Rng {
    let mut rng = Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B);
    rng.next_u64();
    rng
}

/// The generator of request `index` of the run with `seed`.
fn rng_for_case(seed: u64, index: u64) -> Rng {
    rng_new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// One header line: `name sep value`; a line without a colon has `sep` and `value` empty.
#[derive(Clone, Debug)]
struct Header {
    name: Vec<u8>,
    sep: Vec<u8>,
    value: Vec<u8>,
}

impl Header {
    fn new(name: &str, value: impl AsRef<[u8]>) -> Header {
        Header { name: name.as_bytes().to_vec(), sep: b": ".to_vec(), value: value.as_ref().to_vec() }
    }

    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// One HTTP/1.x request, built up from a seed and mutated before it is written out.
#[derive(Clone, Debug)]
struct Req {
    /// Bytes before the request line (leading empty lines, say).
    prefix: Vec<u8>,
    method: Vec<u8>,
    target: Vec<u8>,
    /// None: an HTTP/0.9-style request line without a version.
    version: Option<Vec<u8>>,
    headers: Vec<Header>,
    body: Vec<u8>,
    /// Line ending of the head.
    eol: Vec<u8>,
    /// Whether a `Content-Length` matching the body is added when the body is not empty and no
    /// framing header was set by a mutation.
    auto_length: bool,
    /// Bytes after the body (a second request smuggled after a short Content-Length, say).
    suffix: Vec<u8>,
}

impl Req {
    fn new(method: &str, target: &str) -> Req {
        Req {
            prefix: Vec::new(),
            method: method.as_bytes().to_vec(),
            target: target.as_bytes().to_vec(),
            version: Some(b"HTTP/1.1".to_vec()),
            headers: vec![Header::new("Host", "169.254.169.254")],
            body: Vec::new(),
            eol: b"\r\n".to_vec(),
            auto_length: true,
            suffix: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers.push(Header::new(name, value));
        self
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|h| !h.is(name));
    }

    fn set(&mut self, name: &str, value: impl AsRef<[u8]>) {
        self.remove(name);
        self.headers.push(Header::new(name, value));
    }

    fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.is(name))
    }

    fn write(&self) -> Vec<u8> {
        let mut out = self.prefix.clone();
        out.extend_from_slice(&self.method);
        out.push(b' ');
        out.extend_from_slice(&self.target);
        if let Some(version) = &self.version {
            out.push(b' ');
            out.extend_from_slice(version);
        }
        out.extend_from_slice(&self.eol);
        for h in &self.headers {
            out.extend_from_slice(&h.name);
            out.extend_from_slice(&h.sep);
            out.extend_from_slice(&h.value);
            out.extend_from_slice(&self.eol);
        }
        let framed = self.has("content-length") || self.has("transfer-encoding");
        if self.auto_length && !framed && !self.body.is_empty() {
            out.extend_from_slice(format!("Content-Length: {}", self.body.len()).as_bytes());
            out.extend_from_slice(&self.eol);
        }
        out.extend_from_slice(&self.eol);
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.suffix);
        out
    }
}

/// What a run knows: the pod's real token and role names worth asking for.
struct Ctx {
    token: String,
    roles: Vec<String>,
}

const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";

const PROXIED: &[&str] = &[
    "/latest/meta-data/placement/region",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/instance-type",
    "/latest/meta-data/local-ipv4",
    "/latest/meta-data/hostname",
    "/latest/meta-data/mac",
    "/latest/dynamic/instance-identity/document",
];

const BLOCKED: &[&str] = &[
    "/latest/user-data",
    "/latest/meta-data/",
    "/latest/meta-data/iam/security-credentials/node-role",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/identity-credentials/ec2/info",
    "/latest/meta-data/network/interfaces/macs/",
];

/// A valid request from the corpus.
fn seed(ctx: &Ctx, rng: &mut Rng, notes: &mut Vec<String>) -> Req {
    let role = rng.pick(&ctx.roles).clone();
    let version = *rng.pick(&["latest", "latest", "latest", "2009-04-04", "2021-07-15"]);
    let (name, mut req) = match rng.below(12) {
        0 | 1 => {
            let ttl = rng.pick(&["21600", "60", "1", "300"]).to_string();
            ("token", Req::new("PUT", &format!("/{version}/api/token")).header(TTL_HEADER, ttl))
        }
        2 => ("listing", Req::new("GET", &format!("/{version}/meta-data/iam/security-credentials/"))),
        3 => ("listing-bare", Req::new("GET", &format!("/{version}/meta-data/iam/security-credentials"))),
        4..=6 => {
            ("credentials", Req::new("GET", &format!("/{version}/meta-data/iam/security-credentials/{role}")))
        }
        7 => (
            "credentials-extended",
            Req::new("GET", &format!("/{version}/meta-data/iam/security-credentials-extended/{role}")),
        ),
        8 => (
            "iam",
            Req::new("GET", rng.pick::<&str>(&["/latest/meta-data/iam/info", "/latest/meta-data/iam/"])),
        ),
        9 | 10 => ("proxied", Req::new("GET", rng.pick::<&str>(PROXIED))),
        _ => ("blocked", Req::new("GET", rng.pick::<&str>(BLOCKED))),
    };
    notes.push(format!("seed:{name}"));
    if rng.percent(60) {
        req.headers.push(Header::new(TOKEN_HEADER, &ctx.token));
    }
    if rng.percent(50) {
        req.headers.push(Header::new("User-Agent", "aws-sdk-rust/1.0 os/linux"));
    }
    if rng.percent(30) {
        req.headers.push(Header::new("Accept", "*/*"));
    }
    req.headers.push(Header::new("Connection", "close"));
    req
}

fn percent_encode(b: u8, lower: bool) -> Vec<u8> {
    if lower { format!("%{b:02x}").into_bytes() } else { format!("%{b:02X}").into_bytes() }
}

fn splice(v: &mut Vec<u8>, at: usize, remove: usize, with: &[u8]) {
    let at = at.min(v.len());
    let end = (at + remove).min(v.len());
    v.splice(at..end, with.iter().copied());
}

/// Positions of `/` in a target (0 for an empty one).
fn slashes(t: &[u8]) -> Vec<usize> {
    let s: Vec<usize> = t.iter().enumerate().filter(|(_, b)| **b == b'/').map(|(i, _)| i).collect();
    if s.is_empty() { vec![0] } else { s }
}

/// The byte range of one random segment (between slashes).
fn segment(t: &[u8], rng: &mut Rng) -> (usize, usize) {
    let s = slashes(t);
    let i = rng.below(s.len());
    let start = if t.get(s[i]) == Some(&b'/') { s[i] + 1 } else { s[i] };
    let end = s.get(i + 1).copied().unwrap_or(t.len());
    (start.min(end), end)
}

fn mutate_target(ctx: &Ctx, t: &mut Vec<u8>, rng: &mut Rng) -> &'static str {
    let len = t.len();
    match rng.below(22) {
        0 => {
            let dot = *rng.pick(&[
                "/.",
                "/..",
                "/x/..",
                "/%2e",
                "/%2E%2E",
                "/.%2e",
                "/%2e.",
                "/..;",
                "/.\\",
                "/%2e%2e%2f..",
            ]);
            let at = *rng.pick(&slashes(t));
            splice(t, at, 0, dot.as_bytes());
            "dot-segment"
        }
        1 if len > 0 => {
            let at = rng.below(len);
            let lower = rng.percent(50);
            let enc = percent_encode(t[at], lower);
            splice(t, at, 1, &enc);
            "percent-encoded"
        }
        2 if len > 0 => {
            let at = rng.below(len);
            let enc = format!("%25{:02X}", t[at]);
            splice(t, at, 1, enc.as_bytes());
            "double-encoded"
        }
        3 => {
            let with = *rng.pick(&["%2F", "%2f", "%5C", "%5c", "\\", "%252F", "%c0%af", "%e2%88%95"]);
            let at = *rng.pick(&slashes(t));
            let remove = usize::from(t.get(at) == Some(&b'/'));
            splice(t, at, remove, with.as_bytes());
            "encoded-slash"
        }
        4 => {
            let (s, e) = segment(t, rng);
            let upper = rng.percent(50);
            for b in &mut t[s..e] {
                if upper || rng.percent(50) {
                    *b = b.to_ascii_uppercase();
                }
            }
            "case"
        }
        5 => {
            let at = *rng.pick(&slashes(t));
            splice(t, at, 0, b"/");
            "double-slash"
        }
        6 => {
            let prefix = *rng.pick(&[
                "http://169.254.169.254",
                "HTTP://169.254.169.254:80",
                "http://evil.example",
                "//169.254.169.254",
                "http://[fd00:ec2::254]",
                "http://169.254.169.254@evil.example",
                "https://169.254.169.254",
                "http://localhost:8181",
            ]);
            splice(t, 0, 0, prefix.as_bytes());
            "absolute-form"
        }
        7 => {
            if t.first() == Some(&b'/') {
                t.remove(0);
            }
            "no-leading-slash"
        }
        8 => {
            let suffix = *rng.pick(&[
                "?x=1",
                "?",
                "#f",
                ";x",
                ".",
                "/",
                "%00",
                "%",
                "%zz",
                "/.",
                "/..",
                "..",
                "%20",
                " ",
                "\t",
                "?../../iam/security-credentials/node-role",
                "/../node-role",
                "%2F..%2Fnode-role",
            ]);
            t.extend_from_slice(suffix.as_bytes());
            "suffix"
        }
        9 => {
            if rng.percent(50) {
                let n = rng.range(10, 6000);
                for _ in 0..n {
                    t.extend_from_slice(b"/a");
                }
            } else {
                let n = rng.range(1000, 70_000);
                let at = *rng.pick(&slashes(t));
                splice(t, at, 0, &vec![b'A'; n]);
            }
            "long"
        }
        10 => {
            let c = *rng.pick(&[0x00u8, 0x01, 0x08, 0x09, 0x0a, 0x0d, 0x1b, 0x7f]);
            let at = rng.below(len + 1);
            splice(t, at, 0, &[c]);
            "control-char"
        }
        11 => {
            let bad: &[u8] = rng.pick::<&[u8]>(&[
                &[0x80u8][..],
                &[0xff],
                &[0xc0, 0xaf],
                &[0xc0, 0xae],
                &[0xed, 0xa0, 0x80],
                &[0xf8, 0x88, 0x80, 0x80, 0x80][..],
                &[0xfe],
            ]);
            let at = rng.below(len + 1);
            splice(t, at, 0, bad);
            "non-utf8"
        }
        12 => {
            let look = *rng
                .pick(&["\u{2215}", "\u{FF0F}", "\u{0131}", "\u{FF49}", "\u{202E}", "\u{00A0}", "\u{FEFF}"]);
            let at = rng.below(len + 1);
            splice(t, at, 0, look.as_bytes());
            "unicode"
        }
        13 => {
            let mut names: Vec<String> = ctx.roles.clone();
            names.extend(["node-role", "", "..", ".", "*"].map(String::from));
            let name = rng.pick(&names).clone();
            if rng.percent(50) {
                let start = t.iter().rposition(|b| *b == b'/').map_or(0, |p| p + 1);
                let end = t.len();
                splice(t, start, end - start, name.as_bytes());
            } else {
                t.push(b'/');
                t.extend_from_slice(name.as_bytes());
            }
            "role-segment"
        }
        14 => {
            let long = "a".repeat(300);
            let v = *rng.pick(&[
                "latest",
                "2009-04-04",
                "1.0",
                "LATEST",
                "",
                ".",
                "..",
                "%6catest",
                "latest%00",
                "latest.",
                "la test",
                long.as_str(),
                "2021-03-23",
                "latest;",
                "-",
                "latest:",
            ]);
            let (s, e) = if t.first() == Some(&b'/') {
                let end = t[1..].iter().position(|b| *b == b'/').map_or(t.len(), |p| p + 1);
                (1, end)
            } else {
                (0, 0)
            };
            splice(t, s, e - s, v.as_bytes());
            "version-segment"
        }
        15 => {
            let whole = *rng.pick(&[
                "*",
                "",
                " ",
                "/",
                "//",
                "http://169.254.169.254",
                "/latest",
                "/latest/",
                "/latest/meta-data",
                "/latest/api/token/",
                "/latest/api/token/.",
                "/latest/api//token",
                "/latest/api/token?ttl=60",
                "169.254.169.254:80",
            ]);
            *t = whole.as_bytes().to_vec();
            "whole-target"
        }
        16 => {
            let at = rng.below(len + 1);
            splice(t, at, 0, b" ");
            "space"
        }
        17 if len > 0 => {
            let at = rng.below(len);
            t[at] = rng.next_u64() as u8;
            "random-byte"
        }
        18 if len > 0 => {
            let at = rng.below(len);
            let n = rng.range(1, (len - at).max(1));
            splice(t, at, n, b"");
            "deleted-range"
        }
        19 => {
            let with = *rng.pick(&[
                "iam",
                "IAM",
                "identity-credentials",
                "security-credentials",
                "security-credentials-extended",
                "info",
                "user-data",
                "meta-data",
                "dynamic",
                "api",
                "token",
                ".",
                "..",
                "",
                "node-role",
                "ec2",
                "i%61m",
                "iam.",
                "iam~",
            ]);
            let (s, e) = segment(t, rng);
            splice(t, s, e - s, with.as_bytes());
            "segment"
        }
        20 => {
            let (s, e) = segment(t, rng);
            let seg = t[s..e].to_vec();
            let mut dup = b"/".to_vec();
            dup.extend_from_slice(&seg);
            splice(t, e, 0, &dup);
            "duplicate-segment"
        }
        _ => {
            let encoded: Vec<u8> = t.iter().flat_map(|b| percent_encode(*b, false)).collect();
            *t = encoded;
            "all-encoded"
        }
    }
}

fn mutate_method(req: &mut Req, rng: &mut Rng) -> &'static str {
    if rng.percent(30) {
        req.method = if req.method == b"PUT" { b"GET".to_vec() } else { b"PUT".to_vec() };
        return "method-swap";
    }
    if rng.percent(10) {
        req.method = vec![b'X'; rng.range(100, 9000)];
        return "method-long";
    }
    let m: &[u8] = rng.pick::<&[u8]>(&[
        &b"GET"[..],
        b"PUT",
        b"POST",
        b"HEAD",
        b"DELETE",
        b"OPTIONS",
        b"PATCH",
        b"TRACE",
        b"CONNECT",
        b"PRI",
        b"get",
        b"put",
        b"Get",
        b"GET ",
        b"G\x00ET",
        b"",
        b"GETT",
        b"PUT\x00",
        b"\xffGET",
        b"M-SEARCH",
        b"PROPFIND",
        b"GET\t",
    ]);
    req.method = m.to_vec();
    "method"
}

fn mutate_version(req: &mut Req, rng: &mut Rng) -> &'static str {
    let v: &[u8] = rng.pick::<&[u8]>(&[
        &b"HTTP/1.0"[..],
        b"HTTP/0.9",
        b"HTTP/2.0",
        b"HTTP/2",
        b"HTTP/1.2",
        b"HTTP/9.9",
        b"http/1.1",
        b"HTTP/1.1 ",
        b"HTTP/1.1\x00",
        b"HTTP/1.10",
        b"HTTP/01.1",
        b"HTTP/1",
        b"HTTP /1.1",
        b"XTTP/1.1",
        b"",
    ]);
    req.version = if v.is_empty() && rng.percent(50) { None } else { Some(v.to_vec()) };
    "version"
}

/// A chunked encoding of `body` (well formed).
fn chunked(body: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = rng.range(1, rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A complete second request that would read the node's role, for smuggling attempts.
const SMUGGLED: &[u8] =
    b"GET /latest/meta-data/iam/security-credentials/node-role HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";

fn mutate_headers(ctx: &Ctx, req: &mut Req, rng: &mut Rng, incomplete: &mut bool) -> &'static str {
    match rng.below(24) {
        0 => {
            req.remove("host");
            "no-host"
        }
        1 => {
            let other = *rng.pick(&["evil.example", "169.254.169.254", "localhost", ""]);
            req.headers.push(Header::new("Host", other));
            "duplicate-host"
        }
        2 => {
            let long = "a".repeat(300);
            let v = *rng.pick(&[
                "",
                "evil.example",
                "169.254.169.254:80",
                "localhost",
                "[fd00:ec2::254]",
                "169.254.169.254\u{0}",
                long.as_str(),
                "169.254.169.254 extra",
            ]);
            req.set("Host", v);
            "host-value"
        }
        3 => {
            let v = *rng.pick(&[
                "0",
                "-1",
                "21601",
                "abc",
                "1e3",
                " 60",
                "60 60",
                "99999999999999999999",
                "",
                "0x10",
                "21600.0",
                "+60",
                "60\u{0}",
                "\u{FF16}\u{FF10}",
                "1",
                "21600",
                "060",
            ]);
            req.set(TTL_HEADER, v);
            "ttl-value"
        }
        4 => {
            req.remove(TTL_HEADER);
            let a = rng.pick(&["60", "0", "21600", "abc"]).to_string();
            let b = rng.pick(&["60", "-5", "21601", "300"]).to_string();
            req.headers.push(Header::new(TTL_HEADER, a));
            req.headers.push(Header::new(TTL_HEADER, b));
            "duplicate-ttl"
        }
        5 => {
            let t = &ctx.token;
            let v: Vec<u8> = match rng.below(9) {
                0 => Vec::new(),
                1 => b"x".to_vec(),
                2 => t.as_bytes()[..t.len() / 2].to_vec(),
                3 => format!("{t}A").into_bytes(),
                4 => t.to_lowercase().into_bytes(),
                5 => format!(" {t} ").into_bytes(),
                6 => vec![b'A'; rng.range(1000, 12_000)],
                7 => rng.bytes(40),
                _ => {
                    let mut v = t.as_bytes().to_vec();
                    if !v.is_empty() {
                        let at = rng.below(v.len());
                        v[at] ^= 1 << rng.below(7);
                    }
                    v
                }
            };
            req.remove(TOKEN_HEADER);
            req.headers.push(Header::new(TOKEN_HEADER, v));
            "token-value"
        }
        6 => {
            req.remove(TOKEN_HEADER);
            let (a, b) = if rng.percent(50) {
                (ctx.token.clone(), "bogus".into())
            } else {
                ("bogus".into(), ctx.token.clone())
            };
            req.headers.push(Header::new(TOKEN_HEADER, a));
            req.headers.push(Header::new(TOKEN_HEADER, b));
            "duplicate-token"
        }
        7 => {
            if rng.percent(50) {
                req.remove(TOKEN_HEADER);
            } else {
                req.remove(TTL_HEADER);
            }
            "removed-imds-header"
        }
        8 => {
            let (name, value) = *rng.pick(&[
                ("X-Forwarded-For", "127.0.0.1"),
                ("X-Forwarded-For", "10.200.1.11"),
                ("x-forwarded-for", ""),
                ("X-Forwarded-For", "169.254.169.254, 10.0.0.1"),
                ("Forwarded", "for=10.200.1.11"),
                ("X-Real-IP", "10.200.1.11"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-FORWARDED-FOR", "1.2.3.4"),
            ]);
            req.headers.push(Header::new(name, value));
            "forwarded"
        }
        9 => {
            let body = rng.sized_bytes(2000);
            req.body = chunked(&body, rng);
            req.set("Transfer-Encoding", "chunked");
            req.auto_length = false;
            "chunked-body"
        }
        10 => {
            // Content-Length and Transfer-Encoding both: the body hides a second request.
            let mut body = b"0\r\n\r\n".to_vec();
            body.extend_from_slice(SMUGGLED);
            req.headers.push(Header::new("Content-Length", *rng.pick(&["5", "4", "0", "200"])));
            req.headers.push(Header::new("Transfer-Encoding", "chunked"));
            req.body = body;
            req.auto_length = false;
            "te-cl-conflict"
        }
        11 => {
            let v = *rng.pick(&[
                "-1",
                "abc",
                "+5",
                "99999999999999999999",
                " 5",
                "5, 5",
                "5,6",
                "0x5",
                "",
                "1e2",
            ]);
            req.set("Content-Length", v);
            req.body = b"hello".to_vec();
            req.auto_length = false;
            "content-length-value"
        }
        12 => {
            req.remove("content-length");
            req.headers.push(Header::new("Content-Length", "5"));
            req.headers.push(Header::new("Content-Length", *rng.pick(&["6", "0", "5", "500"])));
            req.body = b"hello".to_vec();
            req.auto_length = false;
            "duplicate-content-length"
        }
        13 => {
            let body = rng.sized_bytes(200);
            req.set("Content-Length", (body.len() + rng.range(1, 100_000)).to_string());
            req.body = body;
            req.auto_length = false;
            *incomplete = true;
            "content-length-short-body"
        }
        14 => {
            let mut body = rng.sized_bytes(50);
            req.set("Content-Length", body.len().to_string());
            body.extend_from_slice(SMUGGLED);
            req.body = body;
            req.auto_length = false;
            "content-length-long-body"
        }
        15 => {
            let (name, sep, value) = *rng.pick(&[
                ("Transfer-Encoding", ": ", "chunked, identity"),
                ("Transfer-Encoding", ": ", "identity"),
                ("Transfer-Encoding", ": ", "gzip, chunked"),
                ("Transfer-Encoding", ": ", "xchunked"),
                ("Transfer-Encoding", ": ", "Chunked"),
                ("Transfer-Encoding", ": ", "chunked "),
                ("Transfer-Encoding", " : ", "chunked"),
                ("Transfer-Encoding", ":\t", "chunked"),
                ("Transfer_Encoding", ": ", "chunked"),
                ("Transfer-Encoding", ": ", "chunked\u{0}"),
            ]);
            req.headers.push(Header {
                name: name.as_bytes().to_vec(),
                sep: sep.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
            });
            req.body = b"5\r\nhello\r\n0\r\n\r\n".to_vec();
            req.auto_length = rng.percent(50);
            "transfer-encoding-variant"
        }
        16 => {
            let n = rng.range(1000, 40_000);
            req.headers.push(Header::new("X-Big", vec![b'a'; n]));
            "huge-header"
        }
        17 => {
            for i in 0..rng.range(20, 400) {
                req.headers.push(Header::new(&format!("X-H{i}"), "v"));
            }
            "many-headers"
        }
        18 => {
            let name: &[u8] = rng.pick::<&[u8]>(&[
                &b"X Bad"[..],
                b"X\x00Bad",
                b"(x)",
                b"",
                b":authority",
                b"X-A\r",
                b"X\xc3\xa9",
                b"\xff",
                b"garbage-line-without-colon",
            ]);
            let sep: &[u8] = if name.starts_with(b"garbage") { b"" } else { b": " };
            req.headers.push(Header { name: name.to_vec(), sep: sep.to_vec(), value: b"v".to_vec() });
            "bad-header-name"
        }
        19 => {
            let fold = if rng.percent(50) { "\r\n\tcontinued" } else { "\r\n continued" };
            req.headers.push(Header::new("X-Folded", format!("first{fold}")));
            "obs-fold"
        }
        20 => {
            let bad: &[u8] =
                rng.pick::<&[u8]>(&[&b"\r"[..], b"\n", b"\x00", b"\xff\xfe", b"\r\nX-Injected: 1", b"\x7f"]);
            if !req.headers.is_empty() {
                let i = rng.below(req.headers.len());
                let at = rng.below(req.headers[i].value.len() + 1);
                splice(&mut req.headers[i].value, at, 0, bad);
            }
            "bad-header-value"
        }
        21 => {
            match rng.below(5) {
                0 => req.headers.push(Header::new("Expect", "100-continue")),
                1 => {
                    req.set("Connection", "Upgrade, HTTP2-Settings");
                    req.headers.push(Header::new("Upgrade", "h2c"));
                    req.headers.push(Header::new("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"));
                }
                2 => req.set("Connection", "keep-alive"),
                3 => req.set("Connection", "close, close"),
                _ => req.set("Connection", "\u{0}"),
            }
            "connection"
        }
        22 => {
            for i in (1..req.headers.len()).rev() {
                let j = rng.below(i + 1);
                req.headers.swap(i, j);
            }
            "shuffled-headers"
        }
        _ => {
            for h in &mut req.headers {
                for b in &mut h.name {
                    if rng.percent(50) {
                        *b = b.to_ascii_uppercase();
                    } else {
                        *b = b.to_ascii_lowercase();
                    }
                }
            }
            "header-case"
        }
    }
}

fn mutate_framing(req: &mut Req, rng: &mut Rng, incomplete: &mut bool) -> &'static str {
    match rng.below(8) {
        0 => {
            req.eol = b"\n".to_vec();
            "lf-only"
        }
        1 => {
            req.eol = b"\r".to_vec();
            *incomplete = true;
            "cr-only"
        }
        2 => {
            req.prefix = b"\r\n\r\n".to_vec();
            "leading-empty-lines"
        }
        3 => {
            let n = rng.size(65_536);
            req.body = rng.bytes(n);
            "random-body"
        }
        4 => {
            req.body = SMUGGLED.to_vec();
            "request-in-body"
        }
        5 => {
            let size =
                *rng.pick(&["fffffffffffffffff", "-1", "0x10", "1;ext=\u{0}", "zz", "5 ", " 5", "1\r\nab"]);
            req.set("Transfer-Encoding", "chunked");
            req.body = format!("{size}\r\nhello\r\n0\r\n\r\n").into_bytes();
            req.auto_length = false;
            "bad-chunk-size"
        }
        6 => {
            req.set("Transfer-Encoding", "chunked");
            req.body = b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nX-aws-ec2-metadata-token: x\r\n\r\n".to_vec();
            req.auto_length = false;
            "chunk-trailers"
        }
        _ => {
            req.suffix = SMUGGLED.to_vec();
            "trailing-request"
        }
    }
}

/// How a case is sent.
#[derive(Clone, Copy, Debug)]
enum Delivery {
    /// Written at once; answers read.
    Whole,
    /// Written in pieces with pauses; answers read.
    Slow { pieces: usize, gap_ms: u64 },
    /// The first `at` bytes, then the write side shut; answers read briefly.
    HalfClose { at: usize },
    /// The first `at` bytes, then a reset.
    Reset { at: usize },
    /// Written at once, then the connection closed without reading.
    WriteAndVanish,
    /// Connected and closed.
    ConnectOnly,
}

impl Delivery {
    fn name(&self) -> &'static str {
        match self {
            Delivery::Whole => "whole",
            Delivery::Slow { .. } => "slow",
            Delivery::HalfClose { .. } => "half-close",
            Delivery::Reset { .. } => "reset",
            Delivery::WriteAndVanish => "write-and-vanish",
            Delivery::ConnectOnly => "connect-only",
        }
    }
}

/// One generated case: the bytes of one connection and how to send them.
struct Case {
    raw: Vec<u8>,
    delivery: Delivery,
    /// Requests in `raw` (pipelined).
    heads: usize,
    /// Whether the bytes are known not to end a request (no answer is expected then).
    incomplete: bool,
    notes: Vec<String>,
}

fn generate(ctx: &Ctx, rng: &mut Rng) -> Case {
    let mut notes = Vec::new();
    let mut incomplete = false;
    let mut heads = 1;
    let mut raw = Vec::new();
    let roll = rng.below(100);
    if roll < 4 {
        notes.push("random-bytes".into());
        if rng.percent(50) {
            raw.extend_from_slice(rng.pick::<&[u8]>(&[
                &b"GET /"[..],
                b"PUT /latest/api/token HTTP/1.1\r\n",
                b"\r\n",
            ]));
        }
        let n = rng.size(4096);
        raw.extend(rng.bytes(n));
        incomplete = true;
    } else {
        heads = if rng.percent(8) { rng.range(2, 5) } else { 1 };
        for h in 0..heads {
            let mut req = seed(ctx, rng, &mut notes);
            // Mostly one or two: enough to stay near the API's own logic (tokens, TTLs, routes)
            // rather than only ever reaching the HTTP parser.
            let mutations = if roll < 14 { 0 } else { *rng.pick(&[1, 1, 1, 2, 2, 3, 4]) };
            for _ in 0..mutations {
                let note = match rng.below(100) {
                    0..=34 => mutate_target(ctx, &mut req.target, rng),
                    35..=64 => mutate_headers(ctx, &mut req, rng, &mut incomplete),
                    65..=74 => mutate_method(&mut req, rng),
                    75..=79 => mutate_version(&mut req, rng),
                    _ => mutate_framing(&mut req, rng, &mut incomplete),
                };
                notes.push(note.into());
            }
            if h + 1 < heads && req.has("connection") {
                req.set("Connection", "keep-alive");
            }
            raw.extend(req.write());
        }
        if rng.percent(6) {
            for _ in 0..rng.range(1, 4) {
                let len = raw.len();
                match rng.below(3) {
                    0 if len > 0 => {
                        let at = rng.below(len);
                        raw[at] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let at = rng.below(len + 1);
                        let n = rng.range(1, 16);
                        let junk = rng.bytes(n);
                        splice(&mut raw, at, 0, &junk);
                    }
                    _ if len > 0 => {
                        let at = rng.below(len);
                        splice(&mut raw, at, rng.range(1, 16), b"");
                    }
                    _ => {}
                }
            }
            notes.push("byte-mutations".into());
            // A head whose blank line the mutations took away is still being sent, as far as
            // the agent can tell: waiting for the rest of it is right.
            incomplete |= !(contains(&raw, b"\r\n\r\n") || contains(&raw, b"\n\n"));
        }
    }
    let cut = |rng: &mut Rng, raw: &[u8]| rng.below(raw.len().max(1));
    let delivery = match rng.below(100) {
        0..=71 => Delivery::Whole,
        72..=83 => Delivery::Slow { pieces: rng.range(2, 8), gap_ms: rng.range(1, 15) as u64 },
        84..=88 => Delivery::HalfClose { at: cut(rng, &raw) },
        89..=93 => Delivery::Reset { at: cut(rng, &raw) },
        94..=97 => Delivery::WriteAndVanish,
        _ => Delivery::ConnectOnly,
    };
    Case { raw, delivery, heads, incomplete, notes }
}

// ---------------------------------------------------------------------------------------------
// Sending and checking.

/// Statuses of the complete responses at the start of `buf`, and whether it ended cleanly
/// (nothing after the last complete response).
fn parse_responses(buf: &[u8]) -> (Vec<u16>, bool) {
    let mut statuses = Vec::new();
    let mut rest = buf;
    loop {
        if rest.is_empty() {
            return (statuses, true);
        }
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else { return (statuses, false) };
        let head = String::from_utf8_lossy(&rest[..end]);
        let status: Option<u16> =
            head.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|code| code.parse().ok());
        let Some(status) = status else { return (statuses, false) };
        let length = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        });
        let body_len = match (status, length) {
            (100..=199 | 204 | 304, _) => 0,
            (_, Some(n)) => n,
            // Read to the close.
            (_, None) => {
                statuses.push(status);
                return (statuses, true);
            }
        };
        if rest.len() < end + 4 + body_len {
            return (statuses, false);
        }
        if status >= 200 {
            statuses.push(status);
        }
        rest = &rest[end + 4 + body_len..];
    }
}

/// What happened on one connection.
#[derive(Default)]
struct Outcome {
    read: Vec<u8>,
    statuses: Vec<u16>,
    connect_error: bool,
    write_error: bool,
    timed_out: bool,
    closed: bool,
    took: Duration,
}

async fn read_answers(stream: &mut TcpStream, heads: usize, first: Duration, out: &mut Outcome) {
    let started = Instant::now();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let (statuses, _) = parse_responses(&out.read);
        let wait = if statuses.len() >= heads {
            // Everything expected is here: only pick up what is already on its way.
            Duration::from_millis(20)
        } else if out.read.is_empty() {
            first.saturating_sub(started.elapsed())
        } else {
            Duration::from_millis(300)
        };
        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed = true;
                break;
            }
            Ok(Ok(n)) => {
                out.read.extend_from_slice(&chunk[..n]);
                if out.read.len() >= MAX_READ {
                    break;
                }
            }
            Err(_) => {
                out.timed_out = true;
                break;
            }
        }
    }
    let (mut statuses, clean) = parse_responses(&out.read);
    if !clean {
        // A last head whose body never came: the answer to a HEAD request (or a cut answer).
        let done: usize = statuses.len();
        if let Some(status) = nth_head_status(&out.read, done) {
            statuses.push(status);
        }
    }
    out.statuses = statuses;
}

/// The status of the `n`th response head in `buf` (counting from 0), however its body ends.
fn nth_head_status(buf: &[u8], n: usize) -> Option<u16> {
    let text = String::from_utf8_lossy(buf);
    let heads: Vec<&str> = text.split("\r\n\r\n").filter(|part| part.contains("HTTP/1.")).collect();
    let head = heads.get(n)?;
    let at = head.find("HTTP/1.")?;
    head.get(at + 9..at + 12)?.parse().ok()
}

async fn run_case(target: SocketAddr, case: &Case, answer_timeout: Duration) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome::default();
    let mut stream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => {
            out.connect_error = true;
            return out;
        }
    };
    let _ = stream.set_nodelay(true);
    let raw = &case.raw;
    match case.delivery {
        Delivery::ConnectOnly => {}
        Delivery::Whole | Delivery::WriteAndVanish => {
            if stream.write_all(raw).await.is_err() {
                out.write_error = true;
            }
            if matches!(case.delivery, Delivery::Whole) && !out.write_error {
                read_answers(&mut stream, case.heads, answer_timeout, &mut out).await;
            }
        }
        Delivery::Slow { pieces, gap_ms } => {
            let step = raw.len().div_ceil(pieces).max(1);
            for piece in raw.chunks(step) {
                if stream.write_all(piece).await.is_err() {
                    out.write_error = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            }
            read_answers(&mut stream, case.heads, answer_timeout, &mut out).await;
        }
        Delivery::HalfClose { at } => {
            if stream.write_all(&raw[..at.min(raw.len())]).await.is_err() {
                out.write_error = true;
            }
            let _ = stream.shutdown().await;
            read_answers(&mut stream, case.heads, Duration::from_millis(500), &mut out).await;
        }
        Delivery::Reset { at } => {
            if stream.write_all(&raw[..at.min(raw.len())]).await.is_err() {
                out.write_error = true;
            }
            // A zero linger makes the close a reset (and never blocks).
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
        }
    }
    drop(stream);
    out.took = started.elapsed();
    out
}

/// Bytes as readable text: printable ASCII kept, the rest escaped; cut to `max` bytes.
fn show(bytes: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(max) {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > max {
        s.push_str(&format!("…({} bytes in all)", bytes.len()));
    }
    s
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// What must never come back.
struct Rules {
    forbidden: Vec<String>,
    allowed_key: Option<String>,
    key_token: Regex,
    key_field: Regex,
}

impl Rules {
    fn new(forbidden: Vec<String>, allowed_key: Option<String>) -> Rules {
        Rules {
            forbidden,
            allowed_key,
            key_token: Regex::new(r"(?-u:(?:ASIA|AKIA)[A-Z0-9]{12,})").expect("regex"),
            key_field: Regex::new(r#"(?-u:"AccessKeyId"\s*:\s*"([^"]*)")"#).expect("regex"),
        }
    }

    /// Why `response` (answering `request`) breaks the rules; whether it carried the allowed key.
    fn check(&self, request: &[u8], response: &[u8]) -> (Vec<String>, bool) {
        let mut why = Vec::new();
        for f in &self.forbidden {
            if contains(response, f.as_bytes()) && !contains(request, f.as_bytes()) {
                why.push(format!("forbidden {f:?} in the response"));
            }
        }
        let mut keys: Vec<Vec<u8>> =
            self.key_token.find_iter(response).map(|m| m.as_bytes().to_vec()).collect();
        keys.extend(
            self.key_field.captures_iter(response).filter_map(|c| c.get(1)).map(|m| m.as_bytes().to_vec()),
        );
        let mut saw_allowed = false;
        for key in keys {
            if self.allowed_key.as_deref().map(str::as_bytes) == Some(key.as_slice()) {
                saw_allowed = true;
            } else if !contains(request, &key) {
                why.push(format!("access key {:?} is not this pod's", String::from_utf8_lossy(&key)));
            }
        }
        why.sort();
        why.dedup();
        (why, saw_allowed)
    }
}

#[derive(Debug, Serialize, Clone)]
struct Violation {
    index: u64,
    why: Vec<String>,
    delivery: &'static str,
    mutations: Vec<String>,
    request: String,
    response: String,
}

#[derive(Debug, Serialize, Clone)]
struct Example {
    index: u64,
    delivery: &'static str,
    mutations: Vec<String>,
    request: String,
    took_ms: u64,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    seed: u64,
    first: u64,
    target: String,
    /// Cases run (one connection each).
    requests: u64,
    /// Request heads written (pipelined cases write several).
    heads: u64,
    elapsed_s: f64,
    /// Complete responses by HTTP status.
    by_status: BTreeMap<u16, u64>,
    by_delivery: BTreeMap<&'static str, u64>,
    /// For each seed and mutation, what its cases got: the first response's status, or `none`.
    outcomes_by_mutation: BTreeMap<String, BTreeMap<String, u64>>,
    /// Cases read back that got at least one complete response.
    answered: u64,
    /// Complete requests, written whole, that got no status: the connection was closed first.
    closed_without_answer: u64,
    /// Complete requests, written whole, with no (complete) answer within the timeout.
    timed_out: u64,
    /// Cases known to end mid-request (cut bodies, random bytes) that were left unanswered.
    incomplete_unanswered: u64,
    connect_errors: u64,
    write_errors: u64,
    /// Responses carrying the allowed key (the fuzzer did reach the pod's credentials).
    allowed_key_seen: u64,
    /// The longest a whole-written case took to be answered.
    slowest_answer_ms: u64,
    violation_count: u64,
    violations: Vec<Violation>,
    timed_out_examples: Vec<Example>,
    closed_examples: Vec<Example>,
    /// What the pod's own token and listing requests got before the run.
    setup: Vec<String>,
}

impl Summary {
    fn record(&mut self, index: u64, case: &Case, out: &Outcome, rules: &Rules) {
        self.requests += 1;
        self.heads += case.heads as u64;
        *self.by_delivery.entry(case.delivery.name()).or_default() += 1;
        for s in &out.statuses {
            *self.by_status.entry(*s).or_default() += 1;
        }
        let outcome = out.statuses.first().map_or("none".to_string(), |s| s.to_string());
        for note in &case.notes {
            *self
                .outcomes_by_mutation
                .entry(note.clone())
                .or_default()
                .entry(outcome.clone())
                .or_default() += 1;
        }
        if out.connect_error {
            self.connect_errors += 1;
        }
        if out.write_error {
            self.write_errors += 1;
        }
        let read_back = matches!(case.delivery, Delivery::Whole | Delivery::Slow { .. });
        let example = || Example {
            index,
            delivery: case.delivery.name(),
            mutations: case.notes.clone(),
            request: show(&case.raw, 600),
            took_ms: out.took.as_millis() as u64,
        };
        if !out.statuses.is_empty() {
            self.answered += 1;
            if read_back {
                self.slowest_answer_ms = self.slowest_answer_ms.max(out.took.as_millis() as u64);
            }
        } else if read_back && !out.connect_error && !out.write_error {
            if case.incomplete {
                self.incomplete_unanswered += 1;
            } else if out.timed_out {
                self.timed_out += 1;
                if self.timed_out_examples.len() < KEEP_EXAMPLES {
                    self.timed_out_examples.push(example());
                }
            } else {
                self.closed_without_answer += 1;
                if self.closed_examples.len() < KEEP_EXAMPLES {
                    self.closed_examples.push(example());
                }
            }
        }
        let (why, saw_allowed) = rules.check(&case.raw, &out.read);
        if saw_allowed {
            self.allowed_key_seen += 1;
        }
        if !why.is_empty() {
            self.violation_count += 1;
            if self.violations.len() < KEEP_VIOLATIONS {
                self.violations.push(Violation {
                    index,
                    why,
                    delivery: case.delivery.name(),
                    mutations: case.notes.clone(),
                    request: show(&case.raw, 2000),
                    response: show(&out.read, 2000),
                });
            }
        }
    }
}

/// One plain request for the run's context: (status, body), or None.
async fn simple(target: SocketAddr, request: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await.ok()?.ok()?;
    stream.write_all(request).await.ok()?;
    let mut out = Outcome::default();
    read_answers(&mut stream, 1, Duration::from_secs(10), &mut out).await;
    let end = out.read.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((*out.statuses.first()?, out.read[end + 4..].to_vec()))
}

fn check_args(cli: &Cli) -> Result<()> {
    let inside = match cli.target.ip() {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    if !inside {
        bail!("{} is not a test-bed address (link-local, private or loopback)", cli.target);
    }
    if cli.requests.is_none() && cli.seconds.is_none() {
        bail!("give --requests or --seconds");
    }
    if cli.seconds.is_some_and(|s| s == 0 || s > MAX_SECONDS) {
        bail!("--seconds must be 1 to {MAX_SECONDS}");
    }
    if cli.concurrency == 0 || cli.concurrency > 64 {
        bail!("--concurrency must be 1 to 64");
    }
    Ok(())
}

async fn fuzz(cli: Cli) -> Summary {
    let target = cli.target;
    let host = target.ip().to_string();
    let mut summary =
        Summary { seed: cli.seed, first: cli.first, target: target.to_string(), ..Default::default() };
    let rules = Arc::new(Rules::new(cli.forbidden.clone(), cli.allowed_key.clone()));

    // The pod's own token and role, as an SDK would get them.
    let token_request = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: {host}\r\n{TTL_HEADER}: 21600\r\nConnection: close\r\n\r\n"
    );
    let token = match simple(target, token_request.as_bytes()).await {
        Some((200, body)) => String::from_utf8_lossy(&body).trim().to_string(),
        other => {
            summary.setup.push(format!("token: {:?}", other.map(|(s, b)| (s, show(&b, 200)))));
            "AAAAnot-a-real-token".to_string()
        }
    };
    let listing = format!(
        "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: {host}\r\n{TOKEN_HEADER}: {token}\r\nConnection: close\r\n\r\n"
    );
    let mut roles = cli.roles.clone();
    match simple(target, listing.as_bytes()).await {
        Some((200, body)) => {
            let role = String::from_utf8_lossy(&body).trim().to_string();
            summary.setup.push(format!("the pod's role: {role}"));
            roles.push(role);
        }
        other => summary.setup.push(format!("listing: {:?}", other.map(|(s, b)| (s, show(&b, 200))))),
    }
    roles.push("node-role".into());
    roles.sort();
    roles.dedup();
    let ctx = Arc::new(Ctx { token, roles });

    let started = Instant::now();
    let deadline = cli.seconds.map(|s| started + Duration::from_secs(s));
    let end = cli.requests.map_or(u64::MAX, |n| cli.first.saturating_add(n));
    let next = Arc::new(AtomicU64::new(cli.first));
    let shared = Arc::new(Mutex::new(summary));
    let answer_timeout = Duration::from_millis(cli.answer_timeout_ms);
    let mut workers = Vec::new();
    for _ in 0..cli.concurrency {
        let (ctx, rules, next, shared) = (ctx.clone(), rules.clone(), next.clone(), shared.clone());
        let (seed, verbose) = (cli.seed, cli.verbose);
        workers.push(tokio::spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= end {
                    break;
                }
                let case = generate(&ctx, &mut rng_for_case(seed, index));
                let out = run_case(target, &case, answer_timeout).await;
                if verbose {
                    eprintln!(
                        "#{index} {} {:?}\n>>> {}\n<<< {}",
                        case.delivery.name(),
                        case.notes,
                        show(&case.raw, 4000),
                        show(&out.read, 4000)
                    );
                }
                shared.lock().expect("summary lock").record(index, &case, &out, &rules);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut summary = std::mem::take(&mut *shared.lock().expect("summary lock"));
    summary.elapsed_s = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    summary
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = check_args(&cli) {
        eprintln!("imdsgate-fuzz: {e}");
        std::process::exit(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("imdsgate-fuzz: {e}");
            std::process::exit(2);
        }
    };
    let summary = runtime.block_on(fuzz(cli));
    match serde_json::to_string(&summary) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("imdsgate-fuzz: {e}");
            std::process::exit(2);
        }
    }
    if summary.violation_count > 0 {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_index_make_the_same_request() {
        let ctx = Ctx { token: "t0k3n".into(), roles: vec!["a".into(), "b".into()] };
        for i in 0..200 {
            let a = generate(&ctx, &mut rng_for_case(7, i));
            let b = generate(&ctx, &mut rng_for_case(7, i));
            assert_eq!(a.raw, b.raw);
        }
    }

    #[test]
    fn responses_are_split_by_content_length() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse_responses(two), (vec![200, 404], true));
        assert_eq!(parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok"), (vec![], false));
    }

    #[test]
    fn foreign_keys_and_forbidden_strings_are_violations_echoes_are_not() {
        let rules = Rules::new(vec!["NODEROLEKEY".into()], Some("ASIAOWNKEY0000000000".into()));
        let own = br#"{ "AccessKeyId" : "ASIAOWNKEY0000000000" }"#;
        assert_eq!(rules.check(b"GET /", own), (vec![], true));
        let (why, _) = rules.check(b"GET /", br#"{ "AccessKeyId" : "NODEROLEKEY" }"#);
        assert_eq!(why.len(), 2, "{why:?}");
        let (why, _) = rules.check(b"GET /", b"ASIAOTHERKEY00000000");
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(rules.check(b"GET /NODEROLEKEY", b"404 imdsgate refused /NODEROLEKEY").0.is_empty());
        let none = Rules::new(vec![], None);
        assert_eq!(none.check(b"GET /", own).0.len(), 1, "no key at all may be seen");
    }
}
