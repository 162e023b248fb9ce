//! `wiremesh`: the node agent (one per node, DaemonSet, host network), `wiremesh cleanup`, and
//! `wiremesh completion` (a shell completion script). The flags `agent` and `cleanup` share
//! ([`KERNEL_FLAGS`]) may stand before or after the subcommand.

/// mimalloc: faster than glibc malloc for the engine's many small allocations (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use ipnetwork::IpNetwork;

use wiremesh::agent::http::DEFAULT_LISTEN;
use wiremesh::agent::{AgentConfig, FileRegistry, KernelConfig, RegistryConfig};
use wiremesh::cli::args::with_leading;
use wiremesh::model::{Granularity, NodeName};
use wiremesh::reconcile::mtu::MIN_MTU_IPV4;
use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::registry::cluster::ClientOptions;
use wiremesh::topology::{
    DEFAULT_BRIDGE, DEFAULT_INTERFACE, DEFAULT_PORT, DEFAULT_SUBNET, Encapsulate, MeshOptions,
};

/// The wiremesh node agent: keeps this node's WireGuard mesh, routes, CNI bridge and
/// masquerading in line with the cluster.
///
/// The global options may come before or after the subcommand (`wiremesh --interface wg0
/// agent` = `wiremesh agent --interface wg0`).
#[derive(Parser, Debug)]
#[command(name = "wiremesh", version, about)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    #[arg(
        long,
        global = true,
        env = "WIREMESH_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent on this node until SIGTERM or SIGINT.
    Agent(Box<AgentArgs>),
    /// Remove everything wiremesh created on this node (interface, routes, rules, bridge,
    /// firewall table, CNI config) and nothing else, and put back the forwarding sysctls the
    /// agent turned on. Refuses, touching nothing, when a named interface, bridge or CNI file is
    /// not wiremesh's.
    Cleanup(CleanupArgs),
    /// Print a shell completion script to stdout (`source <(wiremesh completion bash)`).
    Completion {
        /// The shell: bash, zsh or fish (also elvish, powershell).
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The flags of the kernel side, the same in `agent` and `cleanup` (long names): they may also
/// come before the subcommand, which [`parse_from`] moves them after.
const KERNEL_FLAGS: &[&str] = &[
    "interface",
    "bridge",
    "wireguard",
    "wireguard-userspace",
    "firewall",
    "cni-config",
];

/// The command line: the derived definition, plus the kernel flags at the top level for
/// `--help` and the completion scripts.
fn command() -> clap::Command {
    with_leading(Cli::command(), KERNEL_FLAGS, "Global options")
}

/// Parse `args` (program name first), with the kernel flags before or after the subcommand.
fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    wiremesh::cli::args::parse(command(), KERNEL_FLAGS, args)
}

/// Options of the kernel side, shared by `agent` and `cleanup`.
#[derive(Args, Clone, Debug)]
struct KernelArgs {
    /// WireGuard interface name.
    #[arg(long, env = "WIREMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    interface: String,
    /// CNI bridge name.
    #[arg(long, env = "WIREMESH_BRIDGE", default_value = DEFAULT_BRIDGE)]
    bridge: String,
    /// WireGuard implementation: the kernel module, a userspace daemon, or auto (kernel when the
    /// module is there).
    #[arg(long, env = "WIREMESH_WIREGUARD", default_value = "auto", value_parser = ["auto", "kernel", "userspace"])]
    wireguard: String,
    /// Userspace WireGuard program, used when the kernel has no WireGuard module.
    #[arg(
        long,
        env = "WG_USERSPACE_IMPLEMENTATION",
        default_value = "wireguard-go"
    )]
    wireguard_userspace: String,
    /// Firewall used for masquerading: nftables, iptables, or auto (nftables when present).
    #[arg(long, env = "WIREMESH_FIREWALL", default_value = "auto", value_parser = ["auto", "nftables", "iptables"])]
    firewall: String,
    /// Where to write the CNI config (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d/10-wiremesh.conflist).
    #[arg(
        long,
        alias = "cni-path",
        env = "WIREMESH_CNI_CONFIG",
        default_value = "/etc/cni/net.d/10-wiremesh.conflist"
    )]
    cni_config: PathBuf,
}

#[derive(Args, Debug)]
struct CleanupArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// The agent's private key file: the record of what the agent changed on the host
    /// (forwarding sysctls, the private interface) is read from its directory. The key itself is
    /// not read.
    #[arg(
        long,
        env = "WIREMESH_PRIVATE_KEY",
        default_value = "/var/lib/wiremesh/key"
    )]
    private_key: PathBuf,
}

#[derive(Args, Debug)]
struct AgentArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// Name of this node (defaults to the host name).
    #[arg(long, env = "WIREMESH_HOSTNAME")]
    hostname: Option<String>,
    /// Kubeconfig file. Without it: `KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// ServiceAccount (the DaemonSet's case).
    #[arg(
        long,
        env = "WIREMESH_KUBECONFIG",
        value_name = "FILE",
        conflicts_with = "nodes"
    )]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long, env = "WIREMESH_CONTEXT", conflicts_with = "nodes")]
    context: Option<String>,
    /// Read nodes from this file instead of Kubernetes (as `kubectl get nodes -o yaml` prints
    /// them); watched for changes. Nothing is published.
    #[arg(long, env = "WIREMESH_NODES", value_name = "FILE")]
    nodes: Option<PathBuf>,
    /// Read external peers (Kilo `Peer` resources) from this file; watched for changes.
    #[arg(long, env = "WIREMESH_PEERS", value_name = "FILE", requires = "nodes")]
    peers: Option<PathBuf>,
    /// This node's WireGuard private key; generated (mode 0600) when missing.
    #[arg(
        long,
        env = "WIREMESH_PRIVATE_KEY",
        default_value = "/var/lib/wiremesh/key"
    )]
    private_key: PathBuf,
    /// Mesh granularity: location (one tunnel endpoint per location) or full.
    #[arg(long, alias = "mesh-granularity", env = "WIREMESH_GRANULARITY", default_value = "location", value_parser = ["location", "full"])]
    granularity: String,
    /// Subnet for WireGuard mesh IPs.
    #[arg(long, env = "WIREMESH_SUBNET", default_value = DEFAULT_SUBNET)]
    subnet: IpNetwork,
    /// WireGuard listen port when this node's endpoint does not say.
    #[arg(long, env = "WIREMESH_PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// IPIP encapsulation between nodes of one location: never, crosssubnet or always (Kilo's
    /// default; needs the ipip module, see `meshctl doctor`).
    #[arg(long, env = "WIREMESH_ENCAPSULATE", default_value = "always", value_parser = ["never", "crosssubnet", "always"])]
    encapsulate: String,
    /// WireGuard MTU, also given to pods: a number (576 to 65535), or auto: the MTU of the
    /// interface traffic to this node's endpoint leaves by, minus WireGuard's overhead (60 bytes
    /// for an IPv4 endpoint, 80 otherwise).
    #[arg(long, env = "WIREMESH_MTU", default_value = "auto")]
    mtu: String,
    /// Clamp the MSS of TCP SYNs forwarded into or out of the WireGuard interface to the
    /// route's MTU (own firewall table), so a smaller path further on never stalls TCP.
    #[arg(long, env = "WIREMESH_MSS_CLAMP", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    mss_clamp: bool,
    /// Node label that gives the location when no location annotation is set.
    #[arg(long, env = "WIREMESH_TOPOLOGY_LABEL", default_value = DEFAULT_TOPOLOGY_LABEL)]
    topology_label: String,
    /// Do not manage the CNI bridge, CNI config or pod masquerading.
    #[arg(long, env = "WIREMESH_NO_CNI")]
    no_cni: bool,
    /// Service CIDRs, never masqueraded (repeatable).
    #[arg(
        long = "service-cidr",
        env = "WIREMESH_SERVICE_CIDRS",
        value_delimiter = ','
    )]
    service_cidrs: Vec<IpNetwork>,
    /// The ranges a node's allowed-location-ips must lie in (comma-separated CIDRs); an entry
    /// outside them is ignored with a diagnostic. Default: the private ranges 10/8, 172.16/12,
    /// 192.168/16, 100.64/10 and fc00::/7. `0.0.0.0/0,::/0` allows any range, as Kilo does.
    #[arg(
        long = "allowed-location-ips-within",
        env = "WIREMESH_ALLOWED_LOCATION_IPS_WITHIN",
        value_name = "CIDR,...",
        value_delimiter = ',',
        default_values_t = wiremesh::topology::claims::default_allowed_location_ips_within()
    )]
    allowed_location_ips_within: Vec<IpNetwork>,
    /// How often this node's last-seen heartbeat is published (Kubernetes registry), at most
    /// 30s. Every agent, as Kilo's, leaves out a node whose heartbeat is 60 s old, but only
    /// once its own view of the API has been up for 60 s plus the longest publishing retry
    /// (an API-server outage never makes nodes stale).
    #[arg(long, env = "WIREMESH_CHECK_IN_PERIOD", default_value = "30s", value_parser = parse_check_in)]
    check_in_period: Duration,
    /// Leader failover (location granularity, Kubernetes registry): how long a leader found not
    /// forwarding is passed over at first (doubled each time it is found broken again within
    /// 15 minutes, up to 16 times); `off` turns the probe off (Kilo's leader, always).
    #[arg(long, env = "WIREMESH_FAILOVER_HOLD", value_name = "DURATION|off", default_value = "60s", value_parser = parse_failover_hold)]
    failover_hold: FailoverHold,
    /// How often to compare the kernel with the desired state even without changes.
    #[arg(long, env = "WIREMESH_RESYNC_PERIOD", default_value = "30s", value_parser = parse_period)]
    resync_period: Duration,
    /// Where to serve /metrics (Prometheus), /healthz, /readyz and /status (JSON): an address
    /// and port (`:1107` is every address, as in Kilo), or `off`.
    #[arg(long, env = "WIREMESH_LISTEN", value_name = "ADDR|off", default_value = DEFAULT_LISTEN, value_parser = parse_listen)]
    listen: Listen,
}

/// The `--listen` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listen(Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    // Kilo's `:1107`: every address.
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_owned(),
    };
    full.parse::<SocketAddr>()
        .map(|a| Listen(Some(a)))
        .map_err(|_| {
            format!("{s:?} is not an address and port (127.0.0.1:1107, [::]:1107, :1107) or off")
        })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long")),
        _ => Err(format!("{s:?} is not a duration like 30s, 500ms or 5m")),
    }
}

/// `--mtu`: `auto` (`None`), or a number from [`MIN_MTU_IPV4`] to 65535.
fn parse_mtu(s: &str) -> Result<Option<u32>, String> {
    if s == "auto" {
        return Ok(None);
    }
    s.parse::<u32>()
        .ok()
        .filter(|m| (MIN_MTU_IPV4..=65535).contains(m))
        .map(Some)
        .ok_or_else(|| format!("--mtu {s:?} is not auto or a number from {MIN_MTU_IPV4} to 65535"))
}

/// A period of something the agent repeats: above 0 (a zero period would spin).
fn parse_period(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: a period must be above 0"));
    }
    Ok(d)
}

/// The `--failover-hold` value: `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FailoverHold(Option<Duration>);

fn parse_failover_hold(s: &str) -> Result<FailoverHold, String> {
    if s == "off" {
        return Ok(FailoverHold(None));
    }
    let d = parse_duration(s)?;
    if d < Duration::from_secs(5) {
        return Err(format!(
            "{s:?}: the failover hold must be at least 5s (or off): shorter, a leader that is \
             still broken comes back before the probe can tell"
        ));
    }
    Ok(FailoverHold(Some(d)))
}

fn parse_check_in(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(30) {
        return Err(format!(
            "{s:?}: the check-in period must be above 0 and at most 30s (other nodes leave out a \
             node whose heartbeat is 60 s old)"
        ));
    }
    Ok(d)
}

impl KernelArgs {
    fn config(&self) -> KernelConfig {
        KernelConfig {
            interface: self.interface.clone(),
            bridge: self.bridge.clone(),
            wireguard: self.wireguard.clone(),
            wireguard_userspace: self.wireguard_userspace.clone(),
            firewall: self.firewall.clone(),
            cni_config: self.cni_config.clone(),
        }
    }
}

fn hostname() -> Result<String> {
    let h = nix::unistd::gethostname().context("reading the host name")?;
    Ok(h.to_string_lossy().into_owned())
}

fn agent_config(a: AgentArgs) -> Result<AgentConfig> {
    let node = match a.hostname {
        Some(h) => h,
        None => hostname()?,
    };
    let mtu = parse_mtu(&a.mtu).map_err(anyhow::Error::msg)?;
    Ok(AgentConfig {
        node: NodeName(node),
        registry: match a.nodes {
            Some(nodes) => RegistryConfig::File(FileRegistry {
                nodes,
                peers: a.peers,
            }),
            None => RegistryConfig::Kubernetes(ClientOptions {
                kubeconfig: a.kubeconfig,
                context: a.context,
            }),
        },
        check_in_period: a.check_in_period,
        failover_hold: a.failover_hold.0,
        private_key: a.private_key,
        topology_label: a.topology_label,
        resync_period: a.resync_period,
        kernel: a.kernel.config(),
        mesh: MeshOptions {
            granularity: a
                .granularity
                .parse::<Granularity>()
                .map_err(anyhow::Error::msg)?,
            subnet: a.subnet,
            port: a.port,
            interface: a.kernel.interface.clone(),
            bridge: a.kernel.bridge.clone(),
            encapsulate: a
                .encapsulate
                .parse::<Encapsulate>()
                .map_err(anyhow::Error::msg)?,
            local_routes: true,
            cni: !a.no_cni,
            now: None,
            mtu,
            mss_clamp: a.mss_clamp,
            service_cidrs: a.service_cidrs,
            allowed_location_ips_within: a.allowed_location_ips_within,
        },
        listen: a.listen.0,
    })
}

/// The log filter for `level`. kube's client logs every refused connection at ERROR, which
/// floods the log during an API-server outage that the agent already reports once; it is off
/// unless the filter names it.
fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    Ok(if level.contains("kube_client") {
        f
    } else {
        f.add_directive(
            "kube_client::client::builder=off"
                .parse()
                .map_err(|e| format!("{e}"))?,
        )
    })
}

/// No transparent huge pages for this process (and the wireguard-go it starts). mimalloc asks
/// for them (`MADV_HUGEPAGE`) on its segments, so on a host with THP at `madvise` or `always`
/// every 2 MiB region it touches becomes resident whole. Measured with 5,000 nodes in full
/// granularity (`examples/scale_load.rs`): 39 MiB resident when converged instead of 33, a
/// peak of 50 instead of 41. The agent gains nothing from huge pages. Failure only costs
/// memory, so it is ignored.
fn disable_transparent_huge_pages() {
    let _ = nix::sys::prctl::set_thp_disable(true);
}

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`, which mimalloc keeps
/// stable; libmimalloc-sys names only older options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory the agent frees goes back to the system at once, with the Kubernetes registry (the
/// DaemonSet). mimalloc returns a freed page 10 ms later, but only when it touches that memory
/// again, so an agent that goes idle after a burst or after its first programming kept it all.
/// Measured with 5,000 nodes in full granularity (`examples/scale_load.rs`): 34 MiB resident
/// when converged instead of 53, a peak of 43 instead of 56 under 1,000 changes/s, for 60 µs
/// more CPU per change. Not with files: the file registry re-reads and parses the whole file
/// on every change, and returning those pages at once cost 1.3 ms per change at 1,000 nodes
/// (`examples/convergence_bench.rs`). `MIMALLOC_PURGE_DELAY`, when set, wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer option of the allocator; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn main() {
    disable_transparent_huge_pages();
    let cli = parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    if let Command::Completion { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command(), "wiremesh", &mut script);
        if let Err(e) = std::io::stdout().write_all(&script) {
            eprintln!("wiremesh: writing the completion script: {e}");
            std::process::exit(1);
        }
        return;
    }
    let filter = match log_filter(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --log-level {:?}: {e}", cli.log_level);
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command {
                    Command::Agent(a) => {
                        if a.nodes.is_none() {
                            return_freed_memory_at_once();
                        }
                        let cfg = agent_config(*a)?;
                        wiremesh::agent::run(cfg, shutdown_signal()).await?;
                        Ok(())
                    }
                    Command::Cleanup(c) => {
                        let state = wiremesh::agent::state_dir(&c.private_key);
                        wiremesh::agent::cleanup(&c.kernel.config(), Some(state)).await?;
                        Ok(())
                    }
                    Command::Completion { .. } => Ok(()),
                }
            })
        });
    if let Err(e) = result {
        eprintln!("wiremesh: {e:#}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_or_overflowing_period_is_refused_with_a_clear_error() {
        assert_eq!(parse_period("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_period("5m"), Ok(Duration::from_secs(300)));
        for bad in ["0s", "0", "0ms", "0m"] {
            assert!(parse_period(bad).unwrap_err().contains("above 0"), "{bad}");
        }
        assert!(
            parse_duration("307445734561825861m")
                .unwrap_err()
                .contains("too long")
        );
        let Err(e) = parse_from([
            "wiremesh",
            "agent",
            "--hostname",
            "n",
            "--resync-period",
            "0s",
        ]) else {
            panic!("--resync-period 0s accepted");
        };
        assert!(e.to_string().contains("above 0"), "{e}");
    }

    #[test]
    fn mtu_is_auto_or_a_number_an_ipv4_link_can_carry() {
        assert_eq!(parse_mtu("auto"), Ok(None));
        assert_eq!(parse_mtu("1280"), Ok(Some(1280)));
        assert_eq!(parse_mtu("576"), Ok(Some(576)));
        assert_eq!(parse_mtu("65535"), Ok(Some(65535)));
        for bad in ["575", "0", "65536", "1420 ", "AUTO", ""] {
            let e = parse_mtu(bad).unwrap_err();
            assert!(
                e.contains("not auto or a number from 576 to 65535"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn mss_clamp_is_on_by_default_and_takes_false() {
        let parsed = |extra: &[&str]| {
            let mut args = vec!["wiremesh", "agent"];
            args.extend_from_slice(extra);
            let cli = parse_from(args).unwrap();
            let Command::Agent(a) = cli.command else {
                panic!("not agent")
            };
            a.mss_clamp
        };
        assert!(parsed(&[]));
        assert!(!parsed(&["--mss-clamp", "false"]));
        assert!(parsed(&["--mss-clamp", "true"]));
    }

    #[test]
    fn failover_hold_is_off_or_at_least_five_seconds() {
        assert_eq!(parse_failover_hold("off"), Ok(FailoverHold(None)));
        assert_eq!(
            parse_failover_hold("2m"),
            Ok(FailoverHold(Some(Duration::from_secs(120))))
        );
        assert!(
            parse_failover_hold("4s")
                .unwrap_err()
                .contains("at least 5s")
        );
        assert!(parse_failover_hold("soon").is_err());
    }

    #[test]
    fn check_in_period_is_bounded_by_the_staleness_threshold() {
        assert_eq!(parse_check_in("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_check_in("30s"), Ok(Duration::from_secs(30)));
        for bad in ["31s", "1m", "0s"] {
            let e = parse_check_in(bad).unwrap_err();
            assert!(e.contains("at most 30s"), "{bad}: {e}");
        }
    }

    #[test]
    fn listen_takes_an_address_kilos_port_form_or_off() {
        assert_eq!(
            parse_listen(DEFAULT_LISTEN),
            Ok(Listen(Some("0.0.0.0:1107".parse().unwrap())))
        );
        assert_eq!(
            parse_listen(":9000"),
            Ok(Listen(Some("0.0.0.0:9000".parse().unwrap())))
        );
        assert_eq!(
            parse_listen("[::1]:1107"),
            Ok(Listen(Some("[::1]:1107".parse().unwrap())))
        );
        assert_eq!(parse_listen("off"), Ok(Listen(None)));
        for bad in ["1107", "localhost:1107", ":x", ""] {
            let e = parse_listen(bad).unwrap_err();
            assert!(e.contains("or off"), "{bad}: {e}");
        }
        let cli = parse_from(["wiremesh", "agent", "--listen", "off"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(a.listen, Listen(None));
    }

    #[test]
    fn freed_memory_is_returned_without_delay() {
        // The option's default (10 ms) sits at the position this binary sets.
        // SAFETY: reads one integer option of the allocator.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        assert_eq!(default, 10);
        return_freed_memory_at_once();
        // SAFETY: as above.
        let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(now, 0);
    }

    #[test]
    fn transparent_huge_pages_are_off_for_the_agent() {
        disable_transparent_huge_pages();
        assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(true));
    }

    #[test]
    fn command_definition_is_consistent() {
        command().debug_assert();
    }

    /// The parsed subcommand as text, to compare two spellings of one command.
    fn parsed(args: &[&str]) -> String {
        match parse_from(std::iter::once("wiremesh").chain(args.iter().copied())) {
            Ok(cli) => format!("{:?}", cli.command),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn kernel_flags_go_before_or_after_agent_and_cleanup() {
        for flag in [
            &["--interface", "wg9"][..],
            &["--bridge", "br9"],
            &["--wireguard", "userspace"],
            &["--wireguard-userspace", "boringtun"],
            &["--firewall", "iptables"],
            &["--cni-config", "/tmp/x.conflist"],
        ] {
            for (command, rest) in [
                (&["agent"][..], &["--nodes", "n.yaml"][..]),
                (&["cleanup"], &[]),
            ] {
                let after = parsed(&[command, rest, flag].concat());
                assert_eq!(parsed(&[flag, command, rest].concat()), after, "{flag:?}");
                assert_ne!(parsed(&[command, rest].concat()), after, "{flag:?}");
            }
        }
        // Behind the real global flag `--log-level` too.
        assert_eq!(
            parsed(&["--log-level", "debug", "--interface", "wg9", "cleanup"]),
            parsed(&["cleanup", "--interface", "wg9"])
        );
        // Agent-only flags stay after `agent`; `completion` takes no kernel flag.
        for args in [
            &["--nodes", "n.yaml", "agent"][..],
            &["--interface", "wg9", "completion", "bash"],
        ] {
            let e = parse_from(std::iter::once("wiremesh").chain(args.iter().copied()))
                .expect_err("refused");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{args:?}"
            );
        }
    }

    #[test]
    fn log_filter_silences_kube_connection_errors_unless_asked_for() {
        let f = log_filter("info").unwrap().to_string();
        assert!(f.contains("kube_client::client::builder=off"), "{f}");
        let f = log_filter("info,kube_client=debug").unwrap().to_string();
        assert!(!f.contains("builder=off"), "{f}");
        assert!(log_filter("info,=[").is_err());
    }
}
