//! TLS termination (rustls with the ring provider), for the gateway's HTTPS listener and
//! every server's `[<component>.http.tls]`: certificates from PEM files, chosen by SNI,
//! reloaded when their files change without a restart, ALPN for HTTP/2, and mutual TLS:
//! with a client CA file, only clients presenting a certificate it signed are served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;
use crate::watch::FileWatch;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Server names it is chosen for: `shop.example`, `*.shop.example` (none: only as the
    /// default).
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The certificates by server name, swapped whole on reload.
#[derive(Debug)]
struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `.example.com`.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl CertStore {
    /// `context` names the configuration in errors (`gateway.tls`).
    fn load(
        config: &[CertificateConfig],
        provider: &CryptoProvider,
        context: &str,
    ) -> Result<Self, String> {
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        let mut default = None;
        for entry in config {
            let key = Arc::new(load_certified_key(entry, provider, context)?);
            default.get_or_insert_with(|| Arc::clone(&key));
            for host in &entry.hosts {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => {
                        wildcard.push((suffix.to_owned(), Arc::clone(&key)));
                    }
                    _ => {
                        exact.insert(host, Arc::clone(&key));
                    }
                }
            }
        }
        let default = default.ok_or_else(|| format!("{context}: no certificate configured"))?;
        Ok(Self {
            exact,
            wildcard,
            default,
        })
    }

    fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return Arc::clone(&self.default);
        };
        if let Some(key) = self.exact.get(&name) {
            return Arc::clone(key);
        }
        self.wildcard
            .iter()
            // A wildcard covers exactly one label (RFC 6125 §6.4.3).
            .find(|(suffix, _)| {
                name.strip_suffix(suffix.as_str())
                    .is_some_and(|label| !label.is_empty() && !label.contains('.'))
            })
            .map_or_else(|| Arc::clone(&self.default), |(_, key)| Arc::clone(key))
    }
}

fn load_certified_key(
    entry: &CertificateConfig,
    provider: &CryptoProvider,
    context: &str,
) -> Result<CertifiedKey, String> {
    let (cert, key) = (&entry.cert, &entry.key);
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("{context}: certificate {}: {error}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{context}: {} holds no certificate",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| format!("{context}: private key {}: {error}", key.display()))?;
    CertifiedKey::from_der(chain, private, provider).map_err(|error| {
        format!(
            "{context}: {} and {} do not make a usable pair: {error}",
            cert.display(),
            key.display()
        )
    })
}

/// Resolves certificates from the current store.
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<CertStore>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()))
    }
}

/// Checks client certificates against the certificate authorities of a file, with a
/// verifier swapped whole when the file is reloaded (rustls' server configuration, which
/// holds this, is immutable).
#[derive(Debug)]
struct ClientAuth(ArcSwap<Arc<dyn ClientCertVerifier>>);

impl ClientAuth {
    fn load(
        file: &Path,
        provider: &Arc<CryptoProvider>,
        context: &str,
    ) -> Result<Arc<dyn ClientCertVerifier>, String> {
        let named = |error: &dyn std::fmt::Display| {
            format!("{context}: client CA file {}: {error}", file.display())
        };
        let certificates = CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| named(&error))?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in certificates {
            roots.add(certificate).map_err(|error| named(&error))?;
        }
        if roots.is_empty() {
            return Err(named(&"holds no certificate"));
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .build()
            .map_err(|error| named(&error))
    }
}

impl ClientCertVerifier for ClientAuth {
    /// Said outright rather than left to the trait's defaults: a certificate is asked of
    /// every client, and a handshake without one fails.
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// None: hints would borrow from a verifier that a reload may drop, and a client
    /// presents its one certificate whatever the hints.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }
}

/// The TLS side of an HTTPS listener.
pub struct Tls {
    store: Arc<ArcSwap<CertStore>>,
    config: Vec<CertificateConfig>,
    /// The client CA file and its verifier, with mutual TLS.
    client_auth: Option<(PathBuf, Arc<ClientAuth>)>,
    context: String,
    provider: Arc<CryptoProvider>,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    /// Loads `certificates` (the first is the default) and, for mutual TLS, the
    /// certificate authorities of `client_ca`, one of which must have signed a client's
    /// certificate for its handshake to succeed; `context` names their configuration in
    /// errors.
    pub fn new(
        certificates: &[CertificateConfig],
        client_ca: Option<&Path>,
        context: &str,
    ) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let store = Arc::new(ArcSwap::from_pointee(CertStore::load(
            certificates,
            &provider,
            context,
        )?));
        let client_auth = client_ca
            .map(|file| {
                let verifier = ClientAuth::load(file, &provider, context)?;
                let auth = Arc::new(ClientAuth(ArcSwap::from_pointee(verifier)));
                Ok::<_, String>((file.to_owned(), auth))
            })
            .transpose()?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("{context}: {error}"))?;
        let builder = match &client_auth {
            Some((_, auth)) => builder.with_client_cert_verifier(Arc::clone(auth) as _),
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(Arc::new(Resolver(Arc::clone(&store))));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if client_auth.is_some() {
            // A resumed session skips the certificate check and carries the one made when
            // it began: a client whose CA has left the file could go on resuming. Every
            // connection checks its certificate instead (clients pool their connections,
            // so full handshakes stay few).
            server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
        }
        Ok(Self {
            store,
            config: certificates.to_vec(),
            client_auth,
            context: context.to_owned(),
            provider,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// Loads the certificate files (and the client CA file) again; a broken set is
    /// refused and the running one kept.
    pub fn reload(&self) -> Result<(), String> {
        let store = CertStore::load(&self.config, &self.provider, &self.context)?;
        let client_auth = self
            .client_auth
            .as_ref()
            .map(|(file, auth)| {
                ClientAuth::load(file, &self.provider, &self.context).map(|v| (auth, v))
            })
            .transpose()?;
        self.store.store(Arc::new(store));
        if let Some((auth, verifier)) = client_auth {
            auth.0.store(Arc::new(verifier));
        }
        Ok(())
    }

    /// Reloads whenever a certificate, key or client CA file's contents change.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        let files = self
            .config
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .chain(self.client_auth.as_ref().map(|(file, _)| file.clone()))
            .collect();
        let mut files = FileWatch::new(files);
        while files.changed(interval, &shutdown).await {
            match self.reload() {
                Ok(()) => tracing::info!(config = %self.context, "TLS certificates reloaded"),
                Err(error) => tracing::error!(
                    %error,
                    "TLS certificates not reloaded; the running ones keep serving"
                ),
            }
        }
    }
}
