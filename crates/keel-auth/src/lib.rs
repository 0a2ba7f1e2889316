//! Keel's authorization server: OAuth 2.0 and OpenID Connect for every Keel system, on
//! PostgreSQL (production) or SQLite (embedded).
//!
//! Built so far: discovery metadata (OpenID Connect Discovery and RFC 8414), the JWK Set,
//! signing keys (RS256, ES256, EdDSA; generated, sealed at rest under the configured key
//! encryption key), clients (`client_secret_basic`, `client_secret_post`, public), the
//! token endpoint with the client credentials grant issuing RFC 9068 access tokens, and
//! the audit trail. The other grants, endpoints, users and RBAC follow (ARCHITECTURE.md).

pub mod admin_api;
mod assertion;
pub mod audit;
mod authorize;
pub mod clients;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod db;
mod device;
pub mod error;
mod html;
mod introspect;
pub mod keys;
mod logout;
mod metadata;
pub mod rbac;
pub mod scope;
mod server;
mod sweep;
mod throttle;
mod token;
pub mod totp;
pub mod users;

pub use clients::{AuthMethod, Client, Clients, GrantType, NewClient};
pub use clock::Clock;
pub use config::AuthConfig;
pub use keys::SigningAlg;
pub use rbac::Subject;
pub use server::{AuthAdmin, AuthServer, SeedError, Seeded, StartError};
pub use users::{NewUser, User};
