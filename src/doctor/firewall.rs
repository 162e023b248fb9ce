//! Whether this host's nftables ruleset would drop an incoming UDP packet to a port: the
//! answer to "is the WireGuard listen port open here?".
//!
//! Reads the JSON of `nft -j list ruleset` (any table that the iptables-nft tools made is in it
//! too). The packet judged is the first packet of a WireGuard handshake: UDP, destination port
//! `port`, connection tracking state `new`, from a remote address on an interface other than
//! `lo`. Every base chain on the `input` hook of the `ip` and `inet` families judges it (a drop
//! in any of them drops it), in priority order; in a chain, rules are read in order, following
//! `jump` and `goto`; a rule matches when every match it holds is true for that packet. Matches
//! this reader does not know (addresses, interfaces other than `lo`, marks, …) make the rule
//! match only some packets: a drop there is reported as "may drop". Without a match, a base
//! chain's policy decides.
//!
//! Pure: [`judge`] works on the parsed JSON; [`read_ruleset`] runs `nft`. Depends on
//! `serde_json` and `std::process`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// What the ruleset does with the packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Every input chain lets it through.
    Open,
    /// A rule or a chain's policy drops (or rejects) it.
    Drops {
        /// Where, and what: `inet filter input: udp dport 51820 drop`.
        by: String,
    },
    /// A rule drops some such packets (depending on matches this reader cannot decide).
    MayDrop {
        /// Where, and what.
        by: String,
    },
    /// The ruleset could not be read or understood.
    Unknown {
        /// Why.
        why: String,
    },
}

impl Verdict {
    /// One line for people.
    pub fn describe(&self, port: u16) -> String {
        match self {
            Verdict::Open => format!("nftables lets UDP {port} in"),
            Verdict::Drops { by } => format!("nftables drops UDP {port}: {by}"),
            Verdict::MayDrop { by } => format!("nftables may drop UDP {port}: {by}"),
            Verdict::Unknown { why } => format!("firewall not read: {why}"),
        }
    }
}

/// The ruleset as `nft -j list ruleset` prints it, or why it could not be had.
pub fn read_ruleset() -> Result<Value, String> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft -j list ruleset: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j list ruleset: {e}"))
}

/// A chain of the ruleset.
#[derive(Debug, Default)]
struct Chain<'v> {
    hook: Option<String>,
    prio: i64,
    policy: Option<String>,
    rules: Vec<&'v Value>,
}

/// The match outcome for the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    Yes,
    No,
    Maybe,
}

/// How a chain (or rule) ends for the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Accept,
    Drop(String),
    /// Fell off the end of the chain (or returned).
    Continue,
}

/// Judge `ruleset` (the JSON of `nft -j list ruleset`) for a new UDP packet to `port`.
pub fn judge(ruleset: &Value, port: u16) -> Verdict {
    let Some(items) = ruleset.get("nftables").and_then(Value::as_array) else {
        return Verdict::Unknown {
            why: "no \"nftables\" array in the ruleset".to_owned(),
        };
    };
    let mut chains: BTreeMap<(String, String, String), Chain<'_>> = BTreeMap::new();
    for item in items {
        if let Some(c) = item.get("chain") {
            let key = chain_key(c);
            let entry = chains.entry(key).or_default();
            entry.hook = c.get("hook").and_then(Value::as_str).map(str::to_owned);
            entry.prio = c.get("prio").and_then(Value::as_i64).unwrap_or(0);
            entry.policy = c.get("policy").and_then(Value::as_str).map(str::to_owned);
        }
    }
    for item in items {
        if let Some(r) = item.get("rule") {
            let key = (str_of(r, "family"), str_of(r, "table"), str_of(r, "chain"));
            chains.entry(key).or_default().rules.push(r);
        }
    }
    let mut bases: Vec<(&(String, String, String), &Chain<'_>)> = chains
        .iter()
        .filter(|((family, _, _), c)| {
            c.hook.as_deref() == Some("input") && (family == "ip" || family == "inet")
        })
        .collect();
    bases.sort_by_key(|(k, c)| (c.prio, (*k).clone()));
    let mut maybe: Option<String> = None;
    for (key, chain) in bases {
        let mut ctx = Ctx {
            chains: &chains,
            port,
            maybe: None,
            depth: 0,
        };
        let outcome = ctx.run(key, chain);
        if maybe.is_none() {
            maybe = ctx.maybe;
        }
        match outcome {
            Outcome::Drop(by) => return Verdict::Drops { by },
            Outcome::Accept => {}
            Outcome::Continue => {
                if chain.policy.as_deref() == Some("drop") {
                    return Verdict::Drops {
                        by: format!("{}: policy drop, no rule accepts it", name(key)),
                    };
                }
            }
        }
    }
    match maybe {
        Some(by) => Verdict::MayDrop { by },
        None => Verdict::Open,
    }
}

fn str_of(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn chain_key(c: &Value) -> (String, String, String) {
    (str_of(c, "family"), str_of(c, "table"), str_of(c, "name"))
}

fn name(k: &(String, String, String)) -> String {
    format!("{} {} {}", k.0, k.1, k.2)
}

struct Ctx<'c, 'v> {
    chains: &'c BTreeMap<(String, String, String), Chain<'v>>,
    port: u16,
    maybe: Option<String>,
    depth: usize,
}

impl Ctx<'_, '_> {
    fn run(&mut self, key: &(String, String, String), chain: &Chain<'_>) -> Outcome {
        self.depth += 1;
        if self.depth > 16 {
            return Outcome::Continue;
        }
        for rule in &chain.rules {
            let Some(exprs) = rule.get("expr").and_then(Value::as_array) else {
                continue;
            };
            let mut truth = Truth::Yes;
            let mut words: Vec<String> = Vec::new();
            let mut verdict: Option<(&str, Option<String>)> = None;
            for e in exprs {
                if let Some(m) = e.get("match") {
                    let (t, w) = self.judge_match(m);
                    words.push(w);
                    truth = match (truth, t) {
                        (Truth::No, _) | (_, Truth::No) => Truth::No,
                        (Truth::Maybe, _) | (_, Truth::Maybe) => Truth::Maybe,
                        _ => Truth::Yes,
                    };
                } else if e.get("accept").is_some() {
                    verdict = Some(("accept", None));
                } else if e.get("drop").is_some() {
                    verdict = Some(("drop", None));
                } else if e.get("reject").is_some() {
                    verdict = Some(("reject", None));
                } else if e.get("return").is_some() {
                    verdict = Some(("return", None));
                } else if let Some(j) = e.get("jump").or_else(|| e.get("goto")) {
                    let kind = if e.get("jump").is_some() {
                        "jump"
                    } else {
                        "goto"
                    };
                    verdict = Some((
                        kind,
                        j.get("target").and_then(Value::as_str).map(str::to_owned),
                    ));
                }
            }
            if truth == Truth::No {
                continue;
            }
            let Some((v, target)) = verdict else { continue };
            let mut text = words.join(" ");
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(v);
            if let Some(t) = &target {
                text.push(' ');
                text.push_str(t);
            }
            let by = format!("{}: {text}", name(key));
            match (v, truth) {
                ("accept", Truth::Yes) => return Outcome::Accept,
                ("drop" | "reject", Truth::Yes) => return Outcome::Drop(by),
                ("drop" | "reject", Truth::Maybe) => {
                    self.maybe.get_or_insert(by);
                }
                ("return", Truth::Yes) => return Outcome::Continue,
                ("jump" | "goto", Truth::Yes | Truth::Maybe) => {
                    let tk = (key.0.clone(), key.1.clone(), target.unwrap_or_default());
                    let Some(tc) = self.chains.get(&tk) else {
                        continue;
                    };
                    match self.run(&tk, tc) {
                        Outcome::Continue if v == "goto" && truth == Truth::Yes => {
                            return Outcome::Continue;
                        }
                        Outcome::Continue => {}
                        other if truth == Truth::Yes => return other,
                        Outcome::Drop(by) => {
                            self.maybe.get_or_insert(by);
                        }
                        Outcome::Accept => {}
                    }
                }
                _ => {}
            }
        }
        self.depth -= 1;
        Outcome::Continue
    }

    /// Whether one `match` holds for the packet, and its words.
    fn judge_match(&self, m: &Value) -> (Truth, String) {
        let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
        let left = m.get("left").unwrap_or(&Value::Null);
        let right = m.get("right").unwrap_or(&Value::Null);
        let negate = op == "!=";
        let (truth, words) = if let Some(p) = left.get("payload") {
            let proto = p
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let field = p.get("field").and_then(Value::as_str).unwrap_or_default();
            match (proto, field) {
                ("udp", "dport") => (
                    yes_no(contains_port(right, self.port)),
                    format!("udp dport {}", show(right)),
                ),
                ("tcp", _) | ("icmp", _) | ("sctp", _) => (Truth::No, format!("{proto} {field}")),
                ("udp", _) => (Truth::Maybe, format!("udp {field} {}", show(right))),
                ("ip", "protocol") | ("ip6", "nexthdr") => (
                    yes_no(contains_word(right, "udp") || contains_number(right, 17)),
                    format!("{proto} {field} {}", show(right)),
                ),
                _ => (Truth::Maybe, format!("{proto} {field} {}", show(right))),
            }
        } else if let Some(meta) = left.get("meta") {
            let key = meta.get("key").and_then(Value::as_str).unwrap_or_default();
            match key {
                "l4proto" => (
                    yes_no(contains_word(right, "udp") || contains_number(right, 17)),
                    format!("meta l4proto {}", show(right)),
                ),
                "iifname" | "iif" => (
                    if contains_word(right, "lo") {
                        Truth::No
                    } else {
                        Truth::Maybe
                    },
                    format!("{key} {}", show(right)),
                ),
                "nfproto" => (
                    yes_no(contains_word(right, "ipv4")),
                    format!("meta nfproto {}", show(right)),
                ),
                _ => (Truth::Maybe, format!("meta {key} {}", show(right))),
            }
        } else if let Some(ct) = left.get("ct") {
            let key = ct.get("key").and_then(Value::as_str).unwrap_or_default();
            if key == "state" {
                (
                    yes_no(contains_word(right, "new")),
                    format!("ct state {}", show(right)),
                )
            } else {
                (Truth::Maybe, format!("ct {key} {}", show(right)))
            }
        } else {
            (Truth::Maybe, show(left))
        };
        let truth = match (truth, negate) {
            (Truth::Yes, true) => Truth::No,
            (Truth::No, true) => Truth::Yes,
            (t, _) => t,
        };
        let words = if negate {
            words.replacen(' ', " != ", 1)
        } else {
            words
        };
        (truth, words)
    }
}

fn yes_no(b: bool) -> Truth {
    if b { Truth::Yes } else { Truth::No }
}

/// A match's right-hand side in nft's words.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => a.iter().map(show).collect::<Vec<_>>().join(", "),
        Value::Object(o) => {
            if let Some(set) = o.get("set") {
                format!("{{ {} }}", show(set))
            } else if let Some(Value::Array(r)) = o.get("range") {
                format!(
                    "{}-{}",
                    r.first().map(show).unwrap_or_default(),
                    r.get(1).map(show).unwrap_or_default()
                )
            } else {
                v.to_string()
            }
        }
        _ => v.to_string(),
    }
}

/// Whether the value (a number, a set, a range, a list) holds `port`.
fn contains_port(v: &Value, port: u16) -> bool {
    contains_number(v, u64::from(port))
}

fn contains_number(v: &Value, n: u64) -> bool {
    match v {
        Value::Number(x) => x.as_u64() == Some(n),
        Value::Array(a) => a.iter().any(|x| contains_number(x, n)),
        Value::Object(o) => {
            if let Some(set) = o.get("set") {
                contains_number(set, n)
            } else if let Some(Value::Array(r)) = o.get("range") {
                let lo = r.first().and_then(Value::as_u64).unwrap_or(u64::MAX);
                let hi = r.get(1).and_then(Value::as_u64).unwrap_or(0);
                lo <= n && n <= hi
            } else {
                false
            }
        }
        _ => false,
    }
}

fn contains_word(v: &Value, w: &str) -> bool {
    match v {
        Value::String(s) => s == w,
        Value::Array(a) => a.iter().any(|x| contains_word(x, w)),
        Value::Object(o) => o.get("set").is_some_and(|s| contains_word(s, w)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ruleset(chains: Value, rules: Value) -> Value {
        let mut items = vec![json!({"metainfo": {"json_schema_version": 1}})];
        items.extend(
            chains
                .as_array()
                .unwrap()
                .iter()
                .map(|c| json!({ "chain": c })),
        );
        items.extend(
            rules
                .as_array()
                .unwrap()
                .iter()
                .map(|r| json!({ "rule": r })),
        );
        json!({ "nftables": items })
    }

    fn input(policy: &str) -> Value {
        json!({"family": "inet", "table": "filter", "name": "input", "handle": 1,
               "type": "filter", "hook": "input", "prio": 0, "policy": policy})
    }

    fn rule(chain: &str, expr: Value) -> Value {
        json!({"family": "inet", "table": "filter", "chain": chain, "handle": 5, "expr": expr})
    }

    fn dport(right: Value) -> Value {
        json!({"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": right}})
    }

    #[test]
    fn an_empty_ruleset_lets_the_port_in() {
        assert_eq!(judge(&json!({"nftables": []}), 51820), Verdict::Open);
    }

    #[test]
    fn a_drop_rule_for_the_port_drops_it_and_says_which() {
        let rs = ruleset(
            json!([input("accept")]),
            json!([rule(
                "input",
                json!([dport(json!(51820)), {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}])
            )]),
        );
        assert_eq!(
            judge(&rs, 51820),
            Verdict::Drops {
                by: "inet filter input: udp dport 51820 drop".to_owned()
            }
        );
        assert_eq!(judge(&rs, 51821), Verdict::Open, "another port");
    }

    #[test]
    fn a_reject_of_all_udp_drops_it() {
        let proto =
            json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}});
        let rs = ruleset(
            json!([input("accept")]),
            json!([rule("input", json!([proto, {"reject": null}]))]),
        );
        assert!(matches!(judge(&rs, 51820), Verdict::Drops { .. }));
    }

    #[test]
    fn a_drop_policy_drops_it_unless_a_rule_accepts_the_port() {
        let est = json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}});
        let lo =
            json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}});
        let closed = ruleset(
            json!([input("drop")]),
            json!([
                rule("input", json!([est, {"accept": null}])),
                rule("input", json!([lo, {"accept": null}])),
                rule(
                    "input",
                    json!([dport(json!({"set": [22, 80]})), {"accept": null}])
                ),
            ]),
        );
        assert_eq!(
            judge(&closed, 51820),
            Verdict::Drops {
                by: "inet filter input: policy drop, no rule accepts it".to_owned()
            }
        );
        let open = ruleset(
            json!([input("drop")]),
            json!([rule(
                "input",
                json!([dport(json!({"set": [22, {"range": [51820, 51830]}]})), {"accept": null}])
            )]),
        );
        assert_eq!(judge(&open, 51820), Verdict::Open);
    }

    #[test]
    fn an_accept_before_the_drop_wins_and_a_jump_is_followed() {
        let rs = ruleset(
            json!([input("accept"), {"family": "inet", "table": "filter", "name": "wg"}]),
            json!([
                rule("input", json!([{"jump": {"target": "wg"}}])),
                rule("wg", json!([dport(json!(51820)), {"drop": null}])),
            ]),
        );
        assert_eq!(
            judge(&rs, 51820),
            Verdict::Drops {
                by: "inet filter wg: udp dport 51820 drop".to_owned()
            }
        );
        let accepted = ruleset(
            json!([input("accept")]),
            json!([
                rule("input", json!([dport(json!(51820)), {"accept": null}])),
                rule("input", json!([{"drop": null}])),
            ]),
        );
        assert_eq!(judge(&accepted, 51820), Verdict::Open);
    }

    #[test]
    fn a_drop_that_depends_on_the_source_may_drop() {
        let saddr = json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "203.0.113.0/24"}});
        let rs = ruleset(
            json!([input("accept")]),
            json!([rule(
                "input",
                json!([saddr, dport(json!(51820)), {"drop": null}])
            )]),
        );
        assert!(matches!(judge(&rs, 51820), Verdict::MayDrop { .. }));
    }

    #[test]
    fn output_chains_and_ip6_tables_do_not_count() {
        let out = json!({"family": "inet", "table": "filter", "name": "output", "hook": "output", "prio": 0, "policy": "drop"});
        let v6 = json!({"family": "ip6", "table": "f", "name": "input", "hook": "input", "prio": 0, "policy": "drop"});
        let rs = ruleset(json!([out, v6]), json!([]));
        assert_eq!(judge(&rs, 51820), Verdict::Open);
    }
}
