//! Names of everything a lab creates: the lab name itself, its directory, and its network
//! namespaces, all under one prefix so that `lab down` can find every one of them.
//!
//! Pure. Depends on `std` only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::LabError;

/// The lab name used when `--name` is not given.
pub const DEFAULT_NAME: &str = "wm";
/// The directory under which each lab keeps its state directory.
pub const DEFAULT_ROOT: &str = "/run/wiremesh-lab";
/// The prefix of every lab's namespaces: `wml-<lab>-…`.
pub const PREFIX: &str = "wml-";
/// Longest lab name: keeps namespace names short and readable.
pub const MAX_NAME_LEN: usize = 8;

/// A validated lab name: a lowercase letter, then up to seven lowercase letters or digits.
///
/// No `-` is allowed, so the prefix `wml-<name>-` of one lab never starts another lab's prefix
/// (`wml-a-` vs `wml-a-b-…` cannot happen).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabName(String);

impl FromStr for LabName {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| LabError::InvalidName {
            name: s.to_owned(),
            reason,
        };
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(bad("must have 1 to 8 characters"));
        }
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(bad("must start with a lowercase letter"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(bad("may hold only lowercase letters and digits"));
        }
        Ok(LabName(s.to_owned()))
    }
}

impl fmt::Display for LabName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl LabName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix of this lab's namespaces, `wml-<name>-`.
    pub fn prefix(&self) -> String {
        format!("{PREFIX}{}-", self.0)
    }

    /// The lab's state directory under `root`.
    pub fn dir(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }

    /// The underlay namespace (holds the bridge every public node and NAT router hangs off).
    pub fn underlay_ns(&self) -> String {
        format!("{}ul", self.prefix())
    }

    /// The namespace of the lab's Kubernetes API server (`--registry kube`): etcd and
    /// kube-apiserver, attached to the underlay.
    pub fn api_ns(&self) -> String {
        format!("{}api", self.prefix())
    }

    /// The API namespace of cluster `k` (1-based) of a multi-cluster lab: `wml-<lab>-api` for
    /// cluster 1 (as in a one-cluster lab), `wml-<lab>-api<k>` for the others.
    pub fn cluster_api_ns(&self, k: usize) -> String {
        if k <= 1 {
            self.api_ns()
        } else {
            format!("{}api{k}", self.prefix())
        }
    }

    /// The namespace of location LAN `k` (1-based): its bridge, and its NAT router if any.
    pub fn lan_ns(&self, k: usize) -> String {
        format!("{}l{k}", self.prefix())
    }

    /// The namespace of node `i` (1-based).
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix())
    }

    /// The namespace of pod `j` (1-based) of node `i`; also the pod's CNI container ID.
    pub fn pod_ns(&self, i: usize, j: usize) -> String {
        format!("{}n{i}p{j}", self.prefix())
    }

    /// Whether `netns` is one of this lab's namespaces.
    pub fn owns(&self, netns: &str) -> bool {
        netns.starts_with(&self.prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_alnum_starting_with_a_letter() {
        assert!("wm".parse::<LabName>().is_ok());
        assert!("t1x2".parse::<LabName>().is_ok());
        for bad in ["", "1a", "a-b", "Wm", "abcdefghi", "a.b"] {
            assert!(bad.parse::<LabName>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_namespace_carries_the_prefix_and_another_lab_never_matches() {
        let a: LabName = "a".parse().unwrap();
        let ab: LabName = "ab".parse().unwrap();
        for ns in [
            a.underlay_ns(),
            a.api_ns(),
            a.cluster_api_ns(2),
            a.lan_ns(3),
            a.node_ns(12),
            a.pod_ns(12, 2),
        ] {
            assert!(a.owns(&ns), "{ns}");
            assert!(!ab.owns(&ns), "{ns}");
        }
        assert_eq!(a.pod_ns(2, 1), "wml-a-n2p1");
        assert_eq!(a.cluster_api_ns(1), "wml-a-api");
        assert_eq!(a.cluster_api_ns(2), "wml-a-api2");
        assert!(!a.owns(&ab.node_ns(1)));
    }
}
