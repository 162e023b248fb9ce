//! Masquerading in wiremesh's own firewall table or chain: render it, apply it atomically, read
//! it back as a [`Masquerade`] so the planner can compare, and delete it. Nothing else in the
//! firewall is read into the diff or ever changed. [`Firewall`] also runs the MSS clamp, whose
//! own table or chain [`super::mss`] renders and reads.
//!
//! ```text
//! Masquerade ─ canonical() ─→ render_nft()            ─→ nft -f -                  (one transaction)
//!                           ├→ render_nft_additions()  ─→ nft -f -          (added elements only)
//!                           └→ render_iptables_apply() ─→ ip{,6}tables-restore --noflush
//! nft -j list table inet wiremesh ─ parse_nft_table()   ─→ TableState ─→ Option<Masquerade>
//! ip{,6}tables-save -t nat        ─ parse_iptables_save() ─┘
//! ```
//!
//! The renderers and parsers are pure; [`Firewall`] runs the binaries (`nft`, `iptables-*`) at the
//! edge, optionally inside a named network namespace, and maps failures to
//! [`KernelError::Firewall`] with the tool's stderr. Depends on the desired state, `ipnetwork`,
//! `serde_json` and tokio's process support; never on the topology engine or Kubernetes.
//!
//! **nftables** (the default): one `table inet wiremesh`. One `inet` table rather than an `ip` and
//! an `ip6` table because it is one name to own, read and delete, and one transaction replaces it
//! whole; NAT in `inet` tables needs Linux ≥ 5.2. Set element types are per family
//! (`ipv4_addr`/`ipv6_addr`), so each list is two interval sets (`sources4`, `sources6`, …).
//!
//! **iptables** (hosts without nftables): a chain `WIREMESH-NAT` in the `nat` table of each
//! family, entered by one commented jump from `POSTROUTING`. iptables has no sets without
//! ipset, so each CIDR is one rule. Each family is one `--noflush` restore transaction.
//!
//! Why lists are canonicalised first: an interval set refuses overlapping elements ("conflicting
//! intervals"), and the kernel lists elements sorted. So what is written is the minimal sorted
//! CIDR cover of each list ([`canonical`]), and that is also what a read returns; the planner
//! compares the canonical form of the desired state with it, so nothing is rewritten needlessly.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tracing::debug;

use super::KernelError;
use super::mss::{self, ClampState};
use crate::desired::Masquerade;

/// Family of wiremesh's nftables table.
pub const NFT_FAMILY: &str = "inet";
/// Name of wiremesh's nftables table (`table inet wiremesh`).
pub const NFT_TABLE: &str = "wiremesh";
/// Name of the NAT base chain in wiremesh's nftables table.
pub const NFT_CHAIN: &str = "postrouting";
/// Name of wiremesh's chain in the iptables `nat` table.
pub const IPT_CHAIN: &str = "WIREMESH-NAT";
/// Comment on the `POSTROUTING` rule that jumps to [`IPT_CHAIN`].
pub const IPT_JUMP_COMMENT: &str = "wiremesh: masquerade";

/// How long one firewall command may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// nftables' `srcnat` priority: the same place as iptables' `nat POSTROUTING`.
const SRCNAT_PRIORITY: i64 = 100;

/// Which firewall tool programs the masquerade rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FirewallMode {
    /// nftables when the `nft` binary is present and can list the ruleset, else iptables.
    #[default]
    Auto,
    /// wiremesh's own `table inet wiremesh`, through `nft`.
    Nftables,
    /// wiremesh's own `WIREMESH-NAT` chains, through `iptables-restore`/`ip6tables-restore`.
    Iptables,
}

impl fmt::Display for FirewallMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FirewallMode::Auto => "auto",
            FirewallMode::Nftables => "nftables",
            FirewallMode::Iptables => "iptables",
        })
    }
}

/// A firewall mode name that is none of `auto`, `nftables` (`nft`), `iptables`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown firewall mode {0:?}: expected auto, nftables or iptables")]
pub struct UnknownFirewallMode(pub String);

impl FromStr for FirewallMode {
    type Err = UnknownFirewallMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(FirewallMode::Auto),
            "nftables" | "nft" => Ok(FirewallMode::Nftables),
            "iptables" => Ok(FirewallMode::Iptables),
            other => Err(UnknownFirewallMode(other.to_owned())),
        }
    }
}

/// An IP family: selects `iptables` or `ip6tables`, `ip` or `ip6` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    fn of(net: &IpNetwork) -> IpFamily {
        match net {
            IpNetwork::V4(_) => IpFamily::V4,
            IpNetwork::V6(_) => IpFamily::V6,
        }
    }

    fn bits(self) -> u32 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    /// The `*-restore` binary of this family.
    fn restore(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        }
    }

    /// The `*-save` binary of this family.
    fn save(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-save",
            IpFamily::V6 => "ip6tables-save",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Canonical form

/// An inclusive address interval of one family, addresses as integers.
type Interval = (IpFamily, u128, u128);

/// All ones in the low `host_bits` bits.
fn low_mask(host_bits: u32) -> u128 {
    if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

fn addr_value(ip: IpAddr) -> (IpFamily, u128) {
    match ip {
        IpAddr::V4(a) => (IpFamily::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (IpFamily::V6, u128::from(a)),
    }
}

fn interval_of(net: &IpNetwork) -> Interval {
    let fam = IpFamily::of(net);
    let (_, start) = addr_value(net.network());
    let start = start & !low_mask(fam.bits() - u32::from(net.prefix()));
    (
        fam,
        start,
        start | low_mask(fam.bits() - u32::from(net.prefix())),
    )
}

fn network_at(fam: IpFamily, start: u128, prefix: u32) -> IpNetwork {
    let prefix = u8::try_from(prefix).unwrap_or(u8::MAX);
    let net = match fam {
        // Values of a V4 interval never exceed u32::MAX.
        IpFamily::V4 => IpNetwork::new(
            IpAddr::V4(Ipv4Addr::from(u32::try_from(start).unwrap_or(u32::MAX))),
            prefix,
        ),
        IpFamily::V6 => IpNetwork::new(IpAddr::V6(Ipv6Addr::from(start)), prefix),
    };
    net.unwrap_or_else(|_| unreachable!("prefix {prefix} fits its family"))
}

/// The minimal sorted list of CIDRs that covers exactly the union of `intervals`
/// (IPv4 first, then IPv6, ascending).
fn cover(mut intervals: Vec<Interval>) -> Vec<IpNetwork> {
    intervals.sort_unstable();
    let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
    for (fam, start, end) in intervals {
        match merged.last_mut() {
            Some((f, _, e)) if *f == fam && start <= e.saturating_add(1) => *e = (*e).max(end),
            _ => merged.push((fam, start, end)),
        }
    }
    let mut out = Vec::with_capacity(merged.len());
    for (fam, mut start, end) in merged {
        loop {
            // The largest aligned block that starts at `start` and ends within `end`.
            let mut host = fam.bits();
            while host > 0 && (start & low_mask(host) != 0 || start | low_mask(host) > end) {
                host -= 1;
            }
            out.push(network_at(fam, start, fam.bits() - host));
            let last = start | low_mask(host);
            if last >= end {
                break;
            }
            start = last + 1;
        }
    }
    out
}

/// The minimal sorted CIDR list covering exactly the addresses of `nets` (host bits cleared,
/// overlaps and adjacent blocks merged; IPv4 first). What the kernel sets hold and list.
pub fn canonical_nets(nets: &[IpNetwork]) -> Vec<IpNetwork> {
    cover(nets.iter().map(interval_of).collect())
}

/// `m` with each list in canonical form ([`canonical_nets`]): the same traffic is matched.
pub fn canonical(m: &Masquerade) -> Masquerade {
    Masquerade {
        sources: canonical_nets(&m.sources),
        destinations: canonical_nets(&m.destinations),
        exempt: canonical_nets(&m.exempt),
    }
}

// ---------------------------------------------------------------------------------------------
// What the kernel holds

/// What the firewall holds where one of wiremesh's tables (or iptables chains) lives, `T`
/// being what wiremesh renders there, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<T> {
    /// Nothing of wiremesh's: no table (nftables) or no chain in either family (iptables).
    Absent,
    /// wiremesh's rules, exactly as rendered, for this value.
    Present(T),
    /// wiremesh's table or chain exists but is not what wiremesh renders (changed by hand, an
    /// older layout, a missing jump); replacing it repairs it.
    Unexpected(String),
}

impl<T: Clone + Default> Found<T> {
    /// The value the planner compares: `None` when absent; `T`'s default when unexpected (an
    /// empty [`Masquerade`], an empty interface name), which differs from anything wiremesh
    /// wants, so the planner replaces the table (or deletes it when nothing is wanted).
    pub fn compared(&self) -> Option<T> {
        match self {
            Found::Absent => None,
            Found::Present(v) => Some(v.clone()),
            Found::Unexpected(_) => Some(T::default()),
        }
    }
}

/// What the firewall holds where wiremesh's masquerade rules live.
pub type TableState = Found<Masquerade>;

// ---------------------------------------------------------------------------------------------
// nftables

/// The three lists, in rule order, with their set name stem.
fn lists(m: &Masquerade) -> [(&'static str, &[IpNetwork]); 3] {
    [
        ("exempt", &m.exempt[..]),
        ("sources", &m.sources[..]),
        ("destinations", &m.destinations[..]),
    ]
}

/// One rule of the chain: `<proto> <field> @<set> counter <verdict>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NftRule {
    proto: &'static str,
    field: &'static str,
    set: &'static str,
    verdict: &'static str,
}

/// The chain, in order: exemptions return first, then sources and destinations masquerade.
const NFT_RULES: [NftRule; 6] = [
    NftRule {
        proto: "ip",
        field: "daddr",
        set: "exempt4",
        verdict: "return",
    },
    NftRule {
        proto: "ip6",
        field: "daddr",
        set: "exempt6",
        verdict: "return",
    },
    NftRule {
        proto: "ip",
        field: "saddr",
        set: "sources4",
        verdict: "masquerade",
    },
    NftRule {
        proto: "ip6",
        field: "saddr",
        set: "sources6",
        verdict: "masquerade",
    },
    NftRule {
        proto: "ip",
        field: "daddr",
        set: "destinations4",
        verdict: "masquerade",
    },
    NftRule {
        proto: "ip6",
        field: "daddr",
        set: "destinations6",
        verdict: "masquerade",
    },
];

/// The set name for a list stem and family: `sources4`, `exempt6`, …
fn set_name(stem: &str, fam: IpFamily) -> String {
    match fam {
        IpFamily::V4 => format!("{stem}4"),
        IpFamily::V6 => format!("{stem}6"),
    }
}

/// The `nft -f -` script that replaces wiremesh's table with one for `m`, in one transaction.
///
/// `add table` then `delete table` makes the delete succeed whether or not the table existed;
/// nothing outside `table inet wiremesh` is named, so no other table is touched.
pub fn render_nft(m: &Masquerade) -> String {
    let c = canonical(m);
    let mut s = String::new();
    let _ = writeln!(s, "add table {NFT_FAMILY} {NFT_TABLE}");
    let _ = writeln!(s, "delete table {NFT_FAMILY} {NFT_TABLE}");
    let _ = writeln!(s, "table {NFT_FAMILY} {NFT_TABLE} {{");
    for (stem, nets) in lists(&c) {
        for fam in [IpFamily::V4, IpFamily::V6] {
            let _ = writeln!(s, "\tset {} {{", set_name(stem, fam));
            let ty = match fam {
                IpFamily::V4 => "ipv4_addr",
                IpFamily::V6 => "ipv6_addr",
            };
            let _ = writeln!(s, "\t\ttype {ty}");
            let _ = writeln!(s, "\t\tflags interval");
            let elems: Vec<String> = nets
                .iter()
                .filter(|n| IpFamily::of(n) == fam)
                .map(ToString::to_string)
                .collect();
            if !elems.is_empty() {
                let _ = writeln!(s, "\t\telements = {{");
                let _ = writeln!(s, "\t\t\t{}", elems.join(",\n\t\t\t"));
                let _ = writeln!(s, "\t\t}}");
            }
            let _ = writeln!(s, "\t}}");
        }
    }
    let _ = writeln!(s, "\tchain {NFT_CHAIN} {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    for r in NFT_RULES {
        let _ = writeln!(
            s,
            "\t\t{} {} @{} counter {}",
            r.proto, r.field, r.set, r.verdict
        );
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

/// The `nft -f -` script that removes wiremesh's table whether or not it exists.
pub fn render_nft_delete() -> String {
    format!("add table {NFT_FAMILY} {NFT_TABLE}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n")
}

/// The `nft -f -` script that turns the sets of table `from` into those of `to` by adding
/// elements, in one transaction; `None` when that is not the cheap way: nothing to add, or an
/// element of `from` to delete. Both are taken in canonical form, which is what [`render_nft`]
/// writes and a read returns.
///
/// Why: a join adds one or two elements to sets that hold one per node, and replacing the table
/// makes `nft` parse and the kernel rebuild all of them (about 70 ms at 10,000 elements), while
/// adding them takes a few milliseconds. Deleting is the other way round: nft 1.0.6 spends about
/// 8 ms per element deleted from an interval set of 10,000 (measured in a network namespace), so
/// any change with a deletion replaces the table.
pub fn render_nft_additions(from: &Masquerade, to: &Masquerade) -> Option<String> {
    let (from, to) = (canonical(from), canonical(to));
    let mut script = String::new();
    for ((stem, old), (_, new)) in lists(&from).into_iter().zip(lists(&to)) {
        for fam in [IpFamily::V4, IpFamily::V6] {
            let of_fam = |nets: &[IpNetwork]| -> std::collections::BTreeSet<IpNetwork> {
                nets.iter()
                    .filter(|n| IpFamily::of(n) == fam)
                    .copied()
                    .collect()
            };
            let (old, new) = (of_fam(old), of_fam(new));
            if !old.is_subset(&new) {
                return None;
            }
            let added: Vec<String> = new.difference(&old).map(ToString::to_string).collect();
            if !added.is_empty() {
                let _ = writeln!(
                    script,
                    "add element {NFT_FAMILY} {NFT_TABLE} {} {{ {} }}",
                    set_name(stem, fam),
                    added.join(", ")
                );
            }
        }
    }
    (!script.is_empty()).then_some(script)
}

/// Why a listing could not be read at all (as opposed to holding unexpected rules).
#[derive(Debug, thiserror::Error)]
#[error("cannot parse nft JSON: {0}")]
pub struct ParseError(pub(super) String);

/// The address interval of one set element in `nft -j` output: an address, a prefix, a range,
/// or any of these wrapped in `{"elem": {"val": …}}`.
fn parse_elem(v: &Value, fam: IpFamily) -> Option<Interval> {
    let addr = |v: &Value| -> Option<u128> {
        let ip: IpAddr = v.as_str()?.parse().ok()?;
        let (f, x) = addr_value(ip);
        (f == fam).then_some(x)
    };
    if let Some(x) = addr(v) {
        return Some((fam, x, x));
    }
    let obj = v.as_object()?;
    if let Some(p) = obj.get("prefix") {
        let start = addr(p.get("addr")?)?;
        let len = u32::try_from(p.get("len")?.as_u64()?).ok()?;
        let host = fam.bits().checked_sub(len)?;
        return Some((fam, start & !low_mask(host), start | low_mask(host)));
    }
    if let Some(r) = obj.get("range") {
        let r = r.as_array()?;
        let (a, b) = (addr(r.first()?)?, addr(r.get(1)?)?);
        return (r.len() == 2 && a <= b).then_some((fam, a, b));
    }
    if let Some(e) = obj.get("elem") {
        return parse_elem(e.get("val")?, fam);
    }
    None
}

/// The rule signature of one `nft -j` rule, if it has exactly the shape wiremesh renders.
fn parse_rule(rule: &Value) -> Option<NftRule> {
    let expr = rule.get("expr")?.as_array()?;
    let [m, counter, verdict] = &expr[..] else {
        return None;
    };
    let m = m.get("match")?;
    if m.get("op")?.as_str()? != "==" {
        return None;
    }
    let payload = m.get("left")?.get("payload")?;
    let proto = payload.get("protocol")?.as_str()?;
    let field = payload.get("field")?.as_str()?;
    let set = m.get("right")?.as_str()?.strip_prefix('@')?;
    counter.get("counter")?;
    let verdict = verdict.as_object()?;
    if verdict.len() != 1 {
        return None;
    }
    let verdict = verdict.keys().next()?;
    NFT_RULES
        .into_iter()
        .find(|r| r.proto == proto && r.field == field && r.set == set && r.verdict == verdict)
}

/// Read the output of `nft -j list table inet wiremesh` into the lists it holds.
///
/// The table must be exactly what [`render_nft`] writes (same sets, one chain with the same hook,
/// priority and rules in order); anything else is [`TableState::Unexpected`]. Counters and handles
/// are ignored.
pub fn parse_nft_table(json: &str) -> Result<TableState, ParseError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| ParseError(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| ParseError("no \"nftables\" array".into()))?;
    let ours = |o: &Value| {
        o.get("family").and_then(Value::as_str) == Some(NFT_FAMILY)
            && o.get("table").and_then(Value::as_str) == Some(NFT_TABLE)
    };
    let mut sets: Vec<(String, Vec<Interval>)> = Vec::new();
    let mut chains = 0;
    let mut rules = Vec::new();
    let mut found_table = false;
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => {
                found_table |= body.get("family").and_then(Value::as_str) == Some(NFT_FAMILY)
                    && body.get("name").and_then(Value::as_str) == Some(NFT_TABLE);
            }
            "set" if ours(body) => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
                let fam = match body.get("type").and_then(Value::as_str) {
                    Some("ipv4_addr") => IpFamily::V4,
                    Some("ipv6_addr") => IpFamily::V6,
                    other => return Ok(unexpected(format!("set {name} has type {other:?}"))),
                };
                let flags: Vec<&str> = body
                    .get("flags")
                    .and_then(Value::as_array)
                    .map(|f| f.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if flags != ["interval"] {
                    return Ok(unexpected(format!("set {name} has flags {flags:?}")));
                }
                let mut elems = Vec::new();
                let raw = body.get("elem").and_then(Value::as_array);
                for e in raw.into_iter().flatten() {
                    match parse_elem(e, fam) {
                        Some(i) => elems.push(i),
                        None => return Ok(unexpected(format!("set {name}: element {e}"))),
                    }
                }
                sets.push((name.to_owned(), elems));
            }
            "chain" if ours(body) => {
                chains += 1;
                let name = body.get("name").and_then(Value::as_str);
                let ok = name == Some(NFT_CHAIN)
                    && body.get("type").and_then(Value::as_str) == Some("nat")
                    && body.get("hook").and_then(Value::as_str) == Some("postrouting")
                    && body.get("prio").and_then(Value::as_i64) == Some(SRCNAT_PRIORITY)
                    && body.get("policy").and_then(Value::as_str) == Some("accept");
                if !ok {
                    return Ok(unexpected(format!("chain {body}")));
                }
            }
            "rule" if ours(body) => match parse_rule(body) {
                Some(r) => rules.push(r),
                None => return Ok(unexpected(format!("rule {body}"))),
            },
            _ if ours(body) => return Ok(unexpected(format!("{kind} {body}"))),
            _ => {}
        }
    }
    if !found_table {
        return Ok(TableState::Absent);
    }
    if chains != 1 || rules != NFT_RULES {
        return Ok(unexpected(format!(
            "{chains} chain(s), rules {:?}",
            rules.iter().map(|r| r.set).collect::<Vec<_>>()
        )));
    }
    let mut want: Vec<String> = Vec::new();
    for (stem, _) in lists(&Masquerade::default()) {
        want.push(set_name(stem, IpFamily::V4));
        want.push(set_name(stem, IpFamily::V6));
    }
    let mut have: Vec<&str> = sets.iter().map(|(n, _)| n.as_str()).collect();
    have.sort_unstable();
    want.sort_unstable();
    if have != want {
        return Ok(unexpected(format!("sets {have:?}")));
    }
    let gather = |stem: &str| -> Vec<IpNetwork> {
        let v4 = set_name(stem, IpFamily::V4);
        let v6 = set_name(stem, IpFamily::V6);
        cover(
            sets.iter()
                .filter(|(n, _)| *n == v4 || *n == v6)
                .flat_map(|(_, e)| e.iter().copied())
                .collect(),
        )
    };
    Ok(TableState::Present(Masquerade {
        sources: gather("sources"),
        destinations: gather("destinations"),
        exempt: gather("exempt"),
    }))
}

fn unexpected(why: String) -> TableState {
    TableState::Unexpected(why)
}

// ---------------------------------------------------------------------------------------------
// iptables

/// What a rule in [`IPT_CHAIN`] does, named by its comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Exempt,
    Source,
    Destination,
}

impl Role {
    fn comment(self) -> &'static str {
        match self {
            Role::Exempt => "wiremesh: exempt",
            Role::Source => "wiremesh: source",
            Role::Destination => "wiremesh: destination",
        }
    }

    fn from_comment(c: &str) -> Option<Role> {
        [Role::Exempt, Role::Source, Role::Destination]
            .into_iter()
            .find(|r| r.comment() == c)
    }
}

/// The `-j` rule spec of the jump from `POSTROUTING`, as `iptables-save` prints it.
fn jump_spec() -> String {
    format!("-m comment --comment \"{IPT_JUMP_COMMENT}\" -j {IPT_CHAIN}")
}

/// Split an `iptables-save` line into words, honouring double quotes and backslash escapes.
pub(super) fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// `iptables-restore` lines that leave exactly one jump `mine` in `parent`, first: every saved
/// jump (`jumps`, as `iptables-save` lists them) but the first exact one is deleted, and `mine`
/// is inserted at the top when none was exact.
pub(super) fn write_jumps(out: &mut String, parent: &str, jumps: &[String], mine: &str) {
    let mut kept = false;
    for spec in jumps {
        if spec == mine && !kept {
            kept = true;
        } else {
            let _ = writeln!(out, "-D {parent} {spec}");
        }
    }
    if !kept {
        let _ = writeln!(out, "-I {parent} 1 {mine}");
    }
}

/// wiremesh's part of one family's `iptables-save` output for one table: its chain, the jumps
/// to it and its rules.
#[derive(Debug, Default)]
pub(super) struct SavedChain {
    /// Whether our chain is declared.
    pub chain: bool,
    /// Rule specs (after `-A PARENT `) of the parent chain's rules that jump to ours.
    pub jumps: Vec<String>,
    /// Rule specs (after `-A CHAIN `) of our chain, in order.
    pub rules: Vec<String>,
}

/// Our `chain` in `table` of an `iptables-save` output, entered from the built-in `parent`.
pub(super) fn saved_chain(save: &str, table: &str, parent: &str, chain: &str) -> SavedChain {
    let mut s = SavedChain::default();
    let mut in_table = false;
    let from = format!("-A {parent} ");
    let ours = format!("-A {chain} ");
    let declared = format!(":{chain}");
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            in_table = t == table;
            continue;
        }
        if !in_table {
            continue;
        }
        if line.split_whitespace().next() == Some(declared.as_str()) {
            s.chain = true;
        } else if let Some(spec) = line.strip_prefix(&from) {
            let w = split_words(spec);
            if w.windows(2)
                .any(|p| (p[0] == "-j" || p[0] == "-g") && p[1] == chain)
            {
                s.jumps.push(spec.to_owned());
            }
        } else if let Some(spec) = line.strip_prefix(&ours) {
            s.rules.push(spec.to_owned());
        }
    }
    s
}

fn saved_nat(save: &str) -> SavedChain {
    saved_chain(save, "nat", "POSTROUTING", IPT_CHAIN)
}

/// One rule of our chain: role and network, if it has exactly the shape wiremesh renders.
fn parse_ipt_rule(spec: &str, fam: IpFamily) -> Option<(Role, IpNetwork)> {
    let w = split_words(spec);
    let mut src = None;
    let mut dst = None;
    let mut comment = None;
    let mut target = None;
    let mut i = 0;
    while i < w.len() {
        let val = w.get(i + 1);
        match (w[i].as_str(), val.map(String::as_str)) {
            ("-s", Some(v)) => src = Some(v.to_owned()),
            ("-d", Some(v)) => dst = Some(v.to_owned()),
            ("-m", Some("comment")) => {}
            ("--comment", Some(v)) => comment = Some(v.to_owned()),
            ("-j", Some(v)) => target = Some(v.to_owned()),
            _ => return None,
        }
        i += 2;
    }
    let role = Role::from_comment(comment.as_deref()?)?;
    let want_target = match role {
        Role::Exempt => "RETURN",
        Role::Source | Role::Destination => "MASQUERADE",
    };
    if target.as_deref()? != want_target {
        return None;
    }
    let (matched, other) = match role {
        Role::Source => (src, dst),
        Role::Exempt | Role::Destination => (dst, src),
    };
    if other.is_some() {
        return None;
    }
    // iptables-save leaves out a match on the whole address space.
    let net: IpNetwork = match (matched, fam) {
        (Some(v), _) => v.parse().ok()?,
        (None, IpFamily::V4) => IpNetwork::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).ok()?,
        (None, IpFamily::V6) => IpNetwork::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).ok()?,
    };
    (IpFamily::of(&net) == fam).then_some((role, net))
}

/// Read wiremesh's chain from one family's `iptables-save -t nat` output.
///
/// [`TableState::Absent`] when neither the chain nor a jump to it exists. The chain must be
/// exactly what [`render_iptables_apply`] writes (exemptions first) and be entered by exactly one
/// jump, the commented one; anything else is [`TableState::Unexpected`].
pub fn parse_iptables_save(fam: IpFamily, save: &str) -> TableState {
    let s = saved_nat(save);
    if !s.chain && s.jumps.is_empty() {
        return TableState::Absent;
    }
    if !s.chain {
        return unexpected(format!("a jump to {IPT_CHAIN}, which does not exist"));
    }
    if s.jumps != [jump_spec()] {
        return unexpected(format!("POSTROUTING jumps {:?}", s.jumps));
    }
    let mut m = Masquerade::default();
    let mut last = Role::Exempt;
    for spec in &s.rules {
        let Some((role, net)) = parse_ipt_rule(spec, fam) else {
            return unexpected(format!("rule {spec:?}"));
        };
        // Sources and destinations may interleave; exemptions must all come first.
        if role == Role::Exempt && last != Role::Exempt {
            return unexpected(format!("exemption after a masquerade rule: {spec:?}"));
        }
        last = role;
        match role {
            Role::Exempt => m.exempt.push(net),
            Role::Source => m.sources.push(net),
            Role::Destination => m.destinations.push(net),
        }
    }
    TableState::Present(canonical(&m))
}

/// Whether `m`, canonicalised, holds any network of family `fam`.
fn has_family(m: &Masquerade, fam: IpFamily) -> bool {
    lists(m)
        .iter()
        .any(|(_, nets)| nets.iter().any(|n| IpFamily::of(n) == fam))
}

/// The `iptables-restore --noflush` input that makes one family's wiremesh chain hold `m`'s
/// networks of that family, given that family's current `iptables-save -t nat` output.
///
/// Declaring the chain flushes it (or creates it); jumps to it that are not exactly ours are
/// removed and ours is inserted first in `POSTROUTING` when missing. Other chains and rules are
/// never named. When `m` has no network of this family the chain is removed instead
/// ([`render_iptables_delete`]); `None` means nothing to do.
pub fn render_iptables_apply(fam: IpFamily, m: &Masquerade, save: &str) -> Option<String> {
    let c = canonical(m);
    if !has_family(&c, fam) {
        return render_iptables_delete(save);
    }
    let s = saved_nat(save);
    let mine = jump_spec();
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{IPT_CHAIN} - [0:0]");
    write_jumps(&mut out, "POSTROUTING", &s.jumps, &mine);
    for (role, nets) in [
        (Role::Exempt, &c.exempt),
        (Role::Source, &c.sources),
        (Role::Destination, &c.destinations),
    ] {
        let (flag, target) = match role {
            Role::Exempt => ("-d", "RETURN"),
            Role::Source => ("-s", "MASQUERADE"),
            Role::Destination => ("-d", "MASQUERADE"),
        };
        for n in nets.iter().filter(|n| IpFamily::of(n) == fam) {
            let _ = writeln!(
                out,
                "-A {IPT_CHAIN} {flag} {n} -m comment --comment \"{}\" -j {target}",
                role.comment()
            );
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The `iptables-restore --noflush` input that removes every jump to wiremesh's chain and the
/// chain itself, given the family's current `iptables-save -t nat` output; `None` when neither
/// exists.
pub fn render_iptables_delete(save: &str) -> Option<String> {
    let s = saved_nat(save);
    if !s.chain && s.jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for spec in &s.jumps {
        let _ = writeln!(out, "-D POSTROUTING {spec}");
    }
    if s.chain {
        let _ = writeln!(out, "-F {IPT_CHAIN}");
        let _ = writeln!(out, "-X {IPT_CHAIN}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Join the two families' states: absent only when both are, unexpected when either is.
fn join_families(v4: TableState, v6: TableState) -> TableState {
    match (v4, v6) {
        (TableState::Unexpected(w), _) | (_, TableState::Unexpected(w)) => {
            TableState::Unexpected(w)
        }
        (TableState::Absent, TableState::Absent) => TableState::Absent,
        (a, b) => {
            let mut m = Masquerade::default();
            for s in [a, b] {
                if let TableState::Present(p) = s {
                    m.sources.extend(p.sources);
                    m.destinations.extend(p.destinations);
                    m.exempt.extend(p.exempt);
                }
            }
            TableState::Present(canonical(&m))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The edge: running the tools

/// A finished command: whether it succeeded, and its output.
struct Output {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs firewall tools, in the current network namespace or in a named one.
#[derive(Debug, Clone)]
struct Exec {
    netns: Option<String>,
}

impl Exec {
    /// Run `program args` with `stdin`; `op` names the action in errors. Fails only when the
    /// program cannot be run or times out.
    async fn output(
        &self,
        op: &str,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, KernelError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => tokio::process::Command::new(program),
        };
        cmd.args(args)
            // Error texts are compared (e.g. "No such file or directory"): keep them untranslated.
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let io = |source| KernelError::Io {
            op: format!("{op}: run {program}"),
            source,
        };
        let mut child = cmd.spawn().map_err(io)?;
        let pipe = child.stdin.take();
        let write = async move {
            if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
                pipe.write_all(text.as_bytes()).await?;
                pipe.shutdown().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let run = async { tokio::join!(write, child.wait_with_output()) };
        let (written, out) = tokio::time::timeout(COMMAND_TIMEOUT, run)
            .await
            .map_err(|_| KernelError::Firewall {
                op: op.to_owned(),
                message: format!("{program} did not finish within {COMMAND_TIMEOUT:?}"),
            })?;
        let out = out.map_err(io)?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        // A broken pipe only means the program stopped reading; its status tells why.
        if let Err(e) = written
            && out.status.success()
        {
            return Err(io(e));
        }
        Ok(Output {
            success: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        })
    }

    /// Like [`Exec::output`], but a failing exit status is an error carrying stderr.
    async fn run(
        &self,
        op: &str,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, KernelError> {
        let out = self.output(op, program, args, stdin).await?;
        if out.success {
            Ok(out.stdout)
        } else {
            Err(KernelError::Firewall {
                op: op.to_owned(),
                message: format!("{program} failed ({}): {}", out.status, out.stderr),
            })
        }
    }
}

/// Whether `nft` is installed and can list the ruleset (in `netns`, if given): what
/// [`FirewallMode::Auto`] picks nftables on.
pub async fn nft_works(netns: Option<&str>) -> bool {
    let exec = Exec {
        netns: netns.map(str::to_owned),
    };
    exec.output("probe nftables", "nft", &["list", "tables"], None)
        .await
        .is_ok_and(|o| o.success)
}

/// wiremesh's masquerade rules in one network namespace: read, replace and delete them with
/// `nft` or `iptables-restore`. Equivalent to `nft -f` of [`render_nft`] (or the restore input of
/// [`render_iptables_apply`]), `nft -j list table inet wiremesh`, and a table deletion.
#[derive(Debug, Clone)]
pub struct Firewall {
    mode: FirewallMode,
    exec: Exec,
    /// The lists wiremesh's table held at the last successful read or write (nftables only):
    /// what [`Firewall::apply`] changes element by element. `None`: unknown, replace whole.
    /// Shared by clones, which stand for the same table.
    held: Arc<Mutex<Option<Masquerade>>>,
}

impl Firewall {
    /// A firewall in the current network namespace; [`FirewallMode::Auto`] is resolved now.
    pub async fn new(mode: FirewallMode) -> Firewall {
        Firewall::resolve(mode, None).await
    }

    /// A firewall in the named network namespace: every tool runs under `ip netns exec NAME`.
    pub async fn in_netns(mode: FirewallMode, netns: &str) -> Firewall {
        Firewall::resolve(mode, Some(netns)).await
    }

    async fn resolve(mode: FirewallMode, netns: Option<&str>) -> Firewall {
        let mode = match mode {
            FirewallMode::Auto if nft_works(netns).await => FirewallMode::Nftables,
            FirewallMode::Auto => FirewallMode::Iptables,
            m => m,
        };
        Firewall {
            mode,
            exec: Exec {
                netns: netns.map(str::to_owned),
            },
            held: Arc::default(),
        }
    }

    /// The mode in use: [`FirewallMode::Nftables`] or [`FirewallMode::Iptables`], never `Auto`.
    pub fn mode(&self) -> FirewallMode {
        self.mode
    }

    /// What the firewall holds where wiremesh's rules live, lists in canonical form.
    pub async fn read_state(&self) -> Result<TableState, KernelError> {
        match self.mode {
            FirewallMode::Iptables => {
                let v4 = self.save(IpFamily::V4).await?;
                let v6 = self.save(IpFamily::V6).await?;
                Ok(join_families(
                    parse_iptables_save(IpFamily::V4, &v4),
                    parse_iptables_save(IpFamily::V6, &v6),
                ))
            }
            FirewallMode::Nftables | FirewallMode::Auto => {
                let op = format!("list table {NFT_FAMILY} {NFT_TABLE}");
                let out = self
                    .exec
                    .output(
                        &op,
                        "nft",
                        &["-j", "list", "table", NFT_FAMILY, NFT_TABLE],
                        None,
                    )
                    .await?;
                if !out.success {
                    if out.stderr.contains("No such file or directory") {
                        return Ok(TableState::Absent);
                    }
                    return Err(KernelError::Firewall {
                        op,
                        message: format!("nft failed ({}): {}", out.status, out.stderr),
                    });
                }
                parse_nft_table(&out.stdout).map_err(|e| KernelError::Firewall {
                    op,
                    message: e.to_string(),
                })
            }
        }
    }

    /// The masquerade configuration the firewall holds (in canonical form), for
    /// [`OwnedState::masquerade`] (`None`: no table).
    ///
    /// [`OwnedState::masquerade`]: super::OwnedState::masquerade
    pub async fn read(&self) -> Result<Option<Masquerade>, KernelError> {
        let state = self.read_state().await;
        self.hold(match (&state, self.mode) {
            (Ok(TableState::Present(m)), FirewallMode::Nftables) => Some(m.clone()),
            _ => None,
        });
        Ok(state?.compared())
    }

    /// Remember what the table holds (`None`: unknown).
    fn hold(&self, m: Option<Masquerade>) {
        if let Ok(mut held) = self.held.lock() {
            *held = m;
        }
    }

    /// Replace wiremesh's rules with ones for `m`: one `nft` transaction, or one restore per
    /// family (a family without networks in `m` has its chain removed). With nftables, when the
    /// table's lists are known from the last read or write and the change only adds elements,
    /// they are added ([`render_nft_additions`]); if that fails (the table was changed behind
    /// wiremesh's back) the table is replaced whole.
    pub async fn apply(&mut self, m: &Masquerade) -> Result<(), KernelError> {
        match self.mode {
            FirewallMode::Iptables => {
                for fam in [IpFamily::V4, IpFamily::V6] {
                    let save = self.save(fam).await?;
                    if let Some(input) = render_iptables_apply(fam, m, &save) {
                        self.restore(fam, &input, "replace").await?;
                    }
                }
            }
            FirewallMode::Nftables | FirewallMode::Auto => {
                let held = self.held.lock().ok().and_then(|mut h| h.take());
                // Nothing to add to what was written or read last, yet asked to apply: a deletion
                // (cheaper whole), or the caller knows better (the table changed since).
                if let Some(script) = held.and_then(|h| render_nft_additions(&h, m)) {
                    let op = format!("add to the sets of table {NFT_FAMILY} {NFT_TABLE}");
                    match self.exec.run(&op, "nft", &["-f", "-"], Some(&script)).await {
                        Ok(_) => {
                            self.hold(Some(canonical(m)));
                            return Ok(());
                        }
                        // The table was changed behind our back: replacing it repairs it.
                        Err(e) => debug!(error = %e, "replacing the table instead"),
                    }
                }
                let op = format!("replace table {NFT_FAMILY} {NFT_TABLE}");
                self.exec
                    .run(&op, "nft", &["-f", "-"], Some(&render_nft(m)))
                    .await?;
                self.hold(Some(canonical(m)));
            }
        }
        Ok(())
    }

    /// What the firewall holds where wiremesh's MSS clamp lives ([`mss`]).
    pub async fn read_clamp_state(&self) -> Result<ClampState, KernelError> {
        match self.mode {
            FirewallMode::Iptables => {
                let v4 = self
                    .save_table(IpFamily::V4, mss::IPT_TABLE, mss::IPT_CHAIN)
                    .await?;
                let v6 = self
                    .save_table(IpFamily::V6, mss::IPT_TABLE, mss::IPT_CHAIN)
                    .await?;
                Ok(mss::join_families(
                    mss::parse_iptables(&v4),
                    mss::parse_iptables(&v6),
                ))
            }
            FirewallMode::Nftables | FirewallMode::Auto => {
                let op = format!("list table {NFT_FAMILY} {}", mss::NFT_TABLE);
                let out = self
                    .exec
                    .output(
                        &op,
                        "nft",
                        &["-j", "list", "table", NFT_FAMILY, mss::NFT_TABLE],
                        None,
                    )
                    .await?;
                if !out.success {
                    if out.stderr.contains("No such file or directory") {
                        return Ok(ClampState::Absent);
                    }
                    return Err(KernelError::Firewall {
                        op,
                        message: format!("nft failed ({}): {}", out.status, out.stderr),
                    });
                }
                mss::parse_nft(&out.stdout).map_err(|e| KernelError::Firewall {
                    op,
                    message: e.to_string(),
                })
            }
        }
    }

    /// The interface wiremesh's MSS clamp names, for [`OwnedState::mss_clamp`] (`None`: no
    /// clamp; see [`Found::compared`]).
    ///
    /// [`OwnedState::mss_clamp`]: super::OwnedState::mss_clamp
    pub async fn read_clamp(&self) -> Result<Option<String>, KernelError> {
        Ok(self.read_clamp_state().await?.compared())
    }

    /// Replace wiremesh's MSS clamp with one for `interface`: one `nft` transaction, or one
    /// restore per family. Refuses an interface name that is not plain ([`mss::plain_name`]).
    pub async fn apply_clamp(&self, interface: &str) -> Result<(), KernelError> {
        if !mss::plain_name(interface) {
            return Err(KernelError::Unsupported(format!(
                "interface name {interface:?}: only letters, digits, '-', '_' and '.' go into \
                 the MSS clamp rules"
            )));
        }
        match self.mode {
            FirewallMode::Iptables => {
                for fam in IpFamily::BOTH {
                    let save = self.save_table(fam, mss::IPT_TABLE, mss::IPT_CHAIN).await?;
                    let input = mss::render_iptables_apply(interface, &save);
                    self.restore_chain(fam, &input, "replace", mss::IPT_CHAIN)
                        .await?;
                }
            }
            FirewallMode::Nftables | FirewallMode::Auto => {
                let op = format!("replace table {NFT_FAMILY} {}", mss::NFT_TABLE);
                self.exec
                    .run(&op, "nft", &["-f", "-"], Some(&mss::render_nft(interface)))
                    .await?;
            }
        }
        Ok(())
    }

    /// Remove wiremesh's MSS clamp table (or chains and jumps); nothing else. Succeeds when
    /// absent.
    pub async fn delete_clamp(&self) -> Result<(), KernelError> {
        match self.mode {
            FirewallMode::Iptables => {
                for fam in IpFamily::BOTH {
                    let save = self.save_table(fam, mss::IPT_TABLE, mss::IPT_CHAIN).await?;
                    if let Some(input) = mss::render_iptables_delete(&save) {
                        self.restore_chain(fam, &input, "delete", mss::IPT_CHAIN)
                            .await?;
                    }
                }
            }
            FirewallMode::Nftables | FirewallMode::Auto => {
                let op = format!("delete table {NFT_FAMILY} {}", mss::NFT_TABLE);
                self.exec
                    .run(&op, "nft", &["-f", "-"], Some(&mss::render_nft_delete()))
                    .await?;
            }
        }
        Ok(())
    }

    /// Remove wiremesh's table (or chains and jumps); nothing else. Succeeds when absent.
    pub async fn delete(&mut self) -> Result<(), KernelError> {
        self.hold(None);
        match self.mode {
            FirewallMode::Iptables => {
                for fam in [IpFamily::V4, IpFamily::V6] {
                    let save = self.save(fam).await?;
                    if let Some(input) = render_iptables_delete(&save) {
                        self.restore(fam, &input, "delete").await?;
                    }
                }
            }
            FirewallMode::Nftables | FirewallMode::Auto => {
                let op = format!("delete table {NFT_FAMILY} {NFT_TABLE}");
                self.exec
                    .run(&op, "nft", &["-f", "-"], Some(&render_nft_delete()))
                    .await?;
            }
        }
        Ok(())
    }

    async fn save(&self, fam: IpFamily) -> Result<String, KernelError> {
        self.save_table(fam, "nat", IPT_CHAIN).await
    }

    /// One family's `iptables-save -t TABLE`; `chain` names what is read, for errors.
    async fn save_table(
        &self,
        fam: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<String, KernelError> {
        let op = format!("read chain {chain}");
        self.exec.run(&op, fam.save(), &["-t", table], None).await
    }

    async fn restore(&self, fam: IpFamily, input: &str, what: &str) -> Result<(), KernelError> {
        self.restore_chain(fam, input, what, IPT_CHAIN).await
    }

    /// Run one family's `iptables-restore --noflush` with `input`, which `what`s `chain`.
    async fn restore_chain(
        &self,
        fam: IpFamily,
        input: &str,
        what: &str,
        chain: &str,
    ) -> Result<(), KernelError> {
        let op = format!("{what} chain {chain}");
        // -w: wait for the xtables lock instead of failing (iptables-legacy takes it).
        self.exec
            .run(&op, fam.restore(), &["-w", "--noflush"], Some(input))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|x| net(x)).collect()
    }

    fn sample() -> Masquerade {
        Masquerade {
            sources: nets(&["10.42.1.0/24", "fd42:1::/64", "10.5.0.1/32"]),
            destinations: nets(&["192.168.7.0/24"]),
            exempt: nets(&["10.42.0.0/16", "10.4.0.0/16", "fd42::/48", "10.43.0.0/16"]),
        }
    }

    #[test]
    fn canonical_merges_overlaps_and_adjacent_blocks_and_sorts_v4_first() {
        let got = canonical_nets(&nets(&[
            "fd00::1/64",
            "10.1.1.0/25",
            "10.1.1.128/25",
            "10.0.0.0/8",
            "10.200.0.0/16",
            "10.0.0.7/32",
            "192.168.1.5/24",
        ]));
        assert_eq!(got, nets(&["10.0.0.0/8", "192.168.1.0/24", "fd00::/64"]));
    }

    #[test]
    fn canonical_splits_unaligned_unions_into_minimal_blocks() {
        let got = canonical_nets(&nets(&["10.0.0.0/24", "10.0.1.0/25"]));
        assert_eq!(got, nets(&["10.0.0.0/24", "10.0.1.0/25"]));
        let got = canonical_nets(&nets(&["10.0.1.0/24", "10.0.2.0/24"]));
        assert_eq!(got, nets(&["10.0.1.0/24", "10.0.2.0/24"]));
        let got = canonical_nets(&nets(&["10.0.2.0/24", "10.0.3.0/24"]));
        assert_eq!(got, nets(&["10.0.2.0/23"]));
    }

    #[test]
    fn canonical_handles_the_whole_address_space() {
        let got = canonical_nets(&nets(&["::/0", "0.0.0.0/0", "10.0.0.0/8", "fd00::/8"]));
        assert_eq!(got, nets(&["0.0.0.0/0", "::/0"]));
        let got = canonical_nets(&nets(&["255.255.255.255/32", "255.255.255.254/32"]));
        assert_eq!(got, nets(&["255.255.255.254/31"]));
    }

    #[test]
    fn nft_script_replaces_only_our_table() {
        let script = render_nft(&sample());
        let expected = "\
add table inet wiremesh
delete table inet wiremesh
table inet wiremesh {
\tset exempt4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = {
\t\t\t10.4.0.0/16,
\t\t\t10.42.0.0/15
\t\t}
\t}
\tset exempt6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = {
\t\t\tfd42::/48
\t\t}
\t}
\tset sources4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = {
\t\t\t10.5.0.1/32,
\t\t\t10.42.1.0/24
\t\t}
\t}
\tset sources6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = {
\t\t\tfd42:1::/64
\t\t}
\t}
\tset destinations4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = {
\t\t\t192.168.7.0/24
\t\t}
\t}
\tset destinations6 {
\t\ttype ipv6_addr
\t\tflags interval
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip daddr @exempt4 counter return
\t\tip6 daddr @exempt6 counter return
\t\tip saddr @sources4 counter masquerade
\t\tip6 saddr @sources6 counter masquerade
\t\tip daddr @destinations4 counter masquerade
\t\tip6 daddr @destinations6 counter masquerade
\t}
}
";
        assert_eq!(script, expected);
        assert!(!script.contains("flush"));
        for line in script
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_alphabetic()))
        {
            assert!(line.contains("inet wiremesh"), "{line}");
        }
    }

    #[test]
    fn nft_additions_name_only_added_elements_and_give_way_to_a_replacement_for_any_deletion() {
        let from = sample();
        assert_eq!(render_nft_additions(&from, &from), None, "nothing to add");
        let mut to = from.clone();
        to.exempt.push(net("10.99.0.0/24"));
        to.sources.push(net("fd00:99::/64"));
        let script = render_nft_additions(&from, &to).expect("additions");
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(
            lines,
            [
                "add element inet wiremesh exempt4 { 10.99.0.0/24 }",
                "add element inet wiremesh sources6 { fd00:99::/64 }",
            ]
        );
        let mut less = to.clone();
        less.exempt.retain(|n| *n != net("10.4.0.0/16"));
        less.exempt.push(net("10.98.0.0/24"));
        assert_eq!(render_nft_additions(&to, &less), None, "a deletion");
        // Adjacent blocks merge in canonical form: the old block goes, so the table is replaced.
        let mut merged = to.clone();
        merged.exempt.push(net("10.99.1.0/24"));
        assert_eq!(render_nft_additions(&to, &merged), None);
    }

    #[test]
    fn nft_delete_script_works_whether_or_not_the_table_exists() {
        assert_eq!(
            render_nft_delete(),
            "add table inet wiremesh\ndelete table inet wiremesh\n"
        );
    }

    /// `nft -j list table inet wiremesh` as nft 1.0.6 prints it after `render_nft(&sample())`,
    /// with one element spelled as a range and counters that moved.
    fn listing(rules: &str) -> String {
        let set = |name: &str, ty: &str, elem: &str| {
            format!(
                r#"{{"set": {{"family": "inet", "name": "{name}", "table": "wiremesh", "type": "{ty}", "handle": 2, "flags": ["interval"]{elem}}}}}"#
            )
        };
        let sets = [
            set(
                "exempt4",
                "ipv4_addr",
                r#", "elem": [{"prefix": {"addr": "10.4.0.0", "len": 16}}, {"range": ["10.42.0.0", "10.43.255.255"]}]"#,
            ),
            set(
                "exempt6",
                "ipv6_addr",
                r#", "elem": [{"prefix": {"addr": "fd42::", "len": 48}}]"#,
            ),
            set(
                "sources4",
                "ipv4_addr",
                r#", "elem": ["10.5.0.1", {"prefix": {"addr": "10.42.1.0", "len": 24}}]"#,
            ),
            set(
                "sources6",
                "ipv6_addr",
                r#", "elem": [{"elem": {"val": {"prefix": {"addr": "fd42:1::", "len": 64}}, "comment": "x"}}]"#,
            ),
            set(
                "destinations4",
                "ipv4_addr",
                r#", "elem": [{"prefix": {"addr": "192.168.7.0", "len": 24}}]"#,
            ),
            set("destinations6", "ipv6_addr", ""),
        ];
        format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6", "json_schema_version": 1}}}},
{{"table": {{"family": "inet", "name": "wiremesh", "handle": 3}}}},
{},
{{"chain": {{"family": "inet", "table": "wiremesh", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}},
{rules}]}}"#,
            sets.join(",\n")
        )
    }

    fn rule_json(proto: &str, field: &str, set: &str, verdict: &str) -> String {
        format!(
            r#"{{"rule": {{"family": "inet", "table": "wiremesh", "chain": "postrouting", "handle": 9, "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "{proto}", "field": "{field}"}}}}, "right": "@{set}"}}}}, {{"counter": {{"packets": 3, "bytes": 252}}}}, {{"{verdict}": null}}]}}}}"#
        )
    }

    fn our_rules() -> Vec<String> {
        NFT_RULES
            .iter()
            .map(|r| rule_json(r.proto, r.field, r.set, r.verdict))
            .collect()
    }

    #[test]
    fn nft_listing_reads_back_as_the_canonical_lists() {
        let json = listing(&our_rules().join(",\n"));
        assert_eq!(
            parse_nft_table(&json).unwrap(),
            TableState::Present(canonical(&sample()))
        );
    }

    #[test]
    fn nft_listing_with_a_changed_chain_is_unexpected() {
        let mut rules = our_rules();
        rules.swap(0, 2);
        let json = listing(&rules.join(",\n"));
        assert!(matches!(
            parse_nft_table(&json).unwrap(),
            TableState::Unexpected(_)
        ));
        let mut rules = our_rules();
        rules.push(rule_json("ip", "saddr", "sources4", "accept"));
        let json = listing(&rules.join(",\n"));
        let state = parse_nft_table(&json).unwrap();
        assert!(matches!(state, TableState::Unexpected(_)), "{state:?}");
        assert_eq!(state.compared(), Some(Masquerade::default()));
    }

    #[test]
    fn nft_listing_without_our_table_is_absent_and_garbage_is_an_error() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}]}"#;
        assert_eq!(parse_nft_table(json).unwrap(), TableState::Absent);
        assert!(parse_nft_table("Error: nope").is_err());
    }

    #[test]
    fn iptables_input_declares_our_chain_inserts_one_jump_and_orders_exemptions_first() {
        let save = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE\nCOMMIT\n";
        let v4 = render_iptables_apply(IpFamily::V4, &sample(), save).unwrap();
        assert_eq!(
            v4,
            "\
*nat
:WIREMESH-NAT - [0:0]
-I POSTROUTING 1 -m comment --comment \"wiremesh: masquerade\" -j WIREMESH-NAT
-A WIREMESH-NAT -d 10.4.0.0/16 -m comment --comment \"wiremesh: exempt\" -j RETURN
-A WIREMESH-NAT -d 10.42.0.0/15 -m comment --comment \"wiremesh: exempt\" -j RETURN
-A WIREMESH-NAT -s 10.5.0.1/32 -m comment --comment \"wiremesh: source\" -j MASQUERADE
-A WIREMESH-NAT -s 10.42.1.0/24 -m comment --comment \"wiremesh: source\" -j MASQUERADE
-A WIREMESH-NAT -d 192.168.7.0/24 -m comment --comment \"wiremesh: destination\" -j MASQUERADE
COMMIT
"
        );
        let v6 = render_iptables_apply(IpFamily::V6, &sample(), "").unwrap();
        assert!(v6.contains("-A WIREMESH-NAT -s fd42:1::/64 -m comment"));
        assert!(!v6.contains("10."));
    }

    #[test]
    fn iptables_reapply_keeps_our_jump_and_removes_stray_ones() {
        let save = "\
*nat
:POSTROUTING ACCEPT [0:0]
:WIREMESH-NAT - [0:0]
-A POSTROUTING -m comment --comment \"wiremesh: masquerade\" -j WIREMESH-NAT
-A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE
-A POSTROUTING -d 10.1.0.0/16 -j WIREMESH-NAT
-A WIREMESH-NAT -s 10.42.1.0/24 -m comment --comment \"wiremesh: source\" -j MASQUERADE
COMMIT
";
        let input = render_iptables_apply(IpFamily::V4, &sample(), save).unwrap();
        assert!(!input.contains("-I POSTROUTING"));
        assert!(input.contains("-D POSTROUTING -d 10.1.0.0/16 -j WIREMESH-NAT\n"));
        assert!(!input.contains("10.9.0.0"));
        assert!(matches!(
            parse_iptables_save(IpFamily::V4, save),
            TableState::Unexpected(_)
        ));
    }

    #[test]
    fn iptables_save_reads_back_as_the_canonical_lists_of_its_family() {
        let m = sample();
        let v4 = render_iptables_apply(IpFamily::V4, &m, "").unwrap();
        // What iptables-save prints after that restore: `-I` became `-A`, plus builtin chains.
        let save = v4
            .replace("-I POSTROUTING 1 ", "-A POSTROUTING ")
            .replace("*nat\n", "# Generated\n*nat\n:POSTROUTING ACCEPT [0:0]\n");
        let got = parse_iptables_save(IpFamily::V4, &save);
        let mut want = canonical(&m);
        for l in [&mut want.sources, &mut want.destinations, &mut want.exempt] {
            l.retain(|n| n.is_ipv4());
        }
        assert_eq!(got, TableState::Present(want));
    }

    #[test]
    fn iptables_save_without_address_match_means_the_whole_family() {
        let save = format!(
            "*nat\n:{IPT_CHAIN} - [0:0]\n-A POSTROUTING {}\n-A {IPT_CHAIN} -m comment --comment \"wiremesh: exempt\" -j RETURN\n-A {IPT_CHAIN} -s fd00::/64 -m comment --comment \"wiremesh: source\" -j MASQUERADE\nCOMMIT\n",
            jump_spec()
        );
        assert_eq!(
            parse_iptables_save(IpFamily::V6, &save),
            TableState::Present(Masquerade {
                sources: nets(&["fd00::/64"]),
                destinations: vec![],
                exempt: nets(&["::/0"]),
            })
        );
    }

    #[test]
    fn iptables_delete_names_only_our_chain_and_jumps() {
        let save = format!(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:{IPT_CHAIN} - [0:0]\n-A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE\n-A POSTROUTING {}\nCOMMIT\n",
            jump_spec()
        );
        assert_eq!(
            render_iptables_delete(&save).unwrap(),
            format!(
                "*nat\n-D POSTROUTING {}\n-F {IPT_CHAIN}\n-X {IPT_CHAIN}\nCOMMIT\n",
                jump_spec()
            )
        );
        assert_eq!(render_iptables_delete("*nat\nCOMMIT\n"), None);
        // A family without networks is deleted rather than written.
        let only_v4 = Masquerade {
            sources: nets(&["10.0.0.0/8"]),
            ..Masquerade::default()
        };
        assert_eq!(render_iptables_apply(IpFamily::V6, &only_v4, ""), None);
    }

    #[test]
    fn iptables_words_keep_quoted_comments_together() {
        assert_eq!(
            split_words(r#"-m comment --comment "a \"b\" c" -j X"#),
            ["-m", "comment", "--comment", "a \"b\" c", "-j", "X"]
        );
    }

    #[test]
    fn firewall_modes_parse_and_print() {
        for m in [
            FirewallMode::Auto,
            FirewallMode::Nftables,
            FirewallMode::Iptables,
        ] {
            assert_eq!(m.to_string().parse::<FirewallMode>(), Ok(m));
        }
        assert_eq!("nft".parse(), Ok(FirewallMode::Nftables));
        assert!("ipset".parse::<FirewallMode>().is_err());
    }
}
