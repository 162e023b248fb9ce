//! What the agent loop shows the outside world: a [`View`] of its mesh (nodes, peers, what was
//! left out and why, what was kept with a fallback, leadership, the tunnels it wants), whether it
//! is alive and ready, and its
//! counters ([`LoopMetrics`]).
//!
//! The loop writes through an [`Observer`]: a mutex held only to copy small values in or out
//! (never across an `.await`), and atomic counters, so the loop never waits on a reader. The
//! HTTP endpoint ([`super::http`]) reads it. The engine knows nothing of this: the loop hands
//! over what the engine computed.
//!
//! May depend on the desired state, diagnostics, the model, the engine's readiness reasons, the
//! reconciler's report and listen-port conflict, the status document's types and
//! [`super::metrics`]; never on I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ipnetwork::IpNetwork;

use super::metrics::LoopMetrics;
use crate::desired::{DesiredDelta, DesiredState, WgPeer};
use crate::diagnostic::{Diagnostic, Subject};
use crate::model::{MeshNode, MeshPeer, NodeName, WgKey};
use crate::reconcile::Report;
use crate::status::PeerKind;
use crate::topology::NotReady;

/// The agent is alive while its loop turned less than this long ago. The loop turns at least
/// every [`HEARTBEAT`]; only a step that hangs (a kernel call, a name that does not resolve)
/// holds it longer.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(120);

/// How often the loop turns when nothing happens.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// One tunnel the agent wants: a WireGuard peer of the desired state, without its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// The node(s) behind it, comma-separated, or the external peer's name.
    pub name: String,
    /// Node or external peer.
    pub kind: PeerKind,
    /// The desired endpoint, if any.
    pub endpoint: Option<String>,
    /// The desired allowed IPs.
    pub allowed_ips: Vec<IpNetwork>,
}

impl Tunnel {
    fn of(p: &WgPeer, external: &BTreeSet<WgKey>) -> Tunnel {
        Tunnel {
            name: p.name.clone(),
            kind: if external.contains(&p.public_key) {
                PeerKind::Peer
            } else {
                PeerKind::Node
            },
            endpoint: p.endpoint.as_ref().map(ToString::to_string),
            allowed_ips: p.allowed_ips.clone(),
        }
    }
}

/// Why objects were left out, for the `left_out` metric: (subject, reason) → how many.
pub type LeftOut = BTreeMap<(&'static str, &'static str), usize>;

/// Problems of objects kept in the mesh, for the `fallbacks` metric: (subject, name, key) → how
/// many. The key is empty for a problem that names none.
pub type Fallbacks = BTreeMap<(&'static str, String, String), usize>;

/// The loop's view of the mesh, as last written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// This node's name.
    pub node: String,
    /// This node's public key.
    pub public_key: Option<WgKey>,
    /// Whether the registry has listed everything once.
    pub listed: bool,
    /// Whether a reconciliation has succeeded once.
    pub reconciled: bool,
    /// Whether the registry's last step succeeded (the API server was reachable).
    pub connected: bool,
    /// Whether the registry's lists are complete.
    pub synced: bool,
    /// Whether this node leads its segment; `None` before the first desired state.
    pub leader: Option<bool>,
    /// Nodes that take part in the mesh.
    pub mesh_nodes: usize,
    /// External peers that take part in the mesh.
    pub mesh_peers: usize,
    /// Objects left out, by subject (`node`, `peer`, `input`) and reason.
    pub left_out: LeftOut,
    /// Problems of objects kept in the mesh, by object and key.
    pub fallbacks: Fallbacks,
    /// The tunnels of the desired state, by the peer's public key.
    pub tunnels: BTreeMap<WgKey, Tunnel>,
    /// The last reconciliation's failure, for `/readyz` before the first success.
    pub last_error: Option<String>,
    /// What holds the WireGuard listen port instead of this node's interface, in one line saying
    /// what to do; the endpoint and mesh IP are not published meanwhile.
    pub listen_port_conflict: Option<String>,
    /// Why the loop knows the node does not serve the mesh as desired: this node is out of the
    /// registry (or left out), or the kernel is known not to match the desired state after a
    /// first success.
    pub loop_not_ready: Option<String>,
    /// Segment leaders this node cannot reach directly (relays go around them), by key.
    pub unreachable: Vec<WgKey>,
    /// Nodes of this location this node reports not forwarding (the location fails over).
    pub forwarding_failed: Vec<NodeName>,
}

/// The reason label of a diagnostic that left its object out: `invalid` for what the registry
/// could not parse, the engine's readiness reasons (`no-key`, `no-endpoint`, `no-pod-cidr`,
/// `stale-heartbeat`), else `conflict` (a name or key used twice, no mesh IP left).
pub fn left_out_reason(d: &Diagnostic, from_registry: bool) -> &'static str {
    if from_registry {
        return "invalid";
    }
    match NotReady::from_text(&d.problem) {
        Some(NotReady::NoKey) => "no-key",
        Some(NotReady::NoEndpoint) => "no-endpoint",
        Some(NotReady::NoPodCidr) => "no-pod-cidr",
        Some(NotReady::StaleHeartbeat) => "stale-heartbeat",
        None => "conflict",
    }
}

fn subject(s: Subject) -> &'static str {
    match s {
        Subject::Node => "node",
        Subject::Peer => "peer",
        Subject::Input => "input",
    }
}

/// Objects left out (each counted once, by its first reason) by subject and reason.
pub fn left_out(registry: &[Diagnostic], engine: &[Diagnostic]) -> LeftOut {
    let mut seen = BTreeSet::new();
    let mut out = LeftOut::new();
    let all = registry
        .iter()
        .map(|d| (d, true))
        .chain(engine.iter().map(|d| (d, false)));
    for (d, from_registry) in all.filter(|(d, _)| d.skipped) {
        if seen.insert((d.subject, d.name.as_str())) {
            *out.entry((subject(d.subject), left_out_reason(d, from_registry)))
                .or_insert(0) += 1;
        }
    }
    out
}

/// The kept diagnostics (a value ignored or replaced by Kilo's default) of objects that are not
/// left out, by subject, name and key: each problem counted once.
pub fn fallbacks(registry: &[Diagnostic], engine: &[Diagnostic]) -> Fallbacks {
    let all = || registry.iter().chain(engine);
    let out: BTreeSet<(Subject, &str)> = all()
        .filter(|d| d.skipped)
        .map(|d| (d.subject, d.name.as_str()))
        .collect();
    let unique: BTreeSet<&Diagnostic> = all()
        .filter(|d| !d.skipped && !out.contains(&(d.subject, d.name.as_str())))
        .collect();
    let mut counts = Fallbacks::new();
    for d in unique {
        let key = d.key.clone().unwrap_or_default();
        *counts
            .entry((subject(d.subject), d.name.clone(), key))
            .or_insert(0) += 1;
    }
    counts
}

struct Inner {
    view: Mutex<View>,
    metrics: LoopMetrics,
    epoch: tokio::time::Instant,
    /// Milliseconds after `epoch` of the loop's last turn.
    last_turn_ms: AtomicU64,
}

/// The loop's window to the outside: cheap to clone, shared by the loop and the HTTP endpoint.
#[derive(Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

impl Observer {
    /// An observer of the agent of `node` with `public_key`; alive from now on.
    pub fn new(node: &str, public_key: Option<WgKey>) -> Observer {
        Observer {
            inner: Arc::new(Inner {
                view: Mutex::new(View {
                    node: node.to_owned(),
                    public_key,
                    ..View::default()
                }),
                metrics: LoopMetrics::default(),
                epoch: tokio::time::Instant::now(),
                last_turn_ms: AtomicU64::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, View> {
        // A panic elsewhere while holding it cannot leave a half-written View worth refusing.
        self.inner
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the view.
    pub fn view(&self) -> View {
        self.lock().clone()
    }

    /// The loop's counters.
    pub fn metrics(&self) -> &LoopMetrics {
        &self.inner.metrics
    }

    // -- written by the loop ---------------------------------------------------------------

    /// The loop turned.
    pub fn turned(&self) {
        let ms = self.inner.epoch.elapsed().as_millis();
        self.inner
            .last_turn_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The registry's connectivity after a batch; a synced batch means it listed everything.
    pub fn registry(&self, connected: bool, synced: bool) {
        let mut v = self.lock();
        v.connected = connected;
        v.synced = synced;
        v.listed |= synced;
    }

    /// The mesh's members and what was left out, from the engine's nodes and peers and the
    /// diagnostics of the registry and of the engine.
    pub fn mesh<'a>(
        &self,
        nodes: impl Iterator<Item = &'a MeshNode>,
        peers: impl Iterator<Item = &'a MeshPeer>,
        registry: &[Diagnostic],
        engine: &[Diagnostic],
    ) {
        let out: BTreeSet<(Subject, &str)> = engine
            .iter()
            .filter(|d| d.skipped)
            .map(|d| (d.subject, d.name.as_str()))
            .collect();
        let mesh_nodes = nodes
            .filter(|n| !out.contains(&(Subject::Node, n.name.as_str())))
            .count();
        let mesh_peers = peers
            .filter(|p| !out.contains(&(Subject::Peer, p.name.as_str())))
            .count();
        let left = left_out(registry, engine);
        let kept = fallbacks(registry, engine);
        let mut v = self.lock();
        v.mesh_nodes = mesh_nodes;
        v.mesh_peers = mesh_peers;
        v.left_out = left;
        v.fallbacks = kept;
    }

    /// The whole desired state was reconciled: its leadership and tunnels. `external` holds the
    /// keys of external peers.
    pub fn desired(&self, d: &DesiredState, external: &BTreeSet<WgKey>) {
        let mut v = self.lock();
        v.leader = Some(d.leader);
        // Emptied first: the old and the new map of a whole mesh need not exist at once.
        v.tunnels.clear();
        v.tunnels.extend(
            d.peers
                .iter()
                .map(|p| (p.public_key, Tunnel::of(p, external))),
        );
    }

    /// A change of the desired state is being reconciled.
    pub fn delta(&self, d: &DesiredDelta, external: &BTreeSet<WgKey>) {
        let mut v = self.lock();
        for k in &d.peers_removed {
            v.tunnels.remove(k);
        }
        for p in &d.peers_upserted {
            v.tunnels.insert(p.public_key, Tunnel::of(p, external));
        }
        if let Some(l) = d.leader {
            v.leader = Some(l);
        }
    }

    /// A reconciliation ran for `took` and did what `report` says.
    pub fn reconciled(&self, took: Duration, report: &Report) {
        self.inner.metrics.reconciled(took, report);
        let mut v = self.lock();
        match report.failed.first() {
            None => {
                v.reconciled = true;
                v.last_error = None;
            }
            Some((op, e)) => v.last_error = Some(format!("{}: {e}", op.kind())),
        }
    }

    /// Why the loop's state machine says the node is not ready (`None`: nothing).
    pub fn loop_not_ready(&self, why: Option<String>) {
        let mut v = self.lock();
        if v.loop_not_ready != why {
            v.loop_not_ready = why;
        }
    }

    /// This node's public key changed (key rotation).
    pub fn public_key(&self, key: WgKey) {
        self.lock().public_key = Some(key);
    }

    /// The nodes of this location this node reports not forwarding now.
    pub fn forwarding_failed(&self, names: &std::collections::BTreeSet<NodeName>) {
        self.lock().forwarding_failed = names.iter().cloned().collect();
    }

    /// The segment leaders this node cannot reach directly now.
    pub fn unreachable(&self, keys: &std::collections::BTreeSet<WgKey>) {
        self.lock().unreachable = keys.iter().copied().collect();
    }

    /// Someone else wrote this node's own annotations and the agent wrote them back.
    pub fn identity_restored(&self) {
        self.inner.metrics.identity_restored();
    }

    /// What holds the listen port now (`None`: free, or held by our interface).
    pub fn listen_port(&self, conflict: Option<&crate::reconcile::port::PortConflict>) {
        self.lock().listen_port_conflict = conflict.map(ToString::to_string);
    }

    /// A reconciliation could not read the kernel.
    pub fn read_failed(&self, took: Duration, error: &dyn std::fmt::Display) {
        self.inner.metrics.read_failed(took);
        self.lock().last_error = Some(format!("reading the kernel: {error}"));
    }

    // -- read by the HTTP endpoint ---------------------------------------------------------

    /// How long ago the loop last turned.
    pub fn since_turn(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_turn_ms.load(Ordering::Relaxed));
        self.inner.epoch.elapsed().saturating_sub(last)
    }

    /// `Ok` while the loop turned within [`LIVENESS_BOUND`], else why not.
    pub fn liveness(&self) -> Result<(), String> {
        let since = self.since_turn();
        if since <= LIVENESS_BOUND {
            Ok(())
        } else {
            Err(format!(
                "the agent loop has not turned for {} s (bound {} s)",
                since.as_secs(),
                LIVENESS_BOUND.as_secs()
            ))
        }
    }

    /// `Ok` once the registry listed everything and a reconciliation succeeded, while nothing
    /// else holds the listen port, this node takes part and the kernel is not known to differ
    /// from the desired state; else what is awaited, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        readiness(&self.lock())
    }
}

/// Whether `v` is ready, else what it waits for. A held listen port comes first: it keeps the
/// node out of the mesh whatever else is done. Then the first list; then the registry being
/// reachable and usable (an outage keeps the kernel as it was, which may be stale); then what the
/// loop knows
/// (this node out of the registry, a kernel known not to match after a first success); then the
/// first successful reconciliation.
pub fn readiness(v: &View) -> Result<(), String> {
    if let Some(c) = &v.listen_port_conflict {
        return Err(format!("not serving the mesh: {c}"));
    }
    if !v.listed {
        return Err("waiting for the registry's first complete list".to_owned());
    }
    if !v.connected {
        return Err(
            "the registry is unreachable or unusable: keeping the mesh as it was until it is back"
                .to_owned(),
        );
    }
    if let Some(why) = &v.loop_not_ready {
        return Err(why.clone());
    }
    if !v.reconciled {
        return Err(match &v.last_error {
            Some(e) => format!("waiting for the first successful reconciliation (last: {e})"),
            None => "waiting for the first successful reconciliation".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_out_counts_each_object_once_by_its_first_reason() {
        let reg = vec![
            Diagnostic::node("bad", Some("kilo.squat.ai/key"), "not a key"),
            Diagnostic::node("bad", Some("kilo.squat.ai/endpoint"), "port 0"),
            Diagnostic::peer("laptop", Some("spec.publicKey"), "not a key"),
        ];
        let eng = vec![
            Diagnostic::node("new", None, NotReady::NoKey.text()),
            Diagnostic::node("old", None, NotReady::StaleHeartbeat.text()),
            Diagnostic::node(
                "twin",
                Some("key"),
                "public key … is already used by node a",
            ),
            Diagnostic::node("ok", None, "allowed IP 10.0.0.0/8 is already routed").kept(),
        ];
        let got = left_out(&reg, &eng);
        let want: LeftOut = [
            (("node", "invalid"), 1),
            (("peer", "invalid"), 1),
            (("node", "no-key"), 1),
            (("node", "stale-heartbeat"), 1),
            (("node", "conflict"), 1),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn fallbacks_count_kept_problems_of_objects_that_take_part_by_name_and_key() {
        let ka = "kilo.squat.ai/persistent-keepalive";
        let alips = "kilo.squat.ai/allowed-location-ips";
        let reg = vec![
            Diagnostic::node("a", Some(ka), "\"x\" is not a number").kept(),
            Diagnostic::node("a", Some(alips), "\"bogus\" is not a CIDR").kept(),
            Diagnostic::node("a", Some(alips), "\"10.0.0.0/33\" is not a CIDR").kept(),
            // Left out: its warnings are no fallback in effect.
            Diagnostic::node("gone", Some(ka), "\"x\" is not a number").kept(),
            Diagnostic::node("gone", Some("kilo.squat.ai/key"), "not a key"),
        ];
        let eng = vec![
            Diagnostic::node("b", None, "allowed IP 10.0.0.0/8 is already routed").kept(),
            Diagnostic::node("old", None, NotReady::StaleHeartbeat.text()),
            Diagnostic::node("old", Some("kilo.squat.ai/last-seen"), "read as 0").kept(),
        ];
        let want: Fallbacks = [
            (("node", "a".to_owned(), ka.to_owned()), 1),
            (("node", "a".to_owned(), alips.to_owned()), 2),
            (("node", "b".to_owned(), String::new()), 1),
        ]
        .into();
        assert_eq!(fallbacks(&reg, &eng), want);
    }

    #[test]
    fn readiness_waits_for_the_list_then_a_successful_reconciliation() {
        let mut v = View::default();
        assert!(readiness(&v).unwrap_err().contains("first complete list"));
        v.listed = true;
        v.connected = true;
        v.last_error = Some("route: refused".into());
        let e = readiness(&v).unwrap_err();
        assert!(e.contains("first successful reconciliation"), "{e}");
        assert!(e.contains("route: refused"), "{e}");
        assert!(!e.contains('\n'));
        v.reconciled = true;
        assert_eq!(readiness(&v), Ok(()));
    }

    #[test]
    fn an_unreachable_or_unusable_registry_makes_a_reconciled_agent_unready_until_it_is_back() {
        let mut v = View {
            listed: true,
            connected: false,
            reconciled: true,
            ..View::default()
        };
        let e = readiness(&v).unwrap_err();
        assert!(e.contains("registry is unreachable or unusable"), "{e}");
        v.connected = true;
        assert_eq!(readiness(&v), Ok(()));
    }

    #[test]
    fn what_the_loop_knows_makes_even_a_reconciled_agent_unready() {
        let mut v = View {
            listed: true,
            connected: true,
            reconciled: true,
            ..View::default()
        };
        assert_eq!(readiness(&v), Ok(()));
        v.loop_not_ready = Some("this node cannot take part in the mesh: gone".into());
        assert_eq!(
            readiness(&v),
            Err("this node cannot take part in the mesh: gone".into())
        );
        v.reconciled = false;
        assert_eq!(
            readiness(&v),
            Err("this node cannot take part in the mesh: gone".into()),
            "also before the first reconciliation"
        );
    }

    #[test]
    fn a_held_listen_port_makes_even_a_reconciled_agent_unready_and_says_by_what() {
        let v = View {
            listed: true,
            reconciled: true,
            listen_port_conflict: Some(
                "UDP port 51820 is held by WireGuard interface kilo0".into(),
            ),
            ..View::default()
        };
        assert_eq!(
            readiness(&v),
            Err("not serving the mesh: UDP port 51820 is held by WireGuard interface kilo0".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_once_the_loop_has_not_turned_within_the_bound() {
        let o = Observer::new("a", None);
        o.turned();
        tokio::time::sleep(LIVENESS_BOUND).await;
        assert_eq!(o.liveness(), Ok(()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let e = o.liveness().unwrap_err();
        assert!(e.contains("has not turned for 121 s"), "{e}");
        o.turned();
        assert_eq!(o.liveness(), Ok(()));
    }

    #[test]
    fn deltas_follow_the_tunnels_and_leadership() {
        let o = Observer::new("a", None);
        let peer = |k: u8, name: &str| WgPeer {
            public_key: WgKey([k; 32]),
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: 0,
            preshared_key: Some(WgKey([9; 32])),
            name: name.into(),
        };
        let external: BTreeSet<WgKey> = [WgKey([2; 32])].into();
        let d = DesiredDelta {
            peers_upserted: vec![peer(1, "b,c"), peer(2, "laptop")],
            leader: Some(true),
            ..DesiredDelta::default()
        };
        o.delta(&d, &external);
        let v = o.view();
        assert_eq!(v.leader, Some(true));
        assert_eq!(v.tunnels[&WgKey([1; 32])].kind, PeerKind::Node);
        assert_eq!(v.tunnels[&WgKey([2; 32])].kind, PeerKind::Peer);
        let gone = DesiredDelta {
            peers_removed: vec![WgKey([1; 32])],
            ..DesiredDelta::default()
        };
        o.delta(&gone, &external);
        assert_eq!(o.view().tunnels.len(), 1);
    }
}
