//! What the agent puts on its node besides the pods' own networks — the CNI network
//! configuration, written only once the agent serves — and the removal of all of it
//! (configuration, plugin, device, routes, state, sockets) when its DaemonSet is
//! uninstalled, so that `helm uninstall` leaves the node as it found it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;

use crate::config::Config;

/// The network name in the written configuration (and the one `mesh-cni` reports).
pub const NETWORK_NAME: &str = "veil";
/// How long the uninstall check may take: SIGTERM's grace period is short, and an API
/// server that does not answer must not keep the node from being left as it was.
const OWNER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The DaemonSet that runs this agent, `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl Owner {
    /// Parses `<namespace>/<name>`, both DNS labels/subdomains as Kubernetes allows.
    pub fn parse(text: &str) -> Result<Owner, String> {
        let (namespace, name) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not <namespace>/<name>"))?;
        let valid = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        if !valid(namespace, 63) || namespace.contains('.') {
            return Err(format!("{namespace:?} is not a namespace name"));
        }
        if !valid(name, 253) {
            return Err(format!("{name:?} is not a DaemonSet name"));
        }
        Ok(Owner {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

/// The CNI network configuration list for this agent: `mesh-cni`, then `portmap` when
/// hostPort is wanted (it reads the addresses `mesh-cni` returns).
pub fn cni_conf(agent_socket: &Path, chain_portmap: bool) -> serde_json::Value {
    let mut plugins = vec![serde_json::json!({
        "type": "mesh-cni",
        "agentSocket": agent_socket.to_string_lossy(),
    })];
    if chain_portmap {
        plugins.push(serde_json::json!({
            "type": "portmap",
            "capabilities": { "portMappings": true },
            "snat": true,
        }));
    }
    serde_json::json!({
        "cniVersion": crate::cni::spec::CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": plugins,
    })
}

/// Writes the configuration atomically (a temporary file in the same directory, synced,
/// then renamed): the runtime watches the directory and must never read half a file.
pub fn write_cni_conf(
    path: &Path,
    agent_socket: &Path,
    chain_portmap: bool,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_vec_pretty(&cni_conf(agent_socket, chain_portmap))
        .map_err(std::io::Error::other)?;
    // A name the runtime ignores (it reads *.conf, *.conflist and *.json only).
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Why the agent is stopping, as far as what it leaves on the node is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Another agent follows (restart, upgrade, node drain): leave everything for it.
    Restart,
    /// The DaemonSet is gone, or its credentials with it: remove everything.
    Uninstall(&'static str),
}

/// Checks at start that the agent can read its own DaemonSet, so a refusal at SIGTERM
/// means the chart's RBAC was removed (an uninstall), never that it was missing all along:
/// mistaking a restart for an uninstall would throw away the addresses of running pods.
pub async fn check_owner(client: &kube::Client, owner: &Owner) -> Result<(), String> {
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), &owner.namespace);
    match api.get(&owner.name).await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot read the agent's own DaemonSet {}/{} (needed to tell an uninstall from a restart): {e}",
            owner.namespace, owner.name
        )),
    }
}

/// Asks the API server whether the agent's DaemonSet still exists. Anything but a clear
/// answer counts as a restart: leaving state behind is recoverable, wiping it is not.
pub async fn departure(client: &kube::Client, owner: &Owner) -> Departure {
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), &owner.namespace);
    match tokio::time::timeout(OWNER_CHECK_TIMEOUT, api.get(&owner.name)).await {
        Ok(Ok(ds)) if ds.metadata.deletion_timestamp.is_some() => {
            Departure::Uninstall("the DaemonSet is being deleted")
        }
        Ok(Ok(_)) => Departure::Restart,
        Ok(Err(kube::Error::Api(status))) => match status.code {
            404 => Departure::Uninstall("the DaemonSet is gone"),
            // Checked at start: the agent could read it then, so its ServiceAccount or
            // RBAC went with the release.
            401 => Departure::Uninstall("the agent's ServiceAccount is gone"),
            403 => Departure::Uninstall("the agent's RBAC is gone"),
            code => {
                tracing::warn!(code, reason = %status.message, "owner DaemonSet check failed; treating the stop as a restart");
                Departure::Restart
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "owner DaemonSet check failed; treating the stop as a restart");
            Departure::Restart
        }
        Err(_) => {
            tracing::warn!(
                timeout_s = OWNER_CHECK_TIMEOUT.as_secs(),
                "owner DaemonSet check timed out; treating the stop as a restart"
            );
            Departure::Restart
        }
    }
}

/// Removes everything the agent put on the node outside pods: the CNI configuration
/// first (so no new pod is sent to a plugin without an agent), the plugin, the peer
/// routes, the WireGuard device, the sockets and the state directory's contents.
/// Returns what could not be removed; the caller logs it.
pub async fn remove_from_node(config: &Config, netlink: &rtnetlink::Handle) -> Vec<String> {
    let mut failed = Vec::new();
    let mut remove_file = |path: &Path| match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => failed.push(format!("{}: {e}", path.display())),
    };
    for path in [&config.cni.cni_conf_file, &config.cni.cni_plugin_file]
        .into_iter()
        .flatten()
    {
        remove_file(path);
    }
    remove_file(&config.cni.cni_socket);
    remove_file(&config.identity.workload_api_socket);
    if let Err(e) = crate::routes::reconcile(netlink, &Default::default()).await {
        failed.push(format!("peer routes: {e}"));
    }
    if let Err(e) = crate::routes::remove_pods_rules(netlink).await {
        failed.push(format!("routing rule: {e}"));
    }
    // The proxy steering: its rules and tables, then the pins (the programs detach when
    // this process, the last holder of their links, exits).
    if let Err(e) = crate::redirect::routing::remove_all(netlink).await {
        failed.push(format!("proxy steering rules: {e}"));
    }
    if let Err(e) = crate::redirect::Redirect::unpin_all(&config.policy.bpf_pin_dir) {
        failed.push(format!("eBPF pins: {e}"));
    }
    match crate::podnet::link_by_name(netlink, crate::wireguard::DEVICE_NAME).await {
        Ok(Some(link)) => {
            if let Err(e) = netlink.link().del(link.header.index).execute().await {
                failed.push(format!("{}: {e}", crate::wireguard::DEVICE_NAME));
            } else {
                tracing::info!(device = crate::wireguard::DEVICE_NAME, "removed");
            }
        }
        Ok(None) => {}
        Err(e) => failed.push(format!("{}: {e}", crate::wireguard::DEVICE_NAME)),
    }
    // The directories themselves may be mount points of the agent's container: their
    // contents go, the (empty) directories stay where they cannot be removed.
    for dir in [
        Some(config.state_dir.clone()),
        config
            .identity
            .workload_api_socket
            .parent()
            .map(PathBuf::from),
    ]
    .into_iter()
    .flatten()
    {
        empty_dir(&dir, &mut failed);
    }
    failed
}

fn empty_dir(dir: &Path, failed: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return failed.push(format!("{}: {e}", dir.display())),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Never follows links: a symlink in the state directory is removed, not its target.
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = removed {
            failed.push(format!("{}: {e}", path.display()));
        }
    }
    tracing::info!(dir = %dir.display(), "emptied");
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::debug!(dir = %dir.display(), error = %e, "directory kept (a mount point?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_parses_namespace_and_name() {
        assert_eq!(
            Owner::parse("veil-system/veil-agent").unwrap(),
            Owner {
                namespace: "veil-system".into(),
                name: "veil-agent".into()
            }
        );
        for bad in [
            "",
            "veil-agent",
            "/veil-agent",
            "veil-system/",
            "Veil/agent",
            "a.b/agent",
            "ns/-agent",
            "ns/agent/extra",
            "ns/agent\n",
        ] {
            assert!(Owner::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn conf_lists_mesh_cni_then_portmap() {
        let conf = cni_conf(Path::new("/run/veil/cni.sock"), true);
        assert_eq!(conf["name"], "veil");
        assert_eq!(conf["plugins"][0]["type"], "mesh-cni");
        assert_eq!(conf["plugins"][0]["agentSocket"], "/run/veil/cni.sock");
        assert_eq!(conf["plugins"][1]["type"], "portmap");
        let alone = cni_conf(Path::new("/run/veil/cni.sock"), false);
        assert_eq!(alone["plugins"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn conf_is_written_whole_and_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.d/05-veil.conflist");
        write_cni_conf(&path, Path::new("/a.sock"), false).unwrap();
        write_cni_conf(&path, Path::new("/b.sock"), true).unwrap();
        let conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(conf["plugins"][0]["agentSocket"], "/b.sock");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("05-veil.conflist")]);
    }

    #[test]
    fn emptying_a_directory_removes_links_not_their_targets() {
        let outside = tempfile::tempdir().unwrap();
        let kept = outside.path().join("kept");
        std::fs::write(&kept, b"x").unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("ipam")).unwrap();
        std::fs::write(state.path().join("ipam/198.19.0.2"), b"{}").unwrap();
        std::os::unix::fs::symlink(outside.path(), state.path().join("link")).unwrap();
        let mut failed = Vec::new();
        empty_dir(state.path(), &mut failed);
        assert!(failed.is_empty(), "{failed:?}");
        assert!(!state.path().exists());
        assert!(kept.exists());
    }
}
