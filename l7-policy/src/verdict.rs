//! The engine's answer for one request.

use crate::{AuthorityError, Limit, PathError};

/// What happens to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Forward it.
    Allow,
    /// Answer 403.
    Deny,
    /// Forward it, but record that an `enforce` policy would have denied it.
    AuditDeny,
}

impl Decision {
    /// Whether the request goes on to the pod (`Allow` and `AuditDeny`).
    pub fn passes(self) -> bool {
        self != Decision::Deny
    }

    /// The name flow records use: `allow`, `deny`, `audit-deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::AuditDeny => "audit-deny",
        }
    }
}

/// Why the engine decided so; policy names borrow from the matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason<'a> {
    /// No policy selects the pod: nothing to enforce.
    NotSelected,
    /// A request from the pod's own node for one of the pod's declared `httpGet` probes,
    /// allowed by the engine setting.
    LocalNodeProbe,
    /// Rule `rule` (index in `spec.ingress`) of policy `policy` matched.
    Rule {
        /// Name of the policy.
        policy: &'a str,
        /// Index of the rule in `spec.ingress`.
        rule: usize,
    },
    /// No rule matched; `policy` is the first (by name) `enforce` policy selecting the pod,
    /// or the first `audit` one if none enforces.
    NoRuleMatched {
        /// Name of the policy.
        policy: &'a str,
    },
    /// The path could not be normalised; denied like an unmatched request.
    InvalidPath {
        /// Name of the policy, as for `NoRuleMatched`.
        policy: &'a str,
        /// What is wrong with the path.
        error: PathError,
    },
    /// The authority (`:authority` / `Host`) is refused; denied like an unmatched request.
    InvalidAuthority {
        /// Name of the policy, as for `NoRuleMatched`.
        policy: &'a str,
        /// What is wrong with the authority.
        error: AuthorityError,
    },
    /// The request-target or headers are over a size limit; denied like an unmatched
    /// request, before any rule is looked at.
    OverLimit {
        /// Name of the policy, as for `NoRuleMatched`.
        policy: &'a str,
        /// Which limit.
        limit: Limit,
    },
}

/// A decision and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict<'a> {
    /// What happens to the request.
    pub decision: Decision,
    /// Why.
    pub reason: Reason<'a>,
}

impl<'a> Verdict<'a> {
    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<&'a str> {
        match self.reason {
            Reason::NotSelected | Reason::LocalNodeProbe => None,
            Reason::Rule { policy, .. }
            | Reason::NoRuleMatched { policy }
            | Reason::InvalidPath { policy, .. }
            | Reason::InvalidAuthority { policy, .. }
            | Reason::OverLimit { policy, .. } => Some(policy),
        }
    }
}
