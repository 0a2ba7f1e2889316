//! The orders HTTP API (JSON; errors as problem+json).
//!
//! - `POST /orders` (the `customer` role): `{"lines": [{"sku", "quantity"}],
//!   "payment_method": "tok_…"}`, optionally with an `Idempotency-Key`; 202 with the
//!   pending order and its `Location`; the same key again 200 with that order, the same
//!   key with another body 422;
//! - `GET /orders`: the caller's orders, newest first;
//! - `GET /orders/{id}`: an order and its saga's steps, for its customer or an admin
//!   (anyone else: 404, as if there were none); with `?wait=5s` (at most 20 s), an order
//!   still pending or cancelling is answered once it has moved on or the wait is over.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keel_runtime::Problem;
use keel_runtime::extract::{IdempotencyKey, Path, Query};
use keel_sdk::auth::Caller;
use keel_sdk::events::asyncapi::AsyncApi;
use serde_json::{Value, json};

use crate::contract::OrderChanged;
use crate::domain::{CustomerId, CustomerIdError, OrderId};
use crate::{Order, OrderView, Orders, OrdersError, PlaceOrder};

pub fn router(orders: Orders) -> Router {
    Router::new()
        .route("/orders", get(mine).post(place))
        .route("/orders/{id}", get(one))
        .route("/orders/{id}/cancel", axum::routing::post(cancel))
        .with_state(orders)
}

fn source(problem: Problem) -> Response {
    problem.with_source("orders").into_response()
}

fn failed(error: OrdersError) -> Response {
    let detail = error.to_string();
    source(match error {
        OrdersError::Pricing(_) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-orderable",
            "The order cannot be placed",
        )
        .with_detail(detail),
        OrdersError::KeyReused => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
        )
        .with_detail(detail),
        OrdersError::TooManyPending(_) => Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-pending-orders",
            "Too many orders being placed",
        )
        .with_detail(detail)
        .with_retry_after(std::time::Duration::from_secs(1)),
        OrdersError::Cancel(_) => Problem::conflict(detail),
        OrdersError::Catalog(_) => {
            tracing::warn!(%detail, "prices unavailable");
            Problem::unavailable("prices cannot be had now; nothing was ordered")
        }
        error => {
            tracing::error!(%error, "orders operation failed");
            Problem::unavailable("orders cannot answer now")
        }
    })
}

fn customer(caller: &Caller) -> Result<CustomerId, CustomerIdError> {
    CustomerId::new(caller.subject())
}

fn forbidden(error: CustomerIdError) -> Response {
    source(Problem::forbidden(error.to_string()))
}

async fn place(
    State(orders): State<Orders>,
    caller: Caller,
    IdempotencyKey(key): IdempotencyKey,
    body: Result<keel_runtime::extract::Json<PlaceOrder>, Problem>,
) -> Result<Response, Response> {
    caller
        .require_role("customer")
        .map_err(IntoResponse::into_response)?;
    // Read after the caller is known: who may not order learns that, not what is wrong
    // with the body.
    let keel_runtime::extract::Json(request) = body.map_err(source)?;
    let customer = customer(&caller).map_err(forbidden)?;
    let (order, created) = orders
        .place(&customer, &request, key.as_deref())
        .await
        .map_err(failed)?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(order.clone())).into_response();
    // Relative to the request's own path, so that it resolves both on the service
    // (`/orders` → `/orders/<id>`) and through the gateway (`/orders/orders` →
    // `/orders/orders/<id>`).
    if let Ok(location) = HeaderValue::from_str(&format!("orders/{}", order.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn mine(State(orders): State<Orders>, caller: Caller) -> Result<Json<Vec<Order>>, Response> {
    let customer = customer(&caller).map_err(forbidden)?;
    Ok(Json(orders.orders_of(&customer).await.map_err(failed)?))
}

/// The query of `GET /orders/{id}`.
#[derive(Debug, Default, serde::Deserialize)]
struct Look {
    /// How long to wait for an order in progress to move on (`5s`, `500ms`); none: answer
    /// at once.
    #[serde(default, with = "humantime_serde")]
    wait: Option<std::time::Duration>,
}

async fn one(
    State(orders): State<Orders>,
    caller: Caller,
    Path(id): Path<String>,
    Query(look): Query<Look>,
) -> Result<Json<OrderView>, Response> {
    let viewer = customer(&caller).map_err(forbidden)?;
    let not_found = || source(Problem::not_found(format!("no order {id}")));
    let Ok(order_id) = id.parse::<OrderId>() else {
        return Err(not_found());
    };
    let admin = caller.principal().roles.contains("admin");
    orders
        .order(&order_id, &viewer, admin, look.wait.unwrap_or_default())
        .await
        .map_err(failed)?
        .map(Json)
        .ok_or_else(not_found)
}

/// The body of `POST /orders/{id}/cancel` (optional).
#[derive(Debug, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// Why, in the customer's words: 1 to 500 characters.
    pub reason: Option<String>,
}

async fn cancel(
    State(orders): State<Orders>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Order>), Response> {
    let body = body.map_err(|rejection| {
        source(keel_runtime::extract::body_problem(
            rejection.status(),
            rejection.body_text(),
        ))
    })?;
    // The body is optional: none, or a `Cancel`.
    let body: Cancel = match body.is_empty() {
        true => Cancel::default(),
        false => serde_json::from_slice(&body)
            .map_err(|error| source(Problem::bad_request(format!("the body: {error}"))))?,
    };
    let viewer = customer(&caller).map_err(forbidden)?;
    let not_found = || source(Problem::not_found(format!("no order {id}")));
    let Ok(order_id) = id.parse::<OrderId>() else {
        return Err(not_found());
    };
    let reason = body
        .reason
        .unwrap_or_else(|| "cancelled by the customer".to_owned());
    let length = reason.chars().count();
    if !(1..=500).contains(&length) || reason.chars().any(char::is_control) {
        return Err(source(Problem::bad_request(
            "a reason is 1 to 500 characters without control characters",
        )));
    }
    let admin = caller.principal().roles.contains("admin");
    let order = orders
        .cancel(&order_id, &viewer, admin, &reason)
        .await
        .map_err(failed)?
        .ok_or_else(not_found)?;
    Ok((StatusCode::ACCEPTED, Json(order)))
}

/// The API described for `/openapi.json` (OpenAPI 3.1).
pub fn openapi() -> Value {
    let order = serde_json::to_value(schemars::schema_for!(Order)).unwrap_or_default();
    let view = serde_json::to_value(schemars::schema_for!(OrderView)).unwrap_or_default();
    let place = serde_json::to_value(schemars::schema_for!(PlaceOrder)).unwrap_or_default();
    let cancel = serde_json::to_value(schemars::schema_for!(Cancel)).unwrap_or_default();
    let problem = json!({ "description": "RFC 9457 problem details", "content": { "application/problem+json": {} } });
    let order_body = |description: &str| json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Order" } } } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "orders", "version": "1.0.0" },
        "paths": {
            "/orders": {
                "get": {
                    "summary": "The caller's orders, newest first",
                    "security": [{ "bearer": [] }],
                    "responses": {
                        "200": { "description": "Orders", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Order" } } } } },
                        "401": problem.clone(),
                    },
                },
                "post": {
                    "summary": "Place an order (role customer)",
                    "security": [{ "bearer": [] }],
                    "parameters": [{ "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string", "maxLength": 255 } }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/PlaceOrder" } } } },
                    "responses": {
                        "202": order_body("Placed: pending until its saga ends"),
                        "200": order_body("Placed before with this Idempotency-Key"),
                        "400": problem.clone(),
                        "401": problem.clone(),
                        "403": problem.clone(),
                        "422": problem.clone(),
                        "503": problem.clone(),
                    },
                },
            },
            "/orders/{id}/cancel": { "post": {
                "summary": "Cancel a confirmed order: refunded and restocked (its customer, or an admin)",
                "security": [{ "bearer": [] }],
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                "requestBody": { "required": false, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Cancel" } } } },
                "responses": {
                    "202": order_body("Cancelling (or cancelled already)"),
                    "400": problem.clone(),
                    "401": problem.clone(),
                    "404": problem.clone(),
                    "409": problem.clone(),
                },
            } },
            "/orders/{id}": { "get": {
                "summary": "An order and its saga's steps (its customer, or an admin)",
                "security": [{ "bearer": [] }],
                "parameters": [
                    { "name": "id", "in": "path", "required": true, "schema": { "type": "string" } },
                    { "name": "wait", "in": "query", "required": false, "description": "Wait this long (`5s`, `500ms`; at most 20 s) for an order still pending or cancelling to move on before answering", "schema": { "type": "string" } },
                ],
                "responses": {
                    "200": { "description": "The order", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/OrderView" } } } },
                    "400": problem.clone(),
                    "401": problem.clone(),
                    "404": problem,
                },
            } },
        },
        "components": {
            "schemas": { "Order": order, "OrderView": view, "PlaceOrder": place, "Cancel": cancel },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
        },
    })
}

/// The events described for `/asyncapi.json` (the saga's commands are the participants'
/// to describe).
pub fn asyncapi() -> Value {
    AsyncApi::new("orders", "1.0.0")
        .sends::<OrderChanged>()
        .to_json()
}
