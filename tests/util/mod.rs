//! Helpers shared by the integration tests: proptest strategies, and network namespaces with
//! userspace WireGuard for the root-only tests.

#[allow(dead_code)]
pub mod agent_netns;
#[allow(dead_code)]
pub mod apiserver;
#[allow(dead_code)]
pub mod lab;
/// The agent over an in-memory kernel.
pub mod mem_kernel;
#[allow(dead_code)]
pub mod netns;
#[allow(dead_code)]
pub mod scale;
pub mod strategy;
#[allow(dead_code)]
pub mod wg_dev;
#[allow(dead_code)]
pub mod wg_netns;
