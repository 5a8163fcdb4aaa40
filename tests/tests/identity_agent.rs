//! Identity end to end through the agent: the issuer (in-process, against the bed's real
//! API server, TokenReview and all), a real `mesh-agent` with `--issuer-address` that
//! authenticates with a ServiceAccount token bound to its own (host-network) pod, Pod
//! objects scheduled on its node, pod namespaces made through `mesh-cni`, and processes
//! in those namespaces fetching their SVID with the `spiffe` crate's real client from the
//! agent's Workload API socket. Each pod gets its own identity, never its neighbour's;
//! after an agent restart the pods are attested again (the netns path is in IPAM); CNI
//! DEL forgets a pod's namespace and deleting the Pod object withdraws its SVID. A second
//! test shows that an agent whose issuer and bundle are missing still networks pods.
//!
//! The client processes are this test binary re-run under `ip netns exec`, as in
//! identity_workload_api.rs (attestation looks at the calling process's namespace).

use std::path::Path;
use std::time::Duration;
use veil_testbed::objects::{meta, pod, service_account_token};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::PostParams;
use kube::Api;
use veil_identity::issuer::DEFAULT_AUDIENCE;
use veil_identity::trust_domain;
use veil_testbed::net::{child_field, Netns};
use veil_testbed::{BedConfig, TestBed};

const SOCKET_ENV: &str = "VEIL_IDENTITY_AGENT_TEST_SOCKET";
/// Set: the child asks once and prints how it was refused, instead of retrying.
const ONCE_ENV: &str = "VEIL_IDENTITY_AGENT_TEST_ONCE";
const SYSTEM_NS: &str = "veil-system";
/// How long a pod's process keeps asking: the agent learns of the pod from its watch and
/// fetches the SVID from the issuer first.
const FETCH_DEADLINE: Duration = Duration::from_secs(45);

/// The client side, run as a child process inside a pod's namespace: retries until the
/// agent serves an SVID (or the deadline passes), then prints what it got.
#[test]
#[ignore = "run by identity_agent_serves_each_pod_its_own_svid in a pod namespace"]
fn identity_agent_child() {
    let Ok(socket) = std::env::var(SOCKET_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = format!("unix:{socket}");
        if std::env::var_os(ONCE_ENV).is_some() {
            let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
                .await
                .unwrap();
            match client.fetch_x509_svid().await {
                Ok(svid) => println!("SPIFFE_ID={}", svid.spiffe_id()),
                Err(e) => println!("REFUSED={e:?}"),
            }
            return;
        }
        let deadline = tokio::time::Instant::now() + FETCH_DEADLINE;
        let svid = loop {
            let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                client.fetch_x509_svid().await.map_err(|e| format!("{e:?}"))
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match attempt {
                Ok(svid) => break svid,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("no SVID within {FETCH_DEADLINE:?}: {e}"),
            }
        };
        println!("SPIFFE_ID={}", svid.spiffe_id());
        // The real X509Source syncs too, with the bundle of the SVID's trust domain.
        let source = spiffe::X509Source::builder()
            .endpoint(&endpoint)
            .build()
            .await
            .expect("X509Source syncs");
        let td = svid.spiffe_id().trust_domain().clone();
        let bundle = source.bundle_set().unwrap();
        let bundle = bundle.get(&td).expect("bundle for own trust domain");
        println!("BUNDLE_ROOTS={}", bundle.authorities().len());
        println!("SOURCE_ID={}", source.svid().unwrap().spiffe_id());
    });
}

fn run_child(ns: &Netns, socket: &Path) -> String {
    child(ns, socket, false)
}

fn child(ns: &Netns, socket: &Path, once: bool) -> String {
    let mut env = vec![(SOCKET_ENV, socket.as_os_str())];
    if once {
        env.push((ONCE_ENV, std::ffi::OsStr::new("1")));
    }
    ns.run_test_child("identity_agent_child", &env)
}

#[test]
fn identity_agent_serves_each_pod_its_own_svid() {
    let mut bed = TestBed::start(BedConfig {
        nodes: 0,
        encryption: "none",
        ..Default::default()
    })
    .unwrap();
    let node = bed.add_bare_node().unwrap();
    let node_name = bed.node(node).name.clone();
    let admin = bed.client.clone();
    let td = trust_domain("cluster.local").unwrap();

    // Objects: the system namespace, ServiceAccounts, the agent's (host-network) pod and
    // two workload pods on the node; the agent may read the bundle ConfigMap.
    let agent_pod = bed.block_on(async {
        let pp = PostParams::default();
        Api::<Namespace>::all(admin.clone())
            .create(
                &pp,
                &Namespace {
                    metadata: meta(SYSTEM_NS, None),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        for (ns, sa) in [
            (SYSTEM_NS, "veil-agent"),
            ("default", "alice"),
            ("default", "bob"),
        ] {
            Api::<ServiceAccount>::namespaced(admin.clone(), ns)
                .create(
                    &pp,
                    &ServiceAccount {
                        metadata: meta(sa, Some(ns)),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
        Api::<Role>::namespaced(admin.clone(), SYSTEM_NS)
            .create(
                &pp,
                &Role {
                    metadata: meta("veil-agent-bundle", Some(SYSTEM_NS)),
                    rules: Some(vec![PolicyRule {
                        api_groups: Some(vec!["".into()]),
                        resources: Some(vec!["configmaps".into()]),
                        resource_names: None,
                        verbs: vec!["get".into(), "list".into(), "watch".into()],
                        ..Default::default()
                    }]),
                },
            )
            .await
            .unwrap();
        Api::<RoleBinding>::namespaced(admin.clone(), SYSTEM_NS)
            .create(
                &pp,
                &RoleBinding {
                    metadata: meta("veil-agent-bundle", Some(SYSTEM_NS)),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "Role".into(),
                        name: "veil-agent-bundle".into(),
                    },
                    subjects: Some(vec![Subject {
                        kind: "Group".into(),
                        name: "veil:agents".into(),
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        ..Default::default()
                    }]),
                },
            )
            .await
            .unwrap();
        let agent_pod = Api::<Pod>::namespaced(admin.clone(), SYSTEM_NS)
            .create(
                &pp,
                &pod(SYSTEM_NS, "veil-agent-0", &node_name, "veil-agent", true),
            )
            .await
            .unwrap();
        for (name, sa) in [("pod-a", "alice"), ("pod-b", "bob")] {
            Api::<Pod>::namespaced(admin.clone(), "default")
                .create(&pp, &pod("default", name, &node_name, sa, false))
                .await
                .unwrap();
        }
        agent_pod
    });

    // The agent's projected token: audience veil-issuer, bound to its pod (so to the node).
    let token = bed
        .block_on(service_account_token(
            &admin,
            SYSTEM_NS,
            "veil-agent",
            Some(&agent_pod),
            vec![DEFAULT_AUDIENCE.into()],
            Duration::from_secs(3600),
        ))
        .unwrap();
    let token_file = bed.dir().join("agent-token");
    std::fs::write(&token_file, token).unwrap();

    // The issuer: CA in its Secret, bundle published, serving on the underlay gateway so
    // the agent (in the node's namespace) reaches it.
    let gateway = format!("198.18.{}.1", bed.index);
    // The agent derives the issuer's ID by default (no --issuer-id).
    let issuer = bed
        .block_on(veil_testbed::issuer::start(
            &admin,
            &td,
            SYSTEM_NS,
            DEFAULT_AUDIENCE,
            format!("{gateway}:0").parse().unwrap(),
        ))
        .unwrap();
    let running = &issuer.running;

    let socket = bed.node(node).dir.join("workload-api/socket");
    bed.set_agent_args(
        node,
        vec![
            "--issuer-address".into(),
            running.addr.to_string(),
            "--issuer-token-file".into(),
            token_file.display().to_string(),
            "--workload-api-socket".into(),
            socket.display().to_string(),
        ],
    );
    bed.start_agent(node).unwrap();
    let pod_a = bed.add_pod(node, "pod-a").unwrap();
    let pod_b = bed.add_pod(node, "pod-b").unwrap();

    // Both pods at once, each in its own namespace, each with its own ServiceAccount.
    let (out_a, out_b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_child(&pod_a.netns, &socket));
        let b = s.spawn(|| run_child(&pod_b.netns, &socket));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (out, sa) in [(&out_a, "alice"), (&out_b, "bob")] {
        let want = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        assert_eq!(child_field(out, "SPIFFE_ID"), want);
        assert_eq!(child_field(out, "SOURCE_ID"), want);
        assert_eq!(child_field(out, "BUNDLE_ROOTS"), "1");
    }

    // This process runs in no pod: refused.
    let err = bed.block_on(veil_testbed::issuer::workload_api_refusal(&socket));
    assert!(err.contains("PermissionDenied"), "{err}");

    // A restarted agent knows the pods' namespaces again (from its IPAM records).
    bed.restart_agent(node).unwrap();
    let again = run_child(&pod_b.netns, &socket);
    assert_eq!(
        child_field(&again, "SPIFFE_ID"),
        "spiffe://cluster.local/ns/default/sa/bob"
    );

    // CNI DEL: the namespace is forgotten at once (the Pod object still exists).
    let del = bed
        .cni(node, &veil_testbed::bed::pod_call("DEL", &pod_a))
        .unwrap();
    assert!(del.success, "{}", del.stdout);
    let out = child(&pod_a.netns, &socket, true);
    assert!(
        child_field(&out, "REFUSED").contains("PermissionDenied"),
        "{out}"
    );

    // The Pod object goes: its SVID goes with it.
    bed.block_on(Api::<Pod>::namespaced(admin.clone(), "default").delete(
        "pod-b",
        &kube::api::DeleteParams {
            // No kubelet confirms a graceful deletion here.
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    ))
    .unwrap();
    veil_testbed::eventually("pod-b's SVID withdrawn", Duration::from_secs(20), || {
        let out = child(&pod_b.netns, &socket, true);
        if out.contains("REFUSED=") {
            assert!(
                child_field(&out, "REFUSED").contains("PermissionDenied"),
                "{out}"
            );
            return Ok(Some(()));
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(None)
    })
    .unwrap();
}

/// Identity must never cost a pod its network: with no trust bundle published and
/// nothing listening at the issuer's address, the agent still serves CNI.
#[test]
fn identity_agent_without_issuer_still_networks_pods() {
    let mut bed = TestBed::start(BedConfig {
        nodes: 0,
        encryption: "none",
        ..Default::default()
    })
    .unwrap();
    let node = bed.add_bare_node().unwrap();
    let socket = bed.node(node).dir.join("workload-api/socket");
    bed.set_agent_args(
        node,
        vec![
            "--issuer-address".into(),
            // Nothing listens on the discard port of the underlay gateway.
            format!("198.18.{}.1:9", bed.index),
            "--issuer-token-file".into(),
            "/nonexistent/veil-token".into(),
            "--workload-api-socket".into(),
            socket.display().to_string(),
        ],
    );
    bed.start_agent(node).unwrap();
    let a = bed.add_pod(node, "lonely-a").unwrap();
    let b = bed.add_pod(node, "lonely-b").unwrap();
    a.ping(b.ip).unwrap();
    bed.check_agent(node).unwrap();
    let log = std::fs::read_to_string(bed.node(node).dir.join("agent-0.log")).unwrap();
    assert!(log.contains("cannot read the trust bundle"), "{log}");
}
