//! The native API: `/v1/services/...`, JSON, problem+json errors, unknown fields rejected.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, StatusCode};
use keel_runtime::Problem;
use keel_runtime::extract::{Json, Path, Query};
use serde::Deserialize;

use super::{ApiError, ApiState, block, flag};
use crate::catalog::InstanceFilter;
use crate::model::{Heartbeat, InstanceSpec, Registration, validate_id, validate_service_name};
use crate::registry::Registry;

/// How often an idle event stream re-sends its snapshot; a wait needs an end.
const STREAM_REFRESH: Duration = Duration::from_secs(3600);

/// The header carrying the change index of a read.
pub const INDEX_HEADER: &str = "x-keel-index";

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}", get(list_instances))
        .route("/v1/services/{service}/watch", get(watch))
        .route(
            "/v1/services/{service}/instances/{id}",
            put(register).delete(deregister).get(get_instance),
        )
        .route(
            "/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockingQuery {
    index: Option<u64>,
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceQuery {
    index: Option<u64>,
    wait: Option<String>,
    passing: Option<String>,
    tag: Option<String>,
    zone: Option<String>,
}

fn with_index(index: u64, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

fn check_path(service: &str, id: Option<&str>) -> Result<(), ApiError> {
    validate_service_name(service).map_err(Problem::bad_request)?;
    if let Some(id) = id {
        validate_id("instance id", id).map_err(Problem::bad_request)?;
    }
    Ok(())
}

/// Which replica answered, on which backend, at which index (operators and tests tell
/// replicas apart with it).
async fn status(State(state): State<ApiState>) -> Response {
    let registry = &state.registry;
    axum::Json(serde_json::json!({
        "replica": registry.replica_id(),
        "backend": registry.backend_name(),
        "index": registry.index(),
    }))
    .into_response()
}

async fn list_services(
    State(state): State<ApiState>,
    Query(query): Query<BlockingQuery>,
) -> Result<Response, ApiError> {
    block(&state, None, query.index, query.wait.as_deref()).await?;
    let list = state.registry.services();
    Ok(with_index(list.index, axum::Json(list)))
}

async fn list_instances(
    State(state): State<ApiState>,
    Path(service): Path<String>,
    Query(query): Query<InstanceQuery>,
) -> Result<Response, ApiError> {
    check_path(&service, None)?;
    block(&state, Some(&service), query.index, query.wait.as_deref()).await?;
    let filter = InstanceFilter {
        passing_only: flag(query.passing.as_deref()),
        tag: query.tag,
        zone: query.zone,
    };
    let instances = state.registry.instances(&service, &filter);
    Ok(with_index(instances.index, axum::Json(instances)))
}

async fn get_instance(
    State(state): State<ApiState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_path(&service, Some(&id))?;
    match state.registry.instance(&id) {
        Some(instance) if instance.service == service => Ok(axum::Json(instance).into_response()),
        _ => Err(Problem::not_found(format!("no instance {id:?} in service {service:?}")).into()),
    }
}

async fn register(
    State(state): State<ApiState>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(spec): Json<InstanceSpec>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    check_path(&service, Some(&id))?;
    let instance = state
        .registry
        .register(Registration { service, id, spec }, false)
        .await?;
    Ok(axum::Json(instance).into_response())
}

async fn deregister(
    State(state): State<ApiState>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    check_path(&service, Some(&id))?;
    owned_by(&state.registry, &service, &id)?;
    state.registry.deregister(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn heartbeat(
    State(state): State<ApiState>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    check_path(&service, Some(&id))?;
    let beat: Heartbeat = if body.iter().all(u8::is_ascii_whitespace) {
        Heartbeat::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|error| Problem::bad_request(format!("invalid heartbeat body: {error}")))?
    };
    owned_by(&state.registry, &service, &id)?;
    let instance = state
        .registry
        .heartbeat(&id, beat.status, beat.output)
        .await?;
    Ok(axum::Json(instance).into_response())
}

/// 404 unless `id` is registered under `service`, so a client re-registers after a restart.
fn owned_by(registry: &Registry, service: &str, id: &str) -> Result<(), ApiError> {
    match registry.instance(id) {
        Some(instance) if instance.service == service => Ok(()),
        _ => Err(Problem::not_found(format!("no instance {id:?} in service {service:?}")).into()),
    }
}

/// Server-sent events: one `instances` event with the full list now, then one per change.
/// A client reconnecting with `Last-Event-ID` equal to the current index skips the first.
async fn watch(
    State(state): State<ApiState>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    check_path(&service, None)?;
    let permit = state.registry.watch_permit()?;
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let stream = futures_util::stream::unfold(
        (state, service, last_seen, permit),
        |(state, service, last_seen, permit)| async move {
            if last_seen != 0 {
                tokio::select! {
                    () = state.registry.wait_for_service(&service, last_seen, STREAM_REFRESH) => {}
                    () = state.shutdown.wait() => return None,
                }
            }
            if state.shutdown.is_triggered() {
                return None;
            }
            let snapshot = state
                .registry
                .instances(&service, &InstanceFilter::default());
            let index = snapshot.index;
            let event = Event::default()
                .event("instances")
                .id(index.to_string())
                .json_data(&snapshot)
                .unwrap_or_else(|_| Event::default().event("error"));
            Some((Ok(event), (state, service, index, permit)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
