//! Outbound HTTP: every client Keel builds (metadata and JWKS fetches, the registry client
//! and its HTTP checks, calls between services, token requests, trace export, the CLI)
//! starts from [`builder`] or [`blocking_builder`], so that all of them speak HTTPS alike:
//!
//! - rustls on ring, the one crypto library of the workspace. reqwest is built without a
//!   provider of its own and takes the process's default (it panics at every client build
//!   when there is none), so the builders install ring as that default first, unless the
//!   program installed one before;
//! - the system's roots (`/etc/ssl/certs`; `SSL_CERT_FILE` and `SSL_CERT_DIR` as OpenSSL
//!   reads them), plus the certificate authorities added with [`trust_ca_file`]
//!   (`[runtime] ca_file` of `keel`): a private CA that signs internal services'
//!   certificates, without replacing the public roots.
//!
//! - mutual TLS: the certificate set with [`present_certificate`] (`[runtime] client_cert`
//!   and `client_key`), presented to every server that asks for one.
//!
//! clippy's `disallowed-methods` (clippy.toml) keeps `reqwest::Client::new`, `builder` and
//! `reqwest::get` out of the rest of the workspace, tests included.

use std::path::Path;
use std::sync::{Arc, Mutex, Once, PoisonError, RwLock};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Roots trusted beyond the system's, added by [`trust_pem`] and [`trust_ca_file`].
static EXTRA_ROOTS: RwLock<Vec<CertificateDer<'static>>> = RwLock::new(Vec::new());

/// The verifier of [`hyper_connector`]'s connections, made for the roots trusted when it
/// was made and dropped when more are trusted: loading the system's roots is the dear
/// part, and every service client makes a connector.
static VERIFIER: Mutex<Option<Arc<rustls_platform_verifier::Verifier>>> = Mutex::new(None);

/// The certificate every client presents when a server asks for one.
static IDENTITY: RwLock<Option<Identity>> = RwLock::new(None);

/// A client certificate chain and its key, as rustls and reqwest each take them.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    reqwest: reqwest::Identity,
}

/// A client builder with the crypto provider installed, the extra roots trusted and the
/// client certificate, if any, presented.
#[allow(clippy::disallowed_methods)] // the one place reqwest clients are started
pub fn builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    let builder = extra_roots()
        .into_iter()
        .fold(reqwest::Client::builder(), |builder, root| {
            builder.add_root_certificate(root)
        });
    match reqwest_identity() {
        Some(identity) => builder.identity(identity),
        None => builder,
    }
}

/// A connector for hyper clients built without reqwest (the gateway's upstreams, the
/// SDK's gRPC channels): plain TCP for `http` URIs, and for `https` ones TLS as
/// [`builder`]'s clients speak it, asking the server by ALPN for HTTP/2 (`h2`: gRPC, and
/// an HTTP/2 upstream, which may speak nothing else) or for nothing (HTTP/1.1). `tcp` keeps
/// its settings (connect timeout, nodelay); only its refusal of `https` URIs is lifted,
/// since TLS runs over it.
pub fn hyper_connector(
    mut tcp: HttpConnector,
    http2: bool,
) -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    tcp.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls_config()?)
        .https_or_http();
    Ok(if http2 {
        builder.enable_http2().wrap_connector(tcp)
    } else {
        builder.enable_http1().wrap_connector(tcp)
    })
}

/// A rustls client configuration: ring, and the same roots as [`builder`]'s clients (the
/// system's and the extra ones), checked by the platform verifier as reqwest's are.
fn rustls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = {
        let mut cached = VERIFIER.lock().unwrap_or_else(PoisonError::into_inner);
        match cached.as_ref() {
            Some(verifier) => Arc::clone(verifier),
            None => {
                let roots = EXTRA_ROOTS
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let verifier = Arc::new(rustls_platform_verifier::Verifier::new_with_extra_roots(
                    roots,
                    Arc::clone(&provider),
                )?);
                *cached = Some(Arc::clone(&verifier));
                verifier
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let identity = IDENTITY.read().unwrap_or_else(PoisonError::into_inner);
    match identity.as_ref() {
        Some(identity) => {
            builder.with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The same for reqwest's blocking client (what the OTLP exporter sends with, from a
/// thread of its own).
#[allow(clippy::disallowed_methods)]
pub fn blocking_builder() -> reqwest::blocking::ClientBuilder {
    install_crypto_provider();
    let builder = extra_roots()
        .into_iter()
        .fold(reqwest::blocking::Client::builder(), |builder, root| {
            builder.add_root_certificate(root)
        });
    match reqwest_identity() {
        Some(identity) => builder.identity(identity),
        None => builder,
    }
}

/// Makes every client built from now on present the certificate chain of the PEM file
/// `cert` (leaf first), with the private key of `key`, to servers that ask for one:
/// mutual TLS. The pair is checked here, so that a key of another certificate stops the
/// start instead of failing every handshake.
pub fn present_certificate(cert: &Path, key: &Path) -> Result<(), String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{}: {error}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|error| format!("{} holds no usable private key: {error}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider).map_err(
        |error| {
            format!(
                "{} and {} are not a usable pair: {error}",
                cert.display(),
                key.display()
            )
        },
    )?;
    // reqwest reads its own PEM, taking the last key of a file (rustls the first) and
    // refusing other sections (`EC PARAMETERS`): it gets what was checked, written anew.
    let pem: String = chain
        .iter()
        .map(|certificate| pem_block("CERTIFICATE", certificate))
        .chain(std::iter::once(pem_block(
            match &private {
                PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
                PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
                _ => "PRIVATE KEY",
            },
            private.secret_der(),
        )))
        .collect();
    let reqwest = reqwest::Identity::from_pem(pem.as_bytes())
        .map_err(|error| format!("{} and {}: {error}", cert.display(), key.display()))?;
    *IDENTITY.write().unwrap_or_else(PoisonError::into_inner) = Some(Identity {
        chain,
        key: private,
        reqwest,
    });
    Ok(())
}

/// `der` as a PEM section.
fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let base64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in base64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem + &format!("-----END {label}-----\n")
}

fn reqwest_identity() -> Option<reqwest::Identity> {
    IDENTITY
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|identity| identity.reqwest.clone())
}

/// Makes ring the process's rustls provider, once; a provider the program installed
/// before is kept (rustls refuses a second).
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An error and its sources, `: `-joined, each said once: what to log about a failed
/// call (reqwest's own text is "error sending request for url (…)"; the reason, such as a
/// refused connection or an untrusted certificate, is in its sources).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    for cause in std::iter::successors(error.source(), |cause| cause.source()) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn extra_roots() -> Vec<reqwest::Certificate> {
    EXTRA_ROOTS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(|root| reqwest::Certificate::from_der(root).ok())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the CA file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no usable PEM certificate{detail}")]
    NoCertificate { path: String, detail: String },
}

/// Trusts every certificate of a PEM bundle as a root for clients built from now on.
/// Returns how many were added; a file without one is an error (a key file given by
/// mistake would otherwise leave the CA silently untrusted).
pub fn trust_ca_file(path: &Path) -> Result<usize, TrustError> {
    let pem = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.display().to_string(),
        source,
    })?;
    trust_pem(&pem).map_err(|detail| TrustError::NoCertificate {
        path: path.display().to_string(),
        detail,
    })
}

/// [`trust_ca_file`] for PEM text in memory; the error says what was wrong with it.
pub fn trust_pem(pem: &[u8]) -> Result<usize, String> {
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!(": {error}"))?;
    if roots.is_empty() {
        return Err(String::new());
    }
    let added = roots.len();
    EXTRA_ROOTS
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(roots);
    // After the roots changed: a verifier made of the old ones holds the cache's lock
    // from reading them to caching it, so it is cached before this drops it.
    *VERIFIER.lock().unwrap_or_else(PoisonError::into_inner) = None;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused_and_trusts_nothing() {
        let dir = std::env::temp_dir().join(format!("keel-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = trust_ca_file(&key).unwrap_err().to_string();
        assert!(
            error.contains("key.pem") && error.contains("no usable PEM certificate"),
            "{error}"
        );
        let missing = trust_ca_file(&dir.join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read the CA file"), "{missing}");
        assert!(extra_roots().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Outer(#[source] std::io::Error);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            error_chain(&Outer(refused)),
            "error sending request: refused"
        );
        let error = std::io::Error::other(Outer(std::io::Error::other("x")));
        // io::Error's text is its inner error's, whose source is then said once.
        assert_eq!(error_chain(&error), "error sending request: x");
    }

    #[test]
    fn clients_build_without_a_provider_installed_by_the_program() {
        // reqwest without a crypto provider of its own panics here unless one is installed.
        let client = builder().build();
        assert!(client.is_ok());
    }
}
