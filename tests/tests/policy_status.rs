//! `L7Policy` status on the real API server, written by the agents: one at a time (the
//! Lease holder), `Accepted` True for a valid policy and False naming the field for an
//! invalid one, following every new generation.

use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::Api;
use veil_l7_policy::L7Policy;
use veil_testbed::{eventually, BedConfig, TestBed};

fn create(bed: &TestBed, yaml: &str) {
    let object: DynamicObject = serde_yaml::from_str(yaml).unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(
        bed.client.clone(),
        "default",
        &ApiResource::erase::<L7Policy>(&()),
    );
    bed.block_on(api.create(&PostParams::default(), &object))
        .unwrap();
}

/// (observedGeneration, generation, Accepted status, message) of a policy.
fn accepted(bed: &TestBed, name: &str) -> anyhow::Result<Option<(i64, i64, String, String)>> {
    let api: Api<L7Policy> = Api::namespaced(bed.client.clone(), "default");
    let policy = bed.block_on(api.get(name))?;
    let generation = policy.metadata.generation.unwrap_or_default();
    Ok(policy.status.and_then(|s| {
        let c = s.conditions.into_iter().find(|c| c.type_ == "Accepted")?;
        Some((s.observed_generation?, generation, c.status, c.message))
    }))
}

#[test]
fn policy_status_is_written_by_one_agent_and_follows_generations() {
    veil_testbed::require_root();
    let bed = TestBed::start(BedConfig::default()).unwrap();
    create(
        &bed,
        r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: good, namespace: default}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{http: [{methods: [GET], path: {prefix: /public}}]}]
"#,
    );
    create(
        &bed,
        r#"
apiVersion: veil.dev/v1alpha1
kind: L7Policy
metadata: {name: bad, namespace: default}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{http: [{path: {regex: "("}}]}]
"#,
    );
    let settled = |name: &'static str, want: &'static str| {
        eventually(
            &format!("status of {name}"),
            Duration::from_secs(30),
            || {
                Ok(
                    accepted(&bed, name)?.filter(|(observed, generation, status, _)| {
                        observed == generation && status == want
                    }),
                )
            },
        )
        .unwrap()
    };
    settled("good", "True");
    let (_, _, _, message) = settled("bad", "False");
    assert!(
        message.contains("spec.ingress[0].http[0].path.regex"),
        "{message}"
    );

    // An edit makes a new generation; the status follows it.
    let api: Api<L7Policy> = Api::namespaced(bed.client.clone(), "default");
    bed.block_on(api.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"spec": {"ingress": [{"http": [{"path": {"regex": "/ok"}}]}]}}),
        ),
    ))
    .unwrap();
    let (observed, ..) = settled("bad", "True");
    assert_eq!(observed, 2);

    // Exactly one agent wrote: the Lease holder.
    let writers: Vec<usize> = (0..bed.node_count())
        .filter(|&i| bed.agent_log(i).contains("policy status written"))
        .collect();
    assert_eq!(writers.len(), 1, "nodes that wrote status: {writers:?}");
}
