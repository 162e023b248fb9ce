//! Registries: where nodes and peers come from (a file now, Kubernetes later), translated into
//! validated model values with a diagnostic for every object left out.
//!
//! May depend on the model, diagnostics, serde, `k8s-openapi` and the engine's event type; never
//! on netlink or the reconciler.

pub mod annotations;
pub mod file;
pub mod peer;

use std::collections::BTreeMap;

use crate::model::{MeshNode, MeshPeer, NodeName};
use crate::topology::incremental::Event;

/// The engine events that turn the nodes the engine holds into `new`: an upsert for every node
/// added or changed, a removal for every node gone. Unchanged nodes produce nothing.
pub fn diff_nodes<'a>(current: impl Iterator<Item = &'a MeshNode>, new: &[MeshNode]) -> Vec<Event> {
    let old: BTreeMap<&NodeName, &MeshNode> = current.map(|n| (&n.name, n)).collect();
    let mut events = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for n in new {
        seen.insert(&n.name);
        if old.get(&n.name) != Some(&n) {
            events.push(Event::NodeUpsert(n.clone()));
        }
    }
    for name in old.keys() {
        if !seen.contains(name) {
            events.push(Event::NodeRemove((*name).clone()));
        }
    }
    events
}

/// The engine events that turn the peers the engine holds into `new`.
pub fn diff_peers<'a>(current: impl Iterator<Item = &'a MeshPeer>, new: &[MeshPeer]) -> Vec<Event> {
    let old: BTreeMap<&NodeName, &MeshPeer> = current.map(|p| (&p.name, p)).collect();
    let mut events = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in new {
        seen.insert(&p.name);
        if old.get(&p.name) != Some(&p) {
            events.push(Event::PeerUpsert(p.clone()));
        }
    }
    for name in old.keys() {
        if !seen.contains(name) {
            events.push(Event::PeerRemove((*name).clone()));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_nodes_emits_only_changes_and_removals() {
        let a = MeshNode::new("a");
        let b = MeshNode::new("b");
        let mut b2 = b.clone();
        b2.location = "x".into();
        let c = MeshNode::new("c");
        let old = [a.clone(), b];
        let ev = diff_nodes(old.iter(), &[a, b2.clone(), c.clone()]);
        assert_eq!(ev, vec![Event::NodeUpsert(b2), Event::NodeUpsert(c)]);
        let ev = diff_nodes(old.iter(), &[]);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| matches!(e, Event::NodeRemove(_))));
    }
}
