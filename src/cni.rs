//! The node's CNI configuration file: the standard `bridge` plugin with `host-local` IPAM over
//! the node's pod CIDRs, then `portmap`. Container runtimes read it to attach pods to the bridge
//! wiremesh routes through the mesh.
//!
//! ```text
//! (bridge name, pod CIDRs, MTU, network name) ─ render_conflist() ─→ JSON text
//!   ─ write_conflist(path) ─→ file, replaced atomically, only when the text changed
//! file ─ read_conflist() ─→ the pod CIDRs it already allocates from, and its pods' MTU
//! ```
//!
//! [`render_conflist`] fills `cni/10-wiremesh.conflist.template` (compiled in) and is pure; the
//! two file functions are the I/O edge. Depends on `ipnetwork`, `serde_json` and `std::fs`
//! only; never on the topology engine, netlink or Kubernetes.
//!
//! Choices and why: `cniVersion` 1.0.0 is the newest that Debian's plugins (1.1.1) accept;
//! `ipMasq: false` because wiremesh masquerades in its own table
//! ([`reconcile::nft`](crate::reconcile::nft)); `isGateway: true` puts each range's first
//! address on the bridge, which is the gateway address wiremesh's desired bridge holds too.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde_json::Value;

/// Where kubeadm-style clusters (containerd, CRI-O) read CNI configuration.
pub const DEFAULT_CONFLIST_PATH: &str = "/etc/cni/net.d/10-wiremesh.conflist";
/// The directory k3s's embedded containerd reads CNI configuration from.
pub const K3S_CONFLIST_DIR: &str = "/var/lib/rancher/k3s/agent/etc/cni/net.d";
/// The CNI network name written by default.
pub const DEFAULT_NETWORK_NAME: &str = "wiremesh";
/// The CNI spec version the file declares.
pub const CNI_VERSION: &str = "1.0.0";
/// The file template; `{{NAME}}`, `{{BRIDGE}}`, `{{MTU}}`, `{{RANGES}}` and `{{ROUTES}}` are
/// filled by [`render_conflist`].
pub const TEMPLATE: &str = include_str!("../cni/10-wiremesh.conflist.template");

/// Why the CNI configuration file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path}: not JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An IPAM range's `subnet` is not a CIDR.
    #[error("{path}: IPAM subnet {value:?} is not a CIDR")]
    Subnet {
        /// The file.
        path: PathBuf,
        /// The value found.
        value: String,
    },
}

/// `s` as the inside of a JSON string literal (quotes and backslashes escaped).
fn json_inner(s: &str) -> String {
    let quoted = Value::String(s.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

/// The conflist text for a bridge named `bridge_name` handing out addresses from `pod_cidrs`
/// (one `host-local` range set per CIDR, so dual stack gives each pod one address per family,
/// and a default route per family present), pod MTU `mtu`, CNI network `name`.
///
/// CIDRs are written as networks (host bits cleared) in the given order, duplicates dropped.
/// With no CIDR the file has no range and the plugin refuses to add pods: pass at least one.
pub fn render_conflist(bridge_name: &str, pod_cidrs: &[IpNetwork], mtu: u32, name: &str) -> String {
    let mut cidrs: Vec<IpNetwork> = Vec::with_capacity(pod_cidrs.len());
    for c in pod_cidrs {
        let n = IpNetwork::new(c.network(), c.prefix())
            .unwrap_or_else(|_| unreachable!("the prefix of a valid network is valid"));
        if !cidrs.contains(&n) {
            cidrs.push(n);
        }
    }
    let ranges: Vec<String> = cidrs
        .iter()
        .map(|c| format!("[{{\"subnet\": \"{c}\"}}]"))
        .collect();
    let mut routes = Vec::new();
    if cidrs.iter().any(IpNetwork::is_ipv4) {
        routes.push("{\"dst\": \"0.0.0.0/0\"}");
    }
    if cidrs.iter().any(IpNetwork::is_ipv6) {
        routes.push("{\"dst\": \"::/0\"}");
    }
    fill(TEMPLATE, |key| match key {
        "NAME" => Some(json_inner(name)),
        "BRIDGE" => Some(json_inner(bridge_name)),
        "MTU" => Some(mtu.to_string()),
        "RANGES" => Some(ranges.join(", ")),
        "ROUTES" => Some(routes.join(", ")),
        _ => None,
    })
}

/// Replace each `{{KEY}}` of `template` in one pass (so filled values are never re-scanned);
/// unknown keys are left as they are.
fn fill(template: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 128);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after
            .find("}}")
            .and_then(|end| Some((end, value(&after[..end])?)))
        {
            Some((end, v)) => {
                out.push_str(&v);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Write `text` to `path` unless the file already holds exactly it; returns whether the file
/// changed. Creates the directory; writes a hidden temporary file in the same directory, syncs
/// it, sets mode 0644 and renames it over `path`, so a runtime never sees a partial file (the
/// temporary name ends in `.tmp`, which runtimes do not load).
pub fn write_conflist(path: &Path, text: &str) -> Result<bool, CniError> {
    let io = |op, p: &Path| {
        let p = p.to_owned();
        move |source| CniError::Io {
            op,
            path: p,
            source,
        }
    };
    match fs::read(path) {
        Ok(old) if old == text.as_bytes() => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", path)(e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io("set mode of", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename itself durable; failing to sync a directory loses nothing already written.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// Whether a conflist text is one wiremesh wrote: JSON whose network `name` is
/// [`DEFAULT_NETWORK_NAME`] and whose first plugin is the `bridge` plugin (what
/// [`render_conflist`] writes, in every version). Anything else (a flannel or calico conflist, an
/// empty or hand-edited file) is someone else's: wiremesh neither overwrites nor deletes it. Pure.
pub fn is_ours(text: &str) -> bool {
    let Ok(doc) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    doc.get("name").and_then(Value::as_str) == Some(DEFAULT_NETWORK_NAME)
        && doc
            .get("plugins")
            .and_then(Value::as_array)
            .and_then(|p| p.first())
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            == Some("bridge")
}

/// Whose the file at `path` is: `Ok(None)` when there is none, `Ok(Some(true))` when it is
/// wiremesh's ([`is_ours`]), `Ok(Some(false))` when it is someone else's.
pub fn file_is_ours(path: &Path) -> Result<Option<bool>, CniError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(is_ours(&text))),
        // Not text at all: not a conflist of ours.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(Some(false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CniError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// The IPAM subnets of a conflist text, in file order: every `ranges` entry of every plugin's
/// `ipam` (and a legacy single `subnet`). Pure; `path` only names the file in errors.
pub fn conflist_cidrs(path: &Path, text: &str) -> Result<Vec<IpNetwork>, CniError> {
    let doc: Value = serde_json::from_str(text).map_err(|source| CniError::Json {
        path: path.to_owned(),
        source,
    })?;
    let plugins = doc
        .get("plugins")
        .and_then(Value::as_array)
        .map(|p| p.iter().collect::<Vec<_>>())
        // A single-plugin `.conf` file has the plugin at the top level.
        .unwrap_or_else(|| vec![&doc]);
    let mut subnets = Vec::new();
    for ipam in plugins.iter().filter_map(|p| p.get("ipam")) {
        if let Some(s) = ipam.get("subnet") {
            subnets.push(s);
        }
        let sets = ipam.get("ranges").and_then(Value::as_array);
        for set in sets.into_iter().flatten().filter_map(Value::as_array) {
            subnets.extend(set.iter().filter_map(|r| r.get("subnet")));
        }
    }
    subnets
        .into_iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| CniError::Subnet {
                    path: path.to_owned(),
                    value: v.to_string(),
                })
        })
        .collect()
}

/// The pods' MTU a conflist text gives: the first plugin's `mtu` that is a number (the bridge
/// plugin's, in wiremesh's file); `None` when there is none or the text is not JSON. Pure.
pub fn conflist_mtu(text: &str) -> Option<u32> {
    let doc: Value = serde_json::from_str(text).ok()?;
    let plugins = doc.get("plugins").and_then(Value::as_array)?;
    plugins
        .iter()
        .find_map(|p| p.get("mtu").and_then(Value::as_u64))
        .and_then(|m| u32::try_from(m).ok())
}

/// What the planner compares of a CNI config file: its IPAM subnets and its pods' MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflist {
    /// The IPAM subnets, in file order ([`conflist_cidrs`]).
    pub pod_cidrs: Vec<IpNetwork>,
    /// The pods' MTU ([`conflist_mtu`]).
    pub mtu: Option<u32>,
}

/// The IPAM subnets of the conflist at `path` (see [`conflist_cidrs`]); `None` when there is no
/// file.
pub fn read_conflist_cidrs(path: &Path) -> Result<Option<Vec<IpNetwork>>, CniError> {
    Ok(read_conflist(path)?.map(|c| c.pod_cidrs))
}

/// The IPAM subnets and pods' MTU of the conflist at `path`; `None` when there is no file.
pub fn read_conflist(path: &Path) -> Result<Option<Conflist>, CniError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(Conflist {
            pod_cidrs: conflist_cidrs(path, &text)?,
            mtu: conflist_mtu(&text),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CniError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn conflist_is_the_filled_template() {
        let text = render_conflist("wm0", &nets(&["10.42.1.0/24"]), 1420, "wiremesh");
        let expected = r#"{
  "cniVersion": "1.0.0",
  "name": "wiremesh",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "wm0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "mtu": 1420,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.42.1.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn the_pods_mtu_reads_back_as_written() {
        for mtu in [1220, 1420, 8941] {
            let text = render_conflist("wm0", &nets(&["10.42.1.0/24"]), mtu, "wiremesh");
            assert_eq!(conflist_mtu(&text), Some(mtu));
        }
        assert_eq!(conflist_mtu(r#"{"plugins": [{"type": "bridge"}]}"#), None);
        assert_eq!(conflist_mtu("not json"), None);
    }

    #[test]
    fn dual_stack_gets_one_range_set_and_one_default_route_per_family() {
        let text = render_conflist(
            "wm0",
            &nets(&["fd42:1::5/64", "10.42.1.7/24", "10.42.1.0/24"]),
            1380,
            "wiremesh",
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        let bridge = &v["plugins"][0];
        assert_eq!(v["cniVersion"], CNI_VERSION);
        assert_eq!(bridge["mtu"], 1380);
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["hairpinMode"], true);
        assert_eq!(
            bridge["ipam"]["ranges"],
            serde_json::json!([[{"subnet": "fd42:1::/64"}], [{"subnet": "10.42.1.0/24"}]])
        );
        assert_eq!(
            bridge["ipam"]["routes"],
            serde_json::json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        assert_eq!(
            v["plugins"][1],
            serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}})
        );
    }

    #[test]
    fn names_are_escaped_and_never_expanded_as_placeholders() {
        let text = render_conflist("b\"r{{MTU}}", &nets(&["10.0.0.0/24"]), 1420, "n\\{{NAME}}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "n\\{{NAME}}");
        assert_eq!(v["plugins"][0]["bridge"], "b\"r{{MTU}}");
    }

    #[test]
    fn template_has_exactly_the_documented_placeholders() {
        let mut keys = Vec::new();
        let untouched = fill(TEMPLATE, |k| {
            keys.push(k.to_owned());
            None
        });
        assert_eq!(untouched, TEMPLATE);
        keys.sort();
        keys.dedup();
        assert_eq!(keys, ["BRIDGE", "MTU", "NAME", "RANGES", "ROUTES"]);
        let text = render_conflist("wm0", &nets(&["10.0.0.0/24"]), 1420, "x");
        assert!(!text.contains("{{"), "{text}");
    }

    #[test]
    fn only_a_conflist_wiremesh_renders_is_ours() {
        let ours = render_conflist(
            "wmbr0",
            &nets(&["10.42.0.0/24"]),
            1420,
            DEFAULT_NETWORK_NAME,
        );
        assert!(is_ours(&ours));
        let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[
            {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
            {"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        assert!(!is_ours(flannel));
        let renamed = ours.replace("\"name\": \"wiremesh\"", "\"name\": \"k8s-pod-network\"");
        assert!(!is_ours(&renamed));
        let other_plugin = ours.replace("\"type\": \"bridge\"", "\"type\": \"calico\"");
        assert!(!is_ours(&other_plugin));
        for junk in ["", "{", "[]", "null", "{\"name\":\"wiremesh\"}"] {
            assert!(!is_ours(junk), "{junk:?}");
        }
    }

    #[test]
    fn cidrs_read_back_from_a_rendered_file() {
        let cidrs = nets(&["10.42.1.0/24", "fd42:1::/64"]);
        let text = render_conflist("wm0", &cidrs, 1420, "wiremesh");
        assert_eq!(conflist_cidrs(Path::new("x"), &text).unwrap(), cidrs);
        let legacy =
            r#"{"type": "bridge", "ipam": {"type": "host-local", "subnet": "10.9.0.0/16"}}"#;
        assert_eq!(
            conflist_cidrs(Path::new("x"), legacy).unwrap(),
            nets(&["10.9.0.0/16"])
        );
        let bad = r#"{"plugins": [{"ipam": {"ranges": [[{"subnet": "10.9.0.0/33"}]]}}]}"#;
        assert!(matches!(
            conflist_cidrs(Path::new("x"), bad),
            Err(CniError::Subnet { .. })
        ));
    }

    #[test]
    fn write_creates_the_directory_and_skips_identical_content() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("net.d/10-wiremesh.conflist");
        let a = render_conflist("wm0", &nets(&["10.42.1.0/24"]), 1420, "wiremesh");
        let b = render_conflist("wm0", &nets(&["10.42.2.0/24"]), 1420, "wiremesh");
        assert_eq!(read_conflist_cidrs(&path).unwrap(), None);
        assert!(write_conflist(&path, &a).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let before = fs::metadata(&path).unwrap().modified().unwrap();
        assert!(!write_conflist(&path, &a).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before);
        assert!(write_conflist(&path, &b).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), b);
        assert_eq!(
            read_conflist_cidrs(&path).unwrap(),
            Some(nets(&["10.42.2.0/24"]))
        );
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["10-wiremesh.conflist"], "no temporary file left");
    }
}
