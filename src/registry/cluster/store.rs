//! The registry's view of one kind of object (Nodes or Peers) as a watch delivers it, turned into
//! engine events.
//!
//! Every object is parsed when it arrives; the store keeps the parsed value (with its warnings)
//! or its diagnostics by name. A change that leaves the parsed value as it was yields no event;
//! an object that becomes invalid is removed from the engine (and reported); a relist (`Init` … `InitDone`) is
//! buffered and replaces the store only when complete, so nothing is removed before a full list
//! has arrived (after a start, a 410 Gone or an outage).
//!
//! Pure: depends on the model, diagnostics and the engine's event type; the watch stream's
//! shape is mirrored by [`WatchEvent`] so this module needs no Kubernetes client.

use std::collections::BTreeMap;

use crate::diagnostic::Diagnostic;
use std::sync::Arc;

use crate::model::{MeshNode, MeshPeer, NodeName};
use crate::registry::{Parsed, diagnostics_of};
use crate::topology::incremental::Event;

/// One step of a watch, as `kube::runtime::watcher` delivers it, with the object already
/// parsed (`Ok`, with its warnings) or rejected with its diagnostics (`Err`).
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<T> {
    /// An object was added or changed.
    Apply(String, Entry<T>),
    /// An object was deleted.
    Delete(String),
    /// A (re)list starts.
    Init,
    /// An object of the (re)list.
    InitApply(String, Entry<T>),
    /// The (re)list is complete.
    InitDone,
}

/// An object kind the store can hold: how its parsed value becomes an engine event.
pub trait Kind: Clone + PartialEq {
    /// The event that adds or changes this object in the engine.
    fn upsert(self) -> Event;
    /// The event that removes the object named `name` from the engine.
    fn remove(name: NodeName) -> Event;
}

impl Kind for Arc<MeshNode> {
    fn upsert(self) -> Event {
        Event::NodeUpsert(self)
    }
    fn remove(name: NodeName) -> Event {
        Event::NodeRemove(name)
    }
}

impl Kind for MeshPeer {
    fn upsert(self) -> Event {
        Event::PeerUpsert(self)
    }
    fn remove(name: NodeName) -> Event {
        Event::PeerRemove(name)
    }
}

/// One object as parsed: kept (with its warnings) or left out (with its diagnostics).
pub type Entry<T> = Result<Parsed<T>, Vec<Diagnostic>>;

/// The value of an entry that takes part.
fn value<T>(e: &Entry<T>) -> Option<&T> {
    e.as_ref().ok().map(|p| &p.value)
}

/// Parsed objects of one kind by name, and the relist in progress.
#[derive(Debug)]
pub struct Store<T> {
    items: BTreeMap<String, Entry<T>>,
    relist: Option<BTreeMap<String, Entry<T>>>,
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: Kind> Store<T> {
    /// Whether a complete list has arrived at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The objects that take part.
    pub fn valid(&self) -> impl Iterator<Item = &T> {
        self.items.values().filter_map(value)
    }

    /// Diagnostics by object name: of the objects left out, and the warnings of those kept.
    pub fn diagnostics(&self) -> impl Iterator<Item = (&str, &[Diagnostic])> {
        self.items
            .iter()
            .map(|(n, e)| (n.as_str(), diagnostics_of(e)))
            .filter(|(_, d)| !d.is_empty())
    }

    /// Apply one watch step; push the engine events it causes onto `out`. Returns whether the
    /// diagnostics may have changed.
    pub fn apply(&mut self, ev: WatchEvent<T>, out: &mut Vec<Event>) -> bool {
        match ev {
            WatchEvent::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            WatchEvent::InitApply(name, entry) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name, entry);
                false
            }
            WatchEvent::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                for (name, old) in &self.items {
                    if old.is_ok() && !new.get(name).is_some_and(Result::is_ok) {
                        out.push(T::remove(NodeName(name.clone())));
                    }
                }
                for (name, entry) in &new {
                    if let Some(v) = value(entry)
                        && self.items.get(name).and_then(value) != Some(v)
                    {
                        out.push(v.clone().upsert());
                    }
                }
                self.items = new;
                self.synced = true;
                true
            }
            WatchEvent::Apply(name, entry) => {
                let old = self.items.get(&name);
                let diag_change =
                    diagnostics_of(&entry) != old.map(diagnostics_of).unwrap_or_default();
                let was = old.and_then(value);
                match value(&entry) {
                    Some(v) if was != Some(v) => out.push(v.clone().upsert()),
                    Some(_) => {}
                    None if was.is_some() => out.push(T::remove(NodeName(name.clone()))),
                    None => {}
                }
                self.items.insert(name, entry);
                diag_change
            }
            WatchEvent::Delete(name) => match self.items.remove(&name) {
                Some(e) => {
                    let had_diags = !diagnostics_of(&e).is_empty();
                    if e.is_ok() {
                        out.push(T::remove(NodeName(name)));
                    }
                    had_diags
                }
                None => false,
            },
        }
    }
}

/// Reduce a batch of events to the last one per object (kind and name), keeping the order of
/// each object's last event: the engine ends in the same state, with less work.
pub fn coalesce(events: Vec<Event>) -> Vec<Event> {
    let key = |e: &Event| -> (bool, NodeName) {
        match e {
            Event::NodeUpsert(n) => (true, n.name.clone()),
            Event::NodeRemove(n) => (true, n.clone()),
            Event::PeerUpsert(p) => (false, p.name.clone()),
            Event::PeerRemove(n) => (false, n.clone()),
        }
    };
    let mut last: BTreeMap<(bool, NodeName), usize> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        last.insert(key(e), i);
    }
    if last.len() == events.len() {
        return events;
    }
    events
        .into_iter()
        .enumerate()
        .filter(|(i, e)| last.get(&key(e)) == Some(i))
        .map(|(_, e)| e)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, loc: &str) -> Arc<MeshNode> {
        let mut n = MeshNode::new(name);
        n.location = loc.into();
        Arc::new(n)
    }

    fn ok(name: &str, loc: &str) -> (String, Entry<Arc<MeshNode>>) {
        (name.into(), Ok(Parsed::clean(node(name, loc))))
    }

    fn warned(name: &str, loc: &str, problem: &str) -> (String, Entry<Arc<MeshNode>>) {
        let warning = Diagnostic::node(name, Some("kilo.squat.ai/persistent-keepalive"), problem);
        (
            name.into(),
            Ok(Parsed {
                value: node(name, loc),
                warnings: vec![warning.kept()],
            }),
        )
    }

    fn bad(name: &str) -> (String, Entry<Arc<MeshNode>>) {
        (
            name.into(),
            Err(vec![Diagnostic::node(
                name,
                Some("kilo.squat.ai/key"),
                "not a key",
            )]),
        )
    }

    fn step(s: &mut Store<Arc<MeshNode>>, ev: WatchEvent<Arc<MeshNode>>) -> Vec<Event> {
        let mut out = Vec::new();
        s.apply(ev, &mut out);
        out
    }

    fn listed(items: Vec<(String, Entry<Arc<MeshNode>>)>) -> Store<Arc<MeshNode>> {
        let mut s = Store::default();
        step(&mut s, WatchEvent::Init);
        for (n, e) in items {
            step(&mut s, WatchEvent::InitApply(n, e));
        }
        step(&mut s, WatchEvent::InitDone);
        s
    }

    #[test]
    fn nothing_reaches_the_engine_before_the_list_is_complete() {
        let mut s = Store::default();
        assert!(step(&mut s, WatchEvent::Init).is_empty());
        let (n, e) = ok("a", "x");
        assert!(step(&mut s, WatchEvent::InitApply(n, e)).is_empty());
        assert!(!s.synced());
        let ev = step(&mut s, WatchEvent::InitDone);
        assert_eq!(ev, vec![Event::NodeUpsert(node("a", "x"))]);
        assert!(s.synced());
    }

    #[test]
    fn a_relist_removes_only_what_the_complete_list_lacks() {
        let mut s = listed(vec![ok("a", "x"), ok("b", "x"), ok("c", "x")]);
        step(&mut s, WatchEvent::Init);
        let (n, e) = ok("a", "x");
        assert!(step(&mut s, WatchEvent::InitApply(n, e)).is_empty());
        let (n, e) = ok("c", "y");
        assert!(step(&mut s, WatchEvent::InitApply(n, e)).is_empty());
        // Until InitDone, b is still there.
        assert_eq!(s.valid().count(), 3);
        let ev = step(&mut s, WatchEvent::InitDone);
        assert_eq!(
            ev,
            vec![
                Event::NodeRemove(NodeName("b".into())),
                Event::NodeUpsert(node("c", "y"))
            ]
        );
    }

    #[test]
    fn unchanged_objects_cause_no_event() {
        let mut s = listed(vec![ok("a", "x")]);
        let (n, e) = ok("a", "x");
        assert!(step(&mut s, WatchEvent::Apply(n, e)).is_empty());
        let (n, e) = ok("a", "y");
        assert_eq!(
            step(&mut s, WatchEvent::Apply(n, e)),
            vec![Event::NodeUpsert(node("a", "y"))]
        );
    }

    #[test]
    fn an_object_turning_invalid_is_removed_and_reported_and_comes_back_when_fixed() {
        let mut s = listed(vec![ok("a", "x"), ok("b", "x")]);
        let (n, e) = bad("a");
        assert_eq!(
            step(&mut s, WatchEvent::Apply(n, e)),
            vec![Event::NodeRemove(NodeName("a".into()))]
        );
        let diags: Vec<_> = s.diagnostics().collect();
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].0, "a");
        assert_eq!(diags[0].1[0].key.as_deref(), Some("kilo.squat.ai/key"));
        assert_eq!(s.valid().count(), 1);
        let (n, e) = ok("a", "x");
        assert_eq!(
            step(&mut s, WatchEvent::Apply(n, e)),
            vec![Event::NodeUpsert(node("a", "x"))]
        );
        assert_eq!(s.diagnostics().count(), 0);
    }

    #[test]
    fn deleting_an_invalid_or_unknown_object_causes_no_engine_event() {
        let mut s = listed(vec![bad("a")]);
        assert!(step(&mut s, WatchEvent::Delete("a".into())).is_empty());
        assert_eq!(s.diagnostics().count(), 0);
        assert!(step(&mut s, WatchEvent::Delete("zz".into())).is_empty());
    }

    #[test]
    fn a_kept_object_with_warnings_is_in_the_engine_and_its_warnings_are_reported() {
        let mut s = listed(vec![warned("a", "x", "\"abc\" is not a number")]);
        assert_eq!(s.valid().count(), 1);
        let diags: Vec<_> = s.diagnostics().collect();
        assert_eq!(diags.len(), 1);
        assert!(!diags[0].1[0].skipped);
        // Only the warning changes: no engine event, but the diagnostics changed.
        let mut out = Vec::new();
        let (n, e) = warned("a", "x", "\"abd\" is not a number");
        assert!(s.apply(WatchEvent::Apply(n, e), &mut out));
        assert!(out.is_empty());
        // The same again: nothing changed at all.
        let (n, e) = warned("a", "x", "\"abd\" is not a number");
        assert!(!s.apply(WatchEvent::Apply(n, e), &mut out));
        // Fixed: the warning goes, the value is the same.
        let (n, e) = ok("a", "x");
        assert!(s.apply(WatchEvent::Apply(n, e), &mut out));
        assert!(out.is_empty());
        assert_eq!(s.diagnostics().count(), 0);
        // Deleting a kept object with warnings removes it and its warnings.
        let (n, e) = warned("a", "x", "bad");
        s.apply(WatchEvent::Apply(n, e), &mut out);
        assert!(s.apply(WatchEvent::Delete("a".into()), &mut out));
        assert_eq!(out, vec![Event::NodeRemove(NodeName("a".into()))]);
        assert_eq!(s.diagnostics().count(), 0);
    }

    #[test]
    fn coalesce_keeps_the_last_event_per_object() {
        let a1 = Event::NodeUpsert(node("a", "1"));
        let a2 = Event::NodeUpsert(node("a", "2"));
        let b = Event::NodeRemove(NodeName("b".into()));
        let pa = Event::PeerRemove(NodeName("a".into()));
        let out = coalesce(vec![a1, b.clone(), pa.clone(), a2.clone()]);
        assert_eq!(out, vec![b, pa, a2]);
    }
}
