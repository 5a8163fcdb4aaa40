//! Label selectors (`matchLabels` / `matchExpressions`), checked and matched on data passed in.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{FieldError, Labels};

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement on one label key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A checked label selector; the empty selector matches every label set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Checks `selector` (found at field `path`), pushing problems to `errors`.
    /// Returns `None` if it is invalid.
    pub fn compile(
        selector: &LabelSelector,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) -> Option<Selector> {
        let before = errors.len();
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement {
                key: key.clone(),
                op: Op::In,
                values: vec![value.clone()],
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            let values = expr.values.clone().unwrap_or_default();
            let op = match expr.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    errors.push(FieldError::new(
                        format!("{at}.operator"),
                        format!(
                            "unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                    continue;
                }
            };
            match op {
                Op::In | Op::NotIn if values.is_empty() => errors.push(FieldError::new(
                    format!("{at}.values"),
                    "must be non-empty for In and NotIn",
                )),
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    errors.push(FieldError::new(
                        format!("{at}.values"),
                        "must be empty for Exists and DoesNotExist",
                    ))
                }
                _ => {}
            }
            requirements.push(Requirement {
                key: expr.key.clone(),
                op,
                values,
            });
        }
        (errors.len() == before).then_some(Selector { requirements })
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.op {
                Op::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => value.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }
}
