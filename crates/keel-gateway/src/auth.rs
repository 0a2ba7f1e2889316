//! Per-route authorization with access tokens checked by the shared verifier
//! ([`keel_jwt`]): anonymous, any valid token, required scopes (all of them), required
//! roles (any of them). Verified claims travel upstream in `x-keel-*` headers; copies a
//! client sends are always removed first, on every route, so an upstream can trust them.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue, WWW_AUTHENTICATE};
use keel_jwt::{Principal, Verifier};
use keel_runtime::Problem;
use serde::{Deserialize, Serialize};

use crate::balance::Fnv;
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

/// The `x-keel-*` headers of one verified principal; a claim that makes no valid header
/// value has none.
pub struct ClaimHeaders([(HeaderName, Option<HeaderValue>); 4]);

impl ClaimHeaders {
    fn of(principal: &Principal) -> Self {
        // Claims are signed by the issuer, but a value that is not a valid header value is
        // left out rather than trusted into a broken header.
        let value = |text: String| HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok();
        let join = |values: &std::collections::BTreeSet<String>| {
            value(
                values
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        };
        Self([
            (SUBJECT, value(principal.subject.clone())),
            (CLIENT_ID, principal.client_id.clone().and_then(value)),
            (SCOPES, join(&principal.scopes)),
            (ROLES, join(&principal.roles)),
        ])
    }

    /// The headers, in a fixed order.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.0
            .iter()
            .filter_map(|(name, value)| Some((name, value.as_ref()?)))
    }

    /// The value of the header named `name` (in any case).
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        field(self.fields(), name)
    }
}

/// The value of the field named `name` (in any case) among `fields`.
pub(crate) fn field<'a>(
    mut fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    name: &str,
) -> Option<&'a HeaderValue> {
    fields.find_map(|(field, value)| field.as_str().eq_ignore_ascii_case(name).then_some(value))
}

/// Claim headers made once per principal: keel-jwt hands out the same `Arc<Principal>`
/// for every request carrying the same token, and building four header values for each
/// request was a measurable share of it. Keyed by the principal's address; the entry's
/// `Weak` keeps that allocation (not the principal) alive, so no other principal can take
/// the address while the entry exists.
#[derive(Default)]
pub struct ClaimCache {
    entries: Mutex<ClaimEntries>,
}

type ClaimEntries = HashMap<usize, (Weak<Principal>, Arc<ClaimHeaders>), BuildHasherDefault<Fnv>>;

/// Principals whose claim headers are kept; beyond it, those of dropped principals go, and
/// if none had, all.
const CLAIM_CACHE_SIZE: usize = 4096;

impl ClaimCache {
    fn headers(&self, principal: &Arc<Principal>) -> Arc<ClaimHeaders> {
        let key = Arc::as_ptr(principal) as usize;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, headers)) = entries.get(&key) {
            return Arc::clone(headers);
        }
        if entries.len() >= CLAIM_CACHE_SIZE {
            entries.retain(|_, (principal, _)| principal.strong_count() > 0);
            if entries.len() >= CLAIM_CACHE_SIZE {
                entries.clear();
            }
        }
        let headers = Arc::new(ClaimHeaders::of(principal));
        entries.insert(key, (Arc::downgrade(principal), Arc::clone(&headers)));
        headers
    }
}

/// A request's verified token: the principal (for rate limits) and the claim headers to
/// forward.
pub struct Authorized {
    pub principal: Arc<Principal>,
    pub claims: Arc<ClaimHeaders>,
}

/// Checks the request's bearer token against the route's requirement.
pub async fn authorize(
    config: &RouteAuthConfig,
    verifier: Option<&Verifier>,
    claims: &ClaimCache,
    headers: &HeaderMap,
) -> Result<Option<Authorized>, Response> {
    if config.require == Requirement::Anonymous {
        return Ok(None);
    }
    let Some(verifier) = verifier else {
        return Err(Problem::internal("no token verifier").into_response());
    };
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .map_or(&b""[..], HeaderValue::as_bytes);
    let principal = match verifier.verify_authorization(authorization).await {
        Ok(Some(principal)) => principal,
        // RFC 6750 §3.1: a request without credentials gets no error code.
        Ok(None) => {
            return Err(challenge(
                Problem::unauthorized("this route requires a bearer access token"),
                "Bearer realm=\"keel\"".to_owned(),
            ));
        }
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
    let claims = claims.headers(&principal);
    Ok(Some(Authorized { principal, claims }))
}

fn challenge(problem: Problem, www_authenticate: String) -> Response {
    let mut response = problem.with_source(SOURCE).into_response();
    if let Ok(value) = HeaderValue::from_str(&www_authenticate) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(subject: &str, scopes: &[&str]) -> Arc<Principal> {
        Arc::new(Principal {
            subject: subject.to_owned(),
            client_id: Some("app".to_owned()),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            roles: Default::default(),
            issuer: "https://issuer.test".to_owned(),
            audience: vec!["api".to_owned()],
            expires_at: std::time::SystemTime::now(),
            token_id: None,
            claims: Default::default(),
        })
    }

    #[test]
    fn claim_headers_are_made_once_per_principal() {
        let cache = ClaimCache::default();
        let alice = principal("alice", &["orders:read", "orders:write"]);
        let bob = principal("bob\u{7f}", &[]);
        let fields = |headers: &ClaimHeaders| {
            headers
                .fields()
                .map(|(name, value)| format!("{name}={}", value.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        let first = cache.headers(&alice);
        assert!(Arc::ptr_eq(&first, &cache.headers(&alice)), "made once");
        assert_eq!(
            fields(&first),
            [
                "x-keel-subject=alice",
                "x-keel-client-id=app",
                "x-keel-scopes=orders:read orders:write",
                "x-keel-roles="
            ]
        );
        let other = cache.headers(&bob);
        assert!(!Arc::ptr_eq(&first, &other));
        // An invalid value is left out.
        assert_eq!(
            fields(&other),
            ["x-keel-client-id=app", "x-keel-scopes=", "x-keel-roles="]
        );
        // A principal dropped and another made: never the dropped one's headers.
        drop(bob);
        let carol = principal("carol", &[]);
        assert_eq!(fields(&cache.headers(&carol))[0], "x-keel-subject=carol");
    }
}
