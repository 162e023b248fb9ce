//! Graph exporter: draws a [`Topology`] as DOT or as a self-contained SVG (no graphviz needed).
//!
//! Pure: `fn(&Topology) -> String`. Depends on the topology and model only.

use crate::model::NodeName;
use crate::topology::Topology;

/// What to highlight or label in a drawing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphOptions {
    /// The node the drawing is made from, drawn highlighted.
    pub local: Option<NodeName>,
    /// A title for the drawing.
    pub title: Option<String>,
}

/// The mesh as a graphviz DOT document.
pub fn render_dot(_topo: &Topology<'_>, _opts: &GraphOptions) -> String {
    String::new()
}

/// The mesh as a self-contained SVG document.
pub fn render_svg(_topo: &Topology<'_>, _opts: &GraphOptions) -> String {
    String::new()
}
