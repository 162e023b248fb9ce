//! The WireGuard device (`reconcile::wg`) against real userspace WireGuard (wireguard-go) in
//! throw-away network namespaces: creation and adoption, key and port, peer changes that leave
//! other peers' sessions alone, large peer sets, cleanup, and that the private key never shows.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnetwork::IpNetwork;
use wiremesh::desired::WgPeer;
use wiremesh::model::{Endpoint, WgKey};
use wiremesh::reconcile::Op;
use wiremesh::reconcile::wg::{
    PeerChange, WgBackend, WgDevice, WgMode, detect_kernel_wireguard, load_or_generate_private_key,
};

use crate::util::wg_dev::{TestNs, alive, daemons_for};
use crate::util::wg_netns::{require_root_and_tools, run};

fn kernel_module_present() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

/// A deterministic public key for fake peer `i`.
fn fake_key(i: u32) -> WgKey {
    let mut b = [0x42u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    WgKey(b)
}

/// Fake peer `i`: a /32 and a /128, an endpoint, keepalive on every third, a PSK on every fifth.
fn fake_peer(i: u32) -> WgPeer {
    let (hi, lo) = ((i >> 8) as u8, i as u8);
    WgPeer {
        public_key: fake_key(i),
        endpoint: Some(Endpoint::Addr(SocketAddr::from((
            [192, 0, 2, (i % 250) as u8 + 1],
            20000 + (i % 40000) as u16,
        )))),
        allowed_ips: vec![
            format!("10.100.{hi}.{lo}/32").parse().unwrap(),
            format!("fd00:100::{i:x}/128").parse().unwrap(),
        ],
        persistent_keepalive: if i.is_multiple_of(3) { 25 } else { 0 },
        preshared_key: i.is_multiple_of(5).then_some(WgKey([i as u8 | 0x80; 32])),
        name: String::new(),
    }
}

fn peer(key: WgKey, endpoint: &str, allowed: &str) -> WgPeer {
    WgPeer {
        public_key: key,
        endpoint: Some(Endpoint::Addr(endpoint.parse().unwrap())),
        allowed_ips: vec![allowed.parse::<IpNetwork>().unwrap()],
        persistent_keepalive: 0,
        preshared_key: None,
        name: String::new(),
    }
}

/// Assert two peer lists are equal, showing only the first difference (lists can be long).
fn assert_same_peers(got: &[WgPeer], want: &[WgPeer]) {
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g, w, "first differing peer");
    }
    assert_eq!(got.len(), want.len(), "peer count");
}

fn key_file_text(ns: &TestNs, dev: &WgDevice) -> String {
    std::fs::read_to_string(ns.key_path(dev.name()))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_auto_mode_picks_userspace_without_the_kernel_module() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Auto);
    if kernel_module_present() {
        assert_eq!(dev.backend(), WgBackend::Kernel);
        return;
    }
    assert_eq!(dev.backend(), WgBackend::Userspace);
    let why = detect_kernel_wireguard(Some(&ns.path()))
        .expect_err("no module here")
        .to_string();
    assert!(why.contains("refused a wireguard link"), "{why}");
    // The probe leaves no link behind.
    assert!(!ns.ip(&["link"]).contains("wmprobe"));
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_kernel_mode_fails_clearly_without_the_module() {
    require_root_and_tools();
    if kernel_module_present() {
        eprintln!("the wireguard module is present: nothing to check");
        return;
    }
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Kernel);
    assert_eq!(dev.backend(), WgBackend::Kernel);
    let e = dev.create().expect_err("no module here").to_string();
    assert!(
        e.contains("no WireGuard support") && e.contains("--wireguard userspace"),
        "{e}"
    );
    assert!(!ns.ip(&["link"]).contains(dev.name()));
    assert_eq!(dev.read().unwrap(), None);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_create_configure_read_round_trip() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    assert_eq!(dev.read().unwrap(), None, "nothing before create");
    let created = dev.create().unwrap();
    assert!(!created.adopted);
    let pid = created.pid.expect("daemon pid");
    assert!(
        alive(pid),
        "the pid is the daemon's, not the exited launcher's"
    );
    assert_eq!(dev.daemon_pid(), Some(pid));
    // The tun device is in the test namespace, not the host's.
    assert!(ns.ip(&["link", "show", dev.name()]).contains(dev.name()));
    let fresh = dev.read().unwrap().expect("device exists");
    assert_eq!(fresh.public_key, None, "no key before configure");

    dev.configure(51820).unwrap();
    let state = dev.read().unwrap().expect("device exists");
    assert_eq!(state.listen_port, 51820);
    assert!(state.peers.is_empty());
    let from_file = load_or_generate_private_key(&ns.key_path(dev.name()))
        .unwrap()
        .public_key();
    assert_eq!(state.public_key, Some(from_file));
    assert_eq!(dev.public_key(), from_file);
    // Cross-check with the reference tool.
    let shown = run("wg", &["show", dev.name(), "public-key"], None);
    assert_eq!(shown.trim(), from_file.to_string());
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_configure_leaves_peers_alone() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    dev.create().unwrap();
    dev.configure(51820).unwrap();
    let peers = vec![fake_peer(1), fake_peer(2)];
    dev.apply_peers(&peers, &[]).unwrap();
    dev.configure(51821).unwrap();
    let state = dev.read().unwrap().unwrap();
    assert_eq!(state.listen_port, 51821);
    assert_eq!(state.peers, peers);
    // Again with nothing to change: a no-op.
    dev.configure(51821).unwrap();
    assert_eq!(dev.read().unwrap().unwrap(), state);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_changing_one_peer_keeps_the_other_peers_sessions() {
    require_root_and_tools();
    let mut a = TestNs::new();
    let mut b = TestNs::new();
    // Underlay: a veth pair between the two namespaces.
    a.ip(&[
        "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &b.name,
    ]);
    a.ip(&["addr", "add", "10.201.0.1/24", "dev", "ul0"]);
    b.ip(&["addr", "add", "10.201.0.2/24", "dev", "ul0"]);
    a.ip(&["link", "set", "ul0", "up"]);
    b.ip(&["link", "set", "ul0", "up"]);

    let da = a.device(WgMode::Userspace);
    let db = b.device(WgMode::Userspace);
    for d in [&da, &db] {
        d.create().unwrap();
        d.configure(51820).unwrap();
    }
    let peer_b = peer(db.public_key(), "10.201.0.2:51820", "10.202.0.2/32");
    let peer_c = peer(fake_key(3), "10.201.0.3:51820", "10.202.0.3/32");
    let peer_d = peer(fake_key(4), "10.201.0.4:51820", "10.202.0.4/32");
    let r = da
        .apply_peers(&[peer_b.clone(), peer_c.clone(), peer_d.clone()], &[])
        .unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    db.apply_peers(
        &[peer(da.public_key(), "10.201.0.1:51820", "10.202.0.1/32")],
        &[],
    )
    .unwrap();
    a.ip(&["addr", "add", "10.202.0.1/24", "dev", da.name()]);
    b.ip(&["addr", "add", "10.202.0.2/24", "dev", db.name()]);
    a.ip(&["link", "set", da.name(), "up"]);
    b.ip(&["link", "set", db.name(), "up"]);

    let pinged = (0..5).any(|_| {
        a.exec(&["ping", "-c", "1", "-W", "2", "10.202.0.2"])
            .status
            .success()
    });
    assert!(pinged, "no ping through the tunnel");
    let stats_of = |d: &WgDevice, k: WgKey| {
        d.peer_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.public_key == k)
            .expect("peer present")
    };
    let before = stats_of(&da, peer_b.public_key);
    assert!(before.last_handshake.is_some(), "handshake after ping");
    assert!(before.rx_bytes > 0);
    let state_before = da.read().unwrap().unwrap();

    // Change an unrelated peer's endpoint.
    let mut peer_c2 = peer_c.clone();
    peer_c2.endpoint = Some(Endpoint::Addr("10.201.0.33:51820".parse().unwrap()));
    let r = da.apply_peers(std::slice::from_ref(&peer_c2), &[]).unwrap();
    assert_eq!(r.upserted, vec![peer_c2.public_key]);

    let after = stats_of(&da, peer_b.public_key);
    assert_eq!(
        after.last_handshake, before.last_handshake,
        "peer B's session was reset"
    );
    assert!(after.rx_bytes >= before.rx_bytes && after.tx_bytes >= before.tx_bytes);
    let state_after = da.read().unwrap().unwrap();
    let find = |s: &wiremesh::reconcile::WgDeviceState, k: WgKey| {
        s.peers.iter().find(|p| p.public_key == k).cloned().unwrap()
    };
    assert_eq!(
        find(&state_after, peer_b.public_key),
        find(&state_before, peer_b.public_key)
    );
    assert_eq!(find(&state_after, peer_d.public_key), peer_d);
    assert_eq!(find(&state_after, peer_c.public_key), peer_c2);

    // Renumber peer B (a join or leave elsewhere in a full mesh): only its allowed IPs go to
    // the device; its endpoint, keepalive and session stay, and the tunnel still carries.
    let renumbered: Vec<IpNetwork> = vec![
        "10.202.0.2/32".parse().unwrap(),
        "10.203.0.0/24".parse().unwrap(),
    ];
    let r = da
        .apply_changes(vec![PeerChange::AllowedIps(
            peer_b.public_key,
            renumbered.clone(),
        )])
        .unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let state_renumbered = da.read().unwrap().unwrap();
    let b_now = find(&state_renumbered, peer_b.public_key);
    let b_before = find(&state_after, peer_b.public_key);
    let mut got = b_now.allowed_ips.clone();
    got.sort();
    assert_eq!(got, renumbered);
    assert_eq!(b_now.endpoint, b_before.endpoint);
    assert_eq!(b_now.persistent_keepalive, b_before.persistent_keepalive);
    assert_eq!(find(&state_renumbered, peer_d.public_key), peer_d);
    assert_eq!(
        stats_of(&da, peer_b.public_key).last_handshake,
        before.last_handshake,
        "peer B's session was reset by new allowed IPs"
    );
    assert!(
        a.exec(&["ping", "-c", "1", "-W", "2", "10.202.0.2"])
            .status
            .success(),
        "no ping through the tunnel after the renumbering"
    );

    // Control: removing and re-adding B does lose the session, so the check above can fail.
    da.apply_peers(&[], &[peer_b.public_key]).unwrap();
    da.apply_peers(std::slice::from_ref(&peer_b), &[]).unwrap();
    assert_eq!(stats_of(&da, peer_b.public_key).last_handshake, None);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_thousand_peers_are_applied_and_read_back_exactly() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    dev.create().unwrap();
    dev.configure(51820).unwrap();
    let mut peers: Vec<WgPeer> = (0..1000).map(fake_peer).collect();
    peers.sort_by_key(|p| p.public_key);
    let r = dev.apply_peers(&peers, &[]).unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(r.upserted.len(), 1000);
    let state = dev.read().unwrap().unwrap();
    assert_same_peers(&state.peers, &peers);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_removing_peers_leaves_the_others() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    dev.create().unwrap();
    let peers: Vec<WgPeer> = (0..5).map(fake_peer).collect();
    dev.apply_peers(&peers, &[]).unwrap();
    // Removing a key the device does not have is not an error.
    let r = dev
        .apply_peers(&[], &[fake_key(1), fake_key(3), fake_key(99)])
        .unwrap();
    assert!(r.failed.is_empty());
    assert_eq!(r.removed.len(), 3);
    let mut want: Vec<WgPeer> = [0, 2, 4].into_iter().map(fake_peer).collect();
    want.sort_by_key(|p| p.public_key);
    assert_same_peers(&dev.read().unwrap().unwrap().peers, &want);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_unresolvable_endpoint_fails_only_that_peer() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    dev.create().unwrap();
    let mut good = fake_peer(1);
    good.endpoint = Some(Endpoint::Dns {
        host: "localhost".into(),
        port: 51000,
    });
    let mut bad = fake_peer(2);
    bad.endpoint = Some(Endpoint::Dns {
        host: "no-such-host.invalid".into(),
        port: 51000,
    });
    let r = dev.apply_peers(&[good.clone(), bad.clone()], &[]).unwrap();
    assert_eq!(r.upserted, vec![good.public_key]);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, bad.public_key);
    assert!(r.failed[0].1.to_string().contains("no-such-host.invalid"));
    let state = dev.read().unwrap().unwrap();
    assert_eq!(state.peers.len(), 1);
    assert_eq!(
        state.peers[0].endpoint,
        Some(Endpoint::Addr("127.0.0.1:51000".parse().unwrap()))
    );
}

#[test]
fn wg_key_file_is_created_0600_and_reused() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wiremesh/private.key");
    let first = load_or_generate_private_key(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.trim().parse::<WgKey>().is_ok(), "base64 of 32 bytes");
    let second = load_or_generate_private_key(&path).unwrap();
    assert_eq!(first.public_key(), second.public_key());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "not rewritten"
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_private_key_never_appears_in_debug_output() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    let b64 = key_file_text(&ns, &dev);
    let key: WgKey = b64.parse().unwrap();
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    let private = load_or_generate_private_key(&ns.key_path(dev.name())).unwrap();
    let configure_err = dev.configure(1).unwrap_err(); // no device yet
    let created = dev.create().unwrap();
    dev.configure(51820).unwrap();
    let applied = dev.apply_peers(&[fake_peer(1)], &[]).unwrap();
    let texts = [
        format!("{private:?}"),
        format!("{dev:?}"),
        format!("{:?}", ns.options(WgMode::Userspace)),
        format!("{created:?}"),
        format!("{:?}", dev.read().unwrap()),
        format!("{:?}", dev.peer_stats().unwrap()),
        format!("{applied:?}"),
        format!("{configure_err:?} {configure_err}"),
    ];
    for t in &texts {
        assert!(!t.contains(&b64), "private key in {t}");
        assert!(!t.to_lowercase().contains(&hex), "private key (hex) in {t}");
    }
    assert!(texts[0].contains("<redacted>"));
    assert!(texts[1].contains("<redacted>"));
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_daemon_survives_the_handle_and_is_adopted() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let first = ns.device(WgMode::Userspace);
    let name = first.name().to_owned();
    let created = first.create().unwrap();
    let pid = created.pid.expect("daemon pid");
    first.configure(51822).unwrap();
    first.apply_peers(&[fake_peer(7)], &[]).unwrap();
    // The daemon is not our child: wireguard-go daemonized (and was re-parented).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id());
    drop(first);
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(pid), "the daemon died with its handle");

    // A restarted agent: a new handle with the same name and key file adopts it.
    let second = ns.device_named(&name, WgMode::Userspace);
    let again = second.create().unwrap();
    assert!(again.adopted);
    assert_eq!(again.pid, Some(pid));
    assert_eq!(daemons_for(&name), vec![pid], "exactly one daemon");
    let state = second.read().unwrap().unwrap();
    assert_eq!(state.listen_port, 51822);
    assert_eq!(state.peers, vec![fake_peer(7)]);

    // A daemon killed with SIGKILL leaves a stale socket: the device reads as absent, and
    // create starts a new, empty one.
    run("kill", &["-KILL", &pid.to_string()], None);
    // Wait until it is gone *and* its socket refuses connections: the thread-group leader turns
    // zombie before the last thread has closed the descriptors.
    for _ in 0..250 {
        if !alive(pid) && std::os::unix::net::UnixStream::connect(second.socket_path()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        second.socket_path().exists(),
        "SIGKILL leaves the socket file"
    );
    assert_eq!(second.read().unwrap(), None);
    let restarted = second.create().unwrap();
    assert!(!restarted.adopted);
    assert_ne!(restarted.pid, Some(pid));
    assert!(second.read().unwrap().unwrap().peers.is_empty());
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_writes_to_a_missing_device_fail_and_start_nothing() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    // wireguard-control alone would start `wireguard-go NAME` here, in the host namespace.
    let e = dev.apply_peers(&[fake_peer(1)], &[]).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(dev.configure(51820).is_err());
    std::thread::sleep(Duration::from_millis(200));
    assert!(daemons_for(dev.name()).is_empty(), "a daemon was started");
    assert!(!dev.socket_path().exists());
    assert_eq!(dev.read().unwrap(), None);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_delete_stops_only_our_daemon() {
    require_root_and_tools();
    let mut a = TestNs::new();
    let mut b = TestNs::new();
    let da = a.device(WgMode::Userspace);
    let db = b.device(WgMode::Userspace);
    let pa = da.create().unwrap().pid.unwrap();
    let pb = db.create().unwrap().pid.unwrap();
    assert_ne!(pa, pb);
    da.delete().unwrap();
    assert!(!alive(pa));
    assert!(!da.socket_path().exists());
    assert_eq!(da.read().unwrap(), None);
    assert!(!a.ip(&["link"]).contains(da.name()));
    assert!(alive(pb));
    assert!(db.read().unwrap().is_some());
    da.delete().unwrap(); // nothing left to delete: fine
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
fn wg_daemon_in_another_namespace_is_not_adopted() {
    require_root_and_tools();
    let mut a = TestNs::new();
    let b = TestNs::new();
    let da = a.device(WgMode::Userspace);
    da.create().unwrap();
    // Same name and key, but meant for namespace b: the socket answers, yet it is not ours.
    let key = load_or_generate_private_key(&a.key_path(da.name())).unwrap();
    let other = WgDevice::new(da.name(), key, &b.options(WgMode::Userspace)).unwrap();
    let e = other.create().expect_err("wrong namespace").to_string();
    assert!(e.contains("another network namespace"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, wireguard-go, /dev/net/tun"
)]
async fn wg_apply_ops_runs_the_wireguard_ops_and_skips_the_rest() {
    require_root_and_tools();
    let mut ns = TestNs::new();
    let dev = ns.device(WgMode::Userspace);
    let ops = vec![
        Op::CreateInterface,
        Op::ConfigureDevice { listen_port: 51830 },
        Op::LinkUp,
        Op::UpsertPeer(Box::new(fake_peer(1))),
        Op::UpsertPeer(Box::new(fake_peer(2))),
        Op::RemovePeer {
            public_key: fake_key(3),
        },
    ];
    let results = dev.apply_ops(&ops).await;
    assert_eq!(results.len(), ops.len());
    for (op, r) in ops.iter().zip(&results) {
        match op {
            Op::LinkUp => assert!(r.is_none(), "not a WireGuard op"),
            _ => assert!(matches!(r, Some(Ok(()))), "{op:?}: {r:?}"),
        }
    }
    let state = dev.read_state().await.unwrap().unwrap();
    assert_eq!(state.listen_port, 51830);
    assert_eq!(state.peers.len(), 2);
    assert!(
        dev.apply_op(&Op::RemovePeer {
            public_key: fake_key(1)
        })
        .await
        .is_some_and(|r| r.is_ok())
    );
    assert_eq!(dev.read_state().await.unwrap().unwrap().peers.len(), 1);
}
