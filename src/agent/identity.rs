//! What this agent owns on its own Node: the annotations it publishes (key, endpoint, internal
//! IP, mesh IP, granularity, discovered endpoints), under both prefixes (`kilo.squat.ai/` and
//! `wiremesh.io/`), and how it tells a foreign write to them from its own.
//!
//! A value on the Node is foreign when it is none of the values this agent published for that
//! key during this run, once the Node has shown this agent's current value for that key (so a
//! publication still in flight, or the values a previous run left, are never taken for an
//! attack). A foreign value is an incident: the loop logs it, counts it, reports it as an Event
//! and has the publisher write this agent's values back at once. A value written before the
//! agent started is overwritten by its first publication, without an incident.
//!
//! Pure: depends on the publication's annotation rendering and `k8s-openapi`'s Node; no I/O.

use std::collections::{BTreeMap, VecDeque};

use k8s_openapi::api::core::v1::Node;

use crate::registry::cluster::publish::Publication;

/// Earlier values remembered per key (endpoints and mesh IPs change during a run).
const HISTORY: usize = 8;

/// A value on the Node that this agent did not write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Foreign {
    /// The annotation key, with its prefix.
    pub key: String,
    /// The value found (`None`: the annotation was removed).
    pub found: Option<String>,
    /// The value this agent publishes (`None`: none).
    pub ours: Option<String>,
}

#[derive(Debug, Default)]
struct Owned {
    /// What is published now.
    current: Option<String>,
    /// Values published during this run, the latest last.
    history: VecDeque<String>,
    /// Whether the Node has shown `current` since it was set.
    settled: bool,
}

/// The annotations this agent owns on its Node, and what it wrote there.
#[derive(Debug, Default)]
pub(crate) struct Identity {
    owned: BTreeMap<String, Owned>,
    /// The foreign values last returned: the same ones, still on the Node while this agent's
    /// are on their way back, are not an incident again.
    reported: Vec<Foreign>,
}

impl Identity {
    /// Nothing published yet.
    pub(crate) fn new() -> Identity {
        Identity::default()
    }

    /// `p` is handed to the publisher: its annotations are this agent's from now on.
    pub(crate) fn publishing(&mut self, p: &Publication) {
        for (key, value) in p.annotations() {
            let o = self.owned.entry(key).or_default();
            if o.current != value {
                o.settled = false;
                o.current.clone_from(&value);
            }
            if let Some(v) = value
                && o.history.back() != Some(&v)
            {
                o.history.retain(|h| h != &v);
                o.history.push_back(v);
                if o.history.len() > HISTORY {
                    o.history.pop_front();
                }
            }
        }
    }

    /// The values on `node` (this agent's Node, as just read) that someone else wrote, in key
    /// order, unless they are exactly those returned last time (the incident is under way);
    /// remembers which keys the Node now shows as published.
    pub(crate) fn foreign(&mut self, node: &Node) -> Vec<Foreign> {
        let out = self.foreign_now(node);
        if out == self.reported {
            return Vec::new();
        }
        self.reported.clone_from(&out);
        out
    }

    fn foreign_now(&mut self, node: &Node) -> Vec<Foreign> {
        let have = node.metadata.annotations.as_ref();
        let mut out = Vec::new();
        for (key, o) in &mut self.owned {
            let found = have.and_then(|h| h.get(key));
            if found == o.current.as_ref() {
                o.settled = true;
                continue;
            }
            if !o.settled {
                continue;
            }
            let ours = found.is_some_and(|v| o.history.contains(v));
            if !ours {
                out.push(Foreign {
                    key: key.clone(),
                    found: found.cloned(),
                    ours: o.current.clone(),
                });
            }
        }
        out
    }
}

/// Characters of a foreign value quoted in the log and the Event, at most.
const QUOTE_MAX: usize = 100;

/// One line saying what was found and that it is being restored (each value cut to
/// [`QUOTE_MAX`] characters: whoever wrote it chose its size).
pub(crate) fn describe(foreign: &[Foreign]) -> String {
    let parts: Vec<String> = foreign
        .iter()
        .map(|f| match &f.found {
            Some(v) if v.chars().count() > QUOTE_MAX => {
                let cut: String = v.chars().take(QUOTE_MAX).collect();
                format!("{}={cut:?}…", f.key)
            }
            Some(v) => format!("{}={v:?}", f.key),
            None => format!("{} removed", f.key),
        })
        .collect();
    format!(
        "someone else wrote this node's own annotations ({}); writing this agent's values back",
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, WgKey};

    const KEY: WgKey = WgKey([7; 32]);

    fn publication(endpoint: &str) -> Publication {
        Publication {
            key: Some(KEY),
            endpoint: Some(Endpoint::Addr(endpoint.parse().unwrap())),
            ..Publication::default()
        }
    }

    fn node_with(p: &Publication, edit: &[(&str, Option<&str>)]) -> Node {
        let mut ann: BTreeMap<String, String> = p
            .annotations()
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        for (k, v) in edit {
            match v {
                Some(v) => ann.insert((*k).to_owned(), (*v).to_owned()),
                None => ann.remove(*k),
            };
        }
        let mut n = Node::default();
        n.metadata.annotations = Some(ann);
        n
    }

    #[test]
    fn both_prefixes_are_owned() {
        let mut id = Identity::new();
        let p = publication("203.0.113.1:51820");
        id.publishing(&p);
        let ann = p.annotations();
        for k in ["kilo.squat.ai/key", "wiremesh.io/key"] {
            assert_eq!(ann[k], Some(KEY.to_string()), "{k}");
        }
        assert_eq!(
            ann["wiremesh.io/endpoint"].as_deref(),
            Some("203.0.113.1:51820")
        );
    }

    #[test]
    fn a_forged_key_under_either_prefix_is_foreign_once_the_node_showed_ours() {
        let mut id = Identity::new();
        let p = publication("203.0.113.1:51820");
        id.publishing(&p);
        let forged = WgKey([9; 32]).to_string();
        // Before the Node has shown this agent's values (a previous run's, a publication in
        // flight), nothing is foreign.
        let early = node_with(&p, &[("wiremesh.io/key", Some(&forged))]);
        assert_eq!(id.foreign(&early).len(), 0);
        assert!(id.foreign(&node_with(&p, &[])).is_empty());
        let got = id.foreign(&node_with(&p, &[("wiremesh.io/key", Some(&forged))]));
        assert_eq!(
            got,
            vec![Foreign {
                key: "wiremesh.io/key".into(),
                found: Some(forged.clone()),
                ours: Some(KEY.to_string()),
            }]
        );
        assert!(describe(&got).contains("wiremesh.io/key="));
        let huge = Foreign {
            key: "wiremesh.io/key".into(),
            found: Some("x".repeat(100_000)),
            ours: None,
        };
        assert!(
            describe(&[huge]).len() < 300,
            "a forged value's size is not ours to repeat"
        );
        let still = node_with(&p, &[("wiremesh.io/key", Some(&forged))]);
        assert!(
            id.foreign(&still).is_empty(),
            "one incident, not one per read"
        );
        assert!(id.foreign(&node_with(&p, &[])).is_empty(), "restored");
        assert_eq!(id.foreign(&still).len(), 1, "written again: a new incident");
        assert!(id.foreign(&node_with(&p, &[])).is_empty());
        let removed = id.foreign(&node_with(&p, &[("kilo.squat.ai/endpoint", None)]));
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].found, None);
    }

    #[test]
    fn this_agents_earlier_values_are_not_foreign() {
        let mut id = Identity::new();
        let old = publication("203.0.113.1:51820");
        id.publishing(&old);
        assert!(id.foreign(&node_with(&old, &[])).is_empty());
        let new = publication("203.0.113.2:51820");
        id.publishing(&new);
        // The Node still shows the old endpoint: the new one is on its way.
        assert!(id.foreign(&node_with(&old, &[])).is_empty());
        assert!(id.foreign(&node_with(&new, &[])).is_empty());
        assert!(id.foreign(&node_with(&old, &[])).is_empty(), "ours, once");
        let forged = node_with(&new, &[("kilo.squat.ai/endpoint", Some("198.51.100.9:1"))]);
        assert_eq!(id.foreign(&forged).len(), 1);
    }
}
