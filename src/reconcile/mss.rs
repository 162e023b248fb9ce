//! TCP MSS clamping on the WireGuard interface, in wiremesh's own firewall table or chain:
//! render it, read it back as the interface it names so the planner can compare, delete it.
//!
//! ```text
//! interface ─ render_nft()              ─→ nft -f -                       (one transaction)
//!           └ render_iptables_apply()   ─→ ip{,6}tables-restore --noflush (mangle table)
//! nft -j list table inet wiremesh_mss ─ parse_nft() ─────→ ClampState ─→ Option<String>
//! ip{,6}tables-save -t mangle         ─ parse_iptables() ┘
//! ```
//!
//! Why: the automatic MTU fits the underlay wiremesh sees, but a path further on may be smaller
//! (PPPoE, a tunnel inside a tunnel) and drop ICMP "packet too big", so path MTU discovery never
//! learns it and TCP stalls on its first full-size segment. Rewriting the MSS of every SYN that
//! crosses the tunnel to the route's MTU (`rt mtu`: the outgoing route's MTU minus the IP and
//! TCP headers, per family) keeps TCP segments within the tunnel whatever the endpoints think.
//! Both directions are clamped: SYNs leaving through the tunnel, and SYNs arriving from it for
//! local pods.
//!
//! **nftables**: its own `table inet wiremesh_mss`, one `forward` chain at the mangle priority,
//! policy accept, so it only ever rewrites the option and never drops. Its own table rather than
//! a chain in `table inet wiremesh`, because that one is replaced whole and deleted whenever
//! nothing is masqueraded, while the clamp stays as long as the interface does.
//! **iptables**: a chain `WIREMESH-MSS` in the `mangle` table of each family, entered by one
//! commented jump from `FORWARD`, with `TCPMSS --clamp-mss-to-pmtu` (the same rewrite).
//!
//! Renderers and parsers are pure; [`super::nft::Firewall`] runs them. Depends on `nft`'s shared
//! helpers and `serde_json` only.

use std::fmt::Write as _;

use serde_json::Value;

use super::nft::{ParseError, SavedChain, saved_chain, split_words, write_jumps};

/// Name of wiremesh's nftables table for the clamp (`table inet wiremesh_mss`).
pub const NFT_TABLE: &str = "wiremesh_mss";
/// Its base chain.
pub const NFT_CHAIN: &str = "forward";
/// nftables' `mangle` priority, where packets are rewritten (iptables' `mangle` table).
const MANGLE_PRIORITY: i64 = -150;
/// Name of wiremesh's chain in the iptables `mangle` table.
pub const IPT_CHAIN: &str = "WIREMESH-MSS";
/// The iptables table it lives in.
pub const IPT_TABLE: &str = "mangle";
/// The built-in chain that jumps to it.
pub const IPT_PARENT: &str = "FORWARD";
/// Comment on the `FORWARD` rule that jumps to [`IPT_CHAIN`].
pub const IPT_JUMP_COMMENT: &str = "wiremesh: mss clamp";
/// Comment on the rules of [`IPT_CHAIN`].
const IPT_RULE_COMMENT: &str = "wiremesh: mss";

/// What the firewall holds where wiremesh's clamp lives: present with the interface it clamps.
pub type ClampState = super::nft::Found<String>;

/// Whether `name` can be written into a rule as it is: an interface name of letters, digits,
/// `-`, `_` and `.`, 1 to 15 bytes (a quote or a space would change the rule).
pub fn plain_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The directions clamped, as nftables' interface keys, in rule order.
const NFT_KEYS: [&str; 2] = ["oifname", "iifname"];

/// The `nft -f -` script that replaces wiremesh's clamp table with one for `interface`, in one
/// transaction. `add table` then `delete table` makes the delete succeed whether or not the
/// table existed; nothing outside `table inet wiremesh_mss` is named.
pub fn render_nft(interface: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {NFT_TABLE}");
    let _ = writeln!(s, "delete table inet {NFT_TABLE}");
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    let _ = writeln!(s, "\tchain {NFT_CHAIN} {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook forward priority mangle; policy accept;"
    );
    for key in NFT_KEYS {
        let _ = writeln!(
            s,
            "\t\t{key} \"{interface}\" tcp flags syn / syn,rst counter tcp option maxseg size set rt mtu"
        );
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

/// The `nft -f -` script that removes wiremesh's clamp table whether or not it exists.
pub fn render_nft_delete() -> String {
    format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}

/// The direction key and interface of one `nft -j` rule, if it has exactly the shape
/// [`render_nft`] writes: `KEY == "IF"`, `tcp flags & (syn|rst) == syn`, a counter, and
/// `tcp option maxseg size set rt mtu`.
fn parse_rule(rule: &Value) -> Option<(String, String)> {
    let expr = rule.get("expr")?.as_array()?;
    let [iface, flags, counter, mangle] = &expr[..] else {
        return None;
    };
    let m = iface.get("match")?;
    let key = m.get("left")?.get("meta")?.get("key")?.as_str()?;
    let name = m.get("right")?.as_str()?;
    if m.get("op")?.as_str()? != "==" || !NFT_KEYS.contains(&key) {
        return None;
    }
    let f = flags.get("match")?;
    let and = f.get("left")?.get("&")?.as_array()?;
    let [payload, mask] = &and[..] else {
        return None;
    };
    let payload = payload.get("payload")?;
    let mut mask: Vec<&str> = mask
        .as_array()?
        .iter()
        .map(Value::as_str)
        .collect::<Option<_>>()?;
    mask.sort_unstable();
    let flags_ok = f.get("op")?.as_str()? == "=="
        && payload.get("protocol")?.as_str()? == "tcp"
        && payload.get("field")?.as_str()? == "flags"
        && mask == ["rst", "syn"]
        && f.get("right")?.as_str()? == "syn";
    counter.get("counter")?;
    let mg = mangle.get("mangle")?;
    let opt = mg.get("key")?.get("tcp option")?;
    let mangle_ok = opt.get("name")?.as_str()? == "maxseg"
        && opt.get("field")?.as_str()? == "size"
        && mg.get("value")?.get("rt")?.get("key")?.as_str()? == "mtu";
    (flags_ok && mangle_ok).then(|| (key.to_owned(), name.to_owned()))
}

/// Read the output of `nft -j list table inet wiremesh_mss`: the table must be exactly what
/// [`render_nft`] writes (one chain with the same hook, priority and policy, the two rules in
/// order, for one interface); anything else is [`ClampState::Unexpected`]. Counters and
/// handles are ignored.
pub fn parse_nft(json: &str) -> Result<ClampState, ParseError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| ParseError(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| ParseError("no \"nftables\" array".into()))?;
    let ours = |o: &Value| {
        o.get("family").and_then(Value::as_str) == Some("inet")
            && o.get("table").and_then(Value::as_str) == Some(NFT_TABLE)
    };
    let mut found = false;
    let mut chains = 0;
    let mut rules = Vec::new();
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "table" => {
                found |= body.get("family").and_then(Value::as_str) == Some("inet")
                    && body.get("name").and_then(Value::as_str) == Some(NFT_TABLE);
            }
            "chain" if ours(body) => {
                chains += 1;
                let ok = body.get("name").and_then(Value::as_str) == Some(NFT_CHAIN)
                    && body.get("type").and_then(Value::as_str) == Some("filter")
                    && body.get("hook").and_then(Value::as_str) == Some("forward")
                    && body.get("prio").and_then(Value::as_i64) == Some(MANGLE_PRIORITY)
                    && body.get("policy").and_then(Value::as_str) == Some("accept");
                if !ok {
                    return Ok(ClampState::Unexpected(format!("chain {body}")));
                }
            }
            "rule" if ours(body) => match parse_rule(body) {
                Some(r) => rules.push(r),
                None => return Ok(ClampState::Unexpected(format!("rule {body}"))),
            },
            _ if ours(body) => return Ok(ClampState::Unexpected(format!("{kind} {body}"))),
            _ => {}
        }
    }
    if !found {
        return Ok(ClampState::Absent);
    }
    match &rules[..] {
        [(k1, i1), (k2, i2)] if chains == 1 && [k1, k2] == NFT_KEYS && i1 == i2 => {
            Ok(ClampState::Present(i1.clone()))
        }
        _ => Ok(ClampState::Unexpected(format!(
            "{chains} chain(s), rules {rules:?}"
        ))),
    }
}

/// The `-j` rule spec of the jump from `FORWARD`, as `iptables-save` prints it.
fn jump_spec() -> String {
    format!("-m comment --comment \"{IPT_JUMP_COMMENT}\" -j {IPT_CHAIN}")
}

/// The rule specs of [`IPT_CHAIN`] for `interface`, as `iptables-save` prints them.
fn rule_specs(interface: &str) -> [String; 2] {
    ["-o", "-i"].map(|dir| {
        format!(
            "{dir} {interface} -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment \
             \"{IPT_RULE_COMMENT}\" -j TCPMSS --clamp-mss-to-pmtu"
        )
    })
}

fn saved(save: &str) -> SavedChain {
    saved_chain(save, IPT_TABLE, IPT_PARENT, IPT_CHAIN)
}

/// Read wiremesh's clamp chain from one family's `iptables-save -t mangle` output:
/// [`ClampState::Absent`] when neither the chain nor a jump to it exists; the chain must be
/// exactly what [`render_iptables_apply`] writes, entered by exactly one jump, the commented
/// one; anything else is [`ClampState::Unexpected`].
pub fn parse_iptables(save: &str) -> ClampState {
    let s = saved(save);
    if !s.chain && s.jumps.is_empty() {
        return ClampState::Absent;
    }
    if !s.chain || s.jumps != [jump_spec()] {
        return ClampState::Unexpected(format!("{IPT_PARENT} jumps {:?}", s.jumps));
    }
    let words = |spec: &str| split_words(spec);
    let interface = s
        .rules
        .first()
        .map(|r| words(r))
        .and_then(|w| match &w[..] {
            [o, name, ..] if o == "-o" => Some(name.clone()),
            _ => None,
        });
    match interface {
        Some(i)
            if s.rules
                .iter()
                .map(|r| words(r))
                .eq(rule_specs(&i).map(|r| words(&r))) =>
        {
            ClampState::Present(i)
        }
        _ => ClampState::Unexpected(format!("rules {:?}", s.rules)),
    }
}

/// Join the two families' states: absent only when both are, present only when both are for
/// the same interface, unexpected otherwise (one family missing its chain is repaired by
/// writing both again).
pub fn join_families(v4: ClampState, v6: ClampState) -> ClampState {
    match (v4, v6) {
        (ClampState::Absent, ClampState::Absent) => ClampState::Absent,
        (ClampState::Present(a), ClampState::Present(b)) if a == b => ClampState::Present(a),
        (ClampState::Unexpected(w), _) | (_, ClampState::Unexpected(w)) => {
            ClampState::Unexpected(w)
        }
        (a, b) => ClampState::Unexpected(format!("IPv4 {a:?}, IPv6 {b:?}")),
    }
}

/// The `ip{,6}tables-restore --noflush` input that makes one family's clamp chain hold the
/// rules for `interface`, given that family's `iptables-save -t mangle` output. Declaring the
/// chain flushes (or creates) it; jumps to it that are not exactly ours are removed and ours
/// is inserted first in `FORWARD` when missing. No other chain or rule is named.
pub fn render_iptables_apply(interface: &str, save: &str) -> String {
    let s = saved(save);
    let mine = jump_spec();
    let mut out = format!("*{IPT_TABLE}\n:{IPT_CHAIN} - [0:0]\n");
    write_jumps(&mut out, IPT_PARENT, &s.jumps, &mine);
    for spec in rule_specs(interface) {
        let _ = writeln!(out, "-A {IPT_CHAIN} {spec}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The `ip{,6}tables-restore --noflush` input that removes every jump to the clamp chain and
/// the chain itself, given the family's `iptables-save -t mangle` output; `None` when neither
/// exists.
pub fn render_iptables_delete(save: &str) -> Option<String> {
    let s = saved(save);
    if !s.chain && s.jumps.is_empty() {
        return None;
    }
    let mut out = format!("*{IPT_TABLE}\n");
    for spec in &s.jumps {
        let _ = writeln!(out, "-D {IPT_PARENT} {spec}");
    }
    if s.chain {
        let _ = writeln!(out, "-F {IPT_CHAIN}\n-X {IPT_CHAIN}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -j list table inet wiremesh_mss` as nft 1.0.6 prints what [`render_nft`] writes
    /// (captured in a network namespace), with `rules` in place of its two rules.
    fn listing(rules: &[String]) -> String {
        format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6", "json_schema_version": 1}}}},
{{"table": {{"family": "inet", "name": "wiremesh_mss", "handle": 1}}}},
{{"chain": {{"family": "inet", "table": "wiremesh_mss", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": -150, "policy": "accept"}}}}{}]}}"#,
            rules.iter().map(|r| format!(",\n{r}")).collect::<String>()
        )
    }

    fn rule(key: &str, iface: &str, flag: &str) -> String {
        format!(
            r#"{{"rule": {{"family": "inet", "table": "wiremesh_mss", "chain": "forward", "handle": 2, "expr": [{{"match": {{"op": "==", "left": {{"meta": {{"key": "{key}"}}}}, "right": "{iface}"}}}}, {{"match": {{"op": "==", "left": {{"&": [{{"payload": {{"protocol": "tcp", "field": "flags"}}}}, ["syn", "rst"]]}}, "right": "{flag}"}}}}, {{"counter": {{"packets": 4, "bytes": 240}}}}, {{"mangle": {{"key": {{"tcp option": {{"name": "maxseg", "field": "size"}}}}, "value": {{"rt": {{"key": "mtu"}}}}}}}}]}}}}"#
        )
    }

    fn ours(iface: &str) -> Vec<String> {
        vec![rule("oifname", iface, "syn"), rule("iifname", iface, "syn")]
    }

    #[test]
    fn nft_script_clamps_both_directions_and_names_only_our_table() {
        let s = render_nft("wiremesh0");
        assert_eq!(
            s,
            "add table inet wiremesh_mss\n\
             delete table inet wiremesh_mss\n\
             table inet wiremesh_mss {\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority mangle; policy accept;\n\
             \t\toifname \"wiremesh0\" tcp flags syn / syn,rst counter tcp option maxseg size set rt mtu\n\
             \t\tiifname \"wiremesh0\" tcp flags syn / syn,rst counter tcp option maxseg size set rt mtu\n\
             \t}\n\
             }\n"
        );
        for line in s.lines().chain(render_nft_delete().lines()) {
            if line.contains("table") {
                assert!(line.contains("inet wiremesh_mss"), "{line}");
            }
        }
    }

    #[test]
    fn nft_listing_of_our_rules_reads_back_as_the_interface() {
        assert_eq!(
            parse_nft(&listing(&ours("wiremesh0"))).unwrap(),
            ClampState::Present("wiremesh0".into())
        );
        let absent = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}]}"#;
        assert_eq!(parse_nft(absent).unwrap(), ClampState::Absent);
        assert!(parse_nft("not json").is_err());
    }

    #[test]
    fn nft_listing_changed_by_hand_is_unexpected_and_differs_from_any_interface() {
        let cases = [
            vec![],
            vec![rule("oifname", "wiremesh0", "syn")],
            vec![
                rule("iifname", "wiremesh0", "syn"),
                rule("oifname", "wiremesh0", "syn"),
            ],
            vec![
                rule("oifname", "wiremesh0", "syn"),
                rule("iifname", "wg0", "syn"),
            ],
            vec![
                rule("oifname", "wiremesh0", "fin"),
                rule("iifname", "wiremesh0", "syn"),
            ],
            [ours("wiremesh0"), vec![rule("oifname", "wiremesh0", "syn")]].concat(),
        ];
        for rules in cases {
            let state = parse_nft(&listing(&rules)).unwrap();
            assert!(matches!(state, ClampState::Unexpected(_)), "{rules:?}");
            assert_eq!(state.compared(), Some(String::new()));
        }
        let other_chain = listing(&ours("wiremesh0")).replace("\"prio\": -150", "\"prio\": 0");
        assert!(matches!(
            parse_nft(&other_chain).unwrap(),
            ClampState::Unexpected(_)
        ));
    }

    /// `iptables-save -t mangle` (iptables 1.8.9) holding what [`render_iptables_apply`] wrote,
    /// plus a foreign rule and chain.
    fn save(iface: &str) -> String {
        format!(
            "# Generated by iptables-save v1.8.9 (nf_tables)\n\
             *mangle\n\
             :PREROUTING ACCEPT [0:0]\n\
             :FORWARD ACCEPT [0:0]\n\
             :WIREMESH-MSS - [0:0]\n\
             :OTHER - [0:0]\n\
             -A FORWARD -m comment --comment \"wiremesh: mss clamp\" -j WIREMESH-MSS\n\
             -A FORWARD -o eth0 -j OTHER\n\
             -A WIREMESH-MSS -o {iface} -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment \"wiremesh: mss\" -j TCPMSS --clamp-mss-to-pmtu\n\
             -A WIREMESH-MSS -i {iface} -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment \"wiremesh: mss\" -j TCPMSS --clamp-mss-to-pmtu\n\
             COMMIT\n"
        )
    }

    #[test]
    fn iptables_save_of_our_chain_reads_back_as_the_interface() {
        assert_eq!(
            parse_iptables(&save("wiremesh0")),
            ClampState::Present("wiremesh0".into())
        );
        assert_eq!(parse_iptables("*mangle\nCOMMIT\n"), ClampState::Absent);
        let nat_only = save("wiremesh0").replace("*mangle", "*nat");
        assert_eq!(parse_iptables(&nat_only), ClampState::Absent, "other table");
        let changed = save("wiremesh0").replace("SYN,RST SYN -m comment --comment \"wiremesh: mss\" -j TCPMSS --clamp-mss-to-pmtu\nCOMMIT", "SYN,RST SYN -m comment --comment \"wiremesh: mss\" -j TCPMSS --set-mss 1400\nCOMMIT");
        assert!(matches!(
            parse_iptables(&changed),
            ClampState::Unexpected(_)
        ));
        let no_jump = save("wiremesh0").replace("-A FORWARD -m comment", "-A INPUT -m comment");
        assert!(matches!(
            parse_iptables(&no_jump),
            ClampState::Unexpected(_)
        ));
    }

    #[test]
    fn iptables_input_declares_our_chain_keeps_our_jump_and_names_nothing_else() {
        let input = render_iptables_apply("wg1", &save("wiremesh0"));
        assert_eq!(
            input,
            "*mangle\n\
             :WIREMESH-MSS - [0:0]\n\
             -A WIREMESH-MSS -o wg1 -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment \"wiremesh: mss\" -j TCPMSS --clamp-mss-to-pmtu\n\
             -A WIREMESH-MSS -i wg1 -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment \"wiremesh: mss\" -j TCPMSS --clamp-mss-to-pmtu\n\
             COMMIT\n"
        );
        let fresh = render_iptables_apply("wg1", "*mangle\nCOMMIT\n");
        assert!(fresh.contains(
            "-I FORWARD 1 -m comment --comment \"wiremesh: mss clamp\" -j WIREMESH-MSS\n"
        ));
        // What the restore input writes reads back as the interface it was rendered for.
        let applied = save("wg1");
        assert_eq!(parse_iptables(&applied), ClampState::Present("wg1".into()));
        let delete = render_iptables_delete(&save("wiremesh0")).unwrap();
        assert_eq!(
            delete,
            "*mangle\n\
             -D FORWARD -m comment --comment \"wiremesh: mss clamp\" -j WIREMESH-MSS\n\
             -F WIREMESH-MSS\n-X WIREMESH-MSS\n\
             COMMIT\n"
        );
        assert!(!delete.contains("OTHER"));
        assert_eq!(render_iptables_delete("*mangle\nCOMMIT\n"), None);
    }

    #[test]
    fn both_families_must_agree() {
        let p = |i: &str| ClampState::Present(i.into());
        assert_eq!(
            join_families(ClampState::Absent, ClampState::Absent),
            ClampState::Absent
        );
        assert_eq!(join_families(p("wg0"), p("wg0")), p("wg0"));
        for (a, b) in [
            (p("wg0"), ClampState::Absent),
            (p("wg0"), p("wg1")),
            (ClampState::Absent, ClampState::Unexpected("x".into())),
        ] {
            assert!(matches!(join_families(a, b), ClampState::Unexpected(_)));
        }
    }

    #[test]
    fn only_plain_interface_names_go_into_a_rule() {
        assert!(plain_name("wiremesh0") && plain_name("wg-a_1.2"));
        for bad in ["", "a\"b", "a b", "sixteen-chars-xx", "x;y"] {
            assert!(!plain_name(bad), "{bad:?}");
        }
    }
}
