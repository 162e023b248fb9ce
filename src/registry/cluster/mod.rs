//! The Kubernetes registry: Nodes and Kilo-compatible `Peer` objects read from a real API server
//! with `kube`, this node's annotations published back, and problems reported as Events.
//!
//! - [`connect`]: a client from a kubeconfig (file, `KUBECONFIG`, context) or in-cluster.
//! - [`list`]: one consistent read of Nodes and Peers (for `meshctl`).
//! - [`watch`]: a task that watches both and sends coalesced [`Batch`]es of engine events.
//! - [`publish`]: this node's annotations as one merge patch of only those keys.
//! - [`report`]: Kubernetes Events for objects left out or kept with a malformed value, once per
//!   change.
//!
//! May depend on `kube`, `k8s-openapi`, tokio, the model, diagnostics, the other registry modules
//! and the engine's event type; never on netlink or the reconciler.

pub mod publish;
pub mod report;
pub mod store;
mod watch;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config};

use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, MeshPeer};
use crate::registry::annotations::parse_node;
use crate::registry::file::Loaded;
use crate::registry::peer::{PEER_GROUP, PEER_VERSION, PeerResource, parse_peer};

pub use watch::{Batch, WatchOptions, watch};

/// What went wrong talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("no Kubernetes configuration: {0}")]
    Config(String),
    /// A request failed.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// Where the client's configuration comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// A kubeconfig file; without one: `KUBECONFIG`, `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// A context of the kubeconfig instead of its current one.
    pub context: Option<String>,
}

/// A client configured from `opts`.
pub async fn connect(opts: &ClientOptions) -> Result<Client, ClusterError> {
    Client::try_from(client_config(opts).await?).map_err(ClusterError::Api)
}

/// The configuration [`connect`] builds its client from: for callers that need the server's
/// address (to name it in errors) or their own timeouts.
pub async fn client_config(opts: &ClientOptions) -> Result<Config, ClusterError> {
    let kopts = KubeConfigOptions {
        context: opts.context.clone(),
        ..Default::default()
    };
    let bad = |e: &dyn std::fmt::Display| ClusterError::Config(e.to_string());
    let config = match (&opts.kubeconfig, &opts.context) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| bad(&format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &kopts)
                .await
                .map_err(|e| bad(&format!("{}: {e}", path.display())))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&kopts).await.map_err(|e| bad(&e))?,
        (None, None) => Config::infer().await.map_err(|e| bad(&e))?,
    };
    Ok(config)
}

/// The `peers.kilo.squat.ai` resource.
pub fn peer_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(PEER_GROUP, PEER_VERSION, "Peer"),
        "peers",
    )
}

/// The Peers API (cluster-scoped).
pub fn peers_api(client: Client) -> Api<DynamicObject> {
    Api::all_with(client, &peer_resource())
}

/// Parse a Peer object, whatever its shape, into a mesh peer (or its diagnostics).
pub fn peer_entry(obj: &DynamicObject) -> Result<MeshPeer, Vec<Diagnostic>> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let value = serde_json::to_value(obj).map_err(|e| {
        vec![Diagnostic::peer(
            &name,
            None,
            format!("cannot read the object: {e}"),
        )]
    })?;
    let res: PeerResource = serde_json::from_value(value).map_err(|e| {
        vec![Diagnostic::peer(
            &name,
            Some("spec"),
            format!("not a Peer: {e}"),
        )]
    })?;
    parse_peer(&res)
}

/// Whether the API server has the Peer resource (the CRD is installed).
pub async fn has_peer_crd(client: &Client) -> Result<bool, ClusterError> {
    match peers_api(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// All Nodes and Peers, parsed: one list of each. Objects that do not parse are left out with
/// their diagnostics, and the malformed optional values of kept Nodes come back as warnings; a
/// cluster without the Peer CRD has no peers.
pub async fn list(
    client: &Client,
    topology_label: &str,
) -> Result<(Loaded<MeshNode>, Loaded<MeshPeer>), ClusterError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut n = Loaded::default();
    for node in &nodes.items {
        n.push(parse_node(node, topology_label));
    }
    let mut p = Loaded {
        items: Vec::new(),
        diagnostics: Vec::new(),
    };
    if has_peer_crd(client).await? {
        for obj in peers_api(client.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            match peer_entry(&obj) {
                Ok(m) => p.items.push(m),
                Err(d) => p.diagnostics.extend(d),
            }
        }
    }
    Ok((n, p))
}
