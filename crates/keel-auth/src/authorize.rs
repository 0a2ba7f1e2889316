//! The authorization endpoint (RFC 6749 §4.1, OpenID Connect Core §3.1.2) and the pages
//! behind it: sign-in and consent.
//!
//! The authorization request travels through the forms as its original query string and
//! is validated again on every step, so nothing a form posts can widen it. Errors about
//! the client or the redirect URI are shown on a page and never redirected (RFC 6749
//! §4.1.2.1); every other error goes back to the client's redirect URI with `state` and
//! `iss` (RFC 9207).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::audit::{Event, EventKind};
use crate::clients::{AuthMethod, Client, GrantType};
use crate::crypto::sha256;
use crate::error::ErrorCode;
use crate::html;
use crate::rbac::Subject;
use crate::scope::Scopes;
use crate::server::AppState;
use crate::token::Params;
use crate::users::User;

/// The cookie of a signed-in browser (a random id; the server keeps its hash).
pub(crate) const SESSION_COOKIE: &str = "keel_session";
/// The cookie CSRF tokens are bound to.
const CSRF_COOKIE: &str = "keel_csrf";
/// Longest authorization request accepted (its query string).
const MAX_REQUEST: usize = 8 * 1024;

/// A validated authorization request.
pub(crate) struct AuthorizationRequest {
    pub(crate) client: Client,
    /// Where the answer goes; `given` says whether the request named it (the token
    /// request must then name it too).
    pub(crate) redirect_uri: String,
    pub(crate) redirect_uri_given: bool,
    pub(crate) scopes: Scopes,
    pub(crate) state: Option<String>,
    pub(crate) nonce: Option<String>,
    pub(crate) code_challenge: Option<String>,
    pub(crate) prompt: Prompt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prompt {
    Default,
    /// `prompt=none`: answer without showing a page, or fail.
    None,
    /// `prompt=login`: sign in again even with a session.
    Login,
    /// `prompt=consent`: ask again even with a stored consent.
    Consent,
}

/// Why a request cannot proceed.
pub(crate) enum Refusal {
    /// Shown on a page: the redirect URI cannot be trusted.
    Page(StatusCode, String),
    /// Sent to the client's redirect URI.
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        code: &'static str,
        description: String,
    },
}

impl Refusal {
    fn into_response(self, issuer: &str) -> Response {
        match self {
            Self::Page(status, message) => html::error_page(status, &message),
            Self::Redirect {
                redirect_uri,
                state,
                code,
                description,
            } => {
                let mut pairs = vec![
                    ("error", code.to_owned()),
                    ("error_description", description),
                ];
                if let Some(state) = state {
                    pairs.push(("state", state));
                }
                pairs.push(("iss", issuer.to_owned()));
                redirect_to(&redirect_uri, &pairs)
            }
        }
    }
}

/// A 303 to `uri` with `pairs` added to its query.
fn redirect_to(uri: &str, pairs: &[(&str, String)]) -> Response {
    let query = serde_urlencoded::to_string(pairs).unwrap_or_default();
    let separator = if uri.contains('?') { '&' } else { '?' };
    let mut response = Redirect::to(&format!("{uri}{separator}{query}")).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl AuthorizationRequest {
    /// Parses and checks `query` (an authorization request's query string).
    pub(crate) async fn validate(state: &AppState, query: &str) -> Result<Self, Refusal> {
        let page = |message: &str| Refusal::Page(StatusCode::BAD_REQUEST, message.to_owned());
        if query.len() > MAX_REQUEST {
            return Err(page("The request is too long."));
        }
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|_| page("The request is malformed."))?;
        let mut seen = std::collections::HashSet::new();
        let repeated = pairs
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .find(|(name, _)| !seen.insert(name.as_str()))
            .map(|(name, _)| name.clone());
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(n, v)| n == name && !v.is_empty())
                .map(|(_, v)| v.clone())
        };
        let Some(client_id) = get("client_id") else {
            return Err(page("The request names no client (client_id)."));
        };
        if repeated.as_deref() == Some("client_id") || repeated.as_deref() == Some("redirect_uri") {
            return Err(page("The request repeats client_id or redirect_uri."));
        }
        let client = match state.clients.find(&client_id).await {
            Ok(Some(client)) if !client.disabled => client,
            Ok(_) => return Err(page("The application is not registered here.")),
            Err(error) => {
                tracing::error!(%error, "client lookup failed");
                return Err(Refusal::Page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The server could not look up the application.".to_owned(),
                ));
            }
        };
        let given = get("redirect_uri");
        let redirect_uri = match (&given, client.redirect_uris.as_slice()) {
            (Some(uri), registered) if registered.iter().any(|r| r == uri) => uri.clone(),
            (Some(_), _) => {
                return Err(page(
                    "The redirect URI is not registered for this application.",
                ));
            }
            (None, [only]) => only.clone(),
            (None, _) => return Err(page("The request must name its redirect URI.")),
        };
        let client_state = get("state");
        let refuse = |code: ErrorCode, description: &str| Refusal::Redirect {
            redirect_uri: redirect_uri.clone(),
            state: client_state.clone(),
            code: code.as_str(),
            description: description.to_owned(),
        };
        if let Some(name) = repeated {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                &format!("parameter {name} is given more than once"),
            ));
        }
        match get("response_type").as_deref() {
            Some("code") => {}
            None => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "response_type is missing",
                ));
            }
            Some(_) => {
                return Err(Refusal::Redirect {
                    redirect_uri: redirect_uri.clone(),
                    state: client_state.clone(),
                    code: "unsupported_response_type",
                    description: "only response_type=code is supported".to_owned(),
                });
            }
        }
        if !client.may_use(GrantType::AuthorizationCode) {
            return Err(refuse(
                ErrorCode::UnauthorizedClient,
                "this client may not use the authorization code grant",
            ));
        }
        if get("request").is_some() || get("request_uri").is_some() {
            return Err(Refusal::Redirect {
                redirect_uri: redirect_uri.clone(),
                state: client_state.clone(),
                code: "request_not_supported",
                description: "request objects are not supported".to_owned(),
            });
        }
        let scopes = match get("scope") {
            None => client.scopes.clone(),
            Some(scope) => {
                let asked = Scopes::parse(&scope)
                    .map_err(|e| refuse(ErrorCode::InvalidScope, &e.to_string()))?;
                let beyond: Vec<&str> = asked.beyond(&client.scopes).collect();
                if !beyond.is_empty() {
                    return Err(refuse(
                        ErrorCode::InvalidScope,
                        &format!("not allowed for this client: {}", beyond.join(" ")),
                    ));
                }
                asked
            }
        };
        // PKCE (RFC 7636), S256 only, and required of public clients.
        let code_challenge = match (
            get("code_challenge"),
            get("code_challenge_method").as_deref(),
        ) {
            (Some(challenge), Some("S256")) => {
                let valid = challenge.len() == 43
                    && challenge
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid {
                    return Err(refuse(
                        ErrorCode::InvalidRequest,
                        "code_challenge must be a base64url SHA-256 (43 characters)",
                    ));
                }
                Some(challenge)
            }
            (Some(_), None) => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "code_challenge_method is required (S256)",
                ));
            }
            (_, Some(_)) if get("code_challenge").is_none() => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "code_challenge is missing",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "only code_challenge_method=S256 is supported",
                ));
            }
            (None, _) if client.auth_method == AuthMethod::None => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "public clients must use PKCE (code_challenge with S256)",
                ));
            }
            (None, _) => None,
        };
        let prompt = match get("prompt").as_deref() {
            None => Prompt::Default,
            Some("none") => Prompt::None,
            Some("login") => Prompt::Login,
            Some("consent") => Prompt::Consent,
            Some(_) => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "prompt must be one of none, login, consent",
                ));
            }
        };
        let nonce = get("nonce");
        if nonce.as_ref().is_some_and(|n| n.len() > 512)
            || client_state.as_ref().is_some_and(|s| s.len() > 2048)
        {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                "state or nonce is too long",
            ));
        }
        Ok(Self {
            client,
            redirect_uri,
            redirect_uri_given: given.is_some(),
            scopes,
            state: client_state,
            nonce,
            code_challenge,
            prompt,
        })
    }

    fn refuse(&self, code: &'static str, description: &str) -> Refusal {
        Refusal::Redirect {
            redirect_uri: self.redirect_uri.clone(),
            state: self.state.clone(),
            code,
            description: description.to_owned(),
        }
    }
}

// === cookies and sessions ===

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age: i64) -> HeaderValue {
    let secure = if state.issuer.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    // SameSite=Lax: sent on the top-level navigation from the client back to /authorize.
    let cookie =
        format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The user signed in on this browser, and when they signed in.
async fn session_user(state: &AppState, headers: &HeaderMap) -> Option<(User, i64)> {
    let id = cookie(headers, SESSION_COOKIE)?;
    let row = sqlx::query(
        "SELECT user_id, auth_time FROM login_sessions WHERE id_hash = $1 AND expires_at > $2",
    )
    .bind(sha256(id.as_bytes()))
    .bind(state.clock.now())
    .fetch_optional(state.db.pool())
    .await
    .ok()??;
    let user_id: String = row.try_get("user_id").ok()?;
    let auth_time: i64 = row.try_get("auth_time").ok()?;
    let user = state.users.find(&user_id).await.ok()??;
    (!user.disabled).then_some((user, auth_time))
}

/// The CSRF cookie of this browser, and the header that sets it when it is new.
fn csrf_cookie(state: &AppState, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match cookie(headers, CSRF_COOKIE) {
        Some(value) => (value.to_owned(), None),
        None => {
            let value = state.secrets.generate_id();
            let header = set_cookie(state, CSRF_COOKIE, &value, 24 * 3600);
            (value, Some(header))
        }
    }
}

fn with_cookie(mut response: Response, cookie: Option<HeaderValue>) -> Response {
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

// === the endpoints ===

/// `GET /authorize`.
pub(crate) async fn authorize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let request = match AuthorizationRequest::validate(&state, &query).await {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(&state.issuer),
    };
    let session = match request.prompt {
        Prompt::Login => None,
        _ => session_user(&state, &headers).await,
    };
    let Some((user, auth_time)) = session else {
        if request.prompt == Prompt::None {
            return request
                .refuse("login_required", "the user is not signed in")
                .into_response(&state.issuer);
        }
        let (csrf_cookie, new_cookie) = csrf_cookie(&state, &headers);
        let csrf = state.secrets.csrf_token(&csrf_cookie);
        let page = html::login_page(
            StatusCode::OK,
            &request.client.name,
            &query,
            &csrf,
            "",
            None,
        );
        return with_cookie(page, new_cookie);
    };
    continue_signed_in(&state, &headers, &query, request, &user, auth_time).await
}

/// The flow once the user is known: consent if needed, then the code.
async fn continue_signed_in(
    state: &AppState,
    headers: &HeaderMap,
    query: &str,
    mut request: AuthorizationRequest,
    user: &User,
    auth_time: i64,
) -> Response {
    if let Err(response) = restrict_to_roles(state, &mut request, user).await {
        return response;
    }
    let consented = match request.prompt {
        Prompt::Consent => false,
        _ => has_consent(state, &user.user_id, &request).await,
    };
    if !consented {
        if request.prompt == Prompt::None {
            return request
                .refuse("consent_required", "the user has not allowed this client")
                .into_response(&state.issuer);
        }
        let (csrf_cookie, new_cookie) = csrf_cookie(state, headers);
        let csrf = state.secrets.csrf_token(&csrf_cookie);
        let scopes: Vec<&str> = request.scopes.iter().collect();
        let page = html::consent_page(&request.client.name, &user.username, &scopes, query, &csrf);
        return with_cookie(page, new_cookie);
    }
    issue_code(state, &request, user, auth_time).await
}

/// Narrows the request's scopes to those `user` may be granted: a scope a role guards
/// goes only to the role's holders (RFC 6749 §3.3 lets the server grant less than asked;
/// the token response then names what was granted). Every step that consents or issues a
/// code calls this, since each validates the request afresh from its query.
async fn restrict_to_roles(
    state: &AppState,
    request: &mut AuthorizationRequest,
    user: &User,
) -> Result<(), Response> {
    let holder = Subject::User(user.user_id.clone());
    let permitted = match state.rbac.holdings(&holder).await {
        Ok(holdings) => state.rbac.permitted(&request.scopes, &holdings).await,
        Err(error) => Err(error),
    };
    match permitted {
        Ok(scopes) => {
            request.scopes = scopes;
            Ok(())
        }
        Err(error) => {
            tracing::error!(%error, "roles not read");
            Err(request
                .refuse("server_error", "the server could not complete the request")
                .into_response(&state.issuer))
        }
    }
}

async fn has_consent(state: &AppState, user_id: &str, request: &AuthorizationRequest) -> bool {
    let row = sqlx::query("SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2")
        .bind(user_id)
        .bind(&request.client.client_id)
        .fetch_optional(state.db.pool())
        .await;
    let Ok(Some(row)) = row else { return false };
    row.try_get::<String, _>("scopes")
        .ok()
        .and_then(|scopes| Scopes::parse(&scopes).ok())
        .is_some_and(|granted| request.scopes.is_subset(&granted))
}

/// Stores a one-time code for the request and sends the browser back with it.
async fn issue_code(
    state: &AppState,
    request: &AuthorizationRequest,
    user: &User,
    auth_time: i64,
) -> Response {
    let code = state.secrets.generate_secret();
    let now = state.clock.now();
    let stored = sqlx::query(
        "INSERT INTO authorization_codes (code_hash, client_id, user_id, redirect_uri, scopes, \
         nonce, code_challenge, auth_time, expires_at, family_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(sha256(code.as_bytes()))
    .bind(&request.client.client_id)
    .bind(&user.user_id)
    .bind(if request.redirect_uri_given {
        request.redirect_uri.as_str()
    } else {
        ""
    })
    .bind(request.scopes.to_string())
    .bind(&request.nonce)
    .bind(request.code_challenge.as_deref().unwrap_or(""))
    .bind(auth_time)
    .bind(now + state.config.code_ttl_seconds())
    .bind(state.secrets.generate_id())
    .execute(state.db.pool())
    .await;
    if let Err(error) = stored {
        tracing::error!(%error, "authorization code not stored");
        return request
            .refuse("server_error", "the server could not complete the request")
            .into_response(&state.issuer);
    }
    let mut pairs = vec![("code", code)];
    if let Some(client_state) = &request.state {
        pairs.push(("state", client_state.clone()));
    }
    pairs.push(("iss", state.issuer.clone()));
    redirect_to(&request.redirect_uri, &pairs)
}

/// The fields of a posted form, after its CSRF token is checked.
async fn posted_form(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Params, Response> {
    let refused = |message: &str| html::error_page(StatusCode::BAD_REQUEST, message);
    let body = body.map_err(|_| refused("The form is too large."))?;
    let form = Params::from_form(headers, &body).map_err(|_| refused("The form is malformed."))?;
    let valid = match (cookie(headers, CSRF_COOKIE), form.get("csrf")) {
        (Some(cookie), Some(token)) => state.secrets.csrf_matches(cookie, token),
        _ => false,
    };
    if !valid {
        return Err(html::error_page(
            StatusCode::FORBIDDEN,
            "The form expired or did not come from this site. Go back to the application and start again.",
        ));
    }
    Ok(form)
}

/// A posted form of the flow: its fields, the authorization request it carries (as its
/// query and validated again).
async fn posted_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Params, String, AuthorizationRequest), Response> {
    let form = posted_form(state, headers, body).await?;
    let query = form.get("request").unwrap_or_default().to_owned();
    let request = AuthorizationRequest::validate(state, &query)
        .await
        .map_err(|refusal| refusal.into_response(&state.issuer))?;
    Ok((form, query, request))
}

/// `POST /login`.
pub(crate) async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (form, query, request) = match posted_request(&state, &headers, body).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let username = form.get("username").unwrap_or_default();
    let password = form.get("password").unwrap_or_default();
    let found = state.users.find_for_login(username).await.ok().flatten();
    let matched = state
        .hashing
        .verify(password, found.as_ref().map(|(_, hash)| hash.as_str()))
        .await;
    let ip = peer.ip().to_string();
    let user = found
        .map(|(user, _)| user)
        .filter(|user| matched && !user.disabled);
    let Some(user) = user else {
        let event = Event {
            subject: Some(username),
            client_id: Some(&request.client.client_id),
            ip: Some(ip),
            detail: Some("wrong username or password".to_owned()),
        };
        state
            .audit
            .record(state.clock.now(), EventKind::LoginFailed, false, event)
            .await;
        let csrf = form.get("csrf").unwrap_or_default();
        return html::login_page(
            StatusCode::UNAUTHORIZED,
            &request.client.name,
            &query,
            csrf,
            username,
            Some("Wrong username or password."),
        );
    };
    let now = state.clock.now();
    let session = state.secrets.generate_secret();
    let ttl = state.config.session_ttl_seconds();
    let stored = sqlx::query(
        "INSERT INTO login_sessions (id_hash, user_id, auth_time, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(sha256(session.as_bytes()))
    .bind(&user.user_id)
    .bind(now)
    .bind(now + ttl)
    .execute(state.db.pool())
    .await;
    if let Err(error) = stored {
        tracing::error!(%error, "login session not stored");
        return html::error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server could not sign you in. Try again later.",
        );
    }
    let event = Event {
        subject: Some(&user.user_id),
        client_id: Some(&request.client.client_id),
        ip: Some(ip),
        detail: None,
    };
    state
        .audit
        .record(now, EventKind::LoginSucceeded, true, event)
        .await;
    let cookie = set_cookie(&state, SESSION_COOKIE, &session, ttl);
    // prompt=login is satisfied now: continue without it, with the new session.
    let response = continue_signed_in(
        &state,
        &headers,
        &query,
        request_without_login_prompt(request),
        &user,
        now,
    )
    .await;
    with_cookie(response, Some(cookie))
}

fn request_without_login_prompt(mut request: AuthorizationRequest) -> AuthorizationRequest {
    if request.prompt == Prompt::Login {
        request.prompt = Prompt::Default;
    }
    request
}

/// `POST /consent`.
pub(crate) async fn consent(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (form, _, mut request) = match posted_request(&state, &headers, body).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let Some((user, auth_time)) = session_user(&state, &headers).await else {
        return html::error_page(
            StatusCode::FORBIDDEN,
            "You are not signed in any more. Go back to the application and start again.",
        );
    };
    if let Err(response) = restrict_to_roles(&state, &mut request, &user).await {
        return response;
    }
    if form.get("decision") != Some("allow") {
        return request
            .refuse("access_denied", "the user did not allow access")
            .into_response(&state.issuer);
    }
    let now = state.clock.now();
    let stored = sqlx::query(
        "INSERT INTO consents (user_id, client_id, scopes, granted_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, client_id) DO UPDATE SET scopes = excluded.scopes, granted_at = excluded.granted_at",
    )
    .bind(&user.user_id)
    .bind(&request.client.client_id)
    .bind(request.scopes.to_string())
    .bind(now)
    .execute(state.db.pool())
    .await;
    if let Err(error) = stored {
        tracing::error!(%error, "consent not stored");
    }
    issue_code(&state, &request, &user, auth_time).await
}

/// RFC 7636 §4.6: BASE64URL(SHA256(verifier)) equals the challenge; the verifier is 43 to
/// 128 unreserved characters.
pub(crate) fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let valid = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let computed = URL_SAFE_NO_PAD.encode(sha256(verifier.as_bytes()));
    valid && bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_follows_rfc_7636() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXj",
            challenge
        ));
        assert!(!pkce_matches("short", challenge));
        assert!(!pkce_matches(&"a".repeat(129), challenge));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; keel_session=abc"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("keel_csrf=def"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, CSRF_COOKIE), Some("def"));
        assert_eq!(cookie(&headers, "missing"), None);
    }
}
