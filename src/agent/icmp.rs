//! ICMP echo over raw sockets: one round of echo requests to a few addresses, answered when any
//! of them replies before a timeout. The agent's probe of its location leader's forwarding
//! (`agent::forward`) sends through the leader to other segments' mesh IPs.
//!
//! Blocking I/O (run it off the async loop). Needs `CAP_NET_RAW`. Depends on `socket2`, `nix` and
//! `std` only.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{SockaddrStorage, recvfrom};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// Sends echo requests with one identifier and counts rounds in the sequence number.
#[derive(Debug)]
pub struct Pinger {
    ident: u16,
    seq: u16,
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl Pinger {
    /// A pinger whose requests carry `ident` (replies to other identifiers are ignored).
    pub fn new(ident: u16) -> Self {
        Pinger {
            ident,
            seq: 0,
            v4: None,
            v6: None,
        }
    }

    /// Send one echo request to each of `targets` and wait up to `timeout` for a reply from any
    /// of them to this round's request. `Ok(false)`: no reply in time.
    pub fn round(&mut self, targets: &[IpAddr], timeout: Duration) -> io::Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let (ident, seq) = (self.ident, self.seq);
        for t in targets {
            let sock = self.socket(t.is_ipv4())?;
            let packet = echo_request(t.is_ipv4(), ident, seq);
            // A target without a route fails alone; the others may still answer.
            if let Err(e) = sock.send_to(&packet, &SockAddr::from(SocketAddr::new(*t, 0))) {
                tracing::debug!(target_ip = %t, error = %e, "echo request not sent");
            }
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            for v4 in [true, false] {
                let Some(sock) = (if v4 { &self.v4 } else { &self.v6 }) else {
                    continue;
                };
                // Two families at most: each waits half of what is left, at least 1 ms.
                let wait = if self.v4.is_some() && self.v6.is_some() {
                    (left / 2).max(Duration::from_millis(1))
                } else {
                    left
                };
                sock.set_read_timeout(Some(wait))?;
                match recvfrom::<SockaddrStorage>(sock.as_raw_fd(), &mut buf) {
                    Ok((n, from)) => {
                        let from = from.as_ref().and_then(source_ip);
                        if from.is_some_and(|f| targets.contains(&f))
                            && is_reply(v4, &buf[..n], ident, seq)
                        {
                            return Ok(true);
                        }
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    fn socket(&mut self, v4: bool) -> io::Result<&Socket> {
        let slot = if v4 { &mut self.v4 } else { &mut self.v6 };
        if slot.is_none() {
            let (domain, proto) = if v4 {
                (Domain::IPV4, Protocol::ICMPV4)
            } else {
                (Domain::IPV6, Protocol::ICMPV6)
            };
            *slot = Some(Socket::new(domain, Type::RAW, Some(proto))?);
        }
        slot.as_ref()
            .ok_or_else(|| io::Error::other("socket just created is missing"))
    }
}

/// The IP address of a received packet's source.
fn source_ip(a: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// An echo request with an 8-byte payload. ICMPv4 carries its checksum; the kernel computes
/// ICMPv6's (it covers a pseudo-header the sender cannot see on a raw socket).
pub fn echo_request(v4: bool, ident: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 16];
    p[0] = if v4 { ECHO_REQUEST_V4 } else { ECHO_REQUEST_V6 };
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"wiremesh");
    if v4 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// Whether `data` (from a raw socket: with the IPv4 header for IPv4, without for IPv6) is an
/// echo reply to request `ident`/`seq`.
pub fn is_reply(v4: bool, data: &[u8], ident: u16, seq: u16) -> bool {
    let icmp = if v4 {
        let Some(&first) = data.first() else {
            return false;
        };
        let header = usize::from(first & 0x0f) * 4;
        match data.get(header..) {
            Some(rest) => rest,
            None => return false,
        }
    } else {
        data
    };
    let reply = if v4 { ECHO_REPLY_V4 } else { ECHO_REPLY_V6 };
    icmp.len() >= 8
        && icmp[0] == reply
        && icmp[4..6] == ident.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v4_request_checksums_to_zero_and_carries_ident_and_seq() {
        let p = echo_request(true, 0x1234, 7);
        assert_eq!(p[0], 8);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn only_a_reply_to_this_round_counts() {
        // An IPv4 header of 20 bytes, then the reply.
        let mut data = vec![0x45u8];
        data.extend([0u8; 19]);
        let mut icmp = echo_request(true, 9, 3);
        icmp[0] = 0;
        data.extend(&icmp);
        assert!(is_reply(true, &data, 9, 3));
        assert!(!is_reply(true, &data, 9, 4), "an older round's reply");
        assert!(!is_reply(true, &data, 8, 3), "another pinger's reply");
        let request = [&data[..20], &echo_request(true, 9, 3)[..]].concat();
        assert!(!is_reply(true, &request, 9, 3), "our own request");
        let mut v6 = echo_request(false, 9, 3);
        v6[0] = 129;
        assert!(is_reply(false, &v6, 9, 3));
        assert!(!is_reply(false, &v6[..6], 9, 3), "truncated");
    }
}
