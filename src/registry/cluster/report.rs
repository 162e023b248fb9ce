//! Kubernetes Events for objects the mesh leaves out (a Node without a valid key, an invalid
//! Peer) and for objects it keeps with a malformed value replaced by Kilo's (a bad keepalive, an
//! allowed-location-ips entry dropped), so `kubectl describe node X` says which key is wrong and
//! why. The Event's reason tells the two apart ([`REASON_NODE`], [`REASON_NODE_FALLBACK`]).
//! An agent that finds its own Node's annotations written by someone else says so with
//! [`REASON_IDENTITY_RESTORED`], one Event per incident.
//!
//! Once per change: an Event is created when an object's problems change, not on resyncs. Its
//! name is derived from the object and the problem, so the same report from another agent (every
//! agent sees every Peer) or from this agent after a restart is refused by the API server as
//! already existing and not repeated. A problem that this agent saw fixed and that comes back
//! identical bumps the existing Event's count and last timestamp. Problems of a Node are reported
//! by that node's own agent, and by the agent of a node it conflicts with. Depends on `kube`,
//! `k8s-openapi` and the diagnostics.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tracing::{debug, warn};

use crate::diagnostic::{Diagnostic, Subject};
use crate::registry::peer::{PEER_GROUP, PEER_VERSION};

/// The namespace Events about cluster-scoped objects go to (as the kubelet does for Nodes).
pub const EVENT_NAMESPACE: &str = "default";
/// `reason` of an Event about a Node left out of the mesh.
pub const REASON_NODE: &str = "WiremeshInvalidNode";
/// `reason` of an Event about a Peer left out of the mesh.
pub const REASON_PEER: &str = "WiremeshInvalidPeer";
/// `reason` of an Event about a Node kept in the mesh with a value ignored or replaced by a
/// default (a malformed optional annotation, an allowed IP that another segment has).
pub const REASON_NODE_FALLBACK: &str = "WiremeshNodeFallback";
/// `reason` of an Event about a Peer kept in the mesh with a value ignored.
pub const REASON_PEER_FALLBACK: &str = "WiremeshPeerFallback";
/// `reason` of an Event about this node's own annotations (key, endpoint, mesh IP, …) written
/// by someone else and written back by its agent.
pub const REASON_IDENTITY_RESTORED: &str = "WiremeshIdentityRestored";

/// Reports diagnostics as Events, remembering what it reported.
pub struct Reporter {
    client: Client,
    node: String,
    /// Problems last reported, by object.
    reported: BTreeMap<(Subject, String), String>,
    /// Events this agent created, with the count it last wrote (it reads no Event back).
    created: BTreeMap<String, i32>,
}

/// Whether the object of these diagnostics (all of one object) is left out of the mesh.
fn left_out(diags: &[&Diagnostic]) -> bool {
    diags.iter().any(|d| d.skipped)
}

/// The text of all problems of one object, in a stable order, saying whether it was left out
/// of the mesh or kept with a fallback.
fn problems(diags: &[&Diagnostic]) -> String {
    let mut lines: Vec<String> = diags
        .iter()
        .map(|d| match &d.key {
            Some(k) => format!("{k}: {}", d.problem),
            None => d.problem.clone(),
        })
        .collect();
    lines.sort();
    lines.dedup();
    let verdict = if left_out(diags) {
        "left out of the mesh"
    } else {
        "kept in the mesh, with a fallback"
    };
    format!("{verdict}: {}", lines.join("; "))
}

/// The Event's name: the object's name and a hash of the object and its problems.
pub fn event_name(subject: Subject, name: &str, uid: Option<&str>, text: &str) -> String {
    let mut h = rustc_hash::FxHasher::default();
    (subject, name, uid, text).hash(&mut h);
    let prefix: String = name.chars().take(200).collect();
    format!("{prefix}.wiremesh-{:016x}", h.finish())
}

/// What an Event is about: the object, and whether the mesh left it out or kept it with a
/// fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct About<'a> {
    /// Kind of the object.
    pub subject: Subject,
    /// Its name.
    pub name: &'a str,
    /// Its uid, when known.
    pub uid: Option<&'a str>,
    /// Left out of the mesh (`true`) or kept with a fallback.
    pub left_out: bool,
}

/// The Event for `text` about the object.
pub fn event(about: About<'_>, text: &str, reporter: &str, now: Timestamp) -> Event {
    let About {
        subject,
        name,
        uid,
        left_out,
    } = about;
    let (api_version, kind, reason) = match (subject, left_out) {
        (Subject::Peer, true) => (format!("{PEER_GROUP}/{PEER_VERSION}"), "Peer", REASON_PEER),
        (Subject::Peer, false) => (
            format!("{PEER_GROUP}/{PEER_VERSION}"),
            "Peer",
            REASON_PEER_FALLBACK,
        ),
        (_, true) => ("v1".to_owned(), "Node", REASON_NODE),
        (_, false) => ("v1".to_owned(), "Node", REASON_NODE_FALLBACK),
    };
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(subject, name, uid, text)),
            namespace: Some(EVENT_NAMESPACE.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(api_version),
            kind: Some(kind.into()),
            name: Some(name.into()),
            uid: uid.map(str::to_owned),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(text.to_owned()),
        type_: Some("Warning".into()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        reporting_component: Some("wiremesh.io/agent".into()),
        reporting_instance: Some(reporter.into()),
        source: Some(EventSource {
            component: Some("wiremesh".into()),
            host: Some(reporter.into()),
        }),
        ..Default::default()
    }
}

/// Write `count` and `now` as Event `name`'s count and last timestamp.
async fn recur(
    api: &Api<Event>,
    name: &str,
    count: i32,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "count": count, "lastTimestamp": Time(now) });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// The Event for an identity incident on this node's Node (`node`, uid `uid`): `text` says
/// what was found. Named per incident (the time is part of the hash): each is its own Event.
pub fn identity_event(node: &str, uid: Option<&str>, text: &str, now: Timestamp) -> Event {
    let about = About {
        subject: Subject::Node,
        name: node,
        uid,
        left_out: false,
    };
    let mut ev = event(about, text, node, now);
    ev.metadata.name = Some(event_name(
        Subject::Node,
        node,
        uid,
        &format!("{text} at {now}"),
    ));
    ev.reason = Some(REASON_IDENTITY_RESTORED.into());
    ev
}

impl Reporter {
    /// Report that someone else wrote this node's own annotations (`text`) and the agent wrote
    /// them back, as an Event on its Node (uid `node_uid`).
    pub async fn identity_restored(&mut self, text: &str, node_uid: Option<&str>) {
        let api = Api::<Event>::namespaced(self.client.clone(), EVENT_NAMESPACE);
        let ev = identity_event(&self.node, node_uid, text, Timestamp::now());
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            warn!(error = %e, "cannot create a Kubernetes Event about this node's annotations");
        }
    }

    /// A reporter acting for the node `node`.
    pub fn new(client: Client, node: &str) -> Reporter {
        Reporter {
            client,
            node: node.to_owned(),
            reported: BTreeMap::new(),
            created: BTreeMap::new(),
        }
    }

    /// Report what is new in `diags` (all current diagnostics): Node problems of this node and
    /// Peer problems. `node_uid` is this node's Node uid, when known.
    pub async fn report(&mut self, diags: &[Diagnostic], node_uid: Option<&str>) {
        let mut by_object: BTreeMap<(Subject, String), Vec<&Diagnostic>> = BTreeMap::new();
        for d in diags {
            let mine = match d.subject {
                // Its own Node's problems, and conflicts another node has with this one (that
                // node may have no agent to report them).
                Subject::Node => {
                    d.name == self.node || d.other.as_deref() == Some(self.node.as_str())
                }
                Subject::Peer => true,
                Subject::Input => false,
            };
            if mine {
                by_object
                    .entry((d.subject, d.name.clone()))
                    .or_default()
                    .push(d);
            }
        }
        let current: BTreeMap<(Subject, String), (String, bool)> = by_object
            .into_iter()
            .map(|(k, v)| (k, (problems(&v), left_out(&v))))
            .collect();
        let api = Api::<Event>::namespaced(self.client.clone(), EVENT_NAMESPACE);
        let now = Timestamp::now();
        let mut kept = BTreeMap::new();
        for ((subject, name), (text, left_out)) in current {
            if self.reported.get(&(subject, name.clone())) == Some(&text) {
                kept.insert((subject, name), text);
                continue;
            }
            // Only this node's own uid is known (an Event about another node names it only).
            let uid = (subject == Subject::Node && name == self.node)
                .then_some(node_uid)
                .flatten();
            let about = About {
                subject,
                name: &name,
                uid,
                left_out,
            };
            let ev = event(about, &text, &self.node, now);
            let ev_name = ev.metadata.name.clone().unwrap_or_default();
            match api.create(&PostParams::default(), &ev).await {
                Ok(_) => {
                    debug!(object = %name, "reported as a Kubernetes Event");
                    self.created.insert(ev_name, 1);
                    kept.insert((subject, name), text);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    if let Some(count) = self.created.get_mut(&ev_name) {
                        // This agent saw it fixed since: it happened again.
                        *count += 1;
                        if let Err(e) = recur(&api, &ev_name, *count, now).await {
                            warn!(object = %name, error = %e, "cannot count a repeated Kubernetes Event");
                        }
                    } else {
                        debug!(object = %name, "already reported");
                    }
                    kept.insert((subject, name), text);
                }
                // Not remembered: tried again with the next report.
                Err(e) => warn!(object = %name, error = %e, "cannot create a Kubernetes Event"),
            }
        }
        self.reported = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_stable_and_differ_per_problem_and_object() {
        let a = event_name(Subject::Node, "n1", Some("u"), "kilo.squat.ai/key: bad");
        assert_eq!(
            a,
            event_name(Subject::Node, "n1", Some("u"), "kilo.squat.ai/key: bad")
        );
        assert!(a.starts_with("n1.wiremesh-"));
        assert_ne!(
            a,
            event_name(Subject::Node, "n1", Some("u"), "kilo.squat.ai/key: worse")
        );
        assert_ne!(
            a,
            event_name(Subject::Node, "n2", Some("u"), "kilo.squat.ai/key: bad")
        );
        assert_ne!(
            a,
            event_name(Subject::Peer, "n1", Some("u"), "kilo.squat.ai/key: bad")
        );
    }

    #[test]
    fn the_event_names_the_object_key_and_problem() {
        let d1 = Diagnostic::node("n1", Some("kilo.squat.ai/endpoint"), "port 0");
        let d2 = Diagnostic::node("n1", Some("kilo.squat.ai/key"), "not base64");
        let text = problems(&[&d2, &d1]);
        assert_eq!(
            text,
            "left out of the mesh: kilo.squat.ai/endpoint: port 0; kilo.squat.ai/key: not base64"
        );
        let node = |left_out| About {
            subject: Subject::Node,
            name: "n1",
            uid: Some("uid-1"),
            left_out,
        };
        let ev = event(node(left_out(&[&d2, &d1])), &text, "n1", Timestamp::now());
        assert_eq!(ev.involved_object.kind.as_deref(), Some("Node"));
        assert_eq!(ev.involved_object.uid.as_deref(), Some("uid-1"));
        assert_eq!(ev.reason.as_deref(), Some(REASON_NODE));
        assert!(
            ev.message
                .unwrap()
                .contains("kilo.squat.ai/key: not base64")
        );
        let peer = About {
            subject: Subject::Peer,
            name: "laptop",
            uid: None,
            left_out: true,
        };
        let ev = event(peer, "spec.publicKey: x", "n1", Timestamp::now());
        assert_eq!(
            ev.involved_object.api_version.as_deref(),
            Some("kilo.squat.ai/v1alpha1")
        );
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some(REASON_PEER));
    }

    #[test]
    fn a_node_kept_with_a_fallback_gets_its_own_reason_and_verdict() {
        let warning = Diagnostic::node(
            "n1",
            Some("kilo.squat.ai/persistent-keepalive"),
            "\"abc\" is not a number of seconds from 0 to 65535; no keepalive is used",
        )
        .kept();
        let text = problems(&[&warning]);
        assert_eq!(
            text,
            "kept in the mesh, with a fallback: kilo.squat.ai/persistent-keepalive: \"abc\" is \
             not a number of seconds from 0 to 65535; no keepalive is used"
        );
        assert!(!left_out(&[&warning]));
        let about = About {
            subject: Subject::Node,
            name: "n1",
            uid: None,
            left_out: false,
        };
        let ev = event(about, &text, "n1", Timestamp::now());
        assert_eq!(ev.reason.as_deref(), Some(REASON_NODE_FALLBACK));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        // One fatal problem among warnings: the node is left out, and the Event says so.
        let fatal = Diagnostic::node("n1", Some("kilo.squat.ai/key"), "not a key");
        assert!(left_out(&[&warning, &fatal]));
        assert!(problems(&[&warning, &fatal]).starts_with("left out of the mesh: "));
    }
}
