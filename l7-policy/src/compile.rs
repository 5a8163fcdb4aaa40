//! Checks one policy and compiles it once (regexes included) into a form every
//! per-(pod, port) matcher can share.

use regex::bytes::{Regex as BytesRegex, RegexBuilder as BytesRegexBuilder};
use regex::{Regex, RegexBuilder};

use crate::labels::Selector;
use crate::request::HeaderLookup;
use crate::{
    normalize_path, FieldError, HeaderMatch, HttpMatch, HttpMethod, IngressRule, L7Policy,
    L7PolicySpec, Labels, Mode, Peer, Port, Source, MAX_LIST, MAX_RULES, MAX_STRING,
};

/// Compiled size limit of one regex, so a policy cannot make the agent build a huge automaton.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Deepest nesting of groups and repetitions in a regex: the parser recurses per level,
/// and no path or header pattern needs more than a few.
pub const REGEX_NEST_LIMIT: u32 = 32;

/// Longest regex pattern, in bytes (the same bound as every other string of the CRD).
pub const MAX_REGEX_BYTES: usize = MAX_STRING;

/// A checked and compiled policy. Invalid parts are kept as "matches nothing" (rules) or
/// "selects every pod of the namespace" (`podSelector`), so an invalid policy never widens access.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) mode: Mode,
    /// `None`: the selector is invalid, so the policy selects every pod of its namespace.
    selector: Option<Selector>,
    /// One entry per `spec.ingress` rule; `None` for an invalid rule.
    pub(crate) rules: Vec<Option<CompiledRule>>,
    errors: Vec<FieldError>,
}

/// A valid rule, ready to match.
#[derive(Debug)]
pub(crate) struct CompiledRule {
    /// `None`: any source.
    pub(crate) peers: Option<Vec<CompiledPeer>>,
    /// `None`: every port.
    pub(crate) ports: Option<Vec<Port>>,
    /// `None`: any request.
    pub(crate) http: Option<Vec<CompiledHttp>>,
}

/// A compiled `from` entry.
#[derive(Debug)]
pub(crate) enum CompiledPeer {
    /// Exact SPIFFE ID.
    SpiffeExact(Box<str>),
    /// SPIFFE ID prefix, without the trailing `/` (from `.../*`).
    SpiffePrefix(Box<str>),
    /// A ServiceAccount by namespace and name.
    ServiceAccount { namespace: Box<str>, name: Box<str> },
    /// Pods in some namespaces, optionally narrowed by pod labels.
    Workload {
        namespaces: NamespaceCond,
        pods: Option<Selector>,
    },
}

/// Which namespaces a workload peer covers.
#[derive(Debug)]
pub(crate) enum NamespaceCond {
    /// By name.
    Names(Vec<Box<str>>),
    /// By namespace labels.
    Selector(Selector),
}

/// A compiled `http` entry.
#[derive(Debug)]
pub(crate) struct CompiledHttp {
    /// Bit per [`HttpMethod`]; 0 means any method.
    pub(crate) methods: u16,
    pub(crate) path: PathCond,
    pub(crate) headers: Vec<HeaderCond>,
    /// Empty means any host.
    pub(crate) hosts: Vec<HostPattern>,
}

/// A compiled path condition.
#[derive(Debug)]
pub(crate) enum PathCond {
    Any,
    Exact(Box<str>),
    /// Without trailing `/`, except the root `/` itself.
    Prefix(Box<str>),
    Regex(Regex),
}

/// A compiled header condition.
#[derive(Debug)]
pub(crate) struct HeaderCond {
    /// Lower-case.
    name: Box<str>,
    kind: HeaderKind,
}

#[derive(Debug)]
enum HeaderKind {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Regex(BytesRegex),
    Present(bool),
}

/// A compiled host pattern, lower-case.
#[derive(Debug)]
pub(crate) enum HostPattern {
    Exact(Box<str>),
    /// From `*.example.com`: the suffix `.example.com`.
    Suffix(Box<str>),
}

/// Bit of a request method; unknown methods get a bit no rule sets.
pub(crate) fn method_bit(method: &str) -> u16 {
    match HttpMethod::from_token(method) {
        Some(m) => 1 << (m as u16),
        None => 1 << 15,
    }
}

impl CompiledPolicy {
    /// Checks and compiles the spec of policy `namespace/name`; never fails, see [`Self::errors`].
    pub fn compile(namespace: &str, name: &str, spec: &L7PolicySpec) -> CompiledPolicy {
        let mut errors = Vec::new();
        let selector = Selector::compile(&spec.pod_selector, "spec.podSelector", &mut errors);
        if spec.ingress.len() > MAX_RULES {
            errors.push(FieldError::new(
                "spec.ingress",
                format!("too many rules: {} > {MAX_RULES}", spec.ingress.len()),
            ));
        }
        let rules = spec
            .ingress
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let before = errors.len();
                let compiled =
                    compile_rule(namespace, &format!("spec.ingress[{i}]"), rule, &mut errors);
                compiled.filter(|_| errors.len() == before)
            })
            .collect();
        CompiledPolicy {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            mode: spec.mode,
            selector,
            rules,
            errors,
        }
    }

    /// Checks and compiles an `L7Policy` object (namespace `default` if it has none).
    pub fn from_resource(policy: &L7Policy) -> CompiledPolicy {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
        let name = policy.metadata.name.as_deref().unwrap_or("");
        CompiledPolicy::compile(namespace, name, &policy.spec)
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The policy's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Every problem found, each naming its field; empty if the policy is valid.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// Whether rule `index` of `spec.ingress` is valid (an invalid rule matches nothing).
    pub fn rule_is_valid(&self, index: usize) -> bool {
        self.rules.get(index).is_some_and(Option::is_some)
    }

    /// The port numbers that valid rules name (named ports are resolved per pod): the
    /// agent builds one matcher per such port and one for every other port.
    pub fn port_numbers(&self) -> impl Iterator<Item = u16> + '_ {
        self.rules
            .iter()
            .flatten()
            .flat_map(|rule| rule.ports.iter().flatten())
            .filter_map(|port| match port {
                Port::Number(n) => u16::try_from(*n).ok(),
                Port::Name(_) => None,
            })
    }

    /// Whether this policy selects a pod with these labels in this namespace.
    /// An invalid `podSelector` selects every pod of the namespace (fail closed).
    pub fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        namespace == self.namespace && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

/// Checks a policy spec; an empty result means the policy is valid.
pub fn validate(namespace: &str, name: &str, spec: &L7PolicySpec) -> Vec<FieldError> {
    CompiledPolicy::compile(namespace, name, spec).errors
}

fn check_len(path: &str, len: usize, min: usize, errors: &mut Vec<FieldError>) {
    if len < min {
        errors.push(FieldError::new(
            path,
            format!("must have at least {min} item(s)"),
        ));
    } else if len > MAX_LIST {
        errors.push(FieldError::new(
            path,
            format!("too many items: {len} > {MAX_LIST}"),
        ));
    }
}

fn check_string(path: &str, s: &str, errors: &mut Vec<FieldError>) -> bool {
    if s.len() > MAX_STRING {
        errors.push(FieldError::new(
            path,
            format!("too long: {} > {MAX_STRING} bytes", s.len()),
        ));
        return false;
    }
    true
}

fn compile_rule(
    namespace: &str,
    at: &str,
    rule: &IngressRule,
    errors: &mut Vec<FieldError>,
) -> Option<CompiledRule> {
    if rule.from.is_none() && rule.ports.is_none() && rule.http.is_none() {
        errors.push(FieldError::new(
            at,
            "a rule must set at least one of from, ports or http (write from: [] to allow every source explicitly)",
        ));
        return None;
    }
    let peers = rule.from.as_ref().and_then(|from| {
        check_len(&format!("{at}.from"), from.len(), 0, errors);
        let peers: Vec<_> = from
            .iter()
            .enumerate()
            .filter_map(|(i, p)| compile_peer(namespace, &format!("{at}.from[{i}]"), p, errors))
            .collect();
        // `from: []` means any source.
        (!from.is_empty()).then_some(peers)
    });
    let ports = rule.ports.as_ref().map(|ports| {
        check_len(&format!("{at}.ports"), ports.len(), 1, errors);
        for (i, p) in ports.iter().enumerate() {
            check_port(&format!("{at}.ports[{i}]"), p, errors);
        }
        ports.clone()
    });
    let http = rule.http.as_ref().map(|http| {
        check_len(&format!("{at}.http"), http.len(), 1, errors);
        http.iter()
            .enumerate()
            .filter_map(|(i, h)| compile_http(&format!("{at}.http[{i}]"), h, errors))
            .collect()
    });
    Some(CompiledRule { peers, ports, http })
}

/// Whether `name` is an IANA service name as Kubernetes requires of port names.
pub(crate) fn is_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

fn check_port(at: &str, port: &Port, errors: &mut Vec<FieldError>) {
    match port {
        Port::Number(n) if !(1..=65535).contains(n) => {
            errors.push(FieldError::new(at, format!("port {n} is out of range 1-65535")));
        }
        Port::Name(name) if !is_port_name(name) => errors.push(FieldError::new(
            at,
            format!(
                "{name:?} is not a valid port name (1-15 characters a-z, 0-9 and '-', with a letter, no leading, \
                 trailing or double '-')"
            ),
        )),
        _ => {}
    }
}

/// Checks a SPIFFE ID (or a `/*` prefix); returns the ID or prefix without `/*`.
fn check_spiffe_id<'s>(
    at: &str,
    id: &'s str,
    errors: &mut Vec<FieldError>,
) -> Option<(&'s str, bool)> {
    let bad = |why: &str| FieldError::new(at, format!("{id:?} is not a SPIFFE ID: {why}"));
    let Some(rest) = id.strip_prefix("spiffe://") else {
        errors.push(bad("must start with spiffe://"));
        return None;
    };
    let (body, prefix) = match rest.strip_suffix("/*") {
        Some(body) => (body, true),
        None => (rest, false),
    };
    let mut parts = body.split('/');
    let trust_domain = parts.next().unwrap_or("");
    if trust_domain.is_empty()
        || !trust_domain
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
    {
        errors.push(bad(
            "the trust domain must be non-empty a-z, 0-9, '.', '_' or '-'",
        ));
        return None;
    }
    for seg in parts {
        if seg.is_empty()
            || seg == "."
            || seg == ".."
            || !seg
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        {
            errors.push(bad(
                "path segments must be non-empty A-Z, a-z, 0-9, '.', '_' or '-', not '.' or '..', and '*' may only be a final '/*'",
            ));
            return None;
        }
    }
    Some((&id[..id.len() - if prefix { 2 } else { 0 }], prefix))
}

fn check_name(at: &str, name: &str, max: usize, errors: &mut Vec<FieldError>) {
    if name.is_empty() || name.len() > max {
        errors.push(FieldError::new(at, format!("must be 1-{max} characters")));
    }
}

fn compile_peer(
    namespace: &str,
    at: &str,
    peer: &Peer,
    errors: &mut Vec<FieldError>,
) -> Option<CompiledPeer> {
    let workload = peer.namespaces.is_some()
        || peer.namespace_selector.is_some()
        || peer.pod_selector.is_some();
    let kinds = usize::from(peer.spiffe_id.is_some())
        + usize::from(peer.service_account.is_some())
        + usize::from(workload);
    if kinds != 1 {
        errors.push(FieldError::new(
            at,
            "a peer must set exactly one of spiffeId, serviceAccount, or namespaces/namespaceSelector/podSelector",
        ));
        return None;
    }
    if let Some(id) = &peer.spiffe_id {
        let at = format!("{at}.spiffeId");
        if !check_string(&at, id, errors) {
            return None;
        }
        let (id, prefix) = check_spiffe_id(&at, id, errors)?;
        return Some(if prefix {
            CompiledPeer::SpiffePrefix(id.into())
        } else {
            CompiledPeer::SpiffeExact(id.into())
        });
    }
    if let Some(sa) = &peer.service_account {
        check_name(&format!("{at}.serviceAccount.name"), &sa.name, 253, errors);
        if let Some(ns) = &sa.namespace {
            check_name(&format!("{at}.serviceAccount.namespace"), ns, 63, errors);
        }
        let ns = sa.namespace.as_deref().unwrap_or(namespace);
        return Some(CompiledPeer::ServiceAccount {
            namespace: ns.into(),
            name: sa.name.as_str().into(),
        });
    }
    let before = errors.len();
    let namespaces = match (&peer.namespaces, &peer.namespace_selector) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                at,
                "namespaces and namespaceSelector are mutually exclusive",
            ));
            return None;
        }
        (Some(names), None) => {
            check_len(&format!("{at}.namespaces"), names.len(), 1, errors);
            for (i, n) in names.iter().enumerate() {
                check_name(&format!("{at}.namespaces[{i}]"), n, 63, errors);
            }
            NamespaceCond::Names(names.iter().map(|n| n.as_str().into()).collect())
        }
        (None, Some(sel)) => NamespaceCond::Selector(Selector::compile(
            sel,
            &format!("{at}.namespaceSelector"),
            errors,
        )?),
        (None, None) => NamespaceCond::Names(vec![namespace.into()]),
    };
    let pods = match &peer.pod_selector {
        Some(sel) => Some(Selector::compile(
            sel,
            &format!("{at}.podSelector"),
            errors,
        )?),
        None => None,
    };
    (errors.len() == before).then_some(CompiledPeer::Workload { namespaces, pods })
}

/// Builds a regex that must match the whole input.
fn full_match_regex(at: &str, re: &str, errors: &mut Vec<FieldError>) -> Option<Regex> {
    let build = |p: &str| {
        RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .nest_limit(REGEX_NEST_LIMIT)
            .build()
    };
    check_regex_len(at, re, errors)?;
    regex_or_error(at, "invalid regex (RE2 syntax)", build(re), errors)?;
    regex_or_error(at, ANCHOR_FAILED, build(&anchored(re)), errors)
}

/// Builds a regex over bytes that must match the whole input.
fn full_match_bytes_regex(at: &str, re: &str, errors: &mut Vec<FieldError>) -> Option<BytesRegex> {
    let build = |p: &str| {
        BytesRegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .nest_limit(REGEX_NEST_LIMIT)
            .build()
    };
    check_regex_len(at, re, errors)?;
    regex_or_error(at, "invalid regex (RE2 syntax)", build(re), errors)?;
    regex_or_error(at, ANCHOR_FAILED, build(&anchored(re)), errors)
}

/// Reported when a pattern valid alone fails once anchored; only an `(?x)` comment running
/// to the end of the pattern (it swallows the closing `)$`) does that.
const ANCHOR_FAILED: &str = "regex cannot be anchored (does it end inside an (?x) # comment?)";

/// Checks the pattern's length.
fn check_regex_len(at: &str, re: &str, errors: &mut Vec<FieldError>) -> Option<()> {
    if re.len() > MAX_REGEX_BYTES {
        errors.push(FieldError::new(
            at,
            format!("regex too long: {} > {MAX_REGEX_BYTES} bytes", re.len()),
        ));
        return None;
    }
    Some(())
}

/// `re` anchored at both ends. Only called once `re` compiled on its own: a pattern that
/// parses alone has balanced groups, so it cannot close the wrapper's group and escape the
/// anchors (`a)|(.*` would otherwise become `^(?:a)|(.*)$`, which matches anything).
fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

/// The built regex, or an error naming the field.
fn regex_or_error<R>(
    at: &str,
    what: &str,
    built: Result<R, regex::Error>,
    errors: &mut Vec<FieldError>,
) -> Option<R> {
    built
        .map_err(|e| errors.push(FieldError::new(at, format!("{what}: {e}"))))
        .ok()
}

/// Checks that an exact or prefix path is already normal, so that it can match at all.
fn check_rule_path(at: &str, path: &str, errors: &mut Vec<FieldError>) -> bool {
    if !check_string(at, path, errors) {
        return false;
    }
    if path.contains(['?', '#']) {
        errors.push(FieldError::new(
            at,
            "must not contain '?' or '#' (query and fragment are never matched)",
        ));
        return false;
    }
    match normalize_path(path) {
        Ok(n) if n == path => true,
        Ok(n) => {
            errors.push(FieldError::new(
                at,
                format!("{path:?} is not in normal form and could never match; write {n:?}"),
            ));
            false
        }
        Err(e) => {
            errors.push(FieldError::new(
                at,
                format!("{path:?} is not a valid path: {e}"),
            ));
            false
        }
    }
}

fn compile_http(at: &str, http: &HttpMatch, errors: &mut Vec<FieldError>) -> Option<CompiledHttp> {
    let before = errors.len();
    if http.methods.is_none()
        && http.path.is_none()
        && http.headers.is_none()
        && http.hosts.is_none()
    {
        errors.push(FieldError::new(
            at,
            "an http match must set at least one of methods, path, headers or hosts",
        ));
        return None;
    }
    let mut methods = 0u16;
    if let Some(ms) = &http.methods {
        if ms.is_empty() {
            errors.push(FieldError::new(
                format!("{at}.methods"),
                "must have at least 1 item(s)",
            ));
        }
        for m in ms {
            methods |= 1 << (*m as u16);
        }
    }
    let path = match &http.path {
        None => PathCond::Any,
        Some(p) => {
            let at = format!("{at}.path");
            let kinds = usize::from(p.exact.is_some())
                + usize::from(p.prefix.is_some())
                + usize::from(p.regex.is_some());
            if kinds != 1 {
                errors.push(FieldError::new(
                    &at,
                    "path must set exactly one of exact, prefix or regex",
                ));
                PathCond::Any
            } else if let Some(exact) = &p.exact {
                check_rule_path(&format!("{at}.exact"), exact, errors);
                PathCond::Exact(exact.as_str().into())
            } else if let Some(prefix) = &p.prefix {
                check_rule_path(&format!("{at}.prefix"), prefix, errors);
                let trimmed = prefix
                    .strip_suffix('/')
                    .filter(|t| !t.is_empty())
                    .unwrap_or(prefix);
                PathCond::Prefix(trimmed.into())
            } else {
                let re = p.regex.as_deref().unwrap_or_default();
                match full_match_regex(&format!("{at}.regex"), re, errors) {
                    Some(re) => PathCond::Regex(re),
                    None => PathCond::Any,
                }
            }
        }
    };
    let mut headers = Vec::new();
    if let Some(hs) = &http.headers {
        check_len(&format!("{at}.headers"), hs.len(), 1, errors);
        for (i, h) in hs.iter().enumerate() {
            if let Some(h) = compile_header(&format!("{at}.headers[{i}]"), h, errors) {
                headers.push(h);
            }
        }
    }
    let mut hosts = Vec::new();
    if let Some(hs) = &http.hosts {
        check_len(&format!("{at}.hosts"), hs.len(), 1, errors);
        for (i, h) in hs.iter().enumerate() {
            let at = format!("{at}.hosts[{i}]");
            let (wild, name) = match h.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, h.as_str()),
            };
            let ok = !name.is_empty()
                && h.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if !ok {
                errors.push(FieldError::new(
                    at,
                    format!("{h:?} is not a host name or '*.' wildcard (no port, no trailing dot)"),
                ));
                continue;
            }
            let lower = name.to_ascii_lowercase();
            hosts.push(if wild {
                HostPattern::Suffix(format!(".{lower}").into())
            } else {
                HostPattern::Exact(lower.into())
            });
        }
    }
    (errors.len() == before).then_some(CompiledHttp {
        methods,
        path,
        headers,
        hosts,
    })
}

fn compile_header(at: &str, h: &HeaderMatch, errors: &mut Vec<FieldError>) -> Option<HeaderCond> {
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&c);
    if h.name.is_empty() || h.name.len() > 256 || !h.name.bytes().all(token) {
        errors.push(FieldError::new(
            format!("{at}.name"),
            format!("{:?} is not a header name", h.name),
        ));
        return None;
    }
    let kinds = usize::from(h.exact.is_some())
        + usize::from(h.prefix.is_some())
        + usize::from(h.regex.is_some())
        + usize::from(h.present.is_some());
    if kinds != 1 {
        errors.push(FieldError::new(
            at,
            "a header match must set exactly one of exact, prefix, regex or present",
        ));
        return None;
    }
    let kind = if let Some(v) = &h.exact {
        check_string(&format!("{at}.exact"), v, errors)
            .then(|| HeaderKind::Exact(v.as_bytes().into()))?
    } else if let Some(v) = &h.prefix {
        check_string(&format!("{at}.prefix"), v, errors)
            .then(|| HeaderKind::Prefix(v.as_bytes().into()))?
    } else if let Some(re) = &h.regex {
        HeaderKind::Regex(full_match_bytes_regex(&format!("{at}.regex"), re, errors)?)
    } else {
        HeaderKind::Present(h.present.unwrap_or(true))
    };
    Some(HeaderCond {
        name: h.name.to_ascii_lowercase().into(),
        kind,
    })
}

impl CompiledPeer {
    /// Whether the source is this peer. `policy_namespace` is unused: defaults were resolved at compile time.
    pub(crate) fn matches(&self, src: &Source<'_>) -> bool {
        match self {
            CompiledPeer::SpiffeExact(id) => src.spiffe_id == Some(&**id),
            CompiledPeer::SpiffePrefix(prefix) => src.spiffe_id.is_some_and(|id| {
                id.len() > prefix.len() + 1
                    && id.starts_with(&**prefix)
                    && id.as_bytes()[prefix.len()] == b'/'
            }),
            CompiledPeer::ServiceAccount { namespace, name } => {
                src.namespace == Some(&**namespace) && src.service_account == Some(&**name)
            }
            CompiledPeer::Workload { namespaces, pods } => {
                let ns_ok = match namespaces {
                    NamespaceCond::Names(names) => src
                        .namespace
                        .is_some_and(|ns| names.iter().any(|n| **n == *ns)),
                    NamespaceCond::Selector(sel) => {
                        src.namespace_labels.is_some_and(|l| sel.matches(l))
                    }
                };
                ns_ok
                    && match pods {
                        None => true,
                        Some(sel) => src.pod_labels.is_some_and(|l| sel.matches(l)),
                    }
            }
        }
    }
}

impl PathCond {
    /// Whether the normalised `path` satisfies this condition.
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathCond::Any => true,
            PathCond::Exact(p) => path == &**p,
            PathCond::Prefix(p) => prefix_matches(p, path),
            PathCond::Regex(re) => re.is_match(path),
        }
    }
}

/// Element-wise prefix match; `prefix` has no trailing `/` unless it is `/`.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

impl HeaderCond {
    /// Whether the headers satisfy this condition: a value condition needs at least one
    /// value and holds for every value (a second, failing copy of a header is not
    /// outvoted by a good one: backends differ on which copy they read); `present: false`
    /// holds only when no value exists.
    fn matches(&self, headers: &dyn HeaderLookup) -> bool {
        let value_ok = |x: &[u8]| match &self.kind {
            HeaderKind::Present(_) => true,
            HeaderKind::Exact(v) => x == &**v,
            HeaderKind::Prefix(v) => x.starts_with(v),
            HeaderKind::Regex(re) => re.is_match(x),
        };
        let mut seen = false;
        let failed = headers.any_value(&self.name, &mut |x| {
            seen = true;
            !value_ok(x)
        });
        match self.kind {
            HeaderKind::Present(want) => seen == want,
            _ => seen && !failed,
        }
    }
}

impl HostPattern {
    /// Whether `host` (parsed by [`crate::parse_authority`]: lower-case, no trailing dot)
    /// matches.
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => host == &**h,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(&**s),
        }
    }
}

impl CompiledHttp {
    /// Whether the request satisfies every condition of this entry.
    pub(crate) fn matches(
        &self,
        method: u16,
        host: Option<&str>,
        path: &str,
        headers: &dyn HeaderLookup,
    ) -> bool {
        // `host` comes from `parse_authority`, so byte comparison is the right one.
        (self.methods == 0 || self.methods & method != 0)
            && (self.hosts.is_empty()
                || host.is_some_and(|h| self.hosts.iter().any(|p| p.matches(h))))
            && self.path.matches(path)
            && self.headers.iter().all(|h| h.matches(headers))
    }
}
