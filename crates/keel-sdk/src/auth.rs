//! Authorization in services: who is calling (the [`Caller`] extractor, from the access
//! token the shared verifier checked), what a handler requires of them (scopes, roles),
//! and the service's own token for its outgoing calls ([`ClientCredentials`]).
//!
//! ```ignore
//! let router = Router::new()
//!     .route("/orders", post(place))
//!     .layer(axum::middleware::from_fn_with_state(verifier, keel_sdk::auth::authenticate));
//!
//! async fn place(caller: Caller, ...) -> Result<..., Denied> {
//!     caller.require_scope("orders:write")?;
//!     // the order belongs to caller.subject()
//! }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use keel_jwt::{Principal, Verifier};
use keel_runtime::{Problem, Secret};
use serde::Deserialize;

/// The verified caller of a request: the token's principal, and the token itself (to pass
/// on when calling another service on the caller's behalf; never printed).
#[derive(Clone)]
pub struct Caller {
    principal: Arc<Principal>,
    token: Arc<str>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("principal", &self.principal)
            .field("token", &keel_runtime::config::REDACTED)
            .finish()
    }
}

impl Caller {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The token's `sub`: the user (or, for client credentials, the client).
    pub fn subject(&self) -> &str {
        &self.principal.subject
    }

    /// The access token as it arrived, for calls made on the caller's behalf.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `Ok` when the token carries `scope`; otherwise a 403 with RFC 6750's
    /// `insufficient_scope`.
    pub fn require_scope(&self, scope: &str) -> Result<(), Denied> {
        if self.principal.has_scope(scope) {
            return Ok(());
        }
        Err(Denied::new(
            Problem::forbidden(format!("the token lacks the scope {scope}")),
            &format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\""),
        ))
    }

    /// `Ok` when the token carries `role` (for this service's audience); otherwise a 403.
    pub fn require_role(&self, role: &str) -> Result<(), Denied> {
        if self.principal.has_role(role) {
            return Ok(());
        }
        Err(Denied::new(
            Problem::forbidden(format!("the caller lacks the role {role}")),
            "Bearer error=\"insufficient_scope\"",
        ))
    }
}

/// A refusal: a problem document with its `WWW-Authenticate` challenge (boxed: it travels
/// in `Result`s).
#[derive(Debug)]
pub struct Denied(Box<(Problem, HeaderValue)>);

impl Denied {
    fn new(problem: Problem, challenge: &str) -> Self {
        let challenge =
            HeaderValue::from_str(challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        Self(Box::new((problem.with_source("auth"), challenge)))
    }

    pub fn status(&self) -> StatusCode {
        self.0.0.status()
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let (problem, challenge) = *self.0;
        let mut response = problem.into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
        response
    }
}

/// Middleware: verifies the request's bearer token, when it has one, with `verifier` and
/// makes the [`Caller`] available to handlers. A request without a token goes on
/// anonymous (handlers that take a `Caller` refuse it); an invalid token is refused here
/// with 401; keys that cannot be fetched give 503.
pub async fn authenticate(
    State(verifier): State<Arc<Verifier>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(authorization) = request.headers().get(header::AUTHORIZATION) else {
        return next.run(request).await;
    };
    let token =
        keel_jwt::bearer_token(authorization.to_str().unwrap_or_default()).map(Arc::<str>::from);
    match verifier
        .verify_authorization(authorization.as_bytes())
        .await
    {
        Ok(Some(principal)) => {
            if let Some(token) = token {
                request.extensions_mut().insert(Caller { principal, token });
            }
            next.run(request).await
        }
        // Another scheme (Basic, say): not ours to judge.
        Ok(None) => next.run(request).await,
        Err(error) if error.is_unavailable() => {
            Problem::unavailable("the authorization server's keys cannot be fetched")
                .with_source("auth")
                .with_retry_after(Duration::from_secs(5))
                .into_response()
        }
        Err(error) => Denied::new(
            Problem::unauthorized("the access token is not valid"),
            &error.www_authenticate(),
        )
        .into_response(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Denied> {
        parts.extensions.get::<Self>().cloned().ok_or_else(|| {
            Denied::new(
                Problem::unauthorized("an access token is required"),
                "Bearer",
            )
        })
    }
}

/// Why the service's own token could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("the token endpoint cannot be reached: {0}")]
    Unreachable(String),
    #[error("the token endpoint refused: {status} {error}")]
    Refused { status: u16, error: String },
    #[error("the token endpoint's answer is not a token response: {0}")]
    Malformed(String),
}

/// The service's own access token, from the OAuth 2.0 client credentials grant: fetched
/// on first use, kept, and fetched again before it expires (when four fifths of its life,
/// or all but a minute, have passed). Concurrent callers share one fetch, and a failed
/// fetch: the callers that waited for it, and those that come within [`FAILURE_KEPT`], get
/// its error rather than each trying in turn (each up to the 10 s timeout).
pub struct ClientCredentials {
    http: reqwest::Client,
    token_endpoint: String,
    client_id: String,
    client_secret: Secret<String>,
    scope: Option<String>,
    state: tokio::sync::Mutex<TokenState>,
}

/// How long a failed fetch is the answer before the next is tried.
pub const FAILURE_KEPT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct TokenState {
    cached: Option<Cached>,
    /// The last fetch's failure, and when it came.
    failed: Option<(Instant, TokenError)>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
}

impl ClientCredentials {
    pub fn new(
        token_endpoint: &str,
        client_id: &str,
        client_secret: Secret<String>,
        scope: Option<&str>,
    ) -> Self {
        Self {
            http: keel_runtime::http_client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            token_endpoint: token_endpoint.to_owned(),
            client_id: client_id.to_owned(),
            client_secret,
            scope: scope.map(str::to_owned),
            state: tokio::sync::Mutex::default(),
        }
    }

    /// A token to send now.
    pub async fn token(&self) -> Result<String, TokenError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(cached) = state.cached.as_ref()
            && now < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        if let Some((at, error)) = &state.failed
            && now < *at + FAILURE_KEPT
        {
            return Err(error.clone());
        }
        match self.fetch().await {
            Ok(fetched) => {
                let token = fetched.token.clone();
                *state = TokenState {
                    cached: Some(fetched),
                    failed: None,
                };
                Ok(token)
            }
            // An early refresh that failed: the kept token still works until it expires;
            // the next try waits a few seconds rather than every caller trying in turn.
            Err(error) => match state.cached.as_mut() {
                Some(kept) if Instant::now() < kept.expires_at => {
                    tracing::warn!(%error, "token refresh failed; using the current token");
                    kept.refresh_at =
                        (Instant::now() + Duration::from_secs(5)).min(kept.expires_at);
                    Ok(kept.token.clone())
                }
                _ => {
                    state.failed = Some((Instant::now(), error.clone()));
                    Err(error)
                }
            },
        }
    }

    /// Forgets the kept token, and a failure (after a 401 from a service, say).
    pub async fn forget(&self) {
        *self.state.lock().await = TokenState::default();
    }

    async fn fetch(&self) -> Result<Cached, TokenError> {
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope));
        }
        // Made before the request: the serializer is not `Send`, and held across the
        // await it made `token()` a future no spawned task could run.
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish();
        let asked = Instant::now();
        let response = self
            .http
            .post(&self.token_endpoint)
            .basic_auth(
                form_urlencode(&self.client_id),
                Some(form_urlencode(self.client_secret.expose())),
            )
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|error| TokenError::Unreachable(error.to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|error| TokenError::Unreachable(error.to_string()))?;
        if !status.is_success() {
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(TokenError::Refused {
                status: status.as_u16(),
                error,
            });
        }
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|error| TokenError::Malformed(error.to_string()))?;
        if !answer.token_type.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::Malformed(format!(
                "token_type {:?}",
                answer.token_type
            )));
        }
        // Bounded: a huge lifetime would overflow; a token is kept a day at most, and
        // never past its own expiry (a zero lifetime is simply not kept).
        let life = Duration::from_secs(answer.expires_in.unwrap_or(60).min(86_400));
        let early = (life / 5).min(Duration::from_secs(60));
        Ok(Cached {
            token: answer.access_token,
            refresh_at: asked + life.saturating_sub(early),
            expires_at: asked + life,
        })
    }
}

/// RFC 6749 §2.3.1: client credentials in Basic authentication are form-urlencoded first.
fn form_urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_urlencoded() {
        assert_eq!(form_urlencode("orders"), "orders");
        assert_eq!(form_urlencode("a b:c/d%"), "a+b%3Ac%2Fd%25");
    }
}
