//! `meshctl doctor peers`: for every WireGuard peer of this node without a recent handshake,
//! the facts that decide why (endpoint and where it came from, bytes each way, this host's
//! firewall for the listen port, keys as published and as used) and the one most likely cause
//! in plain words with what to do.
//!
//! [`diagnose`] is pure: facts in, findings out. The facts come from the agent's `/status`
//! ([`crate::status::AgentStatus`]), optionally the registry (Nodes and Peers as published:
//! keys, endpoints, discovered endpoints) and the firewall verdict of [`super::firewall`]; the
//! caller gathers them. Depends on the status document, the model and the firewall reader.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::firewall::Verdict;
use crate::model::{MeshNode, MeshPeer, WgKey};
use crate::status::{AgentStatus, Health, PeerKind, human_age, human_bytes};

/// Where the endpoint a peer is reached at came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointSource {
    /// The peer's published endpoint (its Node's annotations or address, or its Peer resource).
    Annotation,
    /// An endpoint another node discovered for it (it is behind NAT and has keepalive).
    Discovered,
    /// Learned from the peer's own packets: it differs from what the agent configured.
    Roamed,
    /// Configured by the agent; without the registry it cannot tell annotation from discovered.
    Configured,
    /// No endpoint at all.
    None,
}

impl EndpointSource {
    fn words(self) -> &'static str {
        match self {
            EndpointSource::Annotation => "published",
            EndpointSource::Discovered => "discovered by the mesh",
            EndpointSource::Roamed => "roamed: learned from its packets",
            EndpointSource::Configured => "configured by the agent",
            EndpointSource::None => "none",
        }
    }
}

/// What the registry publishes about the mesh (keys, endpoints), for the checks that need it.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Every Node, by name: its key, endpoint and the endpoints it discovered.
    pub nodes: BTreeMap<String, MeshNode>,
    /// Every external Peer, by name.
    pub peers: BTreeMap<String, MeshPeer>,
}

impl Published {
    /// From the registry's lists.
    pub fn new(nodes: &[MeshNode], peers: &[MeshPeer]) -> Published {
        Published {
            nodes: nodes
                .iter()
                .map(|n| (n.name.0.clone(), n.clone()))
                .collect(),
            peers: peers
                .iter()
                .map(|p| (p.name.0.clone(), p.clone()))
                .collect(),
        }
    }
}

/// What this host knows of itself.
#[derive(Debug, Clone)]
pub struct Local {
    /// The agent's status document.
    pub status: AgentStatus,
    /// The WireGuard listen port.
    pub listen_port: u16,
    /// This host's firewall for UDP to the listen port.
    pub firewall: Verdict,
    /// The registry, when it was read.
    pub published: Option<Published>,
}

/// Whether a key is the one published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "check", rename_all = "kebab-case")]
pub enum KeyCheck {
    /// The key in use is the published one.
    Matches,
    /// They differ.
    Differs {
        /// The key in use.
        used: String,
        /// The key published.
        published: String,
    },
    /// The registry was not read, or publishes none.
    Unknown,
}

/// The one most likely cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// This host's firewall drops UDP to the listen port.
    LocalFirewall,
    /// This node serves a key other than the one it publishes.
    OwnKeyMismatch,
    /// This node uses a key for the peer other than the one the peer publishes.
    PeerKeyMismatch,
    /// No endpoint is known for the peer and it has not connected.
    NoEndpoint,
    /// Packets went out, nothing came back.
    NoAnswer,
    /// Packets come in but no handshake completes.
    NoHandshake,
    /// Nothing was sent: no traffic needed the tunnel yet.
    Idle,
    /// Handshakes worked once and stopped.
    WentAway,
}

/// The finding for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The peer's name (its segment's nodes, or the external peer).
    pub peer: String,
    /// Node, external peer or unknown.
    pub kind: PeerKind,
    /// Its public key.
    pub public_key: String,
    /// Its health.
    pub health: Health,
    /// Seconds since the latest handshake; `None`: never.
    pub handshake_age: Option<u64>,
    /// The endpoint in use.
    pub endpoint: Option<String>,
    /// Where that endpoint came from.
    pub endpoint_source: EndpointSource,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// This host's firewall for the listen port, in words.
    pub firewall: String,
    /// This node's key: served vs published.
    pub own_key: KeyCheck,
    /// The peer's key: used here vs published.
    pub peer_key: KeyCheck,
    /// The most likely cause.
    pub cause: Cause,
    /// The cause in plain words, with what to do.
    pub advice: String,
}

/// The report: this node and one finding per peer without a recent handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// This node.
    pub node: String,
    /// The listen port checked.
    pub listen_port: u16,
    /// This host's firewall for it.
    pub firewall: Verdict,
    /// Peers with a recent handshake (not diagnosed).
    pub healthy: usize,
    /// The findings.
    pub findings: Vec<Finding>,
}

/// The port of an endpoint `host:port` (`[v6]:port`), if it has one.
fn port_of(endpoint: &str) -> Option<u16> {
    endpoint.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// Where `endpoint` (the device's) came from.
fn source(
    endpoint: Option<&str>,
    configured: Option<&str>,
    peer_names: &[&str],
    key: WgKey,
    published: Option<&Published>,
) -> EndpointSource {
    let Some(ep) = endpoint else {
        return EndpointSource::None;
    };
    // A configured name (DNS) resolves to an address the device shows: only an address that
    // differs counts as roamed.
    let configured_addr = configured.and_then(|c| c.parse::<std::net::SocketAddr>().ok());
    if configured_addr.is_some_and(|c| c.to_string() != ep) {
        return EndpointSource::Roamed;
    }
    let Some(p) = published else {
        return if configured.is_some() {
            EndpointSource::Configured
        } else {
            EndpointSource::Roamed
        };
    };
    let discovered = p.nodes.values().any(|n| {
        n.discovered_endpoints
            .get(&key)
            .is_some_and(|d| d.to_string() == ep)
    });
    if discovered {
        return EndpointSource::Discovered;
    }
    let annotated = peer_names.iter().any(|name| {
        p.nodes
            .get(*name)
            .and_then(|n| n.endpoint.as_ref())
            .or_else(|| p.peers.get(*name).and_then(|x| x.endpoint.as_ref()))
            .is_some_and(|e| e.to_string() == ep)
    });
    if annotated || configured.is_some() {
        // A name endpoint resolves to an address: configured and not discovered counts as
        // published.
        EndpointSource::Annotation
    } else {
        EndpointSource::Roamed
    }
}

/// Diagnose every peer of `local.status` without a recent handshake (fresh or aging);
/// `all` includes the others too.
pub fn diagnose(local: &Local, all: bool) -> Report {
    let st = &local.status;
    let port = local.listen_port;
    let me = st.node.as_str();
    let published = local.published.as_ref();
    let own_key = match (
        st.public_key,
        published.and_then(|p| p.nodes.get(me)).and_then(|n| n.key),
    ) {
        (Some(used), Some(p)) if used == p => KeyCheck::Matches,
        (Some(used), Some(p)) => KeyCheck::Differs {
            used: used.to_string(),
            published: p.to_string(),
        },
        _ => KeyCheck::Unknown,
    };
    let mut findings = Vec::new();
    let mut healthy = 0;
    for p in &st.peers {
        let health = p.health(st.time);
        if !all && matches!(health, Health::Fresh | Health::Aging) {
            healthy += 1;
            continue;
        }
        let names: Vec<&str> = p.name.split(',').filter(|n| !n.is_empty()).collect();
        let peer_key = match published {
            None => KeyCheck::Unknown,
            Some(pb) => {
                let keys: Vec<WgKey> = names
                    .iter()
                    .filter_map(|n| {
                        pb.nodes
                            .get(*n)
                            .and_then(|x| x.key)
                            .or_else(|| pb.peers.get(*n).map(|x| x.key))
                    })
                    .collect();
                if keys.is_empty() {
                    KeyCheck::Unknown
                } else if keys.contains(&p.public_key) {
                    KeyCheck::Matches
                } else {
                    KeyCheck::Differs {
                        used: p.public_key.to_string(),
                        published: keys[0].to_string(),
                    }
                }
            }
        };
        let endpoint_source = source(
            p.endpoint.as_deref(),
            p.configured_endpoint.as_deref(),
            &names,
            p.public_key,
            published,
        );
        let age = p.age(st.time);
        let who = if p.name.is_empty() {
            format!("peer {}", p.public_key)
        } else {
            p.name.clone()
        };
        let (cause, advice) = cause(
            me,
            &who,
            port,
            p.kind,
            &local.firewall,
            &own_key,
            &peer_key,
            p.endpoint.as_deref(),
            endpoint_source,
            age,
            p.tx_bytes,
            p.rx_bytes,
            health,
        );
        findings.push(Finding {
            peer: who,
            kind: p.kind,
            public_key: p.public_key.to_string(),
            health,
            handshake_age: age,
            endpoint: p.endpoint.clone(),
            endpoint_source,
            tx_bytes: p.tx_bytes,
            rx_bytes: p.rx_bytes,
            firewall: local.firewall.describe(port),
            own_key: own_key.clone(),
            peer_key,
            cause,
            advice,
        });
    }
    Report {
        node: st.node.clone(),
        listen_port: port,
        firewall: local.firewall.clone(),
        healthy,
        findings,
    }
}

/// The most likely cause and what to do, first match wins: what this host certainly does
/// wrong (firewall, keys), then what the counters say.
#[allow(clippy::too_many_arguments)]
fn cause(
    me: &str,
    peer: &str,
    port: u16,
    kind: PeerKind,
    firewall: &Verdict,
    own_key: &KeyCheck,
    peer_key: &KeyCheck,
    endpoint: Option<&str>,
    source: EndpointSource,
    age: Option<u64>,
    tx: u64,
    rx: u64,
    health: Health,
) -> (Cause, String) {
    if let Verdict::Drops { by } = firewall {
        return (
            Cause::LocalFirewall,
            format!(
                "{me}'s firewall drops UDP {port} ({by}): {peer}'s handshakes never reach \
                 {me}. Open UDP {port} on {me}, e.g. `nft insert rule inet filter input udp \
                 dport {port} accept` (and in {me}'s cloud firewall or security group)"
            ),
        );
    }
    if let KeyCheck::Differs { used, published } = own_key {
        return (
            Cause::OwnKeyMismatch,
            format!(
                "{me} serves key {used} but publishes {published}: its peers encrypt to a key \
                 it does not hold. Restart the agent on {me} so it publishes its key again (or \
                 correct kilo.squat.ai/key on its Node)"
            ),
        );
    }
    if let KeyCheck::Differs { used, published } = peer_key {
        return (
            Cause::PeerKeyMismatch,
            format!(
                "{me} uses key {used} for {peer}, but {peer} publishes {published}: the agent \
                 on {me} has not caught up with the registry. Check `meshctl status` on {me} \
                 and its log; restart its agent"
            ),
        );
    }
    let ep_port = endpoint.and_then(port_of).unwrap_or(port);
    if endpoint.is_none() {
        return if kind == PeerKind::Peer {
            (
                Cause::NoEndpoint,
                format!(
                    "external peer {peer} has no endpoint and has not connected: it must start \
                     the handshake. Check that its configuration (`meshctl showconf peer {peer}`) \
                     names {me}'s endpoint and sets PersistentKeepalive"
                ),
            )
        } else {
            (
                Cause::NoEndpoint,
                format!(
                    "no endpoint is known for {peer} and it has not reached {me}: both nodes are \
                     probably behind NAT, or {peer} publishes no endpoint. Give one of them a \
                     reachable endpoint (kilo.squat.ai/force-endpoint) and keepalive on the \
                     other (kilo.squat.ai/persistent-keepalive): see docs/install.md, \"Nodes behind NAT\""
                ),
            )
        };
    }
    let ep = endpoint.unwrap_or_default();
    let roamed = if source == EndpointSource::Roamed {
        " (learned from its earlier packets: it may have moved)"
    } else {
        ""
    };
    if tx > 0 && rx == 0 {
        return (
            Cause::NoAnswer,
            format!(
                "{me} sent {} to {peer} at {ep}{roamed} and got nothing back. Open UDP \
                 {ep_port} on {peer}'s firewall (its cloud firewall or security group), and \
                 check that {ep} reaches {peer} from {me}",
                human_bytes(tx)
            ),
        );
    }
    if rx > 0 && age.is_none() {
        return (
            Cause::NoHandshake,
            format!(
                "{peer}'s packets reach {me} but no handshake completes: {peer} probably has an \
                 old key for {me}. Check kilo.squat.ai/key on both Nodes and restart {peer}'s \
                 agent"
            ),
        );
    }
    if tx == 0 && rx == 0 {
        let maybe = match firewall {
            Verdict::MayDrop { by } => {
                format!("; note that {me}'s firewall may drop UDP {port} ({by})")
            }
            _ => String::new(),
        };
        return (
            Cause::Idle,
            format!(
                "nothing was sent to {peer} yet: WireGuard only shakes hands when traffic needs \
                 the tunnel. Send traffic (ping a pod on {peer}) or set \
                 kilo.squat.ai/persistent-keepalive{maybe}"
            ),
        );
    }
    if health == Health::Fresh || health == Health::Aging {
        return (
            Cause::WentAway,
            format!("{peer} shook hands {} ago: fine", human_age(age)),
        );
    }
    (
        Cause::WentAway,
        format!(
            "the last handshake with {peer} was {} ago: {peer} or the path to {ep}{roamed} went \
             away. Check that {peer} and its agent run (`meshctl status` there) and that {ep} \
             still reaches it",
            human_age(age)
        ),
    )
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: listen port UDP {}: {}",
        r.node,
        r.listen_port,
        r.firewall.describe(r.listen_port)
    );
    if r.findings.is_empty() {
        let _ = writeln!(
            out,
            "every peer ({}) had a handshake in the last 5 minutes",
            r.healthy
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{} peer(s) without a recent handshake ({} fine):",
        r.findings.len(),
        r.healthy
    );
    for f in &r.findings {
        let _ = writeln!(out, "\n{} ({})", f.peer, f.health);
        let _ = writeln!(
            out,
            "  endpoint   {} ({})",
            f.endpoint.as_deref().unwrap_or("none"),
            f.endpoint_source.words()
        );
        let _ = writeln!(
            out,
            "  handshake  {}",
            match f.handshake_age {
                Some(a) => format!("{} ago", human_age(Some(a))),
                None => "never".to_owned(),
            }
        );
        let _ = writeln!(
            out,
            "  traffic    sent {}, received {}",
            human_bytes(f.tx_bytes),
            human_bytes(f.rx_bytes)
        );
        let key = |k: &KeyCheck| match k {
            KeyCheck::Matches => "matches the published key".to_owned(),
            KeyCheck::Differs { used, published } => {
                format!("uses {used}, published {published}")
            }
            KeyCheck::Unknown => "not checked (no registry: --nodes)".to_owned(),
        };
        let _ = writeln!(out, "  own key    {}", key(&f.own_key));
        let _ = writeln!(out, "  peer key   {}", key(&f.peer_key));
        let _ = writeln!(out, "  cause      {}", f.advice);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PeerStatus, STATUS_VERSION};

    const NOW: i64 = 10_000;

    fn status(peers: Vec<PeerStatus>) -> AgentStatus {
        AgentStatus {
            version: STATUS_VERSION,
            node: "fra-1".into(),
            public_key: Some(WgKey([9; 32])),
            time: NOW,
            ready: true,
            leader: Some(true),
            wireguard_error: None,
            peers,
            listen_port_conflict: None,
            unreachable: Vec::new(),
        }
    }

    fn peer(name: &str, k: u8, handshake: Option<i64>, tx: u64, rx: u64) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            kind: PeerKind::Node,
            public_key: WgKey([k; 32]),
            endpoint: Some("203.0.113.20:51820".into()),
            configured_endpoint: Some("203.0.113.20:51820".into()),
            allowed_ips: vec![],
            latest_handshake: handshake,
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    fn local(peers: Vec<PeerStatus>, firewall: Verdict) -> Local {
        Local {
            status: status(peers),
            listen_port: 51820,
            firewall,
            published: None,
        }
    }

    fn only(r: &Report) -> &Finding {
        assert_eq!(r.findings.len(), 1, "{r:?}");
        &r.findings[0]
    }

    #[test]
    fn peers_with_a_recent_handshake_are_not_diagnosed() {
        let r = diagnose(
            &local(
                vec![
                    peer("hel-1", 1, Some(NOW - 30), 10, 10),
                    peer("par-1", 2, None, 148, 0),
                ],
                Verdict::Open,
            ),
            false,
        );
        assert_eq!(r.healthy, 1);
        assert_eq!(only(&r).peer, "par-1");
    }

    #[test]
    fn a_local_drop_of_the_listen_port_is_the_cause_and_names_port_and_node() {
        let fw = Verdict::Drops {
            by: "inet filter input: udp dport 51820 drop".into(),
        };
        let r = diagnose(&local(vec![peer("hel-1", 1, None, 148, 0)], fw), false);
        let f = only(&r);
        assert_eq!(f.cause, Cause::LocalFirewall);
        assert!(
            f.advice.contains("fra-1's firewall drops UDP 51820"),
            "{}",
            f.advice
        );
        assert!(f.advice.contains("Open UDP 51820 on fra-1"), "{}", f.advice);
    }

    #[test]
    fn sent_without_answer_asks_to_open_the_port_on_the_peers_firewall() {
        let r = diagnose(
            &local(vec![peer("hel-1", 1, None, 148, 0)], Verdict::Open),
            false,
        );
        let f = only(&r);
        assert_eq!(f.cause, Cause::NoAnswer);
        assert!(
            f.advice.contains("Open UDP 51820 on hel-1's firewall"),
            "{}",
            f.advice
        );
        assert_eq!(f.endpoint_source, EndpointSource::Configured);
    }

    #[test]
    fn no_endpoint_on_a_node_points_at_nat() {
        let mut p = peer("par-1", 2, None, 0, 0);
        p.endpoint = None;
        p.configured_endpoint = None;
        let f = diagnose(&local(vec![p], Verdict::Open), false).findings[0].clone();
        assert_eq!(f.cause, Cause::NoEndpoint);
        assert!(f.advice.contains("Nodes behind NAT"), "{}", f.advice);
        assert_eq!(f.endpoint_source, EndpointSource::None);
    }

    #[test]
    fn an_endpoint_other_than_the_configured_one_has_roamed() {
        let mut p = peer("par-1", 2, Some(NOW - 4000), 500, 300);
        p.endpoint = Some("198.51.100.7:40001".into());
        let f = diagnose(&local(vec![p], Verdict::Open), false).findings[0].clone();
        assert_eq!(f.endpoint_source, EndpointSource::Roamed);
        assert_eq!(f.cause, Cause::WentAway);
        assert!(f.advice.contains("may have moved"), "{}", f.advice);
    }

    #[test]
    fn keys_are_checked_against_the_registry() {
        let mut me = MeshNode::new("fra-1");
        me.key = Some(WgKey([8; 32]));
        let mut hel = MeshNode::new("hel-1");
        hel.key = Some(WgKey([1; 32]));
        let mut l = local(vec![peer("hel-1", 1, None, 148, 0)], Verdict::Open);
        l.published = Some(Published::new(&[me.clone(), hel.clone()], &[]));
        let f = diagnose(&l, false).findings[0].clone();
        assert_eq!(f.cause, Cause::OwnKeyMismatch);
        assert_eq!(f.peer_key, KeyCheck::Matches);
        me.key = Some(WgKey([9; 32]));
        hel.key = Some(WgKey([7; 32]));
        l.published = Some(Published::new(&[me, hel], &[]));
        let f = diagnose(&l, false).findings[0].clone();
        assert_eq!(f.own_key, KeyCheck::Matches);
        assert_eq!(f.cause, Cause::PeerKeyMismatch);
    }

    #[test]
    fn packets_in_without_handshake_point_at_a_stale_key_and_silence_at_idleness() {
        let f = diagnose(
            &local(vec![peer("hel-1", 1, None, 0, 92)], Verdict::Open),
            false,
        )
        .findings[0]
            .clone();
        assert_eq!(f.cause, Cause::NoHandshake);
        let f = diagnose(
            &local(vec![peer("hel-1", 1, None, 0, 0)], Verdict::Open),
            false,
        )
        .findings[0]
            .clone();
        assert_eq!(f.cause, Cause::Idle);
    }

    #[test]
    fn the_report_is_json_with_cause_and_advice() {
        let r = diagnose(
            &local(vec![peer("hel-1", 1, None, 148, 0)], Verdict::Open),
            false,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["findings"][0]["cause"], "no-answer");
        assert_eq!(v["firewall"]["verdict"], "open");
        assert!(render(&r).contains("cause      fra-1 sent 148 B to hel-1"));
    }
}
