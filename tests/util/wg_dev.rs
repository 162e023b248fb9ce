//! Throw-away network namespaces in which the tests drive `reconcile::wg::WgDevice` in-process.
//! Needs root, `/dev/net/tun`, `ip` and `wireguard-go`.
//!
//! wireguard-go's socket `/run/wireguard/<if>.sock` is global, so every interface gets a name
//! unique to this process (`wmwg<pid><n>`, workaround A of the lab notes). Devices are created in
//! the namespace through `WgOptions::netns`. On drop, also when a test panics, every device made
//! here is deleted (its daemon stopped by PID) *before* the namespace, which would otherwise live
//! on, nameless, while the daemon runs.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use wiremesh::reconcile::wg::{WgDevice, WgMode, WgOptions, load_or_generate_private_key};

use super::wg_netns::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An interface name no other test of this process uses: `wmwg<pid><n>`, at most 15 bytes.
pub fn unique_ifname() -> String {
    let name = format!(
        "wmwg{}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 15, "interface name {name} is too long");
    name
}

/// A namespace `wm-wg-<pid>-<n>` with `lo` up, and the devices created in it.
pub struct TestNs {
    /// The namespace's name.
    pub name: String,
    /// A private temporary directory (key files), removed on drop.
    pub dir: tempfile::TempDir,
    devices: Vec<WgDevice>,
}

impl TestNs {
    /// Create the namespace.
    pub fn new() -> TestNs {
        let name = format!(
            "wm-wg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name], None);
        let ns = TestNs {
            name,
            dir: tempfile::tempdir().expect("temporary directory"),
            devices: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace file, for `WgOptions::netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Options for `mode` in this namespace, with the default userspace binary.
    pub fn options(&self, mode: WgMode) -> WgOptions {
        WgOptions {
            netns: Some(self.path()),
            ..WgOptions::new(mode)
        }
    }

    /// The key file of interface `ifname`.
    pub fn key_path(&self, ifname: &str) -> PathBuf {
        self.dir.path().join("keys").join(ifname)
    }

    /// A handle for a new, uniquely named device (nothing is created yet).
    pub fn device(&mut self, mode: WgMode) -> WgDevice {
        self.device_named(&unique_ifname(), mode)
    }

    /// A handle for device `ifname` with the key in [`Self::key_path`]; deleted on drop.
    pub fn device_named(&mut self, ifname: &str, mode: WgMode) -> WgDevice {
        let key = load_or_generate_private_key(&self.key_path(ifname)).expect("key file");
        let dev = WgDevice::new(ifname, key, &self.options(mode)).expect("device handle");
        self.devices.push(dev.clone());
        dev
    }

    /// Run `ip -n NS ARGS`; panics unless it succeeds. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// Run `ARGS` inside the namespace (`ip netns exec`), whatever its exit status.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for dev in self.devices.iter().rev() {
            if let Err(e) = dev.delete() {
                eprintln!("cleanup of {}: {e}", dev.name());
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether process `pid` is alive (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Live processes whose command line ends with `ifname` (daemons serving that interface).
pub fn daemons_for(ifname: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let last = cmd.split(|b| *b == 0).rfind(|a| !a.is_empty());
        if last == Some(ifname.as_bytes()) && alive(pid) {
            out.push(pid);
        }
    }
    out
}
