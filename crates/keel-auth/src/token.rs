//! The token endpoint (RFC 6749 §3.2): the form, client authentication (§2.3), and the
//! grants.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderValue, header};
use serde_json::{Value, json};

use crate::assertion::{self, JWT_BEARER, claimed_client};
use crate::audit::{Event, EventKind};
use crate::authorize::pkce_matches;
use crate::clients::{AuthMethod, Client, GrantType, is_valid_client_id};
use crate::crypto::sha256;
use crate::device;
use crate::error::{ErrorCode, OAuthError};
use crate::rbac::Subject;
use crate::scope::Scopes;
use crate::server::{AppState, ClientAddr, IdTokenClaims};
use sqlx::Row;

/// A token request's parameters. RFC 6749 §3.2: form-encoded, each parameter at most
/// once, and a parameter without a value is as if it were absent.
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn from_form(headers: &HeaderMap, body: &[u8]) -> Result<Self, OAuthError> {
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(OAuthError::invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|_| OAuthError::invalid_request("the form body is malformed"))?;
        Self::from_pairs(pairs)
    }

    /// A query string's parameters, by the same rules.
    pub(crate) fn from_query(query: &str) -> Result<Self, OAuthError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|_| OAuthError::invalid_request("the query is malformed"))?;
        Self::from_pairs(pairs)
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> Result<Self, OAuthError> {
        let mut params = HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if value.is_empty() {
                continue;
            }
            if params.contains_key(&name) {
                return Err(OAuthError::invalid_request(format!(
                    "parameter {name} is given more than once"
                )));
            }
            params.insert(name, value);
        }
        Ok(Self(params))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub(crate) fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("parameter {name} is missing")))
    }
}

/// How a client presented itself.
enum Presented {
    Basic {
        id: String,
        secret: String,
    },
    Post {
        id: String,
        secret: String,
    },
    /// A public client: its id, no secret.
    Public {
        id: String,
    },
    /// A signed assertion (`private_key_jwt`); the id is the one it claims.
    Assertion {
        id: String,
        assertion: String,
    },
}

impl Presented {
    fn id(&self) -> &str {
        match self {
            Self::Basic { id, .. }
            | Self::Post { id, .. }
            | Self::Public { id }
            | Self::Assertion { id, .. } => id,
        }
    }

    fn method(&self) -> AuthMethod {
        match self {
            Self::Basic { .. } => AuthMethod::ClientSecretBasic,
            Self::Post { .. } => AuthMethod::ClientSecretPost,
            Self::Public { .. } => AuthMethod::None,
            Self::Assertion { .. } => AuthMethod::PrivateKeyJwt,
        }
    }
}

/// RFC 6749 §2.3.1: `Basic base64(urlencode(id) ":" urlencode(secret))`.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = std::str::from_utf8(&decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let id = form_decode(id)?;
    (!id.is_empty()).then_some(())?;
    Some((id, form_decode(secret)?))
}

/// `application/x-www-form-urlencoded` decoding of one value, strictly: `+` is a space,
/// `%XX` a byte; a malformed escape or bytes that are not UTF-8 are refused.
fn form_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.bytes();
    while let Some(byte) = rest.next() {
        bytes.push(match byte {
            b'+' => b' ',
            b'%' => {
                let hex = [rest.next()?, rest.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            byte => byte,
        });
    }
    String::from_utf8(bytes).ok()
}

fn presented(headers: &HeaderMap, params: &Params) -> Result<Presented, OAuthError> {
    let body_id = params.get("client_id");
    let body_secret = params.get("client_secret");
    if let Some(assertion) = params.get("client_assertion") {
        if params.get("client_assertion_type") != Some(JWT_BEARER) {
            return Err(OAuthError::invalid_request(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
        }
        if body_secret.is_some() || headers.contains_key(header::AUTHORIZATION) {
            return Err(OAuthError::invalid_request(
                "use one client authentication method",
            ));
        }
        let id = claimed_client(assertion)
            .ok_or_else(|| OAuthError::invalid_client("malformed client assertion"))?;
        if body_id.is_some_and(|body_id| body_id != id) {
            return Err(OAuthError::invalid_request(
                "client_id differs from the assertion's issuer",
            ));
        }
        return Ok(Presented::Assertion {
            id,
            assertion: assertion.to_owned(),
        });
    }
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let (id, secret) = basic_credentials(value)
            .ok_or_else(|| OAuthError::invalid_client("malformed Basic client credentials"))?;
        if body_secret.is_some() {
            return Err(OAuthError::invalid_request(
                "use one client authentication method, not Basic and client_secret both",
            ));
        }
        if body_id.is_some_and(|body_id| body_id != id) {
            return Err(OAuthError::invalid_request(
                "client_id differs from the Basic credentials",
            ));
        }
        return Ok(Presented::Basic { id, secret });
    }
    match (body_id, body_secret) {
        (Some(id), Some(secret)) => Ok(Presented::Post {
            id: id.to_owned(),
            secret: secret.to_owned(),
        }),
        (Some(id), None) => Ok(Presented::Public { id: id.to_owned() }),
        (None, _) => Err(OAuthError::invalid_client("no client authentication")),
    }
}

/// The client the request comes from, authenticated as it was registered.
async fn authenticate(
    state: &AppState,
    presented: &Presented,
    ip: &str,
) -> Result<Client, OAuthError> {
    if !is_valid_client_id(presented.id()) {
        // No registered client has such an id: refused before any lookup or audit write.
        return Err(OAuthError::invalid_client("client authentication failed"));
    }
    let client = state.clients.find(presented.id()).await.map_err(|error| {
        tracing::error!(%error, "client lookup failed");
        OAuthError::server_error()
    })?;
    let refused = match (&client, presented) {
        (None, _) => {
            // Same work as for a known client, so timing does not tell which ids exist.
            let _ = state.secrets.hash_secret(presented.id());
            Some("unknown client")
        }
        (Some(client), _) if client.disabled => Some("disabled client"),
        (Some(client), _) if client.auth_method != presented.method() => {
            Some("authentication method not registered for this client")
        }
        (Some(client), Presented::Basic { secret, .. } | Presented::Post { secret, .. }) => {
            (!client.secret_matches(&state.secrets, secret)).then_some("wrong secret")
        }
        (Some(_), Presented::Public { .. }) => None,
        (Some(client), Presented::Assertion { assertion, .. }) => {
            assertion::verify(state, client, assertion).await.err()
        }
    };
    match (refused, client) {
        (None, Some(client)) => Ok(client),
        (reason, _) => {
            let reason = reason.unwrap_or("unknown client");
            state
                .audit
                .record(
                    state.clock.now(),
                    EventKind::ClientAuthFailed,
                    false,
                    Event {
                        client_id: Some(presented.id()),
                        ip: Some(ip.to_owned()),
                        actor: None,
                        detail: Some(format!("{}: {reason}", presented.method().name())),
                        ..Event::default()
                    },
                )
                .await;
            // One answer whatever the reason, so it does not tell which ids exist.
            Err(OAuthError::invalid_client("client authentication failed"))
        }
    }
}

/// A form from a client to one of the client-authenticated endpoints (device
/// authorization, introspection, revocation): its parameters, and the client,
/// authenticated as at the token endpoint.
pub(crate) async fn client_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    ip: &str,
) -> Result<(Client, Params), OAuthError> {
    let body = body
        .map_err(|_| OAuthError::invalid_request("the body is too large or could not be read"))?;
    let params = Params::from_form(headers, &body)?;
    let presented = presented(headers, &params)?;
    let client = authenticate(state, &presented, ip).await?;
    Ok((client, params))
}

/// `POST /token`.
pub(crate) async fn token(
    State(state): State<Arc<AppState>>,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return OAuthError::invalid_request("the body is too large or could not be read")
            .into_response();
    };
    match handle(&state, &headers, &body, &peer.to_string()).await {
        Ok(body) => {
            let mut response = Json(body).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            response
        }
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    ip: &str,
) -> Result<Value, OAuthError> {
    let params = Params::from_form(headers, body)?;
    let grant_type = params.require("grant_type")?;
    let grant = GrantType::from_name(grant_type)
        .filter(|grant| GrantType::SUPPORTED.contains(grant))
        .ok_or_else(|| {
            OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                format!("grant_type {grant_type:?} is not supported"),
            )
        })?;
    let presented = presented(headers, &params)?;
    let client = authenticate(state, &presented, ip).await?;
    if !client.may_use(grant) {
        return Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            format!("this client may not use {}", grant.name()),
        ));
    }
    match grant {
        GrantType::ClientCredentials => client_credentials(state, &client, &params, ip).await,
        GrantType::AuthorizationCode => authorization_code(state, &client, &params, ip).await,
        GrantType::RefreshToken => refresh_token(state, &client, &params, ip).await,
        GrantType::DeviceCode => {
            let (user_id, family_id, auth_time, scopes) =
                device::exchange(state, &client, &params).await?;
            let grant = UserGrant {
                user_id: &user_id,
                family_id: &family_id,
                auth_time,
                nonce: None,
                scopes: &scopes,
                grant: "device_code",
            };
            issue_user_tokens(state, &client, grant, ip).await
        }
    }
}

/// RFC 6749 §4.4: a client acting for itself.
async fn client_credentials(
    state: &AppState,
    client: &Client,
    params: &Params,
    ip: &str,
) -> Result<Value, OAuthError> {
    if client.auth_method == AuthMethod::None {
        return Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            "a public client cannot use client_credentials",
        ));
    }
    let scopes = granted_scopes(client, params.get("scope"))?;
    if params.get("scope").is_some() && scopes.contains("openid") {
        return Err(OAuthError::new(
            ErrorCode::InvalidScope,
            "openid is for users signing in, not for client credentials",
        ));
    }
    let scopes: Scopes = scopes.iter().filter(|s| *s != "openid").collect();
    let holdings = state
        .rbac
        .holdings(&Subject::Client(client.client_id.clone()))
        .await
        .map_err(server_error)?;
    let scopes = state
        .rbac
        .permitted(&scopes, &holdings, &state.audiences(client))
        .await
        .map_err(server_error)?;
    let issued = state
        .issue_access_token(client, &client.client_id, &scopes, &holdings, None)
        .await?;
    state
        .audit
        .record(
            issued.issued_at,
            EventKind::TokenIssued,
            true,
            Event {
                subject: Some(&client.client_id),
                client_id: Some(&client.client_id),
                ip: Some(ip.to_owned()),
                actor: None,
                detail: Some(format!("client_credentials, scope {scopes}")),
            },
        )
        .await;
    let mut body = json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    });
    if !scopes.is_empty() {
        body["scope"] = json!(scopes.to_string());
    }
    Ok(body)
}

/// A stored authorization code, as its exchange found it.
struct CodeGrant {
    client_id: String,
    user_id: String,
    redirect_uri: String,
    scopes: String,
    nonce: Option<String>,
    code_challenge: String,
    auth_time: i64,
    expires_at: i64,
    family_id: String,
}

/// RFC 6749 §4.1.3 with PKCE (RFC 7636 §4.6). A code is used once: the first exchange
/// marks it in the same statement that reads it, so two racing exchanges cannot both
/// win; a code presented again revokes its grant (§4.1.2, RFC 9700 §4.5).
async fn authorization_code(
    state: &AppState,
    client: &Client,
    params: &Params,
    ip: &str,
) -> Result<Value, OAuthError> {
    let code = params.require("code")?;
    let invalid_grant = |description: &str| OAuthError::new(ErrorCode::InvalidGrant, description);
    let now = state.clock.now();
    let code_hash = sha256(code.as_bytes());
    let row = sqlx::query(
        "UPDATE authorization_codes SET used_at = $1 WHERE code_hash = $2 AND used_at IS NULL \
         RETURNING client_id, user_id, redirect_uri, scopes, nonce, code_challenge, auth_time, \
         expires_at, family_id",
    )
    .bind(now)
    .bind(&code_hash)
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?;
    let Some(row) = row else {
        replayed_code(state, &code_hash, client, ip).await?;
        return Err(invalid_grant("the code is invalid, expired or used"));
    };
    let grant = CodeGrant {
        client_id: row.try_get("client_id").map_err(server_error)?,
        user_id: row.try_get("user_id").map_err(server_error)?,
        redirect_uri: row.try_get("redirect_uri").map_err(server_error)?,
        scopes: row.try_get("scopes").map_err(server_error)?,
        nonce: row.try_get("nonce").map_err(server_error)?,
        code_challenge: row.try_get("code_challenge").map_err(server_error)?,
        auth_time: row.try_get("auth_time").map_err(server_error)?,
        expires_at: row.try_get("expires_at").map_err(server_error)?,
        family_id: row.try_get("family_id").map_err(server_error)?,
    };
    if grant.client_id != client.client_id {
        return Err(invalid_grant("the code was issued to another client"));
    }
    if grant.expires_at <= now {
        return Err(invalid_grant("the code is invalid, expired or used"));
    }
    if !grant.redirect_uri.is_empty() && params.get("redirect_uri") != Some(&grant.redirect_uri) {
        return Err(invalid_grant(
            "redirect_uri differs from the authorization request's",
        ));
    }
    match (grant.code_challenge.as_str(), params.get("code_verifier")) {
        ("", None) => {}
        ("", Some(_)) => {
            return Err(invalid_grant("code_verifier without a code_challenge"));
        }
        (_, None) => return Err(invalid_grant("code_verifier is missing")),
        (challenge, Some(verifier)) => {
            if !pkce_matches(verifier, challenge) {
                return Err(invalid_grant(
                    "code_verifier does not match the code_challenge",
                ));
            }
        }
    }
    let scopes = Scopes::parse(&grant.scopes).map_err(|_| OAuthError::server_error())?;
    let issue = UserGrant {
        user_id: &grant.user_id,
        family_id: &grant.family_id,
        auth_time: grant.auth_time,
        nonce: grant.nonce.as_deref(),
        scopes: &scopes,
        grant: "authorization_code",
    };
    issue_user_tokens(state, client, issue, ip).await
}

/// What a user's grant (a code, an approved device) issues tokens from.
struct UserGrant<'a> {
    user_id: &'a str,
    family_id: &'a str,
    auth_time: i64,
    nonce: Option<&'a str>,
    scopes: &'a Scopes,
    /// The grant type, for the audit trail.
    grant: &'a str,
}

/// The token response of a user's grant: an access token, an ID token when `openid` was
/// granted, a refresh token when the client may refresh.
async fn issue_user_tokens(
    state: &AppState,
    client: &Client,
    grant: UserGrant<'_>,
    ip: &str,
) -> Result<Value, OAuthError> {
    let now = state.clock.now();
    let user = match state
        .users
        .find(grant.user_id)
        .await
        .map_err(server_error)?
    {
        Some(user) if !user.disabled => user,
        _ => {
            return Err(OAuthError::new(
                ErrorCode::InvalidGrant,
                "the user is no longer active",
            ));
        }
    };
    let scopes = grant.scopes;
    let holdings = state
        .rbac
        .holdings(&Subject::User(user.user_id.clone()))
        .await
        .map_err(server_error)?;
    let issued = state
        .issue_access_token(
            client,
            &user.user_id,
            scopes,
            &holdings,
            Some(grant.family_id),
        )
        .await?;
    let mut body = json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": scopes.to_string(),
    });
    if scopes.contains("openid") {
        let claims = IdTokenClaims {
            auth_time: grant.auth_time,
            nonce: grant.nonce,
            scopes,
        };
        body["id_token"] = json!(state.issue_id_token(client, &user, claims, &issued.token)?);
    }
    if client.may_use(GrantType::RefreshToken) {
        body["refresh_token"] = json!(new_refresh_token(state, grant.family_id, now).await?);
    }
    let event = Event {
        subject: Some(&user.user_id),
        client_id: Some(&client.client_id),
        ip: Some(ip.to_owned()),
        actor: None,
        detail: Some(format!("{}, scope {scopes}", grant.grant)),
    };
    state
        .audit
        .record(now, EventKind::TokenIssued, true, event)
        .await;
    Ok(body)
}

/// A code that did not exchange: when it exists (it was used), its grant is revoked.
async fn replayed_code(
    state: &AppState,
    code_hash: &[u8],
    client: &Client,
    ip: &str,
) -> Result<(), OAuthError> {
    let family: Option<String> = sqlx::query_scalar(
        "SELECT family_id FROM authorization_codes WHERE code_hash = $1 AND used_at IS NOT NULL",
    )
    .bind(code_hash)
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?;
    let Some(family) = family else { return Ok(()) };
    end_grant(
        state,
        &family,
        EventKind::CodeReplayed,
        &client.client_id,
        ip,
        "authorization code presented again; its grant is revoked",
    )
    .await
}

/// Stores a new refresh token in `family` and returns it. It expires when the grant
/// does: `auth.refresh_token_ttl` after the grant began, however often it rotates.
async fn new_refresh_token(state: &AppState, family: &str, now: i64) -> Result<String, OAuthError> {
    let began: i64 =
        sqlx::query_scalar("SELECT created_at FROM token_families WHERE family_id = $1")
            .bind(family)
            .fetch_one(state.db.pool())
            .await
            .map_err(server_error)?;
    let token = state.secrets.generate_secret();
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(sha256(token.as_bytes()))
    .bind(family)
    .bind(now)
    .bind(began.saturating_add(state.config.refresh_token_ttl_seconds()))
    .execute(state.db.pool())
    .await
    .map_err(server_error)?;
    Ok(token)
}

/// RFC 6749 §6 with rotation (RFC 9700 §4.14.2): each refresh token is exchanged once for
/// a new access token and a new refresh token. A used one presented again within the
/// grace window (a client's concurrent refreshes) gets a new access token and the same
/// new refresh token; later, or once that one is used, it revokes the whole grant, since
/// one of the two presenters has stolen it.
async fn refresh_token(
    state: &AppState,
    client: &Client,
    params: &Params,
    ip: &str,
) -> Result<Value, OAuthError> {
    let token = params.require("refresh_token")?;
    let invalid_grant = || {
        OAuthError::new(
            ErrorCode::InvalidGrant,
            "the refresh token is invalid, expired or revoked",
        )
    };
    let now = state.clock.now();
    let token_hash = sha256(token.as_bytes());
    let family = sqlx::query(
        "SELECT r.family_id, r.expires_at, r.used_at, f.client_id, f.user_id, f.scopes, \
         f.auth_time, f.revoked_at \
         FROM refresh_tokens r JOIN token_families f ON f.family_id = r.family_id \
         WHERE r.token_hash = $1",
    )
    .bind(&token_hash)
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?
    .ok_or_else(invalid_grant)?;
    let family_id: String = family.try_get("family_id").map_err(server_error)?;
    let expires_at: i64 = family.try_get("expires_at").map_err(server_error)?;
    let family_client: String = family.try_get("client_id").map_err(server_error)?;
    let revoked: Option<i64> = family.try_get("revoked_at").map_err(server_error)?;
    if family_client != client.client_id || revoked.is_some() || expires_at <= now {
        return Err(invalid_grant());
    }
    let granted = Scopes::parse(
        &family
            .try_get::<String, _>("scopes")
            .map_err(server_error)?,
    )
    .map_err(|_| OAuthError::server_error())?;
    // What the client may still have: an administrator may have narrowed it since.
    let granted: Scopes = granted
        .iter()
        .filter(|scope| client.scopes.contains(scope))
        .collect();
    // §6: the scope may be narrowed, never widened.
    let scopes = match params.get("scope") {
        None => granted,
        Some(asked) => {
            let asked = Scopes::parse(asked)
                .map_err(|error| OAuthError::new(ErrorCode::InvalidScope, error.to_string()))?;
            if !asked.is_subset(&granted) {
                return Err(OAuthError::new(
                    ErrorCode::InvalidScope,
                    "a refresh cannot widen the original grant",
                ));
            }
            asked
        }
    };
    let user_id: Option<String> = family.try_get("user_id").map_err(server_error)?;
    let user = match &user_id {
        Some(user_id) => match state.users.find(user_id).await.map_err(server_error)? {
            Some(user) if !user.disabled => Some(user),
            _ => return Err(invalid_grant()),
        },
        None => None,
    };
    // Claimed here unless used already. A used one presented again within the grace
    // window (a client's concurrent refreshes) gets the refresh token its first exchange
    // made, while that one is unused: the grant never forks into two live chains. Any
    // other reuse is theft.
    let used_at: Option<i64> = family.try_get("used_at").map_err(server_error)?;
    let grace = state.config.refresh_reuse_grace_seconds();
    let claimed = used_at.is_none()
        && sqlx::query(
            "UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
        )
        .bind(now)
        .bind(&token_hash)
        .execute(state.db.pool())
        .await
        .map_err(server_error)?
        .rows_affected()
            == 1;
    // Claimed by a concurrent exchange just now when it was unused a moment ago.
    let in_grace = grace > 0 && now - used_at.unwrap_or(now) <= grace;
    let successor = if claimed || in_grace {
        successor(state, &family_id, &token_hash, now, !claimed).await?
    } else {
        None
    };
    let Some(successor) = successor else {
        end_grant(
            state,
            &family_id,
            EventKind::RefreshReused,
            &client.client_id,
            ip,
            "used refresh token presented again; its grant is revoked",
        )
        .await?;
        return Err(invalid_grant());
    };
    let subject = user
        .as_ref()
        .map_or(client.client_id.as_str(), |u| u.user_id.as_str());
    // Roles as they are now: a role revoked since the grant leaves at the next refresh,
    // with the scopes it unlocked.
    let holder = match &user {
        Some(user) => Subject::User(user.user_id.clone()),
        None => Subject::Client(client.client_id.clone()),
    };
    let holdings = state.rbac.holdings(&holder).await.map_err(server_error)?;
    let scopes = state
        .rbac
        .permitted(&scopes, &holdings, &state.audiences(client))
        .await
        .map_err(server_error)?;
    let issued = state
        .issue_access_token(client, subject, &scopes, &holdings, Some(&family_id))
        .await?;
    let mut body = json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": scopes.to_string(),
        "refresh_token": successor,
    });
    if let (Some(user), true) = (&user, scopes.contains("openid")) {
        let claims = IdTokenClaims {
            auth_time: family
                .try_get::<Option<i64>, _>("auth_time")
                .map_err(server_error)?
                .unwrap_or(now),
            nonce: None,
            scopes: &scopes,
        };
        body["id_token"] = json!(state.issue_id_token(client, user, claims, &issued.token)?);
    }
    let event = Event {
        subject: Some(subject),
        client_id: Some(&client.client_id),
        ip: Some(ip.to_owned()),
        actor: None,
        detail: Some(format!("refresh_token, scope {scopes}")),
    };
    state
        .audit
        .record(now, EventKind::TokenIssued, true, event)
        .await;
    Ok(body)
}

/// The refresh token `used` (by hash) is exchanged for: made and recorded by the first
/// exchange that gets here, the same one for every repeat after it while it is unused
/// (sealed with the key encryption key, bound to `used`); `None` once it has been used
/// itself, when a repeat of `used` can only be a stolen copy. A `repeat` (not the exchange
/// that claimed `used`) looks for the recorded one first, so that it makes none in vain.
async fn successor(
    state: &AppState,
    family: &str,
    used: &[u8],
    now: i64,
    repeat: bool,
) -> Result<Option<String>, OAuthError> {
    let context = [b"keel refresh successor|".as_slice(), used].concat();
    if repeat && let Recorded::Yes(token) = recorded_successor(state, used, &context).await? {
        return Ok(token);
    }
    let fresh = new_refresh_token(state, family, now).await?;
    let fresh_hash = sha256(fresh.as_bytes());
    let recorded = sqlx::query(
        "UPDATE refresh_tokens SET successor_hash = $1, successor_sealed = $2 \
         WHERE token_hash = $3 AND successor_hash IS NULL",
    )
    .bind(&fresh_hash)
    .bind(state.secrets.seal(&context, fresh.as_bytes()))
    .bind(used)
    .execute(state.db.pool())
    .await
    .map_err(server_error)?;
    if recorded.rows_affected() == 1 {
        return Ok(Some(fresh));
    }
    // Another exchange of `used` got there first: its token, not a second live one.
    sqlx::query("DELETE FROM refresh_tokens WHERE token_hash = $1")
        .bind(&fresh_hash)
        .execute(state.db.pool())
        .await
        .map_err(server_error)?;
    match recorded_successor(state, used, &context).await? {
        Recorded::Yes(token) => Ok(token),
        Recorded::No => Ok(None),
    }
}

/// Whether `used` has its successor recorded: `Yes(None)` when that one is gone or used.
enum Recorded {
    No,
    Yes(Option<String>),
}

async fn recorded_successor(
    state: &AppState,
    used: &[u8],
    context: &[u8],
) -> Result<Recorded, OAuthError> {
    let row = sqlx::query(
        "SELECT r.successor_sealed, s.used_at, s.token_hash AS present \
         FROM refresh_tokens r LEFT JOIN refresh_tokens s ON s.token_hash = r.successor_hash \
         WHERE r.token_hash = $1",
    )
    .bind(used)
    .fetch_one(state.db.pool())
    .await
    .map_err(server_error)?;
    let sealed: Option<Vec<u8>> = row.try_get("successor_sealed").map_err(server_error)?;
    let Some(sealed) = sealed else {
        return Ok(Recorded::No);
    };
    let present: Option<Vec<u8>> = row.try_get("present").map_err(server_error)?;
    let successor_used: Option<i64> = row.try_get("used_at").map_err(server_error)?;
    if present.is_none() || successor_used.is_some() {
        return Ok(Recorded::Yes(None));
    }
    let token = state
        .secrets
        .open(context, &sealed)
        .map_err(|_| OAuthError::server_error())?;
    String::from_utf8(token)
        .map(|token| Recorded::Yes(Some(token)))
        .map_err(|_| OAuthError::server_error())
}

/// Ends a grant for a security reason, and says so in the audit trail: a replay, a reuse,
/// its client's revocation. `detail` is both the stored reason and the event's detail.
pub(crate) async fn end_grant(
    state: &AppState,
    family_id: &str,
    kind: EventKind,
    client_id: &str,
    ip: &str,
    detail: &str,
) -> Result<(), OAuthError> {
    revoke_family(state, family_id, detail).await?;
    let event = Event {
        client_id: Some(client_id),
        ip: Some(ip.to_owned()),
        actor: None,
        detail: Some(detail.to_owned()),
        ..Event::default()
    };
    // Revoking by the client is what it asked for; the others are attacks seen.
    let success = kind == EventKind::TokenRevoked;
    state
        .audit
        .record(state.clock.now(), kind, success, event)
        .await;
    Ok(())
}

/// Ends a grant: its refresh tokens stop working.
pub(crate) async fn revoke_family(
    state: &AppState,
    family_id: &str,
    reason: &str,
) -> Result<(), OAuthError> {
    sqlx::query(
        "UPDATE token_families SET revoked_at = $1, revoked_reason = $2 \
         WHERE family_id = $3 AND revoked_at IS NULL",
    )
    .bind(state.clock.now())
    .bind(reason)
    .bind(family_id)
    .execute(state.db.pool())
    .await
    .map_err(server_error)?;
    Ok(())
}

pub(crate) fn server_error(error: impl std::fmt::Display) -> OAuthError {
    tracing::error!(%error, "token endpoint storage failed");
    OAuthError::server_error()
}

/// The scopes a request gets: those asked for, each of which the client must be allowed
/// (RFC 6749 §3.3); all the client's scopes when none are asked for.
pub(crate) fn granted_scopes(client: &Client, asked: Option<&str>) -> Result<Scopes, OAuthError> {
    let Some(asked) = asked else {
        return Ok(client.scopes.clone());
    };
    let asked = Scopes::parse(asked)
        .map_err(|error| OAuthError::new(ErrorCode::InvalidScope, error.to_string()))?;
    let beyond: Vec<&str> = asked.beyond(&client.scopes).collect();
    if !beyond.is_empty() {
        return Err(OAuthError::new(
            ErrorCode::InvalidScope,
            format!("not allowed for this client: {}", beyond.join(" ")),
        ));
    }
    Ok(asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Params, OAuthError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"),
        );
        Params::from_form(&headers, body.as_bytes())
    }

    #[test]
    fn forms_are_parsed_by_the_rules() {
        let params = form("grant_type=client_credentials&scope=a+b&empty=").unwrap();
        assert_eq!(params.get("grant_type"), Some("client_credentials"));
        assert_eq!(params.get("scope"), Some("a b"));
        assert_eq!(params.get("empty"), None);
        let repeated = form("scope=a&scope=b").err().unwrap();
        assert_eq!(repeated.code, ErrorCode::InvalidRequest);
        assert!(Params::from_form(&HeaderMap::new(), b"a=b").is_err());
        assert!(
            form("%zz=1").is_err() || form("%zz=1").is_ok(),
            "never panics"
        );
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let encode =
            |s: &str| HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(s))).unwrap();
        assert_eq!(
            basic_credentials(&encode("my%20client:s%3Acret+x")),
            Some(("my client".to_owned(), "s:cret x".to_owned()))
        );
        assert_eq!(
            basic_credentials(
                &HeaderValue::from_str(&format!("basic {}", STANDARD.encode("a:b"))).unwrap()
            ),
            Some(("a".to_owned(), "b".to_owned()))
        );
        assert_eq!(
            basic_credentials(&encode("svc&x:y")),
            Some(("svc&x".to_owned(), "y".to_owned()))
        );
        for bad in ["a%zz:b", "a:%e9", "a%2:b"] {
            assert_eq!(basic_credentials(&encode(bad)), None, "{bad}");
        }
        for bad in ["Bearer abc", "Basic", "Basic !!!", "Basic YWJj"] {
            assert_eq!(
                basic_credentials(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
        assert_eq!(basic_credentials(&encode(":secret")), None, "an empty id");
    }

    #[test]
    fn one_authentication_method_at_a_time() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("a:b"))).unwrap(),
        );
        let both = presented(&headers, &form("client_id=a&client_secret=b").unwrap());
        assert_eq!(both.err().unwrap().code, ErrorCode::InvalidRequest);
        let other_id = presented(&headers, &form("client_id=c").unwrap());
        assert_eq!(other_id.err().unwrap().code, ErrorCode::InvalidRequest);
        assert!(matches!(
            presented(&HeaderMap::new(), &form("client_id=a").unwrap()),
            Ok(Presented::Public { .. })
        ));
        let none = presented(&HeaderMap::new(), &form("grant_type=x").unwrap());
        assert_eq!(none.err().unwrap().code, ErrorCode::InvalidClient);
    }
}
