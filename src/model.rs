//! Validated domain values: node names, WireGuard keys, endpoints, mesh nodes and external peers.
//!
//! Pure data. Depends only on `std`, `ipnetwork`, `base64` and `serde`; never on Kubernetes,
//! netlink or async code. Every string from outside is parsed once into one of these types.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use base64::Engine as _;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// Name of a Kubernetes Node (or of a Peer resource).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeName(pub String);

impl NodeName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeName {
    fn from(s: &str) -> Self {
        NodeName(s.to_owned())
    }
}

/// A WireGuard key (public or preshared): 32 bytes, written as standard base64.
///
/// Ordered like its bytes (compared as two big-endian words, which is faster than `memcmp`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WgKey(pub [u8; 32]);

impl WgKey {
    fn words(&self) -> (u128, u128) {
        let mut hi = [0u8; 16];
        let mut lo = [0u8; 16];
        hi.copy_from_slice(&self.0[..16]);
        lo.copy_from_slice(&self.0[16..]);
        (u128::from_be_bytes(hi), u128::from_be_bytes(lo))
    }
}

impl Ord for WgKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.words().cmp(&other.words())
    }
}

impl PartialOrd for WgKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Why a string is not a WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not standard base64.
    #[error("not base64: {0}")]
    Base64(String),
    /// The decoded key does not have 32 bytes.
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
}

impl FromStr for WgKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(WgKey(arr))
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

impl Serialize for WgKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A WireGuard endpoint: an IP socket address or a DNS name with a port.
///
/// DNS names are kept as names: resolving them is I/O and happens in the reconciler.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// A literal IPv4 or IPv6 address and port.
    Addr(SocketAddr),
    /// A DNS name (RFC 1123 subdomain) and port.
    Dns {
        /// The host name.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

/// Why a string is not an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No `:port` part, or an IPv6 address without brackets.
    #[error("expected host:port, [ipv6]:port or dns-name:port")]
    Shape,
    /// The port is not a number from 1 to 65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    /// The host is neither an IP address nor a valid DNS name.
    #[error("host {0:?} is neither an IP address nor a valid DNS name")]
    Host(String),
}

impl Endpoint {
    /// The UDP port.
    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Addr(a) => a.port(),
            Endpoint::Dns { port, .. } => *port,
        }
    }

    /// The IP address, when the endpoint is literal.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Endpoint::Addr(a) => Some(a.ip()),
            Endpoint::Dns { .. } => None,
        }
    }

    /// Whether Kilo's leader election would count this endpoint as public.
    ///
    /// Kilo's rule: an IPv4 address outside 10/8, 172.16/12 and 192.168/16 is public; an IPv6
    /// address outside fd00::/16 is public. A DNS name counts as public here (Kilo resolves it
    /// first; a name published for a node is in practice a public one).
    pub fn is_public(&self) -> bool {
        match self {
            Endpoint::Addr(a) => is_public_ip(a.ip()),
            Endpoint::Dns { .. } => true,
        }
    }
}

/// Kilo's notion of a public address (see [`Endpoint::is_public`]).
pub fn is_public_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(o[0] == 10 || (o[0] == 172 && (o[1] & 0xf0) == 0x10) || (o[0] == 192 && o[1] == 168))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_ip(IpAddr::V4(v4));
            }
            let o = v6.octets();
            !(o[0] == 0xfd && o[1] == 0x00)
        }
    }
}

/// Whether `s` is a DNS-1123 subdomain (lowercase letters, digits, '-' and '.').
pub fn is_dns1123_subdomain(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    s.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    })
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(EndpointError::Port("0".into()));
            }
            return Ok(Endpoint::Addr(normalize_socket(addr)));
        }
        let (host, port) = s.rsplit_once(':').ok_or(EndpointError::Shape)?;
        let port_num: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| EndpointError::Port(port.to_owned()))?;
        if host.contains(':') || host.starts_with('[') {
            // An IPv6 literal that did not parse above: bad address or missing brackets.
            let inner = host.trim_start_matches('[').trim_end_matches(']');
            if inner.parse::<IpAddr>().is_ok() && !host.starts_with('[') {
                return Err(EndpointError::Shape);
            }
            return Err(EndpointError::Host(host.to_owned()));
        }
        if host.parse::<IpAddr>().is_ok() {
            // Unreachable in practice: a valid IP with a valid port parses as a SocketAddr.
            return Err(EndpointError::Shape);
        }
        if !is_dns1123_subdomain(host) || host.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
            return Err(EndpointError::Host(host.to_owned()));
        }
        Ok(Endpoint::Dns {
            host: host.to_owned(),
            port: port_num,
        })
    }
}

fn normalize_socket(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()),
        },
        v4 => v4,
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How finely the mesh is cut into WireGuard segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One segment per location; each location's leader holds the tunnels to other locations.
    Location,
    /// One segment per node: every node holds a tunnel to every other node.
    Full,
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "location" => Ok(Granularity::Location),
            "full" => Ok(Granularity::Full),
            other => Err(format!("{other:?} is not a granularity (location or full)")),
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Granularity::Location => "location",
            Granularity::Full => "full",
        })
    }
}

/// A cluster node as the mesh sees it, after its annotations were validated.
///
/// Fields that a node publishes itself (key, endpoint, …) are `Option`: a node that has not
/// published them yet is valid but not ready, and the engine leaves it out with a reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshNode {
    /// The Node's name.
    pub name: NodeName,
    /// Logical location (annotation, else topology label, else empty).
    pub location: String,
    /// WireGuard public key.
    pub key: Option<WgKey>,
    /// WireGuard endpoint (force-endpoint wins over the published one).
    pub endpoint: Option<Endpoint>,
    /// Internal (private) IP with its prefix length; `None` when the node has none.
    pub internal_ip: Option<IpNetwork>,
    /// Set when `force-internal-ip` is `"-"` or empty: the node has no internal IP on purpose.
    pub no_internal_ip: bool,
    /// Pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`).
    pub pod_cidrs: Vec<IpNetwork>,
    /// Mesh IP the node published (informational: the engine allocates mesh IPs itself).
    pub wireguard_ip: Option<IpNetwork>,
    /// Persistent keepalive in seconds (0 = off); set on nodes behind NAT.
    pub persistent_keepalive: u16,
    /// Whether the node volunteers to lead its location.
    pub leader: bool,
    /// Extra CIDRs routable inside this node's location (e.g. a printer's network).
    pub allowed_location_ips: Vec<IpNetwork>,
    /// Unix time of the node's last heartbeat, if it published one.
    pub last_seen: Option<i64>,
    /// Endpoints this node observed for NATed peers, by their public key.
    pub discovered_endpoints: BTreeMap<WgKey, SocketAddr>,
    /// Segment leaders (by public key) this node's agent tried and failed to reach directly
    /// (`wiremesh.io/unreachable`). `None` when its agent does not report (Kilo, or not yet):
    /// only nodes that report take part in relays.
    #[serde(default)]
    pub unreachable: Option<BTreeSet<WgKey>>,
    /// Nodes of this node's location (by name) whose forwarding this node's agent found broken
    /// while they led it (`wiremesh.io/forwarding-failed`). `None` when its agent does not
    /// report (Kilo, or not yet): a location fails over only when all its nodes report.
    #[serde(default)]
    pub forwarding_failed: Option<BTreeSet<NodeName>>,
    /// Granularity the node's agent published.
    pub granularity: Option<Granularity>,
    /// Unix time the Node object was created (`metadata.creationTimestamp`, set by the API
    /// server), when known. Settles which of two nodes claiming one key or pod CIDR came first.
    pub created: Option<i64>,
}

impl MeshNode {
    /// A node with only a name and everything else empty.
    pub fn new(name: impl Into<String>) -> Self {
        MeshNode {
            name: NodeName(name.into()),
            location: String::new(),
            key: None,
            endpoint: None,
            internal_ip: None,
            no_internal_ip: false,
            pod_cidrs: Vec::new(),
            wireguard_ip: None,
            persistent_keepalive: 0,
            leader: false,
            allowed_location_ips: Vec::new(),
            last_seen: None,
            discovered_endpoints: BTreeMap::new(),
            unreachable: None,
            forwarding_failed: None,
            granularity: None,
            created: None,
        }
    }
}

/// A WireGuard peer outside the cluster (Kilo's `Peer` resource): a laptop, another cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeer {
    /// The Peer resource's name.
    pub name: NodeName,
    /// The peer's public key.
    pub key: WgKey,
    /// CIDRs routed to this peer.
    pub allowed_ips: Vec<IpNetwork>,
    /// Where the peer can be reached, if it has a fixed address.
    pub endpoint: Option<Endpoint>,
    /// The peer's own persistent keepalive in seconds (0 = off).
    pub persistent_keepalive: u16,
    /// Optional preshared key.
    pub preshared_key: Option<WgKey>,
}

/// Normalize a CIDR: zero the host bits (`10.1.2.3/24` → `10.1.2.0/24`).
pub fn network_of(net: IpNetwork) -> IpNetwork {
    // `IpNetwork::new` only fails for a prefix longer than the address; `net` already has a valid one.
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

/// The single-address network of `ip` (`/32` or `/128`).
pub fn host_net(ip: IpAddr) -> IpNetwork {
    IpNetwork::from(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_through_base64() {
        let k: WgKey = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE="
            .parse()
            .unwrap();
        assert_eq!(k.0[31], 1);
        assert_eq!(
            k.to_string(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE="
        );
    }

    #[test]
    fn key_order_is_byte_order() {
        let mut keys: Vec<WgKey> = (0..64u8)
            .map(|i| {
                let mut k = [0u8; 32];
                k[(i as usize * 7) % 32] = i.wrapping_mul(37);
                k[31 - (i as usize % 32)] ^= i;
                WgKey(k)
            })
            .collect();
        keys.sort();
        assert!(keys.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn key_of_wrong_length_is_rejected() {
        assert_eq!("AAAA".parse::<WgKey>(), Err(KeyError::Length(3)));
        assert!(matches!(
            "not*base64".parse::<WgKey>(),
            Err(KeyError::Base64(_))
        ));
    }

    #[test]
    fn endpoint_parses_ipv4_ipv6_and_dns() {
        assert_eq!(
            "1.2.3.4:51820".parse::<Endpoint>().unwrap(),
            Endpoint::Addr("1.2.3.4:51820".parse().unwrap())
        );
        assert_eq!(
            "[2001:db8::1]:51820".parse::<Endpoint>().unwrap().ip(),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            "node.example.com:51820".parse::<Endpoint>().unwrap(),
            Endpoint::Dns {
                host: "node.example.com".into(),
                port: 51820
            }
        );
    }

    #[test]
    fn endpoint_rejects_bad_shapes() {
        assert_eq!("1.2.3.4".parse::<Endpoint>(), Err(EndpointError::Shape));
        assert!(matches!(
            "1.2.3.4:0".parse::<Endpoint>(),
            Err(EndpointError::Port(_))
        ));
        assert!(matches!(
            "1.2.3.4:99999".parse::<Endpoint>(),
            Err(EndpointError::Port(_))
        ));
        assert!(matches!(
            "Bad_Host:1".parse::<Endpoint>(),
            Err(EndpointError::Host(_))
        ));
        assert!(matches!(
            "1.2.3.999:1".parse::<Endpoint>(),
            Err(EndpointError::Host(_))
        ));
        assert_eq!(
            "2001:db8::1:51820".parse::<Endpoint>(),
            Err(EndpointError::Shape)
        );
    }

    #[test]
    fn public_follows_kilo_rfc1918_rule() {
        for (ip, public) in [
            ("10.0.0.1", false),
            ("172.16.0.1", false),
            ("172.32.0.1", true),
            ("192.168.1.1", false),
            ("8.8.8.8", true),
            ("fd00::1", false),
            ("fd01::1", true),
            ("2001:db8::1", true),
        ] {
            assert_eq!(is_public_ip(ip.parse().unwrap()), public, "{ip}");
        }
    }
}
