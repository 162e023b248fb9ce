//! `meshctl`: look at a wiremesh (or Kilo) mesh: what a node would program, the topology as a
//! picture, and WireGuard configs for outside machines; add, list and delete external peers.
//! Reads a live cluster, or the same objects from files (`--nodes`, `--peers`); `status` and
//! `graph --live` also ask running agents (their `/status`). The global flags ([`GLOBAL_FLAGS`])
//! may stand before or after the subcommand; `completion` prints a shell completion script.

/// mimalloc: faster than glibc malloc for the engine's many small allocations (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

use wiremesh::cli::args::with_leading;
use wiremesh::cli::cluster::Cluster;
use wiremesh::cli::link;
use wiremesh::cli::peer::{NewPeer, render_table, render_yaml};
use wiremesh::cli::plan::{DeviceNames, render_json, render_text};
use wiremesh::cli::{Inputs, auto_granularity, load};
use wiremesh::graph::{GraphOptions, View, render_dot, render_svg};
use wiremesh::lab::LabError;
use wiremesh::model::{Granularity, NodeName, WgKey};
use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::registry::cluster::ClientOptions;
use wiremesh::topology::{self, DEFAULT_INTERFACE, Encapsulate, LocalError, MeshOptions};

/// Inspect a WireGuard mesh computed the way the wiremesh agent computes it.
///
/// `plan`, `graph` and `showconf` read the Nodes and Peers of a live cluster (`--kubeconfig`,
/// else `KUBECONFIG`, `~/.kube/config`, then the in-cluster ServiceAccount), or the same objects
/// from files with `--nodes FILE [--peers FILE]`. `peer` adds, lists and deletes external peers
/// in the cluster.
///
/// The global options may come before or after the subcommand (`meshctl --nodes FILE plan
/// --node a` = `meshctl plan --node a --nodes FILE`); each subcommand's `--help` lists the ones
/// it takes. Shell completion: `source <(meshctl completion bash)` (or zsh, fish).
#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The flags that mean the same in every subcommand that takes them (long names). They may also
/// come before the subcommand: [`parse_from`] moves them after it, where the subcommand's own
/// definition applies (`lab up --nodes` is a count, `showconf -o` takes other formats than
/// `plan -o`), and a subcommand that does not take one refuses it.
const GLOBAL_FLAGS: &[&str] = &[
    "nodes",
    "peers",
    "kubeconfig",
    "context",
    "request-timeout",
    "granularity",
    "subnet",
    "port",
    "topology-label",
    "encapsulate",
    "interface",
    "service-cidr",
    "allowed-location-ips-within",
    "output",
];

/// The command line: the derived definition, plus the global flags at the top level for
/// `--help` and the completion scripts.
fn command() -> clap::Command {
    with_leading(Cli::command(), GLOBAL_FLAGS, "Global options").mut_arg("output", |a| {
        a.help("Output format; the subcommand's --help lists its formats")
            .value_name("FORMAT")
            .value_parser(["text", "json", "wireguard", "yaml"])
    })
}

/// Parse `args` (program name first), with the global flags before or after the subcommand.
fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    wiremesh::cli::args::parse(command(), GLOBAL_FLAGS, args)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what the agent on one node would program: interface, peers, routes, rules.
    Plan(PlanArgs),
    /// Show a running agent's tunnels: peers, endpoints, handshake ages, traffic.
    ///
    /// Reads the agent's `/status` (`wiremesh agent --listen`). STATE is fresh (handshake
    /// < 2 min), aging (up to 5 min), new (none yet, nothing sent) or stale (older than 5 min,
    /// or none although packets were sent: the other side never answered).
    Status(StatusArgs),
    /// Draw the mesh: locations, leaders, WireGuard tunnels (SVG or DOT).
    Graph(GraphArgs),
    /// Print the WireGuard (wg-quick) configuration for a node or an external peer.
    Showconf(ShowconfArgs),
    /// Add, list and delete external peers (Kilo `Peer` resources) in the cluster.
    Peer(PeerArgs),
    /// Join the mesh from this machine, outside the cluster, until stopped (like `kgctl
    /// connect`; needs root).
    ///
    /// Creates (or adopts) the Peer NAME with this machine's key, brings up a WireGuard
    /// interface with routes to the cluster's pod CIDRs, mesh and internal IPs (and the service
    /// CIDRs on request), and keeps it in step with the cluster's Nodes and Peers. On SIGINT or
    /// SIGTERM it removes the interface, its routes and the Peer it made (unless `--keep`).
    Connect(ConnectArgs),
    /// Make a node's agent replace its WireGuard key (`wiremesh.io/rotate-key`) and wait until
    /// it has published the new public key; the old key is unusable afterwards.
    RotateKey(RotateKeyArgs),
    /// Link two clusters: each holds one Peer per segment of the other, kept in sync.
    ///
    /// `link` checks that the clusters' pod CIDRs, mesh subnets and service CIDRs are disjoint,
    /// writes the Peers, and keeps them in sync (Nodes joining, leaving, moving, rotating keys)
    /// until stopped; `unlink` removes exactly the Peers the link wrote. See docs/multicluster.md.
    Multicluster(MulticlusterArgs),
    /// Check what this machine offers wiremesh: WireGuard, IPIP, firewall, CNI plugins.
    Doctor(DoctorArgs),
    /// Run a throw-away mesh on this machine in network namespaces (needs root).
    Lab(LabArgs),
    /// Print a shell completion script to stdout (`source <(meshctl completion bash)`).
    Completion {
        /// The shell: bash, zsh or fish (also elvish, powershell).
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// How to reach the cluster's API server.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
struct ClusterArgs {
    /// Kubeconfig file. Without it: `KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// ServiceAccount.
    #[arg(long, global = true, help_heading = "Cluster", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long, global = true, help_heading = "Cluster", value_name = "NAME")]
    context: Option<String>,
    /// Seconds to wait for the API server before giving up (0: no limit).
    #[arg(
        long,
        global = true,
        help_heading = "Cluster",
        value_name = "SECS",
        default_value_t = 30
    )]
    request_timeout: u64,
}

impl ClusterArgs {
    /// Connect, run `op` on the cluster, and wait for it (one small runtime per command).
    fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(Cluster) -> Fut,
        Fut: std::future::Future<Output = Result<T, wiremesh::cli::cluster::ClusterCliError>>,
    {
        let opts = ClientOptions {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        };
        let timeout = std::time::Duration::from_secs(self.request_timeout);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(rt.block_on(async {
            let cluster = Cluster::connect(&opts, timeout).await?;
            op(cluster).await
        })?)
    }
}

/// Where the cluster comes from and how it is meshed.
#[derive(Args, Clone, Debug)]
struct MeshArgs {
    /// Read Nodes from this file (as `kubectl get nodes -o json|yaml` prints them) instead of
    /// the cluster.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kubeconfig", "context"])]
    nodes: Option<PathBuf>,
    /// Read external peers (Kilo `Peer` resources, JSON or YAML) from this file; with `--nodes`.
    #[arg(long, value_name = "FILE", requires = "nodes")]
    peers: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Mesh granularity; `auto` reads the granularity the agents publish (default location).
    #[arg(long, value_enum, default_value_t = GranularityArg::Auto)]
    granularity: GranularityArg,
    /// Subnet for the WireGuard mesh IPs.
    #[arg(long, default_value = topology::DEFAULT_SUBNET)]
    subnet: IpNetwork,
    /// WireGuard listen port for a node that has no endpoint yet.
    #[arg(long, default_value_t = topology::DEFAULT_PORT)]
    port: u16,
    /// Node label that gives the location when no location annotation is set.
    #[arg(long, default_value = DEFAULT_TOPOLOGY_LABEL)]
    topology_label: String,
    /// IPIP encapsulation between nodes of one location (Kilo's default is always).
    #[arg(long, value_enum, default_value_t = EncapArg::Always)]
    encapsulate: EncapArg,
    /// Name of the WireGuard interface.
    #[arg(long, default_value = DEFAULT_INTERFACE)]
    interface: String,
    /// Service CIDRs, never masqueraded (repeatable).
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidrs: Vec<IpNetwork>,
    /// The ranges a node's allowed-location-ips must lie in, as the agent's flag of that name.
    #[arg(
        long = "allowed-location-ips-within",
        value_name = "CIDR,...",
        value_delimiter = ',',
        default_values_t = topology::claims::default_allowed_location_ips_within()
    )]
    allowed_location_ips_within: Vec<IpNetwork>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GranularityArg {
    Auto,
    Location,
    Full,
}

impl GranularityArg {
    /// The granularity given, or `None` for `auto`.
    fn fixed(self) -> Option<Granularity> {
        match self {
            GranularityArg::Auto => None,
            GranularityArg::Location => Some(Granularity::Location),
            GranularityArg::Full => Some(Granularity::Full),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EncapArg {
    Never,
    Crosssubnet,
    Always,
}

impl From<EncapArg> for Encapsulate {
    fn from(e: EncapArg) -> Self {
        match e {
            EncapArg::Never => Encapsulate::Never,
            EncapArg::Crosssubnet => Encapsulate::CrossSubnet,
            EncapArg::Always => Encapsulate::Always,
        }
    }
}

#[derive(Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// The node whose plan to show.
    #[arg(long)]
    node: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
    output: PlanFormat,
    /// Name of the underlay interface that holds the node's internal IP (for display).
    #[arg(long, default_value = "eth0")]
    private_iface: String,
    /// Print the time of each phase to stderr (`parse: 1.2 ms`, `engine: 0.3 ms`).
    #[arg(long)]
    timings: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PlanFormat {
    Json,
    Text,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// The agent's HTTP endpoint.
    #[arg(long, value_name = "URL", default_value = wiremesh::cli::status::DEFAULT_AGENT)]
    agent: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
    output: PlanFormat,
    /// Seconds to wait for the agent.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
}

#[derive(Args, Debug)]
struct GraphArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// Colour the tunnels by the age of their latest handshake, as running agents report it
    /// (green < 2 min, amber < 5 min or none yet, red stale, grey no data).
    #[arg(long)]
    live: bool,
    /// An agent's HTTP endpoint to ask with `--live` (repeatable, one per node whose view to
    /// use; default http://127.0.0.1:1107).
    #[arg(long = "agent", value_name = "URL", requires = "live")]
    agents: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = GraphFormat::Svg)]
    format: GraphFormat,
    /// Highlight this node.
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    view: ViewArgs,
    /// Write to this file instead of stdout.
    #[arg(short = 'O', long = "out", value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Which part of the mesh `graph` and `lab graph` draw.
#[derive(Args, Debug, Clone, Default)]
struct ViewArgs {
    /// Draw the overview (locations as boxes, one line per pair of locations) whatever the
    /// mesh's size; by default it is drawn when the full drawing would not fit 1920×1620 px.
    #[arg(long, conflicts_with_all = ["focus", "location"])]
    overview: bool,
    /// Draw one node's tunnels and private link, its location in full.
    #[arg(long, value_name = "NODE", conflicts_with = "location")]
    focus: Option<String>,
    /// Draw one location in full, with the tunnels that leave it.
    #[arg(long, value_name = "LOCATION")]
    location: Option<String>,
}

impl ViewArgs {
    /// The view these flags ask for.
    fn view(self) -> View {
        match (self.overview, self.focus, self.location) {
            (true, _, _) => View::Overview,
            (_, Some(n), _) => View::Focus(NodeName(n)),
            (_, _, Some(l)) => View::Location(l),
            _ => View::Auto,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GraphFormat {
    Svg,
    Dot,
}

#[derive(Args, Debug)]
struct DoctorArgs {
    /// The encapsulation the agent will run with (IPIP is needed unless never).
    #[arg(long, value_enum, default_value_t = EncapArg::Never)]
    encapsulate: EncapArg,
    /// The agent's WireGuard listen port: checked to be free or held by its interface.
    #[arg(long, default_value_t = wiremesh::topology::DEFAULT_PORT)]
    port: u16,
    /// The agent's WireGuard interface.
    #[arg(long, default_value = wiremesh::topology::DEFAULT_INTERFACE)]
    interface: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
    output: PlanFormat,
    /// Diagnose the tunnels of a running agent instead of the machine.
    #[command(subcommand)]
    what: Option<DoctorCommand>,
}

#[derive(Subcommand, Debug)]
enum DoctorCommand {
    /// For every peer of this node's agent without a recent handshake: the endpoint used and
    /// where it came from, bytes each way, whether this host's nftables drop UDP to the listen
    /// port, the keys as published and as used, and the most likely cause with what to do.
    /// Exits 1 when a peer has no recent handshake.
    Peers(DoctorPeersArgs),
}

#[derive(Args, Debug)]
struct DoctorPeersArgs {
    /// The agent's HTTP endpoint (its `--listen`).
    #[arg(long, value_name = "URL", default_value = wiremesh::cli::status::DEFAULT_AGENT)]
    agent: String,
    /// The node's WireGuard listen port, checked against this host's firewall.
    #[arg(long, default_value_t = wiremesh::topology::DEFAULT_PORT)]
    port: u16,
    /// The Nodes as published (`kubectl get nodes -o yaml`), to check keys and tell published
    /// from discovered endpoints.
    #[arg(long, value_name = "FILE")]
    nodes: Option<PathBuf>,
    /// The external Peers as published, with `--nodes`.
    #[arg(long, value_name = "FILE", requires = "nodes")]
    peers: Option<PathBuf>,
    /// Report peers with a recent handshake too.
    #[arg(long)]
    all: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
    output: PlanFormat,
    /// Seconds to wait for the agent.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
}

#[derive(Args, Debug)]
struct ShowconfArgs {
    /// What to configure: a node of the mesh, or an external peer.
    #[arg(value_enum)]
    kind: ShowconfKind,
    /// The node's or the peer's name.
    name: String,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Show the node's segment (or the peer) as a `[Peer]` for another WireGuard interface.
    #[arg(long)]
    as_peer: bool,
    /// Output format of `--as-peer`: a wg `[Peer]` stanza, or a Kilo `Peer` resource.
    #[arg(short = 'o', long, default_value = "wireguard", value_parser = ["wireguard", "json", "yaml"])]
    output: String,
    /// Extra allowed IPs appended to the `--as-peer` output (repeatable).
    #[arg(long = "allowed-ips", value_name = "CIDR", value_delimiter = ',')]
    allowed_ips: Vec<IpNetwork>,
    /// File with the private key to write into the config (else a placeholder comment).
    #[arg(long, value_name = "FILE")]
    private_key: Option<PathBuf>,
}

/// `showconf node NAME` or `showconf peer NAME`: positional values rather than subcommands, so
/// that every flag of `showconf` also works after NAME and its conflicts are checked wherever
/// the flags stand.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ShowconfKind {
    /// Configuration to run as node NAME.
    Node,
    /// Configuration for the external peer NAME (a laptop, another cluster).
    Peer,
}

/// `meshctl connect`.
#[derive(Args, Debug)]
struct ConnectArgs {
    /// The Peer's name (lowercase letters, digits, '-' and '.').
    name: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// This machine's address in the mesh, and any other CIDR the mesh routes to it
    /// (repeatable or comma-separated); the first is the interface's address.
    #[arg(
        long = "allowed-ip",
        value_name = "CIDR",
        value_delimiter = ',',
        required = true
    )]
    allowed_ips: Vec<String>,
    /// Where the cluster can reach this machine (`ip:port`, `[ipv6]:port`, `name:port`); leave
    /// it out behind NAT. Needed to reach a location that is itself behind NAT.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// Seconds between keepalives this machine sends (0: off); they keep NAT mappings open.
    #[arg(
        long,
        visible_alias = "keepalive",
        value_name = "SECS",
        default_value_t = 10
    )]
    persistent_keepalive: u16,
    /// The private key file; generated (mode 0600) when missing, so a restart adopts the Peer
    /// [default: /var/lib/wiremesh/connect/NAME.key].
    #[arg(long, value_name = "FILE")]
    private_key: Option<PathBuf>,
    /// The local WireGuard interface.
    #[arg(short = 'i', long, default_value = "wm-connect0")]
    interface: String,
    /// The interface's UDP listen port [default: the --endpoint's port, else 51820].
    #[arg(long, value_name = "PORT")]
    listen_port: Option<u16>,
    /// The interface's MTU [default: the path towards the cluster's, minus WireGuard's 60 or
    /// 80 bytes].
    #[arg(long)]
    mtu: Option<u32>,
    /// A service CIDR of the cluster to reach too (repeatable): routed to the first segment,
    /// whose leader's service proxy takes it.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidrs: Vec<IpNetwork>,
    /// Seconds between full comparisons with the kernel, besides each change of the cluster.
    #[arg(
        long,
        visible_alias = "resync",
        value_name = "SECS",
        default_value_t = 30
    )]
    resync_period: u64,
    /// Leave the interface, its routes and the Peer in place on exit.
    #[arg(long)]
    keep: bool,
    /// WireGuard implementation: the kernel module where present, else the userspace daemon.
    #[arg(long, value_enum, default_value_t = wiremesh::reconcile::wg::WgMode::Auto)]
    wireguard: wiremesh::reconcile::wg::WgMode,
    /// The userspace WireGuard program [default: $WG_USERSPACE_IMPLEMENTATION, else
    /// wireguard-go].
    #[arg(long, value_name = "PATH")]
    wireguard_userspace: Option<PathBuf>,
    /// Mesh granularity; `auto` reads the granularity the agents publish (default location).
    #[arg(long, value_enum, default_value_t = GranularityArg::Auto)]
    granularity: GranularityArg,
    /// Subnet of the mesh IPs (the agents' --subnet); default: read from the mesh IPs the
    /// agents published, else 10.4.0.0/16.
    #[arg(long, value_name = "CIDR")]
    subnet: Option<IpNetwork>,
    /// Node label that gives the location when no location annotation is set.
    #[arg(long, default_value = DEFAULT_TOPOLOGY_LABEL)]
    topology_label: String,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// `meshctl rotate-key`.
#[derive(Args, Debug)]
struct RotateKeyArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The node whose key is replaced.
    node: String,
    /// Seconds to wait for the agent to publish the new key (0: do not wait).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    wait: u64,
}

/// `meshctl multicluster`.
#[derive(Args, Debug)]
struct MulticlusterArgs {
    #[command(subcommand)]
    command: MulticlusterCommand,
}

#[derive(Subcommand, Debug)]
enum MulticlusterCommand {
    /// Link the cluster of --kubeconfig with the cluster of --remote-kubeconfig and keep the
    /// link in sync until SIGINT or SIGTERM (the Peers stay; `unlink` removes them).
    Link(LinkArgs),
    /// Delete, in both clusters, the Peers a link between them wrote; nothing else.
    Unlink(LinkSides),
}

/// The two clusters of a link and their names.
#[derive(Args, Debug)]
struct LinkSides {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Kubeconfig of the other cluster.
    #[arg(long, value_name = "FILE")]
    remote_kubeconfig: PathBuf,
    /// Kubeconfig context of the other cluster instead of the file's current one.
    #[arg(long, value_name = "NAME")]
    remote_context: Option<String>,
    /// The name of the --kubeconfig cluster in the link: the other cluster's Peers for it are
    /// named `<NAME>-<node>` or `<NAME>-location-<location>` and labelled
    /// `wiremesh.io/linked-cluster=<NAME>`.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// The name of the --remote-kubeconfig cluster in the link.
    #[arg(long, value_name = "NAME")]
    remote_name: String,
}

/// `meshctl multicluster link`.
#[derive(Args, Debug)]
struct LinkArgs {
    #[command(flatten)]
    sides: LinkSides,
    /// Mesh subnet of the --kubeconfig cluster; default: read from the mesh IPs its agents
    /// published, else 10.4.0.0/16.
    #[arg(long, value_name = "CIDR")]
    subnet: Option<IpNetwork>,
    /// Mesh subnet of the other cluster; default as for --subnet.
    #[arg(long, value_name = "CIDR")]
    remote_subnet: Option<IpNetwork>,
    /// Service CIDR of the --kubeconfig cluster to make reachable from the other (repeatable).
    #[arg(long, value_name = "CIDR")]
    service_cidr: Vec<IpNetwork>,
    /// Service CIDR of the other cluster to make reachable from this one (repeatable).
    #[arg(long, value_name = "CIDR")]
    remote_service_cidr: Vec<IpNetwork>,
    /// Granularity of the --kubeconfig cluster's mesh; `auto` reads what its agents publish
    /// (Kilo's agents publish none: location).
    #[arg(long, value_enum, default_value_t = GranularityArg::Auto)]
    granularity: GranularityArg,
    /// Granularity of the other cluster's mesh, as for --granularity.
    #[arg(long, value_enum, default_value_t = GranularityArg::Auto)]
    remote_granularity: GranularityArg,
    /// Label (or annotation) giving a node's location, as the agents use it.
    #[arg(long, default_value = DEFAULT_TOPOLOGY_LABEL)]
    topology_label: String,
    /// Sync once and exit instead of keeping the link in sync.
    #[arg(long)]
    once: bool,
    /// Seconds between full syncs besides those every change triggers.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    resync: u64,
}

impl LinkSides {
    /// Connect to both clusters (sends nothing yet).
    async fn connect(
        &self,
        subnets: (Option<IpNetwork>, Option<IpNetwork>),
        services: (Vec<IpNetwork>, Vec<IpNetwork>),
        granularities: (GranularityArg, GranularityArg),
    ) -> Result<(link::Side, link::Side)> {
        let timeout = std::time::Duration::from_secs(self.cluster.request_timeout);
        let local = ClientOptions {
            kubeconfig: self.cluster.kubeconfig.clone(),
            context: self.cluster.context.clone(),
        };
        let remote = ClientOptions {
            kubeconfig: Some(self.remote_kubeconfig.clone()),
            context: self.remote_context.clone(),
        };
        let a = Cluster::connect(&local, timeout)
            .await
            .with_context(|| format!("cluster {}", self.name))?;
        let b = Cluster::connect(&remote, timeout)
            .await
            .with_context(|| format!("cluster {}", self.remote_name))?;
        Ok((
            link::Side {
                name: self.name.clone(),
                cluster: a,
                subnet: subnets.0,
                service_cidrs: services.0,
                granularity: granularities.0.fixed(),
            },
            link::Side {
                name: self.remote_name.clone(),
                cluster: b,
                subnet: subnets.1,
                service_cidrs: services.1,
                granularity: granularities.1.fixed(),
            },
        ))
    }
}

fn multicluster(args: MulticlusterArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        match args.command {
            MulticlusterCommand::Link(l) => {
                let (a, b) = l
                    .sides
                    .connect(
                        (l.subnet, l.remote_subnet),
                        (l.service_cidr.clone(), l.remote_service_cidr.clone()),
                        (l.granularity, l.remote_granularity),
                    )
                    .await?;
                if l.once {
                    let r = link::sync(&a, &b, &l.topology_label, true).await?;
                    for p in &r.problems {
                        eprintln!("meshctl: {p}");
                    }
                    for (ap, remote) in [(&r.a, &b.name), (&r.b, &a.name)] {
                        println!(
                            "cluster {}: {} Peers for cluster {remote} ({} created, {} updated, {} deleted)",
                            ap.cluster,
                            ap.linked.len(),
                            ap.created.len(),
                            ap.updated.len(),
                            ap.deleted.len()
                        );
                    }
                    return Ok(());
                }
                let resync = std::time::Duration::from_secs(l.resync);
                link::run(&a, &b, &l.topology_label, resync, stop_signal()?).await?;
                Ok(())
            }
            MulticlusterCommand::Unlink(s) => {
                let (a, b) = s
                    .connect(
                        (None, None),
                        (Vec::new(), Vec::new()),
                        (GranularityArg::Auto, GranularityArg::Auto),
                    )
                    .await?;
                let (da, db) = link::unlink(&a, &b).await?;
                println!("cluster {}: {} Peers deleted", a.name, da.len());
                println!("cluster {}: {} Peers deleted", b.name, db.len());
                Ok(())
            }
        }
    })
}

/// Completes at the first SIGINT or SIGTERM.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// `meshctl peer`: external peers in the cluster.
#[derive(Args, Debug)]
struct PeerArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(Subcommand, Debug)]
enum PeerCommand {
    /// Create a Peer: a WireGuard peer outside the cluster (a laptop, another cluster).
    ///
    /// Every value is checked first with the agent's own parser; nothing is sent when one is
    /// invalid. `meshctl showconf peer NAME` then prints the peer's WireGuard configuration.
    Add(PeerAddArgs),
    /// List the cluster's Peers: name, public key, allowed IPs, endpoint.
    List,
    /// Delete the Peer NAME.
    Delete {
        /// The peer's name.
        name: String,
    },
}

#[derive(Args, Debug)]
struct PeerAddArgs {
    /// The peer's name (lowercase letters, digits, '-' and '.', like every Kubernetes name).
    name: String,
    /// The peer's WireGuard public key, base64 (`wg pubkey < private.key`).
    #[arg(long, value_name = "KEY")]
    public_key: String,
    /// CIDRs the mesh routes to the peer, comma-separated or repeated; a bare IP is one address.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', required = true)]
    allowed_ips: Vec<String>,
    /// Where the mesh can reach the peer: `ip:port`, `[ipv6]:port` or `dns-name:port`. Leave it
    /// out for a peer behind NAT: it connects first.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// Seconds between keepalives the peer sends (0 = off); 25 keeps a NAT mapping open.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    persistent_keepalive: i64,
    /// File holding a preshared key (`wg genpsk`), shared by the peer and the nodes.
    #[arg(long, value_name = "FILE")]
    preshared_key_file: Option<PathBuf>,
    /// Print the Peer as YAML instead of creating it (no cluster needed).
    #[arg(long)]
    dry_run: bool,
}

impl PeerAddArgs {
    /// The flags as a [`NewPeer`], with the preshared key read from its file.
    fn request(&self) -> Result<NewPeer> {
        let preshared_key = match &self.preshared_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(NewPeer {
            name: self.name.clone(),
            public_key: self.public_key.clone(),
            allowed_ips: self.allowed_ips.clone(),
            endpoint: self.endpoint.clone(),
            persistent_keepalive: self.persistent_keepalive,
            preshared_key,
        })
    }
}

impl MeshArgs {
    /// The nodes and peers: from the files when `--nodes` is given, else from the cluster.
    fn load(&self) -> Result<Inputs> {
        match &self.nodes {
            Some(nodes) => load(nodes, self.peers.as_deref(), &self.topology_label)
                .with_context(|| format!("reading {}", nodes.display())),
            None => {
                let label = self.topology_label.clone();
                self.cluster.run(|c| async move { c.inputs(&label).await })
            }
        }
    }

    fn options(&self, inputs: &Inputs) -> MeshOptions {
        let granularity = self
            .granularity
            .fixed()
            .unwrap_or_else(|| auto_granularity(&inputs.nodes));
        MeshOptions {
            granularity,
            subnet: self.subnet,
            port: self.port,
            interface: self.interface.clone(),
            encapsulate: self.encapsulate.into(),
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_secs()).ok()),
            service_cidrs: self.service_cidrs.clone(),
            allowed_location_ips_within: self.allowed_location_ips_within.clone(),
            ..MeshOptions::default()
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn plan(args: PlanArgs) -> Result<()> {
    let t0 = Instant::now();
    let inputs = args.mesh.load()?;
    let parse = ms(t0);
    let opts = args.mesh.options(&inputs);
    let t1 = Instant::now();
    // A node the registry left out is named with its problems, not as absent.
    let mut plan = topology::compute(
        &inputs.nodes,
        &inputs.peers,
        &NodeName(args.node.clone()),
        &opts,
    )
    .map_err(|e| e.explained_by(&inputs.diagnostics))?;
    let engine = ms(t1);
    let mut diagnostics = inputs.diagnostics;
    diagnostics.append(&mut plan.diagnostics);
    plan.diagnostics = diagnostics;
    let devs = DeviceNames {
        wireguard: opts.interface.clone(),
        private: args.private_iface,
        tunnel: "tunl0".into(),
    };
    let text = match args.output {
        PlanFormat::Json => render_json(&plan, opts.granularity, &devs),
        PlanFormat::Text => render_text(&plan, opts.granularity, &devs),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    if args.timings {
        eprintln!("parse: {parse:.2} ms");
        eprintln!("engine: {engine:.2} ms");
    }
    Ok(())
}

fn graph(args: GraphArgs) -> Result<()> {
    let inputs = args.mesh.load()?;
    let opts = args.mesh.options(&inputs);
    let checked = topology::claims::check(&inputs.nodes, &opts);
    let topo = topology::build_checked(&checked, &inputs.peers, &opts);
    // A node named but not drawn: why it is out (`node X is left out: KEY: PROBLEM`), or that
    // the input has no such node.
    for n in [&args.node, &args.view.focus].into_iter().flatten() {
        if topo.segment_of(&NodeName(n.clone())).is_none() {
            let why = LocalError::left_out(n, topo.diagnostics.iter().chain(&inputs.diagnostics))
                .unwrap_or_else(|| LocalError::Unknown(n.clone()));
            bail!("{why}");
        }
    }
    if let Some(l) = &args.view.location {
        let known = wiremesh::graph::locations(&topo);
        let label = if l.is_empty() { "no location" } else { l };
        if !known.iter().any(|k| k == label) {
            bail!(
                "no location {l:?} in the mesh (locations: {})",
                known.join(", ")
            );
        }
    }
    let view = args.view.view();
    let live = if args.live {
        Some(live_from_agents(&args.agents)?)
    } else {
        None
    };
    let gopts = GraphOptions {
        local: args.node.map(NodeName),
        title: None,
        live,
        view,
    };
    let text = match args.format {
        GraphFormat::Svg => render_svg(&topo, &gopts),
        GraphFormat::Dot => render_dot(&topo, &gopts),
    };
    for d in topo.diagnostics.iter().chain(&inputs.diagnostics) {
        eprintln!("warning: {d}");
    }
    match args.out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// Runs `f` on a small runtime of its own.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

/// The handshakes the agents at `urls` (default: this machine's) report; an agent that does not
/// answer is a warning, and its tunnels are drawn as unknown.
fn live_from_agents(urls: &[String]) -> Result<wiremesh::graph::Live> {
    use wiremesh::cli::status::{AgentUrl, DEFAULT_AGENT, fetch_status};
    let urls: Vec<String> = if urls.is_empty() {
        vec![DEFAULT_AGENT.to_owned()]
    } else {
        urls.to_vec()
    };
    let parsed = urls
        .iter()
        .map(|u| AgentUrl::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    let docs = block_on(async {
        let mut docs = Vec::new();
        for u in &parsed {
            match fetch_status(u, std::time::Duration::from_secs(10)).await {
                Ok(d) => docs.push(d),
                Err(e) => eprintln!("warning: {e}; tunnels only it reports are drawn as unknown"),
            }
        }
        docs
    })?;
    Ok(wiremesh::graph::Live::from_status(&docs))
}

fn status(args: StatusArgs) -> Result<()> {
    use wiremesh::cli::status::{AgentUrl, fetch_status, render_json, render_text};
    let url = AgentUrl::parse(&args.agent)?;
    let timeout = std::time::Duration::from_secs(args.timeout);
    let doc = block_on(fetch_status(&url, timeout))??;
    let text = match args.output {
        PlanFormat::Json => render_json(&url.base(), &doc),
        PlanFormat::Text => render_text(&doc),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn doctor_peers(args: DoctorPeersArgs) -> Result<()> {
    use wiremesh::cli::status::{AgentUrl, fetch_status};
    use wiremesh::doctor::{firewall, peers};
    let url = AgentUrl::parse(&args.agent)?;
    let timeout = std::time::Duration::from_secs(args.timeout);
    let status = block_on(fetch_status(&url, timeout))??;
    let published = match &args.nodes {
        Some(nodes) => {
            let inputs = load(nodes, args.peers.as_deref(), DEFAULT_TOPOLOGY_LABEL)
                .with_context(|| format!("reading {}", nodes.display()))?;
            Some(peers::Published::new(&inputs.nodes, &inputs.peers))
        }
        None => None,
    };
    let firewall = match firewall::read_ruleset() {
        Ok(rs) => firewall::judge(&rs, args.port),
        Err(why) => firewall::Verdict::Unknown { why },
    };
    let report = peers::diagnose(
        &peers::Local {
            status,
            listen_port: args.port,
            firewall,
            published,
        },
        args.all,
    );
    let text = match args.output {
        PlanFormat::Json => format!("{}\n", serde_json::to_string_pretty(&report)?),
        PlanFormat::Text => peers::render(&report),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    if report.findings.iter().any(|f| {
        !matches!(
            f.health,
            wiremesh::status::Health::Fresh | wiremesh::status::Health::Aging
        )
    }) {
        std::process::exit(1);
    }
    Ok(())
}

fn doctor(args: DoctorArgs) -> Result<()> {
    if let Some(DoctorCommand::Peers(p)) = args.what {
        return doctor_peers(p);
    }
    let checks = wiremesh::doctor::run(args.encapsulate.into(), args.port, &args.interface);
    let text = match args.output {
        PlanFormat::Json => format!("{}\n", serde_json::to_string_pretty(&checks)?),
        PlanFormat::Text => wiremesh::doctor::render(&checks),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    if checks
        .iter()
        .any(|c| c.status == wiremesh::doctor::Status::Missing)
    {
        std::process::exit(1);
    }
    Ok(())
}

fn showconf(args: ShowconfArgs) -> Result<()> {
    use wiremesh::showconf::{self as sc, Format};
    let inputs = args.mesh.load()?;
    let opts = args.mesh.options(&inputs);
    let checked = topology::claims::check(&inputs.nodes, &opts);
    let mut topo = topology::build_checked(&checked, &inputs.peers, &opts);
    // The registry's problems too, so that a node or peer it left out is named with them.
    topo.diagnostics.extend(inputs.diagnostics.iter().cloned());
    let private_key: Option<WgKey> = match &args.private_key {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .parse()
                .map_err(|e| {
                    anyhow::anyhow!("{}: not a WireGuard private key: {e}", path.display())
                })?,
        ),
        None => None,
    };
    let text = if args.as_peer {
        let format: Format = args
            .output
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?;
        let name = NodeName(args.name.clone());
        let peer = match args.kind {
            ShowconfKind::Node => sc::node_as_peer(&topo, &name, &args.allowed_ips)?,
            ShowconfKind::Peer => sc::peer_as_peer(&topo, &name, &args.allowed_ips)?,
        };
        sc::render_peer(&peer, format)?
    } else {
        if args.output != "wireguard" || !args.allowed_ips.is_empty() {
            bail!("--output and --allowed-ips only apply with --as-peer");
        }
        let name = NodeName(args.name.clone());
        match args.kind {
            ShowconfKind::Node => sc::node_config(&topo, &name, &opts, private_key.as_ref())?,
            ShowconfKind::Peer => sc::peer_config(&topo, &name, &opts, private_key.as_ref())?,
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn rotate_key(args: RotateKeyArgs) -> Result<()> {
    use wiremesh::agent::rotate;
    let token = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_nanos()
        .to_string();
    let (node, t, wait) = (args.node.clone(), token.clone(), args.wait);
    let key_of = |n: &k8s_openapi::api::core::v1::Node| {
        rotate::published_key(n).unwrap_or_else(|| "(none)".into())
    };
    let (before, after) = args.cluster.run(|c| async move {
        let before = c.node(&node).await?;
        c.request_rotation(&node, &t).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
        if wait == 0 {
            return Ok((before, None));
        }
        loop {
            let n = c.node(&node).await?;
            if rotate::done(&n).as_deref() == Some(t.as_str()) {
                return Ok((before, Some(n)));
            }
            if std::time::Instant::now() > deadline {
                return Ok((before, None));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    })?;
    match after {
        Some(n) => {
            println!(
                "node {}: key rotated: {} -> {}",
                args.node,
                key_of(&before),
                key_of(&n)
            );
            Ok(())
        }
        None if args.wait == 0 => {
            println!(
                "node {}: rotation requested ({} {token})",
                args.node,
                rotate::REQUEST
            );
            Ok(())
        }
        None => anyhow::bail!(
            "node {}: rotation requested ({} {token}), but its agent has not published a new key \
             within {} s (is it running wiremesh, with the Kubernetes registry?)",
            args.node,
            rotate::REQUEST,
            args.wait
        ),
    }
}

fn peer(args: PeerArgs) -> Result<()> {
    match args.command {
        PeerCommand::Add(a) => {
            // Everything is checked before the cluster is contacted.
            let res = wiremesh::cli::peer::build(&a.request()?)?;
            if a.dry_run {
                std::io::stdout().write_all(render_yaml(&res)?.as_bytes())?;
                return Ok(());
            }
            args.cluster
                .run(|c| async move { c.create_peer(&res).await })?;
            println!(
                "peer {0} created; `meshctl showconf peer {0}` prints its WireGuard configuration",
                a.name
            );
        }
        PeerCommand::List => {
            let (peers, diagnostics) = args.cluster.run(|c| async move { c.peers().await })?;
            for d in &diagnostics {
                eprintln!("warning: {d}");
            }
            if peers.is_empty() {
                eprintln!("no peers");
            } else {
                std::io::stdout().write_all(render_table(&peers).as_bytes())?;
            }
        }
        PeerCommand::Delete { name } => {
            let n = name.clone();
            args.cluster
                .run(|c| async move { c.delete_peer(&n).await })?;
            println!("peer {name} deleted");
        }
    }
    Ok(())
}

fn connect(a: ConnectArgs) -> Result<()> {
    use wiremesh::connect::{ConnectConfig, outside::OutsideOptions};
    let endpoint_port = match &a.endpoint {
        Some(e) => Some(
            e.parse::<wiremesh::model::Endpoint>()
                .map_err(|err| anyhow::anyhow!("--endpoint: {e:?} is not an endpoint: {err}"))?
                .port(),
        ),
        None => None,
    };
    let host = nix::unistd::gethostname()
        .context("reading the host name")?
        .to_string_lossy()
        .into_owned();
    let cfg = ConnectConfig {
        private_key: a
            .private_key
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/wiremesh/connect/{}.key", a.name))),
        name: a.name,
        host,
        client: ClientOptions {
            kubeconfig: a.cluster.kubeconfig,
            context: a.cluster.context,
        },
        request_timeout: std::time::Duration::from_secs(a.cluster.request_timeout),
        allowed_ips: a.allowed_ips,
        endpoint: a.endpoint,
        persistent_keepalive: a.persistent_keepalive,
        outside: OutsideOptions {
            interface: a.interface,
            listen_port: a
                .listen_port
                .or(endpoint_port)
                .unwrap_or(topology::DEFAULT_PORT),
            mtu: a.mtu,
            service_cidrs: a.service_cidrs,
        },
        resync: std::time::Duration::from_secs(a.resync_period),
        keep: a.keep,
        wireguard: a.wireguard,
        wireguard_userspace: a
            .wireguard_userspace
            .unwrap_or_else(wiremesh::reconcile::wg::userspace_binary_from_env),
        granularity: a.granularity.fixed(),
        subnet: a.subnet,
        topology_label: a.topology_label,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: disconnecting"),
                _ = int.recv() => tracing::info!("SIGINT: disconnecting"),
            }
        };
        wiremesh::connect::run(cfg, stop).await?;
        Ok(())
    })
}

/// Which lab, and where its state lives.
#[derive(Args, Debug)]
struct LabArgs {
    /// Lab name: a lowercase letter, then up to 7 lowercase letters or digits.
    #[arg(long, global = true, default_value = wiremesh::lab::names::DEFAULT_NAME)]
    name: String,
    /// Directory holding the labs' state directories.
    #[arg(long, global = true, value_name = "DIR", default_value = wiremesh::lab::names::DEFAULT_ROOT)]
    root: PathBuf,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand, Debug)]
enum LabCommand {
    /// Create the lab: underlay, NAT, node namespaces, keys, nodes file (or API server), agents,
    /// pods.
    ///
    /// Without flags it mirrors examples/three-clouds.yaml (three nodes, full mesh, the last
    /// one behind NAT).
    Up(LabUpArgs),
    /// Show nodes, agents, pods and WireGuard peers with handshakes; with NODE, that node's
    /// tunnels as its agent reports them (its `/status`, the table of `meshctl status`).
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
        /// Ask this node's agent instead.
        #[arg(value_name = "NODE")]
        node: Option<String>,
    },
    /// Ping every pod from every pod, move a few MiB over TCP between pods of two nodes, and
    /// prove the underlay carries only WireGuard.
    Check {
        /// Pings run at the same time.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Draw the running lab's mesh (SVG or DOT).
    Graph {
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Svg)]
        format: GraphFormat,
        /// Colour the tunnels by the handshakes every node's agent reports.
        #[arg(long)]
        live: bool,
        /// Highlight this node.
        #[arg(long)]
        node: Option<String>,
        /// Draw this cluster of a multi-cluster lab (the others appear as its Peers); default:
        /// the cluster of --node, else 1.
        #[arg(long, value_name = "K")]
        cluster: Option<usize>,
        #[command(flatten)]
        view: ViewArgs,
        /// Write to this file instead of stdout.
        #[arg(short = 'O', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Remove every namespace, process and file of the lab (also after a failed `up`).
    Down,
    /// Add a node to the running lab, or remove one.
    Node {
        #[command(subcommand)]
        command: LabNodeCommand,
    },
    /// Set or remove annotations of a lab node's Node object (`--registry kube`).
    Annotate {
        /// The node.
        node: String,
        /// `KEY=VALUE` sets, `KEY-` removes; a key without `/` gets the `kilo.squat.ai/` prefix.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        annotations: Vec<String>,
    },
    /// Stop or start the lab's kube-apiserver (`--registry kube`): an API outage and its end.
    Apiserver {
        #[command(subcommand)]
        command: LabApiserverCommand,
    },
    /// Inject a fault while pod-to-pod pings run across it; print packets sent and lost, and
    /// exit 1 if any was lost or the mesh did not converge afterwards.
    Chaos {
        #[command(subcommand)]
        fault: LabChaosCommand,
        /// Seconds to wait for the mesh to converge, before the fault and after it.
        #[arg(long, global = true, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum LabChaosCommand {
    /// SIGKILL the node's agent and start it again; pings from its pod to every other node.
    RestartAgent {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Stop the kube-apiserver for SECONDS, then start it again (`--registry kube`); a ring of
    /// pings over all nodes.
    ApiserverOutage {
        /// How long the API server stays away.
        #[arg(value_name = "SECONDS")]
        seconds: u64,
    },
    /// SIGKILL the node's agent, leave it stopped for SECONDS, then start it again; pings from
    /// its pod to every other node (the mesh must stay up and nothing leak while it is away).
    StopAgent {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
        /// How long the agent stays stopped.
        #[arg(value_name = "SECONDS")]
        seconds: u64,
    },
    /// Take the node out of the nodes file, then put it back (file registry): every node after
    /// it is renumbered twice while the other nodes' pods ping each other.
    Renumber {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Stop a location leader's forwarding (an nft table in its namespace drops what it would
    /// forward; its agent keeps running) until the location has failed over, then let it
    /// forward again and wait until it leads again (`--registry kube`, by location); pings
    /// from the other members' pods to another location and back. Passes when each cut-off
    /// lasted at most --bound seconds and the leader changed exactly twice.
    LeaderBlackhole {
        /// The leader.
        #[arg(value_name = "NODE")]
        node: String,
        /// The longest the location's pods may be cut off, each time, in seconds.
        #[arg(long, default_value_t = 10)]
        bound: u64,
    },
    /// Ask the node's agent to rotate its WireGuard key (`--registry kube`) while pods ping to
    /// and from it; passes when every agent uses the new key and no flow went unanswered longer
    /// than --bound seconds.
    RotateKey {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
        /// The longest a flow may go unanswered, in seconds.
        #[arg(long, default_value_t = 2.0)]
        bound: f64,
    },
}

#[derive(Subcommand, Debug)]
enum LabNodeCommand {
    /// Add a node: namespace, underlay and LAN, key, Node object (or nodes-file entry), agent,
    /// pods.
    Add {
        /// The node's name.
        #[arg(value_name = "NAME")]
        node: String,
        /// Its location (an existing one joins that location's LAN); default: a location of
        /// its own, named after the node.
        #[arg(long)]
        location: Option<String>,
        /// Its cluster in a multi-cluster lab (1, 2, …); default: the cluster of its
        /// location's nodes, else 1.
        #[arg(long, value_name = "K")]
        cluster: Option<usize>,
        /// Seconds to wait for its agent's CNI configuration.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Remove a node: its Node object (or nodes-file entry), agent, pods and namespaces.
    Remove {
        /// The node's name.
        #[arg(value_name = "NAME")]
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum LabApiserverCommand {
    /// Stop the kube-apiserver (etcd and the data stay); the agents keep the mesh as it is.
    Stop,
    /// Start the kube-apiserver again on the same data and wait until it answers.
    Start {
        /// Seconds to wait until it answers.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Args, Debug)]
struct LabUpArgs {
    /// Number of generated nodes (named node1, node2, …); default 3 when generating.
    #[arg(long, conflicts_with = "from")]
    nodes: Option<usize>,
    /// Spread the generated nodes over this many locations (loc1, loc2, …); default: one
    /// location per node.
    #[arg(long, conflicts_with = "from")]
    locations: Option<usize>,
    /// Take node names, locations, leader flags, keepalives and pod CIDRs from this nodes file
    /// (addresses and keys are the lab's own).
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Mesh granularity; default: the file's, else location when a location has two nodes.
    #[arg(long, value_enum)]
    granularity: Option<GranularityChoice>,
    /// Locations behind a NAT router; default 1 when there are two locations or more.
    #[arg(long, value_name = "N")]
    nat: Option<usize>,
    /// Pod namespaces per node.
    #[arg(long, default_value_t = 1)]
    pods: usize,
    /// MTU of every link of the lab's network (underlay, LANs, NAT uplinks), e.g. 1280 for a
    /// small path; default: the kernel's 1500. The agents' automatic MTU follows it.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(576..=65535))]
    underlay_mtu: Option<u32>,
    /// IPv6 only: underlay, LANs, endpoints, internal IPs, pod CIDRs (fd00:201:0:i::/64) and
    /// the mesh subnet (fd00:4::/64) are IPv6; no NAT.
    #[arg(long, conflicts_with = "dual_stack")]
    ipv6: bool,
    /// IPv4 and IPv6 on every link and in every pod (an IPv6 pod CIDR per node besides the
    /// IPv4 one); the mesh runs over IPv4; no NAT.
    #[arg(long)]
    dual_stack: bool,
    /// Build underlay, NAT, keys and files only: no agents, no pods (a debugging aid).
    #[arg(long)]
    no_agents: bool,
    /// The wiremesh binary to run as agent; default: the one next to meshctl.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Extra argument for every agent (repeatable).
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Seconds to wait for the agents' CNI configuration (and for the API server).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Where the agents read the cluster: a nodes file the lab writes, or a real kube-apiserver
    /// in the lab (the agents then know nothing but that API server).
    #[arg(long, value_enum, default_value_t = RegistryChoice::File)]
    registry: RegistryChoice,
    /// The kube-apiserver binary for `--registry kube` (tests/apiserver/setup.sh builds it).
    #[arg(long, value_name = "PATH", default_value = wiremesh::lab::apiserver::DEFAULT_APISERVER_BIN)]
    apiserver_bin: PathBuf,
    /// Split the nodes, in order, into this many clusters (`--registry kube`, no NAT): each
    /// its own API server and mesh subnet (10.4.0.0/16, 10.5.0.0/16, …), linked with
    /// `meshctl multicluster link`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    clusters: usize,
    /// With --clusters: leave the clusters unlinked (a debugging aid; pods of different
    /// clusters then cannot reach each other).
    #[arg(long)]
    no_link: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GranularityChoice {
    Location,
    Full,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RegistryChoice {
    /// A nodes file the lab writes (`wiremesh agent --nodes`).
    File,
    /// etcd + kube-apiserver in the lab (`wiremesh agent --kubeconfig`).
    Kube,
}

fn lab_up(name: wiremesh::lab::LabName, root: PathBuf, a: LabUpArgs) -> Result<(), LabError> {
    use wiremesh::lab::spec::{Family, Source, SpecOptions, THREE_CLOUDS, THREE_CLOUDS_NAME};
    use wiremesh::registry::file::{decode_nodes, load_nodes};
    // The root check comes before reading any file the user named.
    wiremesh::lab::sys::require_root()?;
    let loaded = match &a.from {
        Some(path) => Some((
            path.display().to_string(),
            load_nodes(path, DEFAULT_TOPOLOGY_LABEL).map_err(|source| LabError::From {
                path: path.display().to_string(),
                source,
            })?,
        )),
        None if a.nodes.is_none() && a.locations.is_none() => Some((
            THREE_CLOUDS_NAME.to_owned(),
            decode_nodes(THREE_CLOUDS, DEFAULT_TOPOLOGY_LABEL).map_err(|source| {
                LabError::From {
                    path: THREE_CLOUDS_NAME.to_owned(),
                    source,
                }
            })?,
        )),
        None => None,
    };
    let source = match loaded {
        Some((name, l)) => {
            for d in &l.diagnostics {
                eprintln!("warning: {name}: {d}");
            }
            Source::File {
                name,
                nodes: l.items,
            }
        }
        None => {
            let nodes = a.nodes.unwrap_or(3);
            Source::Generated {
                nodes,
                locations: a.locations.unwrap_or(nodes),
            }
        }
    };
    let opts = wiremesh::lab::up::UpOptions {
        root,
        name,
        spec: SpecOptions {
            source,
            granularity: a.granularity.map(|g| match g {
                GranularityChoice::Location => Granularity::Location,
                GranularityChoice::Full => Granularity::Full,
            }),
            nat: a.nat,
            pods_per_node: a.pods,
            registry: match a.registry {
                RegistryChoice::File => wiremesh::lab::spec::Registry::File,
                RegistryChoice::Kube => wiremesh::lab::spec::Registry::Kube,
            },
            underlay_mtu: a.underlay_mtu,
            clusters: a.clusters,
            family: if a.ipv6 {
                Family::Ipv6
            } else if a.dual_stack {
                Family::DualStack
            } else {
                Family::Ipv4
            },
        },
        agents: !a.no_agents,
        agent_binary: a.agent,
        agent_args: a.agent_args,
        timeout: std::time::Duration::from_secs(a.timeout),
        apiserver_binary: Some(a.apiserver_bin),
        link: !a.no_link,
    };
    let state = wiremesh::lab::up::up(&opts)?;
    println!("{}", wiremesh::lab::up::summary(&state));
    Ok(())
}

/// `meshctl lab node add|remove`.
fn lab_node(
    root: &std::path::Path,
    name: &wiremesh::lab::LabName,
    command: LabNodeCommand,
) -> Result<(), LabError> {
    use wiremesh::lab::node;
    match command {
        LabNodeCommand::Add {
            node: node_name,
            location,
            cluster,
            timeout,
        } => {
            let opts = node::AddOptions {
                name: node_name.clone(),
                location,
                cluster,
                timeout: std::time::Duration::from_secs(timeout),
            };
            let state = node::add(root, name, &opts)?;
            let pods: Vec<String> = state
                .node(&node_name)
                .map(|(_, n)| {
                    n.pods
                        .iter()
                        .flat_map(|p| p.addrs())
                        .map(|a| a.to_string())
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "lab {name}: node {node_name} added{}",
                if pods.is_empty() {
                    String::new()
                } else {
                    format!(", pods {}", pods.join(" "))
                }
            );
            Ok(())
        }
        LabNodeCommand::Remove { node: node_name } => {
            let report = node::remove(root, name, &node_name)?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "lab {name}: node {node_name} removed{}: {} processes ended, {} pods detached, {} namespaces deleted",
                if report.node_deleted {
                    " (Node deleted)"
                } else {
                    ""
                },
                report.killed.len(),
                report.detached,
                report.namespaces.len()
            );
            Ok(())
        }
    }
}

/// `meshctl lab …`; errors carry their exit code.
fn lab(args: LabArgs) -> Result<(), LabError> {
    use wiremesh::lab::{self as l, GraphFormat as G};
    // Every lab command needs root; say so before anything else.
    l::sys::require_root()?;
    let name: l::LabName = args.name.parse()?;
    match args.command {
        LabCommand::Up(a) => lab_up(name, args.root, a),
        LabCommand::Status {
            output,
            node: Some(node),
        } => {
            use wiremesh::cli::status::{render_json, render_text};
            let state = l::load(&args.root, &name)?;
            let doc = l::probe::agent_status(&state, &node)?;
            let text = match output {
                PlanFormat::Json => render_json(&format!("lab {name} node {node}"), &doc),
                PlanFormat::Text => render_text(&doc),
            };
            print!("{text}");
            Ok(())
        }
        LabCommand::Status { output, node: None } => {
            let state = l::load(&args.root, &name)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let status = l::status::collect(&state, now);
            match output {
                PlanFormat::Json => {
                    let text =
                        serde_json::to_string_pretty(&status).map_err(|source| LabError::Json {
                            what: "status".to_owned(),
                            source,
                        })?;
                    println!("{text}");
                }
                PlanFormat::Text => print!("{}", l::status::render_text(&status)),
            }
            Ok(())
        }
        LabCommand::Check { parallel } => {
            let state = l::load(&args.root, &name)?;
            let report = l::check::check(&state, parallel)?;
            print!("{}", report.render());
            if report.passed() {
                Ok(())
            } else {
                Err(LabError::CheckFailed(format!(
                    "{} of {} pairs lost packets, {} plaintext pod packets on the underlay",
                    report.losses(),
                    report.pings.len(),
                    report.tally.plaintext.len()
                )))
            }
        }
        LabCommand::Graph {
            format,
            live,
            node,
            cluster,
            view,
            out,
        } => {
            let state = l::load(&args.root, &name)?;
            let format = match format {
                GraphFormat::Svg => G::Svg,
                GraphFormat::Dot => G::Dot,
            };
            let view = view.view();
            let (text, warnings) = l::graph(&state, format, node.as_deref(), cluster, live, view)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            match out {
                Some(path) => std::fs::write(&path, text).map_err(|source| LabError::Io {
                    op: "write",
                    path,
                    source,
                }),
                None => std::io::stdout()
                    .write_all(text.as_bytes())
                    .map_err(|source| LabError::Io {
                        op: "write",
                        path: "stdout".into(),
                        source,
                    }),
            }
        }
        LabCommand::Node { command } => lab_node(&args.root, &name, command),
        LabCommand::Annotate { node, annotations } => {
            let changes = annotations
                .iter()
                .map(|a| l::cluster::parse_annotation(a))
                .collect::<Result<Vec<_>, _>>()?;
            let state = l::load(&args.root, &name)?;
            let api = state.require_apiserver_of("annotate", &node)?;
            l::cluster::annotate(api, &node, &changes)?;
            println!("node {node} annotated");
            Ok(())
        }
        LabCommand::Apiserver { command } => match command {
            LabApiserverCommand::Stop => {
                if l::apiserver::stop(&args.root, &name)? {
                    println!("lab {name}: kube-apiserver stopped (etcd keeps the data)");
                } else {
                    println!("lab {name}: kube-apiserver was not running");
                }
                Ok(())
            }
            LabApiserverCommand::Start { timeout } => {
                let timeout = std::time::Duration::from_secs(timeout);
                if l::apiserver::start(&args.root, &name, timeout)? {
                    println!("lab {name}: kube-apiserver started and answering");
                } else {
                    println!("lab {name}: kube-apiserver already runs");
                }
                Ok(())
            }
        },
        LabCommand::Chaos { fault, timeout } => {
            use l::chaos::{ChaosOptions, Fault};
            let fault = match fault {
                LabChaosCommand::RestartAgent { node } => Fault::RestartAgent(node),
                LabChaosCommand::ApiserverOutage { seconds } => {
                    Fault::ApiServerOutage(std::time::Duration::from_secs(seconds))
                }
                LabChaosCommand::StopAgent { node, seconds } => {
                    Fault::StopAgent(node, std::time::Duration::from_secs(seconds))
                }
                LabChaosCommand::Renumber { node } => Fault::Renumber(node),
                LabChaosCommand::LeaderBlackhole { node, bound } => {
                    Fault::LeaderBlackhole(node, std::time::Duration::from_secs(bound))
                }
                LabChaosCommand::RotateKey { node, bound } => Fault::RotateKey(
                    node,
                    std::time::Duration::try_from_secs_f64(bound)
                        .map_err(|e| LabError::Options(format!("--bound {bound}: {e}")))?,
                ),
            };
            let opts = ChaosOptions {
                fault,
                timeout: std::time::Duration::from_secs(timeout),
            };
            let report = l::chaos::run(&args.root, &name, &opts)?;
            print!("{}", report.render());
            if report.passed() {
                Ok(())
            } else {
                Err(LabError::ChaosFailed(format!(
                    "{} packets lost, {} in plaintext on the underlay{}{}",
                    report.lost(),
                    report.plaintext.len(),
                    if report.converged_after.is_some() {
                        ""
                    } else {
                        ", mesh not converged"
                    },
                    match &report.failover {
                        Some(f) if !f.passed() => {
                            ", failover not within its bound (or flapping, or no return)"
                        }
                        _ => "",
                    }
                )))
            }
        }
        LabCommand::Down => {
            let report = l::down::down(&args.root, &name)?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            if report.was_empty() {
                println!("lab {name}: nothing to remove");
            } else {
                println!(
                    "lab {name} removed: {} processes ended, {} pods detached, {} namespaces deleted{}",
                    report.killed.len(),
                    report.detached,
                    report.namespaces.len(),
                    if report.removed_dir {
                        ", state directory removed"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
    }
}

/// `meshctl completion SHELL`: the script for `shell`, written in one piece.
fn completion(shell: clap_complete::Shell) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "meshctl", &mut script);
    std::io::stdout().write_all(&script)?;
    Ok(())
}

/// Log filter without `RUST_LOG`. kube and rustls log every failed request at ERROR; meshctl
/// reports the failure itself, in one line, so theirs are off.
const DEFAULT_LOG: &str = "warn,kube_client=off,rustls_platform_verifier=off";

fn main() {
    let cli = parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    // `connect` and a running `multicluster link` run for long and say what they do; the other
    // commands print their result.
    let default_log = match &cli.command {
        Command::Connect(a) => format!(
            "{},kube_client=off,rustls_platform_verifier=off",
            a.log_level
        ),
        Command::Multicluster(MulticlusterArgs {
            command: MulticlusterCommand::Link(l),
        }) if !l.once => "info,kube_client=off,rustls_platform_verifier=off".to_owned(),
        _ => DEFAULT_LOG.to_owned(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Plan(a) => plan(a),
        Command::Status(a) => status(a),
        Command::Graph(a) => graph(a),
        Command::Showconf(a) => showconf(a),
        Command::Peer(a) => peer(a),
        Command::RotateKey(a) => rotate_key(a),
        Command::Multicluster(a) => multicluster(a),
        Command::Connect(a) => connect(a),
        Command::Doctor(a) => doctor(a),
        Command::Completion { shell } => completion(shell),
        Command::Lab(a) => {
            if let Err(e) = lab(a) {
                match e {
                    // Already names the command.
                    LabError::NotRoot => eprintln!("{e}"),
                    _ => eprintln!("meshctl: {e}"),
                }
                std::process::exit(e.exit_code());
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        parse_from(std::iter::once("meshctl").chain(args.iter().copied()))
    }

    /// The parsed command line as text, to compare two spellings of one command.
    fn parsed(args: &[&str]) -> String {
        match parse(args) {
            Ok(cli) => format!("{cli:?}"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn mesh(cli: Cli) -> MeshArgs {
        match cli.command {
            Command::Plan(a) => a.mesh,
            Command::Graph(a) => a.mesh,
            Command::Showconf(a) => a.mesh,
            _ => panic!("not a mesh command"),
        }
    }

    #[test]
    fn command_definition_is_consistent() {
        command().debug_assert();
    }

    /// Each global flag with a value that differs from its default.
    const MESH_FLAGS: &[&[&str]] = &[
        &["--nodes", "n.yaml"],
        &["--nodes", "n.yaml", "--peers", "p.yaml"],
        &["--kubeconfig", "k"],
        &["--context", "c"],
        &["--request-timeout", "5"],
        &["--granularity", "full"],
        &["--subnet", "10.9.0.0/16"],
        &["--port", "51821"],
        &["--topology-label", "zone"],
        &["--encapsulate", "never"],
        &["--interface", "wg9"],
        &["--service-cidr", "10.96.0.0/12"],
    ];
    const CLUSTER_FLAGS: &[&[&str]] = &[
        &["--kubeconfig", "k"],
        &["--context", "c"],
        &["--request-timeout", "5"],
    ];

    /// `flag` before the subcommand, after its last argument, and (`command` being the path of
    /// subcommand names, `rest` what follows) right after the subcommand path all parse alike,
    /// and differently from the command without it.
    fn same_in_every_place(command: &[&str], rest: &[&str], flag: &[&str]) {
        let after = parsed(&[command, rest, flag].concat());
        let before = parsed(&[flag, command, rest].concat());
        let between = parsed(&[command, flag, rest].concat());
        assert_eq!(
            before, after,
            "{flag:?} before / after {command:?} {rest:?}"
        );
        assert_eq!(between, after, "{flag:?} inside {command:?} {rest:?}");
        assert_ne!(
            parsed(&[command, rest].concat()),
            after,
            "{flag:?} has no effect on {command:?}"
        );
    }

    #[test]
    fn mesh_flags_go_before_or_after_plan_graph_and_showconf() {
        for flag in MESH_FLAGS {
            same_in_every_place(&["plan"], &["--node", "fra-1"], flag);
            same_in_every_place(&["graph"], &["--node", "fra-1"], flag);
            same_in_every_place(&["showconf"], &["node", "fra-1"], flag);
            same_in_every_place(&["showconf"], &["peer", "laptop", "--as-peer"], flag);
        }
    }

    #[test]
    fn cluster_flags_go_before_or_after_every_peer_command() {
        let add = [
            "laptop",
            "--public-key",
            "k",
            "--allowed-ips",
            "10.5.0.1/32",
        ];
        for flag in CLUSTER_FLAGS {
            same_in_every_place(&["peer", "add"], &add, flag);
            same_in_every_place(&["peer", "list"], &[], flag);
            same_in_every_place(&["peer", "delete"], &["laptop"], flag);
        }
    }

    #[test]
    fn output_goes_before_or_after_every_command_that_takes_it() {
        let json = &["-o", "json"][..];
        same_in_every_place(&["plan"], &["--node", "fra-1"], json);
        same_in_every_place(&["plan"], &["--node", "fra-1"], &["--output=json"]);
        same_in_every_place(&["status"], &["--agent", "http://10.0.0.1:1107"], json);
        same_in_every_place(&["doctor"], &[], json);
        same_in_every_place(&["doctor"], &[], &["--encapsulate", "always"]);
        same_in_every_place(&["lab", "status"], &["node2"], json);
        same_in_every_place(
            &["showconf"],
            &["node", "fra-1", "--as-peer"],
            &["-o", "yaml"],
        );
    }

    #[test]
    fn the_briefs_four_spellings_are_one_command() {
        let want = parsed(&["plan", "--nodes", "F", "--node", "fra-1", "-o", "json"]);
        for args in [
            &["--nodes", "F", "plan", "--node", "fra-1", "-o", "json"][..],
            &["plan", "-o", "json", "--nodes", "F", "--node", "fra-1"][..],
            &["-o", "json", "--nodes", "F", "plan", "--node", "fra-1"][..],
        ] {
            assert_eq!(parsed(args), want, "{args:?}");
        }
        assert_eq!(
            parsed(&["showconf", "node", "fra-1", "--nodes", "F"]),
            parsed(&["--nodes", "F", "showconf", "node", "fra-1"])
        );
    }

    #[test]
    fn output_formats_are_the_subcommands_own_wherever_o_stands() {
        for args in [
            &["-o", "yaml", "plan", "--node", "a"][..],
            &["plan", "--node", "a", "-o", "yaml"][..],
            &["-o", "text", "showconf", "node", "a"][..],
            &["showconf", "node", "a", "-o", "text"][..],
            &["-o", "wireguard", "status"][..],
        ] {
            let e = parse(args).expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidValue, "{args:?}");
        }
    }

    #[test]
    fn a_global_flag_before_a_subcommand_without_it_is_refused() {
        for args in [
            &["--nodes", "n.yaml", "doctor"][..],
            &["--nodes", "n.yaml", "peer", "list"][..],
            &["--kubeconfig", "k", "status"][..],
            &["--kubeconfig", "k", "lab", "down"][..],
            &["-o", "json", "graph"][..],
            &["-o", "json", "peer", "list"][..],
            &["--nodes", "n.yaml", "completion", "bash"][..],
        ] {
            let e = parse(args).expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{args:?}");
        }
        // Flags that belong to one subcommand only stay after it, and the error says so.
        let e = parse(&["--node", "a", "plan"]).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::UnknownArgument);
        assert!(
            e.to_string()
                .contains("--node is an option of `plan`: put it after `plan`"),
            "{e}"
        );
        // Without a subcommand the global flags are parsed, and the subcommand is missing.
        let e = parse(&["--nodes", "n.yaml"]).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::MissingSubcommand);
    }

    #[test]
    fn nodes_conflicts_with_cluster_flags_in_every_placement() {
        for (command, rest) in [
            (&["plan"][..], &["--node", "a"][..]),
            (&["graph"][..], &[][..]),
            (&["showconf"][..], &["node", "a"][..]),
        ] {
            for flag in ["--kubeconfig", "--context"] {
                let nodes = &["--nodes", "n.yaml"][..];
                let cluster = &[flag, "x"][..];
                for args in [
                    [nodes, cluster, command, rest].concat(),
                    [command, rest, nodes, cluster].concat(),
                    [nodes, command, rest, cluster].concat(),
                    [cluster, command, nodes, rest].concat(),
                ] {
                    let e = parse(&args).expect_err("refused");
                    assert_eq!(e.kind(), ErrorKind::ArgumentConflict, "{args:?}");
                }
            }
        }
    }

    #[test]
    fn peers_needs_nodes_in_any_placement() {
        for args in [
            &["--peers", "p.yaml", "showconf", "peer", "x"][..],
            &["showconf", "peer", "x", "--peers", "p.yaml"][..],
        ] {
            let e = parse(args).expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument, "{args:?}");
        }
        let m = mesh(
            parse(&[
                "--peers", "p.yaml", "showconf", "peer", "x", "--nodes", "n.yaml",
            ])
            .expect("parses"),
        );
        assert_eq!(m.peers, Some(PathBuf::from("p.yaml")));
        assert_eq!(m.nodes, Some(PathBuf::from("n.yaml")));
    }

    #[test]
    fn lab_up_keeps_its_own_nodes_count() {
        let Command::Lab(l) = parse(&["lab", "up", "--nodes", "4"])
            .expect("parses")
            .command
        else {
            panic!("not lab");
        };
        let LabCommand::Up(up) = l.command else {
            panic!("not lab up");
        };
        assert_eq!(up.nodes, Some(4));
        let e = parse(&["lab", "up", "--nodes", "n.yaml"]).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn completion_takes_a_shell_and_help_names_it_and_the_global_flags() {
        let Command::Completion { shell } = parse(&["completion", "zsh"]).expect("parses").command
        else {
            panic!("not completion");
        };
        assert_eq!(shell, clap_complete::Shell::Zsh);
        let e = parse(&["completion", "tcsh"]).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        let help = command().render_long_help().to_string();
        for want in [
            "completion",
            "Global options",
            "--nodes <FILE>",
            "-o, --output",
        ] {
            assert!(help.contains(want), "{want} missing from:\n{help}");
        }
    }

    #[test]
    fn without_nodes_the_commands_read_the_cluster() {
        let m = mesh(parse(&["plan", "--node", "a"]).expect("parses"));
        assert_eq!(m.nodes, None);
        assert_eq!(m.cluster.kubeconfig, None);
        assert_eq!(m.cluster.request_timeout, 30);
        let m = mesh(parse(&["graph", "--kubeconfig", "k", "--context", "c"]).expect("parses"));
        assert_eq!(m.cluster.kubeconfig, Some(PathBuf::from("k")));
        assert_eq!(m.cluster.context.as_deref(), Some("c"));
    }

    #[test]
    fn kubeconfig_and_context_conflict_with_nodes() {
        for flag in ["--kubeconfig", "--context"] {
            let e = parse(&["plan", "--node", "a", "--nodes", "n.yaml", flag, "x"])
                .expect_err("refused");
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{flag}");
        }
    }

    #[test]
    fn peers_file_needs_nodes_file() {
        let e = parse(&["plan", "--node", "a", "--peers", "p.yaml"]).expect_err("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn cluster_flags_go_before_or_after_the_subcommand() {
        let m = mesh(parse(&["showconf", "peer", "laptop", "--kubeconfig", "k"]).expect("parses"));
        assert_eq!(m.cluster.kubeconfig, Some(PathBuf::from("k")));
        for args in [
            &["peer", "--kubeconfig", "k", "list"][..],
            &["peer", "list", "--kubeconfig", "k"][..],
        ] {
            let Command::Peer(p) = parse(args).expect("parses").command else {
                panic!("not peer");
            };
            assert_eq!(p.cluster.kubeconfig, Some(PathBuf::from("k")), "{args:?}");
        }
    }

    #[test]
    fn peer_add_splits_allowed_ips_and_requires_key_and_ips() {
        let Command::Peer(PeerArgs {
            command: PeerCommand::Add(a),
            ..
        }) = parse(&[
            "peer",
            "add",
            "laptop",
            "--public-key",
            "k",
            "--allowed-ips",
            "10.5.0.1/32,10.6.0.0/24",
            "--allowed-ips",
            "fd00::1",
            "--persistent-keepalive",
            "-1",
        ])
        .expect("parses")
        .command
        else {
            panic!("not peer add");
        };
        assert_eq!(a.allowed_ips, ["10.5.0.1/32", "10.6.0.0/24", "fd00::1"]);
        // Out of range, but for the agent's parser to report, with the flag's name.
        assert_eq!(a.persistent_keepalive, -1);
        assert!(!a.dry_run);
        for missing in [
            &["peer", "add", "x", "--public-key", "k"][..],
            &["peer", "add", "x", "--allowed-ips", "10.0.0.1/32"][..],
        ] {
            let e = parse(missing).expect_err("refused");
            assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        }
    }

    #[test]
    fn status_asks_this_machines_agent_unless_told_otherwise() {
        let Command::Status(a) = parse(&["status"]).expect("parses").command else {
            panic!("not status");
        };
        assert_eq!(a.agent, "http://127.0.0.1:1107");
        assert_eq!(a.timeout, 10);
        let Command::Status(a) = parse(&["status", "--agent", "http://10.0.0.1:9", "-o", "json"])
            .expect("parses")
            .command
        else {
            panic!("not status");
        };
        assert_eq!(a.agent, "http://10.0.0.1:9");
        assert!(matches!(a.output, PlanFormat::Json));
    }

    #[test]
    fn graph_views_exclude_each_other_and_doctor_peers_takes_its_own_flags() {
        let Command::Graph(g) = parse(&["graph", "--location", "hel"])
            .expect("parses")
            .command
        else {
            panic!("not graph");
        };
        assert_eq!(g.view.location.as_deref(), Some("hel"));
        for both in [
            &["graph", "--overview", "--focus", "a"][..],
            &["graph", "--focus", "a", "--location", "b"][..],
        ] {
            let e = parse(both).expect_err("refused");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{both:?}"
            );
        }
        let Command::Doctor(d) = parse(&[
            "doctor",
            "peers",
            "-o",
            "json",
            "--agent",
            "http://a:1107",
            "--port",
            "51821",
        ])
        .expect("parses")
        .command
        else {
            panic!("not doctor");
        };
        let Some(DoctorCommand::Peers(p)) = d.what else {
            panic!("not doctor peers");
        };
        assert!(matches!(p.output, PlanFormat::Json));
        assert_eq!((p.agent.as_str(), p.port), ("http://a:1107", 51821));
    }

    #[test]
    fn graph_agents_are_repeatable_and_need_live() {
        let Command::Graph(g) = parse(&[
            "graph",
            "--live",
            "--agent",
            "http://a:1107",
            "--agent",
            "http://b:1107",
        ])
        .expect("parses")
        .command
        else {
            panic!("not graph");
        };
        assert!(g.live);
        assert_eq!(g.agents, ["http://a:1107", "http://b:1107"]);
        let e = parse(&["graph", "--agent", "http://a:1107"]).expect_err("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn lab_status_takes_a_node_and_lab_graph_live() {
        let Command::Lab(l) = parse(&["lab", "status", "node2", "-o", "json"])
            .expect("parses")
            .command
        else {
            panic!("not lab");
        };
        let LabCommand::Status { node, .. } = l.command else {
            panic!("not lab status");
        };
        assert_eq!(node.as_deref(), Some("node2"));
        let Command::Lab(l) = parse(&["lab", "graph", "--live"]).expect("parses").command else {
            panic!("not lab");
        };
        assert!(matches!(l.command, LabCommand::Graph { live: true, .. }));
    }

    #[test]
    fn peer_add_request_reads_and_trims_the_preshared_key_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let psk = dir.path().join("psk");
        std::fs::write(&psk, "  c2VjcmV0\n").expect("write");
        let a = PeerAddArgs {
            name: "x".into(),
            public_key: "k".into(),
            allowed_ips: vec!["10.0.0.1/32".into()],
            endpoint: None,
            persistent_keepalive: 0,
            preshared_key_file: Some(psk),
            dry_run: true,
        };
        assert_eq!(
            a.request().expect("read").preshared_key.as_deref(),
            Some("c2VjcmV0")
        );
        let missing = PeerAddArgs {
            preshared_key_file: Some(dir.path().join("nope")),
            ..a
        };
        let e = missing.request().expect_err("no file");
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
    }
}
