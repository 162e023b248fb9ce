//! The agent's writes to Kubernetes, off the reconcile path: a publisher task that keeps this
//! node's annotations up to date (on change, a last-seen heartbeat every check-in period, and at
//! once when someone else overwrote them), and a reporter task that turns new diagnostics and
//! such identity incidents into Events. Both retry with backoff while
//! the API server is unreachable and never block the agent loop: the loop only replaces the
//! latest value in a `watch` channel. On a graceful stop the link writes one last heartbeat, so a
//! restart (a rolling update) has a whole staleness period before other nodes drop this one.
//!
//! Depends on the Kubernetes registry's publish and report modules and tokio.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::diagnostic::Diagnostic;
use crate::registry::cluster::publish::{Publication, merge_patch, patch_node};
use crate::registry::cluster::report::Reporter;

use super::unix_now;

/// Delays between failed publications: 1 s doubling to 15 s, with jitter.
pub fn publish_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(15))
}

/// Handles to the publisher and reporter tasks; they stop when this is dropped.
pub struct ClusterLink {
    publication: watch::Sender<Option<Publication>>,
    diagnostics: watch::Sender<(Vec<Diagnostic>, Option<String>)>,
    reconnected: std::sync::Arc<Notify>,
    restore: std::sync::Arc<Notify>,
    incidents: mpsc::Sender<(String, Option<String>)>,
    /// For the farewell heartbeat: the client, the node, and whether a publication went through.
    client: Client,
    node: String,
    published: Arc<AtomicBool>,
}

impl ClusterLink {
    /// Start the tasks for the node `node`.
    pub fn spawn(client: Client, node: String, check_in: Duration) -> ClusterLink {
        let (ptx, prx) = watch::channel(None);
        let (dtx, drx) = watch::channel((Vec::new(), None));
        let reconnected = std::sync::Arc::new(Notify::new());
        let restore = std::sync::Arc::new(Notify::new());
        // A few incidents in flight at most: more while the API server is away are dropped
        // (each is logged and counted by the loop anyway).
        let (itx, irx) = mpsc::channel(8);
        let published = Arc::new(AtomicBool::new(false));
        tokio::spawn(publisher(
            client.clone(),
            node.clone(),
            check_in,
            prx,
            Signals {
                reconnected: reconnected.clone(),
                restore: restore.clone(),
                published: published.clone(),
            },
        ));
        tokio::spawn(reporter(Reporter::new(client.clone(), &node), drx, irx));
        ClusterLink {
            publication: ptx,
            diagnostics: dtx,
            reconnected,
            restore,
            incidents: itx,
            client,
            node,
            published,
        }
    }

    /// The agent stops with the mesh still programmed: write a last-seen heartbeat (only that
    /// annotation) so other nodes keep this one for a whole staleness period, time for a restart.
    /// Nothing is written when this run never published; gives up after `within`.
    pub async fn farewell(&self, within: Duration) {
        if !self.published.load(Ordering::Relaxed) {
            return;
        }
        let patch = merge_patch(&Default::default(), unix_now());
        match tokio::time::timeout(within, patch_node(&self.client, &self.node, &patch)).await {
            Ok(Ok(_)) => info!("last heartbeat (last-seen) published before stopping"),
            Ok(Err(e)) => warn!(error = %e, "cannot publish a last heartbeat before stopping"),
            Err(_) => warn!(
                secs = within.as_secs_f64(),
                "no last heartbeat before stopping: the API server did not answer in time"
            ),
        }
    }

    /// The API server answers again: a publisher waiting out a failure retries now, so the
    /// heartbeat is fresh as soon as possible after an outage.
    pub fn reconnected(&self) {
        self.reconnected.notify_one();
    }

    /// Publish `p` (now if it differs from what was last published).
    pub fn publish(&self, p: Publication) {
        self.publication.send_if_modified(|cur| {
            if cur.as_ref() == Some(&p) {
                false
            } else {
                *cur = Some(p);
                true
            }
        });
    }

    /// Someone else wrote this node's own annotations (`text` says what): write the current
    /// publication back now, whatever was published before, and report the incident as an
    /// Event on the Node (uid `node_uid`).
    pub fn restore(&self, text: String, node_uid: Option<String>) {
        self.restore.notify_one();
        if self.incidents.try_send((text, node_uid)).is_err() {
            debug!("an identity incident is not reported as an Event: too many in flight");
        }
    }

    /// Report the current diagnostics (all of them; only what is new becomes an Event).
    pub fn report(&self, diags: Vec<Diagnostic>, node_uid: Option<String>) {
        let _ = self.diagnostics.send((diags, node_uid));
    }
}

/// What wakes the publisher besides a new publication.
struct Signals {
    /// The API server answers again.
    reconnected: std::sync::Arc<Notify>,
    /// The Node's own annotations were overwritten: publish now.
    restore: std::sync::Arc<Notify>,
    /// Set once a publication went through.
    published: Arc<AtomicBool>,
}

async fn publisher(
    client: Client,
    node: String,
    check_in: Duration,
    mut rx: watch::Receiver<Option<Publication>>,
    signals: Signals,
) {
    let Signals {
        reconnected,
        restore,
        published: went_through,
    } = signals;
    let mut published: Option<Publication> = None;
    let mut next_heartbeat = Instant::now();
    let mut backoff = publish_backoff();
    let mut failing = false;
    loop {
        let want = rx.borrow_and_update().clone();
        if let Some(want) = want {
            let due = published.as_ref() != Some(&want) || Instant::now() >= next_heartbeat;
            if due {
                let patch = merge_patch(&want.annotations(), unix_now());
                match patch_node(&client, &node, &patch).await {
                    Ok(_) => {
                        if failing {
                            info!("publishing this node's annotations works again");
                        }
                        if published.as_ref() != Some(&want) {
                            info!(endpoint = ?want.endpoint.as_ref().map(ToString::to_string),
                                wireguard_ip = ?want.wireguard_ip.map(|n| n.to_string()),
                                "published this node's annotations");
                        } else {
                            debug!("heartbeat (last-seen) published");
                        }
                        failing = false;
                        backoff.reset();
                        went_through.store(true, Ordering::Relaxed);
                        published = Some(want);
                        next_heartbeat = Instant::now() + check_in;
                    }
                    Err(e) => {
                        if !failing {
                            warn!(error = %e, "cannot publish this node's annotations; retrying");
                        }
                        failing = true;
                        next_heartbeat = Instant::now() + backoff.next_delay();
                    }
                }
            }
        }
        let waiting = rx.borrow().is_some();
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(next_heartbeat), if waiting => {}
            _ = reconnected.notified() => if failing {
                next_heartbeat = Instant::now();
                backoff.reset();
            },
            // Written back at once (a Node event just came: the API server answers).
            _ = restore.notified() => published = None,
        }
    }
}

async fn reporter(
    mut reporter: Reporter,
    mut rx: watch::Receiver<(Vec<Diagnostic>, Option<String>)>,
    mut incidents: mpsc::Receiver<(String, Option<String>)>,
) {
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                let (diags, uid) = rx.borrow_and_update().clone();
                reporter.report(&diags, uid.as_deref()).await;
            }
            Some((text, uid)) = incidents.recv() => {
                reporter.identity_restored(&text, uid.as_deref()).await;
            }
        }
    }
}
