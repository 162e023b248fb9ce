//! The agent loop against an in-memory kernel (a fake of the `Kernel` trait only; the real
//! kernel is exercised by the namespace tests).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::reconcile::plan::simulate;
use crate::reconcile::{Op, OwnedState};

/// An in-memory kernel that applies ops like a correct kernel and can refuse routes to one
/// destination a number of times.
#[derive(Clone, Default)]
struct FakeKernel {
    state: Arc<Mutex<OwnedState>>,
    applied: Arc<Mutex<Vec<Op>>>,
    refuse: Arc<Mutex<Option<(ipnetwork::IpNetwork, usize)>>>,
    /// How many times operations were applied (one reconciliation each).
    reconciles: Arc<Mutex<usize>>,
    /// The operations of each reconciliation, in order, and when it began (tokio's clock).
    rounds: Arc<Mutex<Vec<Vec<Op>>>>,
    rounds_at: Arc<Mutex<Vec<tokio::time::Instant>>>,
    /// Drop every WireGuard route when an address is removed (as the kernel does with the last
    /// IPv4 address of a link), and count how often that happened.
    flush_on_address_removal: Arc<Mutex<Option<usize>>>,
    /// What holds the listen port; while set, configuring the device fails, as with userspace
    /// WireGuard, or, with `port_blocks_link_up`, bringing it up does, as with the kernel's.
    port_holder: Arc<Mutex<Option<crate::reconcile::port::PortHolder>>>,
    port_blocks_link_up: bool,
}

const KEY: WgKey = WgKey([7; 32]);

impl Kernel for FakeKernel {
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError> {
        Ok(self.state.lock().unwrap().clone())
    }
    async fn port_holder(&mut self, _port: u16) -> Option<crate::reconcile::port::PortHolder> {
        self.port_holder.lock().unwrap().clone()
    }
    async fn apply(&mut self, op: &Op) -> Result<(), KernelError> {
        if self.port_holder.lock().unwrap().is_some() {
            match op {
                Op::ConfigureDevice { .. } if !self.port_blocks_link_up => {
                    return Err(KernelError::WireGuard {
                        op: "configure wiremesh0".into(),
                        message: "invalid input parameter".into(),
                    });
                }
                Op::LinkUp if self.port_blocks_link_up => {
                    return Err(KernelError::Netlink {
                        op: "link up".into(),
                        message: "Address in use".into(),
                    });
                }
                _ => {}
            }
        }
        if let Op::AddRoute(r) = op {
            let mut refuse = self.refuse.lock().unwrap();
            if let Some((dst, n)) = refuse.as_mut()
                && *dst == r.dst
                && r.dev != crate::desired::RouteDev::Blackhole
                && *n > 0
            {
                *n -= 1;
                return Err(KernelError::Unsupported("refused by the test".into()));
            }
        }
        simulate(
            &mut self.state.lock().unwrap(),
            std::slice::from_ref(op),
            KEY,
        );
        if let (Op::DelAddress { .. }, Some(flushes)) =
            (op, self.flush_on_address_removal.lock().unwrap().as_mut())
        {
            *flushes += 1;
            self.state
                .lock()
                .unwrap()
                .routes
                .retain(|r| r.dev != crate::desired::RouteDev::WireGuard);
        }
        self.applied.lock().unwrap().push(op.clone());
        Ok(())
    }
    async fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        *self.reconciles.lock().unwrap() += 1;
        self.rounds.lock().unwrap().push(ops.to_vec());
        self.rounds_at
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(self.apply(op).await);
        }
        out
    }
}

fn config(dir: &std::path::Path) -> AgentConfig {
    let nodes = dir.join("nodes.yaml");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-clouds.yaml"),
        &nodes,
    )
    .unwrap();
    AgentConfig {
        node: NodeName("fra-1".into()),
        registry: RegistryConfig::File(FileRegistry { nodes, peers: None }),
        check_in_period: Duration::from_secs(30),
        failover_hold: None,
        private_key: dir.join("key"),
        topology_label: crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL.into(),
        resync_period: Duration::from_secs(3600),
        kernel: KernelConfig {
            interface: "wiremesh0".into(),
            bridge: "wmbr0".into(),
            wireguard: "auto".into(),
            wireguard_userspace: "wireguard-go".into(),
            firewall: "auto".into(),
            cni_config: dir.join("cni.conflist"),
        },
        mesh: MeshOptions {
            granularity: crate::model::Granularity::Full,
            ..MeshOptions::default()
        },
        listen: None,
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn peers(k: &FakeKernel) -> usize {
    k.state
        .lock()
        .unwrap()
        .wireguard
        .as_ref()
        .map_or(0, |w| w.peers.len())
}

/// A running agent over `kernel`: its kernel-event sender, and what stops it.
struct Running {
    events: mpsc::Sender<&'static str>,
    observer: Observer,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

fn nodes_file(cfg: &AgentConfig) -> std::path::PathBuf {
    match &cfg.registry {
        RegistryConfig::File(f) => f.nodes.clone(),
        RegistryConfig::Kubernetes(_) => unreachable!("the tests use files"),
    }
}

impl Running {
    fn start(cfg: AgentConfig, kernel: &FakeKernel) -> Running {
        let RegistryConfig::File(files) = cfg.registry.clone() else {
            unreachable!("the tests use files")
        };
        let registry = file_source(files, &cfg.topology_label).unwrap();
        Running::with_registry(cfg, kernel, registry, None)
    }

    fn with_registry(
        cfg: AgentConfig,
        kernel: &FakeKernel,
        registry: mpsc::Receiver<Batch>,
        cluster: Option<ClusterLink>,
    ) -> Running {
        let (events, rx) = mpsc::channel(4);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut k = kernel.clone();
        let observer = Observer::new(&cfg.node.0, Some(KEY));
        let inputs = Inputs {
            registry,
            cluster,
            kernel_events: rx,
            host: HostInfo::default(),
            observer: observer.clone(),
            device: None,
        };
        let task = tokio::spawn(async move {
            run_with(cfg, &mut k, KEY, inputs, async {
                let _ = stop_rx.await;
            })
            .await
        });
        Running {
            events,
            observer,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn agent_follows_the_file_and_restores_lost_routes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let nodes_path = nodes_file(&cfg);
    let kernel = FakeKernel::default();
    let agent = Running::start(cfg, &kernel);
    wait_for("two peers", || peers(&kernel) == 2).await;
    // Two routes, each with its blackhole guard, and the guard of the mesh subnet (this node
    // leads: its address's connected route carries the subnet).
    assert_eq!(kernel.state.lock().unwrap().routes.len(), 5);

    // A node leaves the file: its peer and route go.
    let text = std::fs::read_to_string(&nodes_path).unwrap();
    let cut = text
        .find("- apiVersion: v1\n  kind: Node\n  metadata:\n    name: par-1")
        .unwrap();
    std::fs::write(&nodes_path, &text[..cut]).unwrap();
    wait_for("one peer", || peers(&kernel) == 1).await;
    wait_for("one route, its guard and the mesh subnet's", || {
        kernel.state.lock().unwrap().routes.len() == 3
    })
    .await;

    // A route of ours disappears from the kernel: the agent puts it back when told.
    let lost = kernel.state.lock().unwrap().routes.pop().unwrap();
    agent.events.send("route of ours deleted").await.unwrap();
    wait_for("route restored", || {
        kernel.state.lock().unwrap().routes.contains(&lost)
    })
    .await;

    agent.stop().await;
}

#[tokio::test]
async fn refused_operation_is_retried_while_the_rest_is_programmed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let kernel = FakeKernel::default();
    let dst: ipnetwork::IpNetwork = "10.42.2.0/24".parse().unwrap();
    *kernel.refuse.lock().unwrap() = Some((dst, 1));
    let agent = Running::start(cfg, &kernel);
    // Everything else is programmed at once (the refused route's guard too: its packets are
    // dropped, not sent in plaintext); the refused route arrives with the retry (1 s).
    wait_for("peers", || peers(&kernel) == 2).await;
    let held =
        |dev_is_guard: bool| {
            kernel.state.lock().unwrap().routes.iter().any(|r| {
                r.dst == dst && (r.dev == crate::desired::RouteDev::Blackhole) == dev_is_guard
            })
        };
    assert!(!held(false));
    assert!(held(true));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(held(false));
    agent.stop().await;
}

#[tokio::test]
async fn unchanged_registry_causes_no_kernel_operation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let nodes_path = nodes_file(&cfg);
    let kernel = FakeKernel::default();
    let agent = Running::start(cfg, &kernel);
    wait_for("peers", || peers(&kernel) == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = kernel.applied.lock().unwrap().len();
    // Rewriting the same content is an event with no change.
    let text = std::fs::read_to_string(&nodes_path).unwrap();
    std::fs::write(&nodes_path, text).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kernel.applied.lock().unwrap().len(), before);
    agent.stop().await;
}

fn three_clouds() -> Vec<MeshNode> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-clouds.yaml");
    crate::registry::file::load_nodes(&path, crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL)
        .unwrap()
        .items
}

fn batch(events: Vec<Event>, synced: bool) -> Batch {
    Batch {
        events,
        synced,
        connected: true,
        diagnostics: None,
        local: None,
    }
}

/// An agent for fra-1 over `kernel`, fed by a channel that has listed the three clouds, once it
/// has programmed their two peers.
async fn fra_1_listed(
    dir: &std::path::Path,
    kernel: &FakeKernel,
) -> (Running, mpsc::Sender<Batch>, Vec<MeshNode>) {
    let (tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(config(dir), kernel, rx, None);
    let nodes = three_clouds();
    let all = nodes.iter().cloned().map(Event::node).collect();
    tx.send(batch(all, true)).await.unwrap();
    wait_for("the mesh's two peers", || peers(kernel) == 2).await;
    (agent, tx, nodes)
}

#[tokio::test]
async fn the_last_runs_guards_are_in_place_before_the_registry_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let saved: Vec<ipnetwork::IpNetwork> = vec![
        "10.42.1.0/24".parse().unwrap(),
        "10.42.2.0/24".parse().unwrap(),
    ];
    guards::save(&guards::path_for(&cfg.private_key), &saved).unwrap();
    let kernel = FakeKernel::default();
    // A registry that never lists (an API server still away after a reboot).
    let (_tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(cfg, &kernel, rx, None);
    wait_for("the saved guards", || {
        kernel.state.lock().unwrap().routes.len() == 2
    })
    .await;
    let st = kernel.state.lock().unwrap().clone();
    for (r, dst) in st.routes.iter().zip(&saved) {
        assert_eq!(
            r,
            &crate::desired::Route::blackhole(crate::desired::MAIN_TABLE, *dst)
        );
    }
    // Nothing else before the list: no interface, no peer, no CNI config.
    assert!(
        st.link.is_none() && st.wireguard.is_none() && st.cni.is_none(),
        "{st:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn the_saved_guards_follow_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    let (agent, tx, nodes) = fra_1_listed(dir.path(), &kernel).await;
    let path = guards::path_for(&dir.path().join("key"));
    let saved = || guards::load(&path).unwrap();
    // The mesh subnet (this node leads) and both remote pod CIDRs.
    let remote: Vec<ipnetwork::IpNetwork> = vec![
        "10.4.0.0/16".parse().unwrap(),
        "10.42.1.0/24".parse().unwrap(),
        "10.42.2.0/24".parse().unwrap(),
    ];
    wait_for("both remote pod CIDRs saved", || saved() == remote).await;
    tx.send(batch(vec![Event::NodeRemove(nodes[2].name.clone())], true))
        .await
        .unwrap();
    wait_for("par-1's pod CIDR no longer saved", || {
        saved() == remote[..2]
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn routes_the_kernel_drops_with_an_old_address_are_restored_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    let (agent, tx, nodes) = fra_1_listed(dir.path(), &kernel).await;
    let address = || {
        let st = kernel.state.lock().unwrap();
        st.link.as_ref().and_then(|l| l.addresses.first().copied())
    };
    let before = address();
    *kernel.flush_on_address_removal.lock().unwrap() = Some(0);
    // A node that sorts before fra-1 joins: fra-1's mesh IP moves, the old address goes, and
    // this kernel drops every WireGuard route with it, telling nobody.
    let mut first = nodes[1].clone();
    first.name = NodeName("aaa-1".into());
    first.key = Some(WgKey([9; 32]));
    first.pod_cidrs = vec!["10.42.9.0/24".parse().unwrap()];
    first.endpoint = Some("203.0.113.99:51820".parse().unwrap());
    first.internal_ip = None;
    tx.send(batch(vec![Event::node(first)], true))
        .await
        .unwrap();
    wait_for("three peers and a new address", || {
        peers(&kernel) == 3 && address().is_some() && address() != before
    })
    .await;
    let wireguard_routes = || {
        kernel
            .state
            .lock()
            .unwrap()
            .routes
            .iter()
            .filter(|r| r.dev == crate::desired::RouteDev::WireGuard)
            .count()
    };
    // The three remote pod CIDRs are back without any kernel event or resync (an hour here).
    for _ in 0..300 {
        if wireguard_routes() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        wireguard_routes(),
        3,
        "{:?}",
        kernel.state.lock().unwrap().routes
    );
    assert!(
        kernel
            .flush_on_address_removal
            .lock()
            .unwrap()
            .is_some_and(|n| n >= 1),
        "the kernel never dropped the routes: the test proves nothing"
    );
    agent.stop().await;
}

#[tokio::test]
async fn nothing_is_programmed_or_removed_before_the_first_complete_list() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let kernel = FakeKernel::default();
    // The kernel already holds a peer from before a restart.
    let stale = crate::desired::WgPeer {
        public_key: WgKey([9; 32]),
        endpoint: None,
        allowed_ips: vec!["10.99.0.0/24".parse().unwrap()],
        persistent_keepalive: 0,
        preshared_key: None,
        name: String::new(),
    };
    simulate(
        &mut kernel.state.lock().unwrap(),
        &[Op::CreateInterface, Op::UpsertPeer(Box::new(stale.clone()))],
        KEY,
    );
    let (tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(cfg, &kernel, rx, None);
    let nodes = three_clouds();
    // Part of a list: the agent waits.
    tx.send(batch(vec![Event::node(nodes[0].clone())], false))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        kernel.applied.lock().unwrap().is_empty(),
        "programmed before the list was complete"
    );
    assert_eq!(
        peers(&kernel),
        1,
        "the old peer must stay until the list is complete"
    );
    // The list completes: the mesh is programmed and the stale peer goes.
    let rest = nodes[1..].iter().cloned().map(Event::node).collect();
    tx.send(batch(rest, true)).await.unwrap();
    wait_for("the mesh's two peers, the stale one gone", || {
        let st = kernel.state.lock().unwrap();
        st.wireguard.as_ref().is_some_and(|w| {
            w.peers.len() == 2 && !w.peers.iter().any(|p| p.public_key == stale.public_key)
        })
    })
    .await;
    // A removal after the list is real.
    tx.send(batch(vec![Event::NodeRemove(nodes[2].name.clone())], true))
        .await
        .unwrap();
    wait_for("one peer", || peers(&kernel) == 1).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_burst_taken_in_one_batch_reaches_the_kernel_as_its_net_change() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    let (agent, tx, nodes) = fra_1_listed(dir.path(), &kernel).await;
    let before = kernel.applied.lock().unwrap().len();
    // par-1 moves three times and hel-1 once, all in one batch: four engine deltas.
    let moved = |i: usize, port: u16| {
        let mut n = nodes[i].clone();
        n.endpoint = Some(format!("203.0.113.99:{port}").parse().unwrap());
        Event::node(n)
    };
    let (par, hel) = (key_of(&nodes, "par-1"), key_of(&nodes, "hel-1"));
    let index = |name: &str| nodes.iter().position(|n| n.name.0 == name).unwrap();
    let burst = vec![
        moved(index("par-1"), 40001),
        moved(index("par-1"), 40002),
        moved(index("hel-1"), 40010),
        moved(index("par-1"), 40003),
    ];
    tx.send(batch(burst, true)).await.unwrap();
    let endpoint_of = |k: WgKey| {
        let st = kernel.state.lock().unwrap();
        st.wireguard
            .as_ref()
            .and_then(|w| w.peers.iter().find(|p| p.public_key == k))
            .and_then(|p| p.endpoint.as_ref().map(ToString::to_string))
    };
    wait_for("the last endpoints", || {
        endpoint_of(par).as_deref() == Some("203.0.113.99:40003")
            && endpoint_of(hel).as_deref() == Some("203.0.113.99:40010")
    })
    .await;
    let ops = kernel.applied.lock().unwrap()[before..].to_vec();
    let upserted: Vec<WgKey> = ops
        .iter()
        .filter_map(|o| match o {
            Op::UpsertPeer(p) => Some(p.public_key),
            _ => None,
        })
        .collect();
    assert_eq!(
        upserted.len(),
        2,
        "one upsert per peer, not per event: {ops:?}"
    );
    assert!(
        upserted.contains(&par) && upserted.contains(&hel),
        "{ops:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_batchs_cheap_changes_reach_the_kernel_before_its_costly_ones() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    let (agent, tx, nodes) = fra_1_listed(dir.path(), &kernel).await;
    let before = kernel.rounds.lock().unwrap().len();
    let index = |name: &str| nodes.iter().position(|n| n.name.0 == name).unwrap();
    let mut moved = nodes[index("par-1")].clone();
    moved.endpoint = Some("203.0.113.99:40001".parse().unwrap());
    // A node joining adds a segment (in full granularity it renumbers every segment after
    // it): costly. It comes first in the batch; the move still reaches the kernel first.
    let joined = joining(&nodes, "zrh-1", 9);
    let par = key_of(&nodes, "par-1");
    tx.send(batch(vec![Event::node(joined), Event::node(moved)], true))
        .await
        .unwrap();
    wait_for("the joined node's peer", || {
        peer_keys(&kernel).contains(&WgKey([9; 32]))
    })
    .await;
    let rounds = kernel.rounds.lock().unwrap()[before..].to_vec();
    let upserts = |ops: &[Op]| -> Vec<WgKey> {
        ops.iter()
            .filter_map(|o| match o {
                Op::UpsertPeer(p) => Some(p.public_key),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        rounds.len(),
        2,
        "the cheap part, then the costly one: {rounds:?}"
    );
    assert_eq!(upserts(&rounds[0]), vec![par], "{rounds:?}");
    assert!(upserts(&rounds[1]).contains(&WgKey([9; 32])), "{rounds:?}");
    agent.stop().await;
}

/// A node of the three clouds' mesh joining as `name` with key byte `k` and pod CIDR
/// 10.`k`.0.0/24: in full granularity a new segment (costly).
fn joining(nodes: &[MeshNode], name: &str, k: u8) -> MeshNode {
    let mut n = nodes[nodes.len() - 1].clone();
    n.name = NodeName(name.into());
    n.location = name.into();
    n.key = Some(WgKey([k; 32]));
    n.endpoint = Some(format!("203.0.113.{k}:51820").parse().unwrap());
    n.internal_ip = None;
    n.pod_cidrs = vec![format!("10.{k}.0.0/24").parse().unwrap()];
    n
}

#[tokio::test(start_paused = true)]
async fn joins_in_quick_succession_wait_for_the_costly_gap_while_cheap_changes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    let (agent, tx, nodes) = fra_1_listed(dir.path(), &kernel).await;
    let round_of = |k: WgKey| {
        let rounds = kernel.rounds.lock().unwrap();
        rounds.iter().position(|ops| {
            ops.iter()
                .any(|o| matches!(o, Op::UpsertPeer(p) if p.public_key == k))
        })
    };
    let at = |i: usize| kernel.rounds_at.lock().unwrap()[i];
    tx.send(batch(vec![Event::node(joining(&nodes, "zrh-1", 91))], true))
        .await
        .unwrap();
    wait_for("the first join", || round_of(WgKey([91; 32])).is_some()).await;
    let first = round_of(WgKey([91; 32])).unwrap();
    // A second join right after it, with an endpoint move of par-1.
    let index = |name: &str| nodes.iter().position(|n| n.name.0 == name).unwrap();
    let mut moved = nodes[index("par-1")].clone();
    moved.endpoint = Some("203.0.113.99:40001".parse().unwrap());
    let par = key_of(&nodes, "par-1");
    tx.send(batch(
        vec![
            Event::node(joining(&nodes, "vie-1", 92)),
            Event::node(moved),
        ],
        true,
    ))
    .await
    .unwrap();
    wait_for("the second join", || round_of(WgKey([92; 32])).is_some()).await;
    let (moved_in, second) = (round_of(par).unwrap(), round_of(WgKey([92; 32])).unwrap());
    assert!(moved_in < second, "the move waited for the join");
    assert!(
        at(moved_in) - at(first) < COSTLY_GAP,
        "the move waited for the gap"
    );
    assert!(
        at(second) - at(first) >= COSTLY_GAP,
        "two recomputations for joins {:?} apart",
        at(second) - at(first)
    );
    agent.stop().await;
}

#[tokio::test]
async fn batches_waiting_together_are_reconciled_together() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let kernel = FakeKernel::default();
    let (tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(cfg, &kernel, rx, None);
    let nodes = three_clouds();
    let all = nodes.iter().cloned().map(Event::node).collect();
    tx.send(batch(all, true)).await.unwrap();
    wait_for("the mesh's two peers", || peers(&kernel) == 2).await;
    let before = *kernel.reconciles.lock().unwrap();
    // Two batches queue up before the agent runs again (this test's runtime has one thread).
    for (i, port) in [(1, 40020), (2, 40021)] {
        let mut n = nodes[i].clone();
        n.endpoint = Some(format!("203.0.113.98:{port}").parse().unwrap());
        tx.send(batch(vec![Event::node(n)], true)).await.unwrap();
    }
    let endpoints = || {
        let st = kernel.state.lock().unwrap();
        st.wireguard.as_ref().map_or(0, |w| {
            w.peers
                .iter()
                .filter(|p| {
                    p.endpoint
                        .as_ref()
                        .is_some_and(|e| e.to_string().starts_with("203.0.113.98:"))
                })
                .count()
        })
    };
    wait_for("both moves in the kernel", || endpoints() == 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        *kernel.reconciles.lock().unwrap() - before,
        1,
        "one reconciliation for both"
    );
    agent.stop().await;
}

#[test]
fn the_local_node_is_what_this_agent_holds_and_is_about_to_publish() {
    let mut n = MeshNode::new("fra-1");
    n.key = Some(WgKey([1; 32]));
    n.last_seen = Some(1);
    let own = Publication {
        endpoint: Some("203.0.113.1:51820".parse().unwrap()),
        internal_ip: Some("10.0.0.1/24".parse().unwrap()),
        ..Default::default()
    };
    overlay_local(&mut n, KEY, None, Some(&own));
    assert_eq!(n.key, Some(KEY));
    assert_eq!(
        n.last_seen, None,
        "its own heartbeat never makes the local node stale"
    );
    assert_eq!(n.endpoint, own.endpoint);
    assert_eq!(n.internal_ip, own.internal_ip);
    // What the registry says wins over what is detected.
    let mut n2 = MeshNode::new("fra-1");
    n2.endpoint = Some("198.51.100.1:1".parse().unwrap());
    overlay_local(&mut n2, KEY, None, Some(&own));
    assert_eq!(n2.endpoint.unwrap().to_string(), "198.51.100.1:1");
}

fn key_of(nodes: &[MeshNode], name: &str) -> WgKey {
    nodes
        .iter()
        .find(|n| n.name.0 == name)
        .and_then(|n| n.key)
        .unwrap()
}

fn peer_keys(k: &FakeKernel) -> Vec<WgKey> {
    let st = k.state.lock().unwrap();
    st.wireguard
        .as_ref()
        .map(|w| w.peers.iter().map(|p| p.public_key).collect())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn heartbeats_are_judged_stale_only_after_the_api_has_been_live_for_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.check_in_period = Duration::from_secs(30);
    let kernel = FakeKernel::default();
    let (tx, rx) = mpsc::channel(4);
    // A cluster link whose API server never answers: publishing fails and is retried.
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let link = ClusterLink::spawn(client, cfg.node.0.clone(), cfg.check_in_period);
    let agent = Running::with_registry(cfg, &kernel, rx, Some(link));
    let start = tokio::time::Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);

    // Every heartbeat is ten minutes old, as after an API-server outage.
    let mut nodes = three_clouds();
    let old = unix_now() - 600;
    for n in &mut nodes {
        n.last_seen = Some(old);
    }
    let events = nodes.iter().cloned().map(Event::node).collect();
    tx.send(batch(events, true)).await.unwrap();
    wait_for("two peers", || peers(&kernel) == 2).await;
    // Not judged before the grace (82.5 s at most; check-in ticks every 30 s).
    assert!(staleness_grace() > Duration::from_secs(60));
    tokio::time::sleep_until(at(75)).await;
    assert_eq!(peers(&kernel), 2, "judged stale before the grace");

    // The API goes away again before the grace: the judgement waits throughout the outage.
    let lost = Batch {
        connected: false,
        ..batch(Vec::new(), true)
    };
    tx.send(lost).await.unwrap();
    tokio::time::sleep_until(at(200)).await;
    assert_eq!(peers(&kernel), 2, "an outage made nodes stale");

    // Back at 200 s; par-1 publishes a fresh heartbeat, hel-1 never does.
    let mut par = nodes.iter().find(|n| n.name.0 == "par-1").unwrap().clone();
    par.last_seen = Some(unix_now());
    tx.send(batch(vec![Event::node(par)], true)).await.unwrap();
    tokio::time::sleep_until(at(275)).await;
    assert_eq!(
        peers(&kernel),
        2,
        "judged stale within the grace after reconnecting"
    );
    tokio::time::sleep_until(at(320)).await;
    assert_eq!(
        peer_keys(&kernel),
        vec![key_of(&nodes, "par-1")],
        "hel-1's stale heartbeat leaves it out once the grace is over"
    );
    agent.stop().await;
}

/// The FakeKernel's WireGuard peers as a device read would report them: no handshake yet,
/// counters from the key's first byte.
struct FakeDevice(FakeKernel);

impl http::DeviceReader for FakeDevice {
    fn peer_stats(&self) -> Result<Vec<crate::reconcile::wg::WgPeerStats>, KernelError> {
        let st = self.0.state.lock().unwrap();
        Ok(st
            .wireguard
            .iter()
            .flat_map(|w| &w.peers)
            .map(|p| crate::reconcile::wg::WgPeerStats {
                public_key: p.public_key,
                endpoint: None,
                allowed_ips: p.allowed_ips.clone(),
                last_handshake: Some(std::time::SystemTime::now() - Duration::from_secs(3)),
                rx_bytes: u64::from(p.public_key.0[0]),
                tx_bytes: 1,
            })
            .collect())
    }
}

/// Serve the HTTP endpoint over `agent`'s observer and `kernel` on a free loopback port.
async fn serve(agent: &Running, kernel: &FakeKernel) -> crate::cli::status::AgentUrl {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = http::Server::new(agent.observer.clone());
    server.set_device(Arc::new(FakeDevice(kernel.clone())));
    tokio::spawn(server.serve(listener, std::future::pending()));
    crate::cli::status::AgentUrl {
        host: "127.0.0.1".into(),
        port,
    }
}

async fn http_get(url: &crate::cli::status::AgentUrl, path: &str) -> crate::cli::status::Reply {
    crate::cli::status::get(url, path, Duration::from_secs(5))
        .await
        .unwrap()
}

#[tokio::test]
async fn readiness_flips_only_after_the_first_list_and_a_successful_reconciliation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let kernel = FakeKernel::default();
    // The first reconciliation fails on one route; the retry (after about 1 s) succeeds.
    let dst: ipnetwork::IpNetwork = "10.42.2.0/24".parse().unwrap();
    *kernel.refuse.lock().unwrap() = Some((dst, 1));
    let (tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(cfg, &kernel, rx, None);
    let url = serve(&agent, &kernel).await;

    let r = http_get(&url, "/readyz").await;
    assert_eq!(r.code, 503, "{r:?}");
    assert_eq!(r.body, "waiting for the registry's first complete list\n");
    assert_eq!(http_get(&url, "/healthz").await.code, 200);

    // Part of a list: still waiting for it.
    let nodes = three_clouds();
    tx.send(batch(vec![Event::node(nodes[0].clone())], false))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = http_get(&url, "/readyz").await;
    assert_eq!(r.code, 503);
    assert!(r.body.contains("first complete list"), "{r:?}");

    // The list completes; the first reconciliation is partial: not ready, and why.
    let rest = nodes[1..].iter().cloned().map(Event::node).collect();
    tx.send(batch(rest, true)).await.unwrap();
    wait_for("the partial reconciliation", || {
        kernel.refuse.lock().unwrap().is_some_and(|(_, n)| n == 0)
    })
    .await;
    let r = http_get(&url, "/readyz").await;
    assert_eq!(r.code, 503, "ready after a failed reconciliation: {r:?}");
    assert!(
        r.body
            .starts_with("waiting for the first successful reconciliation (last: route: "),
        "{r:?}"
    );
    assert_eq!(r.body.lines().count(), 1, "{r:?}");
    let m = http_get(&url, "/metrics").await.body;
    assert!(m.contains("wiremesh_ready 0\n"), "{m}");
    assert!(
        m.contains("wiremesh_reconcile_errors_total{kind=\"route\"} 1\n"),
        "{m}"
    );

    // The retry succeeds: ready, and it stays so.
    let mut ready = None;
    for _ in 0..50 {
        let r = http_get(&url, "/readyz").await;
        if r.code == 200 {
            ready = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = ready.expect("ready within 5 s of the retry");
    assert_eq!(r.body, "ready\n");
    let m = http_get(&url, "/metrics").await.body;
    assert!(m.contains("wiremesh_ready 1\n"), "{m}");
    assert!(m.contains("wiremesh_mesh_nodes 3\n"), "{m}");
    assert!(m.contains("wiremesh_leader 1\n"), "{m}");
    let status: crate::status::AgentStatus =
        serde_json::from_str(&http_get(&url, "/status").await.body).unwrap();
    assert!(status.ready);
    assert_eq!(status.node, "fra-1");
    let names: Vec<&str> = status.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["hel-1", "par-1"]);
    agent.stop().await;
}

#[tokio::test]
async fn metrics_and_status_never_show_a_preshared_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let psk = WgKey([0x5a; 32]);
    let peers_file = dir.path().join("peers.yaml");
    std::fs::write(
        &peers_file,
        format!(
            "apiVersion: kilo.squat.ai/v1alpha1\nkind: Peer\nmetadata:\n  name: laptop\nspec:\n  \
             allowedIPs: [10.5.0.1/32]\n  publicKey: {}\n  presharedKey: {psk}\n",
            WgKey([0x33; 32])
        ),
    )
    .unwrap();
    if let RegistryConfig::File(f) = &mut cfg.registry {
        f.peers = Some(peers_file);
    }
    let kernel = FakeKernel::default();
    let agent = Running::start(cfg, &kernel);
    let url = serve(&agent, &kernel).await;
    wait_for("three peers, the laptop with its preshared key", || {
        let st = kernel.state.lock().unwrap();
        st.wireguard.as_ref().is_some_and(|w| {
            w.peers.len() == 3 && w.peers.iter().any(|p| p.preshared_key == Some(psk))
        })
    })
    .await;
    // The kernel holds the key (so the agent had it); the endpoint must not show it.
    let metrics = http_get(&url, "/metrics").await.body;
    let status = http_get(&url, "/status").await.body;
    let hex: String = psk.0.iter().map(|b| format!("{b:02x}")).collect();
    for (what, body) in [("/metrics", &metrics), ("/status", &status)] {
        assert!(
            body.contains(&WgKey([0x33; 32]).to_string()),
            "{what} names the laptop by key: {body}"
        );
        assert!(body.contains("laptop"), "{what}: {body}");
        assert!(
            !body.contains(&psk.to_string()),
            "{what} shows the preshared key: {body}"
        );
        assert!(
            !body.to_lowercase().contains(&hex),
            "{what} shows the preshared key in hex"
        );
    }
    assert!(metrics.contains("kind=\"peer\""), "{metrics}");
    agent.stop().await;
}

/// A Kubernetes API server that answers every Node patch with the Node and keeps the patches'
/// bodies; nothing else. Returns its address.
async fn patch_recorder(patches: Arc<Mutex<Vec<serde_json::Value>>>) -> std::net::SocketAddr {
    use axum::extract::{Path, State};
    async fn patch(
        State(seen): State<Arc<Mutex<Vec<serde_json::Value>>>>,
        Path(name): Path<String>,
        body: String,
    ) -> axum::response::Response {
        seen.lock()
            .unwrap()
            .push(serde_json::from_str(&body).unwrap());
        let node =
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            node.to_string(),
        )
            .into_response()
    }
    use axum::response::IntoResponse as _;
    let app = axum::Router::new()
        .route("/api/v1/nodes/{name}", axum::routing::patch(patch))
        .with_state(patches);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A cluster link for `cfg`'s node to a [`patch_recorder`], and the patches it records.
async fn recorded_link(cfg: &AgentConfig) -> (Arc<Mutex<Vec<serde_json::Value>>>, ClusterLink) {
    let patches = Arc::new(Mutex::new(Vec::new()));
    let addr = patch_recorder(patches.clone()).await;
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap()))
            .unwrap();
    let link = ClusterLink::spawn(client, cfg.node.0.clone(), cfg.check_in_period);
    (patches, link)
}

/// The value of annotation `key` in a recorded merge patch: `None` when the patch removes it.
fn annotation(patch: &serde_json::Value, key: &str) -> Option<String> {
    patch["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test]
async fn a_held_listen_port_withholds_the_endpoint_until_the_device_takes_the_port() {
    withholds_the_endpoint_while_the_port_is_held(false).await;
}

#[tokio::test]
async fn a_held_listen_port_withholds_the_endpoint_also_when_the_kernel_refuses_the_link_up() {
    withholds_the_endpoint_while_the_port_is_held(true).await;
}

/// The agent with a Kubernetes link while kilo0 holds the port: the Node's endpoint and mesh IP
/// are never published until the port is free, then they are. `kernel_style`: the device takes
/// the port while down and refuses to come up (kernel WireGuard), instead of refusing the port.
async fn withholds_the_endpoint_while_the_port_is_held(kernel_style: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let kernel = FakeKernel {
        port_blocks_link_up: kernel_style,
        ..FakeKernel::default()
    };
    *kernel.port_holder.lock().unwrap() = Some(crate::reconcile::port::PortHolder::WireGuardLink {
        name: "kilo0".into(),
    });
    let (patches, link) = recorded_link(&cfg).await;
    let (tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(cfg, &kernel, rx, Some(link));
    let mut local = k8s_openapi::api::core::v1::Node::default();
    local.metadata.name = Some("fra-1".into());
    local.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        addresses: Some(vec![k8s_openapi::api::core::v1::NodeAddress {
            type_: "InternalIP".into(),
            address: "203.0.113.10".into(),
        }]),
        ..Default::default()
    });
    let events = three_clouds().into_iter().map(Event::node).collect();
    tx.send(Batch {
        local: Some(Box::new(local)),
        ..batch(events, true)
    })
    .await
    .unwrap();

    // Reconciled with the port held: peers programmed, not ready, nothing to reach it at.
    wait_for("the peers", || peers(&kernel) == 2).await;
    wait_for("a publication", || !patches.lock().unwrap().is_empty()).await;
    let why = agent.observer.readiness().unwrap_err();
    assert_eq!(
        why,
        "not serving the mesh: UDP port 51820 is held by WireGuard interface kilo0 (left by \
         Kilo: remove it with `ip link del kilo0` after stopping kg)"
    );
    for p in patches.lock().unwrap().iter() {
        assert_eq!(annotation(p, "kilo.squat.ai/endpoint"), None, "{p}");
        assert_eq!(annotation(p, "kilo.squat.ai/wireguard-ip"), None, "{p}");
        assert_eq!(
            annotation(p, "kilo.squat.ai/key"),
            Some(KEY.to_string()),
            "the key stays published: {p}"
        );
    }

    // The holder goes: the retry configures the device, and the endpoint is published.
    *kernel.port_holder.lock().unwrap() = None;
    let published = || {
        patches
            .lock()
            .unwrap()
            .last()
            .and_then(|p| annotation(p, "kilo.squat.ai/endpoint"))
    };
    for _ in 0..50 {
        if published().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published().as_deref(), Some("203.0.113.10:51820"));
    let last = patches.lock().unwrap().last().cloned().unwrap();
    assert!(
        annotation(&last, "kilo.squat.ai/wireguard-ip").is_some(),
        "{last}"
    );
    assert_eq!(agent.observer.readiness(), Ok(()));
    assert!(
        kernel
            .applied
            .lock()
            .unwrap()
            .iter()
            .any(|op| matches!(op, Op::ConfigureDevice { listen_port: 51820 })),
        "the device took the port"
    );
    assert!(
        kernel.applied.lock().unwrap().contains(&Op::LinkUp),
        "the device came up"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_stopping_agent_writes_a_last_heartbeat_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let kernel = FakeKernel::default();
    let (patches, link) = recorded_link(&cfg).await;
    let (tx, rx) = mpsc::channel(4);
    let agent = Running::with_registry(cfg, &kernel, rx, Some(link));
    let events = three_clouds().into_iter().map(Event::node).collect();
    tx.send(batch(events, true)).await.unwrap();
    wait_for("a publication", || !patches.lock().unwrap().is_empty()).await;
    let before = patches.lock().unwrap().len();
    let stopped_at = unix_now();
    agent.stop().await;

    let patches = patches.lock().unwrap();
    assert_eq!(
        patches.len(),
        before + 1,
        "one patch on stopping: {patches:?}"
    );
    let last = patches.last().unwrap();
    let written: Vec<&String> = last["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        written,
        ["kilo.squat.ai/last-seen", "wiremesh.io/last-seen"],
        "only the heartbeat: {last}"
    );
    let seen: i64 = annotation(last, "wiremesh.io/last-seen")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        seen >= stopped_at,
        "a fresh heartbeat: {seen} < {stopped_at}"
    );
}

/// Counts WARN and ERROR events of the current thread's subscriber (the tests' runtimes run the
/// agent on the test's thread).
#[derive(Clone, Default)]
struct WarnCounter(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarnCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }
}

#[tokio::test]
async fn a_pending_retry_and_the_local_node_leaving_the_registry_do_not_spin_the_loop() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let warnings = WarnCounter::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    // One route is refused for good: a retry is always pending.
    let dst: ipnetwork::IpNetwork = "10.42.2.0/24".parse().unwrap();
    *kernel.refuse.lock().unwrap() = Some((dst, usize::MAX));
    let (agent, tx, _) = fra_1_listed(dir.path(), &kernel).await;
    let reconciles = *kernel.reconciles.lock().unwrap();
    // This node drops out of the registry while the retry is pending.
    tx.send(batch(
        vec![Event::NodeRemove(NodeName("fra-1".into()))],
        true,
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let seen = warnings.0.lock().unwrap().clone();
    let lost: Vec<&String> = seen
        .iter()
        .filter(|w| w.contains("not in the cluster"))
        .collect();
    assert_eq!(
        lost.len(),
        1,
        "said once, not per turn: {} lines",
        lost.len()
    );
    assert!(
        *kernel.reconciles.lock().unwrap() - reconciles <= 1,
        "the kernel is left as it is while this node is out of the registry"
    );
    let why = agent.observer.readiness().unwrap_err();
    assert!(why.contains("not in the cluster"), "{why}");
    agent.stop().await;
}

#[tokio::test]
async fn a_ready_agent_is_not_ready_while_the_kernel_refuses_part_of_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = FakeKernel::default();
    let (agent, tx, nodes) = fra_1_listed(dir.path(), &kernel).await;
    wait_for("ready", || agent.observer.readiness().is_ok()).await;
    // A node joins whose route the kernel refuses once.
    let dst: ipnetwork::IpNetwork = "10.42.9.0/24".parse().unwrap();
    *kernel.refuse.lock().unwrap() = Some((dst, 1));
    let mut joining = nodes[1].clone();
    joining.name = NodeName("zzz-1".into());
    joining.key = Some(WgKey([9; 32]));
    joining.pod_cidrs = vec![dst];
    joining.endpoint = Some("203.0.113.99:51820".parse().unwrap());
    joining.internal_ip = None;
    tx.send(batch(vec![Event::node(joining)], true))
        .await
        .unwrap();
    wait_for("the refusal", || {
        kernel.refuse.lock().unwrap().is_some_and(|(_, n)| n == 0)
    })
    .await;
    let why = agent.observer.readiness().unwrap_err();
    assert!(
        why.starts_with("the kernel does not match the desired state: the kernel refused 1"),
        "{why}"
    );
    // The retry (about 1 s later) succeeds: ready again.
    for _ in 0..40 {
        if agent.observer.readiness().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.observer.readiness(), Ok(()));
    agent.stop().await;
}
