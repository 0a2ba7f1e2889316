//! Discovery: OpenID Connect Discovery 1.0 and RFC 8414 metadata, and the JWK Set. The
//! metadata lists only what this server does.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use serde_json::{Value, json};

use crate::clients::{AuthMethod, GrantType};
use crate::keys::SigningAlg;
use crate::server::AppState;

/// How long verifiers may cache the key set. Shorter than the lead with which a new key
/// is published before it signs, so that every verifier has it in time.
const JWKS_MAX_AGE: &str = "public, max-age=300";

pub(crate) fn document(issuer: &str) -> Value {
    let algs: Vec<&str> = SigningAlg::ALL.iter().map(|alg| alg.name()).collect();
    let auth_methods: Vec<&str> = AuthMethod::ALL.iter().map(|m| m.name()).collect();
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "device_authorization_endpoint": format!("{issuer}/device_authorization"),
        "end_session_endpoint": format!("{issuer}/logout"),
        "jwks_uri": format!("{issuer}/jwks.json"),
        "grant_types_supported": GrantType::SUPPORTED.iter().map(|g| g.name()).collect::<Vec<_>>(),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "scopes_supported": ["openid", "profile", "email"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "at_hash", "preferred_username", "name", "email"],
        "prompt_values_supported": ["none", "login", "consent"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
        "authorization_response_iss_parameter_supported": true,
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
    })
}

/// `/.well-known/openid-configuration` and `/.well-known/oauth-authorization-server`.
pub(crate) async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    let mut response = Json(document(&state.issuer)).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

/// `/jwks.json`.
pub(crate) async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    let mut response = Json(state.keys.jwks(state.clock.now())).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(JWKS_MAX_AGE),
    );
    response
}
