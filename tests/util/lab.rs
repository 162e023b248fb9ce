//! A `meshctl lab` driven through the real binary, taken down when the test ends (also on
//! panic), with the polls and readings the lab scenarios share.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use wiremesh::lab::state::{LabState, ProcRef};

/// The `meshctl` binary under test.
pub const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");
/// Where labs keep their state.
pub const ROOT: &str = "/run/wiremesh-lab";

/// `meshctl args…`.
pub fn meshctl(args: &[&str]) -> Output {
    Command::new(MESHCTL)
        .args(args)
        .output()
        .expect("meshctl runs")
}

/// Exit status, stdout and stderr of `o`, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `cmd args…`, whatever its exit status.
pub fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Names of the links in the host namespace.
pub fn host_links() -> BTreeSet<String> {
    String::from_utf8_lossy(&sh("ip", &["-o", "link"]).stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .collect()
}

/// Names of the named network namespaces.
pub fn netns_list() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Poll `f` every 200 ms until it returns `Some`, for at most `limit`.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Fail unless root and every tool the lab runs is there (`extra` too).
pub fn require_tools(extra: &[&str]) {
    assert!(
        wiremesh::lab::sys::require_root().is_ok(),
        "the lab tests must run as root"
    );
    for tool in [
        "ip",
        "nft",
        "wg",
        "wireguard-go",
        "tcpdump",
        "ping",
        "sysctl",
    ]
    .iter()
    .chain(extra)
    {
        assert!(
            wiremesh::lab::sys::find_program(tool).is_some(),
            "the lab tests need `{tool}`"
        );
    }
    assert!(
        Path::new("/usr/lib/cni/bridge").exists(),
        "the lab tests need containernetworking-plugins"
    );
}

/// A lab that is taken down when the test ends, whatever happened.
pub struct Lab {
    /// The lab name.
    pub name: String,
    /// The host namespace's links before the lab (none of the lab's may be left there).
    links_before: BTreeSet<String>,
}

impl Lab {
    /// A lab name unique to this test and process: `tag` + PID digits, at most 8 characters.
    pub fn new(tag: &str) -> Lab {
        assert!(tag.len() <= 3);
        let name = format!("{tag}{}", std::process::id() % 100_000);
        // Leftovers of an earlier run of this process number would make `up` refuse.
        let _ = meshctl(&["lab", "down", "--name", &name]);
        Lab {
            name,
            links_before: host_links(),
        }
    }

    /// `wml-<name>-`.
    pub fn prefix(&self) -> String {
        format!("wml-{}-", self.name)
    }

    /// The lab directory.
    pub fn dir(&self) -> PathBuf {
        Path::new(ROOT).join(&self.name)
    }

    /// The lab's namespace with `suffix` (`n1`, `n1p1`, `api`, …).
    pub fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix())
    }

    /// `meshctl args… --name <lab>`.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--name", &self.name]);
        meshctl(&all)
    }

    /// `meshctl lab up args…`.
    pub fn up(&self, args: &[&str]) -> Output {
        let mut all = vec!["lab", "up"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `meshctl args…` that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "meshctl {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `lab status -o json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["lab", "status", "-o", "json"])).expect("status JSON")
    }

    /// The state file, read by the library.
    pub fn state(&self) -> LabState {
        wiremesh::lab::load(Path::new(ROOT), &self.name.parse().expect("lab name"))
            .expect("lab state")
    }

    /// `ip -n <lab ns> args…`; its stdout, whatever the exit status.
    pub fn ip(&self, suffix: &str, args: &[&str]) -> String {
        let ns = self.ns(suffix);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&sh("ip", &all).stdout).into_owned()
    }

    /// `ip netns exec <lab ns> args…`, whatever its exit status.
    pub fn exec(&self, suffix: &str, args: &[&str]) -> Output {
        let ns = self.ns(suffix);
        let mut all = vec!["netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// The IPv4 addresses of `dev` in the lab namespace `suffix` (`ip -o -4 addr`).
    pub fn addrs(&self, suffix: &str, dev: &str) -> String {
        let ns = self.ns(suffix);
        let o = sh("ip", &["-n", &ns, "-o", "-4", "addr", "show", "dev", dev]);
        assert!(o.status.success(), "{suffix} {dev}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The routes the agent of node namespace `suffix` owns (`proto 104`).
    pub fn own_routes(&self, suffix: &str) -> String {
        self.ip(suffix, &["route", "show", "proto", "104"])
    }

    /// Rewrite `nodes.yaml` without node `name`, atomically (temp file in the same directory,
    /// then rename): an agent never reads a half-written file.
    pub fn remove_node(&self, name: &str) {
        let path = self.dir().join("nodes.yaml");
        let mut doc: serde_json::Value =
            wiremesh::yaml::from_str(&std::fs::read_to_string(&path).expect("nodes.yaml"))
                .expect("YAML");
        let items = doc["items"].as_array_mut().expect("items");
        let before = items.len();
        items.retain(|n| n["metadata"]["name"].as_str() != Some(name));
        assert_eq!(items.len(), before - 1, "{name} not in {}", path.display());
        let tmp = self.dir().join(".nodes.yaml.tmp");
        std::fs::write(&tmp, wiremesh::yaml::to_string(&doc).expect("YAML")).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
    }

    /// The node's public key, as the lab generated it.
    pub fn public_key(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir().join("nodes").join(node).join("key.pub"))
            .unwrap_or_else(|e| panic!("key of {node}: {e}"))
            .trim()
            .to_owned()
    }

    /// Whether pod namespace `pod` gets an answer from `addr` (up to 3 pings, 2 s each).
    pub fn pod_pings(&self, pod: &str, addr: &str) -> bool {
        (0..3).any(|_| {
            sh(
                "ip",
                &[
                    "netns", "exec", pod, "ping", "-n", "-c", "1", "-W", "2", addr,
                ],
            )
            .status
            .success()
        })
    }

    /// `lab check` must pass: every pod reaches every pod, and only WireGuard crosses the
    /// underlay.
    pub fn check_passes(&self) {
        let check = self.run(&["lab", "check"]);
        let report = text(&check);
        if !check.status.success() || report.contains("LOSS") {
            panic!("{report}\n{}", self.diagnostics());
        }
        assert!(
            report.contains("no plaintext pod packets on the underlay ok"),
            "{report}"
        );
    }

    /// What a failed assertion needs to be understood afterwards: `lab status` (peers,
    /// endpoints, handshakes), each node's own routes and rules, the tail of each agent's log.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "--- lab status ---\n{}",
            text(&self.run(&["lab", "status"]))
        );
        for n in self.state().nodes {
            let suffix = n.netns.trim_start_matches(&self.prefix()).to_owned();
            let log = std::fs::read_to_string(n.agent_log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            out.push_str(&format!(
                "--- {} ({}) ---\nroutes:\n{}rules:\n{}log tail:\n{tail}\n",
                n.name,
                n.netns,
                self.ip(&suffix, &["route", "show", "table", "all", "proto", "104"]),
                self.ip(&suffix, &["rule", "show"]),
            ));
        }
        out
    }

    /// Every process the state records (agents, kube-apiserver and etcd of every cluster, links).
    pub fn recorded_processes(&self) -> Vec<ProcRef> {
        self.state().recorded_processes()
    }

    /// Take the lab down and assert that nothing of it is left: namespaces, directory,
    /// recorded processes; a second `down` has nothing to do.
    pub fn down_and_assert_gone(&self) {
        let procs = self.recorded_processes();
        let out = self.ok(&["lab", "down"]);
        assert!(out.contains("removed"), "{out}");
        let left: Vec<String> = netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&self.prefix()))
            .collect();
        assert!(left.is_empty(), "namespaces left: {left:?}");
        assert!(!self.dir().exists(), "{} left", self.dir().display());
        let running: Vec<u32> = procs
            .iter()
            .filter(|p| wiremesh::lab::sys::is_running(p))
            .map(|p| p.pid)
            .collect();
        assert!(
            running.is_empty(),
            "processes of the lab still run: {running:?}"
        );
        let ours: BTreeSet<&str> = ["br0", "up0", "eth1", "wiremesh0", "wmbr0"].into();
        let new_links: Vec<String> = host_links()
            .difference(&self.links_before)
            .filter(|l| ours.contains(l.as_str()) || l.starts_with('n') || l.starts_with('l'))
            .cloned()
            .collect();
        assert!(
            new_links.is_empty(),
            "links in the host namespace: {new_links:?}"
        );
        let again = self.ok(&["lab", "down"]);
        assert!(again.contains("nothing to remove"), "{again}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("WIREMESH_KEEP_FAILED_LAB").is_some() {
            eprintln!(
                "WIREMESH_KEEP_FAILED_LAB: lab {} left up; take it down with `meshctl lab down \
                 --name {}`",
                self.name, self.name
            );
            return;
        }
        let _ = meshctl(&["lab", "down", "--name", &self.name]);
    }
}

/// Node `name` of a status document.
pub fn node<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {status}"))
}

/// The first pod of a node in a status document: (namespace, first IP).
pub fn first_pod(n: &serde_json::Value) -> (String, String) {
    let pod = &n["pods"][0];
    (
        pod["name"].as_str().expect("pod name").to_owned(),
        pod["ips"][0].as_str().expect("pod IP").to_owned(),
    )
}

/// The WireGuard peer of a node (status document) with key `key`.
pub fn peer<'a>(n: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    n["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["public_key"] == key))
}

/// The allowed IPs of a peer (status document).
pub fn allowed_ips(p: &serde_json::Value) -> Vec<String> {
    p["allowed_ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
