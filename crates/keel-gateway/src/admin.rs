//! The admin API, on its own port (8081 by default) so it is never exposed where the
//! proxy is: routes (list, add or replace, delete), upstreams with their health and
//! ejection state, reload. Every `/v1` endpoint requires the admin token as a bearer
//! token; `/health/*` and `/metrics` (from the shared server stack) do not.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::StatusCode;
use keel_runtime::{Problem, Secret};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::config::GatewayRouteConfig;
use crate::proxy::UpstreamStatus;
use crate::server::{ChangeError, Gateway, ReloadReport};

const SOURCE: &str = "gateway-admin";

pub fn router(gateway: Arc<Gateway>, token: Option<Secret<String>>) -> Router {
    Router::new()
        .route("/v1/routes", get(list_routes))
        .route("/v1/routes/{name}", put(put_route).delete(delete_route))
        .route("/v1/upstreams", get(upstreams))
        .route("/v1/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(Arc::new(token), authorize))
        .with_state(gateway)
}

async fn authorize(
    State(token): State<Arc<Option<Secret<String>>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = token.as_ref() else {
        return problem(Problem::forbidden(
            "the admin API is off until gateway.admin_token is set",
        ));
    };
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(presented) if bool::from(presented.as_bytes().ct_eq(expected.expose().as_bytes())) => {
            next.run(request).await
        }
        Some(_) => problem(Problem::forbidden("the admin token is not valid")),
        None => {
            let mut response = problem(Problem::unauthorized(
                "send the admin token as a bearer token",
            ));
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"keel-gateway-admin\""),
            );
            response
        }
    }
}

fn problem(problem: Problem) -> Response {
    problem.with_source(SOURCE).into_response()
}

fn refused(error: ChangeError) -> Response {
    let (status, slug) = match &error {
        ChangeError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-configuration"),
        ChangeError::NoSource | ChangeError::FromFile(_) => (StatusCode::CONFLICT, "conflict"),
        ChangeError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
    };
    problem(
        Problem::new(status, slug, "Configuration change refused")
            .with_detail(format!("{error}; the running configuration is unchanged")),
    )
}

#[derive(Serialize)]
struct ListedRoute {
    /// `file` or `api`.
    source: &'static str,
    #[serde(flatten)]
    route: GatewayRouteConfig,
}

async fn list_routes(State(gateway): State<Arc<Gateway>>) -> Json<Vec<ListedRoute>> {
    let api = gateway.api_route_names().await;
    let proxy = gateway.current();
    Json(
        proxy
            .routes()
            .iter()
            .map(|route| ListedRoute {
                source: if api.contains(&route.name) {
                    "api"
                } else {
                    "file"
                },
                route: route.clone(),
            })
            .collect(),
    )
}

#[derive(Serialize)]
struct Changed {
    routes: usize,
}

async fn put_route(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    keel_runtime::extract::Json(route): keel_runtime::extract::Json<GatewayRouteConfig>,
) -> Response {
    if route.name != name {
        return problem(Problem::bad_request(format!(
            "the body names route {:?} but the path names {name:?}",
            route.name
        )));
    }
    match gateway.put_route(route).await {
        Ok(routes) => Json(Changed { routes }).into_response(),
        Err(error) => refused(error),
    }
}

async fn delete_route(State(gateway): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    match gateway.delete_route(&name).await {
        Ok(routes) => Json(Changed { routes }).into_response(),
        Err(error) => refused(error),
    }
}

async fn upstreams(State(gateway): State<Arc<Gateway>>) -> Json<Vec<UpstreamStatus>> {
    Json(gateway.current().upstreams())
}

async fn reload(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.reload().await {
        Ok(report) => Json::<ReloadReport>(report).into_response(),
        Err(error) => refused(error),
    }
}
