//! Per-route authorization with access tokens checked by the shared verifier
//! ([`keel_jwt`]): anonymous, any valid token, required scopes (all of them), required
//! roles (any of them). Verified claims travel upstream in `x-keel-*` headers; copies a
//! client sends are always removed first, on every route, so an upstream can trust them.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue, WWW_AUTHENTICATE};
use keel_jwt::{Principal, Verifier};
use keel_runtime::Problem;
use serde::{Deserialize, Serialize};

use crate::proxy::SOURCE;

pub const SUBJECT: HeaderName = HeaderName::from_static("x-keel-subject");
pub const CLIENT_ID: HeaderName = HeaderName::from_static("x-keel-client-id");
pub const SCOPES: HeaderName = HeaderName::from_static("x-keel-scopes");
pub const ROLES: HeaderName = HeaderName::from_static("x-keel-roles");

/// `auth = { require = "authenticated", scopes = […], roles = […] }` of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteAuthConfig {
    pub require: Requirement,
    /// Scopes the token must all carry.
    pub scopes: Vec<String>,
    /// Roles of which the token must carry at least one.
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requirement {
    #[default]
    Anonymous,
    Authenticated,
}

impl RouteAuthConfig {
    pub fn validate(&self, verifier_configured: bool) -> Result<(), String> {
        let needs_token = self.require == Requirement::Authenticated
            || !self.scopes.is_empty()
            || !self.roles.is_empty();
        if needs_token && self.require == Requirement::Anonymous {
            return Err("auth: scopes and roles need require = \"authenticated\"".into());
        }
        if needs_token && !verifier_configured {
            return Err(
                "auth: the route requires tokens but [gateway.auth] (issuer, audiences) is not set"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Removes client-supplied claim headers.
pub fn strip_claim_headers(headers: &mut HeaderMap) {
    const CLAIMS: [HeaderName; 4] = [SUBJECT, CLIENT_ID, SCOPES, ROLES];
    // A scan of the names present is cheaper than four removals that find nothing.
    if headers.keys().any(|name| CLAIMS.contains(name)) {
        for name in CLAIMS {
            headers.remove(name);
        }
    }
}

/// Checks the request's bearer token against the route's requirement; on success the
/// claims are written into the forwarded headers. Returns the principal for rate limits.
pub async fn authorize(
    config: &RouteAuthConfig,
    verifier: Option<&Verifier>,
    headers: &mut HeaderMap,
) -> Result<Option<Arc<Principal>>, Response> {
    if config.require == Requirement::Anonymous {
        return Ok(None);
    }
    let Some(verifier) = verifier else {
        return Err(Problem::internal("no token verifier").into_response());
    };
    // UTF-8 rather than `to_str`'s byte-by-byte check: tokens are long, and the header
    // was validated when it was parsed.
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(keel_jwt::bearer_token);
    let Some(token) = token else {
        // RFC 6750 §3.1: a request without credentials gets no error code.
        return Err(challenge(
            Problem::unauthorized("this route requires a bearer access token"),
            "Bearer realm=\"keel\"".to_owned(),
        ));
    };
    let principal = match verifier.verify(token).await {
        Ok(principal) => principal,
        Err(error) if error.is_unavailable() => {
            tracing::warn!(%error, "access tokens cannot be checked: signing keys unavailable");
            return Err(
                Problem::unavailable("access tokens cannot be checked right now")
                    .with_retry_after(std::time::Duration::from_secs(5))
                    .with_source(SOURCE)
                    .into_response(),
            );
        }
        Err(error) => {
            let header = error.www_authenticate();
            let params = header.strip_prefix("Bearer ").unwrap_or(&header);
            return Err(challenge(
                Problem::unauthorized(error.description()),
                format!("Bearer realm=\"keel\", {params}"),
            ));
        }
    };
    let scopes: Vec<&str> = config.scopes.iter().map(String::as_str).collect();
    if !principal.has_all_scopes(&scopes) {
        return Err(challenge(
            Problem::forbidden(format!(
                "this route requires the scopes {:?}",
                config.scopes
            )),
            format!(
                "Bearer realm=\"keel\", error=\"insufficient_scope\", scope=\"{}\"",
                config.scopes.join(" ")
            ),
        ));
    }
    let roles: Vec<&str> = config.roles.iter().map(String::as_str).collect();
    if !roles.is_empty() && !principal.has_any_role(&roles) {
        return Err(Problem::forbidden(format!(
            "this route requires one of the roles {:?}",
            config.roles
        ))
        .with_source(SOURCE)
        .into_response());
    }
    forward_claims(&principal, headers);
    Ok(Some(principal))
}

fn forward_claims(principal: &Principal, headers: &mut HeaderMap) {
    // One allocation per header: joined lists go into the value without another copy.
    let join = |values: &std::collections::BTreeSet<String>| {
        let mut joined = String::with_capacity(values.iter().map(|v| v.len() + 1).sum());
        for value in values {
            if !joined.is_empty() {
                joined.push(' ');
            }
            joined.push_str(value);
        }
        bytes::Bytes::from(joined)
    };
    let mut put = |name: HeaderName, value: bytes::Bytes| {
        // Claims are signed by the issuer, but a value that is not a valid header value is
        // left out rather than trusted into a broken header.
        if let Ok(value) = HeaderValue::from_maybe_shared(value) {
            headers.insert(name, value);
        }
    };
    put(
        SUBJECT,
        bytes::Bytes::copy_from_slice(principal.subject.as_bytes()),
    );
    if let Some(client_id) = &principal.client_id {
        put(
            CLIENT_ID,
            bytes::Bytes::copy_from_slice(client_id.as_bytes()),
        );
    }
    put(SCOPES, join(&principal.scopes));
    put(ROLES, join(&principal.roles));
}

fn challenge(problem: Problem, www_authenticate: String) -> Response {
    let mut response = problem.with_source(SOURCE).into_response();
    if let Ok(value) = HeaderValue::from_str(&www_authenticate) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
}
