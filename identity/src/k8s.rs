//! The issuer's Kubernetes side: TokenReview, pod look-ups, the CA Secret and the trust
//! bundle ConfigMap.
//!
//! RBAC the issuer needs: `create` on `tokenreviews` (as `system:auth-delegator` grants),
//! `get` on `pods`, and in its own namespace `get`/`create`/`patch` on its CA Secret and
//! on the bundle ConfigMap, and `get`/`create`/`update` on the `coordination.k8s.io`
//! Lease that picks the one replica that rotates the CA ([`crate::rotation`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;

use crate::bundle::{CaSet, StoredCaSet, TrustBundle};
use crate::ca::{CaError, CertificateAuthority};
use crate::id::TrustDomain;
use crate::issuer::{Authenticator, Caller, PodDirectory, PodFacts, Refusal, NODE_NAME_EXTRA};

/// How long a successful token review is reused: short, so a deleted pod's token stops
/// working soon (the API server rejects it from then on).
pub const TOKEN_REVIEW_CACHE: Duration = Duration::from_secs(10);
/// Most successful reviews cached at once (one per agent token; a full cache is cleared).
pub const MAX_CACHED_REVIEWS: usize = 4096;
/// The Secret key that holds a self-managed CA set.
pub const CA_SECRET_KEY: &str = "ca.json";
/// The ConfigMap key with the trust bundle, PEM.
pub const BUNDLE_KEY: &str = "bundle.pem";
/// The ConfigMap key with the trust domain name.
pub const TRUST_DOMAIN_KEY: &str = "trust-domain";

/// Something the API server did not do.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done (names the object).
        what: String,
        /// kube's error.
        source: kube::Error,
    },
    /// The stored CA is unusable.
    #[error("CA in Secret {secret}: {source}")]
    Ca {
        /// `namespace/name`.
        secret: String,
        /// Why.
        source: CaError,
    },
    /// The stored data is malformed.
    #[error("Secret {secret}: {reason}")]
    Malformed {
        /// `namespace/name`.
        secret: String,
        /// Why.
        reason: String,
    },
}

/// Authenticates bearer tokens with the API server's TokenReview, for `audiences`.
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    cache: Mutex<HashMap<Vec<u8>, (Caller, Instant)>>,
}

impl TokenReviewAuthenticator {
    /// Reviews with `client` (which needs `create` on `tokenreviews`).
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        TokenReviewAuthenticator {
            client,
            audiences,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

/// The caller a finished TokenReview names, if it authenticated the token for one of
/// `audiences` and for nothing else. The API server answers `status.audiences` with the
/// requested audiences the token is valid for; an empty answer means the authenticator
/// did not check audiences at all, which is refused too.
pub fn caller_from_review(
    status: TokenReviewStatus,
    audiences: &[String],
) -> Result<Caller, Refusal> {
    if status.authenticated != Some(true) {
        let why = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::unauthenticated(format!(
            "token rejected: {}",
            crate::issuer::clip(&why)
        )));
    }
    let returned = status.audiences.unwrap_or_default();
    if returned.is_empty()
        || returned.iter().any(|a| !audiences.contains(a))
        || !audiences.iter().any(|a| returned.contains(a))
    {
        return Err(Refusal::unauthenticated(format!(
            "token is not for audience {:?} (the review confirmed {} audience(s))",
            audiences,
            returned.len()
        )));
    }
    let user = status.user.unwrap_or_default();
    let node = user
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .and_then(|v| v.first().cloned());
    Ok(Caller {
        username: user.username.unwrap_or_default(),
        node,
    })
}

fn token_key(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let key = token_key(token);
        if let Ok(mut cache) = self.cache.lock() {
            let now = Instant::now();
            cache.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_REVIEW_CACHE);
            if let Some((caller, _)) = cache.get(&key) {
                return Ok(caller.clone());
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let done = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::unavailable(format!("TokenReview failed: {e}")))?;
        let caller = caller_from_review(done.status.unwrap_or_default(), &self.audiences)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHED_REVIEWS {
                cache.clear();
            }
            cache.insert(key, (caller.clone(), Instant::now()));
        }
        Ok(caller)
    }
}

/// Looks pods up with GET (fresh every time: a deleted pod is gone at once).
pub struct KubePods {
    client: kube::Client,
}

impl KubePods {
    /// Uses `client` (which needs `get` on `pods`).
    pub fn new(client: kube::Client) -> Self {
        KubePods { client }
    }
}

#[tonic::async_trait]
impl PodDirectory for KubePods {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodFacts>, Refusal> {
        if namespace.is_empty() || name.is_empty() {
            return Ok(None);
        }
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| Refusal::unavailable(format!("get pod {namespace}/{name}: {e}")))?;
        Ok(pod.map(|p| {
            let spec = p.spec.unwrap_or_default();
            PodFacts {
                uid: p.metadata.uid.unwrap_or_default(),
                node: spec.node_name.unwrap_or_default(),
                service_account: spec
                    .service_account_name
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
                phase: p.status.and_then(|s| s.phase).unwrap_or_default(),
            }
        }))
    }
}

fn api_err(what: String) -> impl FnOnce(kube::Error) -> KubeError {
    move |source| KubeError::Api { what, source }
}

/// Reads the self-managed CA set from Secret `namespace/name`, or makes a CA and stores
/// it there on first start (if two issuers race, the loser reads the winner's).
pub async fn load_or_create_ca(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    td: &TrustDomain,
    ca_lifetime: Duration,
) -> Result<CaSet, KubeError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let secret_name = format!("{namespace}/{name}");
    for _ in 0..2 {
        if let Some(secret) = secrets
            .get_opt(name)
            .await
            .map_err(api_err(format!("get Secret {secret_name}")))?
        {
            return ca_set_from_secret(&secret, td, &secret_name);
        }
        let ca = CertificateAuthority::generate(td, ca_lifetime, std::time::SystemTime::now())
            .map_err(|source| KubeError::Ca {
                secret: secret_name.clone(),
                source,
            })?;
        let set = CaSet::new(ca);
        match secrets
            .create(&PostParams::default(), &ca_secret(name, &set))
            .await
        {
            Ok(_) => {
                tracing::info!(secret = %secret_name, trust_domain = %td, "created a self-signed CA");
                return Ok(set);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(api_err(format!("create Secret {secret_name}"))(e)),
        }
    }
    Err(KubeError::Malformed {
        secret: secret_name,
        reason: "created by someone else but not readable".into(),
    })
}

fn ca_secret(name: &str, set: &CaSet) -> Secret {
    let json = serde_json::to_vec(&set.to_stored()).expect("CA set serialises");
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "veil".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(CA_SECRET_KEY.into(), ByteString(json))])),
        ..Default::default()
    }
}

pub(crate) fn ca_set_from_secret(
    secret: &Secret,
    td: &TrustDomain,
    name: &str,
) -> Result<CaSet, KubeError> {
    let data = secret.data.as_ref();
    let malformed = |reason: String| KubeError::Malformed {
        secret: name.into(),
        reason,
    };
    if let Some(json) = data.and_then(|d| d.get(CA_SECRET_KEY)) {
        let stored: StoredCaSet =
            serde_json::from_slice(&json.0).map_err(|e| malformed(e.to_string()))?;
        return CaSet::from_stored(td, &stored).map_err(|source| KubeError::Ca {
            secret: name.into(),
            source,
        });
    }
    // An operator-provided CA in the usual `kubernetes.io/tls` shape.
    let get = |k: &str| {
        data.and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| malformed(format!("has neither {CA_SECRET_KEY} nor {k}")))
    };
    let ca = CertificateAuthority::from_pem(td, &get("tls.crt")?, &get("tls.key")?).map_err(
        |source| KubeError::Ca {
            secret: name.into(),
            source,
        },
    )?;
    Ok(CaSet::new(ca))
}

/// Reads an operator-provided CA from Secret `namespace/name` (`tls.crt`, `tls.key`).
pub async fn load_operator_ca(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    td: &TrustDomain,
) -> Result<CaSet, KubeError> {
    let secret_name = format!("{namespace}/{name}");
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(api_err(format!("get Secret {secret_name}")))?;
    ca_set_from_secret(&secret, td, &secret_name)
}

/// Writes the self-managed CA set back (after a rotation step).
pub async fn save_ca(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    set: &CaSet,
) -> Result<(), KubeError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    secrets
        .patch(
            name,
            &PatchParams::apply("veil-issuer").force(),
            &Patch::Apply(&ca_secret(name, set)),
        )
        .await
        .map_err(api_err(format!("apply Secret {namespace}/{name}")))?;
    Ok(())
}

/// Publishes `bundle` in ConfigMap `namespace/name` (server-side apply) for agents.
pub async fn publish_bundle(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    bundle: &TrustBundle,
) -> Result<(), KubeError> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "veil".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (BUNDLE_KEY.to_string(), bundle.to_pem()),
            (
                TRUST_DOMAIN_KEY.to_string(),
                bundle.trust_domain.as_str().to_string(),
            ),
        ])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("veil-issuer").force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(api_err(format!("apply ConfigMap {namespace}/{name}")))?;
    tracing::info!(configmap = %format!("{namespace}/{name}"), roots = bundle.roots.len(), "published trust bundle");
    Ok(())
}

/// Reads the trust bundle an issuer published (what an agent does at start).
pub async fn read_bundle(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<TrustBundle, KubeError> {
    let what = format!("ConfigMap {namespace}/{name}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(api_err(format!("get {what}")))?;
    let data = cm.data.unwrap_or_default();
    let malformed = |reason: &str| KubeError::Malformed {
        secret: what.clone(),
        reason: reason.into(),
    };
    let td = data
        .get(TRUST_DOMAIN_KEY)
        .ok_or_else(|| malformed("no trust-domain"))?;
    let td = crate::id::trust_domain(td).map_err(|e| malformed(&e.to_string()))?;
    let pem = data
        .get(BUNDLE_KEY)
        .ok_or_else(|| malformed("no bundle.pem"))?;
    TrustBundle::from_pem(td, pem).map_err(|e| malformed(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn review(authenticated: bool, audiences: Option<Vec<&str>>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:veil-system:veil-agent".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Before, an authenticated review was taken whatever audiences it confirmed; an
    /// audience-unaware authenticator (empty `status.audiences`) or a token for another
    /// audience got through.
    #[test]
    fn hardening_token_review_must_confirm_the_issuers_audience_only() {
        let ours = vec!["veil-issuer".to_string()];
        assert!(caller_from_review(review(true, Some(vec!["veil-issuer"])), &ours).is_ok());
        for status in [
            review(true, None),
            review(true, Some(vec![])),
            review(true, Some(vec!["https://kubernetes.default.svc"])),
            review(true, Some(vec!["veil-issuer", "other"])),
            review(false, Some(vec!["veil-issuer"])),
        ] {
            let refused = caller_from_review(status.clone(), &ours).unwrap_err();
            assert_eq!(refused.code, tonic::Code::Unauthenticated, "{status:?}");
        }
    }
}
