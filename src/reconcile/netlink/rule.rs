//! Policy rules: `desired::Rule` ⇄ `RuleMessage`, reading ours back, adds and deletes.
//!
//! A rule is ours when its protocol (`FRA_PROTOCOL`) is [`RTPROT_WIREMESH`] and the table it
//! looks up is one of [`OWN_TABLES`]; ours sit at [`RULE_PRIORITY`] and look up a table
//! (`FR_ACT_TO_TBL`). A protocol-104 rule to another table is someone else's.

use std::fmt;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::IpVersion;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use tracing::debug;

use super::route::table_byte;
use super::{Answer, Netlink, OWN_TABLES, RTPROT_WIREMESH, RULE_PRIORITY, nl_err, request};
use crate::desired::Rule;
use crate::reconcile::KernelError;

/// Rules of ours as read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleDump {
    /// Rules a `desired::Rule` describes exactly, sorted.
    pub rules: Vec<Rule>,
    /// Rules of ours that no `desired::Rule` can describe; they can only be deleted.
    pub strays: Vec<StrayRule>,
}

/// A rule with wiremesh's protocol that no `desired::Rule` describes (another priority or
/// action, or selectors such as fwmark or oif). Kept as the kernel reported it, which is what
/// deleting exactly it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrayRule {
    message: RuleMessage,
}

impl fmt::Display for StrayRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.message.header;
        write!(f, "{:?} rule", h.family)?;
        for a in &self.message.attributes {
            match a {
                RuleAttribute::Priority(p) => write!(f, " pref {p}")?,
                RuleAttribute::Source(s) => write!(f, " from {s}/{}", h.src_len)?,
                RuleAttribute::Destination(d) => write!(f, " to {d}/{}", h.dst_len)?,
                RuleAttribute::Iifname(i) => write!(f, " iif {i}")?,
                RuleAttribute::Oifname(o) => write!(f, " oif {o}")?,
                RuleAttribute::FwMark(m) => write!(f, " fwmark {m:#x}")?,
                RuleAttribute::Table(t) => write!(f, " lookup {t}")?,
                _ => {}
            }
        }
        write!(f, " action {:?}", h.action)
    }
}

fn family_of(rule: &Rule) -> Result<AddressFamily, String> {
    match (rule.src, rule.dst) {
        (Some(s), Some(d)) if s.is_ipv4() != d.is_ipv4() => {
            Err(format!("source {s} and destination {d} differ in family"))
        }
        (Some(n), _) | (_, Some(n)) if n.is_ipv6() => Ok(AddressFamily::Inet6),
        // A rule without addresses (iif only) is IPv4, as Kilo's are.
        _ => Ok(AddressFamily::Inet),
    }
}

/// The request that adds or deletes `rule` (same message; the kernel matches every attribute
/// given, the protocol included).
pub(super) fn rule_message(rule: &Rule) -> Result<RuleMessage, String> {
    let mut m = RuleMessage::default();
    m.header.family = family_of(rule)?;
    m.header.table = table_byte(rule.table);
    // Not `Unspec` (what a default message holds): the kernel accepts such a rule, and every
    // lookup that reaches it then fails with EINVAL.
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Table(rule.table));
    m.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(
            RTPROT_WIREMESH,
        )));
    if let Some(s) = rule.src {
        m.header.src_len = s.prefix();
        m.attributes.push(RuleAttribute::Source(s.ip()));
    }
    if let Some(d) = rule.dst {
        m.header.dst_len = d.prefix();
        m.attributes.push(RuleAttribute::Destination(d.ip()));
    }
    if let Some(i) = &rule.iif {
        m.attributes.push(RuleAttribute::Iifname(i.clone()));
    }
    Ok(m)
}

/// Whether `m` carries wiremesh's protocol.
fn has_our_protocol(m: &RuleMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == RTPROT_WIREMESH))
}

/// The table `m` looks up (the 32-bit attribute when present, else the header's byte).
fn rule_table(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// Whether `m` is wiremesh's: its protocol, and a table of [`OWN_TABLES`].
fn is_ours(m: &RuleMessage) -> bool {
    has_our_protocol(m) && OWN_TABLES.contains(&rule_table(m))
}

/// The `desired::Rule` that `m` (one of ours) is, if one describes it exactly.
pub(super) fn parse_rule(m: &RuleMessage) -> Option<Rule> {
    let h = &m.header;
    if h.action != RuleAction::ToTable || h.tos != 0 {
        return None;
    }
    let net = |ip: &IpAddr, len: u8| IpNetwork::new(*ip, len).ok();
    let mut rule = Rule {
        src: None,
        dst: None,
        iif: None,
        table: u32::from(h.table),
    };
    let mut priority = 0;
    for a in &m.attributes {
        match a {
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Protocol(_) => {}
            RuleAttribute::Source(ip) => rule.src = Some(net(ip, h.src_len)?),
            RuleAttribute::Destination(ip) => rule.dst = Some(net(ip, h.dst_len)?),
            RuleAttribute::Iifname(i) => rule.iif = Some(i.clone()),
            // The kernel reports these at their "unset" value (-1) on every rule.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => return None,
        }
    }
    (priority == RULE_PRIORITY).then_some(rule)
}

fn rule_text(verb: &str, r: &Rule) -> String {
    let mut s = format!("{verb} rule");
    if let Some(src) = r.src {
        s += &format!(" from {src}");
    }
    if let Some(dst) = r.dst {
        s += &format!(" to {dst}");
    }
    if let Some(i) = &r.iif {
        s += &format!(" iif {i}");
    }
    s + &format!(" lookup {} pref {RULE_PRIORITY}", r.table)
}

impl Netlink {
    /// Every IPv4 and IPv6 rule of ours (protocol 104, a table of [`OWN_TABLES`]), as the
    /// kernel reports it.
    async fn read_own_rule_messages(&self) -> Result<Vec<RuleMessage>, KernelError> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            // Rule dumps take no filter: the protocol is checked here.
            let msgs: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(v)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("dump rules", e))?;
            out.extend(msgs.into_iter().filter(is_ours));
        }
        Ok(out)
    }

    /// Every rule of ours (protocol 104 to a table of [`OWN_TABLES`], IPv4 and IPv6), split into those a `desired::Rule`
    /// describes and the strays.
    pub async fn read_rule_dump(&self) -> Result<RuleDump, KernelError> {
        let mut dump = RuleDump::default();
        for m in self.read_own_rule_messages().await? {
            match parse_rule(&m) {
                Some(r) => dump.rules.push(r),
                None => dump.strays.push(StrayRule { message: m }),
            }
        }
        dump.rules.sort();
        debug!(
            rules = dump.rules.len(),
            strays = dump.strays.len(),
            "read rules"
        );
        Ok(dump)
    }

    /// Every rule of ours that a `desired::Rule` describes, sorted (see [`StrayRule`] for the
    /// others).
    pub async fn read_rules(&self) -> Result<Vec<Rule>, KernelError> {
        Ok(self.read_rule_dump().await?.rules)
    }

    /// Add one rule (priority 1107, protocol 104). Adding a rule of ours that is already there
    /// is not an error; an identical foreign rule is (the kernel's duplicate check may ignore
    /// the protocol), and it is left alone.
    pub async fn add_rule(&self, rule: &Rule) -> Result<(), KernelError> {
        let op = || rule_text("add", rule);
        let m = rule_message(rule).map_err(|message| KernelError::Netlink { op: op(), message })?;
        // NLM_F_EXCL: without it the kernel happily adds a second, identical rule.
        let answer = self
            .send_one(request(
                RouteNetlinkMessage::NewRule(m),
                NLM_F_CREATE | NLM_F_EXCL,
            ))
            .await;
        debug!(op = "add rule", ?rule, ?answer);
        if answer == Answer::Errno(libc::EEXIST) {
            return if self.read_rules().await?.contains(rule) {
                Ok(())
            } else {
                Err(KernelError::Netlink {
                    op: op(),
                    message: "an identical rule not owned by wiremesh exists; left alone".into(),
                })
            };
        }
        answer.into_result(&[], op)
    }

    /// Delete one rule of ours. Deleting a rule that is not there is not an error.
    pub async fn del_rule(&self, rule: &Rule) -> Result<(), KernelError> {
        let op = || rule_text("del", rule);
        let m = rule_message(rule).map_err(|message| KernelError::Netlink { op: op(), message })?;
        let answer = self
            .send_one(request(RouteNetlinkMessage::DelRule(m), 0))
            .await;
        debug!(op = "del rule", ?rule, ?answer);
        answer.into_result(&[libc::ENOENT], op)
    }

    /// Delete exactly these rules of ours (e.g. the strays of [`Netlink::read_rule_dump`]); one
    /// result per rule, a missing rule is not an error.
    pub async fn del_stray_rules(&self, strays: &[StrayRule]) -> Vec<Result<(), KernelError>> {
        let msgs: Vec<_> = strays
            .iter()
            .map(|s| request(RouteNetlinkMessage::DelRule(s.message.clone()), 0))
            .collect();
        let answers = self.send_acked(msgs).await;
        strays
            .iter()
            .zip(answers)
            .map(|(s, a)| {
                debug!(op = "del stray rule", %s, ?a);
                a.into_result(&[libc::ENOENT], || format!("del {s}"))
            })
            .collect()
    }

    /// Every rule of ours, whether a `desired::Rule` describes it or not.
    pub(super) async fn read_all_own_rules(&self) -> Result<Vec<StrayRule>, KernelError> {
        Ok(self
            .read_own_rule_messages()
            .await?
            .into_iter()
            .map(|message| StrayRule { message })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn rules_survive_the_trip_through_a_message() {
        let rules = [
            Rule {
                src: Some(net("10.42.0.0/24")),
                dst: Some(net("192.168.0.2/32")),
                iif: None,
                table: 1107,
            },
            Rule {
                src: None,
                dst: Some(net("192.168.0.3/32")),
                iif: Some("wiremesh0".into()),
                table: 1107,
            },
            Rule {
                src: Some(net("fd00:42::/64")),
                dst: None,
                iif: None,
                table: 100,
            },
        ];
        for r in rules {
            let m = rule_message(&r).unwrap();
            assert!(has_our_protocol(&m));
            assert_eq!(parse_rule(&m), Some(r));
        }
    }

    #[test]
    fn only_rules_to_wiremesh_tables_are_ours() {
        let mut r = Rule {
            src: Some(net("10.42.0.0/24")),
            dst: None,
            iif: None,
            table: 1107,
        };
        assert!(is_ours(&rule_message(&r).unwrap()));
        r.table = 254;
        assert!(is_ours(&rule_message(&r).unwrap()));
        for other in [100, 200, 255, 100_000] {
            r.table = other;
            assert!(!is_ours(&rule_message(&r).unwrap()), "table {other}");
        }
    }

    #[test]
    fn a_rule_mixing_families_is_refused() {
        let r = Rule {
            src: Some(net("10.0.0.0/8")),
            dst: Some(net("fd00::/8")),
            iif: None,
            table: 1107,
        };
        assert!(rule_message(&r).is_err());
    }

    #[test]
    fn rules_with_other_priorities_or_selectors_are_strays() {
        let r = Rule {
            src: Some(net("10.0.0.0/8")),
            dst: None,
            iif: None,
            table: 1107,
        };
        let mut m = rule_message(&r).unwrap();
        m.attributes.push(RuleAttribute::FwMark(7));
        assert_eq!(parse_rule(&m), None);
        let mut m = rule_message(&r).unwrap();
        for a in &mut m.attributes {
            if let RuleAttribute::Priority(p) = a {
                *p = 5;
            }
        }
        assert_eq!(parse_rule(&m), None);
    }
}
