//! The certificate authority: a signing certificate and key that sign X.509-SVIDs as the
//! X509-SVID specification asks (the SPIFFE ID as the only URI SAN, `cA` false, a
//! critical key usage with `digitalSignature` and neither `keyCertSign` nor `cRLSign`,
//! server and client auth), from a PKCS#10 CSR whose public key is all that is used.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::id::{SpiffeId, TrustDomain};

/// How long a self-made CA is valid: a year, rotated well before it ends.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `notBefore` is set in the past, so a peer whose clock lags a little accepts a
/// fresh certificate (SPIRE uses the same margin).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// What went wrong making, loading or using a CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen could not build, parse or sign.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being done.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The CA certificate could not be parsed.
    #[error("CA certificate: {0}")]
    Parse(String),
    /// The certificate given as the CA is not a CA.
    #[error("the CA certificate is not a CA (basicConstraints cA is not true)")]
    NotCa,
    /// The key given does not belong to the CA certificate.
    #[error("the CA key does not match the CA certificate's public key")]
    KeyMismatch,
    /// The SPIFFE ID to sign lies outside the CA's trust domain.
    #[error("{id} is not in trust domain {trust_domain}; this CA signs only its own")]
    ForeignTrustDomain {
        /// The ID asked for.
        id: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The CA has expired or expires before anything could be signed.
    #[error("the CA certificate is not valid now (valid until {not_after:?})")]
    Expired {
        /// When it ends.
        not_after: SystemTime,
    },
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Rcgen { what, source }
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("system randomness");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, never negative
    SerialNumber::from_slice(&bytes)
}

/// A certificate authority that signs X.509-SVIDs of one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Makes a self-signed CA (ECDSA P-256) for `td`, valid from `now` for `lifetime`.
    pub fn generate(
        td: &TrustDomain,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "veil");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("veil {} CA", td.as_str()));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // The X509-SVID spec: a signing certificate SHOULD carry its trust domain's ID.
        params.subject_alt_names = vec![SanType::URI(
            td.id_string().try_into().map_err(rcgen_err("CA URI SAN"))?,
        )];
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign CA"))?;
        Self::from_pem(td, &cert.pem(), &key.serialize_pem())
    }

    /// Loads a CA from PEM (certificate, and its key in PKCS#8, SEC1 or PKCS#1 form).
    pub fn from_pem(td: &TrustDomain, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls::pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::Parse(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err("parse CA key"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::Parse(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(CaError::NotCa);
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let not_after = crate::svid::asn1_to_system(parsed.validity().not_after);
        let signing_key = KeyPair::from_pem(key_pem).map_err(rcgen_err("parse CA key"))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, signing_key)
            .map_err(rcgen_err("load CA certificate"))?;
        Ok(CertificateAuthority {
            trust_domain: td.clone(),
            cert_der: cert_der.into_owned(),
            cert_pem: cert_pem.to_string(),
            key_pem: key.serialize_pem(),
            not_after,
            issuer,
        })
    }

    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PKCS#8 PEM (only the issuer's Secret ever holds it).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the CA certificate ends.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs an X.509-SVID naming `id` for the public key of a PKCS#10 CSR (DER), whose
    /// signature must verify. Subject, extensions and SANs the CSR asks for are ignored.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(rcgen_err("parse CSR"))?;
        self.sign_public_key(&csr.public_key, id, ttl, now)
    }

    /// Signs an X.509-SVID naming `id` for `public_key`, valid for `ttl` from `now` but
    /// never past the CA's own end.
    pub fn sign_public_key(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.as_str().to_string(),
            });
        }
        if now >= self.not_after {
            return Err(CaError::Expired {
                not_after: self.not_after,
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "veil");
        params.subject_alt_names = vec![SanType::URI(
            id.to_string().try_into().map_err(rcgen_err("URI SAN"))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = std::cmp::min(now + ttl, self.not_after).into();
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err("sign SVID"))?;
        Ok(cert.der().clone())
    }
}

/// A fresh CA for `cluster.local`, a trust bundle holding it, and the trust domain, for
/// unit tests. `CaSet` takes a CA by value; the one returned is a copy read back from its
/// PEM, kept to sign with.
#[cfg(test)]
pub(crate) fn test_ca() -> (TrustDomain, CertificateAuthority, crate::TrustBundle) {
    let td = crate::trust_domain("cluster.local").unwrap();
    let ca = CertificateAuthority::generate(&td, DEFAULT_CA_LIFETIME, SystemTime::now()).unwrap();
    let copy = CertificateAuthority::from_pem(&td, ca.cert_pem(), ca.key_pem()).unwrap();
    let bundle = crate::CaSet::new(copy).bundle();
    (td, ca, bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{trust_domain, workload_id};
    use crate::svid::{new_key_and_csr, parse_svid};
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn td() -> TrustDomain {
        trust_domain("cluster.local").unwrap()
    }

    #[test]
    fn identity_svid_follows_the_x509_svid_spec() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(&td(), DEFAULT_CA_LIFETIME, now).unwrap();
        let id = workload_id(&td(), "shop", "checkout").unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let der = ca
            .sign_csr(&csr, &id, Duration::from_secs(3600), now)
            .unwrap();

        let info = parse_svid(&der).unwrap();
        assert_eq!(info.id, id);
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(lifetime.as_secs(), 3600 + BACKDATE.as_secs());

        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut uri_sans = Vec::new();
        let mut other_sans = 0;
        let (mut ku_seen, mut eku_seen, mut bc_seen) = (false, false, false);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        match n {
                            GeneralName::URI(u) => uri_sans.push(u.to_string()),
                            _ => other_sans += 1,
                        }
                    }
                }
                ParsedExtension::KeyUsage(ku) => {
                    ku_seen = true;
                    assert!(ext.critical, "key usage must be critical");
                    assert!(ku.digital_signature());
                    assert!(!ku.key_cert_sign() && !ku.crl_sign());
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    eku_seen = true;
                    assert!(eku.server_auth && eku.client_auth);
                }
                ParsedExtension::BasicConstraints(bc) => {
                    bc_seen = true;
                    assert!(!bc.ca);
                }
                _ => {}
            }
        }
        assert_eq!(
            uri_sans,
            vec![id.to_string()],
            "the SPIFFE ID is the only URI SAN"
        );
        assert_eq!(other_sans, 0);
        assert!(ku_seen && eku_seen && bc_seen);
        // Signed by the CA.
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
    }

    #[test]
    fn identity_ca_certificate_is_a_spiffe_signing_certificate() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(&td(), DEFAULT_CA_LIFETIME, now).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local")]
        );
        // A reloaded CA signs the same way; a wrong key is refused.
        let again = CertificateAuthority::from_pem(&td(), ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        let other = CertificateAuthority::generate(&td(), DEFAULT_CA_LIFETIME, now).unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&td(), ca.cert_pem(), other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
    }

    #[test]
    fn identity_svid_never_outlives_its_ca_and_bad_csrs_are_refused() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(&td(), Duration::from_secs(600), now).unwrap();
        let id = workload_id(&td(), "a", "b").unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let der = ca
            .sign_csr(&csr, &id, Duration::from_secs(3600), now)
            .unwrap();
        let info = parse_svid(&der).unwrap();
        assert!(info.not_after <= ca.not_after());
        // A CSR with a broken signature.
        let mut forged = csr.clone();
        let last = forged.len() - 3;
        forged[last] ^= 0xff;
        assert!(ca
            .sign_csr(&forged, &id, Duration::from_secs(60), now)
            .is_err());
        assert!(ca
            .sign_csr(b"junk", &id, Duration::from_secs(60), now)
            .is_err());
        // An expired CA signs nothing.
        assert!(matches!(
            ca.sign_csr(
                &csr,
                &id,
                Duration::from_secs(60),
                now + Duration::from_secs(601)
            ),
            Err(CaError::Expired { .. })
        ));
    }

    #[test]
    fn identity_serials_are_unique() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(&td(), DEFAULT_CA_LIFETIME, now).unwrap();
        let id = workload_id(&td(), "a", "b").unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let a = parse_svid(
            &ca.sign_csr(&csr, &id, Duration::from_secs(60), now)
                .unwrap(),
        )
        .unwrap();
        let b = parse_svid(
            &ca.sign_csr(&csr, &id, Duration::from_secs(60), now)
                .unwrap(),
        )
        .unwrap();
        assert_ne!(a.serial, b.serial);
    }

    /// Every type that holds CA or SVID key material, formatted with `{:?}` (and `{:#?}`),
    /// shows none of it: not the PEM, not its base64 body, not the DER bytes.
    #[test]
    fn hardening_no_key_material_in_debug_output() {
        use crate::bundle::{CaSet, RotationPolicy};
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(&td(), DEFAULT_CA_LIFETIME, now).unwrap();
        let ca_key_pem = ca.key_pem().to_string();
        let mut set =
            CaSet::new(CertificateAuthority::from_pem(&td(), ca.cert_pem(), &ca_key_pem).unwrap());
        // A staged successor too, so both keys of a set are looked for.
        let policy = RotationPolicy {
            ca_lifetime: DEFAULT_CA_LIFETIME,
            rotate_before: DEFAULT_CA_LIFETIME * 2,
            propagation: Duration::from_secs(60),
            svid_ttl: Duration::from_secs(60),
        };
        assert!(set.maintain(now, &policy).unwrap());
        let staged_key_pem = set.staged.as_ref().unwrap().0.key_pem().to_string();
        let stored = set.to_stored();

        let id = workload_id(&td(), "a", "b").unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let cert = ca
            .sign_csr(&csr, &id, Duration::from_secs(60), now)
            .unwrap();
        let svid = crate::Svid::new(vec![cert], key.serialize_der()).unwrap();
        let resolver = crate::tls::SvidCertResolver::new(&svid).unwrap();

        let formatted = [
            format!("{ca:?}"),
            format!("{ca:#?}"),
            format!("{set:?}"),
            format!("{set:#?}"),
            format!("{stored:?}"),
            format!("{stored:#?}"),
            format!("{:?}", stored.active),
            format!("{svid:?}"),
            format!("{svid:#?}"),
            format!("{resolver:?}"),
        ]
        .join("\n");
        let key_ders = [
            pem_body_der(&ca_key_pem),
            pem_body_der(&staged_key_pem),
            svid.key_pkcs8().to_vec(),
        ];
        for pem in [&ca_key_pem, &staged_key_pem] {
            for line in pem
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 16)
            {
                assert!(!formatted.contains(line), "PEM key line in Debug output");
            }
        }
        for der in &key_ders {
            let as_debug = format!("{der:?}");
            let inner = &as_debug[1..as_debug.len() - 1];
            assert!(!formatted.contains(inner), "DER key bytes in Debug output");
            let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
            assert!(!formatted.contains(&hex), "hex key bytes in Debug output");
        }
        assert!(!formatted.contains("PRIVATE KEY"));
    }

    fn pem_body_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn hardening_ca_refuses_ids_outside_its_trust_domain() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate(&td(), DEFAULT_CA_LIFETIME, now).unwrap();
        let other = trust_domain("evil.example").unwrap();
        let foreign = workload_id(&other, "a", "b").unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let refused = ca.sign_csr(&csr, &foreign, Duration::from_secs(60), now);
        assert!(
            matches!(refused, Err(CaError::ForeignTrustDomain { .. })),
            "{refused:?}"
        );
        let own = workload_id(&td(), "a", "b").unwrap();
        ca.sign_csr(&csr, &own, Duration::from_secs(60), now)
            .unwrap();
    }
}
