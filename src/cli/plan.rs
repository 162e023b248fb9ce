//! `meshctl plan` output: the JSON contract and the human-readable text form.
//!
//! Pure renderers from a [`Plan`] to a string. Depends on the desired state, diagnostics and
//! topology types; no I/O. The JSON field names are a contract read by other tools.

use std::fmt::Write as _;

use serde::Serialize;

use crate::desired::{DesiredState, Route, RouteDev, Rule};
use crate::diagnostic::Diagnostic;
use crate::model::Granularity;
use crate::topology::Plan;

/// Names of the devices a route can leave through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNames {
    /// WireGuard interface.
    pub wireguard: String,
    /// Underlay interface holding the internal IP.
    pub private: String,
    /// IPIP tunnel interface.
    pub tunnel: String,
}

impl DeviceNames {
    /// The name of `dev`.
    pub fn name(&self, dev: RouteDev) -> &str {
        match dev {
            RouteDev::WireGuard => &self.wireguard,
            RouteDev::Private => &self.private,
            RouteDev::Tunnel => &self.tunnel,
            RouteDev::Blackhole => "blackhole",
        }
    }
}

#[derive(Serialize)]
struct JsonPlan<'a> {
    node: &'a str,
    leader: bool,
    granularity: Granularity,
    interface: JsonInterface<'a>,
    peers: Vec<JsonPeer<'a>>,
    routes: Vec<JsonRoute<'a>>,
    /// Destinations of the guard routes (blackholes at the lowest priority, see
    /// [`Route::guard`]) the reconciler adds next to the routes.
    guards: Vec<String>,
    rules: &'a [Rule],
    bridge: &'a Option<crate::desired::Bridge>,
    masquerade: &'a crate::desired::Masquerade,
    diagnostics: &'a [Diagnostic],
}

#[derive(Serialize)]
struct JsonInterface<'a> {
    name: &'a str,
    address: Option<String>,
    listen_port: u16,
    /// The fixed MTU; `null`: automatic, the underlay's MTU minus `mtu_overhead`.
    mtu: Option<u32>,
    /// WireGuard's per-packet overhead on this node's underlay (60 over IPv4, else 80).
    mtu_overhead: u32,
    /// Whether TCP SYNs through the interface get their MSS clamped to the route's MTU.
    mss_clamp: bool,
}

#[derive(Serialize)]
struct JsonPeer<'a> {
    name: &'a str,
    public_key: String,
    endpoint: Option<String>,
    allowed_ips: Vec<String>,
    persistent_keepalive: u16,
    /// Whether a preshared key is set (the key itself is a secret and never printed).
    preshared_key: bool,
    /// The relay this peer's traffic goes through (its allowed IPs are on the relay's peer;
    /// the direct path keeps being tried). Absent for a direct peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_via: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonRoute<'a> {
    dst: String,
    gateway: Option<String>,
    dev: &'a str,
    table: u32,
    src: Option<String>,
    onlink: bool,
}

fn json_route<'a>(r: &Route, devs: &'a DeviceNames) -> JsonRoute<'a> {
    JsonRoute {
        dst: r.dst.to_string(),
        gateway: r.gateway.map(|g| g.to_string()),
        dev: devs.name(r.dev),
        table: r.table,
        src: r.src.map(|s| s.to_string()),
        onlink: r.onlink,
    }
}

/// The plan as one JSON object (pretty-printed, with a trailing newline).
pub fn render_json(plan: &Plan, granularity: Granularity, devs: &DeviceNames) -> String {
    let d: &DesiredState = &plan.desired;
    let out = JsonPlan {
        node: &d.node,
        leader: d.leader,
        granularity,
        interface: JsonInterface {
            name: &d.interface.name,
            address: d.interface.address.map(|a| a.to_string()),
            listen_port: d.interface.listen_port,
            mtu: d.interface.mtu,
            mtu_overhead: d.interface.overhead(),
            mss_clamp: d.interface.mss_clamp,
        },
        peers: d
            .peers
            .iter()
            .map(|p| JsonPeer {
                name: &p.name,
                public_key: p.public_key.to_string(),
                endpoint: p.endpoint.as_ref().map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(|a| a.to_string()).collect(),
                persistent_keepalive: p.persistent_keepalive,
                preshared_key: p.preshared_key.is_some(),
                relayed_via: plan.relayed.get(&p.name).map(String::as_str),
            })
            .collect(),
        routes: d.routes.iter().map(|r| json_route(r, devs)).collect(),
        guards: guard_destinations(d),
        rules: &d.rules,
        bridge: &d.bridge,
        masquerade: &d.masquerade,
        diagnostics: &plan.diagnostics,
    };
    // Serializing plain data with string keys cannot fail.
    let mut s = serde_json::to_string_pretty(&out).unwrap_or_default();
    s.push('\n');
    s
}

/// The destinations of the routes that get a guard, in route order.
fn guard_destinations(d: &DesiredState) -> Vec<String> {
    crate::desired::guards_of_state(d)
        .iter()
        .map(|g| g.dst.to_string())
        .collect()
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Append rows as an aligned table, indented by two spaces.
fn table(out: &mut String, rows: &[Vec<String>]) {
    for line in super::table(rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
}

/// The plan for people: like `wg show`, then routes, rules, bridge, masquerade, diagnostics.
pub fn render_text(plan: &Plan, granularity: Granularity, devs: &DeviceNames) -> String {
    let d = &plan.desired;
    let mut o = String::new();
    let role = if d.leader { "leader" } else { "not a leader" };
    let _ = writeln!(o, "node: {} ({role}, granularity {granularity})", d.node);
    let _ = writeln!(o, "interface: {}", d.interface.name);
    match d.interface.address {
        Some(a) => {
            let _ = writeln!(o, "  address: {a}");
        }
        None => {
            let _ = writeln!(
                o,
                "  address: (none: traffic goes through the location's leader)"
            );
        }
    }
    let _ = writeln!(o, "  listening port: {}", d.interface.listen_port);
    match d.interface.mtu {
        Some(m) => {
            let _ = writeln!(o, "  mtu: {m}");
        }
        None => {
            let family = if d.interface.overhead() == crate::desired::WG_OVERHEAD_IPV4 {
                "IPv4 endpoint"
            } else {
                "IPv6 or unknown endpoint"
            };
            let _ = writeln!(
                o,
                "  mtu: automatic (underlay MTU - {}, {family})",
                d.interface.overhead()
            );
        }
    }
    if d.interface.mss_clamp {
        let _ = writeln!(o, "  tcp mss: clamped to the route MTU");
    }
    for p in &d.peers {
        let _ = writeln!(o, "\npeer: {} ({})", p.public_key, p.name);
        let ep = p
            .endpoint
            .as_ref()
            .map_or("(none: waits for the peer to connect)".to_owned(), |e| {
                e.to_string()
            });
        let _ = writeln!(o, "  endpoint: {ep}");
        match plan.relayed.get(&p.name) {
            Some(via) => {
                let _ = writeln!(
                    o,
                    "  relayed through {via}: no direct handshake (its allowed IPs are on {via}'s \
                     peer; the direct path is tried again every minute)"
                );
            }
            None => {
                let _ = writeln!(o, "  allowed ips: {}", join(&p.allowed_ips));
            }
        }
        if p.persistent_keepalive > 0 {
            let _ = writeln!(
                o,
                "  persistent keepalive: every {} seconds",
                p.persistent_keepalive
            );
        }
        if p.preshared_key.is_some() {
            let _ = writeln!(o, "  preshared key: (hidden)");
        }
    }
    let _ = writeln!(o, "\nroutes:");
    if d.routes.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    let rows: Vec<Vec<String>> = d
        .routes
        .iter()
        .map(|r| {
            let mut row = vec![
                r.dst.to_string(),
                r.gateway.map_or(String::new(), |g| format!("via {g}")),
                format!("dev {}", devs.name(r.dev)),
                r.src.map_or(String::new(), |s| format!("src {s}")),
            ];
            let mut tail = String::new();
            if r.table != crate::desired::MAIN_TABLE {
                tail.push_str(&format!("table {} ", r.table));
            }
            if r.onlink {
                tail.push_str("onlink");
            }
            row.push(tail.trim_end().to_owned());
            row
        })
        .collect();
    table(&mut o, &rows);
    let guards = guard_destinations(d);
    if !guards.is_empty() {
        let _ = writeln!(
            o,
            "  + a blackhole at metric {} for each of the {} routes of the main table              (fail-closed: used only while the route is missing)",
            crate::desired::GUARD_METRIC,
            guards.len()
        );
    }
    if !d.rules.is_empty() {
        let _ = writeln!(o, "\nrules:");
        let rows: Vec<Vec<String>> = d
            .rules
            .iter()
            .map(|r| {
                vec![
                    r.src.map_or("from all".into(), |s| format!("from {s}")),
                    r.dst.map_or(String::new(), |s| format!("to {s}")),
                    r.iif.as_ref().map_or(String::new(), |i| format!("iif {i}")),
                    format!("lookup {}", r.table),
                ]
            })
            .collect();
        table(&mut o, &rows);
    }
    if let Some(b) = &d.bridge {
        let _ = writeln!(o, "\nbridge: {} {}", b.name, join(&b.addresses));
    }
    let m = &d.masquerade;
    let _ = writeln!(o, "\nmasquerade: from {}", join(&m.sources));
    if !m.destinations.is_empty() {
        let _ = writeln!(o, "  and to {}", join(&m.destinations));
    }
    let _ = writeln!(o, "  except to {}", join(&m.exempt));
    if !plan.diagnostics.is_empty() {
        let _ = writeln!(o, "\ndiagnostics:");
        for diag in &plan.diagnostics {
            let _ = writeln!(o, "  {diag}");
        }
    }
    o
}
