//! The admin messages and the client side `meshctl` and the test bed use.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cni::protocol::AttachmentKey;
use crate::flows::{Filter, FlowRecord, FlowVerdict};
use crate::proxy::ProxyStats;

/// A request to the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum AdminRequest {
    /// `meshctl pods`: the attachments on this node with their counters.
    Pods,
    /// `meshctl wireguard`: the node key and the peers.
    Wireguard,
    /// `meshctl wireguard rotate`: replace the node key now and publish it.
    RotateKey,
    /// `meshctl observe`: the flow records in the ring that pass the filter, then (with
    /// `follow`) every new one until the client hangs up.
    Observe(ObserveRequest),
    /// `meshctl proxy`: the proxy's counters.
    Proxy,
}

/// What `observe` shows; unset fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserveRequest {
    /// Source or destination namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Source or destination pod name.
    #[serde(default)]
    pub pod: Option<String>,
    /// The verdict.
    #[serde(default)]
    pub verdict: Option<FlowVerdict>,
    /// The policy, `<namespace>/<name>`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Keep streaming new records after the ring's.
    #[serde(default)]
    pub follow: bool,
}

impl ObserveRequest {
    /// The flow ring's filter for this request.
    pub fn filter(&self) -> Filter {
        Filter {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            verdict: self.verdict,
            policy: self.policy.clone(),
        }
    }
}

/// One attachment as `meshctl pods` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// Container and interface.
    #[serde(flatten)]
    pub key: AttachmentKey,
    /// Pod namespace and name when known.
    pub pod: Option<String>,
    /// The pod's address.
    pub ip: std::net::Ipv4Addr,
    /// The host-side interface.
    pub host_ifname: String,
    /// Packets the pod sent, counted by the eBPF program on its host-side interface.
    pub tx_packets: u64,
    /// Bytes the pod sent.
    pub tx_bytes: u64,
    /// Packets the pod sent from an address not its own, dropped by anti-spoofing.
    #[serde(default)]
    pub spoofed_packets: u64,
}

/// An answer line from the admin socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum AdminResponse {
    /// The request failed; the message says why.
    Failed {
        /// What went wrong.
        error: String,
    },
    /// Answer to `Wireguard`.
    Wireguard {
        /// This node's public key (base64).
        public_key: String,
        /// Peers.
        peers: Vec<crate::wireguard::PeerStatus>,
        /// Packets dropped because no peer with a key covered their destination.
        dropped_no_peer: u64,
        /// Packets through each queue.
        queues: Vec<crate::wireguard::QueueStatus>,
        /// Nodes left out of the peer set because their objects could capture traffic.
        excluded: Vec<crate::peers::Excluded>,
    },
    /// Answer to `RotateKey`: the new public key, published.
    Rotated {
        /// The new public key (base64).
        public_key: String,
    },
    /// Answer to `Pods`.
    Pods {
        /// The attachments, in address order.
        pods: Vec<PodInfo>,
    },
    /// One flow record of an `Observe` stream.
    Flow(Box<FlowRecord>),
    /// The observer fell behind: this many records were skipped.
    Lagged {
        /// Records skipped.
        missed: u64,
    },
    /// The end of an `Observe` without `follow`.
    End,
    /// Answer to `Proxy`.
    Proxy(ProxyStats),
}

/// How long `meshctl` waits for an answer line.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket could not be reached or the connection broke.
    #[error("mesh-agent admin socket {path}: {what}: {source}; is the mesh-agent running on this node (and are you root)?")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The agent closed the connection without answering.
    #[error("mesh-agent admin socket {0}: closed without answering")]
    NoAnswer(PathBuf),
    /// The answer is no admin answer.
    #[error("mesh-agent's answer could not be decoded: {0}")]
    Decode(String),
}

/// An open admin connection with its request sent.
pub struct Connection {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Connection {
    /// Connects to `socket` and sends `request`; `timeout` bounds each read and write.
    pub fn open(
        socket: &Path,
        request: &AdminRequest,
        timeout: Option<Duration>,
    ) -> Result<Connection, AdminError> {
        let path = socket.to_path_buf();
        let unreachable = |what, source| AdminError::Unreachable {
            path: path.clone(),
            what,
            source,
        };
        let mut stream = UnixStream::connect(socket).map_err(|e| unreachable("connect", e))?;
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|e| unreachable("set timeout", e))?;
        let mut line = serde_json::to_vec(request).unwrap_or_default();
        line.push(b'\n');
        stream
            .write_all(&line)
            .map_err(|e| unreachable("send request", e))?;
        Ok(Connection {
            reader: BufReader::new(stream),
            path,
        })
    }

    /// The next answer line; `None` when the agent closed the stream.
    pub fn next_answer(&mut self) -> Option<Result<AdminResponse, AdminError>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).map_err(|e| AdminError::Decode(format!("{e}: {line}"))),
            ),
            Err(source) => Some(Err(AdminError::Unreachable {
                path: self.path.clone(),
                what: "read answer",
                source,
            })),
        }
    }
}

/// Sends one request and reads its one answer.
pub fn call(
    socket: &Path,
    request: &AdminRequest,
    timeout: Duration,
) -> Result<AdminResponse, AdminError> {
    let mut connection = Connection::open(socket, request, Some(timeout))?;
    connection
        .next_answer()
        .unwrap_or_else(|| Err(AdminError::NoAnswer(socket.to_path_buf())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_protocol_round_trips() {
        let observe = AdminRequest::Observe(ObserveRequest {
            verdict: Some(FlowVerdict::Deny),
            policy: Some("shop/api".into()),
            follow: true,
            ..Default::default()
        });
        for request in [
            AdminRequest::Pods,
            AdminRequest::Wireguard,
            AdminRequest::RotateKey,
            AdminRequest::Proxy,
            observe,
        ] {
            let line = serde_json::to_string(&request).expect("serialise");
            assert_eq!(
                serde_json::from_str::<AdminRequest>(&line).expect("parse"),
                request
            );
        }
        let failed = AdminResponse::Failed { error: "x".into() };
        let line = serde_json::to_string(&failed).expect("serialise");
        assert!(line.contains(r#""answer":"failed""#), "{line}");
        assert_eq!(
            serde_json::from_str::<AdminResponse>(&line).expect("parse"),
            failed
        );
        // CNI verbs are no admin requests.
        assert!(serde_json::from_str::<AdminRequest>(r#"{"request":"add"}"#).is_err());
    }

    fn observe_requests() -> impl proptest::strategy::Strategy<Value = AdminRequest> {
        use proptest::prelude::*;
        let verdict = prop_oneof![
            Just(None),
            Just(Some(FlowVerdict::Allow)),
            Just(Some(FlowVerdict::Deny)),
            Just(Some(FlowVerdict::AuditDeny)),
        ];
        (
            any::<Option<String>>(),
            any::<Option<String>>(),
            verdict,
            any::<Option<String>>(),
            any::<bool>(),
        )
            .prop_map(|(namespace, pod, verdict, policy, follow)| {
                AdminRequest::Observe(ObserveRequest {
                    namespace,
                    pod,
                    verdict,
                    policy,
                    follow,
                })
            })
    }

    proptest::proptest! {
        /// The agent decodes whatever reaches its admin socket without panicking.
        #[test]
        fn admin_request_decoder_takes_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<AdminRequest>(&bytes);
        }

        /// Near misses of real requests: a valid request cut or with one byte changed.
        #[test]
        fn admin_request_decoder_takes_mangled_requests(request in observe_requests(), cut in 0usize..400, at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
            let mut line = serde_json::to_vec(&request).expect("serialise");
            if let Some(b) = line.get_mut(at) {
                *b = byte;
            }
            line.truncate(cut);
            let _ = serde_json::from_slice::<AdminRequest>(&line);
        }

        /// Every request `meshctl` can send decodes to itself, whatever its strings hold.
        #[test]
        fn admin_observe_requests_round_trip(request in observe_requests()) {
            let line = serde_json::to_string(&request).expect("serialise");
            proptest::prop_assert!(!line.contains('\n'), "one line per request");
            proptest::prop_assert_eq!(serde_json::from_str::<AdminRequest>(&line).ok(), Some(request));
        }
    }

    #[test]
    fn admin_unreachable_agent_names_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let err = call(&path, &AdminRequest::Pods, Duration::from_secs(1)).expect_err("no agent");
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }
}
