//! The subset of Consul's HTTP API that service registration and discovery clients use
//! (Spring Cloud Consul, consul-api, hashicorp/consul/api, Fabio, Traefik's catalog):
//! agent service (de)registration, TTL check updates, catalog and health reads with
//! blocking queries. Shapes and field names follow Consul's responses.
//!
//! Keel is one agent, one node: every instance lives on node `keel` in datacenter `dc1`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http::{HeaderMap, HeaderValue};
use keel_runtime::Problem;
use keel_runtime::extract::{Json, Path, Query};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, block, flag};
use crate::catalog::InstanceFilter;
use crate::model::{
    CheckSpec, Instance, InstanceSpec, Registration, Scheme, Status, is_maintenance_check,
    validate_service_name,
};

const NODE: &str = "keel";
const DATACENTER: &str = "dc1";

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/service/maintenance/{id}", put(maintenance))
        .route("/v1/agent/check/{verb}/{check_id}", put(check_note))
        .route("/v1/agent/check/update/{check_id}", put(check_update))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/status/leader", get(status_leader))
}

// === registration ===

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulRegistration {
    #[serde(rename = "ID", alias = "id")]
    id: Option<String>,
    #[serde(alias = "name")]
    name: String,
    #[serde(default, alias = "tags")]
    tags: Option<Vec<String>>,
    #[serde(default, alias = "address")]
    address: Option<String>,
    #[serde(default, alias = "port")]
    port: Option<u16>,
    #[serde(default, alias = "meta")]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default, alias = "weights")]
    weights: Option<ConsulWeights>,
    #[serde(default, alias = "check")]
    check: Option<ConsulCheck>,
    #[serde(default, alias = "checks")]
    checks: Option<Vec<ConsulCheck>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulWeights {
    passing: u32,
    warning: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConsulCheck {
    #[serde(rename = "CheckID", alias = "ID", alias = "check_id")]
    check_id: Option<String>,
    #[serde(rename = "TTL", alias = "ttl")]
    ttl: Option<String>,
    #[serde(rename = "HTTP", alias = "http")]
    http: Option<String>,
    #[serde(rename = "TCP", alias = "tcp")]
    tcp: Option<String>,
    #[serde(rename = "TLSSkipVerify", alias = "tls_skip_verify")]
    tls_skip_verify: Option<bool>,
    #[serde(alias = "interval")]
    interval: Option<String>,
    #[serde(alias = "timeout")]
    timeout: Option<String>,
    #[serde(alias = "deregister_critical_service_after")]
    deregister_critical_service_after: Option<String>,
    #[serde(alias = "status")]
    status: Option<String>,
}

fn duration(field: &str, text: Option<&str>) -> Result<Option<Duration>, ApiError> {
    text.filter(|t| !t.is_empty())
        .map(|t| {
            humantime::parse_duration(t).map_err(|_| {
                Problem::bad_request(format!("{field} {t:?} is not a duration")).into()
            })
        })
        .transpose()
}

/// Consul's rules for `DeregisterCriticalServiceAfter`: zero is unset, and anything
/// shorter than a minute a minute, so that a TTL check, which starts critical, is not
/// reaped before its first pass.
fn reaped_after(after: Option<Duration>) -> Option<Duration> {
    const SHORTEST: Duration = Duration::from_secs(60);
    after
        .filter(|after| !after.is_zero())
        .map(|after| after.max(SHORTEST))
}

impl ConsulCheck {
    fn into_spec(self) -> Result<CheckSpec, ApiError> {
        let initial_status = match self.status.as_deref() {
            None | Some("") => None,
            Some(text) => Some(Status::parse(text).ok_or_else(|| {
                ApiError::from(Problem::bad_request(format!(
                    "check status {text:?} is not passing, warning or critical"
                )))
            })?),
        };
        let ttl = duration("TTL", self.ttl.as_deref())?;
        // Consul's TTL checks start critical unless a status is given.
        let initial_status = initial_status.or(ttl.map(|_| Status::Critical));
        Ok(CheckSpec {
            id: self.check_id.filter(|id| !id.is_empty()),
            ttl,
            http: self.http.filter(|v| !v.is_empty()),
            tcp: self.tcp.filter(|v| !v.is_empty()),
            tls_skip_verify: self.tls_skip_verify.unwrap_or(false),
            interval: duration("Interval", self.interval.as_deref())?,
            timeout: duration("Timeout", self.timeout.as_deref())?,
            deregister_after: reaped_after(duration(
                "DeregisterCriticalServiceAfter",
                self.deregister_critical_service_after.as_deref(),
            )?),
            initial_status,
        })
    }
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn register(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    Json(body): Json<ConsulRegistration>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, query.token.as_deref())?;
    let mut meta = body.meta.unwrap_or_default();
    let version = meta.remove("version");
    let zone = meta.remove("zone");
    let mut checks = Vec::new();
    checks.extend(body.check.map(ConsulCheck::into_spec).transpose()?);
    for check in body.checks.unwrap_or_default() {
        checks.push(check.into_spec()?);
    }
    let id = body
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| body.name.clone());
    let registration = Registration {
        service: body.name,
        id,
        spec: InstanceSpec {
            // Consul falls back to the agent's address; here the caller's is the best guess.
            address: body
                .address
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| peer.ip().to_string()),
            port: body.port.unwrap_or(0),
            scheme: Scheme::Http,
            tags: body.tags.unwrap_or_default(),
            version,
            zone,
            weight: body.weights.map_or(1, |w| w.passing.max(1)),
            meta,
            checks,
        },
    };
    state.registry.register(registration, true).await?;
    Ok(().into_response())
}

async fn deregister(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, query.token.as_deref())?;
    state.registry.deregister(&id).await?;
    Ok(().into_response())
}

// === maintenance ===

/// What Consul says when maintenance is enabled without a reason.
const DEFAULT_MAINTENANCE_REASON: &str = "Maintenance mode is enabled for this service, \
     but no reason was provided. This is a default message.";

#[derive(Debug, Deserialize)]
struct MaintenanceQuery {
    enable: Option<String>,
    reason: Option<String>,
    token: Option<String>,
}

/// `PUT /v1/agent/service/maintenance/{id}?enable=true&reason=…`: Consul's maintenance mode,
/// a critical `_service_maintenance:<id>` check while enabled.
async fn maintenance(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<MaintenanceQuery>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, query.token.as_deref())?;
    let enable = match query.enable.as_deref() {
        None | Some("") => return Err(Problem::bad_request("Missing value for enable").into()),
        Some(text) => parse_bool(text).ok_or_else(|| {
            ApiError::from(Problem::bad_request(format!(
                "Invalid value for enable: {text:?}"
            )))
        })?,
    };
    let reason = enable.then(|| {
        query
            .reason
            .filter(|reason| !reason.is_empty())
            .unwrap_or_else(|| DEFAULT_MAINTENANCE_REASON.to_owned())
    });
    state.registry.set_maintenance(&id, reason).await?;
    Ok(().into_response())
}

/// Go's `strconv.ParseBool`, which Consul uses for its flags.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

// === TTL check updates ===

#[derive(Debug, Deserialize)]
struct NoteQuery {
    note: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckUpdate {
    #[serde(alias = "status")]
    status: Option<String>,
    #[serde(alias = "output")]
    output: Option<String>,
}

async fn set_ttl_status(
    state: &ApiState,
    check_id: &str,
    status: Status,
    output: Option<String>,
) -> Result<Response, ApiError> {
    let owner = state.registry.check_owner(check_id).ok_or_else(|| {
        ApiError::from(Problem::not_found(format!(
            "CheckID {check_id:?} does not have associated TTL"
        )))
    })?;
    let is_ttl = owner
        .checks
        .iter()
        .any(|check| check.id == check_id && check.spec.ttl.is_some());
    if !is_ttl {
        return Err(Problem::bad_request(format!(
            "check {check_id:?} is not a TTL check; its status comes from its probe"
        ))
        .into());
    }
    state
        .registry
        .update_check(check_id, status, output)
        .await?;
    metrics::counter!("keel_registry_heartbeats_total").increment(1);
    Ok(().into_response())
}

/// `PUT /v1/agent/check/{pass|warn|fail}/{check_id}?note=…`.
async fn check_note(
    State(state): State<ApiState>,
    Path((verb, check_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<NoteQuery>,
) -> Result<Response, ApiError> {
    let status = match verb.as_str() {
        "pass" => Status::Passing,
        "warn" => Status::Warning,
        "fail" => Status::Critical,
        _ => {
            return Err(Problem::not_found(format!(
                "no route for /v1/agent/check/{verb}: use pass, warn, fail or update"
            ))
            .into());
        }
    };
    state.authorize_write(&headers, query.token.as_deref())?;
    set_ttl_status(
        &state,
        &check_id,
        status,
        Some(query.note.unwrap_or_default()),
    )
    .await
}

async fn check_update(
    State(state): State<ApiState>,
    Path(check_id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    Json(update): Json<CheckUpdate>,
) -> Result<Response, ApiError> {
    state.authorize_write(&headers, query.token.as_deref())?;
    let status = match update.status.as_deref() {
        Some(text) => Status::parse(text).ok_or_else(|| {
            ApiError::from(Problem::bad_request(format!(
                "Status {text:?} is not passing, warning or critical"
            )))
        })?,
        None => Status::Passing,
    };
    set_ttl_status(&state, &check_id, status, update.output).await
}

// === reads ===

#[derive(Debug, Deserialize)]
struct ReadQuery {
    index: Option<u64>,
    wait: Option<String>,
    passing: Option<String>,
    tag: Option<String>,
    // Other parameters (dc, token, stale, consistent, ...) are ignored, as Keel has one
    // datacenter and one node and reads are open.
}

/// Consul's read headers: the index, and the leader hints its clients look for.
fn consul_response(index: u64, body: impl Serialize) -> Response {
    let mut response = axum::Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert("x-consul-index", HeaderValue::from(index));
    headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    response
}

async fn catalog_services(
    State(state): State<ApiState>,
    Query(query): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    block(&state, None, query.index, query.wait.as_deref()).await?;
    let list = state.registry.services();
    let body: BTreeMap<String, Vec<String>> = list
        .services
        .into_iter()
        .map(|service| (service.name, service.tags))
        .collect();
    Ok(consul_response(list.index, body))
}

/// A service's instances for a catalog or health read: validates the name, holds a
/// blocking query, then filters.
async fn instances_for(
    state: &ApiState,
    name: &str,
    query: &ReadQuery,
) -> Result<(u64, Vec<Instance>), ApiError> {
    validate_service_name(name).map_err(Problem::bad_request)?;
    block(state, Some(name), query.index, query.wait.as_deref()).await?;
    let filter = InstanceFilter {
        passing_only: flag(query.passing.as_deref()),
        tag: query.tag.clone(),
        zone: None,
    };
    let found = state.registry.instances(name, &filter);
    Ok((found.index, found.instances))
}

fn consul_meta(instance: &Instance) -> BTreeMap<String, String> {
    let mut meta = instance.meta.clone();
    if let Some(version) = &instance.version {
        meta.insert("version".into(), version.clone());
    }
    if let Some(zone) = &instance.zone {
        meta.insert("zone".into(), zone.clone());
    }
    meta
}

fn weights(instance: &Instance) -> ConsulWeights {
    ConsulWeights {
        passing: instance.weight,
        warning: 1,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogEntry {
    #[serde(rename = "ID")]
    id: &'static str,
    node: &'static str,
    address: String,
    datacenter: &'static str,
    tagged_addresses: HashMap<String, String>,
    node_meta: HashMap<String, String>,
    service_kind: &'static str,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    service_address: String,
    service_port: u16,
    service_meta: BTreeMap<String, String>,
    service_weights: ConsulWeights,
    service_enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

async fn catalog_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    let (index, instances) = instances_for(&state, &name, &query).await?;
    let body: Vec<CatalogEntry> = instances
        .into_iter()
        .map(|instance| CatalogEntry {
            id: "",
            node: NODE,
            address: instance.address.clone(),
            datacenter: DATACENTER,
            tagged_addresses: HashMap::new(),
            node_meta: HashMap::new(),
            service_kind: "",
            service_id: instance.id.clone(),
            service_name: instance.service.clone(),
            service_tags: instance.tags.clone(),
            service_address: instance.address.clone(),
            service_port: instance.port,
            service_meta: consul_meta(&instance),
            service_weights: weights(&instance),
            service_enable_tag_override: false,
            create_index: instance.create_index,
            modify_index: instance.modify_index,
        })
        .collect();
    Ok(consul_response(index, body))
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
    checks: Vec<HealthCheck>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(rename = "ID")]
    id: &'static str,
    node: &'static str,
    address: String,
    datacenter: &'static str,
    tagged_addresses: HashMap<String, String>,
    meta: HashMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    address: String,
    meta: BTreeMap<String, String>,
    port: u16,
    weights: ConsulWeights,
    enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheck {
    node: &'static str,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: &'static str,
    notes: String,
    output: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    #[serde(rename = "Type")]
    kind: &'static str,
    create_index: u64,
    modify_index: u64,
}

async fn health_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    let (index, instances) = instances_for(&state, &name, &query).await?;
    let body: Vec<HealthEntry> = instances
        .into_iter()
        .map(|instance| HealthEntry {
            node: HealthNode {
                id: "",
                node: NODE,
                address: instance.address.clone(),
                datacenter: DATACENTER,
                tagged_addresses: HashMap::new(),
                meta: HashMap::new(),
            },
            checks: instance
                .checks
                .iter()
                .map(|check| HealthCheck {
                    node: NODE,
                    check_id: check.id.clone(),
                    name: if is_maintenance_check(&check.id) {
                        "Service Maintenance Mode".to_owned()
                    } else {
                        format!("Service '{}' check", instance.service)
                    },
                    status: check.status.as_str(),
                    // Consul keeps a maintenance reason in the notes.
                    notes: if is_maintenance_check(&check.id) {
                        check.output.clone()
                    } else {
                        String::new()
                    },
                    output: check.output.clone(),
                    service_id: instance.id.clone(),
                    service_name: instance.service.clone(),
                    service_tags: instance.tags.clone(),
                    kind: if is_maintenance_check(&check.id) {
                        "maintenance"
                    } else if check.spec.ttl.is_some() {
                        "ttl"
                    } else if check.spec.http.is_some() {
                        "http"
                    } else {
                        "tcp"
                    },
                    create_index: instance.create_index,
                    modify_index: instance.modify_index,
                })
                .collect(),
            service: HealthService {
                id: instance.id.clone(),
                service: instance.service.clone(),
                tags: instance.tags.clone(),
                address: instance.address.clone(),
                meta: consul_meta(&instance),
                port: instance.port,
                weights: weights(&instance),
                enable_tag_override: false,
                create_index: instance.create_index,
                modify_index: instance.modify_index,
            },
        })
        .collect();
    Ok(consul_response(index, body))
}

/// Some clients probe the leader before anything else; Keel always has one.
async fn status_leader(State(_state): State<ApiState>) -> Response {
    axum::Json("127.0.0.1:8300").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deregister_critical_after_is_unset_at_zero_and_a_minute_at_least() {
        let check = |after: &str| {
            let check: ConsulCheck = serde_json::from_value(serde_json::json!({
                "TTL": "10s",
                "DeregisterCriticalServiceAfter": after,
            }))
            .unwrap();
            check.into_spec().ok().unwrap().deregister_after
        };
        assert_eq!(check("0s"), None);
        assert_eq!(check("5s"), Some(Duration::from_secs(60)));
        assert_eq!(check("90m"), Some(Duration::from_secs(90 * 60)));
    }

    #[test]
    fn tls_skip_verify_is_taken_from_consuls_field() {
        let check: ConsulCheck = serde_json::from_value(serde_json::json!({
            "HTTP": "https://10.0.0.1:8443/health",
            "Interval": "10s",
            "TLSSkipVerify": true,
        }))
        .unwrap();
        let spec = check.into_spec().ok().unwrap();
        assert!(spec.tls_skip_verify);
        assert!(matches!(
            spec.kind(),
            Ok(crate::model::CheckKind::Http {
                skip_verify: true,
                ..
            })
        ));
    }
}
