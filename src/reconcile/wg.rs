//! The WireGuard device: create it (kernel link or userspace daemon), set its private key and
//! listen port, read it back, and add, change or remove single peers without touching the others.
//!
//! I/O edge of the reconciler. Depends on the model, the desired state and [`super::plan`]
//! (`WgDeviceState`, `Op`), on `wireguard-control` (kernel netlink and the userspace UAPI socket),
//! `nix` (namespaces, signals), `/proc`, and on `tokio` only to move blocking calls off the
//! runtime. Never on the topology engine or Kubernetes.
//!
//! # Backends
//!
//! [`WgMode::Auto`] picks the kernel module when [`detect_kernel_wireguard`] finds it
//! (`/sys/module/wireguard` exists, or the kernel accepts a throw-away link of kind `wireguard`,
//! which also makes it autoload the module), and a userspace daemon otherwise. The daemon is
//! `wireguard-go` unless `WG_USERSPACE_IMPLEMENTATION` (or wg-quick's
//! `WG_QUICK_USERSPACE_IMPLEMENTATION`) names another binary that takes the same arguments.
//!
//! # The userspace daemon outlives the agent
//!
//! [`WgDevice::create`] starts `wireguard-go NAME` *without* `-f`: it daemonizes (re-executes
//! itself and exits), so the tunnel keeps running when the agent crashes or is killed, and the
//! daemon is never the agent's child. It also gets its own process group, so a signal sent to the
//! agent's group (Ctrl-C) does not reach it. A restarted agent finds the socket answering and
//! *adopts* the daemon; it finds its PID by the process that holds the listening socket
//! (`/proc/PID/fd` against `/proc/PID/net/unix`), never by name alone. Note: in a container where
//! the agent is PID 1, the runtime kills the whole container when the agent exits; survival then
//! needs a minimal init in the container.
//!
//! # The private key
//!
//! [`PrivateKey`] prints as `<redacted>` and has no accessor for its bytes. It is read from a file
//! by [`load_or_generate_private_key`]; errors name the file, never its content.
//!
//! # Surprises this module works around
//!
//! * `wireguard-control`'s userspace `apply` silently starts `wireguard-go NAME` when no socket
//!   answers, in whatever namespace the calling thread is, and forgets it; its kernel `apply`
//!   first sends RTM_NEWLINK, re-creating a deleted link. Every write here first checks that the
//!   device exists and fails otherwise, so only [`WgDevice::create`] ever creates one.
//! * `wireguard-control`'s userspace backend prints to stdout (`ERROR <errno>` on a refused
//!   update, `got unsupported info: …` for UAPI keys it does not know) and has no socket timeout:
//!   a daemon that accepts but never answers blocks the calling (blocking-pool) thread.
//! * The socket `/run/wireguard/NAME.sock` is global, not per network namespace (lab notes §3): a
//!   daemon found for our name is only adopted when it runs in our network namespace.
//! * wireguard-go rebinds its UDP socket on every `listen_port=` line, even an unchanged one, so
//!   [`WgDevice::configure`] sends only the settings that differ.
//! * A kernel dump splits a peer with many allowed IPs over several messages, each repeating the
//!   public key; `wireguard-control` returns them as separate peers, so [`WgDevice::read`] merges.
//! * Both backends report an all-zero preshared key for "none", and keepalive 0 for "off".
//! * WireGuard cannot clear a peer's endpoint: a peer whose desired endpoint is `None` keeps the
//!   one it has (set earlier or learnt from its packets).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use ipnetwork::IpNetwork;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use wireguard_control::{
    Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder, PeerInfo, backends,
};

use super::{KernelError, Op, WgDeviceState};
use crate::desired::WgPeer;
use crate::model::{Endpoint, WgKey};

/// How long [`WgDevice::create`] waits for a new userspace daemon's socket to answer.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`WgDevice::delete`] waits for a daemon to exit after SIGTERM before SIGKILL.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Peers per update: bounds one UAPI request (about 150 KB) and what one failed request takes
/// down. The kernel backend also splits each update into netlink messages that fit the socket
/// buffer (`wireguard-control` does that part).
pub const PEERS_PER_UPDATE: usize = 500;

// ---------------------------------------------------------------------------------------------
// Mode and backend
// ---------------------------------------------------------------------------------------------

/// Which WireGuard implementation to use (`--wireguard auto|kernel|userspace`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum WgMode {
    /// The kernel module where it exists, else the userspace daemon.
    #[default]
    Auto,
    /// The kernel module only; creating the device fails without it.
    Kernel,
    /// The userspace daemon (`wireguard-go`) only.
    Userspace,
}

impl FromStr for WgMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(WgMode::Auto),
            "kernel" => Ok(WgMode::Kernel),
            "userspace" => Ok(WgMode::Userspace),
            other => Err(format!(
                "{other:?} is not a wireguard mode (auto, kernel or userspace)"
            )),
        }
    }
}

impl fmt::Display for WgMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WgMode::Auto => "auto",
            WgMode::Kernel => "kernel",
            WgMode::Userspace => "userspace",
        })
    }
}

/// The implementation a [`WgDevice`] actually uses: [`WgMode`] with `Auto` resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgBackend {
    /// The kernel module, configured over generic netlink.
    Kernel,
    /// A userspace daemon, configured over its UAPI socket.
    Userspace,
}

impl fmt::Display for WgBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WgBackend::Kernel => "kernel",
            WgBackend::Userspace => "userspace",
        })
    }
}

impl WgBackend {
    fn control(self) -> Backend {
        match self {
            WgBackend::Kernel => Backend::Kernel,
            WgBackend::Userspace => Backend::Userspace,
        }
    }
}

/// Whether the kernel can hold WireGuard links; `Err` says why not.
///
/// `/sys/module/wireguard` exists when the module is loaded (or built in with parameters). When it
/// does not, a link of kind `wireguard` named `wmprobe<pid>` is created in `netns` (or the
/// caller's namespace) and deleted again: the kernel autoloads the module on that request, and
/// refuses it with "Operation not supported" when there is none.
pub fn detect_kernel_wireguard(netns: Option<&Path>) -> Result<(), KernelError> {
    if Path::new("/sys/module/wireguard").exists() {
        return Ok(());
    }
    let name = format!("wmprobe{}", std::process::id());
    let op = "probe kernel wireguard";
    let iface: InterfaceName = name
        .parse()
        .map_err(|e: wireguard_control::InvalidInterfaceName| wg_err(op, e))?;
    in_netns(netns, || {
        if link_exists(&name)? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("probe link {name} already exists"),
            ));
        }
        // An empty update only sends RTM_NEWLINK (kind wireguard), nothing else.
        DeviceUpdate::new().apply(&iface, Backend::Kernel)?;
        backends::kernel::delete_interface(&iface)
    })
    .and_then(|r| r)
    .map_err(|e| {
        wg_err(
            op,
            format!(
                "/sys/module/wireguard is absent and the kernel refused a wireguard link ({e})"
            ),
        )
    })
}

/// The backend `mode` stands for; `Auto` probes the kernel in `netns` (see
/// [`detect_kernel_wireguard`]) and never fails.
pub fn resolve_backend(mode: WgMode, netns: Option<&Path>) -> WgBackend {
    match mode {
        WgMode::Kernel => WgBackend::Kernel,
        WgMode::Userspace => WgBackend::Userspace,
        WgMode::Auto => match detect_kernel_wireguard(netns) {
            Ok(()) => WgBackend::Kernel,
            Err(e) => {
                tracing::info!(reason = %e, "no kernel WireGuard: using the userspace daemon");
                WgBackend::Userspace
            }
        },
    }
}

/// The userspace implementation to run: `$WG_USERSPACE_IMPLEMENTATION`, else
/// `$WG_QUICK_USERSPACE_IMPLEMENTATION` (as wg-quick), else `wireguard-go`.
pub fn userspace_binary_from_env() -> PathBuf {
    std::env::var_os("WG_USERSPACE_IMPLEMENTATION")
        .or_else(|| std::env::var_os("WG_QUICK_USERSPACE_IMPLEMENTATION"))
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("wireguard-go"), PathBuf::from)
}

// ---------------------------------------------------------------------------------------------
// Private key
// ---------------------------------------------------------------------------------------------

/// A WireGuard private key. Prints as `<redacted>`; its bytes never leave this module except to
/// the device.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A new random key (clamped for X25519), from the OS random source.
    pub fn generate() -> PrivateKey {
        PrivateKey(Key::generate_private().0)
    }

    /// The public key that belongs to this private key.
    pub fn public_key(&self) -> WgKey {
        WgKey(self.control().get_public().0)
    }

    fn control(&self) -> Key {
        Key(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Read the base64 private key at `path`, or create the file with a new key when it is missing.
///
/// * A new file is written atomically (temporary file, then a hard link, so two agents racing to
///   create it end up with the same key), mode 0600; missing parent directories get mode 0700.
/// * An existing file with any group or world permission is a leak in progress: the mode is set
///   to 0600 and a warning logged. If that fails (e.g. a read-only Secret volume mounted with
///   `defaultMode: 0644`), loading fails: mount it with mode 0400 or 0600 instead. The key is
///   not rotated: if the file was exposed, replace it yourself.
/// * Errors name the file, never what is in it.
pub fn load_or_generate_private_key(path: &Path) -> Result<PrivateKey, KernelError> {
    match read_key_file(path) {
        Err(KernelError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            write_new_key_file(path)
        }
        other => other,
    }
}

/// Read the key at `path`: a regular file (a symbolic link is refused, not followed) holding a
/// base64 key. Only once it is known to be a key is a mode readable by others tightened to
/// 0600, so a wrong path never changes an unrelated file.
fn read_key_file(path: &Path) -> Result<PrivateKey, KernelError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let op = format!("read private key {}", path.display());
    let io_err = |source| KernelError::Io {
        op: op.clone(),
        source,
    };
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(wg_err(&op, "a symbolic link; give the key file itself"));
        }
        Err(e) => return Err(io_err(e)),
    };
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(wg_err(&op, "not a regular file"));
    }
    // A key is 44 characters; read a little more to tell "too long" from "just right".
    let mut text = String::new();
    (&mut file)
        .take(256)
        .read_to_string(&mut text)
        .map_err(|e| {
            // The io error of a non-UTF-8 file says nothing about its bytes, but keep it generic.
            io_err(io::Error::new(e.kind(), "not valid UTF-8 text"))
        })?;
    let key = decode_private_key(text.trim()).ok_or_else(|| {
        wg_err(
            &op,
            "not a base64-encoded 32-byte key (as written by `wg genkey`)",
        )
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "private key file is readable by others; setting mode 0600"
        );
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|source| KernelError::Io {
                op: format!(
                    "{op}: mode is {mode:o} and cannot be set to 0600 (mount it with mode 0400 or 0600)"
                ),
                source,
            })?;
    }
    Ok(key)
}

fn decode_private_key(text: &str) -> Option<PrivateKey> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    let arr: [u8; 32] = bytes.as_slice().try_into().ok()?;
    Some(PrivateKey(arr))
}

fn write_new_key_file(path: &Path) -> Result<PrivateKey, KernelError> {
    let key = PrivateKey::generate();
    // A hard link never replaces: if another agent created the file meanwhile, use its key.
    match write_key_file(path, &key, |tmp, path| fs::hard_link(tmp, path)) {
        Ok(()) => {
            tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new WireGuard private key");
            Ok(key)
        }
        Err(KeyFileError::Io(e)) if e.kind() == io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(e) => Err(e.into_kernel(path, "write new private key")),
    }
}

/// Replace the key file at `path` with `key` (key rotation): written to a temporary file of
/// mode 0600 beside it, synced, then renamed over it, so a crash leaves the old key or the new
/// one, never half of one. A symbolic link at `path` is refused, as when reading.
pub fn replace_key_file(path: &Path, key: &PrivateKey) -> Result<(), KernelError> {
    const OP: &str = "replace private key";
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(wg_err(
            format!("{OP} {}", path.display()),
            "a symbolic link; give the key file itself",
        ));
    }
    write_key_file(path, key, |tmp, path| fs::rename(tmp, path))
        .map_err(|e| e.into_kernel(path, OP))
}

/// Why a key file could not be written.
enum KeyFileError {
    Io(io::Error),
    NoFileName,
}

impl KeyFileError {
    fn into_kernel(self, path: &Path, what: &str) -> KernelError {
        let op = format!("{what} {}", path.display());
        match self {
            KeyFileError::Io(source) => KernelError::Io { op, source },
            KeyFileError::NoFileName => wg_err(&op, "the path has no file name"),
        }
    }
}

/// Write `key` to a temporary file of mode 0600 in `path`'s directory (created 0700 if
/// missing), sync it, and put it in place with `place(tmp, path)`; the directory is synced after.
fn write_key_file(
    path: &Path,
    key: &PrivateKey,
    place: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> Result<(), KeyFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(KeyFileError::Io)?;
    let file_name = path.file_name().ok_or(KeyFileError::NoFileName)?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        next_id()
    ));
    let text = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(key.0)
    );
    let written = (|| {
        // mode() applies at creation, before any byte is written: the key is never readable by
        // others, whatever the umask.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        place(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    written.map_err(KeyFileError::Io)?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------------------------

/// How to reach a device: which implementation, which daemon binary, which network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgOptions {
    /// `--wireguard`: kernel, userspace or automatic.
    pub mode: WgMode,
    /// The userspace daemon to start (see [`userspace_binary_from_env`]).
    pub userspace_binary: PathBuf,
    /// Create the device in this network namespace (a `/run/netns/NAME` or `/proc/PID/ns/net`
    /// path) instead of the agent's own. For tests and for agents that manage another namespace.
    pub netns: Option<PathBuf>,
}

impl WgOptions {
    /// Options for `mode`, with the userspace binary from the environment and no namespace.
    pub fn new(mode: WgMode) -> WgOptions {
        WgOptions {
            mode,
            userspace_binary: userspace_binary_from_env(),
            netns: None,
        }
    }
}

/// One WireGuard interface, by name, on a resolved backend, with the private key it must hold.
///
/// A handle, not the device: creating, cloning or dropping it changes nothing in the system. All
/// methods block (netlink, a Unix socket, process start); the `async` ones run the blocking ones
/// on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct WgDevice {
    name: String,
    iface: InterfaceName,
    backend: WgBackend,
    userspace_binary: PathBuf,
    netns: Option<PathBuf>,
    private_key: PrivateKey,
}

/// What [`WgDevice::create`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The userspace daemon's PID, when known (always `None` for the kernel backend).
    pub pid: Option<u32>,
    /// Whether the device already existed and was taken over rather than created.
    pub adopted: bool,
}

/// A peer's live state, as the device reports it: where it is, what it routes, its handshake
/// and counters. Nothing secret: no preshared key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerStats {
    /// The peer's public key.
    pub public_key: WgKey,
    /// Its current endpoint (set, or learnt from its packets), if any.
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs, sorted.
    pub allowed_ips: Vec<IpNetwork>,
    /// When the last handshake completed; `None` if never.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// A read-only handle on a WireGuard interface that holds no key: what the agent's HTTP
/// endpoint reads at scrape time ([`WgReader::peer_stats`]). Cheap to clone; blocking.
#[derive(Debug, Clone)]
pub struct WgReader {
    name: String,
    iface: InterfaceName,
    backend: WgBackend,
    netns: Option<PathBuf>,
}

impl WgReader {
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Each peer's endpoint, allowed IPs, handshake time and byte counters, sorted by key;
    /// empty when the device does not exist. One netlink dump or one UAPI `get`.
    pub fn peer_stats(&self) -> Result<Vec<WgPeerStats>, KernelError> {
        Ok(
            get_device(&self.name, self.iface, self.backend, self.netns.as_deref())?
                .map(|d| stats_of(&d.peers))
                .unwrap_or_default(),
        )
    }
}

/// What [`WgDevice::apply_peers`] did. Peers in neither list nor `failed` were not touched.
#[derive(Debug, Default)]
pub struct PeersApplied {
    /// Peers added or changed.
    pub upserted: Vec<WgKey>,
    /// Peers removed (or already absent).
    pub removed: Vec<WgKey>,
    /// Peers left as they were, with the reason (e.g. an endpoint name that does not resolve).
    pub failed: Vec<(WgKey, KernelError)>,
}

impl WgDevice {
    /// A handle for interface `name` holding `private_key`; `Auto` is resolved now (see
    /// [`resolve_backend`]). Fails only for an invalid interface name.
    pub fn new(
        name: &str,
        private_key: PrivateKey,
        opts: &WgOptions,
    ) -> Result<WgDevice, KernelError> {
        let iface: InterfaceName =
            name.parse()
                .map_err(|e: wireguard_control::InvalidInterfaceName| {
                    wg_err(format!("interface name {name:?}"), e)
                })?;
        Ok(WgDevice {
            name: name.to_owned(),
            iface,
            backend: resolve_backend(opts.mode, opts.netns.as_deref()),
            userspace_binary: opts.userspace_binary.clone(),
            netns: opts.netns.clone(),
            private_key,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The implementation in use.
    pub fn backend(&self) -> WgBackend {
        self.backend
    }

    /// The userspace daemon binary (used by the userspace backend only).
    pub fn userspace_binary(&self) -> &Path {
        &self.userspace_binary
    }

    /// The public key of the device's private key: what other nodes must know.
    pub fn public_key(&self) -> WgKey {
        self.private_key.public_key()
    }

    /// The userspace daemon's UAPI socket: `/var/run/wireguard/NAME.sock` when that directory
    /// exists, else `/run/wireguard/NAME.sock` (the same rule as wireguard-go and
    /// `wireguard-control`).
    pub fn socket_path(&self) -> PathBuf {
        socket_dir().join(format!("{}.sock", self.name))
    }

    /// Create the interface, or adopt it if it exists (`ip link add NAME type wireguard`, or
    /// start `wireguard-go NAME`). Sets nothing on it: see [`Self::configure`].
    ///
    /// Kernel: the link is created over rtnetlink (by `wireguard-control`'s netlink code); an
    /// existing WireGuard link of that name is adopted, any other link of that name is an error.
    /// Userspace: a daemon whose socket answers is adopted (when it runs in our network
    /// namespace); otherwise the daemon is started and this waits up to
    /// [`DAEMON_START_TIMEOUT`] for its socket to answer. A daemon killed with SIGKILL leaves a
    /// stale socket; the new one removes it itself.
    pub fn create(&self) -> Result<Created, KernelError> {
        match self.backend {
            WgBackend::Kernel => self.create_kernel(),
            WgBackend::Userspace => self.create_userspace(),
        }
    }

    fn create_kernel(&self) -> Result<Created, KernelError> {
        let op = format!("create wireguard link {}", self.name);
        let iface = self.iface;
        let adopted = in_netns(self.netns.as_deref(), || -> io::Result<bool> {
            if link_exists(iface.as_str_lossy().as_ref())? {
                // Only a WireGuard link answers the generic-netlink get.
                Device::get(&iface, Backend::Kernel).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("a link of that name exists and is not a WireGuard link ({e})"),
                    )
                })?;
                return Ok(true);
            }
            DeviceUpdate::new().apply(&iface, Backend::Kernel)?;
            Ok(false)
        })
        .and_then(|r| r)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                wg_err(
                    &op,
                    format!(
                        "this kernel has no WireGuard support ({e}); load the wireguard module or \
                         run with --wireguard userspace (or auto)"
                    ),
                )
            } else {
                wg_err(&op, e)
            }
        })?;
        Ok(Created { pid: None, adopted })
    }

    fn create_userspace(&self) -> Result<Created, KernelError> {
        let op = format!("start {} {}", self.userspace_binary.display(), self.name);
        if self.get_device()?.is_some() {
            let pid = find_daemon_pid(&self.name);
            if let Some(pid) = pid {
                self.check_daemon_netns(pid)
                    .map_err(|m| wg_err(format!("adopt {}", self.name), m))?;
            }
            tracing::info!(interface = %self.name, pid, "adopted the running userspace WireGuard daemon");
            return Ok(Created { pid, adopted: true });
        }
        // The launcher's output goes to an unlinked file, not a pipe: if the daemon inherited a
        // pipe (wireguard-go passes its stdout on when LOG_LEVEL is set; other daemons may
        // always) reading it would wait for the daemon to exit.
        let mut log = anonymous_file().map_err(|source| KernelError::Io {
            op: op.clone(),
            source,
        })?;
        let (out, err) = match (log.try_clone(), log.try_clone()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(source), _) | (_, Err(source)) => {
                return Err(KernelError::Io { op, source });
            }
        };
        let mut cmd = Command::new(&self.userspace_binary);
        cmd.arg(&self.name)
            // A foreground flag or inherited descriptors from our own environment would stop
            // wireguard-go from daemonizing or make it use the wrong files.
            .env_remove("WG_PROCESS_FOREGROUND")
            .env_remove("WG_TUN_FD")
            .env_remove("WG_UAPI_FD")
            .env_remove("LOG_LEVEL")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group: a signal to the agent's group must not stop the tunnel.
            .process_group(0);
        let mut launcher = in_netns(self.netns.as_deref(), || cmd.spawn())
            .and_then(|r| r)
            .map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::NotFound {
                    " (install it, or set WG_USERSPACE_IMPLEMENTATION)"
                } else {
                    ""
                };
                wg_err(&op, format!("{e}{hint}"))
            })?;
        // wireguard-go binds and listens *before* it forks, so the socket may answer while the
        // launcher still runs: wait for the launcher to exit first, then for the socket.
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        let mut launcher_done = false;
        loop {
            if !launcher_done
                && let Some(status) = launcher.try_wait().map_err(|e| wg_err(&op, e))?
            {
                launcher_done = true;
                if !status.success() {
                    return Err(wg_err(
                        &op,
                        format!("exited with {status}: {}", read_tail(&mut log)),
                    ));
                }
            }
            if launcher_done && self.socket_answers() {
                break;
            }
            if Instant::now() >= deadline {
                if !launcher_done && self.socket_answers() {
                    // A binary that does not daemonize: it is the daemon. Reap it when it exits
                    // so it does not stay a zombie while the agent runs.
                    let pid = launcher.id();
                    std::thread::spawn(move || launcher.wait());
                    tracing::warn!(interface = %self.name, pid, "the userspace daemon did not daemonize");
                    return Ok(Created {
                        pid: Some(pid),
                        adopted: false,
                    });
                }
                if !launcher_done {
                    let _ = launcher.kill();
                    let _ = launcher.wait();
                }
                return Err(wg_err(
                    &op,
                    format!(
                        "{} did not answer within {:?}: {}",
                        self.socket_path().display(),
                        DAEMON_START_TIMEOUT,
                        read_tail(&mut log)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = find_daemon_pid(&self.name);
        tracing::info!(interface = %self.name, pid, binary = %self.userspace_binary.display(), "started the userspace WireGuard daemon");
        Ok(Created {
            pid,
            adopted: false,
        })
    }

    /// The device's listen port, public key and peers; `None` when the device does not exist.
    /// Peers are sorted by key, their allowed IPs sorted, their `name` empty.
    pub fn read(&self) -> Result<Option<WgDeviceState>, KernelError> {
        Ok(self.get_device()?.map(|d| device_state(&d)))
    }

    /// Each peer's endpoint, allowed IPs, handshake time and byte counters, sorted by key;
    /// empty when the device does not exist.
    pub fn peer_stats(&self) -> Result<Vec<WgPeerStats>, KernelError> {
        self.reader().peer_stats()
    }

    /// A handle that only reads this interface and holds no key.
    pub fn reader(&self) -> WgReader {
        WgReader {
            name: self.name.clone(),
            iface: self.iface,
            backend: self.backend,
            netns: self.netns.clone(),
        }
    }

    /// Hold `key` from now on: the next [`Self::configure`] gives it to the device (rotation).
    pub fn set_private_key(&mut self, key: PrivateKey) {
        self.private_key = key;
    }

    /// Set the private key and listen port; peers are not touched (no `replace_peers`). Only
    /// what differs from the device is sent: wireguard-go rebinds on any `listen_port`.
    pub fn configure(&self, listen_port: u16) -> Result<(), KernelError> {
        let op = format!("configure {}", self.name);
        let current = self
            .get_device()?
            .ok_or_else(|| wg_err(&op, "the device does not exist"))?;
        let mut update = DeviceUpdate::new();
        let mut changed = false;
        if current.public_key.as_ref().map(|k| k.0) != Some(self.public_key().0) {
            update = update.set_private_key(self.private_key.control());
            changed = true;
        }
        if current.listen_port != Some(listen_port) {
            update = update.set_listen_port(listen_port);
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        // The update holds the private key: its error text is reduced to the OS error, in case a
        // library ever formats the request into it.
        self.apply_update(update).map_err(|e| {
            let message = match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code).to_string(),
                None => e.kind().to_string(),
            };
            wg_err(&op, message)
        })
    }

    /// Add or change the peers of `upsert` (their allowed IPs replace the old ones; keepalive and
    /// preshared key are always set, 0 and none included) and remove the peers of `remove`.
    /// Other peers are not touched: no `replace_peers`, which would cut every session.
    ///
    /// DNS endpoints are resolved here (IPv4 preferred, like Kilo). A peer whose name does not
    /// resolve, or that the device refuses, is reported in [`PeersApplied::failed`] and the rest
    /// is still applied. `Err` means the device could not be reached at all.
    pub fn apply_peers(
        &self,
        upsert: &[WgPeer],
        remove: &[WgKey],
    ) -> Result<PeersApplied, KernelError> {
        let changes = remove
            .iter()
            .map(|k| PeerChange::Remove(*k))
            .chain(upsert.iter().cloned().map(PeerChange::Upsert))
            .collect();
        self.apply_changes(changes)
    }

    /// Apply peer `changes` as [`Self::apply_peers`] does; a [`PeerChange::AllowedIps`] sends
    /// the peer's key and allowed IPs only (a renumbered peer: nothing else of it is touched).
    pub fn apply_changes(&self, changes: Vec<PeerChange>) -> Result<PeersApplied, KernelError> {
        let mut result = PeersApplied::default();
        if changes.is_empty() {
            return Ok(result);
        }
        let op = format!("apply peers to {}", self.name);
        if !self.exists().map_err(|e| wg_err(&op, e))? {
            return Err(wg_err(&op, "the device does not exist"));
        }
        // Removals first: a key that is both removed and upserted ends up present.
        let mut items: Vec<(WgKey, bool, PeerConfigBuilder)> = Vec::with_capacity(changes.len());
        let (removals, others): (Vec<PeerChange>, Vec<PeerChange>) = changes
            .into_iter()
            .partition(|c| matches!(c, PeerChange::Remove(_)));
        for change in removals.into_iter().chain(others) {
            match change {
                PeerChange::Remove(k) => {
                    items.push((k, false, PeerConfigBuilder::new(&Key(k.0)).remove()));
                }
                PeerChange::AllowedIps(k, allowed) => {
                    let mut b = PeerConfigBuilder::new(&Key(k.0)).replace_allowed_ips();
                    for net in &allowed {
                        b = b.add_allowed_ip(net.network(), net.prefix());
                    }
                    items.push((k, true, b));
                }
                PeerChange::Upsert(p) => {
                    let endpoint = match &p.endpoint {
                        Some(e) => match resolve_endpoint(e) {
                            Ok(a) => Some(a),
                            Err(e) => {
                                result.failed.push((p.public_key, e));
                                continue;
                            }
                        },
                        None => None,
                    };
                    items.push((p.public_key, true, peer_builder(&p, endpoint)));
                }
            }
        }
        for chunk in items.chunks(PEERS_PER_UPDATE) {
            let update = DeviceUpdate::new()
                .add_peers(&chunk.iter().map(|(_, _, b)| b.clone()).collect::<Vec<_>>());
            match self.apply_update(update) {
                Ok(()) => record(&mut result, chunk.iter().map(|(k, up, _)| (*k, *up))),
                Err(e) => {
                    tracing::warn!(interface = %self.name, error = %e, peers = chunk.len(), "peer update failed; retrying one peer at a time");
                    // Find the peers the device refuses; the others go through.
                    for (key, up, builder) in chunk {
                        match self.apply_update(DeviceUpdate::new().add_peer(builder.clone())) {
                            Ok(()) => record(&mut result, [(*key, *up)]),
                            Err(e) => {
                                let verb = if *up { "upsert" } else { "remove" };
                                result.failed.push((
                                    *key,
                                    wg_err(format!("{verb} peer {key} on {}", self.name), e),
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(result)
    }

    /// Remove the device: delete the kernel link, or stop *our* daemon (the process holding our
    /// socket in our mount namespace) with SIGTERM, SIGKILL after [`DAEMON_STOP_TIMEOUT`].
    /// Nothing to remove is not an error.
    pub fn delete(&self) -> Result<(), KernelError> {
        let op = format!("delete {}", self.name);
        match self.backend {
            WgBackend::Kernel => {
                let iface = self.iface;
                in_netns(
                    self.netns.as_deref(),
                    || match backends::kernel::delete_interface(&iface) {
                        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
                        other => other,
                    },
                )
                .and_then(|r| r)
                .map_err(|e| wg_err(&op, e))
            }
            WgBackend::Userspace => {
                let socket = self.socket_path();
                let Some(pid) = find_daemon_pid(&self.name) else {
                    if self.socket_answers() {
                        return Err(wg_err(
                            &op,
                            format!("{} answers but its process was not found", socket.display()),
                        ));
                    }
                    // A stale socket left by SIGKILL: remove it so `read` sees no device.
                    let _ = fs::remove_file(&socket);
                    return Ok(());
                };
                stop_process(pid, DAEMON_STOP_TIMEOUT).map_err(|e| wg_err(&op, e))?;
                // SIGTERM makes wireguard-go remove its socket; after SIGKILL it stays.
                let _ = fs::remove_file(&socket);
                tracing::info!(interface = %self.name, pid, "stopped the userspace WireGuard daemon");
                Ok(())
            }
        }
    }

    /// The PID of the userspace daemon serving this device, if one runs (see the module docs).
    pub fn daemon_pid(&self) -> Option<u32> {
        match self.backend {
            WgBackend::Kernel => None,
            WgBackend::Userspace => find_daemon_pid(&self.name),
        }
    }

    // -- async layer for the orchestrator ------------------------------------------------------

    /// [`Self::read`] on the blocking pool.
    pub async fn read_state(&self) -> Result<Option<WgDeviceState>, KernelError> {
        self.blocking("read", |d| d.read()).await
    }

    /// Apply one WireGuard operation (`CreateInterface`, `ConfigureDevice`, `UpsertPeer`,
    /// `SetAllowedIps`, `RemovePeer`) on the blocking pool; `None` for any other operation (not ours).
    pub async fn apply_op(&self, op: &Op) -> Option<Result<(), KernelError>> {
        self.apply_ops(std::slice::from_ref(op))
            .await
            .pop()
            .flatten()
    }

    /// Apply `ops` in order, one result per op (`None`: not a WireGuard op). Consecutive
    /// `UpsertPeer`/`SetAllowedIps`/`RemovePeer` ops go to the device as one
    /// [`Self::apply_changes`] call.
    pub async fn apply_ops(&self, ops: &[Op]) -> Vec<Option<Result<(), KernelError>>> {
        let mut out: Vec<Option<Result<(), KernelError>>> = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            match &ops[i] {
                Op::CreateInterface => {
                    out.push(Some(
                        self.blocking("create", |d| d.create().map(drop)).await,
                    ));
                    i += 1;
                }
                Op::ConfigureDevice { listen_port } => {
                    let port = *listen_port;
                    out.push(Some(
                        self.blocking("configure", move |d| d.configure(port)).await,
                    ));
                    i += 1;
                }
                Op::UpsertPeer(_) | Op::SetAllowedIps { .. } | Op::RemovePeer { .. } => {
                    let start = i;
                    while i < ops.len()
                        && matches!(
                            ops[i],
                            Op::UpsertPeer(_) | Op::SetAllowedIps { .. } | Op::RemovePeer { .. }
                        )
                    {
                        i += 1;
                    }
                    out.extend(self.apply_peer_ops(&ops[start..i]).await);
                }
                _ => {
                    out.push(None);
                    i += 1;
                }
            }
        }
        out
    }

    /// The peer operations, [`PEERS_PER_UPDATE`] at a time: only one chunk's peers are copied
    /// for the blocking call and turned into UAPI text at once, whatever the mesh's size.
    async fn apply_peer_ops(&self, ops: &[Op]) -> Vec<Option<Result<(), KernelError>>> {
        let mut out = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(PEERS_PER_UPDATE) {
            out.extend(self.apply_peer_chunk(chunk).await);
        }
        out
    }

    async fn apply_peer_chunk(&self, ops: &[Op]) -> Vec<Option<Result<(), KernelError>>> {
        let changes: Vec<PeerChange> = ops
            .iter()
            .filter_map(|op| match op {
                Op::UpsertPeer(p) => Some(PeerChange::Upsert((**p).clone())),
                Op::SetAllowedIps {
                    public_key,
                    allowed_ips,
                } => Some(PeerChange::AllowedIps(*public_key, allowed_ips.clone())),
                Op::RemovePeer { public_key } => Some(PeerChange::Remove(*public_key)),
                _ => None,
            })
            .collect();
        let res = self
            .blocking("apply peers", move |d| d.apply_changes(changes))
            .await;
        match res {
            Err(e) => ops.iter().map(|_| Some(Err(same_error(&e)))).collect(),
            Ok(mut applied) => {
                ops.iter()
                    .map(|op| {
                        let key = match op {
                            Op::UpsertPeer(p) => p.public_key,
                            Op::SetAllowedIps { public_key, .. }
                            | Op::RemovePeer { public_key } => *public_key,
                            _ => return None,
                        };
                        match applied.failed.iter().position(|(k, _)| *k == key) {
                            Some(pos) => Some(Err(applied.failed.swap_remove(pos).1)),
                            None => Some(Ok(())),
                        }
                    })
                    .collect()
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&WgDevice) -> Result<T, KernelError> + Send + 'static,
    ) -> Result<T, KernelError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .unwrap_or_else(|e| Err(wg_err(format!("{what} {}", self.name), e)))
    }

    // -- helpers -------------------------------------------------------------------------------

    /// The device as `wireguard-control` reads it; `None` when it does not exist.
    fn get_device(&self) -> Result<Option<Device>, KernelError> {
        get_device(&self.name, self.iface, self.backend, self.netns.as_deref())
    }

    fn socket_answers(&self) -> bool {
        UnixStream::connect(self.socket_path()).is_ok()
    }

    /// Whether the device exists, cheaply: the link (kernel) or an answering socket (userspace).
    fn exists(&self) -> io::Result<bool> {
        match self.backend {
            WgBackend::Kernel => {
                in_netns(self.netns.as_deref(), || link_exists(&self.name)).and_then(|r| r)
            }
            WgBackend::Userspace => Ok(self.socket_answers()),
        }
    }

    /// Send one update, only to an existing device: both backends of `wireguard-control` would
    /// otherwise create it (see the module docs), and only [`Self::create`] may.
    fn apply_update(&self, update: DeviceUpdate) -> io::Result<()> {
        let iface = self.iface;
        match self.backend {
            WgBackend::Kernel => in_netns(self.netns.as_deref(), || {
                if !link_exists(&self.name)? {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the device does not exist",
                    ));
                }
                update.apply(&iface, Backend::Kernel)
            })
            .and_then(|r| r),
            WgBackend::Userspace => {
                if !self.socket_answers() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the device does not exist (no daemon answers)",
                    ));
                }
                update.apply(&iface, self.backend.control())
            }
        }
    }

    /// `Err` when daemon `pid` runs in another network namespace than the device's.
    fn check_daemon_netns(&self, pid: u32) -> Result<(), String> {
        let ours = self
            .netns
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"));
        let (a, b) = match (
            fs::metadata(&ours),
            fs::metadata(format!("/proc/{pid}/ns/net")),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            // Cannot tell (e.g. a restricted /proc): trust the socket.
            _ => return Ok(()),
        };
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            Ok(())
        } else {
            Err(format!(
                "the daemon answering {} (pid {pid}) runs in another network namespace; \
                 use a unique interface name or a private /run/wireguard per namespace",
                self.socket_path().display()
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// One change of a device's peers (see [`WgDevice::apply_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Add or change the whole peer.
    Upsert(WgPeer),
    /// Replace the allowed IPs of the peer with this key; nothing else of it changes.
    AllowedIps(WgKey, Vec<IpNetwork>),
    /// Remove the peer with this key.
    Remove(WgKey),
}

fn peer_builder(p: &WgPeer, endpoint: Option<SocketAddr>) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(&Key(p.public_key.0))
        .replace_allowed_ips()
        .set_persistent_keepalive_interval(p.persistent_keepalive);
    b = match p.preshared_key {
        Some(k) => b.set_preshared_key(Key(k.0)),
        None => b.unset_preshared_key(),
    };
    if let Some(e) = endpoint {
        b = b.set_endpoint(e);
    }
    for net in &p.allowed_ips {
        b = b.add_allowed_ip(net.network(), net.prefix());
    }
    b
}

/// Interface `name` as `wireguard-control` reads it; `None` when it does not exist.
fn get_device(
    name: &str,
    iface: InterfaceName,
    backend: WgBackend,
    netns: Option<&Path>,
) -> Result<Option<Device>, KernelError> {
    let got = match backend {
        WgBackend::Kernel => {
            in_netns(netns, || Device::get(&iface, Backend::Kernel)).and_then(|r| r)
        }
        WgBackend::Userspace => Device::get(&iface, Backend::Userspace),
    };
    match got {
        Ok(d) => Ok(Some(d)),
        Err(e) if device_missing(&e) => Ok(None),
        Err(e) => Err(wg_err(format!("read {name}"), e)),
    }
}

/// Live peer states from a device's peers, merged by key (a kernel dump may split a peer) and
/// sorted by key. Preshared keys are not carried over.
fn stats_of(infos: &[PeerInfo]) -> Vec<WgPeerStats> {
    let mut by_key: BTreeMap<WgKey, WgPeerStats> = BTreeMap::new();
    for p in infos {
        let key = WgKey(p.config.public_key.0);
        let s = by_key.entry(key).or_insert_with(|| WgPeerStats {
            public_key: key,
            endpoint: p.config.endpoint.map(normalize),
            allowed_ips: Vec::new(),
            last_handshake: p.stats.last_handshake_time,
            rx_bytes: p.stats.rx_bytes,
            tx_bytes: p.stats.tx_bytes,
        });
        s.allowed_ips.extend(
            p.config
                .allowed_ips
                .iter()
                .filter_map(|a| IpNetwork::new(a.address, a.cidr).ok()),
        );
    }
    by_key
        .into_values()
        .map(|mut s| {
            s.allowed_ips.sort();
            s.allowed_ips.dedup();
            s
        })
        .collect()
}

fn device_state(d: &Device) -> WgDeviceState {
    state_of(d.listen_port, d.public_key.as_ref(), &d.peers)
}

/// `Device` is `#[non_exhaustive]`, so the conversion takes its parts (and tests can call it).
fn state_of(
    listen_port: Option<u16>,
    public_key: Option<&Key>,
    infos: &[PeerInfo],
) -> WgDeviceState {
    let mut peers: BTreeMap<WgKey, WgPeer> = BTreeMap::new();
    let mut recent: Vec<WgKey> = Vec::new();
    let now = std::time::SystemTime::now();
    for info in infos {
        let c = &info.config;
        // A handshake within REJECT_AFTER_TIME (180 s) means the session is alive.
        if info
            .stats
            .last_handshake_time
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(180))
        {
            recent.push(WgKey(c.public_key.0));
        }
        let key = WgKey(c.public_key.0);
        let peer = peers.entry(key).or_insert_with(|| WgPeer {
            public_key: key,
            endpoint: c.endpoint.map(|a| Endpoint::Addr(normalize(a))),
            allowed_ips: Vec::new(),
            persistent_keepalive: c.persistent_keepalive_interval.unwrap_or(0),
            preshared_key: c
                .preshared_key
                .as_ref()
                .filter(|k| k.0 != [0u8; 32])
                .map(|k| WgKey(k.0)),
            name: String::new(),
        });
        peer.allowed_ips.extend(
            c.allowed_ips
                .iter()
                .filter_map(|a| IpNetwork::new(a.address, a.cidr).ok()),
        );
    }
    let peers = peers
        .into_values()
        .map(|mut p| {
            p.allowed_ips.sort();
            p.allowed_ips.dedup();
            p
        })
        .collect();
    recent.sort();
    recent.dedup();
    WgDeviceState {
        listen_port: listen_port.unwrap_or(0),
        public_key: public_key.map(|k| WgKey(k.0)),
        peers,
        recent_handshakes: recent,
    }
}

/// IPv4-mapped IPv6 as IPv4, no flow info or scope: the model's form of an address.
fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddr::new((*v6.ip()).into(), v6.port()),
        },
        v4 => v4,
    }
}

/// The socket address for `endpoint`: the address itself, or the name resolved (blocking, via
/// the system resolver), preferring an IPv4 address like Kilo (Go's resolver) does.
pub fn resolve_endpoint(endpoint: &Endpoint) -> Result<SocketAddr, KernelError> {
    match endpoint {
        Endpoint::Addr(a) => Ok(*a),
        Endpoint::Dns { host, port } => {
            let op = format!("resolve endpoint {host}:{port}");
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| wg_err(&op, e))?
                .collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or_else(|| addrs.first())
                .map(|a| normalize(*a))
                .ok_or_else(|| wg_err(&op, "the name has no address"))
        }
    }
}

fn record(result: &mut PeersApplied, items: impl IntoIterator<Item = (WgKey, bool)>) {
    for (k, up) in items {
        if up {
            result.upserted.push(k);
        } else {
            result.removed.push(k);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// System helpers
// ---------------------------------------------------------------------------------------------

fn wg_err(op: impl Into<String>, message: impl fmt::Display) -> KernelError {
    KernelError::WireGuard {
        op: op.into(),
        message: message.to_string(),
    }
}

/// A copy of `e` for each op of a batch that failed as a whole (`KernelError` is not `Clone`).
fn same_error(e: &KernelError) -> KernelError {
    match e {
        KernelError::WireGuard { op, message } => wg_err(op.clone(), message),
        other => wg_err("apply peers", other),
    }
}

fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Whether an error from `Device::get` means "there is no such device".
fn device_missing(e: &io::Error) -> bool {
    // Kernel: ENODEV. Userspace: no socket directory or file (NotFound), a stale socket left by
    // a killed daemon (ConnectionRefused), or a daemon dying under us: its listening socket
    // still took the connection, then closed (ConnectionReset).
    e.raw_os_error() == Some(libc::ENODEV)
        || matches!(
            e.kind(),
            io::ErrorKind::NotFound
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
        )
}

fn socket_dir() -> PathBuf {
    if Path::new("/var/run/wireguard").exists() {
        PathBuf::from("/var/run/wireguard")
    } else {
        PathBuf::from("/run/wireguard")
    }
}

/// Run `f` in network namespace `netns` (or here, for `None`).
///
/// `setns` changes only the calling thread, so `f` runs on a fresh thread that ends with it: no
/// other code (and no pooled tokio thread) ever runs in the wrong namespace. Sockets and processes
/// created by `f` stay in `netns`.
fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let Some(ns) = netns else {
        return Ok(f());
    };
    let ns_file = File::open(ns)?;
    std::thread::scope(|s| {
        s.spawn(move || -> io::Result<T> {
            nix::sched::setns(&ns_file, CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Whether a link `name` exists in the calling thread's network namespace.
fn link_exists(name: &str) -> io::Result<bool> {
    // `thread-self`, not `self`: the thread may have entered another namespace.
    let text = fs::read_to_string("/proc/thread-self/net/dev")?;
    Ok(text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .any(|(n, _)| n.trim() == name))
}

/// An unlinked temporary file: gone when the last descriptor closes.
fn anonymous_file() -> io::Result<File> {
    let path = std::env::temp_dir().join(format!(
        "wiremesh-wg-{}-{}.log",
        std::process::id(),
        next_id()
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    fs::remove_file(&path)?;
    Ok(f)
}

/// The last lines of what a launcher wrote, for an error message.
fn read_tail(f: &mut File) -> String {
    let mut text = String::new();
    if f.rewind().is_ok() {
        let _ = f.take(64 * 1024).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        "no output".to_owned()
    } else {
        tail
    }
}

/// The process serving the UAPI socket of interface `name`: its command line ends with `name`,
/// the socket path means the same file for it as for us, and one of its descriptors is the
/// listening socket bound to `.../wireguard/NAME.sock`.
///
/// "The same file": the process runs in our mount namespace, or our socket file is the one it
/// sees at that path (`/proc/PID/root/…`, same device and inode). The second case is a
/// `wiremesh cleanup` (or a restarted agent) started in a fresh mount namespace that
/// bind-mounts the same directory over `/run/wireguard` as the agent that started the daemon
/// did (`ip netns exec` gives every invocation its own mount namespace).
///
/// Why not `SO_PEERCRED`: wireguard-go binds and listens *before* it daemonizes, so the socket's
/// credentials name the launcher, which has exited.
pub fn find_daemon_pid(name: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let suffix = format!("/wireguard/{name}.sock");
    let our_mnt = fs::read_link("/proc/thread-self/ns/mnt").ok();
    // Canonical, so that no absolute symlink (`/var/run` -> `/run`) is followed under
    // `/proc/PID/root`, where it would resolve in *our* root again.
    let our_socket = fs::canonicalize(socket_dir())
        .ok()
        .map(|d| d.join(format!("{name}.sock")));
    let our_file = our_socket
        .as_ref()
        .and_then(|p| fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()));
    let same_file = |pid: u32| -> bool {
        let (Some(path), Some(ours)) = (&our_socket, our_file) else {
            return false;
        };
        let theirs =
            Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
        fs::metadata(theirs).is_ok_and(|m| (m.dev(), m.ino()) == ours)
    };
    let entries = fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let last = cmdline
            .split(|b| *b == 0)
            .rfind(|a| !a.is_empty())
            .unwrap_or_default();
        if last != name.as_bytes() || process_exited(pid) {
            continue;
        }
        if our_mnt.is_some()
            && fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() != our_mnt
            && !same_file(pid)
        {
            continue;
        }
        let Ok(unix) = fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
            continue;
        };
        let inodes: Vec<String> = unix
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() >= 8 && cols[7].ends_with(&suffix)).then(|| cols[6].to_owned())
            })
            .collect();
        if inodes.is_empty() {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path()).ok().is_some_and(|target| {
                let t = target.to_string_lossy();
                inodes.iter().any(|i| t == format!("socket:[{i}]"))
            })
        });
        if holds {
            return Some(pid);
        }
    }
    None
}

/// Whether `pid` is gone or a zombie.
fn process_exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// SIGTERM, wait up to `timeout`, then SIGKILL.
fn stop_process(pid: u32, timeout: Duration) -> Result<(), String> {
    let target = Pid::from_raw(i32::try_from(pid).map_err(|e| e.to_string())?);
    match nix::sys::signal::kill(target, Signal::SIGTERM) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => return Ok(()),
        Err(e) => return Err(format!("SIGTERM to pid {pid}: {e}")),
    }
    let deadline = Instant::now() + timeout;
    loop {
        // Reap it if it is our child (an agent running as PID 1 inherits orphans).
        let _ = nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        if process_exited(pid) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(pid, "daemon ignored SIGTERM; sending SIGKILL");
    match nix::sys::signal::kill(target, Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(format!("SIGKILL to pid {pid}: {e}")),
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while !process_exited(pid) && Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wireguard_control::{AllowedIp, PeerConfig, PeerStats};

    fn key(b: u8) -> WgKey {
        WgKey([b; 32])
    }

    #[test]
    fn mode_parses_and_prints_the_flag_values() {
        for m in [WgMode::Auto, WgMode::Kernel, WgMode::Userspace] {
            assert_eq!(m.to_string().parse::<WgMode>(), Ok(m));
        }
        assert!("boringtun".parse::<WgMode>().is_err());
        assert_eq!(WgMode::default(), WgMode::Auto);
    }

    #[test]
    fn a_replaced_key_file_holds_the_new_key_with_mode_0600_and_a_link_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let old = load_or_generate_private_key(&path).unwrap();
        let new = PrivateKey::generate();
        replace_key_file(&path, &new).unwrap();
        assert_eq!(load_or_generate_private_key(&path).unwrap(), new);
        assert_ne!(new, old);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != "key")
            .collect();
        assert!(leftovers.is_empty(), "no temporary file is left");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = replace_key_file(&link, &PrivateKey::generate()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(
            load_or_generate_private_key(&path).unwrap(),
            new,
            "untouched"
        );
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let k = PrivateKey::generate();
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.0);
        let shown = format!("{k:?} {:?}", Some(k.clone()));
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains(&b64));
    }

    #[test]
    fn public_key_matches_wireguard_test_vector() {
        // The vector of wireguard-control's own key test.
        let k = decode_private_key("SGb+ojrRNDuMePufwtIYhXzA//k6wF3R21tEBgKlzlM=").unwrap();
        assert_eq!(
            k.public_key().to_string(),
            "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="
        );
    }

    #[test]
    fn key_file_is_created_0600_in_a_0700_dir_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/key");
        let a = load_or_generate_private_key(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let dmeta = fs::metadata(dir.path().join("state/sub")).unwrap();
        assert_eq!(dmeta.mode() & 0o777, 0o700);
        let b = load_or_generate_private_key(&path).unwrap();
        assert_eq!(a, b);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key")]);
    }

    #[test]
    fn key_file_readable_by_others_is_tightened_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let k = PrivateKey::generate();
        fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode(k.0) + "\n",
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_generate_private_key(&path).unwrap(), k);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_file_that_is_not_a_key_keeps_its_mode_and_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("config.yaml");
        fs::write(&other, "not: a key\n").unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_generate_private_key(&other).unwrap_err();
        assert!(e.to_string().contains("not a base64-encoded"), "{e}");
        assert_eq!(
            fs::metadata(&other).unwrap().mode() & 0o777,
            0o644,
            "mode changed"
        );
        // A link to a real key is refused too, and the target is left as it is.
        let key = dir.path().join("real.key");
        fs::write(
            &key,
            base64::engine::general_purpose::STANDARD.encode(PrivateKey::generate().0),
        )
        .unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("key");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let e = load_or_generate_private_key(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(
            fs::metadata(&key).unwrap().mode() & 0o777,
            0o644,
            "target changed"
        );
        // A directory is not a key either, and is not replaced by one.
        let e = load_or_generate_private_key(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn bad_key_file_error_does_not_echo_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
        fs::write(&path, secret).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_generate_private_key(&path).unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(
            shown.contains("not a base64-encoded 32-byte key"),
            "{shown}"
        );
        assert!(!shown.contains(secret), "{shown}");
    }

    #[test]
    fn peer_builder_sets_everything_and_replaces_allowed_ips() {
        let p = WgPeer {
            public_key: key(1),
            endpoint: Some(Endpoint::Addr("10.0.0.1:51820".parse().unwrap())),
            allowed_ips: vec!["10.1.2.3/24".parse().unwrap()],
            persistent_keepalive: 0,
            preshared_key: None,
            name: "n".into(),
        };
        let cfg = peer_builder(&p, Some("10.0.0.1:51820".parse().unwrap()));
        let expected = PeerConfigBuilder::new(&Key([1; 32]))
            .replace_allowed_ips()
            .set_persistent_keepalive_interval(0)
            .unset_preshared_key()
            .set_endpoint("10.0.0.1:51820".parse().unwrap())
            .add_allowed_ip("10.1.2.0".parse().unwrap(), 24);
        assert_eq!(cfg, expected);
    }

    fn info(k: u8, ips: &[&str], psk: [u8; 32]) -> PeerInfo {
        let mut i = PeerInfo::from_public_key(Key([k; 32]));
        i.config = {
            let mut c: PeerConfig = i.config.clone();
            c.allowed_ips = ips
                .iter()
                .map(|s| s.parse::<AllowedIp>().unwrap())
                .collect();
            c.preshared_key = Some(Key(psk));
            c.persistent_keepalive_interval = Some(0);
            c.endpoint = Some("[::ffff:10.0.0.9]:7".parse().unwrap());
            c
        };
        i.stats = PeerStats::default();
        i
    }

    #[test]
    fn read_merges_split_peers_and_maps_zero_psk_to_none() {
        // The kernel repeats a peer when its allowed IPs span two messages.
        let peers = [
            info(2, &["10.0.2.0/24"], [0; 32]),
            info(1, &["10.0.1.0/24"], [7; 32]),
            info(2, &["10.0.0.0/24"], [0; 32]),
        ];
        let s = state_of(Some(51820), Some(&Key([9; 32])), &peers);
        assert_eq!(s.listen_port, 51820);
        assert_eq!(s.public_key, Some(key(9)));
        assert_eq!(s.peers.len(), 2);
        assert_eq!(s.peers[0].public_key, key(1));
        assert_eq!(s.peers[0].preshared_key, Some(key(7)));
        assert_eq!(s.peers[1].preshared_key, None);
        assert_eq!(
            s.peers[1].allowed_ips,
            vec![
                "10.0.0.0/24".parse::<IpNetwork>().unwrap(),
                "10.0.2.0/24".parse().unwrap()
            ]
        );
        assert_eq!(
            s.peers[1].endpoint,
            Some(Endpoint::Addr("10.0.0.9:7".parse().unwrap()))
        );
    }

    #[test]
    fn stats_merge_split_peers_and_carry_no_preshared_key() {
        let mut a = info(2, &["10.0.2.0/24"], [5; 32]);
        a.stats.rx_bytes = 10;
        a.stats.tx_bytes = 20;
        a.stats.last_handshake_time = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(99));
        let peers = [a.clone(), info(1, &["10.0.1.0/24"], [0; 32]), {
            let mut b = a;
            b.config.allowed_ips = vec!["10.0.0.0/24".parse::<AllowedIp>().unwrap()];
            b
        }];
        let s = stats_of(&peers);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].public_key, key(2));
        assert_eq!(
            s[1].allowed_ips,
            vec![
                "10.0.0.0/24".parse::<IpNetwork>().unwrap(),
                "10.0.2.0/24".parse().unwrap()
            ]
        );
        assert_eq!(s[1].endpoint, Some("10.0.0.9:7".parse().unwrap()));
        assert_eq!((s[1].rx_bytes, s[1].tx_bytes), (10, 20));
        assert_eq!(
            s[1].last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(99))
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains(&key(5).to_string()), "{shown}");
        assert!(!shown.contains("[5, 5, 5"), "{shown}");
    }

    #[test]
    fn dns_endpoint_resolves_and_bad_name_is_an_error() {
        let ok = resolve_endpoint(&Endpoint::Dns {
            host: "localhost".into(),
            port: 51820,
        })
        .unwrap();
        assert_eq!(ok.port(), 51820);
        assert!(ok.ip().is_loopback());
        assert!(
            resolve_endpoint(&Endpoint::Dns {
                host: "no-such-host.invalid".into(),
                port: 1
            })
            .is_err()
        );
    }

    #[test]
    fn process_exited_tells_a_live_process_from_a_missing_one() {
        assert!(!process_exited(std::process::id()));
        assert!(process_exited(u32::MAX));
    }
}
