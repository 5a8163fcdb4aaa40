//! Veil's `L7Policy`: the CRD types, validation, the compiled per-(pod, port) matcher and
//! its verdicts. No I/O: the agent feeds it objects and requests, it answers.
//!
//! Flow: [`CompiledPolicy::compile`] once per policy generation (its [`CompiledPolicy::errors`]
//! go to `status` via [`accepted_status`]), then [`PortMatcher::new`] per (pod, port), then
//! [`PortMatcher::evaluate`] per request. Before any rule, a request is checked against the
//! size [`limits`], its authority parsed ([`parse_authority`]) and its path normalised
//! ([`normalize_path`]); what fails is denied with its own [`Reason`]. See
//! `l7-policy/README.md` for the semantics, the refusals and the probe exemption input.

pub mod authority;
pub mod compile;
pub mod crd;
pub mod error;
pub mod labels;
pub mod limits;
pub mod matcher;
pub mod normalize;
#[cfg(any(test, feature = "testing"))]
pub mod reference;
pub mod request;
pub mod select;
pub mod status;
pub mod verdict;

pub use authority::{parse_authority, Authority, AuthorityError};
pub use compile::{validate, CompiledPolicy};
pub use crd::*;
pub use error::FieldError;
pub use limits::Limit;
pub use matcher::{PortMatcher, Settings, DEFAULT_ALLOW_LOCAL_NODE_PROBES};
pub use normalize::{normalize_path, PathError};
pub use request::{HeaderLookup, Pod, Probe, Request, Source};
pub use select::{policies_selecting, policy_selects};
pub use status::accepted_status;
pub use verdict::{Decision, Reason, Verdict};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

#[cfg(test)]
thread_local! {
    /// Units of work done by this thread, so tests can bound work without timing it.
    static WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Records `units` of work (bytes scanned, hashed or moved); free outside tests.
#[inline]
pub(crate) fn work(units: usize) {
    #[cfg(test)]
    WORK.with(|w| w.set(w.get().saturating_add(units)));
    let _ = units;
}

/// The work recorded on this thread since the last call.
#[cfg(test)]
pub(crate) fn take_work() -> usize {
    WORK.with(|w| w.replace(0))
}
