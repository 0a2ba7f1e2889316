//! The authorization endpoint (RFC 6749 §4.1, OpenID Connect Core §3.1.2) and the pages
//! behind it: sign-in and consent.
//!
//! The authorization request travels through the forms as its original query string and
//! is validated again on every step, so nothing a form posts can widen it. Errors about
//! the client or the redirect URI are shown on a page and never redirected (RFC 6749
//! §4.1.2.1); every other error goes back to the client's redirect URI with `state` and
//! `iss` (RFC 9207).

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
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
use crate::server::{AppState, ClientAddr};
use crate::token::Params;
use crate::users::User;

/// The cookie of a signed-in browser (a random id; the server keeps its hash).
pub(crate) const SESSION_COOKIE: &str = "keel_session";
/// The cookie the sign-in form's CSRF token is bound to.
pub(crate) const CSRF_COOKIE: &str = "keel_csrf";
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
    /// Seconds since sign-in beyond which the user signs in again.
    pub(crate) max_age: Option<i64>,
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
    /// `prompt=login consent`: both.
    LoginAndConsent,
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

/// The non-empty values of parameter `name` (an empty one counts as absent, RFC 6749 §3.1).
fn values_of<'a>(pairs: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a String> {
    pairs
        .iter()
        .filter(move |(n, v)| n == name && !v.is_empty())
        .map(|(_, v)| v)
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
        let get = |name: &str| values_of(&pairs, name).next().cloned();
        let Some(client_id) = get("client_id") else {
            return Err(page("The request names no client (client_id)."));
        };
        // Checked whatever else repeats first: where the browser would be sent is
        // ambiguous, so the refusal is a page, never a redirect (RFC 6749 §4.1.2.1).
        let twice = |name: &str| values_of(&pairs, name).nth(1).is_some();
        if twice("client_id") || twice("redirect_uri") {
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
        let asks_openid = get("scope").is_some_and(|scope| scope.split(' ').any(|s| s == "openid"));
        let redirect_uri = match (&given, client.redirect_uris.as_slice()) {
            (Some(uri), registered) if registered.iter().any(|r| r == uri) => uri.clone(),
            (Some(_), _) => {
                return Err(page(
                    "The redirect URI is not registered for this application.",
                ));
            }
            // OAuth lets a client with one registered URI leave it out (RFC 6749
            // §3.1.2.3); an OpenID Connect request must name it (OIDC Core §3.1.2.1).
            (None, [only]) if !asks_openid => only.clone(),
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
        // Space-separated values (OIDC Core §3.1.2.1); none stands alone.
        let prompts: Vec<String> = get("prompt")
            .map(|p| p.split(' ').map(str::to_owned).collect())
            .unwrap_or_default();
        let prompt = match prompts
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [] => Prompt::Default,
            ["none"] => Prompt::None,
            values if values.iter().all(|v| matches!(*v, "login" | "consent")) => {
                match (values.contains(&"login"), values.contains(&"consent")) {
                    (true, true) => Prompt::LoginAndConsent,
                    (true, false) => Prompt::Login,
                    _ => Prompt::Consent,
                }
            }
            _ => {
                return Err(refuse(
                    ErrorCode::InvalidRequest,
                    "prompt must be none, or login and/or consent",
                ));
            }
        };
        let max_age = match get("max_age") {
            None => None,
            Some(age) => Some(age.parse::<u32>().map(i64::from).map_err(|_| {
                refuse(
                    ErrorCode::InvalidRequest,
                    "max_age must be a number of seconds",
                )
            })?),
        };
        if get("response_mode").is_some_and(|mode| mode != "query") {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                "only response_mode=query is supported",
            ));
        }
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
            max_age,
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

/// A cookie's name: with an https issuer, `__Host-` prefixed, so that no sibling domain
/// or plain-http page can set or shadow it (RFC 6265bis §4.1.3.2).
fn cookie_name(state: &AppState, name: &str) -> String {
    if state.issuer.starts_with("https://") {
        format!("__Host-{name}")
    } else {
        name.to_owned()
    }
}

/// The value of this server's cookie `name`.
pub(crate) fn our_cookie<'a>(
    state: &AppState,
    headers: &'a HeaderMap,
    name: &str,
) -> Option<&'a str> {
    cookie(headers, &cookie_name(state, name))
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age: i64) -> HeaderValue {
    let secure = if state.issuer.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    // SameSite=Lax: sent on the top-level navigation from the client back to /authorize.
    let cookie = format!(
        "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
        cookie_name(state, name)
    );
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A `Set-Cookie` that removes this server's cookie `name`.
pub(crate) fn clear_cookie(state: &AppState, name: &str) -> HeaderValue {
    set_cookie(state, name, "", 0)
}

/// What a form's CSRF token is an HMAC of: the form's purpose, the browser secret it is
/// bound to (the CSRF cookie before sign-in, the session after), and the authorization
/// request it carries, so that a token serves one form of one request in one browser.
pub(crate) fn csrf_binding(purpose: Purpose, secret: &str, query: &str) -> String {
    let purpose = match purpose {
        Purpose::Login => "login",
        Purpose::Consent => "consent",
        Purpose::DeviceLogin => "device-login",
        Purpose::DeviceApproval => "device-approval",
        Purpose::Logout => "logout",
        Purpose::TotpEnrolment => "totp-enrolment",
    };
    format!("{purpose}|{secret}|{query}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Login,
    Consent,
    /// The device page's sign-in form.
    DeviceLogin,
    /// The device page's approval form.
    DeviceApproval,
    /// The sign-out confirmation.
    Logout,
    /// The second factor's enrolment (`/account/totp`).
    TotpEnrolment,
}

/// The user signed in on this browser, and when they signed in.
pub(crate) async fn session_user(state: &AppState, headers: &HeaderMap) -> Option<(User, i64)> {
    let id = our_cookie(state, headers, SESSION_COOKIE)?;
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
pub(crate) fn csrf_cookie(state: &AppState, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match our_cookie(state, headers, CSRF_COOKIE) {
        Some(value) => (value.to_owned(), None),
        None => {
            let value = state.secrets.generate_id();
            let header = set_cookie(state, CSRF_COOKIE, &value, 24 * 3600);
            (value, Some(header))
        }
    }
}

pub(crate) fn with_cookie(mut response: Response, cookie: Option<HeaderValue>) -> Response {
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
        Prompt::Login | Prompt::LoginAndConsent => None,
        _ => session_user(&state, &headers).await,
    };
    // max_age (OIDC Core §3.1.2.1): an older sign-in must be repeated.
    let session = session.filter(|(_, auth_time)| {
        request
            .max_age
            .is_none_or(|max_age| state.clock.now() - auth_time <= max_age)
    });
    let session_id = our_cookie(&state, &headers, SESSION_COOKIE).unwrap_or_default();
    let Some((user, auth_time)) = session else {
        if request.prompt == Prompt::None {
            return request
                .refuse("login_required", "the user is not signed in")
                .into_response(&state.issuer);
        }
        let (csrf_cookie, new_cookie) = csrf_cookie(&state, &headers);
        let csrf = state
            .secrets
            .csrf_token(&csrf_binding(Purpose::Login, &csrf_cookie, &query));
        let page = html::login_page(
            StatusCode::OK,
            &request.client.name,
            &query,
            &csrf,
            "",
            None,
            false,
        );
        return with_cookie(page, new_cookie);
    };
    continue_signed_in(&state, session_id, &query, request, &user, auth_time).await
}

/// The flow once the user is known: consent if needed, then the code.
async fn continue_signed_in(
    state: &AppState,
    session: &str,
    query: &str,
    mut request: AuthorizationRequest,
    user: &User,
    auth_time: i64,
) -> Response {
    if let Err(response) = restrict_to_roles(state, &mut request, user).await {
        return response;
    }
    let consented = match request.prompt {
        Prompt::Consent | Prompt::LoginAndConsent => false,
        _ => has_consent(state, &user.user_id, &request).await,
    };
    if !consented {
        if request.prompt == Prompt::None {
            return request
                .refuse("consent_required", "the user has not allowed this client")
                .into_response(&state.issuer);
        }
        let csrf = state
            .secrets
            .csrf_token(&csrf_binding(Purpose::Consent, session, query));
        let scopes: Vec<&str> = request.scopes.iter().collect();
        return html::consent_page(&request.client.name, &user.username, &scopes, query, &csrf);
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
        Ok(holdings) => {
            state
                .rbac
                .permitted(
                    &request.scopes,
                    &holdings,
                    &state.audiences(&request.client),
                )
                .await
        }
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
    let family = state.secrets.generate_id();
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
    .bind(&family)
    .execute(state.db.pool())
    .await;
    // The grant exists from the code on, so that a replay of the code can revoke it even
    // while the first exchange is still running.
    let stored = match stored {
        Ok(_) => sqlx::query(
            "INSERT INTO token_families (family_id, client_id, user_id, scopes, auth_time, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&family)
        .bind(&request.client.client_id)
        .bind(&user.user_id)
        .bind(request.scopes.to_string())
        .bind(auth_time)
        .bind(now)
        .execute(state.db.pool())
        .await,
        Err(error) => Err(error),
    };
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

/// Whether a post comes from another site (`Origin` other than the issuer, or
/// `Sec-Fetch-Site` cross-site); such posts to the sign-in pages are refused.
pub(crate) fn is_cross_site(state: &AppState, headers: &HeaderMap) -> bool {
    headers
        .get(header::ORIGIN)
        .is_some_and(|origin| origin.as_bytes() != state.issuer.as_bytes())
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| site != "same-origin" && site != "none")
}

/// A posted form of the flow, checked: it comes from this site (`Origin`,
/// `Sec-Fetch-Site`), and its CSRF token was made for this form, this browser and the
/// authorization request it carries, which is validated again. Returns the fields, the
/// request's query, the request, and the browser secret the token was bound to.
async fn posted_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    purpose: Purpose,
) -> Result<(Params, String, AuthorizationRequest, String), Response> {
    let refused = |message: &str| html::error_page(StatusCode::BAD_REQUEST, message);
    let forbidden = || {
        html::error_page(
            StatusCode::FORBIDDEN,
            "The form expired or did not come from this site. Go back to the application and start again.",
        )
    };
    if is_cross_site(state, headers) {
        return Err(forbidden());
    }
    let body = body.map_err(|_| refused("The form is too large."))?;
    let form = Params::from_form(headers, &body).map_err(|_| refused("The form is malformed."))?;
    let query = form.get("request").unwrap_or_default().to_owned();
    let secret = match purpose {
        Purpose::Login | Purpose::DeviceLogin => our_cookie(state, headers, CSRF_COOKIE),
        Purpose::Consent | Purpose::DeviceApproval | Purpose::Logout | Purpose::TotpEnrolment => {
            our_cookie(state, headers, SESSION_COOKIE)
        }
    };
    let valid = match (secret, form.get("csrf")) {
        (Some(secret), Some(token)) => state
            .secrets
            .csrf_matches(&csrf_binding(purpose, secret, &query), token),
        _ => false,
    };
    if !valid {
        return Err(forbidden());
    }
    let secret = secret.unwrap_or_default().to_owned();
    let request = AuthorizationRequest::validate(state, &query)
        .await
        .map_err(|refusal| refusal.into_response(&state.issuer))?;
    Ok((form, query, request, secret))
}

/// `POST /login`.
pub(crate) async fn login(
    State(state): State<Arc<AppState>>,
    ClientAddr(peer): ClientAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (form, query, request, _) =
        match posted_request(&state, &headers, body, Purpose::Login).await {
            Ok(posted) => posted,
            Err(response) => return response,
        };
    let username = form.get("username").unwrap_or_default();
    let password = form.get("password").unwrap_or_default();
    let csrf = form.get("csrf").unwrap_or_default();
    let signed_in = sign_in(
        &state,
        peer,
        username,
        password,
        form.get("otp"),
        Some(&request.client.client_id),
    )
    .await;
    let SignedIn {
        user,
        session,
        cookie,
        at: now,
    } = match signed_in {
        Ok(signed_in) => signed_in,
        Err(refusal) => {
            return html::login_page(
                refusal.status,
                &request.client.name,
                &query,
                csrf,
                username,
                Some(&refusal.message),
                refusal.ask_code,
            );
        }
    };
    // prompt=login is satisfied now: continue without it, with the new session.
    let response = continue_signed_in(
        &state,
        &session,
        &query,
        request_without_login_prompt(request),
        &user,
        now,
    )
    .await;
    with_cookie(response, Some(cookie))
}

/// Why a sign-in failed: the status and message the page shows, and whether it should
/// ask for the second factor's code.
pub(crate) struct SignInRefusal {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) ask_code: bool,
}

impl SignInRefusal {
    fn new(status: StatusCode, message: &str) -> Self {
        Self {
            status,
            message: message.to_owned(),
            ask_code: false,
        }
    }
}

/// Whether `code` is `user`'s current TOTP code, not used before.
async fn second_factor(state: &AppState, user: &User, code: &str, now: i64) -> bool {
    let Ok(Some(sealed)) = state.users.totp_secret(&user.user_id).await else {
        return false;
    };
    let Ok(secret) = state
        .secrets
        .open(totp_context(&user.user_id).as_bytes(), &sealed)
    else {
        tracing::error!(user_id = %user.user_id, "TOTP secret does not open");
        return false;
    };
    match crate::totp::matching_step(&secret, code, now) {
        Some(step) => state
            .users
            .use_totp_step(&user.user_id, step)
            .await
            .unwrap_or(false),
        None => false,
    }
}

/// What a user's sealed TOTP secret is bound to.
pub(crate) fn totp_context(user_id: &str) -> String {
    format!("totp|{user_id}")
}

/// A user who just signed in, their new session (its secret and the cookie that sets it)
/// and when.
pub(crate) struct SignedIn {
    pub(crate) user: User,
    pub(crate) session: String,
    pub(crate) cookie: HeaderValue,
    pub(crate) at: i64,
}

/// Checks a username and password with the brute-force rules (per address, per
/// account), records the outcome, and starts a session. A refusal is the status and the
/// message the sign-in page shows.
pub(crate) async fn sign_in(
    state: &AppState,
    ip: IpAddr,
    username: &str,
    password: &str,
    otp: Option<&str>,
    client_id: Option<&str>,
) -> Result<SignedIn, SignInRefusal> {
    let now = state.clock.now();
    let failed = |detail: &str| Event {
        subject: Some(username),
        client_id,
        ip: Some(ip.to_string()),
        actor: None,
        detail: Some(detail.to_owned()),
    };
    if state.address_failures.blocked(ip, now) {
        let event = failed("too many failures from this address");
        state
            .audit
            .record(now, EventKind::LoginFailed, false, event)
            .await;
        return Err(SignInRefusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed sign-ins from your network. Try again later.",
        ));
    }
    let found = state.users.find_for_login(username).await.ok().flatten();
    if found
        .as_ref()
        .and_then(|(user, _)| user.locked_until)
        .is_some_and(|until| until > now)
    {
        // Answered as a wrong password is, after as long (a hash checked), as Keycloak's
        // brute-force protection does: an answer of its own would tell that the username
        // exists (an unknown one is never locked). The audit trail says why.
        let _ = state.hashing.verify(password, None).await;
        let event = failed("account locked");
        state
            .audit
            .record(now, EventKind::LoginFailed, false, event)
            .await;
        return Err(wrong_credentials());
    }
    let matched = state
        .hashing
        .verify(password, found.as_ref().map(|(_, hash)| hash.as_str()))
        .await;
    let found_id = found.as_ref().map(|(user, _)| user.user_id.clone());
    let user = found
        .map(|(user, _)| user)
        .filter(|user| matched && !user.disabled);
    // The second factor, for users who enabled it: the password alone asks for the code
    // (no failure counted); a wrong or reused code counts as a failed sign-in.
    let (user, second_factor_failed) = match user {
        Some(user) if user.totp => match otp.filter(|code| !code.is_empty()) {
            None => {
                return Err(SignInRefusal {
                    status: StatusCode::UNAUTHORIZED,
                    message: "Enter the 6-digit code from your authenticator app.".to_owned(),
                    ask_code: true,
                });
            }
            Some(code) => {
                let accepted = second_factor(state, &user, code, now).await;
                if accepted {
                    (Some(user), false)
                } else {
                    (None, true)
                }
            }
        },
        other => (other, false),
    };
    let Some(user) = user else {
        state.address_failures.record(ip, now);
        let locked = match found_id {
            Some(user_id) => state
                .users
                .record_failure(&user_id, now, &state.config.lockout.policy())
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let event = failed("wrong username or password");
        state
            .audit
            .record(now, EventKind::LoginFailed, false, event)
            .await;
        return Err(match (locked, second_factor_failed) {
            // The password was right: telling this user of the lock tells nothing more.
            (Some(until), true) => {
                SignInRefusal::new(StatusCode::FORBIDDEN, &locked_message(until - now))
            }
            (None, true) => SignInRefusal {
                status: StatusCode::UNAUTHORIZED,
                message: "Wrong or already used code. Enter the current one.".to_owned(),
                ask_code: true,
            },
            (_, false) => wrong_credentials(),
        });
    };
    if let Err(error) = state.users.record_success(&user.user_id).await {
        tracing::warn!(%error, "failed sign-ins not reset");
    }
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
        return Err(SignInRefusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server could not sign you in. Try again later.",
        ));
    }
    let event = Event {
        subject: Some(&user.user_id),
        client_id,
        ip: Some(ip.to_string()),
        actor: None,
        detail: None,
    };
    state
        .audit
        .record(now, EventKind::LoginSucceeded, true, event)
        .await;
    let cookie = set_cookie(state, SESSION_COOKIE, &session, ttl);
    Ok(SignedIn {
        user,
        session,
        cookie,
        at: now,
    })
}

/// A wrong username or password, or a locked account: one answer for all three.
fn wrong_credentials() -> SignInRefusal {
    SignInRefusal::new(StatusCode::UNAUTHORIZED, "Wrong username or password.")
}

/// What a locked account's sign-in page says.
fn locked_message(seconds: i64) -> String {
    let minutes = (seconds + 59) / 60;
    format!(
        "This account is locked after too many failed sign-ins. Try again in {minutes} minute{}.",
        if minutes == 1 { "" } else { "s" }
    )
}

/// The request once the user has just signed in: `prompt=login` and `max_age` are met.
fn request_without_login_prompt(mut request: AuthorizationRequest) -> AuthorizationRequest {
    request.prompt = match request.prompt {
        Prompt::Login => Prompt::Default,
        Prompt::LoginAndConsent => Prompt::Consent,
        other => other,
    };
    request.max_age = None;
    request
}

/// `POST /consent`.
pub(crate) async fn consent(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (form, _, mut request, _) =
        match posted_request(&state, &headers, body, Purpose::Consent).await {
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
    // What the user allowed before stays allowed: the stored scopes grow.
    let earlier: Option<String> =
        sqlx::query_scalar("SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2")
            .bind(&user.user_id)
            .bind(&request.client.client_id)
            .fetch_optional(state.db.pool())
            .await
            .ok()
            .flatten();
    let allowed: Scopes = earlier
        .as_deref()
        .and_then(|earlier| Scopes::parse(earlier).ok())
        .unwrap_or_default()
        .iter()
        .chain(request.scopes.iter())
        .collect();
    let stored = sqlx::query(
        "INSERT INTO consents (user_id, client_id, scopes, granted_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, client_id) DO UPDATE SET scopes = excluded.scopes, granted_at = excluded.granted_at",
    )
    .bind(&user.user_id)
    .bind(&request.client.client_id)
    .bind(allowed.to_string())
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
