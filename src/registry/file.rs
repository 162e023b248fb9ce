//! The file registry: Nodes and Peers from JSON or YAML text, as `kubectl get -o json|yaml` prints
//! them (a `NodeList`, a `List`, a single object, or several YAML documents).
//!
//! Decoding is pure (`decode_nodes`, `decode_peers` take text); `load_*` add the file read,
//! which refuses a file over [`crate::yaml::MAX_INPUT_BYTES`] unread. JSON is decoded by
//! `serde_json` (nesting limited to 128), YAML by [`crate::yaml`] (budgets for depth, aliases
//! and size).
//! Depends on serde, `k8s-openapi`, [`crate::yaml`] and the annotation/peer translators.

use std::path::Path;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::diagnostic::{Diagnostic, Subject};
use crate::model::{MeshNode, MeshPeer};
use crate::registry::Parsed;
use crate::registry::annotations::{NodeParts, parse_parts};
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
    /// The file is larger than [`crate::yaml::MAX_INPUT_BYTES`]; it was not read.
    #[error("{path} is {size} bytes, over the limit of {limit} bytes; not read")]
    TooLarge {
        /// The file's path.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The text is neither JSON nor YAML of the expected shape, or exceeds a YAML budget.
    #[error("{what}: {problem}")]
    Decode {
        /// Which input.
        what: String,
        /// What the decoder said.
        problem: String,
    },
    /// The nodes file is empty (or only white space): a registry without nodes is never
    /// applied (a file being rewritten in place looks like this).
    #[error("{path} is empty")]
    Empty {
        /// The file's path.
        path: String,
    },
    /// The nodes file holds no valid node: a registry without nodes is never applied.
    #[error("{path} holds no valid node ({left_out} left out)")]
    NoNodes {
        /// The file's path.
        path: String,
        /// Nodes left out, each with a diagnostic.
        left_out: usize,
    },
}

impl FileError {
    /// This error with the input named by `path` (a decode error names what was decoded).
    pub fn at(self, path: &Path) -> FileError {
        match self {
            FileError::Decode { problem, .. } => FileError::Decode {
                what: path.display().to_string(),
                problem,
            },
            other => other,
        }
    }
}

/// What a registry read yields: the objects that take part, and the problems found: one or more
/// per object left out, and one per malformed value of a kept object (Kilo's value is used).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    /// Objects that take part.
    pub items: Vec<T>,
    /// Problems: those of objects left out (`skipped`) and warnings about kept ones.
    pub diagnostics: Vec<Diagnostic>,
}

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Loaded {
            items: Vec::new(),
            diagnostics: Vec::new(),
        }
    }
}

impl<T> Loaded<T> {
    /// Add one parse result: the object (and its warnings), or its problems.
    pub fn push(&mut self, r: Result<Parsed<T>, Vec<Diagnostic>>) {
        match r {
            Ok(p) => {
                self.items.push(p.value);
                self.diagnostics.extend(p.warnings);
            }
            Err(d) => self.diagnostics.extend(d),
        }
    }
}

/// One object of an input: borrowed raw JSON (no intermediate tree), or a value from YAML.
enum Item<'a> {
    Raw(&'a RawValue),
    Value(serde_json::Value),
}

impl Item<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match self {
            Item::Raw(r) => serde_json::from_str(r.get()),
            Item::Value(v) => T::deserialize(v),
        }
    }
}

/// Just enough of an object to name it in a diagnostic and to skip other kinds.
#[derive(Deserialize, Default)]
struct Header {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: HeaderMeta,
}

#[derive(Deserialize, Default)]
struct HeaderMeta {
    #[serde(default)]
    name: Option<String>,
}

/// A JSON document: a list with `items`, an array, or one object.
#[derive(Deserialize)]
struct JsonTop<'a> {
    #[serde(borrow, default)]
    items: Option<Vec<&'a RawValue>>,
}

/// Split text into objects: a list's `items`, an array, each YAML document, or the single object.
fn documents<'a>(text: &'a str, what: &str) -> Result<Vec<Item<'a>>, FileError> {
    let decode_err = |problem: String| FileError::Decode {
        what: what.to_owned(),
        problem,
    };
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| decode_err(e.to_string()))?;
        return Ok(items.into_iter().map(Item::Raw).collect());
    }
    if trimmed.starts_with('{') {
        let top: JsonTop<'_> = serde_json::from_str(text).map_err(|e| decode_err(e.to_string()))?;
        return Ok(match top.items {
            Some(items) => items.into_iter().map(Item::Raw).collect(),
            None => {
                let whole: &RawValue =
                    serde_json::from_str(text).map_err(|e| decode_err(e.to_string()))?;
                vec![Item::Raw(whole)]
            }
        });
    }
    let mut items = Vec::new();
    let docs: Vec<serde_json::Value> =
        crate::yaml::documents(text).map_err(|e| decode_err(e.to_string()))?;
    for v in docs {
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::Array(a) => items.extend(a.into_iter().map(Item::Value)),
            serde_json::Value::Object(mut o) => match o.remove("items") {
                Some(serde_json::Value::Array(a)) => items.extend(a.into_iter().map(Item::Value)),
                Some(other) => {
                    o.insert("items".into(), other);
                    items.push(Item::Value(serde_json::Value::Object(o)));
                }
                None => items.push(Item::Value(serde_json::Value::Object(o))),
            },
            other => items.push(Item::Value(other)),
        }
    }
    Ok(items)
}

fn decode_each<T: DeserializeOwned, U>(
    items: Vec<Item<'_>>,
    subject: Subject,
    expected_kind: &str,
    kind_of: impl Fn(&T) -> Option<&str>,
    translate: impl Fn(&T) -> Result<Parsed<U>, Vec<Diagnostic>>,
) -> Loaded<U> {
    let mut out = Loaded {
        items: Vec::with_capacity(items.len()),
        diagnostics: Vec::new(),
    };
    for (i, item) in items.iter().enumerate() {
        match item.decode::<T>() {
            Ok(obj) => {
                if kind_of(&obj).is_some_and(|k| !k.is_empty() && k != expected_kind) {
                    continue; // A mixed file: other kinds are not ours to read.
                }
                out.push(translate(&obj));
            }
            Err(e) => {
                let header: Header = item.decode().unwrap_or_default();
                if header.kind.as_deref().is_some_and(|k| k != expected_kind) {
                    continue;
                }
                out.diagnostics.push(Diagnostic {
                    subject,
                    name: header.metadata.name.unwrap_or_else(|| format!("item {i}")),
                    key: None,
                    problem: format!("not a valid {expected_kind}: {e}"),
                    skipped: true,
                    other: None,
                })
            }
        }
    }
    out
}

/// The fields of a Node the mesh reads; everything else in the object is skipped unparsed.
#[derive(Deserialize)]
struct NodeLite {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: MetaLite,
    #[serde(default)]
    spec: Option<SpecLite>,
    #[serde(default)]
    status: Option<StatusLite>,
}

#[derive(Deserialize, Default)]
struct MetaLite {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    /// RFC 3339; an unreadable one counts as unknown.
    #[serde(default, rename = "creationTimestamp")]
    creation_timestamp: Option<Lenient>,
}

/// A string, or anything else (ignored) rather than a failed decoding.
#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient {
    Text(String),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize, Default)]
struct SpecLite {
    #[serde(default, rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct StatusLite {
    #[serde(default)]
    addresses: Option<Vec<AddressLite>>,
}

#[derive(Deserialize)]
struct AddressLite {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

impl NodeLite {
    fn parts(&self) -> NodeParts<'_> {
        let spec = self.spec.as_ref();
        NodeParts {
            name: self.metadata.name.as_deref().unwrap_or_default(),
            annotations: self.metadata.annotations.as_ref(),
            labels: self.metadata.labels.as_ref(),
            pod_cidr: spec.and_then(|s| s.pod_cidr.as_deref()),
            pod_cidrs: spec
                .and_then(|s| s.pod_cidrs.as_deref())
                .unwrap_or_default(),
            status_internal_ip: self
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .map(|a| a.address.as_str()),
            created: self
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| match t {
                    Lenient::Text(t) => t.parse::<k8s_openapi::jiff::Timestamp>().ok(),
                    Lenient::Other(_) => None,
                })
                .map(|t| t.as_second()),
        }
    }
}

/// Decode Nodes from text and translate each; bad nodes become diagnostics.
pub fn decode_nodes(text: &str, topology_label: &str) -> Result<Loaded<MeshNode>, FileError> {
    decode_nodes_cached(text, topology_label, &mut NodeCache::default())
}

/// The translation of each JSON node object seen in the last read, by its exact text: a file
/// that changed in one node is re-translated in one node (a watcher re-reads the whole file).
#[derive(Debug, Default)]
pub struct NodeCache {
    label: String,
    by_text: rustc_hash::FxHashMap<Box<str>, Result<Parsed<MeshNode>, Vec<Diagnostic>>>,
}

/// Like [`decode_nodes`], reusing the translations in `cache` for JSON objects whose text did
/// not change, and leaving in `cache` exactly this read's objects.
pub fn decode_nodes_cached(
    text: &str,
    topology_label: &str,
    cache: &mut NodeCache,
) -> Result<Loaded<MeshNode>, FileError> {
    let items = documents(text, "nodes")?;
    if cache.label != topology_label {
        cache.by_text.clear();
        cache.label = topology_label.to_owned();
    }
    let mut old = std::mem::take(&mut cache.by_text);
    let mut out = Loaded {
        items: Vec::new(),
        diagnostics: Vec::new(),
    };
    let mut fresh = Vec::new();
    for item in items {
        let Item::Raw(raw) = item else {
            fresh.push(item);
            continue;
        };
        let key = raw.get();
        let hit = old.remove_entry(key);
        let (key, result) = match hit {
            Some(entry) => entry,
            None => {
                let one = decode_each::<NodeLite, _>(
                    vec![Item::Raw(raw)],
                    Subject::Node,
                    "Node",
                    |n| n.kind.as_deref(),
                    |n| parse_parts(n.parts(), topology_label),
                );
                let result = match (one.items.into_iter().next(), one.diagnostics) {
                    (Some(value), warnings) => Ok(Parsed { value, warnings }),
                    (None, d) => Err(d),
                };
                (Box::from(key), result)
            }
        };
        out.push(result.clone());
        cache.by_text.insert(key, result);
    }
    if !fresh.is_empty() {
        let rest = decode_each::<NodeLite, _>(
            fresh,
            Subject::Node,
            "Node",
            |n| n.kind.as_deref(),
            |n| parse_parts(n.parts(), topology_label),
        );
        out.items.extend(rest.items);
        out.diagnostics.extend(rest.diagnostics);
    }
    Ok(out)
}

/// Read and decode a Nodes file, reusing `cache` (see [`decode_nodes_cached`]).
pub fn load_nodes_cached(
    path: &Path,
    topology_label: &str,
    cache: &mut NodeCache,
) -> Result<Loaded<MeshNode>, FileError> {
    decode_nodes_cached(&read_text(path)?, topology_label, cache).map_err(|e| e.at(path))
}

/// Decode Peer resources from text and translate each; bad peers become diagnostics.
pub fn decode_peers(text: &str) -> Result<Loaded<MeshPeer>, FileError> {
    let items = documents(text, "peers")?;
    Ok(decode_each::<PeerResource, _>(
        items,
        Subject::Peer,
        "Peer",
        |p| Some(p.kind.as_str()),
        |p| parse_peer(p).map(Parsed::clean),
    ))
}

/// The text of a registry file, refused unread when over [`crate::yaml::MAX_INPUT_BYTES`].
pub fn read_text(path: &Path) -> Result<String, FileError> {
    use crate::yaml::{MAX_INPUT_BYTES, ReadError, read_bounded};
    read_bounded(path, MAX_INPUT_BYTES).map_err(|e| match e {
        ReadError::Io(source) => FileError::Read {
            path: path.display().to_string(),
            source,
        },
        ReadError::TooLarge { size, limit } => FileError::TooLarge {
            path: path.display().to_string(),
            size,
            limit,
        },
    })
}

/// Read and decode a Nodes file.
pub fn load_nodes(path: &Path, topology_label: &str) -> Result<Loaded<MeshNode>, FileError> {
    decode_nodes(&read_text(path)?, topology_label).map_err(|e| e.at(path))
}

/// Read and decode a Peers file.
pub fn load_peers(path: &Path) -> Result<Loaded<MeshPeer>, FileError> {
    decode_peers(&read_text(path)?).map_err(|e| e.at(path))
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
    fn a_creation_timestamp_is_read_and_an_unreadable_one_is_unknown() {
        let text = r#"{"kind":"NodeList","items":[
          {"kind":"Node","metadata":{"name":"a","creationTimestamp":"2024-01-01T00:00:00Z"},"spec":{"podCIDR":"10.42.0.0/24"}},
          {"kind":"Node","metadata":{"name":"b","creationTimestamp":7},"spec":{"podCIDR":"10.42.1.0/24"}},
          {"kind":"Node","metadata":{"name":"c","creationTimestamp":"yesterday"},"spec":{"podCIDR":"10.42.2.0/24"}}
        ]}"#;
        let l = decode_nodes(text, DEFAULT_TOPOLOGY_LABEL).unwrap();
        let created: Vec<Option<i64>> = l.items.iter().map(|n| n.created).collect();
        assert_eq!(created, [Some(1_704_067_200), None, None]);
        assert!(l.diagnostics.is_empty(), "{:?}", l.diagnostics);
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
    fn cached_decoding_equals_plain_decoding_and_follows_changes() {
        let text = r#"{"kind":"NodeList","items":[
          {"kind":"Node","metadata":{"name":"a"},"spec":{"podCIDR":"10.42.0.0/24"}},
          {"kind":"Node","metadata":{"name":"b","annotations":{"kilo.squat.ai/key":"bad"}}}
        ]}"#;
        let mut cache = NodeCache::default();
        let first = decode_nodes_cached(text, DEFAULT_TOPOLOGY_LABEL, &mut cache).unwrap();
        assert_eq!(first, decode_nodes(text, DEFAULT_TOPOLOGY_LABEL).unwrap());
        assert_eq!(cache.by_text.len(), 2);
        let changed = text.replace("10.42.0.0/24", "10.42.9.0/24");
        let second = decode_nodes_cached(&changed, DEFAULT_TOPOLOGY_LABEL, &mut cache).unwrap();
        assert_eq!(
            second,
            decode_nodes(&changed, DEFAULT_TOPOLOGY_LABEL).unwrap()
        );
        assert_eq!(second.items[0].pod_cidrs[0].to_string(), "10.42.9.0/24");
        assert_eq!(cache.by_text.len(), 2, "the old text of node a was dropped");
    }

    fn file_with(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nodes.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn a_nodes_file_with_an_alias_bomb_is_refused_over_the_alias_budget() {
        let mut text = String::from(
            "apiVersion: v1\nkind: List\nx0: &x0 [lol,lol,lol,lol,lol,lol,lol,lol,lol,lol]\n",
        );
        for i in 1..10 {
            let refs = vec![format!("*x{}", i - 1); 10].join(",");
            text.push_str(&format!("x{i}: &x{i} [{refs}]\n"));
        }
        text.push_str("items: [*x9]\n");
        let (_dir, path) = file_with(&text);
        let e = load_nodes(&path, DEFAULT_TOPOLOGY_LABEL).expect_err("refused");
        let FileError::Decode { what, problem } = &e else {
            panic!("not a decode error: {e}")
        };
        assert_eq!(what, &path.display().to_string());
        assert!(
            problem.starts_with("budget breached: RecordedAnchorEvents"),
            "{e}"
        );
    }

    #[test]
    fn a_nodes_file_nested_a_hundred_thousand_deep_is_refused_as_too_deep() {
        let yaml = format!("items: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (_dir, path) = file_with(&yaml);
        let e = load_nodes(&path, DEFAULT_TOPOLOGY_LABEL).expect_err("refused");
        assert!(matches!(e, FileError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("recursion limit exceeded"), "{e}");
        // JSON items are split without being decoded: the deep one is left out as no Node.
        let json = format!(
            "{{\"items\": [{}{}]}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let (_dir, path) = file_with(&json);
        let l = load_nodes(&path, DEFAULT_TOPOLOGY_LABEL).expect("read");
        assert!(l.items.is_empty());
        assert!(l.diagnostics[0].problem.starts_with("not a valid Node"));
    }

    #[test]
    fn a_nodes_file_over_the_size_limit_is_refused_unread() {
        let (_dir, path) = file_with("");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        // Sparse: no 64 MiB written to disk.
        f.set_len(crate::yaml::MAX_INPUT_BYTES + 1).expect("grow");
        let e = load_nodes(&path, DEFAULT_TOPOLOGY_LABEL).expect_err("refused");
        assert!(
            matches!(e, FileError::TooLarge { size, limit, .. }
                if size == limit + 1 && limit == crate::yaml::MAX_INPUT_BYTES),
            "{e}"
        );
        assert!(e.to_string().contains("over the limit"), "{e}");
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            decode_nodes("{not json", DEFAULT_TOPOLOGY_LABEL),
            Err(FileError::Decode { .. })
        ));
    }
}
