//! Self-managed CA rotation with more than one issuer replica: exactly one rotates.
//!
//! Every replica runs [`CaMaintainer`]: each round it takes or renews the Lease
//! ([`LeaseLeadership`], `coordination.k8s.io/v1`), reloads the CA set from the Secret
//! (so a follower signs with what the leader rotated to), and only the Lease holder takes
//! a rotation step ([`CaSet::maintain`]) and stores it. A step that fails — generating
//! the CA, storing it, publishing the bundle, reaching the Lease — is retried with
//! backoff, not abandoned: a stored-but-unsaved step stays pending until it is saved or
//! the lead is lost (the new leader's stored state then wins).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

use crate::bundle::{CaSet, RotationPolicy};
use crate::id::TrustDomain;
use crate::issuer::SharedCa;
use crate::k8s::{self, KubeError};

/// The default Lease name.
pub const DEFAULT_LEASE: &str = "veil-issuer-ca";
/// First retry after a failed round; doubles up to the round interval.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Where the CA set is kept and its bundle published (the Secret and ConfigMap).
#[tonic::async_trait]
pub trait CaStore: Send + Sync + 'static {
    /// The stored set, `None` if nothing is stored.
    async fn load(&self) -> Result<Option<CaSet>, KubeError>;
    /// Stores `set` and publishes its bundle.
    async fn save(&self, set: &CaSet) -> Result<(), KubeError>;
}

/// Who may rotate.
#[tonic::async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Takes or renews the lead; whether this replica holds it now.
    async fn lead(&self) -> Result<bool, KubeError>;
}

/// Runs rotation rounds for one replica.
pub struct CaMaintainer {
    store: Arc<dyn CaStore>,
    leader: Arc<dyn Leadership>,
    policy: RotationPolicy,
    every: Duration,
    ca: SharedCa,
    steps: Arc<AtomicU64>,
    pending: Option<CaSet>,
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// Nothing to do, or a step was taken and stored.
    Done,
    /// This replica follows; it reloaded what the leader stored.
    Followed,
}

/// A failed round, retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The Lease, Secret or ConfigMap could not be read or written.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The rotation step itself failed (making the successor CA).
    #[error("rotation step: {0}")]
    Step(#[from] crate::ca::CaError),
    /// The shared CA state was poisoned by a panic elsewhere.
    #[error("CA state lock poisoned")]
    Poisoned,
}

/// Whether two sets are the same as stored (times to the second, as the Secret keeps them).
fn same(a: &CaSet, b: &CaSet) -> bool {
    let json = |s: &CaSet| serde_json::to_string(&s.to_stored()).ok();
    a.active.cert_der() == b.active.cert_der() && json(a).is_some() && json(a) == json(b)
}

impl CaMaintainer {
    /// Maintains `ca` every `every`, by `policy`.
    pub fn new(
        store: Arc<dyn CaStore>,
        leader: Arc<dyn Leadership>,
        policy: RotationPolicy,
        every: Duration,
        ca: SharedCa,
    ) -> Self {
        CaMaintainer {
            store,
            leader,
            policy,
            every,
            ca,
            steps: Arc::new(AtomicU64::new(0)),
            pending: None,
        }
    }

    /// Counts the rotation steps this replica took and stored.
    pub fn steps(&self) -> Arc<AtomicU64> {
        self.steps.clone()
    }

    /// One round at `now`.
    pub async fn round(&mut self, now: SystemTime) -> Result<Round, RoundError> {
        let leading = self.leader.lead().await?;
        if !leading {
            self.pending = None;
        }
        if let Some(set) = &mut self.pending {
            // A staged CA counts as published from when it is stored, not from when the
            // first (failed) attempt was made: agents must have had it for the whole
            // propagation time before it signs.
            if let Some((_, staged_at)) = &mut set.staged {
                *staged_at = (*staged_at).max(now);
            }
            *self.ca.write().map_err(|_| RoundError::Poisoned)? = set.clone();
            self.store.save(set).await?;
            self.pending = None;
            self.steps.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(stored) = self.store.load().await? {
            let mut current = self.ca.write().map_err(|_| RoundError::Poisoned)?;
            if !same(&current, &stored) {
                tracing::info!("CA set reloaded from its Secret");
                *current = stored;
            }
        }
        if !leading {
            return Ok(Round::Followed);
        }
        let changed = {
            let mut set = self.ca.write().map_err(|_| RoundError::Poisoned)?;
            let mut next = set.clone();
            if next.maintain(now, &self.policy)? {
                *set = next.clone();
                Some(next)
            } else {
                None
            }
        };
        if let Some(set) = changed {
            // Signed with already; stored before anything else happens, retried until it is.
            self.pending = Some(set.clone());
            self.store.save(&set).await?;
            self.pending = None;
            self.steps.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Round::Done)
    }

    /// Runs rounds forever: every `every`, or sooner with backoff after a failure.
    pub async fn run(mut self) {
        let mut retry = FIRST_RETRY.min(self.every);
        loop {
            let wait = match self.round(SystemTime::now()).await {
                Ok(_) => {
                    retry = FIRST_RETRY.min(self.every);
                    self.every
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?retry, "CA rotation round failed; retrying");
                    let wait = retry;
                    retry = (retry * 2).min(self.every);
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The CA Secret and bundle ConfigMap in the issuer's namespace.
pub struct KubeCaStore {
    /// Client with get/patch on the Secret and ConfigMap.
    pub client: kube::Client,
    /// The issuer's namespace.
    pub namespace: String,
    /// The CA Secret.
    pub secret: String,
    /// The bundle ConfigMap.
    pub configmap: String,
    /// The trust domain.
    pub trust_domain: TrustDomain,
}

#[tonic::async_trait]
impl CaStore for KubeCaStore {
    async fn load(&self) -> Result<Option<CaSet>, KubeError> {
        let name = format!("{}/{}", self.namespace, self.secret);
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&self.secret)
            .await
            .map_err(|source| KubeError::Api {
                what: format!("get Secret {name}"),
                source,
            })?;
        secret
            .map(|s| k8s::ca_set_from_secret(&s, &self.trust_domain, &name))
            .transpose()
    }

    async fn save(&self, set: &CaSet) -> Result<(), KubeError> {
        k8s::save_ca(&self.client, &self.namespace, &self.secret, set).await?;
        k8s::publish_bundle(
            &self.client,
            &self.namespace,
            &self.configmap,
            &set.bundle(),
        )
        .await
    }
}

/// Leadership by a `coordination.k8s.io/v1` Lease: held while renewed within its
/// duration; taken over only once expired, with the resourceVersion as the guard so two
/// replicas never both win.
pub struct LeaseLeadership {
    /// Client with get/create/update on the Lease.
    pub client: kube::Client,
    /// The issuer's namespace.
    pub namespace: String,
    /// The Lease name.
    pub name: String,
    /// This replica's identity (unique per replica).
    pub holder: String,
    /// How long the lead lasts without renewal.
    pub duration: Duration,
}

fn micro_now() -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())
        .ok()
        .map(MicroTime)
}

#[tonic::async_trait]
impl Leadership for LeaseLeadership {
    async fn lead(&self) -> Result<bool, KubeError> {
        let api = Api::<Lease>::namespaced(self.client.clone(), &self.namespace);
        let what = |verb: &str| format!("{verb} Lease {}/{}", self.namespace, self.name);
        let secs = i32::try_from(self.duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1);
        let existing = api
            .get_opt(&self.name)
            .await
            .map_err(|source| KubeError::Api {
                what: what("get"),
                source,
            })?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: micro_now(),
                    renew_time: micro_now(),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    tracing::info!(lease = %self.name, holder = %self.holder, "took the lease");
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(source) => Err(KubeError::Api {
                    what: what("create"),
                    source,
                }),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(d)) => {
                let end = renewed.0.as_second().saturating_add(i64::from(d.max(0)));
                k8s_openapi::jiff::Timestamp::now().as_second() > end
            }
            _ => true,
        };
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = micro_now();
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = micro_now();
        spec.lease_duration_seconds = Some(secs);
        // replace carries the resourceVersion read above: a concurrent writer makes it 409.
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    tracing::info!(lease = %self.name, holder = %self.holder, "took over the expired lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(source) => Err(KubeError::Api {
                what: what("update"),
                source,
            }),
        }
    }
}

/// A holder identity unique to this process: the host name and a random suffix.
pub fn holder_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().chars().take(200).collect::<String>())
        .unwrap_or_default();
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}_{suffix}")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Mutex, RwLock};

    use super::*;

    /// A store whose first `fail` saves fail.
    struct FlakyStore {
        saved: Mutex<Option<CaSet>>,
        fail: AtomicUsize,
        attempts: AtomicUsize,
    }

    #[tonic::async_trait]
    impl CaStore for FlakyStore {
        async fn load(&self) -> Result<Option<CaSet>, KubeError> {
            Ok(self.saved.lock().unwrap().clone())
        }
        async fn save(&self, set: &CaSet) -> Result<(), KubeError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(KubeError::Malformed {
                    secret: "test/ca".into(),
                    reason: "API server unavailable (test)".into(),
                });
            }
            *self.saved.lock().unwrap() = Some(set.clone());
            Ok(())
        }
    }

    struct Always(bool);

    #[tonic::async_trait]
    impl Leadership for Always {
        async fn lead(&self) -> Result<bool, KubeError> {
            Ok(self.0)
        }
    }

    fn policy() -> RotationPolicy {
        RotationPolicy {
            ca_lifetime: Duration::from_secs(1000),
            // Longer than the test CA's life: a successor is due at once.
            rotate_before: crate::ca::DEFAULT_CA_LIFETIME * 2,
            propagation: Duration::from_secs(100),
            svid_ttl: Duration::from_secs(100),
        }
    }

    /// Before, a rotation step whose Secret write failed was never stored: the next round
    /// found nothing to do (the in-memory set had moved on) and the step was abandoned.
    #[tokio::test]
    async fn hardening_failed_ca_rotation_step_is_retried_until_stored() {
        let (_, ca, _) = crate::ca::test_ca();
        let shared: SharedCa = Arc::new(RwLock::new(CaSet::new(ca)));
        let store = Arc::new(FlakyStore {
            saved: Mutex::new(None),
            fail: AtomicUsize::new(3),
            attempts: AtomicUsize::new(0),
        });
        let maintainer = CaMaintainer::new(
            store.clone(),
            Arc::new(Always(true)),
            policy(),
            Duration::from_secs(3600),
            shared.clone(),
        );
        let steps = maintainer.steps();
        let started = SystemTime::now();
        let task = tokio::spawn(maintainer.run());
        // Retries at 1, 2 and 4 s (backoff), not at the hourly round.
        tokio::time::timeout(Duration::from_secs(12), async {
            while store.saved.lock().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the step was stored after its failures");
        task.abort();
        assert_eq!(store.attempts.load(Ordering::SeqCst), 4);
        assert_eq!(steps.load(Ordering::SeqCst), 1);
        let saved = store.saved.lock().unwrap().clone().unwrap();
        let staged_at = saved
            .staged
            .as_ref()
            .expect("the staged successor was stored")
            .1;
        // Stored after failures at about 0, 1, 3 s: its propagation counts from then.
        assert!(
            staged_at >= started + Duration::from_secs(6),
            "staged time is the time it was stored"
        );
        assert!(same(&saved, &shared.read().unwrap()));
    }

    #[tokio::test]
    async fn hardening_follower_never_rotates_and_takes_the_stored_set() {
        let (_, ca, _) = crate::ca::test_ca();
        let (_, other, _) = crate::ca::test_ca();
        let stored = CaSet::new(other);
        let store = Arc::new(FlakyStore {
            saved: Mutex::new(Some(stored.clone())),
            fail: AtomicUsize::new(0),
            attempts: AtomicUsize::new(0),
        });
        let shared: SharedCa = Arc::new(RwLock::new(CaSet::new(ca)));
        let mut follower = CaMaintainer::new(
            store.clone(),
            Arc::new(Always(false)),
            policy(),
            Duration::from_secs(60),
            shared.clone(),
        );
        assert_eq!(
            follower.round(SystemTime::now()).await.unwrap(),
            Round::Followed
        );
        assert_eq!(
            store.attempts.load(Ordering::SeqCst),
            0,
            "a follower stores nothing"
        );
        assert!(
            same(&shared.read().unwrap(), &stored),
            "follower signs with the stored set"
        );
    }
}
