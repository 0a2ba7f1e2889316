//! OAuth clients: what each may do, and how it proves who it is.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::crypto::Secrets;
use crate::db::{Db, DbError};
use crate::keys::SigningAlg;
use crate::scope::Scopes;

/// How a client authenticates at the token endpoint (RFC 7591 §2 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    /// A public client (a browser or native app): no secret, PKCE required.
    None,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 4] = [
        Self::ClientSecretBasic,
        Self::ClientSecretPost,
        Self::PrivateKeyJwt,
        Self::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::None => "none",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn uses_secret(self) -> bool {
        matches!(self, Self::ClientSecretBasic | Self::ClientSecretPost)
    }
}

/// The grants a client may use (RFC 7591 §2 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantType {
    #[serde(rename = "authorization_code")]
    AuthorizationCode,
    #[serde(rename = "client_credentials")]
    ClientCredentials,
    #[serde(rename = "refresh_token")]
    RefreshToken,
    #[serde(rename = "urn:ietf:params:oauth:grant-type:device_code")]
    DeviceCode,
}

impl GrantType {
    /// The grants this server implements, as listed in its metadata.
    pub const SUPPORTED: [GrantType; 4] = [
        Self::AuthorizationCode,
        Self::ClientCredentials,
        Self::RefreshToken,
        Self::DeviceCode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::AuthorizationCode => "authorization_code",
            Self::ClientCredentials => "client_credentials",
            Self::RefreshToken => "refresh_token",
            Self::DeviceCode => "urn:ietf:params:oauth:grant-type:device_code",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::AuthorizationCode,
            Self::ClientCredentials,
            Self::RefreshToken,
            Self::DeviceCode,
        ]
        .into_iter()
        .find(|g| g.name() == name)
    }
}

/// A registered client.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub name: String,
    pub auth_method: AuthMethod,
    secret_hash: Option<Vec<u8>>,
    pub redirect_uris: Vec<String>,
    /// Where RP-initiated logout may return the browser; none registered, the redirect
    /// URIs serve.
    pub post_logout_redirect_uris: Vec<String>,
    pub grant_types: Vec<GrantType>,
    /// The scopes it may be granted.
    pub scopes: Scopes,
    /// The `aud` of its access tokens: the resource servers they are meant for.
    pub audiences: Vec<String>,
    /// Overrides the server's default signing algorithm.
    pub signing_alg: Option<SigningAlg>,
    /// Overrides the server's default access-token lifetime, in seconds.
    pub access_token_ttl: Option<i64>,
    /// The public keys of a `private_key_jwt` client (a JWK Set).
    pub jwks: Option<serde_json::Value>,
    pub disabled: bool,
}

impl Client {
    pub fn may_use(&self, grant: GrantType) -> bool {
        self.grant_types.contains(&grant)
    }

    /// Whether `secret` is this client's secret (constant-time); false for clients that
    /// have none.
    pub fn secret_matches(&self, secrets: &Secrets, secret: &str) -> bool {
        self.secret_hash
            .as_deref()
            .is_some_and(|stored| secrets.secret_matches(secret, stored))
    }

    fn from_row(row: &AnyRow) -> Result<Self, ClientError> {
        let bad = |what: &str| ClientError::Stored(what.to_owned());
        let auth_method: String = row.try_get("auth_method")?;
        let grant_types: Vec<String> =
            serde_json::from_str(&row.try_get::<String, _>("grant_types")?)
                .map_err(|_| bad("grant_types"))?;
        let signing_alg: Option<String> = row.try_get("signing_alg")?;
        Ok(Self {
            client_id: row.try_get("client_id")?,
            name: row.try_get("name")?,
            auth_method: AuthMethod::from_name(&auth_method).ok_or_else(|| bad("auth_method"))?,
            secret_hash: row.try_get("secret_hash")?,
            redirect_uris: serde_json::from_str(&row.try_get::<String, _>("redirect_uris")?)
                .map_err(|_| bad("redirect_uris"))?,
            post_logout_redirect_uris: row
                .try_get::<Option<String>, _>("post_logout_redirect_uris")?
                .map(|uris| {
                    serde_json::from_str(&uris).map_err(|_| bad("post_logout_redirect_uris"))
                })
                .transpose()?
                .unwrap_or_default(),
            grant_types: grant_types
                .iter()
                .map(|g| GrantType::from_name(g).ok_or_else(|| bad("grant_types")))
                .collect::<Result<_, _>>()?,
            scopes: Scopes::parse(&row.try_get::<String, _>("scopes")?)
                .map_err(|_| bad("scopes"))?,
            audiences: serde_json::from_str(&row.try_get::<String, _>("audiences")?)
                .map_err(|_| bad("audiences"))?,
            signing_alg: signing_alg
                .map(|alg| SigningAlg::from_name(&alg).ok_or_else(|| bad("signing_alg")))
                .transpose()?,
            access_token_ttl: row.try_get("access_token_ttl")?,
            jwks: row
                .try_get::<Option<String>, _>("jwks")?
                .map(|jwks| serde_json::from_str(&jwks).map_err(|_| bad("jwks")))
                .transpose()?,
            disabled: row.try_get::<Option<i64>, _>("disabled_at")?.is_some(),
        })
    }
}

/// What registering a client takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    /// Chosen by the server when absent.
    #[serde(default)]
    pub client_id: Option<String>,
    pub name: String,
    pub auth_method: AuthMethod,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Where RP-initiated logout may return the browser (none: the redirect URIs).
    #[serde(default)]
    pub post_logout_redirect_uris: Vec<String>,
    pub grant_types: Vec<GrantType>,
    /// Space-separated.
    #[serde(default)]
    pub scopes: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub signing_alg: Option<SigningAlg>,
    #[serde(default)]
    pub access_token_ttl: Option<i64>,
    /// For `private_key_jwt`: the client's public keys, as a JWK Set.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
}

/// Why a client could not be registered or read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Invalid(String),
    #[error("a client with id {0:?} exists already")]
    Exists(String),
    #[error("stored client has an unreadable {0}")]
    Stored(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for ClientError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(DbError::Query(error))
    }
}

/// Longest client id, name, redirect URI or audience accepted.
const MAX_FIELD: usize = 2048;

/// The registry of clients, in the database.
#[derive(Clone)]
pub struct Clients {
    db: Db,
}

impl Clients {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Registers `new`; returns the client and, for clients that authenticate with a
    /// secret, that secret: shown this once, stored only as a keyed hash.
    pub async fn create(
        &self,
        secrets: &Secrets,
        new: NewClient,
        now: i64,
    ) -> Result<(Client, Option<String>), ClientError> {
        validate(&new)?;
        let client_id = new
            .client_id
            .clone()
            .unwrap_or_else(|| secrets.generate_id());
        let secret = new
            .auth_method
            .uses_secret()
            .then(|| secrets.generate_secret());
        let secret_hash = secret.as_deref().map(|s| secrets.hash_secret(s));
        let scopes = Scopes::parse(&new.scopes)
            .map_err(|e| ClientError::Invalid(e.to_string()))?
            .to_string();
        let grant_types: Vec<&str> = new.grant_types.iter().map(|g| g.name()).collect();
        let inserted = sqlx::query(
            "INSERT INTO clients (client_id, name, auth_method, secret_hash, redirect_uris, \
             grant_types, scopes, audiences, signing_alg, access_token_ttl, created_at, jwks, \
             post_logout_redirect_uris) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (client_id) DO NOTHING",
        )
        .bind(&client_id)
        .bind(&new.name)
        .bind(new.auth_method.name())
        .bind(secret_hash)
        .bind(json_list(&new.redirect_uris))
        .bind(json_list(&grant_types))
        .bind(scopes)
        .bind(json_list(&new.audiences))
        .bind(new.signing_alg.map(SigningAlg::name))
        .bind(new.access_token_ttl)
        .bind(now)
        .bind(new.jwks.as_ref().map(serde_json::Value::to_string))
        .bind(json_list(&new.post_logout_redirect_uris))
        .execute(self.db.pool())
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(ClientError::Exists(client_id));
        }
        let client = self
            .find(&client_id)
            .await?
            .ok_or_else(|| ClientError::Stored("client vanished after insert".to_owned()))?;
        Ok((client, secret))
    }

    pub async fn find(&self, client_id: &str) -> Result<Option<Client>, ClientError> {
        let row = sqlx::query("SELECT * FROM clients WHERE client_id = $1")
            .bind(client_id)
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref().map(Client::from_row).transpose()
    }
}

/// Client ids travel in Basic credentials (form-encoded) and in URLs: they are kept to
/// characters that need no escaping. The token endpoint refuses others before any lookup.
pub(crate) fn is_valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

fn json_list<S: Serialize>(items: &[S]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn validate(new: &NewClient) -> Result<(), ClientError> {
    let invalid = |message: String| Err(ClientError::Invalid(message));
    if let Some(id) = new.client_id.as_ref().filter(|id| !is_valid_client_id(id)) {
        return invalid(format!(
            "client_id {id:?} must be 1 to 128 letters, digits, '-', '.', '_' or '~'"
        ));
    }
    if new.name.trim().is_empty() || new.name.len() > MAX_FIELD {
        return invalid("name must be given (at most 2048 bytes)".to_owned());
    }
    if new.grant_types.is_empty() {
        return invalid("at least one grant type is needed".to_owned());
    }
    if let Some(grant) = new
        .grant_types
        .iter()
        .find(|g| !GrantType::SUPPORTED.contains(g))
    {
        return invalid(format!("grant type {} is not supported yet", grant.name()));
    }
    if new.auth_method == AuthMethod::None
        && new.grant_types.contains(&GrantType::ClientCredentials)
    {
        return invalid(
            "a public client cannot use client_credentials: it has no credentials".to_owned(),
        );
    }
    match (new.auth_method, &new.jwks) {
        (AuthMethod::PrivateKeyJwt, Some(jwks)) if crate::assertion::valid_jwks(jwks) => {}
        (AuthMethod::PrivateKeyJwt, _) => {
            return invalid(
                "private_key_jwt needs jwks: a JWK Set (16 KiB at most) of 1 to 10 public keys, \
                 RSA of 2048 to 8192 bits, EC P-256 or OKP Ed25519"
                    .to_owned(),
            );
        }
        (_, Some(_)) => return invalid("jwks is only for private_key_jwt clients".to_owned()),
        (_, None) => {}
    }
    if new.grant_types.contains(&GrantType::AuthorizationCode) && new.redirect_uris.is_empty() {
        return invalid("authorization_code needs at least one redirect URI".to_owned());
    }
    for uri in new
        .redirect_uris
        .iter()
        .chain(&new.post_logout_redirect_uris)
    {
        validate_redirect_uri(uri).map_err(ClientError::Invalid)?;
    }
    for audience in &new.audiences {
        if audience.is_empty() || audience.len() > MAX_FIELD {
            return invalid("audiences must be non-empty strings".to_owned());
        }
    }
    if new
        .access_token_ttl
        .is_some_and(|ttl| !(1..=86_400).contains(&ttl))
    {
        return invalid("access_token_ttl must be 1 to 86400 seconds".to_owned());
    }
    Ok(())
}

/// RFC 6749 §3.1.2: absolute, no fragment; and (RFC 9700 §2.1) https, except on loopback
/// for native apps and development, or a private-use scheme of a native app.
fn validate_redirect_uri(uri: &str) -> Result<(), String> {
    let parsed = url::Url::parse(uri)
        .map_err(|_| format!("redirect URI {uri:?} must be an absolute URI"))?;
    if uri.len() > MAX_FIELD || parsed.fragment().is_some() {
        return Err(format!("redirect URI {uri:?} must not have a fragment"));
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => match parsed.host() {
            Some(url::Host::Ipv4(ip)) if ip.is_loopback() => Ok(()),
            Some(url::Host::Ipv6(ip)) if ip.is_loopback() => Ok(()),
            Some(url::Host::Domain("localhost")) => Ok(()),
            _ => Err(format!(
                "redirect URI {uri:?} must use https (http only on loopback)"
            )),
        },
        // A private-use scheme of a native app: reverse domain name (RFC 8252 §7.1).
        scheme if scheme.contains('.') => Ok(()),
        _ => Err(format!(
            "redirect URI {uri:?} must use https, loopback http or an app's own scheme"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(auth_method: AuthMethod, grants: &[GrantType]) -> NewClient {
        NewClient {
            client_id: Some("svc".into()),
            name: "a service".into(),
            auth_method,
            redirect_uris: vec![],
            post_logout_redirect_uris: Vec::new(),
            grant_types: grants.to_vec(),
            scopes: "a b".into(),
            audiences: vec!["keel-api".into()],
            signing_alg: None,
            access_token_ttl: None,
            jwks: None,
        }
    }

    #[test]
    fn a_confidential_service_client_is_valid() {
        validate(&new(
            AuthMethod::ClientSecretBasic,
            &[GrantType::ClientCredentials],
        ))
        .unwrap();
    }

    #[test]
    fn contradictory_clients_are_refused() {
        let cases = [
            new(AuthMethod::None, &[GrantType::ClientCredentials]),
            new(AuthMethod::ClientSecretBasic, &[]),
            NewClient {
                client_id: Some("has space".into()),
                ..new(
                    AuthMethod::ClientSecretBasic,
                    &[GrantType::ClientCredentials],
                )
            },
            NewClient {
                access_token_ttl: Some(0),
                ..new(
                    AuthMethod::ClientSecretBasic,
                    &[GrantType::ClientCredentials],
                )
            },
            NewClient {
                name: " ".into(),
                ..new(
                    AuthMethod::ClientSecretBasic,
                    &[GrantType::ClientCredentials],
                )
            },
        ];
        for case in cases {
            assert!(validate(&case).is_err(), "{case:?}");
        }
    }

    #[test]
    fn redirect_uris_must_be_safe() {
        for good in [
            "https://app.example/cb",
            "http://127.0.0.1:8080/cb",
            "http://localhost/cb",
            "http://[::1]:9/cb",
            "com.example.app:/cb",
        ] {
            validate_redirect_uri(good).unwrap();
        }
        for bad in [
            "http://app.example/cb",
            "https://app.example/cb#frag",
            "/relative",
            "javascript:alert(1)",
            "not a uri",
        ] {
            assert!(validate_redirect_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_round_trip() {
        for method in AuthMethod::ALL {
            assert_eq!(AuthMethod::from_name(method.name()), Some(method));
        }
        for grant in [
            GrantType::AuthorizationCode,
            GrantType::ClientCredentials,
            GrantType::RefreshToken,
            GrantType::DeviceCode,
        ] {
            assert_eq!(GrantType::from_name(grant.name()), Some(grant));
        }
    }
}
