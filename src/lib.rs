//! wiremesh: a WireGuard mesh network agent for Kubernetes, compatible with Kilo.
//!
//! Data flows one way:
//!
//! ```text
//! registry (file / Kubernetes)   → model::MeshNode, MeshPeer   (+ diagnostics)
//!   → topology::build / compute  → topology::Topology           (pure, deterministic)
//!   → desired::DesiredState      (one node's interface, peers, routes, rules, bridge, NAT)
//!   → reconciler                 → kernel (netlink, WireGuard)
//! ```
//!
//! The graph exporter and `meshctl` read the same topology. Start with [`topology::compute`].

pub mod agent;
pub mod cli;
pub mod cni;
pub mod desired;
pub mod diagnostic;
pub mod doctor;
pub mod graph;
pub mod lab;
pub mod model;
pub mod reconcile;
pub mod registry;
pub mod showconf;
pub mod topology;
