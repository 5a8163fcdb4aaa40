//! X.509-SVIDs: the key pair an agent makes per pod, its CSR, the signed certificate
//! chain, and the X509-SVID specification's checks on a leaf certificate (x509-parser).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::id::{parse_id, SpiffeId};

/// Why a certificate is not an acceptable X.509-SVID.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// x509-parser could not parse it.
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    /// It has no URI SAN, or more than one.
    #[error("an X.509-SVID has exactly one URI SAN; this one has {0}")]
    UriSanCount(usize),
    /// Its URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    BadId(String),
    /// It is a CA certificate.
    #[error("a leaf X.509-SVID must have basicConstraints cA=false")]
    IsCa,
    /// Its key usage is missing, not critical, lacks digitalSignature or allows signing
    /// certificates or CRLs.
    #[error("key usage: {0}")]
    KeyUsage(&'static str),
    /// The certificate chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// Key generation or CSR serialisation failed.
    #[error("make key or CSR: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What an X.509-SVID says, read back from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The SPIFFE ID (the only URI SAN).
    pub id: SpiffeId,
    /// `notBefore`.
    pub not_before: SystemTime,
    /// `notAfter`.
    pub not_after: SystemTime,
    /// The serial number, big-endian.
    pub serial: Vec<u8>,
}

pub(crate) fn asn1_to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Parses a leaf X.509-SVID and checks it as the X509-SVID specification requires of a
/// leaf: one URI SAN holding a valid SPIFFE ID, `cA` false, a critical key usage with
/// `digitalSignature` and without `keyCertSign` or `cRLSign`.
pub fn parse_svid(der: &[u8]) -> Result<SvidInfo, SvidError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| SvidError::Parse(e.to_string()))?;
    let mut uris = Vec::new();
    let mut key_usage = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push(uri.to_string());
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => key_usage = Some((ext.critical, *ku)),
            _ => {}
        }
    }
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    let id = parse_id(&uris[0]).map_err(|e| SvidError::BadId(e.to_string()))?;
    if cert.is_ca() {
        return Err(SvidError::IsCa);
    }
    match key_usage {
        None => return Err(SvidError::KeyUsage("missing")),
        Some((false, _)) => return Err(SvidError::KeyUsage("not critical")),
        Some((true, ku)) => {
            if !ku.digital_signature() {
                return Err(SvidError::KeyUsage("no digitalSignature"));
            }
            if ku.key_cert_sign() || ku.crl_sign() {
                return Err(SvidError::KeyUsage("keyCertSign or cRLSign set on a leaf"));
            }
        }
    }
    Ok(SvidInfo {
        id,
        not_before: asn1_to_system(cert.validity().not_before),
        not_after: asn1_to_system(cert.validity().not_after),
        serial: cert.raw_serial().to_vec(),
    })
}

/// A fresh key pair (ECDSA P-256) and a PKCS#10 CSR for it, DER. The issuer uses only
/// the CSR's public key (after checking its signature), so the CSR names nothing.
pub fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), SvidError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// An X.509-SVID with its private key: what a workload gets and what a proxy presents.
#[derive(Clone)]
pub struct Svid {
    info: SvidInfo,
    chain: Vec<CertificateDer<'static>>,
    key: std::sync::Arc<PrivatePkcs8KeyDer<'static>>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.info.id.to_string())
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Builds an SVID from a chain (leaf first) and the leaf's PKCS#8 private key,
    /// checking the leaf.
    pub fn new(chain: Vec<CertificateDer<'static>>, key_pkcs8: Vec<u8>) -> Result<Svid, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let info = parse_svid(leaf)?;
        Ok(Svid {
            info,
            chain,
            key: std::sync::Arc::new(PrivatePkcs8KeyDer::from(key_pkcs8)),
        })
    }

    /// The SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.info.id
    }

    /// What the leaf certificate says.
    pub fn info(&self) -> &SvidInfo {
        &self.info
    }

    /// `notAfter` of the leaf.
    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// Whether it is past its `notAfter` at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.info.not_after
    }

    /// When it should be renewed: half-way through its validity.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .info
            .not_after
            .duration_since(self.info.not_before)
            .unwrap_or_default();
        self.info.not_before + lifetime / 2
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key, PKCS#8 DER.
    pub fn key_pkcs8(&self) -> &[u8] {
        self.key.secret_pkcs8_der()
    }

    /// The private key, as rustls takes it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}
