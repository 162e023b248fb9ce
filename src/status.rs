//! The agent's status document (`GET /status` of `wiremesh agent --listen`), and how its
//! readers judge a tunnel: handshake age and bytes in short words, and a health
//! (fresh, aging, new, stale) from the handshake age and what was sent.
//!
//! Shared by the agent (which serves it) and by `meshctl status` and `meshctl graph --live`
//! (which read it). Pure data and arithmetic: depends on `serde`, `ipnetwork` and the model.
//!
//! The field names are a contract, versioned by [`AgentStatus::version`]: fields may be added
//! within a version; removing, renaming or changing the meaning of one makes a new version.
//! Nothing secret is ever part of it: public keys only, no private or preshared key.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::model::WgKey;

/// The version of [`AgentStatus`] this build writes and reads.
pub const STATUS_VERSION: u32 = 1;

/// A tunnel whose latest handshake is younger than this (seconds) is fresh: WireGuard renews
/// the session of a tunnel in use every 120 s (`REKEY_AFTER_TIME`).
pub const FRESH_SECS: u64 = 120;

/// A tunnel whose latest handshake is older than this (seconds) is stale: WireGuard drops a
/// session 180 s after its handshake (`REJECT_AFTER_TIME`), and a tunnel that carries traffic
/// or keepalives has a new one well before; 120 s more leave room for lost handshake packets
/// and retries.
pub const STALE_AFTER_SECS: u64 = 300;

/// One agent's view of its node and tunnels, as `GET /status` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The document's version: [`STATUS_VERSION`].
    pub version: u32,
    /// This node's name.
    pub node: String,
    /// This node's WireGuard public key.
    pub public_key: Option<WgKey>,
    /// The agent's clock when it made the document, Unix seconds (ages are taken against it, so
    /// a reader's clock does not matter).
    pub time: i64,
    /// Whether the agent is ready: the registry listed everything once and a reconciliation
    /// succeeded.
    pub ready: bool,
    /// Whether this node leads its segment (holds the tunnels); `None` before the agent knows.
    pub leader: Option<bool>,
    /// Why the WireGuard device could not be read, when it could not (the peers then come from
    /// the desired state, without handshakes or counters).
    pub wireguard_error: Option<String>,
    /// The WireGuard peers, sorted by name, then key.
    pub peers: Vec<PeerStatus>,
    /// What holds this node's WireGuard listen port instead of its interface, in one line saying
    /// what to do; while set, the node's endpoint and mesh IP are not published. Absent from
    /// documents of agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port_conflict: Option<String>,
    /// Segment leaders this node cannot reach directly (no handshake completes): their traffic
    /// is relayed through a third segment when one reaches both (docs/nat.md). Absent when none,
    /// and from documents of agents that predate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<WgKey>,
}

/// What a WireGuard peer stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// Nodes of the cluster (one segment: a location's leader, or one node).
    Node,
    /// An external peer (a Kilo `Peer`).
    Peer,
    /// A peer on the device that the agent does not know (yet, or any more).
    Unknown,
}

/// One WireGuard peer of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The node(s) behind it, comma-separated (a segment's members), or the external peer's
    /// name; empty when unknown.
    pub name: String,
    /// Node, external peer or unknown.
    pub kind: PeerKind,
    /// Its public key.
    pub public_key: WgKey,
    /// Its endpoint as the device has it (after roaming: where its packets came from).
    pub endpoint: Option<String>,
    /// The endpoint the agent configured for it (published or discovered); differs from
    /// `endpoint` when the peer roamed. Absent from documents of agents that predate it, and
    /// when the agent configured none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_endpoint: Option<String>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNetwork>,
    /// Unix seconds of the latest handshake; `None`: never.
    pub latest_handshake: Option<i64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

impl PeerStatus {
    /// Seconds since the latest handshake at `now` (Unix seconds); `None`: never.
    pub fn age(&self, now: i64) -> Option<u64> {
        self.latest_handshake
            .map(|t| u64::try_from(now.saturating_sub(t)).unwrap_or(0))
    }

    /// The tunnel's health at `now`.
    pub fn health(&self, now: i64) -> Health {
        health(self.age(now), self.tx_bytes)
    }
}

/// How a tunnel is doing, judged from its latest handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// A handshake less than [`FRESH_SECS`] ago.
    Fresh,
    /// A handshake between [`FRESH_SECS`] and [`STALE_AFTER_SECS`] ago.
    Aging,
    /// No handshake yet, and nothing sent yet: the tunnel was not needed so far.
    New,
    /// No handshake for more than [`STALE_AFTER_SECS`], or none at all although packets were
    /// sent (the other side never answered). A tunnel without traffic or keepalive goes stale
    /// too: WireGuard only shakes hands when it has something to send.
    Stale,
}

impl Health {
    /// The lowercase word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Fresh => "fresh",
            Health::Aging => "aging",
            Health::New => "new",
            Health::Stale => "stale",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of a tunnel whose latest handshake is `age` seconds old (`None`: never) and to
/// which `tx_bytes` were sent.
pub fn health(age: Option<u64>, tx_bytes: u64) -> Health {
    match age {
        Some(a) if a < FRESH_SECS => Health::Fresh,
        Some(a) if a <= STALE_AFTER_SECS => Health::Aging,
        Some(_) => Health::Stale,
        None if tx_bytes > 0 => Health::Stale,
        None => Health::New,
    }
}

/// A handshake age in one short word: `12s`, `3m`, `5h`, `2d` (rounded down), `never`.
pub fn human_age(age: Option<u64>) -> String {
    match age {
        None => "never".to_owned(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m", s / 60),
        Some(s) if s < 86_400 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86_400),
    }
}

/// Bytes in a short human form (`512 B`, `1.5 KiB`, `3.2 MiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    // Display only: the precision lost converting to f64 does not show at one decimal.
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_handshake_age_and_what_was_sent() {
        assert_eq!(health(Some(0), 0), Health::Fresh);
        assert_eq!(health(Some(119), 5), Health::Fresh);
        assert_eq!(health(Some(120), 5), Health::Aging);
        assert_eq!(health(Some(300), 5), Health::Aging);
        assert_eq!(health(Some(301), 5), Health::Stale);
        assert_eq!(health(Some(301), 0), Health::Stale);
        // Never: new while nothing was sent, stale once the other side did not answer.
        assert_eq!(health(None, 0), Health::New);
        assert_eq!(health(None, 148), Health::Stale);
    }

    #[test]
    fn ages_are_one_short_word() {
        assert_eq!(human_age(None), "never");
        assert_eq!(human_age(Some(0)), "0s");
        assert_eq!(human_age(Some(59)), "59s");
        assert_eq!(human_age(Some(60)), "1m");
        assert_eq!(human_age(Some(3599)), "59m");
        assert_eq!(human_age(Some(3600)), "1h");
        assert_eq!(human_age(Some(86_399)), "23h");
        assert_eq!(human_age(Some(2 * 86_400 + 5)), "2d");
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn age_is_taken_against_the_documents_clock_and_never_negative() {
        let mut p = PeerStatus {
            name: "hel-1".into(),
            kind: PeerKind::Node,
            public_key: WgKey([1; 32]),
            endpoint: None,
            configured_endpoint: None,
            allowed_ips: Vec::new(),
            latest_handshake: Some(1000),
            rx_bytes: 0,
            tx_bytes: 0,
        };
        assert_eq!(p.age(1012), Some(12));
        assert_eq!(p.age(990), Some(0), "a handshake in the future is now");
        assert_eq!(p.health(1012), Health::Fresh);
        p.latest_handshake = None;
        assert_eq!(p.age(1012), None);
    }

    #[test]
    fn the_document_round_trips_with_its_contract_names() {
        let doc = AgentStatus {
            version: STATUS_VERSION,
            node: "fra-1".into(),
            public_key: Some(WgKey([2; 32])),
            time: 1_700_000_000,
            ready: true,
            leader: Some(true),
            wireguard_error: None,
            listen_port_conflict: None,
            unreachable: Vec::new(),
            peers: vec![PeerStatus {
                name: "hel-1".into(),
                kind: PeerKind::Node,
                public_key: WgKey([1; 32]),
                endpoint: Some("10.200.0.2:51820".into()),
                configured_endpoint: None,
                allowed_ips: vec!["10.42.1.0/24".parse().unwrap()],
                latest_handshake: Some(1_699_999_990),
                rx_bytes: 180,
                tx_bytes: 272,
            }],
        };
        let v = serde_json::to_value(&doc).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["leader"], true);
        let p = &v["peers"][0];
        assert_eq!(p["kind"], "node");
        assert_eq!(p["public_key"], WgKey([1; 32]).to_string());
        assert_eq!(p["allowed_ips"][0], "10.42.1.0/24");
        assert_eq!(p["latest_handshake"], 1_699_999_990);
        let back: AgentStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, doc);
    }
}
