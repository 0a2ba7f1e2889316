//! `[auth]`: the authorization server's configuration.

use std::net::SocketAddr;
use std::time::Duration;

use keel_runtime::{HttpServerConfig, Secret};
use serde::{Deserialize, Serialize};

use crate::keys::SigningAlg;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub listen: SocketAddr,
    /// The issuer identifier, as tokens' `iss` and the metadata say it (no trailing
    /// slash). Unset: `http://` and the bound address, fit for development only.
    pub issuer: Option<String>,
    /// `postgres://…` (production) or `sqlite://path` (embedded; created when missing).
    pub database: String,
    /// 32 bytes in unpadded base64url (`keel auth key` prints a new one): private signing
    /// keys are sealed under it and client secrets hashed with it. Required with
    /// PostgreSQL. Unset with SQLite: generated on first start and kept in a file beside
    /// the database (`<database>.key`, readable by its owner only), which is convenient for
    /// development and no protection at rest.
    pub key_encryption_key: Option<Secret<String>>,
    /// Algorithm of tokens for clients that do not choose one.
    pub signing_alg: SigningAlg,
    /// Lifetime of access tokens for clients that do not set their own.
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// `aud` of access tokens for clients registered without audiences.
    pub default_audience: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    pub http: HttpServerConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8400)),
            issuer: None,
            database: "sqlite://.keel/auth.db".to_owned(),
            key_encryption_key: None,
            signing_alg: SigningAlg::RS256,
            access_token_ttl: Duration::from_secs(10 * 60),
            default_audience: "keel-api".to_owned(),
            max_body_bytes: 64 * 1024,
            http: HttpServerConfig::default(),
        }
    }
}
