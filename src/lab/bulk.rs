//! `lab check`'s bulk TCP transfer: a few MiB from one pod to a pod on another node, and back
//! at the same time, failing when a transfer stalls. Pings are small, so they cross a tunnel
//! whose MTU does not fit the path; full-size TCP segments do not, and this is what finds it.
//!
//! ```text
//! receiver thread: setns(pod B) → listen on B's address → count bytes → send the count back
//! sender thread:   setns(pod A) → connect → write BYTES → read the count  ─→ Transfer
//! ```
//!
//! In-process (no iperf3 to start, find and kill): each side is a thread that enters its pod's
//! network namespace (`setns` changes only the calling thread) and ends with the transfer.
//! Every wait is bounded by [`STALL`]: a transfer that makes no progress for that long fails
//! with the bytes it had moved. Depends on `nix` and the standard library only.

use std::fs::File;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

/// Bytes sent each way: a few hundred full-size segments, a fraction of a second through
/// userspace WireGuard on the shared CI machine.
pub const BYTES: u64 = 4 << 20;
/// How long a transfer may make no progress before it counts as stalled.
pub const STALL: Duration = Duration::from_secs(5);
/// The longest a whole transfer may take (below 0.4 MiB/s it fails, stalled or not).
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The receivers' port (TCP; in the pods' own namespaces, where nothing else listens).
pub const PORT: u16 = 5201;

/// One transfer's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The sending pod's namespace.
    pub from: String,
    /// The receiving pod's namespace.
    pub to: String,
    /// The receiver's address.
    pub addr: IpAddr,
    /// Bytes the receiver counted.
    pub received: u64,
    /// From connecting to the receiver's count coming back.
    pub elapsed: Duration,
    /// Why it failed (stall, refused connection, deadline); `None` when all [`BYTES`] arrived.
    pub error: Option<String>,
}

impl Transfer {
    /// Whether every byte arrived within [`DEADLINE`].
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.received == BYTES
    }

    /// Throughput in Mbit/s (0 when nothing was timed).
    pub fn mbit_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.received as f64 * 8.0 / s / 1e6
        } else {
            0.0
        }
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        let mib = self.received as f64 / f64::from(1u32 << 20);
        match &self.error {
            None if self.ok() => format!(
                "{} → {} ({} {}): {mib:.1} MiB in {:.2} s, {:.0} Mbit/s, ok",
                self.from,
                self.to,
                super::check::family_name(&self.addr),
                self.addr,
                self.elapsed.as_secs_f64(),
                self.mbit_per_s()
            ),
            e => format!(
                "{} → {} ({} {}): STALLED after {mib:.2} MiB of {} MiB, {:.1} s: {}",
                self.from,
                self.to,
                super::check::family_name(&self.addr),
                self.addr,
                BYTES >> 20,
                self.elapsed.as_secs_f64(),
                e.as_deref().unwrap_or("short count")
            ),
        }
    }
}

/// Run `f` on a fresh thread inside the network namespace `/run/netns/NETNS`.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    let path = Path::new("/run/netns").join(netns);
    std::thread::spawn(move || {
        let ns = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("enter {}: {e}", path.display()))?;
        f()
    })
}

/// The receiving side: accept one connection within [`STALL`], count bytes to EOF (each read
/// within [`STALL`]), then send the count back as 8 big-endian bytes.
fn receive(listener: TcpListener) -> Result<u64, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listen: {e}"))?;
    let start = Instant::now();
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock && start.elapsed() < STALL => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(format!("no connection within {STALL:?}"));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    conn.set_nonblocking(false)
        .and_then(|()| conn.set_read_timeout(Some(STALL)))
        .and_then(|()| conn.set_write_timeout(Some(STALL)))
        .map_err(|e| format!("socket: {e}"))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "receiving stalled after {n} bytes: nothing for {STALL:?}"
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receiving failed after {n} bytes: {e}")),
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("{n} bytes received in {DEADLINE:?}"));
        }
    }
    conn.write_all(&n.to_be_bytes())
        .map_err(|e| format!("sending the count: {e}"))?;
    Ok(n)
}

/// The sending side: connect within [`STALL`], write [`BYTES`] (failing when the socket takes
/// nothing for [`STALL`]), close the sending half, read the receiver's count.
///
/// Writes are non-blocking: a blocking write with a timeout returns the bytes it took before
/// timing out as a success, so a stalled connection would only fail after the next write's
/// timeout too, twice [`STALL`].
fn send(to: SocketAddr) -> Result<(u64, Duration), String> {
    let start = Instant::now();
    let mut conn =
        TcpStream::connect_timeout(&to, STALL).map_err(|e| format!("connect to {to}: {e}"))?;
    conn.set_read_timeout(Some(STALL))
        .and_then(|()| conn.set_nonblocking(true))
        .map_err(|e| format!("socket: {e}"))?;
    let chunk = vec![0x5au8; 64 << 10];
    let mut sent = 0u64;
    let mut progress = Instant::now();
    while sent < BYTES {
        let k = usize::try_from((BYTES - sent).min(chunk.len() as u64)).unwrap_or(chunk.len());
        match conn.write(&chunk[..k]) {
            Ok(0) => return Err(format!("the connection closed after {sent} bytes")),
            Ok(n) => {
                sent += n as u64;
                progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if progress.elapsed() > STALL {
                    return Err(format!(
                        "sending stalled after {sent} bytes: nothing taken for {STALL:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("sending failed after {sent} bytes: {e}")),
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("{sent} bytes sent in {DEADLINE:?}"));
        }
    }
    conn.set_nonblocking(false)
        .and_then(|()| conn.shutdown(Shutdown::Write))
        .map_err(|e| format!("close: {e}"))?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)
        .map_err(|e| format!("no count back from the receiver: {e}"))?;
    Ok((u64::from_be_bytes(count), start.elapsed()))
}

/// Start the receiver of one transfer in pod `to`: bound before the sender starts, so a refused
/// connection means the network, not a race.
fn start_receiver(
    to: &str,
    addr: IpAddr,
) -> Result<std::thread::JoinHandle<Result<u64, String>>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = in_netns(to, move || {
        let bound = TcpListener::bind(SocketAddr::new(addr, PORT))
            .map_err(|e| format!("bind {addr}:{PORT}: {e}"));
        let listener = match bound {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        receive(listener)
    });
    match rx.recv_timeout(STALL) {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("the receiver in {to} did not start")),
    }
}

/// The result of a transfer thread; a panic is an error.
fn joined<T>(h: std::thread::JoinHandle<Result<T, String>>) -> Result<T, String> {
    h.join()
        .unwrap_or_else(|_| Err("the transfer thread panicked".to_owned()))
}

/// Transfer [`BYTES`] over TCP along each `(from netns, to netns, to address)` at the same
/// time; one [`Transfer`] per pair, in order. Blocks at most about [`DEADLINE`] + [`STALL`].
pub fn transfer_all(pairs: &[(String, String, IpAddr)]) -> Vec<Transfer> {
    let start = Instant::now();
    let mut running = Vec::with_capacity(pairs.len());
    for (from, to, addr) in pairs {
        let receiver = start_receiver(to, *addr);
        let sender = receiver.as_ref().ok().map(|_| {
            let target = SocketAddr::new(*addr, PORT);
            in_netns(from, move || send(target))
        });
        running.push((from.clone(), to.clone(), *addr, receiver, sender));
    }
    running
        .into_iter()
        .map(|(from, to, addr, receiver, sender)| {
            let sent = sender.map(joined);
            let received = receiver.map(joined);
            // A failed transfer is timed from the start: how long it waited before failing.
            let (received, elapsed, error) = match (received, sent) {
                (Ok(Ok(n)), Some(Ok((_, t)))) => (n, t, None),
                (Err(e), _) | (Ok(Err(e)), _) => (0, start.elapsed(), Some(e)),
                (Ok(Ok(n)), Some(Err(e))) => (n, start.elapsed(), Some(e)),
                (Ok(Ok(n)), None) => (n, start.elapsed(), Some("no sender".to_owned())),
            };
            Transfer {
                from,
                to,
                addr,
                received,
                elapsed,
                error,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(received: u64, error: Option<&str>) -> Transfer {
        Transfer {
            from: "wml-a-p1".into(),
            to: "wml-a-p2".into(),
            addr: "10.200.12.2".parse().unwrap(),
            received,
            elapsed: Duration::from_millis(500),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn a_transfer_passes_only_with_every_byte_and_no_error() {
        let done = t(BYTES, None);
        assert!(done.ok());
        assert!(
            (done.mbit_per_s() - 67.1).abs() < 0.1,
            "{}",
            done.mbit_per_s()
        );
        assert!(done.line().ends_with("ok"), "{}", done.line());
        for bad in [
            t(BYTES / 2, None),
            t(BYTES, Some("x")),
            t(0, Some("refused")),
        ] {
            assert!(!bad.ok());
            assert!(bad.line().contains("STALLED"), "{}", bad.line());
        }
    }
}
