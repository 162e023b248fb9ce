//! Key rotation on request: an operator (or `meshctl rotate-key NODE`) writes a new token into
//! the Node's `wiremesh.io/rotate-key`; the node's agent generates a new private key, writes it
//! over its key file, gives it to the WireGuard interface, publishes the new public key and the
//! token it handled (`wiremesh.io/key-rotated`). The old key is gone from the file, the device
//! and the registry, so nobody accepts it afterwards.
//!
//! A request is pending while its token differs from the one the Node says was handled and from
//! the one this agent handled last (its publication may still be on its way). Pure: reads a
//! Node's annotations. Depends on `k8s-openapi`'s Node type.

use k8s_openapi::api::core::v1::Node;

/// The annotation that asks for a rotation (any new value; `meshctl rotate-key` writes the time).
pub const REQUEST: &str = "wiremesh.io/rotate-key";

/// The annotation the agent publishes: the request it handled last.
pub const DONE: &str = "wiremesh.io/key-rotated";

/// The longest token taken; a longer value is ignored (and logged by the caller).
pub const MAX_TOKEN: usize = 128;

/// What a Node's annotations say about rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Nothing to do.
    None,
    /// Rotate and publish this token as handled.
    Rotate(String),
    /// The request is unusable (too long); the value's length.
    Invalid(usize),
}

/// The rotation `node` asks for that neither the Node nor `handled` (this agent's last) says
/// is done.
pub fn pending(node: &Node, handled: Option<&str>) -> Request {
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| {
        ann.and_then(|a| a.get(k))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let Some(token) = get(REQUEST) else {
        return Request::None;
    };
    if token.len() > MAX_TOKEN {
        return Request::Invalid(token.len());
    }
    if get(DONE) == Some(token) || handled == Some(token) {
        return Request::None;
    }
    Request::Rotate(token.to_owned())
}

/// The token the Node says was handled last, if any.
pub fn done(node: &Node) -> Option<String> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DONE))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The public key node `node` publishes: Kilo's annotation when set (the registry reads it
/// first when the two differ), else wiremesh's.
pub fn published_key(node: &Node) -> Option<String> {
    let a = node.metadata.annotations.as_ref()?;
    ["kilo.squat.ai/key", "wiremesh.io/key"]
        .iter()
        .filter_map(|k| a.get(*k))
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_key_is_kilos_annotation_first_then_ours() {
        let mut n = Node::default();
        assert_eq!(published_key(&n), None);
        n.metadata.annotations = Some(
            [("wiremesh.io/key".to_owned(), "ours".to_owned())]
                .into_iter()
                .collect(),
        );
        assert_eq!(published_key(&n).as_deref(), Some("ours"));
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("kilo.squat.ai/key".into(), " kilo ".into());
        assert_eq!(published_key(&n).as_deref(), Some("kilo"));
    }

    fn node(ann: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        n
    }

    #[test]
    fn the_done_key_is_the_one_the_agent_publishes() {
        use crate::registry::annotations::{WIREMESH_PREFIX, keys};
        assert_eq!(DONE, format!("{WIREMESH_PREFIX}{}", keys::KEY_ROTATED));
    }

    #[test]
    fn a_new_token_is_pending_until_the_node_or_this_agent_handled_it() {
        assert_eq!(pending(&node(&[]), None), Request::None);
        let asked = node(&[(REQUEST, "1700000000")]);
        assert_eq!(pending(&asked, None), Request::Rotate("1700000000".into()));
        assert_eq!(
            pending(&asked, Some("1700000000")),
            Request::None,
            "in flight"
        );
        let done_node = node(&[(REQUEST, "1700000000"), (DONE, "1700000000")]);
        assert_eq!(pending(&done_node, None), Request::None);
        assert_eq!(done(&done_node).as_deref(), Some("1700000000"));
        let again = node(&[(REQUEST, "1700000099"), (DONE, "1700000000")]);
        assert_eq!(
            pending(&again, Some("1700000000")),
            Request::Rotate("1700000099".into())
        );
        assert_eq!(pending(&node(&[(REQUEST, "  ")]), None), Request::None);
        let long = "x".repeat(MAX_TOKEN + 1);
        assert_eq!(
            pending(&node(&[(REQUEST, &long)]), None),
            Request::Invalid(MAX_TOKEN + 1)
        );
    }
}
