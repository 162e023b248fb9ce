//! Taking a node over from Kilo: the real agent on a node where something else holds its
//! WireGuard listen port (51820) — a `kilo0` that a stopped `kg` left behind (here a
//! wireguard-go interface, as Kilo's userspace mode leaves it), or a plain UDP socket of another
//! process. The agent names the holder in its log, `/readyz`, `/status` and metrics, stays not
//! ready (its endpoint is withheld: `/status` says so), never touches the holder, and takes over
//! once the holder is gone.
//!
//! Needs root, iproute2, wireguard-tools, wireguard-go, curl and python3: run with
//! `--features netns-tests`. The nodes are [`AgentNodes`]; only node a's agent runs.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::agent_netns::{AgentNode, AgentNodes};
use crate::util::wg_netns::run;

/// Poll `f` every 200 ms until it is true; panic after `secs` with `what` and the agent's log.
fn wait_until(node: &AgentNode, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: not after {secs} s\n--- agent log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's `/status` document.
fn status(node: &AgentNode) -> wiremesh::status::AgentStatus {
    let (code, body) = node.http_get("/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Checks the agent while `holder` holds its port: log, readiness, status, metric. `holder` is
/// how the messages name it.
fn assert_names_the_holder(node: &AgentNode, holder: &str, advice: &str) {
    let line = format!("UDP port 51820 is held by {holder} {advice}");
    wait_until(node, 30, "the log names the holder", || {
        node.log().contains(&line)
    });
    let (code, body) = node.http_get("/readyz");
    assert_eq!(code, 503, "ready while the port is held: {body}");
    assert_eq!(body, format!("not serving the mesh: {line}\n"));
    let s = status(node);
    assert!(!s.ready);
    assert_eq!(
        s.listen_port_conflict.as_deref(),
        Some(line.as_str()),
        "/status says the endpoint is withheld, and why"
    );
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("wiremesh_listen_port_held 1\n"),
        "{metrics}"
    );
}

/// Checks the agent took the port over: ready, no conflict, its device on 51820.
fn assert_takes_over(node: &AgentNode) {
    wait_until(node, 60, "ready once the port is free", || {
        node.http_get("/readyz") == (200, "ready\n".to_owned())
    });
    let s = status(node);
    assert_eq!(s.listen_port_conflict, None);
    let port = node.run(&["wg", "show", "wiremesh0", "listen-port"]);
    assert_eq!(
        port.trim(),
        "51820",
        "the agent's device listens on the port"
    );
    assert!(
        node.log().contains("the WireGuard listen port is free now"),
        "{}",
        node.log()
    );
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("wiremesh_listen_port_held 0\n"),
        "{metrics}"
    );
}

/// Warnings about the held port, so that a retrying agent is seen not to log in a hot loop.
fn held_lines(node: &AgentNode) -> usize {
    node.log().matches("UDP port 51820 is held by").count()
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_kilo0_left_holding_the_port_is_named_left_intact_and_taken_over_once_deleted() {
    let mut mesh = AgentNodes::new("wm-kl");
    let file = mesh.nodes_file.clone();
    let a = &mesh.nodes[0];
    // kilo0 as a stopped kg leaves it: up, listening on 51820, with a key of its own.
    a.run(&["wireguard-go", "kilo0"]);
    let key = run("wg", &["genkey"], None);
    let key_file = a.dir.join("kilo.key");
    std::fs::write(&key_file, key).unwrap();
    a.run(&[
        "wg",
        "set",
        "kilo0",
        "listen-port",
        "51820",
        "private-key",
        key_file.to_str().unwrap(),
    ]);
    a.ns.ip(&["link", "set", "kilo0", "up"]);
    let pids = a.pids();
    assert_eq!(pids.len(), 1, "only kilo0's daemon runs: {pids:?}");
    let kilo_pid = pids[0];
    let kilo_public = a.run(&["wg", "show", "kilo0", "public-key"]);

    mesh.nodes[0].start(&file);
    let a = &mesh.nodes[0];
    assert_names_the_holder(
        a,
        &format!("process wireguard-go (pid {kilo_pid}) of interface kilo0"),
        "(left by Kilo: remove it with `ip link del kilo0` after stopping kg)",
    );
    assert!(
        a.log()
            .contains("an interface Kilo left is on this node: its address in the mesh subnet"),
        "{}",
        a.log()
    );
    // It keeps retrying with backoff: a few lines in 5 s, not a hot loop.
    let before = held_lines(a);
    std::thread::sleep(Duration::from_secs(5));
    let during = held_lines(a) - before;
    assert!(during <= 3, "{during} warnings in 5 s\n{}", a.log());
    // kilo0 is not ours: left exactly as it was.
    assert!(a.pids().contains(&kilo_pid), "kilo0's daemon was stopped");
    assert_eq!(
        a.run(&["wg", "show", "kilo0", "listen-port"]).trim(),
        "51820"
    );
    assert_eq!(a.run(&["wg", "show", "kilo0", "public-key"]), kilo_public);
    assert!(a.ns.ip(&["link", "show", "kilo0"]).contains("UP"));

    // The operator deletes it, as the message says; the agent takes over.
    a.ns.ip(&["link", "del", "kilo0"]);
    assert_takes_over(a);
}

/// A process holding UDP 51820 in `node`: python3 with a bound socket, until killed.
struct Holder(Child);

impl Holder {
    fn start(node: &AgentNode) -> Holder {
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns.name, "python3", "-c"])
            .arg(
                "import socket, sys, time\n\
                 s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
                 s.bind(('::', 51820))\n\
                 print('bound', flush=True)\n\
                 time.sleep(600)\n",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3");
        let mut h = Holder(child);
        let mut line = String::new();
        let stdout = h.0.stdout.as_mut().expect("piped stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert_eq!(line, "bound\n", "python3 could not bind the port");
        h
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_process_holding_the_port_is_named_by_pid_and_the_port_is_taken_once_it_exits() {
    let mut mesh = AgentNodes::new("wm-kp");
    let file = mesh.nodes_file.clone();
    let holder = Holder::start(&mesh.nodes[0]);
    mesh.nodes[0].start(&file);
    let a = &mesh.nodes[0];
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", holder.pid())).unwrap();
    assert_names_the_holder(
        a,
        &format!("process {} (pid {})", comm.trim_end(), holder.pid()),
        "(stop it, or run wiremesh with another --port)",
    );
    drop(holder);
    assert_takes_over(a);
}
