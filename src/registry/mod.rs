//! Registries: where nodes and peers come from (a file, or Kubernetes in [`cluster`]),
//! translated into validated model values ([`Parsed`]) with a diagnostic for every object left
//! out and for every value that was ignored or replaced by Kilo's default.
//!
//! May depend on the model, diagnostics, serde, `k8s-openapi`, `kube` (in [`cluster`] only) and
//! the engine's event type; never on netlink or the reconciler.

pub mod annotations;
pub mod cluster;
pub mod file;
pub mod peer;

use std::collections::BTreeMap;

use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, MeshPeer, NodeName};
use crate::topology::incremental::Event;

/// An object the registry keeps in the mesh, with the warnings about values of it that were
/// malformed and replaced by what Kilo uses instead (a default, or nothing).
///
/// Parsers return `Result<Parsed<T>, Vec<Diagnostic>>`: `Err` when the object is left out, with
/// every problem found (those that left it out are `skipped`, the others kept).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<T> {
    /// The object as it takes part.
    pub value: T,
    /// Kept diagnostics (`skipped == false`), in the order the values were read.
    pub warnings: Vec<Diagnostic>,
}

impl<T> Parsed<T> {
    /// An object read without any problem.
    pub fn clean(value: T) -> Self {
        Parsed {
            value,
            warnings: Vec::new(),
        }
    }

    /// The same warnings about another form of the value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Parsed<U> {
        Parsed {
            value: f(self.value),
            warnings: self.warnings,
        }
    }
}

/// The diagnostics of one parse result: the warnings of a kept object, or every problem of one
/// left out.
pub fn diagnostics_of<T>(r: &Result<Parsed<T>, Vec<Diagnostic>>) -> &[Diagnostic] {
    match r {
        Ok(p) => &p.warnings,
        Err(d) => d,
    }
}

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
