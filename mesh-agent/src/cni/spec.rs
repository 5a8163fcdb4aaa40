//! The parts of the CNI specification (1.0.0, with 0.4.0 results and 1.1.0 verbs) that
//! `mesh-cni` speaks: network configuration, results, error codes and versions.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The version this plugin writes when the configuration does not force another.
pub const CNI_VERSION: &str = "1.0.0";

/// Every version whose configuration and result formats this plugin handles.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// Well-known error codes of the CNI specification, and Veil's own (100 and above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub enum ErrorCode {
    /// 1: the configuration names a CNI version this plugin does not support.
    IncompatibleVersion,
    /// 2: a field of the configuration is not supported.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a required environment variable is missing or invalid.
    InvalidEnvironment,
    /// 5: an I/O failure (netlink, files).
    IoFailure,
    /// 6: the configuration or a message could not be decoded.
    DecodingFailure,
    /// 7: the network configuration is invalid.
    InvalidNetworkConfig,
    /// 11: a transient condition; the runtime should try again later.
    TryAgainLater,
    /// 50: the plugin cannot serve ADD requests (STATUS).
    PluginNotAvailable,
    /// 100: the node's pod address pool has no free address.
    AddressPoolExhausted,
    /// 101: CHECK found the attachment not as ADD left it.
    CheckFailed,
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        match code {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodingFailure => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::AddressPoolExhausted => 100,
            ErrorCode::CheckFailed => 101,
        }
    }
}

impl TryFrom<u32> for ErrorCode {
    type Error = String;
    fn try_from(code: u32) -> Result<Self, String> {
        Ok(match code {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::UnknownContainer,
            4 => ErrorCode::InvalidEnvironment,
            5 => ErrorCode::IoFailure,
            6 => ErrorCode::DecodingFailure,
            7 => ErrorCode::InvalidNetworkConfig,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::PluginNotAvailable,
            100 => ErrorCode::AddressPoolExhausted,
            101 => ErrorCode::CheckFailed,
            other => return Err(format!("unknown CNI error code {other}")),
        })
    }
}

/// A CNI error as the specification prints it on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {}: {msg}{}", u32::from(*code), if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    /// The version of the error format; the configuration's version where known.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Numeric error code.
    pub code: ErrorCode,
    /// Short message naming what is wrong.
    pub msg: String,
    /// Longer explanation: where, and what to do.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// Builds an error in the plugin's default version.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            cni_version: CNI_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Sets the version the error is written in.
    pub fn in_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        self
    }
}

/// The network configuration `mesh-cni` accepts on stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// CNI version of this configuration.
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Plugin type; `mesh-cni`.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Unix socket of the node's `mesh-agent`.
    #[serde(default = "default_agent_socket")]
    pub agent_socket: String,
    /// Result of the previous plugin in a chain (CHECK and DEL carry ADD's result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<serde_json::Value>,
}

/// Where the agent listens unless the configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/veil/cni.sock";

fn default_agent_socket() -> String {
    DEFAULT_AGENT_SOCKET.to_string()
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address, lower-case colon-separated hex.
    pub mac: String,
    /// Network namespace path for interfaces inside the container; absent on the host side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An IP configuration in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: Ipv4Net,
    /// Gateway for this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    pub interface: usize,
    /// Only in 0.4.0 results: the IP version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination prefix.
    pub dst: Ipv4Net,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

/// The success result of ADD (and the `prevResult` of CHECK and DEL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// Version of this result's format.
    pub cni_version: String,
    /// Interfaces created: host side first, container side second.
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    pub ips: Vec<IpConfig>,
    /// Routes installed in the container.
    pub routes: Vec<Route>,
    /// DNS settings; the runtime's own are kept, so this is empty.
    pub dns: serde_json::Map<String, serde_json::Value>,
}

impl CniResult {
    /// Rewrites the result in the format of `version` (0.4.0 marks each IP with its version).
    pub fn for_version(mut self, version: &str) -> Self {
        let legacy = version == "0.4.0";
        for ip in &mut self.ips {
            ip.version = legacy.then(|| "4".to_string());
        }
        self.cni_version = version.to_string();
        self
    }
}

/// The answer to VERSION.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// The version of this answer's format.
    pub cni_version: String,
    /// Versions this plugin supports.
    pub supported_versions: Vec<String>,
}

impl VersionInfo {
    /// What this plugin supports.
    pub fn current() -> Self {
        VersionInfo {
            cni_version: CNI_VERSION.to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }
    }
}

/// Parses and checks a network configuration: decodable, a supported version, our type.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    // Read the version first so even a config with other faults gets an error in its own version.
    let raw: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::DecodingFailure,
            "network configuration on stdin is not valid JSON",
            format!("{e}"),
        )
    })?;
    let version = raw
        .get("cniVersion")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::DecodingFailure,
                "network configuration has no string field cniVersion",
                "stdin must carry a CNI network configuration object",
            )
        })?
        .to_string();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("cniVersion {version:?} is not supported"),
            format!("mesh-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let conf: NetConf = serde_json::from_value(raw).map_err(|e| {
        CniError::new(
            ErrorCode::DecodingFailure,
            "network configuration does not match mesh-cni's format",
            format!("{e}"),
        )
        .in_version(&version)
    })?;
    if conf.plugin_type != "mesh-cni" {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "network configuration type is {:?}, expected \"mesh-cni\"",
                conf.plugin_type
            ),
            "",
        )
        .in_version(&version));
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_netconf_rejects_garbage_with_decoding_error() {
        let err = parse_netconf(b"\x00not json").unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodingFailure);
    }

    #[test]
    fn cni_netconf_rejects_unknown_version() {
        let err =
            parse_netconf(br#"{"cniVersion":"9.9.9","name":"n","type":"mesh-cni"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
        assert!(err.msg.contains("9.9.9"), "{}", err.msg);
    }

    #[test]
    fn cni_netconf_defaults_agent_socket() {
        let conf =
            parse_netconf(br#"{"cniVersion":"1.0.0","name":"veil","type":"mesh-cni"}"#).unwrap();
        assert_eq!(conf.agent_socket, DEFAULT_AGENT_SOCKET);
    }

    #[test]
    fn cni_error_serialises_numeric_code() {
        let err = CniError::new(ErrorCode::AddressPoolExhausted, "full", "");
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json["code"], 100);
        assert_eq!(json["cniVersion"], "1.0.0");
        assert!(json.get("details").is_none());
    }

    #[test]
    fn cni_result_0_4_0_marks_ip_version() {
        let result = CniResult {
            cni_version: CNI_VERSION.into(),
            interfaces: vec![],
            ips: vec![IpConfig {
                address: "198.19.0.5/32".parse().unwrap(),
                gateway: None,
                interface: 1,
                version: None,
            }],
            routes: vec![],
            dns: Default::default(),
        };
        let old = result.clone().for_version("0.4.0");
        assert_eq!(old.ips[0].version.as_deref(), Some("4"));
        assert_eq!(result.for_version("1.0.0").ips[0].version, None);
    }
}
