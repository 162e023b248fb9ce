//! Asking the lab's agents over their HTTP endpoint (`/status`, `/metrics`, `/readyz`, …).
//!
//! Every agent listens on [`super::agent::AGENT_LISTEN`], the loopback of its own node
//! namespace: each request runs on a thread that enters that namespace first
//! ([`super::cluster::in_netns`]), so the connection is made there and nothing is exposed on the
//! host. Depends on the state, `cluster` (the namespace switch) and the agent client of
//! `meshctl status`.

use std::net::SocketAddr;
use std::time::Duration;

use super::LabError;
use super::agent::AGENT_LISTEN;
use super::cluster::in_netns;
use super::state::LabState;
use crate::cli::status::{AgentUrl, Reply, get, parse_status};
use crate::status::AgentStatus;

/// How long one request to an agent may take.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The agents' endpoint, as seen from inside a node namespace.
pub fn agent_url() -> AgentUrl {
    let addr: SocketAddr = AGENT_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1107)));
    AgentUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// `GET path` from the agent of lab node `node`, whatever the status code.
pub fn agent_get(state: &LabState, node: &str, path: &str) -> Result<Reply, LabError> {
    let (_, n) = state
        .node(node)
        .ok_or_else(|| LabError::Options(format!("lab {} has no node {node}", state.name)))?;
    let url = agent_url();
    in_netns(&n.netns, || async {
        get(&url, path, AGENT_TIMEOUT)
            .await
            .map_err(|source| LabError::Agent {
                node: node.to_owned(),
                source,
            })
    })
}

/// The `/status` of the agent of lab node `node`.
pub fn agent_status(state: &LabState, node: &str) -> Result<AgentStatus, LabError> {
    let reply = agent_get(state, node, "/status")?;
    parse_status(&agent_url(), &reply).map_err(|source| LabError::Agent {
        node: node.to_owned(),
        source,
    })
}

/// The `/status` of every node's agent, in node order: each a document or why not.
pub fn all_statuses(state: &LabState) -> Vec<(String, Result<AgentStatus, LabError>)> {
    state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), agent_status(state, &n.name)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_url_is_their_listen_address() {
        assert_eq!(agent_url().base(), format!("http://{AGENT_LISTEN}"));
    }
}
