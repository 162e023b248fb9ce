//! `showconf`: wg-quick configuration that lets an outside machine join the mesh as a given node
//! or external peer (Kilo's `kgctl showconf`).
//!
//! Pure: renders text from a [`Topology`]. Depends on the topology, model and desired state.

use crate::model::NodeName;
use crate::topology::{MeshOptions, Topology};

/// Why a configuration cannot be shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShowconfError {
    /// No ready node of that name.
    #[error("no node named {0} takes part in the mesh")]
    UnknownNode(String),
    /// No ready peer of that name.
    #[error("no peer named {0} takes part in the mesh")]
    UnknownPeer(String),
}

/// wg-quick configuration for node `node`.
pub fn node_config(
    _topo: &Topology<'_>,
    node: &NodeName,
    _opts: &MeshOptions,
) -> Result<String, ShowconfError> {
    Err(ShowconfError::UnknownNode(node.to_string()))
}

/// wg-quick configuration for external peer `peer`.
pub fn peer_config(
    _topo: &Topology<'_>,
    peer: &NodeName,
    _opts: &MeshOptions,
) -> Result<String, ShowconfError> {
    Err(ShowconfError::UnknownPeer(peer.to_string()))
}
