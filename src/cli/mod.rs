//! Shared pieces of the command-line tools: reading the registry (files, or a live cluster in
//! [`cluster`]) and choosing the granularity, the pure renderers of `meshctl` output, and flags
//! that may stand before the subcommand ([`args`]).
//!
//! May depend on every library module; does file I/O only in [`load`] and network I/O only in
//! [`cluster`] (the API server) and [`status`] (an agent's HTTP endpoint). Errors are
//! `thiserror` types; the binaries wrap them with `anyhow`.

pub mod args;
pub mod cluster;
pub mod link;
pub mod peer;
pub mod plan;
pub mod status;

use std::path::Path;

use crate::diagnostic::Diagnostic;
use crate::model::{Granularity, MeshNode, MeshPeer};
use crate::registry::file::{FileError, load_nodes, load_peers};

/// Nodes and peers read from files or a cluster, with every problem found on the way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Valid nodes.
    pub nodes: Vec<MeshNode>,
    /// Valid external peers.
    pub peers: Vec<MeshPeer>,
    /// Problems found while parsing: objects left out, and malformed values of kept objects
    /// (replaced by Kilo's).
    pub diagnostics: Vec<Diagnostic>,
}

/// Read the nodes file and, if given, the peers file.
pub fn load(nodes: &Path, peers: Option<&Path>, topology_label: &str) -> Result<Inputs, FileError> {
    let n = load_nodes(nodes, topology_label)?;
    let mut inputs = Inputs {
        nodes: n.items,
        peers: Vec::new(),
        diagnostics: n.diagnostics,
    };
    if let Some(p) = peers {
        let p = load_peers(p)?;
        inputs.peers = p.items;
        inputs.diagnostics.extend(p.diagnostics);
    }
    Ok(inputs)
}

/// The granularity the cluster's agents publish (first node by name that says), else
/// `location`, Kilo's default. Like `kgctl --mesh-granularity auto`.
pub fn auto_granularity(nodes: &[MeshNode]) -> Granularity {
    let mut named: Vec<&MeshNode> = nodes.iter().filter(|n| n.granularity.is_some()).collect();
    named.sort_by(|a, b| a.name.cmp(&b.name));
    named
        .first()
        .and_then(|n| n.granularity)
        .unwrap_or(Granularity::Location)
}

/// Rows as aligned columns: each column as wide as its widest cell, two spaces between columns,
/// no trailing spaces. One line per row.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let rows = vec![
            vec!["a".to_owned(), "bb".to_owned(), "c".to_owned()],
            vec!["aaa".to_owned(), "b".to_owned()],
        ];
        assert_eq!(table(&rows), "a    bb  c\naaa  b\n");
    }

    #[test]
    fn auto_granularity_follows_published_annotation_else_location() {
        let mut a = MeshNode::new("b");
        a.granularity = Some(Granularity::Full);
        let b = MeshNode::new("a");
        assert_eq!(auto_granularity(&[a.clone(), b.clone()]), Granularity::Full);
        assert_eq!(auto_granularity(&[b]), Granularity::Location);
    }
}
