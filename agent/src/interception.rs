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

use crate::metrics::{FamilyLabels, Metrics};
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

    /// Installs (or repairs) the chain and the jumps; safe to run again and again. Says whether it
    /// changed anything: `false` means the rule was already exactly in place.
    pub fn install(&self) -> Result<bool, IptablesError> {
        let ipt = iptables::new(self.ipv6).map_err(|e| err("cannot run iptables", e))?;
        let mut changed = false;
        if !ipt.chain_exists(TABLE, CHAIN).map_err(|e| err("listing chains", e))? {
            ipt.new_chain(TABLE, CHAIN).map_err(|e| err("creating chain", e))?;
            changed = true;
        }
        // The wanted DNAT rule goes in first; stale ones (another port or address) go after.
        let dnat = self.dnat_rule();
        if !ipt.exists(TABLE, CHAIN, &dnat).map_err(|e| err("checking DNAT rule", e))? {
            ipt.insert(TABLE, CHAIN, &dnat, 1).map_err(|e| err("inserting DNAT rule", e))?;
            changed = true;
        }
        for rule in rules_of(&ipt, CHAIN)? {
            if rule != dnat {
                ipt.delete(TABLE, CHAIN, &rule).map_err(|e| err("removing stale DNAT rule", e))?;
                changed = true;
            }
        }
        // The jumps must be the first rules of PREROUTING, in order; extra jumps are removed.
        let wanted = self.jump_rules();
        let current = rules_of(&ipt, "PREROUTING")?;
        if current.iter().take(wanted.len()).ne(wanted.iter()) {
            for rule in wanted.iter().rev() {
                ipt.insert(TABLE, "PREROUTING", rule, 1).map_err(|e| err("inserting jump", e))?;
            }
            changed = true;
        }
        Ok(remove_jumps(&ipt, wanted.len())? > 0 || changed)
    }

    /// `ipv4` or `ipv6`: the metric label of this rule.
    pub fn family(&self) -> &'static str {
        if self.ipv6 { "ipv6" } else { "ipv4" }
    }

    /// Removes the jumps and the chain (`imdsgate-agent iptables uninstall`).
    pub fn uninstall(ipv6: bool) -> Result<(), IptablesError> {
        let ipt = iptables::new(ipv6).map_err(|e| err("cannot run iptables", e))?;
        remove_jumps(&ipt, 0)?;
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

/// Checks the installed rules every `every` and puts back what another tool removed or changed,
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
            let present = match tokio::task::spawn_blocking(move || checked.install()).await {
                Ok(Ok(false)) => true,
                Ok(Ok(true)) => {
                    metrics.rule_repairs.get_or_create(&labels).inc();
                    tracing::warn!(
                        family = labels.family,
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

/// Deletes every PREROUTING jump to the chain after the first `keep` rules, by position from the
/// bottom so positions stay valid; returns how many it deleted.
fn remove_jumps(ipt: &iptables::IPTables, keep: usize) -> Result<usize, IptablesError> {
    let rules = rules_of(ipt, "PREROUTING")?;
    let target = format!("-j {CHAIN}");
    let mut removed = 0;
    for (index, rule) in rules.iter().enumerate().rev() {
        if index >= keep && rule.ends_with(&target) {
            let position = (index + 1).to_string();
            let out = ipt
                .execute(TABLE, &format!("-D PREROUTING {position}"))
                .map_err(|e| err("removing jump", e))?;
            if !out.status.success() {
                return Err(IptablesError(format!(
                    "removing jump: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            removed += 1;
        }
    }
    Ok(removed)
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
}
