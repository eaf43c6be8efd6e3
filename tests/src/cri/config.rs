//! The files a CRI-enabled private containerd reads: its main config (own root, state,
//! sockets; one `imports` line), the CRI drop-in it imports, and the CNI network list.
//!
//! The drop-in is rendered from the shipped `deploy/containerd/crx.toml`: containerd 1.6
//! and 1.7 replace a plugin's whole section with the last imported file that names it,
//! so the test's CRI settings (pause image, CNI dirs, the `runc` handler) and the
//! shipped crx handler are merged into one section here, as an installer does on such a
//! node. The CNI list is the shipped `deploy/cni/10-crx-test-bridge.conflist` with its
//! IPAM leases kept in the harness's own directory.

use std::path::{Path, PathBuf};

/// The CRI plugin's key in containerd's config (version 2).
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path} is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} lacks {what}")]
    Shape { path: PathBuf, what: &'static str },
    #[error("writing the rendered drop-in")]
    Render(#[source] toml::ser::Error),
}

/// The shipped containerd drop-in.
pub fn shipped_dropin() -> PathBuf {
    crate::artifacts::workspace_root().join("deploy/containerd/crx.toml")
}

/// The shipped CNI network list for tests.
pub fn shipped_conflist() -> PathBuf {
    crate::artifacts::workspace_root().join("deploy/cni/10-crx-test-bridge.conflist")
}

/// Where one private containerd keeps what these files name.
pub struct Layout<'a> {
    pub dir: &'a Path,
    pub socket: &'a Path,
    pub dropin: &'a Path,
}

/// containerd's main config: everything under `layout.dir`, the CRI plugin enabled and
/// configured only through the imported drop-in.
pub fn main_config(layout: &Layout<'_>) -> String {
    crate::containerd::private_config(layout.dir, layout.socket, Some(layout.dropin))
}

/// The test node's own CRI settings, before the crx drop-in is merged in. The stream
/// server listens on loopback on a port the kernel picks, so that several private
/// containerds never collide.
fn node_cri_section(pause_image: &str, cni_conf_dir: &Path) -> String {
    format!(
        r#"version = 2
[plugins."{CRI_PLUGIN}"]
  sandbox_image = "{pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # The sandbox this runs in may not lower oom_score_adj (runc fails with "failed to
  # update /proc/self/oom_score_adj: Permission denied"): keep containers' scores at or
  # above containerd's own, as kubelet-in-a-container setups do.
  restrict_oom_score_adj = true
  [plugins."{CRI_PLUGIN}".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."{CRI_PLUGIN}".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."{CRI_PLUGIN}".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        conf = cni_conf_dir.display()
    )
}

/// Renders the drop-in: the node's CRI section with the shipped crx drop-in merged in
/// and, when `shim_config` is given, the crx handler's `ConfigPath` pointing at it.
pub fn render_dropin(
    pause_image: &str,
    cni_conf_dir: &Path,
    shim_config: Option<&Path>,
) -> Result<String, ConfigError> {
    let shipped_path = shipped_dropin();
    let shipped = read_toml(&shipped_path)?;
    let node: toml::Table =
        toml::from_str(&node_cri_section(pause_image, cni_conf_dir)).map_err(|source| {
            ConfigError::Toml {
                path: PathBuf::from("<node CRI section>"),
                source,
            }
        })?;
    let mut merged = node;
    merge_tables(&mut merged, shipped);
    if let Some(config) = shim_config {
        let options = crx_options(&mut merged).ok_or(ConfigError::Shape {
            path: shipped_path,
            what: "the crx runtime's options table",
        })?;
        options.insert(
            "ConfigPath".into(),
            toml::Value::String(config.display().to_string()),
        );
    }
    toml::to_string(&merged).map_err(ConfigError::Render)
}

/// The CNI network list: the shipped one with host-local's leases under `ipam_dir`.
pub fn render_conflist(ipam_dir: &Path) -> Result<String, ConfigError> {
    let path = shipped_conflist();
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let mut list: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.clone(),
            source,
        })?;
    let ipam = list
        .pointer_mut("/plugins/0/ipam")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or(ConfigError::Shape {
            path: path.clone(),
            what: "plugins[0].ipam",
        })?;
    ipam.insert(
        "dataDir".into(),
        serde_json::Value::String(ipam_dir.display().to_string()),
    );
    serde_json::to_string_pretty(&list).map_err(|source| ConfigError::Json { path, source })
}

/// The subnet the shipped CNI list hands pod addresses from (e.g. `10.77.0.0/24`).
pub fn conflist_subnet() -> Result<String, ConfigError> {
    let path = shipped_conflist();
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let list: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.clone(),
            source,
        })?;
    list.pointer("/plugins/0/ipam/ranges/0/0/subnet")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or(ConfigError::Shape {
            path,
            what: "plugins[0].ipam.ranges[0][0].subnet",
        })
}

fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Toml {
        path: path.to_owned(),
        source,
    })
}

/// Deep merge: tables merge key by key, anything else in `from` replaces `into`'s.
fn merge_tables(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge_tables(existing, incoming)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

fn crx_options(config: &mut toml::Table) -> Option<&mut toml::Table> {
    let mut table = config;
    for key in [
        "plugins",
        CRI_PLUGIN,
        "containerd",
        "runtimes",
        "crx",
        "options",
    ] {
        table = table.get_mut(key)?.as_table_mut()?;
    }
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_dropin_keeps_node_settings_and_adds_the_crx_handler() {
        let text = render_dropin(
            "localhost/crx/pause:test",
            Path::new("/tmp/x/net.d"),
            Some(Path::new("/tmp/shim.toml")),
        )
        .unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        let cri = &t["plugins"][CRI_PLUGIN];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("localhost/crx/pause:test")
        );
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/usr/lib/cni"));
        let runtimes = &cri["containerd"]["runtimes"];
        assert_eq!(
            runtimes["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(
            runtimes["crx"]["runtime_type"].as_str(),
            Some("io.containerd.crx.v2")
        );
        assert_eq!(
            runtimes["crx"]["options"]["ConfigPath"].as_str(),
            Some("/tmp/shim.toml")
        );
        let annotations = runtimes["crx"]["pod_annotations"].as_array().unwrap();
        assert!(annotations
            .iter()
            .any(|a| a.as_str() == Some("io.kubernetes.cri.*")));
    }

    #[test]
    fn the_conflist_has_no_masquerade_and_no_default_route() {
        let list: serde_json::Value =
            serde_json::from_str(&render_conflist(Path::new("/tmp/ipam")).unwrap()).unwrap();
        let bridge = &list["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["isGateway"], false);
        assert_eq!(bridge["isDefaultGateway"], false);
        assert_eq!(bridge["ipam"]["dataDir"], "/tmp/ipam");
        let routes = bridge["ipam"]["routes"].as_array().unwrap();
        assert!(routes.iter().all(|r| r["dst"] != "0.0.0.0/0"));
        assert!(list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "loopback"));
        // hostPort mappings: DNAT only, never a masquerade of the pod's traffic.
        let portmap = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "portmap")
            .expect("portmap in the CNI list");
        assert_eq!(portmap["snat"], false);
        assert_eq!(portmap["capabilities"]["portMappings"], true);
        assert_eq!(conflist_subnet().unwrap(), "10.77.0.0/24");
    }
}
