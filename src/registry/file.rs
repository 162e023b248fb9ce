//! The file registry: Nodes and Peers from JSON or YAML text, as `kubectl get -o json|yaml` prints
//! them (a `NodeList`, a `List`, a single object, or several YAML documents).
//!
//! Decoding is pure (`decode_nodes`, `decode_peers` take text); `load_*` add the file read.
//! Depends on serde, `k8s-openapi` and the annotation/peer translators.

use std::path::Path;

use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::diagnostic::{Diagnostic, Subject};
use crate::model::{MeshNode, MeshPeer};
use crate::registry::annotations::parse_node;
use crate::registry::peer::{PeerResource, parse_peer};

/// A file that could not be read or decoded at all.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is neither JSON nor YAML of the expected shape.
    #[error("{what}: {problem}")]
    Decode {
        /// Which input.
        what: String,
        /// What the decoder said.
        problem: String,
    },
}

/// What a registry read yields: the valid objects, and a diagnostic for each one left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded<T> {
    /// Objects that were valid.
    pub items: Vec<T>,
    /// Problems, one or more per object left out.
    pub diagnostics: Vec<Diagnostic>,
}

/// Split text into JSON values: a list's `items`, each YAML document, or the single object.
fn documents(text: &str, what: &str) -> Result<Vec<serde_json::Value>, FileError> {
    let decode_err = |problem: String| FileError::Decode {
        what: what.to_owned(),
        problem,
    };
    let trimmed = text.trim_start();
    let docs: Vec<serde_json::Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        vec![serde_json::from_str(text).map_err(|e| decode_err(e.to_string()))?]
    } else {
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = serde_json::Value::deserialize(doc).map_err(|e| decode_err(e.to_string()))?;
            if !v.is_null() {
                out.push(v);
            }
        }
        out
    };
    let mut items = Vec::new();
    for doc in docs {
        match doc {
            serde_json::Value::Array(a) => items.extend(a),
            serde_json::Value::Object(ref o) if o.get("items").is_some_and(|i| i.is_array()) => {
                if let Some(serde_json::Value::Array(a)) = doc.get("items").cloned() {
                    items.extend(a);
                }
            }
            other => items.push(other),
        }
    }
    Ok(items)
}

fn item_name(v: &serde_json::Value, index: usize) -> String {
    v.pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("item {index}"))
}

fn decode_each<T: DeserializeOwned, U>(
    values: Vec<serde_json::Value>,
    subject: Subject,
    expected_kind: &str,
    translate: impl Fn(&T) -> Result<U, Vec<Diagnostic>>,
) -> Loaded<U> {
    let mut out = Loaded {
        items: Vec::with_capacity(values.len()),
        diagnostics: Vec::new(),
    };
    for (i, v) in values.into_iter().enumerate() {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or(expected_kind);
        if kind != expected_kind {
            continue; // A mixed file: other kinds are not ours to read.
        }
        let name = item_name(&v, i);
        match serde_json::from_value::<T>(v) {
            Ok(obj) => match translate(&obj) {
                Ok(u) => out.items.push(u),
                Err(d) => out.diagnostics.extend(d),
            },
            Err(e) => out.diagnostics.push(Diagnostic {
                subject,
                name,
                key: None,
                problem: format!("not a valid {expected_kind}: {e}"),
                skipped: true,
            }),
        }
    }
    out
}

/// Decode Nodes from text and translate each; bad nodes become diagnostics.
pub fn decode_nodes(text: &str, topology_label: &str) -> Result<Loaded<MeshNode>, FileError> {
    let values = documents(text, "nodes")?;
    Ok(decode_each::<Node, _>(values, Subject::Node, "Node", |n| {
        parse_node(n, topology_label)
    }))
}

/// Decode Peer resources from text and translate each; bad peers become diagnostics.
pub fn decode_peers(text: &str) -> Result<Loaded<MeshPeer>, FileError> {
    let values = documents(text, "peers")?;
    Ok(decode_each::<PeerResource, _>(
        values,
        Subject::Peer,
        "Peer",
        parse_peer,
    ))
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Read and decode a Nodes file.
pub fn load_nodes(path: &Path, topology_label: &str) -> Result<Loaded<MeshNode>, FileError> {
    decode_nodes(&read(path)?, topology_label).map_err(|e| with_path(e, path))
}

/// Read and decode a Peers file.
pub fn load_peers(path: &Path) -> Result<Loaded<MeshPeer>, FileError> {
    decode_peers(&read(path)?).map_err(|e| with_path(e, path))
}

fn with_path(e: FileError, path: &Path) -> FileError {
    match e {
        FileError::Decode { problem, .. } => FileError::Decode {
            what: path.display().to_string(),
            problem,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;

    #[test]
    fn node_list_json_with_one_bad_node_keeps_the_rest() {
        let text = r#"{"apiVersion":"v1","kind":"NodeList","items":[
          {"apiVersion":"v1","kind":"Node","metadata":{"name":"a","annotations":{"kilo.squat.ai/key":"bad"}}},
          {"apiVersion":"v1","kind":"Node","metadata":{"name":"b"},"spec":{"podCIDR":"10.42.0.0/24"}},
          {"apiVersion":"v1","kind":"Node","metadata":{"name":"c"},"spec":{"podCIDR":7}}
        ]}"#;
        let l = decode_nodes(text, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert_eq!(l.items.len(), 1);
        assert_eq!(l.items[0].name.as_str(), "b");
        assert_eq!(l.diagnostics.len(), 2);
        assert_eq!(l.diagnostics[0].name, "a");
        assert_eq!(l.diagnostics[0].key.as_deref(), Some("kilo.squat.ai/key"));
        assert_eq!(l.diagnostics[1].name, "c");
    }

    #[test]
    fn yaml_list_and_multi_document_yaml_are_read() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- kind: Node\n  metadata: {name: a}\n- kind: Node\n  metadata: {name: b}\n";
        assert_eq!(
            decode_nodes(list, DEFAULT_TOPOLOGY_LABEL)
                .unwrap()
                .items
                .len(),
            2
        );
        let docs = "kind: Node\nmetadata: {name: a}\n---\nkind: Node\nmetadata: {name: b}\n---\n";
        assert_eq!(
            decode_nodes(docs, DEFAULT_TOPOLOGY_LABEL)
                .unwrap()
                .items
                .len(),
            2
        );
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            decode_nodes("{not json", DEFAULT_TOPOLOGY_LABEL),
            Err(FileError::Decode { .. })
        ));
    }
}
