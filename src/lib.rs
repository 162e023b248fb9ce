//! wiremesh: a WireGuard mesh network agent for Kubernetes, compatible with Kilo.
//!
//! Data flows one way:
//!
//! ```text
//! registry (file or Kubernetes)  → model::MeshNode, MeshPeer (+ diagnostics)
//!   → topology (pure, deterministic) → Topology → desired::DesiredState of one node
//!     topology::incremental::Engine applies one registry event at a time
//!   → reconcile::plan (pure)         → ops against what the kernel holds that is ours
//!   → reconcile::system::SystemKernel → netlink, WireGuard, nftables, CNI config
//! ```
//!
//! `agent` runs that loop; `meshctl` (`cli`, `graph`, `showconf`, `doctor`, `lab`) reads the
//! same topology. Start with [`topology::compute`] and [`agent::run_with`].

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod cni;
pub mod desired;
pub mod diagnostic;
pub mod doctor;
pub mod graph;
pub mod lab;
pub mod model;
pub mod multicluster;
pub mod reconcile;
pub mod registry;
pub mod showconf;
pub mod state_file;
pub mod status;
pub mod topology;
pub mod yaml;
