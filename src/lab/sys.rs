//! The lab's edge to the machine: running `ip`, `nft`, `wg` and friends, checking root and
//! tools, listing namespaces, and finding, checking and ending processes by PID.
//!
//! Depends on `std::process`, `/proc`, `/run/netns` and `nix` (signals, euid); on nothing else of
//! the crate but the error type.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::LabError;
use super::state::ProcRef;

/// Where `ip netns add` pins named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Where Debian's containernetworking-plugins are installed.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Stop unless the effective user is root. Touches nothing.
pub fn require_root() -> Result<(), LabError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}

/// A program the lab needs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// Program name (looked up on `PATH`) or absolute path.
    pub program: &'static str,
    /// The Debian package.
    pub package: &'static str,
}

/// `ip`, for namespaces, links, addresses and routes.
pub const IP: Tool = Tool {
    program: "ip",
    package: "iproute2",
};
/// `nft`, for the NAT routers.
pub const NFT: Tool = Tool {
    program: "nft",
    package: "nftables",
};
/// `wg`, for key generation.
pub const WG: Tool = Tool {
    program: "wg",
    package: "wireguard-tools",
};
/// `wireguard-go`, the userspace WireGuard the agents start.
pub const WIREGUARD_GO: Tool = Tool {
    program: "wireguard-go",
    package: "wireguard-go",
};
/// `sysctl`, to turn on forwarding in the namespaces.
pub const SYSCTL: Tool = Tool {
    program: "sysctl",
    package: "procps",
};
/// The CNI bridge plugin.
pub const CNI_BRIDGE: Tool = Tool {
    program: "/usr/lib/cni/bridge",
    package: "containernetworking-plugins",
};
/// The CNI host-local IPAM plugin.
pub const CNI_HOST_LOCAL: Tool = Tool {
    program: "/usr/lib/cni/host-local",
    package: "containernetworking-plugins",
};
/// `tcpdump`, for the plaintext check.
pub const TCPDUMP: Tool = Tool {
    program: "tcpdump",
    package: "tcpdump",
};
/// `etcd`, the API server's store (`--registry kube`).
pub const ETCD: Tool = Tool {
    program: "etcd",
    package: "etcd-server",
};
/// `openssl`, for the API server's certificates (`--registry kube`).
pub const OPENSSL: Tool = Tool {
    program: "openssl",
    package: "openssl",
};
/// `ping`, for the reachability check.
pub const PING: Tool = Tool {
    program: "ping",
    package: "iputils-ping",
};

/// The full path of `program` if it is an executable file (absolute, or found on `PATH`).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_exec(p))
}

/// Stop with one message naming every missing tool and its package.
pub fn require_tools(tools: &[Tool]) -> Result<(), LabError> {
    let mut missing: Vec<String> = Vec::new();
    for t in tools {
        if find_program(t.program).is_none() {
            let line = format!("`{}` (apt-get install {})", t.program, t.package);
            if !missing.contains(&line) {
                missing.push(line);
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LabError::MissingTools { missing })
    }
}

/// A command line as one string, for messages.
pub fn display(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `program args…` to completion, feeding `stdin` if given; return stdout when it succeeds.
pub fn run_with(
    program: &str,
    args: &[&OsStr],
    stdin: Option<&[u8]>,
    envs: &[(&str, &OsStr)],
) -> Result<String, LabError> {
    let command = display(program, args);
    tracing::debug!(%command, "run");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A plugin that exits early closes its stdin; its exit status then tells what happened.
        let _ = pipe.write_all(data);
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = stdout.trim().to_owned();
        }
        Err(LabError::Command {
            command,
            status: out.status.to_string(),
            stderr,
        })
    }
}

/// Run `program args…` (strings) and return its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run_with(program, &args, None, &[])
}

/// `ip args…`.
pub fn ip(args: &[&str]) -> Result<String, LabError> {
    run("ip", args)
}

/// `ip -n netns args…`.
pub fn ip_n(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `ip netns exec netns program args…`.
pub fn ns_exec(netns: &str, program: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["netns", "exec", netns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Names of all named network namespaces (`ip netns list`), sorted.
pub fn netns_list() -> Result<Vec<String>, LabError> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(rd) => {
            let mut out: Vec<String> = rd
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            out.sort();
            Ok(out)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(LabError::io("list", NETNS_DIR)(e)),
    }
}

/// The identity (device, inode) of the named namespace, if it exists.
fn netns_id(netns: &str) -> Option<(u64, u64)> {
    let m = std::fs::metadata(Path::new(NETNS_DIR).join(netns)).ok()?;
    Some((m.dev(), m.ino()))
}

/// PIDs of every process whose network namespace is one of `namespaces` (what `ip netns pids`
/// does for one name), sorted.
pub fn pids_in_netns(namespaces: &[String]) -> Vec<u32> {
    let ids: BTreeSet<(u64, u64)> = namespaces.iter().filter_map(|n| netns_id(n)).collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The fields of `/proc/<pid>/stat` after the command name: state is `[0]`, start time `[19]`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The start time of `pid` in clock ticks since boot, while it exists and is not a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    if f.first().map(String::as_str) == Some("Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// `pid` as a [`ProcRef`], while it runs.
pub fn proc_ref(pid: u32) -> Option<ProcRef> {
    start_time(pid).map(|start_time| ProcRef { pid, start_time })
}

/// Whether the process `p` still runs (same PID and start time, not a zombie).
pub fn is_running(p: &ProcRef) -> bool {
    start_time(p.pid) == Some(p.start_time)
}

/// End `procs`: SIGTERM, wait up to `grace`, then SIGKILL and wait again. Returns the PIDs that
/// still run afterwards.
pub fn terminate(procs: &[ProcRef], grace: Duration) -> Vec<u32> {
    let signal_all = |sig: Signal| {
        for p in procs.iter().filter(|p| is_running(p)) {
            if let Ok(pid) = i32::try_from(p.pid) {
                tracing::debug!(pid = p.pid, ?sig, "signal");
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    };
    let wait_gone = |limit: Duration| {
        let t0 = Instant::now();
        while procs.iter().any(is_running) && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    signal_all(Signal::SIGTERM);
    wait_gone(grace);
    if procs.iter().any(is_running) {
        signal_all(Signal::SIGKILL);
        wait_gone(Duration::from_secs(3));
    }
    procs
        .iter()
        .filter(|p| is_running(p))
        .map(|p| p.pid)
        .collect()
}

/// The last `n` lines of a text file (empty if it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_named_with_their_package_once() {
        let missing = Tool {
            program: "/nonexistent/wiremesh-lab-tool",
            package: "some-package",
        };
        let err = require_tools(&[missing, missing]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert_eq!(
            msg.matches("`/nonexistent/wiremesh-lab-tool` (apt-get install some-package)")
                .count(),
            1,
            "{msg}"
        );
    }

    #[test]
    fn own_process_is_running_and_a_changed_start_time_is_not() {
        let me = proc_ref(std::process::id()).unwrap();
        assert!(is_running(&me));
        assert!(!is_running(&ProcRef {
            pid: me.pid,
            start_time: me.start_time + 1
        }));
    }

    #[test]
    fn failed_command_reports_its_line_and_stderr() {
        let err = run("sh", &["-c", "echo oops >&2; exit 3"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`sh -c echo oops >&2; exit 3`"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }
}
