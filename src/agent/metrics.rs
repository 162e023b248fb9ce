//! The agent's Prometheus metrics (`GET /metrics`), in the OpenMetrics text format that
//! Prometheus scrapes, written with the `prometheus-client` crate. `docs/metrics.md` lists
//! every metric.
//!
//! Two kinds: the loop's counters and reconcile-duration histogram ([`LoopMetrics`], atomics
//! the loop updates as it goes), and everything else, made afresh at each scrape from the loop's
//! [`View`] and from the WireGuard device read at that moment ([`Live`]). Per-peer metrics thus
//! always describe the device as it is: a peer that is gone is gone from the output.
//!
//! Never a private or preshared key: peers are labelled by name and public key. May depend on
//! the observer's view, the reconciler's report and op kinds, and the WireGuard device's live
//! peer type; no I/O.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::observe::View;
use crate::reconcile::Report;
use crate::reconcile::wg::WgPeerStats;
use crate::status::PeerKind;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every metric name.
pub const PREFIX: &str = "wiremesh";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    node: String,
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeftOutLabels {
    subject: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    subject: &'static str,
    name: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    name: String,
    public_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerInfoLabels {
    name: String,
    public_key: String,
    kind: &'static str,
    endpoint: String,
}

/// The `kind` label of reconcile errors that are not an operation's: the kernel could not be
/// read.
pub const READ_KERNEL: &str = "read-kernel";

/// The loop's counters and histogram; cheap to update (atomics).
#[derive(Debug, Clone)]
pub struct LoopMetrics {
    reconciliations: Family<ResultLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    operations: Family<KindLabels, Counter>,
    duration: Histogram,
    identity_restored: Counter,
}

impl Default for LoopMetrics {
    fn default() -> Self {
        let m = LoopMetrics {
            reconciliations: Family::default(),
            errors: Family::default(),
            operations: Family::default(),
            // 1 ms to about 33 s.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            identity_restored: Counter::default(),
        };
        // Present from the start, at 0, so that rates and alerts work before the first event.
        for result in ["ok", "partial", "failed"] {
            let _ = m.reconciliations.get_or_create(&ResultLabels { result });
        }
        let _ = m.errors.get_or_create(&KindLabels { kind: READ_KERNEL });
        m
    }
}

impl LoopMetrics {
    /// A reconciliation ran for `took`: `ok` when every operation succeeded, else `partial`.
    pub fn reconciled(&self, took: Duration, report: &Report) {
        let result = if report.failed.is_empty() {
            "ok"
        } else {
            "partial"
        };
        self.reconciliations
            .get_or_create(&ResultLabels { result })
            .inc();
        for (&kind, &n) in &report.applied {
            self.operations
                .get_or_create(&KindLabels { kind })
                .inc_by(n as u64);
        }
        for (op, _) in &report.failed {
            self.errors
                .get_or_create(&KindLabels { kind: op.kind() })
                .inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// Someone else wrote this node's own annotations; the agent wrote them back.
    pub fn identity_restored(&self) {
        self.identity_restored.inc();
    }

    /// A reconciliation could not read the kernel after `took`.
    pub fn read_failed(&self, took: Duration) {
        self.reconciliations
            .get_or_create(&ResultLabels { result: "failed" })
            .inc();
        self.errors
            .get_or_create(&KindLabels { kind: READ_KERNEL })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }
}

/// The WireGuard device as read for one scrape.
#[derive(Debug, Clone)]
pub struct Live {
    /// When it was read.
    pub at: SystemTime,
    /// Its peers, or why it could not be read.
    pub peers: Result<Vec<WgPeerStats>, String>,
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

fn flag(b: bool) -> Gauge {
    gauge(i64::from(b))
}

fn count(n: usize) -> Gauge {
    gauge(i64::try_from(n).unwrap_or(i64::MAX))
}

fn kind_label(k: PeerKind) -> &'static str {
    match k {
        PeerKind::Node => "node",
        PeerKind::Peer => "peer",
        PeerKind::Unknown => "unknown",
    }
}

/// Every metric, as one OpenMetrics text document (ending in `# EOF`).
pub fn render(view: &View, live: &Live, lm: &LoopMetrics, ready: bool) -> String {
    let mut r = Registry::with_prefix(PREFIX);
    let info: Family<AgentLabels, Gauge> = Family::default();
    info.get_or_create(&AgentLabels {
        node: view.node.clone(),
        version: env!("CARGO_PKG_VERSION"),
    })
    .set(1);
    r.register(
        "agent_info",
        "The agent: its node and version (always 1)",
        info,
    );
    r.register(
        "ready",
        "1 while ready, as /readyz: listed, reconciled, this node in the mesh, the kernel as desired",
        flag(ready),
    );
    r.register(
        "listen_port_held",
        "1 while something else than this node's WireGuard interface holds its listen port (the \
         endpoint is not published meanwhile; /readyz says what holds it)",
        flag(view.listen_port_conflict.is_some()),
    );
    r.register(
        "registry_connected",
        "1 while the registry's last step succeeded (the API server answers)",
        flag(view.connected),
    );
    r.register(
        "registry_synced",
        "1 while the registry's lists of Nodes and Peers are complete",
        flag(view.synced),
    );
    r.register(
        "mesh_nodes",
        "Nodes taking part in the mesh",
        count(view.mesh_nodes),
    );
    r.register(
        "mesh_peers",
        "External peers taking part in the mesh",
        count(view.mesh_peers),
    );
    let left: Family<LeftOutLabels, Gauge> = Family::default();
    for (&(subject, reason), &n) in &view.left_out {
        left.get_or_create(&LeftOutLabels { subject, reason })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "left_out",
        "Nodes, peers and input documents left out of the mesh, by reason",
        left,
    );
    let kept: Family<FallbackLabels, Gauge> = Family::default();
    for ((subject, name, key), &n) in &view.fallbacks {
        kept.get_or_create(&FallbackLabels {
            subject,
            name: name.clone(),
            key: key.clone(),
        })
        .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "fallbacks",
        "Problems of nodes and peers kept in the mesh (a malformed value replaced by Kilo's \
         default or ignored), by object and key",
        kept,
    );
    if let Some(l) = view.leader {
        r.register(
            "leader",
            "1 when this node leads its location (holds the WireGuard tunnels)",
            flag(l),
        );
    }
    r.register(
        "reconciliations",
        "Reconciliations of the kernel: ok, partial (some operation failed), failed (the kernel \
         could not be read)",
        lm.reconciliations.clone(),
    );
    r.register(
        "reconcile_errors",
        "Reconcile errors by kind: the failed operation's kind, or read-kernel",
        lm.errors.clone(),
    );
    r.register(
        "identity_restored",
        "Times this node's own annotations (key, endpoint, mesh IP, …) were found written by \
         someone else and written back",
        lm.identity_restored.clone(),
    );
    r.register(
        "kernel_operations",
        "Kernel operations applied, by kind",
        lm.operations.clone(),
    );
    r.register_with_unit(
        "reconcile_duration",
        "How long reconciliations took",
        Unit::Seconds,
        lm.duration.clone(),
    );
    r.register(
        "unreachable_peers",
        "Segment leaders this node sends to without a handshake completing (published as \
         wiremesh.io/unreachable; the mesh relays around them)",
        count(view.unreachable.len()),
    );
    r.register(
        "forwarding_failed_leaders",
        "Nodes of this location this node found not forwarding while they led it (published \
         as wiremesh.io/forwarding-failed; the location fails over to its next candidate)",
        count(view.forwarding_failed.len()),
    );
    r.register(
        "wireguard_up",
        "1 when the WireGuard device could be read for this scrape",
        flag(live.peers.is_ok()),
    );
    register_peers(&mut r, view, live);
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// The per-peer metrics, from the device as read now (named from the view).
fn register_peers(r: &mut Registry, view: &View, live: &Live) {
    let info: Family<PeerInfoLabels, Gauge> = Family::default();
    let age: Family<PeerLabels, Gauge<f64, AtomicU64>> = Family::default();
    let rx: Family<PeerLabels, Counter> = Family::default();
    let tx: Family<PeerLabels, Counter> = Family::default();
    for p in live.peers.as_deref().unwrap_or_default() {
        let tunnel = view.tunnels.get(&p.public_key);
        let labels = PeerLabels {
            name: tunnel.map(|t| t.name.clone()).unwrap_or_default(),
            public_key: p.public_key.to_string(),
        };
        info.get_or_create(&PeerInfoLabels {
            name: labels.name.clone(),
            public_key: labels.public_key.clone(),
            kind: kind_label(tunnel.map_or(PeerKind::Unknown, |t| t.kind)),
            endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        })
        .set(1);
        if let Some(t) = p.last_handshake {
            let secs = live.at.duration_since(t).map_or(0.0, |d| d.as_secs_f64());
            age.get_or_create(&labels).set(secs);
        }
        rx.get_or_create(&labels).inc_by(p.rx_bytes);
        tx.get_or_create(&labels).inc_by(p.tx_bytes);
    }
    r.register(
        "peer_info",
        "Each WireGuard peer of the device: name, kind (node, peer, unknown), public key and \
         current endpoint (always 1)",
        info,
    );
    r.register_with_unit(
        "peer_last_handshake_age",
        "Time since the peer's latest handshake; absent when there was none",
        Unit::Seconds,
        age,
    );
    r.register_with_unit(
        "peer_receive",
        "Bytes received from the peer",
        Unit::Bytes,
        rx,
    );
    r.register_with_unit("peer_transmit", "Bytes sent to the peer", Unit::Bytes, tx);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::agent::observe::Tunnel;
    use crate::model::WgKey;
    use crate::reconcile::{KernelError, Op};

    /// `name{labels} value` lines of `text` whose name is `name`, as (labels, value).
    pub(crate) fn samples(text: &str, name: &str) -> Vec<(String, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                (n == name).then(|| (labels.to_owned(), value.to_owned()))
            })
            .collect()
    }

    fn view() -> View {
        View {
            node: "fra-1".into(),
            listed: true,
            reconciled: true,
            connected: true,
            synced: true,
            leader: Some(true),
            mesh_nodes: 3,
            mesh_peers: 1,
            left_out: [(("node", "no-key"), 2)].into(),
            fallbacks: [(
                (
                    "node",
                    "hel-1".to_owned(),
                    "kilo.squat.ai/persistent-keepalive".to_owned(),
                ),
                1,
            )]
            .into(),
            tunnels: BTreeMap::from([(
                WgKey([1; 32]),
                Tunnel {
                    name: "hel-1".into(),
                    kind: PeerKind::Node,
                    endpoint: Some("10.200.0.2:51820".into()),
                    allowed_ips: vec![],
                },
            )]),
            ..View::default()
        }
    }

    fn stats(k: u8, handshake_secs_ago: Option<u64>, at: SystemTime) -> WgPeerStats {
        WgPeerStats {
            public_key: WgKey([k; 32]),
            endpoint: Some("10.200.0.9:51820".parse().unwrap()),
            allowed_ips: vec![],
            last_handshake: handshake_secs_ago.map(|s| at - Duration::from_secs(s)),
            rx_bytes: 1000 + u64::from(k),
            tx_bytes: 2000 + u64::from(k),
        }
    }

    #[test]
    fn peer_metrics_follow_the_device_and_name_known_peers() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let live = Live {
            at,
            peers: Ok(vec![stats(1, Some(12), at), stats(3, None, at)]),
        };
        let text = render(&view(), &live, &LoopMetrics::default(), true);
        let k1 = WgKey([1; 32]).to_string();
        let k3 = WgKey([3; 32]).to_string();
        let age = samples(&text, "wiremesh_peer_last_handshake_age_seconds");
        assert_eq!(
            age,
            [(
                format!("name=\"hel-1\",public_key=\"{k1}\""),
                "12.0".to_owned()
            )],
            "a peer that never shook hands has no age: {text}"
        );
        let rx = samples(&text, "wiremesh_peer_receive_bytes_total");
        assert_eq!(rx.len(), 2, "{text}");
        assert!(rx.contains(&(format!("name=\"\",public_key=\"{k3}\""), "1003".to_owned())));
        let tx = samples(&text, "wiremesh_peer_transmit_bytes_total");
        assert!(tx.contains(&(
            format!("name=\"hel-1\",public_key=\"{k1}\""),
            "2001".to_owned()
        )));
        let info = samples(&text, "wiremesh_peer_info");
        assert!(
            info.contains(&(
                format!(
                    "name=\"hel-1\",public_key=\"{k1}\",kind=\"node\",endpoint=\"10.200.0.9:51820\""
                ),
                "1".to_owned()
            )),
            "{info:?}"
        );
        assert!(info.iter().any(|(l, _)| l.contains("kind=\"unknown\"")));
        assert_eq!(samples(&text, "wiremesh_wireguard_up")[0].1, "1");
        assert!(text.ends_with("# EOF\n"));

        // A peer that left the device leaves the output at the next scrape.
        let live = Live {
            at,
            peers: Ok(vec![stats(3, None, at)]),
        };
        let text = render(&view(), &live, &LoopMetrics::default(), true);
        assert!(!text.contains(&k1), "{text}");
    }

    #[test]
    fn every_metric_rendered_is_documented_in_metrics_md() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let live = Live {
            at,
            peers: Ok(vec![stats(1, Some(12), at)]),
        };
        let mut v = view();
        v.unreachable = vec![WgKey([7; 32]), WgKey([8; 32])];
        v.forwarding_failed = vec![crate::model::NodeName("fra-1".into())];
        let text = render(&v, &live, &LoopMetrics::default(), true);
        assert_eq!(samples(&text, "wiremesh_unreachable_peers")[0].1, "2");
        assert_eq!(
            samples(&text, "wiremesh_forwarding_failed_leaders")[0].1,
            "1"
        );
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md"))
            .expect("docs/metrics.md");
        let families: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(families.len() > 10, "{text}");
        for f in families {
            // Counters are documented with their `_total` sample name.
            assert!(
                doc.contains(&format!("`{f}`")) || doc.contains(&format!("`{f}_total`")),
                "{f} is not in docs/metrics.md"
            );
        }
    }

    #[test]
    fn mesh_gauges_and_loop_counters_are_rendered() {
        let lm = LoopMetrics::default();
        let report = Report::from_results(
            vec![Op::LinkUp, Op::DelMasquerade, Op::DelMasquerade, Op::LinkUp],
            vec![
                Ok(()),
                Ok(()),
                Ok(()),
                Err(KernelError::Unsupported("no".into())),
            ],
            drop,
        );
        lm.reconciled(Duration::from_millis(3), &report);
        lm.reconciled(Duration::from_millis(1), &Report::default());
        lm.read_failed(Duration::from_millis(2));
        let live = Live {
            at: SystemTime::now(),
            peers: Err("no device".into()),
        };
        let mut v = view();
        v.connected = false;
        let text = render(&v, &live, &lm, false);
        let one = |name: &str| {
            let s = samples(&text, name);
            assert_eq!(s.len(), 1, "{name}: {text}");
            s[0].1.clone()
        };
        assert_eq!(one("wiremesh_ready"), "0");
        assert_eq!(one("wiremesh_listen_port_held"), "0");
        v.listen_port_conflict = Some("UDP port 51820 is held by WireGuard interface kilo0".into());
        assert_eq!(
            samples(&render(&v, &live, &lm, false), "wiremesh_listen_port_held"),
            vec![(String::new(), "1".to_owned())]
        );
        assert_eq!(one("wiremesh_registry_connected"), "0");
        assert_eq!(one("wiremesh_registry_synced"), "1");
        assert_eq!(one("wiremesh_mesh_nodes"), "3");
        assert_eq!(one("wiremesh_mesh_peers"), "1");
        assert_eq!(one("wiremesh_leader"), "1");
        assert_eq!(one("wiremesh_wireguard_up"), "0");
        assert_eq!(one("wiremesh_reconcile_duration_seconds_count"), "3");
        assert_eq!(
            samples(&text, "wiremesh_left_out"),
            [(
                "subject=\"node\",reason=\"no-key\"".to_owned(),
                "2".to_owned()
            )]
        );
        assert_eq!(
            samples(&text, "wiremesh_fallbacks"),
            [(
                "subject=\"node\",name=\"hel-1\",key=\"kilo.squat.ai/persistent-keepalive\""
                    .to_owned(),
                "1".to_owned()
            )]
        );
        let results = samples(&text, "wiremesh_reconciliations_total");
        for (r, n) in [("ok", "1"), ("partial", "1"), ("failed", "1")] {
            assert!(
                results.contains(&(format!("result=\"{r}\""), n.to_owned())),
                "{results:?}"
            );
        }
        let errors = samples(&text, "wiremesh_reconcile_errors_total");
        assert!(errors.contains(&("kind=\"link-up\"".to_owned(), "1".to_owned())));
        assert!(errors.contains(&("kind=\"read-kernel\"".to_owned(), "1".to_owned())));
        let ops = samples(&text, "wiremesh_kernel_operations_total");
        assert!(ops.contains(&("kind=\"masquerade\"".to_owned(), "2".to_owned())));
        assert_eq!(samples(&text, "wiremesh_peer_info"), []);
        assert!(text.contains("# TYPE wiremesh_reconcile_duration_seconds histogram"));
        let agent = samples(&text, "wiremesh_agent_info");
        assert_eq!(
            agent[0].0,
            format!("node=\"fra-1\",version=\"{}\"", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn leader_is_absent_before_the_first_desired_state() {
        let mut v = view();
        v.leader = None;
        let live = Live {
            at: SystemTime::now(),
            peers: Ok(vec![]),
        };
        let text = render(&v, &live, &LoopMetrics::default(), false);
        assert!(samples(&text, "wiremesh_leader").is_empty(), "{text}");
    }
}
