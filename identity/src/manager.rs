//! The agent's SVIDs: one per pod on the node, fetched when the pod appears, renewed at
//! half its lifetime, dropped when the pod goes — and withdrawn the moment it expires if
//! renewal kept failing, so an expired SVID is never served.
//!
//! What the issuer answers is checked before it is served: the SVID must chain to the
//! published trust bundle (the issuer's ConfigMap, [`SvidManager::set_bundle`]) and carry
//! no CA that bundle lacks, and it must have at least [`MIN_SVID_LIFE`] left. Anything
//! else counts as a failed fetch and is retried with backoff. The roots the issuer sends
//! with an SVID are never served to workloads: only the published bundle is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::bundle::TrustBundle;
use crate::client::{ClientError, IssuerClient, PodRef};
use crate::svid::Svid;
use crate::tls::{AllowedIds, KeyUsage, SpiffeVerifier, UnixTime};

/// First retry delay after a failed fetch; doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest delay between fetch attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// The least life an SVID must have left when it arrives to be served. The issuer's
/// shortest SVID lifetime is a minute; an answer with less than this left (or already
/// expired) is a fault, retried with backoff rather than renewed at once in a loop.
pub const MIN_SVID_LIFE: Duration = Duration::from_secs(2);

/// Where SVIDs come from: the issuer, or a stand-in in tests.
#[tonic::async_trait]
pub trait SvidSource: Send + Sync + 'static {
    /// A fresh SVID for `pod`, with the trust bundle's roots.
    async fn fetch(
        &self,
        pod: &PodRef,
    ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError>;
}

#[tonic::async_trait]
impl SvidSource for IssuerClient {
    async fn fetch(
        &self,
        pod: &PodRef,
    ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError> {
        IssuerClient::fetch(self, pod).await
    }
}

/// A pod by namespace and name.
pub type PodKey = (String, String);

struct Entry {
    pod: PodRef,
    tx: watch::Sender<Option<Svid>>,
    task: tokio::task::JoinHandle<()>,
}

struct Inner {
    source: Arc<dyn SvidSource>,
    pods: Mutex<HashMap<PodKey, Entry>>,
    bundle: watch::Sender<TrustBundle>,
}

/// Keeps an SVID for every pod it is told about.
#[derive(Clone)]
pub struct SvidManager {
    inner: Arc<Inner>,
}

impl SvidManager {
    /// A manager fetching from `source`, starting from the trust bundle `bundle`.
    pub fn new(source: Arc<dyn SvidSource>, bundle: TrustBundle) -> Self {
        SvidManager {
            inner: Arc::new(Inner {
                source,
                pods: Mutex::new(HashMap::new()),
                bundle: watch::channel(bundle).0,
            }),
        }
    }

    /// A pod on this node appeared (or changed): keep an SVID for it. A pod that is
    /// already known keeps its SVID unless its UID or ServiceAccount changed.
    pub fn pod_added(&self, pod: PodRef) {
        let key = (pod.namespace.clone(), pod.name.clone());
        let mut pods = self.inner.pods.lock().expect("pods lock");
        if let Some(e) = pods.get(&key) {
            if e.pod == pod {
                return;
            }
            e.task.abort();
            e.tx.send_replace(None);
        }
        let tx = pods
            .remove(&key)
            .map(|e| e.tx)
            .unwrap_or_else(|| watch::channel(None).0);
        let task = tokio::spawn(keep_fresh(self.inner.clone(), pod.clone(), tx.clone()));
        pods.insert(key, Entry { pod, tx, task });
    }

    /// A pod left this node: its SVID is dropped and watchers see `None`.
    pub fn pod_removed(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(e) = self.inner.pods.lock().expect("pods lock").remove(&key) {
            e.task.abort();
            e.tx.send_replace(None);
            tracing::info!(namespace, pod = name, "dropped SVID of a removed pod");
        }
    }

    /// The pod's current, unexpired SVID.
    pub fn svid(&self, namespace: &str, name: &str) -> Option<Svid> {
        let key = (namespace.to_string(), name.to_string());
        let pods = self.inner.pods.lock().expect("pods lock");
        let svid = pods.get(&key)?.tx.borrow().clone()?;
        (!svid.is_expired(SystemTime::now())).then_some(svid)
    }

    /// Follows a pod's SVID (`None` while there is none); `None` for an unknown pod.
    pub fn watch(&self, namespace: &str, name: &str) -> Option<watch::Receiver<Option<Svid>>> {
        let key = (namespace.to_string(), name.to_string());
        Some(
            self.inner
                .pods
                .lock()
                .expect("pods lock")
                .get(&key)?
                .tx
                .subscribe(),
        )
    }

    /// Follows the trust bundle.
    pub fn bundle(&self) -> watch::Receiver<TrustBundle> {
        self.inner.bundle.subscribe()
    }

    /// Replaces the trust bundle (e.g. from the issuer's ConfigMap).
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.inner.bundle.send_if_modified(|b| {
            let changed = *b != bundle;
            *b = bundle;
            changed
        });
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Whether `svid`, as the issuer sent it, may be served under `bundle`: every CA in its
/// chain is a root of the bundle, the leaf verifies against the bundle, and it has at
/// least [`MIN_SVID_LIFE`] left at `now`.
pub fn check_svid(svid: &Svid, bundle: &TrustBundle, now: SystemTime) -> Result<(), ClientError> {
    let chain = svid.chain();
    let (leaf, cas) = chain
        .split_first()
        .ok_or_else(|| ClientError::BadAnswer("empty certificate chain".into()))?;
    if let Some(stray) = cas.iter().position(|c| !bundle.roots.contains(c)) {
        return Err(ClientError::BadAnswer(format!(
            "certificate {} of the chain is a CA the published trust bundle does not hold",
            stray + 1
        )));
    }
    let verifier =
        SpiffeVerifier::new(bundle, AllowedIds::TrustDomain(bundle.trust_domain.clone()))?;
    verifier
        .verify(leaf, cas, UnixTime::now(), KeyUsage::client_auth())
        .map_err(|e| {
            ClientError::BadAnswer(format!(
                "SVID does not verify against the published trust bundle: {e}"
            ))
        })?;
    let left = svid.not_after().duration_since(now).unwrap_or_default();
    if left < MIN_SVID_LIFE {
        return Err(ClientError::BadAnswer(format!(
            "SVID has only {left:?} left (at least {MIN_SVID_LIFE:?} needed)"
        )));
    }
    Ok(())
}

/// Fetches, then renews at half-life; on failure retries with backoff, and withdraws the
/// SVID when it expires before a renewal succeeds.
async fn keep_fresh(inner: Arc<Inner>, pod: PodRef, tx: watch::Sender<Option<Svid>>) {
    let mut retry = FIRST_RETRY;
    let mut next_attempt = SystemTime::now();
    loop {
        // Wait for the next attempt, withdrawing the current SVID if it expires first.
        loop {
            let current_end = tx.borrow().as_ref().map(|s| s.not_after());
            match current_end {
                Some(end) if end <= next_attempt => {
                    tokio::time::sleep(until(end)).await;
                    tx.send_replace(None);
                    tracing::warn!(namespace = %pod.namespace, pod = %pod.name, "SVID expired before it could be renewed; withdrawn");
                }
                _ => break,
            }
        }
        tokio::time::sleep(until(next_attempt)).await;
        let fetched = inner.source.fetch(&pod).await.and_then(|(svid, roots)| {
            let bundle = inner.bundle.borrow().clone();
            check_svid(&svid, &bundle, SystemTime::now())?;
            if roots != bundle.roots {
                tracing::debug!(namespace = %pod.namespace, pod = %pod.name, "issuer's roots differ from the published bundle; serving the bundle's");
            }
            Ok(svid)
        });
        match fetched {
            Ok(svid) => {
                let received = SystemTime::now();
                let life = svid
                    .not_after()
                    .duration_since(received)
                    .unwrap_or_default();
                next_attempt = received + life / 2;
                retry = FIRST_RETRY;
                tracing::info!(namespace = %pod.namespace, pod = %pod.name, id = %svid.id(), renew_in = ?life / 2, "SVID updated");
                tx.send_replace(Some(svid));
            }
            Err(e) => {
                tracing::warn!(namespace = %pod.namespace, pod = %pod.name, error = %e, retry_in = ?retry, "could not fetch SVID");
                next_attempt = SystemTime::now() + retry;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::id::workload_id;
    use crate::svid::new_key_and_csr;

    /// Signs directly with a CA (the issuer's own signing path, without the network).
    struct DirectCa {
        ca: CertificateAuthority,
        ttl: Duration,
        failing: AtomicBool,
        calls: AtomicUsize,
    }

    #[tonic::async_trait]
    impl SvidSource for DirectCa {
        async fn fetch(
            &self,
            pod: &PodRef,
        ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(ClientError::Token("issuer down (test)".into()));
            }
            let id = workload_id(self.ca.trust_domain(), &pod.namespace, "sa").unwrap();
            let (key, csr) = new_key_and_csr().unwrap();
            let cert = self
                .ca
                .sign_csr(&csr, &id, self.ttl, SystemTime::now())
                .unwrap();
            Ok((
                Svid::new(vec![cert], key.serialize_der()).unwrap(),
                vec![self.ca.cert_der().clone()],
            ))
        }
    }

    fn pod() -> PodRef {
        PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u1".into(),
            service_account: "sa".into(),
        }
    }

    #[tokio::test]
    async fn identity_svid_is_renewed_before_expiry_and_never_served_expired() {
        let (_, ca, bundle) = crate::ca::test_ca();
        let source = Arc::new(DirectCa {
            ca,
            ttl: Duration::from_secs(4),
            failing: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let manager = SvidManager::new(source.clone(), bundle);
        manager.pod_added(pod());
        let mut rx = manager.watch("ns", "p").unwrap();

        // First SVID, then a renewal that arrives while the first is still valid.
        let first = rx.wait_for(|s| s.is_some()).await.unwrap().clone().unwrap();
        let renewed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                rx.changed().await.unwrap();
                let s = rx.borrow_and_update().clone();
                if let Some(s) = s {
                    if s.info().serial != first.info().serial {
                        return s;
                    }
                }
            }
        })
        .await
        .expect("renewed in time");
        assert!(
            SystemTime::now() < first.not_after(),
            "renewal came before the old one expired"
        );
        assert!(renewed.not_after() > first.not_after());
        // Re-adding the same pod keeps the SVID; no extra fetch.
        manager.pod_added(pod());
        assert_eq!(
            manager.svid("ns", "p").unwrap().info().serial,
            renewed.info().serial
        );

        // The issuer goes away: the SVID is withdrawn when it expires, never served after.
        source.failing.store(true, Ordering::SeqCst);
        let gone = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.is_none()))
            .await
            .expect("withdrawn in time");
        drop(gone);
        let now = SystemTime::now();
        assert!(now >= renewed.not_after(), "withdrawn only at expiry");
        assert!(
            now < renewed.not_after() + Duration::from_secs(2),
            "withdrawn promptly"
        );
        assert!(manager.svid("ns", "p").is_none());
        assert!(source.calls.load(Ordering::SeqCst) >= 3);

        // The issuer comes back: a new SVID; then the pod goes and so does its SVID.
        source.failing.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(40), rx.wait_for(|s| s.is_some()))
            .await
            .expect("recovered")
            .unwrap();
        manager.pod_removed("ns", "p");
        assert!(rx.borrow().is_none());
        assert!(manager.svid("ns", "p").is_none());
        assert!(manager.watch("ns", "p").is_none());
    }

    fn direct(ca: CertificateAuthority, ttl: Duration) -> Arc<DirectCa> {
        Arc::new(DirectCa {
            ca,
            ttl,
            failing: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        })
    }

    #[tokio::test]
    async fn hardening_manager_backs_off_when_svids_come_back_expiring() {
        let (_, ca, bundle) = crate::ca::test_ca();
        // The issuer answers with SVIDs that are already over: before, each was "renewed
        // at half its life" (at once), a hot loop of fetches.
        let source = direct(ca, Duration::ZERO);
        let manager = SvidManager::new(source.clone(), bundle);
        manager.pod_added(pod());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let calls = source.calls.load(Ordering::SeqCst);
        assert!(calls <= 4, "{calls} fetches in 2 s: no backoff");
        assert!(calls >= 2, "retried");
        assert!(manager.svid("ns", "p").is_none());
        assert!(
            manager.watch("ns", "p").unwrap().borrow().is_none(),
            "never served"
        );
    }

    #[tokio::test]
    async fn hardening_manager_serves_only_svids_and_roots_of_the_published_bundle() {
        let (_, rogue, _) = crate::ca::test_ca();
        let (_, published_ca, published) = crate::ca::test_ca();
        let rogue_root = rogue.cert_der().clone();
        // The issuer signs with (and sends the root of) a CA the published bundle lacks.
        let source = direct(rogue, Duration::from_secs(60));
        let manager = SvidManager::new(source.clone(), published.clone());
        manager.pod_added(pod());
        let bundle = manager.bundle();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(source.calls.load(Ordering::SeqCst) >= 2, "retried");
        assert!(
            manager.svid("ns", "p").is_none(),
            "unverifiable SVID served"
        );
        assert_eq!(
            *bundle.borrow(),
            published,
            "issuer's roots replaced the bundle"
        );

        // A chain that carries a CA the bundle lacks is refused even if the leaf verifies.
        let id = crate::id::workload_id(published_ca.trust_domain(), "ns", "sa").unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let leaf = published_ca
            .sign_csr(&csr, &id, Duration::from_secs(60), SystemTime::now())
            .unwrap();
        let ok = Svid::new(vec![leaf.clone()], key.serialize_der()).unwrap();
        check_svid(&ok, &published, SystemTime::now()).unwrap();
        let stray = Svid::new(vec![leaf, rogue_root.clone()], key.serialize_der()).unwrap();
        let err = check_svid(&stray, &published, SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("does not hold"), "{err}");

        // Once the bundle publishes the issuer's CA, its SVIDs are served.
        let mut both = published.clone();
        both.roots.push(rogue_root);
        manager.set_bundle(both);
        let mut rx = manager.watch("ns", "p").unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.is_some()))
            .await
            .expect("served after the bundle caught up")
            .unwrap();
    }
}
