//! HTTP APIs of the registry: the native one, and Consul- and Eureka-compatible subsets, all
//! over the same [`Registry`].

use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use http::{HeaderMap, StatusCode};
use keel_runtime::{Problem, Secret, Shutdown};
use subtle::ConstantTimeEq;

use crate::catalog::CatalogError;
use crate::registry::{Registry, RegistryError};

pub mod consul;
pub mod eureka;
pub mod native;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Registry,
    pub acl_token: Option<Secret<String>>,
    pub shutdown: Shutdown,
}

/// All registry routes.
pub fn router(state: ApiState) -> Router {
    native::router()
        .merge(consul::router())
        .merge(eureka::router())
        .with_state(state)
}

/// The component name on problem documents.
const SOURCE: &str = "registry";

/// The longest a blocking query may wait, and the wait when none is given (Consul's).
pub const MAX_WAIT: Duration = Duration::from_secs(600);
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// The registry's errors as problem documents (boxed: handlers return it on every path).
pub struct ApiError(Box<Problem>);

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        let problem = match &error {
            RegistryError::Catalog(CatalogError::Invalid(detail)) => Problem::bad_request(detail),
            RegistryError::Catalog(CatalogError::NotFound(detail)) => Problem::not_found(detail),
            RegistryError::Catalog(CatalogError::Conflict(detail)) => {
                Problem::new(StatusCode::CONFLICT, "conflict", "Conflict").with_detail(detail)
            }
            RegistryError::Catalog(CatalogError::Limit(detail)) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "limit-reached",
                "Limit reached",
            )
            .with_detail(detail),
            RegistryError::TooManyWatches(_) => Problem::too_many_requests(error.to_string())
                .with_retry_after(Duration::from_secs(1)),
            RegistryError::Unavailable(detail) => {
                Problem::unavailable(detail).with_retry_after(Duration::from_secs(1))
            }
        };
        ApiError::from(problem)
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        ApiError(Box::new(problem.with_source(SOURCE)))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (*self.0).into_response()
    }
}

impl ApiState {
    /// Checks the ACL token of a write: `X-Keel-Token`, `X-Consul-Token` or a bearer token,
    /// compared in constant time. Without a configured token, writes are open.
    pub fn authorize_write(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(expected) = &self.acl_token else {
            return Ok(());
        };
        let authorization = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // Eureka clients can only send credentials as Basic auth (`http://user:token@…`):
        // the password is the token, the user name is not checked.
        let basic_password = authorization
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|encoded| BASE64_STANDARD.decode(encoded.trim()).ok())
            .and_then(|decoded| String::from_utf8(decoded).ok())
            .and_then(|pair| {
                pair.split_once(':')
                    .map(|(_, password)| password.to_owned())
            });
        let presented = ["x-keel-token", "x-consul-token"]
            .iter()
            .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
            .or_else(|| authorization.and_then(|v| v.strip_prefix("Bearer ")))
            .or(basic_password.as_deref())
            .or(query_token);
        match presented {
            None => {
                Err(Problem::unauthorized("this registry requires an ACL token for writes").into())
            }
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())) => {
                Ok(())
            }
            Some(_) => Err(Problem::forbidden("the ACL token is not valid").into()),
        }
    }
}

/// Holds a read until the index passes `index` — `service`'s, or the whole catalog's when
/// `service` is `None` — or the wait ends, or the server shuts down. Without an index, or
/// with 0 (a client's first read, or its first after an error), the read answers at once
/// and takes no watch slot: clients starting up must not be refused while the slots are
/// held by others' watches.
pub async fn block(
    state: &ApiState,
    service: Option<&str>,
    index: Option<u64>,
    wait: Option<&str>,
) -> Result<(), ApiError> {
    let Some(index) = index.filter(|&index| index != 0) else {
        return Ok(());
    };
    let wait = parse_wait(wait)?;
    let _permit = state.registry.watch_permit()?;
    let waiting = async {
        match service {
            Some(service) => state.registry.wait_for_service(service, index, wait).await,
            None => state.registry.wait_for_any(index, wait).await,
        }
    };
    tokio::select! {
        () = waiting => {}
        () = state.shutdown.wait() => {}
    }
    Ok(())
}

/// Parses a wait such as `30s` or `5m` (Consul's format), capped at [`MAX_WAIT`].
fn parse_wait(wait: Option<&str>) -> Result<Duration, ApiError> {
    match wait {
        None | Some("") => Ok(DEFAULT_WAIT),
        Some(text) => humantime::parse_duration(text)
            .map(|wait| wait.min(MAX_WAIT))
            .map_err(|_| {
                Problem::bad_request(format!("wait {text:?} is not a duration such as 30s or 5m"))
                    .into()
            }),
    }
}

/// Consul's flag parameters: present without a value, or with anything but `false`/`0`.
pub fn flag(value: Option<&str>) -> bool {
    value.is_some_and(|v| v != "false" && v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_and_are_capped() {
        assert_eq!(parse_wait(None).ok(), Some(DEFAULT_WAIT));
        assert_eq!(parse_wait(Some("30s")).ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait(Some("2h")).ok(), Some(MAX_WAIT));
        assert!(parse_wait(Some("soon")).is_err());
    }

    #[test]
    fn flags_follow_consul() {
        assert!(flag(Some("")));
        assert!(flag(Some("true")));
        assert!(!flag(Some("false")));
        assert!(!flag(None));
    }
}
