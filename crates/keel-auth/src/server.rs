//! The authorization server: startup contract, shared state, routes.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts};
use axum::routing::{get, post};
use http::request::Parts;
use keel_runtime::http::{BindError, bind_listener};
use keel_runtime::{Health, HttpServer, Server, Shutdown};
use serde_json::json;

use crate::audit::{Audit, AuditRecord, Event, EventKind};
use crate::clients::{AuthMethod, Client, ClientError, Clients, GrantType, NewClient};
use crate::clock::Clock;
use crate::config::AuthConfig;
use crate::crypto::{KeyError as KekError, Secrets};
use crate::db::{Backend, Db, DbError};
use crate::error::OAuthError;
use crate::keys::SigningAlg;
use crate::keys::{KeyError, KeyRing, SigningKey};
use crate::rbac::{Holdings, Rbac, RbacError, Role, Subject};
use crate::scope::Scopes;
use crate::throttle::AddressFailures;
use crate::users::{NewUser, PasswordHashing, User, UserError, Users};
use crate::{account, admin_api, authorize, device, introspect, logout, metadata, token};
use base64::Engine;

/// How often the signing keys are read again from the database: well within the key
/// set's cache lifetime (`Cache-Control: max-age=300`).
const KEY_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Sweeps of expired rows happen every this many key reloads (5 minutes).
const SWEEP_EVERY: u64 = 5;

/// Why the demo data could not be made.
#[derive(Debug, thiserror::Error)]
#[error("seeding the demo users and client: {0}")]
pub struct SeedError(String);

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
    #[error("password hashing: {0}")]
    Hashing(String),
    #[error(
        "auth.issuer {0:?} must be an http(s) URL of scheme, host and port only (no path, query, fragment or trailing slash)"
    )]
    Issuer(String),
    #[error(
        "auth.issuer must be set when auth.listen is {0} (all interfaces): tokens name their issuer, and 0.0.0.0 is nobody's address"
    )]
    IssuerRequired(SocketAddr),
    #[error("{0}")]
    Config(String),
}

/// What every request handler shares.
pub(crate) struct AppState {
    pub(crate) issuer: String,
    pub(crate) config: AuthConfig,
    pub(crate) db: Db,
    pub(crate) clients: Clients,
    pub(crate) users: Users,
    pub(crate) rbac: Rbac,
    pub(crate) hashing: PasswordHashing,
    pub(crate) keys: KeyRing,
    pub(crate) secrets: Secrets,
    pub(crate) audit: Audit,
    pub(crate) clock: Clock,
    pub(crate) address_failures: AddressFailures,
}

/// The address a request came from, for the sign-in limits and the audit trail: the
/// connection's peer, or, from one of `auth.trusted_proxies`, the client they forwarded.
pub(crate) struct ClientAddr(pub(crate) IpAddr);

impl FromRequestParts<Arc<AppState>> for ClientAddr {
    type Rejection = <ConnectInfo<SocketAddr> as FromRequestParts<Arc<AppState>>>::Rejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(parts, state).await?;
        Ok(Self(
            state
                .config
                .trusted_proxies
                .client(peer.ip(), &parts.headers),
        ))
    }
}

/// An access token as issued.
pub(crate) struct Issued {
    pub(crate) token: String,
    pub(crate) issued_at: i64,
    pub(crate) expires_in: i64,
}

impl AppState {
    /// Connects to the database and loads the keys; `ensure_keys` also makes the missing
    /// ones (a serving server; the CLI only reads and writes records).
    async fn open(
        config: AuthConfig,
        issuer: String,
        clock: Clock,
        ensure_keys: bool,
    ) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let db = Db::connect(config.database.expose(), &crate::db::MIGRATIONS).await?;
        let secrets = secrets_for(&config, db.backend())?;
        let keys = KeyRing::load(&db, &secrets).await?;
        let audit = Audit::new(db.clone());
        if ensure_keys {
            for kid in keys.ensure_active(&db, &secrets, clock.now()).await? {
                let event = Event {
                    detail: Some(format!("kid {kid}")),
                    ..Event::default()
                };
                audit
                    .record(clock.now(), EventKind::KeyGenerated, true, event)
                    .await;
            }
        }
        let hashing = PasswordHashing::new(&secrets)
            .await
            .map_err(|error| StartError::Hashing(error.to_string()))?;
        let address_failures = AddressFailures::new(
            config.lockout.per_address,
            i64::try_from(config.lockout.address_window.as_secs()).unwrap_or(i64::MAX),
        );
        Ok(Self {
            address_failures,
            issuer,
            users: Users::new(db.clone()),
            rbac: Rbac::new(db.clone()),
            hashing,
            db: db.clone(),
            clients: Clients::new(db),
            keys,
            secrets,
            audit,
            clock,
            config,
        })
    }

    /// The key that signs `client`'s tokens now (its algorithm, or the default).
    fn signing_key(&self, client: &Client, now: i64) -> Result<Arc<SigningKey>, OAuthError> {
        let alg = client.signing_alg.unwrap_or(self.config.signing_alg);
        self.keys.active(alg, now).ok_or_else(|| {
            tracing::error!(alg = alg.name(), "no active signing key");
            OAuthError::server_error()
        })
    }

    /// The audiences of the access tokens issued to `client`: its own, or the default.
    pub(crate) fn audiences<'a>(&'a self, client: &'a Client) -> Vec<&'a str> {
        match client.audiences.as_slice() {
            [] => vec![self.config.default_audience.as_str()],
            many => many.iter().map(String::as_str).collect(),
        }
    }

    /// A JWT access token (RFC 9068) for `subject`, issued to `client` with `scopes` and
    /// the roles of `holdings` meant for the token's audience.
    /// Its `jti` is recorded with the grant it belongs to (`family`), so that
    /// introspection can tell a revoked token.
    pub(crate) async fn issue_access_token(
        &self,
        client: &Client,
        subject: &str,
        scopes: &Scopes,
        holdings: &Holdings,
        family: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        let now = self.clock.now();
        let key = self.signing_key(client, now)?;
        let expires_in = client
            .access_token_ttl
            .unwrap_or_else(|| self.config.access_token_ttl_seconds());
        let audiences = self.audiences(client);
        let audience = match audiences.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        let roles = holdings.roles_for(&audiences);
        let jti = self.secrets.generate_id();
        let expires_at = now.saturating_add(expires_in);
        sqlx::query(
            "INSERT INTO access_tokens (jti, client_id, subject, family_id, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&jti)
        .bind(&client.client_id)
        .bind(subject)
        .bind(family)
        .bind(expires_at)
        .execute(self.db.pool())
        .await
        .map_err(|error| {
            tracing::error!(%error, "access token not recorded");
            OAuthError::server_error()
        })?;
        let mut claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": expires_at,
            "iat": now,
            "jti": jti,
            "client_id": client.client_id,
        });
        if !scopes.is_empty() {
            claims["scope"] = json!(scopes.to_string());
        }
        if !roles.is_empty() {
            claims["roles"] = json!(roles);
        }
        Ok(Issued {
            token: key.sign_jwt("at+jwt", &claims, self.secrets.rng()),
            issued_at: now,
            expires_in,
        })
    }

    /// An OpenID Connect ID token (Core §2) for `user`, to `client`, beside `access_token`.
    pub(crate) fn issue_id_token(
        &self,
        client: &Client,
        user: &User,
        id: IdTokenClaims<'_>,
        access_token: &str,
    ) -> Result<String, OAuthError> {
        let now = self.clock.now();
        let key = self.signing_key(client, now)?;
        let alg = key.alg;
        let mut claims = json!({
            "iss": self.issuer,
            "sub": user.user_id,
            "aud": client.client_id,
            "exp": now.saturating_add(
                client
                    .access_token_ttl
                    .unwrap_or_else(|| self.config.access_token_ttl_seconds())
            ),
            "iat": now,
            "auth_time": id.auth_time,
            // Level 1 for a password (RFC 8176 "pwd"), 2 with the second factor: every
            // session of a user with TOTP passed it (enabling it ends older sessions).
            "acr": if user.totp { "2" } else { "1" },
            "amr": if user.totp { json!(["pwd", "otp"]) } else { json!(["pwd"]) },
            "at_hash": at_hash(alg, access_token),
        });
        if let Some(nonce) = id.nonce {
            claims["nonce"] = json!(nonce);
        }
        if id.scopes.contains("profile") {
            claims["preferred_username"] = json!(user.username);
            if let Some(name) = &user.name {
                claims["name"] = json!(name);
            }
        }
        if let (true, Some(email)) = (id.scopes.contains("email"), &user.email) {
            claims["email"] = json!(email);
        }
        Ok(key.sign_jwt("JWT", &claims, self.secrets.rng()))
    }
}

/// What an ID token says beside the user.
pub(crate) struct IdTokenClaims<'a> {
    pub(crate) auth_time: i64,
    pub(crate) nonce: Option<&'a str>,
    pub(crate) scopes: &'a Scopes,
}

/// OpenID Connect Core §3.1.3.6: the left half of the hash of the access token, with the
/// hash of the signing algorithm (SHA-512 for Ed25519).
fn at_hash(alg: SigningAlg, access_token: &str) -> String {
    use ring::digest::{SHA256, SHA512, digest};
    let hash = match alg {
        SigningAlg::RS256 | SigningAlg::ES256 => digest(&SHA256, access_token.as_bytes()),
        SigningAlg::EdDSA => digest(&SHA512, access_token.as_bytes()),
    };
    let half = &hash.as_ref()[..hash.as_ref().len() / 2];
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(half)
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
        let listener = bind_listener("auth", config.listen).await?;
        let addr = listener
            .local_addr()
            .map_err(|error| BindError::new("auth", config.listen, error))?;
        let issuer = match &config.issuer {
            Some(issuer) => valid_issuer(issuer)?,
            None if addr.ip().is_unspecified() => return Err(StartError::IssuerRequired(addr)),
            None => format!("{}://{addr}", config.scheme()),
        };
        let state = Arc::new(AppState::open(config, issuer, clock, true).await?);
        let router = router(Arc::clone(&state));
        // Not ready without its database: every sign-in and token needs it.
        let health = Health::new();
        state.db.add_ready_check(&health);
        let http =
            HttpServer::from_listener("auth", listener, router, health, state.config.http.clone())?;
        Ok(Self { http, state })
    }

    /// The issuer identifier tokens carry.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// A handle for administering this server while it runs.
    pub fn admin(&self) -> AuthAdmin {
        AuthAdmin(Arc::clone(&self.state), None)
    }
}

/// Administration of a running server (the CLI and the admin API use it), and who is
/// administering: the admin API's caller, named in the audit trail (none when local).
#[derive(Clone)]
pub struct AuthAdmin(Arc<AppState>, Option<Arc<str>>);

/// Credentials the embedded profile made on its first start, shown once.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub admin_password: String,
    pub customer_password: String,
    pub client_id: String,
    pub client_secret: String,
}

impl AuthAdmin {
    /// Administration by `actor` (`user <id> via client <id>`), as the admin API's
    /// caller.
    pub(crate) fn acting(state: Arc<AppState>, actor: String) -> Self {
        Self(state, Some(Arc::from(actor)))
    }

    /// Records an administrative event in the audit trail, naming the actor.
    async fn record(&self, now: i64, kind: EventKind, event: Event<'_>) {
        let event = Event {
            actor: self.1.as_deref(),
            ..event
        };
        self.0.audit.record(now, kind, true, event).await;
    }

    /// Administration of the database `config` names, without serving: for the CLI
    /// (`keel auth user add`, …). Servers on the same database see the changes.
    pub async fn open(config: AuthConfig) -> Result<Self, StartError> {
        let issuer = match &config.issuer {
            Some(issuer) => valid_issuer(issuer)?,
            None => format!("{}://{}", config.scheme(), config.listen),
        };
        Ok(Self(
            Arc::new(AppState::open(config, issuer, Clock::system(), false).await?),
            None,
        ))
    }

    /// The embedded profile's starting point, made once, when there are no users yet:
    /// roles `keel-admin` (the admin API; scope `keel-admin`), `admin` and `customer`;
    /// users `admin` (both admin roles) and `customer`; and the confidential client
    /// `keel-demo` (code flow, refresh, client credentials). Returns their credentials
    /// that one time, to be printed.
    pub async fn seed_demo(&self) -> Result<Option<Seeded>, SeedError> {
        // Demo accounts belong to the embedded profile only: never to a shared database.
        if self.0.db.backend() != Backend::Sqlite {
            return Ok(None);
        }
        // Seeded once: the demo client is made last. A database with users but no demo
        // client was set up by hand (nothing to do) or seeded part-way (then the demo
        // users are brought back to known passwords and the rest is made).
        let demo_client = self
            .0
            .clients
            .find("keel-demo")
            .await
            .map_err(|e| SeedError(e.to_string()))?;
        let users: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM users WHERE username NOT IN ('admin', 'customer')",
        )
        .fetch_one(self.0.db.pool())
        .await
        .map_err(|e| SeedError(e.to_string()))?;
        if demo_client.is_some() || users > 0 {
            return Ok(None);
        }
        let failed = |e: &dyn std::fmt::Display| SeedError(e.to_string());
        // Roles may exist from a seeding that failed part-way: then they are kept.
        for (name, description, scopes) in [
            ("keel-admin", "administers Keel (admin API)", "keel-admin"),
            ("admin", "shop administrators", ""),
            ("customer", "shop customers", ""),
        ] {
            match self.create_role(name, None, description, scopes).await {
                Ok(_) | Err(RbacError::Exists(_)) => {}
                Err(error) => return Err(failed(&error)),
            }
        }
        let admin_password = self.0.secrets.generate_id();
        let customer_password = self.0.secrets.generate_id();
        let admin = self
            .demo_user("admin", "Keel administrator", &admin_password)
            .await
            .map_err(|e| failed(&e))?;
        let customer = self
            .demo_user("customer", "Demo customer", &customer_password)
            .await
            .map_err(|e| failed(&e))?;
        for (role, user) in [
            ("keel-admin", &admin.user_id),
            ("admin", &admin.user_id),
            ("customer", &customer.user_id),
        ] {
            self.grant_role(role, &Subject::User(user.clone()))
                .await
                .map_err(|e| failed(&e))?;
        }
        let (client, secret) = self
            .create_client(NewClient {
                client_id: Some("keel-demo".into()),
                name: "Keel demo".into(),
                auth_method: AuthMethod::ClientSecretBasic,
                redirect_uris: vec!["http://127.0.0.1:8080/callback".into()],
                post_logout_redirect_uris: Vec::new(),
                grant_types: vec![
                    GrantType::AuthorizationCode,
                    GrantType::RefreshToken,
                    GrantType::ClientCredentials,
                ],
                scopes: "openid profile email keel-admin".into(),
                audiences: vec![],
                signing_alg: None,
                access_token_ttl: None,
                jwks: None,
            })
            .await
            .map_err(|e| failed(&e))?;
        // The demo client plays both parts of the shop's tour (`keel demo`): it stocks the
        // shop as an admin and orders as a customer.
        for role in ["admin", "customer"] {
            self.grant_role(role, &Subject::Client(client.client_id.clone()))
                .await
                .map_err(|e| failed(&e))?;
        }
        Ok(Some(Seeded {
            admin_password,
            customer_password,
            client_id: client.client_id,
            client_secret: secret.unwrap_or_default(),
        }))
    }

    /// Rotates the signing key of `alg` (every algorithm when `None`): the new key is
    /// published now and signs after `auth.key_publish_lead`. Returns the new kids.
    pub async fn rotate_keys(&self, alg: Option<SigningAlg>) -> Result<Vec<String>, KeyError> {
        let state = &self.0;
        let now = state.clock.now();
        let lead = state.config.key_publish_lead_seconds();
        let mut kids = Vec::new();
        for alg in alg.map_or_else(|| SigningAlg::ALL.to_vec(), |alg| vec![alg]) {
            let kid = state
                .keys
                .rotate(&state.db, &state.secrets, alg, now, lead)
                .await?;
            self.key_rotated(now, lead, alg, &kid, "rotated in").await;
            kids.push(kid);
        }
        Ok(kids)
    }

    /// Rotates the keys that have signed for `auth.key_rotation_interval` (servers also
    /// look every minute), as [`Self::rotate_keys`] does; none when the interval is 0.
    /// Returns the new kids.
    pub async fn rotate_due_keys(&self) -> Result<Vec<String>, KeyError> {
        let state = &self.0;
        let interval = state.config.key_rotation_interval_seconds();
        if interval == 0 {
            return Ok(Vec::new());
        }
        let now = state.clock.now();
        let lead = state.config.key_publish_lead_seconds();
        let rotated = state
            .keys
            .rotate_due(&state.db, &state.secrets, now, interval, lead)
            .await?;
        let mut kids = Vec::with_capacity(rotated.len());
        for (alg, kid) in rotated {
            self.key_rotated(now, lead, alg, &kid, "rotated in by age")
                .await;
            kids.push(kid);
        }
        Ok(kids)
    }

    /// Records in the audit trail that `kid` was rotated in at `now`, `how`.
    async fn key_rotated(&self, now: i64, lead: i64, alg: SigningAlg, kid: &str, how: &str) {
        let detail = format!(
            "{} key {kid} {how}, signing from {}",
            alg.name(),
            now + lead
        );
        self.admin_event(now, detail).await;
    }

    /// Deletes expired codes, sessions and token records now (servers also do it every
    /// five minutes); returns how many rows went.
    pub async fn sweep(&self) -> Result<u64, sqlx::Error> {
        let ttl = self.0.config.refresh_token_ttl_seconds();
        crate::sweep::sweep(&self.0.db, self.0.clock.now(), ttl).await
    }

    /// Sets `user_id`'s password; false when there is no such user.
    pub async fn set_password(&self, user_id: &str, password: String) -> Result<bool, UserError> {
        let state = &self.0;
        let done = state
            .users
            .set_password(&state.secrets, &state.hashing, user_id, password)
            .await?;
        if done {
            self.admin_event(state.clock.now(), format!("password of user {user_id} set"))
                .await;
        }
        Ok(done)
    }

    /// Disables or enables `user_id`: a disabled user cannot sign in, their sessions end,
    /// and their tokens stop working at introspection, userinfo, refresh and the admin
    /// API. False when there is no such user.
    pub async fn set_user_disabled(
        &self,
        user_id: &str,
        disabled: bool,
    ) -> Result<bool, UserError> {
        let now = self.0.clock.now();
        let done = self
            .0
            .users
            .set_disabled(user_id, disabled.then_some(now))
            .await?;
        if done {
            let what = if disabled { "disabled" } else { "enabled" };
            self.admin_event(now, format!("user {user_id} {what}"))
                .await;
        }
        Ok(done)
    }

    /// Turns on the TOTP second factor for `user_id` with a new secret, ends the user's
    /// sessions and grants, and returns the `otpauth://` URI to put in an authenticator
    /// app (shown once).
    pub async fn enable_totp(&self, user_id: &str) -> Result<String, UserError> {
        let state = &self.0;
        let Some(user) = state.users.find(user_id).await? else {
            return Err(UserError::Invalid(format!("no user {user_id:?}")));
        };
        let mut secret = [0u8; 20];
        state.secrets.fill_random(&mut secret);
        let sealed = state
            .secrets
            .seal(crate::authorize::totp_context(user_id).as_bytes(), &secret);
        let now = state.clock.now();
        state.users.set_totp(user_id, &sealed, now).await?;
        let event = Event {
            subject: Some(user_id),
            detail: Some("second factor (TOTP) enabled".to_owned()),
            ..Event::default()
        };
        self.record(now, EventKind::AdminChange, event).await;
        Ok(crate::totp::otpauth_uri(&user.username, &secret))
    }

    /// The demo user `username` with `password`: made, or (left by a seeding that
    /// stopped part-way) given that password.
    async fn demo_user(
        &self,
        username: &str,
        name: &str,
        password: &str,
    ) -> Result<User, UserError> {
        if let Some(user) = self.find_user(username).await? {
            self.set_password(&user.user_id, password.to_owned())
                .await?;
            return Ok(user);
        }
        self.create_user(NewUser {
            username: username.into(),
            password: password.to_owned(),
            email: None,
            name: Some(name.into()),
        })
        .await
    }

    /// The user named `username`.
    pub async fn find_user(&self, username: &str) -> Result<Option<User>, UserError> {
        Ok(self
            .0
            .users
            .find_for_login(username)
            .await?
            .map(|(user, _)| user))
    }

    /// Registers a client; returns it and its secret (shown this once), and records it in
    /// the audit trail.
    pub async fn create_client(
        &self,
        new: NewClient,
    ) -> Result<(Client, Option<String>), ClientError> {
        let state = &self.0;
        let now = state.clock.now();
        let created = state.clients.create(&state.secrets, new, now).await?;
        self.record(
            now,
            EventKind::ClientCreated,
            Event {
                client_id: Some(&created.0.client_id),
                detail: Some(format!("auth method {}", created.0.auth_method.name())),
                ..Event::default()
            },
        )
        .await;
        Ok(created)
    }

    /// Creates a user; records it in the audit trail.
    pub async fn create_user(&self, new: NewUser) -> Result<User, UserError> {
        let state = &self.0;
        let now = state.clock.now();
        let user = state
            .users
            .create(&state.secrets, &state.hashing, new, now)
            .await?;
        let event = Event {
            subject: Some(&user.user_id),
            detail: Some(format!("username {}", user.username)),
            ..Event::default()
        };
        self.record(now, EventKind::UserCreated, event).await;
        Ok(user)
    }

    /// Creates a role that unlocks `scopes`, for tokens of `audience` (or any).
    pub async fn create_role(
        &self,
        name: &str,
        audience: Option<&str>,
        description: &str,
        scopes: &str,
    ) -> Result<Role, RbacError> {
        let scopes = Scopes::parse(scopes).map_err(|e| RbacError::Invalid(e.to_string()))?;
        let now = self.0.clock.now();
        let role = self
            .0
            .rbac
            .create_role(name, audience, description, &scopes, now)
            .await?;
        self.admin_event(now, format!("role {name} created")).await;
        Ok(role)
    }

    pub async fn create_group(&self, name: &str) -> Result<(), RbacError> {
        let now = self.0.clock.now();
        self.0.rbac.create_group(name, now).await?;
        self.admin_event(now, format!("group {name} created")).await;
        Ok(())
    }

    pub async fn add_group_member(&self, group: &str, user_id: &str) -> Result<(), RbacError> {
        self.0.rbac.add_member(group, user_id).await?;
        let now = self.0.clock.now();
        self.admin_event(now, format!("user {user_id} added to group {group}"))
            .await;
        Ok(())
    }

    pub async fn grant_role(&self, role: &str, subject: &Subject) -> Result<(), RbacError> {
        let now = self.0.clock.now();
        self.0.rbac.grant(role, subject, now).await?;
        self.admin_event(now, format!("role {role} granted to {subject:?}"))
            .await;
        Ok(())
    }

    pub async fn revoke_role(&self, role: &str, subject: &Subject) -> Result<bool, RbacError> {
        let removed = self.0.rbac.revoke(role, subject).await?;
        let now = self.0.clock.now();
        self.admin_event(now, format!("role {role} revoked from {subject:?}"))
            .await;
        Ok(removed)
    }

    async fn admin_event(&self, now: i64, detail: String) {
        let event = Event {
            detail: Some(detail),
            ..Event::default()
        };
        self.record(now, EventKind::AdminChange, event).await;
    }

    /// The newest `limit` audit events, newest first.
    pub async fn audit_events(&self, limit: i64) -> Result<Vec<AuditRecord>, sqlx::Error> {
        self.0.audit.recent(limit).await
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
        .route("/authorize", get(authorize::authorize))
        .route("/login", post(authorize::login))
        .route("/consent", post(authorize::consent))
        .route("/introspect", post(introspect::introspect))
        .route("/logout", get(logout::logout).post(logout::logout))
        .route("/device_authorization", post(device::device_authorization))
        .route("/device", get(device::page).post(device::post))
        .route("/account/totp", get(account::page).post(account::enrol))
        .route("/revoke", post(introspect::revoke))
        .route(
            "/userinfo",
            get(introspect::userinfo).post(introspect::userinfo),
        )
        .merge(admin_api::router())
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
        || url.path() != "/"
        || issuer.ends_with('/')
    {
        return Err(bad());
    }
    Ok(issuer.to_owned())
}

/// The configured key encryption key; with SQLite and none configured, the one kept
/// beside the database (made on first start), or for an in-memory database one that
/// lives as long as the process.
fn secrets_for(config: &AuthConfig, backend: Backend) -> Result<Secrets, StartError> {
    if let Some(key) = &config.key_encryption_key {
        return Ok(Secrets::from_base64(key.expose())?);
    }
    if backend != Backend::Sqlite {
        return Err(StartError::KekRequired);
    }
    let Some(path) = crate::db::sqlite_path(config.database.expose()) else {
        return Ok(Secrets::from_base64(&Secrets::generate_key())?);
    };
    let path = PathBuf::from(format!("{path}.key"));
    let file_error = |error| StartError::KekFile {
        path: path.display().to_string(),
        error,
    };
    match read_private(&path) {
        Ok(key) => Ok(Secrets::from_base64(&key)?),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let key = Secrets::generate_key();
            match write_private(&path, &key) {
                Ok(()) => {
                    tracing::warn!(
                        path = %path.display(),
                        "generated a key encryption key and stored it beside the database: fine for development, set auth.key_encryption_key in production"
                    );
                    Ok(Secrets::from_base64(&key)?)
                }
                // Another server starting on the same file won: use its key.
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(
                    Secrets::from_base64(&read_private(&path).map_err(file_error)?)?,
                ),
                Err(error) => Err(file_error(error)),
            }
        }
        Err(error) => Err(file_error(error)),
    }
}

/// Reads a key file, refusing one that others than its owner may read.
fn read_private(path: &std::path::Path) -> io::Result<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "others than its owner may access it (mode {:o}); chmod 600 it",
                    mode & 0o777
                ),
            ));
        }
    }
    std::fs::read_to_string(path)
}

/// Writes `contents` to `path`, readable by its owner only, all at once: written to a
/// temporary file, synced, then linked into place, so that a crash never leaves a
/// partial key and an existing file is never replaced (`AlreadyExists`).
fn write_private(path: &std::path::Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    // O_EXCL: never through a file or link someone else put there.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&temporary).and_then(|mut file| {
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    linked
}

impl Server for AuthServer {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn local_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    fn url(&self) -> String {
        self.http.url()
    }

    async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        // Keys other servers on the database made (or rotated) reach this one's key set
        // and signing within a reload interval.
        let state = Arc::clone(&self.state);
        // Expired codes, sessions and token records are swept every few reloads.
        let reloading = tokio::spawn(async move {
            for round in 1_u64.. {
                tokio::time::sleep(KEY_RELOAD_INTERVAL).await;
                if let Err(error) = state.keys.reload(&state.db, &state.secrets).await {
                    tracing::warn!(%error, "signing keys not reloaded; keeping the ones loaded");
                }
                if let Err(error) = AuthAdmin(Arc::clone(&state), None).rotate_due_keys().await {
                    tracing::warn!(%error, "signing keys due for rotation not rotated");
                }
                if round % SWEEP_EVERY == 0 {
                    let ttl = state.config.refresh_token_ttl_seconds();
                    match crate::sweep::sweep(&state.db, state.clock.now(), ttl).await {
                        Ok(removed) => tracing::debug!(removed, "expired rows swept"),
                        Err(error) => tracing::warn!(%error, "expired rows not swept"),
                    }
                }
            }
        });
        let result = self.http.run(shutdown).await;
        reloading.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_urls_compared_exactly() {
        assert!(valid_issuer("https://auth.example").is_ok());
        assert!(valid_issuer("http://127.0.0.1:8400").is_ok());
        for bad in [
            "https://auth.example/",
            "https://auth.example?x=1",
            "https://example/realms/keel",
            "https://auth.example#f",
            "ftp://auth.example",
            "auth.example",
        ] {
            assert!(valid_issuer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_files_are_written_once_and_must_be_private() {
        let path = std::env::temp_dir().join(format!("keel-auth-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        write_private(&path, "first").unwrap();
        let again = write_private(&path, "second").unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(read_private(&path).unwrap(), "first");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(
                read_private(&path).is_err(),
                "a world-readable key is refused"
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
