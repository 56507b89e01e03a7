//! TLS termination: loads certificates and keys once, picks a certificate by
//! the client's SNI, and runs server handshakes bounded by a timeout.
//!
//! Built on rustls with the aws-lc-rs provider, TLS 1.2 and 1.3 only. Several
//! certificates may be configured: each is reachable by the DNS names in its
//! SubjectAltName (or its CN when it has none), exactly or through a wildcard
//! `*.example.com`; the first one is the default for unknown or absent SNI.
//! The names are read with a small DER walk below, because the crates that
//! would do it are not dependencies of this crate.

mod flush;

pub use flush::FlushingTls;

use std::{
    collections::{HashMap, hash_map::Entry},
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ProtocolVersion, ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject},
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::TlsConfig;

/// What a TLS listener needs: certificates, ALPN protocols, handshake limit.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Certificates with their keys; the first one is the default.
    pub certs: Vec<CertSource>,
    /// ALPN protocols offered, most preferred first (e.g. `["h2", "http/1.1"]`).
    /// Empty means no ALPN: clients that offer some still connect.
    pub alpn: Vec<String>,
    /// Longest a client may take from connecting to a finished handshake.
    pub handshake_timeout: Duration,
    /// Stateless session tickets.
    pub session_tickets: bool,
    /// Sessions cached for resumption; 0: none.
    pub session_cache: usize,
}

impl From<&TlsConfig> for TlsSettings {
    fn from(t: &TlsConfig) -> Self {
        Self {
            certs: t
                .certs
                .iter()
                .cloned()
                .map(CertSource::Bundle)
                .chain(t.pairs.iter().map(|p| CertSource::Pair {
                    cert: p.cert.clone(),
                    key: p.key.clone(),
                }))
                .collect(),
            alpn: t.alpn.clone(),
            handshake_timeout: t.handshake_timeout,
            session_tickets: t.session_tickets,
            session_cache: t.session_cache,
        }
    }
}

/// Where one certificate chain and its private key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// One PEM file holding the chain (leaf first) and the key, HAProxy style.
    Bundle(PathBuf),
    /// The chain (leaf first) and the key in two PEM files.
    Pair { cert: PathBuf, key: PathBuf },
}

/// What was negotiated on an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// Host name the client asked for, lowercase, if it sent SNI.
    pub sni: Option<String>,
    /// ALPN protocol agreed on, if any.
    pub alpn: Option<Vec<u8>>,
    /// `"TLSv1.2"` or `"TLSv1.3"`.
    pub version: &'static str,
    /// Cipher suite, rustls's IANA-style name, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: String,
    /// The client resumed an earlier session (a ticket or the cache).
    pub resumed: bool,
}

/// Why TLS could not be set up, or why one handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no TLS certificate configured; give at least one certificate and key")]
    NoCertificates,
    #[error("cannot read {path}: {source}; check the path and that the proxy may read it")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not valid PEM: {detail}; \
         expected PEM blocks like `-----BEGIN CERTIFICATE-----`"
    )]
    Pem { path: PathBuf, detail: String },
    #[error(
        "{path} holds no certificate (no `-----BEGIN CERTIFICATE-----` block); \
         give the certificate chain, leaf first"
    )]
    NoCert { path: PathBuf },
    #[error(
        "{path} holds no private key (no PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` \
         or SEC1 `EC PRIVATE KEY` block); give the key file, or append the key to the bundle"
    )]
    NoKey { path: PathBuf },
    #[error(
        "the private key in {path} is encrypted; the proxy cannot ask for a passphrase, \
         so decrypt it with `openssl pkey -in KEY -out KEY.plain`"
    )]
    EncryptedKey { path: PathBuf },
    #[error(
        "the private key in {path} is not usable: {detail}; supported are RSA (2048 to 8192 bits), \
         ECDSA P-256 and P-384, and Ed25519"
    )]
    UnsupportedKey { path: PathBuf, detail: String },
    #[error(
        "the private key in {key} does not belong to the first certificate in {cert}; \
         pair each certificate with its own key, and put the leaf certificate first"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "the first certificate in {path} cannot be parsed: {detail}; \
         check that it is an X.509 certificate"
    )]
    BadCert { path: PathBuf, detail: String },
    #[error("ALPN protocol {0:?} is invalid: ALPN names must be 1 to 255 bytes long")]
    Alpn(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error(
        "TLS handshake failed: {0}; the client is not speaking TLS, or shares no \
         protocol version, cipher suite or ALPN protocol with us"
    )]
    Handshake(#[source] io::Error),
    #[error("TLS handshake not finished within {0:?}; the client is too slow or stalled")]
    Timeout(Duration),
}

/// Accepts TLS connections with one fixed configuration. Cheap to clone: the
/// configuration is shared.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads every certificate and key now, so that a bad file stops startup
    /// (or a reload) with an error naming it, rather than failing handshakes.
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        if settings.certs.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let mut keys = Vec::with_capacity(settings.certs.len());
        for source in &settings.certs {
            keys.push(load_certified_key(source, &provider)?);
        }
        let resolver = SniResolver::new(keys);

        let mut alpn = Vec::with_capacity(settings.alpn.len());
        for proto in &settings.alpn {
            if proto.is_empty() || proto.len() > 255 {
                return Err(TlsError::Alpn(proto.clone()));
            }
            alpn.push(proto.as_bytes().to_vec());
        }

        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = alpn;
        config.session_storage = if settings.session_cache == 0 {
            Arc::new(rustls::server::NoServerSessionStorage {})
        } else {
            rustls::server::ServerSessionMemoryCache::new(settings.session_cache)
        };
        if settings.session_tickets {
            config.ticketer =
                rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Config)?;
        }
        if settings.session_cache == 0 && !settings.session_tickets {
            // Nothing a ticket could resume: send none.
            config.send_tls13_tickets = 0;
        }

        Ok(Self {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: settings.handshake_timeout,
        })
    }

    /// Runs the server handshake on `io`, all of it within the handshake
    /// timeout. On any failure `io` is dropped, which closes the connection.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, TlsInfo), TlsError> {
        let stream = match tokio::time::timeout(self.handshake_timeout, self.inner.accept(io)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Err(TlsError::Handshake(err)),
            Err(_) => return Err(TlsError::Timeout(self.handshake_timeout)),
        };
        let conn = stream.get_ref().1;
        let version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            // Only 1.2 and 1.3 are enabled, so a finished handshake has one of them.
            _ => "unknown",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| {
                let suite = s.suite();
                suite
                    .as_str()
                    .map_or_else(|| format!("{suite:?}"), str::to_owned)
            })
            .unwrap_or_default();
        let info = TlsInfo {
            sni: conn.server_name().map(str::to_ascii_lowercase),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version,
            cipher,
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        };
        Ok((stream, info))
    }
}

/// Loads one chain and key and checks that they belong together.
fn load_certified_key(
    source: &CertSource,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let (cert_path, key_path) = match source {
        CertSource::Bundle(path) => (path.as_path(), path.as_path()),
        CertSource::Pair { cert, key } => (cert.as_path(), key.as_path()),
    };
    let cert_pem = read_file(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, &e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert_path.to_owned(),
        });
    }

    let key_pem = if key_path == cert_path {
        cert_pem
    } else {
        read_file(key_path)?
    };
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            // An encrypted PKCS#8 block is skipped by the PEM reader; say so,
            // rather than claiming there is no key at all.
            let encrypted = String::from_utf8_lossy(&key_pem).contains("ENCRYPTED");
            let path = key_path.to_owned();
            return Err(if encrypted {
                TlsError::EncryptedKey { path }
            } else {
                TlsError::NoKey { path }
            });
        }
        Err(e) => return Err(pem_error(key_path, &e)),
    };
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::UnsupportedKey {
                path: key_path.to_owned(),
                detail: e.to_string(),
            })?;

    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public half; accept it as
        // rustls's own CertifiedKey::from_der does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        }),
        Err(e) => Err(TlsError::BadCert {
            path: cert_path.to_owned(),
            detail: e.to_string(),
        }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, err: &pem::Error) -> TlsError {
    let detail = match err {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a block is not closed (missing {:?})",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("bad block start line {:?}", String::from_utf8_lossy(line))
        }
        other => other.to_string(),
    };
    TlsError::Pem {
        path: path.to_owned(),
        detail,
    }
}

/// Picks a certificate by SNI: exact name, then wildcard, then the first
/// certificate. Never refuses: a client with an unknown name still gets the
/// default and decides itself whether to trust it.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// Keyed by what follows `*.`: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, usize>,
}

impl SniResolver {
    /// `keys` must not be empty; its first entry is the default.
    fn new(keys: Vec<CertifiedKey>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, key) in keys.iter().enumerate() {
            let Some(leaf) = key.cert.first() else {
                continue;
            };
            let Some(names) = cert_dns_names(leaf) else {
                tracing::warn!(
                    certificate = index,
                    "cannot read the names in TLS certificate #{index}; it is used only as \
                     the default (when it is the first one)"
                );
                continue;
            };
            if names.is_empty() {
                tracing::warn!(
                    certificate = index,
                    "TLS certificate #{index} has no DNS name in SubjectAltName or CN; it is \
                     used only as the default (when it is the first one)"
                );
            }
            for name in names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent.to_owned()),
                    // Partial wildcards like `w*.example.com` are not supported.
                    None if name.contains('*') => continue,
                    None => (&mut exact, name),
                };
                match map.entry(key) {
                    Entry::Vacant(slot) => {
                        slot.insert(index);
                    }
                    Entry::Occupied(slot) => tracing::warn!(
                        certificate = index,
                        "TLS name {:?} is in certificate #{} already; certificate #{index} \
                         is not used for it",
                        slot.key(),
                        slot.get()
                    ),
                }
            }
        }
        Self {
            keys: keys.into_iter().map(Arc::new).collect(),
            exact,
            wildcard,
        }
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let index = sni
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    // A wildcard covers exactly one label.
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        self.keys.get(index).cloned()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(client_hello.server_name())
    }
}

/// The DNS names a certificate is valid for: the dNSName entries of its
/// SubjectAltName, or, when there are none, its subject CN if that looks like
/// a host name. Lowercase, `*.` wildcards kept. `None` when the DER is not a
/// certificate this walk understands.
fn cert_dns_names(cert: &[u8]) -> Option<Vec<String>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (der::SEQUENCE, cert, _) = der::next(cert)? else {
        return None;
    };
    let (der::SEQUENCE, tbs, _) = der::next(cert)? else {
        return None;
    };
    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
    //   signature, issuer, validity, subject, subjectPublicKeyInfo,
    //   [1] issuerUniqueID OPTIONAL, [2] subjectUniqueID OPTIONAL,
    //   [3] extensions OPTIONAL }
    let mut fields = der::elements(tbs)?;
    if fields.first().map(|f| f.0) == Some(der::CONTEXT_0) {
        fields.remove(0);
    }
    let subject = match fields.get(4) {
        Some(&(der::SEQUENCE, subject)) => subject,
        _ => return None,
    };

    let mut names = Vec::new();
    for &(tag, content) in fields.iter().skip(6) {
        if tag != der::CONTEXT_3 {
            continue;
        }
        let (der::SEQUENCE, extensions, _) = der::next(content)? else {
            return None;
        };
        for (tag, extension) in der::elements(extensions)? {
            if tag != der::SEQUENCE {
                return None;
            }
            // Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }
            let parts = der::elements(extension)?;
            if parts.first() != Some(&(der::OID, der::OID_SUBJECT_ALT_NAME)) {
                continue;
            }
            let &(der::OCTET_STRING, value) = parts.last()? else {
                return None;
            };
            let (der::SEQUENCE, general_names, _) = der::next(value)? else {
                return None;
            };
            for (tag, name) in der::elements(general_names)? {
                if tag == der::DNS_NAME {
                    names.extend(host_name(name));
                }
            }
        }
    }
    if !names.is_empty() {
        return Some(names);
    }

    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    for (tag, rdn) in der::elements(subject)? {
        if tag != der::SET {
            return None;
        }
        for (tag, attribute) in der::elements(rdn)? {
            if tag != der::SEQUENCE {
                return None;
            }
            let parts = der::elements(attribute)?;
            if let [(der::OID, der::OID_COMMON_NAME), (value_tag, value)] = parts[..]
                && der::is_ascii_string(value_tag)
            {
                names.extend(host_name(value));
            }
        }
    }
    Some(names)
}

/// `raw` as a lowercase host name (wildcards allowed), or nothing when it is
/// not one (a CN like "My Server", or non-ASCII bytes).
fn host_name(raw: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(raw).ok()?.trim_end_matches('.');
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*'));
    valid.then(|| name.to_ascii_lowercase())
}

/// Just enough DER to walk to a certificate's names: definite lengths,
/// single-byte tags, no copies.
mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const OID: u8 = 0x06;
    pub const OCTET_STRING: u8 = 0x04;
    pub const CONTEXT_0: u8 = 0xA0;
    pub const CONTEXT_3: u8 = 0xA3;
    /// GeneralName `dNSName [2] IA5String`, implicitly tagged.
    pub const DNS_NAME: u8 = 0x82;
    /// 2.5.29.17
    pub const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];
    /// 2.5.4.3
    pub const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

    /// UTF8String, PrintableString, TeletexString, IA5String: the string types
    /// a CN holding a host name comes in. BMPString and UniversalString do not.
    pub fn is_ascii_string(tag: u8) -> bool {
        matches!(tag, 0x0C | 0x13 | 0x14 | 0x16)
    }

    /// Splits the first element off `input`: its tag, contents, and the rest.
    pub fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        // High tag numbers never occur in the parts of a certificate we read.
        if tag & 0x1F == 0x1F {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            // Long form; 0x80 alone would be BER's indefinite length.
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (len_bytes, rest) = rest.split_at(count);
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, rest)
        };
        if rest.len() < len {
            return None;
        }
        let (content, rest) = rest.split_at(len);
        Some((tag, content, rest))
    }

    /// All elements of a constructed value's contents, or `None` if any is broken.
    pub fn elements(mut input: &[u8]) -> Option<Vec<(u8, &[u8])>> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (tag, content, rest) = next(input)?;
            out.push((tag, content));
            input = rest;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{
        ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    };
    use rustls_pki_types::{ServerName, UnixTime};
    use std::process::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two certificates: A (RSA, pair of files, a.test) and B (ECDSA, bundle,
    /// b.test and *.wild.test), in a tempdir removed when this is dropped.
    struct Fixture {
        dir: tempfile::TempDir,
        a_der: CertificateDer<'static>,
        b_der: CertificateDer<'static>,
    }

    fn openssl(args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the tests need the openssl CLI");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Self-signed, with CA:FALSE so that webpki accepts it as a leaf.
    fn make_cert(dir: &Path, stem: &str, newkey: &[&str], subj: &str, san: Option<&str>) {
        let key = dir.join(format!("{stem}.key"));
        let crt = dir.join(format!("{stem}.crt"));
        let mut args = vec!["req", "-x509"];
        args.extend_from_slice(newkey);
        let (key, crt) = (key.to_str().unwrap(), crt.to_str().unwrap());
        let san_ext = san.map(|s| format!("subjectAltName={s}"));
        args.extend_from_slice(&[
            "-nodes",
            "-keyout",
            key,
            "-out",
            crt,
            "-days",
            "2",
            "-subj",
            subj,
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ]);
        if let Some(ext) = &san_ext {
            args.extend_from_slice(&["-addext", ext]);
        }
        openssl(&args);
    }

    const RSA: &[&str] = &["-newkey", "rsa:2048"];
    const EC: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_cert(d, "a", RSA, "/CN=a.test", Some("DNS:a.test"));
        make_cert(d, "b", EC, "/CN=b.test", Some("DNS:b.test,DNS:*.wild.test"));
        let mut bundle = std::fs::read(d.join("b.crt")).unwrap();
        bundle.extend(std::fs::read(d.join("b.key")).unwrap());
        std::fs::write(d.join("b.pem"), bundle).unwrap();
        let der = |p: &str| CertificateDer::from_pem_file(d.join(p)).unwrap();
        Fixture {
            a_der: der("a.crt"),
            b_der: der("b.crt"),
            dir,
        }
    }

    impl Fixture {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn settings(&self) -> TlsSettings {
            TlsSettings {
                certs: vec![
                    CertSource::Pair {
                        cert: self.path("a.crt"),
                        key: self.path("a.key"),
                    },
                    CertSource::Bundle(self.path("b.pem")),
                ],
                alpn: vec!["http/1.1".into()],
                handshake_timeout: Duration::from_secs(10),
                session_tickets: false,
                session_cache: 256,
            }
        }

        fn acceptor(&self) -> TlsAcceptor {
            TlsAcceptor::new(&self.settings()).unwrap()
        }

        fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConfig {
            let mut roots = RootCertStore::empty();
            roots.add(self.a_der.clone()).unwrap();
            roots.add(self.b_der.clone()).unwrap();
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            config
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// Accepts any server certificate, to see which one a server presents for
    /// a name none of them is valid for.
    #[derive(Debug)]
    struct AcceptAny(Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
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
                &self.0.signature_verification_algorithms,
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
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// One handshake over an in-memory pipe; returns what the server saw and
    /// the leaf certificate the client got. Also checks that data flows both
    /// ways.
    async fn handshake(
        acceptor: &TlsAcceptor,
        client: ClientConfig,
        name: &str,
    ) -> (TlsInfo, CertificateDer<'static>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let (server, client) = tokio::join!(
            acceptor.accept(server_io),
            connector.connect(name, client_io)
        );
        let (mut server, info) = server.unwrap();
        let mut client = client.unwrap();
        let leaf = client.get_ref().1.peer_certificates().unwrap()[0].clone();

        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // And back: the client then also takes the TLS 1.3 session tickets
        // that the server sent before the data.
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        (info, leaf)
    }

    /// Two handshakes of one client (which keeps its sessions): whether the
    /// second resumed, for each setting.
    #[tokio::test]
    async fn session_tickets_and_cache_decide_resumption() {
        let fx = fixture();
        for (tickets, cache, versions, resumes) in [
            (false, 256, &[&rustls::version::TLS13], true),
            (false, 256, &[&rustls::version::TLS12], true),
            (true, 0, &[&rustls::version::TLS13], true),
            (true, 0, &[&rustls::version::TLS12], true),
            (false, 0, &[&rustls::version::TLS13], false),
            (false, 0, &[&rustls::version::TLS12], false),
        ] {
            let acceptor = TlsAcceptor::new(&TlsSettings {
                session_tickets: tickets,
                session_cache: cache,
                ..fx.settings()
            })
            .unwrap();
            let client = fx.client(versions);
            let (first, _) = handshake(&acceptor, client.clone(), "a.test").await;
            let (second, _) = handshake(&acceptor, client, "a.test").await;
            let what = format!("tickets {tickets}, cache {cache}, {}", second.version);
            assert!(!first.resumed, "{what}: the first handshake is full");
            assert_eq!(second.resumed, resumes, "{what}");
        }
    }

    #[tokio::test]
    async fn sni_picks_certificate() {
        let fx = fixture();
        let acceptor = fx.acceptor();
        let tls13 = &[&rustls::version::TLS13];

        let (info, leaf) = handshake(&acceptor, fx.client(tls13), "a.test").await;
        assert_eq!(leaf, fx.a_der);
        assert_eq!(info.sni.as_deref(), Some("a.test"));

        let (info, leaf) = handshake(&acceptor, fx.client(tls13), "b.test").await;
        assert_eq!(leaf, fx.b_der);
        assert_eq!(info.sni.as_deref(), Some("b.test"));

        let (_, leaf) = handshake(&acceptor, fx.client(tls13), "x.wild.test").await;
        assert_eq!(leaf, fx.b_der, "wildcard *.wild.test");
    }

    #[tokio::test]
    async fn unknown_or_no_sni_gets_default() {
        let fx = fixture();
        let acceptor = fx.acceptor();
        let mut any = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
            .with_no_client_auth();
        let (info, leaf) = handshake(&acceptor, any.clone(), "c.test").await;
        assert_eq!(leaf, fx.a_der);
        assert_eq!(info.sni.as_deref(), Some("c.test"));
        // A wildcard covers one label only.
        let (_, leaf) = handshake(&acceptor, any.clone(), "a.b.wild.test").await;
        assert_eq!(leaf, fx.a_der);

        any.enable_sni = false;
        let (info, leaf) = handshake(&acceptor, any, "b.test").await;
        assert_eq!(leaf, fx.a_der);
        assert_eq!(info.sni, None);

        // The real verifier agrees: without SNI, a.test's certificate is valid.
        let mut verified = fx.client(&[&rustls::version::TLS13]);
        verified.enable_sni = false;
        let (_, leaf) = handshake(&acceptor, verified, "a.test").await;
        assert_eq!(leaf, fx.a_der);
    }

    #[tokio::test]
    async fn info_alpn_version_cipher() {
        let fx = fixture();
        let acceptor = fx.acceptor();

        let (info, _) = handshake(&acceptor, fx.client(&[&rustls::version::TLS13]), "b.test").await;
        assert_eq!(info.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(info.version, "TLSv1.3");
        assert!(info.cipher.starts_with("TLS13_"), "{}", info.cipher);

        let (info, _) = handshake(&acceptor, fx.client(&[&rustls::version::TLS12]), "b.test").await;
        assert_eq!(info.version, "TLSv1.2");
        assert!(
            info.cipher.starts_with("TLS_ECDHE_ECDSA_WITH_"),
            "{}",
            info.cipher
        );

        let (info, _) = handshake(&acceptor, fx.client(&[&rustls::version::TLS12]), "a.test").await;
        assert!(
            info.cipher.starts_with("TLS_ECDHE_RSA_WITH_"),
            "{}",
            info.cipher
        );

        // A client that offers no ALPN still connects, with none agreed.
        let mut no_alpn = fx.client(&[&rustls::version::TLS13]);
        no_alpn.alpn_protocols.clear();
        let (info, _) = handshake(&acceptor, no_alpn, "a.test").await;
        assert_eq!(info.alpn, None);
    }

    /// A fatal alert of a failed TLS 1.3 handshake reaches the client over
    /// the metered TCP stream the stages use (ServerHello and the alert go
    /// out in one vectored write, and the connection closes right after).
    #[tokio::test]
    async fn tls13_alert_reaches_the_client_through_metered_tcp() {
        let fx = fixture();
        let acceptor = fx.acceptor();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let metrics = Arc::default();
            let metered = crate::stats::counters::Metered::client(tcp, &metrics);
            acceptor.accept(metered).await.map(|_| ())
        });
        let mut h2_only = fx.client(&[&rustls::version::TLS13]);
        h2_only.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(h2_only));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("a.test").unwrap();
        let err = connector.connect(name, tcp).await.unwrap_err();
        assert!(server.await.unwrap().is_err());
        let alert = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned();
        assert_eq!(
            alert,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            )),
            "{err:?}"
        );
    }

    /// A TLS 1.2 renegotiation attempt (openssl s_client's `R`) gets
    /// rustls' no_renegotiation alert at once, while the server side only
    /// reads (as a tcp-mode stage does when the backend is silent).
    #[tokio::test]
    async fn refused_renegotiation_is_told_without_a_write() {
        let fx = fixture();
        let acceptor = fx.acceptor();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tls, _) = acceptor.accept(tcp).await.unwrap();
            let mut tls = FlushingTls::new(tls);
            let mut sink = Vec::new();
            let _ = tls.read_to_end(&mut sink).await;
        });
        let mut client = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-msg",
                "-tls1_2",
                "-servername",
                "a.test",
                "-connect",
            ])
            .arg(addr.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("openssl s_client");
        let mut stdin = client.stdin.take().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stdin.write_all(b"R\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(10), client.wait_with_output())
            .await
            .expect("s_client ends")
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains("no_renegotiation"), "{out}");
        server.abort();
    }

    #[tokio::test]
    async fn garbage_fails_and_closes() {
        let fx = fixture();
        let acceptor = fx.acceptor();
        let (mut client, server_io) = tokio::io::duplex(4096);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let err = acceptor.accept(server_io).await.unwrap_err();
        assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
        // The server side is gone: the client reads at most an alert, then EOF.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("connection closed")
            .unwrap();

        // The acceptor still works afterwards.
        let (_, leaf) = handshake(&acceptor, fx.client(&[&rustls::version::TLS13]), "a.test").await;
        assert_eq!(leaf, fx.a_der);
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let fx = fixture();
        let mut settings = fx.settings();
        settings.handshake_timeout = Duration::from_millis(300);
        let acceptor = TlsAcceptor::new(&settings).unwrap();

        let (client, server_io) = tokio::io::duplex(4096);
        let started = std::time::Instant::now();
        let err = acceptor.accept(server_io).await.unwrap_err();
        assert!(
            matches!(err, TlsError::Timeout(d) if d == Duration::from_millis(300)),
            "{err:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        drop(client);

        // A client that starts but never finishes: the same bound applies.
        let (mut client, server_io) = tokio::io::duplex(4096);
        client
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x80, 0x01])
            .await
            .unwrap();
        let err = acceptor.accept(server_io).await.unwrap_err();
        assert!(matches!(err, TlsError::Timeout(_)), "{err:?}");
    }

    #[test]
    fn missing_key_file_named() {
        let fx = fixture();
        let missing = fx.path("nope.key");
        let settings = TlsSettings {
            certs: vec![CertSource::Pair {
                cert: fx.path("a.crt"),
                key: missing.clone(),
            }],
            ..fx.settings()
        };
        let err = TlsAcceptor::new(&settings).unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("nope.key"), "{err}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let fx = fixture();
        let build = |source: CertSource| {
            TlsAcceptor::new(&TlsSettings {
                certs: vec![source],
                ..fx.settings()
            })
            .unwrap_err()
        };

        // A bundle without its key.
        let err = build(CertSource::Bundle(fx.path("a.crt")));
        assert!(
            matches!(&err, TlsError::NoKey { path } if path.ends_with("a.crt")),
            "{err:?}"
        );
        assert!(err.to_string().contains("a.crt"));

        // A certificate file that holds only a key.
        let err = build(CertSource::Pair {
            cert: fx.path("a.key"),
            key: fx.path("a.key"),
        });
        assert!(
            matches!(&err, TlsError::NoCert { path } if path.ends_with("a.key")),
            "{err:?}"
        );

        // B's key with A's certificate.
        let err = build(CertSource::Pair {
            cert: fx.path("a.crt"),
            key: fx.path("b.key"),
        });
        assert!(matches!(&err, TlsError::KeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("b.key") && err.to_string().contains("a.crt"));

        // A key type ring cannot sign with.
        let ed448 = fx.path("ed448.key");
        openssl(&[
            "genpkey",
            "-algorithm",
            "ed448",
            "-out",
            ed448.to_str().unwrap(),
        ]);
        let err = build(CertSource::Pair {
            cert: fx.path("a.crt"),
            key: ed448,
        });
        assert!(
            matches!(&err, TlsError::UnsupportedKey { path, .. } if path.ends_with("ed448.key")),
            "{err:?}"
        );

        // An encrypted key.
        let enc = fx.path("enc.key");
        openssl(&[
            "pkey",
            "-in",
            fx.path("a.key").to_str().unwrap(),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            enc.to_str().unwrap(),
        ]);
        let err = build(CertSource::Pair {
            cert: fx.path("a.crt"),
            key: enc,
        });
        assert!(matches!(&err, TlsError::EncryptedKey { .. }), "{err:?}");

        // A broken PEM block.
        let broken = fx.path("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let err = build(CertSource::Bundle(broken));
        assert!(matches!(&err, TlsError::Pem { .. }), "{err:?}");

        let err = TlsAcceptor::new(&TlsSettings {
            certs: vec![],
            ..fx.settings()
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates));

        let err = TlsAcceptor::new(&TlsSettings {
            alpn: vec![String::new()],
            ..fx.settings()
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::Alpn(_)));
    }

    #[test]
    fn legacy_key_formats_load() {
        let fx = fixture();
        let d = fx.dir.path();
        let pkcs1 = d.join("a.pkcs1.key");
        let sec1 = d.join("b.sec1.key");
        openssl(&[
            "rsa",
            "-in",
            fx.path("a.key").to_str().unwrap(),
            "-traditional",
            "-out",
            pkcs1.to_str().unwrap(),
        ]);
        openssl(&[
            "ec",
            "-in",
            fx.path("b.key").to_str().unwrap(),
            "-out",
            sec1.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read_to_string(&pkcs1)
                .unwrap()
                .contains("BEGIN RSA PRIVATE KEY")
        );
        assert!(
            std::fs::read_to_string(&sec1)
                .unwrap()
                .contains("BEGIN EC PRIVATE KEY")
        );
        TlsAcceptor::new(&TlsSettings {
            certs: vec![
                CertSource::Pair {
                    cert: fx.path("a.crt"),
                    key: pkcs1,
                },
                CertSource::Pair {
                    cert: fx.path("b.crt"),
                    key: sec1,
                },
            ],
            ..fx.settings()
        })
        .unwrap();
    }

    #[test]
    fn names_from_certificates() {
        let fx = fixture();
        assert_eq!(cert_dns_names(&fx.a_der), Some(vec!["a.test".to_owned()]));
        assert_eq!(
            cert_dns_names(&fx.b_der),
            Some(vec!["b.test".to_owned(), "*.wild.test".to_owned()])
        );

        // No SAN: the CN counts, lowercased.
        let d = fx.dir.path();
        make_cert(d, "cn", EC, "/O=Example/CN=CN.Test", None);
        let cn = CertificateDer::from_pem_file(d.join("cn.crt")).unwrap();
        assert_eq!(cert_dns_names(&cn), Some(vec!["cn.test".to_owned()]));

        // SAN with only an IP and a CN that is no host name: no names.
        make_cert(d, "ip", EC, "/CN=My Server", Some("IP:127.0.0.1"));
        let ip = CertificateDer::from_pem_file(d.join("ip.crt")).unwrap();
        assert_eq!(cert_dns_names(&ip), Some(vec![]));

        // Broken DER: every truncation fails cleanly, never panics.
        for cut in 0..fx.a_der.len() {
            let names = cert_dns_names(&fx.a_der[..cut]);
            assert_eq!(names, None, "cut at {cut}");
        }
        assert_eq!(cert_dns_names(b"\x30\x80\x00\x00"), None);
        assert_eq!(cert_dns_names(&[0xff; 40]), None);
    }

    #[test]
    fn resolver_picks() {
        let fx = fixture();
        let provider = provider();
        let keys = fx
            .settings()
            .certs
            .iter()
            .map(|s| load_certified_key(s, &provider).unwrap())
            .collect();
        let resolver = SniResolver::new(keys);
        let leaf = |sni| resolver.pick(sni).unwrap().cert[0].clone();
        assert_eq!(leaf(Some("A.TEST.")), fx.a_der);
        assert_eq!(leaf(Some("b.test")), fx.b_der);
        assert_eq!(leaf(Some("deep.wild.test")), fx.b_der);
        assert_eq!(leaf(Some("wild.test")), fx.a_der);
        assert_eq!(leaf(Some("other")), fx.a_der);
        assert_eq!(leaf(None), fx.a_der);
    }

    #[test]
    fn der_lengths() {
        assert_eq!(
            der::next(&[0x04, 0x01, 0xAA, 0xBB]),
            Some((0x04, &[0xAA][..], &[0xBB][..]))
        );
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(vec![7; 256]);
        let (_, content, rest) = der::next(&long).unwrap();
        assert_eq!((content.len(), rest.len()), (256, 0));
        assert_eq!(
            der::next(&[0x04, 0x85, 1, 1, 1, 1, 1]),
            None,
            "5 length bytes"
        );
        assert_eq!(der::next(&[0x04, 0x02, 0x00]), None, "short content");
        assert_eq!(der::next(&[0x1F, 0x01, 0x00]), None, "high tag number");
    }
}
