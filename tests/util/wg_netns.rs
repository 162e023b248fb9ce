//! A throw-away network namespace holding one userspace WireGuard interface (wireguard-go), for
//! tests that must run the real `wg` tools. Needs root, `/dev/net/tun`, `ip`, `wireguard-go`,
//! `wg` and `wg-quick`.
//!
//! wireguard-go's control socket `/run/wireguard/<if>.sock` is global, not per network namespace,
//! so every interface gets a name unique to this process and test (workaround A of the lab
//! notes), and `wg` is run from anywhere against that name. Everything is removed on drop, also
//! when the test panics: the daemon is stopped by its PID first, then the namespace is deleted
//! (a namespace whose processes still run would live on, nameless).

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A namespace `wm-sc-<pid>-<tag>` with wireguard-go running interface `wmsc<pid><tag>` in it.
pub struct WgNetns {
    /// The namespace's name.
    pub ns: String,
    /// The WireGuard interface's name (at most 15 bytes).
    pub ifname: String,
    /// A private temporary directory, removed on drop.
    pub dir: tempfile::TempDir,
    daemon: Option<Child>,
    ns_created: bool,
}

/// Panic with a clear message unless this process can run the namespace tests.
pub fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned));
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "the netns tests must run as root"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "the netns tests need /dev/net/tun"
    );
    for tool in ["ip", "wireguard-go", "wg", "wg-quick"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(found, "the netns tests need `{tool}` on PATH");
    }
}

/// Run a command to completion; panic with its stderr unless it succeeds. Returns stdout.
pub fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd}: {e}"));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to {cmd}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{cmd} did not finish: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

impl WgNetns {
    /// Create the namespace and start wireguard-go in it; waits for its control socket.
    ///
    /// `tag` tells apart the tests of one process (they run in parallel): a few ASCII letters.
    pub fn start(tag: &str) -> WgNetns {
        let pid = std::process::id();
        let ifname = format!("wmsc{pid}{tag}");
        assert!(ifname.len() <= 15, "interface name {ifname} is too long");
        let mut me = WgNetns {
            ns: format!("wm-sc-{pid}-{tag}"),
            ifname,
            dir: tempfile::tempdir().expect("temporary directory"),
            daemon: None,
            ns_created: false,
        };
        run("ip", &["netns", "add", &me.ns], None);
        me.ns_created = true;
        run("ip", &["-n", &me.ns, "link", "set", "lo", "up"], None);
        let log = me.log_path();
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        // `ip netns exec` execs, so the child's PID is wireguard-go's own.
        let child = Command::new("ip")
            .args(["netns", "exec", &me.ns, "wireguard-go", "-f", &me.ifname])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start wireguard-go");
        me.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !me.socket().exists() {
            if let Some(Ok(Some(status))) = me.daemon.as_mut().map(Child::try_wait) {
                panic!(
                    "wireguard-go exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "wireguard-go did not open {} in time",
                me.socket().display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// wireguard-go's control socket.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/wireguard/{}.sock", self.ifname))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("wireguard-go.log")
    }

    /// Run `wg ARGS` (it reaches the daemon through the socket); returns stdout.
    pub fn wg(&self, args: &[&str], stdin: Option<&str>) -> String {
        run("wg", args, stdin)
    }
}

impl Drop for WgNetns {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SIGTERM lets wireguard-go remove its socket and interface; SIGKILL if it hangs.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
                // After SIGKILL the socket stays behind; the name is ours alone.
                let _ = std::fs::remove_file(self.socket());
            }
        }
        if self.ns_created {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
