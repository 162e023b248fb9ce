//! Pods attached the way a container runtime attaches them: each plugin of the node's CNI
//! configuration list is run in order (`ADD`) or in reverse (`DEL`), fed its own configuration
//! plus the list's `name` and `cniVersion` and the previous plugin's result as `prevResult`.
//!
//! Plugins run inside the node's namespace (the bridge they create belongs to the node) with
//! `CNI_NETNS` pointing at the pod's namespace. host-local IPAM keeps its allocations in the
//! lab directory (`ipam.dataDir`), not in `/var/lib/cni`, so labs never share address state.
//! The configuration building is pure; [`add`] and [`del`] run the plugins. Depends on
//! `serde_json`, `ipnetwork` and `std::process`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;
use serde_json::Value;

use super::LabError;
use super::sys::CNI_PATH;

/// Which pod, in which node, with which IPAM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The node's namespace (where the plugins run).
    pub node_ns: String,
    /// The pod's namespace name; also its container ID.
    pub pod_ns: String,
    /// The interface the pod gets.
    pub ifname: String,
    /// host-local's data directory.
    pub ipam_dir: PathBuf,
}

/// The plugin types of a configuration list, in order; a type that is not a plain file name
/// (it would let the list run any program) is refused.
pub fn plugin_types(list: &Value) -> Result<Vec<String>, String> {
    let plugins = list
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or("the configuration list has no \"plugins\" array")?;
    if plugins.is_empty() {
        return Err("the configuration list has no plugins".to_owned());
    }
    plugins
        .iter()
        .map(|p| {
            let t = p
                .get("type")
                .and_then(Value::as_str)
                .ok_or("a plugin has no \"type\"")?;
            if t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!("plugin type {t:?} is not a plain program name"));
            }
            Ok(t.to_owned())
        })
        .collect()
}

/// The configuration plugin `index` of `list` gets on stdin: its own object plus `name`,
/// `cniVersion`, `prevResult` (when given) and host-local's `dataDir`.
pub fn plugin_config(
    list: &Value,
    index: usize,
    prev_result: Option<&Value>,
    ipam_dir: &Path,
) -> Result<Value, String> {
    let mut conf = list
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.get(index))
        .cloned()
        .ok_or_else(|| format!("no plugin {index} in the configuration list"))?;
    let obj = conf
        .as_object_mut()
        .ok_or_else(|| format!("plugin {index} is not an object"))?;
    for key in ["name", "cniVersion"] {
        if let Some(v) = list.get(key) {
            obj.insert(key.to_owned(), v.clone());
        }
    }
    if let Some(prev) = prev_result {
        obj.insert("prevResult".to_owned(), prev.clone());
    }
    if let Some(ipam) = obj.get_mut("ipam").and_then(Value::as_object_mut)
        && ipam.get("type").and_then(Value::as_str) == Some("host-local")
    {
        ipam.insert(
            "dataDir".to_owned(),
            Value::String(ipam_dir.display().to_string()),
        );
    }
    Ok(conf)
}

/// The addresses a CNI result gives (`ips[].address`).
pub fn result_ips(result: &Value) -> Vec<IpNetwork> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The message of a CNI error result (`{"code": …, "msg": …, "details": …}`), else the text.
fn error_message(stdout: &str, stderr: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(stdout) {
        let msg = v.get("msg").and_then(Value::as_str).unwrap_or_default();
        let details = v.get("details").and_then(Value::as_str).unwrap_or_default();
        if !msg.is_empty() {
            return if details.is_empty() {
                msg.to_owned()
            } else {
                format!("{msg}: {details}")
            };
        }
    }
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    text.trim().to_owned()
}

fn exec(
    command: &'static str,
    plugin: &str,
    conf: &Value,
    at: &Attachment,
) -> Result<String, LabError> {
    let cni_err = |message: String| LabError::Cni {
        command,
        pod: at.pod_ns.clone(),
        plugin: plugin.to_owned(),
        message,
    };
    let program = format!("{CNI_PATH}/{plugin}");
    tracing::debug!(command, plugin, pod = %at.pod_ns, "cni");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &at.node_ns, &program])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &at.pod_ns)
        .env("CNI_NETNS", format!("/var/run/netns/{}", at.pod_ns))
        .env("CNI_IFNAME", &at.ifname)
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            program: program.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf.to_string().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| LabError::Spawn { program, source })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(cni_err(format!(
            "{} ({})",
            error_message(&stdout, &String::from_utf8_lossy(&out.stderr)),
            out.status
        )))
    }
}

/// Attach a pod: run every plugin's ADD in order; returns the last plugin's result.
pub fn add(list: &Value, at: &Attachment) -> Result<Value, LabError> {
    let conf_err = |message: String| LabError::Cni {
        command: "ADD",
        pod: at.pod_ns.clone(),
        plugin: "-".to_owned(),
        message,
    };
    let types = plugin_types(list).map_err(conf_err)?;
    let mut prev: Option<Value> = None;
    for (i, plugin) in types.iter().enumerate() {
        let conf = plugin_config(list, i, prev.as_ref(), &at.ipam_dir).map_err(conf_err)?;
        let stdout = exec("ADD", plugin, &conf, at)?;
        let result: Value = serde_json::from_str(&stdout).map_err(|e| LabError::Cni {
            command: "ADD",
            pod: at.pod_ns.clone(),
            plugin: plugin.clone(),
            message: format!("result is not JSON: {e}"),
        })?;
        prev = Some(result);
    }
    prev.ok_or_else(|| conf_err("no plugin ran".to_owned()))
}

/// Detach a pod: run every plugin's DEL in reverse order with the ADD result as `prevResult`.
/// Every plugin is tried; the first failure is returned.
pub fn del(list: &Value, at: &Attachment, added: Option<&Value>) -> Result<(), LabError> {
    let types = plugin_types(list).map_err(|message| LabError::Cni {
        command: "DEL",
        pod: at.pod_ns.clone(),
        plugin: "-".to_owned(),
        message,
    })?;
    let mut first_err = None;
    for (i, plugin) in types.iter().enumerate().rev() {
        let result = plugin_config(list, i, added, &at.ipam_dir)
            .map_err(|message| LabError::Cni {
                command: "DEL",
                pod: at.pod_ns.clone(),
                plugin: plugin.clone(),
                message,
            })
            .and_then(|conf| exec("DEL", plugin, &conf, at));
        if let Err(e) = result {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflist() -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "wiremesh",
            "plugins": [
                {"type": "bridge", "bridge": "wmbr0", "isGateway": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.201.1.0/24"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    #[test]
    fn first_plugin_gets_name_version_and_lab_ipam_dir_but_no_prev_result() {
        let c = plugin_config(&conflist(), 0, None, Path::new("/lab/ipam")).unwrap();
        assert_eq!(c["name"], "wiremesh");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["ipam"]["dataDir"], "/lab/ipam");
        assert_eq!(c["bridge"], "wmbr0");
        assert!(c.get("prevResult").is_none());
    }

    #[test]
    fn later_plugin_gets_the_previous_result() {
        let prev = serde_json::json!({"cniVersion": "1.0.0",
            "ips": [{"address": "10.201.1.2/24", "gateway": "10.201.1.1"}]});
        let c = plugin_config(&conflist(), 1, Some(&prev), Path::new("/x")).unwrap();
        assert_eq!(c["type"], "portmap");
        assert_eq!(c["prevResult"], prev);
        assert_eq!(result_ips(&prev), vec!["10.201.1.2/24".parse().unwrap()]);
    }

    #[test]
    fn plugin_types_refuse_paths_and_empty_lists() {
        assert_eq!(plugin_types(&conflist()).unwrap(), ["bridge", "portmap"]);
        let evil = serde_json::json!({"plugins": [{"type": "../../bin/sh"}]});
        assert!(plugin_types(&evil).is_err());
        assert!(plugin_types(&serde_json::json!({"plugins": []})).is_err());
        assert!(plugin_types(&serde_json::json!({})).is_err());
    }

    #[test]
    fn error_result_message_is_extracted() {
        let out = r#"{"code": 7, "msg": "failed to allocate", "details": "range full"}"#;
        assert_eq!(error_message(out, ""), "failed to allocate: range full");
        assert_eq!(error_message("garbage", "stderr text\n"), "stderr text");
    }
}
