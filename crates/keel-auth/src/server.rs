//! The authorization server: startup contract, shared state, routes.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use keel_runtime::http::{BindError, bind_listener};
use keel_runtime::{Health, HttpServer, Server, Shutdown};
use serde_json::json;

use crate::audit::{Audit, Event, EventKind};
use crate::clients::{Client, ClientError, Clients, NewClient};
use crate::clock::Clock;
use crate::config::AuthConfig;
use crate::crypto::{KeyError as KekError, Secrets};
use crate::db::{Backend, Db, DbError};
use crate::error::OAuthError;
use crate::keys::{KeyError, KeyRing};
use crate::scope::Scopes;
use crate::{metadata, token};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("auth database: {0}")]
    Db(#[from] DbError),
    #[error("auth.key_encryption_key: {0}")]
    Kek(#[from] KekError),
    #[error(
        "auth.key_encryption_key is required with PostgreSQL (generate one with `keel auth key`)"
    )]
    KekRequired,
    #[error("auth key file {path}: {error}")]
    KekFile { path: String, error: io::Error },
    #[error("auth signing keys: {0}")]
    Keys(#[from] KeyError),
    #[error("auth.issuer {0:?} must be an http(s) URL without query, fragment or trailing slash")]
    Issuer(String),
}

/// What every request handler shares.
pub(crate) struct AppState {
    pub(crate) issuer: String,
    pub(crate) config: AuthConfig,
    pub(crate) clients: Clients,
    pub(crate) keys: KeyRing,
    pub(crate) secrets: Secrets,
    pub(crate) audit: Audit,
    pub(crate) clock: Clock,
}

/// An access token as issued.
pub(crate) struct Issued {
    pub(crate) token: String,
    pub(crate) issued_at: i64,
    pub(crate) expires_in: i64,
}

impl AppState {
    /// A JWT access token (RFC 9068) for `subject`, issued to `client` with `scopes`.
    pub(crate) fn issue_access_token(
        &self,
        client: &Client,
        subject: &str,
        scopes: &Scopes,
    ) -> Result<Issued, OAuthError> {
        let now = self.clock.now();
        let alg = client.signing_alg.unwrap_or(self.config.signing_alg);
        let Some(key) = self.keys.active(alg, now) else {
            tracing::error!(alg = alg.name(), "no active signing key");
            return Err(OAuthError::server_error());
        };
        let expires_in = client.access_token_ttl.unwrap_or_else(|| {
            i64::try_from(self.config.access_token_ttl.as_secs()).unwrap_or(i64::MAX)
        });
        let audience = match client.audiences.as_slice() {
            [] => json!(self.config.default_audience),
            [one] => json!(one),
            many => json!(many),
        };
        let mut claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now.saturating_add(expires_in),
            "iat": now,
            "jti": self.secrets.generate_id(),
            "client_id": client.client_id,
        });
        if !scopes.is_empty() {
            claims["scope"] = json!(scopes.to_string());
        }
        Ok(Issued {
            token: key.sign_jwt("at+jwt", &claims, self.secrets.rng()),
            issued_at: now,
            expires_in,
        })
    }
}

/// A bound authorization server.
pub struct AuthServer {
    http: HttpServer,
    state: Arc<AppState>,
}

impl AuthServer {
    /// Connects to and migrates the database, makes sure signing keys exist, and binds.
    pub async fn build(config: AuthConfig, shutdown: &Shutdown) -> Result<Self, StartError> {
        Self::build_with_clock(config, shutdown, Clock::system()).await
    }

    /// As [`AuthServer::build`], on `clock` (tests move it to expire codes and tokens).
    pub async fn build_with_clock(
        config: AuthConfig,
        _shutdown: &Shutdown,
        clock: Clock,
    ) -> Result<Self, StartError> {
        let db = Db::connect(&config.database).await?;
        let secrets = secrets_for(&config, db.backend())?;
        let keys = KeyRing::load(&db, &secrets).await?;
        let made = keys.ensure_active(&db, &secrets, clock.now()).await?;
        let audit = Audit::new(db.clone());
        for kid in &made {
            let event = Event {
                detail: Some(format!("kid {kid}")),
                ..Event::default()
            };
            audit
                .record(clock.now(), EventKind::KeyGenerated, true, event)
                .await;
        }
        let listener = bind_listener("auth", config.listen).await?;
        let addr = listener
            .local_addr()
            .map_err(|error| BindError::new("auth", config.listen, error))?;
        let issuer = match &config.issuer {
            Some(issuer) => valid_issuer(issuer)?,
            None => format!("http://{addr}"),
        };
        let state = Arc::new(AppState {
            issuer,
            clients: Clients::new(db.clone()),
            keys,
            secrets,
            audit,
            clock,
            config,
        });
        let router = router(Arc::clone(&state));
        let http = HttpServer::from_listener(
            "auth",
            listener,
            router,
            Health::new(),
            state.config.http.clone(),
        );
        Ok(Self { http, state })
    }

    /// The issuer identifier tokens carry.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// A handle for administering this server while it runs.
    pub fn admin(&self) -> AuthAdmin {
        AuthAdmin(Arc::clone(&self.state))
    }
}

/// Administration of a running server (the CLI and the admin API use it).
#[derive(Clone)]
pub struct AuthAdmin(Arc<AppState>);

impl AuthAdmin {
    /// Registers a client; returns it and its secret (shown this once), and records it in
    /// the audit trail.
    pub async fn create_client(
        &self,
        new: NewClient,
    ) -> Result<(Client, Option<String>), ClientError> {
        let state = &self.0;
        let now = state.clock.now();
        let created = state.clients.create(&state.secrets, new, now).await?;
        state
            .audit
            .record(
                now,
                EventKind::ClientCreated,
                true,
                Event {
                    client_id: Some(&created.0.client_id),
                    detail: Some(format!("auth method {}", created.0.auth_method.name())),
                    ..Event::default()
                },
            )
            .await;
        Ok(created)
    }

    pub fn issuer(&self) -> &str {
        &self.0.issuer
    }

    pub fn clock(&self) -> &Clock {
        &self.0.clock
    }
}

fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/.well-known/openid-configuration", get(metadata::metadata))
        .route(
            "/.well-known/oauth-authorization-server",
            get(metadata::metadata),
        )
        .route("/jwks.json", get(metadata::jwks))
        .route("/token", post(token::token))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// RFC 8414 §2: an https URL with no query or fragment (http allowed here for
/// development and tests); no trailing slash, since `iss` is compared exactly.
fn valid_issuer(issuer: &str) -> Result<String, StartError> {
    let bad = || StartError::Issuer(issuer.to_owned());
    let url = url::Url::parse(issuer).map_err(|_| bad())?;
    if !matches!(url.scheme(), "https" | "http")
        || url.host().is_none()
        || url.query().is_some()
        || url.fragment().is_some()
        || issuer.ends_with('/')
    {
        return Err(bad());
    }
    Ok(issuer.to_owned())
}

/// The configured key encryption key; with SQLite and none configured, the one kept
/// beside the database (made on first start).
fn secrets_for(config: &AuthConfig, backend: Backend) -> Result<Secrets, StartError> {
    if let Some(key) = &config.key_encryption_key {
        return Ok(Secrets::from_base64(key.expose())?);
    }
    if backend != Backend::Sqlite {
        return Err(StartError::KekRequired);
    }
    let path = key_file(&config.database);
    let file_error = |error| StartError::KekFile {
        path: path.display().to_string(),
        error,
    };
    match std::fs::read_to_string(&path) {
        Ok(key) => Ok(Secrets::from_base64(&key)?),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let key = Secrets::generate_key();
            write_private(&path, &key).map_err(file_error)?;
            tracing::warn!(
                path = %path.display(),
                "generated a key encryption key and stored it beside the database: fine for development, set auth.key_encryption_key in production"
            );
            Ok(Secrets::from_base64(&key)?)
        }
        Err(error) => Err(file_error(error)),
    }
}

fn key_file(database: &str) -> PathBuf {
    match crate::db::sqlite_path(database) {
        Some(path) => PathBuf::from(format!("{path}.key")),
        // An in-memory database's keys die with it; its key file is per process.
        None => std::env::temp_dir().join(format!("keel-auth-{}.key", std::process::id())),
    }
}

/// Writes `contents` to a new file only its owner can read.
fn write_private(path: &std::path::Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

impl Server for AuthServer {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn local_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        self.http.run(shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_urls_compared_exactly() {
        assert!(valid_issuer("https://auth.example").is_ok());
        assert!(valid_issuer("http://127.0.0.1:8400").is_ok());
        assert!(valid_issuer("https://example/realms/keel").is_ok());
        for bad in [
            "https://auth.example/",
            "https://auth.example?x=1",
            "https://auth.example#f",
            "ftp://auth.example",
            "auth.example",
        ] {
            assert!(valid_issuer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_file_sits_beside_the_database() {
        assert_eq!(
            key_file("sqlite://.keel/auth.db?mode=rwc"),
            PathBuf::from(".keel/auth.db.key")
        );
        assert_eq!(
            key_file("sqlite:/var/keel/auth.db"),
            PathBuf::from("/var/keel/auth.db.key")
        );
    }
}
