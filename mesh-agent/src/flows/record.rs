//! One flow record: who talked to whom, what was asked and what the proxy decided.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use veil_l7_policy::Decision;

use crate::state::Workload;

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its address.
    pub ip: IpAddr,
    /// Its port (the destination's; a source's ephemeral port is not recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The pod's namespace, if a pod owns the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name, if a pod owns the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's SPIFFE ID, if a pod owns the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

impl Endpoint {
    /// The endpoint at `ip` (and `port`), named after `workload` when a pod owns it.
    pub fn new(ip: IpAddr, port: Option<u16>, workload: Option<&Workload>) -> Endpoint {
        Endpoint {
            ip,
            port,
            namespace: workload.map(|w| w.namespace.clone()),
            pod: workload.map(|w| w.name.clone()),
            spiffe_id: workload.map(|w| w.spiffe_id.clone()),
        }
    }
}

/// What the record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowKind {
    /// One HTTP request (an HTTP/1.1 request or an HTTP/2 stream).
    Http,
    /// A connection allowed whole by a rule without `http`, spliced without parsing.
    L4,
    /// A connection that HTTP rules cover but whose bytes are not HTTP.
    NotHttp,
    /// A connection or request refused by a proxy limit (connections, timeouts, sizes).
    Limit,
    /// A packet or connection whose source address is forged (set by the eBPF side).
    Spoofed,
}

/// The verdict, as flow records name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowVerdict {
    /// Forwarded.
    Allow,
    /// Refused.
    Deny,
    /// Forwarded, but an `enforce` policy would have refused it.
    AuditDeny,
}

impl From<Decision> for FlowVerdict {
    fn from(d: Decision) -> FlowVerdict {
        match d {
            Decision::Allow => FlowVerdict::Allow,
            Decision::Deny => FlowVerdict::Deny,
            Decision::AuditDeny => FlowVerdict::AuditDeny,
        }
    }
}

/// One flow record, serialised as one JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When the verdict was given, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The client.
    pub source: Endpoint,
    /// The original destination (pod address and port).
    pub destination: Endpoint,
    /// What the record is about.
    pub kind: FlowKind,
    /// The HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `:authority` or `Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The normalised path the policy judged (or the raw target if it could not be).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The HTTP status sent back to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The verdict.
    pub verdict: FlowVerdict,
    /// The policy that decided, `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The index of the rule that allowed, in the policy's `spec.ingress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Why, in words (`no rule matched`, `invalid path: ...`, `not-http`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request's `x-request-id` (sent by the client or added by the proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Time from the request (or connection) to the verdict's answer, in microseconds.
    pub latency_us: u64,
}

impl FlowRecord {
    /// A record stamped now, with no HTTP details; fill in what applies.
    pub fn new(
        kind: FlowKind,
        verdict: FlowVerdict,
        source: Endpoint,
        destination: Endpoint,
    ) -> FlowRecord {
        FlowRecord {
            time_unix_ms: unix_ms(SystemTime::now()),
            source,
            destination,
            kind,
            method: None,
            authority: None,
            path: None,
            status: None,
            verdict,
            policy: None,
            rule: None,
            reason: None,
            request_id: None,
            latency_us: 0,
        }
    }
}

/// Milliseconds since the epoch; 0 for a clock set before 1970.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
