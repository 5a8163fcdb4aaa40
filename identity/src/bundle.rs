//! Trust bundles (the roots of a trust domain) and the CA set behind them: the active CA,
//! a staged successor already published in the bundle, and retired roots kept until
//! every SVID they signed has expired, so rotation never breaks a valid SVID.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::ca::{CaError, CertificateAuthority};
use crate::id::TrustDomain;

/// The roots that verify SVIDs of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Root certificates, DER; the newest first.
    pub roots: Vec<CertificateDer<'static>>,
}

/// A bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The PEM text holds something other than certificates, or is broken.
    #[error("trust bundle PEM: {0}")]
    Pem(String),
    /// The PEM text holds no certificate.
    #[error("trust bundle holds no certificate")]
    Empty,
}

impl TrustBundle {
    /// Reads a bundle from concatenated PEM certificates.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.map(|c| c.into_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(TrustBundle {
            trust_domain,
            roots,
        })
    }

    /// The bundle as concatenated PEM certificates.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|c| der_to_pem(c)).collect()
    }

    /// The roots' DER concatenated, as the Workload API sends a bundle.
    pub fn concatenated_der(&self) -> Vec<u8> {
        self.roots.iter().flat_map(|c| c.iter().copied()).collect()
    }
}

/// One certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A root no longer signing but still trusted until `retire_at`.
#[derive(Debug, Clone)]
pub struct RetainedRoot {
    /// The root certificate, DER.
    pub cert: CertificateDer<'static>,
    /// When it leaves the bundle: the end of the last SVID it signed.
    pub retire_at: SystemTime,
}

/// The issuer's CAs: one active, perhaps one staged (published, not yet signing), and
/// retired roots kept for overlap.
#[derive(Debug, Clone)]
pub struct CaSet {
    /// Signs SVIDs now.
    pub active: Arc<CertificateAuthority>,
    /// Its successor and when it was staged: in the bundle already, signing from promotion.
    pub staged: Option<(Arc<CertificateAuthority>, SystemTime)>,
    /// Former active roots still trusted.
    pub retained: Vec<RetainedRoot>,
}

/// When the issuer rotates its own CA.
#[derive(Debug, Clone, Copy)]
pub struct RotationPolicy {
    /// Lifetime of a CA the issuer makes.
    pub ca_lifetime: Duration,
    /// Stage a successor when the active CA has less than this left.
    pub rotate_before: Duration,
    /// How long a staged CA is published before it signs (agents must have it first).
    pub propagation: Duration,
    /// The longest SVID lifetime: how long a replaced root stays trusted.
    pub svid_ttl: Duration,
}

impl CaSet {
    /// A set with only `active`.
    pub fn new(active: CertificateAuthority) -> Self {
        CaSet {
            active: Arc::new(active),
            staged: None,
            retained: Vec::new(),
        }
    }

    /// The trust bundle: staged, active and retained roots, newest first.
    pub fn bundle(&self) -> TrustBundle {
        let mut roots = Vec::new();
        if let Some((staged, _)) = &self.staged {
            roots.push(staged.cert_der().clone());
        }
        roots.push(self.active.cert_der().clone());
        roots.extend(self.retained.iter().map(|r| r.cert.clone()));
        TrustBundle {
            trust_domain: self.active.trust_domain().clone(),
            roots,
        }
    }

    /// Publishes `next` in the bundle without signing with it yet.
    pub fn stage(&mut self, next: CertificateAuthority, now: SystemTime) {
        self.staged = Some((Arc::new(next), now));
    }

    /// Makes the staged CA active; the old root stays trusted for `svid_ttl` (plus the
    /// backdating margin) so every SVID it signed verifies until it expires.
    pub fn promote(&mut self, now: SystemTime, svid_ttl: Duration) -> bool {
        let Some((next, _)) = self.staged.take() else {
            return false;
        };
        let old = std::mem::replace(&mut self.active, next);
        self.retained.insert(
            0,
            RetainedRoot {
                cert: old.cert_der().clone(),
                retire_at: now + svid_ttl + crate::ca::BACKDATE,
            },
        );
        true
    }

    /// Drops retained roots whose time is up; true if any went.
    pub fn prune(&mut self, now: SystemTime) -> bool {
        let before = self.retained.len();
        self.retained.retain(|r| r.retire_at > now);
        before != self.retained.len()
    }

    /// One step of self-managed rotation at `now`: stage a successor when the active CA
    /// nears its end, promote it once it has been published for `propagation`, prune.
    /// Returns whether anything changed (so the caller persists and republishes).
    pub fn maintain(&mut self, now: SystemTime, policy: &RotationPolicy) -> Result<bool, CaError> {
        let mut changed = self.prune(now);
        match &self.staged {
            None => {
                let left = self
                    .active
                    .not_after()
                    .duration_since(now)
                    .unwrap_or_default();
                if left < policy.rotate_before {
                    let next = CertificateAuthority::generate(
                        self.active.trust_domain(),
                        policy.ca_lifetime,
                        now,
                    )?;
                    tracing::info!(trust_domain = %self.active.trust_domain(), "staged a new CA");
                    self.stage(next, now);
                    changed = true;
                }
            }
            Some((_, staged_at)) => {
                if now.duration_since(*staged_at).unwrap_or_default() >= policy.propagation {
                    self.promote(now, policy.svid_ttl);
                    tracing::info!(trust_domain = %self.active.trust_domain(), "promoted the staged CA");
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    /// Serialises the set (keys included) for the issuer's Secret.
    pub fn to_stored(&self) -> StoredCaSet {
        StoredCaSet {
            active: StoredCa {
                cert: self.active.cert_pem().into(),
                key: self.active.key_pem().into(),
                staged_at: None,
            },
            staged: self.staged.as_ref().map(|(ca, at)| StoredCa {
                cert: ca.cert_pem().into(),
                key: ca.key_pem().into(),
                staged_at: Some(unix(*at)),
            }),
            retained: self
                .retained
                .iter()
                .map(|r| StoredRoot {
                    cert: der_to_pem(&r.cert),
                    retire_at: unix(r.retire_at),
                })
                .collect(),
        }
    }

    /// Reads a set back from what [`CaSet::to_stored`] made.
    pub fn from_stored(td: &TrustDomain, stored: &StoredCaSet) -> Result<Self, CaError> {
        let active = CertificateAuthority::from_pem(td, &stored.active.cert, &stored.active.key)?;
        let staged = match &stored.staged {
            Some(s) => Some((
                Arc::new(CertificateAuthority::from_pem(td, &s.cert, &s.key)?),
                from_unix(s.staged_at.unwrap_or(0)),
            )),
            None => None,
        };
        let retained = stored
            .retained
            .iter()
            .map(|r| {
                Ok(RetainedRoot {
                    cert: CertificateDer::from_pem_slice(r.cert.as_bytes())
                        .map_err(|e| CaError::Parse(e.to_string()))?
                        .into_owned(),
                    retire_at: from_unix(r.retire_at),
                })
            })
            .collect::<Result<_, CaError>>()?;
        Ok(CaSet {
            active: Arc::new(active),
            staged,
            retained,
        })
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

/// A CA as the issuer's Secret stores it (PEM). Its `Debug` leaves the key out.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredCa {
    /// Certificate, PEM.
    pub cert: String,
    /// Key, PKCS#8 PEM.
    pub key: String,
    /// When it was staged (unix seconds), for a staged CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_at: Option<u64>,
}

impl std::fmt::Debug for StoredCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCa")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .field("staged_at", &self.staged_at)
            .finish()
    }
}

/// A retained root as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRoot {
    /// Certificate, PEM.
    pub cert: String,
    /// Unix seconds when it leaves the bundle.
    pub retire_at: u64,
}

/// The whole CA set as stored under the Secret's `ca.json` key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredCaSet {
    /// The active CA.
    pub active: StoredCa,
    /// The staged CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StoredCa>,
    /// Retained roots.
    #[serde(default)]
    pub retained: Vec<StoredRoot>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::DEFAULT_CA_LIFETIME;
    use crate::id::trust_domain;

    #[test]
    fn identity_ca_rotation_overlaps_old_and_new_roots() {
        let td = trust_domain("cluster.local").unwrap();
        let t0 = SystemTime::now();
        let policy = RotationPolicy {
            ca_lifetime: Duration::from_secs(1000),
            rotate_before: Duration::from_secs(300),
            propagation: Duration::from_secs(60),
            svid_ttl: Duration::from_secs(100),
        };
        let first = CertificateAuthority::generate(&td, policy.ca_lifetime, t0).unwrap();
        let first_root = first.cert_der().clone();
        let mut set = CaSet::new(first);
        assert!(
            !set.maintain(t0, &policy).unwrap(),
            "young CA: nothing to do"
        );
        assert_eq!(set.bundle().roots, vec![first_root.clone()]);

        // Near its end a successor is staged: published, not yet signing.
        let t1 = t0 + Duration::from_secs(750);
        assert!(set.maintain(t1, &policy).unwrap());
        let staged_root = set.staged.as_ref().unwrap().0.cert_der().clone();
        assert_eq!(set.active.cert_der(), &first_root);
        assert_eq!(
            set.bundle().roots,
            vec![staged_root.clone(), first_root.clone()]
        );

        // After propagation it signs; the old root stays for one SVID lifetime.
        let t2 = t1 + Duration::from_secs(60);
        assert!(set.maintain(t2, &policy).unwrap());
        assert_eq!(set.active.cert_der(), &staged_root);
        assert_eq!(
            set.bundle().roots,
            vec![staged_root.clone(), first_root.clone()]
        );

        // Round trip through the stored form keeps all of it.
        let stored = serde_json::to_string(&set.to_stored()).unwrap();
        let back = CaSet::from_stored(&td, &serde_json::from_str(&stored).unwrap()).unwrap();
        assert_eq!(back.bundle(), set.bundle());

        // Once every SVID of the old CA has expired, its root leaves the bundle.
        let t3 = t2 + policy.svid_ttl + crate::ca::BACKDATE + Duration::from_secs(1);
        assert!(set.maintain(t3, &policy).unwrap());
        assert_eq!(set.bundle().roots, vec![staged_root]);
        let _ = DEFAULT_CA_LIFETIME;
    }

    #[test]
    fn identity_bundle_pem_round_trip() {
        let td = trust_domain("cluster.local").unwrap();
        let ca =
            CertificateAuthority::generate(&td, DEFAULT_CA_LIFETIME, SystemTime::now()).unwrap();
        let set = CaSet::new(ca);
        let pem = set.bundle().to_pem();
        assert_eq!(
            TrustBundle::from_pem(td.clone(), &pem).unwrap(),
            set.bundle()
        );
        assert!(TrustBundle::from_pem(td, "nothing").is_err());
    }
}
