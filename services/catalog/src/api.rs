//! The catalog's HTTP API (JSON; errors as problem+json).
//!
//! - `GET /products`: the products for sale, by SKU, a page at a time (`limit`, 100 by
//!   default, at most 1,000; `after`, the last SKU of the page before), with a
//!   `Link: <?after=…&limit=…>; rel="next"` header while there are more (RFC 8288, as
//!   GitHub pages; relative, so that it holds behind the gateway's prefix);
//! - `GET /products/{sku}`: one product (for sale or not);
//! - `PUT /products/{sku}`: create or replace a product (the `admin` role); 201 when new.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keel_runtime::Problem;
use keel_runtime::extract::{Path, Query};
use keel_sdk::auth::Caller;
use keel_sdk::events::asyncapi::AsyncApi;
use serde_json::{Value, json};

use crate::domain::{Product, ProductChange, ProductError, Sku};
use crate::events::ProductChanged;
use crate::{Catalog, CatalogError};

pub fn router(catalog: Catalog) -> Router {
    Router::new()
        .route("/products", get(for_sale))
        .route("/products/{sku}", get(product).put(put))
        .with_state(catalog)
}

/// Products per page unless asked otherwise, and the most a page may hold.
const PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    after: Option<String>,
    limit: Option<u32>,
}

async fn for_sale(
    State(catalog): State<Catalog>,
    Query(page): Query<Page>,
) -> Result<Response, Problem> {
    let limit = page.limit.unwrap_or(PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(
            Problem::bad_request(format!("limit is 1 to {MAX_PAGE}")).with_source("catalog")
        );
    }
    let after: Option<Sku> = page
        .after
        .map(|sku| sku.parse())
        .transpose()
        .map_err(|error| invalid(ProductError::from(error)))?;
    // One more than asked: whether there is a next page, without a second query.
    let mut products = catalog
        .for_sale(after.as_ref(), limit + 1)
        .await
        .map_err(problem)?;
    let more = products.len() > limit as usize;
    products.truncate(limit as usize);
    let next = match products.last() {
        Some(last) if more => Some(format!("<?after={}&limit={limit}>; rel=\"next\"", last.sku)),
        _ => None,
    };
    let mut response = Json(products).into_response();
    if let Some(next) = next
        && let Ok(value) = axum::http::HeaderValue::from_str(&next)
    {
        response
            .headers_mut()
            .insert(axum::http::header::LINK, value);
    }
    Ok(response)
}

async fn product(
    State(catalog): State<Catalog>,
    Path(sku): Path<String>,
) -> Result<Json<Product>, Problem> {
    let sku: Sku = sku
        .parse()
        .map_err(|error| invalid(ProductError::from(error)))?;
    catalog
        .product(&sku)
        .await
        .map_err(problem)?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no product {sku}")))
}

async fn put(
    State(catalog): State<Catalog>,
    caller: Caller,
    Path(sku): Path<String>,
    body: Result<keel_runtime::extract::Json<ProductChange>, Problem>,
) -> Result<Response, Response> {
    caller
        .require_role("admin")
        .map_err(IntoResponse::into_response)?;
    // Read after the caller is known: who may not write learns that, not what is wrong
    // with the body.
    let keel_runtime::extract::Json(change) =
        body.map_err(|problem| problem.with_source("catalog").into_response())?;
    let sku: Sku = sku
        .parse()
        .map_err(|error| invalid(ProductError::from(error)).into_response())?;
    let (product, created) = catalog
        .put(sku, change)
        .await
        .map_err(|error| problem(error).into_response())?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(product)).into_response())
}

fn invalid(error: ProductError) -> Problem {
    Problem::bad_request(error.to_string()).with_source("catalog")
}

pub(crate) fn problem(error: CatalogError) -> Problem {
    match error {
        CatalogError::Invalid(error) => return invalid(error),
        error => {
            tracing::error!(%error, "catalog operation failed");
            Problem::unavailable("the catalog cannot answer now")
        }
    }
    .with_source("catalog")
}

/// The API described for `/openapi.json` (OpenAPI 3.1).
pub fn openapi() -> Value {
    let product = serde_json::to_value(schemars::schema_for!(Product)).unwrap_or_default();
    let change = serde_json::to_value(schemars::schema_for!(ProductChange)).unwrap_or_default();
    let problem = json!({ "description": "RFC 9457 problem details", "content": { "application/problem+json": {} } });
    let sku = json!({ "name": "sku", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^[A-Z0-9](?:[A-Z0-9-]{0,30}[A-Z0-9])?$" } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "catalog", "version": "1.0.0" },
        "paths": {
            "/products": { "get": {
                "summary": "The products for sale, a page at a time",
                "parameters": [
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": PAGE } },
                    { "name": "after", "in": "query", "description": "The last SKU of the page before", "schema": { "type": "string" } },
                ],
                "responses": {
                    "200": {
                        "description": "Products, by SKU; while there are more, a Link header with rel=\"next\"",
                        "headers": { "Link": { "schema": { "type": "string" } } },
                        "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Product" } } } },
                    },
                    "400": problem.clone(),
                },
            } },
            "/products/{sku}": {
                "get": {
                    "summary": "One product",
                    "parameters": [sku.clone()],
                    "responses": {
                        "200": { "description": "The product", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Product" } } } },
                        "404": problem.clone(),
                    },
                },
                "put": {
                    "summary": "Create or replace a product (role admin)",
                    "parameters": [sku],
                    "security": [{ "bearer": [] }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ProductChange" } } } },
                    "responses": {
                        "200": { "description": "Replaced" },
                        "201": { "description": "Created" },
                        "400": problem.clone(),
                        "401": problem.clone(),
                        "403": problem,
                    },
                },
            },
        },
        "components": {
            "schemas": { "Product": product, "ProductChange": change },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
        },
    })
}

/// The events described for `/asyncapi.json`.
pub fn asyncapi() -> Value {
    AsyncApi::new("catalog", "1.0.0")
        .sends::<ProductChanged>()
        .to_json()
}
