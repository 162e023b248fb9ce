//! Registries: where nodes and peers come from (a file, or Kubernetes in [`cluster`]),
//! translated into validated model values with a diagnostic for every object left out.
//!
//! May depend on the model, diagnostics, serde, `k8s-openapi`, `kube` (in [`cluster`] only) and
//! the engine's event type; never on netlink or the reconciler.

pub mod annotations;
pub mod cluster;
pub mod file;
pub mod peer;

use std::collections::BTreeMap;

use crate::model::{MeshNode, MeshPeer, NodeName};
use crate::topology::incremental::Event;

/// Events for every item of `new` that is not in `current` as it is (upserts), then for every
/// item of `current` whose name is gone from `new` (removals).
fn diff_by_name<'a, T: PartialEq + Clone + 'a>(
    current: impl Iterator<Item = &'a T>,
    new: &[T],
    name: impl Fn(&T) -> &NodeName,
    upsert: impl Fn(T) -> Event,
    remove: impl Fn(NodeName) -> Event,
) -> Vec<Event> {
    let old: BTreeMap<&NodeName, &T> = current.map(|x| (name(x), x)).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut events = Vec::new();
    for x in new {
        seen.insert(name(x));
        if old.get(name(x)) != Some(&x) {
            events.push(upsert(x.clone()));
        }
    }
    for n in old.keys() {
        if !seen.contains(n) {
            events.push(remove((*n).clone()));
        }
    }
    events
}

/// The engine events that turn the nodes the engine holds into `new`: an upsert for every node
/// added or changed, a removal for every node gone. Unchanged nodes produce nothing.
pub fn diff_nodes<'a>(current: impl Iterator<Item = &'a MeshNode>, new: &[MeshNode]) -> Vec<Event> {
    diff_by_name(current, new, |n| &n.name, Event::node, Event::NodeRemove)
}

/// The engine events that turn the peers the engine holds into `new`.
pub fn diff_peers<'a>(current: impl Iterator<Item = &'a MeshPeer>, new: &[MeshPeer]) -> Vec<Event> {
    diff_by_name(
        current,
        new,
        |p| &p.name,
        Event::PeerUpsert,
        Event::PeerRemove,
    )
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
        assert_eq!(ev, vec![Event::node(b2), Event::node(c)]);
        let ev = diff_nodes(old.iter(), &[]);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| matches!(e, Event::NodeRemove(_))));
    }
}
