//! The inventory's HTTP API (JSON; errors as problem+json).
//!
//! - `GET /stock/{sku}`: the stock of a SKU (anyone);
//! - `PUT /stock/{sku}`: set the count on hand, `{"on_hand": n}` (the `admin` role);
//! - `GET /reservations/{id}`: a reservation and its lines (the `admin` role).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keel_runtime::Problem;
use keel_runtime::extract::Path;
use keel_sdk::auth::Caller;
use keel_sdk::events::asyncapi::AsyncApi;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::contract::{Commit, Release, Reserve, StockLevel};
use crate::domain::{ReservationId, Sku, StockError};
use crate::{Inventory, InventoryError, Reservation};

pub fn router(inventory: Inventory) -> Router {
    Router::new()
        .route("/stock/{sku}", get(stock).put(set_on_hand))
        .route("/reservations/{id}", get(reservation))
        .with_state(inventory)
}

/// The body of `PUT /stock/{sku}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Count {
    pub on_hand: u32,
}

fn bad_request(error: impl std::fmt::Display) -> Problem {
    Problem::bad_request(error.to_string()).with_source("inventory")
}

async fn stock(
    State(inventory): State<Inventory>,
    Path(text): Path<String>,
) -> Result<Json<StockLevel>, Problem> {
    let sku: Sku = text.parse().map_err(bad_request)?;
    let stock = inventory.stock(&sku).await.map_err(problem)?;
    stock
        .map(|stock| Json(StockLevel::from(&stock)))
        .ok_or_else(|| {
            Problem::not_found(format!("no stock counted for {sku}")).with_source("inventory")
        })
}

async fn set_on_hand(
    State(inventory): State<Inventory>,
    caller: Caller,
    Path(text): Path<String>,
    body: Result<keel_runtime::extract::Json<Count>, Problem>,
) -> Result<Json<StockLevel>, Response> {
    caller
        .require_role("admin")
        .map_err(IntoResponse::into_response)?;
    // Read after the caller is known: who may not write learns that, not what is wrong
    // with the body.
    let keel_runtime::extract::Json(count) =
        body.map_err(|problem| problem.with_source("inventory").into_response())?;
    let sku: Sku = text
        .parse()
        .map_err(|error| bad_request(error).into_response())?;
    let counted = inventory.set_on_hand(&sku, count.on_hand).await;
    match counted.map_err(|error| problem(error).into_response())? {
        Ok(stock) => Ok(Json(StockLevel::from(&stock))),
        Err(error @ StockError::BelowReserved { .. }) => Err(Problem::conflict(error.to_string())
            .with_source("inventory")
            .into_response()),
        Err(error) => Err(bad_request(error).into_response()),
    }
}

async fn reservation(
    State(inventory): State<Inventory>,
    caller: Caller,
    Path(text): Path<String>,
) -> Result<Json<Reservation>, Response> {
    caller
        .require_role("admin")
        .map_err(IntoResponse::into_response)?;
    let id: ReservationId = text
        .parse()
        .map_err(|error| bad_request(error).into_response())?;
    let found = inventory.reservation(&id).await;
    found
        .map_err(|error| problem(error).into_response())?
        .map(Json)
        .ok_or_else(|| {
            Problem::not_found(format!("no reservation {id}"))
                .with_source("inventory")
                .into_response()
        })
}

fn problem(error: InventoryError) -> Problem {
    tracing::error!(%error, "inventory operation failed");
    match error {
        InventoryError::Store(crate::StoreError::Corrupt(_)) => {
            Problem::internal("the inventory's data is damaged")
        }
        _ => Problem::unavailable("the inventory cannot answer now"),
    }
    .with_source("inventory")
}

/// The API described for `/openapi.json` (OpenAPI 3.1).
pub fn openapi() -> Value {
    let level = serde_json::to_value(schemars::schema_for!(StockLevel)).unwrap_or_default();
    let count = serde_json::to_value(schemars::schema_for!(Count)).unwrap_or_default();
    let reservation = serde_json::to_value(schemars::schema_for!(Reservation)).unwrap_or_default();
    let problem = json!({ "description": "RFC 9457 problem details", "content": { "application/problem+json": {} } });
    let sku =
        json!({ "name": "sku", "in": "path", "required": true, "schema": { "type": "string" } });
    let level_body = json!({ "description": "The stock", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StockLevel" } } } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "inventory", "version": "1.0.0" },
        "paths": {
            "/stock/{sku}": {
                "get": {
                    "summary": "The stock of a SKU",
                    "parameters": [sku.clone()],
                    "responses": { "200": level_body.clone(), "400": problem.clone(), "404": problem.clone() },
                },
                "put": {
                    "summary": "Set the count on hand (role admin)",
                    "parameters": [sku],
                    "security": [{ "bearer": [] }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Count" } } } },
                    "responses": {
                        "200": level_body,
                        "400": problem.clone(),
                        "401": problem.clone(),
                        "403": problem.clone(),
                        "409": { "description": "Fewer than are reserved", "content": { "application/problem+json": {} } },
                    },
                },
            },
            "/reservations/{id}": { "get": {
                "summary": "A reservation (role admin)",
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                "security": [{ "bearer": [] }],
                "responses": {
                    "200": { "description": "The reservation", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Reservation" } } } },
                    "401": problem.clone(),
                    "403": problem.clone(),
                    "404": problem,
                },
            } },
        },
        "components": {
            "schemas": { "StockLevel": level, "Count": count, "Reservation": reservation },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
        },
    })
}

/// The commands and events described for `/asyncapi.json`.
pub fn asyncapi() -> Value {
    AsyncApi::new("inventory", "1.0.0")
        .receives::<Reserve>()
        .receives::<Release>()
        .receives::<Commit>()
        .sends::<StockLevel>()
        .to_json()
}
