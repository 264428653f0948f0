//! A certificate authority made at run time, for TLS tests.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A self-signed CA that signs server certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate (PEM), for clients to trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate and key (PEM) for these names; IP addresses
    /// become IP subject alternative names.
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "rlsproxy test server");
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `ca.pem`, `<stem>.crt` and `<stem>.key` for `localhost` and
    /// 127.0.0.1 into `dir`; returns (ca, cert, key) paths.
    pub fn write_server_files(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.server_cert(&["localhost", "127.0.0.1"]);
        let paths = (
            dir.join(format!("{stem}-ca.pem")),
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&paths.0, self.pem()).expect("write CA");
        std::fs::write(&paths.1, cert).expect("write cert");
        std::fs::write(&paths.2, key).expect("write key");
        paths
    }
}
