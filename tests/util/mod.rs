//! Shared test helpers: generators for nodes and peers.

pub mod strategy;
