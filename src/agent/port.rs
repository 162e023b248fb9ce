//! The agent's watch over its WireGuard listen port. When something else holds it (a `kilo0`
//! Kilo left behind, a userspace daemon, any socket), the device cannot be configured and the
//! node cannot receive tunnel traffic: the agent then says what holds it (log, `/readyz`,
//! `/status`, `wiremesh_listen_port_held`), and does not publish the endpoint and mesh IP it
//! cannot serve, so that other nodes (Kilo's too: a node without endpoint is not `Ready()`)
//! leave it out instead of sending into the foreign interface. It never touches the holder.
//!
//! The loop probes at start, after each reconciliation in which configuring the device or
//! bringing it up failed (userspace WireGuard refuses the port when it is set; the kernel
//! takes it on a down link and refuses the link-up), and after each reconciliation while the
//! port is held; so once per backoff step. Only a probe clears the conflict: a kernel whose
//! device already claims the port, not yet bound, does not. Depends on the reconciler's report and port
//! types, the publication and the observer; the probe itself is the kernel's
//! ([`crate::reconcile::Kernel::port_holder`]).

use tracing::{info, warn};

use super::observe::Observer;
use crate::reconcile::port::{PortConflict, PortHolder};
use crate::reconcile::{Op, Report};
use crate::registry::cluster::publish::Publication;

/// Whether the listen port is held, and by what.
#[derive(Debug)]
pub(crate) struct PortGuard {
    port: u16,
    conflict: Option<PortConflict>,
}

impl PortGuard {
    /// A guard over `port`, free until a probe says otherwise.
    pub(crate) fn new(port: u16) -> PortGuard {
        PortGuard {
            port,
            conflict: None,
        }
    }

    /// Take a probe's answer (`None`: free or ours) and show it. A held port is logged at each
    /// probe (the loop probes once per backoff step), a freed one once.
    pub(crate) fn found(&mut self, holder: Option<PortHolder>, observer: &Observer) {
        let now = holder.map(|holder| PortConflict {
            port: self.port,
            holder,
        });
        match (&self.conflict, &now) {
            (_, Some(c)) => warn!(
                "{c}; this node's endpoint and mesh IP are not published until the port is free"
            ),
            (Some(was), None) => info!(port = self.port, was = %was.holder.short(),
                "the WireGuard listen port is free now; publishing this node's endpoint"),
            (None, None) => {}
        }
        if self.conflict != now {
            observer.listen_port(now.as_ref());
            self.conflict = now;
        }
    }

    /// Whether something else holds the port (as the last probe found).
    pub(crate) fn is_held(&self) -> bool {
        self.conflict.is_some()
    }

    /// What to publish of `p`: all of it, or, while the port is held, neither the endpoint nor
    /// the mesh IP (the key, internal IP and granularity stay: they are true).
    pub(crate) fn publication(&self, mut p: Publication) -> Publication {
        if self.conflict.is_some() {
            p.endpoint = None;
            p.wireguard_ip = None;
        }
        p
    }
}

/// Whether `report` holds a failure a held listen port causes: configuring the device (private
/// key, listen port) or bringing its link up.
pub(crate) fn device_failed(report: &Report) -> bool {
    report
        .failed
        .iter()
        .any(|(op, _)| matches!(op, Op::ConfigureDevice { .. } | Op::LinkUp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, WgKey};
    use crate::reconcile::KernelError;

    fn kilo0() -> PortHolder {
        PortHolder::Process {
            pid: 42,
            command: "wireguard-go".into(),
            interface: Some("kilo0".into()),
        }
    }

    fn full() -> Publication {
        Publication {
            key: Some(WgKey([1; 32])),
            endpoint: Some(Endpoint::Addr("10.0.0.1:51820".parse().unwrap())),
            internal_ip: Some("10.0.0.1/24".parse().unwrap()),
            wireguard_ip: Some("10.4.0.1/16".parse().unwrap()),
            ..Publication::default()
        }
    }

    #[test]
    fn a_held_port_withholds_the_endpoint_and_mesh_ip_until_it_is_free() {
        let o = Observer::new("a", None);
        let mut g = PortGuard::new(51820);
        assert_eq!(g.publication(full()), full());
        g.found(Some(kilo0()), &o);
        let p = g.publication(full());
        assert_eq!(p.endpoint, None);
        assert_eq!(p.wireguard_ip, None);
        assert_eq!(p.key, full().key, "the key stays");
        assert_eq!(p.internal_ip, full().internal_ip);
        let ann = p.annotations();
        assert_eq!(ann["kilo.squat.ai/endpoint"], None, "removed on the Node");
        assert_eq!(ann["kilo.squat.ai/wireguard-ip"], None);
        let why = o.view().listen_port_conflict.unwrap();
        assert!(
            why.starts_with("UDP port 51820 is held by process wireguard-go (pid 42)"),
            "{why}"
        );
        g.found(None, &o);
        assert_eq!(g.publication(full()), full());
        assert_eq!(o.view().listen_port_conflict, None);
    }

    #[test]
    fn only_a_failed_device_configuration_or_link_up_counts() {
        let err = || KernelError::Unsupported("no".into());
        let mut r = Report::default();
        assert!(!device_failed(&r));
        r.failed.push((Op::DelMasquerade, err()));
        assert!(!device_failed(&r));
        let mut up = Report::default();
        up.failed.push((Op::LinkUp, err()));
        assert!(device_failed(&up), "the kernel refuses the link-up");
        r.failed
            .push((Op::ConfigureDevice { listen_port: 51820 }, err()));
        assert!(device_failed(&r), "userspace refuses the port");
    }
}
