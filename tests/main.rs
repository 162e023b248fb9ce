//! One integration test binary (cheap linking): each module is one area.

mod util;

mod agent_foreign;
mod agent_identity;
mod agent_kilo;
mod boundary;
mod claims_props;
mod cluster_registry;
mod engine_props;
mod failover_props;
mod fuzz_parsers;
mod lab;
mod lab_chaos;
mod lab_kube;
mod manifests;
mod meshctl_cluster;
mod meshctl_flags;
mod multicluster;
mod netlink_netns;
mod nft_cni_netns;
mod node_credentials;
mod observability;
mod plan_golden;
mod relay_props;
mod scale_kube;
mod showconf_wg;
mod wg_netns;
