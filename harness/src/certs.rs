//! Test certificates, made in-process with rcgen: self-signed ECDSA P-256
//! leaves (CA:FALSE, which webpki wants of a server's own certificate).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A self-signed certificate and its key.
#[derive(Clone, Debug)]
pub struct TestCert {
    /// Certificate then key, as `[listener.tls] certs` wants it.
    pub bundle: PathBuf,
    /// The certificate alone (PEM).
    pub cert_pem: String,
    /// The certificate (DER), to compare with what a client was shown.
    pub der: Vec<u8>,
    /// Its subject CN.
    pub cn: String,
}

/// Makes `<dir>/<cn>.pem` for the DNS names `sans`, subject `CN=<cn>`.
pub fn make_cert(dir: &Path, cn: &str, sans: &[&str]) -> TestCert {
    let key = KeyPair::generate().expect("generating an ECDSA P-256 key");
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("valid DNS names");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).expect("signing the certificate");
    let cert_pem = cert.pem();
    let bundle = dir.join(format!("{cn}.pem"));
    fs::write(&bundle, format!("{cert_pem}{}", key.serialize_pem())).unwrap_or_else(|e| {
        panic!("writing {}: {e}", bundle.display());
    });
    TestCert {
        bundle,
        cert_pem,
        der: cert.der().to_vec(),
        cn: cn.to_string(),
    }
}

/// `openssl x509 -noout -subject -ext subjectAltName` of a DER
/// certificate: how an independent tool reads it, for messages and checks.
pub fn describe_cert(der: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args([
            "x509",
            "-inform",
            "DER",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running openssl x509");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(der).expect("writing the certificate");
    }
    let out = child.wait_with_output().expect("openssl x509 output");
    assert!(
        out.status.success(),
        "openssl x509 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
