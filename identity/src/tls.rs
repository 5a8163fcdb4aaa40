//! rustls configurations that present an X.509-SVID and accept a peer only if its chain
//! verifies against the trust bundle (webpki) and its SPIFFE ID is allowed. Host names are
//! not checked: SVIDs carry SPIFFE IDs, not DNS names. TLS 1.3 only.
//!
//! The certificate and the bundle sit behind [`SvidCertResolver`] and [`SpiffeVerifier`],
//! which can be updated in place, so a rotation reaches every later handshake without
//! rebuilding configurations.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
};
use rustls::{ServerConfig, SignatureScheme};

use crate::bundle::TrustBundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{parse_svid, Svid};

/// Re-exported: the certificate type of every API here.
pub use rustls::pki_types::CertificateDer;
/// Re-exported for callers of [`SpiffeVerifier::verify`].
pub use rustls::pki_types::UnixTime;
/// Re-exported for callers of [`SpiffeVerifier::verify`].
pub use webpki::KeyUsage;

/// Building a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the key or the configuration.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A bundle root is not a usable trust anchor.
    #[error("trust anchor: {0}")]
    Anchor(webpki::Error),
}

/// The crypto provider every Veil TLS configuration uses (ring, as kube-rs does).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which peer SPIFFE IDs a configuration accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedIds {
    /// Exactly these IDs.
    Ids(BTreeSet<SpiffeId>),
    /// Any ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl AllowedIds {
    /// A set of IDs.
    pub fn ids(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        AllowedIds::Ids(ids.into_iter().collect())
    }

    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            AllowedIds::Ids(set) => set.contains(id),
            AllowedIds::TrustDomain(td) => id.is_member_of(td),
        }
    }
}

/// The certificate a configuration presents: the current SVID, replaceable.
pub struct SvidCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for SvidCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signing key is never formatted; the chain length is enough to tell it apart.
        let chain = self.current.read().map(|k| k.cert.len()).unwrap_or(0);
        f.debug_struct("SvidCertResolver")
            .field("chain_len", &chain)
            .finish_non_exhaustive()
    }
}

fn certified_key(svid: &Svid, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = provider.key_provider.load_private_key(svid.private_key())?;
    Ok(Arc::new(CertifiedKey::new(svid.chain().to_vec(), key)))
}

impl SvidCertResolver {
    /// Presents `svid`.
    pub fn new(svid: &Svid) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(SvidCertResolver {
            current: RwLock::new(certified_key(svid, &provider())?),
        }))
    }

    /// Presents `svid` from the next handshake on.
    pub fn update(&self, svid: &Svid) -> Result<(), TlsError> {
        let key = certified_key(svid, &provider())?;
        *self.current.write().expect("resolver lock") = key;
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("resolver lock").clone()
    }
}

impl ResolvesServerCert for SvidCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for SvidCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

struct Anchors {
    trust_domain: TrustDomain,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

fn anchors(bundle: &TrustBundle) -> Result<Anchors, TlsError> {
    let anchors = bundle
        .roots
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(TlsError::Anchor)
        })
        .collect::<Result<_, _>>()?;
    Ok(Anchors {
        trust_domain: bundle.trust_domain.clone(),
        anchors,
    })
}

/// Verifies a peer's SVID against a trust bundle and an allowed set of IDs; serves as
/// rustls's server and client certificate verifier.
pub struct SpiffeVerifier {
    anchors: RwLock<Arc<Anchors>>,
    allowed: AllowedIds,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    rustls::Error::InvalidCertificate(match e {
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

impl SpiffeVerifier {
    /// Trusts `bundle` and accepts peers in `allowed`.
    pub fn new(bundle: &TrustBundle, allowed: AllowedIds) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(SpiffeVerifier {
            anchors: RwLock::new(Arc::new(anchors(bundle)?)),
            allowed,
            provider: provider(),
        }))
    }

    /// Trusts `bundle` from the next handshake on (CA rotation).
    pub fn update_bundle(&self, bundle: &TrustBundle) -> Result<(), TlsError> {
        let new = Arc::new(anchors(bundle)?);
        *self.anchors.write().expect("anchors lock") = new;
        Ok(())
    }

    /// Verifies `end_entity` (with `intermediates`) for `usage` and returns its SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let anchors = self.anchors.read().expect("anchors lock").clone();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        let info = parse_svid(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        if !info.id.is_member_of(&anchors.trust_domain) || !self.allowed.allows(&info.id) {
            tracing::debug!(peer = %info.id, "peer SPIFFE ID not allowed");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(info.id)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

/// A client configuration presenting `cert` and accepting servers `verifier` accepts.
pub fn client_config(
    cert: Arc<SvidCertResolver>,
    verifier: Arc<SpiffeVerifier>,
) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert))
}

/// A client configuration without a client certificate (an agent calling the issuer,
/// which authenticates it by its ServiceAccount token) that accepts servers `verifier`
/// accepts.
pub fn client_config_no_cert(verifier: Arc<SpiffeVerifier>) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// A server configuration presenting `cert` and requiring a client SVID `verifier` accepts.
pub fn server_config(
    cert: Arc<SvidCertResolver>,
    verifier: Arc<SpiffeVerifier>,
) -> Result<ServerConfig, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert))
}

/// A server configuration presenting `cert` that asks clients for no certificate.
pub fn server_config_no_client_auth(cert: Arc<SvidCertResolver>) -> Result<ServerConfig, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert))
}

/// Convenience: client and server configurations from one SVID, one bundle, one set.
pub fn mutual_configs(
    svid: &Svid,
    bundle: &TrustBundle,
    allowed: AllowedIds,
) -> Result<(ClientConfig, ServerConfig), TlsError> {
    let cert = SvidCertResolver::new(svid)?;
    let verifier = SpiffeVerifier::new(bundle, allowed)?;
    Ok((
        client_config(cert.clone(), verifier.clone())?,
        server_config(cert, verifier)?,
    ))
}

/// The SPIFFE ID of a peer whose chain a [`SpiffeVerifier`] accepted.
pub fn peer_id(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    parse_svid(peer_certs?.first()?).ok().map(|i| i.id)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::ca::{CertificateAuthority, DEFAULT_CA_LIFETIME};
    use crate::id::workload_id;
    use crate::svid::new_key_and_csr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn issue(ca: &CertificateAuthority, sa: &str) -> Svid {
        let id = workload_id(ca.trust_domain(), "shop", sa).unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let cert = ca
            .sign_csr(&csr, &id, Duration::from_secs(3600), SystemTime::now())
            .unwrap();
        Svid::new(vec![cert], key.serialize_der()).unwrap()
    }

    /// Handshakes over loopback TCP and exchanges a byte; returns what each side saw.
    async fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> (Result<SpiffeId, String>, Result<SpiffeId, String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(&b).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            peer_id(tls.get_ref().1.peer_certificates()).ok_or_else(|| "no peer".to_string())
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client_result = async {
            let mut tls = connector
                .connect(ServerName::try_from("peer").unwrap(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            peer_id(tls.get_ref().1.peer_certificates()).ok_or_else(|| "no peer".to_string())
        }
        .await;
        let server_result = server_side.await.unwrap();
        (client_result, server_result)
    }

    #[tokio::test]
    async fn identity_tls_handshake_checks_the_peer_spiffe_id() {
        let (td, ca, bundle) = crate::ca::test_ca();
        let (alice, bob, mallory) = (
            issue(&ca, "alice"),
            issue(&ca, "bob"),
            issue(&ca, "mallory"),
        );

        // Both allow each other: the handshake succeeds and each side sees the other's ID.
        let (client, _) =
            mutual_configs(&alice, &bundle, AllowedIds::ids([bob.id().clone()])).unwrap();
        let (_, server) =
            mutual_configs(&bob, &bundle, AllowedIds::ids([alice.id().clone()])).unwrap();
        let (c, s) = handshake(client, server).await;
        assert_eq!(c.unwrap(), *bob.id());
        assert_eq!(s.unwrap(), *alice.id());

        // The server does not allow mallory.
        let (client, _) =
            mutual_configs(&mallory, &bundle, AllowedIds::ids([bob.id().clone()])).unwrap();
        let (_, server) =
            mutual_configs(&bob, &bundle, AllowedIds::ids([alice.id().clone()])).unwrap();
        let (c, s) = handshake(client, server).await;
        assert!(
            s.is_err(),
            "server must refuse a client ID it does not allow"
        );
        assert!(c.is_err());

        // The client does not allow the server it reached.
        let (client, _) =
            mutual_configs(&alice, &bundle, AllowedIds::ids([bob.id().clone()])).unwrap();
        let (_, server) =
            mutual_configs(&mallory, &bundle, AllowedIds::TrustDomain(td.clone())).unwrap();
        let (c, _) = handshake(client, server).await;
        let err = c.unwrap_err();
        assert!(err.contains("ApplicationVerificationFailure"), "{err}");

        // Same ID, but signed by another CA: refused.
        let rogue_ca =
            CertificateAuthority::generate(&td, DEFAULT_CA_LIFETIME, SystemTime::now()).unwrap();
        let fake_bob = issue(&rogue_ca, "bob");
        assert_eq!(fake_bob.id(), bob.id());
        let (client, _) =
            mutual_configs(&alice, &bundle, AllowedIds::ids([bob.id().clone()])).unwrap();
        let (_, server) =
            mutual_configs(&fake_bob, &bundle, AllowedIds::ids([alice.id().clone()])).unwrap();
        let (c, _) = handshake(client, server).await;
        let err = c.unwrap_err();
        // Both CAs have the same subject, so webpki finds a candidate and its signature fails.
        assert!(
            err.contains("UnknownIssuer") || err.contains("BadSignature"),
            "{err}"
        );

        // A trust-domain-wide allowance accepts any workload of the domain.
        let (client, _) =
            mutual_configs(&alice, &bundle, AllowedIds::TrustDomain(td.clone())).unwrap();
        let (_, server) = mutual_configs(&mallory, &bundle, AllowedIds::TrustDomain(td)).unwrap();
        let (c, s) = handshake(client, server).await;
        assert_eq!(c.unwrap(), *mallory.id());
        assert_eq!(s.unwrap(), *alice.id());
    }
}
