//! `meshctl doctor`: what this machine offers wiremesh and what is missing — the WireGuard
//! module or a userspace daemon, the IPIP tunnel for encapsulation, nftables or iptables, the CNI
//! plugins, forwarding, a free WireGuard listen port (no `kilo0` left behind).
//!
//! Probes read `/sys`, `/proc` and `PATH`, and try to create links only inside a throwaway
//! network namespace, so the host is never changed. May depend on the reconcile modules'
//! detection functions and `lab::sys::find_program`. [`peers`] answers "why no handshake" for
//! a running agent's peers, with [`firewall`] reading this host's nftables ruleset.

pub mod firewall;
pub mod peers;

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::lab::sys::find_program;
use crate::reconcile::port::{PortConflict, PortHolder};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Available.
    Ok,
    /// Not available, but the agent works without it (or with an alternative).
    Warn,
    /// Not available and needed.
    Missing,
}

/// One probe's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found, and what to do about it.
    pub detail: String,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether a link of `kind` can be created, tried in a throwaway network namespace.
pub fn link_kind_works(kind: &str) -> Result<bool, String> {
    if Path::new(&format!("/sys/module/{kind}")).exists() {
        return Ok(true);
    }
    if !is_root() {
        return Err("run as root to probe".into());
    }
    let ns = format!("wm-probe-{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).output();
    ip(&["netns", "add", &ns]).map_err(|e| format!("ip: {e}"))?;
    let made = ip(&["-n", &ns, "link", "add", "wmprobe0", "type", kind])
        .map(|o| o.status.success())
        .unwrap_or(false);
    let _ = ip(&["netns", "del", &ns]);
    Ok(made)
}

/// Directories where CNI plugin binaries usually live.
pub const CNI_BIN_DIRS: &[&str] = &["/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni"];

/// The listen-port check: ok when `port` is free or held by `interface` (wiremesh's own, so
/// `holder` is `None`), missing when `holder` holds it (named, with what to do), a warning when
/// only a Kilo interface of `kilo_links` is left (its address may route the mesh subnet).
pub fn listen_port_check(
    port: u16,
    interface: &str,
    holder: Option<PortHolder>,
    kilo_links: &[String],
) -> Check {
    let (status, detail) = match holder {
        Some(holder) => (Status::Missing, PortConflict { port, holder }.to_string()),
        None if !kilo_links.is_empty() => (
            Status::Warn,
            format!(
                "UDP port {port} is free, but {} left by Kilo: its address in the mesh subnet may \
                 route mesh traffic into it (remove with `ip link del NAME` after stopping kg)",
                kilo_links.join(", ")
            ),
        ),
        None => (
            Status::Ok,
            format!("UDP port {port} is free or held by {interface}"),
        ),
    };
    Check {
        name: "listen port".to_owned(),
        status,
        detail,
    }
}

/// Run every probe. `encapsulate` is the agent's `--encapsulate` setting; `port` and
/// `interface` its `--port` and `--interface`.
pub fn run(encapsulate: crate::topology::Encapsulate, port: u16, interface: &str) -> Vec<Check> {
    use crate::topology::Encapsulate;
    let mut out = Vec::new();
    let mut add = |name: &str, status: Status, detail: String| {
        out.push(Check {
            name: name.to_owned(),
            status,
            detail,
        })
    };
    add(
        "root",
        if is_root() { Status::Ok } else { Status::Warn },
        if is_root() {
            "running as root".into()
        } else {
            "not root: the agent needs root (or CAP_NET_ADMIN); some probes are skipped".into()
        },
    );
    let kernel_wg = crate::reconcile::wg::detect_kernel_wireguard(None);
    let userspace = find_program("wireguard-go").or_else(|| find_program("boringtun-cli"));
    match (&kernel_wg, &userspace) {
        (Ok(()), _) => add(
            "wireguard",
            Status::Ok,
            "kernel module present: --wireguard auto uses it".into(),
        ),
        (Err(_), Some(p)) => add(
            "wireguard",
            Status::Ok,
            format!(
                "no kernel module; --wireguard auto runs {} (userspace)",
                p.display()
            ),
        ),
        (Err(e), None) => add(
            "wireguard",
            Status::Missing,
            format!("{e}; and no userspace implementation: apt-get install wireguard-go"),
        ),
    }
    let ipip = link_kind_works("ipip");
    let need_ipip = encapsulate != Encapsulate::Never;
    match ipip {
        Ok(true) => add(
            "ipip",
            Status::Ok,
            "IPIP tunnel available for --encapsulate".into(),
        ),
        Ok(false) => add(
            "ipip",
            if need_ipip {
                Status::Missing
            } else {
                Status::Warn
            },
            "no IPIP tunnel (kernel module ipip): --encapsulate always|crosssubnet cannot work; \
             use --encapsulate never where nodes of a location share a network"
                .into(),
        ),
        Err(e) => add("ipip", Status::Warn, format!("not probed: {e}")),
    }
    let nft_ok = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .is_ok_and(|o| o.status.success());
    let ipt = find_program("iptables-restore");
    match (nft_ok, &ipt) {
        (true, _) => add(
            "firewall",
            Status::Ok,
            "nftables works: masquerading uses table inet wiremesh".into(),
        ),
        (false, Some(_)) => add(
            "firewall",
            Status::Ok,
            "no nftables; iptables chain WIREMESH-NAT is used".into(),
        ),
        (false, None) => add(
            "firewall",
            Status::Missing,
            "neither nft nor iptables-restore works: apt-get install nftables".into(),
        ),
    }
    let plugins = ["bridge", "host-local", "portmap"];
    let found: Option<&str> = CNI_BIN_DIRS
        .iter()
        .copied()
        .find(|d| plugins.iter().all(|p| Path::new(d).join(p).is_file()));
    match found {
        Some(d) => add("cni plugins", Status::Ok, format!("bridge, host-local, portmap in {d}")),
        None => add(
            "cni plugins",
            Status::Warn,
            "bridge, host-local and portmap not found in /opt/cni/bin or /usr/lib/cni: pods cannot \
             be attached (apt-get install containernetworking-plugins)"
                .into(),
        ),
    }
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    add(
        "forwarding",
        if fwd.trim() == "1" {
            Status::Ok
        } else {
            Status::Warn
        },
        if fwd.trim() == "1" {
            "net.ipv4.ip_forward=1".into()
        } else {
            "net.ipv4.ip_forward=0: the agent turns it on where /proc/sys is writable (and \
             `wiremesh cleanup` turns it off again); in a container set it on the host \
             (sysctl -w net.ipv4.ip_forward=1)"
                .into()
        },
    );
    out.push(listen_port_check(
        port,
        interface,
        crate::reconcile::port::find_port_holder(port, interface),
        &crate::reconcile::port::kilo_links(),
    ));
    out
}

/// The checks as an aligned table.
pub fn render(checks: &[Check]) -> String {
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut s = String::new();
    for c in checks {
        let mark = match c.status {
            Status::Ok => "ok     ",
            Status::Warn => "warn   ",
            Status::Missing => "MISSING",
        };
        s.push_str(&format!("{mark}  {:w$}  {}\n", c.name, c.detail));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_aligns_names_and_marks_missing_loudly() {
        let t = render(&[
            Check {
                name: "ipip".into(),
                status: Status::Missing,
                detail: "no".into(),
            },
            Check {
                name: "wireguard".into(),
                status: Status::Ok,
                detail: "yes".into(),
            },
        ]);
        assert_eq!(t, "MISSING  ipip       no\nok       wireguard  yes\n");
    }

    #[test]
    fn ipip_is_missing_only_when_encapsulation_needs_it() {
        use crate::topology::Encapsulate;
        let status = |e| {
            run(e, 51820, "wiremesh0")
                .into_iter()
                .find(|c| c.name == "ipip")
                .map(|c| c.status)
                .unwrap()
        };
        let (never, always) = (status(Encapsulate::Never), status(Encapsulate::Always));
        match link_kind_works("ipip") {
            Ok(true) => assert_eq!((never, always), (Status::Ok, Status::Ok)),
            Ok(false) => assert_eq!((never, always), (Status::Warn, Status::Missing)),
            Err(_) => assert_eq!((never, always), (Status::Warn, Status::Warn)),
        }
    }

    #[test]
    fn listen_port_is_missing_when_held_by_another_and_names_the_holder() {
        let held = listen_port_check(
            51820,
            "wiremesh0",
            Some(PortHolder::WireGuardLink {
                name: "kilo0".into(),
            }),
            &["kilo0".into()],
        );
        assert_eq!(held.status, Status::Missing);
        assert_eq!(held.name, "listen port");
        assert!(
            held.detail
                .starts_with("UDP port 51820 is held by WireGuard interface kilo0 (left by Kilo"),
            "{}",
            held.detail
        );
        assert!(held.detail.contains("ip link del kilo0"), "{}", held.detail);
        let left = listen_port_check(51820, "wiremesh0", None, &["kilo0".into()]);
        assert_eq!(left.status, Status::Warn);
        assert!(
            left.detail.contains("kilo0 left by Kilo"),
            "{}",
            left.detail
        );
        let free = listen_port_check(51820, "wiremesh0", None, &[]);
        assert_eq!(free.status, Status::Ok);
        assert!(free.detail.contains("wiremesh0"), "{}", free.detail);
    }

    #[test]
    fn listen_port_held_by_a_socket_here_is_missing() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let c = run(crate::topology::Encapsulate::Never, port, "wiremesh0")
            .into_iter()
            .find(|c| c.name == "listen port")
            .unwrap();
        assert_eq!(c.status, Status::Missing, "{c:?}");
        assert!(
            c.detail.contains(&format!("(pid {})", std::process::id())),
            "{c:?}"
        );
    }
}
