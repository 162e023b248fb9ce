//! Who holds a UDP port: the WireGuard listen port the agent wants may be taken by a WireGuard
//! interface another program left behind (Kilo's `kg` leaves `kilo0` and its port 51820 when it
//! stops: its `--clean-up-interface` defaults to false), by a userspace WireGuard daemon, or by
//! any other socket. The agent cannot configure its device then, and says precisely what to
//! remove. Nothing here changes anything: a foreign interface is never ours to delete.
//!
//! The holder is found, first match:
//! 1. a kernel WireGuard link other than ours whose listen port is the port (over netlink, by
//!    `wireguard-control`): the kernel, not a process, holds its socket;
//! 2. a socket bound to the port in `/proc/net/udp` or `/proc/net/udp6` (this network
//!    namespace), mapped by its inode to the process holding it through `/proc/PID/fd`; a
//!    process whose last argument names a link of its namespace (`wireguard-go kilo0`) is the
//!    userspace daemon of that interface;
//! 3. such a socket that no visible process holds (a kernel socket, or a process in another PID
//!    namespace).
//!
//! The parsing and the naming are pure; [`find_port_holder`] reads netlink and `/proc`. Depends
//! on `wireguard-control` and the standard library only.

use std::fmt;
use std::fs;

use wireguard_control::{Backend, Device};

/// Kilo's WireGuard interfaces are named `kilo<N>` (`kilo0` by default).
pub const KILO_PREFIX: &str = "kilo";

/// Whether `name` is an interface name Kilo gives its WireGuard interface.
pub fn is_kilo(name: &str) -> bool {
    name.starts_with(KILO_PREFIX)
}

/// One UDP socket of `/proc/net/udp` or `/proc/net/udp6`: its bound port and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSocket {
    /// The local (bound) port.
    pub port: u16,
    /// The socket's inode (`socket:[INODE]` in `/proc/PID/fd`); 0 for a socket without one.
    pub inode: u64,
}

/// The sockets of a `/proc/net/udp` or `/proc/net/udp6` table (header line skipped, lines that
/// do not parse ignored).
pub fn parse_proc_net_udp(text: &str) -> Vec<UdpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            let local = cols.get(1)?;
            let (_, port) = local.rsplit_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let inode = cols.get(9)?.parse().ok()?;
            Some(UdpSocket { port, inode })
        })
        .collect()
}

/// What holds a UDP port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortHolder {
    /// A kernel WireGuard interface (not ours) listening on the port.
    WireGuardLink {
        /// The interface's name.
        name: String,
    },
    /// A process holding a socket bound to the port.
    Process {
        /// Its PID.
        pid: u32,
        /// Its command name (`/proc/PID/comm`).
        command: String,
        /// The interface it serves, when its last argument names a link of its namespace (a
        /// userspace WireGuard daemon such as `wireguard-go kilo0`).
        interface: Option<String>,
    },
    /// A socket bound to the port that no visible process holds.
    Socket {
        /// The socket's inode.
        inode: u64,
    },
}

impl PortHolder {
    /// The interface behind the holder, if it is one.
    pub fn interface(&self) -> Option<&str> {
        match self {
            PortHolder::WireGuardLink { name } => Some(name),
            PortHolder::Process { interface, .. } => interface.as_deref(),
            PortHolder::Socket { .. } => None,
        }
    }

    /// Whether Kilo left it: the interface is named `kilo*`.
    pub fn is_kilo(&self) -> bool {
        self.interface().is_some_and(is_kilo)
    }

    /// A few words naming it, for a metric label or a table cell: `interface kilo0`,
    /// `process wireguard-go (pid 42)`, `socket inode 1234`.
    pub fn short(&self) -> String {
        match self {
            PortHolder::WireGuardLink { name } => format!("interface {name}"),
            PortHolder::Process { pid, command, .. } => format!("process {command} (pid {pid})"),
            PortHolder::Socket { inode } => format!("socket inode {inode}"),
        }
    }
}

/// A UDP port and what holds it; displays as one line saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConflict {
    /// The port.
    pub port: u16,
    /// What holds it.
    pub holder: PortHolder,
}

impl fmt::Display for PortConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = self.port;
        write!(f, "UDP port {port} is held by ")?;
        match &self.holder {
            PortHolder::WireGuardLink { name } => write!(f, "WireGuard interface {name}")?,
            PortHolder::Process {
                pid,
                command,
                interface: Some(i),
            } => write!(f, "process {command} (pid {pid}) of interface {i}")?,
            PortHolder::Process { pid, command, .. } => write!(f, "process {command} (pid {pid})")?,
            PortHolder::Socket { inode } => write!(
                f,
                "a socket (inode {inode}) of no process visible here (a kernel socket or a \
                 process in another PID namespace: `ss -ulpne sport = :{port}` shows it)"
            )?,
        }
        match (self.holder.interface(), &self.holder) {
            (Some(i), _) if is_kilo(i) => write!(
                f,
                " (left by Kilo: remove it with `ip link del {i}` after stopping kg)"
            ),
            (Some(i), _) => write!(
                f,
                " (not wiremesh's: remove it with `ip link del {i}`, or run wiremesh with another --port)"
            ),
            (None, PortHolder::Process { .. }) => {
                write!(f, " (stop it, or run wiremesh with another --port)")
            }
            (None, _) => write!(f, " (free it, or run wiremesh with another --port)"),
        }
    }
}

/// What holds UDP `port` in this network namespace besides the WireGuard interface `ours`
/// (its kernel link or its userspace daemon); `None` when the port is free or ours. Reads
/// netlink and `/proc`; what cannot be read is skipped.
pub fn find_port_holder(port: u16, ours: &str) -> Option<PortHolder> {
    if let Ok(links) = Device::list(Backend::Kernel) {
        for name in links {
            let Ok(dev) = Device::get(&name, Backend::Kernel) else {
                continue;
            };
            if dev.listen_port == Some(port) {
                let name = name.as_str_lossy().into_owned();
                if name == ours {
                    return None;
                }
                return Some(PortHolder::WireGuardLink { name });
            }
        }
    }
    let inodes: Vec<u64> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .flat_map(|t| parse_proc_net_udp(&t))
        .filter(|s| s.port == port)
        .map(|s| s.inode)
        .collect();
    let mut unowned = None;
    for inode in inodes {
        match process_of_socket(inode) {
            Some(PortHolder::Process {
                interface: Some(i), ..
            }) if i == ours => return None,
            Some(p) => return Some(p),
            None => {
                unowned.get_or_insert(PortHolder::Socket { inode });
            }
        }
    }
    unowned
}

/// The process holding the socket of `inode`, named (lowest PID first), if one is visible.
fn process_of_socket(inode: u64) -> Option<PortHolder> {
    if inode == 0 {
        return None;
    }
    let target = format!("socket:[{inode}]");
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let pid = pids.into_iter().find(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == target.as_str()))
        })
    })?;
    let command = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let links = fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|t| parse_proc_net_dev(&t))
        .unwrap_or_default();
    Some(PortHolder::Process {
        pid,
        command,
        interface: served_interface(&cmdline, &links),
    })
}

/// The interface a process serves: its last argument (of the NUL-separated `cmdline`), when it
/// names one of `links`.
pub fn served_interface(cmdline: &[u8], links: &[String]) -> Option<String> {
    let last = cmdline
        .split(|b| *b == 0)
        .rfind(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())?;
    links.contains(&last).then_some(last)
}

/// The interface names of a `/proc/net/dev` table.
pub fn parse_proc_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .collect()
}

/// The links of this network namespace named like Kilo's interfaces (`kilo*`), from
/// `/proc/net/dev`: a leftover `kilo0` keeps its address in the mesh subnet (and the route of
/// that subnet) even when its port differs from ours.
pub fn kilo_links() -> Vec<String> {
    fs::read_to_string("/proc/net/dev")
        .map(|t| parse_proc_net_dev(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|n| is_kilo(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 40123 2 0000000000000000 0
  200: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 0 2 0000000000000000 0
  bad line
";

    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   77: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 40124 2 0000000000000000 0
";

    #[test]
    fn proc_net_udp_gives_ports_and_inodes_of_v4_and_v6_and_skips_bad_lines() {
        assert_eq!(
            parse_proc_net_udp(UDP),
            vec![
                UdpSocket {
                    port: 51820,
                    inode: 40123
                },
                UdpSocket { port: 53, inode: 0 },
            ]
        );
        assert_eq!(
            parse_proc_net_udp(UDP6),
            vec![UdpSocket {
                port: 51820,
                inode: 40124
            }]
        );
        assert!(parse_proc_net_udp("").is_empty());
    }

    #[test]
    fn proc_net_dev_gives_interface_names() {
        let dev = "Inter-|   Receive                            |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
 kilo0:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
";
        assert_eq!(parse_proc_net_dev(dev), vec!["lo", "kilo0"]);
    }

    #[test]
    fn the_served_interface_is_the_last_argument_naming_a_link() {
        let links = vec!["lo".to_owned(), "kilo0".to_owned()];
        assert_eq!(
            served_interface(b"wireguard-go\0-f\0kilo0\0", &links),
            Some("kilo0".into())
        );
        assert_eq!(served_interface(b"socat\0UDP-LISTEN:51820\0", &links), None);
        assert_eq!(served_interface(b"", &links), None);
    }

    #[test]
    fn holders_are_named_with_what_to_do() {
        let c = |holder| PortConflict {
            port: 51820,
            holder,
        };
        assert_eq!(
            c(PortHolder::WireGuardLink {
                name: "kilo0".into()
            })
            .to_string(),
            "UDP port 51820 is held by WireGuard interface kilo0 (left by Kilo: remove it with \
             `ip link del kilo0` after stopping kg)"
        );
        assert_eq!(
            c(PortHolder::Process {
                pid: 42,
                command: "wireguard-go".into(),
                interface: Some("kilo0".into())
            })
            .to_string(),
            "UDP port 51820 is held by process wireguard-go (pid 42) of interface kilo0 (left by \
             Kilo: remove it with `ip link del kilo0` after stopping kg)"
        );
        assert_eq!(
            c(PortHolder::Process {
                pid: 7,
                command: "socat".into(),
                interface: None
            })
            .to_string(),
            "UDP port 51820 is held by process socat (pid 7) (stop it, or run wiremesh with \
             another --port)"
        );
        let wg0 = c(PortHolder::WireGuardLink { name: "wg0".into() }).to_string();
        assert!(wg0.contains("interface wg0 (not wiremesh's"), "{wg0}");
        assert!(!wg0.contains("Kilo"), "{wg0}");
        let sock = c(PortHolder::Socket { inode: 9 }).to_string();
        assert!(sock.contains("inode 9"), "{sock}");
        assert!(sock.contains("sport = :51820"), "{sock}");
        assert!(
            PortHolder::WireGuardLink {
                name: "kilo1".into()
            }
            .is_kilo()
        );
        assert!(!PortHolder::Socket { inode: 1 }.is_kilo());
    }

    #[test]
    fn a_socket_of_this_process_is_found_and_named_by_its_pid() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let found = find_port_holder(port, "wiremesh0");
        let Some(PortHolder::Process {
            pid,
            command,
            interface,
        }) = found
        else {
            panic!("not found as a process: {found:?}");
        };
        assert_eq!(pid, std::process::id());
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(command, comm.trim_end());
        assert_eq!(interface, None);
        drop(sock);
        assert_eq!(find_port_holder(port, "wiremesh0"), None, "freed");
    }
}
