//! `mesh-cni`'s logic: read the CNI environment and configuration, ask the agent, and
//! say what to print. A pure function over its inputs so that tests need no process.

use std::collections::HashMap;
use std::path::Path;

use super::protocol::{self, AgentRequest, AgentResponse, Attachment, AttachmentKey};
use super::spec::{self, CniError, ErrorCode, VersionInfo};

/// What the plugin prints on stdout when it succeeds (nothing for DEL, CHECK, STATUS, GC).
pub type Output = Option<String>;

/// Runs one CNI invocation. `env` holds the process environment, `stdin` its input.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Output, CniError> {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Ok(Some(to_json(&VersionInfo::current())));
    }
    if command.is_empty() {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "CNI_COMMAND is not set",
            "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION",
        ));
    }
    let conf = spec::parse_netconf(stdin)?;
    let version = conf.cni_version.clone();
    let socket = Path::new(&conf.agent_socket);
    let call = |request: AgentRequest| {
        protocol::call(socket, &request, protocol::DEFAULT_AGENT_TIMEOUT)
            .map_err(|e| e.in_version(&version))
    };
    let answer = match command {
        "ADD" => call(AgentRequest::Add(attachment(env, &version, true)?))?,
        // No socket at all means no agent on this node (uninstalled, or /run cleared by a
        // reboot): nothing is left to release, and failing would keep the runtime from
        // ever removing the pod. A restarting agent leaves its socket in place.
        "DEL" if !socket.exists() => {
            let _ = attachment(env, &version, false)?;
            return Ok(None);
        }
        "DEL" => call(AgentRequest::Del(attachment(env, &version, false)?))?,
        "CHECK" => call(AgentRequest::Check(attachment(env, &version, true)?))?,
        "STATUS" => call(AgentRequest::Status)?,
        "GC" => call(AgentRequest::Gc {
            valid: valid_attachments(stdin, &version)?,
        })?,
        other => {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("CNI_COMMAND {other:?} is not a CNI command"),
                "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )
            .in_version(&version))
        }
    };
    match answer {
        AgentResponse::Added(result) => Ok(Some(to_json(&result.for_version(&version)))),
        AgentResponse::Done => Ok(None),
        AgentResponse::Failed(err) => Err(err.in_version(&version)),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("CNI types always serialise")
}

/// Reads the attachment from the environment; `needs_netns` is false for DEL, which the
/// spec allows without a namespace (the runtime may have removed it already).
fn attachment(
    env: &HashMap<String, String>,
    version: &str,
    needs_netns: bool,
) -> Result<Attachment, CniError> {
    let invalid = |msg: String, details: &str| {
        CniError::new(ErrorCode::InvalidEnvironment, msg, details).in_version(version)
    };
    let container_id = env.get("CNI_CONTAINERID").cloned().unwrap_or_default();
    if container_id.is_empty() {
        return Err(invalid(
            "CNI_CONTAINERID is not set".into(),
            "the runtime must name the container",
        ));
    }
    let netns = env.get("CNI_NETNS").filter(|s| !s.is_empty()).cloned();
    let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""));
    let attachment = Attachment {
        key: AttachmentKey {
            container_id,
            ifname: env.get("CNI_IFNAME").cloned().unwrap_or_default(),
        },
        netns,
        cni_version: version.to_string(),
        pod_namespace: args.get("K8S_POD_NAMESPACE").map(|s| s.to_string()),
        pod_name: args.get("K8S_POD_NAME").map(|s| s.to_string()),
    };
    // The agent checks the same again: the socket is not only this plugin's.
    attachment
        .validate(needs_netns)
        .map_err(|e| e.in_version(version))?;
    Ok(attachment)
}

/// `CNI_ARGS` is `K=V;K=V`; entries without `=` are ignored, as the reference plugins do.
fn parse_cni_args(args: &str) -> HashMap<&str, &str> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// GC (CNI 1.1) lists the attachments still in use in `cni.dev/valid-attachments`.
fn valid_attachments(stdin: &[u8], version: &str) -> Result<Vec<AttachmentKey>, CniError> {
    #[derive(serde::Deserialize)]
    struct Gc {
        #[serde(rename = "cni.dev/valid-attachments", default)]
        valid: Vec<Valid>,
    }
    #[derive(serde::Deserialize)]
    struct Valid {
        #[serde(rename = "containerID")]
        container_id: String,
        ifname: String,
    }
    let gc: Gc = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::DecodingFailure,
            "cni.dev/valid-attachments could not be decoded",
            e.to_string(),
        )
        .in_version(version)
    })?;
    Ok(gc
        .valid
        .into_iter()
        .map(|v| AttachmentKey {
            container_id: v.container_id,
            ifname: v.ifname,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CONF: &[u8] = br#"{"cniVersion":"1.0.0","name":"veil","type":"mesh-cni","agentSocket":"/nonexistent/veil.sock"}"#;

    #[test]
    fn cni_version_needs_no_agent() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), b"{}")
            .unwrap()
            .unwrap();
        assert!(
            out.contains(r#""supportedVersions":["0.4.0","1.0.0","1.1.0"]"#),
            "{out}"
        );
    }

    #[test]
    fn cni_add_without_netns_is_an_environment_error() {
        let err = run(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ]),
            CONF,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.msg.contains("CNI_NETNS"), "{}", err.msg);
    }

    #[test]
    fn cni_bad_ifname_is_refused() {
        let err = run(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "a/b"),
                ("CNI_NETNS", "/x"),
            ]),
            CONF,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
    }

    #[test]
    fn cni_del_without_an_agent_on_the_node_succeeds_and_add_asks_to_retry() {
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(run(&env(&del), CONF).unwrap(), None);
        let err = run(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/proc/self/ns/net"),
            ]),
            CONF,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TryAgainLater);
        assert!(err.msg.contains("/nonexistent/veil.sock"), "{}", err.msg);
    }

    #[test]
    fn cni_del_with_a_silent_socket_asks_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        // Bound, then closed: the file stays and nobody answers, as while an agent restarts.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let conf = String::from_utf8_lossy(CONF)
            .replace("/nonexistent/veil.sock", &path.to_string_lossy());
        let err = run(
            &env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ]),
            conf.as_bytes(),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TryAgainLater);
    }

    #[test]
    fn cni_args_are_parsed() {
        let args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;junk");
        assert_eq!(args.get("K8S_POD_NAME"), Some(&"web"));
        assert_eq!(args.get("K8S_POD_NAMESPACE"), Some(&"ns"));
    }
}
