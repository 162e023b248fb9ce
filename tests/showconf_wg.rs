//! `showconf` output is accepted by the real WireGuard tools: the rendered configuration goes
//! through `wg-quick strip` and `wg setconf` onto a wireguard-go interface in a throw-away
//! network namespace, and `wg show dump` must then list exactly the rendered interface and peers.
//!
//! Needs root, wireguard-go and wireguard-tools: run with `--features netns-tests`. The interface
//! is never brought up and the namespace has no route anywhere, so nothing is sent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use wiremesh::model::{Granularity, MeshNode, MeshPeer, NodeName, WgKey};
use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::registry::file::{load_nodes, load_peers};
use wiremesh::showconf::{node_config, peer_config};
use wiremesh::topology::{MeshOptions, build};

use crate::util::wg_netns::{WgNetns, require_root_and_tools, run};

/// One `[Peer]` as written in a config file or listed by `wg show dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    preshared_key: Option<String>,
    endpoint: Option<String>,
    allowed_ips: BTreeSet<String>,
    keepalive: Option<u16>,
}

/// The interface settings and peers (by public key) that `wg` can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    private_key: Option<String>,
    listen_port: Option<u16>,
    peers: BTreeMap<String, Peer>,
}

/// Read the keys `wg setconf` understands from wg-quick text; other keys and comments are skipped.
fn parse_conf(text: &str) -> Device {
    let mut dev = Device {
        private_key: None,
        listen_port: None,
        peers: BTreeMap::new(),
    };
    let mut current: Option<(String, Peer)> = None;
    let mut in_peer = false;
    let finish = |cur: &mut Option<(String, Peer)>, dev: &mut Device| {
        if let Some((k, p)) = cur.take() {
            assert!(dev.peers.insert(k, p).is_none(), "a peer appears twice");
        }
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            finish(&mut current, &mut dev);
            in_peer = line == "[Peer]";
            if in_peer {
                current = Some((
                    String::new(),
                    Peer {
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: BTreeSet::new(),
                        keepalive: None,
                    },
                ));
            }
            continue;
        }
        let (key, value) = line.split_once('=').expect("key = value");
        let (key, value) = (key.trim(), value.trim().to_owned());
        match (in_peer, key, current.as_mut()) {
            (false, "PrivateKey", _) => dev.private_key = Some(value),
            (false, "ListenPort", _) => dev.listen_port = Some(value.parse().unwrap()),
            (false, _, _) => {}
            (true, "PublicKey", Some((k, _))) => *k = value,
            (true, "PresharedKey", Some((_, p))) => p.preshared_key = Some(value),
            (true, "Endpoint", Some((_, p))) => p.endpoint = Some(value),
            (true, "AllowedIPs", Some((_, p))) => {
                p.allowed_ips = value.split(',').map(|s| s.trim().to_owned()).collect()
            }
            (true, "PersistentKeepalive", Some((_, p))) => {
                p.keepalive = Some(value.parse().unwrap()).filter(|k| *k > 0)
            }
            (true, other, _) => panic!("unexpected peer key {other}"),
        }
    }
    finish(&mut current, &mut dev);
    dev
}

/// Read `wg show IF dump`: the interface line, then one tab-separated line per peer.
fn parse_dump(text: &str) -> (String, Device) {
    let mut lines = text.lines();
    let first: Vec<&str> = lines.next().expect("interface line").split('\t').collect();
    let none = |s: &str| (s != "(none)" && s != "off").then(|| s.to_owned());
    let mut dev = Device {
        private_key: none(first[0]),
        listen_port: Some(first[2].parse().unwrap()),
        peers: BTreeMap::new(),
    };
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 8, "peer line {line:?}");
        dev.peers.insert(
            f[0].to_owned(),
            Peer {
                preshared_key: none(f[1]),
                endpoint: none(f[2]),
                allowed_ips: none(f[3])
                    .map(|s| s.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                keepalive: none(f[7]).map(|s| s.parse().unwrap()),
            },
        );
    }
    (first[1].to_owned(), dev)
}

/// A fresh key pair from `wg genkey` / `wg pubkey`.
fn key_pair() -> (WgKey, String) {
    let private = run("wg", &["genkey"], None);
    let public = run("wg", &["pubkey"], Some(&private));
    (private.trim().parse().unwrap(), public.trim().to_owned())
}

/// Write `text` as `<if>.conf`, strip it with wg-quick, load it with `wg setconf`, and check that
/// the device now holds exactly what the text says. Returns the stripped text.
fn apply_and_check(ns: &WgNetns, text: &str, public_key: &str) -> String {
    let path = ns.dir.path().join(format!("{}.conf", ns.ifname));
    std::fs::write(&path, text).unwrap();
    let stripped = run("wg-quick", &["strip", path.to_str().unwrap()], None);
    // strip drops the wg-quick-only keys, keeps comment lines (wg ignores them) and the rest.
    assert!(!stripped.contains("Address"), "{stripped}");
    assert_eq!(
        stripped.lines().filter(|l| l.starts_with('#')).count(),
        text.lines().filter(|l| l.starts_with('#')).count(),
        "{stripped}"
    );
    ns.wg(&["setconf", &ns.ifname, "/dev/stdin"], Some(&stripped));
    let (shown_public, mut shown) = parse_dump(&ns.wg(&["show", &ns.ifname, "dump"], None));
    let expected = parse_conf(text);
    assert_eq!(shown_public, public_key);
    if expected.listen_port.is_none() {
        shown.listen_port = None; // wg picked a port of its own.
    }
    assert_eq!(shown, expected, "rendered:\n{text}");
    stripped
}

fn example(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file)
}

fn three_clouds() -> Vec<MeshNode> {
    let loaded = load_nodes(&example("three-clouds.yaml"), DEFAULT_TOPOLOGY_LABEL).unwrap();
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    loaded.items
}

/// The laptop of `examples/peers.yaml`, plus an office router with a preshared key and an IPv6
/// endpoint, so that every kind of `[Peer]` line is exercised.
fn peers() -> Vec<MeshPeer> {
    let mut peers = load_peers(&example("peers.yaml")).unwrap().items;
    peers.push(MeshPeer {
        name: NodeName::from("office"),
        key: "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
            .parse()
            .unwrap(),
        allowed_ips: vec!["10.5.1.0/24".parse().unwrap()],
        endpoint: Some("[2001:db8::7]:51821".parse().unwrap()),
        persistent_keepalive: 0,
        preshared_key: Some(
            "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
                .parse()
                .unwrap(),
        ),
    });
    peers
}

fn full() -> MeshOptions {
    MeshOptions {
        granularity: Granularity::Full,
        ..MeshOptions::default()
    }
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go and wireguard-tools"
)]
fn node_config_is_accepted_by_wg_quick_strip_and_wg_setconf() {
    require_root_and_tools();
    let nodes = three_clouds();
    let peers = peers();
    let topo = build(nodes.iter(), &peers, &full());
    let ns = WgNetns::start("n");
    run("ip", &["-n", &ns.ns, "link", "show", &ns.ifname], None);
    let (private, public) = key_pair();
    let text = node_config(&topo, &NodeName::from("fra-1"), &full(), Some(&private)).unwrap();
    apply_and_check(&ns, &text, &public);
    let dev = parse_conf(&text);
    assert_eq!(dev.listen_port, Some(51820));
    // hel-1, par-1, the laptop and the office.
    assert_eq!(dev.peers.len(), 4, "{text}");
    let psks = dev.peers.values().filter(|p| p.preshared_key.is_some());
    assert_eq!(psks.count(), 1, "{text}");
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go and wireguard-tools"
)]
fn peer_config_is_accepted_by_wg_quick_strip_and_wg_setconf() {
    require_root_and_tools();
    let nodes = three_clouds();
    let peers = peers();
    let topo = build(nodes.iter(), &peers, &full());
    let ns = WgNetns::start("p");
    // The same interface twice: `wg setconf` replaces the whole configuration.
    for (name, peers_expected, psks_expected) in [("laptop", 4, 0), ("office", 4, 3)] {
        let (private, public) = key_pair();
        let text = peer_config(&topo, &NodeName::from(name), &full(), Some(&private)).unwrap();
        apply_and_check(&ns, &text, &public);
        let dev = parse_conf(&text);
        assert_eq!(dev.peers.len(), peers_expected, "{text}");
        let psks = dev.peers.values().filter(|p| p.preshared_key.is_some());
        assert_eq!(psks.count(), psks_expected, "{text}");
    }
}
