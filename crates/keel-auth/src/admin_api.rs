//! The admin REST API (`/admin/v1/…`): users, clients, roles and their bindings, key
//! rotation and the audit trail, for callers holding this server's access token with the
//! `keel-admin` role (a user signed in through a client, or a service client the role is
//! bound to). Errors are RFC 9457 problems; the OpenAPI 3.1 document is at
//! `/admin/v1/openapi.json`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use keel_runtime::Problem;
use keel_runtime::extract::{Json, Query};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::clients::{ClientError, NewClient};
use crate::introspect::{LiveAccess, bearer, live_access_token, with_challenge};
use crate::keys::SigningAlg;
use crate::rbac::{RbacError, Subject};
use crate::server::{AppState, AuthAdmin};
use crate::users::{NewUser, UserError};

/// The role an access token must carry.
pub const ADMIN_ROLE: &str = "keel-admin";

const SOURCE: &str = "auth admin API";

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/openapi.json", get(openapi))
        .route("/admin/v1/users", post(create_user))
        .route("/admin/v1/users/{user_id}", patch(update_user))
        .route("/admin/v1/clients", post(create_client))
        .route("/admin/v1/roles", post(create_role))
        .route("/admin/v1/groups", post(create_group))
        .route("/admin/v1/groups/{group}/members", post(add_member))
        .route(
            "/admin/v1/roles/{role}/bindings",
            post(grant_role).delete(revoke_role),
        )
        .route("/admin/v1/keys/rotate", post(rotate_keys))
        .route("/admin/v1/audit", get(audit))
}

/// The caller, as an extractor: a live bearer token of this server carrying the admin
/// role, or the RFC 6750 challenge (401, or 403 without the role) as a problem.
pub(crate) struct Admin(AuthAdmin);

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let refuse = |problem: Problem, error: Option<&str>| {
            with_challenge(problem.with_source(SOURCE).into_response(), error)
        };
        let Some(token) = bearer(&parts.headers) else {
            return Err(refuse(
                Problem::unauthorized("a bearer token of this server is required"),
                None,
            ));
        };
        let live = match live_access_token(state, token).await {
            Ok(Some(live)) => live,
            Ok(None) => {
                return Err(refuse(
                    Problem::unauthorized("the token is invalid, expired or revoked"),
                    Some("invalid_token"),
                ));
            }
            Err(error) => return Err(error.into_response()),
        };
        // The token must have been asked for administration (the `keel-admin` scope,
        // which only the role's holders are granted), and the caller must hold the role
        // now, not only when the token was issued: a revoked role or a disabled user stops
        // at once.
        let scoped = live
            .claims
            .get("scope")
            .and_then(Value::as_str)
            .is_some_and(|scope| scope.split(' ').any(|s| s == ADMIN_ROLE));
        let holds_now = scoped && holds_admin_now(state, &live).await;
        if !holds_now {
            return Err(refuse(
                Problem::forbidden(format!("the {ADMIN_ROLE} role is required")),
                Some("insufficient_scope"),
            ));
        }
        let client_id = live
            .claims
            .get("client_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let actor = match &live.user {
            Some(user) => format!("user {} via client {client_id}", user.user_id),
            None => format!("client {client_id}"),
        };
        Ok(Self(AuthAdmin::acting(Arc::clone(state), actor)))
    }
}

/// Whether the token's subject (a user, or for client credentials the client) holds the
/// admin role now and is still active (a live token's user is active already).
async fn holds_admin_now(state: &AppState, live: &LiveAccess) -> bool {
    let holder = match &live.user {
        Some(user) => Subject::User(user.user_id.clone()),
        None => {
            let client_id = live.claims.get("client_id").and_then(Value::as_str);
            match state.clients.find(client_id.unwrap_or_default()).await {
                Ok(Some(client)) if !client.disabled => Subject::Client(client.client_id),
                _ => return false,
            }
        }
    };
    state
        .rbac
        .holdings(&holder)
        .await
        .is_ok_and(|holdings| holdings.all_roles().iter().any(|role| role == ADMIN_ROLE))
}

fn problem_of(error: &dyn std::fmt::Display, status: StatusCode) -> Response {
    let problem = match status {
        StatusCode::NOT_FOUND => Problem::not_found(error.to_string()),
        StatusCode::CONFLICT => {
            Problem::new(status, "conflict", "Conflict").with_detail(error.to_string())
        }
        StatusCode::BAD_REQUEST => Problem::bad_request(error.to_string()),
        _ => {
            tracing::error!(%error, "admin API storage failed");
            Problem::internal("the server could not complete the request")
        }
    };
    problem.with_source(SOURCE).into_response()
}

fn user_error(error: UserError) -> Response {
    let status = match &error {
        UserError::Invalid(_) => StatusCode::BAD_REQUEST,
        UserError::Exists(_) => StatusCode::CONFLICT,
        UserError::Hashing | UserError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem_of(&error, status)
}

fn client_error(error: ClientError) -> Response {
    let status = match &error {
        ClientError::Invalid(_) => StatusCode::BAD_REQUEST,
        ClientError::Exists(_) => StatusCode::CONFLICT,
        ClientError::Stored(_) | ClientError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem_of(&error, status)
}

fn rbac_error(error: RbacError) -> Response {
    let status = match &error {
        RbacError::Invalid(_) => StatusCode::BAD_REQUEST,
        RbacError::Exists(_) => StatusCode::CONFLICT,
        RbacError::Missing(_) => StatusCode::NOT_FOUND,
        RbacError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem_of(&error, status)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    username: String,
    password: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

async fn create_user(Admin(admin): Admin, Json(body): Json<UserBody>) -> Response {
    let new = NewUser {
        username: body.username,
        password: body.password,
        email: body.email,
        name: body.name,
    };
    match admin.create_user(new).await {
        Ok(user) => (
            StatusCode::CREATED,
            axum::Json(json!({
                "user_id": user.user_id,
                "username": user.username,
                "email": user.email,
                "name": user.name,
            })),
        )
            .into_response(),
        Err(error) => user_error(error),
    }
}

async fn create_client(Admin(admin): Admin, Json(new): Json<NewClient>) -> Response {
    match admin.create_client(new).await {
        Ok((client, secret)) => {
            let mut body = json!({
                "client_id": client.client_id,
                "name": client.name,
                "auth_method": client.auth_method,
                "grant_types": client.grant_types,
                "redirect_uris": client.redirect_uris,
                "post_logout_redirect_uris": client.post_logout_redirect_uris,
                "scopes": client.scopes.to_string(),
            });
            if let Some(secret) = secret {
                // Shown this once; only its keyed hash is kept.
                body["client_secret"] = json!(secret);
            }
            let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => client_error(error),
    }
}

/// What may change of a user.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default)]
    password: Option<String>,
}

async fn update_user(
    Admin(admin): Admin,
    Path(user_id): Path<String>,
    Json(change): Json<UserChange>,
) -> Response {
    let mut found = true;
    if let Some(password) = change.password {
        match admin.set_password(&user_id, password).await {
            Ok(exists) => found &= exists,
            Err(error) => return user_error(error),
        }
    }
    if let Some(disabled) = change.disabled {
        match admin.set_user_disabled(&user_id, disabled).await {
            Ok(exists) => found &= exists,
            Err(error) => return user_error(error),
        }
    }
    if found {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem_of(&format!("no user {user_id:?}"), StatusCode::NOT_FOUND)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    name: String,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    description: String,
    /// Space-separated.
    #[serde(default)]
    scopes: String,
}

async fn create_role(Admin(admin): Admin, Json(body): Json<RoleBody>) -> Response {
    match admin
        .create_role(
            &body.name,
            body.audience.as_deref(),
            &body.description,
            &body.scopes,
        )
        .await
    {
        Ok(role) => (StatusCode::CREATED, axum::Json(role)).into_response(),
        Err(error) => rbac_error(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    name: String,
}

async fn create_group(Admin(admin): Admin, Json(body): Json<GroupBody>) -> Response {
    match admin.create_group(&body.name).await {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(error) => rbac_error(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberBody {
    user_id: String,
}

async fn add_member(
    Admin(admin): Admin,
    Path(group): Path<String>,
    Json(body): Json<MemberBody>,
) -> Response {
    match admin.add_group_member(&group, &body.user_id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => rbac_error(error),
    }
}

/// Whom a binding names: exactly one of a user (by id), a group or a client.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectBody {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
}

impl SubjectBody {
    fn subject(self) -> Option<Subject> {
        match (self.user_id, self.group, self.client_id) {
            (Some(user), None, None) => Some(Subject::User(user)),
            (None, Some(group), None) => Some(Subject::Group(group)),
            (None, None, Some(client)) => Some(Subject::Client(client)),
            _ => None,
        }
    }
}

fn one_subject() -> Response {
    problem_of(
        &"name exactly one of user_id, group, client_id",
        StatusCode::BAD_REQUEST,
    )
}

async fn grant_role(
    Admin(admin): Admin,
    Path(role): Path<String>,
    Json(body): Json<SubjectBody>,
) -> Response {
    let Some(subject) = body.subject() else {
        return one_subject();
    };
    match admin.grant_role(&role, &subject).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => rbac_error(error),
    }
}

async fn revoke_role(
    Admin(admin): Admin,
    Path(role): Path<String>,
    Query(body): Query<SubjectBody>,
) -> Response {
    let Some(subject) = body.subject() else {
        return one_subject();
    };
    match admin.revoke_role(&role, &subject).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => problem_of(&"no such binding", StatusCode::NOT_FOUND),
        Err(error) => rbac_error(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    alg: Option<SigningAlg>,
}

async fn rotate_keys(Admin(admin): Admin, Json(body): Json<RotateBody>) -> Response {
    match admin.rotate_keys(body.alg).await {
        Ok(kids) => axum::Json(json!({"published": kids})).into_response(),
        Err(error) => problem_of(&error, StatusCode::INTERNAL_SERVER_ERROR),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    limit: Option<u32>,
}

async fn audit(Admin(admin): Admin, Query(query): Query<AuditQuery>) -> Response {
    let limit = i64::from(query.limit.unwrap_or(100).clamp(1, 1000));
    match admin.audit_events(limit).await {
        Ok(events) => axum::Json(json!({"events": events})).into_response(),
        Err(error) => problem_of(&error, StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// The OpenAPI 3.1 description of this API.
async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(document(&state.issuer)).into_response()
}

fn document(issuer: &str) -> Value {
    let problem = json!({"description": "An RFC 9457 problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let errors = json!({
        "400": problem, "401": problem, "403": problem, "404": problem, "409": problem
    });
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let operation = |summary: &str, request: Option<&str>, ok: &str| {
        let mut responses = errors.clone();
        responses[ok] = json!({"description": "Done"});
        let mut op =
            json!({"summary": summary, "security": [{"bearer": []}], "responses": responses});
        if let Some(schema) = request {
            op["requestBody"] = body(schema);
        }
        op
    };
    let path_param = |name: &str| json!([{"name": name, "in": "path", "required": true, "schema": {"type": "string"}}]);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Keel authorization server admin API", "version": "1"},
        "servers": [{"url": issuer}],
        "paths": {
            "/admin/v1/users": {"post": operation("Create a user", Some("NewUser"), "201")},
            "/admin/v1/users/{user_id}": {"parameters": path_param("user_id"), "patch": operation("Disable or enable a user, or set their password", Some("UserChange"), "204")},
            "/admin/v1/clients": {"post": operation("Register a client; its secret is in the answer, once", Some("NewClient"), "201")},
            "/admin/v1/roles": {"post": operation("Create a role that unlocks scopes", Some("NewRole"), "201")},
            "/admin/v1/groups": {"post": operation("Create a group", Some("NewGroup"), "201")},
            "/admin/v1/groups/{group}/members": {"parameters": path_param("group"), "post": operation("Add a user to a group", Some("Member"), "204")},
            "/admin/v1/roles/{role}/bindings": {
                "parameters": path_param("role"),
                "post": operation("Grant the role to a user, group or client", Some("Subject"), "204"),
                "delete": operation("Revoke the role (the subject in the query)", None, "204"),
            },
            "/admin/v1/keys/rotate": {"post": operation("Publish the next signing key(s)", Some("Rotate"), "200")},
            "/admin/v1/audit": {"get": operation("The newest audit events (limit, 1 to 1000)", None, "200")},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "An access token of this server with the keel-admin role"}},
            "schemas": {
                "Problem": {"type": "object", "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}},
                "NewUser": {"type": "object", "required": ["username", "password"], "properties": {"username": {"type": "string"}, "password": {"type": "string", "minLength": 8}, "email": {"type": "string"}, "name": {"type": "string"}}},
                "NewClient": {"type": "object", "required": ["name", "auth_method", "grant_types"], "properties": {
                    "client_id": {"type": "string"}, "name": {"type": "string"},
                    "auth_method": {"enum": ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]},
                    "grant_types": {"type": "array", "items": {"enum": ["authorization_code", "client_credentials", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"]}},
                    "redirect_uris": {"type": "array", "items": {"type": "string"}},
                    "post_logout_redirect_uris": {"type": "array", "items": {"type": "string"}},
                    "scopes": {"type": "string"}, "audiences": {"type": "array", "items": {"type": "string"}},
                    "signing_alg": {"enum": ["RS256", "ES256", "EdDSA"]}, "access_token_ttl": {"type": "integer"},
                    "jwks": {"type": "object"}}},
                "NewRole": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "audience": {"type": "string"}, "description": {"type": "string"}, "scopes": {"type": "string"}}},
                "UserChange": {"type": "object", "properties": {"disabled": {"type": "boolean"}, "password": {"type": "string", "minLength": 8}}},
                "NewGroup": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                "Member": {"type": "object", "required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
                "Subject": {"type": "object", "properties": {"user_id": {"type": "string"}, "group": {"type": "string"}, "client_id": {"type": "string"}}},
                "Rotate": {"type": "object", "properties": {"alg": {"enum": ["RS256", "ES256", "EdDSA"]}}},
            }
        }
    })
}
