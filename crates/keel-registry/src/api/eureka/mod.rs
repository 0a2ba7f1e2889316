//! The subset of Eureka's REST API that Spring Cloud Netflix's and Netflix's Eureka clients
//! use, under `/eureka` as a Eureka server serves it: register, renew, cancel, status
//! overrides, and full, per-application, per-instance and delta fetches, in JSON or XML.
//!
//! A Eureka application is a Keel service (its name in lower case); [`registration`] maps
//! what clients send, [`documents`] what they read and [`status`] how statuses translate. A status override is Keel's maintenance mode, so it
//! shows in Keel's and Consul's APIs too, and Consul's maintenance shows here as
//! `OUT_OF_SERVICE`.
//!
//! Deltas: `GET /eureka/apps/delta` answers with every instance as `MODIFIED` and the
//! hash code of the whole registry, under a `versions__delta` that is the registry's index.
//! Applying it to any earlier copy adds or updates every instance; a client whose copy
//! still holds a removed instance then computes a different hash code and fetches
//! everything, as Eureka clients do on a mismatch. Keel keeps no log of recent changes to
//! answer with less, and this way a client can never miss one.

mod codec;
mod documents;
mod registration;
mod status;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, StatusCode};
use keel_runtime::Problem;
use keel_runtime::extract::{Path, Query};
use serde::Deserialize;

use self::codec::{Doc, Format};
use self::documents::Action;
use self::status::EurekaStatus;
use super::{ApiError, ApiState};
use crate::catalog::InstanceFilter;
use crate::model::{Instance, validate_id, validate_service_name};

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/eureka/apps", get(all_applications))
        // Eureka's clients fetch `apps/` with the slash.
        .route("/eureka/apps/", get(all_applications))
        .route("/eureka/apps/delta", get(delta))
        .route("/eureka/apps/{app}", get(application).post(register))
        .route(
            "/eureka/apps/{app}/{id}",
            get(instance).put(renew).delete(cancel),
        )
        .route(
            "/eureka/apps/{app}/{id}/status",
            put(override_status).delete(remove_override),
        )
        .route("/eureka/instances/{id}", get(instance_by_id))
}

// === writes ===

/// `POST /eureka/apps/{app}`: 204, as Eureka answers.
async fn register(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    let body = body.map_err(|rejection| {
        // An oversized body gets a problem like every other failure, not axum's plain text.
        let status = rejection.status();
        let problem = if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(status, "payload-too-large", "Payload too large")
        } else {
            Problem::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request")
        };
        ApiError::from(problem.with_detail(rejection.body_text()))
    })?;
    let document = match codec::body_format(&headers, &body) {
        Err(detail) => {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .with_detail(detail)
            .into());
        }
        Ok(Format::Json) => serde_json::from_slice(&body)
            .map_err(|error| Problem::bad_request(format!("invalid JSON body: {error}")))?,
        Ok(Format::Xml) => {
            let text = std::str::from_utf8(&body)
                .map_err(|_| Problem::bad_request("the XML body is not UTF-8"))?;
            codec::parse_xml(text).map_err(Problem::bad_request)?
        }
    };
    let registration = registration::registration(&app, &document).map_err(Problem::bad_request)?;
    // Eureka lets two applications share an instance id, Keel does not: a clash is a
    // conflict rather than a silent move.
    state.registry.register(registration, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
struct RenewQuery {
    // `status` and `overriddenstatus` are the client's own view; Eureka's server does not
    // take the status from a renewal either (the client registers again when it changes).
    #[serde(rename = "lastDirtyTimestamp")]
    last_dirty_timestamp: Option<String>,
}

/// `PUT /eureka/apps/{app}/{id}`: renews the lease; 404 tells the client to register again
/// (after a registry restart, or when it changed since it registered).
async fn renew(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<RenewQuery>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    let instance = find(&state, &app, &id)?;
    if registration::is_stale(&instance, query.last_dirty_timestamp.as_deref()) {
        return Err(Problem::not_found(format!(
            "instance {id:?} changed since it registered; register it again"
        ))
        .into());
    }
    for (check_id, status) in registration::renewal(&instance) {
        state.registry.update_check(&check_id, status, None).await?;
    }
    metrics::counter!("keel_registry_heartbeats_total").increment(1);
    Ok(StatusCode::OK.into_response())
}

/// `DELETE /eureka/apps/{app}/{id}`.
async fn cancel(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    find(&state, &app, &id)?;
    state.registry.deregister(&id).await?;
    Ok(StatusCode::OK.into_response())
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    value: Option<String>,
}

/// `PUT /eureka/apps/{app}/{id}/status?value=…`: `OUT_OF_SERVICE`, `DOWN` or `STARTING` put
/// the instance in maintenance (it reads `OUT_OF_SERVICE` from then on); `UP` and `UNKNOWN`
/// (Eureka's "no override") take it out.
async fn override_status(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    let Some(value) = query.value.filter(|value| !value.trim().is_empty()) else {
        return Err(Problem::bad_request("the status override needs ?value=").into());
    };
    let status = EurekaStatus::from_name(&value).ok_or_else(|| {
        ApiError::from(Problem::bad_request(format!(
            "{value:?} is not one of UP, DOWN, STARTING, OUT_OF_SERVICE, UNKNOWN"
        )))
    })?;
    find(&state, &app, &id)?;
    let reason = match status {
        EurekaStatus::Up | EurekaStatus::Unknown => None,
        EurekaStatus::Down | EurekaStatus::Starting | EurekaStatus::OutOfService => {
            Some(format!("Eureka status override {}", status.as_str()))
        }
    };
    state.registry.set_maintenance(&id, reason).await?;
    Ok(StatusCode::OK.into_response())
}

/// `DELETE /eureka/apps/{app}/{id}/status`.
async fn remove_override(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, None)?;
    find(&state, &app, &id)?;
    state.registry.set_maintenance(&id, None).await?;
    Ok(StatusCode::OK.into_response())
}

// === reads ===

/// `GET /eureka/apps`: every application, `versions__delta` 1 as Eureka writes it for a
/// full fetch.
async fn all_applications(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let format = codec::response_format(&headers);
    let doc = documents::applications_doc(&snapshot(&state), 1, None, format);
    respond(format, "applications", doc)
}

/// `GET /eureka/apps/delta`; see the module documentation.
async fn delta(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let format = codec::response_format(&headers);
    let version = state.registry.index();
    let doc =
        documents::applications_doc(&snapshot(&state), version, Some(Action::Modified), format);
    respond(format, "applications", doc)
}

/// `GET /eureka/apps/{app}`: 404 for an application without instances.
async fn application(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let service = service_of(&app)?;
    let instances = state
        .registry
        .instances(&service, &InstanceFilter::default())
        .instances;
    if instances.is_empty() {
        return Err(Problem::not_found(format!("no application {app:?}")).into());
    }
    let format = codec::response_format(&headers);
    let doc = documents::application_doc(&service, &instances, None, format);
    Ok(respond(format, "application", doc))
}

/// `GET /eureka/apps/{app}/{id}`.
async fn instance(
    State(state): State<ApiState>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let instance = find(&state, &app, &id)?;
    Ok(instance_response(&instance, &headers))
}

/// `GET /eureka/instances/{id}`.
async fn instance_by_id(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    validate_id("instance id", &id).map_err(Problem::bad_request)?;
    let instance = state
        .registry
        .instance(&id)
        .ok_or_else(|| ApiError::from(Problem::not_found(format!("no instance {id:?}"))))?;
    Ok(instance_response(&instance, &headers))
}

fn instance_response(instance: &Instance, headers: &HeaderMap) -> Response {
    let format = codec::response_format(headers);
    let doc = documents::instance_doc(instance, Action::of(instance), format);
    respond(format, "instance", doc)
}

// === helpers ===

/// Every service with instances, each with its instances, by name.
fn snapshot(state: &ApiState) -> Vec<(String, Vec<Instance>)> {
    state
        .registry
        .services()
        .services
        .into_iter()
        .map(|service| {
            let instances = state
                .registry
                .instances(&service.name, &InstanceFilter::default())
                .instances;
            (service.name, instances)
        })
        .filter(|(_, instances)| !instances.is_empty())
        .collect()
}

/// The service of a Eureka application in a path; 400 for a name Keel cannot hold.
fn service_of(app: &str) -> Result<String, ApiError> {
    let service = registration::service_name(app);
    validate_service_name(&service).map_err(Problem::bad_request)?;
    Ok(service)
}

/// The instance `id` of application `app`; 404 when there is none.
fn find(state: &ApiState, app: &str, id: &str) -> Result<Instance, ApiError> {
    let service = service_of(app)?;
    validate_id("instance id", id).map_err(Problem::bad_request)?;
    match state.registry.instance(id) {
        Some(instance) if instance.service == service => Ok(instance),
        _ => Err(Problem::not_found(format!("no instance {id:?} in application {app:?}")).into()),
    }
}

/// `doc` as the element or field `root`, in `format`.
fn respond(format: Format, root: &str, doc: Doc) -> Response {
    match format {
        Format::Json => axum::Json(Doc::Map(vec![(root.to_owned(), doc)])).into_response(),
        Format::Xml => (
            [(CONTENT_TYPE, "application/xml")],
            codec::to_xml(root, &doc),
        )
            .into_response(),
    }
}
