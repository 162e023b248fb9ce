//! `reconcile::netlink` against a real kernel, each test in its own throw-away network namespace
//! `wm-nl-<pid>-<n>` (names are global; tests run in parallel threads). Needs root and `ip`.
//!
//! The code under test runs on a dedicated thread that first enters the namespace
//! (`setns(CLONE_NEWNET)`), then builds a current-thread Tokio runtime and the netlink sockets:
//! a netlink socket belongs to the namespace of the thread that opens it. Veth pairs (both ends
//! inside the namespace, both up) stand in for the WireGuard and underlay interfaces, since this
//! kernel has no `dummy`. Nothing is ever sent outside the namespaces created here.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nix::sched::CloneFlags;
use wiremesh::desired::{Bridge, ENCAP_TABLE, MAIN_TABLE, Route, RouteDev, Rule};
use wiremesh::reconcile::forwarding::{self, Families, Sysctls};
use wiremesh::reconcile::netlink::{Devices, Netlink, NetlinkKernel};
use wiremesh::reconcile::{Kernel, KernelError, Op};

use crate::util::wg_netns::run;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Interface names inside every test namespace.
const WG: &str = "wm-wg";
const ETH: &str = "wm-eth";
const BR: &str = "wm-br";

fn devices() -> Devices {
    Devices {
        wireguard: WG.into(),
        private: ETH.into(),
        tunnel: "tunl0".into(),
        bridge: BR.into(),
    }
}

/// `ip -n NS ARGS`; panics on failure, returns stdout.
fn ip(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all, None)
}

/// A namespace deleted on drop, also when the test panics.
struct TestNs {
    name: String,
}

impl TestNs {
    /// A fresh namespace with `lo` up, veths `wm-wg`/`wm-wgp` and `wm-eth`/`wm-ethp` up, and
    /// `wm-eth` holding 10.200.0.1/24 and fd00:200::1/64.
    fn new() -> TestNs {
        let name = format!(
            "wm-nl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name], None);
        let ns = TestNs { name };
        // No IPv6 link-local addresses: their routes appear when DAD ends, at a moment of the
        // kernel's choosing, which would make before/after comparisons flaky.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.addr_gen_mode=1",
            ],
            None,
        );
        ns.ip(&["link", "set", "lo", "up"]);
        for (a, b) in [(WG, "wm-wgp"), (ETH, "wm-ethp")] {
            ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
            ns.ip(&["link", "set", a, "up"]);
            ns.ip(&["link", "set", b, "up"]);
        }
        ns.ip(&["addr", "add", "10.200.0.1/24", "dev", ETH]);
        ns.ip(&["addr", "add", "fd00:200::1/64", "dev", ETH, "nodad"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        ip(&self.name, args)
    }

    fn snapshot(&self) -> Vec<String> {
        snapshot(&self.name)
    }

    /// Run `f` with a `Netlink` for this namespace on a thread inside it; panics propagate.
    fn run<T, F>(&self, devices: Devices, f: F) -> T
    where
        F: AsyncFnOnce(Netlink) -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let nl = Netlink::new(devices).expect("open netlink");
                f(nl).await
            })
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Routes of every table, rules and link names, IPv4 and IPv6, as `ip -n NS` prints them.
fn snapshot(ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    for args in [
        &["route", "show", "table", "all"][..],
        &["-6", "route", "show", "table", "all"],
        &["rule", "show"],
        &["-6", "rule", "show"],
    ] {
        out.extend(ip(ns, args).lines().map(|l| format!("{args:?} {l}")));
    }
    for l in ip(ns, &["-br", "link", "show"]).lines() {
        out.push(format!(
            "link {}",
            l.split_whitespace().next().unwrap_or("")
        ));
    }
    out
}

fn net(s: &str) -> IpNetwork {
    s.parse().expect("network")
}

fn route(table: u32, dst: &str, gw: Option<&str>, dev: RouteDev) -> Route {
    Route {
        table,
        dst: net(dst),
        gateway: gw.map(|g| g.parse().expect("gateway")),
        dev,
        src: None,
        onlink: gw.is_some(),
    }
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Lines of `a` not in `b` (both as multisets of lines).
fn minus(a: &[String], b: &[String]) -> Vec<String> {
    let mut b = b.to_vec();
    a.iter()
        .filter(|l| match b.iter().position(|x| x == *l) {
            Some(i) => {
                b.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

fn assert_all_ok(results: &[Result<(), KernelError>]) {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn routes_round_trip_with_onlink_gateways_sources_and_the_encap_table() {
    let ns = TestNs::new();
    let mut with_src = route(MAIN_TABLE, "10.42.1.0/24", None, RouteDev::WireGuard);
    with_src.src = Some("10.200.0.1".parse().unwrap());
    let mut encap = route(
        ENCAP_TABLE,
        "10.200.0.3/32",
        Some("10.200.0.3"),
        RouteDev::Private,
    );
    encap.src = Some("10.200.0.1".parse().unwrap());
    let mut in_subnet = route(
        MAIN_TABLE,
        "10.42.3.0/24",
        Some("10.200.0.3"),
        RouteDev::Private,
    );
    in_subnet.onlink = false;
    let routes = vec![
        with_src,
        route(
            MAIN_TABLE,
            "10.42.2.0/24",
            Some("10.4.0.2"),
            RouteDev::WireGuard,
        ),
        in_subnet,
        encap,
        route(MAIN_TABLE, "fd00:42::/64", None, RouteDev::WireGuard),
        route(
            ENCAP_TABLE,
            "fd00:43::/64",
            Some("fd00:4::2"),
            RouteDev::WireGuard,
        ),
    ];
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        for r in &routes {
            nl.add_route(r).await.expect("add");
        }
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&routes));
        let shown = ip(&name, &["route", "show", "table", "all", "proto", "104"]);
        for line in [
            "10.42.1.0/24 dev wm-wg scope link src 10.200.0.1",
            "10.42.2.0/24 via 10.4.0.2 dev wm-wg onlink",
            "10.42.3.0/24 via 10.200.0.3 dev wm-eth",
            "10.200.0.3 via 10.200.0.3 dev wm-eth table 1107 src 10.200.0.1 onlink",
        ] {
            assert!(shown.contains(line), "{line:?} not in:\n{shown}");
        }
        let shown6 = ip(
            &name,
            &["-6", "route", "show", "table", "all", "proto", "104"],
        );
        assert!(
            shown6.contains("fd00:43::/64 via fd00:4::2 dev wm-wg table 1107"),
            "{shown6}"
        );
        for r in &routes {
            nl.del_route(r).await.expect("del");
        }
        assert_eq!(nl.read_routes().await.unwrap(), Vec::<Route>::new());
        assert_eq!(
            ip(&name, &["route", "show", "table", "all", "proto", "104"]),
            ""
        );
        assert_eq!(
            ip(
                &name,
                &["-6", "route", "show", "table", "all", "proto", "104"]
            ),
            ""
        );
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn foreign_routes_and_rules_are_left_exactly_as_they_were() {
    let ns = TestNs::new();
    ns.ip(&[
        "route",
        "add",
        "10.42.1.0/24",
        "via",
        "10.200.0.3",
        "dev",
        ETH,
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.42.2.0/24",
        "dev",
        WG,
        "table",
        "1107",
        "proto",
        "static",
    ]);
    ns.ip(&["route", "add", "10.42.9.0/24", "dev", WG, "proto", "105"]);
    ns.ip(&["-6", "route", "add", "fd00:42::/64", "dev", ETH]);
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.42.0.0/24",
        "to",
        "10.200.0.3",
        "lookup",
        "1107",
        "pref",
        "1107",
    ]);
    ns.ip(&["rule", "add", "iif", WG, "lookup", "main", "pref", "1107"]);
    let before = ns.snapshot();

    // Same destinations as the foreign routes, in the other table: both may live.
    let coexisting = vec![
        route(ENCAP_TABLE, "10.42.1.0/24", None, RouteDev::WireGuard),
        route(MAIN_TABLE, "10.42.2.0/24", None, RouteDev::WireGuard),
        route(MAIN_TABLE, "10.42.3.0/24", None, RouteDev::WireGuard),
    ];
    // Same destination and table as a foreign route: refused, never replacing it.
    let clashing = vec![
        route(MAIN_TABLE, "10.42.1.0/24", None, RouteDev::WireGuard),
        route(MAIN_TABLE, "10.42.9.0/24", None, RouteDev::WireGuard),
        route(MAIN_TABLE, "fd00:42::/64", None, RouteDev::WireGuard),
    ];
    // Identical to a foreign rule but for the protocol: the kernel keeps both.
    let rules = vec![
        Rule {
            src: Some(net("10.42.0.0/24")),
            dst: Some(net("10.200.0.3/32")),
            iif: None,
            table: ENCAP_TABLE,
        },
        Rule {
            src: None,
            dst: None,
            iif: Some(WG.into()),
            table: MAIN_TABLE,
        },
    ];
    let name = ns.name.clone();
    let after_add = ns.run(devices(), async move |nl| {
        let res = nl.apply_routes(&coexisting, &[]).await;
        assert_all_ok(&res.adds);
        for r in &clashing {
            let err = nl
                .add_route(r)
                .await
                .expect_err("a foreign route holds the key");
            assert!(err.to_string().contains("not owned by wiremesh"), "{err}");
        }
        for r in &rules {
            nl.add_rule(r).await.expect("add rule");
        }
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&coexisting));
        assert_eq!(nl.read_rules().await.unwrap(), sorted(&rules));
        let after_add = snapshot(&name);
        // Deleting ours on the foreign routes' keys finds nothing of ours and touches nothing.
        for r in &clashing {
            nl.del_route(r).await.expect("del of a route we never had");
        }
        nl.cleanup().await.expect("cleanup");
        after_add
    });
    let missing = minus(&before, &after_add);
    assert!(
        missing.is_empty(),
        "foreign state changed by our adds: {missing:#?}"
    );
    let added = minus(&after_add, &before);
    assert_eq!(added.len(), 5, "{added:#?}");
    assert!(added.iter().all(|l| l.contains("proto 104")), "{added:#?}");
    assert_eq!(
        ns.snapshot(),
        before,
        "after cleanup only foreign state remains"
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn two_thousand_routes_go_in_pipelined_and_read_back_exactly() {
    let ns = TestNs::new();
    let mut routes = Vec::new();
    for i in 0..1000u32 {
        let dst = format!("10.100.{}.{}/32", i / 250, i % 250);
        routes.push(route(MAIN_TABLE, &dst, None, RouteDev::WireGuard));
        let dst = format!("10.101.{}.{}/32", i / 250, i % 250);
        routes.push(route(
            ENCAP_TABLE,
            &dst,
            Some("10.200.0.3"),
            RouteDev::Private,
        ));
    }
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        let res = nl.apply_routes(&routes, &[]).await;
        assert_eq!(res.adds.len(), 2000);
        assert_all_ok(&res.adds);
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&routes));
        let shown = ip(&name, &["route", "show", "table", "all", "proto", "104"]);
        assert_eq!(shown.lines().count(), 2000);
        let res = nl.apply_routes(&[], &routes).await;
        assert_all_ok(&res.dels);
        assert_eq!(nl.read_routes().await.unwrap(), Vec::<Route>::new());
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn adding_and_deleting_twice_is_harmless() {
    let ns = TestNs::new();
    let routes: Vec<Route> = (0..50)
        .map(|i| {
            route(
                MAIN_TABLE,
                &format!("10.42.{i}.0/24"),
                Some("10.4.0.2"),
                RouteDev::WireGuard,
            )
        })
        .collect();
    let rule = Rule {
        src: Some(net("10.42.0.0/16")),
        dst: None,
        iif: None,
        table: ENCAP_TABLE,
    };
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        nl.add_route(&routes[0]).await.expect("first add");
        nl.add_route(&routes[0]).await.expect("second add");
        for _ in 0..2 {
            assert_all_ok(&nl.apply_routes(&routes, &[]).await.adds);
        }
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&routes));
        for _ in 0..2 {
            nl.add_rule(&rule).await.expect("add rule");
        }
        let shown = ip(&name, &["rule", "show"]);
        assert_eq!(shown.matches("proto 104").count(), 1, "{shown}");
        for _ in 0..2 {
            nl.del_route(&routes[0]).await.expect("del");
            assert_all_ok(&nl.apply_routes(&[], &routes).await.dels);
            nl.del_rule(&rule).await.expect("del rule");
        }
        assert!(nl.read_routes().await.unwrap().is_empty());
        assert!(nl.read_rules().await.unwrap().is_empty());
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn rules_round_trip() {
    let ns = TestNs::new();
    let rules = vec![
        Rule {
            src: Some(net("10.42.0.0/24")),
            dst: Some(net("10.200.0.3/32")),
            iif: None,
            table: ENCAP_TABLE,
        },
        Rule {
            src: None,
            dst: Some(net("10.200.0.4/32")),
            iif: Some(WG.into()),
            table: ENCAP_TABLE,
        },
        Rule {
            src: Some(net("fd00:42::/64")),
            dst: None,
            iif: None,
            table: MAIN_TABLE,
        },
    ];
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        for r in &rules {
            nl.add_rule(r).await.expect("add rule");
        }
        assert_eq!(nl.read_rules().await.unwrap(), sorted(&rules));
        let shown = ip(&name, &["rule", "show"]);
        assert!(
            shown.contains("1107:\tfrom 10.42.0.0/24 to 10.200.0.3 lookup 1107 proto 104"),
            "{shown}"
        );
        assert!(
            shown.contains("1107:\tfrom all to 10.200.0.4 iif wm-wg lookup 1107 proto 104"),
            "{shown}"
        );
        let shown6 = ip(&name, &["-6", "rule", "show"]);
        assert!(
            shown6.contains("1107:\tfrom fd00:42::/64 lookup main proto 104"),
            "{shown6}"
        );
        for r in &rules {
            nl.del_rule(r).await.expect("del rule");
        }
        assert!(nl.read_rules().await.unwrap().is_empty());
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn bridge_is_created_readdressed_and_nothing_else_is_touched() {
    let ns = TestNs::new();
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        assert_eq!(nl.read_bridge().await.unwrap(), None);
        let first = Bridge {
            name: BR.into(),
            addresses: vec![net("10.42.0.1/24")],
        };
        nl.ensure_bridge(&first).await.expect("create");
        assert_eq!(nl.read_bridge().await.unwrap(), Some(first.clone()));
        let shown = ip(&name, &["-d", "link", "show", BR]);
        assert!(
            shown.contains("state UP") || shown.contains(",UP"),
            "{shown}"
        );
        assert!(shown.contains("alias wiremesh CNI bridge"), "{shown}");
        assert!(shown.contains("bridge "), "{shown}");

        let second = Bridge {
            name: BR.into(),
            addresses: vec![net("10.42.5.1/24"), net("fd00:42::1/64")],
        };
        nl.ensure_bridge(&second).await.expect("readdress");
        nl.ensure_bridge(&second).await.expect("again");
        assert_eq!(nl.read_bridge().await.unwrap(), Some(second));
        let addrs = ip(&name, &["addr", "show", "dev", BR]);
        assert!(!addrs.contains("10.42.0.1"), "old address removed: {addrs}");
        assert!(addrs.contains("inet 10.42.5.1/24"), "{addrs}");
        assert!(addrs.contains("inet6 fd00:42::1/64"), "{addrs}");

        let other = Bridge {
            name: "other-br".into(),
            addresses: vec![],
        };
        assert!(
            nl.ensure_bridge(&other).await.is_err(),
            "only the configured bridge"
        );
    });
    // An interface with the bridge's name that is not a bridge is left alone.
    let mut d = devices();
    d.bridge = WG.into();
    ns.run(d, async move |nl| {
        let b = Bridge {
            name: WG.into(),
            addresses: vec![net("10.42.0.1/24")],
        };
        let err = nl.ensure_bridge(&b).await.expect_err("not a bridge");
        assert!(err.to_string().contains("not a bridge"), "{err}");
        assert_eq!(nl.read_bridge().await.unwrap(), None);
    });
    assert!(!ns.ip(&["addr", "show", "dev", WG]).contains("10.42.0.1"));
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_route_of_ours_deleted_by_hand_is_reported_within_a_second_and_restored() {
    let ns = TestNs::new();
    let routes = vec![
        route(
            MAIN_TABLE,
            "10.42.1.0/24",
            Some("10.4.0.2"),
            RouteDev::WireGuard,
        ),
        route(ENCAP_TABLE, "10.42.2.0/24", None, RouteDev::WireGuard),
    ];
    let rule = Rule {
        src: Some(net("10.42.0.0/16")),
        dst: None,
        iif: None,
        table: ENCAP_TABLE,
    };
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        let mut events = nl.watch_routes().expect("watch");
        assert_all_ok(&nl.apply_routes(&routes, &[]).await.adds);
        nl.add_rule(&rule).await.expect("add rule");
        let quiet = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(quiet.is_err(), "our own changes must not wake the watcher");

        let deleted = Instant::now();
        ip(&name, &["route", "del", "10.42.1.0/24"]);
        let event = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        assert_eq!(
            event,
            Ok(Some("route of ours deleted")),
            "deletion reported within 1 s"
        );
        assert_all_ok(&nl.apply_routes(&routes, &[]).await.adds);
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&routes));
        let took = deleted.elapsed();
        assert!(took < Duration::from_secs(1), "restored after {took:?}");

        ip(&name, &["rule", "del", "pref", "1107"]);
        let event = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        assert_eq!(
            event,
            Ok(Some("rule of ours changed")),
            "rule deletion reported within 1 s"
        );

        // IPv4 drops a downed link's routes silently: the link event stands in.
        ip(&name, &["link", "set", WG, "down"]);
        let event = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        assert_eq!(
            event,
            Ok(Some("link of ours went down")),
            "link down reported within 1 s"
        );
        // Setting it up again or changing its MTU takes nothing of ours away.
        ip(&name, &["link", "set", WG, "up"]);
        ip(&name, &["link", "set", WG, "mtu", "1400"]);
        let quiet = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(
            quiet.is_err(),
            "a link set up or resized must not wake the watcher"
        );
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn cleanup_leaves_only_foreign_state() {
    let ns = TestNs::new();
    ns.ip(&[
        "route",
        "add",
        "10.42.1.0/24",
        "via",
        "10.200.0.3",
        "dev",
        ETH,
        "table",
        "1107",
    ]);
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.42.0.0/16",
        "lookup",
        "1107",
        "pref",
        "1107",
    ]);
    ns.ip(&["link", "add", "fbr0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.9.9.1/24", "dev", "fbr0"]);
    // Protocol 104, but not wiremesh's: on an interface wiremesh does not use, in a table it
    // does not use (on its own interface), and a rule to such a table.
    ns.ip(&[
        "route",
        "add",
        "10.77.0.0/24",
        "dev",
        "wm-wgp",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.76.0.0/24",
        "dev",
        WG,
        "table",
        "200",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.75.0.0/24",
        "table",
        "200",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:77::/64",
        "dev",
        "wm-wgp",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.74.0.0/16",
        "lookup",
        "200",
        "pref",
        "1107",
        "proto",
        "104",
    ]);
    let before = ns.snapshot();
    let done = ns.run(devices(), async move |nl| {
        let routes = vec![
            route(MAIN_TABLE, "10.42.1.0/24", None, RouteDev::WireGuard),
            route(
                ENCAP_TABLE,
                "10.42.2.0/24",
                Some("10.200.0.3"),
                RouteDev::Private,
            ),
            route(MAIN_TABLE, "fd00:42::/64", None, RouteDev::WireGuard),
            Route::blackhole(MAIN_TABLE, net("10.42.1.0/24")),
        ];
        assert_all_ok(&nl.apply_routes(&routes, &[]).await.adds);
        let rule = Rule {
            src: Some(net("10.42.0.0/16")),
            dst: None,
            iif: None,
            table: ENCAP_TABLE,
        };
        nl.add_rule(&rule).await.expect("add rule");
        let bridge = Bridge {
            name: BR.into(),
            addresses: vec![net("10.42.0.1/24")],
        };
        nl.ensure_bridge(&bridge).await.expect("bridge");
        // The foreign protocol-104 routes and rule are not read as ours either.
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&routes));
        assert!(nl.read_route_dump().await.unwrap().strays.is_empty());
        assert_eq!(nl.read_rule_dump().await.unwrap().rules, vec![rule]);
        assert!(nl.read_rule_dump().await.unwrap().strays.is_empty());
        nl.cleanup().await.expect("cleanup")
    });
    assert_eq!((done.routes, done.rules, done.bridge), (4, 1, true));
    assert_eq!(ns.snapshot(), before);
    assert!(
        ns.ip(&["addr", "show", "dev", "fbr0"])
            .contains("10.9.9.1/24")
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn strays_are_reported_apart_and_purged() {
    let ns = TestNs::new();
    // Strays of ours: a blackhole that is not a guard (metric 0), a route through our
    // interface with a TOS no desired route has, and a rule at another priority.
    ns.ip(&["route", "add", "blackhole", "10.78.0.0/24", "proto", "104"]);
    ns.ip(&[
        "route",
        "add",
        "10.77.0.0/24",
        "dev",
        WG,
        "tos",
        "0x10",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.77.0.0/24",
        "lookup",
        "1107",
        "pref",
        "5",
        "proto",
        "104",
    ]);
    // Protocol 104 but someone else's: another device, another table, a rule to another table.
    ns.ip(&[
        "route",
        "add",
        "10.76.0.0/24",
        "dev",
        "wm-wgp",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.75.0.0/24",
        "dev",
        WG,
        "table",
        "200",
        "proto",
        "104",
    ]);
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.74.0.0/24",
        "lookup",
        "200",
        "pref",
        "5",
        "proto",
        "104",
    ]);
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        let ours = route(MAIN_TABLE, "10.78.0.0/24", None, RouteDev::WireGuard);
        let err = nl
            .add_route(&ours)
            .await
            .expect_err("the stray holds the key");
        assert!(
            err.to_string().contains("another route of wiremesh"),
            "{err}"
        );
        let foreign = route(MAIN_TABLE, "10.76.0.0/24", None, RouteDev::WireGuard);
        let err = nl
            .add_route(&foreign)
            .await
            .expect_err("a foreign route holds the key");
        assert!(err.to_string().contains("not owned by wiremesh"), "{err}");
        assert!(nl.read_routes().await.unwrap().is_empty());
        let dump = nl.read_route_dump().await.unwrap();
        let dsts: Vec<String> = dump.strays.iter().map(|s| s.dst.to_string()).collect();
        assert_eq!(dsts, ["10.77.0.0/24", "10.78.0.0/24"]);
        assert_eq!(nl.read_rule_dump().await.unwrap().strays.len(), 1);
        assert!(nl.read_rules().await.unwrap().is_empty());
        let k = NetlinkKernel::new(nl);
        assert_eq!(k.purge_strays().await.unwrap(), 3);
        let left = ip(&name, &["route", "show", "table", "all", "proto", "104"]);
        assert!(
            left.contains("10.76.0.0/24 dev wm-wgp")
                && left.contains("10.75.0.0/24 dev wm-wg table 200"),
            "{left}"
        );
        assert_eq!(left.lines().count(), 2, "{left}");
        let rules = ip(&name, &["rule", "show"]);
        assert!(
            rules.contains("from 10.74.0.0/24 lookup 200 proto 104"),
            "{rules}"
        );
        assert!(!rules.contains("lookup 1107 proto 104"), "{rules}");
        k.netlink
            .add_route(&ours)
            .await
            .expect("the key is free now");
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn links_addresses_mtu_and_forwarding() {
    let ns = TestNs::new();
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        let link = nl.read_link(WG).await.unwrap().expect("link");
        assert!(link.up);
        assert_eq!((link.mtu, link.addresses.len()), (1500, 0));
        assert_eq!(nl.read_link("absent0").await.unwrap(), None);

        let v4 = net("10.4.0.1/16");
        let v6 = net("fd00:4::1/64");
        for a in [v4, v4, v6] {
            nl.add_address(WG, a).await.expect("add address");
        }
        nl.set_mtu(WG, 1420).await.expect("mtu");
        let link = nl.read_link(WG).await.unwrap().expect("link");
        assert_eq!((link.mtu, link.addresses), (1420, vec![v4, v6]));
        for _ in 0..2 {
            nl.del_address(WG, v4).await.expect("del address");
        }
        assert_eq!(nl.read_link(WG).await.unwrap().unwrap().addresses, vec![v6]);

        ip(&name, &["link", "set", WG, "down"]);
        assert!(!nl.read_link(WG).await.unwrap().unwrap().up);
        nl.set_up(WG).await.expect("up");
        assert!(nl.read_link(WG).await.unwrap().unwrap().up);

        assert_eq!(nl.underlay_mtu(None).await.unwrap(), Some(1500), "private");
        ip(&name, &["link", "set", ETH, "mtu", "1300"]);
        assert_eq!(nl.underlay_mtu(None).await.unwrap(), Some(1300));
        let endpoint = "10.200.0.1".parse().ok();
        assert_eq!(
            nl.underlay_mtu(endpoint).await.unwrap(),
            Some(1300),
            "the interface holding the endpoint"
        );

        let private = nl
            .private_interface_for("10.200.0.1".parse().unwrap())
            .await;
        assert_eq!(private.unwrap().as_deref(), Some(ETH));
        let v6_private = nl
            .private_interface_for("fd00:200::1".parse().unwrap())
            .await;
        assert_eq!(v6_private.unwrap().as_deref(), Some(ETH));
        let nobody = nl.private_interface_for("10.9.9.9".parse().unwrap()).await;
        assert_eq!(nobody.unwrap(), None);
    });
    // Forwarding, per family, in this namespace only (`/proc/sys/net` follows the calling
    // thread's namespace): an IPv4-only mesh turns on IPv4 forwarding alone, and cleanup puts
    // back what it found.
    let record = tempfile::tempdir().unwrap();
    let record_file = record.path().join("sysctl");
    let path = format!("/run/netns/{}", ns.name);
    let seen = std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open the namespace");
        nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
        let s = Sysctls::new(forwarding::PROC_SYS, Some(record_file));
        let read = |s: &Sysctls| {
            (
                s.read(forwarding::IPV4_FORWARD).unwrap(),
                s.read(forwarding::IPV6_FORWARD).unwrap(),
            )
        };
        let fresh = read(&s);
        s.ensure_families(Families {
            v4: true,
            v6: false,
        })
        .expect("forwarding");
        let on = read(&s);
        s.restore().expect("restore");
        (fresh, on, read(&s))
    })
    .join()
    .expect("forwarding thread");
    let zero = || ("0".to_owned(), "0".to_owned());
    assert_eq!(seen.0, zero(), "a fresh namespace forwards nothing");
    assert_eq!(seen.1, ("1".to_owned(), "0".to_owned()), "IPv4 only");
    assert_eq!(seen.2, zero(), "restored");
    let sysctl = |key: &str| {
        run(
            "ip",
            &["netns", "exec", &ns.name, "sysctl", "-n", key],
            None,
        )
    };
    assert_eq!(sysctl("net.ipv4.ip_forward").trim(), "0");
    assert_eq!(sysctl("net.ipv6.conf.all.forwarding").trim(), "0");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward,
        "the host's namespace is untouched"
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn the_underlay_mtu_follows_the_route_to_the_endpoint_then_the_default_route() {
    let ns = TestNs::new();
    ns.ip(&["link", "set", ETH, "mtu", "1400"]);
    ns.ip(&["link", "set", WG, "mtu", "1500"]);
    ns.ip(&["addr", "add", "10.201.0.1/24", "dev", WG]);
    ns.ip(&["route", "add", "default", "via", "10.200.0.254", "dev", ETH]);
    // A PPPoE-like path: the route itself carries a smaller MTU than its interface.
    ns.ip(&[
        "route",
        "add",
        "192.0.2.0/24",
        "via",
        "10.200.0.254",
        "dev",
        ETH,
        "mtu",
        "1280",
    ]);
    let mut d = devices();
    d.private = String::new();
    ns.run(d, async move |nl| {
        let at = |s: &str| s.parse().ok();
        assert_eq!(nl.underlay_mtu(None).await.unwrap(), Some(1400), "default");
        assert_eq!(
            nl.underlay_mtu(at("10.201.0.1")).await.unwrap(),
            Some(1500),
            "the endpoint's own interface, not the default route's"
        );
        assert_eq!(
            nl.underlay_mtu(at("198.51.100.7")).await.unwrap(),
            Some(1400),
            "a NATed endpoint: the route to it"
        );
        assert_eq!(
            nl.underlay_mtu(at("192.0.2.7")).await.unwrap(),
            Some(1280),
            "the route's mtu wins over its interface's"
        );
        assert_eq!(
            nl.underlay_mtu(at("2001:db8::1")).await.unwrap(),
            Some(1400),
            "no IPv6 route: the default route's interface"
        );
    });
    let mut d = devices();
    d.private = String::new();
    ns.ip(&["route", "del", "default"]);
    ns.run(d, async move |nl| {
        assert_eq!(nl.underlay_mtu(None).await.unwrap(), None, "no underlay");
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn routes_through_a_missing_tunnel_are_unsupported() {
    let ns = TestNs::new();
    ns.run(devices(), async move |nl| {
        let r = route(
            ENCAP_TABLE,
            "10.42.1.0/24",
            Some("10.200.0.3"),
            RouteDev::Tunnel,
        );
        let err = nl.add_route(&r).await.expect_err("no tunl0 here");
        assert!(matches!(err, KernelError::Unsupported(_)), "{err}");
        nl.del_route(&r).await.expect("nothing to delete is fine");
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn netlink_kernel_applies_its_share_of_a_plan_and_reads_it_back() {
    let ns = TestNs::new();
    ns.run(devices(), async move |nl| {
        let mut k = NetlinkKernel::new(nl);
        let routes = [
            route(
                MAIN_TABLE,
                "10.42.1.0/24",
                Some("10.4.0.2"),
                RouteDev::WireGuard,
            ),
            route(
                MAIN_TABLE,
                "10.42.2.0/24",
                Some("10.4.0.2"),
                RouteDev::WireGuard,
            ),
        ];
        let rule = Rule {
            src: Some(net("10.42.0.0/16")),
            dst: None,
            iif: None,
            table: ENCAP_TABLE,
        };
        let bridge = Bridge {
            name: BR.into(),
            addresses: vec![net("10.42.0.1/24")],
        };
        let ops = [
            Op::SetMtu { mtu: 1420 },
            Op::AddAddress {
                address: net("10.4.0.1/16"),
            },
            Op::LinkUp,
            Op::SetBridge(bridge.clone()),
            Op::DelRoute(route(MAIN_TABLE, "10.42.9.0/24", None, RouteDev::WireGuard)),
            Op::AddRoute(routes[0].clone()),
            Op::AddRoute(routes[1].clone()),
            Op::AddRule(rule.clone()),
        ];
        let results = k.apply_all(&ops).await;
        assert_eq!(results.len(), ops.len());
        assert_all_ok(&results);
        let owned = k.read_owned().await.unwrap();
        assert_eq!(owned.routes, routes.to_vec());
        assert_eq!(owned.rules, vec![rule]);
        assert_eq!(owned.bridge, Some(bridge));
        let link = owned.link.expect("link");
        assert_eq!((link.mtu, link.addresses), (1420, vec![net("10.4.0.1/16")]));
        let other = k.apply(&Op::CreateInterface).await;
        assert!(matches!(other, Err(KernelError::Unsupported(_))));
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn guards_are_lowest_priority_blackholes_that_take_over_only_while_their_route_is_gone() {
    let ns = TestNs::new();
    // A default route out of the underlay: where a pod packet would leak without a guard.
    ns.ip(&["route", "add", "default", "via", "10.200.0.254", "dev", ETH]);
    let real = route(MAIN_TABLE, "10.42.1.0/24", None, RouteDev::WireGuard);
    let real6 = route(MAIN_TABLE, "fd00:42::/64", None, RouteDev::WireGuard);
    let guards = vec![real.guard().unwrap(), real6.guard().unwrap()];
    let all = wiremesh::desired::with_guards(&[real.clone(), real6.clone()]);
    let name = ns.name.clone();
    let lookup = move |dst: &str| {
        let out = Command::new("ip")
            .args(["-n", &name, "route", "get", dst])
            .output()
            .expect("ip route get");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        let results = nl.apply_routes(&all, &[]).await;
        assert_all_ok(&results.adds);
        assert_eq!(
            nl.read_routes().await.unwrap(),
            all,
            "guards read back as guards"
        );
        let shown = ip(&name, &["route", "show", "proto", "104"]);
        assert!(
            shown.contains("blackhole 10.42.1.0/24 metric 4294967295"),
            "{shown}"
        );
        // The route wins while it exists.
        assert!(
            lookup("10.42.1.5").contains("dev wm-wg"),
            "{}",
            lookup("10.42.1.5")
        );
        // Gone behind our back: the packet is dropped, not sent by the default route.
        ip(&name, &["route", "del", "10.42.1.0/24", "dev", WG]);
        ip(&name, &["-6", "route", "del", "fd00:42::/64", "dev", WG]);
        let got = lookup("10.42.1.5");
        assert!(!got.contains(ETH), "would leak through the underlay: {got}");
        assert!(
            got.contains("blackhole") || got.contains("Invalid argument"),
            "{got}"
        );
        assert!(
            !lookup("fd00:42::5").contains(ETH),
            "{}",
            lookup("fd00:42::5")
        );
        assert_eq!(nl.read_routes().await.unwrap(), sorted(&guards));
        // Back again, the route wins again; deleting the route never takes its guard.
        assert_all_ok(
            &nl.apply_routes(&[real.clone(), real6.clone()], &[])
                .await
                .adds,
        );
        assert!(lookup("10.42.1.5").contains("dev wm-wg"));
        assert_all_ok(&nl.apply_routes(&[], std::slice::from_ref(&real)).await.dels);
        assert_eq!(
            nl.read_routes().await.unwrap(),
            sorted(&[guards[0].clone(), guards[1].clone(), real6.clone()])
        );
        // Deleting a guard never takes the route.
        assert_all_ok(
            &nl.apply_routes(std::slice::from_ref(&real), &[guards[0].clone()])
                .await
                .adds,
        );
        assert_eq!(
            nl.read_routes().await.unwrap(),
            sorted(&[real.clone(), guards[1].clone(), real6.clone()])
        );
        let results = nl
            .apply_routes(&[], &[real, real6, guards[1].clone()])
            .await;
        assert_all_ok(&results.dels);
        assert_eq!(nl.read_routes().await.unwrap(), Vec::<Route>::new());
    });
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_new_address_added_before_the_old_goes_keeps_every_route_and_without_it_the_guards_hold() {
    let ns = TestNs::new();
    let name = ns.name.clone();
    ns.run(devices(), async move |nl| {
        let (old, new) = (net("10.4.0.3/16"), net("10.4.0.2/16"));
        nl.add_address(WG, old).await.expect("address");
        let routes = vec![
            route(MAIN_TABLE, "10.42.1.0/24", None, RouteDev::WireGuard),
            route(MAIN_TABLE, "10.42.2.0/24", None, RouteDev::WireGuard),
        ];
        let all = wiremesh::desired::with_guards(&routes);
        assert_all_ok(&nl.apply_routes(&all, &[]).await.adds);
        // Renumbered as the planner does it: the new address first, then the old one goes.
        // The new one is a secondary of the same subnet; only promotion keeps it (and the
        // link's routes) when the primary is removed.
        nl.add_address(WG, new).await.expect("new address");
        assert_eq!(
            nl.promotes_secondaries(WG).await.unwrap(),
            Some(true),
            "promote_secondaries set over netlink"
        );
        nl.del_address(WG, old).await.expect("old address");
        assert_eq!(
            nl.read_link(WG).await.unwrap().unwrap().addresses,
            vec![new]
        );
        assert_eq!(nl.read_routes().await.unwrap(), all, "no route lost");

        // What the kernel does otherwise: the last IPv4 address gone, every route through the
        // link goes with it, without a word; the guards stay and hold the destinations.
        nl.del_address(WG, new).await.expect("last address");
        let left = nl.read_routes().await.unwrap();
        assert!(
            left.iter().all(|r| r.dev == RouteDev::Blackhole),
            "the kernel kept routes through a link without address: {left:?}"
        );
        assert_eq!(left.len(), routes.len(), "{left:?}");
        let shown = ip(&name, &["route", "show", "proto", "104"]);
        assert_eq!(shown.lines().count(), 2, "{shown}");
    });
}
