//! The issuer against the test bed's real API server: agents authenticate with bound
//! ServiceAccount tokens (TokenReview), get SVIDs for pods on their own node only, and
//! are refused, with a reason, for another node's pod, a made-up pod, a forged or expired
//! token, a token of a non-agent or one bound to no node. The issuer runs with its own
//! ServiceAccount and only the RBAC the chart will grant it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use veil_testbed::objects::{meta, pod, service_account_token};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use kube::api::PostParams;
use kube::Api;
use veil_identity::client::{ClientError, Code, IssuerClient, PodRef, TokenSource};
use veil_identity::issuer::NODE_NAME_EXTRA;
use veil_identity::k8s;
use veil_identity::tls::{KeyUsage, UnixTime};
use veil_identity::{parse_svid, trust_domain};
use veil_testbed::{BedConfig, TestBed};

const AUDIENCE: &str = "veil-issuer";
const SYSTEM_NS: &str = "veil-system";

async fn create<K>(client: &kube::Client, ns: Option<&str>, obj: K) -> K
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    Api::<K>::namespaced(client.clone(), ns.unwrap())
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

async fn create_cluster<K>(client: &kube::Client, obj: K) -> K
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>,
{
    Api::<K>::all(client.clone())
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

/// A token for `ns/sa` with audience `veil-issuer`, bound to `pod` (with its UID) when given.
async fn token(client: &kube::Client, ns: &str, sa: &str, bound: Option<&Pod>) -> String {
    token_for(client, ns, sa, bound, vec![AUDIENCE.into()]).await
}

/// A token for `ns/sa` for `audiences` (empty: the API server's own).
async fn token_for(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    bound: Option<&Pod>,
    audiences: Vec<String>,
) -> String {
    service_account_token(client, ns, sa, bound, audiences, Duration::from_secs(600))
        .await
        .unwrap()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Re-signs `real`'s header and claims (edited by `edit`) with the PKCS#8 key `key_der`
/// (ES256, the algorithm of the test bed's ServiceAccount key).
fn resign(real: &str, key_der: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut parts = real.split('.');
    let header = parts.next().unwrap();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64().decode(parts.next().unwrap()).unwrap()).unwrap();
    edit(&mut claims);
    let signing_input = format!(
        "{header}.{}",
        b64().encode(serde_json::to_vec(&claims).unwrap())
    );
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        key_der,
        &rng,
    )
    .unwrap();
    let sig = key.sign(&rng, signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64().encode(sig.as_ref()))
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> (Code, String) {
    match result {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn identity_issuer_signs_only_for_pods_on_the_agents_node() {
    let bed = TestBed::start(BedConfig {
        nodes: 0,
        ..Default::default()
    })
    .unwrap();
    let admin = bed.client.clone();
    let td = trust_domain("cluster.local").unwrap();

    let (agent_pod, web_a, issuer_token) = bed.block_on(async {
        for ns in [SYSTEM_NS, "shop"] {
            create_cluster(
                &admin,
                Namespace {
                    metadata: meta(ns, None),
                    ..Default::default()
                },
            )
            .await;
        }
        for node in ["node-a", "node-b"] {
            create_cluster(
                &admin,
                Node {
                    metadata: meta(node, None),
                    ..Default::default()
                },
            )
            .await;
        }
        for (ns, sa) in [
            (SYSTEM_NS, "veil-agent"),
            (SYSTEM_NS, "veil-issuer"),
            ("shop", "web"),
        ] {
            create(
                &admin,
                Some(ns),
                ServiceAccount {
                    metadata: meta(sa, Some(ns)),
                    ..Default::default()
                },
            )
            .await;
        }
        // The issuer's RBAC, as the chart will grant it.
        let subject = Subject {
            kind: "ServiceAccount".into(),
            name: "veil-issuer".into(),
            namespace: Some(SYSTEM_NS.into()),
            ..Default::default()
        };
        let rule = |resources: &[&str], verbs: &[&str]| PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(resources.iter().map(|s| s.to_string()).collect()),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        create_cluster(
            &admin,
            ClusterRole {
                metadata: meta("veil-issuer", None),
                rules: Some(vec![rule(&["pods"], &["get"])]),
                ..Default::default()
            },
        )
        .await;
        for (name, role) in [
            ("veil-issuer", "veil-issuer"),
            ("veil-issuer-auth-delegator", "system:auth-delegator"),
        ] {
            create_cluster(
                &admin,
                ClusterRoleBinding {
                    metadata: meta(name, None),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "ClusterRole".into(),
                        name: role.into(),
                    },
                    subjects: Some(vec![subject.clone()]),
                },
            )
            .await;
        }
        create(
            &admin,
            Some(SYSTEM_NS),
            Role {
                metadata: meta("veil-issuer", Some(SYSTEM_NS)),
                rules: Some(vec![
                    rule(&["secrets"], &["get", "create", "patch"]),
                    rule(&["configmaps"], &["get", "create", "patch"]),
                ]),
            },
        )
        .await;
        create(
            &admin,
            Some(SYSTEM_NS),
            RoleBinding {
                metadata: meta("veil-issuer", Some(SYSTEM_NS)),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "veil-issuer".into(),
                },
                subjects: Some(vec![subject]),
            },
        )
        .await;

        let agent_pod = create(
            &admin,
            Some(SYSTEM_NS),
            pod(SYSTEM_NS, "agent-a", "node-a", "veil-agent", false),
        )
        .await;
        let web_a = create(
            &admin,
            Some("shop"),
            pod("shop", "web-a", "node-a", "web", false),
        )
        .await;
        create(
            &admin,
            Some("shop"),
            pod("shop", "web-b", "node-b", "web", false),
        )
        .await;
        let issuer_token = token_for(&admin, SYSTEM_NS, "veil-issuer", None, vec![]).await;
        (agent_pod, web_a, issuer_token)
    });

    let agent_token = bed.block_on(token(&admin, SYSTEM_NS, "veil-agent", Some(&agent_pod)));

    // What TokenReview says about a pod-bound token on 1.34: the node is in user.extra.
    let review = bed
        .block_on(Api::<TokenReview>::all(admin.clone()).create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(agent_token.clone()),
                    audiences: Some(vec![AUDIENCE.into()]),
                },
                ..Default::default()
            },
        ))
        .unwrap();
    let status = review.status.unwrap();
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:veil-system:veil-agent")
    );
    let extra = user.extra.unwrap_or_default();
    eprintln!("TokenReview user.extra of a pod-bound token: {extra:?}");
    assert_eq!(
        extra.get(NODE_NAME_EXTRA),
        Some(&vec!["node-a".to_string()])
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["agent-a".to_string()])
    );

    // The issuer, authenticated as its own ServiceAccount.
    let issuer_client = bed.block_on(async {
        let raw =
            kube::config::Kubeconfig::from_yaml(&bed.control_plane().kubeconfig(&issuer_token))
                .unwrap();
        let config = kube::Config::from_custom_kubeconfig(raw, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    });
    let issuer = bed
        .block_on(veil_testbed::issuer::start(
            &issuer_client,
            &td,
            SYSTEM_NS,
            AUDIENCE,
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    let running = &issuer.running;
    // A second start reads the same CA back.
    let again = bed
        .block_on(k8s::load_or_create_ca(
            &issuer_client,
            SYSTEM_NS,
            veil_testbed::issuer::CA_SECRET,
            &td,
            Duration::from_secs(86400),
        ))
        .unwrap();
    assert_eq!(again.bundle(), issuer.ca.bundle());

    // The agent: reads the published bundle, trusts only the issuer's ID.
    let bundle = bed
        .block_on(k8s::read_bundle(&admin, SYSTEM_NS, "veil-trust-bundle"))
        .unwrap();
    let connect = |token: String| {
        bed.block_on(IssuerClient::connect(
            running.addr.to_string(),
            &bundle,
            running.id.clone(),
            TokenSource::Static(token),
        ))
        .unwrap()
    };
    let agent = connect(agent_token.clone());
    let pod_ref = |ns: &str, name: &str| PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: String::new(),
        service_account: String::new(),
    };

    // Its own node's pod: an SVID naming the pod's ServiceAccount, chaining to the bundle.
    let (svid, roots) = bed
        .block_on(agent.fetch(&PodRef {
            uid: web_a.metadata.uid.clone().unwrap(),
            service_account: "web".into(),
            ..pod_ref("shop", "web-a")
        }))
        .unwrap();
    assert_eq!(
        svid.id().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(roots, bundle.roots);
    let info = parse_svid(&svid.chain()[0]).unwrap();
    let lifetime = info.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime > Duration::from_secs(3500) && lifetime <= Duration::from_secs(3600));
    let verifier = veil_identity::tls::SpiffeVerifier::new(
        &bundle,
        veil_identity::tls::AllowedIds::TrustDomain(td.clone()),
    )
    .unwrap();
    verifier
        .verify(
            &svid.chain()[0],
            &[],
            UnixTime::now(),
            KeyUsage::client_auth(),
        )
        .unwrap();

    // Another node's pod.
    let (code, why) = refused(bed.block_on(agent.fetch(&pod_ref("shop", "web-b"))));
    assert_eq!(code, Code::PermissionDenied);
    assert!(why.contains("node-b") && why.contains("node-a"), "{why}");
    // A made-up pod.
    let (code, why) = refused(bed.block_on(agent.fetch(&pod_ref("shop", "nobody"))));
    assert_eq!(code, Code::PermissionDenied);
    assert!(why.contains("does not exist"), "{why}");
    // A ServiceAccount or UID that does not match the pod.
    let (_, why) = refused(bed.block_on(agent.fetch(&PodRef {
        service_account: "admin".into(),
        ..pod_ref("shop", "web-a")
    })));
    assert!(why.contains("ServiceAccount web"), "{why}");
    let (_, why) = refused(bed.block_on(agent.fetch(&PodRef {
        uid: "00000000-0000-0000-0000-000000000000".into(),
        ..pod_ref("shop", "web-a")
    })));
    assert!(why.contains("UID"), "{why}");

    // Tokens: forged (right claims, wrong key), expired (right key, past exp), not an
    // agent's, bound to no node, garbage.
    let sa_key = pem_to_der(&std::fs::read_to_string(bed.dir().join("sa-key.pem")).unwrap());
    let rng = ring::rand::SystemRandom::new();
    let other_key = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let forged = resign(&agent_token, other_key.as_ref(), |_| {});
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = resign(&agent_token, &sa_key, |c| {
        c["iat"] = (now - 7200).into();
        c["nbf"] = (now - 7200).into();
        c["exp"] = (now - 3600).into();
    });
    // The same re-signing with a valid expiry is accepted: the refusals above are for
    // the signature and the expiry, not for the re-encoding.
    let resigned_ok = resign(&agent_token, &sa_key, |_| {});
    bed.block_on(connect(resigned_ok).fetch(&pod_ref("shop", "web-a")))
        .expect("a correctly signed, unexpired token is accepted");
    for (what, token) in [
        ("forged", forged),
        ("expired", expired),
        ("garbage", "not-a-token".into()),
    ] {
        let (code, why) = refused(bed.block_on(connect(token).fetch(&pod_ref("shop", "web-a"))));
        assert_eq!(code, Code::Unauthenticated, "{what}: {why}");
    }
    let workload_token = bed.block_on(token(&admin, "shop", "web", Some(&web_a)));
    let (code, why) =
        refused(bed.block_on(connect(workload_token).fetch(&pod_ref("shop", "web-a"))));
    assert_eq!(code, Code::PermissionDenied);
    assert!(why.contains("not an agent"), "{why}");
    let unbound = bed.block_on(token(&admin, SYSTEM_NS, "veil-agent", None));
    let (code, why) = refused(bed.block_on(connect(unbound).fetch(&pod_ref("shop", "web-a"))));
    assert_eq!(code, Code::PermissionDenied);
    assert!(why.contains("not bound to a node"), "{why}");

    // Deleting the agent's pod invalidates its bound token, once the API server's own
    // token cache (10 s) and the issuer's review cache (10 s) have let go.
    bed.block_on(Api::<Pod>::namespaced(admin.clone(), SYSTEM_NS).delete(
        "agent-a",
        &kube::api::DeleteParams {
            // No kubelet runs here to confirm a graceful deletion: remove it at once.
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    ))
    .unwrap();
    let why = veil_testbed::eventually(
        "deleted agent pod's token refused",
        Duration::from_secs(40),
        || match bed.block_on(agent.fetch(&pod_ref("shop", "web-a"))) {
            Err(ClientError::Refused {
                code: Code::Unauthenticated,
                message,
            }) => Ok(Some(message)),
            Err(e) => anyhow::bail!("unexpected error {e}"),
            Ok(_) => {
                std::thread::sleep(Duration::from_secs(1));
                Ok(None)
            }
        },
    )
    .unwrap();
    eprintln!("token of the deleted agent pod: {why}");
}
