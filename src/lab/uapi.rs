//! Reading a userspace WireGuard interface through its control socket (the cross-platform
//! UAPI: send `get=1`, read `key=value` lines up to `errno=`), as `wg show` does.
//!
//! The lab's sockets live in the node directories (the agents' `/run/wireguard` is a bind
//! mount of them), so they are reached straight from the host: no namespace switch. Parsing is
//! pure ([`parse_get`]); [`get`] adds the socket. Depends on the model's key type, `ipnetwork`
//! and `std::os::unix::net`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipnetwork::IpNetwork;

use super::LabError;
use crate::model::WgKey;

/// A WireGuard interface as its control socket describes it (the private key is left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgDevice {
    /// UDP listen port.
    pub listen_port: Option<u16>,
    /// Firewall mark, if set.
    pub fwmark: Option<u32>,
    /// Whether a private key is set.
    pub has_private_key: bool,
    /// Peers, in the order the daemon lists them.
    pub peers: Vec<WgPeerInfo>,
}

/// One peer of a [`WgDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerInfo {
    /// The peer's public key.
    pub public_key: WgKey,
    /// Where its packets go (and last came from).
    pub endpoint: Option<SocketAddr>,
    /// Unix time of the latest handshake; `None` when there was none.
    pub last_handshake_unix: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Persistent keepalive in seconds (0 = off).
    pub persistent_keepalive: u16,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNetwork>,
}

fn hex_key(v: &str) -> Result<WgKey, String> {
    if v.len() != 64 {
        return Err(format!("key {v:?} is not 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&v[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("key {v:?} is not hex"))?;
    }
    Ok(WgKey(out))
}

/// Parse the answer to `get=1`. Unknown keys are ignored; a non-zero `errno` is an error.
pub fn parse_get(text: &str) -> Result<WgDevice, String> {
    let mut dev = WgDevice::default();
    let mut errno = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?} is not key=value"))?;
        let num = |what: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{what}={v:?} is not a number"))
        };
        let peer = dev.peers.last_mut();
        match (k, peer) {
            ("errno", _) => errno = Some(num("errno")?),
            ("private_key", _) => dev.has_private_key = v.bytes().any(|b| b != b'0'),
            ("listen_port", _) => {
                dev.listen_port =
                    Some(u16::try_from(num(k)?).map_err(|_| format!("listen_port={v} too large"))?);
            }
            ("fwmark", _) => {
                dev.fwmark = Some(u32::try_from(num(k)?).map_err(|_| format!("fwmark={v}"))?);
            }
            ("public_key", _) => dev.peers.push(WgPeerInfo {
                public_key: hex_key(v)?,
                endpoint: None,
                last_handshake_unix: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: Vec::new(),
            }),
            ("endpoint", Some(p)) => {
                p.endpoint = Some(v.parse().map_err(|_| format!("endpoint={v:?}"))?);
            }
            ("last_handshake_time_sec", Some(p)) => {
                let secs = num(k)?;
                p.last_handshake_unix = (secs > 0).then_some(secs);
            }
            ("rx_bytes", Some(p)) => p.rx_bytes = num(k)?,
            ("tx_bytes", Some(p)) => p.tx_bytes = num(k)?,
            ("persistent_keepalive_interval", Some(p)) => {
                p.persistent_keepalive = u16::try_from(num(k)?)
                    .map_err(|_| format!("persistent_keepalive_interval={v}"))?;
            }
            ("allowed_ip", Some(p)) => p
                .allowed_ips
                .push(v.parse().map_err(|_| format!("allowed_ip={v:?}"))?),
            _ => {}
        }
    }
    match errno {
        Some(0) => Ok(dev),
        Some(e) => Err(format!("the daemon answered errno={e}")),
        None => Err("the answer ended without errno=".to_owned()),
    }
}

/// Ask the daemon behind `socket` for its interface.
pub fn get(socket: &Path, timeout: Duration) -> Result<WgDevice, LabError> {
    let err = |message: String| LabError::Uapi {
        socket: socket.to_owned(),
        message,
    };
    let mut s = UnixStream::connect(socket).map_err(|e| err(format!("connect: {e}")))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| err(format!("set timeout: {e}")))?;
    s.write_all(b"get=1\n\n")
        .map_err(|e| err(format!("write: {e}")))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).map_err(|e| err(format!("read: {e}")))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // The answer ends with "errno=N\n\n".
        if buf.ends_with(b"\n\n") && buf.windows(6).any(|w| w == b"errno=") {
            break;
        }
    }
    parse_get(&String::from_utf8_lossy(&buf)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const B: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";

    #[test]
    fn get_answer_with_two_peers_is_parsed_and_private_key_is_not_kept() {
        let text = format!(
            "private_key={A}\nlisten_port=51820\npublic_key={B}\npreshared_key={zero}\n\
             protocol_version=1\nendpoint=10.200.0.2:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=1184\nrx_bytes=92\n\
             persistent_keepalive_interval=25\nallowed_ip=10.4.0.2/32\nallowed_ip=10.201.2.0/24\n\
             public_key={A}\nendpoint=[fd00::2]:51820\nlast_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
             persistent_keepalive_interval=0\nerrno=0\n\n",
            zero = "0".repeat(64)
        );
        let d = parse_get(&text).unwrap();
        assert!(d.has_private_key);
        assert_eq!(d.listen_port, Some(51820));
        assert_eq!(d.peers.len(), 2);
        let p = &d.peers[0];
        assert_eq!(
            p.public_key.to_string(),
            "WEAuaVuhdyscyTCXVfBDJR6nf9zxD75jmJzrfhkyE3Y="
        );
        assert_eq!(p.endpoint, Some("10.200.0.2:51820".parse().unwrap()));
        assert_eq!(p.last_handshake_unix, Some(1_700_000_000));
        assert_eq!((p.rx_bytes, p.tx_bytes), (92, 1184));
        assert_eq!(p.persistent_keepalive, 25);
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(d.peers[1].last_handshake_unix, None, "0 means never");
        assert_eq!(
            d.peers[1].endpoint,
            Some("[fd00::2]:51820".parse().unwrap())
        );
    }

    #[test]
    fn errors_and_truncated_answers_are_refused() {
        assert!(parse_get("errno=19\n\n").unwrap_err().contains("19"));
        assert!(parse_get("listen_port=1\n").is_err());
        assert!(parse_get("public_key=zz\nerrno=0\n").is_err());
        assert_eq!(parse_get("errno=0\n\n").unwrap(), WgDevice::default());
    }
}
