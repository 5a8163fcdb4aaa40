//! The SPIFFE issuer as the chart runs it, started inside the test process: its CA in the
//! Secret `veil-issuer-ca`, the trust bundle in the ConfigMap `veil-trust-bundle`, TLS on
//! `listen`, agents authenticated by TokenReview and authorized by their node's pods.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use veil_identity::issuer::{serve, IssuerService, IssuerSettings, RunningIssuer};
use veil_identity::k8s::{self, KubePods, TokenReviewAuthenticator};
use veil_identity::{workload_id, CaSet, TrustDomain};

/// The issuer's Secret holding its CA.
pub const CA_SECRET: &str = "veil-issuer-ca";
/// The ConfigMap the issuer publishes the trust bundle in.
pub const BUNDLE_CONFIGMAP: &str = "veil-trust-bundle";

/// A running issuer; it stops when this drops.
pub struct Issuer {
    /// Where it listens and the SPIFFE ID it presents.
    pub running: RunningIssuer,
    /// The CA it loaded or made.
    pub ca: CaSet,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts an issuer in `namespace` as `client` (which needs Secrets, ConfigMaps,
/// TokenReviews and Pods), trusting tokens for `audience` of the ServiceAccount
/// `<namespace>/veil-agent`, and presenting `spiffe://<td>/ns/<namespace>/sa/veil-issuer`.
/// Run it on the bed's runtime (`bed.block_on`).
pub async fn start(
    client: &kube::Client,
    td: &TrustDomain,
    namespace: &str,
    audience: &str,
    listen: SocketAddr,
) -> Result<Issuer> {
    let set = k8s::load_or_create_ca(client, namespace, CA_SECRET, td, Duration::from_secs(86400))
        .await?;
    k8s::publish_bundle(client, namespace, BUNDLE_CONFIGMAP, &set.bundle()).await?;
    let service = IssuerService::new(
        IssuerSettings {
            trust_domain: td.clone(),
            svid_ttl: Duration::from_secs(3600),
            agents: BTreeSet::from([format!("system:serviceaccount:{namespace}:veil-agent")]),
        },
        Arc::new(RwLock::new(set.clone())),
        Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            vec![audience.into()],
        )),
        Arc::new(KubePods::new(client.clone())),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let id = workload_id(td, namespace, "veil-issuer")?;
    let running = serve(listen, id, service, async {
        let _ = stopped.await;
    })
    .await?;
    Ok(Issuer {
        running,
        ca: set,
        _stop: stop,
    })
}

/// What the Workload API at `socket` answers this test process, which runs in no pod:
/// the error's debug text. Panics if it hands out an SVID.
pub async fn workload_api_refusal(socket: &std::path::Path) -> String {
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .expect("connect to the Workload API");
    let refused = client.fetch_x509_svid().await;
    format!(
        "{:?}",
        refused.expect_err("a process in no pod gets no SVID")
    )
}
