//! The messages `mesh-cni` exchanges with the agent over its CNI socket:
//! one JSON request line, one JSON response line, per connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::spec::{CniError, CniResult, ErrorCode};

/// How long the plugin waits for the agent: netlink work on a busy node takes well under
/// a second, and the runtime's own CNI timeout is minutes, so 30 s flags a stuck agent.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One pod interface, as the runtime names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// What ADD, CHECK and DEL tell the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Which container and interface.
    #[serde(flatten)]
    pub key: AttachmentKey,
    /// `CNI_NETNS`: path of the pod's network namespace (may be absent on DEL).
    pub netns: Option<String>,
    /// Version the runtime wants the result in.
    pub cni_version: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`, when the runtime passes it.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`, when the runtime passes it.
    pub pod_name: Option<String>,
}

/// The longest `CNI_CONTAINERID` accepted: runtimes use 64 hex digits; the bound keeps
/// a hostile caller from growing state files and log lines.
pub const MAX_CONTAINER_ID: usize = 256;
/// The longest `CNI_NETNS` path accepted (`PATH_MAX`).
pub const MAX_NETNS_PATH: usize = 4096;
/// The longest pod namespace or name accepted (a DNS subdomain, RFC 1123).
pub const MAX_POD_NAME: usize = 253;
/// The most attachments a GC request may list: far above the pods a node can run.
pub const MAX_GC_ATTACHMENTS: usize = 65_536;

/// Why a request's fields are refused; the message names the field and the value.
fn refuse(field: &str, value: &str, rule: &str) -> CniError {
    let shown: String = value.chars().take(64).collect();
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("{field} {shown:?} is not valid"),
        rule,
    )
}

impl AttachmentKey {
    /// Checks the fields against the CNI spec: they name interfaces and files, so
    /// anything else is refused before use.
    pub fn validate(&self) -> Result<(), CniError> {
        let id = &self.container_id;
        if id.is_empty()
            || id.len() > MAX_CONTAINER_ID
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(refuse(
                "CNI_CONTAINERID",
                id,
                "1 to 256 letters, digits, underscores, periods or hyphens",
            ));
        }
        let ifname = &self.ifname;
        if ifname.is_empty()
            || ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(refuse(
                "CNI_IFNAME",
                ifname,
                "1 to 15 characters, none of '/', ':' or white space",
            ));
        }
        Ok(())
    }
}

impl Attachment {
    /// Checks every field; `needs_netns` is false for DEL.
    pub fn validate(&self, needs_netns: bool) -> Result<(), CniError> {
        self.key.validate()?;
        match &self.netns {
            None if needs_netns => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "CNI_NETNS is not set",
                    "ADD and CHECK need the path of the container's network namespace",
                ))
            }
            Some(path)
                if !path.starts_with('/') || path.len() > MAX_NETNS_PATH || path.contains('\0') =>
            {
                return Err(refuse(
                    "CNI_NETNS",
                    path,
                    "an absolute path of at most 4096 bytes",
                ))
            }
            _ => {}
        }
        let names = [
            ("K8S_POD_NAMESPACE", &self.pod_namespace),
            ("K8S_POD_NAME", &self.pod_name),
        ];
        for (field, value) in names {
            if let Some(value) = value {
                let dns = value.len() <= MAX_POD_NAME
                    && !value.is_empty()
                    && value
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c));
                if !dns {
                    return Err(refuse(
                        field,
                        value,
                        "a DNS subdomain (RFC 1123), at most 253 characters",
                    ));
                }
            }
        }
        if self.cni_version.len() > 16 {
            return Err(refuse(
                "cniVersion",
                &self.cni_version,
                "a CNI version such as 1.0.0",
            ));
        }
        Ok(())
    }
}

/// Decodes one request line from the socket and checks its fields; the agent acts on
/// nothing that fails here.
pub fn decode_request(line: &[u8]) -> Result<AgentRequest, CniError> {
    let request: AgentRequest = serde_json::from_slice(line).map_err(|e| {
        CniError::new(
            ErrorCode::DecodingFailure,
            "mesh-agent could not decode the request",
            e.to_string(),
        )
    })?;
    match &request {
        AgentRequest::Add(a) | AgentRequest::Check(a) => a.validate(true)?,
        AgentRequest::Del(a) => a.validate(false)?,
        AgentRequest::Gc { valid } => {
            if valid.len() > MAX_GC_ATTACHMENTS {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("GC lists {} attachments", valid.len()),
                    "at most 65536",
                ));
            }
            valid.iter().try_for_each(AttachmentKey::validate)?;
        }
        AgentRequest::Status => {}
    }
    Ok(request)
}

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum AgentRequest {
    /// CNI ADD.
    Add(Attachment),
    /// CNI DEL.
    Del(Attachment),
    /// CNI CHECK.
    Check(Attachment),
    /// CNI STATUS: can the agent serve ADD now?
    Status,
    /// CNI GC: release every attachment not in `valid`.
    Gc {
        /// Attachments the runtime still uses.
        valid: Vec<AttachmentKey>,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum AgentResponse {
    /// ADD succeeded.
    Added(CniResult),
    /// DEL, CHECK, STATUS or GC succeeded.
    Done,
    /// The request failed; the error is what the plugin prints.
    Failed(CniError),
}

/// Sends one request and reads the answer. A socket that cannot be reached is a
/// `TryAgainLater` error naming the path, since an agent that is starting will be back.
pub fn call(
    socket: &Path,
    request: &AgentRequest,
    timeout: Duration,
) -> Result<AgentResponse, CniError> {
    let unreachable = |what: &str, e: std::io::Error| {
        CniError::new(
            ErrorCode::TryAgainLater,
            format!("mesh-agent is unreachable at {}", socket.display()),
            format!("{what}: {e}; is the mesh-agent running on this node, and is agentSocket in the network configuration right?"),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| unreachable("connect", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| unreachable("set timeout", e))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| unreachable("set timeout", e))?;
    let mut line = serde_json::to_vec(request).expect("requests always serialise");
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| unreachable("send request", e))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| unreachable("read answer", e))?;
    if answer.is_empty() {
        return Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "mesh-agent at {} closed the connection without answering",
                socket.display()
            ),
            "the agent may be restarting; try again",
        ));
    }
    serde_json::from_str(&answer).map_err(|e| {
        CniError::new(
            ErrorCode::DecodingFailure,
            "mesh-agent's answer could not be decoded",
            format!("{e}: {answer}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_agent_refuses_requests_whose_fields_name_other_things() {
        let add = |id: &str, ifname: &str, netns: Option<&str>, pod: &str| {
            serde_json::to_vec(&AgentRequest::Add(Attachment {
                key: AttachmentKey {
                    container_id: id.into(),
                    ifname: ifname.into(),
                },
                netns: netns.map(str::to_string),
                cni_version: "1.0.0".into(),
                pod_namespace: Some("default".into()),
                pod_name: Some(pod.into()),
            }))
            .unwrap()
        };
        assert!(decode_request(&add("c1", "eth0", Some("/run/netns/p"), "web-0")).is_ok());
        let long = "a".repeat(MAX_CONTAINER_ID + 1);
        let refused = [
            (
                add("../../etc", "eth0", Some("/run/netns/p"), "web"),
                "CNI_CONTAINERID",
            ),
            (
                add(&long, "eth0", Some("/run/netns/p"), "web"),
                "CNI_CONTAINERID",
            ),
            (add("c1", "a/b", Some("/run/netns/p"), "web"), "CNI_IFNAME"),
            (
                add("c1", "eth0\n", Some("/run/netns/p"), "web"),
                "CNI_IFNAME",
            ),
            (add("c1", "eth0", None, "web"), "CNI_NETNS"),
            (add("c1", "eth0", Some("relative/p"), "web"), "CNI_NETNS"),
            (
                add("c1", "eth0", Some("/run/netns/p"), "Web/x"),
                "K8S_POD_NAME",
            ),
            (b"{not json".to_vec(), "decode"),
        ];
        for (line, field) in refused {
            let err = decode_request(&line).unwrap_err();
            assert!(err.msg.contains(field), "{field}: {}", err.msg);
        }
        let gc = serde_json::to_vec(&AgentRequest::Gc {
            valid: vec![AttachmentKey {
                container_id: "ok".into(),
                ifname: "eth0/../x".into(),
            }],
        })
        .unwrap();
        assert!(decode_request(&gc).is_err());
    }

    #[test]
    fn cni_protocol_round_trips_requests() {
        let req = AgentRequest::Del(Attachment {
            key: AttachmentKey {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            netns: None,
            cni_version: "1.0.0".into(),
            pod_namespace: Some("default".into()),
            pod_name: Some("web".into()),
        });
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.contains(r#""request":"del""#), "{line}");
        assert_eq!(serde_json::from_str::<AgentRequest>(&line).unwrap(), req);
    }

    #[test]
    fn cni_protocol_round_trips_every_response() {
        let done = AgentResponse::Done;
        let line = serde_json::to_string(&done).unwrap();
        assert_eq!(serde_json::from_str::<AgentResponse>(&line).unwrap(), done);
        let failed = AgentResponse::Failed(CniError::new(ErrorCode::IoFailure, "x", ""));
        let line = serde_json::to_string(&failed).unwrap();
        assert_eq!(
            serde_json::from_str::<AgentResponse>(&line).unwrap(),
            failed
        );
    }

    #[test]
    fn cni_protocol_unreachable_agent_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = call(&path, &AgentRequest::Status, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.code, ErrorCode::TryAgainLater);
        assert!(err.msg.contains("absent.sock"), "{}", err.msg);
    }
}
