//! `meshctl` on a live cluster: the same [`Inputs`] as the files give, read from the API server,
//! and the Peer objects `meshctl peer add|list|delete` manage.
//!
//! Does network I/O through `kube` (async); everything it parses goes through the registry's
//! parsers, so a cluster and its `kubectl get -o yaml` export give the same mesh. Errors are
//! one line each and name the server: the binary prints them as they are.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};

use super::Inputs;
use crate::diagnostic::Diagnostic;
use crate::registry::cluster::{
    ClientOptions, ClusterError, client_config, has_peer_crd, list, peers_api,
};
use crate::registry::peer::{PeerResource, parse_peer};

/// What went wrong between `meshctl` and the cluster. Each message is one line.
///
/// Causes are rendered into the message rather than kept as `#[source]`: kube's errors repeat
/// their own text down their source chain, and the user needs one line, not five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterCliError {
    /// No kubeconfig or in-cluster configuration could be used.
    #[error(
        "no usable Kubernetes configuration (give --kubeconfig FILE, set KUBECONFIG, or read \
         files with --nodes FILE): {0}"
    )]
    Config(String),
    /// The server could not be reached, or the TLS connection failed.
    #[error("cannot reach the Kubernetes API server at {url}: {cause}")]
    Unreachable {
        /// The server's URL.
        url: String,
        /// What failed, one line.
        cause: String,
    },
    /// The server did not answer in time.
    #[error(
        "no answer from the Kubernetes API server at {url} within {secs} s (--request-timeout)"
    )]
    Timeout {
        /// The server's URL.
        url: String,
        /// The time waited, in seconds.
        secs: u64,
    },
    /// The server answered with an error status.
    #[error("the Kubernetes API server at {url} refused: {message} ({code} {reason})")]
    Refused {
        /// The server's URL.
        url: String,
        /// HTTP status code.
        code: u16,
        /// Kubernetes' reason (`Forbidden`, `Invalid`, …).
        reason: String,
        /// The server's message.
        message: String,
    },
    /// The Peer CRD is not installed.
    #[error(
        "the cluster at {url} has no Peer resource (peers.kilo.squat.ai): apply \
         manifests/crd-peer.yaml first"
    )]
    NoPeerCrd {
        /// The server's URL.
        url: String,
    },
    /// `peer add` of a name that exists.
    #[error("peer {0} already exists (409 AlreadyExists); `meshctl peer delete {0}` removes it")]
    PeerExists(String),
    /// `peer delete` of a name that does not exist.
    #[error("no peer named {0} in the cluster")]
    NoSuchPeer(String),
    /// `rotate-key` of a node that does not exist.
    #[error("no node named {0} in the cluster")]
    NoSuchNode(String),
    /// A Peer could not be turned into a request body.
    #[error("cannot encode peer {name}: {problem}")]
    Encode {
        /// The peer's name.
        name: String,
        /// What the encoder said.
        problem: String,
    },
}

/// `err` and its sources on one line, each text once (kube repeats itself down the chain).
fn one_line(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let t = e.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        next = e.source();
    }
    out.replace('\n', " ")
}

/// A connection to one API server, with the time `meshctl` waits for each operation (zero: no
/// limit).
pub struct Cluster {
    client: Client,
    url: String,
    timeout: Duration,
}

impl Cluster {
    /// Configure a client the way the agent does (`--kubeconfig`, `KUBECONFIG`,
    /// `~/.kube/config`, in-cluster). Sends nothing yet.
    pub async fn connect(
        opts: &ClientOptions,
        timeout: Duration,
    ) -> Result<Cluster, ClusterCliError> {
        let config = client_config(opts).await.map_err(|e| match e {
            ClusterError::Config(s) => ClusterCliError::Config(s.replace('\n', " ")),
            ClusterError::Api(e) => ClusterCliError::Config(one_line(&e)),
        })?;
        let url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let client = Client::try_from(config).map_err(|e| ClusterCliError::Unreachable {
            url: url.clone(),
            cause: one_line(&e),
        })?;
        Ok(Cluster {
            client,
            url,
            timeout,
        })
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn kube_error(&self, e: kube::Error) -> ClusterCliError {
        match e {
            kube::Error::Api(s) => ClusterCliError::Refused {
                url: self.url.clone(),
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.replace('\n', " "),
            },
            other => ClusterCliError::Unreachable {
                url: self.url.clone(),
                // Start below kube's own wrapper ("ServiceError: …"), which adds nothing.
                cause: match std::error::Error::source(&other) {
                    Some(inner) => one_line(inner),
                    None => one_line(&other),
                },
            },
        }
    }

    fn cluster_error(&self, e: ClusterError) -> ClusterCliError {
        match e {
            ClusterError::Config(s) => ClusterCliError::Config(s),
            ClusterError::Api(e) => self.kube_error(e),
        }
    }

    /// Run `op`, giving up after the timeout (none when it is zero).
    async fn timed<T>(
        &self,
        op: impl Future<Output = Result<T, ClusterCliError>>,
    ) -> Result<T, ClusterCliError> {
        if self.timeout.is_zero() {
            return op.await;
        }
        tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| ClusterCliError::Timeout {
                url: self.url.clone(),
                secs: self.timeout.as_secs(),
            })?
    }

    /// All Nodes and Peers, parsed as the agent parses them; objects left out and malformed
    /// values of kept Nodes come back as diagnostics, exactly as from files. A cluster without the Peer CRD has no peers.
    pub async fn inputs(&self, topology_label: &str) -> Result<Inputs, ClusterCliError> {
        let (nodes, peers) = self
            .timed(async {
                list(&self.client, topology_label)
                    .await
                    .map_err(|e| self.cluster_error(e))
            })
            .await?;
        let mut diagnostics = nodes.diagnostics;
        diagnostics.extend(peers.diagnostics);
        Ok(Inputs {
            nodes: nodes.items,
            peers: peers.items,
            diagnostics,
        })
    }

    /// Create `peer`. A name in use is [`ClusterCliError::PeerExists`]; nothing is replaced.
    pub async fn create_peer(&self, peer: &PeerResource) -> Result<(), ClusterCliError> {
        let name = peer.metadata.name.clone().unwrap_or_default();
        let obj: DynamicObject = serde_json::to_value(peer)
            .and_then(serde_json::from_value)
            .map_err(|e| ClusterCliError::Encode {
                name: name.clone(),
                problem: e.to_string(),
            })?;
        self.timed(async {
            match peers_api(self.client.clone())
                .create(&PostParams::default(), &obj)
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Err(ClusterCliError::PeerExists(name.clone()))
                }
                Err(kube::Error::Api(s)) if s.code == 404 => Err(ClusterCliError::NoPeerCrd {
                    url: self.url.clone(),
                }),
                Err(e) => Err(self.kube_error(e)),
            }
        })
        .await
    }

    /// The client, for watches of one's own (`meshctl connect`, `multicluster link`).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Every Peer object as stored, by name, and a diagnostic for each the agent would leave
    /// out (still listed when it decodes at all).
    pub async fn peers(&self) -> Result<(Vec<PeerResource>, Vec<Diagnostic>), ClusterCliError> {
        let objs = self
            .timed(async {
                match peers_api(self.client.clone())
                    .list(&ListParams::default())
                    .await
                {
                    Ok(list) => Ok(list.items),
                    Err(kube::Error::Api(s)) if s.code == 404 => Err(ClusterCliError::NoPeerCrd {
                        url: self.url.clone(),
                    }),
                    Err(e) => Err(self.kube_error(e)),
                }
            })
            .await?;
        let mut peers = Vec::with_capacity(objs.len());
        let mut diagnostics = Vec::new();
        for obj in objs {
            let name = obj.metadata.name.clone().unwrap_or_default();
            let decoded =
                serde_json::to_value(&obj).and_then(serde_json::from_value::<PeerResource>);
            match decoded {
                Ok(p) => {
                    if let Err(d) = parse_peer(&p) {
                        diagnostics.extend(d);
                    }
                    peers.push(p);
                }
                Err(e) => diagnostics.push(Diagnostic::peer(
                    &name,
                    Some("spec"),
                    format!("not a Peer: {e}"),
                )),
            }
        }
        peers.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok((peers, diagnostics))
    }

    /// The Peer `name` as stored, or `None` when there is none (or no Peer CRD: then creating
    /// it says so).
    pub async fn peer(&self, name: &str) -> Result<Option<PeerResource>, ClusterCliError> {
        let obj = self
            .timed(async {
                match peers_api(self.client.clone()).get_opt(name).await {
                    Ok(o) => Ok(o),
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                    Err(e) => Err(self.kube_error(e)),
                }
            })
            .await?;
        obj.map(|o| {
            serde_json::to_value(&o)
                .and_then(serde_json::from_value::<PeerResource>)
                .map_err(|e| ClusterCliError::Encode {
                    name: name.to_owned(),
                    problem: format!("not a Peer: {e}"),
                })
        })
        .transpose()
    }

    /// Replace the spec and set the annotations of the existing Peer `peer` (one merge patch:
    /// lists such as the allowed IPs are replaced whole, an endpoint left out is removed).
    pub async fn update_peer(&self, peer: &PeerResource) -> Result<(), ClusterCliError> {
        let name = peer.metadata.name.clone().unwrap_or_default();
        let mut spec = serde_json::to_value(&peer.spec).map_err(|e| ClusterCliError::Encode {
            name: name.clone(),
            problem: e.to_string(),
        })?;
        if let Some(map) = spec.as_object_mut() {
            // Fields the serializer leaves out when empty must go from the stored object too.
            for key in ["endpoint", "persistentKeepalive", "presharedKey"] {
                map.entry(key).or_insert(serde_json::Value::Null);
            }
        }
        let patch = serde_json::json!({
            "metadata": {"annotations": peer.metadata.annotations.clone().unwrap_or_default()},
            "spec": spec,
        });
        self.timed(async {
            match peers_api(self.client.clone())
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    Err(ClusterCliError::NoSuchPeer(name.clone()))
                }
                Err(e) => Err(self.kube_error(e)),
            }
        })
        .await
    }

    /// Delete the Peer `name`.
    pub async fn delete_peer(&self, name: &str) -> Result<(), ClusterCliError> {
        self.timed(async {
            match peers_api(self.client.clone())
                .delete(name, &DeleteParams::default())
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    // Either the object or the whole resource is missing; say which.
                    match has_peer_crd(&self.client).await {
                        Ok(false) => Err(ClusterCliError::NoPeerCrd {
                            url: self.url.clone(),
                        }),
                        Ok(true) => Err(ClusterCliError::NoSuchPeer(name.to_owned())),
                        Err(e) => Err(self.cluster_error(e)),
                    }
                }
                Err(e) => Err(self.kube_error(e)),
            }
        })
        .await
    }

    /// Ask node `name`'s agent to rotate its key: `token` into its `wiremesh.io/rotate-key`
    /// (one merge patch of that key alone).
    pub async fn request_rotation(&self, name: &str, token: &str) -> Result<(), ClusterCliError> {
        let patch = serde_json::json!({
            "metadata": {"annotations": {crate::agent::rotate::REQUEST: token}}
        });
        self.timed(async {
            match kube::Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone())
                .patch(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    Err(ClusterCliError::NoSuchNode(name.to_owned()))
                }
                Err(e) => Err(self.kube_error(e)),
            }
        })
        .await
    }

    /// Node `name` as stored.
    pub async fn node(
        &self,
        name: &str,
    ) -> Result<k8s_openapi::api::core::v1::Node, ClusterCliError> {
        self.timed(async {
            match kube::Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone())
                .get(name)
                .await
            {
                Ok(n) => Ok(n),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    Err(ClusterCliError::NoSuchNode(name.to_owned()))
                }
                Err(e) => Err(self.kube_error(e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner\nsecond line")]
    struct Inner;

    #[test]
    fn one_line_keeps_each_text_once_and_no_newline() {
        assert_eq!(one_line(&Outer(Inner)), "outer: inner second line");
    }

    #[tokio::test]
    async fn missing_kubeconfig_file_is_a_config_error_naming_it() {
        let opts = ClientOptions {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            context: None,
        };
        match Cluster::connect(&opts, Duration::from_secs(1)).await {
            Err(e @ ClusterCliError::Config(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("/nonexistent/kubeconfig"), "{msg}");
                assert!(!msg.contains('\n'), "{msg}");
            }
            Err(e) => panic!("expected a configuration error, got {e}"),
            Ok(_) => panic!("expected a configuration error"),
        }
    }
}
