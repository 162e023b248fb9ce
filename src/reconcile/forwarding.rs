//! The forwarding sysctls: which of them the mesh needs, setting them without writing what is
//! already set, and the record of what wiremesh changed, which `wiremesh cleanup` restores.
//!
//! ```text
//! ops to apply / state read ─ needed_by_ops(), needed_by_state() (pure) ─→ Families
//! Families ─ Sysctls::ensure() ─→ /proc/sys (read; written only when 0) ─→ record file
//! record file ─ Sysctls::restore() ─→ /proc/sys (only keys still at the value wiremesh set)
//! ```
//!
//! A node forwards a family only when the mesh routes or bridges that family: IPv4 forwarding
//! for IPv4 routes through the mesh or IPv4 pod addresses on the bridge, IPv6 forwarding likewise.
//! Guards (blackhole routes) need none. IPv6 forwarding is the one to avoid when not needed: it
//! makes the kernel ignore router advertisements (unless `accept_ra` is 2).
//!
//! Why read first: an unprivileged container sees `/proc/sys` read-only, so a value already 1
//! must not be written at all, and a 0 that cannot be written becomes an error naming the exact
//! host setting. The record is a small text file next to the private key (`sysctl`), one
//! `KEY=PREVIOUS` line per key wiremesh turned on; a key is recorded once, with the value found
//! the first time, so a restarted agent never records its own 1.
//!
//! Plain file I/O on a `/proc/sys` root passed in (so tests use a directory); `/proc/sys/net`
//! shows the network namespace of the calling *thread*, so the calls are synchronous. Depends
//! on the reconciler's [`Op`] and [`OwnedState`] only.

use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use super::{Op, OwnedState};
use crate::desired::RouteDev;

/// The IPv4 forwarding sysctl.
pub const IPV4_FORWARD: &str = "net.ipv4.ip_forward";
/// The IPv6 forwarding sysctl (all interfaces).
pub const IPV6_FORWARD: &str = "net.ipv6.conf.all.forwarding";
/// Where the kernel shows its sysctls.
pub const PROC_SYS: &str = "/proc/sys";
/// The record's file name, next to the private key.
pub const RECORD_FILE: &str = "sysctl";

/// Which address families need forwarding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    /// IPv4 is routed or bridged.
    pub v4: bool,
    /// IPv6 is routed or bridged.
    pub v6: bool,
}

impl Families {
    fn add(&mut self, net: &IpNetwork) {
        match net {
            IpNetwork::V4(_) => self.v4 = true,
            IpNetwork::V6(_) => self.v6 = true,
        }
    }

    /// Both sets together.
    pub fn union(self, other: Families) -> Families {
        Families {
            v4: self.v4 || other.v4,
            v6: self.v6 || other.v6,
        }
    }

    /// The sysctl keys these families need, IPv4 first.
    pub fn keys(self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.v4 {
            keys.push(IPV4_FORWARD);
        }
        if self.v6 {
            keys.push(IPV6_FORWARD);
        }
        keys
    }
}

/// The families `op` makes this node forward: a route added through a device (not a guard),
/// the bridge's addresses, and the pod CIDRs of the CNI config. Pure.
pub fn needed_by_op(op: &Op) -> Families {
    let mut f = Families::default();
    match op {
        Op::AddRoute(r) if r.dev != RouteDev::Blackhole => f.add(&r.dst),
        Op::SetBridge(b) => b.addresses.iter().for_each(|a| f.add(a)),
        Op::WriteCni { pod_cidrs, .. } => pod_cidrs.iter().for_each(|c| f.add(c)),
        _ => {}
    }
    f
}

/// The families the ops of a plan make this node forward ([`needed_by_op`]). Pure.
pub fn needed_by_ops(ops: &[Op]) -> Families {
    ops.iter()
        .map(needed_by_op)
        .fold(Families::default(), Families::union)
}

/// The families the installed state already forwards: routes through a device, the bridge's
/// addresses, the CNI config's pod CIDRs. Pure.
pub fn needed_by_state(state: &OwnedState) -> Families {
    let mut f = Families::default();
    for r in state.routes.iter().filter(|r| r.dev != RouteDev::Blackhole) {
        f.add(&r.dst);
    }
    for a in state.bridge.iter().flat_map(|b| &b.addresses) {
        f.add(a);
    }
    for c in state.cni.iter().flatten() {
        f.add(c);
    }
    f
}

/// Why a forwarding sysctl could not be read, set, recorded or restored.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    /// The sysctl could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file under `/proc/sys`.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sysctl is off and could not be turned on here (e.g. `/proc/sys` is read-only in an
    /// unprivileged container).
    #[error(
        "{key} is {value} and cannot be set from here ({source}); the mesh needs it: set it on \
         the host (`sysctl -w {key}=1`, and a line `{key} = 1` in /etc/sysctl.d/ to keep it), \
         or give the agent a writable /proc/sys"
    )]
    Write {
        /// The sysctl.
        key: &'static str,
        /// Its value now.
        value: String,
        /// Why the write failed.
        #[source]
        source: std::io::Error,
    },
    /// The record of changed values could not be read or written.
    #[error("record of changed sysctls {path}: {source}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`Sysctls::ensure`] found for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// It was on already; nothing was written.
    AlreadyOn,
    /// It was `previous` and is 1 now (and recorded when there is a record file).
    TurnedOn {
        /// The value found.
        previous: String,
    },
}

/// What [`Sysctls::restore`] did with one recorded key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// Set back to the recorded value.
    Restored {
        /// The key.
        key: String,
        /// The value written back.
        value: String,
    },
    /// Left as it is: someone set another value since wiremesh turned it on.
    Changed {
        /// The key.
        key: String,
        /// The value found.
        now: String,
    },
}

/// The forwarding sysctls under a `/proc/sys` root, with an optional record file.
#[derive(Debug, Clone)]
pub struct Sysctls {
    root: PathBuf,
    record: Option<PathBuf>,
}

impl Sysctls {
    /// The sysctls under `root` (normally [`PROC_SYS`]); changes are recorded in `record` when
    /// given.
    pub fn new(root: impl Into<PathBuf>, record: Option<PathBuf>) -> Sysctls {
        Sysctls {
            root: root.into(),
            record,
        }
    }

    /// The record file next to the private key at `private_key`.
    pub fn record_for(private_key: &Path) -> PathBuf {
        private_key.with_file_name(RECORD_FILE)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key.replace('.', "/"))
    }

    /// The value of `key`, trimmed.
    pub fn read(&self, key: &str) -> Result<String, ForwardingError> {
        let path = self.path(key);
        std::fs::read_to_string(&path)
            .map(|v| v.trim().to_owned())
            .map_err(|source| ForwardingError::Read { path, source })
    }

    /// Turn `key` on unless it is on: read first, write only a value other than 1, and record
    /// the value found (once per key) before writing.
    pub fn ensure(&self, key: &'static str) -> Result<Ensured, ForwardingError> {
        let value = self.read(key)?;
        if value == "1" {
            return Ok(Ensured::AlreadyOn);
        }
        if let Some(record) = &self.record {
            self.record_previous(record, key, &value)?;
        }
        std::fs::write(self.path(key), "1\n").map_err(|source| ForwardingError::Write {
            key,
            value: value.clone(),
            source,
        })?;
        info!(key, previous = %value, "forwarding turned on");
        Ok(Ensured::TurnedOn { previous: value })
    }

    /// Ensure every key `families` needs; the first failure stops.
    pub fn ensure_families(&self, families: Families) -> Result<(), ForwardingError> {
        for key in families.keys() {
            self.ensure(key)?;
        }
        Ok(())
    }

    fn record_previous(
        &self,
        record: &Path,
        key: &str,
        value: &str,
    ) -> Result<(), ForwardingError> {
        let err = |source| ForwardingError::Record {
            path: record.to_owned(),
            source,
        };
        let mut entries = load_record(record).map_err(err)?;
        if entries.iter().any(|(k, _)| k == key) {
            return Ok(());
        }
        entries.push((key.to_owned(), value.to_owned()));
        save_record(record, &entries).map_err(err)
    }

    /// Put back every recorded key that still holds 1 (the value wiremesh set), then remove
    /// the record. A key someone changed since is left as it is. Without a record (or a record
    /// file) nothing is touched: a value wiremesh did not change is never written.
    pub fn restore(&self) -> Result<Vec<Restored>, ForwardingError> {
        let Some(record) = &self.record else {
            return Ok(Vec::new());
        };
        let entries = load_record(record).map_err(|source| ForwardingError::Record {
            path: record.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for (key, previous) in entries {
            let now = self.read(&key)?;
            if now != "1" {
                warn!(
                    key,
                    now, "changed since wiremesh turned it on: left as it is"
                );
                out.push(Restored::Changed { key, now });
                continue;
            }
            std::fs::write(self.path(&key), format!("{previous}\n")).map_err(|source| {
                ForwardingError::Record {
                    path: self.path(&key),
                    source,
                }
            })?;
            info!(key, value = %previous, "sysctl restored");
            out.push(Restored::Restored {
                key,
                value: previous,
            });
        }
        match std::fs::remove_file(record) {
            Ok(()) => Ok(out),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(out),
            Err(source) => Err(ForwardingError::Record {
                path: record.clone(),
                source,
            }),
        }
    }
}

/// The `KEY=VALUE` lines of the record; no file is an empty record, malformed lines are
/// skipped (only the two forwarding keys are ever honoured, so a damaged or edited file cannot
/// make cleanup write any other sysctl).
fn load_record(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, v)| {
            [IPV4_FORWARD, IPV6_FORWARD].contains(&k.as_str())
                && !v.is_empty()
                && v.chars().all(|c| c.is_ascii_digit())
        })
        .collect())
}

/// Write the record in one rename (never half written).
fn save_record(path: &Path, entries: &[(String, String)]) -> std::io::Result<()> {
    let mut text = String::from(
        "# wiremesh: sysctls the agent turned on, with their previous values; \
         `wiremesh cleanup` restores them\n",
    );
    for (k, v) in entries {
        text.push_str(&format!("{k}={v}\n"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::state_file::replace(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Bridge, MAIN_TABLE, Route};

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn route(dst: &str, dev: RouteDev) -> Route {
        Route {
            dev,
            ..Route::blackhole(MAIN_TABLE, net(dst))
        }
    }

    /// A `/proc/sys` stand-in holding both keys at `v4` and `v6`.
    fn fake_proc(v4: &str, v6: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv6/conf/all")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/ip_forward"), format!("{v4}\n")).unwrap();
        std::fs::write(
            dir.path().join("net/ipv6/conf/all/forwarding"),
            format!("{v6}\n"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn an_ipv4_mesh_needs_only_ipv4_forwarding() {
        let ops = vec![
            Op::AddRoute(route("10.42.1.0/24", RouteDev::WireGuard)),
            Op::SetBridge(Bridge {
                name: "wmbr0".into(),
                addresses: vec![net("10.42.0.1/24")],
            }),
            // Guards never forward, whatever their family.
            Op::AddRoute(Route::blackhole(MAIN_TABLE, net("fd00:42::/64"))),
        ];
        let f = needed_by_ops(&ops);
        assert_eq!(
            f,
            Families {
                v4: true,
                v6: false
            }
        );
        assert_eq!(f.keys(), vec![IPV4_FORWARD]);
    }

    #[test]
    fn ipv6_forwarding_is_needed_only_for_ipv6_routes_bridge_addresses_or_pod_cidrs() {
        for op in [
            Op::AddRoute(route("fd00:42:1::/64", RouteDev::Private)),
            Op::SetBridge(Bridge {
                name: "wmbr0".into(),
                addresses: vec![net("fd00:42::1/64")],
            }),
            Op::WriteCni {
                pod_cidrs: vec![net("fd00:42::/64")],
                mtu: 1420,
            },
        ] {
            assert_eq!(
                needed_by_op(&op),
                Families {
                    v4: false,
                    v6: true
                },
                "{op:?}"
            );
        }
        assert_eq!(
            needed_by_ops(&[Op::LinkUp, Op::DelMasquerade]),
            Families::default()
        );
        assert!(Families::default().keys().is_empty());
    }

    #[test]
    fn installed_routes_and_bridge_count_but_guards_do_not() {
        let mut state = OwnedState {
            routes: vec![
                route("10.42.1.0/24", RouteDev::WireGuard),
                Route::blackhole(MAIN_TABLE, net("fd00:42::/64")),
            ],
            ..OwnedState::default()
        };
        assert_eq!(
            needed_by_state(&state),
            Families {
                v4: true,
                v6: false
            }
        );
        state.bridge = Some(Bridge {
            name: "wmbr0".into(),
            addresses: vec![net("fd00:42::1/64")],
        });
        assert_eq!(needed_by_state(&state), Families { v4: true, v6: true });
    }

    #[test]
    fn a_value_already_on_is_never_written() {
        // The key reads 1 and refuses writes, for root too (a sysctl of mode 0444): `ensure`
        // succeeds only if it never tries to write.
        let proc = fake_proc("1", "0");
        let key = proc.path().join("net/ipv4/ip_forward");
        let s = Sysctls::new(proc.path(), None);
        assert_eq!(s.ensure(IPV4_FORWARD).unwrap(), Ensured::AlreadyOn);
        std::fs::remove_file(&key).unwrap();
        std::os::unix::fs::symlink("/proc/sys/kernel/ngroups_max", &key).unwrap();
        let e = s.ensure(IPV4_FORWARD).unwrap_err().to_string();
        assert!(
            e.contains("cannot be set"),
            "a value other than 1 is written: {e}"
        );
        std::fs::remove_file(&key).unwrap();
        std::fs::write(&key, "1\n").unwrap();
        assert_eq!(s.ensure(IPV4_FORWARD).unwrap(), Ensured::AlreadyOn);
    }

    #[test]
    fn an_off_value_that_cannot_be_written_names_the_host_setting() {
        let proc = fake_proc("0", "0");
        let key = proc.path().join("net/ipv4/ip_forward");
        std::fs::remove_file(&key).unwrap();
        // Read-only for everyone, root included; it reads a number other than 1.
        std::os::unix::fs::symlink("/proc/sys/kernel/ngroups_max", &key).unwrap();
        let record = proc.path().join("state/sysctl");
        let e = Sysctls::new(proc.path(), Some(record))
            .ensure(IPV4_FORWARD)
            .unwrap_err();
        assert!(matches!(e, ForwardingError::Write { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("net.ipv4.ip_forward is "), "{e}");
        assert!(e.contains("sysctl -w net.ipv4.ip_forward=1"), "{e}");
        assert!(e.contains("/etc/sysctl.d/"), "{e}");
    }

    #[test]
    fn cleanup_restores_only_what_wiremesh_turned_on_and_still_holds() {
        let proc = fake_proc("0", "0");
        let record = proc.path().join("state/sysctl");
        let s = Sysctls::new(proc.path(), Some(record.clone()));
        assert_eq!(
            s.ensure(IPV4_FORWARD).unwrap(),
            Ensured::TurnedOn {
                previous: "0".into()
            }
        );
        assert_eq!(s.read(IPV4_FORWARD).unwrap(), "1");
        // A restarted agent finds 1 and records nothing new; the first value stays.
        assert_eq!(s.ensure(IPV4_FORWARD).unwrap(), Ensured::AlreadyOn);
        assert_eq!(
            load_record(&record).unwrap(),
            vec![(IPV4_FORWARD.to_owned(), "0".to_owned())]
        );
        assert_eq!(s.read(IPV6_FORWARD).unwrap(), "0", "IPv6 never touched");
        assert_eq!(
            s.restore().unwrap(),
            vec![Restored::Restored {
                key: IPV4_FORWARD.into(),
                value: "0".into()
            }]
        );
        assert_eq!(s.read(IPV4_FORWARD).unwrap(), "0");
        assert!(!record.exists());
        // Nothing recorded: cleanup writes nothing, and never turns forwarding on.
        std::fs::write(proc.path().join("net/ipv4/ip_forward"), "1\n").unwrap();
        assert!(s.restore().unwrap().is_empty());
        assert_eq!(s.read(IPV4_FORWARD).unwrap(), "1");
        assert_eq!(s.read(IPV6_FORWARD).unwrap(), "0");
    }

    #[test]
    fn a_key_changed_since_is_left_and_the_record_honours_only_forwarding_keys() {
        let proc = fake_proc("0", "0");
        let record = proc.path().join("sysctl");
        std::fs::write(
            &record,
            "# c\nnet.ipv4.ip_forward=0\nkernel.panic=1\nnet.ipv6.conf.all.forwarding=x\n",
        )
        .unwrap();
        let s = Sysctls::new(proc.path(), Some(record.clone()));
        // ip_forward is 0 now, not the 1 wiremesh set: someone changed it.
        assert_eq!(
            s.restore().unwrap(),
            vec![Restored::Changed {
                key: IPV4_FORWARD.into(),
                now: "0".into()
            }]
        );
        assert!(!record.exists());
    }
}
