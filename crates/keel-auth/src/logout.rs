//! RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0): an application sends the
//! browser here to end the user's session, then gets it back.
//!
//! With an `id_token_hint` this server issued (expired ones too, as the spec allows) for
//! the signed-in user, the session ends at once; without one, the user confirms on a
//! page first, so that a link alone cannot sign anyone out. `post_logout_redirect_uri`
//! must be one of the client's registered `post_logout_redirect_uris` (or, for a client
//! that registered none, of its redirect URIs), and is honoured only when the client is
//! known from the hint or `client_id`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::Value;

use crate::audit::{Event, EventKind};
use crate::authorize::{
    Purpose, SESSION_COOKIE, clear_cookie, csrf_binding, is_cross_site, our_cookie, session_user,
};
use crate::crypto::sha256;
use crate::html::{self, escape};
use crate::server::AppState;
use crate::token::Params;

/// Where to send the browser afterwards, when the request names a valid place.
async fn return_to(state: &AppState, params: &Params, hint: Option<&Value>) -> Option<String> {
    let uri = params.get("post_logout_redirect_uri")?;
    let client_id = hint
        .and_then(|claims| claims.get("aud"))
        .and_then(Value::as_str)
        .or(params.get("client_id"))?;
    let client = state.clients.find(client_id).await.ok()??;
    let registered = if client.post_logout_redirect_uris.is_empty() {
        &client.redirect_uris
    } else {
        &client.post_logout_redirect_uris
    };
    if !registered.iter().any(|registered| registered == uri) {
        return None;
    }
    let mut target = uri.to_owned();
    if let Some(client_state) = params.get("state") {
        let query = serde_urlencoded::to_string([("state", client_state)]).unwrap_or_default();
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str(&query);
    }
    Some(target)
}

/// `GET`/`POST /logout`.
pub(crate) async fn logout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = match body.ok().filter(|b| !b.is_empty()) {
        Some(body) => Params::from_form(&headers, &body),
        None => Params::from_query(query.as_deref().unwrap_or_default()),
    };
    let Ok(params) = params else {
        return html::error_page(
            StatusCode::BAD_REQUEST,
            "The sign-out request is malformed.",
        );
    };
    let hint = params
        .get("id_token_hint")
        .and_then(|token| state.keys.verify(token, "JWT", state.clock.now()))
        .filter(|claims| claims.get("iss").and_then(Value::as_str) == Some(state.issuer.as_str()));
    let hinted_client = hint
        .as_ref()
        .and_then(|claims| claims.get("aud"))
        .and_then(Value::as_str);
    // RP-Initiated Logout §2: the client named must be the hint's.
    if let (Some(hinted), Some(named)) = (hinted_client, params.get("client_id"))
        && hinted != named
    {
        return html::error_page(
            StatusCode::BAD_REQUEST,
            "The sign-out request names another application than its ID token.",
        );
    }
    if params.get("id_token_hint").is_some() && hint.is_none() {
        return html::error_page(
            StatusCode::BAD_REQUEST,
            "The sign-out request carries an ID token this server did not issue.",
        );
    }
    let session = session_user(&state, &headers).await;
    let session_id = our_cookie(&state, &headers, SESSION_COOKIE)
        .unwrap_or_default()
        .to_owned();
    let confirmed = params.get("confirm").is_some_and(|token| {
        !is_cross_site(&state, &headers)
            && state
                .secrets
                .csrf_matches(&csrf_binding(Purpose::Logout, &session_id, ""), token)
    });
    let hinted_user = hint
        .as_ref()
        .and_then(|claims| claims.get("sub"))
        .and_then(Value::as_str);
    let same_user = match (&session, hinted_user) {
        (Some((user, _)), Some(sub)) => user.user_id == sub,
        _ => false,
    };
    if let Some((user, _)) = &session {
        if !(same_user || confirmed) {
            // Ask first: signing out is a change the user should mean.
            let csrf = state
                .secrets
                .csrf_token(&csrf_binding(Purpose::Logout, &session_id, ""));
            let mut fields = String::new();
            for name in [
                "post_logout_redirect_uri",
                "state",
                "client_id",
                "id_token_hint",
            ] {
                if let Some(value) = params.get(name) {
                    fields.push_str(&format!(
                        "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                        escape(value)
                    ));
                }
            }
            return html::page(
                StatusCode::OK,
                "Sign out",
                &format!(
                    "<h1>Sign out?</h1><p>Signed in as <strong>{}</strong>.</p>\
                     <form method=\"post\" action=\"/logout\">{fields}\
                     <input type=\"hidden\" name=\"confirm\" value=\"{}\">\
                     <button type=\"submit\">Sign out</button></form>",
                    escape(&user.username),
                    escape(&csrf)
                ),
            );
        }
        if let Err(error) = sqlx::query("DELETE FROM login_sessions WHERE id_hash = $1")
            .bind(sha256(session_id.as_bytes()))
            .execute(state.db.pool())
            .await
        {
            tracing::error!(%error, "session not ended");
            return html::error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server could not sign you out. Try again.",
            );
        }
        let event = Event {
            subject: Some(&user.user_id),
            detail: Some("signed out".to_owned()),
            ..Event::default()
        };
        state
            .audit
            .record(state.clock.now(), EventKind::Logout, true, event)
            .await;
    }
    let mut response = match return_to(&state, &params, hint.as_ref()).await {
        Some(target) => Redirect::to(&target).into_response(),
        None => html::page(
            StatusCode::OK,
            "Signed out",
            "<h1>You are signed out</h1><p role=\"status\">You can close this page.</p>",
        ),
    };
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, clear_cookie(&state, SESSION_COOKIE));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
