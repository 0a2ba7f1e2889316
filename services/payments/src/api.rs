//! The payments HTTP API, for the back office (the `admin` role; JSON; errors as
//! problem+json).
//!
//! - `POST /payments` with an `Idempotency-Key` header (the payment's id) and
//!   `{"amount": …, "method": "tok_…"}`: authorize; the same key again gets the same
//!   answer, the same key with another body 422, the same key while the first request is
//!   still being answered 409 with `Retry-After` (the request's claim on the id is
//!   committed before the provider is asked, so others are not kept waiting on it);
//! - `POST /payments/{id}/capture`, `POST /payments/{id}/void`: idempotent; 409 with
//!   `Retry-After` while the payment's authorization is being asked;
//! - `GET /payments/{id}`.
//!
//! A decline is 402, a provider failure 503 with `Retry-After` (nothing was done).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_runtime::Problem;
use keel_runtime::extract::{IdempotencyKey, Json, Path};
use keel_sdk::auth::Caller;
use keel_sdk::events::asyncapi::AsyncApi;
use keel_shop_kernel::Money;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::contract::{Authorize, Capture, Payment, Void};
use crate::domain::{Command, PaymentId, PaymentMethod, Refusal, TransitionError};
use crate::{Payments, PaymentsError};

pub fn router(payments: Payments) -> Router {
    Router::new()
        .route("/payments", post(authorize))
        .route("/payments/{id}", get(payment))
        .route("/payments/{id}/capture", post(capture))
        .route("/payments/{id}/void", post(void))
        .with_state(payments)
}

/// The body of `POST /payments`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    pub amount: Money,
    pub method: PaymentMethod,
}

fn source(problem: Problem) -> Response {
    problem.with_source("payments").into_response()
}

fn bad_request(error: impl std::fmt::Display) -> Response {
    source(Problem::bad_request(error.to_string()))
}

fn refused(refusal: Refusal) -> Response {
    let detail = refusal.to_string();
    source(match refusal {
        Refusal::Declined(_) => Problem::new(
            StatusCode::PAYMENT_REQUIRED,
            "payment-declined",
            "Payment declined",
        )
        .with_detail(detail),
        Refusal::KeyReused => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
        )
        .with_detail(detail),
        Refusal::Unknown(_) => Problem::not_found(detail),
        // As draft-ietf-httpapi-idempotency-key-header says of a request retried while the
        // first is still being processed.
        Refusal::InProgress => Problem::conflict(detail).with_retry_after(Duration::from_secs(1)),
        Refusal::Closed(_)
        | Refusal::OtherAmount
        | Refusal::Transition(TransitionError::NotAuthorized(_)) => Problem::conflict(detail),
    })
}

fn failed(error: PaymentsError) -> Response {
    match error {
        PaymentsError::Provider(failure) => source(
            Problem::unavailable(format!("{failure}; nothing was done"))
                .with_retry_after(Duration::from_secs(1)),
        ),
        error => {
            tracing::error!(%error, "payment operation failed");
            source(
                Problem::unavailable("payments cannot answer now")
                    .with_retry_after(Duration::from_secs(1)),
            )
        }
    }
}

/// Runs `work` in a transaction of its own, committed unless it failed.
async fn in_tx<F>(payments: &Payments, work: F) -> Result<Payment, Response>
where
    F: AsyncFnOnce(&mut keel_sdk::Tx) -> Result<Result<Payment, Refusal>, PaymentsError>,
{
    let mut tx = payments
        .db()
        .begin()
        .await
        .map_err(|error| failed(error.into()))?;
    let outcome = work(&mut tx).await.map_err(failed)?;
    // A decline is an answer to keep, like an authorization.
    tx.commit().await.map_err(|error| failed(error.into()))?;
    outcome.map_err(refused)
}

async fn authorize(
    State(payments): State<Payments>,
    caller: Caller,
    IdempotencyKey(key): IdempotencyKey,
    body: Result<Json<AuthorizeRequest>, Problem>,
) -> Result<(StatusCode, axum::Json<Payment>), Response> {
    caller
        .require_role("admin")
        .map_err(IntoResponse::into_response)?;
    // Read after the caller is known: who may not pay learns that, not what is wrong with
    // the body.
    let Json(request) = body.map_err(source)?;
    let key = key.ok_or_else(|| bad_request("an Idempotency-Key header is required"))?;
    let id: PaymentId = key
        .parse()
        .map_err(|error| bad_request(format!("Idempotency-Key: {error}")))?;
    let payment = payments
        .authorize_now(&id, request.amount, &request.method)
        .await
        .map_err(failed)?
        .map_err(refused)?;
    Ok((StatusCode::CREATED, axum::Json(payment)))
}

async fn settle(
    payments: Payments,
    caller: Caller,
    id: String,
    command: Command,
) -> Result<axum::Json<Payment>, Response> {
    caller
        .require_role("admin")
        .map_err(IntoResponse::into_response)?;
    let id: PaymentId = id.parse().map_err(bad_request)?;
    let payment = in_tx(&payments, async |tx| {
        payments.apply(tx, &id, command, None).await
    })
    .await?;
    Ok(axum::Json(payment))
}

async fn capture(
    State(payments): State<Payments>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Payment>, Response> {
    settle(payments, caller, id, Command::Capture).await
}

async fn void(
    State(payments): State<Payments>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Payment>, Response> {
    settle(payments, caller, id, Command::Void).await
}

async fn payment(
    State(payments): State<Payments>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Payment>, Response> {
    caller
        .require_role("admin")
        .map_err(IntoResponse::into_response)?;
    let id: PaymentId = id.parse().map_err(bad_request)?;
    let found = payments.payment(&id).await.map_err(failed)?;
    found
        .map(axum::Json)
        .ok_or_else(|| source(Problem::not_found(format!("no payment {id}"))))
}

/// The API described for `/openapi.json` (OpenAPI 3.1).
pub fn openapi() -> Value {
    let payment = serde_json::to_value(schemars::schema_for!(Payment)).unwrap_or_default();
    let request = serde_json::to_value(schemars::schema_for!(AuthorizeRequest)).unwrap_or_default();
    let problem = json!({ "description": "RFC 9457 problem details", "content": { "application/problem+json": {} } });
    let id =
        json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } });
    let ok = json!({ "description": "The payment", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Payment" } } } });
    let secured = |summary: &str, parameters: Value, extra: Value| {
        let mut operation = json!({
            "summary": summary,
            "parameters": parameters,
            "security": [{ "bearer": [] }],
            "responses": {
                "200": ok.clone(), "400": problem.clone(), "401": problem.clone(),
                "403": problem.clone(), "404": problem.clone(), "409": problem.clone(),
                "503": problem.clone(),
            },
        });
        if let (Some(operation), Some(extra)) = (operation.as_object_mut(), extra.as_object()) {
            operation.extend(extra.clone());
        }
        operation
    };
    json!({
        "openapi": "3.1.0",
        "info": { "title": "payments", "version": "1.0.0" },
        "paths": {
            "/payments": { "post": secured(
                "Authorize a payment (role admin); the Idempotency-Key is its id",
                json!([{ "name": "Idempotency-Key", "in": "header", "required": true, "schema": { "type": "string" } }]),
                json!({
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/AuthorizeRequest" } } } },
                    "responses": {
                        "201": ok.clone(), "400": problem.clone(), "401": problem.clone(),
                        "402": problem.clone(), "403": problem.clone(), "409": problem.clone(),
                        "422": problem.clone(), "503": problem.clone(),
                    },
                }),
            ) },
            "/payments/{id}": { "get": secured("A payment (role admin)", json!([id.clone()]), json!({})) },
            "/payments/{id}/capture": { "post": secured("Capture (role admin)", json!([id.clone()]), json!({})) },
            "/payments/{id}/void": { "post": secured("Void or refund (role admin)", json!([id]), json!({})) },
        },
        "components": {
            "schemas": { "Payment": payment, "AuthorizeRequest": request },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
        },
    })
}

/// The commands and events described for `/asyncapi.json`.
pub fn asyncapi() -> Value {
    AsyncApi::new("payments", "1.0.0")
        .receives::<Authorize>()
        .receives::<Capture>()
        .receives::<Void>()
        .sends::<Payment>()
        .to_json()
}
