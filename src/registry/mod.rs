//! Registries: where nodes and peers come from (a file now, Kubernetes later), translated into
//! validated model values with a diagnostic for every object left out.
//!
//! May depend on the model, diagnostics, serde and `k8s-openapi`; never on the engine's
//! internals, netlink or the reconciler.

pub mod annotations;
pub mod file;
pub mod peer;
