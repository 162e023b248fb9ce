//! The file registry as a stream of [`Batch`]es, like the Kubernetes registry's: the files are
//! read at start (an unreadable file stops the agent there), then re-read on every change and
//! diffed against the previous read.
//!
//! A file is never applied half-written. A file replaced by a rename is complete and read at
//! once; a file written in place is read only once its writer closed it and no event came for
//! [`Settle::quiet`], and taken only when a second read [`Settle::quiet`] later is the same.
//! A file that then cannot be read, does not decode, is empty or holds no valid node is an
//! outage, like an unreachable API server: the loop gets a batch with `connected: false` and
//! no events, so it keeps the mesh as it is, and the first good read after it reconnects.
//!
//! Depends on the file registry, the file watcher and tokio.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::watch::{ChangeFeed, Changes};
use super::{AgentError, FileWatcher};
use crate::model::{MeshNode, MeshPeer};
use crate::registry::cluster::Batch;
use crate::registry::file::{FileError, NodeCache, decode_nodes_cached, decode_peers, read_text};
use crate::registry::{diff_nodes, diff_peers};

/// The files of a file registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRegistry {
    /// Nodes, as `kubectl get nodes -o yaml|json` prints them.
    pub nodes: PathBuf,
    /// Peers (Kilo `Peer` resources), if any.
    pub peers: Option<PathBuf>,
}

/// How long a file written in place must stay unchanged before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settle {
    /// No event for this long, and two reads this far apart equal.
    pub quiet: Duration,
    /// The longest a writer that keeps the file open is waited for; then the file is read
    /// (still only when two reads agree).
    pub writer: Duration,
}

impl Default for Settle {
    /// 50 ms of quiet; a writer holding the file open is waited for up to 10 s.
    fn default() -> Self {
        Settle {
            quiet: Duration::from_millis(50),
            writer: Duration::from_secs(10),
        }
    }
}

/// The raw texts of the files, as read once.
#[derive(PartialEq, Eq)]
struct Texts {
    nodes: String,
    peers: Option<String>,
}

struct Reader {
    files: FileRegistry,
    topology_label: String,
    cache: NodeCache,
    nodes: Vec<MeshNode>,
    peers: Vec<MeshPeer>,
}

impl Reader {
    fn read_texts(&self) -> Result<Texts, FileError> {
        Ok(Texts {
            nodes: read_text(&self.files.nodes)?,
            peers: self.files.peers.as_deref().map(read_text).transpose()?,
        })
    }

    /// Decode `texts`; the batch that turns the previous read into this one. An empty nodes
    /// file or one without a single valid node is refused, and the previous read stays.
    fn apply(&mut self, texts: &Texts) -> Result<Batch, FileError> {
        let path = self.files.nodes.display().to_string();
        if texts.nodes.trim().is_empty() {
            return Err(FileError::Empty { path });
        }
        let n = decode_nodes_cached(&texts.nodes, &self.topology_label, &mut self.cache)
            .map_err(|e| e.at(&self.files.nodes))?;
        if n.items.is_empty() {
            return Err(FileError::NoNodes {
                path,
                left_out: n.diagnostics.iter().filter(|d| d.skipped).count(),
            });
        }
        let mut diagnostics = n.diagnostics;
        let mut peers = Vec::new();
        if let (Some(p), Some(text)) = (&self.files.peers, &texts.peers) {
            let p = decode_peers(text).map_err(|e| e.at(p))?;
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

/// Wait until what `first` announced has settled (see [`Settle`]) and read the files then.
async fn settled_read(
    reader: &Reader,
    feed: &mut ChangeFeed,
    first: Changes,
    settle: Settle,
) -> Result<Texts, FileError> {
    let mut changes = first;
    let started = tokio::time::Instant::now();
    loop {
        if !changes.in_place && !changes.writing {
            // Only renames onto the names: each file is a complete one.
            return reader.read_texts();
        }
        // Quiet, and no writer left (or waited for long enough).
        loop {
            tokio::time::sleep(settle.quiet).await;
            let more = feed.take();
            let writer_gone = !more.writing || started.elapsed() >= settle.writer;
            if more.events == 0 && writer_gone {
                break;
            }
            if more.events > 0 {
                debug!("registry file still being written; waiting");
            }
        }
        let a = reader.read_texts();
        tokio::time::sleep(settle.quiet).await;
        let more = feed.take();
        let b = reader.read_texts();
        match (a, b) {
            (Ok(a), Ok(b)) if a == b && more.events == 0 => return Ok(a),
            (Err(e), Err(_)) if more.events == 0 => return Err(e),
            _ => {
                changes = Changes {
                    in_place: true,
                    ..more
                }
            }
        }
    }
}

/// Read the files now and start watching them; the first batch holds everything.
pub fn file_source(
    files: FileRegistry,
    topology_label: &str,
) -> Result<mpsc::Receiver<Batch>, AgentError> {
    file_source_with(files, topology_label, Settle::default())
}

/// [`file_source`] with the settling times given.
pub fn file_source_with(
    files: FileRegistry,
    topology_label: &str,
    settle: Settle,
) -> Result<mpsc::Receiver<Batch>, AgentError> {
    let mut watched = vec![files.nodes.clone()];
    watched.extend(files.peers.clone());
    let (watcher, mut feed) = FileWatcher::new(&watched)?;
    let mut reader = Reader {
        files,
        topology_label: topology_label.to_owned(),
        cache: NodeCache::default(),
        nodes: Vec::new(),
        peers: Vec::new(),
    };
    let texts = reader.read_texts()?;
    let first = reader.apply(&texts)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _watcher = watcher;
        if tx.send(first).await.is_err() {
            return;
        }
        // The outage being reported, so that it is logged once, not at every change.
        let mut outage: Option<String> = None;
        while let Some(changes) = feed.next().await {
            let batch = match settled_read(&reader, &mut feed, changes, settle)
                .await
                .and_then(|texts| reader.apply(&texts))
            {
                Err(e) => {
                    let e = e.to_string();
                    if outage.as_ref() != Some(&e) {
                        warn!(error = %e, "the registry files cannot be used; keeping the mesh \
                            as it is until they can");
                    }
                    outage = Some(e);
                    Batch {
                        events: Vec::new(),
                        synced: true,
                        connected: false,
                        diagnostics: None,
                        local: None,
                    }
                }
                Ok(b) => {
                    if outage.take().is_some() {
                        info!("the registry files are usable again");
                    }
                    debug!(events = b.events.len(), "registry files changed");
                    b
                }
            };
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
    use std::io::Write as _;

    fn node_list(n: usize) -> String {
        let items: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "- kind: Node\n  metadata:\n    name: node-{i:03}\n  spec:\n    podCIDR: 10.42.{i}.0/24\n"
                )
            })
            .collect();
        format!("apiVersion: v1\nkind: List\nitems:\n{}", items.concat())
    }

    fn settle() -> Settle {
        Settle {
            quiet: Duration::from_millis(30),
            writer: Duration::from_secs(5),
        }
    }

    fn source(dir: &std::path::Path) -> mpsc::Receiver<Batch> {
        let files = FileRegistry {
            nodes: dir.join("nodes.yaml"),
            peers: None,
        };
        file_source_with(files, DEFAULT_TOPOLOGY_LABEL, settle()).expect("source")
    }

    /// Nodes present after `batch`, given those before.
    fn after(mut nodes: usize, batch: &Batch) -> usize {
        for ev in &batch.events {
            match ev {
                crate::topology::incremental::Event::NodeUpsert(_) => nodes += 1,
                crate::topology::incremental::Event::NodeRemove(_) => nodes -= 1,
                _ => {}
            }
        }
        nodes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_rewritten_in_place_slowly_never_yields_fewer_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nodes.yaml");
        std::fs::write(&path, node_list(40)).expect("write");
        let mut rx = source(dir.path());
        let first = rx.recv().await.expect("first batch");
        assert_eq!(after(0, &first), 40);
        // The same 40 nodes and one more, written in place in 20 pieces 5 ms apart: every
        // prefix of the text is valid YAML with fewer nodes.
        let text = node_list(41);
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .expect("open");
            for piece in text.as_bytes().chunks(text.len().div_ceil(20)) {
                f.write_all(piece).expect("write");
                f.flush().expect("flush");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut nodes = 40;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while nodes != 41 {
            let b = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("the whole file is applied")
                .expect("source alive");
            assert!(b.connected, "a half-written file is not an outage either");
            let now = after(nodes, &b);
            assert!(now >= 40, "a batch left {now} of 40 nodes");
            nodes = now;
        }
        writer.join().expect("writer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_file_is_an_outage_and_a_good_one_after_it_reconnects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nodes.yaml");
        std::fs::write(&path, node_list(3)).expect("write");
        let mut rx = source(dir.path());
        assert_eq!(after(0, &rx.recv().await.expect("first")), 3);
        std::fs::write(&path, "").expect("truncate");
        let b = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a batch")
            .expect("alive");
        assert!(!b.connected, "an empty file is an outage");
        assert!(b.events.is_empty(), "and removes nothing");
        std::fs::write(&path, node_list(3)).expect("write");
        let b = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a batch")
            .expect("alive");
        assert!(b.connected);
        assert!(b.events.is_empty(), "the same nodes: nothing changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_without_a_valid_node_or_that_no_longer_parses_is_an_outage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nodes.yaml");
        std::fs::write(&path, node_list(2)).expect("write");
        let mut rx = source(dir.path());
        rx.recv().await.expect("first");
        for bad in [
            "apiVersion: v1\nkind: List\nitems: []\n",
            "apiVersion: v1\nkind: List\nitems:\n- kind: Node\n  metadata: {name: x, annotations: {kilo.squat.ai/key: bad}}\n",
            "items: [\n",
        ] {
            let tmp = dir.path().join(".tmp");
            std::fs::write(&tmp, bad).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
            let b = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a batch")
                .expect("alive");
            assert!(!b.connected, "{bad:?} is an outage");
            assert!(b.events.is_empty(), "{bad:?} removes nothing");
        }
    }

    #[test]
    fn empty_and_nodeless_files_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reader = Reader {
            files: FileRegistry {
                nodes: dir.path().join("nodes.yaml"),
                peers: None,
            },
            topology_label: DEFAULT_TOPOLOGY_LABEL.into(),
            cache: NodeCache::default(),
            nodes: Vec::new(),
            peers: Vec::new(),
        };
        let texts = |nodes: &str| Texts {
            nodes: nodes.into(),
            peers: None,
        };
        let e = reader.apply(&texts("\n  \n")).expect_err("empty");
        assert!(matches!(e, FileError::Empty { .. }), "{e}");
        let e = reader
            .apply(&texts("kind: List\nitems: []\n"))
            .expect_err("no nodes");
        assert!(matches!(e, FileError::NoNodes { left_out: 0, .. }), "{e}");
        assert!(reader.nodes.is_empty());
    }
}
