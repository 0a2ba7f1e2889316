//! Self-service: a signed-in user turns on the TOTP second factor (`/account/totp`), as
//! Keycloak's "Configure OTP": the page shows a new secret (and its `otpauth://` URI for an
//! authenticator app), and the factor is on once the user types a code the app made from
//! it, which proves the app holds it.
//!
//! The page needs a sign-in of the last five minutes. The secret waits in the form, sealed
//! with the key encryption key and bound to the user and the session: nothing is stored
//! until the code is right, a sealed secret from another session or user does not open,
//! and it serves only while the sign-in that showed it is recent (a fresh sign-in is a
//! new session). A user whose factor is on already is told to ask an administrator, who
//! can reset it: replacing it here would let a stolen session swap the user's factor for
//! the thief's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, StatusCode, header};

use crate::audit::{Event, EventKind};
use crate::authorize::{
    Purpose, SESSION_COOKIE, clear_cookie, csrf_binding, is_cross_site, our_cookie, session_user,
    totp_context,
};
use crate::html::{self, escape};
use crate::server::AppState;
use crate::token::Params;
use crate::users::User;

/// How recent the sign-in must be (Keycloak's `max_auth_age` of its "Configure OTP"): a
/// session left open on a shared machine must not let someone else bind their app, which
/// would lock the user out until an administrator resets it.
const MAX_AUTH_AGE: i64 = 5 * 60;

/// `GET /account/totp`: a new secret to enrol.
pub(crate) async fn page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let (user, session) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let mut secret = [0u8; 20];
    state.secrets.fill_random(&mut secret);
    enrolment_page(&state, &user, &session, &secret, None)
}

/// `POST /account/totp`: the code that turns the shown secret on.
pub(crate) async fn enrol(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let forbidden = || {
        html::error_page(
            StatusCode::FORBIDDEN,
            "The form did not come from this site's page. Open the page again.",
        )
    };
    if is_cross_site(&state, &headers) {
        return forbidden();
    }
    let (user, session) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Some(params) = body
        .ok()
        .and_then(|body| Params::from_form(&headers, &body).ok())
    else {
        return html::error_page(StatusCode::BAD_REQUEST, "The form is malformed.");
    };
    let csrf_ok = params.get("csrf").is_some_and(|token| {
        state
            .secrets
            .csrf_matches(&csrf_binding(Purpose::TotpEnrolment, &session, ""), token)
    });
    if !csrf_ok {
        return forbidden();
    }
    let now = state.clock.now();
    let secret = params
        .get("pending")
        .and_then(|pending| URL_SAFE_NO_PAD.decode(pending).ok())
        .and_then(|sealed| {
            state
                .secrets
                .open(pending_context(&user, &session).as_bytes(), &sealed)
                .ok()
        });
    let Some(secret) = secret else {
        return html::error_page(
            StatusCode::BAD_REQUEST,
            "The key was shown to another session. Open the page again.",
        );
    };
    let code = params.get("otp").unwrap_or_default().trim();
    let Some(step) = crate::totp::matching_step(&secret, code, now) else {
        return enrolment_page(
            &state,
            &user,
            &session,
            &secret,
            Some("That code does not match. Type the one your app shows now."),
        );
    };
    let sealed = state
        .secrets
        .seal(totp_context(&user.user_id).as_bytes(), &secret);
    // In one transaction: the factor on unless another enrolment came first, the step
    // of the code just typed spent (it cannot sign in too), and every session and grant
    // of the user ended (from now on each passed the factor).
    match state
        .users
        .enrol_totp(&user.user_id, &sealed, step, now)
        .await
    {
        Ok(true) => {}
        Ok(false) => return already_on(),
        Err(error) => {
            tracing::error!(%error, "second factor not stored");
            return html::error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server could not turn the second factor on. Try again.",
            );
        }
    }
    let event = Event {
        subject: Some(&user.user_id),
        detail: Some("second factor (TOTP) enrolled by the user".to_owned()),
        ..Event::default()
    };
    state
        .audit
        .record(now, EventKind::SecondFactorEnrolled, true, event)
        .await;
    let mut response = html::page(
        StatusCode::OK,
        "Second factor on",
        "<h1>Second factor on</h1><p role=\"status\">From now on, signing in asks for a \
         code from your authenticator app. You were signed out everywhere; sign in again \
         through your application.</p>",
    );
    response
        .headers_mut()
        .append(header::SET_COOKIE, clear_cookie(&state, SESSION_COOKIE));
    response
}

/// The user signed in within [`MAX_AUTH_AGE`] without a second factor, and their
/// session's id; otherwise the page that says why not.
async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<(User, String), Response> {
    let session = our_cookie(state, headers, SESSION_COOKIE).map(str::to_owned);
    let (Some((user, auth_time)), Some(session)) = (session_user(state, headers).await, session)
    else {
        return Err(html::error_page(
            StatusCode::UNAUTHORIZED,
            "You are not signed in. Sign in through an application, then open this page again.",
        ));
    };
    if state.clock.now().saturating_sub(auth_time) > MAX_AUTH_AGE {
        return Err(html::error_page(
            StatusCode::UNAUTHORIZED,
            "You signed in too long ago for this. Sign in again through your application \
             (a fresh sign-in), then open this page within five minutes.",
        ));
    }
    if user.totp {
        return Err(already_on());
    }
    Ok((user, session))
}

fn already_on() -> Response {
    html::error_page(
        StatusCode::CONFLICT,
        "Your second factor is on already. To replace it, ask an administrator to reset it.",
    )
}

/// What a waiting secret is sealed to: this user in this session.
fn pending_context(user: &User, session: &str) -> String {
    format!("totp-enrolment|{}|{session}", user.user_id)
}

fn enrolment_page(
    state: &AppState,
    user: &User,
    session: &str,
    secret: &[u8],
    error: Option<&str>,
) -> Response {
    let pending = URL_SAFE_NO_PAD.encode(
        state
            .secrets
            .seal(pending_context(user, session).as_bytes(), secret),
    );
    let csrf = state
        .secrets
        .csrf_token(&csrf_binding(Purpose::TotpEnrolment, session, ""));
    let base32 = crate::totp::base32(secret);
    let uri = crate::totp::otpauth_uri(&user.username, secret);
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let error = error.map_or_else(String::new, |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))
    });
    html::page(
        status,
        "Second factor",
        &format!(
            "<h1>Turn on a second factor</h1>{error}\
             <p>Signed in as <strong>{username}</strong>. Add this key to an authenticator \
             app (time-based, six digits), then type the code it shows.</p>\
             <p>Key: <code>{base32}</code></p>\
             <p><a href=\"{uri}\">Open in an authenticator app</a></p>\
             <form method=\"post\" action=\"/account/totp\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"pending\" value=\"{pending}\">{field}\
             <button type=\"submit\">Turn on</button></form>",
            username = escape(&user.username),
            base32 = escape(&base32),
            uri = escape(&uri),
            csrf = escape(&csrf),
            pending = escape(&pending),
            field = html::code_field(),
        ),
    )
}
