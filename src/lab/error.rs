//! The one error type of the lab harness, and the exit code each error maps to.
//!
//! Depends on `thiserror`, the file registry's error, `kube`'s error, the agent client's error
//! and `std` only.

use std::path::PathBuf;

use crate::registry::file::FileError;

/// Why a lab command failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The process is not root; nothing was touched.
    #[error("meshctl lab needs root (network namespaces, WireGuard): run it with sudo")]
    NotRoot,
    /// Programs the lab runs are not installed.
    #[error("meshctl lab needs tools that are missing: {}", missing.join(", "))]
    MissingTools {
        /// One entry per missing tool: what it is and the package that provides it.
        missing: Vec<String>,
    },
    /// The kube-apiserver binary `--registry kube` needs is not there.
    #[error(
        "kube-apiserver not found at {}: build and cache it once with tests/apiserver/setup.sh \
         (about 5 minutes), or pass --apiserver-bin PATH",
        path.display()
    )]
    ApiServerBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The lab name is unusable.
    #[error("lab name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The options do not describe a lab that can be built.
    #[error("{0}")]
    Options(String),
    /// The `--from` nodes file could not be read.
    #[error("reading nodes from {path}: {source}")]
    From {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: FileError,
    },
    /// A lab of this name already exists.
    #[error("lab {name} already exists ({dir}); remove it first: meshctl lab down --name {name}")]
    Exists {
        /// The lab name.
        name: String,
        /// Its directory (or the leftover namespace that shows it exists).
        dir: String,
    },
    /// No lab of this name exists.
    #[error("no lab named {name} ({} not found); start one with: meshctl lab up --name {name}", dir.display())]
    NotFound {
        /// The lab name.
        name: String,
        /// The state file looked for.
        dir: PathBuf,
    },
    /// A program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the reader.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (the state file, a CNI result) is malformed.
    #[error("{what}: not the expected JSON: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A YAML document (the nodes file, a manifest) could not be rendered or read.
    #[error("YAML: {0}")]
    Yaml(#[from] crate::yaml::YamlError),
    /// A node's agent exited while the lab was coming up.
    #[error("the agent of node {node} exited ({status}); last lines of {}:\n{tail}", log.display())]
    AgentExited {
        /// The node.
        node: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        secs: u64,
    },
    /// A CNI plugin refused or returned something unusable.
    #[error("CNI {command} of pod {pod}, plugin {plugin}: {message}")]
    Cni {
        /// ADD or DEL.
        command: &'static str,
        /// The pod (namespace name).
        pod: String,
        /// The plugin type.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The WireGuard control socket answered with an error or garbage.
    #[error("WireGuard UAPI {}: {message}", socket.display())]
    Uapi {
        /// The socket path.
        socket: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A request to the lab's Kubernetes API server failed.
    #[error("Kubernetes API, {what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// A node's agent could not be asked over its HTTP endpoint.
    #[error("node {node}: {source}")]
    Agent {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: crate::cli::status::ClientError,
    },
    /// A packet capture file could not be decoded.
    #[error("packet capture: {0}")]
    Pcap(String),
    /// `lab up` failed part way; what was built is left for inspection.
    #[error(
        "lab up failed: {source}\nthe half-built lab is left for inspection in {}; remove it with: meshctl lab down --name {name}",
        dir.display()
    )]
    UpFailed {
        /// The lab name.
        name: String,
        /// The lab directory.
        dir: PathBuf,
        /// The step that failed.
        #[source]
        source: Box<LabError>,
    },
    /// `lab check` found unreachable pods or plaintext pod packets on the underlay.
    #[error("lab check failed: {0}")]
    CheckFailed(String),
    /// `lab chaos` lost packets across the fault, or the mesh did not converge after it.
    #[error("lab chaos failed: {0}")]
    ChaosFailed(String),
    /// `lab down` could not remove everything.
    #[error("lab down left these behind: {}", .0.join(", "))]
    Leftovers(Vec<String>),
}

impl LabError {
    /// The process exit code for this error: 2 when the machine is not fit to run a lab (not
    /// root, tools missing), else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            LabError::NotRoot
            | LabError::MissingTools { .. }
            | LabError::ApiServerBinary { .. } => 2,
            _ => 1,
        }
    }

    /// A [`LabError::Kube`] maker for `map_err`.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Kube {
            what,
            source: Box::new(source),
        }
    }

    /// An [`LabError::Io`] maker for `map_err`.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> LabError {
        let path = path.into();
        move |source| LabError::Io { op, path, source }
    }
}
