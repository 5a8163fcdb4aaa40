//! The issuer against the test bed's real API server: agents authenticate with bound
//! ServiceAccount tokens (TokenReview), get SVIDs for pods on their own node only, and
//! are refused, with a reason, for another node's pod, a made-up pod, a forged or expired
//! token, a token of a non-agent or one bound to no node. The issuer runs with its own
//! ServiceAccount and only the RBAC the chart will grant it. The `hardening_*` tests
//! (issue 11): its own ID is never issued, wrong-audience tokens are refused, stalled TLS
//! clients are dropped while agents are served, and only one of two replicas rotates the CA.

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

/// What every issuer test starts from.
struct Cluster {
    /// The agent's (host-network) pod on node-a.
    agent_pod: Pod,
    /// A workload pod on node-a (ServiceAccount `shop/web`).
    web_a: Pod,
    /// A token of the issuer's own ServiceAccount, for its kube client.
    issuer_token: String,
}

/// Namespaces, nodes `node-a` and `node-b`, ServiceAccounts, the issuer's RBAC as the
/// chart grants it (Leases included, for CA rotation by one replica), the agent's pod
/// and web pods on each node.
async fn cluster(admin: &kube::Client) -> Cluster {
    let admin = admin.clone();
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
                PolicyRule {
                    api_groups: Some(vec!["coordination.k8s.io".into()]),
                    ..rule(&["leases"], &["get", "create", "update"])
                },
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
    Cluster {
        agent_pod,
        web_a,
        issuer_token,
    }
}

/// A kube client authenticated as the issuer's ServiceAccount.
fn issuer_kube_client(bed: &TestBed, issuer_token: &str) -> kube::Client {
    bed.block_on(async {
        let raw =
            kube::config::Kubeconfig::from_yaml(&bed.control_plane().kubeconfig(issuer_token))
                .unwrap();
        let config = kube::Config::from_custom_kubeconfig(raw, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    })
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

    let Cluster {
        agent_pod,
        web_a,
        issuer_token,
    } = bed.block_on(cluster(&admin));

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
    let issuer_client = issuer_kube_client(&bed, &issuer_token);
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

/// A bed with the [`cluster`] objects and an issuer started as the chart runs it.
struct WithIssuer {
    issuer: veil_testbed::issuer::Issuer,
    cluster: Cluster,
    bundle: veil_identity::TrustBundle,
    agent_token: String,
    bed: TestBed,
}

fn with_issuer() -> WithIssuer {
    let bed = TestBed::start(BedConfig {
        nodes: 0,
        ..Default::default()
    })
    .unwrap();
    let admin = bed.client.clone();
    let cluster = bed.block_on(cluster(&admin));
    let issuer_client = issuer_kube_client(&bed, &cluster.issuer_token);
    let issuer = bed
        .block_on(veil_testbed::issuer::start(
            &issuer_client,
            &trust_domain("cluster.local").unwrap(),
            SYSTEM_NS,
            AUDIENCE,
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    let bundle = bed
        .block_on(k8s::read_bundle(&admin, SYSTEM_NS, "veil-trust-bundle"))
        .unwrap();
    let agent_token = bed.block_on(token(
        &admin,
        SYSTEM_NS,
        "veil-agent",
        Some(&cluster.agent_pod),
    ));
    WithIssuer {
        issuer,
        cluster,
        bundle,
        agent_token,
        bed,
    }
}

impl WithIssuer {
    fn connect(&self, token: &str) -> IssuerClient {
        self.bed
            .block_on(IssuerClient::connect(
                self.issuer.running.addr.to_string(),
                &self.bundle,
                self.issuer.running.id.clone(),
                TokenSource::Static(token.into()),
            ))
            .unwrap()
    }
}

fn pod_on_node_a(ns: &str, name: &str) -> PodRef {
    PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: String::new(),
        service_account: String::new(),
    }
}

/// Issue 11: a pod that runs as the issuer's own ServiceAccount on an agent's node (the
/// issuer's own pod) used to get an SVID naming the issuer — so that agent could then
/// impersonate the issuer to every other agent. Its ID is now reserved; the CA it loaded
/// from its Secret signs nothing outside its trust domain; names that are not Kubernetes
/// names are refused before they reach an ID.
#[test]
fn hardening_issuer_refuses_its_own_id_and_foreign_trust_domains() {
    let t = with_issuer();
    let admin = t.bed.client.clone();
    t.bed.block_on(create(
        &admin,
        Some(SYSTEM_NS),
        pod(SYSTEM_NS, "issuer-x", "node-a", "veil-issuer", false),
    ));
    let agent = t.connect(&t.agent_token);
    let (code, why) = refused(
        t.bed
            .block_on(agent.fetch(&pod_on_node_a(SYSTEM_NS, "issuer-x"))),
    );
    assert_eq!(code, Code::PermissionDenied, "{why}");
    assert!(why.contains("issuer's own identity"), "{why}");
    // The same agent still gets its workloads' SVIDs.
    let (svid, _) = t
        .bed
        .block_on(agent.fetch(&pod_on_node_a("shop", "web-a")))
        .unwrap();
    assert_eq!(
        svid.id().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    for (ns, name) in [
        ("shop/sa/admin", "web-a"),
        ("shop", "web-a/../x"),
        ("", "web-a"),
    ] {
        let (code, why) = refused(t.bed.block_on(agent.fetch(&pod_on_node_a(ns, name))));
        assert_eq!(code, Code::InvalidArgument, "{ns}/{name}: {why}");
    }
    // Foreign trust domains: the CA as loaded from the issuer's Secret refuses them.
    let foreign =
        veil_identity::workload_id(&trust_domain("evil.example").unwrap(), "shop", "web").unwrap();
    let (_key, csr) = veil_identity::svid::new_key_and_csr().unwrap();
    let err = t
        .issuer
        .ca
        .active
        .sign_csr(&csr, &foreign, Duration::from_secs(60), SystemTime::now())
        .unwrap_err();
    assert!(err.to_string().contains("evil.example"), "{err}");
}

/// Issue 11: the issuer asks TokenReview for its own audience and takes only a review
/// that confirms exactly that audience: tokens for another audience, or for the API
/// server's, are refused; a token for several audiences including the issuer's passes.
#[test]
fn hardening_issuer_token_with_wrong_audience_refused() {
    let t = with_issuer();
    let admin = t.bed.client.clone();
    let bound = Some(&t.cluster.agent_pod);
    for (what, audiences) in [
        ("another audience", vec!["not-veil".to_string()]),
        ("the API server's audience", vec![]),
    ] {
        let token = t
            .bed
            .block_on(token_for(&admin, SYSTEM_NS, "veil-agent", bound, audiences));
        let (code, why) = refused(
            t.bed
                .block_on(t.connect(&token).fetch(&pod_on_node_a("shop", "web-a"))),
        );
        assert_eq!(code, Code::Unauthenticated, "{what}: {why}");
    }
    let both = t.bed.block_on(token_for(
        &admin,
        SYSTEM_NS,
        "veil-agent",
        bound,
        vec!["not-veil".into(), AUDIENCE.into()],
    ));
    t.bed
        .block_on(t.connect(&both).fetch(&pod_on_node_a("shop", "web-a")))
        .expect("a token that includes the issuer's audience is accepted");
}

/// Issue 11: a client that opens TCP and stalls mid-handshake is dropped at the
/// handshake deadline (before, it held its task and socket forever), and agents are
/// served while such clients are connected.
#[test]
fn hardening_issuer_slow_tls_client_is_dropped_and_others_served() {
    use std::io::{Read, Write};
    let t = with_issuer();
    let started = std::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = std::net::TcpStream::connect(t.issuer.running.addr).unwrap();
        // The first bytes of a TLS record header, then nothing.
        s.write_all(&[0x16, 0x03, 0x01]).unwrap();
        slow.push(s);
    }
    let agent = t.connect(&t.agent_token);
    t.bed
        .block_on(agent.fetch(&pod_on_node_a("shop", "web-a")))
        .expect("served while slow clients are connected");
    assert!(
        started.elapsed() < veil_identity::issuer::DEFAULT_HANDSHAKE_TIMEOUT,
        "the agent was not kept waiting for the slow clients"
    );
    for s in &mut slow {
        s.set_read_timeout(Some(
            veil_identity::issuer::DEFAULT_HANDSHAKE_TIMEOUT + Duration::from_secs(10),
        ))
        .unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("slow client not dropped: {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= veil_identity::issuer::DEFAULT_HANDSHAKE_TIMEOUT - Duration::from_secs(1),
        "dropped only at the deadline, not at once: {took:?}"
    );
}

/// Issue 11: with two issuer replicas, exactly one rotates the CA — the holder of the
/// Lease `veil-issuer-ca` — and the other signs with what it stored (before, each replica
/// rotated on its own and they overwrote each other's CA in the Secret). Both run as the
/// issuer's ServiceAccount with the chart's RBAC (Leases included).
#[test]
fn hardening_two_issuers_only_one_rotates_the_ca() {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, RwLock};
    use veil_identity::bundle::RotationPolicy;
    use veil_identity::rotation::{CaMaintainer, KubeCaStore, LeaseLeadership, DEFAULT_LEASE};

    let t = with_issuer();
    let client = issuer_kube_client(&t.bed, &t.cluster.issuer_token);
    let td = trust_domain("cluster.local").unwrap();
    // The bed's CA has a day left: a successor is staged at once, promoted 2 s later.
    let policy = RotationPolicy {
        ca_lifetime: Duration::from_secs(10 * 365 * 86400),
        rotate_before: Duration::from_secs(2 * 365 * 86400),
        propagation: Duration::from_secs(2),
        svid_ttl: Duration::from_secs(2),
    };
    let runtime = t.bed.block_on(async { tokio::runtime::Handle::current() });
    let replicas: Vec<_> = ["issuer-0", "issuer-1"]
        .into_iter()
        .map(|holder| {
            let ca = Arc::new(RwLock::new(t.issuer.ca.clone()));
            let maintainer = CaMaintainer::new(
                Arc::new(KubeCaStore {
                    client: client.clone(),
                    namespace: SYSTEM_NS.into(),
                    secret: veil_testbed::issuer::CA_SECRET.into(),
                    configmap: veil_testbed::issuer::BUNDLE_CONFIGMAP.into(),
                    trust_domain: td.clone(),
                }),
                Arc::new(LeaseLeadership {
                    client: client.clone(),
                    namespace: SYSTEM_NS.into(),
                    name: DEFAULT_LEASE.into(),
                    holder: holder.into(),
                    duration: Duration::from_secs(5),
                }),
                policy,
                Duration::from_millis(500),
                ca.clone(),
            );
            let steps = maintainer.steps();
            let task = runtime.spawn(maintainer.run());
            (holder, ca, steps, task)
        })
        .collect();

    // Staged and promoted by one replica.
    let stored = veil_testbed::eventually("the CA rotated", Duration::from_secs(30), || {
        let stored = t.bed.block_on(k8s::load_or_create_ca(
            &client,
            SYSTEM_NS,
            veil_testbed::issuer::CA_SECRET,
            &td,
            Duration::from_secs(86400),
        ))?;
        Ok((stored.active.cert_der() != t.issuer.ca.active.cert_der()).then_some(stored))
    })
    .unwrap();
    // The other replica follows: it signs with the stored CA, within a couple of rounds.
    veil_testbed::eventually(
        "both replicas sign with the stored CA",
        Duration::from_secs(10),
        || {
            Ok(replicas
                .iter()
                .all(|(_, ca, _, _)| {
                    ca.read().unwrap().active.cert_der() == stored.active.cert_der()
                })
                .then_some(()))
        },
    )
    .unwrap();
    for (_, _, _, task) in &replicas {
        task.abort();
    }
    let stepped: Vec<_> = replicas
        .iter()
        .filter(|(_, _, steps, _)| steps.load(Ordering::SeqCst) > 0)
        .map(|(holder, _, _, _)| *holder)
        .collect();
    assert_eq!(stepped.len(), 1, "replicas that rotated: {stepped:?}");
    let lease = t
        .bed
        .block_on(
            Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
                t.bed.client.clone(),
                SYSTEM_NS,
            )
            .get(DEFAULT_LEASE),
        )
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(stepped[0]),
        "the rotating replica holds the Lease"
    );
    // The published bundle is the stored set's (read after both stopped).
    let now_stored = t
        .bed
        .block_on(k8s::load_or_create_ca(
            &client,
            SYSTEM_NS,
            veil_testbed::issuer::CA_SECRET,
            &td,
            Duration::from_secs(86400),
        ))
        .unwrap();
    let bundle = t
        .bed
        .block_on(k8s::read_bundle(
            &t.bed.client,
            SYSTEM_NS,
            "veil-trust-bundle",
        ))
        .unwrap();
    assert_eq!(bundle, now_stored.bundle());
}
