//! `meshctl peer`: a Kilo `Peer` resource built from command-line flags and checked with the
//! agent's own parser ([`parse_peer`]), and the `peer list` table.
//!
//! Pure: no I/O (the binary reads the preshared key file; [`super::cluster`] talks to the API
//! server). Depends on the model, the Peer resource and its parser.

use crate::model::{Endpoint, is_dns1123_subdomain};
use crate::registry::annotations::parse_cidr;
use crate::registry::peer::{
    DnsOrIp, PEER_GROUP, PEER_VERSION, PeerEndpoint, PeerResource, PeerSpec, parse_peer,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The flags of `meshctl peer add`, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewPeer {
    /// The Peer's name.
    pub name: String,
    /// `--public-key`.
    pub public_key: String,
    /// `--allowed-ips`, one entry per CIDR.
    pub allowed_ips: Vec<String>,
    /// `--endpoint`, `host:port`.
    pub endpoint: Option<String>,
    /// `--persistent-keepalive`, seconds.
    pub persistent_keepalive: i64,
    /// The preshared key read from `--preshared-key-file`, base64.
    pub preshared_key: Option<String>,
}

/// Why `meshctl peer add` refuses its flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerArgError {
    /// The name is not a DNS-1123 subdomain, so the API server would refuse it.
    #[error(
        "{0:?} is not a valid peer name: lowercase letters, digits, '-' and '.', starting and \
         ending with a letter or digit, at most 253 characters"
    )]
    Name(String),
    /// One or more flags hold invalid values.
    #[error("peer {name}: {}", .problems.join("; "))]
    Invalid {
        /// The peer's name.
        name: String,
        /// One `--flag: problem` per invalid value, in the order of the flags.
        problems: Vec<String>,
    },
}

/// The flags in the order `peer add --help` lists them, with the Peer fields they fill.
const FLAGS: &[(&str, &str)] = &[
    ("spec.publicKey", "--public-key"),
    ("spec.allowedIPs", "--allowed-ips"),
    ("spec.endpoint", "--endpoint"),
    ("spec.persistentKeepalive", "--persistent-keepalive"),
    ("spec.presharedKey", "--preshared-key-file"),
];

/// The flag that sets Peer field `key` (`spec.endpoint.port` → `--endpoint`), and its rank.
fn flag_of(key: Option<&str>) -> (usize, &'static str) {
    let key = key.unwrap_or_default();
    FLAGS
        .iter()
        .enumerate()
        .find(|(_, (field, _))| key.starts_with(field))
        .map_or((FLAGS.len(), "NAME"), |(i, (_, flag))| (i, *flag))
}

/// A model endpoint as the Peer resource spells it.
fn peer_endpoint(ep: &Endpoint) -> PeerEndpoint {
    let dns_or_ip = match ep {
        Endpoint::Addr(a) => DnsOrIp {
            dns: String::new(),
            ip: a.ip().to_string(),
        },
        Endpoint::Dns { host, .. } => DnsOrIp {
            dns: host.clone(),
            ip: String::new(),
        },
    };
    PeerEndpoint {
        dns_or_ip,
        port: u32::from(ep.port()),
    }
}

/// The Peer resource `peer add` creates, validated exactly as the agent will read it.
///
/// Allowed IPs are stored in canonical form (`10.5.0.1` becomes `10.5.0.1/32`, host bits are
/// cleared), which is also how Kilo's agent reads them. Every invalid value is reported, each
/// with the flag that gave it.
pub fn build(req: &NewPeer) -> Result<PeerResource, PeerArgError> {
    if !is_dns1123_subdomain(&req.name) {
        return Err(PeerArgError::Name(req.name.clone()));
    }
    let mut problems: Vec<(usize, String)> = Vec::new();
    let endpoint = match &req.endpoint {
        None => None,
        Some(text) => match text.parse::<Endpoint>() {
            Ok(ep) => Some(peer_endpoint(&ep)),
            Err(e) => {
                let (rank, flag) = flag_of(Some("spec.endpoint"));
                problems.push((rank, format!("{flag}: {text:?} is not an endpoint: {e}")));
                None
            }
        },
    };
    let res = PeerResource {
        api_version: format!("{PEER_GROUP}/{PEER_VERSION}"),
        kind: "Peer".to_owned(),
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            ..ObjectMeta::default()
        },
        spec: PeerSpec {
            // Invalid entries are kept as given, for the parser below to name them.
            allowed_ips: req
                .allowed_ips
                .iter()
                .map(|a| parse_cidr(a).map_or_else(|_| a.clone(), |n| n.to_string()))
                .collect(),
            endpoint,
            persistent_keepalive: req.persistent_keepalive,
            preshared_key: req.preshared_key.clone().unwrap_or_default(),
            public_key: req.public_key.trim().to_owned(),
        },
    };
    if let Err(diagnostics) = parse_peer(&res) {
        for d in diagnostics {
            let (rank, flag) = flag_of(d.key.as_deref());
            problems.push((rank, format!("{flag}: {}", d.problem)));
        }
    }
    if problems.is_empty() {
        return Ok(res);
    }
    problems.sort_by_key(|(rank, _)| *rank);
    Err(PeerArgError::Invalid {
        name: req.name.clone(),
        problems: problems.into_iter().map(|(_, p)| p).collect(),
    })
}

/// A Peer's endpoint as `host:port` (`[ipv6]:port`), or `<none>`.
pub fn endpoint_text(ep: Option<&PeerEndpoint>) -> String {
    let Some(ep) = ep else {
        return "<none>".to_owned();
    };
    let DnsOrIp { dns, ip } = &ep.dns_or_ip;
    if !dns.is_empty() {
        format!("{dns}:{}", ep.port)
    } else if ip.contains(':') {
        format!("[{ip}]:{}", ep.port)
    } else {
        format!("{ip}:{}", ep.port)
    }
}

/// `peer list`: a header, then one aligned row per Peer (name, public key, allowed IPs,
/// endpoint), as stored.
pub fn render_table(peers: &[PeerResource]) -> String {
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "PUBLIC KEY".to_owned(),
        "ALLOWED IPS".to_owned(),
        "ENDPOINT".to_owned(),
    ]];
    for p in peers {
        let ips = if p.spec.allowed_ips.is_empty() {
            "<none>".to_owned()
        } else {
            p.spec.allowed_ips.join(",")
        };
        rows.push(vec![
            p.metadata.name.clone().unwrap_or_default(),
            p.spec.public_key.clone(),
            ips,
            endpoint_text(p.spec.endpoint.as_ref()),
        ]);
    }
    super::table(&rows)
}

/// The Peer as YAML, as `peer add --dry-run` prints it.
pub fn render_yaml(peer: &PeerResource) -> Result<String, crate::yaml::YamlError> {
    crate::yaml::to_string(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "uN6GxGhVSEBwdGc3biyYBmAKCFyywS0JuWcOHUm9RHk=";

    fn laptop() -> NewPeer {
        NewPeer {
            name: "laptop".into(),
            public_key: KEY.into(),
            allowed_ips: vec!["10.5.0.1/32".into()],
            ..NewPeer::default()
        }
    }

    fn problems(req: &NewPeer) -> Vec<String> {
        match build(req) {
            Err(PeerArgError::Invalid { problems, .. }) => problems,
            other => panic!("expected invalid flags, got {other:?}"),
        }
    }

    #[test]
    fn valid_flags_build_a_kilo_peer_the_agent_accepts() {
        let mut req = laptop();
        req.allowed_ips = vec!["10.5.0.1".into(), "10.6.0.9/24".into(), "fd00::1".into()];
        req.endpoint = Some("vpn.example.net:51820".into());
        req.persistent_keepalive = 25;
        let res = build(&req).expect("valid");
        assert_eq!(res.api_version, "kilo.squat.ai/v1alpha1");
        assert_eq!(res.kind, "Peer");
        assert_eq!(
            res.spec.allowed_ips,
            ["10.5.0.1/32", "10.6.0.0/24", "fd00::1/128"]
        );
        let p = parse_peer(&res).expect("the agent's parser accepts it");
        assert_eq!(p.persistent_keepalive, 25);
        assert_eq!(
            p.endpoint.map(|e| e.to_string()).as_deref(),
            Some("vpn.example.net:51820")
        );
    }

    #[test]
    fn dry_run_yaml_is_a_minimal_kilo_peer() {
        let mut req = laptop();
        req.endpoint = Some("[2001:db8::1]:51820".into());
        let yaml = render_yaml(&build(&req).expect("valid")).expect("yaml");
        assert_eq!(
            yaml,
            format!(
                "apiVersion: kilo.squat.ai/v1alpha1\nkind: Peer\nmetadata:\n  name: laptop\n\
                 spec:\n  allowedIPs:\n  - 10.5.0.1/32\n  endpoint:\n    dnsOrIP:\n      \
                 ip: 2001:db8::1\n    port: 51820\n  publicKey: {KEY}\n"
            )
        );
    }

    #[test]
    fn bad_public_key_is_named_with_its_flag() {
        let mut req = laptop();
        req.public_key = "not-a-key".into();
        let p = problems(&req);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("--public-key: \"not-a-key\" is not a WireGuard public key"),
            "{p:?}"
        );
    }

    #[test]
    fn short_public_key_says_how_many_bytes() {
        let mut req = laptop();
        req.public_key = "AAAA".into();
        let p = problems(&req);
        assert!(p[0].contains("decodes to 3 bytes"), "{p:?}");
    }

    #[test]
    fn bad_cidr_is_named_with_its_flag_and_value() {
        let mut req = laptop();
        req.allowed_ips = vec!["10.5.0.1/32".into(), "10.5.0.300/32".into()];
        let p = problems(&req);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("--allowed-ips: \"10.5.0.300/32\""),
            "{p:?}"
        );
    }

    #[test]
    fn empty_allowed_ips_are_refused() {
        let mut req = laptop();
        req.allowed_ips = vec![];
        assert_eq!(
            problems(&req),
            ["--allowed-ips: a peer needs at least one allowed IP"]
        );
    }

    #[test]
    fn bad_endpoints_are_refused_with_the_reason() {
        for (ep, want) in [
            ("vpn.example.net", "expected host:port"),
            ("vpn.example.net:0", "port \"0\""),
            ("1.2.3.4:70000", "port \"70000\""),
            ("Bad_Host:51820", "host \"Bad_Host\""),
            ("2001:db8::1:51820", "expected host:port"),
        ] {
            let mut req = laptop();
            req.endpoint = Some(ep.into());
            let p = problems(&req);
            assert_eq!(p.len(), 1, "{ep}: {p:?}");
            assert!(
                p[0].starts_with(&format!("--endpoint: {ep:?} is not an endpoint"))
                    && p[0].contains(want),
                "{ep}: {p:?}"
            );
        }
    }

    #[test]
    fn keepalive_out_of_range_is_refused() {
        for k in [-1, 65536] {
            let mut req = laptop();
            req.persistent_keepalive = k;
            let p = problems(&req);
            assert!(p[0].starts_with("--persistent-keepalive: "), "{p:?}");
        }
    }

    #[test]
    fn bad_preshared_key_is_refused_without_echoing_it() {
        let mut req = laptop();
        req.preshared_key = Some("c2VjcmV0".into());
        let p = problems(&req);
        assert!(p[0].starts_with("--preshared-key-file: "), "{p:?}");
        assert!(!p[0].contains("c2VjcmV0"), "the secret is echoed: {p:?}");
    }

    #[test]
    fn invalid_names_are_refused_before_anything_else() {
        for name in ["Laptop", "", "-x", "a_b"] {
            let mut req = laptop();
            req.name = name.into();
            req.public_key = "bad".into();
            assert_eq!(build(&req), Err(PeerArgError::Name(name.into())));
        }
    }

    #[test]
    fn every_problem_is_reported_in_flag_order() {
        let req = NewPeer {
            name: "x".into(),
            public_key: "bad".into(),
            allowed_ips: vec!["nope".into()],
            endpoint: Some("h".into()),
            persistent_keepalive: -5,
            preshared_key: None,
        };
        let flags: Vec<String> = problems(&req)
            .iter()
            .map(|p| p.split(':').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            flags,
            [
                "--public-key",
                "--allowed-ips",
                "--endpoint",
                "--persistent-keepalive"
            ]
        );
        let msg = build(&req).expect_err("invalid").to_string();
        assert!(
            msg.starts_with("peer x: --public-key: ") && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn table_lists_name_key_ips_and_endpoint() {
        let mut a = build(&laptop()).expect("valid");
        a.spec.allowed_ips.push("10.5.1.0/24".into());
        let mut req = laptop();
        req.name = "router".into();
        req.endpoint = Some("[2001:db8::1]:51820".into());
        let b = build(&req).expect("valid");
        assert_eq!(
            render_table(&[a, b]),
            format!(
                "NAME    PUBLIC KEY                                    ALLOWED IPS              ENDPOINT\n\
                 laptop  {KEY}  10.5.0.1/32,10.5.1.0/24  <none>\n\
                 router  {KEY}  10.5.0.1/32              [2001:db8::1]:51820\n"
            )
        );
    }
}
