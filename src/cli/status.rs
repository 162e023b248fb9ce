//! `meshctl status`: read an agent's `/status` (or any path of its HTTP endpoint) and show the
//! node's tunnels as a table or JSON.
//!
//! The client is one HTTP/1.1 GET per connection with hyper's low-level client, over a
//! connection the caller may open itself ([`get_on`]: the lab opens it inside a node's network
//! namespace). The renderers ([`render_text`], [`render_json`]) are pure. Depends on hyper, the
//! status document and the CLI's table; the one network I/O is in [`get`] and [`get_on`].

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::status::{AgentStatus, STATUS_VERSION, human_age, human_bytes};

/// Where `meshctl status` looks for the agent by default: this machine's agent.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:1107";

/// The agent's port when a URL names none.
pub const DEFAULT_PORT: u16 = 1107;

/// The most of a reply that is read.
const MAX_BODY: usize = 16 << 20;

/// Why an agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://HOST[:PORT]`.
    #[error("agent URL {url:?}: {reason}")]
    Url {
        /// What was given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be made.
    #[error("cannot reach the agent at {url}: {source}")]
    Connect {
        /// The agent's URL.
        url: String,
        /// The connection error.
        #[source]
        source: std::io::Error,
    },
    /// The request or its reply failed.
    #[error("agent at {url}: {message}")]
    Http {
        /// The agent's URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// No complete answer in time.
    #[error("agent at {url} did not answer within {secs} s")]
    Timeout {
        /// The agent's URL.
        url: String,
        /// The bound.
        secs: u64,
    },
    /// The agent answered with an error status.
    #[error("agent at {url}{path}: HTTP {code}: {line}")]
    Status {
        /// The agent's URL.
        url: String,
        /// The path asked for.
        path: String,
        /// The HTTP status code.
        code: u16,
        /// The first line of the body.
        line: String,
    },
    /// The status document is not what this meshctl reads.
    #[error("agent at {url}: {reason}")]
    Document {
        /// The agent's URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// An agent's HTTP endpoint: `http://HOST[:PORT]` (the port defaults to 1107).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUrl {
    /// The host name or address, without IPv6 brackets.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl AgentUrl {
    /// Parse `http://HOST[:PORT][/]`; `HOST[:PORT]` alone is taken as http.
    pub fn parse(s: &str) -> Result<AgentUrl, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: s.to_owned(),
            reason: reason.to_owned(),
        };
        let full = if s.contains("://") {
            s.to_owned()
        } else {
            format!("http://{s}")
        };
        let uri: hyper::Uri = full
            .parse()
            .map_err(|_| bad("not a URL like http://127.0.0.1:1107"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is served by the agent"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("give the agent's address only, without a path"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        Ok(AgentUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: uri.port_u16().unwrap_or(DEFAULT_PORT),
        })
    }

    /// `http://host:port`, IPv6 in brackets.
    pub fn base(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base())
    }
}

/// An HTTP answer: its status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub code: u16,
    /// The body, as text.
    pub body: String,
}

/// `GET path` from the agent at `url`, all of it within `timeout`.
pub async fn get(url: &AgentUrl, path: &str, timeout: Duration) -> Result<Reply, ClientError> {
    let run = async {
        let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|source| ClientError::Connect {
                url: url.base(),
                source,
            })?;
        get_on(stream, url, path).await
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ClientError::Timeout {
            url: url.base(),
            secs: timeout.as_secs(),
        })?
}

/// `GET path` over `stream`, a connection to the agent at `url`; no timeout of its own.
pub async fn get_on(
    stream: tokio::net::TcpStream,
    url: &AgentUrl,
    path: &str,
) -> Result<Reply, ClientError> {
    let http = |message: String| ClientError::Http {
        url: url.base(),
        message,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = url.base();
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority.trim_start_matches("http://"))
        .header(hyper::header::USER_AGENT, "meshctl")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let result = async {
        let reply = sender
            .send_request(request)
            .await
            .map_err(|e| http(e.to_string()))?;
        let code = reply.status().as_u16();
        let body = Limited::new(reply.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| http(format!("reading the reply: {e}")))?
            .to_bytes();
        Ok(Reply {
            code,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
    .await;
    driver.abort();
    result
}

/// The status document in `reply` to `GET /status` from `url`.
pub fn parse_status(url: &AgentUrl, reply: &Reply) -> Result<AgentStatus, ClientError> {
    if reply.code != 200 {
        return Err(ClientError::Status {
            url: url.base(),
            path: "/status".to_owned(),
            code: reply.code,
            line: reply.body.lines().next().unwrap_or("").to_owned(),
        });
    }
    let doc = |reason: String| ClientError::Document {
        url: url.base(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(&reply.body).map_err(|e| doc(format!("not JSON: {e}")))?;
    match v.get("version").and_then(serde_json::Value::as_u64) {
        Some(n) if n == u64::from(STATUS_VERSION) => {}
        Some(n) => {
            return Err(doc(format!(
                "status version {n}; this meshctl reads version {STATUS_VERSION}"
            )));
        }
        None => {
            return Err(doc(
                "no status version: is this a wiremesh agent?".to_owned()
            ));
        }
    }
    serde_json::from_value(v).map_err(|e| doc(format!("not a status document: {e}")))
}

/// The status of the agent at `url`, within `timeout`.
pub async fn fetch_status(url: &AgentUrl, timeout: Duration) -> Result<AgentStatus, ClientError> {
    let reply = get(url, "/status", timeout).await?;
    parse_status(url, &reply)
}

/// The status as a heading line and a table of the peers.
pub fn render_text(s: &AgentStatus) -> String {
    let mut head = vec![format!("node {}", s.node)];
    head.push(
        match s.leader {
            Some(true) => "leader",
            Some(false) => "not the leader of its location",
            None => "leadership not known yet",
        }
        .to_owned(),
    );
    head.push(if s.ready { "ready" } else { "not ready" }.to_owned());
    let n = s.peers.len();
    head.push(format!(
        "{n} WireGuard peer{}",
        if n == 1 { "" } else { "s" }
    ));
    let mut out = head.join(", ");
    out.push('\n');
    if let Some(e) = &s.wireguard_error {
        out.push_str(&format!(
            "the WireGuard device could not be read ({e}): peers as the agent wants them\n"
        ));
    }
    if let Some(c) = &s.listen_port_conflict {
        out.push_str(&format!("{c}\n"));
    }
    if s.peers.is_empty() {
        return out;
    }
    let mut rows = vec![
        [
            "NAME",
            "KIND",
            "ENDPOINT",
            "HANDSHAKE",
            "STATE",
            "RX",
            "TX",
            "ALLOWED IPS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for p in &s.peers {
        let age = p.age(s.time);
        rows.push(vec![
            if p.name.is_empty() {
                "?".to_owned()
            } else {
                p.name.clone()
            },
            serde_plain(&p.kind),
            p.endpoint.clone().unwrap_or_else(|| "-".to_owned()),
            human_age(age),
            if s.wireguard_error.is_some() {
                "-".to_owned()
            } else if s.unreachable.contains(&p.public_key) {
                // No handshake completes: its traffic goes through a relay, if one reaches both.
                format!("{}, unreachable", p.health(s.time))
            } else {
                p.health(s.time).to_string()
            },
            human_bytes(p.rx_bytes),
            human_bytes(p.tx_bytes),
            p.allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    out.push_str(&super::table(&rows));
    out
}

/// An enum's serde name (`node`, `peer`, …).
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The status as JSON: the agent's document with `agent` (where it came from) and, per peer,
/// `handshake_age` (seconds, `null`: never), `health` and `stale`.
pub fn render_json(url: &str, s: &AgentStatus) -> String {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("agent".to_owned(), url.into());
    }
    if let Some(peers) = v.get_mut("peers").and_then(|p| p.as_array_mut()) {
        for (pv, p) in peers.iter_mut().zip(&s.peers) {
            if let Some(o) = pv.as_object_mut() {
                let h = p.health(s.time);
                o.insert("handshake_age".to_owned(), p.age(s.time).into());
                o.insert("health".to_owned(), h.as_str().into());
                o.insert(
                    "stale".to_owned(),
                    (h == crate::status::Health::Stale).into(),
                );
            }
        }
    }
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WgKey;
    use crate::status::{PeerKind, PeerStatus};

    fn doc() -> AgentStatus {
        let peer = |name: &str, k: u8, hs: Option<i64>, tx: u64| PeerStatus {
            name: name.into(),
            kind: PeerKind::Node,
            public_key: WgKey([k; 32]),
            endpoint: Some(format!("10.200.0.{k}:51820")),
            configured_endpoint: None,
            allowed_ips: vec![format!("10.42.{k}.0/24").parse().unwrap()],
            latest_handshake: hs,
            rx_bytes: 2048,
            tx_bytes: tx,
        };
        AgentStatus {
            version: STATUS_VERSION,
            node: "fra-1".into(),
            public_key: Some(WgKey([9; 32])),
            time: 10_000,
            ready: true,
            leader: Some(true),
            wireguard_error: None,
            listen_port_conflict: None,
            unreachable: Vec::new(),
            peers: vec![
                peer("hel-1", 2, Some(9_988), 100),
                peer("par-1", 3, Some(10_000 - 200), 100),
                peer("rom-1", 4, Some(10_000 - 7200), 100),
                peer("ber-1", 5, None, 0),
                peer("osl-1", 6, None, 148),
            ],
        }
    }

    #[test]
    fn a_peer_the_agent_cannot_reach_directly_says_so_in_its_state() {
        let mut d = doc();
        d.unreachable = vec![WgKey([6; 32])];
        let text = render_text(&d);
        let osl = text
            .lines()
            .find(|l| l.starts_with("osl-1"))
            .expect("osl-1");
        assert!(osl.contains("stale, unreachable"), "{text}");
        let hel = text
            .lines()
            .find(|l| l.starts_with("hel-1"))
            .expect("hel-1");
        assert!(!hel.contains("unreachable"), "{text}");
        // The document round-trips; without reports the key is absent.
        let json = serde_json::to_string(&d).expect("json");
        let back: AgentStatus = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.unreachable, d.unreachable);
        assert!(
            !serde_json::to_string(&doc())
                .expect("json")
                .contains("unreachable")
        );
    }

    #[test]
    fn table_shows_age_state_traffic_and_allowed_ips() {
        let text = render_text(&doc());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "node fra-1, leader, ready, 5 WireGuard peers");
        assert!(
            lines[1].starts_with("NAME   KIND  ENDPOINT          HANDSHAKE  STATE"),
            "{text}"
        );
        let row = |name: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name}: {text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("hel-1"),
            [
                "hel-1",
                "node",
                "10.200.0.2:51820",
                "12s",
                "fresh",
                "2.0",
                "KiB",
                "100",
                "B",
                "10.42.2.0/24"
            ]
        );
        assert_eq!(row("par-1")[3..5], ["3m", "aging"]);
        assert_eq!(row("rom-1")[3..5], ["2h", "stale"]);
        assert_eq!(row("ber-1")[3..5], ["never", "new"]);
        assert_eq!(row("osl-1")[3..5], ["never", "stale"]);
    }

    #[test]
    fn unreadable_device_and_unknown_leadership_are_said() {
        let mut d = doc();
        d.wireguard_error = Some("no socket".into());
        d.leader = None;
        d.ready = false;
        d.peers.truncate(1);
        let text = render_text(&d);
        assert!(
            text.starts_with("node fra-1, leadership not known yet, not ready, 1 WireGuard peer\n"),
            "{text}"
        );
        assert!(text.contains("could not be read (no socket)"), "{text}");
        assert!(
            !text.contains("fresh"),
            "no state without the device: {text}"
        );
    }

    #[test]
    fn a_held_listen_port_is_said_under_the_heading() {
        let mut d = doc();
        d.ready = false;
        d.listen_port_conflict = Some("UDP port 51820 is held by WireGuard interface kilo0".into());
        let text = render_text(&d);
        let second = text.lines().nth(1).unwrap_or_default();
        assert_eq!(
            second,
            "UDP port 51820 is held by WireGuard interface kilo0"
        );
        assert!(!render_text(&doc()).contains("is held by"));
    }

    #[test]
    fn json_adds_age_health_and_the_stale_flag() {
        let v: serde_json::Value =
            serde_json::from_str(&render_json("http://x:1107", &doc())).unwrap();
        assert_eq!(v["agent"], "http://x:1107");
        assert_eq!(v["version"], STATUS_VERSION);
        let p = &v["peers"];
        assert_eq!(p[0]["handshake_age"], 12);
        assert_eq!(p[0]["health"], "fresh");
        assert_eq!(p[0]["stale"], false);
        assert_eq!(p[3]["handshake_age"], serde_json::Value::Null);
        assert_eq!(p[3]["health"], "new");
        assert_eq!(p[4]["stale"], true);
    }

    #[test]
    fn urls_default_to_http_and_the_agents_port() {
        let u = AgentUrl::parse("http://127.0.0.1:1107").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1107));
        assert_eq!(
            AgentUrl::parse("10.0.0.1").unwrap().base(),
            "http://10.0.0.1:1107"
        );
        assert_eq!(
            AgentUrl::parse("http://[::1]:9000/").unwrap().base(),
            "http://[::1]:9000"
        );
        assert_eq!(AgentUrl::parse("node-a:80").unwrap().port, 80);
        for bad in ["https://a:1107", "http://a:1107/status", "http://", "::::"] {
            assert!(AgentUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_replies_are_checked_for_code_and_version() {
        let url = AgentUrl::parse("127.0.0.1").unwrap();
        let reply = |code: u16, body: &str| Reply {
            code,
            body: body.to_owned(),
        };
        let e = parse_status(&url, &reply(503, "not ready\nmore")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent at http://127.0.0.1:1107/status: HTTP 503: not ready"
        );
        let e = parse_status(&url, &reply(200, "{\"version\": 2}")).unwrap_err();
        assert!(e.to_string().contains("status version 2"), "{e}");
        let e = parse_status(&url, &reply(200, "<html>")).unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
        let good = serde_json::to_string(&doc()).unwrap();
        assert_eq!(parse_status(&url, &reply(200, &good)).unwrap(), doc());
    }

    #[tokio::test]
    async fn an_agent_that_is_not_there_is_one_line() {
        // A port nothing listens on: bind one, learn it, close it.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = AgentUrl::parse(&format!("127.0.0.1:{port}")).unwrap();
        let e = fetch_status(&url, Duration::from_secs(5))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot reach the agent at http://127.0.0.1:{port}"
            )),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
}
