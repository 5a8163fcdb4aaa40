//! The SPIFFE Workload API checked with a real client: the `spiffe` crate's `X509Source`
//! (and its `WorkloadApiClient`) run in processes inside two pod network namespaces,
//! fetch their SVID and bundle, and see a rotation arrive on the stream. Each gets its
//! own pod's identity, never its neighbour's; a process in no pod gets nothing.
//!
//! The processes are this test binary re-run under `ip netns exec` (SO_PEERCRED names a
//! process, and `/proc/<pid>/ns/net` is its main thread's namespace, so the client must
//! be its own process for netns attestation to see it).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use veil_identity::bundle::CaSet;
use veil_identity::ca::{CertificateAuthority, DEFAULT_CA_LIFETIME};
use veil_identity::client::{ClientError, PodRef};
use veil_identity::manager::{SvidManager, SvidSource};
use veil_identity::svid::new_key_and_csr;
use veil_identity::tls::CertificateDer;
use veil_identity::workload_api::{self, NetnsAttestor, WorkloadApi};
use veil_identity::{trust_domain, workload_id, Svid};
use veil_testbed::net::{child_field, Netns};

const SOCKET_ENV: &str = "VEIL_IDENTITY_TEST_SOCKET";
/// SVID lifetime in this test: short, so a renewal (at half-life) arrives within seconds.
const TTL: Duration = Duration::from_secs(6);

/// Signs with an in-process CA: the issuer's signing path without the API server (the
/// issuer itself is tested against the real one in identity_issuer.rs).
struct DirectCa(CertificateAuthority);

#[veil_identity::async_trait]
impl SvidSource for DirectCa {
    async fn fetch(
        &self,
        pod: &PodRef,
    ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError> {
        let id = workload_id(self.0.trust_domain(), &pod.namespace, &pod.service_account).unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let cert = self.0.sign_csr(&csr, &id, TTL, SystemTime::now()).unwrap();
        Ok((
            Svid::new(vec![cert], key.serialize_der()).unwrap(),
            vec![self.0.cert_der().clone()],
        ))
    }
}

/// The client side, run as a child process inside a pod's namespace.
#[test]
#[ignore = "run by identity_workload_api_serves_each_pod_its_own_svid in a pod namespace"]
fn identity_workload_api_child() {
    let Ok(socket) = std::env::var(SOCKET_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = format!("unix:{socket}");
        let source = spiffe::X509Source::builder()
            .endpoint(&endpoint)
            .build()
            .await
            .expect("X509Source syncs");
        let first = source.svid().unwrap();
        println!("SPIFFE_ID={}", first.spiffe_id());
        let bundles = source.bundle_set().unwrap();
        let td = first.spiffe_id().trust_domain().clone();
        let bundle = bundles.get(&td).expect("bundle for own trust domain");
        println!("BUNDLE_ROOTS={}", bundle.authorities().len());

        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .unwrap();
        let direct = client.fetch_x509_bundles().await.unwrap();
        println!("DIRECT_BUNDLES={}", direct.len());

        // The rotation arrives on the stream, before the first SVID expires.
        let mut updates = source.updated();
        let rotated = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                updates.changed().await.unwrap();
                let now = source.svid().unwrap();
                if now.leaf().as_bytes() != first.leaf().as_bytes() {
                    return now;
                }
            }
        })
        .await
        .expect("rotation within 20 s");
        let first_end = veil_identity::parse_svid(first.leaf().as_bytes())
            .unwrap()
            .not_after;
        assert!(
            SystemTime::now() < first_end,
            "renewed SVID served before the old one expired"
        );
        println!("ROTATED_ID={}", rotated.spiffe_id());
    });
}

fn run_child(ns: &Netns, socket: &Path) -> String {
    ns.run_test_child(
        "identity_workload_api_child",
        &[(SOCKET_ENV, socket.as_os_str())],
    )
}

#[test]
fn identity_workload_api_serves_each_pod_its_own_svid() {
    veil_testbed::require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let td = trust_domain("cluster.local").unwrap();
    let ca = CertificateAuthority::generate(&td, DEFAULT_CA_LIFETIME, SystemTime::now()).unwrap();
    let bundle =
        CaSet::new(CertificateAuthority::from_pem(&td, ca.cert_pem(), ca.key_pem()).unwrap())
            .bundle();
    let tag = std::process::id() % 100_000;
    let ns_a = Netns::create(&format!("veilid{tag}a")).unwrap();
    let ns_b = Netns::create(&format!("veilid{tag}b")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");

    let attestor = NetnsAttestor::new();
    attestor
        .register(&ns_a.path(), ("shop".into(), "a".into()))
        .unwrap();
    attestor
        .register(&ns_b.path(), ("shop".into(), "b".into()))
        .unwrap();
    let (_stop, server) = rt.block_on(async {
        let manager = SvidManager::new(Arc::new(DirectCa(ca)), bundle);
        for (name, sa) in [("a", "alice"), ("b", "bob")] {
            manager.pod_added(PodRef {
                namespace: "shop".into(),
                name: name.into(),
                uid: String::new(),
                service_account: sa.into(),
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = workload_api::serve(
            &socket,
            WorkloadApi::new(manager, attestor.clone()),
            async {
                let _ = rx.await;
            },
        )
        .unwrap();
        (tx, server)
    });

    // Both pods at once, each in its own namespace.
    let (out_a, out_b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_child(&ns_a, &socket));
        let b = s.spawn(|| run_child(&ns_b, &socket));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        child_field(&out_a, "SPIFFE_ID"),
        "spiffe://cluster.local/ns/shop/sa/alice"
    );
    assert_eq!(
        child_field(&out_a, "ROTATED_ID"),
        "spiffe://cluster.local/ns/shop/sa/alice"
    );
    assert_eq!(
        child_field(&out_b, "SPIFFE_ID"),
        "spiffe://cluster.local/ns/shop/sa/bob"
    );
    assert_eq!(
        child_field(&out_b, "ROTATED_ID"),
        "spiffe://cluster.local/ns/shop/sa/bob"
    );
    for out in [&out_a, &out_b] {
        assert_eq!(child_field(out, "BUNDLE_ROOTS"), "1");
        assert_eq!(child_field(out, "DIRECT_BUNDLES"), "1");
    }

    // This process runs in no pod: refused.
    let err = rt.block_on(veil_testbed::issuer::workload_api_refusal(&socket));
    assert!(err.contains("PermissionDenied"), "{err}");
    server.abort();
}
