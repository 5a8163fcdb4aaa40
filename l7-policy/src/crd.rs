//! The `L7Policy` custom resource (`veil.dev/v1alpha1`), as the API server stores it.
//!
//! The schema generated from these types carries the checks a schema can express
//! (`minItems`, `pattern`, CEL `x-kubernetes-validations`); everything else is checked by
//! [`crate::CompiledPolicy::compile`] and reported on `status.conditions`.
//!
//! # Semantics
//!
//! * A request to a pod is **allowed** if any rule of any policy selecting the pod matches it.
//! * A pod selected by at least one `enforce` policy **denies** what no rule allows
//!   (default deny, as Kubernetes NetworkPolicy does), on every port.
//! * A pod selected only by `audit` policies lets such a request pass and reports it as
//!   `audit-deny`.
//! * Kubelet health probes from the pod's own node are allowed unless
//!   [`crate::Settings::allow_local_node_probes`] is off.
//! * An invalid policy never widens access: it still selects the pods it names (an invalid
//!   `podSelector` selects every pod of its namespace) and each invalid rule matches nothing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube_derive::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Maximum rules in one policy (bounds the API server's CEL cost estimate).
pub const MAX_RULES: usize = 128;
/// Maximum entries in one list inside a rule (`from`, `ports`, `http`, `hosts`, ...).
pub const MAX_LIST: usize = 64;
/// Maximum length of a path, regex, SPIFFE ID or header value in a rule.
pub const MAX_STRING: usize = 1024;

/// Desired state of an `L7Policy`: which pods it protects and which requests they accept.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "L7Policy",
    plural = "l7policies",
    singular = "l7policy",
    shortname = "l7p",
    namespaced,
    status = "L7PolicyStatus",
    derive = "PartialEq",
    crates(kube_core = "::kube_core"),
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct L7PolicySpec {
    /// Pods (in the policy's namespace) this policy protects; `{}` selects every pod.
    pub pod_selector: LabelSelector,
    /// `enforce` (default) denies what no rule allows; `audit` only reports it.
    #[serde(default)]
    pub mode: Mode,
    /// Ingress rules; a request is allowed if any rule of any policy selecting the pod matches.
    /// An empty list allows nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub ingress: Vec<IngressRule>,
}

/// What a pod selected by the policy does with requests that no rule allows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny (HTTP 403) requests that no rule allows.
    #[default]
    Enforce,
    /// Let requests that no rule allows pass, and record them as `audit-deny`.
    Audit,
}

/// One ingress rule: all of its present fields must match (`from` AND `ports` AND `http`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.from) || has(self.ports) || has(self.http)",
    "message": "a rule must set at least one of from, ports or http (write from: [] to allow every source explicitly)"
}]))]
pub struct IngressRule {
    /// Sources allowed by this rule; any one must match. Absent or `[]` means any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_LIST))]
    pub from: Option<Vec<Peer>>,
    /// Destination ports (numbers or the pod's named container ports); absent means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_LIST))]
    pub ports: Option<Vec<Port>>,
    /// HTTP requests allowed by this rule; any one must match. Absent means any request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_LIST))]
    pub http: Option<Vec<HttpMatch>>,
}

/// One allowed source; exactly one of `spiffeId`, `serviceAccount` or the namespace/pod
/// selectors (`namespaces` or `namespaceSelector`, optionally with `podSelector`) is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.spiffeId) ? 1 : 0) + (has(self.serviceAccount) ? 1 : 0) + ((has(self.namespaces) || has(self.namespaceSelector) || has(self.podSelector)) ? 1 : 0) == 1",
        "message": "a peer must set exactly one of spiffeId, serviceAccount, or namespaces/namespaceSelector/podSelector"
    },
    {
        "rule": "!(has(self.namespaces) && has(self.namespaceSelector))",
        "message": "namespaces and namespaceSelector are mutually exclusive"
    }
]))]
pub struct Peer {
    /// A SPIFFE ID, exact (`spiffe://cluster.local/ns/a/sa/b`) or a prefix ending in `/*`
    /// (`spiffe://cluster.local/ns/a/*` matches every ID under `ns/a/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_STRING), regex(pattern = r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*(/\*)?$"))]
    pub spiffe_id: Option<String>,
    /// A ServiceAccount; `namespace` defaults to the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
    /// Namespaces by name; sources in any of them match (with `podSelector`: pods there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_LIST), inner(length(min = 1, max = 63)))]
    pub namespaces: Option<Vec<String>>,
    /// Namespaces by label; `{}` selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Source pods by label, in the policy's namespace unless `namespaces` or
    /// `namespaceSelector` is also set; `{}` selects every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// A ServiceAccount, by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Namespace of the ServiceAccount; defaults to the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Name of the ServiceAccount.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// An IANA service name: 1–15 of `a-z0-9-`, at least one letter, no `-` at either end or
/// twice in a row (RFC 6335 5.1), as Kubernetes requires of container port names.
pub const PORT_NAME_PATTERN: &str = "^([0-9]+-)*[0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$";

/// A destination port: a number (1–65535) or the name of a container port of the pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum Port {
    /// A port number, 1–65535.
    Number(i64),
    /// A named container port (an IANA service name: 1–15 of `a-z0-9-`, with a letter).
    Name(String),
}

impl JsonSchema for Port {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Port".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // No CEL here: an int-or-string value has no size bound the API server's CEL cost
        // estimator trusts, so a `matches()` rule would blow the cost budget. Plain value
        // validations apply by type: `minimum`/`maximum` to numbers, `maxLength`/`pattern` to
        // strings (as controller-gen does for `resource.Quantity`). kube's schema rewrite strips the
        // types out of an `anyOf`, so the node carries only `x-kubernetes-int-or-string`.
        json_schema!({
            "description": "A port number (1-65535) or the name of a container port of the pod (an IANA service name).",
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "maxLength": 15,
            "pattern": PORT_NAME_PATTERN
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// One allowed kind of HTTP request: all of its present fields must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.methods) || has(self.path) || has(self.headers) || has(self.hosts)",
    "message": "an http match must set at least one of methods, path, headers or hosts"
}]))]
pub struct HttpMatch {
    /// Allowed methods (case-sensitive, upper case); absent means any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub methods: Option<Vec<HttpMethod>>,
    /// The path condition, matched against the normalised path (see the crate README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions; all must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub headers: Option<Vec<HeaderMatch>>,
    /// Allowed hosts (`:authority` / `Host` without port, case-insensitive): exact names or
    /// `*.example.com`, which matches any name with at least one more label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_LIST), inner(length(min = 1, max = 253), regex(pattern = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")))]
    pub hosts: Option<Vec<String>>,
}

/// An HTTP method a rule can name.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `CONNECT`
    Connect,
    /// `OPTIONS`
    Options,
    /// `TRACE`
    Trace,
    /// `PATCH`
    Patch,
}

impl HttpMethod {
    /// Every method, in bit order.
    pub const ALL: [HttpMethod; 9] = [
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Delete,
        HttpMethod::Connect,
        HttpMethod::Options,
        HttpMethod::Trace,
        HttpMethod::Patch,
    ];

    /// The method's token as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }

    /// The method for a wire token (case-sensitive, as HTTP methods are).
    pub fn from_token(token: &str) -> Option<HttpMethod> {
        HttpMethod::ALL.into_iter().find(|m| m.as_str() == token)
    }
}

/// A path condition, Gateway API style; exactly one of `exact`, `prefix` or `regex` is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1",
    "message": "path must set exactly one of exact, prefix or regex"
}]))]
pub struct PathMatch {
    /// The normalised path equals this (case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STRING), regex(pattern = r"^/[!-~]*$"))]
    pub exact: Option<String>,
    /// The normalised path starts with this, element by element: `/api` matches `/api`,
    /// `/api/` and `/api/v1` but not `/apis`; a trailing `/` in the prefix is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STRING), regex(pattern = r"^/[!-~]*$"))]
    pub prefix: Option<String>,
    /// An RE2-syntax regular expression that must match the whole normalised path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STRING))]
    pub regex: Option<String>,
}

/// A header condition; exactly one of `exact`, `prefix`, `regex` or `present` is set.
/// With several values of the header, any one value matching is enough.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0) + (has(self.regex) ? 1 : 0) + (has(self.present) ? 1 : 0) == 1",
    "message": "a header match must set exactly one of exact, prefix, regex or present"
}]))]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub name: String,
    /// A value equals this (case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_STRING))]
    pub exact: Option<String>,
    /// A value starts with this (case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STRING))]
    pub prefix: Option<String>,
    /// An RE2-syntax regular expression that must match a whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STRING))]
    pub regex: Option<String>,
    /// `true`: the header is present (any value); `false`: the header is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// Observed state of an `L7Policy`, written by the agent that validated it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L7PolicyStatus {
    /// `metadata.generation` of the spec these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (True/False, with the field path of each problem in the message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Labels of a pod or namespace, as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;

/// The first line of the generated CRD file.
pub const CRD_YAML_HEADER: &str = "# Generated from l7-policy/src/crd.rs by \
`cargo run -p veil-l7-policy --example gen-crd > charts/veil/crds/l7policy.yaml`; do not edit.\n";

/// The `L7Policy` CustomResourceDefinition as YAML, with a header naming its generator.
pub fn crd_yaml() -> String {
    use kube_core::CustomResourceExt;
    let yaml = serde_yaml::to_string(&L7Policy::crd()).expect("a CRD always serialises");
    format!("{CRD_YAML_HEADER}{yaml}")
}
