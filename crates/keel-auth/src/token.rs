//! The token endpoint (RFC 6749 §3.2): the form, client authentication (§2.3), and the
//! grants.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderValue, header};
use serde_json::{Value, json};

use crate::audit::{Event, EventKind};
use crate::clients::{AuthMethod, Client, GrantType};
use crate::error::{ErrorCode, OAuthError};
use crate::scope::Scopes;
use crate::server::AppState;

/// A token request's parameters. RFC 6749 §3.2: form-encoded, each parameter at most
/// once, and a parameter without a value is as if it were absent.
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn from_form(headers: &HeaderMap, body: &[u8]) -> Result<Self, OAuthError> {
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(OAuthError::invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|_| OAuthError::invalid_request("the form body is malformed"))?;
        let mut params = HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if value.is_empty() {
                continue;
            }
            if params.contains_key(&name) {
                return Err(OAuthError::invalid_request(format!(
                    "parameter {name} is given more than once"
                )));
            }
            params.insert(name, value);
        }
        Ok(Self(params))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("parameter {name} is missing")))
    }
}

/// How a client presented itself.
enum Presented {
    Basic {
        id: String,
        secret: String,
    },
    Post {
        id: String,
        secret: String,
    },
    /// A public client: its id, no secret.
    Public {
        id: String,
    },
}

impl Presented {
    fn id(&self) -> &str {
        match self {
            Self::Basic { id, .. } | Self::Post { id, .. } | Self::Public { id } => id,
        }
    }

    fn method(&self) -> AuthMethod {
        match self {
            Self::Basic { .. } => AuthMethod::ClientSecretBasic,
            Self::Post { .. } => AuthMethod::ClientSecretPost,
            Self::Public { .. } => AuthMethod::None,
        }
    }
}

/// RFC 6749 §2.3.1: `Basic base64(urlencode(id) ":" urlencode(secret))`.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = std::str::from_utf8(&decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    // Each half is form-encoded; decode it as one form value.
    let decode = |part: &str| -> Option<String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("v={part}")).ok()?;
        pairs.into_iter().next().map(|(_, v)| v)
    };
    let id = decode(id)?;
    (!id.is_empty()).then_some(())?;
    Some((id, decode(secret)?))
}

fn presented(headers: &HeaderMap, params: &Params) -> Result<Presented, OAuthError> {
    let body_id = params.get("client_id");
    let body_secret = params.get("client_secret");
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let (id, secret) = basic_credentials(value)
            .ok_or_else(|| OAuthError::invalid_client("malformed Basic client credentials"))?;
        if body_secret.is_some() {
            return Err(OAuthError::invalid_request(
                "use one client authentication method, not Basic and client_secret both",
            ));
        }
        if body_id.is_some_and(|body_id| body_id != id) {
            return Err(OAuthError::invalid_request(
                "client_id differs from the Basic credentials",
            ));
        }
        return Ok(Presented::Basic { id, secret });
    }
    match (body_id, body_secret) {
        (Some(id), Some(secret)) => Ok(Presented::Post {
            id: id.to_owned(),
            secret: secret.to_owned(),
        }),
        (Some(id), None) => Ok(Presented::Public { id: id.to_owned() }),
        (None, _) => Err(OAuthError::invalid_client("no client authentication")),
    }
}

/// The client the request comes from, authenticated as it was registered.
async fn authenticate(
    state: &AppState,
    presented: &Presented,
    ip: &str,
) -> Result<Client, OAuthError> {
    let client = state.clients.find(presented.id()).await.map_err(|error| {
        tracing::error!(%error, "client lookup failed");
        OAuthError::server_error()
    })?;
    let refused = match (&client, presented) {
        (None, _) => {
            // Same work as for a known client, so timing does not tell which ids exist.
            let _ = state.secrets.hash_secret(presented.id());
            Some("unknown client")
        }
        (Some(client), _) if client.disabled => Some("disabled client"),
        (Some(client), _) if client.auth_method != presented.method() => {
            Some("authentication method not registered for this client")
        }
        (Some(client), Presented::Basic { secret, .. } | Presented::Post { secret, .. }) => {
            (!client.secret_matches(&state.secrets, secret)).then_some("wrong secret")
        }
        (Some(_), Presented::Public { .. }) => None,
    };
    match (refused, client) {
        (None, Some(client)) => Ok(client),
        (reason, _) => {
            let reason = reason.unwrap_or("unknown client");
            state
                .audit
                .record(
                    state.clock.now(),
                    EventKind::ClientAuthFailed,
                    false,
                    Event {
                        client_id: Some(presented.id()),
                        ip: Some(ip.to_owned()),
                        detail: Some(format!("{}: {reason}", presented.method().name())),
                        ..Event::default()
                    },
                )
                .await;
            // One answer whatever the reason, so it does not tell which ids exist.
            Err(OAuthError::invalid_client("client authentication failed"))
        }
    }
}

/// `POST /token`.
pub(crate) async fn token(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return OAuthError::invalid_request("the body is too large or could not be read")
            .into_response();
    };
    match handle(&state, &headers, &body, &peer.ip().to_string()).await {
        Ok(body) => {
            let mut response = Json(body).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            response
        }
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    ip: &str,
) -> Result<Value, OAuthError> {
    let params = Params::from_form(headers, body)?;
    let grant_type = params.require("grant_type")?;
    let grant = GrantType::from_name(grant_type)
        .filter(|grant| GrantType::SUPPORTED.contains(grant))
        .ok_or_else(|| {
            OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                format!("grant_type {grant_type:?} is not supported"),
            )
        })?;
    let presented = presented(headers, &params)?;
    let client = authenticate(state, &presented, ip).await?;
    if !client.may_use(grant) {
        return Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            format!("this client may not use {}", grant.name()),
        ));
    }
    match grant {
        GrantType::ClientCredentials => client_credentials(state, &client, &params, ip).await,
        // Not in GrantType::SUPPORTED yet: refused above.
        GrantType::AuthorizationCode | GrantType::RefreshToken | GrantType::DeviceCode => Err(
            OAuthError::new(ErrorCode::UnsupportedGrantType, "grant not supported"),
        ),
    }
}

/// RFC 6749 §4.4: a client acting for itself.
async fn client_credentials(
    state: &AppState,
    client: &Client,
    params: &Params,
    ip: &str,
) -> Result<Value, OAuthError> {
    if client.auth_method == AuthMethod::None {
        return Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            "a public client cannot use client_credentials",
        ));
    }
    let scopes = granted_scopes(client, params.get("scope"))?;
    let issued = state.issue_access_token(client, &client.client_id, &scopes)?;
    state
        .audit
        .record(
            issued.issued_at,
            EventKind::TokenIssued,
            true,
            Event {
                subject: Some(&client.client_id),
                client_id: Some(&client.client_id),
                ip: Some(ip.to_owned()),
                detail: Some(format!("client_credentials, scope {scopes}")),
            },
        )
        .await;
    let mut body = json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    });
    if !scopes.is_empty() {
        body["scope"] = json!(scopes.to_string());
    }
    Ok(body)
}

/// The scopes a request gets: those asked for, each of which the client must be allowed
/// (RFC 6749 §3.3); all the client's scopes when none are asked for.
fn granted_scopes(client: &Client, asked: Option<&str>) -> Result<Scopes, OAuthError> {
    let Some(asked) = asked else {
        return Ok(client.scopes.clone());
    };
    let asked = Scopes::parse(asked)
        .map_err(|error| OAuthError::new(ErrorCode::InvalidScope, error.to_string()))?;
    let beyond: Vec<&str> = asked.beyond(&client.scopes).collect();
    if !beyond.is_empty() {
        return Err(OAuthError::new(
            ErrorCode::InvalidScope,
            format!("not allowed for this client: {}", beyond.join(" ")),
        ));
    }
    Ok(asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Params, OAuthError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"),
        );
        Params::from_form(&headers, body.as_bytes())
    }

    #[test]
    fn forms_are_parsed_by_the_rules() {
        let params = form("grant_type=client_credentials&scope=a+b&empty=").unwrap();
        assert_eq!(params.get("grant_type"), Some("client_credentials"));
        assert_eq!(params.get("scope"), Some("a b"));
        assert_eq!(params.get("empty"), None);
        let repeated = form("scope=a&scope=b").err().unwrap();
        assert_eq!(repeated.code, ErrorCode::InvalidRequest);
        assert!(Params::from_form(&HeaderMap::new(), b"a=b").is_err());
        assert!(
            form("%zz=1").is_err() || form("%zz=1").is_ok(),
            "never panics"
        );
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let encode =
            |s: &str| HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(s))).unwrap();
        assert_eq!(
            basic_credentials(&encode("my%20client:s%3Acret+x")),
            Some(("my client".to_owned(), "s:cret x".to_owned()))
        );
        assert_eq!(
            basic_credentials(
                &HeaderValue::from_str(&format!("basic {}", STANDARD.encode("a:b"))).unwrap()
            ),
            Some(("a".to_owned(), "b".to_owned()))
        );
        for bad in ["Bearer abc", "Basic", "Basic !!!", "Basic YWJj"] {
            assert_eq!(
                basic_credentials(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
        assert_eq!(basic_credentials(&encode(":secret")), None, "an empty id");
    }

    #[test]
    fn one_authentication_method_at_a_time() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("a:b"))).unwrap(),
        );
        let both = presented(&headers, &form("client_id=a&client_secret=b").unwrap());
        assert_eq!(both.err().unwrap().code, ErrorCode::InvalidRequest);
        let other_id = presented(&headers, &form("client_id=c").unwrap());
        assert_eq!(other_id.err().unwrap().code, ErrorCode::InvalidRequest);
        assert!(matches!(
            presented(&HeaderMap::new(), &form("client_id=a").unwrap()),
            Ok(Presented::Public { .. })
        ));
        let none = presented(&HeaderMap::new(), &form("grant_type=x").unwrap());
        assert_eq!(none.err().unwrap().code, ErrorCode::InvalidClient);
    }
}
