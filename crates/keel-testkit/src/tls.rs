//! HTTPS for tests: a private certificate authority and a TLS front that puts any
//! plain-HTTP test server behind `https://localhost:<port>`, with a certificate that CA
//! signed. Clients trust it only when told to (`keel_runtime::http_client::trust_pem`,
//! `[runtime] ca_file`), as with an internal CA in production.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Keel test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("an ECDSA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("a self-signed CA");
        Self { issuer }
    }

    /// The CA's certificate, PEM: what a client is told to trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `localhost` and `127.0.0.1` signed by this CA, and its key.
    fn leaf(&self) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("valid names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("an ECDSA key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a certificate signed by the CA");
        (cert, key)
    }

    /// A TLS acceptor presenting a certificate for `localhost` and `127.0.0.1`, signed by
    /// this CA.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor_agreeing(Vec::new())
    }

    /// The same, agreeing by ALPN to `protocols` alone (none: no ALPN).
    fn acceptor_agreeing(&self, protocols: Vec<Vec<u8>>) -> TlsAcceptor {
        let (cert, key) = self.leaf();
        let chain = vec![cert.der().clone(), CertificateDer::clone(self.issuer.der())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the certificate matches its key");
        config.alpn_protocols = protocols;
        TlsAcceptor::from(Arc::new(config))
    }

    /// The same certificate as PEM files in `dir` (`server.crt`, the chain; `server.key`),
    /// for a server configured with files.
    pub fn server_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf();
        self.write(dir, "server", &cert, &key)
    }

    /// A client certificate (mutual TLS) signed by this CA, as PEM files in `dir`
    /// (`client.crt`, the chain; `client.key`).
    pub fn client_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "keel-test-client");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("an ECDSA key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a certificate signed by the CA");
        self.write(dir, "client", &cert, &key)
    }

    /// The CA's certificate as a PEM file in `dir` (`ca.crt`): a server's client CA.
    pub fn ca_file(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("the directory");
        let file = dir.join("ca.crt");
        std::fs::write(&file, self.pem()).expect("the CA file");
        file
    }

    fn write(
        &self,
        dir: &Path,
        name: &str,
        cert: &rcgen::Certificate,
        key: &KeyPair,
    ) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("the directory");
        let (cert_file, key_file) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_file, cert.pem() + &self.pem()).expect("the certificate file");
        std::fs::write(&key_file, key.serialize_pem()).expect("the key file");
        (cert_file, key_file)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// Terminates TLS on a port of its own and relays each connection's bytes to a plain
/// backend. Bound first ([`TlsFront::bind`]) so that its URL is known before the backend
/// starts (an issuer names itself by it); relays once [`TlsFront::relay_to`] is called.
/// Stops when dropped.
pub struct TlsFront {
    listener: Option<TcpListener>,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    task: Option<JoinHandle<()>>,
}

impl TlsFront {
    pub async fn bind(ca: &TestCa) -> Self {
        Self::bind_with(ca.acceptor()).await
    }

    async fn bind_with(acceptor: TlsAcceptor) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        Self {
            listener: Some(listener),
            addr,
            acceptor,
            task: None,
        }
    }

    /// A front relaying to `backend` at once (when nothing needs its URL before).
    pub async fn to(ca: &TestCa, backend: SocketAddr) -> Self {
        let mut front = Self::bind(ca).await;
        front.relay_to(backend);
        front
    }

    /// A front relaying to an HTTP/2 backend (h2c), agreeing by ALPN to `h2` and nothing
    /// else, as an HTTP/2-only server does: a client asking for another protocol, or for
    /// none, is dropped.
    pub async fn h2_to(ca: &TestCa, backend: SocketAddr) -> Self {
        let mut front = Self::bind_with(ca.acceptor_agreeing(vec![b"h2".to_vec()])).await;
        front.relay_to(backend);
        front
    }

    /// `https://localhost:<port>`.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts relaying to `backend`. Connections whose handshake fails (a client that
    /// does not trust the CA) are dropped.
    pub fn relay_to(&mut self, backend: SocketAddr) {
        let listener = self.listener.take().expect("relay_to is called once");
        let acceptor = self.acceptor.clone();
        // A front that agrees protocols by ALPN drops a client that agreed none (rustls
        // itself refuses only a client that offers others, not one that offers none).
        let alpn_required = !acceptor.config().alpn_protocols.is_empty();
        self.task = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    if alpn_required && client.get_ref().1.alpn_protocol().is_none() {
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }));
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
