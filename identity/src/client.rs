//! The agent's issuer client: gRPC over TLS that accepts only the issuer's SPIFFE ID,
//! authenticating with the agent's bound ServiceAccount token. The private key of each
//! SVID is made here and never leaves the agent.

use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};

use crate::bundle::TrustBundle;
use crate::id::SpiffeId;
use crate::proto::issuer::issuer_client::IssuerClient as Grpc;
use crate::proto::issuer::SignSvidRequest;
use crate::svid::{new_key_and_csr, Svid};
use crate::tls::{client_config_no_cert, AllowedIds, SpiffeVerifier};

/// gRPC status codes of refusals ([`ClientError::Refused`]).
pub use tonic::Code;

/// Largest answer taken from the issuer (an SVID and a few roots are a few KiB).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Largest token file read (bound ServiceAccount tokens are about 1 KiB).
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Where the agent's token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A fixed token.
    Static(String),
    /// A file re-read on every request (the kubelet rotates projected tokens).
    File(PathBuf),
}

impl TokenSource {
    fn read(&self) -> Result<String, ClientError> {
        match self {
            TokenSource::Static(t) => Ok(t.clone()),
            TokenSource::File(p) => {
                use std::io::Read;
                let mut token = String::new();
                std::fs::File::open(p)
                    .and_then(|f| f.take(MAX_TOKEN_FILE_BYTES + 1).read_to_string(&mut token))
                    .map_err(|e| ClientError::Token(format!("read {}: {e}", p.display())))?;
                if token.len() as u64 > MAX_TOKEN_FILE_BYTES {
                    return Err(ClientError::Token(format!(
                        "{} is larger than {MAX_TOKEN_FILE_BYTES} bytes",
                        p.display()
                    )));
                }
                Ok(token.trim().to_string())
            }
        }
    }
}

/// What can go wrong asking for an SVID.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The issuer refused, with its reason.
    #[error("issuer refused ({code:?}): {message}")]
    Refused {
        /// gRPC code.
        code: tonic::Code,
        /// The issuer's reason.
        message: String,
    },
    /// The connection could not be made.
    #[error("connect to issuer: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The token could not be read.
    #[error("token: {0}")]
    Token(String),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The issuer answered with something that is not a valid SVID or bundle.
    #[error("bad answer from issuer: {0}")]
    BadAnswer(String),
}

/// What the agent names when it asks for a pod's SVID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (empty: not checked).
    pub uid: String,
    /// ServiceAccount the agent expects (empty: not checked).
    pub service_account: String,
}

/// A connection to the issuer (HTTP/2: many requests in flight on one connection).
#[derive(Clone)]
pub struct IssuerClient {
    grpc: Grpc<Channel>,
    token: TokenSource,
}

impl IssuerClient {
    /// Connects to `addr` (`host:port`), trusting `bundle` and only `issuer_id`.
    pub async fn connect(
        addr: String,
        bundle: &TrustBundle,
        issuer_id: SpiffeId,
        token: TokenSource,
    ) -> Result<Self, ClientError> {
        let verifier = SpiffeVerifier::new(bundle, AllowedIds::ids([issuer_id]))?;
        let mut config = client_config_no_cert(verifier)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let channel = Endpoint::from_static("http://veil-issuer")
            .connect_with_connector(tower::service_fn(move |_uri| {
                let connector = connector.clone();
                let addr = addr.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    tcp.set_nodelay(true)?;
                    let name = ServerName::try_from("veil-issuer").expect("static name");
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await?;
        Ok(IssuerClient {
            grpc: Grpc::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES),
            token,
        })
    }

    /// Makes a key, asks for an SVID for `pod`, and returns it with the current bundle.
    pub async fn fetch(
        &self,
        pod: &PodRef,
    ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError> {
        let (key, csr) = new_key_and_csr().map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let mut req = tonic::Request::new(SignSvidRequest {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            service_account: pod.service_account.clone(),
            csr,
        });
        let token = self.token.read()?;
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Token("not valid in a header".into()))?,
        );
        let resp = self
            .grpc
            .clone()
            .sign_svid(req)
            .await
            .map_err(|s| ClientError::Refused {
                code: s.code(),
                message: s.message().to_string(),
            })?
            .into_inner();
        let chain = resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let svid = Svid::new(chain, key.serialize_der())
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        if svid.id().to_string() != resp.spiffe_id {
            return Err(ClientError::BadAnswer(format!(
                "certificate names {}, answer says {}",
                svid.id(),
                resp.spiffe_id
            )));
        }
        let bundle = resp.bundle.into_iter().map(CertificateDer::from).collect();
        Ok((svid, bundle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_token_file_is_read_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("token");
        std::fs::write(&ok, "abc\n").unwrap();
        assert_eq!(TokenSource::File(ok).read().unwrap(), "abc");
        let huge = dir.path().join("huge");
        std::fs::write(&huge, vec![b'a'; MAX_TOKEN_FILE_BYTES as usize + 10]).unwrap();
        let err = TokenSource::File(huge).read().unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
