//! What the server says about its own tokens: introspection (RFC 7662), revocation
//! (RFC 7009) and userinfo (OpenID Connect Core §5.3).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use sqlx::Row;

use crate::audit::{Event, EventKind};
use crate::clients::{AuthMethod, Client};
use crate::crypto::sha256;
use crate::error::OAuthError;
use crate::server::{AppState, ClientAddr};
use crate::token::{client_request, end_grant, server_error};
use crate::users::User;

/// A live access token: its claims, and the user it speaks for (none for a client's own
/// token), looked up once for whoever needs them.
pub(crate) struct LiveAccess {
    pub(crate) claims: Value,
    pub(crate) user: Option<User>,
}

/// A token found live, with what introspection tells about it.
enum Live {
    Access {
        claims: Value,
    },
    Refresh {
        client_id: String,
        subject: Option<String>,
        scopes: String,
        expires_at: i64,
    },
}

/// The access token `token` if it is one of ours, unexpired and not revoked (alone or with
/// its grant).
pub(crate) async fn live_access_token(
    state: &AppState,
    token: &str,
) -> Result<Option<LiveAccess>, OAuthError> {
    let now = state.clock.now();
    let Some(claims) = state.keys.verify(token, "at+jwt", now) else {
        return Ok(None);
    };
    let fresh = claims.get("iss").and_then(Value::as_str) == Some(state.issuer.as_str())
        && claims
            .get("exp")
            .and_then(Value::as_i64)
            .is_some_and(|exp| exp > now);
    let Some(jti) = claims.get("jti").and_then(Value::as_str).filter(|_| fresh) else {
        return Ok(None);
    };
    let row = sqlx::query(
        "SELECT a.revoked_at, f.revoked_at AS family_revoked_at FROM access_tokens a \
         LEFT JOIN token_families f ON f.family_id = a.family_id WHERE a.jti = $1",
    )
    .bind(jti)
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?;
    let Some(row) = row else { return Ok(None) };
    let revoked: Option<i64> = row.try_get("revoked_at").map_err(server_error)?;
    let family_revoked: Option<i64> = row.try_get("family_revoked_at").map_err(server_error)?;
    if revoked.is_some() || family_revoked.is_some() {
        return Ok(None);
    }
    // A user's token dies with the user's account: disabled or deleted, it is not live.
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let mut user = None;
    if let (Some(subject), Some(client_id)) = (text("sub"), text("client_id"))
        && subject != client_id
    {
        match state.users.find(subject).await.map_err(server_error)? {
            Some(found) if !found.disabled => user = Some(found),
            _ => return Ok(None),
        }
    }
    Ok(Some(LiveAccess { claims, user }))
}

/// The refresh token `token` if it is live: unexpired, its grant not revoked, and not
/// used (a used one is live only within its one grace exchange, which introspection
/// does not grant).
async fn live_refresh_token(state: &AppState, token: &str) -> Result<Option<Live>, OAuthError> {
    let row = sqlx::query(
        "SELECT f.client_id, f.user_id, f.scopes, r.expires_at \
         FROM refresh_tokens r JOIN token_families f ON f.family_id = r.family_id \
         WHERE r.token_hash = $1 AND r.used_at IS NULL AND f.revoked_at IS NULL AND r.expires_at > $2",
    )
    .bind(sha256(token.as_bytes()))
    .bind(state.clock.now())
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Live::Refresh {
        client_id: row.try_get("client_id").map_err(server_error)?,
        subject: row.try_get("user_id").map_err(server_error)?,
        scopes: row.try_get("scopes").map_err(server_error)?,
        expires_at: row.try_get("expires_at").map_err(server_error)?,
    }))
}

/// The grant and client of refresh token `token`, used or not, expired or not.
async fn refresh_family(
    state: &AppState,
    token: &str,
) -> Result<Option<(String, String)>, OAuthError> {
    let row = sqlx::query(
        "SELECT f.family_id, f.client_id FROM refresh_tokens r \
         JOIN token_families f ON f.family_id = r.family_id WHERE r.token_hash = $1",
    )
    .bind(sha256(token.as_bytes()))
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?;
    row.map(|row| {
        Ok((
            row.try_get("family_id").map_err(server_error)?,
            row.try_get("client_id").map_err(server_error)?,
        ))
    })
    .transpose()
}

/// `token` as an access token, then as a refresh token (or the other way round when the
/// hint says so; RFC 7009 §2.1 and RFC 7662 §2.1 make the hint advisory).
async fn find(
    state: &AppState,
    token: &str,
    hint: Option<&str>,
) -> Result<Option<Live>, OAuthError> {
    let access = |state, token| async move {
        Ok::<_, OAuthError>(
            live_access_token(state, token)
                .await?
                .map(|live| Live::Access {
                    claims: live.claims,
                }),
        )
    };
    if hint == Some("refresh_token") {
        if let Some(live) = live_refresh_token(state, token).await? {
            return Ok(Some(live));
        }
        return access(state, token).await;
    }
    if let Some(live) = access(state, token).await? {
        return Ok(Some(live));
    }
    live_refresh_token(state, token).await
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether `caller` may learn about `live` (RFC 7662 §2.1, §4): a refresh token only by
/// the client it was issued to; an access token also by the resource server it is for,
/// i.e. a client whose id is in the token's `aud` (a resource server registers as a
/// client named after its audience). Everyone else hears `{"active": false}`, as for an
/// unknown token.
fn may_introspect(caller: &Client, live: &Live) -> bool {
    match live {
        Live::Refresh { client_id, .. } => *client_id == caller.client_id,
        Live::Access { claims } => {
            let issued_to = claims.get("client_id").and_then(Value::as_str);
            let audience: Vec<&str> = match claims.get("aud") {
                Some(Value::String(one)) => vec![one.as_str()],
                Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            issued_to == Some(caller.client_id.as_str())
                || audience.contains(&caller.client_id.as_str())
        }
    }
}

/// `POST /introspect` (RFC 7662): for confidential clients (resource servers). Any token
/// that is not live, or not known, is exactly `{"active": false}`.
pub(crate) async fn introspect(
    State(state): State<Arc<AppState>>,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let (client, params) = client_request(&state, &headers, body, &peer.to_string()).await?;
        if client.auth_method == AuthMethod::None {
            return Err(OAuthError::invalid_client(
                "public clients may not introspect",
            ));
        }
        let token = params.require("token")?;
        let found = find(&state, token, params.get("token_type_hint"))
            .await?
            .filter(|live| may_introspect(&client, live));
        let answer = match found {
            None => json!({"active": false}),
            Some(Live::Access { mut claims }) => {
                claims["active"] = json!(true);
                claims["token_type"] = json!("Bearer");
                claims
            }
            Some(Live::Refresh {
                client_id,
                subject,
                scopes,
                expires_at,
                ..
            }) => {
                let mut answer = json!({
                    "active": true,
                    "token_type": "refresh_token",
                    "client_id": client_id,
                    "scope": scopes,
                    "exp": expires_at,
                    "iss": state.issuer,
                });
                if let Some(subject) = subject {
                    answer["sub"] = json!(subject);
                }
                answer
            }
        };
        Ok(answer)
    }
    .await;
    match result {
        Ok(answer) => no_store(Json(answer).into_response()),
        Err(error) => error.into_response(),
    }
}

/// `POST /revoke` (RFC 7009): a client revokes its own token. Revoking a refresh token
/// ends its grant, access tokens included; revoking an access token ends that token.
/// Unknown, expired or someone else's tokens get the same 200 (§2.2), and nothing
/// changes.
pub(crate) async fn revoke(
    State(state): State<Arc<AppState>>,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ip = peer.to_string();
    let result = async {
        let (client, params) = client_request(&state, &headers, body, &ip).await?;
        let token = params.require("token")?;
        // A refresh token is revoked by its client whatever its state: a client that
        // suspects its rotated-away token was stolen ends the grant with it.
        if let Some((family_id, client_id)) = refresh_family(&state, token).await? {
            if client_id == client.client_id {
                let detail = "refresh token revoked by its client";
                end_grant(
                    &state,
                    &family_id,
                    EventKind::TokenRevoked,
                    &client_id,
                    &ip,
                    detail,
                )
                .await?;
            }
            return Ok(());
        }
        let live = live_access_token(&state, token).await?;
        let own = live.as_ref().and_then(|live| {
            let issued_to = live.claims.get("client_id").and_then(Value::as_str);
            (issued_to == Some(client.client_id.as_str()))
                .then(|| live.claims.get("jti").and_then(Value::as_str))
                .flatten()
        });
        if let Some(jti) = own {
            sqlx::query(
                "UPDATE access_tokens SET revoked_at = $1 WHERE jti = $2 AND revoked_at IS NULL",
            )
            .bind(state.clock.now())
            .bind(jti)
            .execute(state.db.pool())
            .await
            .map_err(server_error)?;
            let event = Event {
                client_id: Some(&client.client_id),
                ip: Some(ip.clone()),
                detail: Some("access token revoked by its client".to_owned()),
                ..Event::default()
            };
            state
                .audit
                .record(state.clock.now(), EventKind::TokenRevoked, true, event)
                .await;
        }
        Ok::<(), OAuthError>(())
    }
    .await;
    match result {
        Ok(()) => no_store(StatusCode::OK.into_response()),
        Err(error) => error.into_response(),
    }
}

/// The token of an `Authorization: Bearer` header (RFC 6750 §2.1).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// `response` with an RFC 6750 `WWW-Authenticate: Bearer` challenge, naming `error` when
/// there is one.
pub(crate) fn with_challenge(mut response: Response, error: Option<&str>) -> Response {
    let value = match error {
        Some(error) => format!("Bearer realm=\"keel\", error=\"{error}\""),
        None => "Bearer realm=\"keel\"".to_owned(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// `GET`/`POST /userinfo`: the signed-in user's claims, for an access token with `openid`
/// (OIDC Core §5.3). Errors are RFC 6750's, in `WWW-Authenticate`.
pub(crate) async fn userinfo(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let challenge =
        |status: StatusCode, error: &str| with_challenge(status.into_response(), Some(error));
    let Some(token) = bearer(&headers) else {
        return with_challenge(StatusCode::UNAUTHORIZED.into_response(), None);
    };
    let LiveAccess { claims, user } = match live_access_token(&state, token).await {
        Ok(Some(live)) => live,
        Ok(None) => return challenge(StatusCode::UNAUTHORIZED, "invalid_token"),
        Err(error) => return error.into_response(),
    };
    let scopes = claims
        .get("scope")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let has = |scope: &str| scopes.split(' ').any(|s| s == scope);
    if !has("openid") {
        return challenge(StatusCode::FORBIDDEN, "insufficient_scope");
    }
    // A client's own token (client credentials) speaks for no user.
    let Some(user) = user else {
        return challenge(StatusCode::UNAUTHORIZED, "invalid_token");
    };
    let mut answer = json!({"sub": user.user_id});
    if has("profile") {
        answer["preferred_username"] = json!(user.username);
        if let Some(name) = &user.name {
            answer["name"] = json!(name);
        }
    }
    if let (true, Some(email)) = (has("email"), &user.email) {
        answer["email"] = json!(email);
    }
    no_store(Json(answer).into_response())
}
