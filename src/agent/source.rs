//! The file registry as a stream of [`Batch`]es, like the Kubernetes registry's: the files are
//! read at start (an unreadable file stops the agent there), then re-read on every change and
//! diffed against the previous read. A read that fails later keeps the last good state.
//!
//! Depends on the file registry, the file watcher and tokio.

use std::path::PathBuf;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{AgentError, FileWatcher};
use crate::model::{MeshNode, MeshPeer};
use crate::registry::cluster::Batch;
use crate::registry::file::{FileError, NodeCache, load_nodes_cached, load_peers};
use crate::registry::{diff_nodes, diff_peers};

/// The files of a file registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRegistry {
    /// Nodes, as `kubectl get nodes -o yaml|json` prints them.
    pub nodes: PathBuf,
    /// Peers (Kilo `Peer` resources), if any.
    pub peers: Option<PathBuf>,
}

struct Reader {
    files: FileRegistry,
    topology_label: String,
    cache: NodeCache,
    nodes: Vec<MeshNode>,
    peers: Vec<MeshPeer>,
}

impl Reader {
    /// Read the files; the batch that turns the previous read into this one.
    fn read(&mut self) -> Result<Batch, FileError> {
        let n = load_nodes_cached(&self.files.nodes, &self.topology_label, &mut self.cache)?;
        let mut diagnostics = n.diagnostics;
        let mut peers = Vec::new();
        if let Some(p) = &self.files.peers {
            let p = load_peers(p)?;
            peers = p.items;
            diagnostics.extend(p.diagnostics);
        }
        let mut events = diff_nodes(self.nodes.iter(), &n.items);
        events.extend(diff_peers(self.peers.iter(), &peers));
        self.nodes = n.items;
        self.peers = peers;
        Ok(Batch {
            events,
            synced: true,
            connected: true,
            diagnostics: Some(diagnostics),
            local: None,
        })
    }
}

/// Read the files now and start watching them; the first batch holds everything.
pub fn file_source(
    files: FileRegistry,
    topology_label: &str,
) -> Result<mpsc::Receiver<Batch>, AgentError> {
    let mut watched = vec![files.nodes.clone()];
    watched.extend(files.peers.clone());
    let (watcher, mut changes) = FileWatcher::new(&watched)?;
    let mut reader = Reader {
        files,
        topology_label: topology_label.to_owned(),
        cache: NodeCache::default(),
        nodes: Vec::new(),
        peers: Vec::new(),
    };
    let first = reader.read()?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _watcher = watcher;
        if tx.send(first).await.is_err() {
            return;
        }
        while changes.recv().await.is_some() {
            // Signals that arrived meanwhile are covered by this one read.
            while changes.try_recv().is_ok() {}
            match reader.read() {
                Err(e) => {
                    warn!(error = %e, "cannot read the registry; keeping the last good state")
                }
                Ok(b) => {
                    debug!(events = b.events.len(), "registry files changed");
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}
