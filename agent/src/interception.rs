//! Interception: the nat-table rule that sends pod traffic for the metadata address to the agent.
//! An own chain `IMDSGATE` holds the DNAT rule; PREROUTING jumps to it from its first positions,
//! once per `--host-interface` pattern (kiam appended its rule and ended up behind KUBE-SERVICES).
//! Installing is idempotent and never leaves a moment without the rule; the rule stays when the
//! agent exits, so pods of a stopped agent get "connection refused", never the node's role.
//!
//! Both families are intercepted by default: 169.254.169.254 with iptables and [fd00:ec2::254]
//! with ip6tables, DNAT to the node's address when it is known, else REDIRECT to the listener's
//! port on the address of the interface the request arrived on. Where ip6tables' nat table cannot
//! be used (no IPv6 in the kernel, no ip6table_nat), there is no IPv6 path to intercept: the IPv6
//! rule is skipped with a warning ([`family_usable`]) and IPv4 stays intercepted.
//!
//! Rule order. Installing (agent start, `iptables install`) puts the jumps first in PREROUTING.
//! Other controllers order PREROUTING too: Calico (default insert mode) and kube-proxy re-assert
//! their own jumps at the top. What interception needs is not first place but that metadata traffic
//! reaches our DNAT before anything can send it elsewhere. So the rule keeper ([`keep`]) is
//! satisfied when our jumps are present, in order, with the DNAT rule alone in our chain, and no
//! rule above them could catch a TCP packet for the metadata address on port 80: none whose target
//! takes it out of PREROUTING (DNAT, REDIRECT, NETMAP, ACCEPT, a queue, DROP or REJECT; RETURN or a
//! goto at the top level, which end PREROUTING with its ACCEPT policy), followed into every chain
//! such a rule jumps to ([`placement`]). A rule "could catch" it unless its destination, protocol
//! or destination port excludes it; every other match (interface, mark, set, comment) counts as
//! matching. So Calico's `cali-PREROUTING`, which DNATs only floating IPs, may sit above ours and
//! the keeper stays quiet; kube2iam's DNAT of 169.254.169.254 above ours is put below ours again,
//! counted as a repair, and if its controller keeps re-inserting it the flapping alert fires, as it
//! should: two controllers fight over metadata traffic.

use crate::metrics::{FamilyLabels, Metrics};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

pub const CHAIN: &str = "IMDSGATE";
const TABLE: &str = "nat";
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

#[derive(Debug, thiserror::Error)]
#[error("iptables: {0}")]
pub struct IptablesError(String);

fn err(context: &str, e: Box<dyn std::error::Error>) -> IptablesError {
    IptablesError(format!("{context}: {e}"))
}

/// A `--host-interface` pattern: `veth+`, `eni+`, or `!eth0` (every interface but eth0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceMatch {
    pub name: String,
    pub negated: bool,
}

impl std::str::FromStr for InterfaceMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (negated, name) = match s.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, s.trim()),
        };
        let valid = !name.is_empty()
            && name.len() <= 15
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b) || b == b'+')
            && !name[..name.len() - 1].contains('+');
        if !valid {
            return Err(format!("{s:?} is not an interface name or pattern (e.g. veth+, eni+, !eth0)"));
        }
        Ok(InterfaceMatch { name: name.to_string(), negated })
    }
}

/// What to install for one IP family.
#[derive(Clone, Debug)]
pub struct Interception {
    pub ipv6: bool,
    /// The node's address the agent listens on (DNAT target); `None`: REDIRECT to `port` on the
    /// address of the interface the request arrived on.
    pub target: Option<IpAddr>,
    pub port: u16,
    pub interfaces: Vec<InterfaceMatch>,
}

impl Interception {
    /// The DNAT (or REDIRECT) rule inside the chain, as `iptables -S` prints it (without
    /// `-A IMDSGATE`).
    pub fn dnat_rule(&self) -> String {
        let dst = if self.ipv6 { format!("{METADATA_V6}/128") } else { format!("{METADATA_V4}/32") };
        let jump = match self.target {
            Some(IpAddr::V6(target)) => format!("DNAT --to-destination [{target}]:{}", self.port),
            Some(IpAddr::V4(target)) => format!("DNAT --to-destination {target}:{}", self.port),
            None => format!("REDIRECT --to-ports {}", self.port),
        };
        format!("-d {dst} -p tcp -m tcp --dport 80 -j {jump}")
    }

    /// Where the rule sends requests, for log lines.
    pub fn describe_target(&self) -> String {
        match self.target {
            Some(IpAddr::V6(target)) => format!("[{target}]:{}", self.port),
            Some(IpAddr::V4(target)) => format!("{target}:{}", self.port),
            None => format!("port {} of the receiving interface (REDIRECT)", self.port),
        }
    }

    /// The PREROUTING jumps, in order.
    pub fn jump_rules(&self) -> Vec<String> {
        if self.interfaces.is_empty() {
            return vec![format!("-j {CHAIN}")];
        }
        self.interfaces
            .iter()
            .map(|i| {
                if i.negated {
                    format!("! -i {} -j {CHAIN}", i.name)
                } else {
                    format!("-i {} -j {CHAIN}", i.name)
                }
            })
            .collect()
    }

    /// Installs (or repairs) the chain and the jumps, the jumps first in PREROUTING; safe to run
    /// again and again. Says whether it changed anything: `false` means the rule was already
    /// exactly in place.
    pub fn install(&self) -> Result<bool, IptablesError> {
        Ok(self.ensure(true)?.is_some())
    }

    /// The rule keeper's check: repairs only what breaks interception (see the module's text on
    /// rule order), so rules another controller puts above our jumps stay when they cannot catch
    /// metadata traffic. `Some(reason)`: what was repaired.
    pub fn check(&self) -> Result<Option<String>, IptablesError> {
        self.ensure(false)
    }

    fn metadata(&self) -> IpAddr {
        if self.ipv6 { IpAddr::V6(METADATA_V6) } else { IpAddr::V4(METADATA_V4) }
    }

    /// Puts the chain, its DNAT rule and the jumps in place; `first`: the jumps must be the first
    /// rules of PREROUTING, else they may follow rules that cannot catch metadata traffic.
    fn ensure(&self, first: bool) -> Result<Option<String>, IptablesError> {
        let ipt = iptables::new(self.ipv6).map_err(|e| err("cannot run iptables", e))?;
        let mut repaired = Vec::new();
        if !ipt.chain_exists(TABLE, CHAIN).map_err(|e| err("listing chains", e))? {
            ipt.new_chain(TABLE, CHAIN).map_err(|e| err("creating chain", e))?;
            repaired.push(format!("chain {CHAIN} was missing"));
        }
        // The wanted DNAT rule goes in first; stale ones (another port or address) go after.
        let dnat = self.dnat_rule();
        if !ipt.exists(TABLE, CHAIN, &dnat).map_err(|e| err("checking DNAT rule", e))? {
            ipt.insert(TABLE, CHAIN, &dnat, 1).map_err(|e| err("inserting DNAT rule", e))?;
            repaired.push("the DNAT rule was missing".to_string());
        }
        for rule in rules_of(&ipt, CHAIN)? {
            if rule != dnat {
                ipt.delete(TABLE, CHAIN, &rule).map_err(|e| err("removing stale DNAT rule", e))?;
                repaired.push(format!("removed {rule:?} from {CHAIN}"));
            }
        }
        let wanted = self.jump_rules();
        let table = ipt.list_table(TABLE).map_err(|e| err("listing the nat table", e))?;
        let placed = if first {
            let prerouting = chains_of(&table).remove("PREROUTING").unwrap_or_default();
            if prerouting.starts_with(&wanted) { Ok(0) } else { Err("the jumps were not first".to_string()) }
        } else {
            placement(&table, &wanted, self.metadata())
        };
        if let Err(why) = placed {
            for rule in wanted.iter().rev() {
                ipt.insert(TABLE, "PREROUTING", rule, 1).map_err(|e| err("inserting jump", e))?;
            }
            repaired.push(why);
        }
        let removed = remove_jumps(&ipt, &wanted)?;
        if removed > 0 {
            repaired.push(format!("removed {removed} extra jump(s)"));
        }
        Ok(if repaired.is_empty() { None } else { Some(repaired.join("; ")) })
    }

    /// `ipv4` or `ipv6`: the metric label of this rule.
    pub fn family(&self) -> &'static str {
        if self.ipv6 { "ipv6" } else { "ipv4" }
    }

    /// Removes the jumps and the chain (`imdsgate-agent iptables uninstall`).
    pub fn uninstall(ipv6: bool) -> Result<(), IptablesError> {
        let ipt = iptables::new(ipv6).map_err(|e| err("cannot run iptables", e))?;
        remove_jumps(&ipt, &[])?;
        if ipt.chain_exists(TABLE, CHAIN).map_err(|e| err("listing chains", e))? {
            ipt.flush_chain(TABLE, CHAIN).map_err(|e| err("flushing chain", e))?;
            ipt.delete_chain(TABLE, CHAIN).map_err(|e| err("deleting chain", e))?;
        }
        Ok(())
    }
}

/// What [`install`] or [`uninstall`] did with one family, for the caller to tell in its own way
/// (log lines for the agent, stderr for the subcommands).
pub enum Progress<'a> {
    /// The IPv6 rule was skipped: ip6tables' nat table cannot be used here ([`family_usable`]).
    Ipv6Unusable(IptablesError),
    /// This rule is now in place (install only).
    Installed(&'a Interception),
}

/// The family whose rule could not be installed or removed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct FamilyFailed {
    pub ipv6: bool,
    pub error: IptablesError,
}

/// Installs (or repairs) each rule in order, skipping the IPv6 one where ip6tables is unusable;
/// stops at the first failure. Returns the rules in place, for [`keep`].
pub fn install(
    rules: Vec<Interception>,
    mut tell: impl FnMut(Progress<'_>),
) -> Result<Vec<Interception>, FamilyFailed> {
    let mut installed = Vec::new();
    for rule in rules {
        if rule.ipv6
            && let Err(why) = family_usable(true)
        {
            tell(Progress::Ipv6Unusable(why));
            continue;
        }
        if let Err(error) = rule.install() {
            return Err(FamilyFailed { ipv6: rule.ipv6, error });
        }
        tell(Progress::Installed(&rule));
        installed.push(rule);
    }
    Ok(installed)
}

/// Removes the chain and its jumps for IPv4 and, with `ipv6`, for IPv6 (skipped where ip6tables is
/// unusable: there is no IPv6 rule to remove then); stops at the first failure.
pub fn uninstall(ipv6: bool, mut tell: impl FnMut(Progress<'_>)) -> Result<(), FamilyFailed> {
    let mut families = vec![false];
    if ipv6 {
        families.push(true);
    }
    for v6 in families {
        if v6 && let Err(why) = family_usable(true) {
            tell(Progress::Ipv6Unusable(why));
            continue;
        }
        Interception::uninstall(v6).map_err(|error| FamilyFailed { ipv6: v6, error })?;
    }
    Ok(())
}

/// Checks the installed rules every `every` and puts back what another tool removed or changed
/// ([`Interception::check`]: rules above ours that cannot catch metadata traffic may stay),
/// counting each repair; the gauge says whether each family's rule is in place. Runs until the
/// process ends (the rule stays after it).
pub async fn keep(rules: Vec<Interception>, metrics: Metrics, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the rules were installed just now
    loop {
        tick.tick().await;
        for rule in &rules {
            let labels = FamilyLabels { family: rule.family() };
            let checked = rule.clone();
            let present = match tokio::task::spawn_blocking(move || checked.check()).await {
                Ok(Ok(None)) => true,
                Ok(Ok(Some(what))) => {
                    metrics.rule_repairs.get_or_create(&labels).inc();
                    tracing::warn!(
                        family = labels.family,
                        what,
                        "the interception rule was missing or altered; put back"
                    );
                    true
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, family = labels.family, "cannot check or repair the interception rule");
                    false
                }
                Err(error) => {
                    tracing::error!(%error, "the interception rule check panicked");
                    false
                }
            };
            metrics.rule_present.get_or_create(&labels).set(i64::from(present));
        }
    }
}

/// Whether iptables (`ipv6`: ip6tables) can run and its nat table can be read; `Err` says why not.
pub fn family_usable(ipv6: bool) -> Result<(), IptablesError> {
    let ipt = iptables::new(ipv6).map_err(|e| err("cannot run iptables", e))?;
    let out = ipt.execute(TABLE, "-S PREROUTING").map_err(|e| err("reading the nat table", e))?;
    if !out.status.success() {
        return Err(IptablesError(format!(
            "reading the nat table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Rules of a nat chain without the `-A <chain> ` prefix.
fn rules_of(ipt: &iptables::IPTables, chain: &str) -> Result<Vec<String>, IptablesError> {
    let prefix = format!("-A {chain} ");
    Ok(ipt
        .list(TABLE, chain)
        .map_err(|e| err("listing rules", e))?
        .into_iter()
        .filter_map(|r| r.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

/// Deletes every PREROUTING jump to the chain but the first block of `wanted` (all of them when
/// `wanted` is empty); returns how many it deleted. Reads PREROUTING afresh, as another controller
/// may have moved rules since the last look; when `wanted` is no longer there it deletes nothing
/// (the next check repairs). A jump unlike the wanted ones is deleted by its text, so a concurrent
/// change cannot make it hit another rule; a duplicate of a wanted one by position, from the bottom.
fn remove_jumps(ipt: &iptables::IPTables, wanted: &[String]) -> Result<usize, IptablesError> {
    let rules = rules_of(ipt, "PREROUTING")?;
    let keep = if wanted.is_empty() {
        0..0
    } else {
        match rules.windows(wanted.len()).position(|w| w == wanted) {
            Some(at) => at..at + wanted.len(),
            None => return Ok(0),
        }
    };
    let mut removed = 0;
    for (index, rule) in rules.iter().enumerate().rev() {
        if keep.contains(&index) || !jumps_to_own_chain(rule) {
            continue;
        }
        if !wanted.contains(rule) {
            ipt.delete(TABLE, "PREROUTING", rule).map_err(|e| err("removing jump", e))?;
            removed += 1;
            continue;
        }
        let position = (index + 1).to_string();
        let out =
            ipt.execute(TABLE, &format!("-D PREROUTING {position}")).map_err(|e| err("removing jump", e))?;
        if !out.status.success() {
            return Err(IptablesError(format!("removing jump: {}", String::from_utf8_lossy(&out.stderr))));
        }
        removed += 1;
    }
    Ok(removed)
}

fn jumps_to_own_chain(rule: &str) -> bool {
    rule.ends_with(&format!("-j {CHAIN}"))
}

/// The rules of each chain of a table as `iptables -S` prints it, without the `-A <chain> `
/// prefix; chains without rules are present and empty.
fn chains_of(table: &[String]) -> HashMap<String, Vec<String>> {
    let mut chains: HashMap<String, Vec<String>> = HashMap::new();
    for line in table {
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("-N" | "-P"), Some(chain), _) => {
                chains.entry(chain.to_string()).or_default();
            }
            (Some("-A"), Some(chain), Some(rule)) => {
                chains.entry(chain.to_string()).or_default().push(rule.to_string())
            }
            _ => {}
        }
    }
    chains
}

/// Where our jumps (`wanted`, in order) sit in PREROUTING of `table` (the lines of
/// `iptables -t nat -S`) when interception holds: the index of the first, if they are present as a
/// block and no rule above them could catch TCP traffic for `metadata` port 80 (see the module's
/// text). `Err` says what is wrong.
pub(crate) fn placement(table: &[String], wanted: &[String], metadata: IpAddr) -> Result<usize, String> {
    let chains = chains_of(table);
    let prerouting = chains.get("PREROUTING").map(Vec::as_slice).unwrap_or_default();
    let Some(at) = prerouting.windows(wanted.len().max(1)).position(|w| w == wanted) else {
        return Err("the jumps were missing or out of order".to_string());
    };
    match catcher(&prerouting[..at], &chains, metadata, 0) {
        Some(rule) => Err(format!("a rule above the jumps could catch metadata traffic: {rule}")),
        None => Ok(at),
    }
}

/// Targets that take a packet out of nat PREROUTING (or the packet itself away) wherever they are.
const TERMINAL: &[&str] = &["DNAT", "REDIRECT", "NETMAP", "ACCEPT", "DROP", "REJECT", "QUEUE", "NFQUEUE"];

/// How deep jumps are followed; deeper counts as catching (no real ruleset nests so deep).
const MAX_DEPTH: usize = 8;

/// The first of `rules` (of PREROUTING at `depth` 0, else of a chain jumped to) that could catch
/// metadata traffic, following jumps into other chains.
fn catcher(
    rules: &[String],
    chains: &HashMap<String, Vec<String>>,
    metadata: IpAddr,
    depth: usize,
) -> Option<String> {
    for rule in rules {
        let parsed = ParsedRule::parse(rule);
        if !parsed.may_match(metadata) {
            continue;
        }
        let Some(target) = parsed.target.as_deref() else { continue };
        if target == CHAIN {
            continue; // our own chain: an extra jump, removed apart
        }
        if TERMINAL.contains(&target) || (depth == 0 && (target == "RETURN" || parsed.goto)) {
            return Some(rule.clone());
        }
        if let Some(chain) = chains.get(target) {
            if depth >= MAX_DEPTH {
                return Some(rule.clone());
            }
            if let Some(inner) = catcher(chain, chains, metadata, depth + 1) {
                return Some(format!("{rule} -> {inner}"));
            }
        }
        // Anything else (RETURN inside a chain, MARK, LOG, CONNMARK...) lets the packet go on.
    }
    None
}

/// The parts of a rule that say whether metadata traffic could match it.
#[derive(Debug, Default)]
struct ParsedRule {
    /// (negated, value) of -d, -p, --dport, --dports.
    destination: Option<(bool, String)>,
    protocol: Option<(bool, String)>,
    dport: Option<(bool, String)>,
    dports: Option<(bool, String)>,
    target: Option<String>,
    /// `-g`: goto, not jump.
    goto: bool,
}

impl ParsedRule {
    fn parse(rule: &str) -> ParsedRule {
        let words = split_words(rule);
        let mut parsed = ParsedRule::default();
        let mut negated = false;
        let mut words = words.into_iter();
        while let Some(word) = words.next() {
            if word == "!" {
                negated = true;
                continue;
            }
            let slot = match word.as_str() {
                "-d" | "--destination" => &mut parsed.destination,
                "-p" | "--protocol" => &mut parsed.protocol,
                "--dport" | "--destination-port" => &mut parsed.dport,
                "--dports" | "--destination-ports" => &mut parsed.dports,
                "-j" | "--jump" | "-g" | "--goto" => {
                    parsed.goto = word.starts_with("-g") || word == "--goto";
                    parsed.target = words.next();
                    negated = false;
                    continue;
                }
                _ => {
                    if word.starts_with('-') {
                        negated = false;
                    }
                    continue;
                }
            };
            *slot = words.next().map(|value| (negated, value));
            negated = false;
        }
        parsed
    }

    /// Whether a TCP packet to `metadata` port 80 could match: only destination, protocol and
    /// destination port are judged; every other match may hold.
    fn may_match(&self, metadata: IpAddr) -> bool {
        let holds = |cond: &Option<(bool, String)>, test: &dyn Fn(&str) -> Option<bool>| match cond {
            None => true,
            // A value this cannot read may match.
            Some((negated, value)) => test(value).is_none_or(|hit| hit != *negated),
        };
        holds(&self.destination, &|v| cidr_contains(v, metadata))
            && holds(&self.protocol, &|v| {
                Some(matches!(v.to_ascii_lowercase().as_str(), "tcp" | "6" | "all" | "0"))
            })
            && holds(&self.dport, &|v| ports_contain(v, 80))
            && holds(&self.dports, &|v| ports_contain(v, 80))
    }
}

/// Words of a rule as `iptables -S` prints it: blank-separated, "quoted" words (comments) kept
/// whole.
fn split_words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => word.extend(chars.next()),
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Whether `address[/prefix]` contains `ip`; `None` when it cannot be read.
fn cidr_contains(value: &str, ip: IpAddr) -> Option<bool> {
    let (address, prefix) = match value.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (value, None),
    };
    let address: IpAddr = address.parse().ok()?;
    let bits = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = match prefix {
        None => bits,
        Some(p) => match p.parse::<u32>() {
            Ok(n) if n <= bits => n,
            // A dotted mask (255.255.255.0), as older iptables print some.
            _ => match p.parse::<IpAddr>().ok()? {
                IpAddr::V4(mask) => u32::from(mask).leading_ones(),
                IpAddr::V6(mask) => u128::from(mask).leading_ones(),
            },
        },
    };
    let to_bits = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    if address.is_ipv4() != ip.is_ipv4() {
        return Some(false);
    }
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
    Some(to_bits(address) & mask == to_bits(ip) & mask)
}

/// Whether a port, range (`a:b`) or comma list of them contains `port`; `None` when unreadable.
fn ports_contain(value: &str, port: u16) -> Option<bool> {
    let mut hit = false;
    for part in value.split(',') {
        let (low, high) = match part.split_once(':') {
            Some((l, h)) => (
                if l.is_empty() { 0 } else { l.parse::<u16>().ok()? },
                if h.is_empty() { u16::MAX } else { h.parse::<u16>().ok()? },
            ),
            None => {
                let p = part.parse::<u16>().ok()?;
                (p, p)
            }
        };
        hit |= (low..=high).contains(&port);
    }
    Some(hit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns() {
        assert_eq!("veth+".parse(), Ok(InterfaceMatch { name: "veth+".into(), negated: false }));
        assert_eq!("!eth0".parse(), Ok(InterfaceMatch { name: "eth0".into(), negated: true }));
        for bad in ["", "!", "a+b", "has space", "averyveryverylongname0", "x;rm"] {
            assert!(bad.parse::<InterfaceMatch>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_as_iptables_prints_them() {
        let i = Interception {
            ipv6: false,
            target: Some("10.0.0.1".parse().unwrap()),
            port: 8183,
            interfaces: vec!["cali+".parse().unwrap(), "!eth0".parse().unwrap()],
        };
        assert_eq!(
            i.dnat_rule(),
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8183"
        );
        assert_eq!(i.jump_rules(), ["-i cali+ -j IMDSGATE", "! -i eth0 -j IMDSGATE"]);
        let v6 = Interception {
            ipv6: true,
            target: Some("fd00::1".parse().unwrap()),
            port: 8183,
            interfaces: vec![],
        };
        assert_eq!(
            v6.dnat_rule(),
            "-d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00::1]:8183"
        );
        assert_eq!(v6.jump_rules(), ["-j IMDSGATE"]);
        let redirect = Interception { target: None, ..v6 };
        assert_eq!(
            redirect.dnat_rule(),
            "-d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8183"
        );
    }

    fn table(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    const V4: IpAddr = IpAddr::V4(METADATA_V4);

    fn jumps() -> Vec<String> {
        vec!["-i veth+ -j IMDSGATE".to_string()]
    }

    #[test]
    fn our_jumps_first_are_in_place() {
        let t = table(&[
            "-P PREROUTING ACCEPT",
            "-N IMDSGATE",
            "-A PREROUTING -i veth+ -j IMDSGATE",
            "-A PREROUTING -j KUBE-SERVICES",
            "-A IMDSGATE -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8183",
        ]);
        assert_eq!(placement(&t, &jumps(), V4), Ok(0));
        let t = table(&["-P PREROUTING ACCEPT", "-A PREROUTING -j KUBE-SERVICES"]);
        assert!(placement(&t, &jumps(), V4).unwrap_err().contains("missing"));
    }

    #[test]
    fn a_calico_jump_above_ours_is_left_alone() {
        // Calico's insert mode: its jump first; its chain DNATs only floating IPs.
        let t = table(&[
            "-P PREROUTING ACCEPT",
            "-N cali-PREROUTING",
            "-N cali-fip-dnat",
            "-N IMDSGATE",
            "-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING",
            "-A PREROUTING -i veth+ -j IMDSGATE",
            "-A cali-PREROUTING -m comment --comment \"cali:r6XmIziWUJsdOK6Z\" -j cali-fip-dnat",
            "-A cali-fip-dnat -d 10.99.0.5/32 -m comment --comment \"floating ip\" -j DNAT --to-destination 10.1.2.3",
            "-A IMDSGATE -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8183",
        ]);
        assert_eq!(placement(&t, &jumps(), V4), Ok(1));
        // An empty chain, marks, logs, other protocols and ports, a RETURN inside a chain: harmless.
        let t = table(&[
            "-N empty",
            "-N sub",
            "-A PREROUTING -j empty",
            "-A PREROUTING -p udp -m udp --dport 9 -j RETURN",
            "-A PREROUTING -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.0.0.9",
            "-A PREROUTING ! -d 169.254.0.0/16 -j ACCEPT",
            "-A PREROUTING -p tcp -m multiport --dports 22,8000:8999 -j REDIRECT --to-ports 1",
            "-A PREROUTING -d 169.254.169.254/32 -p tcp -m tcp ! --dport 80 -j ACCEPT",
            "-A PREROUTING -j sub",
            "-A sub -j RETURN",
            "-A sub -j LOG",
            "-A PREROUTING -i eth0 -j IMDSGATE",
            "-A PREROUTING -i veth+ -j IMDSGATE",
        ]);
        assert_eq!(placement(&t, &jumps(), V4), Ok(8), "an extra jump of ours above is no catcher");
    }

    #[test]
    fn a_rule_above_ours_that_could_catch_metadata_traffic_is_not_in_place() {
        for above in [
            // kube2iam's rule.
            "-d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8181",
            "-d 169.254.0.0/16 -j REDIRECT --to-ports 1",
            "-p tcp -m tcp --dport 70:90 -j ACCEPT",
            "-m mark --mark 0x1 -j ACCEPT",
            "-j RETURN",
            "-g other",
            "-p tcp -m multiport --dports 22,80 -j DNAT --to-destination 10.0.0.9",
            "! -d 10.0.0.0/8 -j NFQUEUE",
        ] {
            let t =
                table(&["-N other", &format!("-A PREROUTING {above}"), "-A PREROUTING -i veth+ -j IMDSGATE"]);
            let why = placement(&t, &jumps(), V4).unwrap_err();
            assert!(why.contains("could catch") && why.contains(above), "{above}: {why}");
        }
        // A jump to a chain that catches it, however nested.
        let t = table(&[
            "-N a",
            "-N b",
            "-A PREROUTING -m comment --comment \"a controller\" -j a",
            "-A PREROUTING -i veth+ -j IMDSGATE",
            "-A a -p udp -j ACCEPT",
            "-A a -j b",
            "-A b -d 169.254.169.254/32 -j DNAT --to-destination 10.9.9.9:80",
        ]);
        let why = placement(&t, &jumps(), V4).unwrap_err();
        assert!(why.contains("-> -j b -> -d 169.254.169.254/32"), "{why}");
        // A loop of jumps counts as catching rather than running forever.
        let t = table(&["-N a", "-A a -j a", "-A PREROUTING -j a", "-A PREROUTING -i veth+ -j IMDSGATE"]);
        assert!(placement(&t, &jumps(), V4).is_err());
        // Below ours, the same rules do not matter.
        let t = table(&[
            "-A PREROUTING -i veth+ -j IMDSGATE",
            "-A PREROUTING -d 169.254.169.254/32 -j DNAT --to-destination 10.9.9.9:80",
        ]);
        assert_eq!(placement(&t, &jumps(), V4), Ok(0));
    }

    #[test]
    fn several_jumps_must_stay_together_in_order() {
        let wanted = vec!["-i cali+ -j IMDSGATE".to_string(), "! -i eth0 -j IMDSGATE".to_string()];
        let t = table(&[
            "-A PREROUTING -j x",
            "-A PREROUTING -i cali+ -j IMDSGATE",
            "-A PREROUTING ! -i eth0 -j IMDSGATE",
        ]);
        assert_eq!(placement(&t, &wanted, V4), Ok(1));
        let t = table(&["-A PREROUTING ! -i eth0 -j IMDSGATE", "-A PREROUTING -i cali+ -j IMDSGATE"]);
        assert!(placement(&t, &wanted, V4).is_err());
    }

    #[test]
    fn ipv6_rules_are_judged_against_the_ipv6_endpoint() {
        let v6 = IpAddr::V6(METADATA_V6);
        let ours = "-A PREROUTING -i veth+ -j IMDSGATE";
        let t = table(&[
            "-A PREROUTING -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00::9]:1",
            ours,
        ]);
        assert!(placement(&t, &jumps(), v6).is_err());
        let t = table(&["-A PREROUTING -d fd00:ec2::/32 -j ACCEPT", ours]);
        assert!(placement(&t, &jumps(), v6).is_err());
        let t = table(&[
            "-A PREROUTING -d fd00:1::/32 -j ACCEPT",
            "-A PREROUTING -d 169.254.169.254/32 -j ACCEPT",
            ours,
        ]);
        assert_eq!(placement(&t, &jumps(), v6), Ok(2));
    }

    #[test]
    fn addresses_ports_and_words() {
        assert_eq!(cidr_contains("169.254.169.254", V4), Some(true));
        assert_eq!(cidr_contains("169.254.0.0/16", V4), Some(true));
        assert_eq!(cidr_contains("169.254.0.0/255.255.0.0", V4), Some(true));
        assert_eq!(cidr_contains("169.255.0.0/16", V4), Some(false));
        assert_eq!(cidr_contains("0.0.0.0/0", V4), Some(true));
        assert_eq!(cidr_contains("::/0", V4), Some(false));
        assert_eq!(cidr_contains("nonsense", V4), None);
        assert_eq!(ports_contain("80", 80), Some(true));
        assert_eq!(ports_contain("1:79,81:", 80), Some(false));
        assert_eq!(ports_contain(":80", 80), Some(true));
        assert_eq!(ports_contain("http", 80), None);
        assert_eq!(
            split_words(r#"-m comment --comment "a \"b\" c" -j X"#),
            ["-m", "comment", "--comment", r#"a "b" c"#, "-j", "X"]
        );
    }
}
