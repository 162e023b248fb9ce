//! Throw-away network namespaces joined by veth pairs, for root-only tests that build a small
//! network (pods, nodes, outside hosts) and run tools inside it with `ip netns exec`. Needs root
//! and `ip`.
//!
//! Names are `<prefix>-<pid>-<n>`, unique across the parallel test threads of one process and
//! across processes. Each namespace is deleted on drop, also when the test panics; only tools
//! that exit on their own (ping, nft, CNI plugins) may run inside, so nothing outlives it.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::wg_netns::run;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, removed on drop.
pub struct Netns {
    /// The namespace's name (`ip netns list`).
    pub name: String,
}

impl Netns {
    /// Create `<prefix>-<pid>-<n>` with `lo` up.
    pub fn new(prefix: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name], None);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The bind-mounted namespace file, as a container runtime passes it (`CNI_NETNS`).
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS`; panics unless it succeeds. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// Run `CMD…` inside the namespace; panics unless it succeeds. Returns stdout.
    pub fn exec(&self, cmd: &[&str], stdin: Option<&str>) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        run("ip", &all, stdin)
    }

    /// Run `CMD…` inside the namespace and return how it ended, whatever that was.
    pub fn try_exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot start ip netns exec: {e}"))
    }

    /// Set one sysctl (`key=value`) inside the namespace.
    pub fn sysctl(&self, setting: &str) {
        self.exec(&["sysctl", "-qw", setting], None);
    }

    /// Whether one ping (`ping -c1 -W SECS`) from here to `addr` is answered.
    pub fn ping_once(&self, addr: &str, secs: u32) -> bool {
        self.try_exec(&["ping", "-n", "-c", "1", "-W", &secs.to_string(), addr])
            .status
            .success()
    }

    /// Whether `addr` answers one of up to `tries` pings (neighbour discovery, DAD may delay the
    /// first).
    pub fn ping(&self, addr: &str, tries: u32) -> bool {
        (0..tries).any(|_| self.ping_once(addr, 2))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair between `a` (interface `a_if`, addresses `a_addrs`) and `b`, both ends up.
/// IPv6 addresses are added `nodad`, usable at once.
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    run(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
        None,
    );
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname]);
            }
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}
