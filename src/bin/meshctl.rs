//! `meshctl`: look at a wiremesh (or Kilo) mesh: what a node would program, the topology as a
//! picture, and WireGuard configs for outside machines.

/// mimalloc: faster than glibc malloc for the engine's many small allocations (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

use wiremesh::cli::plan::{DeviceNames, render_json, render_text};
use wiremesh::cli::{Inputs, auto_granularity, load};
use wiremesh::graph::{GraphOptions, render_dot, render_svg};
use wiremesh::lab::LabError;
use wiremesh::model::{Granularity, NodeName, WgKey};
use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::topology::{self, DEFAULT_INTERFACE, Encapsulate, MeshOptions};

/// Inspect a WireGuard mesh computed the way the wiremesh agent computes it.
#[derive(Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what the agent on one node would program: interface, peers, routes, rules.
    Plan(PlanArgs),
    /// Draw the mesh: locations, leaders, WireGuard tunnels (SVG or DOT).
    Graph(GraphArgs),
    /// Print the WireGuard (wg-quick) configuration for a node or an external peer.
    Showconf(ShowconfArgs),
    /// Check what this machine offers wiremesh: WireGuard, IPIP, firewall, CNI plugins.
    Doctor(DoctorArgs),
    /// Run a throw-away mesh on this machine in network namespaces (needs root).
    Lab(LabArgs),
}

/// Where the cluster comes from and how it is meshed.
#[derive(Args, Clone)]
struct MeshArgs {
    /// Nodes as `kubectl get nodes -o json|yaml` prints them.
    #[arg(long, value_name = "FILE")]
    nodes: PathBuf,
    /// External peers (Kilo `Peer` resources), JSON or YAML.
    #[arg(long, value_name = "FILE")]
    peers: Option<PathBuf>,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum GranularityArg {
    Auto,
    Location,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
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

#[derive(Args)]
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

#[derive(Clone, Copy, ValueEnum)]
enum PlanFormat {
    Json,
    Text,
}

#[derive(Args)]
struct GraphArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = GraphFormat::Svg)]
    format: GraphFormat,
    /// Highlight this node.
    #[arg(long)]
    node: Option<String>,
    /// Write to this file instead of stdout.
    #[arg(short = 'O', long = "out", value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Svg,
    Dot,
}

#[derive(Args)]
struct DoctorArgs {
    /// The encapsulation the agent will run with (IPIP is needed unless never).
    #[arg(long, value_enum, default_value_t = EncapArg::Never)]
    encapsulate: EncapArg,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
    output: PlanFormat,
}

#[derive(Args)]
struct ShowconfArgs {
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
    #[command(subcommand)]
    what: ShowconfWhat,
}

#[derive(Subcommand)]
enum ShowconfWhat {
    /// Configuration to run as node NAME.
    Node {
        /// The node's name.
        name: String,
    },
    /// Configuration for the external peer NAME (a laptop, another cluster).
    Peer {
        /// The peer's name.
        name: String,
    },
}

impl MeshArgs {
    fn load(&self) -> Result<Inputs> {
        load(&self.nodes, self.peers.as_deref(), &self.topology_label)
            .with_context(|| format!("reading {}", self.nodes.display()))
    }

    fn options(&self, inputs: &Inputs) -> MeshOptions {
        let granularity = match self.granularity {
            GranularityArg::Auto => auto_granularity(&inputs.nodes),
            GranularityArg::Location => Granularity::Location,
            GranularityArg::Full => Granularity::Full,
        };
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
    let mut plan = topology::compute(
        &inputs.nodes,
        &inputs.peers,
        &NodeName(args.node.clone()),
        &opts,
    )?;
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
    let topo = topology::build(&inputs.nodes, &inputs.peers, &opts);
    if let Some(n) = &args.node
        && topo.segment_of(&NodeName(n.clone())).is_none()
    {
        bail!("node {n} does not take part in the mesh");
    }
    let gopts = GraphOptions {
        local: args.node.map(NodeName),
        title: None,
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

fn doctor(args: DoctorArgs) -> Result<()> {
    let checks = wiremesh::doctor::run(args.encapsulate.into());
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
    let topo = topology::build(&inputs.nodes, &inputs.peers, &opts);
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
        let peer = match &args.what {
            ShowconfWhat::Node { name } => {
                sc::node_as_peer(&topo, &NodeName(name.clone()), &args.allowed_ips)?
            }
            ShowconfWhat::Peer { name } => {
                sc::peer_as_peer(&topo, &NodeName(name.clone()), &args.allowed_ips)?
            }
        };
        sc::render_peer(&peer, format)?
    } else {
        if args.output != "wireguard" || !args.allowed_ips.is_empty() {
            bail!("--output and --allowed-ips only apply with --as-peer");
        }
        match &args.what {
            ShowconfWhat::Node { name } => {
                sc::node_config(&topo, &NodeName(name.clone()), &opts, private_key.as_ref())?
            }
            ShowconfWhat::Peer { name } => {
                sc::peer_config(&topo, &NodeName(name.clone()), &opts, private_key.as_ref())?
            }
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// Which lab, and where its state lives.
#[derive(Args)]
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

#[derive(Subcommand)]
enum LabCommand {
    /// Create the lab: underlay, NAT, node namespaces, keys, nodes file, agents, pods.
    ///
    /// Without flags it mirrors examples/three-clouds.yaml (three nodes, full mesh, the last
    /// one behind NAT).
    Up(LabUpArgs),
    /// Show nodes, agents, pods and WireGuard peers with handshakes.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Ping every pod from every pod and prove the underlay carries only WireGuard.
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
        /// Highlight this node.
        #[arg(long)]
        node: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(short = 'O', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Remove every namespace, process and file of the lab (also after a failed `up`).
    Down,
}

#[derive(Args)]
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
    /// Build underlay, NAT, keys and files only: no agents, no pods (a debugging aid).
    #[arg(long)]
    no_agents: bool,
    /// The wiremesh binary to run as agent; default: the one next to meshctl.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Extra argument for every agent (repeatable).
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Seconds to wait for the agents' CNI configuration.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum GranularityChoice {
    Location,
    Full,
}

fn lab_up(name: wiremesh::lab::LabName, root: PathBuf, a: LabUpArgs) -> Result<(), LabError> {
    use wiremesh::lab::spec::{Source, SpecOptions, THREE_CLOUDS, THREE_CLOUDS_NAME};
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
        },
        agents: !a.no_agents,
        agent_binary: a.agent,
        agent_args: a.agent_args,
        timeout: std::time::Duration::from_secs(a.timeout),
    };
    let state = wiremesh::lab::up::up(&opts)?;
    println!("{}", wiremesh::lab::up::summary(&state));
    Ok(())
}

/// `meshctl lab …`; errors carry their exit code.
fn lab(args: LabArgs) -> Result<(), LabError> {
    use wiremesh::lab::{self as l, GraphFormat as G};
    // Every lab command needs root; say so before anything else.
    l::sys::require_root()?;
    let name: l::LabName = args.name.parse()?;
    match args.command {
        LabCommand::Up(a) => lab_up(name, args.root, a),
        LabCommand::Status { output } => {
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
        LabCommand::Graph { format, node, out } => {
            let state = l::load(&args.root, &name)?;
            let format = match format {
                GraphFormat::Svg => G::Svg,
                GraphFormat::Dot => G::Dot,
            };
            let (text, warnings) = l::graph(&state, format, node.as_deref())?;
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

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(a) => plan(a),
        Command::Graph(a) => graph(a),
        Command::Showconf(a) => showconf(a),
        Command::Doctor(a) => doctor(a),
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
