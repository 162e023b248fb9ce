//! Per-object diagnostics: what was wrong with which node or peer, and whether it was left out.
//!
//! Pure data, shared by the registry (parse problems) and the topology engine (readiness and
//! conflicts). Depends only on `serde`.

use std::fmt;

use serde::Serialize;

/// What kind of object a diagnostic is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    /// A Kubernetes Node.
    Node,
    /// An external Peer resource.
    Peer,
    /// An input document (a file, or an item in it that is not a valid object).
    Input,
}

/// One precise problem: which object, which key, what was wrong, and what the engine did.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Diagnostic {
    /// Kind of the object.
    pub subject: Subject,
    /// Name of the node or peer (or the input's description).
    pub name: String,
    /// The annotation key or field that was wrong, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What was wrong, in words.
    pub problem: String,
    /// Whether the object was left out of the mesh because of it.
    pub skipped: bool,
    /// The node this one conflicts with (same key, overlapping pod CIDR), when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other: Option<String>,
}

impl Diagnostic {
    /// A problem with a node's annotation or field that makes the node be left out (see
    /// [`Diagnostic::kept`] for one that does not).
    pub fn node(name: &str, key: Option<&str>, problem: impl Into<String>) -> Self {
        Diagnostic {
            subject: Subject::Node,
            name: name.to_owned(),
            key: key.map(str::to_owned),
            problem: problem.into(),
            skipped: true,
            other: None,
        }
    }

    /// A problem with an external peer's field that makes the peer be left out.
    pub fn peer(name: &str, key: Option<&str>, problem: impl Into<String>) -> Self {
        Diagnostic {
            subject: Subject::Peer,
            name: name.to_owned(),
            key: key.map(str::to_owned),
            problem: problem.into(),
            skipped: true,
            other: None,
        }
    }

    /// Name the node this one conflicts with.
    pub fn with_other(mut self, other: &str) -> Self {
        self.other = Some(other.to_owned());
        self
    }

    /// Mark the diagnostic as a warning: the object still takes part (a malformed optional value
    /// replaced by Kilo's, an allowed IP ignored).
    pub fn kept(mut self) -> Self {
        self.skipped = false;
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = match self.subject {
            Subject::Node => "node",
            Subject::Peer => "peer",
            Subject::Input => "input",
        };
        write!(f, "{subject} {}", self.name)?;
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.problem)?;
        if self.skipped {
            write!(f, " (left out of the mesh)")?;
        }
        Ok(())
    }
}
