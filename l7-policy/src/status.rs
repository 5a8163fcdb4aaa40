//! The `Accepted` condition the agent writes on `status`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{FieldError, L7PolicyStatus};

/// Condition type saying whether the policy was accepted.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason when the policy is valid.
pub const REASON_VALID: &str = "Valid";
/// Reason when some field is invalid (the message names each field path).
pub const REASON_INVALID: &str = "Invalid";
/// Longest message the `Condition` schema allows.
pub const MAX_MESSAGE: usize = 32768;

/// The status for a policy of `generation` with these validation errors, stamped `now`.
pub fn accepted_status(
    generation: Option<i64>,
    errors: &[FieldError],
    now: Time,
) -> L7PolicyStatus {
    let (status, reason, message) = if errors.is_empty() {
        ("True", REASON_VALID, "policy is valid".to_owned())
    } else {
        let mut message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        message.push_str("; invalid rules match nothing and the rest of the policy stays in force");
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE - 3;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        ("False", REASON_INVALID, message)
    };
    L7PolicyStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            type_: CONDITION_ACCEPTED.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: now,
        }],
    }
}
