//! TLS clients (rustls): one that accepts whatever certificate the server
//! shows so that the test can look at it, and one that trusts exactly one
//! certificate, as a real client would.

use std::{io, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct as Dss, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
    client::{
        Resumption,
        danger::{
            HandshakeSignatureValid as SignatureValid, ServerCertVerified, ServerCertVerifier,
        },
    },
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer as Der, ServerName, UnixTime},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// What a verifier answers.
type Verdict<T> = Result<T, rustls::Error>;

/// Accepts any server certificate (the tests compare the one they were
/// shown themselves, see [`peer_leaf`]) but still checks the handshake
/// signatures with it, so the server proved it holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate {
    /// The provider's signature algorithms.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &Der,
        _: &[Der],
        _: &ServerName,
        _: &[u8],
        _: UnixTime,
    ) -> Verdict<ServerCertVerified> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, m: &[u8], c: &Der, d: &Dss) -> Verdict<SignatureValid> {
        verify_tls12_signature(m, c, d, &self.algorithms)
    }

    fn verify_tls13_signature(&self, m: &[u8], c: &Der, d: &Dss) -> Verdict<SignatureValid> {
        verify_tls13_signature(m, c, d, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client config offering `alpn`, sending SNI or not (TLS 1.3 and 1.2),
/// accepting any server certificate.
pub fn tls_client_config(alpn: &[&str], send_sni: bool) -> Arc<ClientConfig> {
    tls_client_config_versions(alpn, send_sni, rustls::DEFAULT_VERSIONS)
}

/// Like [`tls_client_config`], offering only `versions`.
pub fn tls_client_config_versions(
    alpn: &[&str],
    send_sni: bool,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = rustls::crypto::ring::default_provider();
    let verifier = AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("ring supports these versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.enable_sni = send_sni;
    Arc::new(config)
}

/// A client config trusting only `cert` (DER), offering `alpn`. Without
/// `resumption`, every connection makes a full handshake.
pub fn trusting(cert: &[u8], alpn: &[&str], resumption: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(Der::from(cert.to_vec()))
        .expect("a valid certificate to trust");
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if !resumption {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

/// Connects to `addr` and runs the TLS handshake for `server_name`.
pub async fn tls_connect(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tls_handshake(tcp, server_name, config).await
}

/// Runs the client TLS handshake on an already connected `tcp`.
pub async fn tls_handshake(
    tcp: TcpStream,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// The leaf certificate (DER) the server showed on `stream`.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("a finished handshake has the server certificate")
}
