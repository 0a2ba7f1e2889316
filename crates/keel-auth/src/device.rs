//! The device authorization grant (RFC 8628), for CLIs and devices without a browser: the
//! device asks for a code pair, the person enters the short user code on the
//! verification page (signing in there), and the device polls the token endpoint until
//! the grant is approved, denied or expired.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use sqlx::Row;

use crate::audit::{Event, EventKind};
use crate::authorize::{
    CSRF_COOKIE, Purpose, SESSION_COOKIE, csrf_binding, csrf_cookie, is_cross_site, our_cookie,
    session_user, sign_in, with_cookie,
};
use crate::clients::{Client, GrantType};
use crate::crypto::sha256;
use crate::error::{ErrorCode, OAuthError};
use crate::html::{self, escape};
use crate::rbac::Subject;
use crate::scope::Scopes;
use crate::server::{AppState, ClientAddr};
use crate::token::{Params, client_request, granted_scopes, server_error};

/// What the page says of a code that is not pending (unknown, expired, answered).
const INVALID_CODE: &str =
    "That code is not valid, or it expired. Check the code your device shows.";

/// How long a code pair lives, and the least time between two polls.
const DEVICE_CODE_TTL: i64 = 600;
const POLL_INTERVAL: i64 = 5;
/// User codes: 8 consonants (no vowels, so no words; RFC 8628 §6.1), about 34 bits.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// `BCDF-GHJK` style, from random bytes by rejection (no modulo bias).
fn new_user_code(state: &AppState) -> String {
    let mut code = String::with_capacity(9);
    while code.len() < 9 {
        let mut byte = [0u8; 1];
        state.secrets.fill_random(&mut byte);
        if byte[0] >= 240 {
            continue;
        }
        if code.len() == 4 {
            code.push('-');
        }
        code.push(char::from(USER_CODE_ALPHABET[usize::from(byte[0] % 20)]));
    }
    code
}

/// What a person typed, as stored: upper case, without separators or spaces.
fn normalize_user_code(typed: &str) -> String {
    let letters: String = typed
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if letters.len() == 8 {
        format!("{}-{}", &letters[..4], &letters[4..])
    } else {
        letters
    }
}

/// `POST /device_authorization` (RFC 8628 §3.1-3.2).
pub(crate) async fn device_authorization(
    State(state): State<Arc<AppState>>,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let (client, params) = client_request(&state, &headers, body, &peer.to_string()).await?;
        if !client.may_use(GrantType::DeviceCode) {
            return Err(OAuthError::new(
                ErrorCode::UnauthorizedClient,
                "this client may not use the device grant",
            ));
        }
        let scopes = granted_scopes(&client, params.get("scope"))?;
        let device_code = state.secrets.generate_secret();
        let user_code = new_user_code(&state);
        let now = state.clock.now();
        sqlx::query(
            "INSERT INTO device_codes (device_code_hash, user_code, client_id, scopes, expires_at, \
             poll_interval, status, family_id) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
        )
        .bind(sha256(device_code.as_bytes()))
        .bind(&user_code)
        .bind(&client.client_id)
        .bind(scopes.to_string())
        .bind(now + DEVICE_CODE_TTL)
        .bind(POLL_INTERVAL)
        .bind(state.secrets.generate_id())
        .execute(state.db.pool())
        .await
        .map_err(server_error)?;
        let verification_uri = format!("{}/device", state.issuer);
        Ok(json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri_complete": format!("{verification_uri}?user_code={user_code}"),
            "verification_uri": verification_uri,
            "expires_in": DEVICE_CODE_TTL,
            "interval": POLL_INTERVAL,
        }))
    }
    .await;
    match result {
        Ok(body) => {
            let mut response = Json(body).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => error.into_response(),
    }
}

/// RFC 8628 §3.4-3.5: the token endpoint's answer to a polling device.
pub(crate) async fn exchange(
    state: &AppState,
    client: &Client,
    params: &Params,
) -> Result<(String, String, i64, Scopes), OAuthError> {
    let device_code = params.require("device_code")?;
    let hash = sha256(device_code.as_bytes());
    let now = state.clock.now();
    let row = sqlx::query(
        "SELECT client_id, scopes, expires_at, poll_interval, last_polled_at, status, user_id, \
         auth_time, family_id FROM device_codes WHERE device_code_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(state.db.pool())
    .await
    .map_err(server_error)?
    .ok_or_else(|| OAuthError::new(ErrorCode::InvalidGrant, "unknown device_code"))?;
    let get_text = |name: &str| row.try_get::<String, _>(name).map_err(server_error);
    if get_text("client_id")? != client.client_id {
        return Err(OAuthError::new(
            ErrorCode::InvalidGrant,
            "the device code was issued to another client",
        ));
    }
    let expires_at: i64 = row.try_get("expires_at").map_err(server_error)?;
    if expires_at <= now {
        return Err(OAuthError::new(
            ErrorCode::ExpiredToken,
            "the device code expired",
        ));
    }
    let status = get_text("status")?;
    // The poll claims its slot in one statement: of polls sent together within the
    // interval, one is answered and the others slowed down (a read then a write let them
    // all through).
    let on_time = sqlx::query(
        "UPDATE device_codes SET last_polled_at = $1 WHERE device_code_hash = $2 \
         AND (status <> 'pending' OR last_polled_at IS NULL OR $1 - last_polled_at >= poll_interval)",
    )
    .bind(now)
    .bind(&hash)
    .execute(state.db.pool())
    .await
    .map_err(server_error)?
    .rows_affected()
        == 1;
    if !on_time {
        // §3.5: slow down, and from now on by five seconds more.
        sqlx::query(
            "UPDATE device_codes SET poll_interval = poll_interval + 5, last_polled_at = $1 \
             WHERE device_code_hash = $2",
        )
        .bind(now)
        .bind(&hash)
        .execute(state.db.pool())
        .await
        .map_err(server_error)?;
        return Err(OAuthError::new(ErrorCode::SlowDown, "polling too often"));
    }
    match status.as_str() {
        "pending" => Err(OAuthError::new(
            ErrorCode::AuthorizationPending,
            "the user has not answered yet",
        )),
        "denied" => Err(OAuthError::new(
            ErrorCode::AccessDenied,
            "the user denied access",
        )),
        "approved" => {
            // Used once: the exchange that flips it gets the tokens.
            let claimed = sqlx::query(
                "UPDATE device_codes SET status = 'used' WHERE device_code_hash = $1 AND status = 'approved'",
            )
            .bind(&hash)
            .execute(state.db.pool())
            .await
            .map_err(server_error)?;
            if claimed.rows_affected() != 1 {
                return Err(OAuthError::new(
                    ErrorCode::InvalidGrant,
                    "the device code was used",
                ));
            }
            let user_id: String = row.try_get("user_id").map_err(server_error)?;
            let auth_time: i64 = row.try_get("auth_time").map_err(server_error)?;
            let scopes = Scopes::parse(&get_text("scopes")?).map_err(server_error)?;
            Ok((user_id, get_text("family_id")?, auth_time, scopes))
        }
        _ => Err(OAuthError::new(
            ErrorCode::InvalidGrant,
            "the device code was used",
        )),
    }
}

#[derive(Deserialize)]
pub(crate) struct DeviceQuery {
    user_code: Option<String>,
}

/// `GET /device`: the verification page (RFC 8628 §3.3), signed in or not.
pub(crate) async fn page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<DeviceQuery>,
) -> Response {
    let user_code = query
        .user_code
        .as_deref()
        .map(normalize_user_code)
        .unwrap_or_default();
    match session_user(&state, &headers).await {
        Some((user, _)) => {
            let session = our_cookie(&state, &headers, SESSION_COOKIE).unwrap_or_default();
            approval_page(&state, session, &user.username, &user_code, None).await
        }
        None => {
            let (cookie, new_cookie) = csrf_cookie(&state, &headers);
            let csrf = state
                .secrets
                .csrf_token(&csrf_binding(Purpose::DeviceLogin, &cookie, ""));
            with_cookie(
                sign_in_page(StatusCode::OK, &csrf, &user_code, "", None, false),
                new_cookie,
            )
        }
    }
}

/// `POST /device`: signs in (when the form has a username), then approves or denies the
/// device whose user code the form carries.
pub(crate) async fn post(
    State(state): State<Arc<AppState>>,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let forbidden = || {
        html::error_page(
            StatusCode::FORBIDDEN,
            "The form expired or did not come from this site. Open the device page again.",
        )
    };
    if is_cross_site(&state, &headers) {
        return forbidden();
    }
    let Ok(body) = body else {
        return html::error_page(StatusCode::BAD_REQUEST, "The form is too large.");
    };
    let Ok(form) = Params::from_form(&headers, &body) else {
        return html::error_page(StatusCode::BAD_REQUEST, "The form is malformed.");
    };
    let user_code = normalize_user_code(form.get("user_code").unwrap_or_default());
    let csrf = form.get("csrf").unwrap_or_default();
    if let Some(username) = form.get("username") {
        let valid = our_cookie(&state, &headers, CSRF_COOKIE).is_some_and(|cookie| {
            state
                .secrets
                .csrf_matches(&csrf_binding(Purpose::DeviceLogin, cookie, ""), csrf)
        });
        if !valid {
            return forbidden();
        }
        let password = form.get("password").unwrap_or_default();
        return match sign_in(&state, peer, username, password, form.get("otp"), None).await {
            Ok(signed_in) => {
                let page = approval_page(
                    &state,
                    &signed_in.session,
                    &signed_in.user.username,
                    &user_code,
                    None,
                )
                .await;
                with_cookie(page, Some(signed_in.cookie))
            }
            Err(refusal) => sign_in_page(
                refusal.status,
                csrf,
                &user_code,
                username,
                Some(&refusal.message),
                refusal.ask_code,
            ),
        };
    }
    let Some((user, auth_time)) = session_user(&state, &headers).await else {
        return forbidden();
    };
    let session = our_cookie(&state, &headers, SESSION_COOKIE).unwrap_or_default();
    let binding = csrf_binding(Purpose::DeviceApproval, session, "");
    if !state.secrets.csrf_matches(&binding, csrf) {
        return forbidden();
    }
    let now = state.clock.now();
    if state.address_failures.blocked(peer, now) {
        return html::error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many wrong codes from your network. Try again later.",
        );
    }
    let approve = form.get("decision") == Some("allow");
    let pending = pending_device(&state, &user_code).await;
    let Some((client, scopes)) = pending else {
        state.address_failures.record(peer, now);
        return approval_page(&state, session, &user.username, "", Some(INVALID_CODE)).await;
    };
    // The user's roles decide the guarded scopes, as in the code flow.
    let holder = Subject::User(user.user_id.clone());
    let scopes = match state.rbac.holdings(&holder).await {
        Ok(holdings) => state
            .rbac
            .permitted(&scopes, &holdings, &state.audiences(&client))
            .await
            .unwrap_or_default(),
        Err(_) => Scopes::default(),
    };
    let answered = answer_device(
        &state,
        &user_code,
        approve,
        &user.user_id,
        auth_time,
        &scopes,
        now,
    )
    .await;
    let answered = match answered {
        Ok(answered) => answered,
        Err(error) => {
            tracing::error!(%error, "device answer not stored");
            return html::error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server could not record your answer. Try again.",
            );
        }
    };
    if !answered {
        // Expired, or answered in another tab meanwhile.
        return approval_page(&state, session, &user.username, "", Some(INVALID_CODE)).await;
    }
    let event = Event {
        subject: Some(&user.user_id),
        client_id: Some(&client.client_id),
        ip: Some(peer.to_string()),
        actor: None,
        detail: Some(format!(
            "device {}",
            if approve { "approved" } else { "denied" }
        )),
    };
    state
        .audit
        .record(now, EventKind::DeviceAnswered, approve, event)
        .await;
    let message = if approve {
        format!(
            "{} is connected. You can return to your device.",
            client.name
        )
    } else {
        format!("{} was not allowed. You can close this page.", client.name)
    };
    html::page(
        StatusCode::OK,
        "Device",
        &format!("<h1>Done</h1><p role=\"status\">{}</p>", escape(&message)),
    )
}

/// Records the user's answer for the pending device `user_code` and, when approving, the
/// grant it starts, in one transaction; false when the code was no longer pending.
async fn answer_device(
    state: &AppState,
    user_code: &str,
    approve: bool,
    user_id: &str,
    auth_time: i64,
    scopes: &Scopes,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let mut tx = state.db.pool().begin().await?;
    let answered = sqlx::query(
        "UPDATE device_codes SET status = $1, user_id = $2, auth_time = $3, scopes = $4 \
         WHERE user_code = $5 AND status = 'pending' AND expires_at > $6",
    )
    .bind(if approve { "approved" } else { "denied" })
    .bind(user_id)
    .bind(auth_time)
    .bind(scopes.to_string())
    .bind(user_code)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if answered.rows_affected() != 1 {
        return Ok(false);
    }
    if approve {
        // The grant exists from approval on (as a code's does), so that revocation and
        // introspection see it.
        sqlx::query(
            "INSERT INTO token_families (family_id, client_id, user_id, scopes, auth_time, created_at) \
             SELECT family_id, client_id, user_id, scopes, auth_time, $1 FROM device_codes WHERE user_code = $2",
        )
        .bind(now)
        .bind(user_code)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// The client and scopes of the pending device with `user_code`.
async fn pending_device(state: &AppState, user_code: &str) -> Option<(Client, Scopes)> {
    let row = sqlx::query(
        "SELECT client_id, scopes FROM device_codes \
         WHERE user_code = $1 AND status = 'pending' AND expires_at > $2",
    )
    .bind(user_code)
    .bind(state.clock.now())
    .fetch_optional(state.db.pool())
    .await
    .ok()??;
    let client_id: String = row.try_get("client_id").ok()?;
    let scopes = Scopes::parse(&row.try_get::<String, _>("scopes").ok()?).ok()?;
    let client = state.clients.find(&client_id).await.ok()??;
    Some((client, scopes))
}

fn sign_in_page(
    status: StatusCode,
    csrf: &str,
    user_code: &str,
    username: &str,
    error: Option<&str>,
    ask_code: bool,
) -> Response {
    let error = error.map_or_else(String::new, |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))
    });
    html::page(
        status,
        "Connect a device",
        &format!(
            "<h1>Sign in to connect a device</h1>{error}\
             <form method=\"post\" action=\"/device\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"user_code\">Code shown on your device</label>\
             <input type=\"text\" id=\"user_code\" name=\"user_code\" value=\"{code}\" autocomplete=\"off\" required>\
             <label for=\"username\">Username</label>\
             <input type=\"text\" id=\"username\" name=\"username\" value=\"{username}\" autocomplete=\"username\" required>\
             <label for=\"password\">Password</label>\
             <input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
             {otp}<button type=\"submit\">Sign in</button></form>",
            csrf = escape(csrf),
            code = escape(user_code),
            username = escape(username),
            otp = if ask_code { html::code_field() } else { "" },
        ),
    )
}

async fn approval_page(
    state: &AppState,
    session: &str,
    username: &str,
    user_code: &str,
    error: Option<&str>,
) -> Response {
    let csrf = state
        .secrets
        .csrf_token(&csrf_binding(Purpose::DeviceApproval, session, ""));
    let asking = match pending_device(state, user_code).await {
        Some((client, scopes)) => {
            let scopes: Vec<String> = scopes.iter().map(escape).collect();
            format!(
                "<p><strong>{}</strong> asks to: {}.</p>",
                escape(&client.name),
                if scopes.is_empty() {
                    "sign you in".to_owned()
                } else {
                    scopes.join(", ")
                }
            )
        }
        None => String::new(),
    };
    let error = error.map_or_else(String::new, |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))
    });
    html::page(
        StatusCode::OK,
        "Connect a device",
        &format!(
            "<h1>Connect a device</h1>{error}<p>Signed in as <strong>{username}</strong>.</p>{asking}\
             <p><strong>Only allow a device you started yourself</strong>, and check that the code \
             below is the one it shows: someone who sent you this link could be asking for your \
             account.</p>\
             <form method=\"post\" action=\"/device\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"user_code\">Code shown on your device</label>\
             <input type=\"text\" id=\"user_code\" name=\"user_code\" value=\"{code}\" autocomplete=\"off\" required>\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"secondary\">Deny</button></form>",
            username = escape(username),
            csrf = escape(&csrf),
            code = escape(user_code),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_codes_are_normalized() {
        assert_eq!(normalize_user_code("bcdf-ghjk"), "BCDF-GHJK");
        assert_eq!(normalize_user_code(" bcdf ghjk "), "BCDF-GHJK");
        assert_eq!(normalize_user_code("BCDFGHJK"), "BCDF-GHJK");
        assert_eq!(normalize_user_code("<script>"), "SCRIPT");
    }
}
