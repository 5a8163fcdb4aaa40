//! Issuance throughput of the issuer, end to end: agents' clients make a key and CSR,
//! call the issuer over TLS (gRPC, HTTP/2), the issuer authorises and signs, the client
//! checks the SVID. TokenReview and the pod look-up are in-memory stand-ins here (the
//! API server is measured in its own right; with it, a review is cached per token).
//! Last line: `RESULT identity svids_per_s=<n>`.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use veil_identity::client::{IssuerClient, PodRef, TokenSource};
use veil_identity::issuer::{
    serve, Authenticator, Caller, IssuerService, IssuerSettings, PodDirectory, PodFacts, Refusal,
};
use veil_identity::{trust_domain, workload_id, CaSet, CertificateAuthority};

/// Requests per run: enough for a steady rate on two cores, short enough for `make`.
const REQUESTS: usize = 10_000;
/// Agents (connections) and requests in flight per agent.
const AGENTS: usize = 4;
const IN_FLIGHT: usize = 16;

struct OneNode;

#[veil_identity::async_trait]
impl Authenticator for OneNode {
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        if token != "agent-token" {
            return Err(Refusal::unauthenticated("bad token"));
        }
        Ok(Caller {
            username: "system:serviceaccount:veil-system:veil-agent".into(),
            node: Some("node-a".into()),
        })
    }
}

#[veil_identity::async_trait]
impl PodDirectory for OneNode {
    async fn pod(&self, _ns: &str, name: &str) -> Result<Option<PodFacts>, Refusal> {
        Ok(Some(PodFacts {
            uid: format!("uid-{name}"),
            node: "node-a".into(),
            service_account: "web".into(),
            phase: "Running".into(),
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let td = trust_domain("cluster.local")?;
        let ca = CertificateAuthority::generate(&td, Duration::from_secs(86400), SystemTime::now())?;
        let set = CaSet::new(ca);
        let bundle = set.bundle();
        let service = IssuerService::new(
            IssuerSettings {
                trust_domain: td.clone(),
                svid_ttl: Duration::from_secs(3600),
                agents: BTreeSet::from(["system:serviceaccount:veil-system:veil-agent".into()]),
            },
            Arc::new(RwLock::new(set)),
            Arc::new(OneNode),
            Arc::new(OneNode),
        );
        let issuer_id = workload_id(&td, "veil-system", "veil-issuer")?;
        let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = serve("127.0.0.1:0".parse()?, issuer_id.clone(), service, async {
            let _ = stop_rx.await;
        })
        .await?;

        let mut clients = Vec::new();
        for _ in 0..AGENTS {
            clients.push(
                IssuerClient::connect(
                    running.addr.to_string(),
                    &bundle,
                    issuer_id.clone(),
                    TokenSource::Static("agent-token".into()),
                )
                .await?,
            );
        }
        // Warm up every connection.
        for c in &clients {
            c.fetch(&pod(0)).await?;
        }
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in &clients {
            for _ in 0..IN_FLIGHT {
                let (c, next) = (c.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= REQUESTS {
                            return anyhow::Ok(());
                        }
                        let (svid, _) = c.fetch(&pod(i)).await?;
                        anyhow::ensure!(svid.id().to_string().ends_with("/ns/shop/sa/web"));
                    }
                }));
            }
        }
        for t in tasks {
            t.await??;
        }
        let elapsed = start.elapsed();
        let rate = REQUESTS as f64 / elapsed.as_secs_f64();
        println!(
            "issued {REQUESTS} SVIDs over TLS with {AGENTS} agents x {IN_FLIGHT} in flight in {:.2} s",
            elapsed.as_secs_f64()
        );
        println!("RESULT identity svids_per_s={rate:.0}");
        anyhow::Ok(())
    })
}

fn pod(i: usize) -> PodRef {
    PodRef {
        namespace: "shop".into(),
        name: format!("web-{i}"),
        uid: format!("uid-web-{i}"),
        service_account: "web".into(),
    }
}
