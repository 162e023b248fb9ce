//! Every YAML text wiremesh reads or writes goes through here: `serde-saphyr` with explicit
//! budgets, so a hostile or careless file (an alias bomb, thousands of nested brackets, a huge
//! file) is refused with an error in bounded time and memory instead of being expanded.
//!
//! The budgets are sized for Kubernetes objects as `kubectl get -o yaml` prints them (no anchors,
//! a nesting depth of about 10) at 5,000 nodes, with room to spare; `docs/inputs.md` says why
//! this crate and these numbers. Files are read with [`read_bounded`], which refuses a file over
//! [`MAX_INPUT_BYTES`] before reading it.
//!
//! Depends on serde and `serde-saphyr` only.

use std::io::Read as _;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest input file read (registry files, manifests): 64 MiB. A 5,000-node NodeList as
/// `examples/gen_cluster.rs` writes it is 2 MiB.
pub const MAX_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// The deepest nesting of sequences and mappings (block or flow). A Node object is about 10 deep.
pub const MAX_DEPTH: usize = 64;

/// The most alias uses (`*name`) in one input; Kubernetes never writes any.
pub const MAX_ALIASES: usize = 1_000;

/// The most events aliases may replay in all, which bounds what an alias bomb expands to.
pub const MAX_ALIAS_REPLAY: usize = 100_000;

/// The most YAML nodes (scalars, sequences, mappings) in one input: several hundred per full
/// Node object at 5,000 nodes, bounding the memory of the decoded tree.
pub const MAX_NODES: usize = 4_000_000;

/// The most documents (`---`) in one input: one per object at 5,000 nodes and peers.
pub const MAX_DOCUMENTS: usize = 100_000;

/// A YAML input that could not be read, decoded or written.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// The text is not YAML of the expected shape, or it exceeds a budget (depth, aliases,
    /// nodes, documents).
    #[error("{0}")]
    Decode(Box<serde_saphyr::Error>),
    /// A value could not be written as YAML.
    #[error("{0}")]
    Encode(#[from] serde_saphyr::SerializeError),
}

impl From<serde_saphyr::Error> for YamlError {
    fn from(e: serde_saphyr::Error) -> Self {
        YamlError::Decode(Box::new(e))
    }
}

/// The decoding options: the budgets above, one-line errors (line and column, no snippet).
fn options() -> serde_saphyr::Options {
    let budget = serde_saphyr::budget! {
        max_reader_input_bytes: Some(MAX_INPUT_BYTES as usize),
        flow_nesting_limit: MAX_DEPTH,
        max_depth: MAX_DEPTH,
        max_aliases: MAX_ALIASES,
        max_anchors: MAX_ALIASES,
        max_recorded_anchor_events: MAX_ALIAS_REPLAY,
        max_nodes: MAX_NODES,
        max_events: 2 * MAX_NODES + 2 * MAX_DOCUMENTS + 2,
        max_documents: MAX_DOCUMENTS,
    };
    let limits = serde_saphyr::alias_limits! {
        max_total_replayed_events: MAX_ALIAS_REPLAY,
        max_replay_stack_depth: 16,
    };
    serde_saphyr::options! {
        budget: budget,
        alias_limits: limits,
        with_snippet: false,
    }
}

/// Decode one YAML document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    Ok(serde_saphyr::from_str_with_options(text, options())?)
}

/// Decode every document of a YAML stream (empty documents are skipped).
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    Ok(serde_saphyr::from_multiple_with_options(text, options())?)
}

/// Write `value` as one YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, YamlError> {
    Ok(serde_saphyr::to_string(value)?)
}

/// Read a file of at most `limit` bytes as UTF-8 text; a larger file is refused without being
/// read (and one that grows past the limit while read is refused too).
pub fn read_bounded(path: &Path, limit: u64) -> Result<String, ReadError> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > limit {
        return Err(ReadError::TooLarge { size, limit });
    }
    let mut text = String::with_capacity(size as usize);
    let read = file.take(limit + 1).read_to_string(&mut text)?;
    if read as u64 > limit {
        return Err(ReadError::TooLarge {
            size: read as u64,
            limit,
        });
    }
    Ok(text)
}

/// Why [`read_bounded`] returned no text.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read, or is not UTF-8.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file is larger than the limit.
    #[error("the file is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size in bytes (at least this many when it grew while read).
        size: u64,
        /// The limit.
        limit: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nine levels of ten aliases each: 10^9 strings once expanded.
    fn billion_laughs() -> String {
        let mut s = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        for w in names.windows(2) {
            let (prev, name) = (w[0], w[1]);
            let refs = vec![format!("*{prev}"); 10].join(",");
            s.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        s
    }

    #[test]
    fn an_alias_bomb_is_refused_as_over_the_alias_budget() {
        let e = from_str::<serde_json::Value>(&billion_laughs()).expect_err("refused");
        assert!(matches!(e, YamlError::Decode(_)), "{e}");
        assert!(
            e.to_string()
                .starts_with("budget breached: RecordedAnchorEvents"),
            "{e}"
        );
    }

    #[test]
    fn a_wide_alias_fan_out_is_refused_as_over_the_alias_budget() {
        // 750 KB: one anchor of 1,000 strings used 250,000 times (serde_yaml 0.9 ran out of
        // 6 GB on it).
        let text = format!(
            "x: &a [{}]\nitems: [{}]\n",
            vec!["lol"; 1_000].join(","),
            vec!["*a"; 250_000].join(",")
        );
        let e = from_str::<serde_json::Value>(&text).expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("alias replay limit exceeded: total_replayed_events=100001"),
            "{e}"
        );
    }

    #[test]
    fn a_hundred_thousand_nested_flow_sequences_are_refused_as_too_deep() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = from_str::<serde_json::Value>(&text).expect_err("refused");
        assert!(e.to_string().contains("recursion limit exceeded"), "{e}");
    }

    #[test]
    fn a_thousand_nested_block_mappings_are_refused_as_too_deep() {
        let mut text = String::new();
        for i in 0..1_000 {
            text.push_str(&" ".repeat(i));
            text.push_str("a:\n");
        }
        let e = from_str::<serde_json::Value>(&text).expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("budget breached: Depth { depth: 65 }"),
            "{e}"
        );
    }

    #[test]
    fn a_few_anchors_as_people_write_them_are_read() {
        let v: serde_json::Value =
            from_str("base: &b {mtu: 1420}\none: *b\ntwo: *b\n").expect("read");
        assert_eq!(v["two"]["mtu"], 1420);
    }

    #[test]
    fn a_file_over_the_limit_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, "a: 1\n".repeat(100)).expect("write");
        assert!(matches!(
            read_bounded(&path, 499),
            Err(ReadError::TooLarge {
                size: 500,
                limit: 499
            })
        ));
        assert_eq!(read_bounded(&path, 500).expect("at the limit").len(), 500);
    }
}
