//! Kilo's `Peer` resource (`kilo.squat.ai/v1alpha1`, kind `Peer`) and its translation into a
//! validated [`MeshPeer`].
//!
//! Pure: depends on serde, `k8s-openapi`'s `ObjectMeta`, the model and diagnostics.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostic;
use crate::model::{Endpoint, MeshPeer, NodeName, WgKey, is_dns1123_subdomain};
use crate::registry::annotations::parse_cidr;

/// The API group of the Peer resource.
pub const PEER_GROUP: &str = "kilo.squat.ai";
/// The API version of the Peer resource.
pub const PEER_VERSION: &str = "v1alpha1";

/// A Peer object as stored in Kubernetes or in a file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerResource {
    /// `kilo.squat.ai/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// `Peer`.
    #[serde(default)]
    pub kind: String,
    /// Standard object metadata; `name` identifies the peer.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The peer's WireGuard settings.
    pub spec: PeerSpec,
}

/// The `spec` of a Peer, with Kilo's field names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// CIDRs routed to the peer.
    #[serde(default, rename = "allowedIPs")]
    pub allowed_ips: Vec<String>,
    /// Where the peer can be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<PeerEndpoint>,
    /// Keepalive in seconds that the peer itself uses.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub persistent_keepalive: i64,
    /// Optional preshared key, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preshared_key: String,
    /// The peer's public key, base64.
    #[serde(default)]
    pub public_key: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A Peer's endpoint: a DNS name or an IP, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerEndpoint {
    /// The host, as a DNS name or IP.
    #[serde(rename = "dnsOrIP")]
    pub dns_or_ip: DnsOrIp,
    /// The UDP port.
    pub port: u32,
}

/// Either a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DnsOrIp {
    /// A DNS name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dns: String,
    /// An IP address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
}

/// Translate a Peer resource into a [`MeshPeer`], reporting every invalid field.
///
/// Kilo drops a Peer that fails validation; so do we, but we say which field and why.
pub fn parse_peer(p: &PeerResource) -> Result<MeshPeer, Vec<Diagnostic>> {
    let name = p.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(vec![Diagnostic::peer(
            "<unnamed>",
            Some("metadata.name"),
            "the Peer has no name",
        )]);
    }
    let mut errs = Vec::new();
    let mut bad =
        |field: &str, problem: String| errs.push(Diagnostic::peer(&name, Some(field), problem));

    let key = match p.spec.public_key.parse::<WgKey>() {
        Ok(k) => Some(k),
        Err(e) => {
            bad(
                "spec.publicKey",
                format!("{:?} is not a WireGuard public key: {e}", p.spec.public_key),
            );
            None
        }
    };
    let mut allowed_ips = Vec::new();
    for a in &p.spec.allowed_ips {
        match parse_cidr(a) {
            Ok(n) => allowed_ips.push(n),
            Err(e) => bad("spec.allowedIPs", e),
        }
    }
    if p.spec.allowed_ips.is_empty() {
        bad(
            "spec.allowedIPs",
            "a peer needs at least one allowed IP".into(),
        );
    }
    let mut endpoint = None;
    if let Some(ep) = &p.spec.endpoint {
        let port = u16::try_from(ep.port).ok().filter(|p| *p != 0);
        match port {
            None => bad(
                "spec.endpoint.port",
                format!("{} is not a UDP port from 1 to 65535", ep.port),
            ),
            Some(port) => {
                let DnsOrIp { dns, ip } = &ep.dns_or_ip;
                if !dns.is_empty() {
                    if is_dns1123_subdomain(dns) {
                        endpoint = Some(Endpoint::Dns {
                            host: dns.clone(),
                            port,
                        });
                    } else {
                        bad(
                            "spec.endpoint.dnsOrIP.dns",
                            format!("{dns:?} is not a valid DNS name"),
                        );
                    }
                } else if !ip.is_empty() {
                    match ip.parse::<std::net::IpAddr>() {
                        Ok(addr) => {
                            endpoint = Some(Endpoint::Addr(std::net::SocketAddr::new(addr, port)))
                        }
                        Err(_) => bad(
                            "spec.endpoint.dnsOrIP.ip",
                            format!("{ip:?} is not an IP address"),
                        ),
                    }
                } else {
                    bad(
                        "spec.endpoint.dnsOrIP",
                        "an endpoint needs a DNS name or an IP address".into(),
                    );
                }
            }
        }
    }
    let persistent_keepalive = match u16::try_from(p.spec.persistent_keepalive) {
        Ok(v) => v,
        Err(_) => {
            bad(
                "spec.persistentKeepalive",
                format!(
                    "{} is not a number of seconds from 0 to 65535",
                    p.spec.persistent_keepalive
                ),
            );
            0
        }
    };
    let preshared_key = if p.spec.preshared_key.is_empty() {
        None
    } else {
        match p.spec.preshared_key.parse::<WgKey>() {
            Ok(k) => Some(k),
            Err(e) => {
                bad("spec.presharedKey", format!("not a WireGuard key: {e}"));
                None
            }
        }
    };
    match key {
        Some(key) if errs.is_empty() => Ok(MeshPeer {
            name: NodeName(name),
            key,
            allowed_ips,
            endpoint,
            persistent_keepalive,
            preshared_key,
        }),
        _ => Err(errs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(yaml: &str) -> PeerResource {
        crate::yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn kilo_peer_yaml_is_read() {
        let p = parse_peer(&peer(
            r#"
apiVersion: kilo.squat.ai/v1alpha1
kind: Peer
metadata: {name: laptop}
spec:
  allowedIPs: [10.5.0.1/32]
  publicKey: HR8Kn0ISt4PBJ0jOYkiS3cc4Q6vKv9Ob2Kb3Ua0cWT4=
  persistentKeepalive: 10
  endpoint: {dnsOrIP: {ip: 1.2.3.4}, port: 51820}
"#,
        ))
        .unwrap();
        assert_eq!(p.name.as_str(), "laptop");
        assert_eq!(p.allowed_ips, vec!["10.5.0.1/32".parse().unwrap()]);
        assert_eq!(p.endpoint.unwrap().to_string(), "1.2.3.4:51820");
        assert_eq!(p.persistent_keepalive, 10);
    }

    #[test]
    fn invalid_peer_fields_are_each_reported() {
        let errs = parse_peer(&peer(
            r#"
metadata: {name: bad}
spec:
  allowedIPs: [nope]
  publicKey: xyz
  endpoint: {dnsOrIP: {dns: Not_A_Name}, port: 70000}
"#,
        ))
        .unwrap_err();
        let fields: Vec<_> = errs.iter().map(|d| d.key.clone().unwrap()).collect();
        assert_eq!(
            fields,
            vec!["spec.publicKey", "spec.allowedIPs", "spec.endpoint.port"]
        );
    }
}
