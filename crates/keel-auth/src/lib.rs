//! Keel's authorization server: OAuth 2.0 and OpenID Connect for every Keel system, on
//! PostgreSQL (production) or SQLite (embedded).
//!
//! Discovery (OpenID Connect Discovery, RFC 8414) and the JWK Set; signing keys (RS256,
//! ES256, EdDSA) sealed at rest and rotated by publishing first; the authorization code
//! grant with PKCE and its sign-in and consent pages, client credentials, refresh token
//! rotation with reuse detection, the device grant (RFC 8628); client authentication by
//! secret (Basic or form), `private_key_jwt` or none; RFC 9068 access tokens and OpenID
//! Connect ID tokens; introspection, revocation, userinfo and RP-initiated logout; users
//! with argon2id passwords, lockout and an optional TOTP second factor; roles, groups and
//! scopes (RBAC); an admin REST API and the audit trail. [`AuthServer`] serves it;
//! [`AuthAdmin`] administers it (the CLI uses it). ARCHITECTURE.md describes each part.

mod account;
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
