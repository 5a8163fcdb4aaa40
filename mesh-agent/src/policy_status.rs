//! The one writer of `L7Policy` status: every agent runs this, but only the holder of a
//! Lease writes, so `status.conditions` (`Accepted`) and `status.observedGeneration` have
//! exactly one author however many nodes there are. It writes only where
//! `observedGeneration` lags `metadata.generation`, with server-side apply.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::Api;
use veil_identity::rotation::{Leadership, LeaseLeadership};
use veil_l7_policy::{accepted_status, CompiledPolicy, L7Policy};

/// How often the writer looks for policies whose status lags: status is for people and
/// tools reading the object, enforcement never waits for it.
const ROUND: Duration = Duration::from_secs(2);
/// How long the Lease lasts unrenewed: several rounds, so one slow round does not hand
/// the writing to another agent, and a dead leader is replaced within seconds.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The field manager of the status writes.
const FIELD_MANAGER: &str = "veil-policy-status";

/// Where the Lease lives and who this agent is in it.
#[derive(Debug, Clone)]
pub struct StatusLease {
    /// The Lease's namespace (the release's).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This agent's identity in the Lease (its node name).
    pub holder: String,
}

impl StatusLease {
    /// Parses `--policy-status-lease <namespace>/<name>`.
    pub fn parse(text: &str, holder: &str) -> Result<StatusLease, String> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(StatusLease {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    holder: holder.to_string(),
                })
            }
            _ => Err(format!("{text:?} is not <namespace>/<name>")),
        }
    }
}

/// Whether `policy`'s status already describes its current generation.
fn status_is_current(policy: &L7Policy) -> bool {
    let generation = policy.metadata.generation;
    policy.status.as_ref().is_some_and(|s| {
        s.observed_generation == generation
            && s.conditions.iter().any(|c| {
                c.type_ == veil_l7_policy::status::CONDITION_ACCEPTED
                    && c.observed_generation == generation
            })
    })
}

/// Runs until the task stops: every round, takes or renews the Lease and, while holding
/// it, writes the status of every policy whose status lags.
pub async fn run(
    client: kube::Client,
    lease: StatusLease,
    policies: Store<L7Policy>,
    mut listed: crate::state::Listed,
) {
    let leadership = LeaseLeadership {
        client: client.clone(),
        namespace: lease.namespace,
        name: lease.name,
        holder: lease.holder,
        duration: LEASE_DURATION,
    };
    if !crate::state::wait_listed(&mut listed).await {
        return;
    }
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        round.tick().await;
        match leadership.lead().await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "policy status lease");
                continue;
            }
        }
        for policy in policies.state() {
            if status_is_current(&policy) {
                continue;
            }
            if let Err(e) = write_status(&client, &policy).await {
                tracing::warn!(
                    namespace = policy.metadata.namespace.as_deref().unwrap_or_default(),
                    policy = policy.metadata.name.as_deref().unwrap_or_default(),
                    error = %e,
                    "write policy status"
                );
            }
        }
    }
}

async fn write_status(client: &kube::Client, policy: &L7Policy) -> Result<(), kube::Error> {
    let (Some(namespace), Some(name)) = (
        policy.metadata.namespace.as_deref(),
        policy.metadata.name.as_deref(),
    ) else {
        return Ok(());
    };
    let compiled = CompiledPolicy::from_resource(policy);
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let status = accepted_status(policy.metadata.generation, compiled.errors(), now);
    let patch = serde_json::json!({
        "apiVersion": "veil.dev/v1alpha1",
        "kind": "L7Policy",
        "status": status,
    });
    Api::<L7Policy>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    tracing::info!(
        namespace,
        policy = name,
        generation = policy.metadata.generation,
        accepted = compiled.errors().is_empty(),
        "policy status written"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_status_lease_flag_parses_namespace_and_name() {
        let lease = StatusLease::parse("veil-system/veil-policy-status", "n1").expect("valid");
        assert_eq!(
            (lease.namespace.as_str(), lease.name.as_str()),
            ("veil-system", "veil-policy-status")
        );
        for bad in ["", "/x", "x/", "noslash", "a/b/c"] {
            assert!(StatusLease::parse(bad, "n1").is_err(), "{bad:?}");
        }
    }
}
