//! `[gateway.tls]`: the gateway's HTTPS listener. Termination itself (certificates by SNI,
//! reloads, ALPN) is keel-runtime's, shared with every server's `[<component>.http.tls]`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use keel_runtime::tls::{CertificateConfig, Tls};

/// `[gateway.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Where HTTPS is served.
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    /// One entry per certificate; the first also answers clients that send no (or an
    /// unknown) server name.
    pub certificates: Vec<CertificateConfig>,
    /// The plain listener answers every request with a 308 to the same URL on HTTPS.
    #[serde(default)]
    pub redirect_http: bool,
    /// Mutual TLS: a PEM file of certificate authorities; only clients presenting a
    /// certificate one of them signed get through the handshake. Needs `redirect_http`,
    /// or the plain listener would serve the routes to anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<std::path::PathBuf>,
}

fn default_tls_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
