//! The watch task: Nodes and Peers watched with `kube::runtime::watcher` (list, then watch;
//! relist after 410 Gone; reconnect after errors with a jittered backoff that only a real list
//! or watch item resets), parsed into [`Store`]s, and sent
//! to the agent as [`Batch`]es.
//!
//! Coalescing: the channel holds one batch; while the agent is busy, new events accumulate in
//! the next batch (last event per object wins), so a burst costs the agent one pass. Depends on
//! `kube`, tokio, futures and the store.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::store::{Entry, Store, WatchEvent, coalesce};
use super::{peer_entry, peers_api};
use crate::backoff::Backoff;
use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, MeshPeer};
use crate::registry::Parsed;
use crate::registry::annotations::parse_node;
use crate::topology::incremental::Event;

/// What the watch task needs to know.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Node label that gives the location when no annotation does.
    pub topology_label: String,
    /// This node's name: its Node object is passed on whole in [`Batch::local`].
    pub node: String,
}

/// Changes since the previous batch.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Engine events, at most one per object.
    pub events: Vec<Event>,
    /// Whether complete lists of Nodes and Peers have arrived (from then on removals are real).
    pub synced: bool,
    /// Whether the last watch step succeeded (false while the API server is unreachable).
    pub connected: bool,
    /// Diagnostics of every object currently left out and warnings about those kept, when they
    /// may have changed.
    pub diagnostics: Option<Vec<Diagnostic>>,
    /// This node's Node object, when it changed.
    pub local: Option<Box<Node>>,
}

impl Batch {
    /// Fold `later`, the batch after this one, into it, as if both had been taken in turn: the
    /// events in order (then coalesced), the later `synced` and `connected`, its diagnostics and
    /// local Node when it has them. The caller sees only the later state flags: it must look at
    /// each batch's before merging when a moment of disconnection matters.
    pub fn merge(&mut self, later: Batch) {
        self.events.extend(later.events);
        self.events = coalesce(std::mem::take(&mut self.events));
        self.synced = later.synced;
        self.connected = later.connected;
        if later.diagnostics.is_some() {
            self.diagnostics = later.diagnostics;
        }
        if later.local.is_some() {
            self.local = later.local;
        }
    }
}

/// Reconnection delays of each watch: 0.5 s doubling to 15 s, with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Paces a watcher stream: after an error, waits a backoff delay before polling it again (the
/// watcher retries when polled). Only a real list or watch item resets the backoff: a watcher
/// emits `Init` before each list attempt, also when that list then fails, so counting it as a
/// success would retry every 0.5 s throughout an outage.
fn paced<K, S>(stream: S) -> impl Stream<Item = watcher::Result<watcher::Event<K>>>
where
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
{
    let state = (
        Box::pin(stream),
        Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        None::<Duration>,
    );
    futures::stream::unfold(state, |(mut stream, mut backoff, wait)| async move {
        if let Some(d) = wait {
            tokio::time::sleep(d).await;
        }
        let item = stream.next().await?;
        let wait = match &item {
            Err(_) => Some(backoff.next_delay()),
            Ok(watcher::Event::Init) => None,
            Ok(_) => {
                backoff.reset();
                None
            }
        };
        Some((item, (stream, backoff, wait)))
    })
}

/// Start watching; the task ends when the receiver is dropped.
pub fn watch(client: Client, opts: WatchOptions) -> mpsc::Receiver<Batch> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(run(client, opts, tx));
    rx
}

/// One item of the merged watch streams (a Node is large; each step is moved once).
#[allow(clippy::large_enum_variant)]
enum Step {
    Node(watcher::Result<watcher::Event<Node>>),
    Peer(watcher::Result<watcher::Event<DynamicObject>>),
}

fn convert<K, T>(
    ev: watcher::Event<K>,
    name: impl Fn(&K) -> String,
    parse: impl Fn(&K) -> Entry<T>,
) -> WatchEvent<T> {
    match ev {
        watcher::Event::Apply(o) => WatchEvent::Apply(name(&o), parse(&o)),
        watcher::Event::Delete(o) => WatchEvent::Delete(name(&o)),
        watcher::Event::Init => WatchEvent::Init,
        watcher::Event::InitApply(o) => WatchEvent::InitApply(name(&o), parse(&o)),
        watcher::Event::InitDone => WatchEvent::InitDone,
    }
}

fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

struct State {
    nodes: Store<Arc<MeshNode>>,
    peers: Store<MeshPeer>,
    /// The Peer CRD is missing: peers count as an empty, complete list.
    no_peer_crd: bool,
    /// The next batch; its `synced` and `connected` are always the current state.
    pending: Batch,
    dirty: bool,
    opts: WatchOptions,
}

impl State {
    fn diagnostics(&self) -> Vec<Diagnostic> {
        self.nodes
            .diagnostics()
            .chain(self.peers.diagnostics())
            .flat_map(|(_, d)| d.iter().cloned())
            .collect()
    }

    fn set_connected(&mut self, c: bool, why: Option<&watcher::Error>) {
        if c != self.pending.connected {
            match why {
                Some(e) => {
                    warn!(error = %e, "lost the Kubernetes API; keeping the mesh as it is and reconnecting")
                }
                None => info!("Kubernetes API reachable again"),
            }
            self.pending.connected = c;
            self.dirty = true;
        } else if let Some(e) = why {
            debug!(error = %e, "Kubernetes API still unreachable");
        }
    }

    fn step(&mut self, step: Step) {
        let mut events = Vec::new();
        let diags_changed = match step {
            Step::Node(Ok(ev)) => {
                // `Init` only announces a list attempt, which may still fail.
                if !matches!(ev, watcher::Event::Init) {
                    self.set_connected(true, None);
                }
                let local = match &ev {
                    watcher::Event::Apply(n) | watcher::Event::InitApply(n)
                        if n.metadata.name.as_deref() == Some(self.opts.node.as_str()) =>
                    {
                        Some(Box::new(n.clone()))
                    }
                    _ => None,
                };
                if local.is_some() {
                    self.pending.local = local;
                }
                let label = self.opts.topology_label.clone();
                let ev = convert(
                    ev,
                    |n: &Node| n.metadata.name.clone().unwrap_or_default(),
                    |n| parse_node(n, &label).map(|p| p.map(Arc::new)),
                );
                self.nodes.apply(ev, &mut events)
            }
            Step::Peer(Ok(ev)) => {
                if !matches!(ev, watcher::Event::Init) {
                    self.set_connected(true, None);
                }
                self.no_peer_crd = false;
                let ev = convert(
                    ev,
                    |p: &DynamicObject| p.metadata.name.clone().unwrap_or_default(),
                    |o| peer_entry(o).map(Parsed::clean),
                );
                self.peers.apply(ev, &mut events)
            }
            Step::Peer(Err(e)) if not_found(&e) => {
                if !self.no_peer_crd {
                    info!(
                        "the Peer resource (peers.kilo.squat.ai) is not installed: no external peers"
                    );
                    self.no_peer_crd = true;
                    // An empty, complete list: peers that existed are gone with the CRD.
                    self.peers.apply(WatchEvent::Init, &mut events);
                    self.peers.apply(WatchEvent::InitDone, &mut events)
                } else {
                    false
                }
            }
            Step::Node(Err(e)) | Step::Peer(Err(e)) => {
                self.set_connected(false, Some(&e));
                false
            }
        };
        if diags_changed {
            self.pending.diagnostics = Some(self.diagnostics());
        }
        if !events.is_empty() || diags_changed {
            self.dirty = true;
        }
        self.pending.events.extend(events);
        let synced = self.nodes.synced() && self.peers.synced();
        if synced != self.pending.synced {
            self.pending.synced = synced;
            self.dirty = true;
        }
    }

    fn take(&mut self) -> Batch {
        self.dirty = false;
        let next = Batch {
            synced: self.pending.synced,
            connected: self.pending.connected,
            ..Batch::default()
        };
        let mut b = std::mem::replace(&mut self.pending, next);
        b.events = coalesce(b.events);
        b
    }
}

async fn run(client: Client, opts: WatchOptions, tx: mpsc::Sender<Batch>) {
    let cfg = watcher::Config::default();
    let nodes = paced(watcher::watcher(
        Api::<Node>::all(client.clone()),
        cfg.clone(),
    ))
    .map(Step::Node);
    let peers = paced(watcher::watcher(peers_api(client), cfg)).map(Step::Peer);
    let mut merged = Box::pin(futures::stream::select(nodes, peers));
    let mut st = State {
        nodes: Store::default(),
        peers: Store::default(),
        no_peer_crd: false,
        pending: Batch {
            connected: true,
            ..Batch::default()
        },
        dirty: false,
        opts,
    };
    loop {
        tokio::select! {
            biased;
            permit = tx.reserve(), if st.dirty => match permit {
                Ok(p) => p.send(st.take()),
                Err(_) => return,
            },
            step = merged.next() => match step {
                Some(s) => st.step(s),
                None => return,
            },
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn err() -> watcher::Result<watcher::Event<Node>> {
        Err(watcher::Error::NoResourceVersion)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_list_backs_off_although_each_attempt_starts_with_init() {
        use watcher::Event::{Init, InitDone};
        let items = vec![
            Ok(Init),
            err(),
            Ok(Init),
            err(),
            Ok(Init),
            err(),
            Ok(Init),
            Ok(InitDone),
            err(),
            Ok(Init),
        ];
        let mut s = Box::pin(paced(futures::stream::iter(items)));
        let mut times = Vec::new();
        let t0 = Instant::now();
        while s.next().await.is_some() {
            times.push(t0.elapsed());
        }
        assert_eq!(times.len(), 10);
        // Waits after the three failed lists: 0.5 s, 1 s, 2 s (plus jitter up to half).
        let waits = [
            times[2] - times[1],
            times[4] - times[3],
            times[6] - times[5],
        ];
        for (w, base) in waits.iter().zip([500u128, 1000, 2000]) {
            let ms = w.as_millis();
            assert!(
                ms >= base && ms <= base * 3 / 2,
                "waited {ms} ms, base {base}"
            );
        }
        // The completed list reset the backoff: the next error waits the minimum again.
        let after_reset = (times[9] - times[8]).as_millis();
        assert!(
            (500..=750).contains(&after_reset),
            "waited {after_reset} ms"
        );
    }

    fn state(connected: bool) -> State {
        State {
            nodes: Store::default(),
            peers: Store::default(),
            no_peer_crd: false,
            pending: Batch {
                connected,
                ..Batch::default()
            },
            dirty: false,
            opts: WatchOptions {
                topology_label: "topology.kubernetes.io/region".into(),
                node: "a".into(),
            },
        }
    }

    #[test]
    fn init_alone_does_not_count_as_reconnected() {
        let mut st = state(false);
        st.step(Step::Node(Ok(watcher::Event::Init)));
        assert!(!st.pending.connected);
        st.step(Step::Node(err()));
        assert!(!st.pending.connected);
        st.step(Step::Node(Ok(watcher::Event::InitDone)));
        assert!(st.pending.connected);
        assert!(st.dirty);
    }

    #[test]
    fn a_merged_batch_holds_the_last_event_per_object_and_the_later_state() {
        let node = |name: &str, loc: &str| {
            let mut n = MeshNode::new(name);
            n.location = loc.into();
            Event::node(n)
        };
        let mut first = Batch {
            events: vec![node("a", "1"), node("b", "1")],
            synced: false,
            connected: false,
            diagnostics: Some(vec![Diagnostic::node("x", None, "old")]),
            local: None,
        };
        first.merge(Batch {
            events: vec![node("a", "2")],
            synced: true,
            connected: true,
            diagnostics: None,
            local: Some(Box::default()),
        });
        assert_eq!(first.events, vec![node("b", "1"), node("a", "2")]);
        assert!(first.synced && first.connected);
        assert_eq!(first.diagnostics.map(|d| d.len()), Some(1));
        assert!(first.local.is_some());
    }

    #[test]
    fn synced_only_after_both_lists_complete() {
        let mut st = state(true);
        st.step(Step::Node(Ok(watcher::Event::Init)));
        st.step(Step::Node(Ok(watcher::Event::InitDone)));
        assert!(!st.pending.synced);
        st.step(Step::Peer(Ok(watcher::Event::Init)));
        st.step(Step::Peer(Ok(watcher::Event::InitDone)));
        assert!(st.pending.synced);
        let b = st.take();
        assert!(b.synced && b.connected && b.events.is_empty());
    }
}
