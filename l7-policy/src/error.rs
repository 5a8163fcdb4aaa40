//! Validation errors that name the field they are about.

/// A problem with one field of a policy, e.g. `spec.ingress[0].http[1].path.regex: ...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Field path from the object root, e.g. `spec.ingress[0].ports[1]`.
    pub path: String,
    /// What is wrong, and where possible how to fix it.
    pub message: String,
}

impl FieldError {
    /// A new error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}
