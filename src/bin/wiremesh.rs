//! `wiremesh`: the node agent (one per node, DaemonSet, host network).
//!
//! This binary parses its options and documents them; the reconciler that programs the kernel
//! and the registries it watches are added by the dataplane and Kubernetes work.

/// mimalloc: faster than glibc malloc for the engine's many small allocations (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnetwork::IpNetwork;

use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::topology::{DEFAULT_INTERFACE, DEFAULT_PORT, DEFAULT_SUBNET};

/// The wiremesh node agent: keeps this node's WireGuard mesh, routes and CNI in line with the
/// cluster.
#[derive(Parser)]
#[command(name = "wiremesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent on this node.
    Agent(AgentArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// Name of this node (defaults to the host name).
    #[arg(long, env = "WIREMESH_HOSTNAME")]
    hostname: Option<String>,
    /// Read nodes from this file instead of Kubernetes (watched for changes).
    #[arg(long, value_name = "FILE")]
    nodes: Option<PathBuf>,
    /// Read external peers from this file instead of Kubernetes.
    #[arg(long, value_name = "FILE")]
    peers: Option<PathBuf>,
    /// Mesh granularity: location or full.
    #[arg(long, env = "WIREMESH_GRANULARITY", default_value = "location")]
    granularity: String,
    /// Subnet for WireGuard mesh IPs.
    #[arg(long, env = "WIREMESH_SUBNET", default_value = DEFAULT_SUBNET)]
    subnet: IpNetwork,
    /// WireGuard listen port.
    #[arg(long, env = "WIREMESH_PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// WireGuard interface name.
    #[arg(long, env = "WIREMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    interface: String,
    /// Node label that gives the location when no location annotation is set.
    #[arg(long, env = "WIREMESH_TOPOLOGY_LABEL", default_value = DEFAULT_TOPOLOGY_LABEL)]
    topology_label: String,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(a) => {
            let _ = (
                &a.hostname,
                &a.nodes,
                &a.peers,
                &a.granularity,
                a.subnet,
                a.port,
                &a.interface,
                &a.topology_label,
            );
            eprintln!(
                "wiremesh agent: the kernel reconciler is not part of this build yet; \
                 use `meshctl plan` to see what this node would program"
            );
            std::process::exit(2);
        }
    }
}
